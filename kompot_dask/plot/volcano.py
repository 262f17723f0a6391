"""Volcano plots: per-cell DA (log fold change vs −log10 PTP) and per-gene DE."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _common as C
from .fields import resolve_fields

__all__ = ["volcano_da", "volcano_de"]

NEG_LOG10_PTP = "\u2212log10 PTP"
_OTHER_COLOR = "#7f7f7f"
_HIGHLIGHT_COLOR = "#d73027"
_BACKGROUND_COLOR = "#bdbdbd"


def _color_by_column(adata, ax, column, idx, keep, size, rasterized, x, y, legend, scatter_kwargs):
    """Scatter coloured by an obs column (legend for categories, colour bar for numbers)."""
    series = adata.obs[column]
    fig = ax.figure
    if C.is_categorical(series):
        cats = C.categories_of(series)
        colors = C.category_colors(adata, column, cats)
        values = C.take(series.astype(object), idx)[keep]
        cols = [colors.get(v, "#000000") if v == v else "#eeeeee" for v in values]
        ax.scatter(x, y, c=cols, s=size, linewidths=0, rasterized=rasterized, **scatter_kwargs)
        if legend:
            C.legend_outside(ax, [C.marker_handle(colors[c], str(c)) for c in cats], title=column)
    else:
        values = C.take(series, idx).astype(float)[keep]
        sc = ax.scatter(x, y, c=values, s=size, linewidths=0, rasterized=rasterized,
                        cmap=scatter_kwargs.pop("cmap", "viridis"), **scatter_kwargs)
        fig.colorbar(sc, ax=ax, label=column, shrink=0.85)


def volcano_da(
    adata: Any,
    run_id: int | None = -1,
    color: str | None = None,
    ax: Any = None,
    *,
    keys: Mapping[str, str] | None = None,
    show_thresholds: bool = True,
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
    """Cell volcano of a DA run: log fold change (x) against −log10 PTP (y).

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData holding a DA run (``kompot_dask.da`` or Kompot 0.8.0).
    run_id : int or None, default -1
        Which DA run (position in ``uns["kompot_da"]["run_history"]``; -1 = latest).
    color : str, optional
        ``None`` or ``"direction"``: colour by the run's up/neutral/down call with the
        stored ``uns[f"{direction_key}_colors"]`` (Kompot's red/grey/blue otherwise).
        An obs column name: categorical legend or numeric colour bar. Any other
        matplotlib colour: one colour for all cells.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.
    keys : mapping, optional
        Explicit field names overriding the run's (``lfc_key``, ``ptp_key``,
        ``direction_key``, ``lfc_threshold``, ``ptp_threshold``); see
        :func:`kompot_dask.plot.resolve_fields`.
    show_thresholds : bool, default True
        Dashed lines at ``±lfc_threshold`` and ``−log10(ptp_threshold)`` from the run's
        parameters (when recorded).
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
        Replaces the default title ``"Differential abundance: <c2> vs <c1>"``.
    legend : bool, default True
        Draw the legend (outside the axes, right).
    save : path, optional
        Write the figure as PNG (dpi 150, tight bounding box).
    **scatter_kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    Returns
    -------
    matplotlib.figure.Figure or matplotlib.axes.Axes
        The new Figure; the given ``ax`` when ``ax`` was passed.

    Raises
    ------
    KeyError
        No DA run stored, or a field of the run missing from ``adata.obs``.
    """
    rf = resolve_fields(adata, "da", run_id, keys=keys, check=("lfc_key", "ptp_key"))
    fig, ax, own = C.new_axes(ax, figsize)
    n = adata.n_obs
    idx = C.subsample(n, max_points, seed)
    x = C.take(adata.obs[rf.lfc_key], idx).astype(float)
    y = C.take(adata.obs[rf.ptp_key], idx).astype(float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    size = C.point_size(x.size, point_size)
    raster = C.rasterize(n, rasterized)

    by_direction = color in (None, "direction") and (
        color == "direction" or (rf.direction_key is not None and rf.direction_key in adata.obs.columns)
    )
    if by_direction:
        rf.require(adata, "direction_key")
        series = adata.obs[rf.direction_key]
        cats = C.categories_of(series)
        colors = C.direction_colors(adata, rf.direction_key, cats)
        dirs = C.take(series.astype(str), idx)[keep]
        rank = np.select([dirs == "neutral", dirs == "down", dirs == "up"], [0, 1, 2], 0)
        order = np.argsort(rank, kind="stable")
        cols = np.array([colors.get(d, _OTHER_COLOR) for d in dirs], dtype=object)
        ax.scatter(x[order], y[order], c=list(cols[order]), s=size, linewidths=0,
                   rasterized=raster, **scatter_kwargs)
        if legend:
            counts = series.astype(str).value_counts()
            handles = [C.marker_handle(colors[d], f"{d} ({int(counts.get(d, 0)):,})")
                       for d in C.DIRECTIONS if d in colors]
            C.legend_outside(ax, handles, title="direction")
    elif color is not None and color in adata.obs.columns:
        _color_by_column(adata, ax, color, idx, keep, size, raster, x, y, legend, dict(scatter_kwargs))
    else:
        from matplotlib.colors import is_color_like

        if color is not None and not is_color_like(color):
            raise KeyError(f"color {color!r} is neither 'direction', an obs column nor a colour")
        ax.scatter(x, y, c=color or "#4d4d4d", s=size, linewidths=0, rasterized=raster, **scatter_kwargs)

    if show_thresholds:
        style = dict(color="0.35", linestyle="--", linewidth=0.8, zorder=0.5)
        if rf.lfc_threshold:
            ax.axvline(rf.lfc_threshold, **style)
            ax.axvline(-rf.lfc_threshold, **style)
        if rf.ptp_threshold and 0 < rf.ptp_threshold < 1:
            ax.axhline(-np.log10(rf.ptp_threshold), **style)
    ax.set_xlabel(C.lfc_label(rf.comparison))
    ax.set_ylabel(NEG_LOG10_PTP)
    ax.set_title(title if title is not None else
                 ("Differential abundance: " + rf.comparison if rf.comparison else "Differential abundance"))
    return C.finish(fig, ax, own, save)


# Label offsets (points) tried in turn for an annotated gene: (dx, dy, horizontal alignment).
_OFFSETS = [(5, 3, "left"), (-5, 3, "right"), (5, -11, "left"), (-5, -11, "right"),
            (8, 14, "left"), (-8, 14, "right"), (8, -22, "left"), (-8, -22, "right"),
            (14, 26, "left"), (-14, 26, "right"), (14, -34, "left"), (-14, -34, "right")]


def _label_box(px, py, dx, dy, ha, text, fontsize):
    """Approximate box (points) of a label at offset ``(dx, dy)`` from point ``(px, py)``."""
    w, h = 0.62 * fontsize * len(text), 1.15 * fontsize
    x0 = px + dx - (w if ha == "right" else 0.0)
    return (x0, py + dy, x0 + w, py + dy + h)


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _annotate(ax, xs, ys, names, fontsize, marker_radius=3.0):
    """Annotate points with names, each at the first offset overlapping (almost) nothing.

    Boxes are estimated in points from the font size (no renderer needed); a label that
    fits nowhere takes the least-overlapping offset. Far offsets get a leader line.
    """
    fig = ax.figure
    ax.autoscale_view()
    to_pt = 72.0 / fig.dpi
    pts = ax.transData.transform(np.column_stack([xs, ys])) * to_pt
    frame = ax.get_window_extent().extents * to_pt
    placed = []
    for (px, py), name, x, y in zip(pts, names, xs, ys):
        best, best_cost = None, np.inf
        for dx, dy, ha in _OFFSETS:
            box = _label_box(px, py, dx, dy, ha, name, fontsize)
            cost = sum(_overlap(box, other) for other in placed)
            r = marker_radius
            cost += sum(_overlap(box, (qx - r, qy - r, qx + r, qy + r)) for qx, qy in pts)
            outside = (max(0.0, frame[0] - box[0]) + max(0.0, box[2] - frame[2])
                       + max(0.0, frame[1] - box[1]) + max(0.0, box[3] - frame[3]))
            cost += 50.0 * outside
            if cost < best_cost:
                best, best_cost = (dx, dy, ha, box), cost
            if cost <= 0.08 * (box[2] - box[0]) * (box[3] - box[1]):  # a graze is fine
                break
        dx, dy, ha, box = best
        placed.append(box)
        far = abs(dy) > 10
        ax.annotate(name, xy=(x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va="bottom",
                    fontsize=fontsize,
                    arrowprops=dict(arrowstyle="-", color="0.4", lw=0.5, shrinkA=0, shrinkB=2) if far else None)


def volcano_de(
    adata: Any,
    run_id: int | None = -1,
    y: str = "mahalanobis",
    n_top: int = 10,
    ax: Any = None,
    *,
    keys: Mapping[str, str] | None = None,
    highlight_de: bool = True,
    point_size: float | None = None,
    label_fontsize: float = 8.0,
    figsize: tuple[float, float] = (6.5, 5.0),
    title: str | None = None,
    legend: bool = True,
    save: str | os.PathLike | None = None,
    **scatter_kwargs: Any,
) -> Any:
    """Gene volcano of a DE run: mean log fold change (x) against Mahalanobis distance or −log10 PTP (y).

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData holding a DE run (``kompot_dask.de`` or Kompot 0.8.0).
    run_id : int or None, default -1
        Which DE run (position in ``uns["kompot_de"]["run_history"]``; -1 = latest).
    y : {"mahalanobis", "ptp"}, default "mahalanobis"
        The y statistic: the run's Mahalanobis distance, or its ``neg_log10_ptp``
        (stored by Kompot only with ``store_additional_stats=True``).
    n_top : int, default 10
        Annotate this many genes with the largest ``y`` with their names (0: none).
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.
    keys : mapping, optional
        Explicit field names overriding the run's (``lfc_key``, ``mahalanobis_key``,
        ``ptp_key``, ``is_de_key``); see :func:`kompot_dask.plot.resolve_fields`.
    highlight_de : bool, default True
        Colour genes with ``is_de`` (when the run stored it) red, others grey. Without an
        ``is_de`` field the annotated top genes are highlighted instead.
    point_size : float, optional
        Marker area in points²; default scales with the number of genes.
    label_fontsize : float, default 8
        Font size of the gene names.
    figsize : (float, float), default (6.5, 5)
        Size of a new figure.
    title : str, optional
        Replaces the default title ``"Differential expression: <c2> vs <c1>"``.
    legend : bool, default True
        Draw the legend (outside the axes, right).
    save : path, optional
        Write the figure as PNG (dpi 150, tight bounding box).
    **scatter_kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    Returns
    -------
    matplotlib.figure.Figure or matplotlib.axes.Axes
        The new Figure; the given ``ax`` when ``ax`` was passed.

    Raises
    ------
    ValueError
        For an unknown ``y``.
    KeyError
        No DE run stored, or a field missing from ``adata.var`` (deleted, overwritten,
        or — for ``y="ptp"`` — never stored by the run).
    """
    y_attr = {"mahalanobis": "mahalanobis_key", "ptp": "ptp_key"}.get(y)
    if y_attr is None:
        raise ValueError(f"y must be 'mahalanobis' or 'ptp', got {y!r}")
    rf = resolve_fields(adata, "de", run_id, keys=keys, check=("lfc_key", y_attr))
    var = adata.var
    xv = var[rf.lfc_key].to_numpy(dtype=float)
    yv = var[getattr(rf, y_attr)].to_numpy(dtype=float)
    keep = np.isfinite(xv) & np.isfinite(yv)
    names = np.asarray(adata.var_names, dtype=object)[keep]
    xv, yv = xv[keep], yv[keep]

    is_de = None
    if highlight_de and rf.is_de_key is not None and rf.is_de_key in var.columns:
        is_de = var[rf.is_de_key].fillna(False).to_numpy(dtype=bool)[keep]
    top = np.lexsort((names.astype(str), -yv))[: max(int(n_top), 0)]

    fig, ax, own = C.new_axes(ax, figsize)
    highlight = np.zeros(xv.size, dtype=bool)
    if is_de is not None:
        highlight = is_de
    elif highlight_de:
        highlight[top] = True
    order = np.argsort(highlight, kind="stable")
    cols = np.where(highlight, _HIGHLIGHT_COLOR, _BACKGROUND_COLOR)
    size = C.point_size(xv.size, point_size) * (1.5 if point_size is None else 1.0)
    ax.scatter(xv[order], yv[order], c=list(cols[order]), s=size,
               linewidths=0, rasterized=C.rasterize(xv.size, None), **scatter_kwargs)
    ax.axvline(0.0, color="0.6", linewidth=0.6, zorder=0.5)
    ax.margins(x=0.08, y=0.08)

    if legend and highlight_de:
        if is_de is not None:
            thr = f" (local FDR < {rf.fdr_threshold:g})" if rf.fdr_threshold else ""
            handles = [C.marker_handle(_HIGHLIGHT_COLOR, f"DE{thr}: {int(is_de.sum()):,}"),
                       C.marker_handle(_BACKGROUND_COLOR, f"not DE: {int((~is_de).sum()):,}")]
        else:
            handles = [C.marker_handle(_HIGHLIGHT_COLOR, f"top {top.size} genes"),
                       C.marker_handle(_BACKGROUND_COLOR, "other genes")]
        C.legend_outside(ax, handles)

    ylabel = "Mahalanobis distance" if y == "mahalanobis" else NEG_LOG10_PTP
    ax.set_xlabel(C.lfc_label(rf.comparison, "mean log fold change"))
    ax.set_ylabel(ylabel)
    ax.set_title(title if title is not None else
                 ("Differential expression: " + rf.comparison if rf.comparison else "Differential expression"))
    if top.size:
        _annotate(ax, xv[top], yv[top], [str(s) for s in names[top]], label_fontsize,
                  marker_radius=0.5 * float(np.sqrt(size)))
    return C.finish(fig, ax, own, save)
