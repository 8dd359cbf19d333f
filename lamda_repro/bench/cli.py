"""Command line of the benchmarks: ``lamda-repro bench-lamda ...`` (registered by lamda_repro.cli)."""

from __future__ import annotations

import argparse
import sys

from lamda_repro.bench.lamda_bench import METHODS, BenchConfigError, BenchSettings, run_bench, write_outputs


def add_cli(subparsers) -> None:
    """Register the ``bench-lamda`` subcommand."""
    d = BenchSettings()
    p = subparsers.add_parser(
        "bench-lamda",
        help="memory / parameter-update benchmark of LaMDA vs LoRA, LoRA-FA and full FT "
        "on LLaMA-2-7B geometry",
        description="Builds LLaMA-2-7B-shaped decoder layers with random weights, one model per method, "
        "and writes <out>.json and <out>.md with measured and 32-layer-extrapolated numbers.",
    )
    p.add_argument("--out", required=True, help="output path without suffix (or ending in .json / .md)")
    p.add_argument(
        "--layers", type=int, default=d.layers, help="decoder layers to build (default %(default)s)"
    )
    p.add_argument("--batch", type=int, default=d.batch, help="batch size (default %(default)s)")
    p.add_argument("--seq", type=int, default=d.seq, help="sequence length (default %(default)s)")
    p.add_argument("--rank", type=int, default=d.rank, help="adapter rank r (default %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="adapter alpha (default %(default)s)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size (default %(default)s)")
    p.add_argument("--intermediate", type=int, default=d.intermediate, help="MLP size (default %(default)s)")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads (default %(default)s)")
    p.add_argument("--vocab", type=int, default=d.vocab, help="vocabulary size (default %(default)s)")
    p.add_argument(
        "--full-layers",
        type=int,
        default=d.full_layers,
        help="depth to extrapolate to (default %(default)s, LLaMA-2-7B)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps (default %(default)s)")
    p.add_argument(
        "--run-steps",
        type=int,
        default=d.run_steps,
        help="T for run-integrated parameter updates (default %(default)s)",
    )
    p.add_argument(
        "--freeze-fraction",
        type=float,
        default=d.freeze_fraction,
        help="LaMDA freeze fraction (default %(default)s)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to measure")
    p.add_argument(
        "--device", default=d.device, choices=("auto", "cpu", "cuda"), help="device (default auto)"
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    settings = BenchSettings(
        layers=args.layers,
        batch=args.batch,
        seq=args.seq,
        rank=args.rank,
        alpha=args.alpha,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        vocab=args.vocab,
        full_layers=args.full_layers,
        steps=args.steps,
        warmup=args.warmup,
        run_steps=args.run_steps,
        freeze_fraction=args.freeze_fraction,
        methods=tuple(args.methods),
        device=args.device,
        threads=args.threads,
        seed=args.seed,
    )
    try:
        settings.validate()
    except BenchConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = run_bench(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    json_path, md_path = write_outputs(record, args.out)
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv=None) -> int:
    """Standalone entry point (``python -m lamda_repro.bench.cli bench-lamda ...``)."""
    parser = argparse.ArgumentParser(prog="lamda-repro")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
