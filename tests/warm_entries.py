"""Entry points that tests/test_warm.py runs inside warm-start workers (imported by the worker)."""

from __future__ import annotations

import os
import signal
import sys
import time


def report(argv: list[str]) -> int:
    """Print where and how the worker runs (folder, environment, arguments, umask); exit with the
    status named by argv[0]."""
    umask = os.umask(0)
    print(f"cwd={os.getcwd()} marker={os.environ.get('WARM_TEST_MARKER')} argv={argv[1:]} umask={umask:o}")
    print("to stderr", file=sys.stderr)
    return int(argv[0])


def wait_for_term(argv: list[str]) -> int:
    """Write our pid to argv[0], then wait; SIGTERM ends with 75 (as a run saving a checkpoint)."""

    def on_term(signum, _frame):
        print("got SIGTERM", flush=True)
        os._exit(75)

    signal.signal(signal.SIGTERM, on_term)
    with open(argv[0] + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(argv[0] + ".tmp", argv[0])
    time.sleep(60)
    return 0


def die_by_signal(argv: list[str]) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def append(argv: list[str]) -> int:
    """Append a line to the file argv[0] (a job that shows how often it ran)."""
    with open(argv[0], "a") as fh:
        fh.write("ran\n")
    return 0
