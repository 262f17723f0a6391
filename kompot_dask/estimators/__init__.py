"""GP estimators for one set of cells: fit small (landmark-sized state), predict anywhere."""

from .density import DensityEstimator, DensityPredictor, DensityState

__all__ = ["DensityEstimator", "DensityPredictor", "DensityState"]
