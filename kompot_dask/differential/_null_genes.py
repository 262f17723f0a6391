"""Null genes for the gene-level FDR (SPEC §6.7): permuted copies of real genes.

Drawn exactly as the reference does, with numpy's legacy ``RandomState`` (MT19937), so
that the same seed gives the same null genes and the same FDR.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from ..estimators._inputs import read_rows

__all__ = ["NullGenes", "draw_null_genes"]

MAX_SEED = 2**31 - 1


class NullGenes(NamedTuple):
    """Permuted expression columns to append to both conditions."""

    indices: np.ndarray  # (G0,) source column of each null gene
    seeds: np.ndarray  # (G0,) permutation seed of each null gene
    names: list[str]  # NULL_{i}_{source gene name}
    condition1: np.ndarray  # (N1, G0)
    condition2: np.ndarray  # (N2, G0)


def null_gene_indices(n_genes: int, null_genes: int | Sequence[int], seed: int) -> np.ndarray:
    """Source columns: ``RandomState(seed).choice`` without replacement (with, if more nulls than genes)."""
    if np.ndim(null_genes) == 1:
        idx = np.asarray(null_genes, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n_genes:
            msg = f"`null_genes` indices must lie in [0, {n_genes}); got {idx.tolist()[:5]}..."
            raise ValueError(msg)
        return idx
    count = int(null_genes)
    if count < 1:
        raise ValueError(f"`null_genes` must be a positive count or a list of gene indices; got {null_genes!r}")
    return np.random.RandomState(seed).choice(n_genes, size=count, replace=count > n_genes)


def draw_null_genes(
    y1: Any, y2: Any, null_genes: int | Sequence[int], seed: int = 42, gene_names: Sequence[str] | None = None
) -> NullGenes:
    """Permute source columns over the stacked cells ``[condition 1; condition 2]`` and split back.

    Parameters
    ----------
    y1, y2 : array-like (N1, G), (N2, G)
        Expression of the two conditions (numpy, scipy sparse, dask, zarr).
    null_genes : int or sequence of int
        Number of null genes, or the source column of each.
    seed : int, default 42
        ``null_seed`` of the reference.
    gene_names : sequence of str, optional
        Names of the G columns (default ``gene_{j}``).
    """
    n1, n_genes = int(y1.shape[0]), int(y1.shape[1])
    idx = null_gene_indices(n_genes, null_genes, seed)
    seeds = np.random.RandomState(seed).randint(0, MAX_SEED, size=len(idx))
    cols1 = read_rows(y1[:, idx] if not hasattr(y1, "get_orthogonal_selection") else y1.oindex[:, idx],
                      slice(None), "y_condition1")
    cols2 = read_rows(y2[:, idx] if not hasattr(y2, "get_orthogonal_selection") else y2.oindex[:, idx],
                      slice(None), "y_condition2")
    # One contiguous row per null gene, shuffled in place: the same draws as the reference's
    # ``permutation`` of each column (it copies, then shuffles), without strided columns.
    # Reseeding one generator is ``RandomState(s)`` without building a new one per gene.
    rows = np.empty((len(idx), n1 + cols2.shape[0]))
    rows[:, :n1] = cols1.T
    rows[:, n1:] = cols2.T
    state = np.random.RandomState()
    for i, s in enumerate(seeds):
        state.seed(int(s))
        state.shuffle(rows[i])
    permuted = rows.T
    names = [f"gene_{j}" for j in range(n_genes)] if gene_names is None else [str(g) for g in gene_names]
    return NullGenes(idx, seeds, [f"NULL_{i}_{names[j]}" for i, j in enumerate(idx)], permuted[:n1], permuted[n1:])
