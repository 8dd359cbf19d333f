"""Command-line subcommands of the recursive stage (registered by ``add_cli``).

recursive-corpus    write the smoke corpus, tokenizer and lm-eval tasks
recursive-tokenize  tokenize the corpus once per tokenizer into token shards and a manifest
recursive-data-bench  tokenize / loader throughput next to an H100's token consumption (estimate)
recursive-pretrain  pretrain a tiny model of the config on the corpus
recursive-run       one run (variant, uptraining, evaluation) -> one JSON record
recursive-table     table (md/csv/tex) and figure from records
recursive-counts    non-embedding parameter counts of a model config
recursive-bench     forward tokens/s and weight memory: original vs converted
recursive-relax-error  relative weight error of each relaxation and budget (no training)
(and, from serving/cli.py: recursive-early-exit, recursive-serve, recursive-serving-table,
recursive-serving-latency)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lamda_repro.models import OFFLINE_VARS, ModelSourceError, refuse_recursive_checkpoint
from lamda_repro.recursive.cli_common import add_common_args, load_section, setup_threads, write_job_record


def cmd_corpus(args) -> int:
    from lamda_repro.recursive.runner import prepare_corpus

    info = prepare_corpus(load_section(args), Path(args.workdir))
    print(json.dumps(info))
    return 0


def cmd_pretrain(args) -> int:
    from lamda_repro.recursive.runner import pick_device, pretrain_model
    from lamda_repro.resume import TRANSIENT_EXIT, is_transient, requeue_after_progress

    setup_threads(args)
    try:
        stats = pretrain_model(load_section(args), args.model, Path(args.workdir), pick_device(args.device))
    except Exception as exc:
        if not is_transient(exc):
            raise
        job = requeue_after_progress(exc)
        print(
            f"pretraining {args.model} INTERRUPTED ({type(exc).__name__}: {exc}); exit {TRANSIENT_EXIT}"
            + (f", SLURM job {job} requeued" if job else ""),
            file=sys.stderr,
        )
        return TRANSIENT_EXIT
    print(json.dumps(stats))
    return 0


def cmd_tokenize(args) -> int:
    from lamda_repro.recursive.runner import tokenize_corpus

    section = load_section(args)
    manifest = tokenize_corpus(section, args.tokens, Path(args.workdir), workers=args.workers)
    summary = {
        split: {k: v for k, v in entry.items() if k != "shards"}
        for split, entry in manifest["splits"].items()
    }
    print(
        json.dumps({"tokens": args.tokens, "tokenize_time_s": manifest["tokenize_time_s"], "splits": summary})
    )
    return 0


def cmd_data_bench(args) -> int:
    from lamda_repro.recursive import data_bench
    from lamda_repro.results import hardware_info, write_json_atomic

    texts = [p.strip() for f in args.text for p in Path(f).read_text().split("\n\n") if p.strip()]
    texts = texts * args.repeat
    result = {
        "machine": hardware_info(),
        "tokenize": [
            data_bench.tokenize_rate(args.tokenizer, texts, w, args.docs_per_shard) for w in args.workers
        ],
        "loader": data_bench.loader_rate(
            args.loader_tokens, args.shards, args.seq_len, args.batch_size, args.batches
        ),
        "h100_estimate_tokens_per_s": data_bench.h100_estimates(),
        "h100_assumptions": {
            "bf16_peak_flops": data_bench.H100_BF16_PEAK_FLOPS,
            "mfu": data_bench.ASSUMED_MFU,
            "context": data_bench.CONTEXT,
            "models": data_bench.PAPER_MODELS,
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


def cmd_run(args) -> int:
    from lamda_repro.recursive import parallel
    from lamda_repro.recursive.runner import execute_run
    from lamda_repro.resume import TRANSIENT_EXIT, is_transient, requeue_after_progress

    setup_threads(args)
    parallel.init_from_env(args.device)  # several processes under torchrun: DDP uptraining
    try:
        record = execute_run(load_section(args), args.run, Path(args.workdir), args.device)
        main = parallel.is_main_process()
        parallel.shutdown()
        if not main:
            return 0  # rank 0 evaluates and writes the record
    except Exception as exc:
        if not is_transient(exc):
            raise
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
        job = requeue_after_progress(exc)
        print(
            f"run {args.run} INTERRUPTED ({why}); no record written, exit {TRANSIENT_EXIT}"
            + (f", SLURM job {job} requeued" if job else ""),
            file=sys.stderr,
        )
        return TRANSIENT_EXIT
    return write_job_record(args, record, f"run {args.run}")


def cmd_table(args) -> int:
    from lamda_repro.recursive.report import plot_accuracy_vs_params, replace_block, write_table
    from lamda_repro.results import load_records, write_text_atomic

    records = load_records(args.records)
    cells = []
    if args.reference:
        from lamda_repro.claims import load_reference

        cells = load_reference(args.reference).recursive_cells
    write_table(records, args.out_stem, cells)
    if args.figure:
        plot_accuracy_vs_params(records, args.figure)
    if args.docs:
        docs = Path(args.docs)
        table = Path(args.out_stem).with_suffix(".md").read_text()
        write_text_atomic(docs, replace_block(docs.read_text(), args.docs_block, table))
    return 0


def cmd_counts(args) -> int:
    from transformers import AutoConfig

    from lamda_repro.recursive.counts import non_embedding_counts

    config = AutoConfig.from_pretrained(args.model_config)
    for rank in args.lora_rank or [None]:
        counts = non_embedding_counts(
            config, args.num_loops, rank, relaxation=args.relaxation, rank_in=args.rank_in
        )
        print(json.dumps(counts))
    return 0


def cmd_relax_error(args) -> int:
    from transformers import AutoModel

    from lamda_repro.recursive.relax_error import error_table_markdown, find_layers, relaxation_error_rows
    from lamda_repro.recursive.report import replace_block
    from lamda_repro.results import write_text_atomic

    setup_threads(args)
    if args.model_path:
        path, label, ranks = args.model_path, args.label or Path(args.model_path).name, args.budget_lora_ranks
    else:
        if not args.model or not (args.config or args.section_json):
            print(
                "recursive-relax-error: give --model-path, or --config/--section-json with --model",
                file=sys.stderr,
            )
            return 2
        from lamda_repro.recursive.runner import base_model_path, budget_lora_ranks, relaxed_run_shapes

        section = load_section(args)
        if args.model not in section["models"]:
            print(
                f"recursive-relax-error: --model {args.model!r} is not in recursive.models", file=sys.stderr
            )
            return 2
        path = base_model_path(section, args.model, args.workdir)
        label = args.label or section["models"][args.model].get("label", args.model)
        ranks = args.budget_lora_ranks or budget_lora_ranks(section, args.model)
        loops, inits = relaxed_run_shapes(section, args.model)
        args.num_loops = args.num_loops or loops
        args.init = args.init or (inits[0] if len(inits) == 1 else None)
    args.num_loops, args.init = args.num_loops or [2], args.init or "average"
    if not ranks:
        print("recursive-relax-error: no budgets (give --budget-lora-ranks)", file=sys.stderr)
        return 2
    try:  # relaxation errors compare a plain model's layers; a recursive one has them tied already
        refuse_recursive_checkpoint(path, "recursive-relax-error")
    except ModelSourceError as exc:
        print(exc, file=sys.stderr)
        return 2
    model = AutoModel.from_pretrained(path, use_safetensors=True)
    layers = find_layers(model)
    rows = []
    for loops in args.num_loops:
        rows += relaxation_error_rows(layers, loops, ranks, init=args.init, sharing=args.sharing)
    table = error_table_markdown(rows, label)
    if args.out_stem:
        import pandas as pd

        from lamda_repro.tables import to_csv

        stem = Path(args.out_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stem.with_suffix(".md"), table)
        write_text_atomic(
            stem.with_suffix(".csv"), to_csv(pd.DataFrame([{"model": label, **r} for r in rows]))
        )
    if args.docs:
        docs = Path(args.docs)
        write_text_atomic(docs, replace_block(docs.read_text(), args.docs_block, table))
    print(table)
    return 0


def cmd_bench(args) -> int:
    from lamda_repro.recursive.bench import benchmark_conversion

    setup_threads(args)
    result = benchmark_conversion(
        args.model,
        num_loops=args.num_loops,
        lora_rank=args.lora_rank,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        repeats=args.repeats,
        device=args.device,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from lamda_repro.results import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


def add_cli(subparsers) -> None:
    """Register the recursive subcommands on an argparse subparsers object."""
    p = subparsers.add_parser("recursive-corpus", help="write the smoke corpus, tokenizer and tasks")
    add_common_args(p)
    p.set_defaults(func=cmd_corpus)

    p = subparsers.add_parser(
        "recursive-tokenize", help="tokenize the corpus once per tokenizer into token shards + manifest"
    )
    add_common_args(p)
    p.add_argument("--tokens", required=True, help="token set name (recursive.models' tokenizer key)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (one shard each at a time)")
    p.set_defaults(func=cmd_tokenize)

    p = subparsers.add_parser(
        "recursive-data-bench", help="tokenize and loader throughput, next to H100 consumption (estimate)"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--text", nargs="+", required=True, help="text files (paragraphs = documents)")
    p.add_argument("--repeat", type=int, default=1, help="read the documents this many times")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="tokenize worker counts")
    p.add_argument("--docs-per-shard", type=int, default=2048)
    p.add_argument("--loader-tokens", type=int, default=50_000_000, help="tokens of the synthetic token set")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 16, 256, 1024])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--out", help="result JSON")
    p.set_defaults(func=cmd_data_bench)

    p = subparsers.add_parser("recursive-pretrain", help="pretrain a tiny model on the corpus")
    add_common_args(p)
    p.add_argument("--model", required=True, help="model name in recursive.models")
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser("recursive-run", help="one recursive run -> JSON record")
    add_common_args(p)
    p.add_argument("--run", required=True, help="run id <model>--<name>")
    p.add_argument("--out", required=True, help="record path")
    p.add_argument("--keep-going", action="store_true", help="exit 0 when the run failed (record says so)")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("recursive-table", help="table and figure from recursive records")
    p.add_argument("--records", nargs="*", default=[], help="record JSON files")
    p.add_argument("--out-stem", required=True, help="writes <stem>.md, .csv, .tex")
    p.add_argument("--figure", help="figure path (png/pdf)")
    p.add_argument(
        "--reference", help="reference file (results/reference/papers.yaml): adds the paper's numbers as rows"
    )
    p.add_argument("--docs", help="Markdown file whose block --docs-block receives the table")
    p.add_argument("--docs-block", default="recursive-table", help="block name: <!-- NAME:begin --> ... end")
    p.set_defaults(func=cmd_table)

    p = subparsers.add_parser("recursive-counts", help="non-embedding parameter counts from a config")
    p.add_argument("--model-config", required=True, help="folder with config.json, or a Hub id")
    p.add_argument("--num-loops", type=int, default=2)
    p.add_argument("--lora-rank", type=int, nargs="*", help="relaxed ranks to count")
    p.add_argument(
        "--relaxation",
        default="lora",
        help="relaxation kind: lora | lamda_depth | shared_basis (default lora)",
    )
    p.add_argument("--rank-in", type=int, help="shared_basis: rank of V (default: the rank)")
    p.set_defaults(func=cmd_counts)

    p = subparsers.add_parser(
        "recursive-relax-error", help="relative weight error of each relaxation and budget (no training)"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", help="model folder with safetensors weights (decoder or encoder)")
    source.add_argument(
        "--config", nargs="+", help="config YAML file(s): the model is --model of recursive.models"
    )
    source.add_argument("--section-json", help="the recursive: section as a JSON string")
    p.add_argument("--model", help="model name in recursive.models (with --config / --section-json)")
    p.add_argument("--workdir", default="work", help="artifact root (default: work)")
    p.add_argument("--label", help="model name shown in the table")
    p.add_argument(
        "--num-loops", type=int, nargs="+", help="B values (default: those of the relaxed runs, else 2)"
    )
    p.add_argument(
        "--init",
        help="shared-layer init: stepwise | average | lower | upper (default: the relaxed runs', "
        "else average)",
    )
    p.add_argument("--sharing", default="cycle", help="cycle | sequence")
    p.add_argument(
        "--budget-lora-ranks",
        type=int,
        nargs="*",
        help="budgets as lora ranks (default with --config: those of the model's relaxed runs)",
    )
    p.add_argument("--out-stem", help="write <stem>.md and <stem>.csv")
    p.add_argument("--docs", help="Markdown file whose block --docs-block is replaced by the table")
    p.add_argument(
        "--docs-block", default="relax-error", help="block name: <!-- NAME:begin --> ... <!-- NAME:end -->"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.set_defaults(func=cmd_relax_error)

    p = subparsers.add_parser(
        "recursive-bench", help="forward tokens/s and weight memory, original vs converted"
    )
    p.add_argument("--model", required=True, help="model folder (or Hub id)")
    p.add_argument("--num-loops", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="also write the result as JSON")
    p.set_defaults(func=cmd_bench)

    from lamda_repro.recursive.serving.cli import add_cli as add_serving_cli

    add_serving_cli(subparsers)  # recursive-early-exit, -serve, -serving-table, -serving-latency


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (the suite's ``lamda-repro`` CLI wires ``add_cli`` in as well)."""
    parser = argparse.ArgumentParser(prog="python -m lamda_repro.recursive.cli")
    parser.add_argument(
        "--online",
        action="store_true",
        help="allow Hugging Face Hub access (default: the offline switches are set)",
    )
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if not args.online:
        for name in OFFLINE_VARS:
            os.environ.setdefault(name, "1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
