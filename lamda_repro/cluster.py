"""Cluster resources of the workflow's jobs, sized from the config.

The rules set these in their ``resources:`` (workflow/rules/*.smk), so that they apply with any
executor profile: the suite's ``slurm/`` profile, a site's own ``slurm`` profile, or none. A
command-line override of one key (``--set-resources finetune:runtime=1440``) changes that key
only, and ``--default-resources`` (a partition, an account) never removes them.

Sizes come from the config's ``scale`` (smoke or paper) and ``device`` (a ``cpu`` config asks
for no GPU, so a CPU-only cluster or a smoke run through SLURM needs no other switch); the
optional ``cluster:`` section overrides any of them and adds the site's partition, account,
QoS, GPU model and node constraint (documented in config/README.md).
"""

from __future__ import annotations

from typing import Any

# The rules that run as cluster jobs, with their sizes per scale: (mem_mb, runtime in minutes).
# GPU rules train or evaluate models; the others are CPU jobs (a weight-error table).
JOB_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "smoke": {
        "finetune": (4000, 30),
        "recursive_pretrain": (4000, 60),
        "recursive_run": (4000, 60),
        "recursive_relax_error": (4000, 30),
        "recursive_tokenize": (4000, 30),
        "recursive_early_exit": (4000, 30),
        "recursive_serve": (4000, 60),
        "bench": (16000, 60),
    },
    "paper": {
        "finetune": (64000, 720),
        "recursive_pretrain": (64000, 1440),
        "recursive_run": (128000, 4320),
        "recursive_relax_error": (64000, 240),
        "recursive_tokenize": (32000, 1440),
        "recursive_early_exit": (64000, 720),
        "recursive_serve": (64000, 240),
        "bench": (64000, 60),
    },
}
GPU_RULES = frozenset(
    {"finetune", "recursive_pretrain", "recursive_run", "recursive_early_exit", "recursive_serve", "bench"}
)
# Training rules checkpoint and stop on SIGTERM (lamda_repro/resume.py). SLURM sends it to the
# job's steps this many seconds before the time limit (sbatch --signal=TERM@<s>), so the run
# writes a checkpoint and exits 75 in time, and the retry resumes from it.
RESUMABLE_RULES = frozenset({"finetune", "recursive_pretrain", "recursive_run"})
SIGNAL_BEFORE_LIMIT_S = {"smoke": 60, "paper": 600}
# Rules light enough to run where Snakemake runs (no scheduler round trip): data generation,
# the tiny models built from configs (a word-level tokenizer and random weights, seconds), the
# corpus, aggregation, tables, report pages.
LOCAL_RULES = (
    "all",
    "prepare_data",
    "build_model",
    "recursive_corpus",
    "recursive_table",
    "aggregate",
    "report_pages",
)
# cluster: key -> the SLURM executor plugin's resource name
SITE_KEYS = {
    "partition": "slurm_partition",
    "account": "slurm_account",
    "qos": "qos",
    "gpu_model": "gpu_model",
    "constraint": "constraint",
}


def launcher(training: dict[str, Any], device: str) -> list[str]:
    """The command a fine-tuning run is started with before ``lamda-repro run``: torchrun with one
    process per GPU of one node when ``training.gpus`` > 1 (the Trainer then trains with DDP, or
    FSDP with ``training.distributed: fsdp``); nothing for one GPU or a CPU run."""
    gpus = int(training.get("gpus", 1))
    if gpus <= 1 or device == "cpu":
        return []
    return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "--no-python"]


def job_resources(
    cfg: dict[str, Any],
    rule: str,
    gpus: int | None = None,
    device: str | None = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The ``resources:`` of one rule: gpu, cpus_per_gpu (GPU jobs) or cpus_per_task (CPU jobs),
    mem_mb, runtime, and the site keys set in ``cluster:``. ``gpus`` is the run's own GPU count
    (``training.gpus`` of a fine-tuning run; None takes the config's), ``device`` the job's own
    device where it has one (the bench's), ``sizes`` a stage's own mem_mb / runtime defaults."""
    cluster = cfg.get("cluster") or {}
    scale = cfg.get("scale", "smoke")
    mem_mb, runtime = JOB_SIZES[scale][rule]
    if sizes:
        mem_mb, runtime = sizes.get("mem_mb", mem_mb), sizes.get("runtime", runtime)
    own = (cluster.get("jobs") or {}).get(rule, {})
    on_gpu = rule in GPU_RULES and (device or cfg.get("device", "auto")) != "cpu"
    if not on_gpu:
        n_gpu = 0
    elif gpus is not None:
        n_gpu = gpus
    else:
        n_gpu = int(own.get("gpus", cluster.get("gpus", 1)))
    res: dict[str, Any] = {
        "mem_mb": int(own.get("mem_mb", mem_mb)),
        "runtime": int(own.get("runtime", runtime)),
    }
    if n_gpu > 0:
        res["gpu"] = n_gpu
        res["cpus_per_gpu"] = int(own.get("cpus_per_gpu", cluster.get("cpus_per_gpu", 8)))
    else:
        res["gpu"] = 0
        res["cpus_per_task"] = int(own.get("cpus", cluster.get("cpus", max(1, cfg.get("threads", 1) or 1))))
    if rule in RESUMABLE_RULES:
        res["slurm_extra"] = f"--signal=TERM@{SIGNAL_BEFORE_LIMIT_S[scale]}"
    for key, resource in SITE_KEYS.items():
        value = own.get(key, cluster.get(key))
        if value not in (None, ""):
            if key == "gpu_model" and n_gpu == 0:
                continue
            res[resource] = str(value)
    return res
