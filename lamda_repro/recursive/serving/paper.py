"""The paper-scale throughput estimate: the simulator on latency tables of a published geometry.

The table file (written by ``recursive-serving-latency``) holds tables of ONE layer of the
geometry, measured on some device: ``plain`` (a shared layer, with the KV-policy fill of one
skipped position) and ``lora_r<r>`` (the same layer with depth-wise LoRAs of rank r, items at one
depth and spread over two). A block call of a model costs (layers per call) x that layer: L for
the vanilla model (one loop), K = L / B for the recursive and relaxed ones. Embedding and LM head
cost nothing here, as in the paper's analysis (it counts Transformer-block time only).

The memory-bound batch of each model: (budget - weights) / KV bytes per sequence at the given
element size, weights = non-embedding parameters (from the geometry's config) + embeddings.
"""

from __future__ import annotations

import functools
from typing import Any

from lamda_repro.recursive.counts import non_embedding_counts
from lamda_repro.recursive.serving.latency import GEOMETRIES, geometry_config
from lamda_repro.recursive.serving.simulator import (
    LatencyTable,
    LatencyTables,
    SimulatorError,
    memory_bound_batch,
    simulate,
)

ZERO = LatencyTable([1], [0.0])


def model_tables(layer: LatencyTables, layers_per_call: int, num_loops: int) -> LatencyTables:
    """A model's tables from one layer's: block and fill times x layers per call; no head/embedding."""
    scaled = layer.scaled(layers_per_call, ("block", "block_mixed", "fill"))
    return LatencyTables(
        embed=ZERO,
        block=scaled.block,
        head=ZERO,
        fill=scaled.fill if num_loops > 1 else ZERO,
        block_mixed=scaled.block_mixed if num_loops > 1 else None,
        num_loops=num_loops,
        meta={**layer.meta, "layers_per_block_call": layers_per_call},
    )


@functools.lru_cache(maxsize=64)
def _counts(geometry: str, num_loops: int, rank: int | None) -> dict[str, Any]:
    """non_embedding_counts of a published geometry (it builds the layer on the meta device: cached)."""
    return non_embedding_counts(geometry_config(geometry), num_loops, rank)


def paper_models(geometry: str, num_loops: int, lora_ranks: list[int], element_bytes: int) -> dict[str, Any]:
    """Parameter counts and weight bytes of the vanilla, recursive and relaxed models."""
    geo = GEOMETRIES[geometry]
    embedding = geo["vocab_size"] * geo["hidden_size"] * (1 if geo["tie_word_embeddings"] else 2)
    out = {}
    for rank in [None, *lora_ranks]:
        counts = _counts(geometry, num_loops, rank)
        if rank is None:
            out["vanilla"] = {"non_embedding": counts["vanilla"], "loops": 1}
            out["recursive"] = {"non_embedding": counts["recursive"], "loops": num_loops}
        else:
            out[f"relaxed_r{rank}"] = {"non_embedding": counts["relaxed"], "loops": num_loops, "rank": rank}
    for entry in out.values():
        entry["embedding"] = embedding
        entry["weight_bytes"] = (entry["non_embedding"] + embedding) * element_bytes
    return out


# The rows of the paper's Table K.2 (and CDB without exit, to show what the exits add): the
# roofline estimates simulate only these, which keeps the serving job's cost down.
PAPER_ROWS = (
    ("vanilla", "static", False),
    ("vanilla", "csb", False),
    ("recursive", "cdb", False),
    ("recursive", "cdb", True),
    ("relaxed", "cdb", True),
)


def paper_estimate(
    cfg: dict[str, Any],
    table_file: dict[str, Any],
    exit_distribution: list[float],
    exit_source: str,
    rows_only: tuple[tuple[str, str, bool], ...] | None = None,
    memory_budget_gb: float | None = None,
) -> dict[str, Any]:
    """Simulated tokens/s of the paper geometry for every scheduler (or the ``rows_only``
    (model kind, scheduler, exit) triples), with every input stated; ``memory_budget_gb``
    overrides the config's budget (an accelerator's memory)."""
    from lamda_repro.recursive.serving.config import workload_from

    geometry = table_file.get("geometry")
    if geometry not in GEOMETRIES:
        raise SimulatorError(f"latency-table file: unknown geometry {geometry!r}")
    tables = table_file.get("tables") or {}
    if "plain" not in tables:
        raise SimulatorError("latency-table file: no 'plain' layer tables")
    B = cfg["num_loops"]
    L = GEOMETRIES[geometry]["num_layers"]
    if L % B:
        raise SimulatorError(f"num_loops={B} does not divide the {L} layers of {geometry}")
    K = L // B
    ranks = [r for r in cfg.get("lora_ranks", []) if f"lora_r{r}" in tables]
    workload = workload_from(cfg["workload"], "recursive.serving.paper_estimate")
    models = paper_models(geometry, B, ranks, cfg["element_bytes"])
    geo = GEOMETRIES[geometry]
    kv_per_sequence = (
        2 * L * geo["num_kv_heads"] * geo["head_dim"] * workload.max_context * cfg["element_bytes"]
    )
    budget_gb = cfg["memory_budget_gb"] if memory_budget_gb is None else memory_budget_gb
    budget = budget_gb * 1e9
    plain = LatencyTables.from_dict(tables["plain"])
    layer_tables = {"vanilla": plain, "recursive": plain, **{f"relaxed_r{r}": None for r in ranks}}
    for r in ranks:
        layer_tables[f"relaxed_r{r}"] = LatencyTables.from_dict(tables[f"lora_r{r}"])
    rows, inputs = [], {}
    for name, entry in models.items():
        loops = entry["loops"]
        model_t = model_tables(layer_tables[name], L if loops == 1 else K, loops)
        batch = memory_bound_batch(budget, entry["weight_bytes"], kv_per_sequence)
        inputs[name] = {
            **entry,
            "max_batch": batch,
            "layers_per_block_call": L if loops == 1 else K,
            "extrapolated_beyond_measured_sizes": model_t.extrapolated_beyond(batch),
        }
        combos = [("static", False), ("csb", False)]
        if loops > 1:
            combos += [("cdb", False), ("static", True), ("csb", True), ("cdb", True)]
        if rows_only is not None:
            combos = [(s, e) for s, e in combos if (name.split("_")[0], s, e) in rows_only]
        for scheduler, early_exit in combos:
            result = simulate(scheduler, workload, model_t, batch, exit_distribution if early_exit else None)
            rows.append(
                {
                    "model": name,
                    "scheduler": scheduler,
                    "early_exit": early_exit,
                    "tokens_per_s": result.tokens_per_s,
                    "max_batch": batch,
                    "mean_call_size": result.summary()["mean_call_size"],
                }
            )
    base = next(r["tokens_per_s"] for r in rows if r["model"] == "vanilla" and r["scheduler"] == "static")
    for row in rows:
        row["vs_vanilla_static"] = row["tokens_per_s"] / base
    best = max(
        (r for r in rows if r["scheduler"] == "cdb" and r["early_exit"]), key=lambda r: r["vs_vanilla_static"]
    )
    return {
        "geometry": geometry,
        "geometry_params": GEOMETRIES[geometry],
        "num_loops": B,
        "latency_device": table_file.get("device"),
        "latency_measured_at": table_file.get("measured_at"),
        "latency_context": table_file.get("context"),
        "latency_sizes": plain.block.sizes
        if len(plain.block.sizes) <= 32
        else f"every size from {plain.block.sizes[0]} to {plain.block.sizes[-1]}",
        "latency_source": table_file.get("_path"),
        "counted": "Transformer-block calls and the KV-policy fill; embedding and LM head cost 0 "
        "(as in the paper)",
        "memory_budget_gb": budget_gb,
        "element_bytes": cfg["element_bytes"],
        "kv_bytes_per_sequence": kv_per_sequence,
        "workload": {
            "num_requests": workload.num_requests,
            "prompt_len": cfg["workload"]["prompt_len"],
            "gen_len": cfg["workload"]["gen_len"],
            "arrival": cfg["workload"].get("arrival", "burst"),
        },
        "exit_distribution": list(exit_distribution),
        "exit_distribution_source": exit_source,
        "models": inputs,
        "rows": rows,
        "speedup_cdb_exit_vs_vanilla_static": best["vs_vanilla_static"],
        "speedup_model": best["model"],
    }


def roofline_estimates(
    cfg: dict[str, Any], geometry: str, exit_distribution: list[float], exit_source: str
) -> list[dict[str, Any]]:
    """The paper estimate on roofline latency tables, one per accelerator of ``cfg["roofline"]``:
    the memory budget is the accelerator's memory, the KV length the workload's mean context, the
    tables cover every batch size up to what the memory could hold; the paper's rows only."""
    from lamda_repro.recursive.serving.config import workload_from
    from lamda_repro.recursive.serving.roofline import accelerator, roofline_table_file

    workload = workload_from(cfg["workload"], "recursive.serving.paper_estimate")
    geo = GEOMETRIES[geometry]
    kv_per_token = 2 * geo["num_layers"] * geo["num_kv_heads"] * geo["head_dim"] * cfg["element_bytes"]
    kv_per_sequence = kv_per_token * workload.max_context
    out = []
    for name in cfg.get("roofline") or []:
        acc = accelerator(name)
        largest = max(2, int(acc.memory_bytes // kv_per_sequence))
        table_file = roofline_table_file(
            geometry,
            name,
            max(1, round(workload.mean_context)),
            list(range(1, largest + 1)),
            cfg["num_loops"],
            cfg.get("lora_ranks", []),
            cfg["element_bytes"],
        )
        table_file["_path"] = f"roofline model (lamda_repro/recursive/serving/roofline.py), {acc.name}"
        estimate = paper_estimate(
            cfg, table_file, exit_distribution, exit_source, PAPER_ROWS, acc.memory_bytes / 1e9
        )
        estimate["estimate"] = "roofline estimate"
        estimate["accelerator"] = table_file["accelerator"]
        estimate["launch_overhead_s"] = table_file["launch_overhead_s"]
        estimate["counted"] = (
            "Transformer-block calls and the KV-policy fill, each layer call max(bytes / HBM bandwidth, "
            f"FLOPs / peak) + {table_file['launch_overhead_s'] * 1e6:g} us launch overhead; "
            "embedding and LM head cost 0 (as in the paper)"
        )
        out.append(estimate)
    return out


__all__ = ["PAPER_ROWS", "model_tables", "paper_models", "paper_estimate", "roofline_estimates"]
