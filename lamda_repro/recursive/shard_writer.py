"""The tokenize stage: read a corpus once per tokenizer and write token shards and their manifest.

Each split is read in document order and cut into shards of ``docs_per_shard`` documents; shard k
is tokenized by one of ``workers`` processes and written atomically with a sidecar JSON (its
documents, tokens, bytes and digest) that marks it complete, so a rerun after an interruption
keeps the finished shards and tokenizes only the rest. Reading stops once the split holds its
budget of tokens (``token_budgets``: what the grid's largest run reads), not the whole source.
The held-out split is written first; a training document equal to a held-out one is dropped (and
counted), so the perplexity split is never trained on. The manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lamda_repro.recursive.shards import FORMAT_VERSION, MANIFEST, ShardError, sha256_of, tokenizer_digest

SPLITS = ("validation", "train")  # held-out first: its documents are excluded from training


def corpus_digest(corpus: dict[str, Any]) -> str:
    """Identity of a corpus entry (what is read), independent of paths' spelling in the config."""
    keep = {k: v for k, v in corpus.items() if k not in ("task_test_size", "path")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def document_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


# -- workers --------------------------------------------------------------------------------------

_TOKENIZER = None


def _load_tokenizer(path: str) -> None:
    global _TOKENIZER
    from transformers import AutoTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _TOKENIZER = AutoTokenizer.from_pretrained(path)


def encode_documents(tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """The documents' tokens as one array, each document as the tokenizer encodes it (with its
    special tokens, e.g. BOS) followed by EOS when the tokenizer has one."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    flat: list[int] = []
    for row in ids:
        flat.extend(row)
        if eos is not None:
            flat.append(eos)
    return np.asarray(flat, dtype=dtype)


def _write_shard(job: tuple[str, list[str], str]) -> dict[str, Any]:
    """Tokenize one shard's documents and write ``<stem>.bin`` then ``<stem>.json`` (atomically)."""
    stem, texts, dtype = job
    bin_path, info_path = Path(stem + ".bin"), Path(stem + ".json")
    if info_path.is_file():  # finished by an earlier attempt
        info = json.loads(info_path.read_text())
        if (
            bin_path.is_file()
            and bin_path.stat().st_size == info["bytes"]
            and info["documents"] == len(texts)
        ):
            return info
    tokens = encode_documents(_TOKENIZER, texts, np.dtype(dtype))
    tmp = bin_path.with_suffix(".bin.tmp")
    tokens.tofile(tmp)
    tmp.replace(bin_path)
    info = {
        "file": f"{bin_path.parent.name}/{bin_path.name}",
        "documents": len(texts),
        "tokens": int(tokens.size),
        "bytes": int(tokens.nbytes),
        "sha256": sha256_of(bin_path),
    }
    tmp = info_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(info_path)
    return info


# -- the stage ------------------------------------------------------------------------------------


def _chunks(texts: Iterable[str], size: int, drop: set[str], kept: set[str] | None, counts: dict[str, int]):
    chunk: list[str] = []
    for text in texts:
        key = document_key(text)
        if key in drop:
            counts["dropped_held_out"] += 1
            continue
        if kept is not None:
            kept.add(key)
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_split(
    texts: Iterator[str],
    directory: Path,
    split: str,
    budget: int,
    dtype: str,
    workers: int,
    docs_per_shard: int,
    drop: set[str],
    pool,
    kept: set[str] | None = None,
) -> dict[str, Any]:
    """Shards of one split until ``budget`` tokens are written (or the source ends)."""
    folder = directory / split
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"dropped_held_out": 0}
    chunks = _chunks(texts, docs_per_shard, drop, kept, counts)
    shards: list[dict[str, Any]] = []
    tokens, exhausted = 0, False
    while tokens < budget and not exhausted:
        wave = []  # a bounded read-ahead: one shard per worker, then check the budget
        for chunk in chunks:
            wave.append((str(folder / f"shard-{len(shards) + len(wave):05d}"), chunk, dtype))
            if len(wave) == workers:
                break
        exhausted = len(wave) < workers
        results = pool.map(_write_shard, wave) if pool is not None else [_write_shard(j) for j in wave]
        for info in results:
            if tokens >= budget:
                break
            shards.append(info)
            tokens += info["tokens"]
    listed = {Path(s["file"]).stem for s in shards}
    for path in folder.iterdir():  # shards of an earlier, larger budget, and unfinished files
        if path.name.split(".")[0] not in listed:
            path.unlink()
    return {
        "budget_tokens": budget,
        "documents": sum(s["documents"] for s in shards),
        "tokens": tokens,
        "exhausted": exhausted and tokens < budget,
        "dropped_held_out": counts["dropped_held_out"],
        "shards": shards,
    }


def write_token_set(
    corpus: dict[str, Any],
    read_split,
    source: dict[str, Any],
    tokenizer_path: str | Path,
    directory: str | Path,
    budgets: dict[str, int],
    workers: int = 1,
    docs_per_shard: int = 4096,
) -> dict[str, Any]:
    """Tokenize ``corpus`` (texts from ``read_split(split)``) with the tokenizer saved at
    ``tokenizer_path`` into ``directory``; return the manifest (also written there, last)."""
    from transformers import AutoTokenizer

    if workers < 1 or docs_per_shard < 1:
        raise ShardError(f"workers and docs_per_shard must be >= 1, got {workers} and {docs_per_shard}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # rewritten last: no manifest = not complete
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    dtype = "<u2" if len(tokenizer) <= 2**16 else "<u4"
    start = time.perf_counter()
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(workers, _load_tokenizer, (str(tokenizer_path),))
    else:
        _load_tokenizer(str(tokenizer_path))
    try:
        held_out: set[str] = set()
        splits = {}
        for split in SPLITS:
            kept = held_out if split == "validation" else None
            drop = held_out if split == "train" else set()
            splits[split] = write_split(
                read_split(split),
                directory,
                split,
                budgets[split],
                dtype,
                workers,
                docs_per_shard,
                drop,
                pool,
                kept,
            )
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = time.perf_counter() - start
    manifest = {
        "format": FORMAT_VERSION,
        "corpus": corpus,
        "corpus_digest": corpus_digest(corpus),
        "source": source,
        "tokenizer": {
            "path": str(tokenizer_path),
            "digest": tokenizer_digest(tokenizer),
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "eos_handling": (
            "each document encoded with the tokenizer's special tokens (add_special_tokens=True), then "
            + ("EOS appended" if tokenizer.eos_token_id is not None else "no EOS (the tokenizer has none)")
        ),
        "dtype": dtype,
        "docs_per_shard": docs_per_shard,
        "workers": workers,
        "splits": splits,
        "tokenize_time_s": elapsed,
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(directory / MANIFEST)
    return manifest
