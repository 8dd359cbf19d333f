"""The freeze schedule of B: which components are frozen before each optimizer step.

Default rule (this suite's reading of the paper): over the first ``freeze_fraction`` of the T
optimizer steps, component k (0-based, largest singular value first) is frozen from step
floor(k * freeze_fraction * T / r) on. A frozen component's column is read from its frozen copy
and gets no gradient (see ``LamdaLayer.freeze_components``), so it is bit-identical from then on,
with any optimizer and under data-parallel wrappers (no Parameter is replaced).

``init='reference_code'`` instead reproduces the public reference code: before each optimizer
step the gradient of the first t = floor(progress / 0.3) columns is zeroed (t <= 3), and nothing
else is done, so those columns still move under AdamW momentum and weight decay.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

from lamda_repro.measure import whole_parameters
from lamda_repro.methods.lamda.layer import LamdaLayer

REFERENCE_CODE_PERIOD = Fraction(3, 10)


def data_parallel() -> bool:
    """Whether this process is one of several training replicas (torchrun sets WORLD_SIZE).

    A data-parallel wrapper registered B's gradient when it wrapped the model, so a fully frozen B
    then stays a Parameter with a zero gradient; on one process it leaves training (no gradient,
    no optimizer state). The answer is the same for the whole run, also when it resumes.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def frozen_count_at_step(step: int, r: int, freeze_fraction: float, total_steps: int) -> int:
    """Number of components of B frozen before optimizer step ``step`` (0-based).

    Component k is frozen when floor(k * freeze_fraction * total_steps / r) <= step; exact
    rational arithmetic keeps the schedule identical on every machine.
    """
    if r <= 0 or total_steps < 0 or step < 0:
        raise ValueError(f"invalid freeze schedule arguments: step={step}, r={r}, total_steps={total_steps}")
    fraction = Fraction(str(freeze_fraction))
    return sum(1 for k in range(r) if math.floor(k * fraction * total_steps / r) <= step)


def reference_code_zeroed_columns(step: int, r: int, total_steps: int) -> int:
    """Columns of B whose gradient the reference code zeroes at ``step``: floor(progress / 0.3)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return min(r, math.floor(Fraction(step, total_steps) / REFERENCE_CODE_PERIOD))


def lamda_layers(model: nn.Module) -> list[tuple[str, LamdaLayer]]:
    """(module name, layer) of every LaMDA layer in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LamdaLayer)]


def configured_total_steps(model: nn.Module) -> Optional[int]:
    """``total_steps`` of the model's LamdaConfig(s), if set."""
    for config in getattr(model, "peft_config", {}).values():
        if getattr(config, "total_steps", None):
            return int(config.total_steps)
    return None


class LamdaFreezeController:
    """Applies the freeze rule of every LaMDA adapter in a model; usable from a plain loop.

    In a plain loop call ``before_optimizer_step(optimizer, step, total_steps)`` after the
    backward pass and before ``optimizer.step()``, with ``step`` the 0-based index of that step.
    """

    def __init__(self, model: nn.Module, total_steps: Optional[int] = None):
        self.model = model
        self.layers = lamda_layers(model)
        if not self.layers:
            raise ValueError("the model has no LaMDA layers to freeze")
        self.total_steps = total_steps if total_steps is not None else configured_total_steps(model)
        self.history: list[tuple[int, int]] = []  # (step, newly frozen components)

    def _rule(self, module: LamdaLayer, adapter: str) -> str:
        return "reference_code" if module.lamda_init[adapter] == "reference_code" else "spectral"

    def _freeze_fraction(self, adapter: str) -> float:
        config = getattr(self.model, "peft_config", {}).get(adapter)
        return 0.3 if config is None else float(config.freeze_fraction)

    def _resolve_total(self, total_steps: Optional[int]) -> int:
        total = total_steps if total_steps is not None else self.total_steps
        if total is None or total <= 0:
            raise ValueError(
                "the LaMDA freeze schedule needs the number of optimizer steps (total_steps > 0)"
            )
        self.total_steps = total
        return total

    def freeze_for_step(
        self, optimizer: Optional[torch.optim.Optimizer], step: int, total_steps: Optional[int] = None
    ) -> int:
        """Freeze every component due by ``step``; returns how many became newly frozen."""
        total = self._resolve_total(total_steps)
        newly = 0
        for _, module in self.layers:
            for adapter in module.lamda_S:
                if self._rule(module, adapter) != "spectral":
                    continue
                count = frozen_count_at_step(step, module.r[adapter], self._freeze_fraction(adapter), total)
                newly += module.freeze_components(adapter, count, optimizer)
                if (
                    count == module.r[adapter]
                    and module.lamda_B[adapter].requires_grad
                    and not data_parallel()
                ):
                    module.release_b(adapter, optimizer)
        if newly:
            self.history.append((step, newly))
        return newly

    @torch.no_grad()
    def zero_reference_code_gradients(self, step: int, total_steps: Optional[int] = None) -> None:
        """The reference code's rule: zero the gradient of the first floor(progress/0.3) columns."""
        total = self._resolve_total(total_steps)
        for _, module in self.layers:
            for adapter in module.lamda_S:
                if self._rule(module, adapter) != "reference_code":
                    continue
                B = module.lamda_B[adapter]
                t = reference_code_zeroed_columns(step, module.r[adapter], total)
                if B.grad is not None and t > 0:
                    B.grad[:, :t] = 0

    def before_optimizer_step(
        self, optimizer: Optional[torch.optim.Optimizer], step: int, total_steps: Optional[int] = None
    ) -> int:
        """Plain-loop entry point: apply both rules for optimizer step ``step`` (the optimizer, when
        given, has its state of newly frozen columns zeroed)."""
        newly = self.freeze_for_step(optimizer, step, total_steps)
        self.zero_reference_code_gradients(step, total_steps)
        return newly

    def freeze_state(self) -> dict[str, dict[str, int]]:
        """{module name: {"frozen": k, "r": r}} for the first adapter of each layer."""
        state = {}
        for name, module in self.layers:
            for adapter in module.lamda_S:
                key = name if len(module.lamda_S) == 1 else f"{name}[{adapter}]"
                state[key] = {"frozen": module.frozen_components(adapter), "r": module.r[adapter]}
        return state


class LamdaFreezeCallback(TrainerCallback):
    """transformers.Trainer callback running the LaMDA freeze rules at the right events.

    Components due at step 0 are frozen at train begin; after each optimizer step (gradients
    already zeroed) the components due at the next step are frozen. The reference-code rule
    zeroes gradients just before each optimizer step. The number of steps T is, in order: the
    ``total_steps`` given here, the LamdaConfig's ``total_steps``, the trainer's ``max_steps``.
    """

    def __init__(self, total_steps: Optional[int] = None):
        self.total_steps = total_steps
        self.controller: Optional[LamdaFreezeController] = None

    def _controller(self, model: nn.Module, state) -> LamdaFreezeController:
        if self.controller is None:
            total = self.total_steps or configured_total_steps(model) or state.max_steps
            self.controller = LamdaFreezeController(model, total)
        return self.controller

    def resume_at(self, model: nn.Module, step: int) -> None:
        """Restore the freeze state of optimizer step ``step`` (a resumed run, before its
        checkpoint is loaded; the checkpoint's adapter then brings the frozen columns' values)."""
        if self.controller is None:
            total = self.total_steps or configured_total_steps(model)
            self.controller = LamdaFreezeController(model, total)
        self.controller.freeze_for_step(None, step)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        with whole_parameters(model):
            self._controller(model, state).freeze_for_step(optimizer, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        with whole_parameters(model, with_grads=True):
            self._controller(model, state).zero_reference_code_gradients(state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        with whole_parameters(model):
            self._controller(model, state).freeze_for_step(optimizer, state.global_step)
