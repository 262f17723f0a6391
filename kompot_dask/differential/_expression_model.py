"""One condition's expression model (SPEC §6.1): GP mean, posterior, sample and empirical variance."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..estimators import FunctionEstimator
from ..estimators.function import FunctionPredictor, same_points
from ..estimators._inputs import read_rows, take_rows
from ..kernels import function as fk
from ._variance import variance_diag

__all__ = ["ConditionModel", "condition_means", "expression_length_scale", "fit_empirical_variance",
           "landmark_pair", "mean_difference"]


def expression_length_scale(nn: np.ndarray, ls_factor: float, float32: bool, name: str) -> float:
    """``ls = ls_factor · exp(mean ln nn + 3)`` from one condition's NN distances (§6.1 step 3).

    The reference does not guard zero distances here (``ls`` becomes 0 and the kernel
    degenerates); we stop with an explanation instead.
    """
    from ..kernels import density_params as dp

    zeros = int(np.sum(nn <= 0))
    if zeros:
        msg = (
            f"{zeros} cell(s) of `{name}` have an identical twin (nearest-neighbour distance 0), "
            "which makes the estimated length scale 0; remove duplicated cells or pass `ls`"
        )
        raise ValueError(msg)
    return dp.length_scale(nn, ls_factor, float32)


class ConditionModel:
    """Accessors of §6.1 over a fitted (or injected) condition model.

    Parameters
    ----------
    function_predictor : callable
        ``f(x, genes=None)`` → posterior mean (n, G), with ``f.covariance(x, diag)``.
    variance_predictor : SampleVarianceEstimator or callable, optional
        Sample variance, ``v(x, diag=True)`` → (n, G).
    obs_variance_predictor : callable, optional
        Empirical variance surface ``ν(x)`` → (n, G).
    eps : float
        Floor of the empirical variance and jitter of the std.
    """

    def __init__(self, function_predictor, variance_predictor=None, obs_variance_predictor=None, eps=1e-8):
        self.function_predictor = function_predictor
        self.variance_predictor = variance_predictor
        self.obs_variance_predictor = obs_variance_predictor
        self.eps = float(eps)

    @property
    def landmarks(self) -> np.ndarray | None:
        """Inducing points of a landmark-mode predictor (None for a full GP or unknown)."""
        return getattr(self.function_predictor, "landmarks", None)

    @property
    def per_gene_variance(self) -> bool:
        """Whether the total variance differs between genes."""
        return self.variance_predictor is not None or self.obs_variance_predictor is not None

    def mean(self, x: np.ndarray, genes: Any = None) -> np.ndarray:
        """Posterior mean (n, G) (the imputed expression)."""
        try:
            out = self.function_predictor(x, genes=genes)
        except TypeError:  # an injected predictor without gene batches
            out = self.function_predictor(x)
            out = out if genes is None else np.asarray(out)[:, genes]
        out = np.asarray(out, dtype=np.float64)
        return out[:, None] if out.ndim == 1 else out

    def covariance(self, x: np.ndarray, diag: bool = True) -> np.ndarray:
        """GP posterior covariance, the same for every gene: (n,) or (n, n)."""
        return np.asarray(self.function_predictor.covariance(x, diag=diag), dtype=np.float64)

    def obs_variance(self, x: np.ndarray, genes: Any = None) -> np.ndarray | float:
        """``max(ν(x), eps)`` (n, G), or 0 without empirical variance."""
        if self.obs_variance_predictor is None:
            return 0.0
        try:
            nu = self.obs_variance_predictor(x, genes=genes)
        except TypeError:
            nu = np.asarray(self.obs_variance_predictor(x))
            nu = nu if genes is None else nu[:, genes]
        nu = np.asarray(nu, dtype=np.float64)
        return np.maximum(nu[:, None] if nu.ndim == 1 else nu, self.eps)

    def sample_variance(self, x: np.ndarray, genes: Any = None) -> np.ndarray | float:
        """Per-cell sample variance (n, G), or 0 without sample variance."""
        if self.variance_predictor is None:
            return 0.0
        return variance_diag(self.variance_predictor, x, genes)

    def total_variance(self, x: np.ndarray, genes: Any = None, cov_diag: np.ndarray | None = None) -> np.ndarray:
        """``covariance_diag[:, None] + obs_variance + sample_variance``: (n, 1) or (n, G)."""
        cov = self.covariance(x, diag=True) if cov_diag is None else cov_diag
        return cov[:, None] + self.obs_variance(x, genes) + self.sample_variance(x, genes)


def mean_difference(m1: ConditionModel, m2: ConditionModel, x: np.ndarray, genes: Any = None,
                    landmark_rows: Any = None) -> np.ndarray:
    """``μ2(x) − μ1(x)`` (n, G).

    When both conditions are landmark GPs on the same landmarks and length scale (DE's
    shared landmarks), ``K_xU w2 − K_xU w1 = K_xU (w2 − w1)``: one product instead of two,
    which at the Mahalanobis evaluation points (``x`` = the M landmarks) halves the
    ``2 M² G`` of the means. Both fitted in the cells' basis, at landmarks (``x`` the
    landmarks, or ``landmark_rows`` giving each cell's landmark row), each mean is
    :meth:`~kompot_dask.estimators.function.FunctionPredictor.inducing_mean`, with no weights.
    Otherwise each mean is predicted and subtracted.
    """
    pair = landmark_pair(m1, m2)
    if pair is None:
        return m2.mean(x, genes) - m1.mean(x, genes)
    p1, p2 = pair
    rows = _rows_of_landmarks(pair, x, landmark_rows)
    if rows is not None:
        return p2.inducing_mean(rows, genes) - p1.inducing_mean(rows, genes)
    w1, w2 = (_batch(p.weights, genes) for p in pair)
    return p2.predict_with(x, w2 - w1, p2.state.mu - p1.state.mu, keep_columns=True)


def condition_means(m1: ConditionModel, m2: ConditionModel, x: np.ndarray, genes: Any = None,
                    landmark_rows: Any = None) -> tuple:
    """``(μ1(x), μ2(x))``, (n, G) each.

    On shared landmarks both means are one product of the kernel block ``K_xU`` (evaluated
    once) with the two conditions' weights side by side; at the landmarks of two fits in
    the cells' basis, as in :func:`mean_difference`.
    """
    pair = landmark_pair(m1, m2)
    if pair is None:
        return m1.mean(x, genes), m2.mean(x, genes)
    p1, p2 = pair
    rows = _rows_of_landmarks(pair, x, landmark_rows)
    if rows is not None:
        return p1.inducing_mean(rows, genes), p2.inducing_mean(rows, genes)
    w1, w2 = (_batch(p.weights, genes) for p in pair)
    both = p1.predict_with(x, np.hstack([w1, w2]), 0.0, keep_columns=True)
    n_genes = w1.shape[1]
    return both[:, :n_genes] + p1.state.mu, both[:, n_genes:] + p2.state.mu


def landmark_pair(m1: ConditionModel, m2: ConditionModel) -> tuple | None:
    """Both conditions' :class:`FunctionPredictor` when they are landmark GPs on the same
    landmarks and length scale (DE's shared landmarks), else None."""
    p1, p2 = m1.function_predictor, m2.function_predictor
    if not (isinstance(p1, FunctionPredictor) and isinstance(p2, FunctionPredictor)):
        return None
    s1, s2 = p1.state, p2.state
    shared = (s1.landmark_mode and s2.landmark_mode and s1.ls == s2.ls
              and (s1.inducing is s2.inducing or same_points(s1.inducing, s2.inducing)))
    return (p1, p2) if shared else None


def _rows_of_landmarks(pair: tuple, x: np.ndarray, landmark_rows: Any) -> Any:
    """The landmark rows of the cells ``x`` when both fits of ``pair`` are in the cells' basis
    and ``x`` are landmarks (given ``landmark_rows``, or ``x`` the landmarks), else None."""
    if any(p.state.cell_basis is None for p in pair):
        return None
    if landmark_rows is not None:
        return landmark_rows
    return slice(None) if same_points(x, pair[0].state.inducing) else None


def _batch(weights: np.ndarray, genes: Any) -> np.ndarray:
    return weights if genes is None else weights[:, genes]


def fit_empirical_variance(x: np.ndarray, y: Any, labels: np.ndarray | None, kwargs: dict):
    """The empirical (aleatoric) variance surface ``ν`` of SPEC §6.6; returns its predictor.

    Without labels: one model fitted with ``obs_variance=True`` (HC3 residuals at its
    training cells, then a GP on them). With labels: HC3 residuals of a separate model
    per sample on its own cells, pooled, and one GP (same settings) fitted to them.
    """
    if labels is None:
        return FunctionEstimator(**{**kwargs, "obs_variance": True}).fit(x, y).predict.obs_variance
    first = read_rows(y, slice(0, 1))
    e2 = np.empty((len(x), first.shape[1]))
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            continue  # a sample of one cell has no residual; leaves its rows at 0 below
        ys = take_rows(y, rows)
        predictor = FunctionEstimator(**{**kwargs, "obs_variance": True}).fit(x[rows], ys).predict
        fitted = predictor(x[rows])  # a full GP defines leverage only at all its training cells at once
        fitted = fitted[:, None] if fitted.ndim == 1 else fitted
        observed = read_rows(ys, slice(0, len(rows)))
        e2[rows] = np.asarray(fk.hc3_squared_residuals(observed, fitted, predictor.leverage(x[rows])))
    singles = np.isin(labels, [lab for lab, c in zip(*np.unique(labels, return_counts=True)) if c < 2])
    e2[singles] = 0.0
    return FunctionEstimator(**{**kwargs, "mu": 0.0}).fit(x, e2).predict
