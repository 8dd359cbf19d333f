# LaMDA benchmark: memory, parameter updates and step time of full FT, LoRA, LoRA-FA, LaMDA and
# LaMDA++ on LLaMA-2-7B geometry. The config section is `bench:` (schema: workflow/schemas/bench.schema.yaml).
BENCH = config.get("bench") or {}
BENCH_ENABLED = bool(BENCH) and BENCH.get("enabled", True)
BENCH_OUT = {ext: f"{RESULTS}/bench/lamda_bench.{ext}" for ext in ("json", "md")}
# config key -> command-line flag of `lamda-repro bench-lamda`
BENCH_FLAGS = {
    "layers": "--layers", "batch": "--batch", "seq": "--seq", "rank": "--rank", "alpha": "--alpha",
    "hidden": "--hidden", "intermediate": "--intermediate", "heads": "--heads", "vocab": "--vocab",
    "full_layers": "--full-layers", "steps": "--steps", "warmup": "--warmup", "run_steps": "--run-steps",
    "freeze_fraction": "--freeze-fraction", "device": "--device", "threads": "--threads", "seed": "--seed",
}
# `device: cpu` in the config (a CPU-only cluster or machine) overrides the bench's own device.
BENCH_DEVICE = "cpu" if CFG["device"] == "cpu" else BENCH.get("device", CFG["device"])
# One argument per item, each quoted in the shell command ({params.args:q}).
BENCH_ARGS = (
    [str(a) for key, flag in BENCH_FLAGS.items() if key in BENCH and key != "device" for a in (flag, BENCH[key])]
    + ["--device", BENCH_DEVICE]
    + (["--methods", *map(str, BENCH["methods"])] if "methods" in BENCH else [])
)
if BENCH_ENABLED:
    EXTRA_TARGETS += list(BENCH_OUT.values())


rule bench:
    input:
        PREFLIGHT,  # no Hub access of its own: waits so that the preflight stays the first job
    output:
        json=BENCH_OUT["json"],
        md=BENCH_OUT["md"],
    params:
        args=BENCH_ARGS,
        stem=lambda w, output: output.json.removesuffix(".json"),
    threads: max(1, CFG["threads"])
    resources:
        **job_resources(
            CFG,
            "bench",
            device=BENCH_DEVICE,
            sizes={k: BENCH[b] for k, b in (("mem_mb", "mem_mb"), ("runtime", "runtime_min")) if b in BENCH},
        ),
    log:
        f"{LOGS}/bench/lamda_bench.log",
    conda:
        "../../environment.yml"
    shell:
        "lamda-repro bench-lamda --out {params.stem:q} {params.args:q} > {log:q} 2>&1"
