"""Argument checks shared by the differential classes; each error names the argument and the fix."""

from __future__ import annotations

import numbers
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
    """Both conditions' cell states as finite float64 arrays with the same features.

    Each condition needs at least as many cells as features; fewer is taken as a transposed
    matrix and rejected with that hint.
    """
    x1 = as_cell_states(x1, "X_condition1", check_orientation=True)
    x2 = as_cell_states(x2, "X_condition2", check_orientation=True)
    if x1.shape[1] != x2.shape[1]:
        msg = (
            f"`X_condition1` has {x1.shape[1]} features but `X_condition2` has {x2.shape[1]}; "
            "both conditions must live in the same cell-state space (the same embedding columns)"
        )
        raise ValueError(msg)
    return x1, x2


def check_sample_labels(labels: Any, n_cells: int, name: str) -> np.ndarray | None:
    """Per-cell sample labels as a 1-D array of length ``n_cells`` (None stays None).

    Parameters
    ----------
    labels : array-like (n_cells,) or None
        One sample label per cell: a list, numpy array (any dtype), pandas
        ``Categorical``, ``Series`` or extension array. A ``Series`` is taken by
        position, never aligned on its index. Labels keep their type (a Categorical of
        strings gives Python ``str`` labels); they are sorted to group cells, so they
        must be of one comparable kind. Mixing strings with numbers (e.g. ``1`` and
        ``"1"``) is an error rather than a silent conversion, which could merge two
        different samples; convert them yourself, e.g. ``labels.astype(str)``.
    n_cells : int
        Number of cells of the condition.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    numpy.ndarray or None

    Raises
    ------
    ValueError
        If the shape is wrong, a label is missing (``None``, ``NaN``, ``pd.NA``,
        ``NaT``, a Categorical's missing code) or infinite, or the labels cannot be
        ordered (mixed types).
    """
    if labels is None:
        return None
    arr = np.asarray(labels)  # positional for pandas objects; a Categorical gives its values
    if arr.ndim != 1 or arr.shape[0] != n_cells:
        msg = (
            f"`{name}` must hold one sample label per cell, shape ({n_cells},); got shape "
            f"{arr.shape}. Pass the labels of this condition's cells, in the same order"
        )
        raise ValueError(msg)
    import pandas as pd  # a dependency of xarray

    bad = np.asarray(pd.isna(arr), dtype=bool)
    if arr.dtype.kind in "fc":
        bad |= np.isinf(arr)
    if bad.any():
        cells = np.flatnonzero(bad)
        what = "missing or infinite" if arr.dtype.kind in "fc" and np.isinf(arr).any() else "missing"
        msg = (
            f"`{name}` has {len(cells)} {what} label(s) (first cells: {cells[:5].tolist()}); "
            "give every cell a sample label or drop those cells"
        )
        raise ValueError(msg)
    if arr.dtype == object:
        try:
            np.unique(arr)
        except TypeError:
            kinds = sorted({_label_kind(v) for v in arr})
            msg = (
                f"`{name}` mixes label types that cannot be ordered ({', '.join(kinds)}), e.g. 1 "
                "and '1'; give every label one type, e.g. `np.asarray(labels).astype(str)`"
            )
            raise ValueError(msg) from None
    return arr


def _label_kind(value: Any) -> str:
    """A short type name for error messages (numpy scalars named like Python's)."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    return type(value).__name__


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
