"""Benchmark: sample-variance Mahalanobis distances, Woodbury vs per-gene dense Cholesky.

SPEC §6.5: with sample variance the reference factorises ``Σ + Q_g Q_gᵀ + eps I`` once per
gene (``O(G M³)``); kompot_dask factorises ``Σ + eps I`` once and applies the Woodbury
identity per gene (``O(M³ + G M² S)``). This script times both on a synthetic problem (a
Matérn-5/2 posterior-like shared covariance and random rank-``S`` replicate factors) and
checks that they agree.

Usage::

    python benchmarks/mahalanobis.py                           # M = 1000 and 2000, G = 2000
    python benchmarks/mahalanobis.py --landmarks 1000 --genes 200

Prints the figures and the machine, then one JSON line per configuration (the last line of
the output is always JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import scipy

from kompot_dask._jax import x64
from kompot_dask.kernels import mahalanobis as mh
from kompot_dask.kernels.covariance import matern52

EPS = 1e-8


def make_problem(m: int, genes: int, samples: tuple[int, int], seed: int = 0):
    """Shared SPD covariance ``(m, m)``, differences ``(m, G)``, scaled factor ``(m, S, G)``."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(size=(m, 6))
    with x64():
        kernel = np.asarray(matern52(points, points, 0.5))
    sigma = 0.5 * kernel + 1e-2 * np.eye(m)  # smooth, posterior-like, condition ~1e5
    delta = rng.normal(size=(m, genes))
    q = mh.concat_factors(*(
        mh.sample_variance_factor(0.3 * rng.normal(size=(s, m, genes))) for s in samples
    ))
    return sigma, delta, q


def time_woodbury(sigma, delta, q, batch: int, repeats: int) -> tuple[float, np.ndarray]:
    """Best-of-``repeats`` seconds for the shared Cholesky plus all gene batches (compiled)."""
    genes = delta.shape[1]
    lower = mh.shared_cholesky(sigma, EPS)  # warm-up: compile every batch shape
    for width in {batch, genes % batch or batch}:
        mh.mahalanobis_woodbury(lower, delta[:, :width], q[:, :, :width])
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        lower = mh.shared_cholesky(sigma, EPS)
        out = np.concatenate([
            mh.mahalanobis_woodbury(lower, delta[:, i:i + batch], q[:, :, i:i + batch])
            for i in range(0, genes, batch)
        ])
        best = min(best, time.perf_counter() - start)
    return best, out


def time_dense(sigma, delta, q, subset) -> tuple[float, np.ndarray]:
    """Fastest per-gene seconds of the reference per-gene Cholesky over ``subset`` genes."""
    mh.mahalanobis_dense_reference(sigma, delta[:, :1], q[:, :, :1], EPS)  # warm BLAS threads
    times, out = [], []
    for g in subset:
        d, qg = np.ascontiguousarray(delta[:, g:g + 1]), np.ascontiguousarray(q[:, :, g:g + 1])
        start = time.perf_counter()
        out.append(mh.mahalanobis_dense_reference(sigma, d, qg, EPS)[0])
        times.append(time.perf_counter() - start)
    return min(times), np.array(out)


def run(m: int, genes: int, samples=(3, 3), batch: int = 250, dense_genes: int = 5,
        repeats: int = 2) -> dict:
    """Time one configuration and return its JSON record."""
    sigma, delta, q = make_problem(m, genes, samples)
    batch = min(batch, genes)
    wood_s, wood = time_woodbury(sigma, delta, q, batch, repeats)
    subset = np.linspace(0, genes - 1, min(dense_genes, genes)).astype(int)
    dense_s, dense = time_dense(sigma, delta, q, subset)
    rel_err = float(np.max(np.abs(wood[subset] / dense - 1.0)))
    record = {
        "landmarks": m,
        "genes": genes,
        "samples": int(q.shape[1]),
        "gene_batch": batch,
        "dense_genes_timed": len(subset),
        "woodbury_total_s": round(wood_s, 4),
        "woodbury_s_per_gene": wood_s / genes,
        "dense_s_per_gene": dense_s,
        "ratio": dense_s / (wood_s / genes),
        "max_rel_err": rel_err,
    }
    print(f"M={m} G={genes} S={q.shape[1]} batch={batch}: Woodbury {wood_s:.3f} s total "
          f"({record['woodbury_s_per_gene'] * 1e3:.3f} ms/gene, shared Cholesky included, "
          f"best of {repeats}); dense {dense_s * 1e3:.1f} ms/gene (fastest of {len(subset)} "
          f"genes); speed-up {record['ratio']:.0f}x; max rel err {rel_err:.2e}")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landmarks", type=int, help="M (default: run 1000 and 2000)")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250, help="genes per Woodbury batch")
    parser.add_argument("--dense-genes", type=int, default=5, help="genes timed with dense")
    parser.add_argument("--repeats", type=int, default=2, help="Woodbury timings (best of)")
    args = parser.parse_args(argv)
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"cpus={os.cpu_count()} | python {platform.python_version()} | numpy "
          f"{np.__version__} | scipy {scipy.__version__} | jax {jax.__version__} "
          f"({jax.default_backend()})")
    sizes = [args.landmarks] if args.landmarks else [1000, 2000]
    records = [run(m, args.genes, batch=args.batch, dense_genes=args.dense_genes,
                   repeats=args.repeats) for m in sizes]
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
