"""DA + DE (with 3 + 3 samples) on a synthetic atlas generated chunk-wise straight into zarr.

    python benchmarks/scale.py --cells 100000 --genes 1000
    python benchmarks/scale.py --cells N --genes G [--samples 3] [--landmarks 2000] [--dims 10]
                               [--workers 2] [--memory-limit 5GB] [--workdir DIR]
                               [--optimizer {L-BFGS-B,preconditioned}] [--stop-after STAGE]

Runs on a LocalCluster of worker processes: per-sample density and expression fits are
tasks; DA and DE predictions stream to zarr as (cell chunk x gene batch) tasks. Prints wall
time per stage, the peak resident memory of the workers (sampled on the workers) and of
this client process, and ends with one JSON line. ``--stop-after landmarks`` (or any
stage) times the stages up to that one only; its JSON says ``"complete": false``.

The density fits use ``--optimizer preconditioned`` unless told otherwise: it is what the
README recommends for atlases of this size. The library's default is the reference's
L-BFGS-B, whose iteration count grows with the number of cells (``--optimizer L-BFGS-B``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time

import numpy as np
import psutil


def generate_atlas(path: str, n: int, genes: int, dims: int, samples: int, chunk: int, seed: int = 0) -> dict:
    """Cell states, expression (zarr, written chunk by chunk) and labels; condition 1 cells first."""
    import zarr

    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(6, dims))
    axes = rng.normal(size=(6, dims))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    programs = rng.normal(scale=0.4, size=(dims, genes))
    weights = {1: np.array([0.3, 0.2, 0.2, 0.1, 0.1, 0.1]), 2: np.array([0.1, 0.2, 0.2, 0.1, 0.1, 0.3])}
    group = zarr.open_group(path, mode="w", zarr_format=3)
    x_arr = group.create_array("cell_states", shape=(n, dims), chunks=(chunk, dims), dtype="float64")
    y_arr = group.create_array("expression", shape=(n, genes), chunks=(chunk, genes), dtype="float32")
    n1 = n // 2
    condition = np.where(np.arange(n) < n1, 1, 2)
    sample = rng.integers(samples, size=n)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        cond = condition[a:b]
        k = np.array([rng.choice(6, p=weights[c]) for c in cond])
        t = rng.uniform(-1, 1, size=b - a)
        x = centres[k] + 6.0 * t[:, None] * axes[k] + rng.normal(scale=0.4, size=(b - a, dims))
        lift = ((cond == 2) & (k == 0))[:, None] * (np.arange(genes) < genes // 10) * 1.0
        rate = np.exp(0.2 + np.tanh(x / 8.0) @ programs + lift)
        x_arr[a:b] = x
        y_arr[a:b] = np.log1p(rng.poisson(rate)).astype(np.float32)
    return {"n1": n1, "sample": sample}


class WorkerPeak:
    """Samples the resident memory of every worker process (and this client) in the background."""

    def __init__(self, client, interval: float = 0.25):
        self.client, self.interval = client, interval
        self.worker_peak = 0
        self.client_peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                self.worker_peak = max([self.worker_peak, *rss.values()])
            except Exception:  # a worker restarting; sample again next time
                pass
            self.client_peak = max(self.client_peak, psutil.Process().memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--genes", type=int, required=True)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--landmarks", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="5GB")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--optimizer", default="preconditioned", choices=["L-BFGS-B", "preconditioned"],
                        help="density MAP optimiser: the preconditioned one recommended for large atlases "
                             "(default here) or the reference's L-BFGS-B (the library's default)")
    parser.add_argument("--cell-chunk", type=int, default=None,
                        help="cells per prediction task (default: planned from the worker memory limit)")
    parser.add_argument("--stop-after", default=None, choices=STAGES[1:-1],
                        help="stop after this stage (times the stages up to it; complete is false)")
    args = parser.parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("    %(message)s"))
    logging.getLogger("kompot_dask").addHandler(handler)  # k-means steps, fits: progress lines
    logging.getLogger("kompot_dask").setLevel(logging.INFO)

    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster

    from kompot_dask.execution.cluster import PLUGIN_NAME, JaxWorkerSetup, _as_plugin

    workdir = args.workdir or tempfile.mkdtemp(prefix="kompot-scale-")
    os.makedirs(workdir, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB; workdir {workdir}", flush=True)
    stages: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        stages[name] = round(time.perf_counter() - t0, 3)
        print(f"{name:>20}: {stages[name]:9.2f} s", flush=True)
        if name == args.stop_after:
            raise _StopAfter
        return out

    atlas_path = os.path.join(workdir, "atlas.zarr")
    meta = timed("generate", lambda: generate_atlas(atlas_path, args.cells, args.genes, args.dims,
                                                    args.samples, 8192))
    atlas = zarr.open_group(atlas_path, mode="r")
    x = atlas["cell_states"][...]
    y = da.from_zarr(atlas["expression"])
    n1, sample = meta["n1"], meta["sample"]
    x1, x2, y1, y2 = x[:n1], x[n1:], y[:n1], y[n1:]
    s1, s2 = sample[:n1], sample[n1:]

    da_model = da_ds = de_ds = None
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      memory_limit=args.memory_limit, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(_as_plugin(JaxWorkerSetup(1)), name=PLUGIN_NAME)
        sampler = WorkerPeak(client)
        try:
            da_model, da_ds, de_ds = _run_stages(args, timed, client, workdir, x, x1, x2, y1, y2, s1, s2)
        except _StopAfter:
            pass
        sampler.stop()
    de_block = None if de_ds is None else dict(zip(("cell_chunk", "gene_batch"), de_ds["fold_change"].encoding["chunks"]))
    complete = bool(de_ds is not None and da_ds.attrs["kompot_dask"]["complete"]
                    and de_ds.attrs["kompot_dask"]["complete"])
    iterations = None if da_model is None else {
        "condition1": int(da_model.density_estimator1.optimizer_result.nit),
        "condition2": int(da_model.density_estimator2.optimizer_result.nit),
    }
    result = {
        "cells": args.cells,
        "genes": args.genes,
        "landmarks": args.landmarks,
        "samples": args.samples,
        "dims": args.dims,
        "workers": args.workers,
        "memory_limit": args.memory_limit,
        "wall_s": round(time.perf_counter() - t_all, 3),
        "peak_worker_memory_bytes": int(sampler.worker_peak),
        "peak_client_memory_bytes": int(sampler.client_peak),
        "stages": stages,
        "stopped_after": args.stop_after,
        "de_block": de_block,
        "optimizer": args.optimizer,
        "density_iterations": iterations,
        "complete": complete,
        "machine": f"{platform.node()} {os.cpu_count()} cores",
    }
    print(f"peak worker RSS {sampler.worker_peak / 2**30:.2f} GiB, client {sampler.client_peak / 2**30:.2f} GiB")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


STAGES = ("generate", "landmarks", "da_fit", "da_predict", "de_fit", "de_predict")


class _StopAfter(Exception):
    """Raised after the ``--stop-after`` stage."""


def _run_stages(args, timed, client, workdir, x, x1, x2, y1, y2, s1, s2):
    """The timed stages after generation; returns the DA model and the two result datasets."""
    import kompot_dask as kd
    from kompot_dask.estimators._landmarks import kmeans_landmarks
    from kompot_dask.parallel import predict_abundance, predict_expression

    landmarks = timed("landmarks", lambda: kmeans_landmarks(x, args.landmarks, random_state=0))
    da_model = timed("da_fit", lambda: kd.DifferentialAbundance().fit(
        x1, x2, landmarks=landmarks, condition1_sample_indices=s1, condition2_sample_indices=s2,
        optimizer=args.optimizer))
    da_ds = timed("da_predict", lambda: predict_abundance(
        da_model, x, os.path.join(workdir, "da.zarr"), client=client, cell_chunk=args.cell_chunk,
        overwrite=True))
    de_model = timed("de_fit", lambda: kd.DifferentialExpression().fit(
        x1, y1, x2, y2, landmarks=landmarks, condition1_sample_indices=s1, condition2_sample_indices=s2))
    de_ds = timed("de_predict", lambda: predict_expression(
        de_model, x, os.path.join(workdir, "de.zarr"), client=client, cell_chunk=args.cell_chunk,
        dtype="float32", overwrite=True))
    return da_model, da_ds, de_ds


if __name__ == "__main__":
    main()
