"""Per-gene Mahalanobis kernels (SPEC §6.5): reference parity, Woodbury exactness, branches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from kompot_dask.kernels import mahalanobis as mh

DATA = Path(__file__).parent / "data" / "de_class.npz"
EPS = 1e-8


@pytest.fixture(scope="module")
def de_class():
    with np.load(DATA) as npz:
        return {k: npz[k] for k in npz.files}


def _case(ref, variant):
    delta = (ref[f"out_{variant}_aux_mean_landmarks_condition2"]
             - ref[f"out_{variant}_aux_mean_landmarks_condition1"])
    return delta, ref[f"out_{variant}_aux_posterior_cov_sum_landmarks"]


def _reference_q(ref):
    return mh.concat_factors(*(
        mh.sample_variance_factor(ref[f"out_sv_aux_sample_mean_landmarks_condition{c}"])
        for c in (1, 2)
    ))


# --------------------------------------------------------------------------- reference parity
def test_parity_shared_branch(de_class):
    delta, sigma = _case(de_class, "nosv")
    result = mh.mahalanobis_distances(delta, sigma, EPS)
    assert result.branch == mh.BRANCH_SHARED
    assert "shared" in str(de_class["out_nosv_aux_mahalanobis_branch"])
    np.testing.assert_allclose(result.distances, de_class["out_nosv_mahalanobis_distances"],
                               rtol=1e-6)
    assert mh.diag_ratio(sigma) == pytest.approx(float(de_class["out_nosv_aux_diag_ratio"]),
                                                 rel=1e-12)
    df = int(de_class["out_nosv_mahalanobis_dof"])
    np.testing.assert_allclose(mh.chi2_neg_log10_ptp(result.distances, df),
                               de_class["out_nosv_neg_log10_ptp"], rtol=1e-6, atol=1e-6)


def test_parity_sample_variance_branch(de_class):
    delta, sigma = _case(de_class, "sv")
    q = _reference_q(de_class)
    assert q.shape == (80, 6, 40)
    result = mh.mahalanobis_distances(delta, sigma, EPS, q=q)
    assert result.branch == mh.BRANCH_WOODBURY
    assert "gene-specific" in str(de_class["out_sv_aux_mahalanobis_branch"])
    expected = de_class["out_sv_mahalanobis_distances"]
    np.testing.assert_allclose(result.distances, expected, rtol=1e-6)
    np.testing.assert_allclose(mh.mahalanobis_dense_reference(sigma, delta, q, EPS), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(mh.chi2_neg_log10_ptp(result.distances, 6),
                               de_class["out_sv_neg_log10_ptp"], rtol=1e-6, atol=1e-6)


def test_sample_variance_factor_is_bessel_covariance(de_class):
    means = de_class["out_sv_aux_sample_mean_landmarks_condition1"]
    q = mh.sample_variance_factor(means)
    g = 3
    np.testing.assert_allclose(q[:, :, g] @ q[:, :, g].T, np.cov(means[:, :, g].T, ddof=1),
                               atol=1e-14)


@pytest.mark.parametrize("samples", [2, 3, 5])
def test_reduced_sample_variance_factor_has_one_column_fewer_and_the_same_covariance(de_class, samples):
    means = np.concatenate([de_class["out_sv_aux_sample_mean_landmarks_condition1"]] * 2)[:samples]
    means = means + np.arange(samples)[:, None, None] * 0.1 * np.sin(np.arange(means.shape[1]))[None, :, None]
    full, reduced = mh.sample_variance_factor(means), mh.sample_variance_factor(means, reduced=True)
    assert reduced.shape == (full.shape[0], samples - 1, full.shape[2])
    for g in (0, 3):
        np.testing.assert_allclose(reduced[:, :, g] @ reduced[:, :, g].T, full[:, :, g] @ full[:, :, g].T,
                                   rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- Woodbury exactness
def _dense_numpy(sigma, delta, q, eps):
    out = []
    for g in range(delta.shape[1]):
        cov = sigma + q[:, :, g] @ q[:, :, g].T + eps * np.eye(len(sigma))
        out.append(np.sqrt(delta[:, g] @ scipy.linalg.solve(cov, delta[:, g], assume_a="pos")))
    return np.array(out)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(m=st.sampled_from([5, 50, 300]), s=st.sampled_from([1, 3, 6]),
       scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**16))
def test_woodbury_matches_dense_cholesky(m, s, scale, seed):
    rng = np.random.default_rng(seed)
    genes = 4
    a = rng.normal(size=(m, m))
    sigma = a @ a.T / m + 0.05 * np.eye(m)
    q = scale * rng.normal(size=(m, s, genes))
    delta = rng.normal(size=(m, genes))
    lower = mh.shared_cholesky(sigma, EPS)
    got = mh.mahalanobis_woodbury(lower, delta, q)
    want = _dense_numpy(sigma, delta, q, EPS)
    assert np.max(np.abs(got / want - 1.0)) <= 1e-8


def test_a_shared_factor_alone_gives_the_distances_of_sigma():
    """``branch_and_factor`` once, then ``sigma=None``: the same distances and branch."""
    rng = np.random.default_rng(3)
    m, genes = 20, 5
    sigma = np.cov(rng.normal(size=(m, 3 * m))) + 0.1 * np.eye(m)
    q, delta = rng.normal(size=(m, 3, genes)), rng.normal(size=(m, genes))
    for factor in (None, q):
        branch, lower = mh.branch_and_factor(sigma, EPS, factor is not None, False)
        full = mh.mahalanobis_distances(delta, sigma, EPS, q=factor)
        alone = mh.mahalanobis_distances(delta, None, EPS, q=factor, lower=lower)
        assert alone.branch == full.branch == branch
        np.testing.assert_allclose(alone.distances, full.distances, rtol=1e-12)
    with pytest.raises(ValueError, match="lower"):
        mh.mahalanobis_distances(delta, None, EPS, lower=np.full((m, m), np.nan))


def test_woodbury_gene_batches_are_independent():
    rng = np.random.default_rng(1)
    m, s, genes = 30, 4, 10
    sigma = np.cov(rng.normal(size=(m, 3 * m))) + 0.1 * np.eye(m)
    q, delta = rng.normal(size=(m, s, genes)), rng.normal(size=(m, genes))
    lower = mh.shared_cholesky(sigma, EPS)
    whole = mh.mahalanobis_woodbury(lower, delta, q)
    parts = np.concatenate([mh.mahalanobis_woodbury(lower, delta[:, i:i + 3], q[:, :, i:i + 3])
                            for i in range(0, genes, 3)])
    np.testing.assert_allclose(parts, whole, rtol=1e-13)


# --------------------------------------------------------------------------- other branches
def _nearly_diagonal(p, rng):
    sigma = np.diag(rng.uniform(0.5, 2.0, size=p))
    off = 1e-4 * rng.normal(size=(p, p))
    return sigma + off @ off.T


def test_diagonal_branch_floors_eps_and_ignores_empirical_variance():
    rng = np.random.default_rng(2)
    p, genes = 20, 5
    sigma = _nearly_diagonal(p, rng)
    sigma[3, 3] = 0.0  # floored to eps, not eps-added
    delta = rng.normal(size=(p, genes))
    v = rng.uniform(1.0, 5.0, size=(p, genes))
    assert mh.diag_ratio(sigma) > 0.95
    want = np.sqrt(np.sum(delta**2 / np.maximum(np.diag(sigma), EPS)[:, None], axis=0))
    for empirical in (None, v):
        result = mh.mahalanobis_distances(delta, sigma, EPS, empirical_var=empirical)
        assert result.branch == mh.BRANCH_DIAGONAL
        np.testing.assert_allclose(result.distances, want, rtol=1e-12)


def test_small_p_never_takes_diagonal_shortcut():
    rng = np.random.default_rng(3)
    sigma = _nearly_diagonal(10, rng)
    delta = rng.normal(size=(10, 4))
    assert mh.diag_ratio(sigma) > 0.95
    result = mh.mahalanobis_distances(delta, sigma, EPS)
    assert result.branch == mh.BRANCH_SHARED
    want = np.sqrt(np.einsum("pg,pg->g", delta, np.linalg.solve(sigma + EPS * np.eye(10), delta)))
    np.testing.assert_allclose(result.distances, want, rtol=1e-10)
    assert mh.select_branch(11, 0.96, False, False) == mh.BRANCH_DIAGONAL
    assert mh.select_branch(11, 0.95, False, False) == mh.BRANCH_SHARED
    assert mh.select_branch(11, 0.99, True, False) == mh.BRANCH_WOODBURY
    assert mh.select_branch(11, 0.99, True, True) == mh.BRANCH_DENSE


def test_factor_trick_matches_formula(de_class):
    delta, sigma = _case(de_class, "nosv")
    v = np.random.default_rng(4).uniform(1e-3, 1e-1, size=delta.shape)
    result = mh.mahalanobis_distances(delta, sigma, EPS, empirical_var=v)
    assert result.branch == mh.BRANCH_FACTOR_TRICK
    inv = np.linalg.inv(np.linalg.cholesky(sigma + EPS * np.eye(len(sigma))))
    z = inv @ delta
    want = np.sqrt(np.sum(z**2 / (1.0 + (inv * inv) @ v), axis=0))
    np.testing.assert_allclose(result.distances, want, rtol=1e-8)


def test_sample_and_empirical_variance_use_dense_per_gene(de_class):
    delta, sigma = _case(de_class, "sv")
    q = _reference_q(de_class)[:, :, :6]
    delta = delta[:, :6]
    v = np.full(delta.shape, 0.01)
    result = mh.mahalanobis_distances(delta, sigma, EPS, q=q, empirical_var=v)
    assert result.branch == mh.BRANCH_DENSE
    want = [np.sqrt(delta[:, g] @ np.linalg.solve(
        sigma + q[:, :, g] @ q[:, :, g].T + np.diag(v[:, g]) + EPS * np.eye(80), delta[:, g]))
        for g in range(6)]
    np.testing.assert_allclose(result.distances, want, rtol=1e-8)


# --------------------------------------------------------------------------- failures, inputs
def test_failed_shared_cholesky_gives_nan_with_warning():
    sigma = -np.eye(20) + 0.01
    lower = mh.shared_cholesky(sigma, EPS)
    assert mh.cholesky_failed(lower)
    with pytest.warns(RuntimeWarning, match="increase `eps`"):
        result = mh.mahalanobis_distances(np.ones((20, 3)), sigma, EPS)
    assert result.branch == mh.BRANCH_SHARED
    assert np.all(np.isnan(result.distances))


def test_dense_path_nan_only_for_failing_gene():
    p = 12
    sigma = np.eye(p)
    sigma[-1, -1] = -0.5
    q = np.zeros((p, 1, 2))
    q[-1, 0, 0] = 2.0  # gene 0: Σ + q qᵀ is positive definite; gene 1 is not
    delta = np.ones((p, 2))
    dense = mh.mahalanobis_dense_reference(sigma, delta, q, EPS)
    assert np.isfinite(dense[0]) and np.isnan(dense[1])
    with pytest.warns(RuntimeWarning):
        result = mh.mahalanobis_distances(delta, sigma, EPS, q=q)
    assert result.branch == mh.BRANCH_DENSE
    np.testing.assert_array_equal(np.isnan(result.distances), [False, True])


def test_ptp_keeps_nan_and_small_distances_distinct():
    out = mh.chi2_neg_log10_ptp(np.array([np.nan, 1e-3, 2e-3, 40.0]), 6)
    assert np.isnan(out[0]) and out[1] != out[2] and out[3] > 300


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": np.ones(5)}, "`delta`"),
        ({"delta": np.ones((4, 3))}, "`delta`"),
        ({"sigma": np.ones((5, 4))}, "`sigma`"),
        ({"q": np.ones((4, 2, 3))}, "`q`"),
        ({"q": np.ones((5, 2, 2))}, "`q`"),
        ({"q": np.ones((5, 3))}, "`q`"),
        ({"empirical_var": np.ones((5, 2))}, "`empirical_var`"),
    ],
)
def test_bad_shapes_name_the_argument(kwargs, match):
    args = {"delta": np.ones((5, 3)), "sigma": np.eye(5), "eps": EPS} | kwargs
    with pytest.raises(ValueError, match=match):
        mh.mahalanobis_distances(**args)


def test_bad_factor_inputs():
    with pytest.raises(ValueError, match="at least 2 samples"):
        mh.sample_variance_factor(np.ones((1, 5, 3)))
    with pytest.raises(ValueError, match="`q`"):
        mh.mahalanobis_woodbury(np.eye(5), np.ones((5, 3)), np.ones((5, 2, 4)))
