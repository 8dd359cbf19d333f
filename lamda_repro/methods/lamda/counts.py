"""Trainable-parameter counts of LoRA and LaMDA computed from a transformers config (no model built)."""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo")


def linear_shapes_from_config(config, target_modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{module name: (d_in, d_out)} of the targeted linear layers, one entry per layer instance.

    Supports LLaMA-style decoders (q/k/v/o_proj, gate/up/down_proj, grouped-query attention),
    BERT-style encoders (query/key/value, attention.output.dense, intermediate.dense, output.dense)
    and GPT-2 (Conv1D layers c_attn, attn.c_proj, c_fc, mlp.c_proj; shapes given as (d_in, d_out)
    although Conv1D stores its weight as d_in x d_out).
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt2":
        return _select(_gpt2_shapes(config), targets, model_type)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if model_type in LLAMA_LIKE:
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        inter = config.intermediate_size
        per_layer = {
            "self_attn.q_proj": (hidden, heads * head_dim),
            "self_attn.k_proj": (hidden, kv),
            "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (heads * head_dim, hidden),
            "mlp.gate_proj": (hidden, inter),
            "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden),
        }
        prefix = "model.layers"
    elif model_type == "bert":
        inter = config.intermediate_size
        per_layer = {
            "attention.self.query": (hidden, hidden),
            "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden),
            "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (hidden, inter),
            "output.dense": (inter, hidden),
        }
        prefix = "bert.encoder.layer"
    else:
        raise ValueError(
            f"parameter counts from config support {LLAMA_LIKE + ('bert', 'gpt2')}, "
            f"got model_type={model_type!r}"
        )
    every = {
        f"{prefix}.{layer}.{local}": shape
        for layer in range(config.num_hidden_layers)
        for local, shape in per_layer.items()
    }
    return _select(every, targets, model_type)


def _gpt2_shapes(config) -> dict[str, tuple[int, int]]:
    hidden = config.n_embd
    inner = config.n_inner or 4 * hidden
    per_layer = {
        "attn.c_attn": (hidden, 3 * hidden),
        "attn.c_proj": (hidden, hidden),
        "mlp.c_fc": (hidden, inner),
        "mlp.c_proj": (inner, hidden),
    }
    return {
        f"transformer.h.{layer}.{local}": shape
        for layer in range(config.n_layer)
        for local, shape in per_layer.items()
    }


def _select(every: Mapping[str, tuple[int, int]], targets: list[str], model_type) -> dict:
    """The entries of ``every`` whose name ends with a target (as peft matches), or all for all-linear."""
    if targets == ["all-linear"]:
        shapes = dict(every)
    else:
        shapes = {
            name: shape for name, shape in every.items() if any(name.endswith("." + t) for t in targets)
        }
    if not shapes:
        raise ValueError(f"target_modules {targets} match no linear layer of a {model_type} model")
    return shapes


def lora_trainable_count(
    shapes: Mapping[str, tuple[int, int]], r: int, ranks: Optional[Mapping[str, int]] = None
) -> int:
    """LoRA trains A (r x d_in) and B (d_out x r): r (d_in + d_out) per module."""
    return sum((ranks or {}).get(n, r) * (d_in + d_out) for n, (d_in, d_out) in shapes.items())


def lamda_trainable_count(
    shapes: Mapping[str, tuple[int, int]],
    r: int,
    frozen_components: Optional[int] = None,
    ranks: Optional[Mapping[str, int]] = None,
) -> int:
    """LaMDA trains S (r x r) always plus the unfrozen columns of B (d_out each).

    ``frozen_components=None`` means B fully frozen (only S trains: r^2 per module); 0 means
    B fully trainable (r^2 + d_out r per module).
    """
    total = 0
    for name, (_, d_out) in shapes.items():
        rank = (ranks or {}).get(name, r)
        frozen = rank if frozen_components is None else min(rank, frozen_components)
        total += rank * rank + d_out * (rank - frozen)
    return total
