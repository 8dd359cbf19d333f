"""Relaxed Recursive Transformers: a LoRA per depth position on top of the shared weights.

Position l computes h = W'_shared x + B_l A_l x (scaling 1, no dropout). The shared weight is the
tied parameter of the recursive model; A_l, B_l belong to position l alone. SVD init sets
B_l A_l to the best rank-r approximation of the residual W_l(original) - W'_shared, so a
full-rank relaxation reproduces the original model; zero init (B_l = 0) is the ablation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lamda_repro.recursive.spec import (
    RecursionSpec,
    RecursiveConfigError,
    decoder_layers,
    recursion_spec,
)

LORA_INITS = ("svd", "zero")


@dataclass
class LoraSpec:
    """Depth-wise LoRA settings of a Relaxed Recursive Transformer."""

    rank: int = field(metadata={"help": "r; each matrix uses min(r, d_in, d_out)"})
    init: str = field(default="svd", metadata={"help": "svd (truncated SVD of the residual) or zero (B = 0)"})
    per_position_vectors: bool = field(
        default=False,
        metadata={
            "help": "give every position its own copy of the block's 1-D parameters (norm weights, "
            "biases), initialized from the original layer; off = tied with the block (paper)"
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "module names inside a layer to relax (e.g. self_attn.q_proj); None = every linear map"
        },
    )

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise RecursiveConfigError(f"lora rank must be a positive integer, got {self.rank!r}")
        if self.init not in LORA_INITS:
            raise RecursiveConfigError(f"lora init must be one of {LORA_INITS}, got {self.init!r}")


def is_linear_map(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2), the maps a depth-wise LoRA can wrap."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The map's weight as (d_out, d_in), whatever the module's storage layout."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()  # Conv1D stores (d_in, d_out)


def linear_map_names(layer: nn.Module) -> list[str]:
    """Names (relative to ``layer``) of every linear map in a decoder layer."""
    return [name for name, module in layer.named_modules() if name and is_linear_map(module)]


class DepthLoRALinear(nn.Module):
    """A linear map plus this position's low-rank update: base(x) + B (A x)."""

    def __init__(self, base_layer: nn.Module, rank: int):
        super().__init__()
        d_out, d_in = weight_out_in(base_layer).shape
        self.base_layer = base_layer
        self.rank = min(rank, d_in, d_out)
        ref = base_layer.weight
        self.lora_A = nn.Parameter(torch.zeros(self.rank, d_in, dtype=ref.dtype, device=ref.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, self.rank, dtype=ref.dtype, device=ref.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """B A, the (d_out, d_in) update this position adds to the shared weight."""
        return self.lora_B @ self.lora_A


def _untie_vectors(layer: nn.Module) -> None:
    """Replace the layer's 1-D parameters by private copies (norm weights, biases)."""
    for name, param in list(layer.named_parameters()):
        if param.dim() == 1:
            module_path, _, param_name = name.rpartition(".")
            owner = layer.get_submodule(module_path) if module_path else layer
            setattr(
                owner, param_name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            )


def add_depth_lora(model: nn.Module, spec: RecursionSpec, lora: LoraSpec) -> list[DepthLoRALinear]:
    """Wrap the target maps of every position in a DepthLoRALinear (weights left at zero)."""
    layers = decoder_layers(model)
    targets = lora.target_modules or linear_map_names(layers[0])
    wrapped = []
    for position in range(spec.num_layers):
        layer = layers[position]
        if lora.per_position_vectors:
            _untie_vectors(layer)
        for name in targets:
            try:
                base = layer.get_submodule(name)
            except AttributeError:
                raise RecursiveConfigError(f"target module {name!r} not found in decoder layer") from None
            if not is_linear_map(base):
                raise RecursiveConfigError(
                    f"target module {name!r} is a {type(base).__name__}, not a linear map"
                )
            parent_path, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            module = DepthLoRALinear(base, lora.rank)
            setattr(parent, child, module)
            wrapped.append(module)
    return wrapped


def svd_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of ``residual``: B = U_r S_r, A = V_r^T."""
    U, S, Vh = torch.linalg.svd(
        residual.double() if residual.device.type == "cpu" else residual.float(), full_matrices=False
    )
    return U[:, :rank] * S[:rank], Vh[:rank]


def relax_recursive(model: nn.Module, original: nn.Module, lora: LoraSpec) -> nn.Module:
    """Add depth-wise LoRAs to recursive ``model`` (in place), initialized from ``original``."""
    spec = recursion_spec(model)
    if spec is None:
        raise RecursiveConfigError("relax_recursive needs a recursive model (convert_to_recursive first)")
    if spec.lora:
        raise RecursiveConfigError("model is already relaxed")
    original_layers = decoder_layers(original)
    if len(original_layers) != spec.num_layers:
        raise RecursiveConfigError(
            f"original model has {len(original_layers)} layers, recursive model {spec.num_layers}"
        )
    add_depth_lora(model, spec, lora)
    layers = decoder_layers(model)
    with torch.no_grad():
        for position in range(spec.num_layers):
            layer, source = layers[position], original_layers[position]
            if lora.per_position_vectors:
                source_params = dict(source.named_parameters())
                for name, param in layer.named_parameters():
                    if param.dim() == 1:
                        param.copy_(source_params[name.replace(".base_layer", "")])
            for name, module in layer.named_modules():
                if not isinstance(module, DepthLoRALinear):
                    continue
                if lora.init == "zero":
                    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
                    module.lora_B.zero_()
                    continue
                shared = weight_out_in(module.base_layer).float()
                residual = weight_out_in(source.get_submodule(name)).float() - shared
                B, A = svd_factors(residual, module.rank)
                module.lora_B.copy_(B.to(module.lora_B.dtype))
                module.lora_A.copy_(A.to(module.lora_A.dtype))
    model.config.recursion = {**spec.to_dict(), "lora": asdict(lora)}
    return model


def lora_rank_summary(model: nn.Module) -> dict[str, int]:
    """Effective rank of each distinct target map name (same for every position)."""
    summary: dict[str, int] = {}
    for name, module in decoder_layers(model)[0].named_modules():
        if isinstance(module, DepthLoRALinear):
            summary[name] = module.rank
    return summary


__all__ = [
    "LoraSpec",
    "DepthLoRALinear",
    "add_depth_lora",
    "relax_recursive",
    "svd_factors",
    "linear_map_names",
    "lora_rank_summary",
]
