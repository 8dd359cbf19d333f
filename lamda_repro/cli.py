"""Command line of the suite: ``lamda-repro <command>``. The Snakemake rules call these."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import select
import signal
import sys

# Modules that add their own subcommands through ``add_cli(subparsers)``.
_PLUGIN_MODULES = (
    "lamda_repro.report_cli",
    "lamda_repro.report_pages",
    "lamda_repro.bench.cli",
    "lamda_repro.recursive.cli",
    "lamda_repro.status",
    "lamda_repro.preflight",
)
# The commands defined here, and the command prefix of the plugins whose imports are heavy (torch,
# transformers, peft: seconds per process): a workflow job loads only the plugins its command can
# come from, so that light jobs (prepare-data, aggregate, report-pages) start quickly.
_CORE_COMMANDS = ("validate", "list-runs", "prepare-data", "build-model", "run", "compare-records")
_PLUGIN_PREFIXES = {"lamda_repro.bench.cli": "bench-", "lamda_repro.recursive.cli": "recursive-"}
# Commands that import torch and friends: with warm starts on (lamda_repro/warm.py) they run in a
# worker forked from a server that has those imported (besides every bench-* / recursive-* one).
_WARM_COMMANDS = ("build-model", "run")


def _plugins_for(command: str | None) -> list[str]:
    """The plugin modules that may define ``command`` (all of them when it is not known)."""
    if command is None:
        return list(_PLUGIN_MODULES)
    if command in _CORE_COMMANDS:
        return []
    prefixed = [m for m, prefix in _PLUGIN_PREFIXES.items() if command.startswith(prefix)]
    return prefixed or [m for m in _PLUGIN_MODULES if m not in _PLUGIN_PREFIXES]


def _command_of(argv) -> str | None:
    """The subcommand named on the command line (the first argument that is not an option)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return next((a for a in args if not a.startswith("-")), None)


def _json_arg(text: str, flag: str) -> dict:
    from lamda_repro.config import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_checked(paths):
    import lamda_repro.recursive  # noqa: F401  (registers the check of the recursive section)
    from lamda_repro.config import load_config, validate_config

    return validate_config(load_config(*paths))


def cmd_validate(args) -> int:
    from lamda_repro.config import expand_runs

    cfg = _load_checked(args.config)
    runs = expand_runs(cfg)
    print(f"config OK: {len(runs)} fine-tuning run(s) in {len(cfg['experiments'])} experiment(s)")
    return 0


def cmd_list_runs(args) -> int:
    from lamda_repro.config import expand_runs, record_path

    cfg = _load_checked(args.config)
    for spec in expand_runs(cfg):
        print(record_path(cfg["results_dir"], spec.run_id) if args.paths else spec.run_id)
    return 0


def cmd_compare_records(args) -> int:
    from lamda_repro.reproducible import compare_record_trees

    for folder in (args.a, args.b):
        if not os.path.isdir(folder):
            print(f"compare-records: {folder}: not a folder", file=sys.stderr)
            return 2
    count, problems = compare_record_trees(args.a, args.b)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} difference(s) in {count} record(s) present in both", file=sys.stderr)
        return 1
    print(f"{count} record(s): identical apart from times, dates, machine and memory readings")
    return 0


def cmd_prepare_data(args) -> int:
    from lamda_repro.tasks.smoke import write_dataset

    files = write_dataset(_json_arg(args.entry, "--entry"), args.out_dir)
    for split, path in files.items():
        print(f"wrote {split}: {path}")
    return 0


def cmd_build_model(args) -> int:
    from lamda_repro.models import build_model

    path = build_model(
        args.name,
        _json_arg(args.entry, "--entry"),
        args.workdir,
        args.data_files,
        seed=args.seed,
        threads=args.threads,
    )
    print(f"built model {args.name!r} at {path}")
    return 0


def cmd_run(args) -> int:
    from lamda_repro.config import ConfigError, RunSpec
    from lamda_repro.train import run_finetune

    try:
        spec = RunSpec.from_dict(json.loads(args.spec))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"--spec: not a run spec ({str(exc).splitlines()[0]})") from None
    try:
        rec = run_finetune(
            spec,
            args.out,
            workdir=args.workdir,
            device=args.device,
            threads=args.threads,
            offline=not args.online,
        )
    except Exception as exc:
        from lamda_repro.resume import TRANSIENT_EXIT, is_transient, requeue_after_progress

        if not is_transient(exc):
            raise
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
        job = requeue_after_progress(exc)
        print(
            f"run {spec.run_id} INTERRUPTED ({why}); no record written, exit {TRANSIENT_EXIT}: "
            + (f"SLURM job {job} requeued, it resumes" if job else "a rerun resumes")
            + " from the last complete checkpoint",
            file=sys.stderr,
        )
        return TRANSIENT_EXIT
    if rec["status"] != "success":
        print(f"run {spec.run_id} FAILED: {rec['error']} (record: {args.out})", file=sys.stderr)
        return 1 if args.strict else 0
    pm = rec.get("primary_metric")
    print(
        f"run {spec.run_id} done: {pm}={rec['metrics'].get(pm)} "
        f"trainable={rec['params'].get('trainable')} wall={rec['wall_time_s']}s"
    )
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only the plugins that may define it are imported (every
    plugin when none of those defines it, so that an unknown command lists all the choices)."""
    p = argparse.ArgumentParser(prog="lamda-repro", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "--online",
        dest="online_all",
        action="store_true",
        help="allow Hugging Face Hub access for the recursive-* commands (default: offline)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="check config files; one line per problem")
    s.add_argument("config", nargs="+", help="YAML config files (later ones override)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("list-runs", help="list the fine-tuning runs of a config")
    s.add_argument("config", nargs="+")
    s.add_argument("--paths", action="store_true", help="print record paths instead of run ids")
    s.set_defaults(func=cmd_list_runs)

    s = sub.add_parser(
        "compare-records", help="compare the run records of two results folders (reproducibility)"
    )
    s.add_argument("a", help="a runs folder, e.g. results/runs")
    s.add_argument("b", help="the other runs folder")
    s.set_defaults(func=cmd_compare_records)

    s = sub.add_parser("prepare-data", help="write a generated smoke data set as JSONL")
    s.add_argument("--entry", required=True, help="the data entry of the config, as JSON")
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_prepare_data)

    s = sub.add_parser("build-model", help="build a tiny model + tokenizer from a config entry")
    s.add_argument("--name", required=True)
    s.add_argument("--entry", required=True, help="the model entry of the config, as JSON")
    s.add_argument("--workdir", required=True)
    s.add_argument("--data-files", nargs="+", required=True, help="JSONL files to train the tokenizer on")
    s.add_argument("--seed", type=int, default=0, help="seed of the random init and of the pretraining")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    s.set_defaults(func=cmd_build_model)

    s = sub.add_parser("run", help="train and evaluate one run; writes its record")
    s.add_argument("--spec", required=True, help="the run spec as JSON")
    s.add_argument("--out", required=True, help="record path")
    s.add_argument("--workdir", default="work")
    s.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--online", action="store_true", help="allow Hub downloads")
    s.add_argument("--strict", action="store_true", help="exit 1 when the run fails")
    s.set_defaults(func=cmd_run)

    loaded = set()

    def load(modules):
        for mod_name in modules:
            if mod_name in loaded:
                continue
            loaded.add(mod_name)
            try:
                mod = importlib.import_module(mod_name)
            except ModuleNotFoundError as exc:
                if exc.name and mod_name.startswith(exc.name):
                    continue  # that part of the suite is not installed
                raise
            mod.add_cli(sub)

    load(_plugins_for(command))
    if command is not None and command not in sub.choices:
        load(_PLUGIN_MODULES)
    return p


def main(argv=None) -> int:
    command = _command_of(argv)
    if command in _WARM_COMMANDS or (command or "").startswith(tuple(_PLUGIN_PREFIXES.values())):
        from lamda_repro import warm

        rc = warm.forward(sys.argv[1:] if argv is None else list(argv))
        if rc is not None:
            return rc
    from lamda_repro.config import ConfigError

    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.online_all and (command or "").startswith("recursive-"):
        # the recursive stage's commands are offline unless --online (as `python -m
        # lamda_repro.recursive.cli` has them); `run` has its own --online
        from lamda_repro.models import OFFLINE_VARS

        for name in OFFLINE_VARS:
            os.environ.setdefault(name, "1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that has gone shows here, not in the interpreter's exit
        return rc
    except (ConfigError, _method_config_error()) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise  # another pipe broke (e.g. a scorer's): a real error
        # The output was piped into a reader that stopped early (`| head`): end quietly, with
        # the status of a process ended by SIGPIPE, as command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _method_config_error() -> type[Exception]:
    """MethodConfigError when the methods were imported (only they raise it), without importing
    them (torch) for commands that never touch a method."""
    base = sys.modules.get("lamda_repro.methods.base")
    return base.MethodConfigError if base is not None else _NeverRaised


class _NeverRaised(Exception):
    """Never raised: stands for MethodConfigError while the methods are not imported."""


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end has been closed."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor, or no poll() here
        return False


if __name__ == "__main__":
    sys.exit(main())
