"""What the replicate-aware gene call adds to ``de()``: wall time and peak memory, side by side.

Each run is ``kompot_dask.de(adata, ..., sample_col="sample")`` on the same generated
atlas (``kompot_dask.testing.simulate_atlas``, 3 + 3 samples, signal variant), once with
``replicate_null=False`` and once with ``replicate_null=True``, each in a fresh process
(peak memory is that process's ``ru_maxrss``), alternating which goes first over
``--repeats``. The replicate call runs in the calling process today (no cluster), so the
comparison is in memory. Prints the machine, each run, the ratios, and one JSON line.

    python benchmarks/replicate_cost.py --cells 5000 --genes 2000 --landmarks 400
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    """One ``de()`` call in this process (``--worker`` mode); prints a RESULT line."""
    import anndata

    import kompot_dask as kd

    adata = anndata.read_h5ad(args.h5ad)
    c1, c2 = list(adata.obs["condition"].cat.categories)
    t0 = time.perf_counter()
    kd.de(adata, "condition", c1, c2, sample_col="sample", n_landmarks=args.landmarks, random_state=0,
          replicate_null=args.replicate, progress=False)
    seconds = time.perf_counter() - t0
    called = adata.var.filter(like="replicate_is_de").sum().sum() if args.replicate else None
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  * 1024, "called": None if called is None else int(called)}), flush=True)


def run_one(h5ad: str, args: argparse.Namespace, replicate: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--h5ad", h5ad, "--landmarks", str(args.landmarks)]
    cmd += ["--replicate"] if replicate else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--landmarks", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--replicate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--h5ad", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    import psutil

    from kompot_dask.testing import atlas_anndata, simulate_atlas

    machine = {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "load_average": [round(v, 2) for v in os.getloadavg()]}
    print(f"machine: {machine}")
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = os.path.join(tmp, "atlas.h5ad")
        atlas = simulate_atlas(args.cells, args.genes, n_samples=3, seed=args.seed)
        atlas_anndata(atlas, sparse=False).write_h5ad(h5ad)
        print(f"atlas: {args.cells} cells x {args.genes} genes, 3 + 3 samples, {args.landmarks} landmarks")
        runs: dict[str, list] = {"off": [], "on": []}
        for r in range(args.repeats):
            for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                result = run_one(h5ad, args, name == "on")
                runs[name].append(result)
                print(f"  replicate_null {name:3s} run {r}: {result}")
    ok = {k: [x for x in v if "seconds" in x] for k, v in runs.items()}
    summary = {}
    if ok["off"] and ok["on"]:
        best = {k: min(x["seconds"] for x in v) for k, v in ok.items()}
        peak = {k: max(x["peak_rss"] for x in v) for k, v in ok.items()}
        summary = {"time_ratio_on_off": best["on"] / best["off"], "peak_ratio_on_off": peak["on"] / peak["off"],
                   "best_seconds": best, "peak_gib": {k: v / 2**30 for k, v in peak.items()}}
        print(f"de() with the replicate call / without: time {summary['time_ratio_on_off']:.2f}x "
              f"({best['on']:.1f} s / {best['off']:.1f} s), peak memory {summary['peak_ratio_on_off']:.2f}x "
              f"({peak['on'] / 2**30:.2f} / {peak['off'] / 2**30:.2f} GiB)")
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = {"machine": machine, "cells": args.cells, "genes": args.genes, "landmarks": args.landmarks, "runs": runs,
           **summary}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
