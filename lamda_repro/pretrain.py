"""Pretraining of the tiny smoke models on the general corpus (``models.<name>.pretrain``).

Two objectives, chosen by the architecture as in the models they stand in for:

- ``causal_lm`` (GPT-2, Llama, ...): next-token prediction on the corpus's documents,
  concatenated (each ended by EOS) and cut into rows of ``seq_len`` tokens;
- ``denoising`` (BART, ...): text infilling as in BART's pretraining: spans of the document
  (lengths drawn from Poisson(``mean_span``), ``mask_ratio`` of the tokens in all) are each
  replaced by one mask token, and the decoder reconstructs the original document.

The loop is a plain AdamW loop with linear warm-up and linear decay; every random draw (row
order, corruption) comes from generators seeded by the ``seed`` argument, so two runs with the
same arguments give the same weights bit for bit on the same machine and torch build.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "objective": "auto",  # causal_lm for decoders, denoising for encoder-decoders
    "steps": 200,
    "batch_size": 16,
    "seq_len": 64,
    "lr": 3.0e-3,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "mask_ratio": 0.3,
    "mean_span": 3.0,
}
OBJECTIVES = ("auto", "causal_lm", "denoising")


class PretrainError(ValueError):
    """A pretraining setting is invalid."""


def pretrain_settings(settings: dict[str, Any] | None, encoder_decoder: bool) -> dict[str, Any]:
    """Defaults < ``settings``, with ``objective: auto`` resolved; one-line error on bad values."""
    out = {**PRETRAIN_DEFAULTS, **(settings or {})}
    unknown = sorted(set(out) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise PretrainError(f"pretrain: unknown keys {unknown} (known: {sorted(PRETRAIN_DEFAULTS)})")
    if out["objective"] not in OBJECTIVES:
        raise PretrainError(f"pretrain.objective: must be one of {OBJECTIVES}, got {out['objective']!r}")
    if out["objective"] == "auto":
        out["objective"] = "denoising" if encoder_decoder else "causal_lm"
    for key in ("steps", "batch_size", "seq_len"):
        if not isinstance(out[key], int) or out[key] < (2 if key == "seq_len" else 1):
            raise PretrainError(f"pretrain.{key}: must be an integer >= 1 (seq_len >= 2), got {out[key]!r}")
    if not 0 < out["mask_ratio"] < 1:
        raise PretrainError(f"pretrain.mask_ratio: must be in (0, 1), got {out['mask_ratio']!r}")
    if not out["lr"] > 0:
        raise PretrainError(f"pretrain.lr: must be > 0, got {out['lr']!r}")
    return out


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson(mean) draw from ``rng`` (Knuth's method; small means only)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def infill(ids: list[int], mask_id: int, ratio: float, mean_span: float, rng: random.Random) -> list[int]:
    """BART's text infilling of one sequence: spans replaced by one ``mask_id`` each (the first
    and last token, BOS and EOS, are kept)."""
    body = ids[1:-1]
    masked = [False] * len(body)
    budget = round(ratio * len(body))
    while budget > 0 and body:
        length = min(max(1, _poisson(rng, mean_span)), budget)
        start = rng.randrange(len(body))
        for i in range(start, min(start + length, len(body))):
            if not masked[i]:
                masked[i] = True
                budget -= 1
    out = [ids[0]]
    for token, is_masked in zip(body, masked, strict=True):
        if not is_masked:
            out.append(token)
        elif out[-1] != mask_id:
            out.append(mask_id)
    return out + [ids[-1]]


def _causal_rows(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text)["input_ids"])
        buffer.append(tokenizer.eos_token_id)
    return [buffer[i : i + seq_len] for i in range(0, len(buffer) - seq_len + 1, seq_len)]


def _document_rows(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) > seq_len:
            ids = ids[: seq_len - 1] + [ids[-1]]  # keep the closing EOS
        rows.append(ids)
    return rows


def _pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids != pad_id


def pretrain(
    model, tokenizer, texts: list[str], settings: dict[str, Any], seed: int, log=print
) -> dict[str, Any]:
    """Pretrain ``model`` in place on ``texts`` (settings as returned by ``pretrain_settings``);
    returns the losses and token counts."""
    import torch

    p = settings
    rng = random.Random(seed)
    denoising = p["objective"] == "denoising"
    rows = (_document_rows if denoising else _causal_rows)(texts, tokenizer, p["seq_len"])
    if not rows:
        raise PretrainError(f"pretrain: the corpus gives no training row of {p['seq_len']} tokens")
    if denoising and tokenizer.mask_token_id is None:
        raise PretrainError("pretrain: the denoising objective needs a tokenizer with a mask token")
    model.train()
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p["lr"],
    )
    warmup, steps = p["warmup_steps"], p["steps"]

    def factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        return (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(steps):
        batch = []
        for _ in range(p["batch_size"]):
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            batch.append(rows[order.pop()])
        if denoising:
            mask_id = tokenizer.mask_token_id
            corrupted = [infill(r, mask_id, p["mask_ratio"], p["mean_span"], rng) for r in batch]
            input_ids, attention = _pad(corrupted, tokenizer.pad_token_id)
            labels, label_mask = _pad(batch, tokenizer.pad_token_id)
            labels[~label_mask] = -100
            out = model(input_ids=input_ids, attention_mask=attention, labels=labels, use_cache=False)
            tokens += int(label_mask.sum())
        else:
            input_ids = torch.tensor(batch, dtype=torch.long)
            out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
            tokens += input_ids.numel()
        out.loss.backward()
        if p["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"pretrain step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    model.eval()
    log(f"pretrained {steps} steps, {tokens} tokens in {time.perf_counter() - start:.1f} s")
    return {
        "objective": p["objective"],
        "steps": steps,
        "tokens": tokens,
        "rows": len(rows),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
    }
