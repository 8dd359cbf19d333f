"""The LaMDA adapter on a linear layer: y = W x + s * B (S (A x)), with B frozen column by column.

The base layer is a ``torch.nn.Linear`` (weight d_out x d_in) or a
``transformers.pytorch_utils.Conv1D`` (GPT-2; weight stored transposed, d_in x d_out). Every use of
the base weight (SVD init, residual, merge) goes through ``weight_out_in`` / ``set_weight_out_in``,
which present it as d_out x d_in whatever the layout, so A, S and B are the same in both cases.

B is held as two parameters per adapter: ``lamda_B_frozen`` (the first k columns, frozen
components, never in an optimizer) and ``lamda_B`` (the remaining r - k trainable columns).
Freezing a component moves a column from the second to the first and shrinks the optimizer
state of ``lamda_B`` in place, so a frozen component cannot move (no momentum, no weight decay)
and keeps no optimizer state. The number of frozen components is the width of
``lamda_B_frozen``, so it is saved with the adapter.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers.pytorch_utils import Conv1D

from lamda_repro.methods.lamda.config import LamdaConfig, LamdaConfigError

FROZEN_WEIGHTS = ("lamda_A", "lamda_B_frozen")
ADAPTABLE_LAYERS = (nn.Linear, Conv1D)


class LamdaLayer(BaseTunerLayer):
    """Per-adapter LaMDA weights of one linear layer, keyed by adapter name (peft convention)."""

    adapter_layer_names = ("lamda_A", "lamda_S", "lamda_B", "lamda_B_frozen")
    other_param_names = ("r", "lamda_alpha", "scaling", "lamda_dropout", "lamda_init")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lamda_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lamda_init: dict[str, str] = {}
        self.lamda_dropout = nn.ModuleDict({})
        self.lamda_A = nn.ParameterDict({})
        self.lamda_S = nn.ParameterDict({})
        self.lamda_B = nn.ParameterDict({})
        self.lamda_B_frozen = nn.ParameterDict({})
        self.frozen_peft_weight_names = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if not isinstance(base, ADAPTABLE_LAYERS):
            raise TypeError(
                f"LaMDA adapts torch.nn.Linear and transformers Conv1D layers, got {type(base).__name__}"
            )
        self.in_features, self.out_features = _get_in_out_features(base)
        # Conv1D (GPT-2) stores its weight as d_in x d_out, the transpose of nn.Linear's layout.
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.kwargs = kwargs

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as a d_out x d_in matrix (a transposed view for Conv1D)."""
        weight = self.get_base_weight()
        return weight.T if self.fan_in_fan_out else weight

    def set_weight_out_in(self, weight: torch.Tensor) -> None:
        """Write a d_out x d_in matrix back into the base weight in the layer's own layout."""
        self.set_base_weight(weight.T.contiguous() if self.fan_in_fan_out else weight)

    # -- creation ----------------------------------------------------------------------------
    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, config: LamdaConfig, inference_mode: bool = False
    ) -> None:
        """Create the adapter ``adapter_name`` on this layer and initialise it from W."""
        max_rank = min(self.in_features, self.out_features)
        if r <= 0 or r > max_rank:
            raise LamdaConfigError(
                f"LaMDA rank {r} must be in [1, {max_rank}] "
                f"for a {self.out_features}x{self.in_features} layer"
            )
        self.r[adapter_name] = r
        self.lamda_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lamda_init[adapter_name] = config.init
        self.lamda_dropout[adapter_name] = (
            nn.Dropout(config.lamda_dropout) if config.lamda_dropout > 0 else nn.Identity()
        )

        weight = self.get_base_weight()
        device = weight.device
        A, S, B = self._initial_factors(adapter_name, config)
        self.lamda_A[adapter_name] = nn.Parameter(A.to(device), requires_grad=False)
        self.lamda_S[adapter_name] = nn.Parameter(S.to(device))
        self.lamda_B[adapter_name] = nn.Parameter(B.to(device))
        self.lamda_B_frozen[adapter_name] = nn.Parameter(
            B.new_zeros(self.out_features, 0).to(device), requires_grad=False
        )
        self.frozen_peft_weight_names = dict(self.frozen_peft_weight_names)
        self.frozen_peft_weight_names[adapter_name] = FROZEN_WEIGHTS
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def _initial_factors(self, adapter_name: str, config: LamdaConfig):
        r = self.r[adapter_name]
        if getattr(config, "loading_saved_weights", False) and config.init != "svd_residual":
            # Saved A, S and B overwrite these right away (LamdaConfig.from_pretrained): no SVD.
            return torch.zeros(r, self.in_features), torch.zeros(r, r), torch.zeros(self.out_features, r)
        if config.init == "reference_code":
            A = torch.empty(r, self.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            S = torch.empty(r, r)
            nn.init.kaiming_uniform_(S, a=math.sqrt(5))  # nn.Linear(r, r).weight default
            return A, S, torch.zeros(self.out_features, r)
        weight = self.weight_out_in().float()
        if config.init == "svd_lowrank":
            U, sigma, V = torch.svd_lowrank(weight, q=min(r + 8, min(weight.shape)), niter=config.svd_niter)
            A, B, sigma = V[:, :r].T.contiguous(), U[:, :r].contiguous(), sigma[:r]
        else:
            U, sigma, Vh = torch.linalg.svd(weight, full_matrices=False)
            A, B, sigma = Vh[:r].contiguous(), U[:, :r].contiguous(), sigma[:r]
        if config.init == "svd_residual":
            S = torch.diag(sigma) / self.scaling[adapter_name]
            residual = weight - (B * sigma) @ A
            self.set_weight_out_in(residual.to(self.get_base_weight().dtype))
        else:
            S = torch.zeros(r, r)
        return A.cpu(), S.cpu(), B.cpu()

    # -- freeze state ------------------------------------------------------------------------
    def frozen_components(self, adapter_name: str) -> int:
        """How many columns of B (largest singular directions first) are frozen."""
        return self.lamda_B_frozen[adapter_name].shape[1]

    def full_B(self, adapter_name: str) -> torch.Tensor:
        """B as one d_out x r matrix: frozen columns then trainable ones."""
        return torch.cat([self.lamda_B_frozen[adapter_name], self.lamda_B[adapter_name]], dim=1)

    @torch.no_grad()
    def freeze_components(
        self, adapter_name: str, count: int, optimizer: Optional[torch.optim.Optimizer]
    ) -> int:
        """Freeze the first ``count`` columns of B; returns how many became newly frozen.

        The moved columns leave ``lamda_B`` (and the slices of its optimizer state leave the
        optimizer); when all r are frozen, ``lamda_B`` is taken out of the optimizer and its
        state deleted. Freezing is monotone: a smaller count than the current one is ignored.
        ``optimizer`` is required: the optimizer training B, or None before any optimizer holds
        B (an optimizer that holds the replaced B then refuses to step: LamdaOptimizerError).
        """
        r = self.r[adapter_name]
        if not 0 <= count <= r:
            raise ValueError(f"freeze count {count} outside [0, {r}]")
        done = self.frozen_components(adapter_name)
        moved = count - done
        if moved <= 0:
            return 0
        old = self.lamda_B[adapter_name]
        fully = count == r
        # A new Parameter object (not a resized .data): autograd caches shape metadata per leaf.
        new = nn.Parameter(old.data[:, moved:].clone(), requires_grad=not fully and old.requires_grad)
        if old.grad is not None and not fully:
            new.grad = old.grad[:, moved:].clone()
        if optimizer is not None:
            # May refuse (LamdaOptimizerError) before anything has moved.
            _move_optimizer_entry(optimizer, old, None if fully else new, moved)
        elif old.requires_grad and not fully:
            _REPLACED_WITHOUT_OPTIMIZER[id(old)] = old
        self.lamda_B_frozen[adapter_name] = nn.Parameter(
            torch.cat([self.lamda_B_frozen[adapter_name].data, old.data[:, :moved]], dim=1),
            requires_grad=False,
        )
        self.lamda_B[adapter_name] = new
        if fully:
            self.frozen_peft_weight_names[adapter_name] = FROZEN_WEIGHTS + ("lamda_B",)
        return moved

    def resize_frozen(self, adapter_name: str, count: int) -> None:
        """Set the split of B to ``count`` frozen columns without an optimizer (used when loading)."""
        r = self.r[adapter_name]
        if not 0 <= count <= r:
            raise ValueError(f"saved freeze count {count} outside [0, {r}] for LaMDA rank {r}")
        B = self.full_B(adapter_name).detach()
        fully = count == r
        trainable = self.lamda_B[adapter_name].requires_grad and not fully
        self.lamda_B_frozen[adapter_name] = nn.Parameter(B[:, :count].clone(), requires_grad=False)
        self.lamda_B[adapter_name] = nn.Parameter(B[:, count:].clone(), requires_grad=trainable)
        self.frozen_peft_weight_names[adapter_name] = FROZEN_WEIGHTS + (("lamda_B",) if fully else ())

    # -- merge -------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s * B S A, the d_out x d_in update this adapter adds to W (computed in fp32)."""
        A = self.lamda_A[adapter_name].float()
        S = self.lamda_S[adapter_name].float()
        B = self.full_B(adapter_name).float()
        return (B @ S @ A) * self.scaling[adapter_name]

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self.lamda_alpha[adapter] / self.r[adapter]


class LamdaOptimizerError(RuntimeError):
    """The optimizer cannot follow the freeze of B (unknown state layout, or B not handed over)."""


# Adafactor keeps a factored second moment for matrices: per-row and per-column statistics
# (torch: row_var d_out x 1, col_var 1 x cols; transformers: exp_avg_sq_row d_out, exp_avg_sq_col cols).
ROW_FACTORED_STATE = ("row_var", "exp_avg_sq_row")
COLUMN_FACTORED_STATE = ("col_var", "exp_avg_sq_col")


def _split_state(key: str, value, old: torch.Tensor, moved: int, optimizer) -> object:
    """The part of one optimizer-state entry of ``old`` that belongs to its last cols - moved columns."""
    if not torch.is_tensor(value) or value.numel() == 1:
        return value  # step counters, scalars
    if value.shape == old.shape:
        return value[:, moved:].clone()  # per-element state (Adam moments, momentum, ...)
    if key in COLUMN_FACTORED_STATE and value.shape[-1] == old.shape[1]:
        return value[..., moved:].clone()
    if key in ROW_FACTORED_STATE:
        return value  # rescaled with the column statistics in _split_factored
    name = type(getattr(optimizer, "optimizer", optimizer)).__name__
    raise LamdaOptimizerError(
        f"cannot split {name}'s state {key!r} of shape {tuple(value.shape)} when freezing columns of "
        f"LaMDA's B; use an optimizer with per-element or Adafactor-style state, or freeze_fraction 0"
    )


def _split_factored(old_state: dict, new_state: dict, moved: int) -> None:
    """Rescale Adafactor's row statistics to the remaining columns.

    Adafactor estimates the second moment as V_ij = R_i C_j / mean(R), where R (row means) and C
    (column means) both average the same squared gradients, so mean(R) = mean(C). Dropping the
    first ``moved`` columns leaves C' = C[moved:]; setting R' = R * mean(C') / mean(C) keeps that
    model: V' equals V on the remaining columns and mean(R') = mean(C').
    """
    for row_key, col_key in zip(ROW_FACTORED_STATE, COLUMN_FACTORED_STATE, strict=True):
        if row_key in old_state and col_key in old_state:
            col_old = old_state[col_key].float()
            total = col_old.mean()
            if float(total) > 0:
                factor = col_old[..., moved:].mean() / total
                new_state[row_key] = (old_state[row_key].float() * factor).to(old_state[row_key].dtype)
            else:
                new_state[row_key] = old_state[row_key].clone()


def _move_optimizer_entry(optimizer, old: torch.Tensor, new: Optional[torch.Tensor], moved: int) -> None:
    """Replace ``old`` by ``new`` in the optimizer, keeping state minus the first ``moved`` columns.

    ``new=None`` removes the parameter and deletes its state. Per-element state (AdamW moments,
    SGD momentum, ...) loses those columns; Adafactor's factored state is split as well
    (``_split_factored``); any other state layout raises LamdaOptimizerError.
    """
    holders = [group for group in optimizer.param_groups if any(p is old for p in group["params"])]
    if not holders and old.requires_grad:
        raise LamdaOptimizerError(
            "the optimizer given to freeze LaMDA's B does not hold B's trainable columns; pass the "
            "optimizer that trains the adapter"
        )
    state = optimizer.state.get(old)
    split = None
    if new is not None and state:  # computed first: an unsplittable state changes nothing
        split = {key: _split_state(key, value, old, moved, optimizer) for key, value in state.items()}
        _split_factored(state, split, moved)
    for group in holders:
        params, names = group["params"], group.get("param_names")
        for i in range(len(params) - 1, -1, -1):
            if params[i] is not old:
                continue
            if new is None:
                del params[i]
                if names is not None:
                    del names[i]
            else:
                params[i] = new
    optimizer.state.pop(old, None)
    if split is not None:
        optimizer.state[new] = split


# B parameters replaced by a freeze that was given no optimizer. An optimizer that still holds
# one would silently stop training B's remaining columns, so its next step fails instead.
# Keyed by id (tensors compare element-wise, so a WeakSet cannot hold them); entries leave with the tensor.
_REPLACED_WITHOUT_OPTIMIZER: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def _refuse_stale_b(optimizer, args, kwargs) -> None:
    if not _REPLACED_WITHOUT_OPTIMIZER:
        return
    for group in optimizer.param_groups:
        if any(_REPLACED_WITHOUT_OPTIMIZER.get(id(p)) is p for p in group["params"]):
            raise LamdaOptimizerError(
                f"{type(optimizer).__name__} still holds a LaMDA B that was frozen without it, so B's "
                "remaining columns would not train: pass the optimizer to the freeze "
                "(LamdaFreezeController.before_optimizer_step(optimizer, step) or freeze_components)"
            )


register_optimizer_step_pre_hook(_refuse_stale_b)


class Linear(nn.Module, LamdaLayer):
    """An nn.Linear or Conv1D layer with LaMDA adapters."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        config: LamdaConfig,
        **kwargs,
    ) -> None:
        super().__init__()
        LamdaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add s * B S A of the active (or given) adapters to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.lamda_S:
                continue
            base = self.weight_out_in()
            merged = base.float() + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging LaMDA adapter {name!r} gives non-finite weights")
            self.set_weight_out_in(merged.to(base.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lamda_S:
                base = self.weight_out_in()
                self.set_weight_out_in((base.float() - self.get_delta_weight(name)).to(base.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lamda_S:
                continue
            A, S = self.lamda_A[name], self.lamda_S[name]
            # A is frozen, so autograd keeps only A (a parameter) here, not the d_in-sized input.
            projected = F.linear(self.lamda_dropout[name](x.to(A.dtype)), A)
            mixed = F.linear(projected, S)
            result = result + (self._apply_B(name, mixed) * self.scaling[name]).to(out_dtype)
        return result

    def _apply_B(self, name: str, mixed: torch.Tensor) -> torch.Tensor:
        frozen, trainable = self.lamda_B_frozen[name], self.lamda_B[name]
        k = frozen.shape[1]
        if k == 0:
            return F.linear(mixed, trainable)
        if trainable.shape[1] == 0:
            return F.linear(mixed, frozen)
        return F.linear(mixed[..., :k], frozen) + F.linear(mixed[..., k:], trainable)

    def __repr__(self) -> str:
        return "lamda." + super().__repr__()
