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


def lloyd_chunk_stats(x_chunk: np.ndarray, centers: np.ndarray, sub_rows: int = 256) -> LloydStats:
    """Assign the cells of one chunk to their nearest centre and sum them per centre.

    Distances are formed ``sub_rows`` cells at a time (a block that stays in cache) as
    ``|c|^2 - 2 x.c``: the cell's own ``|x|^2`` does not change which centre is nearest,
    and is added back only for the inertia.
    """
    x_chunk = np.asarray(x_chunk, dtype=np.float64)
    n = len(x_chunk)
    k = len(centers)
    scaled_t = np.ascontiguousarray(-2.0 * centers.T)
    c2 = np.sum(centers * centers, axis=1)
    labels = np.empty(n, dtype=np.intp)
    nearest = np.empty(n)
    for a in range(0, n, sub_rows):
        block = x_chunk[a : a + sub_rows] @ scaled_t
        block += c2
        lab = np.argmin(block, axis=1)
        labels[a : a + sub_rows] = lab
        nearest[a : a + sub_rows] = block[np.arange(len(lab)), lab]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.stack([np.bincount(labels, weights=col, minlength=k) for col in x_chunk.T], axis=1)
    inertia = float(np.maximum(nearest + np.sum(x_chunk * x_chunk, axis=1), 0.0).sum())
    return LloydStats(sums.reshape(k, x_chunk.shape[1]), counts, inertia)


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
