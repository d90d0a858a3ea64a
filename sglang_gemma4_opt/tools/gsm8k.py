"""`sglang-gemma4-opt gsm8k`: MTP GSM8K with the plugin and without it, on the same GPU(s), in turn.

For each configuration: start `python -m sglang.launch_server` (Gemma4 target + its assistant
draft, triton attention, deterministic inference), wait for /health, run sglang's own
`python -m sglang.test.few_shot_gsm8k --data-path ...`, read the average accept length from
/server_info, stop the server. The stock run sets SGLANG_GEMMA4_OPT=0 in the server's
environment. Then the limits (upstream's Gemma4 MTP test: score >= 0.41, accept length >= 1.5;
and plugin >= stock - 0.02) decide the exit status: 0 pass, 1 a limit missed, 2 a run failed,
128+N interrupted by signal N. Reports: gsm8k_report.json and gsm8k_report.md in --out.

Deterministic inference is on by default because upstream's test uses it: without it the score
of one configuration swings by about 0.06 between runs, more than the 0.02 this gate resolves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import gsm8k_score as gs
from .gsm8k_report import RunResult, Thresholds, evaluate, exit_code, run_dict, write_reports
from .server import Interrupted, ManagedProcess, Server, ServerError, port_is_free, stop_on_signals, tail

ENV_ENABLE = "SGLANG_GEMMA4_OPT"  # settings.ENV_ENABLE, spelled out so this module imports without torch

# /server_info fields worth keeping in the report (it also returns every server argument).
_SERVER_FIELDS = ("version", "speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps",
                  "speculative_eagle_topk", "speculative_num_draft_tokens", "attention_backend",
                  "enable_deterministic_inference", "tp_size", "load_format", "disable_cuda_graph",
                  "context_length", "max_running_requests")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    th = Thresholds()
    g = p.add_argument_group("model and server")
    g.add_argument("--model-path", help="Gemma4 26B-A4B-it folder or hub id (default with --write-dummy-models: "
                                         "the dummy target)")
    g.add_argument("--draft-model-path", help="its MTP assistant draft (Gemma4AssistantForCausalLM); "
                                               "without one the runs are plain decoding and accept length is not checked")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=30300, help="server port (must be free)")
    g.add_argument("--load-format", help="passed to the server for target and draft; 'dummy' means random weights "
                                         "(limits reported, not enforced)")
    g.add_argument("--attention-backend", default="triton")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="--enable-deterministic-inference on the server (default on, as upstream's test)")
    g.add_argument("--speculative-num-steps", type=int, default=5)
    g.add_argument("--speculative-eagle-topk", type=int, default=1)
    g.add_argument("--speculative-num-draft-tokens", type=int, default=6)
    g.add_argument("--context-length", type=int, help="server --context-length (a 5-shot prompt + 512 new tokens "
                                                      "fits in 4096)")
    g.add_argument("--mem-fraction-static", type=float)
    g.add_argument("--extra-server-args", default="", help="more launch_server arguments, one shell-quoted string; "
                                                    "write --extra-server-args='--flag ...' (with '=')")
    g.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    g.add_argument("--stop-grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    g.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m sglang.launch_server",
                   help="command that starts the server; the server arguments are appended")
    g.add_argument("--health-path", default="/health")
    g.add_argument("--write-dummy-models", metavar="DIR",
                   help="write dummy target + draft folders (real 26B-A4B shapes, no weights) to DIR/target and "
                        "DIR/draft; unless --model-path is given, run on them with --load-format dummy")

    g = p.add_argument_group("evaluation")
    g.add_argument("--data-path", help="GSM8K jsonl (default: the test split shipped in this package)")
    g.add_argument("--num-questions", type=int, default=200)
    g.add_argument("--num-shots", type=int, default=5)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--parallel", type=int, default=128, help="client threads")
    g.add_argument("--client-timeout", type=float, default=3600.0)
    g.add_argument("--runs", choices=["both", "plugin", "stock"], default="both")
    g.add_argument("--order", choices=["plugin-first", "stock-first"], default="plugin-first")

    g = p.add_argument_group("limits")
    g.add_argument("--min-score", type=float, default=th.min_score)
    g.add_argument("--min-accept-length", type=float, default=th.min_accept_length)
    g.add_argument("--max-drop", type=float, default=th.max_drop, help="largest allowed stock - plugin score")
    g.add_argument("--allow-random-weights", action="store_true",
                   help="report the limits but do not enforce them (implied by --load-format dummy)")
    g.add_argument("--out", default="gsm8k-report", help="output folder (logs, dumps, reports)")


def server_command(args, plugin: bool) -> list[str]:
    cmd = shlex.split(args.launcher) + [
        "--model-path", args.model_path, "--host", args.host, "--port", str(args.port),
        "--tp-size", str(args.tp), "--attention-backend", args.attention_backend]
    if args.draft_model_path:
        # NEXTN with a Gemma4AssistantForCausalLM draft is promoted to FROZEN_KV_MTP by sglang.
        cmd += ["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", args.draft_model_path,
                "--speculative-num-steps", str(args.speculative_num_steps),
                "--speculative-eagle-topk", str(args.speculative_eagle_topk),
                "--speculative-num-draft-tokens", str(args.speculative_num_draft_tokens)]
    if args.deterministic:
        cmd.append("--enable-deterministic-inference")
    if args.load_format:
        cmd += ["--load-format", args.load_format]
        if args.draft_model_path:
            cmd += ["--speculative-draft-load-format", args.load_format]
    if args.context_length:
        cmd += ["--context-length", str(args.context_length)]
    if args.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(args.mem_fraction_static)]
    return cmd + shlex.split(args.extra_server_args)


def server_env(plugin: bool, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env[ENV_ENABLE] = "1" if plugin else "0"
    # As upstream's Gemma4 MTP test: Frozen-KV MTP runs on the v1 speculative path.
    env.setdefault("SGLANG_ENABLE_SPEC_V2", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def client_command(args, data_path: str) -> list[str]:
    return [sys.executable, "-m", "sglang.test.few_shot_gsm8k", "--data-path", str(data_path),
            "--num-questions", str(args.num_questions), "--num-shots", str(args.num_shots),
            "--max-new-tokens", str(args.max_new_tokens), "--parallel", str(args.parallel),
            "--host", args.host, "--port", str(args.port)]


def load_format(args) -> str | None:
    """--load-format, also when it came in through --extra-server-args."""
    if args.load_format:
        return args.load_format
    toks = shlex.split(args.extra_server_args)
    for i, t in enumerate(toks):
        if t == "--load-format" and i + 1 < len(toks):
            return toks[i + 1]
        if t.startswith("--load-format="):
            return t.split("=", 1)[1]
    return None


def accept_length(info: dict) -> float | None:
    """Mean of `avg_spec_accept_length` over the data-parallel ranks that report it."""
    vals = [s["avg_spec_accept_length"] for s in info.get("internal_states") or []
            if isinstance(s, dict) and s.get("avg_spec_accept_length") is not None]
    return sum(vals) / len(vals) if vals else None


def plugin_lines(log_path: Path, limit: int = 200) -> list[str]:
    """Lines the plugin logged inside the server's processes (one set per process that loaded it)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if "sglang-gemma4-opt" in ln][:limit]


def run_one(args, name: str, plugin: bool, data_path: str, out: Path) -> RunResult:
    rdir = out / name
    rdir.mkdir(parents=True, exist_ok=True)
    res = RunResult(name=name, plugin_enabled=plugin)
    res.files = {"server_log": str(rdir / "server.log"), "client_log": str(rdir / "client.log"),
                 "answers": str(rdir / "tmp_output_gsm8k.txt")}
    if not port_is_free(args.host, args.port):
        res.error = f"port {args.port} on {args.host} is already in use; pass a free --port"
        return res
    server = Server(server_command(args, plugin), args.host, args.port, rdir / "server.log",
                    env=server_env(plugin), health_path=args.health_path,
                    startup_timeout=args.startup_timeout, grace=args.stop_grace, name=f"{name} server")
    print(f"[{name}] starting server ({ENV_ENABLE}={int(plugin)}), log {rdir / 'server.log'}", flush=True)
    try:
        server.start()
        res.startup_s = round(server.wait_ready(), 1)
        print(f"[{name}] ready after {res.startup_s} s; running few_shot_gsm8k", flush=True)
        client = ManagedProcess(client_command(args, data_path), rdir / "client.log", cwd=rdir,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), grace=10, name=f"{name} client")
        with client:
            try:
                rc = client.wait(timeout=args.client_timeout)
            except subprocess.TimeoutExpired as e:
                res.error = f"few_shot_gsm8k did not finish in {args.client_timeout:.0f} s ({type(e).__name__})"
                res.error_log_tail = client.log_tail()
                return res
        client_out = client.log_path.read_text(errors="replace")
        if rc != 0:
            res.error = f"few_shot_gsm8k exited with code {rc}"
            res.error_log_tail = client.log_tail()
            return res
        metrics = gs.parse_client_output(client_out)
        res.score = metrics["accuracy"]
        res.invalid, res.latency_s = metrics.get("invalid"), metrics.get("latency_s")
        res.output_throughput = metrics.get("output_throughput")
        info = server.get_json("/server_info")
        res.accept_length = accept_length(info)
        res.server = {k: info.get(k) for k in _SERVER_FIELDS if k in info}
        _rescore(res, rdir, data_path, args.num_shots)
        print(f"[{name}] score {res.score:.3f}, accept length "
              f"{'n/a' if res.accept_length is None else f'{res.accept_length:.3f}'}", flush=True)
    except ServerError as e:
        res.error, res.error_log_tail = str(e), e.log_tail
    except ValueError as e:  # client output without an Accuracy line
        res.error = str(e)
        res.error_log_tail = tail(rdir / "client.log")
    except OSError as e:  # /server_info unreachable, files missing
        res.error = f"{type(e).__name__}: {e}"
        res.error_log_tail = server.log_tail()
    finally:
        server.stop()
        res.plugin_log_lines = plugin_lines(rdir / "server.log")
        print(f"[{name}] server stopped", flush=True)
    return res


def _rescore(res: RunResult, rdir: Path, data_path: str, num_shots: int) -> None:
    """Recount the client's answers from its dump; a mismatch with its printed score is an error."""
    dump = rdir / "tmp_output_gsm8k.txt"
    try:
        rows = gs.load_questions(data_path)
        states = gs.parse_state_dump(dump.read_text(errors="replace"))
        sc, per_q = gs.rescore(states, rows, num_shots)
    except (OSError, ValueError) as e:
        # The printed score stays the official one; a dump this code cannot read (a changed
        # sglang format) is noted, not failed.
        res.notes.append(f"could not rescore from {dump.name}: {e}")
        return
    res.rescored = sc.as_dict()
    (rdir / "answers.json").write_text(json.dumps(per_q, indent=0))
    if abs(sc.accuracy - res.score) > 0.0005 + 1e-9:  # the client prints 3 decimals
        res.error = (f"few_shot_gsm8k printed accuracy {res.score:.3f}, but its dumped answers score "
                     f"{sc.correct}/{sc.total} = {sc.accuracy:.4f}")


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("sglang", "sglang-gemma4-opt", "torch", "triton", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.write_dummy_models:
        from .dummy_model import write_dummy_models

        t, d = write_dummy_models(args.write_dummy_models)
        print(f"dummy models: {t} {d}", flush=True)
        if not args.model_path:
            args.model_path, args.draft_model_path = str(t), args.draft_model_path or str(d)
            args.load_format = args.load_format or "dummy"
    if not args.model_path:
        print("error: --model-path is required (or --write-dummy-models DIR)", file=sys.stderr)
        return 2
    # absolute: the client runs in the run's folder (where it drops tmp_output_gsm8k.txt)
    data_path = str(Path(args.data_path).resolve()) if args.data_path else str(gs.default_data_path())
    n_rows = len(gs.load_questions(data_path))
    if n_rows < args.num_questions:
        print(f"error: {data_path} has {n_rows} questions, fewer than --num-questions {args.num_questions}",
              file=sys.stderr)
        return 2
    random_weights = args.allow_random_weights or load_format(args) == "dummy"
    th = Thresholds(args.min_score, args.min_accept_length, args.max_drop)
    order = [("plugin", True), ("stock", False)]
    if args.order == "stock-first":
        order.reverse()
    order = [o for o in order if args.runs in ("both", o[0])]

    results: dict[str, RunResult] = {}
    interrupted = None
    t0 = time.time()
    try:
        with stop_on_signals():
            for name, plugin in order:
                results[name] = run_one(args, name, plugin, data_path, out)
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted = getattr(e, "signum", 2)
        print(f"interrupted ({interrupted}); servers stopped", file=sys.stderr, flush=True)

    verdict = evaluate(results.get("plugin"), results.get("stock"), th, enforce=not random_weights,
                       need_accept=bool(args.draft_model_path))
    payload = {
        "verdict": verdict,
        "random_weights": random_weights,
        "interrupted_by_signal": interrupted,
        "thresholds": dataclasses.asdict(th),
        "config": {"model_path": args.model_path, "draft_model_path": args.draft_model_path, "tp": args.tp,
                   "num_questions": args.num_questions, "num_shots": args.num_shots, "data_path": data_path,
                   "max_new_tokens": args.max_new_tokens, "deterministic": args.deterministic,
                   "server_args": server_command(args, True)[len(shlex.split(args.launcher)):]},
        "versions": versions(),
        "runs": [run_dict(r) for r in results.values()],
        "wall_s": round(time.time() - t0, 1),
    }
    j, m = write_reports(out, payload)
    print(m.read_text(), flush=True)
    print(f"reports: {j} {m}", flush=True)
    if interrupted is not None:
        return 128 + interrupted
    return exit_code(verdict)
