"""Empirical (HC3) variance in DifferentialExpression (SPEC §6.6), checked against the estimators."""

from __future__ import annotations

import numpy as np
import pytest

from kompot_dask import DifferentialExpression, FunctionEstimator
from kompot_dask._jax import x64
from kompot_dask.kernels import function as fk
from kompot_dask.kernels import mahalanobis as mk
from kompot_dask.testing import two_conditions

EPS = 1e-8


@pytest.fixture(scope="module")
def data():
    return two_conditions(n_cells=500, n_genes=5, n_samples=3, dims=3, seed=2)


@pytest.fixture(scope="module")
def landmarks(data):
    return np.vstack([data.x1, data.x2])[::25]


def _fit(data, landmarks, **kwargs):
    return DifferentialExpression(use_empirical_variance=True).fit(
        data.x1, data.y1, data.x2, data.y2, landmarks=landmarks, **kwargs
    )


def test_without_labels_std_adds_the_hc3_surface(data, landmarks):
    model = _fit(data, landmarks)
    query = data.x2[:40]
    out = model.predict(query, compute_mahalanobis=True)
    ref = FunctionEstimator(sigma=1.0, landmarks=landmarks, gp_type="fixed", ls=model.ls, obs_variance=True)
    ref.fit(data.x1, data.y1)
    total = ref.predict.covariance(query)[:, None] + np.maximum(ref.predict.obs_variance(query), EPS)
    assert out["condition1_std"].shape == (40, 5)
    np.testing.assert_allclose(out["condition1_std"], np.sqrt(total + EPS), rtol=1e-10)
    assert model.mahalanobis_branch in (mk.BRANCH_FACTOR_TRICK, mk.BRANCH_DIAGONAL)


def test_with_labels_pools_per_sample_residuals(data, landmarks):
    model = _fit(data, landmarks, condition1_sample_indices=data.samples1,
                 condition2_sample_indices=data.samples2)
    kwargs = dict(sigma=1.0, landmarks=landmarks, gp_type="fixed", ls=model.ls)
    e2 = np.empty_like(data.y1)
    for label in np.unique(data.samples1):
        rows = np.flatnonzero(data.samples1 == label)
        p = FunctionEstimator(obs_variance=True, **kwargs).fit(data.x1[rows], data.y1[rows]).predict
        with x64():  # the kernel is JAX: float64 only inside the switch
            e2[rows] = np.asarray(fk.hc3_squared_residuals(data.y1[rows], p(data.x1[rows]), p.leverage(data.x1[rows])))
    nu = FunctionEstimator(**kwargs).fit(data.x1, e2).predict
    query = data.x1[:30]
    np.testing.assert_allclose(model.obs_variance_predictor1(query), nu(query), rtol=1e-10, atol=1e-12)
    out = model.predict(query, compute_mahalanobis=True)
    # Sample and empirical variance together: one dense Cholesky per gene (SPEC §6.5 branch 1).
    assert model.mahalanobis_branch == mk.BRANCH_DENSE
    assert np.isfinite(out["mahalanobis_distances"]).all()
