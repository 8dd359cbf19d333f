# Generated data sets, built (and pretrained) tiny models, and one job per fine-tuning run.


rule prepare_data:
    output:
        f"{WORKDIR}/data/{{dataset}}/train.jsonl",
        f"{WORKDIR}/data/{{dataset}}/validation.jsonl",
    params:
        entry=lambda w: json.dumps(CFG["data"][w.dataset], sort_keys=True),
        out_dir=lambda w: f"{WORKDIR}/data/{w.dataset}",
    log:
        f"{LOGS}/prepare_data/{{dataset}}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro prepare-data --entry {params.entry:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule build_model:
    input:
        lambda w: data_files(CFG["models"][w.model]["tokenizer"]["data"]),
    output:
        f"{WORKDIR}/models/{{model}}/config.json",
    params:
        entry=lambda w: json.dumps(CFG["models"][w.model], sort_keys=True),
        workdir=lambda w, output: Path(output[0]).parents[2],
    threads: max(1, CFG["threads"])
    resources:
        **job_resources(CFG, "build_model"),
    # pretraining is training: a cluster job, never on the login node
    localrule: build_model_is_local(CFG)
    log:
        f"{LOGS}/build_model/{{model}}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro build-model --name {wildcards.model:q} --entry {params.entry:q}"
        " --workdir {params.workdir:q} --data-files {input:q} --threads {threads:q} > {log:q} 2>&1"


rule finetune:
    input:
        run_inputs,
    output:
        f"{RESULTS}/runs/{{experiment}}/{{task}}/{{model}}/{{method}}/seed{{seed}}.json",
    params:
        spec=lambda w: json.dumps(run_spec(w).to_dict(), sort_keys=True),
        device=CFG["device"],
        offline="" if CFG["offline"] else "--online",
        workdir=WORKDIR,
        launcher=lambda w: launcher(
            run_spec(w).training, CFG["device"], job_resources(CFG, "finetune").get("cpus_per_gpu", 8)
        ),
    threads: max(1, CFG["threads"])
    resources:
        **finetune_resources(),
    log:
        f"{LOGS}/finetune/{{experiment}}/{{task}}/{{model}}/{{method}}/seed{{seed}}.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.launcher} lamda-repro run --spec {params.spec:q} --out {output:q} --workdir {params.workdir:q}"
        " --device {params.device:q} --threads {threads:q} {params.offline:q} > {log:q} 2>&1"
