"""Sample-variance plumbing shared by DA and DE: fitting per condition, the single-condition fallback."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .sample_variance import SampleVarianceEstimator, TooFewSamplesError

__all__ = ["fit_sample_variances", "check_sample_counts", "variance_diag", "variance_factor"]


def fit_sample_variances(
    make: Callable[[], SampleVarianceEstimator],
    conditions: Sequence[tuple[np.ndarray, Any, np.ndarray | None]],
    fit_kwargs: dict,
    allow_single_condition_variance: bool,
    given: Sequence[Any] = (None, None),
) -> list[Any]:
    """One :class:`SampleVarianceEstimator` per condition that has sample labels.

    ``conditions`` holds ``(X, Y, labels)`` per condition. Injected predictors in
    ``given`` are kept. A condition with fewer than 2 usable samples raises, unless
    ``allow_single_condition_variance``: then the other condition's estimator is used
    for both (SPEC §5.2; its variance is thereby counted twice, as in the reference).
    """
    fitted = list(given)
    errors: dict[int, TooFewSamplesError] = {}
    for i, (x, y, labels) in enumerate(conditions):
        if labels is None or fitted[i] is not None:
            continue
        try:
            fitted[i] = make().fit(x, y, grouping_vector=labels, **fit_kwargs)
        except TooFewSamplesError as err:
            errors[i] = err
    if not errors:
        return fitted
    donors = [i for i in range(len(fitted)) if i not in errors and fitted[i] is not None]
    if not allow_single_condition_variance or not donors:
        raise ValueError(_too_few_message(list(errors), str(next(iter(errors.values()))),
                                          bool(donors) and not allow_single_condition_variance))
    for i in errors:
        fitted[i] = fitted[donors[0]]
    return fitted


def check_sample_counts(labels: Sequence[np.ndarray | None], allow_single_condition_variance: bool,
                        given: Sequence[Any] = (None, None), min_cells: int = 2) -> None:
    """Before any fit: the error :func:`fit_sample_variances` would raise after the fits,
    when a condition has fewer than 2 samples of ``min_cells`` cells."""
    short, usable = [], []
    for i, lab in enumerate(labels):
        if lab is None or given[i] is not None:
            usable.append(given[i] is not None)
            continue
        groups, counts = np.unique(lab, return_counts=True)
        kept = int((counts >= min_cells).sum())
        usable.append(kept >= 2)
        if kept < 2:
            short.append((i, f"sample variance needs at least 2 samples with >= {min_cells} cells each; found "
                             f"{kept} (labels present: {groups.tolist()})."))
    if not short:
        return
    donors = [i for i, ok in enumerate(usable) if ok]
    if allow_single_condition_variance and donors:
        return
    raise ValueError(_too_few_message([i for i, _ in short], short[0][1],
                                      bool(donors) and not allow_single_condition_variance))


def _too_few_message(conditions: list[int], reason: str, can_lend: bool) -> str:
    names = " and ".join(f"`condition{i + 1}_sample_indices`" for i in conditions)
    hint = ("Allow the other condition's sample variance for both (allow_single_condition_variance=True)"
            if can_lend else "Neither condition has two usable samples: give each two or more replicates, or "
                             "drop the sample labels")
    return f"{names}: {reason.rstrip('.')}. {hint}."


def variance_diag(predictor: Any, x: np.ndarray, genes: Any = None) -> np.ndarray:
    """Per-cell sample variance (n, G) from a fitted or injected variance predictor.

    Densities give one column (n, 1). ``genes`` selects a batch of columns; a fitted
    :class:`SampleVarianceEstimator` then predicts only those genes.
    """
    estimator = getattr(predictor, "__self__", predictor)
    if isinstance(estimator, SampleVarianceEstimator) and genes is not None:
        return np.sum(estimator.factor(x, genes) ** 2, axis=1)
    out = np.asarray(predictor(x, diag=True), dtype=np.float64)
    out = out[:, None] if out.ndim == 1 else out
    return out[:, genes] if genes is not None and out.shape[1] > 1 else out


def variance_factor(predictor: Any, x: np.ndarray, genes: Any = None, reduced: bool = False) -> np.ndarray | None:
    """The low-rank factor ``Q`` (p, S, G) when the predictor offers one, else None
    (``reduced``: with ``S − 1`` columns, :meth:`SampleVarianceEstimator.factor`)."""
    estimator = getattr(predictor, "__self__", predictor)
    if isinstance(estimator, SampleVarianceEstimator):
        return np.asarray(estimator.factor(x, genes, reduced=reduced))
    return None

