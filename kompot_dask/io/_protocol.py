"""The one protocol of every zarr store kompot_dask writes (datasets, results, scratch arrays).

- a root attribute ``kompot_dask`` = ``{"kind": ..., "complete": bool, ...}``; ``complete``
  becomes true with the last write;
- every chunk carries a crc32c checksum (:func:`checksum_codecs`), so a damaged chunk fails
  its read instead of reading as numbers;
- a store is replaced only by a complete new one (:func:`swap_into_place`), and only if the
  old one is ours (:func:`is_ours`): nothing else is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

__all__ = ["ATTR", "LEGACY_DATASET_ATTR", "checksum_codecs", "read_marker", "is_ours", "is_empty_dir",
           "swap_into_place"]

ATTR = "kompot_dask"
LEGACY_DATASET_ATTR = "kompot_dask_store"  # datasets written before the shared protocol


def checksum_codecs() -> list:
    """Compression then a crc32c checksum of every chunk (zarr v3 bytes-to-bytes codecs)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=1), Crc32cCodec()]


def read_marker(path: Any) -> dict | None:
    """The ``kompot_dask`` attribute of the zarr group or array at ``path`` (None if absent)."""
    try:
        with open(os.path.join(os.fspath(path), "zarr.json")) as f:
            attrs = json.load(f).get("attributes", {})
    except (OSError, ValueError):
        return None
    value = attrs.get(ATTR)
    if isinstance(value, dict) and "kind" in value:
        return value
    legacy = attrs.get(LEGACY_DATASET_ATTR)
    if isinstance(legacy, dict):
        return {"kind": "dataset", **legacy}
    return None


def is_empty_dir(path: Any) -> bool:
    """An existing directory with nothing in it."""
    return os.path.isdir(path) and not os.listdir(path)


def is_ours(path: Any) -> bool:
    """Whether ``path`` holds a store kompot_dask wrote (or is an empty directory)."""
    return read_marker(path) is not None or is_empty_dir(path)


def swap_into_place(new: Any, final: Any) -> None:
    """Replace ``final`` by the complete store ``new``; the old store is removed last.

    Raises
    ------
    FileExistsError
        ``final`` exists and is not ours (``new`` is left where it is).
    """
    new, final = os.fspath(new), os.fspath(final)
    old = None
    if os.path.lexists(final):
        if not is_ours(final):
            raise FileExistsError(f"{final!r} is not a kompot_dask store and is never replaced; "
                                  f"the new store stays at {new!r}")
        old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.kompot-old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
