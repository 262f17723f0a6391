"""The main job, end to end: a two-condition atlas with known truth → da() + de() on a cluster → figures.

``kompot-dask demo`` (or :func:`run_demo`) generates an atlas with
:func:`kompot_dask.testing.simulate_atlas` (a curved branching manifold, 3 + 3 replicate
samples with replicate-level variation, regions of changed abundance, genes changed in
known regions), writes it as an AnnData-zarr, runs :func:`kompot_dask.da` and
:func:`kompot_dask.de` with sample variance on a local cluster of worker processes, writes
the figures as PNGs and reports how well the truth was recovered.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from typing import Any, Iterator

import numpy as np

__all__ = ["run_demo"]

GROUPBY, CONDITION1, CONDITION2, SAMPLE = "condition", "control", "treated", "sample"


def _recovery(adata: Any, atlas: Any) -> dict[str, Any]:
    """How well the results recover the generator's truth."""
    from .plot.fields import resolve_fields
    from .testing import auroc

    da_fields = resolve_fields(adata, "da")
    z = adata.obs[da_fields.zscore_key].to_numpy()
    lfc = adata.obs[da_fields.lfc_key].to_numpy()
    direction = adata.obs[da_fields.direction_key].astype(str).to_numpy()
    up, down = atlas.cell_is_da & (atlas.true_lfc > 0), atlas.cell_is_da & (atlas.true_lfc < 0)
    info = json.loads(adata.uns["kompot_de"]["last_run_info"])
    dist = adata.var[info["mahalanobis_key"]].to_numpy()
    is_de_key = (info.get("fdr_keys") or {}).get("is_de_key")
    called = adata.var[is_de_key].to_numpy(dtype=bool) if is_de_key else np.zeros(len(dist), dtype=bool)
    truth_de = atlas.gene_is_de
    ranks = np.argsort(np.argsort(lfc)), np.argsort(np.argsort(atlas.true_lfc))
    return {
        "da_auroc_abs_zscore": round(auroc(np.abs(z), atlas.cell_is_da), 4),
        "da_auroc_zscore_up_regions": round(auroc(z, up), 4),
        "da_auroc_neg_zscore_down_regions": round(auroc(-z, down), 4),
        "da_spearman_lfc_true_lfc": round(float(np.corrcoef(*ranks)[0, 1]), 4),
        "da_cells_called": int((direction != "neutral").sum()),
        "da_cells_called_in_true_regions": int(((direction != "neutral") & atlas.cell_is_da).sum()),
        "de_auroc_mahalanobis": round(auroc(dist, truth_de), 4),
        "de_genes_true": int(truth_de.sum()),
        "de_genes_called": int(called.sum()),
        "de_genes_called_true": int((called & truth_de).sum()),
    }


def _figures(adata: Any, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from . import plot

    de_info = json.loads(adata.uns["kompot_de"]["last_run_info"])
    top_gene = str(adata.var_names[int(np.nanargmax(adata.var[de_info["mahalanobis_key"]].to_numpy()))])
    paths = {
        "volcano_da.png": lambda p: plot.volcano_da(adata, save=p),
        "volcano_de.png": lambda p: plot.volcano_de(adata, save=p),
        "embedding_lfc.png": lambda p: plot.embedding(adata, color="lfc", save=p),
        "embedding_direction.png": lambda p: plot.embedding(adata, color="direction", save=p),
        f"gene_expression_{top_gene}.png": lambda p: plot.gene_expression(adata, top_gene, save=p),
        "direction_by_sample.png": lambda p: plot.direction_barplot(adata, SAMPLE, save=p),
    }
    written = []
    import matplotlib.pyplot as plt

    for name, draw in paths.items():
        path = os.path.join(out_dir, name)
        draw(path)
        plt.close("all")
        written.append(path)
    return written


@contextlib.contextmanager
def _zarr_v3_writes(anndata: Any) -> Iterator[None]:
    """anndata writes zarr v3 (and keeps quiet about its future sharding default)."""
    with anndata.settings.override(zarr_write_format=3), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def run_demo(
    output: str = "kompot_demo",
    *,
    n_cells: int = 6000,
    n_genes: int = 300,
    n_landmarks: int = 300,
    null_genes: int | None = None,
    n_workers: int = 2,
    memory_limit: str = "4GB",
    cluster: bool = True,
    figures: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Generate an atlas with known truth, analyse it, write figures and report the recovery.

    Parameters
    ----------
    output : str
        Folder for the atlas (``atlas.zarr``, AnnData-zarr with the results added), the
        figures and ``summary.json``. Must not exist unless ``overwrite``.
    n_cells, n_genes : int
        Atlas size.
    n_landmarks : int
        Shared landmarks of both analyses.
    null_genes : int, optional
        Null genes for the gene-level FDR (default: as many as genes). Kompot turns the
        FDR off with a sample column; here it stays on so genes are called.
    n_workers, memory_limit : int, str
        The local cluster (``cluster=False``: run in this process).
    figures : bool
        Write the PNGs (needs matplotlib).
    progress : bool
        Progress bars and the dashboard link (stderr).
    overwrite : bool
        Replace an earlier demo folder (only one holding a demo ``summary.json``).
    seed : int
        Seed of the atlas.

    Returns
    -------
    dict
        The summary (also written to ``summary.json``): sizes, seconds per step and the
        recovery figures: AUROC of |z| for cells in true DA regions vs the rest, of z for
        cells in regions of increased abundance and of −z for decreased ones, the Spearman
        correlation of the log fold change with the true one; AUROC of the Mahalanobis
        ranking for truly DE genes; cells and genes called, and how many are true.
    """
    import shutil

    import anndata

    from . import da, de
    from .testing import atlas_anndata, simulate_atlas

    if os.path.exists(output):
        if not (overwrite and os.path.exists(os.path.join(output, "summary.json"))):
            msg = (f"{output!r} exists; choose another output folder"
                   + (" (overwrite=True replaces only an earlier demo folder)" if overwrite else
                      " or pass overwrite=True to replace an earlier demo"))
            raise FileExistsError(msg)
        shutil.rmtree(output)
    os.makedirs(output)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    atlas = simulate_atlas(n_cells, n_genes, seed=seed)
    path = os.path.join(output, "atlas.zarr")
    with _zarr_v3_writes(anndata):
        atlas_anndata(atlas).write_zarr(path)
    times["generate"] = time.perf_counter() - t0

    client = None
    if cluster:
        from .execution import get_client

        client = get_client(n_workers=n_workers, memory_limit=memory_limit)
    try:
        gp = dict(n_landmarks=n_landmarks, random_state=seed)
        t0 = time.perf_counter()
        # on the store's path, as for an atlas too big for memory: the results are written
        # into it (the cells x genes layers chunk by chunk, on the cluster's workers)
        da(path, GROUPBY, CONDITION1, CONDITION2, sample_col=SAMPLE, progress=progress, **gp)
        times["da"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        de(path, GROUPBY, CONDITION1, CONDITION2, sample_col=SAMPLE, progress=progress,
           null_genes=n_genes if null_genes is None else null_genes, **gp)
        times["de"] = time.perf_counter() - t0
    finally:
        if client is not None:
            cluster_obj = getattr(client, "cluster", None)
            client.close()
            if cluster_obj is not None:
                cluster_obj.close()
    adata = anndata.read_zarr(path)
    summary = {
        "atlas": {"cells": n_cells, "genes": n_genes, "samples": "3 + 3", "path": path,
                  "true_da_cells": int(atlas.cell_is_da.sum()), "true_de_genes": int(atlas.gene_is_de.sum())},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "recovery": _recovery(adata, atlas),
        "figures": _figures(adata, output) if figures else [],
    }
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
