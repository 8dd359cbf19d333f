"""The tokenize stage and the token-shard loader: budget, held-out split, shard checks, seeded
order, constant-time resume and disjoint rank slices."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lamda_repro.recursive import corpus
from lamda_repro.recursive.sampler import SamplerError, SequenceOrder, epoch_order, rank_slice
from lamda_repro.recursive.shard_writer import encode_documents, write_token_set
from lamda_repro.recursive.shards import SequenceLoader, ShardError, TokenShards

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    corpus.build_word_tokenizer(corpus.smoke_vocabulary()).save_pretrained(path)
    return path


def _write_corpus(root, train_docs, validation_docs):
    corpus.write_jsonl(root / "train.jsonl", ({"text": t} for t in train_docs))
    corpus.write_jsonl(root / "validation.jsonl", ({"text": t} for t in validation_docs))
    return {"kind": "files", "data_files": {s: str(root / f"{s}.jsonl") for s in ("train", "validation")}}


def _tokenize(cfg, tokenizer_dir, out, budgets, workers=1, docs_per_shard=200):
    return write_token_set(
        cfg,
        lambda split: corpus.iter_texts(cfg, split),
        corpus.source_description(cfg),
        tokenizer_dir,
        out,
        budgets,
        workers=workers,
        docs_per_shard=docs_per_shard,
    )


@pytest.fixture(scope="module")
def token_set(tmp_path_factory, tokenizer_dir):
    """About 2,000 training documents (~5,000 sequences of 16 tokens) in 10 shards, and 50
    held-out documents, 3 of which were also put among the training documents."""
    root = tmp_path_factory.mktemp("corpus")
    validation = corpus.smoke_documents(50, seed=7)
    train = corpus.smoke_documents(2000, seed=3)
    train[10:10] = validation[:3]
    cfg = _write_corpus(root, train, validation)
    manifest = _tokenize(cfg, tokenizer_dir, root / "tokens", {"train": 10**9, "validation": 10**9})
    return root / "tokens", manifest, validation


def test_manifest_says_what_was_read_and_written(token_set, tokenizer_dir):
    directory, manifest, _ = token_set
    train = manifest["splits"]["train"]
    assert train["documents"] == 2000 and train["dropped_held_out"] == 3 and train["exhausted"]
    assert len(train["shards"]) == 10
    assert train["tokens"] == sum(s["tokens"] for s in train["shards"])
    assert set(manifest["source"]["files"]) == {"train", "validation"}
    assert all(len(f["sha256"]) == 64 for f in manifest["source"]["files"].values())
    assert manifest["tokenizer"]["eos_token_id"] is not None and "EOS appended" in manifest["eos_handling"]
    assert (
        json.loads((directory / "manifest.json").read_text())["splits"]["train"]["tokens"] == train["tokens"]
    )
    shards = TokenShards(directory, "train")
    assert shards.num_sequences(SEQ_LEN) > 4000
    shards.verify_digests()


def test_held_out_documents_never_reach_the_training_shards(token_set, tokenizer_dir):
    from transformers import AutoTokenizer

    directory, _, validation = token_set
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = TokenShards(directory, "train").tokens(0, TokenShards(directory, "train").num_tokens)
    held_out = TokenShards(directory, "validation")
    assert held_out.num_tokens > 0
    for text in validation:
        doc = encode_documents(tokenizer, [text], stream.dtype)
        found = stream.tobytes().find(doc.tobytes())
        assert found == -1 or found % stream.dtype.itemsize != 0, (
            f"held-out document in training: {text[:40]}"
        )


def test_resume_at_step_k_reads_the_next_batch_without_rereading(token_set):
    directory, _, _ = token_set
    shards = TokenShards(directory, "train")
    batch = 8
    uninterrupted = SequenceLoader(shards, SEQ_LEN, batch, seed=5)
    k = 700  # more than one epoch of ~5,000 sequences
    for _ in range(k):
        next(uninterrupted)
    expected = next(uninterrupted)

    reads = []
    original = shards.sequence
    shards.sequence = lambda i, n: reads.append(i) or original(i, n)
    resumed = SequenceLoader(shards, SEQ_LEN, batch, seed=5)
    resumed.skip(k)
    assert torch.equal(next(resumed), expected)
    assert len(reads) == batch  # only the batch itself was read

    def resume_time(steps):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            loader = SequenceLoader(shards, SEQ_LEN, batch, seed=5)
            loader.skip(steps)
            next(loader)
            best = min(best, time.perf_counter() - start)
        return best

    near, far = resume_time(1), resume_time(10**7)  # step 10^7: ~16,000 epochs in
    assert far < 10 * near + 0.05, (near, far)


def test_order_is_seeded_and_each_epoch_a_permutation():
    a, b = epoch_order(1000, 3, 0), epoch_order(1000, 3, 0)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, epoch_order(1000, 3, 1)) and not np.array_equal(a, epoch_order(1000, 4, 0))
    order = SequenceOrder(10, seed=1)
    crossing = order.indices(8, 4)  # last two of epoch 0, first two of epoch 1
    assert crossing.tolist() == epoch_order(10, 1, 0)[8:].tolist() + epoch_order(10, 1, 1)[:2].tolist()
    assert SequenceOrder(10, 1, shuffle=False).indices(9, 3).tolist() == [9, 0, 1]


def test_two_ranks_read_disjoint_halves_whose_union_is_the_global_batch(token_set):
    directory, _, _ = token_set
    shards = TokenShards(directory, "train")
    one = SequenceLoader(shards, SEQ_LEN, 8, seed=2)
    ranks = [SequenceLoader(shards, SEQ_LEN, 8, seed=2, rank=r, world_size=2) for r in (0, 1)]
    order = SequenceOrder(shards.num_sequences(SEQ_LEN), 2)
    for step in range(3):
        halves = [next(r) for r in ranks]
        assert halves[0].shape == (4, SEQ_LEN)
        assert torch.equal(torch.cat(halves), next(one))
        indices = order.indices(step * 8, 8)
        assert not set(indices[rank_slice(8, 0, 2)].tolist()) & set(indices[rank_slice(8, 1, 2)].tolist())
    with pytest.raises(SamplerError, match="not divisible"):
        rank_slice(6, 0, 4)


def test_truncated_or_missing_shard_is_a_one_line_error(tmp_path, tokenizer_dir):
    cfg = _write_corpus(tmp_path, corpus.smoke_documents(300, 1), corpus.smoke_documents(20, 2))
    _tokenize(
        cfg, tokenizer_dir, tmp_path / "tokens", {"train": 10**9, "validation": 10**9}, docs_per_shard=100
    )
    shard = tmp_path / "tokens" / "train" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardError, match="shard-00001.bin has .* bytes.*truncated") as err:
        TokenShards(tmp_path / "tokens", "train")
    assert "\n" not in str(err.value)
    shard.unlink()
    with pytest.raises(ShardError, match="token shard missing: .*shard-00001.bin") as err:
        TokenShards(tmp_path / "tokens", "train")
    assert "\n" not in str(err.value)
    with pytest.raises(ShardError, match="no token manifest"):
        TokenShards(tmp_path / "nowhere", "train")


def test_tokenize_stops_at_the_budget_and_resumes_by_shard(tmp_path, tokenizer_dir):
    cfg = _write_corpus(tmp_path, corpus.smoke_documents(1000, 1), corpus.smoke_documents(20, 2))
    out = tmp_path / "tokens"
    full = _tokenize(cfg, tokenizer_dir, out, {"train": 10**9, "validation": 10**9}, docs_per_shard=100)
    per_shard = full["splits"]["train"]["shards"][0]["tokens"]
    small = _tokenize(
        cfg, tokenizer_dir, out, {"train": 2 * per_shard, "validation": 10**9}, docs_per_shard=100
    )
    assert 2 * per_shard <= small["splits"]["train"]["tokens"] < 4 * per_shard
    assert not small["splits"]["train"]["exhausted"]
    assert sorted(p.name for p in (out / "train").glob("*.bin")) == [
        Path(s["file"]).name for s in small["splits"]["train"]["shards"]
    ]
    # An interrupted run: one shard lost, no manifest. The rerun rewrites only that shard.
    (out / "train" / "shard-00001.bin").unlink()
    (out / "manifest.json").unlink()
    kept = (out / "train" / "shard-00000.bin").stat().st_mtime_ns
    again = _tokenize(
        cfg, tokenizer_dir, out, {"train": 2 * per_shard, "validation": 10**9}, docs_per_shard=100
    )
    assert (out / "train" / "shard-00000.bin").stat().st_mtime_ns == kept
    assert again["splits"] == small["splits"]
    # Two workers write the same shards as one.
    two = _tokenize(cfg, tokenizer_dir, tmp_path / "two", {"train": 10**9, "validation": 10**9}, 2, 100)
    assert two["splits"] == full["splits"]
