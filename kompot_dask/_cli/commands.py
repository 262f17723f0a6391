"""The subcommands: check everything cheap, then call ``da()`` / ``de()`` and write the files.

Order of a run: output paths (before reading anything), the input, the names it must
contain (columns, conditions, obsm key, layer, genes: read from metadata and cell states
only), then the cluster, the analyses, and the outputs moved into place together.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import time
from typing import Any, Iterator

from . import UsageError
from .files import ANNDATA_SUFFIXES, Outputs, open_atlas, read_atlas, table_paths, write_atlas, write_table
from .options import COMMANDS, analysis_kwargs
from .plan import atlas_summary, da_stage, de_stage, memory_budget

log = logging.getLogger("kompot_dask.cli")
COMPARISON = ("groupby", "condition1", "condition2", "obsm_key", "sample_col")


def execute(command: str, values: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Run ``command``; returns the exit code and the JSON for stdout."""
    stages = COMMANDS[command][0]
    planning = command == "plan" or values["dry_run"]
    # An AnnData-zarr output is written out of core: the atlas is read lazily and the
    # results (obs, var, obsm, uns and the layers, no X) are computed into the output.
    lazy = not planning and pathlib.Path(values["output"]).suffix.lower() == ".zarr"
    outputs = Outputs(overwrite=values["overwrite"])
    files: dict[str, Any] = {}
    if not planning:
        files["output"] = outputs.reserve(_checked_output(values["output"], values["input"], lazy), "output")
        if values["table_output"]:
            for stage, path in table_paths(values["table_output"], stages).items():
                files[stage] = (path, outputs.reserve(path, "table output"))

    log.info("reading %s", values["input"])
    adata = open_atlas(values["input"]) if lazy else read_atlas(values["input"])
    source = values["input"] if lazy else adata
    kwargs = {stage: {**{k: values[k] for k in COMPARISON}, **analysis_kwargs(values, stage)} for stage in stages}
    dry = _check_inputs(source, kwargs, stages)
    if planning:
        plan = _plan(command, adata, values, kwargs, dry)
        return (0 if plan["fits"] else 1), plan

    started = time.perf_counter()
    summary: dict[str, Any] = {"command": command, "input": values["input"], "output": values["output"]}
    tables: dict[str, str] = {}
    try:
        with _cluster(values) as client:
            if client is not None:
                summary["scheduler"] = client.scheduler.address
            store = str(files["output"]) if lazy else None
            results = {stage: _analyse(stage, source, kwargs[stage], values, store) for stage in stages}
        if not lazy:
            log.info("writing %s", values["output"])
            write_atlas(adata, files["output"], pathlib.Path(values["output"]))
        for stage, full in results.items():
            summary[stage] = _summary(stage, full)
            if stage in files:
                final, temp = files[stage]
                write_table(full["table"], temp, "cell" if stage == "da" else "gene")
                tables[stage] = str(final)
        outputs.commit()
    finally:
        outputs.discard()
    if tables:
        summary["tables"] = tables
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return 0, summary


def _checked_output(path: str, source: str, lazy: bool) -> str:
    if pathlib.Path(path).suffix.lower() not in ANNDATA_SUFFIXES:
        raise UsageError(f"-o/--output must end in .h5ad or .zarr; got {path}")
    if lazy and pathlib.Path(path).resolve() == pathlib.Path(source).resolve():
        raise UsageError(f"-o/--output {path} is the input; a .zarr output holds the results without X, so "
                         "it must be a new path (or call kompot_dask.da/de on the path to add results in place)")
    return path


def _check_inputs(adata: Any, kwargs: dict[str, dict], stages: tuple[str, ...]) -> dict | None:
    """Every name a run needs, checked before any heavy work; DE's planned sizes (or None)."""
    from .. import de
    from ..io.inputs import condition_inputs

    if "da" in stages:
        condition_inputs(adata, **{k: kwargs["da"][k] for k in COMPARISON}, expression=False)
    if "de" in stages:
        return de(adata, dry_run=True, **kwargs["de"])
    return None


def _analyse(stage: str, source: Any, kwargs: dict[str, Any], values: dict[str, Any], store: str | None) -> dict:
    """One analysis: on the AnnData in memory, or on the input's path into ``store``."""
    from .. import da, de

    log.info("running %s", stage)
    function = da if stage == "da" else de
    more = {"results_store": store} if store is not None else {}
    return function(source, **kwargs, overwrite=values["overwrite"], progress=not values["no_progress"],
                    return_full_results=True, **more)


def _summary(stage: str, full: dict) -> dict[str, Any]:
    table = full["table"]
    if stage == "da":
        counts = table["direction"].value_counts()
        return {"cells": int(len(table)), **{d: int(counts.get(d, 0)) for d in ("up", "down", "neutral")},
                "direction_key": full["field_names"]["direction_key"]}
    fdr = full.get("fdr_summary")
    return {"n_genes": int(len(table)), "n_de": None if fdr is None else int(fdr["n_significant"]),
            "mahalanobis_key": full["field_names"]["mahalanobis_key"]}


def _plan(command: str, adata: Any, values: dict, kwargs: dict, dry: dict | None) -> dict[str, Any]:
    with _cluster(values, connect_only=True) as client:
        budget = memory_budget(values, client)
    atlas = atlas_summary(adata, values["obsm_key"])
    stages: dict[str, Any] = {}
    if "da" in kwargs:
        stages["da"] = da_stage(adata, values, kwargs["da"], atlas, budget)
    if dry is not None:
        stages["de"] = de_stage(dry, _samples_per_condition(adata, values), atlas, budget)
    return {"command": command, "input": values["input"], "atlas": atlas, "memory": budget, "stages": stages,
            "fits": all(stage["fits"] for stage in stages.values())}


def _samples_per_condition(adata: Any, values: dict) -> int:
    if values["sample_col"] is None:
        return 0
    labels = adata.obs[values["groupby"]].astype(str)
    samples = adata.obs[values["sample_col"]]
    return max(int(samples[labels == values[c]].nunique()) for c in ("condition1", "condition2"))


@contextlib.contextmanager
def _cluster(values: dict[str, Any], connect_only: bool = False) -> Iterator[Any]:
    """The ``distributed.Client`` asked for (closed afterwards), or None to run in-process.

    ``connect_only`` (planning): connect to a given scheduler without setting up its
    workers (the plan checks their versions), and start no local cluster. Otherwise the workers are checked to run the same
    versions as this process and get the JAX plugin (``prepare_client``; RuntimeError,
    exit 1, if they differ).
    """
    from ..execution import get_client, prepare_client

    if values["scheduler"] or values["scheduler_file"]:
        from distributed import Client

        where = values["scheduler"] or f"scheduler file {values['scheduler_file']}"
        log.info("connecting to %s", where)
        if values["scheduler_file"]:
            client = Client(scheduler_file=values["scheduler_file"])
        else:
            client = Client(values["scheduler"])
        try:
            if not connect_only:
                prepare_client(client)
            yield client
        finally:
            client.close()
    elif (values["n_workers"] or values["memory_limit"]) and not connect_only:
        log.info("starting a local cluster")
        client = get_client(n_workers=values["n_workers"], memory_limit=values["memory_limit"])
        try:
            yield client
        finally:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
    else:
        yield None
