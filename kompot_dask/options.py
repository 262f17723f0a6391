"""Execution options: how work is cut into pieces, never what is computed.

Math parameters are keyword arguments of the estimators and classes. The knobs here
only change chunk sizes and reporting; results do not depend on them (up to
floating-point summation order).

>>> import kompot_dask
>>> with kompot_dask.set_options(cell_chunk_size=4096):
...     pass
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

__all__ = ["set_options", "get_options", "using_options"]


def _as_positive_int(value: Any) -> int | None:
    """``value`` as a Python int if it is a positive integer (numpy integers too), else None.

    Bools and floats (even ``5.0``) are not integers here.
    """
    import operator

    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        count = operator.index(value)
    except TypeError:
        return None
    return int(count) if count > 0 else None


def _positive_int_or_none(value: Any) -> bool:
    return value is None or _as_positive_int(value) is not None


def _positive_int(value: Any) -> bool:
    return _as_positive_int(value) is not None


def _non_negative_int(value: Any) -> bool:
    import numpy as np

    return _as_positive_int(value) is not None or (
        isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value == 0)


_VALIDATORS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "cell_chunk_size": (_positive_int_or_none, "None or a positive int (cells per chunk)"),
    "chunk_memory_bytes": (_positive_int, "a positive int (bytes for one cells x landmarks block)"),
    "gene_batch_size": (_positive_int_or_none, "None or a positive int (genes per batch)"),
    "progress": (lambda v: isinstance(v, bool), "a bool"),
    "fit_on_cluster": (lambda v: isinstance(v, bool), "a bool"),
    "worker_memory_target": (_positive_int_or_none, "None or a positive int (bytes per task)"),
    "factor_rows_bytes": (_non_negative_int, "a non-negative int (bytes; 0 turns the cache off)"),
}

_OPTIONS: dict[str, Any] = {
    "cell_chunk_size": None,
    "chunk_memory_bytes": 128 * 2**20,
    "gene_batch_size": None,
    "progress": False,
    "fit_on_cluster": True,
    "worker_memory_target": None,
    "factor_rows_bytes": 2**30,
}


# Inside a task the caller's options apply: the task carries a snapshot and runs under
# `using_options` (a context variable, so concurrent tasks in one worker do not mix).
_TASK_OPTIONS: ContextVar[dict[str, Any] | None] = ContextVar("kompot_dask_task_options", default=None)


def get_options() -> dict[str, Any]:
    """Return a copy of the current execution options (a task's snapshot inside a task)."""
    snapshot = _TASK_OPTIONS.get()
    return dict(_OPTIONS if snapshot is None else snapshot)


@contextmanager
def using_options(snapshot: dict[str, Any]) -> Iterator[None]:
    """Run the body with ``snapshot`` (from :func:`get_options`) as the options, in this
    context only; how a task applies its caller's options on a worker."""
    token = _TASK_OPTIONS.set(dict(snapshot))
    try:
        yield
    finally:
        _TASK_OPTIONS.reset(token)


class set_options:
    """Set execution options globally or, as a context manager, temporarily.

    Integer options accept Python and numpy integers (stored as Python ``int``); bools,
    floats (even ``5.0``), zero and negative numbers are rejected.

    Parameters
    ----------
    cell_chunk_size : int or None
        Cells per chunk for in-memory inputs. ``None`` (default) derives it from
        ``chunk_memory_bytes`` and the number of landmarks. Inputs that carry their own
        chunks (dask arrays, zarr arrays) keep them.
    chunk_memory_bytes : int
        Target size of one ``cells x landmarks`` float64 block (default 128 MiB).
    gene_batch_size : int or None
        Genes per batch in predictions (``None``: all genes at once).
    progress : bool
        Show progress bars.
    fit_on_cluster : bool
        With an active ``distributed.Client``, evaluate the density fit's objective (and
        its other sums over cells) as one task per cell chunk on the workers (default
        True). Numbers agree either way: to 1e-8 of each array's scale in the tests,
        bit-identical when the workers' BLAS runs as many threads as this process's (dask
        gives workers one).
    worker_memory_target : int or None
        Bytes one prediction task may use; block shapes of ``predict_abundance`` and
        ``predict_expression`` are chosen to fit it when not given. ``None``: 60% of the
        smallest worker memory limit of the client, or 2 GiB without one.
    factor_rows_bytes : int
        A landmark density fit keeps its cells' factor rows ``L = K_XU Lp⁻ᵀ`` (cells x
        landmarks, float64) in memory while it fits when they take at most this many
        bytes (default 1 GiB; 0: never; on a cluster also at most half of
        ``worker_memory_target``, kept on the workers beside their chunks), so each
        objective evaluation is two matrix-vector products instead of a kernel
        evaluation over every cell. Larger fits recompute the kernel per evaluation,
        with memory bounded by ``chunk_memory_bytes``. The same bound applies to the
        projections ``Lp⁻¹ k_U(x)`` of the training cells that landmark fits running in
        this process keep for their predictors, all of them together, when no
        ``distributed.Client`` is active: the variances at those cells then read them
        instead of solving again (``da()`` and ``de()`` predict at the training cells).
        They live as long as their models; pickled models (as sent to workers) carry none.
    """

    def __init__(self, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            if key not in _VALIDATORS:
                msg = f"unknown option {key!r}; valid options are {sorted(_VALIDATORS)}"
                raise ValueError(msg)
            check, expected = _VALIDATORS[key]
            if not check(value):
                msg = f"option {key!r} must be {expected}, got {value!r}"
                raise ValueError(msg)
            if check in (_positive_int, _positive_int_or_none, _non_negative_int) and value is not None:
                kwargs[key] = _as_positive_int(value) or 0
        self._previous = {key: _OPTIONS[key] for key in kwargs}
        _OPTIONS.update(kwargs)

    def __enter__(self) -> "set_options":
        return self

    def __exit__(self, *exc: object) -> None:
        _OPTIONS.update(self._previous)
