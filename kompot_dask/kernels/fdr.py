"""Gene-level FDR from null-gene Mahalanobis distances (SPEC §6.7, §10.10).

Pure numpy/scipy on 1-D arrays of real-gene distances ``D_g`` and null-gene distances:
the empirical p-value ``#{null >= D_g} / n_null``, and the Grenander-type local and
tail FDR from monotone (reflected-KDE + antitonic regression) densities of the null
and real distances on a 500-point grid, with a null proportion of 1 (conservative).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import gaussian_kde

__all__ = [
    "GRID_SIZE",
    "FDRArrays",
    "GrenanderFDR",
    "benjamini_hochberg",
    "compute_fdr_arrays",
    "empirical_pvalues",
    "grenander_fdr",
    "monotone_density",
    "pava_decreasing",
]

GRID_SIZE = 500
_GRID_STRETCH = 1.05
_EPS_FACTOR = 1e-10


class GrenanderFDR(NamedTuple):
    """Local and tail FDR of the real distances, with the grid quantities behind them.

    Attributes
    ----------
    local_fdr, tail_fdr : ndarray, shape (n_real,)
        FDRs interpolated at each real distance, in ``[0, 1]``.
    grid : ndarray, shape (500,)
        ``linspace(0, 1.05 * max(real, null), 500)``; empty in the degenerate case.
    f0, fmix : ndarray, shape (500,)
        Monotone densities of the null and of the real distances on ``grid``.
    local_fdr_grid, tail_fdr_grid : ndarray, shape (500,)
        Non-increasing FDRs on ``grid`` before interpolation.
    """

    local_fdr: np.ndarray
    tail_fdr: np.ndarray
    grid: np.ndarray
    f0: np.ndarray
    fmix: np.ndarray
    local_fdr_grid: np.ndarray
    tail_fdr_grid: np.ndarray


class FDRArrays(NamedTuple):
    """Per-gene columns aligned with the real distances (NaN statistics for failed
    genes); ``is_de`` is the boolean ``local_fdr < threshold``."""

    mahalanobis: np.ndarray
    pvalue: np.ndarray
    local_fdr: np.ndarray
    tail_fdr: np.ndarray
    is_de: np.ndarray


def empirical_pvalues(real: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Right-tail empirical p-values of ``real`` against the ``null`` sample.

    Parameters
    ----------
    real : ndarray, shape (n_real,)
        Distances of the genes to test (finite).
    null : ndarray, shape (n_null,)
        Null distances (finite, ``n_null >= 1``).

    Returns
    -------
    ndarray, shape (n_real,)
        ``p_g = #{null >= D_g} / n_null`` (ties count as ``>=``). Zeros (beyond every
        null) are replaced by the smallest non-zero p-value among the real genes, or by
        ``1 / n_null`` when every p-value is zero.
    """
    real = np.asarray(real, dtype=np.float64)
    null_sorted = np.sort(np.asarray(null, dtype=np.float64))
    n_null = null_sorted.size
    n_at_least = n_null - np.searchsorted(null_sorted, real, side="left")
    pvalues = n_at_least / n_null
    zero = pvalues == 0.0
    if zero.any():
        nonzero = pvalues[~zero]
        pvalues[zero] = nonzero.min() if nonzero.size else 1.0 / n_null
    return pvalues


def pava_decreasing(y: np.ndarray) -> np.ndarray:
    """Antitonic (non-increasing) least-squares fit with uniform weights.

    Pool-adjacent-violators: values are appended as blocks, and while the last block's
    mean exceeds the one before it the two merge, the mean updated incrementally
    (``m1 + (m2 - m1) * w2 / (w1 + w2)``) for numerical stability.

    Parameters
    ----------
    y : ndarray, shape (n,)

    Returns
    -------
    ndarray, shape (n,)
        The non-increasing sequence closest to ``y`` in squared error; each pooled
        block holds the mean of the values it covers.
    """
    y = np.asarray(y, dtype=np.float64)
    means: list[float] = []
    sizes: list[int] = []
    for value in y.tolist():
        mean, size = value, 1
        while means and means[-1] < mean:
            prev_mean, prev_size = means.pop(), sizes.pop()
            total = prev_size + size
            mean = prev_mean + (mean - prev_mean) * size / total
            size = total
        means.append(mean)
        sizes.append(size)
    return np.repeat(np.asarray(means, dtype=np.float64), sizes)


def _raw_density(sample: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Reflected Gaussian KDE ``2 * KDE_{-a, a}(t)``; a 500-bin histogram if it fails."""
    try:
        kde = gaussian_kde(np.concatenate([-sample, sample]), bw_method="scott")
        return 2.0 * kde(grid)
    except (np.linalg.LinAlgError, ValueError):
        counts, edges = np.histogram(sample, bins=GRID_SIZE, range=(0.0, grid[-1]), density=True)
        bins = np.clip(np.searchsorted(edges, grid, side="right") - 1, 0, GRID_SIZE - 1)
        return counts[bins]


def monotone_density(sample: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Non-increasing density of a non-negative ``sample`` on ``grid`` (starting at 0).

    Reflected Gaussian KDE (scipy ``gaussian_kde``, Scott bandwidth on the reflected
    sample ``{-a, a}``, doubled), made non-increasing by :func:`pava_decreasing`,
    clipped at 0 and normalised to unit trapezoid integral over ``grid``. If the KDE
    fails (e.g. a sample of zeros), a 500-bin histogram density replaces it.

    Parameters
    ----------
    sample : ndarray, shape (n,)
    grid : ndarray, shape (k,)
        Increasing evaluation points.

    Returns
    -------
    ndarray, shape (k,)
    """
    sample = np.asarray(sample, dtype=np.float64)
    density = np.maximum(pava_decreasing(_raw_density(sample, grid)), 0.0)
    area = np.trapezoid(density, grid)
    return density / area if area > 0 else density


def _monotone_ratio(num: np.ndarray, den: np.ndarray, eps: float) -> np.ndarray:
    """``num / den`` where ``den > eps`` (else 1), clipped to ``[0, 1]``, made non-increasing."""
    raw = np.ones_like(num)
    ok = den > eps
    raw[ok] = num[ok] / den[ok]
    return pava_decreasing(np.clip(raw, 0.0, 1.0))


def _at(values: np.ndarray, grid: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``curve`` at ``values``: 1 left of ``grid``, 0 right."""
    return np.clip(np.interp(values, grid, curve, left=1.0, right=0.0), 0.0, 1.0)


def grenander_fdr(real: np.ndarray, null: np.ndarray) -> GrenanderFDR:
    """Local and tail FDR of ``real`` distances against ``null`` distances (SPEC §6.7).

    Parameters
    ----------
    real : ndarray, shape (n_real,)
        Finite, non-negative distances of the genes to test.
    null : ndarray, shape (n_null,)
        Finite, non-negative null distances.

    Returns
    -------
    GrenanderFDR
        With fewer than 2 real or null values, or when every distance is 0, both FDRs
        are 1 and the grid arrays are empty.
    """
    real = np.asarray(real, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    top = max(real.max(initial=0.0), null.max(initial=0.0))
    if real.size < 2 or null.size < 2 or top <= 0.0:
        ones, empty = np.ones(real.size), np.empty(0)
        return GrenanderFDR(ones, ones.copy(), empty, empty, empty, empty, empty)

    grid = np.linspace(0.0, _GRID_STRETCH * top, GRID_SIZE)
    step = grid[1] - grid[0]
    f0 = monotone_density(null, grid)
    fmix = monotone_density(real, grid)
    eps = _EPS_FACTOR * fmix.max()

    local_grid = _monotone_ratio(f0, fmix, eps)
    s0 = step * np.cumsum(f0[::-1])[::-1]
    smix = step * np.cumsum(fmix[::-1])[::-1]
    tail_grid = _monotone_ratio(s0, smix, eps)
    return GrenanderFDR(
        local_fdr=_at(real, grid, local_grid),
        tail_fdr=_at(real, grid, tail_grid),
        grid=grid,
        f0=f0,
        fmix=fmix,
        local_fdr_grid=local_grid,
        tail_fdr_grid=tail_grid,
    )


def compute_fdr_arrays(real: np.ndarray, null: np.ndarray, threshold: float = 0.05) -> FDRArrays:
    """Empirical p-values, local/tail FDR and DE calls for the real genes (SPEC §6.7).

    Parameters
    ----------
    real : array_like, shape (n_real,)
        Mahalanobis distances of the real genes. NaN marks a failed gene: its p-value
        and FDRs are NaN, ``is_de`` is False, and it takes no part in the estimates.
    null : array_like, shape (n_null,)
        Mahalanobis distances of the null genes. NaN values are dropped; at least one
        finite value is required.
    threshold : float, default 0.05
        A gene is called DE when ``local_fdr < threshold``; must lie in ``(0, 1)``.

    Returns
    -------
    FDRArrays

    Raises
    ------
    ValueError
        If ``threshold`` is outside ``(0, 1)``, an input is not 1-D, or no finite null
        distance is given.
    """
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
        msg = f"threshold must lie strictly between 0 and 1, got {threshold!r}."
        raise ValueError(msg)
    real = np.asarray(real, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if real.ndim != 1 or null.ndim != 1:
        msg = f"real and null must be 1-D arrays, got shapes {real.shape} and {null.shape}."
        raise ValueError(msg)
    null = null[~np.isnan(null)]
    if null.size == 0:
        msg = (
            "The null distribution is empty (no finite null distances): compute the "
            "Mahalanobis distances of permuted null genes and pass them as `null`."
        )
        raise ValueError(msg)

    ok = ~np.isnan(real)
    pvalue = np.full(real.shape, np.nan)
    local_fdr = np.full(real.shape, np.nan)
    tail_fdr = np.full(real.shape, np.nan)
    if ok.any():
        pvalue[ok] = empirical_pvalues(real[ok], null)
        fdr = grenander_fdr(real[ok], null)
        local_fdr[ok] = fdr.local_fdr
        tail_fdr[ok] = fdr.tail_fdr
    is_de = np.zeros(real.shape, dtype=bool)
    is_de[ok] = local_fdr[ok] < threshold
    return FDRArrays(real.copy(), pvalue, local_fdr, tail_fdr, is_de)


def benjamini_hochberg(pvalues: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), optionally weighted (spatial FDR).

    Unweighted: ``q_(i) = min_{j >= i} p_(j) n / j`` over the p-values sorted
    increasingly. With ``weights`` (e.g. the inverse of each test's local density, so that
    every region of a map counts about equally, as Milo's spatial FDR) the rank ``j / n``
    becomes the weight fraction ``Σ_{k <= j} w_(k) / Σ w``: ``q_(i) = min_{j >= i}
    p_(j) Σ w / Σ_{k <= j} w_(k)``. Rejecting ``q <= alpha`` is the step-up procedure at
    level ``alpha``; equal weights give plain BH.

    Parameters
    ----------
    pvalues : array (n,)
        p-values in ``[0, 1]``; NaN is kept as NaN and takes no part.
    weights : array (n,), optional
        Positive finite weights (default all 1).

    Returns
    -------
    ndarray (n,)
        Adjusted p-values, clipped to ``[0, 1]``.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"`pvalues` must be 1-D; got shape {p.shape}")
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != p.shape:
        raise ValueError(f"`weights` must have the shape of `pvalues` {p.shape}; got {w.shape}")
    ok = ~np.isnan(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise ValueError("`pvalues` must lie in [0, 1]")
    if not np.all(np.isfinite(w[ok])) or np.any(w[ok] <= 0):
        raise ValueError("`weights` must be positive and finite")
    out = np.full(p.shape, np.nan)
    if not ok.any():
        return out
    pv, wv = p[ok], w[ok]
    order = np.argsort(pv, kind="stable")
    cum = np.cumsum(wv[order])
    adjusted = pv[order] * cum[-1] / cum
    adjusted = np.minimum.accumulate(adjusted[::-1])[::-1]
    res = np.empty_like(pv)
    res[order] = np.clip(adjusted, 0.0, 1.0)
    out[ok] = res
    return out
