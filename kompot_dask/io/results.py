"""Where a differential run puts its results: a sink in memory or in a zarr (v3) store.

Both sinks take the same calls, so the pipeline (:mod:`kompot_dask.differential.pipeline`)
is written once:

- on the driver, :meth:`add_array` lays out every output (named dimensions, one chunk per
  block of work, so concurrent writers never share a chunk) and :meth:`add_stage` a grid of
  per-block markers; :meth:`pending` lists the blocks still to do;
- in the tasks, :meth:`write` fills a region, :meth:`mark_done` sets a block's marker and
  :meth:`read` reads a (small) array back for the per-gene reductions;
- the last task calls :meth:`finish`.

:class:`MemorySink` holds numpy arrays (the documented ``predict`` return values) and runs
in this process. :class:`ZarrSink` is the store of ``predict_abundance`` /
``predict_expression`` and of ``predict(..., store=...)``; its protocol never loses data:

- only a directory holding a kompot_dask result store is ever replaced or deleted;
- a store of other inputs is replaced by writing the new run aside
  (``.<name>.kompot-<token>.partial``) and swapping it in when it is complete, so the old
  results stay whole until then;
- every chunk carries a crc32c checksum and every chunk of a finished block exists on disk
  (empty chunks are written too): a missing chunk is found by :func:`check_store` and a
  corrupt one fails its read, and a rerun recomputes exactly the damaged blocks;
- ``complete: true`` is written last, by the finish task.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from typing import Any

import numpy as np

from ._protocol import ATTR, checksum_codecs, is_empty_dir, read_marker, swap_into_place

__all__ = ["DiskStorage", "MemorySink", "ZarrSink", "StoreDamagedError", "check_store", "open_results", "fingerprint", "ATTR"]

KINDS = ("abundance", "expression")


class StoreDamagedError(ValueError):
    """A result store lacks chunks that its markers say were written, or fails a checksum."""


def fingerprint(*parts: Any) -> str:
    """A stable hash of arrays, scalars, strings and (nested) tuples/lists/dicts of them."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, dict):
            for key in sorted(obj):
                feed(str(key))
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(b"(")
            for item in obj:
                feed(item)
            h.update(b")")
        elif isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
            arr = np.ascontiguousarray(np.asarray(obj))
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
        else:
            h.update(repr(obj).encode())

    for part in parts:
        feed(part)
    return h.hexdigest()[:32]


def _block_of(chunk: tuple[int, ...], axes: tuple, n_grid: int) -> tuple[int, ...]:
    """The block (of its stage's ``n_grid``-axis grid) that writes ``chunk`` of an array laid
    out on ``axes`` (a chunk on an axis no grid axis follows is written by block 0 there)."""
    block = [0] * n_grid
    for coord, axis in zip(chunk, axes):
        if axis is not None:
            block[axis] = coord
    return tuple(block)


# ------------------------------------------------------------------------------ memory
class MemorySink:
    """Results as numpy arrays in this process (the in-memory ``predict``)."""

    path = None

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.meta: dict[str, Any] = {"complete": False}

    def add_array(self, name, shape, chunks, dims, dtype="float64", fill_value=None, stage=None, axes=None):
        """Allocate ``name`` (filled with NaN, or ``fill_value``)."""
        dtype = np.dtype(object if dtype is str else dtype)
        if fill_value is None:
            fill_value = np.nan if dtype.kind == "f" else 0
        self.arrays[name] = np.full(shape, fill_value, dtype=dtype)
        return self.arrays[name]

    def add_stage(self, stage: str, grid: tuple[int, ...]) -> None:
        """Markers for a stage of ``grid`` blocks."""
        self.arrays[f"_done_{stage}"] = np.zeros(grid, dtype=np.uint8)

    def pending(self, stage: str) -> list[tuple[int, ...]]:
        """Blocks of ``stage`` still to do."""
        return [tuple(int(i) for i in idx) for idx in np.argwhere(self.arrays[f"_done_{stage}"] == 0)]

    def write(self, name: str, region: tuple[slice, ...], values: np.ndarray) -> None:
        """Fill ``region`` of ``name``."""
        self.arrays[name][region] = values

    def mark_done(self, stage: str, index: tuple[int, ...]) -> None:
        """Set a block's marker."""
        self.arrays[f"_done_{stage}"][index] = 1

    def read(self, name: str) -> np.ndarray:
        """The whole array ``name``."""
        return self.arrays[name]

    def has(self, name: str) -> bool:
        """Whether ``name`` was laid out."""
        return name in self.arrays

    def finish(self, **meta: Any) -> None:
        """Record ``meta`` and mark the run complete."""
        self.meta.update(meta, complete=True)


# -------------------------------------------------------------------------------- zarr
def _open_array(path: str, name: str, mode: str = "r+"):
    import zarr

    arr = zarr.open_array(os.path.join(path, name), mode=mode)
    # Every written chunk must exist on disk, even one equal to the fill value: a missing
    # chunk file then always means damage, never "all NaN".
    return arr.with_config({"write_empty_chunks": True}) if mode != "r" else arr


def read_meta(path: str) -> dict | None:
    """The kompot_dask attributes of the result store at ``path``, or None if it is not one."""
    value = read_marker(path)
    if value is not None and value.get("kind") in KINDS and "token" in value:
        return value
    return None


class ZarrSink:
    """Results of one run in a zarr group; open it with :meth:`prepare`.

    The object is small and picklable (paths only): tasks on workers write through it.
    """

    def __init__(self, path: str, final: str) -> None:
        self.path = path  # where this run writes
        self.final = final  # where the results end up
        self.planned_bytes = 0

    # ---------------------------------------------------------------- driver side
    @classmethod
    def prepare(cls, path: Any, token: str, meta: dict, overwrite: bool) -> "ZarrSink":
        """Resume, reuse or start the store for a run of ``token`` at ``path``.

        Call only after every argument of the run has been checked: this is the first
        call that touches the disk.

        Raises
        ------
        FileExistsError
            ``path`` holds something that is not a kompot_dask result store (never
            touched, whatever ``overwrite`` says), or a store of other inputs and
            ``overwrite`` is False.
        """
        import zarr

        final = os.path.abspath(os.fspath(path))
        existing = read_meta(final) if os.path.exists(final) else None
        if os.path.exists(final) and existing is None and not is_empty_dir(final):
            msg = (
                f"{final!r} exists and is not a kompot_dask result store; it is never "
                "overwritten or deleted. Choose another output path (a new directory)"
            )
            raise FileExistsError(msg)
        if existing is not None and existing.get("token") != token and not overwrite:
            what = "complete results" if existing.get("complete") else "an unfinished run"
            msg = (
                f"{final!r} holds {what} of other inputs or settings; pass `overwrite=True` "
                "to replace them once this run is complete, or choose another output path"
            )
            raise FileExistsError(msg)
        if existing is None:
            target = final  # new (or empty) directory: write in place
        elif existing.get("token") == token:
            target = final  # same inputs: resume (or repair) in place
        else:
            target = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.kompot-{token[:16]}.partial")
        sink = cls(target, final)
        if read_meta(target) is None or read_meta(target).get("token") != token:
            if os.path.exists(target) and target != final:
                shutil.rmtree(target)  # our own aside directory of an earlier, different attempt
            group = zarr.open_group(target, mode="w", zarr_format=3)
            group.attrs[ATTR] = {"token": token, "complete": False, "arrays": {}, **meta}
        return sink

    def _attrs(self) -> dict:
        import zarr

        return dict(zarr.open_group(self.path, mode="r").attrs[ATTR])

    def _set_attrs(self, attrs: dict) -> None:
        import zarr

        zarr.open_group(self.path, mode="r+").attrs[ATTR] = attrs

    def add_array(self, name, shape, chunks, dims, dtype="float64", fill_value=None, stage=None, axes=None):
        """Create ``name`` unless it exists (on resume); ``stage``/``axes`` say which block
        writes which chunk (``axes[k]``: the stage grid axis that array axis ``k`` follows,
        None for chunk 0)."""
        import zarr

        np_dtype = np.dtype(dtype) if dtype is not str else np.dtype("U1")
        self.planned_bytes += int(np.prod(shape)) * (np_dtype.itemsize if np_dtype.kind != "U" else 16)
        group = zarr.open_group(self.path, mode="r+")
        if name not in group:
            if fill_value is None:
                fill_value = np.nan if np_dtype.kind == "f" else (False if np_dtype.kind == "b" else 0)
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=list(dims),
                               fill_value=fill_value, compressors=checksum_codecs())
        if stage is not None:
            attrs = self._attrs()
            attrs.setdefault("arrays", {})[name] = {"stage": stage, "axes": list(axes)}
            self._set_attrs(attrs)

    def add_stage(self, stage: str, grid: tuple[int, ...]) -> None:
        """Marker array for a stage of ``grid`` blocks (one chunk per block)."""
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        name = f"_done_{stage}"
        if name not in group:
            group.create_array(name, shape=grid, chunks=(1,) * len(grid), dtype="uint8", fill_value=0,
                               dimension_names=[f"_{stage}_{i}" for i in range(len(grid))], compressors=None)

    def pending(self, stage: str) -> list[tuple[int, ...]]:
        """Blocks of ``stage`` to compute: not marked done, or marked done but damaged
        (a chunk missing or failing its checksum; their markers are cleared here)."""
        marks = _open_array(self.path, f"_done_{stage}")
        done = marks[...]
        # Chunks of finished blocks must exist; a store already marked complete (a rerun of
        # the same call, e.g. to repair it) is also read back against its checksums.
        damaged = damaged_blocks(self.path, stage, done, verify=bool(self._attrs().get("complete")))
        if damaged:
            for block in damaged:
                marks[tuple(slice(i, i + 1) for i in block)] = 0
                done[block] = 0
            attrs = self._attrs()
            attrs["complete"] = False
            self._set_attrs(attrs)
        return [tuple(int(i) for i in idx) for idx in np.argwhere(done == 0)]

    # ------------------------------------------------------------------ task side
    def write(self, name: str, region: tuple[slice, ...], values: np.ndarray) -> None:
        """Write ``values`` into ``region`` of array ``name``."""
        arr = _open_array(self.path, name)
        values = np.asarray(values)
        arr[region] = values.astype(arr.dtype, copy=False) if arr.dtype.kind in "fiub" else values

    def mark_done(self, stage: str, index: tuple[int, ...]) -> None:
        """Set a block's marker (after the block's writes)."""
        _open_array(self.path, f"_done_{stage}")[tuple(slice(i, i + 1) for i in index)] = 1

    def read(self, name: str) -> np.ndarray:
        """The whole (small) array ``name``."""
        return _open_array(self.path, name, mode="r")[...]

    def has(self, name: str) -> bool:
        """Whether ``name`` was laid out."""
        return os.path.exists(os.path.join(self.path, name, "zarr.json"))

    def finish(self, **meta: Any) -> None:
        """Mark the store complete (the last write) and, for a run written aside, swap it in."""
        attrs = self._attrs()
        attrs.update(meta, complete=True)
        self._set_attrs(attrs)
        if self.path != self.final:
            _swap_into_place(self.path, self.final)

    @property
    def meta(self) -> dict:
        """The run's metadata (``token``, ``complete`` and what the run recorded)."""
        return self._attrs()


class DiskStorage:
    """A folder of scratch zarr arrays (e.g. sample-variance factors), written like results:
    crc32c chunks, every chunk on disk, ``complete`` set by :meth:`finish` after the last write.

    Parameters
    ----------
    directory : str
        Created if missing. Each array gets a fresh name, so runs never overwrite
        each other's arrays.
    """

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)

    def create(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...]):
        """A new float64 zarr (v3) array ``<name>-<unique id>.zarr`` in the folder."""
        import zarr

        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{name}-{uuid.uuid4().hex[:12]}.zarr")
        arr = zarr.create_array(path, shape=shape, chunks=chunks, dtype="float64", zarr_format=3,
                                fill_value=np.nan, compressors=checksum_codecs())
        arr.attrs[ATTR] = {"kind": "scratch", "complete": False}
        return arr.with_config({"write_empty_chunks": True})

    @staticmethod
    def finish(arr):
        """Mark a fully written array complete; returns it."""
        arr.attrs[ATTR] = {"kind": "scratch", "complete": True}
        return arr


def _swap_into_place(new: str, final: str) -> None:
    """Replace the store ``final`` by the complete store ``new``, then drop stale aside runs."""
    swap_into_place(new, final)
    # Runs of other inputs written aside for this path and never finished are ours and stale.
    parent, prefix = os.path.dirname(final), f".{os.path.basename(final)}.kompot-"
    for name in os.listdir(parent):
        stale = os.path.join(parent, name)
        if name.startswith(prefix) and name.endswith(".partial") and read_meta(stale) is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _chunk_file(path: str, name: str, chunk: tuple[int, ...]) -> str:
    return os.path.join(path, name, "c", *(str(c) for c in chunk))


def damaged_blocks(path: str, stage: str, done: np.ndarray, verify: bool = True) -> list[tuple[int, ...]]:
    """Blocks of ``stage`` marked done whose chunks are missing (or, with ``verify``, fail
    their checksum when read back)."""
    attrs = read_meta(path) or {}
    bad: set[tuple[int, ...]] = set()
    for name, layout in attrs.get("arrays", {}).items():
        if layout["stage"] != stage:
            continue
        arr = _open_array(path, name, mode="r")
        axes = tuple(layout["axes"])
        for chunk in np.ndindex(*arr.cdata_shape):
            block = _block_of(chunk, axes, done.ndim)
            if not done[block] or block in bad:
                continue
            if not os.path.exists(_chunk_file(path, name, chunk)):
                bad.add(block)
            elif verify:
                try:
                    arr.blocks[chunk]
                except Exception:  # a checksum or decoding failure: the chunk is damaged
                    bad.add(block)
    return sorted(bad)


def check_store(path: Any, verify: bool = False) -> dict:
    """Check a result store before reading it as numbers.

    Parameters
    ----------
    path : str or path-like
        The store.
    verify : bool, default False
        Also read every chunk back (crc32c checksums); without it only the presence of
        every written chunk is checked.

    Returns
    -------
    dict
        The store's metadata.

    Raises
    ------
    StoreDamagedError
        The store is incomplete (interrupted run) or damaged: names what is wrong and how
        to repair it (rerun the same call; only the damaged blocks are recomputed).
    FileNotFoundError, ValueError
        No store at ``path``, or not a kompot_dask result store.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no result store at {path!r}")
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"{path!r} is not a kompot_dask result store")
    if not meta.get("complete"):
        msg = (f"the result store {path!r} is incomplete (its run was interrupted or failed); "
               "rerun the same call to finish it")
        raise StoreDamagedError(msg)
    for stage in {layout["stage"] for layout in meta.get("arrays", {}).values()}:
        done = _open_array(path, f"_done_{stage}", mode="r")[...]
        bad = damaged_blocks(path, stage, done, verify=verify)
        if bad:
            msg = (f"the result store {path!r} is damaged: {len(bad)} block(s) of stage {stage!r} "
                   f"(first {bad[:3]}) have missing or corrupt chunks; rerun the same call to "
                   "recompute exactly those blocks")
            raise StoreDamagedError(msg)
    return meta


def open_results(path: Any, verify: bool = False):
    """Open a complete result store as a lazy :class:`xarray.Dataset`, after :func:`check_store`.

    Parameters
    ----------
    path : str or path-like
    verify : bool, default False
        Read every chunk back against its checksum first.

    Returns
    -------
    xarray.Dataset
        Dask-backed; the store's metadata is in ``attrs["kompot_dask"]``. Reading a chunk
        that was damaged after this check raises (crc32c), it never reads as numbers.
    """
    import xarray as xr

    check_store(path, verify=verify)
    return xr.open_zarr(os.path.abspath(os.fspath(path)), consolidated=False)
