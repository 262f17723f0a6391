"""A landmark fit keeps its training cells' projections ``Lp⁻¹ k_U(x)`` for the variances at them.

The solves are counted at :func:`kompot_dask.kernels.posterior.solve_lower` (columns solved
against a model's ``Lp``), which the engine does not report about itself; the numbers are
compared with a pickled copy of the same predictor (which keeps nothing and solves) or a run
with the ``factor_rows_bytes`` option at 0.
"""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest

import kompot_dask as kd
from kompot_dask.estimators import DensityEstimator, FunctionEstimator
from kompot_dask.estimators import _kept_projections as kp
from kompot_dask.kernels import posterior as post


@pytest.fixture
def solved(monkeypatch):
    """``counts[id(lp)]``: columns solved against each lower factor, counted per call."""
    counts: dict[int, int] = {}
    inner = post.solve_lower

    def counting(lower, b, *args, **kwargs):
        b_arr = np.asarray(b)
        counts[id(lower)] = counts.get(id(lower), 0) + (b_arr.shape[1] if b_arr.ndim == 2 else 1)
        return inner(lower, b, *args, **kwargs)

    monkeypatch.setattr(post, "solve_lower", counting)
    return counts


def _conditions(seed=0):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.standard_normal((700, 4)), rng.standard_normal((600, 4)) + 0.3
    y1, y2 = rng.standard_normal((700, 5)), rng.standard_normal((600, 5))
    return rng, x1, y1, x2, y2, rng.standard_normal((150, 4))


def test_function_variances_read_both_fits_projections(solved):
    """Two fits on shared landmarks (more cells than landmarks: the landmark form) keep ``A``;
    the variances at a block of both conditions' cells and new cells solve for the new cells
    only, and equal those of pickled copies (nothing kept) to 1e-12."""
    rng, x1, y1, x2, y2, u = _conditions()
    p1 = FunctionEstimator(landmarks=u, gp_type="fixed", ls=2.0).fit(x1, y1).predict
    p2 = FunctionEstimator(landmarks=u, gp_type="fixed", ls=2.0).fit(x2, y2).predict
    assert p1.state.lp is p2.state.lp and len(p1.kept) == 700 and len(p2.kept) == 600
    new = rng.standard_normal((40, 4))
    query = np.vstack([x1[::3], new, x2[::2]])
    solved.clear()
    v1, v2 = p1.covariance(query), p2.covariance(query)
    assert solved[id(p1.state.lp)] == 40  # the new cells, once for both conditions
    c1, c2 = (pickle.loads(pickle.dumps(p)) for p in (p1, p2))
    assert c1.kept is None and c2.kept is None
    solved.clear()
    w1, w2 = c1.covariance(query), c2.covariance(query)
    assert solved[id(c1.state.lp)] + solved[id(c2.state.lp)] == 2 * len(query)
    np.testing.assert_allclose(v1, w1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(v2, w2, rtol=1e-12, atol=1e-14)
    # the full covariance between cells goes through the same projection
    np.testing.assert_allclose(p1.covariance(query[:60], diag=False), c1.covariance(query[:60], diag=False),
                               rtol=1e-12, atol=1e-14)


def test_kept_bytes_are_capped_by_the_option_and_released():
    """``factor_rows_bytes`` bounds all kept projections of the process together: at 0 nothing
    is kept; with room for one fit the second keeps nothing; dropping the models frees them."""
    _, x1, y1, x2, y2, u = _conditions(1)
    gc.collect()
    before = kp.kept_bytes()
    with kd.set_options(factor_rows_bytes=0):
        assert FunctionEstimator(landmarks=u, gp_type="fixed", ls=2.0).fit(x1, y1).predict.kept is None
    one = 8 * len(u) * len(x1)
    with kd.set_options(factor_rows_bytes=before + one + 8 * len(u) * len(x2) - 1):
        first = FunctionEstimator(landmarks=u, gp_type="fixed", ls=2.0).fit(x1, y1)
        second = FunctionEstimator(landmarks=u, gp_type="fixed", ls=2.0).fit(x2, y2)
    assert first.predict.kept is not None and first.predict.kept.nbytes == one
    assert second.predict.kept is None
    assert kp.kept_bytes() == before + one
    del first, second
    gc.collect()
    assert kp.kept_bytes() == before


def test_density_uncertainty_reads_the_fits_rows(solved):
    """A landmark density fit keeps ``L = K_XU Lp⁻ᵀ``; its uncertainty at its own cells solves
    nothing, at other cells only for those, and equals a pickled copy's to 1e-12."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((900, 4))
    density = DensityEstimator(n_landmarks=200, random_state=0, predictor_with_uncertainty=True).fit(x)
    predictor = density.predict
    assert density.gp_type != "full" and len(predictor.kept) == 900
    other = rng.standard_normal((30, 4)) + 0.2
    query = np.vstack([x[::2], other])
    solved.clear()
    var = predictor.uncertainty(query)
    mean, var_joint = predictor.log_density_and_uncertainty(query)
    assert solved.get(id(predictor.state.lp), 0) == 2 * 30
    copy = pickle.loads(pickle.dumps(predictor))
    assert copy.kept is None
    solved.clear()
    expected = copy.uncertainty(query)
    assert solved[id(copy.state.lp)] == len(query)
    np.testing.assert_allclose(var, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(var_joint, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(mean, copy(query))


def test_expression_and_abundance_runs_equal_without_kept_projections(solved):
    """``DifferentialExpression`` with 100 shared landmarks and ``DifferentialAbundance`` with
    100 landmarks per condition, predicted at every cell: fewer solves against the landmark
    factors with the projections kept, every result equal (1e-10) to a run with the
    ``factor_rows_bytes`` option at 0 (``de``) or to the same fits with their kept rows
    dropped (``da``: the option also decides how the density fit evaluates its objective)."""
    from kompot_dask.testing import simulate_atlas

    atlas = simulate_atlas(n_cells=500, n_genes=6, n_samples=2, dims=3, seed=3)
    first = atlas.condition == atlas.condition[0]
    x1, x2 = atlas.x[first], atlas.x[~first]
    y = np.asarray(atlas.y, dtype=np.float64)

    def de(limit):
        with kd.set_options(factor_rows_bytes=limit):
            model = kd.DifferentialExpression(n_landmarks=100, random_state=0).fit(x1, y[first], x2, y[~first])
            solved.clear()
            out = model.predict(atlas.x, compute_mahalanobis=True, cell_chunk=64)
            return out, solved.get(id(model.function_predictor1.state.lp), 0)

    kept, n_kept = de(2**30)
    plain, n_plain = de(0)
    assert n_kept == 0 < n_plain
    floats = [k for k, v in plain.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    assert {"fold_change_zscores", "mahalanobis_distances"} <= set(floats)
    for key in floats:
        np.testing.assert_allclose(kept[key], plain[key], rtol=1e-10, atol=1e-13, err_msg=key)

    def da(keep):
        model = kd.DifferentialAbundance(n_landmarks=100, random_state=0).fit(x1, x2)
        if not keep:
            for est in (model.density_estimator1, model.density_estimator2):
                est.predict.kept = None
        solved.clear()
        out = model.predict(atlas.x)
        return out, sum(solved.get(id(est.predict.state.lp), 0)
                        for est in (model.density_estimator1, model.density_estimator2))

    with_rows, n_rows = da(True)
    without, n_without = da(False)
    assert n_without == 2 * len(atlas.x) and n_rows == len(atlas.x)  # each density's own cells kept
    for key, value in without.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            np.testing.assert_allclose(with_rows[key], value, rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("estimator_type", ["function", "density"])
def test_per_sample_models_keep_nothing(estimator_type):
    """The sample variance asks its per-sample models for means only: their landmark fits keep
    no projections (which would hold memory, and room under ``factor_rows_bytes``, for
    nothing); the same fit outside it keeps them."""
    from kompot_dask.differential.sample_variance import SampleVarianceEstimator

    rng = np.random.default_rng(5)
    x, y, u = rng.standard_normal((800, 3)), rng.standard_normal((800, 2)), rng.standard_normal((120, 3))
    labels = np.repeat(["a", "b"], 400)
    settings = {"landmarks": u, "gp_type": "fixed"}
    gc.collect()
    before = kp.kept_bytes()
    model = SampleVarianceEstimator(estimator_type=estimator_type).fit(x, y, grouping_vector=labels,
                                                                     estimator_kwargs=settings)
    assert len(model.group_predictors) == 2
    assert all(p.kept is None for p in model.group_predictors.values())
    gc.collect()
    assert kp.kept_bytes() == before
    if estimator_type == "function":
        alone = FunctionEstimator(ls_factor=10.0, **settings).fit(x[:400], y[:400])
    else:
        alone = DensityEstimator(d_method="fractal", predictor_with_uncertainty=True, **settings).fit(x[:400])
    assert alone.predict.kept is not None and len(alone.predict.kept) == 400


def test_anndata_runs_release_what_their_fits_kept(solved):
    """``de()`` and ``da()`` read the projections their fits kept (fewer columns solved than
    with ``factor_rows_bytes=0``) and release them before returning: the model handed back by
    ``return_full_results`` holds none, and the process's kept bytes are back where they were."""
    anndata = pytest.importorskip("anndata")
    from conftest import DATA

    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    conditions = [str(c) for c in adata.obs["condition"].unique()[:2]]
    gp = kd.GPSettings(n_landmarks=100, random_state=0)
    output = kd.OutputSettings(progress=False, return_full_results=True)
    gc.collect()
    before = kp.kept_bytes()
    counts = {}
    for limit in (2**30, 0):
        solved.clear()
        with kd.set_options(factor_rows_bytes=limit):
            de_out = kd.de(adata.copy(), "condition", *conditions, gp=gp, fdr=kd.FDRSettings(null_genes=20),
                           output=output)
            da_out = kd.da(adata.copy(), "condition", *conditions, gp=gp, output=output)
        counts[limit] = sum(solved.values())
        de_model, da_model = de_out["model"], da_out["model"]
        assert de_model.function_predictor1.kept is None and de_model.function_predictor2.kept is None
        assert da_model.density_estimator1.predict.kept is None and da_model.density_estimator2.predict.kept is None
        del de_out, da_out, de_model, da_model
        gc.collect()
        assert kp.kept_bytes() == before
    assert counts[2**30] < counts[0]


def test_dry_run_counts_the_projections_the_fits_keep():
    """``de(..., dry_run=True)`` counts the projections of the conditions the engine fits in the
    landmark form (100 landmarks: both, 8 x 100 x cells bytes), none when all cells are the
    landmarks (the cells' basis), none with ``factor_rows_bytes=0``; the fits of the same
    call keep exactly the counted bytes."""
    anndata = pytest.importorskip("anndata")
    from conftest import DATA

    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    conditions = [str(c) for c in adata.obs["condition"].unique()[:2]]
    n_cells = int(adata.obs["condition"].isin(conditions).sum())
    plan = kd.de(adata, "condition", *conditions, gp=kd.GPSettings(n_landmarks=100), dry_run=True)
    assert plan["bytes"]["kept_projections"] == 8 * 100 * n_cells
    everything = kd.de(adata, "condition", *conditions, gp=kd.GPSettings(n_landmarks=5000), dry_run=True)
    assert everything["bytes"]["kept_projections"] == 0
    with kd.set_options(factor_rows_bytes=0):
        none = kd.de(adata, "condition", *conditions, gp=kd.GPSettings(n_landmarks=100), dry_run=True)
    assert none["bytes"]["kept_projections"] == 0
    labels = adata.obs["condition"].astype(str).to_numpy()
    x, y = np.asarray(adata.obsm["DM_EigenVectors"], dtype=np.float64), adata.X.toarray().astype(np.float64)
    first, second = labels == conditions[0], labels == conditions[1]
    model = kd.DifferentialExpression(n_landmarks=100, random_state=0).fit(x[first], y[first], x[second], y[second])
    kept = [model.function_predictor1.kept, model.function_predictor2.kept]
    assert sum(k.nbytes for k in kept) == plan["bytes"]["kept_projections"]
    # at 700 landmarks the engine's choice of form depends on the genes fitted: with 60
    # genes and no null genes both conditions (700 and 800 cells) take the landmark form
    # and keep; with Kompot's 2,000 null genes the 700-cell one is fitted in its cells' basis
    for null_genes, given in ((0, None), (2000, 2000)):
        planned = kd.de(adata, "condition", *conditions, gp=kd.GPSettings(n_landmarks=700),
                        fdr=kd.FDRSettings(null_genes=null_genes), dry_run=True)["bytes"]["kept_projections"]
        model = kd.DifferentialExpression(n_landmarks=700, random_state=0, null_genes=given).fit(
            x[first], y[first], x[second], y[second])
        kept = [p.kept for p in (model.function_predictor1, model.function_predictor2) if p.kept is not None]
        assert planned == sum(k.nbytes for k in kept) and len(kept) == (2 if null_genes == 0 else 1)
