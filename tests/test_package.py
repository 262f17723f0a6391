"""Import hygiene: no side effects, light imports, layered modules."""

from __future__ import annotations

import subprocess
import sys

import numpy as np


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_has_no_heavy_modules_or_jax_config_change():
    out = _run(
        "import sys, jax; before = jax.config.jax_enable_x64; import kompot_dask;"
        "heavy = [m for m in ('distributed', 'anndata', 'matplotlib', 'pandas') if m in sys.modules];"
        "print(heavy, before, jax.config.jax_enable_x64)"
    )
    assert out.strip() == "[] False False"


def test_kernels_do_not_load_dask_or_xarray():
    out = _run("import sys, kompot_dask.kernels.density, kompot_dask.kernels.function;"
               "print([m for m in ('dask', 'xarray', 'zarr') if m in sys.modules])")
    assert out.strip() == "[]"


def test_fitting_leaves_global_jax_precision_alone():
    import jax

    import kompot_dask as kd

    before = jax.config.jax_enable_x64
    est = kd.DensityEstimator().fit(np.random.default_rng(0).normal(size=(50, 2)))
    assert est.predict(np.zeros((1, 2))).dtype == np.float64
    assert jax.config.jax_enable_x64 == before


def test_fitted_state_is_small_and_picklable():
    import pickle

    import kompot_dask as kd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3))
    est = kd.FunctionEstimator(n_landmarks=50, sigma=1.0, ls=3.0).fit(x, rng.normal(size=(2000, 4)))
    blob = pickle.dumps(est.predict)
    assert len(blob) < 100_000  # landmark-sized, independent of the number of cells
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again(x[:10]), est.predict(x[:10]))


def test_import_is_lazy_until_a_name_is_used():
    out = _run(
        "import sys, kompot_dask as kd, kompot_dask.anndata, kompot_dask.cli;"
        "light = [m for m in ('jax', 'scipy', 'dask') if m in sys.modules];"
        "kd.DifferentialAbundance; kd.da;"
        "print(light, 'jax' in sys.modules, sorted(set(kd.__all__) - set(dir(kd))))"
    )
    assert out.strip() == "[] True []"
