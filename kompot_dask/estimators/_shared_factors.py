"""Landmark-sized results that fitted function models of one process share (never pickled).

Both conditions of a differential-expression run, and every per-sample model of its sample
variance, use the same landmarks, length scale and jitter, hence the same
``Lp = chol(K_UU + jI)`` (SPEC §3.3) — and, given ``Lp``, the same projection
``A = Lp⁻¹ K_{U x}`` of any cells and the same model-independent part of the covariance at
the landmarks. Computing them once instead of once per model is exact (the same numbers).

* :func:`prior_factor`: ``Lp``, looked up by the content of the landmarks and ``(ls, jitter)``;
  models fitted in this process while an earlier ``Lp`` is alive get that very array.
* :func:`cell_projection`: ``A`` and ``k** − ‖A‖²`` of the last block of cells asked for on
  a given ``Lp`` (one entry per thread, up to one block of M × cells: condition 2 asks for
  the block condition 1 just did). Cells that a fit on this ``Lp`` trained on and kept
  (:func:`keep_projections`) take their columns of ``A`` from that fit instead of a solve.
* :func:`inducing_terms`: :func:`~kompot_dask.kernels.posterior.inducing_shared` of the last
  ``Lp`` asked for (one entry per process, dropped with its ``Lp``).
* :func:`inducing_kernel`: ``K_UU`` of the last ``Lp`` asked for (likewise).
* :func:`scaled_inverse`: ``j² P⁻¹`` of the last ``Lp`` asked for (likewise), for fits whose
  cells are landmarks (:func:`~kompot_dask.kernels.cell_basis.fit_at_landmarks`).

Entries refer to their ``Lp`` weakly: nothing here keeps a model's arrays alive, except the
last :func:`inducing_terms` result (two M×M arrays) and :func:`inducing_kernel` result (one)
while their ``Lp`` lives.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any, Callable

import numpy as np

from ..kernels import covariance as cov
from ..kernels import posterior as post
from ._kept_projections import KeptProjections, project, projections

__all__ = ["prior_factor", "cell_projection", "keep_projections", "inducing_terms", "inducing_kernel",
           "scaled_inverse", "digest"]

_LOCK = threading.RLock()  # re-entrant: a finalizer below may run (garbage collection) while it is held
_PRIORS: dict[tuple, weakref.ref] = {}
_LOCAL = threading.local()
_INDUCING: dict[str, Any] = {}
_KEPT: dict[int, list[tuple[weakref.ref, weakref.ref]]] = {}  # id(Lp): (Lp, KeptProjections), both weakly


def digest(arr: np.ndarray) -> tuple:
    """Content key of an array: shape, dtype and a 128-bit BLAKE2 digest of its bytes."""
    a = np.ascontiguousarray(arr)
    return a.shape, a.dtype.str, hashlib.blake2b(a.view(np.uint8).reshape(-1), digest_size=16).hexdigest()


def prior_factor(inducing: np.ndarray, ls: float, jitter: float, what: str = "K_UU + jitter*I",
                 keep_kernel: bool = False) -> np.ndarray:
    """``Lp = chol(K_UU + jitter I)`` of the Matérn-5/2 kernel on ``inducing`` (shared, do not modify).

    ``what`` names the matrix in the error raised when it is not positive definite.
    ``keep_kernel``: a factor computed here leaves its ``K_UU`` to :func:`inducing_kernel`
    (a fit in the cells' basis asks for it at the landmarks).

    Raises
    ------
    kompot_dask.kernels.posterior.FactorError
        When ``K_UU + jitter I`` is not positive definite.
    """
    key = (digest(inducing), float(ls), float(jitter))
    with _LOCK:
        ref = _PRIORS.get(key)
        lp = None if ref is None else ref()
    if lp is not None:
        return lp
    k = np.array(cov.matern52(inducing, inducing, ls))
    diagonal = np.diagonal(k).copy()
    k[np.diag_indices_from(k)] += jitter
    lp = post.cholesky_lower(k, what, overwrite=not keep_kernel)  # kept: potrf works on a copy
    lp.setflags(write=False)  # shared by every model fitted on these landmarks
    with _LOCK:
        _PRIORS[key] = weakref.ref(lp, _dropper(_PRIORS, key))
    if keep_kernel:
        k[np.diag_indices_from(k)] = diagonal
        _keep_kernel(lp, ls, k)
    return lp


def _dropper(table: dict, key: Any) -> Callable[[weakref.ref], None]:
    def drop(ref: weakref.ref) -> None:
        with _LOCK:
            if table.get(key) is ref:
                del table[key]

    return drop


def cell_projection(x: np.ndarray, inducing: np.ndarray, lp: np.ndarray, ls: float) -> tuple[np.ndarray, np.ndarray]:
    """``(A, k** − ‖A‖²)`` with ``A = Lp⁻¹ K_{U x}`` (M × n) for the cells ``x``.

    The last result of this thread is reused when the same cells are asked for on the same
    ``Lp`` (the second condition of a block); the caller must not modify it. Cells kept by a
    fit on ``lp`` (:func:`keep_projections`) are not solved for again.
    """
    key = (id(lp), digest(x), float(ls))
    last = getattr(_LOCAL, "last", None)
    if last is not None and last[0] == key and last[1]() is lp:
        return last[2]
    kept = _kept_for(lp)
    if kept:
        a = projections(x, len(inducing), kept, lambda rows: project(x[rows], inducing, lp, ls))
    else:
        a = project(x, inducing, lp, ls)
    base = np.asarray(cov.matern52_diag(x, ls)) - post.column_sq_norms(a)
    a.setflags(write=False)
    base.setflags(write=False)
    _LOCAL.last = (key, weakref.ref(lp), (a, base))
    return a, base


def keep_projections(lp: np.ndarray, kept: KeptProjections) -> None:
    """Let :func:`cell_projection` on ``lp`` read the columns of ``A`` that a fit on ``lp``
    kept for its training cells. ``kept`` is referenced weakly: its predictor owns it."""
    with _LOCK:
        entries = [(r, k) for r, k in _KEPT.get(id(lp), []) if r() is lp and k() is not None]
        if not entries:
            weakref.finalize(lp, _forget_kept, id(lp))
        entries.append((weakref.ref(lp), weakref.ref(kept)))
        _KEPT[id(lp)] = entries


def _kept_for(lp: np.ndarray) -> list[KeptProjections]:
    with _LOCK:
        found = [k() for r, k in _KEPT.get(id(lp), []) if r() is lp]
    return [k for k in found if k is not None]


def _forget_kept(key: int) -> None:
    with _LOCK:
        entries = [(r, k) for r, k in _KEPT.get(key, []) if r() is not None]
        if entries:
            _KEPT[key] = entries
        else:
            _KEPT.pop(key, None)


def inducing_terms(lp: np.ndarray, jitter: float) -> post.InducingShared:
    """:func:`~kompot_dask.kernels.posterior.inducing_shared` of ``lp``, computed once per ``Lp``."""
    key = (id(lp), float(jitter))
    with _LOCK:
        last = _INDUCING.get("last")
        if last is not None and last[0] == key and last[1]() is lp:
            return last[2]
    terms = post.inducing_shared(lp, jitter)
    for arr in terms:
        arr.setflags(write=False)
    with _LOCK:
        _INDUCING["last"] = (key, weakref.ref(lp), terms)
    weakref.finalize(lp, _forget_inducing, key)
    return terms


def inducing_kernel(inducing: np.ndarray, lp: np.ndarray, ls: float) -> np.ndarray:
    """``K_UU`` (without the jitter) of the landmarks of ``lp``, computed once per ``Lp``.

    The covariance at the landmarks of both conditions and the means there all need it;
    the last one asked for is kept (one M×M array) while its ``Lp`` lives.
    """
    key = ("kernel", id(lp), float(ls))
    with _LOCK:
        last = _INDUCING.get("kernel")
        if last is not None and last[0] == key and last[1]() is lp:
            return last[2]
    return _keep_kernel(lp, ls, np.array(cov.matern52(inducing, inducing, ls)))


def scaled_inverse(lp: np.ndarray, jitter: float) -> np.ndarray:
    """``j² P⁻¹`` of ``Lp = chol(P)``, ``P = K_UU + jI`` (symmetric, entries of the order of
    ``j``), computed once per ``Lp``: LAPACK ``potri`` (``2 M³/3`` operations), for every fit
    on these landmarks whose cells are landmarks. ``Lp`` is as :func:`prior_factor` makes
    it (:func:`~kompot_dask.kernels.posterior.cholesky_lower`: zeros above the diagonal)."""
    key = ("inverse", id(lp), float(jitter))
    with _LOCK:
        last = _INDUCING.get("inverse")
        if last is not None and last[0] == key and last[1]() is lp:
            return last[2]
    out = post.inverse_from_cholesky(lp)
    out *= jitter * jitter
    out.setflags(write=False)
    with _LOCK:
        _INDUCING["inverse"] = (key, weakref.ref(lp), out)
    weakref.finalize(lp, _forget_inducing, key, "inverse")
    return out


def _keep_kernel(lp: np.ndarray, ls: float, k: np.ndarray) -> np.ndarray:
    key = ("kernel", id(lp), float(ls))
    k.setflags(write=False)
    with _LOCK:
        _INDUCING["kernel"] = (key, weakref.ref(lp), k)
    weakref.finalize(lp, _forget_inducing, key, "kernel")
    return k


def _forget_inducing(key: tuple, slot: str = "last") -> None:
    with _LOCK:
        last = _INDUCING.get(slot)
        if last is not None and last[0] == key:
            del _INDUCING[slot]
