"""Results do not depend on how cells are chunked; landmark mode meets the full GP."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from conftest import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kompot_dask as kd


@pytest.fixture(scope="module")
def small(density_landmarks):
    rng = np.random.default_rng(0)
    x = density_landmarks["in_X"][:400]
    y = np.sin(x[:, :3] / 5.0) + 0.1 * rng.standard_normal((400, 3))
    return x, y, density_landmarks["in_landmarks"][:30]


def _density(x, u, chunk):
    with kd.set_options(cell_chunk_size=chunk):
        est = kd.DensityEstimator(landmarks=u, gp_type="fixed", d_method="fractal", ls_factor=10.0,
                                  predictor_with_uncertainty=True).fit(x)
        return est, est.predict(x), est.predict.uncertainty(x)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(min_value=7, max_value=399))
def test_density_independent_of_cell_chunks(small, chunk):
    x, _, u = small
    ref_est, ref_pred, ref_unc = _density(x, u, None)
    est, pred, unc = _density(x, u, chunk)
    z = ref_est.pre_transformation
    loss_ref, grad_ref = ref_est.loss_and_gradient(z)
    loss, grad = est.loss_and_gradient(z)
    assert_close(loss, loss_ref, rtol=1e-12, what="loss")
    assert_close(grad, grad_ref, atol=1e-10, what="gradient")
    assert_close(est.initial_value, ref_est.initial_value, atol=1e-10, what="initial value")
    assert_close(pred, ref_pred, atol=1e-6, what="log density")  # optimiser tolerance
    assert_close(unc, ref_unc, rtol=1e-5, what="uncertainty")


@pytest.mark.parametrize("chunks", [(400,), (1, 399), (150, 7, 200, 43), (33,) * 12 + (4,)])
def test_function_independent_of_uneven_dask_chunks(small, chunks):
    x, y, u = small
    ref = kd.FunctionEstimator(landmarks=u, gp_type="fixed", sigma=1.0, ls=30.0, obs_variance=True).fit(x, y)
    yd = da.from_array(y, chunks=(chunks, 3))
    est = kd.FunctionEstimator(landmarks=u, gp_type="fixed", sigma=1.0, ls=30.0, obs_variance=True).fit(x, yd)
    for name in ["__call__", "covariance", "obs_variance", "leverage"]:
        a = getattr(est.predict, name)(x)
        b = getattr(ref.predict, name)(x)
        assert_close(a, b, atol=1e-10, rtol=1e-8, what=name)


def test_zarr_expression_is_read_by_chunks(small, tmp_path):
    zarr = pytest.importorskip("zarr")
    x, y, u = small
    store = zarr.create_array(str(tmp_path / "y.zarr"), shape=y.shape, chunks=(64, 3), dtype="f8")
    store[:] = y
    a = kd.FunctionEstimator(landmarks=u, gp_type="fixed", sigma=1.0, ls=30.0).fit(x, store).predict(x)
    b = kd.FunctionEstimator(landmarks=u, gp_type="fixed", sigma=1.0, ls=30.0).fit(x, y).predict(x)
    assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_function_landmarks_equal_to_cells_meets_full_gp(small):
    x, y, _ = small
    x, y = x[:150], y[:150]
    full = kd.FunctionEstimator(gp_type="full", sigma=1.0, ls=30.0, obs_variance=True).fit(x, y)
    lm = kd.FunctionEstimator(landmarks=x, gp_type="fixed", sigma=1.0, ls=30.0, obs_variance=True).fit(x, y)
    assert full.gp_type == "full" and lm.gp_type == "fixed"
    xq = x + 0.5
    assert_close(lm.predict(xq), full.predict(xq), atol=1e-5, what="mean")  # jitter-level
    assert_close(lm.predict.covariance(xq), full.predict.covariance(xq), atol=1e-5, what="variance")
    assert_close(lm.predict.leverage(x), full.predict.leverage(x), atol=1e-5, what="leverage")
    assert_close(lm.predict.obs_variance(xq), full.predict.obs_variance(xq), atol=1e-5, rtol=1e-4)


def test_density_landmarks_equal_to_cells_meets_full_gp(density_full):
    x = density_full["in_X"][:200]
    kw = dict(d_method="fractal", ls_factor=10.0, predictor_with_uncertainty=True)
    full = kd.DensityEstimator(**kw).fit(x)
    lm = kd.DensityEstimator(landmarks=x, gp_type="fixed", **kw).fit(x)
    assert full.gp_type == "full" and lm.gp_type == "fixed"
    # L differs by jitter terms only (K Lp^-T = Lp - j Lp^-T), so densities agree to ~1e-3
    assert_close(lm.predict(x, normalize=True), full.predict(x, normalize=True), atol=2e-3)
    assert_close(lm.predict.covariance(x), full.predict.covariance(x), atol=1e-8)


@pytest.mark.parametrize("chunk", [None, 1, 97, 600])
def test_nn_distances_independent_of_chunks_and_query_order(density_full, chunk):
    """Searched in tree order by chunks, the distances are the exact ones in the cells' own order,
    bit for bit the same for every chunking (duplicated cells get 0)."""
    from scipy.spatial.distance import cdist

    from kompot_dask.estimators._neighbors import nn_distances

    x = np.vstack([density_full["in_X"], density_full["in_X"][:3]])  # 3 duplicated cells
    exact = cdist(x, x)
    np.fill_diagonal(exact, np.inf)
    with kd.set_options(cell_chunk_size=chunk):
        got = nn_distances(x)
        got32 = nn_distances(x, float32=True)
    assert_close(got, exact.min(axis=1), rtol=1e-12, what="float64 distances")
    assert (got[[0, 1, 2, -3, -2, -1]] == 0).all()
    with kd.set_options(cell_chunk_size=len(x)):
        np.testing.assert_array_equal(got32, nn_distances(x, float32=True))
    assert_close(got32[3:-3], density_full["out_nn_distances"][3:], rtol=2e-7, what="float32 as the reference")


def test_in_memory_blocks_take_batch_size_as_a_lower_bound():
    """Kompot's ``batch_size=100`` does not cut the products into 100-row slivers: an
    in-memory prediction takes at least ``batch_size`` cells per block and as many as one
    ``chunk_memory_bytes`` block holds; ``cell_chunk`` is taken as given."""
    from types import SimpleNamespace

    from kompot_dask.differential._runs import memory_blocks

    def predictor(m):
        return SimpleNamespace(state=SimpleNamespace(inducing=np.zeros((m, 3))))

    variance = SimpleNamespace(n_groups=3)
    with kd.set_options(chunk_memory_bytes=8 * 5000 * 400):  # 400 rows of 5000 float64 columns
        sizes = [b.stop - b.start for b in memory_blocks(1000, 100, None, (predictor(5000),))]
        assert sizes == [400, 400, 200]
        assert [b.stop - b.start for b in memory_blocks(1000, 700, None, (predictor(5000),))] == [700, 300]
        # genes x (1 + samples) wider than the landmarks: 5000 * 400 / (2000 * 4) = 250 rows
        sizes = [b.stop - b.start for b in memory_blocks(1000, 100, None, (predictor(500),), (variance,), 2000)]
        assert sizes == [256] * 3 + [232]  # cell_chunk_rows' floor of 256 rows
        assert [b.stop - b.start for b in memory_blocks(1000, 100, 37, (predictor(5000),))][:2] == [37, 37]


def test_variances_at_the_landmarks_come_from_sigma(monkeypatch):
    """When every query cell is an evaluation point (the landmarks are all the cells, as at
    Kompot's defaults up to 5,000 cells), the cells' latent variances are read from
    ``diag Σc`` and give what the per-chunk variance tasks give; the tasks that ran are
    counted at the pipeline's functions."""
    from kompot_dask.differential import pipeline
    from kompot_dask.testing import simulate_atlas

    atlas = simulate_atlas(n_cells=300, n_genes=12, n_samples=2, dims=3, seed=4)
    first = atlas.condition == atlas.condition[0]
    x1, x2 = atlas.x[first], atlas.x[~first]
    y = np.asarray(atlas.y, dtype=np.float64)
    model = kd.DifferentialExpression(n_landmarks=400, random_state=0).fit(x1, y[first], x2, y[~first])
    assert len(model.computed_landmarks) == 300  # at most n_landmarks cells: every cell is a landmark
    calls = {"sigma": 0, "chunk": 0}
    for name, key in (("_variance_from_sigma", "sigma"), ("_variance_task", "chunk")):
        inner = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda *a, _f=inner, _k=key: calls.__setitem__(_k, calls[_k] + 1) or _f(*a))
    order = np.random.default_rng(0).permutation(300)
    cells = atlas.x[order]
    reused = model.predict(cells, compute_mahalanobis=True, cell_chunk=64)
    assert calls == {"sigma": 5, "chunk": 0}
    off_map = np.vstack([cells, cells[:1] + 1e-3])  # one cell that is no landmark: per-chunk variances
    computed = model.predict(off_map, compute_mahalanobis=True, cell_chunk=64)
    assert calls == {"sigma": 5, "chunk": 5}
    for key in ("condition1_std", "condition2_std", "fold_change_zscores"):
        np.testing.assert_allclose(reused[key], computed[key][:300], rtol=1e-8, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(reused["mahalanobis_distances"], computed["mahalanobis_distances"], rtol=1e-12)


def test_distances_take_the_fold_changes_of_the_blocks(monkeypatch):
    """When the query cells are the evaluation points, a gene batch's distances take
    ``μ2 − μ1`` of its real genes from the expression blocks' fold changes and predict only
    its null genes' (the columns asked for are counted at the pipeline's function); they
    equal the distances of a run that predicts every column, and of a run on a subset of the
    cells (points not all covered: nothing taken), since the points are the same. The same
    holds with the query cells themselves as the points (``use_landmarks=False``)."""
    from kompot_dask.differential import pipeline
    from kompot_dask.testing import simulate_atlas

    atlas = simulate_atlas(n_cells=300, n_genes=12, n_samples=2, dims=3, seed=5)
    first = atlas.condition == atlas.condition[0]
    x1, x2 = atlas.x[first], atlas.x[~first]
    y = np.asarray(atlas.y, dtype=np.float64)
    model = kd.DifferentialExpression(n_landmarks=400, null_genes=9, random_state=0).fit(x1, y[first], x2, y[~first])
    asked = []
    inner = pipeline.mean_difference
    monkeypatch.setattr(pipeline, "mean_difference",
                        lambda m1, m2, pts, genes=None, *a: asked.append(range(21)[genes]) or inner(m1, m2, pts, genes, *a))
    cells = atlas.x[np.random.default_rng(1).permutation(300)]

    def run(query, hold=True, **kwargs):
        asked.clear()
        with monkeypatch.context() as patch:
            if not hold:  # too much to hold: every column predicted
                patch.setattr(pipeline, "HELD_DIFFERENCES_BYTES", 0)
            return model.predict(query, compute_mahalanobis=True, cell_chunk=64, gene_batch=5, **kwargs)

    # gene batches of 5: [0, 5) and [5, 10) real; [10, 15) = 2 real + 3 null; then nulls only
    taken = run(cells)
    assert sorted(c for r in asked for c in r) == list(range(12, 21))
    predicted = run(cells, hold=False)
    assert sorted(c for r in asked for c in r) == list(range(21))
    subset = run(cells[:200])
    for other in (predicted, subset):
        for key in ("mahalanobis_distances", "neg_log10_ptp", "local_fdr"):
            np.testing.assert_allclose(taken[key], other[key], rtol=1e-10, atol=1e-14, err_msg=key)
    np.testing.assert_array_equal(taken["is_de"], predicted["is_de"])
    # the distances at the query cells themselves (use_landmarks=False: P = X_new, SPEC §6.5)
    at_cells = run(cells, use_landmarks=False)
    assert sorted(c for r in asked for c in r) == list(range(12, 21))
    at_cells_predicted = run(cells, hold=False, use_landmarks=False)
    assert sorted(c for r in asked for c in r) == list(range(21))
    for key in ("mahalanobis_distances", "neg_log10_ptp", "local_fdr"):
        np.testing.assert_allclose(at_cells[key], at_cells_predicted[key], rtol=1e-10, atol=1e-14, err_msg=key)
