"""Input checks shared by the estimators.

Checks run before any computation and say what to fix. Cell states (n x D) are always
small enough to hold in memory; expression (n x G) is read one chunk of cells at a time
from anything that slices like an array (numpy, dask, zarr, h5py, scipy sparse).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import scipy.sparse


__all__ = [
    "as_cell_states",
    "check_landmarks",
    "check_positive",
    "check_count",
    "as_expression",
    "read_rows",
    "take_rows",
]

# Cell-state embeddings have at most a few dozen columns (the density needs d <= 50); a
# wider matrix with fewer rows than columns is taken to be transposed.
WIDE_COLUMNS = 50


def as_cell_states(
    x: Any, name: str = "x", min_cells: int = 2, check_orientation: bool | None = None
) -> np.ndarray:
    """Return ``x`` as a finite float64 (n, D) array with at least ``min_cells`` rows.

    Cell states are small (n x D); dask, zarr and xarray inputs are read here (an xarray
    DataArray with a ``cell`` dim is put cells first; a kompot_dask dataset gives its
    ``cell_states``).

    Parameters
    ----------
    x : array-like (n_cells, n_features)
        Cell states. Boolean and integer values are cast to float64; complex values
        are rejected (their imaginary part would be dropped).
    name : str
        The argument's name, used in error messages.
    min_cells : int
        Fewest cells accepted (2 to fit a GP, 1 to predict).
    check_orientation : bool, optional
        ``True``: reject a matrix with fewer rows than columns as transposed (the
        differential classes' conditions). ``None`` (default): the same, but only when
        ``min_cells >= 2`` (cells a model is fitted on; query cells may be fewer than the
        features) and the matrix has more than ``WIDE_COLUMNS`` (50) columns, so that a
        small replicate fitted on its own in a low-dimensional embedding (as the
        per-sample fits of sample variance do) keeps working. ``False``: never.

    Returns
    -------
    numpy.ndarray
        Float64 array of shape (n_cells, n_features).

    Raises
    ------
    ValueError
        If ``x`` is not 2-D, not real numbers, has too few cells or no features, looks
        transposed, or contains NaN/inf.
    """
    if hasattr(x, "data_vars") and "cell_states" in x.data_vars:  # a kompot_dask dataset
        x = x["cell_states"]
    if hasattr(x, "dims") and hasattr(x, "variable") and "cell" in x.dims and x.dims[0] != "cell":
        x = x.transpose("cell", ...)
    if scipy.sparse.issparse(x):
        x = x.toarray()
    arr = np.asarray(x)
    _check_real(arr.dtype, name, "cell states")
    try:
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as err:
        msg = f"`{name}` must hold numbers (cell-state coordinates); got dtype {arr.dtype} ({err})"
        raise ValueError(msg) from None
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
    if check_orientation is None:
        check_orientation = min_cells >= 2 and arr.shape[1] > WIDE_COLUMNS
    if check_orientation and arr.shape[0] < arr.shape[1]:
        msg = (
            f"`{name}` has shape {arr.shape}: fewer rows (cells) than columns (features), so it "
            f"looks transposed. Pass cell states as (n_cells, n_features), e.g. `{name}.T`"
        )
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


def check_count(value: Any, name: str, minimum: int = 0, allow_none: bool = False) -> int | None:
    """Return ``value`` as a Python int ``>= minimum``, refusing anything that is not a whole number.

    Parameters
    ----------
    value : int, numpy integer or None
        The count to check. Floats (even ``30.0``) and bools are rejected rather than
        truncated or read as 0/1.
    name : str
        The argument's name, used in error messages.
    minimum : int
        Smallest accepted value.
    allow_none : bool
        Whether ``None`` is accepted (and returned as ``None``).

    Returns
    -------
    int or None

    Raises
    ------
    ValueError
        If ``value`` is not an integer or is below ``minimum``.
    """
    if value is None and allow_none:
        return None
    expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if isinstance(value, (bool, np.bool_)):
        msg = f"`{name}` must be {expected}; got the bool {value!r}. Pass a whole number, e.g. {name}={max(minimum, 1)}"
        raise ValueError(msg)
    try:
        count = operator.index(value)
    except TypeError:
        msg = (
            f"`{name}` must be {expected}; got {value!r} ({type(value).__name__}). Pass a whole number "
            f"(it is not rounded), e.g. {name}={max(minimum, 1)}"
        )
        raise ValueError(msg) from None
    if count < minimum:
        msg = f"`{name}` must be {expected}; got {value!r}. Pass a number >= {minimum}"
        raise ValueError(msg)
    return int(count)


def _check_real(dtype: Any, name: str, what: str) -> None:
    """Reject complex dtypes: casting them to float64 silently drops the imaginary part."""
    try:
        dtype = np.dtype(dtype) if dtype is not None else None
    except TypeError:  # a dtype numpy does not know (e.g. a zarr data type object)
        return
    if dtype is not None and dtype.kind == "c":
        msg = (
            f"`{name}` has complex dtype {dtype}; {what} must be real numbers. Pass the "
            f"part you mean explicitly, e.g. `np.real({name})` or `np.abs({name})`"
        )
        raise ValueError(msg)


def as_expression(y: Any, n_cells: int, name: str = "y") -> tuple[Any, bool]:
    """Check the shape of an expression matrix without reading it.

    Returns the array-like (a numpy array for lists) and whether it was one-dimensional.
    Values are checked chunk by chunk as they are read (:func:`read_rows`). An xarray
    DataArray is unwrapped to its (dask or numpy) data, cells first when its dims say so.
    Scipy sparse CSR and CSC inputs are kept as they are; the other sparse formats (COO,
    BSR, DIA, LIL, DOK, matrix or array classes), which cannot be sliced by rows or only
    slowly, are converted to CSR once. Boolean and integer values are read as float64;
    complex values are rejected.

    Parameters
    ----------
    y : array-like (n_cells,) or (n_cells, n_genes)
        Expression: numpy, dask, zarr, h5py, xarray or scipy sparse.
    n_cells : int
        Number of cells (rows) ``y`` must have.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    y : array-like
        An array that slices by rows.
    one_d : bool
        Whether ``y`` was one-dimensional.

    Raises
    ------
    ValueError
        If ``y`` has the wrong shape or a complex dtype.
    """
    if hasattr(y, "dims") and hasattr(y, "variable"):  # xarray.DataArray
        if "cell" in y.dims and y.dims[0] != "cell":
            y = y.transpose("cell", ...)
        y = y.data
    if scipy.sparse.issparse(y):
        _check_real(y.dtype, name, "expression values")
        if y.ndim != 2:
            y = y.toarray()
        elif y.format not in ("csr", "csc"):
            y = y.tocsr()
    if not hasattr(y, "shape") or not hasattr(y, "__getitem__"):
        y = np.asarray(y)
        _check_real(y.dtype, name, "expression values")
        y = y.astype(np.float64, copy=False)
    _check_real(getattr(y, "dtype", None), name, "expression values")
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
    block = np.asarray(block)
    _check_real(block.dtype, name, "expression values")
    block = block.astype(np.float64, copy=False)
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
    if scipy.sparse.issparse(arr) and arr.format not in ("csr", "csc"):
        arr = arr.tocsr()
    if hasattr(arr, "get_orthogonal_selection"):  # zarr
        sel = (rows,) + (slice(None),) * (len(arr.shape) - 1)
        return arr.get_orthogonal_selection(sel)
    return arr[rows]
