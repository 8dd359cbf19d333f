"""Conversion to Recursive Transformers: sharing maps, initializations, tying, gradients,
KV cache and saving."""

import copy

import pytest
import torch

from lamda_repro.recursive.convert import (
    RecursionSpec,
    RecursiveConfigError,
    convert_to_recursive,
    decoder_layers,
    load_recursive,
    save_recursive,
    truncate_layers,
    unique_state_dict,
)
from lamda_repro.recursive.tiny import tiny_causal_lm

ARCHS = ["llama", "gemma", "gpt_neox", "gpt2"]


def _model(arch="llama", num_layers=6, seed=0):
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
    with torch.no_grad():  # distinct norm weights per layer, so tying norms is observable
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _ids(seed=1, shape=(2, 9)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def _layer_tensor(model, position, name):
    return dict(decoder_layers(model)[position].named_parameters())[name]


def test_cycle_and_sequence_maps():
    cycle = RecursionSpec(num_layers=6, num_loops=2, sharing="cycle")
    sequence = RecursionSpec(num_layers=6, num_loops=2, sharing="sequence")
    assert [cycle.shared_index(p) for p in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [sequence.shared_index(p) for p in range(6)] == [0, 0, 1, 1, 2, 2]
    assert cycle.positions_of(1) == [1, 4] and sequence.positions_of(1) == [2, 3]


def test_init_source_layers():
    assert [RecursionSpec(6, 2, "cycle", "stepwise").source_layers(k) for k in range(3)] == [[0], [2], [5]]
    assert [RecursionSpec(8, 2, "cycle", "stepwise").source_layers(k) for k in range(4)] == [
        [0],
        [2],
        [5],
        [7],
    ]
    assert [RecursionSpec(6, 2, "cycle", "average").source_layers(k) for k in range(3)] == [
        [0, 3],
        [1, 4],
        [2, 5],
    ]
    assert [RecursionSpec(6, 2, "sequence", "average").source_layers(k) for k in range(3)] == [
        [0, 1],
        [2, 3],
        [4, 5],
    ]
    assert [RecursionSpec(6, 2, "cycle", "lower").source_layers(k) for k in range(3)] == [[0], [1], [2]]
    assert [RecursionSpec(6, 2, "cycle", "upper").source_layers(k) for k in range(3)] == [[3], [4], [5]]


@pytest.mark.parametrize("arch", ARCHS)
def test_single_loop_conversion_reproduces_logits_exactly(arch):
    model = _model(arch, num_layers=4)
    converted = convert_to_recursive(model, num_loops=1)
    with torch.no_grad():
        assert torch.equal(converted(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize(
    "init, picks",
    [
        ("stepwise", {0: [0], 1: [2], 2: [5]}),
        ("lower", {0: [0], 1: [1], 2: [2]}),
        ("upper", {0: [3], 1: [4], 2: [5]}),
        ("average", {0: [0, 3], 1: [1, 4], 2: [2, 5]}),
    ],
)
def test_initializations_take_the_specified_layers(init, picks):
    model = _model("llama", num_layers=6)
    converted = convert_to_recursive(model, num_loops=2, sharing="cycle", init=init)
    for shared, sources in picks.items():
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            expected = torch.stack([_layer_tensor(model, s, name) for s in sources]).mean(0)
            for position in (shared, shared + 3):
                assert torch.allclose(_layer_tensor(converted, position, name), expected, atol=1e-7)


def test_sequence_average_uses_adjacent_layers():
    model = _model("llama", num_layers=6)
    converted = convert_to_recursive(model, num_loops=3, sharing="sequence", init="average")
    name = "mlp.up_proj.weight"
    expected = (
        _layer_tensor(model, 3, name) + _layer_tensor(model, 4, name) + _layer_tensor(model, 5, name)
    ) / 3
    assert torch.allclose(_layer_tensor(converted, 4, name), expected, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_positions_share_storage_and_embeddings_are_untouched(arch):
    model = _model(arch, num_layers=4)
    converted = convert_to_recursive(model, num_loops=2, init="average")
    layers = decoder_layers(converted)
    for (n0, p0), (n2, p2) in zip(layers[0].named_parameters(), layers[2].named_parameters(), strict=True):
        assert n0 == n2 and p0 is p2
    assert decoder_layers(converted)[0].state_dict()[n0].data_ptr() == layers[2].state_dict()[n2].data_ptr()
    assert all(p0 is not p1 for p0, p1 in zip(layers[0].parameters(), layers[1].parameters(), strict=True))
    emb_before, emb_after = model.get_input_embeddings().weight, converted.get_input_embeddings().weight
    assert torch.equal(emb_before, emb_after) and emb_before is not emb_after
    non_embedding = sum(p.numel() for p in layers.parameters())
    assert non_embedding == sum(p.numel() for p in decoder_layers(model).parameters()) // 2


def test_original_model_is_left_unchanged():
    model = _model("llama")
    before = copy.deepcopy(model.state_dict())
    convert_to_recursive(model, num_loops=2, init="average", lora_rank=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_backward_gives_tied_weights_the_sum_of_position_gradients():
    model = _model("llama", num_layers=4)
    tied = convert_to_recursive(model, num_loops=2, init="average")
    untied = copy.deepcopy(tied)
    for position in range(4):  # give every position its own copy of the (equal) shared weights
        layer = decoder_layers(untied)[position]
        for name, param in list(layer.named_parameters()):
            path, _, leaf = name.rpartition(".")
            setattr(
                layer.get_submodule(path) if path else layer, leaf, torch.nn.Parameter(param.detach().clone())
            )
    ids = _ids()
    tied(input_ids=ids, labels=ids).loss.backward()
    untied(input_ids=ids, labels=ids).loss.backward()
    for name in ("self_attn.k_proj.weight", "mlp.gate_proj.weight", "post_attention_layernorm.weight"):
        for shared in range(2):
            expected = _layer_tensor(untied, shared, name).grad + _layer_tensor(untied, shared + 2, name).grad
            assert torch.allclose(_layer_tensor(tied, shared, name).grad, expected, atol=1e-6)
            assert not torch.allclose(_layer_tensor(untied, shared, name).grad, expected, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_kv_cache_equals_without(arch):
    model = convert_to_recursive(_model(arch, num_layers=4), num_loops=2, init="average", lora_rank=3)
    ids = _ids(shape=(2, 5))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without_cache = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)
    attention = [
        getattr(layer, "self_attn", None) or getattr(layer, "attention", None) or layer.attn
        for layer in decoder_layers(model)
    ]
    assert [a.layer_idx for a in attention] == [0, 1, 2, 3]  # one cache slot per position


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("lora_rank", [None, 4])
def test_save_and_load_keep_ties_and_store_shared_weights_once(tmp_path, arch, lora_rank):
    model = convert_to_recursive(
        _model(arch, num_layers=6), num_loops=3, sharing="sequence", init="average", lora_rank=lora_rank
    )
    save_recursive(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        stored = list(fh.keys())
    layer_keys = [k for k in stored if ".layers." in k]
    assert len(layer_keys) == len(set(layer_keys))
    assert not any(".layers.1." in k and "lora" not in k for k in stored)  # position 1 ties to position 0
    loaded = load_recursive(tmp_path)
    layers = decoder_layers(loaded)
    shared = dict(layers[0].named_parameters())
    for name, param in layers[1].named_parameters():
        if "lora" not in name:
            assert param is shared[name]
    with torch.no_grad():
        assert torch.allclose(loaded(_ids()).logits, model(_ids()).logits, atol=1e-6)
    assert set(unique_state_dict(loaded)) == set(stored)


def test_truncated_baseline_keeps_first_layers():
    model = _model("llama", num_layers=6)
    small = truncate_layers(model, 3)
    assert len(decoder_layers(small)) == 3 and small.config.num_hidden_layers == 3
    assert torch.equal(
        _layer_tensor(small, 2, "mlp.up_proj.weight"), _layer_tensor(model, 2, "mlp.up_proj.weight")
    )
    small(_ids())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_loops": 4}, "does not divide"),
        ({"num_loops": 0}, "positive integer"),
        ({"num_loops": 2, "sharing": "zigzag"}, "sharing"),
        ({"num_loops": 2, "init": "best"}, "init"),
        ({"num_loops": 2, "init": "average", "inplace": True}, "inplace"),
    ],
)
def test_bad_settings_raise_one_line_errors(kwargs, message):
    with pytest.raises(RecursiveConfigError, match=message):
        convert_to_recursive(_model("llama", num_layers=6), **kwargs)


def test_converting_twice_is_refused():
    converted = convert_to_recursive(_model("llama", num_layers=4), num_loops=2)
    with pytest.raises(RecursiveConfigError, match="already recursive"):
        convert_to_recursive(converted, num_loops=2)


def test_inplace_stepwise_matches_copy():
    model = _model("llama", num_layers=6)
    copied = convert_to_recursive(model, num_loops=2, init="stepwise")
    inplace = convert_to_recursive(copy.deepcopy(model), num_loops=2, init="stepwise", inplace=True)
    with torch.no_grad():
        assert torch.equal(copied(_ids()).logits, inplace(_ids()).logits)


def test_random_init_differs_from_every_original_layer():
    model = _model("llama", num_layers=4)
    converted = convert_to_recursive(model, num_loops=2, init="random")
    name = "mlp.up_proj.weight"
    shared = _layer_tensor(converted, 0, name)
    assert all(not torch.equal(shared, _layer_tensor(model, p, name)) for p in range(4))
    assert shared is _layer_tensor(converted, 2, name)
