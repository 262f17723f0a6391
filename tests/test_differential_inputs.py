"""Bad inputs to the differential classes: each rejected before any fit, naming the argument."""

from __future__ import annotations

import numpy as np
import pytest

from kompot_dask import DifferentialAbundance, DifferentialExpression
from kompot_dask.testing import two_conditions


@pytest.fixture(scope="module")
def data():
    return two_conditions(n_cells=400, n_genes=6, n_samples=3, dims=3, seed=1)


@pytest.fixture(scope="module")
def landmarks(data):
    return np.vstack([data.x1, data.x2])[::20]


def _da_fit(data, landmarks, **kwargs):
    return DifferentialAbundance().fit(data.x1, data.x2, landmarks=landmarks, **kwargs)


def _de_fit(data, landmarks, **kwargs):
    args = dict(X_condition1=data.x1, y_condition1=data.y1, X_condition2=data.x2, y_condition2=data.y2)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    return DifferentialExpression().fit(**args, landmarks=landmarks, **kwargs)


def test_da_condition_with_fewer_than_two_cells(data, landmarks):
    with pytest.raises(ValueError, match="X_condition2.*at least 2"):
        DifferentialAbundance().fit(data.x1, data.x2[:1], landmarks=landmarks)


def test_de_condition_with_fewer_than_two_cells(data, landmarks):
    with pytest.raises(ValueError, match="X_condition1.*at least 2"):
        _de_fit(data, landmarks, X_condition1=data.x1[:1], y_condition1=data.y1[:1])


@pytest.mark.parametrize("fit", [_da_fit, _de_fit])
def test_single_sample_condition(data, landmarks, fit):
    one = np.zeros(len(data.x1))
    with pytest.raises(ValueError, match="condition1_sample_indices.*allow_single_condition_variance"):
        fit(data, landmarks, condition1_sample_indices=one, condition2_sample_indices=data.samples2)


def test_single_sample_fallback_lends_the_other_condition(data, landmarks):
    one = np.zeros(len(data.x1))
    da = _da_fit(data, landmarks, condition1_sample_indices=one, condition2_sample_indices=data.samples2,
                 allow_single_condition_variance=True)
    assert da.variance_predictor1 is da.variance_predictor2
    out = da.predict(data.x1[:50])
    base = da.density_predictor1.uncertainty(data.x1[:50]) + da.density_predictor2.uncertainty(data.x1[:50])
    twice = 2 * da.variance_predictor2.predict(data.x1[:50], diag=True)[:, 0]
    np.testing.assert_allclose(out["log_fold_change_uncertainty"], base + twice, rtol=1e-12)


def test_both_conditions_single_sample_fails_even_with_fallback(data, landmarks):
    with pytest.raises(ValueError, match="Neither condition"):
        _de_fit(data, landmarks, condition1_sample_indices=np.zeros(len(data.x1)),
                condition2_sample_indices=np.zeros(len(data.x2)), allow_single_condition_variance=True)


@pytest.mark.parametrize("fit", [_da_fit, _de_fit])
def test_sample_indices_of_wrong_length(data, landmarks, fit):
    with pytest.raises(ValueError, match=r"condition2_sample_indices.*shape \(%d,\)" % len(data.x2)):
        fit(data, landmarks, condition1_sample_indices=data.samples1, condition2_sample_indices=data.samples2[:-3])


def test_gene_counts_differ(data, landmarks):
    with pytest.raises(ValueError, match="y_condition1.*6 genes.*y_condition2.*5"):
        _de_fit(data, landmarks, y_condition2=data.y2[:, :5])


def test_nan_expression(data, landmarks):
    y = data.y1.copy()
    y[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _de_fit(data, landmarks, y_condition1=y)


@pytest.mark.parametrize("fit", [_da_fit, _de_fit])
def test_landmarks_of_wrong_dimension(data, landmarks, fit):
    with pytest.raises(ValueError, match=r"landmarks.*\(n_landmarks, 3\)"):
        fit(data, landmarks[:, :2])


def test_conditions_in_different_spaces(data, landmarks):
    with pytest.raises(ValueError, match="same cell-state space"):
        DifferentialAbundance().fit(data.x1, data.x2[:, :2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(log_fold_change_threshold=-1.0), "log_fold_change_threshold"),
        (dict(log_fold_change_threshold=np.nan), "log_fold_change_threshold"),
        (dict(ptp_threshold=0.0), "ptp_threshold"),
        (dict(ptp_threshold=1.5), "ptp_threshold"),
    ],
)
def test_thresholds_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DifferentialAbundance(**kwargs)


def test_predict_threshold_out_of_range_and_unfitted(data, landmarks):
    with pytest.raises(ValueError, match="not fitted"):
        DifferentialAbundance().predict(data.x1)
    with pytest.raises(ValueError, match="not fitted"):
        DifferentialExpression().predict(data.x1)
    da = _da_fit(data, landmarks)
    with pytest.raises(ValueError, match="ptp_threshold"):
        da.predict(data.x1, ptp_threshold=2.0)
    with pytest.raises(ValueError, match="X_new.*features"):
        da.predict(data.x1[:, :2])
    with pytest.raises(ValueError, match="fdr_threshold"):
        DifferentialExpression(fdr_threshold=0.0)


def test_explicit_sample_variance_without_labels(data, landmarks):
    with pytest.raises(ValueError, match="use_sample_variance=True needs sample labels"):
        DifferentialAbundance(use_sample_variance=True).fit(data.x1, data.x2, landmarks=landmarks)


def test_duplicated_cells_in_condition1_stop_the_de_length_scale(data, landmarks):
    x1 = data.x1.copy()
    x1[1] = x1[0]
    with pytest.raises(ValueError, match="X_condition1.*identical twin.*ls"):
        _de_fit(data, landmarks, X_condition1=x1)


def test_a_single_sample_condition_is_refused_before_any_fit(data, landmarks, monkeypatch):
    import kompot_dask.differential.abundance as abundance

    fits = []
    real = abundance.DensityEstimator.fit
    monkeypatch.setattr(abundance.DensityEstimator, "fit", lambda self, *a, **k: fits.append(1) or real(self, *a, **k))
    with pytest.raises(ValueError, match="condition1_sample_indices.*allow_single_condition_variance"):
        _da_fit(data, landmarks, condition1_sample_indices=np.zeros(len(data.x1)),
                condition2_sample_indices=data.samples2)
    assert fits == []
