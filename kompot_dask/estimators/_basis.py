"""The prior factor ``L = Phi T`` of a density model, one chunk of cells at a time.

Landmark mode: ``Phi_c = K(X_c, U)`` is recomputed for each chunk whenever it is needed
(never stored for all cells) and ``T = Lp^-T``. Full mode: ``Phi_c`` = rows of ``Lp`` and
``T = I``. The objective, ridge start and Laplace diagonal only need per-chunk products
with ``Phi_c`` summed over chunks, plus ``T`` applied to landmark-sized results.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from ..kernels import covariance as cov
from ..kernels import density as dk
from ..kernels import linalg as la

__all__ = ["LandmarkBasis", "FullBasis", "sum_over_chunks"]


def sum_over_chunks(fn: Callable[[slice], tuple], slices: Sequence[slice]) -> tuple:
    """Element-wise sum of the tuples ``fn(sl)`` over all chunks.

    Each chunk is finished before the next is read: JAX dispatches asynchronously, and
    without the wait every chunk's inputs would be in flight at once (memory ~ n).
    """
    total = list(jax.block_until_ready(fn(slices[0])))
    for sl in slices[1:]:
        for i, part in enumerate(fn(sl)):
            total[i] = total[i] + part
        jax.block_until_ready(total)
    return tuple(total)


class LandmarkBasis:
    """``Phi_c = K(X_c, U)``, ``T = Lp^-T`` (fixed / sparse_cholesky types)."""

    def __init__(self, x: np.ndarray, inducing: np.ndarray, lp: jax.Array, ls: float):
        self.x, self.inducing, self.lp, self.ls = x, inducing, lp, ls

    def block(self, sl: slice) -> jax.Array:
        """``Phi_c``: the kernel block, enough for products with ``w = T z``."""
        return cov.matern52(self.x[sl], self.inducing, self.ls)

    def factor_block(self, sl: slice) -> jax.Array:
        """``L_c = Phi_c T``, by a triangular solve."""
        return dk.landmark_factor_block(self.x[sl], self.inducing, self.lp, self.ls)

    def to_weights(self, z):
        return la.solve_upper_t(self.lp, z)

    def to_latent(self, g):
        return la.solve_lower(self.lp, g)


class FullBasis:
    """``Phi_c = L_c = Lp[c]``, ``T = I`` (full GP on all training cells)."""

    def __init__(self, lp: jax.Array):
        self.lp = lp

    def block(self, sl: slice) -> jax.Array:
        return self.lp[sl]

    factor_block = block

    def to_weights(self, z):
        return z

    def to_latent(self, g):
        return g
