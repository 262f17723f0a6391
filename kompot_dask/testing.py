"""Synthetic two-condition atlases with known answers, for examples, tests and benchmarks.

- :func:`simulate_atlas`: a realistic atlas (branching curved manifold, replicate samples,
  negative-binomial counts) with known DA regions and DE genes, or a null variant;
- :func:`atlas_anndata`: the same as an :class:`anndata.AnnData`;
- :func:`write_atlas_zarr`: a large one written to an AnnData-zarr store chunk by chunk;
- :func:`condition_arrays`: an atlas split into the two conditions' arrays and sample labels;
- :func:`auroc`: area under the ROC curve, to score recovery of the truth;
- :func:`two_conditions`: the older, simpler clusters generator.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

__all__ = [
    "Atlas", "ConditionArrays", "TwoConditions", "atlas_anndata", "auroc", "condition_arrays", "simulate_atlas",
    "two_conditions", "write_atlas_zarr",
]


class TwoConditions(NamedTuple):
    """Cells, expression and sample labels of two conditions, with the generator's truth."""

    x1: np.ndarray  # (n1, D) cell states
    x2: np.ndarray
    y1: np.ndarray  # (n1, G) log expression
    y2: np.ndarray
    samples1: np.ndarray  # (n1,) sample labels "c1-s0", ...
    samples2: np.ndarray
    cluster1: np.ndarray  # (n1,) generating cluster
    cluster2: np.ndarray
    de_genes: np.ndarray  # (G,) bool: expression changes in cluster 0 of condition 2


def two_conditions(
    n_cells: int = 2000, n_genes: int = 40, n_samples: int = 3, dims: int = 3, seed: int = 0
) -> TwoConditions:
    """Generate curved clusters in ``dims`` dimensions for two conditions.

    Condition 2 moves weight from cluster 0 to cluster 2 (differential abundance) and
    raises the first quarter of the genes in cluster 0 (differential expression). Each
    sample scales the cluster weights and shifts expression slightly (replicate noise).

    Parameters
    ----------
    n_cells : int
        Cells over both conditions (split evenly).
    n_genes, n_samples, dims : int
        Genes, samples per condition and cell-state dimensions (``dims >= 2``).
    seed : int
        Seed of numpy's ``default_rng``.
    """
    if dims < 2:
        raise ValueError(f"`dims` must be >= 2; got {dims}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(3, dims))
    axes = rng.normal(size=(3, dims))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    weights = {1: np.array([0.6, 0.3, 0.1]), 2: np.array([0.1, 0.3, 0.6])}
    programs = rng.normal(scale=0.5, size=(dims, n_genes))
    de = np.zeros(n_genes, dtype=bool)
    de[: max(1, n_genes // 4)] = True
    per_condition = {}
    for cond in (1, 2):
        n = n_cells // 2 if cond == 1 else n_cells - n_cells // 2
        sample = rng.integers(n_samples, size=n)
        w = weights[cond] * np.exp(rng.normal(scale=0.15, size=(n_samples, 3)))
        w /= w.sum(axis=1, keepdims=True)
        cluster = np.array([rng.choice(3, p=w[s]) for s in sample])
        t = rng.uniform(-1.0, 1.0, size=n)
        bend = np.roll(axes[cluster], 1, axis=1) * (1.0 - t**2)[:, None] * 2.0
        x = centres[cluster] + 6.0 * t[:, None] * axes[cluster] + bend + rng.normal(scale=0.4, size=(n, dims))
        offset = rng.normal(scale=0.1, size=(n_samples, n_genes))[sample]
        lift = (cond == 2) * (cluster == 0)[:, None] * de * 1.2
        rate = np.exp(0.3 + np.tanh(x / 8.0) @ programs + offset + lift)
        y = np.log1p(rng.poisson(rate)).astype(np.float64)
        labels = np.array([f"c{cond}-s{s}" for s in sample])
        per_condition[cond] = (x, y, labels, cluster)
    (x1, y1, s1, k1), (x2, y2, s2, k2) = per_condition[1], per_condition[2]
    return TwoConditions(x1, x2, y1, y2, s1, s2, k1, k2, de)


# ============================================================================ simulate_atlas
#
# Generative model (all lengths in the units of the cell states, a branch is ~1 long):
#
# * Manifold: a tree of four curved branches in ``dims`` dimensions (a trunk, two arms
#   from its tip, a side arm half-way up one of them). Branch k at latent position
#   t in [0, 1] sits at p_k(t) = start_k + L_k (t d_k + kappa_k t^2 e_k + omega_k sin(pi t) f_k)
#   (d, e, f orthonormal-ish directions), cells at x = p + N(0, sigma^2 I). A second copy of
#   the tree drawn in the plane gives the 2-D layout.
# * Abundance: a base density along the branches (per unit arc length, times a smooth
#   random tilt exp(b(p))), per sample a smooth random log-density tilt h_s(p) (sd
#   ``replicate_sd_abundance`` over the manifold); condition 1 (control) has density
#   ~ base exp(-f/2 + h_s), condition 2 (treated) ~ base exp(+f/2 + h_s), where f is the
#   true log fold change: plateaus of +da_strength (two regions) and -a_down (two regions)
#   with a_down ~ da_strength solved so that both conditions' densities integrate to the
#   same total; the normalised density ratio is then exactly exp(f), zero outside.
# * Expression: log rate = baseline_g + sum_m loading_gm programme_m(p) + offset_{s,g}
#   (+ a plateau effect of +-de_strength around the gene's own centre, treated cells, DE
#   genes only); counts ~ gamma-Poisson (negative binomial, inverse dispersion theta_g);
#   y = log1p(counts).
# * Randomness: manifold/sample parameters from SeedSequence(seed, spawn_key=(0,)), gene
#   parameters from (1,), cells of draw block b (``_BLOCK`` cells) from (2, b) and their
#   counts from (3, b): values never depend on how the cells are chunked, cell states do
#   not depend on the number of genes, and the null and signal variants share all draws.

_BLOCK = 2048  # cells per block of random draws (part of the generator's definition)
_GRID = 1024  # grid points per branch (sampling and integrals over the manifold)
_PARENTS = ((-1, 0.0), (0, 1.0), (0, 1.0), (2, 0.6))  # (parent branch, attach position)
_CONDITIONS = ("control", "treated")
_NOISE_SD = 0.03  # isotropic noise of cell states around the manifold
_DA_RADII = (0.10, 0.22)  # plateau radius, zero beyond
_DE_RADII = (0.12, 0.30)
_N_PROGRAMMES = 6
_N_RBF = 16


class Atlas(NamedTuple):
    """A generated two-condition atlas with its ground truth (:func:`simulate_atlas`).

    Attributes
    ----------
    x : ndarray of float64, shape (n_cells, dims)
        Cell states (a diffusion-map-like embedding of a curved branching manifold).
    y : ndarray of float32, shape (n_cells, n_genes)
        Expression, ``log1p`` of negative-binomial counts.
    condition : ndarray of str, shape (n_cells,)
        ``"control"`` (condition 1) or ``"treated"`` (condition 2).
    sample : ndarray of str, shape (n_cells,)
        Replicate sample, ``"control-1"`` ... ``"treated-<n_samples>"``.
    true_lfc : ndarray of float64, shape (n_cells,)
        True log fold change (natural log) of the density of treated over control at the
        cell's manifold position; exactly 0 outside DA regions and in the null.
    cell_is_da : ndarray of bool, shape (n_cells,)
        The cell lies in a DA region (at least half of the region's peak log fold change).
    gene_is_de : ndarray of bool, shape (n_genes,)
        The gene is differentially expressed (all False in the null).
    gene_effect : ndarray of float64, shape (n_genes,)
        Signed peak effect of each DE gene on the log-rate scale (0 for other genes).
    layout : ndarray of float64, shape (n_cells, 2)
        A 2-D drawing of the manifold for plots.
    branch : ndarray of int64, shape (n_cells,)
        Branch of the manifold the cell was drawn on.
    branch_position : ndarray of float64, shape (n_cells,)
        Latent position of the cell along its branch, in [0, 1].
    de_effect : ndarray of float64, shape (n_cells, n_de_genes), or None
        With ``return_de_effect=True``: the true effect (log-rate scale) of each DE gene
        (columns in gene order) at each cell's position, treated minus control.
    """

    x: np.ndarray
    y: np.ndarray
    condition: np.ndarray
    sample: np.ndarray
    true_lfc: np.ndarray
    cell_is_da: np.ndarray
    gene_is_de: np.ndarray
    gene_effect: np.ndarray
    layout: np.ndarray
    branch: np.ndarray
    branch_position: np.ndarray
    de_effect: np.ndarray | None = None


class _Model(NamedTuple):
    """Everything but the cells: manifold, abundance and gene parameters (all small)."""

    dims: int
    n_samples: int
    start: np.ndarray  # (K, dims) branch origins
    frame: np.ndarray  # (K, 3, dims) directions d, e, f
    shape: np.ndarray  # (K, 3) length, kappa, omega
    start2: np.ndarray  # (K, 2) layout origins
    frame2: np.ndarray  # (K, 2, 2) layout directions d, e
    cum_sample: np.ndarray  # (2S,) cumulative sample probabilities
    cdf: np.ndarray  # (2S, K*T) cumulative grid masses of each sample's density
    da_centres: np.ndarray  # (R, dims)
    da_amp: np.ndarray  # (R,) signed plateau heights (all 0 in the null)
    rbf_centres: np.ndarray  # (J, dims)
    rbf_scale: float
    baseline: np.ndarray  # (G,) log rate offset
    weights: np.ndarray  # (J, G) programmes x loadings
    theta: np.ndarray  # (G,) inverse dispersion
    offsets: np.ndarray  # (2S, G) per-sample log-rate offsets
    de_index: np.ndarray  # (n_de,) DE genes, increasing
    de_centres: np.ndarray  # (n_de, dims)
    de_amp: np.ndarray  # (n_de,) signed


def _unit(v: np.ndarray, against: list[np.ndarray]) -> np.ndarray:
    for u in against:
        v = v - (v @ u) * u
    n = np.linalg.norm(v)
    return v / n if n > 1e-8 else np.zeros_like(v)


def _pick_unit(candidates: np.ndarray, against: list[np.ndarray]) -> np.ndarray:
    """The first of ``candidates`` (rows) with a usable part orthogonal to ``against``."""
    for c in candidates:
        v = c.copy()
        for u in against:
            v = v - (v @ u) * u
        if np.linalg.norm(v) > 0.3:
            return v / np.linalg.norm(v)
    return np.zeros_like(candidates[0])


def _curve(start, frame, shape, branch, t):
    """Points ``p_k(t)`` of branches ``branch`` at positions ``t`` (and its 2-D analogue)."""
    t = t[:, None]
    length, kappa, omega = (shape[branch, i][:, None] for i in range(3))
    out = t * frame[branch, 0] + kappa * t**2 * frame[branch, 1]
    if frame.shape[1] > 2:
        out += omega * np.sin(np.pi * t) * frame[branch, 2]
    return start[branch] + length * out


def _speed(frame, shape, branch, t):
    """``|dp/dt|`` along the branches."""
    t = t[:, None]
    length, kappa, omega = (shape[branch, i][:, None] for i in range(3))
    v = frame[branch, 0] + 2 * kappa * t * frame[branch, 1]
    v = v + omega * np.pi * np.cos(np.pi * t) * frame[branch, 2]
    return length[:, 0] * np.linalg.norm(v, axis=1)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _rbf(p: np.ndarray, centres: np.ndarray, scale: float) -> np.ndarray:
    return np.exp(-_sqdist(p, centres) / (2.0 * scale**2))


def _plateau(p: np.ndarray, centres: np.ndarray, radii: tuple[float, float]) -> np.ndarray:
    """1 within ``radii[0]`` of a centre, 0 beyond ``radii[1]``, smooth (C2) between."""
    r_in, r_out = radii
    z = np.clip((np.sqrt(_sqdist(p, centres)) - r_in) / (r_out - r_in), 0.0, 1.0)
    return 1.0 - z**3 * (z * (6.0 * z - 15.0) + 10.0)


def _weighted_standardise(values: np.ndarray, w: np.ndarray, sd: float) -> np.ndarray:
    """Columns of ``values`` shifted and scaled to mean 0 and sd ``sd`` under weights ``w``."""
    mean = w @ values
    centred = values - mean
    std = np.sqrt(w @ centred**2)
    return centred * (sd / np.where(std > 0, std, 1.0))


def _model(n_genes: int, n_samples: int, dims: int, effect: str, n_de_genes: int | None,
           da_strength: float, de_strength: float, replicate_sd_abundance: float,
           replicate_sd_expression: float, seed: int) -> _Model:
    if dims < 2:
        raise ValueError(f"`dims` must be >= 2; got {dims}")
    if n_samples < 1 or n_genes < 1:
        raise ValueError(f"`n_samples` and `n_genes` must be >= 1; got {n_samples}, {n_genes}")
    if effect not in ("signal", "null"):
        raise ValueError(f"`effect` must be 'signal' or 'null'; got {effect!r}")
    for name, value in (("da_strength", da_strength), ("de_strength", de_strength),
                        ("replicate_sd_abundance", replicate_sd_abundance),
                        ("replicate_sd_expression", replicate_sd_expression)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"`{name}` must be finite and >= 0; got {value}")
    if n_de_genes is None:
        n_de_genes = max(1, int(round(0.05 * n_genes)))
    if not 0 <= n_de_genes <= n_genes:
        raise ValueError(f"`n_de_genes` must be in [0, n_genes]; got {n_de_genes}")
    signal = effect == "signal"
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    K, T, S2 = len(_PARENTS), _GRID, 2 * n_samples

    # manifold: the tree, and the same tree drawn in the plane for the layout
    basis = np.linalg.qr(rng.normal(size=(dims, dims)))[0].T  # rows orthonormal
    lengths = rng.uniform(0.8, 1.2, K)
    angles = rng.uniform(0.6, 1.0, K)
    kappa = rng.uniform(0.2, 0.5, K) * rng.choice([-1.0, 1.0], K)
    omega = rng.uniform(0.03, 0.1, K)
    shape = np.column_stack([lengths, kappa, omega])
    frame = np.zeros((K, 3, dims))
    frame2 = np.zeros((K, 2, 2))
    start = np.zeros((K, dims))
    start2 = np.zeros((K, 2))
    layout_angle = np.zeros(K)
    for k, (parent, at) in enumerate(_PARENTS):
        if parent < 0:
            d = basis[0]
            layout_angle[k] = np.pi / 2
        else:
            side = 1.0 if k != 2 else -1.0
            d_par = frame[parent, 0]
            v = _pick_unit(np.roll(basis, -(1 if k < 3 else 2), axis=0), [d_par])
            d = np.cos(angles[k]) * d_par + side * np.sin(angles[k]) * v
            d /= np.linalg.norm(d)
            layout_angle[k] = layout_angle[parent] - side * angles[k]
            pt = np.array([at])
            start[k] = _curve(start, frame, shape, np.array([parent]), pt)[0]
            start2[k] = _curve(start2, frame2, shape, np.array([parent]), pt)[0]
        e = _pick_unit(np.roll(basis, -(k + 2), axis=0), [d])
        f = _pick_unit(np.roll(basis, -(k + 3), axis=0), [d, e]) if dims > 2 else np.zeros(dims)
        frame[k] = d, e, f
        a = layout_angle[k]
        frame2[k] = [np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]

    # grid over the manifold: base mass per grid cell = arc length x smooth tilt
    g_branch = np.repeat(np.arange(K), T)
    g_t = np.tile((np.arange(T) + 0.5) / T, K)
    grid = _curve(start, frame, shape, g_branch, g_t)
    arc = _speed(frame, shape, g_branch, g_t) / T
    w_arc = arc / arc.sum()
    b_centres = grid[rng.choice(K * T, size=8, replace=False, p=w_arc)]
    log_base = _weighted_standardise(_rbf(grid, b_centres, 0.3) @ rng.normal(size=8), w_arc, 0.35)
    mass = arc * np.exp(log_base)
    w = mass / mass.sum()

    # replicate tilts and sample sizes
    t_centres = grid[rng.choice(K * T, size=10, replace=False, p=w)]
    tilts = _weighted_standardise(_rbf(grid, t_centres, 0.35) @ rng.normal(size=(10, S2)), w,
                                  replicate_sd_abundance)
    probs = np.exp(rng.normal(scale=0.25, size=(2, n_samples)))
    probs = (0.5 * probs / probs.sum(axis=1, keepdims=True)).ravel()

    # DA regions: two up, two down, apart, of similar masses (the best balanced four of up
    # to eight separated candidates); the down height then balances the totals exactly
    candidates = rng.choice(K * T, size=128, replace=False, p=w)
    chosen: list[int] = []
    for i in candidates:
        if all(np.linalg.norm(grid[i] - grid[j]) > 2 * _DA_RADII[1] + 0.1 for j in chosen):
            chosen.append(int(i))
        if len(chosen) == 8:
            break
    region_mass = w @ _plateau(grid, grid[chosen], _DA_RADII)
    best = None
    for quad in itertools.combinations(range(len(chosen)), min(4, len(chosen))):
        for split in ((1, -1, 1, -1), (1, 1, -1, -1), (1, -1, -1, 1)):
            sg = np.array(split[: len(quad)], dtype=float)
            cost = abs(sg @ region_mass[list(quad)]) if len(quad) == 4 else 0.0
            if best is None or cost < best[0]:
                best = (cost, quad, sg)
    _, quad, signs = best
    chosen = [chosen[i] for i in quad]
    da_centres = grid[chosen]
    da_amp = np.zeros(len(chosen))
    if signal and da_strength > 0 and (signs < 0).any() and (signs > 0).any():
        prof = _plateau(grid, da_centres, _DA_RADII)
        s_up, s_down = prof[:, signs > 0].sum(1), prof[:, signs < 0].sum(1)
        target = w @ np.sinh(da_strength * s_up / 2)

        def excess(a: float) -> float:
            return float(w @ np.sinh(a * s_down / 2)) - target

        lo, hi = 0.0, da_strength
        while excess(hi) < 0:
            hi *= 2.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
        da_amp = np.where(signs > 0, da_strength, -0.5 * (lo + hi))
    f_grid = _plateau(grid, da_centres, _DA_RADII) @ da_amp if len(chosen) else np.zeros(K * T)
    cond_sign = np.repeat([-0.5, 0.5], n_samples)
    log_mass = np.log(mass)[None, :] + cond_sign[:, None] * f_grid[None, :] + tilts.T
    dens = np.exp(log_mass - log_mass.max(axis=1, keepdims=True))
    cdf = np.cumsum(dens, axis=1)

    # genes: smooth programmes mixed per gene, baselines, dispersions, sample offsets, DE
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    rbf_centres = grid[rng.choice(K * T, size=_N_RBF, replace=False, p=w)]
    rbf_scale = 0.35
    phi = _rbf(grid, rbf_centres, rbf_scale)
    raw = rng.normal(size=(_N_RBF, _N_PROGRAMMES))
    prog_mean = w @ (phi @ raw)
    prog_sd = np.sqrt(w @ (phi @ raw - prog_mean) ** 2)
    programmes = raw / prog_sd  # unit sd over the manifold
    loadings = rng.normal(scale=0.7, size=(_N_PROGRAMMES, n_genes))
    loadings *= rng.random((_N_PROGRAMMES, n_genes)) < 0.4
    weights = programmes @ loadings
    baseline = np.clip(rng.normal(-0.7, 1.2, n_genes), -4.5, 2.5) - (prog_mean / prog_sd) @ loadings
    theta = np.exp(rng.normal(np.log(5.0), 0.5, n_genes))
    offsets = rng.normal(size=(S2, n_genes)) * replicate_sd_expression
    order = rng.permutation(n_genes)
    centre_idx = rng.choice(K * T, size=n_genes, p=w)
    de_sign = rng.choice([-1.0, 1.0], n_genes)
    if signal:
        level = baseline + (prog_mean / prog_sd) @ loadings  # mean log rate over the manifold
        eligible = level[order] >= np.quantile(level, 0.3)
        de_index = np.sort(order[np.argsort(~eligible, kind="stable")][:n_de_genes])
    else:
        de_index = np.zeros(0, dtype=np.int64)
    return _Model(dims, n_samples, start, frame, shape, start2, frame2, np.cumsum(probs), cdf,
                  da_centres, da_amp, rbf_centres, rbf_scale, baseline, weights, theta, offsets,
                  de_index, grid[centre_idx[de_index]], de_strength * de_sign[de_index])


def _block(model: _Model, seed: int, b: int, n: int, expression: bool, de_effect: bool) -> dict:
    """Cells ``b * _BLOCK ... b * _BLOCK + n - 1`` (``n <= _BLOCK``)."""
    # full blocks are drawn and cut, so that a cell's values do not depend on ``n_cells``
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, b)))
    u_sample, u_pos, u_jitter = (rng.random(_BLOCK)[:n] for _ in range(3))
    noise = rng.normal(scale=_NOISE_SD, size=(_BLOCK, model.dims))[:n]
    sample = np.minimum(np.searchsorted(model.cum_sample, u_sample * model.cum_sample[-1], side="right"),
                        len(model.cum_sample) - 1)
    idx = np.empty(n, dtype=np.int64)
    for s in range(len(model.cdf)):
        sel = sample == s
        cdf = model.cdf[s]
        idx[sel] = np.searchsorted(cdf, u_pos[sel] * cdf[-1], side="right")
    idx = np.minimum(idx, model.cdf.shape[1] - 1)
    branch = idx // _GRID
    t = (idx % _GRID + u_jitter) / _GRID
    p = _curve(model.start, model.frame, model.shape, branch, t)
    out = {
        "x": p + noise,
        "layout": _curve(model.start2, model.frame2, model.shape, branch, t) + noise[:, :2],
        "sample": sample.astype(np.int64),
        "branch": branch,
        "branch_position": t,
    }
    if len(model.da_centres) and np.any(model.da_amp != 0):
        prof = _plateau(p, model.da_centres, _DA_RADII)
        out["true_lfc"] = prof @ model.da_amp
        out["cell_is_da"] = prof.max(axis=1) >= 0.5
    else:
        out["true_lfc"] = np.zeros(n)
        out["cell_is_da"] = np.zeros(n, dtype=bool)
    effect = (model.de_amp * _plateau(p, model.de_centres, _DE_RADII) if len(model.de_index)
              else np.zeros((n, 0)))
    if de_effect:
        out["de_effect"] = effect
    if expression:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, b)))
        log_rate = _rbf(p, model.rbf_centres, model.rbf_scale) @ model.weights
        log_rate += model.baseline
        log_rate += model.offsets[sample]
        treated = sample >= model.n_samples
        log_rate[:, model.de_index] += treated[:, None] * effect
        gamma = rng.standard_gamma(model.theta, size=(_BLOCK, len(model.theta)), dtype=np.float32)[:n]
        rate = np.exp(log_rate, out=log_rate)
        rate *= gamma
        rate /= model.theta
        out["y"] = np.log1p(rng.poisson(rate).astype(np.float32))
    return out


def _chunks(model: _Model, seed: int, n_cells: int, chunk: int, expression: bool = True,
            de_effect: bool = False):
    """Yield ``(start, stop, cells)`` for consecutive chunks of ``chunk`` cells.

    Cells are drawn in blocks of ``_BLOCK`` and copied into one buffer per chunk (the
    block a chunk ends in is kept for the next chunk), so memory stays about one chunk.
    """
    cached: tuple[int, dict] | None = None
    for c0 in range(0, n_cells, chunk):
        c1 = min(n_cells, c0 + chunk)
        out: dict[str, np.ndarray] = {}
        for b in range(c0 // _BLOCK, (c1 - 1) // _BLOCK + 1):
            if cached is None or cached[0] != b:
                cached = None  # free the previous block first
                cached = (b, _block(model, seed, b, min(_BLOCK, n_cells - b * _BLOCK), expression, de_effect))
            lo, hi = max(c0, b * _BLOCK), min(c1, (b + 1) * _BLOCK)
            for key, value in cached[1].items():
                if key not in out:
                    out[key] = np.empty((c1 - c0,) + value.shape[1:], dtype=value.dtype)
                out[key][lo - c0:hi - c0] = value[lo - b * _BLOCK:hi - b * _BLOCK]
        yield c0, c1, out
        del out


def _labels(sample: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    names = np.array([f"{c}-{i + 1}" for c in _CONDITIONS for i in range(n_samples)])
    return np.array(_CONDITIONS)[(sample >= n_samples).astype(np.int64)], names[sample]


def simulate_atlas(
    n_cells: int = 3000,
    n_genes: int = 500,
    n_samples: int = 3,
    dims: int = 6,
    *,
    effect: str = "signal",
    n_de_genes: int | None = None,
    da_strength: float = 1.0,
    de_strength: float = 1.0,
    replicate_sd_abundance: float = 0.3,
    replicate_sd_expression: float = 0.15,
    return_de_effect: bool = False,
    seed: int = 0,
) -> Atlas:
    """Generate a two-condition atlas with replicate samples and known truth.

    Cells lie on a curved branching manifold (four curved branches of a tree embedded in
    ``dims`` dimensions, plus small isotropic noise), like a diffusion-map embedding.
    Each condition has ``n_samples`` replicate samples; every sample tilts the density
    smoothly over the manifold (a random smooth log-density tilt of sd
    ``replicate_sd_abundance``) and shifts each gene's log rate (sd
    ``replicate_sd_expression``), in both variants. With ``effect="signal"`` the treated
    condition's density differs from the control's by ``exp(true_lfc)``: two regions up by
    ``da_strength`` (natural log) and two down by about as much (the height that keeps
    both densities normalised to the same total), 0 elsewhere; and ``n_de_genes`` genes
    change their log rate by ``+-de_strength`` in treated cells within a local region of
    the manifold (each gene its own region). With ``effect="null"`` the conditions differ
    only through their replicates (same draws as the signal variant otherwise).

    Expression: each gene's log rate is a baseline plus a mixture of a few smooth
    programmes over the manifold plus the sample offset (plus the DE effect); counts are
    negative binomial (gamma-Poisson) with gene-wise dispersion; ``y = log1p(counts)``.

    Parameters
    ----------
    n_cells, n_genes : int
        Cells (both conditions; each cell picks a sample at random, conditions are about
        equally large) and genes.
    n_samples : int
        Replicate samples per condition.
    dims : int
        Dimensions of the cell states (``>= 2``).
    effect : {"signal", "null"}
        With or without condition effects.
    n_de_genes : int, optional
        DE genes in the signal variant (default 5% of the genes, at least 1), drawn among
        the genes with a mean log rate above the 30th percentile.
    da_strength, de_strength : float
        Height of the DA regions' log fold change and of the DE genes' local effect on the
        log-rate scale.
    replicate_sd_abundance, replicate_sd_expression : float
        Sd of the per-sample log-density tilt over the manifold and of the per-sample
        per-gene log-rate offsets.
    return_de_effect : bool
        Also return ``de_effect``, the true effect of each DE gene at every cell.
    seed : int
        Seed; the values do not depend on how cells are chunked
        (:func:`write_atlas_zarr` writes the same atlas).

    Returns
    -------
    Atlas
        Cell states, expression, labels and truth (see :class:`Atlas`).
    """
    model = _model(n_genes, n_samples, dims, effect, n_de_genes, da_strength, de_strength,
                   replicate_sd_abundance, replicate_sd_expression, seed)
    if n_cells < 1:
        raise ValueError(f"`n_cells` must be >= 1; got {n_cells}")
    (_, _, cells), = _chunks(model, seed, n_cells, n_cells, de_effect=return_de_effect)
    condition, sample = _labels(cells["sample"], n_samples)
    gene_is_de = np.zeros(n_genes, dtype=bool)
    gene_is_de[model.de_index] = True
    gene_effect = np.zeros(n_genes)
    gene_effect[model.de_index] = model.de_amp
    return Atlas(cells["x"], cells["y"], condition, sample, cells["true_lfc"], cells["cell_is_da"],
                 gene_is_de, gene_effect, cells["layout"], cells["branch"], cells["branch_position"],
                 cells.get("de_effect"))


class ConditionArrays(NamedTuple):
    """The arrays of :meth:`DifferentialExpression.fit` for one atlas, and where the cells were."""

    x1: np.ndarray  # control cells' states
    y1: np.ndarray  # control cells' expression
    samples1: np.ndarray  # control cells' sample labels
    x2: np.ndarray  # treated
    y2: np.ndarray
    samples2: np.ndarray
    rows1: np.ndarray  # row of each control cell in the atlas
    rows2: np.ndarray


def condition_arrays(atlas: Atlas) -> ConditionArrays:
    """Split an atlas into its control (condition 1) and treated (condition 2) cells.

    Parameters
    ----------
    atlas : Atlas
        From :func:`simulate_atlas` (null or signal variant).

    Returns
    -------
    ConditionArrays
        Cell states, expression and sample labels of each condition, in the atlas's
        order, and the atlas rows they came from.
    """
    rows1 = np.flatnonzero(np.asarray(atlas.condition) == _CONDITIONS[0])
    rows2 = np.flatnonzero(np.asarray(atlas.condition) == _CONDITIONS[1])
    return ConditionArrays(atlas.x[rows1], atlas.y[rows1], atlas.sample[rows1], atlas.x[rows2], atlas.y[rows2],
                           atlas.sample[rows2], rows1, rows2)


# ============================================================================ AnnData


def _sample_categories(n_samples: int) -> list[str]:
    return [f"{c}-{i + 1}" for c in _CONDITIONS for i in range(n_samples)]


def _obs_var(condition, sample, true_lfc, cell_is_da, gene_is_de, gene_effect, n_samples):
    import pandas as pd

    n, n_genes = len(condition), len(gene_is_de)
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(condition, categories=list(_CONDITIONS)),
            "sample": pd.Categorical(sample, categories=_sample_categories(n_samples)),
            "true_lfc": np.asarray(true_lfc, dtype=np.float64),
            "cell_is_da": np.asarray(cell_is_da, dtype=bool),
        },
        index=pd.Index([f"cell{i:06d}" for i in range(n)]),
    )
    var = pd.DataFrame(
        {"gene_is_de": np.asarray(gene_is_de, dtype=bool), "true_de_effect": np.asarray(gene_effect, float)},
        index=pd.Index([f"gene{g:04d}" for g in range(n_genes)]),
    )
    return obs, var


def atlas_anndata(atlas: Atlas, sparse: bool = True):
    """Put a generated atlas into an :class:`anndata.AnnData`.

    Parameters
    ----------
    atlas : Atlas
        From :func:`simulate_atlas`.
    sparse : bool
        Store ``X`` as a CSR float32 matrix (else a dense float32 array).

    Returns
    -------
    anndata.AnnData
        ``X`` the expression; ``obsm["DM_EigenVectors"]`` the cell states,
        ``obsm["X_umap"]`` a 2-D layout; ``obs["condition"]``, ``obs["sample"]``
        (categorical), ``obs["true_lfc"]``, ``obs["cell_is_da"]``; ``var["gene_is_de"]``,
        ``var["true_de_effect"]``; cells named ``cell000000``..., genes ``gene0000``....
    """
    import anndata

    names = np.unique(np.asarray(atlas.sample))
    n_samples = max(int(s.rsplit("-", 1)[1]) for s in names)
    obs, var = _obs_var(atlas.condition, atlas.sample, atlas.true_lfc, atlas.cell_is_da,
                        atlas.gene_is_de, atlas.gene_effect, n_samples)
    y = np.asarray(atlas.y, dtype=np.float32)
    if sparse:
        import scipy.sparse

        y = scipy.sparse.csr_matrix(y)
    return anndata.AnnData(
        X=y, obs=obs, var=var,
        obsm={"DM_EigenVectors": np.asarray(atlas.x, dtype=np.float64),
              "X_umap": np.asarray(atlas.layout, dtype=np.float64)},
    )


def write_atlas_zarr(
    path,
    n_cells: int = 200_000,
    n_genes: int = 2000,
    n_samples: int = 3,
    dims: int = 6,
    *,
    effect: str = "signal",
    n_de_genes: int | None = None,
    da_strength: float = 1.0,
    de_strength: float = 1.0,
    replicate_sd_abundance: float = 0.3,
    replicate_sd_expression: float = 0.15,
    chunk_cells: int = 20_000,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Write a large generated atlas as an AnnData-zarr store, one chunk of cells at a time.

    The atlas is the one :func:`simulate_atlas` returns for the same arguments (same
    values, whatever ``chunk_cells``), laid out as :func:`atlas_anndata` does, except that
    ``X`` is a dense float32 array chunked ``(chunk_cells, n_genes)``. Memory is bounded by
    about one chunk of cells x genes (plus per-cell labels and states, small). The store
    is zarr format 3, opened by :func:`anndata.read_zarr` and
    :func:`anndata.experimental.read_lazy`.

    Parameters
    ----------
    path : str or os.PathLike
        Directory of the store to create.
    n_cells, n_genes, n_samples, dims, effect, n_de_genes, da_strength, de_strength,
    replicate_sd_abundance, replicate_sd_expression, seed
        As for :func:`simulate_atlas`.
    chunk_cells : int
        Cells per chunk (written at once, and the zarr chunk of ``X`` along cells).
    overwrite : bool
        Replace an existing ``path`` (else a :class:`FileExistsError`).

    Returns
    -------
    str
        ``path``.
    """
    import os
    import warnings

    import zarr
    from anndata.io import write_elem

    if chunk_cells < 1 or n_cells < 1:
        raise ValueError(f"`n_cells` and `chunk_cells` must be >= 1; got {n_cells}, {chunk_cells}")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    model = _model(n_genes, n_samples, dims, effect, n_de_genes, da_strength, de_strength,
                   replicate_sd_abundance, replicate_sd_expression, seed)
    chunk = min(chunk_cells, n_cells)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    x_arr = root.create_array("X", shape=(n_cells, n_genes), chunks=(chunk, n_genes), dtype="float32",
                              fill_value=0.0)
    x_arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    keep = ("x", "layout", "sample", "true_lfc", "cell_is_da")
    cells: dict[str, list] = {k: [] for k in keep}
    for c0, c1, part in _chunks(model, seed, n_cells, chunk):
        x_arr[c0:c1] = part.pop("y")
        for k in keep:
            cells[k].append(part[k])
        del part
    small = {k: np.concatenate(v) for k, v in cells.items()}
    condition, sample = _labels(small["sample"], n_samples)
    gene_is_de = np.zeros(n_genes, dtype=bool)
    gene_is_de[model.de_index] = True
    gene_effect = np.zeros(n_genes)
    gene_effect[model.de_index] = model.de_amp
    obs, var = _obs_var(condition, sample, small["true_lfc"], small["cell_is_da"], gene_is_de,
                        gene_effect, n_samples)
    plain = {"shards": None}  # small arrays: no sharding (and no warning about its default)
    write_elem(root, "obs", obs, dataset_kwargs=plain)
    write_elem(root, "var", var, dataset_kwargs=plain)
    write_elem(root, "obsm", {"DM_EigenVectors": small["x"], "X_umap": small["layout"]}, dataset_kwargs=plain)
    for key in ("obsp", "varm", "varp", "layers", "uns"):
        write_elem(root, key, {})
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec"
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(path, zarr_format=3)
    return path


# ============================================================================ AUROC


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for telling ``labels`` True from False.

    The probability that a random positive scores higher than a random negative, ties
    counting one half (the Mann-Whitney U statistic over ``n_pos * n_neg``), from average
    ranks: O(n log n), numpy only.

    Parameters
    ----------
    scores : array-like of float, shape (n,)
        Higher means "more likely positive" (finite; NaN is an error).
    labels : array-like of bool, shape (n,)
        Truth; needs at least one positive and one negative.

    Returns
    -------
    float
        In [0, 1]: 1 ranks every positive above every negative, 0.5 is chance.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("`labels` must be boolean (or 0/1)")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"`scores` and `labels` must have the same length; got {s.shape}, {y.shape}")
    if np.isnan(s).any():
        raise ValueError("`scores` contains NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("`labels` needs at least one positive and one negative")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse.ravel()]  # average 1-based ranks
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
