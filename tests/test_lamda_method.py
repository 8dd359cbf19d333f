"""The suite's method types lamda / lamdapp / lamda_reference (methods/base.py interface)."""

from __future__ import annotations

import pytest
import torch
from test_lamda_helpers import LLAMA_TARGETS, tiny_bert_cls, tiny_llama, token_batch  # noqa: F401

from lamda_repro.measure import count_parameters
from lamda_repro.methods.base import MethodConfigError, MethodContext, build_method, get_method_class
from lamda_repro.methods.lamda import LamdaFreezeCallback, LamdaLayer


def test_types_are_registered():
    for name in ("lamda", "lamdapp", "lamda_reference"):
        assert get_method_class(name).type_name == name


def test_config_entry_validates_and_rejects_unknown_keys():
    entry = {
        "type": "lamda",
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": ["query", "value"],
        "init": "svd",
        "freeze_fraction": 0.3,
    }
    get_method_class("lamda").check_params(entry, "methods.lamda")
    with pytest.raises(ValueError, match="init|pissa"):
        get_method_class("lamda").check_params({**entry, "init": "pissa"}, "methods.lamda")
    with pytest.raises(ValueError, match="r_min|additional"):
        get_method_class("lamda").check_params({**entry, "r_min": 2}, "methods.lamda")
    get_method_class("lamdapp").check_params(
        {**entry, "type": "lamdapp", "r_min": 2, "r_max": 16}, "methods.lamdapp"
    )


def test_seq_cls_head_trains_and_record_info():
    method = build_method(
        {"type": "lamda", "r": 4, "alpha": 8, "target_modules": ["query", "value"], "freeze_fraction": 0.5}
    )
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=8)
    model = method.apply(tiny_bert_cls(), ctx)
    assert any(isinstance(cb, LamdaFreezeCallback) for cb in method.callbacks(model, ctx))
    head = [n for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert head, "classifier head must be trainable for seq-cls"
    info = method.record_info(model)["lamda"]
    layers = [m for m in model.modules() if isinstance(m, LamdaLayer)]
    assert info["adapted_modules"] == len(layers) == 4
    assert info["trainable_after_freeze"] == 16 * 4
    assert info["trainable_before_freeze"] == 4 * (16 + 64 * 4)
    assert info["frozen_components"] == sum(m.frozen_components("default") for m in layers) > 0  # step-0 ones


def test_updated_elements_exclude_frozen_components():
    method = build_method(
        {"type": "lamda", "r": 4, "target_modules": ["q_proj", "v_proj"], "freeze_fraction": 0.5}
    )
    model = method.apply(
        tiny_llama(), MethodContext(task_kind="causal-lm", model_type="llama", total_steps=8)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = token_batch()
    model(x, labels=x).loss.backward()
    n = method.updated_elements(model, optimizer)
    assert n == count_parameters(model)["trainable"]
    layers = [m for m in model.modules() if isinstance(m, LamdaLayer)]
    frozen = sum(m.frozen_components("default") * m.out_features for m in layers)
    assert frozen > 0 and n == sum(16 + m.out_features * 4 for m in layers) - frozen


def test_lamdapp_records_allocation_within_budget():
    method = build_method(
        {"type": "lamdapp", "r": 4, "target_modules": LLAMA_TARGETS, "r_min": 1, "r_max": 16}
    )
    model = method.apply(
        tiny_llama(), MethodContext(task_kind="causal-lm", model_type="llama", total_steps=4)
    )
    info = method.record_info(model)["lamda"]
    ranks = info["rank_allocation"]
    assert len(ranks) == 14 and sum(r * r for r in ranks.values()) <= 14 * 16
    assert info["allocation_rule"] == "energy_target"
    histogram = {str(r): list(ranks.values()).count(r) for r in sorted(set(ranks.values()))}
    assert info["rank_histogram"] == histogram
    assert info["allocation_uniform"] == (len(histogram) == 1)
    for name, module in model.named_modules():
        if isinstance(module, LamdaLayer):
            assert module.r["default"] == ranks[name.removeprefix("base_model.model.")]


def test_reference_variant_uses_reference_defaults():
    method = build_method({"type": "lamda_reference", "target_modules": ["q_proj"]})
    model = method.apply(
        tiny_llama(hidden=128), MethodContext(task_kind="causal-lm", model_type="llama", total_steps=10)
    )
    layer = next(m for m in model.modules() if isinstance(m, LamdaLayer))
    assert layer.r["default"] == 64 and layer.scaling["default"] == 16 / 64
    assert layer.lamda_dropout["default"].p == 0.1
    assert method.record_info(model)["lamda"]["freeze_rule"] == "reference_code"


def test_unknown_task_kind_is_rejected():
    with pytest.raises(MethodConfigError, match="task kind"):
        build_method({"type": "lamda", "r": 2}).apply(
            tiny_llama(), MethodContext(task_kind="qa", model_type="llama")
        )


def test_every_lamda_record_has_its_rank_histogram():
    method = build_method({"type": "lamda", "r": 4, "target_modules": LLAMA_TARGETS})
    model = method.apply(
        tiny_llama(), MethodContext(task_kind="causal-lm", model_type="llama", total_steps=4)
    )
    info = method.record_info(model)["lamda"]
    assert info["rank_histogram"] == {"4": 14} and info["allocation_uniform"] is True
    assert "allocation_rule" not in info
    old_rule = build_method(
        {"type": "lamdapp", "r": 4, "target_modules": LLAMA_TARGETS, "rule": "inverse_energy"}
    )
    model = old_rule.apply(
        tiny_llama(), MethodContext(task_kind="causal-lm", model_type="llama", total_steps=4)
    )
    assert old_rule.record_info(model)["lamda"]["allocation_rule"] == "inverse_energy"
