"""The suite's method types ``lamda``, ``lamdapp`` and ``lamda_reference`` (see methods/base.py).

For every task kind the LaMDA adapters go on the configured linear layers. For ``seq-cls`` the
peft task type SEQ_CLS makes the classification head (``classifier`` / ``score``) fully
trainable and saved (peft's modules_to_save); ``seq2seq`` and ``causal-lm`` keep the LM head
frozen. Extra ``modules_to_save`` can be given in the config.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from lamda_repro.methods.base import Method, MethodConfigError, MethodContext, register_method
from lamda_repro.methods.lamda.allocation import (
    BUDGETS,
    DEFAULT_RULE,
    DIRECTIONS,
    RULES,
    allocate_ranks,
    rank_histogram,
    weight_spectra,
)
from lamda_repro.methods.lamda.config import INIT_CHOICES, LamdaConfig
from lamda_repro.methods.lamda.freeze import LamdaFreezeCallback, LamdaFreezeController, lamda_layers
from lamda_repro.methods.peft_methods import LORA_FAMILY_SCHEMA

TASK_TYPES = {"seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal-lm": "CAUSAL_LM"}

_COMMON_SCHEMA: dict[str, Any] = {
    **LORA_FAMILY_SCHEMA,
    "freeze_fraction": {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "fraction of optimizer steps over which B is frozen column by column",
    },
}


def updated_elements_in_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> int:
    """Elements the optimizer step updates: trainable parameters in it that have a gradient,
    less the frozen columns of LaMDA's B (found in ``model``), which the step cannot change.

    The reference-code rule's zeroed columns are counted because AdamW still moves them.
    """
    frozen: dict[int, int] = {}
    if model is not None:
        for _, module in lamda_layers(model):
            for adapter, B in module.lamda_B.items():
                frozen[id(B)] = module.out_features * module.frozen_components(adapter)
    seen: set[int] = set()
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in seen or not p.requires_grad or p.grad is None:
                continue
            seen.add(id(p))
            total += p.numel() - frozen.get(id(p), 0)
    return total


def lamda_trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable counts of the LaMDA path: before any freeze, now, and after the full freeze."""
    before = after = now = 0
    for _, module in lamda_layers(model):
        for adapter in module.lamda_S:
            r, d_out = module.r[adapter], module.out_features
            before += r * r + d_out * r
            after += r * r
            now += r * r + d_out * (r - module.frozen_components(adapter))
    return {"trainable_before_freeze": before, "trainable_now": now, "trainable_after_freeze": after}


@register_method
class LamdaMethod(Method):
    """LaMDA: frozen A, trainable S, B frozen column by column (``init: svd`` by default)."""

    type_name = "lamda"
    params_schema = {**_COMMON_SCHEMA, "init": {"enum": list(INIT_CHOICES)}}
    defaults: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.0, "init": "svd", "freeze_fraction": 0.3}

    def __init__(self, params: dict[str, Any]):
        super().__init__(params)
        self.settings = {**self.defaults, **{k: v for k, v in params.items() if k != "type"}}
        self.rank_allocation: dict[str, int] | None = None
        self.controller: LamdaFreezeController | None = None

    def _target_modules(self, ctx: MethodContext):
        targets = self.settings.get("target_modules")
        if targets is None:
            targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(ctx.model_type)
            if targets is None:
                raise MethodConfigError(
                    f"{self.type_name}: no default target_modules for model type {ctx.model_type!r}"
                )
        return targets if isinstance(targets, str) else list(targets)

    def _rank_pattern(self, model: nn.Module, targets) -> dict[str, int]:
        return dict(self.settings.get("rank_pattern", {}))

    def build_config(self, model: nn.Module, ctx: MethodContext) -> LamdaConfig:
        """The LamdaConfig this entry stands for on ``model``."""
        if ctx.task_kind not in TASK_TYPES:
            raise MethodConfigError(f"{self.type_name}: unknown task kind {ctx.task_kind!r}")
        targets = self._target_modules(ctx)
        return LamdaConfig(
            task_type=TASK_TYPES[ctx.task_kind],
            r=int(self.settings["r"]),
            lora_alpha=float(self.settings["alpha"]),
            lamda_dropout=float(self.settings["dropout"]),
            target_modules=targets,
            init=self.settings["init"],
            freeze_fraction=float(self.settings["freeze_fraction"]),
            total_steps=ctx.total_steps or None,
            rank_pattern=self._rank_pattern(model, targets),
            alpha_pattern=dict(self.settings.get("alpha_pattern", {})),
            modules_to_save=self.settings.get("modules_to_save"),
        )

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        peft_model = get_peft_model(model, self.build_config(model, ctx))
        self.controller = LamdaFreezeController(peft_model, ctx.total_steps or None)
        if ctx.total_steps:
            self.controller.freeze_for_step(None, 0)  # components due before the first step
        return peft_model

    def callbacks(self, model: nn.Module, ctx: MethodContext) -> list:
        return [LamdaFreezeCallback(ctx.total_steps or None)]

    def updated_elements(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        return updated_elements_in_optimizer(optimizer, model)

    def record_info(self, model: nn.Module) -> dict[str, Any]:
        layers = lamda_layers(model)
        frozen = sum(m.frozen_components(a) for _, m in layers for a in m.lamda_S)
        components = sum(m.r[a] for _, m in layers for a in m.lamda_S)
        info: dict[str, Any] = {
            "init": self.settings["init"],
            "freeze_rule": "reference_code" if self.settings["init"] == "reference_code" else "spectral",
            "freeze_fraction": self.settings["freeze_fraction"],
            "adapted_modules": len(layers),
            "frozen_components": frozen,
            "total_components": components,
            "fully_frozen_modules": sum(
                m.frozen_components(a) == m.r[a] for _, m in layers for a in m.lamda_S
            ),
            **lamda_trainable_summary(model),
        }
        ranks = {name: m.r[a] for name, m in layers for a in m.lamda_S}
        # JSON keys are strings: {"4": 10, "8": 27} = 10 modules of rank 4, 27 of rank 8.
        info["rank_histogram"] = {str(k): v for k, v in rank_histogram(ranks).items()}
        info["allocation_uniform"] = len(set(ranks.values())) <= 1
        if self.rank_allocation is not None:
            info["allocation_rule"] = self.settings.get("rule", DEFAULT_RULE)
            info["rank_allocation"] = dict(self.rank_allocation)
        return {"lamda": info}


@register_method
class LamdaPlusPlusMethod(LamdaMethod):
    """LaMDA++: LaMDA with per-module ranks from the pretrained weights' normalized spectra."""

    type_name = "lamdapp"
    params_schema = {
        **{k: v for k, v in LamdaMethod.params_schema.items() if k != "rank_pattern"},
        "r_min": {"type": "integer", "minimum": 1},
        "r_max": {"type": "integer", "minimum": 1},
        "direction": {"enum": list(DIRECTIONS)},
        "budget": {"enum": list(BUDGETS)},
        "rule": {
            "enum": list(RULES),
            "description": "energy_target (default): common share of spectral energy; inverse_energy: "
            "rank^2 proportional to 1 - E(r0)",
        },
    }

    def _rank_pattern(self, model: nn.Module, targets) -> dict[str, int]:
        import re

        options = {
            k: self.settings[k]
            for k in ("rule", "r_min", "r_max", "direction", "budget")
            if k in self.settings
        }
        if targets == "all-linear":
            resolved = _maybe_include_all_linear_layers(LamdaConfig(target_modules=targets), model)
            targets = sorted(resolved.target_modules)
        self.rank_allocation = allocate_ranks(
            weight_spectra(model, targets), int(self.settings["r"]), **options
        )
        return {re.escape(name): rank for name, rank in self.rank_allocation.items()}


@register_method
class LamdaReferenceMethod(LamdaMethod):
    """The public reference code's behaviour (for a side-by-side row; not the paper's method).

    A Kaiming-uniform, B = 0, S nn.Linear default init, r 64, alpha 16, dropout 0.1, and its
    freezing rule (gradient of the first floor(progress / 0.3) columns zeroed).
    """

    type_name = "lamda_reference"
    params_schema = {k: v for k, v in _COMMON_SCHEMA.items() if k != "freeze_fraction"}
    defaults = {"r": 64, "alpha": 16.0, "dropout": 0.1, "init": "reference_code", "freeze_fraction": 0.3}
