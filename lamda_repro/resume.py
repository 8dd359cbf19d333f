"""Resumable runs: checkpoint completeness, choosing what to resume from, preemption and the
failure policy shared by fine-tuning and recursive uptraining.

A checkpoint folder counts only when its marker (``checkpoint_complete.json``) is present, was
written last (after every other file of the checkpoint) and still matches the folder (every file
it lists exists with the size it lists). A rerun resumes from the newest such folder; a partial
or corrupt one (a kill during the save, a truncated file) is skipped for the previous one and
never loaded.

Failures are either deterministic (a bad value that shows at run time, a non-finite loss): the
run writes a ``failed`` record and the workflow moves on; or transient (preemption or the time
limit, out of memory, an I/O error, a lost node or peer): the run writes no record and exits with
``TRANSIENT_EXIT`` so that Snakemake (``retries`` in the profile) submits it again, and the next
attempt resumes from the last complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
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


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may go away on a retry (then no record is written)."""
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


def write_marker(ckpt_dir: str | Path, state: dict[str, Any]) -> None:
    """Write the completeness marker of a checkpoint folder, after all its other files."""
    ckpt_dir = Path(ckpt_dir)
    files = {
        str(p.relative_to(ckpt_dir)): p.stat().st_size
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    write_json_atomic(ckpt_dir / MARKER, {**state, "files": files})


def read_marker(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The marker of a complete checkpoint, or None (no marker, unreadable, or the folder does
    not match it)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        marker = json.loads((ckpt_dir / MARKER).read_text())
        for name, size in marker["files"].items():
            if (ckpt_dir / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return marker


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-<step>`` folder, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return sorted(found)


def last_complete(
    out_dir: str | Path, digest: str, drop_unusable: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of ``out_dir`` written by the run whose spec has ``digest``,
    and its marker. Unusable folders newer than it (incomplete, corrupt, or of an earlier spec of
    the same run id) are reported and (``drop_unusable``) removed: the run writes those steps again."""
    for _step, path in reversed(checkpoints(out_dir)):
        marker = read_marker(path)
        if marker is not None and marker.get("spec_digest") == digest:
            return path, marker
        why = "incomplete or corrupt (no valid marker)" if marker is None else "written for another spec"
        log.warning("skipping checkpoint %s: %s", path, why)
        if drop_unusable:
            shutil.rmtree(path, ignore_errors=True)
    return None


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
