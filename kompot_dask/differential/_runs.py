"""What a prediction run decides before its pipeline starts: checked arguments, the sink, block shapes.

Every argument of a store-backed run is checked here before anything touches the disk;
only then is the store opened (:meth:`ZarrSink.prepare`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..estimators._inputs import check_count
from ..execution.plan import cell_chunk_rows, memory_target, model_bytes, plan_blocks, row_slices
from ..io.results import MemorySink, ZarrSink, fingerprint, open_results

__all__ = ["check_run_arguments", "open_sink", "planned_blocks", "memory_blocks", "model_token", "finish_run"]

DTYPES = ("float64", "float32")


def check_run_arguments(store: Any, dtype: Any, overwrite: Any, compute: Any, client: Any = None,
                        **sizes: Any) -> dict:
    """Check the execution arguments of a run; returns ``dtype`` (its name) and the block sizes as ints (or None).

    Raises
    ------
    ValueError, TypeError
        Naming the argument and what it accepts.
    """
    if store is not None:
        if not isinstance(store, (str, os.PathLike)) or not os.fspath(store):
            raise TypeError(f"`store` must be a local directory path (str or os.PathLike); got {store!r}")
        if "://" in os.fspath(store):
            msg = (f"`store` must be a local or network-mounted directory; got {os.fspath(store)!r}. "
                   "Write locally and copy the finished store")
            raise ValueError(msg)
    try:
        dtype_name = np.dtype(dtype).name
    except TypeError:
        dtype_name = None
    if dtype_name not in DTYPES:
        msg = (f"`dtype` must be 'float64' or 'float32' (the storage type of the results); got {dtype!r}. "
               "Other types would truncate or overflow the results")
        raise ValueError(msg)
    for name, value in (("overwrite", overwrite), ("compute", compute)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False; got {value!r}")
    if store is None and (client is not None or compute is not True):
        msg = "`client` and `compute=False` need a `store`: an in-memory prediction runs in this process"
        raise ValueError(msg)
    return {"dtype": dtype_name, **{name: check_count(value, name, 1, allow_none=True) for name, value in sizes.items()}}


def model_token(*parts: Any) -> str:
    """Fingerprint of fitted predictors through their (landmark-sized) states."""
    out = []
    for p in parts:
        est = getattr(p, "__self__", p)
        groups = getattr(est, "group_predictors", None)
        if groups is not None:
            out.append([list(groups), [g.state for g in groups.values()]])
        else:
            out.append(getattr(p, "state", repr(type(p))))
    return fingerprint(out)


def n_inducing(*predictors: Any) -> int:
    """Landmarks (or training cells of a full GP) of fitted predictors; 2000 if unknown."""
    sizes = [len(p.state.inducing) for p in predictors if hasattr(getattr(p, "state", None), "inducing")]
    return max(sizes or [2000])


def n_samples(*variance_predictors: Any) -> int:
    """Samples per condition of fitted sample-variance predictors (0 if none or unknown)."""
    return max([getattr(vp, "n_groups", 0) for vp in variance_predictors if vp is not None] or [0])


def planned_blocks(n_cells: int, n_genes: int, model: Any, predictors: tuple, variances: tuple, client: Any,
                   cell_chunk: int | None, gene_batch: int | None) -> tuple[list[slice], int]:
    """Cell chunks and genes per batch: as given, else from the memory plan."""
    if cell_chunk is None or gene_batch is None:
        plan = plan_blocks(n_cells, n_genes, n_inducing(*predictors), n_samples(*variances), model_bytes(model),
                           memory_target(client))
        cell_chunk, gene_batch = cell_chunk or plan.cell_chunk, gene_batch or plan.gene_batch
    return row_slices(n_cells, 1, chunk_rows=min(cell_chunk, n_cells)), min(gene_batch, max(n_genes, 1))


def memory_blocks(n_cells: int, batch_size: int | None, cell_chunk: int | None, predictors: tuple,
                  variances: tuple = (), n_genes: int = 1) -> list[slice]:
    """Cell blocks of an in-memory prediction.

    ``cell_chunk`` if given; else at least ``batch_size`` cells (Kompot's memory knob), and
    as many more as one block of ``chunk_memory_bytes`` (the option) holds for the widest
    per-cell array: cells × landmarks, or cells × genes × (1 + samples). Kompot's default
    ``batch_size=100`` would otherwise cut the products into 100-row slivers that run at a
    fraction of the machine's matrix rate; the results do not depend on the block size.
    """
    if cell_chunk is None:
        width = max(n_inducing(*predictors), n_genes * (1 + n_samples(*variances)))
        cell_chunk = max(batch_size or 1, cell_chunk_rows(width))
    return row_slices(n_cells, 1, chunk_rows=min(cell_chunk, max(n_cells, 1)))


def open_sink(store: Any, token: str, meta: dict, overwrite: bool):
    """A :class:`MemorySink` (``store=None``) or the prepared :class:`ZarrSink`."""
    if store is None:
        return MemorySink()
    return ZarrSink.prepare(store, token, meta, overwrite)


def finish_run(result: Any, sink: Any, compute: bool):
    """The store-backed run's return value: the graph, or the opened store."""
    if not compute:
        return result
    return open_results(sink.final)
