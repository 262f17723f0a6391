"""``de(adata, ...)``: differential expression on an AnnData, written as Kompot writes it (SPEC §7.4)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..differential import DifferentialExpression
from ..estimators._kept_projections import planned_bytes
from ._common import landmarks_for, landmarks_info, release_kept, run_context, store_landmarks
from ._fields import de_field_mapping, de_fields, replicate_fields
from ._groups import group_results, groups_summary, parse_groups
from ._history import check_overwrite, environment, now, record_run
from ._target import Target, open_target
from .settings import FDRSettings, FilterSettings, GPSettings, OutputSettings, StorageSettings, as_params, \
    settings_from

__all__ = ["de"]

KEY = "kompot_de"
AUTO_NULL_GENES = 2000
MAX_COVARIANCE_CELLS = 20_000  # store_posterior_covariance: at most a 3 GiB obsp matrix


def de(
    adata: Any,
    groupby: str,
    condition1: Any,
    condition2: Any,
    obsm_key: str = "DM_EigenVectors",
    layer: str | None = None,
    genes: Any = None,
    sample_col: str | None = None,
    gp: GPSettings | None = None,
    fdr: FDRSettings | None = None,
    filter: FilterSettings | None = None,  # noqa: A002 (Kompot's name)
    storage: StorageSettings | None = None,
    output: OutputSettings | None = None,
    dry_run: bool = False,
    performance_report: str | None = None,
    results_store: str | None = None,
    replicate_null: bool | None = None,
    **kwargs: Any,
):
    """Differential expression between two conditions of an AnnData, stored in var / layers / obs.

    Kompot 0.8.0's ``de()``: same arguments, defaults and field names. Settings fields may
    also be given as keywords (``null_genes=0``, ``result_key=...``, ``copy=True``...);
    other keywords go to :class:`~kompot_dask.FunctionEstimator`.

    Parameters
    ----------
    adata : anndata.AnnData, str or path-like
        The atlas: in memory (results are assigned to it), or too big for memory: the path
        of an AnnData-zarr (results are written into it) or ``.h5ad`` file (results go to
        ``<stem>.kompot.zarr`` beside it), or a backed / ``read_lazy`` AnnData. Out of
        memory, cells x genes layers are computed into the store chunk by chunk (on the
        active dask cluster, if any) and never held in memory.
    groupby : str
        obs column with each cell's condition.
    condition1, condition2 : object
        The conditions to compare (``condition2`` vs ``condition1``).
    obsm_key : str, default "DM_EigenVectors"
        Cell states.
    layer : str, optional
        Expression layer (default ``X``).
    genes : sequence of str or boolean mask, optional
        Genes to analyse (others get NaN / False in var; layers are then sparse).
    sample_col : str, optional
        obs column with each cell's sample: adds the between-replicate variance (and
        switches ``null_genes="auto"`` off).
    gp, fdr, filter, storage, output : settings, optional
        See :mod:`kompot_dask.anndata.settings`.
    dry_run : bool, default False
        Return the planned sizes without computing anything.
    performance_report : str, optional
        On a dask cluster, write dask's performance report (HTML) here; its path is kept in
        the run history.
    results_store : str or path-like, optional
        Write the results into this AnnData-zarr (created with the atlas's obs and var if
        missing) instead of the default above.
    replicate_null : bool, optional
        Also call genes against the sample-relabelling null
        (:meth:`~kompot_dask.DifferentialExpression.compute_replicate_fdr`, its defaults,
        FDR level ``fdr.threshold``), which holds its error rate when replicates differ
        where Kompot's null genes do not. ``None`` (default): on with ``sample_col`` (at
        least 3 samples in all), Mahalanobis distances and landmarks, off otherwise (so
        without ``sample_col`` the fields are Kompot's); ``True``: required (refused,
        naming the fix, before anything is written); ``False``: off. Adds the var columns
        ``<result_key>_<c1>_to_<c2>_replicate_{mahalanobis,pvalue,fdr,is_de}_sample_var``
        (the distance is that of the abundance-balanced fits the null is built for), in
        memory and out of core alike; ``fdr_null`` in the run history says which null
        each call used (and why the relabelling null is off, when it is).
    **kwargs
        Settings fields, or estimator keywords.

    Returns
    -------
    None, dict, AnnData or (AnnData, dict)
        ``None`` by default; with ``return_full_results`` a dict with ``table`` (per gene),
        ``model``, ``field_names``, ``landmarks``, ``fdr_summary``; with ``copy`` the new
        AnnData (and the dict).
    """
    objects = {"gp": gp, "fdr": fdr, "filter": filter, "storage": storage, "output": output}
    settings, extra = settings_from(objects, kwargs)
    gps = settings["gp"] or GPSettings()
    fdrs = settings["fdr"] or FDRSettings()
    fil = settings["filter"] or FilterSettings()
    sto = settings["storage"] or StorageSettings()
    out = settings["output"] or OutputSettings()
    rk = sto.result_key or KEY
    null_genes = fdrs.null_genes
    if isinstance(null_genes, str):
        null_genes = 0 if sample_col is not None else AUTO_NULL_GENES
    internal_on = out.compute_mahalanobis and null_genes is not None and np.size(null_genes) > 0 \
        and not (np.ndim(null_genes) == 0 and int(null_genes) == 0)
    external = fdrs.null_mahalanobis if out.compute_mahalanobis else None
    fdr_on = internal_on or external is not None
    sv = sample_col is not None
    replicate_null = _replicate_request(replicate_null, sv, out.compute_mahalanobis)
    f = de_fields(rk, condition1, condition2, sv)
    rf = replicate_fields(rk, condition1, condition2, sv) if replicate_null is not False else {}
    target = open_target(adata, out.copy, results_store)
    adata = target.adata
    from ..io.inputs import condition_inputs

    inputs = condition_inputs(adata if target.in_memory else target.source, groupby, condition1, condition2, obsm_key=obsm_key, layer=layer, genes=genes,
                              sample_col=sample_col)
    keep = _cell_filter(adata, fil.cell_filter)
    groups = parse_groups(adata, fil.groups, keep, fil.min_cells) if fil.groups is not None else {}
    if groups and not out.compute_mahalanobis:
        raise ValueError("`groups` gives per-group Mahalanobis distances; it needs compute_mahalanobis=True")
    covariance = sto.store_posterior_covariance and not sv  # Kompot stores it without sample_col only
    if covariance:
        _check_covariance(target, int(keep.sum()))
    x1, y1, l1, x2, y2, l2 = _filtered(inputs, keep, fil.min_cells, condition1, condition2)
    target.check_cells(inputs.obs_names)
    gene_cols = _gene_columns(adata, inputs.gene_names)
    if dry_run:
        return _plan(inputs, keep, gps, int(np.size(null_genes) if np.ndim(null_genes) else null_genes)
                     if internal_on else 0)

    var_keys, layer_keys, obs_keys = _planned_fields(f, out, sto, fdr_on, sv)
    var_keys = var_keys + list(rf.values())
    varm_keys = list(_varm_keys(f, fdr_on).values()) if groups else []
    obsp_keys = [f["posterior_covariance_key"]] if covariance else []
    check_overwrite(adata, KEY, {"var": var_keys, "layers": layer_keys, "obs": obs_keys, "varm": varm_keys,
                                 "obsp": obsp_keys}, sto.overwrite, target.present())

    landmarks = landmarks_for(adata, gps.landmarks, rk, KEY, ("kompot_da",), inputs.x_all.shape[1])
    model = DifferentialExpression(
        n_landmarks=gps.n_landmarks, use_sample_variance=sv, eps=gps.eps, jit_compile=gps.jit_compile,
        random_state=gps.random_state, batch_size=gps.batch_size or 100,
        store_arrays_on_disk=sto.store_arrays_on_disk, disk_storage_dir=sto.disk_storage_dir,
        max_memory_ratio=sto.max_memory_ratio, use_empirical_variance=gps.use_empirical_variance,
        null_genes=null_genes if internal_on else None, null_seed=fdrs.null_seed, fdr_threshold=fdrs.threshold,
        gene_names=None if inputs.gene_names is None else [str(g) for g in inputs.gene_names],
        replicate_null=replicate_null,
    )
    with run_context(out.progress, performance_report) as execution:
        model.fit(x1, y1, x2, y2, sigma=gps.sigma, ls=gps.ls, ls_factor=gps.ls_factor, landmarks=landmarks,
                  condition1_sample_indices=l1, condition2_sample_indices=l2,
                  allow_single_condition_variance=out.allow_single_condition_variance, **extra)
        if model.computed_landmarks is not None:
            info = landmarks_info(model.computed_landmarks, shape_as_string=True)
            store_landmarks(adata, (rk, KEY), model.computed_landmarks, info, sto.store_landmarks)

        staging = None if target.in_memory else target.staging(rk, "de")
        result = _predict(model, inputs.x_all[keep], out.compute_mahalanobis, staging)
        if external is not None:
            _external_fdr(model, result, external, fdrs)
        replicate = model.replicate_fdr_results if rf and model.replicate_null_reason is None else None
        per_group = group_results(model, inputs.x_all[keep], result["fold_change"], groups, keep,
                                  gps.random_state, fdr_on, external, fdrs.combine_with_internal) if groups else None
        if covariance:
            x_kept = inputs.x_all[keep]
            posterior = model.function_predictor1.covariance(x_kept, diag=False) \
                + model.function_predictor2.covariance(x_kept, diag=False)
    release_kept([model.function_predictor1, model.function_predictor2])
    written = _store(target, f, result, keep, gene_cols, out, sto, fdr_on, sv)
    if replicate is not None:
        written["var"] += _store_replicate(adata, rf, replicate, gene_cols)
    if per_group is not None:
        written["varm"] = _store_groups(adata, per_group, _varm_keys(f, fdr_on), gene_cols)
    if covariance:
        full_cov = np.zeros((adata.n_obs, adata.n_obs))
        full_cov[np.ix_(keep, keep)] = posterior
        adata.obsp[f["posterior_covariance_key"]] = full_cov
    fdr_summary = _fdr_summary(result, fdrs.threshold) if fdr_on else None
    run_info = {
        "analysis_type": "de",
        "auto_filtered": False,
        "environment": environment(),
        "fdr_keys": {"is_de_key": f["is_de_key"], "local_fdr_key": f["mahalanobis_local_fdr_key"],
                     "pvalue_key": f["mahalanobis_pvalue_key"], "tail_fdr_key": f["mahalanobis_tail_fdr_key"]}
        if fdr_on else None,
        "execution": execution,
        "fdr_results": fdr_summary,
        "fdr_null": _null_used(internal_on, external, replicate, rf, "no sample_col" if not sv else (
            "compute_mahalanobis=False" if not out.compute_mahalanobis else model.replicate_null_reason)),
        "field_mapping": de_field_mapping(f, condition1, condition2, set(sum(written.values(), [])), sv,
                                          fdrs.threshold),
        "field_names": f,
        "function": "compute_differential_expression",
        "has_groups": bool(groups),
        **({"groups_summary": groups_summary(groups, inputs, adata.n_obs)} if groups else {}),
        "lfc_key": f["mean_lfc_key"],
        "mahalanobis_key": f["mahalanobis_key"],
        "memory_analysis": None,
        "params": {
            "condition1": condition1, "condition2": condition2, "groupby": groupby, "obsm_key": obsm_key,
            "layer": layer, "genes": None if genes is None else [str(g) for g in np.asarray(genes).tolist()],
            "sample_col": sample_col, "gp": {**as_params(gps), "landmarks": True if landmarks is not None else None},
            "fdr": as_params(fdrs), "filter": as_params(fil), "storage": {**as_params(sto), "result_key": rk}, "output": as_params(out),
            **({"extra_kwargs": extra} if extra else {}),
        },
        "ptp_key": f["ptp_key"],
        "result_key": rk,
        "smoothed_layer_keys": {"condition1": f["smoothed_key_1"], "condition2": f["smoothed_key_2"],
                                "fold_change": f["fold_change_key"]},
        "storage_stats": None,
        "timestamp": now(),
        "underrepresentation": {},
        "uses_sample_variance": sv,
    }
    # Kompot lists the posterior-covariance key as written even when it is not stored (kept).
    recorded = {**written, "obsp": [f["posterior_covariance_key"]] if not sv else [], "uns": [KEY]}
    record_run(adata, KEY, run_info, {k: v for k, v in recorded.items() if v})
    target.commit(staging, written, [rk, KEY])
    full = None
    if out.return_full_results or out.return_null_data:
        full = _full_results(model, result, f, fdr_summary, inputs, fdr_on, external, fdrs.combine_with_internal)
    if out.copy:
        return (adata, full) if full is not None else adata
    return full


# ------------------------------------------------------------------------------ pieces
def _replicate_request(replicate_null: Any, sv: bool, mahalanobis: bool) -> bool | None:
    """The model's ``replicate_null``: False where the run cannot have it, else as given
    (None: the model decides from its fit); ``True`` without samples or distances raises."""
    if not (replicate_null is None or isinstance(replicate_null, bool)):
        raise TypeError(f"`replicate_null` must be None (on with `sample_col`), True or False; got {replicate_null!r}")
    if replicate_null is True and not sv:
        raise ValueError("`replicate_null=True` relabels samples between the conditions; pass `sample_col=`, the obs "
                         "column with each cell's sample")
    if replicate_null is True and not mahalanobis:
        raise ValueError("`replicate_null=True` calls genes by their Mahalanobis distance; it needs "
                         "compute_mahalanobis=True")
    return replicate_null if sv and mahalanobis else False


def _store_replicate(adata: Any, rf: dict, table: Any, cols: np.ndarray) -> list[str]:
    """The replicate-aware call's var columns (NaN / False for genes not analysed)."""
    source = {"replicate_mahalanobis_key": "mahalanobis", "replicate_pvalue_key": "pvalue",
              "replicate_fdr_key": "fdr", "replicate_is_de_key": "is_de"}
    for name, key in rf.items():
        values = table[source[name]].to_numpy()
        column = np.zeros(adata.n_vars, dtype=bool) if values.dtype == bool else np.full(adata.n_vars, np.nan)
        column[cols] = values
        adata.var[key] = column
    return list(rf.values())


def _null_used(internal_on: bool, external: Any, replicate: Any, rf: dict, reason: str | None) -> dict:
    """Which null each gene call of the run used (for the run history): ``kompot_fdr`` is
    Kompot's call (``null_genes``, ``external`` or None), ``replicate_fdr`` the relabelling
    call with its settings, or ``{"null": None, "reason": ...}`` when it is off."""
    kompot = "external" if external is not None else ("null_genes" if internal_on else None)
    if replicate is None:
        return {"kompot_fdr": kompot, "replicate_fdr": {"null": None, "reason": reason or "no sample_col"}}
    attrs = replicate.attrs
    keys = ("null", "n_relabellings", "n_null", "balance", "tail", "method", "fdr_threshold", "sample_variance")
    return {"kompot_fdr": kompot, "replicate_fdr": {**{k: attrs[k] for k in keys}, "fields": rf}}


def _varm_keys(f: dict, fdr_on: bool) -> dict[str, str]:
    """varm DataFrame of each per-group quantity (SPEC §7.2)."""
    keys = {"mean_lfc": f["mean_lfc_varm_key"], "mahalanobis": f["mahalanobis_varm_key"],
            "neg_log10_ptp": f"{f['ptp_key']}_groups"}
    if fdr_on:
        keys.update(local_fdr=f"{f['mahalanobis_local_fdr_key']}_groups", is_de=f"{f['is_de_key']}_groups")
    return keys


def _store_groups(adata: Any, per_group: dict, keys: dict[str, str], cols: np.ndarray) -> list[str]:
    """genes x groups DataFrames in varm (NaN / False for genes not analysed)."""
    import pandas as pd

    for quantity, key in keys.items():
        frame = {}
        for name, values in per_group[quantity].items():
            column = np.zeros(adata.n_vars, dtype=bool) if quantity == "is_de" else np.full(adata.n_vars, np.nan)
            column[cols] = values
            frame[name] = column
        adata.varm[key] = pd.DataFrame(frame, index=adata.var_names)
    return list(keys.values())


def _cell_filter(adata: Any, spec: Any) -> np.ndarray:
    """Boolean mask over all cells (SPEC §7.4 step 5)."""
    n = adata.n_obs
    if spec is None:
        return np.ones(n, dtype=bool)
    if isinstance(spec, str):
        if spec not in adata.obs:
            raise ValueError(f"`cell_filter` names obs column {spec!r}, which does not exist")
        mask = adata.obs[spec].to_numpy()
    elif isinstance(spec, dict):
        mask = np.ones(n, dtype=bool)
        for column, allowed in spec.items():
            if column not in adata.obs:
                raise ValueError(f"`cell_filter` names obs column {column!r}, which does not exist")
            allowed = allowed if isinstance(allowed, (list, tuple, set, np.ndarray)) else [allowed]
            mask &= adata.obs[column].astype(str).isin([str(a) for a in allowed]).to_numpy()
    else:
        mask = np.asarray(spec)
        if mask.dtype != bool:
            idx, mask = mask, np.zeros(n, dtype=bool)
            mask[idx] = True
    if mask.dtype != bool or mask.shape != (n,):
        raise ValueError(f"`cell_filter` must give one boolean per cell ({n}); got dtype {mask.dtype}, shape "
                         f"{mask.shape}")
    return mask


def _filtered(inputs, keep, min_cells, condition1, condition2):
    out = []
    for c, (idx, x, y, labels, cond) in enumerate(
            ((inputs.cell_index1, inputs.x1, inputs.y1, inputs.labels1, condition1),
             (inputs.cell_index2, inputs.x2, inputs.y2, inputs.labels2, condition2)), start=1):
        rows = keep[idx]
        if rows.sum() < max(min_cells, 2):
            msg = (f"condition {cond!r} keeps {int(rows.sum())} cell(s) after the cell filter; at least "
                   f"{max(min_cells, 2)} are needed")
            raise ValueError(msg)
        if not rows.all():
            sel = np.flatnonzero(rows)
            x, y, labels = x[sel], y[sel], None if labels is None else labels[sel]
        out += [x, y, labels]
    return out


def _gene_columns(adata: Any, names: Any) -> np.ndarray:
    if names is None:
        return np.arange(adata.n_vars)
    index = {str(g): i for i, g in enumerate(adata.var_names)}
    return np.array([index[str(g)] for g in names], dtype=np.int64)


def _planned_fields(f, out, sto, fdr_on, sv):
    var = [f["mean_lfc_key"]]
    if out.compute_mahalanobis:
        var.append(f["mahalanobis_key"])
        if sto.store_additional_stats:
            var.append(f["ptp_key"])
    if fdr_on:
        var += [f["mahalanobis_local_fdr_key"], f["is_de_key"]]
        if sto.store_additional_stats:
            var += [f["mahalanobis_pvalue_key"], f["mahalanobis_tail_fdr_key"]]
    layers = [f["smoothed_key_1"], f["smoothed_key_2"], f["fold_change_key"]]
    if sto.store_additional_stats:
        layers.append(f["fold_change_zscores_key"])
    obs = []
    if sv:
        layers += [f["std_key_1"], f["std_key_2"]]
    else:
        obs = [f["std_key_1"], f["std_key_2"]]
    return var, layers, obs


def _predict(model: DifferentialExpression, x: np.ndarray, mahalanobis: bool, staging: str | None) -> dict:
    """The predictions: numpy arrays, or (with a staging store) per-gene arrays in memory
    and the cells x genes ones as dask arrays on that store."""
    if staging is None:
        return model.predict(x, compute_mahalanobis=mahalanobis)
    from ..options import get_options

    options = get_options()  # block shape: the options if set, else the memory plan
    ds = model.predict(x, compute_mahalanobis=mahalanobis, store=staging, overwrite=True,
                       cell_chunk=options["cell_chunk_size"], gene_batch=options["gene_batch_size"])
    return {name: (ds[name].values if ds[name].dims == ("gene",) else ds[name].data)
            for name in ds.data_vars if not str(name).startswith("_")}


def _store(target: Target, f, result, keep, cols, out, sto, fdr_on, sv) -> dict[str, list[str]]:
    """Write the results into the target (NaN / False for genes and cells not analysed)."""
    adata = target.adata
    var_keys, layer_keys, obs_keys = _planned_fields(f, out, sto, fdr_on, sv)
    per_gene = {
        f["mean_lfc_key"]: result["mean_log_fold_change"],
        f["mahalanobis_key"]: result.get("mahalanobis_distances"),
        f["ptp_key"]: result.get("neg_log10_ptp"),
        f["mahalanobis_local_fdr_key"]: result.get("local_fdr"),
        f["is_de_key"]: result.get("is_de"),
        f["mahalanobis_pvalue_key"]: result.get("mahalanobis_pvalue"),
        f["mahalanobis_tail_fdr_key"]: result.get("tail_fdr"),
    }
    # Kompot writes the FDR columns first, then the distance and the others (the var order).
    order = [k for k in var_keys if k in (f["mahalanobis_key"], f["ptp_key"], f["mean_lfc_key"])] + \
        [k for k in var_keys if k not in (f["mahalanobis_key"], f["ptp_key"], f["mean_lfc_key"])]
    for key in order:
        values = per_gene[key]
        column = np.zeros(adata.n_vars, dtype=bool) if key == f["is_de_key"] else np.full(adata.n_vars, np.nan)
        column[cols] = values
        adata.var[key] = column
    per_cell_gene = {
        f["smoothed_key_1"]: "condition1_imputed",
        f["smoothed_key_2"]: "condition2_imputed",
        f["fold_change_key"]: "fold_change",
        f["fold_change_zscores_key"]: "fold_change_zscores",
        f["std_key_1"]: "condition1_std",
        f["std_key_2"]: "condition2_std",
    }
    all_genes = len(cols) == adata.n_vars and np.array_equal(cols, np.arange(adata.n_vars))
    for key in layer_keys:
        name = per_cell_gene[key]
        target.put_layer(key, result[name] if target.in_memory else name, keep, cols, all_genes)
    for key in obs_keys:
        column = np.full(adata.n_obs, np.nan)
        column[keep] = np.asarray(result[per_cell_gene[key]][:, 0])
        adata.obs[key] = column
    return {"var": var_keys, "layers": layer_keys, "obs": obs_keys}


def _fdr_summary(result: dict, threshold: float) -> dict:
    is_de = np.asarray(result["is_de"], dtype=bool)
    dist = np.asarray(result["mahalanobis_distances"])
    return {"fdr_threshold": threshold, "fraction_significant": float(is_de.mean()) if is_de.size else 0.0,
            "min_significant_mahalanobis": float(dist[is_de].min()) if is_de.any() else None,
            "n_significant": int(is_de.sum()), "n_total": int(is_de.size)}


def _external_fdr(model: DifferentialExpression, result: dict, external: np.ndarray, fdrs: FDRSettings) -> None:
    """FDR of the real genes against given null distances (with the internal ones if asked)."""
    table = model.compute_fdr(null=external, threshold=fdrs.threshold,
                              combine_with_internal=fdrs.combine_with_internal)
    result.update(mahalanobis_pvalue=table["pvalue"].to_numpy(), local_fdr=table["local_fdr"].to_numpy(),
                  tail_fdr=table["tail_fdr"].to_numpy(), is_de=table["is_de"].to_numpy(dtype=bool))


def _check_covariance(target: Target, n: int) -> None:
    """The posterior covariance is n_obs x n_obs dense: in memory, and only for small atlases."""
    if not target.in_memory:
        raise ValueError("`store_posterior_covariance` writes an n_obs x n_obs matrix into obsp; it needs an "
                         "in-memory AnnData, not a path or lazy AnnData")
    if n > MAX_COVARIANCE_CELLS:
        raise ValueError(f"`store_posterior_covariance` would hold a {n} x {n} float64 matrix "
                         f"({8 * n * n / 2**30:.1f} GiB); it is allowed up to {MAX_COVARIANCE_CELLS} cells. Use "
                         "the model's covariance on a subset instead (return_full_results=True, model.function_"
                         "predictor1.covariance(x, diag=False))")


def _full_results(model, result, f, fdr_summary, inputs, fdr_on, external=None, combine=False) -> dict:
    import pandas as pd

    columns = {"mean_lfc": result["mean_log_fold_change"]}
    if fdr_on:
        columns.update(pvalue=result["mahalanobis_pvalue"], local_fdr=result["local_fdr"],
                       tail_fdr=result["tail_fdr"], is_de=result["is_de"])
    if "mahalanobis_distances" in result:
        columns.update(mahalanobis=result["mahalanobis_distances"], neg_log10_ptp=result["neg_log10_ptp"])
    index = None if inputs.gene_names is None else [str(g) for g in inputs.gene_names]
    full = {"model": model, "table": pd.DataFrame(columns, index=index), "underrepresentation": {},
            "field_names": f}
    if model.computed_landmarks is not None:
        full["landmarks"] = model.computed_landmarks
    if model.replicate_fdr_results is not None:
        full["replicate_fdr"] = model.replicate_fdr_results
    if fdr_summary is not None:
        full["fdr_summary"] = fdr_summary
    if external is not None:
        parts = [external] + ([model.null_mahalanobis_distances] if combine and model.null is not None else [])
        null = np.concatenate(parts)
        full["null"] = {"mahalanobis": null, "n_null": len(null), "source": "combined" if len(parts) > 1 else
                        "external"}
    elif model.null is not None:
        full["null"] = {"mahalanobis": model.null_mahalanobis_distances, "gene_indices": model.null.indices,
                        "n_null": len(model.null.indices), "seed": model.null_seed, "source": "internal"}
    return full


def _plan(inputs, keep, gps, n_null: int) -> dict:
    """What a run would hold (``dry_run``): sizes of the largest arrays, nothing computed."""
    from ..kernels.cell_basis import fit_flops

    n, g = int(keep.sum()), 0 if inputs.gene_names is None else len(inputs.gene_names)
    m = min(gps.n_landmarks or 5000, len(inputs.x1) + len(inputs.x2))
    # a condition fitted in the landmark form (the engine's choice: fewer operations than the
    # cells' basis, for its genes and null genes) keeps its A
    forms = [(len(x), fit_flops(m, len(x), g + n_null)) for x in (inputs.x1, inputs.x2)]
    landmark_form = [(c, m) for c, (landmark, cell) in forms if landmark <= cell]
    return {"n_cells_predicted": n, "n_genes": g, "n_landmarks": m,
            "bytes": {"layers": 4 * n * g * 8, "landmark_factors": 2 * m * m * 8,
                      "kept_projections": planned_bytes(landmark_form)}}
