"""Child processes we always stop: an HTTP server (sglang's launch_server) and its clients.

Each child runs in its own session, so its process group holds everything it forks (sglang's
scheduler and detokenizer processes included) and `stop()` can end them all: SIGTERM to the group,
then SIGKILL after a grace period. Stopping happens on every exit path: `finally` blocks in the
caller, the handlers installed by `stop_on_signals()` (SIGINT/SIGTERM/SIGHUP), an atexit hook, and
on Linux a parent-death signal in case we are killed outright.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

_LIVE: list["ManagedProcess"] = []
_LIVE_LOCK = threading.RLock()
_ATEXIT_SET = False


class ServerError(RuntimeError):
    """The server did not come up; `log_tail` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


class ServerDied(ServerError):
    pass


class ServerTimeout(ServerError):
    pass


class Interrupted(BaseException):
    """Raised in the main thread when SIGTERM/SIGINT/SIGHUP arrives inside `stop_on_signals()`.

    A BaseException (like KeyboardInterrupt) so that ordinary `except Exception` handlers do not
    swallow it and the `finally` blocks on the way out still run.
    """

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def tail(path: str | os.PathLike, lines: int = 40) -> str:
    try:
        data = Path(path).read_bytes()[-64 * 1024:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (a stale server there would answer our health checks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) != 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    Read from /proc rather than probed with killpg(pgid, 0), which also counts zombies that a
    container's PID 1 may never reap and would make every stop wait out its full grace period.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: the coarser probe
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
    out = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces or parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _set_pdeathsig():  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ManagedProcess:
    """A child in its own process group, output to `log_path`; `stop()` ends the whole group."""

    def __init__(self, cmd: list[str], log_path: str | os.PathLike, env: dict | None = None,
                 cwd: str | os.PathLike | None = None, grace: float = 30.0, name: str = "process"):
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.grace = grace
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.stopped = False
        self._log = None

    def start(self) -> "ManagedProcess":
        global _ATEXIT_SET
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"# {self.name}: {' '.join(self.cmd)}\n".encode())
        self._log.flush()
        with _LIVE_LOCK:
            if not _ATEXIT_SET:
                atexit.register(stop_all)
                _ATEXIT_SET = True
            self.proc = subprocess.Popen(
                self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
            self.pgid = self.proc.pid  # a new session's leader: its pid is the group id
            _LIVE.append(self)
        return self

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_group_gone(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            self.proc.poll()  # reap the leader so it does not linger as a zombie
            if not group_members(self.pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after `grace` seconds; idempotent and safe to re-enter
        (a signal handler may call it while a `finally` block is already in it)."""
        if self.proc is None or self.stopped:
            return
        self._signal_group(signal.SIGTERM)
        if not self._wait_group_gone(self.grace):
            self._signal_group(signal.SIGKILL)
            self._wait_group_gone(10.0)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.stopped = True
        if self._log and not self._log.closed:
            self._log.write(f"# {self.name}: stopped (exit {self.proc.returncode})\n".encode())
            self._log.close()
        with _LIVE_LOCK:
            if self in _LIVE:
                _LIVE.remove(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Server(ManagedProcess):
    """An HTTP server child; `wait_ready()` polls its health endpoint and notices an early exit."""

    def __init__(self, cmd: list[str], host: str, port: int, log_path, env: dict | None = None,
                 health_path: str = "/health", startup_timeout: float = 1200.0, grace: float = 30.0,
                 name: str = "server"):
        super().__init__(cmd, log_path, env=env, grace=grace, name=name)
        self.host, self.port = host, port
        self.health_path = health_path
        self.startup_timeout = startup_timeout

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def wait_ready(self, poll: float = 1.0) -> float:
        """Seconds until the health endpoint answered 200; ServerDied / ServerTimeout otherwise."""
        t0 = time.monotonic()
        while True:
            rc = self.poll()
            if rc is not None:
                raise ServerDied(f"{self.name} exited with code {rc} before it was ready "
                                 f"(log: {self.log_path})", self.log_tail())
            try:
                with urllib.request.urlopen(self.base_url + self.health_path, timeout=10) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError, ValueError):
                pass  # not listening yet, or 503 while it loads
            if time.monotonic() - t0 > self.startup_timeout:
                raise ServerTimeout(f"{self.name} not ready after {self.startup_timeout:.0f} s "
                                    f"(log: {self.log_path})", self.log_tail())
            time.sleep(poll)

    def get_json(self, path: str, timeout: float = 60.0) -> dict:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return json.loads(r.read())


def live() -> list[ManagedProcess]:
    with _LIVE_LOCK:
        return list(_LIVE)


def stop_all() -> None:
    for p in reversed(live()):
        p.stop()


def _kill_all_now() -> None:
    for p in live():
        p._signal_group(signal.SIGKILL)


@contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    """Inside: each of `signals` stops every live child, then raises `Interrupted` in the main
    thread. A second signal while the first is being handled SIGKILLs the children at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread
        return
    state = {"signalled": False}

    def handler(signum, frame):
        if state["signalled"]:
            _kill_all_now()
        else:
            state["signalled"] = True
            stop_all()
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
