"""Landmark-sized algebra of the function GP on fitted factors, on the host's LAPACK/BLAS.

The kernel matrices are JAX (:mod:`.covariance`); the triangular solves, products and
factorisations that follow them run here on numpy arrays through scipy's LAPACK/BLAS. Two
measured reasons (2-core EPYC, OpenBLAS, JAX 0.10 on CPU, ``benchmarks/stages.py``): a
triangular solve of a 100-cell block against 5,000 landmarks runs at about 5 GFLOP/s
through XLA and at about 17 through LAPACK, and a numpy factor passed to a jitted function
is copied into a JAX buffer on every call (200 MB at 5,000 landmarks).

Factors are lower-triangular numpy arrays in either memory order; a solve hands LAPACK
whichever of the factor and its transpose is Fortran-ordered, so a factor is never copied.

Posterior variance (SPEC §3.3), with ``A = Lp⁻¹ K_{U*}`` and ``C = LB⁻¹ A``::

    v(x) = k(x, x) - ‖A_x‖² + ‖C_x‖²

At the inducing points themselves ``K_UU = Lp Lpᵀ − jI`` gives ``A = Lpᵀ − j Lp⁻¹``, so
``K_UU − AᵀA = jI − j² (K_UU + jI)⁻¹`` exactly: one triangular inverse shared by every
model with the same landmarks, length scale and jitter replaces a solve and a product per
model (:func:`inducing_shared`, :func:`inducing_covariance`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg

__all__ = [
    "FactorError",
    "cholesky_lower",
    "solve_lower",
    "solve_lower_t",
    "gram",
    "column_sq_norms",
    "landmark_weights",
    "landmark_variance",
    "landmark_covariance",
    "full_variance",
    "full_covariance",
    "InducingShared",
    "inducing_shared",
    "inducing_covariance",
]


class FactorError(ValueError):
    """A Cholesky factorisation failed: the matrix is not positive definite."""


def _failure_message(what: str) -> str:
    return (
        f"the Cholesky factorisation of {what} failed (matrix not positive definite); "
        "increase `jitter`, or check for duplicated landmarks and a length scale that is "
        "not tiny compared with the distances between cells"
    )


def cholesky_lower(a: np.ndarray, what: str) -> np.ndarray:
    """Lower Cholesky factor of the symmetric positive definite ``a`` (C-ordered).

    Raises
    ------
    FactorError
        With ``what`` named, when ``a`` is not positive definite (or not finite).
    """
    try:
        return np.linalg.cholesky(np.asarray(a, dtype=np.float64))
    except np.linalg.LinAlgError as err:
        raise FactorError(_failure_message(what)) from err


def _lapack_view(lower: np.ndarray) -> tuple[np.ndarray, bool, bool]:
    """``(array, is_lower, transposed)``: ``lower`` or its transpose, Fortran-ordered if possible."""
    if lower.flags.f_contiguous or not lower.flags.c_contiguous:
        return lower, True, False
    return lower.T, False, True


def _solve(lower: np.ndarray, b: np.ndarray, transpose: bool) -> np.ndarray:
    arr, is_lower, flipped = _lapack_view(lower)
    trans = "T" if transpose != flipped else "N"
    return scipy.linalg.solve_triangular(arr, b, trans=trans, lower=is_lower, check_finite=False)


def solve_lower(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``L⁻¹ b`` for a lower-triangular ``L`` (no copy of ``L``)."""
    return _solve(lower, b, transpose=False)


def solve_lower_t(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``L⁻ᵀ b`` for a lower-triangular ``L`` (no copy of ``L``)."""
    return _solve(lower, b, transpose=True)


def gram(a: np.ndarray) -> np.ndarray:
    """``aᵀ a`` (numpy hands a product of an array with its own transpose to BLAS ``syrk``)."""
    return a.T @ a


def column_sq_norms(a: np.ndarray) -> np.ndarray:
    """``Σ_i a_ij²`` for every column ``j``."""
    return np.einsum("ij,ij->j", a, a)


def landmark_weights(lp: np.ndarray, lb: np.ndarray, a_r: np.ndarray, sigma2: float) -> np.ndarray:
    """``w = Lp⁻ᵀ LB⁻ᵀ LB⁻¹ (A R) / σ²`` (M × G), SPEC §3.3."""
    c = solve_lower(lb, np.asarray(a_r, dtype=np.float64) / sigma2)
    return solve_lower_t(lp, solve_lower_t(lb, c))


def landmark_variance(k_diag: np.ndarray, a: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """DTC latent variance ``k** − ‖A‖² + ‖LB⁻¹ A‖²`` of cells with projections ``A`` (M × n)."""
    c = solve_lower(lb, a)
    return k_diag - column_sq_norms(a) + column_sq_norms(c)


def landmark_covariance(k_xx: np.ndarray, a: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """DTC latent covariance ``K** − AᵀA + CᵀC`` (``C = LB⁻¹ A``) at cells with projections ``A``."""
    c = solve_lower(lb, a)
    return k_xx - gram(a) + gram(c)


def full_variance(k_diag: np.ndarray, k_train_x: np.ndarray, lf: np.ndarray) -> np.ndarray:
    """Full-GP latent variance ``k** − ‖Lf⁻¹ K_{X*}‖²``."""
    return k_diag - column_sq_norms(solve_lower(lf, k_train_x))


def full_covariance(k_xx: np.ndarray, k_train_x: np.ndarray, lf: np.ndarray) -> np.ndarray:
    """Full-GP latent covariance ``K** − BᵀB``, ``B = Lf⁻¹ K_{X*}``."""
    return k_xx - gram(solve_lower(lf, k_train_x))


class InducingShared(NamedTuple):
    """What every model on the same ``Lp`` shares at its own inducing points."""

    projection: np.ndarray  # A = Lp⁻¹ K_UU = Lpᵀ − j Lp⁻¹ (M × M)
    residual: np.ndarray  # K_UU − AᵀA = jI − j² (K_UU + jI)⁻¹ (M × M)


def inducing_shared(lp: np.ndarray, jitter: float) -> InducingShared:
    """The model-independent part of the posterior covariance at the inducing points.

    ``Lp = chol(K_UU + jI)``. Exact rearrangements of ``A = Lp⁻¹ K_UU`` and ``K_UU − AᵀA``
    (module docstring); the second is formed as ``jI − DᵀD`` with ``D = j Lp⁻¹``, entries
    of size at most ``j``, so nothing of order one cancels.
    """
    m = lp.shape[0]
    d = solve_lower(lp, np.eye(m))
    d *= jitter
    residual = gram(d)
    residual *= -1.0
    residual[np.diag_indices(m)] += jitter
    projection = np.subtract(np.asarray(lp).T, d, out=d)
    return InducingShared(projection, residual)


def inducing_covariance(shared: InducingShared, lb: np.ndarray) -> np.ndarray:
    """DTC latent covariance at the inducing points: ``(K_UU − AᵀA) + CᵀC``, ``C = LB⁻¹ A``."""
    c = solve_lower(lb, shared.projection)
    return shared.residual + gram(c)
