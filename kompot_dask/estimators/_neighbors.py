"""Nearest-neighbour distances of training cells (SPEC §1.3), one task per chunk of cells.

The KD-tree of all cells is built once and shared with every chunk's task. Cells are
queried in the tree's own leaf order: neighbouring queries then walk the same tree nodes
while they are in cache (3.2x faster than the cells' own order at 500,000 cells,
``benchmarks/neighbors.py``). The search is exact and each query is independent, so the
order changes nothing in the result.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from ..kernels import neighbors as nb
from ..options import get_options
from ..execution.plan import NN_CHUNK_CELLS, row_slices
from ..execution.reduce import open_reducer

__all__ = ["nn_distances"]




def nn_distances(x: np.ndarray, tree: cKDTree | None = None, float32: bool = False) -> np.ndarray:
    """Distance of every cell of ``x`` to its nearest other cell (exact).

    Parameters
    ----------
    x : ndarray (n, D)
        Cell states.
    tree : cKDTree, optional
        A tree over ``x`` (built here if not given); the cells are read from it.
    float32 : bool
        Recompute each distance from float32 coordinates, as the reference does (§10.15).

    Returns
    -------
    ndarray (n,)
        On the active dask cluster the chunks are searched as tasks (``kompot-nn-search-chunk-…``).
    """
    tree = nb.build_tree(x) if tree is None else tree
    n = tree.n
    chunk_rows = get_options()["cell_chunk_size"] or NN_CHUNK_CELLS
    # A chunk is a range of positions in the tree's leaf order; its cells are read from the
    # tree itself, which every task has, so no cell states travel beside the tree.
    with open_reducer(row_slices(n, 1, chunk_rows=chunk_rows), "nn") as reducer:
        shared = reducer.share(tree)
        parts = reducer.map(search_chunk, shared, float32)
    out = np.empty(n, dtype=np.float64)
    out[tree.indices] = np.concatenate(parts)
    return out


def search_chunk(positions: slice, tree: cKDTree, float32: bool) -> np.ndarray:
    """Nearest-neighbour distances of the cells at ``positions`` of the tree's leaf order (a reducer term)."""
    return nb.nn_distances_chunk(tree, tree.data[tree.indices[positions]], float32)
