"""The cluster's edges without a cluster: the check before submission (sbatch --test-only), the
SLURM job ids in `lamda-repro status`, requeueing a preempted run that made progress, and the
executor plugin's account guess kept off the screen. The same cases on a live SLURM: the
`cluster` group (tests/test_cluster.py)."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
from pathlib import Path

from lamda_repro import resume, status
from lamda_repro.cluster import job_resources, quiet_account_guess, sbatch_request, unsatisfiable

PAPER = {"scale": "paper", "device": "cuda", "threads": 8}


def test_the_sbatch_request_is_the_plugins():
    res = {**job_resources(PAPER, "finetune"), "slurm_partition": "gpu", "gpu_model": "h100"}
    assert sbatch_request(res) == [
        "-p",
        "gpu",
        "-t",
        "720",
        "--mem",
        "64000",
        "--gpus=h100:1",
        "--cpus-per-gpu=8",
    ]
    cpu = job_resources({**PAPER, "device": "cpu", "cluster": {"qos": "long"}}, "recursive_relax_error")
    assert sbatch_request(cpu, threads=8) == [
        "--qos=long",
        "-t",
        "240",
        "--mem",
        "64000",
        "--cpus-per-task=8",
    ]
    assert sbatch_request({"mem_mb": 10}, threads=3) == ["--mem", "10", "--cpus-per-task=3"]


class _Sbatch:
    """sbatch --test-only of a node with 2 CPUs, 20 GB and no GPU (its answers as SLURM 22.05 words them)."""

    def __init__(self, unreachable: bool = False):
        self.calls: list[list[str]] = []
        self.unreachable = unreachable

    def __call__(self, cmd, **_kw):
        self.calls.append(cmd)
        assert cmd[:2] == ["sbatch", "--test-only"] and cmd[-2:] == ["--wrap", "true"]
        if self.unreachable:
            return subprocess.CompletedProcess(
                cmd, 1, "", "sbatch: error: Unable to contact slurm controller"
            )
        args = " ".join(cmd)
        if "--gpus" in args:
            return subprocess.CompletedProcess(
                cmd, 1, "", "sbatch: error: Invalid generic resource (gres) specification"
            )
        mem = int(cmd[cmd.index("--mem") + 1])
        cpus = int(next(a for a in cmd if a.startswith("--cpus-per-task=")).split("=")[1])
        if mem > 20000 or cpus > 2:
            return subprocess.CompletedProcess(
                cmd, 1, "", "allocation failure: Requested node configuration is not available"
            )
        return subprocess.CompletedProcess(cmd, 0, "", "sbatch: Job 4 to start at now using 1 processors")


def test_requests_no_node_can_satisfy_stop_the_workflow_with_one_line():
    smoke = {"scale": "smoke", "device": "cpu", "threads": 1}
    fits = [("finetune", job_resources(smoke, "finetune"), 1)] * 3
    sbatch = _Sbatch()
    assert unsatisfiable(fits, run=sbatch) is None
    assert len(sbatch.calls) == 1  # one question per distinct request

    # the paper sizes on this node (64 GB and 8 CPUs), and a GPU where there is none
    jobs = fits + [
        ("finetune", job_resources({**PAPER, "device": "cpu"}, "finetune"), 8),
        ("bench", job_resources(PAPER, "bench"), 8),
    ]
    message = unsatisfiable(jobs, run=_Sbatch())
    assert message is not None and "\n" not in message
    assert message.startswith("cluster error: SLURM can never run rule finetune (-t 720 --mem 64000")
    assert "Requested node configuration is not available" in message
    assert "rule bench (" in message and "Invalid generic resource (gres) specification" in message
    assert "Nothing was submitted" in message and "--set-resources" in message
    # SLURM out of reach is not a refusal: submission reports it
    assert unsatisfiable(jobs, run=_Sbatch(unreachable=True)) is None


def _marker(root: Path, output: str, job: str | None) -> None:
    base = root / ".snakemake" / "incomplete"
    base.mkdir(parents=True, exist_ok=True)
    name = base64.urlsafe_b64encode(output.encode()).decode()
    (base / name).write_text(json.dumps({"external_jobid": job}))


def test_status_shows_the_slurm_job_of_a_running_run(tmp_path):
    from lamda_repro.config import validate_config

    cfg = validate_config(
        {
            "name": "t",
            "scale": "smoke",
            "device": "cpu",
            "data": {"d": {"generator": "sentiment", "n_train": 8, "n_eval": 8, "seed": 0}},
            "models": {
                "m": {"source": "build", "tokenizer": {"data": "d"}, "config": {"model_type": "bert"}}
            },
            "tasks": {"t": {"type": "glue", "subset": "sst2", "data": "d"}},
            "methods": {"lora": {"type": "lora", "r": 2}},
            "experiments": {
                "nlu": {"models": ["m"], "tasks": ["t"], "methods": ["lora"], "seeds": [0, 1, 2, 3]}
            },
        }
    )
    # The Snakemake inside a SLURM job overwrites the marker's job id with null; the queue knows
    # the job by the comment the executor plugin gives it.
    _marker(tmp_path, f"{cfg['results_dir']}/runs/nlu/t/m/lora/seed0.json", None)
    _marker(tmp_path, f"{cfg['results_dir']}/runs/nlu/t/m/lora/seed1.json", "77")
    asked = []

    def queue(root):
        asked.append(root)
        # seed2: requeued after a preemption, pending without a marker
        return {
            "rule_finetune_wildcards_nlu_t_m_lora_0": "4242",
            "rule_finetune_wildcards_nlu_t_m_lora_2": "4243",
            "rule_other_wildcards_x": "1",
        }

    stages, _ = status.collect(cfg, tmp_path, queue=queue)
    assert stages["finetune/nlu"].running == [
        ("nlu/t/m/lora/seed0", "4242"),
        ("nlu/t/m/lora/seed1", "77"),
        ("nlu/t/m/lora/seed2", "4243"),
    ]
    assert stages["finetune/nlu"].missing == 1  # seed3
    assert asked == [tmp_path]  # asked once
    text = status.render(stages)
    assert "RUNNING finetune/nlu nlu/t/m/lora/seed0 (cluster job 4242)" in text
    assert status.slurm_comment("recursive_run", ["a/b"]) == "rule_recursive_run_wildcards_a_b"


def test_a_preempted_run_that_made_progress_requeues_its_slurm_job(monkeypatch):
    # the requeue makes the process ignore SLURM's SIGTERM to its step: keep that in this test
    monkeypatch.setattr(resume.signal, "signal", lambda *_: None)
    calls = []

    def scontrol(cmd, **_kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    slurm = {"SLURM_JOB_ID": "123"}
    progressed = resume.Preempted("SIGTERM during training: checkpoint at step 40 written", progressed=True)
    assert resume.requeue_after_progress(progressed, slurm, scontrol) == "123"
    assert calls == [["scontrol", "requeue", "123"]]
    # no progress since the last checkpoint: exit 75, and the workflow's bounded retries decide
    stalled = resume.Preempted("SIGTERM during training: checkpoint at step 20 written", progressed=False)
    assert resume.requeue_after_progress(stalled, slurm, scontrol) is None
    assert resume.requeue_after_progress(progressed, {}, scontrol) is None  # not in SLURM
    assert resume.requeue_after_progress(MemoryError(), slurm, scontrol) is None
    assert len(calls) == 1

    def refused(cmd, **_kw):
        return subprocess.CompletedProcess(
            cmd, 1, "", "scontrol: error: Requested operation is presently disabled"
        )

    assert resume.requeue_after_progress(progressed, slurm, refused) is None  # then exit 75 and retry


def test_the_plugins_failing_account_guess_is_not_shown():
    logger = logging.getLogger("test_cluster_edges.plugin")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger.addHandler(Keep())
    logger.propagate = False
    quiet_account_guess(logger.name)
    quiet_account_guess(logger.name)  # once
    logger.warning("No SLURM account given, trying to guess.")
    logger.warning(
        "No account was given, not able to get a SLURM account via sacct: sacct: invalid option -- '1'"
    )
    logger.warning("Unable to guess SLURM account. Trying to proceed without.")
    logger.warning("Job 1 has been submitted with SLURM jobid 11")
    assert seen == ["Job 1 has been submitted with SLURM jobid 11"]
    assert len(logger.filters) == 1
