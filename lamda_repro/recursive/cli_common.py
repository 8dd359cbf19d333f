"""What the recursive stage's subcommands and those of its serving package share: the config
source and machine options, the ``recursive:`` section they name, the thread setup, and how a
job's record is written and reported."""

from __future__ import annotations

import argparse
import json
import sys


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--config | --section-json (one required), --workdir, --device, --threads."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", nargs="+", help="config YAML file(s); later ones override earlier")
    source.add_argument("--section-json", help="the recursive: section as a JSON string")
    parser.add_argument("--workdir", default="work", help="artifact root (default: work)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")


def load_section(args) -> dict:
    """The resolved ``recursive:`` section of --section-json or of the --config files."""
    from lamda_repro.recursive.runner import resolve_section

    if args.section_json:
        return resolve_section(json.loads(args.section_json))
    from lamda_repro.config import load_config

    return resolve_section(load_config(*args.config).get("recursive"))


def setup_threads(args) -> None:
    """torch CPU threads from --threads (0 = torch's default)."""
    from lamda_repro.measure import set_threads

    set_threads(args.threads)


def write_job_record(args, record: dict, name: str) -> int:
    """Write ``record`` to --out; print its metrics (exit 0), or say that ``name`` failed on stderr
    (exit 1, 0 with --keep-going)."""
    from lamda_repro.results import write_record

    write_record(args.out, record)
    if record["status"] != "success":
        print(f"{name} failed: {record['error']}", file=sys.stderr)
        return 0 if args.keep_going else 1
    print(json.dumps(record["metrics"]))
    return 0
