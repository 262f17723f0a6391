"""Stacked bars of DA direction calls (up / neutral / down) per category of an obs column."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _common as C
from .fields import resolve_fields

__all__ = ["direction_barplot", "direction_counts"]

# Stacked from the bottom: down, neutral, up (so the legend, up first, reads top to bottom).
_STACK = ("down", "neutral", "up")


def direction_counts(adata: Any, groupby: str, direction_key: str) -> Any:
    """Cells per category of ``groupby`` (rows) and direction ``up, neutral, down`` (columns).

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData with both obs columns.
    groupby : str
        Categories (rows, in categorical order or sorted).
    direction_key : str
        The DA direction column.

    Returns
    -------
    pandas.DataFrame
        Integer counts; cells with a missing category are left out.
    """
    import pandas as pd

    group = adata.obs[groupby]
    cats = C.categories_of(group)
    direction = adata.obs[direction_key].astype(str)
    table = pd.crosstab(pd.Categorical(group, categories=cats), direction.to_numpy(), dropna=False)
    table = table.reindex(index=pd.Index(cats), columns=list(C.DIRECTIONS), fill_value=0)
    table.index.name, table.columns.name = groupby, "direction"
    return table.fillna(0).astype(np.int64)


def direction_barplot(
    adata: Any,
    groupby: str,
    run_id: int | None = -1,
    normalize: bool = True,
    ax: Any = None,
    *,
    keys: Mapping[str, str] | None = None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    legend: bool = True,
    save: str | os.PathLike | None = None,
    **bar_kwargs: Any,
) -> Any:
    """Stacked bars of up / neutral / down cells of a DA run per category of an obs column.

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData holding a DA run.
    groupby : str
        obs column whose categories give the bars (e.g. cell type, sample).
    run_id : int or None, default -1
        Which DA run; -1 = latest.
    normalize : bool, default True
        Fractions of each category's cells (bars reach 1) instead of cell counts.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.
    keys : mapping, optional
        Explicit ``direction_key`` overriding the run's.
    figsize : (float, float), optional
        Size of a new figure (default widens with the number of categories).
    title : str, optional
        Replaces the default title ``"DA direction per <groupby>: <c2> vs <c1>"``.
    legend : bool, default True
        Draw the legend (outside the axes, right).
    save : path, optional
        Write the figure as PNG (dpi 150, tight bounding box).
    **bar_kwargs
        Passed to :meth:`matplotlib.axes.Axes.bar`.

    Returns
    -------
    matplotlib.figure.Figure or matplotlib.axes.Axes
        The new Figure; the given ``ax`` when ``ax`` was passed. ``ax.containers`` holds
        one bar container per direction, stacked ``down, neutral, up`` from the bottom.

    Raises
    ------
    KeyError
        ``groupby`` not in ``adata.obs``, no DA run stored, or its direction field missing.
    """
    rf = resolve_fields(adata, "da", run_id, keys=keys, check=("direction_key",))
    if groupby not in adata.obs.columns:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs")
    counts = direction_counts(adata, groupby, rf.direction_key)
    values = counts.to_numpy(dtype=float)
    if normalize:
        totals = values.sum(axis=1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    cats = [str(c) for c in counts.index]
    longest = max((len(c) for c in cats), default=1)
    default = f"DA direction per {groupby}" + (f": {rf.comparison}" if rf.comparison else "")
    title = title if title is not None else default
    if figsize is None:
        # room for the bars, the legend (~1.6 in) and the title (~0.1 in per character)
        width = max(1.8 + 0.5 * len(cats), 0.1 * len(title) + 1.6, 4.5)
        figsize = (min(width, 24.0), 4.5 + min(longest, 30) * 0.05)
    fig, ax, own = C.new_axes(ax, figsize)
    colors = C.direction_colors(adata, rf.direction_key, C.categories_of(adata.obs[rf.direction_key]))

    x = np.arange(len(cats))
    bottom = np.zeros(len(cats))
    kw = {"width": 0.8, "edgecolor": "white", "linewidth": 0.5, **bar_kwargs}
    for direction in _STACK:
        h = values[:, C.DIRECTIONS.index(direction)]
        ax.bar(x, h, bottom=bottom, color=colors[direction], label=direction, **kw)
        bottom = bottom + h
    ax.set_xticks(x)
    # rotate the tick labels when the longest does not fit its bar's slot (~0.085 in per char)
    axes_in = (fig.get_figwidth() - 1.9) if own else ax.get_position().width * fig.get_figwidth()
    rotate = 0.085 * longest > 0.9 * axes_in / max(len(cats), 1)
    ax.set_xticklabels(cats, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                       rotation_mode="anchor" if rotate else "default")
    ax.set_xlim(-0.6, len(cats) - 0.4)
    if normalize:
        ax.set_ylim(0, 1)
    ax.set_xlabel(groupby)
    ax.set_ylabel("fraction of cells" if normalize else "number of cells")
    ax.set_title(title)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        order = [labels.index(d) for d in C.DIRECTIONS]
        ax.legend([handles[i] for i in order], [labels[i] for i in order], title="direction",
                  loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0.0)
    return C.finish(fig, ax, own, save)
