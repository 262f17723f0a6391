"""k-means landmarks (SPEC §1.6): greedy k-means++ seeding and Lloyd steps.

A Lloyd step is a sum over cell chunks: each chunk contributes per-centre coordinate
sums and counts (:func:`lloyd_chunk_stats`); :func:`lloyd_update` combines them. The
reference uses scikit-learn's k-means; the centroids here are of the same kind but not
bit-identical (parity tests inject the reference landmarks).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["LloydStats", "kmeans_plusplus", "lloyd_chunk_stats", "lloyd_update", "lloyd_tolerance"]


class LloydStats(NamedTuple):
    """Per-centre sums of one or more chunks of cells."""

    sums: np.ndarray  # (k, D) coordinate sums of the cells assigned to each centre
    counts: np.ndarray  # (k,) number of cells assigned to each centre
    inertia: float  # sum of squared distances to the assigned centres

    def __add__(self, other: "LloydStats") -> "LloydStats":  # type: ignore[override]
        return LloydStats(self.sums + other.sums, self.counts + other.counts, self.inertia + other.inertia)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = np.sum(a * a, axis=1)[:, None] - 2.0 * (a @ b.T) + np.sum(b * b, axis=1)[None, :]
    return np.maximum(sq, 0.0)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding with ``2 + floor(ln k)`` candidates per step.

    Parameters
    ----------
    x : ndarray (n, D)
        Cells to seed from (a sample of all cells is enough).
    k : int
        Number of centres, ``1 <= k <= n``.
    rng : numpy.random.Generator
        Source of randomness.
    """
    n = len(x)
    n_trials = 2 + int(np.log(k))
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = _sq_dist(centers[:1], x)[0]
    potential = closest.sum()
    for c in range(1, k):
        if potential <= 0:  # fewer distinct cells than centres: repeat a cell
            centers[c] = x[rng.integers(n)]
            continue
        draws = rng.uniform(size=n_trials) * potential
        candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws), n - 1)
        cand_dist = np.minimum(closest[None, :], _sq_dist(x[candidates], x))
        cand_pot = cand_dist.sum(axis=1)
        best = int(np.argmin(cand_pot))
        centers[c] = x[candidates[best]]
        closest = cand_dist[best]
        potential = cand_pot[best]
    return centers


def lloyd_chunk_stats(x_chunk: np.ndarray, centers: np.ndarray) -> LloydStats:
    """Assign the cells of one chunk to their nearest centre and sum them per centre."""
    d2 = _sq_dist(x_chunk, centers)
    labels = np.argmin(d2, axis=1)
    k, dim = centers.shape
    sums = np.zeros((k, dim))
    np.add.at(sums, labels, x_chunk)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    inertia = float(d2[np.arange(len(labels)), labels].sum())
    return LloydStats(sums, counts, inertia)


def lloyd_update(centers: np.ndarray, stats: LloydStats) -> tuple[np.ndarray, float]:
    """New centres from combined chunk stats, and the squared centre shift.

    A centre that lost all its cells stays where it was.
    """
    filled = stats.counts > 0
    new = centers.copy()
    new[filled] = stats.sums[filled] / stats.counts[filled, None]
    return new, float(np.sum((new - centers) ** 2))


def lloyd_tolerance(x: np.ndarray, tol: float = 1e-4) -> float:
    """Convergence threshold on the squared centre shift: ``tol * mean per-feature variance``."""
    return float(tol * np.mean(np.var(x, axis=0)))
