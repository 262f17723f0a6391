"""Distances and the Matérn-5/2 covariance (SPEC §1.1-1.2).

Distances use the expansion ``|a|^2 - 2 a.b + |b|^2 + 1e-12`` under the square root, as
the reference does (so ``dist(x, x) = 1e-6``); it is also the GEMM form that makes a
cells x landmarks block one matrix product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["distances", "matern52", "matern52_diag"]

_SQRT5 = 5.0**0.5
_DIST_OFFSET = 1e-12


@jax.jit
def distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """Euclidean distances between the rows of ``a`` (p x D) and ``b`` (q x D)."""
    sq = (
        jnp.sum(a * a, axis=1)[:, None]
        - 2.0 * (a @ b.T)
        + jnp.sum(b * b, axis=1)[None, :]
        + _DIST_OFFSET
    )
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def _matern_of_distance(dist: jax.Array, ls: float) -> jax.Array:
    r = _SQRT5 * dist / ls
    return (1.0 + r + r * r / 3.0) * jnp.exp(-r)


@jax.jit
def matern52(a: jax.Array, b: jax.Array, ls: float) -> jax.Array:
    """Matérn-5/2 covariance matrix ``k(a_i, b_j)`` with unit amplitude and length scale ``ls``."""
    return _matern_of_distance(distances(a, b), ls)


@jax.jit
def matern52_diag(a: jax.Array, ls: float) -> jax.Array:
    """``k(a_i, a_i)`` through the same distance formula (``1 - O(1e-12 / ls^2)``)."""
    sq_norm = jnp.sum(a * a, axis=1)
    sq = sq_norm - 2.0 * sq_norm + sq_norm + _DIST_OFFSET
    return _matern_of_distance(jnp.sqrt(jnp.maximum(sq, 0.0)), ls)
