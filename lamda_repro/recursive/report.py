"""Paper-style table (Markdown, CSV, LaTeX) and figure (average accuracy against non-embedding
parameters) from recursive run records."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd


def _describe_variant(run: dict[str, Any]) -> str:
    variant = run.get("variant", "?")
    if variant == "original":
        return "full size" + (" (uptrained)" if run.get("uptrain") else "")
    if variant == "truncated":
        return f"first L/{run.get('num_loops')} layers"
    if variant == "scratch":
        return f"L/{run.get('num_loops')} layers, from scratch"
    text = f"recursive B={run.get('num_loops')} {run.get('sharing', 'cycle')} {run.get('init', 'stepwise')}"
    if run.get("lora_rank"):
        text = f"relaxed r={run['lora_rank']} ({run.get('lora_init', 'svd')}) " + text[len("recursive ") :]
    return text


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record: model, run, description, parameters, per-task accuracy, average, perplexity."""
    rows = []
    for rec in records:
        if rec.get("kind") != "recursive":
            continue
        run = rec.get("spec", {}).get("run", {})
        model = rec.get("spec", {}).get("model", {})
        row = {
            "model": model.get("label", run.get("model", "?")),
            "run": run.get("name", rec.get("run_id")),
            "run_id": rec.get("run_id"),
            "variant": _describe_variant(run),
            "status": rec.get("status"),
            "non_embedding_params": rec.get("params", {}).get("non_embedding"),
        }
        metrics = rec.get("metrics", {}) if rec.get("status") == "success" else {}
        for key, value in metrics.items():
            row[key] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["model", "non_embedding_params", "run"], na_position="last").reset_index(
        drop=True
    )


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
    columns = ["model", "variant", "non_embedding_params", *task_cols, "average", "perplexity"]
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
        **{c: c[len("acc_") :] for c in task_cols},
    }
    shown = shown.rename(columns=headers)
    write_text_atomic(out_stem.with_suffix(".csv"), to_csv(frame))
    write_text_atomic(out_stem.with_suffix(".md"), to_markdown(shown))
    write_text_atomic(out_stem.with_suffix(".tex"), to_latex(shown))
    return frame


def plot_accuracy_vs_params(records: list[dict[str, Any]], out_path: str | Path) -> Path:
    """Scatter of average accuracy (%) against non-embedding parameters, one marker per variant kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = records_frame(records)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    if not frame.empty and "average" in frame:
        done = frame.dropna(subset=["average", "non_embedding_params"])
        markers = {"full": "*", "recursive": "o", "relaxed": "s", "first": "v", "L/": "^"}
        for _, row in done.iterrows():
            marker = next((m for key, m in markers.items() if row["variant"].startswith(key)), "x")
            ax.scatter(row["non_embedding_params"] / 1e6, 100 * row["average"], marker=marker, s=50)
            ax.annotate(
                row["run"],
                (row["non_embedding_params"] / 1e6, 100 * row["average"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("average few-shot accuracy (%)")
    ax.set_title("Recursive Transformers: accuracy vs. size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
