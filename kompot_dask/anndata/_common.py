"""What :func:`da` and :func:`de` share: the AnnData to write to and the landmarks to reuse."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from ._history import now

__all__ = ["prepare_adata", "landmarks_for", "landmarks_info", "store_landmarks", "run_context"]


def prepare_adata(adata: Any, copy: bool) -> Any:
    """The AnnData results go to: ``adata`` itself, or a copy."""
    try:
        import anndata
    except ImportError as err:  # pragma: no cover - anndata is an optional dependency
        raise ImportError("da()/de() need anndata: pip install 'kompot-dask[anndata]'") from err
    if not isinstance(adata, anndata.AnnData):
        msg = (f"`adata` must be an anndata.AnnData; got {type(adata).__name__}. Read a file with "
               "anndata.read_h5ad(path) or anndata.read_zarr(path) first")
        raise TypeError(msg)
    return adata.copy() if copy else adata


def landmarks_for(adata: Any, explicit: Any, result_key: str, own_key: str, others: Sequence[str],
                  n_features: int) -> np.ndarray | None:
    """Landmarks to reuse (SPEC §7.3 step 5, §7.4 step 7): given ones, else those stored
    under ``uns[result_key]``, ``uns[own_key]``, the other analyses' keys, in that order;
    only with ``n_features`` columns."""
    if explicit is not None:
        arr = np.asarray(explicit, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != n_features:
            msg = (f"`landmarks` must have shape (n_landmarks, {n_features}) to match the cell states; "
                   f"got {arr.shape}")
            raise ValueError(msg)
        return arr
    keys = [result_key, own_key] + [k for k in adata.uns if str(k).startswith("kompot_") and k not in others] \
        + list(others)
    seen = set()
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        entry = adata.uns.get(key)
        stored = entry.get("landmarks") if hasattr(entry, "get") else None
        if stored is not None and np.ndim(stored) == 2 and np.shape(stored)[1] == n_features:
            return np.asarray(stored, dtype=np.float64)
    return None


def landmarks_info(landmarks: np.ndarray, shape_as_string: bool) -> dict[str, Any]:
    """``landmarks_info`` as Kompot records it (DE stores the shape as a string)."""
    shape = str(tuple(landmarks.shape)) if shape_as_string else np.asarray(landmarks.shape, dtype=np.int64)
    return {"shape": shape, "dtype": str(landmarks.dtype), "source": "computed",
            "n_landmarks": int(landmarks.shape[0]), "timestamp": now()}


def store_landmarks(adata: Any, keys: Sequence[str], landmarks: np.ndarray, info: dict, keep_array: bool) -> None:
    """Write ``landmarks_info`` under every key (and the array under the first if asked)."""
    for key in dict.fromkeys(keys):
        adata.uns.setdefault(key, {})["landmarks_info"] = dict(info)
    if keep_array:
        adata.uns[keys[0]]["landmarks"] = np.asarray(landmarks)


def release_kept(predictors: Sequence[Any]) -> None:
    """Let the predictors of a run's own fits drop the training cells' projections they kept
    for the run's variances (:mod:`kompot_dask.estimators._kept_projections`): the run is
    done with them, and a model handed back with ``return_full_results`` should not hold up
    to ``factor_rows_bytes`` for the rest of the session (its later variances solve)."""
    for predictor in predictors:
        if getattr(predictor, "kept", None) is not None:
            predictor.kept = None


@contextlib.contextmanager
def run_context(progress: bool, performance_report: str | None = None) -> Iterator[dict]:
    """Progress bars (``progress``), and on an active cluster: the dashboard link on stderr,
    worker log records forwarded here, and a dask performance report if a path is given.

    Yields a dict for the run history (``dashboard``, ``performance_report``).
    """
    from ..execution.cluster import active_client
    from ..options import set_options

    client = active_client()
    record: dict[str, Any] = {"dashboard": None, "performance_report": None}
    with contextlib.ExitStack() as stack:
        if client is not None:
            record["dashboard"] = getattr(client, "dashboard_link", None)
            if progress and record["dashboard"]:
                print(f"kompot_dask: running on {client.scheduler.address}; dashboard: {record['dashboard']}",
                      file=sys.stderr)
            client.forward_logging("kompot_dask", level=logging.INFO)
            if performance_report:
                from distributed import performance_report as report

                stack.enter_context(report(filename=str(performance_report)))
                record["performance_report"] = str(performance_report)
        elif performance_report:
            msg = "`performance_report` needs a dask cluster (a distributed.Client); none is active"
            raise ValueError(msg)
        stack.enter_context(set_options(progress=bool(progress)))
        yield record
