"""k-means landmarks (SPEC §1.6): greedy k-means++ seeding and Lloyd steps.

A Lloyd step is a sum over cell chunks: each chunk contributes per-centre coordinate
sums and counts (:func:`lloyd_chunk_stats`); :func:`lloyd_update` combines them. The
reference uses scikit-learn's k-means; the centroids here are of the same kind but not
bit-identical (parity tests inject the reference landmarks).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial.distance import cdist

__all__ = [
    "LloydStats", "LloydBounds", "kmeans_plusplus", "lloyd_chunk_stats", "lloyd_chunk_bounded", "half_gaps",
    "lloyd_update", "lloyd_tolerance",
]

# Bounds are trusted only with this relative margin, far above their accumulated rounding.
_BOUND_MARGIN = 1e-9


class LloydStats(NamedTuple):
    """Per-centre sums of one or more chunks of cells."""

    sums: np.ndarray  # (k, D) coordinate sums of the cells assigned to each centre
    counts: np.ndarray  # (k,) number of cells assigned to each centre
    inertia: float  # sum of squared distances to the assigned centres

    def __add__(self, other: "LloydStats") -> "LloydStats":  # type: ignore[override]
        return LloydStats(self.sums + other.sums, self.counts + other.counts, self.inertia + other.inertia)


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
    x = np.ascontiguousarray(x, dtype=np.float64)
    squares = np.sum(x * x, axis=1)  # each cell's |x|², once (per row: the same bits as per step)
    centers = np.empty((k, x.shape[1]))
    first = rng.integers(n)
    centers[0] = x[first]
    closest = _distances_from(x, squares, np.array([first]))[0]
    potential = closest.sum()
    for c in range(1, k):
        if potential <= 0:  # fewer distinct cells than centres: repeat a cell
            centers[c] = x[rng.integers(n)]
            continue
        draws = rng.uniform(size=n_trials) * potential
        candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws), n - 1)
        cand_dist = np.minimum(closest[None, :], _distances_from(x, squares, candidates))
        cand_pot = cand_dist.sum(axis=1)
        best = int(np.argmin(cand_pot))
        centers[c] = x[candidates[best]]
        closest = cand_dist[best]
        potential = cand_pot[best]
    return centers


def _distances_from(x: np.ndarray, squares: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distances (len(rows), n) of the cells ``x[rows]`` to every cell, from the cells'
    precomputed squares ``|x|²``."""
    out = x[rows] @ x.T
    out *= -2.0
    out += squares[rows][:, None]
    out += squares[None, :]
    return np.maximum(out, 0.0, out=out)


def lloyd_chunk_stats(x_chunk: np.ndarray, centers: np.ndarray, sub_rows: int = 256) -> LloydStats:
    """Assign the cells of one chunk to their nearest centre and sum them per centre.

    Distances to all centres are formed ``sub_rows`` cells at a time (a block that stays
    in cache) as ``|c|^2 - 2 x.c``: the cell's own ``|x|^2`` does not change which centre
    is nearest. :func:`lloyd_chunk_bounded` makes the same assignment with less work.
    """
    x = np.asarray(x_chunk, dtype=np.float64)
    labels, upper, _ = _assign(x, np.asarray(centers, dtype=np.float64), sub_rows)
    sums, counts = _per_centre(x, labels, len(centers))
    return LloydStats(sums, counts, float(np.sum(upper * upper)))


def _per_centre(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate sums and counts of the cells assigned to each of ``k`` centres."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.stack([np.bincount(labels, weights=col, minlength=k) for col in x.T], axis=1)
    return sums.reshape(k, x.shape[1]), counts


class LloydBounds(NamedTuple):
    """Distance bounds of one chunk's cells (Hamerly's k-means acceleration).

    Valid for any later centres: moving the centres only loosens them by the shifts.
    ``centers`` is kept by reference and must not be modified afterwards.
    """

    centers: np.ndarray  # (k, D) the centres the bounds were computed against
    labels: np.ndarray  # (n,) nearest centre
    upper: np.ndarray  # (n,) at least the distance to the nearest centre
    lower: np.ndarray  # (n,) at most the distance to any other centre


def half_gaps(centers: np.ndarray) -> np.ndarray:
    """Half the distance from each centre to its nearest other centre (``inf`` for one centre).

    A cell closer than this to its assigned centre cannot be nearer to another one.
    """
    centers = np.asarray(centers, dtype=np.float64)
    if len(centers) < 2:
        return np.full(len(centers), np.inf)
    d = cdist(centers, centers)  # direct differences: accurate for close centres
    np.fill_diagonal(d, np.inf)
    return 0.5 * d.min(axis=1)


def _assign(x: np.ndarray, centers: np.ndarray, sub_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centre of each cell, its distance, and a lower bound on the second nearest."""
    n, k = len(x), len(centers)
    scaled_t = np.ascontiguousarray(-2.0 * centers.T)
    c2 = np.sum(centers * centers, axis=1)
    x2 = np.sum(x * x, axis=1)
    labels = np.empty(n, dtype=np.intp)
    second = np.full(n, np.inf)
    for a in range(0, n, sub_rows):
        block = x[a : a + sub_rows] @ scaled_t
        block += c2
        lab = np.argmin(block, axis=1)
        labels[a : a + sub_rows] = lab
        if k > 1:  # the second smallest: hide the smallest (cheaper than a partition)
            block[np.arange(len(lab)), lab] = np.inf
            second[a : a + sub_rows] = block.min(axis=1)
    upper = np.sqrt(np.sum((x - centers[labels]) ** 2, axis=1))
    # |c|^2 - 2 x.c + |x|^2 is off by at most a few eps (|x|^2 + |c|^2): round down by more.
    slack = 1e-13 * (x2 + c2.max())
    lower = np.sqrt(np.maximum(second + x2 - slack, 0.0))
    return labels, upper, lower


def lloyd_chunk_bounded(
    x_chunk: np.ndarray,
    centers: np.ndarray,
    gaps: np.ndarray,
    bounds: LloydBounds | None = None,
    sub_rows: int = 256,
) -> tuple[np.ndarray, np.ndarray, LloydBounds, int]:
    """One chunk's part of a Lloyd step, skipping cells whose nearest centre cannot have changed.

    The assignment is the one :func:`lloyd_chunk_stats` makes: with ``bounds`` from an
    earlier step (Hamerly's algorithm), a cell keeps its centre when its upper bound is
    below both the half gap of that centre and its lower bound to every other centre
    (with a margin far above rounding); only the other cells get their distances to all
    centres.

    Parameters
    ----------
    x_chunk : ndarray (n, D)
    centers : ndarray (k, D)
    gaps : ndarray (k,)
        :func:`half_gaps` of ``centers``.
    bounds : LloydBounds, optional
        This chunk's bounds from any earlier step; without them every cell is assigned in full.
    sub_rows : int
        Cells per distance block.

    Returns
    -------
    sums : ndarray (k, D)
    counts : ndarray (k,)
    bounds : LloydBounds
        For the next step.
    n_full : int
        Cells whose distances to all centres were computed.
    """
    x = np.asarray(x_chunk, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    n, k = len(x), len(centers)
    if bounds is None or bounds.centers.shape != centers.shape or len(bounds.labels) != n:
        labels, upper, lower = _assign(x, centers, sub_rows)
        n_full = n
    else:
        shift = np.sqrt(np.sum((centers - bounds.centers) ** 2, axis=1))
        labels = bounds.labels.copy()
        upper = bounds.upper + shift[labels]
        if k > 1:
            top2 = np.argsort(shift)[-2:]
            largest_other = np.where(labels == top2[1], shift[top2[0]], shift[top2[1]])
        else:
            largest_other = 0.0
        lower = bounds.lower - largest_other
        limit = np.maximum(gaps[labels], lower)
        check = np.flatnonzero(upper * (1 + _BOUND_MARGIN) > limit)
        upper[check] = np.sqrt(np.sum((x[check] - centers[labels[check]]) ** 2, axis=1))
        redo = check[upper[check] * (1 + _BOUND_MARGIN) > limit[check]]
        if redo.size:
            labels[redo], upper[redo], lower[redo] = _assign(x[redo], centers, sub_rows)
        n_full = int(redo.size)
    sums, counts = _per_centre(x, labels, k)
    return sums, counts, LloydBounds(centers, labels, upper, lower), n_full


def lloyd_update(centers: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, float]:
    """New centres from the per-centre sums and counts of all chunks, and the squared centre shift.

    A centre that lost all its cells stays where it was.
    """
    filled = counts > 0
    new = centers.copy()
    new[filled] = sums[filled] / counts[filled, None]
    return new, float(np.sum((new - centers) ** 2))


def lloyd_tolerance(x: np.ndarray, tol: float = 1e-4) -> float:
    """Convergence threshold on the squared centre shift: ``tol * mean per-feature variance``."""
    return float(tol * np.mean(np.var(x, axis=0)))
