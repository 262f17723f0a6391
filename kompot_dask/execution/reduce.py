"""Sums over chunks of cells: in this process, or on the active dask cluster.

A fit that needs ``sum_c term(chunk_c, *args)`` (the density objective, the ridge start,
a Lloyd step...) or ``[term(chunk_c, *args)]`` (nearest-neighbour distances) cuts its
cells into chunks and asks :func:`open_reducer` for a reducer:
:class:`LocalChunks` adds the terms here, one chunk after another;
:class:`ClusterChunks` runs one task per chunk on the worker
holding that chunk. Both add the parts in chunk order, so equal terms give the same sums,
bit for bit. The terms themselves are bit-identical only where the worker's BLAS uses as
many threads as this process's: dask starts workers with one BLAS thread, and some OpenBLAS
kernels round differently with more (JAX's triangular solves go through it); a fit then
differs from the in-process one by rounding that the fit amplifies (measured: at most
6e-11 of each array's scale; ``tests/test_parallel.py`` asserts 1e-8).
Terms are top-level functions returning tuples of arrays (picklable for workers).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..options import get_options
from .runner import InOptions

__all__ = ["LocalChunks", "ClusterChunks", "open_reducer", "add_in_order", "GATHER_BYTES"]


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

    def replace_chunks(self, fn: Callable[..., Any], *args) -> None:
        """Replace every chunk by ``fn(chunk, *args)`` (a form the later terms read faster)."""
        self.chunks = [fn(chunk, *args) for chunk in self.chunks]

    def row_budget(self) -> int:
        """Bytes of per-chunk rows this reducer may keep over its chunks: the
        ``factor_rows_bytes`` option."""
        return get_options()["factor_rows_bytes"]

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
        from .cluster import active_client

        client = active_client()
        if client is not None:
            return ClusterChunks(client, chunks, name)
    return LocalChunks(chunks)


# ------------------------------------------------------------------ on a dask cluster
# Sums (and maps) over cell chunks held on the workers of a dask cluster: the fits' reductions.
#
# A fit cuts its training cells into chunks (:class:`~kompot_dask.estimators._density_terms.DensityChunk`).
# :class:`ClusterChunks` places each chunk on a worker once, as a task result (so a lost
# worker's chunks are rebuilt by the scheduler), and every reduction (the ridge start, each
# L-BFGS evaluation, the Laplace diagonal) becomes one small task per chunk running where the
# chunk lives. Only landmark-sized results travel back; the client adds them in chunk order,
# in the order :class:`LocalChunks` adds them (the same summation order; a worker's single-
# threaded BLAS may still round the per-chunk terms differently, at ~1e-15 relative).
#
# Large per-chunk results (the ridge start's ``m x m`` Gram matrix is 32 MB at m = 2000) are
# computed and gathered a window of chunks at a time, so neither the client nor the workers
# ever hold more than :data:`GATHER_BYTES` of them at once, however many chunks there are.
GATHER_BYTES = 256 * 2**20  # per-chunk results in flight at once, per reduction


def _hold(obj: Any) -> Any:
    """A task whose result is its argument: puts data on a worker, recomputable if lost."""
    return obj


class ClusterChunks:
    """Reducer over chunks living on the workers of ``client``.

    Parameters
    ----------
    client : distributed.Client
    chunks : sequence
        The per-chunk data; each becomes one task result on some worker.
    name : str
        Short label in task names (``kompot-<name>-<term>-<chunk>-<run>``).
    """

    def __init__(self, client: Any, chunks: Sequence[Any], name: str):
        self.client, self.name = client, name
        self.run = uuid.uuid4().hex[:8]
        self._calls = 0
        self._futures = [
            client.submit(_hold, chunk, key=f"kompot-{name}-cells-{i}-{self.run}", retries=2)
            for i, chunk in enumerate(chunks)
        ]
        self._shared: list[Any] = []
        self._windows: dict[str, int] = {}  # chunks in flight per term, from its result size

    def share(self, obj: Any):
        """Put ``obj`` on every worker once; the returned future is passed to every chunk term.

        Scattered with a copy per worker (so losing a worker loses no shared state), not
        sent through the scheduler inside a task (it may be tens of MB: ``Lp`` is m x m).
        """
        # In a list: scatter would split a tuple into one future per field.
        (future,) = self.client.scatter([obj], broadcast=True, hash=False)
        self._shared.append(future)
        return future

    def release(self, future: Any) -> None:
        """Drop a future returned by :meth:`share` from the cluster (before :meth:`close`)."""
        future.release()
        self._shared = [f for f in self._shared if f is not future]

    def reduce(self, fn: Callable[..., tuple], *args: Any) -> tuple:
        """``sum_c fn(chunk_c, *args)``: one task per chunk, results added in chunk order.

        The first call of a term runs one chunk alone to learn its result size; then as many
        chunks run at once as keep their results within :data:`GATHER_BYTES`.
        """
        total: tuple | None = None
        for parts in self._windows_of_parts(fn, args):
            total = add_in_order(parts if total is None else [total, *parts])
        if total is None:
            raise ValueError("nothing to sum: no chunks")
        return total

    def map(self, fn: Callable[..., Any], *args: Any) -> list:
        """``[fn(chunk_c, *args) for every chunk]``, one task per chunk, in chunk order."""
        return [part for parts in self._windows_of_parts(fn, args) for part in parts]

    def _windows_of_parts(self, fn: Callable[..., Any], args: tuple):
        """Run ``fn`` on every chunk, a window of chunks at a time; yield each window's results."""
        self._calls += 1
        term = fn.__name__.replace("_", "-")
        task = InOptions(fn)  # the worker computes under this process's options
        start = 0
        while start < len(self._futures):
            window = self._windows.get(term, 1)
            stop = min(start + window, len(self._futures))
            futures = [
                self.client.submit(
                    task, self._futures[i], *args, key=f"kompot-{self.name}-{term}-{i}-{self.run}-{self._calls}",
                    retries=2,
                )
                for i in range(start, stop)
            ]
            try:
                parts = self.client.gather(futures)
            finally:
                for future in futures:
                    future.release()
            if term not in self._windows:
                first = parts[0] if isinstance(parts[0], tuple) else (parts[0],)
                size = sum(np.asarray(p).nbytes for p in first)
                self._windows[term] = max(1, GATHER_BYTES // max(size, 1))
            yield parts
            start = stop

    def replace_chunks(self, fn: Callable[..., Any], *args: Any) -> None:
        """Replace every chunk by ``fn(chunk, *args)``, computed where the chunk lives (a
        task per chunk; a lost result is recomputed from the chunk's own task)."""
        task = InOptions(fn)
        term = fn.__name__.replace("_", "-")
        old, self._futures = self._futures, [
            self.client.submit(task, future, *args, key=f"kompot-{self.name}-{term}-{i}-{self.run}", retries=2)
            for i, future in enumerate(self._futures)
        ]
        for future in old:
            future.release()

    def row_budget(self) -> int:
        """Bytes of per-chunk rows this reducer may keep: the ``factor_rows_bytes`` option,
        at most half of what one task may use on the smallest worker (all chunks could
        sit on one worker)."""
        from .plan import memory_target

        return min(get_options()["factor_rows_bytes"], memory_target(self.client) // 2)

    def close(self) -> None:
        """Drop the chunks and shared data from the cluster."""
        for future in self._futures + self._shared:
            future.release()
        self._futures, self._shared = [], []

    def __enter__(self) -> "ClusterChunks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
