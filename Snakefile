# lamda-repro workflow. Smoke reproduction (default config): `snakemake --cores all`.
# Paper grid on a cluster: `snakemake --profile slurm --configfile config/paper.yaml`.
from snakemake.utils import min_version

min_version("9.0")


# The default config is the smoke config. A config given with --configfile replaces it (rather
# than being merged into it), so that the paper grid does not inherit the smoke experiments.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# The HTML report's landing page (`snakemake --report results/report.html`).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/preflight.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/recursive.smk"
include: "workflow/rules/serving.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/report.smk"


# Light jobs run where Snakemake runs, never as cluster jobs (lamda_repro/cluster.py LOCAL_RULES).
# build_model is local unless it pretrains (its own `localrule:`).
localrules:
    preflight,
    prepare_data,
    recursive_corpus,
    recursive_table,
    aggregate,
    report_pages,


# Before anything is submitted to SLURM: a request the cluster can never satisfy (more memory or
# CPUs than any node, a GPU where there is none) stops the workflow with one line, instead of a
# refused submission or a job pending forever (lamda_repro/cluster.py unsatisfiable).
onstart:
    refusal = unsatisfiable(cluster_jobs())
    if refusal:
        sys.exit(refusal)
    if WARM and not workflow.local_exec:  # known only now: cluster jobs start cold
        os.environ.pop(warm.ENV_SWITCH, None)


# Warm-start servers (lamda_repro/warm.py) leave with the workflow.
onsuccess:
    WARM and warm.stop_servers()


onerror:
    WARM and warm.stop_servers()


rule all:
    default_target: True
    input:
        all_targets(),
    localrule: True
