"""Tiny transformers decoders of the supported architectures, built from configs (random init):
the smoke model before pretraining, and the models of the unit tests."""

from __future__ import annotations

from torch import nn

ARCHITECTURES = ("llama", "gemma", "gpt_neox", "gpt2")


def tiny_config(
    architecture: str = "llama",
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 1024,
):
    """A small transformers config of ``architecture`` (llama, gemma, gpt_neox or gpt2)."""
    from transformers import GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    tokens = dict(
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    if architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_position_embeddings,
            **tokens,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        **tokens,
    )
    if architecture == "llama":
        return LlamaConfig(num_key_value_heads=num_kv_heads, **common)
    if architecture == "gemma":
        return GemmaConfig(num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads, **common)
    return GPTNeoXConfig(**common)


def tiny_causal_lm(architecture: str = "llama", **kwargs) -> nn.Module:
    """A randomly initialized tiny causal LM (eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config(architecture, **kwargs)).eval()
