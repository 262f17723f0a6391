"""Argument checks shared by the differential classes; each error names the argument and the fix."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..estimators._inputs import as_cell_states

__all__ = [
    "check_conditions",
    "check_sample_labels",
    "check_sample_variance_request",
    "check_lfc_threshold",
    "check_ptp_threshold",
]


def check_conditions(x1: Any, x2: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both conditions' cell states as finite float64 arrays with the same features."""
    x1 = as_cell_states(x1, "X_condition1")
    x2 = as_cell_states(x2, "X_condition2")
    if x1.shape[1] != x2.shape[1]:
        msg = (
            f"`X_condition1` has {x1.shape[1]} features but `X_condition2` has {x2.shape[1]}; "
            "both conditions must live in the same cell-state space (the same embedding columns)"
        )
        raise ValueError(msg)
    return x1, x2


def check_sample_labels(labels: Any, n_cells: int, name: str) -> np.ndarray | None:
    """Per-cell sample labels as a 1-D array of length ``n_cells`` (None stays None)."""
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n_cells:
        msg = (
            f"`{name}` must hold one sample label per cell, shape ({n_cells},); got shape "
            f"{arr.shape}. Pass the labels of this condition's cells, in the same order"
        )
        raise ValueError(msg)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        msg = f"`{name}` contains NaN/inf labels; give every cell a sample label"
        raise ValueError(msg)
    if arr.dtype == object and any(v is None for v in arr):
        msg = f"`{name}` contains None labels; give every cell a sample label"
        raise ValueError(msg)
    return arr


def check_sample_variance_request(use_sample_variance: bool | None, available: bool) -> None:
    """``use_sample_variance=True`` needs sample labels or injected variance predictors."""
    if use_sample_variance and not available:
        msg = (
            "use_sample_variance=True needs sample labels: pass `condition1_sample_indices` / "
            "`condition2_sample_indices` to fit, or variance predictors to the constructor"
        )
        raise ValueError(msg)


def check_lfc_threshold(value: Any, name: str = "log_fold_change_threshold") -> float:
    """A finite, non-negative log fold change threshold."""
    v = float(value)
    if not np.isfinite(v) or v < 0:
        msg = f"`{name}` must be a finite number >= 0 (natural-log units); got {value!r}"
        raise ValueError(msg)
    return v


def check_ptp_threshold(value: Any, name: str = "ptp_threshold") -> float:
    """A posterior tail probability threshold in (0, 1]."""
    v = float(value)
    if not (0.0 < v <= 1.0):
        msg = f"`{name}` must be a probability in (0, 1], e.g. 0.05; got {value!r}"
        raise ValueError(msg)
    return v
