"""The one place that talks to JAX's configuration.

kompot_dask never flips global JAX settings. Every public entry point that runs GP
algebra enters :func:`x64` instead: a thread-local switch to float64 for the duration
of the call (float32 makes the ``K_UU + 1e-6 I`` Choleskys fail, SPEC §10.1).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def x64():
    """Return a context manager under which JAX computes in float64 (this thread only)."""
    import jax

    enable = getattr(jax, "enable_x64", None)
    if enable is not None and callable(enable):
        return enable(True)
    from jax.experimental import enable_x64  # older JAX releases

    return enable_x64()


def with_x64(fn: F) -> F:
    """Decorate ``fn`` so that it always runs under :func:`x64`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with x64():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
