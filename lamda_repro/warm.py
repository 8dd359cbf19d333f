"""Warm starts for the workflow's local jobs: torch, transformers, peft imported once, not per job.

Every heavy job of the smoke workflow spends ~6-7 s importing torch / transformers / peft /
datasets / evaluate before it does anything (about a third of the smoke workflow's CPU time). With warm
starts on, ``lamda-repro <command>`` does not run the command in its own interpreter: it hands its
command line, environment, working directory and standard streams (the file descriptors
themselves, passed over a Unix socket) to a *zygote* server of this user that has those libraries
imported, which forks a fresh worker for it. The worker runs ``lamda_repro.cli.main`` exactly as
the client would have; the client waits, forwards SIGTERM / SIGINT / SIGHUP to it, and exits with
its status. Nothing else changes: one job is still one process tree with its own log, record and
seed.

The worker lives only as long as its client: a client killed with SIGKILL takes its worker with
it (its handler sees the connection close), a handler that dies takes its worker with it (the
kernel's parent-death signal), and a client whose connection breaks kills the worker and waits
until it is gone before it reports the failure, so a retry never trains beside a worker that
would still write the record. A worker starts only after its client confirmed it (a second
message), so a client that gave up waiting never has its job run twice.

Safety rules (each falls back to the ordinary cold start, never to an error):
- only when ``LAMDA_REPRO_WARM=1`` (the Snakefile sets it for local execution when the config
  says ``warm_start: true``) and the Hugging Face offline switches are already set in the
  environment, so that nothing the libraries read at import time changes after the fork;
- the server's socket lives in a folder of this user with mode 0700 (checked before connecting);
  its name is a digest of the interpreter, ``sys.path`` and the environment variables that
  libraries read at import time, so a client with other settings gets its own server;
- the suite's own modules are never preloaded: a worker always imports the code on disk;
- no server: the client spawns one in the background and runs its own job cold. The server exits
  after ``IDLE_S`` seconds without a job (and when the workflow ends: :func:`stop_servers`);
- a server that does not answer within ``ANSWER_TIMEOUT_S`` (stopped, overloaded, hung in an
  import): the client runs its job cold.

Only the standard library is imported here: this module runs before anything heavy.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

ENV_SWITCH = "LAMDA_REPRO_WARM"
ENV_DIR = "LAMDA_REPRO_WARM_DIR"  # where the sockets live (default: a folder of this user in /tmp)
ENV_WORKER = "LAMDA_REPRO_WARM_WORKER"  # set in a worker: never forward again from inside one
PRELOAD = ("torch", "transformers", "transformers.trainer", "peft", "datasets", "evaluate")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE")
# Variables that libraries read when they are imported (a worker cannot change them afterwards).
_IMPORT_TIME_PREFIXES = (
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "PYTHON",
    "LD_",
    "MPLBACKEND",
)
IDLE_S = 120.0
FAILED_RETRY_S = 600.0
# Seconds a client waits for the server to take its job (connect and the worker's pid) before it
# runs the job cold; a live server answers in milliseconds.
ANSWER_TIMEOUT_S = 10.0
# Seconds a client waits for a worker it killed to be gone.
KILL_WAIT_S = 30.0
_GO = b"g"  # the client's confirmation that its worker may start
_HEADER = struct.Struct("!I")


def enabled(env=None) -> bool:
    """Whether this process may hand its command to a warm server."""
    env = os.environ if env is None else env
    return (
        env.get(ENV_SWITCH) == "1"
        and env.get(ENV_WORKER) != "1"
        and int(env.get("WORLD_SIZE", "1")) <= 1  # a torchrun process trains here, with its group
        and all(env.get(v) == "1" for v in OFFLINE_VARS)
        and hasattr(socket, "send_fds")
        and sys.platform.startswith("linux")
    )


def enable_for_jobs() -> None:
    """Turn warm starts on for the jobs this process starts (the Snakefile, local execution): the
    offline switches are set here too, so the server imports with the jobs' settings."""
    for name in OFFLINE_VARS:
        os.environ.setdefault(name, "1")
    os.environ[ENV_SWITCH] = "1"


def server_key(env=None, executable: str | None = None, path: list[str] | None = None) -> str:
    """The digest naming the server that fits this interpreter and environment."""
    env = os.environ if env is None else env
    relevant = sorted((k, v) for k, v in env.items() if k.startswith(_IMPORT_TIME_PREFIXES))
    blob = json.dumps(
        {
            "exe": executable or sys.executable,
            "path": path if path is not None else sys.path[1:],  # [0] is the script's folder
            "env": relevant,
            "preload": PRELOAD,
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def socket_dir(env=None) -> Path:
    env = os.environ if env is None else env
    base = env.get(ENV_DIR) or os.path.join("/tmp", f"lamda-repro-warm-{os.getuid()}")
    return Path(base)


def _private_dir(path: Path, create: bool) -> bool:
    """Whether ``path`` is a folder owned by this user that nobody else can enter (made if asked)."""
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            return False
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not (st.st_mode & 0o077)


# ---------------------------------------------------------------------------------------- client
def forward(argv: list[str], entry: str = "lamda_repro.cli:main") -> int | None:
    """Run ``entry(argv)`` (by default ``lamda-repro argv``) in a warm worker; its exit status, or
    None when the command is to run here (cold)."""
    if not enabled():
        return None
    folder = socket_dir()
    if not _private_dir(folder, create=True):
        return None
    sock_path = folder / f"{server_key()}.sock"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(ANSWER_TIMEOUT_S)
    try:
        conn.connect(str(sock_path))
    except TimeoutError:
        conn.close()
        return None  # a server that does not take connections: run here, leave its socket alone
    except OSError:
        conn.close()
        _spawn_server(folder, sock_path)
        return None
    try:
        return _run_remote(conn, argv, entry)
    finally:
        conn.close()


def _send_msg(conn: socket.socket, obj, fds=()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(conn, [_HEADER.pack(len(data)) + data], list(fds))
    else:
        conn.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("warm server closed the connection")
        buf += chunk
    return buf


def _recv_msg(conn: socket.socket):
    (n,) = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
    return json.loads(_recv_exact(conn, n))


def _run_remote(conn: socket.socket, argv: list[str], entry: str) -> int | None:
    env = dict(os.environ)
    env.pop(ENV_SWITCH, None)
    env[ENV_WORKER] = "1"
    umask = os.umask(0o022)
    os.umask(umask)
    request = {"argv": list(argv), "entry": entry, "env": env, "cwd": os.getcwd(), "umask": umask}
    # Until the worker is confirmed, a server that does not answer in time (timeout) or goes away
    # loses nothing: the job has not started, and it runs here.
    try:
        conn.settimeout(ANSWER_TIMEOUT_S)
        _send_msg(conn, request, fds=(0, 1, 2))
        worker = int(_recv_msg(conn)["pid"])
        handle = _pidfd(worker)
        conn.sendall(_GO)
        conn.settimeout(None)
    except (OSError, ConnectionError, ValueError, KeyError):
        return None
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

    def relay(signum, _frame):
        _signal_worker(worker, handle, signum)

    previous = {s: signal.signal(s, relay) for s in forwarded}
    try:
        while True:
            try:
                reply = _recv_msg(conn)
                break
            except InterruptedError:
                continue
    except (OSError, ConnectionError, ValueError):
        # The worker's handler is gone: end the worker before reporting, so that nothing of this
        # job runs (or writes its record) after this client has exited.
        gone = _kill_worker(worker, handle)
        print(
            "lamda-repro: the warm-start server lost this job (its worker did not report); the worker "
            + ("was stopped" if gone else f"(pid {worker}) did not stop within {KILL_WAIT_S:.0f} s"),
            file=sys.stderr,
        )
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if handle is not None:
            os.close(handle)
    if "signal" in reply:  # end the way the worker ended: killed by that signal
        sys.stdout.flush()
        sig = int(reply["signal"])
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return int(reply["exit"])


def _pidfd(pid: int) -> int | None:
    """A pidfd of the worker (signals reach that process even after its pid is reused)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _signal_worker(pid: int, handle: int | None, signum: int) -> None:
    try:
        if handle is not None:
            signal.pidfd_send_signal(handle, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, OSError):
        pass


def _kill_worker(pid: int, handle: int | None) -> bool:
    """SIGKILL the worker and wait until it has ended; whether it did within ``KILL_WAIT_S``."""
    import select

    _signal_worker(pid, handle, signal.SIGKILL)
    if handle is not None:  # readable once the process has ended
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        return bool(poller.poll(KILL_WAIT_S * 1000))
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _spawn_server(folder: Path, sock_path: Path) -> None:
    """Start a server in the background unless another client is starting one."""
    import fcntl

    lock_path = folder / f"{sock_path.stem}.lock"
    failed = sock_path.with_suffix(".failed")
    try:
        if time.time() - failed.stat().st_mtime < FAILED_RETRY_S:
            return  # the last server could not import its libraries: run cold for a while
    except OSError:
        pass
    try:
        lock = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another client is starting it
        log = open(folder / f"{sock_path.stem}.log", "ab")  # noqa: SIM115 (handed to the child)
        env = dict(os.environ)
        env.pop(ENV_SWITCH, None)
        subprocess.Popen(
            [sys.executable, "-m", "lamda_repro.warm", "serve", str(sock_path), str(lock)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=folder,  # `-m` puts the cwd first on sys.path: never a checkout's folder
            start_new_session=True,
            close_fds=True,
            pass_fds=(lock,),
        )
        log.close()
    finally:
        os.close(lock)  # the server holds its inherited copy of the lock while it imports


def stop_servers(folder: Path | None = None) -> int:
    """Ask every warm server of this user in ``folder`` to exit (the workflow's end); how many."""
    folder = socket_dir() if folder is None else folder
    if not _private_dir(folder, create=False):
        return 0
    stopped = 0
    for sock_path in folder.glob("*.sock"):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(5)
        try:
            conn.connect(str(sock_path))
            _send_msg(conn, {"stop": True})
            stopped += 1
        except OSError:
            pass
        finally:
            conn.close()
    return stopped


# ---------------------------------------------------------------------------------------- server
def serve(sock_path: Path, lock_fd: int | None = None, preload=PRELOAD, idle_s: float = IDLE_S) -> None:
    """Import ``preload``, then fork a worker per connection until idle for ``idle_s`` seconds."""
    failed = sock_path.with_suffix(".failed")
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException:
        failed.write_text(traceback.format_exc())  # clients stop spawning servers for a while
        raise
    failed.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    tmp = sock_path.with_suffix(f".{os.getpid()}.tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp))
    os.chmod(tmp, 0o600)
    listener.listen(64)
    os.replace(tmp, sock_path)  # clients see the socket only once it accepts
    ours = os.stat(sock_path).st_ino
    if lock_fd is not None:
        os.close(lock_fd)
    listener.settimeout(1.0)
    handlers: set[int] = set()
    last = time.monotonic()
    try:
        while _inode(sock_path) == ours:  # removed or replaced by another server: leave
            handlers -= _reaped(handlers)
            if handlers:
                last = time.monotonic()
            elif time.monotonic() - last > idle_s:
                return
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            last = time.monotonic()
            pid = os.fork()
            if pid == 0:  # handler of this connection
                listener.close()
                code = 1
                try:
                    code = _handle(conn)
                except BaseException:  # noqa: BLE001 - a handler never returns into the server loop
                    traceback.print_exc()
                finally:
                    os._exit(code)
            conn.close()
            handlers.add(pid)
    finally:
        listener.close()
        if _inode(sock_path) == ours:
            try:
                sock_path.unlink()
            except OSError:
                pass


def _exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _reaped(pids: set[int]) -> set[int]:
    done = set()
    for pid in pids:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            got = pid
        if got:
            done.add(pid)
    return done


def _handle(conn: socket.socket) -> int:
    """One job: receive it, fork its worker, report the worker's end to the client."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    conn.settimeout(30)
    msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    (n,) = _HEADER.unpack(msg[: _HEADER.size])
    body = msg[_HEADER.size :]
    while len(body) < n:
        chunk = conn.recv(n - len(body))
        if not chunk:
            return 1
        body += chunk
    request = json.loads(body)
    if request.get("stop"):
        os.kill(os.getppid(), signal.SIGTERM)
        return 0
    if len(fds) != 3:
        return 1
    go_read, go_write = os.pipe()
    handler = os.getpid()
    worker = os.fork()
    if worker == 0:
        conn.close()
        os.close(go_write)
        _die_with_parent(handler)
        if os.read(go_read, 1) != _GO:  # the client never confirmed (it runs the job itself)
            os._exit(1)
        os.close(go_read)
        _become_worker(request, fds)  # never returns
    os.close(go_read)
    for fd in fds:
        os.close(fd)
    try:
        _send_msg(conn, {"pid": worker})
        confirmed = _recv_exact(conn, len(_GO)) == _GO
    except (OSError, ConnectionError):
        confirmed = False
    if not confirmed:  # the client timed out or went away: this job is not ours to run
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        return 0
    os.write(go_write, _GO)
    os.close(go_write)
    conn.settimeout(None)
    while True:
        got, status = os.waitpid(worker, os.WNOHANG)
        if got:
            break
        # a client that vanished (SIGKILL) takes its worker with it
        conn.settimeout(0.2)
        try:
            if conn.recv(1, socket.MSG_PEEK) == b"":
                os.kill(worker, signal.SIGKILL)
                os.waitpid(worker, 0)
                return 0
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            os.kill(worker, signal.SIGKILL)
            os.waitpid(worker, 0)
            return 0
    conn.settimeout(None)
    reply = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
    try:
        _send_msg(conn, reply)
    except OSError:
        pass
    return 0


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent (the job's handler, which holds the
    client's connection) dies; exit now if it already has."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _become_worker(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        argv = list(request["argv"])
        sys.argv = ["lamda-repro", *argv]
        module, _, function = request.get("entry", "lamda_repro.cli:main").partition(":")
        main = getattr(importlib.import_module(module), function)
        try:
            code = int(main(argv) or 0)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - the worker reports every failure as a status
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) in (2, 3) and args[0] == "serve":
        serve(Path(args[1]), int(args[2]) if len(args) == 3 else None)
        return 0
    if args == ["stop"]:
        print(f"stopped {stop_servers()} warm server(s)")
        return 0
    print("usage: python -m lamda_repro.warm serve SOCKET [LOCK_FD] | stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
