"""LaMDA and LaMDA++ (Azizi et al., EMNLP 2024 Findings) as a peft method and a suite method.

Importing this package registers ``LAMDA`` with peft, so ``peft.get_peft_model(model,
LamdaConfig(...))`` and ``PeftModel.from_pretrained`` work, and registers the suite method
types ``lamda``, ``lamdapp`` and ``lamda_reference``.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from lamda_repro.methods.lamda.allocation import allocate_ranks, rank_pattern_for_lamdapp, weight_spectra
from lamda_repro.methods.lamda.config import LamdaConfig, LamdaConfigError
from lamda_repro.methods.lamda.counts import (
    lamda_trainable_count,
    linear_shapes_from_config,
    lora_trainable_count,
)
from lamda_repro.methods.lamda.freeze import (
    LamdaFreezeCallback,
    LamdaFreezeController,
    frozen_count_at_step,
    reference_code_zeroed_columns,
)
from lamda_repro.methods.lamda.layer import LamdaLayer, Linear
from lamda_repro.methods.lamda.model import LamdaModel
from lamda_repro.methods.lamda.peft_type import LAMDA_PEFT_TYPE

if LAMDA_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="lamda", config_cls=LamdaConfig, model_cls=LamdaModel, prefix="lamda_")

from lamda_repro.methods.lamda import method as _method  # noqa: E402,F401  (registers suite types)

__all__ = [
    "LamdaConfig",
    "LamdaConfigError",
    "LamdaLayer",
    "LamdaModel",
    "Linear",
    "LamdaFreezeCallback",
    "LamdaFreezeController",
    "frozen_count_at_step",
    "reference_code_zeroed_columns",
    "allocate_ranks",
    "weight_spectra",
    "rank_pattern_for_lamdapp",
    "linear_shapes_from_config",
    "lamda_trainable_count",
    "lora_trainable_count",
]
