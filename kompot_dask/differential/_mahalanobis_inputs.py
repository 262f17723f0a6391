"""Where the Mahalanobis distance is evaluated and the sample-variance factor there (SPEC §6.5)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..estimators.function import point_rows
from ..kernels import mahalanobis as mk
from ._variance import variance_factor

__all__ = ["evaluation_points", "point_rows", "sample_factor"]


def evaluation_points(
    x: np.ndarray, landmarks: np.ndarray | None, use_landmarks: bool, override: np.ndarray | None
) -> tuple[np.ndarray, bool]:
    """``(P, at_x)``: the override, else condition 1's landmarks, else the query cells."""
    if override is not None:
        return override, False
    if use_landmarks and landmarks is not None:
        return np.asarray(landmarks, dtype=np.float64), False
    return x, True


def sample_factor(vp1: Any, vp2: Any, points: np.ndarray, n_genes: int, genes: slice | None = None) -> np.ndarray | None:
    """``Q`` (p, S1+S2, G) with ``Q_g Q_gᵀ = C1_g + C2_g`` at ``points``, or None.

    ``genes`` restricts it to a batch of ``n_genes`` genes.

    A :class:`SampleVarianceEstimator` gives its factor directly. Any other variance
    predictor is asked for its dense covariance (p, p, G), which is factored exactly
    per gene (eigenvectors scaled by the root of the non-negative eigenvalues).
    """
    factors = [_one_factor(vp, points, n_genes, genes) for vp in (vp1, vp2) if vp is not None]
    return mk.concat_factors(*factors) if factors else None


def _one_factor(predictor: Any, points: np.ndarray, n_genes: int, genes: slice | None) -> np.ndarray:
    q = variance_factor(predictor, points, genes, reduced=True)  # one solve column fewer per sample set
    if q is None:
        cov = np.asarray(predictor(points, diag=False), dtype=np.float64)
        if cov.ndim != 3 or cov.shape[:2] != (len(points), len(points)):
            msg = f"a variance predictor must return (p, p, G) covariances with diag=False; got {cov.shape}"
            raise ValueError(msg)
        q = _psd_factor(cov if genes is None else cov[:, :, genes])
    if q.shape[2] != n_genes:
        msg = f"the variance predictor covers {q.shape[2]} genes but the model has {n_genes}"
        raise ValueError(msg)
    return q


def _psd_factor(cov: np.ndarray) -> np.ndarray:
    """Factor each (p, p) slice of a PSD stack as ``F_g F_gᵀ`` (negative eigenvalues dropped)."""
    p, _, g = cov.shape
    out = np.empty((p, p, g))
    for j in range(g):
        w, v = np.linalg.eigh(0.5 * (cov[:, :, j] + cov[:, :, j].T))
        out[:, :, j] = v * np.sqrt(np.clip(w, 0.0, None))
    return out
