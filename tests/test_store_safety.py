"""A result store never loses data: arguments checked first, only our stores replaced, damage found and repaired."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import zarr

from conftest import load_case
import kompot_dask as kd
from kompot_dask.differential import pipeline as engine
from kompot_dask.io.results import StoreDamagedError, check_store, open_results
from kompot_dask.parallel import predict_abundance, predict_expression

TOL = dict(rtol=1e-12, atol=1e-12)  # same process; the block split changes GEMM shapes (1-cell blocks are
# matrix-vector products): rounding of O(1) values (z-scores) summed over 100 landmarks, ~1e-13 absolute


@pytest.fixture(scope="module")
def case():
    return load_case("de_class")


@pytest.fixture(scope="module")
def de_plain(case):
    """Without sample variance (the shared-Cholesky branch)."""
    return kd.DifferentialExpression().fit(case["in_X_condition1"], case["in_Y_condition1"], case["in_X_condition2"],
                                           case["in_Y_condition2"], landmarks=case["in_landmarks"])


@pytest.fixture(scope="module")
def da_plain(case):
    return kd.DifferentialAbundance().fit(case["in_X_condition1"], case["in_X_condition2"],
                                          landmarks=case["in_landmarks"])


@pytest.fixture(scope="module")
def x(case):
    return case["in_X_predict"]


def _same(ds, reference):
    for key, want in reference.items():
        got = ds[key].values
        if np.asarray(want).dtype.kind in "OUTb":
            assert [str(v) for v in got.tolist()] == [str(v) for v in np.asarray(want).tolist()], key
        else:
            np.testing.assert_allclose(got, want, err_msg=key, **TOL)


def _files(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------- memory and store agree
@pytest.mark.parametrize("cell_chunk, gene_batch", [(500, 100), (61, 7), (1, 50)])
def test_expression_without_sample_variance_store_equals_memory(de_plain, x, tmp_path, cell_chunk, gene_batch):
    reference = de_plain.predict(x, compute_mahalanobis=True)
    ds = de_plain.predict(x, compute_mahalanobis=True, store=tmp_path / "de.zarr", cell_chunk=cell_chunk,
                          gene_batch=gene_batch)
    reference.pop("condition1_smoothed"), reference.pop("condition2_smoothed")
    _same(ds, reference)


@pytest.mark.parametrize("cell_chunk", [500, 33])
def test_abundance_without_sample_variance_store_equals_memory(da_plain, x, tmp_path, cell_chunk):
    reference = da_plain.predict(x)
    _same(predict_abundance(da_plain, x, tmp_path / "da.zarr", cell_chunk=cell_chunk), reference)


# ------------------------------------------------------------------ arguments first
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="foo"), ValueError, "dtype"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(dtype="float16"), ValueError, "dtype"),
    (dict(cell_chunk=0), ValueError, "cell_chunk"),
    (dict(cell_chunk=-3), ValueError, "cell_chunk"),
    (dict(cell_chunk=2.5), ValueError, "cell_chunk"),
    (dict(cell_chunk=True), ValueError, "cell_chunk"),
    (dict(gene_batch=0), ValueError, "gene_batch"),
    (dict(compute="yes"), TypeError, "compute"),
    (dict(overwrite="yes"), TypeError, "overwrite"),
])
def test_bad_arguments_write_nothing_and_keep_the_old_store(de_plain, x, tmp_path, kwargs, error, match):
    path = tmp_path / "de.zarr"
    predict_expression(de_plain, x[:50], path, compute_mahalanobis=False, cell_chunk=25)
    before = _files(path)
    with pytest.raises(error, match=match):
        predict_expression(de_plain, x, path, compute_mahalanobis=False, overwrite=True, **kwargs)
    assert _files(path) == before  # not a byte changed
    fresh = tmp_path / "never.zarr"
    with pytest.raises(error, match=match):
        predict_expression(de_plain, x, fresh, compute_mahalanobis=False, **kwargs)
    assert not fresh.exists()
    assert sorted(os.listdir(tmp_path)) == ["de.zarr"]


def test_np_integer_block_sizes_are_accepted(de_plain, x, tmp_path):
    ds = predict_expression(de_plain, x, tmp_path / "de.zarr", compute_mahalanobis=False,
                            cell_chunk=np.int64(100), gene_batch=np.int32(15))
    assert ds["fold_change"].encoding["chunks"] == (100, 15)


def test_remote_urls_are_refused_before_writing(de_plain, x):
    with pytest.raises(ValueError, match="local"):
        predict_expression(de_plain, x, "s3://bucket/de.zarr")


# ------------------------------------------------------------- never delete what is not ours
def test_overwrite_never_deletes_a_folder_of_user_files(da_plain, x, tmp_path):
    folder = tmp_path / "my_results"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    (folder / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    before = _files(folder)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a kompot_dask result store") as err:
            predict_abundance(da_plain, x, folder, overwrite=overwrite)
        assert "overwrite=True" not in str(err.value)
    assert _files(folder) == before


def test_an_empty_directory_is_used(da_plain, x, tmp_path):
    (tmp_path / "out.zarr").mkdir()
    ds = predict_abundance(da_plain, x, tmp_path / "out.zarr")
    assert ds.attrs["kompot_dask"]["complete"]


def test_a_replaced_store_stays_whole_until_the_new_run_completes(de_plain, x, tmp_path, monkeypatch):
    path = tmp_path / "de.zarr"
    old = predict_expression(de_plain, x[:100], path, compute_mahalanobis=False)
    old_values = old["fold_change"].values.copy()
    before = _files(path)
    calls = []
    real = engine.expression_block

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("interrupted while replacing")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "expression_block", failing)
    with pytest.raises(KeyboardInterrupt):
        predict_expression(de_plain, x, path, compute_mahalanobis=False, overwrite=True, cell_chunk=100)
    assert _files(path) == before  # the old results, untouched
    check_store(path)
    aside = [p for p in os.listdir(tmp_path) if p.startswith(".de.zarr.kompot-") and p.endswith(".partial")]
    assert len(aside) == 1  # the new run went aside
    monkeypatch.setattr(engine, "expression_block", real)
    calls.clear()
    monkeypatch.setattr(engine, "expression_block", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ds = predict_expression(de_plain, x, path, compute_mahalanobis=False, overwrite=True, cell_chunk=100)
    assert len(calls) == 3 - 2  # 250 cells in 3 blocks; the aside run resumed after the two written
    assert ds.sizes["cell"] == len(x)
    assert not np.array_equal(ds["fold_change"].values[:100], np.full_like(old_values, np.nan))
    assert [p for p in os.listdir(tmp_path) if p != "de.zarr"] == []  # no aside or old copies left


# ------------------------------------------------------------------- two stores, two runs
def test_two_lazy_graphs_into_two_stores_both_run(da_plain, x, tmp_path):
    import dask

    g1 = predict_abundance(da_plain, x, tmp_path / "a.zarr", compute=False)
    g2 = predict_abundance(da_plain, x, tmp_path / "b.zarr", compute=False)
    assert not set(map(str, g1.__dask_graph__())) & set(map(str, g2.__dask_graph__()))
    dask.compute(g1, g2, scheduler="sync")
    a, b = open_results(tmp_path / "a.zarr"), open_results(tmp_path / "b.zarr")
    np.testing.assert_array_equal(a["log_fold_change"].values, b["log_fold_change"].values)
    assert np.isfinite(b["log_fold_change"].values).all()


# ----------------------------------------------------------------- damage is found, repaired
def _count_blocks(monkeypatch, name="expression_block"):
    seen = []
    real = getattr(engine, name)

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, name, counting)
    return seen


def test_a_deleted_chunk_is_detected_and_only_its_block_recomputed(de_plain, x, tmp_path, monkeypatch):
    path = tmp_path / "de.zarr"
    ds = predict_expression(de_plain, x, path, cell_chunk=100, gene_batch=25)
    reference = {k: ds[k].values.copy() for k in ("fold_change", "condition1_std", "mahalanobis_distances")}
    os.remove(path / "fold_change" / "c" / "2" / "1")  # the block of cells 200-299, genes 25-49
    with pytest.raises(StoreDamagedError, match=r"1 block\(s\) of stage 'cells'"):
        open_results(path)
    seen = _count_blocks(monkeypatch)
    repaired = predict_expression(de_plain, x, path, cell_chunk=100, gene_batch=25)
    assert len(seen) == 1  # exactly the damaged block, counted outside the engine
    for key, want in reference.items():
        np.testing.assert_array_equal(repaired[key].values, want)


def test_a_flipped_byte_is_not_read_as_numbers_and_is_repaired(da_plain, x, tmp_path, monkeypatch):
    path = tmp_path / "da.zarr"
    want = predict_abundance(da_plain, x, path, cell_chunk=100)["log_fold_change"].values.copy()
    chunk = path / "log_fold_change" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum"):
        zarr.open_array(path / "log_fold_change", mode="r")[...]
    with pytest.raises(StoreDamagedError):
        check_store(path, verify=True)
    seen = _count_blocks(monkeypatch, "abundance_block")
    again = predict_abundance(da_plain, x, path, cell_chunk=100)
    assert len(seen) == 1
    np.testing.assert_array_equal(again["log_fold_change"].values, want)


def test_an_ordinary_task_error_leaves_the_store_incomplete(de_plain, x, tmp_path, monkeypatch):
    path = tmp_path / "de.zarr"

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a block")

    monkeypatch.setattr(engine, "mahalanobis_stage", broken)
    with pytest.raises(RuntimeError, match="a bug in a block"):
        predict_expression(de_plain, x, path, cell_chunk=100, gene_batch=25)
    assert zarr.open_group(path, mode="r").attrs["kompot_dask"]["complete"] is False
    with pytest.raises(StoreDamagedError, match="incomplete"):
        open_results(path)
    done = int(zarr.open_group(path, mode="r")["_done_cells"][...].sum())
    monkeypatch.undo()
    seen = _count_blocks(monkeypatch)
    ds = predict_expression(de_plain, x, path, cell_chunk=100, gene_batch=25)
    assert len(seen) == 3 * 2 - done and ds.attrs["kompot_dask"]["complete"]  # written blocks were kept
    np.testing.assert_allclose(ds["mahalanobis_distances"].values,
                               de_plain.predict(x, compute_mahalanobis=True)["mahalanobis_distances"], **TOL)


# ---------------------------------------------------------------------- options travel
def _report_options():
    return kd.get_options()


def test_options_reach_the_workers():
    distributed = pytest.importorskip("distributed")
    from kompot_dask.execution.runner import InOptions

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            distributed.Client(lc) as client:
        assert client.submit(_report_options).result()["cell_chunk_size"] is None
        with kd.set_options(cell_chunk_size=123, gene_batch_size=7):
            task = InOptions(_report_options)
        seen = client.submit(task, pure=False).result()
    assert (seen["cell_chunk_size"], seen["gene_batch_size"]) == (123, 7)
    assert kd.get_options()["cell_chunk_size"] is None


# --------------------------------------------------------------- every worker lost
def test_losing_every_worker_that_held_the_model_still_completes(de_plain, x, tmp_path):
    """Both workers (each holding a copy of the shared model) are killed mid-run; their
    nannies start new ones and the run finishes with the same numbers."""
    distributed = pytest.importorskip("distributed")
    import signal
    import threading
    import time

    path = tmp_path / "de.zarr"
    reference = de_plain.predict(x, compute_mahalanobis=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GB",
                                  dashboard_address=":0") as lc, distributed.Client(lc) as client:
        before = set(client.run(os.getpid).values())
        killed = {}

        def killer():
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                try:
                    done = int(zarr.open_group(path, mode="r")["_done_cells"][...].sum())
                except Exception:
                    done = 0
                if done >= 4:
                    for pid in before:
                        os.kill(pid, signal.SIGKILL)
                    killed["at"] = done
                time.sleep(0.01)

        thread = threading.Thread(target=killer)
        thread.start()
        ds = predict_expression(de_plain, x, path, cell_chunk=10, gene_batch=10, client=client)
        thread.join()
        after = set(client.run(os.getpid).values())
    assert killed and killed["at"] < ds.attrs["kompot_dask"]["blocks_total"]
    assert not before & after  # every worker process was replaced
    for key in ("fold_change", "condition1_std", "mahalanobis_distances"):
        np.testing.assert_allclose(ds[key].values, reference[key], rtol=1e-8, atol=1e-12, err_msg=key)


def test_sample_variance_scratch_arrays_are_checksummed_and_marked_complete(case, tmp_path):
    fit = dict(estimator_kwargs=dict(landmarks=case["in_landmarks"], gp_type="fixed"))
    args = (case["in_X_condition1"], case["in_Y_condition1"], case["in_condition1_sample_indices"])
    on_disk = kd.SampleVarianceEstimator(disk_storage_dir=str(tmp_path / "scratch")).fit(*args, **fit)
    q = on_disk.factor(case["in_X_predict"])
    (folder,) = (tmp_path / "scratch").iterdir()
    arr = zarr.open_array(folder, mode="r")
    assert arr.attrs["kompot_dask"] == {"kind": "scratch", "complete": True}
    assert any(type(c).__name__ == "Crc32cCodec" for c in arr.compressors)
    in_memory = kd.SampleVarianceEstimator().fit(*args, **fit).factor(case["in_X_predict"])
    np.testing.assert_allclose(q[...], in_memory, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------- datasets follow the same protocol
def test_datasets_share_the_store_protocol(case, tmp_path):
    from kompot_dask.io import make_dataset, open_dataset, write_dataset
    from kompot_dask.io._protocol import read_marker

    ds = make_dataset(case["in_X_condition1"], case["in_Y_condition1"], cell_chunk=300)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a kompot_dask store"):
        write_dataset(ds, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"
    path = write_dataset(ds, tmp_path / "ds.zarr")
    assert read_marker(path) == {"kind": "dataset", "complete": True, "schema_version": 1}
    chunk = path / "expression" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum"):
        open_dataset(path)["expression"].values
    # A result store is not a dataset and a dataset store is not replaced by results.
    da = kd.DifferentialAbundance().fit(case["in_X_condition1"], case["in_X_condition2"],
                                        landmarks=case["in_landmarks"])
    with pytest.raises(FileExistsError, match="not a kompot_dask result store"):
        predict_abundance(da, case["in_X_predict"], path, overwrite=True)
