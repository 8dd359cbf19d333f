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

import shlex
from typing import Any, Callable

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
        "build_model": (4000, 30),
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
        "build_model": (16000, 120),
    },
}
GPU_RULES = frozenset(
    {"finetune", "recursive_pretrain", "recursive_run", "recursive_early_exit", "recursive_serve", "bench"}
)
# Training rules checkpoint and stop on SIGTERM (lamda_repro/resume.py). SLURM sends it to the
# job's steps this many seconds before the time limit (sbatch --signal=TERM@<s>), so the run
# writes a checkpoint in time. When that checkpoint is ahead of where the attempt started, the
# run requeues its own job (scontrol requeue; sbatch --requeue allows it): the same job runs
# again and resumes, without using one of the workflow's `retries`. Without progress it exits
# 75, and Snakemake's retries (bounded) submit it again.
RESUMABLE_RULES = frozenset({"finetune", "recursive_pretrain", "recursive_run"})
SIGNAL_BEFORE_LIMIT_S = {"smoke": 60, "paper": 600}
# Rules light enough to run where Snakemake runs (no scheduler round trip): data generation, the
# corpus, aggregation, tables, report pages; the Hub preflight (it needs the login node's internet).
# Building a tiny model is local too unless it is pretrained (training: a cluster job, never on
# the login node; build_model_is_local).
LOCAL_RULES = (
    "all",
    "preflight",
    "prepare_data",
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


def build_model_is_local(cfg: dict[str, Any]) -> bool:
    """Whether the build_model rule runs where Snakemake runs: only when no model built from the
    config is pretrained (a tokenizer and random weights take seconds; pretraining is training)."""
    models = cfg.get("models") or {}
    return not any(m.get("source") == "build" and m.get("pretrain") for m in models.values())


# The c10d rendezvous of a multi-node run listens on this port of the allocation's first node.
RENDEZVOUS_PORT = 29500
# The allocation's first node, as the job's shell finds it (SLURM lists the nodes in order).
FIRST_NODE = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'


def run_nodes(training: dict[str, Any]) -> int:
    """Nodes of one fine-tuning run (``training.nodes``, default 1)."""
    return int(training.get("nodes", 1))


def launcher(training: dict[str, Any], device: str, cpus_per_gpu: int = 8) -> str:
    """The shell prefix a fine-tuning run is started with before ``lamda-repro run``.

    One node, ``training.gpus`` > 1: torchrun with one process per GPU (the Trainer then trains with
    DDP, or FSDP with ``training.distributed: fsdp``). ``training.nodes`` > 1: ``srun`` starts one
    torchrun per node of the allocation (``--ntasks-per-node=1``, all the node's CPUs), and the
    torchruns meet at a c10d rendezvous on the allocation's first node, keyed by the job id.
    Nothing for one GPU on one node or a CPU run."""
    gpus, nodes = int(training.get("gpus", 1)), run_nodes(training)
    if device == "cpu" or gpus * nodes <= 1:
        return ""
    if nodes == 1:
        return shlex.join(["torchrun", "--standalone", f"--nproc-per-node={gpus}", "--no-python"])
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={gpus * cpus_per_gpu}"]
    srun.append("--kill-on-bad-exit=1")
    torchrun = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={gpus}", "--rdzv-backend=c10d"]
    return (
        f'{shlex.join(srun + torchrun)} --rdzv-id="$SLURM_JOB_ID" '
        f"--rdzv-endpoint={FIRST_NODE}:{RENDEZVOUS_PORT} --no-python"
    )


def multinode_resources(res: dict[str, Any], training_of: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Per-job overrides of a GPU rule's resources for runs that may span nodes.

    ``training_of(wildcards)`` gives a job's run settings. A one-node job keeps ``gpu`` (sbatch
    --gpus, the job's total); a job of N > 1 nodes asks for N nodes with G GPUs on each
    (``--gres=gpu[:model]:G``: ``--gpus`` would let SLURM spread the total unevenly) and one task per
    node, and is an ``mpi`` job for the SLURM executor, so the job runs its own ``srun`` (the
    launcher) instead of being started in a one-task step."""
    model = res.get("gpu_model")
    extra = res.get("slurm_extra", "")

    def nodes(w) -> int:
        return run_nodes(training_of(w))

    def gpus(w) -> int:
        return int(training_of(w).get("gpus", 1))

    def gres(w) -> str:
        if nodes(w) == 1:
            return ""
        return f"gpu:{model}:{gpus(w)}" if model else f"gpu:{gpus(w)}"

    out: dict[str, Any] = {
        "nodes": nodes,
        "gpu": lambda w: gpus(w) if nodes(w) == 1 else 0,
        "gres": gres,
        "tasks": nodes,  # one task per node: srun starts one torchrun on each
        "tasks_per_gpu": 0,  # no --ntasks-per-gpu
        "mpi": lambda w: "srun" if nodes(w) > 1 else "",
        "slurm_extra": lambda w: f"{extra} --ntasks-per-node=1".strip() if nodes(w) > 1 else extra,
    }
    if model:
        out["gpu_model"] = lambda w: model if nodes(w) == 1 else ""
    return out


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
    # `device: cpu` in the config means no GPU anywhere, whatever a stage's own device says
    on_gpu = rule in GPU_RULES and "cpu" not in (cfg.get("device", "auto"), device)
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
        res["slurm_extra"] = f"--signal=TERM@{SIGNAL_BEFORE_LIMIT_S[scale]} --requeue"
    for key, resource in SITE_KEYS.items():
        value = own.get(key, cluster.get(key))
        if value not in (None, ""):
            if key == "gpu_model" and n_gpu == 0:
                continue
            res[resource] = str(value)
    return res


# ------------------------------------------------------------------------- check before submitting
# Answers of `sbatch --test-only` that say SLURM could not be asked, not that it refused.
_UNREACHABLE = ("Unable to contact", "Socket timed out", "Connection refused", "Zero Bytes were transmitted")


def sbatch_request(resources: dict[str, Any], threads: int = 1) -> list[str]:
    """The sbatch options of one job's request, as the SLURM executor plugin passes them: partition,
    account, QoS, constraint, runtime, memory, nodes, GPUs (with their model) and CPUs."""
    args: list[str] = []
    for key, flag in (("slurm_partition", "-p"), ("slurm_account", "-A"), ("constraint", "-C")):
        if resources.get(key) not in (None, ""):
            args += [flag, str(resources[key])]
    if resources.get("qos") not in (None, ""):
        args.append(f"--qos={resources['qos']}")
    if resources.get("runtime"):
        args += ["-t", str(resources["runtime"])]
    if resources.get("mem_mb_per_cpu"):
        args += ["--mem-per-cpu", str(resources["mem_mb_per_cpu"])]
    elif resources.get("mem_mb"):
        args += ["--mem", str(resources["mem_mb"])]
    if int(resources.get("nodes") or 1) > 1:
        args += ["-N", str(resources["nodes"])]
    gpus = int(resources.get("gpu") or 0)
    if resources.get("gpu_model"):
        args.append(f"--gpus={resources['gpu_model']}:{gpus or 1}")
    elif gpus:
        args.append(f"--gpus={gpus}")
    if resources.get("gres"):
        args.append(f"--gres={resources['gres']}")
    if resources.get("cpus_per_task"):
        if int(resources["cpus_per_task"]) >= 0:
            args.append(f"--cpus-per-task={max(1, int(resources['cpus_per_task']))}")
    elif (gpus or resources.get("gpu_model")) and resources.get("cpus_per_gpu"):
        args.append(f"--cpus-per-gpu={int(resources['cpus_per_gpu'])}")
    else:
        args.append(f"--cpus-per-task={max(1, int(threads))}")
    return args


def unsatisfiable(jobs: list[tuple[str, dict[str, Any], int]], run=None) -> str | None:
    """Ask SLURM (``sbatch --test-only``: nothing is submitted) whether it can ever run each
    distinct request of ``jobs`` ((rule, resources, threads) of the jobs about to be submitted).
    A request no node or partition can satisfy (more memory or CPUs than any node, a GPU on a
    cluster without GPUs, an unknown partition or GPU model) would be refused at submission or
    left pending forever; the answer is one line naming each such rule, its request and SLURM's
    reason, or None when every request fits (or SLURM cannot be reached: then submission tells)."""
    import subprocess

    run = run or subprocess.run
    asked: dict[tuple[str, ...], str] = {}
    refused: list[str] = []
    for rule, resources, threads in jobs:
        request = tuple(sbatch_request(resources, threads))
        if request in asked:
            continue
        try:
            proc = run(
                ["sbatch", "--test-only", *request, "--wrap", "true"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        answer = [line for line in (proc.stderr or "").splitlines() if line.strip()]
        reason = answer[-1] if answer else f"sbatch exit {proc.returncode}"
        asked[request] = reason
        if proc.returncode == 0:
            continue
        if any(marker in reason for marker in _UNREACHABLE):
            return None
        for prefix in ("sbatch: error: ", "allocation failure: "):
            reason = reason.removeprefix(prefix)
        refused.append(f"rule {rule} ({' '.join(request)}): {reason}")
    if not refused:
        return None
    return (
        "cluster error: SLURM can never run "
        + "; ".join(refused)
        + ". Nothing was submitted: change the request in the config's cluster: section"
        " (cluster.jobs.<rule>, config/README.md) or with --set-resources <rule>:<key>=<value>."
    )


# The SLURM executor plugin (2.8) guesses an account when none is given by running sacct with a
# shell pipe passed as arguments, which fails on every cluster and prints an sacct error; the job
# is then submitted without -A, i.e. with the user's default account, the outcome wanted anyway.
_ACCOUNT_GUESS = (
    "No SLURM account given, trying to guess",
    "No account was given, not able to get a SLURM account via sacct",
    "Unable to guess SLURM account",
)


class _AccountGuessFilter:
    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(_ACCOUNT_GUESS)


def quiet_account_guess(logger_name: str = "snakemake.logging") -> None:
    """Drop the plugin's account-guess messages (a config without ``cluster.account``: jobs use the
    user's default SLURM account); once per process."""
    import logging

    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _AccountGuessFilter) for f in logger.filters):
        logger.addFilter(_AccountGuessFilter())
