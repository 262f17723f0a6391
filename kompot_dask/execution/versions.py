"""Same software on the client, the scheduler and every worker, checked before any work.

A worker with another kompot_dask, dask, distributed, jax or numpy computes different
numbers or fails half-way with an unpicklable task; :func:`check_versions` refuses such a
cluster up front with one line naming each difference. :func:`prepare_client` is what every
client of kompot_dask goes through (``get_client``, the ``kompot-dask`` command): register
the :class:`~kompot_dask.execution.cluster.JaxWorkerSetup` plugin, then check the versions.

Testing hook: a process with the environment variable ``KOMPOT_DASK_FAKE_VERSION`` set
reports that value as its kompot_dask version (read when the check runs, in the process
checked), so a test can start one worker "with another release" without installing one.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CHECKED_PACKAGES", "FAKE_VERSION_ENV", "check_versions", "local_versions"]

#: Packages whose versions must agree between the client and every worker.
CHECKED_PACKAGES = ("kompot_dask", "dask", "distributed", "jax", "numpy")
#: The scheduler runs no kompot_dask or JAX code: only these must agree with it.
SCHEDULER_PACKAGES = ("dask", "distributed")
#: Testing hook: the kompot_dask version this process reports, if set.
FAKE_VERSION_ENV = "KOMPOT_DASK_FAKE_VERSION"


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


def check_versions(client: Any) -> dict[str, dict[str, str | None]]:
    """Raise if any worker (or the scheduler) runs other versions than this client.

    Compares kompot_dask, dask, distributed, jax and numpy between this process and every
    worker connected now (``client.run`` of :func:`local_versions`), and dask and
    distributed with the scheduler (``client.get_versions``). Workers that join later are
    not checked: start the workers before the client (``wait_for_workers``).

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
            "kompot_dask workers differ from this client: the version check could not run on the workers "
            f"({type(err).__name__}: {' '.join(str(err).split())}); install the same versions everywhere "
            "(one image / one environment)"
        ) from err
    scheduler_info = client.get_versions(check=False).get("scheduler") or {}
    scheduler = {name: (scheduler_info.get("packages") or {}).get(name) for name in SCHEDULER_PACKAGES}

    differences = []
    for address in sorted(workers):
        theirs = workers[address]
        for name in CHECKED_PACKAGES:
            if theirs.get(name) != here[name]:
                differences.append(f"{name} {_show(here[name])} here, {_show(theirs.get(name))} on {address}")
    for name in SCHEDULER_PACKAGES:
        if scheduler[name] is not None and scheduler[name] != here[name]:
            differences.append(f"{name} {_show(here[name])} here, {scheduler[name]} on the scheduler")
    if differences:
        raise RuntimeError(
            "kompot_dask workers differ from this client: " + ", ".join(differences)
            + "; install the same versions everywhere (one image / one environment)"
        )
    return {"client": here, "scheduler": scheduler, **workers}
