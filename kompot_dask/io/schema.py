"""The dataset schema: one xarray Dataset per analysis, dask-backed and chunked by cell.

======================  ======================  =========================================
variable                dims                    content
======================  ======================  =========================================
``cell_states``         (cell, state)           float64 cell-state coordinates (dask)
``expression``          (cell, gene)            float32/float64 expression (dask, optional)
``condition``           (cell,)                 condition label per cell (str, optional)
``sample``              (cell,)                 sample label per cell (str, optional)
``cell`` (coordinate)   (cell,)                 cell names (AnnData ``obs_names``)
``gene`` (coordinate)   (gene,)                 gene names (AnnData ``var_names``)
======================  ======================  =========================================

``cell_states`` and ``expression`` are chunked along ``cell`` (and ``gene``); ``state``
is a core dimension held in a single chunk. Labels and names are small per-cell metadata
held in memory as numpy string arrays, like AnnData's ``obs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..execution.plan import DATASET_CELL_CHUNK, DATASET_GENE_CHUNK

from ._convert import as_labels, as_names, check_chunk, float_dtype, lazy_expression

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "CELL",
    "GENE",
    "STATE",
    "LANDMARK",
    "SAMPLE",
    "CELL_STATES",
    "EXPRESSION",
    "CONDITION",
    "SAMPLE_LABELS",
    "DEFAULT_CELL_CHUNK",
    "DEFAULT_GENE_CHUNK",
    "make_dataset",
    "validate_dataset",
]

CELL = "cell"
GENE = "gene"
STATE = "state"
LANDMARK = "landmark"
SAMPLE = "sample"

CELL_STATES = "cell_states"
EXPRESSION = "expression"
CONDITION = "condition"
SAMPLE_LABELS = "sample"

DEFAULT_CELL_CHUNK = DATASET_CELL_CHUNK  # chunk sizes come from the one planner
DEFAULT_GENE_CHUNK = DATASET_GENE_CHUNK

DIMS: dict[str, tuple[str, ...]] = {
    CELL_STATES: (CELL, STATE),
    EXPRESSION: (CELL, GENE),
    CONDITION: (CELL,),
    SAMPLE_LABELS: (CELL,),
}
LABELS = (CONDITION, SAMPLE_LABELS)


def make_dataset(
    cell_states: Any,
    expression: Any = None,
    condition: Any = None,
    sample: Any = None,
    cell_names: Iterable[str] | None = None,
    gene_names: Iterable[str] | None = None,
    cell_chunk: int = DEFAULT_CELL_CHUNK,
    gene_chunk: int = DEFAULT_GENE_CHUNK,
    *,
    dtype: Any = None,
) -> xr.Dataset:
    """Build a dask-chunked dataset in the schema from in-memory or dask arrays.

    Nothing is computed: numpy inputs are wrapped, dask inputs are rechunked lazily and
    scipy sparse inputs stay sparse, densified one ``(cell_chunk, gene_chunk)`` block at
    a time.

    Parameters
    ----------
    cell_states : array-like or dask array, shape (n_cells, n_states)
        Cell-state coordinates (e.g. diffusion-map eigenvectors); stored as float64.
    expression : array-like, dask array or scipy sparse matrix, shape (n_cells, n_genes), optional
        Expression values. float32/float64 keep their dtype, other dtypes become float64
        unless ``dtype`` is given.
    condition, sample : array-like of str, shape (n_cells,), optional
        Condition and sample label of each cell.
    cell_names, gene_names : sequence of str, optional
        Coordinates ``cell`` and ``gene``; default ``'0', '1', ...``.
    cell_chunk, gene_chunk : int
        Chunk sizes along ``cell`` and ``gene`` (-1: one chunk).
    dtype : {None, "float32", "float64"}, optional
        Expression dtype.

    Returns
    -------
    xarray.Dataset
        Variables ``cell_states`` and, when given, ``expression``, ``condition``,
        ``sample``; coordinates ``cell`` and (with expression) ``gene``.

    Raises
    ------
    ValueError
        For inputs of the wrong shape, mismatched lengths, missing labels or bad chunks.
    """
    import dask.array as da
    import xarray as xr

    cc = check_chunk(cell_chunk, "cell_chunk")
    gc = check_chunk(gene_chunk, "gene_chunk")
    states = cell_states if isinstance(cell_states, da.Array) else np.asarray(cell_states)
    if states.ndim != 2:
        msg = (
            f"`cell_states` must be 2-D (n_cells, n_states); got shape {states.shape}. "
            "Reshape a single state column with `.reshape(-1, 1)`."
        )
        raise ValueError(msg)
    n_cells = int(states.shape[0])
    if isinstance(states, da.Array):
        states = states.rechunk((cc, -1))
    else:
        states = da.from_array(states, chunks=(cc, -1))
    if states.dtype != np.float64:
        states = states.astype(np.float64)
    data_vars: dict[str, Any] = {CELL_STATES: (DIMS[CELL_STATES], states)}
    coords: dict[str, Any] = {CELL: as_names(cell_names, n_cells, "cell_names", "cells")}

    if expression is not None:
        shape = tuple(getattr(expression, "shape", np.shape(expression)))
        if len(shape) != 2:
            msg = f"`expression` must be 2-D (n_cells, n_genes); got shape {shape}"
            raise ValueError(msg)
        if shape[0] != n_cells:
            msg = (
                f"`expression` has {shape[0]} rows but `cell_states` has {n_cells} cells; "
                "both must list the same cells in the same order"
            )
            raise ValueError(msg)
        expr = lazy_expression(expression, cc, gc)
        out_dtype = float_dtype(expr.dtype, dtype)
        if expr.dtype != out_dtype:
            expr = expr.astype(out_dtype)
        data_vars[EXPRESSION] = (DIMS[EXPRESSION], expr)
        coords[GENE] = as_names(gene_names, int(shape[1]), "gene_names", "genes")
    elif gene_names is not None:
        msg = "`gene_names` was given without `expression`; pass the expression matrix too"
        raise ValueError(msg)

    for name, values in ((CONDITION, condition), (SAMPLE_LABELS, sample)):
        if values is not None:
            data_vars[name] = (DIMS[name], as_labels(values, n_cells, name))

    ds = xr.Dataset(data_vars, coords=coords)
    validate_dataset(ds, check_values=False)
    return ds


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_structure(ds: xr.Dataset, require: Iterable[str]) -> None:
    import xarray as xr

    if not isinstance(ds, xr.Dataset):
        msg = f"expected an xarray.Dataset; got {type(ds).__name__}. Build one with make_dataset()."
        raise TypeError(msg)
    for name in require:
        if name not in DIMS:
            _fail(f"`require` names unknown variable {name!r}; choose from {sorted(DIMS)}")
        if name not in ds.data_vars:
            _fail(
                f"dataset has no variable {name!r} (it has {sorted(map(str, ds.data_vars))}); "
                f"add it as ds[{name!r}] = ({DIMS[name]!r}, values) or build the dataset "
                "with make_dataset() / dataset_from_anndata()"
            )
    for name, dims in DIMS.items():
        if name not in ds.data_vars:
            continue
        got = tuple(map(str, ds[name].dims))
        if got == dims:
            continue
        if sorted(got) == sorted(dims):
            fix = f"transpose it with ds[{name!r}] = ds[{name!r}].transpose{dims!r}"
        else:
            fix = "rename the dimensions with ds.rename_dims({...}) or rebuild with make_dataset()"
        _fail(f"variable {name!r} has dims {got} but the schema needs {dims}; {fix}")
    if CELL_STATES in ds.data_vars:
        cs = ds[CELL_STATES]
        if cs.dtype != np.float64:
            _fail(
                f"`cell_states` has dtype {cs.dtype}; cast it with "
                "ds['cell_states'] = ds.cell_states.astype('float64')"
            )
        if cs.sizes[STATE] < 1:
            _fail("`cell_states` has no state columns; pass at least one cell-state dimension")
        if cs.chunks is not None and len(cs.chunks[1]) > 1:
            _fail(
                f"`cell_states` is split into {len(cs.chunks[1])} chunks along 'state', a core "
                "dimension every kernel needs whole; rechunk with ds = ds.chunk(state=-1)"
            )
    if EXPRESSION in ds.data_vars and ds[EXPRESSION].dtype not in (np.float32, np.float64):
        _fail(
            f"`expression` has dtype {ds[EXPRESSION].dtype}; cast it with "
            "ds['expression'] = ds.expression.astype('float32') (or 'float64')"
        )
    for dim in (CELL, GENE):
        if dim not in ds.dims:
            continue
        if dim not in ds.coords:
            _fail(
                f"dataset has a {dim!r} dimension but no {dim!r} coordinate; add names with "
                f"ds = ds.assign_coords({dim}=names)"
            )
        index = ds.indexes[dim] if dim in ds.indexes else None
        if index is not None and not index.is_unique:
            dup = index[index.duplicated()].unique()[:5].tolist()
            fix = "obs_names_make_unique()" if dim == CELL else "var_names_make_unique()"
            _fail(
                f"{dim} names are not unique (e.g. {dup}); make them unique, e.g. with "
                f"AnnData.{fix}, before building the dataset"
            )


def _check_conditions(labels: np.ndarray) -> None:
    present = np.unique(np.asarray(labels).astype(str))
    if len(present) < 2:
        _fail(
            f"`condition` has {len(present)} distinct value(s) {present.tolist()}; differential "
            "analysis needs cells from at least 2 conditions. Check the condition column "
            "(condition_key) or the cells selected."
        )


def validate_dataset(
    ds: xr.Dataset,
    *,
    require: Iterable[str] = (CELL_STATES,),
    check_values: bool = True,
) -> xr.Dataset:
    """Check that ``ds`` follows the schema; raise a ``ValueError`` saying how to fix it.

    Parameters
    ----------
    ds : xarray.Dataset
        Dataset to check.
    require : iterable of str
        Variables that must be present (default ``("cell_states",)``). Optional
        variables are checked whenever present.
    check_values : bool
        Also compute the checks that read data: finite cell states (one pass over
        ``cell_states``, nothing else) and, for dask-backed labels, the number of
        conditions. ``False`` checks only names, dims, dtypes and chunks.

    Returns
    -------
    xarray.Dataset
        ``ds`` itself, unchanged.

    Raises
    ------
    TypeError
        If ``ds`` is not an ``xarray.Dataset``.
    ValueError
        For a missing variable, wrong dims or dtype, ``state`` split into several chunks,
        missing/duplicate names, NaN/inf cell states or fewer than 2 conditions.
    """
    _check_structure(ds, tuple(require))
    cond = ds[CONDITION].variable if CONDITION in ds.data_vars else None
    if cond is not None and cond.chunks is None:
        _check_conditions(cond.values)
    if not check_values:
        return ds
    import dask

    lazy: dict[str, Any] = {}
    if CELL_STATES in ds.data_vars:
        lazy["bad"] = (~np.isfinite(ds[CELL_STATES].data)).any(axis=1)
    if cond is not None and cond.chunks is not None:
        lazy["cond"] = cond.data
    (done,) = dask.compute(lazy)
    if "cond" in done:
        _check_conditions(done["cond"])
    if "bad" in done and np.any(done["bad"]):
        rows = np.nonzero(done["bad"])[0]
        names = np.asarray(ds[CELL].values)[rows[:5]].tolist() if CELL in ds.coords else []
        first = names or rows[:5].tolist()
        _fail(
            f"`cell_states` has NaN/inf in {len(rows)} cell(s) (first: {first}); drop those "
            "cells (e.g. ds = ds.isel(cell=mask)) or recompute the cell states"
        )
    return ds
