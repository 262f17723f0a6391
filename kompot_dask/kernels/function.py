"""Gaussian-process regression of many genes at once (SPEC §3).

Landmark (DTC) mode is fitted from two sums over cell chunks, ``K_UX K_XU`` (M x M) and
``K_UX (Y - mu)`` (M x G); everything after them is landmark-sized algebra. Genes are
right-hand sides of one factorisation, so any gene batch is a column slice of the
weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from .covariance import matern52, matern52_diag

__all__ = [
    "chunk_projected_stats",
    "chunk_projected_cross",
    "landmark_noise_factor",
    "landmark_weights",
    "full_factor",
    "full_weights",
    "predict_mean",
    "landmark_cov_diag",
    "landmark_cov_full",
    "full_cov_diag",
    "full_cov_full",
    "leverage_factor",
    "landmark_leverage",
    "full_training_leverage",
    "hc3_squared_residuals",
]


@jax.jit
def chunk_projected_stats(xc, inducing, lp, ls, rc):
    """``(A_c A_c^T, A_c R_c)`` of one chunk, with ``A_c = Lp^-1 K_Uc`` (M x c).

    Summed over chunks these are ``A A^T`` and ``A R`` of SPEC §3.3. Projecting each
    chunk by a triangular solve first (rather than forming ``K_UX K_XU`` and solving on
    both sides) keeps the conditioning of ``Lp`` from being squared.
    """
    a = solve_triangular(lp, matern52(inducing, xc, ls), lower=True)
    return a @ a.T, a @ rc


@jax.jit
def chunk_projected_cross(xc, inducing, lp, ls, rc):
    """``A_c R_c`` of one chunk (a second pass with new right-hand sides)."""
    return solve_triangular(lp, matern52(inducing, xc, ls), lower=True) @ rc


@jax.jit
def landmark_noise_factor(aat, sigma2):
    """``LB = chol(I + A A^T / sigma^2)``."""
    return jnp.linalg.cholesky(jnp.eye(aat.shape[0], dtype=aat.dtype) + aat / sigma2)


@jax.jit
def landmark_weights(lp, lb, a_r, sigma2):
    """``w = Lp^-T LB^-T LB^-1 (A R) / sigma^2`` (M x G)."""
    c = solve_triangular(lb, a_r / sigma2, lower=True)
    return solve_triangular(lp.T, solve_triangular(lb.T, c, lower=False), lower=False)


@jax.jit
def full_factor(x, ls, noise):
    """``Lf = chol(K_XX + noise I)`` of a full GP."""
    k = matern52(x, x, ls)
    return jnp.linalg.cholesky(k + noise * jnp.eye(k.shape[0], dtype=k.dtype))


@jax.jit
def full_weights(lf, r):
    """``w = (Lf Lf^T)^-1 R``."""
    return solve_triangular(lf.T, solve_triangular(lf, r, lower=True), lower=False)


@jax.jit
def predict_mean(xq, inducing, weights, mu, ls):
    """Posterior mean ``mu + K_{x Z} w`` at query cells (n x G)."""
    return mu + matern52(xq, inducing, ls) @ weights


@jax.jit
def landmark_cov_diag(xq, inducing, lp, lb, ls):
    """DTC latent variance ``k** - |Lp^-1 K_U*|^2 + |LB^-1 Lp^-1 K_U*|^2``."""
    a = solve_triangular(lp, matern52(inducing, xq, ls), lower=True)
    c = solve_triangular(lb, a, lower=True)
    return matern52_diag(xq, ls) - jnp.sum(a * a, axis=0) + jnp.sum(c * c, axis=0)


@jax.jit
def landmark_cov_full(xq, inducing, lp, lb, ls):
    """DTC latent covariance ``K** - As^T As + Cc^T Cc`` at query cells."""
    a = solve_triangular(lp, matern52(inducing, xq, ls), lower=True)
    c = solve_triangular(lb, a, lower=True)
    return matern52(xq, xq, ls) - a.T @ a + c.T @ c


@jax.jit
def full_cov_diag(xq, x, lf, ls):
    """Full-GP latent variance ``k** - |Lf^-1 K_X*|^2``."""
    b = solve_triangular(lf, matern52(x, xq, ls), lower=True)
    return matern52_diag(xq, ls) - jnp.sum(b * b, axis=0)


@jax.jit
def full_cov_full(xq, x, lf, ls):
    """Full-GP latent covariance ``K** - B^T B`` at query cells."""
    b = solve_triangular(lf, matern52(x, xq, ls), lower=True)
    return matern52(xq, xq, ls) - b.T @ b


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
