"""What every predictor shares: query checks and chunked evaluation over query cells."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._inputs import as_cell_states
from ..execution.plan import row_slices


class ChunkedPredictor:
    """Base of the predictors: ``state`` is a NamedTuple with ``inducing`` and ``n_obs``.

    ``kept``: the fit's :class:`~._kept_projections.KeptProjections` of its training cells,
    held in the fitting process only (not pickled: a copy predicts by solving).
    """

    def __init__(self, state, kept=None):
        self.state = state
        self.kept = kept

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["kept"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("kept", None)  # pickled before predictors held kept projections
        self.__dict__.update(state)

    @property
    def n_obs(self) -> int:
        """Number of training cells."""
        return self.state.n_obs

    def _query(self, x: Any) -> np.ndarray:
        x = as_cell_states(x, "x", min_cells=1)
        fitted = self.state.inducing.shape[1]
        if x.shape[1] != fitted:
            raise ValueError(f"`x` has {x.shape[1]} features but the model was fitted on {fitted}")
        return x

    def _by_chunks(self, x: np.ndarray, fn: Callable[[np.ndarray], Any]) -> np.ndarray:
        """Concatenate ``fn`` over chunks of query cells sized for landmark-wide blocks."""
        return np.concatenate([np.asarray(fn(x[sl])) for sl in row_slices(len(x), len(self.state.inducing))])
