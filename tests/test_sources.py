"""The classes read an atlas as users have it: AnnData (in memory, .h5ad, AnnData-zarr, lazy) or a kompot_dask dataset."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from conftest import load_case
import kompot_dask as kd

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

TOL = dict(rtol=1e-10, atol=1e-12)  # the same cells and arithmetic; sparse rows read in other chunkings


@pytest.fixture(scope="module")
def case():
    return load_case("de_class")


@pytest.fixture(scope="module")
def atlas(case):
    """Both conditions in one AnnData, interleaved, with sparse X and string sample names."""
    x = np.vstack([case["in_X_condition1"], case["in_X_condition2"]])
    y = np.vstack([case["in_Y_condition1"], case["in_Y_condition2"]])
    cond = np.array(["young"] * len(case["in_X_condition1"]) + ["old"] * len(case["in_X_condition2"]))
    sample = np.concatenate([[f"y{s}" for s in case["in_condition1_sample_indices"]],
                             [f"o{s}" for s in case["in_condition2_sample_indices"]]])
    order = np.random.default_rng(0).permutation(len(x))
    adata = anndata.AnnData(
        X=scipy.sparse.csr_matrix(y[order]),
        obs=pd.DataFrame({"condition": pd.Categorical(cond[order]), "sample": sample[order]},
                         index=[f"cell{i}" for i in range(len(x))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(y.shape[1])]),
    )
    adata.obsm["DM_EigenVectors"] = x[order]
    return adata


@pytest.fixture(scope="module")
def reference(case, atlas):
    """Plain arrays of the same cells in the same order, fitted as documented."""
    young, old = (atlas.obs["condition"] == "young").to_numpy(), (atlas.obs["condition"] == "old").to_numpy()
    x, y, s = atlas.obsm["DM_EigenVectors"], atlas.X.toarray(), atlas.obs["sample"].to_numpy()
    de = kd.DifferentialExpression().fit(x[young], y[young], x[old], y[old], landmarks=case["in_landmarks"],
                                         condition1_sample_indices=s[young], condition2_sample_indices=s[old])
    da = kd.DifferentialAbundance().fit(x[young], x[old], landmarks=case["in_landmarks"],
                                        condition1_sample_indices=s[young], condition2_sample_indices=s[old])
    return de.predict(x, compute_mahalanobis=True), da.predict(x)


def _sources(atlas, tmp_path):
    h5ad, zarr_path = tmp_path / "atlas.h5ad", tmp_path / "atlas.zarr"
    atlas.write_h5ad(h5ad)
    atlas.write_zarr(zarr_path)
    return {
        "memory": atlas,
        "h5ad path": str(h5ad),
        "backed h5ad": anndata.read_h5ad(h5ad, backed="r"),
        "lazy zarr": anndata.experimental.read_lazy(str(zarr_path)),
        "zarr path": str(zarr_path),
    }


def test_every_source_gives_the_array_results(case, atlas, reference, tmp_path):
    de_ref, da_ref = reference
    for name, source in _sources(atlas, tmp_path).items():
        de = kd.DifferentialExpression().fit_from(source, "condition", "young", "old", sample_col="sample",
                                                  landmarks=case["in_landmarks"])
        got = de.predict(de.condition_inputs.x_all, compute_mahalanobis=True)
        for key in ("fold_change", "condition1_std", "mahalanobis_distances"):
            np.testing.assert_allclose(got[key], de_ref[key], err_msg=f"{name}: {key}", **TOL)
        assert de.gene_names == list(atlas.var_names)
        da = kd.DifferentialAbundance().fit_from(source, "condition", "young", "old", sample_col="sample",
                                                 landmarks=case["in_landmarks"])
        np.testing.assert_allclose(da.predict(da.condition_inputs.x_all)["log_fold_change"],
                                   da_ref["log_fold_change"], err_msg=name, **TOL)


def test_a_dataset_feeds_the_classes_and_the_store(case, atlas, reference, tmp_path):
    from kompot_dask.io import make_dataset, open_dataset, write_dataset

    ds = make_dataset(atlas.obsm["DM_EigenVectors"], atlas.X.toarray(),
                      condition=atlas.obs["condition"].astype(str).to_numpy(),
                      sample=atlas.obs["sample"].to_numpy(), gene_names=list(atlas.var_names))
    write_dataset(ds, tmp_path / "atlas_ds.zarr")
    stored = open_dataset(tmp_path / "atlas_ds.zarr")
    de = kd.DifferentialExpression().fit_from(stored, "condition", "young", "old", sample_col="sample",
                                              landmarks=case["in_landmarks"])
    out = de.predict(stored, compute_mahalanobis=True, store=tmp_path / "de.zarr", cell_chunk=400, gene_batch=16)
    np.testing.assert_allclose(out["fold_change"].values, reference[0]["fold_change"], **TOL)
    np.testing.assert_allclose(out["mahalanobis_distances"].values, reference[0]["mahalanobis_distances"], **TOL)


def test_source_errors_name_the_fix(atlas):
    with pytest.raises(ValueError, match="groupby|column"):
        kd.DifferentialAbundance().fit_from(atlas, "treatment", "young", "old")
    with pytest.raises(ValueError, match="obsm"):
        kd.DifferentialAbundance().fit_from(atlas, "condition", "young", "old", obsm_key="X_umap")
