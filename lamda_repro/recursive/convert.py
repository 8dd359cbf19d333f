"""Turn a pretrained transformers decoder into a Recursive Transformer by sharing layer weights.

A model with L decoder layers becomes K = L / B unique layers applied B times ("loops"). The
model keeps its L per-position layer modules (so every position keeps its own ``layer_idx`` and
therefore its own KV-cache slot), but the parameters of all positions tied to shared layer i are
the *same* ``nn.Parameter`` objects. Gradients of tied positions are therefore summed by autograd,
and the result stays an ordinary transformers model (``generate``, lm-eval, ``.to()``, ...).

Shared layer i is stored in the first position that uses it (its "owner"); ``save_recursive``
writes each tensor once and ``load_recursive`` rebuilds the model and re-ties it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARING_STRATEGIES = ("cycle", "sequence")
INIT_METHODS = ("stepwise", "average", "lower", "upper", "random")
RECURSION_CONFIG_KEY = "recursion"
WEIGHTS_NAME = "model.safetensors"

# Attribute paths of the decoder-layer list for the supported architectures.
_LAYER_LIST_PATHS = ("model.layers", "gpt_neox.layers", "transformer.h")


class RecursiveConfigError(ValueError):
    """A recursion setting (loops, sharing, init, rank) is invalid for the given model."""


@dataclass
class RecursionSpec:
    """How a model's layers are shared; stored in ``config.recursion`` so a saved model re-ties."""

    num_layers: int = field(metadata={"help": "L: decoder layers (positions) of the model"})
    num_loops: int = field(metadata={"help": "B: how many times the shared block is applied"})
    sharing: str = field(default="cycle", metadata={"help": "cycle (l mod K) or sequence (l // B)"})
    init: str = field(default="stepwise", metadata={"help": "how shared layers were initialized"})
    lora: dict[str, Any] | None = field(
        default=None, metadata={"help": "depth-wise LoRA settings (relax.LoraSpec as dict) or None"}
    )

    @property
    def num_shared(self) -> int:
        """K: number of unique layers."""
        return self.num_layers // self.num_loops

    def shared_index(self, position: int) -> int:
        """Shared layer used at ``position`` (0-based)."""
        if self.sharing == "cycle":
            return position % self.num_shared
        return position // self.num_loops

    def positions_of(self, shared: int) -> list[int]:
        """Positions tied to shared layer ``shared``, in depth order."""
        return [p for p in range(self.num_layers) if self.shared_index(p) == shared]

    def owner(self, shared: int) -> int:
        """Position whose modules store shared layer ``shared``."""
        return self.positions_of(shared)[0]

    def source_layers(self, shared: int) -> list[int]:
        """Original layers the shared layer ``shared`` is initialized from."""
        L, K = self.num_layers, self.num_shared
        if self.init == "stepwise":
            picks = torch.linspace(0, L - 1, K).round().long().tolist() if K > 1 else [0]
            return [picks[shared]]
        if self.init == "average":
            return self.positions_of(shared)
        if self.init == "lower":
            return [shared]
        if self.init == "upper":
            return [L - K + shared]
        return []  # random

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_recursion(num_layers: int, num_loops: int, sharing: str, init: str) -> None:
    """Raise RecursiveConfigError (one line) for an invalid recursion setting."""
    if not isinstance(num_loops, int) or num_loops < 1:
        raise RecursiveConfigError(f"num_loops must be a positive integer, got {num_loops!r}")
    if num_layers % num_loops:
        raise RecursiveConfigError(f"num_loops={num_loops} does not divide the model's {num_layers} layers")
    if sharing not in SHARING_STRATEGIES:
        raise RecursiveConfigError(f"sharing must be one of {SHARING_STRATEGIES}, got {sharing!r}")
    if init not in INIT_METHODS:
        raise RecursiveConfigError(f"init must be one of {INIT_METHODS}, got {init!r}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (Llama/Gemma: model.layers, GPT-NeoX, GPT-2)."""
    for path in _LAYER_LIST_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise RecursiveConfigError(
        f"unsupported architecture {type(model).__name__}: no decoder layer list at "
        f"{', '.join(_LAYER_LIST_PATHS)}"
    )


def recursion_spec(model: nn.Module) -> RecursionSpec | None:
    """The model's RecursionSpec, or None for an ordinary (non-recursive) model."""
    data = getattr(model.config, RECURSION_CONFIG_KEY, None)
    return RecursionSpec(**data) if data else None


def tie_positions(model: nn.Module, spec: RecursionSpec) -> None:
    """Make every position use the parameter objects of its shared layer's owner position."""
    layers = decoder_layers(model)
    for position in range(spec.num_layers):
        owner = spec.owner(spec.shared_index(position))
        if owner == position:
            continue
        owner_params = dict(layers[owner].named_parameters())
        for name, _ in list(layers[position].named_parameters()):
            module_path, _, param_name = name.rpartition(".")
            target = layers[position].get_submodule(module_path) if module_path else layers[position]
            setattr(target, param_name, owner_params[name])


def _initialize_shared(model: nn.Module, original_layers, spec: RecursionSpec) -> None:
    """Write the initial weights of every shared layer into its owner position."""
    layers = decoder_layers(model)
    for shared in range(spec.num_shared):
        owner = layers[spec.owner(shared)]
        sources = spec.source_layers(shared)
        if not sources:  # random init
            for module in owner.modules():
                model._init_weights(module)
            continue
        source_params = [dict(original_layers[s].named_parameters()) for s in sources]
        with torch.no_grad():
            for name, param in owner.named_parameters():
                stacked = torch.stack([p[name].detach().float() for p in source_params])
                param.copy_(stacked.mean(dim=0).to(param.dtype))


def convert_to_recursive(
    model: nn.Module,
    num_loops: int,
    sharing: str = "cycle",
    init: str = "stepwise",
    lora_rank: int | None = None,
    lora_init: str = "svd",
    per_position_vectors: bool = False,
    target_modules: list[str] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Return a Recursive (or, with ``lora_rank``, Relaxed Recursive) version of ``model``.

    ``num_loops`` is B; the model's L layers become K = L / B shared layers. ``sharing`` is
    "cycle" (position l uses shared layer l mod K) or "sequence" (l // B). ``init`` picks the
    initial weights of the shared layers from the original ones: "stepwise", "average", "lower",
    "upper" or "random". With ``lora_rank`` every position gets its own LoRA (relax.relax_recursive,
    initialized from ``model``'s original weights). The input model is left unchanged unless
    ``inplace`` (which saves memory but is incompatible with ``lora_rank`` and ``init="average"``).
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    check_recursion(num_layers, num_loops, sharing, init)
    if inplace and (lora_rank is not None or init == "average"):
        raise RecursiveConfigError(
            "inplace conversion cannot use lora_rank or init='average' (both need the original layers)"
        )
    if recursion_spec(model) is not None:
        raise RecursiveConfigError("model is already recursive")
    spec = RecursionSpec(num_layers=num_layers, num_loops=num_loops, sharing=sharing, init=init)
    if inplace:
        converted = model
        # Owners are overwritten while others still read them as sources: copy the sources first.
        original_layers = _snapshot_sources(layers, spec)
    else:
        converted = copy.deepcopy(model)
        original_layers = layers
    _initialize_shared(converted, original_layers, spec)
    tie_positions(converted, spec)
    setattr(converted.config, RECURSION_CONFIG_KEY, spec.to_dict())
    if lora_rank is not None:
        from lamda_repro.recursive.relax import LoraSpec, relax_recursive

        relax_recursive(
            converted,
            model,
            LoraSpec(
                rank=lora_rank,
                init=lora_init,
                per_position_vectors=per_position_vectors,
                target_modules=target_modules,
            ),
        )
    return converted


def _snapshot_sources(layers: nn.ModuleList, spec: RecursionSpec) -> dict[int, nn.Module]:
    """Copies of the source layers an in-place conversion reads (a dict indexable like a list)."""
    needed = {s for k in range(spec.num_shared) for s in spec.source_layers(k)}
    return {s: copy.deepcopy(layers[s]) for s in needed}


def truncate_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """A copy of ``model`` keeping only its first ``num_layers`` layers (same-size baseline)."""
    layers = decoder_layers(model)
    if not 1 <= num_layers <= len(layers):
        raise RecursiveConfigError(f"cannot keep {num_layers} of {len(layers)} layers")
    truncated = copy.deepcopy(model)
    kept = decoder_layers(truncated)
    for _ in range(len(layers) - num_layers):
        del kept[len(kept) - 1]
    truncated.config.num_hidden_layers = num_layers
    if getattr(truncated.config, "layer_types", None):
        truncated.config.layer_types = list(truncated.config.layer_types[:num_layers])
    return truncated


def unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` with shared storage counted once (torch de-duplicates by object)."""
    return list(module.parameters())


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor kept once (under its first key, the owner's)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    unique: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue
        seen[ident] = key
        unique[key] = tensor.contiguous()
    return unique


def save_recursive(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Save config (with its ``recursion`` entry) and weights with each shared tensor stored once."""
    from safetensors.torch import save

    from lamda_repro.results import write_bytes_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    state = unique_state_dict(model)
    meta = {
        "format": "pt",
        RECURSION_CONFIG_KEY: json.dumps(getattr(model.config, RECURSION_CONFIG_KEY, None)),
    }
    write_bytes_atomic(directory / WEIGHTS_NAME, save(state, metadata=meta))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_recursive(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by ``save_recursive`` (or any single-file safetensors causal LM).

    The model is built from its config, re-tied (and re-relaxed) from ``config.recursion``, and
    the weights are loaded; every key not in the file must be a tied duplicate of one that is.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    config = AutoConfig.from_pretrained(directory)
    data = getattr(config, RECURSION_CONFIG_KEY, None)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if data:
        spec = RecursionSpec(**data)
        tie_positions(model, spec)
        if spec.lora:
            from lamda_repro.recursive.relax import LoraSpec, add_depth_lora

            add_depth_lora(model, spec, LoraSpec(**spec.lora))
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RecursiveConfigError(f"unexpected keys in {weights}: {unexpected[:5]}")
    stored = set(unique_state_dict(model))
    not_tied = [k for k in missing if k in stored]
    if not_tied:
        raise RecursiveConfigError(f"keys missing from {weights}: {not_tied[:5]}")
    model.tie_weights()
    model.eval()
    return model
