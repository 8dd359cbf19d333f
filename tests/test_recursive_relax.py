"""Relaxed Recursive Transformers: depth-wise LoRA structure, SVD and zero init, rank ordering."""

import copy

import pytest
import torch

from lamda_repro.recursive.convert import RecursiveConfigError, convert_to_recursive, decoder_layers
from lamda_repro.recursive.relax import (
    DepthLoRALinear,
    LoraSpec,
    lora_rank_summary,
    relax_recursive,
    svd_factors,
)
from lamda_repro.recursive.tiny import tiny_causal_lm

ARCHS = ["llama", "gemma", "gpt_neox", "gpt2"]


def _model(arch="llama", num_layers=4, perturb_vectors=True, seed=0):
    torch.manual_seed(seed)
    model = tiny_causal_lm(
        arch,
        vocab_size=64,
        hidden_size=32,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
    )
    if perturb_vectors:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(0.1 * torch.randn_like(param))
    return model


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def _max_logit_error(model, reference):
    with torch.no_grad():
        return (model(IDS).logits - reference(IDS).logits).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_full_rank_svd_relaxation_reproduces_the_original(arch, init):
    model = _model(arch)
    relaxed = convert_to_recursive(model, num_loops=2, init=init, lora_rank=10_000, per_position_vectors=True)
    assert _max_logit_error(relaxed, model) < 1e-4
    assert _max_logit_error(convert_to_recursive(model, num_loops=2, init=init), model) > 1e-2


def test_full_rank_with_tied_norms_is_exact_when_norms_agree():
    model = _model("llama", perturb_vectors=False)  # all norm weights are ones
    relaxed = convert_to_recursive(model, num_loops=2, init="average", lora_rank=10_000)
    assert _max_logit_error(relaxed, model) < 1e-4


def test_rank_is_capped_per_matrix_and_loras_are_per_position():
    model = convert_to_recursive(_model("llama"), num_loops=2, lora_rank=20)
    ranks = lora_rank_summary(model)
    # k/v map 32 -> 16 (2 KV heads x 8): capped at 16; MLP maps 32 <-> 48: capped at 32 is not hit.
    assert ranks == {
        "self_attn.q_proj": 20,
        "self_attn.k_proj": 16,
        "self_attn.v_proj": 16,
        "self_attn.o_proj": 20,
        "mlp.gate_proj": 20,
        "mlp.up_proj": 20,
        "mlp.down_proj": 20,
    }
    layers = decoder_layers(model)
    q0, q2 = layers[0].self_attn.q_proj, layers[2].self_attn.q_proj
    assert isinstance(q0, DepthLoRALinear) and q0.base_layer.weight is q2.base_layer.weight
    assert q0.lora_A is not q2.lora_A and not torch.equal(q0.lora_B, q2.lora_B)


def test_svd_factors_are_u_sigma_and_v_transpose():
    residual = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    B, A = svd_factors(residual, 3)
    U, S, Vh = torch.linalg.svd(residual.double(), full_matrices=False)
    assert torch.allclose(B, U[:, :3] * S[:3]) and torch.allclose(A, Vh[:3])
    assert not torch.allclose(B @ A, residual.double(), atol=1e-6)
    full_B, full_A = svd_factors(residual, 7)
    assert torch.allclose(full_B @ full_A, residual.double(), atol=1e-10)


def test_zero_init_starts_at_the_recursive_model_and_still_learns():
    model = _model("llama")
    recursive = convert_to_recursive(model, num_loops=2, init="average")
    relaxed = convert_to_recursive(model, num_loops=2, init="average", lora_rank=4, lora_init="zero")
    with torch.no_grad():
        assert torch.equal(relaxed(IDS).logits, recursive(IDS).logits)
    relaxed(input_ids=IDS, labels=IDS).loss.backward()
    q = decoder_layers(relaxed)[1].self_attn.q_proj
    assert q.lora_B.grad.abs().sum() > 0 and torch.count_nonzero(q.lora_A) == q.lora_A.numel()


def test_error_shrinks_as_rank_grows():
    model = _model("llama")
    errors = [
        _max_logit_error(
            convert_to_recursive(model, num_loops=2, init="average", lora_rank=r, per_position_vectors=True),
            model,
        )
        for r in (1, 4, 8, 16, 48)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4 < errors[0]


def test_loras_and_shared_block_all_train():
    relaxed = convert_to_recursive(_model("llama"), num_loops=2, lora_rank=4)
    relaxed(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in relaxed.parameters() if p.requires_grad)


def test_relaxing_a_non_recursive_model_or_twice_is_refused():
    model = _model("llama")
    with pytest.raises(RecursiveConfigError, match="recursive model"):
        relax_recursive(copy.deepcopy(model), model, LoraSpec(rank=2))
    relaxed = convert_to_recursive(model, num_loops=2, lora_rank=2)
    with pytest.raises(RecursiveConfigError, match="already relaxed"):
        relax_recursive(relaxed, model, LoraSpec(rank=2))


@pytest.mark.parametrize(
    "kwargs, message", [({"rank": 0}, "positive"), ({"rank": 4, "init": "gauss"}, "init")]
)
def test_bad_lora_settings_raise(kwargs, message):
    with pytest.raises(RecursiveConfigError, match=message):
        LoraSpec(**kwargs)


def test_unknown_target_module_raises():
    with pytest.raises(RecursiveConfigError, match="not found"):
        convert_to_recursive(_model("llama"), num_loops=2, lora_rank=2, target_modules=["self_attn.qq"])
