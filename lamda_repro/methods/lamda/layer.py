"""The LaMDA adapter on a linear layer: y = W x + s * B (S (A x)), with B frozen column by column.

The base layer is a ``torch.nn.Linear`` (weight d_out x d_in) or a
``transformers.pytorch_utils.Conv1D`` (GPT-2; weight stored transposed, d_in x d_out). Every use of
the base weight (SVD init, residual, merge) goes through ``weight_out_in`` / ``set_weight_out_in``,
which present it as d_out x d_in whatever the layout, so A, S and B are the same in both cases.

B keeps one shape and one Parameter object for the whole run, so that a data-parallel wrapper
(DDP, FSDP) that registered it at wrap time keeps averaging the gradient of the tensor that trains.
Per adapter: ``lamda_B`` (d_out x r, trainable), ``lamda_B_frozen`` (d_out x r, no gradient: the
values of the frozen columns, copied from ``lamda_B`` when they freeze) and ``lamda_frozen`` (a
persistent r-element 0/1 buffer, 1 = column frozen). The forward uses
``where(frozen, lamda_B_frozen, lamda_B)``: a frozen column's value comes from the copy, so no
optimizer (momentum, weight decay) can move it, and its gradient in ``lamda_B`` is exactly zero.
Freezing also zeroes the frozen columns' per-element optimizer state. All three are saved with the
adapter, so the freeze state travels with it.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from lamda_repro.methods.lamda.config import LamdaConfig, LamdaConfigError

FROZEN_WEIGHTS = ("lamda_A", "lamda_B_frozen")
ADAPTABLE_LAYERS = (nn.Linear, Conv1D)


class LamdaLayer(BaseTunerLayer):
    """Per-adapter LaMDA weights of one linear layer, keyed by adapter name (peft convention)."""

    adapter_layer_names = ("lamda_A", "lamda_S", "lamda_B", "lamda_B_frozen")
    other_param_names = ("r", "lamda_alpha", "scaling", "lamda_dropout", "lamda_init", "lamda_frozen")

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
        self.lamda_frozen = BufferDict({}, persistent=True)
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
        self.lamda_B_frozen[adapter_name] = nn.Parameter(torch.zeros_like(B).to(device), requires_grad=False)
        self.lamda_frozen[adapter_name] = torch.zeros(r, dtype=torch.uint8, device=device)
        # Like LoRA: the adapter takes the base layer's dtype; peft's autocast_adapter_dtype=True
        # (its default) then casts bf16/fp16 adapter weights back to fp32 after injection.
        self._move_adapter_to_device_of_base_layer(adapter_name)
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
    def frozen_mask(self, adapter_name: str) -> torch.Tensor:
        """Boolean r-vector: True where the column of B is frozen."""
        return self.lamda_frozen[adapter_name].bool()

    def frozen_components(self, adapter_name: str) -> int:
        """How many columns of B (largest singular directions first) are frozen."""
        return int(self.lamda_frozen[adapter_name].sum().item())

    def frozen_trainable_elements(self) -> int:
        """Elements of trainable Parameters that are frozen (the frozen columns of every B)."""
        return sum(
            self.out_features * self.frozen_components(a)
            for a in self.lamda_B
            if self.lamda_B[a].requires_grad
        )

    def full_B(self, adapter_name: str) -> torch.Tensor:
        """B as used by the forward: the frozen columns' copies, the trainable columns' values."""
        return torch.where(
            self.frozen_mask(adapter_name), self.lamda_B_frozen[adapter_name], self.lamda_B[adapter_name]
        )

    @torch.no_grad()
    def freeze_components(
        self, adapter_name: str, count: int, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> int:
        """Freeze the first ``count`` columns of B; returns how many became newly frozen.

        The newly frozen columns are copied into ``lamda_B_frozen`` (the forward reads them from
        there from now on), their gradient is zeroed, and so is their per-element state in
        ``optimizer`` when one is given. No Parameter is created or replaced. Freezing is
        monotone: a smaller count than the current one is ignored.
        """
        r = self.r[adapter_name]
        if not 0 <= count <= r:
            raise ValueError(f"freeze count {count} outside [0, {r}]")
        done = self.frozen_components(adapter_name)
        moved = count - done
        if moved <= 0:
            return 0
        B = self.lamda_B[adapter_name]
        self.lamda_B_frozen[adapter_name][:, done:count] = B[:, done:count]
        self.lamda_frozen[adapter_name][:count] = 1
        if B.grad is not None:
            B.grad[:, :count] = 0
        if optimizer is not None:
            zero_frozen_optimizer_state(optimizer, B, count)
        return moved

    def release_b(self, adapter_name: str, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Take a fully frozen B out of training: ``requires_grad=False``, out of ``optimizer``, its
        state deleted. Only for a model no data-parallel wrapper holds (it registered B's gradient)."""
        if self.frozen_components(adapter_name) != self.r[adapter_name]:
            raise ValueError(f"B of adapter {adapter_name!r} still has trainable columns")
        B = self.lamda_B[adapter_name]
        B.requires_grad_(False)
        B.grad = None
        self.frozen_peft_weight_names[adapter_name] = FROZEN_WEIGHTS + ("lamda_B",)
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)
            for group in inner.param_groups:
                names = group.get("param_names")
                for i in range(len(group["params"]) - 1, -1, -1):
                    if group["params"][i] is B:
                        del group["params"][i]
                        if names is not None:
                            del names[i]
            inner.state.pop(B, None)

    def resize_frozen(self, adapter_name: str, count: int) -> None:
        """Mark exactly the first ``count`` columns frozen, taking their values from B (no optimizer)."""
        r = self.r[adapter_name]
        if not 0 <= count <= r:
            raise ValueError(f"freeze count {count} outside [0, {r}] for LaMDA rank {r}")
        with torch.no_grad():
            self.lamda_frozen[adapter_name].zero_()
            self.lamda_B_frozen[adapter_name].zero_()
        self.freeze_components(adapter_name, count)

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


def zero_frozen_optimizer_state(optimizer, B: torch.Tensor, count: int) -> None:
    """Zero the first ``count`` columns of every per-element state tensor ``optimizer`` keeps for B.

    Per-element state (Adam moments, SGD momentum, ...) has B's shape; other layouts (Adafactor's
    factored statistics, step counters) are left as they are. The frozen columns do not depend on
    it (the forward reads them from ``lamda_B_frozen``); zeroing keeps no stale momentum around.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's optimizer
    for value in inner.state.get(B, {}).values():
        if torch.is_tensor(value) and value.shape == B.shape:
            value[:, :count] = 0


class _ColumnFrozenLinear(torch.autograd.Function):
    """mixed @ where(frozen, B_frozen, B).T with no gradient for B's frozen columns.

    B takes part in every backward (a zero gradient where frozen, all zeros once fully frozen), as
    DDP expects of each Parameter it registered. Only ``mixed`` (r-sized) and the weights are saved,
    not a materialised d_out x r copy of B per call.
    """

    @staticmethod
    def forward(ctx, mixed, B, B_frozen, frozen):
        mask = frozen.bool()
        ctx.save_for_backward(mixed, B, B_frozen, frozen)
        return F.linear(mixed, torch.where(mask, B_frozen, B))

    @staticmethod
    def backward(ctx, grad_out):
        mixed, B, B_frozen, frozen = ctx.saved_tensors
        mask = frozen.bool()
        grad_mixed = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_mixed = grad_out @ torch.where(mask, B_frozen, B).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            flat_out = grad_out.reshape(-1, grad_out.shape[-1])
            flat_in = mixed.reshape(-1, mixed.shape[-1])
            grad_B = (flat_out.T @ flat_in.to(flat_out.dtype)).to(B.dtype).masked_fill_(mask, 0)
        return grad_mixed, grad_B, None, None


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
        return _ColumnFrozenLinear.apply(
            mixed, self.lamda_B[name], self.lamda_B_frozen[name], self.lamda_frozen[name]
        )

    def __repr__(self) -> str:
        return "lamda." + super().__repr__()
