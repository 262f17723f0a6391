"""Input checks shared by the estimators.

Checks run before any computation and say what to fix. Cell states (n x D) are always
small enough to hold in memory; expression (n x G) is read one chunk of cells at a time
from anything that slices like an array (numpy, dask, zarr, h5py, scipy sparse).
"""

from __future__ import annotations

from typing import Any

import numpy as np


__all__ = [
    "as_cell_states",
    "check_landmarks",
    "check_positive",
    "as_expression",
    "read_rows",
    "take_rows",
]


def as_cell_states(x: Any, name: str = "x", min_cells: int = 2) -> np.ndarray:
    """Return ``x`` as a finite float64 (n, D) array with at least ``min_cells`` rows.

    Cell states are small (n x D); dask, zarr and xarray inputs are read here (an xarray
    DataArray with a ``cell`` dim is put cells first).
    """
    if hasattr(x, "dims") and hasattr(x, "variable") and "cell" in x.dims and x.dims[0] != "cell":
        x = x.transpose("cell", ...)
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        msg = (
            f"`{name}` must be a 2-D array of cell states (n_cells, n_features); got shape "
            f"{arr.shape}. Reshape a single feature with `{name}.reshape(-1, 1)`."
        )
        raise ValueError(msg)
    if arr.shape[0] < min_cells:
        msg = f"`{name}` has {arr.shape[0]} cell(s); at least {min_cells} are needed to fit a GP"
        raise ValueError(msg)
    if arr.shape[1] < 1:
        msg = f"`{name}` has no features (shape {arr.shape}); pass at least one cell-state column"
        raise ValueError(msg)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        msg = (
            f"`{name}` contains {int(bad.sum())} NaN/inf value(s) in {len(rows)} cell(s) "
            f"(first rows: {rows[:5].tolist()}); remove those cells or impute their states"
        )
        raise ValueError(msg)
    return arr


def check_landmarks(landmarks: Any, n_features: int, name: str = "landmarks") -> np.ndarray:
    """Return landmarks as a finite float64 (M, D) array matching the cell-state dimension."""
    arr = np.asarray(landmarks, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        msg = (
            f"`{name}` must have shape (n_landmarks, {n_features}) to match the cell states; "
            f"got {arr.shape}. Compute landmarks in the same cell-state space."
        )
        raise ValueError(msg)
    if arr.shape[0] < 1:
        raise ValueError(f"`{name}` is empty; pass at least one landmark or landmarks=None")
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN/inf; pass finite landmark coordinates")
    return arr


def check_positive(value: Any, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` as float, requiring it to be finite and > 0 (or >= 0)."""
    v = float(value)
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = "non-negative" if allow_zero else "positive"
        msg = f"`{name}` must be a finite {bound} number; got {value!r}"
        raise ValueError(msg)
    return v


def as_expression(y: Any, n_cells: int, name: str = "y") -> tuple[Any, bool]:
    """Check the shape of an expression matrix without reading it.

    Returns the array-like (a numpy array for lists) and whether it was one-dimensional.
    Values are checked chunk by chunk as they are read (:func:`read_rows`). An xarray
    DataArray is unwrapped to its (dask or numpy) data, cells first when its dims say so.
    """
    if hasattr(y, "dims") and hasattr(y, "variable"):  # xarray.DataArray
        if "cell" in y.dims and y.dims[0] != "cell":
            y = y.transpose("cell", ...)
        y = y.data
    if not hasattr(y, "shape") or not hasattr(y, "__getitem__"):
        y = np.asarray(y, dtype=np.float64)
    shape = tuple(y.shape)
    if len(shape) not in (1, 2):
        msg = f"`{name}` must be (n_cells,) or (n_cells, n_genes); got shape {shape}"
        raise ValueError(msg)
    if shape[0] != n_cells:
        msg = (
            f"`{name}` has {shape[0]} rows but the cell states have {n_cells}; "
            "expression rows must be the same cells in the same order"
        )
        raise ValueError(msg)
    if len(shape) == 2 and shape[1] < 1:
        raise ValueError(f"`{name}` has no genes (shape {shape})")
    return y, len(shape) == 1


def read_rows(arr: Any, rows: slice, name: str = "y") -> np.ndarray:
    """Read rows of ``arr`` as a dense, finite float64 array (2-D)."""
    block = arr[rows]
    if hasattr(block, "toarray"):  # scipy sparse
        block = block.toarray()
    elif hasattr(block, "compute"):  # dask: read in this process, even on a worker
        block = block.compute(scheduler="sync")
    block = np.asarray(block, dtype=np.float64)
    if block.ndim == 1:
        block = block[:, None]
    if not np.isfinite(block).all():
        bad = np.unique(np.nonzero(~np.isfinite(block))[0]) + (rows.start or 0)
        msg = (
            f"`{name}` contains NaN/inf values (cells {bad[:5].tolist()}...); "
            "impute or drop them before fitting"
        )
        raise ValueError(msg)
    return block


def take_rows(arr: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` (sorted integer indices) of an array-like, lazily where it allows.

    numpy, scipy sparse and dask index directly (dask stays lazy); zarr uses an
    orthogonal selection; h5py needs increasing indices, which sorted ``rows`` are.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if hasattr(arr, "get_orthogonal_selection"):  # zarr
        sel = (rows,) + (slice(None),) * (len(arr.shape) - 1)
        return arr.get_orthogonal_selection(sel)
    return arr[rows]
