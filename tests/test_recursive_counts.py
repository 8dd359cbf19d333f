"""Non-embedding parameter counts: the paper's Gemma 2B numbers, and agreement with built models."""

import pytest
import torch
from transformers import GemmaConfig

from lamda_repro.recursive.convert import convert_to_recursive
from lamda_repro.recursive.counts import model_non_embedding_parameters, non_embedding_counts
from lamda_repro.recursive.tiny import tiny_causal_lm, tiny_config

# Published Gemma 2B configuration (values written out: no Hub access in tests).
GEMMA_2B = dict(
    vocab_size=256000,
    hidden_size=2048,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    intermediate_size=16384,
)


@pytest.mark.parametrize(
    "key, rank, expected",
    [
        ("vanilla", None, 1.98e9),
        ("recursive", None, 0.99e9),
        ("relaxed", 64, 1.07e9),
        ("relaxed", 512, 1.60e9),
    ],
)
def test_gemma_2b_counts_match_the_paper(key, rank, expected):
    counts = non_embedding_counts(GemmaConfig(**GEMMA_2B), num_loops=2, lora_rank=rank)
    assert abs(counts[key] - expected) / expected < 0.005


def test_gemma_2b_relaxed_ranks_are_ordered_and_capped():
    config = GemmaConfig(**GEMMA_2B)
    relaxed = [non_embedding_counts(config, 2, r)["relaxed"] for r in (64, 128, 256, 512)]
    assert relaxed == sorted(relaxed)
    # k/v map 2048 -> 256: rank 512 is capped at 256 there.
    lora_512 = non_embedding_counts(config, 2, 512)["lora"]
    per_position = 2 * 512 * 4096 + 2 * 256 * (2048 + 256) + 3 * 512 * (2048 + 16384)
    assert lora_512 == 18 * per_position


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("rank", [None, 3, 40])
def test_config_counts_equal_the_converted_models(arch, rank):
    kwargs = dict(
        vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=48
    )
    torch.manual_seed(0)
    model = tiny_causal_lm(arch, **kwargs)
    counts = non_embedding_counts(tiny_config(arch, **kwargs), num_loops=3, lora_rank=rank)
    assert model_non_embedding_parameters(model) == counts["vanilla"]
    converted = convert_to_recursive(model, num_loops=3, lora_rank=rank)
    assert model_non_embedding_parameters(converted) == counts["relaxed" if rank else "recursive"]


def test_counts_reject_a_non_divisor():
    with pytest.raises(ValueError, match="does not divide"):
        non_embedding_counts(GemmaConfig(**GEMMA_2B), num_loops=4)
