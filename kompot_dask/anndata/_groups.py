"""Per-group DE results of ``de(..., groups=...)`` (SPEC §7.4 step 14), as varm DataFrames.

For each subset of the predicted cells: the mean fold change over its cells; the
Mahalanobis distance evaluated at new k-means landmarks of the subset (same count and
``random_state`` as the model's) when it has more cells than the model has landmarks, else
at its cells; with null genes the subset's own FDR (its null genes' distances); and the χ²
PTP. Each becomes a column of a genes x subsets DataFrame in ``varm``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["parse_groups", "group_results", "groups_summary"]

_MODEL_STATE = ("mahalanobis_distances", "mahalanobis_branch", "null_mahalanobis_distances", "fdr_results")


def parse_groups(adata: Any, spec: Any, keep: np.ndarray, min_cells: int = 2) -> dict[str, np.ndarray]:
    """Subsets as boolean masks over all cells, intersected with the cell filter ``keep``.

    ``spec``: an obs column (one subset per value, in category order), a dict
    ``{name: mask or cell indices}``, or one boolean mask / index array (subset "group").
    Subsets with fewer than ``min_cells`` (at least 2) cells after the filter are skipped
    with a warning.
    """
    n = adata.n_obs
    if isinstance(spec, str):
        if spec not in adata.obs:
            raise ValueError(f"`groups` names obs column {spec!r}, which does not exist; pass an obs column, "
                             "a dict {name: mask} or a boolean mask")
        column = adata.obs[spec]
        values = column.cat.categories if hasattr(column, "cat") else sorted(column.dropna().unique(), key=str)
        raw = {str(v): (column == v).to_numpy(dtype=bool, na_value=False) for v in values}
    elif isinstance(spec, dict):
        raw = {str(name): _mask(value, n, f"groups[{name!r}]") for name, value in spec.items()}
    else:
        raw = {"group": _mask(spec, n, "groups")}
    out = {}
    for name, mask in raw.items():
        mask = mask & keep
        if mask.sum() < max(min_cells, 2):
            warnings.warn(f"group {name!r} has {int(mask.sum())} cell(s) after the cell filter; skipped",
                          UserWarning, stacklevel=3)
            continue
        out[name] = mask
    return out


def _mask(value: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"`{what}` must have one boolean per cell ({n}); got shape {arr.shape}")
        return arr
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`{what}` must be a boolean mask or integer cell indices; got dtype {arr.dtype}")
    mask = np.zeros(n, dtype=bool)
    mask[arr] = True
    return mask


def group_results(model: Any, x_pred: np.ndarray, fold_change: Any, groups: dict[str, np.ndarray],
                  keep: np.ndarray, random_state: Any, with_fdr: bool, external: Any = None,
                  combine: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """``{quantity: {group: per-gene values}}`` for quantities ``mean_lfc``, ``mahalanobis``,
    ``neg_log10_ptp`` and, ``with_fdr``, ``local_fdr`` and ``is_de``.

    ``x_pred`` and ``fold_change`` (numpy or dask) hold the predicted cells (``keep``).
    With ``external`` null distances the group's FDR is against them (and, ``combine``, the
    group's null genes too).
    The model's last Mahalanobis results are restored afterwards.
    """
    from ..estimators._landmarks import kmeans_landmarks
    from ..kernels.mahalanobis import chi2_neg_log10_ptp

    position = np.cumsum(keep) - 1  # row of each kept cell among the predicted ones
    saved = {name: getattr(model, name, None) for name in _MODEL_STATE}
    landmarks = getattr(model.function_predictor1, "landmarks", None)
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in ("mean_lfc", "mahalanobis", "neg_log10_ptp")}
    if with_fdr:
        out.update(local_fdr={}, is_de={})
    import dask

    # every group's mean in one pass over the fold changes (a dask array reads each chunk once)
    means = dask.compute({name: fold_change[position[mask]].mean(axis=0) for name, mask in groups.items()})[0]
    out["mean_lfc"] = {name: np.asarray(value, dtype=np.float64) for name, value in means.items()}
    try:
        for name, mask in groups.items():
            rows = position[mask]
            x_g = x_pred[rows]
            if landmarks is not None and len(x_g) > len(landmarks):
                points = kmeans_landmarks(x_g, len(landmarks), random_state)
                dist = model.compute_mahalanobis_distances(x_g, landmarks_override=points)
            else:
                dist = model.compute_mahalanobis_distances(x_g, use_landmarks=False)
            out["mahalanobis"][name] = np.asarray(dist, dtype=np.float64)
            out["neg_log10_ptp"][name] = chi2_neg_log10_ptp(dist, x_pred.shape[1])
            if external is not None:
                model.compute_fdr(null=external, combine_with_internal=combine)
            if with_fdr:
                out["local_fdr"][name] = model.fdr_results["local_fdr"].to_numpy()
                out["is_de"][name] = model.fdr_results["is_de"].to_numpy(dtype=bool)
    finally:
        for attr, value in saved.items():
            setattr(model, attr, value)
    return out


def groups_summary(groups: dict[str, np.ndarray], inputs: Any, n_obs: int) -> dict:
    """Count, names and cells per group (and per condition) for the run history."""
    in1, in2 = np.zeros(n_obs, dtype=bool), np.zeros(n_obs, dtype=bool)
    in1[inputs.cell_index1] = True
    in2[inputs.cell_index2] = True
    return {"count": len(groups), "names": list(groups),
            "cells": {name: {"total": int(m.sum()), "condition1": int((m & in1).sum()),
                             "condition2": int((m & in2).sum())} for name, m in groups.items()}}
