"""SampleVarianceEstimator (SPEC §4): Bessel variance, exact factor, dense covariance, disk storage."""

from __future__ import annotations

import numpy as np
import pytest

from kompot_dask import SampleVarianceEstimator


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(240, 3))
    labels = np.repeat(["a", "b", "c", "d"], 60)
    rng.shuffle(labels)
    offsets = {"a": 0.0, "b": 0.3, "c": -0.2, "d": 0.1}
    y = np.column_stack([np.sin(x[:, 0]), x[:, 1] ** 2, np.cos(x[:, 2])])
    y = y + np.array([offsets[s] for s in labels])[:, None] + 0.05 * rng.normal(size=y.shape)
    landmarks = x[rng.choice(240, 30, replace=False)]
    return x, y, labels, landmarks


@pytest.fixture(scope="module")
def fitted(data):
    x, y, labels, landmarks = data
    kwargs = dict(sigma=1.0, landmarks=landmarks, gp_type="fixed", ls=2.0)
    return SampleVarianceEstimator().fit(x, y, labels, estimator_kwargs=kwargs)


def test_variance_is_bessel_corrected_spread_of_sample_means(data, fitted):
    x, y, labels, landmarks = data
    query = x[:50]
    means = fitted.group_predictions(query)
    assert means.shape == (4, 50, 3) and list(fitted.group_predictors) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(fitted.predict(query, diag=True), means.var(axis=0, ddof=1), rtol=1e-12)


def test_factor_reproduces_dense_covariance(data, fitted):
    query = data[0][:40]
    q = fitted.factor(query)
    dense = fitted.predict(query, diag=False)
    assert q.shape == (40, 4, 3) and dense.shape == (40, 40, 3)
    for g in range(3):
        np.testing.assert_allclose(dense[:, :, g], q[:, :, g] @ q[:, :, g].T, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.einsum("aag->ag", dense), fitted.predict(query, diag=True), rtol=1e-12)
    # Full covariance is the default, as in the reference.
    np.testing.assert_array_equal(fitted.predict(query), dense)
    np.testing.assert_array_equal(fitted(query, diag=True), fitted.predict(query, diag=True))


def test_gene_batches_of_the_factor(data, fitted):
    query = data[0][:25]
    np.testing.assert_allclose(fitted.factor(query, genes=slice(1, 3)), fitted.factor(query)[:, :, 1:3], rtol=1e-13)


def test_disk_storage_gives_the_same_numbers_lazily(data, fitted, tmp_path):
    x, y, labels, landmarks = data
    kwargs = dict(sigma=1.0, landmarks=landmarks, gp_type="fixed", ls=2.0)
    on_disk = SampleVarianceEstimator(disk_storage_dir=str(tmp_path)).fit(x, y, labels, estimator_kwargs=kwargs)
    assert on_disk.store_arrays_on_disk
    query = x[:30]
    q = on_disk.factor(query)
    assert type(q).__module__.startswith("zarr")
    np.testing.assert_allclose(q[...], fitted.factor(query), rtol=1e-13)
    lazy = on_disk.predict(query, diag=False)
    assert hasattr(lazy, "dask")
    np.testing.assert_allclose(lazy.compute(), fitted.predict(query, diag=False), rtol=1e-12, atol=1e-15)
    assert any(p.name.startswith("sample_variance_factor") for p in tmp_path.iterdir())


def test_density_samples_are_normalised_by_their_own_size(data):
    x, _, labels, landmarks = data
    sve = SampleVarianceEstimator(estimator_type="density").fit(
        x, grouping_vector=labels, estimator_kwargs=dict(landmarks=landmarks, gp_type="fixed")
    )
    query = x[:20]
    per_sample = sve.group_predictions(query)
    assert per_sample.shape == (4, 20, 1)
    for k, (label, predictor) in enumerate(sve.group_predictors.items()):
        expected = predictor(query) - np.log(sve.group_sizes[label])
        np.testing.assert_allclose(per_sample[k, :, 0], expected, rtol=1e-13)
    assert sve.predict(query, diag=True).shape == (20, 1)
    # Each sample estimated its own ls with the default ls_factor 10 (no `ls` given).
    assert len({round(p["ls"], 9) for p in sve.group_parameters.values()}) == 4


def test_small_samples_are_skipped_with_a_warning(data):
    x, y, labels, landmarks = data
    labels = labels.copy()
    labels[:3] = "tiny"
    kwargs = dict(sigma=1.0, landmarks=landmarks, gp_type="fixed", ls=2.0)
    with pytest.warns(UserWarning, match="skipping sample"):
        sve = SampleVarianceEstimator().fit(x, y, labels, min_cells=5, estimator_kwargs=kwargs)
    assert "tiny" not in sve.group_predictors and sve.n_groups == 4


def test_fewer_than_two_samples_is_an_error(data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="at least 2 samples"):
        SampleVarianceEstimator().fit(x, y, np.zeros(len(x)), estimator_kwargs=dict(ls=2.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grouping_vector=None), "grouping_vector"),
        (dict(grouping_vector=np.zeros(5)), r"grouping_vector.*shape \(240,\)"),
        (dict(Y=None, grouping_vector=np.zeros(240)), "`Y`"),
        (dict(min_cells=0, grouping_vector=np.zeros(240)), "min_cells"),
    ],
)
def test_bad_fit_arguments(data, kwargs, match):
    x, y, _, _ = data
    args = dict(Y=y)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SampleVarianceEstimator().fit(x, **args)


def test_bad_constructor_arguments_and_unfitted_use():
    with pytest.raises(ValueError, match="estimator_type"):
        SampleVarianceEstimator(estimator_type="abundance")
    with pytest.raises(ValueError, match="disk_storage_dir"):
        SampleVarianceEstimator(store_arrays_on_disk=True)
    with pytest.raises(ValueError, match="not fitted"):
        SampleVarianceEstimator().predict(np.zeros((3, 2)))


def test_dense_covariance_refuses_huge_requests(data, fitted, monkeypatch):
    from kompot_dask.differential import sample_variance

    monkeypatch.setattr(sample_variance, "MAX_DENSE_COVARIANCE_BYTES", 1000)
    with pytest.raises(MemoryError, match="factor"):
        fitted.predict(data[0][:50], diag=False)
