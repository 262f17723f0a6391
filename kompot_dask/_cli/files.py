"""Files of a command-line run: the input atlas, and outputs that appear only when complete.

Every output is checked before the run (suffix, folder, not already there unless
``--overwrite``), written under a hidden temporary name beside it, and renamed into place
only after everything succeeded; a failed run leaves existing files as they were and
no partial file at an output path.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

from . import UsageError

ANNDATA_SUFFIXES = (".h5ad", ".zarr")
TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t"}


def read_atlas(path: str) -> Any:
    """The AnnData at ``path`` (an ``.h5ad`` file or an AnnData-zarr directory), in memory."""
    import anndata

    source = pathlib.Path(path)
    if not source.exists():
        raise UsageError(f"input {path} does not exist")
    reader = anndata.read_zarr if source.is_dir() else anndata.read_h5ad
    try:
        return reader(source)
    except Exception as err:  # noqa: BLE001 - whatever the reader says, the input is unusable
        detail = " ".join(str(err).split()) or type(err).__name__
        kind = "an AnnData-zarr directory" if source.is_dir() else "an .h5ad file"
        raise UsageError(f"cannot read input {path} as {kind}: {detail}") from err


def open_atlas(path: str) -> Any:
    """obs, var, obsm and uns of the AnnData at ``path`` (no ``X``, no layers): enough to
    check a run's names and plan it, for a run that reads the matrices lazily."""
    from ..io.anndata_zarr import read_parts

    source = pathlib.Path(path)
    if not source.exists():
        raise UsageError(f"input {path} does not exist")
    try:
        return read_parts(source, ("obs", "var", "obsm", "uns"))
    except Exception as err:  # noqa: BLE001 - whatever the reader says, the input is unusable
        detail = " ".join(str(err).split()) or type(err).__name__
        kind = "an AnnData-zarr directory" if source.is_dir() else "an .h5ad file"
        raise UsageError(f"cannot read input {path} as {kind}: {detail}") from err


def table_paths(path: str, stages: tuple[str, ...]) -> dict[str, pathlib.Path]:
    """Where the result table of each analysis goes (``<stem>_da<ext>`` / ``<stem>_de<ext>``
    when a command runs both)."""
    target = pathlib.Path(path)
    if target.suffix.lower() not in TABLE_SEPARATORS:
        raise UsageError(f"--table-output must end in .csv or .tsv; got {path}")
    if len(stages) == 1:
        return {stages[0]: target}
    return {stage: target.with_name(f"{target.stem}_{stage}{target.suffix}") for stage in stages}


def write_table(table: Any, path: pathlib.Path, index_label: str) -> None:
    table.to_csv(path, sep=TABLE_SEPARATORS[path.suffix.lower()], index_label=index_label)


def write_atlas(adata: Any, path: pathlib.Path, like: pathlib.Path) -> None:
    """Write ``adata`` to ``path`` in the format that ``like`` (the final name) asks for."""
    if like.suffix.lower() == ".zarr":
        adata.write_zarr(path)
    else:
        adata.write_h5ad(path)


class Outputs:
    """The files one run writes, checked first and moved into place together at the end.

    Parameters
    ----------
    overwrite : bool
        Whether existing files at the output paths may be replaced.
    """

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self._pending: dict[pathlib.Path, pathlib.Path] = {}  # final path -> temporary path

    def reserve(self, path: str | pathlib.Path, what: str) -> pathlib.Path:
        """Check that ``path`` may be written; return its temporary sibling to write to."""
        final = pathlib.Path(path)
        if not final.parent.is_dir():
            raise UsageError(f"{what} {final}: folder {final.parent} does not exist")
        if final.exists() or final.is_symlink():
            if not self.overwrite:
                raise UsageError(f"{what} {final} already exists; pass --overwrite to replace it")
            if final.is_dir() and not _is_zarr(final):
                raise UsageError(f"{what} {final} is a folder but not a zarr store; not replacing it")
        if final in self._pending:
            raise UsageError(f"{what} {final} is also another output of this run")
        temp = final.with_name(f".{final.stem}.kompot-dask-{os.getpid()}.tmp{final.suffix}")
        self._pending[final] = temp
        return temp

    def commit(self) -> None:
        """Move every written temporary file into place (an output that appeared meanwhile is
        still not replaced without ``overwrite``)."""
        if not self.overwrite:
            for final in self._pending:
                if final.exists() or final.is_symlink():
                    raise UsageError(f"{final} appeared during the run; pass --overwrite to replace it")
        for final, temp in list(self._pending.items()):
            _replace(temp, final)
            del self._pending[final]

    def discard(self) -> None:
        """Remove what a failed run left under temporary names (and the staging stores of
        results computed for them)."""
        from ..io._protocol import read_marker

        for temp in self._pending.values():
            _remove(temp)
            for staged in temp.parent.glob(f".{temp.name}.kompot-*"):
                if read_marker(staged) is not None:
                    _remove(staged)
        self._pending.clear()


def _is_zarr(path: pathlib.Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zarray"))


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(temp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename ``temp`` to ``final``; a folder on either side is moved aside first and
    restored if the rename fails."""
    if not ((temp.is_dir() or final.is_dir()) and final.exists()):
        os.replace(temp, final)
        return
    aside = final.with_name(f".{final.name}.kompot-dask-{os.getpid()}.old")
    os.rename(final, aside)
    try:
        os.rename(temp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    _remove(aside)
