"""The serving table (Markdown with notes, booktabs LaTeX, CSV) and the threshold figure, from the
serving record alone (no model code imported: the table job stays light)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

SCHEDULER_NAMES = {"static": "static", "csb": "CSB", "cdb": "CDB"}


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "ratio":
        return f"x{value:.2f}"
    if kind == "error":
        return f"{100 * value:+.0f}%"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "tps":
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    if kind == "float":
        return f"{value:.2f}"
    return str(value)


PAPER_FAMILY, PAPER_TASK, PAPER_METRIC = "serving", "throughput", "speedup_vs_vanilla_static"


def paper_method(model: str, scheduler: str, early_exit: bool) -> str:
    """The reference file's method key of a paper-geometry row, e.g. ``recursive_cdb_exit``."""
    return f"{model}_{scheduler}" + ("_exit" if early_exit else "")


def serving_frame(record: dict[str, Any], reference=None) -> pd.DataFrame:
    """One row per (model, scheduler, exit) of the record: measured and simulated side by side,
    then the paper-geometry estimate rows (simulated only; the paper's ΔV from ``reference``,
    a claims.Reference, where it holds one)."""
    rows = []
    for r in record.get("results") or []:
        quality = r.get("quality") or {}
        rows.append(
            {
                "setting": "smoke: measured + simulated",
                "model": r["model"],
                "kind": r["kind"],
                "scheduler": r["scheduler"],
                "early_exit": r["early_exit"],
                "threshold": r.get("threshold"),
                "max_batch": r["max_batch"],
                "measured_tokens_per_s": r["measured_tokens_per_s"],
                "measured_vs_vanilla_static": r["measured_vs_vanilla_static"],
                "simulated_tokens_per_s": r["simulated_tokens_per_s"],
                "simulated_vs_vanilla_static": r["simulated_vs_vanilla_static"],
                "paper_vs_vanilla_static": None,
                "prediction_error": r["prediction_error"],
                "mean_loops": quality.get("mean_loops"),
                "perplexity": quality.get("perplexity"),
                "average": quality.get("average"),
            }
        )
    estimates = [("simulated", record.get("paper_estimate"))] + [
        (f"roofline estimate, {e['accelerator']['name']}", e) for e in record.get("paper_roofline") or []
    ]
    for what, paper in estimates:
        if not paper:
            continue
        for r in paper["rows"]:
            rows.append(
                {
                    "setting": f"paper geometry {paper['geometry']}: {what}",
                    "model": r["model"],
                    "kind": r["model"].split("_")[0],
                    "scheduler": r["scheduler"],
                    "early_exit": r["early_exit"],
                    "threshold": "oracle" if r["early_exit"] else None,
                    "max_batch": r["max_batch"],
                    "measured_tokens_per_s": None,
                    "measured_vs_vanilla_static": None,
                    "simulated_tokens_per_s": r["tokens_per_s"],
                    "simulated_vs_vanilla_static": r["vs_vanilla_static"],
                    "paper_vs_vanilla_static": reference.table_value(
                        PAPER_FAMILY,
                        PAPER_TASK,
                        paper["geometry"],
                        paper_method(r["model"], r["scheduler"], r["early_exit"]),
                        PAPER_METRIC,
                    )
                    if reference is not None
                    else None,
                    "prediction_error": None,
                    "mean_loops": None,
                    "perplexity": None,
                    "average": None,
                }
            )
    return pd.DataFrame(rows)


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=["Setting", "Model", "Batching"])

    def batching(row):
        name = SCHEDULER_NAMES[row["scheduler"]]
        if not row["early_exit"]:
            return name
        threshold = row["threshold"]
        return f"{name} + exit ({threshold if isinstance(threshold, str) else _fmt(threshold, 'float')})"

    return pd.DataFrame(
        {
            "Setting": frame["setting"],
            "Model": [f"{m} ({k})" for m, k in zip(frame["model"], frame["kind"], strict=True)],
            "Batching": [batching(r) for _, r in frame.iterrows()],
            "Max batch": frame["max_batch"].astype(str),
            "Measured tok/s": [_fmt(v, "tps") for v in frame["measured_tokens_per_s"]],
            "Measured ΔV": [_fmt(v, "ratio") for v in frame["measured_vs_vanilla_static"]],
            "Simulated tok/s": [_fmt(v, "tps") for v in frame["simulated_tokens_per_s"]],
            "Simulated ΔV": [_fmt(v, "ratio") for v in frame["simulated_vs_vanilla_static"]],
            "Sim. error": [_fmt(v, "error") for v in frame["prediction_error"]],
            "Paper ΔV": [_fmt(v, "ratio") for v in frame["paper_vs_vanilla_static"]],
            "Loops/token": [_fmt(v, "float") for v in frame["mean_loops"]],
            "PPL": [_fmt(v, "float") for v in frame["perplexity"]],
            "Avg acc": [_fmt(v, "pct") for v in frame["average"]],
        }
    )


def _notes(record: dict[str, Any]) -> list[str]:
    notes = []
    if record.get("status") != "success":
        return [f"The serving benchmark failed: {record.get('error')}."]
    wl = record.get("workload") or {}
    device = (record.get("throughput") or {}).get("device", "?")
    notes.append(
        f"Smoke rows: the real engine on {device}, workload of {wl.get('num_requests')} requests "
        f"(prompt {wl.get('prompt_len')}, generation {wl.get('gen_len')} tokens, "
        f"{wl.get('arrival')} arrivals), "
        "decode tokens/s (prefill excluded), median of the repeats; ΔV = relative to the vanilla model "
        "with static batching; all runs interleaved (8 steps per turn) with the sampling of the latency "
        "tables. Simulated = the simulator on those tables with the exit distribution the engine "
        "observed; Sim. error = (simulated - measured) / measured. "
        "Quality: held-out perplexity and mean lm-eval accuracy at that exit threshold "
        "(the early-exit record's sweep; without exit: the final loop)."
    )
    match = record.get("greedy_outputs_match") or {}
    if match:
        notes.append(
            "Greedy outputs of every scheduler without early exit agree: "
            + ", ".join(f"{rid} {'yes' if ok else 'NO'}" for rid, ok in match.items())
            + "."
        )
    paper = record.get("paper_estimate")
    if paper:
        models = paper["models"]
        batches = ", ".join(f"{name} {m['max_batch']}" for name, m in models.items())
        extrapolated = [name for name, m in models.items() if m["extrapolated_beyond_measured_sizes"]]
        wp = paper["workload"]
        dist = [round(p, 3) for p in paper["exit_distribution"]]
        notes.append(
            f"Paper-geometry rows ({paper['geometry']}, B={paper['num_loops']}): simulated only. "
            "Latency of one "
            f"layer measured on {paper['latency_device']} ({paper['latency_source']}, KV length "
            f"{paper['latency_context']}, batch sizes {paper['latency_sizes']}), times the layers of a block "
            f"call; {paper['counted']}. Memory-bound batch from {paper['memory_budget_gb']} GB at "
            f"{paper['element_bytes']} bytes per element: {batches}"
            + (
                f" (tables extrapolated linearly beyond the largest measured size for {extrapolated})"
                if extrapolated
                else ""
            )
            + f". Workload: {wp['num_requests']} requests, prompt {wp['prompt_len']}, "
            f"generation {wp['gen_len']}. Exit distribution {dist}: "
            f"{paper['exit_distribution_source']}. Paper ΔV: the paper's Table K.2 (A100 tables; "
            "results/reference/papers.yaml). Tables measured on a CPU, where a block call's time grows "
            "with the batch, cannot show the batching gains of a memory-bound GPU."
        )
    for paper in record.get("paper_roofline") or []:
        acc = paper["accelerator"]
        batches = ", ".join(f"{name} {m['max_batch']}" for name, m in paper["models"].items())
        dist = [round(p, 3) for p in paper["exit_distribution"]]
        notes.append(
            f"Paper-geometry rows ({paper['geometry']}, B={paper['num_loops']}), roofline estimate on "
            f"{acc['name']} (peak dense bf16 {acc['peak_flops'] / 1e12:g} TFLOP/s, HBM "
            f"{acc['bandwidth'] / 1e9:,.0f} GB/s, {acc['memory_bytes'] / 1e9:g} GB; {acc['source']}): "
            f"no GPU measured these; {paper['counted']}; KV length {paper['latency_context']} (the "
            f"workload's mean context). Memory-bound batch from the GPU's memory at "
            f"{paper['element_bytes']} bytes per element: {batches}. Exit distribution {dist}: "
            f"{paper['exit_distribution_source']}. Paper ΔV: Table K.2 (measured on an A100 40GB)."
        )
    return notes


def write_serving_table(record: dict[str, Any], out_stem: str | Path, reference=None) -> pd.DataFrame:
    """Write ``<stem>.md`` (with notes), ``.tex`` and ``.csv`` (all columns, raw numbers);
    ``reference`` (claims.Reference) supplies the paper's column."""
    from lamda_repro.results import write_text_atomic
    from lamda_repro.tables import to_csv, to_latex, to_markdown

    frame = serving_frame(record, reference)
    shown = _display(frame)
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    title = "Serving throughput: early exit and depth-wise batching"
    md = f"# {title}\n\n" + "".join(f"{n}\n\n" for n in _notes(record)) + to_markdown(shown)
    write_text_atomic(out_stem.with_suffix(".md"), md)
    write_text_atomic(out_stem.with_suffix(".tex"), to_latex(shown, caption=title, label="tab:serving"))
    write_text_atomic(out_stem.with_suffix(".csv"), to_csv(frame))
    return frame


def plot_threshold_sweep(record: dict[str, Any], out_path: str | Path) -> Path:
    """Throughput (CDB + exit, relative to vanilla static) against the confidence threshold, one
    line per served model (simulated from the held-out exit distributions; measured point at the
    engine's threshold), and held-out perplexity on the second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    quality_ax = ax.twinx()
    sweep = pd.DataFrame(record.get("sweep") or [])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if not sweep.empty:
        conf = sweep[sweep["rule"] == "confidence"].sort_values("threshold")
        for i, (model, part) in enumerate(conf.groupby("model", sort=True)):
            color = colors[i % len(colors)]
            ax.plot(
                part["threshold"],
                part["simulated_vs_vanilla_static"],
                "-o",
                color=color,
                label=f"{model} simulated",
            )
            quality_ax.plot(
                part["threshold"], part["perplexity"], "--", color=color, alpha=0.7, label=f"{model} PPL"
            )
            measured = [
                r
                for r in record.get("results") or []
                if r["model"] == model and r["scheduler"] == "cdb" and r["early_exit"]
            ]
            for r in measured:
                ax.scatter(
                    [r["threshold"]],
                    [r["measured_vs_vanilla_static"]],
                    marker="*",
                    s=140,
                    color=color,
                    edgecolor="black",
                    zorder=5,
                    label=f"{model} measured",
                )
    ax.set_xlabel("confidence threshold of early exit")
    ax.set_ylabel("CDB + exit tokens/s vs vanilla static")
    quality_ax.set_ylabel("held-out perplexity (dashed)")
    ax.set_title("Throughput and quality against the exit threshold")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    extra = quality_ax.get_legend_handles_labels()
    if handles[0] or extra[0]:
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


__all__ = ["serving_frame", "write_serving_table", "plot_threshold_sweep"]
