"""Early exit for Recursive Transformers: per-loop outputs, the training loss, exit rules and the
distribution of exit loops.

A recursive model with CYCLE sharing applies its block of K shared layers B times; the output of
loop b is the hidden state after position (b + 1) K - 1. Passed through the model's own final norm
and LM head it gives a next-token distribution at every loop, so a token may leave after any loop.

Training (after uptraining; the paper's "aggressive" setting with self-distillation):

    loss = sum_b w_b * LM_b + kd_weight * sum_{b < B-1} w_b * KD(final.detach() -> loop b)

with w_b = ``intermediate_weight`` (0.1) for intermediate loops and ``final_weight`` (1.0) for the
last one. Exit rules: ``oracle`` (earliest loop whose argmax equals the final loop's; needs every
loop, so it is an analysis tool) and ``confidence`` (the earliest loop whose maximum softmax
probability reaches the threshold; the last loop always exits).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lamda_repro.recursive import parallel
from lamda_repro.recursive.distill import KD_LOSSES, distillation_loss
from lamda_repro.recursive.spec import RecursionSpec, RecursiveConfigError, decoder_layers, recursion_spec
from lamda_repro.recursive.uptrain import (
    TrainingSettings,
    accumulating,
    adamw_with_schedule,
    next_batch,
    optimizer_step,
    wrap_data_parallel,
)

EXIT_RULES = ("confidence", "oracle")
KV_POLICIES = ("copy_state", "copy_kv")
_FINAL_NORM_PATHS = ("model.norm", "gpt_neox.final_layer_norm", "transformer.ln_f")


class EarlyExitConfigError(ValueError):
    """An invalid early-exit setting (weights, thresholds, rule)."""


@dataclass
class EarlyExitConfig(TrainingSettings):
    """Early-exit post-training and its evaluation sweep (``recursive.early_exit`` in the config)."""

    config_key = "early_exit"
    config_error = EarlyExitConfigError

    # TrainingSettings' fields with this loop's defaults and words (grad_accum, weight_decay and
    # max_grad_norm as there)
    steps: int = field(default=40, metadata={"help": "optimizer steps of early-exit post-training"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    seq_len: int = field(default=64, metadata={"help": "tokens per packed sequence"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW, warmup then cosine)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warmup steps"})
    intermediate_weight: float = field(
        default=0.1, metadata={"help": "loss weight of every intermediate loop (paper: aggressive 0.1)"}
    )
    final_weight: float = field(default=1.0, metadata={"help": "loss weight of the final loop"})
    kd_weight: float = field(
        default=1.0,
        metadata={"help": "weight of distillation from the detached final loop (times the loop's weight)"},
    )
    kd_loss: str = field(default="forward_kl", metadata={"help": f"one of {KD_LOSSES}"})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KD loss"})
    thresholds: list[float] = field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
        metadata={"help": "confidence thresholds of the evaluation sweep, each in (0, 1]"},
    )
    kv_policy: str = field(
        default="copy_state",
        metadata={
            "help": "KV entries an exited token never computed: copy_state (K/V of the skipped "
            "depths computed from the exit hidden state) or copy_kv (the K/V of the same shared "
            "layer in the exit loop copied)"
        },
    )
    eval_batches: int = field(
        default=1, metadata={"help": "held-out batches of the sweep (perplexity, exits)"}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per held-out batch"})
    eval_seq_len: int = field(default=64, metadata={"help": "tokens per held-out sequence"})
    eval_limit: int | None = field(
        default=None, metadata={"help": "lm-eval examples per task at each sweep point (None = all)"}
    )
    log_every: int = field(default=10, metadata={"help": "steps between progress-bar updates"})

    def __post_init__(self):
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            raise EarlyExitConfigError(f"early_exit.eval_limit must be null or >= 1, got {self.eval_limit!r}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "warmup_steps",
            "log_every",
            "eval_batches",
            "eval_batch_size",
            "eval_seq_len",
        ):
            value = getattr(self, name)
            low = 0 if name in ("steps", "warmup_steps") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise EarlyExitConfigError(f"early_exit.{name} must be an integer >= {low}, got {value!r}")
        for name in ("seq_len", "eval_seq_len"):
            if getattr(self, name) < 2:
                raise EarlyExitConfigError(f"early_exit.{name} must be >= 2, got {getattr(self, name)}")
        for name in ("intermediate_weight", "final_weight", "kd_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise EarlyExitConfigError(f"early_exit.{name} must be a number >= 0, got {value!r}")
        if self.final_weight == 0 and self.intermediate_weight == 0:
            raise EarlyExitConfigError("early_exit: intermediate_weight and final_weight are both 0")
        self.check_kd_loss()
        if self.kv_policy not in KV_POLICIES:
            raise EarlyExitConfigError(
                f"early_exit.kv_policy must be one of {KV_POLICIES}, got {self.kv_policy!r}"
            )
        check_thresholds(self.thresholds, "early_exit.thresholds")


def check_threshold(value: Any, where: str) -> float:
    """``value`` as a float in (0, 1], else a one-line EarlyExitConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise EarlyExitConfigError(f"{where}: a confidence threshold must lie in (0, 1], got {value!r}")
    return float(value)


def check_thresholds(values: Sequence[Any], where: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or not values:
        raise EarlyExitConfigError(f"{where}: needs at least one threshold")
    return [check_threshold(v, f"{where}[{i}]") for i, v in enumerate(values)]


# -- the loop structure ------------------------------------------------------------------------


def loop_spec(model: nn.Module) -> RecursionSpec:
    """The model's RecursionSpec if early exit applies to it (recursive, CYCLE sharing, B >= 2)."""
    spec = recursion_spec(model)
    if spec is None:
        raise RecursiveConfigError("early exit needs a recursive model (convert_to_recursive first)")
    if spec.sharing != "cycle":
        raise RecursiveConfigError(
            f"early exit needs cycle sharing (a loop = one pass of the shared block), got {spec.sharing!r}"
        )
    if spec.num_loops < 2:
        raise RecursiveConfigError("early exit needs at least 2 loops (num_loops >= 2)")
    return spec


def exit_positions(spec: RecursionSpec) -> list[int]:
    """The last position of every loop: (b + 1) K - 1 for b = 0 .. B - 1."""
    return [(b + 1) * spec.num_shared - 1 for b in range(spec.num_loops)]


def final_norm(model: nn.Module) -> nn.Module:
    """The model's final norm (applied before the LM head)."""
    for path in _FINAL_NORM_PATHS:
        with contextlib.suppress(AttributeError):
            return model.get_submodule(path)
    raise RecursiveConfigError(
        f"no final norm found in {type(model).__name__} (looked at {_FINAL_NORM_PATHS})"
    )


def loop_logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits of hidden states through the model's final norm and LM head."""
    return model.get_output_embeddings()(final_norm(model)(hidden))


def loop_logits(
    model: nn.Module, input_ids: torch.Tensor, replica: nn.Module | None = None
) -> list[torch.Tensor]:
    """Logits after every loop (list of B tensors [batch, seq, vocab]), from one forward pass
    (of ``replica``, the model's data-parallel wrapper, when given).

    Forward hooks keep the output of each loop's last position; the final entry equals the
    model's own logits.
    """
    spec = loop_spec(model)
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def keep(position):
        def hook(module, args, output):
            captured[position] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[p].register_forward_hook(keep(p)) for p in exit_positions(spec)]
    try:
        (replica or model)(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [loop_logits_from_hidden(model, captured[p]) for p in exit_positions(spec)]


# -- the loss (pure) ---------------------------------------------------------------------------


def loop_weights(num_loops: int, intermediate: float = 0.1, final: float = 1.0) -> list[float]:
    """Per-loop loss weights: ``intermediate`` for loops 0 .. B-2, ``final`` for the last."""
    return [float(intermediate)] * (num_loops - 1) + [float(final)]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of [batch, seq, vocab] logits."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def early_exit_loss(
    logits_per_loop: Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    weights: Sequence[float],
    kd_weight: float = 1.0,
    kd_loss: str = "forward_kl",
    kd_temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """sum_b w_b LM_b + kd_weight * sum_{b < B-1} w_b KD(final.detach() -> b); also the parts."""
    if len(weights) != len(logits_per_loop):
        raise EarlyExitConfigError(f"{len(weights)} loop weights for {len(logits_per_loop)} loops")
    lm = [next_token_loss(logits, input_ids) for logits in logits_per_loop]
    total = sum(w * loss for w, loss in zip(weights, lm, strict=True))
    parts = {f"lm_loop{b}": loss.item() for b, loss in enumerate(lm)}
    if kd_weight > 0 and len(logits_per_loop) > 1:
        target = logits_per_loop[-1][:, :-1].detach()
        for b, logits in enumerate(logits_per_loop[:-1]):
            kd = distillation_loss(logits[:, :-1], target, kd_loss, kd_temperature)
            total = total + kd_weight * weights[b] * kd
            parts[f"kd_loop{b}"] = kd.item()
    return total, parts


# -- exit rules and distributions (pure) -------------------------------------------------------


def confidence_exit(logits_per_loop: torch.Tensor, threshold: float) -> torch.Tensor:
    """Exit loop of every token: the first loop whose max softmax probability >= ``threshold``.

    ``logits_per_loop``: [B, ..., vocab]. The last loop always exits. Returns [...] (long).
    """
    confidence = torch.softmax(logits_per_loop.float(), dim=-1).amax(dim=-1)
    ready = confidence >= threshold
    ready[-1] = True
    return ready.to(torch.int8).argmax(dim=0)  # argmax returns the first maximum


def oracle_exit(logits_per_loop: torch.Tensor) -> torch.Tensor:
    """Exit loop of every token: the earliest loop whose argmax equals the final loop's."""
    tokens = logits_per_loop.argmax(dim=-1)
    same = tokens == tokens[-1]
    return same.to(torch.int8).argmax(dim=0)


def exit_loops(logits_per_loop: torch.Tensor, rule: str, threshold: float | None = None) -> torch.Tensor:
    if rule == "oracle":
        return oracle_exit(logits_per_loop)
    if rule == "confidence":
        return confidence_exit(logits_per_loop, check_threshold(threshold, "threshold"))
    raise EarlyExitConfigError(f"exit rule must be one of {EXIT_RULES}, got {rule!r}")


def exit_distribution(loops: torch.Tensor | Sequence[int], num_loops: int) -> list[float]:
    """Fraction of tokens exiting after each loop (sums to 1)."""
    loops = torch.as_tensor(loops).flatten()
    if loops.numel() == 0:
        raise EarlyExitConfigError("exit distribution of no tokens")
    counts = torch.bincount(loops.long(), minlength=num_loops)[:num_loops].double()
    return (counts / counts.sum()).tolist()


def mean_loops(distribution: Sequence[float]) -> float:
    """Expected number of loops a token runs: sum_b (b + 1) p_b."""
    return float(sum((b + 1) * p for b, p in enumerate(distribution)))


# -- training ----------------------------------------------------------------------------------


def train_early_exit(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    cfg: EarlyExitConfig,
    seed: int = 0,
    desc: str = "early exit",
) -> dict[str, Any]:
    """Post-train ``model`` in place with the early-exit loss; return training statistics."""
    spec = loop_spec(model)
    weights = loop_weights(spec.num_loops, cfg.intermediate_weight, cfg.final_weight)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    params, optimizer, scheduler = adamw_with_schedule(model, cfg)
    replica = wrap_data_parallel(model, device)
    world = parallel.rank_and_world()[1]
    model.train()
    losses: list[float] = []
    first_parts: dict[str, float] = {}
    last_parts: dict[str, float] = {}
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, mininterval=1.0, disable=cfg.steps == 0)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            input_ids = next_batch(batches, device, step, cfg)
            with accumulating(replica, last=micro == cfg.grad_accum - 1):
                loss, parts = early_exit_loss(
                    loop_logits(model, input_ids, replica),
                    input_ids,
                    weights,
                    cfg.kd_weight,
                    cfg.kd_loss,
                    cfg.kd_temperature,
                )
                (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            tokens += input_ids.numel() * world
        optimizer_step(params, optimizer, scheduler, cfg)
        step_loss = parallel.mean_over_ranks(step_loss)
        parts = {k: parallel.mean_over_ranks(v) for k, v in parts.items()}  # the last micro-batch's
        losses.append(step_loss)
        first_parts = first_parts or parts
        last_parts = parts
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    elapsed = time.perf_counter() - start
    return {
        "steps": cfg.steps,
        "tokens": tokens,
        "train_time_s": elapsed,
        "loop_weights": weights,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "first_parts": first_parts,
        "final_parts": last_parts,
    }


__all__ = [
    "EXIT_RULES",
    "KV_POLICIES",
    "EarlyExitConfig",
    "EarlyExitConfigError",
    "check_threshold",
    "check_thresholds",
    "loop_spec",
    "exit_positions",
    "final_norm",
    "loop_logits",
    "loop_logits_from_hidden",
    "loop_weights",
    "early_exit_loss",
    "confidence_exit",
    "oracle_exit",
    "exit_loops",
    "exit_distribution",
    "mean_loops",
    "train_early_exit",
]
