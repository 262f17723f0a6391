"""da()/de() on an AnnData against Kompot 0.8.0's recorded run (tests/data/anndata_de_da.npz, README §4.6).

The reference k-means landmarks are injected (put into ``uns["kompot_da"]["landmarks"]``
before the first call, as the reference README says to); everything else is the call as
Kompot users make it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, assert_close, load_case
import kompot_dask as kd

anndata = pytest.importorskip("anndata")

REDACTED = {"timestamp", "hostname", "pid", "platform", "python_version", "username", "kompot_git_sha",
            "kompot_editable", "kompot_version", "package_versions"}


@pytest.fixture(scope="module")
def ref():
    return load_case("anndata_de_da")


def _fresh(ref):
    adata = anndata.read_h5ad(DATA / "anndata_input.h5ad")
    adata.uns["kompot_da"] = {"landmarks": ref["out_A_da_uns__kompot_da__landmarks"].copy()}
    return adata


# The same calls on the atlas in memory and, out of core, on its path: an AnnData-zarr
# (format 3: layers moved into it; format 2: streamed into it) and an .h5ad (results in an
# AnnData-zarr beside it). Every test below runs on each route.
ROUTES = ("memory", "zarr", "zarr-v2", "h5ad")


def _atlas(ref, route, where):
    """What the calls take, and how to read the annotated AnnData back."""
    adata = _fresh(ref)
    if route == "memory":
        return adata, lambda: adata
    if route == "h5ad":
        path = where / "atlas.h5ad"
        adata.write_h5ad(path)
        return str(path), lambda: anndata.read_zarr(where / "atlas.kompot.zarr")
    path = where / "atlas.zarr"
    with anndata.settings.override(zarr_write_format=3 if route == "zarr" else 2):
        adata.write_zarr(path)
    return str(path), lambda: anndata.read_zarr(path)


def _run_a(ref, route="memory", where=None):
    atlas, read = _atlas(ref, route, where)
    c1, c2 = str(ref["in_condition1"]), str(ref["in_condition2"])
    locations = ("obs", "var", "layers", "obsm", "obsp", "varm")
    before = {loc: set(getattr(read(), loc).keys()) for loc in locations} if route != "h5ad" else None
    da_out = kd.da(atlas, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100, random_state=0),
                   storage=kd.StorageSettings(store_landmarks=True),
                   output=kd.OutputSettings(progress=False, return_full_results=True))
    after_da = {loc: set(getattr(read(), loc).keys()) for loc in locations}
    if before is None:  # the results store beside an .h5ad starts as its obs, var and obsm
        before = {loc: set(getattr(_fresh(ref), loc).keys()) for loc in locations}
    de_out = kd.de(atlas, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100, random_state=0),
                   fdr=kd.FDRSettings(null_genes=100),
                   storage=kd.StorageSettings(store_landmarks=True, store_additional_stats=True),
                   output=kd.OutputSettings(progress=False, return_full_results=True, return_null_data=True))
    return read(), before, after_da, da_out, de_out


def _run_b(ref, route="memory", where=None):
    atlas, read = _atlas(ref, route, where)
    c1, c2 = str(ref["in_condition1"]), str(ref["in_condition2"])
    kd.da(atlas, "condition", c1, c2, sample_col="sample", gp=kd.GPSettings(n_landmarks=100, random_state=0),
          storage=kd.StorageSettings(store_landmarks=True), output=kd.OutputSettings(progress=False))
    kd.de(atlas, "condition", c1, c2, sample_col="sample", gp=kd.GPSettings(n_landmarks=100, random_state=0),
          storage=kd.StorageSettings(store_landmarks=True, store_additional_stats=True),
          output=kd.OutputSettings(progress=False))
    return read()


@pytest.fixture(scope="module", params=ROUTES)
def route(request):
    return request.param


@pytest.fixture(scope="module")
def run_a(ref, route, tmp_path_factory):
    return _run_a(ref, route, tmp_path_factory.mktemp(f"a-{route}"))


@pytest.fixture(scope="module")
def run_b(ref, route, tmp_path_factory):
    return _run_b(ref, route, tmp_path_factory.mktemp(f"b-{route}"))


def _keys(ref, tag, loc, which="added"):
    return [str(k) for k in ref[f"out_{tag}_{loc}_keys_{which}"]]


def _replicate_columns(ref) -> set[str]:
    """The var columns of kompot_dask's replicate-aware gene call, which de() adds beside
    Kompot's fields when it has a sample column (not Kompot's, so left out of the parity)."""
    c1, c2 = (kd.anndata.sanitize(str(ref[f"in_condition{i}"])) for i in (1, 2))
    return {f"kompot_de_{c1}_to_{c2}_replicate_mahalanobis_sample_var",
            f"kompot_de_{c1}_to_{c2}_replicate_pvalue_sample_var",
            f"kompot_de_{c1}_to_{c2}_replicate_fdr_sample_var",
            f"kompot_de_{c1}_to_{c2}_replicate_is_de_sample_var"}


def test_field_names_are_kompots(ref, run_a, run_b):
    adata, before, after_da, _, _ = run_a
    replicate = _replicate_columns(ref)
    for loc in ("obs", "var", "layers", "obsm", "obsp", "varm"):
        assert sorted(after_da[loc] - before[loc]) == sorted(_keys(ref, "A_da", loc)), loc
        assert sorted(set(getattr(adata, loc).keys()) - after_da[loc]) == sorted(_keys(ref, "A_de", loc)), loc
        assert sorted(getattr(adata, loc).keys()) == sorted(_keys(ref, "A_de", loc, "all")), loc
        with_samples = set(getattr(run_b, loc).keys())
        if loc == "var":  # written with sample_col only, in addition to Kompot's
            assert replicate <= with_samples and not replicate & set(adata.var.keys())
            with_samples -= replicate
        assert sorted(with_samples) == sorted(_keys(ref, "B_de_sample", loc, "all")), loc
    uns = {f"{k}/{k2}" if isinstance(v, dict) else k for k, v in adata.uns.items()
           for k2 in (v.keys() if isinstance(v, dict) else [None])}
    uns = {u for u in uns if not u.endswith("/landmarks_info")} | {
        f"{k}/landmarks_info/{f}" for k in ("kompot_da", "kompot_de") for f in adata.uns[k]["landmarks_info"]}
    assert sorted(uns) == sorted(_keys(ref, "A_de", "uns", "all"))


def test_da_values(ref, run_a, run_b):
    adata = run_a[0]
    for adata_, tag in ((adata, "A_da"), (run_b, "B_da_sample")):
        for key in _keys(ref, tag, "obs"):
            want, got = ref[f"out_{tag}_obs__{key}"], adata_.obs[key].to_numpy()
            if key.endswith(("_direction", "_direction_sample_var")):
                assert list(adata_.obs[key].cat.categories) == ["up", "neutral", "down"]
                lfc = adata_.obs[key.split("_lfc_direction")[0] + "_lfc"].to_numpy()
                clear = np.abs(np.abs(lfc) - 1.0) > 2e-3  # calls within the LFC tolerance of the threshold may differ
                np.testing.assert_array_equal(got.astype(str)[clear], want[clear], err_msg=key)
            elif "zscore" in key:
                assert_close(got, want, atol=2e-2, what=key)
            elif "ptp" in key:
                assert_close(got, want, atol=2e-2, rtol=1e-2, what=key)
            else:
                assert_close(got, want, atol=2e-3, what=key)
        colors = [k for k in _keys(ref, tag, "uns") if k.endswith("_colors")][0]
        assert list(adata_.uns[colors]) == list(ref[f"out_{tag}_uns__{colors}"])


def test_de_values(ref, run_a, run_b):
    rows = ref["param_layer_rows"]
    for adata_, tag in ((run_a[0], "A_de"), (run_b, "B_de_sample")):
        for key in _keys(ref, tag, "var"):
            want, got = ref[f"out_{tag}_var__{key}"], adata_.var[key].to_numpy()
            if want.dtype == bool:
                np.testing.assert_array_equal(got, want, err_msg=key)
            else:
                # ls from the cells' own NN distances: 1e-5 relative (reference README §3)
                assert_close(got, want, atol=1e-6, rtol=1e-5, what=key)
        for key in _keys(ref, tag, "layers"):
            layer = adata_.layers[key]
            assert layer.shape == (1500, 60) and not np.isnan(layer).any()
            assert_close(np.asarray(layer)[rows], ref[f"out_{tag}_layer_rows__{key}"], atol=1e-6, rtol=1e-5, what=key)
        for key in _keys(ref, tag, "obs"):
            assert_close(adata_.obs[key].to_numpy(), ref[f"out_{tag}_obs__{key}"], atol=1e-6, rtol=1e-5, what=key)


def _strip(value):
    if isinstance(value, dict):
        return {k: "<redacted>" if k in REDACTED else _strip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


@pytest.mark.parametrize("tag, key", [("A_da", "kompot_da"), ("A_de", "kompot_de")])
def test_run_history_is_kompots(ref, run_a, tag, key):
    adata = run_a[0]
    got = _strip(json.loads(adata.uns[key]["last_run_info"]))
    want = _strip(json.loads(str(ref[f"out_{tag}_uns__{key}__last_run_info"])))
    for part in ("field_names", "field_mapping", "params", "fdr_keys", "smoothed_layer_keys", "density_keys"):
        assert got.get(part) == want.get(part), part
    if tag == "A_de":
        assert got["fdr_results"]["n_significant"] == want["fdr_results"]["n_significant"]
    missing = set(want) - set(got) - {"kompot_version", "kompot_git_sha", "kompot_editable"}
    assert missing == set()
    versions = json.loads(adata.uns[key]["last_run_info"])["environment"]["package_versions"]
    assert versions["kompot_dask"] == kd.__version__ and versions["dask"] and versions["jax"]
    fields = json.loads(adata.uns[key]["anndata_fields"])
    assert fields == json.loads(str(ref[f"out_{tag}_uns__{key}__anndata_fields"]))
    assert len(json.loads(adata.uns[key]["run_history"])) == 1


def test_returned_results(ref, run_a):
    _, _, _, da_out, de_out = run_a
    assert sorted(da_out) == sorted(ref["out_A_da_return_keys"])
    assert list(da_out["table"].columns) == list(ref["out_A_da_return_table_columns"])
    assert list(da_out["table"].index[:5]) == list(ref["out_A_da_return_table_index_first5"])
    assert list(de_out["table"].columns) == list(ref["out_A_de_return_table_columns"])
    assert de_out["fdr_summary"]["n_significant"] == json.loads(str(ref["out_A_de_return_fdr_summary_json"]))[
        "n_significant"]
    np.testing.assert_array_equal(de_out["null"]["gene_indices"], ref["out_A_de_return_null__gene_indices"])
    assert_close(de_out["null"]["mahalanobis"], ref["out_A_de_return_null__mahalanobis"], rtol=1e-5, what="null")


def test_sanitise_and_overwrite(ref):
    assert kd.anndata.sanitize("stim 2.5h/a-b") == "stim_2_5h_a_b"
    adata = _fresh(ref)
    c1, c2 = str(ref["in_condition1"]), str(ref["in_condition2"])
    kd.da(adata, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100), progress=False)
    with pytest.warns(UserWarning, match="would be replaced"):
        kd.da(adata, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100), progress=False)
    with pytest.raises(ValueError, match="overwrite=True"):
        kd.da(adata, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100), overwrite=False)
    assert len(json.loads(adata.uns["kompot_da"]["run_history"])) == 2
    with pytest.raises(TypeError, match="both"):
        kd.da(adata, "condition", c1, c2, storage=kd.StorageSettings(), overwrite=True)


def test_progress_in_process_and_dashboard_on_a_cluster(ref, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    adata = _fresh(ref)
    c1, c2 = str(ref["in_condition1"]), str(ref["in_condition2"])
    kd.da(adata, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100), overwrite=True)
    err = capsys.readouterr().err
    assert "100% Completed" in err  # dask's bar, on stderr
    kd.da(adata, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100), overwrite=True, progress=False)
    assert "Completed" not in capsys.readouterr().err
    report = tmp_path / "report.html"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            distributed.Client(lc) as client:
        kd.de(adata, "condition", c1, c2, gp=kd.GPSettings(n_landmarks=100), null_genes=0, overwrite=True,
              performance_report=str(report))
        link = client.dashboard_link
    err = capsys.readouterr().err
    assert f"dashboard: {link}" in err
    execution = json.loads(adata.uns["kompot_de"]["last_run_info"])["execution"]
    assert execution == {"dashboard": link, "performance_report": str(report)}
    assert report.stat().st_size > 1000
