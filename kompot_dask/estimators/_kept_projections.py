"""Projections of training cells on the landmarks that a fit computed, kept for its predictions.

A landmark fit solves ``a(x) = Lp⁻¹ k_U(x)`` (M values) for every training cell ``x``: the
function fit forms ``A = Lp⁻¹ K_UX`` for ``A Aᵀ`` and ``A R``, the density fit the rows of
``L = K_XU Lp⁻ᵀ``. The per-cell variances ask for the same vectors again when the query
cells are the training cells (``da()`` and ``de()`` predict at every cell of the atlas):
``M²`` operations per cell and model. :class:`KeptProjections` holds a fit's vectors, one row
per cell, and finds them again by the cells' coordinates (the bytes of their float64 rows,
as :func:`~kompot_dask.estimators.function.point_rows` matches cells to landmarks);
:func:`projections` assembles a block's vectors from them and solves only for cells no fit
kept.

The vectors are the ones the fit computed, so a kept cell's variance equals a recomputed one
up to the rounding of a triangular solve over a different set of right-hand sides.
Predictors hold their fit's :class:`KeptProjections` in the process that fitted them and drop
it when pickled (a worker solves as before). A fit keeps them (:func:`reserve`) only while
all the vectors kept in this process, its own included, take at most the
``factor_rows_bytes`` option; they are freed with the last predictor holding them.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Sequence

import numpy as np

from ..execution.cluster import active_client
from ..kernels import covariance as cov
from ..kernels import posterior as post
from ..options import get_options

__all__ = ["KeptProjections", "project", "projections", "reserve", "kept_bytes", "planned_bytes"]

_LOCK = threading.RLock()  # re-entrant: _release may run (garbage collection) while it is held
_LIVE = [0]  # bytes reserved by live KeptProjections of this process


def reserve(nbytes: int) -> "KeptProjections | None":
    """An empty :class:`KeptProjections` for ``nbytes`` of vectors, or None when those and
    the vectors already kept in this process would take more than ``factor_rows_bytes``, or
    when a ``distributed.Client`` is active (predictions then run on its workers, which get
    pickled models: this process would hold the vectors for nothing)."""
    if active_client() is not None:
        return None
    limit = get_options()["factor_rows_bytes"]
    with _LOCK:
        if _LIVE[0] + nbytes > limit:
            return None
        _LIVE[0] += nbytes
    kept = KeptProjections()
    weakref.finalize(kept, _release, nbytes)
    return kept


def planned_bytes(fits: Sequence[tuple[int, int]]) -> int:
    """Bytes that landmark fits of ``(cells, landmarks)``, made in this order in this process,
    would keep under the ``factor_rows_bytes`` option (counting none kept before them; none
    with an active ``distributed.Client``, as :func:`reserve`)."""
    if active_client() is not None:
        return 0
    limit, total = get_options()["factor_rows_bytes"], 0
    for cells, landmarks in fits:
        need = 8 * int(cells) * int(landmarks)
        if total + need <= limit:
            total += need
    return total


def kept_bytes() -> int:
    """Bytes reserved by the :class:`KeptProjections` alive in this process."""
    return _LIVE[0]


def _release(nbytes: int) -> None:
    with _LOCK:
        _LIVE[0] -= nbytes


class KeptProjections:
    """The vectors ``Lp⁻¹ k_U(x)`` of a fit's training cells, found by the cells' coordinates."""

    def __init__(self) -> None:
        self._blocks: list[tuple[dict[bytes, int], np.ndarray]] = []

    def add(self, cells: np.ndarray, rows: np.ndarray) -> None:
        """Keep ``rows`` (cells × M, row ``i`` the vector of ``cells[i]``; C-ordered, not copied)."""
        if rows.shape[0] != len(cells) or not rows.flags.c_contiguous:
            raise ValueError(f"rows {rows.shape} must be C-ordered, one per cell of {len(cells)}")
        index = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(cells, dtype=np.float64))}
        self._blocks.append((index, rows))

    @property
    def nbytes(self) -> int:
        """Bytes of the kept vectors."""
        return sum(rows.nbytes for _, rows in self._blocks)

    def __len__(self) -> int:
        return sum(len(index) for index, _ in self._blocks)

    def fill(self, keys: Sequence[bytes], out: np.ndarray, missing: np.ndarray) -> None:
        """Copy the vectors of the cells with ``keys`` into the rows of ``out`` where ``missing``
        is True, and set ``missing`` False there."""
        for index, rows in self._blocks:
            todo = np.flatnonzero(missing)
            if not todo.size:
                return
            found = np.fromiter((index.get(keys[i], -1) for i in todo), dtype=np.intp, count=todo.size)
            hit = found >= 0
            if hit.any():
                out[todo[hit]] = rows[found[hit]]
                missing[todo[hit]] = False


def project(x: np.ndarray, inducing: np.ndarray, lp: np.ndarray, ls: float) -> np.ndarray:
    """``Lp⁻¹ K_Ux`` (M × n, Fortran-ordered) of the cells ``x``: the Matérn-5/2 kernel
    block against the landmarks ``inducing`` and one LAPACK triangular solve in its memory."""
    return post.solve_lower(lp, np.asfortranarray(cov.matern52(inducing, x, ls)), overwrite=True)


def projections(x: np.ndarray, m: int, kept: Sequence[KeptProjections],
                solve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``Lp⁻¹ K_Ux`` as an ``(M × n)`` Fortran-ordered array (the layout of a triangular
    solve's result): from the vectors in ``kept`` where they hold the cell, and from
    ``solve(rows)`` (the caller's solve for the cells ``x[rows]``, ``M × len(rows)``) for
    the others.
    """
    keys = [row.tobytes() for row in np.ascontiguousarray(x, dtype=np.float64)]
    out = np.empty((len(keys), m))
    missing = np.ones(len(keys), dtype=bool)
    for k in kept:
        k.fill(keys, out, missing)
    rest = np.flatnonzero(missing)
    if rest.size:
        out[rest] = solve(rest).T
    return out.T
