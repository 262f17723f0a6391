"""Gene-level FDR from null genes (SPEC §6.7) against the reference case ``fdr.npz``."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pytest

from kompot_dask.fdr import compute_fdr, summarize_fdr
from kompot_dask.kernels.fdr import (
    compute_fdr_arrays,
    empirical_pvalues,
    grenander_fdr,
    monotone_density,
    pava_decreasing,
)

DATA = pathlib.Path(__file__).parent / "data"
FDR_ATOL, FDR_RTOL = 1e-10, 1e-9  # reference README §3: KDE sums


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "fdr.npz", allow_pickle=False) as z:
        return {key: z[key] for key in z.files}


@pytest.fixture(scope="module")
def table(ref):
    return compute_fdr(
        ref["in_real_mahalanobis"], ref["in_null_mahalanobis"], float(ref["param_threshold"])
    )


def assert_fdr_close(actual, expected):
    np.testing.assert_allclose(actual, expected, atol=FDR_ATOL, rtol=FDR_RTOL)


# --- parity with the reference -------------------------------------------------------


def test_columns(ref, table):
    assert list(table.columns) == ref["out_columns"].tolist()
    assert table.index.equals(pd.RangeIndex(ref["out_pvalue"].size))


def test_main_case(ref, table):
    np.testing.assert_array_equal(table["mahalanobis"].to_numpy(), ref["out_mahalanobis"])
    np.testing.assert_array_equal(table["pvalue"].to_numpy(), ref["out_pvalue"])
    assert_fdr_close(table["local_fdr"].to_numpy(), ref["out_local_fdr"])
    assert_fdr_close(table["tail_fdr"].to_numpy(), ref["out_tail_fdr"])
    np.testing.assert_array_equal(table["is_de"].to_numpy(), ref["out_is_de"])
    assert table["is_de"].dtype == bool


def test_debug_grids(ref):
    fdr = grenander_fdr(ref["in_real_mahalanobis"], ref["in_null_mahalanobis"])
    for name in ("grid", "f0", "fmix", "local_fdr_grid", "tail_fdr_grid"):
        assert_fdr_close(getattr(fdr, name), ref[f"out_debug_{name}"])


def test_threshold_0_2(ref):
    arrays = compute_fdr_arrays(ref["in_real_mahalanobis"], ref["in_null_mahalanobis"], 0.2)
    np.testing.assert_array_equal(arrays.is_de, ref["out_is_de_threshold_0.2"])


@pytest.mark.parametrize("case", ["ties", "degenerate"])
def test_sub_cases(ref, case):
    arrays = compute_fdr_arrays(
        ref[f"in_{case}_real_mahalanobis"], ref[f"in_{case}_null_mahalanobis"]
    )
    np.testing.assert_array_equal(arrays.pvalue, ref[f"out_{case}_pvalue"])
    assert_fdr_close(arrays.local_fdr, ref[f"out_{case}_local_fdr"])
    assert_fdr_close(arrays.tail_fdr, ref[f"out_{case}_tail_fdr"])
    np.testing.assert_array_equal(arrays.is_de, ref[f"out_{case}_is_de"])


# --- building blocks -----------------------------------------------------------------


def test_pvalues_count_ties_and_floor_zeros():
    null = np.array([1.0, 2.0, 2.0, 3.0])
    p = empirical_pvalues(np.array([2.0, 0.5, 5.0, 3.0]), null)
    np.testing.assert_array_equal(p, [0.75, 1.0, 0.25, 0.25])  # 5.0 floored to min real p
    np.testing.assert_array_equal(empirical_pvalues(np.array([9.0, 8.0]), null), [0.25, 0.25])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pava_properties(seed):
    y = np.random.default_rng(seed).normal(size=200) + np.linspace(1.0, -1.0, 200)
    fit = pava_decreasing(y)
    assert fit.shape == y.shape
    assert np.all(np.diff(fit) <= 0.0)
    # each pooled block holds the mean of the values it covers
    starts = np.flatnonzero(np.r_[True, np.diff(fit) != 0.0])
    for lo, hi in zip(starts, np.r_[starts[1:], y.size]):
        assert fit[lo] == pytest.approx(y[lo:hi].mean(), rel=1e-12, abs=1e-12)
    assert fit.sum() == pytest.approx(y.sum(), rel=1e-12)


def test_pava_keeps_monotone_input_and_pools_violators():
    y = np.array([5.0, 4.0, 4.0, 1.0, -2.0])
    np.testing.assert_array_equal(pava_decreasing(y), y)
    np.testing.assert_allclose(pava_decreasing(np.array([1.0, 3.0, 2.0, 0.0])), [2, 2, 2, 0])
    assert pava_decreasing(np.array([])).shape == (0,)


def test_monotone_density_is_normalised_and_non_increasing():
    sample = np.abs(np.random.default_rng(3).normal(size=300))
    grid = np.linspace(0.0, 4.0, 500)
    density = monotone_density(sample, grid)
    assert np.all(density >= 0.0) and np.all(np.diff(density) <= 0.0)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, rel=1e-12)


def test_histogram_fallback_when_kde_fails():
    grid = np.linspace(0.0, 3.0, 500)
    density = monotone_density(np.zeros(4), grid)  # singular KDE -> 500-bin histogram
    assert density[0] > 0.0 and np.all(density[1:] == 0.0)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, rel=1e-12)


def test_all_zero_distances_give_fdr_one():
    arrays = compute_fdr_arrays(np.zeros(5), np.zeros(7))
    np.testing.assert_array_equal(arrays.local_fdr, 1.0)
    np.testing.assert_array_equal(arrays.tail_fdr, 1.0)
    assert not arrays.is_de.any()


# --- inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.1])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        compute_fdr(np.ones(3), np.ones(3), threshold=threshold)


@pytest.mark.parametrize("null", [np.array([]), np.array([np.nan, np.nan])])
def test_empty_null(null):
    with pytest.raises(ValueError, match="null distribution is empty"):
        compute_fdr(np.ones(3), null)


def test_gene_names_length_mismatch():
    with pytest.raises(ValueError, match="gene_names"):
        compute_fdr(np.ones(3), np.ones(3), gene_names=["a", "b"])


def test_nan_real_distances(ref):
    real = ref["in_real_mahalanobis"].copy()
    failed = np.array([3, 77, 250])
    real[failed] = np.nan
    null = np.r_[ref["in_null_mahalanobis"], np.nan]  # NaN nulls are dropped
    names = [f"g{i}" for i in range(real.size)]
    table = compute_fdr(real, null, gene_names=names)
    assert list(table.index) == names
    assert table.iloc[failed][["pvalue", "local_fdr", "tail_fdr"]].isna().all().all()
    assert not table["is_de"].iloc[failed].any()
    # the other genes equal a run without the failed genes at all
    keep = np.setdiff1d(np.arange(real.size), failed)
    clean = compute_fdr_arrays(real[keep], ref["in_null_mahalanobis"])
    np.testing.assert_array_equal(table["pvalue"].to_numpy()[keep], clean.pvalue)
    np.testing.assert_array_equal(table["local_fdr"].to_numpy()[keep], clean.local_fdr)
    np.testing.assert_array_equal(table["tail_fdr"].to_numpy()[keep], clean.tail_fdr)


def test_summary(ref, table):
    summary = summarize_fdr(table, 0.05)
    n_de = int(ref["out_is_de"].sum())
    assert summary["n_significant"] == n_de == 83
    assert summary["n_total"] == 500
    assert summary["fraction_significant"] == pytest.approx(n_de / 500)
    assert summary["fdr_threshold"] == 0.05
    expected_min = ref["out_mahalanobis"][ref["out_is_de"]].min()
    assert summary["min_significant_mahalanobis"] == expected_min
    none = summarize_fdr(compute_fdr(np.array([1.0, 2.0]), np.array([3.0])), 0.05)
    assert none["n_significant"] == 0 and none["min_significant_mahalanobis"] == np.inf
