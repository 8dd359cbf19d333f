"""The serving measurements that need a GPU, prepared to run in one go (scripts/gpu_check.sh):

1. latency tables of ONE decoder layer of Gemma 2B (random weights, no download) at the batch
   sizes the paper-geometry simulation needs (up to 1024: the memory-bound batches of a 40 GB
   A100 are 741-783), plain and with depth-wise LoRA r=64, KV length 1536 (512 + 2048 / 2), bf16:
   ``<out>/latency/gemma-2b.<device>.json``, the file ``paper_estimate.latency_tables`` reads;
2. the real engine's decode throughput on a small recursive model (TinyLlama geometry, 4 layers,
   B = 2, random weights) with static, CSB and CDB batching, and CDB with every token leaving after
   its first loop (threshold 1e-9: the upper bound of early exit), next to the simulator on latency
   tables of the same model measured in the same process: ``<out>/gpu_check/engine.<device>.json``.

The third measurement (LaMDA vs LoRA peak memory on LLaMA-2-7B geometry) is ``bench-lamda``, run
by the same script. ``tiny=True`` swaps every geometry for a tiny one, so the whole check runs on a
CPU in seconds (the tests do).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

GPU_SETTINGS: dict[str, Any] = {
    "geometry": "gemma-2b",
    "context": 1536,
    "sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024],
    "lora_ranks": [64],
    "repeats": 5,
    "warmup": 2,
    "engine": {
        "geometry": "tinyllama-1.1b",
        "layers": 4,
        "loops": 2,
        "workload": {"num_requests": 256, "prompt_len": [32, 128], "gen_len": [16, 128], "seed": 0},
        "max_batch": 64,
        "repeats": 3,
    },
}
TINY_SETTINGS: dict[str, Any] = {
    "geometry": "tiny",
    "context": 24,
    "sizes": [1, 2, 4],
    "lora_ranks": [4],
    "repeats": 1,
    "warmup": 1,
    "engine": {
        "geometry": "tiny",
        "layers": 4,
        "loops": 2,
        "workload": {"num_requests": 6, "prompt_len": [4, 8], "gen_len": [2, 6], "seed": 0},
        "max_batch": 4,
        "repeats": 1,
    },
}
EXIT_ALL_THRESHOLD = 1e-9  # every token's confidence reaches it: all leave after their first loop


def layer_latency_file(
    geometry: str,
    context: int,
    sizes: list[int],
    lora_ranks: list[int],
    repeats: int,
    warmup: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Latency tables of one layer of ``geometry`` (plain and per LoRA rank), as a table file."""
    from lamda_repro.recursive.serving.latency import geometry_model, measure_tables
    from lamda_repro.results import env_info, utc_now

    tables = {}
    for rank in [None, *lora_ranks]:
        # two positions sharing one layer: a block call is one layer, the fill one skipped position
        model = geometry_model(geometry, num_layers=2, num_loops=2, lora_rank=rank, seed=seed)
        model = model.to(device=device, dtype=dtype)
        measured = measure_tables(model, context, sorted(set(sizes)), repeats, warmup)
        tables["plain" if rank is None else f"lora_r{rank}"] = measured.to_dict()
        log(f"{geometry} {'plain' if rank is None else f'r={rank}'}: block {measured.block.seconds}")
        del model
    return {
        "geometry": geometry,
        "what": "latency of ONE decoder layer of the geometry (block = layers per call x this)",
        "device": tables["plain"]["meta"]["device"],
        "dtype": str(dtype).removeprefix("torch."),
        "context": context,
        "measured_at": utc_now(),
        "command": "lamda-repro " + " ".join(sys.argv[1:]),
        "env": env_info(),
        "tables": tables,
    }


def engine_check(
    settings: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Decode tokens/s of the real engine on a random-weight recursive model, per scheduler, and
    the simulator's prediction from latency tables measured on the same model right before."""
    from lamda_repro.recursive.serving.backend import serve
    from lamda_repro.recursive.serving.config import workload_from
    from lamda_repro.recursive.serving.latency import (
        default_sizes,
        device_name,
        geometry_model,
        measure_tables,
    )
    from lamda_repro.recursive.serving.simulator import prediction_error, simulate

    model = geometry_model(settings["geometry"], settings["layers"], settings["loops"], seed=seed)
    model = model.to(device=device, dtype=dtype)
    workload = workload_from({"arrival": "burst", **settings["workload"]}, "gpu check engine workload")
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in workload.prompt_lens]
    batch = settings["max_batch"]
    tables = measure_tables(model, max(1, round(workload.mean_context)), default_sizes(batch), 5, 2)
    rows = []
    for scheduler, threshold in (("static", None), ("csb", None), ("cdb", None), ("cdb", EXIT_ALL_THRESHOLD)):
        serve(model, prompts[:batch], _head(workload, batch), scheduler, batch, threshold)  # warm-up
        measured = []
        for _ in range(settings["repeats"]):
            result, _, timings = serve(model, prompts, workload, scheduler, batch, threshold)
            measured.append(result.tokens_per_s)
        exits = None if threshold is None else [1.0] + [0.0] * (settings["loops"] - 1)
        simulated = simulate(scheduler, workload, tables, batch, exits, seed).tokens_per_s
        tokens_per_s = sorted(measured)[len(measured) // 2]
        rows.append(
            {
                "scheduler": scheduler,
                "early_exit": threshold is not None,
                "threshold": threshold,
                "measured_tokens_per_s": tokens_per_s,
                "measured_repeats": measured,
                "simulated_tokens_per_s": simulated,
                "prediction_error": prediction_error(simulated, tokens_per_s),
                "clock": timings["clock"],
            }
        )
    base = rows[0]["measured_tokens_per_s"]
    for row in rows:
        row["measured_vs_static"] = row["measured_tokens_per_s"] / base
    return {
        "what": "decode tokens/s of the real engine (random weights) and the simulator on tables of the "
        "same model; CDB + exit: every token leaves after its first loop (threshold 1e-9)",
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": {k: settings[k] for k in ("geometry", "layers", "loops")},
        "workload": {**settings["workload"], "decode_tokens": workload.decode_tokens},
        "max_batch": batch,
        "rows": rows,
        "latency_tables": tables.to_dict(),
    }


def _head(workload, n: int):
    """The first ``n`` requests of a workload (a short warm-up run)."""
    from lamda_repro.recursive.serving.scheduler import Workload

    n = min(n, workload.num_requests)
    return Workload(workload.prompt_lens[:n], workload.gen_lens[:n], workload.arrivals[:n])


def run_gpu_check(
    out_dir: str | Path,
    tiny: bool = False,
    device: str = "cuda",
    dtype: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Measure the layer tables and the engine check; write both files under ``out_dir``."""
    from lamda_repro.recursive.runner import pick_device
    from lamda_repro.results import write_json_atomic

    dev = pick_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but no CUDA device is visible (on a CPU: --tiny --device cpu)")
    torch_dtype = getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    settings = TINY_SETTINGS if tiny else GPU_SETTINGS
    out_dir = Path(out_dir)
    paths = {
        "latency": out_dir / "latency" / f"{settings['geometry']}.{dev.type}.json",
        "engine": out_dir / "gpu_check" / f"engine.{dev.type}.json",
    }
    start = time.perf_counter()
    table_file = layer_latency_file(
        settings["geometry"],
        settings["context"],
        settings["sizes"],
        settings["lora_ranks"],
        settings["repeats"],
        settings["warmup"],
        torch_dtype,
        dev,
        seed,
        log,
    )
    table_file["wall_s"] = time.perf_counter() - start
    write_json_atomic(paths["latency"], table_file)
    log(f"wrote {paths['latency']} ({table_file['wall_s']:.1f} s)")
    start = time.perf_counter()
    engine = engine_check(settings["engine"], torch_dtype, dev, seed)
    engine["wall_s"] = time.perf_counter() - start
    write_json_atomic(paths["engine"], engine)
    for row in engine["rows"]:
        name = row["scheduler"] + (" + exit" if row["early_exit"] else "")
        measured, simulated = row["measured_tokens_per_s"], row["simulated_tokens_per_s"]
        log(f"engine {name}: {measured:.0f} tok/s measured, {simulated:.0f} simulated")
    log(f"wrote {paths['engine']} ({engine['wall_s']:.1f} s)")
    return paths


__all__ = ["GPU_SETTINGS", "TINY_SETTINGS", "layer_latency_file", "engine_check", "run_gpu_check"]
