"""`sglang-gemma4-opt` / `python -m sglang_gemma4_opt`: status and the project's tools."""

from __future__ import annotations

import argparse
import importlib
import json
import sys


def versions() -> dict[str, str]:
    out = {}
    for name in ("sglang", "triton", "torch"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # a missing package is part of the answer
            out[name] = f"not importable ({type(e).__name__})"
    from . import __version__

    out["sglang-gemma4-opt"] = __version__
    return out


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            return f"{torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]})"
    except Exception:
        pass
    return "no GPU"


def status_report() -> dict:
    import logging

    from . import settings
    from .core import apply, fallbacks
    from .patches import PATCHES, SWITCH_NAMES

    logging.getLogger("sglang_gemma4_opt").setLevel(logging.ERROR)  # the table says it all
    res = apply()
    return {
        "versions": versions(),
        "gpu": gpu_name(),
        "switches": {settings.ENV_ENABLE: settings.plugin_enabled(),
                     settings.ENV_DISABLE: sorted(settings.disabled_patches())},
        "switch_problems": settings.switch_problems(SWITCH_NAMES),
        # paths that failed in this process (a server's own appear in its log, one warning per path)
        "fallbacks": fallbacks(),
        "patches": [dict(res[p.NAME].as_dict(), summary=p.SUMMARY) for p in PATCHES],
    }


def cmd_status(args) -> int:
    rep = status_report()
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    for k, v in rep["versions"].items():
        print(f"{k:18s} {v}")
    print(f"{'gpu':18s} {rep['gpu']}")
    print()
    w = max(len(p["name"]) for p in rep["patches"])
    for p in rep["patches"]:
        line = f"{p['name']:{w}s}  {p['status']}"
        if p["reason"]:
            line += f" ({p['reason']})"
        print(line)
    for path, f in rep["fallbacks"].items():
        print(f"fallback: {path} failed ({f['error']}); {f['calls_to_sglang']} call(s) went to sglang")
    for problem in rep["switch_problems"]:
        print(f"warning: {problem}")
    failed = any(p["status"] == "failed" for p in rep["patches"]) or rep["switch_problems"]
    return 1 if args.strict and failed else 0


# Subcommands implemented in their own modules, imported only when used (they pull in GPU code).
_TOOLS = {}


def _add_tool(sub, name: str, module: str, help_: str):
    try:
        mod = importlib.import_module(f"sglang_gemma4_opt.{module}")
    except ImportError:
        return
    p = sub.add_parser(name, help=help_)
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sglang-gemma4-opt", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="versions, GPU and what each patch does in this process")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--strict", action="store_true",
                    help="exit 1 if any patch failed or a switch variable holds a value the plugin does not understand")
    st.set_defaults(func=cmd_status)
    for name, module, help_ in (
        ("bench", "bench.kernels", "kernel benchmarks, stock vs plugin, side by side on this GPU"),
        ("bench-e2e", "bench.e2e", "whole-model benchmark (sglang.bench_one_batch, dummy weights), plugin off/on and modes isolating each optimisation"),
        ("bench-serve", "bench.serve", "serving benchmark: sglang.launch_server + bench_serving per mode (stock, "
                                       "PR #26588, plugin; optionally MTP), TTFT/TPOT/ITL/throughput side by side"),
        ("serve-numerics", "tools.serve_numerics", "plugin server vs stock server logprobs (teacher-forced), against "
                                                    "how far stock differs from itself"),
        ("tune-moe", "tools.tune_moe", "tune fused-MoE configs on this GPU"),
        ("gsm8k", "tools.gsm8k", "GSM8K regression: server with and without the plugin"),
        ("routing-drift", "tools.routing_drift", "how far a routing function drifts from the unfused reference"),
    ):
        _add_tool(sub, name, module, help_)
    args = ap.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
