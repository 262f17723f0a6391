"""Nearest-neighbour distances and the fractal (correlation) dimension (SPEC §1.3-1.4).

Exact searches with scipy's cKDTree. A tree of all cells is built once; any chunk of
cells can then be queried against it, so the work splits over cell chunks.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "build_tree",
    "nn_distances_chunk",
    "fractal_query_indices",
    "jax_permutation",
    "local_fractal_dims",
    "fractal_dimension",
]

FRACTAL_N_QUERIES = 500
FRACTAL_K = 10
FRACTAL_SEED = 432


def build_tree(x: np.ndarray) -> cKDTree:
    """KD-tree over the training cells ``x`` (n x D)."""
    return cKDTree(np.asarray(x, dtype=np.float64))


def nn_distances_chunk(tree: cKDTree, x_chunk: np.ndarray, float32: bool = False) -> np.ndarray:
    """Distance from each cell of ``x_chunk`` (cells of the tree) to its nearest other cell.

    The two closest tree points are the cell itself (distance 0) and its nearest
    neighbour; a duplicated cell therefore gets 0, as the reference's kNN graph gives.
    With ``float32=True`` the distance to that (exact) neighbour is recomputed from
    float32-cast coordinates in float32, as the reference's float32 kNN does (§10.15).
    """
    x_chunk = np.asarray(x_chunk, dtype=np.float64)
    dist, idx = tree.query(x_chunk, k=2)
    if not float32:
        return np.asarray(dist[:, 1], dtype=np.float64)
    # idx[:, 1] is the nearest other cell (or, for a duplicated cell, a point at distance 0)
    diff = x_chunk.astype(np.float32) - tree.data[idx[:, 1]].astype(np.float32)
    return np.sqrt(np.sum(diff * diff, axis=1, dtype=np.float32)).astype(np.float64)


def fractal_query_indices(n: int) -> np.ndarray:
    """Query cells for the fractal dimension: all cells, or 500 drawn as the reference does.

    The reference draws ``jax.random.choice(PRNGKey(432), n, (500,), replace=False)``
    with 64-bit JAX 0.10 (threefry keys, partitionable). That draw is the first 500 of
    :func:`jax_permutation`, here in numpy: the same cells, without an XLA compilation for
    every ``n`` (about 0.3 s each).
    """
    if n <= FRACTAL_N_QUERIES:
        return np.arange(n)
    return jax_permutation(FRACTAL_SEED, n)[:FRACTAL_N_QUERIES]


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = np.uint32(0x1BD11BDA)


def _threefry2x32(key: tuple, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Threefry-2x32 hash (20 rounds) of the counter pairs ``(x0, x1)`` under ``key``, as JAX computes it.

    uint32 arrays wrap on overflow, which is the hash's arithmetic.
    """
    ks = (np.uint32(key[0]), np.uint32(key[1]), np.uint32(key[0]) ^ np.uint32(key[1]) ^ _THREEFRY_PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for rot in _THREEFRY_ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(rot)) | (x1 >> np.uint32(32 - rot)))
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3]
        x1 = x1 + np.uint32(block + 1)
    return x0, x1


def _threefry_bits(key: tuple, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Both output words of the hash of the counters ``0 … n-1`` (JAX's partitionable layout)."""
    return _threefry2x32(key, np.zeros(n, dtype=np.uint32), np.arange(n, dtype=np.uint32))


def jax_permutation(seed: int, n: int) -> np.ndarray:
    """``jax.random.permutation(jax.random.PRNGKey(seed), n)`` of JAX 0.10, computed in numpy.

    JAX sorts ``arange(n)`` by 32-bit random keys (stably), in as many rounds as make ties
    unlikely; each round splits the key and draws the sort keys from the subkey. Threefry
    keys with ``jax_threefry_partitionable`` (JAX's default since 0.5) and a seed below 2**64.
    """
    key = (np.uint32(seed >> 32), np.uint32(seed & 0xFFFFFFFF))
    rounds = int(np.ceil(3 * np.log(max(1, n)) / np.log(np.iinfo(np.uint32).max)))
    out = np.arange(n)
    for _ in range(rounds):
        b0, b1 = _threefry_bits(key, 2)  # split: key, subkey = the two rows
        key, subkey = (b0[0], b1[0]), (b0[1], b1[1])
        w0, w1 = _threefry_bits(subkey, n)
        out = out[np.argsort(w0 ^ w1, kind="stable")]
    return out


def local_fractal_dims(neighbourhoods: np.ndarray) -> np.ndarray:
    """Correlation dimension of each neighbourhood (q x k x D), SPEC §1.4 steps 3-4.

    All ``k(k-1)/2`` pairwise distances are sorted; the slope of the least-squares fit
    of ``log m`` on ``log delta_(m)`` is the local dimension.
    """
    q, k, _ = neighbourhoods.shape
    iu, ju = np.triu_indices(k, 1)
    diff = neighbourhoods[:, iu, :] - neighbourhoods[:, ju, :]
    pair_dist = np.sort(np.sqrt(np.sum(diff * diff, axis=2)), axis=1)
    with np.errstate(divide="ignore"):
        log_delta = np.log(pair_dist)
    log_m = np.log(np.arange(1, len(iu) + 1, dtype=np.float64))
    xc = log_delta - log_delta.mean(axis=1, keepdims=True)
    yc = log_m - log_m.mean()
    return np.sum(xc * yc, axis=1) / np.sum(xc * xc, axis=1)


def fractal_dimension(tree: cKDTree, x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Intrinsic dimension ``d`` by the fractal method (mean of local dimensions).

    Returns
    -------
    d : float
        Mean local dimension.
    query_idx : ndarray of int
        The query cells used.
    local_dims : ndarray of float
        One local dimension per query cell.
    """
    x = np.asarray(x, dtype=np.float64)
    query_idx = fractal_query_indices(len(x))
    k = min(FRACTAL_K, len(x))
    _, nbr = tree.query(x[query_idx], k=k)
    local = local_fractal_dims(x[np.asarray(nbr).reshape(len(query_idx), k)])
    return float(np.mean(local)), query_idx, local
