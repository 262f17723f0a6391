"""Quick start: a full differential abundance + expression analysis on a generated atlas.

    python examples/quickstart.py [--cells 4000] [--genes 60] [--samples 3] [--landmarks 200]

Generates two conditions (3 replicate samples each) on curved clusters in 4 dimensions:
condition 2 moves cells from cluster 0 to cluster 2 (abundance) and raises the first
quarter of the genes in cluster 0 (expression). Runs Kompot's DifferentialAbundance and
DifferentialExpression with sample variance, shared landmarks, Mahalanobis distances and
a null-gene FDR, and prints what they found against the generator's truth.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kompot_dask as kd
from kompot_dask.testing import two_conditions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument("--genes", type=int, default=60)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--landmarks", type=int, default=200)
    parser.add_argument("--null-genes", type=int, default=200)
    args = parser.parse_args()
    data = two_conditions(n_cells=args.cells, n_genes=args.genes, n_samples=args.samples, dims=4, seed=0)
    x_all = np.vstack([data.x1, data.x2])
    clusters = np.concatenate([data.cluster1, data.cluster2])
    print(f"{len(data.x1)} + {len(data.x2)} cells, {args.genes} genes, {args.samples} + {args.samples} samples")

    t0 = time.perf_counter()
    da = kd.DifferentialAbundance(n_landmarks=args.landmarks, random_state=0)
    da.fit(data.x1, data.x2, condition1_sample_indices=data.samples1, condition2_sample_indices=data.samples2)
    abundance = da.predict(x_all)
    t1 = time.perf_counter()
    print(f"\ndifferential abundance ({t1 - t0:.1f} s): condition 2 vs 1, per generating cluster")
    for k in range(3):
        m = clusters == k
        calls = abundance["log_fold_change_direction"][m]
        print(f"  cluster {k}: mean lfc {abundance['log_fold_change'][m].mean():+.2f}   "
              f"up {np.mean(calls == 'up'):4.0%}  down {np.mean(calls == 'down'):4.0%}")

    de = kd.DifferentialExpression(n_landmarks=args.landmarks, random_state=0, null_genes=args.null_genes)
    de.fit(data.x1, data.y1, data.x2, data.y2,
           condition1_sample_indices=data.samples1, condition2_sample_indices=data.samples2)
    expression = de.predict(x_all, compute_mahalanobis=True)
    t2 = time.perf_counter()
    dist, is_de = expression["mahalanobis_distances"], expression["is_de"]
    truth = data.de_genes
    print(f"\ndifferential expression ({t2 - t1:.1f} s): Mahalanobis distance per gene "
          f"({de.mahalanobis_branch} branch), FDR from {args.null_genes} null genes")
    print(f"  median distance: true DE genes {np.median(dist[truth]):.1f}, others {np.median(dist[~truth]):.1f}")
    print(f"  local FDR < 0.05: {int(is_de.sum())} genes called, {int((is_de & truth).sum())} of "
          f"{int(truth.sum())} true DE genes found, {int((is_de & ~truth).sum())} false calls")
    print(f"\ndone in {t2 - t0:.1f} s")


if __name__ == "__main__":
    main()
