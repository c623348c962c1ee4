"""Figures for ``evaluate``, ``demo`` and ``parameter_search``: instance contours, bars, box plots, search history.

Everything is drawn with matplotlib's object-oriented API on the Agg canvas (``Figure`` +
``FigureCanvasAgg``): no pyplot, no global backend switch, no window, safe in tests and on
headless machines. Each ``save_*`` function writes one PNG and returns its path.

When the model had random weights (``--checkpoint none``) every figure's title carries
:data:`RANDOM_WEIGHTS` so a smoke-test picture can never be mistaken for a result.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from samlora.core import runfiles

RANDOM_WEIGHTS = "RANDOM WEIGHTS"
DPI = 100
# Bar / box colours: models get saturated colours, baselines grey ones.
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
BASELINE_COLORS = ("#7f7f7f", "#bcbcbc", "#5a5a5a")


def _figure(width: float, height: float):
    """A new Agg-backed figure (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """The figure as a PNG, written atomically (runfiles)."""
    return runfiles.atomic_write(path, lambda fh: fig.savefig(fh, dpi=DPI, format="png"))


def with_warning(title: str, random_weights: bool) -> str:
    """``title``, prefixed by ``RANDOM WEIGHTS`` when the model had random weights."""
    return f"{RANDOM_WEIGHTS} - {title}" if random_weights else title


# --------------------------------------------------------------------------------------------
# Instance contours
# --------------------------------------------------------------------------------------------
def instance_colors(values: np.ndarray) -> np.ndarray:
    """``Nx3`` uint8 RGB: a bright colour for each label value in ``values`` (golden-ratio hues).

    The colour depends only on the label value (0 is black), so an object keeps its colour
    across panels when prediction and ground truth share ids.
    """
    from matplotlib.colors import hsv_to_rgb

    values = np.asarray(values, dtype=np.int64).ravel()
    hsv = np.stack([(values * 0.618033988749895) % 1.0, np.full(values.shape, 0.85),
                    np.where(values % 2 == 1, 1.0, 0.8)], axis=-1)
    rgb = np.round(hsv_to_rgb(hsv) * 255).astype(np.uint8)
    rgb[values == 0] = 0
    return rgb


def draw_instances(image: np.ndarray, labels: np.ndarray, thickness: int | None = None,
                   fill_alpha: float = 0.25) -> np.ndarray:
    """Image with each instance's inner contour (and a light fill) in its own colour.

    Args:
        image: ``HxWx3`` uint8 RGB (or ``HxW`` gray).
        labels: ``HxW`` integer instance labels, 0 background.
        thickness: contour width in pixels (default: about 1/300 of the longer side, >= 1).
        fill_alpha: opacity of the fill inside each instance (0 = contours only).

    Returns:
        ``HxWx3`` uint8 RGB; vectorised (min / max filters), fast for thousands of objects.
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    if labels.size == 0 or labels.max() <= 0:
        return image.copy()
    if thickness is None:
        thickness = max(1, round(max(labels.shape) / 300))
    values, compact = np.unique(labels, return_inverse=True)  # compact ids keep filters cheap
    compact = compact.reshape(labels.shape)
    colors = instance_colors(values).astype(np.float32)
    inside = labels > 0
    out = image.astype(np.float32)
    if fill_alpha > 0:
        out[inside] = (1 - fill_alpha) * out[inside] + fill_alpha * colors[compact[inside]]
    if thickness == 1:
        differs = label_edges(compact)
    else:
        size = 2 * thickness + 1
        differs = (ndimage.maximum_filter(compact, size=size, mode="nearest") != compact) | \
                  (ndimage.minimum_filter(compact, size=size, mode="nearest") != compact)
    edge = inside & differs
    out[edge] = colors[compact[edge]]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def label_edges(labels: np.ndarray) -> np.ndarray:
    """HxW bool: pixels with an 8-neighbour of another label (inside the image; the same as
    comparing with 3x3 maximum and minimum filters, by four shifted comparisons)."""
    height, width = labels.shape
    edge = np.zeros(labels.shape, bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = (slice(0, height - dy), slice(max(0, -dx), width - max(0, dx)))
        b = (slice(dy, height), slice(max(0, dx), width - max(0, -dx)))
        differ = labels[a] != labels[b]
        edge[a] |= differ
        edge[b] |= differ
    return edge


@dataclass
class Panel:
    """One labelled picture of a side-by-side figure: ``labels`` drawn over the image."""

    title: str
    labels: np.ndarray | None = None  # None: the bare image


def save_side_by_side(path: str | Path, image: np.ndarray, panels: Sequence[Panel], title: str,
                      random_weights: bool = False, panel_inches: float | None = None) -> Path:
    """image | ground truth | prediction(s): one row of panels, instance contours in colour.

    Args:
        path: the PNG to write.
        image: ``HxWx3`` uint8 RGB.
        panels: e.g. ``[Panel("image"), Panel("ground truth", gt), Panel("base Dice 0.41", pred)]``.
        title: figure title (prefixed with RANDOM WEIGHTS when ``random_weights``).
        panel_inches: width of one panel; default: the image's width at 100 dpi, 4 to 6 inches.
    """
    height, width = image.shape[:2]
    if panel_inches is None:
        panel_inches = min(max(width / DPI, 4.0), 6.0)
    aspect = height / max(width, 1)
    n = len(panels)
    fig = _figure(panel_inches * n, panel_inches * aspect + 0.9)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        shown = image if panel.labels is None else draw_instances(image, panel.labels)
        ax.imshow(shown, interpolation="nearest")
        ax.set_title(panel.title, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(with_warning(title, random_weights), fontsize=11,
                 color="red" if random_weights else "black")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------
def series_colors(names: Sequence[str], baselines: Sequence[str] = ()) -> dict[str, str]:
    """A colour per series: saturated for models, grey for the names in ``baselines``."""
    colors, m, b = {}, 0, 0
    for name in names:
        if name in baselines:
            colors[name] = BASELINE_COLORS[b % len(BASELINE_COLORS)]
            b += 1
        else:
            colors[name] = MODEL_COLORS[m % len(MODEL_COLORS)]
            m += 1
    return colors


def save_grouped_bars(path: str | Path, table: Mapping[str, Mapping[str, Mapping[str, float]]],
                      ylabel: str, title: str, random_weights: bool = False,
                      baselines: Sequence[str] = (), ylim: tuple[float, float] | None = (0.0, 1.0)) -> Path:
    """Grouped bar chart: one group of bars per x category, one bar per series.

    Args:
        table: ``{category: {series: {"mean", "ci_low", "ci_high"[, "n"]}}}``, e.g. per tag
            or per fold of per-model Dice summaries (:func:`bootstrap.summarize` dicts). The bar is
            the mean, the error bar the 95 % interval; ``n`` is written under the category.
        baselines: series names drawn in grey (trivial predictions).
    """
    categories = list(table)
    series: list[str] = []
    for row in table.values():
        series += [s for s in row if s not in series]
    colors = series_colors(series, baselines)
    width_in = max(6.0, 1.2 + len(categories) * (0.35 * len(series) + 0.6))
    fig = _figure(min(width_in, 30.0), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    bar_w = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    for j, name in enumerate(series):
        means, low, high, xs = [], [], [], []
        for i, cat in enumerate(categories):
            cell = table[cat].get(name)
            if cell is None:
                continue
            xs.append(x[i] - 0.4 + bar_w * (j + 0.5))
            means.append(cell["mean"])
            low.append(cell["mean"] - cell.get("ci_low", cell["mean"]))
            high.append(cell.get("ci_high", cell["mean"]) - cell["mean"])
        ax.bar(xs, means, bar_w * 0.95, yerr=[low, high], capsize=2, color=colors[name],
               label=name, edgecolor="black", linewidth=0.4)
        if len(categories) * len(series) <= 40:  # the value, upright at the foot of each bar
            for bx, value in zip(xs, means):
                ax.text(bx, 0.015 if ylim == (0.0, 1.0) else 0, f"{value:.3f}", rotation=90, ha="center",
                        va="bottom", fontsize=7, bbox={"facecolor": "white", "alpha": 0.7, "pad": 0.6,
                                                       "linewidth": 0})
    labels = []
    for cat in categories:
        counts = {int(c["n"]) for c in table[cat].values() if "n" in c}
        labels.append(f"{cat}\n(n={counts.pop()})" if len(counts) == 1 else str(cat))
    ax.set_xticks(x, labels, fontsize=9, rotation=0 if len(categories) <= 6 else 30,
                  ha="center" if len(categories) <= 6 else "right")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncols=min(len(series), 4), loc="upper center",
              bbox_to_anchor=(0.5, -0.18 if len(categories) <= 6 else -0.3), frameon=False)
    ax.set_title(with_warning(title, random_weights), fontsize=11,
                 color="red" if random_weights else "black")
    fig.tight_layout()
    return _save(fig, path)


def save_box_plot(path: str | Path, values: Mapping[str, Sequence[float]], ylabel: str, title: str,
                  random_weights: bool = False, baselines: Sequence[str] = (),
                  ylim: tuple[float, float] | None = (0.0, 1.0), seed: int = 0) -> Path:
    """Box plot of per-image values per series, every image drawn as a (jittered) dot.

    Args:
        values: ``{series: per-image values}`` (e.g. per-image Dice of each model).
        baselines: series names drawn in grey.
    """
    from matplotlib.colors import to_rgba

    names = list(values)
    colors = series_colors(names, baselines)
    fig = _figure(max(5.0, 1.4 * len(names) + 1.5), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    data = [np.asarray(values[n], dtype=float) for n in names]
    rng = np.random.default_rng(seed)
    for i, (name, d) in enumerate(zip(names, data), start=1):  # the dots under the boxes
        many = len(d) > 50
        ax.scatter(i + rng.uniform(-0.2, 0.2, size=len(d)), d, s=4 if many else 12, color=colors[name],
                   alpha=0.35 if many else 0.9, edgecolor="none" if many else "black", linewidth=0.3,
                   zorder=1)
    box = ax.boxplot(data, patch_artist=True, widths=0.55, showfliers=False, zorder=2,
                     medianprops={"color": "black", "linewidth": 1.5},
                     whiskerprops={"linewidth": 1.2}, capprops={"linewidth": 1.2})
    for patch, name in zip(box["boxes"], names):
        patch.set_facecolor(to_rgba(colors[name], 0.35))
        patch.set_edgecolor("black")
    for i, d in enumerate(data, start=1):
        if len(d):
            ax.text(i, 1.01 if ylim == (0.0, 1.0) else float(np.max(d)), f"mean {np.mean(d):.3f}",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(d)})" for n, d in zip(names, data)],
                  fontsize=9, rotation=0 if len(names) <= 5 else 20)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(ylim[0], ylim[1] + 0.07 * (ylim[1] - ylim[0]))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(with_warning(title, random_weights), fontsize=11,
                 color="red" if random_weights else "black")
    fig.tight_layout()
    return _save(fig, path)


def save_metric_bars(path: str | Path, summary: Mapping[str, Mapping[str, Mapping[str, float]]],
                     metric_labels: Mapping[str, str], title: str, random_weights: bool = False,
                     baselines: Sequence[str] = ()) -> Path:
    """The comparison figure: for each metric a group of bars, one per model (mean, 95 % CI).

    Args:
        summary: ``{model: {metric: {"mean", "ci_low", "ci_high"}}}``.
        metric_labels: ``{metric key: axis label}`` in display order, e.g. ``{"dice": "Dice"}``.
    """
    table = {label: {model: summary[model][key] for model in summary if key in summary[model]}
             for key, label in metric_labels.items()}
    return save_grouped_bars(path, table, "per-image mean (95 % CI)", title, random_weights, baselines)


# --------------------------------------------------------------------------------------------
# Parameter search
# --------------------------------------------------------------------------------------------
def save_search_history(path: str | Path, points: Sequence[tuple[int, float, str, str]], title: str,
                        random_weights: bool = False) -> Path:
    """Score per trial (``(trial number, score, "complete" | "pruned", name)``, a pruned trial at
    its last fold's score) with the best completed score so far as a step line to the last trial;
    the five best are numbered on the plot and named in a list under it."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(8.0, 5.4)
    ax, table = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4, 1]})
    done = sorted((n, v) for n, v, state, _ in points if state == "complete")
    pruned = [(n, v) for n, v, state, _ in points if state != "complete"]
    if done:
        xs, ys = zip(*done)
        ax.scatter(xs, ys, s=28, color=MODEL_COLORS[0], edgecolor="black", linewidth=0.4, zorder=3,
                   label=f"finished ({len(done)})")
        last = max(n for n, *_ in points)
        ax.step([*xs, last], [*np.maximum.accumulate(ys), max(ys)], where="post", color=MODEL_COLORS[1],
                linewidth=1.5, zorder=2, label=f"best so far ({max(ys):.4f})")
    if pruned:
        xs, ys = zip(*pruned)
        ax.scatter(xs, ys, s=28, marker="x", color=BASELINE_COLORS[0], zorder=3,
                   label=f"pruned ({len(pruned)}), at its last fold")
    best = sorted((p for p in points if p[2] == "complete"), key=lambda p: (-p[1], p[0]))[:5]
    for rank, (n, v, _, name) in enumerate(best, start=1):
        ax.annotate(str(rank), (n, v), xytext=(5, 3), textcoords="offset points", fontsize=8, fontweight="bold")
    table.axis("off")
    table.text(0.0, 1.0, "\n".join(f"{rank}. {name}  (trial {n}): {v:.4f}" for rank, (n, v, _, name)
                                    in enumerate(best, start=1)), va="top", fontsize=8, family="monospace",
               transform=table.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.08, y=0.15)
    ax.set_xlabel("trial (in the order started)")
    ax.set_ylabel("cross-validated Dice")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(with_warning(title, random_weights), fontsize=11, color="red" if random_weights else "black")
    fig.tight_layout()
    return _save(fig, path)


def save_importance(path: str | Path, importances: Mapping[str, float], title: str,
                    random_weights: bool = False, fixed: Sequence[str] = ()) -> Path:
    """Horizontal bars of each hyper-parameter's importance (shares summing to 1), largest on
    top; the names in ``fixed`` (one value in the whole search) are marked as such."""
    names = sorted(importances, key=lambda k: importances[k])
    fig = _figure(7.5, 1.4 + 0.6 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    values = [importances[n] for n in names]
    ax.barh([f"{n}\n(one value)" if n in fixed else n for n in names], values, color=MODEL_COLORS[0],
            edgecolor="black", linewidth=0.4)
    for y, value in enumerate(values):
        ax.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("importance (share of the variance of the cross-validated Dice)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(with_warning(title, random_weights), fontsize=10, color="red" if random_weights else "black")
    fig.tight_layout()
    return _save(fig, path)
