"""Paper-style table (Markdown, CSV, LaTeX) and figure (average accuracy and perplexity against
non-embedding parameters, Pareto fronts marked) from recursive run records."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from lamda_repro.tables import pareto_front

# What a row is, for markers, legends and the Pareto analysis.
KINDS = ("full", "recursive", "truncated", "scratch", "lora", "lamda_depth", "shared_basis")
_MARKERS = {
    "full": "*",
    "recursive": "o",
    "truncated": "v",
    "scratch": "^",
    "lora": "s",
    "lamda_depth": "D",
    "shared_basis": "P",
}
_COLORS = {
    "full": "tab:brown",
    "recursive": "tab:orange",
    "truncated": "tab:blue",
    "scratch": "tab:purple",
    "lora": "tab:gray",
    "lamda_depth": "tab:green",
    "shared_basis": "tab:red",
}
_LABELS = {
    "full": "full size",
    "recursive": "recursive",
    "truncated": "first K layers",
    "scratch": "K layers from scratch",
    "lora": "relaxed: lora (paper)",
    "lamda_depth": "relaxed: lamda_depth",
    "shared_basis": "relaxed: shared_basis",
}


def run_kind(run: dict[str, Any]) -> str:
    """One of KINDS: the variant, or the relaxation kind of a relaxed recursive run."""
    variant = run.get("variant", "?")
    if variant == "original":
        return "full"
    if variant != "recursive":
        return str(variant)
    relaxation = run.get("relaxation")
    if isinstance(relaxation, dict):
        return str(relaxation.get("kind", "lora"))
    return "lora" if run.get("lora_rank") else "recursive"


def _budget_text(run: dict[str, Any], info: dict[str, Any]) -> str:
    budget = (run.get("relaxation") or {}).get("budget")
    if isinstance(budget, dict) and "lora_rank" in budget:
        return f"budget = lora r={budget['lora_rank']}"
    if info.get("budget"):
        return f"budget {info['budget']:,}"
    return ""


def _rank_text(info: dict[str, Any]) -> str:
    histogram = info.get("rank_histogram") or {}
    if info.get("allocation") == "spectral" and len(histogram) > 1:
        ranks = [int(label.split("x")[0]) for label in histogram]
        return f"r={min(ranks)}-{max(ranks)} spectral"
    labels = list(histogram)
    if not labels:
        return ""
    # Uniform: the largest (uncapped) rank names the setting.
    return "r=" + max(labels, key=lambda label: [int(x) for x in label.split("x")])


def _describe_variant(run: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    info = info or {}
    variant = run.get("variant", "?")
    if variant == "original":
        return "full size" + (" (uptrained)" if run.get("uptrain") else "")
    if variant == "truncated":
        return f"first L/{run.get('num_loops')} layers"
    if variant == "scratch":
        return f"L/{run.get('num_loops')} layers, from scratch"
    shape = f"B={run.get('num_loops')} {run.get('sharing', 'cycle')} {run.get('init', 'stepwise')}"
    kind = run_kind(run)
    if kind == "recursive":
        return f"recursive {shape}"
    if kind == "lora" and run.get("lora_rank"):
        return f"relaxed r={run['lora_rank']} ({run.get('lora_init', 'svd')}) {shape}"
    details = ", ".join(t for t in (_rank_text(info), _budget_text(run, info)) if t)
    return f"relaxed {kind} ({details}) {shape}" if details else f"relaxed {kind} {shape}"


def _mark_fronts(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["front"] = ""
    for _, group in frame.groupby("model"):
        for column, maximize, label in (("average", True, "acc"), ("perplexity", False, "ppl")):
            if column not in group:
                continue
            done = group.dropna(subset=[column, "non_embedding_params"])
            if done.empty:
                continue
            marks = pareto_front(
                list(done["non_embedding_params"].astype(float)), list(done[column].astype(float)), maximize
            )
            for index, on in zip(done.index, marks, strict=True):
                if on:
                    frame.loc[index, "front"] = ", ".join(x for x in (frame.loc[index, "front"], label) if x)
    return frame


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record: model, run, kind, description, parameters, per-task accuracy, average,
    perplexity, and ``front`` (acc / ppl: on that Pareto front of its model)."""
    rows = []
    for rec in records:
        if rec.get("kind") != "recursive":
            continue
        run = rec.get("spec", {}).get("run", {})
        model = rec.get("spec", {}).get("model", {})
        info = (rec.get("method_info") or {}).get("relaxation") or {}
        row = {
            "model": model.get("label", run.get("model", "?")),
            "run": run.get("name", rec.get("run_id")),
            "run_id": rec.get("run_id"),
            "kind": run_kind(run),
            "variant": _describe_variant(run, info),
            "status": rec.get("status"),
            "non_embedding_params": rec.get("params", {}).get("non_embedding"),
            "relaxation_params": rec.get("params", {}).get("relaxation"),
        }
        metrics = rec.get("metrics", {}) if rec.get("status") == "success" else {}
        for key, value in metrics.items():
            row[key] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.sort_values(["model", "non_embedding_params", "run"], na_position="last").reset_index(
        drop=True
    )
    return _mark_fronts(frame)


def paper_rows(frame: pd.DataFrame, cells: list[dict[str, Any]]) -> pd.DataFrame:
    """``frame`` with the paper's numbers added as rows of status ``paper``, each placed right
    after the run it is the counterpart of (reference cells of results/reference/papers.yaml:
    table, row, column, run id, value in percent, the paper's non-embedding count). Only cells of
    runs present in ``frame`` are shown, so a config without the paper's runs gets none."""
    if frame.empty or not cells:
        return frame
    runs = {row["run_id"]: row for _, row in frame.iterrows()}
    added, seen = [], set()
    for cell in cells:
        own = runs.get(cell.get("run"))
        key = (cell.get("run"), cell.get("value"))
        if own is None or key in seen or cell.get("metric", "average") != "average":
            continue
        seen.add(key)
        added.append(
            {
                "model": own["model"],
                "run": own["run"],
                "run_id": own["run_id"],
                "variant": f"paper, Table {cell['table']}: {cell['column']}",
                "status": "paper",
                "non_embedding_params": cell.get("non_embedding"),
                "average": float(cell["value"]) / 100,
                "_order": own["_order"] + 0.5,
            }
        )
    if not added:
        return frame
    out = pd.concat([frame, pd.DataFrame(added)], ignore_index=True)
    return out.sort_values(["_order", "variant"]).reset_index(drop=True)


def _format(value: Any, column: str, status: str | None = None) -> str:
    if column == "front":
        return value if isinstance(value, str) else ""  # paper rows have no front mark
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "failed" if column != "non_embedding_params" and status != "paper" else "-"
    if column == "non_embedding_params":
        return f"{value / 1e6:.3f}M" if value < 1e9 else f"{value / 1e9:.2f}B"
    if column == "perplexity":
        return f"{value:.2f}"
    if column.startswith("acc_") or column == "average":
        return f"{100 * value:.1f}"
    return str(value)


def write_table(
    records: list[dict[str, Any]], out_stem: str | Path, reference_cells: list[dict[str, Any]] | None = None
) -> pd.DataFrame:
    """Write ``<out_stem>.md``, ``.csv`` and ``.tex``; accuracies in percent, failed runs marked,
    Pareto-front membership (accuracy, perplexity vs non-embedding parameters) in column Front, and
    the paper's numbers (``reference_cells``) as ``paper`` rows under their runs."""
    from lamda_repro.results import write_text_atomic
    from lamda_repro.tables import to_csv, to_latex, to_markdown

    frame = records_frame(records)
    if not frame.empty:
        frame["_order"] = range(len(frame))
        frame = paper_rows(frame, reference_cells or []).drop(columns=["_order", "run_id"])
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    if frame.empty:
        frame = pd.DataFrame(columns=["model", "run", "variant", "status", "non_embedding_params", "average"])
    task_cols = sorted(c for c in frame.columns if c.startswith("acc_"))
    columns = ["model", "variant", "non_embedding_params", *task_cols, "average", "perplexity", "front"]
    columns = [c for c in columns if c in frame.columns]
    shown = pd.DataFrame(
        {
            c: [_format(v, c, st) for v, st in zip(frame[c], frame["status"], strict=True)]
            if c not in ("model", "variant")
            else frame[c]
            for c in columns
        }
    )
    headers = {
        "model": "Model",
        "variant": "Variant",
        "non_embedding_params": "N-emb",
        "average": "Avg",
        "perplexity": "PPL",
        "front": "Front",
        **{c: c[len("acc_") :] for c in task_cols},
    }
    shown = shown.rename(columns=headers)
    write_text_atomic(out_stem.with_suffix(".csv"), to_csv(frame))
    write_text_atomic(out_stem.with_suffix(".md"), to_markdown(shown))
    write_text_atomic(out_stem.with_suffix(".tex"), to_latex(shown))
    return frame


def _panel(ax, frame: pd.DataFrame, column: str, maximize: bool, scale: float, ylabel: str) -> None:
    done = frame.dropna(subset=[column, "non_embedding_params"]) if column in frame else frame.iloc[0:0]
    if done.empty:
        return
    values = done[column].astype(float) * scale
    # Far-off points (e.g. a model from scratch) would flatten the rest: they are drawn at the
    # panel's edge, with their value written next to them.
    best = values.max() if maximize else values.min()
    limit = best - 0.5 * abs(best) if maximize else 1.5 * best
    far = values < limit if maximize else values > limit
    near = values[~far]
    low, high = near.min(), near.max()
    pad = 0.08 * max(high - low, 1e-9)
    seen = set()
    for _, group in done.groupby("model"):
        xs = list(group["non_embedding_params"].astype(float) / 1e6)
        ys = list(group[column].astype(float) * scale)
        for x, y, kind, run in zip(xs, ys, group["kind"], group["run"], strict=True):
            label = _LABELS.get(kind, kind) if kind not in seen else None
            seen.add(kind)
            off = y < limit if maximize else y > limit
            shown = (low - pad if maximize else high + pad) if off else y
            style = dict(marker=_MARKERS.get(kind, "x"), color=_COLORS.get(kind, "black"), s=45, zorder=3)
            ax.scatter(x, shown, label=label, **style)
            text = f"{run} ({y:.1f}, off scale)" if off else run
            ax.annotate(text, (x, shown), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = [(x, y) for x, y, on in zip(xs, ys, pareto_front(xs, ys, maximize), strict=True) if on]
        front = sorted((x, y) for x, y in front if not (y < limit if maximize else y > limit))
        if front:
            fx, fy = zip(*front, strict=True)
            ax.step(fx, fy, where="post", color="black", lw=1, ls="--", zorder=2)
            ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="black", lw=1, zorder=4)
    ax.set_ylim(low - 2 * pad, high + 2 * pad)
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_accuracy_vs_params(records: list[dict[str, Any]], out_path: str | Path) -> Path:
    """Average accuracy (%) and held-out perplexity against non-embedding parameters, one marker
    per kind (variant or relaxation), the Pareto front of each panel circled and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = records_frame(records)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig, (acc_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    if not frame.empty:
        _panel(acc_ax, frame, "average", True, 100.0, "average accuracy (%)")
        _panel(ppl_ax, frame, "perplexity", False, 1.0, "held-out perplexity (lower is better)")
    acc_ax.set_title("accuracy vs. size (front: dashed, circled)")
    ppl_ax.set_title("perplexity vs. size (front: dashed, circled)")
    handles, labels = acc_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with the lines between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced
    (how generated tables enter the docs)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no block {begin} ... {end} in the file")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{content.rstrip()}\n{end}{tail}"
