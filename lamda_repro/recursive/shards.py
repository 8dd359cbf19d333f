"""Reading token shards: the manifest, its checks, memory-mapped shards and the batch loader.

A token set (``<workdir>/recursive/tokens/<key>/``) holds one folder per split (``train``,
``validation``) of flat token arrays (``shard-NNNNN.bin``, little-endian uint16 or uint32: the
documents' tokens, each document followed by EOS) and ``manifest.json``, written last by the
tokenize stage (``shard_writer.py``). A split is one stream of tokens, the shards laid end to
end; sequence i of length L is tokens [i*L, (i+1)*L) of that stream, so any sequence length reads
the same shards. Opening a split checks every shard against the manifest (present, exact size);
``verify_digests`` re-hashes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamda_repro.recursive.sampler import SequenceOrder, rank_slice

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ShardError(ValueError):
    """Token shards are missing, truncated, or do not match what the run asks for."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """What makes two tokenizers produce the same tokens here: their vocabulary, special token
    ids, and the ids they give a fixed probe text (which covers normalisation and BOS handling)."""
    probe = "The quick brown fox, 12 345 + 6.7 = ? Ünïcödé 漢字 \n\t end."
    blob = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "probe": tokenizer(probe, add_special_tokens=True)["input_ids"],
    }
    return hashlib.sha256(json.dumps(blob, ensure_ascii=False).encode()).hexdigest()[:16]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"no token manifest at {path}: run the tokenize stage (lamda-repro recursive-tokenize)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: token manifest format {manifest.get('format')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def find_token_set(root: str | Path, digest: str, corpus_digest: str) -> Path:
    """The token set under ``root`` written with the tokenizer of ``digest`` from the corpus of
    ``corpus_digest`` (runs that share a tokenizer share it)."""
    root = Path(root)
    seen = []
    for path in sorted(root.glob(f"*/{MANIFEST}")):
        manifest = json.loads(path.read_text())
        seen.append(path.parent.name)
        if manifest["tokenizer"]["digest"] == digest and manifest["corpus_digest"] == corpus_digest:
            return path.parent
    raise ShardError(
        f"no token shards for tokenizer {digest} and this corpus under {root} (found: {seen or 'none'}): "
        "run the tokenize stage (lamda-repro recursive-tokenize)"
    )


class TokenShards:
    """One split of a token set as a single token stream over memory-mapped shards."""

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if split not in manifest["splits"]:
            raise ShardError(f"{self.directory / MANIFEST}: no split {split!r}")
        self.manifest = manifest
        self.split = split
        self.entry = manifest["splits"][split]
        self.dtype = np.dtype(manifest["dtype"])
        self.arrays: list[np.memmap] = []
        for shard in self.entry["shards"]:
            path = self.directory / shard["file"]
            if not path.is_file():
                raise ShardError(f"token shard missing: {path} (listed in {self.directory / MANIFEST})")
            size = path.stat().st_size
            if size != shard["tokens"] * self.dtype.itemsize:
                raise ShardError(
                    f"token shard {path} has {size} bytes, the manifest says "
                    f"{shard['tokens'] * self.dtype.itemsize} (truncated or rewritten)"
                )
            if shard["tokens"]:
                self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.ends = np.cumsum([len(a) for a in self.arrays]).astype(np.int64)
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def verify_digests(self) -> None:
        """Re-hash every shard against the manifest (reads all of them)."""
        for shard in self.entry["shards"]:
            path = self.directory / shard["file"]
            if sha256_of(path) != shard["sha256"]:
                raise ShardError(f"token shard {path}: content differs from its manifest digest")

    def num_sequences(self, seq_len: int) -> int:
        return self.num_tokens // seq_len

    def tokens(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the stream from ``start`` (possibly across shards)."""
        parts = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while length > 0:
            begin = start - (int(self.ends[shard - 1]) if shard else 0)
            piece = self.arrays[shard][begin : begin + length]
            parts.append(piece)
            start += len(piece)
            length -= len(piece)
            shard += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def sequence(self, index: int, seq_len: int) -> np.ndarray:
        return self.tokens(index * seq_len, seq_len)


class SequenceLoader(Iterator[torch.Tensor]):
    """(batch_size / world_size, seq_len) token batches: this rank's rows of each global batch of
    ``batch_size`` sequences, in the seeded order of ``SequenceOrder``. ``position`` counts the
    sequences consumed by all ranks; ``seek`` / ``skip`` move it in constant time. Without
    ``repeat`` the loader stops after one pass (held-out data); with it, epoch e+1 follows e."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        repeat: bool = True,
        rank: int = 0,
        world_size: int = 1,
        position: int = 0,
    ):
        num = shards.num_sequences(seq_len)
        if num < 1:
            raise ShardError(
                f"{shards.directory} ({shards.split}) holds {shards.num_tokens} tokens: "
                f"not one sequence of {seq_len}"
            )
        self.shards = shards
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rows = rank_slice(batch_size, rank, world_size)
        self.repeat = repeat
        self.order = SequenceOrder(num, seed, shuffle)
        self.position = position

    def seek(self, position: int) -> None:
        self.position = position

    def skip(self, batches: int) -> None:
        """Move past ``batches`` global batches without reading them."""
        self.position += batches * self.batch_size

    def __next__(self) -> torch.Tensor:
        if not self.repeat and self.position + self.batch_size > self.order.num_sequences:
            raise StopIteration
        indices = self.order.indices(self.position, self.batch_size)[self.rows]
        self.position += self.batch_size
        rows = [self.shards.sequence(int(i), self.seq_len) for i in indices]
        return torch.from_numpy(np.stack(rows).astype(np.int64))
