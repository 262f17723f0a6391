"""What the replicate-aware gene call adds to ``de()`` on a cluster: time and peak worker memory.

    python benchmarks/replicate_cost.py --cells 100000 --genes 1000 --landmarks 1000

1. Writes a generated atlas (``kompot_dask.testing.write_atlas_zarr``: 3 + 3 samples,
   signal variant, dense float32 ``X`` chunked by 5,000 cells) as an AnnData-zarr.
2. Runs ``kompot_dask.de(path, ..., sample_col="sample")`` on that path twice, each in a
   fresh process with its own LocalCluster (``--workers`` worker processes, one thread
   each, ``--memory-limit`` each), results into a separate store: once with
   ``replicate_null=False`` and once with the default (on with a sample column),
   alternating which goes first over ``--repeats``.
3. Times, in each run, the DE fit and the DE predict (``DifferentialExpression.predict``,
   which includes the replicate call when it is on: ``compute_replicate_fdr``, timed on
   its own), by wrapping those two methods in the benchmark process; samples every
   worker's resident memory (psutil, each ``--sample-seconds``) and keeps the peak per
   stage (fit / predict / replicate / writing).
4. Prints the machine (cores, memory, load average before and after), each run, the
   ratios, and one JSON line at the end.

The acceptance target of issue #15: the replicate call adds at most 2x the DE predict
time (``replicate_seconds / predict_seconds`` of the run without it) and no more peak
worker memory (the workers' peak during the replicate call against the whole run without
it; the whole runs' peaks are printed beside, they differ by sampling noise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, threading, time, warnings
warnings.simplefilter("ignore")
import psutil
from distributed import Client, LocalCluster
import kompot_dask as kd
from kompot_dask import DifferentialExpression

path, results, workers, memory_limit, landmarks, replicate, every = sys.argv[1:8]
stage, peaks, seconds = ["fit"], {}, {}


def timed(name, inner, after):
    def wrapper(self, *args, **kwargs):
        before, stage[0] = stage[0], name
        t = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            seconds[name] = time.perf_counter() - t
            stage[0] = after if after else before
    return wrapper


DifferentialExpression.predict = timed("predict", DifferentialExpression.predict, "writing")
DifferentialExpression.compute_replicate_fdr = timed("replicate", DifferentialExpression.compute_replicate_fdr, None)


def sample(client, stop):
    while not stop.is_set():
        now = stage[0]
        try:
            for rss in client.run(lambda: psutil.Process().memory_info().rss).values():
                peaks[now] = max(peaks.get(now, 0), rss)
        except Exception:
            pass
        stop.wait(float(every))


with LocalCluster(n_workers=int(workers), threads_per_worker=1, memory_limit=memory_limit, processes=True,
                  dashboard_address=None) as cluster, Client(cluster) as client:
    stop = threading.Event()
    thread = threading.Thread(target=sample, args=(client, stop), daemon=True)
    thread.start()
    t = time.perf_counter()
    kd.de(path, groupby="condition", condition1="control", condition2="treated", sample_col="sample",
          n_landmarks=int(landmarks), random_state=0, progress=False, results_store=results,
          replicate_null=None if replicate == "on" else False)
    de_seconds = time.perf_counter() - t
    stop.set()
    thread.join()
client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import zarr
from anndata.io import read_elem
var = read_elem(zarr.open_group(results, mode="r")["var"])  # var only: the layers stay on disk
called = [c for c in var.columns if c.endswith("_replicate_is_de_sample_var")]
out = {"de_seconds": de_seconds, "seconds": seconds, "worker_peak_bytes_by_stage": peaks,
       "worker_peak_bytes": max(peaks.values(), default=0), "client_peak_bytes": client_peak,
       "genes_called": int(var[called[0]].sum()) if called else None}
print("RESULT " + json.dumps(out))
"""


def _machine() -> dict:
    import psutil

    return {"machine": platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version()}


def run_one(path: str, workdir: str, args: argparse.Namespace, name: str, r: int) -> dict:
    results = os.path.join(workdir, f"results-{name}-{r}.zarr")
    cmd = [sys.executable, "-c", CHILD, path, results, str(args.workers), args.memory_limit, str(args.landmarks),
           name, str(args.sample_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    shutil.rmtree(results, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def _gib(v: float) -> str:
    return f"{v / 2**30:.2f} GiB"


def summarise(runs: dict) -> dict:
    """Best times and worst peaks over the repeats, and the ratios of the acceptance target."""
    ok = {k: [x for x in v if "seconds" in x] for k, v in runs.items()}
    if not (ok["off"] and ok["on"]):
        return {}
    best = {k: {s: min(x["seconds"][s] for x in v) for s in v[0]["seconds"]} for k, v in ok.items()}
    de = {k: min(x["de_seconds"] for x in v) for k, v in ok.items()}
    peak = {k: max(x["worker_peak_bytes"] for x in v) for k, v in ok.items()}
    during = max(x["worker_peak_bytes_by_stage"].get("replicate", 0) for x in ok["on"])
    predict_off = best["off"]["predict"]
    replicate = best["on"]["replicate"]
    return {
        "predict_seconds_off": predict_off,
        "predict_seconds_on": best["on"]["predict"],
        "replicate_seconds": replicate,
        "replicate_over_predict": replicate / predict_off,
        "predict_on_over_off": best["on"]["predict"] / predict_off,
        "de_seconds": de,
        "worker_peak_bytes": peak,
        "worker_peak_during_replicate_bytes": during,
        "worker_peak_on_over_off": peak["on"] / peak["off"],
        "replicate_peak_over_off_peak": during / peak["off"],
        "target_met": {"time": replicate <= 2 * predict_off, "memory": during <= peak["off"]},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--landmarks", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="7GB")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sample-seconds", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    from kompot_dask.testing import write_atlas_zarr

    machine = _machine()
    print(f"machine: {machine}", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="kompot-replicate-cost-")
    path = os.path.join(workdir, "atlas.zarr")
    try:
        t = time.perf_counter()
        write_atlas_zarr(path, n_cells=args.cells, n_genes=args.genes, n_samples=3, seed=args.seed,
                         chunk_cells=5000, overwrite=True)
        print(f"atlas: {args.cells} cells x {args.genes} genes, 3 + 3 samples, written in "
              f"{time.perf_counter() - t:.1f} s; de(path, sample_col) with {args.landmarks} landmarks on "
              f"{args.workers} workers x {args.memory_limit}", flush=True)
        runs: dict[str, list] = {"off": [], "on": []}
        for r in range(args.repeats):
            for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                result = run_one(path, workdir, args, name, r)
                runs[name].append(result)
                print(f"  replicate call {name:3s} (run {r}): {json.dumps(result)}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(runs)
    if summary:
        s = summary
        print(f"DE predict without the replicate call: {s['predict_seconds_off']:.1f} s; with it: "
              f"{s['predict_seconds_on']:.1f} s, of which the replicate call {s['replicate_seconds']:.1f} s "
              f"({s['replicate_over_predict']:.2f}x the predict without it; predict with / without "
              f"{s['predict_on_over_off']:.2f}x); whole de(): {s['de_seconds']['on']:.1f} s / "
              f"{s['de_seconds']['off']:.1f} s")
        print(f"peak worker RSS: with {_gib(s['worker_peak_bytes']['on'])}, without "
              f"{_gib(s['worker_peak_bytes']['off'])} ({s['worker_peak_on_over_off']:.2f}x); during the replicate "
              f"call {_gib(s['worker_peak_during_replicate_bytes'])}")
        print(f"target (the replicate call <= 2x the predict time, its peak worker RSS <= the peak without it): time "
              f"{'met' if s['target_met']['time'] else 'MISSED'}, memory "
              f"{'met' if s['target_met']['memory'] else 'MISSED'}")
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = {"machine": machine, "cells": args.cells, "genes": args.genes, "landmarks": args.landmarks,
           "workers": args.workers, "memory_limit": args.memory_limit, "runs": runs, **summary}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
