"""Kompot 0.8.0's field names (SPEC §7.2) and their descriptions in the run history."""

from __future__ import annotations

from typing import Any

__all__ = ["sanitize", "da_fields", "de_fields", "replicate_fields", "DIRECTION_COLORS"]

DIRECTION_COLORS = ["#d73027", "#d3d3d3", "#4575b4"]  # up, neutral, down
DIRECTION_CATEGORIES = ["up", "neutral", "down"]


def sanitize(name: Any) -> str:
    """A condition name as it appears in field names (space, ``-``, ``.``, ``/`` → ``_``)."""
    out = str(name)
    for ch in (" ", "-", ".", "/"):
        out = out.replace(ch, "_")
    return out


def da_fields(rk: str, condition1: Any, condition2: Any, sample_var: bool) -> dict[str, Any]:
    """The ``field_names`` dict of a DA run (the keys every consumer reads)."""
    c1, c2 = sanitize(condition1), sanitize(condition2)
    sfx = "_sample_var" if sample_var else ""
    base = f"{rk}_{c1}_to_{c2}"
    names = {
        "lfc_key": f"{base}_lfc",
        "zscore_key": f"{base}_lfc_zscore{sfx}",
        "ptp_key": f"{base}_neg_log10_lfc_ptp{sfx}",
        "direction_key": f"{base}_lfc_direction{sfx}",
        "density_key_1": f"{rk}_{c1}_log_density",
        "density_key_2": f"{rk}_{c2}_log_density",
    }
    obs = [names[k] for k in ("lfc_key", "zscore_key", "ptp_key", "direction_key", "density_key_1", "density_key_2")]
    return {**names, "all_patterns": {"obs": obs},
            "sample_variance_impacted_fields": ["zscore_key", "ptp_key", "direction_key"]}


def da_field_mapping(f: dict, condition1: Any, condition2: Any) -> dict[str, dict]:
    """``field_mapping`` of a DA run: location, type and description of every field."""
    return {
        f["lfc_key"]: _entry("obs", "log_fold_change", "Log fold change values"),
        f["zscore_key"]: _entry("obs", "log_fold_change_zscore", "Z-scores for fold changes"),
        f["ptp_key"]: _entry("obs", "ptp", "Negative log10 PTPs (Posterior Tail Probabilities)"),
        f["direction_key"]: _entry("obs", "direction", "Direction classification (up/down/neutral)"),
        f["density_key_1"]: _entry("obs", "density", f"Log density for {condition1}"),
        f["density_key_2"]: _entry("obs", "density", f"Log density for {condition2}"),
        f"{f['direction_key']}_colors": _entry("uns", "colors", "Color mapping for direction categories"),
    }


def spatial_fields(rk: str, condition1: Any, condition2: Any, sample_var: bool) -> dict[str, str]:
    """obs columns of the spatial-FDR cell call (``da(..., spatial_fdr=alpha)``; not
    Kompot's): each cell's FDR over the state map and its call (up / neutral / down)."""
    base = f"{rk}_{sanitize(condition1)}_to_{sanitize(condition2)}_spatial"
    sfx = "_sample_var" if sample_var else ""
    return {"spatial_fdr_key": f"{base}_fdr{sfx}", "spatial_direction_key": f"{base}_direction{sfx}"}


def replicate_fields(rk: str, condition1: Any, condition2: Any, sample_var: bool) -> dict[str, str]:
    """var columns of the replicate-aware gene call (``de(..., replicate_null=True)``; not
    Kompot's): the distance it tests, its p-value, BH-adjusted FDR and call."""
    base = f"{rk}_{sanitize(condition1)}_to_{sanitize(condition2)}_replicate"
    sfx = "_sample_var" if sample_var else ""
    return {"replicate_mahalanobis_key": f"{base}_mahalanobis{sfx}", "replicate_pvalue_key": f"{base}_pvalue{sfx}",
            "replicate_fdr_key": f"{base}_fdr{sfx}", "replicate_is_de_key": f"{base}_is_de{sfx}"}


def de_fields(rk: str, condition1: Any, condition2: Any, sample_var: bool) -> dict[str, Any]:
    """The ``field_names`` dict of a DE run."""
    c1, c2 = sanitize(condition1), sanitize(condition2)
    sfx = "_sample_var" if sample_var else ""
    base = f"{rk}_{c1}_to_{c2}"
    n = {
        "mean_lfc_key": f"{base}_mean_lfc",
        "mahalanobis_key": f"{base}_mahalanobis{sfx}",
        "ptp_key": f"{base}_neg_log10_ptp{sfx}",
        "mahalanobis_pvalue_key": f"{base}_mahalanobis_pvalue{sfx}",
        "mahalanobis_local_fdr_key": f"{base}_mahalanobis_local_fdr{sfx}",
        "mahalanobis_tail_fdr_key": f"{base}_mahalanobis_tail_fdr{sfx}",
        "is_de_key": f"{base}_is_de{sfx}",
        "smoothed_key_1": f"{rk}_{c1}_smoothed",
        "smoothed_key_2": f"{rk}_{c2}_smoothed",
        "fold_change_key": f"{base}_fold_change",
        "fold_change_zscores_key": f"{base}_fold_change_zscores{sfx}",
        "std_key_1": f"{rk}_{c1}_std",
        "std_key_2": f"{rk}_{c2}_std",
        "posterior_covariance_key": f"{base}_posterior_covariance",
        "mean_lfc_varm_key": f"{base}_mean_lfc_groups",
        "mahalanobis_varm_key": f"{base}_mahalanobis{sfx}_groups",
        "has_groups": False,
    }
    std_loc = "layers" if sample_var else "obs"
    patterns = {
        "layers": [n["smoothed_key_1"], n["smoothed_key_2"], n["fold_change_key"], n["fold_change_zscores_key"]]
        + ([n["std_key_1"], n["std_key_2"]] if sample_var else []),
        std_loc: [n["std_key_1"], n["std_key_2"]] if not sample_var else None,
        "obsp": [n["posterior_covariance_key"]],
        "var": [n["mahalanobis_key"], n["ptp_key"], n["mean_lfc_key"], n["mahalanobis_local_fdr_key"], n["is_de_key"],
                n["mahalanobis_pvalue_key"], n["mahalanobis_tail_fdr_key"]],
    }
    n["all_patterns"] = {k: v for k, v in patterns.items() if v is not None}
    n["sample_variance_impacted_fields"] = ["mahalanobis_key", "ptp_key", "lfc_std_key", "mahalanobis_varm_key",
                                            "std_key_1", "std_key_2", "fold_change_zscores_key"]
    return n


def de_field_mapping(f: dict, condition1: Any, condition2: Any, written: set[str], sample_var: bool,
                     fdr_threshold: float) -> dict[str, dict]:
    """``field_mapping`` of a DE run (only the fields it wrote)."""
    if sample_var:
        std = ("layers", "std_with_sample_var", "Posterior standard deviation of smoothed expression for {} "
               "(with sample variance)")
    else:
        std = ("obs", "std", "Posterior standard deviation of smoothed expression for {} (same for all genes)")
    z_text = "Z-scores of log fold changes accounting for uncertainty" + (" and sample variance" if sample_var else "")
    table = {
        f["smoothed_key_1"]: _entry("layers", "smoothed", f"Imputed expression for {condition1}"),
        f["smoothed_key_2"]: _entry("layers", "smoothed", f"Imputed expression for {condition2}"),
        f["std_key_1"]: _entry(std[0], std[1], std[2].format(condition1)),
        f["std_key_2"]: _entry(std[0], std[1], std[2].format(condition2)),
        f["fold_change_key"]: _entry("layers", "fold_change", "Log fold change for each cell and gene"),
        f["fold_change_zscores_key"]: _entry("layers", "fold_change_zscores", z_text),
        f["is_de_key"]: _entry("var", "is_de", f"Boolean indicator of differential expression at local FDR < "
                                               f"{fdr_threshold}"),
        f["mahalanobis_key"]: _entry("var", "mahalanobis", "Mahalanobis distances"),
        f["mahalanobis_local_fdr_key"]: _entry("var", "mahalanobis_local_fdr",
                                               "Local FDR values using empirical null estimation similar to R's "
                                               "fdrtool"),
        f["mahalanobis_pvalue_key"]: _entry("var", "mahalanobis_pvalue", "P-values from empirical null distribution"),
        f["mahalanobis_tail_fdr_key"]: _entry("var", "mahalanobis_tail_fdr",
                                              "Tail-based FDR values using Benjamini-Hochberg correction"),
        f["mean_lfc_key"]: _entry("var", "mean_log_fold_change", "Mean log fold change values"),
        f["ptp_key"]: _entry("var", "ptp", "Negative log10 posterior tail probability (-log10 PTP) from the "
                                           "chi-squared distribution, computed in log space"),
    }
    return {k: v for k, v in table.items() if k in written}


def _entry(location: str, kind: str, description: str) -> dict[str, str]:
    return {"description": description, "location": location, "type": kind}
