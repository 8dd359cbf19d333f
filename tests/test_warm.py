"""Warm starts (lamda_repro/warm.py): a job handed to a server that has its libraries imported
behaves like the same job run cold: status, streams, working directory, environment, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lamda_repro import warm

TESTS = Path(__file__).resolve().parent
OFFLINE = dict.fromkeys(warm.OFFLINE_VARS, "1")


def _env(folder: Path, **extra) -> dict:
    env = {**os.environ, **OFFLINE, warm.ENV_SWITCH: "1", warm.ENV_DIR: str(folder), **extra}
    env.pop(warm.ENV_WORKER, None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def server(tmp_path):
    """A server without preloads (fast), on the socket a client of _env(folder) looks for."""
    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o700)
    env = _env(folder)
    key = subprocess.run(
        [sys.executable, "-c", "from lamda_repro import warm; print(warm.server_key())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    sock = folder / f"{key}.sock"
    # no preloads (fast); idle for 3 s -> it leaves
    code = f"import pathlib, lamda_repro.warm as w; w.serve(pathlib.Path({str(sock)!r}), None, (), 3)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield folder, env, proc
    proc.kill()
    proc.wait()


def _client(
    entry: str, args: list[str], env: dict, cwd: Path, out: Path, answer_timeout: float = 10.0
) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import sys
        from lamda_repro import warm
        warm.ANSWER_TIMEOUT_S = {answer_timeout!r}
        rc = warm.forward(sys.argv[1:], entry={entry!r})
        sys.exit(99 if rc is None else rc)
        """
    )
    with open(out, "w") as fh, open(out.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=cwd, stdout=fh, stderr=err)


def test_status_streams_cwd_and_environment_reach_the_worker(server, tmp_path):
    folder, env, _ = server
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = tmp_path / "out.txt"
    old = os.umask(0o027)  # the client's umask, not the server's, rules the worker's files
    try:
        proc = _client("warm_entries:report", ["3", "a b"], {**env, "WARM_TEST_MARKER": "x;y"}, work, out)
    finally:
        os.umask(old)
    assert proc.wait(timeout=30) == 3
    assert out.read_text() == f"cwd={work} marker=x;y argv=['a b'] umask=27\n"
    assert out.with_suffix(".err").read_text() == "to stderr\n"


def test_sigterm_reaches_the_worker_and_its_status_comes_back(server, tmp_path):
    folder, env, _ = server
    pid_file = tmp_path / "worker.pid"
    proc = _client("warm_entries:wait_for_term", [str(pid_file)], env, tmp_path, tmp_path / "out.txt")
    _wait_for(pid_file.exists)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 75
    assert "got SIGTERM" in (tmp_path / "out.txt").read_text()


def test_a_killed_client_takes_its_worker_with_it(server, tmp_path):
    folder, env, _ = server
    pid_file = tmp_path / "worker.pid"
    proc = _client("warm_entries:wait_for_term", [str(pid_file)], env, tmp_path, tmp_path / "out.txt")
    _wait_for(pid_file.exists)
    worker = int(pid_file.read_text())
    proc.kill()
    proc.wait()
    _wait_for(lambda: not _alive(worker))


def test_a_lost_connection_ends_the_worker_before_the_client_exits(server, tmp_path):
    """The worker's handler dies (the connection breaks): the client reports the failure only
    once the worker is gone, so the worker can never write its record after that report."""
    folder, env, _ = server
    pid_file = tmp_path / "worker.pid"
    proc = _client("warm_entries:wait_for_term", [str(pid_file)], env, tmp_path, tmp_path / "out.txt")
    _wait_for(pid_file.exists)
    worker = int(pid_file.read_text())
    handler = _parent(worker)
    os.kill(handler, signal.SIGKILL)
    assert proc.wait(timeout=30) == 1
    assert not _alive(worker)  # already gone when the client exited
    assert "lost this job" in (tmp_path / "out.err").read_text()


def test_a_server_that_does_not_answer_means_a_cold_start_and_the_job_runs_once(server, tmp_path):
    """A stopped server accepts connections (the kernel queues them) but never answers: the
    client gives up after its timeout and runs the job itself; when the server wakes up, it does
    not start the abandoned job."""
    folder, env, proc = server
    marker = tmp_path / "ran.txt"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        client = _client(
            "warm_entries:append", [str(marker)], env, tmp_path, tmp_path / "out.txt", answer_timeout=1.0
        )
        assert client.wait(timeout=30) == 99  # forward() returned None: run cold
        assert time.monotonic() - started < 15
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    time.sleep(2)  # the woken server takes the queued connection and drops the job
    assert not marker.exists()
    # and it still serves the next client
    again = _client("warm_entries:append", [str(marker)], env, tmp_path, tmp_path / "out2.txt")
    assert again.wait(timeout=30) == 0
    assert marker.read_text() == "ran\n"


def test_a_worker_killed_by_a_signal_ends_the_client_the_same_way(server, tmp_path):
    folder, env, _ = server
    proc = _client("warm_entries:die_by_signal", [], env, tmp_path, tmp_path / "out.txt")
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_stop_and_idle_end_the_server(server):
    folder, env, proc = server
    assert proc.wait(timeout=30) == 0  # idle_s=3: it leaves by itself
    assert not list(folder.glob("*.sock"))


def test_stop_servers(server):
    folder, env, proc = server
    assert warm.stop_servers(folder) == 1
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not list(folder.glob("*.sock"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({warm.ENV_SWITCH: "0"}, "switch off"),
        ({warm.ENV_WORKER: "1"}, "inside a worker"),
        ({"HF_HUB_OFFLINE": "0"}, "online: the libraries would read other switches after the fork"),
    ],
)
def test_cold_unless_every_condition_holds(change, reason, tmp_path):
    env = {**_env(tmp_path), **change}
    assert warm.enabled(_env(tmp_path))
    assert not warm.enabled(env), reason


def test_a_folder_others_can_enter_is_not_used(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    code = "import sys; from lamda_repro import warm; sys.exit(warm.forward(['validate']) is not None)"
    subprocess.run([sys.executable, "-c", code], env=_env(folder), check=True)
    assert list(folder.iterdir()) == []  # no server spawned, no socket looked for


def test_the_server_key_follows_import_time_settings_only():
    base = {**OFFLINE, "HOME": "/h"}
    key = warm.server_key(base, "python", [])
    assert warm.server_key({**base, "HOME": "/other", "SNAKEMAKE_X": "1"}, "python", []) == key
    assert warm.server_key({**base, "HF_HOME": "/cache"}, "python", []) != key
    assert warm.server_key({**base, "OMP_NUM_THREADS": "4"}, "python", []) != key
    assert warm.server_key(base, "python3.12", []) != key
    assert warm.server_key(base, "python", ["/elsewhere"]) != key


def _parent(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent of {pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def _wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
