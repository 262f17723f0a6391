"""Run provenance in ``adata.uns`` as Kompot records it (SPEC §7.6), and the overwrite check."""

from __future__ import annotations

import datetime
import getpass
import json
import os
import platform
import socket
import sys
import warnings
from typing import Any

import numpy as np

__all__ = ["environment", "stamp", "check_overwrite", "record_run", "to_json"]

PACKAGES = ("kompot_dask", "dask", "distributed", "anndata", "jax", "jaxlib", "numpy", "scipy", "pandas", "zarr")


def now() -> str:
    """An ISO timestamp (local time)."""
    return datetime.datetime.now().isoformat()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where and with what a run ran."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = None
    return {
        "hostname": socket.gethostname(),
        "package_versions": {name: _version(name) for name in PACKAGES},
        "pid": os.getpid(),
        "platform": platform.platform(),
        "python_version": sys.version.split()[0],
        "timestamp": now(),
        "username": user,
    }


def stamp() -> dict[str, Any]:
    """The version stamp added to every history entry."""
    from .. import __version__

    return {"kompot_dask_version": __version__}


def to_json(value: Any) -> str:
    """JSON with numpy scalars and arrays made plain (keys sorted, as Kompot writes them)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        return str(obj)

    return json.dumps(value, sort_keys=True, default=default)


def _fields_of(uns_entry: Any) -> dict:
    raw = uns_entry.get("anndata_fields") if hasattr(uns_entry, "get") else None
    return json.loads(raw) if isinstance(raw, str) else {}


def check_overwrite(adata: Any, key: str, fields: dict[str, list[str]], overwrite: bool | None,
                    present: dict[str, list[str]] | None = None) -> None:
    """Fields of an earlier run about to be replaced: warn (``None``), raise (``False``) or not (``True``).

    ``fields`` maps a location (obs, var, layers, uns) to the names this run writes;
    ``present`` (default: read from ``adata``) to the names already there.
    """
    if overwrite is True:
        return
    existing = []
    for location, names in fields.items():
        there = present[location] if present is not None else getattr(adata, location, {})
        existing += [f"{location}[{name!r}]" for name in names if name in there]
    if not existing:
        return
    msg = (f"{len(existing)} field(s) of an earlier {key} run would be replaced ({', '.join(existing[:3])}"
           f"{', ...' if len(existing) > 3 else ''})")
    if overwrite is False:
        raise ValueError(f"{msg}; pass overwrite=True to replace them, or another result_key")
    warnings.warn(f"{msg}; pass overwrite=True to silence this, or another result_key", UserWarning, stacklevel=3)


def record_run(adata: Any, key: str, run_info: dict, written: dict[str, list[str]]) -> int:
    """Append ``run_info`` to ``uns[key]["run_history"]`` and update ``last_run_info`` and
    ``anndata_fields``; returns the run id (its position in the history)."""
    entry = adata.uns.setdefault(key, {})
    history = json.loads(entry["run_history"]) if isinstance(entry.get("run_history"), str) else []
    run_id = len(history)
    info = {**run_info, **{k: v for k, v in stamp().items() if k not in run_info}}
    history.append(json.loads(to_json(info)))
    entry["run_history"] = to_json(history)
    entry["last_run_info"] = to_json(info)
    fields = _fields_of(entry)
    for location, names in written.items():
        fields.setdefault(location, {}).update({name: run_id for name in names})
    entry["anndata_fields"] = to_json(fields)
    return run_id
