"""A plain causal-LM training loop for pretraining the tiny smoke model and for uptraining
(Relaxed) Recursive Transformers, optionally distilling from the full-size model.

AdamW, linear warmup then cosine decay to ``min_lr_ratio`` of the peak, gradient clipping,
loss = (1 - kd_weight) * LM + kd_weight * KD. Deterministic on CPU for a fixed seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn
from tqdm.auto import tqdm

from lamda_repro.recursive import parallel
from lamda_repro.recursive.distill import KD_LOSSES, DistillConfigError, combined_loss, distillation_loss
from lamda_repro.resume import (
    Preempted,
    SigtermFlag,
    complete_checkpoints,
    identity_folder,
    is_transient,
    remove_checkpoint,
    rotate_checkpoints,
    set_aside,
    write_marker,
)

log = logging.getLogger("lamda_repro.recursive.uptrain")
PARALLEL_STRATEGIES = ("ddp", "fsdp")


@dataclass
class Checkpointing:
    """Where and when a training loop checkpoints (``UptrainConfig.checkpoint_every``), the spec
    digest a checkpoint must carry to be resumed, and the SIGTERM flag polled after each step.
    The checkpoints go to ``folder``: the digest's own folder below ``directory``."""

    directory: Path
    digest: str
    sigterm: SigtermFlag | None = None
    keep: int = 2

    @property
    def folder(self) -> Path:
        return identity_folder(self.directory, self.digest)


@dataclass
class TrainingSettings:
    """What every training loop here reads: batches, AdamW with linear warmup then cosine decay to
    ``min_lr_ratio`` of the peak, gradient clipping; the defaults are uptraining's. A subclass
    names its config section (``config_key``, in error messages) and its error class; both are
    plain class attributes (unannotated), not fields."""

    config_key = "uptrain"
    config_error = DistillConfigError

    steps: int = field(default=100, metadata={"help": "optimizer steps; tokens = steps * batch * seq_len"})
    batch_size: int = field(
        default=8, metadata={"help": "sequences per micro-batch, over all processes (each reads its share)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed sequence"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak (cosine)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})

    def check_kd_loss(self) -> None:
        """A subclass with a ``kd_loss`` field: it must name one of KD_LOSSES."""
        if self.kd_loss not in KD_LOSSES:
            raise self.config_error(
                f"{self.config_key}.kd_loss must be one of {KD_LOSSES}, got {self.kd_loss!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise cls.config_error(f"unknown {cls.config_key} keys: {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UptrainConfig(TrainingSettings):
    """Uptraining hyperparameters. The defaults are this suite's (small, for the smoke scale); the
    paper's values (Appendix E: AdamW, lr 2e-4, cosine, warmup 200 / 800 steps, context 2048,
    about 2M tokens per step) are set in config/paper.yaml."""

    kd_loss: str = field(default="forward_kl", metadata={"help": f"one of {KD_LOSSES}"})
    kd_weight: float = field(default=0.0, metadata={"help": "w in (1-w)*LM + w*KD; 0 = no teacher"})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KD loss"})
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (autocast, CUDA only)"})
    log_every: int = field(default=10, metadata={"help": "steps between progress-bar updates"})
    checkpoint_every: int = field(
        default=0, metadata={"help": "steps between resumable checkpoints (0 = only on SIGTERM)"}
    )
    parallel: str = field(
        default="ddp",
        metadata={
            "help": "with several processes: ddp (a full replica each) or fsdp (the student's "
            "parameters, gradients and optimizer state sharded over the processes)"
        },
    )

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name in ("steps", "checkpoint_every") else 1):
                raise DistillConfigError(f"uptrain.{name} must be a positive integer, got {value!r}")
        self.check_kd_loss()
        if not 0.0 <= self.kd_weight <= 1.0:
            raise DistillConfigError(f"uptrain.kd_weight must lie in [0, 1], got {self.kd_weight}")
        if self.parallel not in PARALLEL_STRATEGIES:
            raise DistillConfigError(
                f"uptrain.parallel must be one of {PARALLEL_STRATEGIES}, got {self.parallel!r}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise DistillConfigError(f"uptrain.precision must be fp32 or bf16, got {self.precision!r}")


def lr_factor(step: int, cfg: TrainingSettings) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(
    model: nn.Module, cfg: TrainingSettings
) -> tuple[list[nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The trainable parameters of ``model``, AdamW over them (weight decay on matrices, none on
    biases and norms) and its lr schedule (``lr_factor``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return params, optimizer, scheduler


def next_batch(batches: Iterator[torch.Tensor], device, step: int, cfg: TrainingSettings) -> torch.Tensor:
    """The next batch on ``device``; a corpus that runs out is the config's one-line error."""
    try:
        return next(batches).to(device)
    except StopIteration:
        raise cfg.config_error(f"corpus ran out after {step} steps (need {cfg.steps})") from None


def optimizer_step(params, optimizer, scheduler, cfg: TrainingSettings) -> None:
    """Clip the gradients (unless ``max_grad_norm`` is 0), then step the optimizer and the lr."""
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def train_causal_lm(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    cfg: UptrainConfig,
    teacher: nn.Module | None = None,
    seed: int = 0,
    desc: str = "uptrain",
    checkpointing: Checkpointing | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for ``cfg.steps`` steps on ``batches``; return training statistics.

    With ``checkpointing``, the loop resumes from the last complete checkpoint of its folder
    (trainable weights, optimizer, scheduler, RNG states, losses; a token-shard loader moves to
    its position in constant time, a plain iterator reads and skips the batches already consumed),
    writes one every ``cfg.checkpoint_every`` steps, and on SIGTERM writes
    one and raises ``Preempted``."""
    if cfg.kd_weight > 0 and teacher is None:
        raise DistillConfigError("kd_weight > 0 needs a teacher model")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    replica = wrap_data_parallel(model, device, cfg.parallel)  # the model itself in one process
    sharded = replica is not model and cfg.parallel == "fsdp"
    params, optimizer, scheduler = adamw_with_schedule(replica, cfg)
    # bf16 autocast runs on CUDA only; elsewhere the run trains in fp32 and its stats say so.
    precision = "bf16" if cfg.precision == "bf16" and device.type == "cuda" else "fp32"
    bf16 = precision == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if teacher is not None:
        teacher.eval()
    model.train()
    losses: list[float] = []
    tokens = 0
    first_step, resumes, time_before = 0, 0, 0.0
    world = parallel.rank_and_world()[1]
    if checkpointing is not None:
        found = _resume(checkpointing, replica, optimizer, scheduler, device, sharded)
        if found is not None:
            state = found[1]
            first_step, losses, tokens = state["step"], state["losses"], state["tokens"]
            resumes, time_before = state["resumes"] + 1, state["train_time_s"]
            skip_consumed(batches, first_step * cfg.grad_accum)
            log.info("resuming %s from %s (step %d, resume %d)", desc, found[0], first_step, resumes)
    start = time.perf_counter()
    bar = tqdm(range(first_step, cfg.steps), desc=desc, mininterval=1.0, disable=cfg.steps == 0)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            input_ids = next_batch(batches, device, step, cfg)
            with accumulating(replica, last=micro == cfg.grad_accum - 1):
                with autocast:
                    logits = replica(input_ids=input_ids).logits
                    lm = causal_lm_loss(logits, input_ids)
                    kd = None
                    if cfg.kd_weight > 0:
                        with torch.no_grad():
                            teacher_logits = teacher(input_ids=input_ids).logits
                        kd = distillation_loss(logits, teacher_logits, cfg.kd_loss, cfg.kd_temperature)
                    loss = combined_loss(lm, kd, cfg.kd_weight) / cfg.grad_accum
                loss.backward()
            step_loss += loss.item()
            tokens += input_ids.numel() * world
        optimizer_step(params, optimizer, scheduler, cfg)
        step_loss = parallel.mean_over_ranks(step_loss)
        losses.append(step_loss)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        if checkpointing is not None:
            term = parallel.any_rank(checkpointing.sigterm is not None and checkpointing.sigterm.received)
            due = cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
            if term or due:
                state = {"step": step + 1, "losses": losses, "tokens": tokens, "resumes": resumes}
                state["train_time_s"] = time_before + time.perf_counter() - start
                state["position"] = (step + 1) * cfg.grad_accum * cfg.batch_size  # sequences read
                weights, optim = training_state(replica, optimizer, sharded)  # all ranks: gathers
                if parallel.is_main_process():
                    _save_checkpoint(checkpointing, state, weights, optim, scheduler)
                parallel.barrier()  # no rank goes on (or stops) before the checkpoint is complete
            if term:
                raise Preempted(
                    f"SIGTERM during {desc}: checkpoint at step {step + 1} written",
                    progressed=step + 1 > first_step,
                )
    if sharded:  # the trained weights back into the unsharded model, on rank 0 (which evaluates)
        full = gather_full_weights(replica)
        if parallel.is_main_process():
            model.load_state_dict(full)
            model.to(device)
    model.eval()
    elapsed = time_before + time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    return {
        "steps": cfg.steps,
        "precision": precision,
        "resumed": resumes,
        "resumed_from_step": first_step if resumes else None,
        "tokens": tokens,
        "train_time_s": elapsed,
        "train_tokens_per_s": tokens / elapsed if elapsed > 0 and tokens else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
    }


def wrap_data_parallel(model: nn.Module, device: torch.device, strategy: str = "ddp") -> nn.Module:
    """What trains when several processes do; ``model`` itself in one process.

    ddp: ``model`` under DistributedDataParallel (a full replica per process, gradients averaged
    over ranks after each step's backward; the wrapper shares the model's parameters). fsdp: a
    copy of ``model`` sharded by torch's fully_shard (one unit: parameters, gradients and AdamW
    state split over the ranks, the whole model gathered for each forward and backward); the
    unsharded model waits in CPU memory and gets the trained weights back at the end."""
    if not parallel.active():
        return model
    if strategy == "fsdp":
        import copy

        from torch.distributed.fsdp import fully_shard

        replica = copy.deepcopy(model)
        model.to("cpu")
        return fully_shard(replica)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def accumulating(replica: nn.Module, last: bool):
    """Skip the gradient reduction on all but the last micro-batch of a step (DDP's no_sync,
    FSDP's requires_gradient_sync)."""
    if hasattr(replica, "set_requires_gradient_sync"):
        replica.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not hasattr(replica, "no_sync"):
        return contextlib.nullcontext()
    return replica.no_sync()


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_full_weights(replica: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, on rank 0 (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(replica, options=_full_options())


def training_state(replica: nn.Module, optimizer, sharded: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, optimizer state) to checkpoint: as they are, or gathered whole from the
    shards (every rank must call it then; rank 0 receives them)."""
    if not sharded:
        return _trainable(getattr(replica, "module", replica)), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    trainable = {n for n, p in replica.named_parameters() if p.requires_grad}
    weights = {n: t for n, t in gather_full_weights(replica).items() if n in trainable}
    return weights, get_optimizer_state_dict(replica, optimizer, options=_full_options())


def skip_consumed(batches: Iterator[torch.Tensor], count: int) -> None:
    """Move ``batches`` past the ``count`` batches a resumed run had consumed: in constant time for
    a loader with a position (token shards), by reading them for a plain iterator."""
    if hasattr(batches, "skip"):
        batches.skip(count)
        return
    for _ in range(count):
        next(batches)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(ck: Checkpointing, state: dict[str, Any], weights, optimizer_state, scheduler) -> None:
    """``checkpoint-<step>/``: trainable weights (safetensors), optimizer + scheduler + RNG states
    (tensors and plain containers, loaded with weights_only=True), the loop's state, and last the
    completeness marker; older checkpoints beyond ``keep`` are removed once it is written."""
    from safetensors.torch import save_file

    out = ck.folder / f"checkpoint-{state['step']}"
    if out.is_symlink():
        set_aside(out, "a symbolic link where a checkpoint belongs")
    elif out.exists():
        remove_checkpoint(out, ck.folder)
    out.mkdir(parents=True)
    save_file(
        {n: p.detach().cpu().contiguous().clone() for n, p in weights.items()},
        out / "trainable.safetensors",
    )
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng},
        out / "optim.pt",
    )
    (out / "state.json").write_text(json.dumps(state))
    write_marker(out, {"step": state["step"], "spec_digest": ck.digest, "resumes": state["resumes"]})
    log.info("checkpoint at step %d complete: %s", state["step"], out)
    rotate_checkpoints(ck.folder, ck.keep)


def _resume(
    ck: Checkpointing, replica, optimizer, scheduler, device, sharded: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest complete checkpoint of the run that loads; one that fails to load is set
    aside (logged; by the main process alone, the others go on to the previous one too) for the
    previous one, and without any the run starts afresh."""
    for path, _marker in complete_checkpoints(ck.folder, ck.digest):
        try:
            return path, _load_checkpoint(path, replica, optimizer, scheduler, device, sharded)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning(
                "loading checkpoint %s failed (%s: %s); falling back to the previous complete checkpoint"
                " (or a fresh start)",
                path,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            if parallel.is_main_process():
                set_aside(path, "it could not be loaded")
    return None


def _load_checkpoint(
    path: Path, replica, optimizer, scheduler, device, sharded: bool = False
) -> dict[str, Any]:
    """Read every file of the checkpoint first, then apply them (a file that fails to load
    leaves the model, optimizer and RNG as they were)."""
    from safetensors.torch import load_file

    model = getattr(replica, "module", replica)  # under DDP: the wrapped model
    weights = load_file(path / "trainable.safetensors", device="cpu" if sharded else str(device))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise DistillConfigError(f"checkpoint {path} does not hold this model's trainable weights")
    blob = torch.load(path / "optim.pt", map_location="cpu" if sharded else device, weights_only=True)
    state = json.loads((path / "state.json").read_text())
    if sharded:  # each rank keeps its shard of the whole tensors saved
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(replica, weights, options=options)
        set_optimizer_state_dict(replica, optimizer, blob["optimizer"], options=options)
    else:
        params = _trainable(model)
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"].cpu())
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in blob["rng"]["cuda"]])
    return state
