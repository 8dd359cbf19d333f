# Aggregation: the records of the runs in the config -> paper-style tables, figures and the claims ledger, all of
# which go into the Snakemake HTML report (`snakemake --report results/report.html`).
rule aggregate:
    input:
        records=all_records(),
        recursive=recursive_records(),
        serving=serving_records(),
        bench=bench_records(),
        reference=REFERENCE,
    output:
        _reported(report_outputs()),
    params:
        families=",".join(families()),
        # folders derived from the results folder (functions, so that no path prefix is hard-coded)
        runs_dir=lambda w: f"{RESULTS}/runs",
        bench_dir=lambda w: f"{RESULTS}/bench",
        out=lambda w: RESULTS,
        # named in the rerun command of a damaged record's error
        configfiles=lambda w: [str(f) for f in workflow.configfiles],
    # the figures are drawn in two forked processes while the tables are written (the last job
    # of a run: both cores are free by then)
    threads: 2
    log:
        f"{LOGS}/aggregate.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro aggregate --runs-dir {params.runs_dir:q} --bench-dir {params.bench_dir:q}"
        " --reference {input.reference:q} --out {params.out:q} --families {params.families:q} --workers {threads:q}"
        " --records {input.records:q} {input.recursive:q} {input.serving:q}"
        " --configfile {params.configfiles:q} 2>&1 | tee {log:q}"


# The report displays images, HTML and PDF and offers other files as downloads, so every Markdown
# output (tables, claims ledger, recursive table, LaMDA benchmark) gets an HTML page beside it.
REPORT_PAGES = [p.removesuffix(".md") + ".html" for p in report_markdown()]
EXTRA_TARGETS += REPORT_PAGES


rule report_pages:
    input:
        report_markdown(),
    output:
        _reported(REPORT_PAGES),
    log:
        f"{LOGS}/report_pages.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro report-pages {input:q} > {log:q} 2>&1"
