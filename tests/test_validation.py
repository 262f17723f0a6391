"""Bad input is rejected before any work, with a message that names the fix."""

from __future__ import annotations

import numpy as np
import pytest

import kompot_dask as kd
from kompot_dask.kernels import density_params as dp


@pytest.fixture()
def cells():
    return np.random.default_rng(1).normal(size=(60, 3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_cell_states(cells, bad):
    cells[5, 1] = bad
    with pytest.raises(ValueError, match=r"NaN/inf.*first rows: \[5\]"):
        kd.DensityEstimator().fit(cells)
    with pytest.raises(ValueError, match="NaN/inf"):
        kd.FunctionEstimator(sigma=1.0).fit(cells, np.ones(60))


def test_non_finite_expression(cells):
    y = np.ones((60, 4))
    y[10, 2] = np.nan
    with pytest.raises(ValueError, match=r"`y` contains NaN/inf values \(cells \[10\]"):
        kd.FunctionEstimator(sigma=1.0, landmarks=cells[:10], gp_type="fixed").fit(cells, y)
    with pytest.raises(ValueError, match="`y` contains NaN/inf"):
        kd.FunctionEstimator(sigma=1.0).fit(cells, y)


def test_shapes(cells):
    with pytest.raises(ValueError, match="2-D array of cell states"):
        kd.DensityEstimator().fit(cells[:, 0])
    with pytest.raises(ValueError, match="`y` has 59 rows but the cell states have 60"):
        kd.FunctionEstimator().fit(cells, np.ones((59, 2)))
    with pytest.raises(ValueError, match=r"\(n_cells,\) or \(n_cells, n_genes\)"):
        kd.FunctionEstimator().fit(cells, np.ones((60, 2, 2)))
    est = kd.DensityEstimator().fit(cells)
    with pytest.raises(ValueError, match="has 2 features but the model was fitted on 3"):
        est.predict(cells[:, :2])


def test_too_few_cells():
    with pytest.raises(ValueError, match="1 cell.*at least 2"):
        kd.DensityEstimator().fit(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        kd.FunctionEstimator().fit(np.zeros((1, 3)), np.zeros(1))


def test_dimension_above_50(cells):
    with pytest.raises(ValueError, match="d=60 exceeds 50.*low-dimensional"):
        kd.DensityEstimator(d=60)
    wide = np.random.default_rng(2).normal(size=(80, 55))
    with pytest.raises(ValueError, match="exceeds 50"):
        kd.DensityEstimator(d_method="embedding").fit(wide)


def test_landmarks_of_wrong_dimension(cells):
    with pytest.raises(ValueError, match=r"`landmarks` must have shape \(n_landmarks, 3\).*got \(5, 2\)"):
        kd.DensityEstimator(landmarks=np.zeros((5, 2))).fit(cells)
    with pytest.raises(ValueError, match=r"shape \(n_landmarks, 3\)"):
        kd.FunctionEstimator(landmarks=np.zeros((5, 4))).fit(cells, np.ones(60))


@pytest.mark.parametrize("ls", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_length_scale(ls):
    with pytest.raises(ValueError, match="`ls` must be a finite positive number"):
        kd.DensityEstimator(ls=ls)
    with pytest.raises(ValueError, match="`ls` must be a finite positive number"):
        kd.FunctionEstimator(ls=ls)


def test_negative_sigma():
    with pytest.raises(ValueError, match="`sigma` must be a finite non-negative number"):
        kd.FunctionEstimator(sigma=-0.1)


def test_unknown_gp_type_and_method(cells):
    with pytest.raises(ValueError, match="unknown gp_type"):
        kd.DensityEstimator(gp_type="banana").fit(cells)
    with pytest.raises(NotImplementedError, match="Nystroem"):
        kd.DensityEstimator(gp_type="full_nystroem").fit(cells)
    with pytest.raises(ValueError, match="unknown d_method"):
        kd.DensityEstimator(d_method="pca")


def test_duplicated_cells_take_the_smallest_positive_distance(cells):
    x = np.vstack([cells, cells[:3]])  # three exact duplicates
    est = kd.DensityEstimator(nn_float32=False).fit(x)
    from scipy.spatial.distance import cdist

    dist = cdist(x, x)
    np.fill_diagonal(dist, np.inf)
    raw = dist.min(axis=1)
    assert np.sum(raw == 0) == 6
    expected = np.where(raw > 0, raw, raw[raw > 0].min())
    np.testing.assert_allclose(est.nn_distances, expected, rtol=1e-12)
    assert np.all(np.isfinite(est.predict(x)))


def test_all_cells_identical():
    with pytest.raises(ValueError, match="all cells identical"):
        kd.DensityEstimator().fit(np.ones((10, 2)))
    with pytest.raises(ValueError, match="all cells identical"):
        dp.validate_nn_distances(np.zeros(4))


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown option 'chunk_size'"):
        kd.set_options(chunk_size=3)
    with pytest.raises(ValueError, match="'cell_chunk_size' must be None or a positive int"):
        kd.set_options(cell_chunk_size=0)
