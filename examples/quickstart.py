"""Quick start: the GP estimators on a generated two-condition dataset.

    python examples/quickstart.py [--cells 4000] [--genes 50] [--landmarks 200]

Generates cells of two conditions on curved clusters (condition 2 shifts the cluster
weights), fits one density per condition on shared k-means landmarks, and one
expression GP per condition; prints where abundance and expression changed. (The
documented DifferentialAbundance / DifferentialExpression classes build on exactly
these estimators.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kompot_dask as kd
from kompot_dask.estimators._landmarks import kmeans_landmarks


def generate(n: int, genes: int, rng: np.random.Generator):
    centres = np.array([[0.0, 0.0, 0.0], [12.0, 0.0, 2.0], [0.0, 12.0, -2.0]])
    axis = np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.3, 0.0, 1.0]])
    weights = {1: np.array([0.5, 0.3, 0.2]), 2: np.array([0.2, 0.3, 0.5])}
    programs = rng.normal(scale=0.4, size=(3, genes))
    de = np.zeros(genes)
    de[: genes // 4] = 1.0  # the first quarter of genes goes up in cluster 0 of condition 2
    out = {}
    for cond in (1, 2):
        label = rng.choice(3, size=n // 2, p=weights[cond])
        t = rng.uniform(-1, 1, size=n // 2)
        x = centres[label] + 5.0 * t[:, None] * axis[label] + rng.normal(scale=0.5, size=(n // 2, 3))
        rate = np.exp(0.5 + np.tanh(x / 6.0) @ programs + (cond == 2) * (label == 0)[:, None] * de)
        out[cond] = (x, np.log1p(rng.poisson(rate)).astype(np.float64), label)
    return out, de > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--landmarks", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data, is_de = generate(args.cells, args.genes, rng)
    (x1, y1, lab1), (x2, y2, lab2) = data[1], data[2]
    x_all = np.vstack([x1, x2])
    t0 = time.perf_counter()
    landmarks = kmeans_landmarks(x_all, args.landmarks, random_state=0)

    density = {}
    for cond, x in ((1, x1), (2, x2)):
        density[cond] = kd.DensityEstimator(
            landmarks=landmarks, gp_type="fixed", d_method="fractal", ls_factor=10.0,
            predictor_with_uncertainty=True,
        ).fit(x)
    lfc = density[2].predict(x_all, normalize=True) - density[1].predict(x_all, normalize=True)
    var = density[1].predict.uncertainty(x_all) + density[2].predict.uncertainty(x_all)
    z = lfc / np.sqrt(var + 1e-12)
    labels = np.concatenate([lab1, lab2])
    print(f"{len(x1)} + {len(x2)} cells, {args.genes} genes, {args.landmarks} shared landmarks")
    print("differential abundance (condition 2 vs 1), mean log fold change per cluster:")
    for k in range(3):
        m = labels == k
        print(f"  cluster {k}: lfc {lfc[m].mean():+.2f}  (|z| > 2 in {np.mean(np.abs(z[m]) > 2):.0%} of cells)")

    m1 = kd.FunctionEstimator(landmarks=landmarks, gp_type="fixed", sigma=1.0, ls_factor=10.0).fit(x1, y1)
    m2 = kd.FunctionEstimator(landmarks=landmarks, gp_type="fixed", sigma=1.0, ls=m1.ls).fit(x2, y2)
    fc = m2.predict(x_all) - m1.predict(x_all)
    in_c0 = labels == 0
    score = np.abs(fc[in_c0]).mean(axis=0)
    top = np.argsort(score)[::-1][: int(is_de.sum())]
    print("differential expression: mean |fold change| in cluster 0")
    print(f"  DE genes {score[is_de].mean():.3f} vs other genes {score[~is_de].mean():.3f}; "
          f"top-{len(top)} genes hold {is_de[top].mean():.0%} true DE genes")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
