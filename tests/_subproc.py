"""Run a snippet in a fresh interpreter: plugin state is per process."""

import os
import subprocess
import sys
import textwrap


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
