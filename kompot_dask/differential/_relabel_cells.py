"""The relabelling null's fits in the training cells' basis (many landmarks, few cells).

The landmark form (:mod:`._relabel_graph`) fits every pseudo-condition from per-sample
sums ``A W Aᵀ`` (M × M) and ``A W (Y − mu)`` (M × G): one ``M³/3`` Cholesky, two
``M² p`` solves and one ``M p²`` product per pseudo-condition. With Kompot's DE default
of 5,000 landmarks on an atlas of 5,000 cells, each pseudo-condition has fewer cells than
there are landmarks, and the push-through identity of :mod:`kompot_dask.kernels.cell_basis`
moves every solve into the cells' basis. With ``Ã = Lp⁻¹ K_UX W^½`` over all ``n`` cells
of both conditions, ``H = ÃᵀÃ`` (n × n) and ``F = A_Pᵀ Ã`` (p × n, ``A_P = Lp⁻¹ K_UP``),
a pseudo-condition made of the cells ``k`` has::

    C_k   = σ² I + H[k, k]                          (c × c, Cholesky Lc_k)
    mean  = mu + F[:, k] C_k⁻¹ W_k^½ (Y_k − mu)      at the evaluation points
    cov   = K_PP − S_kᵀ S_k,   S_k = Lc_k⁻¹ F[:, k]ᵀ

(``‖A_P‖² − ‖LB⁻¹A_P‖²`` of the landmark form is ``A_Pᵀ Ã C⁻¹ Ãᵀ A_P``). At the
landmarks themselves ``F = (K_UX − j Lp⁻ᵀ A) W^½``, the model's own ``E`` (no product
with ``A_P``). A relabelling then costs ``c³/3 + c² p + p² c`` per pseudo-condition and its
mean differences ``2 p n G``, once ``H`` and ``F`` are made (``n² M + n M²``, for all
relabellings). A sample's own fit (sample variance) is the same with its cells alone.

:func:`cheaper` compares the operation counts of both forms; the graph of
:mod:`._relabel_graph` takes this one's tasks when it says so. The numbers are the
landmark form's up to rounding (``tests/test_replicate_tasks.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._jax import with_x64
from ..estimators._inputs import read_rows
from ..estimators import _shared_factors as shared
from ..estimators.function import point_rows, same_points
from ..execution.plan import cell_chunk_rows
from ..kernels import cell_basis as cb
from ..kernels import mahalanobis as mk
from ..kernels import posterior as post
from ..kernels.covariance import matern52

__all__ = ["CellTerms", "CellFactor", "cheaper", "distance_factor"]


class CellTerms(NamedTuple):
    """What every relabelling shares in the cells' basis (cells of condition 1, then 2)."""

    h: np.ndarray  # Ãᵀ Ã (n × n)
    f: np.ndarray  # A_Pᵀ Ã (p × n)
    k_pp: np.ndarray  # K_PP (p × p), the prior covariance at the points
    root_w: np.ndarray | None  # W^½ (n,), None without balancing weights


class CellFactor(NamedTuple):
    """One relabelling's gene-independent part: each pseudo-condition's cells and ``Lc``."""

    cells: tuple  # (cells of pseudo-condition 1, of 2): index arrays into the n cells
    lc: tuple  # their chol(σ² I + H[k, k])
    sigma: np.ndarray | None  # Σ1 + Σ2 at the points (p × p), kept when there is no good shared factor
    lower: np.ndarray | None  # shared_cholesky(sigma, eps), for the shared branches


def cheaper(m: int, p: int, n: int, group_cells: list, sample_cells: list, n_genes: int) -> bool:
    """Whether the cells' basis takes fewer operations than the landmark form.

    Parameters
    ----------
    m, p, n : int
        Landmarks, evaluation points, cells of both conditions.
    group_cells : list of (int, int)
        Cells of each labelling's two pseudo-conditions (the real one included).
    sample_cells : list of int
        Cells of each sample with a per-sample fit (sample variance).
    n_genes : int
        Genes (the distances are counted for all of them in every labelling).

    The Mahalanobis solves and ``A = Lp⁻¹ K_UX`` are the same in both and left out. The
    cells' basis also keeps ``H`` (n × n): it is not taken beyond twice the landmarks.
    """
    if n > 2 * max(m, p):
        return False
    g = float(n_genes)
    landmark = m * m * n + 2.0 * m * n * g + len(sample_cells) * m * m * g
    cell = n * n * m + 2.0 * p * m * n
    for c1, c2 in group_cells:
        landmark += 2 * (m**3 / 3 + 2.0 * m * m * p + m * p * p) + 4.0 * p * m * g
        cell += sum(c**3 / 3 + c * c * p + p * p * c + 2.0 * c * c * g for c in (c1, c2)) + 2.0 * p * n * g
    for c in sample_cells:
        landmark += m**3 / 3 + 2.0 * m * m * p + 2.0 * p * m * g
        cell += c**3 / 3 + 2.0 * c * c * g + 2.0 * p * c * g
    return cell < landmark


# ------------------------------------------------------------------------------- tasks
@with_x64
def cell_terms_task(gp: Any, points: np.ndarray, x: np.ndarray, weights: np.ndarray | None) -> CellTerms:
    """:class:`CellTerms` of the cells ``x`` (n × D) with balancing ``weights`` (n,) or None.

    ``Ã`` is made for at most :func:`~kompot_dask.execution.plan.cell_chunk_rows` cells at a
    time, written into one M × n array; ``H`` is its Gram (BLAS ``syrk``). When the cells
    are landmarks and the points are the landmarks (Kompot's DE default up to 5,000 cells),
    ``H`` and ``F`` come from ``K_UU`` and ``j² P⁻¹`` instead
    (:func:`~kompot_dask.kernels.cell_basis.fit_at_landmarks`), with no solve against ``Lp``.
    """
    m, n = len(gp.inducing), len(x)
    at_landmarks = same_points(points, gp.inducing)
    rows = point_rows(x, gp.inducing) if at_landmarks else None
    if rows is not None:
        k_uu = shared.inducing_kernel(gp.inducing, gp.lp, gp.ls)  # the model's, in its process
        f, h = cb.landmark_terms(k_uu, shared.scaled_inverse(gp.lp, gp.jitter), rows, gp.jitter)  # E, AᵀA
        root_w = None if weights is None else np.sqrt(np.asarray(weights, dtype=np.float64))
        if root_w is not None:
            f *= root_w
            h *= root_w
            h *= root_w[:, None]
        return CellTerms(h, f, k_uu, root_w)
    a = np.empty((m, n), order="F")
    f = np.empty((len(points), n), order="F")
    a_p = None if at_landmarks else post.solve_lower(gp.lp, np.asfortranarray(matern52(gp.inducing, points, gp.ls)),
                                                     overwrite=True)
    step = cell_chunk_rows(m)
    for start in range(0, n, step):
        block = slice(start, min(start + step, n))
        k = np.asarray(matern52(gp.inducing, x[block], gp.ls), dtype=np.float64, order="F")
        if at_landmarks:
            f[:, block] = k
        a[:, block] = post.solve_lower(gp.lp, k, overwrite=True)
        if not at_landmarks:
            f[:, block] = a_p.T @ a[:, block]
    if at_landmarks:  # F = K_UX − j Lp⁻ᵀ A, the model's E (kernels.cell_basis)
        f -= gp.jitter * post.solve_lower_t(gp.lp, a)
    root_w = None if weights is None else np.sqrt(np.asarray(weights, dtype=np.float64))
    if root_w is not None:
        a *= root_w
        f *= root_w
    h = post.gram(a)
    del a
    k_pp = np.asarray(matern52(points, points, gp.ls), dtype=np.float64)
    return CellTerms(h, f, k_pp, root_w)


def _cell_factor(terms: CellTerms, cells: np.ndarray, noise: float) -> np.ndarray:
    """``chol(σ² I + H[k, k])`` of the cells ``k``."""
    c = terms.h[np.ix_(cells, cells)]
    c[np.diag_indices_from(c)] += noise
    return post.cholesky_lower(c, "σ² I + Aᵀ A of a (pseudo-)condition", overwrite=True)


@with_x64
def factor_task(gp: Any, terms: CellTerms, groups: tuple, has_q: bool, eps: float) -> CellFactor:
    """One relabelling's :class:`CellFactor`; ``groups`` holds each pseudo-condition's cells."""
    lcs = []
    sigma = np.multiply(terms.k_pp, 2.0)
    for cells in groups:
        lc = _cell_factor(terms, cells, gp.noise)
        s = post.solve_lower(lc, terms.f[:, cells].T, overwrite=True)  # (c × p), Fortran: no copy
        sigma -= post.gram(s)
        lcs.append(lc)
    return CellFactor(tuple(groups), tuple(lcs), *distance_factor(sigma, has_q, eps))


def distance_factor(sigma: np.ndarray, has_q: bool, eps: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(Σ or None, L or None)`` for a relabelling's distances (SPEC §6.5 branches).

    A shared branch gets ``L = shared_cholesky(Σ, eps)``; when it did not fail, ``Σ`` is
    not kept (the distances need only ``L``: one ``p × p`` array less per relabelling
    while its distance tasks wait). Otherwise ``Σ`` is kept for the branch that needs it.
    """
    lower = mk.branch_and_factor(sigma, eps, has_q, False)[1]
    return (sigma if lower is None or mk.cholesky_failed(lower) else None), lower


@with_x64
def sample_factor_task(gp: Any, terms: CellTerms, cells: np.ndarray) -> np.ndarray:
    """The mean operator ``F[:, k] C_k⁻¹`` (p × c) of one sample's own fit (its per-sample
    model) on its cells ``k``: made once, so a gene batch's mean is one product."""
    lc = _cell_factor(terms, cells, gp.noise)
    return np.ascontiguousarray(_coefficients(lc, terms.f[:, cells].T).T)


@with_x64
def targets_task(gp: Any, root_w: np.ndarray | None, *parts: Any) -> np.ndarray:
    """``W^½ (Y − mu)`` of all n cells for one gene batch (n × g), Fortran-ordered.

    ``parts`` are the conditions' expression for the batch (condition 1's cells first).
    """
    r = np.asfortranarray(np.concatenate([read_rows(y, slice(None)) for y in parts], axis=0), dtype=np.float64)
    r -= gp.mu
    if root_w is not None:
        r *= root_w[:, None]
    return r


def _coefficients(lc: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``C⁻¹ r`` from ``Lc`` (``r`` is left as it is)."""
    return post.solve_lower_t(lc, post.solve_lower(lc, r), overwrite=True)


def sample_mean_task(op: np.ndarray, cells: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """One sample's posterior mean at the points for a gene batch, less ``mu`` (p × g), from
    its mean operator (:func:`sample_factor_task`)."""
    return op @ targets[cells]


def mean_difference(terms: CellTerms, factor: CellFactor, targets: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """``μ2 − μ1`` at the points of one relabelling (p × g): ``F z`` with the pseudo-conditions'
    coefficients ``z`` put in their cells' rows (negated for pseudo-condition 1)."""
    r = targets if cols is None else targets[:, cols]
    z = np.zeros((len(r), r.shape[1]), order="F")
    for sign, cells, lc in zip((-1.0, 1.0), factor.cells, factor.lc):
        z[cells] = sign * _coefficients(lc, r[cells])
    return terms.f @ z
