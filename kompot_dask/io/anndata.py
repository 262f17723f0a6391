"""Lazy ingest of AnnData (``.h5ad`` files, AnnData-zarr stores, in-memory objects).

For files, only the small per-cell/per-gene metadata is read up front (obs names, the
requested obs columns, var names, element shapes). The expression matrix (``X`` or a
layer) and the ``obsm`` embedding become dask arrays whose blocks open the file and read
one row range (CSR), column range (CSC) or block (dense) each, so nothing of ``X`` is in
memory until blocks are computed, and CSR data stays sparse until a block is densified.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ._blocks import StoredMatrix, lazy_dense_rows, lazy_matrix
from ._convert import check_chunk
from .schema import DEFAULT_CELL_CHUNK, DEFAULT_GENE_CHUNK, make_dataset

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["dataset_from_anndata"]

_SPARSE = {"csr_matrix": "csr", "csc_matrix": "csc"}


def _attr(elem: Any, name: str, default: Any = None) -> Any:
    value = elem.attrs.get(name, default)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _is_group(elem: Any) -> bool:
    return hasattr(elem, "keys") and not hasattr(elem, "dtype")


def _missing(what: str, key: str, available: Sequence[str], param: str) -> ValueError:
    msg = (
        f"{what} {key!r} not found; available: {sorted(map(str, available))}. "
        f"Pass one of them as `{param}=`."
    )
    return ValueError(msg)


@contextlib.contextmanager
def _open_root(path: pathlib.Path) -> Iterator[tuple[Any, str]]:
    if path.is_dir():
        import zarr

        yield zarr.open_group(str(path), mode="r"), "zarr"
        return
    import h5py

    if not h5py.is_hdf5(path):
        msg = f"{str(path)!r} is neither an .h5ad (HDF5) file nor an AnnData zarr store"
        raise ValueError(msg)
    with h5py.File(path, "r") as handle:
        yield handle, "h5"


def _read_index(group: Any) -> np.ndarray:
    from anndata.io import read_elem

    return np.asarray(read_elem(group[_attr(group, "_index", "_index")]), dtype=object)


def _obs_columns(obs: Any) -> list[str]:
    order = obs.attrs.get("column-order", [])
    return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]


def _read_column(obs: Any, key: str, param: str) -> Any:
    from anndata.io import read_elem

    columns = _obs_columns(obs)
    if key not in columns:
        raise _missing("obs column", key, columns, param)
    return read_elem(obs[key])


def _stored(path: pathlib.Path, root: Any, key: str, backend: str, columns=None) -> StoredMatrix:
    elem = root[key]
    encoding = _attr(elem, "encoding-type", "array")
    if _is_group(elem):
        if encoding not in _SPARSE:
            msg = (
                f"element {key!r} has encoding {encoding!r}; expected a dense array or a "
                "CSR/CSC matrix. Convert it with anndata before ingest."
            )
            raise ValueError(msg)
        shape = tuple(int(s) for s in np.asarray(_attr(elem, "shape")).tolist())
        dtype = elem["data"].dtype
        return StoredMatrix(path, key, backend, _SPARSE[encoding], shape, dtype, columns)
    if len(elem.shape) != 2:
        msg = f"element {key!r} has shape {elem.shape}; expected a 2-D matrix"
        raise ValueError(msg)
    return StoredMatrix(path, key, backend, "dense", elem.shape, elem.dtype, columns)


def _gene_columns(genes: Any, var_names: np.ndarray) -> np.ndarray | None:
    """Stored column indices for a gene selection (names or boolean mask)."""
    import pandas as pd

    if genes is None:
        return None
    sel = np.atleast_1d(np.asarray(genes))
    if sel.dtype == bool:
        if sel.shape != (len(var_names),):
            msg = f"boolean `genes` mask has shape {sel.shape}; expected ({len(var_names)},)"
            raise ValueError(msg)
        idx = np.nonzero(sel)[0]
    else:
        index = pd.Index(var_names.astype(str))
        if not index.is_unique:
            msg = (
                "var names are not unique; call AnnData.var_names_make_unique() "
                "before selecting genes"
            )
            raise ValueError(msg)
        idx = index.get_indexer(sel.astype(str))
        if (idx < 0).any():
            unknown = sel[idx < 0][:5].tolist()
            msg = (
                f"{int((idx < 0).sum())} gene(s) in `genes` are not var names "
                f"(e.g. {unknown}); check the spelling or drop them"
            )
            raise ValueError(msg)
    if idx.size == 0:
        msg = "`genes` selects no genes; pass at least one gene name (or genes=None for all)"
        raise ValueError(msg)
    return idx.astype(np.int64)


def _from_file(
    path: pathlib.Path, obsm_key, layer, condition_key, sample_key, genes, cc, gc, dtype
) -> xr.Dataset:
    if not path.exists():
        msg = f"no AnnData file or store at {str(path)!r}"
        raise FileNotFoundError(msg)
    with _open_root(path) as (root, backend):
        if "obs" not in root or "var" not in root:
            msg = f"{str(path)!r} has no obs/var groups; pass an AnnData .h5ad file or zarr store"
            raise ValueError(msg)
        obs, var = root["obs"], root["var"]
        cell_names = _read_index(obs)
        var_names = _read_index(var)
        obsm = root["obsm"] if "obsm" in root else {}
        if obsm_key not in obsm:
            raise _missing("obsm key", obsm_key, list(obsm.keys()), "obsm_key")
        states_elem = obsm[obsm_key]
        if _is_group(states_elem):  # a data frame or sparse matrix: small, read it whole
            from anndata.io import read_elem

            value = read_elem(states_elem)
            states = value.toarray() if hasattr(value, "toarray") else np.asarray(value)
        else:
            states = lazy_dense_rows(_stored(path, root, f"obsm/{obsm_key}", backend), cc)
        if layer is None:
            if "X" not in root:
                msg = "the AnnData has no X; pass `layer=` to use a layer"
                raise ValueError(msg)
            key = "X"
        else:
            layers = root["layers"] if "layers" in root else {}
            if layer not in layers:
                raise _missing("layer", layer, list(layers.keys()), "layer")
            key = f"layers/{layer}"
        columns = _gene_columns(genes, var_names)
        expression = lazy_matrix(_stored(path, root, key, backend, columns), cc, gc)
        gene_names = var_names if columns is None else var_names[columns]
        condition = sample = None
        if condition_key is not None:
            condition = _read_column(obs, condition_key, "condition_key")
        if sample_key is not None:
            sample = _read_column(obs, sample_key, "sample_key")
    return make_dataset(
        states, expression, condition, sample, cell_names, gene_names, cc, gc, dtype=dtype
    )


def _from_memory(
    adata: Any, obsm_key, layer, condition_key, sample_key, genes, cc, gc, dtype
) -> xr.Dataset:
    if obsm_key not in adata.obsm:
        raise _missing("obsm key", obsm_key, list(adata.obsm.keys()), "obsm_key")
    states = np.asarray(adata.obsm[obsm_key])
    if layer is None:
        if adata.X is None:
            msg = "the AnnData has no X; pass `layer=` to use a layer"
            raise ValueError(msg)
        matrix = adata.X
    else:
        if layer not in adata.layers:
            raise _missing("layer", layer, list(adata.layers.keys()), "layer")
        matrix = adata.layers[layer]
    var_names = np.asarray(adata.var_names, dtype=object)
    columns = _gene_columns(genes, var_names)
    if columns is not None:
        matrix = matrix[:, columns]
        var_names = var_names[columns]
    labels = []
    for key, param in ((condition_key, "condition_key"), (sample_key, "sample_key")):
        if key is not None and key not in adata.obs.columns:
            raise _missing("obs column", key, list(adata.obs.columns), param)
        labels.append(None if key is None else adata.obs[key].to_numpy())
    return make_dataset(
        states, matrix, labels[0], labels[1], np.asarray(adata.obs_names, dtype=object),
        var_names, cc, gc, dtype=dtype,
    )


def dataset_from_anndata(
    path_or_adata: Any,
    obsm_key: str = "DM_EigenVectors",
    layer: str | None = None,
    condition_key: str | None = "condition",
    sample_key: str | None = None,
    genes: Sequence[str] | np.ndarray | None = None,
    cell_chunk: int = DEFAULT_CELL_CHUNK,
    gene_chunk: int = DEFAULT_GENE_CHUNK,
    *,
    dtype: Any = None,
) -> xr.Dataset:
    """Build a schema dataset from AnnData without loading the expression matrix.

    Parameters
    ----------
    path_or_adata : str, path-like or anndata.AnnData
        An ``.h5ad`` file, an AnnData-zarr store (directory) or an AnnData object. A
        backed AnnData is read from its file.
    obsm_key : str
        ``obsm`` entry with the cell states (default ``"DM_EigenVectors"``, Palantir's
        diffusion components).
    layer : str, optional
        Layer to use as expression; ``None`` uses ``X``.
    condition_key : str or None
        ``obs`` column with the condition of each cell (``None``: no condition).
    sample_key : str, optional
        ``obs`` column with the sample (replicate) of each cell.
    genes : sequence of str or boolean mask, optional
        Genes (var names) to keep, in this order; default all.
    cell_chunk, gene_chunk : int
        Chunk sizes along ``cell`` and ``gene`` (-1: one chunk).
    dtype : {None, "float32", "float64"}, optional
        Expression dtype; default keeps float32/float64 and converts others to float64.

    Returns
    -------
    xarray.Dataset
        Dataset in the schema of :func:`kompot_dask.io.make_dataset`; nothing computed.

    Raises
    ------
    ValueError
        For an unknown ``obsm_key``, ``layer`` or obs column (the message lists the
        available ones), unknown genes, or inputs that fail the schema checks.
    FileNotFoundError
        If the path does not exist.
    """
    cc = check_chunk(cell_chunk, "cell_chunk")
    gc = check_chunk(gene_chunk, "gene_chunk")
    args = (obsm_key, layer, condition_key, sample_key, genes, cc, gc, dtype)
    if isinstance(path_or_adata, (str, os.PathLike)):
        return _from_file(pathlib.Path(path_or_adata), *args)
    import anndata

    if not isinstance(path_or_adata, anndata.AnnData):
        msg = f"expected a path or an anndata.AnnData; got {type(path_or_adata).__name__}"
        raise TypeError(msg)
    if path_or_adata.isbacked:
        if path_or_adata.is_view:
            msg = (
                "a view of a backed AnnData cannot be read lazily; call .to_memory() "
                "or write the subset to a file first"
            )
            raise ValueError(msg)
        return _from_file(pathlib.Path(path_or_adata.filename), *args)
    return _from_memory(path_or_adata, *args)
