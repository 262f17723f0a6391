"""kompot_dask: Kompot's differential abundance and expression as an out-of-core Dask engine.

Importing the package has no side effects: no cluster is started and no global JAX or
logging setting is changed (GP algebra runs under a thread-local float64 switch).
"""

from .anndata import DAThresholdSettings, FDRSettings, FilterSettings, GPSettings, OutputSettings, StorageSettings, da, de
from .differential import DifferentialAbundance, DifferentialExpression, SampleVarianceEstimator
from .estimators import DensityEstimator, DensityPredictor, FunctionEstimator, FunctionPredictor
from .fdr import compute_fdr
from .options import get_options, set_options

__version__ = "0.1.0.dev0"

__all__ = [
    "da",
    "de",
    "GPSettings",
    "FDRSettings",
    "DAThresholdSettings",
    "FilterSettings",
    "StorageSettings",
    "OutputSettings",
    "DifferentialAbundance",
    "DifferentialExpression",
    "SampleVarianceEstimator",
    "DensityEstimator",
    "DensityPredictor",
    "FunctionEstimator",
    "FunctionPredictor",
    "compute_fdr",
    "get_options",
    "set_options",
    "__version__",
]
