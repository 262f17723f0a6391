"""A resumable zarr (v3) store of results, written block by block.

Layout: one array per output with named dimensions (``cell``, ``gene``), chunked so that
every block of work owns whole chunks (concurrent writers never share a chunk), plus one
``_done_<stage>`` marker array with a chunk per block. A rerun with the same inputs
(same fingerprint) skips blocks whose marker is set. The store says
``complete: true`` only after the last write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import numpy as np

__all__ = ["ResultStore", "fingerprint"]

ATTR = "kompot_dask"


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


class ResultStore:
    """Results of one run in a zarr group at ``path``.

    Use :meth:`open_or_create`; then :meth:`add_array` for every output, :meth:`pending`
    to list blocks still to do, :func:`mark_block_done` after each block's writes and
    :meth:`finish` at the very end.
    """

    def __init__(self, path: str, group):
        self.path = os.fspath(path)
        self.group = group
        self.planned_bytes = 0  # uncompressed size of the arrays added by this run

    @classmethod
    def open_or_create(cls, path: str, token: str, meta: dict, overwrite: bool = False) -> "ResultStore":
        """Resume the store at ``path`` if it was started with the same ``token``, else create it.

        A store from different inputs is never touched unless ``overwrite=True``.
        """
        import zarr

        path = os.fspath(path)
        if os.path.exists(path):
            existing = _read_attrs(path)
            if existing is not None and existing.get("token") == token and not overwrite:
                return cls(path, zarr.open_group(path, mode="r+"))
            if not overwrite:
                what = "complete results" if existing and existing.get("complete") else "other data"
                msg = (
                    f"{path!r} already holds {what} from different inputs or settings; pass "
                    "`overwrite=True` to replace it, or choose another output path"
                )
                raise FileExistsError(msg)
            shutil.rmtree(path)
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs[ATTR] = {"token": token, "complete": False, **meta}
        return cls(path, group)

    @property
    def meta(self) -> dict:
        """The run's metadata (``token``, ``complete`` and what the caller stored)."""
        return dict(self.group.attrs[ATTR])

    @property
    def complete(self) -> bool:
        """True only once every block and the final reductions were written."""
        return bool(self.meta.get("complete"))

    def add_array(self, name: str, shape: tuple, chunks: tuple, dims: tuple, dtype: Any = "float64",
                  compressors: Any = "auto", fill_value: Any = None):
        """Create ``name`` unless it exists (on resume); return the zarr array."""
        itemsize = np.dtype(dtype).itemsize if np.dtype(dtype).kind != "U" else 16
        self.planned_bytes += int(np.prod(shape)) * itemsize
        if name in self.group:
            return self.group[name]
        if fill_value is None:
            fill_value = np.nan if np.dtype(dtype).kind == "f" else None
        return self.group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=list(dims),
            fill_value=fill_value, compressors=compressors,
        )

    def add_stage(self, stage: str, grid: tuple[int, ...]) -> None:
        """Marker array for a stage of ``grid`` blocks (one chunk per block)."""
        self.add_array(f"_done_{stage}", grid, (1,) * len(grid), tuple(f"_{stage}_{i}" for i in range(len(grid))),
                       dtype="uint8", fill_value=0, compressors=None)

    def pending(self, stage: str) -> list[tuple[int, ...]]:
        """Block indices of ``stage`` whose marker is not set."""
        done = self.group[f"_done_{stage}"][...]
        return [tuple(int(i) for i in idx) for idx in np.argwhere(done == 0)]

    def finish(self, **meta: Any) -> None:
        """Record ``meta`` and mark the store complete (the last write of a run)."""
        attrs = self.meta
        attrs.update(meta, complete=True)
        self.group.attrs[ATTR] = attrs


def _read_attrs(path: str) -> dict | None:
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # not a zarr group: leave it alone, report "other data"
        return None
    value = group.attrs.get(ATTR)
    return dict(value) if isinstance(value, dict) else None


def write_block(path: str, name: str, region: tuple[slice, ...], values: np.ndarray) -> None:
    """Write ``values`` into ``region`` of array ``name`` of the store at ``path`` (worker side)."""
    import zarr

    arr = zarr.open_array(os.path.join(path, name), mode="r+")
    arr[region] = values.astype(arr.dtype, copy=False)


def mark_block_done(path: str, stage: str, index: tuple[int, ...]) -> None:
    """Set a block's marker from a worker."""
    import zarr

    arr = zarr.open_array(os.path.join(path, f"_done_{stage}"), mode="r+")
    arr[tuple(slice(i, i + 1) for i in index)] = 1
