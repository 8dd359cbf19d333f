"""What a Recursive Transformer is: its recursion spec, the decoder-layer list it ties, and errors.

The bottom of the recursive package: conversion (convert.py) and relaxation (relax.py) both build
on these, and neither imports the other's internals through here.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lamda_repro.models import RECURSIVE_CONFIG_KEY

SHARING_STRATEGIES = ("cycle", "sequence")
INIT_METHODS = ("stepwise", "average", "lower", "upper", "random")
RECURSION_CONFIG_KEY = RECURSIVE_CONFIG_KEY  # models.is_recursive_checkpoint looks for it
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
        default=None,
        metadata={"help": "depth-wise relaxation settings (relax.RelaxationSpec as dict) or None"},
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


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's generators seeded by ``seed``, leaving the global state as it was
    (so a random draw depends on the spec's seed only, not on what ran before)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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
