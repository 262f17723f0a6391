"""GP estimators for one set of cells: fit small (landmark-sized state), predict anywhere."""

from .density import DensityEstimator, DensityPredictor, DensityState
from .function import FunctionEstimator, FunctionPredictor, FunctionState

__all__ = [
    "DensityEstimator",
    "DensityPredictor",
    "DensityState",
    "FunctionEstimator",
    "FunctionPredictor",
    "FunctionState",
]
