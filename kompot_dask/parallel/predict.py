"""Differential results streamed to zarr as (cell chunk × gene batch) tasks on a dask cluster.

The fitted model (landmark-sized state) is scattered to the workers once; each task
predicts one block with the same block function as the in-memory path, writes its own
zarr chunks and sets its marker. Rerunning with the same inputs and store resumes:
finished blocks are skipped. The store is marked complete last, and the result is
returned as a lazy xarray Dataset backed by the store.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._jax import x64
from ..differential._blocks import ABUNDANCE_KEYS, EXPRESSION_KEYS, STD_KEYS, abundance_block, expression_block
from ..differential._mahalanobis_inputs import evaluation_points, sample_factor
from ..estimators._inputs import as_cell_states, check_landmarks, row_slices
from ..fdr import compute_fdr
from ..kernels import differential as dk
from ..kernels import mahalanobis as mk
from ..options import get_options
from .results import ResultStore, fingerprint, mark_block_done, write_block
from .runner import resolve_client, run_tasks

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
        Cells per task (default 4096).
    dtype : {"float64", "float32"}
        Storage type of the outputs.
    overwrite : bool
        Replace a store holding other results.
    log_fold_change_threshold, ptp_threshold : float, optional
        Thresholds of the direction calls (default the model's).

    Returns
    -------
    xarray.Dataset
        Lazy, backed by ``store``, with dimension ``cell``.
    """
    from ..differential._checks import check_lfc_threshold, check_ptp_threshold

    if model.density_predictor1 is None or model.density_predictor2 is None:
        raise ValueError("DifferentialAbundance is not fitted; call `fit` first")
    lfc_thr = check_lfc_threshold(model.log_fold_change_threshold if log_fold_change_threshold is None
                                  else log_fold_change_threshold)
    ptp_thr = check_ptp_threshold(model.ptp_threshold if ptp_threshold is None else ptp_threshold)
    x = _query_cells(X_new, model.density_predictor1.state.inducing.shape[1])
    chunk = int(cell_chunk or 4096)
    slices = row_slices(len(x), 1, chunk_rows=chunk)
    token = fingerprint(x, chunk, dtype, lfc_thr, ptp_thr, model.eps,
                        _model_token(model.density_predictor1, model.density_predictor2, *model.variance_predictors))
    out = ResultStore.open_or_create(store, token, {"kind": "abundance", "n_cells": len(x)}, overwrite)
    for key in ABUNDANCE_KEYS:
        out.add_array(key, (len(x),), (chunk,), ("cell",), dtype)
    out.add_array("log_fold_change_direction", (len(x),), (chunk,), ("cell",), str, fill_value="")
    out.add_stage("cells", (len(slices),))
    todo = out.pending("cells")
    client = resolve_client(client)
    shared = client.scatter(model, broadcast=True) if client is not None else model
    tasks = [
        (f"kompot-predict-abundance-{i}-{token[:10]}", _abundance_task,
         (shared, x[slices[i]], slices[i], (i,), out.path, lfc_thr, ptp_thr))
        for (i,) in todo
    ]
    run_tasks(tasks, client)
    out.finish(blocks_total=len(slices), blocks_computed_last_run=len(tasks))
    return _open_dataset(out.path)


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


def _mahalanobis_task(model, points, sigma, lower, genes, index, path):
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
        Block shape (default 4096 cells × the ``gene_batch_size`` option or 1024 genes).
    dtype : {"float64", "float32"}
        Storage type of the cells × genes layers.
    overwrite : bool
        Replace a store holding other results.

    Returns
    -------
    xarray.Dataset
        Lazy, backed by ``store``: (cell, gene) layers, per-gene results.
    """
    m1, m2 = model._models()
    x = _query_cells(X_new, model.n_features)
    g, g_all = model.n_genes, model._gene_count
    chunk = int(cell_chunk or 4096)
    batch = int(gene_batch or get_options()["gene_batch_size"] or 1024)
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
    client = resolve_client(client)
    shared = client.scatter(model, broadcast=True) if client is not None else model
    tasks = [
        (f"kompot-predict-expression-{i}-{j}-{token[:10]}", _expression_task,
         (shared, x[cells[i]], cells[i], genes[j], (i, j), out.path, per_gene))
        for i, j in out.pending("cells")
    ]
    computed = len(tasks)
    branch = None
    if compute_mahalanobis:
        all_batches = [slice(a, min(a + batch, g_all)) for a in range(0, g_all, batch)]
        out.add_array("_mahalanobis_all", (g_all,), (batch,), ("gene_all",))
        out.add_stage("mahalanobis", (len(all_batches),))
        has_sv = m1.variance_predictor is not None or m2.variance_predictor is not None
        has_ev = m1.obs_variance_predictor is not None or m2.obs_variance_predictor is not None
        with x64():
            sigma = m1.covariance(points, diag=False) + m2.covariance(points, diag=False)
            branch = mk.select_branch(len(points), mk.diag_ratio(sigma), has_sv, has_ev)
            # One Cholesky for every gene batch (the branches that use a shared factor).
            shared_branch = branch in (mk.BRANCH_SHARED, mk.BRANCH_FACTOR_TRICK, mk.BRANCH_WOODBURY)
            lower = mk.shared_cholesky(sigma, model.eps) if shared_branch else None
        sigma_f, lower_f = (client.scatter([sigma, lower], broadcast=True) if client is not None
                            else (sigma, lower))
        maha = [
            (f"kompot-mahalanobis-genes-{j}-{token[:10]}", _mahalanobis_task,
             (shared, points, sigma_f, lower_f, all_batches[j], (j,), out.path))
            for (j,) in out.pending("mahalanobis")
        ]
        computed += len(maha)
        tasks += maha
    run_tasks(tasks, client)
    _finish_expression(model, out, len(x), batch, len(points), compute_mahalanobis)
    out.finish(blocks_total=len(cells) * len(genes), blocks_computed_last_run=computed, mahalanobis_branch=branch)
    return _open_dataset(out.path)


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
