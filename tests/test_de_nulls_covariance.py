"""de() with external null distances (FDRSettings.null_mahalanobis) and with the posterior
covariance stored in obsp (StorageSettings.store_posterior_covariance), SPEC §6.7, §7.2."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA, assert_close
import kompot_dask as kd

anndata = pytest.importorskip("anndata")

C1, C2 = "control day-0", "stim 2.5h"
BASE = "kompot_de_control_day_0_to_stim_2_5h"
FAST = dict(n_landmarks=100, random_state=0, progress=False, return_full_results=True)


@pytest.fixture(scope="module")
def external():
    return np.random.default_rng(0).chisquare(6, size=400) ** 0.5


def test_external_null_alone_and_combined(external):
    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    full = kd.de(adata, "condition", C1, C2, null_genes=0, null_mahalanobis=external, **FAST)
    dist = adata.var[f"{BASE}_mahalanobis"].to_numpy()
    want = kd.compute_fdr(dist, external, 0.05)
    for column, key in (("local_fdr", "mahalanobis_local_fdr"), ("is_de", "is_de")):
        np.testing.assert_array_equal(adata.var[f"{BASE}_{key}"].to_numpy(), want[column].to_numpy(), err_msg=key)
    assert full["null"]["source"] == "external" and full["fdr_summary"]["n_total"] == 60

    combined = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    full = kd.de(combined, "condition", C1, C2, null_genes=30, null_mahalanobis=external,
                 combine_with_internal=True, **FAST)
    null = full["null"]["mahalanobis"]
    assert full["null"]["source"] == "combined" and len(null) == 430
    np.testing.assert_array_equal(null[:400], external)
    want = kd.compute_fdr(combined.var[f"{BASE}_mahalanobis"].to_numpy(), null, 0.05)
    np.testing.assert_array_equal(combined.var[f"{BASE}_mahalanobis_local_fdr"].to_numpy(),
                                  want["local_fdr"].to_numpy())


def test_bad_external_nulls_are_refused():
    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    with pytest.raises(ValueError, match="at least 2 finite null distances"):
        kd.de(adata, "condition", C1, C2, null_mahalanobis=[1.0, np.nan, 2.0], **FAST)
    with pytest.raises(ValueError, match="not both"):
        kd.de(adata, "condition", C1, C2, null_mahalanobis=[1.0, 2.0], null_expression=(np.ones(2), np.ones(2)),
              **FAST)
    assert "kompot_de" not in adata.uns


def test_posterior_covariance_in_obsp():
    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    keep = np.arange(adata.n_obs) % 4 != 0
    full = kd.de(adata, "condition", C1, C2, null_genes=0, cell_filter=keep, store_posterior_covariance=True,
                 **FAST)
    cov = adata.obsp[f"{BASE}_posterior_covariance"]
    assert cov.shape == (1500, 1500)
    assert (cov[~keep] == 0).all() and (cov[:, ~keep] == 0).all()
    model, x = full["model"], adata.obsm["DM_EigenVectors"][keep]
    want = model.function_predictor1.covariance(x, diag=True) + model.function_predictor2.covariance(x, diag=True)
    assert_close(np.diag(cov)[keep], want, atol=1e-10, rtol=1e-8, what="diagonal")
    assert_close(cov[np.ix_(keep, keep)], cov[np.ix_(keep, keep)].T, atol=1e-12, rtol=0, what="symmetry")


def test_posterior_covariance_needs_memory_and_no_sample_column(tmp_path):
    path = tmp_path / "atlas.zarr"
    anndata.read_h5ad(DATA / "anndata_input.h5ad").write_zarr(path)
    with pytest.raises(ValueError, match="in-memory AnnData"):
        kd.de(str(path), "condition", C1, C2, null_genes=0, store_posterior_covariance=True, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.zarr"]
    assert "kompot_de" not in anndata.read_zarr(path).uns
    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    kd.de(adata, "condition", C1, C2, sample_col="sample", store_posterior_covariance=True, **FAST)
    assert len(adata.obsp) == 0  # as Kompot: only without sample variance
