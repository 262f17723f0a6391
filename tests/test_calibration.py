"""Replicate-aware calls (issue #15): relabelling null for genes, spatial FDR for cells.

Hand-computed cases for the pieces (relabelling enumeration, pooled p-values, weighted BH,
the spatial call, the balancing weights, the Pareto tail) and small seeded atlases for the
wiring: the real labelling reproduces the model's own distances, a null atlas gets no
call, and genes given a strong effect are called.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from conftest import assert_close

from kompot_dask.differential import _calls, _relabel
from kompot_dask.kernels.fdr import benjamini_hochberg
from kompot_dask.testing import condition_arrays, simulate_atlas


# ------------------------------------------------------------------ relabellings
@pytest.mark.parametrize("n1, n2, expected", [(3, 3, 9), (2, 3, 9), (2, 2, 2), (1, 2, 2), (1, 1, 0), (4, 4, 34)])
def test_relabellings_count_sizes_and_no_duplicates(n1, n2, expected):
    rows = _relabel.relabellings(n1, n2)
    assert rows.shape == (expected, n1 + n2) and rows.dtype == bool
    assert (rows.sum(axis=1) == n2).all()  # pseudo-condition 2 has n2 samples
    identity = np.r_[np.zeros(n1, bool), np.ones(n2, bool)]
    keys = {tuple(r) for r in rows}
    assert len(keys) == expected  # all distinct
    assert tuple(identity) not in keys and tuple(~identity) not in keys
    if n1 == n2:  # mirror images are the same split: only those keeping sample 0 in group 1
        assert not rows[:, 0].any()
        assert expected == math.comb(n1 + n2, n1) // 2 - 1
    else:
        assert expected == math.comb(n1 + n2, n1) - 1


def test_relabellings_cap_is_a_seeded_subset():
    full = {tuple(r) for r in _relabel.relabellings(4, 4)}
    a = _relabel.relabellings(4, 4, max_relabellings=5, seed=3)
    b = _relabel.relabellings(4, 4, max_relabellings=5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 5 and {tuple(r) for r in a} <= full
    assert not np.array_equal(a, _relabel.relabellings(4, 4, max_relabellings=5, seed=4))


# ----------------------------------------------------------------------- p-values
def test_pooled_pvalues_by_hand():
    null = np.array([[1.0, 2.0, 3.0], [0.1, 2.0, 4.0]])  # pool of 6
    p = _relabel.pooled_pvalues(np.array([0.5, 2.0, 5.0, np.nan]), null)
    np.testing.assert_allclose(p[:3], [6 / 7, 5 / 7, 1 / 7])  # (1 + #null >= d) / (1 + 6), ties count
    assert np.isnan(p[3])
    with pytest.raises(ValueError, match="empty"):
        _relabel.pooled_pvalues(np.ones(2), np.full(3, np.nan))


def test_benjamini_hochberg_by_hand_plain_and_weighted():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    np.testing.assert_allclose(benjamini_hochberg(p)[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert np.isnan(benjamini_hochberg(p)[4])
    np.testing.assert_allclose(benjamini_hochberg(p, np.full(5, 2.5)), benjamini_hochberg(p), equal_nan=True)
    # weights 3,1,1,1: ranks become weight fractions 3/6, 4/6, 5/6, 6/6 (sorted p 0.01, 0.03, 0.04, 0.2)
    q = benjamini_hochberg(p[:4], np.array([3.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(q, [0.02, 0.048, 0.045, 0.2])
    with pytest.raises(ValueError, match="positive"):
        benjamini_hochberg(p[:2], np.array([1.0, 0.0]))


def test_tail_pvalues_resolve_beyond_the_null():
    rng = np.random.default_rng(0)
    null = rng.exponential(size=20_000)  # a Pareto tail of shape 0: sf(d) = exp(-d)
    obs = np.array([0.5, 8.0, 12.0])
    p = _relabel.tail_pvalues(obs, null)
    emp = _relabel.pooled_pvalues(obs, null)
    assert p[0] == emp[0]  # below the threshold: empirical
    assert emp[2] == 1 / 20_001  # the empirical floor
    for d, pd in zip(obs[1:], p[1:]):
        assert math.exp(-d) / 3 < pd < 3 * math.exp(-d)
    assert p[2] < emp[2] / 5  # resolves far below the floor


# ------------------------------------------------------------------ spatial call
def test_spatial_call_on_a_toy_map():
    point_z = np.array([5.0, 4.0, 0.1, 0.2])  # p ~ 5.7e-7, 6.3e-5, 0.92, 0.84
    cell_z = np.array([4.5, -4.2, 3.9, 0.5, 5.0])
    cell_lfc = np.array([1.0, -1.0, 1.0, 0.2, 2.0])
    call = _calls.spatial_call(cell_z, cell_lfc, point_z, alpha=0.05)
    p_points = 2 * scipy.stats.norm.sf(point_z)
    np.testing.assert_allclose(call.point_pvalue, p_points)
    np.testing.assert_allclose(call.point_fdr[:2], [4 * p_points[0], 2 * p_points[1]])  # BH: p n / rank
    assert call.threshold == pytest.approx(p_points[1])
    assert call.direction.tolist() == ["up", "down", "neutral", "neutral", "up"]
    assert ((call.fdr <= 0.05) == (call.direction != "neutral")).all()
    none = _calls.spatial_call(cell_z, cell_lfc, np.array([0.1, 0.2, 0.3]), alpha=0.05)
    assert none.threshold == 0.0 and (none.direction == "neutral").all()
    # Student's t is more conservative than the normal in the tails
    t_call = _calls.spatial_call(cell_z, cell_lfc, point_z, alpha=0.05, df=4)
    assert (t_call.point_pvalue > call.point_pvalue).all()
    np.testing.assert_allclose(t_call.point_pvalue, 2 * scipy.stats.t.sf(point_z, 4))


def test_density_weights_share_weight_in_dense_places():
    rng = np.random.default_rng(1)
    dense = rng.normal(scale=0.05, size=(60, 2))
    sparse = rng.uniform(-5, 5, size=(40, 2)) + 20
    w = _calls.density_weights(np.vstack([dense, sparse]))
    assert w.mean() == pytest.approx(1.0)
    assert np.median(w[60:]) > 10 * np.median(w[:60])


# ------------------------------------------------------------------- balancing
def test_balance_weights_give_every_sample_the_pooled_distribution():
    rng = np.random.default_rng(2)
    landmarks = rng.normal(size=(40, 3))
    labels1, labels2 = np.repeat(["a", "b"], [300, 200]), np.repeat(["c", "d"], [250, 250])
    x1 = landmarks[rng.integers(0, 20, 500)] + 0.01 * rng.normal(size=(500, 3))  # condition 1: first half
    x2 = landmarks[rng.integers(0, 40, 500)] + 0.01 * rng.normal(size=(500, 3))
    units = _relabel.sample_units(labels1, labels2)
    w = _relabel.balance_weights(units, (x1, x2), landmarks, n_regions=40, seed=0, cap=1e9)
    from scipy.spatial import cKDTree

    tree = cKDTree(landmarks)
    regions = [tree.query((x1, x2)[c - 1][rows])[1] for c, rows in zip(units.condition, units.rows)]
    pooled = np.bincount(np.concatenate(regions), minlength=40) / 1000
    for reg, wt in zip(regions, w):
        own = np.bincount(reg, minlength=40)
        weighted = np.bincount(reg, weights=wt, minlength=40) / len(reg)
        np.testing.assert_allclose(weighted[own > 0], pooled[own > 0])


# --------------------------------------------------------------- small atlases
def _fit(atlas, boost=None, **kw):
    from kompot_dask import DifferentialExpression

    c = condition_arrays(atlas)
    y2 = c.y2.copy()
    if boost is not None:
        y2[:, boost] += 2.0  # a strong change of these genes in every treated cell
    de = DifferentialExpression(n_landmarks=50, random_state=0, **kw)
    de.fit(c.x1, c.y1, c.x2, y2, condition1_sample_indices=c.samples1, condition2_sample_indices=c.samples2)
    return de


@pytest.fixture(scope="module")
def null_atlas():
    return simulate_atlas(1200, 30, seed=5, effect="null")


def test_real_labelling_reproduces_the_model_and_a_null_atlas_is_not_called(null_atlas):
    de = _fit(null_atlas, replicate_null=True, null_genes=10)
    result = de.predict(de.computed_landmarks, compute_mahalanobis=True)
    table = de.replicate_fdr_results  # the defaults: balanced fits, Pareto tail
    assert result["fdr_null"] == "sample_relabelling" and table.attrs["n_relabellings"] == 9
    assert table.attrs["n_null"] == 9 * 30 and table.attrs["balance"] == 30 and table.attrs["tail"] == "gpd"
    np.testing.assert_array_equal(result["replicate_is_de"], table["is_de"])
    assert not table["is_de"].any()
    plain = de.compute_replicate_fdr(balance=None, tail="empirical")
    np.testing.assert_allclose(plain["mahalanobis"], result["mahalanobis_distances"], rtol=1e-8)
    assert not plain["is_de"].any()
    assert plain["pvalue"].min() > 1 / (9 * 30 + 1) - 1e-12
    assert not np.allclose(plain["mahalanobis"], table["mahalanobis"])  # the weights changed the fits
    off = _fit(null_atlas, replicate_null=False).predict(de.computed_landmarks, compute_mahalanobis=True)
    assert "replicate_is_de" not in off


def test_strongly_changed_genes_are_called(null_atlas):
    boost = [0, 3, 7, 11, 19]
    de = _fit(null_atlas, boost=boost)
    for kw in ({}, {"balance": None, "tail": "empirical"}):
        table = de.compute_replicate_fdr(**kw)
        called = np.flatnonzero(table["is_de"].to_numpy())
        np.testing.assert_array_equal(called, boost)
        assert (table["fdr"].to_numpy()[called] <= 0.05).all()


def test_replicate_null_needs_labels_and_landmarks(null_atlas):
    from kompot_dask import DifferentialExpression

    c = condition_arrays(null_atlas)
    de = DifferentialExpression(n_landmarks=50, random_state=0).fit(c.x1, c.y1, c.x2, c.y2)
    with pytest.raises(ValueError, match="sample labels"):
        de.compute_replicate_fdr()


def test_spatial_fdr_call_of_a_fitted_abundance_model(null_atlas):
    from kompot_dask import DifferentialAbundance

    c = condition_arrays(null_atlas)
    da = DifferentialAbundance(n_landmarks=50, random_state=0).fit(c.x1, c.x2)
    result = da.predict(null_atlas.x, spatial_fdr=0.05)
    kept = da.log_fold_change.copy()
    alone = da.spatial_fdr_call(null_atlas.x)
    np.testing.assert_array_equal(da.log_fold_change, kept)  # the model's stored results are untouched
    np.testing.assert_allclose(alone["log_fold_change_spatial_fdr"], result["log_fold_change_spatial_fdr"])
    called = result["log_fold_change_spatial_direction"] != "neutral"
    np.testing.assert_array_equal(called, result["log_fold_change_spatial_fdr"] <= 0.05)
    np.testing.assert_array_equal(result["log_fold_change_direction"] == "neutral",
                                  da.predict(null_atlas.x)["log_fold_change_direction"] == "neutral")
    assert len(alone["spatial_fdr_point_pvalue"]) == 50


# --------------------------------------------------------------- de(..., replicate_null=True)
def _boosted_anndata(atlas, boost):
    from kompot_dask.testing import atlas_anndata

    adata = atlas_anndata(atlas, sparse=False)
    adata.X = np.array(adata.X, dtype=np.float64)  # a copy: the module's atlas stays as drawn
    treated = (adata.obs["condition"] == adata.obs["condition"].cat.categories[1]).to_numpy()
    adata.X[np.ix_(treated, boost)] += 2.0  # a strong change of these genes in every treated cell
    return adata


def test_de_writes_the_replicate_calls_of_the_class(null_atlas):
    """``de(..., replicate_null=True)`` writes the sample-relabelling calls of a
    DifferentialExpression fitted independently on the same cells, genes and landmarks
    (to 1e-10), NaN / False for genes not analysed, and says in the run history which
    null each call used; the boosted genes are the ones called."""
    import json

    import kompot_dask as kd
    from kompot_dask import DifferentialExpression

    boost = [0, 3, 7, 11, 19]
    adata = _boosted_anndata(null_atlas, boost)
    c1, c2 = list(adata.obs["condition"].cat.categories)
    genes = list(adata.var_names[:24])
    full = kd.de(adata, "condition", c1, c2, sample_col="sample", genes=genes, n_landmarks=50, random_state=0,
                 replicate_null=True, progress=False, return_full_results=True)
    base = f"kompot_de_{c1}_to_{c2}_replicate"
    info = json.loads(adata.uns["kompot_de"]["last_run_info"])
    assert info["fdr_null"]["kompot_fdr"] is None  # Kompot: no null genes with a sample column
    assert info["fdr_null"]["replicate_fdr"]["null"] == "sample_relabelling"
    assert info["fdr_null"]["replicate_fdr"]["n_relabellings"] == 9

    model = DifferentialExpression(n_landmarks=50, random_state=0)
    model.fit_from(adata, "condition", c1, c2, sample_col="sample", genes=genes,
                   landmarks=full["landmarks"])
    table = model.compute_replicate_fdr()
    for column in ("mahalanobis", "pvalue", "fdr"):
        got = adata.var[f"{base}_{column}_sample_var"].to_numpy()
        assert_close(got[:24], table[column].to_numpy(), atol=1e-10, rtol=1e-10, what=column)
        assert np.isnan(got[24:]).all()
    called = adata.var[f"{base}_is_de_sample_var"].to_numpy()
    np.testing.assert_array_equal(called[:24], table["is_de"].to_numpy())
    np.testing.assert_array_equal(np.flatnonzero(called), boost)


def test_de_replicate_null_refusals_come_before_any_write(null_atlas):
    import kompot_dask as kd

    adata = _boosted_anndata(null_atlas, [0])
    c1, c2 = list(adata.obs["condition"].cat.categories)
    before = (set(adata.var.columns), set(adata.layers.keys()), set(adata.uns.keys()))
    with pytest.raises(ValueError, match="pass `sample_col=`"):
        kd.de(adata, "condition", c1, c2, n_landmarks=50, replicate_null=True)
    with pytest.raises(TypeError, match="None .*True or False"):
        kd.de(adata, "condition", c1, c2, sample_col="sample", n_landmarks=50, replicate_null="yes")
    with pytest.raises(ValueError, match="compute_mahalanobis=True"):
        kd.de(adata, "condition", c1, c2, sample_col="sample", n_landmarks=50, replicate_null=True,
              compute_mahalanobis=False)
    assert (set(adata.var.columns), set(adata.layers.keys()), set(adata.uns.keys())) == before


# ------------------------------------------------- on by default with sample labels
def test_replicate_null_is_on_by_default_with_sample_labels(null_atlas):
    """``replicate_null=None``: on with labels and shared landmarks (the same calls as
    ``compute_replicate_fdr``), off without labels or landmarks, saying why; True that
    cannot run is refused naming the fix; a value that is not None/True/False too."""
    from kompot_dask import DifferentialExpression

    c = condition_arrays(null_atlas)
    boost = [2, 5, 9, 13, 17]  # enough for BH at the floor of the empirical p-values (270 null distances)
    de = _fit(null_atlas, boost=boost)
    assert de.replicate_null is None and de.replicate_null_reason is None
    result = de.predict(de.computed_landmarks, compute_mahalanobis=True)
    np.testing.assert_array_equal(np.flatnonzero(result["replicate_is_de"]), boost)
    assert result["fdr_null"] == "sample_relabelling"
    again = de.replicate_fdr_results.copy()
    np.testing.assert_array_equal(de.compute_replicate_fdr()["pvalue"], again["pvalue"])

    plain = DifferentialExpression(n_landmarks=50, random_state=0).fit(c.x1, c.y1, c.x2, c.y2)
    assert "no sample labels" in plain.replicate_null_reason
    assert "replicate_pvalue" not in plain.predict(plain.computed_landmarks, compute_mahalanobis=True)
    full_gp = DifferentialExpression(random_state=0).fit(
        c.x1[:150], c.y1[:150], c.x2[:150], c.y2[:150], condition1_sample_indices=c.samples1[:150],
        condition2_sample_indices=c.samples2[:150])
    assert "shared landmarks" in full_gp.replicate_null_reason
    off = _fit(null_atlas, replicate_null=False)
    assert off.replicate_null_reason == "replicate_null=False"
    assert "replicate_pvalue" not in off.predict(off.computed_landmarks, compute_mahalanobis=True)

    with pytest.raises(ValueError, match="`condition1_sample_indices` and `condition2_sample_indices`"):
        DifferentialExpression(n_landmarks=50, replicate_null=True).fit(c.x1, c.y1, c.x2, c.y2)
    with pytest.raises(ValueError, match="pass `n_landmarks` or `landmarks`"):
        DifferentialExpression(replicate_null=True).fit(
            c.x1[:150], c.y1[:150], c.x2[:150], c.y2[:150], condition1_sample_indices=c.samples1[:150],
            condition2_sample_indices=c.samples2[:150])
    with pytest.raises(TypeError, match="replicate_null"):
        DifferentialExpression(replicate_null="auto")


def test_de_with_a_sample_column_writes_the_replicate_calls_in_memory_and_out_of_core(null_atlas, tmp_path):
    """``de(..., sample_col=...)`` writes the four replicate columns by default, the same
    (1e-8) into an AnnData-zarr given by path as in memory; the run history says which
    null each call used, and why the relabelling null is off when it is."""
    import json

    import anndata

    import kompot_dask as kd

    boost = [1, 4, 8, 12, 17]
    adata = _boosted_anndata(null_atlas, boost)
    c1, c2 = list(adata.obs["condition"].cat.categories)
    path = tmp_path / "atlas.zarr"
    adata.write_zarr(path)
    args = dict(sample_col="sample", genes=list(adata.var_names[:20]), n_landmarks=50, random_state=0, progress=False)
    kd.de(adata, "condition", c1, c2, **args)
    kd.de(str(path), "condition", c1, c2, **args)
    stored = anndata.read_zarr(path)
    base = f"kompot_de_{c1}_to_{c2}_replicate"
    columns = [f"{base}_{name}_sample_var" for name in ("mahalanobis", "pvalue", "fdr", "is_de")]
    for key in columns:
        mem, disk = adata.var[key].to_numpy(), stored.var[key].to_numpy()
        if key.endswith("is_de_sample_var"):
            assert mem.dtype == bool
            np.testing.assert_array_equal(disk, mem)
            np.testing.assert_array_equal(np.flatnonzero(mem), boost)
        else:
            assert np.isnan(mem[20:]).all() and np.isfinite(mem[:20]).all()
            assert_close(disk[:20], mem[:20], rtol=1e-8, atol=1e-12, what=key)
    for where in (adata, stored):
        info = json.loads(where.uns["kompot_de"]["last_run_info"])
        assert info["fdr_null"]["kompot_fdr"] is None
        assert info["fdr_null"]["replicate_fdr"]["null"] == "sample_relabelling"
        assert info["fdr_null"]["replicate_fdr"]["fields"]["replicate_is_de_key"] == columns[-1]

    kd.de(adata, "condition", c1, c2, replicate_null=False, overwrite=True, **args)
    info = json.loads(adata.uns["kompot_de"]["last_run_info"])
    assert info["fdr_null"]["replicate_fdr"] == {"null": None, "reason": "replicate_null=False"}
    bare = _boosted_anndata(null_atlas, boost)
    kd.de(bare, "condition", c1, c2, n_landmarks=50, random_state=0, progress=False, null_genes=5)
    assert not [c for c in bare.var.columns if "replicate" in c]
    info = json.loads(bare.uns["kompot_de"]["last_run_info"])
    assert info["fdr_null"] == {"kompot_fdr": "null_genes", "replicate_fdr": {"null": None, "reason": "no sample_col"}}


def test_da_writes_the_spatial_fdr_call_beside_kompots_direction(null_atlas):
    """``da(..., spatial_fdr=0.05)`` writes the spatial-FDR call of its model (the class's
    ``spatial_fdr_call`` on the same cells) as two obs columns, records the level and the
    cut in the run history, and leaves Kompot's fields as a run without it; a bad level is
    refused before anything is written."""
    import json

    import kompot_dask as kd
    from kompot_dask.testing import atlas_anndata

    adata = atlas_anndata(null_atlas, sparse=False)
    c1, c2 = list(adata.obs["condition"].cat.categories)
    plain = adata.copy()
    args = dict(sample_col="sample", n_landmarks=50, random_state=0, progress=False)
    before = set(adata.obs.columns)
    for bad in (0.0, 1.0, True, "0.05"):
        with pytest.raises(ValueError, match="spatial_fdr"):
            kd.da(adata, "condition", c1, c2, spatial_fdr=bad, **args)
        assert set(adata.obs.columns) == before and "kompot_da" not in adata.uns
    full = kd.da(adata, "condition", c1, c2, spatial_fdr=0.05, return_full_results=True, **args)
    kd.da(plain, "condition", c1, c2, **args)
    base = f"kompot_da_{c1}_to_{c2}_spatial"
    fdr, direction = adata.obs[f"{base}_fdr_sample_var"], adata.obs[f"{base}_direction_sample_var"]
    x = np.asarray(adata.obsm["DM_EigenVectors"])
    again = full["model"].spatial_fdr_call(x, 0.05)
    np.testing.assert_allclose(fdr.to_numpy(), again["log_fold_change_spatial_fdr"], rtol=1e-12)
    np.testing.assert_array_equal(direction.to_numpy().astype(str), again["log_fold_change_spatial_direction"])
    np.testing.assert_array_equal(direction.to_numpy() != "neutral", fdr.to_numpy() <= 0.05)
    info = json.loads(adata.uns["kompot_da"]["last_run_info"])
    assert info["spatial_fdr"]["alpha"] == 0.05 and info["spatial_fdr"]["sample_variance"] is True
    assert info["spatial_fdr"]["pvalue_threshold"] == again["spatial_fdr_threshold"]
    for column in plain.obs.columns:
        if column.startswith("kompot_da"):
            got, want = adata.obs[column].to_numpy(), plain.obs[column].to_numpy()
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=column)
            else:
                np.testing.assert_array_equal(got.astype(str), want.astype(str), err_msg=column)
    assert "spatial_fdr" not in json.loads(plain.uns["kompot_da"]["last_run_info"])
