"""kompot_dask.io: schema datasets, zarr stores and lazy AnnData ingest."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
import xarray as xr

from kompot_dask.io import (
    dataset_from_anndata,
    make_dataset,
    open_dataset,
    validate_dataset,
    write_dataset,
)
from kompot_dask.io import _blocks, store

H5AD = pathlib.Path(__file__).parent / "data" / "anndata_input.h5ad"
OBSM = "DM_EigenVectors"


def _no_compute(dsk, keys, **kwargs):
    raise AssertionError("a dask computation ran")


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    n, g = 100, 30
    counts = rng.poisson(0.5, size=(n, g)).astype(np.float32)
    return {
        "cell_states": rng.normal(size=(n, 3)),
        "expression": counts,
        "condition": np.array(["ctrl", "stim"])[rng.integers(0, 2, n)],
        "sample": np.array(["s1", "s2", "s3"])[rng.integers(0, 3, n)],
        "cell_names": np.array([f"c{i}" for i in range(n)]),
        "gene_names": np.array([f"g{j}" for j in range(g)]),
    }


@pytest.fixture
def ds(arrays):
    return make_dataset(**arrays, cell_chunk=32, gene_chunk=8)


@pytest.fixture(scope="module")
def adata():
    anndata = pytest.importorskip("anndata")
    return anndata.read_h5ad(H5AD)


def test_roundtrip_numpy_to_zarr(ds, arrays, tmp_path):
    assert isinstance(ds.expression.data, da.Array)
    assert ds.expression.data.chunksize == (32, 8)
    assert ds.cell_states.data.chunks[1] == (3,)
    path = write_dataset(ds, tmp_path / "ds.zarr")
    out = open_dataset(path)
    assert isinstance(out.expression.data, da.Array)
    assert out.expression.data.chunks == ds.expression.data.chunks
    assert out.load().identical(ds.load())
    np.testing.assert_array_equal(out.expression.values, arrays["expression"])
    np.testing.assert_array_equal(out.cell_states.values, arrays["cell_states"])
    np.testing.assert_array_equal(out.condition.values, arrays["condition"])
    np.testing.assert_array_equal(out.cell.values, arrays["cell_names"])


def test_sparse_input_equals_dense(arrays):
    dense = make_dataset(arrays["cell_states"], arrays["expression"], cell_chunk=16, gene_chunk=7)
    for fmt in ("csr", "csc", "coo"):
        mat = sp.csr_matrix(arrays["expression"]).asformat(fmt)
        with dask.config.set(scheduler=_no_compute):
            sparse = make_dataset(arrays["cell_states"], mat, cell_chunk=16, gene_chunk=7)
        assert sparse.expression.data.chunks == dense.expression.data.chunks
        np.testing.assert_array_equal(sparse.expression.values, dense.expression.values)
    ints = make_dataset(arrays["cell_states"], sp.csr_matrix(arrays["expression"].astype(np.int32)))
    assert ints.expression.dtype == np.float64


def test_h5ad_ingest_is_lazy_and_matches_anndata(adata):
    with dask.config.set(scheduler=_no_compute):
        ds = dataset_from_anndata(H5AD, OBSM, condition_key="condition", sample_key="sample",
                                  cell_chunk=256, gene_chunk=16)
        with pytest.raises(AssertionError, match="computation ran"):
            ds.expression.values  # the guard is live
    assert ds.expression.data.chunksize == (256, 16)
    np.testing.assert_array_equal(ds.expression.values, adata.X.toarray())
    np.testing.assert_array_equal(ds.cell_states.values, adata.obsm[OBSM])
    np.testing.assert_array_equal(ds.condition.values, adata.obs["condition"].astype(str))
    np.testing.assert_array_equal(ds.sample.values, adata.obs["sample"].astype(str))
    np.testing.assert_array_equal(ds.cell.values, adata.obs_names)
    np.testing.assert_array_equal(ds.gene.values, adata.var_names)
    assert ds.expression.dtype == adata.X.dtype


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_anndata_zarr_and_memory_ingest_match_h5ad(adata, tmp_path, zarr_format):
    anndata = pytest.importorskip("anndata")
    with anndata.settings.override(zarr_write_format=zarr_format), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on zarr defaults
        adata.write_zarr(tmp_path / "a.zarr")
    kw = dict(sample_key="sample", cell_chunk=256, gene_chunk=16)
    ref = dataset_from_anndata(H5AD, **kw).load()
    with dask.config.set(scheduler=_no_compute):
        from_zarr = dataset_from_anndata(tmp_path / "a.zarr", **kw)
        in_memory = dataset_from_anndata(adata, **kw)
    assert from_zarr.load().identical(ref)
    assert in_memory.load().identical(ref)


def test_gene_and_layer_selection(adata):
    bdata = adata.copy()
    bdata.layers["dense"] = bdata.X.toarray() * 2
    genes = list(bdata.var_names[[7, 2, 40]])
    ds = dataset_from_anndata(bdata, layer="dense", genes=genes)
    np.testing.assert_array_equal(ds.expression.values, bdata.layers["dense"][:, [7, 2, 40]])
    np.testing.assert_array_equal(ds.gene.values, genes)
    ds = dataset_from_anndata(H5AD, genes=genes, gene_chunk=2)
    np.testing.assert_array_equal(ds.expression.values, adata.X[:, [7, 2, 40]].toarray())


def _h5ad_error(**kw):
    return lambda: dataset_from_anndata(H5AD, **kw)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (_h5ad_error(obsm_key="X_umap"), r"obsm key 'X_umap' not found; available: \['DM_Eig"),
        (_h5ad_error(layer="counts"), r"layer 'counts' not found; available: \[\]"),
        (_h5ad_error(condition_key="grp"), r"available: \['condition', 'sample'\].*condition_key"),
        (_h5ad_error(sample_key="donor"), r"obs column 'donor'.*sample_key"),
        (_h5ad_error(genes=["gene00", "NOPE"]), r"not var names \(e.g. \['NOPE'\]\)"),
        (_h5ad_error(cell_chunk=0), r"cell_chunk.*positive int or -1"),
    ],
)
def test_anndata_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_anndata_in_memory_bad_inputs(adata):
    with pytest.raises(ValueError, match=r"obsm key 'pca'.*\['DM_EigenVectors'\]"):
        dataset_from_anndata(adata, obsm_key="pca")
    with pytest.raises(ValueError, match=r"obs column 'batch'.*\['condition', 'sample'\]"):
        dataset_from_anndata(adata, condition_key="batch")


def test_make_dataset_bad_inputs(arrays):
    cs, x = arrays["cell_states"], arrays["expression"]
    with pytest.raises(ValueError, match="expression` has 99 rows but `cell_states` has 100"):
        make_dataset(cs, x[:99])
    with pytest.raises(ValueError, match="`condition` has 5 labels .* 100 cells"):
        make_dataset(cs, condition=arrays["condition"][:5])
    with pytest.raises(ValueError, match="`cell_names` has shape"):
        make_dataset(cs, cell_names=["a", "b"])
    with pytest.raises(ValueError, match="reshape"):
        make_dataset(cs[:, 0])
    labels = arrays["condition"].astype(object)
    labels[3] = None
    with pytest.raises(ValueError, match="1 missing label"):
        make_dataset(cs, condition=labels)
    with pytest.raises(ValueError, match="at least 2 conditions"):
        make_dataset(cs, condition=np.full(len(cs), "ctrl"))
    with pytest.raises(ValueError, match="cell names are not unique.*obs_names_make_unique"):
        make_dataset(cs, cell_names=np.full(len(cs), "c"))


def test_validate_dataset_errors(ds, tmp_path):
    with pytest.raises(ValueError, match=r"no variable 'cell_states'.*make_dataset"):
        validate_dataset(ds.drop_vars("cell_states"))
    with pytest.raises(ValueError, match="no variable 'expression'"):
        validate_dataset(ds.drop_vars("expression"), require=("cell_states", "expression"))
    with pytest.raises(ValueError, match=r"dims \('state', 'cell'\).*transpose"):
        validate_dataset(ds.assign(cell_states=ds.cell_states.T))
    with pytest.raises(ValueError, match=r"3 chunks along 'state'.*\.chunk\(state=-1\)"):
        validate_dataset(ds.chunk(state=1))
    with pytest.raises(ValueError, match="at least 2 conditions"):
        validate_dataset(ds.isel(cell=np.nonzero(ds.condition.values == "ctrl")[0]))
    bad = ds.cell_states.values.copy()
    bad[[5, 70], 1] = [np.nan, np.inf]
    nan_ds = ds.assign(cell_states=(("cell", "state"), da.from_array(bad, chunks=(32, 3))))
    validate_dataset(nan_ds, check_values=False)  # structure only: nothing read
    with pytest.raises(ValueError, match=r"NaN/inf in 2 cell\(s\) \(first: \['c5', 'c70'\]\)"):
        validate_dataset(nan_ds)
    with pytest.raises(ValueError, match="NaN/inf"):
        write_dataset(nan_ds, tmp_path / "nan.zarr")
    assert not (tmp_path / "nan.zarr").exists()


def test_existing_store_is_not_overwritten(ds, tmp_path):
    path = write_dataset(ds, tmp_path / "ds.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_dataset(ds, path)
    smaller = ds.isel(cell=slice(0, 50))
    write_dataset(smaller, path, overwrite=True)
    assert open_dataset(path).sizes["cell"] == 50
    assert sorted(os.listdir(tmp_path)) == ["ds.zarr"]


def _failing_expression(ds):
    def fail(block, block_info=None):
        if block_info and block_info[None]["chunk-location"] == (2, 1):
            raise RuntimeError("disk full")
        return block

    failing = ds.expression.data.map_blocks(fail, dtype=ds.expression.dtype)
    return ds.assign(expression=ds.expression.copy(data=failing))


def test_interrupted_write_leaves_no_complete_store(ds, tmp_path, monkeypatch):
    path = tmp_path / "ds.zarr"
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(_failing_expression(ds), path)
    assert not path.exists() and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="write_dataset"):
        open_dataset(path)

    write_dataset(ds, path)
    old = open_dataset(path).load()
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(_failing_expression(ds.isel(cell=slice(0, 90))), path, overwrite=True)

    def crash(tmp):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_mark_complete", crash)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(ds.isel(cell=slice(0, 90)), path, overwrite=True)
    assert os.listdir(tmp_path) == ["ds.zarr"]
    assert open_dataset(path).load().identical(old)


def _wait_for(flag, seconds=20):
    deadline = time.monotonic() + seconds
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _late_writer_expression(ds, flags):
    """Chunk (2, 1) fails once chunk (0, 0) runs; (0, 0) returns ~0.3 s after that failure.

    Flag files (not events: the tasks may be pickled) order the two chunks whatever order
    the scheduler starts them in; with two threads neither can block the other for good.
    """

    def block_fn(block, block_info=None):
        where = block_info[None]["chunk-location"] if block_info else None
        if where == (2, 1):
            _wait_for(flags / "started")
            (flags / "failed").touch()
            raise RuntimeError("disk full")
        if where == (0, 0):
            (flags / "started").touch()
            _wait_for(flags / "failed")
            time.sleep(0.3)  # the scheduler has raised by now: this chunk's write is still to come
            (flags / "late").touch()
        return block

    late = ds.expression.data.map_blocks(block_fn, dtype=ds.expression.dtype)
    return ds.assign(expression=ds.expression.copy(data=late))


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_failed_write_waits_for_running_chunk_writes(ds, tmp_path, scheduler):
    """The temporary store is removed only once no chunk write runs: none re-creates it.

    Before the fix, the write of chunk (0, 0) landed after the cleanup and left a
    ``.partial-*`` directory behind. The pass does not depend on timing: the writer waits
    for every running write before it removes anything.
    """
    out = tmp_path / "out"
    out.mkdir()
    bad = _late_writer_expression(ds, tmp_path)
    if scheduler == "distributed":
        distributed = pytest.importorskip("distributed")
        context = distributed.Client(n_workers=1, threads_per_worker=2, processes=False,
                                     dashboard_address=":0")
    else:
        context = dask.config.set(scheduler="threads", num_workers=2)
    with context:
        with pytest.raises(RuntimeError, match="disk full"):
            write_dataset(bad, out / "ds.zarr")
        waited = (tmp_path / "late").exists()  # the error came back after the late chunk's write
        _wait_for(tmp_path / "late")
        time.sleep(0.5)  # time for a write still running (only the old writer left one) to land
        assert os.listdir(out) == []
        assert waited


@pytest.mark.filterwarnings("ignore:The data type")  # fixed-width strings in v3
def test_store_without_marker_is_refused(ds, tmp_path):
    ds.to_zarr(tmp_path / "raw.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(ValueError, match="incomplete .*overwrite=True"):
        open_dataset(tmp_path / "raw.zarr")


def test_gene_batch_reads_only_its_chunks(ds, tmp_path):
    zarr = pytest.importorskip("zarr")

    class CountingStore(zarr.storage.LocalStore):
        reads: list[str] = []

        async def get(self, key, prototype, byte_range=None):
            CountingStore.reads.append(key)
            return await super().get(key, prototype, byte_range)

    write_dataset(ds, tmp_path / "ds.zarr")
    opened = open_dataset(CountingStore(tmp_path / "ds.zarr", read_only=True))
    CountingStore.reads.clear()
    batch = opened.expression[:, 8:16].values
    np.testing.assert_array_equal(batch, ds.expression.values[:, 8:16])
    chunk_reads = sorted(k for k in CountingStore.reads if k.startswith("expression/c/"))
    assert chunk_reads == [f"expression/c/{i}/1" for i in range(4)]  # 4 cell chunks, gene chunk 1
    assert not any(k.startswith("cell_states/c/") for k in CountingStore.reads)


def test_h5ad_gene_batch_reads_each_cell_chunk_once(monkeypatch):
    calls = []
    major = _blocks.StoredMatrix.major

    def counted(self, start, stop):
        calls.append((self.key, start, stop))
        return major(self, start, stop)

    monkeypatch.setattr(_blocks.StoredMatrix, "major", counted)
    ds = dataset_from_anndata(H5AD, cell_chunk=500, gene_chunk=10)
    ds.expression[:, 10:30].compute()
    assert sorted(calls) == [("X", 0, 500), ("X", 500, 1000), ("X", 1000, 1500)]


def test_import_does_not_load_optional_dependencies():
    code = (
        "import sys, kompot_dask.io; "
        "heavy = ('anndata', 'h5py', 'distributed', 'zarr', 'xarray', 'pandas', 'dask'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_open_rejects_non_schema(tmp_path):
    foreign = xr.Dataset({"x": ("cell", np.arange(3.0))})
    foreign.to_zarr(tmp_path / "x.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(ValueError, match="incomplete"):
        open_dataset(tmp_path / "x.zarr")
