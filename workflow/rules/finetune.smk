# Generated data sets, built (and pretrained) tiny models, and one job per fine-tuning run.


rule prepare_data:
    output:
        f"{WORKDIR}/data/{{dataset}}/train.jsonl",
        f"{WORKDIR}/data/{{dataset}}/validation.jsonl",
    params:
        entry=lambda w: json.dumps(CFG["data"][w.dataset], sort_keys=True),
        out_dir=lambda w: f"{WORKDIR}/data/{w.dataset}",
    log:
        "logs/prepare_data/{dataset}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro prepare-data --entry {params.entry:q} --out-dir {params.out_dir} > {log} 2>&1"


rule build_model:
    input:
        lambda w: data_files(CFG["models"][w.model]["tokenizer"]["data"]),
    output:
        f"{WORKDIR}/models/{{model}}/config.json",
    params:
        entry=lambda w: json.dumps(CFG["models"][w.model], sort_keys=True),
        workdir=lambda w, output: Path(output[0]).parents[2],
    threads: max(1, CFG["threads"])
    log:
        "logs/build_model/{model}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro build-model --name {wildcards.model} --entry {params.entry:q}"
        " --workdir {params.workdir} --data-files {input} --threads {threads} > {log} 2>&1"


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
    threads: max(1, CFG["threads"])
    log:
        "logs/finetune/{experiment}/{task}/{model}/{method}/seed{seed}.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro run --spec {params.spec:q} --out {output} --workdir {params.workdir}"
        " --device {params.device} --threads {threads} {params.offline} > {log} 2>&1"
