"""The depth-batched decoding engine: greedy equality with generate(), one block call for items at
different depths, the KV policy, early-exit logits, latency tables."""

import pytest
import torch

from lamda_repro.recursive import corpus
from lamda_repro.recursive.convert import convert_to_recursive
from lamda_repro.recursive.early_exit import exit_positions, loop_logits, loop_spec
from lamda_repro.recursive.serving.backend import serve
from lamda_repro.recursive.serving.engine import DepthBatchedModel, EngineError, rotate_half
from lamda_repro.recursive.serving.latency import measure_tables
from lamda_repro.recursive.serving.quality import early_exit_logits
from lamda_repro.recursive.serving.scheduler import SCHEDULERS, Workload
from lamda_repro.recursive.tiny import tiny_causal_lm
from lamda_repro.recursive.uptrain import UptrainConfig, train_causal_lm


@pytest.fixture(scope="module")
def pretrained():
    """A tiny Llama (4 layers) trained briefly on the smoke corpus, and its tokenizer."""
    tokenizer = corpus.build_word_tokenizer(corpus.smoke_vocabulary())
    torch.manual_seed(0)
    model = tiny_causal_lm(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    docs = corpus.smoke_documents(100, seed=0)
    batches = corpus.batches(iter(docs), tokenizer, 32, 16, repeat=True, text_factory=lambda: iter(docs))
    train_causal_lm(
        model, batches, UptrainConfig(steps=30, batch_size=16, seq_len=32, lr=1e-2, warmup_steps=3)
    )
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def variants(pretrained):
    model, _ = pretrained
    return {
        "vanilla": model,
        "recursive": convert_to_recursive(model, 2, init="stepwise").eval(),
        "relaxed": convert_to_recursive(model, 2, init="average", lora_rank=4).eval(),
    }


def _prompts(tokenizer, lengths):
    docs = corpus.smoke_documents(len(lengths), seed=5)
    return [tokenizer(doc)["input_ids"][:n] for doc, n in zip(docs, lengths, strict=True)]


@torch.no_grad()
def _generate(model, prompt, n):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", ["vanilla", "recursive", "relaxed"])
def test_greedy_outputs_equal_generate_for_every_scheduler(variants, pretrained, kind):
    model = variants[kind]
    wl = Workload((3, 7, 5, 9, 4), (6, 2, 9, 4, 7), (0.0,) * 5)
    prompts = _prompts(pretrained[1], wl.prompt_lens)
    expected = [_generate(model, p, g) for p, g in zip(prompts, wl.gen_lens, strict=True)]
    for scheduler in SCHEDULERS:
        result, generated, _ = serve(model, prompts, wl, scheduler, max_batch=2)
        assert generated == expected, scheduler
        assert result.max_call_size <= 2 and result.decode_tokens == wl.decode_tokens


def test_early_exit_decoding_leaves_early_and_stays_within_the_batch(variants, pretrained):
    wl = Workload((4,) * 6, (12,) * 6, (0.0,) * 6)
    prompts = _prompts(pretrained[1], wl.prompt_lens)
    for scheduler in SCHEDULERS:
        result, generated, _ = serve(
            variants["recursive"], prompts, wl, scheduler, max_batch=4, threshold=0.3
        )
        assert result.exits_per_loop[0] > 0 and sum(result.exits_per_loop) == wl.decode_tokens
        assert result.max_call_size <= 4 and all(len(g) == 12 for g in generated)


@torch.no_grad()
def test_one_block_call_over_mixed_depths_equals_each_item_alone(variants):
    model = variants["relaxed"]
    torch.manual_seed(1)
    batched = DepthBatchedModel(model, slots=4, max_len=8)
    batched.k_cache.normal_()
    batched.v_cache.normal_()
    alone = DepthBatchedModel(model, slots=4, max_len=8)
    alone.k_cache.copy_(batched.k_cache)
    alone.v_cache.copy_(batched.v_cache)
    hidden = torch.randn(4, 32)
    loops, slots, tpos = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 3, 1]), torch.tensor([5, 3, 7, 0])
    together = batched.block(hidden, loops, slots, tpos)
    for i in range(4):
        one = alone.block(hidden[i : i + 1], loops[i : i + 1], slots[i : i + 1], tpos[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.k_cache, alone.k_cache)


@torch.no_grad()
def test_copy_state_fills_skipped_depths_from_the_exit_state(variants):
    model = variants["recursive"]
    engine = DepthBatchedModel(model, slots=2, max_len=4, kv_policy="copy_state")
    h = torch.randn(1, 32)
    engine.fill(h, torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    K = engine.geometry.num_shared
    for k in range(K):
        attn = engine.layers[K + k].self_attn
        x = engine.layers[K + k].input_layernorm(h)[:, None]
        key = attn.k_proj(x).view(1, 1, 2, 8).transpose(1, 2)
        cos, sin = engine.rotary(x, position_ids=torch.tensor([[2]]))
        key = key * cos[:, None] + rotate_half(key) * sin[:, None]
        torch.testing.assert_close(engine.k_cache[K + k, 1, :, 2], key[0, :, 0])
        assert engine.k_cache[k, 1].abs().sum() == 0  # the computed loop is left alone


@torch.no_grad()
def test_copy_kv_copies_the_exit_loops_entries(variants):
    engine = DepthBatchedModel(variants["recursive"], slots=2, max_len=4, kv_policy="copy_kv")
    K = engine.geometry.num_shared
    engine.k_cache[:K].normal_()
    engine.v_cache[:K].normal_()
    engine.fill(torch.randn(1, 32), torch.tensor([0]), torch.tensor([1]), torch.tensor([3]))
    torch.testing.assert_close(engine.k_cache[K : 2 * K, 1, :, 3], engine.k_cache[:K, 1, :, 3])
    torch.testing.assert_close(engine.v_cache[K : 2 * K, 1, :, 3], engine.v_cache[:K, 1, :, 3])
    assert engine.k_cache[K:, 0].abs().sum() == 0


@torch.no_grad()
def test_early_exit_logits_follow_the_rule(variants, pretrained):
    model = variants["recursive"]
    ids = torch.tensor(_prompts(pretrained[1], [10, 10]))
    none, exits = early_exit_logits(model, ids, "none")
    torch.testing.assert_close(none, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert (exits == 1).all()
    per_loop = loop_logits(model, ids)
    _, oracle = early_exit_logits(model, ids, "oracle")
    first_agrees = per_loop[0].argmax(-1) == per_loop[1].argmax(-1)
    assert oracle[:, 0].tolist() == [
        0 if ok else 1 for ok in first_agrees[:, 0].tolist()
    ]  # token 0: no history
    low, low_exits = early_exit_logits(model, ids, "confidence", threshold=1e-6)
    assert (low_exits == 0).all()  # every token is confident enough after loop 1
    torch.testing.assert_close(low[:, 0], per_loop[0][:, 0], rtol=1e-4, atol=1e-4)


def test_loop_structure_of_a_recursive_model(variants):
    spec = loop_spec(variants["recursive"])
    assert exit_positions(spec) == [1, 3]
    with pytest.raises(ValueError, match="needs a recursive model"):
        loop_spec(variants["vanilla"])


def test_unsupported_models_are_refused_in_one_line():
    gpt2 = tiny_causal_lm("gpt2", num_layers=2)
    with pytest.raises(EngineError, match="supports model types") as info:
        DepthBatchedModel(gpt2, 1, 4)
    assert "\n" not in str(info.value)
    seq = convert_to_recursive(tiny_causal_lm("llama", num_layers=4), 2, sharing="sequence")
    with pytest.raises(EngineError, match="cycle sharing"):
        DepthBatchedModel(seq, 1, 4)


@torch.no_grad()
def test_gemma_prefill_matches_the_model():
    torch.manual_seed(0)
    model = convert_to_recursive(tiny_causal_lm("gemma", num_layers=4, hidden_size=32), 2, lora_rank=2).eval()
    ids = torch.randint(0, 128, (6,))
    engine = DepthBatchedModel(model, 1, 8)
    torch.testing.assert_close(engine.prefill(ids, 0), model(ids[None]).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_latency_tables_cover_the_sizes(variants):
    tables = measure_tables(variants["relaxed"], context=6, sizes=[1, 3], repeats=1, warmup=1)
    assert tables.block.sizes == [1, 3] and all(t > 0 for t in tables.block.seconds)
    assert tables.block_mixed is not None and tables.num_loops == 2
    assert tables.meta["layers_per_block_call"] == 2 and tables.meta["context"] == 6
    plain = measure_tables(variants["vanilla"], context=6, sizes=[2], repeats=1, warmup=0)
    assert plain.block_mixed is None and plain.fill.seconds == [0.0] and plain.num_loops == 1


def test_table_sampling_can_be_spread_over_a_benchmark(variants):
    from lamda_repro.recursive.serving.latency import TableSampler

    sampler = TableSampler(variants["recursive"], context=5, sizes=[1, 2])
    sampler.warmup(1)
    for _ in range(3):
        sampler.sample()  # any interleaving of single samples
    tables = sampler.tables()  # tops up the cells not sampled yet
    assert tables.meta["samples_per_cell"] >= 1 and set(tables.step_s) >= {"csb", "cdb+exit"}
    assert int(sampler.backend.token_pos.max()) == 5  # emitting never moves the KV length
