"""Run records: one JSON file per run, written atomically, and loading them back.

Record layout (``schema_version`` 1; see docs/records.md):

    run_id          str   unique id derived from the spec (also the file path below results/runs/)
    kind            str   "finetune" | "recursive" | "bench"
    spec            dict  the resolved run spec (experiment, family, task, model, method, seed, train)
    status          str   "success" | "failed"
    error           str | null    "<ExceptionType>: message" when failed
    metrics         dict  metric name -> float (task metrics, e.g. accuracy, pearson, rouge1)
    primary_metric  str | null    the metric tables show for this task
    params          dict  trainable, total (and method-specific counts)
    parameter_updates  int | null  sum over optimizer steps of parameter elements updated
    memory          dict  peak and breakdown (see lamda_repro.measure)
    throughput      dict  train_samples_per_s, train_tokens_per_s, ...
    method_info     dict  facts reported by the method (e.g. a rank allocation)
    wall_time_s     float
    started_at, finished_at   ISO-8601 UTC
    env             dict  versions of key packages, git revision, hardware
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
STATUSES = ("success", "failed")
_KEY_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "evaluate",
    "lm_eval",
    "snakemake",
    "numpy",
    "pandas",
)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths end up in records through metrics and specs.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _sanitize(value: Any) -> Any:
    """Replace NaN/inf floats by None so that records stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and os.replace.

    A reader sees the old file or the new one, never a partial write; a failure leaves the
    old file in place and no temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp creates the file 0600; give it the mode any new file of this process gets
            # (0666 less the umask), so that a shared group can read records and tables.
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write strict JSON (NaN/inf become null) atomically."""
    text = json.dumps(_sanitize(data), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    write_text_atomic(path, text + "\n")


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Validate the record's required fields and write it atomically."""
    for key in ("run_id", "kind", "spec", "status"):
        if key not in record:
            raise ValueError(f"run record lacks required field {key!r}")
    if record["status"] not in STATUSES:
        raise ValueError(f"run record status must be one of {STATUSES}, got {record['status']!r}")
    record = {"schema_version": SCHEMA_VERSION, **record}
    write_json_atomic(path, record)


def new_record(run_id: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A record with every field present; the runner fills it as the run proceeds."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "kind": kind,
        "spec": spec,
        "status": "failed",
        "error": None,
        "metrics": {},
        "primary_metric": None,
        "params": {},
        "parameter_updates": None,
        "memory": {},
        "throughput": {},
        "method_info": {},
        "wall_time_s": None,
        "started_at": utc_now(),
        "finished_at": None,
        "env": env_info(),
    }


KNOWN_SCHEMA_VERSIONS = (SCHEMA_VERSION,)


class RecordError(ValueError):
    """A record that cannot be used; the message is one line naming the file."""


def rerun_command(path: str | os.PathLike, configfiles: Iterable[str | os.PathLike] = ()) -> str:
    """The command that writes the record at ``path`` again (from the workflow's folder), with
    the config files of the run (``--configfile``) where known."""
    files = " ".join(shlex.quote(str(f)) for f in configfiles)
    config = f" --configfile {files}" if files else ""
    return f"snakemake --cores all{config} --force {shlex.quote(str(path))}"


def record_stem(record: dict[str, Any]) -> str | None:
    """Where a record belongs below the runs folder (without ``.json``), from its kind and spec;
    None where the kind has no fixed place."""
    kind, spec = record.get("kind"), record.get("spec")
    if not isinstance(spec, dict):
        return None
    if kind == "finetune":
        keys = ("experiment", "task", "model", "method", "seed")
        if all(k in spec for k in keys):
            return "{experiment}/{task}/{model}/{method}/seed{seed}".format(**spec)
    elif kind in ("recursive", "early_exit"):
        run = spec.get("run")
        if isinstance(run, dict) and "model" in run and "name" in run:
            return f"{kind}/{run['model']}--{run['name']}"
    elif kind == "serving":
        return "serving/serving"
    return None


def read_record(
    path: str | os.PathLike,
    runs_dir: str | os.PathLike | None = None,
    configfiles: Iterable[str | os.PathLike] = (),
) -> dict[str, Any]:
    """One record, checked: readable strict JSON, an object, a known ``schema_version``, the
    required fields and (given ``runs_dir``) a spec that belongs at this path. Raises RecordError
    naming the file (and, for a damaged record, the command that reruns it, with ``configfiles``)."""
    path = str(path)
    rerun = f"rerun it: {rerun_command(path, configfiles)}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordError(f"{path}: record not found; {rerun}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: cannot read the record ({exc}); {rerun}") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "empty" if not text.strip() else f"truncated or corrupt JSON ({exc.msg}, line {exc.lineno})"
        raise RecordError(f"{path}: {what}; {rerun}") from None
    if not isinstance(rec, dict):
        raise RecordError(
            f"{path}: a record is a JSON object, this file holds a {type(rec).__name__}; {rerun}"
        )
    version = rec.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        known = ", ".join(map(str, KNOWN_SCHEMA_VERSIONS))
        raise RecordError(f"{path}: unknown schema_version {version!r} (this suite reads {known}); {rerun}")
    missing = [k for k in ("run_id", "kind", "spec", "status") if k not in rec]
    if missing:
        raise RecordError(f"{path}: record lacks field {missing[0]!r}; {rerun}")
    if runs_dir is not None:
        stem = record_stem(rec)
        try:
            here = Path(path).resolve().relative_to(Path(runs_dir).resolve()).with_suffix("").as_posix()
        except ValueError:
            here = None
        run_id = rec["run_id"]
        if stem is None or here != stem or stem not in (run_id, f"{rec['kind']}/{run_id}"):
            where = f"{Path(runs_dir) / stem}.json" if stem else "no known place"
            raise RecordError(
                f"{path}: its spec (kind {rec['kind']!r}, run {rec['run_id']!r}) belongs at {where}, "
                "not here (a copied or moved record?)"
            )
    rec["_path"] = path
    return rec


def load_records(
    paths: Iterable[str | os.PathLike],
    runs_dir: str | os.PathLike | None = None,
    configfiles: Iterable[str | os.PathLike] = (),
) -> list[dict[str, Any]]:
    """The records at ``paths``, each checked by read_record (RecordError naming the file)."""
    configfiles = list(configfiles)
    return [read_record(p, runs_dir, configfiles) for p in paths]


def find_records(root: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """All records below ``root`` (optionally of one kind), sorted by run_id; each must belong at
    its path (read_record)."""
    paths = sorted(Path(root).rglob("*.json")) if Path(root).exists() else []
    recs = load_records(paths, root)
    if kind is not None:
        recs = [r for r in recs if r.get("kind") == kind]
    return sorted(recs, key=lambda r: r["run_id"])


def stale_records(runs_dir: str | os.PathLike, expected: Iterable[str | os.PathLike]) -> list[Path]:
    """Record files below ``runs_dir`` that are not among ``expected`` (the record paths of the
    runs in the config): records of runs no longer configured, or stray copies. Sorted."""
    root = Path(runs_dir)
    if not root.exists():
        return []
    keep = {Path(p).resolve() for p in expected}
    return sorted(p for p in root.rglob("*.json") if p.is_file() and p.resolve() not in keep)


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rev = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return rev + ("-dirty" if dirty else "")


def hardware_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
            info["cuda_device_count"] = torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        pass
    return info


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in _KEY_PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


_ENV_CACHE: dict[str, Any] | None = None


def env_info() -> dict[str, Any]:
    global _ENV_CACHE
    if _ENV_CACHE is None:
        _ENV_CACHE = {
            "versions": package_versions(),
            "git_revision": git_revision(),
            "hardware": hardware_info(),
        }
    return dict(_ENV_CACHE)
