"""One evaluation of the density objective on one chunk of cells: fused vs block-first.

    python benchmarks/density_objective.py [--rows 8192] [--landmarks 2000] [--dims 10]

``fused``: the kernel formed 256 rows at a time inside the products (what the fit runs).
``block then products``: the whole rows x landmarks kernel block formed first, then
``Phi w`` and ``Phi^T (1 - e)``. ``stored block``: the products alone on a block kept in
memory (what caching the kernel per chunk would cost per evaluation). Ends with a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def best_of(fn, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--landmarks", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=10)
    args = parser.parse_args()

    from kompot_dask._jax import x64
    from kompot_dask.kernels import covariance as cov
    from kompot_dask.kernels import density as dk

    rng = np.random.default_rng(0)
    with x64():
        x = rng.normal(size=(args.rows, args.dims))
        u = rng.normal(size=(args.landmarks, args.dims))
        w = rng.normal(size=args.landmarks) * 1e-3
        v, vd = np.zeros(args.rows), np.zeros(args.rows)
        block = cov.matern52(x, u, 3.0)
        fused = best_of(lambda: dk.cells_loglik_grad(x, u, 3.0, w, 0.1, v, vd))
        unfused = best_of(lambda: dk.chunk_loglik_grad(cov.matern52(x, u, 3.0), w, 0.1, v, vd))
        stored = best_of(lambda: dk.chunk_loglik_grad(block, w, 0.1, v, vd))
        a = dk.cells_loglik_grad(x, u, 3.0, w, 0.1, v, vd)
        b = dk.chunk_loglik_grad(block, w, 0.1, v, vd)
        rel = float(np.max(np.abs(np.asarray(a[1]) - np.asarray(b[1]))) / np.max(np.abs(np.asarray(b[1]))))
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores")
    print(f"fused {fused:.4f} s, block then products {unfused:.4f} s, stored block {stored:.4f} s; "
          f"speed-up {unfused / fused:.2f}x; gradient rel. difference {rel:.1e}")
    print(json.dumps({"rows": args.rows, "landmarks": args.landmarks, "dims": args.dims, "fused_s": round(fused, 5),
                      "block_then_products_s": round(unfused, 5), "stored_block_s": round(stored, 5),
                      "gradient_rel_diff": rel, "machine": f"{platform.node()} {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
