"""LaMDA on GPT-2's Conv1D layers (weight stored d_in x d_out): SVD init, round trip, merge, counts."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_lamda_helpers import GPT2_TARGETS, tiny_gpt2, token_batch
from transformers.pytorch_utils import Conv1D

from lamda_repro.measure import count_parameters
from lamda_repro.methods.lamda import (
    LamdaConfig,
    LamdaFreezeController,
    LamdaLayer,
    lamda_trainable_count,
    linear_shapes_from_config,
    lora_trainable_count,
)


def lamda_gpt2(init="svd", r=4, **kw):
    return get_peft_model(
        tiny_gpt2(), LamdaConfig(r=r, lora_alpha=8, target_modules=GPT2_TARGETS, init=init, **kw)
    )


def layers(model):
    return [m for m in model.modules() if isinstance(m, LamdaLayer)]


def test_every_gpt2_conv1d_layer_is_adapted_with_its_own_shape():
    model = lamda_gpt2()
    adapted = layers(model)
    assert len(adapted) == 2 * 4
    for layer in adapted:
        base = layer.get_base_layer()
        assert isinstance(base, Conv1D) and layer.fan_in_fan_out
        # Conv1D weight is d_in x d_out; A is r x d_in and B d_out x r as for nn.Linear.
        assert tuple(base.weight.shape) == (layer.in_features, layer.out_features)
        assert tuple(layer.lamda_A["default"].shape) == (4, layer.in_features)
        assert tuple(layer.lamda_B["default"].shape) == (layer.out_features, 4)
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)


def test_svd_init_of_conv1d_uses_the_transposed_weight():
    base = tiny_gpt2()
    stored = base.transformer.h[0].attn.c_attn.weight.detach().clone()  # d_in x d_out
    model = get_peft_model(base, LamdaConfig(r=4, target_modules=["c_attn"]))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    U, sigma, Vh = torch.linalg.svd(stored.T, full_matrices=False)  # W = stored^T, d_out x d_in
    torch.testing.assert_close(layer.lamda_A["default"], Vh[:4])
    torch.testing.assert_close(layer.lamda_B["default"], U[:, :4])


@pytest.mark.parametrize("init", ["svd", "svd_residual"])
def test_outputs_equal_base_at_step_zero(init):
    x = token_batch()
    with torch.no_grad():
        expected = tiny_gpt2()(x).logits
        got = lamda_gpt2(init)(x).logits
    tol = 0 if init == "svd" else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_svd_residual_keeps_conv1d_layout():
    model = lamda_gpt2("svd_residual")
    layer = layers(model)[0]
    W = layer.get_base_layer().weight  # residual, still stored d_in x d_out
    assert tuple(W.shape) == (layer.in_features, layer.out_features)
    path = layer.full_B("default") @ layer.lamda_S["default"] @ layer.lamda_A["default"]
    original = tiny_gpt2().transformer.h[0].attn.c_attn.weight
    torch.testing.assert_close(W.T + layer.scaling["default"] * path, original.T, atol=1e-5, rtol=1e-5)


def _train(model, steps, total):
    x = token_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    controller = LamdaFreezeController(model, total)
    model.train()
    for step in range(steps):
        model(x, labels=x).loss.backward()
        controller.before_optimizer_step(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = lamda_gpt2(total_steps=10, freeze_fraction=0.5)
    _train(model, 3, 10)  # S trained, B partly frozen
    frozen = {
        n: m.frozen_components("default") for n, m in model.named_modules() if isinstance(m, LamdaLayer)
    }
    assert set(frozen.values()) - {0, 4}, frozen
    x = token_batch(seed=5)
    with torch.no_grad():
        expected = model(x).logits
    assert not torch.allclose(expected, tiny_gpt2()(x).logits, atol=1e-4)  # the adapter changed something
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert {
        n: m.frozen_components("default") for n, m in loaded.named_modules() if isinstance(m, LamdaLayer)
    } == frozen
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, atol=0, rtol=0)


def test_merge_equals_unmerged_forward_and_unmerge_restores_weight():
    model = lamda_gpt2()
    for layer in layers(model):
        with torch.no_grad():
            layer.lamda_S["default"].normal_(0, 0.5)
    layer0 = layers(model)[0]
    W0 = layer0.get_base_layer().weight.detach().clone()
    x = token_batch()
    with torch.no_grad():
        unmerged = model(x).logits
        assert not torch.allclose(unmerged, tiny_gpt2()(x).logits, atol=1e-3)
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(layer0.get_base_layer().weight, W0, atol=1e-6, rtol=0)
        plain = model.merge_and_unload()
        assert all(isinstance(plain.transformer.h[i].attn.c_attn, Conv1D) for i in range(2))
        torch.testing.assert_close(plain(x).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_trainable_counts_match_formulas_and_config_counts():
    model = lamda_gpt2(r=4)
    shapes = linear_shapes_from_config(model.base_model.model.config, GPT2_TARGETS)
    real = {
        n.removeprefix("base_model.model."): (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, LamdaLayer)
    }
    assert shapes == real
    assert shapes["transformer.h.1.mlp.c_fc"] == (32, 128)
    assert count_parameters(model)["trainable"] == lamda_trainable_count(shapes, 4, frozen_components=0)
    LamdaFreezeController(model, 10).freeze_for_step(None, 10)
    assert count_parameters(model)["trainable"] == lamda_trainable_count(shapes, 4) == 8 * 16
    assert lora_trainable_count(shapes, 4) == 4 * 2 * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)
    assert linear_shapes_from_config(model.base_model.model.config, "all-linear") == shapes
