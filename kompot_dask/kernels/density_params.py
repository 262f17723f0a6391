"""Scalars of a density model from nearest-neighbour distances (SPEC §1.5, §2.4).

Each function has two arithmetics. ``float32=False`` is exact float64. ``float32=True``
reproduces the reference (SPEC §10.15): its NN distances are float32, so ``ln r``,
``mle``, ``mu``, ``ls`` and the likelihood terms ``d ln r + c`` are float32 JAX
operations there (Python-float scalars do not promote them). Matching that brings the
loss and gradient at a given latent to ~1e-10 of the reference instead of ~1e-5.

The reference runs those operations one at a time. ``ln r``, the quantile and the mean are
JAX's here too; the products and sums of float32 arrays with scalars are numpy's, which
rounds each IEEE operation exactly as a lone XLA operation does (a scalar enters float32
rounded to nearest, as JAX converts a weak-typed one), with no compilation per number of
cells. They are not fused into one jitted function: XLA then contracts ``a * b + c`` into
a fused multiply-add and its results differ in the last bit.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

__all__ = [
    "log_ball_volume_constant",
    "nn_log_density_mle",
    "prior_mean",
    "length_scale",
    "likelihood_terms",
    "validate_nn_distances",
]


def log_ball_volume_constant(d: float) -> float:
    """``c = (d/2) ln(pi) - lnGamma(d/2 + 1)``: log volume of the unit d-ball."""
    return 0.5 * d * np.log(np.pi) - float(gammaln(0.5 * d + 1.0))


def _jnp_f32(nn: np.ndarray):
    import jax.numpy as jnp

    return jnp, jnp.asarray(np.asarray(nn, dtype=np.float32))


def _log_f32(nn: np.ndarray) -> np.ndarray:
    """``ln r`` of the float32 NN distances, a float32 JAX operation (as the reference's)."""
    jnp, r = _jnp_f32(nn)
    return np.asarray(jnp.log(r))


def _f32(scalar) -> np.float32:
    """A (weak-typed) scalar as it enters a float32 operation: rounded to nearest float32."""
    return np.float32(float(scalar))


def _scalar_constants(d: float) -> tuple[float, float, float]:
    """The float64 scalars of the float32 arithmetic, as the reference computes them:
    ``lnGamma(d/2+1) - (d/2) ln pi``, its negative ``c`` written the reference's way, ``ln d``."""
    import jax.numpy as jnp
    from jax.scipy.special import gammaln as jgammaln

    head = jgammaln(d / 2 + 1) - (d / 2) * jnp.log(jnp.pi)
    c = (d * jnp.log(jnp.pi) / 2) - jgammaln(d / 2 + 1)
    return float(head), float(c), float(jnp.log(d))


def nn_log_density_mle(nn: np.ndarray, d: float, float32: bool = False) -> np.ndarray:
    """``lnGamma(d/2 + 1) - (d/2) ln(pi) - d ln(nn_i)``: the per-cell MLE of log density."""
    d = float(d)
    if not float32:
        return -log_ball_volume_constant(d) - d * np.log(nn)
    head, _, _ = _scalar_constants(d)
    return (_f32(head) - _f32(d) * _log_f32(nn)).astype(np.float64)


def prior_mean(nn: np.ndarray, d: float, float32: bool = False) -> float:
    """``mu = Quantile_0.01(mle) - 10`` (linear interpolation)."""
    mle = nn_log_density_mle(nn, d, float32)
    if not float32:
        return float(np.quantile(mle, 0.01)) - 10.0
    import jax.numpy as jnp

    return float(jnp.quantile(jnp.asarray(mle.astype(np.float32)), 0.01)) - 10.0


def length_scale(nn: np.ndarray, ls_factor: float = 1.0, float32: bool = False) -> float:
    """``ls = ls_factor * exp(mean ln nn + 3)``."""
    if not float32:
        with np.errstate(divide="ignore"):
            return float(ls_factor * np.exp(np.mean(np.log(nn)) + 3.0))
    jnp, r = _jnp_f32(nn)
    return float(ls_factor) * float(jnp.exp(jnp.log(r).mean() + 3.0))


def likelihood_terms(nn: np.ndarray, d: float, float32: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``V_i = d ln r_i + c`` and ``Vd_i = ln d + (d-1) ln r_i + c`` of the NN likelihood."""
    d = float(d)
    if not float32:
        c = log_ball_volume_constant(d)
        log_r = np.log(nn)
        return d * log_r + c, np.log(d) + (d - 1.0) * log_r + c
    _, c, log_d = _scalar_constants(d)
    log_r = _log_f32(nn)
    v = log_r * _f32(d) + _f32(c)
    vd = (_f32(log_d) + _f32(d - 1) * log_r) + _f32(c)
    return v.astype(np.float64), vd.astype(np.float64)


def validate_nn_distances(nn: np.ndarray) -> np.ndarray:
    """Replace non-finite or non-positive NN distances by the smallest positive one.

    This is what the reference density estimator does for duplicated cells (SPEC §1.3).
    """
    nn = np.asarray(nn, dtype=np.float64)
    bad = ~np.isfinite(nn) | (nn <= 0)
    if not bad.any():
        return nn
    if bad.all():
        msg = (
            "every nearest-neighbour distance is zero or not finite (all cells identical?); "
            "a density cannot be estimated: remove duplicated cells or pass distinct cell states"
        )
        raise ValueError(msg)
    out = nn.copy()
    out[bad] = nn[~bad].min()
    return out
