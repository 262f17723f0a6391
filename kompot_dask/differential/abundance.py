"""Differential abundance between two conditions (SPEC §5)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._jax import with_x64
from ..estimators import DensityEstimator
from ..estimators._inputs import as_cell_states, check_count, check_landmarks
from ..estimators._landmarks import compute_landmarks
from ..estimators._neighbors import nn_distances
from ..kernels import density_params as dp
from ..execution.runner import resolve_client
from ..io.results import fingerprint
from ..kernels import neighbors as nb
from ._checks import (
    check_conditions,
    check_lfc_threshold,
    check_ptp_threshold,
    check_sample_labels,
    check_sample_variance_request,
)
from . import pipeline
from ._blocks import ABUNDANCE_KEYS
from ._runs import check_run_arguments, finish_run, memory_blocks, model_token, open_sink, planned_blocks
from ._variance import check_sample_counts, fit_sample_variances
from .sample_variance import SampleVarianceEstimator

__all__ = ["DifferentialAbundance"]


class DifferentialAbundance:
    """Differential abundance: log fold change of GP cell densities between two conditions.

    Parameters
    ----------
    log_fold_change_threshold : float, default 1.0
        ``|lfc|`` above which a cell can be called up/down (natural log).
    ptp_threshold : float, default 0.05
        Posterior tail probability below which a cell can be called up/down.
    n_landmarks : int, optional
        Compute this many k-means landmarks on both conditions together and share them.
        ``None``: each condition resolves its own GP type (SPEC §1.7).
    use_sample_variance : bool, optional
        ``None``: on when sample indices are passed to :meth:`fit` or variance predictors
        are given.
    eps : float, default 1e-12
        Added under the square root of the z-score.
    jit_compile : bool, default False
        Accepted for API compatibility (kernels are always compiled).
    density_predictor1, density_predictor2 : callable, optional
        Pre-fitted density predictors (skip fitting that condition); called as
        ``p(x, normalize=True)`` with a ``p.uncertainty(x, diag=True)`` method.
    variance_predictor1, variance_predictor2 : SampleVarianceEstimator or callable, optional
        Pre-fitted sample-variance predictors, called as ``v(x, diag=True)``.
    random_state : int, optional
        Seed of the shared k-means landmarks (``None``: not reproducible, as Kompot).
    batch_size : int, optional
        Fewest cells per in-memory prediction block (``None``: chosen from the memory
        options); blocks take more cells up to the ``chunk_memory_bytes`` option.

    Attributes
    ----------
    log_density_condition1, log_density_condition2, log_fold_change,
    log_fold_change_uncertainty, log_fold_change_zscore, log_fold_change_ptp,
    neg_log10_fold_change_ptp, log_fold_change_direction : numpy.ndarray
        Results of the last :meth:`predict` (``log_fold_change_ptp`` is the PTP itself).
    density_estimator1, density_estimator2 : DensityEstimator or None
        The fitted estimators (None when a predictor was injected).
    landmarks : numpy.ndarray or None
        Landmarks shared by both conditions, if any.
    """

    def __init__(
        self,
        log_fold_change_threshold: float = 1.0,
        ptp_threshold: float = 0.05,
        n_landmarks: int | None = None,
        use_sample_variance: bool | None = None,
        eps: float = 1e-12,
        jit_compile: bool = False,
        density_predictor1: Any | None = None,
        density_predictor2: Any | None = None,
        variance_predictor1: Any | None = None,
        variance_predictor2: Any | None = None,
        random_state: int | None = None,
        batch_size: int | None = None,
    ):
        self.log_fold_change_threshold = check_lfc_threshold(log_fold_change_threshold)
        self.ptp_threshold = check_ptp_threshold(ptp_threshold)
        n_landmarks = check_count(n_landmarks, "n_landmarks", 0, allow_none=True)
        batch_size = check_count(batch_size, "batch_size", 1, allow_none=True)
        self.n_landmarks = n_landmarks
        self.use_sample_variance = use_sample_variance
        self.eps = float(eps)
        self.jit_compile = jit_compile
        self.density_predictor1 = density_predictor1
        self.density_predictor2 = density_predictor2
        self.variance_predictor1 = variance_predictor1
        self.variance_predictor2 = variance_predictor2
        self.random_state = random_state
        self.batch_size = batch_size
        self.density_estimator1 = self.density_estimator2 = None
        self.landmarks = None
        self.spatial_fdr_result: dict | None = None
        self.synced_parameters: dict[str, float] | None = None
        self.synced_nn_distances: np.ndarray | None = None
        self.n_features: int | None = None

    @with_x64
    def fit(
        self,
        X_condition1: Any,
        X_condition2: Any,
        landmarks: Any = None,
        ls_factor: float = 10.0,
        condition1_sample_indices: Any = None,
        condition2_sample_indices: Any = None,
        sample_estimator_ls: float | None = None,
        sync_parameters: bool = False,
        allow_single_condition_variance: bool = False,
        **density_kwargs: Any,
    ) -> "DifferentialAbundance":
        """Fit one density per condition (and per sample, with sample variance).

        Parameters
        ----------
        X_condition1, X_condition2 : array (n_cells, n_features)
            Cell states of each condition.
        landmarks : array (M, n_features), optional
            Landmarks for both conditions (``gp_type="fixed"``); overrides ``n_landmarks``.
        ls_factor : float, default 10.0
            Multiplier of each estimated length scale (unless ``ls`` is given).
        condition1_sample_indices, condition2_sample_indices : array (n_cells,), optional
            Sample label of each cell; switch sample variance on.
        sample_estimator_ls : float, optional
            Length scale of the per-sample estimators.
        sync_parameters : bool, default False
            Estimate ``d``, ``mu`` and ``ls`` once on both conditions together (SPEC §5.3).
        allow_single_condition_variance : bool, default False
            If only one condition has at least 2 usable samples, use its sample variance
            for both conditions instead of raising.
        **density_kwargs
            Passed to :class:`~kompot_dask.DensityEstimator`.

        Returns
        -------
        self
        """
        x1, x2 = check_conditions(X_condition1, X_condition2)
        self.n_features = x1.shape[1]
        labels1 = check_sample_labels(condition1_sample_indices, len(x1), "condition1_sample_indices")
        labels2 = check_sample_labels(condition2_sample_indices, len(x2), "condition2_sample_indices")
        has_labels = labels1 is not None or labels2 is not None
        given_variance = self.variance_predictor1 is not None or self.variance_predictor2 is not None
        check_sample_variance_request(self.use_sample_variance, has_labels or given_variance)
        if has_labels and self.use_sample_variance is not False:  # fail before the fits, not after
            check_sample_counts([labels1, labels2], allow_single_condition_variance,
                                (self.variance_predictor1, self.variance_predictor2))
        kwargs = self._estimator_kwargs(x1, x2, landmarks, ls_factor, density_kwargs)
        if sync_parameters:
            self.synced_parameters, self.synced_nn_distances = _synced_parameters(np.vstack([x1, x2]), kwargs)
            kwargs.update(self.synced_parameters)
        if self.density_predictor1 is None:
            self.density_estimator1 = DensityEstimator(**kwargs).fit(x1)
            self.density_predictor1 = self.density_estimator1.predict
        if self.density_predictor2 is None:
            self.density_estimator2 = DensityEstimator(**kwargs).fit(x2)
            self.density_predictor2 = self.density_estimator2.predict
        if has_labels and self.use_sample_variance is not False:
            sample_kwargs = dict(kwargs)
            if sample_estimator_ls is not None:
                sample_kwargs["ls"] = sample_estimator_ls
            self.variance_predictor1, self.variance_predictor2 = fit_sample_variances(
                lambda: SampleVarianceEstimator(eps=self.eps, estimator_type="density"),
                [(x1, None, labels1), (x2, None, labels2)],
                dict(ls_factor=ls_factor, estimator_kwargs=sample_kwargs),
                allow_single_condition_variance,
                given=(self.variance_predictor1, self.variance_predictor2),
            )
        return self

    def fit_from(
        self,
        source: Any,
        groupby: str,
        condition1: Any,
        condition2: Any,
        *,
        obsm_key: str = "DM_EigenVectors",
        sample_col: str | None = None,
        **fit_kwargs: Any,
    ) -> "DifferentialAbundance":
        """:meth:`fit` on two conditions of an AnnData (in memory, backed, lazy or a path) or a
        kompot_dask dataset.

        Parameters
        ----------
        source : anndata.AnnData, str, path-like or xarray.Dataset
            See :func:`kompot_dask.io.condition_inputs`.
        groupby : str
            obs column (dataset variable) with each cell's condition.
        condition1, condition2 : object
            The two conditions (compared as strings).
        obsm_key : str, default "DM_EigenVectors"
            Cell states (a dataset's ``cell_states`` by default).
        sample_col : str, optional
            Sample of each cell: switches sample variance on.
        **fit_kwargs
            Passed to :meth:`fit`.

        Returns
        -------
        self
            With ``condition_inputs`` (the selected cells; ``x_all`` for :meth:`predict`).
        """
        from ..io.inputs import condition_inputs

        inputs = condition_inputs(source, groupby, condition1, condition2, obsm_key=obsm_key,
                                  sample_col=sample_col, expression=False)
        self.condition_inputs = inputs
        return self.fit(inputs.x1, inputs.x2, condition1_sample_indices=inputs.labels1,
                        condition2_sample_indices=inputs.labels2, **fit_kwargs)

    def _estimator_kwargs(self, x1, x2, landmarks, ls_factor, density_kwargs) -> dict:
        kwargs: dict[str, Any] = {"d_method": "fractal", "predictor_with_uncertainty": True}
        if "ls" not in density_kwargs:
            kwargs["ls_factor"] = ls_factor
        kwargs.update(density_kwargs)
        if landmarks is not None:
            self.landmarks = check_landmarks(landmarks, x1.shape[1])
        elif self.n_landmarks is not None and int(self.n_landmarks) > 0:
            self.landmarks = compute_landmarks(np.vstack([x1, x2]), "fixed", int(self.n_landmarks), self.random_state)
        if self.landmarks is not None:
            kwargs.update(landmarks=self.landmarks, gp_type="fixed")
        return kwargs

    @property
    def _sample_variance_on(self) -> bool:
        if self.use_sample_variance is False:
            return False
        return self.variance_predictor1 is not None or self.variance_predictor2 is not None

    @with_x64
    def predict(
        self,
        X_new: Any,
        log_fold_change_threshold: float | None = None,
        ptp_threshold: float | None = None,
        progress: bool = True,
        *,
        store: Any = None,
        client: Any = None,
        cell_chunk: int | None = None,
        dtype: str = "float64",
        overwrite: bool = False,
        compute: bool = True,
        spatial_fdr: float | None = None,
    ) -> Any:
        """Log densities, log fold change and its significance at ``X_new`` (SPEC §5.4).

        Parameters
        ----------
        X_new : array (n_cells, n_features)
        log_fold_change_threshold, ptp_threshold : float, optional
            Override the constructor's thresholds for the direction calls.
        progress : bool
            Accepted for API compatibility (see :func:`kompot_dask.set_options`).
        store : str or path-like, optional
            Stream the results into this zarr store instead of memory, one task per cell
            chunk on the active (or given) dask cluster. A rerun with the same inputs
            resumes it (and repairs damaged blocks); a store of other inputs is replaced
            only with ``overwrite=True``, and only once the new run is complete.
        client : distributed.Client or str, optional
            Client or scheduler address of a store-backed run (default: the active
            client, else this process).
        cell_chunk : int, optional
            Cells per task (default in memory: at least ``batch_size``, more up to the
            ``chunk_memory_bytes`` option; with a store, planned from the
            ``worker_memory_target`` option or the workers' memory limit).
        dtype : {"float64", "float32"}
            Type of the results.
        overwrite : bool, default False
            Replace a store holding results of other inputs.
        compute : bool, default True
            With a store: ``False`` lays out the store and returns the graph (a
            ``dask.delayed.Delayed``) without computing anything.
        spatial_fdr : float, optional
            Also call cells with a spatially controlled FDR at this level
            (:meth:`spatial_fdr_call` with its defaults; in memory only). Kompot's
            direction is unchanged.

        Returns
        -------
        dict or xarray.Dataset or dask.delayed.Delayed
            In memory: ``log_density_condition1``, ``log_density_condition2``,
            ``log_fold_change``, ``log_fold_change_uncertainty`` (a variance),
            ``log_fold_change_zscore``, ``neg_log10_fold_change_ptp`` and
            ``log_fold_change_direction``; with ``spatial_fdr`` also
            ``log_fold_change_pvalue``, ``log_fold_change_spatial_fdr`` and
            ``log_fold_change_spatial_direction``. With a store: the store opened lazily
            (the same variables, dimension ``cell``), or the graph if ``compute=False``.
        """
        if self.density_predictor1 is None or self.density_predictor2 is None:
            raise ValueError("DifferentialAbundance is not fitted; call `fit` first")
        lfc_thr = check_lfc_threshold(
            self.log_fold_change_threshold if log_fold_change_threshold is None else log_fold_change_threshold
        )
        ptp_thr = check_ptp_threshold(self.ptp_threshold if ptp_threshold is None else ptp_threshold)
        x = as_cell_states(X_new, "X_new", min_cells=1)
        if self.n_features is not None and x.shape[1] != self.n_features:
            raise ValueError(f"`X_new` has {x.shape[1]} features but the model was fitted on {self.n_features}")
        args = check_run_arguments(store, dtype, overwrite, compute, client, cell_chunk=cell_chunk)
        if spatial_fdr is not None:
            spatial_fdr = check_ptp_threshold(spatial_fdr, "spatial_fdr")
            if store is not None:
                raise ValueError("`spatial_fdr` is computed in memory only; call `spatial_fdr_call` on the cells")
        model = pipeline.AbundanceModel(self.density_predictor1, self.density_predictor2, *self.variance_predictors,
                                        self.eps)
        token, client = None, None if store is None else resolve_client(client)
        if store is None:
            cells = memory_blocks(len(x), self.batch_size, args["cell_chunk"], model[:2], model[2:4])
        else:
            cells, _ = planned_blocks(len(x), 1, model, model[:2], model[2:4], client, args["cell_chunk"], 1)
            token = fingerprint(x, cells[0].stop, args["dtype"], lfc_thr, ptp_thr, self.eps, model_token(*model[:4]))
        sink = open_sink(store, token, {"kind": "abundance", "n_cells": len(x)}, overwrite)
        build = pipeline.abundance_graph(model, x, sink, cells, (lfc_thr, ptp_thr), args["dtype"],
                                         pipeline.run_tag(token, sink), client)
        out = pipeline.run(build, client, compute)
        if store is not None:
            return finish_run(out, sink, compute)
        result = {key: sink.read(key) for key in ABUNDANCE_KEYS}
        result["log_fold_change_direction"] = sink.read(pipeline.DIRECTION).astype(str).astype(object)
        for key, value in result.items():
            setattr(self, key, value)
        self.log_fold_change_ptp = 10.0 ** (-result["neg_log10_fold_change_ptp"])
        if spatial_fdr is not None:
            call = self.spatial_fdr_call(x, alpha=spatial_fdr, cell_result=result)
            result.update({key: call[key] for key in ("log_fold_change_pvalue", "log_fold_change_spatial_fdr",
                                                      "log_fold_change_spatial_direction")})
        return result

    @with_x64
    def spatial_fdr_call(
        self,
        X_new: Any,
        alpha: float = 0.05,
        points: Any = None,
        weights: Any = "uniform",
        df: float | None = None,
        cell_result: dict | None = None,
    ) -> dict:
        """Per-cell DA calls whose false-discovery rate is controlled over the state map.

        Kompot's direction thresholds each cell's tail probability alone. Here the tests
        are neighbourhoods: the evaluation ``points`` (default the shared landmarks)
        each get a two-sided p-value from the model's z-score (with sample variance if
        fitted with sample labels, which is what makes the call hold with replicates);
        a weighted Benjamini–Hochberg procedure at level ``alpha`` over the points gives
        a p-value threshold, and every cell whose own p-value is below it is called, up
        or down by the sign of its log fold change (see
        :mod:`kompot_dask.differential._calls`).

        Parameters
        ----------
        X_new : array (n_cells, n_features)
            Cells to call.
        alpha : float, default 0.05
            FDR level over the points.
        points : array (p, n_features), optional
            Neighbourhood centres (default the landmarks; without landmarks, 300
            k-means centroids of ``X_new``, seeded with ``random_state``).
        weights : {"uniform", "density"} or array (p,), default "uniform"
            Weights of the points: equal, or inverse local density of the points (each
            region of the map counts alike).
        df : float, optional
            Use Student's t with ``df`` degrees of freedom instead of the normal for the
            p-values.
        cell_result : dict, optional
            ``log_fold_change_zscore`` and ``log_fold_change`` at ``X_new`` already
            computed (by :meth:`predict`).

        Returns
        -------
        dict
            ``log_fold_change_pvalue`` (two-sided), ``log_fold_change_spatial_fdr`` and
            ``log_fold_change_spatial_direction`` (``"up"``, ``"down"``, ``"neutral"``) per
            cell, and ``spatial_fdr_threshold`` (the p-value cut, 0 if nothing is called),
            ``spatial_fdr_points``, ``spatial_fdr_point_pvalue``,
            ``spatial_fdr_point_fdr``; also kept as ``spatial_fdr_result``.
        """
        from . import _calls

        alpha = check_ptp_threshold(alpha, "alpha")
        x = as_cell_states(X_new, "X_new", min_cells=1)
        if points is None:
            points = self.landmarks
        if points is None:
            points = compute_landmarks(x, "fixed", min(300, len(x)), self.random_state)
        points = check_landmarks(points, x.shape[1])
        w = _calls.resolve_weights(weights, points)
        cells = cell_result if cell_result is not None else _calls.model_zscores(self, x)
        pts = _calls.model_zscores(self, points)
        call = _calls.spatial_call(cells["log_fold_change_zscore"], cells["log_fold_change"],
                                   pts["log_fold_change_zscore"], alpha, w, df)
        out = {
            "log_fold_change_pvalue": call.pvalue,
            "log_fold_change_spatial_fdr": call.fdr,
            "log_fold_change_spatial_direction": call.direction,
            "spatial_fdr_threshold": call.threshold,
            "spatial_fdr_points": points,
            "spatial_fdr_point_pvalue": call.point_pvalue,
            "spatial_fdr_point_fdr": call.point_fdr,
        }
        self.spatial_fdr_result = out
        return out

    @property
    def variance_predictors(self) -> tuple[Any, Any]:
        """The sample-variance predictors in use (None where a condition has none)."""
        if not self._sample_variance_on:
            return None, None
        return self.variance_predictor1, self.variance_predictor2


def _synced_parameters(xc: np.ndarray, kwargs: dict) -> tuple[dict[str, float], np.ndarray | None]:
    """``d``, ``mu``, ``ls`` from both conditions' cells together (SPEC §5.3)."""
    f32 = bool(kwargs.get("nn_float32", True))
    tree = nb.build_tree(xc)
    out: dict[str, float] = {}
    if kwargs.get("d") is None:
        method = kwargs.get("d_method", "fractal")
        out["d"] = nb.fractal_dimension(tree, xc)[0] if method == "fractal" else float(xc.shape[1])
    d = out.get("d", kwargs.get("d"))
    need_nn = kwargs.get("mu") is None or kwargs.get("ls") is None
    nn = nn_distances(xc, tree, f32) if need_nn else None
    if need_nn and not (nn > 0).all():
        # The reference takes ln 0 here (ls = 0, mu = -inf) and its fit then fails; say why instead.
        msg = (
            f"sync_parameters: {int((nn <= 0).sum())} cell(s) have an identical twin across the two "
            "conditions (nearest-neighbour distance 0); remove duplicated cells or pass `mu` and `ls`"
        )
        raise ValueError(msg)
    if kwargs.get("mu") is None:
        out["mu"] = dp.prior_mean(nn, d, f32)
    if kwargs.get("ls") is None:
        out["ls"] = dp.length_scale(nn, kwargs.get("ls_factor", 1.0), f32)
    return out, nn
