"""Between-replicate variance (SPEC §4): one GP per sample, Bessel-corrected spread.

The covariance between cells is kept as its exact low-rank factor ``Q`` (n × S × G):
``C_g = Q_g Q_gᵀ``. Everything downstream (per-cell variances, Mahalanobis distances)
uses ``Q``; the dense (n, n, G) tensor of the reference is only built on request.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..estimators import DensityEstimator, FunctionEstimator
from ..io.results import DiskStorage
from ..estimators._inputs import as_cell_states, as_expression, take_rows
from ..execution.plan import row_slices
from ..kernels.mahalanobis import sample_variance_factor
from ._checks import check_sample_labels

__all__ = ["SampleVarianceEstimator", "TooFewSamplesError"]

ESTIMATOR_TYPES = ("function", "density")
MAX_DENSE_COVARIANCE_BYTES = 2 * 2**30


class TooFewSamplesError(ValueError):
    """Fewer than two samples have enough cells to estimate a variance."""


class SampleVarianceEstimator:
    """Local variance between biological replicates (samples), SPEC §4.

    Parameters
    ----------
    eps : float, default 1e-8
        Stored for API compatibility; the reference never uses it in the arithmetic.
    jit_compile : bool, default True
        Accepted for API compatibility (kernels are always compiled).
    estimator_type : {"function", "density"}
        Fit a :class:`~kompot_dask.FunctionEstimator` (expression) or a
        :class:`~kompot_dask.DensityEstimator` (abundance) per sample.
    store_arrays_on_disk : bool, optional
        Keep the factor ``Q`` in a zarr store under ``disk_storage_dir`` instead of
        memory. ``None`` means True exactly when ``disk_storage_dir`` is given.
    disk_storage_dir : str, optional
        Folder for on-disk arrays (created if missing).
    dask_num_workers : int, optional
        Accepted for API compatibility; scheduling belongs to the active dask client.

    Attributes
    ----------
    group_predictors : dict
        Sample label → fitted predictor, in sorted label order.
    group_sizes : dict
        Sample label → number of cells.
    group_parameters : dict
        Sample label → the fitted estimator's scalars (``n_obs``, ``ls``, and for
        densities ``d``, ``mu`` and the optimiser's iteration count).
    n_groups : int
        Number of samples used (at least 2 after :meth:`fit`).
    disk_storage : DiskStorage or None
        Where on-disk arrays go.
    """

    def __init__(
        self,
        eps: float = 1e-8,
        jit_compile: bool = True,
        estimator_type: str = "function",
        store_arrays_on_disk: bool | None = None,
        disk_storage_dir: str | None = None,
        dask_num_workers: int | None = None,
    ):
        if estimator_type not in ESTIMATOR_TYPES:
            msg = f"unknown estimator_type {estimator_type!r}; use 'function' (expression) or 'density'"
            raise ValueError(msg)
        on_disk = disk_storage_dir is not None if store_arrays_on_disk is None else bool(store_arrays_on_disk)
        if on_disk and disk_storage_dir is None:
            msg = "`store_arrays_on_disk=True` needs `disk_storage_dir`, the folder to store arrays in"
            raise ValueError(msg)
        self.eps = float(eps)
        self.jit_compile = jit_compile
        self.estimator_type = estimator_type
        self.store_arrays_on_disk = on_disk
        self.disk_storage_dir = disk_storage_dir
        self.dask_num_workers = dask_num_workers
        self.disk_storage = DiskStorage(disk_storage_dir) if on_disk else None
        self.group_predictors: dict[Any, Any] = {}
        self.group_sizes: dict[Any, int] = {}
        self.group_parameters: dict[Any, dict[str, float]] = {}
        self.n_groups = 0

    def fit(
        self,
        X: Any,
        Y: Any = None,
        grouping_vector: Any = None,
        min_cells: int = 2,
        ls_factor: float = 10.0,
        estimator_kwargs: dict | None = None,
    ) -> "SampleVarianceEstimator":
        """Fit one estimator per sample with at least ``min_cells`` cells.

        Parameters
        ----------
        X : array (n_cells, n_features)
            Cell states.
        Y : array (n_cells, n_genes), optional
            Expression; required for ``estimator_type="function"``, ignored otherwise.
        grouping_vector : array (n_cells,)
            Sample label of each cell.
        min_cells : int, default 2
            Samples with fewer cells are skipped with a warning.
        ls_factor : float, default 10.0
            Passed to each estimator unless ``estimator_kwargs`` fixes ``ls``.
        estimator_kwargs : dict, optional
            Keyword arguments of every per-sample estimator.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            If fewer than 2 samples have ``min_cells`` cells.
        """
        x = as_cell_states(X, "X")
        n = len(x)
        if self.estimator_type == "function":
            if Y is None:
                raise ValueError("`Y` (expression, n_cells x n_genes) is required for estimator_type='function'")
            Y, _ = as_expression(Y, n, "Y")
        if grouping_vector is None:
            raise ValueError("`grouping_vector` (the sample label of each cell) is required")
        labels = check_sample_labels(grouping_vector, n, "grouping_vector")
        if not isinstance(min_cells, (int, np.integer)) or min_cells < 1:
            raise ValueError(f"`min_cells` must be a positive int; got {min_cells!r}")
        groups, counts = np.unique(labels, return_counts=True)
        skipped = [g for g, c in zip(groups, counts) if c < min_cells]
        if skipped:
            warnings.warn(
                f"skipping sample(s) {skipped} with fewer than {min_cells} cells", UserWarning, stacklevel=2
            )
        kept = [g for g, c in zip(groups, counts) if c >= min_cells]
        if len(kept) < 2:
            msg = (
                f"sample variance needs at least 2 samples with >= {min_cells} cells each; found "
                f"{len(kept)} (labels present: {groups.tolist()}). Pass labels with two or more "
                "replicates, or switch sample variance off"
            )
            raise TooFewSamplesError(msg)
        kwargs = dict(estimator_kwargs or {})
        if "ls" not in kwargs:
            kwargs["ls_factor"] = ls_factor
        self.group_predictors, self.group_sizes, self.group_parameters = {}, {}, {}
        jobs = []
        for g in kept:
            rows = np.flatnonzero(labels == g)
            jobs.append((g, x[rows], None if Y is None else take_rows(Y, rows)))
        for (g, xs, _), (predictor, scalars) in zip(jobs, self._fit_all(jobs, kwargs)):
            self.group_predictors[g] = predictor
            self.group_sizes[g] = len(xs)
            self.group_parameters[g] = scalars
        self.n_groups = len(kept)
        return self

    def _fit_all(self, jobs: list, kwargs: dict) -> list:
        """Fit every sample: one task each on the active dask client, else one after another."""
        from ..execution.cluster import active_client

        client = active_client()
        if client is None:
            return [_fit_group(self.estimator_type, xs, ys, kwargs) for _, xs, ys in jobs]
        from ..execution.runner import InOptions
        from ..io.results import fingerprint

        token = fingerprint(self.estimator_type, kwargs, [xs for _, xs, _ in jobs])[:10]
        # Each sample's cells travel inside its task rather than being scattered: data in
        # the graph survives the loss of a worker (the task is simply rerun elsewhere),
        # which scattered data does not. Distributed warns when that graph is large.
        futures = [
            client.submit(InOptions(_fit_group), self.estimator_type, xs, ys, kwargs,
                          key=f"kompot-fit-sample-{self.estimator_type}-{g}-{token}")
            for g, xs, ys in jobs
        ]
        return client.gather(futures)

    def _require_fitted(self) -> None:
        if self.n_groups < 2:
            raise ValueError("this SampleVarianceEstimator is not fitted; call `fit` first")

    def group_predictions(self, X_new: Any, genes: Any = None) -> np.ndarray:
        """Each sample's prediction at ``X_new``: (S, n, G), or (S, n, 1) for densities.

        Densities are normalised by each sample's own cell count (SPEC §4.3).
        """
        self._require_fitted()
        preds = []
        for predictor in self.group_predictors.values():
            if self.estimator_type == "density":
                p = predictor(X_new, normalize=True)[:, None]
            else:
                p = predictor(X_new, genes=genes)
                p = p[:, None] if p.ndim == 1 else p
            preds.append(p)
        return np.stack(preds)

    def factor(self, X_new: Any, genes: Any = None, reduced: bool = False) -> Any:
        """The exact low-rank factor ``Q`` (n, S, G) with ``C_g = Q_g Q_gᵀ``.

        ``Q`` holds the centred sample predictions over ``sqrt(S - 1)``; ``reduced=True``
        gives the factor of the same covariance with ``S − 1`` columns
        (:func:`~kompot_dask.kernels.mahalanobis.sample_variance_factor`). With disk
        storage it is written to a zarr array cell chunk by cell chunk and returned as
        that (lazily readable) array.
        """
        self._require_fitted()
        x = np.asarray(X_new, dtype=np.float64)
        slices = self._cell_slices(len(x), genes)
        if self.disk_storage is None:
            return np.concatenate([self._factor_block(x[sl], genes, reduced) for sl in slices])
        first = self._factor_block(x[slices[0]], genes, reduced)
        out = self.disk_storage.create("sample_variance_factor", (len(x),) + first.shape[1:], first.shape)
        out[slices[0]] = first
        for sl in slices[1:]:
            out[sl] = self._factor_block(x[sl], genes, reduced)
        return self.disk_storage.finish(out)

    def __call__(self, X_new: Any, diag: bool = False, progress: bool = True) -> Any:
        """Same as :meth:`predict`, so the estimator itself is a variance predictor."""
        return self.predict(X_new, diag=diag, progress=progress)

    @property
    def n_outputs(self) -> int:
        """Genes predicted per sample (1 for densities)."""
        self._require_fitted()
        if self.estimator_type == "density":
            return 1
        weights = next(iter(self.group_predictors.values())).weights
        return 1 if weights.ndim == 1 else int(weights.shape[1])

    def _cell_slices(self, n: int, genes: Any) -> list[slice]:
        n_genes = self.n_outputs if genes is None else len(np.arange(self.n_outputs)[genes])
        return row_slices(n, 2 * self.n_groups * n_genes)

    def _factor_block(self, x: np.ndarray, genes: Any, reduced: bool = False) -> np.ndarray:
        return sample_variance_factor(self.group_predictions(x, genes), reduced=reduced)

    def predict(self, X_new: Any, diag: bool = False, progress: bool = True) -> Any:
        """Bessel-corrected variance over samples (``diag=True``) or covariance.

        Parameters
        ----------
        X_new : array (n_cells, n_features)
        diag : bool, default False
            True → variance per cell, (n, G) or (n, 1) for densities. False → the
            dense covariance (n, n, G); only built for small n (it needs n²G floats).
            With disk storage it is a lazy dask array computed per gene from ``Q``.
        progress : bool
            Accepted for API compatibility.

        Returns
        -------
        numpy.ndarray or dask.array.Array
        """
        self._require_fitted()
        x = np.asarray(X_new, dtype=np.float64)
        if diag:
            slices = self._cell_slices(len(x), None)
            return np.concatenate([np.sum(self._factor_block(x[sl], None) ** 2, axis=1) for sl in slices])
        q = self.factor(x)
        if self.disk_storage is not None:
            import dask.array as da

            qd = da.from_zarr(q)
            return da.einsum("asg,bsg->abg", qd, qd)
        need = q.shape[0] ** 2 * q.shape[2] * 8
        if need > MAX_DENSE_COVARIANCE_BYTES:
            msg = (
                f"the dense sample covariance would take {need / 2**30:.1f} GiB ({q.shape[0]} cells "
                f"squared x {q.shape[2]} genes); use `factor(X_new)` (C_g = Q_g Q_g^T), "
                "`predict(X_new, diag=True)`, or `disk_storage_dir` for a lazy array"
            )
            raise MemoryError(msg)
        return np.einsum("asg,bsg->abg", q, q)


def _fit_group(estimator_type: str, x: np.ndarray, y: Any, kwargs: dict):
    """Fit one sample's estimator; return its predictor and scalars (runs on a worker)."""
    if estimator_type == "function":
        est = FunctionEstimator(**kwargs).fit(x, y)
    else:
        est = DensityEstimator(**{"d_method": "fractal", "predictor_with_uncertainty": True, **kwargs}).fit(x)
    est.predict.kept = None  # the sample variance asks for means only: no variances to read them
    return est.predict, _scalars(est)


def _scalars(estimator) -> dict[str, float]:
    out = {"n_obs": int(estimator.n_obs), "ls": float(estimator.ls)}
    for name in ("d", "mu"):
        if hasattr(estimator, name):
            out[name] = float(getattr(estimator, name))
    result = getattr(estimator, "optimizer_result", None)
    if result is not None:
        out["iterations"] = int(result.nit)
    return out
