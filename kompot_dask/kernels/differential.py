"""Per-cell differential statistics (SPEC §5.4, §6.4): pure numpy/scipy, one block at a time."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.stats

__all__ = ["AbundanceStats", "abundance_stats", "directions", "expression_stats"]

LN10 = float(np.log(10.0))


class AbundanceStats(NamedTuple):
    """Log fold change of densities with its variance, z-score and one-sided PTP."""

    log_fold_change: np.ndarray
    variance: np.ndarray
    zscore: np.ndarray
    neg_log10_ptp: np.ndarray


def abundance_stats(l1, l2, v1, v2, eps: float) -> AbundanceStats:
    """``lfc = ℓ2 − ℓ1``, ``var = v1 + v2``, ``z = lfc / sqrt(var + eps)``, ``−log10 Φ(−|z|)``.

    The tail probability is evaluated in log space (``norm.logcdf``), so extreme
    z-scores keep finite, distinct values.
    """
    lfc = np.asarray(l2, dtype=np.float64) - np.asarray(l1, dtype=np.float64)
    var = np.asarray(v1, dtype=np.float64) + np.asarray(v2, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        z = lfc / np.sqrt(var + eps)
    neg_log10_ptp = -scipy.stats.norm.logcdf(-np.abs(z)) / LN10
    return AbundanceStats(lfc, var, z, neg_log10_ptp)


def directions(lfc, neg_log10_ptp, lfc_threshold: float, ptp_threshold: float) -> np.ndarray:
    """``"up"``/``"down"`` where ``|lfc| > threshold`` and ``PTP < ptp_threshold`` (strict), else ``"neutral"``."""
    lfc = np.asarray(lfc)
    significant = (np.abs(lfc) > lfc_threshold) & (np.asarray(neg_log10_ptp) > -np.log10(ptp_threshold))
    out = np.full(lfc.shape, "neutral", dtype=object)
    out[significant & (lfc > 0)] = "up"
    out[significant & (lfc < 0)] = "down"
    return out


def expression_stats(mu1, mu2, t1, t2, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per cell and gene: ``std1, std2, fold change, z-score`` from means and total variances.

    ``std_c = sqrt(T_c + eps)``; ``fc = μ2 − μ1``; ``z = fc / sqrt(T1 + T2 + eps)``.
    ``t1``/``t2`` may be (n, 1) (shared by all genes) and broadcast.
    """
    with np.errstate(invalid="ignore"):
        std1 = np.sqrt(t1 + eps)
        std2 = np.sqrt(t2 + eps)
        fc = mu2 - mu1
        z = fc / np.sqrt(t1 + t2 + eps)
    return std1, std2, fc, z
