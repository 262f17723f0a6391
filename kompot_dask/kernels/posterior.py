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
    "triangular_inverse",
    "inverse_from_cholesky",
    "lower_gram",
    "column_sq_norms",
    "noise_factor",
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


def cholesky_lower(a: np.ndarray, what: str, overwrite: bool = False) -> np.ndarray:
    """Lower Cholesky factor of the symmetric positive definite ``a`` (C-ordered).

    Reads the lower triangle of ``a`` (as :func:`numpy.linalg.cholesky` does) and calls
    LAPACK ``potrf`` on the array's memory as it lies (a C-ordered ``a`` is the Fortran
    ``aᵀ``: its upper factor ``U`` is ``Lᵀ``), so no transposed copy is made.
    ``overwrite=True`` lets a contiguous float64 ``a`` hold the factor (no copy at all).

    Raises
    ------
    FactorError
        With ``what`` named, when ``a`` is not positive definite (or not finite).
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{what} must be a square matrix; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise FactorError(_failure_message(what))
    if a.flags.c_contiguous:
        u, info = scipy.linalg.lapack.dpotrf(a.T, lower=0, clean=1, overwrite_a=int(overwrite))
        lower = u.T
    else:
        lower, info = scipy.linalg.lapack.dpotrf(np.asfortranarray(a), lower=1, clean=1,
                                                 overwrite_a=int(overwrite))
    if info != 0:
        raise FactorError(_failure_message(what))
    return np.ascontiguousarray(lower)


def _lapack_view(lower: np.ndarray) -> tuple[np.ndarray, bool, bool]:
    """``(array, is_lower, transposed)``: ``lower`` or its transpose, Fortran-ordered if possible."""
    if lower.flags.f_contiguous or not lower.flags.c_contiguous:
        return lower, True, False
    return lower.T, False, True


def _solve(lower: np.ndarray, b: np.ndarray, transpose: bool, overwrite: bool) -> np.ndarray:
    """BLAS ``trsm`` straight on the factor and a Fortran-ordered right-hand side (the
    LAPACK ``trtrs`` route of :func:`scipy.linalg.solve_triangular` calls the same ``trsm``
    after copying ``b`` and checking the diagonal, which a Cholesky factor never fails)."""
    arr, is_lower, flipped = _lapack_view(lower)
    b = np.asarray(b, dtype=np.float64)
    vector = b.ndim == 1
    rhs = b[:, None] if vector else b
    if not (overwrite and rhs.flags.f_contiguous and rhs.flags.writeable):
        rhs = np.array(rhs, order="F")
    if rhs.size:
        rhs = scipy.linalg.blas.dtrsm(1.0, arr, rhs, lower=int(is_lower), trans_a=int(transpose != flipped),
                                      overwrite_b=1)
    return rhs[:, 0] if vector else rhs


def solve_lower(lower: np.ndarray, b: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``L⁻¹ b`` for a lower-triangular ``L`` (no copy of ``L``); Fortran-ordered.

    ``overwrite=True`` lets a Fortran-ordered ``b`` hold the result (no copy of ``b``).
    """
    return _solve(lower, b, False, overwrite)


def solve_lower_t(lower: np.ndarray, b: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``L⁻ᵀ b`` for a lower-triangular ``L`` (no copy of ``L``); Fortran-ordered.

    ``overwrite=True`` lets a Fortran-ordered ``b`` hold the result (no copy of ``b``).
    """
    return _solve(lower, b, True, overwrite)


def gram(a: np.ndarray) -> np.ndarray:
    """``aᵀ a`` (numpy hands a product of an array with its own transpose to BLAS ``syrk``)."""
    return a.T @ a


def triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """``L⁻¹`` of a lower-triangular ``L`` (LAPACK ``trtri``: a third of the work of
    solving against the identity), lower-triangular, in the memory order of ``L``."""
    arr, is_lower, flipped = _lapack_view(lower)
    inv, info = scipy.linalg.lapack.dtrtri(arr, lower=int(is_lower))
    if info != 0:
        raise FactorError("a triangular factor is singular (a zero on its diagonal)")
    inv = inv.T if flipped else inv
    return np.tril(inv)


def inverse_from_cholesky(lower: np.ndarray) -> np.ndarray:
    """``(L Lᵀ)⁻¹`` (symmetric, C-ordered) of a C-ordered lower-triangular ``L`` with zeros
    above its diagonal (as :func:`cholesky_lower` returns it): LAPACK ``potri`` on ``Lᵀ``
    seen in Fortran order, which fills the lower triangle of the C-ordered result."""
    inv, info = scipy.linalg.lapack.dpotri(np.asarray(lower, dtype=np.float64).T, lower=0)
    if info != 0:
        raise FactorError("a Cholesky factor is singular (a zero on its diagonal)")
    return mirror_lower(inv.T)  # C-ordered: the inverse below the diagonal, L's zeros above it


def mirror_lower(a: np.ndarray, tile: int = 512) -> np.ndarray:
    """Copy the lower triangle of the square ``a`` onto its upper triangle, in place, and
    return ``a``: tile by tile, so both sides of each copy stay in cache (a whole
    ``a + a.T`` walks one of them a row per element and needs a second array)."""
    n = a.shape[0]
    for i in range(0, n, tile):
        for j in range(0, i, tile):
            a[j:j + tile, i:i + tile] = a[i:i + tile, j:j + tile].T
        block = a[i:i + tile, i:i + tile]
        upper = np.triu_indices(block.shape[0], 1)
        block[upper] = block.T[upper]
    return a


def lower_gram(lower: np.ndarray) -> np.ndarray:
    """``Lᵀ L`` (symmetric, C-ordered) of a lower-triangular ``L`` (LAPACK ``lauum``: a
    third of the work of a general ``aᵀa``)."""
    arr, is_lower, _ = _lapack_view(lower)
    # lower: lauum forms Lᵀ L in the lower triangle; flipped (arr = Lᵀ, upper): U Uᵀ = Lᵀ L
    # in the upper triangle.
    out, info = scipy.linalg.lapack.dlauum(arr, lower=int(is_lower))
    if info != 0:  # pragma: no cover - lauum reports only illegal arguments
        raise ValueError(f"LAPACK dlauum failed (info={info})")
    # the product's lower triangle (upper: its transpose's), C-ordered
    return mirror_lower(np.ascontiguousarray(out if is_lower else out.T))


def column_sq_norms(a: np.ndarray) -> np.ndarray:
    """``Σ_i a_ij²`` for every column ``j``."""
    return np.einsum("ij,ij->j", a, a)


def noise_factor(aat: np.ndarray, sigma2: float, what: str = "I + A Aᵀ / σ²") -> np.ndarray:
    """``LB = chol(I + A Aᵀ / σ²)`` of a landmark fit from its summed ``A Aᵀ`` (SPEC §3.3)."""
    b = np.array(aat, dtype=np.float64) / sigma2
    b[np.diag_indices_from(b)] += 1.0
    return cholesky_lower(b, what, overwrite=True)


def landmark_weights(lp: np.ndarray, lb: np.ndarray, a_r: np.ndarray, sigma2: float) -> np.ndarray:
    """``w = Lp⁻ᵀ LB⁻ᵀ LB⁻¹ (A R) / σ²`` (M × G), SPEC §3.3."""
    rhs = np.array(a_r, dtype=np.float64, order="F")
    rhs /= sigma2
    c = solve_lower(lb, rhs, overwrite=True)
    return solve_lower_t(lp, solve_lower_t(lb, c, overwrite=True), overwrite=True)


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
    d = triangular_inverse(lp)
    d *= jitter
    residual = lower_gram(d)
    residual *= -1.0
    residual[np.diag_indices(m)] += jitter
    projection = np.subtract(np.asarray(lp).T, d, out=d)
    return InducingShared(projection, residual)


def inducing_covariance(shared: InducingShared, lb: np.ndarray) -> np.ndarray:
    """DTC latent covariance at the inducing points: ``(K_UU − AᵀA) + CᵀC``, ``C = LB⁻¹ A``."""
    c = solve_lower(lb, shared.projection)
    return shared.residual + gram(c)
