"""Input conversion helpers for :func:`kompot_dask.io.make_dataset` (no computation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["check_chunk", "as_labels", "as_names", "float_dtype", "lazy_expression"]


def check_chunk(value: Any, name: str) -> int:
    """Return a chunk size: a positive int, or -1 for the whole axis."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or not (int(value) > 0 or int(value) == -1):
        msg = f"`{name}` must be a positive int or -1 (one chunk for the whole axis); got {value!r}"
        raise ValueError(msg)
    return int(value)


def as_labels(values: Any, n_cells: int, name: str) -> np.ndarray:
    """Per-cell labels as a numpy unicode array, rejecting missing values."""
    import pandas as pd

    obj = np.asarray(values, dtype=object)
    if obj.ndim != 1:
        msg = f"`{name}` must be one label per cell (1-D); got shape {obj.shape}"
        raise ValueError(msg)
    if len(obj) != n_cells:
        msg = (
            f"`{name}` has {len(obj)} labels but the cell states have {n_cells} cells; "
            "pass one label per cell, in the same order as the cell states"
        )
        raise ValueError(msg)
    missing = np.asarray(pd.isna(obj), dtype=bool)
    if missing.any():
        first = np.nonzero(missing)[0][:5].tolist()
        msg = (
            f"`{name}` has {int(missing.sum())} missing label(s) (first cells {first}); "
            "drop those cells or give them a label"
        )
        raise ValueError(msg)
    return obj.astype(str) if n_cells else np.empty(0, dtype="<U1")


def as_names(values: Any, n: int, name: str, what: str) -> np.ndarray:
    """Names for a coordinate (default "0", "1", ...) as a numpy unicode array."""
    if values is None:
        return np.arange(n).astype(object).astype(str)
    names = np.asarray(values, dtype=object)
    if names.ndim != 1 or len(names) != n:
        msg = (
            f"`{name}` has shape {names.shape} but there are {n} {what}; pass one name per "
            f"{what[:-1]} or leave `{name}=None` for names '0', '1', ..."
        )
        raise ValueError(msg)
    return names.astype(str) if n else np.empty(0, dtype="<U1")


def float_dtype(dtype: Any, requested: Any) -> np.dtype:
    """Expression dtype: ``requested``, else float32/float64 kept and others float64."""
    if requested is not None:
        out = np.dtype(requested)
        if out not in (np.float32, np.float64):
            msg = f"`dtype` must be float32 or float64; got {out}"
            raise ValueError(msg)
        return out
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float64)


def lazy_expression(expression: Any, cc: int, gc: int) -> da.Array:
    """Dask array over an expression matrix without reading it.

    scipy sparse stays sparse until each block is densified; dask arrays are rechunked;
    chunked on-disk arrays (zarr, h5py) are wrapped; anything else goes through numpy.
    """
    import dask.array as da
    import scipy.sparse as sp

    from ._blocks import InMemorySparse, lazy_matrix

    if sp.issparse(expression):
        return lazy_matrix(InMemorySparse(expression), cc, gc)
    if isinstance(expression, da.Array):
        return expression.rechunk((cc, gc))
    on_disk = hasattr(expression, "chunks") and hasattr(expression, "dtype")
    arr = expression if on_disk else np.asarray(expression)
    return da.from_array(arr, chunks=(cc, gc))
