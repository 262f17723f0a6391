"""Block shapes chosen from a memory target per worker.

A prediction task holds the shared model plus the working set of one block. For a block of
``c`` cells x ``g`` genes with ``M`` landmarks and ``S`` samples per condition that is
about ``8 (3 c M + (10 + 2 S) c g)`` bytes (kernel and triangular-solve blocks of both
conditions, per-sample predictions, the six output layers). :func:`plan_blocks` picks the
largest blocks whose estimate, with the model counted twice (its copy and the one being
deserialised), stays within the target.
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

import numpy as np

__all__ = ["BlockPlan", "plan_blocks", "model_bytes", "memory_target", "row_slices", "cell_chunk_rows",
           "expression_chunk_rows", "NN_CHUNK_CELLS", "DATASET_CELL_CHUNK", "DATASET_GENE_CHUNK"]

DEFAULT_TARGET = 2 * 2**30
WORKER_BASELINE = 400 * 2**20  # a worker process with numpy, JAX and distributed loaded
TARGET_FRACTION = 0.6  # of a worker's memory limit: dask starts spilling at 0.6 by default
MAX_GENE_BATCH = 1024
MIN_CELLS = 64
NN_CHUNK_CELLS = 2**15  # cells per nearest-neighbour search task (unless `cell_chunk_size` says otherwise)
DATASET_CELL_CHUNK = 4096  # stored chunk of a dataset along cells
DATASET_GENE_CHUNK = 1024  # and along genes
EXPRESSION_CHUNK_BYTES = 64 * 2**20  # one dense chunk of expression read from a sparse or unchunked source


class BlockPlan(NamedTuple):
    """Cells per chunk and genes per batch, and the per-task memory they are expected to use."""

    cell_chunk: int
    gene_batch: int
    task_bytes: int
    target_bytes: int


def model_bytes(model: Any) -> int:
    """Serialised size of a fitted model (large buffers counted without copying them)."""
    buffers: list = []
    header = pickle.dumps(model, protocol=5, buffer_callback=buffers.append)
    return len(header) + sum(memoryview(b).nbytes for b in buffers)


def memory_target(client: Any = None) -> int:
    """Bytes one task may use: the ``worker_memory_target`` option, else a fraction of the
    smallest worker memory limit of ``client``, else 2 GiB."""
    from ..options import get_options

    target = get_options()["worker_memory_target"]
    if target is not None:
        return int(target)
    if client is not None:
        try:
            limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
        except Exception:  # pragma: no cover - a client that cannot report its workers
            limits = []
        limits = [int(v) for v in limits if v]
        if limits:
            return int(TARGET_FRACTION * min(limits))
    return DEFAULT_TARGET


def _task_bytes(cells: int, genes: int, landmarks: int, samples: int) -> int:
    return 8 * (3 * cells * landmarks + (10 + 2 * samples) * cells * genes)


def plan_blocks(
    n_cells: int, n_genes: int, n_landmarks: int, n_samples: int, shared_bytes: int, target: int
) -> BlockPlan:
    """The largest (cells x genes) block whose working set fits ``target`` bytes.

    Parameters
    ----------
    n_cells, n_genes : int
        Size of the prediction.
    n_landmarks : int
        Landmarks (or training cells of a full GP) of the models.
    n_samples : int
        Samples per condition (0 without sample variance).
    shared_bytes : int
        Size of the shared model (see :func:`model_bytes`).
    target : int
        Memory one task may use (see :func:`memory_target`).

    Raises
    ------
    MemoryError
        When even the smallest block does not fit, with what to change.
    """
    avail = target - WORKER_BASELINE - 2 * shared_bytes
    gene_batch = max(1, min(n_genes, MAX_GENE_BATCH))
    while True:
        per_cell = _task_bytes(1, gene_batch, n_landmarks, n_samples)
        cells = avail // per_cell if avail > 0 else 0
        if cells >= min(n_cells, 4 * MIN_CELLS) or gene_batch == 1:
            break
        gene_batch = max(1, gene_batch // 2)
    cells = int(min(n_cells, cells))
    if cells < min(n_cells, MIN_CELLS):
        need = WORKER_BASELINE + 2 * shared_bytes + _task_bytes(min(n_cells, MIN_CELLS), gene_batch, n_landmarks, n_samples)
        msg = (
            f"a worker memory target of {target / 2**30:.2f} GiB is too small for this model "
            f"({shared_bytes / 2**30:.2f} GiB shared, {n_landmarks} landmarks): about "
            f"{need / 2**30:.2f} GiB is needed. Raise the workers' memory limit or the "
            "`worker_memory_target` option, or use fewer landmarks"
        )
        raise MemoryError(msg)
    return BlockPlan(cells, gene_batch, _task_bytes(cells, gene_batch, n_landmarks, n_samples) + 2 * shared_bytes, target)


def cell_chunk_rows(n_columns: int) -> int:
    """Cells per chunk for a block with ``n_columns`` float64 columns (landmarks)."""
    from ..options import get_options

    options = get_options()
    if options["cell_chunk_size"] is not None:
        return int(options["cell_chunk_size"])
    return max(256, int(options["chunk_memory_bytes"] // (8 * max(n_columns, 1))))


def expression_chunk_rows(n_genes: int) -> int:
    """Cells per chunk of expression read from a source without chunks of its own (sparse,
    in memory): the ``cell_chunk_size`` option, else ``EXPRESSION_CHUNK_BYTES`` of dense
    float64, at most ``DATASET_CELL_CHUNK`` cells."""
    from ..options import get_options

    rows = get_options()["cell_chunk_size"]
    if rows is not None:
        return int(rows)
    return int(min(DATASET_CELL_CHUNK, max(1, EXPRESSION_CHUNK_BYTES // (8 * max(n_genes, 1)))))


def _own_row_chunks(arr: Any) -> tuple[int, ...] | None:
    chunks = getattr(arr, "chunks", None)
    if not chunks:
        return None
    first = chunks[0]
    if isinstance(first, tuple):  # dask: sizes of every chunk
        return tuple(int(c) for c in first)
    n = int(arr.shape[0])
    size = int(first)  # zarr / h5py: one regular chunk size
    return tuple([size] * (n // size) + ([n % size] if n % size else []))


def row_slices(n: int, n_columns: int, like: Any = None, chunk_rows: int | None = None) -> list[slice]:
    """Split ``n`` cells into chunks.

    Priority: explicit ``chunk_rows``; the chunks of ``like`` (a dask, zarr or h5py
    array); otherwise :func:`cell_chunk_rows` for blocks with
    ``n_columns`` columns.
    """
    sizes = None if like is None or chunk_rows is not None else _own_row_chunks(like)
    if sizes is None:
        step = chunk_rows or cell_chunk_rows(n_columns)
        sizes = tuple(min(step, n - a) for a in range(0, n, step))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    if bounds[-1] != n:
        raise ValueError(f"chunk sizes {sizes} do not add up to {n} cells")
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
