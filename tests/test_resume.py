"""Resume after SIGKILL, checkpoint and stop on SIGTERM, and the failure policy of a fine-tuning
run (lamda_repro/resume.py): the run command is run in a child process, and the signals are real
ones, sent by the child to itself at a chosen training step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import LORA, tiny_spec

from lamda_repro.resume import TRANSIENT_EXIT, is_transient, last_complete, read_marker

LAMDA = {"type": "lamda", "r": 4, "alpha": 8, "target_modules": ["query", "value"], "freeze_fraction": 0.5}

# The run command with one hook: at `step`, the child signals itself (after the checkpoint's
# marker for SIGKILL, at the end of the step for SIGTERM).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import lamda_repro.train as train
    from lamda_repro.cli import main

    what, step = sys.argv[1], int(sys.argv[2])
    make = train._make_checkpoint_callback

    def hooked(*args):
        cb = make(*args)
        on_save, on_step_end = cb.on_save, cb.on_step_end

        def save(a, state, control, **kw):
            on_save(a, state, control, **kw)
            if what == "kill" and state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

        def step_end(a, state, control, **kw):
            if what == "term" and state.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return on_step_end(a, state, control, **kw)

        cb.on_save, cb.on_step_end = save, step_end
        return cb

    train._make_checkpoint_callback = hooked
    sys.exit(main(sys.argv[3:]))
    """
)


def _run(spec, out: Path, workdir: Path, hook=("none", 0)):
    args = ["--verbose", "run", "--spec", json.dumps(spec.to_dict()), "--out", str(out)]
    args += ["--workdir", str(workdir), "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, hook[0], str(hook[1]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _ckpt_dir(workdir: Path, spec) -> Path:
    """The run's checkpoint folder: that of its identity (lamda_repro.train.run_identity)."""
    return workdir / "checkpoints" / spec.run_id / f"id-{_identity(workdir, spec)}"


def _identity(workdir: Path, spec) -> str:
    from lamda_repro.train import run_identity

    return run_identity(spec, str(workdir))["digest"]


@pytest.fixture()
def workdir(smoke_workdir, tmp_path):
    """A workdir of its own (checkpoints) with the data and model of smoke_workdir."""
    wd = tmp_path / "wd"
    wd.mkdir()
    for sub in ("data", "models"):
        (wd / sub).symlink_to(smoke_workdir / sub)
    return wd


@pytest.mark.slow
@pytest.mark.parametrize("method", [LORA, LAMDA], ids=["lora", "lamda"])
def test_sigkill_after_a_checkpoint_resumes_and_ends_like_an_uninterrupted_run(method, workdir, tmp_path):
    spec = tiny_spec(method, epochs=3, save_steps=2, lr=3e-3)  # 12 steps; LaMDA freezes B on the way
    (tmp_path / "ref_wd").mkdir()
    for sub in ("data", "models"):
        (tmp_path / "ref_wd" / sub).symlink_to(workdir / sub)
    reference = _run(spec, tmp_path / "ref.json", tmp_path / "ref_wd")
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert ref["status"] == "success" and ref["resume"]["resumed"] == 0

    out = tmp_path / "rec.json"
    killed = _run(spec, out, workdir, hook=("kill", 8))
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    ckpts = _ckpt_dir(workdir, spec)
    assert read_marker(ckpts / "checkpoint-8") is not None
    # a checkpoint killed while saving (no marker) and a corrupt one (a truncated file) are skipped
    (ckpts / "checkpoint-10").mkdir()
    (ckpts / "checkpoint-10" / "trainer_state.json").write_text("{")
    weights = next(p for p in (ckpts / "checkpoint-8").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])

    resumed = _run(spec, out, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr
    assert "skipping checkpoint" in log and "checkpoint-10" in log and "checkpoint-8" in log
    assert f"resuming run {spec.run_id} from {ckpts / 'checkpoint-6'} (step 6, resume 1)" in log
    rec = json.loads(out.read_text())
    assert rec["status"] == "success"
    assert rec["resume"] == {"resumed": 1, "from_step": 6}
    assert rec["throughput"]["train_steps"] == ref["throughput"]["train_steps"] == 12
    # evaluation metrics identical; the mean training loss up to float summation order
    assert rec["metrics"].pop("train_loss") == pytest.approx(ref["metrics"].pop("train_loss"), rel=1e-9)
    assert rec["metrics"] == ref["metrics"]
    assert rec["parameter_updates"] == ref["parameter_updates"]
    assert rec["throughput"]["train_tokens"] == ref["throughput"]["train_tokens"]
    assert rec["method_info"] == ref["method_info"]  # LaMDA's freeze state included


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_with_the_retry_status(workdir, tmp_path):
    spec = tiny_spec(LORA, epochs=3, save_steps=0)  # no periodic checkpoints: SIGTERM still writes one
    out = tmp_path / "rec.json"
    proc = _run(spec, out, workdir, hook=("term", 5))
    assert proc.returncode == TRANSIENT_EXIT == 75, proc.stderr[-3000:]
    assert "INTERRUPTED (Preempted: SIGTERM during training: checkpoint at step 5 written)" in proc.stderr
    assert not out.exists()  # no record: the scheduler retries the run
    found = last_complete(_ckpt_dir(workdir, spec), _identity(workdir, spec), drop_unusable=False)
    assert found is not None and found[1]["step"] == 5
    again = _run(spec, out, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["resume"] == {"resumed": 1, "from_step": 5}


def test_out_of_memory_exits_for_a_retry_without_a_record(tmp_path, monkeypatch, capsys):
    import torch

    import lamda_repro.train as train
    from lamda_repro.cli import main

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "_run", oom)
    out = tmp_path / "rec.json"
    args = ["run", "--spec", json.dumps(tiny_spec(LORA).to_dict()), "--out", str(out), "--device", "cpu"]
    assert main(args) == TRANSIENT_EXIT
    assert "INTERRUPTED (OutOfMemoryError: CUDA out of memory" in capsys.readouterr().err
    assert not out.exists()
    # a non-finite loss is deterministic: its failed record is kept and the command exits 0
    monkeypatch.setattr(
        train, "_run", lambda *a, **k: (_ for _ in ()).throw(FloatingPointError("non-finite"))
    )
    assert main(args) == 0
    assert json.loads(out.read_text())["status"] == "failed"


def test_transient_and_deterministic_failures():
    import errno

    import torch

    assert is_transient(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(RuntimeError("NCCL error in: ..."))
    assert not is_transient(FloatingPointError("non-finite training loss"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "no such file"))
    assert not is_transient(ValueError("bad value"))
