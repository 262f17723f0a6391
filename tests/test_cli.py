"""The ``kompot-dask`` command line, run as users run it: a subprocess of the real entry point.

Small runs (50 landmarks, 20 null genes) on tests/data/anndata_input.h5ad; each analysis
subprocess takes some seconds, so checks share runs where they can.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

INPUT = DATA / "anndata_input.h5ad"
C1, C2 = "control day-0", "stim 2.5h"
COMPARE = ["--groupby", "condition", "--condition1", C1, "--condition2", C2]
FAST_DA = ["--n-landmarks", "50", "--random-state", "0", "--no-progress"]
FAST = [*FAST_DA, "--null-genes", "20"]
DA_LFC = "kompot_da_control_day_0_to_stim_2_5h_lfc"
DE_MAHAL = "kompot_de_control_day_0_to_stim_2_5h_mahalanobis"
MODULE = [sys.executable, "-m", "kompot_dask.cli"]
TIMEOUT = 300

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2:UserWarning")  # anndata, writing test inputs


def _cli(args, cwd, command=MODULE):
    return subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc) -> dict:
    """A successful run: exit 0 and exactly one line of JSON on stdout."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def _history(adata, key) -> dict:
    return json.loads(adata.uns[key]["last_run_info"])


@pytest.fixture(scope="module")
def zarr_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("zarr_input") / "atlas.zarr"
    anndata.read_h5ad(INPUT).write_zarr(path)
    return path


def test_version_and_help(tmp_path):
    from kompot_dask import __version__

    proc = _cli(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"kompot-dask {__version__}"
    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0 and "usage: kompot-dask" in proc.stdout and "plan" in proc.stdout, proc.stderr


def test_da_on_h5ad_with_csv_table(tmp_path):
    summary = _ok(_cli(["da", INPUT, *COMPARE, *FAST_DA, "-o", "out.h5ad", "-t", "cells.csv"], tmp_path))
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert DA_LFC in out.obs and out.obs[DA_LFC].notna().all()
    assert _history(out, "kompot_da")["params"]["gp"]["n_landmarks"] == 50
    table = pd.read_csv(tmp_path / "cells.csv", index_col=0)
    assert list(table.index) == list(out.obs_names)
    assert list(table.columns) == ["lfc", "lfc_zscore", "neg_log10_ptp", "direction"]
    np.testing.assert_allclose(table["lfc"].to_numpy(), out.obs[DA_LFC].to_numpy())
    counts = table["direction"].value_counts()
    assert summary["da"]["up"] == counts.get("up", 0) and summary["da"]["down"] == counts.get("down", 0)
    assert summary["output"] == "out.h5ad" and summary["tables"] == {"da": "cells.csv"}
    assert sorted(os.listdir(tmp_path)) == ["cells.csv", "out.h5ad"]  # no temporary file left


def test_de_on_h5ad_config_precedence_tsv_and_overwrite(tmp_path):
    (tmp_path / "cfg.yaml").write_text(f"groupby: condition\ncondition1: {C1}\ncondition2: '{C2}'\n"
                                       "n_landmarks: 40\nresult_key: from_config\nnull_genes: 20\n")
    (tmp_path / "out.h5ad").write_bytes(b"an older file")  # replaced only because of --overwrite
    summary = _ok(_cli(["de", INPUT, "-c", "cfg.yaml", "--result-key", "from_flag", "--no-progress",
                        "--overwrite", "-o", "out.h5ad", "-t", "genes.tsv"], tmp_path))
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    key = "from_flag_control_day_0_to_stim_2_5h_mahalanobis"
    assert key in out.var and not any(c.startswith("from_config") for c in out.var.columns)
    run = _history(out, "kompot_de")
    assert run["params"]["gp"]["n_landmarks"] == 40 and run["result_key"] == "from_flag"
    table = pd.read_csv(tmp_path / "genes.tsv", sep="\t", index_col=0)
    assert list(table.index) == list(out.var_names)
    assert {"mean_lfc", "mahalanobis", "local_fdr", "is_de"} <= set(table.columns)
    np.testing.assert_allclose(table["mahalanobis"].to_numpy(), out.var[key].to_numpy())
    assert summary["de"] == {"n_genes": 60, "n_de": int(table["is_de"].sum()), "mahalanobis_key": key}
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml", "genes.tsv", "out.h5ad"]


def test_run_on_zarr_with_installed_script(tmp_path, zarr_input):
    script = pathlib.Path(sys.executable).parent / "kompot-dask"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    anndata.read_h5ad(INPUT)[:10].copy().write_zarr(tmp_path / "out.zarr")  # an earlier output, replaced
    summary = _ok(_cli(["run", zarr_input, *COMPARE, *FAST, "--overwrite", "-o", "out.zarr", "-t", "res.csv"],
                       tmp_path, command=[str(script)]))
    out = anndata.read_zarr(tmp_path / "out.zarr")
    assert out.n_obs == 1500 and DA_LFC in out.obs and DE_MAHAL in out.var
    assert f"kompot_de_{C1.replace(' ', '_').replace('-', '_')}_smoothed" in out.layers
    da_table = pd.read_csv(tmp_path / "res_da.csv", index_col=0)
    de_table = pd.read_csv(tmp_path / "res_de.csv", index_col=0)
    assert da_table.shape == (1500, 4) and list(de_table.index) == list(out.var_names)
    assert summary["da"]["cells"] == 1500 and summary["de"]["n_genes"] == 60
    assert sorted(os.listdir(tmp_path)) == ["out.zarr", "res_da.csv", "res_de.csv"]


def test_plan_and_dry_run_print_json_and_write_nothing(tmp_path):
    proc = _cli(["plan", INPUT, *COMPARE, "--n-landmarks", "50", "--n-workers", "2", "--memory-limit", "1GB"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["atlas"] == {**plan["atlas"], "cells": 1500, "genes": 60, "features": 6}
    assert plan["memory"]["where"] == "local cluster" and plan["memory"]["worker_memory_bytes"] == 10**9
    assert set(plan["stages"]) == {"da", "de"} and plan["stages"]["de"]["landmarks"] == 50
    assert all(stage["fits"] and stage["peak_bytes"] > 0 for stage in plan["stages"].values())

    proc = _cli(["run", INPUT, *COMPARE, "--dry-run", "-o", "out.h5ad", "-t", "t.csv"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["memory"]["where"] == "in-process" and plan["stages"]["de"]["landmarks"] == 1500
    assert os.listdir(tmp_path) == []


def test_bad_invocations_fail_in_one_line_and_leave_the_output(tmp_path):
    one = anndata.read_h5ad(INPUT)
    one.obs["sample"] = one.obs["sample"].astype(str)
    one.obs.loc[one.obs["condition"] == C2, "sample"] = "only"  # condition 2 has a single sample
    one.write_h5ad(tmp_path / "one_sample.h5ad")
    (tmp_path / "corrupt.h5ad").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "bad.json").write_text(json.dumps({"groupby": "condition", "n_landmark": 5}))
    existing = tmp_path / "existing.h5ad"
    existing.write_bytes(b"results of an earlier run")
    before = existing.read_bytes()
    replace = ["-o", existing, "--overwrite"]  # replacing is allowed: the failure alone must keep it
    cases = {
        "missing column": (["da", INPUT, "--groupby", "nope", "--condition1", C1, "--condition2", C2, *replace],
                           "obs column 'nope' not found; available: ['condition', 'sample']. Pass one of them as "
                           "--groupby."),
        "unknown condition": (["de", INPUT, "--groupby", "condition", "--condition1", C1, "--condition2", "zzz",
                               *replace], "condition2='zzz' is not a value"),
        "obsm key absent": (["run", INPUT, *COMPARE, "--obsm-key", "X_umap", *replace], "obsm key 'X_umap'"),
        "one sample": (["da", tmp_path / "one_sample.h5ad", *COMPARE, *FAST_DA, "--sample-col", "sample", *replace],
                       "at least 2 samples"),
        "corrupt input": (["da", tmp_path / "corrupt.h5ad", *COMPARE, *replace], "cannot read input"),
        "output exists": (["da", INPUT, *COMPARE, "-o", existing], "already exists; pass --overwrite"),
        "bad config": (["da", INPUT, "-c", tmp_path / "bad.json", *replace], "unknown option(s) n_landmark"),
        "bad flag": (["de", INPUT, *COMPARE, "--null-genes", "many", *replace], "--null-genes"),
    }
    # Started together (each is mostly interpreter start-up), checked one by one.
    running = {name: subprocess.Popen([*MODULE, *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name, (args, _) in cases.items()}
    verbose = _cli(["da", INPUT, "--groupby", "nope", "--condition1", C1, "--condition2", C2, "-v", *replace],
                   tmp_path)
    problems = []
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        lines = stderr.splitlines()
        if proc.returncode != 2 or stdout or len(lines) != 1 or not lines[0].startswith("kompot-dask: error: ") \
                or cases[name][1] not in lines[0]:
            problems.append(f"{name}: exit {proc.returncode}, stdout {stdout!r}, stderr {stderr[-1500:]!r}")
    assert problems == [], "\n".join(problems)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith("kompot-dask: error: obs column 'nope' not found")
    assert existing.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "corrupt.h5ad", "existing.h5ad",
                                                          "one_sample.h5ad"]


def test_outputs_appear_only_when_committed(tmp_path):
    """The write-aside machinery behind every command (in-process: failures while writing are
    hard to provoke from outside): a discarded run leaves the old output, a committed one
    replaces a zarr folder whole, and nothing temporary stays."""
    from kompot_dask._cli import UsageError
    from kompot_dask._cli.files import Outputs

    old = tmp_path / "out.zarr"
    old.mkdir()
    (old / "zarr.json").write_text("{}")
    (tmp_path / "out.h5ad").write_bytes(b"old")
    with pytest.raises(UsageError, match="already exists"):
        Outputs(overwrite=False).reserve(tmp_path / "out.h5ad", "output")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="not a zarr store"):
        Outputs(overwrite=True).reserve(tmp_path / "plain", "output")

    failed = Outputs(overwrite=True)
    temp = failed.reserve(tmp_path / "out.h5ad", "output")
    temp.write_bytes(b"half")
    failed.discard()
    assert (tmp_path / "out.h5ad").read_bytes() == b"old"

    done = Outputs(overwrite=True)
    temp = done.reserve(old, "output")
    temp.mkdir()
    (temp / "zarr.json").write_text('{"new": 1}')
    done.commit()
    done.discard()
    assert (old / "zarr.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad", "out.zarr", "plain"]


def _tree(path) -> dict[str, float]:
    return {os.path.relpath(os.path.join(d, f), path): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(path) for f in files}


def test_zarr_output_is_written_out_of_core_and_matches_the_h5ad_output(tmp_path, zarr_input):
    """-o *.zarr: the atlas is read lazily, the output holds obs/var/obsm/uns and the result
    layers (no X), with the values of the in-memory run that writes an .h5ad."""
    before = _tree(zarr_input)
    _ok(_cli(["de", zarr_input, *COMPARE, *FAST, "-o", "lazy.zarr"], tmp_path))
    _ok(_cli(["de", zarr_input, *COMPARE, *FAST, "-o", "memory.h5ad"], tmp_path))
    assert _tree(zarr_input) == before  # the input is only read
    assert sorted(os.listdir(tmp_path)) == ["lazy.zarr", "memory.h5ad"]  # no staging store left behind
    lazy, memory = anndata.read_zarr(tmp_path / "lazy.zarr"), anndata.read_h5ad(tmp_path / "memory.h5ad")
    assert lazy.X is None and list(lazy.obs_names) == list(memory.obs_names)
    assert sorted(lazy.obsm) == sorted(memory.obsm) and sorted(lazy.layers) == sorted(memory.layers)
    for key in memory.layers:
        # ls from the cells' own NN distances: 1e-5 relative between runs (reference README §3)
        np.testing.assert_allclose(lazy.layers[key], memory.layers[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in [c for c in memory.var if c.startswith("kompot_de")]:
        a, b = lazy.var[key].to_numpy(), memory.var[key].to_numpy()
        if b.dtype == bool:
            np.testing.assert_array_equal(a, b, err_msg=key)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=key)

    proc = _cli(["de", zarr_input, *COMPARE, *FAST, "--overwrite", "-o", zarr_input], tmp_path)
    assert proc.returncode != 0 and "is the input" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert _tree(zarr_input) == before


def test_replicate_null_is_on_with_a_sample_column_and_can_be_switched_off(tmp_path):
    """With --sample-col the relabelling calls are written by default (here asked for by the
    flag over a config that says false); --no-replicate-null leaves them out and says why."""
    (tmp_path / "cfg.json").write_text('{"replicate_null": false}')
    prefix = "kompot_de_control_day_0_to_stim_2_5h_replicate_"
    _ok(_cli(["de", INPUT, *COMPARE, *FAST, "--sample-col", "sample", "-c", "cfg.json", "--replicate-null",
              "-o", "on.h5ad"], tmp_path))
    _ok(_cli(["de", INPUT, *COMPARE, *FAST, "--sample-col", "sample", "--no-replicate-null", "-o", "off.h5ad"],
             tmp_path))
    on, off = anndata.read_h5ad(tmp_path / "on.h5ad"), anndata.read_h5ad(tmp_path / "off.h5ad")
    fields = [f"{prefix}{name}_sample_var" for name in ("mahalanobis", "pvalue", "fdr", "is_de")]
    assert set(fields) <= set(on.var) and not any(c.startswith(prefix) for c in off.var)
    pvalue = on.var[fields[1]].to_numpy()
    assert np.isfinite(pvalue).all() and ((pvalue > 0) & (pvalue <= 1)).all()
    assert _history(on, "kompot_de")["fdr_null"]["replicate_fdr"]["null"] is not None
    assert _history(off, "kompot_de")["fdr_null"]["replicate_fdr"] == {"null": None, "reason": "replicate_null=False"}
    key = "kompot_de_control_day_0_to_stim_2_5h_mahalanobis_sample_var"
    np.testing.assert_allclose(on.var[key].to_numpy(), off.var[key].to_numpy(), rtol=1e-10)


def test_spatial_fdr_flag_writes_the_cell_call(tmp_path):
    _ok(_cli(["da", INPUT, *COMPARE, *FAST_DA, "--sample-col", "sample", "--spatial-fdr", "0.1", "-o", "out.h5ad"],
             tmp_path))
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    base = "kompot_da_control_day_0_to_stim_2_5h_spatial"
    fdr = out.obs[f"{base}_fdr_sample_var"].to_numpy()
    direction = out.obs[f"{base}_direction_sample_var"].astype(str).to_numpy()
    assert np.isfinite(fdr).all() and ((fdr >= 0) & (fdr <= 1)).all()
    np.testing.assert_array_equal(direction != "neutral", fdr <= 0.1)
    assert _history(out, "kompot_da")["spatial_fdr"]["alpha"] == 0.1
    proc = _cli(["da", INPUT, *COMPARE, *FAST_DA, "--spatial-fdr", "2", "-o", "bad.h5ad"], tmp_path)
    assert proc.returncode == 2 and "spatial" in proc.stderr and not (tmp_path / "bad.h5ad").exists()
