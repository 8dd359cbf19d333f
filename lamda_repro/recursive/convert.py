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
from pathlib import Path

import torch
from torch import nn

from lamda_repro.recursive.relax import RelaxationSpec, add_depth_relaxation, relax_recursive
from lamda_repro.recursive.spec import (  # noqa: F401  (re-exported: the conversion API)
    INIT_METHODS,
    RECURSION_CONFIG_KEY,
    SHARING_STRATEGIES,
    WEIGHTS_NAME,
    RecursionSpec,
    RecursiveConfigError,
    check_recursion,
    decoder_layers,
    recursion_spec,
    seeded,
)


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


def _initialize_shared(model: nn.Module, original_layers, spec: RecursionSpec, seed: int = 0) -> None:
    """Write the initial weights of every shared layer into its owner position (random init: the
    model's own init, drawn from generators seeded by ``seed``)."""
    layers = decoder_layers(model)
    for shared in range(spec.num_shared):
        owner = layers[spec.owner(shared)]
        sources = spec.source_layers(shared)
        if not sources:  # random init
            with seeded(seed + shared):
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
    relaxation: RelaxationSpec | dict | None = None,
    seed: int = 0,
) -> nn.Module:
    """Return a Recursive (or, with ``lora_rank``, Relaxed Recursive) version of ``model``.

    ``num_loops`` is B; the model's L layers become K = L / B shared layers. ``sharing`` is
    "cycle" (position l uses shared layer l mod K) or "sequence" (l // B). ``init`` picks the
    initial weights of the shared layers from the original ones: "stepwise", "average", "lower",
    "upper" or "random". With ``lora_rank`` every position gets its own LoRA (relax.relax_recursive,
    initialized from ``model``'s original weights); ``relaxation`` (a RelaxationSpec or its dict)
    selects any relaxation kind instead (lamda_depth, shared_basis; rank or budget). ``seed`` seeds
    every random draw (random init, zero-init LoRA). The input model is left unchanged unless
    ``inplace`` (which saves memory but is incompatible with a relaxation and ``init="average"``).
    """
    if relaxation is not None and lora_rank is not None:
        raise RecursiveConfigError("give lora_rank or relaxation, not both")
    if isinstance(relaxation, dict):
        relaxation = RelaxationSpec(**relaxation)
    if lora_rank is not None:
        relaxation = RelaxationSpec(
            rank=lora_rank,
            init=lora_init,
            per_position_vectors=per_position_vectors,
            target_modules=target_modules,
        )
    if relaxation is not None:
        relaxation = RelaxationSpec(**{**relaxation.to_dict(), "seed": seed})
    layers = decoder_layers(model)
    num_layers = len(layers)
    check_recursion(num_layers, num_loops, sharing, init)
    if inplace and (relaxation is not None or init == "average"):
        raise RecursiveConfigError(
            "inplace conversion cannot relax or use init='average' (both need the original layers)"
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
    _initialize_shared(converted, original_layers, spec, seed)
    tie_positions(converted, spec)
    setattr(converted.config, RECURSION_CONFIG_KEY, spec.to_dict())
    if relaxation is not None:
        relax_recursive(converted, model, relaxation)
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


def load_causal_lm(
    path: str | os.PathLike, dtype: torch.dtype | None = None, revision: str | None = None
) -> nn.Module:
    """A causal LM from a folder or Hub id; a ``save_recursive`` checkpoint goes through ``load_recursive``.

    The recursive stage's loaders use this instead of ``AutoModelForCausalLM.from_pretrained``,
    which would load a recursive checkpoint without error but with its tied positions
    re-initialised and its relaxation LoRAs dropped. Weights are read from safetensors only (a Hub
    repository that publishes only ``pytorch_model.bin`` on main needs a ``revision`` that has them).
    """
    from transformers import AutoModelForCausalLM

    from lamda_repro.models import is_recursive_checkpoint

    if is_recursive_checkpoint(path):
        return load_recursive(path, dtype=dtype)
    kwargs = {"revision": revision} if revision else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True, **kwargs)


def load_recursive(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by ``save_recursive`` (or any single-file safetensors causal LM).

    The model is built from its config, re-tied (and re-relaxed, shared bases re-tied) from
    ``config.recursion``, and the weights are loaded; every key not in the file must be a tied
    duplicate of one that is.
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
            add_depth_relaxation(model, spec, RelaxationSpec(**spec.lora))
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
