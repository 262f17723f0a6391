"""Differential results streamed to zarr by a dask graph of (cell chunk × gene batch) tasks.

Building a prediction lays out the store (metadata only, like ``xarray.to_zarr(compute=
False)``) and returns a ``dask.delayed`` graph; nothing is computed until it runs. The
fitted model (landmark-sized state) is one graph input shared by every task; each block
task predicts with the same block function as the in-memory path, writes its own zarr
chunks and sets its marker. The Mahalanobis stage is a task for ``Sigma`` and its
Cholesky, then one task per gene batch; a last task does the per-gene reductions and
marks the store complete. Rerunning with the same inputs and store resumes: finished
blocks are not in the new graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._jax import x64
from ..differential._blocks import ABUNDANCE_KEYS, EXPRESSION_KEYS, STD_KEYS, abundance_block, expression_block
from ..differential._mahalanobis_inputs import evaluation_points, sample_factor
from ..estimators._inputs import as_cell_states, check_landmarks
from ..execution.plan import row_slices
from ..fdr import compute_fdr
from ..kernels import differential as dk
from ..kernels import mahalanobis as mk
from ..options import get_options
from ..execution.plan import memory_target, model_bytes, plan_blocks
from ..io.results import ResultStore, fingerprint, mark_block_done, write_block
from ..execution.runner import logger, resolve_client, run_graph, share

__all__ = ["predict_abundance", "predict_expression"]


def _model_token(*predictors: Any) -> str:
    """Fingerprint of fitted predictors through their (landmark-sized) states."""
    parts = []
    for p in predictors:
        est = getattr(p, "__self__", p)
        groups = getattr(est, "group_predictors", None)
        if groups is not None:
            parts.append([list(groups), [g.state for g in groups.values()]])
        else:
            parts.append(getattr(p, "state", repr(type(p))))
    return fingerprint(parts)


def _n_inducing(*predictors: Any) -> int:
    """Landmarks (or training cells of a full GP) of fitted predictors; 2000 if unknown."""
    sizes = [len(p.state.inducing) for p in predictors if hasattr(getattr(p, "state", None), "inducing")]
    return max(sizes or [2000])


def _n_samples(*variance_predictors: Any) -> int:
    """Samples per condition of fitted sample-variance predictors (0 if none or unknown)."""
    return max([getattr(vp, "n_groups", 0) for vp in variance_predictors if vp is not None] or [0])


def _query_cells(x: Any, n_features: int) -> np.ndarray:
    x = as_cell_states(x, "X_new", min_cells=1)
    if x.shape[1] != n_features:
        raise ValueError(f"`X_new` has {x.shape[1]} features but the model was fitted on {n_features}")
    return x


def _open_dataset(path: str):
    import xarray as xr

    return xr.open_zarr(path, consolidated=False)


# --------------------------------------------------------------------------- abundance
def _abundance_task(model, x_chunk, rows, index, path, lfc_thr, ptp_thr):
    with x64():
        vp1, vp2 = model.variance_predictors
        block = abundance_block(model.density_predictor1, model.density_predictor2, vp1, vp2, x_chunk, model.eps)
    for key in ABUNDANCE_KEYS:
        write_block(path, key, (rows,), block[key])
    directions = dk.directions(block["log_fold_change"], block["neg_log10_fold_change_ptp"], lfc_thr, ptp_thr)
    write_block(path, "log_fold_change_direction", (rows,), directions.astype(str))
    mark_block_done(path, "cells", index)
    return index


def _finish_task(path: str, blocks: list, meta: dict) -> str:
    """Mark the store complete: the graph's last task, after every block."""
    import zarr

    ResultStore(path, zarr.open_group(path, mode="r+")).finish(**meta)
    return path


def _describe(out: ResultStore, n_blocks: int, pending: int) -> None:
    logger.info(
        "kompot_dask: %s: %d of %d blocks to compute; the store takes up to %.3g GB uncompressed",
        out.path, pending, n_blocks, out.planned_bytes / 1e9,
    )


def _result(graph, out: ResultStore, client, compute: bool):
    if not compute:
        return graph
    run_graph(graph, client)
    return _open_dataset(out.path)


def predict_abundance(
    model,
    X_new: Any,
    store: str,
    *,
    client: Any = None,
    cell_chunk: int | None = None,
    dtype: str = "float64",
    overwrite: bool = False,
    log_fold_change_threshold: float | None = None,
    ptp_threshold: float | None = None,
    compute: bool = True,
):
    """:meth:`DifferentialAbundance.predict` streamed to a zarr store, one task per cell chunk.

    Parameters
    ----------
    model : DifferentialAbundance
        A fitted model.
    X_new : array (n_cells, n_features)
    store : str
        Output zarr store (resumed if it holds an unfinished run of the same inputs).
    client : distributed.Client or str, optional
        Client or scheduler address; default the active client, else run in this process.
    cell_chunk : int, optional
        Cells per task (default: planned from the ``worker_memory_target`` option or the
        workers' memory limit, see :mod:`kompot_dask.execution.plan`).
    dtype : {"float64", "float32"}
        Storage type of the outputs.
    overwrite : bool
        Replace a store holding other results.
    log_fold_change_threshold, ptp_threshold : float, optional
        Thresholds of the direction calls (default the model's).
    compute : bool, default True
        Run now. ``False`` only lays out the store and returns the graph (a
        ``dask.delayed.Delayed``); computing it fills the store, which
        :func:`xarray.open_zarr` then opens.

    Returns
    -------
    xarray.Dataset or dask.delayed.Delayed
        Lazy, backed by ``store``, with dimension ``cell``; the graph if ``compute=False``.
    """
    from ..differential._checks import check_lfc_threshold, check_ptp_threshold

    if model.density_predictor1 is None or model.density_predictor2 is None:
        raise ValueError("DifferentialAbundance is not fitted; call `fit` first")
    lfc_thr = check_lfc_threshold(model.log_fold_change_threshold if log_fold_change_threshold is None
                                  else log_fold_change_threshold)
    ptp_thr = check_ptp_threshold(model.ptp_threshold if ptp_threshold is None else ptp_threshold)
    x = _query_cells(X_new, model.density_predictor1.state.inducing.shape[1])
    client = resolve_client(client)
    if cell_chunk is None:
        m = _n_inducing(model.density_predictor1, model.density_predictor2)
        samples = _n_samples(*model.variance_predictors)
        cell_chunk = plan_blocks(len(x), 1, m, samples, model_bytes(model), memory_target(client)).cell_chunk
    chunk = int(cell_chunk)
    slices = row_slices(len(x), 1, chunk_rows=chunk)
    token = fingerprint(x, chunk, dtype, lfc_thr, ptp_thr, model.eps,
                        _model_token(model.density_predictor1, model.density_predictor2, *model.variance_predictors))
    out = ResultStore.open_or_create(store, token, {"kind": "abundance", "n_cells": len(x)}, overwrite)
    for key in ABUNDANCE_KEYS:
        out.add_array(key, (len(x),), (chunk,), ("cell",), dtype)
    out.add_array("log_fold_change_direction", (len(x),), (chunk,), ("cell",), str, fill_value="")
    out.add_stage("cells", (len(slices),))
    import dask

    shared = share(model, f"kompot-model-{token[:10]}", client)
    blocks = [
        dask.delayed(_abundance_task, pure=False)(
            shared, x[slices[i]], slices[i], (i,), out.path, lfc_thr, ptp_thr,
            dask_key_name=f"kompot-predict-abundance-{i}-{token[:10]}")
        for (i,) in out.pending("cells")
    ]
    _describe(out, len(slices), len(blocks))
    meta = {"blocks_total": len(slices), "blocks_computed_last_run": len(blocks)}
    graph = dask.delayed(_finish_task, pure=False)(out.path, blocks, meta,
                                                   dask_key_name=f"kompot-finish-abundance-{token[:10]}")
    return _result(graph, out, client, compute)


# -------------------------------------------------------------------------- expression
def _expression_task(model, x_chunk, rows, genes, index, path, per_gene):
    with x64():
        m1, m2 = model._models()
        block = expression_block(m1, m2, x_chunk, genes, model.eps)
    for key in EXPRESSION_KEYS:
        write_block(path, key, (rows, genes), block[key])
    if per_gene or genes.start == 0:
        cols = genes if per_gene else slice(0, 1)
        for key in STD_KEYS:
            write_block(path, key, (rows, cols), block[key])
    i = index[0]
    write_block(path, "_fold_change_sum", (slice(i, i + 1), genes), block["fold_change"].sum(axis=0)[None])
    mark_block_done(path, "cells", index)
    return index


def _sigma_task(model, points, path) -> tuple:
    """``Sigma = Sigma1 + Sigma2`` at the evaluation points, the branch, and its shared Cholesky.

    The branch is also recorded in the store, so that a resumed run whose gene batches are
    all done can finish without recomputing ``Sigma``.
    """
    m1, m2 = model._models()
    has_sv = m1.variance_predictor is not None or m2.variance_predictor is not None
    has_ev = m1.obs_variance_predictor is not None or m2.obs_variance_predictor is not None
    with x64():
        sigma = m1.covariance(points, diag=False) + m2.covariance(points, diag=False)
        branch = mk.select_branch(len(points), mk.diag_ratio(sigma), has_sv, has_ev)
        # One Cholesky for every gene batch (the branches that use a shared factor).
        shared_branch = branch in (mk.BRANCH_SHARED, mk.BRANCH_FACTOR_TRICK, mk.BRANCH_WOODBURY)
        lower = np.asarray(mk.shared_cholesky(sigma, model.eps)) if shared_branch else None
    write_block(path, "_mahalanobis_branch", (slice(0, 1),), np.array([mk.BRANCHES.index(branch)]))
    return np.asarray(sigma), lower, branch


def _mahalanobis_task(model, points, sigma_parts, genes, index, path):
    sigma, lower, _ = sigma_parts
    with x64():
        m1, m2 = model._models()
        delta = m2.mean(points, genes) - m1.mean(points, genes)
        n = delta.shape[1]
        q = sample_factor(m1.variance_predictor, m2.variance_predictor, points, n, genes)
        v = None
        if m1.obs_variance_predictor is not None or m2.obs_variance_predictor is not None:
            v = np.broadcast_to(m1.obs_variance(points, genes) + m2.obs_variance(points, genes), delta.shape)
        result = mk.mahalanobis_distances(delta, sigma, model.eps, q=q, empirical_var=v, lower=lower)
    write_block(path, "_mahalanobis_all", (genes,), result.distances)
    mark_block_done(path, "mahalanobis", index)
    return result.branch


def predict_expression(
    model,
    X_new: Any,
    store: str,
    *,
    compute_mahalanobis: bool = True,
    use_landmarks: bool = True,
    landmarks_override: Any = None,
    client: Any = None,
    cell_chunk: int | None = None,
    gene_batch: int | None = None,
    dtype: str = "float64",
    overwrite: bool = False,
    compute: bool = True,
):
    """:meth:`DifferentialExpression.predict` streamed to a zarr store as (cells × genes) tasks.

    Parameters
    ----------
    model : DifferentialExpression
        A fitted model.
    X_new : array (n_cells, n_features)
    store : str
        Output zarr store (resumed if it holds an unfinished run of the same inputs).
    compute_mahalanobis : bool, default True
        Per-gene Mahalanobis distances (one task per gene batch), PTPs and, with null
        genes, the FDR.
    use_landmarks, landmarks_override
        Where the Mahalanobis distance is evaluated (as in ``predict``).
    client : distributed.Client or str, optional
        Client or scheduler address; default the active client, else run in this process.
    cell_chunk, gene_batch : int, optional
        Block shape. Default: the ``gene_batch_size`` option for genes, and a shape planned
        from the ``worker_memory_target`` option or the workers' memory limit (see
        :mod:`kompot_dask.execution.plan`).
    dtype : {"float64", "float32"}
        Storage type of the cells × genes layers.
    overwrite : bool
        Replace a store holding other results.
    compute : bool, default True
        Run now. ``False`` only lays out the store and returns the graph (a
        ``dask.delayed.Delayed``); computing it fills the store.

    Returns
    -------
    xarray.Dataset or dask.delayed.Delayed
        Lazy, backed by ``store``: (cell, gene) layers, per-gene results; the graph if
        ``compute=False``.
    """
    m1, m2 = model._models()
    x = _query_cells(X_new, model.n_features)
    g, g_all = model.n_genes, model._gene_count
    client = resolve_client(client)
    gene_batch = gene_batch or get_options()["gene_batch_size"]
    if cell_chunk is None or gene_batch is None:
        m = _n_inducing(model.function_predictor1, model.function_predictor2)
        samples = _n_samples(m1.variance_predictor, m2.variance_predictor)
        plan = plan_blocks(len(x), g, m, samples, model_bytes(model), memory_target(client))
        cell_chunk, gene_batch = cell_chunk or plan.cell_chunk, gene_batch or plan.gene_batch
    chunk, batch = int(cell_chunk), int(gene_batch)
    per_gene = m1.per_gene_variance or m2.per_gene_variance
    cells = row_slices(len(x), 1, chunk_rows=chunk)
    genes = [slice(a, min(a + batch, g)) for a in range(0, g, batch)]
    if landmarks_override is not None:
        landmarks_override = check_landmarks(landmarks_override, model.n_features, "landmarks_override")
    points, _ = evaluation_points(x, m1.landmarks, use_landmarks, landmarks_override)
    token = fingerprint(x, chunk, batch, dtype, compute_mahalanobis, points if compute_mahalanobis else None,
                        model.eps, _model_token(model.function_predictor1, model.function_predictor2,
                                                m1.variance_predictor, m2.variance_predictor,
                                                m1.obs_variance_predictor, m2.obs_variance_predictor))
    out = ResultStore.open_or_create(store, token, {"kind": "expression", "n_cells": len(x), "n_genes": g}, overwrite)
    for key in EXPRESSION_KEYS:
        out.add_array(key, (len(x), g), (chunk, batch), ("cell", "gene"), dtype)
    std_shape = (len(x), g) if per_gene else (len(x), 1)
    for key in STD_KEYS:
        out.add_array(key, std_shape, (chunk, batch if per_gene else 1), ("cell", "gene" if per_gene else "one"), dtype)
    out.add_array("_fold_change_sum", (len(cells), g), (1, batch), ("cell_chunk", "gene"))
    out.add_stage("cells", (len(cells), len(genes)))
    import dask

    tag = token[:10]
    shared = share(model, f"kompot-model-{tag}", client)
    blocks = [
        dask.delayed(_expression_task, pure=False)(
            shared, x[cells[i]], cells[i], genes[j], (i, j), out.path, per_gene,
            dask_key_name=f"kompot-predict-expression-{i}-{j}-{tag}")
        for i, j in out.pending("cells")
    ]
    n_blocks = len(blocks)
    maha, sigma = [], None
    if compute_mahalanobis:
        all_batches = [slice(a, min(a + batch, g_all)) for a in range(0, g_all, batch)]
        out.add_array("_mahalanobis_all", (g_all,), (batch,), ("gene_all",))
        out.add_array("_mahalanobis_branch", (1,), (1,), ("one",), dtype="int8", fill_value=-1, compressors=None)
        out.add_stage("mahalanobis", (len(all_batches),))
        pending = out.pending("mahalanobis")
        # A resume with every gene batch done (and the branch recorded) needs no Sigma.
        if pending or out.group["_mahalanobis_branch"][0] < 0:
            sigma = dask.delayed(_sigma_task, pure=False)(
                shared, points, out.path, dask_key_name=f"kompot-mahalanobis-sigma-{tag}")
        maha = [
            dask.delayed(_mahalanobis_task, pure=False)(
                shared, points, sigma, all_batches[j], (j,), out.path,
                dask_key_name=f"kompot-mahalanobis-genes-{j}-{tag}")
            for (j,) in pending
        ]
    _describe(out, len(cells) * len(genes), n_blocks)
    meta = {"blocks_total": len(cells) * len(genes), "blocks_computed_last_run": n_blocks + len(maha)}
    graph = dask.delayed(_finish_expression_task, pure=False)(
        shared, out.path, blocks + maha, sigma, meta, batch, len(x), len(points), compute_mahalanobis,
        dask_key_name=f"kompot-finish-expression-{tag}")
    return _result(graph, out, client, compute)


def _finish_expression_task(model, path, blocks, sigma_parts, meta, batch, n_cells, n_points, maha) -> str:
    """Per-gene reductions (mean LFC, PTPs, FDR: gene-sized) and the completion mark."""
    import zarr

    out = ResultStore(path, zarr.open_group(path, mode="r+"))
    _finish_expression(model, out, n_cells, batch, n_points, maha)
    branch = None
    if maha:
        branch = mk.BRANCHES[int(out.group["_mahalanobis_branch"][0])]
    out.finish(**meta, mahalanobis_branch=branch)
    return path


def _finish_expression(model, out: ResultStore, n_cells: int, batch: int, n_points: int, maha: bool) -> None:
    """Per-gene reductions on the client: mean LFC, PTPs, FDR (small arrays only)."""
    g = model.n_genes
    mean_lfc = out.group["_fold_change_sum"][...].sum(axis=0) / n_cells
    out.add_array("mean_log_fold_change", (g,), (batch,), ("gene",))[...] = mean_lfc
    if not maha:
        return
    dist_all = out.group["_mahalanobis_all"][...]
    dist = dist_all[:g]
    per_gene = {
        "mahalanobis_distances": dist,
        "neg_log10_ptp": mk.chi2_neg_log10_ptp(dist, model.n_features),
        "neg_log10_ptp_df_points": mk.chi2_neg_log10_ptp(dist, n_points),
    }
    if model.null is not None:
        table = compute_fdr(dist, dist_all[g:], model.fdr_threshold, model.gene_names)
        per_gene.update(
            mahalanobis_pvalue=table["pvalue"].to_numpy(),
            local_fdr=table["local_fdr"].to_numpy(),
            tail_fdr=table["tail_fdr"].to_numpy(),
            is_de=table["is_de"].to_numpy(),
        )
    for key, values in per_gene.items():
        dtype = "bool" if values.dtype == bool else "float64"
        out.add_array(key, (g,), (batch,), ("gene",), dtype, fill_value=False if dtype == "bool" else None)[...] = values
