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


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    records = []
    for p in paths:
        with open(p) as fh:
            rec = json.load(fh)
        rec.setdefault("_path", str(p))
        records.append(rec)
    return records


def find_records(root: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """All records below ``root`` (optionally of one kind), sorted by run_id."""
    paths = sorted(Path(root).rglob("*.json")) if Path(root).exists() else []
    recs = [r for r in load_records(paths) if isinstance(r, dict) and "run_id" in r]
    if kind is not None:
        recs = [r for r in recs if r.get("kind") == kind]
    return sorted(recs, key=lambda r: r["run_id"])


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
