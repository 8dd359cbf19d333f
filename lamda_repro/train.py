"""One fine-tuning run, from spec to record.

config entry -> RunSpec -> load model -> apply method -> load task data -> train (with the
method's callbacks) -> evaluate -> measure -> one JSON record written atomically.

Training uses the transformers ``Trainer`` (seeded, progress bar, periodic checkpoints and
logs) with one small subclass that checks every step's loss for NaN/inf and counts real
tokens. The method decides what trains (``apply``), may bring callbacks (e.g. LaMDA's freeze
schedule) and its own optimizer (e.g. LoRA-FA); ``UpdateCounter`` counts parameter updates.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import lamda_repro
from lamda_repro.config import RunSpec
from lamda_repro.models import set_offline
from lamda_repro.results import new_record, utc_now, write_record
from lamda_repro.resume import (
    CheckpointLoadError,
    Preempted,
    SigtermFlag,
    complete_checkpoints,
    folder_digest,
    identity_digest,
    identity_folder,
    is_transient,
    rank_zero,
    rotate_checkpoints,
    set_aside,
    write_marker,
)
from lamda_repro.tasks.metrics import Unavailable

log = logging.getLogger("lamda_repro.train")


def world_size() -> int:
    """Processes training this run together (torchrun's WORLD_SIZE; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no CUDA device is available")
    return device


def task_for_spec(spec: RunSpec, workdir: str):
    from lamda_repro.tasks.base import get_task_class
    from lamda_repro.tasks.smoke import dataset_files

    params = spec.task_params
    data_files = None
    if "data" in params:
        data_files = dataset_files(workdir, params["data"])
    elif "data_files" in params:
        data_files = dict(params["data_files"])
    task_params = {k: v for k, v in params.items() if k not in ("data", "data_files")}
    for key in ("max_train_samples", "max_eval_samples"):
        if key in spec.training and key not in task_params:
            task_params[key] = spec.training[key]
    return get_task_class(params["type"])(spec.task, task_params, data_files)


def run_inputs(spec: RunSpec, workdir: str) -> dict[str, Path]:
    """The files of the workdir and of the machine a run reads besides its spec: the task's data
    (a generated data set's folder, or the files it names) and the model's folder (built,
    local or packaged; a Hub model is named by id and revision in the spec)."""
    from lamda_repro.models import built_model_dir, package_model_dir

    inputs = {}
    params = spec.task_params
    if "data" in params:
        inputs[f"data/{params['data']}"] = Path(workdir) / "data" / params["data"]
    for split, path in sorted(params.get("data_files", {}).items()):
        inputs[f"data_files/{split}"] = Path(path).expanduser()
    entry = spec.model_params
    if entry["source"] == "build":
        inputs[f"model/{spec.model}"] = built_model_dir(workdir, spec.model)
    elif entry["source"] == "local":
        inputs[f"model/{spec.model}"] = Path(entry["path"]).expanduser()
    elif entry["source"] == "package":
        inputs[f"model/{spec.model}"] = package_model_dir(entry["package"])
    return inputs


def run_identity(spec: RunSpec, workdir: str) -> dict[str, Any]:
    """What decides a run's outputs: its spec (task, model entry, method, training and
    evaluation settings, seed, scale), the digests of the files it reads (``run_inputs``: the
    data and the built model, whose files carry its own settings and the corpus it was
    pretrained on) and the suite's version (bumped when the code changes results). ``digest``
    names the run's checkpoint folder; a checkpoint resumes only a run of the same digest."""
    inputs = {name: folder_digest(path) for name, path in run_inputs(spec, workdir).items()}
    parts = {"spec": spec.to_dict(), "inputs": inputs, "code_version": lamda_repro.__version__}
    return {"digest": identity_digest(parts), "inputs": inputs, "code_version": lamda_repro.__version__}


def _total_steps(n_train: int, tr: dict[str, Any], processes: int = 1) -> int:
    """Optimizer steps of the run, as the Trainer will count them: with several processes each
    takes ``batch_size`` examples per micro-batch, so an epoch has 1/processes as many steps."""
    if tr.get("max_steps", -1) > 0:
        return int(tr["max_steps"])
    batches = math.ceil(n_train / (tr["batch_size"] * processes))
    updates_per_epoch = max(1, math.ceil(batches / tr["grad_accum"]))
    return max(1, math.ceil(updates_per_epoch * tr["epochs"]))


def _warmup_steps(ratio: float, total_steps: int) -> float | int:
    """TrainingArguments.warmup_steps for a warmup ratio: a value below 1 is read as a ratio of
    the run, a value of 1 or more as a step count, so the whole run (ratio 1) is its step count."""
    return float(ratio) if ratio < 1 else total_steps


def loss_uses_item_count(model, batch: dict[str, Any]) -> bool:
    """Whether the model's loss on ``batch`` depends on ``num_items_in_batch`` (a sum divided by the
    item count, as transformers' causal-LM losses are) rather than being a mean of its own."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = model(**batch).loss
            try:
                counted = model(**batch, num_items_in_batch=torch.tensor(10**6, device=plain.device)).loss
            except TypeError:
                return False
    finally:
        model.train(was_training)
    return not torch.equal(plain, counted)


def _make_trainer_class():
    import torch
    from transformers import Trainer

    class SuiteTrainer(Trainer):
        """Trainer that fails loudly on a non-finite loss and counts real tokens per batch."""

        token_counter = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.token_counter is not None:
                self.token_counter.count_batch(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                raise FloatingPointError(
                    f"non-finite training loss ({loss.item()}) at step {self.state.global_step + 1}"
                )
            return loss

    return SuiteTrainer


def _make_checkpoint_callback(digest: str, updates, tokens, sigterm: SigtermFlag, resumed: dict[str, Any]):
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        """Writes each checkpoint's completeness marker (after the Trainer has written the rest),
        with the suite's counters, and turns SIGTERM into a checkpoint and a stop."""

        started = False  # whether the first step began (so a resumed checkpoint was loaded)

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = True

        def on_step_end(self, args, state, control, **kwargs):
            if sigterm.received:
                control.should_save = True
                control.should_training_stop = True

        trainer = None  # set once the trainer exists: its running loss sum goes into the marker

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            loss_sum = resumed.get("loss_sum", 0.0)
            if self.trainer is not None:
                loss_sum += self.trainer._total_loss_scalar + float(self.trainer._tr_loss.item())
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            elapsed = time.perf_counter() - tokens._t0 if tokens._t0 is not None else 0.0
            write_marker(
                ckpt,
                {
                    "step": int(state.global_step),
                    "spec_digest": digest,
                    "resumes": resumed.get("count", 0),
                    "parameter_updates": updates.total,
                    "update_steps": updates.steps,
                    "tokens": tokens.tokens,
                    "samples": tokens.samples,
                    "train_time_s": resumed.get("train_time_s", 0.0) + elapsed,
                    "loss_sum": loss_sum,
                },
            )
            log.info("checkpoint at step %d complete: %s", state.global_step, ckpt)
            rotate_checkpoints(args.output_dir, keep=2)

    return CheckpointCallback()


def run_finetune(
    spec: RunSpec,
    out_path: str | Path,
    workdir: str = "work",
    device: str = "auto",
    threads: int = 0,
    offline: bool = True,
    checkpoint_dir: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run and write its record (status success or failed).

    A rerun resumes from the run's last complete checkpoint. Transient failures (preemption,
    out of memory, I/O errors; ``lamda_repro.resume``) write no record and raise, so that the
    scheduler retries the run; deterministic ones are kept in a ``failed`` record."""
    skip: list[Path] = []  # checkpoints whose load failed in this process
    while True:
        record = new_record(spec.run_id, "finetune", spec.to_dict())
        t_start = time.perf_counter()
        try:
            with SigtermFlag() as sigterm:
                _run(spec, record, workdir, device, threads, offline, checkpoint_dir, sigterm, skip)
            record["status"] = "success"
        except CheckpointLoadError as exc:  # fall back to the previous complete one, or a fresh start
            log.warning("%s; falling back to the previous complete checkpoint (or a fresh start)", exc)
            skip.append(exc.path)
            if rank_zero():
                set_aside(exc.path, "it could not be loaded")
            continue
        except Exception as exc:  # the record keeps the failure; the caller decides the exit code
            if is_transient(exc):
                log.error(
                    "run %s stopped by a transient failure (no record written; a rerun resumes):\n%s",
                    spec.run_id,
                    traceback.format_exc(),
                )
                raise
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("run %s failed:\n%s", spec.run_id, traceback.format_exc())
        break
    record["wall_time_s"] = round(time.perf_counter() - t_start, 3)
    record["finished_at"] = utc_now()
    if rank_zero():
        write_record(out_path, record)
    return record


def _run(
    spec: RunSpec,
    record: dict[str, Any],
    workdir: str,
    device: str,
    threads: int,
    offline: bool,
    checkpoint_dir: str | None,
    sigterm: SigtermFlag,
    skip: tuple[Path, ...] | list[Path] = (),
) -> None:
    set_offline(offline)
    from transformers import TrainingArguments, set_seed

    from lamda_repro import measure
    from lamda_repro.methods.base import MethodContext, build_method
    from lamda_repro.models import load_model

    measure.set_threads(threads)
    device = resolve_device(device)
    tr = spec.training
    if device == "cpu" and tr.get("precision") == "fp16":  # no fp16 training on CPU: never a silent fp32
        raise ValueError(
            "training.precision: fp16 needs a CUDA device, this run's device is cpu (use fp32 or bf16)"
        )
    world = world_size()
    sharded = tr.get("distributed") == "fsdp" and world > 1
    if sharded and device == "cpu":
        raise ValueError(
            "training.distributed: fsdp needs CUDA devices (on CPU the Trainer silently trains with DDP "
            "instead); use ddp on CPU, or check FSDP on GPUs with scripts/check_fsdp_gpu.sh"
        )
    set_seed(spec.seed)
    identity = run_identity(spec, workdir)
    record["identity"] = identity

    task = task_for_spec(spec, workdir)
    raw = task.load_splits()
    num_labels = task.num_labels if task.task_kind == "seq-cls" else None
    model, tok = load_model(spec.model_params, spec.model, workdir, task.task_kind, num_labels)
    tokenized = {split: task.tokenize(ds, tok, tr["max_length"]) for split, ds in raw.items()}
    total_steps = _total_steps(len(tokenized["train"]), tr, world)
    method = build_method(spec.method_params)
    ctx = MethodContext(task_kind=task.task_kind, model_type=model.config.model_type, total_steps=total_steps)
    record["params"]["base_total"] = measure.count_parameters(model)["total"]
    model = method.apply(model, ctx)
    model.to(device)
    record["params"].update(measure.count_parameters(model))
    record["primary_metric"] = task.primary_metric

    collator = task.data_collator(tok, model)
    # Exact activation memory of one training step on the first batch, before training.
    first = collator([tokenized["train"][i] for i in range(min(tr["batch_size"], len(tokenized["train"])))])
    first = {k: v.to(device) for k, v in first.items()}
    model.train()
    saved = measure.saved_for_backward_bytes(lambda: model(**first).loss, model)
    grads = measure.memory_breakdown(model)["grad_bytes"]
    model.zero_grad(set_to_none=True)
    set_seed(spec.seed)

    updates = measure.UpdateCounter(method.updated_elements)
    tokens = measure.TokenCounter()
    precision = tr.get("precision", "fp32")
    run_dir = Path(checkpoint_dir or Path(workdir) / "checkpoints" / spec.run_id)
    output_dir = str(
        identity_folder(run_dir, identity["digest"]) if rank_zero() else run_dir / f"id-{identity['digest']}"
    )
    method_callbacks = method.callbacks(model, ctx)
    resume = next(complete_checkpoints(output_dir, identity["digest"], clean=rank_zero(), skip=skip), None)
    resumed: dict[str, Any] = {"count": 0}
    if resume is not None:
        ckpt, marker = resume
        resumed = {"count": int(marker.get("resumes", 0)) + 1, "from_step": int(marker["step"])}
        resumed["train_time_s"] = float(marker.get("train_time_s", 0.0))
        resumed["loss_sum"] = float(marker.get("loss_sum", 0.0))
        updates.total, updates.steps = int(marker["parameter_updates"]), int(marker["update_steps"])
        tokens.tokens, tokens.samples = int(marker["tokens"]), int(marker["samples"])
        for cb in method_callbacks:  # e.g. LaMDA's freeze state at that step, before the optimizer
            if hasattr(cb, "resume_at"):
                cb.resume_at(model, int(marker["step"]))
        log.info(
            "resuming run %s from %s (step %d, resume %d)",
            spec.run_id,
            ckpt,
            marker["step"],
            resumed["count"],
        )
    args = TrainingArguments(
        output_dir=output_dir,
        seed=spec.seed,
        data_seed=spec.seed,
        num_train_epochs=tr["epochs"],
        max_steps=tr.get("max_steps", -1) or -1,
        per_device_train_batch_size=tr["batch_size"],
        per_device_eval_batch_size=tr["eval_batch_size"],
        gradient_accumulation_steps=tr["grad_accum"],
        learning_rate=tr["lr"],
        weight_decay=tr["weight_decay"],
        warmup_steps=_warmup_steps(tr["warmup_ratio"], total_steps),
        lr_scheduler_type=tr["lr_scheduler"],
        max_grad_norm=tr["max_grad_norm"],
        logging_steps=tr["logging_steps"],
        save_strategy="steps" if tr["save_steps"] > 0 else "no",
        save_steps=tr["save_steps"] if tr["save_steps"] > 0 else 500,
        save_total_limit=None,  # the checkpoint callback rotates, within the run's own folder only
        eval_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=0,
        # several GPUs (torchrun, lamda_repro/cluster.py launcher): DDP, or FSDP when asked
        fsdp="full_shard auto_wrap" if sharded else "",
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    optimizer = method.create_optimizer(model, tr["lr"], tr["weight_decay"], ctx)
    trainer_cls = _make_trainer_class()
    checkpoint_cb = _make_checkpoint_callback(identity["digest"], updates, tokens, sigterm, resumed)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        data_collator=collator,
        processing_class=tok,
        callbacks=[
            updates,
            tokens,
            *method_callbacks,
            checkpoint_cb,
        ],
        optimizers=(optimizer, None) if optimizer is not None else (None, None),
    )
    trainer.token_counter = tokens
    # The Trainer hands num_items_in_batch to any model whose forward takes **kwargs and then skips
    # its own scaling (x processes, / accumulation steps) of the loss; a model whose loss is a plain
    # mean ignores it (classification heads, BART), so that scaling must stay on.
    trainer.model_accepts_loss_kwargs = loss_uses_item_count(model, first)
    checkpoint_cb.trainer = trainer
    sigterm.training = True
    with measure.PeakMemory(device) as peak:
        try:
            train_out = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
        except Exception as exc:
            if resume is None or checkpoint_cb.started or is_transient(exc):
                raise
            raise CheckpointLoadError(resume[0], exc) from exc
    sigterm.training = False
    if sigterm.received:
        step = trainer.state.global_step
        raise Preempted(
            f"SIGTERM during training: checkpoint at step {step} written",
            progressed=step > (resumed.get("from_step") or 0),
        )
    record["resume"] = {"resumed": resumed["count"], "from_step": resumed.get("from_step")}
    breakdown = measure.memory_breakdown(model, trainer.optimizer)
    breakdown["grad_bytes"] = grads
    breakdown["saved_for_backward_bytes"] = saved
    breakdown["train_state_bytes"] = sum(breakdown.values())
    record["memory"] = {**peak.result(), **breakdown}
    record["parameter_updates"] = updates.total
    with measure.whole_parameters(trainer.model_wrapped):  # FSDP: the model's count, not a shard's
        record["params"]["trainable_after_training"] = measure.count_parameters(model)["trainable"]
    record["method_info"] = method.record_info(model)
    if world > 1 and not sharded and not rank_zero():
        # DDP replicas are identical (same B, same weights): rank 0 alone scores every eval example
        # once and writes the record; the other ranks are done. (FSDP shards the weights, so every
        # rank takes part in each forward there.)
        return

    t_eval = time.perf_counter()
    train_loss = float(train_out.training_loss)
    if resumed.get("from_step") is not None and trainer.state.global_step > 0:
        # the Trainer averages over this attempt's steps; the run's mean covers all of them
        steps_now = trainer.state.global_step - resumed["from_step"]
        train_loss = (resumed["loss_sum"] + train_loss * steps_now) / trainer.state.global_step
    metrics: dict[str, float] = {"train_loss": train_loss}
    unavailable: dict[str, str] = {}
    eval_examples = 0
    for split in tokenized:
        if not split.startswith("eval"):
            continue
        suffix = split[len("eval") :]
        eval_examples += len(raw[split])
        m = task.evaluate(model, tok, raw[split], tokenized[split], tr["eval_batch_size"], spec.generation)
        for k, v in m.items():
            if isinstance(v, Unavailable):
                unavailable[f"{k}{suffix}"] = v.reason
            else:
                metrics[f"{k}{suffix}"] = float(v)
    eval_time = time.perf_counter() - t_eval
    for k, v in metrics.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"metric {k} is not finite ({v})")
    record["metrics"] = metrics
    if unavailable:
        record["unavailable_metrics"] = unavailable
    train_time = tokens.train_time_s or float(train_out.metrics.get("train_runtime", 0.0))
    train_time += resumed.get("train_time_s", 0.0)  # earlier attempts' training time
    # with several GPUs (DDP), every process counts its own batches, of the same size
    n_tokens, samples = tokens.tokens * world, tokens.samples * world
    record["throughput"] = {
        "train_steps": int(trainer.state.global_step),
        "train_time_s": round(train_time, 3),
        "train_samples_per_s": round(samples / train_time, 3) if train_time else None,
        "train_tokens_per_s": round(n_tokens / train_time, 3) if train_time else None,
        "train_tokens": n_tokens,
        "eval_time_s": round(eval_time, 3),
        "eval_examples": eval_examples,
        "processes": world,
    }
