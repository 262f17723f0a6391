"""Differential expression between two conditions (SPEC §6)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._jax import with_x64
from ..estimators import FunctionEstimator
from ..estimators._inputs import as_cell_states, as_expression, check_count, check_landmarks
from ..estimators._landmarks import compute_landmarks
from ..estimators._neighbors import nn_distances
from ..fdr import compute_fdr
from ..execution.runner import resolve_client
from ..io.results import fingerprint
from ..options import get_options
from . import _relabel, pipeline
from ._blocks import EXPRESSION_KEYS, STD_KEYS
from ._runs import check_run_arguments, finish_run, memory_blocks, model_token, open_sink, planned_blocks
from ._checks import check_conditions, check_ptp_threshold, check_sample_labels, check_sample_variance_request
from ._expression_model import ConditionModel, expression_length_scale, fit_empirical_variance
from ._mahalanobis_inputs import evaluation_points, point_rows
from ._null_genes import draw_null_genes
from ._relabel_graph import replicate_null_distances
from ._variance import check_sample_counts, fit_sample_variances
from .sample_variance import SampleVarianceEstimator

__all__ = ["DifferentialExpression"]


class DifferentialExpression:
    """Differential expression: GP-imputed expression per condition, fold changes, Mahalanobis.

    Parameters
    ----------
    n_landmarks : int, optional
        Compute this many k-means landmarks on both conditions together and share them.
        ``None``: each condition resolves its own GP type (SPEC §1.7).
    use_sample_variance : bool, optional
        ``None``: on when sample indices are passed to :meth:`fit` or variance predictors
        are given.
    eps : float, default 1e-8
        Added to variances under square roots and to the Mahalanobis diagonal.
    jit_compile : bool, default False
        Accepted for API compatibility.
    function_predictor1, function_predictor2 : callable, optional
        Pre-fitted expression predictors ``f(x)`` → (n, G) with ``f.covariance(x, diag)``.
    variance_predictor1, variance_predictor2 : SampleVarianceEstimator or callable, optional
        Pre-fitted sample-variance predictors ``v(x, diag)``.
    random_state : int, optional
        Seed of the shared k-means landmarks.
    batch_size : int, default 500
        Fewest cells per in-memory prediction block (Kompot's memory knob). Blocks take as
        many more cells as the ``chunk_memory_bytes`` option allows, since small blocks run
        the products far below the machine's matrix rate and the results do not depend on
        the block size; pass ``cell_chunk`` to :meth:`predict` for exact blocks.
    store_arrays_on_disk : bool, optional
        Keep sample-variance factors in zarr under ``disk_storage_dir``.
    disk_storage_dir : str, optional
        Folder for on-disk arrays.
    max_memory_ratio : float, default 0.8
        Accepted for API compatibility (memory is planned by chunk sizes, see
        :func:`kompot_dask.set_options`).
    use_empirical_variance : bool, default False
        Add the heteroscedastic (HC3 residual) variance surface of SPEC §6.6.
    obs_variance_predictor1, obs_variance_predictor2 : callable, optional
        Pre-fitted empirical variance surfaces ``ν(x)`` → (n, G).
    null_genes : int or sequence of int, optional
        Append this many permuted null genes (or these source columns) to estimate the
        gene-level FDR of the Mahalanobis distances (SPEC §6.7); they are stripped from
        every output.
    null_seed : int, default 42
        Seed of the null genes (numpy ``RandomState``, as the reference).
    fdr_threshold : float, default 0.05
        ``is_de = local_fdr < fdr_threshold``.
    gene_names : sequence of str, optional
        Names of the genes (for null-gene names ``NULL_{i}_{name}`` and the FDR table).
    replicate_null : bool, optional
        With ``predict(..., compute_mahalanobis=True)``, also call genes against the
        replicate-aware null of :meth:`compute_replicate_fdr` with its defaults; adds
        ``replicate_pvalue``, ``replicate_fdr``, ``replicate_is_de`` and ``fdr_null`` to
        the results. ``None`` (default): on when :meth:`fit` gets the sample labels of
        both conditions (at least 3 samples in all) and the conditions share landmarks,
        off otherwise (``replicate_null_reason`` says why); ``True``: required (``fit``
        raises, naming the fix, when it cannot run); ``False``: off. Kompot's null-gene
        FDR (``null_genes``) is unchanged.

    Attributes
    ----------
    function_predictor1, function_predictor2, variance_predictor1, variance_predictor2,
    obs_variance_predictor1, obs_variance_predictor2
        Fitted or injected predictors.
    computed_landmarks : numpy.ndarray or None
        Landmarks shared by both conditions.
    ls : float
        Length scale of both conditions' kernel (from condition 1, SPEC §6.3).
    mahalanobis_distances : numpy.ndarray
        Per-gene distances of the last Mahalanobis computation.
    mahalanobis_branch : str
        Which branch of SPEC §6.5 computed them.
    fdr_results : pandas.DataFrame or None
        Gene-level FDR from the null genes.
    replicate_fdr_results : pandas.DataFrame or None
        Gene-level calls against the sample-relabelling null (:meth:`compute_replicate_fdr`).
    replicate_null_reason : str or None
        After :meth:`fit`: why ``predict`` does not call genes against the relabelling
        null (None when it does).
    """

    def __init__(
        self,
        n_landmarks: int | None = None,
        use_sample_variance: bool | None = None,
        eps: float = 1e-8,
        jit_compile: bool = False,
        function_predictor1: Any | None = None,
        function_predictor2: Any | None = None,
        variance_predictor1: Any | None = None,
        variance_predictor2: Any | None = None,
        random_state: int | None = None,
        batch_size: int = 500,
        store_arrays_on_disk: bool | None = None,
        disk_storage_dir: str | None = None,
        max_memory_ratio: float = 0.8,
        *,
        use_empirical_variance: bool = False,
        obs_variance_predictor1: Any | None = None,
        obs_variance_predictor2: Any | None = None,
        null_genes: int | Sequence[int] | None = None,
        null_seed: int = 42,
        fdr_threshold: float = 0.05,
        gene_names: Sequence[str] | None = None,
        replicate_null: bool | None = None,
    ):
        n_landmarks = check_count(n_landmarks, "n_landmarks", 0, allow_none=True)
        batch_size = check_count(batch_size, "batch_size", 1)
        self.n_landmarks = n_landmarks
        self.use_sample_variance = use_sample_variance
        self.eps = float(eps)
        self.jit_compile = jit_compile
        self.function_predictor1 = function_predictor1
        self.function_predictor2 = function_predictor2
        self.variance_predictor1 = variance_predictor1
        self.variance_predictor2 = variance_predictor2
        self.obs_variance_predictor1 = obs_variance_predictor1
        self.obs_variance_predictor2 = obs_variance_predictor2
        self.random_state = random_state
        self.batch_size = int(batch_size)
        self.store_arrays_on_disk = store_arrays_on_disk
        self.disk_storage_dir = disk_storage_dir
        self.max_memory_ratio = max_memory_ratio
        self.use_empirical_variance = bool(use_empirical_variance)
        self.null_genes = null_genes
        self.null_seed = int(null_seed)
        self.fdr_threshold = check_ptp_threshold(fdr_threshold, "fdr_threshold")
        self.gene_names = None if gene_names is None else [str(g) for g in gene_names]
        self.computed_landmarks: np.ndarray | None = None
        self.ls: float | None = None
        self.n_features: int | None = None
        self.n_genes: int | None = None
        self.null: Any = None
        self.mahalanobis_distances: np.ndarray | None = None
        self.mahalanobis_branch: str | None = None
        self.null_mahalanobis_distances: np.ndarray | None = None
        self.fdr_results = None
        self.replicate_null = _relabel.check_switch(replicate_null)
        self.replicate_null_reason: str | None = None
        self._replicate_on = False
        self.replicate_fdr_results = None
        self.replicate_null_result = None
        self._replicate_data = None
        self._fit_kwargs: dict | None = None

    # ------------------------------------------------------------------ fit
    @with_x64
    def fit(
        self,
        X_condition1: Any,
        y_condition1: Any,
        X_condition2: Any,
        y_condition2: Any,
        sigma: float = 1.0,
        ls: float | None = None,
        ls_factor: float = 10.0,
        landmarks: Any = None,
        sample_estimator_ls: float | None = None,
        condition1_sample_indices: Any = None,
        condition2_sample_indices: Any = None,
        allow_single_condition_variance: bool = False,
        **function_kwargs: Any,
    ) -> "DifferentialExpression":
        """Fit one expression GP per condition (and per sample, with sample variance).

        Parameters
        ----------
        X_condition1, X_condition2 : array (n_cells, n_features)
            Cell states.
        y_condition1, y_condition2 : array-like (n_cells, n_genes)
            Expression (numpy, scipy sparse, dask or zarr), the same genes in both.
        sigma : float, default 1.0
            Observation noise standard deviation.
        ls : float, optional
            Kernel length scale. ``None``: ``ls_factor · exp(mean ln nn + 3)`` from the
            nearest-neighbour distances of **condition 1**, used for both conditions
            (the reference's asymmetric choice, SPEC §6.3).
        ls_factor : float, default 10.0
        landmarks : array (M, n_features), optional
            Shared landmarks; overrides ``n_landmarks``.
        sample_estimator_ls : float, optional
            Length scale of the per-sample estimators (default: the models' ``ls``).
        condition1_sample_indices, condition2_sample_indices : array (n_cells,), optional
            Sample label of each cell; switch sample variance on.
        allow_single_condition_variance : bool, default False
            Use one condition's sample variance for both if the other has < 2 samples.
        **function_kwargs
            Passed to :class:`~kompot_dask.FunctionEstimator`.

        Returns
        -------
        self
        """
        x1, x2 = check_conditions(X_condition1, X_condition2)
        y1, _ = as_expression(y_condition1, len(x1), "y_condition1")
        y2, _ = as_expression(y_condition2, len(x2), "y_condition2")
        g1 = 1 if len(y1.shape) == 1 else y1.shape[1]
        g2 = 1 if len(y2.shape) == 1 else y2.shape[1]
        if g1 != g2:
            msg = (
                f"`y_condition1` has {g1} genes but `y_condition2` has {g2}; pass the same genes, "
                "in the same order, for both conditions"
            )
            raise ValueError(msg)
        labels1 = check_sample_labels(condition1_sample_indices, len(x1), "condition1_sample_indices")
        labels2 = check_sample_labels(condition2_sample_indices, len(x2), "condition2_sample_indices")
        has_labels = labels1 is not None or labels2 is not None
        given_variance = self.variance_predictor1 is not None or self.variance_predictor2 is not None
        check_sample_variance_request(self.use_sample_variance, has_labels or given_variance)
        if has_labels and self.use_sample_variance is not False:  # fail before the fits, not after
            check_sample_counts([labels1, labels2], allow_single_condition_variance,
                                (self.variance_predictor1, self.variance_predictor2))
        if self.replicate_null:  # labels and samples first: before landmarks and length scale
            _relabel.resolve_switch(True, _relabel.off_reason(labels1, labels2, True, False))
        self.n_features, self.n_genes = x1.shape[1], g1
        if self.gene_names is not None and len(self.gene_names) != g1:
            raise ValueError(f"`gene_names` has {len(self.gene_names)} names but the expression has {g1} genes")
        self._replicate_data = (x1, y1, labels1, x2, y2, labels2)  # real genes only: the replicate null
        if self.null_genes is not None and not (np.ndim(self.null_genes) == 0 and int(self.null_genes) == 0):
            self.null = draw_null_genes(y1, y2, self.null_genes, self.null_seed, self.gene_names)
            y1, y2 = _append_columns(y1, self.null.condition1), _append_columns(y2, self.null.condition2)
        kwargs = self._function_kwargs(x1, x2, sigma, landmarks, function_kwargs)
        f32 = bool(kwargs.get("nn_float32", True))
        if ls is None:
            ls = _predictor_ls(self.function_predictor1)
        if ls is None:
            ls = expression_length_scale(nn_distances(x1, float32=f32), ls_factor, f32, "X_condition1")
        self.ls = float(ls)
        kwargs["ls"] = self.ls
        self._replicate_on, self.replicate_null_reason = self._replicate_switch(labels1, labels2, sample_estimator_ls)
        self._fit_kwargs = dict(kwargs)
        fitted = []
        for c, (x, y) in enumerate(((x1, y1), (x2, y2)), start=1):
            if getattr(self, f"function_predictor{c}") is None:
                estimator = FunctionEstimator(**kwargs).fit(x, y)
                setattr(self, f"function_predictor{c}", estimator.predict)
            fitted.append(getattr(self, f"function_predictor{c}"))
        sample_kwargs = self._sample_kwargs(kwargs, fitted[0], sample_estimator_ls)
        if has_labels and self.use_sample_variance is not False:
            self.variance_predictor1, self.variance_predictor2 = fit_sample_variances(
                lambda: SampleVarianceEstimator(
                    eps=self.eps,
                    estimator_type="function",
                    store_arrays_on_disk=self.store_arrays_on_disk,
                    disk_storage_dir=self.disk_storage_dir,
                ),
                [(x1, y1, labels1), (x2, y2, labels2)],
                dict(ls_factor=ls_factor, estimator_kwargs=sample_kwargs),
                allow_single_condition_variance,
                given=(self.variance_predictor1, self.variance_predictor2),
            )
        if self.use_empirical_variance:
            for c, (x, y, labels) in enumerate(((x1, y1, labels1), (x2, y2, labels2)), start=1):
                if getattr(self, f"obs_variance_predictor{c}") is None:
                    setattr(self, f"obs_variance_predictor{c}", fit_empirical_variance(x, y, labels, sample_kwargs))
        return self

    def fit_from(
        self,
        source: Any,
        groupby: str,
        condition1: Any,
        condition2: Any,
        *,
        obsm_key: str = "DM_EigenVectors",
        layer: str | None = None,
        genes: Any = None,
        sample_col: str | None = None,
        **fit_kwargs: Any,
    ) -> "DifferentialExpression":
        """:meth:`fit` on two conditions of an AnnData (in memory, backed, lazy or a path) or a
        kompot_dask dataset; the expression is read chunk by chunk, never whole.

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
        layer : str, optional
            Expression layer (default ``X``, a dataset's ``expression``).
        genes : sequence of str or boolean mask, optional
            Genes to model (default all).
        sample_col : str, optional
            Sample of each cell: switches sample variance on.
        **fit_kwargs
            Passed to :meth:`fit`.

        Returns
        -------
        self
            With ``condition_inputs`` (the selected cells; ``x_all`` for :meth:`predict`)
            and ``gene_names`` from the source unless given.
        """
        from ..io.inputs import condition_inputs

        inputs = condition_inputs(source, groupby, condition1, condition2, obsm_key=obsm_key, layer=layer,
                                  genes=genes, sample_col=sample_col)
        if self.gene_names is None and inputs.gene_names is not None:
            self.gene_names = [str(g) for g in inputs.gene_names]
        self.condition_inputs = inputs
        return self.fit(inputs.x1, inputs.y1, inputs.x2, inputs.y2, condition1_sample_indices=inputs.labels1,
                        condition2_sample_indices=inputs.labels2, **fit_kwargs)

    def _function_kwargs(self, x1, x2, sigma, landmarks, function_kwargs) -> dict:
        kwargs: dict[str, Any] = {"sigma": sigma, "predictor_with_uncertainty": True, "n_landmarks": self.n_landmarks}
        kwargs.update({k: v for k, v in function_kwargs.items() if k != "progress"})
        if landmarks is not None:
            self.computed_landmarks = check_landmarks(landmarks, x1.shape[1])
        elif self.n_landmarks is not None and int(self.n_landmarks) > 0:
            self.computed_landmarks = compute_landmarks(
                np.vstack([x1, x2]), "fixed", int(self.n_landmarks), self.random_state
            )
        if self.computed_landmarks is not None:
            kwargs.update(landmarks=self.computed_landmarks, gp_type="fixed")
        return kwargs

    def _replicate_switch(self, labels1, labels2, sample_ls) -> tuple[bool, str | None]:
        """Whether ``predict`` calls genes against the relabelling null (before any fit)."""
        given = (self.function_predictor1, self.function_predictor2)
        shared = (self.computed_landmarks is not None and given == (None, None)) or \
            _relabel.on_shared_landmarks(*given)
        own_ls = sample_ls is not None and not np.isclose(float(sample_ls), self.ls, rtol=1e-12, atol=0.0)
        return _relabel.resolve_switch(self.replicate_null, _relabel.off_reason(labels1, labels2, shared, own_ls))

    @staticmethod
    def _sample_kwargs(kwargs: dict, predictor1: Any, sample_ls: float | None) -> dict:
        """Per-sample models share landmarks, kernel and noise with the main model (SPEC §11)."""
        out = dict(kwargs)
        own = getattr(predictor1, "landmarks", None)
        if "landmarks" not in out and own is not None:
            out.update(landmarks=own, gp_type="fixed")
        if sample_ls is not None:
            out["ls"] = float(sample_ls)
        return out

    # -------------------------------------------------------------- predict
    def _models(self) -> tuple[ConditionModel, ConditionModel]:
        if self.function_predictor1 is None or self.function_predictor2 is None:
            raise ValueError("DifferentialExpression is not fitted; call `fit` first")
        use_sv = self.use_sample_variance is not False
        return tuple(
            ConditionModel(
                getattr(self, f"function_predictor{c}"),
                getattr(self, f"variance_predictor{c}") if use_sv else None,
                getattr(self, f"obs_variance_predictor{c}"),
                self.eps,
            )
            for c in (1, 2)
        )

    def _pipeline_model(self) -> pipeline.ExpressionModel:
        """The fitted state the pipeline's tasks need (and nothing else of this object)."""
        m1, m2 = self._models()
        return pipeline.ExpressionModel(m1, m2, self.eps, self.n_genes, self._gene_count, self.n_features,
                                        self.null is not None, self.fdr_threshold, self.gene_names)

    def _query(self, x: Any, name: str = "X_new") -> np.ndarray:
        x = as_cell_states(x, name, min_cells=1)
        if self.n_features is not None and x.shape[1] != self.n_features:
            raise ValueError(f"`{name}` has {x.shape[1]} features but the model was fitted on {self.n_features}")
        return x

    @property
    def _gene_count(self) -> int:
        return self.n_genes + (0 if self.null is None else len(self.null.indices))

    @with_x64
    def predict(
        self,
        X_new: Any,
        compute_mahalanobis: bool = False,
        progress: bool = True,
        use_landmarks: bool = True,
        landmarks_override: Any = None,
        *,
        store: Any = None,
        client: Any = None,
        cell_chunk: int | None = None,
        gene_batch: int | None = None,
        dtype: str = "float64",
        overwrite: bool = False,
        compute: bool = True,
    ) -> Any:
        """Imputed expression, fold changes and (optionally) Mahalanobis distances at ``X_new``.

        Parameters
        ----------
        X_new : array (n_cells, n_features)
        compute_mahalanobis : bool, default False
            Also compute the per-gene Mahalanobis distance and its χ² PTP (and, with null
            genes, the gene-level FDR).
        progress : bool
            Accepted for API compatibility (see :func:`kompot_dask.set_options`).
        use_landmarks : bool, default True
            Evaluate the Mahalanobis distance at the landmarks when the model has them.
        landmarks_override : array (p, n_features), optional
            Evaluate it at these points instead.
        store : str or path-like, optional
            Stream the results into this zarr store instead of memory, as (cell chunk ×
            gene batch) tasks on the active (or given) dask cluster. A rerun with the same
            inputs resumes it (and repairs damaged blocks); a store of other inputs is
            replaced only with ``overwrite=True``, and only once the new run is complete.
        client : distributed.Client or str, optional
            Client or scheduler address of a store-backed run (default: the active
            client, else this process).
        cell_chunk, gene_batch : int, optional
            Block shape. Default in memory: at least ``batch_size`` cells, more up to the
            ``chunk_memory_bytes`` option, and the ``gene_batch_size`` option (else all
            genes); with a store, planned from the
            ``worker_memory_target`` option or the workers' memory limit.
        dtype : {"float64", "float32"}
            Type of the cells × genes results.
        overwrite : bool, default False
            Replace a store holding results of other inputs.
        compute : bool, default True
            With a store: ``False`` lays out the store and returns the graph (a
            ``dask.delayed.Delayed``) without computing anything.

        Returns
        -------
        dict or xarray.Dataset or dask.delayed.Delayed
            In memory: ``condition1_imputed``, ``condition2_imputed`` (and Kompot 0.8.0's
            ``condition1_smoothed``, ``condition2_smoothed``), ``condition1_std``,
            ``condition2_std``, ``fold_change``, ``fold_change_zscores``,
            ``mean_log_fold_change``; with Mahalanobis also ``mahalanobis_distances``,
            ``neg_log10_ptp`` (χ² with ``df`` = number of features, the reference's
            choice) and ``neg_log10_ptp_df_points`` (``df`` = number of evaluation
            points); with null genes also ``mahalanobis_pvalue``, ``local_fdr``,
            ``tail_fdr`` and ``is_de``; with the replicate null on (``replicate_null``)
            also ``replicate_pvalue``, ``replicate_fdr``, ``replicate_is_de`` and
            ``fdr_null``. With a store: the
            store opened lazily (dimensions ``cell``, ``gene``; the replicate calls are
            kept as ``replicate_fdr_results`` only), or the graph if ``compute=False``.
        """
        model = self._pipeline_model()
        x = self._query(X_new)
        args = check_run_arguments(store, dtype, overwrite, compute, client, cell_chunk=cell_chunk,
                                   gene_batch=gene_batch)
        points = self._evaluation_points(x, use_landmarks, landmarks_override)[0] if compute_mahalanobis else None
        m1, m2 = model.condition1, model.condition2
        token = None
        client = None if store is None else resolve_client(client)
        if store is None:
            batch = args["gene_batch"] or get_options()["gene_batch_size"] or self._gene_count
            cells = memory_blocks(len(x), self.batch_size, args["cell_chunk"],
                                  (self.function_predictor1, self.function_predictor2),
                                  (m1.variance_predictor, m2.variance_predictor), batch)
        else:
            cells, batch = planned_blocks(
                len(x), self.n_genes, model, (self.function_predictor1, self.function_predictor2),
                (m1.variance_predictor, m2.variance_predictor), client, args["cell_chunk"], args["gene_batch"])
            token = fingerprint(x, cells[0].stop, batch, args["dtype"], points, self.eps, model_token(
                self.function_predictor1, self.function_predictor2, m1.variance_predictor, m2.variance_predictor,
                m1.obs_variance_predictor, m2.obs_variance_predictor))
        meta = {"kind": "expression", "n_cells": len(x), "n_genes": self.n_genes}
        sink = open_sink(store, token, meta, overwrite)
        build = pipeline.expression_graph(model, x, sink, cells, batch, points, args["dtype"],
                                          pipeline.run_tag(token, sink), client, point_rows(x, points))
        out = pipeline.run(build, client, compute)
        if not compute:
            return out
        if compute_mahalanobis:
            self._keep_mahalanobis(out.arrays["mahalanobis_distances"], sink.read("_mahalanobis_all"), out.branch,
                                   out.fdr_table)
        replicate = None
        if compute_mahalanobis and self._replicate_on:
            table = self.compute_replicate_fdr(landmarks_override=points)
            replicate = {"replicate_pvalue": table["pvalue"].to_numpy(), "replicate_fdr": table["fdr"].to_numpy(),
                         "replicate_is_de": table["is_de"].to_numpy(), "fdr_null": table.attrs["null"]}
        if store is not None:
            return finish_run(out, sink, compute)
        result = {key: sink.read(key) for key in EXPRESSION_KEYS + STD_KEYS}
        if replicate is not None:
            result.update(replicate)
        result.update(condition1_smoothed=result["condition1_imputed"], condition2_smoothed=result["condition2_imputed"])
        result.update(out.arrays)
        return result

    def _evaluation_points(self, x, use_landmarks, landmarks_override) -> tuple[np.ndarray, bool]:
        if landmarks_override is not None:
            landmarks_override = check_landmarks(landmarks_override, self.n_features, "landmarks_override")
        landmarks = getattr(self.function_predictor1, "landmarks", None)
        return evaluation_points(x, landmarks, use_landmarks, landmarks_override)

    def _keep_mahalanobis(self, distances, distances_all, branch, fdr_table) -> None:
        self.mahalanobis_distances = distances
        self.mahalanobis_branch = branch
        if self.null is not None:
            self.null_mahalanobis_distances = distances_all[self.n_genes:]
            self.fdr_results = fdr_table

    @with_x64
    def compute_mahalanobis_distances(
        self,
        X: Any,
        fold_change: Any = None,
        use_landmarks: bool = True,
        landmarks_override: Any = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Per-gene Mahalanobis distance of the mean difference (SPEC §6.5).

        Parameters
        ----------
        X : array (n_cells, n_features)
            Cells to evaluate at when no landmarks are used.
        fold_change : array (n_cells, n_genes), optional
            Precomputed ``μ2 − μ1`` at ``X`` (used only when evaluating at ``X``).
        use_landmarks : bool, default True
            Evaluate at the model's landmarks when it has them.
        landmarks_override : array (p, n_features), optional
            Evaluate at these points instead.
        progress : bool
            Accepted for API compatibility.

        Returns
        -------
        numpy.ndarray
            (n_genes,) distances; a gene whose covariance is not positive definite is NaN.
        """
        model = self._pipeline_model()
        x = self._query(X, "X")
        points, at_x = self._evaluation_points(x, use_landmarks, landmarks_override)
        delta = None
        if at_x and fold_change is not None and self.null is None:
            delta = np.asarray(fold_change, dtype=np.float64)
            if delta.shape != (len(points), self._gene_count):
                raise ValueError(f"`fold_change` must have shape {(len(points), self._gene_count)}; got {delta.shape}")
        result = pipeline.mahalanobis_stage(model, points, pipeline.sigma_stage(model, points), None, delta)
        self._keep_mahalanobis(result.distances[: self.n_genes], result.distances, result.branch, None)
        if self.null is not None:
            self.fdr_results = compute_fdr(self.mahalanobis_distances, self.null_mahalanobis_distances,
                                           self.fdr_threshold, self.gene_names)
        return self.mahalanobis_distances

    def compute_fdr(self, null: Any = None, threshold: float | None = None, combine_with_internal: bool = False):
        """Gene-level FDR of the last Mahalanobis distances against null distances (SPEC §6.7).

        Parameters
        ----------
        null : array_like, optional
            External null distances; default the internal null genes'.
        threshold : float, optional
            Local-FDR threshold (default ``fdr_threshold``).
        combine_with_internal : bool, default False
            Use the internal null distances as well as ``null``.

        Returns
        -------
        pandas.DataFrame
        """
        if self.mahalanobis_distances is None:
            raise ValueError("compute Mahalanobis distances first (`predict(..., compute_mahalanobis=True)`)")
        internal = self.null_mahalanobis_distances
        if null is None and internal is None:
            raise ValueError("no null distances: pass `null`, or construct with `null_genes=...`")
        parts = [np.asarray(null, dtype=np.float64)] if null is not None else []
        if internal is not None and (null is None or combine_with_internal):
            parts.append(internal)
        thr = self.fdr_threshold if threshold is None else check_ptp_threshold(threshold, "threshold")
        self.fdr_results = compute_fdr(self.mahalanobis_distances, np.concatenate(parts), thr, self.gene_names)
        return self.fdr_results

    @with_x64
    def compute_replicate_fdr(
        self,
        threshold: float | None = None,
        *,
        max_relabellings: int | None = None,
        null_genes: int | None = None,
        balance: int | None = 30,
        tail: str = "gpd",
        seed: int = 0,
        use_landmarks: bool = True,
        landmarks_override: Any = None,
        client: Any = None,
        gene_batch: int | None = None,
    ):
        """Gene-level DE calls against a null built by relabelling samples between conditions.

        The samples of both conditions are exchangeable when the conditions do not differ
        beyond their replicates. Every other split of the ``S1 + S2`` samples into groups
        of ``S1`` and ``S2`` (``C(S1+S2, S1) − 1`` of them, halved when ``S1 == S2``)
        gives each gene a Mahalanobis distance between two pseudo-conditions, computed
        exactly as the real one (same landmarks, length scale, noise and, if on, sample
        variance). Pooled over genes and relabellings they are the null; a gene's p-value
        is ``(1 + #{null >= D_g}) / (1 + n_null)`` (beyond the null's top 10 % a
        generalised-Pareto tail, ``tail="gpd"``) and it is called DE where its
        Benjamini–Hochberg adjusted p-value is at most ``threshold``. Unlike the null genes
        (expression permuted across cells), this null keeps the replicate structure.

        Each relabelling reuses per-sample sums of the landmark fit (one pass over the
        cells for all relabellings) and costs landmark-sized algebra plus one Mahalanobis
        pass over the genes; with more landmarks than cells the fits run in the cells'
        basis instead, whichever is cheaper (see :mod:`kompot_dask.differential._relabel`). The sums and
        the distances are dask tasks over (cell chunk × gene batch) blocks of the training
        expression: on the cluster when it is read lazily (dask, zarr, as ``fit_from`` and
        ``de()`` read it) and a client is active, else in this process.

        Parameters
        ----------
        threshold : float, optional
            FDR level (default ``fdr_threshold``).
        max_relabellings : int, optional
            Use at most this many relabellings (a seeded draw).
        null_genes : int, optional
            Pool the relabelled distances of this many genes (a seeded draw; default all).
        balance : int or None, default 30
            Weight each sample's cells to the pooled cell distribution over this many
            regions of the map before fitting, so that abundance changes do not move the
            means (in ``benchmarks/calibration.py`` the unweighted distances of non-DE
            genes in regions of changed abundance exceed the relabelling null: mean FDP
            24 % instead of 1 %). The ``mahalanobis`` column then holds the distances of
            the weighted fits. ``None``: the model's own (Kompot's) distances.
        tail : {"gpd", "empirical"}, default "gpd"
            p-values with a generalised-Pareto fit to the pooled null's top 10 % (they
            resolve below ``1 / (1 + n_null)``, the floor of the empirical p-values that
            otherwise limits the calls with 3 + 3 samples), or from the pooled null alone.
        seed : int, default 0
            Seed of the draws.
        use_landmarks : bool, default True
        landmarks_override : array (p, n_features), optional
            Evaluation points, as for :meth:`compute_mahalanobis_distances` (the model
            must be in landmark mode).
        client : distributed.Client or str, optional
            Run the tasks on this cluster (default: the active client for lazily read
            expression when the ``fit_on_cluster`` option is on).
        gene_batch : int, optional
            Genes per task (default: the ``gene_batch_size`` option, else planned from
            the landmarks and samples).

        Returns
        -------
        pandas.DataFrame
            Columns ``mahalanobis``, ``pvalue``, ``fdr`` (BH-adjusted p-value), ``is_de``,
            one row per gene; ``attrs`` records the null (``"sample_relabelling"``), the
            number of relabellings and of null distances, and the settings.
        """
        import pandas as pd

        if self.function_predictor1 is None or self._replicate_data is None:
            raise ValueError("fit the model first (with `condition1_sample_indices` and `condition2_sample_indices`)")
        data = self._replicate_data
        if data[2] is None or data[5] is None:
            raise ValueError("the replicate null needs the sample labels of both conditions "
                             "(`condition1_sample_indices`, `condition2_sample_indices` in `fit`)")
        thr = self.fdr_threshold if threshold is None else check_ptp_threshold(threshold, "threshold")
        landmarks = getattr(self.function_predictor1, "landmarks", None)
        if landmarks_override is not None:
            points = check_landmarks(landmarks_override, self.n_features, "landmarks_override")
        elif use_landmarks and landmarks is not None:
            points = np.asarray(landmarks, dtype=np.float64)
        else:
            raise ValueError("the replicate null evaluates the distance at landmarks: fit with `n_landmarks` or "
                             "`landmarks`, or pass `landmarks_override`")
        use_sv = self.use_sample_variance is not False and (
            self.variance_predictor1 is not None or self.variance_predictor2 is not None)
        if use_sv and self._sample_ls_differs():
            raise ValueError("the replicate null rebuilds the per-sample models on the main model's length scale; "
                             "it does not support `sample_estimator_ls`")
        if gene_batch is not None:
            gene_batch = check_count(gene_batch, "gene_batch", 1)
        client = None if client is None else resolve_client(client)  # None: decided by where the expression is
        result = replicate_null_distances(
            (self.function_predictor1, self.function_predictor2), data, self._fit_kwargs or {}, points, self.eps,
            self.n_genes, sample_variance=use_sv, max_relabellings=max_relabellings, null_gene_count=null_genes,
            seed=seed, balance=balance, client=client, gene_batch=gene_batch)
        calls = _relabel.replicate_fdr(result, thr, tail)
        index = pd.RangeIndex(self.n_genes) if self.gene_names is None else pd.Index(self.gene_names)
        table = pd.DataFrame({"mahalanobis": result.observed, "pvalue": calls["pvalue"], "fdr": calls["fdr"],
                              "is_de": calls["is_de"]}, index=index)
        table.attrs.update(null="sample_relabelling", n_relabellings=int(len(result.assignments)),
                           n_null=int(np.isfinite(result.null).sum()), fdr_threshold=thr,
                           sample_variance=bool(use_sv), balance=balance, tail=tail, method="bh")
        self.replicate_null_result = result
        self.replicate_fdr_results = table
        return table

    def _sample_ls_differs(self) -> bool:
        for vp in (self.variance_predictor1, self.variance_predictor2):
            est = getattr(vp, "__self__", vp)
            for params in getattr(est, "group_parameters", {}).values():
                if "ls" in params and not np.isclose(params["ls"], self.ls, rtol=1e-12, atol=0.0):
                    return True
        return False


def _predictor_ls(predictor: Any) -> float | None:
    state = getattr(predictor, "state", None)
    return None if state is None else float(state.ls)


def _append_columns(y: Any, extra: np.ndarray) -> Any:
    if hasattr(y, "dask"):
        import dask.array as da

        return da.concatenate([y, da.from_array(extra, chunks=(y.chunks[0], -1))], axis=1)
    if hasattr(y, "tocsr"):
        import scipy.sparse

        return scipy.sparse.hstack([y, scipy.sparse.csr_matrix(extra)], format="csr")
    return np.hstack([np.asarray(y, dtype=np.float64), extra])
