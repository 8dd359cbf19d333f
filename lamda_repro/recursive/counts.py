"""Non-embedding parameter counts (the paper's unit), from a config or from a built model.

P_layer is every parameter of one decoder layer, norm weights and biases included (they are part
of the shared block; for Gemma 2B they add 4096 per layer, 0.004% of P_layer). Embeddings, the
final norm and the LM head are not counted. Config-based counts build the model on the meta
device, so no weight memory is allocated and every transformers architecture is handled alike.

    vanilla  N     = L * P_layer
    recursive N_RT = K * P_layer                       (K = L / B)
    relaxed        = N_RT + relaxation (+ (L - K) * vectors per layer with per-position vectors)

    relaxation, summed over the relaxed maps (d_in, d_out) of a layer:
      lora          L * r_m (d_in + d_out)                          r_m = min(r, d_in, d_out)
      lamda_depth   L * (r_m (d_in + d_out) + r_m^2)
      shared_basis  K * (r_out d_out + r_in d_in + B r_out r_in)    r_out = min(r, d_out, B d_in),
                                                                    r_in = min(r_in, d_in, B d_out)
    (spectral.unit_cost; with a rank pattern, the sum over its units.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lamda_repro.recursive import spectral
from lamda_repro.recursive.convert import check_recursion, decoder_layers
from lamda_repro.recursive.relax import linear_map_names, weight_out_in


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_shapes(config) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(L, P_layer, {map name: (d_in, d_out)}) of a config's decoder layer."""
    num_layers, p_layer, _, maps = layer_geometry(config)
    return num_layers, p_layer, maps


def layer_geometry(config) -> tuple[int, int, int, dict[str, tuple[int, int]]]:
    """(L, P_layer, 1-D parameters per layer, {map name: (d_in, d_out)}) of a config's decoder layer."""
    layers = decoder_layers(_meta_model(config))
    first = layers[0]
    p_layer = sum(p.numel() for p in first.parameters())
    vectors = sum(p.numel() for p in first.parameters() if p.dim() == 1)
    maps = {}
    for name in linear_map_names(first):
        d_out, d_in = weight_out_in(first.get_submodule(name)).shape
        maps[name] = (int(d_in), int(d_out))
    return len(layers), int(p_layer), int(vectors), maps


def lora_parameters(maps: dict[str, tuple[int, int]], rank: int, num_positions: int) -> int:
    """Parameters of depth-wise LoRAs of rank ``rank`` on ``maps`` at ``num_positions`` positions."""
    per_position = sum(min(rank, d_in, d_out) * (d_in + d_out) for d_in, d_out in maps.values())
    return num_positions * per_position


def relaxation_parameters(
    maps: dict[str, tuple[int, int]],
    num_layers: int,
    num_loops: int,
    kind: str = "lora",
    rank: int | None = None,
    rank_in: int | None = None,
    rank_pattern: dict[str, list[int]] | None = None,
) -> int:
    """Closed-form parameters of a relaxation (uniform ``rank`` / ``rank_in``, or a rank pattern)."""
    units = spectral.units_of(kind, maps, num_layers, num_loops)
    if rank_pattern is not None:
        ranks = {key: (int(v[0]), int(v[1])) for key, v in rank_pattern.items()}
    else:
        ranks = spectral.uniform_ranks(kind, units, rank, rank_in)
    return spectral.total_cost(kind, units, ranks)


def non_embedding_counts(
    config,
    num_loops: int = 1,
    lora_rank: int | None = None,
    target_modules: list[str] | None = None,
    relaxation: str = "lora",
    rank_in: int | None = None,
    rank_pattern: dict[str, list[int]] | None = None,
    per_position_vectors: bool = False,
) -> dict[str, Any]:
    """Vanilla, recursive and (with ``lora_rank`` or ``rank_pattern``) relaxed non-embedding counts
    of ``config``; ``relaxation`` is the kind (lora, lamda_depth, shared_basis), ``lora_rank`` its
    uniform rank."""
    num_layers, p_layer, vectors, maps = layer_geometry(config)
    check_recursion(num_layers, num_loops, "cycle", "stepwise")
    if target_modules is not None:
        unknown = sorted(set(target_modules) - set(maps))
        if unknown:
            raise ValueError(f"target modules not in the decoder layer: {unknown}")
        maps = {name: maps[name] for name in target_modules}
    counts = {
        "num_layers": num_layers,
        "num_shared_layers": num_layers // num_loops,
        "per_layer": p_layer,
        "vanilla": num_layers * p_layer,
        "recursive": (num_layers // num_loops) * p_layer,
    }
    if lora_rank is not None or rank_pattern is not None:
        counts["relaxation"] = relaxation_parameters(
            maps, num_layers, num_loops, relaxation, lora_rank, rank_in, rank_pattern
        )
        if relaxation == "lora":
            counts["lora"] = counts["relaxation"]
        extra_vectors = (num_layers - num_layers // num_loops) * vectors if per_position_vectors else 0
        counts["relaxed"] = counts["recursive"] + counts["relaxation"] + extra_vectors
    return counts


def model_non_embedding_parameters(model: nn.Module) -> int:
    """Distinct parameters inside the decoder layers of a built model (tied ones counted once)."""
    return int(sum(p.numel() for p in decoder_layers(model).parameters()))


def model_total_parameters(model: nn.Module) -> int:
    """Distinct parameters of the whole model (tied ones counted once)."""
    return int(sum(p.numel() for p in model.parameters()))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameter storage (what the weights occupy in memory)."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


__all__ = [
    "layer_shapes",
    "layer_geometry",
    "lora_parameters",
    "relaxation_parameters",
    "non_embedding_counts",
    "model_non_embedding_parameters",
    "model_total_parameters",
    "weight_bytes",
]
