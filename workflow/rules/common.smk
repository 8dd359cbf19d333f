# Config -> run list. The config is checked before any job runs: first by the library (one line
# naming the key and the problem), then by Snakemake against the same JSON schema.
import json
import sys

from snakemake.utils import validate

from lamda_repro.config import ConfigError, expand_runs, record_path, validate_config

try:
    CFG = validate_config(config)
except ConfigError as exc:
    sys.exit(f"config error: {exc}")
validate(config, "../schemas/config.schema.yaml")

WORKDIR = CFG["workdir"]
RESULTS = CFG["results_dir"]
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


def run_record(spec):
    return record_path(RESULTS, spec.run_id)


def run_spec(wildcards):
    run_id = f"{wildcards.experiment}/{wildcards.task}/{wildcards.model}/{wildcards.method}/seed{wildcards.seed}"
    if run_id not in RUNS:
        raise ValueError(f"no run {run_id!r} in the config")
    return RUNS[run_id]


def data_files(name):
    return [f"{WORKDIR}/data/{name}/train.jsonl", f"{WORKDIR}/data/{name}/validation.jsonl"]


def model_artifact(name):
    """The built-model marker for models built from configs; nothing for loaded ones."""
    if CFG["models"][name]["source"] == "build":
        return [f"{WORKDIR}/models/{name}/config.json"]
    return []


def run_inputs(wildcards):
    spec = run_spec(wildcards)
    inputs = model_artifact(spec.model)
    if "data" in spec.task_params:
        inputs += data_files(spec.task_params["data"])
    return inputs


def all_records():
    return [run_record(spec) for spec in RUNS.values()]


def families():
    return sorted({spec.family for spec in RUNS.values()})


def all_targets():
    return all_records() + report_outputs() + EXTRA_TARGETS
