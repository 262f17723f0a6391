"""Which GP a model uses and where its landmarks come from (SPEC §1.6-1.7)."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import numpy as np

from ..kernels import landmarks as km
from ..execution.plan import row_slices
from ..execution.reduce import open_reducer

__all__ = ["resolve_gp_type", "compute_landmarks", "resolve_inducing", "kmeans_landmarks"]

logger = logging.getLogger("kompot_dask")

MAX_AUTO_LANDMARKS = 5000
_SUPPORTED = ("full", "fixed", "sparse_cholesky")
_NYSTROEM = ("full_nystroem", "sparse_nystroem")


def resolve_gp_type(
    n: int, n_landmarks: int | None, landmarks: np.ndarray | None, gp_type: str | None
) -> tuple[str, int]:
    """Resolve ``(gp_type, n_landmarks)`` in the reference's order (SPEC §1.7)."""
    if gp_type is not None and gp_type not in _SUPPORTED:
        if gp_type in _NYSTROEM:
            msg = f"gp_type={gp_type!r} (Nystroem rank reduction) is not implemented; use 'fixed' or 'full'"
            raise NotImplementedError(msg)
        raise ValueError(f"unknown gp_type {gp_type!r}; choose one of {_SUPPORTED} or None")
    if landmarks is not None:
        m = len(landmarks)
    elif n_landmarks is not None:
        m = int(n_landmarks)
        if m < 0:
            raise ValueError(f"`n_landmarks` must be >= 0; got {n_landmarks}")
    elif gp_type in (None, "fixed"):
        m = min(n, MAX_AUTO_LANDMARKS)
    elif gp_type == "full":
        m = n
    else:
        m = MAX_AUTO_LANDMARKS
    if gp_type is None:
        gp_type = "full" if m >= n else "sparse_cholesky"
    return gp_type, m


def compute_landmarks(
    x: np.ndarray, gp_type: str, n_landmarks: int, random_state: Any
) -> np.ndarray | None:
    """Landmarks for a landmark-mode GP, or ``None`` for a full GP (SPEC §1.6)."""
    if gp_type == "full" or n_landmarks == 0:
        return None
    if n_landmarks == 1:
        raise ValueError("`n_landmarks` must be 0 (no landmarks) or at least 2; got 1")
    if n_landmarks >= len(x):
        if gp_type == "fixed":
            return np.array(x, dtype=np.float64, copy=True)
        return None
    return kmeans_landmarks(x, n_landmarks, random_state)


def resolve_inducing(
    x: np.ndarray, n_landmarks: int | None, landmarks: np.ndarray | None, gp_type: str | None, random_state: Any
) -> tuple[str, np.ndarray | None]:
    """The GP type and landmarks an estimator fits with (SPEC §1.7 steps 1-4).

    Returns ``(gp_type, landmarks)``; landmarks are None exactly for a full GP.
    """
    gp_type, m = resolve_gp_type(len(x), n_landmarks, landmarks, gp_type)
    if landmarks is None:
        landmarks = compute_landmarks(x, gp_type, m, random_state)
    if gp_type != "full" and landmarks is None:
        msg = f"gp_type={gp_type!r} needs landmarks, but n_landmarks={m} gives none; use gp_type='full'"
        raise ValueError(msg)
    return gp_type, landmarks


def kmeans_landmarks(
    x: np.ndarray,
    k: int,
    random_state: Any = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed_sample: int | None = None,
) -> np.ndarray:
    """k-means centroids: k-means++ seeding (on a sample of cells) and chunked Lloyd steps.

    Parameters
    ----------
    x : ndarray (n, D)
        Cell states.
    k : int
        Number of landmarks, ``2 <= k < n``.
    random_state : int, numpy Generator or None
        Seed. ``None`` is non-deterministic, as in the reference.
    max_iter, tol : int, float
        Lloyd stops after ``max_iter`` steps or when the squared centre shift is at most
        ``tol`` times the mean per-feature variance.
    seed_sample : int, optional
        Cells used for seeding (default ``max(20 k, 10000)``, capped at n).
    """
    rng = np.random.default_rng(random_state)
    n = len(x)
    size = min(n, seed_sample or max(20 * k, 10_000))
    sample = x if size == n else x[np.sort(rng.choice(n, size=size, replace=False))]
    centers = km.kmeans_plusplus(sample, k, rng)
    threshold = km.lloyd_tolerance(x, tol)
    steps, n_full = 0, 0
    with open_reducer([x[sl] for sl in row_slices(n, k)], "kmeans") as reducer:
        while steps < max_iter:
            shared = reducer.share((centers, km.half_gaps(centers)))
            sums, counts, full = reducer.reduce(lloyd_step, shared)
            reducer.release(shared)
            centers, shift = km.lloyd_update(centers, sums, counts)
            steps += 1
            n_full += int(full[0])
            if shift <= threshold:
                break
    logger.info("k-means: %d landmarks from %d cells, %d Lloyd steps (limit %d); %.1f%% of cell-to-all-centre "
                "distances computed", k, n, steps, max_iter, 100.0 * n_full / max(n * steps, 1))
    return centers


# Each chunk's Hamerly bounds from its previous Lloyd step, in the process holding the
# chunk, keyed by the chunk object's id (dropped when the chunk is). Only a speed-up: a
# chunk without bounds (first step, a new worker, a rerun) is assigned in full, to the
# same centres.
_BOUNDS: dict[int, tuple[weakref.ref, km.LloydBounds]] = {}


def _forget(key: int) -> None:
    _BOUNDS.pop(key, None)


def lloyd_step(x_chunk: np.ndarray, shared: tuple) -> tuple:
    """One chunk's part of a Lloyd step (a reducer term): per-centre sums, counts, cells in full."""
    centers, gaps = shared
    key = id(x_chunk)
    entry = _BOUNDS.get(key)
    bounds = entry[1] if entry is not None and entry[0]() is x_chunk else None
    sums, counts, bounds, n_full = km.lloyd_chunk_bounded(x_chunk, centers, gaps, bounds)
    try:
        _BOUNDS[key] = (weakref.ref(x_chunk, lambda _, key=key: _forget(key)), bounds)
    except TypeError:  # not weak-referenceable: no bounds kept
        pass
    return sums, counts, np.array([n_full])
