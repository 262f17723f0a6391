"""kompot_dask: Kompot's differential abundance and expression as an out-of-core Dask engine.

Importing the package has no side effects: no cluster is started and no global JAX or
logging setting is changed (GP algebra runs under a thread-local float64 switch). The
public names below load their modules (and JAX, scipy) on first use, so ``import
kompot_dask`` and ``kompot-dask --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import get_options, set_options

__version__ = "0.1.0.dev0"

_HOMES = {
    "da": ".anndata",
    "de": ".anndata",
    "GPSettings": ".anndata",
    "FDRSettings": ".anndata",
    "DAThresholdSettings": ".anndata",
    "FilterSettings": ".anndata",
    "StorageSettings": ".anndata",
    "OutputSettings": ".anndata",
    "DifferentialAbundance": ".differential",
    "DifferentialExpression": ".differential",
    "SampleVarianceEstimator": ".differential",
    "DensityEstimator": ".estimators",
    "DensityPredictor": ".estimators",
    "FunctionEstimator": ".estimators",
    "FunctionPredictor": ".estimators",
    "compute_fdr": ".fdr",
}

__all__ = [*_HOMES, "get_options", "set_options", "__version__"]


def __getattr__(name: str) -> Any:
    """Load a public name, or a subpackage (``kompot_dask.plot``), on first access."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
