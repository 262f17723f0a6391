"""Inputs users actually have: pandas labels, every scipy sparse format, odd dtypes and counts.

Each either works (with the same numbers as the plain numpy input) or is rejected with a
message that names the argument and the fix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import kompot_dask as kd
from kompot_dask import (
    DensityEstimator,
    DifferentialAbundance,
    DifferentialExpression,
    FunctionEstimator,
    SampleVarianceEstimator,
)
from kompot_dask.estimators._inputs import as_expression
from kompot_dask.testing import two_conditions


@pytest.fixture(scope="module")
def data():
    return two_conditions(n_cells=160, n_genes=4, n_samples=3, dims=3, seed=3)


@pytest.fixture(scope="module")
def landmarks(data):
    return np.vstack([data.x1, data.x2])[::10]


# --------------------------------------------------------------------------- labels

MISSING_AT = [1, 4, 6]


def _with_missing(values: list, missing) -> list:
    out = list(values)
    for i in MISSING_AT:
        out[i] = missing
    return out


# Each maker turns a list of str labels (None where missing) into the container users have.
LABEL_CONTAINERS = {
    "categorical": lambda v: pd.Categorical(v),
    "series_shuffled_index": lambda v: pd.Series(v, index=np.arange(len(v))[::-1] + 1000),
    "series_categorical": lambda v: pd.Series(v, dtype="category", index=[f"cell{i}" for i in range(len(v))]),
    "series_string_dtype": lambda v: pd.Series(v, dtype="string"),
    "object_array": lambda v: np.asarray(v, dtype=object),
}

MISSING_VALUES = {"None": None, "np.nan": np.nan, "pd.NA": pd.NA}


def _missing_message(name: str) -> str:
    return rf"`{name}` has 3 missing label\(s\) \(first cells: \[1, 4, 6\]\); give every cell a sample label or drop those cells"


def _sve_fit(data, landmarks, labels):
    kwargs = dict(landmarks=landmarks, gp_type="fixed", ls=3.0, sigma=1.0)
    return SampleVarianceEstimator().fit(data.x1, data.y1, grouping_vector=labels, estimator_kwargs=kwargs)


@pytest.fixture(scope="module")
def sve_reference(data, landmarks):
    sve = _sve_fit(data, landmarks, np.asarray(data.samples1, dtype=str))
    return list(sve.group_predictors), sve.predict(data.x1[:20], diag=True)


@pytest.mark.parametrize("container", list(LABEL_CONTAINERS))
def test_label_containers_work_and_missing_labels_are_named(data, landmarks, sve_reference, container):
    make = LABEL_CONTAINERS[container]
    clean = list(data.samples1)
    sve = _sve_fit(data, landmarks, make(clean))
    groups, variance = sve_reference
    assert list(sve.group_predictors) == groups
    assert all(isinstance(g, str) for g in sve.group_predictors)
    np.testing.assert_array_equal(sve.predict(data.x1[:20], diag=True), variance)

    missing = make(_with_missing(clean, None))
    with pytest.raises(ValueError, match=_missing_message("grouping_vector")):
        _sve_fit(data, landmarks, missing)


@pytest.mark.parametrize("missing", list(MISSING_VALUES))
@pytest.mark.parametrize("where", ["da1", "da2", "de1", "de2", "sve"])
def test_missing_labels_get_a_clear_error_everywhere(data, landmarks, missing, where):
    value = MISSING_VALUES[missing]
    n1, n2 = len(data.x1), len(data.x2)
    good1, good2 = np.asarray(data.samples1, dtype=object), np.asarray(data.samples2, dtype=object)
    bad1 = np.asarray(_with_missing(list(good1), value), dtype=object)
    bad2 = np.asarray(_with_missing(list(good2), value), dtype=object)
    assert len(bad1) == n1 and len(bad2) == n2
    if where == "sve":
        with pytest.raises(ValueError, match=_missing_message("grouping_vector")):
            _sve_fit(data, landmarks, bad1)
        return
    c = int(where[-1])
    labels = dict(condition1_sample_indices=bad1 if c == 1 else good1,
                  condition2_sample_indices=bad2 if c == 2 else good2)
    with pytest.raises(ValueError, match=_missing_message(f"condition{c}_sample_indices")):
        if where.startswith("da"):
            DifferentialAbundance().fit(data.x1, data.x2, landmarks=landmarks, **labels)
        else:
            DifferentialExpression().fit(data.x1, data.y1, data.x2, data.y2, landmarks=landmarks, **labels)


def test_categorical_missing_code_and_float_nan_labels(data, landmarks):
    codes = np.zeros(len(data.x1), dtype=int)
    codes[1::2] = 1
    codes[MISSING_AT] = -1  # pandas' code for a missing category
    labels = pd.Categorical.from_codes(codes, categories=["a", "b"])
    with pytest.raises(ValueError, match=_missing_message("condition1_sample_indices")):
        DifferentialAbundance().fit(data.x1, data.x2, landmarks=landmarks, condition1_sample_indices=labels)
    numeric = pd.Series(codes.astype(float)).where(codes >= 0)  # integer sample ids with NaN holes
    with pytest.raises(ValueError, match=_missing_message("condition2_sample_indices")):
        DifferentialExpression().fit(data.x2, data.y2, data.x1, data.y1, landmarks=landmarks,
                                     condition2_sample_indices=numeric)


def test_mixed_int_and_str_labels_are_an_error_not_a_merge(data, landmarks):
    labels = np.asarray([1 if s.endswith("0") else s for s in data.samples1], dtype=object)
    with pytest.raises(ValueError, match=r"`grouping_vector` mixes label types.*\(int, str\).*astype\(str\)"):
        _sve_fit(data, landmarks, labels)
    with pytest.raises(ValueError, match=r"`condition1_sample_indices` mixes label types"):
        DifferentialAbundance().fit(data.x1, data.x2, landmarks=landmarks, condition1_sample_indices=labels)
    # the fix the message gives works
    sve = _sve_fit(data, landmarks, labels.astype(str))
    assert sorted(sve.group_predictors) == ["1", "c1-s1", "c1-s2"]


def test_de_series_labels_are_positional(data, landmarks):
    """A Series with a shuffled index is read by position (never aligned on the index)."""
    n1, n2 = len(data.x1), len(data.x2)
    s1 = pd.Series(data.samples1, index=np.random.default_rng(0).permutation(n1))
    s2 = pd.Series(pd.Categorical(data.samples2), index=[f"c{i}" for i in range(n2)][::-1])

    def fit_predict(l1, l2):
        de = DifferentialExpression().fit(data.x1, data.y1, data.x2, data.y2, landmarks=landmarks, ls=3.0,
                                          condition1_sample_indices=l1, condition2_sample_indices=l2)
        return de.predict(data.x1[:15])

    expected = fit_predict(np.asarray(data.samples1, dtype=str), np.asarray(data.samples2, dtype=str))
    got = fit_predict(s1, s2)
    for key in ("fold_change", "fold_change_zscores", "condition1_std"):
        np.testing.assert_array_equal(got[key], expected[key])
    # a missing label is reported at its position, not at its index label
    s1_missing = s1.copy()
    s1_missing.iloc[MISSING_AT] = None
    with pytest.raises(ValueError, match=_missing_message("condition1_sample_indices")):
        DifferentialExpression().fit(data.x1, data.y1, data.x2, data.y2, landmarks=landmarks,
                                     condition1_sample_indices=s1_missing)


# --------------------------------------------------------------------------- sparse expression

CONVERTED_FORMATS = [f"{fmt}_{kind}" for fmt in ("coo", "bsr", "dia", "lil", "dok") for kind in ("matrix", "array")]


def _sparse(y: np.ndarray, cls: str):
    return getattr(sp, cls)(y)


def _sparse_counts(data) -> np.ndarray:
    y = np.round(data.y1).astype(np.float64)
    y[y < 2] = 0.0  # mostly zeros, as counts are
    return y


@pytest.mark.parametrize("cls", CONVERTED_FORMATS)
def test_every_sparse_format_gives_the_dense_numbers(data, landmarks, cls):
    y = _sparse_counts(data)
    ys = _sparse(y, cls)
    converted, one_d = as_expression(ys, len(y), "y")
    assert converted.format == "csr" and not one_d
    est = dict(landmarks=landmarks, gp_type="fixed", ls=3.0, sigma=0.5, obs_variance=True)
    with kd.set_options(cell_chunk_size=25):  # several row chunks, so rows are really sliced
        dense = FunctionEstimator(**est).fit(data.x1, y).predict
        sparse = FunctionEstimator(**est).fit(data.x1, ys).predict
    np.testing.assert_allclose(sparse(data.x2), dense(data.x2), rtol=1e-13, atol=0)
    np.testing.assert_allclose(sparse.obs_variance(data.x2), dense.obs_variance(data.x2), rtol=1e-13, atol=0)


def test_de_with_sparse_expression_matches_dense(data, landmarks):
    y1, y2 = _sparse_counts(data), np.round(data.y2)
    for cls in ("csr_matrix", "csc_array"):  # CSR and CSC are kept as they are
        ys = _sparse(y1, cls)
        assert as_expression(ys, len(y1))[0] is ys

    def fit_predict(a, b):
        de = DifferentialExpression().fit(data.x1, a, data.x2, b, landmarks=landmarks, ls=3.0,
                                          condition1_sample_indices=data.samples1,
                                          condition2_sample_indices=data.samples2)
        return de.predict(data.x1[:30], compute_mahalanobis=True)

    expected = fit_predict(y1, y2)
    for cls1, cls2 in (("coo_matrix", "dia_array"), ("csc_matrix", "bsr_array")):
        got = fit_predict(_sparse(y1, cls1), _sparse(y2, cls2))
        for key in ("condition1_imputed", "fold_change", "fold_change_zscores", "mahalanobis_distances"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, atol=0, err_msg=f"{cls1}/{cls2} {key}")


# --------------------------------------------------------------------------- dtypes

def test_complex_values_are_rejected_and_int_bool_still_work(data, landmarks):
    x, y = data.x1, data.y1
    est = dict(landmarks=landmarks, gp_type="fixed", ls=3.0, sigma=0.5)
    for bad in (y.astype(np.complex128), sp.csr_matrix(y.astype(np.complex64)), (y + 0j).tolist()):
        with pytest.raises(ValueError, match=r"`y` has complex dtype complex.*must be real.*np\.real\(y\)"):
            FunctionEstimator(**est).fit(x, bad)
    with pytest.raises(ValueError, match=r"`y_condition2` has complex dtype"):
        DifferentialExpression().fit(x, y, data.x2, data.y2 * (1 + 1j), landmarks=landmarks)
    with pytest.raises(ValueError, match=r"`x` has complex dtype complex128; cell states must be real"):
        FunctionEstimator(**est).fit(x + 0j, y)
    with pytest.raises(ValueError, match=r"`x` has complex dtype"):
        DensityEstimator(landmarks=landmarks, gp_type="fixed").fit(x.astype(np.complex128))
    with pytest.raises(ValueError, match=r"`X_condition1` has complex dtype"):
        DifferentialAbundance().fit(x + 1j, data.x2, landmarks=landmarks)
    # integer and boolean inputs are read as float64
    counts = np.round(y).astype(np.int64)
    reference = FunctionEstimator(**est).fit(x, counts.astype(np.float64)).predict(data.x2)
    for ints in (counts, counts.astype(np.int32), sp.csr_matrix(counts.astype(np.int16))):
        np.testing.assert_array_equal(FunctionEstimator(**est).fit(x, ints).predict(data.x2), reference)
    flags = counts > 2
    np.testing.assert_array_equal(FunctionEstimator(**est).fit(x, flags).predict(data.x2),
                                  FunctionEstimator(**est).fit(x, flags.astype(float)).predict(data.x2))


# --------------------------------------------------------------------------- orientation

def test_transposed_cell_states_are_caught_at_fit():
    rng = np.random.default_rng(4)
    wide = rng.normal(size=(10, 500))
    transposed = r"shape \(10, 500\): fewer rows \(cells\) than columns.*looks transposed.*\(n_cells, n_features\)"
    with pytest.raises(ValueError, match="`x` has " + transposed):
        DensityEstimator(d_method="embedding").fit(wide)  # not "d=500 exceeds 50"
    with pytest.raises(ValueError, match="`x` has " + transposed):
        FunctionEstimator(sigma=1.0).fit(wide, np.ones(10))
    with pytest.raises(ValueError, match="`X_condition1` has " + transposed):
        DifferentialAbundance().fit(wide, rng.normal(size=(60, 3)))
    with pytest.raises(ValueError, match="`X_condition2` has " + transposed):
        DifferentialExpression().fit(rng.normal(size=(60, 3)), np.ones(60), wide, np.ones(10))
    with pytest.raises(ValueError, match="`X` has " + transposed):
        SampleVarianceEstimator().fit(wide, np.ones(10), grouping_vector=np.repeat([0, 1], 5))
    # the conditions of the differential classes must have more cells than features
    with pytest.raises(ValueError, match=r"`X_condition2` has shape \(30, 40\).*looks transposed"):
        DifferentialAbundance().fit(rng.normal(size=(60, 40)), rng.normal(size=(30, 40)))
    # predicting at fewer cells than features is fine
    cells = rng.normal(size=(60, 3))
    est = FunctionEstimator(sigma=1.0, landmarks=cells[::6], gp_type="fixed", ls=2.0).fit(cells, cells[:, 0])
    assert est.predict(cells[:2]).shape == (2,)
    # so is an estimator fitted on a small replicate in a low-dimensional embedding (as the
    # per-sample fits of sample variance are): only wide (> 50 columns) matrices are suspect there
    small = rng.normal(size=(4, 6))
    assert FunctionEstimator(sigma=1.0, ls=2.0).fit(small, small[:, 0]).predict(small).shape == (4,)


# --------------------------------------------------------------------------- counts

COUNT_OWNERS = {
    "DifferentialAbundance": DifferentialAbundance,
    "DifferentialExpression": DifferentialExpression,
    "DensityEstimator": DensityEstimator,
    "FunctionEstimator": FunctionEstimator,
}


@pytest.mark.parametrize("owner", list(COUNT_OWNERS))
def test_n_landmarks_must_be_a_whole_number(owner):
    cls = COUNT_OWNERS[owner]
    for bad in (30.7, 30.0, "30"):
        with pytest.raises(ValueError, match=r"`n_landmarks` must be an int >= 0 or None; got .*whole number"):
            cls(n_landmarks=bad)
    for bad in (True, False, np.bool_(True)):
        with pytest.raises(ValueError, match=r"`n_landmarks` must be an int >= 0 or None; got the bool"):
            cls(n_landmarks=bad)
    with pytest.raises(ValueError, match=r"`n_landmarks` must be an int >= 0 or None; got -1"):
        cls(n_landmarks=-1)
    ok = cls(n_landmarks=np.int64(30))
    assert ok.n_landmarks == 30 and type(ok.n_landmarks) is int
    assert cls(n_landmarks=None).n_landmarks is None


@pytest.mark.parametrize("owner", ["DifferentialAbundance", "DifferentialExpression"])
def test_batch_size_must_be_a_whole_number(owner):
    cls = COUNT_OWNERS[owner]
    for bad in (30.7, True, np.bool_(False), 0, -5):
        with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1"):
            cls(batch_size=bad)
    ok = cls(batch_size=np.int32(7))
    assert ok.batch_size == 7 and type(ok.batch_size) is int


def test_check_count():
    from kompot_dask.estimators._inputs import check_count

    assert check_count(np.uint8(3), "k", 1) == 3
    assert check_count(None, "k", allow_none=True) is None
    with pytest.raises(ValueError, match=r"`k` must be an int >= 1; got None"):
        check_count(None, "k", 1)
    with pytest.raises(ValueError, match=r"`k` must be an int >= 1; got 2.5 \(float\)"):
        check_count(2.5, "k", 1)


# --------------------------------------------------------------------------- options

INT_OPTIONS = ["cell_chunk_size", "worker_memory_target", "chunk_memory_bytes", "gene_batch_size"]


@pytest.mark.parametrize("key", INT_OPTIONS)
def test_int_options_take_numpy_integers(key):
    before = kd.get_options()[key]
    for value in (np.int64(5), np.int32(5), np.uint16(5)):
        with kd.set_options(**{key: value}):
            stored = kd.get_options()[key]
            assert stored == 5 and type(stored) is int
    assert kd.get_options()[key] == before
    for bad in (True, np.bool_(True), 5.5, 5.0, np.float64(5.0), 0, np.int64(0), -3, np.int64(-3), "5"):
        with pytest.raises(ValueError, match=rf"option '{key}' must be .*a positive int"):
            kd.set_options(**{key: bad})
    assert kd.get_options()[key] == before


def test_factor_rows_bytes_takes_zero_and_positive_integers_only():
    before = kd.get_options()["factor_rows_bytes"]
    for value, stored in ((0, 0), (np.int64(0), 0), (np.uint16(7), 7), (2**31, 2**31)):
        with kd.set_options(factor_rows_bytes=value):
            got = kd.get_options()["factor_rows_bytes"]
            assert got == stored and type(got) is int
    for bad in (True, False, np.bool_(False), 0.0, 5.0, -1, np.int64(-1), "5", None):
        with pytest.raises(ValueError, match=r"option 'factor_rows_bytes' must be a non-negative int"):
            kd.set_options(factor_rows_bytes=bad)
    assert kd.get_options()["factor_rows_bytes"] == before
