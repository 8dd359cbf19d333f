# Aggregation: every run record -> paper-style tables, figures and the claims ledger, all of
# which go into the Snakemake HTML report (`snakemake --report results/report.html`).
rule aggregate:
    input:
        records=all_records(),
        recursive=recursive_records(),
        bench=bench_records(),
        reference=REFERENCE,
    output:
        _reported(report_outputs()),
    params:
        families=",".join(families()),
        runs_dir=lambda w, input: Path(input.reference).parents[1] / "runs",
        bench_dir=lambda w, input: Path(input.reference).parents[1] / "bench",
        out=lambda w, input: Path(input.reference).parents[1],
    log:
        "logs/aggregate.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro aggregate --runs-dir {params.runs_dir} --bench-dir {params.bench_dir}"
        " --reference {input.reference} --out {params.out} --families {params.families} > {log} 2>&1"
