"""Which dask cluster runs the work: never one started at import or behind the user's back.

:func:`get_client` is the one explicit entry point: the active ``distributed.Client`` if
there is one, a scheduler address if given, otherwise a ``LocalCluster`` sized to the
machine (only because the caller asked for a client); it checks the workers' versions
(now, and through a worker plugin on workers that join later) and registers
:class:`JaxWorkerSetup` (:func:`~kompot_dask.execution.prepare_client`).
:func:`active_client` only looks. :func:`dask_setup` is the same JAX set-up as a worker
preload (``dask worker --preload kompot_dask.execution.cluster``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .versions import VERSION_TOPIC, VersionGuard, check_versions, local_versions

__all__ = ["JaxWorkerSetup", "active_client", "dask_setup", "get_client", "prepare_client"]

PLUGIN_NAME = "kompot-dask-jax-setup"
GUARD_NAME = "kompot-dask-version-guard"
REFUSED = "kompot-dask-versions-differ"  # the reason a refused worker closes with

log = logging.getLogger(__name__)


class JaxWorkerSetup:
    """Worker plugin: float64 JAX and a bounded XLA thread pool on every worker.

    kompot_dask's own kernels switch to float64 per call already; the plugin makes the
    same true for user code running on the workers and stops XLA from oversubscribing
    cores shared with dask's worker threads.

    Parameters
    ----------
    xla_threads : int, optional
        Threads XLA's CPU backend may use per worker process (default: leave as is).
    """

    name = PLUGIN_NAME

    def __init__(self, xla_threads: int | None = None):
        self.xla_threads = xla_threads

    def setup(self, worker: Any = None) -> None:
        if self.xla_threads:
            flags = os.environ.get("XLA_FLAGS", "")
            extra = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={int(self.xla_threads)}"
            if "intra_op_parallelism_threads" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
        import jax

        jax.config.update("jax_enable_x64", True)

    def teardown(self, worker: Any = None) -> None:  # pragma: no cover - nothing to undo
        pass

    def transition(self, key, start, finish, **kwargs) -> None:  # pragma: no cover
        pass


def active_client():
    """The current ``distributed.Client``, or None (never creates one).

    Only looks if ``distributed`` is already imported: a session without dask.distributed
    stays without it. Inside a task running on a worker it is None too: kompot_dask
    never submits tasks from tasks.
    """
    import sys

    if "distributed" not in sys.modules:
        return None
    from distributed import get_client as current
    from distributed import get_worker

    try:
        get_worker()
        return None
    except ValueError:
        pass

    try:
        return current()
    except ValueError:
        return None


def get_client(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = None,
    setup_workers: bool = True,
    check_versions: bool = True,
):
    """A ``distributed.Client`` to run kompot_dask on.

    Parameters
    ----------
    address : str, optional
        Scheduler address (``tcp://host:8786``). Without it the active client is used,
        or else a local cluster of worker processes is started.
    n_workers : int, optional
        Worker processes of a new local cluster (default: one per core).
    threads_per_worker : int, default 1
        Threads per worker process of a new local cluster.
    memory_limit : str or int, optional
        Memory limit per worker of a new local cluster (e.g. ``"5GB"``).
    setup_workers : bool, default True
        Prepare the workers (:func:`~kompot_dask.execution.prepare_client`): check that
        they run the same kompot_dask, dask, distributed, jax and numpy as this process,
        then register :class:`JaxWorkerSetup` on them.
    check_versions : bool, default True
        Run the version check (with ``setup_workers``).

    Returns
    -------
    distributed.Client

    Raises
    ------
    RuntimeError
        A worker or the scheduler runs other versions
        (:func:`~kompot_dask.execution.check_versions`); a client this call created is
        closed first (with its local cluster).
    """
    from distributed import Client, LocalCluster

    client = active_client() if address is None else None
    created = client is None
    if client is None and address is not None:
        client = Client(address)
    if client is None:
        workers = n_workers or max(1, (os.cpu_count() or 1) // threads_per_worker)
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit if memory_limit is not None else "auto",
        )
        client = Client(cluster)
    if setup_workers:
        try:
            prepare_client(client, xla_threads=threads_per_worker, check=check_versions)
        except BaseException:
            if created:
                cluster = client.cluster
                client.close()
                if cluster is not None:
                    cluster.close()
            raise
    return client


def dask_setup(worker: Any = None) -> None:
    """Preload hook: ``dask worker --preload kompot_dask.execution.cluster``.

    Applies :class:`JaxWorkerSetup` (one XLA thread, float64 JAX) when the worker process
    starts, before any task imports JAX, so the XLA thread flag takes effect. Optional: the
    client registers the same setup as a plugin (:func:`get_client`,
    :func:`~kompot_dask.execution.prepare_client`); the version check always runs there.

    Parameters
    ----------
    worker : distributed.Worker, optional
        The worker being started (passed by distributed).
    """
    JaxWorkerSetup(1).setup(worker)


def _as_plugin(setup: JaxWorkerSetup):
    """Wrap the setup as a real ``WorkerPlugin`` (distributed imported only here)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class _Plugin(WorkerPlugin):
        name = PLUGIN_NAME

        def __init__(self, xla_threads):
            self.xla_threads = xla_threads

        def setup(self, worker):
            JaxWorkerSetup(self.xla_threads).setup(worker)

    return _Plugin(setup.xla_threads)


def _as_guard(guard: VersionGuard):
    """Wrap the version guard as a real ``WorkerPlugin`` (distributed imported only here)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class _Guard(WorkerPlugin):
        name = GUARD_NAME

        def __init__(self, guard):
            self.guard = guard

        def setup(self, worker):
            message = self.guard.refusal(worker.address)
            if message is not None:
                _refuse(worker, message)

    return _Guard(guard)


def _refuse(worker: Any, message: str) -> None:
    """Make a worker of other versions leave: the one line in its log and as a scheduler
    event (:data:`~kompot_dask.execution.versions.VERSION_TOPIC`), then no task starts
    here and the worker leaves (:func:`_leave`).

    Runs in the plugin's ``setup``, before the worker handles any message from the
    scheduler (which may already have sent it tasks). Closing gracefully stops task
    execution at once and tells the scheduler to send no more; leaving is scheduled, not
    awaited: the nanny answers only once this worker has started.
    """
    from distributed.core import Status

    log.error(message)
    worker.log_event(VERSION_TOPIC, {"worker": worker.address, "message": message})
    worker.status = Status.closing_gracefully
    worker.loop.add_callback(_leave, worker)


async def _leave(worker: Any) -> None:
    """Retire from the scheduler (tasks sent here go elsewhere, not counted as failures, as
    a killed worker's are), then close the worker and its nanny (which would otherwise
    start it again)."""
    await worker.scheduler.retire_workers(workers=[worker.address], close_workers=False, remove=True,
                                          stimulus_id=f"{REFUSED}-{time.time()}")
    await worker.close(nanny=True, reason=REFUSED)


def _report_refusal(event: tuple) -> None:
    """Client side: log a refused worker's one line (``subscribe_topic`` handler)."""
    _, message = event
    log.error("%s", message["message"])


def prepare_client(client: Any, *, xla_threads: int | None = 1, check: bool = True) -> Any:
    """Make a connected client ready for kompot_dask: version check, then worker plugins.

    Runs :func:`check_versions`, then registers a version guard (a worker that joins
    later with other versions, e.g. a restarted one, logs the same one-line message,
    reported here as an error log, and closes with its nanny: it gets no work) and
    :class:`~kompot_dask.execution.cluster.JaxWorkerSetup` (float64 JAX, XLA threads
    bounded; workers that join or restart later get it too). :func:`~kompot_dask.execution.get_client` and the
    ``kompot-dask`` command call this; call it yourself on a ``Client`` you made. Both
    plugins stay on the cluster after this client leaves, until the next client's call
    replaces them (with its own versions).

    Parameters
    ----------
    client : distributed.Client
        A connected client.
    xla_threads : int or None, default 1
        XLA CPU threads per worker process (None: leave XLA's default).
    check : bool, default True
        Run :func:`check_versions` and register the guard for later workers.

    Returns
    -------
    distributed.Client
        The same client.

    Raises
    ------
    RuntimeError
        From :func:`check_versions`.
    """
    if check:  # first: a worker of another release may fail to unpickle the plugins
        check_versions(client)
        client.subscribe_topic(VERSION_TOPIC, _report_refusal)
        client.register_plugin(_as_guard(VersionGuard(local_versions())), name=GUARD_NAME)
    client.register_plugin(_as_plugin(JaxWorkerSetup(xla_threads)), name=PLUGIN_NAME)
    return client
