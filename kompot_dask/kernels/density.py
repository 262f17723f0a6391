"""Gaussian-process log density with a nearest-neighbour likelihood (SPEC §2).

The latent log density at training cells is ``f = L z + mu`` with ``L = Phi T``:
landmark mode ``Phi = K_XU`` (a cells x landmarks block, computed per chunk) and
``T = Lp^-T``; full mode ``Phi = Lp`` and ``T = I``. Everything that touches all cells
is a per-chunk term of ``Phi`` summed over chunks:

* loss and gradient: ``sum_i (f_i + Vd_i - e_i)`` and ``Phi^T (1 - e)``;
* ridge initial value: ``L_c^T L_c`` and ``L_c^T t``;
* Laplace Hessian diagonal: ``(L_c**2)^T e``;

with ``e = exp(f + V)`` and the factor block ``L_c = Phi_c T`` formed per chunk by a
triangular solve (never for all cells at once). Combining the sums is landmark-sized.
The per-chunk terms that only multiply stored blocks, the ridge system and the predictive
variances run on numpy factors (``estimators._density_terms``, :mod:`.posterior`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from .covariance import matern52

__all__ = [
    "chunk_loglik_grad",
    "cells_loglik_grad",
    "laplace_std",
    "predict_covariance",
    "predict_mean_covariance",
]

_LOG_2PI = float(jnp.log(2.0 * jnp.pi))


@jax.jit
def chunk_loglik_grad(phi, w, mu, v, vd):
    """One chunk's log-likelihood sum and its gradient with respect to ``w = T z``.

    Returns ``(sum_i f_i + Vd_i - exp(f_i + V_i), Phi^T (1 - exp(f + V)))``.
    """
    f = phi @ w + mu
    e = jnp.exp(f + v)
    return jnp.sum(f + vd - e), phi.T @ (1.0 - e)


SUB_ROWS = 256


@functools.partial(jax.jit, static_argnames=("sub_rows",))
def cells_loglik_grad(xc, inducing, ls, w, mu, v, vd, sub_rows=SUB_ROWS):
    """:func:`chunk_loglik_grad` with ``Phi = K(xc, U)`` formed ``sub_rows`` rows at a time.

    The kernel block of a sub-block stays in cache between ``Phi w`` and ``Phi^T (1 - e)``,
    so recomputing it costs less than streaming a stored ``c x M`` block twice (about 3x
    less than forming the whole block first), and memory stays ``sub_rows x M``. The rows
    are padded to whole sub-blocks; padded rows carry zero weight.
    """
    c, dim = xc.shape
    pad = (-c) % sub_rows
    mask = jnp.concatenate([jnp.ones(c, xc.dtype), jnp.zeros(pad, xc.dtype)])
    xp = jnp.concatenate([xc, jnp.broadcast_to(xc[:1], (pad, dim))])
    vp = jnp.concatenate([v, jnp.zeros(pad, v.dtype)])
    vdp = jnp.concatenate([vd, jnp.zeros(pad, vd.dtype)])
    blocks = (
        xp.reshape(-1, sub_rows, dim),
        vp.reshape(-1, sub_rows),
        vdp.reshape(-1, sub_rows),
        mask.reshape(-1, sub_rows),
    )

    def step(carry, block):
        xb, vb, vdb, mb = block
        k = matern52(xb, inducing, ls)
        f = k @ w + mu
        e = jnp.exp(f + vb) * mb
        return (carry[0] + jnp.sum((f + vdb) * mb - e), carry[1] + k.T @ (mb - e)), None

    start = (jnp.zeros((), w.dtype), jnp.zeros(inducing.shape[0], w.dtype))
    (loglik, grad), _ = jax.lax.scan(step, start, blocks)
    return loglik, grad


def loss_value(z, loglik_sum):
    """``0.5 |z|^2 + (m/2) ln 2 pi - loglik``: the negative log posterior of SPEC §2.4.

    In numpy: an eager ``jnp.dot`` would be compiled once per length of ``z`` (0.1-0.3 s each).
    """
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * float(z @ z) + 0.5 * z.shape[0] * _LOG_2PI - float(loglik_sum)


def laplace_std(hessian_data_diag):
    """``s_j = 1 / sqrt(max(1 + H_data_jj, 1e-8))`` (SPEC §2.7), in numpy (no compile per length)."""
    return 1.0 / np.sqrt(np.maximum(1.0 + np.asarray(hessian_data_diag, dtype=np.float64), 1e-8))


@jax.jit
def predict_covariance(xq, inducing, lp, ls):
    """Full conditional covariance ``K_** - B^T B`` at query cells."""
    b = solve_triangular(lp, matern52(inducing, xq, ls), lower=True)
    return matern52(xq, xq, ls) - b.T @ b


@jax.jit
def predict_mean_covariance(xq, inducing, lp, s, ls):
    """Full propagated parameter covariance ``C C^T`` with ``C = B^T diag(s)``."""
    c = solve_triangular(lp, matern52(inducing, xq, ls), lower=True).T * s[None, :]
    return c @ c.T
