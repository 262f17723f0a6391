"""``da(adata, ...)``: differential abundance on an AnnData, written as Kompot writes it (SPEC §7.3)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..differential import DifferentialAbundance
from ._common import landmarks_for, landmarks_info, release_kept, run_context, store_landmarks
from ._fields import DIRECTION_CATEGORIES, DIRECTION_COLORS, da_field_mapping, da_fields, spatial_fields
from ._history import check_overwrite, environment, now, record_run
from ._target import open_target
from .settings import DAThresholdSettings, GPSettings, OutputSettings, StorageSettings, as_params, settings_from

__all__ = ["da"]

KEY = "kompot_da"


def da(
    adata: Any,
    groupby: str,
    condition1: Any,
    condition2: Any,
    obsm_key: str = "DM_EigenVectors",
    sample_col: str | None = None,
    gp: GPSettings | None = None,
    threshold: DAThresholdSettings | None = None,
    storage: StorageSettings | None = None,
    output: OutputSettings | None = None,
    performance_report: str | None = None,
    results_store: str | None = None,
    spatial_fdr: float | None = None,
    **kwargs: Any,
):
    """Differential abundance between two conditions of an AnnData, stored in ``adata.obs``.

    Kompot 0.8.0's ``da()``: same arguments, defaults and field names. Settings fields may
    also be given as keywords (``result_key=...``, ``lfc_threshold=...``, ``copy=True``);
    other keywords go to :class:`~kompot_dask.DensityEstimator`.

    Parameters
    ----------
    adata : anndata.AnnData, str or path-like
        The atlas: in memory (results are assigned to it), or the path of an AnnData-zarr
        (results are written into it) or ``.h5ad`` file (results go to
        ``<stem>.kompot.zarr`` beside it), or a backed / ``read_lazy`` AnnData; only the
        cell states and obs are read.
    groupby : str
        obs column with each cell's condition.
    condition1, condition2 : object
        The conditions to compare (``condition2`` vs ``condition1``).
    obsm_key : str, default "DM_EigenVectors"
        Cell states.
    sample_col : str, optional
        obs column with each cell's sample: adds the between-replicate variance.
    gp, threshold, storage, output : settings, optional
        See :mod:`kompot_dask.anndata.settings`. QUIRK (kept): without ``gp`` each
        condition resolves its own GP (no shared landmarks, no batches); with any
        ``GPSettings`` its defaults apply (5000 shared landmarks, batches of 100).
    performance_report : str, optional
        On a dask cluster, write dask's performance report (HTML) here; its path is kept in
        the run history.
    results_store : str or path-like, optional
        Write the results into this AnnData-zarr (created with the atlas's obs and var if
        missing) instead of the default above.
    spatial_fdr : float, optional
        Also call cells at this false-discovery rate controlled over the state map
        (:meth:`~kompot_dask.DifferentialAbundance.spatial_fdr_call`, its defaults; not
        Kompot's, which thresholds each cell alone). Writes obs
        ``{rk}_{c1}_to_{c2}_spatial_fdr{sfx}`` (each cell's FDR) and
        ``..._spatial_direction{sfx}`` (categorical up/neutral/down) beside Kompot's
        direction; the run history's ``spatial_fdr`` holds the level and the p-value cut.
        With ``sample_col`` it uses the sample variance, which is what holds it with
        replicates (``benchmarks/calibration.py``). Default: off.
    **kwargs
        Settings fields, or estimator keywords.

    Returns
    -------
    None, dict, AnnData or (AnnData, dict)
        ``None`` by default; with ``return_full_results`` a dict with ``table`` (per cell:
        lfc, lfc_zscore, neg_log10_ptp, direction), ``model``, ``field_names`` and
        ``landmarks``; with ``copy`` the new AnnData (and the dict).

    Fields written (``c1``/``c2`` sanitised, ``sfx = "_sample_var"`` with ``sample_col``):
    obs ``{rk}_{c1}_to_{c2}_lfc``, ``..._lfc_zscore{sfx}``, ``..._neg_log10_lfc_ptp{sfx}``,
    ``..._lfc_direction{sfx}`` (categorical up/neutral/down), ``{rk}_{c}_log_density``; uns
    the direction colours, ``uns["kompot_da"]`` run history.
    """
    settings, extra = settings_from({"gp": gp, "threshold": threshold, "storage": storage, "output": output}, kwargs)
    gp_given = settings["gp"] is not None
    gps = settings["gp"] or GPSettings()
    thr = settings["threshold"] or DAThresholdSettings()
    sto = settings["storage"] or StorageSettings()
    out = settings["output"] or OutputSettings()
    rk = sto.result_key or KEY
    fields = da_fields(rk, condition1, condition2, sample_col is not None)
    alpha = _spatial_level(spatial_fdr)
    sf = spatial_fields(rk, condition1, condition2, sample_col is not None) if alpha is not None else {}
    obs_fields = fields["all_patterns"]["obs"] + list(sf.values())
    target = open_target(adata, out.copy, results_store)
    adata = target.adata
    from ..io.inputs import condition_inputs

    inputs = condition_inputs(adata if target.in_memory else target.source, groupby, condition1, condition2, obsm_key=obsm_key, sample_col=sample_col,
                              expression=False)
    colors_key = f"{fields['direction_key']}_colors"
    target.check_cells(inputs.obs_names)
    check_overwrite(adata, KEY, {"obs": obs_fields, "uns": [colors_key]}, sto.overwrite,
                    target.present())

    landmarks = landmarks_for(adata, gps.landmarks, rk, KEY, ("kompot_de",), inputs.x_all.shape[1])
    model = DifferentialAbundance(
        log_fold_change_threshold=thr.lfc_threshold, ptp_threshold=thr.ptp_threshold,
        n_landmarks=gps.n_landmarks if gp_given else None, jit_compile=gps.jit_compile,
        random_state=gps.random_state, batch_size=gps.batch_size if gp_given else None,
    )
    density_kwargs = dict(extra)
    if gps.ls is not None:
        density_kwargs.setdefault("ls", gps.ls)
    with run_context(out.progress, performance_report) as execution:
        model.fit(inputs.x1, inputs.x2, landmarks=landmarks, ls_factor=gps.ls_factor,
                  condition1_sample_indices=inputs.labels1, condition2_sample_indices=inputs.labels2,
                  allow_single_condition_variance=out.allow_single_condition_variance, **density_kwargs)
        info = None
        if model.landmarks is not None:
            info = landmarks_info(model.landmarks, shape_as_string=False)
            store_landmarks(adata, (rk, KEY), model.landmarks, info, sto.store_landmarks)

        result = model.predict(inputs.x_all)
        spatial = None if alpha is None else model.spatial_fdr_call(inputs.x_all, alpha, cell_result=result)
    release_kept([getattr(est, "predict", None) for est in (model.density_estimator1, model.density_estimator2)])
    import pandas as pd

    obs = adata.obs
    obs[fields["lfc_key"]] = result["log_fold_change"]
    obs[fields["zscore_key"]] = result["log_fold_change_zscore"]
    obs[fields["ptp_key"]] = result["neg_log10_fold_change_ptp"]
    obs[fields["direction_key"]] = pd.Categorical(result["log_fold_change_direction"],
                                                  categories=DIRECTION_CATEGORIES)
    obs[fields["density_key_1"]] = result["log_density_condition1"]
    obs[fields["density_key_2"]] = result["log_density_condition2"]
    if spatial is not None:
        obs[sf["spatial_fdr_key"]] = spatial["log_fold_change_spatial_fdr"]
        obs[sf["spatial_direction_key"]] = pd.Categorical(spatial["log_fold_change_spatial_direction"],
                                                          categories=DIRECTION_CATEGORIES)
    adata.uns[colors_key] = list(DIRECTION_COLORS)

    run_info = {
        "analysis_type": "da",
        "density_keys": {"condition1": fields["density_key_1"], "condition2": fields["density_key_2"]},
        "direction_key": fields["direction_key"],
        "environment": environment(),
        "field_mapping": da_field_mapping(fields, condition1, condition2),
        "field_names": fields,
        "function": "compute_differential_abundance",
        "execution": execution,
        "has_groups": False,
        "lfc_key": fields["lfc_key"],
        "params": {
            "condition1": condition1, "condition2": condition2, "groupby": groupby, "obsm_key": obsm_key,
            "sample_col": sample_col, "gp": as_params(gps), "threshold": as_params(thr),
            # QUIRK (kept): Kompot's DA history records return_full_results as False.
            "storage": {**as_params(sto), "result_key": rk}, "output": {**as_params(out), "return_full_results": False},
            **({"extra_kwargs": extra} if extra else {}),
        },
        "ptp_key": fields["ptp_key"],
        "result_key": rk,
        **({} if spatial is None else {"spatial_fdr": {
            "alpha": alpha, "pvalue_threshold": float(spatial["spatial_fdr_threshold"]),
            "n_points": int(len(spatial["spatial_fdr_points"])), "weights": "uniform",
            "sample_variance": model.variance_predictors != (None, None), "fields": sf}}),
        "timestamp": now(),
        "uses_sample_variance": model.variance_predictors != (None, None),
        "zscore_key": fields["zscore_key"],
    }
    record_run(adata, KEY, run_info, {"obs": obs_fields, "uns": [KEY, colors_key]})
    target.commit(None, {"obs": obs_fields}, [colors_key, rk, KEY])

    full = None
    if out.return_full_results:
        table = pd.DataFrame({
            "lfc": result["log_fold_change"], "lfc_zscore": result["log_fold_change_zscore"],
            "neg_log10_ptp": result["neg_log10_fold_change_ptp"],
            "direction": result["log_fold_change_direction"],
        }, index=np.asarray(adata.obs_names))
        full = {"table": table, "model": model, "field_names": fields}
        if model.landmarks is not None:
            full["landmarks"] = model.landmarks
    if out.copy:
        return (adata, full) if full is not None else adata
    return full


def _spatial_level(value: Any) -> float | None:
    """``spatial_fdr``: None (off) or a level strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"`spatial_fdr={value!r}`: the FDR level of the spatial cell call must be a number strictly "
                         "between 0 and 1 (e.g. 0.05); leave it out (None) for no spatial call")
    return float(value)
