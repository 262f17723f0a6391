"""The density fit's per-chunk terms (SPEC §2.4-2.7).

The latent log density at training cells is ``f = Phi T z + mu`` (SPEC §2.3): landmark
mode ``Phi_c = K(X_c, U)`` and ``T = Lp^-T``; full mode ``Phi_c`` = rows of ``Lp`` and
``T = I``. Every O(n) quantity of the fit is a sum over cell chunks of a term that needs
only that chunk (:class:`DensityChunk`) and the landmark-sized :class:`Prior`:

* :func:`gram_rhs`: the ridge start's ``L_c^T L_c`` and ``L_c^T t``;
* :func:`loglik_grad`: one evaluation of the objective, ``sum_i f_i + Vd_i - e_i`` and
  ``Phi_c^T (1 - e)``;
* :func:`hessian_diag`: the Laplace diagonal ``(L_c**2)^T e``.

A landmark chunk may carry its rows ``L_c = K_cU Lp⁻ᵀ`` (:func:`with_factor_rows`, when
they fit in memory): it is then a full-mode chunk with ``Phi_c = L_c`` and ``T = I``.

A reducer (:mod:`kompot_dask.execution.reduce`) sums one of them over all chunks, here or on a dask cluster.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._jax import with_x64
from ..kernels import density as dk
from ..kernels import posterior as post
from ._kept_projections import project

__all__ = ["DensityChunk", "Prior", "gram_rhs", "loglik_grad", "hessian_diag", "with_factor_rows"]


class DensityChunk(NamedTuple):
    """The training data of one chunk of cells."""

    x: np.ndarray | None  # (c, D) cell states (landmark mode)
    phi: np.ndarray | None  # (c, m) rows of Lp (full mode)
    v: np.ndarray  # (c,) likelihood offsets V
    vd: np.ndarray  # (c,) likelihood constants Vd
    target: np.ndarray  # (c,) ridge target t = mle - mu


class Prior(NamedTuple):
    """Landmark-sized state shared by every chunk."""

    inducing: np.ndarray | None  # (m, D) landmarks; None for a full GP
    lp: np.ndarray  # (m, m) chol(K_UU + jitter I)
    ls: float


def _factor_rows(chunk: DensityChunk, prior: Prior) -> np.ndarray:
    """``L_c`` (c × m): the chunk's rows of ``Lp`` (full mode) or ``K_cU Lp⁻ᵀ`` (landmarks)."""
    if chunk.phi is not None:
        return np.asarray(chunk.phi)
    return project(chunk.x, prior.inducing, prior.lp, prior.ls).T


@with_x64
def with_factor_rows(chunk: DensityChunk, prior: Prior) -> DensityChunk:
    """A landmark chunk carrying its factor rows ``L_c = K_cU Lp⁻ᵀ`` as ``phi``.

    Every term then reads ``phi`` instead of evaluating the kernel, and the objective
    takes ``w = z`` (``K_cU Lp⁻ᵀ z = L_c z``): the fit's form with ``T = I``.
    """
    return chunk._replace(phi=_factor_rows(chunk, prior), x=None)


@with_x64
def gram_rhs(chunk: DensityChunk, prior: Prior) -> tuple:
    """``(L_c^T L_c, L_c^T t_c)`` of one chunk."""
    lc = _factor_rows(chunk, prior)
    return post.gram(lc), lc.T @ chunk.target


@with_x64
def loglik_grad(chunk: DensityChunk, prior: Prior, w: np.ndarray, mu: float) -> tuple:
    """One chunk's log-likelihood sum and ``Phi_c^T (1 - e)`` at weights ``w = T z``.

    Full mode multiplies the chunk's rows of ``Lp`` in numpy: two matrix-vector products
    that stream the block once each, where a jitted call would first copy the block into
    a JAX buffer (measured 25 ms against 150 ms for 2,500 cells).
    """
    if chunk.phi is not None:
        phi = np.asarray(chunk.phi)
        f = phi @ w + mu
        e = np.exp(f + chunk.v)
        return np.asarray(np.sum(f + chunk.vd - e)), phi.T @ (1.0 - e)
    return tuple(np.asarray(p) for p in dk.cells_loglik_grad(chunk.x, prior.inducing, prior.ls, w, mu, chunk.v,
                                                             chunk.vd))


@with_x64
def hessian_diag(chunk: DensityChunk, prior: Prior, z: np.ndarray, mu: float) -> tuple:
    """``(L_c**2)^T exp(f_c + V_c)``: one chunk's part of the Laplace diagonal."""
    lc = _factor_rows(chunk, prior)
    e = np.exp(lc @ z + mu + chunk.v)
    return ((lc * lc).T @ e,)
