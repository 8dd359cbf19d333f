"""The command line as a shell user meets it: output piped into a reader that stops early."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from pathlib import Path

import pytest

from lamda_repro import cli

CONFIG = str(Path(__file__).resolve().parents[1] / "config" / "config.yaml")


@contextlib.contextmanager
def stdout_into_a_pipe():
    """sys.stdout writing into a fresh pipe; yields the reading end's file descriptor, which the
    caller closes. (Inside the test body: pytest resets sys.stdout between setup and call.)"""
    import lamda_repro.recursive  # noqa: F401  (its imports happen before the swap)

    read_fd, write_fd = os.pipe()
    pipe, saved = io.TextIOWrapper(os.fdopen(write_fd, "wb")), sys.stdout
    sys.stdout = pipe
    try:
        yield read_fd
    finally:
        sys.stdout = saved
        with contextlib.suppress(OSError):
            pipe.close()


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch):
    # `lamda-repro list-runs ... | head -1` once head has exited: the reading end is closed.
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with stdout_into_a_pipe() as read_fd:
        os.close(read_fd)
        rc = cli.main(["list-runs", CONFIG])
    assert rc == 128 + signal.SIGPIPE
    assert sys.stderr.getvalue() == ""


def test_output_into_an_open_pipe_is_complete():
    with stdout_into_a_pipe() as read_fd:
        rc = cli.main(["list-runs", CONFIG])
        sys.stdout.flush()
        os.set_blocking(read_fd, False)
        lines = os.read(read_fd, 1 << 16).decode().splitlines()
        os.close(read_fd)
    assert rc == 0 and len(lines) > 10 and lines[0].count("/") == 4


def test_a_broken_pipe_other_than_stdout_is_an_error(monkeypatch):
    def scorer_died(args):
        raise BrokenPipeError("the scorer's stdin")

    monkeypatch.setattr(cli, "cmd_list_runs", scorer_died)
    with pytest.raises(BrokenPipeError, match="scorer"):
        cli.main(["list-runs", CONFIG])
