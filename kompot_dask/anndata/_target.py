"""Where a ``da()`` / ``de()`` run reads its atlas and writes its results.

Two kinds of target, one interface:

- **in memory**: an :class:`anndata.AnnData` (or its copy); fields are assigned to it;
- **a store**: an AnnData-zarr directory. The run reads the atlas lazily (a path, a backed
  or ``read_lazy`` AnnData) and works on a *shell* (obs, var and uns in memory, no
  matrices); cells x genes results are computed into a kompot_dask result store beside
  the destination (``.<name>.kompot-<result_key>-<kind>.zarr``, resumed by a rerun of the
  same call) and moved or streamed into ``layers/``; then the new obs/var columns and the
  uns entries are written (the run history last), and the staging store is removed.

Destinations: the AnnData-zarr itself when the atlas is one; ``<stem>.kompot.zarr`` beside
an ``.h5ad`` file (HDF5 has a single writer; that store holds obs, var and the results,
no ``X``); or the ``results_store`` a caller names.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import numpy as np

from ._common import prepare_adata

__all__ = ["Target", "open_target"]


class Target:
    """The AnnData a run updates (``adata``), what it reads (``source``) and, in store mode,
    the AnnData-zarr the results go to (``path``)."""

    def __init__(self, adata: Any, source: Any, path: str | None = None, exists: bool = True) -> None:
        self.adata = adata
        self.source = source
        self.path = path
        self.exists = exists
        # a new store starts as the atlas's obs, var and obsm
        self._base = {"obs": list(adata.obs.columns), "var": list(adata.var.columns)}
        self._layers: dict[str, tuple[str, np.ndarray, np.ndarray, bool]] = {}

    @property
    def in_memory(self) -> bool:
        """Whether results are assigned to an in-memory AnnData."""
        return self.path is None

    def present(self) -> dict[str, list[str]]:
        """Names already at the destination, per element (for the overwrite check)."""
        names = {"obs": list(self.adata.obs.columns), "var": list(self.adata.var.columns),
                 "uns": list(self.adata.uns.keys())}
        for element in ("layers", "varm", "obsp"):
            if self.in_memory:
                names[element] = list(getattr(self.adata, element).keys())
            elif self.exists:
                from ..io.anndata_zarr import AnnDataZarr

                names[element] = AnnDataZarr(self.path).names(element)
            else:
                names[element] = []
        return names

    def staging(self, result_key: str, kind: str) -> str:
        """The result store a run of ``kind`` computes into (store mode)."""
        parent, name = os.path.split(self.path)
        return os.path.join(parent, f".{name}.kompot-{result_key}-{kind}.zarr")

    def check_cells(self, obs_names: Any) -> None:
        """The destination must describe the atlas's cells, in the atlas's order."""
        if self.in_memory or obs_names is None:
            return
        ours = np.asarray(self.adata.obs_names).astype(str)
        theirs = np.asarray(obs_names).astype(str)
        if ours.shape != theirs.shape or not np.array_equal(ours, theirs):
            msg = (f"the results store {self.path!r} holds {ours.size} cells that are not the atlas's "
                   f"{theirs.size} cells in the same order; choose another `results_store`")
            raise ValueError(msg)

    def put_layer(self, key: str, values: Any, keep: np.ndarray, cols: np.ndarray, all_genes: bool) -> None:
        """A per-cell x per-gene result: assigned (in memory) or queued for :meth:`commit`
        (``values`` is then the name of the array in the staging store)."""
        if self.in_memory:
            self.adata.layers[key] = _dense_or_sparse(values, keep, cols, self.adata.shape, all_genes)
        else:
            self._layers[key] = (values, keep, cols, all_genes)

    def commit(self, staging: str | None, columns: dict[str, list[str]], uns_keys: list[str]) -> None:
        """Store mode: write the queued layers, the obs/var ``columns`` and varm entries this
        run wrote, then ``uns_keys`` (the run history among them), rewrite consolidated
        metadata and remove the staging store."""
        if self.in_memory:
            return
        from ..io.anndata_zarr import AnnDataZarr

        if self.exists:
            store = AnnDataZarr(self.path)
        else:
            obs, var = self.adata.obs[self._base["obs"]], self.adata.var[self._base["var"]]
            store = AnnDataZarr.create(self.path, obs, var, _obsm_of(self.source))
        self.exists = True
        for key, (name, keep, cols, all_genes) in self._layers.items():
            _write_layer(store, key, os.path.join(staging, name), keep, cols, self.adata.shape, all_genes)
        for element in ("obs", "var"):
            frame = getattr(self.adata, element)
            store.write_columns(element, frame, [c for c in columns.get(element, []) if c in frame.columns])
        store.write_entries("varm", self.adata.varm, columns.get("varm", []))
        store.write_entries("uns", self.adata.uns, uns_keys)
        store.finish()
        if staging is not None:
            remove_staging(staging)


def remove_staging(path: str) -> None:
    """Remove a staging result store (only if it is one of ours)."""
    from ..io.results import read_meta

    if os.path.isdir(path) and read_meta(path) is not None:
        shutil.rmtree(path, ignore_errors=True)


def _dense_or_sparse(values: np.ndarray, keep: np.ndarray, cols: np.ndarray, shape: tuple, all_genes: bool):
    """A full-size layer: dense with NaN rows outside the filter, or CSR zeros around a gene
    subset (as Kompot writes it)."""
    if all_genes:
        if keep.all():
            return np.asarray(values, dtype=np.float64)
        out = np.full(shape, np.nan)
        out[keep] = values
        return out
    import scipy.sparse

    dense_rows = np.flatnonzero(keep)
    rows = np.repeat(dense_rows, len(cols))
    return scipy.sparse.csr_matrix((np.asarray(values).ravel(), (rows, np.tile(cols, len(dense_rows)))), shape=shape)


def _write_layer(store: Any, key: str, array_path: str, keep: np.ndarray, cols: np.ndarray, shape: tuple,
                 all_genes: bool) -> None:
    """Move a staged array into ``layers/key`` when it already is the layer; else stream it,
    placed into the full shape (NaN rows outside the cell filter; zeros around a gene
    subset, as the densified form of Kompot's sparse layer)."""
    if all_genes and keep.all() and store.can_move():
        try:
            store.move_layer(key, array_path)
            return
        except OSError:  # another file system: stream it instead
            pass
    import dask.array as da

    values = da.from_zarr(array_path)
    if not keep.all():
        values = _expand_rows(values, keep, np.nan if all_genes else 0.0)
    if not all_genes:
        full = np.full(shape[1], -1, dtype=np.int64)
        full[cols] = np.arange(len(cols))
        values = da.where((full >= 0)[None, :], values[:, np.clip(full, 0, None)], 0.0)
    store.write_layer(key, values.astype(np.float64))


def _expand_rows(values: Any, keep: np.ndarray, fill: float) -> Any:
    """``values`` (one row per kept cell) spread over all cells, ``fill`` elsewhere."""
    import dask.array as da

    pos = np.clip(np.cumsum(keep) - 1, 0, None)
    return da.where(keep[:, None], values[pos], fill)


def _source_path(adata: Any) -> str | None:
    if isinstance(adata, (str, os.PathLike)):
        return os.fspath(adata)
    if getattr(adata, "isbacked", False) and getattr(adata, "filename", None):
        return os.fspath(adata.filename)
    return None


def is_in_memory(adata: Any) -> bool:
    import anndata
    import pandas as pd

    if not isinstance(adata, anndata.AnnData) or getattr(adata, "isbacked", False):
        return False
    return isinstance(adata.obs, pd.DataFrame)


def open_target(adata: Any, copy: bool, results_store: Any = None) -> Target:
    """The target of a run on ``adata`` (see the module docstring); nothing is written here.

    Raises
    ------
    ValueError, TypeError, FileNotFoundError
        An input that is neither an AnnData nor an AnnData file; ``copy`` with a store; a
        destination that exists and is not an AnnData-zarr; a lazy AnnData without
        ``results_store``.
    """
    path = _source_path(adata)
    if results_store is None and path is None:
        if is_in_memory(adata):
            return Target(prepare_adata(adata, copy), adata if not copy else None)
        if type(adata).__module__.split(".")[0] == "anndata":
            msg = ("this AnnData is read lazily and has no file to write beside; pass "
                   "`results_store=` (an AnnData-zarr path to write the results into), or the path of the atlas")
            raise ValueError(msg)
        prepare_adata(adata, copy)  # raises the type error
    if copy:
        msg = ("`copy=True` returns an in-memory AnnData; with a path, a lazy AnnData or `results_store` the "
               "results are written to a store instead: drop `copy`, or read the atlas into memory first")
        raise ValueError(msg)
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"no AnnData file or store at {path!r}; check the path")
    dest = _destination(path, results_store)
    source = path if path is not None else adata
    from ..io.anndata_zarr import AnnDataZarr, is_anndata_zarr

    if os.path.lexists(dest):
        if not is_anndata_zarr(dest):
            msg = (f"{dest!r} exists and is not an AnnData-zarr store; it is never written into. Choose "
                   "another `results_store`")
            raise FileExistsError(msg)
        return Target(AnnDataZarr(dest).shell(), source, dest, exists=True)
    if not os.path.isdir(os.path.dirname(dest)):
        raise FileNotFoundError(f"the folder of `results_store` {dest!r} does not exist")
    return Target(_shell_of(source), source, dest, exists=False)


def _destination(path: str | None, results_store: Any) -> str:
    from ..io.anndata_zarr import is_anndata_zarr

    if results_store is not None:
        return os.path.abspath(os.fspath(results_store))
    assert path is not None
    if os.path.isdir(path):
        if not is_anndata_zarr(path):
            raise ValueError(f"{path!r} is a folder but not an AnnData-zarr store; pass an .h5ad or AnnData-zarr path")
        return os.path.abspath(path)
    p = pathlib.Path(path).resolve()
    return str(p.with_name(f"{p.stem}.kompot.zarr"))


def _memory(frame: Any) -> Any:
    return frame.to_memory() if hasattr(frame, "to_memory") else frame.copy()


def _shell_of(source: Any) -> Any:
    """obs, var and uns of an atlas, in memory, without its matrices (the uns, for the
    landmarks of earlier runs, as Kompot reuses them)."""
    import anndata

    from ..io.anndata_zarr import read_parts

    if isinstance(source, anndata.AnnData):
        return anndata.AnnData(obs=_memory(source.obs), var=_memory(source.var), uns=dict(source.uns))
    return read_parts(source)


def _obsm_of(source: Any) -> dict:
    """The atlas's obsm (cells x a few dimensions each), for a new results store."""
    import anndata

    from ..io.anndata_zarr import read_parts

    if isinstance(source, anndata.AnnData):
        return {k: np.asarray(v.compute() if hasattr(v, "compute") else v) for k, v in source.obsm.items()}
    return dict(read_parts(source, ("obs", "obsm")).obsm)