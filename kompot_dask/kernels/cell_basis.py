"""The landmark (DTC) posterior of SPEC §3.3 written in the training cells' basis.

With ``P = K_UU + jI = Lp Lpᵀ``, ``A = Lp⁻¹ K_UX`` (M × c) and the push-through identity
``(I + A Aᵀ/σ²)⁻¹ A = A (σ² I + Aᵀ A)⁻¹ σ²``, every landmark-sized solve of §3.3 becomes a
cell-sized one::

    Lc = chol(σ² I + Aᵀ A)                                     (c × c)
    z  = (σ² I + Aᵀ A)⁻¹ (Y − mu),  w = P⁻¹ K_UX z = G z      (G = Lp⁻ᵀ A, M × c)
    v(x*) = k** − ‖A_*‖² + ‖LB⁻¹ A_*‖² = k** − ‖Lc⁻¹ Gᵀ k_U*‖²

since ``‖A_*‖² − ‖LB⁻¹A_*‖² = A_*ᵀ A (σ² I + AᵀA)⁻¹ Aᵀ A_*`` and ``Aᵀ A_* = Gᵀ k_U*``. At
the landmarks themselves ``Gᵀ K_UU = K_XU − j Gᵀ`` (because ``P⁻¹ K_UU = I − j P⁻¹``), so
the covariance there is ``K_UU − SᵀS`` with ``S = Lc⁻¹ Eᵀ``, ``E = K_UX − j G``: one ``c² M``
solve and one ``M² c`` product, no product with ``K_UU``.

The means at the landmarks themselves need no weights: ``K_UU w = E z`` (:func:`inducing_mean`),
``2 M c G`` operations instead of ``G z`` and ``K_UU w``. ``E`` is kept with the fit, so
neither the means nor the covariance at the landmarks evaluate a kernel.

When a condition has fewer cells ``c`` than landmarks ``M`` (Kompot's DE default of 5,000
landmarks on an atlas of up to 5,000 cells, two conditions), this replaces the ``M³/3``
Cholesky and three ``M² G`` solves of the fit by a ``c³/3`` Cholesky, ``2 c² G`` of solves
and one ``2 M c G`` product, and the covariance at the landmarks (two ``M³`` solves and
products per model) by ``c² M + M² c``. The results are the landmark posterior's, up to
rounding (:func:`fit_flops` says which form a fit is cheaper in).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import posterior as post

__all__ = ["CellBasis", "fit_flops", "fit", "landmark_terms", "fit_at_landmarks", "with_g", "weights", "inducing_mean", "variance", "covariance",
           "inducing_covariance"]


class CellBasis(NamedTuple):
    """A landmark fit's factors in its training cells' basis (§3.3 rewritten; module docstring)."""

    cells: np.ndarray  # (c, D) training cells X
    lc: np.ndarray  # chol(σ² I + AᵀA), (c × c)
    g: np.ndarray  # G = Lp⁻ᵀ A = P⁻¹ K_UX, (M × c), Fortran-ordered
    z: np.ndarray  # (σ² I + AᵀA)⁻¹ (Y − mu), (c × G): the weights are w = G z
    e: np.ndarray  # E = K_UX − j G = K_UU G, (M × c), Fortran-ordered: the landmarks' terms
    rows: np.ndarray | None = None  # the cells' landmark rows (fit_at_landmarks): G is None until with_g


def fit_flops(m: int, c: int, g: int) -> tuple[float, float]:
    """``(landmark form, cell form)`` floating-point operations of a landmark fit.

    ``m`` landmarks, ``c`` training cells, ``g`` target columns; both count the projection
    ``A = Lp⁻¹ K_UX`` (``m² c``). The landmark form: ``A Aᵀ``, ``A R``, ``chol`` and three
    solves. The cell form: ``AᵀA``, ``chol``, two solves for ``z``, ``G = Lp⁻ᵀ A``,
    and ``G z``.
    """
    landmark = m * m * c + m * m * c + 2.0 * m * c * g + m**3 / 3 + 3.0 * m * m * g
    cell = m * m * c + c * c * m + c**3 / 3 + 2.0 * c * c * g + m * m * c + 2.0 * m * c * g
    return landmark, cell


def fit(lp: np.ndarray, k_ux: np.ndarray, r: np.ndarray, sigma2: float, jitter: float,
        cells: np.ndarray) -> CellBasis:
    """The :class:`CellBasis` of a landmark fit (its weights are :func:`weights`).

    ``lp = chol(K_UU + jitter I)``, ``k_ux = K_UX`` (M × c, overwritten when
    Fortran-ordered), ``r = Y − mu`` (c × G, overwritten when Fortran-ordered), ``sigma2``
    the noise variance.

    Raises
    ------
    kompot_dask.kernels.posterior.FactorError
        When ``σ² I + AᵀA`` is not positive definite (a non-finite kernel or target).
    """
    e = np.array(k_ux, dtype=np.float64, order="F")  # K_UX, kept: E = K_UX − j G below
    a = post.solve_lower(lp, k_ux, overwrite=True)
    s = post.gram(a)
    s[np.diag_indices_from(s)] += sigma2
    lc = post.cholesky_lower(s, "σ² I + Aᵀ A", overwrite=True)
    del s
    z = post.solve_lower_t(lc, post.solve_lower(lc, r, overwrite=True), overwrite=True)
    g = post.solve_lower_t(lp, a, overwrite=True)  # G = Lp⁻ᵀ A = P⁻¹ K_UX, in A's memory
    e -= jitter * g
    return CellBasis(np.asarray(cells, dtype=np.float64), lc, g, z, e)


def landmark_terms(k_uu: np.ndarray, scaled_inverse: np.ndarray, rows: np.ndarray,
                   jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """``(E, AᵀA)`` of the cells ``U[rows]``: ``(K_UU − jI + J)[:, rows]`` (M × c, Fortran-ordered)
    and ``(K_UU − jI + J)[rows, rows]`` (c × c, C-ordered), ``J = j² P⁻¹`` (:func:`fit_at_landmarks`)."""
    rows = np.asarray(rows, dtype=np.intp)
    e = (k_uu[rows] + scaled_inverse[rows]).T  # symmetric: the columns k, Fortran-ordered
    e[rows, np.arange(len(rows))] -= jitter
    return e, e[rows].T.copy(order="C")


def fit_at_landmarks(k_uu: np.ndarray, scaled_inverse: np.ndarray, rows: np.ndarray, r: np.ndarray, sigma2: float,
                     jitter: float, cells: np.ndarray) -> CellBasis:
    """:func:`fit` for cells that are landmarks (``cells = U[rows]``), with no solve against ``Lp``.

    ``K_UU P⁻¹ = I − j P⁻¹`` gives, with ``J = j² P⁻¹`` (``scaled_inverse``, shared by every
    fit on these landmarks) and ``k = rows``::

        E    = K_UX − j G  = (K_UU − jI + J)[:, k]
        G    = P⁻¹ K_UX    = (I − J / j)[:, k]
        AᵀA  = K_XU P⁻¹ K_UX = (K_UU − jI + J)[k, k]

    so the fit costs the ``c³/3`` Cholesky and ``2 c² G`` of solves for ``z`` only, where
    :func:`fit` also spends ``2 M² c + M c²`` on ``A``, ``AᵀA`` and ``G``. (``AᵀA`` has the
    eigenvalues ``λ² / (λ + j)`` of ``K_UU``'s ``λ``: positive semi-definite.) ``G`` is needed
    only off the landmarks (weights, variances there): it is left out, and :func:`with_g`
    adds it.
    """
    rows = np.asarray(rows, dtype=np.intp)
    e, s = landmark_terms(k_uu, scaled_inverse, rows, jitter)
    s[np.diag_indices_from(s)] += sigma2
    lc = post.cholesky_lower(s, "σ² I + Aᵀ A", overwrite=True)
    del s
    z = post.solve_lower_t(lc, post.solve_lower(lc, r, overwrite=True), overwrite=True)
    return CellBasis(np.asarray(cells, dtype=np.float64), lc, None, z, e, rows)


def with_g(basis: CellBasis, scaled_inverse: np.ndarray, jitter: float) -> CellBasis:
    """``basis`` with ``G = (I − j P⁻¹)[:, rows]`` of a :func:`fit_at_landmarks` fit (as it is otherwise)."""
    if basis.g is not None:
        return basis
    rows = basis.rows
    g = (scaled_inverse[rows] * (-1.0 / jitter)).T
    g[rows, np.arange(len(rows))] += 1.0
    return basis._replace(g=g)


def weights(basis: CellBasis) -> np.ndarray:
    """The landmark weights ``w = G z`` (M × G) of SPEC §3.3: ``mu + K_xU w`` is the mean."""
    return basis.g @ basis.z


def inducing_mean(basis: CellBasis, rows=slice(None), genes=None) -> np.ndarray:
    """``K_{U_r U} w`` at the landmarks ``U_r = U[rows]``, without the weights.

    ``K_UU P⁻¹ = I − j P⁻¹`` gives ``K_UU w = K_UX z − j G z = E z``: one product with
    ``c`` (not ``M``) inner terms, and no kernel to evaluate.
    """
    z = basis.z if genes is None else basis.z[:, genes]
    return basis.e[rows] @ z


def _reduced(basis: CellBasis, k_uq: np.ndarray) -> np.ndarray:
    """``Lc⁻¹ Gᵀ k_U*`` (c × n); ``(k_U*ᵀ G)ᵀ`` is Fortran-ordered, so the solve copies nothing."""
    return post.solve_lower(basis.lc, (k_uq.T @ basis.g).T, overwrite=True)


def variance(k_diag: np.ndarray, basis: CellBasis, k_uq: np.ndarray) -> np.ndarray:
    """DTC latent variance ``k** − ‖Lc⁻¹ Gᵀ k_U*‖²`` of query cells with kernel block ``k_uq`` (M × n)."""
    return k_diag - post.column_sq_norms(_reduced(basis, k_uq))


def covariance(k_qq: np.ndarray, basis: CellBasis, k_uq: np.ndarray) -> np.ndarray:
    """DTC latent covariance ``K** − TᵀT``, ``T = Lc⁻¹ Gᵀ K_U*``, at query cells."""
    out = post.gram(_reduced(basis, k_uq))
    return np.subtract(k_qq, out, out=out)


def inducing_covariance(k_uu: np.ndarray, basis: CellBasis) -> np.ndarray:
    """DTC latent covariance at the landmarks: ``K_UU − SᵀS``, ``S = Lc⁻¹ Eᵀ = Lc⁻¹ (K_XU − j Gᵀ)``."""
    out = post.gram(post.solve_lower(basis.lc, basis.e.T))
    return np.subtract(k_uu, out, out=out)
