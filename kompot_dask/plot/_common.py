"""Shared helpers of the plot functions: figures, saving, subsampling, colours, labels.

matplotlib and pandas are imported inside the functions only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Above this many cells scatter plots are rasterized (vector output stays small).
RASTERIZE_ABOVE = 200_000
#: Default cap on the number of points drawn (a fixed-seed random subset above it).
MAX_POINTS = 200_000
#: Kompot's direction colours (``uns[f"{direction_key}_colors"]`` default), by category.
DIRECTION_COLORS = {"up": "#d73027", "neutral": "#d3d3d3", "down": "#4575b4"}
DIRECTIONS = ("up", "neutral", "down")
SAVE_DPI = 150


def pyplot():
    """matplotlib.pyplot, imported on first use (with a clear error when absent)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kompot_dask.plot needs matplotlib: pip install 'kompot-dask[plots]'"
        ) from err
    return plt


def new_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any, bool]:
    """``(fig, ax, own)``: the given axes, or a new figure with one axes (``own=True``)."""
    if ax is not None:
        return ax.figure, ax, False
    fig, ax = pyplot().subplots(figsize=figsize, layout="constrained")
    return fig, ax, True


def finish(fig: Any, ax: Any, own: bool, save: str | os.PathLike | None) -> Any:
    """Save when asked (PNG, dpi 150, tight box); return the figure, or ``ax`` if given."""
    if save is not None:
        fig.savefig(os.fspath(save), dpi=SAVE_DPI, bbox_inches="tight")
    return fig if own else ax


def subsample(n: int, max_points: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted indices of a fixed-seed random subset of ``max_points`` of ``n``; ``None`` = all."""
    if max_points is None or n <= max_points:
        return None
    if max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_points), replace=False))


def take(values: Any, idx: np.ndarray | None) -> np.ndarray:
    """``values`` as a numpy array, restricted to ``idx`` when given."""
    arr = values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)
    return arr if idx is None else arr[idx]


def rasterize(n_total: int, rasterized: bool | None) -> bool:
    """Auto rasterization: on for atlases of more than :data:`RASTERIZE_ABOVE` cells."""
    return n_total > RASTERIZE_ABOVE if rasterized is None else bool(rasterized)


def point_size(n: int, size: float | None) -> float:
    """A marker area (points²) that keeps a few to millions of points readable."""
    if size is not None:
        return float(size)
    return float(np.clip(30_000.0 / max(n, 1), 0.5, 30.0))


def direction_colors(adata: Any, direction_key: str, categories: Sequence[str]) -> dict[str, str]:
    """Colour per direction category: the stored ``uns[f"{key}_colors"]`` else Kompot's."""
    colors = dict(DIRECTION_COLORS)
    stored = adata.uns.get(f"{direction_key}_colors") if hasattr(adata.uns, "get") else None
    if stored is not None:
        stored = [str(c) for c in np.asarray(stored).ravel()]
        cats = list(categories)
        if len(stored) == len(cats):
            colors.update(zip(cats, stored))
        elif len(stored) == len(DIRECTIONS):
            colors.update(zip(DIRECTIONS, stored))
    return colors


def categories_of(series: Any) -> list:
    """Category order of an obs column (categorical order, else sorted unique values)."""
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype):
        return list(series.cat.categories)
    return sorted(pd.unique(series.dropna()), key=str)


def category_colors(adata: Any, column: str, categories: Sequence) -> dict:
    """Colour per category: ``uns[f"{column}_colors"]`` when it fits, else a tab palette."""
    from matplotlib import colormaps

    stored = adata.uns.get(f"{column}_colors") if hasattr(adata.uns, "get") else None
    if stored is not None and len(stored) == len(categories):
        return dict(zip(categories, [str(c) for c in np.asarray(stored).ravel()]))
    cmap = colormaps["tab10" if len(categories) <= 10 else "tab20"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(categories)}


def is_categorical(series: Any) -> bool:
    """Whether an obs column is drawn with a legend (categorical, string, bool)."""
    import pandas as pd

    return not pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype)


def symmetric_limit(values: np.ndarray) -> float:
    """Half-width of a colour range centred at 0 covering the finite values."""
    finite = np.abs(values[np.isfinite(values)])
    v = float(finite.max()) if finite.size else 1.0
    return v if v > 0 else 1.0


def legend_outside(ax: Any, handles: list, title: str | None = None) -> Any:
    """A legend to the right of the axes (never over the data)."""
    return ax.legend(handles=handles, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     frameon=False, borderaxespad=0.0, markerscale=1.0)


def marker_handle(color: Any, label: str) -> Any:
    """A round legend marker."""
    from matplotlib.lines import Line2D

    return Line2D([], [], linestyle="", marker="o", markersize=7, markerfacecolor=color,
                  markeredgecolor="none", label=label)


def basis_label(basis: str) -> str:
    """``"X_umap"`` → ``"UMAP"``: the axis-label stem of an embedding."""
    name = basis[2:] if basis.startswith("X_") else basis
    return name.upper() if name.lower() in {"umap", "tsne", "pca", "phate", "fa", "draw_graph_fa"} else name


def get_basis(adata: Any, basis: str, components: tuple[int, int] = (0, 1)) -> tuple[str, np.ndarray]:
    """The 2-D coordinates ``(n_obs, 2)`` of ``adata.obsm[basis]`` (``"umap"`` → ``"X_umap"``)."""
    keys = list(adata.obsm.keys())
    key = basis if basis in keys else (f"X_{basis}" if f"X_{basis}" in keys else None)
    if key is None:
        raise KeyError(f"embedding {basis!r} not found in adata.obsm (available: {keys})")
    coords = adata.obsm[key]
    coords = coords.to_numpy() if hasattr(coords, "to_numpy") else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] <= max(components):
        raise ValueError(f"adata.obsm[{key!r}] has shape {coords.shape}; need columns {components}")
    return key, np.asarray(coords[:, list(components)], dtype=float)


def column_of(matrix: Any, j: int) -> np.ndarray:
    """Column ``j`` of a layer (numpy, scipy sparse, dask or h5py-backed) as a 1-D float array."""
    col = matrix[:, j]
    if hasattr(col, "compute"):
        col = col.compute()
    if hasattr(col, "toarray"):
        col = col.toarray()
    return np.asarray(col, dtype=float).ravel()


def lfc_label(comparison: str, prefix: str = "log fold change") -> str:
    """``"log fold change (B vs A)"``."""
    return f"{prefix} ({comparison})" if comparison else prefix
