"""Per-cell differential-abundance calls with a controlled false-discovery rate over the map.

Kompot's DA direction thresholds every cell's posterior tail probability on its own (and the
fold change at 1): nothing controls how many of the called cells are false. Here the
multiplicity is counted over *neighbourhoods* of the state map rather than over cells,
as Milo's spatial FDR does: the GP's log fold change is a smooth field, so neighbouring
cells are near-copies of one test. The neighbourhoods are evaluation points (by default
the model's landmarks, k-means centroids of all cells): each gets a two-sided p-value
from its z-score, and a weighted Benjamini–Hochberg procedure over the points (equal
weights by default, or inverse local density so that every region of the map counts
alike) gives a p-value threshold. A cell is called where its own p-value is below that
threshold, with the sign of its log fold change; its ``spatial FDR`` is the smallest
point-level adjusted p-value among points at least as extreme, so that ``fdr <= alpha``
is the call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import scipy.stats

from ..kernels.fdr import benjamini_hochberg

__all__ = ["SpatialCall", "bh_call", "density_weights", "spatial_call", "two_sided_pvalues"]


class SpatialCall(NamedTuple):
    """Result of :func:`spatial_call`.

    Attributes
    ----------
    pvalue : ndarray (n_cells,)
        Two-sided p-value of each cell's z-score.
    fdr : ndarray (n_cells,)
        Spatial FDR of each cell (``<= alpha`` iff called).
    direction : ndarray of str (n_cells,)
        ``"up"``, ``"down"`` or ``"neutral"``.
    threshold : float
        The p-value threshold (0 when nothing is called).
    point_pvalue, point_fdr : ndarray (n_points,)
        The same at the evaluation points.
    """

    pvalue: np.ndarray
    fdr: np.ndarray
    direction: np.ndarray
    threshold: float
    point_pvalue: np.ndarray
    point_fdr: np.ndarray


def bh_call(p: np.ndarray, alpha: float, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg (optionally weighted) adjusted p-values and the calls ``q <= alpha``.

    NaN p-values get NaN q-values and are never called.
    """
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"the FDR level must lie in (0, 1]; got {alpha!r}")
    q = benjamini_hochberg(p, weights)
    called = np.zeros(q.shape, dtype=bool)
    ok = ~np.isnan(q)
    called[ok] = q[ok] <= alpha
    return q, called


def two_sided_pvalues(z: np.ndarray, df: float | None = None) -> np.ndarray:
    """``P(|T| >= |z|)`` for a standard normal ``T`` (``df=None``) or Student's t with ``df``."""
    z = np.abs(np.asarray(z, dtype=np.float64))
    if df is None:
        return np.minimum(1.0, 2.0 * scipy.stats.norm.sf(z))
    return np.minimum(1.0, 2.0 * scipy.stats.t.sf(z, df))


def density_weights(points: np.ndarray, k: int = 10) -> np.ndarray:
    """Weights proportional to the inverse local density of the points.

    The density at a point is taken as ``1 / r_k^d`` with ``r_k`` the distance to its
    ``k``-th nearest other point and ``d`` the points' dimension estimated from how
    ``r`` grows between the ``k/2``-th and ``k``-th neighbours (at least 1), so that
    tightly packed points share their weight and every region of the map counts about
    equally. Normalised to mean 1.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n < 3:
        return np.ones(n)
    k = int(min(max(k, 2), n - 1))
    dist, _ = cKDTree(points).query(points, k=k + 1)
    r_k = np.maximum(dist[:, k], 1e-300)
    r_h = np.maximum(dist[:, max(1, k // 2)], 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(k / max(1, k // 2)) / np.log(r_k / r_h)
    ratio = ratio[np.isfinite(ratio)]
    dim = float(np.clip(np.median(ratio), 1.0, points.shape[1])) if ratio.size else 1.0
    w = (r_k / np.median(r_k)) ** dim
    w = np.clip(w, 1e-3, 1e3)
    return w / w.mean()


def spatial_call(
    cell_z: np.ndarray,
    cell_lfc: np.ndarray,
    point_z: np.ndarray,
    alpha: float = 0.05,
    weights: np.ndarray | None = None,
    df: float | None = None,
) -> SpatialCall:
    """Spatial-FDR call of cells from z-scores at cells and at evaluation points.

    Parameters
    ----------
    cell_z, cell_lfc : array (n_cells,)
        z-score and log fold change of each cell.
    point_z : array (n_points,)
        z-score at each evaluation point (neighbourhood).
    alpha : float, default 0.05
        Target FDR over the points.
    weights : array (n_points,), optional
        Weights of the points in the weighted BH (default equal).
    df : float, optional
        Reference distribution of the z-scores: Student's t with ``df`` degrees of
        freedom (default the standard normal, as Kompot's tail probabilities).

    Returns
    -------
    SpatialCall
    """
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"`alpha` must lie strictly between 0 and 1; got {alpha!r}")
    cell_lfc = np.asarray(cell_lfc, dtype=np.float64)
    p_cell = two_sided_pvalues(cell_z, df)
    p_point = two_sided_pvalues(point_z, df)
    if cell_lfc.shape != p_cell.shape:
        raise ValueError(f"`cell_lfc` must have the shape of `cell_z` {p_cell.shape}; got {cell_lfc.shape}")
    q_point, called = bh_call(p_point, alpha, weights)
    ok = ~np.isnan(q_point)
    threshold = float(p_point[called].max()) if called.any() else 0.0
    # cell FDR: the smallest point-level q among points with p >= the cell's p (a step function)
    order = np.argsort(p_point[ok], kind="stable")
    p_sorted, q_sorted = p_point[ok][order], q_point[ok][order]
    suffix_min = np.minimum.accumulate(q_sorted[::-1])[::-1] if len(q_sorted) else q_sorted
    fdr = np.ones_like(p_cell)
    if len(p_sorted):
        pos = np.searchsorted(p_sorted, p_cell, side="left")
        inside = pos < len(p_sorted)
        fdr[inside] = suffix_min[pos[inside]]
    fdr = np.where(np.isnan(p_cell), np.nan, fdr)
    is_called = np.zeros(p_cell.shape, dtype=bool)
    finite = ~np.isnan(p_cell)
    is_called[finite] = p_cell[finite] <= threshold if threshold > 0 else False
    direction = np.full(p_cell.shape, "neutral", dtype=object)
    direction[is_called & (cell_lfc > 0)] = "up"
    direction[is_called & (cell_lfc < 0)] = "down"
    return SpatialCall(p_cell, fdr, direction, threshold, p_point, q_point)


def model_zscores(model: Any, x: np.ndarray) -> dict:
    """z-scores and log fold changes of a fitted :class:`DifferentialAbundance` at ``x``.

    Computed without :meth:`~DifferentialAbundance.predict`, which would overwrite the
    model's stored results.
    """
    from .._jax import x64
    from ._blocks import abundance_block

    if model.density_predictor1 is None or model.density_predictor2 is None:
        raise ValueError("DifferentialAbundance is not fitted; call `fit` first")
    vp1, vp2 = model.variance_predictors
    with x64():
        block = abundance_block(model.density_predictor1, model.density_predictor2, vp1, vp2,
                                np.asarray(x, dtype=np.float64), model.eps)
    return {"log_fold_change_zscore": np.asarray(block["log_fold_change_zscore"]).ravel(),
            "log_fold_change": np.asarray(block["log_fold_change"]).ravel()}


def resolve_weights(weights: Any, points: np.ndarray) -> np.ndarray | None:
    """``"uniform"`` → None (equal), ``"density"`` → :func:`density_weights`, else the array."""
    if isinstance(weights, str):
        if weights == "uniform":
            return None
        if weights == "density":
            return density_weights(points)
        raise ValueError(f"`weights` must be 'uniform', 'density' or an array; got {weights!r}")
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(points),):
        raise ValueError(f"`weights` must have one value per evaluation point ({len(points)}); got {w.shape}")
    return w
