"""Running a list of named tasks: on a distributed client, or in this process."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..options import get_options
from .cluster import active_client

__all__ = ["resolve_client", "run_tasks"]

Task = tuple[str, Callable[..., Any], tuple]


def resolve_client(client: Any = None):
    """A client object, an address string (connected here), or the active client (or None)."""
    if isinstance(client, str):
        from distributed import Client

        return Client(client)
    return client if client is not None else active_client()


def run_tasks(tasks: Sequence[Task], client: Any = None) -> list[Any]:
    """Run ``(key, function, args)`` tasks; return their results in order.

    With a client, each becomes a future named ``key`` (readable on the dashboard); a
    task lost with its worker is rerun by the scheduler (every task here is idempotent).
    Without one, tasks run one after another in this process. The first failure is
    raised after the other tasks have finished or failed, so finished blocks stay marked.
    """
    if client is None:
        return [fn(*args) for _, fn, args in tasks]
    futures = [client.submit(fn, *args, key=key, pure=False, retries=1) for key, fn, args in tasks]
    if futures and get_options()["progress"]:
        from distributed import progress

        progress(futures)
    from distributed import wait

    wait(futures)
    errors = [f for f in futures if f.status == "error"]
    if errors:
        errors[0].result()  # raises the task's exception
    return client.gather(futures)
