"""``da()`` + ``de()`` on an AnnData-zarr path: the client's peak memory against the size of
the cells x genes results it writes.

    python benchmarks/out_of_core.py --cells 200000 --genes 1000
    python benchmarks/out_of_core.py --cells N --genes G [--landmarks 1000] [--workers 2]
                                     [--memory-limit 6GB] [--workdir DIR] [--keep]

1. Writes a synthetic atlas (``kompot_dask.testing.write_atlas_zarr``: 3 + 3 samples,
   dense float32 ``X`` chunked by cells) chunk by chunk.
2. In a fresh Python process (so its peak memory is the analysis's alone), opens a
   LocalCluster of worker processes and runs ``kompot_dask.da(path, ...)`` and
   ``kompot_dask.de(path, ..., sample_col="sample")`` on the path: the layers are computed
   into the store chunk by chunk on the workers.
3. Prints, for that client process: peak resident memory (``ru_maxrss``), and beside it
   ``cells x genes x 8`` bytes (one dense float64 layer) and the total size of the layers
   written; the workers' peak memory (sampled on the workers); the wall time of each call;
   and whether ``anndata.read_zarr`` / ``read_lazy`` open the result. Ends with one JSON line.
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

path, workers, memory_limit, landmarks = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
peaks = {}

def sample_workers(client, stop):
    while not stop.is_set():
        try:
            for addr, rss in client.run(lambda: psutil.Process().memory_info().rss).items():
                peaks[addr] = max(peaks.get(addr, 0), rss)
        except Exception:
            pass
        stop.wait(1.0)

out = {}
with LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=memory_limit,
                  processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
    stop = threading.Event()
    thread = threading.Thread(target=sample_workers, args=(client, stop), daemon=True)
    thread.start()
    common = dict(groupby="condition", condition1="control", condition2="treated", sample_col="sample",
                  progress=False)
    t = time.perf_counter()
    kd.da(path, **common, n_landmarks=landmarks)
    out["da_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    kd.de(path, **common, n_landmarks=landmarks)
    out["de_seconds"] = time.perf_counter() - t
    stop.set(); thread.join()
out["client_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["worker_peak_bytes"] = max(peaks.values(), default=0)
print("RESULT " + json.dumps(out))
"""


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--landmarks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="6GB")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the atlas and its results")
    args = parser.parse_args()

    import psutil

    from kompot_dask.testing import write_atlas_zarr

    workdir = args.workdir or tempfile.mkdtemp(prefix="kompot-ooc-")
    path = os.path.join(workdir, "atlas.zarr")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB; python {platform.python_version()}")
    t = time.perf_counter()
    write_atlas_zarr(path, n_cells=args.cells, n_genes=args.genes, n_samples=3, seed=0, chunk_cells=5000,
                     overwrite=True)
    print(f"atlas: {args.cells} cells x {args.genes} genes written in {time.perf_counter() - t:.1f} s "
          f"({_size(path) / 2**30:.2f} GiB on disk)")
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, path, str(args.workers), args.memory_limit,
                               str(args.landmarks)], capture_output=True, text=True, check=False)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
            raise SystemExit(f"the analysis failed (exit code {proc.returncode})")
        out = json.loads(line[0][len("RESULT "):])
        import anndata

        lazy = anndata.experimental.read_lazy(path)
        layers = sorted(lazy.layers.keys())
        layer_bytes = sum(_size(os.path.join(path, "layers", k)) for k in layers)
        dense = args.cells * args.genes * 8
        first = anndata.read_zarr(path).layers[layers[0]]
        out.update(cells=args.cells, genes=args.genes, landmarks=args.landmarks, workers=args.workers,
                   one_layer_float64_bytes=dense, layers=layers, layers_on_disk_bytes=layer_bytes,
                   read_zarr_layer_shape=list(first.shape), cpu_count=os.cpu_count())
        print(f"da(path): {out['da_seconds']:.1f} s; de(path, sample_col): {out['de_seconds']:.1f} s")
        print(f"client peak RSS: {out['client_peak_bytes'] / 2**30:.2f} GiB; one cells x genes float64 layer: "
              f"{dense / 2**30:.2f} GiB; {len(layers)} layers written ({layer_bytes / 2**30:.2f} GiB on disk, "
              f"compressed); client peak / one layer = {out['client_peak_bytes'] / dense:.2f}")
        print(f"worker peak RSS (sampled each second): {out['worker_peak_bytes'] / 2**30:.2f} GiB")
        print(f"anndata.read_zarr opens the result; layers {layers} of shape {tuple(first.shape)}")
        print(json.dumps(out))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
