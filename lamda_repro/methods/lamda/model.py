"""LamdaModel: decides which linear (nn.Linear, GPT-2 Conv1D) modules get a LaMDA layer (peft BaseTuner)."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from lamda_repro.methods.lamda.config import LamdaConfig
from lamda_repro.methods.lamda.layer import ADAPTABLE_LAYERS, LamdaLayer, Linear


class LamdaModel(BaseTuner):
    """Wraps the targeted linear layers of a model with LaMDA adapters.

    Use through peft: ``peft.get_peft_model(model, LamdaConfig(...))``.
    """

    prefix: str = "lamda_"
    tuner_layer_cls = LamdaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        lamda_config: LamdaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("LaMDA needs the module key of each target")
        r = lamda_config.rank_pattern.get(
            get_pattern_key(lamda_config.rank_pattern.keys(), current_key), lamda_config.r
        )
        alpha = lamda_config.alpha_pattern.get(
            get_pattern_key(lamda_config.alpha_pattern.keys(), current_key), lamda_config.lora_alpha
        )
        if isinstance(target, LamdaLayer):
            target.update_layer(adapter_name, r, alpha, lamda_config)
            return
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if not isinstance(base, ADAPTABLE_LAYERS):
            raise TypeError(
                f"LaMDA adapts torch.nn.Linear and transformers Conv1D layers; {current_key} is "
                f"{type(base).__name__}"
            )
        new_module = Linear(target, adapter_name, r, alpha, lamda_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Refuse a saved adapter that lacks any LaMDA weight (A, S, B, its frozen copy, the freeze mask)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for name, module in model.named_modules():
            if not isinstance(module, LamdaLayer) or adapter_name not in module.lamda_B_frozen:
                continue
            # The adapter was built without its SVD init (LamdaConfig.from_pretrained): every
            # weight must come from the file.
            for weight in (*LamdaLayer.adapter_layer_names, "lamda_frozen"):
                if f"{name}.{weight}.{adapter_name}" not in remapped:
                    raise ValueError(f"the saved LaMDA adapter {adapter_name!r} has no {weight} for {name}")
        if getattr(config, "loading_saved_weights", False):
            config.loading_saved_weights = False  # a later get_peft_model with this config initialises again
        return remapped
