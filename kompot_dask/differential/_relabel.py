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
same landmarks, length scale and noise), so nothing is refitted. The real labelling goes
through the same code and reproduces the model's own distances (tests: 1e-8).

*Balancing* (``balance=K``): abundance changes move a condition's GP mean even where
expression does not change, because the smoother averages over where that condition's
cells are (with Kompot's length scale, over much of the map). Weighting each sample's
cells so that its distribution over ``K`` regions of the map is the pooled one removes
that part of the difference; the weights do not depend on the labelling, so the
relabelling null stays exchangeable. The distances are then those of the weighted fits,
not Kompot's.

Everything here is numpy/scipy on landmark-sized arrays plus one kernel (``matern52``);
it reads the fitted model's state but changes nothing in it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg

from .._jax import with_x64
from ..estimators._inputs import read_rows, take_rows
from ..kernels import mahalanobis as mk
from ..kernels.covariance import matern52
from ..kernels.fdr import benjamini_hochberg

__all__ = [
    "ReplicateNull",
    "SampleUnits",
    "balance_weights",
    "pooled_pvalues",
    "relabellings",
    "replicate_fdr",
    "tail_pvalues",
    "sample_units",
    "replicate_null_distances",
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


class _LandmarkGP(NamedTuple):
    """What the DTC fit of a condition needs besides the sums over its cells."""

    inducing: np.ndarray  # (M, D)
    lp: np.ndarray  # chol(K_UU + jitter I)
    ls: float
    mu: float
    noise: float  # max(sigma², jitter)
    jitter: float


def _solve_l(lower, b, trans=False):
    return scipy.linalg.solve_triangular(lower, b, lower=True, trans="T" if trans else "N", check_finite=False)


@with_x64
def _sample_sums(gp: _LandmarkGP, x: np.ndarray, y: Any, rows: np.ndarray, genes: np.ndarray | None,
                 weights: np.ndarray | None = None, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(A W Aᵀ, A W (Y − mu))`` over the cells ``rows`` of one sample, chunk by chunk.

    ``W`` = diag(``weights``) (default the identity): a cell of weight ω counts as an
    observation with noise variance σ²/ω.
    """
    m = len(gp.inducing)
    aat = np.zeros((m, m))
    a_r = None
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        k = np.asarray(matern52(gp.inducing, x[r], gp.ls), dtype=np.float64)
        a = _solve_l(gp.lp, k)
        yr = read_rows(take_rows(y, r), slice(None))
        if genes is not None:
            yr = yr[:, genes]
        if weights is None:
            aat += a @ a.T
            part = a @ (yr - gp.mu)
        else:
            aw = a * weights[start:start + chunk]
            aat += aw @ a.T
            part = aw @ (yr - gp.mu)
        a_r = part if a_r is None else a_r + part
    return aat, a_r


@with_x64
def _point_terms(gp: _LandmarkGP, points: np.ndarray):
    """``K_PU``, the prior part ``K_PP − A_Pᵀ A_P`` and ``A_P = Lp⁻¹ K_UP`` at the points.

    At the landmarks themselves ``K_UU = Lp Lpᵀ − jI`` gives ``A = Lpᵀ − j Lp⁻¹`` and
    ``K_UU − AᵀA = jI − DᵀD`` with ``D = j Lp⁻¹`` exactly, which avoids the cancellation
    of two order-one matrices (their difference is of the order of the jitter).
    """
    k_pu = np.asarray(matern52(points, gp.inducing, gp.ls), dtype=np.float64)
    if points.shape == gp.inducing.shape and np.array_equal(points, gp.inducing):
        m = len(points)
        d = gp.jitter * _solve_l(gp.lp, np.eye(m))
        a_p = gp.lp.T - d
        prior = gp.jitter * np.eye(m) - d.T @ d
        return k_pu, prior, a_p
    a_p = _solve_l(gp.lp, k_pu.T)
    k_pp = np.asarray(matern52(points, points, gp.ls), dtype=np.float64)
    return k_pu, k_pp - a_p.T @ a_p, a_p


class _Condition(NamedTuple):
    mean: np.ndarray  # (p, G) posterior mean at the evaluation points
    cov: np.ndarray  # (p, p) latent posterior covariance there


def _condition_at(gp: _LandmarkGP, aat: np.ndarray, a_r: np.ndarray, k_pu: np.ndarray, prior: np.ndarray,
                  a_p: np.ndarray) -> _Condition:
    """Posterior mean and covariance at the evaluation points of the DTC fit with these sums."""
    m = len(aat)
    lb = np.linalg.cholesky(np.eye(m) + aat / gp.noise)
    w = _solve_l(gp.lp, _solve_l(lb, _solve_l(lb, a_r / gp.noise), trans=True), trans=True)
    c = _solve_l(lb, a_p)
    cov = prior + c.T @ c
    return _Condition(gp.mu + k_pu @ w, cov)


def _landmark_gp(predictor: Any, kwargs: dict) -> _LandmarkGP:
    state = getattr(predictor, "state", None)
    if state is None or getattr(state, "lb", None) is None:
        msg = ("the replicate null needs landmark-mode expression models (pass `n_landmarks` or `landmarks` "
               "to DifferentialExpression); a full GP or an injected predictor has no per-sample sums")
        raise ValueError(msg)
    sigma = float(kwargs.get("sigma", 0.0))
    jitter = float(kwargs.get("jitter", 1e-6))
    return _LandmarkGP(np.asarray(state.inducing), np.asarray(state.lp), float(state.ls), float(state.mu),
                       max(sigma ** 2, jitter), jitter)


def _factor(means: list) -> np.ndarray | None:
    """Centred sample means over ``sqrt(S − 1)``, (p, S, G); None with fewer than 2."""
    means = [m for m in means if m is not None]
    if len(means) < 2:
        return None
    return mk.sample_variance_factor(np.stack(means))


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


@with_x64
def replicate_null_distances(
    predictors: tuple[Any, Any],
    data: tuple,
    kwargs: dict,
    points: np.ndarray,
    eps: float,
    n_genes: int,
    sample_variance: bool = True,
    max_relabellings: int | None = None,
    null_gene_count: int | None = None,
    seed: int = 0,
    point_index: np.ndarray | None = None,
    balance: int | None = None,
) -> ReplicateNull:
    """Mahalanobis distances of the real labelling and of every relabelling of the samples.

    Parameters
    ----------
    predictors : (predictor1, predictor2)
        The fitted landmark-mode function predictors (both on the same landmarks).
    data : (x1, y1, labels1, x2, y2, labels2)
        The training cells, expression (real genes only) and sample labels.
    kwargs : dict
        The function estimator's settings (``sigma``, ``jitter``).
    points : array (p, D)
        Evaluation points of the distance.
    eps : float
        Jitter of the distance (the model's ``eps``).
    n_genes : int
        Real genes.
    sample_variance : bool, default True
        Add the replicate covariance of each (pseudo-)condition, from per-sample GP means
        on the same landmarks and length scale (as the model's sample variance).
    max_relabellings : int, optional
        Cap on the relabellings (seeded draw).
    null_gene_count : int, optional
        Genes (a seeded random subset) whose relabelled distances make the null pool
        (default all genes).
    seed : int
        Seed of both draws.
    point_index : array of int, optional
        Evaluate the distance at these rows of ``points`` only (the GPs are still
        conditioned at all of them; the covariance there is the sub-block).
    balance : int, optional
        Weight each sample's cells to the pooled distribution over this many regions
        (:func:`balance_weights`) before fitting: removes the part of the mean difference
        that comes from where the conditions' cells are (abundance changes) rather than
        from expression. None: the model's own (unweighted) fit.

    Returns
    -------
    ReplicateNull
    """
    x1, y1, labels1, x2, y2, labels2 = data
    units = sample_units(labels1, labels2)
    s1 = int(np.sum(units.condition == 1))
    s2 = len(units.condition) - s1
    assignments = relabellings(s1, s2, max_relabellings, seed)
    if len(assignments) == 0:
        raise ValueError(f"{s1} + {s2} samples allow no relabelling besides the real one; the replicate null "
                         "needs at least 3 samples in all (e.g. 2 + 1)")
    gp = _landmark_gp(predictors[0], kwargs)
    gp2 = _landmark_gp(predictors[1], kwargs)
    if gp2.inducing.shape != gp.inducing.shape or not np.allclose(gp2.inducing, gp.inducing) or gp2.ls != gp.ls:
        raise ValueError("the replicate null needs both conditions on the same landmarks and length scale")
    if null_gene_count is None or null_gene_count >= n_genes:
        null_genes = np.arange(n_genes)
    else:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        null_genes = np.sort(rng.choice(n_genes, size=int(null_gene_count), replace=False))

    points = np.asarray(points, dtype=np.float64)
    k_pu, prior, a_p = _point_terms(gp, points)
    xs, ys = (x1, x2), (y1, y2)
    weights = (balance_weights(units, xs, gp.inducing, int(balance), seed) if balance
               else [None] * len(units.rows))
    sums = [_sample_sums(gp, xs[c - 1], ys[c - 1], rows, None, w)
            for c, rows, w in zip(units.condition, units.rows, weights)]
    # each sample's own GP mean (the per-sample models of the sample variance), (p, G)
    means = ([_condition_at(gp, aat, a_r, k_pu, prior, a_p).mean if len(rows) >= 2 else None
              for (aat, a_r), rows in zip(sums, units.rows)] if sample_variance else None)

    def distances(in2: np.ndarray, genes: np.ndarray | None) -> np.ndarray:
        conds = []
        for member in (~in2, in2):
            idx = np.flatnonzero(member)
            aat = sum(sums[i][0] for i in idx)
            a_r = sum(sums[i][1] for i in idx)
            if genes is not None:
                a_r = a_r[:, genes]
            conds.append(_condition_at(gp, aat, a_r, k_pu, prior, a_p))
        delta = conds[1].mean - conds[0].mean
        sigma = conds[0].cov + conds[1].cov
        if point_index is not None:
            delta, sigma = delta[point_index], sigma[np.ix_(point_index, point_index)]
        q = None
        if means is not None:
            parts = []
            for member in (~in2, in2):
                sel = [means[i] if genes is None or means[i] is None else means[i][:, genes]
                       for i in np.flatnonzero(member)]
                f = _factor(sel)
                if f is not None:
                    parts.append(f)
            q = mk.concat_factors(*parts) if parts else None
            if q is not None and point_index is not None:
                q = q[point_index]
        return mk.mahalanobis_distances(delta, sigma, eps, q=q).distances

    identity = np.asarray(units.condition == 2)
    observed = distances(identity, None)
    sub = None if len(null_genes) == n_genes else null_genes
    null = np.stack([distances(row, sub) for row in assignments])
    return ReplicateNull(observed, null, null_genes, assignments, units)


def replicate_fdr(result: ReplicateNull, threshold: float, tail: str = "empirical") -> dict:
    """p-values, BH q-values and calls of the observed distances against the pooled null.

    ``tail="empirical"``: :func:`pooled_pvalues`; ``"gpd"``: :func:`tail_pvalues`.
    """
    if tail not in ("empirical", "gpd"):
        raise ValueError(f"`tail` must be 'empirical' or 'gpd'; got {tail!r}")
    p = (pooled_pvalues if tail == "empirical" else tail_pvalues)(result.observed, result.null)
    q = benjamini_hochberg(p)
    is_de = np.zeros(p.shape, dtype=bool)
    ok = ~np.isnan(q)
    is_de[ok] = q[ok] <= threshold
    return {"pvalue": p, "fdr": q, "is_de": is_de}
