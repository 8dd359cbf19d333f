# Preflight (lamda_repro/preflight.py): for a config that reads the Hub (offline: false), the first
# job checks every model, data set and lm-eval task of the config against the Hub with the user's
# token, plus codecs, converters, disk and CUDA, before any training job starts. It runs where
# Snakemake runs (login node: internet, the user's token). `--config preflight=false` skips it.
# The smoke config is offline: no preflight job.

# ancient(): a later preflight (the marker rewritten) never makes the finished jobs outdated.
PREFLIGHT_MARKER = f"{WORKDIR}/preflight/ok.txt"
PREFLIGHT = [] if CFG["offline"] or not CFG.get("preflight", True) else [ancient(PREFLIGHT_MARKER)]


rule preflight:
    output:
        PREFLIGHT_MARKER,
    params:
        configs=lambda w: [str(f) for f in workflow.configfiles],
    log:
        f"{LOGS}/preflight.log",
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro preflight {params.configs:q} > {log:q} 2>&1 && cp {log:q} {output:q}"
