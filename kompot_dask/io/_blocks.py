"""Lazy block readers: dask arrays over matrices that are never loaded whole.

A *source* describes a (cells x genes) matrix: where it lives (in memory, an HDF5 file
or a zarr store), how it is laid out (dense, CSR or CSC) and which stored columns are
selected. Sources hold only picklable descriptions (paths, keys, index arrays), so the
dask graphs built from them run on distributed workers; files are opened per block.

Sparse matrices are read as sparse blocks (one row range of a CSR matrix, one column
range of a CSC matrix) and densified only per (cell chunk x gene chunk) block.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["InMemorySparse", "StoredMatrix", "lazy_matrix", "lazy_dense_rows"]


class InMemorySparse:
    """An in-memory scipy sparse matrix (kept CSR, or CSC as given)."""

    def __init__(self, matrix: Any) -> None:
        layout = "csc" if matrix.format == "csc" else "csr"
        self.matrix = matrix.tocsc() if layout == "csc" else matrix.tocsr()
        self.layout = layout
        self.shape = tuple(int(s) for s in matrix.shape)
        self.dtype = np.dtype(matrix.dtype)
        self.ndim = 2
        self.columns: np.ndarray | None = None

    def token(self) -> str:
        from dask.base import tokenize

        m = self.matrix
        return tokenize(self.layout, m.data, m.indices, m.indptr, self.shape)

    def major(self, start: int, stop: int) -> Any:
        """Rows (CSR) or columns (CSC) ``start:stop`` as a sparse matrix."""
        return self.matrix[start:stop] if self.layout == "csr" else self.matrix[:, start:stop]


class StoredMatrix:
    """A matrix element of an HDF5 file or a zarr store, opened per block.

    Parameters
    ----------
    path : str
        File (HDF5) or directory (zarr) path.
    key : str
        Element inside it (``"X"``, ``"layers/counts"``, ``"obsm/X_pca"``).
    backend : {"h5", "zarr"}
    layout : {"dense", "csr", "csc"}
    shape : tuple of int
        Stored shape (before column selection).
    dtype : numpy dtype
    columns : ndarray of int, optional
        Stored column indices to keep, in output order.
    """

    def __init__(self, path, key, backend, layout, shape, dtype, columns=None) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.backend = backend
        self.layout = layout
        self.stored_shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        n_cols = self.stored_shape[1] if self.columns is None else len(self.columns)
        self.shape = (self.stored_shape[0], int(n_cols))
        self.ndim = 2

    def token(self) -> str:
        from dask.base import tokenize

        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        return tokenize(os.path.abspath(self.path), self.key, self.layout, stamp, self.columns)

    def _open(self):
        if self.backend == "h5":
            import h5py

            handle = h5py.File(self.path, "r")
            return handle, handle[self.key]
        import zarr

        return None, zarr.open_group(self.path, mode="r")[self.key]

    def dense(self, rows: slice, cols: slice) -> np.ndarray:
        """Dense block ``[rows, cols]`` (in selected-column coordinates)."""
        handle, elem = self._open()
        try:
            if self.columns is None:
                return np.asarray(elem[rows, cols])
            want = self.columns[cols]
            if want.size == 0:
                return np.empty((rows.stop - rows.start, 0), dtype=self.dtype)
            lo, hi = int(want.min()), int(want.max()) + 1
            return np.asarray(elem[rows, lo:hi])[:, want - lo]
        finally:
            if handle is not None:
                handle.close()

    def major(self, start: int, stop: int) -> Any:
        """Rows (CSR) or columns (CSC) ``start:stop`` as a scipy sparse matrix."""
        import scipy.sparse as sp

        handle, elem = self._open()
        try:
            indptr = np.asarray(elem["indptr"][start : stop + 1], dtype=np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = np.asarray(elem["data"][lo:hi])
            indices = np.asarray(elem["indices"][lo:hi])
        finally:
            if handle is not None:
                handle.close()
        n_rows, n_cols = self.stored_shape
        if self.layout == "csr":
            return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, n_cols))
        return sp.csc_matrix((data, indices, indptr - lo), shape=(n_rows, stop - start))


def _sparse_block(src: Any, index: tuple[slice, slice]) -> Any:
    """Sparse block ``src[rows, cols]``: one major-axis range read, then sliced."""
    rows, cols = index
    if src.layout == "csr":
        block = src.major(rows.start, rows.stop)
        if src.columns is not None:
            return block[:, src.columns[cols]]
        return block[:, cols]
    if src.columns is not None:
        want = src.columns[cols]
        if want.size == 0:
            return src.major(0, 0)[rows]
        lo, hi = int(want.min()), int(want.max()) + 1
        return src.major(lo, hi)[:, want - lo][rows]
    return src.major(cols.start, cols.stop)[rows]


def _dense_block(src: Any, index: tuple[slice, slice]) -> np.ndarray:
    rows, cols = index
    return src.dense(rows, cols)


def _densify(block: Any) -> np.ndarray:
    return block.toarray() if hasattr(block, "toarray") else np.asarray(block)


def lazy_matrix(src: Any, cell_chunk: int, gene_chunk: int) -> da.Array:
    """Dask array over ``src`` with dense ``(cell_chunk, gene_chunk)`` blocks.

    Dense sources are read block by block. CSR sources are read one cell chunk (all
    selected genes, still sparse) at a time and split into gene chunks that are
    densified separately; CSC sources likewise one gene chunk (all cells) at a time.
    A selection of a few gene chunks therefore reads each sparse range once.
    """
    import dask.array as da
    from dask.base import tokenize

    n_cells, n_genes = src.shape
    cc = n_cells if cell_chunk == -1 else min(cell_chunk, max(n_cells, 1))
    gc = n_genes if gene_chunk == -1 else min(gene_chunk, max(n_genes, 1))
    dense_meta = np.empty((0, 0), dtype=src.dtype)
    token = tokenize(src.token(), cc, gc)
    if src.layout == "dense":
        return da.from_array(
            src, chunks=(cc, gc), name=f"kompot-read-{token}", getitem=_dense_block,
            meta=dense_meta, asarray=False,
        )
    import scipy.sparse as sp

    first = (cc, max(n_genes, 1)) if src.layout == "csr" else (max(n_cells, 1), gc)
    fmt = sp.csr_matrix if src.layout == "csr" else sp.csc_matrix
    sparse = da.from_array(
        src, chunks=first, name=f"kompot-read-sparse-{token}", getitem=_sparse_block,
        meta=fmt((0, 0), dtype=src.dtype), asarray=False,
    )
    split = sparse.rechunk((cc, gc), method="tasks")
    return split.map_blocks(_densify, dtype=src.dtype, meta=dense_meta)


def lazy_dense_rows(src: StoredMatrix, cell_chunk: int) -> da.Array:
    """Dask array over a small-width stored dense matrix, chunked along cells only."""
    import dask.array as da
    from dask.base import tokenize

    n_cells = src.shape[0]
    cc = n_cells if cell_chunk == -1 else min(cell_chunk, max(n_cells, 1))
    name = f"kompot-read-{tokenize(src.token(), cc)}"
    return da.from_array(
        src, chunks=(cc, -1), name=name, getitem=_dense_block,
        meta=np.empty((0, 0), dtype=src.dtype), asarray=False,
    )
