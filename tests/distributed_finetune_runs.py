"""Fine-tuning runs of tests/test_distributed_finetune.py, one launch for many methods.

Started as ``torchrun ... tests/distributed_finetune_runs.py ARGS`` (each rank runs every method
through ``lamda_repro.train.run_finetune``, the code ``lamda-repro run`` runs) or with plain
``python`` for the one-process reference. Per method and rank it writes, under ``--out``:
- ``<method>.rank<r>.pt``: the trainable weights after training (LaMDA's B as the forward uses it);
- ``<method>.rank<r>.json``: eval examples this rank scored, and the check of LaMDA's frozen columns
  (each column frozen at a step equals its value at the end);
and rank 0 writes ``<method>.record.json`` (the run's record).

Dropout modules are set to p = 0 before training, so that one process with the global batch and
two processes with half of it each compute the same function (dropout masks are drawn per process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lamda_repro.train as train  # noqa: E402
from lamda_repro.measure import whole_parameters  # noqa: E402
from lamda_repro.methods.lamda import LamdaFreezeCallback, LamdaLayer  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # LaMDA's B is compared as the forward uses it (a fully frozen B leaves training on one process)
    out = {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and ".lamda_B." not in n
    }
    for name, module in model.named_modules():
        if isinstance(module, LamdaLayer):
            out[f"{name}.B_used"] = module.full_B("default").detach().clone()
    return out


class Probe:
    """What one run's rank saw: its trainer, eval examples it scored, LaMDA's B at each freeze step."""

    def __init__(self):
        self.trainer = None
        self.scored = 0
        self.snapshots: list[dict[str, tuple[int, torch.Tensor]]] = []

    def snapshot(self, model):
        self.snapshots.append(
            {
                n: (m.frozen_components("default"), m.full_B("default").detach().clone())
                for n, m in model.named_modules()
                if isinstance(m, LamdaLayer)
            }
        )

    def frozen_check(self, model) -> tuple[bool, int]:
        final = {
            n: m.full_B("default").detach() for n, m in model.named_modules() if isinstance(m, LamdaLayer)
        }
        checks, ok = 0, True
        for snap in self.snapshots:
            for name, (k, B) in snap.items():
                if k > 0:
                    checks += 1
                    ok = ok and torch.equal(final[name][:, :k], B[:, :k])
        return ok, checks


PROBE = Probe()
MAKE_TRAINER, TASK_FOR_SPEC, MAKE_CHECKPOINT = (
    train._make_trainer_class,
    train.task_for_spec,
    train._make_checkpoint_callback,
)


def install(kill_at: int) -> None:
    """Route the run's trainer, task and checkpoint callback through PROBE (once per process)."""
    probe = PROBE
    make_trainer, task_for_spec, make_checkpoint = MAKE_TRAINER, TASK_FOR_SPEC, MAKE_CHECKPOINT

    def trainer_class():
        base = make_trainer()

        class Probed(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                probe.trainer = self
                for module in self.model.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = 0.0

        return Probed

    def counted_task(*args, **kwargs):
        task = task_for_spec(*args, **kwargs)
        evaluate = task.evaluate

        def counting(model, tok, raw, *rest, **kw):
            probe.scored += len(raw)
            return evaluate(model, tok, raw, *rest, **kw)

        task.evaluate = counting
        return task

    def checkpoint_callback(*args):
        cb = make_checkpoint(*args)
        on_save = cb.on_save

        def save(a, state, control, **kw):
            on_save(a, state, control, **kw)
            if kill_at and state.global_step == kill_at and RANK == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # after checkpoint kill_at is complete

        cb.on_save = save
        return cb

    train._make_trainer_class = trainer_class
    train.task_for_spec = counted_task
    train._make_checkpoint_callback = checkpoint_callback
    begin, step_end = LamdaFreezeCallback.on_train_begin, LamdaFreezeCallback.on_step_end

    def on_train_begin(self, args, state, control, model=None, **kw):
        begin(self, args, state, control, model=model, **kw)
        with whole_parameters(model):
            probe.snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        step_end(self, args, state, control, model=model, **kw)
        with whole_parameters(model):
            probe.snapshot(model)

    LamdaFreezeCallback.on_train_begin, LamdaFreezeCallback.on_step_end = on_train_begin, on_step_end


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", required=True, help="JSON file: {method name: RunSpec dict}")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kill-at", type=int, default=0, help="rank 0 SIGKILLs itself after this checkpoint")
    args = parser.parse_args()
    from lamda_repro.config import RunSpec

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = json.loads(Path(args.specs).read_text())
    install(args.kill_at)
    for name, spec_dict in specs.items():
        PROBE.__init__()
        probe = PROBE
        spec = RunSpec.from_dict(spec_dict)
        ckpt = Path(args.workdir) / "checkpoints" / name
        record = train.run_finetune(
            spec,
            out / f"{name}.record.json",
            args.workdir,
            device=args.device,
            threads=1,
            checkpoint_dir=str(ckpt),
        )
        if record["status"] != "success":
            raise SystemExit(f"{name} failed on rank {RANK}: {record.get('error')}")
        model = probe.trainer.model
        with whole_parameters(probe.trainer.model_wrapped):  # FSDP: the whole weights, not a shard
            torch.save(
                {k: v.cpu() for k, v in trainable_weights(model).items()}, out / f"{name}.rank{RANK}.pt"
            )
            ok, checks = probe.frozen_check(model)
        node = int(os.environ.get("GROUP_RANK", "0"))  # torchrun's node rank
        info = {"scored": probe.scored, "frozen_ok": ok, "frozen_checks": checks, "node": node}
        (out / f"{name}.rank{RANK}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
