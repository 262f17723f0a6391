"""kompot_dask.plot on an AnnData carrying Kompot 0.8.0's recorded fields (anndata_de_da.npz, README §4.6)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

from conftest import load_case  # noqa: E402

from kompot_dask import plot as kplot  # noqa: E402

C1, C2 = "control day-0", "stim 2.5h"
COMPARISON = f"{C2} vs {C1}"
DA = "kompot_da_control_day_0_to_stim_2_5h"
DE = "kompot_de_control_day_0_to_stim_2_5h"
UP, NEUTRAL, DOWN = "#d73027", "#d3d3d3", "#4575b4"


@pytest.fixture(scope="module")
def case():
    return load_case("anndata_de_da")


def _smoothed(z, condition, k=25):
    """A k-NN average of the expression of one condition's cells, for every cell (layer filler)."""
    X = z["in_obsm_DM_EigenVectors"]
    mask = z["in_obs_condition"] == condition
    d2 = ((X[:, None, :] - X[None, mask, :]) ** 2).sum(-1)
    nn = np.argsort(d2, axis=1)[:, :k]
    return z["in_X"][mask][nn].mean(axis=1)


def build(z, da="A_da", de="A_de"):
    """The input AnnData with the recorded outputs of runs ``da`` and ``de`` written into it."""
    obs = pd.DataFrame(
        {"condition": pd.Categorical(z["in_obs_condition"]), "sample": pd.Categorical(z["in_obs_sample"])},
        index=pd.Index(z["in_obs_names"]),
    )
    ad = anndata.AnnData(X=z["in_X"].copy(), obs=obs, var=pd.DataFrame(index=pd.Index(z["in_var_names"])))
    ad.obsm["DM_EigenVectors"] = z["in_obsm_DM_EigenVectors"]
    ad.obsm["X_umap"] = z["in_obsm_DM_EigenVectors"][:, :2].copy()
    rows = z["param_layer_rows"]
    layers = {}
    for key in z:
        for tag, loc in ((da, "obs"), (de, "obs"), (de, "var")):
            prefix = f"out_{tag}_{loc}__"
            if key.startswith(prefix):
                name = key[len(prefix):]
                values = z[key]
                cats = f"out_{tag}_obs_categories__{name}"
                if loc == "obs" and cats in z:
                    values = pd.Categorical(values, categories=list(z[cats]))
                getattr(ad, loc)[name] = values
        prefix = f"out_{de}_layer_rows__"
        if key.startswith(prefix):
            layers[key[len(prefix):]] = z[key]
        for tag, uns_key in ((da, "kompot_da"), (de, "kompot_de")):
            prefix = f"out_{tag}_uns__"
            if key.startswith(prefix):
                path = key[len(prefix):]
                if path.startswith(uns_key + "__"):
                    sub = path[len(uns_key) + 2:]
                    if "__" not in sub:  # run_history, last_run_info, anndata_fields, landmarks
                        ad.uns.setdefault(uns_key, {})[sub] = z[key][()] if z[key].ndim == 0 else z[key]
                else:
                    ad.uns[path] = list(z[key])
    s1, s2 = _smoothed(z, C1), _smoothed(z, C2)
    fill = {"smoothed": None, "fold_change": s2 - s1}
    for name, recorded in layers.items():
        if name.endswith("_smoothed"):
            full = s1.copy() if "control_day_0" in name else s2.copy()
        elif name.endswith("_fold_change"):
            full = fill["fold_change"].copy()
        else:
            full = np.zeros_like(s1)
        full[rows] = recorded
        ad.layers[name] = full
    return ad


@pytest.fixture
def adata(case):
    return build(case)


@pytest.fixture
def adata_b(case):
    return build(case, da="B_da_sample", de="B_de_sample")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _hex(colors):
    return [to_hex(c) for c in colors]


# --------------------------------------------------------------------------- import


def test_import_does_not_load_matplotlib():
    code = "import sys, kompot_dask.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- fields


def test_resolve_da_fields(adata, case):
    rf = kplot.resolve_fields(adata, "da", check=True)
    info = json.loads(str(case["out_A_da_uns__kompot_da__last_run_info"]))
    assert rf.run_id == 0
    assert rf.lfc_key == info["lfc_key"] == f"{DA}_lfc"
    assert rf.zscore_key == f"{DA}_lfc_zscore"
    assert rf.ptp_key == f"{DA}_neg_log10_lfc_ptp"
    assert rf.direction_key == f"{DA}_lfc_direction"
    assert rf.density_keys == info["density_keys"]
    assert (rf.condition1, rf.condition2, rf.groupby) == (C1, C2, "condition")
    assert (rf.lfc_threshold, rf.ptp_threshold) == (1.0, 0.05)
    assert rf.comparison == COMPARISON


def test_resolve_de_fields(adata, case):
    rf = kplot.resolve_fields(adata, "de", run_id=-1, check=True)
    info = json.loads(str(case["out_A_de_uns__kompot_de__last_run_info"]))
    assert rf.lfc_key == f"{DE}_mean_lfc"
    assert rf.mahalanobis_key == f"{DE}_mahalanobis"
    assert rf.ptp_key == f"{DE}_neg_log10_ptp"
    assert rf.fdr_keys == info["fdr_keys"]
    assert rf.local_fdr_key == f"{DE}_mahalanobis_local_fdr"
    assert rf.is_de_key == f"{DE}_is_de"
    assert rf.smoothed_layer_keys == info["smoothed_layer_keys"]
    assert rf.fdr_threshold == 0.05
    assert (rf.condition1, rf.condition2, rf.groupby) == (C1, C2, "condition")


def test_resolve_sample_variance_run(adata_b):
    da = kplot.resolve_fields(adata_b, "da", check=True)
    assert da.lfc_key == f"{DA}_lfc"
    assert da.ptp_key == f"{DA}_neg_log10_lfc_ptp_sample_var"
    assert da.direction_key == f"{DA}_lfc_direction_sample_var"
    de = kplot.resolve_fields(adata_b, "de", check=True)
    assert de.mahalanobis_key == f"{DE}_mahalanobis_sample_var"
    assert de.fdr_keys is None and de.is_de_key is None
    assert de.sample_col == "sample"


def test_explicit_keys_override_and_work_without_run(adata):
    rf = kplot.resolve_fields(adata, "da", keys={"ptp_key": f"{DA}_lfc_zscore"})
    assert rf.ptp_key == f"{DA}_lfc_zscore" and rf.lfc_key == f"{DA}_lfc"
    del adata.uns["kompot_da"]
    rf = kplot.resolve_fields(adata, "da", lfc_key=f"{DA}_lfc", ptp_key=f"{DA}_neg_log10_lfc_ptp",
                              check=("lfc_key", "ptp_key"))
    assert rf.run_id is None and rf.comparison == ""
    with pytest.raises(KeyError, match="unknown field name"):
        kplot.resolve_fields(adata, "da", lfc=f"{DA}_lfc")


def test_no_run_errors(adata):
    empty = anndata.AnnData(X=np.zeros((3, 2)))
    with pytest.raises(KeyError, match=r"no DA run .*run kompot_dask\.da\(adata, \.\.\.\) first"):
        kplot.resolve_fields(empty, "da")
    with pytest.raises(KeyError, match=r"run kompot_dask\.de\(adata, \.\.\.\) first"):
        kplot.volcano_de(empty)
    with pytest.raises(KeyError, match=r"run kompot_dask\.da\(adata, \.\.\.\) first"):
        kplot.volcano_da(empty)
    with pytest.raises(IndexError, match="out of range.*1 DA run"):
        kplot.resolve_fields(adata, "da", run_id=3)
    with pytest.raises(ValueError, match="'da' or 'de'"):
        kplot.resolve_fields(adata, "smooth")


def test_missing_field_errors(adata):
    del adata.obs[f"{DA}_neg_log10_lfc_ptp"]
    with pytest.raises(KeyError, match=r"-log10 PTP field .*neg_log10_lfc_ptp.* missing from adata\.obs"):
        kplot.volcano_da(adata)
    with pytest.raises(KeyError, match="missing from adata.obs: it was deleted or overwritten"):
        kplot.resolve_fields(adata, "da", check=True)
    del adata.layers[f"{DE}_fold_change"]
    with pytest.raises(KeyError, match=r"fold_change.* missing from adata\.layers"):
        kplot.gene_expression(adata, "gene00")
    del adata.var[f"{DE}_mahalanobis"]
    with pytest.raises(KeyError, match=r"Mahalanobis distance field .* missing from adata\.var"):
        kplot.volcano_de(adata)


def test_field_never_stored_by_run(adata_b):
    # B_de_sample has no FDR: is_de was never recorded.
    rf = kplot.resolve_fields(adata_b, "de")
    with pytest.raises(KeyError, match="recorded no is_de field"):
        rf.require(adata_b, "is_de_key")
    # A run that recorded a ptp_key without storing it (store_additional_stats=False).
    info = json.loads(adata_b.uns["kompot_de"]["last_run_info"])
    del info["field_mapping"][f"{DE}_neg_log10_ptp_sample_var"]
    adata_b.uns["kompot_de"]["run_history"] = json.dumps([info])
    del adata_b.var[f"{DE}_neg_log10_ptp_sample_var"]
    with pytest.raises(KeyError, match="did not store .*store_additional_stats=True"):
        kplot.volcano_de(adata_b, y="ptp")


def test_run_id_selects_history_entry(case):
    ad = build(case)
    b = build(case, da="B_da_sample", de="B_de_sample")
    for key in b.obs.columns:
        if key.startswith("kompot_da"):
            ad.obs[key] = b.obs[key]
    ad.uns[f"{DA}_lfc_direction_sample_var_colors"] = b.uns[f"{DA}_lfc_direction_sample_var_colors"]
    a_info = json.loads(ad.uns["kompot_da"]["last_run_info"])
    b_info = json.loads(b.uns["kompot_da"]["last_run_info"])
    ad.uns["kompot_da"]["run_history"] = json.dumps([b_info, a_info])
    fields = json.loads(ad.uns["kompot_da"]["anndata_fields"])
    fields["obs"][f"{DA}_lfc"] = 1
    ad.uns["kompot_da"]["anndata_fields"] = json.dumps(fields)
    assert kplot.resolve_fields(ad, "da").direction_key == f"{DA}_lfc_direction"
    assert kplot.resolve_fields(ad, "da", run_id=-2).direction_key == f"{DA}_lfc_direction_sample_var"
    assert kplot.resolve_fields(ad, "da", run_id=0).run_id == 0
    with pytest.warns(UserWarning, match="last written by DA run 1, not run 0"):
        kplot.volcano_da(ad, run_id=0)


# --------------------------------------------------------------------------- volcano_da


def test_volcano_da(adata, tmp_path):
    fig = kplot.volcano_da(adata, save=tmp_path / "v.png")
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel() == f"log fold change ({COMPARISON})"
    assert ax.get_ylabel() == "\u2212log10 PTP"
    assert ax.get_title() == f"Differential abundance: {COMPARISON}"
    coll = ax.collections[0]
    assert len(coll.get_offsets()) == adata.n_obs
    colors = _hex(coll.get_facecolors())
    direction = adata.obs[f"{DA}_lfc_direction"]
    assert colors.count(UP) == (direction == "up").sum() == 25
    assert colors.count(DOWN) == (direction == "down").sum() == 8
    assert colors.count(NEUTRAL) == (direction == "neutral").sum()
    # each point drawn at its cell's coordinates with its cell's colour
    lfc = adata.obs[f"{DA}_lfc"].to_numpy()
    up_x = np.sort(coll.get_offsets()[np.array(colors) == UP][:, 0])
    np.testing.assert_allclose(up_x, np.sort(lfc[(direction == "up").to_numpy()]))
    vlines = sorted(line.get_xdata()[0] for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[1])
    assert vlines == [-1.0, 1.0]
    hlines = [line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1]]
    assert np.isclose(hlines, -np.log10(0.05)).any()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "up (25)" and legend[2] == "down (8)"
    assert (tmp_path / "v.png").stat().st_size > 1000
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_volcano_da_uses_stored_colors_and_obs_column(adata):
    adata.uns[f"{DA}_lfc_direction_colors"] = ["#00ff00", "#000000", "#ff00ff"]
    colors = _hex(kplot.volcano_da(adata).axes[0].collections[0].get_facecolors())
    assert colors.count("#00ff00") == 25 and colors.count("#ff00ff") == 8
    fig, ax = plt.subplots()
    out = kplot.volcano_da(adata, color="sample", ax=ax)
    assert out is ax
    assert [t.get_text() for t in ax.get_legend().get_texts()] == sorted(set(adata.obs["sample"]))
    with pytest.raises(KeyError, match="neither 'direction'"):
        kplot.volcano_da(adata, color="no_such_column")


# --------------------------------------------------------------------------- volcano_de


def test_volcano_de(adata, tmp_path):
    fig = kplot.volcano_de(adata, save=tmp_path / "de.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == f"mean log fold change ({COMPARISON})"
    assert ax.get_ylabel() == "Mahalanobis distance"
    assert ax.get_title() == f"Differential expression: {COMPARISON}"
    coll = ax.collections[0]
    assert len(coll.get_offsets()) == adata.n_vars
    is_de = adata.var[f"{DE}_is_de"].to_numpy()
    assert _hex(coll.get_facecolors()).count(UP) == is_de.sum() == 5
    maha = adata.var[f"{DE}_mahalanobis"]
    top = list(maha.sort_values(ascending=False).index[:10])
    assert [t.get_text() for t in ax.texts] == top
    for t in ax.texts:  # each label points at its gene
        gene = t.get_text()
        assert t.xy == pytest.approx((adata.var.loc[gene, f"{DE}_mean_lfc"], maha[gene]))
    assert (tmp_path / "de.png").stat().st_size > 1000


def test_volcano_de_ptp_and_no_fdr(adata_b):
    fig = kplot.volcano_de(adata_b, y="ptp", n_top=5)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "\u2212log10 PTP"
    ptp = adata_b.var[f"{DE}_neg_log10_ptp_sample_var"]
    assert [t.get_text() for t in ax.texts] == list(ptp.sort_values(ascending=False).index[:5])
    # no is_de field: the annotated top genes are the highlighted ones
    assert _hex(ax.collections[0].get_facecolors()).count(UP) == 5
    with pytest.raises(ValueError, match="'mahalanobis' or 'ptp'"):
        kplot.volcano_de(adata_b, y="pvalue")


# --------------------------------------------------------------------------- embedding


def test_embedding_lfc(adata, tmp_path):
    fig = kplot.embedding(adata, save=tmp_path / "e.png")
    ax = fig.axes[0]
    coll = ax.collections[0]
    assert len(coll.get_offsets()) == adata.n_obs
    lfc = adata.obs[f"{DA}_lfc"].to_numpy()
    lo, hi = coll.get_clim()
    assert lo == -hi and hi == pytest.approx(np.abs(lfc).max())
    np.testing.assert_allclose(np.sort(coll.get_array()), np.sort(lfc))
    cbar_ax = fig.axes[1]
    assert cbar_ax.get_ylabel() == f"{DA}_lfc"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("UMAP 1", "UMAP 2")
    assert ax.get_title() == f"DA log fold change: {COMPARISON}"
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_embedding_direction_gene_and_obs(adata):
    ax = kplot.embedding(adata, color="direction").axes[0]
    colors = _hex(ax.collections[0].get_facecolors())
    assert colors.count(UP) == 25 and colors.count(DOWN) == 8
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == "up (25)"

    fig = kplot.embedding(adata, color="gene03")
    fc = adata.layers[f"{DE}_fold_change"][:, 3]
    coll = fig.axes[0].collections[0]
    np.testing.assert_allclose(np.sort(coll.get_array()), np.sort(fc))
    assert coll.get_clim()[0] == -coll.get_clim()[1]
    assert fig.axes[0].get_title() == f"gene03: log fold change ({COMPARISON})"

    ax = kplot.embedding(adata, color="condition", basis="umap").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [C1, C2]
    with pytest.raises(KeyError, match="not one of"):
        kplot.embedding(adata, color="nothing")
    with pytest.raises(KeyError, match="embedding 'X_tsne' not found"):
        kplot.embedding(adata, basis="X_tsne")


# --------------------------------------------------------------------------- gene_expression


def test_gene_expression(adata, tmp_path):
    fig = kplot.gene_expression(adata, "gene05", save=tmp_path / "g.png")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3
    assert [ax.get_title() for ax in panels] == [f"{C1}: imputed", f"{C2}: imputed",
                                                  f"log fold change ({COMPARISON})"]
    for ax in panels:
        assert len(ax.collections[0].get_offsets()) == adata.n_obs
    assert panels[0].collections[0].get_clim() == panels[1].collections[0].get_clim()
    lo, hi = panels[2].collections[0].get_clim()
    assert lo == -hi
    s1 = adata.layers["kompot_de_control_day_0_smoothed"][:, 5]
    np.testing.assert_allclose(np.sort(panels[0].collections[0].get_array()), np.sort(s1))
    assert fig.get_suptitle() == "gene05"
    assert (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(KeyError, match="not found in adata.var_names"):
        kplot.gene_expression(adata, "no_gene")


# --------------------------------------------------------------------------- direction_barplot


def test_direction_barplot(adata, tmp_path):
    fig = kplot.direction_barplot(adata, "sample", save=tmp_path / "b.png")
    ax = fig.axes[0]
    assert len(ax.containers) == 3
    heights = np.array([[p.get_height() for p in c] for c in ax.containers])
    np.testing.assert_allclose(heights.sum(axis=0), 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(adata.obs["sample"].cat.categories)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("sample", "fraction of cells")
    assert ax.get_title() == f"DA direction per sample: {COMPARISON}"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["up", "neutral", "down"]
    assert (tmp_path / "b.png").stat().st_size > 1000

    fig, ax = plt.subplots()
    assert kplot.direction_barplot(adata, "condition", normalize=False, ax=ax) is ax
    table = pd.crosstab(adata.obs["condition"], adata.obs[f"{DA}_lfc_direction"])
    stack = ["down", "neutral", "up"]
    for container, direction in zip(ax.containers, stack):
        assert [p.get_height() for p in container] == list(table[direction])
        assert to_hex(container.patches[0].get_facecolor()) == {"up": UP, "neutral": NEUTRAL, "down": DOWN}[direction]
    assert ax.get_ylabel() == "number of cells"
    with pytest.raises(KeyError, match="not a column of adata.obs"):
        kplot.direction_barplot(adata, "cell_type")


# --------------------------------------------------------------------------- large atlases


def test_large_atlas_subsampled_and_rasterized(case):
    n = 200_001
    rng = np.random.default_rng(1)
    info = json.loads(str(case["out_A_da_uns__kompot_da__last_run_info"]))
    direction = rng.choice(["up", "neutral", "down"], size=n, p=[0.1, 0.8, 0.1])
    obs = pd.DataFrame({
        f"{DA}_lfc": rng.normal(size=n),
        f"{DA}_neg_log10_lfc_ptp": rng.exponential(size=n),
        f"{DA}_lfc_direction": pd.Categorical(direction, categories=["up", "neutral", "down"]),
        "group": pd.Categorical(rng.choice(list("abc"), size=n)),
    })
    obs.index = obs.index.astype(str)
    ad = anndata.AnnData(obs=obs)
    ad.obsm["X_umap"] = rng.normal(size=(n, 2))
    ad.uns["kompot_da"] = {"run_history": json.dumps([info])}
    fig = kplot.volcano_da(ad)
    coll = fig.axes[0].collections[0]
    assert len(coll.get_offsets()) == 200_000 and coll.get_rasterized()
    offsets = kplot.volcano_da(ad, max_points=5_000).axes[0].collections[0].get_offsets()
    again = kplot.volcano_da(ad, max_points=5_000).axes[0].collections[0].get_offsets()
    assert len(offsets) == 5_000
    np.testing.assert_array_equal(offsets, again)  # fixed seed
    coll = kplot.embedding(ad, color="lfc", max_points=5_000).axes[0].collections[0]
    assert len(coll.get_offsets()) == 5_000 and coll.get_rasterized()
    small = kplot.embedding(build(case), color="lfc").axes[0].collections[0]
    assert not small.get_rasterized()
    assert kplot.direction_barplot(ad, "group").axes[0].containers[0].patches[0].get_height() > 0
