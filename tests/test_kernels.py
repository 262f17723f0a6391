"""Primitive kernels: distances, Matérn, neighbours, fractal dimension, k-means."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from scipy.spatial.distance import cdist

from kompot_dask._jax import x64
from kompot_dask.estimators._landmarks import compute_landmarks, kmeans_landmarks, resolve_gp_type
from kompot_dask.kernels import covariance, landmarks, neighbors


def test_distance_formula_and_matern():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    with x64():
        d = np.asarray(covariance.distances(a, b))
        self_d = np.asarray(covariance.distances(a, a))
        k = np.asarray(covariance.matern52(a, b, 2.0))
        kd = np.asarray(covariance.matern52_diag(a, 2.0))
    assert_close(d, np.sqrt(cdist(a, b) ** 2 + 1e-12), atol=1e-12)
    assert_close(np.diag(self_d), np.full(7, 1e-6), atol=1e-7, what="dist(x, x) = 1e-6")
    r = np.sqrt(5) * np.sqrt(cdist(a, b) ** 2 + 1e-12) / 2.0
    assert_close(k, (1 + r + r**2 / 3) * np.exp(-r), atol=1e-12)
    assert_close(kd, np.ones(7), atol=1e-12)


def test_fractal_dimension_matches_reference(density_landmarks):
    case = density_landmarks
    x = case["in_X"]
    tree = neighbors.build_tree(x)
    d, idx, local = neighbors.fractal_dimension(tree, x)
    np.testing.assert_array_equal(idx, case["out_fractal_query_idx"])
    assert_close(local, case["out_fractal_local_dims"], rtol=1e-10, what="local dims")
    assert_close(d, case["out_d"], rtol=1e-10)


@pytest.mark.parametrize("n", [501, 1625, 1626, 2499, 20011])
def test_fractal_query_cells_are_jax_draw(n):
    """The numpy permutation is JAX's draw bit for bit: one sort round up to n = 1625, two
    above (the reference cases have n = 600 and 1500), with the key split between rounds."""
    import jax

    with x64():
        drawn = jax.random.choice(jax.random.PRNGKey(neighbors.FRACTAL_SEED), n,
                                  shape=(neighbors.FRACTAL_N_QUERIES,), replace=False)
        full = jax.random.permutation(jax.random.PRNGKey(7), n)
    np.testing.assert_array_equal(neighbors.fractal_query_indices(n), np.asarray(drawn))
    np.testing.assert_array_equal(neighbors.jax_permutation(7, n), np.asarray(full))


def test_nn_distances_float32_and_float64(density_full):
    x = density_full["in_X"]
    tree = neighbors.build_tree(x)
    exact = cdist(x, x)
    np.fill_diagonal(exact, np.inf)
    assert_close(neighbors.nn_distances_chunk(tree, x), exact.min(axis=1), rtol=1e-12)
    assert_close(neighbors.nn_distances_chunk(tree, x, float32=True), density_full["out_nn_distances"], rtol=2e-7)
    # any chunk of cells against the tree of all cells
    assert_close(neighbors.nn_distances_chunk(tree, x[100:137]), exact.min(axis=1)[100:137], rtol=1e-12)


def test_lloyd_step_is_a_sum_over_chunks():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4))
    centers = x[:12].copy()
    whole = landmarks.lloyd_chunk_stats(x, centers)
    parts = landmarks.lloyd_chunk_stats(x[:123], centers) + landmarks.lloyd_chunk_stats(x[123:], centers)
    assert_close(parts.sums, whole.sums, atol=1e-12)
    np.testing.assert_array_equal(parts.counts, whole.counts)
    assert_close(parts.inertia, whole.inertia, rtol=1e-12)
    # against a brute-force assignment over the full distance matrix (sub-blocks of 7 rows)
    d2 = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    labels = d2.argmin(axis=1)
    blocked = landmarks.lloyd_chunk_stats(x, centers, sub_rows=7)
    np.testing.assert_array_equal(blocked.counts, np.bincount(labels, minlength=12))
    assert_close(blocked.sums, np.stack([x[labels == j].sum(axis=0) for j in range(12)]), atol=1e-12)
    assert_close(blocked.inertia, d2.min(axis=1).sum(), rtol=1e-12)


def test_bounded_lloyd_steps_assign_exactly_as_brute_force():
    """Hamerly bounds skip most distance work yet give the same sums and counts at every step."""
    rng = np.random.default_rng(5)
    blobs = rng.normal(scale=3.0, size=(40, 5)) + 100.0  # far from the origin: rounding matters
    x = np.vstack([b + rng.normal(size=(60, 5)) for b in blobs])
    chunks = [x[:700], x[700:1777], x[1777:]]
    centers = x[rng.choice(len(x), 30, replace=False)]
    bounds = [None] * len(chunks)
    full = []
    for _ in range(12):
        gaps = landmarks.half_gaps(centers)
        brute = sum((landmarks.lloyd_chunk_stats(c, centers) for c in chunks[1:]),
                    landmarks.lloyd_chunk_stats(chunks[0], centers))
        sums, counts, n_full = 0.0, 0.0, 0
        for i, c in enumerate(chunks):
            s, n, bounds[i], f = landmarks.lloyd_chunk_bounded(c, centers, gaps, bounds[i], sub_rows=64)
            sums, counts, n_full = sums + s, counts + n, n_full + f
        np.testing.assert_array_equal(counts, brute.counts)
        np.testing.assert_array_equal(sums, brute.sums)
        full.append(n_full)
        centers, _ = landmarks.lloyd_update(centers, brute.sums, brute.counts)
    assert full[0] == len(x)
    assert full[-1] < 0.1 * len(x)  # late steps touch few cells in full
    # the bounds hold: upper >= distance to the nearest centre, lower <= every other distance
    d = np.sqrt(((chunks[1][:, None, :] - bounds[1].centers[None]) ** 2).sum(axis=2))
    own = d[np.arange(len(d)), bounds[1].labels]
    np.testing.assert_array_equal(bounds[1].labels, d.argmin(axis=1))
    assert np.all(bounds[1].upper >= own * (1 - 1e-12))
    d[np.arange(len(d)), bounds[1].labels] = np.inf
    assert np.all(bounds[1].lower <= d.min(axis=1) * (1 + 1e-12))


def test_kmeans_finds_separated_clusters_and_is_seeded():
    rng = np.random.default_rng(4)
    centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20.0]])
    x = np.vstack([c + rng.normal(scale=0.5, size=(200, 2)) for c in centres])
    found = kmeans_landmarks(x, 4, random_state=0)
    assert_close(np.sort(found, axis=0), np.sort(centres, axis=0), atol=0.2)
    np.testing.assert_array_equal(found, kmeans_landmarks(x, 4, random_state=0))


def test_gp_type_resolution():
    assert resolve_gp_type(100, None, None, None) == ("full", 100)
    assert resolve_gp_type(6000, None, None, None) == ("sparse_cholesky", 5000)
    assert resolve_gp_type(100, None, np.zeros((200, 2)), None) == ("full", 200)
    assert resolve_gp_type(100, None, np.zeros((200, 2)), "fixed") == ("fixed", 200)
    assert resolve_gp_type(1000, 50, None, None) == ("sparse_cholesky", 50)
    x = np.arange(20.0).reshape(10, 2)
    assert compute_landmarks(x, "fixed", 10, 0) is not None  # all cells become landmarks
    np.testing.assert_array_equal(compute_landmarks(x, "fixed", 12, 0), x)
    assert compute_landmarks(x, "full", 5, 0) is None
    with pytest.raises(ValueError, match="at least 2"):
        compute_landmarks(x, "fixed", 1, 0)


def test_kmeans_plusplus_is_greedy_kmeans_plusplus():
    """The seeding equals a plain greedy k-means++ written from its definition (direct
    differences, same random stream): each step draws ``2 + ln k`` candidates with
    probability proportional to the squared distance to the nearest centre so far and keeps
    the one that lowers the potential most."""
    x = np.random.default_rng(3).standard_normal((400, 4))
    k, rng = 25, np.random.default_rng(11)
    got = landmarks.kmeans_plusplus(x, k, np.random.default_rng(11))
    trials = 2 + int(np.log(k))
    centers = [x[rng.integers(len(x))]]
    closest = cdist(centers, x, "sqeuclidean")[0]
    for _ in range(1, k):
        draws = rng.uniform(size=trials) * closest.sum()
        cand = np.minimum(np.searchsorted(np.cumsum(closest), draws), len(x) - 1)
        pots = np.minimum(closest[None, :], cdist(x[cand], x, "sqeuclidean"))
        best = int(np.argmin(pots.sum(axis=1)))
        centers.append(x[cand[best]])
        closest = pots[best]
    np.testing.assert_array_equal(got, np.array(centers))


@pytest.mark.parametrize("m", [1, 7, 300, 1100])  # 1100: the symmetric results mirrored in several tiles
def test_lapack_factor_helpers_against_their_definitions(m):
    """cholesky_lower reads the lower triangle only (like numpy) and gives a C-ordered L with
    L Lᵀ = a; triangular_inverse, lower_gram and inverse_from_cholesky equal a solve against I,
    Lᵀ L and (L Lᵀ)⁻¹, for both
    memory orders of L; a matrix that is not positive definite or not finite is refused."""
    import scipy.linalg

    from kompot_dask.kernels import posterior as post

    rng = np.random.default_rng(m)
    a = rng.standard_normal((m, m))
    k = a @ a.T + 0.1 * np.eye(m)
    upper_changed = k.copy()
    upper_changed[np.triu_indices(m, 1)] += 1e-3  # never read
    for given in (upper_changed, np.asfortranarray(upper_changed)):
        lower = post.cholesky_lower(given, "k")
        assert lower.flags.c_contiguous and np.array_equal(lower, np.tril(lower))
        np.testing.assert_allclose(lower @ lower.T, k, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lower, np.linalg.cholesky(k), rtol=1e-10, atol=1e-12)
    for factor in (lower, np.asfortranarray(lower)):
        inverse = post.triangular_inverse(factor)
        assert np.array_equal(inverse, np.tril(inverse))
        np.testing.assert_allclose(inverse, scipy.linalg.solve_triangular(lower, np.eye(m), lower=True),
                                   rtol=1e-10, atol=1e-12)
        gram = post.lower_gram(factor)
        assert np.array_equal(gram, gram.T)
        np.testing.assert_allclose(gram, lower.T @ lower, rtol=1e-12, atol=1e-12)
        inverse_k = post.inverse_from_cholesky(factor)
        assert inverse_k.flags.c_contiguous and np.array_equal(inverse_k, inverse_k.T)
        np.testing.assert_allclose(inverse_k, np.linalg.inv(k), rtol=1e-9, atol=1e-12 * np.abs(inverse_k).max())
    bad = k.copy()
    bad[0, 0] = -1.0
    for matrix in (bad, np.where(np.eye(m, dtype=bool), np.nan, k)):
        with pytest.raises(post.FactorError, match="named"):
            post.cholesky_lower(matrix, "named")
