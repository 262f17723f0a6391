"""Results written into an AnnData-zarr store, element by element, without reading its matrices.

:class:`AnnDataZarr` is the sink of ``da()`` / ``de()`` when the atlas does not fit in memory:

- obs / var columns and uns entries go through :func:`anndata.io.write_elem`, one column or
  entry at a time; a dataframe's ``column-order`` is updated after its new columns exist, so
  an interrupted write never leaves a listed column missing;
- a per-cell x per-gene layer computed into a kompot_dask result store is **moved** into
  ``layers/`` (a rename, no copy) when the atlas is zarr format 3 and the layer covers every
  cell and gene; otherwise it is streamed chunk by chunk from that store with
  ``write_elem`` (a dask array), so it is never held in memory either way;
- consolidated metadata, if the store has it, is rewritten last (readers that trust it would
  not see the new elements otherwise).

Only elements a run names are written; nothing else in the store is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from typing import Any, Iterable

__all__ = ["AnnDataZarr", "is_anndata_zarr", "read_parts"]

ARRAY_ENCODING = {"encoding-type": "array", "encoding-version": "0.2.0"}


def _root_attrs(path: str) -> dict | None:
    """The root attributes of a zarr group at ``path`` (format 2 or 3), or None."""
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            with open(os.path.join(path, name)) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        return meta.get(key, {}) if key else meta
    if os.path.exists(os.path.join(path, ".zgroup")):
        return {}
    return None


def is_anndata_zarr(path: Any) -> bool:
    """Whether ``path`` is a directory holding an AnnData written to zarr."""
    attrs = _root_attrs(os.fspath(path)) if os.path.isdir(path) else None
    return bool(attrs) and attrs.get("encoding-type") == "anndata"


def read_parts(path: Any, elements: Iterable[str] = ("obs", "var", "uns")) -> Any:
    """An in-memory AnnData holding only ``elements`` of the atlas at ``path`` (an
    AnnData-zarr directory or an ``.h5ad`` file); its matrices are not read.

    Raises
    ------
    ValueError
        If a directory is not an AnnData-zarr store.
    """
    import anndata
    from anndata.io import read_elem

    path = os.fspath(path)
    if os.path.isdir(path):
        import zarr

        if not is_anndata_zarr(path):
            raise ValueError("no 'encoding-type: anndata' at its root")
        root = zarr.open_group(path, mode="r", use_consolidated=False)
        parts = {k: read_elem(root[k]) for k in elements if k in root}
    else:
        import h5py

        with h5py.File(path, "r") as root:
            parts = {k: read_elem(root[k]) for k in elements if k in root}
    if "uns" in parts:
        parts["uns"] = dict(parts["uns"])
    return anndata.AnnData(**parts)


class AnnDataZarr:
    """An AnnData-zarr store that results are added to.

    Parameters
    ----------
    path : str or path-like
        The store (an existing AnnData-zarr; see :meth:`create` for a new one).
    """

    def __init__(self, path: Any) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if not is_anndata_zarr(self.path):
            msg = (f"{self.path!r} is not an AnnData-zarr store (no 'encoding-type: anndata' at its "
                   "root); write the atlas with adata.write_zarr(path) first, or choose another path")
            raise ValueError(msg)

    # ------------------------------------------------------------------ reading
    def _root(self, mode: str = "r"):
        import zarr

        return zarr.open_group(self.path, mode=mode, use_consolidated=False)

    @property
    def zarr_format(self) -> int:
        """2 or 3."""
        return 3 if os.path.exists(os.path.join(self.path, "zarr.json")) else 2

    def consolidated(self) -> bool:
        """Whether the store carries consolidated metadata (rewritten by :meth:`finish`)."""
        if self.zarr_format == 2:
            return os.path.exists(os.path.join(self.path, ".zmetadata"))
        with open(os.path.join(self.path, "zarr.json")) as f:
            return json.load(f).get("consolidated_metadata") is not None

    def shell(self) -> Any:
        """An in-memory AnnData with this store's obs, var and uns (no matrices)."""
        return read_parts(self.path)

    def names(self, element: str) -> list[str]:
        """Keys of a mapping element (``layers``, ``uns``, ``obsm``...), empty if absent."""
        root = self._root()
        return list(root[element].keys()) if element in root else []

    # ------------------------------------------------------------------ creating
    @classmethod
    def create(cls, path: Any, obs: Any, var: Any, obsm: dict | None = None) -> "AnnDataZarr":
        """A new AnnData-zarr (format 3) holding ``obs``, ``var`` and ``obsm`` (no ``X``),
        written aside and renamed into place, so ``path`` never holds half a store.

        Raises
        ------
        FileExistsError
            If ``path`` exists.
        """
        import zarr
        from anndata.io import write_elem

        final = os.path.abspath(os.fspath(path))
        if os.path.lexists(final):
            raise FileExistsError(f"{final!r} exists; it is not replaced")
        aside = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.kompot-{uuid.uuid4().hex[:8]}.new")
        try:
            root = zarr.open_group(aside, mode="w", zarr_format=3)
            root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            plain = {"shards": None}
            write_elem(root, "obs", obs, dataset_kwargs=plain)
            write_elem(root, "var", var, dataset_kwargs=plain)
            write_elem(root, "obsm", dict(obsm or {}), dataset_kwargs=plain)
            for key in ("obsp", "varm", "varp", "layers", "uns"):
                write_elem(root, key, {})
            os.rename(aside, final)
        finally:
            if os.path.exists(aside):
                shutil.rmtree(aside, ignore_errors=True)
        return cls(final)

    # ------------------------------------------------------------------ writing
    def _kwargs(self) -> dict:
        return {"dataset_kwargs": {"shards": None}} if self.zarr_format == 3 else {}

    def _mapping(self, root: Any, element: str) -> Any:
        from anndata.io import write_elem

        if element not in root:
            write_elem(root, element, {})
        return root[element]

    def write_columns(self, element: str, frame: Any, names: Iterable[str]) -> None:
        """Write columns ``names`` of the dataframe ``frame`` into ``obs`` or ``var``."""
        import pandas as pd
        from anndata.io import write_elem

        names = list(names)
        if not names:
            return
        root = self._root("r+")
        group = root[element]
        for name in names:
            column = frame[name]
            values = column.array if isinstance(column.dtype, pd.CategoricalDtype) else column.to_numpy()
            write_elem(group, name, values, **self._kwargs())
        order = list(group.attrs.get("column-order", []))
        group.attrs["column-order"] = order + [n for n in names if n not in order]

    def write_entries(self, element: str, values: Any, keys: Iterable[str]) -> None:
        """Write the entries ``keys`` of the mapping ``values`` that exist into ``element``
        (``uns``, ``varm``...); each replaces only itself."""
        from anndata.io import write_elem

        root = self._root("r+")
        group = self._mapping(root, element)
        for key in dict.fromkeys(k for k in keys if k in values):
            write_elem(group, key, values[key], **self._kwargs())

    def move_layer(self, key: str, array_path: str) -> None:
        """Move the zarr (format 3) array at ``array_path``, shaped like ``X``, to ``layers/key``."""
        import zarr

        self._mapping(self._root("r+"), "layers")
        dest = os.path.join(self.path, "layers", key)
        old = None
        if os.path.lexists(dest):  # the caller checked that replacing it was asked for
            old = f"{dest}.kompot-old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(array_path, dest)
        zarr.open_array(dest, mode="r+").attrs.update(ARRAY_ENCODING)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def write_layer(self, key: str, values: Any) -> None:
        """Write ``values`` (a dask array shaped like ``X``) to ``layers/key``, chunk by chunk."""
        from anndata.io import write_elem

        group = self._mapping(self._root("r+"), "layers")
        write_elem(group, key, values, **self._kwargs())

    def can_move(self) -> bool:
        """Whether arrays of a kompot_dask result store (zarr format 3) can be moved in."""
        return self.zarr_format == 3

    def finish(self) -> None:
        """Rewrite the consolidated metadata, if the store has it."""
        if not self.consolidated():
            return
        import zarr

        with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec"
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.path, zarr_format=self.zarr_format)
