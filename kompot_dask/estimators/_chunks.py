"""The density fit's per-chunk terms, and the reducers that sum them over cell chunks.

The latent log density at training cells is ``f = Phi T z + mu`` (SPEC §2.3): landmark
mode ``Phi_c = K(X_c, U)`` and ``T = Lp^-T``; full mode ``Phi_c`` = rows of ``Lp`` and
``T = I``. Every O(n) quantity of the fit is a sum over cell chunks of a term that needs
only that chunk (:class:`DensityChunk`) and the landmark-sized :class:`Prior`:

* :func:`gram_rhs`: the ridge start's ``L_c^T L_c`` and ``L_c^T t``;
* :func:`loglik_grad`: one evaluation of the objective, ``sum_i f_i + Vd_i - e_i`` and
  ``Phi_c^T (1 - e)``;
* :func:`hessian_diag`: the Laplace diagonal ``(L_c**2)^T e``.

A reducer sums one of them over all chunks: :class:`LocalChunks` here, one chunk after
another; :class:`kompot_dask.parallel.reduce.ClusterChunks` as tasks on the workers that
hold the chunks. Both add the parts in chunk order, so they give identical numbers.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import jax
import numpy as np

from .._jax import with_x64
from ..kernels import density as dk
from ..options import get_options

__all__ = [
    "DensityChunk",
    "Prior",
    "LocalChunks",
    "open_reducer",
    "add_in_order",
    "gram_rhs",
    "loglik_grad",
    "hessian_diag",
    "sum_over_chunks",
]


class DensityChunk(NamedTuple):
    """The training data of one chunk of cells."""

    x: np.ndarray | None  # (c, D) cell states (landmark mode)
    phi: np.ndarray | None  # (c, m) rows of Lp (full mode)
    v: np.ndarray  # (c,) likelihood offsets V
    vd: np.ndarray  # (c,) likelihood constants Vd
    target: np.ndarray  # (c,) ridge target t = mle - mu


class Prior(NamedTuple):
    """Landmark-sized state shared by every chunk."""

    inducing: np.ndarray | None  # (m, D) landmarks; None for a full GP
    lp: np.ndarray  # (m, m) chol(K_UU + jitter I)
    ls: float


def _factor_rows(chunk: DensityChunk, prior: Prior) -> jax.Array:
    if chunk.phi is not None:
        return chunk.phi
    return dk.landmark_factor_block(chunk.x, prior.inducing, prior.lp, prior.ls)


def _numpy(parts: tuple) -> tuple:
    return tuple(np.asarray(p) for p in parts)


@with_x64
def gram_rhs(chunk: DensityChunk, prior: Prior) -> tuple:
    """``(L_c^T L_c, L_c^T t_c)`` of one chunk."""
    return _numpy(dk.chunk_gram_rhs(_factor_rows(chunk, prior), chunk.target))


@with_x64
def loglik_grad(chunk: DensityChunk, prior: Prior, w: np.ndarray, mu: float) -> tuple:
    """One chunk's log-likelihood sum and ``Phi_c^T (1 - e)`` at weights ``w = T z``."""
    if chunk.phi is not None:
        return _numpy(dk.chunk_loglik_grad(chunk.phi, w, mu, chunk.v, chunk.vd))
    return _numpy(dk.cells_loglik_grad(chunk.x, prior.inducing, prior.ls, w, mu, chunk.v, chunk.vd))


@with_x64
def hessian_diag(chunk: DensityChunk, prior: Prior, z: np.ndarray, mu: float) -> tuple:
    """``(L_c**2)^T exp(f_c + V_c)``: one chunk's part of the Laplace diagonal."""
    lc = _factor_rows(chunk, prior)
    return _numpy((dk.chunk_weighted_sq_colsum(lc, dk.chunk_intensity(lc, z, mu, chunk.v)),))


def add_in_order(parts: Iterable[tuple]) -> tuple:
    """Element-wise sum of tuples of arrays, added strictly in the given order."""
    total: list | None = None
    for part in parts:
        if total is None:
            total = [np.array(p, dtype=np.float64) for p in part]
        else:
            for i, p in enumerate(part):
                total[i] = total[i] + p
    if total is None:
        raise ValueError("nothing to sum: no chunks")
    return tuple(total)


class LocalChunks:
    """Sums per-chunk terms in this process, one chunk after another (memory ~ one chunk)."""

    def __init__(self, chunks: Sequence[DensityChunk]):
        self.chunks = list(chunks)

    def share(self, obj):
        """Make ``obj`` available to every chunk's term (here: itself)."""
        return obj

    def reduce(self, fn: Callable[..., tuple], *args) -> tuple:
        """``sum_c fn(chunk_c, *args)``."""
        return add_in_order(fn(chunk, *args) for chunk in self.chunks)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalChunks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reducer(chunks: Sequence[DensityChunk], name: str):
    """Where a fit sums its chunk terms: on the active dask cluster if there is one.

    The cluster is used when the ``fit_on_cluster`` option is on (default), there is more
    than one chunk, and a ``distributed.Client`` is active outside a worker task (a fit
    running inside a task, such as one sample of a fan-out, stays in its task).
    """
    if len(chunks) > 1 and get_options()["fit_on_cluster"]:
        from ..parallel.cluster import active_client

        client = active_client()
        if client is not None:
            from ..parallel.reduce import ClusterChunks

            return ClusterChunks(client, chunks, name)
    return LocalChunks(chunks)


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
