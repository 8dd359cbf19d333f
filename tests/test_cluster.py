"""The workflow through a real SLURM cluster (`pytest -m cluster`): a single-node cluster brought up
by scripts/local_slurm.sh (slurmctld + slurmd from Debian's packages, no GPUs, no accounting), and a
reduced smoke grid run with `snakemake --profile profiles/slurm-local`:

- a request the node can never satisfy (the paper sizes: 64 GB on a smaller node) stops the
  workflow before anything is submitted, with one line naming the rule and SLURM's reason;
- every non-local job is a SLURM job: its id is in Snakemake's output and in slurmctld's log; no
  sacct error on the screen;
- one run gets SIGTERM as SLURM sends it before the time limit (to the job's step; here with
  scancel once its first checkpoint exists): it checkpoints, and having made progress it requeues
  its own job, which resumes from the checkpoint within the same Snakemake run (the profile's
  `retries: 0`: the preemption used no retry); meanwhile `lamda-repro status` shows the run as
  running with its SLURM job id;
- the tables equal those of the same grid run locally, and a second run submits nothing.

Skipped, with one line saying why, where SLURM cannot be installed (no apt-get, or not root) or
a SLURM configuration the script did not write exists (it is never replaced)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
COPY = ["Snakefile", "environment.yml", "workflow", "profiles", "slurm", "results/reference"]
LONG_RUN = "nlu/smoke_sst2/tiny_bert/lora_long/seed0"

CONFIG = {
    "name": "cluster-smoke",
    "scale": "smoke",
    "workdir": "work",
    "results_dir": "results",
    "offline": True,
    "device": "cpu",
    "threads": 1,
    "data": {"sentiment": {"generator": "sentiment", "n_train": 64, "n_eval": 32, "seed": 0}},
    "models": {
        "tiny_bert": {
            "source": "build",
            "tokenizer": {"data": "sentiment", "vocab_size": 500},
            "config": {
                "model_type": "bert",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 128,
            },
        }
    },
    "tasks": {"smoke_sst2": {"type": "glue", "subset": "sst2", "data": "sentiment"}},
    "methods": {
        "lora": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        # long enough to be preempted after its first checkpoint
        "lora_long": {
            "type": "lora",
            "r": 4,
            "alpha": 8,
            "target_modules": ["query", "value"],
            "training": {"max_steps": 400, "save_steps": 10, "logging_steps": 50},
        },
    },
    "training": {"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "max_length": 32, "lr": 1.0e-3},
    "experiments": {
        "nlu": {"models": ["tiny_bert"], "tasks": ["smoke_sst2"], "methods": ["lora", "lora_long"]}
    },
}


def _env(extra=None):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        env[v] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **(extra or {})}


def _workflow_copy(root: Path) -> Path:
    for item in COPY:
        src, dst = REPO / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    (root / "config").mkdir()
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


def _snakemake(root: Path, env, *args, limit=240, wait=True):
    # A hung Snakemake ignores SIGTERM: timeout -k ends it for sure.
    cmd = ["timeout", "-k", "30", str(limit), sys.executable, "-m", "snakemake", *args]
    if not wait:  # its own process group: _kill ends Snakemake too, not only `timeout`
        return subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def _kill(proc) -> str:
    """End a Snakemake started with wait=False (and everything it started); its output so far."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.communicate()[0]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = _env({"LAMDA_SLURM_DIR": str(state)})
    script = ["timeout", "-k", "10", "300", "bash", str(REPO / "scripts" / "local_slurm.sh")]
    installed = subprocess.run([*script, "install"], env=env, capture_output=True, text=True)
    if installed.returncode != 0:
        pytest.skip(f"no SLURM cluster here: {installed.stderr.strip().splitlines()[-1]}")
    started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True)
    if "not written by this script" in started.stderr:  # a real SLURM set-up: leave it alone
        pytest.skip(f"no test cluster here: {started.stderr.strip().splitlines()[-1]}")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"env": env, "state": state}
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, text=True)


def _job_counts(text: str) -> dict[str, int]:
    counts = {}
    for line in text.split("Job stats:", 1)[-1].splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def _table(root: Path) -> list[str]:
    """The family table without its peak memory column (a process high-water mark, different in
    any two runs); quality, parameters and train-state memory are compared."""
    import pandas as pd

    table = pd.read_csv(root / "results" / "tables" / "nlu.csv").drop(columns=["peak memory"])
    assert len(table) == 2 and "smoke_sst2 (accuracy)" in table.columns
    return table.to_csv(index=False).splitlines()


def _squeue(env, *args) -> str:
    return subprocess.run(["squeue", "--noheader", *args], env=env, capture_output=True, text=True).stdout


def test_smoke_grid_through_slurm(slurm, tmp_path):
    env = slurm["env"]
    started = time.monotonic()
    local = _workflow_copy(tmp_path / "local")
    on_slurm = _workflow_copy(tmp_path / "slurm")
    profile = ["--profile", "profiles/slurm-local"]

    running = []  # Snakemakes started in the background: ended whatever happens
    try:
        # The same grid locally, alongside (its table is compared at the end).
        local_run = _snakemake(local, _env(), "--cores", "1", limit=900, wait=False)
        running.append(local_run)

        # The paper sizes on this node: refused before any submission, in one line.
        paper = _snakemake(on_slurm, env, *profile, "--config", "scale=paper", limit=200)
        text = paper.stdout + paper.stderr
        assert paper.returncode == 1, text[-3000:]
        refusal = [line for line in text.splitlines() if line.startswith("cluster error:")]
        assert len(refusal) == 1, text[-3000:]
        assert "rule finetune (" in refusal[0] and "--mem 64000" in refusal[0], refusal
        assert "Requested node configuration is not available" in refusal[0]
        assert "SLURM jobid" not in text and not _squeue(env).strip()

        # First run: the long run gets SIGTERM once its first checkpoint is complete.
        proc = _snakemake(on_slurm, env, *profile, limit=720, wait=False)
        running.append(proc)
        ckpts = on_slurm / "work" / "checkpoints" / LONG_RUN
        deadline = time.monotonic() + 480  # generous: a loaded machine starts jobs slowly

        def checkpointed():
            return any(ckpts.glob("id-*/checkpoint-*/checkpoint_complete.json"))  # its identity's folder

        while not checkpointed() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if not checkpointed() or proc.poll() is not None:
            pytest.fail("the long run wrote no checkpoint:\n" + _kill(proc)[-4000:])
        # the plugin names jobs by the workflow run and comments them with the rule and wildcards
        jobs = dict(line.split("|") for line in _squeue(env, "--format=%k|%i").split())
        long_job = jobs.get("rule_finetune_wildcards_" + LONG_RUN.replace("/", "_").replace("seed", ""))
        assert long_job is not None, jobs
        # What `sbatch --signal=TERM@<s>` (lamda_repro/cluster.py) does before the time limit:
        # SIGTERM to the job's step, where the run works.
        subprocess.run(["scancel", "--signal=TERM", f"{long_job}.0"], env=env, check=True)
        # The run requeues its job. SLURM holds a requeued job back for about two minutes (its
        # BeginTime); a real cluster's queue does the same, the test lets it start at once.
        deadline = time.monotonic() + 120
        while _squeue(env, "-j", long_job, "--format=%T").strip() != "PENDING":
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("the preempted job was not requeued:\n" + _kill(proc)[-4000:])
            time.sleep(0.2)
        # `status` shows the run as running, with its SLURM job id (pending, requeued)
        shown = subprocess.run(
            [str(Path(sys.executable).parent / "lamda-repro"), "status"],
            cwd=on_slurm,
            env=env,
            capture_output=True,
            text=True,
        )
        assert f"RUNNING finetune/nlu {LONG_RUN} (cluster job {long_job})" in shown.stdout, (
            shown.stdout + shown.stderr
        )
        subprocess.run(["scontrol", "update", f"jobid={long_job}", "StartTime=now"], env=env, check=True)
        out, _ = proc.communicate(timeout=780)
        assert proc.returncode == 0, out[-3000:]  # no job failed: the preemption used no retry
        assert "sacct" not in out and "Error in rule" not in out, out[-3000:]
        submitted = re.findall(r"submitted with SLURM jobid (\d+)", out)
        assert len(submitted) == 2, out[-3000:]  # the two fine-tuning runs, once each (requeued: same id)
        ctld = (slurm["state"] / "log" / "slurmctld.log").read_text()
        assert all(f"JobId={job} " in ctld for job in submitted)
        requeued = rf"[Rr]equeu\w* .*JobId={long_job}\b|JobId={long_job}\b.*[Rr]equeu"
        assert re.search(requeued, ctld), ctld[-2000:]
        log = (on_slurm / f"logs/finetune/{LONG_RUN}.log").read_text()  # the requeued attempt's log
        assert "resuming run " + LONG_RUN in log
        record = json.loads((on_slurm / "results" / "runs" / f"{LONG_RUN}.json").read_text())
        assert record["status"] == "success" and record["resume"]["resumed"] == 1, record.get("resume")

        # The same table as the local run.
        local_out, _ = local_run.communicate(timeout=960)
        assert local_run.returncode == 0, local_out[-3000:]
        assert _table(on_slurm) == _table(local)

        # Nothing left to do.
        noop = _snakemake(on_slurm, env, *profile, "-n")
        assert noop.returncode == 0 and "Nothing to be done" in noop.stdout + noop.stderr
    finally:
        for background in running:
            if background.poll() is None:
                _kill(background)
    # a bound against hangs, not the expected time (a loaded machine is slow to start jobs)
    assert time.monotonic() - started < 1500
