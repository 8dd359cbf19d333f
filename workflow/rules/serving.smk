# Early exit and serving (docs/serving.md): early-exit post-training of every recursive run with
# `early_exit`, then ONE job that measures the real engine (static / CSB / CDB, with and without
# early exit) and the simulator side by side, and writes the serving table and figure.
# Config: `recursive.early_exit`, `recursive.runs[].early_exit`, `recursive.serving`
# (schema: workflow/schemas/recursive.schema.yaml).
import re

from lamda_repro.recursive.serving.config import ServingConfigError, latency_table_path, resolve_serving

try:
    SERVING = resolve_serving(REC) if REC else None
except (ConfigError, ServingConfigError, ValueError) as exc:
    sys.exit(f"config error: {exc}")
EE_RUNS = [rid for rid, run in REC_RUNS.items() if run.get("early_exit")]
SERVING_RECORD = f"{RESULTS}/runs/serving/serving.json"
SERVING_TABLE = {ext: f"{RESULTS}/tables/serving.{ext}" for ext in ("md", "csv", "tex")}
SERVING_FIGURE = f"{RESULTS}/figures/serving_throughput_vs_threshold.png"
ONLINE_FLAG = "" if CFG.get("offline", True) else "--online"
if SERVING:
    EXTRA_TARGETS += [SERVING_RECORD, *SERVING_TABLE.values(), SERVING_FIGURE]


wildcard_constraints:
    ee_run="|".join(re.escape(rid) for rid in EE_RUNS) or r"(?!)",


rule recursive_early_exit:
    input:
        record=f"{RESULTS}/runs/recursive/{{ee_run}}.json",
        artifacts=lambda w: run_artifacts(REC, w.ee_run, WORKDIR),
    output:
        early_exit_record("{ee_run}"),
    params:
        section=REC_JSON,
        workdir=WORKDIR,
        device=CFG["device"],
        online=ONLINE_FLAG,
    threads: max(1, CFG["threads"])
    resources:
        **job_resources(CFG, "recursive_early_exit"),
    log:
        f"{LOGS}/recursive/early_exit/{{ee_run}}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro {params.online:q} recursive-early-exit"
        " --section-json {params.section:q} --run {wildcards.ee_run:q} --source-record {input.record:q}"
        " --out {output:q} --workdir {params.workdir:q} --device {params.device:q} --threads {threads:q}"
        " --keep-going > {log:q} 2>&1"


rule recursive_serve:
    input:
        unpack(serving_inputs),
    output:
        record=SERVING_RECORD,
        md=SERVING_TABLE["md"],
        csv=SERVING_TABLE["csv"],
        tex=SERVING_TABLE["tex"],
        figure=report(SERVING_FIGURE, category="Recursive Transformers"),
    params:
        section=REC_JSON,
        workdir=WORKDIR,
        stem=lambda w, output: output.md[: -len(".md")],
        device=CFG["device"],
        online=ONLINE_FLAG,
    threads: max(1, CFG["threads"])
    resources:
        **job_resources(CFG, "recursive_serve"),
    log:
        f"{LOGS}/recursive/serving.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro {params.online:q} recursive-serve --section-json {params.section:q}"
        " --early-exit-records {input.early_exit:q} --vanilla-record {input.vanilla:q}"
        " --out {output.record:q} --table-stem {params.stem:q} --figure {output.figure:q} --reference {input.reference:q}"
        " --workdir {params.workdir:q} --device {params.device:q} --threads {threads:q} --keep-going > {log:q} 2>&1"
