"""Store-backed predictions by function (kept for existing code): the classes' ``predict(..., store=...)``.

Both run the one differential pipeline (:mod:`kompot_dask.differential.pipeline`) into a
zarr store, as a dask graph on the active (or given) cluster.
"""

from __future__ import annotations

from typing import Any

__all__ = ["predict_abundance", "predict_expression"]


def predict_abundance(
    model,
    X_new: Any,
    store: Any,
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
    store : str or path-like
        Output zarr store (resumed if it holds an unfinished run of the same inputs).
    client : distributed.Client or str, optional
        Client or scheduler address; default the active client, else run in this process.
    cell_chunk : int, optional
        Cells per task (default: planned from the ``worker_memory_target`` option or the
        workers' memory limit, see :mod:`kompot_dask.execution.plan`).
    dtype : {"float64", "float32"}
        Storage type of the outputs.
    overwrite : bool
        Replace a store holding results of other inputs (once this run is complete).
    log_fold_change_threshold, ptp_threshold : float, optional
        Thresholds of the direction calls (default the model's).
    compute : bool, default True
        Run now. ``False`` only lays out the store and returns the graph.

    Returns
    -------
    xarray.Dataset or dask.delayed.Delayed
        Lazy, backed by ``store``, with dimension ``cell``; the graph if ``compute=False``.
    """
    if store is None:
        raise TypeError("`store` is required: the zarr directory to write the results to")
    return model.predict(X_new, log_fold_change_threshold, ptp_threshold, store=store, client=client,
                         cell_chunk=cell_chunk, dtype=dtype, overwrite=overwrite, compute=compute)


def predict_expression(
    model,
    X_new: Any,
    store: Any,
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
    store : str or path-like
        Output zarr store (resumed if it holds an unfinished run of the same inputs).
    compute_mahalanobis : bool, default True
        Per-gene Mahalanobis distances (one task per gene batch), PTPs and, with null
        genes, the FDR.
    use_landmarks, landmarks_override
        Where the Mahalanobis distance is evaluated (as in ``predict``).
    client : distributed.Client or str, optional
        Client or scheduler address; default the active client, else run in this process.
    cell_chunk, gene_batch : int, optional
        Block shape (default: planned, see :mod:`kompot_dask.execution.plan`).
    dtype : {"float64", "float32"}
        Storage type of the cells × genes layers.
    overwrite : bool
        Replace a store holding results of other inputs (once this run is complete).
    compute : bool, default True
        Run now. ``False`` only lays out the store and returns the graph.

    Returns
    -------
    xarray.Dataset or dask.delayed.Delayed
        Lazy, backed by ``store``: (cell, gene) layers, per-gene results; the graph if
        ``compute=False``.
    """
    if store is None:
        raise TypeError("`store` is required: the zarr directory to write the results to")
    return model.predict(X_new, compute_mahalanobis, True, use_landmarks, landmarks_override, store=store,
                         client=client, cell_chunk=cell_chunk, gene_batch=gene_batch, dtype=dtype,
                         overwrite=overwrite, compute=compute)
