"""Same software on the client, the scheduler and every worker, checked before any work.

A worker with another kompot_dask, dask, distributed, jax or numpy computes different
numbers or fails half-way with an unpicklable task; :func:`check_versions` refuses such a
cluster up front with one line naming each difference. :func:`prepare_client` is what every
client of kompot_dask goes through (``get_client``, the ``kompot-dask`` command): check the
versions, then register :class:`VersionGuard` (workers that join later, e.g. a nanny's
replacement, check themselves against this client's versions and leave if they differ,
with the same one line) and the :class:`~kompot_dask.execution.cluster.JaxWorkerSetup`
plugin.

Testing hook: a process with the environment variable ``KOMPOT_DASK_FAKE_VERSION`` set
reports that value as its kompot_dask version (read when the check runs, in the process
checked), so a test can start one worker "with another release" without installing one.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CHECKED_PACKAGES", "FAKE_VERSION_ENV", "VERSION_TOPIC", "VersionGuard", "check_versions",
           "local_versions"]

#: Packages whose versions must agree between the client and every worker.
CHECKED_PACKAGES = ("kompot_dask", "dask", "distributed", "jax", "numpy")
#: The scheduler runs no kompot_dask or JAX code: only these must agree with it.
SCHEDULER_PACKAGES = ("dask", "distributed")
#: Testing hook: the kompot_dask version this process reports, if set.
FAKE_VERSION_ENV = "KOMPOT_DASK_FAKE_VERSION"
#: Scheduler event topic where a refused worker reports its one-line message.
VERSION_TOPIC = "kompot-dask-versions"
MESSAGE_START = "kompot_dask workers differ from this client: "
MESSAGE_END = "; install the same versions everywhere (one image / one environment)"


def local_versions() -> dict[str, str | None]:
    """The versions of :data:`CHECKED_PACKAGES` in this process (None: not importable).

    Runs on the client and, through ``client.run``, on every worker. kompot_dask's version
    is ``$KOMPOT_DASK_FAKE_VERSION`` when that is set (a testing hook).

    Returns
    -------
    dict of str to str or None
        Package name to version string.
    """
    import importlib

    versions: dict[str, str | None] = {}
    for name in CHECKED_PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            versions[name] = None
            continue
        versions[name] = str(getattr(module, "__version__", None) or getattr(module, "version", None))
    fake = os.environ.get(FAKE_VERSION_ENV)
    if fake:
        versions["kompot_dask"] = fake
    return versions


def _show(version: str | None) -> str:
    return "not installed" if version is None else version


def differences(here: dict, theirs: dict, where: str) -> list[str]:
    """Each package of :data:`CHECKED_PACKAGES` that differs, as ``"<name> <here> here, <theirs> on <where>"``.

    Parameters
    ----------
    here, theirs : dict of str to str or None
        Package to version (:func:`local_versions`) of the client and of one worker.
    where : str
        The worker's address.

    Returns
    -------
    list of str
        Empty when the versions agree.
    """
    return [f"{name} {_show(here.get(name))} here, {_show(theirs.get(name))} on {where}"
            for name in CHECKED_PACKAGES if theirs.get(name) != here.get(name)]


def mismatch_message(found: list[str]) -> str:
    """The one-line refusal naming each difference (from :func:`differences`)."""
    return MESSAGE_START + ", ".join(found) + MESSAGE_END


class VersionGuard:
    """Worker plugin body: a worker that joins after the client connected checks itself.

    :func:`check_versions` sees only the workers connected when it runs; this guard,
    registered on the cluster with the client's versions, runs on every worker that joins
    later (a nanny's replacement, a scaled-up job) and says whether it must leave.

    Parameters
    ----------
    expected : dict of str to str or None
        The client's :func:`local_versions`.
    """

    def __init__(self, expected: dict[str, str | None]):
        self.expected = dict(expected)

    def refusal(self, address: str) -> str | None:
        """The one-line message if this process's versions differ from the client's, else None.

        Parameters
        ----------
        address : str
            This worker's address (named in the message).
        """
        found = differences(self.expected, local_versions(), address)
        return mismatch_message(found) if found else None


def check_versions(client: Any) -> dict[str, dict[str, str | None]]:
    """Raise if any worker (or the scheduler) runs other versions than this client.

    Compares kompot_dask, dask, distributed, jax and numpy between this process and every
    worker connected now (``client.run`` of :func:`local_versions`), and dask and
    distributed with the scheduler (``client.get_versions``). Workers that join later are
    checked by :class:`VersionGuard`, which
    :func:`~kompot_dask.execution.prepare_client` registers after this check.

    Parameters
    ----------
    client : distributed.Client
        A connected client.

    Returns
    -------
    dict
        ``{"client": {...}, "scheduler": {...}, <worker address>: {...}}``, package to
        version, when everything agrees.

    Raises
    ------
    RuntimeError
        One line naming each difference, e.g. ``kompot_dask workers differ from this
        client: kompot_dask 0.1.0 here, 0.0.9 on tcp://10.0.0.7:40001; install the same
        versions everywhere (one image / one environment)``. Also when the workers cannot
        run kompot_dask's check at all (kompot_dask not importable there).
    """
    here = local_versions()
    try:
        workers = client.run(local_versions)
    except Exception as err:  # noqa: BLE001 - e.g. ModuleNotFoundError on a worker without kompot_dask
        raise RuntimeError(
            f"{MESSAGE_START}the version check could not run on the workers "
            f"({type(err).__name__}: {' '.join(str(err).split())}){MESSAGE_END}"
        ) from err
    scheduler_info = client.get_versions(check=False).get("scheduler") or {}
    scheduler = {name: (scheduler_info.get("packages") or {}).get(name) for name in SCHEDULER_PACKAGES}

    found = [line for address in sorted(workers) for line in differences(here, workers[address], address)]
    for name in SCHEDULER_PACKAGES:
        if scheduler[name] is not None and scheduler[name] != here[name]:
            found.append(f"{name} {_show(here[name])} here, {scheduler[name]} on the scheduler")
    if found:
        raise RuntimeError(mismatch_message(found))
    return {"client": here, "scheduler": scheduler, **workers}
