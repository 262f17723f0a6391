"""The landmark posterior fitted in the training cells' basis (fewer cells than landmarks)
gives the landmark form's numbers, which the reference cases pin (test_function_parity)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, load_case

import kompot_dask as kd
from kompot_dask._jax import with_x64
from kompot_dask.estimators import function
from kompot_dask.kernels import cell_basis

ALGEBRA = dict(atol=1e-10, rtol=1e-8)


@pytest.fixture
def landmark_form(monkeypatch):
    """Switch the cell-basis fit off (the landmark form of SPEC §3.3 runs for every fit)."""
    def use(on: bool) -> None:
        if on:
            monkeypatch.setattr(function.FunctionEstimator, "_in_cell_basis", lambda self, m, c, g: False)
        else:
            monkeypatch.undo()
    return use


def _fit(x, y, landmarks, ls):
    return kd.FunctionEstimator(landmarks=landmarks, gp_type="fixed", sigma=1.0, ls=ls).fit(x, y).predict


@pytest.mark.parametrize("cells,landmarks", [(60, "reference"), (500, "all cells")])
def test_cell_basis_gives_the_landmark_form(function_landmarks, landmark_form, cells, landmarks):
    case = function_landmarks
    x, y, xq, ls = case["in_X"][:cells], case["in_Y"][:cells], case["in_X_query"], float(case["out_ls"])
    u = case["in_landmarks"] if landmarks == "reference" else case["in_X"]  # the DE default: landmarks ⊇ cells
    assert len(x) < len(u)
    cell = _fit(x, y, u, ls)
    landmark_form(True)
    land = _fit(x, y, u, ls)
    assert cell.state.cell_basis is not None and cell.state.lb is None
    assert land.state.cell_basis is None and land.state.lb is not None
    # The weights solve against K_UU + jI, ill-conditioned when the landmarks are as close as
    # cells: they carry its rounding (~1e-7 relative here); the predictions below do not.
    assert cell.state.weights is None  # formed on first use
    scale = np.abs(land.weights).max()
    assert_close(cell.weights, land.weights, atol=1e-6 * scale, what="weights")
    for pts, name in ((xq, "queries"), (u, "landmarks"), (x, "training cells")):
        assert_close(cell(pts), land(pts), **ALGEBRA, what=f"mean at the {name}")
        assert_close(cell.covariance(pts), land.covariance(pts), atol=1e-12, rtol=1e-8, what=f"variance at the {name}")
    assert_close(cell.covariance(u, diag=False), land.covariance(u, diag=False), atol=1e-12, rtol=1e-8,
                 what="covariance at the landmarks")
    assert_close(cell.covariance(xq[:50], diag=False), land.covariance(xq[:50], diag=False), atol=1e-12, rtol=1e-8,
                 what="covariance at queries")


def test_cells_that_are_landmarks_fit_without_solving_against_lp(function_landmarks, monkeypatch):
    """Cells among the landmarks (the "all cells" case above) take ``fit_at_landmarks``
    (counted): its factors are those of the general cell-basis fit, with ``E`` and ``AᵀA``
    from ``j² P⁻¹`` instead of two solves against ``Lp``."""
    from kompot_dask.estimators import _shared_factors as shared
    from kompot_dask.kernels import covariance as cov
    from kompot_dask.kernels import posterior as post

    case = function_landmarks
    u, ls, jitter = case["in_X"], float(case["out_ls"]), 1e-6
    rows = np.arange(100, 600)
    x, y = u[rows], case["in_Y"][100:600]
    calls = []
    real = cell_basis.fit_at_landmarks
    monkeypatch.setattr(cell_basis, "fit_at_landmarks", lambda *a: calls.append(1) or real(*a))
    p = _fit(x, y, u, ls)
    assert len(calls) == 1
    lp = shared.prior_factor(u, ls, jitter)
    r = np.asfortranarray(y - p.state.mu)
    kernel = with_x64(lambda a, b: np.asarray(cov.matern52(a, b, ls), dtype=np.float64))
    general = cell_basis.fit(lp, np.asfortranarray(kernel(u, x)), r.copy(order="F"), 1.0, jitter, x)
    k_uu = kernel(u, u)
    j2 = post.lower_gram(jitter * post.triangular_inverse(lp))
    direct = real(k_uu, j2, rows, r.copy(order="F"), 1.0, jitter, x)
    assert_close(direct.e, general.e, atol=1e-12, rtol=0, what="E = K_UX - jG")
    assert_close(direct.lc, general.lc, atol=1e-10, rtol=0, what="chol(σ² I + AᵀA)")
    assert_close(direct.z, general.z, **ALGEBRA, what="z")
    assert direct.g is None  # formed on first use
    g = cell_basis.with_g(direct, j2, jitter).g
    assert_close(g, general.g, atol=1e-6 * np.abs(general.g).max(), what="G = P⁻¹ K_UX")
    assert_close(p.state.cell_basis.z, direct.z, atol=0, rtol=1e-12, what="the estimator's fit")


def test_the_landmark_form_runs_where_it_is_cheaper(function_landmarks):
    case = function_landmarks
    p = _fit(case["in_X"], case["in_Y"], case["in_landmarks"], float(case["out_ls"]))
    assert p.state.lb is not None and p.state.cell_basis is None  # 1,200 cells, 80 landmarks
    landmark, cell = cell_basis.fit_flops(5000, 2500, 4000)
    assert cell < 0.7 * landmark  # Kompot's DE default on a 5,000-cell atlas
    landmark, cell = cell_basis.fit_flops(5000, 10000, 4000)
    assert cell > landmark
    obs = kd.FunctionEstimator(landmarks=case["in_X"], gp_type="fixed", sigma=1.0, ls=float(case["out_ls"]),
                               obs_variance=True).fit(case["in_X"][:100], case["in_Y"][:100]).predict
    assert obs.state.lb is not None  # the observation-variance surface needs A Aᵀ


@pytest.mark.parametrize("variant", ["nosv", "sv"])
def test_differential_expression_in_the_cell_basis(landmark_form, variant):
    """DE on landmarks = all cells (Kompot's default up to 5,000 cells): every condition
    (and, with sample variance, every sample) has fewer cells than landmarks."""
    case = load_case("de_class")
    x1, x2 = case["in_X_condition1"][::3], case["in_X_condition2"][::3]
    y1, y2 = case["in_Y_condition1"][::3], case["in_Y_condition2"][::3]
    kwargs = {}
    if variant == "sv":
        kwargs = dict(condition1_sample_indices=case["in_condition1_sample_indices"][::3],
                      condition2_sample_indices=case["in_condition2_sample_indices"][::3])
    u = np.vstack([x1, x2])  # 667 landmarks for 300 + 367 cells

    def run(x):
        model = kd.DifferentialExpression().fit(x1, y1, x2, y2, landmarks=u, **kwargs)
        return model, model.predict(x, compute_mahalanobis=True)

    cells_out = run(u)[1]  # every query cell a landmark
    cell_model, cell = run(case["in_X_predict"])
    landmark_form(True)
    land_model, land = run(case["in_X_predict"])
    land_cells_out = run(u)[1]
    assert cell_model.function_predictor1.state.cell_basis is not None
    assert land_model.function_predictor1.state.cell_basis is None
    for key in ("condition1_imputed", "condition2_imputed", "fold_change", "fold_change_zscores", "mean_log_fold_change"):
        assert_close(cell[key], land[key], **ALGEBRA, what=key)
        assert_close(cells_out[key], land_cells_out[key], **ALGEBRA, what=f"{key} at the landmarks")
    for a, b in ((cell, land), (cells_out, land_cells_out)):
        assert_close(a["mahalanobis_distances"], b["mahalanobis_distances"], rtol=1e-8, what="mahalanobis")
        assert np.isfinite(a["mahalanobis_distances"]).all()


def test_means_at_the_landmarks_need_no_weights():
    """Cells = landmarks (Kompot's DE default up to 5,000 cells): imputation and the
    Mahalanobis differences come from (K_UX − jG) z; the weights G z are never formed."""
    case = load_case("de_class")
    x1, x2 = case["in_X_condition1"], case["in_X_condition2"]
    u = np.vstack([x1, x2])
    model = kd.DifferentialExpression().fit(x1, case["in_Y_condition1"], x2, case["in_Y_condition2"], landmarks=u)
    out = model.predict(u, compute_mahalanobis=True)
    p1, p2 = model.function_predictor1, model.function_predictor2
    assert p1.state.weights is None and p2.state.weights is None
    assert_close(out["condition2_imputed"], p2(u), **ALGEBRA, what="imputed 2")  # the predictor at landmarks: E z
    assert p2.state.weights is None
    by_weights = p1.predict_with(u, p1.weights, p1.state.mu)  # K_UU w: forms p1's weights
    assert p1.state.weights is not None
    assert_close(out["condition1_imputed"], by_weights, **ALGEBRA, what="imputed 1")


def test_the_prior_factor_leaves_the_exact_landmark_kernel(function_landmarks):
    from kompot_dask.estimators import _shared_factors as shared
    from kompot_dask.kernels import covariance as cov

    u, ls = function_landmarks["in_landmarks"] + 0.5, float(function_landmarks["out_ls"])  # not cached before
    lp = shared.prior_factor(u, ls, 1e-6, keep_kernel=True)
    calls = []
    real = cov.matern52
    try:
        cov.matern52 = lambda *a: calls.append(1) or real(*a)
        kept = shared.inducing_kernel(u, lp, ls)
    finally:
        cov.matern52 = real
    assert calls == []  # taken from the factor's computation, not evaluated again
    assert_close(kept, np.asarray(real(u, u, ls)), atol=0, what="K_UU")
