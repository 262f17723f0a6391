"""The function fit's per-chunk terms (SPEC §3.3, §3.5), summed over cell chunks by a reducer.

A chunk carries its cells and a :class:`RowBlock`, a handle on its rows of the targets
that reads them where the term runs: on a worker for zarr- or dask-backed expression, so
expression never passes through the client. (A fit in the cells' basis, chosen when a
condition has fewer cells than landmarks, sums nothing: it reads its ``c × G`` targets in
the fitting process, less than the ``M × G`` weights held there anyway.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._jax import with_x64
from ..kernels import function as fk
from ..kernels import posterior as post
from ._inputs import read_rows
from ._kept_projections import KeptProjections, project

__all__ = ["FunctionChunk", "FunctionPrior", "RowBlock", "reads_lazily", "projected_stats", "residual_cross"]


class RowBlock(NamedTuple):
    """Rows ``rows`` of a targets array (anything :func:`read_rows` reads), read on demand."""

    source: Any
    rows: slice

    def read(self) -> np.ndarray:
        return read_rows(self.source, self.rows)


def reads_lazily(y: Any) -> bool:
    """Whether ``y`` is a zarr or dask array that a worker can read chunks of by itself."""
    module = type(y).__module__
    return module.startswith("zarr") or module.startswith("dask")


class FunctionChunk(NamedTuple):
    """Cells ``x`` (c, D) and their rows of the targets."""

    x: np.ndarray
    y: RowBlock

    def targets(self) -> np.ndarray:
        return self.y.read()


class FunctionPrior(NamedTuple):
    """Landmark-sized state shared by every chunk."""

    inducing: np.ndarray
    lp: np.ndarray  # chol(K_UU + jitter I)
    ls: float
    mu: float


def _projection(x: np.ndarray, prior: FunctionPrior) -> np.ndarray:
    """``A_c = Lp⁻¹ K_Uc`` (M × c)."""
    return project(x, prior.inducing, prior.lp, prior.ls)


@with_x64
def projected_stats(chunk: FunctionChunk, prior: FunctionPrior, keep: KeptProjections | None = None) -> tuple:
    """``(A_c A_c^T, A_c (Y_c - mu))`` of one chunk, ``A_c = Lp^-1 K_Uc``.

    Projecting each chunk by a triangular solve first (rather than forming ``K_UX K_XU``
    and solving on both sides) keeps the conditioning of ``Lp`` from being squared.
    ``keep`` (in the fitting process only) receives ``A_c``'s columns for the predictions.
    """
    a = _projection(chunk.x, prior)
    if keep is not None:
        keep.add(chunk.x, a.T)
    return post.gram(a.T), a @ (chunk.targets() - prior.mu)


@with_x64
def residual_cross(
    chunk: FunctionChunk, prior: FunctionPrior, leverage_factor: np.ndarray, weights: np.ndarray
) -> tuple:
    """``A_c e2_c``: one chunk's projection of the HC3 squared residuals (§3.5)."""
    u, ls = prior.inducing, prior.ls
    h = fk.landmark_leverage(chunk.x, u, leverage_factor, ls)
    fitted = fk.predict_mean(chunk.x, u, weights, prior.mu, ls)
    e2 = np.asarray(fk.hc3_squared_residuals(chunk.targets(), fitted, h))
    return (_projection(chunk.x, prior) @ e2,)
