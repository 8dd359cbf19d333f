"""The method interface: how a fine-tuning method plugs into training, measurement and records.

A method turns a loaded base model into the model that is trained (``apply``), may add
training callbacks (``callbacks``) or its own optimizer (``create_optimizer``), and reports
what the run record needs (``record_info``, ``updated_elements``). Methods are registered by
type name; a config entry ``{type: lora, r: 8, ...}`` is validated by the method class
before any job runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lamda_repro.schema import ConfigError, check_against_schema

_REGISTRY: dict[str, type["Method"]] = {}


class MethodConfigError(ConfigError):
    """A method's parameters in the config are invalid (message names key and problem)."""


@dataclass
class MethodContext:
    """What a method may need to know about the model it adapts."""

    task_kind: str  # "seq-cls", "seq2seq" or "causal-lm"
    model_type: str  # transformers config.model_type, e.g. "bert", "llama"
    total_steps: int = 0  # optimizer steps of the whole run (for schedules)
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``type_name``, ``params_schema`` and implement ``apply``."""

    type_name: ClassVar[str] = ""
    # JSON-schema "properties" of this method's parameters (besides "type"); used to
    # validate config entries with one-line errors before any job runs.
    params_schema: ClassVar[dict[str, Any]] = {}
    required_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: dict[str, Any]):
        self.params = dict(params)

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        """Raise MethodConfigError naming ``where.<key>`` if ``params`` are invalid."""
        schema = {
            "type": "object",
            "properties": {"type": {"type": "string"}, **cls.params_schema},
            "required": list(cls.required_params),
            "additionalProperties": False,
        }
        check_against_schema(params, schema, where)

    # -- training ------------------------------------------------------------------------
    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError

    def callbacks(self, model: nn.Module, ctx: MethodContext) -> list:
        """transformers.TrainerCallback instances to add to the trainer."""
        return []

    def create_optimizer(
        self, model: nn.Module, lr: float, weight_decay: float, ctx: MethodContext
    ) -> torch.optim.Optimizer | None:
        """Return a custom optimizer, or None for the trainer's default AdamW."""
        return None

    # -- measurement ---------------------------------------------------------------------
    def updated_elements(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        """Number of parameter elements the optimizer step just updated.

        None means the default count: elements of parameters in the optimizer that have a
        gradient. Methods that freeze parts of a tensor override this.
        """
        return None

    def record_info(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific facts for the run record (e.g. a rank allocation)."""
        return {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.type_name:
        raise ValueError(f"{cls.__name__} has no type_name")
    _REGISTRY[cls.type_name] = cls
    return cls


def method_types() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method_class(type_name: str) -> type[Method]:
    _import_builtin_methods()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise MethodConfigError(
            f"unknown method type {type_name!r} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def build_method(params: dict[str, Any]) -> Method:
    return get_method_class(params["type"])(params)


def _import_builtin_methods() -> None:
    # Importing the package's modules registers their classes (as for tasks: adding a method is
    # adding a module; base never imports a method by name).
    import importlib
    import pkgutil

    import lamda_repro.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"lamda_repro.methods.{mod.name}")
