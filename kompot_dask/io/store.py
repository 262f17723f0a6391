"""Zarr v3 stores of schema datasets: crash-safe writes and lazy, checked opens.

A store is written under a hidden temporary name next to its destination, marked
complete (the root attribute ``kompot_dask = {"kind": "dataset", "complete": true}`` written
after every array, the protocol of :mod:`kompot_dask.io._protocol`), its metadata
consolidated, and only then swapped into place; numeric chunks carry crc32c checksums, and
an existing path is replaced only if it holds a kompot_dask store.
An interrupted write therefore never leaves a store at the destination, and
:func:`open_dataset` refuses a store without the completion marker. When a chunk write
fails, the temporary store is removed only once no other chunk write is still running
(:func:`_compute_write`), so none re-creates part of it afterwards.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ._protocol import ATTR, LEGACY_DATASET_ATTR, checksum_codecs, is_empty_dir, is_ours, swap_into_place
from .schema import (
    CELL,
    CELL_STATES,
    DEFAULT_CELL_CHUNK,
    DEFAULT_GENE_CHUNK,
    DIMS,
    EXPRESSION,
    GENE,
    LABELS,
    STATE,
    validate_dataset,
)

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["write_dataset", "open_dataset", "COMPLETE_ATTR", "SCHEMA_VERSION"]

COMPLETE_ATTR = LEGACY_DATASET_ATTR  # read for stores written before the shared protocol
SCHEMA_VERSION = 1


def _uniform(chunks: tuple[int, ...], size: int | None) -> int:
    """One chunk size for an axis: ``size`` if given, else the largest current chunk."""
    if size is not None:
        return size
    return max(chunks) if chunks else 1


def _prepare(ds: xr.Dataset, cell_chunk: int | None, gene_chunk: int | None) -> xr.Dataset:
    """Copy of ``ds`` with uniform chunks, no stale encodings and vlen-string labels."""
    from ._convert import check_chunk

    if cell_chunk is not None:
        cell_chunk = check_chunk(cell_chunk, "cell_chunk")
    if gene_chunk is not None:
        gene_chunk = check_chunk(gene_chunk, "gene_chunk")
    out = ds.copy()
    out.attrs = {k: v for k, v in ds.attrs.items() if k not in (COMPLETE_ATTR, ATTR)}
    target: dict[str, int] = {}
    for name in (CELL_STATES, EXPRESSION):
        if name in out.data_vars and out[name].chunks is not None:
            chunks = dict(zip(out[name].dims, out[name].chunks))
            target.setdefault(CELL, _uniform(chunks[CELL], cell_chunk))
            if GENE in chunks:
                target.setdefault(GENE, _uniform(chunks[GENE], gene_chunk))
    target.setdefault(CELL, cell_chunk or DEFAULT_CELL_CHUNK)
    if GENE in out.dims:
        target.setdefault(GENE, gene_chunk or DEFAULT_GENE_CHUNK)
    target = {k: (out.sizes[k] if v == -1 else v) or 1 for k, v in target.items()}
    for name in (CELL_STATES, EXPRESSION):
        if name in out.data_vars:
            spec = {d: target.get(d, -1) for d in DIMS[name]}
            spec[STATE] = -1
            out[name] = out[name].chunk({d: spec[d] for d in out[name].dims})
    for var in out.variables.values():
        var.encoding = {}
    for name in (CELL_STATES, EXPRESSION):
        if name in out.data_vars:
            out[name].encoding = {"compressors": checksum_codecs()}  # crc32c per chunk (io._protocol)
    for name in (*LABELS, CELL, GENE):
        if name in out.variables:
            values = np.asarray(out[name].values, dtype=object).astype(str).astype(object)
            if name in out.dims:
                out = out.assign_coords({name: values})
            else:
                out[name] = (out[name].dims, values, out[name].attrs)
                chunk = min(target[CELL], max(len(values), 1))
                out.variables[name].encoding = {"chunks": (chunk,)}
    return out


def _is_local(path: Any) -> bool:
    return "://" not in os.fspath(path)


def write_dataset(
    ds: xr.Dataset,
    store_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    cell_chunk: int | None = None,
    gene_chunk: int | None = None,
    require: Iterable[str] = (CELL_STATES,),
) -> pathlib.Path:
    """Validate ``ds`` and write it to a zarr v3 store, atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        Dataset in the schema (see :func:`make_dataset`). It is validated first, values
        included (one pass over ``cell_states``), so nothing is written for bad input.
    store_path : str or path-like
        Local directory of the store to create.
    overwrite : bool
        Replace an existing store. The old store stays in place until the new one is
        complete.
    cell_chunk, gene_chunk : int, optional
        Zarr chunk sizes along ``cell`` and ``gene`` (-1: whole axis). By default the
        dataset's dask chunks are kept (made uniform if they are not).
    require : iterable of str
        Variables that must be present, passed to :func:`validate_dataset`.

    Returns
    -------
    pathlib.Path
        Path of the written store.

    Raises
    ------
    FileExistsError
        If ``store_path`` exists and ``overwrite`` is False.
    ValueError
        If ``ds`` fails validation or ``store_path`` is not a local path.
    """
    if not _is_local(store_path):
        msg = (
            f"write_dataset writes local stores only; got {os.fspath(store_path)!r}. "
            "Write to a local or network-mounted path and copy the finished store."
        )
        raise ValueError(msg)
    path = pathlib.Path(store_path)
    if path.exists() and not is_ours(path):
        msg = (
            f"{str(path)!r} exists and is not a kompot_dask store; it is never overwritten. "
            "Choose another path"
        )
        raise FileExistsError(msg)
    if path.exists() and not overwrite and not is_empty_dir(path):
        msg = (
            f"{str(path)!r} already exists; pass overwrite=True to replace it "
            "or choose another path"
        )
        raise FileExistsError(msg)
    validate_dataset(ds, require=require, check_values=True)
    prepared = _prepare(ds, cell_chunk, gene_chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.partial-{tag}")
    try:
        _compute_write(prepared.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, compute=False))
        _mark_complete(tmp)
        swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# Worker task states in which a task's code may still be running (a task the scheduler
# released while it ran is "cancelled" on its worker until its thread returns).
_RUNNING_STATES = frozenset({"executing", "long-running", "cancelled", "resumed"})
DRAIN_TIMEOUT = 300.0  # seconds to wait for in-flight chunk writes after a failure


def _compute_write(job: Any) -> None:
    """Run the chunk writes of ``job`` (``to_zarr(compute=False)``) on dask's current scheduler.

    When a write fails (or the run is interrupted), dask's schedulers raise at once while
    other chunk writes are still running; removing the temporary store then races with
    them, and a late write re-creates part of it. So before raising, this waits until none
    of the job's tasks is running any more: the local threaded scheduler (dask's default)
    runs on a pool of our own that is shut down, waiting, before the error propagates; on a
    ``distributed`` client, the workers are polled until none runs a task of the job (at
    most :data:`DRAIN_TIMEOUT` seconds). The synchronous scheduler has nothing in flight
    when it raises; other schedulers (processes, a user's executor) are called as they are.
    """
    import dask
    import dask.threaded
    from dask.base import get_scheduler

    scheduler = get_scheduler(collections=[job])
    if scheduler is dask.threaded.get:
        from concurrent.futures import ThreadPoolExecutor

        executor = getattr(dask.threaded, "ContextAwareThreadPoolExecutor", ThreadPoolExecutor)
        pool = executor(dask.config.get("num_workers", None) or dask.threaded.CPU_COUNT)
        try:
            dask.compute(job, scheduler=dask.threaded.get, pool=pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # no writer thread outlives the call
        return
    client = getattr(scheduler, "__self__", None)
    if client is None or not hasattr(client, "run"):  # not a distributed Client
        dask.compute(job)
        return
    future = client.compute(job)
    try:
        future.result()
    except BaseException:
        _drain(client, set(job.__dask_graph__().keys()))
        raise
    finally:
        future.release()


def _running_tasks(keys: set, dask_worker: Any = None) -> int:
    """On a worker: how many of ``keys`` have code running there now."""
    tasks = getattr(getattr(dask_worker, "state", None), "tasks", {})
    return sum(1 for key in keys if key in tasks and tasks[key].state in _RUNNING_STATES)


def _drain(client: Any, keys: set) -> None:
    """Wait until no worker runs a task of ``keys`` (a failed job's chunk writes)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            running = sum(client.run(_running_tasks, keys).values())
        except Exception:  # the cluster is going away: nothing more to wait for
            return
        if not running:
            return
        time.sleep(0.05)
    warnings.warn(
        f"chunk writes of a failed write_dataset were still running after {DRAIN_TIMEOUT:.0f}s; "
        "the temporary store is removed anyway and may reappear",
        RuntimeWarning,
        stacklevel=3,
    )


def _mark_complete(tmp: pathlib.Path) -> None:
    """Write the completion marker; called only after every array is written."""
    import zarr

    group = zarr.open_group(tmp, mode="r+", zarr_format=3)
    group.attrs[ATTR] = {"kind": "dataset", "complete": True, "schema_version": SCHEMA_VERSION}
    with warnings.catch_warnings():  # consolidated metadata is not in the v3 spec (yet)
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(tmp), zarr_format=3)


def open_dataset(store_path: Any, *, validate: bool = True) -> xr.Dataset:
    """Open a store written by :func:`write_dataset`, lazily (dask, one chunk per zarr chunk).

    Parameters
    ----------
    store_path : str, path-like or zarr store
        Store location (local path, fsspec URL) or a ``zarr.abc.store.Store``.
    validate : bool
        Check the schema (names, dims, dtypes, chunks; no data is read).

    Returns
    -------
    xarray.Dataset
        ``cell_states`` and ``expression`` are dask arrays over the zarr chunks; labels
        and names are loaded as numpy string arrays.

    Raises
    ------
    FileNotFoundError
        If a local ``store_path`` does not exist.
    ValueError
        If the store is not zarr, or lacks the completion marker (an interrupted or
        foreign write).
    """
    import xarray as xr
    import zarr

    if isinstance(store_path, (str, os.PathLike)) and _is_local(store_path):
        if not pathlib.Path(store_path).exists():
            msg = f"no dataset store at {os.fspath(store_path)!r}; write one with write_dataset()"
            raise FileNotFoundError(msg)
    where = os.fspath(store_path) if isinstance(store_path, os.PathLike) else store_path
    try:
        group = zarr.open_group(where, mode="r")
    except Exception as err:  # zarr raises several types for "not a group"
        msg = f"{where!r} is not a readable zarr group ({err}); pass a store from write_dataset()"
        raise ValueError(msg) from err
    marker = group.attrs.get(ATTR) or group.attrs.get(COMPLETE_ATTR)
    if not (isinstance(marker, dict) and marker.get("complete") is True and marker.get("kind", "dataset") == "dataset"):
        msg = (
            f"the store at {where!r} is incomplete (no completion marker): its write was "
            "interrupted or it was not written by write_dataset(). Re-run "
            "write_dataset(ds, path, overwrite=True)."
        )
        raise ValueError(msg)
    consolidated = group.metadata.consolidated_metadata is not None
    ds = xr.open_zarr(
        where, chunks={}, consolidated=consolidated, zarr_format=group.metadata.zarr_format
    )
    ds.attrs.pop(COMPLETE_ATTR, None)
    ds.attrs.pop(ATTR, None)
    for name in (*LABELS, CELL, GENE):
        if name in ds.variables:
            values = np.asarray(ds[name].values, dtype=object).astype(str)
            if name in ds.dims:
                ds = ds.assign_coords({name: values})
            else:
                ds[name] = (ds[name].dims, values)
    if validate:
        validate_dataset(ds, require=(CELL_STATES,), check_values=False)
    return ds
