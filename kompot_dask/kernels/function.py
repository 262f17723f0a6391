"""Gaussian-process regression of many genes at once (SPEC §3): the JAX kernels.

Landmark (DTC) mode is fitted from two sums over cell chunks, ``A Aᵀ`` (M x M) and
``A (Y - mu)`` (M x G) with ``A = Lp⁻¹ K_UX``; everything after them is landmark-sized
algebra, which runs on fitted numpy factors in :mod:`.posterior` (LAPACK). Genes are
right-hand sides of one factorisation, so any gene batch is a column slice of the
weights. What stays here: the posterior mean, the leverage of the empirical-variance
surface (§3.5) and its HC3 residuals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from .covariance import matern52

__all__ = [
    "full_factor",
    "predict_mean",
    "kernel_times",
    "leverage_factor",
    "landmark_leverage",
    "full_training_leverage",
    "hc3_squared_residuals",
]


@jax.jit
def full_factor(x, ls, noise):
    """``Lf = chol(K_XX + noise I)`` of a full GP."""
    k = matern52(x, x, ls)
    return jnp.linalg.cholesky(k + noise * jnp.eye(k.shape[0], dtype=k.dtype))


def predict_mean(xq, inducing, weights, mu, ls) -> np.ndarray:
    """Posterior mean ``mu + K_{x Z} w`` at query cells (n x G), a numpy array.

    The kernel is JAX's; the product runs in the host's BLAS ``dgemm``, like the other
    landmark-sized algebra (:mod:`.posterior`), and returns a numpy array for the caller.
    """
    return kernel_times(np.asarray(matern52(xq, inducing, ls)), weights, mu)


def kernel_times(k: np.ndarray, weights, mu) -> np.ndarray:
    """``mu + k @ weights`` for a kernel block ``k`` (n x m) already on the host."""
    out = k @ np.asarray(weights, dtype=np.float64)
    out += mu
    return out


@jax.jit
def leverage_factor(lp, aat, sigma2, jitter):
    """``chol(sigma^2 Lp Lp^T + K_UX K_XU + jitter I)`` for landmark-mode leverage (§3.5).

    ``K_UX K_XU = Lp (A A^T) Lp^T``.
    """
    m = sigma2 * (lp @ lp.T) + lp @ aat @ lp.T
    return jnp.linalg.cholesky(m + jitter * jnp.eye(m.shape[0], dtype=m.dtype))


@jax.jit
def landmark_leverage(xq, inducing, lm, ls):
    """Hat-matrix diagonal ``K_xU Mm^-1 K_Ux`` at cells ``xq``."""
    b = solve_triangular(lm, matern52(inducing, xq, ls), lower=True)
    return jnp.sum(b * b, axis=0)


@jax.jit
def full_training_leverage(x, ls, sigma2, jitter):
    """Full-GP leverage at the training cells: ``1 - sigma^2 [(K + (sigma^2 + j) I)^-1]_ii``."""
    lh = full_factor(x, ls, sigma2 + jitter)
    inv = solve_triangular(lh, jnp.eye(lh.shape[0], dtype=lh.dtype), lower=True)
    return 1.0 - sigma2 * jnp.sum(inv * inv, axis=0)


@jax.jit
def hc3_squared_residuals(y, fitted, leverage):
    """HC3 (leave-one-out) corrected squared residuals ``(y - f)^2 / (1 - h)^2``."""
    return (y - fitted) ** 2 / (1.0 - leverage[:, None]) ** 2
