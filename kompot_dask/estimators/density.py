"""Log cell density over the cell-state map (SPEC §2): a GP with a nearest-neighbour likelihood."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import scipy.optimize

from .._jax import with_x64
from ..kernels import density as dk
from ..kernels import density_params as dp
from ..kernels import covariance as cov
from ..kernels import neighbors as nb
from ..kernels import posterior as post
from . import _shared_factors as shared_factors
from ._density_terms import DensityChunk, Prior, gram_rhs, hessian_diag, loglik_grad, with_factor_rows
from ..execution.reduce import LocalChunks, open_reducer
from ._inputs import as_cell_states, check_count, check_landmarks, check_positive
from ._kept_projections import KeptProjections, projections, reserve
from ..execution.plan import row_slices
from ._landmarks import resolve_inducing
from ._neighbors import nn_distances
from ._predictor import ChunkedPredictor

__all__ = ["DensityEstimator", "DensityPredictor", "DensityState"]

logger = logging.getLogger("kompot_dask")

MAX_DIMENSION = 50
OPTIMIZERS = ("L-BFGS-B", "preconditioned")
# Above this many reference L-BFGS-B iterations the log suggests the preconditioned optimiser.
SLOW_ITERATIONS = 100


class DensityState(NamedTuple):
    """Everything a worker needs to predict a fitted density at any cells."""

    inducing: np.ndarray  # (m, D) landmarks, or the training cells of a full GP
    lp: np.ndarray  # (m, m) chol(K_ZZ + jitter I)
    weights: np.ndarray  # (m,) Lp^-T z
    s: np.ndarray | None  # (m,) Laplace std of z, None without uncertainty
    mu: float
    ls: float
    n_obs: int


class DensityPredictor(ChunkedPredictor):
    """Callable log-density predictor with GP uncertainties (SPEC §2.8).

    ``predictor(x, normalize=False)`` gives the log density; ``normalize=True`` subtracts
    ``ln n_obs``. Query cells are processed in chunks, so any number can be predicted.
    """

    @with_x64
    def __call__(self, x: Any, normalize: bool = False) -> np.ndarray:
        st = self.state
        out = self._by_chunks(self._query(x), lambda xc: _chunk_mean(_kernel_rows(xc, st), st))
        return out - np.log(st.n_obs) if normalize else out

    @with_x64
    def log_density_and_uncertainty(self, x: Any, normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(self(x, normalize), self.uncertainty(x))``, the same numbers, from one kernel block
        ``K_xZ`` per chunk of cells instead of one for the mean and another for the variances."""
        x, st = self._query(x), self._require_uncertainty()
        s2 = st.s * st.s
        means, variances = [], []
        for sl in row_slices(len(x), len(st.inducing)):
            k_xz = _kernel_rows(x[sl], st)
            means.append(_chunk_mean(k_xz, st))
            cov_diag, mean_cov = _chunk_variances(x[sl], k_xz, st, s2, self.kept)
            variances.append(cov_diag + mean_cov)
        out = np.concatenate(means)
        return (out - np.log(st.n_obs) if normalize else out), np.concatenate(variances)

    def _variances(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        st = self.state
        s2 = np.zeros(len(st.inducing)) if st.s is None else st.s * st.s
        parts = [_chunk_variances(x[sl], _kernel_rows(x[sl], st), st, s2, self.kept)
                 for sl in row_slices(len(x), len(st.inducing))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @with_x64
    def covariance(self, x: Any, diag: bool = True) -> np.ndarray:
        """Conditional GP covariance ``k(x, x) - B^T B`` (diagonal or full)."""
        x, st = self._query(x), self.state
        if diag:
            return self._variances(x)[0]
        return np.asarray(dk.predict_covariance(x, st.inducing, st.lp, st.ls))

    @with_x64
    def mean_covariance(self, x: Any, diag: bool = True) -> np.ndarray:
        """Covariance propagated from the Laplace uncertainty of the latent ``z``."""
        x, st = self._query(x), self._require_uncertainty()
        if diag:
            return self._variances(x)[1]
        return np.asarray(dk.predict_mean_covariance(x, st.inducing, st.lp, st.s, st.ls))

    @with_x64
    def uncertainty(self, x: Any, diag: bool = True) -> np.ndarray:
        """``covariance + mean_covariance``: a variance, not a standard deviation."""
        x, st = self._query(x), self._require_uncertainty()
        if diag:
            cov, mean_cov = self._variances(x)
            return cov + mean_cov
        return np.asarray(dk.predict_covariance(x, st.inducing, st.lp, st.ls)) + np.asarray(
            dk.predict_mean_covariance(x, st.inducing, st.lp, st.s, st.ls)
        )

    def _require_uncertainty(self) -> DensityState:
        if self.state.s is None:
            msg = "this predictor has no uncertainty; fit with `predictor_with_uncertainty=True`"
            raise ValueError(msg)
        return self.state


class _Objective:
    """Negative log posterior of ``z`` and its gradient, summed over cell chunks (§2.4)."""

    def __init__(self, reducer, prior, lp: np.ndarray, landmark: bool, mu: float):
        self.reducer, self.prior, self.lp, self.landmark, self.mu = reducer, prior, lp, landmark, mu

    @with_x64
    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        z = np.asarray(z, dtype=np.float64)
        w = post.solve_lower_t(self.lp, z) if self.landmark else z
        loglik, grad_w = self.reducer.reduce(loglik_grad, self.prior, w, self.mu)
        grad_z = post.solve_lower(self.lp, grad_w) if self.landmark else grad_w
        return dk.loss_value(z, loglik), z - grad_z


class _Preconditioned:
    """The objective in ``u = R^T z``, ``R R^T = I + L^T L`` (the ridge system of §2.5).

    At the optimum the Hessian ``I + L^T diag(exp(f + V)) L`` has weights that average one
    (the NN likelihood makes ``exp(f_i + V_i)`` unit-mean), so in ``u`` it is close to the
    identity whatever the number of cells: L-BFGS then needs few iterations, and their count
    does not grow with n. The factor is the one the ridge start already computes.
    """

    def __init__(self, objective: _Objective, factor: np.ndarray):
        self.objective, self.factor = objective, factor

    def to_latent(self, u: np.ndarray) -> np.ndarray:
        return post.solve_lower_t(self.factor, np.asarray(u, dtype=np.float64))

    def from_latent(self, z: np.ndarray) -> np.ndarray:
        return self.factor.T @ z

    @with_x64
    def __call__(self, u: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad_z = self.objective(self.to_latent(u))
        return value, post.solve_lower(self.factor, grad_z)


class DensityEstimator:
    """Gaussian-process estimate of log cell density (Mellon's method, SPEC §2).

    Parameters
    ----------
    n_landmarks : int, optional
        Number of k-means landmarks; ``None`` resolves as in SPEC §1.7 (full GP up to
        5000 cells, else 5000 landmarks).
    landmarks : array (M, D), optional
        Inducing points to use instead of computing them.
    gp_type : {None, "full", "fixed", "sparse_cholesky"}
        GP type; ``None`` resolves automatically. ``"fixed"`` keeps landmark mode even
        when there are at least as many landmarks as cells.
    d_method : {"embedding", "fractal"}
        Intrinsic dimension: the number of features, or the fractal estimate (§1.4).
    d, mu, ls : float, optional
        Fix the intrinsic dimension, prior mean or length scale instead of estimating them.
    ls_factor : float
        Multiplier of the estimated length scale (Kompot passes 10).
    nn_distances : array (n,), optional
        Precomputed nearest-neighbour distances of the training cells.
    jitter : float
        Added to the diagonal of ``K_ZZ``.
    optimizer : {"L-BFGS-B", "preconditioned"}
        MAP optimiser. ``"L-BFGS-B"`` is the reference's (scipy, its options): numbers agree
        with Kompot's, but its iteration count grows with the number of cells.
        ``"preconditioned"`` (a kompot_dask extension, not in the reference) runs the same
        L-BFGS-B on ``u = R^T z`` with ``R R^T = I + L^T L``; it reaches the same optimum
        (to the optimiser tolerance) in far fewer iterations on large data. Each fit logs
        its iteration count (logger ``kompot_dask``).
    maxiter : int
        L-BFGS-B iteration limit (jaxopt's default 500, as in the reference).
    predictor_with_uncertainty : bool
        Compute Laplace standard deviations so the predictor has uncertainties.
    random_state : int, optional
        Seed of the k-means landmarks.
    nn_float32 : bool
        Reproduce the reference's float32 nearest-neighbour arithmetic (SPEC §10.15):
        NN distances from float32 coordinates, and ``ln r``, ``mu``, ``ls`` and the
        likelihood terms in float32. Default True, so numbers agree with Kompot's;
        False computes them in float64.

    Attributes
    ----------
    nn_distances, d, mu, ls, landmarks, gp_type, initial_value, pre_transformation,
    pre_transformation_std, optimizer_result, n_obs, predict
        Set by :meth:`fit`. ``landmarks`` is None for a full GP; ``pre_transformation``
        is the MAP latent ``z`` and ``pre_transformation_std`` its Laplace std ``s``.
    """

    def __init__(
        self,
        *,
        n_landmarks: int | None = None,
        landmarks: Any = None,
        gp_type: str | None = None,
        d_method: str = "embedding",
        d: float | None = None,
        mu: float | None = None,
        ls: float | None = None,
        ls_factor: float = 1.0,
        nn_distances: Any = None,
        jitter: float = 1e-6,
        optimizer: str = "L-BFGS-B",
        maxiter: int = 500,
        predictor_with_uncertainty: bool = False,
        random_state: int | None = 42,
        nn_float32: bool = True,
    ):
        if d_method not in ("embedding", "fractal", "manual"):
            msg = f"unknown d_method {d_method!r}; use 'embedding', 'fractal', or pass `d`"
            raise ValueError(msg)
        if optimizer not in OPTIMIZERS:
            msg = f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS} ('L-BFGS-B' is the reference's)"
            raise ValueError(msg)
        if d is not None:
            d = check_positive(d, "d")
            _check_dimension(d)
        self.n_landmarks = check_count(n_landmarks, "n_landmarks", 0, allow_none=True)
        self.d_method = "manual" if d is not None else d_method
        self.ls_factor = check_positive(ls_factor, "ls_factor")
        # What the caller fixed; fit() fills the public attributes from these each time.
        self._given = {
            "landmarks": None if landmarks is None else np.asarray(landmarks, dtype=np.float64),
            "gp_type": gp_type,
            "d": d,
            "mu": None if mu is None else float(mu),
            "ls": None if ls is None else check_positive(ls, "ls"),
            "nn_distances": None if nn_distances is None else np.asarray(nn_distances, dtype=np.float64),
        }
        for key, value in self._given.items():
            setattr(self, key, value)
        self.jitter = check_positive(jitter, "jitter")
        self.optimizer = optimizer
        self.maxiter = int(maxiter)
        self.predictor_with_uncertainty = bool(predictor_with_uncertainty)
        self.random_state = random_state
        self.nn_float32 = bool(nn_float32)
        self.predict: DensityPredictor | None = None

    @with_x64
    def fit(self, x: Any) -> "DensityEstimator":
        """Fit the density to training cells ``x`` (n, D); returns self."""
        x = as_cell_states(x, "x")
        n, dim = x.shape
        given = self._given
        self.landmarks = None if given["landmarks"] is None else check_landmarks(given["landmarks"], dim)
        nn = given["nn_distances"]
        if nn is not None and nn.shape != (n,):
            msg = f"`nn_distances` must have shape ({n},) like the cells; got {nn.shape}"
            raise ValueError(msg)
        tree = nb.build_tree(x)
        f32 = self.nn_float32
        self.nn_distances = dp.validate_nn_distances(nn_distances(x, tree, f32) if nn is None else nn)
        self.d = self._dimension(x, tree)
        if given["mu"] is None:
            self.mu = dp.prior_mean(self.nn_distances, self.d, f32)
        if given["ls"] is None:
            self.ls = dp.length_scale(self.nn_distances, self.ls_factor, f32)
        self.gp_type, self.landmarks = resolve_inducing(
            x, self.n_landmarks, self.landmarks, given["gp_type"], self.random_state
        )
        self.n_obs = n
        self._fit_latent(x)
        return self

    def fit_predict(self, x: Any) -> np.ndarray:
        """Fit to ``x`` and return the (unnormalised) log density at ``x``."""
        return self.fit(x).predict(x)

    def _dimension(self, x: np.ndarray, tree) -> float:
        if self._given["d"] is not None:
            return self._given["d"]
        if self.d_method == "fractal":
            d, _, _ = nb.fractal_dimension(tree, x)
        else:
            d = float(x.shape[1])
        _check_dimension(d)
        return d

    def _fit_latent(self, x: np.ndarray) -> None:
        full = self.gp_type == "full"
        inducing = x if full else self.landmarks
        lp = shared_factors.prior_factor(np.asarray(inducing), self.ls, self.jitter, "K_ZZ + jitter*I")
        chunks = self._chunks(x, lp, full)
        prior = Prior(None if full else np.asarray(inducing), lp, float(self.ls))
        with open_reducer(chunks, "density") as reducer:
            shared = reducer.share(prior)
            landmark, kept = not full, None
            if landmark and 8 * len(x) * len(inducing) <= reducer.row_budget():
                # f = K_XU Lp⁻ᵀ z = L z: with L's rows kept, the objective takes the full-GP form
                reducer.replace_chunks(with_factor_rows, shared)
                landmark = False
                kept = self._keep_rows(reducer, chunks, len(x) * len(inducing))
            self.initial_value, factor = self._ridge_start(reducer, shared, x, lp, chunks, full)
            objective = _Objective(reducer, shared, lp, landmark, float(self.mu))
            if self.optimizer == "preconditioned":
                objective = _Preconditioned(objective, factor)
                start = objective.from_latent(self.initial_value)
            else:
                start = self.initial_value
            result = scipy.optimize.minimize(
                objective, start, jac=True, method="L-BFGS-B", tol=None, options={"maxiter": self.maxiter}
            )
            if self.optimizer == "preconditioned":
                result.x = objective.to_latent(result.x)  # report the latent z, as for L-BFGS-B
            _log_optimizer(self.optimizer, result, len(x), self.maxiter)
            z = np.asarray(result.x, dtype=np.float64)
            s = None
            if self.predictor_with_uncertainty:
                (h_diag,) = reducer.reduce(hessian_diag, shared, z, float(self.mu))
                s = np.asarray(dk.laplace_std(h_diag))
        self.optimizer_result = result
        # Kept for loss_and_gradient(): a local objective over views of the training cells.
        self._objective = _Objective(LocalChunks(chunks), prior, lp, not full, float(self.mu))
        self.pre_transformation, self.pre_transformation_std = z, s
        self.predict = DensityPredictor(
            DensityState(
                inducing=np.asarray(inducing),
                lp=lp,
                weights=post.solve_lower_t(lp, z),  # Lp^-T z in both modes
                s=s,
                mu=float(self.mu),
                ls=float(self.ls),
                n_obs=len(x),
            ),
            kept,
        )

    def _keep_rows(self, reducer, chunks: list[DensityChunk], entries: int) -> KeptProjections | None:
        """The factor rows ``L = K_XU Lp⁻ᵀ`` of the training cells, kept for the variances at
        them (``B = Lp⁻¹ K_Ux = Lᵀ`` there) when the fit runs here, the uncertainty is asked
        for and the rows fit the ``factor_rows_bytes`` option beside the others kept."""
        if not self.predictor_with_uncertainty or not isinstance(reducer, LocalChunks):
            return None
        kept = reserve(8 * entries)
        if kept is not None:
            for chunk, with_rows in zip(chunks, reducer.chunks):
                kept.add(chunk.x, np.asarray(with_rows.phi))
        return kept

    def _ridge_start(self, reducer, shared, x: np.ndarray, lp: np.ndarray, chunks: list[DensityChunk],
                     full: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The ridge initial value ``z0 = (I + Lᵀ L)⁻¹ Lᵀ t`` (§2.5), and ``chol(I + Lᵀ L)``
        when the preconditioned optimiser needs it (else None).

        A full GP has ``L = Lp`` with ``Lp Lpᵀ = K + jitter I``, so ``z0 = Lpᵀ (I + K + jitter I)⁻¹ t``
        (:func:`_full_ridge_start`): no ``Lᵀ L``, an n³ product (0.2 s at 2,500 cells).
        """
        if full and self.optimizer != "preconditioned":
            target = np.concatenate([chunk.target for chunk in chunks])
            return _full_ridge_start(x, lp, target, self.ls, self.jitter), None
        gram, rhs = reducer.reduce(gram_rhs, shared)
        factor = _ridge_factor(gram)
        return post.solve_lower_t(factor, post.solve_lower(factor, rhs), overwrite=True), factor

    def _chunks(self, x: np.ndarray, lp: np.ndarray, full: bool) -> list[DensityChunk]:
        """The training cells cut into chunks, with their likelihood terms and ridge target."""
        v, vd = dp.likelihood_terms(self.nn_distances, self.d, self.nn_float32)
        target = dp.nn_log_density_mle(self.nn_distances, self.d, self.nn_float32) - self.mu
        v, vd, target = np.asarray(v), np.asarray(vd), np.asarray(target)
        m = len(x) if full else len(self.landmarks)
        return [
            DensityChunk(None if full else x[sl], lp[sl] if full else None, v[sl], vd[sl], target[sl])
            for sl in row_slices(len(x), m)
        ]

    def __getstate__(self) -> dict:
        # The objective holds views of the training cells: not part of a fitted model.
        state = dict(self.__dict__)
        state.pop("_objective", None)
        return state

    @with_x64
    def loss_and_gradient(self, z: Any) -> tuple[float, np.ndarray]:
        """The optimised objective and its gradient at latent ``z`` (after :meth:`fit`, in the
        fitting process: the objective is not pickled with the estimator)."""
        if getattr(self, "_objective", None) is None:
            raise ValueError("loss_and_gradient needs the estimator that ran `fit` (it is not pickled)")
        return self._objective(np.asarray(z, dtype=np.float64))


def _kernel_rows(xc: np.ndarray, st: DensityState) -> np.ndarray:
    """``K_xZ`` (c × m, C-ordered; JAX's buffer, read-only) of a chunk of query cells.

    In this orientation the transpose ``K_Zx`` that the variances solve against is
    Fortran-ordered: the solve copies it once, without transposing, and the mean reads
    the same block.
    """
    return np.asarray(cov.matern52(xc, st.inducing, st.ls))


def _chunk_mean(k_xz: np.ndarray, st: DensityState) -> np.ndarray:
    """Unnormalised log density ``mu + K_xZ Lp⁻ᵀ z`` of a chunk (SPEC §2.8)."""
    return st.mu + k_xz @ st.weights


def _chunk_variances(xc: np.ndarray, k_xz: np.ndarray, st: DensityState, s2: np.ndarray,
                     kept: KeptProjections | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``covariance`` and ``mean_covariance`` diagonals of a chunk (SPEC §2.8), ``B = Lp⁻¹ K_Zx``.

    ``k_xz`` is from :func:`_kernel_rows`; if it is writable, it is overwritten by ``B**2``.
    Training cells whose rows of ``L = Bᵀ`` the fit kept (``kept``) are not solved for.
    """
    if kept is not None and len(kept):
        b2 = projections(xc, len(st.inducing), [kept],
                         lambda rows: post.solve_lower(st.lp, k_xz[rows].T, overwrite=True))
    else:
        b2 = post.solve_lower(st.lp, k_xz.T, overwrite=True)
    np.multiply(b2, b2, out=b2)
    return np.asarray(cov.matern52_diag(xc, st.ls)) - np.sum(b2, axis=0), s2 @ b2


def _full_ridge_start(x: np.ndarray, lp: np.ndarray, target: np.ndarray, ls: float, jitter: float) -> np.ndarray:
    """``Lpᵀ (I + K + jitter I)⁻¹ t``: the ridge start ``(I + Lpᵀ Lp)⁻¹ Lpᵀ t`` of a full GP on
    cells ``x``, by ``(I + Lᵀ L)⁻¹ Lᵀ = Lᵀ (I + L Lᵀ)⁻¹`` and ``Lp Lpᵀ = K + jitter I``."""
    a = np.array(cov.matern52(x, x, ls))
    a[np.diag_indices_from(a)] += 1.0 + jitter
    factor = post.cholesky_lower(a, "the ridge system I + K + jitter*I")
    return lp.T @ post.solve_lower_t(factor, post.solve_lower(factor, target), overwrite=True)


def _ridge_factor(gram: np.ndarray) -> np.ndarray:
    """``chol(gram + I)``: the ridge system of §2.5, ``I + Lᵀ L``.

    ``gram`` is a reducer's sum (an array of its own): it becomes ``gram + I``, not copied.
    """
    a = np.asarray(gram, dtype=np.float64)
    a[np.diag_indices_from(a)] += 1.0
    return post.cholesky_lower(a, "the ridge system I + L^T L")


def _check_dimension(d: float) -> None:
    if d > MAX_DIMENSION:
        msg = (
            f"intrinsic dimension d={d:.3g} exceeds {MAX_DIMENSION}; the density likelihood is "
            "unusable there. Use a low-dimensional cell-state embedding (e.g. diffusion components)"
        )
        raise ValueError(msg)


def _log_optimizer(optimizer: str, result: Any, n: int, maxiter: int) -> None:
    """Log the MAP fit's iterations; say when the reference optimiser is slow or hit its limit."""
    logger.info("density fit: %s, %d iterations, %d evaluations, %d cells", optimizer, result.nit, result.nfev, n)
    hint = ("optimizer='preconditioned' reaches the same optimum (to the optimiser tolerance) in far fewer "
            "iterations, but its numbers are not Kompot's to the digit")
    if result.nit >= maxiter:
        extra = f"; {hint}" if optimizer == "L-BFGS-B" else ""
        logger.warning("density fit: %s stopped at its iteration limit (maxiter=%d) before converging%s",
                       optimizer, maxiter, extra)
    elif optimizer == "L-BFGS-B" and result.nit > SLOW_ITERATIONS:
        logger.info("density fit: the reference optimiser needs more iterations the more cells there are; %s", hint)
