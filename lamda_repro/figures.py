"""Figures: quality against cost (trainable parameters, train-state bytes, peak memory).

Each point is one (experiment, model, method) of a family; its quality is the table's ``avg``
(the mean over the family's tasks of the primary metric, higher-is-better metrics only, and only
when every task succeeded). The Pareto front (less cost, more quality) is drawn per
(experiment, model). Output names are fixed per family so that the workflow knows them ahead of
time; PNG and PDF are written without timestamps so the same records give the same files.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from lamda_repro.results import write_bytes_atomic  # noqa: E402
from lamda_repro.tables import FAMILY_TITLES, row_average  # noqa: E402

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


def plot_points(
    points: pd.DataFrame, xlabel: str, ylabel: str, title: str, log_x: bool, stem: Path, x_scale: float = 1.0
) -> list[str]:
    """Scatter with method labels and a Pareto step line per (experiment, model); PNG + PDF.

    ``log_x`` asks for a log x axis; it is used when the x values span at least a factor 10.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    usable = points.dropna(subset=["x", "y"])
    usable = usable[usable["x"] > 0] if log_x else usable
    if usable.empty:
        ax.text(
            0.5,
            0.5,
            "no runs yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=14,
            color="0.4",
        )
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        markers = "os^Dv<>p*h"
        groups = list(usable.groupby(["experiment", "model"], sort=True))
        for gi, ((experiment, model), group) in enumerate(groups):
            xs = (group["x"] / x_scale).tolist()
            ys = group["y"].tolist()
            label = model if len({g[0][0] for g in groups}) == 1 else f"{experiment}/{model}"
            ax.scatter(xs, ys, marker=markers[gi % len(markers)], s=40, label=label, zorder=3)
            for x, y, method in zip(xs, ys, group["method"], strict=True):
                ax.annotate(method, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            front = pareto_front(list(zip(xs, ys, strict=True)))
            ax.scatter(
                [xs[i] for i in front],
                [ys[i] for i in front],
                s=110,
                facecolors="none",
                edgecolors="black",
                linewidths=0.8,
                zorder=4,
            )
            if len(front) > 1:
                ax.step(
                    [xs[i] for i in front],
                    [ys[i] for i in front],
                    where="post",
                    linestyle="--",
                    linewidth=1,
                    color="0.5",
                    zorder=2,
                )
        xs_all = usable["x"] / x_scale
        if log_x and xs_all.max() >= 10 * xs_all.min():  # log only where it spreads the points
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8, title="ringed + dashed: Pareto front", title_fontsize=8)
        ax.grid(True, linewidth=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, stem)


def write_family_figures(cells: pd.DataFrame, family: str, out_dir: str | Path) -> list[str]:
    """The three quality-vs-cost figures of one family (PNG + PDF each)."""
    out_dir = Path(out_dir)
    paths = []
    title = FAMILY_TITLES.get(family, family)
    for axis, (measure, label, log_x) in X_AXES.items():
        points = (
            family_points(cells, family, measure)
            if not cells.empty
            else pd.DataFrame(columns=["experiment", "model", "method", "x", "y"])
        )
        scale = (1 << 20) if measure.endswith("_bytes") else 1.0
        paths += plot_points(
            points,
            label,
            "avg over tasks of the primary metric",
            title,
            log_x,
            out_dir / f"{family}_quality_vs_{axis}",
            x_scale=scale,
        )
    return paths


__all__ = ["pareto_front", "family_points", "plot_points", "write_family_figures", "figure_names", "X_AXES"]
