"""Kompot's AnnData functions: ``da(adata, ...)`` and ``de(adata, ...)`` with Kompot 0.8.0's fields.

Importing this package does not import anndata, pandas or JAX; ``da`` / ``de`` load their
modules on first use and import anndata when called.
"""

from __future__ import annotations

import importlib
from typing import Any

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

_HOMES = {"da": "._da", "de": "._de"}


def __getattr__(name: str) -> Any:
    """``da`` and ``de``, loaded on first access (they pull in the GP machinery)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value
