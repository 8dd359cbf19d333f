"""Trainable-parameter formulas from a config (spec acceptance 7) and their agreement with real models."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from test_lamda_helpers import LLAMA_TARGETS, minilm_cls, tiny_llama  # noqa: F401
from transformers import LlamaConfig

from lamda_repro.measure import count_parameters
from lamda_repro.methods.lamda import (
    LamdaConfig,
    LamdaFreezeController,
    lamda_trainable_count,
    linear_shapes_from_config,
    lora_trainable_count,
)

LLAMA2_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)


def test_llama2_7b_lora_r64_trains_159907840():
    shapes = linear_shapes_from_config(LLAMA2_7B, LLAMA_TARGETS)
    assert len(shapes) == 7 * 32
    assert lora_trainable_count(shapes, 64) == 159_907_840


def test_llama2_7b_lamda_with_b_frozen_trains_917504():
    shapes = linear_shapes_from_config(LLAMA2_7B, LLAMA_TARGETS)
    assert lamda_trainable_count(shapes, 64) == 917_504
    assert lamda_trainable_count(shapes, 64, frozen_components=0) == 917_504 + 32 * 64 * (
        4 * 4096 + 2 * 11008 + 4096
    )


def test_formulas_match_real_tiny_llama_with_gqa():
    model = tiny_llama()
    shapes = linear_shapes_from_config(model.config, LLAMA_TARGETS)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert count_parameters(lora)["trainable"] == lora_trainable_count(shapes, 4)
    lamda = get_peft_model(model, LamdaConfig(r=4, target_modules=LLAMA_TARGETS))
    assert count_parameters(lamda)["trainable"] == lamda_trainable_count(shapes, 4, frozen_components=0)
    LamdaFreezeController(lamda, 10).freeze_for_step(None, 10)
    assert count_parameters(lamda)["trainable"] == lamda_trainable_count(shapes, 4)


def test_formulas_match_real_minilm():
    model = minilm_cls()
    shapes = linear_shapes_from_config(model.config, ["query", "value"])
    assert len(shapes) == 12
    lamda = get_peft_model(model, LamdaConfig(r=8, target_modules=["query", "value"]))
    assert count_parameters(lamda)["trainable"] == lamda_trainable_count(shapes, 8, frozen_components=0)


def test_unknown_geometry_is_rejected():
    from transformers import GPTNeoXConfig

    with pytest.raises(ValueError, match="model_type"):
        linear_shapes_from_config(GPTNeoXConfig(), ["query_key_value"])
