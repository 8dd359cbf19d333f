"""Command-line subcommands of early exit and serving (registered by the recursive stage's CLI).

recursive-early-exit       early-exit post-training + exit sweep of one run -> record
recursive-serve            the serving benchmark -> record, serving table and figure
recursive-serving-table    serving table and figure from a serving record
recursive-serving-latency  latency tables of one layer of a published geometry -> JSON
recursive-gpu-check        the serving measurements prepared for a GPU (scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lamda_repro.recursive.cli_common import add_common_args, load_section, setup_threads, write_job_record


def _section(args) -> dict:
    from lamda_repro.recursive.serving.config import resolve_serving

    section = load_section(args)
    resolve_serving(section)
    return section


def _common(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--out", required=True, help="record path")
    parser.add_argument(
        "--keep-going", action="store_true", help="exit 0 when the job failed (record says so)"
    )


def _reference(path):
    """The papers' reference numbers (claims.Reference), or None without a path."""
    if not path:
        return None
    from lamda_repro.claims import load_reference

    return load_reference(path)


def cmd_early_exit(args) -> int:
    from lamda_repro.recursive import parallel
    from lamda_repro.recursive.serving.jobs import execute_early_exit

    section = _section(args)
    setup_threads(args)
    parallel.init_from_env(args.device)  # several processes under torchrun: DDP post-training
    record = execute_early_exit(section, args.run, Path(args.workdir), args.source_record, args.device)
    main = parallel.is_main_process()
    parallel.shutdown()
    if not main:
        return 0  # rank 0 evaluates and writes the record
    return write_job_record(args, record, record["run_id"])


def cmd_serve(args) -> int:
    from lamda_repro.recursive.serving.jobs import execute_serving
    from lamda_repro.recursive.serving.report import plot_threshold_sweep, write_serving_table

    section = _section(args)
    setup_threads(args)
    by_run = {}
    for path in args.early_exit_records:
        try:
            by_run[json.loads(Path(path).read_text())["run_id"]] = path
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            print(
                f"recursive-serve: unreadable early-exit record {path} ({type(exc).__name__})",
                file=sys.stderr,
            )
            return 2
    record = execute_serving(section, Path(args.workdir), by_run, args.vanilla_record, args.device)
    status = write_job_record(args, record, record["run_id"])
    if args.table_stem:
        write_serving_table(record, args.table_stem, _reference(args.reference))
    if args.figure:
        plot_threshold_sweep(record, args.figure)
    return status


def cmd_table(args) -> int:
    from lamda_repro.recursive.serving.report import plot_threshold_sweep, write_serving_table

    try:
        record = json.loads(Path(args.record).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"recursive-serving-table: cannot read {args.record} ({type(exc).__name__})", file=sys.stderr)
        return 2
    write_serving_table(record, args.out_stem, _reference(args.reference))
    if args.figure:
        plot_threshold_sweep(record, args.figure)
    return 0


def cmd_latency(args) -> int:
    import torch

    from lamda_repro.recursive.runner import pick_device
    from lamda_repro.recursive.serving.gpu_check import layer_latency_file
    from lamda_repro.results import write_json_atomic

    setup_threads(args)
    out = layer_latency_file(
        args.geometry,
        args.context,
        args.sizes,
        args.lora_ranks,
        args.repeats,
        args.warmup,
        getattr(torch, args.dtype),
        pick_device(args.device),
        args.seed,
    )
    write_json_atomic(args.out, out)
    return 0


def cmd_gpu_check(args) -> int:
    from lamda_repro.recursive.serving.gpu_check import run_gpu_check

    setup_threads(args)
    try:
        run_gpu_check(args.out_dir, args.tiny, args.device, args.dtype, args.seed)
    except RuntimeError as exc:
        print(f"recursive-gpu-check: {exc}", file=sys.stderr)
        return 2
    return 0


def add_cli(subparsers) -> None:
    """Register the early-exit and serving subcommands on an argparse subparsers object."""
    p = subparsers.add_parser("recursive-early-exit", help="early-exit post-training of one run -> record")
    _common(p)
    p.add_argument("--run", required=True, help="run id <model>--<name> (with early_exit)")
    p.add_argument(
        "--source-record", required=True, help="the run's recursive record (names its saved model)"
    )
    p.set_defaults(func=cmd_early_exit)

    p = subparsers.add_parser("recursive-serve", help="serving benchmark -> record, table, figure")
    _common(p)
    p.add_argument(
        "--early-exit-records", nargs="+", required=True, help="early-exit records of the served runs"
    )
    p.add_argument(
        "--vanilla-record", default=None, help="the vanilla run's record (needed if it is uptrained)"
    )
    p.add_argument("--table-stem", help="also write <stem>.md, .tex, .csv")
    p.add_argument("--figure", help="also write the threshold figure (png/pdf)")
    p.add_argument("--reference", help="papers' reference file (the table's paper column)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("recursive-serving-table", help="serving table and figure from a record")
    p.add_argument("--record", required=True, help="serving record JSON")
    p.add_argument("--out-stem", required=True, help="writes <stem>.md, .csv, .tex")
    p.add_argument("--figure", help="figure path (png/pdf)")
    p.add_argument("--reference", help="papers' reference file (the table's paper column)")
    p.set_defaults(func=cmd_table)

    p = subparsers.add_parser(
        "recursive-serving-latency", help="latency tables of one layer of a published geometry -> JSON"
    )
    p.add_argument("--geometry", required=True, help="gemma-2b | tinyllama-1.1b | tiny")
    p.add_argument(
        "--context", type=int, default=1536, help="KV length of the timed calls (default 512 + 2048/2)"
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--lora-ranks", type=int, nargs="*", default=[])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", required=True, help="JSON path (e.g. results/reference/latency/gemma-2b.cpu.json)"
    )
    p.set_defaults(func=cmd_latency)

    p = subparsers.add_parser(
        "recursive-gpu-check",
        help="serving measurements for a GPU: Gemma 2B layer tables and the engine's throughput -> JSON",
    )
    p.add_argument("--out-dir", default="results/reference", help="writes latency/ and gpu_check/ under it")
    p.add_argument("--tiny", action="store_true", help="tiny geometries (a check of the check on a CPU)")
    p.add_argument("--device", default="cuda", help="cuda (default) | cpu | auto")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_gpu_check)


__all__ = ["add_cli"]
