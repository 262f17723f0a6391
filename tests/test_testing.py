"""The ground-truth atlas generator (kompot_dask.testing): determinism, truth, files, AUROC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from kompot_dask.testing import Atlas, atlas_anndata, auroc, simulate_atlas, write_atlas_zarr

FIELDS = ("x", "y", "condition", "sample", "true_lfc", "cell_is_da", "gene_is_de", "gene_effect",
          "layout", "branch", "branch_position")


def assert_atlas_equal(a: Atlas, b: Atlas) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.fixture(scope="module")
def signal() -> Atlas:
    return simulate_atlas(6000, 200, seed=2, return_de_effect=True)


def test_same_seed_same_atlas_other_seed_other_atlas():
    a = simulate_atlas(1500, 80, seed=3)
    assert_atlas_equal(a, simulate_atlas(1500, 80, seed=3))
    other = simulate_atlas(1500, 80, seed=4)
    assert not np.allclose(a.x, other.x)
    assert not np.array_equal(a.y, other.y)
    # a cell's values do not depend on how many cells are drawn after it
    small = simulate_atlas(1000, 80, seed=3)
    for name in FIELDS:
        full = getattr(a, name)
        want = full if name in ("gene_is_de", "gene_effect") else full[:1000]
        np.testing.assert_array_equal(getattr(small, name), want, err_msg=name)


def test_shapes_dtypes_and_labels():
    a = simulate_atlas()  # 3000 x 500, 3 samples, 6 dims
    n, g = 3000, 500
    assert a.x.shape == (n, 6) and a.x.dtype == np.float64 and np.isfinite(a.x).all()
    assert a.y.shape == (n, g) and a.y.dtype == np.float32
    assert a.layout.shape == (n, 2) and a.layout.dtype == np.float64
    assert a.true_lfc.shape == (n,) and a.cell_is_da.dtype == bool
    assert a.gene_is_de.shape == (g,) and a.gene_is_de.sum() == 25  # 5% of the genes
    assert a.de_effect is None
    np.testing.assert_array_equal(a.gene_effect != 0, a.gene_is_de)
    np.testing.assert_allclose(np.abs(a.gene_effect[a.gene_is_de]), 1.0)
    assert set(a.condition) == {"control", "treated"}
    assert set(a.sample) == {f"{c}-{i}" for c in ("control", "treated") for i in (1, 2, 3)}
    assert all(s.startswith(c) for s, c in zip(a.sample, a.condition))
    assert 0.4 < (a.condition == "treated").mean() < 0.6
    # realistic expression: log1p of counts, many zeros, some high genes
    counts = np.expm1(a.y.astype(np.float64))
    np.testing.assert_allclose(counts, np.round(counts), rtol=1e-6, atol=1e-5)
    assert 0.3 < (a.y == 0).mean() < 0.85
    assert (a.y == 0).mean(axis=0).max() > 0.95 and (a.y == 0).mean(axis=0).min() < 0.05
    # truth: up and down regions of ~da_strength, zero elsewhere
    assert a.true_lfc.max() == pytest.approx(1.0) and -1.5 < a.true_lfc.min() < -0.6
    assert 0.05 < a.cell_is_da.mean() < 0.6 and (a.true_lfc == 0).mean() > 0.3
    assert (np.abs(a.true_lfc[a.cell_is_da]) > 0.25).all()
    assert set(np.unique(a.branch)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="effect"):
        simulate_atlas(100, 10, effect="nothing")
    with pytest.raises(ValueError, match="dims"):
        simulate_atlas(100, 10, dims=1)


def _sample_f(y: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """One-way ANOVA F statistic of each gene across samples."""
    groups = [y[sample == s].astype(np.float64) for s in np.unique(sample)]
    n, k = len(y), len(groups)
    grand = y.mean(axis=0)
    between = sum(len(g) * (g.mean(axis=0) - grand) ** 2 for g in groups) / (k - 1)
    within = sum(((g - g.mean(axis=0)) ** 2).sum(axis=0) for g in groups) / (n - k)
    return between / np.maximum(within, 1e-12)


def test_null_has_no_effect_but_replicate_variation():
    null = simulate_atlas(3000, 200, effect="null", seed=1)
    assert (null.true_lfc == 0).all() and not null.cell_is_da.any()
    assert not null.gene_is_de.any() and (null.gene_effect == 0).all()
    assert null.x.shape == (3000, 6)
    f = _sample_f(null.y, null.sample)
    # F(5, ~3000) > 6 has p < 1e-4: many genes differ between samples by more than noise
    assert (f > 6).mean() > 0.35 and np.median(f) > 3
    flat = simulate_atlas(3000, 200, effect="null", seed=1, replicate_sd_abundance=0.0,
                          replicate_sd_expression=0.0)
    f_flat = _sample_f(flat.y, flat.sample)
    assert (f_flat > 6).mean() < 0.03 and np.median(f_flat) < 1.5


def test_signal_abundance_follows_true_lfc(signal):
    treated = signal.condition == "treated"
    _, nb = cKDTree(signal.x).query(signal.x, k=31)
    frac = treated[nb[:, 1:]].mean(axis=1)
    prior = treated.mean()
    est = np.log((frac + 1e-3) / (1 - frac + 1e-3)) - np.log(prior / (1 - prior))
    strong = np.abs(signal.true_lfc) >= 0.5
    assert (np.sign(est[strong]) == np.sign(signal.true_lfc[strong])).mean() > 0.85
    assert est[signal.true_lfc > 0.5].mean() > 0.5
    assert est[signal.true_lfc < -0.5].mean() < -0.5
    assert abs(est[signal.true_lfc == 0].mean()) < 0.2
    assert np.corrcoef(est, signal.true_lfc)[0, 1] > 0.5
    assert auroc(np.abs(est), signal.cell_is_da) > 0.7


def test_signal_expression_changes_only_in_the_genes_region(signal):
    treated = signal.condition == "treated"
    de = np.flatnonzero(signal.gene_is_de)
    assert signal.de_effect.shape == (6000, len(de)) == (6000, 10)
    inside_diff, outside_diff = [], []
    for j, g in enumerate(de):
        effect = signal.de_effect[:, j]
        assert np.abs(effect).max() == pytest.approx(1.0)
        assert np.isin(np.sign(effect), (0, np.sign(signal.gene_effect[g]))).all()
        inside, outside = np.abs(effect) >= 0.5, effect == 0
        assert 0.02 < inside.mean() < 0.5
        diff = [signal.y[m & treated, g].mean() - signal.y[m & ~treated, g].mean() for m in (inside, outside)]
        assert np.sign(diff[0]) == np.sign(signal.gene_effect[g])
        inside_diff.append(abs(diff[0]))
        outside_diff.append(abs(diff[1]))
    assert np.median(inside_diff) > 3 * np.median(outside_diff)
    assert (np.array(inside_diff) > np.array(outside_diff)).mean() >= 0.8


def test_atlas_anndata_round_trips_through_h5ad(tmp_path):
    anndata = pytest.importorskip("anndata")
    import scipy.sparse

    atlas = simulate_atlas(800, 60, seed=5)
    adata = atlas_anndata(atlas)
    assert scipy.sparse.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), atlas.y)
    assert adata.obs_names[0] == "cell000000" and adata.var_names[-1] == "gene0059"
    assert isinstance(adata.obs["condition"].dtype, pd.CategoricalDtype)
    samples = [f"{c}-{i}" for c in ("control", "treated") for i in (1, 2, 3)]
    assert list(adata.obs["sample"].cat.categories) == samples
    adata.write_h5ad(tmp_path / "atlas.h5ad")
    back = anndata.read_h5ad(tmp_path / "atlas.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), atlas.y)
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    pd.testing.assert_frame_equal(back.var, adata.var)
    np.testing.assert_array_equal(back.obsm["DM_EigenVectors"], atlas.x)
    np.testing.assert_array_equal(back.obsm["X_umap"], atlas.layout)
    np.testing.assert_array_equal(back.obs["true_lfc"].to_numpy(), atlas.true_lfc)
    np.testing.assert_array_equal(back.var["gene_is_de"].to_numpy(), atlas.gene_is_de)
    dense = atlas_anndata(atlas, sparse=False)
    assert isinstance(dense.X, np.ndarray) and dense.X.dtype == np.float32


def test_write_atlas_zarr_equals_simulate_atlas(tmp_path):
    anndata = pytest.importorskip("anndata")
    from anndata.experimental import read_lazy

    kwargs = dict(n_cells=5000, n_genes=120, n_samples=2, dims=5, seed=7)
    path = write_atlas_zarr(tmp_path / "atlas.zarr", chunk_cells=1200, **kwargs)
    want = atlas_anndata(simulate_atlas(**kwargs), sparse=False)
    got = anndata.read_zarr(path)
    assert got.shape == (5000, 120)
    np.testing.assert_array_equal(got.X, want.X)
    pd.testing.assert_frame_equal(got.obs, want.obs)
    pd.testing.assert_frame_equal(got.var, want.var)
    for key in ("DM_EigenVectors", "X_umap"):
        np.testing.assert_array_equal(got.obsm[key], want.obsm[key])
    lazy = read_lazy(path)
    assert lazy.X.chunks[0][:2] == (1200, 1200)
    np.testing.assert_array_equal(np.asarray(lazy.X[1100:2500].compute()), want.X[1100:2500])
    np.testing.assert_array_equal(np.asarray(lazy.obs["condition"]), want.obs["condition"].to_numpy())
    with pytest.raises(FileExistsError):
        write_atlas_zarr(path, chunk_cells=1200, **kwargs)
    # a null atlas, one chunk, overwriting
    write_atlas_zarr(path, 300, 20, effect="null", overwrite=True)
    null = anndata.read_zarr(path)
    np.testing.assert_array_equal(null.X, simulate_atlas(300, 20, effect="null").y)
    assert not null.var["gene_is_de"].any()


def _auroc_pairs(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        labels[:2] = (True, False)
        assert auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)
    scores = rng.normal(size=500)
    labels = rng.random(500) < 0.3
    assert auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)
    assert auroc(scores, labels.astype(int)) == auroc(scores, labels)


def test_auroc_obvious_cases():
    labels = np.array([False] * 5 + [True] * 5)
    assert auroc(np.arange(10), labels) == 1.0
    assert auroc(-np.arange(10), labels) == 0.0
    assert auroc(np.ones(10), labels) == 0.5
    assert auroc([0.0, 1.0, 1.0, 2.0], [False, True, False, True]) == pytest.approx(0.875)
    with pytest.raises(ValueError):
        auroc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError):
        auroc([np.nan, 2.0], [True, False])
    with pytest.raises(ValueError):
        auroc([1.0, 2.0, 3.0], [True, False])
