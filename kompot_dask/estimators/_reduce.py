"""Sums over chunks of cells: in this process, or on the active dask cluster.

A fit that needs ``sum_c term(chunk_c, *args)`` (the density objective, the ridge start,
a Lloyd step...) or ``[term(chunk_c, *args)]`` (nearest-neighbour distances) cuts its
cells into chunks and asks :func:`open_reducer` for a reducer:
:class:`LocalChunks` adds the terms here, one chunk after another;
:class:`kompot_dask.parallel.reduce.ClusterChunks` runs one task per chunk on the worker
holding that chunk. Both add the parts in chunk order, so they give the same numbers.
Terms are top-level functions returning tuples of arrays (picklable for workers).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..options import get_options

__all__ = ["LocalChunks", "open_reducer", "add_in_order"]


def add_in_order(parts: Iterable[tuple]) -> tuple:
    """Element-wise sum of tuples of arrays, added strictly in the given order."""
    total: list | None = None
    for part in parts:
        if total is None:
            total = [np.array(p) for p in part]
        else:
            for i, p in enumerate(part):
                total[i] = total[i] + p
    if total is None:
        raise ValueError("nothing to sum: no chunks")
    return tuple(total)


class LocalChunks:
    """Sums per-chunk terms in this process, one chunk after another (memory ~ one chunk)."""

    def __init__(self, chunks: Sequence[Any]):
        self.chunks = list(chunks)

    def share(self, obj):
        """Make ``obj`` available to every chunk's term (here: itself)."""
        return obj

    def release(self, shared) -> None:
        """Forget what :meth:`share` returned (nothing to do here)."""

    def reduce(self, fn: Callable[..., tuple], *args) -> tuple:
        """``sum_c fn(chunk_c, *args)``."""
        return add_in_order(fn(chunk, *args) for chunk in self.chunks)

    def map(self, fn: Callable[..., Any], *args) -> list:
        """``[fn(chunk_c, *args) for every chunk]``, in chunk order."""
        return [fn(chunk, *args) for chunk in self.chunks]

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalChunks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reducer(chunks: Sequence[Any], name: str, local: bool = False):
    """Where a fit sums its chunk terms: on the active dask cluster if there is one.

    The cluster is used when the ``fit_on_cluster`` option is on (default), there is more
    than one chunk, and a ``distributed.Client`` is active outside a worker task (a fit
    running inside a task, such as one sample of a fan-out, stays in its task). ``name``
    labels the tasks (``kompot-<name>-<term>-<chunk>-<run>``); ``local=True`` keeps the
    sums in this process.
    """
    if not local and len(chunks) > 1 and get_options()["fit_on_cluster"]:
        from ..parallel.cluster import active_client

        client = active_client()
        if client is not None:
            from ..parallel.reduce import ClusterChunks

            return ClusterChunks(client, chunks, name)
    return LocalChunks(chunks)
