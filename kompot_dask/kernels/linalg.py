"""Small dense linear-algebra helpers shared by the GP kernels (JAX, float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from .covariance import matern52

__all__ = ["prior_cholesky", "solve_lower", "solve_upper_t", "checked"]


@jax.jit
def prior_cholesky(z: jax.Array, ls: float, jitter: float) -> jax.Array:
    """``chol(K_ZZ + jitter I)`` of the Matérn-5/2 kernel on the inducing set ``z``."""
    k = matern52(z, z, ls)
    return jnp.linalg.cholesky(k + jitter * jnp.eye(k.shape[0], dtype=k.dtype))


@jax.jit
def solve_lower(lower: jax.Array, b: jax.Array) -> jax.Array:
    """``L^-1 b`` for lower-triangular ``L``."""
    return solve_triangular(lower, b, lower=True)


@jax.jit
def solve_upper_t(lower: jax.Array, b: jax.Array) -> jax.Array:
    """``L^-T b`` for lower-triangular ``L``."""
    return solve_triangular(lower.T, b, lower=False)


def checked(factor: jax.Array, what: str) -> jax.Array:
    """Raise a clear error when a Cholesky factor came back with NaNs (not positive definite).

    JAX returns a failed factorisation as all NaN, and a NaN anywhere in the input reaches
    the diagonal, so only the diagonal is read back (O(m), not an m×m host copy). Reading
    it waits for the factorisation itself, which every caller needs next anyway.
    """
    if not bool(np.all(np.isfinite(np.asarray(jnp.diagonal(factor))))):
        msg = (
            f"the Cholesky factorisation of {what} failed (matrix not positive definite); "
            "increase `jitter`, or check for duplicated landmarks and a length scale that is "
            "not tiny compared with the distances between cells"
        )
        raise ValueError(msg)
    return factor
