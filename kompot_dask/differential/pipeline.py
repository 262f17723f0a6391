"""The differential pipeline, written once and run into a sink (memory or zarr).

Stages, for abundance and expression alike:

1. **blocks**: per (cell chunk × gene batch) statistics (:mod:`._blocks`), written into the
   sink with the block's marker;
2. **Σ**: ``Σ1 + Σ2`` at the evaluation points, its branch and shared Cholesky (expression
   with Mahalanobis only);
3. **Mahalanobis**: per gene batch, from the shared factor;
4. **finish**: per-gene reductions (mean log fold change, χ² PTPs, null-gene FDR), then the
   sink is marked complete, last.

Each stage is a task of one dask graph. The in-memory ``predict`` runs the graph in this
process into a :class:`~kompot_dask.io.results.MemorySink`; the store-backed run
(``predict(..., store=...)``, :func:`kompot_dask.parallel.predict_expression`) runs the
same graph, on the cluster if there is one, into a :class:`~kompot_dask.io.results.ZarrSink`.
Task names carry a token of the inputs *and* the store, so two runs into two stores are two
graphs; a rerun into the same store leaves out the blocks already written.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import numpy as np

from .._jax import x64
from ..execution.runner import logger, run_graph, share, task
from ..fdr import compute_fdr
from ..estimators.function import FunctionPredictor, same_points
from ..kernels import differential as dk
from ..kernels import mahalanobis as mk
from ._blocks import ABUNDANCE_KEYS, EXPRESSION_KEYS, STD_KEYS, abundance_block, expression_block
from ._expression_model import landmark_pair, mean_difference
from ._mahalanobis_inputs import sample_factor

__all__ = [
    "AbundanceModel",
    "ExpressionModel",
    "GeneResults",
    "SigmaParts",
    "abundance_graph",
    "expression_graph",
    "gene_results",
    "mahalanobis_stage",
    "run",
    "sigma_stage",
]

DIRECTION = "log_fold_change_direction"


class AbundanceModel(NamedTuple):
    """What abundance prediction needs: both densities, their sample variances (or None), eps."""

    density1: Any
    density2: Any
    variance1: Any
    variance2: Any
    eps: float


class ExpressionModel(NamedTuple):
    """What expression prediction needs: both conditions' models and the gene counts."""

    condition1: Any  # ConditionModel
    condition2: Any
    eps: float
    n_genes: int  # real genes (outputs)
    n_genes_all: int  # with the null genes (Mahalanobis)
    n_features: int
    has_null: bool  # null genes were appended (FDR from their distances)
    fdr_threshold: float
    gene_names: Any


class SigmaParts(NamedTuple):
    """``Σ1 + Σ2`` at the evaluation points, the branch of SPEC §6.5 and the shared factor;
    ``diagonals``: each condition's own ``diag Σc``, the latent variances at the points."""

    sigma: np.ndarray
    lower: np.ndarray | None
    branch: str
    diagonals: tuple[np.ndarray, np.ndarray] | None = None


class GeneResults(NamedTuple):
    """Per-gene results of the finish stage (gene-sized)."""

    arrays: dict
    fdr_table: Any
    branch: str | None


# ------------------------------------------------------------------------------ stages
def sigma_stage(model: ExpressionModel, points: np.ndarray) -> SigmaParts:
    """``Σ = Σ1 + Σ2`` at ``points``, its branch, and one Cholesky for every gene batch."""
    m1, m2 = model.condition1, model.condition2
    has_sv = m1.variance_predictor is not None or m2.variance_predictor is not None
    has_ev = m1.obs_variance_predictor is not None or m2.obs_variance_predictor is not None
    with x64():
        sigma1, sigma2 = m1.covariance(points, diag=False), m2.covariance(points, diag=False)
        diagonals = (np.diagonal(sigma1).copy(), np.diagonal(sigma2).copy())
        sigma = np.add(sigma1, sigma2, out=sigma1)
        del sigma2
        branch, lower = mk.branch_and_factor(sigma, model.eps, has_sv, has_ev)
    return SigmaParts(np.asarray(sigma), lower, branch, diagonals)


def mahalanobis_stage(model: ExpressionModel, points: np.ndarray, parts: SigmaParts, genes: slice,
                      delta: np.ndarray | None = None) -> mk.MahalanobisResult:
    """Distances of the genes ``genes`` (of all genes, nulls included) at ``points``.

    ``delta`` may give ``μ2 − μ1`` at ``points`` for these genes (else it is predicted).
    """
    m1, m2 = model.condition1, model.condition2
    with x64():
        if delta is None:
            delta = mean_difference(m1, m2, points, genes)
        n = delta.shape[1]
        q = sample_factor(m1.variance_predictor, m2.variance_predictor, points, n, genes)
        v = None
        if m1.obs_variance_predictor is not None or m2.obs_variance_predictor is not None:
            v = np.broadcast_to(m1.obs_variance(points, genes) + m2.obs_variance(points, genes), delta.shape)
        good = parts.lower is not None and not mk.cholesky_failed(parts.lower)  # Σ's branch is the factor's
        return mk.mahalanobis_distances(delta, None if good else parts.sigma, model.eps, q=q, empirical_var=v,
                                        lower=parts.lower)


def gene_results(model: ExpressionModel, distances_all: np.ndarray, n_points: int) -> tuple[dict, Any]:
    """χ² PTPs and, with null genes, the FDR columns of the real genes' distances."""
    g = model.n_genes
    dist = distances_all[:g]
    out = {
        "mahalanobis_distances": dist,
        "neg_log10_ptp": mk.chi2_neg_log10_ptp(dist, model.n_features),
        "neg_log10_ptp_df_points": mk.chi2_neg_log10_ptp(dist, n_points),
    }
    table = None
    if model.has_null:
        table = compute_fdr(dist, distances_all[g:], model.fdr_threshold, model.gene_names)
        out.update(
            mahalanobis_pvalue=table["pvalue"].to_numpy(),
            local_fdr=table["local_fdr"].to_numpy(),
            tail_fdr=table["tail_fdr"].to_numpy(),
            is_de=table["is_de"].to_numpy(),
        )
    return out, table


# ------------------------------------------------------------------------------- tasks
def _abundance_task(model: AbundanceModel, x_chunk, rows, index, sink, lfc_thr, ptp_thr):
    with x64():
        block = abundance_block(model.density1, model.density2, model.variance1, model.variance2, x_chunk, model.eps)
    for key in ABUNDANCE_KEYS:
        sink.write(key, (rows,), block[key])
    directions = dk.directions(block["log_fold_change"], block["neg_log10_fold_change_ptp"], lfc_thr, ptp_thr)
    sink.write(DIRECTION, (rows,), np.asarray(directions).astype(str))
    sink.mark_done("cells", index)
    return index


def _finish_abundance_task(sink, blocks, meta):
    sink.mark_done("final", (0,))
    sink.finish(**meta)
    return GeneResults({}, None, None)


def _variance_task(model: ExpressionModel, x_chunk) -> tuple[np.ndarray, np.ndarray]:
    """Both conditions' latent variances at a chunk of cells (gene independent: one task per
    cell chunk, shared by its gene batches)."""
    with x64():
        return model.condition1.covariance(x_chunk, diag=True), model.condition2.covariance(x_chunk, diag=True)


def _variance_from_sigma(parts: SigmaParts, point_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same variances for cells that are evaluation points: rows of ``diag Σc``."""
    return parts.diagonals[0][point_rows], parts.diagonals[1][point_rows]


def _expression_task(model: ExpressionModel, x_chunk, rows, genes, index, sink, per_gene, variances,
                     landmark_rows=None, keep_difference=False):
    """Write one block; return its index, or with ``keep_difference`` its float64 fold
    change (``μ2 − μ1`` at its cells, for a Mahalanobis task at the same points)."""
    with x64():
        block = expression_block(model.condition1, model.condition2, x_chunk, genes, model.eps, variances,
                                 landmark_rows)
    for key in EXPRESSION_KEYS:
        sink.write(key, (rows, genes), block[key])
    if per_gene or genes.start == 0:
        cols = genes if per_gene else slice(0, 1)
        for key in STD_KEYS:
            sink.write(key, (rows, cols), block[key])
    i = index[0]
    sink.write("_fold_change_sum", (slice(i, i + 1), genes), block["fold_change"].sum(axis=0)[None])
    sink.mark_done("cells", index)
    return np.asarray(block["fold_change"], dtype=np.float64) if keep_difference else index


def _sigma_task(model: ExpressionModel, points, sink) -> SigmaParts:
    """Σ and its factor; the branch is recorded so a resume with every batch done needs no Σ."""
    parts = sigma_stage(model, points)
    sink.write("_mahalanobis_branch", (slice(0, 1),), np.array([mk.BRANCHES.index(parts.branch)]))
    return parts


def _mahalanobis_task(model: ExpressionModel, points, parts: SigmaParts, genes, index, sink, known=None):
    """Distances of one gene batch; ``known``: ``(point rows, fold changes)`` of the
    expression blocks of its real genes, when the cells are the points (:func:`_difference`)."""
    delta = None if known is None else _difference(model, points, genes, *known)
    result = mahalanobis_stage(model, points, parts, genes, delta)
    sink.write("_mahalanobis_all", (genes,), result.distances)
    sink.mark_done("mahalanobis", index)
    return result.branch


def _difference(model: ExpressionModel, points, genes: slice, rows: list, blocks: list) -> np.ndarray:
    """``μ2 − μ1`` at ``points`` for ``genes``: the real genes' columns from the expression
    blocks' fold changes (block ``b`` holds the points ``rows[b]``; together they hold every
    point), the null genes' predicted here."""
    delta = np.empty((len(points), genes.stop - genes.start))
    real = min(genes.stop, model.n_genes) - genes.start
    for point_rows, fold_change in zip(rows, blocks):
        delta[point_rows, :real] = fold_change
    if real < delta.shape[1]:
        m1, m2 = model.condition1, model.condition2
        with x64():
            delta[:, real:] = mean_difference(m1, m2, points, slice(genes.start + real, genes.stop))
    return delta


def _finish_expression_task(model: ExpressionModel, sink, blocks, sigma, meta, n_cells, n_points, maha):
    """Per-gene reductions (gene-sized), then the completion mark: the graph's last task."""
    arrays = {"mean_log_fold_change": sink.read("_fold_change_sum").sum(axis=0) / n_cells}
    table, branch = None, None
    if maha:
        more, table = gene_results(model, sink.read("_mahalanobis_all"), n_points)
        arrays.update(more)
        branch = mk.BRANCHES[int(sink.read("_mahalanobis_branch")[0])]
    for key, values in arrays.items():
        sink.write(key, (slice(None),), values)
    sink.mark_done("final", (0,))
    sink.finish(**meta, mahalanobis_branch=branch)
    return GeneResults(arrays, table, branch)


# ------------------------------------------------------------------------------ graphs
def run_tag(token: str | None, sink: Any) -> str:
    """Short tag of a run's task names: its inputs and its store (unique for memory)."""
    from ..io.results import fingerprint

    if token is None or sink.path is None:
        return uuid.uuid4().hex[:10]
    return fingerprint(token, sink.final)[:10]


def abundance_graph(model: AbundanceModel, x: np.ndarray, sink: Any, cells: list[slice], thresholds: tuple,
                    dtype: str, tag: str, client: Any = None):
    """Lay out ``sink`` for abundance results; return ``build()`` → the graph of the pending blocks."""
    n = len(x)
    chunk = cells[0].stop - cells[0].start
    for key in ABUNDANCE_KEYS:
        sink.add_array(key, (n,), (chunk,), ("cell",), dtype, stage="cells", axes=(0,))
    sink.add_array(DIRECTION, (n,), (chunk,), ("cell",), str, fill_value="", stage="cells", axes=(0,))
    sink.add_stage("cells", (len(cells),))
    sink.add_stage("final", (1,))

    def build():
        shared = share(model, f"kompot-model-{tag}", client)
        pending = sink.pending("cells")
        blocks = [task(_abundance_task, shared, x[cells[i]], cells[i], (i,), sink, *thresholds,
                           key=f"kompot-predict-abundance-{i}-{tag}") for (i,) in pending]
        _describe(sink, len(cells), len(blocks))
        meta = {"blocks_total": len(cells), "blocks_computed_last_run": len(blocks)}
        return task(_finish_abundance_task, sink, blocks, meta, key=f"kompot-finish-abundance-{tag}")

    return build


def expression_graph(model: ExpressionModel, x: np.ndarray, sink: Any, cells: list[slice], gene_batch: int,
                     points: np.ndarray | None, dtype: str, tag: str, client: Any = None,
                     point_rows: np.ndarray | None = None):
    """Lay out ``sink`` for expression results; return ``build()`` → the graph of the pending blocks.

    ``points`` are the Mahalanobis evaluation points (None: no Mahalanobis stage).
    ``point_rows`` (with ``points``): for every cell of ``x``, its row in ``points``; the
    cells' latent variances are then read from the diagonals of Σ (computed for the
    distances anyway) instead of being computed per cell chunk.
    """
    n, g, g_all = len(x), model.n_genes, model.n_genes_all
    chunk = cells[0].stop - cells[0].start
    genes = [slice(a, min(a + gene_batch, g)) for a in range(0, g, gene_batch)]
    per_gene = model.condition1.per_gene_variance or model.condition2.per_gene_variance
    for key in EXPRESSION_KEYS:
        sink.add_array(key, (n, g), (chunk, gene_batch), ("cell", "gene"), dtype, stage="cells", axes=(0, 1))
    for key in STD_KEYS:
        if per_gene:
            sink.add_array(key, (n, g), (chunk, gene_batch), ("cell", "gene"), dtype, stage="cells", axes=(0, 1))
        else:
            sink.add_array(key, (n, 1), (chunk, 1), ("cell", "one"), dtype, stage="cells", axes=(0, None))
    sink.add_array("_fold_change_sum", (len(cells), g), (1, gene_batch), ("cell_chunk", "gene"),
                   stage="cells", axes=(0, 1))
    sink.add_array("mean_log_fold_change", (g,), (gene_batch,), ("gene",), stage="final", axes=(None,))
    maha = points is not None
    all_batches = [slice(a, min(a + gene_batch, g_all)) for a in range(0, g_all, gene_batch)]
    if maha:
        sink.add_array("_mahalanobis_all", (g_all,), (gene_batch,), ("gene_all",), stage="mahalanobis", axes=(0,))
        sink.add_array("_mahalanobis_branch", (1,), (1,), ("one",), dtype="int8", fill_value=-1)
        for key in ("mahalanobis_distances", "neg_log10_ptp", "neg_log10_ptp_df_points") + (
                ("mahalanobis_pvalue", "local_fdr", "tail_fdr") if model.has_null else ()):
            sink.add_array(key, (g,), (gene_batch,), ("gene",), stage="final", axes=(None,))
        if model.has_null:
            sink.add_array("is_de", (g,), (gene_batch,), ("gene",), dtype="bool", stage="final", axes=(None,))
        sink.add_stage("mahalanobis", (len(all_batches),))
    sink.add_stage("cells", (len(cells), len(genes)))
    sink.add_stage("final", (1,))

    landmark_rows = _landmark_rows(model, points, point_rows)

    def build():
        if landmark_rows is None:  # weights a worker would otherwise form for itself
            _form_weights(model)
        shared = share(model, f"kompot-model-{tag}", client)
        pending_blocks = sink.pending("cells")
        maha_tasks, sigma = [], None
        if maha:
            pending = sink.pending("mahalanobis")
            needed = pending or sink.read("_mahalanobis_branch")[0] < 0  # a resume with every batch done needs no Σ
            if needed or (point_rows is not None and pending_blocks):
                sigma = task(_sigma_task, shared, points, sink, key=f"kompot-mahalanobis-sigma-{tag}")
        variances = {}
        for i in sorted({i for i, _ in pending_blocks}):
            if sigma is not None and point_rows is not None:
                variances[i] = task(_variance_from_sigma, sigma, point_rows[cells[i]],
                                        key=f"kompot-predict-variance-{i}-{tag}")
            else:
                variances[i] = task(_variance_task, shared, x[cells[i]], key=f"kompot-predict-variance-{i}-{tag}")
        reused = _reused_batches(point_rows, len(points), len(cells), len(genes), pending_blocks, pending,
                                 n * g * 8) if maha else set()
        blocks = {(i, j): task(_expression_task, shared, x[cells[i]], cells[i], genes[j], (i, j), sink, per_gene,
                               variances[i], None if landmark_rows is None else landmark_rows[cells[i]],
                               j in reused, key=f"kompot-predict-expression-{i}-{j}-{tag}")
                  for i, j in pending_blocks}
        if maha:
            for (j,) in pending:
                known = None
                if j in reused:  # the real genes' μ2 − μ1 at the points: the blocks' fold changes
                    known = ([point_rows[c] for c in cells], [blocks[i, j] for i in range(len(cells))])
                maha_tasks.append(task(_mahalanobis_task, shared, points, sigma, all_batches[j], (j,), sink, known,
                                       key=f"kompot-mahalanobis-genes-{j}-{tag}"))
        _describe(sink, len(cells) * len(genes), len(blocks))
        meta = {"blocks_total": len(cells) * len(genes), "blocks_computed_last_run": len(blocks) + len(maha_tasks)}
        n_points = 0 if points is None else len(points)
        waits = [b for (i, j), b in blocks.items() if j not in reused]  # the others: through their distances
        return task(_finish_expression_task, shared, sink, waits + maha_tasks, sigma, meta, n, n_points, maha,
                        key=f"kompot-finish-expression-{tag}")

    return build


HELD_DIFFERENCES_BYTES = 2 << 30  # most fold changes kept for the distances (:func:`_reused_batches`)


def _reused_batches(point_rows, n_points: int, n_chunks: int, n_batches: int, pending_blocks, pending,
                    held_bytes: int) -> set:
    """Gene batches whose distances take ``μ2 − μ1`` at the points from the expression blocks.

    When the query cells are the evaluation points (every point the row of some cell in
    ``point_rows``: the shared landmarks when they are all the cells, Kompot's default up to
    5,000 cells, or the query cells themselves, SPEC §6.5 ``P = X_new``), the blocks' fold
    changes of a gene batch are its difference at the points, and the Mahalanobis task need
    not predict both means at every point again. A batch qualifies
    when all its blocks and its distances are computed in this run (a resumed run's written
    blocks may be float32), while the fold changes kept until their distances, ``held_bytes``
    in all, stay within :data:`HELD_DIFFERENCES_BYTES`.
    """
    if point_rows is None or held_bytes > HELD_DIFFERENCES_BYTES:
        return set()
    covered = np.zeros(n_points, dtype=bool)
    covered[point_rows] = True
    if not covered.all():
        return set()
    blocks = set(pending_blocks)
    return {j for (j,) in pending if j < n_batches and all((i, j) in blocks for i in range(n_chunks))}


def _landmark_rows(model: ExpressionModel, points: np.ndarray | None, point_rows: np.ndarray | None):
    """``point_rows`` when the evaluation points are the conditions' shared landmarks (the
    cells' means then come from :meth:`FunctionPredictor.inducing_mean`), else None."""
    pair = landmark_pair(model.condition1, model.condition2)
    if point_rows is None or pair is None:
        return None
    return point_rows if same_points(points, pair[0].state.inducing) else None


def _form_weights(model: ExpressionModel) -> None:
    """Form the conditions' weights here, once, before the model is shipped to workers."""
    for condition in (model.condition1, model.condition2):
        predictor = condition.function_predictor
        if isinstance(predictor, FunctionPredictor):
            predictor.weights  # noqa: B018 (a property that forms and keeps them)


def _describe(sink: Any, n_blocks: int, pending: int) -> None:
    if sink.path is not None:
        logger.info("kompot_dask: %s: %d of %d blocks to compute; the store takes up to %.3g GB uncompressed",
                    sink.final, pending, n_blocks, sink.planned_bytes / 1e9)


def run(build, client: Any = None, compute: bool = True):
    """Run a graph from :func:`abundance_graph` / :func:`expression_graph` (or return it)."""
    if not compute:
        return build()
    return run_graph(build, client)
