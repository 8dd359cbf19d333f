"""Quality under early exit: next-token logits of every position as the engine would produce them
(exit rule applied token by token, skipped depths filled by the KV policy), held-out perplexity,
the exit-loop distribution, and lm-evaluation-harness accuracy with those logits.

``early_exit_logits`` decodes teacher-forced: token t of every row enters loop 0, runs loops until
its exit, and its skipped loops' KV entries are filled before token t + 1 starts, so later tokens
attend to exactly what a serving engine would have cached. Rule ``none`` is the final loop for
every token; ``oracle`` runs every loop, exits at the earliest loop agreeing with the final argmax
and then overwrites the skipped depths' KV with the policy's values.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lamda_repro.recursive.early_exit import EXIT_RULES, check_threshold, exit_distribution, oracle_exit
from lamda_repro.recursive.serving.engine import DepthBatchedModel, model_geometry

QUALITY_RULES = ("none", *EXIT_RULES)


@torch.no_grad()
def early_exit_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    rule: str = "confidence",
    threshold: float | None = None,
    kv_policy: str = "copy_state",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, T, vocab], exit loops [N, T]) of ``input_ids`` [N, T] under ``rule``."""
    if rule not in QUALITY_RULES:
        raise ValueError(f"rule must be one of {QUALITY_RULES}, got {rule!r}")
    if rule == "confidence":
        threshold = check_threshold(threshold, "threshold")
    N, T = input_ids.shape
    engine = DepthBatchedModel(model, N, T, kv_policy)
    B = engine.geometry.num_loops
    device = engine.device
    input_ids = input_ids.to(device)
    slots = torch.arange(N, device=device)
    logits_out = torch.empty(N, T, engine.geometry.vocab_size, dtype=engine.dtype, device=device)
    exits_out = torch.full((N, T), B - 1, dtype=torch.long, device=device)
    for t in range(T):
        tpos = torch.full((N,), t, dtype=torch.long, device=device)
        hidden = engine.embed(input_ids[:, t])
        if rule in ("none", "oracle"):
            per_loop, states = [], []
            for b in range(B):
                hidden = engine.block(hidden, torch.full((N,), b, device=device), slots, tpos)
                states.append(hidden)
                per_loop.append(engine.head(hidden) if rule == "oracle" or b == B - 1 else None)
            if rule == "none":
                logits_out[:, t] = per_loop[-1]
                continue
            stacked = torch.stack(per_loop)
            exit_loop = oracle_exit(stacked)
            logits_out[:, t] = stacked[exit_loop, slots]
            exits_out[:, t] = exit_loop
            early = exit_loop < B - 1
            if early.any():
                exit_states = torch.stack(states)[exit_loop, slots]
                engine.fill(exit_states[early], exit_loop[early], slots[early], tpos[early])
            continue
        alive = slots
        for b in range(B):
            hidden = engine.block(hidden, torch.full((len(alive),), b, device=device), alive, tpos[alive])
            logits = engine.head(hidden)
            ready = torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= threshold
            if b == B - 1:
                ready[:] = True
            leaving = alive[ready]
            logits_out[leaving, t] = logits[ready]
            exits_out[leaving, t] = b
            if b < B - 1 and ready.any():
                engine.fill(
                    hidden[ready], torch.full((len(leaving),), b, device=device), leaving, tpos[leaving]
                )
            alive, hidden = alive[~ready], hidden[~ready]
            if not len(alive):
                break
    return logits_out, exits_out


@torch.no_grad()
def exit_quality(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    rule: str,
    threshold: float | None = None,
    kv_policy: str = "copy_state",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Held-out perplexity and the exit-loop distribution (over predicted positions) under ``rule``."""
    nll, count, loops = 0.0, 0, []
    for i, input_ids in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        logits, exits = early_exit_logits(model, input_ids, rule, threshold, kv_policy)
        targets = input_ids[:, 1:].to(logits.device)
        nll += nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"
        ).item()
        count += targets.numel()
        loops.append(exits[:, :-1].flatten().cpu())
    if not count:
        raise ValueError("exit quality: the held-out corpus gave no full sequence")
    distribution = exit_distribution(torch.cat(loops), model_geometry(model).num_loops)
    return {
        "rule": rule,
        "threshold": threshold,
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "exit_distribution": distribution,
        "mean_loops": sum((b + 1) * p for b, p in enumerate(distribution)),
    }


@contextlib.contextmanager
def early_exit_forward(
    model: nn.Module, rule: str, threshold: float | None = None, kv_policy: str = "copy_state"
) -> Iterator[nn.Module]:
    """Within the block, ``model(input_ids)`` returns early-exit logits (a forward hook replaces
    them): lm-eval's HFLM, which reads ``model(ids).logits``, then scores the early-exit model."""

    def hook(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits, _ = early_exit_logits(module, input_ids, rule, threshold, kv_policy)
        output.logits = logits.to(output.logits.dtype)
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def lm_eval_scores(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    settings: list[tuple[str, float | None]],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    metrics: dict[str, str] | None = None,
    seed: int = 0,
    kv_policy: str = "copy_state",
) -> list[dict[str, float]]:
    """Accuracy per task for each (rule, threshold) of ``settings``, tasks loaded once."""
    from lamda_repro.recursive.evaluate import hf_lm, seeded_evaluate, task_manager, task_scores

    manager = task_manager(list(tasks), include_path)
    lm = hf_lm(model, tokenizer, batch_size)
    out = []
    for rule, threshold in settings:
        context = (
            early_exit_forward(model, rule, threshold, kv_policy)
            if rule != "none"
            else contextlib.nullcontext()
        )
        with context:
            result = seeded_evaluate(lm, tasks, manager, num_fewshot, limit, seed)
        out.append(task_scores(result, tasks, metrics))
    return out


__all__ = ["QUALITY_RULES", "early_exit_logits", "exit_quality", "early_exit_forward", "lm_eval_scores"]
