"""LaMDA adapter: step-0 equality, trainability, merge, save/load, memory (spec acceptance 1, 2, 4, 5, 6)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_lamda_helpers import (
    LLAMA_TARGETS,
    minilm_batch,
    minilm_cls,
    tiny_bert_cls,  # noqa: F401
    tiny_llama,
    token_batch,
)

from lamda_repro.measure import count_parameters, saved_for_backward_bytes
from lamda_repro.methods.lamda import LamdaConfig, LamdaConfigError, LamdaFreezeController, LamdaLayer


def lamda_llama(init="svd", r=4, **kw):
    return get_peft_model(
        tiny_llama(), LamdaConfig(r=r, lora_alpha=8, target_modules=LLAMA_TARGETS, init=init, **kw)
    )


def layers(model):
    return [m for m in model.modules() if isinstance(m, LamdaLayer)]


@pytest.mark.parametrize("init", ["svd", "svd_residual"])
def test_outputs_equal_base_at_step_zero_tiny_llama(init):
    x = token_batch()
    with torch.no_grad():
        expected = tiny_llama()(x).logits
        got = lamda_llama(init)(x).logits
    tol = 0 if init == "svd" else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("init", ["svd", "svd_residual"])
def test_outputs_equal_base_at_step_zero_real_minilm(init):
    batch = minilm_batch()
    with torch.no_grad():
        expected = minilm_cls()(**batch).logits
        model = get_peft_model(
            minilm_cls(),
            LamdaConfig(
                r=8, lora_alpha=16, target_modules=["query", "value"], init=init, task_type="SEQ_CLS"
            ),
        )
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_svd_init_uses_top_singular_directions():
    base = tiny_llama()
    W = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(base, LamdaConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(layer.lamda_A["default"], Vh[:4])
    torch.testing.assert_close(layer.lamda_B["default"], U[:, :4])
    assert torch.count_nonzero(layer.lamda_S["default"]) == 0


def test_requires_grad_a_never_s_always_b_until_frozen():
    model = lamda_llama(total_steps=10)
    for layer in layers(model):
        assert not layer.lamda_A["default"].requires_grad
        assert layer.lamda_S["default"].requires_grad
        assert layer.lamda_B["default"].requires_grad
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lamda_" not in n)
    LamdaFreezeController(model, 10).freeze_for_step(None, 10)
    model.set_adapter("default")  # peft re-enables adapter weights here unless declared frozen
    for layer in layers(model):
        assert not layer.lamda_A["default"].requires_grad
        assert layer.lamda_S["default"].requires_grad
        # one process: a fully frozen B leaves training (data-parallel: tests/test_lamda_freeze.py)
        assert not layer.lamda_B["default"].requires_grad and layer.frozen_components("default") == 4
        assert layer.frozen_trainable_elements() == 0
        assert not layer.lamda_B_frozen["default"].requires_grad


def test_trainable_counts_match_formulas():
    model = lamda_llama(r=4)
    shapes = [(layer.in_features, layer.out_features) for layer in layers(model)]
    assert len(shapes) == 2 * 7
    assert count_parameters(model)["trainable"] == sum(16 + d_out * 4 for _, d_out in shapes)
    LamdaFreezeController(model, 10).freeze_for_step(None, 10)
    assert count_parameters(model)["trainable"] == 16 * len(shapes)


def _train_steps(model, steps, optimizer=None, controller=None, start=0, total=None):
    x = token_batch()
    optimizer = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    model.train()
    for step in range(start, start + steps):
        model(x, labels=x).loss.backward()
        if controller is not None:
            controller.before_optimizer_step(optimizer, step, total)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


def test_save_load_round_trip_restores_s_and_freeze_state(tmp_path):
    model = lamda_llama(total_steps=10, freeze_fraction=0.5)
    controller = LamdaFreezeController(model, 10)
    _train_steps(model, 3, controller=controller)  # partly frozen: 0 < k < r
    counts = {
        n: m.frozen_components("default") for n, m in model.named_modules() if isinstance(m, LamdaLayer)
    }
    assert set(counts.values()) - {0, 4}, counts
    x = token_batch(seed=5)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded_counts = {
        n: m.frozen_components("default") for n, m in loaded.named_modules() if isinstance(m, LamdaLayer)
    }
    assert loaded_counts == counts
    for (n1, a), (n2, b) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        if "lamda_S" in n1:
            assert n1 == n2 and torch.equal(a, b) and torch.count_nonzero(a) > 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, atol=0, rtol=0)


def test_save_load_round_trip_real_minilm_with_classifier(tmp_path):
    config = LamdaConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
        total_steps=4,
        init="svd_residual",
    )
    model = get_peft_model(minilm_cls(), config)
    batch = minilm_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = LamdaFreezeController(model, 4)
    for step in range(2):
        model(**batch, labels=torch.tensor([0, 1])).loss.backward()
        controller.before_optimizer_step(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(minilm_cls(seed=123), tmp_path)  # other head init: must be restored
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_weight():
    model = lamda_llama()
    for layer in layers(model):  # non-trivial adapter: S != 0
        with torch.no_grad():
            layer.lamda_S["default"].normal_(0, 0.5)
    layer0 = layers(model)[0]
    W0 = layer0.get_base_layer().weight.detach().clone()
    x = token_batch()
    with torch.no_grad():
        unmerged = model(x).logits
        model.merge_adapter()
        merged = model(x).logits
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.equal(layer0.get_base_layer().weight, W0)
        model.unmerge_adapter()
        torch.testing.assert_close(layer0.get_base_layer().weight, W0, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x).logits, unmerged, atol=1e-6, rtol=1e-6)


def test_merge_and_unload_includes_s():
    model = lamda_llama()
    for layer in layers(model):
        with torch.no_grad():
            layer.lamda_S["default"].normal_(0, 0.5)
    x = token_batch()
    with torch.no_grad():
        unmerged = model(x).logits
        plain = model.merge_and_unload()
        torch.testing.assert_close(plain(x).logits, unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tiny_llama()(x).logits, unmerged, atol=1e-3)


def test_lamda_saves_fewer_activation_bytes_than_lora_at_equal_rank():
    x = token_batch(seq=32)

    def saved(model):
        model.train()
        return saved_for_backward_bytes(lambda: model(x, labels=x).loss, model)

    lora = saved(get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS)))
    lamda = saved(lamda_llama(r=4))
    assert lamda < lora
    # LoRA saves each adapted layer's d_in-sized input; LaMDA only r-sized activations.
    assert lora - lamda >= 0.5 * 2 * 32 * 64 * 4 * 7 * 2


def test_adapter_path_saves_no_input_sized_tensor():
    layer = layers(lamda_llama(r=4))[0]
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    shapes = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    # activations end in r; the rest is weight-sized (B's freeze mask)
    assert shapes and all(s[-1] == 4 or s == (4,) for s in shapes), shapes


def test_optimizer_state_is_r_squared_per_module_after_full_freeze():
    model = lamda_llama(r=4, total_steps=6, freeze_fraction=0.5)
    controller = LamdaFreezeController(model, 6)
    optimizer = _train_steps(model, 6, controller=controller)
    controller.freeze_for_step(optimizer, 6)
    _train_steps(model, 1, optimizer=optimizer)
    n_modules = len(layers(model))
    per_param = [
        sum(v.numel() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        for s in optimizer.state.values()
    ]
    assert len(per_param) == n_modules and all(n == 2 * 16 for n in per_param)  # AdamW: exp_avg + exp_avg_sq


def test_dropout_and_reference_init_build():
    model = get_peft_model(
        tiny_bert_cls(),
        LamdaConfig(
            r=4, target_modules=["query"], init="reference_code", lamda_dropout=0.1, task_type="SEQ_CLS"
        ),
    )
    layer = layers(model)[0]
    assert torch.count_nonzero(layer.lamda_B["default"]) == 0
    assert torch.count_nonzero(layer.lamda_S["default"]) > 0
    assert isinstance(layer.lamda_dropout["default"], torch.nn.Dropout)
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"init": "pissa"}, "init"),
        ({"freeze_fraction": 1.5}, "freeze_fraction"),
        ({"lamda_dropout": 1.0}, "lamda_dropout"),
    ],
)
def test_invalid_config_raises_one_line_error(kwargs, field):
    with pytest.raises(LamdaConfigError, match=field):
        LamdaConfig(**kwargs)


def test_rank_larger_than_matrix_is_rejected():
    with pytest.raises(LamdaConfigError, match="rank"):
        get_peft_model(tiny_llama(), LamdaConfig(r=100, target_modules=["q_proj"]))


def test_every_config_field_documents_itself():
    from dataclasses import fields

    own = [f for f in fields(LamdaConfig) if f.name in LamdaConfig.__annotations__]
    assert len(own) >= 10 and all(f.metadata.get("help") for f in own)


def test_bf16_base_model_keeps_fp32_adapters_and_runs_without_autocast():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LamdaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = layers(model)[0]
    assert layer.lamda_S["default"].dtype == torch.float32 and layer.lamda_A["default"].dtype == torch.float32
    x = token_batch()
    model.train()
    model(x, labels=x).loss.backward()
    assert layer.lamda_S["default"].grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_dtype_follows_autocast_adapter_dtype_like_lora(dtype):
    def adapter_dtypes(config, autocast):
        model = get_peft_model(tiny_llama().to(dtype), config, autocast_adapter_dtype=autocast)
        return {
            n.split(".")[-3 if n.endswith(".weight") else -2]: p.dtype
            for n, p in model.named_parameters()
            if "lora_" in n or "lamda_" in n
        }

    lora = LoraConfig(r=4, target_modules=["q_proj"])
    lamda = LamdaConfig(r=4, target_modules=["q_proj"])
    # autocast_adapter_dtype=False: the adapter takes the base layer's dtype, as LoRA's does
    assert set(adapter_dtypes(lora, False).values()) == {dtype}
    assert adapter_dtypes(lamda, False) == {
        n: dtype for n in ("lamda_A", "lamda_S", "lamda_B", "lamda_B_frozen")
    }
    # True (peft's default): fp32 adapter weights, as LoRA's
    assert set(adapter_dtypes(lora, True).values()) == {torch.float32}
    assert set(adapter_dtypes(lamda, True).values()) == {torch.float32}
    model = get_peft_model(tiny_llama().to(dtype), lamda, autocast_adapter_dtype=False)
    assert layers(model)[0].lamda_frozen["default"].dtype == torch.uint8  # the mask is not cast
    x = token_batch()
    model.train()
    model(x, labels=x).loss.backward()
    assert layers(model)[0].lamda_S["default"].grad.dtype == dtype
