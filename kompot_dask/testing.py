"""Synthetic two-condition atlases with known answers, for examples, tests and benchmarks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["TwoConditions", "two_conditions"]


class TwoConditions(NamedTuple):
    """Cells, expression and sample labels of two conditions, with the generator's truth."""

    x1: np.ndarray  # (n1, D) cell states
    x2: np.ndarray
    y1: np.ndarray  # (n1, G) log expression
    y2: np.ndarray
    samples1: np.ndarray  # (n1,) sample labels "c1-s0", ...
    samples2: np.ndarray
    cluster1: np.ndarray  # (n1,) generating cluster
    cluster2: np.ndarray
    de_genes: np.ndarray  # (G,) bool: expression changes in cluster 0 of condition 2


def two_conditions(
    n_cells: int = 2000, n_genes: int = 40, n_samples: int = 3, dims: int = 3, seed: int = 0
) -> TwoConditions:
    """Generate curved clusters in ``dims`` dimensions for two conditions.

    Condition 2 moves weight from cluster 0 to cluster 2 (differential abundance) and
    raises the first quarter of the genes in cluster 0 (differential expression). Each
    sample scales the cluster weights and shifts expression slightly (replicate noise).

    Parameters
    ----------
    n_cells : int
        Cells over both conditions (split evenly).
    n_genes, n_samples, dims : int
        Genes, samples per condition and cell-state dimensions (``dims >= 2``).
    seed : int
        Seed of numpy's ``default_rng``.
    """
    if dims < 2:
        raise ValueError(f"`dims` must be >= 2; got {dims}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(3, dims))
    axes = rng.normal(size=(3, dims))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    weights = {1: np.array([0.6, 0.3, 0.1]), 2: np.array([0.1, 0.3, 0.6])}
    programs = rng.normal(scale=0.5, size=(dims, n_genes))
    de = np.zeros(n_genes, dtype=bool)
    de[: max(1, n_genes // 4)] = True
    per_condition = {}
    for cond in (1, 2):
        n = n_cells // 2 if cond == 1 else n_cells - n_cells // 2
        sample = rng.integers(n_samples, size=n)
        w = weights[cond] * np.exp(rng.normal(scale=0.15, size=(n_samples, 3)))
        w /= w.sum(axis=1, keepdims=True)
        cluster = np.array([rng.choice(3, p=w[s]) for s in sample])
        t = rng.uniform(-1.0, 1.0, size=n)
        bend = np.roll(axes[cluster], 1, axis=1) * (1.0 - t**2)[:, None] * 2.0
        x = centres[cluster] + 6.0 * t[:, None] * axes[cluster] + bend + rng.normal(scale=0.4, size=(n, dims))
        offset = rng.normal(scale=0.1, size=(n_samples, n_genes))[sample]
        lift = (cond == 2) * (cluster == 0)[:, None] * de * 1.2
        rate = np.exp(0.3 + np.tanh(x / 8.0) @ programs + offset + lift)
        y = np.log1p(rng.poisson(rate)).astype(np.float64)
        labels = np.array([f"c{cond}-s{s}" for s in sample])
        per_condition[cond] = (x, y, labels, cluster)
    (x1, y1, s1, k1), (x2, y2, s2, k2) = per_condition[1], per_condition[2]
    return TwoConditions(x1, x2, y1, y2, s1, s2, k1, k2, de)
