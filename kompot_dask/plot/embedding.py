"""Cells in a 2-D embedding coloured by DA/DE results, and one gene's imputed expression."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _common as C
from .fields import RunFields, resolve_fields

__all__ = ["embedding", "gene_expression"]

_DA_COLORS = {"lfc": "lfc_key", "zscore": "zscore_key", "ptp": "ptp_key", "direction": "direction_key"}
_NAN_COLOR = "#e6e6e6"


def _style_embedding(ax, basis_key: str) -> None:
    stem = C.basis_label(basis_key)
    ax.set_xlabel(f"{stem} 1")
    ax.set_ylabel(f"{stem} 2")
    ax.set_xticks([])
    ax.set_yticks([])


def _scatter_continuous(ax, xy, values, *, diverging, cmap, size, raster, colorbar_label, vmin=None,
                        vmax=None, scatter_kwargs):
    """Finite values on top (largest |value| last), NaN cells as a light background."""
    finite = np.isfinite(values)
    vmin = scatter_kwargs.pop("vmin", vmin)
    vmax = scatter_kwargs.pop("vmax", vmax)
    if diverging:
        if vmin is None or vmax is None:
            lim = C.symmetric_limit(values)
            vmin, vmax = -lim, lim
        order_key = np.abs(values[finite])
    else:
        order_key = values[finite]
    cmap = cmap or ("RdBu_r" if diverging else "viridis")
    pts, vals = xy[finite], values[finite]
    order = np.argsort(order_key, kind="stable")
    sc = ax.scatter(pts[order, 0], pts[order, 1], c=vals[order], cmap=cmap, vmin=vmin, vmax=vmax,
                    s=size, linewidths=0, rasterized=raster, **scatter_kwargs)
    if (~finite).any():
        ax.scatter(xy[~finite, 0], xy[~finite, 1], c=_NAN_COLOR, s=size, linewidths=0,
                   rasterized=raster, zorder=sc.get_zorder() - 0.1)
    if colorbar_label is not None:
        cb = ax.figure.colorbar(sc, ax=ax, shrink=0.85, pad=0.02)
        cb.set_label(colorbar_label)
    return sc


def _scatter_categorical(ax, xy, labels, colors, categories, *, size, raster, legend, legend_title,
                         counts=None, first=(), scatter_kwargs):
    """One collection, categories in ``first`` drawn underneath the others."""
    rank = np.where(np.isin(labels, list(first)), 0, 1)
    order = np.argsort(rank, kind="stable")
    cols = [colors.get(v, _NAN_COLOR) for v in labels[order]]
    sc = ax.scatter(xy[order, 0], xy[order, 1], c=cols, s=size, linewidths=0, rasterized=raster,
                    **scatter_kwargs)
    if legend:
        handles = []
        for cat in categories:
            text = f"{cat} ({int(counts.get(cat, 0)):,})" if counts is not None else str(cat)
            handles.append(C.marker_handle(colors[cat], text))
        C.legend_outside(ax, handles, title=legend_title)
    return sc


def _gene_fold_change(adata, gene, run_id, keys, idx) -> tuple[RunFields, np.ndarray]:
    rf = resolve_fields(adata, "de", run_id, keys=keys, check=("fold_change_key",))
    j = adata.var_names.get_loc(gene)
    return rf, C.take(C.column_of(adata.layers[rf.fold_change_key], j), idx)


def embedding(
    adata: Any,
    color: str = "lfc",
    basis: str = "X_umap",
    run_id: int | None = -1,
    ax: Any = None,
    *,
    keys: Mapping[str, str] | None = None,
    components: tuple[int, int] = (0, 1),
    cmap: str | None = None,
    max_points: int | None = C.MAX_POINTS,
    seed: int = 0,
    rasterized: bool | None = None,
    point_size: float | None = None,
    figsize: tuple[float, float] = (6.5, 5.0),
    title: str | None = None,
    legend: bool = True,
    save: str | os.PathLike | None = None,
    **scatter_kwargs: Any,
) -> Any:
    """Cells in a 2-D embedding coloured by a DA field, a gene's DE fold change, or an obs column.

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData with the embedding in ``obsm[basis]`` and a DA and/or DE run.
    color : str, default "lfc"
        ``"lfc"`` / ``"zscore"``: the DA run's per-cell log fold change / z-score (diverging
        colour map centred at 0); ``"ptp"``: its −log10 PTP; ``"direction"``: its
        up/neutral/down call (stored colours, categorical legend); a gene in
        ``adata.var_names``: that gene's per-cell fold change from the DE run's fold-change
        layer (diverging, centred); an obs column: categorical legend or colour bar.
    basis : str, default "X_umap"
        ``adata.obsm`` key of the embedding (``"umap"`` finds ``"X_umap"``).
    run_id : int or None, default -1
        The DA run (or the DE run for a gene); -1 = latest.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.
    keys : mapping, optional
        Explicit field names overriding the run's; see :func:`kompot_dask.plot.resolve_fields`.
    components : (int, int), default (0, 1)
        Columns of the embedding drawn as x and y.
    cmap : str, optional
        Colour map of numeric values (default ``"RdBu_r"`` for fold changes and z-scores,
        ``"viridis"`` otherwise).
    max_points : int or None, default 200_000
        At most this many cells are drawn (a random subset with ``seed``); ``None`` = all.
    seed : int, default 0
        Seed of the subset.
    rasterized : bool, optional
        Rasterize the points; default: when the AnnData has more than 200 000 cells.
    point_size : float, optional
        Marker area in points²; default scales with the number of points.
    figsize : (float, float), default (6.5, 5)
        Size of a new figure.
    title : str, optional
        Replaces the default title.
    legend : bool, default True
        Draw the legend of categorical colours.
    save : path, optional
        Write the figure as PNG (dpi 150, tight bounding box).
    **scatter_kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    Returns
    -------
    matplotlib.figure.Figure or matplotlib.axes.Axes
        The new Figure; the given ``ax`` when ``ax`` was passed. The cells are the first
        collection of the axes (cells with NaN values, if any, a second one underneath).

    Raises
    ------
    KeyError
        Unknown ``color`` or ``basis``, no run stored, or a run's field missing.
    """
    basis_key, xy_all = C.get_basis(adata, basis, components)
    n = adata.n_obs
    idx = C.subsample(n, max_points, seed)
    xy = xy_all if idx is None else xy_all[idx]
    size = C.point_size(xy.shape[0], point_size)
    raster = C.rasterize(n, rasterized)
    fig, ax, own = C.new_axes(ax, figsize)
    kw = dict(scatter_kwargs)

    if color in _DA_COLORS:
        attr = _DA_COLORS[color]
        rf = resolve_fields(adata, "da", run_id, keys=keys, check=(attr,))
        key = getattr(rf, attr)
        series = adata.obs[key]
        if color == "direction":
            cats = C.categories_of(series)
            colors = C.direction_colors(adata, key, cats)
            labels = C.take(series.astype(str), idx)
            _scatter_categorical(ax, xy, labels, colors, [c for c in C.DIRECTIONS if c in colors],
                                 size=size, raster=raster, legend=legend, legend_title="direction",
                                 counts=series.astype(str).value_counts(), first=("neutral",), scatter_kwargs=kw)
            default_title = "DA direction"
        else:
            values = C.take(series, idx).astype(float)
            _scatter_continuous(ax, xy, values, diverging=color != "ptp", cmap=cmap, size=size,
                                raster=raster, colorbar_label=key, scatter_kwargs=kw)
            default_title = {"lfc": "DA log fold change", "zscore": "DA log fold change z-score",
                             "ptp": "DA \u2212log10 PTP"}[color]
        if rf.comparison:
            default_title += f": {rf.comparison}"
    elif color in adata.var_names:
        rf, values = _gene_fold_change(adata, color, run_id, keys, idx)
        _scatter_continuous(ax, xy, values, diverging=True, cmap=cmap, size=size, raster=raster,
                            colorbar_label=f"{rf.fold_change_key}\n[{color}]", scatter_kwargs=kw)
        default_title = f"{color}: " + C.lfc_label(rf.comparison)
    elif color in adata.obs.columns:
        series = adata.obs[color]
        if C.is_categorical(series):
            cats = C.categories_of(series)
            colors = C.category_colors(adata, color, cats)
            labels = C.take(series.astype(object), idx)
            _scatter_categorical(ax, xy, labels, colors, cats, size=size, raster=raster, legend=legend,
                                 legend_title=color, scatter_kwargs=kw)
        else:
            values = C.take(series, idx).astype(float)
            _scatter_continuous(ax, xy, values, diverging=False, cmap=cmap, size=size, raster=raster,
                                colorbar_label=color, scatter_kwargs=kw)
        default_title = color
    else:
        raise KeyError(
            f"color {color!r} is not one of {sorted(_DA_COLORS)}, a gene in adata.var_names "
            f"or a column of adata.obs"
        )
    _style_embedding(ax, basis_key)
    ax.set_title(title if title is not None else default_title)
    return C.finish(fig, ax, own, save)


def gene_expression(
    adata: Any,
    gene: str,
    basis: str = "X_umap",
    run_id: int | None = -1,
    *,
    keys: Mapping[str, str] | None = None,
    components: tuple[int, int] = (0, 1),
    cmap: str = "viridis",
    diverging_cmap: str = "RdBu_r",
    max_points: int | None = C.MAX_POINTS,
    seed: int = 0,
    rasterized: bool | None = None,
    point_size: float | None = None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    axes: Sequence[Any] | None = None,
    save: str | os.PathLike | None = None,
    **scatter_kwargs: Any,
) -> Any:
    """One gene of a DE run: imputed expression per condition and the fold change, side by side.

    Panels: imputed (GP-smoothed) expression in condition 1 and in condition 2 on one
    colour scale, and the per-cell log fold change (condition 2 over 1; diverging colour
    map centred at 0). Each panel is titled with its condition name.

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData with the embedding in ``obsm[basis]`` and a DE run whose layers hold ``gene``.
    gene : str
        A name in ``adata.var_names``.
    basis : str, default "X_umap"
        ``adata.obsm`` key of the embedding (``"umap"`` finds ``"X_umap"``).
    run_id : int or None, default -1
        Which DE run; -1 = latest.
    keys : mapping, optional
        Explicit layer names (``smoothed_key_1``, ``smoothed_key_2``, ``fold_change_key``)
        overriding the run's.
    components : (int, int), default (0, 1)
        Columns of the embedding drawn as x and y.
    cmap : str, default "viridis"
        Colour map of the imputed expression.
    diverging_cmap : str, default "RdBu_r"
        Colour map of the fold change.
    max_points : int or None, default 200_000
        At most this many cells are drawn (a random subset with ``seed``); ``None`` = all.
    seed : int, default 0
        Seed of the subset.
    rasterized : bool, optional
        Rasterize the points; default: when the AnnData has more than 200 000 cells.
    point_size : float, optional
        Marker area in points²; default scales with the number of points.
    figsize : (float, float), optional
        Size of a new figure (default 14.5 × 4.4 inches).
    title : str, optional
        Figure title (default: the gene name).
    axes : sequence of 3 matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.
    save : path, optional
        Write the figure as PNG (dpi 150, tight bounding box).
    **scatter_kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    Returns
    -------
    matplotlib.figure.Figure or list of matplotlib.axes.Axes
        The new Figure; the given ``axes`` (as a list) when ``axes`` was passed.

    Raises
    ------
    KeyError
        ``gene`` not in ``adata.var_names``, no DE run stored, or one of its layers missing.
    """
    rf = resolve_fields(adata, "de", run_id, keys=keys,
                        check=("smoothed_key_1", "smoothed_key_2", "fold_change_key"))
    if gene not in adata.var_names:
        raise KeyError(f"gene {gene!r} not found in adata.var_names")
    j = adata.var_names.get_loc(gene)
    basis_key, xy_all = C.get_basis(adata, basis, components)
    n = adata.n_obs
    idx = C.subsample(n, max_points, seed)
    xy = xy_all if idx is None else xy_all[idx]
    size = C.point_size(xy.shape[0], point_size)
    raster = C.rasterize(n, rasterized)

    v1 = C.take(C.column_of(adata.layers[rf.smoothed_key_1], j), idx)
    v2 = C.take(C.column_of(adata.layers[rf.smoothed_key_2], j), idx)
    fc = C.take(C.column_of(adata.layers[rf.fold_change_key], j), idx)
    both = np.concatenate([v1[np.isfinite(v1)], v2[np.isfinite(v2)]])
    vmin, vmax = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)

    if axes is None:
        plt = C.pyplot()
        fig, axs = plt.subplots(1, 3, figsize=figsize or (14.5, 4.4), layout="constrained")
        axs, own = list(axs), True
    else:
        axs = list(axes)
        if len(axs) != 3:
            raise ValueError(f"axes must hold 3 axes, got {len(axs)}")
        fig, own = axs[0].figure, False

    c1 = rf.condition1 or "condition 1"
    c2 = rf.condition2 or "condition 2"
    kw = dict(scatter_kwargs)
    panels = [(v1, False, cmap, "imputed expression", f"{c1}: imputed", vmin, vmax),
              (v2, False, cmap, "imputed expression", f"{c2}: imputed", vmin, vmax),
              (fc, True, diverging_cmap, "log fold change", C.lfc_label(rf.comparison), None, None)]
    for ax, (vals, div, cm, cb_label, panel_title, lo, hi) in zip(axs, panels):
        _scatter_continuous(ax, xy, vals, diverging=div, cmap=cm, size=size, raster=raster,
                            colorbar_label=cb_label, vmin=lo, vmax=hi, scatter_kwargs=dict(kw))
        _style_embedding(ax, basis_key)
        ax.set_title(panel_title)
    fig.suptitle(title if title is not None else gene, fontweight="bold")
    if save is not None:
        fig.savefig(os.fspath(save), dpi=C.SAVE_DPI, bbox_inches="tight")
    return fig if own else axs
