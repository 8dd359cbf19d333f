"""Relaxed Recursive Transformers: a low-rank update per depth position on top of the shared weights.

Position l computes h = W'_shared x + delta_l(x). The shared weight is the tied parameter of the
recursive model; the update belongs to position l (or, for ``shared_basis``, its bases to the
shared layer and its core to position l). Three relaxations (math in spectral.py):

    lora          delta_l(x) = B_l A_l x           (the paper; SVD or zero init)
    lamda_depth   delta_l(x) = U_l S_l V_l^T x     (SVD of the residual; U_l, V_l frozen, S_l trains)
    shared_basis  delta_l(x) = U S_l V^T x         (U, V shared by the depths of a shared layer)

SVD init makes each update the best approximation of the residual W_l(original) - W'_shared at
its rank, so full rank reproduces the original model. Every relaxed map is a
``DepthRelaxedLinear``: ``base_layer`` (the shared map), ``delta(x)``, ``delta_weight()`` and
``forward(x) = base_layer(x) + delta(x)``, whatever the kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lamda_repro.recursive import spectral
from lamda_repro.recursive.spec import (
    RecursionSpec,
    RecursiveConfigError,
    decoder_layers,
    recursion_spec,
)
from lamda_repro.recursive.spectral import ALLOCATIONS, RELAXATIONS, RelaxationError, svd_factors

RELAX_INITS = ("svd", "zero")
LORA_INITS = RELAX_INITS
# What trains during uptraining: "model" = every parameter that is not part of a relaxation (the
# tied block, per-position vectors, embeddings, final norm, LM head); "lora" = A_l, B_l;
# "cores" = S_l; "bases" = U, V (U_l, V_l for lamda_depth).
TRAIN_GROUPS = ("model", "lora", "cores", "bases")
DEFAULT_TRAIN = {"lora": ("model", "lora"), "lamda_depth": ("cores",), "shared_basis": ("cores",)}
_GROUP_OF_NAME = {
    "lora_A": "lora",
    "lora_B": "lora",
    "core_S": "cores",
    "basis_U": "bases",
    "basis_Vt": "bases",
}


@dataclass
class RelaxationSpec:
    """Depth-wise relaxation settings of a Relaxed Recursive Transformer (stored in config.recursion)."""

    rank: int | None = field(
        default=None,
        metadata={
            "help": "uniform rank r, capped per matrix at what its residuals allow (lora / lamda_depth: "
            "min(d_in, d_out); shared_basis: min(d_out, B d_in) for U, min(d_in, B d_out) for V)"
        },
    )
    init: str = field(
        default="svd", metadata={"help": "svd (from the residual's SVD) or zero (lora only: B = 0)"}
    )
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
    kind: str = field(default="lora", metadata={"help": f"one of {RELAXATIONS}"})
    rank_in: int | None = field(
        default=None, metadata={"help": "shared_basis: rank of V (default: rank); S_l is then r x rank_in"}
    )
    budget: int | None = field(
        default=None,
        metadata={"help": "parameters the relaxation may add; ranks are derived from it (instead of rank)"},
    )
    allocation: str = field(
        default="uniform",
        metadata={
            "help": "with a budget: uniform (the largest uniform rank that fits) or spectral (per-matrix "
            "ranks, greedy on the residual energy captured per parameter)"
        },
    )
    train: list[str] | None = field(
        default=None,
        metadata={
            "help": f"parameter groups trained in uptraining, of {TRAIN_GROUPS}; None = {DEFAULT_TRAIN}"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random draws (zero init's A)"})
    rank_pattern: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "resolved per-unit ranks {'<unit>/<map>': [r_out, r_in]} (unit = position, or shared "
            "layer for shared_basis); written when ranks came from a budget"
        },
    )

    def __post_init__(self):
        spectral.check_kind(self.kind)
        for name in ("rank", "rank_in", "budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RelaxationError(name, f"relaxation {name} must be a positive integer, got {value!r}")
        if self.rank is None and self.budget is None and self.rank_pattern is None:
            raise RelaxationError("rank", "a relaxation needs a rank or a budget")
        if self.rank is not None and self.budget is not None:
            raise RelaxationError("budget", "give either a rank or a budget, not both")
        if self.rank_in is not None and self.kind != "shared_basis":
            raise RelaxationError("rank_in", f"rank_in applies to shared_basis only, not {self.kind}")
        if self.rank_in is not None and self.rank is None:
            raise RelaxationError("rank_in", "rank_in needs a rank (a budget sets both ranks)")
        if self.allocation not in ALLOCATIONS:
            raise RelaxationError(
                "allocation", f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}"
            )
        if self.allocation == "spectral" and self.budget is None:
            raise RelaxationError("allocation", "spectral allocation needs a budget")
        if self.init not in RELAX_INITS:
            raise RelaxationError("init", f"relaxation init must be one of {RELAX_INITS}, got {self.init!r}")
        if self.init == "zero" and self.kind != "lora":
            raise RelaxationError("init", f"zero init applies to lora only, not {self.kind}")
        if self.train is not None:
            allowed = ("model", "lora") if self.kind == "lora" else ("model", "cores", "bases")
            bad = [g for g in self.train if g not in allowed]
            if bad or not self.train:
                raise RelaxationError(
                    "train",
                    f"train groups for {self.kind}: a non-empty subset of {allowed}, got {self.train!r}",
                )

    @property
    def train_groups(self) -> tuple[str, ...]:
        return tuple(self.train) if self.train is not None else DEFAULT_TRAIN[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LoraSpec = RelaxationSpec  # the conversion API's name since the first relaxation


def is_linear_map(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2), the maps a depth-wise relaxation can wrap."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The map's weight as (d_out, d_in), whatever the module's storage layout."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()  # Conv1D stores (d_in, d_out)


def linear_map_names(layer: nn.Module) -> list[str]:
    """Names (relative to ``layer``) of every linear map in a decoder layer (a relaxed map counts
    once, under its own name, not its ``base_layer``'s)."""
    names, relaxed = [], []
    for name, module in layer.named_modules():
        if not name or any(name.startswith(f"{r}.") for r in relaxed):
            continue
        if isinstance(module, DepthRelaxedLinear):
            relaxed.append(name)
            names.append(name)
        elif is_linear_map(module):
            names.append(name)
    return names


def map_shapes(layer: nn.Module, target_modules: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """{map name: (d_in, d_out)} of the target maps of a decoder layer (checked to exist)."""
    shapes = {}
    for name in target_modules or linear_map_names(layer):
        try:
            module = layer.get_submodule(name)
        except AttributeError:
            raise RecursiveConfigError(f"target module {name!r} not found in decoder layer") from None
        if isinstance(module, DepthRelaxedLinear):
            module = module.base_layer
        if not is_linear_map(module):
            raise RecursiveConfigError(
                f"target module {name!r} is a {type(module).__name__}, not a linear map"
            )
        d_out, d_in = weight_out_in(module).shape
        shapes[name] = (int(d_in), int(d_out))
    return shapes


class DepthRelaxedLinear(nn.Module):
    """A shared linear map plus one depth position's update: ``base_layer(x) + delta(x)``.

    The interface every relaxation kind offers (engines that batch depths call only this):
    ``base_layer`` (the shared map, same parameters at every tied position), ``delta(x)`` (this
    position's update for input x), ``delta_weight()`` (the update as a dense (d_out, d_in)
    matrix), ``rank_out`` / ``rank_in`` and ``kind``.
    """

    kind = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError


class DepthLoRALinear(DepthRelaxedLinear):
    """A linear map plus this position's low-rank update: base(x) + B (A x)."""

    kind = "lora"

    def __init__(self, base_layer: nn.Module, rank: int):
        super().__init__()
        d_out, d_in = weight_out_in(base_layer).shape
        self.base_layer = base_layer
        self.rank = min(rank, d_in, d_out)
        ref = base_layer.weight
        self.lora_A = nn.Parameter(torch.zeros(self.rank, d_in, dtype=ref.dtype, device=ref.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, self.rank, dtype=ref.dtype, device=ref.device))

    @property
    def rank_out(self) -> int:
        return self.rank

    @property
    def rank_in(self) -> int:
        return self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """B A, the (d_out, d_in) update this position adds to the shared weight."""
        return self.lora_B @ self.lora_A


class DepthSpectralLinear(DepthRelaxedLinear):
    """A linear map plus U S V^T x: lamda_depth (U, V this position's own) or shared_basis (U, V
    the same parameters at every position tied to the shared layer). U (d_out x r_out) and
    V^T (r_in x d_in) are orthonormal SVD directions; the core S (r_out x r_in) is this position's."""

    def __init__(self, base_layer: nn.Module, rank_out: int, rank_in: int, kind: str):
        super().__init__()
        d_out, d_in = weight_out_in(base_layer).shape
        self.base_layer = base_layer
        self.kind = kind
        ref = base_layer.weight
        make = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=ref.dtype, device=ref.device))  # noqa: E731
        self.basis_U = make(d_out, rank_out)
        self.core_S = make(rank_out, rank_in)
        self.basis_Vt = make(rank_in, d_in)

    @property
    def rank_out(self) -> int:
        return self.core_S.shape[0]

    @property
    def rank_in(self) -> int:
        return self.core_S.shape[1]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(x.to(self.core_S.dtype), self.basis_Vt), self.core_S), self.basis_U)

    def delta_weight(self) -> torch.Tensor:
        """U S V^T, the (d_out, d_in) update this position adds to the shared weight."""
        return self.basis_U @ self.core_S @ self.basis_Vt


def relaxed_maps(layer: nn.Module) -> dict[str, DepthRelaxedLinear]:
    """{map name: relaxed module} of one decoder layer (position)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, DepthRelaxedLinear)}


def _untie_vectors(layer: nn.Module) -> None:
    """Replace the layer's 1-D parameters by private copies (norm weights, biases)."""
    for name, param in list(layer.named_parameters()):
        if param.dim() == 1:
            module_path, _, param_name = name.rpartition(".")
            owner = layer.get_submodule(module_path) if module_path else layer
            setattr(
                owner, param_name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            )


def relaxation_units(spec: RecursionSpec, kind: str, maps: dict[str, tuple[int, int]]) -> list[spectral.Unit]:
    return spectral.units_of(kind, maps, spec.num_layers, spec.num_loops)


def _unit_index(spec: RecursionSpec, kind: str, position: int) -> int:
    return spec.shared_index(position) if kind == "shared_basis" else position


def _fixed_ranks(
    spec: RecursionSpec, relax: RelaxationSpec, maps: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """Per-unit ranks from a rank pattern or a uniform rank (checked against the model's shapes)."""
    units = relaxation_units(spec, relax.kind, maps)
    if relax.rank_pattern is not None:
        keys = {u.key for u in units}
        if set(relax.rank_pattern) != keys:
            missing, extra = sorted(keys - set(relax.rank_pattern)), sorted(set(relax.rank_pattern) - keys)
            raise RelaxationError(
                "rank_pattern",
                f"rank_pattern does not match the model: missing {missing[:3]}, extra {extra[:3]}",
            )
        ranks = {k: (int(v[0]), int(v[1])) for k, v in relax.rank_pattern.items()}
        for u in units:
            caps = spectral.rank_caps(relax.kind, u.d_in, u.d_out, u.num_depths)
            r_out, r_in = ranks[u.key]
            if not (1 <= r_out <= caps[0] and 1 <= r_in <= caps[1]) or (
                relax.kind != "shared_basis" and r_out != r_in
            ):
                raise RelaxationError(
                    "rank_pattern", f"rank_pattern {u.key}: ranks {[r_out, r_in]} outside {list(caps)}"
                )
        return ranks
    if relax.rank is None:
        raise RelaxationError("budget", "a budget must be resolved to ranks first (relax_recursive does)")
    return spectral.uniform_ranks(relax.kind, units, relax.rank, relax.rank_in)


def add_depth_relaxation(
    model: nn.Module, spec: RecursionSpec, relax: RelaxationSpec
) -> list[DepthRelaxedLinear]:
    """Wrap the target maps of every position (weights left at zero; shared_basis bases tied)."""
    layers = decoder_layers(model)
    maps = map_shapes(layers[0], relax.target_modules)
    ranks = _fixed_ranks(spec, relax, maps)
    wrapped = []
    for position in range(spec.num_layers):
        layer = layers[position]
        if relax.per_position_vectors:
            _untie_vectors(layer)
        unit = _unit_index(spec, relax.kind, position)
        for name in maps:
            base = layer.get_submodule(name)
            parent_path, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            r_out, r_in = ranks[f"{unit}/{name}"]
            if relax.kind == "lora":
                module = DepthLoRALinear(base, r_out)
            else:
                module = DepthSpectralLinear(base, r_out, r_in, relax.kind)
            setattr(parent, child, module)
            wrapped.append(module)
    if relax.kind == "shared_basis":
        tie_shared_bases(model, spec)
    set_trainable(model, relax.train_groups)
    return wrapped


add_depth_lora = add_depth_relaxation  # the name convert.load_recursive used before spectral kinds


def tie_shared_bases(model: nn.Module, spec: RecursionSpec) -> None:
    """Make every position use its shared layer owner's U and V (one parameter object each)."""
    layers = decoder_layers(model)
    for position in range(spec.num_layers):
        owner = spec.owner(spec.shared_index(position))
        if owner == position:
            continue
        owner_maps = relaxed_maps(layers[owner])
        for name, module in relaxed_maps(layers[position]).items():
            module.basis_U = owner_maps[name].basis_U
            module.basis_Vt = owner_maps[name].basis_Vt


def train_group(param_name: str) -> str:
    """The uptraining group (TRAIN_GROUPS) a parameter belongs to, from its name."""
    return _GROUP_OF_NAME.get(param_name.rpartition(".")[2], "model")


def set_trainable(model: nn.Module, groups: tuple[str, ...] | list[str]) -> None:
    """requires_grad = True exactly for the parameters in ``groups`` (tied ones counted once)."""
    for name, param in model.named_parameters():
        param.requires_grad_(train_group(name) in groups)


def _residual(module: DepthRelaxedLinear, source_map: nn.Module) -> torch.Tensor:
    shared = weight_out_in(module.base_layer).float()
    return weight_out_in(source_map).float() - shared


def _resolve_budget(
    spec: RecursionSpec, relax: RelaxationSpec, model: nn.Module, original_layers
) -> dict[str, list[int]]:
    """Per-unit ranks under ``relax.budget`` (uniform level or spectral greedy allocation)."""
    with torch.no_grad():
        return _resolve_budget_ranks(spec, relax, model, original_layers)


def _resolve_budget_ranks(spec, relax, model, original_layers) -> dict[str, list[int]]:
    layers = decoder_layers(model)
    maps = map_shapes(layers[0], relax.target_modules)
    units = relaxation_units(spec, relax.kind, maps)
    if relax.allocation == "uniform":
        level = spectral.budget_level(relax.kind, units, relax.budget)
        ranks = spectral.uniform_ranks(relax.kind, units, level)
    else:
        gains = {}
        for u in units:
            index, name = u.key.split("/", 1)
            positions = spec.positions_of(int(index)) if relax.kind == "shared_basis" else [int(index)]
            base = weight_out_in(layers[positions[0]].get_submodule(name)).float()
            originals = [weight_out_in(original_layers[p].get_submodule(name)).float() for p in positions]
            caps = spectral.rank_caps(relax.kind, u.d_in, u.d_out, u.num_depths)
            decomposition = spectral.Decomposition(relax.kind, [w - base for w in originals], caps)
            gains[u.key] = decomposition.energy_curve()
        ranks = spectral.allocate_spectral(relax.kind, units, relax.budget, gains)
    return {key: list(value) for key, value in ranks.items()}


def relax_recursive(model: nn.Module, original: nn.Module, relax: RelaxationSpec) -> nn.Module:
    """Add depth-wise relaxations to recursive ``model`` (in place), initialized from ``original``.

    A budget is resolved to per-unit ranks first (written to the stored spec's ``rank_pattern``,
    so ``load_recursive`` rebuilds the same shapes without the original model).
    """
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
    if relax.rank_pattern is None and relax.rank is None:
        relax = replace(relax, rank_pattern=_resolve_budget(spec, relax, model, original_layers))
    add_depth_relaxation(model, spec, relax)
    layers = decoder_layers(model)
    generator = torch.Generator().manual_seed(relax.seed)
    with torch.no_grad():
        for position in range(spec.num_layers):
            layer, source = layers[position], original_layers[position]
            if relax.per_position_vectors:
                source_params = dict(source.named_parameters())
                for name, param in layer.named_parameters():
                    if param.dim() == 1:
                        param.copy_(source_params[name.replace(".base_layer", "")])
            for name, module in relaxed_maps(layer).items():
                if relax.kind == "lora":
                    _init_lora(module, source.get_submodule(name), relax.init, generator)
                elif relax.kind == "lamda_depth":
                    _init_lamda_depth(module, source.get_submodule(name))
        if relax.kind == "shared_basis":
            _init_shared_basis(layers, original_layers, spec)
    model.config.recursion = {**spec.to_dict(), "lora": relax.to_dict()}
    return model


def _init_lora(module: DepthLoRALinear, source_map: nn.Module, init: str, generator: torch.Generator) -> None:
    if init == "zero":
        A = torch.empty(
            module.lora_A.shape, dtype=module.lora_A.dtype
        )  # drawn on CPU: same values on any device
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        module.lora_A.copy_(A)
        module.lora_B.zero_()
        return
    B, A = svd_factors(_residual(module, source_map), module.rank)
    module.lora_B.copy_(B.to(module.lora_B.dtype))
    module.lora_A.copy_(A.to(module.lora_A.dtype))


def _copy_spectral(module: DepthSpectralLinear, U, S, Vt) -> None:
    module.basis_U.copy_(U.to(module.basis_U.dtype))
    module.core_S.copy_(S.to(module.core_S.dtype))
    module.basis_Vt.copy_(Vt.to(module.basis_Vt.dtype))


def _init_lamda_depth(module: DepthSpectralLinear, source_map: nn.Module) -> None:
    cap = module.rank_out
    decomposition = spectral.Decomposition("lamda_depth", [_residual(module, source_map)], (cap, cap))
    U, (S,), Vt = decomposition.spectral(cap, cap)
    _copy_spectral(module, U, S, Vt)


def _init_shared_basis(layers: nn.ModuleList, original_layers, spec: RecursionSpec) -> None:
    for shared in range(spec.num_shared):
        positions = spec.positions_of(shared)
        for name, owner_module in relaxed_maps(layers[positions[0]]).items():
            modules = [relaxed_maps(layers[p])[name] for p in positions]
            residuals = [
                _residual(m, original_layers[p].get_submodule(name))
                for m, p in zip(modules, positions, strict=True)
            ]
            r_out, r_in = owner_module.rank_out, owner_module.rank_in
            U, cores, Vt = spectral.Decomposition("shared_basis", residuals, (r_out, r_in)).spectral(
                r_out, r_in
            )
            for module, core in zip(modules, cores, strict=True):
                _copy_spectral(module, U, core, Vt)  # U, V: the same tensors at every tied position


def relaxation_ranks(model: nn.Module) -> dict[str, list[int]]:
    """{'<unit>/<map>': [r_out, r_in]} of a relaxed model (unit = position, or shared layer for
    shared_basis), read from its modules."""
    spec = recursion_spec(model)
    if spec is None or not spec.lora:
        return {}
    kind = RelaxationSpec(**spec.lora).kind
    ranks = {}
    for position, layer in enumerate(decoder_layers(model)):
        unit = _unit_index(spec, kind, position)
        for name, module in relaxed_maps(layer).items():
            ranks.setdefault(f"{unit}/{name}", [module.rank_out, module.rank_in])
    return ranks


def relaxation_parameters(model: nn.Module) -> int:
    """Distinct parameters of the relaxation modules (tied shared bases counted once)."""
    seen: dict[int, int] = {}
    for layer in decoder_layers(model):
        for module in relaxed_maps(layer).values():
            for name, param in module.named_parameters():
                if not name.startswith("base_layer."):
                    seen[id(param)] = param.numel()
    return sum(seen.values())


def lora_rank_summary(model: nn.Module) -> dict[str, int]:
    """Effective rank of each distinct target map name (same for every position)."""
    summary: dict[str, int] = {}
    for name, module in decoder_layers(model)[0].named_modules():
        if isinstance(module, DepthLoRALinear):
            summary[name] = module.rank
    return summary


__all__ = [
    "RelaxationSpec",
    "LoraSpec",
    "DepthRelaxedLinear",
    "DepthLoRALinear",
    "DepthSpectralLinear",
    "add_depth_relaxation",
    "add_depth_lora",
    "relax_recursive",
    "relaxed_maps",
    "set_trainable",
    "train_group",
    "svd_factors",
    "linear_map_names",
    "map_shapes",
    "lora_rank_summary",
    "relaxation_ranks",
    "relaxation_parameters",
    "RELAXATIONS",
    "TRAIN_GROUPS",
]
