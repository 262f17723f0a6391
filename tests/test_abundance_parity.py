"""DifferentialAbundance against the reference (tests/data/da_class.npz, tolerances of its README §3)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, load_case
from kompot_dask import DifferentialAbundance, SampleVarianceEstimator

VARIANTS = ("nosv", "sv", "sync")


@pytest.fixture(scope="module")
def case():
    return load_case("da_class")


def _fit(case, variant, **extra):
    kwargs = {}
    if variant == "sv":
        kwargs = dict(
            condition1_sample_indices=case["in_condition1_sample_indices"],
            condition2_sample_indices=case["in_condition2_sample_indices"],
        )
    elif variant == "sync":
        kwargs = dict(sync_parameters=True)
    model = DifferentialAbundance(**extra).fit(
        case["in_X_condition1"], case["in_X_condition2"], landmarks=case["in_landmarks"], **kwargs
    )
    return model, model.predict(case["in_X_predict"])


@pytest.fixture(scope="module")
def fitted(case):
    return {v: _fit(case, v) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs(case, fitted, variant):
    _, out = fitted[variant]
    ref = {k: case[f"out_{variant}_{k}"] for k in out}
    for key in ("log_density_condition1", "log_density_condition2", "log_fold_change"):
        assert_close(out[key], ref[key], atol=2e-3, what=key)
    rtol = 5e-3 if variant == "sv" else 2e-3
    assert_close(out["log_fold_change_uncertainty"], ref["log_fold_change_uncertainty"], 1e-9, rtol, "variance")
    assert_close(out["log_fold_change_zscore"], ref["log_fold_change_zscore"], atol=2e-2, what="zscore")
    assert_close(out["neg_log10_fold_change_ptp"], ref["neg_log10_fold_change_ptp"], 2e-2, 1e-2, "ptp")
    # Directions: exact except cells within tolerance of a threshold (README §3).
    lfc, nl10 = ref["log_fold_change"], ref["neg_log10_fold_change_ptp"]
    borderline = (np.abs(np.abs(lfc) - 1.0) < 2e-3) | (np.abs(nl10 - -np.log10(0.05)) < 2e-2 + 1e-2 * nl10)
    direction = out["log_fold_change_direction"].astype(str)
    assert np.array_equal(direction[~borderline], ref["log_fold_change_direction"][~borderline])
    assert set(out) == {
        "log_density_condition1", "log_density_condition2", "log_fold_change",
        "log_fold_change_uncertainty", "log_fold_change_zscore", "neg_log10_fold_change_ptp",
        "log_fold_change_direction",
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_condition_estimators(case, fitted, variant):
    model, _ = fitted[variant]
    estimators = (model.density_estimator1, model.density_estimator2)
    pre = f"out_{variant}_aux_"
    assert [e.n_obs for e in estimators] == case[pre + "estimators_n_obs"][:2].tolist()
    assert_close([e.d for e in estimators], case[pre + "estimators_d"][:2], rtol=1e-10, what="d")
    assert_close([e.mu for e in estimators], case[pre + "estimators_mu"][:2], atol=1e-5, what="mu")
    assert_close([e.ls for e in estimators], case[pre + "estimators_ls"][:2], rtol=1e-6, what="ls")
    for c, est in enumerate(estimators, start=1):
        assert_close(est.nn_distances, case[f"{pre}condition{c}_nn_distances"], rtol=2e-7, what="nn")
        assert_close(est.pre_transformation_std, case[f"{pre}condition{c}_s"], rtol=1e-3, what="s")
        unc = est.predict.uncertainty(case["in_X_predict"])
        assert_close(unc, case[f"{pre}uncertainty_condition{c}"], 1e-9, 2e-3, "uncertainty")


def test_sample_variance_replicates(case, fitted):
    model, _ = fitted["sv"]
    params = []
    for c, vp in ((1, model.variance_predictor1), (2, model.variance_predictor2)):
        assert isinstance(vp, SampleVarianceEstimator) and vp.n_groups == 3
        assert list(vp.group_predictors) == case[f"out_sv_aux_sample_labels_condition{c}"].tolist()
        per_sample = vp.group_predictions(case["in_X_predict"])[:, :, 0]
        ref_per_sample = case[f"out_sv_aux_sample_log_density_condition{c}"]
        assert_close(per_sample, ref_per_sample, 1e-3, 1e-2, "replicate log density")
        variance = vp.predict(case["in_X_predict"], diag=True)[:, 0]
        assert_close(variance, case[f"out_sv_aux_sample_variance_condition{c}"], 1e-3, 1e-2, "sample variance")
        params += list(vp.group_parameters.values())
    ref_iters = case["out_sv_aux_estimators_optimizer_iter_num"][2:]
    assert [p["n_obs"] for p in params] == case["out_sv_aux_estimators_n_obs"][2:].tolist()
    assert_close([p["d"] for p in params], case["out_sv_aux_estimators_d"][2:], rtol=1e-10, what="replicate d")
    assert_close([p["ls"] for p in params], case["out_sv_aux_estimators_ls"][2:], rtol=1e-6, what="replicate ls")
    assert_close([p["mu"] for p in params], case["out_sv_aux_estimators_mu"][2:], atol=1e-5, what="replicate mu")
    assert len(ref_iters) == len(params)


def test_sync_parameters(case, fitted):
    model, _ = fitted["sync"]
    synced = model.synced_parameters
    assert_close(synced["d"], case["out_sync_aux_synced_d"], rtol=1e-10, what="synced d")
    assert_close(synced["mu"], case["out_sync_aux_synced_mu"], atol=1e-5, what="synced mu")
    assert_close(synced["ls"], case["out_sync_aux_synced_ls"], rtol=1e-6, what="synced ls")
    assert_close(model.synced_nn_distances, case["out_sync_aux_combined_nn_distances"], rtol=2e-7, what="nn")
    assert model.density_estimator1.ls == model.density_estimator2.ls == synced["ls"]
    assert model.density_estimator1.d_method == "manual"


def test_attributes_and_thresholds(case, fitted):
    model, out = fitted["nosv"]
    assert np.array_equal(model.log_fold_change, out["log_fold_change"])
    assert_close(model.log_fold_change_ptp, 10.0 ** -out["neg_log10_fold_change_ptp"], rtol=1e-12)
    # A looser LFC threshold can only call more cells; strict inequality at the threshold.
    loose = model.predict(case["in_X_predict"], log_fold_change_threshold=0.5)["log_fold_change_direction"]
    assert (loose != "neutral").sum() >= (out["log_fold_change_direction"] != "neutral").sum()
    lfc = out["log_fold_change"]
    at = model.predict(case["in_X_predict"], log_fold_change_threshold=float(np.abs(lfc).max()), ptp_threshold=1.0)
    assert (at["log_fold_change_direction"] == "neutral").all()


def test_injected_predictors_reproduce(case, fitted):
    model, out = fitted["sv"]
    injected = DifferentialAbundance(
        density_predictor1=model.density_predictor1,
        density_predictor2=model.density_predictor2,
        variance_predictor1=model.variance_predictor1,
        variance_predictor2=model.variance_predictor2,
    ).fit(case["in_X_condition1"], case["in_X_condition2"])
    again = injected.predict(case["in_X_predict"])
    assert injected.density_estimator1 is None
    for key in ("log_fold_change", "log_fold_change_uncertainty"):
        np.testing.assert_array_equal(again[key], out[key])


def test_batches_do_not_change_results(case, fitted):
    model, out = fitted["sv"]
    again = model.predict(case["in_X_predict"], cell_chunk=333)
    for key in ("log_fold_change", "log_fold_change_zscore", "neg_log10_fold_change_ptp"):
        assert_close(again[key], out[key], atol=1e-12, rtol=1e-12, what=key)


def test_preconditioned_optimizer_meets_reference_tolerances(case, fitted):
    """``optimizer="preconditioned"`` reaches the reference within its tolerances, for the condition
    and every replicate estimator, with fewer L-BFGS-B iterations than the reference's optimiser."""
    model = DifferentialAbundance().fit(
        case["in_X_condition1"],
        case["in_X_condition2"],
        landmarks=case["in_landmarks"],
        condition1_sample_indices=case["in_condition1_sample_indices"],
        condition2_sample_indices=case["in_condition2_sample_indices"],
        optimizer="preconditioned",
    )
    out = model.predict(case["in_X_predict"])
    for key in ("log_density_condition1", "log_density_condition2", "log_fold_change"):
        assert_close(out[key], case[f"out_sv_{key}"], atol=2e-3, what=key)
    assert_close(out["log_fold_change_uncertainty"], case["out_sv_log_fold_change_uncertainty"], 1e-9, 5e-3)
    assert_close(out["log_fold_change_zscore"], case["out_sv_log_fold_change_zscore"], atol=2e-2, what="zscore")
    reference, _ = fitted["sv"]
    for c in (1, 2):
        new, ref = (getattr(m, f"density_estimator{c}") for m in (model, reference))
        assert new.optimizer_result.nit < ref.optimizer_result.nit
    replicate_iters = [
        (p["iterations"], q["iterations"])
        for c in (1, 2)
        for p, q in zip(
            getattr(model, f"variance_predictor{c}").group_parameters.values(),
            getattr(reference, f"variance_predictor{c}").group_parameters.values(),
        )
    ]
    assert len(replicate_iters) == 6 and all(new < ref for new, ref in replicate_iters)
