"""Nearest-neighbour distances: cells queried in their own order vs in the KD-tree's leaf order.

    python benchmarks/neighbors.py --cells 500000 [--dims 10]

Cell states come from the scale benchmark's generator (elongated clusters, cells in random
order). Both searches run in this process, one thread, exact (cKDTree, k = 2); the
distances are checked to be identical. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--dims", type=int, default=10)
    args = parser.parse_args()

    import zarr

    from kompot_dask.estimators._neighbors import nn_distances
    from kompot_dask.kernels import neighbors as nb
    from scale import generate_atlas

    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        generate_atlas(os.path.join(tmp, "atlas.zarr"), args.cells, 1, args.dims, 3, 8192)
        x = zarr.open_group(os.path.join(tmp, "atlas.zarr"), mode="r")["cell_states"][...]
    tree = nb.build_tree(x)
    t0 = time.perf_counter()
    own_order = nb.nn_distances_chunk(tree, x, float32=True)
    t_own = time.perf_counter() - t0
    t0 = time.perf_counter()
    tree_order = nn_distances(x, tree, float32=True)
    t_tree = time.perf_counter() - t0
    np.testing.assert_array_equal(tree_order, own_order)
    print(f"cells' own order: {t_own:8.2f} s\ntree leaf order:  {t_tree:8.2f} s  ({t_own / t_tree:.2f}x faster)")
    print(json.dumps({"cells": args.cells, "dims": args.dims, "own_order_s": round(t_own, 3),
                      "tree_order_s": round(t_tree, 3), "ratio": round(t_own / t_tree, 3),
                      "machine": f"{platform.node()} {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
