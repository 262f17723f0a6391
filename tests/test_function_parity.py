"""FunctionEstimator against the reference case (reference README §3 tolerances)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import kompot_dask as kd


def _fit(case, **kw):
    return kd.FunctionEstimator(
        landmarks=case["in_landmarks"], gp_type="fixed", sigma=float(case["param_sigma"]), **kw
    ).fit(case["in_X"], case["in_Y"])


@pytest.mark.parametrize("ls_source", ["injected", "own nn distances"])
def test_function_landmarks(function_landmarks, ls_source):
    case = function_landmarks
    if ls_source == "injected":
        est = _fit(case, ls=float(case["out_ls"]))
        atol, rtol = 1e-10, 1e-8
    else:
        est = _fit(case, ls_factor=float(case["param_ls_factor"]))
        assert_close(est.nn_distances, case["out_nn_distances"], rtol=2e-7, what="nn")
        atol, rtol = 1e-6, 1e-5
    assert_close(est.ls, case["out_ls"], rtol=1e-6, what="ls")
    p = est.predict
    assert_close(p.state.lp, case["out_Lp"], atol=1e-10, what="Lp")
    x, xq, u = case["in_X"], case["in_X_query"], case["in_landmarks"]
    assert_close(p(xq), case["out_mean_query"], atol=atol, rtol=rtol, what="mean query")
    assert_close(p(x[:200]), case["out_mean_train_first200"], atol=atol, rtol=rtol, what="mean train")
    assert_close(p(u), case["out_mean_landmarks"], atol=atol, rtol=rtol, what="mean landmarks")
    assert_close(p.covariance(xq), case["out_covariance_diag_query"], atol=1e-9, rtol=1e-8)
    assert_close(p.covariance(x[:200]), case["out_covariance_diag_train_first200"], atol=1e-9, rtol=1e-8)
    assert_close(p.covariance(u, diag=False), case["out_covariance_full_landmarks"], atol=1e-9, rtol=1e-8)
    assert_close(p.covariance(xq[:50], diag=False), case["out_covariance_full_query_first50"], atol=1e-9, rtol=1e-8)
    std = np.sqrt(p.covariance(xq) + 1e-8)[:, None]
    assert_close(std, case["out_model_std_query"], atol=1e-9, rtol=1e-8, what="model std")


def test_gene_batches_are_column_slices(function_landmarks):
    case = function_landmarks
    p = _fit(case, ls=float(case["out_ls"])).predict
    full = p(case["in_X_query"])
    assert_close(p(case["in_X_query"], genes=slice(5, 12)), full[:, 5:12], atol=0)
    single = _fit(case, ls=float(case["out_ls"]))
    vec = kd.FunctionEstimator(landmarks=case["in_landmarks"], gp_type="fixed", sigma=1.0, ls=float(case["out_ls"]))
    vec.fit(case["in_X"], case["in_Y"][:, 3])
    out = vec.predict(case["in_X_query"])
    assert out.shape == (len(case["in_X_query"]),)
    assert_close(out, single.predict(case["in_X_query"])[:, 3], atol=1e-12)
