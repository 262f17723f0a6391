"""Replicate-aware null for the gene-level DE call: relabelling samples between conditions.

With ``S1`` samples in condition 1 and ``S2`` in condition 2, a *relabelling* assigns
``S1`` of the ``S1 + S2`` samples to a pseudo-condition 1 and the others to a
pseudo-condition 2. Under the null hypothesis that the conditions do not differ beyond
their replicates, the samples are exchangeable, so each gene's Mahalanobis distance
between the real conditions is distributed like the distances between pseudo-conditions.
The distances of every non-identity relabelling, pooled over genes, give an empirical
null; a gene's p-value is ``(1 + #{null >= D_g}) / (1 + n_null)`` (or, with
``tail="gpd"``, a generalised-Pareto fit beyond the null's top 10 %) and the call is
Benjamini–Hochberg at the FDR threshold.

Cost: with shared landmarks the function GP of a condition is fitted from two sums over
its cells, ``A Aᵀ`` (M × M) and ``A (Y − mu)`` (M × G), ``A = Lp⁻¹ K_UX``. Both are sums
over samples, so they are computed once per sample (one pass over the cells, like one
fit), and each relabelling only adds up samples' sums and does landmark-sized algebra:
one M × M Cholesky per pseudo-condition, the weights (``O(M² G)``), the posterior
covariance at the evaluation points (``O(M³)``), and the Mahalanobis distances
(``O(M² G S)`` with sample variance, the Woodbury form). The per-sample GP means of the
sample variance come from the same per-sample sums (the model's per-sample fits use the
same landmarks, length scale and noise), so nothing is refitted. When each pseudo-condition has
fewer cells than there are landmarks (Kompot's 5,000 landmarks on up to 5,000 cells), the
same fits run in the cells' basis instead (:mod:`._relabel_cells`: a cell-sized Cholesky per
pseudo-condition, ``c² p + p² c`` for its covariance), whichever takes fewer operations.
The real labelling goes through the same code and reproduces the model's own distances
(tests: 1e-8). The sums
and the distances run as dask tasks over (cell chunk × gene batch) blocks, on the
cluster when there is one (:mod:`._relabel_graph`).

*Balancing* (``balance=K``): abundance changes move a condition's GP mean even where
expression does not change, because the smoother averages over where that condition's
cells are (with Kompot's length scale, over much of the map). Weighting each sample's
cells so that its distribution over ``K`` regions of the map is the pooled one removes
that part of the difference; the weights do not depend on the labelling, so the
relabelling null stays exchangeable. The distances are then those of the weighted fits,
not Kompot's.

Here: when the null can run (the switch), the relabellings, the balancing weights and the
p-values and calls from the distances; everything reads the fitted model's state and
changes nothing in it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np

from ._calls import bh_call

__all__ = [
    "ReplicateNull",
    "SampleUnits",
    "balance_weights",
    "check_switch",
    "off_reason",
    "on_shared_landmarks",
    "resolve_switch",
    "pooled_pvalues",
    "relabellings",
    "replicate_fdr",
    "tail_pvalues",
    "sample_units",
]

#: Upper bound on relabellings enumerated exhaustively (more are drawn at random).
MAX_ENUMERATED = 200_000


class SampleUnits(NamedTuple):
    """The samples of both conditions, in order ``[condition 1 ...; condition 2 ...]``."""

    condition: np.ndarray  # (S,) 1 or 2
    label: list  # (S,) the sample label within its condition
    rows: list  # (S,) row indices of the sample's cells in its condition's arrays


class ReplicateNull(NamedTuple):
    """Distances of the real labelling and of the null relabellings.

    Attributes
    ----------
    observed : ndarray (G,)
        Distances between the real conditions (same as the model's, recomputed).
    null : ndarray (R, G_null)
        Distances of the ``R`` non-identity relabellings for the null genes ``null_genes``.
    null_genes : ndarray (G_null,)
        Genes whose relabelled distances make the null pool.
    assignments : ndarray of bool (R, S)
        Which samples each relabelling puts into pseudo-condition 2.
    units : SampleUnits
    """

    observed: np.ndarray
    null: np.ndarray
    null_genes: np.ndarray
    assignments: np.ndarray
    units: SampleUnits


# ---------------------------------------------------------------------- the switch
def check_switch(value: Any) -> bool | None:
    """``replicate_null`` as given: None (on when the fit allows it), True or False."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    raise TypeError(f"`replicate_null` must be None (on when there are sample labels), True or False; got {value!r}")


def off_reason(labels1: Any, labels2: Any, shared_landmarks: bool, own_sample_ls: bool) -> tuple[str, str] | None:
    """Why a fit cannot have the replicate null, and the fix; None when it can.

    Parameters
    ----------
    labels1, labels2 : array or None
        Sample labels of each condition's cells.
    shared_landmarks : bool
        Both conditions' expression GPs are landmark fits on the same landmarks.
    own_sample_ls : bool
        The per-sample models get a length scale of their own (``sample_estimator_ls``).
    """
    if labels1 is None or labels2 is None:
        return ("the fit has no sample labels for both conditions",
                "pass `condition1_sample_indices` and `condition2_sample_indices` to `fit` (`sample_col=` in "
                "`fit_from` and `de()`)")
    s1, s2 = len(np.unique(labels1)), len(np.unique(labels2))
    if s1 + s2 < 3:
        return (f"{s1} + {s2} samples allow no relabelling besides the real one",
                "it needs at least 3 samples in all (e.g. 2 + 1)")
    if not shared_landmarks:
        return ("the conditions are not fitted on shared landmarks",
                "pass `n_landmarks` or `landmarks` (a full GP or injected predictors have no per-sample sums)")
    if own_sample_ls:
        return ("the per-sample models have a length scale of their own (`sample_estimator_ls`)",
                "leave `sample_estimator_ls` unset (the null rebuilds them on the main length scale)")
    return None


def on_shared_landmarks(predictor1: Any, predictor2: Any) -> bool:
    """Both predictors are landmark-mode fits on the same landmarks and length scale."""
    states = [getattr(p, "state", None) for p in (predictor1, predictor2)]
    if any(st is None or not getattr(st, "landmark_mode", False) for st in states):
        return False
    a, b = (np.asarray(st.inducing) for st in states)
    return a.shape == b.shape and np.allclose(a, b) and float(states[0].ls) == float(states[1].ls)


def resolve_switch(requested: bool | None, reason: tuple[str, str] | None) -> tuple[bool, str | None]:
    """``(on, why_off)`` for ``replicate_null=requested``; ``True`` that cannot run raises."""
    if requested is False:
        return False, "replicate_null=False"
    if reason is None:
        return True, None
    if requested:
        raise ValueError(f"`replicate_null=True` cannot run: {reason[0]}; {reason[1]}")
    return False, reason[0]


# ----------------------------------------------------------------------- relabellings
def relabellings(n1: int, n2: int, max_relabellings: int | None = None, seed: int = 0) -> np.ndarray:
    """Non-identity relabellings of ``n1 + n2`` samples into groups of ``n1`` and ``n2``.

    Samples are numbered ``0 .. n1-1`` (condition 1) and ``n1 .. n1+n2-1`` (condition 2).
    A relabelling is a boolean row over the samples, True for pseudo-condition 2. When
    ``n1 == n2`` a relabelling and its mirror image (the groups swapped) give the same
    distances, so only the one that keeps sample 0 in pseudo-condition 1 is listed.

    Parameters
    ----------
    n1, n2 : int
        Samples per condition (each >= 1).
    max_relabellings : int, optional
        Keep at most this many, drawn without replacement (seeded) when there are more.
    seed : int
        Seed of that draw.

    Returns
    -------
    ndarray of bool, shape (R, n1 + n2)
        In lexicographic order of the samples assigned to pseudo-condition 1 (the draw
        keeps that order). ``R = C(n1+n2, n1) - 1`` (halved, ``C(2n, n)/2 - 1``, if
        ``n1 == n2``) before the cap.
    """
    n1, n2 = int(n1), int(n2)
    if n1 < 1 or n2 < 1:
        raise ValueError(f"relabelling needs at least one sample per condition; got {n1} and {n2}")
    total = math.comb(n1 + n2, n1)
    if total > MAX_ENUMERATED:
        return _random_relabellings(n1, n2, max_relabellings or 1000, seed)
    s = n1 + n2
    rows = []
    for group1 in itertools.combinations(range(s), n1):
        if group1 == tuple(range(n1)):
            continue  # the identity
        if n1 == n2 and 0 not in group1:
            continue  # the mirror of one already listed
        row = np.ones(s, dtype=bool)
        row[list(group1)] = False
        rows.append(row)
    out = np.array(rows, dtype=bool).reshape(-1, s)
    if max_relabellings is not None and len(out) > max_relabellings:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), size=int(max_relabellings), replace=False))
        out = out[keep]
    return out


def _random_relabellings(n1: int, n2: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct random non-identity relabellings (too many to enumerate)."""
    rng = np.random.default_rng(seed)
    s = n1 + n2
    seen, rows = set(), []
    identity = tuple(range(n1))
    while len(rows) < count:
        group1 = tuple(sorted(rng.choice(s, size=n1, replace=False).tolist()))
        if n1 == n2 and 0 not in group1:
            group1 = tuple(sorted(set(range(s)) - set(group1)))
        if group1 == identity or group1 in seen:
            continue
        seen.add(group1)
        row = np.ones(s, dtype=bool)
        row[list(group1)] = False
        rows.append(row)
    order = np.lexsort(np.array(rows).T[::-1])
    return np.array(rows)[order]


def pooled_pvalues(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Permutation p-values ``(1 + #{null >= d}) / (1 + n_null)`` against a pooled null.

    Parameters
    ----------
    observed : array (G,)
        Statistics to test (larger = more extreme); NaN stays NaN.
    null : array (...)
        Null statistics of any shape, pooled; NaN values are dropped.

    Returns
    -------
    ndarray (G,)
        Valid p-values in ``(0, 1]`` (ties count as at least as extreme).
    """
    observed = np.asarray(observed, dtype=np.float64)
    pool = np.sort(np.asarray(null, dtype=np.float64).ravel())
    pool = pool[~np.isnan(pool)]
    if pool.size == 0:
        raise ValueError("the null pool is empty (no finite null statistics)")
    at_least = pool.size - np.searchsorted(pool, observed, side="left")
    p = (1.0 + at_least) / (1.0 + pool.size)
    return np.where(np.isnan(observed), np.nan, p)


def tail_pvalues(observed: np.ndarray, null: np.ndarray, tail_fraction: float = 0.1,
                 min_exceedances: int = 200) -> np.ndarray:
    """Pooled p-values whose far tail is a generalised Pareto fit to the null's top.

    Empirical p-values cannot fall below ``1 / (1 + n_null)``: with few relabellings
    (10 splits of 3 + 3 samples) that floor stops Benjamini–Hochberg from calling anything
    but a crowd of genes beyond the whole null. Above the null's ``1 − tail_fraction``
    quantile ``u`` the survival function is taken as ``(n_u / n) · GPD(d − u)`` with the
    shape and scale fitted by maximum likelihood to the ``n_u`` exceedances (the
    peaks-over-threshold estimate of a permutation tail); below ``u`` the empirical
    p-value is kept. With fewer than ``min_exceedances`` exceedances (a pool under 2,000
    null distances by default: the fit of a short tail is too noisy to extrapolate), or a
    failed fit, the empirical p-values are returned unchanged.
    """
    import scipy.stats

    p = pooled_pvalues(observed, null)
    pool = np.asarray(null, dtype=np.float64).ravel()
    pool = pool[~np.isnan(pool)]
    u = float(np.quantile(pool, 1.0 - tail_fraction))
    exc = pool[pool > u] - u
    if exc.size < min_exceedances or not np.any(exc > 0):
        return p
    try:
        shape, _, scale = scipy.stats.genpareto.fit(exc, floc=0.0)
    except (RuntimeError, ValueError, FloatingPointError):
        return p
    if not (np.isfinite(shape) and np.isfinite(scale) and scale > 0):
        return p
    obs = np.asarray(observed, dtype=np.float64)
    tail = ~np.isnan(obs) & (obs > u)
    out = p.copy()
    out[tail] = (exc.size / pool.size) * scipy.stats.genpareto.sf(obs[tail] - u, shape, 0.0, scale)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- samples
def sample_units(labels1: np.ndarray, labels2: np.ndarray) -> SampleUnits:
    """One unit per distinct label of each condition (sorted, as the variance estimator)."""
    cond, lab, rows = [], [], []
    for c, labels in ((1, labels1), (2, labels2)):
        if labels is None:
            raise ValueError(f"the replicate null needs the sample labels of both conditions; condition {c} has none")
        for g in np.unique(labels):
            cond.append(c)
            lab.append(g)
            rows.append(np.flatnonzero(labels == g))
    return SampleUnits(np.array(cond), lab, rows)


def balance_weights(units: "SampleUnits", condition_x: tuple, landmarks: np.ndarray,
                    n_regions: int, seed: int = 0, cap: float = 10.0) -> list:
    """Per-cell weights that give every sample the cell distribution of all samples pooled.

    The state map is cut into ``n_regions`` regions (k-means of the landmarks; a cell
    belongs to the region of its nearest landmark). A cell of sample ``s`` in region
    ``r`` gets ``ω = (n_r / N) / (n_sr / N_s)``, clipped to ``[1/cap, cap]``, so that the
    weighted cells of every sample are spread over the regions as the pooled cells are
    (and weigh ``N_s`` in all, up to the regions a sample misses). The weights do not
    depend on which condition a sample belongs to, so every relabelling sees the same
    balanced samples.

    Returns
    -------
    list of ndarray
        One weight vector per unit (aligned with ``units.rows``).
    """
    from scipy.cluster.vq import kmeans2
    from scipy.spatial import cKDTree

    landmarks = np.asarray(landmarks, dtype=np.float64)
    k = int(min(n_regions, len(landmarks)))
    if k < len(landmarks):
        _, lm_region = kmeans2(landmarks, k, minit="++", seed=seed)
    else:
        lm_region = np.arange(len(landmarks))
    tree = cKDTree(landmarks)
    regions = []
    for c, rows in zip(units.condition, units.rows):
        regions.append(lm_region[tree.query(condition_x[c - 1][rows])[1]])
    pooled = np.bincount(np.concatenate(regions), minlength=k).astype(np.float64)
    pooled /= pooled.sum()
    out = []
    for reg in regions:
        own = np.bincount(reg, minlength=k).astype(np.float64)
        frac = own / own.sum()
        ratio = np.divide(pooled, frac, out=np.ones(k), where=frac > 0)
        out.append(np.clip(ratio[reg], 1.0 / cap, cap))
    return out


def replicate_fdr(result: ReplicateNull, threshold: float, tail: str = "empirical") -> dict:
    """p-values, BH q-values and calls of the observed distances against the pooled null.

    ``tail="empirical"``: :func:`pooled_pvalues`; ``"gpd"``: :func:`tail_pvalues`.
    """
    if tail not in ("empirical", "gpd"):
        raise ValueError(f"`tail` must be 'empirical' or 'gpd'; got {tail!r}")
    p = (pooled_pvalues if tail == "empirical" else tail_pvalues)(result.observed, result.null)
    q, is_de = bh_call(p, threshold)
    return {"pvalue": p, "fdr": q, "is_de": is_de}
