# Aggregation: every run record -> paper-style tables, figures and the claims ledger, all of
# which go into the Snakemake HTML report (`snakemake --report results/report.html`).
from pathlib import Path

from lamda_repro.report_cli import aggregate_outputs

REFERENCE = f"{RESULTS}/reference/papers.yaml"


def report_outputs():
    return aggregate_outputs(RESULTS, families())


def _caption(path):
    name = Path(path).name
    if name == "claims.md":
        return "../report/claims.rst", "Claims"
    if name.startswith("measurements."):
        return "../report/table_measurements.rst", "Tables"
    if name == "runs.csv":
        return "../report/table_runs.rst", "Tables"
    if "_quality_vs_" in name:
        axis = name.split("_quality_vs_")[1].rsplit(".", 1)[0]
        return f"../report/figure_quality_{axis}.rst", "Figures"
    return "../report/table_family.rst", "Tables"


def _reported(paths):
    out = []
    for p in paths:
        caption, category = _caption(p)
        # PDFs and LaTeX stay as files; the report shows the PNG / Markdown / CSV twins.
        if p.endswith((".pdf", ".tex")):
            out.append(p)
        else:
            out.append(report(p, caption=caption, category=category))
    return out


def bench_records():
    return [BENCH_OUT["json"]] if BENCH_ENABLED else []


def recursive_records():
    return [f"{RESULTS}/runs/recursive/{rid}.json" for rid in REC_RUNS]


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
    log:
        "logs/aggregate.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro aggregate --runs-dir {RESULTS}/runs --bench-dir {RESULTS}/bench"
        " --reference {input.reference} --out {RESULTS} --families {params.families} > {log} 2>&1"
