# Config -> run list. The config is checked before any job runs: first by the library (one line
# naming the key and the problem), then by Snakemake against the same JSON schema.
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

import lamda_repro.recursive  # registers the check of the config's recursive section
from lamda_repro import warm
from lamda_repro.cluster import (
    build_model_is_local,
    job_resources,
    launcher,
    multinode_resources,
    quiet_account_guess,
    run_nodes,
    unsatisfiable,
)
from lamda_repro.config import ConfigError, expand_runs, load_config, record_path, validate_config
from lamda_repro.report_cli import aggregate_outputs

try:
    load_config(*workflow.configfiles)  # Snakemake's own YAML reading keeps duplicate keys' last value
    CFG = validate_config(config)
except ConfigError as exc:
    sys.exit(f"config error: {exc}")
validate(config, "../schemas/config.schema.yaml")

WORKDIR = CFG["workdir"]
# No account in the config: SLURM jobs use the user's default account, without the executor
# plugin's failing sacct guess on the screen (lamda_repro/cluster.py quiet_account_guess).
if not (CFG.get("cluster") or {}).get("account"):
    quiet_account_guess()

# Warm starts (lamda_repro/warm.py): with `warm_start: true`, offline, and jobs run by this
# Snakemake process (not a cluster), heavy jobs fork from a server that has torch & co. imported.
# The executor is not known while this file is read (local_exec is True then even for SLURM): the
# Snakefile's onstart turns warm starts off again before anything is submitted to a cluster.
WARM = bool(CFG.get("warm_start")) and CFG["offline"] and workflow.local_exec and not workflow.remote_exec
if WARM and not workflow.dryrun:
    warm.enable_for_jobs()
RESULTS = CFG["results_dir"]
LOGS = CFG["logs_dir"]
RUNS = {spec.run_id: spec for spec in expand_runs(CFG)}

# Optional stages add their targets here.
EXTRA_TARGETS = []


wildcard_constraints:
    experiment=r"[^/]+",
    task=r"[^/]+",
    model=r"[^/]+",
    method=r"[^/]+",
    seed=r"\d+",
    dataset=r"[^/]+",


def cluster_jobs():
    """(rule, resources, threads) of the jobs this run submits to SLURM; none for other executors
    and inside a cluster job (called once the jobs are known: onstart in the Snakefile)."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm" or workflow.remote_exec:
        return []
    return [(job.rule.name, dict(job.resources), job.threads) for job in workflow.dag.needrun_jobs() if not job.is_local]


def run_record(spec):
    return record_path(RESULTS, spec.run_id)


def run_spec(wildcards):
    run_id = f"{wildcards.experiment}/{wildcards.task}/{wildcards.model}/{wildcards.method}/seed{wildcards.seed}"
    if run_id not in RUNS:
        raise ValueError(f"no run {run_id!r} in the config")
    return RUNS[run_id]


def run_gpus(spec):
    """GPUs of one fine-tuning run (`training.gpus`, default 1)."""
    return int(spec.training.get("gpus", 1))


def finetune_resources():
    """Cluster resources of the finetune rule (lamda_repro/cluster.py); a GPU job asks for its
    run's `training.gpus`, on `training.nodes` nodes."""
    res = job_resources(CFG, "finetune")
    if res["gpu"]:
        res["gpu"] = lambda w: run_gpus(run_spec(w))
        if any(run_nodes(spec.training) > 1 for spec in RUNS.values()):
            res.update(multinode_resources(res, lambda w: run_spec(w).training))
    return res


def recursive_run_resources():
    """Cluster resources of the recursive_run rule: a GPU job asks for `recursive.launch.gpus` on
    `recursive.launch.nodes` nodes (the same request as a fine-tuning run of that size)."""
    res = job_resources(CFG, "recursive_run")
    launch = (REC or {}).get("launch", {})
    if res["gpu"]:
        res["gpu"] = int(launch.get("gpus", 1))
        if run_nodes(launch) > 1:
            res.update(multinode_resources(res, lambda w: launch))
    return res


def data_files(name):
    return [f"{WORKDIR}/data/{name}/train.jsonl", f"{WORKDIR}/data/{name}/validation.jsonl"]


def model_artifact(name):
    """The built-model marker for models built from configs; nothing for loaded ones."""
    if CFG["models"][name]["source"] == "build":
        return [f"{WORKDIR}/models/{name}/config.json"]
    return []


def run_inputs(wildcards):
    spec = run_spec(wildcards)
    inputs = model_artifact(spec.model) + PREFLIGHT
    if "data" in spec.task_params:
        inputs += data_files(spec.task_params["data"])
    return inputs


def all_records():
    return [run_record(spec) for spec in RUNS.values()]


def families():
    return sorted({spec.family for spec in RUNS.values()})


def all_targets():
    return all_records() + report_outputs() + EXTRA_TARGETS


# -- aggregation (report.smk) ----------------------------------------------------------------
# The papers' numbers are part of the repository: read from results/reference/ whatever the
# config's results_dir (the paper config writes its outputs elsewhere).
REFERENCE = "results/reference/papers.yaml"


def report_outputs():
    return aggregate_outputs(RESULTS, families())


def _caption(path):
    """(caption file, report category) of an output shown in the HTML report."""
    name = Path(path).name
    stem = name.rsplit(".", 1)[0]
    if stem == "claims":
        return "../report/claims.rst", "Claims"
    if stem == "measurements":
        return "../report/table_measurements.rst", "Tables"
    if stem == "smoke_checks":
        return "../report/table_smoke_checks.rst", "Tables"
    if name == "runs.csv":
        return "../report/table_runs.rst", "Tables"
    if stem == "recursive":
        return "../report/table_recursive.rst", "Recursive Transformers"
    if stem == "lamda_bench":
        return "../report/bench.rst", "LaMDA benchmark"
    if "_quality_vs_" in name:
        axis = stem.split("_quality_vs_")[1]
        return f"../report/figure_quality_{axis}.rst", "Figures"
    return "../report/table_family.rst", "Tables"


def _reported(paths):
    """The report shows PNG figures and HTML pages in place and offers CSV files as downloads;
    Markdown (shown through its HTML page, rule report_pages), LaTeX and PDF stay plain files."""
    out = []
    for p in paths:
        if p.endswith((".png", ".html", ".csv")):
            caption, category = _caption(p)
            out.append(report(p, caption=caption, category=category))
        else:
            out.append(p)
    return out


def report_markdown():
    """The Markdown outputs that get an HTML page for the report (rule report_pages)."""
    pages = [p for p in report_outputs() if p.endswith(".md")]
    if REC:
        pages.append(RECURSIVE_TABLE["md"])
    if BENCH_ENABLED:
        pages.append(BENCH_OUT["md"])
    return pages


def bench_records():
    return [BENCH_OUT["json"]] if BENCH_ENABLED else []


def recursive_records():
    return [f"{RESULTS}/runs/recursive/{rid}.json" for rid in REC_RUNS]


# -- early exit and serving (serving.smk defines SERVING, EE_RUNS, SERVING_RECORD) ----------
def early_exit_record(rid):
    return f"{RESULTS}/runs/early_exit/{rid}.json"


def serving_records():
    """Records the claims ledger reads (aggregate inputs)."""
    return [early_exit_record(rid) for rid in EE_RUNS] + ([SERVING_RECORD] if SERVING else [])


def serving_inputs(wildcards):
    inputs = {
        "early_exit": [early_exit_record(rid) for rid in SERVING["runs"]],
        "vanilla": f"{RESULTS}/runs/recursive/{SERVING['vanilla']}.json",
        "artifacts": run_artifacts(REC, SERVING["vanilla"], WORKDIR),
        "reference": REFERENCE,
    }
    if SERVING["paper_estimate"] and SERVING["paper_estimate"]["latency_tables"]:  # a roofline needs no file
        inputs["latency"] = str(latency_table_path(SERVING["paper_estimate"]["latency_tables"]))
    return inputs
