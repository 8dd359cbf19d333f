# Recursive Transformers: corpus -> (tiny) pretrained model -> one job per run -> table and figure.
# The config section is `recursive:` (schema: workflow/schemas/recursive.schema.yaml).
from pathlib import Path

from lamda_repro.recursive.runner import (
    RecursiveRunError,
    base_artifacts,
    relaxed_models,
    resolve_section,
    run_artifacts,
    run_job_inputs,
    token_manifest,
    tokenize_inputs,
)
from lamda_repro.recursive.runner import run_id as recursive_run_id

REC_RAW = config.get("recursive") or {}
try:
    REC = resolve_section(REC_RAW) if REC_RAW and REC_RAW.get("enabled", True) else None
except (ConfigError, RecursiveRunError, ValueError) as exc:
    sys.exit(f"config error: {exc}")
REC_JSON = json.dumps(REC_RAW, sort_keys=True)
# (its references into the config's data and models sections are checked by validate_config,
# in common.smk, as by `lamda-repro validate`)
REC_RUNS = {recursive_run_id(run): run for run in REC["runs"]} if REC else {}


wildcard_constraints:
    rec_run=r"[^/]+",
    rec_tokens=r"[^/]+",
    rec_model=r"[^/]+",


RECURSIVE_TABLE = {ext: f"{RESULTS}/tables/recursive.{ext}" for ext in ("md", "csv", "tex")}
RECURSIVE_FIGURE = f"{RESULTS}/figures/recursive_accuracy_vs_params.png"
# Relative weight error of every relaxation and budget, per model with relaxed runs (no training).
RELAX_ERROR = f"{RESULTS}/tables/recursive_relax_error/{{rec_model}}"
if REC:
    EXTRA_TARGETS += [*RECURSIVE_TABLE.values(), RECURSIVE_FIGURE]
    EXTRA_TARGETS += [f"{RESULTS}/tables/recursive_relax_error/{m}.md" for m in relaxed_models(REC)]


rule recursive_corpus:
    input:
        lambda w: (data_files(REC["corpus"]["data"]) if REC["corpus"].get("data") else []) + PREFLIGHT,
    output:
        f"{WORKDIR}/recursive/corpus/corpus.json",
    params:
        section=REC_JSON,
        workdir=lambda w, output: Path(output[0]).parents[2],
    log:
        f"{LOGS}/recursive/corpus.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro recursive-corpus --section-json {params.section:q}"
        " --workdir {params.workdir:q} > {log:q} 2>&1"


# The tokenize stage (docs/recursive.md, "Uptraining data"): the corpus read once per tokenizer into
# token shards + manifest, shared by every run whose model loads that tokenizer. A CPU job.
rule recursive_tokenize:
    input:
        lambda w: tokenize_inputs(REC, w.rec_tokens, WORKDIR),
    output:
        f"{WORKDIR}/recursive/tokens/{{rec_tokens}}/manifest.json",
    params:
        section=REC_JSON,
        workdir=lambda w, output: Path(output[0]).parents[3],
        online="" if CFG.get("offline", True) else "--online",
    threads: (REC["corpus"].get("tokenize_workers") if REC else None) or max(1, CFG["threads"])
    resources:
        **job_resources(CFG, "recursive_tokenize"),
    log:
        f"{LOGS}/recursive/tokenize/{{rec_tokens}}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro {params.online:q} recursive-tokenize --section-json {params.section:q}"
        " --tokens {wildcards.rec_tokens:q} --workdir {params.workdir:q}"
        " --workers {threads:q} > {log:q} 2>&1"


rule recursive_pretrain:
    input:
        f"{WORKDIR}/recursive/corpus/corpus.json",
        str(token_manifest(WORKDIR, "corpus")),
    output:
        f"{WORKDIR}/recursive/models/{{rec_model}}/model.safetensors",
    params:
        section=REC_JSON,
        workdir=lambda w, output: Path(output[0]).parents[3],
        device=CFG["device"],
        online="" if CFG.get("offline", True) else "--online",
    threads: max(1, CFG["threads"])
    resources:
        **job_resources(CFG, "recursive_pretrain"),
    log:
        f"{LOGS}/recursive/pretrain/{{rec_model}}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro {params.online:q} recursive-pretrain --section-json {params.section:q}"
        " --model {wildcards.rec_model:q} --workdir {params.workdir:q} --device {params.device:q}"
        " --threads {threads:q} > {log:q} 2>&1"


rule recursive_run:
    input:
        lambda w: run_job_inputs(REC, w.rec_run, WORKDIR, RESULTS) + PREFLIGHT,
    output:
        f"{RESULTS}/runs/recursive/{{rec_run}}.json",
    params:
        section=REC_JSON,
        workdir=lambda w, input: Path(input[0]).parents[2],
        device=CFG["device"],
        online="" if CFG.get("offline", True) else "--online",
        launcher=launcher(
            REC["launch"] if REC else {},
            CFG["device"],
            job_resources(CFG, "recursive_run").get("cpus_per_gpu", 8),
        ),
    threads: max(1, CFG["threads"])
    resources:
        **recursive_run_resources(),
    log:
        f"{LOGS}/recursive/run/{{rec_run}}.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.launcher} lamda-repro {params.online:q} recursive-run --section-json {params.section:q}"
        " --run {wildcards.rec_run:q} --out {output:q} --workdir {params.workdir:q} --device {params.device:q}"
        " --threads {threads:q} --keep-going > {log:q} 2>&1"


rule recursive_relax_error:
    input:
        lambda w: base_artifacts(REC, w.rec_model, WORKDIR) + PREFLIGHT,
    output:
        md=f"{RELAX_ERROR}.md",
        csv=f"{RELAX_ERROR}.csv",
    params:
        section=REC_JSON,
        workdir=WORKDIR,
        stem=lambda w, output: output.md[: -len(".md")],
        online="" if CFG.get("offline", True) else "--online",
    threads: 1
    resources:
        **job_resources(CFG, "recursive_relax_error"),
    log:
        f"{LOGS}/recursive/relax_error/{{rec_model}}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro {params.online:q} recursive-relax-error --section-json {params.section:q}"
        " --model {wildcards.rec_model:q} --workdir {params.workdir:q} --threads {threads:q}"
        " --out-stem {params.stem:q} > {log:q} 2>&1"


rule recursive_table:
    input:
        records=[f"{RESULTS}/runs/recursive/{rid}.json" for rid in REC_RUNS],
        reference=REFERENCE,
    output:
        **RECURSIVE_TABLE,
        figure=report(RECURSIVE_FIGURE, category="Recursive Transformers"),
    params:
        stem=lambda w, output: output.md[: -len(".md")],
    log:
        f"{LOGS}/recursive/table.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro recursive-table --records {input.records:q} --out-stem {params.stem:q}"
        " --figure {output.figure:q} --reference {input.reference:q} > {log:q} 2>&1"
