"""LoRA-family baselines through peft, behind the suite's method interface."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from lamda_repro.methods.base import Method, MethodConfigError, MethodContext, register_method

# Options shared by the LoRA family (LoRA, LoRA-FA, PiSSA, DoRA, ... and LaMDA).
LORA_FAMILY_SCHEMA: dict[str, Any] = {
    "r": {"type": "integer", "minimum": 1, "description": "rank"},
    "alpha": {"type": "number", "exclusiveMinimum": 0, "description": "scaling numerator: s = alpha / r"},
    "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    "target_modules": {
        "oneOf": [
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            {"type": "string", "enum": ["all-linear"]},
        ],
        "description": "module name suffixes to adapt, or 'all-linear'",
    },
    "rank_pattern": {
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": 1},
        "description": "module-name pattern -> rank (overrides r)",
    },
    "alpha_pattern": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}},
    "modules_to_save": {"type": "array", "items": {"type": "string"}},
}

PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal-lm": "CAUSAL_LM"}


def lora_config_kwargs(params: dict[str, Any], ctx: MethodContext) -> dict[str, Any]:
    """peft LoraConfig keyword arguments from the suite's LoRA-family options."""
    kw: dict[str, Any] = {
        "r": params.get("r", 8),
        "lora_alpha": params.get("alpha", 2 * params.get("r", 8)),
        "lora_dropout": params.get("dropout", 0.0),
        "target_modules": params.get("target_modules", "all-linear"),
        "task_type": PEFT_TASK_TYPES[ctx.task_kind],
        "bias": "none",
    }
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if key in params:
            kw[key] = params[key]
    return kw


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear layer (nn.Linear or transformers' Conv1D); None for others."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return None


def check_ranks_fit(model: nn.Module, config) -> None:
    """Refuse, in one line and before any adapter is built, a rank (``r``, a ``rank_pattern``
    entry, AdaLoRA's ``init_r``) above min(d_in, d_out) of a module it would adapt: such a
    rank adds parameters without adding expressiveness."""
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from peft.utils.other import get_pattern_key

    config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    pattern = getattr(config, "rank_pattern", None) or {}
    # AdaLoRA starts every module at init_r (its config's r is unused); the others use r.
    init_r = getattr(config, "init_r", None)
    base_r, base_key = (init_r, "init_r") if init_r is not None else (config.r, "r")
    for name, module in model.named_modules():
        shape = _in_out(module)
        if shape is None or not check_target_module_exists(config, name):
            continue
        key = get_pattern_key(pattern.keys(), name) if pattern else None  # the name itself: no match
        r, what = (pattern[key], f"rank_pattern.{key}") if key in pattern else (base_r, base_key)
        if r > min(shape):
            raise MethodConfigError(
                f"{what}: rank {r} exceeds min(d_in, d_out) = {min(shape)} of module {name} "
                f"({shape[1]}x{shape[0]}); use r <= {min(shape)}"
            )


@register_method
class LoraMethod(Method):
    """LoRA (Hu et al., 2022): W x + (alpha / r) B A x with A, B trainable, W frozen."""

    type_name = "lora"
    params_schema = dict(LORA_FAMILY_SCHEMA)
    required_params = ("r",)

    def peft_config(self, ctx: MethodContext):
        from peft import LoraConfig

        return LoraConfig(**lora_config_kwargs(self.params, ctx))

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(ctx)
        check_ranks_fit(model, config)
        return get_peft_model(model, config)


# -- further LoRA-family baselines -------------------------------------------------------------


def _without(schema: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in keys}


@register_method
class LoraFAMethod(LoraMethod):
    """LoRA-FA (Zhang et al., 2023): LoRA with A frozen at its random init; only B trains.

    The optimizer is peft's ``create_lorafa_optimizer``: AdamW on B with B's gradient projected
    by (A A^T)^-1 / s^2, so the B-only update approximates full LoRA's low-rank update.
    """

    type_name = "lora_fa"

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        model = super().apply(model, ctx)
        # Frozen here (not only in the optimizer) so that parameter counts taken after
        # apply() already exclude A.
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
        return model

    def create_optimizer(self, model: nn.Module, lr: float, weight_decay: float, ctx: MethodContext):
        from peft.optimizers import create_lorafa_optimizer

        r = self.params["r"]
        return create_lorafa_optimizer(
            model, r=r, lora_alpha=self.params.get("alpha", 2 * r), lr=lr, weight_decay=weight_decay
        )

    def record_info(self, model: nn.Module) -> dict[str, Any]:
        return {"lora_A_frozen": True}


@register_method
class PissaMethod(LoraMethod):
    """PiSSA (Meng et al., 2024): LoRA initialised from the top-r singular triplets of W.

    A and B start as sqrt(S_r) V_r^T and U_r sqrt(S_r) (divided by the LoRA scaling), and the
    base weight is replaced in place by the residual W - s B A, so the model's output at
    initialisation is unchanged. Because the base weight changes, a trained adapter only
    reproduces the model on top of that residual; ``save_as_lora`` writes the equivalent
    rank-2r LoRA adapter for the original base weights (peft's conversion).
    """

    type_name = "pissa"
    params_schema = {
        **LORA_FAMILY_SCHEMA,
        "niter": {
            "type": "integer",
            "minimum": 1,
            "description": "fast randomized SVD with this many subspace iterations (pissa_niter_n)",
        },
    }

    def peft_config(self, ctx: MethodContext):
        from peft import LoraConfig

        kw = lora_config_kwargs(self.params, ctx)
        niter = self.params.get("niter")
        kw["init_lora_weights"] = f"pissa_niter_{niter}" if niter else "pissa"
        return LoraConfig(**kw)

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        model = super().apply(model, ctx)
        # The initial adapter is needed to convert the trained one back to plain LoRA.
        self._initial_adapter = {
            k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k
        }
        return model

    def save_as_lora(self, model: nn.Module, out_dir: str) -> None:
        """Save the trained adapter as a LoRA adapter that applies to the original base model."""
        import tempfile

        if not getattr(self, "_initial_adapter", None):
            raise RuntimeError("save_as_lora needs the model returned by this method's apply()")
        trained = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
        with tempfile.TemporaryDirectory() as initial_dir:
            with torch.no_grad():
                model.load_state_dict(self._initial_adapter, strict=False)
                config = model.peft_config["default"]
                original_init = config.init_lora_weights
                config.init_lora_weights = True  # the saved initial adapter is plain LoRA weights
                model.save_pretrained(initial_dir)
                config.init_lora_weights = original_init
                model.load_state_dict(trained, strict=False)
            model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial_dir)
        self._restore_non_lora_weights(model, out_dir)

    @staticmethod
    def _restore_non_lora_weights(model: nn.Module, out_dir: str) -> None:
        # peft 0.21's conversion keeps only lora_A / lora_B tensors and drops modules_to_save
        # (e.g. a trained classifier head), so put those back into the converted file.
        from pathlib import Path

        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        extra = {
            k: v.detach().contiguous()
            for k, v in get_peft_model_state_dict(model).items()
            if ".lora_" not in k
        }
        if not extra:
            return
        path = Path(out_dir) / "adapter_model.safetensors"
        tensors = load_file(str(path))
        tensors.update(extra)
        save_file(tensors, str(path), metadata={"format": "pt"})

    def record_info(self, model: nn.Module) -> dict[str, Any]:
        return {"base_weights_replaced_by_residual": True}


@register_method
class DoraMethod(LoraMethod):
    """DoRA (Liu et al., 2024): W' = m * (W + s B A) / ||W + s B A||_col; m, A and B train."""

    type_name = "dora"

    def peft_config(self, ctx: MethodContext):
        from peft import LoraConfig

        return LoraConfig(**lora_config_kwargs(self.params, ctx), use_dora=True)


@register_method
class AdaLoraMethod(Method):
    """AdaLoRA (Zhang et al., 2023): SVD-form adapters P diag(E) Q whose ranks are pruned by
    importance during training, from ``init_r`` per layer down to an average of ``r``.

    Schedule: ``tinit`` warm-up steps at full rank, budget reduction until ``total - tfinal``,
    then ``tfinal`` steps at the final allocation. ``update_and_allocate`` runs after every
    optimizer step and before the gradients are zeroed (it scores importance from the
    gradients), through a TrainerCallback's ``on_optimizer_step``.
    """

    type_name = "adalora"
    params_schema = {
        **_without(LORA_FAMILY_SCHEMA, "rank_pattern", "alpha_pattern"),
        "init_r": {"type": "integer", "minimum": 1, "description": "initial rank per layer (default 1.5 r)"},
        "tinit": {"type": "integer", "minimum": 0},
        "tfinal": {"type": "integer", "minimum": 0},
        "tinit_fraction": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "tinit as a fraction of the run's steps (if tinit is unset)",
        },
        "tfinal_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "delta_t": {"type": "integer", "minimum": 1, "description": "steps between budget allocations"},
        "beta1": {"type": "number", "minimum": 0, "maximum": 1},
        "beta2": {"type": "number", "minimum": 0, "maximum": 1},
        "orth_reg_weight": {"type": "number", "minimum": 0},
    }
    required_params = ("r",)

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps for a run of ``total_steps`` optimizer steps."""
        tinit = self.params.get("tinit", int(self.params.get("tinit_fraction", 0.1) * total_steps))
        tfinal = self.params.get("tfinal", int(self.params.get("tfinal_fraction", 0.2) * total_steps))
        if tinit >= total_steps - tfinal:
            raise MethodConfigError(
                f"adalora: tinit ({tinit}) must be < total steps ({total_steps}) - tfinal ({tfinal}); "
                "lower tinit/tfinal or train longer"
            )
        return tinit, tfinal

    def peft_config(self, ctx: MethodContext):
        import math

        from peft import AdaLoraConfig

        if ctx.total_steps <= 0:
            raise MethodConfigError(
                "adalora needs the run's total optimizer steps (MethodContext.total_steps)"
            )
        r = self.params["r"]
        tinit, tfinal = self.schedule(ctx.total_steps)
        kw = lora_config_kwargs({k: v for k, v in self.params.items() if k != "r"}, ctx)
        kw.pop("r")
        kw["lora_alpha"] = self.params.get("alpha", 2 * r)
        return AdaLoraConfig(
            **kw,
            target_r=r,
            init_r=self.params.get("init_r", math.ceil(1.5 * r)),
            tinit=tinit,
            tfinal=tfinal,
            deltaT=self.params.get("delta_t", 1),
            beta1=self.params.get("beta1", 0.85),
            beta2=self.params.get("beta2", 0.85),
            orth_reg_weight=self.params.get("orth_reg_weight", 0.5),
            total_step=ctx.total_steps,
        )

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(ctx)
        check_ranks_fit(model, config)
        return get_peft_model(model, config)

    def callbacks(self, model: nn.Module, ctx: MethodContext) -> list:
        return [AdaLoraAllocationCallback(model)]

    def record_info(self, model: nn.Module) -> dict[str, Any]:
        return {"rank_allocation": adalora_ranks(model)}


def adalora_ranks(model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """Current rank of every AdaLoRA layer: its allocated (unmasked) singular values.

    Before the first allocation every layer has ``init_r``; afterwards peft keeps the boolean
    keep-masks in the config's ``rank_pattern`` (keyed ``<module>.lora_E.<adapter>`` during
    training, ``<module>.lora_E`` once saved).
    """
    pattern = model.peft_config[adapter].rank_pattern or {}
    out = {}
    for name, param in model.named_parameters():
        if f".lora_E.{adapter}" not in name:
            continue
        module = name.split(".lora_E.")[0]
        short = module.removeprefix("base_model.model.")
        mask = pattern.get(f"{short}.lora_E.{adapter}", pattern.get(f"{short}.lora_E"))
        out[short] = int(sum(bool(x) for x in mask)) if mask is not None else int(param.shape[0])
    return out


class AdaLoraAllocationCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after each optimizer step, before zero_grad.

    The step index passed is the Trainer's ``global_step`` at that point, i.e. the 0-based
    index of the step just taken, as in peft's AdaLoRA training examples.
    """

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.peft_model.base_model.update_and_allocate(state.global_step)


@register_method
class VeraMethod(Method):
    """VeRA (Kopiczko et al., 2024): frozen random A, B shared by all layers (rank ``r``), and
    per-layer trainable scaling vectors d (size r) and b (size d_out): dW = diag(b) B diag(d) A.

    The shared projections are seeded by ``projection_prng_key`` and saved with the adapter.
    VeRA has no alpha and no per-layer ranks.
    """

    type_name = "vera"
    params_schema = {
        **_without(LORA_FAMILY_SCHEMA, "alpha", "rank_pattern", "alpha_pattern"),
        "d_initial": {"type": "number", "exclusiveMinimum": 0, "description": "initial value of d"},
        "projection_prng_key": {"type": "integer", "minimum": 0},
    }
    required_params = ("r",)

    def peft_config(self, ctx: MethodContext):
        from peft import VeraConfig

        kw: dict[str, Any] = {
            "r": self.params["r"],
            "target_modules": self.params.get("target_modules", "all-linear"),
            "vera_dropout": self.params.get("dropout", 0.0),
            "d_initial": self.params.get("d_initial", 0.1),
            "projection_prng_key": self.params.get("projection_prng_key", 0),
            "save_projection": True,
            "task_type": PEFT_TASK_TYPES[ctx.task_kind],
        }
        if "modules_to_save" in self.params:
            kw["modules_to_save"] = self.params["modules_to_save"]
        return VeraConfig(**kw)

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(ctx))
