"""From what users have to the estimators' inputs: :func:`condition_inputs`.

A *source* is a schema dataset (:func:`kompot_dask.io.make_dataset`), an AnnData (in
memory, backed or read with :func:`anndata.experimental.read_lazy`), an open AnnData
store (``zarr.Group`` / ``h5py.File``) or the path of an ``.h5ad`` file or AnnData-zarr
store. From it :func:`condition_inputs` selects the cells of two conditions and returns
their cell states (small, in memory), their expression (a lazy dask array) and their
sample labels, after checking every name and label so that mistakes surface before any
expression is read.

Expression stored on disk is read with anndata's lazy reader
(:func:`anndata.experimental.read_elem_lazy`): sparse matrices are read one range of
cells at a time and stay sparse while rows and genes are selected; each chunk is
densified only as the last step of its task, because the estimators read dense rows
(:func:`kompot_dask.estimators._inputs.read_rows`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from ._convert import float_dtype
from .anndata import _gene_columns, _missing, _obs_columns, _read_index
from ..execution.plan import expression_chunk_rows
from .schema import CELL, CELL_STATES, EXPRESSION, GENE

__all__ = ["ConditionInputs", "condition_inputs", "lazy_rows"]

DEFAULT_OBSM_KEY = "DM_EigenVectors"
# Dense float64 bytes of one chunk of cells x selected genes (the size of a block as
# the estimators read it) when the ``cell_chunk_size`` option is not set.
_MAX_LISTED = 20


class ConditionInputs(NamedTuple):
    """The estimators' inputs for a comparison of two conditions.

    Attributes
    ----------
    x1, x2 : ndarray of float64, shape (n_c, D)
        Cell states of the cells of condition 1 and 2 (finite).
    y1, y2 : dask.array.Array, shape (n_c, n_genes), or None
        Expression of those cells, lazy: chunked along cells (genes in one chunk, or as
        stored for dense on-disk arrays), every chunk a dense float32/float64 block once
        computed. ``None`` with ``expression=False``.
    labels1, labels2 : ndarray of str, shape (n_c,), or None
        Sample label of each cell (``None`` without ``sample_col``).
    x_all : ndarray of float64, shape (n_obs, D)
        Cell states of all cells of the source, for prediction.
    cell_index1, cell_index2 : ndarray of int64, shape (n_c,)
        Positions of the cells of each condition in the source (increasing).
    obs_names : ndarray of str, shape (n_obs,)
        Names of all cells.
    gene_names : ndarray of str, shape (n_genes,), or None
        Names of the selected genes (columns of ``y1``/``y2``); ``None`` when the source
        has no genes.
    """

    x1: np.ndarray
    x2: np.ndarray
    y1: Any
    y2: Any
    labels1: np.ndarray | None
    labels2: np.ndarray | None
    x_all: np.ndarray
    cell_index1: np.ndarray
    cell_index2: np.ndarray
    obs_names: np.ndarray
    gene_names: np.ndarray | None


# ----------------------------------------------------------------------------- helpers


def _listing(values: Sequence[Any]) -> str:
    values = list(values)
    shown = repr(values[:_MAX_LISTED])
    return shown if len(values) <= _MAX_LISTED else f"{shown[:-1]}, ... ({len(values)} in all)]"


def _dense_small(value: Any) -> np.ndarray:
    """A small per-cell matrix (obsm entry) in memory, whatever its container."""
    if hasattr(value, "to_memory"):  # anndata's lazy data frame
        value = value.to_memory()
    if hasattr(value, "compute"):  # dask (read_lazy): read here, in this process
        value = value.compute(scheduler="sync")
    if hasattr(value, "toarray"):
        value = value.toarray()
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value)


def _is_sparse_meta(arr: Any) -> bool:
    import scipy.sparse as sp

    return sp.issparse(getattr(arr, "_meta", None))


def _csc_warning(what: str) -> None:
    msg = (
        f"{what} is stored as CSC (column-major): every chunk of cells reads whole gene "
        "columns, so the expression is read several times. Store it as CSR (e.g. "
        "adata.X = adata.X.tocsr() before writing) for row-wise reading."
    )
    warnings.warn(msg, UserWarning, stacklevel=5)


def lazy_rows(matrix: Any, rows: int, what: str) -> Any:
    """A dask array (cells x genes) over an in-memory, backed or lazy matrix, unread, in
    chunks of at most ``rows`` cells (a dask array keeps finer chunks); ``what`` names it
    in warnings."""
    import dask.array as da
    import scipy.sparse as sp

    if isinstance(matrix, da.Array):
        if _is_sparse_meta(matrix):
            if matrix._meta.format == "csc" and max(matrix.chunks[0]) > rows:
                _csc_warning(what)
            if max(matrix.chunks[0]) > rows:
                matrix = matrix.rechunk({0: rows, 1: -1})
        return matrix
    if sp.issparse(matrix):
        if matrix.format not in ("csr", "csc"):
            matrix = matrix.tocsr()
        meta = type(matrix)((0, 0), dtype=matrix.dtype)
        return da.from_array(matrix, chunks=(rows, -1), asarray=False, meta=meta, name=False)
    if hasattr(matrix, "group") and getattr(matrix, "format", None) in ("csr", "csc"):
        return _read_lazy_elem(matrix.group, rows, what)  # anndata's backed sparse dataset
    module = type(matrix).__module__.split(".")[0]
    if module in ("h5py", "zarr"):  # a backed dense X
        return _read_lazy_elem(matrix, rows, what)
    return da.from_array(np.asarray(matrix), chunks=(rows, -1), name=False)


def _read_lazy_elem(elem: Any, rows: int, what: str) -> Any:
    """anndata's lazy reader over one stored matrix element, chunked along cells."""
    from anndata.experimental import read_elem_lazy

    encoding = elem.attrs.get("encoding-type", None)
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    if hasattr(elem, "keys"):  # a group: sparse
        if encoding == "csr_matrix":
            return read_elem_lazy(elem, chunks=(rows, -1))
        if encoding == "csc_matrix":
            _csc_warning(what)
            return read_elem_lazy(elem).rechunk({0: rows, 1: -1})
        msg = (
            f"{what} has encoding {encoding!r}; expected a dense array or a CSR/CSC "
            "matrix. Convert it with anndata (e.g. to scipy.sparse.csr_matrix) and rewrite it."
        )
        raise ValueError(msg)
    if len(elem.shape) != 2:
        msg = f"{what} has shape {tuple(elem.shape)}; expected a 2-D (cells x genes) matrix"
        raise ValueError(msg)
    stored = getattr(elem, "chunks", None)
    if stored and encoding is not None:  # whole stored chunks per task, about `rows` cells
        step = max(1, int(stored[0]))
        return read_elem_lazy(elem, chunks=(max(1, rows // step) * step, int(stored[1])))
    if encoding is not None:
        return read_elem_lazy(elem, chunks=(rows, -1))
    import dask.array as da  # an array without anndata encoding metadata

    return da.from_array(elem, chunks=(rows, -1))


def _densify(block: Any, dtype: np.dtype) -> np.ndarray:
    if hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=dtype)


def _select(matrix: Any, cells: np.ndarray, columns: np.ndarray | None) -> Any:
    """Rows ``cells`` and columns ``columns`` of a dask matrix, dense chunks, unread."""
    out = matrix[cells]
    if columns is not None:
        out = out[:, columns]
    dtype = float_dtype(matrix.dtype, None)
    if _is_sparse_meta(out) or out.dtype != dtype:
        out = out.map_blocks(_densify, dtype, dtype=dtype, meta=np.empty((0, 0), dtype=dtype))
    return out


# ----------------------------------------------------------------------------- sources


class _AnnDataSource:
    """An AnnData object: in memory, backed (``backed="r"``) or from ``read_lazy``."""

    table = "obs"

    def __init__(self, adata: Any) -> None:
        if adata.isbacked and adata.is_view:
            msg = (
                "a view of a backed AnnData cannot be read lazily (anndata loads the view's "
                "X into memory); pass the backed AnnData itself, or call .to_memory() on "
                "the view if it fits in memory"
            )
            raise ValueError(msg)
        self.adata = adata
        self.n_obs = int(adata.n_obs)

    def where(self, column: str) -> str:
        return f"obs[{column!r}]"

    def columns(self) -> list[str]:
        return [str(c) for c in self.adata.obs.columns]

    def column(self, name: str) -> Any:
        return self.adata.obs[name]

    def obs_names(self) -> np.ndarray:
        return np.asarray(self.adata.obs_names).astype(str)

    def var_names(self) -> np.ndarray | None:
        return np.asarray(self.adata.var_names).astype(str)

    def states_keys(self) -> list[str]:
        return [str(k) for k in self.adata.obsm.keys()]

    def resolve_states_key(self, key: str) -> str:
        keys = self.states_keys()
        if key not in keys:
            raise _missing("obsm key", key, keys, "obsm_key")
        return key

    def states(self, key: str) -> np.ndarray:
        return _dense_small(self.adata.obsm[key])

    def layer_keys(self) -> list[str]:
        return [str(k) for k in self.adata.layers.keys()]

    def has_x(self) -> bool:
        return self.adata.X is not None

    def matrix(self, layer: str | None, rows: int) -> Any:
        if layer is None:
            return lazy_rows(self.adata.X, rows, "X")
        return lazy_rows(self.adata.layers[layer], rows, f"layer {layer!r}")


class _StoreSource(_AnnDataSource):
    """An AnnData store (``.h5ad`` file or AnnData-zarr), read element by element."""

    def __init__(self, root: Any, label: str) -> None:
        if "obs" not in root or "var" not in root:
            msg = f"{label} has no obs/var groups; pass an AnnData .h5ad file or zarr store"
            raise ValueError(msg)
        self.root = root
        self.obs = root["obs"]
        self._obs_names = _read_index(self.obs).astype(str)
        self.n_obs = len(self._obs_names)

    def columns(self) -> list[str]:
        return _obs_columns(self.obs)

    def column(self, name: str) -> Any:
        from anndata.io import read_elem

        return read_elem(self.obs[name])

    def obs_names(self) -> np.ndarray:
        return self._obs_names

    def var_names(self) -> np.ndarray | None:
        return _read_index(self.root["var"]).astype(str)

    def states_keys(self) -> list[str]:
        return [str(k) for k in self.root["obsm"].keys()] if "obsm" in self.root else []

    def states(self, key: str) -> np.ndarray:
        from anndata.io import read_elem

        return _dense_small(read_elem(self.root["obsm"][key]))

    def layer_keys(self) -> list[str]:
        return [str(k) for k in self.root["layers"].keys()] if "layers" in self.root else []

    def has_x(self) -> bool:
        return "X" in self.root

    def matrix(self, layer: str | None, rows: int) -> Any:
        if layer is None:
            return _read_lazy_elem(self.root["X"], rows, "X")
        return _read_lazy_elem(self.root["layers"][layer], rows, f"layer {layer!r}")


class _DatasetSource(_AnnDataSource):
    """A schema dataset: per-cell variables play obs columns, (cell, gene) ones layers."""

    table = "dataset"

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.n_obs = int(ds.sizes.get(CELL, 0))

    def where(self, column: str) -> str:
        return f"ds[{column!r}]"

    def _names(self, dims: tuple[str, ...]) -> list[str]:
        out = []
        for name, var in self.ds.variables.items():
            if name in self.ds.dims:
                continue
            if tuple(var.dims) == dims or (len(dims) == 2 and sorted(var.dims) == sorted(dims)):
                out.append(str(name))
        return out

    def columns(self) -> list[str]:
        return self._names((CELL,))

    def column(self, name: str) -> Any:
        return self.ds[name].values

    def obs_names(self) -> np.ndarray:
        if CELL in self.ds.coords:
            return np.asarray(self.ds[CELL].values).astype(str)
        return np.arange(self.n_obs).astype(str)

    def var_names(self) -> np.ndarray | None:
        if GENE not in self.ds.dims:
            return None
        if GENE in self.ds.coords:
            return np.asarray(self.ds[GENE].values).astype(str)
        return np.arange(self.ds.sizes[GENE]).astype(str)

    def states_keys(self) -> list[str]:
        return [
            str(name) for name, var in self.ds.data_vars.items()
            if var.ndim == 2 and var.dims[0] == CELL and GENE not in var.dims
        ]

    def resolve_states_key(self, key: str) -> str:
        keys = self.states_keys()
        if key in keys:
            return key
        if key == DEFAULT_OBSM_KEY and CELL_STATES in keys:
            return CELL_STATES
        msg = (
            f"cell-state variable {key!r} not found in the dataset; available: "
            f"{_listing(sorted(keys))}. Pass one of them as `obsm_key=` (a schema dataset "
            f"keeps its cell states in {CELL_STATES!r}, the default)."
        )
        raise ValueError(msg)

    def states(self, key: str) -> np.ndarray:
        return _dense_small(self.ds[key].data)

    def layer_keys(self) -> list[str]:
        return [k for k in self._names((CELL, GENE)) if k != EXPRESSION]

    def has_x(self) -> bool:
        return EXPRESSION in self.ds.data_vars

    def matrix(self, layer: str | None, rows: int) -> Any:
        import dask.array as da

        var = self.ds[EXPRESSION if layer is None else layer].transpose(CELL, GENE)
        if isinstance(var.data, da.Array):
            return var.data
        return lazy_rows(var.data, rows, repr(var.name))


@contextlib.contextmanager
def _open_source(source: Any) -> Iterator[_AnnDataSource]:
    """The source behind ``source``; files opened here are closed on exit.

    The lazy arrays built inside stay valid after the file is closed: anndata's readers
    reopen ``.h5ad`` files by path in each task, and zarr stores need no handle.
    """
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.exists():
            msg = f"no AnnData file or store at {str(path)!r}; check the path"
            raise FileNotFoundError(msg)
        if path.is_dir():
            import zarr

            yield _StoreSource(zarr.open_group(str(path), mode="r"), repr(str(path)))
            return
        import h5py

        if not h5py.is_hdf5(path):
            msg = (
                f"{str(path)!r} is neither an .h5ad (HDF5) file nor an AnnData zarr store; "
                "pass an AnnData file, an AnnData object or a kompot_dask dataset"
            )
            raise ValueError(msg)
        with h5py.File(path, "r") as handle:
            yield _StoreSource(handle, repr(str(path)))
        return
    import xarray as xr

    if isinstance(source, xr.Dataset):
        yield _DatasetSource(source)
        return
    module = type(source).__module__.split(".")[0]
    if module == "anndata":
        import anndata

        if isinstance(source, anndata.AnnData):
            yield _AnnDataSource(source)
            return
    if module in ("zarr", "h5py") and hasattr(source, "keys"):
        yield _StoreSource(source, f"the {module} group {source!r}")
        return
    msg = (
        f"cannot read conditions from a {type(source).__name__}; pass an anndata.AnnData "
        "(in memory, backed or from anndata.experimental.read_lazy), a path to an .h5ad "
        "file or AnnData-zarr store, or a kompot_dask dataset (kompot_dask.io.make_dataset)"
    )
    raise TypeError(msg)


# ----------------------------------------------------------------------------- checks


def _labels(raw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell labels (any column container) as strings, and which are missing.

    Missing means NaN, None or pandas NA; their string form is never used as a label.
    """
    import pandas as pd

    values = np.asarray(raw, dtype=object).reshape(-1)
    missing = np.asarray(pd.isna(values), dtype=bool)
    return values.astype(str), missing


def _condition_mask(
    src: _AnnDataSource, groupby: str, strings: np.ndarray, missing: np.ndarray,
    raw: Any, value: Any, param: str,
) -> np.ndarray:
    want = str(value)
    mask = (strings == want) & ~missing
    if mask.any():
        return mask
    where = src.where(groupby)
    present = sorted(set(strings[~missing].tolist()))
    n_missing = int(missing.sum())
    if n_missing and want in set(strings[missing].tolist()):
        msg = (
            f"{param}={value!r} would select the {n_missing} cell(s) whose {where} label is "
            "missing (NaN/NA); a missing label is not a condition. Give those cells a label "
            "first (fill the column, e.g. with pandas' .fillna()) or drop them, or compare "
            f"two of the values present: {_listing(present)}"
        )
        raise ValueError(msg)
    categories = getattr(getattr(raw, "dtype", None), "categories", None)
    if categories is not None and want in set(map(str, categories)):
        msg = (
            f"{param}={value!r} selects no cells: it is a category of {where} that no cell "
            f"has (an empty condition). Compare two values with cells: {_listing(present)}"
        )
        raise ValueError(msg)
    msg = (
        f"{param}={value!r} is not a value of {where} (values are compared as strings); "
        f"values present: {_listing(present)}. Pass one of them as `{param}=`."
    )
    raise ValueError(msg)


def _sample_labels(
    src: _AnnDataSource, sample_col: str, idx1: np.ndarray, idx2: np.ndarray,
    c1: Any, c2: Any,
) -> tuple[np.ndarray, np.ndarray]:
    strings, missing = _labels(src.column(sample_col))
    bad1, bad2 = missing[idx1], missing[idx2]
    if bad1.any() or bad2.any():
        names = src.obs_names()
        first = names[np.concatenate([idx1[bad1], idx2[bad2]])[:5]].tolist()
        where = src.where(sample_col)
        msg = (
            f"{where} has missing sample labels (NaN/NA) for {int(bad1.sum())} of the "
            f"{len(idx1)} cells of condition1={c1!r} and {int(bad2.sum())} of the {len(idx2)} "
            f"cells of condition2={c2!r} (first: {first}); every analysed cell needs a "
            "sample. Fill the column (e.g. with pandas' .fillna()), drop those cells, or pass "
            "sample_col=None."
        )
        raise ValueError(msg)
    return strings[idx1], strings[idx2]


def _gene_selection(genes: Any, var_names: np.ndarray | None) -> np.ndarray | None:
    if genes is None:
        return None
    if var_names is None:
        msg = "`genes` was given but the source has no genes (no expression); pass genes=None"
        raise ValueError(msg)
    sel = np.atleast_1d(np.asarray(genes))
    if sel.dtype.kind in "iuf":
        msg = (
            f"`genes` must be gene names or a boolean mask over the {len(var_names)} genes; "
            f"got numbers ({sel[:5].tolist()}...). Pass var_names[indices] instead."
        )
        raise TypeError(msg)
    columns = np.unique(_gene_columns(sel, var_names))  # in var_names order, like Kompot
    return None if len(columns) == len(var_names) else columns


def _check_states(
    src: _AnnDataSource, key: str, obsm_key: str, idx1: np.ndarray, idx2: np.ndarray,
    c1: Any, c2: Any,
) -> np.ndarray:
    try:
        states = np.asarray(src.states(key), dtype=np.float64)
    except (TypeError, ValueError) as err:
        msg = (
            f"obsm[{obsm_key!r}] cannot be read as numbers ({err}); pass the key of a "
            "numeric cell-state matrix as `obsm_key=`"
        )
        raise ValueError(msg) from err
    if states.ndim == 1:
        states = states[:, None]
    if states.ndim != 2 or states.shape[0] != src.n_obs or states.shape[1] < 1:
        msg = (
            f"obsm[{obsm_key!r}] has shape {states.shape}; expected ({src.n_obs}, n_dims) "
            "cell states, one row per cell. Pass another `obsm_key=`."
        )
        raise ValueError(msg)
    bad = ~np.isfinite(states).all(axis=1)
    bad1, bad2 = bad[idx1], bad[idx2]
    if bad1.any() or bad2.any():
        first = src.obs_names()[np.concatenate([idx1[bad1], idx2[bad2]])[:5]].tolist()
        msg = (
            f"obsm[{obsm_key!r}] has NaN/inf cell states in {int(bad1.sum())} cell(s) of "
            f"condition1={c1!r} and {int(bad2.sum())} of condition2={c2!r} (first: {first}); "
            "drop those cells (e.g. adata = adata[np.isfinite(adata.obsm[key]).all(axis=1)]) "
            "or recompute the cell states."
        )
        raise ValueError(msg)
    return np.ascontiguousarray(states)


# ----------------------------------------------------------------------------- API


def condition_inputs(
    source: Any,
    groupby: str,
    condition1: Any,
    condition2: Any,
    *,
    obsm_key: str = DEFAULT_OBSM_KEY,
    layer: str | None = None,
    genes: Sequence[str] | np.ndarray | None = None,
    sample_col: str | None = None,
    expression: bool = True,
) -> ConditionInputs:
    """Select two conditions' cells of a dataset or AnnData as the estimators' inputs.

    Every name and label is checked first, from metadata only; then the cell states
    (``n_obs x D``, small) are read; the expression is never read here but returned as
    lazy dask arrays, read chunk by chunk by the estimators.

    Parameters
    ----------
    source : anndata.AnnData, str, path-like, zarr.Group, h5py.File or xarray.Dataset
        An AnnData in memory, backed (``anndata.read_h5ad(path, backed="r")``) or read
        with ``anndata.experimental.read_lazy``; the path of an ``.h5ad`` file or an
        AnnData-zarr store (or the open store); or a kompot_dask dataset (from
        :func:`make_dataset`, :func:`open_dataset` or :func:`dataset_from_anndata`),
        whose per-cell variables (e.g. ``condition``, ``sample``) play obs columns.
    groupby : str
        obs column with the condition of each cell.
    condition1, condition2 : object
        The two values of ``obs[groupby]`` to compare; values are compared as strings,
        so categorical, integer and string columns all work (``1`` matches ``"1"``).
        Cells with a missing label belong to neither condition.
    obsm_key : str, default "DM_EigenVectors"
        obsm entry with the cell states. For a dataset: its ``cell_states`` variable
        unless another (cell, dim) variable is named.
    layer : str, optional
        Layer with the expression; ``None`` uses ``X`` (a dataset's ``expression``).
    genes : sequence of str or boolean mask, optional
        Genes to keep (var names, or a mask over them); kept in var order, as Kompot
        does. Default all genes.
    sample_col : str, optional
        obs column with the sample (replicate) of each cell, returned as labels.
    expression : bool, default True
        Build ``y1``/``y2``; ``False`` (differential abundance) skips the expression.

    Returns
    -------
    ConditionInputs
        ``x1, x2, y1, y2, labels1, labels2, x_all, cell_index1, cell_index2,
        obs_names, gene_names``; see :class:`ConditionInputs`.

    Raises
    ------
    ValueError
        Naming the problem and its fix, before any expression is read: equal
        conditions; an unknown ``groupby``/``sample_col`` column, ``obsm_key``,
        ``layer`` or gene (the message lists what exists); a condition value that is
        absent or has no cells; missing labels that a condition would select, or missing
        sample labels among the selected cells; NaN/inf cell states of selected cells;
        a source without expression when ``expression=True``.
    TypeError
        For a source of another type, or numeric ``genes``.
    FileNotFoundError
        If a path does not exist.

    Notes
    -----
    A condition with a single sample is accepted here; the models decide whether they
    can estimate sample variance from it. Stored CSR expression is read a range of cells
    at a time by :func:`anndata.experimental.read_elem_lazy` and stays sparse until the
    end of each chunk's task; CSC storage works but re-reads whole gene columns (a
    ``UserWarning`` says so). Sparse and unchunked expression is cut into chunks of
    ``kompot_dask.set_options(cell_chunk_size=...)`` cells, else of as many cells as fit
    64 MiB of dense float64 (at most 4096); chunked dense arrays (zarr, dask, a dataset)
    keep whole stored chunks. A view of an in-memory AnnData is read through its ``X``,
    which anndata copies for a view.

    Examples
    --------
    >>> inp = condition_inputs("atlas.h5ad", "condition", "ctrl", "stim",
    ...                        sample_col="sample")  # doctest: +SKIP
    >>> de = kompot_dask.DifferentialExpression().fit(  # doctest: +SKIP
    ...     inp.x1, inp.y1, inp.x2, inp.y2,
    ...     condition1_sample_indices=inp.labels1, condition2_sample_indices=inp.labels2)
    >>> fold_change = de.predict(inp.x_all)["fold_change"]  # doctest: +SKIP
    """
    if str(condition1) == str(condition2):
        msg = (
            f"condition1 and condition2 are both {str(condition1)!r}; pass two different "
            f"values of obs[{groupby!r}] to compare"
        )
        raise ValueError(msg)
    with _open_source(source) as src:
        columns = src.columns()
        for name, param in ((groupby, "groupby"), (sample_col, "sample_col")):
            if name is not None and name not in columns:
                raise _missing(f"{src.table} column", name, columns, param)
        key = src.resolve_states_key(obsm_key)
        if expression:
            if layer is None and not src.has_x():
                msg = "the source has no X (expression); pass `layer=` or expression=False"
                raise ValueError(msg)
            if layer is not None and layer not in src.layer_keys():
                raise _missing("layer", layer, src.layer_keys(), "layer")
        var_names = src.var_names()
        gene_columns = _gene_selection(genes, var_names)
        gene_names = None
        if var_names is not None:
            gene_names = var_names if gene_columns is None else var_names[gene_columns]

        raw = src.column(groupby)
        strings, missing = _labels(raw)
        mask1 = _condition_mask(src, groupby, strings, missing, raw, condition1, "condition1")
        mask2 = _condition_mask(src, groupby, strings, missing, raw, condition2, "condition2")
        idx1 = np.flatnonzero(mask1).astype(np.int64)
        idx2 = np.flatnonzero(mask2).astype(np.int64)

        labels1 = labels2 = None
        if sample_col is not None:
            labels1, labels2 = _sample_labels(src, sample_col, idx1, idx2, condition1, condition2)

        x_all = _check_states(src, key, obsm_key, idx1, idx2, condition1, condition2)
        y1 = y2 = None
        if expression:
            n_genes = len(gene_names) if gene_names is not None else 1
            matrix = src.matrix(layer, expression_chunk_rows(n_genes))
            if matrix.ndim != 2 or matrix.shape[0] != src.n_obs:
                msg = (
                    f"the expression has shape {matrix.shape} but the source has {src.n_obs} "
                    "cells; pass an expression matrix with one row per cell"
                )
                raise ValueError(msg)
            y1 = _select(matrix, idx1, gene_columns)
            y2 = _select(matrix, idx2, gene_columns)
        obs_names = src.obs_names()
    return ConditionInputs(
        x1=x_all[idx1], x2=x_all[idx2], y1=y1, y2=y2, labels1=labels1, labels2=labels2,
        x_all=x_all, cell_index1=idx1, cell_index2=idx2, obs_names=obs_names,
        gene_names=gene_names,
    )

