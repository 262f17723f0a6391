"""Kompot's AnnData functions: ``da(adata, ...)`` and ``de(adata, ...)`` with Kompot 0.8.0's fields.

Importing this package does not import anndata or pandas; the functions do when called.
"""

from ._da import da
from ._de import de
from ._fields import sanitize
from .settings import DAThresholdSettings, FDRSettings, FilterSettings, GPSettings, OutputSettings, StorageSettings

__all__ = [
    "da",
    "de",
    "sanitize",
    "DAThresholdSettings",
    "FDRSettings",
    "FilterSettings",
    "GPSettings",
    "OutputSettings",
    "StorageSettings",
]
