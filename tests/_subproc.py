"""Run a snippet in a fresh interpreter: plugin state is per process."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def run_py(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter (plugin state is per process)."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("SGLANG_GEMMA4_OPT") and k != "SGLANG_PLUGINS"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def is_hooked(obj) -> bool:
    """True for a function installed by sglang's HookRegistry (its wrappers come from hook_registry.py).

    (`__wrapped__` alone proves nothing: functools.lru_cache sets it too.)
    """
    f = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
    code = getattr(f, "__code__", None)
    return code is not None and code.co_filename.endswith("hook_registry.py")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is dead for the lifecycle tests' purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pids, seconds: float = 15.0) -> list[int]:
    """The pids still alive after up to `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]
