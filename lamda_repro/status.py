"""`lamda-repro status [config]`: where a grid stands, per experiment and stage.

For every run the config defines, its record and log are where the workflow puts them
(workflow/rules/*.smk); a run is

- done: its record says ``success``;
- failed: its record says ``failed`` (listed with the first line of the error and the log path);
- running: Snakemake has marked its record as being made (``.snakemake/incomplete/``), with the
  SLURM job id when the job was submitted to a cluster (the job in SLURM's queue whose comment
  names the rule and the run: the marker's own id is overwritten by the Snakemake inside the job);
  a job killed together with Snakemake stays here until the next ``snakemake`` run
  (``--rerun-incomplete`` in the profile);
- missing: none of these (not started yet, or a transient failure waiting for its retry); a
  run whose SLURM job is in the queue without a marker (requeued, pending) counts as running.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Entry:
    stage: str  # finetune/<experiment>, recursive, early_exit
    run: str
    record: str
    log: str
    job: str = ""  # the comment the SLURM executor plugin gives the run's job (slurm_comment)


def slurm_comment(rule: str, wildcards: list[str]) -> str:
    """The ``--comment`` the SLURM executor plugin gives a job of ``rule`` with these wildcard
    values (in the order of the rule's output pattern)."""
    return f"rule_{rule}_wildcards_" + "_".join(wildcards).replace("/", "_")


@dataclass
class StageCount:
    done: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (run, first error line, log)
    running: list[tuple[str, str | None]] = field(default_factory=list)  # (run, cluster job id)
    missing: int = 0


def expected_runs(cfg: dict[str, Any]) -> list[Entry]:
    """Every run record the workflow makes for a validated config, with its log (the paths of
    workflow/rules/finetune.smk, recursive.smk and serving.smk)."""
    from lamda_repro.config import expand_runs, record_path

    results, logs = cfg["results_dir"], cfg.get("logs_dir", "logs")
    entries = [
        Entry(
            f"finetune/{s.experiment}",
            s.run_id,
            record_path(results, s.run_id),
            f"{logs}/finetune/{s.run_id}.log",
            slurm_comment("finetune", [s.experiment, s.task, s.model, s.method, str(s.seed)]),
        )
        for s in expand_runs(cfg)
    ]
    section = cfg.get("recursive")
    if section and section.get("enabled", True):
        from lamda_repro.recursive.runner import resolve_section, run_id

        rec = resolve_section(section)
        for run in rec["runs"]:
            rid = run_id(run)
            entries.append(
                Entry(
                    "recursive",
                    rid,
                    f"{results}/runs/recursive/{rid}.json",
                    f"{logs}/recursive/run/{rid}.log",
                    slurm_comment("recursive_run", [rid]),
                )
            )
            if run.get("early_exit"):
                entries.append(
                    Entry(
                        "early_exit",
                        rid,
                        f"{results}/runs/early_exit/{rid}.json",
                        f"{logs}/recursive/early_exit/{rid}.log",
                        slurm_comment("recursive_early_exit", [rid]),
                    )
                )
    return entries


def incomplete_outputs(root: str | Path = ".") -> dict[str, str | None]:
    """Outputs Snakemake has marked as being made in ``root/.snakemake/incomplete`` -> the
    cluster job id it recorded (None for local jobs)."""
    base = Path(root) / ".snakemake" / "incomplete"
    found: dict[str, str | None] = {}
    if not base.is_dir():
        return found
    for path in base.rglob("*"):
        if not path.is_file() or path.name == "migration_underway":
            continue
        # long names are split into folders whose names start with "@"
        parts = [p.lstrip("@") for p in path.relative_to(base).parts]
        try:
            name = base64.urlsafe_b64decode("".join(parts).encode()).decode()
            job = json.loads(path.read_text() or "{}").get("external_jobid")
        except (ValueError, UnicodeDecodeError, OSError):
            continue
        found[name] = job
    return found


def slurm_jobs(root: str | Path = ".") -> dict[str, str]:
    """Job comment -> SLURM job id of the jobs in SLURM's queue (pending or running) that run in
    ``root``; empty where there is no squeue or it does not answer."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--format=%i|%k|%Z"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    here = Path(root).resolve()
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and Path(parts[2]).resolve() == here:
            jobs[parts[1]] = parts[0]
    return jobs


def first_error_line(record: dict[str, Any]) -> str:
    error = record.get("error") or "(no error message)"
    return str(error).splitlines()[0]


def collect(
    cfg: dict[str, Any],
    root: str | Path = ".",
    stale: Callable[[dict[str, Any]], set[str]] | None = None,
    queue: Callable[[Path], dict[str, str]] = slurm_jobs,
) -> tuple[dict[str, StageCount], list[str]]:
    """(stage -> counts, stale record paths). ``stale(cfg)`` lists records whose spec no longer
    matches the config (``stale_record_paths``); ``queue(root)`` the SLURM jobs running there by
    their comment (asked once, when a running job's marker names no job id or a record is
    missing: a job requeued after a preemption is pending without a marker)."""
    root = Path(root)
    running = incomplete_outputs(root)
    queued: dict[str, str] | None = None
    stages: dict[str, StageCount] = {}
    for entry in expected_runs(cfg):
        count = stages.setdefault(entry.stage, StageCount())
        if entry.record in running:
            job = running[entry.record]
            if job is None:
                queued = queue(root) if queued is None else queued
                job = queued.get(entry.job)
            count.running.append((entry.run, job))
            continue
        path = root / entry.record
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            # a SLURM job between two attempts (requeued after a preemption) has no marker
            queued = queue(root) if queued is None else queued
            if entry.job in queued:
                count.running.append((entry.run, queued[entry.job]))
            else:
                count.missing += 1
            continue
        except (OSError, ValueError):
            count.failed.append((entry.run, "unreadable record", entry.record))
            continue
        if record.get("status") == "success":
            count.done += 1
        else:
            count.failed.append((entry.run, first_error_line(record), entry.log))
    stale_paths = sorted(stale(cfg)) if stale is not None else []
    return stages, stale_paths


def stale_record_paths(cfg: dict[str, Any], root: str | Path = ".") -> set[str]:
    """Records below the results folder's runs/ that no run of the config makes (runs removed from
    the config, stray copies): the aggregation leaves them out of the tables."""
    from lamda_repro.results import stale_records

    root = Path(root)
    runs = root / cfg["results_dir"] / "runs"
    expected = [root / e.record for e in expected_runs(cfg)] + [runs / "serving" / "serving.json"]
    return {
        str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in stale_records(runs, expected)
    }


def render(stages: dict[str, StageCount], stale_paths: list[str] | None = None) -> str:
    lines = [f"{'stage':<32} {'done':>6} {'failed':>7} {'running':>8} {'missing':>8}"]
    totals = StageCount()
    for name, c in stages.items():
        lines.append(f"{name:<32} {c.done:>6} {len(c.failed):>7} {len(c.running):>8} {c.missing:>8}")
        totals.done += c.done
        totals.missing += c.missing
        totals.failed += c.failed
        totals.running += c.running
    lines.append(
        f"{'total':<32} {totals.done:>6} {len(totals.failed):>7} {len(totals.running):>8} {totals.missing:>8}"
    )
    for name, c in stages.items():
        for run, error, log in c.failed:
            lines.append(f"FAILED  {name} {run}: {error} (log: {log})")
        for run, job in c.running:
            lines.append(f"RUNNING {name} {run}" + (f" (cluster job {job})" if job else ""))
    for path in stale_paths or []:
        lines.append(f"STALE   {path}")
    return "\n".join(lines)


def failed_records(cfg: dict[str, Any], root: str | Path = ".") -> list[str]:
    """Record paths of the failed runs (for `snakemake --forcerun`)."""
    out = []
    root = Path(root)
    for entry in expected_runs(cfg):
        try:
            if json.loads((root / entry.record).read_text()).get("status") != "success":
                out.append(entry.record)
        except (OSError, ValueError):
            continue
    return out


def add_cli(sub) -> None:
    s = sub.add_parser("status", help="done / failed / running / missing runs per experiment and stage")
    s.add_argument(
        "config", nargs="*", default=["config/config.yaml"], help="config files (default: the smoke config)"
    )
    s.add_argument("--root", default=".", help="the folder Snakemake runs in (default: here)")
    s.add_argument(
        "--failed-records",
        action="store_true",
        help="print only the record paths of failed runs (for snakemake --forcerun)",
    )
    s.set_defaults(func=cmd_status)


def cmd_status(args) -> int:
    import lamda_repro.recursive  # noqa: F401  (registers the check of the recursive section)
    from lamda_repro.config import load_config, validate_config

    cfg = validate_config(load_config(*args.config))
    if args.failed_records:
        for path in failed_records(cfg, args.root):
            print(path)
        return 0
    stages, stale_paths = collect(cfg, args.root, stale=lambda c: stale_record_paths(c, args.root))
    print(render(stages, stale_paths))
    return 0
