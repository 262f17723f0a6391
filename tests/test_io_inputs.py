"""kompot_dask.io.condition_inputs: every source type, selections, errors, laziness, fit."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import kompot_dask
from kompot_dask.estimators._inputs import read_rows
from kompot_dask.io import (
    ConditionInputs,
    condition_inputs,
    dataset_from_anndata,
    open_dataset,
    write_dataset,
)
from kompot_dask.io import inputs as inputs_module

anndata = pytest.importorskip("anndata")
h5py = pytest.importorskip("h5py")
zarr = pytest.importorskip("zarr")

OBSM = "DM_EigenVectors"
N, G, D = 300, 20, 5
KINDS = ["memory", "backed", "lazy_h5ad", "lazy_zarr", "h5ad", "zarr", "zarr_group", "dataset"]


def _no_compute(dsk, keys, **kwargs):
    raise AssertionError("a dask computation ran")


def _make_adata(seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.6, size=(N, G)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(
                rng.choice(["ctrl", "stim", "other"], N), categories=["ctrl", "stim", "other", "empty"]
            ),
            "sample": rng.choice(["s1", "s2", "s3", "s4"], N),
            "dose": rng.integers(0, 3, N),
        },
        index=[f"cell{i}" for i in range(N)],
    )
    sample_na = obs["sample"].astype(object).to_numpy()
    ctrl = np.flatnonzero(obs["condition"].to_numpy() == "ctrl")
    sample_na[ctrl[[1, 4, 9]]] = np.nan
    obs["sample_na"] = pd.Categorical(sample_na)
    cond_na = obs["condition"].astype(object).to_numpy()
    cond_na[:7] = np.nan
    obs["cond_na"] = pd.Categorical(cond_na)
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(G)])
    )
    adata.obsm[OBSM] = rng.normal(size=(N, D))
    adata.layers["dense"] = rng.normal(size=(N, G))
    return adata


@pytest.fixture(scope="module")
def adata():
    return _make_adata()


@pytest.fixture(scope="module")
def paths(adata, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(root / "a.h5ad")
        adata.write_zarr(root / "a.zarr")
    return {"h5ad": root / "a.h5ad", "zarr": root / "a.zarr"}


@pytest.fixture
def open_source(adata, paths):
    """``open_source(kind, layer=None)``: the fixture AnnData as a source of that kind."""
    handles = []

    def make(kind, layer=None):
        if kind == "memory":
            return adata
        if kind == "backed":
            src = anndata.read_h5ad(paths["h5ad"], backed="r")
            handles.append(src.file)
            return src
        if kind == "lazy_h5ad":
            handle = h5py.File(paths["h5ad"], "r")
            handles.append(handle)
            return anndata.experimental.read_lazy(handle)
        if kind == "lazy_zarr":
            return anndata.experimental.read_lazy(paths["zarr"])
        if kind in ("h5ad", "zarr"):
            return str(paths[kind])
        if kind == "zarr_group":
            return zarr.open_group(str(paths["zarr"]), mode="r")
        if kind == "dataset":
            return dataset_from_anndata(adata, layer=layer, sample_key="sample", cell_chunk=50)
        raise AssertionError(kind)

    yield make
    for handle in handles:
        handle.close()


def _reference(adata, layer, cols):
    m1 = (adata.obs["condition"] == "ctrl").to_numpy()
    m2 = (adata.obs["condition"] == "stim").to_numpy()
    y = adata.X.toarray() if layer is None else adata.layers[layer]
    return m1, m2, y[:, cols]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("layer", "genes"), [(None, None), ("dense", ["gene7", "gene2", "gene15"])])
def test_every_source_matches_numpy_indexing(adata, open_source, kind, layer, genes):
    cols = np.arange(G) if genes is None else np.array([2, 7, 15])  # var order, like Kompot
    m1, m2, y = _reference(adata, layer, cols)
    src = open_source(kind, layer)
    with kompot_dask.set_options(cell_chunk_size=64), dask.config.set(scheduler=_no_compute):
        inp = condition_inputs(
            src, "condition", "ctrl", "stim", sample_col="sample", genes=genes,
            layer=None if kind == "dataset" else layer,
        )
    assert isinstance(inp, ConditionInputs)
    states = adata.obsm[OBSM]
    assert inp.x1.dtype == np.float64 and inp.x1.flags.c_contiguous
    np.testing.assert_array_equal(inp.x1, states[m1])
    np.testing.assert_array_equal(inp.x2, states[m2])
    np.testing.assert_array_equal(inp.x_all, states)
    np.testing.assert_array_equal(inp.cell_index1, np.flatnonzero(m1))
    np.testing.assert_array_equal(inp.cell_index2, np.flatnonzero(m2))
    np.testing.assert_array_equal(inp.labels1, adata.obs["sample"].to_numpy()[m1])
    np.testing.assert_array_equal(inp.labels2, adata.obs["sample"].to_numpy()[m2])
    assert inp.labels1.dtype.kind == "U"
    np.testing.assert_array_equal(inp.obs_names, adata.obs_names)
    np.testing.assert_array_equal(inp.gene_names, adata.var_names[cols])
    for y_lazy, mask in ((inp.y1, m1), (inp.y2, m2)):
        assert isinstance(y_lazy, da.Array)
        assert y_lazy.shape == (mask.sum(), len(cols))
        if not (layer == "dense" and "zarr" in kind or kind == "lazy_h5ad"):  # stored chunks kept
            assert max(y_lazy.chunks[0]) <= 64 and len(y_lazy.chunks[0]) > 1  # cell chunks
        assert y_lazy.dtype == y.dtype
        np.testing.assert_array_equal(y_lazy.compute(), y[mask])
    rows = read_rows(inp.y1, slice(0, 10))
    assert type(rows) is np.ndarray and rows.dtype == np.float64
    np.testing.assert_array_equal(rows, y[m1][:10])


def test_conditions_compare_as_strings_and_masks_select_genes(adata):
    mask = np.zeros(G, dtype=bool)
    mask[[3, 11]] = True
    inp = condition_inputs(adata, "dose", 0, "2", genes=mask)
    dose = adata.obs["dose"].to_numpy()
    np.testing.assert_array_equal(inp.cell_index1, np.flatnonzero(dose == 0))
    np.testing.assert_array_equal(inp.cell_index2, np.flatnonzero(dose == 2))
    np.testing.assert_array_equal(inp.gene_names, ["gene3", "gene11"])
    np.testing.assert_array_equal(inp.y2.compute(), adata.X[dose == 2][:, [3, 11]].toarray())
    assert inp.labels1 is None and inp.labels2 is None


def test_without_expression(adata, paths):
    inp = condition_inputs(paths["h5ad"], "condition", "stim", "ctrl", expression=False)
    assert inp.y1 is None and inp.y2 is None
    np.testing.assert_array_equal(inp.x1, adata.obsm[OBSM][(adata.obs["condition"] == "stim").to_numpy()])
    np.testing.assert_array_equal(inp.gene_names, adata.var_names)
    states_only = dataset_from_anndata(adata).drop_vars(["expression", "gene"])
    inp = condition_inputs(states_only, "condition", "stim", "ctrl", expression=False)
    assert inp.gene_names is None and inp.y1 is None
    with pytest.raises(ValueError, match="has no X .*expression=False"):
        condition_inputs(states_only, "condition", "stim", "ctrl")


def test_single_sample_condition_is_allowed(adata):
    one = adata.copy()
    one.obs["donor"] = np.where(one.obs["condition"] == "ctrl", "d1", one.obs["sample"])
    inp = condition_inputs(one, "condition", "ctrl", "stim", sample_col="donor", expression=False)
    assert set(inp.labels1) == {"d1"} and len(set(inp.labels2)) == 4


ERRORS = [
    pytest.param(dict(groupby="cond"), r"obs column 'cond' not found; available: \['cond_na', "
                 r"'condition', 'dose', 'sample', 'sample_na'\]\. Pass one of them as `groupby=`",
                 id="unknown-groupby"),
    pytest.param(dict(condition2="treated"), r"condition2='treated' is not a value of "
                 r"obs\['condition'\].*values present: \['ctrl', 'other', 'stim'\]", id="absent-value"),
    pytest.param(dict(condition2="ctrl"), r"condition1 and condition2 are both 'ctrl'; pass two different",
                 id="same-conditions"),
    pytest.param(dict(condition2="empty"), r"condition2='empty' selects no cells: it is a category .* "
                 r"empty condition", id="empty-condition"),
    pytest.param(dict(groupby="cond_na", condition2="nan"), r"condition2='nan' would select the 7 "
                 r"cell\(s\) whose obs\['cond_na'\] label is missing.*fillna", id="missing-groupby-labels"),
    pytest.param(dict(sample_col="sample_na"), r"obs\['sample_na'\] has missing sample labels \(NaN/NA\) "
                 r"for 3 of the \d+ cells of condition1='ctrl' and 0 of .*drop those cells, or pass "
                 r"sample_col=None", id="missing-sample-labels"),
    pytest.param(dict(sample_col="donor"), r"obs column 'donor' not found.*sample_col=", id="unknown-sample-col"),
    pytest.param(dict(obsm_key="X_pca"), r"obsm key 'X_pca' not found; available: \['DM_EigenVectors'\]\. "
                 r"Pass .*obsm_key=", id="unknown-obsm-key"),
    pytest.param(dict(layer="counts"), r"layer 'counts' not found; available: \['dense'\]\. Pass .*layer=",
                 id="unknown-layer"),
    pytest.param(dict(genes=["gene1", "nope1", "gene2", "nope2"]), r"2 gene\(s\) in `genes` are not var "
                 r"names \(e.g. \['nope1', 'nope2'\]\); check the spelling", id="unknown-genes"),
]


@pytest.fixture
def h5_reads(monkeypatch):
    """Names of the HDF5 datasets read (any process-local h5py read goes through here)."""
    reads: list[str] = []
    getitem = h5py.Dataset.__getitem__

    def counted(self, args, *rest, **kw):
        reads.append(self.name)
        return getitem(self, args, *rest, **kw)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted)
    return reads


def _matrix_reads(reads):
    return [r for r in reads if r.startswith(("/X", "/layers"))]


@pytest.mark.parametrize("kind", ["memory", "h5ad", "lazy_zarr"])
@pytest.mark.parametrize(("kwargs", "match"), ERRORS)
def test_errors_name_the_problem_and_the_fix(open_source, h5_reads, kind, kwargs, match):
    args = dict(groupby="condition", condition1="ctrl", condition2="stim") | kwargs
    src = open_source(kind)
    h5_reads.clear()
    with pytest.raises(ValueError, match=match):
        condition_inputs(src, args.pop("groupby"), args.pop("condition1"), args.pop("condition2"), **args)
    assert _matrix_reads(h5_reads) == []  # raised before any expression was read


def test_nan_cell_states_of_selected_cells(adata, tmp_path):
    bad = adata.copy()
    ctrl = np.flatnonzero(bad.obs["condition"] == "ctrl")
    other = np.flatnonzero(bad.obs["condition"] == "other")
    bad.obsm[OBSM][other[0], 0] = np.nan  # a cell of neither condition: allowed
    inp = condition_inputs(bad, "condition", "ctrl", "stim", expression=False)
    assert np.isnan(inp.x_all[other[0], 0]) and np.isfinite(inp.x1).all()
    bad.obsm[OBSM][ctrl[[0, 5]], 1] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=(
        rf"obsm\['DM_EigenVectors'\] has NaN/inf cell states in 2 cell\(s\) of condition1='ctrl' and 0 "
        rf"of condition2='stim' \(first: \['cell{ctrl[0]}', 'cell{ctrl[5]}'\]\); drop those cells"
    )):
        condition_inputs(bad, "condition", "ctrl", "stim")
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="NaN/inf cell states in 2 cell"):
        condition_inputs(tmp_path / "bad.h5ad", "condition", "ctrl", "stim")


def test_bad_sources_and_gene_types(adata, paths, tmp_path):
    with pytest.raises(TypeError, match="cannot read conditions from a ndarray; pass an anndata.AnnData"):
        condition_inputs(np.zeros((3, 3)), "condition", "a", "b")
    with pytest.raises(FileNotFoundError, match="no AnnData file or store"):
        condition_inputs(tmp_path / "missing.h5ad", "condition", "a", "b")
    (tmp_path / "x.txt").write_text("not hdf5")
    with pytest.raises(ValueError, match="neither an .h5ad"):
        condition_inputs(tmp_path / "x.txt", "condition", "a", "b")
    with pytest.raises(TypeError, match="gene names or a boolean mask"):
        condition_inputs(adata, "condition", "ctrl", "stim", genes=[1, 2])
    with pytest.raises(ValueError, match=r"boolean `genes` mask has shape \(3,\); expected \(20,\)"):
        condition_inputs(adata, "condition", "ctrl", "stim", genes=np.ones(3, dtype=bool))
    backed = anndata.read_h5ad(paths["h5ad"], backed="r")
    try:
        with pytest.raises(ValueError, match="view of a backed AnnData.*to_memory"):
            condition_inputs(backed[:10], "condition", "ctrl", "stim")
    finally:
        backed.file.close()
    ds = dataset_from_anndata(adata)
    with pytest.raises(ValueError, match=r"cell-state variable 'pca' not found.*\['cell_states'\]"):
        condition_inputs(ds, "condition", "ctrl", "stim", obsm_key="pca")
    with pytest.raises(ValueError, match=r"dataset column 'batch' not found; available: \['condition'\]"):
        condition_inputs(ds, "batch", "ctrl", "stim")


@pytest.mark.parametrize("kind", ["h5ad", "backed", "lazy_h5ad"])
def test_h5ad_expression_is_not_read_while_building(open_source, h5_reads, kind):
    src = open_source(kind)  # a backed AnnData reads its layers into memory here
    h5_reads.clear()
    inp = condition_inputs(src, "condition", "ctrl", "stim", sample_col="sample", layer="dense")
    inp2 = condition_inputs(src, "condition", "ctrl", "stim", genes=["gene4"])
    assert _matrix_reads(h5_reads) == []
    inp.y1[:5].compute()
    inp2.y2.compute()
    assert "/X/data" in h5_reads  # the counter sees the reads once they happen
    assert ("/layers/dense" in h5_reads) is (kind != "backed")  # backed: layers are in memory


class CountingStore(zarr.storage.LocalStore):
    reads: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        CountingStore.reads.append(key)
        return await super().get(key, prototype, byte_range)


@pytest.mark.parametrize("how", ["group", "read_lazy"])
def test_zarr_expression_is_not_read_while_building(adata, paths, how):
    group = zarr.open_group(CountingStore(paths["zarr"], read_only=True), mode="r")
    src = group if how == "group" else anndata.experimental.read_lazy(group)
    CountingStore.reads.clear()
    with kompot_dask.set_options(cell_chunk_size=64):
        inp = condition_inputs(src, "condition", "ctrl", "stim", sample_col="sample")
        dense = condition_inputs(src, "condition", "ctrl", "stim", layer="dense")
    chunk_keys = [k for k in CountingStore.reads if k.startswith(("X/", "layers/")) and "/c" in k]
    assert chunk_keys == []
    m1 = (adata.obs["condition"] == "ctrl").to_numpy()
    np.testing.assert_array_equal(read_rows(inp.y1, slice(0, 10)), adata.X[m1][:10].toarray())
    np.testing.assert_array_equal(dense.y1.compute(), adata.layers["dense"][m1])
    assert any(k.startswith("X/data/") for k in CountingStore.reads)


def test_dataset_store_expression_is_not_read_while_building(adata, tmp_path):
    ds = dataset_from_anndata(adata, sample_key="sample", cell_chunk=64, gene_chunk=8)
    write_dataset(ds, tmp_path / "ds.zarr")
    opened = open_dataset(CountingStore(tmp_path / "ds.zarr", read_only=True))
    CountingStore.reads.clear()
    inp = condition_inputs(opened, "condition", "ctrl", "stim", sample_col="sample")
    assert not any(k.startswith("expression/c/") for k in CountingStore.reads)
    m2 = (adata.obs["condition"] == "stim").to_numpy()
    np.testing.assert_array_equal(inp.y2.compute(), adata.X[m2].toarray())
    np.testing.assert_array_equal(inp.x2, adata.obsm[OBSM][m2])


def test_in_memory_sparse_stays_sparse_until_each_chunk(adata, monkeypatch):
    seen = []
    densify = inputs_module._densify

    def recording(block, dtype):
        seen.append((type(block), block.shape))
        return densify(block, dtype)

    monkeypatch.setattr(inputs_module, "_densify", recording)
    with kompot_dask.set_options(cell_chunk_size=50), dask.config.set(scheduler=_no_compute):
        inp = condition_inputs(adata, "condition", "ctrl", "stim", genes=["gene1", "gene5"])
    assert seen == []
    out = inp.y1.compute(scheduler="sync")
    assert type(out) is np.ndarray
    assert len(seen) == len(inp.y1.chunks[0]) > 1  # one densification per chunk ...
    assert all(issubclass(t, sp.csr_matrix) for t, _ in seen)
    assert sorted(shape for _, shape in seen) == sorted((c, 2) for c in inp.y1.chunks[0])


def test_csc_storage_warns_and_still_matches(adata, tmp_path):
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.warns(UserWarning, match="stored as CSC.*Store it as CSR"):
        inp = condition_inputs(tmp_path / "csc.h5ad", "condition", "ctrl", "stim")
    m1 = (adata.obs["condition"] == "ctrl").to_numpy()
    np.testing.assert_array_equal(inp.y1.compute(), adata.X[m1].toarray())


def test_default_chunks_follow_a_memory_budget():
    from kompot_dask.execution.plan import expression_chunk_rows

    assert expression_chunk_rows(20) == 4096
    assert expression_chunk_rows(30_000) == 64 * 2**20 // (8 * 30_000)
    with kompot_dask.set_options(cell_chunk_size=100):
        assert expression_chunk_rows(30_000) == 100


def test_lazy_inputs_fit_like_dense_arrays(tmp_path):
    rng = np.random.default_rng(3)
    n, g = 200, 10
    states = rng.normal(size=(n, 3))
    counts = np.where(rng.random((n, g)) < 0.4, 0.0, rng.poisson(2.0, (n, g)) + np.sin(states[:, :1]))
    obs = pd.DataFrame({"condition": rng.choice(["A", "B"], n), "sample": rng.choice(["r1", "r2"], n)},
                       index=[f"c{i}" for i in range(n)])
    small = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs)
    small.obsm[OBSM] = states
    small.write_h5ad(tmp_path / "small.h5ad")
    with kompot_dask.set_options(cell_chunk_size=40):
        inp = condition_inputs(tmp_path / "small.h5ad", "condition", "A", "B", sample_col="sample")
    assert isinstance(inp.y1, da.Array)
    landmarks = states[rng.choice(n, 20, replace=False)]

    def fit(y1, y2):
        model = kompot_dask.DifferentialExpression().fit(
            inp.x1, y1, inp.x2, y2, landmarks=landmarks,
            condition1_sample_indices=inp.labels1, condition2_sample_indices=inp.labels2,
        )
        return model.predict(inp.x_all)["fold_change"]

    lazy = fit(inp.y1, inp.y2)
    dense = fit(counts[inp.cell_index1], counts[inp.cell_index2])
    assert lazy.shape == (n, g) and np.isfinite(lazy).all()
    np.testing.assert_allclose(lazy, dense, rtol=1e-10, atol=0)
