"""The engine: the same numbers in memory, in zarr stores and on a multi-process cluster (to TOL); resume; faults."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import zarr

from conftest import load_case
import kompot_dask as kd
from kompot_dask.parallel import predict_abundance, predict_expression
from kompot_dask.differential import pipeline as engine

# Store and cluster results against in-memory ones. A cluster is not bit-identical to this
# process: dask starts its worker processes with OMP/OPENBLAS/MKL_NUM_THREADS=1, this process
# uses every core, and some OpenBLAS kernels (the Haswell/Zen ones, e.g. on AMD EPYC without
# AVX-512) round differently with 1 and 2 threads; JAX's triangular solves run on that BLAS.
# Measured on 2 cores with OPENBLAS_CORETYPE=Zen: predictions on the `cluster` fixture need
# rtol <= 2e-11 (atol 1e-12); with worker BLAS threads equal to ours they are bit-identical.
TOL = dict(rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def case():
    return load_case("de_class")


def _labels(case):
    return dict(condition1_sample_indices=case["in_condition1_sample_indices"],
                condition2_sample_indices=case["in_condition2_sample_indices"])


def _fit_de(case):
    return kd.DifferentialExpression(null_genes=25).fit(
        case["in_X_condition1"], case["in_Y_condition1"], case["in_X_condition2"], case["in_Y_condition2"],
        landmarks=case["in_landmarks"], **_labels(case))


def _fit_da(case):
    return kd.DifferentialAbundance().fit(case["in_X_condition1"], case["in_X_condition2"],
                                          landmarks=case["in_landmarks"], **_labels(case))


@pytest.fixture(scope="module")
def de_model(case):
    return _fit_de(case)


@pytest.fixture(scope="module")
def de_reference(case, de_model):
    return de_model.predict(case["in_X_predict"], compute_mahalanobis=True)


@pytest.fixture(scope="module")
def da_model(case):
    return _fit_da(case)


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GB",
                                  dashboard_address=":0") as lc:
        yield lc


def _assert_same(ds, reference, keys=None):
    for key in keys or reference:
        if key in ds:
            got, want = ds[key].values, np.asarray(reference[key])
            if want.dtype == object or want.dtype == bool:
                np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=key)
            else:
                np.testing.assert_allclose(got, want, err_msg=key, **TOL)


@pytest.mark.parametrize("cell_chunk, gene_batch", [(250, 40), (37, 9)])
def test_expression_store_matches_in_memory(case, de_model, de_reference, tmp_path, cell_chunk, gene_batch):
    ds = predict_expression(de_model, case["in_X_predict"], str(tmp_path / "de.zarr"),
                            cell_chunk=cell_chunk, gene_batch=gene_batch)
    assert ds.attrs["kompot_dask"]["complete"]
    assert ds["fold_change"].dims == ("cell", "gene") and ds["fold_change"].chunks[0][0] == cell_chunk
    _assert_same(ds, de_reference)
    replicate = {"replicate_pvalue", "replicate_fdr", "replicate_is_de", "fdr_null"}
    assert set(de_reference) - set(ds) == {"condition1_smoothed", "condition2_smoothed"} | replicate
    # With a store the relabelling calls (on by default with sample labels) stay on the model.
    table = de_model.replicate_fdr_results
    np.testing.assert_allclose(table["pvalue"].to_numpy(), de_reference["replicate_pvalue"], **TOL)
    np.testing.assert_array_equal(table["is_de"].to_numpy(), de_reference["replicate_is_de"])


def test_float32_layers(case, de_model, de_reference, tmp_path):
    ds = predict_expression(de_model, case["in_X_predict"], str(tmp_path / "de32.zarr"), dtype="float32",
                            compute_mahalanobis=False)
    assert ds["condition1_imputed"].dtype == np.float32
    np.testing.assert_allclose(ds["condition1_imputed"].values, de_reference["condition1_imputed"], rtol=1e-6)


def test_abundance_store_matches_in_memory(case, da_model, tmp_path):
    reference = da_model.predict(case["in_X_predict"])
    ds = predict_abundance(da_model, case["in_X_predict"], str(tmp_path / "da.zarr"), cell_chunk=77)
    _assert_same(ds, reference)


def test_multiprocess_cluster_gives_the_same_numbers(case, de_reference, da_model, cluster, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream:
            de = _fit_de(case)  # per-sample fits run as tasks on the workers
            da = _fit_da(case)
        ds = predict_expression(de, case["in_X_predict"], str(tmp_path / "de.zarr"), cell_chunk=64,
                                gene_batch=16, client=client)
        dsa = predict_abundance(da, case["in_X_predict"], str(tmp_path / "da.zarr"), cell_chunk=500, client=client)
    sample_tasks = {t["key"] for t in stream.data if str(t["key"]).startswith("kompot-fit-sample-")}
    _assert_same(ds, de_reference)
    reference = da_model.predict(case["in_X_predict"])
    # The per-sample fits ran on single-threaded worker BLAS: last-bit differences, within TOL.
    _assert_same(dsa, reference)
    assert len(sample_tasks) == 12  # 3 + 3 samples for DE and for DA, each its own named task
    # n_obs, ls, d, mu come from nearest-neighbour distances without BLAS (the same bits in any
    # process); the L-BFGS iteration counts were equal under every BLAS setting we measured.
    assert da.variance_predictor1.group_parameters == da_model.variance_predictor1.group_parameters


def test_progress_bar_shows_a_cluster_run(case, da_model, cluster, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(cluster) as client, kd.set_options(progress=True):
        ds = predict_abundance(da_model, case["in_X_predict"], str(tmp_path / "da.zarr"), cell_chunk=100,
                               client=client)
    printed = capsys.readouterr()
    assert "100% Completed" in printed.out + printed.err
    assert ds.attrs["kompot_dask"]["complete"]
    _assert_same(ds, da_model.predict(case["in_X_predict"]))


def test_distances_take_the_fold_changes_on_a_cluster(cluster, tmp_path, monkeypatch):
    """On a multi-process cluster, with every cell a landmark, each real-gene Mahalanobis task
    depends on its gene batch's expression blocks (it takes their fold changes, which travel
    between the workers), and the store holds the distances of an in-memory run that
    predicts every column (to TOL: single-threaded worker BLAS)."""
    import dask
    import xarray as xr
    distributed = pytest.importorskip("distributed")
    from kompot_dask.testing import simulate_atlas

    atlas = simulate_atlas(n_cells=300, n_genes=12, n_samples=2, dims=3, seed=5)
    first = atlas.condition == atlas.condition[0]
    y = np.asarray(atlas.y, dtype=np.float64)
    model = kd.DifferentialExpression(n_landmarks=400, null_genes=9, random_state=0).fit(
        atlas.x[first], y[first], atlas.x[~first], y[~first])
    cells = atlas.x[np.random.default_rng(1).permutation(300)]
    with monkeypatch.context() as patch:
        patch.setattr(engine, "HELD_DIFFERENCES_BYTES", 0)
        reference = model.predict(cells, compute_mahalanobis=True, cell_chunk=64, gene_batch=5)
    path = str(tmp_path / "de.zarr")
    with distributed.Client(cluster) as client:
        graph = predict_expression(model, cells, path, cell_chunk=64, gene_batch=5, client=client, compute=False)
        dsk = dict(graph.__dask_graph__())
        deps = {str(k): {str(d) for d in dask.core.get_dependencies(dsk, k)} for k in dsk}
        client.compute(graph).result()
    for j in range(5):  # gene batches of 5 over 12 real + 9 null genes: 0-2 hold real genes
        taken = {d for d in deps[f"kompot-mahalanobis-genes-{j}-" + _tag(deps)] if "predict-expression" in d}
        assert len(taken) == (5 if j < 3 else 0), j  # 300 cells in 5 chunks of 64
    ds = xr.open_zarr(path, consolidated=False)
    assert ds.attrs["kompot_dask"]["complete"]
    _assert_same(ds, reference, ["mahalanobis_distances", "neg_log10_ptp", "local_fdr", "fold_change"])


def _tag(keys) -> str:
    """The run tag that ends every task name of one graph."""
    (tag,) = {k.rsplit("-", 1)[1] for k in keys if k.startswith("kompot-mahalanobis-genes-")}
    return tag


def _row_terms(chunk, scale):
    """A reducer term with a large (outer product) and a small result."""
    return np.outer(chunk, chunk) * scale, float(chunk.sum())


def test_large_chunk_results_are_gathered_a_window_at_a_time(cluster, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from kompot_dask.execution.reduce import LocalChunks
    from kompot_dask.execution import reduce as cluster_reduce

    rng = np.random.default_rng(7)
    chunks = [rng.normal(size=50) for _ in range(9)]
    expected = LocalChunks(chunks).reduce(_row_terms, 0.5)
    monkeypatch.setattr(cluster_reduce, "GATHER_BYTES", 3 * 50 * 50 * 8 + 100)  # 3 results per window
    with distributed.Client(cluster) as client:
        gathered = []
        real_gather = client.gather
        monkeypatch.setattr(client, "gather", lambda fs: gathered.append(len(fs)) or real_gather(fs))
        with cluster_reduce.ClusterChunks(client, chunks, "window") as reducer:
            first = reducer.reduce(_row_terms, 0.5)
            second = reducer.reduce(_row_terms, 0.5)
    assert gathered == [1, 3, 3, 2] + [3, 3, 3]  # probe one chunk, then windows of 3 in chunk order
    for got in (first, second):
        # Element-wise numpy terms (no BLAS), the same additions in the same order: the same bits.
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1] == expected[1]


def _assert_close_to_scale(got, want, rel=1e-8):
    """``|got - want| <= rel (|want| + max |want|)``: relative to the element or the array's scale."""
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * float(np.max(np.abs(want))))


def test_density_fit_reduces_over_chunks_on_the_workers(case, cluster):
    """Condition-level density fits evaluate their objective as one task per cell chunk."""
    distributed = pytest.importorskip("distributed")
    x1 = case["in_X_condition1"]
    with kd.set_options(cell_chunk_size=61):
        local = kd.DensityEstimator(landmarks=case["in_landmarks"], d_method="fractal", ls_factor=10,
                                    predictor_with_uncertainty=True).fit(x1)
        with distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream:
            remote = kd.DensityEstimator(landmarks=case["in_landmarks"], d_method="fractal", ls_factor=10,
                                         predictor_with_uncertainty=True).fit(x1)
    keys = [str(t["key"]) for t in stream.data]
    n_chunks = -(-len(x1) // 61)
    evaluations = remote.optimizer_result.nfev
    assert sum(k.startswith("kompot-density-loglik-grad-") for k in keys) == n_chunks * evaluations
    assert sum(k.startswith("kompot-density-gram-rhs-") for k in keys) == n_chunks
    assert sum(k.startswith("kompot-density-hessian-diag-") for k in keys) == n_chunks
    workers = {t["worker"] for t in stream.data if str(t["key"]).startswith("kompot-density-loglik-grad-")}
    assert len(workers) == 2
    # Not bit-identical (see TOL): the workers' chunk terms use single-threaded BLAS, and the
    # L-BFGS path carries their last-bit differences to the optimum. Measured on 2 cores
    # (OPENBLAS_CORETYPE=Zen), this process at 1 vs 2 BLAS threads: |dz| <= 1.0e-10 = 8.5e-12
    # of max|z| (4.9e-9 relative on a z element of 0.02); last-bit input perturbations move
    # z by the same amount (<= 6.0e-9 element-wise over 45 pairs); with worker BLAS threads
    # equal to ours, every number here is bit-identical. Hence 1e-8 of each array's scale.
    assert remote.optimizer_result.nit == local.optimizer_result.nit  # 47 in every run measured
    _assert_close_to_scale(remote.pre_transformation, local.pre_transformation)
    _assert_close_to_scale(remote.pre_transformation_std, local.pre_transformation_std)
    _assert_close_to_scale(remote.predict(case["in_X_predict"]), local.predict(case["in_X_predict"]))


def test_kmeans_on_the_cluster_matches_in_process(cluster, caplog):
    """Lloyd steps as one task per chunk, with per-worker Hamerly bounds: the same centres, bit for bit."""
    distributed = pytest.importorskip("distributed")
    from kompot_dask.estimators._landmarks import kmeans_landmarks

    rng = np.random.default_rng(8)
    x = np.vstack([c + rng.normal(size=(400, 3)) for c in rng.normal(scale=6.0, size=(8, 3))])
    with kd.set_options(cell_chunk_size=450):
        local = kmeans_landmarks(x, 40, random_state=1)
        with distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream, \
                caplog.at_level("INFO", logger="kompot_dask"):
            remote = kmeans_landmarks(x, 40, random_state=1)
    # the workers kept their chunks' bounds between steps: most cells skipped the full distances
    (line,) = [r.getMessage() for r in caplog.records if "Lloyd steps" in r.getMessage()]
    assert float(line.split("; ")[1].split("%")[0]) < 50.0, line
    steps = [t for t in stream.data if str(t["key"]).startswith("kompot-kmeans-lloyd-step-")]
    assert len(steps) % 8 == 0 and len(steps) >= 16  # 8 chunks per step, several steps
    assert len({t["worker"] for t in steps}) == 2
    # Exact across processes: centres are bincount sums of the cells assigned to them, and the
    # assignments come from 256 x 3 @ 3 x 40 distance blocks, far below OpenBLAS's threading
    # threshold, so every process computes them with the same single-threaded kernel.
    np.testing.assert_array_equal(remote, local)


def test_nn_distances_on_the_cluster_match_in_process(cluster):
    """One search task per chunk against the shared tree, on both workers: the same bits."""
    distributed = pytest.importorskip("distributed")
    from kompot_dask.estimators._neighbors import nn_distances

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 5))
    with kd.set_options(cell_chunk_size=400):
        local = nn_distances(x, float32=True)
        with distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream:
            remote = nn_distances(x, float32=True)
    tasks = [t for t in stream.data if str(t["key"]).startswith("kompot-nn-search-chunk-")]
    assert len(tasks) == 8 and len({t["worker"] for t in tasks}) == 2
    np.testing.assert_array_equal(remote, local)  # exact: a KD-tree search, no BLAS involved


def test_interrupted_run_resumes_without_recomputing(case, de_model, de_reference, tmp_path, monkeypatch):
    path = str(tmp_path / "de.zarr")
    calls = {"n": 0}
    real_block = engine.expression_block

    def failing_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated interruption")
        return real_block(*args, **kwargs)

    monkeypatch.setattr(engine, "expression_block", failing_block)
    with pytest.raises(KeyboardInterrupt):
        predict_expression(de_model, case["in_X_predict"], path, cell_chunk=50, gene_batch=20)
    group = zarr.open_group(path, mode="r")
    assert group.attrs["kompot_dask"]["complete"] is False
    assert int(group["_done_cells"][...].sum()) == 5
    maha_done = int(group["_done_mahalanobis"][...].sum())
    resumed = []

    def counting_block(*args, **kwargs):
        resumed.append(args[3])  # the block's gene batch
        return real_block(*args, **kwargs)

    monkeypatch.setattr(engine, "expression_block", counting_block)
    ds = predict_expression(de_model, case["in_X_predict"], path, cell_chunk=50, gene_batch=20)
    meta = ds.attrs["kompot_dask"]
    assert len(resumed) == 10 - 5  # counted here, not reported by the engine
    assert meta["complete"] and meta["blocks_total"] == 10
    n_maha = len(range(0, de_model._gene_count, 20))
    assert meta["blocks_computed_last_run"] == 10 - 5 + n_maha - maha_done
    _assert_same(ds, de_reference)


def test_resume_with_every_gene_batch_done_skips_sigma(case, de_model, de_reference, tmp_path, monkeypatch):
    """Interrupted after the last Mahalanobis batch: the resume neither recomputes Sigma nor a block."""
    path = str(tmp_path / "de.zarr")
    real_finish, real_sigma = engine.gene_results, engine._sigma_task

    def interrupted_finish(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption before the per-gene reductions")

    monkeypatch.setattr(engine, "gene_results", interrupted_finish)
    with pytest.raises(KeyboardInterrupt):
        predict_expression(de_model, case["in_X_predict"], path, cell_chunk=100, gene_batch=20)
    group = zarr.open_group(path, mode="r")
    assert group.attrs["kompot_dask"]["complete"] is False
    assert group["_done_mahalanobis"][...].all() and group["_done_cells"][...].all()

    sigma_calls = []

    def counting_sigma(*args):
        sigma_calls.append(1)
        return real_sigma(*args)

    monkeypatch.setattr(engine, "gene_results", real_finish)
    monkeypatch.setattr(engine, "_sigma_task", counting_sigma)
    ds = predict_expression(de_model, case["in_X_predict"], path, cell_chunk=100, gene_batch=20)
    meta = ds.attrs["kompot_dask"]
    assert sigma_calls == []
    assert meta["complete"] and meta["blocks_computed_last_run"] == 0
    assert meta["mahalanobis_branch"] == de_model.mahalanobis_branch
    _assert_same(ds, de_reference)


def test_building_the_graph_computes_nothing(case, de_model, de_reference, tmp_path, monkeypatch):
    """compute=False lays out the store and returns a graph; only computing it runs tasks."""
    import dask
    import xarray as xr

    calls = {"scheduler": 0, "blocks": 0, "sigma": 0, "mahalanobis": 0, "gene_results": 0}

    def counting_get(dsk, keys, **kwargs):
        calls["scheduler"] += 1
        return dask.get(dsk, keys, **kwargs)

    def counted(name, real):
        def fn(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return fn

    real_block = engine.expression_block
    counting_block = counted("blocks", real_block)
    monkeypatch.setattr(engine, "sigma_stage", counted("sigma", engine.sigma_stage))
    monkeypatch.setattr(engine, "mahalanobis_stage", counted("mahalanobis", engine.mahalanobis_stage))
    monkeypatch.setattr(engine, "gene_results", counted("gene_results", engine.gene_results))
    monkeypatch.setattr(engine, "expression_block", counting_block)
    path = str(tmp_path / "de.zarr")
    with dask.config.set(scheduler=counting_get):
        graph = predict_expression(de_model, case["in_X_predict"], path, cell_chunk=100, gene_batch=25,
                                   compute=False)
        assert set(calls.values()) == {0}
        group = zarr.open_group(path, mode="r")
        assert group.attrs["kompot_dask"]["complete"] is False
        assert np.isnan(group["fold_change"][...]).all()
        keys = {str(k) for k in graph.__dask_graph__()}
        graph.compute()
    n_cells = -(-len(case["in_X_predict"]) // 100)
    n_batches = -(-de_model.n_genes // 25)
    n_gene_batches = -(-de_model._gene_count // 25)
    assert calls == {"scheduler": 1, "blocks": n_cells * n_batches, "sigma": 1, "mahalanobis": n_gene_batches,
                     "gene_results": 1}
    assert sum(k.startswith("kompot-predict-expression-") for k in keys) == n_cells * n_batches
    assert sum(k.startswith("kompot-mahalanobis-genes-") for k in keys) == -(-de_model._gene_count // 25)
    ds = xr.open_zarr(path, consolidated=False)
    assert ds.attrs["kompot_dask"]["complete"]
    _assert_same(ds, de_reference)


def test_other_inputs_never_touch_an_existing_store(case, de_model, tmp_path):
    path = str(tmp_path / "de.zarr")
    ds = predict_expression(de_model, case["in_X_predict"], path, compute_mahalanobis=False)
    before = ds["fold_change"].values.copy()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        predict_expression(de_model, case["in_X_predict"][:100], path, compute_mahalanobis=False)
    again = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(again["fold_change"][...], before)
    assert again.attrs["kompot_dask"]["complete"] is True
    # A complete store with the same inputs is reused as it is.
    ds2 = predict_expression(de_model, case["in_X_predict"], path, compute_mahalanobis=False)
    assert ds2.attrs["kompot_dask"]["blocks_computed_last_run"] == 0


def test_killed_worker_still_gives_the_same_results(case, de_model, de_reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    path = str(tmp_path / "de.zarr")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GB",
                                  dashboard_address=":0") as lc, distributed.Client(lc) as client:
        pids = list(client.run(os.getpid).values())
        killed = {}

        def killer():
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                try:
                    done = int(zarr.open_group(path, mode="r")["_done_cells"][...].sum())
                except Exception:
                    done = 0
                if done >= 3:
                    os.kill(pids[0], signal.SIGKILL)
                    killed["at"] = done
                time.sleep(0.02)

        thread = threading.Thread(target=killer)
        thread.start()
        ds = predict_expression(de_model, case["in_X_predict"], path, cell_chunk=10, gene_batch=10, client=client)
        thread.join()
    assert killed, "the worker was not killed during the run"
    assert killed["at"] < ds.attrs["kompot_dask"]["blocks_total"]
    _assert_same(ds, de_reference)


def test_block_plan_fits_the_memory_target():
    from kompot_dask.execution.plan import WORKER_BASELINE, plan_blocks

    for target in (2**30, 5 * 2**30):
        for genes in (50, 1000, 20000):
            plan = plan_blocks(1_000_000, genes, 2000, 3, 200 * 2**20, target)
            assert plan.task_bytes + WORKER_BASELINE <= target
            assert 64 <= plan.cell_chunk and 1 <= plan.gene_batch <= min(genes, 1024)
    small = plan_blocks(1_000_000, 1000, 2000, 3, 0, 2**30)
    large = plan_blocks(1_000_000, 1000, 2000, 3, 0, 8 * 2**30)
    assert large.cell_chunk * large.gene_batch > 4 * small.cell_chunk * small.gene_batch
    with pytest.raises(MemoryError, match="worker_memory_target"):
        plan_blocks(1_000_000, 1000, 2000, 3, 2**30, 2**30)


def test_planned_blocks_follow_the_memory_option(case, de_model, de_reference, tmp_path):
    from kompot_dask.execution.plan import WORKER_BASELINE, model_bytes, plan_blocks

    shared = model_bytes(de_model._pipeline_model())  # what the tasks share
    target = WORKER_BASELINE + 2 * shared + 2**20  # 1 MiB left for a block's working set
    with kd.set_options(worker_memory_target=target):
        ds = predict_expression(de_model, case["in_X_predict"], str(tmp_path / "de.zarr"))
    n_landmarks = len(case["in_landmarks"])
    plan = plan_blocks(len(case["in_X_predict"]), de_model.n_genes, n_landmarks, 3, shared, target)
    # The target forces several blocks (the default would be one block of all cells x genes).
    assert plan.cell_chunk * plan.gene_batch < len(case["in_X_predict"]) * de_model.n_genes / 2
    assert ds["fold_change"].encoding["chunks"] == (plan.cell_chunk, plan.gene_batch)
    _assert_same(ds, de_reference)


def test_function_fit_reads_expression_on_the_workers(case, cluster, tmp_path):
    """zarr- and xarray/dask-backed expression: one task per cell chunk, read on the worker."""
    distributed = pytest.importorskip("distributed")
    import dask.array as da
    import xarray as xr

    x, y = case["in_X_condition1"], case["in_Y_condition1"]
    stored = zarr.create_array(str(tmp_path / "y.zarr"), shape=y.shape, chunks=(50, y.shape[1]), dtype="float64")
    stored[...] = y
    as_xarray = xr.DataArray(da.from_zarr(str(tmp_path / "y.zarr")).T, dims=("gene", "cell"))  # genes first

    def fit(targets):
        return kd.FunctionEstimator(landmarks=case["in_landmarks"], ls_factor=10.0, sigma=0.3,
                                    obs_variance=True).fit(x, targets)

    with kd.set_options(cell_chunk_size=50):
        local = fit(y)
    with distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream:
        on_zarr, on_xarray = fit(stored), fit(as_xarray)
    keys = [str(t["key"]) for t in stream.data]
    n_chunks = -(-len(x) // 50)
    assert sum(k.startswith("kompot-function-projected-stats-") for k in keys) == 2 * n_chunks
    assert sum(k.startswith("kompot-function-residual-cross-") for k in keys) == 2 * n_chunks
    query = case["in_X_predict"]
    # The workers' chunk terms use single-threaded BLAS (see TOL and the density test).
    # Measured (OPENBLAS_CORETYPE=Zen, 2 cores): predictions differ by <= 1.4e-12 (2.4e-13
    # of their scale), obs variances by <= 4.0e-11 (6.0e-11 of their scale, 1.4e-9 relative
    # on the smallest); bit-identical with worker BLAS threads equal to ours.
    for model in (on_zarr, on_xarray):
        _assert_close_to_scale(model.predict(query), local.predict(query))
        _assert_close_to_scale(model.predict.obs_variance(query), local.predict.obs_variance(query))


def test_density_fit_keeps_its_factor_rows_on_the_workers(density_landmarks, cluster):
    """On a cluster the landmark fit's rows ``L_c`` are computed once per chunk by a task
    beside the chunk (counted in the scheduler's task stream) and give the in-process fit."""
    distributed = pytest.importorskip("distributed")
    x, settings = density_landmarks["in_X"], dict(landmarks=density_landmarks["in_landmarks"], gp_type="fixed",
                                                  predictor_with_uncertainty=True)
    with kd.set_options(cell_chunk_size=150):
        local = kd.DensityEstimator(**settings).fit(x)
        n_chunks = -(-len(x) // 150)
        runs = {}
        with distributed.Client(cluster) as client:
            for budget in (2**30, 0):
                with kd.set_options(factor_rows_bytes=budget), distributed.get_task_stream(client) as stream:
                    model = kd.DensityEstimator(**settings).fit(x)
                keys = [str(t["key"]) for t in stream.data]
                runs[budget] = (model, {k for k in keys if "-with-factor-rows-" in k},
                                {k for k in keys if "-loglik-grad-" in k})
    kept, rows, evaluations = runs[2**30]
    assert len(rows) == n_chunks and len(evaluations) >= n_chunks * kept.optimizer_result.nfev
    # in this process the rows stay with the predictor for the variances at x; fitted on the
    # cluster (its predictions run there too) the client keeps none
    assert local.predict.kept is not None and len(local.predict.kept) == len(x) and kept.predict.kept is None
    assert not runs[0][1] and runs[0][2]  # budget 0: no rows kept, the objective still ran on the workers
    z = local.pre_transformation
    np.testing.assert_allclose(kept.pre_transformation, z, rtol=0, atol=1e-8 * np.abs(z).max())
    np.testing.assert_allclose(kept.predict(x), local.predict(x), **TOL)


def test_function_fit_keeps_no_projections_with_a_client(cluster):
    """A landmark function fit keeps its cells' projections only without a distributed client
    (with one, predictions run on the workers from pickled models: nothing to read them);
    both predictors give the same variances."""
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(4)
    x, y, u = rng.standard_normal((700, 4)), rng.standard_normal((700, 3)), rng.standard_normal((150, 4))
    alone = kd.FunctionEstimator(landmarks=u, gp_type="fixed", ls=2.0).fit(x, y).predict
    with distributed.Client(cluster):
        beside = kd.FunctionEstimator(landmarks=u, gp_type="fixed", ls=2.0).fit(x, y).predict
    assert alone.kept is not None and len(alone.kept) == len(x) and beside.kept is None
    np.testing.assert_allclose(beside.covariance(x[:60]), alone.covariance(x[:60]), rtol=1e-12, atol=1e-15)
