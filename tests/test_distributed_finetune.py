"""Fine-tuning on several processes (torch.distributed, gloo on CPU): every method of the paper grid
trains on 2 processes with replicas bit-identical and the same result as one process with the same
global batch; the record is written once with every eval example scored once; LaMDA's frozen columns
stay; a SIGKILLed 2-process run resumes to the uninterrupted result; two torchrun "nodes" on localhost
train one run together.

Process start-up dominates, so one torchrun launch runs all methods (tests/distributed_finetune_runs.py)
and one plain process runs the reference; the launches are shared by the tests through fixtures.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import tiny_spec

from lamda_repro.resume import read_marker

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
RUNS = HERE / "distributed_finetune_runs.py"
TARGETS = ["query", "value"]
METHODS = {
    "full": {"type": "full"},
    "lora": {"type": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "lora_fa": {"type": "lora_fa", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "pissa": {"type": "pissa", "r": 4, "alpha": 4, "target_modules": TARGETS},
    "dora": {"type": "dora", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "adalora": {"type": "adalora", "r": 4, "init_r": 6, "alpha": 8, "target_modules": TARGETS},
    "vera": {"type": "vera", "r": 16, "target_modules": TARGETS},
    "lamda": {"type": "lamda", "r": 4, "alpha": 8, "target_modules": TARGETS, "freeze_fraction": 1.0},
    "lamdapp": {"type": "lamdapp", "r": 4, "alpha": 8, "target_modules": TARGETS, "freeze_fraction": 1.0},
    "lamda_reference": {"type": "lamda_reference", "r": 4, "target_modules": TARGETS},
}
GLOBAL_BATCH = 8
# 24 training examples, global batch 8, 2 epochs: 6 optimizer steps; LaMDA (r 4, fraction 1.0)
# freezes component k before step k, so columns freeze at steps 0-3 and stay frozen for the rest.
TRAINING = {"epochs": 2, "lr": 1e-2, "max_train_samples": 24, "max_eval_samples": 12, "logging_steps": 1}
EVAL_EXAMPLES = 12


def spec_for(method: str, processes: int, **training):
    tr = {**TRAINING, "batch_size": GLOBAL_BATCH // processes, "eval_batch_size": 8, **training}
    return tiny_spec(METHODS[method], **tr)


def grid(processes: int) -> dict:
    """Every method's run; LaMDA's checkpoints every 2 steps, and a second LaMDA run with the same
    spec (``lamda_resume``) that a killed launch has already taken to its step-4 checkpoint."""
    specs = {name: spec_for(name, processes) for name in METHODS}
    specs["lamda"] = specs["lamda_resume"] = spec_for("lamda", processes, save_steps=2)
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _workdir(smoke_workdir: Path, path: Path) -> Path:
    path.mkdir(parents=True)
    for sub in ("data", "models"):
        (path / sub).symlink_to(smoke_workdir / sub)
    return path


def launch(prefix: list[str], specs: dict, workdir: Path, out: Path, kill_at: int = 0, device="cpu"):
    """Start tests/distributed_finetune_runs.py on ``specs`` ({run name: RunSpec}) with ``prefix``."""
    spec_file = out.parent / f"{out.name}.specs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps({name: spec.to_dict() for name, spec in specs.items()}))
    cmd = [*prefix, str(RUNS), "--specs", str(spec_file), "--workdir", str(workdir), "--out", str(out)]
    cmd += ["--device", device] + (["--kill-at", str(kill_at)] if kill_at else [])
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def torchrun(port: int, nnodes: int = 1, node_rank: int = 0, nproc: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=lamda-repro-test", "--max-restarts=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def launches(smoke_workdir, tmp_path_factory):
    """Three launches shared by the tests (process start-up is most of their time):
    - ``one``: every method in one plain process, the global batch on it;
    - a 2-process torchrun that takes ``lamda_resume`` to its step-4 checkpoint and is SIGKILLed;
    - ``two``: every method on 2 processes started by two torchrun launches as two "nodes"
      (--nnodes 2, c10d rendezvous on 127.0.0.1) sharing the workdir as a cluster's nodes share a
      file system; ``lamda_resume`` resumes there from the killed launch's checkpoint."""
    root = tmp_path_factory.mktemp("ddp")
    shared = _workdir(smoke_workdir, root / "wd2")
    one = launch([sys.executable], grid(1), _workdir(smoke_workdir, root / "wd1"), root / "one")
    killed = {"lamda_resume": grid(2)["lamda_resume"]}
    rc, output = finish(launch(torchrun(free_port()), killed, shared, root / "killed", kill_at=4))
    assert rc != 0 and not (root / "killed" / "lamda_resume.record.json").exists(), output[-3000:]
    killed_at = sorted((shared / "checkpoints" / "lamda_resume").glob("id-*/checkpoint-4"))
    assert len(killed_at) == 1 and read_marker(killed_at[0]) is not None, output[-3000:]
    port = free_port()
    nodes = [launch(torchrun(port, 2, node, 1), grid(2), shared, root / "two") for node in (0, 1)]
    for proc, what in ((nodes[0], "node 0"), (nodes[1], "node 1"), (one, "1 process")):
        rc, output = finish(proc)
        assert rc == 0, f"{what}:\n{output[-4000:]}"
    return root


def weights(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{name}.rank{rank}.pt", weights_only=True)


def info(out: Path, name: str, rank: int) -> dict:
    return json.loads((out / f"{name}.rank{rank}.json").read_text())


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_train_identical_replicas_equal_to_one_process(launches, name):
    two, one = launches / "two", launches / "one"
    w0, w1, ref = weights(two, name, 0), weights(two, name, 1), weights(one, name, 0)
    assert w0.keys() == w1.keys() == ref.keys() and w0
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"replicas differ in {key}"
        torch.testing.assert_close(
            w0[key], ref[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs from one process"
        )
    rec, ref_rec = (json.loads((d / f"{name}.record.json").read_text()) for d in (two, one))
    assert rec["status"] == ref_rec["status"] == "success"
    assert rec["throughput"]["processes"] == 2 and rec["throughput"]["train_steps"] == 6
    assert rec["metrics"].keys() == ref_rec["metrics"].keys()
    for key, value in rec["metrics"].items():
        assert value == pytest.approx(ref_rec["metrics"][key], rel=1e-4, abs=1e-5), key
    # counts are the model's (DDP replicas hold all of it), equal to one process's
    assert rec["params"] == ref_rec["params"]
    assert rec["parameter_updates"] == ref_rec["parameter_updates"] > 0
    assert rec.get("method_info") == ref_rec.get("method_info")


@pytest.mark.parametrize("name", list(METHODS))
def test_record_written_once_and_every_eval_example_scored_once(launches, name):
    two = launches / "two"
    scored = [info(two, name, rank)["scored"] for rank in (0, 1)]
    assert scored == [EVAL_EXAMPLES, 0]
    rec = json.loads((two / f"{name}.record.json").read_text())
    assert rec["throughput"]["eval_examples"] == EVAL_EXAMPLES
    assert sorted(p.name for p in two.glob(f"{name}.record*")) == [f"{name}.record.json"]


@pytest.mark.parametrize("name", ["lamda", "lamdapp"])
def test_lamda_frozen_columns_stay_from_their_freeze_step_on(launches, name):
    for rank in (0, 1):
        seen = info(launches / "two", name, rank)
        assert seen["frozen_ok"] and seen["frozen_checks"] >= 4 * 4  # 4 layers, frozen at steps 0-3
    rec = json.loads((launches / "two" / f"{name}.record.json").read_text())
    assert rec["method_info"]["lamda"]["frozen_components"] == rec["method_info"]["lamda"]["total_components"]


def test_sigkilled_two_process_run_resumes_to_the_uninterrupted_result(launches):
    two = launches / "two"
    rec, uninterrupted = (
        json.loads((two / f"{n}.record.json").read_text()) for n in ("lamda_resume", "lamda")
    )
    assert rec["status"] == "success" and rec["resume"] == {"resumed": 1, "from_step": 4}
    assert uninterrupted["resume"] == {"resumed": 0, "from_step": None}
    assert rec["throughput"]["train_steps"] == uninterrupted["throughput"]["train_steps"] == 6
    for key, value in rec["metrics"].items():
        assert value == pytest.approx(uninterrupted["metrics"][key], rel=1e-6, abs=1e-7), key
    assert rec["parameter_updates"] == uninterrupted["parameter_updates"]
    assert rec["method_info"] == uninterrupted["method_info"]
    w0, w1, ref = weights(two, "lamda_resume", 0), weights(two, "lamda_resume", 1), weights(two, "lamda", 0)
    assert w0.keys() == ref.keys()
    for key in ref:
        assert torch.equal(w0[key], w1[key])
        torch.testing.assert_close(w0[key], ref[key], rtol=1e-6, atol=1e-7)


def test_two_torchrun_nodes_on_localhost_train_one_run(launches):
    # rank 0 ran on node 0, rank 1 on node 1, and they trained one run (the tests above)
    assert [info(launches / "two", "lora", rank)["node"] for rank in (0, 1)] == [0, 1]


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA devices (scripts/check_fsdp_gpu.sh)"
)
@pytest.mark.parametrize("name", ["full", "lora", "lamda"])
def test_fsdp_on_two_gpus_equals_one_gpu(smoke_workdir, tmp_path, name):
    """FSDP on CPU is refused (the Trainer would silently use DDP there); this runs where 2 GPUs are."""
    fsdp = {"distributed": "fsdp", "gpus": 2}
    wd2, wd1 = _workdir(smoke_workdir, tmp_path / "wd2"), _workdir(smoke_workdir, tmp_path / "wd1")
    two_specs = {name: spec_for(name, 2, **fsdp)}
    two = launch(torchrun(free_port()), two_specs, wd2, tmp_path / "two", device="cuda")
    one = launch([sys.executable], {name: spec_for(name, 1)}, wd1, tmp_path / "one", device="cuda")
    for proc in (two, one):
        rc, output = finish(proc)
        assert rc == 0, output[-4000:]
    w0, w1, ref = (weights(tmp_path / d, name, r) for d, r in (("two", 0), ("two", 1), ("one", 0)))
    for key in ref:
        assert torch.equal(w0[key], w1[key]), key
        torch.testing.assert_close(w0[key], ref[key], rtol=1e-4, atol=1e-5)
    if name == "lamda":
        assert all(info(tmp_path / "two", name, r)["frozen_ok"] for r in (0, 1))
