"""Evaluation of (recursive) causal LMs: lm-evaluation-harness accuracy, held-out perplexity and
forward throughput, all on the in-memory model."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lamda_repro.tasks import metrics

# The metric read for each paper task (lm-eval metric names); others default to "acc". As in the
# paper (Appendix E): accuracy normalised by length for every task but LAMBADA and WinoGrande.
DEFAULT_TASK_METRICS = {
    "lambada_openai": "acc",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}


class EvalConfigError(ValueError):
    """An invalid evaluation setting (unknown task, bad few-shot count)."""


def task_manager(tasks: list[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows ``tasks``. When every task is in ``include_path`` (the
    smoke tasks), lm-eval's own task library is not indexed (that indexing costs seconds per
    call); otherwise it is. Unknown tasks: one-line EvalConfigError."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if len(local.match_tasks(list(tasks))) == len(set(tasks)):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise EvalConfigError(f"unknown lm-eval tasks: {unknown}")
    return manager


def hf_lm(model: nn.Module, tokenizer, batch_size: int):
    """lm-eval's HFLM around the in-memory ``model`` on its own device; the prefix token (the
    context of a continuation that starts a document) is BOS, or EOS without one."""
    from lm_eval.models.huggingface import HFLM

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(next(model.parameters()).device),
        prefix_token_id=prefix,
    )


def seeded_evaluate(
    lm, tasks: list[str], manager, num_fewshot: int | None, limit: int | float | None, seed: int
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` with every seed (sampling, numpy, torch, few-shot
    draws) set to ``seed``, no bootstrap and no per-sample logs."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )


def task_scores(
    out: dict[str, Any], tasks: list[str], metrics: dict[str, str] | None = None
) -> dict[str, float]:
    """The score of each task in a ``simple_evaluate`` result: the metric from ``metrics`` or
    DEFAULT_TASK_METRICS, else acc; a missing metric is a one-line EvalConfigError."""
    chosen = {**DEFAULT_TASK_METRICS, **(metrics or {})}
    scores = {}
    for task in tasks:
        result = out["results"][task]
        key = f"{chosen.get(task, 'acc')},none"
        if key not in result:
            raise EvalConfigError(f"task {task} reported no {key!r} (has {sorted(result)})")
        scores[task] = float(result[key])
    return scores


def lm_eval_accuracy(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    metrics: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy per task (metric from ``metrics`` or DEFAULT_TASK_METRICS, else acc) via lm-eval."""
    if not tasks:
        raise EvalConfigError("no evaluation tasks given")
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    manager = task_manager(tasks, include_path)
    lm = hf_lm(model, tokenizer, batch_size)
    out = seeded_evaluate(lm, tasks, manager, num_fewshot, limit, seed)
    return task_scores(out, tasks, metrics)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[torch.Tensor], max_batches: int | None = None) -> float:
    """exp(mean next-token NLL) over the tokens of ``batches`` (the suite's ``perplexity`` evaluate
    module; a non-finite NLL is an error rather than an infinite perplexity)."""
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i, input_ids in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        input_ids = input_ids.to(device)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += input_ids[:, 1:].numel()
    if total_tokens == 0:
        raise EvalConfigError("perplexity: the held-out corpus gave no full sequence")
    return metrics.perplexity(total_nll, total_tokens)


@torch.no_grad()
def forward_throughput(
    model: nn.Module,
    vocab_size: int,
    batch_size: int = 8,
    seq_len: int = 128,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Forward (prefill) tokens per second on random tokens, median of ``repeats`` timed calls."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return {
        "forward_tokens_per_s": batch_size * seq_len / median,
        "forward_batch": batch_size,
        "forward_seq_len": seq_len,
        "forward_median_s": median,
        "device": device.type,
    }
