"""Time and peak memory of the two GP estimators in landmark mode.

    python benchmarks/estimators.py --cells 20000
    python benchmarks/estimators.py --cells 100000 [--genes 2000] [--landmarks 2000]
                                    [--optimizer {L-BFGS-B,preconditioned}]

Cell states (D = 10) are generated in memory; expression (cells x genes) is generated
chunk by chunk into a zarr store and read back chunk by chunk by the function fit, and
predictions are written chunk by chunk to zarr, as the engine does. Peak memory is the
process's resident set size sampled every 5 ms, reported per stage as the rise above the
resident size at the start of the stage. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np
import psutil


class PeakRSS:
    """Background sampler of this process's resident set size."""

    def __init__(self, interval: float = 0.005):
        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def reset(self) -> int:
        self.peak = self._proc.memory_info().rss
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def stage(name: str, results: dict, sampler: PeakRSS):
    start_rss = sampler.reset()
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    sampler.peak = max(sampler.peak, psutil.Process().memory_info().rss)
    rise = sampler.peak - start_rss
    results[name] = {"seconds": round(seconds, 3), "peak_memory_bytes": int(rise)}
    print(f"{name:>18}: {seconds:8.2f} s   peak rise {rise / 2**20:9.1f} MiB", flush=True)


def synthetic_cells(n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """Cells on a few curved, elongated clusters (like diffusion components)."""
    k = 6
    centres = rng.normal(scale=10.0, size=(k, dims))
    direction = rng.normal(size=(k, dims))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    label = rng.integers(k, size=n)
    t = rng.uniform(-1, 1, size=n)
    return centres[label] + 12.0 * t[:, None] * direction[label] + rng.normal(scale=0.6, size=(n, dims))


def write_expression(path: str, x: np.ndarray, genes: int, chunk: int, seed: int):
    """Expression ``log1p(Poisson(exp(programs(x))))`` generated chunk by chunk into zarr."""
    import zarr

    rng = np.random.default_rng(seed)
    proj = rng.normal(scale=0.15, size=(x.shape[1], genes))
    base = rng.normal(0.3, 0.5, size=genes)
    arr = zarr.create_array(path, shape=(len(x), genes), chunks=(chunk, genes), dtype="f8")
    for a in range(0, len(x), chunk):
        b = min(a + chunk, len(x))
        rate = np.exp(base + np.sin(x[a:b] @ proj))
        arr[a:b] = np.log1p(np.random.default_rng(seed + a).poisson(rate))
    return arr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--landmarks", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the zarr stores go (default: a temp dir)")
    parser.add_argument(
        "--optimizer",
        default="L-BFGS-B",
        choices=["L-BFGS-B", "preconditioned"],
        help="density MAP optimiser: the reference's L-BFGS-B (default) or the opt-in preconditioned one",
    )
    args = parser.parse_args()

    import jax
    import zarr

    import kompot_dask as kd
    from kompot_dask.estimators._landmarks import kmeans_landmarks
    from kompot_dask.execution.plan import cell_chunk_rows

    print(
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs | {psutil.virtual_memory().total / 2**30:.1f} GiB | "
        f"numpy {np.__version__} | jax {jax.__version__} | kompot_dask {kd.__version__}"
    )
    workdir = args.workdir or tempfile.mkdtemp(prefix="kompot-bench-")
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    x = synthetic_cells(args.cells, args.dims, rng)
    chunk = cell_chunk_rows(args.landmarks)
    y = write_expression(os.path.join(workdir, "y.zarr"), x, args.genes, chunk, args.seed)
    print(f"cells {args.cells}, genes {args.genes}, landmarks {args.landmarks}, D {args.dims}, chunk {chunk} cells")

    sampler = PeakRSS()
    stages: dict = {}
    with stage("landmarks", stages, sampler):
        u = kmeans_landmarks(x, args.landmarks, random_state=args.seed)
    with stage("density_fit", stages, sampler):
        dens = kd.DensityEstimator(
            landmarks=u,
            gp_type="fixed",
            d_method="fractal",
            ls_factor=10.0,
            predictor_with_uncertainty=True,
            optimizer=args.optimizer,
        ).fit(x)
    with stage("density_predict", stages, sampler):
        log_density = dens.predict(x, normalize=True)
        variance = dens.predict.uncertainty(x)
    with stage("function_fit", stages, sampler):
        func = kd.FunctionEstimator(landmarks=u, gp_type="fixed", sigma=1.0, ls_factor=10.0).fit(x, y)
    with stage("function_predict", stages, sampler):
        out = zarr.create_array(
            os.path.join(workdir, "imputed.zarr"), shape=y.shape, chunks=(chunk, args.genes), dtype="f8"
        )
        cov = np.empty(args.cells)
        for a in range(0, args.cells, chunk):
            b = min(a + chunk, args.cells)
            out[a:b] = func.predict(x[a:b])
            cov[a:b] = func.predict.covariance(x[a:b])
    sampler.stop()

    assert np.all(np.isfinite(log_density)) and np.all(np.isfinite(variance)) and np.all(np.isfinite(cov))
    result = dens.optimizer_result
    print(f"density ({args.optimizer}): {result.nit} iterations, {result.nfev} evaluations, loss {result.fun:.10g}")
    print(f"n x M x 8 bytes = {args.cells * args.landmarks * 8 / 2**20:.0f} MiB (never materialised)")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    record = {"cells": args.cells, "genes": args.genes, "landmarks": args.landmarks, "dims": args.dims}
    record.update(optimizer=args.optimizer, density_iterations=int(result.nit), density_evaluations=int(result.nfev))
    for name in ["landmarks", "density_fit", "density_predict", "function_fit", "function_predict"]:
        record[f"{name}_s"] = stages[name]["seconds"]
        record[f"{name}_peak_bytes"] = stages[name]["peak_memory_bytes"]
    print(json.dumps(record))


if __name__ == "__main__":
    main()
