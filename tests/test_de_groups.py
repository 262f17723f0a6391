"""de(..., groups=...): per-group mean fold change, Mahalanobis distance, PTP and FDR in varm
(SPEC §7.4 step 14), in memory and written into an AnnData-zarr."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, assert_close
import kompot_dask as kd
from kompot_dask.kernels.mahalanobis import chi2_neg_log10_ptp

anndata = pytest.importorskip("anndata")

C1, C2 = "control day-0", "stim 2.5h"
BASE = "kompot_de_control_day_0_to_stim_2_5h"
SETTINGS = dict(n_landmarks=100, random_state=0, null_genes=30, progress=False, return_full_results=True)


def _groups(adata):
    small = np.zeros(adata.n_obs, dtype=bool)
    small[np.flatnonzero(adata.obs["sample"] == "ctrl-B")[:40]] = True  # 40 cells < 100 landmarks
    return {"ctrl-A": (adata.obs["sample"] == "ctrl-A").to_numpy(), "few": small,
            "one": np.eye(1, adata.n_obs, 7, dtype=bool)[0]}


@pytest.fixture(scope="module")
def run():
    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    with pytest.warns(UserWarning, match="group 'one' has 1 cell"):
        full = kd.de(adata, "condition", C1, C2, groups=_groups(adata), **SETTINGS)
    return adata, full


def test_groups_fill_varm_frames(run):
    adata, full = run
    keys = [f"{BASE}_mean_lfc_groups", f"{BASE}_mahalanobis_groups", f"{BASE}_neg_log10_ptp_groups",
            f"{BASE}_mahalanobis_local_fdr_groups", f"{BASE}_is_de_groups"]
    assert sorted(adata.varm) == sorted(keys)
    for key in keys:
        frame = adata.varm[key]
        assert list(frame.columns) == ["ctrl-A", "few"] and list(frame.index) == list(adata.var_names)
    history = json.loads(adata.uns["kompot_de"]["last_run_info"])
    assert history["has_groups"] is True and history["groups_summary"]["names"] == ["ctrl-A", "few"]
    assert history["groups_summary"]["cells"]["few"] == {"total": 40, "condition1": 40, "condition2": 0}
    assert set(keys) <= set(json.loads(adata.uns["kompot_de"]["anndata_fields"])["varm"])


def test_group_values_against_their_definition(run):
    adata, full = run
    fold_change = adata.layers[f"{BASE}_fold_change"]
    groups = _groups(adata)
    for name in ("ctrl-A", "few"):
        assert_close(adata.varm[f"{BASE}_mean_lfc_groups"][name].to_numpy(),
                     fold_change[groups[name]].mean(axis=0), atol=1e-12, rtol=1e-12, what=name)
    # "few" (40 cells, fewer than the 100 landmarks): the distance at its own cells, as the
    # model computes it there; the FDR from the null genes' distances at the same points
    model = full["model"]
    x_few = adata.obsm["DM_EigenVectors"][groups["few"]]
    dist = model.compute_mahalanobis_distances(x_few, use_landmarks=False)
    assert_close(adata.varm[f"{BASE}_mahalanobis_groups"]["few"].to_numpy(), dist, atol=1e-10, rtol=1e-10,
                 what="few")
    assert_close(adata.varm[f"{BASE}_neg_log10_ptp_groups"]["few"].to_numpy(),
                 chi2_neg_log10_ptp(dist, x_few.shape[1]), atol=1e-12, rtol=1e-12, what="ptp")
    np.testing.assert_array_equal(adata.varm[f"{BASE}_is_de_groups"]["few"].to_numpy(),
                                  model.fdr_results["is_de"].to_numpy(dtype=bool))
    # the whole-atlas results are those of the run, not of the last group
    assert_close(adata.var[f"{BASE}_mahalanobis"].to_numpy(), full["table"]["mahalanobis"].to_numpy(),
                 atol=0, rtol=0, what="atlas distances")
    # "ctrl-A" (291 cells): evaluated at 100 new k-means landmarks of its cells, not at its cells
    x_a = adata.obsm["DM_EigenVectors"][groups["ctrl-A"]]
    at_cells = model.compute_mahalanobis_distances(x_a, use_landmarks=False)
    assert not np.allclose(adata.varm[f"{BASE}_mahalanobis_groups"]["ctrl-A"].to_numpy(), at_cells)


def test_groups_written_into_a_store(run, tmp_path):
    adata, _ = run
    path = tmp_path / "atlas.zarr"
    anndata.read_h5ad(DATA / "anndata_input.h5ad").write_zarr(path)
    groups = {k: v for k, v in _groups(adata).items() if k != "one"}
    kd.de(str(path), "condition", C1, C2, groups=groups, **SETTINGS)
    out = anndata.read_zarr(path)
    for key, frame in adata.varm.items():
        got = out.varm[key]
        assert list(got.columns) == list(frame.columns)
        # ls from the cells' own NN distances: 1e-5 relative between runs (reference README §3)
        if frame.dtypes.iloc[0] == bool:
            np.testing.assert_array_equal(got.to_numpy(), frame.to_numpy(), err_msg=key)
        else:
            assert_close(got.to_numpy(), frame.to_numpy(), atol=1e-6, rtol=1e-5, what=key)


def test_bad_groups_are_refused_before_anything_runs():
    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    with pytest.raises(ValueError, match="obs column 'nope'"):
        kd.de(adata, "condition", C1, C2, groups="nope", **SETTINGS)
    with pytest.raises(ValueError, match="one boolean per cell"):
        kd.de(adata, "condition", C1, C2, groups=np.ones(3, dtype=bool), **SETTINGS)
    assert not any(k.startswith("kompot") for k in adata.var) and "kompot_de" not in adata.uns
