"""Building and running task graphs: on a distributed client, or in this process.

Every task runs under its caller's execution options (:class:`InOptions`), so a worker
computes with the chunk sizes and switches set where the graph was built.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import CancelledError
from typing import Any, Callable

from ..options import get_options, using_options
from .cluster import active_client

__all__ = ["InOptions", "resolve_client", "share", "task", "run_graph", "logger"]

logger = logging.getLogger("kompot_dask")

ATTEMPTS = 3  # graph submissions when the cluster loses shared data with its workers


class InOptions:
    """``fn`` called under the options in force when this wrapper was made (picklable).

    Parameters
    ----------
    fn : callable
        A top-level function (picklable by reference).
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.options = get_options()
        self.__name__ = getattr(fn, "__name__", "task")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with using_options(self.options):
            return self.fn(*args, **kwargs)


def resolve_client(client: Any = None):
    """A client object, an address string (connected here), or the active client (or None)."""
    if isinstance(client, str):
        from distributed import Client

        return Client(client)
    return client if client is not None else active_client()


def share(obj: Any, name: str, client: Any = None):
    """``obj`` as a graph input used by many tasks.

    With a client it is scattered to every worker first (data placement, no computation);
    without, it becomes one literal node of the graph, named ``name``.
    """
    import dask

    if client is not None:
        (future,) = client.scatter([obj], broadcast=True, hash=False)  # a list: tuples stay whole
        return future
    return dask.delayed(obj, name=name, traverse=False)


def task(fn: Callable[..., Any], *args: Any, key: str):
    """A graph node ``fn(*args)`` named ``key``, run under the current options (:class:`InOptions`)."""
    import dask

    return dask.delayed(InOptions(fn), pure=False)(*args, dask_key_name=key)


def _show_progress(future: Any) -> None:
    """distributed's progress bar: a widget in a Jupyter kernel that has ipywidgets, text
    everywhere else; it returns when ``future`` is done."""
    import importlib.util

    from distributed import progress

    # None: distributed picks the widget bar in a kernel, which needs ipywidgets
    progress(future, notebook=None if importlib.util.find_spec("ipywidgets") else False)


def run_graph(build: Callable[[], Any], client: Any = None) -> Any:
    """Build a graph with ``build()`` and compute it: on ``client`` (one retry per task), else
    in this process, task by task; with a progress bar (on stderr) if the ``progress``
    option is on.

    On a cluster, data shared with :func:`share` is lost when every worker holding it dies;
    the graph then fails with a cancelled future. ``build`` is called again (it shares the
    data anew and, for a resumable sink, leaves out the blocks already written) up to
    :data:`ATTEMPTS` times.
    """
    if client is None:
        from dask.local import get_sync

        graph = build()
        # The function rather than its name "sync": a named scheduler makes dask import
        # distributed (0.25 s) to look for a client this branch does not use.
        if get_options()["progress"]:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):  # stdout stays free for a program's own output
                return graph.compute(scheduler=get_sync)
        return graph.compute(scheduler=get_sync)
    for attempt in range(1, ATTEMPTS + 1):
        future = client.compute(build(), retries=1)
        try:
            if get_options()["progress"]:
                _show_progress(future)
            return future.result()
        except CancelledError as err:
            if attempt == ATTEMPTS:
                raise
            logger.warning("kompot_dask: shared data was lost with its workers (%s); sharing it "
                           "again and resuming (attempt %d of %d)", err, attempt + 1, ATTEMPTS)
        finally:
            future.release()
    raise AssertionError("unreachable")  # pragma: no cover
