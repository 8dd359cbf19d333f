"""Figures: quality against cost (trainable parameters, train-state bytes, peak memory).

A family's figure has one panel per task (y = the task's primary metric, the seed mean of each
(experiment, model, method) cell with a successful run), so every successful run is plotted even
where a row has no average (E2E and WikiText-2 are separate experiments of one family); with two
or more tasks a first panel shows the table's ``avg`` (the mean over the family's tasks of the
primary metric, higher-is-better metrics only, and only when every task succeeded). Methods are
told apart by colour and models by marker, named once in a legend below the panels, so labels
never overlap the points or each other. The Pareto front (less cost, better quality) is ringed
and joined per (experiment, model) in each panel. Output names are fixed per family so that the
workflow knows them ahead of time; PNG and PDF are written without timestamps so the same records
give the same files.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from lamda_repro.results import write_bytes_atomic  # noqa: E402
from lamda_repro.tables import (  # noqa: E402
    FAMILY_TITLES,
    display_scale,
    higher_is_better,
    row_average,
    task_metric,
)

# x axis name -> (cell column, axis label, log scale)
X_AXES = {
    "params": ("trainable", "trainable parameters", True),
    "train_state": ("train_state_bytes", "train state (params + grads + optimizer + saved) [MiB]", True),
    "peak_memory": ("peak_bytes", "peak memory [MiB]", False),
}
FORMATS = ("png", "pdf")
_PNG_METADATA = {"Software": None}
_PDF_METADATA = {"CreationDate": None, "Producer": None, "Creator": None}


def figure_names(family: str) -> list[str]:
    """File names (without folder) of the figures of one fine-tuning family."""
    return [f"{family}_quality_vs_{axis}.{fmt}" for axis in X_AXES for fmt in FORMATS]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower-or-equal x and higher-or-equal y,
    one of them strictly), sorted by x. Points with NaN coordinates are never on the front."""
    valid = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i in valid:
        xi, yi = points[i]
        dominated = any(
            (points[j][0] <= xi and points[j][1] >= yi) and (points[j][0] < xi or points[j][1] > yi)
            for j in valid
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def family_points(cells: pd.DataFrame, family: str, measure: str) -> pd.DataFrame:
    """One point per (experiment, model, method): x = mean of ``measure`` over tasks, y = avg."""
    cells = cells[cells["family"] == family]
    rows = []
    tasks = sorted(cells["task"].unique())
    for (experiment, model, method), group in cells.groupby(["experiment", "model", "method"], sort=True):
        by_task = [group[group["task"] == t].iloc[0] if (group["task"] == t).any() else None for t in tasks]
        y = row_average(by_task)
        x = group[measure].dropna()
        rows.append(
            {
                "experiment": experiment,
                "model": model,
                "method": method,
                "x": float(x.mean()) if len(x) else math.nan,
                "y": y,
            }
        )
    return pd.DataFrame(rows, columns=["experiment", "model", "method", "x", "y"])


def task_points(cells: pd.DataFrame, family: str, task: str, measure: str) -> pd.DataFrame:
    """One point per (experiment, model, method) cell of ``task`` with a successful run: x = its
    ``measure``, y = the seed mean of the primary metric in display units (percent points for
    accuracy-type metrics)."""
    mine = cells[(cells["family"] == family) & (cells["task"] == task) & (cells["n_failed"] == 0)]
    rows = [
        {
            "experiment": c.experiment,
            "model": c.model,
            "method": c.method,
            "x": float(getattr(c, measure)),
            "y": float(c.mean) * display_scale(c.primary_metric),
        }
        for c in mine.itertuples(index=False)
        if not math.isnan(c.mean)
    ]
    return pd.DataFrame(rows, columns=["experiment", "model", "method", "x", "y"])


@dataclass
class Panel:
    """One axes of a family figure."""

    title: str
    ylabel: str
    points: pd.DataFrame  # experiment, model, method, x, y
    lower_is_better: bool = False


def family_panels(cells: pd.DataFrame, family: str, measure: str) -> list[Panel]:
    """The panels of one family's figure: the average over tasks (with two or more tasks), then
    one per task."""
    mine = cells[cells["family"] == family] if not cells.empty else cells
    if mine.empty:
        return []
    tasks = sorted(mine["task"].unique())
    panels = []
    avg = family_points(cells, family, measure).dropna(subset=["y"])
    if len(tasks) > 1 and not avg.empty:  # no panel where no row has an average
        panels.append(Panel("avg over tasks", "avg of the primary metrics", avg))
    for task in tasks:
        metric = task_metric(mine, task)
        lower = not higher_is_better(metric)
        label = f"{metric} ({'lower' if lower else 'higher'} is better)" if metric else "primary metric"
        panels.append(Panel(task, label, task_points(cells, family, task, measure), lower))
    return panels


def _save(fig, stem: Path) -> list[str]:
    paths = []
    for fmt in FORMATS:
        buffer = io.BytesIO()
        metadata = _PNG_METADATA if fmt == "png" else _PDF_METADATA
        fig.savefig(buffer, format=fmt, metadata=metadata, dpi=150, bbox_inches="tight")
        path = stem.with_name(f"{stem.name}.{fmt}")
        write_bytes_atomic(path, buffer.getvalue())
        paths.append(str(path))
    plt.close(fig)
    return paths


MARKERS = "os^Dv<>p*hP"


def _styles(panels: list[Panel]) -> tuple[dict[str, Any], dict[tuple[str, str], str], bool]:
    """Colour per method, marker per (experiment, model) over all panels, and whether the legend
    must name the experiment (several experiments) or the model alone will do. Methods are in
    name order; earlier methods get larger markers (see ``_marker_size``)."""
    non_empty = [p.points for p in panels if not p.points.empty]
    # a family whose runs all failed has panels without points: no styles, "no runs yet" panels
    points = pd.concat(non_empty, ignore_index=True) if non_empty else pd.DataFrame()
    methods = sorted(points["method"].unique()) if len(points) else []
    groups = sorted(set(zip(points["experiment"], points["model"], strict=True))) if len(points) else []
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    markers = {g: MARKERS[i % len(MARKERS)] for i, g in enumerate(groups)}
    return colours, markers, len({g[0] for g in groups}) > 1


def _marker_size(rank: int, n_methods: int) -> float:
    """Marker area of the ``rank``-th method: from 90 down to 20, drawn largest first, so that
    methods with the same cost and quality show as nested markers rather than hide each other."""
    return 90.0 - 70.0 * rank / max(1, n_methods - 1)


def _draw_panel(ax, panel: Panel, colours, markers, log_x: bool, x_scale: float) -> None:
    usable = panel.points.dropna(subset=["x", "y"])
    usable = usable[usable["x"] > 0] if log_x else usable
    ax.set_title(panel.title, fontsize=9)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if usable.empty:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    sign = -1.0 if panel.lower_is_better else 1.0
    for (experiment, model), group in usable.groupby(["experiment", "model"], sort=True):
        xs = (group["x"] / x_scale).tolist()
        ys = group["y"].tolist()
        for x, y, method in zip(xs, ys, group["method"], strict=True):
            rank = list(colours).index(method)
            ax.scatter(
                [x], [y], marker=markers[(experiment, model)], color=colours[method],
                s=_marker_size(rank, len(colours)), zorder=3 + rank / 100,
            )  # fmt: skip
        front = pareto_front([(x, sign * y) for x, y in zip(xs, ys, strict=True)])
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", linewidths=0.8, zorder=4)
        if len(front) > 1:
            ax.step(fx, fy, where="post", linestyle="--", linewidth=1, color="0.5", zorder=2)
    xs_all = usable["x"] / x_scale
    if log_x and xs_all.max() >= 10 * xs_all.min():  # log only where it spreads the points
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, linewidth=0.3)


def plot_panels(
    panels: list[Panel], xlabel: str, title: str, log_x: bool, stem: Path, x_scale: float = 1.0
) -> list[str]:
    """The panels side by side (three per row) with one legend below them; PNG + PDF.

    ``log_x`` asks for a log x axis; a panel uses it when its x values span a factor 10 or more.
    """
    n = max(1, len(panels))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows + 0.6), squeeze=False)
    flat = axes.ravel().tolist()
    if not panels:
        _draw_panel(flat[0], Panel(title, "", pd.DataFrame(columns=["x", "y"])), {}, {}, log_x, x_scale)
    else:
        colours, markers, name_experiment = _styles(panels)
        for ax, panel in zip(flat, panels, strict=False):
            _draw_panel(ax, panel, colours, markers, log_x, x_scale)
            ax.set_xlabel(xlabel, fontsize=8)
        handles = [Line2D([], [], marker="o", linestyle="", color=c, label=m) for m, c in colours.items()] + [
            Line2D([], [], marker=mk, linestyle="", color="0.3", label=f"{e}/{m}" if name_experiment else m)
            for (e, m), mk in markers.items()
        ]
        handles.append(
            Line2D([], [], marker="o", linestyle="--", color="0.5", markerfacecolor="none",
                   markeredgecolor="black", markersize=10, label="Pareto front")
        )  # fmt: skip
        if handles:
            fig.legend(
                handles=handles,
                loc="lower center",
                ncol=min(5, len(handles)),
                fontsize=7,
                frameon=False,
                bbox_to_anchor=(0.5, 0.0),
            )
    for ax in flat[len(panels) or 1 :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    legend_rows = math.ceil((len(fig.legends[0].legend_handles) if fig.legends else 0) / 5)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.1) / height, 1, 1))
    return _save(fig, stem)


def write_family_figures(cells: pd.DataFrame, family: str, out_dir: str | Path) -> list[str]:
    """The three quality-vs-cost figures of one family (PNG + PDF each)."""
    out_dir = Path(out_dir)
    paths = []
    title = FAMILY_TITLES.get(family, family)
    for axis, (measure, label, log_x) in X_AXES.items():
        panels = family_panels(cells, family, measure) if not cells.empty else []
        scale = (1 << 20) if measure.endswith("_bytes") else 1.0
        paths += plot_panels(
            panels, label, title, log_x, out_dir / f"{family}_quality_vs_{axis}", x_scale=scale
        )
    return paths


__all__ = [
    "pareto_front",
    "family_points",
    "task_points",
    "family_panels",
    "plot_panels",
    "write_family_figures",
    "figure_names",
    "X_AXES",
]
