"""Kompot 0.8.0 and kompot_dask side by side: da() and de() at Kompot's defaults, same AnnData.

    python benchmarks/vs_kompot.py --kompot-python /tmp/kompot-venv/bin/python --cells 5000 --genes 2000
    python benchmarks/vs_kompot.py --kompot-python PY [--cells N] [--genes G] [--samples 3] [--dims 10]
                                   [--sample-col] [--steps da,de] [--repeats 1] [--same-landmarks]
                                   [--timeout 3600] [--workdir DIR] [--json out.json]

``--kompot-python`` is a Python that has ``kompot==0.8.0`` (and nothing of ours); see
``benchmarks/README.md``. This script installs nothing. It writes one synthetic atlas
(:func:`kompot_dask.testing.simulate_atlas`, D = 10, sparse float32 ``X``) to an ``.h5ad``
file, then runs every step once per engine per repeat, each run in a fresh process of its
own, the engines alternating (Kompot first on even repeats, ours first on odd ones), one
process at a time. A run calls ``kompot.da``/``kompot.de`` or ``kompot_dask.da``/``de`` on
the AnnData with only ``groupby``, the two conditions and (with ``--sample-col``)
``sample_col``: Kompot's defaults otherwise (DE: 5,000 shared landmarks, ``batch_size=100``,
2,000 null genes without a sample column).

Printed per step: the wall time of the call in each engine (imports and file reading not
included: ``da``/``de`` is looked up before the clock starts, since kompot_dask imports those
modules on first use where ``import kompot`` imports them at once; the process's total is in
the JSON) and its CPU time (all threads), the ratio, each process's peak resident
memory, and for every field the call added to ``obs``, ``var`` and ``layers``: the max and
median absolute difference, Spearman's rank correlation, and whether the difference is within
the documented parity tolerance of that kind of field (those tolerances assume identical
landmarks: with more cells than landmarks pass ``--same-landmarks``, which stores Kompot's
k-means landmarks and hands them to ours in DE). A run that dies is reported with its exit status
(``-9``: killed, typically out of memory). The last line is JSON.

Timings share the machine with whatever else runs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ENGINES = ("kompot", "kompot_dask")
GROUPBY, CONDITION1, CONDITION2 = "condition", "control", "treated"

# (name fragment, atol, rtol) in order of precedence: the parity tolerances of the reference
# README (§3) for each kind of output field; "exact" fields are compared for equality.
TOLERANCES = (
    ("lfc_direction", "exact", None),
    ("is_de", "exact", None),
    ("mahalanobis_pvalue", 0.0, 0.0),
    ("local_fdr", 1e-10, 1e-9),
    ("tail_fdr", 1e-10, 1e-9),
    ("mahalanobis", 0.0, 1e-6),
    ("neg_log10_ptp", 1e-6, 1e-6),
    ("neg_log10_lfc_ptp", 2e-2, 1e-2),
    ("lfc_zscore", 2e-2, 0.0),
    ("log_density", 2e-3, 0.0),
    ("_lfc", 2e-3, 0.0),
    ("smoothed", 1e-10, 1e-5),
    ("imputed", 1e-10, 1e-5),
    ("fold_change", 1e-10, 1e-5),
    ("_std", 1e-10, 1e-5),
    ("mean_lfc", 1e-10, 1e-5),
)


# ------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    """Run one step in this process and write its fields and timings (``--worker`` mode)."""
    import resource

    t_start = time.perf_counter()
    import anndata

    if args.engine == "kompot":
        import kompot as engine
    else:
        import kompot_dask as engine
    adata = anndata.read_h5ad(args.h5ad)
    before = {"obs": set(adata.obs.columns), "var": set(adata.var.columns), "layers": set(adata.layers.keys())}
    kwargs = {"sample_col": "sample"} if args.sample_col else {}
    kwargs.update(_landmark_kwargs(args, engine))
    # The function is looked up before the clock starts: `import kompot` imports its da()/de()
    # modules at once, kompot_dask imports them on first use (both imports stay outside the call).
    step = getattr(engine, args.step)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    c0, t0 = time.process_time(), time.perf_counter()
    step(adata, GROUPBY, CONDITION1, CONDITION2, **kwargs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fields = _new_fields(adata, before)
    if args.engine == "kompot" and args.store_landmarks:
        stored = adata.uns.get(f"kompot_{args.step}", {}).get("landmarks")
        if stored is not None:
            fields["uns/landmarks"] = np.asarray(stored, dtype=np.float64)
    np.savez(args.out, **{k.replace("/", "|"): v for k, v in fields.items()})
    result = {"seconds": seconds, "cpu_seconds": cpu, "process_seconds": time.perf_counter() - t_start,
              "peak_rss": peak, "rss_before_call": rss_before}
    print("RESULT " + json.dumps(result), flush=True)


def _landmark_kwargs(args: argparse.Namespace, engine) -> dict:
    if args.engine == "kompot" and args.store_landmarks:
        return {"storage": engine.StorageSettings(store_landmarks=True)}
    if args.landmarks:
        return {"gp": engine.GPSettings(landmarks=np.load(args.landmarks))}
    return {}


def _new_fields(adata, before: dict) -> dict:
    """Every column/layer the call added, as plain numpy arrays keyed ``where/name``."""
    out = {}
    for name in set(adata.obs.columns) - before["obs"]:
        out[f"obs/{name}"] = _plain(adata.obs[name])
    for name in set(adata.var.columns) - before["var"]:
        out[f"var/{name}"] = _plain(adata.var[name])
    for name in set(adata.layers.keys()) - before["layers"]:
        layer = adata.layers[name]
        out[f"layers/{name}"] = np.asarray(layer.toarray() if hasattr(layer, "toarray") else layer)
    return out


def _plain(column) -> np.ndarray:
    values = np.asarray(column)
    if values.dtype.kind in "fiub":
        return values
    return values.astype(str)


# ------------------------------------------------------------------------------ driver
def write_atlas(path: str, cells: int, genes: int, samples: int, dims: int, seed: int) -> None:
    from kompot_dask.testing import atlas_anndata, simulate_atlas

    atlas = simulate_atlas(n_cells=cells, n_genes=genes, n_samples=samples, dims=dims, seed=seed)
    atlas_anndata(atlas, sparse=True).write_h5ad(path)


def run_one(python: str, engine: str, step: str, h5ad: str, out: str, args, extra: list[str]) -> dict:
    """One step of one engine in a fresh process; its RESULT line, or the failure."""
    cmd = [python, os.path.abspath(__file__), "--worker", "--engine", engine, "--step", step, "--h5ad", h5ad,
           "--out", out] + (["--sample-col"] if args.sample_col else []) + extra
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {args.timeout} s", "wall": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit status {proc.returncode}"
        return {"failed": f"{reason}: {' | '.join(tail)}", "wall": time.perf_counter() - t0}
    return json.loads(lines[-1][len("RESULT "):])


def tolerance(name: str):
    for fragment, atol, rtol in TOLERANCES:
        if fragment in name:
            return atol, rtol
    return None, None


def compare(a: dict, b: dict) -> list[dict]:
    """Per shared field: max/median |a − b|, Spearman ρ, within tolerance (b = Kompot, the reference)."""
    from scipy.stats import spearmanr

    rows = []
    for key in sorted(set(a) & set(b) - {"uns|landmarks"}):
        x, y = np.asarray(a[key]), np.asarray(b[key])
        name = key.split("|", 1)[1]
        atol, rtol = tolerance(name)
        row = {"field": key.replace("|", "/"), "shape": list(x.shape)}
        if x.shape != y.shape:
            row["note"] = f"shapes differ: {x.shape} vs {y.shape}"
        elif x.dtype.kind in "USOb" or y.dtype.kind in "USOb":
            row["equal_fraction"] = float(np.mean(x.astype(str) == y.astype(str)))
            row["within_tol"] = row["equal_fraction"] == 1.0
        else:
            x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            both = np.isfinite(x) & np.isfinite(y)
            diff = np.abs(x[both] - y[both])
            row.update(max_abs=float(diff.max()) if diff.size else 0.0,
                       median_abs=float(np.median(diff)) if diff.size else 0.0,
                       nan_mismatch=int(np.sum(np.isfinite(x) != np.isfinite(y))))
            if both.sum() > 2 and np.ptp(x[both]) > 0 and np.ptp(y[both]) > 0:
                row["spearman"] = float(spearmanr(x[both], y[both]).statistic)
            if atol is not None and atol != "exact":
                row["within_tol"] = bool(np.all(diff <= atol + rtol * np.abs(y[both]))) and row["nan_mismatch"] == 0
        rows.append(row)
    for key in sorted(set(a) ^ set(b) - {"uns|landmarks"}):
        rows.append({"field": key.replace("|", "/"), "note": "only in " + ("kompot_dask" if key in a else "kompot")})
    return rows


def print_step(step: str, runs: dict, rows: list[dict]) -> None:
    print(f"\n== {step} ==")
    for engine in ENGINES:
        for i, r in enumerate(runs[engine]):
            if "failed" in r:
                print(f"  {engine:<12s} run {i}: FAILED {r['failed']}")
            else:
                cpu = f", cpu {r['cpu_seconds']:.1f} s" if "cpu_seconds" in r else ""
                print(f"  {engine:<12s} run {i}: {r['seconds']:8.1f} s in the call{cpu} "
                      f"({r['process_seconds']:.1f} s process), peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
    k = [r["seconds"] for r in runs["kompot"] if "seconds" in r]
    o = [r["seconds"] for r in runs["kompot_dask"] if "seconds" in r]
    if k and o:
        print(f"  ratio (best Kompot / best kompot_dask): {min(k) / min(o):.2f}x")
    print(f"  {'field':<62s} {'max|Δ|':>9s} {'median|Δ|':>9s} {'spearman':>8s}  tol")
    for row in rows:
        if "note" in row:
            print(f"  {row['field']:<62s} {row['note']}")
        elif "equal_fraction" in row:
            print(f"  {row['field']:<62s} {'equal: ' + format(row['equal_fraction'], '.4f'):>28s}  "
                  f"{'ok' if row['within_tol'] else 'DIFF'}")
        else:
            tol = {True: "ok", False: "DIFF"}.get(row.get("within_tol"), "-")
            print(f"  {row['field']:<62s} {row['max_abs']:9.2e} {row['median_abs']:9.2e} "
                  f"{row.get('spearman', float('nan')):8.5f}  {tol}")


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kompot-python", help="a Python with kompot==0.8.0 (see benchmarks/README.md)")
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--dims", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-col", action="store_true", help="pass sample_col='sample' (sample variance)")
    ap.add_argument("--steps", default="da,de")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--same-landmarks", action="store_true",
                    help="DE: store Kompot's k-means landmarks and pass them to kompot_dask")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--workdir", help="keep the atlas and the outputs here (default: a temporary folder, "
                                          "removed at the end)")
    ap.add_argument("--json", help="write the results here too")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--step", choices=("da", "de"), help=argparse.SUPPRESS)
    ap.add_argument("--h5ad", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--store-landmarks", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--landmarks", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if not args.kompot_python:
        ap.error("--kompot-python is required (a Python with kompot==0.8.0; see benchmarks/README.md)")
    steps = [s for s in args.steps.split(",") if s]
    workdir = args.workdir or tempfile.mkdtemp(prefix="vs_kompot_")
    try:
        os.makedirs(workdir, exist_ok=True)
        h5ad = os.path.join(workdir, "atlas.h5ad")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}; workdir {workdir}")
        write_atlas(h5ad, args.cells, args.genes, args.samples, args.dims, args.seed)
        print(f"atlas: {args.cells} cells x {args.genes} genes, D={args.dims}, {args.samples}+{args.samples} samples, "
              f"sample column {'on' if args.sample_col else 'off'}")
        pythons = {"kompot": args.kompot_python, "kompot_dask": sys.executable}
        report = {"cells": args.cells, "genes": args.genes, "sample_col": args.sample_col, "steps": {},
                  "load_average_start": os.getloadavg()}
        for step in steps:
            runs = {e: [] for e in ENGINES}
            outputs: dict[str, dict] = {}
            for rep in range(args.repeats):
                order = ENGINES if rep % 2 == 0 else ENGINES[::-1]
                same = args.same_landmarks and step == "de"
                if same:
                    order = ENGINES  # ours needs Kompot's landmarks of the same repeat
                for engine in order:
                    out = os.path.join(workdir, f"{step}_{engine}_{rep}.npz")
                    extra = []
                    if same and engine == "kompot":
                        extra = ["--store-landmarks"]
                    elif same and "uns|landmarks" in outputs.get("kompot", {}):
                        lm = os.path.join(workdir, f"{step}_landmarks.npy")
                        np.save(lm, outputs["kompot"]["uns|landmarks"])
                        extra = ["--landmarks", lm]
                    result = run_one(pythons[engine], engine, step, h5ad, out, args, extra)
                    runs[engine].append(result)
                    if "failed" not in result:
                        with np.load(out, allow_pickle=False) as z:
                            outputs[engine] = {k: z[k] for k in z.files}
                    print(f"  {step} {engine} run {rep}: "
                          + (f"{result['seconds']:.1f} s" if "seconds" in result else result["failed"]), flush=True)
            rows = compare(outputs["kompot_dask"], outputs["kompot"]) if len(outputs) == 2 else []
            print_step(step, runs, rows)
            report["steps"][step] = {"runs": runs, "agreement": rows}
    finally:
        if args.workdir is None:  # a temporary folder: the atlas and both engines' outputs (GBs at 50k)
            shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_end"] = os.getloadavg()
    line = json.dumps(report)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    print(line)
    return report


if __name__ == "__main__":
    main()
