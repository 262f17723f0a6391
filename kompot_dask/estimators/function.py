"""GP regression of many genes over the cell-state map (SPEC §3): Mellon's FunctionEstimator."""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np

from .._jax import with_x64
from ..kernels import cell_basis as cb
from ..kernels import covariance as cov
from ..kernels import density_params as dp
from ..kernels import function as fk
from ..kernels import linalg as la
from ..kernels import posterior as post
from . import _shared_factors as shared
from ._function_terms import FunctionChunk, FunctionPrior, RowBlock, projected_stats, reads_lazily, residual_cross
from ..execution.reduce import LocalChunks, open_reducer
from ._kept_projections import KeptProjections, reserve
from ._inputs import as_cell_states, as_expression, check_count, check_landmarks, check_positive, read_rows
from ..execution.plan import row_slices
from ._landmarks import resolve_inducing
from ._predictor import ChunkedPredictor
from ._neighbors import nn_distances

__all__ = ["FunctionEstimator", "FunctionPredictor", "FunctionState"]

_WEIGHTS_LOCK = threading.Lock()  # forms a cell-basis fit's weights once, whichever thread asks first
_G_LOCK = threading.Lock()  # adds G to a fit made at its landmarks once, whichever thread asks first


class FunctionState(NamedTuple):
    """Everything a worker needs to predict a fitted regression at any cells."""

    inducing: np.ndarray  # (m, D) landmarks, or the training cells of a full GP
    weights: np.ndarray | None  # (m, G); None until first asked for in the cells' basis
    lp: np.ndarray  # landmark mode: chol(K_UU + jI); full mode: chol(K_XX + sigma^2 I)
    lb: np.ndarray | None  # landmark form: chol(I + A A^T / sigma^2); None otherwise
    mu: float
    ls: float
    n_obs: int
    one_d: bool  # the training targets were a vector
    leverage_factor: np.ndarray | None = None  # landmark mode, obs_variance only
    train_leverage: np.ndarray | None = None  # full mode, obs_variance only
    obs_weights: np.ndarray | None = None  # (m, G) weights of the observation-variance GP
    jitter: float | None = None  # landmark mode: lp = chol(K_UU + jitter I); None if unknown
    cell_basis: cb.CellBasis | None = None  # landmark mode fitted in the cells' basis (lb is None)

    @property
    def landmark_mode(self) -> bool:
        """Whether this is a landmark (DTC) fit, in either basis, rather than a full GP."""
        return self.lb is not None or self.cell_basis is not None


class FunctionPredictor(ChunkedPredictor):
    """Callable posterior mean with covariance, leverage and observation variance.

    ``predictor(x)`` gives the posterior mean, ``(n, G)`` (``(n,)`` for a vector target).
    Query cells are processed in chunks; ``genes`` selects a batch of columns.

    Every cell's result is the same whatever block of cells it is asked for in (up to BLAS
    rounding), so a caller's batch size only sets how many cells one call holds in memory.
    Small batches cost more per cell, though: a block of ``c`` cells solves against the
    ``M × M`` factors with ``c`` right-hand sides, which LAPACK runs near its GEMM rate only
    for ``c`` in the hundreds (measured with ``benchmarks/stages.py``: 100 cells at 5,000
    landmarks about 40 % of the rate of 1,000). Predictors fitted in one process on the
    same landmarks share their prior factor, and a block of cells asked of two such
    predictors in turn is projected onto it once (:mod:`._shared_factors`).

    A landmark fit with fewer training cells than landmarks is held in its cells' basis
    (:mod:`~kompot_dask.kernels.cell_basis`; same numbers up to rounding): its solves are
    cell-sized, and its means at its own landmarks (:meth:`inducing_mean`) need no weights.
    """

    @property
    def landmarks(self) -> np.ndarray | None:
        """Inducing points in landmark mode, None for a full GP."""
        return self.state.inducing if self.state.landmark_mode else None

    def _shaped(self, out: np.ndarray) -> np.ndarray:
        return out[:, 0] if self.state.one_d else out

    @property
    def weights(self) -> np.ndarray:
        """The weights ``w`` (M × G): the posterior mean is ``mu + K_xU w``.

        A fit in the cells' basis forms them on first use (``G z``, ``2 M c G`` operations),
        and keeps them; its means at its own landmarks need none (:meth:`inducing_mean`).
        """
        if self.state.weights is None:
            with _WEIGHTS_LOCK:
                if self.state.weights is None:
                    self.state = self.state._replace(weights=cb.weights(self._full_basis()))
        return self.state.weights

    def _full_basis(self) -> cb.CellBasis:
        """The cell-basis fit with its ``G`` (formed on first use after ``fit_at_landmarks``)."""
        basis = self.state.cell_basis
        if basis.g is None:
            with _G_LOCK:
                st = self.state
                if st.cell_basis.g is None:
                    self.state = st._replace(cell_basis=cb.with_g(
                        st.cell_basis, shared.scaled_inverse(st.lp, st.jitter), st.jitter))
                basis = self.state.cell_basis
        return basis

    @with_x64
    def __call__(self, x: Any, genes: Any = None) -> np.ndarray:
        if self.state.cell_basis is not None:  # cells that are landmarks: E z, no weights (inducing_mean)
            x = self._query(x)
            rows = point_rows(x, self.state.inducing)
            if rows is not None:
                return self._shaped(self.inducing_mean(rows, genes))
        w = self.weights if genes is None else self.weights[:, genes]
        return self.predict_with(x, w, self.state.mu)

    @with_x64
    def inducing_mean(self, rows: Any = slice(None), genes: Any = None) -> np.ndarray:
        """Posterior mean at the landmarks ``inducing[rows]``, (r, G) (a landmark fit only).

        Fitted in the cells' basis this is ``mu + E_r z`` (``E = K_UX − j G``, kept with the
        fit), which needs no weights; otherwise ``mu + K_{U_r U} w``.
        """
        st = self.state
        if not st.landmark_mode:
            raise ValueError("means at the landmarks need a landmark-mode fit")
        if st.cell_basis is None:
            w = self.weights if genes is None else self.weights[:, genes]
            return self.predict_with(st.inducing[rows], w, st.mu, keep_columns=True)
        out = cb.inducing_mean(st.cell_basis, rows, genes)
        out += st.mu
        return out

    @with_x64
    def predict_with(self, x: Any, weights: np.ndarray, mu: float, keep_columns: bool = False) -> np.ndarray:
        """``mu + K_xZ weights`` on this predictor's inducing points and length scale
        (``weights`` (m, k) need not be its own); (n, k), or (n,) for a vector target
        unless ``keep_columns``."""
        st, x = self.state, self._query(x)
        if st.landmark_mode and same_points(x, st.inducing):
            out = fk.kernel_times(shared.inducing_kernel(st.inducing, st.lp, st.ls), weights, mu)
        else:
            out = self._by_chunks(x, lambda xc: fk.predict_mean(xc, st.inducing, weights, mu, st.ls))
        return out if keep_columns else self._shaped(out)

    @with_x64
    def covariance(self, x: Any, diag: bool = True) -> np.ndarray:
        """Latent posterior covariance (no observation noise), the same for every gene.

        ``diag=True``: the variance of each cell, ``(n,)``; else the ``(n, n)`` covariance.
        At the model's own landmarks the full covariance comes from the fitted factors
        (:func:`~kompot_dask.kernels.posterior.inducing_shared`), with no solve per model.
        """
        x, st = self._query(x), self.state
        if st.cell_basis is not None:
            return self._cell_basis_covariance(x, diag)
        if st.lb is None:
            if diag:
                return self._by_chunks(x, lambda xc: post.full_variance(
                    np.asarray(cov.matern52_diag(xc, st.ls)), _kernel_block(st.inducing, xc, st.ls), st.lp))
            return post.full_covariance(np.asarray(cov.matern52(x, x, st.ls)), _kernel_block(st.inducing, x, st.ls),
                                        st.lp)
        if diag:
            return self._by_chunks(x, self._landmark_variance)
        if st.jitter is not None and same_points(x, st.inducing):
            return post.inducing_covariance(shared.inducing_terms(st.lp, st.jitter), st.lb)
        a, _ = shared.cell_projection(x, st.inducing, st.lp, st.ls)
        return post.landmark_covariance(np.asarray(cov.matern52(x, x, st.ls)), a, st.lb)

    def _cell_basis_covariance(self, x: np.ndarray, diag: bool) -> np.ndarray:
        st, basis = self.state, self.state.cell_basis
        if diag or not same_points(x, st.inducing):
            basis = self._full_basis()
        if diag:
            return self._by_chunks(x, lambda xc: cb.variance(
                np.asarray(cov.matern52_diag(xc, st.ls)), basis, _kernel_block(st.inducing, xc, st.ls)))
        if same_points(x, st.inducing):
            return cb.inducing_covariance(shared.inducing_kernel(st.inducing, st.lp, st.ls), basis)
        return cb.covariance(np.asarray(cov.matern52(x, x, st.ls)), basis, _kernel_block(st.inducing, x, st.ls))

    def _landmark_variance(self, xc: np.ndarray) -> np.ndarray:
        st = self.state
        a, base = shared.cell_projection(xc, st.inducing, st.lp, st.ls)
        return base + post.column_sq_norms(post.solve_lower(st.lb, a))

    @with_x64
    def leverage(self, x: Any) -> np.ndarray:
        """Hat-matrix diagonal (SPEC §3.5); full GPs define it at their training cells only."""
        x, st = self._query(x), self.state
        if st.landmark_mode:
            if st.leverage_factor is None:
                raise ValueError("leverage needs a model fitted with `obs_variance=True`")
            return self._by_chunks(x, lambda xc: fk.landmark_leverage(xc, st.inducing, st.leverage_factor, st.ls))
        if st.train_leverage is None:
            raise ValueError("leverage needs a model fitted with `obs_variance=True`")
        if not same_points(x, st.inducing):
            msg = "a full GP defines leverage at its training cells only; pass them, or fit with landmarks"
            raise ValueError(msg)
        return st.train_leverage

    @with_x64
    def obs_variance(self, x: Any, genes: Any = None) -> np.ndarray:
        """Observation-variance surface: the GP fitted to HC3 squared residuals (§3.5)."""
        st = self.state
        if st.obs_weights is None:
            raise ValueError("obs_variance needs a model fitted with `obs_variance=True`")
        w = st.obs_weights if genes is None else st.obs_weights[:, genes]
        return self._shaped(self._by_chunks(self._query(x), lambda xc: fk.predict_mean(xc, st.inducing, w, 0.0, st.ls)))


class FunctionEstimator:
    """Gaussian-process regression of one or many outputs (Mellon's method, SPEC §3).

    Parameters
    ----------
    n_landmarks, landmarks, gp_type
        As for :class:`~kompot_dask.DensityEstimator` (SPEC §1.7).
    ls : float, optional
        Length scale; estimated as ``ls_factor * exp(mean ln nn + 3)`` when None.
    ls_factor : float
        Multiplier of the estimated length scale.
    nn_distances : array (n,), optional
        Precomputed nearest-neighbour distances (only used to estimate ``ls``).
    mu : float
        Constant prior mean.
    sigma : float
        Observation noise standard deviation; ``max(sigma^2, jitter)`` is the noise
        variance (so ``sigma=0`` is interpolation with a jitter-sized nugget).
    jitter : float
        Added to the diagonal of ``K_UU``.
    predictor_with_uncertainty : bool
        Kept for API compatibility: the predictor always offers ``covariance``.
    obs_variance : bool
        Also fit the observation-variance surface from HC3 residuals (§3.5).
    random_state : int, optional
        Seed of the k-means landmarks.
    nn_float32 : bool
        Estimate ``ls`` with the reference's float32 arithmetic (SPEC §10.15).

    Attributes
    ----------
    nn_distances, ls, landmarks, gp_type, n_obs, predict
        Set by :meth:`fit`.
    """

    def __init__(
        self,
        *,
        n_landmarks: int | None = None,
        landmarks: Any = None,
        gp_type: str | None = None,
        ls: float | None = None,
        ls_factor: float = 1.0,
        nn_distances: Any = None,
        mu: float = 0.0,
        sigma: float = 0.0,
        jitter: float = 1e-6,
        predictor_with_uncertainty: bool = False,
        obs_variance: bool = False,
        random_state: int | None = 42,
        nn_float32: bool = True,
    ):
        self.n_landmarks = check_count(n_landmarks, "n_landmarks", 0, allow_none=True)
        self._given = {
            "landmarks": None if landmarks is None else np.asarray(landmarks, dtype=np.float64),
            "gp_type": gp_type,
            "ls": None if ls is None else check_positive(ls, "ls"),
            "nn_distances": None if nn_distances is None else np.asarray(nn_distances, dtype=np.float64),
        }
        for key, value in self._given.items():
            setattr(self, key, value)
        self.ls_factor = check_positive(ls_factor, "ls_factor")
        self.mu = float(mu)
        self.sigma = check_positive(sigma, "sigma", allow_zero=True)
        self.jitter = check_positive(jitter, "jitter")
        self.predictor_with_uncertainty = bool(predictor_with_uncertainty)
        self.obs_variance = bool(obs_variance)
        self.random_state = random_state
        self.nn_float32 = bool(nn_float32)
        self.predict: FunctionPredictor | None = None

    @with_x64
    def fit(self, x: Any, y: Any) -> "FunctionEstimator":
        """Fit to cells ``x`` (n, D) and targets ``y`` (n,) or (n, G); returns self.

        ``y`` may be any array that slices by rows (numpy, dask, zarr, h5py, scipy
        sparse); it is read one chunk of cells at a time in landmark mode.
        """
        x = as_cell_states(x, "x")
        n, dim = x.shape
        y, one_d = as_expression(y, n, "y")
        given = self._given
        self.landmarks = None if given["landmarks"] is None else check_landmarks(given["landmarks"], dim)
        if given["ls"] is not None:
            self.ls = given["ls"]
        else:
            nn = given["nn_distances"]
            self.nn_distances = nn_distances(x, float32=self.nn_float32) if nn is None else nn
            self.ls = check_positive(dp.length_scale(self.nn_distances, self.ls_factor, self.nn_float32), "ls")
        self.gp_type, self.landmarks = resolve_inducing(
            x, self.n_landmarks, self.landmarks, given["gp_type"], self.random_state
        )
        self.n_obs = n
        if self.gp_type == "full":
            self.predict = FunctionPredictor(self._fit_full(x, y, one_d))
        else:
            state, kept = self._fit_landmarks(x, y, one_d)
            self.predict = FunctionPredictor(state, kept)
            if kept is not None:
                shared.keep_projections(state.lp, kept)
        return self

    def fit_predict(self, x: Any, y: Any) -> np.ndarray:
        """Fit and return the posterior mean at the training cells."""
        return self.fit(x, y).predict(x)

    @property
    def _noise(self) -> float:
        return max(self.sigma**2, self.jitter)

    def _fit_landmarks(self, x: np.ndarray, y: Any, one_d: bool) -> tuple[FunctionState, KeptProjections | None]:
        u, ls, mu = np.asarray(self.landmarks), self.ls, self.mu
        in_cells = self._in_cell_basis(len(u), len(x), 1 if one_d else y.shape[1])
        lp = shared.prior_factor(u, ls, self.jitter, keep_kernel=in_cells)
        if in_cells:
            r = np.array(read_rows(y, slice(0, len(x))), dtype=np.float64, order="F")
            r -= mu
            rows = point_rows(x, u)
            if rows is not None:  # cells that are landmarks (Kompot's default up to 5,000 cells)
                basis = cb.fit_at_landmarks(shared.inducing_kernel(u, lp, ls), shared.scaled_inverse(lp, self.jitter),
                                            rows, r, self._noise, self.jitter, x)
            else:
                basis = cb.fit(lp, _kernel_block(u, x, ls), r, self._noise, self.jitter, x)
            return FunctionState(u, None, lp, None, mu, ls, len(x), one_d, jitter=float(self.jitter),
                                 cell_basis=basis), None
        lazy = reads_lazily(y)
        chunks = [
            FunctionChunk(x[sl], RowBlock(y, sl))
            for sl in row_slices(len(x), len(u), like=y)
        ]
        # In-memory targets are summed here: shipping them to workers would copy them.
        with open_reducer(chunks, "function", local=not lazy) as reducer:
            prior = reducer.share(FunctionPrior(u, lp, float(ls), float(mu)))
            # The training cells' A = Lp⁻¹ K_UX, kept for the variances at these cells when
            # the sums run here and it fits the factor_rows_bytes option.
            kept = reserve(8 * len(u) * len(x)) if isinstance(reducer, LocalChunks) else None
            aat, a_r = reducer.reduce(projected_stats, prior, kept)
            lb = post.noise_factor(aat, self._noise, "I + A A^T / sigma^2")
            weights = post.landmark_weights(lp, lb, a_r, self._noise)
            state = FunctionState(u, weights, lp, lb, mu, ls, len(x), one_d, jitter=float(self.jitter))
            if not self.obs_variance:
                return state, kept
            lm = np.asarray(la.checked(fk.leverage_factor(lp, aat, self.sigma**2, self.jitter), "the leverage matrix"))
            (cross_var,) = reducer.reduce(residual_cross, prior, lm, weights)
        obs_w = post.landmark_weights(lp, lb, cross_var, self._noise)
        return state._replace(leverage_factor=lm, obs_weights=obs_w), kept

    def _in_cell_basis(self, m: int, c: int, g: int) -> bool:
        """Fit in the cells' basis when that takes fewer operations (fewer cells than
        landmarks, roughly; :func:`~kompot_dask.kernels.cell_basis.fit_flops`). It reads the
        targets into this process (``c × G``, no more than the ``M × G`` weights), so it is
        also the way for lazy targets then. The observation-variance surface needs the
        landmark form's ``A Aᵀ``."""
        if self.obs_variance:
            return False
        landmark, cell = cb.fit_flops(m, c, g)
        return cell < landmark

    def _fit_full(self, x: np.ndarray, y: Any, one_d: bool) -> FunctionState:
        ls, mu = self.ls, self.mu
        yy = read_rows(y, slice(0, len(x)))
        lf = post.cholesky_lower(_shifted_kernel(x, ls, self._noise), "K_XX + sigma^2 I")
        weights = post.solve_lower_t(lf, post.solve_lower(lf, yy - mu, overwrite=True), overwrite=True)
        state = FunctionState(x, weights, lf, None, mu, ls, len(x), one_d)
        if not self.obs_variance:
            return state
        h = fk.full_training_leverage(x, ls, self.sigma**2, self.jitter)
        fitted = fk.predict_mean(x, x, weights, mu, ls)
        e2 = np.asarray(fk.hc3_squared_residuals(yy, fitted, h))
        lv = post.cholesky_lower(_shifted_kernel(x, ls, self.sigma**2 + self.jitter), "K_XX + (sigma^2 + jitter) I")
        obs_w = post.solve_lower_t(lv, post.solve_lower(lv, e2), overwrite=True)
        return state._replace(train_leverage=np.asarray(h), obs_weights=obs_w)


def _kernel_block(a: np.ndarray, b: np.ndarray, ls: float) -> np.ndarray:
    """``K(a, b)`` as a writable Fortran-ordered numpy array (LAPACK's right-hand-side
    layout): ``K(b, a)`` copied out of JAX as it lies, seen transposed (no transposing copy)."""
    return np.array(cov.matern52(b, a, ls)).T


def same_points(x: np.ndarray, inducing: np.ndarray) -> bool:
    """Whether the cells ``x`` are the points ``inducing`` themselves, in the same order."""
    return x.shape == inducing.shape and np.array_equal(x, inducing)


def point_rows(x: np.ndarray, points: np.ndarray | None) -> np.ndarray | None:
    """For every cell of ``x``, the row of ``points`` with the very same coordinates, or None
    unless every cell has one (as when the landmarks are all the cells, Kompot's default
    for at most 5,000 cells, or the distances are evaluated at the cells themselves)."""
    if points is None or len(x) > len(points) or x.shape[1:] != points.shape[1:]:
        return None
    if x is points:
        return np.arange(len(x))
    index = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(points, dtype=np.float64))}
    rows = np.fromiter((index.get(row.tobytes(), -1) for row in np.ascontiguousarray(x, dtype=np.float64)),
                       dtype=np.intp, count=len(x))
    return None if (rows < 0).any() else rows


def _shifted_kernel(x: np.ndarray, ls: float, shift: float) -> np.ndarray:
    """``K_XX + shift I`` as a writable numpy array."""
    k = np.array(cov.matern52(x, x, ls))
    k[np.diag_indices_from(k)] += shift
    return k
