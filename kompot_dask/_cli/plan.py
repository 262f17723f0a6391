"""The memory plan of ``kompot-dask plan`` and ``--dry-run``: sizes, not computation.

Sizes come from the atlas and from ``de(..., dry_run=True)`` (which also checks every
column, condition and key); the per-task working set and the memory a task may use come
from :mod:`kompot_dask.execution.plan`, the planner the runs themselves use. Every byte
count is an estimate of float64 arrays held at once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..anndata.settings import GPSettings
from ..execution.plan import memory_target, plan_blocks
from ..execution.versions import check_versions

MAX_AUTO_LANDMARKS = 5000  # DA without GP settings: full GP up to this many cells, else this many landmarks
_GP_FIELDS = {f.name for f in dataclasses.fields(GPSettings)}


def machine_memory() -> int:
    """Physical memory of this machine, or the cgroup's limit if lower (bytes)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as handle:
                limit = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        total = min(total, limit)
    return int(total)


class _PlannedWorkers:
    """Stands in for the client of a local cluster not started (``memory_target`` asks it)."""

    def __init__(self, limits: list[int]):
        self.limits = limits

    def scheduler_info(self) -> dict:
        return {"workers": {str(i): {"memory_limit": limit} for i, limit in enumerate(self.limits)}}


def memory_budget(values: dict[str, Any], client: Any = None) -> dict[str, Any]:
    """Memory of where the run would go: this process, a local cluster of ``--n-workers`` /
    ``--memory-limit`` (not started: sized as ``get_client`` would start it), or the
    workers of the connected ``client`` (which must run this process's versions:
    :func:`~kompot_dask.execution.check_versions`, RuntimeError with one line if not)."""
    machine = machine_memory()
    budget: dict[str, Any] = {"machine_bytes": machine}
    if client is not None:
        check_versions(client)
        workers = client.scheduler_info()["workers"]
        limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
        budget.update(where="cluster", scheduler=client.scheduler.address, n_workers=len(limits),
                      worker_memory_bytes=min(limits) if limits and all(limits) else None)
        budget["task_target_bytes"] = memory_target(client)
    elif values["n_workers"] or values["memory_limit"]:
        from dask.utils import parse_bytes

        n = values["n_workers"] or max(1, os.cpu_count() or 1)
        limit = parse_bytes(values["memory_limit"]) if values["memory_limit"] else machine // n
        budget.update(where="local cluster", n_workers=n, worker_memory_bytes=int(limit))
        budget["task_target_bytes"] = memory_target(_PlannedWorkers([int(limit)] * n))
    else:
        budget.update(where="in-process", n_workers=0, worker_memory_bytes=None,
                      task_target_bytes=memory_target(None))
    return budget


def atlas_summary(adata: Any, obsm_key: str) -> dict[str, int]:
    """Cells, genes, cell-state features and the bytes of the atlas held in memory."""
    held = _nbytes(adata.X) + sum(_nbytes(v) for v in adata.layers.values()) \
        + sum(_nbytes(v) for v in adata.obsm.values()) + sum(_nbytes(v) for v in adata.obsp.values())
    held += int(adata.obs.memory_usage(deep=True).sum()) + int(adata.var.memory_usage(deep=True).sum())
    states = adata.obsm[obsm_key] if obsm_key in adata.obsm else None
    features = int(states.shape[1]) if states is not None and len(states.shape) == 2 else None
    return {"cells": int(adata.n_obs), "genes": int(adata.n_vars), "features": features, "bytes": int(held)}


def _nbytes(array: Any) -> int:
    if array is None:
        return 0
    if hasattr(array, "data") and hasattr(array, "indices") and hasattr(array, "indptr"):  # scipy sparse
        return int(array.data.nbytes + array.indices.nbytes + array.indptr.nbytes)
    return int(getattr(array, "nbytes", 0) or 0)


def da_stage(adata: Any, values: dict[str, Any], kwargs: dict[str, Any], atlas: dict, budget: dict) -> dict:
    """DA: landmarks per condition (shared ones with any GP setting, else each condition's own,
    Kompot's quirk), their factors and the per-cell results; a task: cells x landmarks blocks."""
    labels = adata.obs[values["groupby"]].astype(str)
    cells = {c: int((labels == values[c]).sum()) for c in ("condition1", "condition2")}
    if _GP_FIELDS & set(kwargs):
        shared = min(kwargs.get("n_landmarks") or GPSettings().n_landmarks, sum(cells.values()))
        landmarks = {c: shared for c in cells}
    else:
        landmarks = {c: n if n <= MAX_AUTO_LANDMARKS else MAX_AUTO_LANDMARKS for c, n in cells.items()}
    from ..options import get_options

    block_limit = get_options()["chunk_memory_bytes"]
    n = atlas["cells"]
    from ..estimators._kept_projections import planned_bytes

    # a landmark density (shared landmarks, or its own above 5,000 cells) keeps its factor
    # rows for the variances at its cells
    shared_landmarks = bool(_GP_FIELDS & set(kwargs))
    own = [(cells[c], m) for c, m in landmarks.items() if shared_landmarks or m < cells[c]]
    sizes = {"landmark_factors": sum(2 * 8 * m * m for m in landmarks.values()), "results": 8 * 6 * n,
             "kept_projections": planned_bytes(own) if budget["where"] == "in-process" else 0}
    task = max(3 * min(8 * n * m, block_limit) for m in landmarks.values())  # cells x landmarks blocks
    stage = {"cells": cells, "landmarks": landmarks, "bytes": sizes, "blocks": {"task_bytes": task}}
    return _verdict(stage, atlas, budget, task_bytes=task)


def de_stage(dry: dict, samples: int, atlas: dict, budget: dict) -> dict:
    """DE: ``de(..., dry_run=True)``'s sizes, and the prediction blocks that fit one task."""
    n, g, m = dry["n_cells_predicted"], dry["n_genes"], dry["n_landmarks"]
    sizes = dict(dry["bytes"])
    if budget["where"] != "in-process":  # fits made beside a cluster keep no projections
        sizes["kept_projections"] = 0
    shared = 8 * 2 * (m * m + m * g)  # both conditions' factors and gene weights, sent to every task
    stage: dict[str, Any] = {"cells": n, "genes": g, "landmarks": m, "samples_per_condition": samples,
                             "bytes": sizes}
    try:
        blocks = plan_blocks(n, g, m, samples, shared, budget["task_target_bytes"])
    except MemoryError as err:
        stage["blocks"] = None
        return _verdict(stage, atlas, budget, task_bytes=None, reason=str(err))
    stage["blocks"] = {"cells": blocks.cell_chunk, "genes": blocks.gene_batch, "task_bytes": blocks.task_bytes}
    return _verdict(stage, atlas, budget, task_bytes=blocks.task_bytes)


def _verdict(stage: dict, atlas: dict, budget: dict, task_bytes: int | None, reason: str | None = None) -> dict:
    """Peak bytes of this process (the atlas, the results, and the tasks when they run here)
    against the machine; and a task against its target on the workers."""
    held = atlas["bytes"] + sum(stage["bytes"].values())
    if budget["where"] == "in-process" and task_bytes is not None:
        held += task_bytes
    stage["peak_bytes"] = int(held)
    fits = held <= budget["machine_bytes"] and reason is None
    if task_bytes is not None and task_bytes > budget["task_target_bytes"]:
        fits = False
        reason = (f"one task needs about {task_bytes / 2**30:.2f} GiB, more than the "
                  f"{budget['task_target_bytes'] / 2**30:.2f} GiB a task may use")
    if reason is None and not fits:
        reason = (f"this process would hold about {held / 2**30:.2f} GiB; the machine has "
                  f"{budget['machine_bytes'] / 2**30:.2f} GiB")
    stage["fits"] = bool(fits)
    if reason is not None:
        stage["reason"] = reason
    return stage
