"""Kompot 0.8.0's settings objects for :func:`da` and :func:`de`, validated on construction (SPEC §7.1).

Every field can also be passed to ``da()`` / ``de()`` as a keyword of the same name
(``result_key="..."``, ``null_genes=0``, ``copy=True``...), as long as it is not also set
through the settings object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GPSettings",
    "FDRSettings",
    "DAThresholdSettings",
    "FilterSettings",
    "StorageSettings",
    "OutputSettings",
    "settings_from",
]


def _count(value: Any, name: str, minimum: int = 0, allow_none: bool = True) -> None:
    from ..estimators._inputs import check_count

    check_count(value, name, minimum, allow_none=allow_none)


def _probability(value: Any, name: str) -> None:
    if not (isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(f"`{name}` must be a probability in (0, 1]; got {value!r}")


def _positive(value: Any, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a finite {'non-negative' if allow_zero else 'positive'} number; got {value!r}")


@dataclass
class GPSettings:
    """Gaussian-process settings (Kompot's defaults)."""

    sigma: float = 1.0
    ls: float | None = None
    ls_factor: float = 10.0
    n_landmarks: int | None = 5000
    landmarks: Any = None
    use_empirical_variance: bool = False
    batch_size: int | None = 100
    eps: float = 1e-8
    jit_compile: bool = False
    random_state: int | None = None

    def __post_init__(self) -> None:
        _positive(self.sigma, "sigma", allow_zero=True)
        if self.ls is not None:
            _positive(self.ls, "ls")
        _positive(self.ls_factor, "ls_factor")
        _count(self.n_landmarks, "n_landmarks")
        _count(self.batch_size, "batch_size", 1)
        _positive(self.eps, "eps", allow_zero=True)
        if self.landmarks is not None and np.ndim(self.landmarks) != 2:
            raise ValueError("`landmarks` must be a 2-D array (n_landmarks, n_features)")


@dataclass
class FDRSettings:
    """Null-gene FDR settings of :func:`de` (``null_genes="auto"``: 2000 without
    ``sample_col``, 0 with it)."""

    null_genes: Any = "auto"
    null_seed: int = 42
    threshold: float = 0.05
    null_mahalanobis: Any = None
    null_expression: Any = None
    combine_with_internal: bool = False

    def __post_init__(self) -> None:
        if not (self.null_genes is None or self.null_genes == "auto" or np.ndim(self.null_genes) == 1):
            _count(self.null_genes, "null_genes")
        _probability(self.threshold, "threshold")
        if self.null_mahalanobis is not None and self.null_expression is not None:
            raise ValueError("pass either `null_mahalanobis` or `null_expression`, not both")
        if self.null_expression is not None:
            msg = ("external null expression (`null_expression`) is not supported yet; pass null distances "
                   "(`null_mahalanobis`) or internal null genes (`null_genes`)")
            raise NotImplementedError(msg)
        if self.null_mahalanobis is not None:
            null = np.asarray(self.null_mahalanobis, dtype=np.float64)
            if null.ndim != 1 or null.size < 2 or not np.isfinite(null).all():
                raise ValueError(f"`null_mahalanobis` must be at least 2 finite null distances (1-D); got shape "
                                 f"{null.shape}{'' if np.isfinite(null).all() else ' with NaN/inf'}")
            self.null_mahalanobis = null


@dataclass
class DAThresholdSettings:
    """Direction-call thresholds of :func:`da`."""

    lfc_threshold: float = 1.0
    ptp_threshold: float = 0.05

    def __post_init__(self) -> None:
        _positive(self.lfc_threshold, "lfc_threshold", allow_zero=True)
        _probability(self.ptp_threshold, "ptp_threshold")


@dataclass
class FilterSettings:
    """Which cells :func:`de` uses (``cell_filter``: a boolean obs column, a mask, or a
    dict ``{column: allowed values}``)."""

    cell_filter: Any = None
    groups: Any = None
    min_cells: int = 2
    min_percentage: float | None = None
    check_representation: bool | None = None

    def __post_init__(self) -> None:
        _count(self.min_cells, "min_cells", 1, allow_none=False)
        if self.groups is not None and not isinstance(self.groups, (str, dict, list, tuple, np.ndarray)):
            raise TypeError(f"`groups` must be an obs column, a dict {{name: mask}} or a mask; got "
                            f"{type(self.groups).__name__}")


@dataclass
class StorageSettings:
    """Where results go (``result_key=None``: "kompot_da" / "kompot_de"; ``overwrite=None``
    warns, False raises, True is silent when fields of an earlier run are replaced)."""

    result_key: str | None = None
    overwrite: bool | None = None
    store_landmarks: bool = False
    store_posterior_covariance: bool = False
    store_additional_stats: bool = False
    store_arrays_on_disk: bool | None = None
    disk_storage_dir: str | None = None
    max_memory_ratio: float = 0.8

    def __post_init__(self) -> None:
        if self.result_key is not None and (not isinstance(self.result_key, str) or not self.result_key):
            raise ValueError(f"`result_key` must be a non-empty string; got {self.result_key!r}")


@dataclass
class OutputSettings:
    """What :func:`da` / :func:`de` return and print."""

    copy: bool = False
    inplace: bool = True
    return_full_results: bool = False
    return_null_data: bool = False
    compute_mahalanobis: bool = True
    allow_single_condition_variance: bool = False
    progress: bool = True


_CLASSES = {"gp": GPSettings, "fdr": FDRSettings, "threshold": DAThresholdSettings, "filter": FilterSettings,
            "storage": StorageSettings, "output": OutputSettings}


def settings_from(objects: dict[str, Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings objects (given or default) with flat keywords routed into them.

    Parameters
    ----------
    objects : dict
        ``{"gp": GPSettings or None, ...}`` as passed by the caller.
    kwargs : dict
        The call's other keywords; those naming a settings field are taken out.

    Returns
    -------
    (dict, dict)
        The settings objects, and the keywords left for the estimators.
    """
    rest = dict(kwargs)
    out = {}
    for name, value in objects.items():
        cls = _CLASSES[name]
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"`{name}` must be a {cls.__name__}; got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        flat = {k: rest.pop(k) for k in list(rest) if k in fields}
        if value is not None and flat:
            msg = (f"{sorted(flat)} given both as keywords and through `{name}=`; set them in one place")
            raise TypeError(msg)
        out[name] = value if value is not None else (cls(**flat) if flat or name != "gp" else None)
    return out, rest


def as_params(settings: Any) -> dict | None:
    """A settings object as the JSON-able dict of the run history (arrays as placeholders)."""
    if settings is None:
        return None
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name == "landmarks":
            value = None if value is None else True
        elif isinstance(value, np.ndarray):
            value = f"<array {value.shape}>"
        out[f.name] = value
    return out

