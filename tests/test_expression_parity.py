"""DifferentialExpression against the reference (de_class.npz; null genes + FDR from anndata_de_da.npz)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, load_case
from kompot_dask import DifferentialExpression
from kompot_dask.kernels import mahalanobis as mk

VARIANTS = ("nosv", "sv")
ALGEBRA = dict(atol=1e-10, rtol=1e-8)


@pytest.fixture(scope="module")
def case():
    return load_case("de_class")


def _fit(case, variant, **extra):
    kwargs = {}
    if variant == "sv":
        kwargs = dict(
            condition1_sample_indices=case["in_condition1_sample_indices"],
            condition2_sample_indices=case["in_condition2_sample_indices"],
        )
    model = DifferentialExpression(**extra).fit(
        case["in_X_condition1"], case["in_Y_condition1"], case["in_X_condition2"], case["in_Y_condition2"],
        landmarks=case["in_landmarks"], **kwargs,
    )
    return model, model.predict(case["in_X_predict"], compute_mahalanobis=True)


@pytest.fixture(scope="module")
def fitted(case):
    return {v: _fit(case, v) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_returned_key(case, fitted, variant):
    model, out = fitted[variant]
    for key in case[f"out_{variant}_returned_keys"]:
        ref = case[f"out_{variant}_{key}"]
        if key in ("mahalanobis_distances",):
            assert_close(out[key], ref, rtol=1e-6, what=key)
        elif key == "neg_log10_ptp":
            assert_close(out[key], ref, atol=1e-6, rtol=1e-6, what=key)
        else:  # ls comes from our own NN distances, in the reference's float32 arithmetic
            assert_close(out[key], ref, **ALGEBRA, what=key)
    assert_close(model.ls, case[f"out_{variant}_ls_condition1"], rtol=1e-6, what="ls")
    # The documented names are the same arrays as Kompot 0.8.0's.
    assert out["condition1_imputed"] is out["condition1_smoothed"]
    assert out["condition2_imputed"] is out["condition2_smoothed"]


def test_branches(case, fitted):
    assert fitted["nosv"][0].mahalanobis_branch == mk.BRANCH_SHARED
    assert fitted["sv"][0].mahalanobis_branch == mk.BRANCH_WOODBURY
    assert_close(mk.diag_ratio(case["out_nosv_aux_posterior_cov_sum_landmarks"]), case["out_nosv_aux_diag_ratio"],
                 rtol=1e-12)


def test_sample_factor_matches_replicate_means(case, fitted):
    model, _ = fitted["sv"]
    for c, vp in ((1, model.variance_predictor1), (2, model.variance_predictor2)):
        assert list(vp.group_predictors) == case[f"out_sv_aux_sample_labels_condition{c}"].tolist()
        means = vp.group_predictions(case["in_landmarks"])
        assert_close(means, case[f"out_sv_aux_sample_mean_landmarks_condition{c}"], **ALGEBRA, what="sample means")


def test_alternative_ptp_uses_the_number_of_points(fitted):
    _, out = fitted["nosv"]
    expected = mk.chi2_neg_log10_ptp(out["mahalanobis_distances"], 80)
    np.testing.assert_allclose(out["neg_log10_ptp_df_points"], expected, rtol=1e-14)


def test_mahalanobis_at_cells_reuses_fold_change(case, fitted):
    model, out = fitted["nosv"]
    x = case["in_X_predict"][:60]
    at_cells = model.compute_mahalanobis_distances(x, use_landmarks=False)
    with_fc = model.compute_mahalanobis_distances(x, fold_change=out["fold_change"][:60], use_landmarks=False)
    assert_close(with_fc, at_cells, rtol=1e-9, what="reused fold change")
    override = model.compute_mahalanobis_distances(x, landmarks_override=case["in_landmarks"])
    assert_close(override, out["mahalanobis_distances"], rtol=1e-12, what="override = landmarks")


def test_gene_and_cell_batches_do_not_change_results(case, fitted):
    import kompot_dask

    model, out = fitted["sv"]
    with kompot_dask.set_options(gene_batch_size=7):
        again = model.predict(case["in_X_predict"], cell_chunk=37)
    for key in ("condition1_imputed", "condition2_std", "fold_change_zscores", "mean_log_fold_change"):
        assert_close(again[key], out[key], atol=1e-12, rtol=1e-12, what=key)


def test_null_genes_and_fdr_match_reference():
    z = load_case("anndata_de_da")
    cond = z["in_obs_condition"]
    x, y = z["in_obsm_DM_EigenVectors"], z["in_X"]
    m1, m2 = cond == z["in_condition1"], cond == z["in_condition2"]
    genes = z["in_var_names"].tolist()
    model = DifferentialExpression(batch_size=100, null_genes=100, null_seed=42, gene_names=genes).fit(
        x[m1], y[m1], x[m2], y[m2], landmarks=z["out_A_da_uns__kompot_da__landmarks"]
    )
    assert model.null.indices.tolist() == z["out_A_de_return_null__gene_indices"].tolist()
    assert model.null.names == z["out_A_de_return_null__gene_names"].tolist()
    out = model.predict(x, compute_mahalanobis=True)
    assert out["fold_change"].shape == (1500, 60) and out["mahalanobis_distances"].shape == (60,)
    assert_close(model.null_mahalanobis_distances, z["out_A_de_return_null__mahalanobis"], rtol=1e-6, what="null")
    field = "out_A_de_var__kompot_de_control_day_0_to_stim_2_5h_"
    assert_close(out["mahalanobis_distances"], z[field + "mahalanobis"], rtol=1e-6, what="mahalanobis")
    assert_close(out["mean_log_fold_change"], z[field + "mean_lfc"], atol=1e-10, rtol=1e-8, what="mean lfc")
    np.testing.assert_array_equal(out["mahalanobis_pvalue"], z[field + "mahalanobis_pvalue"])
    assert_close(out["local_fdr"], z[field + "mahalanobis_local_fdr"], atol=1e-10, rtol=1e-9, what="lfdr")
    assert_close(out["tail_fdr"], z[field + "mahalanobis_tail_fdr"], atol=1e-10, rtol=1e-9, what="tail fdr")
    np.testing.assert_array_equal(out["is_de"], z[field + "is_de"])
    again = model.compute_fdr(threshold=0.05)
    np.testing.assert_array_equal(again["is_de"].to_numpy(), out["is_de"])
