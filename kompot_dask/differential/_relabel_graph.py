"""The sample-relabelling null (:mod:`._relabel`) as one dask graph, on the engine.

Every relabelling's distances come from per-sample sums of the landmark fit (module
docstring of :mod:`._relabel`). Here those sums and the distances are tasks, named
``kompot-replicate-<stage>-...-<tag>``:

1. ``gram``: ``A W Aᵀ`` (M × M, ``A = Lp⁻¹ K_UX``) over a chunk of one sample's cells
   (cell states only), added up per sample in a fixed tree (``...-sum``);
2. ``block``: ``K_UX W (Y − mu)`` (M × g) of each sample of a condition over one chunk of
   its cells and one batch of genes: the only tasks that read expression, one block
   (cell chunk × gene batch) each, cut from the same chunks the fit reads; then ``sums``:
   added over the chunks in a fixed tree and projected, ``A W (Y − mu) = Lp⁻¹ (...)``;
3. ``factor``: per relabelling (the real labelling first), both pseudo-conditions'
   Cholesky factors from the samples' grams, the operator mapping sums to posterior means
   at the evaluation points, ``Σ1 + Σ2`` and its shared factor; with sample variance,
   ``sample-factor`` and ``sample-mean``: each sample's own GP mean per gene batch;
4. ``distances``: per relabelling and gene batch;
5. ``collect``: the gene-sized results, the graph's last task.

When the cells' basis takes fewer operations (:func:`._relabel_cells.cheaper`), stages 1–3
are replaced (:meth:`_Layout.cell_graph`): one ``cells`` task makes ``H = ÃᵀÃ`` and
``F = A_Pᵀ Ã`` of all cells, one ``targets`` task per gene batch reads every cell's
expression for that batch, and the factors, sample means and distances are made from them.

No task holds more than one block of expression and landmark-sized arrays (M × M, M × p,
p × p, and M × g or p × g per sample). The graph runs on a ``distributed`` client when the
expression is read lazily (dask, zarr), else in this process, task by task (shipping
in-memory targets to workers would copy them, as the fit's sums say); both add the same
parts in the same order, so they agree to rounding.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import numpy as np

from .._jax import with_x64
from ..estimators._function_terms import reads_lazily
from ..estimators._inputs import read_rows
from ..execution.plan import EXPRESSION_CHUNK_BYTES, MAX_GENE_BATCH, cell_chunk_rows, row_slices
from ..execution.runner import run_graph, share, task
from ..kernels import mahalanobis as mk
from ..kernels import posterior as post
from ..kernels.covariance import matern52
from ..options import get_options
from ..estimators._shared_factors import inducing_terms
from ..estimators.function import same_points
from ..io.inputs import lazy_rows
from . import _relabel_cells as rc
from ._relabel import ReplicateNull, balance_weights, on_shared_landmarks, relabellings, sample_units

__all__ = ["replicate_null_distances", "LandmarkGP", "landmark_gp"]

FAN_IN = 8  # parts added by one task of a reduction tree


class LandmarkGP(NamedTuple):
    """What the DTC fit of a (pseudo-)condition needs besides the sums over its cells."""

    inducing: np.ndarray  # (M, D)
    lp: np.ndarray  # chol(K_UU + jitter I)
    ls: float
    mu: float
    noise: float  # max(sigma², jitter)
    jitter: float


class PointTerms(NamedTuple):
    """The evaluation points' side of every fit: ``A_P = Lp⁻¹ K_UP`` and ``K_PP − A_Pᵀ A_P``."""

    a_p: np.ndarray  # (M, p)
    prior: np.ndarray  # (p, p)
    eps: float


class RelabelFactor(NamedTuple):
    """One relabelling's gene-independent part: mean operators, ``Σ1 + Σ2``, its factor."""

    op1: np.ndarray  # (M, p): posterior mean at the points − mu = op1ᵀ (A W (Y − mu))
    op2: np.ndarray
    sigma: np.ndarray | None  # (p, p), kept when there is no good shared factor
    lower: np.ndarray | None  # shared_cholesky(sigma, eps), for the shared branches


def landmark_gp(predictor: Any, kwargs: dict) -> LandmarkGP:
    """The landmark fit of a fitted function predictor (refused for a full GP)."""
    state = getattr(predictor, "state", None)
    if state is None or not getattr(state, "landmark_mode", False):
        msg = ("the replicate null needs landmark-mode expression models (pass `n_landmarks` or `landmarks` "
               "to DifferentialExpression); a full GP or an injected predictor has no per-sample sums")
        raise ValueError(msg)
    sigma = float(kwargs.get("sigma", 0.0))
    jitter = float(kwargs.get("jitter", 1e-6))
    return LandmarkGP(np.asarray(state.inducing), np.asarray(state.lp), float(state.ls), float(state.mu),
                      max(sigma ** 2, jitter), jitter)


@with_x64
def point_terms(gp: LandmarkGP, points: np.ndarray, eps: float) -> PointTerms:
    """``A_P`` and the prior part ``K_PP − A_Pᵀ A_P`` at the evaluation points.

    At the landmarks themselves ``K_UU = Lp Lpᵀ − jI`` gives ``A = Lpᵀ − j Lp⁻¹`` and
    ``K_UU − AᵀA = jI − DᵀD`` with ``D = j Lp⁻¹`` exactly, which avoids the cancellation
    of two order-one matrices (their difference is of the order of the jitter).
    """
    points = np.asarray(points, dtype=np.float64)
    if same_points(points, gp.inducing):
        shared = inducing_terms(gp.lp, gp.jitter)  # the model's Σ at its landmarks made the same
        return PointTerms(shared.projection, shared.residual, float(eps))
    a_p = post.solve_lower(gp.lp, np.asfortranarray(matern52(gp.inducing, points, gp.ls)), overwrite=True)
    k_pp = np.asarray(matern52(points, points, gp.ls), dtype=np.float64)
    return PointTerms(a_p, k_pp - a_p.T @ a_p, float(eps))


# ------------------------------------------------------------------------------- tasks
def _add(*parts: np.ndarray) -> np.ndarray:
    """Sum of the parts, added strictly in the given order."""
    total = np.array(parts[0], dtype=np.float64)
    for part in parts[1:]:
        total += part
    return total


@with_x64
def _gram_task(gp: LandmarkGP, x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``A W Aᵀ`` over the cells ``x`` of one sample (a cell of weight ω counts as an
    observation of noise variance σ²/ω)."""
    a = post.solve_lower(gp.lp, np.asfortranarray(matern52(gp.inducing, x, gp.ls)), overwrite=True)
    if weights is not None:
        a = a * np.sqrt(weights)
    return post.gram(a.T)


@with_x64
def _block_task(gp: LandmarkGP, x: np.ndarray, units: np.ndarray, weights: np.ndarray | None, n_units: int,
                y: Any) -> np.ndarray:
    """``K_UX W (Y − mu)`` of each of a condition's ``n_units`` samples over one block.

    ``x`` (c, D) and ``units`` (c,) are the block's cells and the sample of each; ``y``
    their expression for one gene batch (c, g). Kernel columns are made for at most
    :func:`~kompot_dask.execution.plan.cell_chunk_rows` cells at a time.
    """
    r = read_rows(y, slice(None)) - gp.mu
    if weights is not None:
        r *= weights[:, None]
    out = np.zeros((n_units, len(gp.inducing), r.shape[1]))
    step = cell_chunk_rows(len(gp.inducing))
    for start in range(0, len(x), step):
        k = np.asarray(matern52(gp.inducing, x[start:start + step], gp.ls), dtype=np.float64)
        u, rr = units[start:start + step], r[start:start + step]
        for unit in np.unique(u):
            sel = u == unit
            out[unit] += k @ rr if sel.all() else k[:, sel] @ rr[sel]
    return out


@with_x64
def _project_task(gp: LandmarkGP, *parts: np.ndarray) -> np.ndarray:
    """``Lp⁻¹`` applied to each sample's summed ``K_UX W (Y − mu)``: ``A W (Y − mu)``."""
    total = _add(*parts)
    return np.stack([post.solve_lower(gp.lp, t) for t in total])


def _mean_operator(gp: LandmarkGP, terms: PointTerms, aat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(op, cov)``: the posterior mean at the points is ``mu + opᵀ a_r``, its covariance ``cov``."""
    lb = post.noise_factor(aat, gp.noise, "I + A W Aᵀ / σ² of a (pseudo-)condition")
    c = post.solve_lower(lb, terms.a_p)
    return post.solve_lower_t(lb, c) / gp.noise, terms.prior + post.gram(c)


@with_x64
def _factor_task(gp: LandmarkGP, terms: PointTerms, groups: tuple, has_q: bool, *grams: np.ndarray) -> RelabelFactor:
    """One relabelling's :class:`RelabelFactor` from the samples' grams."""
    ops, covs = [], []
    for idx in groups:
        op, cov = _mean_operator(gp, terms, sum(grams[i] for i in idx))
        ops.append(op)
        covs.append(cov)
    return RelabelFactor(ops[0], ops[1], *rc.distance_factor(covs[0] + covs[1], has_q, terms.eps))


@with_x64
def _sample_factor_task(gp: LandmarkGP, terms: PointTerms, gram: np.ndarray) -> np.ndarray:
    """The mean operator of one sample's own fit (its per-sample model)."""
    return _mean_operator(gp, terms, gram)[0]


def _sample_mean_task(op: np.ndarray, sums: np.ndarray, local: int) -> np.ndarray:
    """One sample's posterior mean at the points for a gene batch, less ``mu`` (p × g)."""
    return op.T @ sums[local]


@with_x64
def _distance_task(factor: RelabelFactor, groups: tuple, cols: np.ndarray | None, eps: float, sums: tuple,
                   means: list) -> np.ndarray:
    """Mahalanobis distances of one relabelling for one gene batch (columns ``cols`` of it).

    ``groups`` lists each pseudo-condition's samples as ``(condition, index)``; ``sums``
    holds both conditions' projected sums for the batch, ``means`` each sample's own mean
    (None without sample variance or for a sample of one cell).
    """
    def pick(arr):
        return arr if cols is None else arr[:, cols]

    a = [sum(pick(sums[c][i]) for c, i, _ in members) for members in groups]
    delta = factor.op2.T @ a[1] - factor.op1.T @ a[0]
    return _distances(delta, factor, groups, [None if m is None else pick(m) for m in means], eps)


def _distances(delta: np.ndarray, factor: Any, groups: tuple, means: list, eps: float) -> np.ndarray:
    """The Mahalanobis distances of ``delta`` under ``factor``'s ``Σ`` and, with sample
    variance, each pseudo-condition's replicate covariance from its samples' ``means``."""
    parts = []
    for members in groups:
        own = [means[s] for _, _, s in members if means[s] is not None]
        if len(own) >= 2:
            parts.append(mk.sample_variance_factor(np.stack(own), reduced=True))
    q = mk.concat_factors(*parts) if parts else None
    return mk.mahalanobis_distances(delta, factor.sigma, eps, q=q, lower=factor.lower).distances


@with_x64
def _cell_distance_task(terms: Any, factor: Any, groups: tuple, cols: np.ndarray | None, eps: float,
                        targets: np.ndarray, means: list) -> np.ndarray:
    """:func:`_distance_task` in the cells' basis (:mod:`._relabel_cells`): the mean
    differences from the batch's targets of all cells."""
    delta = rc.mean_difference(terms, factor, targets, cols)
    return _distances(delta, factor, groups, [m if m is None or cols is None else m[:, cols] for m in means], eps)


def _collect_task(observed: list, null: list) -> tuple[np.ndarray, np.ndarray]:
    """``(observed (G,), null (R, G_null))`` from the per-batch distances."""
    return np.concatenate(observed), np.stack([np.concatenate(parts) for parts in null])


# ------------------------------------------------------------------------------- graph
def _tree(parts: list, key: str, finish=None, finish_args: tuple = ()) -> Any:
    """Add ``parts`` in a fixed tree of :data:`FAN_IN`-part sums; ``finish`` makes the root."""
    level = 0
    while len(parts) > FAN_IN:
        parts = [task(_add, *parts[i:i + FAN_IN], key=f"{key}-sum{level}-{i // FAN_IN}")
                 for i in range(0, len(parts), FAN_IN)]
        level += 1
    if finish is None:
        return task(_add, *parts, key=key) if len(parts) > 1 else parts[0]
    return task(finish, *finish_args, *parts, key=key)


def _as_dask(y: Any, rows: int) -> Any:
    """``y`` (n, G) as a dask array chunked along cells, unread (:func:`~kompot_dask.io.inputs.lazy_rows`)."""
    y = lazy_rows(y, rows, "the expression")
    return y[:, None] if y.ndim == 1 else y


def gene_batch_size(n_genes: int, n_landmarks: int, n_points: int, n_samples: int, n_cells: int | None = None) -> int:
    """Genes per batch: the ``gene_batch_size`` option, else as many as keep a distance
    task's per-gene arrays (sums and means of every sample, the factor ``Q``; in the cells'
    basis, ``n_cells`` given, the targets of all cells and their coefficients instead of the
    sums) within ``EXPRESSION_CHUNK_BYTES`` or, if larger, the size of one ``p × p``
    matrix (the task holds ``Σ`` and its factor anyway: wide batches keep its products
    and solves at BLAS speed), at most ``MAX_GENE_BATCH``."""
    option = get_options()["gene_batch_size"]
    if option is not None:
        return int(min(option, n_genes))
    inputs = n_samples * n_landmarks if n_cells is None else 2 * n_cells
    per_gene = 8 * (inputs + 3 * n_samples * n_points + 4 * n_points)
    budget = max(EXPRESSION_CHUNK_BYTES, 8 * n_points * n_points)
    return int(max(1, min(n_genes, MAX_GENE_BATCH, budget // per_gene)))


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
    balance: int | None = None,
    client: Any = None,
    gene_batch: int | None = None,
) -> ReplicateNull:
    """Mahalanobis distances of the real labelling and of every relabelling of the samples.

    Parameters
    ----------
    predictors : (predictor1, predictor2)
        The fitted landmark-mode function predictors (both on the same landmarks).
    data : (x1, y1, labels1, x2, y2, labels2)
        The training cells, expression (real genes only: numpy, scipy sparse, dask, zarr
        or h5py, read one block at a time) and sample labels.
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
        Seed of both draws and of the balancing regions.
    balance : int, optional
        Weight each sample's cells to the pooled distribution over this many regions
        (:func:`~._relabel.balance_weights`) before fitting. None: the model's own fit.
    client : distributed.Client, optional
        Run the tasks there (default: the active client when the expression is read
        lazily and the ``fit_on_cluster`` option is on, else this process).
    gene_batch : int, optional
        Genes per batch (default :func:`gene_batch_size`).

    Returns
    -------
    ReplicateNull
    """
    x1, y1, labels1, x2, y2, labels2 = data
    units = sample_units(labels1, labels2)
    s1 = int(np.sum(units.condition == 1))
    assignments = relabellings(s1, len(units.condition) - s1, max_relabellings, seed)
    if len(assignments) == 0:
        raise ValueError(f"{s1} + {len(units.condition) - s1} samples allow no relabelling besides the real one; "
                         "the replicate null needs at least 3 samples in all (e.g. 2 + 1)")
    gp = landmark_gp(predictors[0], kwargs)
    landmark_gp(predictors[1], kwargs)  # refuses a full GP with the same message
    if not on_shared_landmarks(*predictors):
        raise ValueError("the replicate null needs both conditions on the same landmarks and length scale")
    if null_gene_count is None or null_gene_count >= n_genes:
        null_genes = np.arange(n_genes)
    else:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        null_genes = np.sort(rng.choice(n_genes, size=int(null_gene_count), replace=False))
    if client is None and get_options()["fit_on_cluster"] and reads_lazily(y1) and reads_lazily(y2):
        from ..execution.cluster import active_client

        client = active_client()
    weights = balance_weights(units, (x1, x2), gp.inducing, int(balance), seed) if balance else None
    points = np.asarray(points, dtype=np.float64)
    m, p, n = len(gp.inducing), len(points), len(x1) + len(x2)
    sizes = [len(rows) for rows in units.rows]
    groups = [(sum(c for c, t in zip(sizes, in2) if not t), sum(c for c, t in zip(sizes, in2) if t))
              for in2 in [units.condition == 2, *assignments]]
    in_cells = rc.cheaper(m, p, n, groups, [c for c, on in zip(sizes, _own_means(units, sample_variance)) if on],
                          n_genes)
    batch = gene_batch or gene_batch_size(n_genes, m, p, len(units.condition), n if in_cells else None)
    layout = _Layout(units, (x1, x2), (y1, y2), weights, assignments, null_genes, n_genes, batch, sample_variance, m)
    terms = None if in_cells else point_terms(gp, points, eps)

    def build():
        tag = uuid.uuid4().hex[:10]
        shared_gp = share(gp, f"kompot-replicate-gp-{tag}", client)
        if in_cells:
            return layout.cell_graph(shared_gp, share(points, f"kompot-replicate-points-{tag}", client), float(eps), tag)
        return layout.graph(shared_gp, share(terms, f"kompot-replicate-points-{tag}", client), terms.eps, tag)

    observed, null = run_graph(build, client)
    return ReplicateNull(observed, null, null_genes, assignments, units)


def _own_means(units, sample_variance: bool) -> list:
    """Which samples get a GP mean of their own (sample variance; a sample of one cell does not)."""
    return [sample_variance and len(rows) >= 2 for rows in units.rows]


class _Layout:
    """The blocks, batches and groups of one replicate-null computation (built once)."""

    def __init__(self, units, xs, ys, weights, assignments, null_genes, n_genes, batch, sample_variance, m):
        self.units, self.xs, self.assignments = units, xs, assignments
        self.batches = [slice(a, min(a + batch, n_genes)) for a in range(0, n_genes, batch)]
        everything = len(null_genes) == n_genes
        self.null_cols = [None if everything else null_genes[(null_genes >= b.start) & (null_genes < b.stop)] - b.start
                          for b in self.batches]
        self.unit_weights = weights
        # each unit's condition, index within it, and the per-cell unit / weight of each condition
        self.local, self.cell_units, self.cell_weights, self.ys = [], [], [], []
        for c in (1, 2):
            ids = np.flatnonzero(units.condition == c)
            self.local += [(c - 1, i) for i in range(len(ids))]
            cell_units = np.empty(len(xs[c - 1]), dtype=np.int64)
            cell_weights = None if weights is None else np.empty(len(xs[c - 1]))
            for i, u in enumerate(ids):
                cell_units[units.rows[u]] = i
                if weights is not None:
                    cell_weights[units.rows[u]] = weights[u]
            self.cell_units.append(cell_units)
            self.cell_weights.append(cell_weights)
            self.ys.append(_as_dask(ys[c - 1], cell_chunk_rows(m)))
        self.with_mean = _own_means(units, sample_variance)
        self.m = m

    def _groups(self, in2: np.ndarray) -> tuple:
        return tuple(tuple((*self.local[s], s) for s in np.flatnonzero(member)) for member in (~in2, in2))

    def graph(self, gp, terms, eps: float, tag: str):
        """The whole graph (Delayed of ``collect``); ``gp`` and ``terms`` as shared."""
        units, step = self.units, cell_chunk_rows(self.m)
        grams = []
        for s, rows in enumerate(units.rows):
            x = self.xs[units.condition[s] - 1]
            w = None if self.unit_weights is None else self.unit_weights[s]
            parts = [task(_gram_task, gp, x[rows[a:a + step]], None if w is None else w[a:a + step],
                              key=f"kompot-replicate-gram-{s}-{a // step}-{tag}") for a in range(0, len(rows), step)]
            grams.append(_tree(parts, f"kompot-replicate-gram-{s}-{tag}"))
        per_condition = []
        for c in (0, 1):
            y, n_units = self.ys[c], int(np.sum(units.condition == c + 1))
            chunks = row_slices(y.shape[0], self.m, like=y)
            per_batch = []
            for j, genes in enumerate(self.batches):
                parts = [task(_block_task, gp, self.xs[c][sl], self.cell_units[c][sl],
                                  None if self.cell_weights[c] is None else self.cell_weights[c][sl], n_units,
                                  y[sl, genes], key=f"kompot-replicate-block-{c + 1}-{i}-{j}-{tag}")
                         for i, sl in enumerate(chunks)]
                per_batch.append(_tree(parts, f"kompot-replicate-sums-{c + 1}-{j}-{tag}", _project_task, (gp,)))
            per_condition.append(per_batch)
        sums = list(zip(*per_condition))  # sums[j]: (condition 1's (U1, M, g), condition 2's)
        means = [[None] * len(units.rows) for _ in self.batches]
        for s, (c, i) in enumerate(self.local):
            if not self.with_mean[s]:
                continue
            op = task(_sample_factor_task, gp, terms, grams[s], key=f"kompot-replicate-sample-factor-{s}-{tag}")
            for j in range(len(self.batches)):
                means[j][s] = task(_sample_mean_task, op, sums[j][c], i,
                                       key=f"kompot-replicate-sample-mean-{s}-{j}-{tag}")

        def factor(groups, has_q, key):
            return task(_factor_task, gp, terms, tuple(tuple(s for *_, s in g) for g in groups), has_q, *grams, key=key)

        def distances(factor, groups, cols, j, key):
            return task(_distance_task, factor, groups, cols, eps, sums[j], means[j], key=key)

        return self._labellings(factor, distances, tag)

    def _labellings(self, factor, distances, tag: str):
        """The real labelling's and every relabelling's ``factor`` task and ``distances``
        tasks per gene batch (the null genes' columns only for a relabelling), collected."""
        identity = np.asarray(self.units.condition == 2)
        observed, null = None, []
        for r, in2 in enumerate([identity, *self.assignments]):
            groups = self._groups(in2)
            has_q = any(sum(self.with_mean[s] for *_, s in members) >= 2 for members in groups)
            made = factor(groups, has_q, f"kompot-replicate-factor-{r}-{tag}")
            parts = []
            for j in range(len(self.batches)):
                cols = None if r == 0 else self.null_cols[j]
                if cols is not None and len(cols) == 0:
                    continue
                parts.append(distances(made, groups, cols, j, f"kompot-replicate-distances-{r}-{j}-{tag}"))
            if r == 0:
                observed = parts
            else:
                null.append(parts)
        return task(_collect_task, observed, null, key=f"kompot-replicate-collect-{tag}")

    def cell_graph(self, gp, points, eps: float, tag: str):
        """:meth:`graph` in the cells' basis (:mod:`._relabel_cells`): one ``cells`` task
        makes ``H`` and ``F`` of all cells, one ``targets`` task per gene batch reads every
        cell's expression for it, and the factors, sample means and distances use them."""
        units = self.units
        start = (0, len(self.xs[0]))
        cells = [np.asarray(rows) + start[c - 1] for c, rows in zip(units.condition, units.rows)]
        weights = None
        if self.unit_weights is not None:
            weights = np.empty(start[1] + len(self.xs[1]))
            for rows, w in zip(cells, self.unit_weights):
                weights[rows] = w
        terms = task(rc.cell_terms_task, gp, points, np.concatenate(self.xs), weights,
                     key=f"kompot-replicate-cells-{tag}")
        root_w = None if weights is None else np.sqrt(weights)
        targets = [task(rc.targets_task, gp, root_w, self.ys[0][:, genes], self.ys[1][:, genes],
                        key=f"kompot-replicate-targets-{j}-{tag}") for j, genes in enumerate(self.batches)]
        means = [[None] * len(units.rows) for _ in self.batches]
        for s in range(len(units.rows)):
            if not self.with_mean[s]:
                continue
            op = task(rc.sample_factor_task, gp, terms, cells[s], key=f"kompot-replicate-sample-factor-{s}-{tag}")
            for j in range(len(self.batches)):
                means[j][s] = task(rc.sample_mean_task, op, cells[s], targets[j],
                                   key=f"kompot-replicate-sample-mean-{s}-{j}-{tag}")

        def factor(groups, has_q, key):
            pseudo = tuple(np.concatenate([cells[s] for *_, s in members]) for members in groups)
            return task(rc.factor_task, gp, terms, pseudo, has_q, eps, key=key)

        def distances(factor, groups, cols, j, key):
            return task(_cell_distance_task, terms, factor, groups, cols, eps, targets[j], means[j], key=key)

        return self._labellings(factor, distances, tag)
