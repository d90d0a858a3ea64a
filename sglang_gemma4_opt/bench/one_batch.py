"""`python -m sglang_gemma4_opt.bench.one_batch ARGS`: sglang's `bench_one_batch` with plugins loaded.

sglang 0.5.12's `python -m sglang.bench_one_batch` never calls `load_plugins()` (only the server,
Engine and scheduler processes do), so run as is it would measure stock sglang whatever is installed.
This runs the same benchmark (same arguments, same `main`) after `load_plugins()`, in the main process
and in every TP worker it spawns. `SGLANG_GEMMA4_OPT=0` then gives the plugin-off run through the
identical path. The first line it prints starting with `G4OPT_STATUS ` is JSON: versions, GPU and
each patch's status in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

STATUS_PREFIX = "G4OPT_STATUS "


def load_plugins() -> dict:
    """sglang's plugin loading, as a server process does it; falls back to apply() if the entry point
    is not installed (a source checkout on PYTHONPATH)."""
    from sglang.srt.plugins import load_plugins as _load

    from .. import core

    _load()
    if core.results() is None:
        from .. import apply

        apply()
    return {name: r.as_dict() for name, r in (core.results() or {}).items()}


def _latency_test_with_plugins(*args, **kwargs):
    """bench_one_batch.latency_test in a process that loaded the plugins first (TP workers are spawned)."""
    load_plugins()
    from sglang import bench_one_batch as b

    original = b.__dict__.get("_g4opt_original_latency_test", b.latency_test)
    return original(*args, **kwargs)


def main(argv=None) -> int:
    from sglang import bench_one_batch as b

    from ..cli import gpu_name, versions

    patches = load_plugins()
    print(STATUS_PREFIX + json.dumps({"versions": versions(), "gpu": gpu_name(), "patches": patches,
                                      "SGLANG_GEMMA4_OPT": os.environ.get("SGLANG_GEMMA4_OPT")}), flush=True)

    # main() picks `latency_test` from its module globals when it runs, so workers get the wrapper.
    if "_g4opt_original_latency_test" not in b.__dict__:
        b._g4opt_original_latency_test = b.latency_test
        b.latency_test = _latency_test_with_plugins

    parser = argparse.ArgumentParser(prog="sglang_gemma4_opt.bench.one_batch")
    b.ServerArgs.add_cli_args(parser)
    b.BenchArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    server_args = b.ServerArgs.from_cli_args(args)
    bench_args = b.BenchArgs.from_cli_args(args)
    logging.basicConfig(level=getattr(logging, server_args.log_level.upper()), format="%(message)s")
    try:
        b.main(server_args, bench_args)
    finally:
        if server_args.tp_size != 1:
            b.kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
