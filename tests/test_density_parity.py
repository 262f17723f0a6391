"""DensityEstimator against the reference cases (reference README §3 tolerances)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import assert_close

import kompot_dask as kd

KOMPOT_SETTINGS = dict(d_method="fractal", predictor_with_uncertainty=True, ls_factor=10.0)
CASES = ["density_landmarks", "density_full"]


def _settings(case):
    kw = dict(KOMPOT_SETTINGS)
    if "in_landmarks" in case:
        kw.update(landmarks=case["in_landmarks"], gp_type="fixed")
    return kw


@pytest.fixture(scope="module", params=CASES)
def fitted(request):
    case = request.getfixturevalue(request.param)
    return case, kd.DensityEstimator(**_settings(case)).fit(case["in_X"])


@pytest.fixture(scope="module", params=CASES)
def fitted_ref_params(request):
    """Fitted with the reference's NN distances, d, mu and ls injected."""
    case = request.getfixturevalue(request.param)
    kw = _settings(case)
    kw.update(
        nn_distances=case["out_nn_distances"],
        d=float(case["out_d"]),
        mu=float(case["out_mu"]),
        ls=float(case["out_ls"]),
    )
    return case, kd.DensityEstimator(**kw).fit(case["in_X"])


def test_intermediates(fitted):
    case, est = fitted
    assert est.gp_type == str(case["out_gp_type"])
    assert est.n_obs == int(case["out_n_obs"]) == est.predict.n_obs
    assert_close(est.nn_distances, case["out_nn_distances"], rtol=2e-7, what="nn (float32 convention)")
    assert_close(est.d, case["out_d"], rtol=1e-10, what="fractal d")
    assert_close(est.mu, case["out_mu"], atol=1e-5, what="mu")
    assert_close(est.ls, case["out_ls"], rtol=1e-6, what="ls")
    assert_close(est.initial_value, case["out_initial_value"], atol=1e-5, what="initial value")
    assert_close(est.pre_transformation_std, case["out_s"], rtol=1e-3, what="Laplace s")
    assert est.optimizer_result.success


def test_outputs(fitted):
    case, est = fitted
    p = est.predict
    for where, x in [("train", case["in_X"]), ("query", case["in_X_query"])]:
        assert_close(p(x, normalize=True), case[f"out_log_density_{where}"], atol=1e-3, what=f"log density {where}")
        assert_close(p.covariance(x), case[f"out_covariance_diag_{where}"], atol=1e-9, rtol=1e-8, what=where)
        assert_close(p.mean_covariance(x), case[f"out_mean_covariance_diag_{where}"], atol=1e-9, rtol=2e-3)
        assert_close(p.uncertainty(x), case[f"out_uncertainty_{where}"], atol=1e-9, rtol=2e-3)
    unnormalised = p(case["in_X"]) - np.log(est.n_obs)
    assert_close(unnormalised, case["out_log_density_train"], atol=1e-3, what="normalize=False")


def test_loss_gradient_and_path_with_reference_parameters(fitted_ref_params):
    case, est = fitted_ref_params
    if "out_Lp" in case:
        assert_close(est.predict.state.lp, case["out_Lp"], atol=1e-10, what="Lp")
    assert_close(est.initial_value, case["out_initial_value"], atol=1e-5, what="initial value")
    for at in ["initial_value", "z"]:
        loss, grad = est.loss_and_gradient(case[f"out_{at}" if at == "z" else "out_initial_value"])
        assert_close(loss, case[f"out_loss_at_{at}"], atol=1e-4, rtol=1e-8, what=f"loss at {at}")
        assert_close(grad, case[f"out_grad_at_{at}"], atol=1e-9, what=f"gradient at {at}")
    # the optimiser replays the reference's L-BFGS-B path
    assert est.optimizer_result.nit == int(case["out_optimizer_iter_num"])
    assert_close(est.pre_transformation, case["out_z"], atol=1e-4, what="latent z")
    assert_close(est.optimizer_result.fun, case["out_optimizer_fun_val"], atol=1e-4, rtol=1e-8)


@pytest.mark.parametrize("n, d", [(600, 1.52), (2499, 2.18), (2501, 7.0)])
def test_float32_terms_are_the_reference_operations_bit_for_bit(density_full, n, d):
    """``mle``, ``mu``, ``ls``, ``V`` and ``Vd`` equal the reference's float32 JAX operations,
    each run alone, in every bit (numpy does the products and sums; fused in one jitted
    function they would differ in the last bit)."""
    import jax.numpy as jnp
    from jax.scipy.special import gammaln

    from kompot_dask._jax import x64
    from kompot_dask.kernels import density_params as dp

    rng = np.random.default_rng(n)
    nn = rng.choice(density_full["out_nn_distances"], n) * rng.uniform(0.5, 2.0, n).astype(np.float32)
    nn = nn.astype(np.float32).astype(np.float64)
    with x64():
        r = jnp.asarray(nn.astype(np.float32))
        c = (d * jnp.log(jnp.pi) / 2) - gammaln(d / 2 + 1)
        mle = gammaln(d / 2 + 1) - (d / 2) * jnp.log(jnp.pi) - d * jnp.log(r)
        expected = {
            "mle": np.asarray(mle, dtype=np.float64),
            "mu": float(jnp.quantile(mle, 0.01)) - 10.0,
            "ls": 10.0 * float(jnp.exp(jnp.log(r).mean() + 3.0)),
            "v": np.asarray(jnp.log(r) * d + c, dtype=np.float64),
            "vd": np.asarray(jnp.log(d) + ((d - 1) * jnp.log(r)) + c, dtype=np.float64),
        }
        v, vd = dp.likelihood_terms(nn, d, True)
        got = {"mle": dp.nn_log_density_mle(nn, d, True), "mu": dp.prior_mean(nn, d, True),
               "ls": dp.length_scale(nn, 10.0, True), "v": v, "vd": vd}
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_float64_arithmetic_stays_within_tolerance(density_landmarks):
    case = density_landmarks
    est = kd.DensityEstimator(nn_float32=False, **_settings(case)).fit(case["in_X"])
    assert_close(est.nn_distances, case["out_nn_distances"], rtol=5e-5, what="float64 nn")
    for where, x in [("train", case["in_X"]), ("query", case["in_X_query"])]:
        assert_close(est.predict(x, normalize=True), case[f"out_log_density_{where}"], atol=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_log_density_and_uncertainty_from_one_kernel_block(name, request, monkeypatch):
    """What differential abundance asks a predictor for: the two separate calls' numbers exactly,
    from one ``K_xZ`` per chunk of cells (counted at the kernel) where they take two."""
    from kompot_dask.estimators import density

    case = request.getfixturevalue(name)
    p = kd.DensityEstimator(**_settings(case)).fit(case["in_X"]).predict
    x = case["in_X_query"]
    calls = []
    kernel = density.cov.matern52
    monkeypatch.setattr(density.cov, "matern52", lambda *a: calls.append(len(a[0])) or kernel(*a))
    with kd.set_options(cell_chunk_size=128):
        both = p.log_density_and_uncertainty(x, normalize=True)
        assert calls == [128, 128, 44]
        separate = p(x, normalize=True), p.uncertainty(x)
        assert len(calls) == 9
    np.testing.assert_array_equal(both[0], separate[0])
    np.testing.assert_array_equal(both[1], separate[1])
    assert_close(both[0], case["out_log_density_query"], atol=1e-3, what="log density")
    assert_close(both[1], case["out_uncertainty_query"], atol=1e-9, rtol=2e-3, what="uncertainty")


def test_full_ridge_start_forms_no_gram(density_full, monkeypatch):
    """A full GP's ridge start ``Lpᵀ (I + K + jitter I)⁻¹ t`` is ``(I + Lpᵀ Lp)⁻¹ Lpᵀ t`` to
    rounding, without the ``Lᵀ L`` term (counted); the preconditioned optimiser, which needs
    ``chol(I + Lᵀ L)``, still forms it."""
    from kompot_dask.estimators import density
    from kompot_dask.kernels import posterior as post

    case, calls = density_full, []
    counted = density.gram_rhs
    monkeypatch.setattr(density, "gram_rhs", lambda *a: calls.append(1) or counted(*a))
    est = kd.DensityEstimator(**_settings(case)).fit(case["in_X"])
    assert est.gp_type == "full" and calls == []
    (chunk,) = est._objective.reducer.chunks
    gram, rhs = counted(chunk, est._objective.prior)
    factor = density._ridge_factor(gram)
    z0 = post.solve_lower_t(factor, post.solve_lower(factor, rhs))
    np.testing.assert_allclose(est.initial_value, z0, rtol=0, atol=1e-11 * np.abs(z0).max())
    assert_close(est.initial_value, case["out_initial_value"], atol=1e-5, what="initial value")
    kd.DensityEstimator(optimizer="preconditioned", **_settings(case)).fit(case["in_X"])
    assert calls == [1]


def test_full_covariances_match_diagonals(density_landmarks):
    case = density_landmarks
    est = kd.DensityEstimator(**_settings(case)).fit(case["in_X"])
    x = case["in_X_query"][:40]
    p = est.predict
    assert_close(np.diag(p.covariance(x, diag=False)), p.covariance(x), atol=1e-12)
    assert_close(np.diag(p.mean_covariance(x, diag=False)), p.mean_covariance(x), atol=1e-12)
    assert_close(np.diag(p.uncertainty(x, diag=False)), p.uncertainty(x), atol=1e-12)
    full = p.covariance(x, diag=False)
    assert_close(full, full.T, atol=1e-12, what="symmetry")


@pytest.mark.parametrize("name", CASES)
def test_preconditioned_optimizer_reaches_the_reference_optimum(name, request):
    """The opt-in preconditioned L-BFGS-B (not the reference's) lands on the same MAP within the
    reference's output tolerances, at a loss no worse than the reference's, in fewer iterations."""
    case = request.getfixturevalue(name)
    reference = kd.DensityEstimator(**_settings(case)).fit(case["in_X"])
    est = kd.DensityEstimator(optimizer="preconditioned", **_settings(case)).fit(case["in_X"])
    assert est.optimizer_result.success
    assert est.optimizer_result.nit < reference.optimizer_result.nit
    assert est.optimizer_result.fun <= reference.optimizer_result.fun + 1e-6 * abs(reference.optimizer_result.fun)
    loss, grad = est.loss_and_gradient(est.pre_transformation)
    assert_close(loss, est.optimizer_result.fun, rtol=1e-12, what="reported loss is the loss at the reported z")
    assert np.abs(grad).max() <= np.abs(reference.loss_and_gradient(reference.pre_transformation)[1]).max()
    for where, x in [("train", case["in_X"]), ("query", case["in_X_query"])]:
        assert_close(est.predict(x, normalize=True), case[f"out_log_density_{where}"], atol=1e-3, what=where)
        assert_close(est.predict.uncertainty(x), case[f"out_uncertainty_{where}"], atol=1e-9, rtol=2e-3)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*L-BFGS-B"):
        kd.DensityEstimator(optimizer="adam")


def test_the_log_reports_iterations_and_suggests_the_faster_optimizer(density_landmarks, caplog, monkeypatch):
    """Every fit logs its iterations; a slow reference fit hints at the preconditioned optimiser,
    and a fit stopped at ``maxiter`` warns (the default optimiser stays the reference's)."""
    from kompot_dask.estimators import density

    case = density_landmarks
    caplog.set_level(logging.INFO, logger="kompot_dask")
    est = kd.DensityEstimator(**_settings(case)).fit(case["in_X"])
    nit = est.optimizer_result.nit
    assert est.optimizer == "L-BFGS-B"
    assert f"density fit: L-BFGS-B, {nit} iterations" in caplog.text
    assert "preconditioned" not in caplog.text and nit <= density.SLOW_ITERATIONS

    caplog.clear()
    monkeypatch.setattr(density, "SLOW_ITERATIONS", nit - 1)
    kd.DensityEstimator(**_settings(case)).fit(case["in_X"])
    assert "optimizer='preconditioned' reaches the same optimum" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    caplog.clear()
    capped = kd.DensityEstimator(maxiter=3, **_settings(case)).fit(case["in_X"])
    assert capped.optimizer_result.nit == 3
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "stopped at its iteration limit (maxiter=3)" in warning.getMessage()


def test_kept_factor_rows_give_the_fit_without_them(density_landmarks, monkeypatch):
    """A landmark fit that keeps its rows ``L = K_XU Lp⁻ᵀ`` (``factor_rows_bytes``) takes the
    same optimiser path as one that evaluates the kernel per objective call, and never
    evaluates the kernel in its objective (counted at the kernel)."""
    from kompot_dask.kernels import density as dk

    case, calls = density_landmarks, []
    counted = dk.cells_loglik_grad
    monkeypatch.setattr(dk, "cells_loglik_grad", lambda *a, **k: calls.append(1) or counted(*a, **k))
    fits = {}
    for budget in (2**30, 0):
        calls.clear()
        with kd.set_options(factor_rows_bytes=budget):
            fits[budget] = kd.DensityEstimator(**_settings(case)).fit(case["in_X"])
        fits[budget].kernel_calls = len(calls)
    kept, recomputed = fits[2**30], fits[0]
    assert kept.kernel_calls == 0 and recomputed.kernel_calls >= recomputed.optimizer_result.nfev
    assert kept.optimizer_result.nit == recomputed.optimizer_result.nit
    z = recomputed.pre_transformation
    np.testing.assert_allclose(kept.pre_transformation, z, rtol=0, atol=1e-8 * np.abs(z).max())
    np.testing.assert_allclose(kept.pre_transformation_std, recomputed.pre_transformation_std, rtol=1e-8)
    x = case["in_X_query"]
    np.testing.assert_allclose(kept.predict(x), recomputed.predict(x), rtol=0, atol=1e-8)
    assert_close(kept.predict(x, normalize=True), case["out_log_density_query"], atol=1e-3)
    with kd.set_options(factor_rows_bytes=8 * len(case["in_X"]) * len(case["in_landmarks"]) - 1):
        calls.clear()
        kd.DensityEstimator(**_settings(case)).fit(case["in_X"])
    assert len(calls) > 0  # one byte short of the rows: the kernel is evaluated per call
