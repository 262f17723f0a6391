"""One block of differential results: the unit both the in-memory and the dask paths compute.

A block is a chunk of query cells (× a batch of genes for expression). The functions take
fitted models and numpy arrays and return numpy arrays; nothing here knows about dask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import differential as dk
from ._expression_model import condition_means

__all__ = ["ABUNDANCE_KEYS", "EXPRESSION_KEYS", "STD_KEYS", "abundance_block", "expression_block"]

ABUNDANCE_KEYS = (
    "log_density_condition1",
    "log_density_condition2",
    "log_fold_change",
    "log_fold_change_uncertainty",
    "log_fold_change_zscore",
    "neg_log10_fold_change_ptp",
)
EXPRESSION_KEYS = ("condition1_imputed", "condition2_imputed", "fold_change", "fold_change_zscores")
STD_KEYS = ("condition1_std", "condition2_std")


def abundance_block(p1, p2, vp1, vp2, x: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """Normalised log densities, fold change, variance, z and PTP for the cells ``x`` (SPEC §5.4).

    ``vp1``/``vp2`` are sample-variance predictors (``v(x, diag=True)`` → (n, 1)) or None.
    """
    from ._variance import variance_diag

    l1, v1 = _log_density_and_uncertainty(p1, x)
    l2, v2 = _log_density_and_uncertainty(p2, x)
    if vp1 is not None:
        v1 = v1 + _one_column(variance_diag(vp1, x))
    if vp2 is not None:
        v2 = v2 + _one_column(variance_diag(vp2, x))
    stats = dk.abundance_stats(l1, l2, v1, v2, eps)
    return {
        "log_density_condition1": np.asarray(l1),
        "log_density_condition2": np.asarray(l2),
        "log_fold_change": stats.log_fold_change,
        "log_fold_change_uncertainty": stats.variance,
        "log_fold_change_zscore": stats.zscore,
        "neg_log10_fold_change_ptp": stats.neg_log10_ptp,
    }


def expression_block(m1, m2, x: np.ndarray, genes: slice, eps: float, cov_diag: Any = None,
                     landmark_rows: Any = None) -> dict[str, np.ndarray]:
    """Imputed expression, std, fold change and z-score for cells ``x`` and a gene batch (SPEC §6.4).

    ``m1``/``m2`` are :class:`ConditionModel` s. The std arrays are (n, 1) when neither
    condition has a per-gene variance. ``cov_diag`` may pass precomputed
    ``(cov1, cov2)`` diagonals (gene independent) to reuse across gene batches.
    ``landmark_rows`` may give, for cells that are the shared landmarks, their rows there
    (:func:`~._expression_model.condition_means`).
    """
    c1, c2 = cov_diag if cov_diag is not None else (m1.covariance(x, diag=True), m2.covariance(x, diag=True))
    mu1, mu2 = condition_means(m1, m2, x, genes, landmark_rows)
    t1, t2 = m1.total_variance(x, genes, c1), m2.total_variance(x, genes, c2)
    std1, std2, fc, z = dk.expression_stats(mu1, mu2, t1, t2, eps)
    return {
        "condition1_imputed": mu1,
        "condition2_imputed": mu2,
        "condition1_std": std1,
        "condition2_std": std2,
        "fold_change": fc,
        "fold_change_zscores": z,
    }


def _log_density_and_uncertainty(p, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p(x, normalize=True), p.uncertainty(x, diag=True))`` of a density predictor.

    A fitted :class:`~kompot_dask.DensityPredictor` gives both from one kernel block per
    chunk of cells; an injected predictor is called as documented.
    """
    both = getattr(p, "log_density_and_uncertainty", None)
    if both is not None:
        return both(x, normalize=True)
    return p(x, normalize=True), p.uncertainty(x, diag=True)


def _one_column(variance: np.ndarray) -> np.ndarray:
    if variance.ndim != 2 or variance.shape[1] != 1:
        msg = f"a density variance predictor must return shape (n_cells, 1); got {variance.shape}"
        raise ValueError(msg)
    return variance[:, 0]
