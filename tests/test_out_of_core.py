"""da()/de() on an atlas given by path: results written into AnnData-zarr stores, safely.

Parity of every field with Kompot's recorded run on each route (zarr v3, zarr v2, .h5ad)
is in test_anndata_api.py; here: subsets placed into full layers, where results go, what
is refused before anything is written, and a run that fails halfway.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import assert_close
import kompot_dask as kd
from kompot_dask.differential import pipeline
from kompot_dask.testing import write_atlas_zarr

anndata = pytest.importorskip("anndata")

COMPARE = dict(groupby="condition", condition1="control", condition2="treated")
FAST = dict(n_landmarks=40, progress=False, random_state=0)


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory):
    return write_atlas_zarr(tmp_path_factory.mktemp("atlas") / "atlas.zarr", n_cells=900, n_genes=12,
                            seed=3, chunk_cells=300)


def _copy(path, tmp_path, name="copy.zarr"):
    import shutil

    dest = tmp_path / name
    shutil.copytree(path, dest)
    return str(dest)


def _listing(path) -> dict[str, float]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            full = os.path.join(d, f)
            out[os.path.relpath(full, path)] = os.path.getmtime(full)
    return out


def _close(got, want, what):
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    keep = ~np.isnan(want)
    # ls from the cells' own NN distances: 1e-5 relative between runs (reference README §3)
    assert_close(got[keep], want[keep], atol=1e-6, rtol=1e-5, what=what)


def test_gene_subset_and_cell_filter_fill_full_layers(atlas_path, tmp_path):
    genes = ["gene0001", "gene0004", "gene0007", "gene0010"]
    mem = anndata.read_zarr(atlas_path)
    mem.obs["use"] = np.arange(mem.n_obs) % 5 != 0
    path = _copy(atlas_path, tmp_path)
    stored = anndata.read_zarr(path)
    assert "use" not in stored.obs
    # the filter column lives in the store too (a filter names an obs column)
    from anndata.io import write_elem
    import zarr

    group = zarr.open_group(path, mode="r+", use_consolidated=False)["obs"]
    write_elem(group, "use", mem.obs["use"].to_numpy())
    group.attrs["column-order"] = list(group.attrs["column-order"]) + ["use"]
    zarr.consolidate_metadata(path)
    args = dict(**COMPARE, genes=genes, cell_filter="use", sample_col="sample", null_genes=0, **FAST)
    kd.de(mem, **args)
    kd.de(path, **args)
    out = anndata.read_zarr(path)
    layers = [k for k in mem.layers if k.startswith("kompot_de")]
    assert len(layers) == 5 and sorted(layers) == sorted(k for k in out.layers if k.startswith("kompot_de"))
    for key in layers:
        want = mem.layers[key].toarray()  # Kompot writes a gene subset as CSR, zeros around it
        got = np.asarray(out.layers[key])
        assert got.shape == (900, 12)
        _close(got, want, key)
        assert (got[:, [i for i in range(12) if f"gene{i:04d}" not in genes]] == 0).all()
        assert (got[~mem.obs["use"].to_numpy()] == 0).all()
    for key in [c for c in mem.var if c.startswith("kompot_de")]:
        _close(out.var[key], mem.var[key], key)


def test_h5ad_results_go_beside_it_and_hold_no_x(atlas_path, tmp_path):
    mem = anndata.read_zarr(atlas_path)
    h5ad = tmp_path / "atlas.h5ad"
    mem.write_h5ad(h5ad)
    before = _listing(tmp_path)
    kd.da(str(h5ad), **COMPARE, **FAST)
    kd.de(str(h5ad), **COMPARE, null_genes=0, **FAST)
    assert _listing(tmp_path)["atlas.h5ad"] == before["atlas.h5ad"]  # the .h5ad is never written
    assert sorted(os.listdir(tmp_path)) == ["atlas.h5ad", "atlas.kompot.zarr"]  # no staging store left
    out = anndata.read_zarr(tmp_path / "atlas.kompot.zarr")
    assert out.X is None and list(out.obs_names) == list(mem.obs_names)
    assert sorted(out.obsm) == sorted(mem.obsm) and "condition" in out.obs
    assert {"kompot_da", "kompot_de"} <= set(out.uns)
    assert any(k.endswith("_fold_change") for k in out.layers)


def test_read_lazy_atlas_needs_and_uses_a_results_store(atlas_path, tmp_path):
    lazy = anndata.experimental.read_lazy(atlas_path)
    with pytest.raises(ValueError, match="results_store"):
        kd.da(lazy, **COMPARE, **FAST)
    target = tmp_path / "results.zarr"
    kd.da(lazy, **COMPARE, results_store=str(target), **FAST)
    mem = anndata.read_zarr(atlas_path)
    kd.da(mem, **COMPARE, **FAST)
    out = anndata.read_zarr(target)
    for key in [c for c in mem.obs if c.startswith("kompot_da") and not c.endswith("direction")]:
        _close(out.obs[key], mem.obs[key], key)


def test_refusals_come_before_any_write(atlas_path, tmp_path):
    path = _copy(atlas_path, tmp_path)
    kd.da(path, **COMPARE, **FAST)
    snapshot = _listing(path)
    with pytest.raises(ValueError, match="overwrite=True"):
        kd.da(path, **COMPARE, overwrite=False, **FAST)
    with pytest.raises(ValueError, match="copy=True"):
        kd.de(path, **COMPARE, copy=True, **FAST)
    with pytest.raises(ValueError, match="not a value"):
        kd.de(path, groupby="condition", condition1="control", condition2="nope", **FAST)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never written into"):
        kd.de(path, **COMPARE, results_store=str(foreign), **FAST)
    assert _listing(path) == snapshot
    assert os.listdir(foreign) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["copy.zarr", "notes"]


def test_a_run_failing_halfway_leaves_no_results_and_a_rerun_resumes(atlas_path, tmp_path, monkeypatch):
    path = _copy(atlas_path, tmp_path)
    snapshot = _listing(path)
    real = pipeline._expression_task
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[4])  # the block index
        if len(calls) == 3:
            raise RuntimeError("worker lost (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_expression_task", failing)
    args = dict(**COMPARE, null_genes=0, **FAST)
    kd.set_options(cell_chunk_size=200)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            kd.de(path, **args)
        assert _listing(path) == snapshot  # nothing of the failed run in the atlas
        staging = [n for n in os.listdir(tmp_path) if n.endswith("-de.zarr")]
        assert len(staging) == 1  # its finished blocks, kept for the rerun
        failed_run = list(calls)
        calls.clear()
        monkeypatch.setattr(pipeline, "_expression_task", lambda *a, **k: (calls.append(a[4]), real(*a, **k))[1])
        kd.de(path, **args)
    finally:
        kd.set_options(cell_chunk_size=None)
    done_before = set(failed_run[:2])
    assert len(failed_run) == 3 and done_before.isdisjoint(calls)  # finished blocks were not recomputed
    assert len(calls) + len(done_before) == len(set(calls) | done_before)
    assert sorted(os.listdir(tmp_path)) == ["copy.zarr"]
    out = anndata.read_zarr(path)
    mem = anndata.read_zarr(atlas_path)
    kd.de(mem, **args)
    for key in [k for k in mem.layers if k.startswith("kompot_de")]:
        _close(out.layers[key], mem.layers[key], key)
