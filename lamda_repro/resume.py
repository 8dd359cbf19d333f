"""Resumable runs: checkpoint completeness, choosing what to resume from, preemption and the
failure policy shared by fine-tuning and recursive uptraining.

A run checkpoints into a folder of its own identity (``identity_folder``: the digest of
everything that decides its outputs), so that runs of different configs sharing a workdir never
see, resume or delete each other's checkpoints. A checkpoint folder counts only when its marker
(``checkpoint_complete.json``) is present, was written last (after every other file of the
checkpoint), names the identity of the run and still matches the folder: every file it lists
exists with the size and SHA-256 it lists. A rerun resumes from the newest such folder; a
partial or corrupt one (a kill during the save, a truncated or damaged file) is removed and the
previous one used; one written for another identity (a copied folder) is set aside, never
deleted. Nothing is deleted outside the run's own folder, and symbolic links are never followed
there: a link is neither resumed nor deleted.

Failures are either deterministic (a bad value that shows at run time, a non-finite loss, a data
set or model missing from the cache in offline mode): the
run writes a ``failed`` record and the workflow moves on; or transient (preemption or the time
limit, out of memory, an I/O error, a lost node or peer): the run writes no record and exits with
``TRANSIENT_EXIT`` so that Snakemake (``retries`` in the profile) submits it again, and the next
attempt resumes from the last complete checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lamda_repro.results import write_json_atomic

log = logging.getLogger("lamda_repro.resume")

MARKER = "checkpoint_complete.json"
# EX_TEMPFAIL of sysexits.h: "temporary failure, try again".
TRANSIENT_EXIT = 75
_TRANSIENT_ERRNOS = {errno.EIO, errno.ENOSPC, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.EDQUOT}
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class Preempted(Exception):
    """SIGTERM (preemption or the time limit) arrived; a checkpoint was written where possible.
    ``progressed``: that checkpoint is ahead of the step this attempt started from."""

    def __init__(self, message: str = "", progressed: bool = False):
        super().__init__(message)
        self.progressed = progressed


def requeue_after_progress(exc: BaseException, env=None, run=None) -> str | None:
    """Inside a SLURM job, put the job back into SLURM's queue when ``exc`` is a preemption after
    progress (a checkpoint ahead of where this attempt started): the same job id runs again
    and resumes, so the workflow's ``retries`` count only attempts that made no progress and a
    run needing many time slots is continued as often as it needs. The job id requeued, or None
    (not in SLURM, no progress, another rank than 0, or SLURM refused: then exit 75 and the
    workflow's retry resumes instead)."""
    import subprocess

    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "")
    if not (isinstance(exc, Preempted) and exc.progressed and job.isdigit() and rank_zero()):
        return None
    run = run or subprocess.run
    try:  # the requeue ends this job's steps with SIGTERM: report and exit 75 first
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    try:
        proc = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return None
    if proc.returncode != 0:
        log.warning("could not requeue SLURM job %s: %s", job, (proc.stderr or "").strip())
        return None
    return job


def _offline_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the Hugging Face libraries refusing to download in
    offline mode: a data set or model that is not in the local cache will not appear on a retry."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        if "OfflineModeIsEnabled" in str(exc) or "offline mode is enabled" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may go away on a retry (then no record is written). A download refused
    in offline mode (a data set or model missing from the cache) is deterministic."""
    if _offline_refusal(exc):
        return False
    if isinstance(exc, (Preempted, MemoryError, ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if name in ("OutOfMemoryError", "DistBackendError", "DistNetworkError", "DistStoreError"):
        return True  # torch.OutOfMemoryError (CUDA), torch.distributed's lost peers
    if isinstance(exc, RuntimeError) and re.search(
        r"out of memory|NCCL error|CUDA error: (unspecified launch|an illegal)", str(exc)
    ):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# Files of a model folder that report how it was made (settings already in the spec, readings
# of the clock): not part of what a run reads, so a rebuild with the same weights is the same input.
REPORT_FILES = frozenset({"pretrain.json"})


def folder_digest(folder: str | Path, ignore: Iterable[str] = REPORT_FILES) -> str:
    """SHA-256 over the relative paths and contents of every file below ``folder`` but those
    named in ``ignore`` (links followed: a workdir may link its data in); of its path's absence
    when it does not exist."""
    folder = Path(folder)
    ignore = set(ignore)
    h = hashlib.sha256()
    if not folder.exists():
        h.update(f"missing:{folder.name}".encode())
        return h.hexdigest()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    files = [p for p in files if p.name not in ignore]
    for p in files:
        h.update(f"{p.relative_to(folder) if p != folder else p.name}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def identity_digest(parts: dict[str, Any]) -> str:
    """The digest of a run's identity: everything that decides its outputs, as plain data."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_folder(run_dir: str | Path, identity: str) -> Path:
    """The checkpoint folder of one identity of a run: ``<run_dir>/id-<identity>``. A symbolic
    link in its place (made by hand or by another tool) is set aside, never followed."""
    folder = Path(run_dir) / f"id-{identity}"
    if folder.is_symlink():
        set_aside(folder, "a symbolic link where the run's checkpoint folder belongs")
    return folder


def write_marker(ckpt_dir: str | Path, state: dict[str, Any]) -> None:
    """Write the completeness marker of a checkpoint folder, after all its other files: the
    size and SHA-256 of each of them."""
    ckpt_dir = Path(ckpt_dir)
    files = {
        str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    write_json_atomic(ckpt_dir / MARKER, {**state, "files": files})


def marker_problem(ckpt_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) for a complete checkpoint, else (marker or None, why it is unusable): no
    or an unreadable marker, a listed file missing, of another size or other bytes."""
    ckpt_dir = Path(ckpt_dir)
    try:
        marker = json.loads((ckpt_dir / MARKER).read_text())
        files = marker["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return None, "incomplete (no valid completeness marker)"
    try:
        for name, want in files.items():
            path = ckpt_dir / name
            if not isinstance(want, dict) or "sha256" not in want:
                return marker, f"its marker lists no digest for {name}"
            if path.is_symlink() or path.stat().st_size != want["size"]:
                return marker, f"corrupt ({name}: not the size its marker lists)"
            if file_digest(path) != want["sha256"]:
                return marker, f"corrupt ({name}: not the bytes its marker lists)"
    except OSError as exc:
        return marker, f"unreadable ({exc})"
    return marker, None


def read_marker(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The marker of a complete checkpoint, or None (no marker, unreadable, or the folder does
    not match it: a file missing, of another size or with other bytes)."""
    marker, problem = marker_problem(ckpt_dir)
    return marker if problem is None else None


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-<step>`` folder, oldest first (symbolic links are
    left out: never resumed, never deleted)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or out_dir.is_symlink():
        return []
    found = [
        (int(m.group(1)), p)
        for p in out_dir.iterdir()
        if (m := _CKPT.match(p.name)) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(found)


def remove_checkpoint(path: str | Path, run_dir: str | Path) -> bool:
    """Delete the checkpoint folder ``path``, only where it is a real folder directly inside the
    real folder ``run_dir`` (no symbolic link on the way; shutil.rmtree follows none inside)."""
    path, run_dir = Path(path), Path(run_dir)
    if path.is_symlink() or run_dir.is_symlink() or not path.is_dir() or path.parent != run_dir:
        log.warning("not deleting %s: not a folder of the run's own checkpoint folder %s", path, run_dir)
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def set_aside(path: str | Path, why: str) -> Path:
    """Move ``path`` (a folder or a link, not followed) out of the way beside it, into
    ``set-aside/``, and log why; it is kept, since it may belong to another run."""
    path = Path(path)
    target = path.parent / "set-aside" / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    log.warning("setting %s aside (%s): moved to %s", path, why, target)
    return target


def complete_checkpoints(
    out_dir: str | Path, digest: str, clean: bool = True, skip: Iterable[Path] = ()
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The complete checkpoints of ``out_dir`` (a run's identity folder) written by the run
    whose identity is ``digest``, newest first, with their markers; each is verified (its files'
    digests) only when the caller asks for it. Unusable folders newer than the newest complete
    one are reported; with ``clean`` (the process that writes), incomplete or corrupt ones are
    deleted (the run writes those steps again) and those of another identity set aside.
    ``skip``: folders not to use (a load of them failed)."""
    skip = {Path(p) for p in skip}
    found = False
    for _step, path in reversed(checkpoints(out_dir)):
        if path in skip:
            continue
        marker, problem = marker_problem(path)
        if problem is None and marker.get("spec_digest") != digest:
            problem = f"written for another run identity ({marker.get('spec_digest')}, this run is {digest})"
            if clean and not found:
                set_aside(path, problem)
                continue
        if problem is None:
            found = True
            yield path, marker
            continue
        if found:  # older than a usable one: it is never read, and rotation removes it
            continue
        log.warning("skipping checkpoint %s: %s", path, problem)
        if clean:
            remove_checkpoint(path, out_dir)


def last_complete(
    out_dir: str | Path, digest: str, drop_unusable: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of ``out_dir`` written by the run with identity ``digest``
    and its marker, or None (``complete_checkpoints``)."""
    return next(complete_checkpoints(out_dir, digest, clean=drop_unusable), None)


def rotate_checkpoints(out_dir: str | Path, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` checkpoint folders with a marker (a crash during the
    next save leaves the previous ones); folders without a marker, newer, are left to resuming."""
    complete = [(step, p) for step, p in checkpoints(out_dir) if (p / MARKER).is_file()]
    for _step, path in complete[: max(0, len(complete) - keep)]:
        remove_checkpoint(path, out_dir)


class CheckpointLoadError(Exception):
    """Loading a complete checkpoint failed; the run falls back to the previous one (or starts
    afresh), which is what the caller does on catching it."""

    def __init__(self, path: str | Path, cause: BaseException):
        super().__init__(f"loading checkpoint {path} failed: {type(cause).__name__}: {cause}".splitlines()[0])
        self.path = Path(path)


class SigtermFlag:
    """Turns SIGTERM into a flag the training loop polls at step boundaries (it then writes a
    checkpoint and stops). Outside training, SIGTERM raises ``Preempted`` at once."""

    def __init__(self):
        self.received = False
        self.training = False
        self._previous = None

    def _handle(self, signum, frame):
        self.received = True
        log.warning(
            "SIGTERM received: %s", "checkpointing at the end of this step" if self.training else "stopping"
        )
        if not self.training:
            raise Preempted("SIGTERM (preemption or time limit) outside training")

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def rank_zero() -> bool:
    """Whether this process writes records and markers (rank 0 of a torchrun job, or alone)."""
    return int(os.environ.get("RANK", "0")) == 0
