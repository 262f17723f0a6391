"""Building and running the task graphs of a prediction: on a distributed client, or here."""

from __future__ import annotations

import logging
from typing import Any

from ..options import get_options
from .cluster import active_client

__all__ = ["resolve_client", "share", "run_graph"]

logger = logging.getLogger("kompot_dask")


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


def run_graph(graph: Any, client: Any = None) -> Any:
    """Compute a ``Delayed``: on ``client`` (with one retry per task and the progress bar
    if the ``progress`` option is on), else in this process one task after another."""
    if client is None:
        return graph.compute(scheduler="sync")
    future = client.compute(graph, retries=1)
    if get_options()["progress"]:
        from distributed import progress

        progress(future)
    return future.result()
