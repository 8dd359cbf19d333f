"""Benchmark of the uptraining data path: the tokenize stage's tokens/s per core, the loader's
tokens/s and resident memory as the shard count grows, next to the rate one H100 consumes tokens
when uptraining each paper model (an estimate from FLOPs, with its assumptions stated)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lamda_repro.recursive.shards import FORMAT_VERSION, MANIFEST, SequenceLoader, TokenShards

# Estimate assumptions (not measurements): H100 SXM dense bf16 peak (NVIDIA's datasheet, without
# sparsity) and a model FLOPs utilisation typical of well-tuned data-parallel training of 1-3B
# decoders; training costs 6 FLOPs per parameter per token (forward + backward) plus attention
# 6 * layers * context * hidden, a KD teacher's forward 2 per parameter per token plus its
# attention 2 * layers * context * hidden. A recursive model runs as many layer applications as the
# full model, so its compute per token is the full model's.
H100_BF16_PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40
CONTEXT = 2048  # config/paper.yaml: uptrain seq_len
# Parameters (embeddings included: the LM head is a matmul per token), layers, hidden size, from
# the models' published configs.
PAPER_MODELS = {
    "gemma-2b": (2.506e9, 18, 2048),
    "tinyllama-1.1b": (1.100e9, 22, 2048),
    "pythia-1b": (1.012e9, 16, 2048),
}


def h100_tokens_per_s(params: float, layers: int, hidden: int, kd: bool, context: int = CONTEXT) -> float:
    """Tokens one H100 trains on per second (ESTIMATE): peak * MFU / FLOPs per token."""
    flops = 6 * params + 6 * layers * context * hidden
    if kd:
        flops += 2 * params + 2 * layers * context * hidden
    return H100_BF16_PEAK_FLOPS * ASSUMED_MFU / flops


def h100_estimates() -> dict[str, dict[str, float]]:
    return {
        name: {
            "no_kd": h100_tokens_per_s(*geometry, kd=False),
            "kd": h100_tokens_per_s(*geometry, kd=True),
        }
        for name, geometry in PAPER_MODELS.items()
    }


def tokenize_rate(tokenizer_path: str, texts: list[str], workers: int, docs_per_shard: int) -> dict[str, Any]:
    """Tokens/s of the tokenize stage over ``texts`` with ``workers`` processes (and per core)."""
    from lamda_repro.recursive.corpus import write_jsonl
    from lamda_repro.recursive.shard_writer import write_token_set

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jsonl(root / "train.jsonl", ({"text": t} for t in texts))
        write_jsonl(root / "validation.jsonl", ({"text": t} for t in texts[:10]))
        cfg = {"kind": "files", "data_files": {s: str(root / f"{s}.jsonl") for s in ("train", "validation")}}

        def read(split):
            from lamda_repro.recursive.corpus import iter_texts

            return iter_texts(cfg, split)

        start, cpu = time.perf_counter(), _cpu_seconds()
        manifest = write_token_set(
            cfg,
            read,
            {},
            tokenizer_path,
            root / "tokens",
            {"train": 10**12, "validation": 1},
            workers,
            docs_per_shard,
        )
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    tokens = manifest["splits"]["train"]["tokens"]
    return {
        "workers": workers,
        "documents": manifest["splits"]["train"]["documents"],
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_s_per_core": tokens / elapsed / workers,
        "cpu_seconds": cpu,
        "tokens_per_cpu_second": tokens / cpu,  # the per-core rate, also on a loaded machine
    }


def _resident_kib(kind: str = "RssAnon") -> int:
    """This process's resident memory of ``kind`` (RssAnon: its own allocations; RssFile: mapped
    file pages, which the kernel can drop and re-read) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenize workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def synthetic_token_set(directory: Path, num_tokens: int, num_shards: int, vocab: int = 32000) -> None:
    """Random uint16 tokens split into ``num_shards`` shards, with a manifest the loader reads."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, num_tokens, num_shards + 1).astype(np.int64)
    shards = []
    for k in range(num_shards):
        count = int(bounds[k + 1] - bounds[k])
        path = directory / "train" / f"shard-{k:05d}.bin"
        rng.integers(0, vocab, count, dtype=np.uint16).astype("<u2").tofile(path)
        shards.append({"file": f"train/{path.name}", "documents": 0, "tokens": count, "bytes": 2 * count})
    split = {"tokens": num_tokens, "shards": shards}
    manifest = {"format": FORMAT_VERSION, "dtype": "<u2", "splits": {"train": split}}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def loader_rate(
    num_tokens: int, shard_counts: list[int], seq_len: int, batch_size: int, batches: int
) -> list[dict[str, Any]]:
    """Tokens/s the loader delivers (shuffled sequences, tensors ready for the model) and this
    process's resident memory after opening the shards and after reading, per shard count."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in shard_counts:
            directory = Path(tmp) / f"s{count}"
            synthetic_token_set(directory, num_tokens, count)
            before, before_file = _resident_kib(), _resident_kib("RssFile")
            shards = TokenShards(directory, "train")
            loader = SequenceLoader(shards, seq_len, batch_size, seed=0)
            opened = _resident_kib()
            next(loader)  # the epoch's permutation
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            elapsed = time.perf_counter() - start
            rows.append(
                {
                    "shards": count,
                    "tokens": num_tokens,
                    "tokens_per_s": batches * batch_size * seq_len / elapsed,
                    "anon_rss_open_mib": (opened - before) / 1024,
                    "anon_rss_after_read_mib": (_resident_kib() - before) / 1024,
                    "file_rss_after_read_mib": (_resident_kib("RssFile") - before_file) / 1024,
                }
            )
            del loader, shards
    return rows
