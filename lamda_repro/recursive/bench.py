"""Micro-benchmark: forward tokens/s and weight memory of a model before and after conversion.

Sharing saves weight memory but not compute: a recursive model runs the same L layer applications
as the original, so forward throughput should be about equal (LoRAs add a little work)."""

from __future__ import annotations

from typing import Any

import torch

from lamda_repro.recursive.convert import convert_to_recursive, load_causal_lm
from lamda_repro.recursive.counts import model_non_embedding_parameters, weight_bytes
from lamda_repro.recursive.evaluate import forward_throughput


def benchmark_conversion(
    model_path: str,
    num_loops: int = 2,
    lora_rank: int | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    repeats: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """Throughput and weight bytes of the model at ``model_path`` and of its recursive conversions."""
    original = load_causal_lm(model_path).to(device).eval()
    variants = {
        "original": original,
        f"recursive_B{num_loops}": convert_to_recursive(original, num_loops, init="average"),
    }
    if lora_rank is not None:
        variants[f"relaxed_B{num_loops}_r{lora_rank}"] = convert_to_recursive(
            original, num_loops, init="average", lora_rank=lora_rank
        )
    result: dict[str, Any] = {"model": model_path, "device": device, "torch_threads": torch.get_num_threads()}
    for name, model in variants.items():
        speed = forward_throughput(model, model.config.vocab_size, batch_size, seq_len, repeats=repeats)
        result[name] = {
            "forward_tokens_per_s": speed["forward_tokens_per_s"],
            "weight_bytes": weight_bytes(model),
            "non_embedding_params": model_non_embedding_parameters(model),
        }
    return result
