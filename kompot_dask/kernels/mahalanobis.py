"""Per-gene Mahalanobis distances between two conditions (SPEC §6.5).

``D_g = sqrt(Δ_gᵀ (Σ_g + eps I)⁻¹ Δ_g)`` with ``Δ_g`` (``p`` landmarks) the difference of
the condition means of gene ``g`` and ``Σ_g`` the summed posterior covariance, plus the
replicate (sample-variance) covariance ``Q_g Q_gᵀ`` and/or an empirical diagonal.

Every kernel takes a batch of genes (the last axis) and factors shared by all genes, so an
orchestration layer maps it over gene batches after one ``O(p³)`` Cholesky. With sample
variance the reference factorises one ``p×p`` matrix per gene (``O(G p³)`` time,
``O(G p²)`` memory); :func:`mahalanobis_woodbury` gives the same distances up to rounding
(tests: within 1e-8 relative of a per-gene dense solve) from the shared factor and the
rank-``S`` factor ``Q_g`` in ``O(p² S)`` per gene, never forming a ``p×p`` matrix per gene.

Branch names (``MahalanobisResult.branch``) are the ``BRANCH_*`` constants below.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.stats
from jax.scipy.linalg import solve_triangular

from .._jax import with_x64
from . import posterior

__all__ = [
    "BRANCH_WOODBURY", "BRANCH_DENSE", "BRANCH_DIAGONAL", "BRANCH_SHARED", "BRANCH_FACTOR_TRICK",
    "MahalanobisResult", "diag_ratio", "shared_cholesky", "cholesky_failed",
    "mahalanobis_shared", "mahalanobis_diagonal", "mahalanobis_factor_trick",
    "mahalanobis_woodbury", "mahalanobis_dense_reference", "sample_variance_factor",
    "concat_factors", "chi2_neg_log10_ptp", "select_branch", "branch_and_factor", "mahalanobis_distances",
]

BRANCH_WOODBURY = "gene_specific_woodbury"  # sample variance: exact low-rank form
BRANCH_DENSE = "gene_specific_dense"  # sample + empirical variance: per-gene Cholesky
BRANCH_DIAGONAL = "diagonal"  # nearly diagonal Σ, p > 10 (eps is a floor)
BRANCH_SHARED = "shared_cholesky"  # one Cholesky of Σ + eps I
BRANCH_FACTOR_TRICK = "shared_factor_trick"  # shared Cholesky + empirical-variance approx.
BRANCHES = (BRANCH_WOODBURY, BRANCH_DENSE, BRANCH_DIAGONAL, BRANCH_SHARED, BRANCH_FACTOR_TRICK)
SHARED_BRANCHES = (BRANCH_SHARED, BRANCH_FACTOR_TRICK, BRANCH_WOODBURY)  # one Cholesky of Σ + eps I for all genes

DIAGONAL_RATIO = 0.95
DIAGONAL_MIN_POINTS = 10


class MahalanobisResult(NamedTuple):
    """Per-gene distances and the §6.5 branch that produced them.

    Attributes
    ----------
    distances : numpy.ndarray
        ``(G,)`` float64 distances; ``NaN`` where a Cholesky failed.
    branch : str
        One of the ``BRANCH_*`` constants.
    """

    distances: np.ndarray
    branch: str


def _cholesky_jitter(sigma: np.ndarray, eps: float) -> np.ndarray:
    """``chol(Σ + eps I)`` in LAPACK; all NaN when it fails (JAX's convention, kept)."""
    a = np.array(sigma, dtype=np.float64)
    a[np.diag_indices_from(a)] += eps
    try:
        return posterior.cholesky_lower(a, "Σ + eps I", overwrite=True)
    except posterior.FactorError:
        return np.full_like(a, np.nan)


def _shared(lower: np.ndarray, delta: np.ndarray) -> np.ndarray:
    z = posterior.solve_lower(lower, np.asfortranarray(delta))
    return np.sqrt(posterior.column_sq_norms(z))


@jax.jit
def _diagonal(sigma_diag, delta, eps):
    return jnp.sqrt(jnp.sum(delta * delta / jnp.maximum(sigma_diag, eps)[:, None], axis=0))


@jax.jit
def _factor_trick(lower, delta, v):
    eye = jnp.eye(lower.shape[0], dtype=lower.dtype)
    inv = solve_triangular(lower, eye, lower=True)
    z = inv @ delta
    m = 1.0 + (inv * inv) @ v
    return jnp.sqrt(jnp.sum(z * z / m, axis=0))


def _woodbury(lower: np.ndarray, delta: np.ndarray, q: np.ndarray) -> np.ndarray:
    p, s, g = q.shape
    # One BLAS triangular solve for [Δ, Q] of all genes in the batch: (p, G + S*G) right-hand
    # sides, Q's laid out gene by gene (Fortran order), so Y = L⁻¹ Q is a view of the result.
    rhs = np.empty((p, g * (s + 1)), order="F")
    rhs[:, :g] = delta
    rhs[:, g:].reshape((p, s, g), order="F")[...] = q
    sol = posterior.solve_lower(lower, rhs, overwrite=True)
    z, y_mat = sol[:, :g], sol[:, g:].reshape((p, s, g), order="F")
    y = np.einsum("psg,pg->gs", y_mat, z)
    gram = np.einsum("psg,ptg->gst", y_mat, y_mat)
    gram[:, np.arange(s), np.arange(s)] += 1.0
    u = np.linalg.solve(gram, y[:, :, None])[:, :, 0]  # (I + YᵀY) ⪰ I: well conditioned
    # r = (I + Y Yᵀ)⁻¹ z, and D² = zᵀ r = |r|² + |Yᵀ r|²: a sum of squares, no cancellation.
    r = z - np.einsum("psg,gs->pg", y_mat, u)
    yr = np.einsum("psg,pg->gs", y_mat, r)
    return np.sqrt(np.einsum("pg,pg->g", r, r) + np.einsum("gs,gs->g", yr, yr))


def _as_f64(x, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        msg = f"`{name}` must be a {ndim}-D array; got shape {arr.shape}"
        raise ValueError(msg)
    return arr


def _check(delta, square, square_name, q=None, v=None):
    """Validate shapes once; return float64 numpy arrays ``(delta, square, q, v)``."""
    square = _as_f64(square, square_name, 2)
    p = square.shape[0]
    if square.shape != (p, p):
        msg = f"`{square_name}` must be square (landmarks x landmarks); got shape {square.shape}"
        raise ValueError(msg)
    delta = _as_f64(delta, "delta", 2)
    if delta.shape[0] != p:
        msg = (f"`delta` must have one row per landmark ({p}, from `{square_name}` "
               f"{square.shape}); got shape {delta.shape}. Pass delta as (landmarks, genes).")
        raise ValueError(msg)
    g = delta.shape[1]
    if q is not None:
        q = _as_f64(q, "q", 3)
        if q.shape[0] != p or q.shape[2] != g:
            msg = (f"`q` must have shape (landmarks={p}, samples, genes={g}) to match `delta`; "
                   f"got {q.shape}. Build it with sample_variance_factor().")
            raise ValueError(msg)
    if v is not None:
        v = _as_f64(v, "empirical_var", 2)
        if v.shape != delta.shape:
            msg = f"`empirical_var` must have the shape of `delta` {delta.shape}; got {v.shape}"
            raise ValueError(msg)
    return delta, square, q, v


def diag_ratio(sigma) -> float:
    """Return ``trace(Σ) / Σ_ab |Σ_ab|``, the nearly-diagonal branch selector of §6.5."""
    sigma = np.asarray(sigma, dtype=np.float64)
    step = max(1, 2**20 // max(sigma.shape[1], 1))  # row blocks of ~8 MB: no full-size |Σ| temporary
    total = sum(float(np.abs(sigma[i:i + step]).sum()) for i in range(0, sigma.shape[0], step))
    return float(np.trace(sigma) / total)


@with_x64
def shared_cholesky(sigma, eps: float) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``Σ + eps I``, shared by all genes.

    Parameters
    ----------
    sigma : array_like
        ``(p, p)`` summed posterior covariance ``Σ1 + Σ2``.
    eps : float
        Diagonal jitter (the reference's ``eps``, 1e-8 by default).

    Returns
    -------
    numpy.ndarray
        ``(p, p)``; all ``NaN`` when ``Σ + eps I`` is not positive definite (the
        convention of the reference's JAX) — test with :func:`cholesky_failed`.
    """
    sigma = _as_f64(sigma, "sigma", 2)
    return _cholesky_jitter(sigma, float(eps))


def cholesky_failed(lower) -> bool:
    """Return True when a Cholesky factor holds non-finite values (factorisation failed)."""
    return not bool(np.all(np.isfinite(lower)))


@with_x64
def mahalanobis_shared(lower, delta) -> np.ndarray:
    """Exact distances ``D_g = |L⁻¹ Δ_g|`` for a shared covariance (branch 3).

    Parameters
    ----------
    lower, delta : array_like
        ``(p, p)`` :func:`shared_cholesky` factor and ``(p, G)`` mean differences.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` distances.
    """
    delta, lower, _, _ = _check(delta, lower, "lower")
    return _shared(lower, delta)


@with_x64
def mahalanobis_diagonal(sigma_diag, delta, eps: float) -> np.ndarray:
    """Nearly-diagonal shortcut ``D_g = sqrt(Σ_a Δ_ga² / max(Σ_aa, eps))`` (branch 2).

    QUIRK (SPEC §6.5, §10.8): ``eps`` is a floor, not added, and the empirical diagonal
    is ignored, as in the reference.

    Parameters
    ----------
    sigma_diag, delta : array_like
        ``(p,)`` diagonal of ``Σ`` and ``(p, G)`` mean differences.
    eps : float
        Floor on ``Σ_aa``.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` distances.
    """
    sigma_diag = _as_f64(sigma_diag, "sigma_diag", 1)
    delta, _, _, _ = _check(delta, np.diag(sigma_diag), "sigma_diag")
    return np.asarray(_diagonal(jnp.asarray(sigma_diag), jnp.asarray(delta), float(eps)))


@with_x64
def mahalanobis_factor_trick(lower, delta, v) -> np.ndarray:
    """Reference approximation for a shared covariance plus an empirical diagonal.

    With ``z = L⁻¹ Δ_g``, ``W = (L⁻¹)∘(L⁻¹)`` and ``m_g = 1 + W v_g``:
    ``D_g = sqrt(Σ_a z_ga² / m_ga)``. QUIRK (§10.9): not the exact ``(Σ + diag v_g)⁻¹``.

    Parameters
    ----------
    lower, delta : array_like
        ``(p, p)`` :func:`shared_cholesky` factor and ``(p, G)`` mean differences.
    v : array_like
        ``(p, G)`` empirical diagonal ``max(ν1, eps) + max(ν2, eps)``.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` distances.
    """
    delta, lower, _, v = _check(delta, lower, "lower", v=v)
    return np.asarray(_factor_trick(jnp.asarray(lower), jnp.asarray(delta), jnp.asarray(v)))


@with_x64
def mahalanobis_woodbury(lower, delta, q) -> np.ndarray:
    """Exact sample-variance distances from the shared factor (Woodbury identity).

    ``D_g² = Δ_gᵀ (L Lᵀ + Q_g Q_gᵀ)⁻¹ Δ_g = |z_g|² − y_gᵀ (I_S + Y_gᵀ Y_g)⁻¹ y_g`` with
    ``z_g = L⁻¹ Δ_g``, ``Y_g = L⁻¹ Q_g``, ``y_g = Y_gᵀ z_g``, evaluated as the sum of
    squares ``|r_g|² + |Y_gᵀ r_g|²``, ``r_g = z_g − Y_g (I + Y_gᵀY_g)⁻¹ y_g``: one
    triangular solve with ``G (S + 1)`` right-hand sides and ``G`` small ``S×S`` Choleskys.

    Parameters
    ----------
    lower, delta : array_like
        ``(p, p)`` factor of ``Σ + eps I`` and ``(p, G)`` mean differences.
    q : array_like
        ``(p, S, G)`` scaled factor (:func:`sample_variance_factor`, :func:`concat_factors`).

    Returns
    -------
    numpy.ndarray
        ``(G,)`` distances.
    """
    delta, lower, q, _ = _check(delta, lower, "lower", q=q)
    return _woodbury(lower, delta, q)


def mahalanobis_dense_reference(sigma, delta, q, eps: float, empirical_var=None) -> np.ndarray:
    """Reference branch 1: a dense Cholesky of ``Σ + Q_gQ_gᵀ [+ diag v_g] + eps I`` per gene.

    ``O(p³)`` per gene (the baseline for tests and benchmarks); a gene whose matrix is not
    positive definite gets ``NaN``, as in the reference.

    Parameters
    ----------
    sigma, delta : array_like
        ``(p, p)`` shared covariance and ``(p, G)`` mean differences.
    q : array_like or None
        ``(p, S, G)`` scaled sample-variance factor.
    eps : float
        Diagonal jitter.
    empirical_var : array_like, optional
        ``(p, G)`` empirical diagonal.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` distances.
    """
    delta, sigma, q, v = _check(delta, sigma, "sigma", q=q, v=empirical_var)
    base = sigma + eps * np.eye(sigma.shape[0])
    out = np.full(delta.shape[1], np.nan)
    for g in range(delta.shape[1]):
        cov = base.copy() if q is None else base + q[:, :, g] @ q[:, :, g].T
        if v is not None:
            cov[np.diag_indices_from(cov)] += v[:, g]
        try:
            low = scipy.linalg.cholesky(cov, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        z = scipy.linalg.solve_triangular(low, delta[:, g], lower=True, check_finite=False)
        out[g] = np.sqrt(z @ z)
    return out


def sample_variance_factor(per_sample_means, reduced: bool = False) -> np.ndarray:
    """Low-rank factor of one condition's replicate covariance (§4.3, Bessel ``S−1``).

    Parameters
    ----------
    per_sample_means : array_like, (S, p, G)
        Each replicate's predicted mean at the ``p`` evaluation points.
    reduced : bool, default False
        Return the factor of the same covariance with ``S − 1`` columns: the centred
        predictions have rank ``S − 1``. With ``D`` the differences ``m_i − m_S`` (i < S),
        ``Σ_s (m_s − m̄)(m_s − m̄)ᵀ = D (I − 11ᵀ/S) Dᵀ``, so ``Q = D R`` with
        ``R Rᵀ = (I − 11ᵀ/S) / (S − 1)``. :func:`mahalanobis_woodbury` then solves one
        column fewer per gene.

    Returns
    -------
    numpy.ndarray, (p, S, G) or (p, S − 1, G)
        ``Q`` with ``Q_g Q_gᵀ = C_g``: the centred predictions over ``sqrt(S−1)``, or the
        reduced factor.
    """
    means = _as_f64(per_sample_means, "per_sample_means", 3)
    s = means.shape[0]
    if s < 2:
        msg = f"`per_sample_means` needs at least 2 samples on axis 0; got shape {means.shape}"
        raise ValueError(msg)
    if reduced:
        diffs = means[:-1] - means[-1]
        root = np.linalg.cholesky((np.eye(s - 1) - 1.0 / s) / (s - 1))
        return np.ascontiguousarray(np.einsum("ipg,ij->pjg", diffs, root))
    centred = (means - means.mean(axis=0, keepdims=True)) / math.sqrt(s - 1)
    return np.ascontiguousarray(np.moveaxis(centred, 0, 1))


def concat_factors(*factors) -> np.ndarray:
    """Stack conditions' factors ``[Q1, Q2]`` along the sample axis: ``Q Qᵀ = C1 + C2``.

    Pass the same factor twice for the reference's single-condition fallback (§6.5).
    """
    return np.concatenate([_as_f64(f, "factors", 3) for f in factors], axis=1)


def chi2_neg_log10_ptp(distances, df: int) -> np.ndarray:
    """``−ln χ²_sf(D², df) / ln 10`` in float64 log space (``logsf``, never ``1 − cdf``).

    QUIRK: the reference passes ``df = D`` (cell-state dimension), not ``p``. NaN stays NaN.
    """
    d = np.asarray(distances, dtype=np.float64)
    return -scipy.stats.chi2.logsf(d * d, df) / np.log(10.0)


def select_branch(p: int, ratio: float, sample_variance: bool, empirical_variance: bool) -> str:
    """Branch logic of SPEC §6.5 for ``p`` points and :func:`diag_ratio` ``ratio``."""
    if sample_variance:
        return BRANCH_DENSE if empirical_variance else BRANCH_WOODBURY
    if p > DIAGONAL_MIN_POINTS and ratio > DIAGONAL_RATIO:
        return BRANCH_DIAGONAL
    return BRANCH_FACTOR_TRICK if empirical_variance else BRANCH_SHARED


def branch_and_factor(sigma, eps: float, sample_variance: bool, empirical_variance: bool) -> tuple[str, np.ndarray | None]:
    """The §6.5 branch of ``Σ`` and, for a shared branch, ``shared_cholesky(Σ, eps)`` (else None):
    made once and handed to :func:`mahalanobis_distances` for every gene batch."""
    sigma = np.asarray(sigma, dtype=np.float64)
    branch = select_branch(len(sigma), diag_ratio(sigma), sample_variance, empirical_variance)
    return branch, (shared_cholesky(sigma, eps) if branch in SHARED_BRANCHES else None)


def mahalanobis_distances(delta, sigma, eps: float = 1e-8, q=None, empirical_var=None, lower=None):
    """Per-gene distances with the reference's branch choice (SPEC §6.5), all in memory.

    Sample variance uses the exact Woodbury form; with empirical variance as well there is
    no shared factorisation, so it falls back to the per-gene dense Cholesky (reference
    branch 1, ``O(G p³)``). If ``Σ + eps I`` is not positive definite the shared branches
    give all ``NaN`` (as the reference); with sample variance the dense per-gene path is
    used instead, since ``Σ_g`` may still be positive definite. Both warn.

    Parameters
    ----------
    delta : array_like, (p, G)
        ``μ2 − μ1`` at the evaluation points.
    sigma : array_like, (p, p), or None
        ``Σ1 + Σ2``. None with a ``lower`` that did not fail (:func:`branch_and_factor`):
        the shared branches need only the factor.
    eps : float, default 1e-8
    q : array_like, (p, S, G), optional
        Sample-variance factor.
    empirical_var : array_like, (p, G), optional
        Empirical diagonal ``max(ν1, eps) + max(ν2, eps)``.
    lower : array_like, (p, p), optional
        ``shared_cholesky(sigma, eps)`` computed once elsewhere (gene batches share it).

    Returns
    -------
    MahalanobisResult
    """
    if sigma is None:  # a shared factor given alone: its branch follows from q and v
        if lower is None or cholesky_failed(lower):
            raise ValueError("`sigma` may be left out only with a `lower` factor that did not fail")
        delta, lower, q, v = _check(delta, lower, "lower", q=q, v=empirical_var)
        branch = BRANCH_WOODBURY if q is not None else BRANCH_FACTOR_TRICK if v is not None else BRANCH_SHARED
        if q is not None and v is not None:
            raise ValueError("sample and empirical variance together need `sigma` (the per-gene dense branch)")
        result = _dispatch(delta, None, eps, q, v, branch, lower)
    else:
        delta, sigma, q, v = _check(delta, sigma, "sigma", q=q, v=empirical_var)
        branch = select_branch(sigma.shape[0], diag_ratio(sigma), q is not None, v is not None)
        result = _dispatch(delta, sigma, eps, q, v, branch, lower)
    dist = np.where(np.isfinite(result.distances), result.distances, np.nan)
    bad = int(np.sum(np.isnan(dist)))
    if bad:
        hint = ("the Cholesky of Σ + eps I failed (not positive definite); increase `eps`"
                if result.branch in (BRANCH_SHARED, BRANCH_FACTOR_TRICK) and bad == dist.size
                else "kept as NaN")
        warnings.warn(f"{bad} of {dist.size} Mahalanobis distances are not finite (branch "
                      f"{result.branch!r}): {hint}", RuntimeWarning, stacklevel=2)
    return MahalanobisResult(dist, result.branch)


def _dispatch(delta, sigma, eps, q, v, branch, lower=None) -> MahalanobisResult:
    if branch == BRANCH_DIAGONAL:
        return MahalanobisResult(mahalanobis_diagonal(np.diag(sigma), delta, eps), branch)
    if branch == BRANCH_DENSE:
        return MahalanobisResult(mahalanobis_dense_reference(sigma, delta, q, eps, v), branch)
    lower = shared_cholesky(sigma, eps) if lower is None else np.asarray(lower, dtype=np.float64)
    if cholesky_failed(lower):
        if q is None:  # JAX gives NaN silently; the reference's distances are all NaN
            return MahalanobisResult(np.full(delta.shape[1], np.nan), branch)
        warnings.warn("Cholesky of Σ + eps I failed; falling back to one dense Cholesky "
                      "per gene (O(G p³))", RuntimeWarning, stacklevel=3)
        return MahalanobisResult(mahalanobis_dense_reference(sigma, delta, q, eps), BRANCH_DENSE)
    if branch == BRANCH_WOODBURY:
        return MahalanobisResult(mahalanobis_woodbury(lower, delta, q), branch)
    if branch == BRANCH_FACTOR_TRICK:
        return MahalanobisResult(mahalanobis_factor_trick(lower, delta, v), branch)
    return MahalanobisResult(mahalanobis_shared(lower, delta), branch)
