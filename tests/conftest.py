"""Shared fixtures: reference cases (copied from the reference implementation's outputs)."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / "data"

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a test extra; tests that need it import it themselves
    settings = None

if settings is not None:
    # Property tests draw the same examples on every CI run (a failure reproduces from the
    # log, with the blob to replay it); no deadline anywhere: a loaded 2-core machine is no
    # reason to fail. `CI` set (any value but "" / "0" / "false") selects the `ci` profile.
    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("dev", deadline=None)
    _ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    settings.load_profile("ci" if _ci else "dev")


def load_case(name: str) -> dict[str, np.ndarray]:
    """Load a reference case (``tests/data/<name>.npz``) into a plain dict."""
    with np.load(DATA / f"{name}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_close(actual, expected, atol=0.0, rtol=0.0, what=""):
    """``|a - b| <= atol + rtol |b|`` element-wise, with the worst offender in the message."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    err = np.abs(a - b) - (atol + rtol * np.abs(b))
    worst = int(np.argmax(err)) if err.size else 0
    assert np.all(err <= 0), (
        f"{what}: max |a-b| = {np.max(np.abs(a - b)):.3e} exceeds atol={atol} rtol={rtol} "
        f"(worst at flat index {worst}: {a.flat[worst]!r} vs {b.flat[worst]!r})"
    )


@pytest.fixture(scope="session")
def density_landmarks():
    return load_case("density_landmarks")


@pytest.fixture(scope="session")
def density_full():
    return load_case("density_full")


@pytest.fixture(scope="session")
def function_landmarks():
    return load_case("function_landmarks")
