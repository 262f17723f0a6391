"""Which fields a Kompot run wrote: read the run provenance in ``adata.uns`` (SPEC §7.6).

Kompot (and :func:`kompot_dask.da` / :func:`kompot_dask.de`) record every run under a fixed
``adata.uns`` key per analysis type (``"kompot_da"``, ``"kompot_de"``) as JSON strings:
``run_history`` (a list, run id = position) and ``last_run_info`` (the latest entry). The
plot functions find their data through the field names stored there, never by guessing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

__all__ = ["RunFields", "get_run_info", "resolve_fields"]

_UNS_KEY = {"da": "kompot_da", "de": "kompot_de"}
_ENTRY_POINT = {"da": "kompot_dask.da(adata, ...)", "de": "kompot_dask.de(adata, ...)"}

# Where each resolved key lives in the AnnData.
_LOCATION = {
    "lfc_key": {"da": "obs", "de": "var"},
    "zscore_key": {"da": "obs"},
    "ptp_key": {"da": "obs", "de": "var"},
    "direction_key": {"da": "obs"},
    "density_key_1": {"da": "obs"},
    "density_key_2": {"da": "obs"},
    "mahalanobis_key": {"de": "var"},
    "pvalue_key": {"de": "var"},
    "local_fdr_key": {"de": "var"},
    "tail_fdr_key": {"de": "var"},
    "is_de_key": {"de": "var"},
    "smoothed_key_1": {"de": "layers"},
    "smoothed_key_2": {"de": "layers"},
    "fold_change_key": {"de": "layers"},
}

# What a missing field means to a user (used in error messages).
_WHAT = {
    "lfc_key": "log fold change",
    "zscore_key": "log fold change z-score",
    "ptp_key": "-log10 PTP",
    "direction_key": "direction",
    "density_key_1": "log density (condition 1)",
    "density_key_2": "log density (condition 2)",
    "mahalanobis_key": "Mahalanobis distance",
    "pvalue_key": "Mahalanobis p-value",
    "local_fdr_key": "local FDR",
    "tail_fdr_key": "tail FDR",
    "is_de_key": "is_de",
    "smoothed_key_1": "imputed expression (condition 1)",
    "smoothed_key_2": "imputed expression (condition 2)",
    "fold_change_key": "per-cell fold change",
}

_HINT = {
    "ptp_key": {"de": " (Kompot stores the gene-level PTP only with "
                      "StorageSettings(store_additional_stats=True))"},
    "is_de_key": {"de": " (the run computed no FDR: null_genes=0 or compute_mahalanobis=False)"},
    "local_fdr_key": {"de": " (the run computed no FDR: null_genes=0 or compute_mahalanobis=False)"},
    "pvalue_key": {"de": " (stored only with FDR on and store_additional_stats=True)"},
    "tail_fdr_key": {"de": " (stored only with FDR on and store_additional_stats=True)"},
    "mahalanobis_key": {"de": " (the run had compute_mahalanobis=False)"},
}


@dataclass(frozen=True)
class RunFields:
    """Field names and parameters of one stored Kompot run.

    Attributes
    ----------
    analysis_type : {"da", "de"}
        The analysis the run belongs to.
    run_id : int or None
        Absolute position of the run in ``run_history`` (``None`` when the fields were
        given explicitly and no run is stored).
    run_info : dict
        The full run-info record (empty without a stored run).
    condition1, condition2 : str or None
        The compared conditions as given to the call (not sanitised); the log fold
        change is ``condition2`` over ``condition1``.
    groupby, sample_col : str or None
        The obs column holding the conditions, and the replicate column if any.
    lfc_key : str or None
        DA: per-cell log fold change (obs). DE: per-gene mean log fold change (var).
    zscore_key, direction_key : str or None
        DA only: per-cell z-score and ``up/neutral/down`` call (obs).
    ptp_key : str or None
        ``-log10`` posterior tail probability (DA: obs, DE: var).
    density_key_1, density_key_2 : str or None
        DA only: log densities of condition 1 and 2 (obs).
    mahalanobis_key, pvalue_key, local_fdr_key, tail_fdr_key, is_de_key : str or None
        DE only: gene-level statistics (var); the FDR keys are ``None`` when the run
        computed no FDR.
    smoothed_key_1, smoothed_key_2, fold_change_key : str or None
        DE only: layers of imputed expression per condition and per-cell fold change.
    lfc_threshold, ptp_threshold : float or None
        DA thresholds of the direction call.
    fdr_threshold : float or None
        DE local-FDR threshold of ``is_de``.
    written : dict
        ``{field_name: location}`` of every field the run says it wrote
        (``field_mapping`` of the run info); empty when unknown.
    """

    analysis_type: str
    run_id: int | None = None
    run_info: dict = field(default_factory=dict, repr=False)
    condition1: str | None = None
    condition2: str | None = None
    groupby: str | None = None
    sample_col: str | None = None
    lfc_key: str | None = None
    zscore_key: str | None = None
    ptp_key: str | None = None
    direction_key: str | None = None
    density_key_1: str | None = None
    density_key_2: str | None = None
    mahalanobis_key: str | None = None
    pvalue_key: str | None = None
    local_fdr_key: str | None = None
    tail_fdr_key: str | None = None
    is_de_key: str | None = None
    smoothed_key_1: str | None = None
    smoothed_key_2: str | None = None
    fold_change_key: str | None = None
    lfc_threshold: float | None = None
    ptp_threshold: float | None = None
    fdr_threshold: float | None = None
    written: dict = field(default_factory=dict, repr=False)

    @property
    def density_keys(self) -> dict:
        """``{"condition1": ..., "condition2": ...}`` of the DA log densities."""
        return {"condition1": self.density_key_1, "condition2": self.density_key_2}

    @property
    def smoothed_layer_keys(self) -> dict:
        """``{"condition1", "condition2", "fold_change"}`` layer names of a DE run."""
        return {"condition1": self.smoothed_key_1, "condition2": self.smoothed_key_2,
                "fold_change": self.fold_change_key}

    @property
    def fdr_keys(self) -> dict | None:
        """The FDR field names of a DE run, ``None`` without FDR."""
        keys = {"pvalue_key": self.pvalue_key, "local_fdr_key": self.local_fdr_key,
                "tail_fdr_key": self.tail_fdr_key, "is_de_key": self.is_de_key}
        return keys if any(keys.values()) else None

    @property
    def comparison(self) -> str:
        """``"<condition2> vs <condition1>"``, the direction of every fold change."""
        if self.condition1 is None or self.condition2 is None:
            return ""
        return f"{self.condition2} vs {self.condition1}"

    def location(self, name: str) -> str:
        """Where the key attribute ``name`` (e.g. ``"lfc_key"``) lives: obs, var or layers."""
        try:
            return _LOCATION[name][self.analysis_type]
        except KeyError:
            raise ValueError(f"{name!r} is not a field of a {self.analysis_type.upper()} run") from None

    def require(self, adata: Any, *names: str) -> None:
        """Check that the fields ``names`` (key attributes) are present in ``adata``.

        Parameters
        ----------
        adata : anndata.AnnData
            The AnnData the run was stored in.
        *names : str
            Key attributes, e.g. ``"lfc_key", "ptp_key"``.

        Raises
        ------
        KeyError
            When the run recorded no such field, or the recorded field is missing from the
            AnnData (overwritten or deleted since the run).
        """
        run = _describe_run(self)
        for name in names:
            key = getattr(self, name)
            loc = self.location(name)
            hint = _HINT.get(name, {}).get(self.analysis_type, "")
            if key is None:
                raise KeyError(f"{run} recorded no {_WHAT[name]} field ({name}){hint}")
            if key not in _container_keys(adata, loc):
                if self.written and key not in self.written:
                    raise KeyError(
                        f"{run} did not store the {_WHAT[name]} field {key!r} in adata.{loc}{hint}"
                    )
                raise KeyError(
                    f"the {_WHAT[name]} field {key!r} recorded by {run} is missing from "
                    f"adata.{loc}: it was deleted or overwritten since the run; rerun "
                    f"{_ENTRY_POINT[self.analysis_type]} or pass the key explicitly"
                )
            _warn_if_overwritten(adata, self, loc, key)


def _describe_run(rf: RunFields) -> str:
    if rf.run_id is None:
        return f"the explicit {rf.analysis_type.upper()} keys"
    return f"{rf.analysis_type.upper()} run {rf.run_id}"


def _container_keys(adata: Any, loc: str) -> Iterable:
    if loc in ("obs", "var"):
        return getattr(adata, loc).columns
    return getattr(adata, loc).keys()


def _loads(value: Any) -> Any:
    """A provenance entry as Python data (JSON strings parsed, 0-d arrays unwrapped)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"stored run provenance is not valid JSON: {err}") from None
    return value


def _history(adata: Any, analysis_type: str) -> list[dict]:
    uns_key = _UNS_KEY[analysis_type]
    entry = adata.uns.get(uns_key) if hasattr(adata.uns, "get") else None
    if not hasattr(entry, "get"):
        return []
    history = _loads(entry.get("run_history")) if "run_history" in entry else None
    if isinstance(history, dict):
        history = [history]
    if history:
        return list(history)
    last = _loads(entry.get("last_run_info")) if "last_run_info" in entry else None
    return [last] if isinstance(last, dict) else []


def _check_type(analysis_type: str) -> str:
    kind = str(analysis_type).lower()
    if kind not in _UNS_KEY:
        raise ValueError(f"analysis_type must be 'da' or 'de', got {analysis_type!r}")
    return kind


def get_run_info(adata: Any, analysis_type: str, run_id: int | None = -1) -> tuple[int, dict]:
    """The stored run-info record of one run.

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData holding ``uns["kompot_da"]`` or ``uns["kompot_de"]``.
    analysis_type : {"da", "de"}
        Which analysis.
    run_id : int or None, default -1
        Position in ``run_history``; negative values count from the latest run
        (``-1`` and ``None`` mean the latest).

    Returns
    -------
    run_id : int
        The absolute run id.
    info : dict
        The run-info record.

    Raises
    ------
    KeyError
        When no run of that type is stored.
    IndexError
        When ``run_id`` is out of range.
    """
    kind = _check_type(analysis_type)
    history = _history(adata, kind)
    if not history:
        raise KeyError(
            f"no {kind.upper()} run found in adata.uns[{_UNS_KEY[kind]!r}]; "
            f"run {_ENTRY_POINT[kind]} first"
        )
    rid = -1 if run_id is None else int(run_id)
    n = len(history)
    if not -n <= rid < n:
        raise IndexError(
            f"run_id {run_id} out of range: adata.uns[{_UNS_KEY[kind]!r}] holds {n} "
            f"{kind.upper()} run(s), ids 0..{n - 1} (or -{n}..-1)"
        )
    rid %= n
    info = history[rid]
    if not isinstance(info, dict):
        raise ValueError(f"{kind.upper()} run {rid} is not a run-info record: {info!r}")
    stored = info.get("analysis_type")
    if stored is not None and stored != kind:
        raise ValueError(f"run {rid} under adata.uns[{_UNS_KEY[kind]!r}] is a {stored!r} run, not {kind!r}")
    return rid, info


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _from_info(kind: str, rid: int, info: dict) -> RunFields:
    params = info.get("params") or {}
    names = info.get("field_names") or {}
    common = dict(
        analysis_type=kind, run_id=rid, run_info=info,
        condition1=params.get("condition1"), condition2=params.get("condition2"),
        groupby=params.get("groupby"), sample_col=params.get("sample_col"),
        lfc_key=info.get("lfc_key") or names.get("lfc_key") or names.get("mean_lfc_key"),
        ptp_key=info.get("ptp_key") or names.get("ptp_key"),
        written={k: (v or {}).get("location") for k, v in (info.get("field_mapping") or {}).items()},
    )
    if kind == "da":
        dens = info.get("density_keys") or {}
        thr = params.get("threshold") or {}
        return RunFields(
            **common,
            zscore_key=info.get("zscore_key") or names.get("zscore_key"),
            direction_key=info.get("direction_key") or names.get("direction_key"),
            density_key_1=dens.get("condition1") or names.get("density_key_1"),
            density_key_2=dens.get("condition2") or names.get("density_key_2"),
            lfc_threshold=_float(thr.get("lfc_threshold", params.get("log_fold_change_threshold"))),
            ptp_threshold=_float(thr.get("ptp_threshold", params.get("ptp_threshold"))),
        )
    fdr = info.get("fdr_keys") or {}
    layers = info.get("smoothed_layer_keys") or {}
    fdr_params = params.get("fdr") or {}
    fdr_threshold = _float(fdr_params.get("threshold", params.get("fdr_threshold")))
    if fdr_threshold is None:
        fdr_threshold = _float((info.get("fdr_results") or {}).get("fdr_threshold"))
    return RunFields(
        **common,
        mahalanobis_key=info.get("mahalanobis_key") or names.get("mahalanobis_key"),
        pvalue_key=fdr.get("pvalue_key"),
        local_fdr_key=fdr.get("local_fdr_key"),
        tail_fdr_key=fdr.get("tail_fdr_key"),
        is_de_key=fdr.get("is_de_key"),
        smoothed_key_1=layers.get("condition1") or names.get("smoothed_key_1"),
        smoothed_key_2=layers.get("condition2") or names.get("smoothed_key_2"),
        fold_change_key=layers.get("fold_change") or names.get("fold_change_key"),
        fdr_threshold=fdr_threshold if fdr else None,
    )


def _warn_if_overwritten(adata: Any, rf: RunFields, loc: str, key: str) -> None:
    if rf.run_id is None:
        return
    entry = adata.uns.get(_UNS_KEY[rf.analysis_type])
    try:
        owners = _loads(entry.get("anndata_fields")) or {}
        owner = owners.get(loc, {}).get(key)
    except (AttributeError, ValueError):
        return
    if owner is not None and int(owner) != rf.run_id:
        warnings.warn(
            f"adata.{loc}[{key!r}] was last written by {rf.analysis_type.upper()} run {owner}, "
            f"not run {rf.run_id}: the plot shows run {owner}'s values",
            UserWarning,
            stacklevel=4,
        )


_KEY_NAMES = tuple(f.name for f in fields(RunFields) if f.name.endswith("_key") or f.name.endswith(("_1", "_2")))


def resolve_fields(
    adata: Any,
    analysis_type: str,
    run_id: int | None = -1,
    *,
    check: bool | Iterable[str] = False,
    keys: Mapping[str, str | None] | None = None,
    **explicit: str | None,
) -> RunFields:
    """Field names of a stored DA or DE run, optionally overridden by explicit keys.

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData written by ``kompot_dask.da`` / ``kompot_dask.de`` (or Kompot 0.8.0).
    analysis_type : {"da", "de"}
        Which analysis.
    run_id : int or None, default -1
        Position in ``uns["kompot_<type>"]["run_history"]``; ``-1``/``None`` = latest.
    check : bool or iterable of str, default False
        ``True``: check every field the run recorded and that was resolved; an iterable
        of key attributes (e.g. ``["lfc_key", "ptp_key"]``): check just those.
    keys : mapping, optional
        Explicit field names overriding the run's, by attribute name (``lfc_key``,
        ``ptp_key``, ``direction_key``, ``mahalanobis_key``, ``is_de_key``, ...). Also
        accepted as keyword arguments. With explicit keys no stored run is needed.
    **explicit : str
        Same as ``keys``.

    Returns
    -------
    RunFields
        The resolved names, conditions, groupby and thresholds.

    Raises
    ------
    KeyError
        No run stored (and no explicit keys), a field missing from the AnnData, or an
        unknown key name.
    IndexError
        ``run_id`` out of range.
    """
    kind = _check_type(analysis_type)
    overrides = {**(keys or {}), **explicit}
    if "density_keys" in overrides:
        dens = overrides.pop("density_keys") or {}
        overrides.setdefault("density_key_1", dens.get("condition1"))
        overrides.setdefault("density_key_2", dens.get("condition2"))
    if "smoothed_layer_keys" in overrides:
        lay = overrides.pop("smoothed_layer_keys") or {}
        overrides.setdefault("smoothed_key_1", lay.get("condition1"))
        overrides.setdefault("smoothed_key_2", lay.get("condition2"))
        overrides.setdefault("fold_change_key", lay.get("fold_change"))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    allowed = set(_KEY_NAMES) | {"condition1", "condition2", "groupby", "sample_col",
                                 "lfc_threshold", "ptp_threshold", "fdr_threshold"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise KeyError(f"unknown field name(s) {unknown}; known: {sorted(allowed)}")
    try:
        rid, info = get_run_info(adata, kind, run_id)
        rf = _from_info(kind, rid, info)
    except KeyError:
        if not overrides:
            raise
        rf = RunFields(analysis_type=kind)
    if overrides:
        rf = replace(rf, **overrides)
    if check is True:
        names = [n for n in _KEY_NAMES if kind in _LOCATION.get(n, {}) and getattr(rf, n) is not None
                 and (not rf.written or getattr(rf, n) in rf.written or n in overrides)]
        rf.require(adata, *names)
    elif check:
        rf.require(adata, *check)
    return rf
