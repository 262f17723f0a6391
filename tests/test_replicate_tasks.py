"""The relabelling null as tasks (issue #15): per-sample sums over (cell chunk × gene batch)
blocks and per-relabelling distances per gene batch, in this process and on a
multi-process cluster.

- the graph's numbers against a dense reference written from the definitions (weighted
  per-sample sums, each pseudo-condition's DTC fit, one dense Cholesky per gene);
- every block task gets one cell chunk × one gene batch of expression, nothing more;
- a 2-process LocalCluster gives the in-process numbers (1e-8), with the tasks on both workers;
- with a landmark on every cell (Kompot's 5,000 landmarks on up to 5,000 cells) the null runs
  in the cells' basis (:mod:`kompot_dask.differential._relabel_cells`): the same checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from conftest import assert_close

from kompot_dask._jax import with_x64
from kompot_dask.differential import _relabel, _relabel_cells, _relabel_graph
from kompot_dask.kernels import mahalanobis as mk
from kompot_dask.kernels.covariance import matern52
from kompot_dask.testing import condition_arrays, simulate_atlas

CHUNK = 300  # cells per stored chunk of the expression
BOOST = [0, 3, 7, 11, 19]


@pytest.fixture(scope="module")
def model():
    """A model fitted in this process on lazily read (dask) expression, 3 + 3 samples."""
    import dask.array as da

    from kompot_dask import DifferentialExpression

    c = condition_arrays(simulate_atlas(1200, 30, seed=5, effect="null"))
    y2 = c.y2.copy()
    y2[:, BOOST] += 2.0
    lazy = [da.from_array(y, chunks=(CHUNK, -1)) for y in (c.y1, y2)]
    return DifferentialExpression(n_landmarks=50, random_state=0).fit(
        c.x1, lazy[0], c.x2, lazy[1], condition1_sample_indices=c.samples1, condition2_sample_indices=c.samples2)


@pytest.fixture(scope="module")
def cell_model():
    """Landmarks on all 360 cells, expression read lazily: the null takes the cells' basis."""
    import dask.array as da

    from kompot_dask import DifferentialExpression

    c = condition_arrays(simulate_atlas(360, 12, seed=5, effect="null"))
    y2 = c.y2.copy()
    y2[:, [0, 5]] += 2.0
    lazy = [da.from_array(y, chunks=(100, -1)) for y in (c.y1, y2)]
    return DifferentialExpression(n_landmarks=400, random_state=0).fit(
        c.x1, lazy[0], c.x2, lazy[1], condition1_sample_indices=c.samples1, condition2_sample_indices=c.samples2)


@with_x64
def _reference(model, in2, points, balance):
    """Distances of one labelling (``in2``: samples in pseudo-condition 2) from the definitions."""
    x1, y1, l1, x2, y2, l2 = model._replicate_data
    xs, ys = (x1, x2), (np.asarray(y1), np.asarray(y2))
    gp = _relabel_graph.landmark_gp(model.function_predictor1, model._fit_kwargs)
    units = _relabel.sample_units(l1, l2)
    weights = _relabel.balance_weights(units, xs, gp.inducing, balance, 0) if balance else \
        [np.ones(len(r)) for r in units.rows]
    solve = lambda low, b, **kw: scipy.linalg.solve_triangular(low, b, lower=True, **kw)  # noqa: E731
    sums = []
    for c, rows, w in zip(units.condition, units.rows, weights):
        a = solve(gp.lp, np.asarray(matern52(gp.inducing, xs[c - 1][rows], gp.ls)))
        sums.append(((a * w) @ a.T, (a * w) @ (ys[c - 1][rows] - gp.mu)))
    k_pu = np.asarray(matern52(points, gp.inducing, gp.ls))
    a_p = solve(gp.lp, k_pu.T)
    prior = np.asarray(matern52(points, points, gp.ls)) - a_p.T @ a_p

    def fit(members):
        aat, a_r = sum(sums[i][0] for i in members), sum(sums[i][1] for i in members)
        lb = np.linalg.cholesky(np.eye(len(aat)) + aat / gp.noise)
        w = solve(gp.lp, solve(lb, solve(lb, a_r / gp.noise), trans="T"), trans="T")
        c = solve(lb, a_p)
        return gp.mu + k_pu @ w, prior + c.T @ c

    groups = [np.flatnonzero(~in2), np.flatnonzero(in2)]
    (m1, c1), (m2, c2) = fit(groups[0]), fit(groups[1])
    q = mk.concat_factors(*[mk.sample_variance_factor(np.stack([fit([i])[0] for i in g])) for g in groups])
    return mk.mahalanobis_dense_reference(c1 + c2, m2 - m1, q, model.eps)


@pytest.mark.parametrize("balance", [None, 30])
def test_distances_match_the_definition(model, balance):
    """The graph's distances (real labelling and one relabelling) against a dense reference
    at evaluation points other than the landmarks (the general formulas)."""
    points = model._replicate_data[0][::40][:25]
    model.compute_replicate_fdr(balance=balance, landmarks_override=points, gene_batch=7)
    result = model.replicate_null_result
    units = result.units
    identity = np.asarray(units.condition == 2)
    assert_close(result.observed, _reference(model, identity, points, balance), rtol=1e-8, atol=0, what="observed")
    r = 4
    assert_close(result.null[r], _reference(model, result.assignments[r], points, balance), rtol=1e-8, atol=0,
                 what="relabelled")


def test_each_block_task_gets_one_cell_chunk_and_one_gene_batch(model, monkeypatch):
    seen = []
    block = _relabel_graph._block_task

    def recording(gp, x, units, weights, n_units, y):
        assert isinstance(y, np.ndarray)
        seen.append(y.shape)
        return block(gp, x, units, weights, n_units, y)

    monkeypatch.setattr(_relabel_graph, "_block_task", recording)
    table = model.compute_replicate_fdr(gene_batch=7)
    np.testing.assert_array_equal(np.flatnonzero(table["is_de"].to_numpy()), BOOST)
    n1, n2 = (len(model._replicate_data[i]) for i in (0, 3))
    chunks = -(-n1 // CHUNK) + -(-n2 // CHUNK)
    assert len(seen) == chunks * 5  # 30 genes in batches of 7, 7, 7, 7, 2
    assert max(s[0] for s in seen) == CHUNK and sorted({s[1] for s in seen}) == [2, 7]


def _here_and_on_a_cluster(model, gene_batch):
    """The null in this process and on a 2-process LocalCluster (the active client: the
    expression is lazy), compared to 1e-8; returns the cluster's table, task keys and workers."""
    distributed = pytest.importorskip("distributed")
    here = model.compute_replicate_fdr(gene_batch=gene_batch)
    null_here = model.replicate_null_result
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GB",
                                  dashboard_address=":0") as lc, distributed.Client(lc) as client, \
            distributed.get_task_stream(client) as stream:
        there = model.compute_replicate_fdr(gene_batch=gene_batch)
    null_there = model.replicate_null_result
    assert_close(null_there.observed, null_here.observed, rtol=1e-8, atol=0, what="observed")
    assert_close(null_there.null, null_here.null, rtol=1e-8, atol=0, what="null")
    assert_close(there["pvalue"].to_numpy(), here["pvalue"].to_numpy(), rtol=1e-8, atol=0, what="pvalue")
    np.testing.assert_array_equal(there["is_de"].to_numpy(), here["is_de"].to_numpy())
    workers = {t["worker"] for t in stream.data if "kompot-replicate-" in str(t["key"])}
    return there, [str(t["key"]) for t in stream.data], workers


def test_a_multiprocess_cluster_gives_the_in_process_numbers(model):
    there, keys, workers = _here_and_on_a_cluster(model, 7)
    np.testing.assert_array_equal(np.flatnonzero(there["is_de"].to_numpy()), BOOST)
    n1, n2 = (len(model._replicate_data[i]) for i in (0, 3))
    blocks = (-(-n1 // CHUNK) + -(-n2 // CHUNK)) * 5
    assert sum(k.startswith("kompot-replicate-block-") for k in keys) == blocks
    assert sum("kompot-replicate-distances-" in k for k in keys) == 10 * 5  # real + 9 relabellings, 5 batches
    assert len(workers) == 2


def _counting(monkeypatch, name):
    """Count the calls of ``_relabel_cells.<name>`` (the graph looks it up when it is built)."""
    calls = []
    original = getattr(_relabel_cells, name)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_relabel_cells, name, counted)
    return calls


@pytest.mark.parametrize("at_landmarks", [True, False])
@pytest.mark.parametrize("balance", [None, 30])
def test_cell_basis_distances_match_the_definition(cell_model, balance, at_landmarks, monkeypatch):
    """Landmarks on every cell: the cells' basis runs (one ``cells`` task, counted), and its
    distances (real labelling and one relabelling) are the dense reference's, at the
    landmarks and elsewhere."""
    cells = _counting(monkeypatch, "cell_terms_task")
    x1 = cell_model._replicate_data[0]
    landmarks = cell_model.function_predictor1.landmarks
    assert len(landmarks) == len(x1) + len(cell_model._replicate_data[3])
    points = np.asarray(landmarks) if at_landmarks else x1[::7][:20] + 0.01
    cell_model.compute_replicate_fdr(balance=balance, landmarks_override=None if at_landmarks else points,
                                     gene_batch=5)
    result = cell_model.replicate_null_result
    assert len(cells) == 1
    identity = np.asarray(result.units.condition == 2)
    assert_close(result.observed, _reference(cell_model, identity, points, balance), rtol=1e-8, atol=0,
                 what="observed")
    r = 3
    assert_close(result.null[r], _reference(cell_model, result.assignments[r], points, balance), rtol=1e-8,
                 atol=0, what="relabelled")


def test_cell_basis_and_landmark_form_agree(cell_model, monkeypatch):
    """Forced into the landmark form, the same model gives the cells' basis numbers."""
    cell_model.compute_replicate_fdr(gene_batch=5)
    cells = cell_model.replicate_null_result
    monkeypatch.setattr(_relabel_cells, "cheaper", lambda *args: False)
    cell_model.compute_replicate_fdr(gene_batch=5)
    landmark = cell_model.replicate_null_result
    assert_close(cells.observed, landmark.observed, rtol=1e-9, atol=0, what="observed")
    assert_close(cells.null, landmark.null, rtol=1e-9, atol=0, what="null")


def test_cell_basis_is_chosen_for_few_cells_only():
    """5,000 landmarks: 5,000 cells in 3 + 3 samples take the cells' basis, 20,000 do not."""
    def groups(n):
        return [(n // 2, n // 2)] * 10

    assert _relabel_cells.cheaper(5000, 5000, 5000, groups(5000), [5000 // 6] * 6, 2000)
    assert not _relabel_cells.cheaper(5000, 5000, 20000, groups(20000), [20000 // 6] * 6, 2000)
    assert not _relabel_cells.cheaper(1000, 1000, 100_000, groups(100_000), [100_000 // 6] * 6, 2000)


def test_cell_basis_on_a_multiprocess_cluster_gives_the_in_process_numbers(cell_model):
    _, keys, workers = _here_and_on_a_cluster(cell_model, 5)
    assert sum(k.startswith("kompot-replicate-cells-") for k in keys) == 1
    assert sum(k.startswith("kompot-replicate-targets-") for k in keys) == 3  # 12 genes in batches of 5
    assert sum(k.startswith("kompot-replicate-block-") for k in keys) == 0
    assert len(workers) == 2
