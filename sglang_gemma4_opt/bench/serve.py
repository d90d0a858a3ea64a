"""`sglang-gemma4-opt bench-serve`: what a user of a running sglang server feels, stock vs plugin, side by side.

    sglang-gemma4-opt bench-serve                                    # off vs on, the full grid below
    sglang-gemma4-opt bench-serve --modes off pr on --mtp            # + PR #26588's state, + MTP servers
    sglang-gemma4-opt bench-serve --input-lens 1024 --concurrencies 1 --profile-prefill   # quick look

Per mode (`off` = stock, `pr` = PR #26588's changes alone, `on` = the plugin; the same environments as
`bench-e2e`'s modes; `pr` keeps the plugin's MTP crash fix `frozen_kv_mtp_finished_batch`, so `pr+mtp` can run), one `python -m sglang.launch_server` on a Gemma4 26B-A4B folder this command writes
(real shape, `--load-format dummy`, `--attention-backend triton`), then, in this order:

  1. cold pass: the first requests after `/health_generate` answers (input 1024, output 256, the largest
     concurrency): what users meet right after a (re)start, when every kernel that only runs on a
     request's path still compiles. Recorded as `cold`, and against the same row run warm later.
  2. per input length: a TTFT probe (output 1, concurrency 1, `--ttft-prompts` requests), then each
     concurrency with output `--output-len`. Each of these rows runs a discarded warm-up pass of its own
     shape first, then `--repeats` timed passes; each pass draws fresh random prompts (a new seed), so the
     radix cache never holds a timed prompt.
  3. with `--profile-prefill`: one prefill per input length under sglang's torch profiler
     (`/start_profile`), kernels summed by name and by what they do (attention, MoE, GEMM, norm, ...).

The client is sglang's own `bench_serving` (`--backend sglang --dataset-name random-ids --tokenize-prompt
--random-range-ratio 1`: token ids sent as ids, so every input is exactly its length), run through
`bench/serve_client.py`, which counts a streamed chunk as a token by `meta_info.completion_tokens` rather
than by non-empty text: the dummy tokenizer decodes special tokens to nothing, and bench_serving's own
client would then take a later chunk for the first token. Metrics are bench_serving's: TTFT, TPOT, ITL,
end-to-end latency (median and p99 over the requests of a pass) and output throughput; over repeats the
median of each is kept.

Servers are always stopped (process groups, also on Ctrl-C, SIGTERM and errors; see tools/server.py).
Results: `<out>/serve[-tp<N>]-<GPU>.json` (one record per mode pair and row; ratios > 1 mean the candidate
is better), a table on stdout, `serve[-tp<N>]-<GPU>.png` (with matplotlib), server logs under
`--log-dir`. `--dry-run` prints the commands without starting anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import common, e2e

SUITE = "serve"
HEALTH_PATH = "/health_generate"  # answers once a real generate has run (the model is loaded and serving)
MTP_SUFFIX = "+mtp"
# bench_serving's result keys kept per pass (those a sglang version lacks are left out)
METRICS = ("median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
           "p99_itl_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms", "output_throughput", "input_throughput",
           "request_throughput", "completed", "duration", "total_input_tokens", "total_output_tokens",
           "accept_length")
# latency metrics compare as baseline / candidate, throughput as candidate / baseline: > 1 is better
LATENCY_RATIOS = {"ttft": "median_ttft_ms", "tpot": "median_tpot_ms", "itl": "median_itl_ms",
                  "e2e": "median_e2e_latency_ms", "ttft_p99": "p99_ttft_ms", "tpot_p99": "p99_tpot_ms"}
THROUGHPUT_RATIOS = {"throughput": "output_throughput"}
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclasses.dataclass(frozen=True)
class Row:
    kind: str  # "cold", "ttft" (output 1, concurrency 1) or "load"
    input_len: int
    output_len: int
    concurrency: int
    prompts: int

    @property
    def key(self) -> str:
        return f"{self.kind} in{self.input_len} out{self.output_len} c{self.concurrency}"

    def case(self) -> dict:
        return {"row": self.kind, "input_len": self.input_len, "output_len": self.output_len,
                "concurrency": self.concurrency}

    def ratio_names(self) -> tuple[str, ...]:
        """The ratios this row is judged by (TPOT and ITL do not exist for one output token)."""
        if self.output_len <= 1:
            return ("ttft", "e2e")
        if self.kind == "cold":
            return ("throughput",)
        return ("ttft", "tpot", "throughput")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("what runs")
    g.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "pr", "on"],
                   help="servers to start, in this order: off = stock (SGLANG_GEMMA4_OPT=0), pr = PR #26588's "
                        "changes alone (as bench-e2e's pr mode), on = the plugin (default: %(default)s)")
    g.add_argument("--mtp", action="store_true",
                   help="also run every mode with MTP (NEXTN with the assistant draft; sglang promotes it to "
                        "FROZEN_KV_MTP)")
    g.add_argument("--mtp-only", action="store_true", help="run only the MTP servers (implies --mtp)")
    g.add_argument("--speculative-num-steps", type=int, default=3, help="MTP draft steps (default: %(default)s)")
    g.add_argument("--speculative-num-draft-tokens", type=int, default=4,
                   help="MTP draft tokens (default: %(default)s)")
    g.add_argument("--input-lens", type=int, nargs="+", default=[1024, 8192], help="(default: %(default)s)")
    g.add_argument("--output-len", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--concurrencies", type=int, nargs="+", default=[1, 16, 64], help="(default: %(default)s)")
    g.add_argument("--prompts", type=int, default=None,
                   help="requests per timed pass (default: --waves x concurrency, at least 8)")
    g.add_argument("--waves", type=int, default=2,
                   help="requests per timed pass in multiples of the concurrency (default: %(default)s)")
    g.add_argument("--ttft-prompts", type=int, default=16,
                   help="requests of the TTFT probe, output 1 at concurrency 1 (default: %(default)s; 0 skips it)")
    g.add_argument("--repeats", type=int, default=1,
                   help="timed passes per row; the median of each metric is kept (default: %(default)s)")
    g.add_argument("--no-cold", action="store_true", help="skip the cold pass")
    g.add_argument("--cold-input-len", type=int, default=1024, help="(default: %(default)s)")
    g.add_argument("--profile-prefill", action="store_true",
                   help="per-kernel time of one prefill per input length under sglang's torch profiler")
    g.add_argument("--profile-requests", type=int, default=3,
                   help="prefills profiled per input length, averaged (default: %(default)s)")
    g = p.add_argument_group("server")
    g.add_argument("--tp", type=int, default=1, help="--tp-size of every server (default: %(default)s)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    g.add_argument("--model-dir", default=None,
                   help="where to write the dummy target/draft folders (default: a temp folder)")
    g.add_argument("--mem-fraction-static", type=float, default=0.85, help="(default: %(default)s)")
    g.add_argument("--attention-backend", default="triton", help="(default: %(default)s)")
    g.add_argument("--extra-server-args", default="",
                   help="more launch_server arguments as one string; write --extra-server-args='--flag ...'")
    g.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m sglang.launch_server",
                   help="command that starts a server; the server arguments are appended (default: %(default)s)")
    g.add_argument("--client", default=f"{shlex.quote(sys.executable)} -m sglang_gemma4_opt.bench.serve_client",
                   help="bench_serving command; its arguments are appended (default: %(default)s)")
    g.add_argument("--startup-timeout", type=float, default=900.0, help="seconds (default: %(default)s)")
    g.add_argument("--client-timeout", type=float, default=1800.0,
                   help="seconds for all passes of one server (default: %(default)s)")
    g.add_argument("--stop-grace", type=float, default=30.0, help="SIGTERM to SIGKILL, seconds (default: %(default)s)")
    g.add_argument("--pr-moe-tables", default=None, metavar="DIR",
                   help=f"PR #26588's MoE tables for the pr mode (default: {e2e.PR_MOE_TABLES})")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder (default: %(default)s)")
    g.add_argument("--log-dir", default=None, help="server and client logs (default: a temp folder)")
    g.add_argument("--tag", default="", help="results file serve[-tp<N>]-<tag>-<GPU>.json, so a partial or "
                   "diagnostic run does not replace the main file (default: none; --mtp-only: mtp)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--dry-run", action="store_true", help="print the servers and passes that would run; start nothing")
    g.add_argument("--collect", metavar="LOG_DIR",
                   help="start nothing: rebuild the results file from the log folder of a run that was cut short "
                        "(the servers named by --modes/--mtp whose plan files are there; startup times are not "
                        "in the logs)")
    g.add_argument("--like", metavar="RESULTS_FILE",
                   help="with --collect: take the GPU and versions from this results file of the same run (the "
                        "file the run wrote before it was cut short); default: the GPU from the servers' logs and "
                        "this machine's versions")


# ---------------------------------------------------------------------------------------------
# plan


def default_prompts(concurrency: int, given: int | None, waves: int = 2) -> int:
    return given if given else max(8, waves * concurrency)


def plan_rows(args) -> list[Row]:
    """Every timed row of one server, in the order it runs."""
    rows = []
    if not args.no_cold:
        c = max(args.concurrencies)
        rows.append(Row("cold", args.cold_input_len, args.output_len, c, default_prompts(c, args.prompts, args.waves)))
    for L in args.input_lens:
        if args.ttft_prompts > 0:
            rows.append(Row("ttft", L, 1, 1, args.ttft_prompts))
        for c in args.concurrencies:
            rows.append(Row("load", L, args.output_len, c, default_prompts(c, args.prompts, args.waves)))
    return rows


def servers(args) -> list[str]:
    """Server names in run order: each mode, then (with --mtp) each mode with MTP."""
    plain = [] if args.mtp_only else list(args.modes)
    mtp = [m + MTP_SUFFIX for m in args.modes] if (args.mtp or args.mtp_only) else []
    return plain + mtp


def base_mode(server: str) -> str:
    return server[:-len(MTP_SUFFIX)] if server.endswith(MTP_SUFFIX) else server


def pairs_for(names: list[str]) -> list[tuple[str, str]]:
    """(baseline, candidate): off against each other mode, pr against on, and each mode against itself with MTP."""
    out = []
    for suffix in ("", MTP_SUFFIX):
        group = [n for n in names if n.endswith(suffix) and (suffix or not n.endswith(MTP_SUFFIX))]
        for a, b in (("off", "pr"), ("off", "on"), ("pr", "on")):
            if a + suffix in group and b + suffix in group:
                out.append((a + suffix, b + suffix))
    for n in names:
        if not n.endswith(MTP_SUFFIX) and n + MTP_SUFFIX in names:
            out.append((n, n + MTP_SUFFIX))
    return out


def server_command(args, server: str, target: Path, draft: Path, port: int) -> list[str]:
    cmd = shlex.split(args.launcher) + [
        "--model-path", str(target), "--load-format", "dummy", "--host", args.host, "--port", str(port),
        "--tp-size", str(args.tp), "--attention-backend", args.attention_backend, "--grammar-backend", "none",
        "--skip-server-warmup", "--mem-fraction-static", str(args.mem_fraction_static)]
    if server.endswith(MTP_SUFFIX):
        cmd += ["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", str(draft),
                "--speculative-draft-load-format", "dummy", "--speculative-num-steps", str(args.speculative_num_steps),
                "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens",
                str(args.speculative_num_draft_tokens)]
    return cmd + shlex.split(args.extra_server_args)


def server_env(server: str, pr_moe_dir: str | None, base: dict | None = None) -> dict:
    base = dict(os.environ if base is None else base)
    env = e2e.apply_env(base, e2e.mode_env(base_mode(server), base, pr_moe_dir))
    env.update(NVLS_OFF)  # shared GPU hosts: NVLink multicast stays off in every process (TP > 1)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if server.endswith(MTP_SUFFIX):
        env.setdefault("SGLANG_ENABLE_SPEC_V2", "0")  # as upstream's Gemma4 MTP test: the v1 speculative path
    return env


# ---------------------------------------------------------------------------------------------
# one pass, one row


class PassFailed(RuntimeError):
    pass


def read_pass(out_file: Path) -> dict:
    """The metrics of a bench_serving run from its --output-file (the last JSON line)."""
    try:
        lines = [ln for ln in out_file.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise PassFailed(f"no results file {out_file.name}: {e}") from e
    if not lines:
        raise PassFailed(f"{out_file.name} is empty")
    res = json.loads(lines[-1])
    return {k: res[k] for k in METRICS if res.get(k) is not None}


def median_metrics(passes: list[dict]) -> dict:
    keys = sorted({k for p in passes for k in p})
    return {k: statistics.median([p[k] for p in passes if k in p]) for k in keys}


@dataclasses.dataclass
class PlannedPass:
    name: str
    row: Row
    timed: bool  # False: a warm-up pass, its numbers dropped
    argv: list[str]
    out_file: Path


def plan_passes(args, base_url: str, target: Path, server: str, log_dir: Path, seed_base: int) -> list[PlannedPass]:
    """Every bench_serving pass of one server, in order: per row a warm-up (none for the cold row), then the
    timed passes. Each pass has its own seed, so no timed prompt is in the radix cache."""
    out, seed = [], seed_base
    for row in plan_rows(args):
        stem = f"{server}-{row.kind}-in{row.input_len}-c{row.concurrency}"
        # warm-up: up to 8 requests of the row's input length (the prefill sizes the row meets), few output tokens
        todo = [] if row.kind == "cold" else [(f"{stem}-warmup", False, min(max(row.concurrency, 2), 8),
                                                 min(row.output_len, 32))]
        todo += [(f"{stem}-{i}", True, row.prompts, row.output_len)
                 for i in range(1 if row.kind == "cold" else args.repeats)]
        for name, timed, prompts, olen in todo:
            seed += 1
            f = log_dir / f"{name}.jsonl"
            out.append(PlannedPass(name, row, timed, client_args(base_url, target, row, prompts, seed, f, olen), f))
    return out


def client_args(base_url: str, target: Path, row: Row, prompts: int, seed: int, out_file: Path,
                output_len: int) -> list[str]:
    return ["--backend", "sglang", "--base-url", base_url, "--model", str(target), "--tokenizer", str(target),
            "--dataset-name", "random-ids", "--tokenize-prompt", "--random-range-ratio", "1",
            "--random-input-len", str(row.input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(prompts), "--max-concurrency", str(row.concurrency), "--request-rate", "inf",
            "--seed", str(seed), "--warmup-requests", "0", "--output-file", str(out_file), "--disable-tqdm"]


def run_passes(args, passes: list[PlannedPass], log_dir: Path, server: str) -> tuple[list[dict], list[str]]:
    """Run the passes in one client process; returns (rows with their timed passes' metrics, errors)."""
    from ..tools.server import ManagedProcess

    for p in passes:
        p.out_file.unlink(missing_ok=True)
    plan = log_dir / f"{server}-plan.json"
    plan.write_text(json.dumps({"passes": [{"name": p.name, "argv": p.argv, "row": dataclasses.asdict(p.row),
                                            "timed": p.timed} for p in passes]}, indent=1))
    client = ManagedProcess(shlex.split(args.client) + ["--plan", str(plan)], log_dir / f"{server}-client.log",
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), grace=5, name=f"{server} client")
    errors = []
    with client:
        try:
            client.wait(timeout=args.client_timeout)
        except Exception as e:  # subprocess.TimeoutExpired: what finished still counts
            errors.append(f"client did not finish in {args.client_timeout:.0f} s ({type(e).__name__})")
    rows, more = collect_rows(passes, client.log_path)
    return rows, errors + more


def collect_rows(passes: list[PlannedPass], client_log: Path) -> tuple[list[dict], list[str]]:
    """Rows from the passes the client reported done (its SERVE_CLIENT_PASS lines) and their output files."""
    status, errors = {}, []
    try:
        text = client_log.read_text(errors="replace")
    except OSError:
        text = ""
    for ln in text.splitlines():
        if ln.startswith(PASS_PREFIX):
            try:
                d = json.loads(ln[len(PASS_PREFIX):])
                status[d.get("name")] = d
            except ValueError:
                pass
    rows: dict[Row, list[dict]] = {}
    for p in passes:
        st = status.get(p.name)
        if st is None:
            errors.append(f"{p.name}: did not run")
            continue
        if not st.get("ok"):
            errors.append(f"{p.name}: {st.get('error')} (log {client_log})")
            continue
        if not p.timed:
            continue
        try:
            m = read_pass(p.out_file)
        except (PassFailed, ValueError) as e:
            errors.append(f"{p.name}: {e}")
            continue
        prompts = int(p.argv[p.argv.index("--num-prompts") + 1])
        if m.get("completed", prompts) < prompts:
            errors.append(f"{p.name}: {m.get('completed')} of {prompts} requests completed")
            continue
        rows.setdefault(p.row, []).append(m)
    out = [{"row": dataclasses.asdict(r), "passes": ms, "metrics": median_metrics(ms)} for r, ms in rows.items()]
    return out, errors


_PASS_NAME = re.compile(r"^(?P<server>.+)-(?P<kind>cold|ttft|load)-in(?P<L>\d+)-c(?P<c>\d+)-(?P<i>\d+|warmup)$")


def load_plan(plan_file: Path, log_dir: Path) -> list[PlannedPass]:
    """The passes a plan file lists (its output files looked for in `log_dir`, where they were written)."""
    out = []
    for e in json.loads(plan_file.read_text())["passes"]:
        argv = [str(a) for a in e["argv"]]
        if "row" in e:
            row, timed = Row(**e["row"]), bool(e["timed"])
        else:  # plan files written before rows were stored: the row from the pass's name and arguments
            m = _PASS_NAME.match(e["name"])
            if m is None:
                raise ValueError(f"{plan_file}: cannot read pass {e['name']!r}")
            timed = m["i"] != "warmup"
            olen = int(argv[argv.index("--random-output-len") + 1])
            prompts = int(argv[argv.index("--num-prompts") + 1])
            row = Row(m["kind"], int(m["L"]), olen, int(m["c"]), prompts if timed else 0)
        out_file = log_dir / Path(argv[argv.index("--output-file") + 1]).name
        out.append(PlannedPass(e["name"], row, timed, argv, out_file))
    return out


def collect_server(log_dir: Path, server: str, profile_requests: int) -> dict:
    """What a (possibly cut short) run left in its log folder for one server: rows, profiles, plugin lines."""
    from ..tools.gsm8k import plugin_lines

    passes = load_plan(log_dir / f"{server}-plan.json", log_dir)
    rows, errors = collect_rows(passes, log_dir / f"{server}-client.log")
    profiles = []
    for d in sorted(log_dir.glob(f"prof-{server}-*")):
        traces = sorted(d.rglob("*.trace.json*"))
        m = re.match(rf"prof-{re.escape(server)}-(\d+)-", d.name)
        if traces and m:
            kernels, spans = parse_trace(traces[0])
            profiles.append(dict(summarize_kernels(kernels, per=profile_requests, spans=spans),
                                 input_len=int(m.group(1)), prefills=profile_requests, trace=traces[0].name))
    return {"server": server, "rows": rows, "errors": errors, "profiles": profiles,
            "plugin_log_lines": plugin_lines(log_dir / f"server-{server}.log", limit=60),
            "collected_from": str(log_dir)}


PASS_PREFIX = "SERVE_CLIENT_PASS "  # serve_client's line after each pass


# ---------------------------------------------------------------------------------------------
# per-kernel prefill profile

KERNEL_GROUPS = (  # first match wins; names of stock sglang's kernels and the plugin's
    ("norm", r"norm"),
    ("attention", r"extend|attn|attention|flash|_fwd_kernel|softmax_shared|shared_softmax|decode_grouped|decode_kernel"),
    ("moe", r"moe|expert|grouped|align_block|topk|_sum_kernel|count_and_sort"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|splitk|Kernel2"),
    ("activation", r"gelu|silu|act_and_mul|tanh"),
    ("rope", r"rope|rotary"),
    ("sampling", r"sampl|argmax|softcap|logit"),
    ("copy/fill", r"copy|fill|memset|memcpy|cat|index|scatter|gather|elementwise|vectorized|reduce"),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    for g, rx in KERNEL_GROUPS:
        if re.search(rx, low):
            return g
    return "other"


def parse_trace(path: Path) -> tuple[dict[str, dict], list[tuple[float, float]]]:
    """({kernel name: {"us": total duration, "n": launches}}, [(start, end) us of every kernel, in time order])
    of the GPU kernels in a torch profiler trace."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    out: dict[str, dict] = {}
    spans = []
    for ev in doc.get("traceEvents", doc if isinstance(doc, list) else []):
        if ev.get("ph") == "X" and str(ev.get("cat", "")).lower() == "kernel":
            k = out.setdefault(ev.get("name", "?"), {"us": 0.0, "n": 0})
            dur = float(ev.get("dur", 0.0))
            k["us"] += dur
            k["n"] += 1
            if "ts" in ev:
                spans.append((float(ev["ts"]), float(ev["ts"]) + dur))
    return out, sorted(spans)


def forward_windows(spans: list[tuple[float, float]], n: int) -> list[dict]:
    """The kernels of `n` requests run one after another, split at the n-1 longest GPU idle gaps; per window its
    span (first start to last end) and busy time (union of kernel intervals). busy / span well below 1 means
    the GPU waited on the host (launch overhead, Python) inside the forward."""
    if not spans or n < 1:
        return []
    ends, edge = [], float("-inf")
    for _, b in spans:
        edge = max(edge, b)
        ends.append(edge)
    gaps = sorted(range(1, len(spans)), key=lambda i: -(spans[i][0] - ends[i - 1]))[:n - 1]
    cuts = [0] + sorted(gaps) + [len(spans)]
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        busy, edge = 0.0, float("-inf")
        for a, b in spans[lo:hi]:
            start = max(a, edge)
            if b > start:
                busy += b - start
            edge = max(edge, b)
        out.append({"span_us": round(ends[hi - 1] - spans[lo][0], 1), "busy_us": round(busy, 1)})
    return out


def summarize_kernels(kernels: dict[str, dict], per: int = 1, top: int = 25,
                      spans: list[tuple[float, float]] | None = None) -> dict:
    """Per-prefill kernel time by group and the `top` kernels (totals divided by `per` prefills); with the
    kernels' intervals, the median span and busy time of the `per` requests' windows."""
    groups: dict[str, float] = {}
    for name, k in kernels.items():
        g = kernel_group(name)
        groups[g] = groups.get(g, 0.0) + k["us"] / per
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:top]
    out = {"total_us": round(sum(groups.values()), 1),
           "groups_us": {g: round(v, 1) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
           "top_kernels": [{"name": n, "group": kernel_group(n), "us": round(k["us"] / per, 1),
                            "launches": k["n"] / per} for n, k in ranked]}
    if spans:
        wins = forward_windows(spans, per)
        out["forward_span_us"] = statistics.median([w["span_us"] for w in wins])
        out["forward_busy_us"] = statistics.median([w["busy_us"] for w in wins])
    return out


def _post(url: str, body: dict | None = None, timeout: float = 300.0) -> bytes:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _prefill(base_url: str, input_len: int, rng) -> None:
    """One request of `input_len` random token ids and one output token (ids above the special tokens)."""
    ids = [rng.randrange(16, 250000) for _ in range(input_len)]
    _post(base_url + "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0,
                                                                        "ignore_eos": True}})


def profile_prefill(args, base_url: str, input_len: int, seed: int, log_dir: Path, server: str) -> dict:
    """`--profile-requests` one-token requests of `input_len` tokens, one at a time, under the server's torch
    profiler (GPU activity only); kernel time per prefill by name and group."""
    import random

    rng = random.Random(seed)
    pdir = Path(tempfile.mkdtemp(prefix=f"prof-{server}-{input_len}-", dir=log_dir))
    for _ in range(2):  # untimed: whatever this length compiles, outside the trace
        _prefill(base_url, input_len, rng)
    _post(base_url + "/start_profile", {"output_dir": str(pdir), "activities": ["GPU"],
                                        "profile_prefix": f"{server}-in{input_len}"})
    try:
        for _ in range(args.profile_requests):
            _prefill(base_url, input_len, rng)
    finally:
        _post(base_url + "/stop_profile")
    deadline = time.monotonic() + 120
    traces: list[Path] = []
    while time.monotonic() < deadline:
        traces = sorted(pdir.rglob("*.trace.json*"))
        if traces:
            time.sleep(1.0)  # let the writer finish
            break
        time.sleep(0.5)
    if not traces:
        raise PassFailed(f"no profiler trace in {pdir}")
    kernels, spans = parse_trace(traces[0])  # TP rank 0
    return dict(summarize_kernels(kernels, per=args.profile_requests, spans=spans), input_len=input_len,
                prefills=args.profile_requests, trace=traces[0].name)


# ---------------------------------------------------------------------------------------------
# one server


def run_server(args, server: str, target: Path, draft: Path, log_dir: Path, pr_moe_dir: str | None,
               seed_base: int) -> dict:
    from ..tools.gsm8k import plugin_lines
    from ..tools.server import Server, ServerError, free_port, port_is_free

    port = args.port or free_port(args.host)
    res: dict = {"server": server, "rows": [], "errors": [], "profiles": []}
    if not port_is_free(args.host, port):
        res["errors"].append(f"port {port} on {args.host} is in use")
        return res
    cmd = server_command(args, server, target, draft, port)
    env = server_env(server, pr_moe_dir)
    log = log_dir / f"server-{server}.log"
    res["command"] = cmd[len(shlex.split(args.launcher)):]
    res["env"] = {k: env.get(k) for k in (e2e.ENV_ENABLE, e2e.ENV_DISABLE) if env.get(k) is not None}
    srv = Server(cmd, args.host, port, log, env=env, health_path=HEALTH_PATH, startup_timeout=args.startup_timeout,
                 grace=args.stop_grace, name=f"{server} server")
    print(f"[{server}] starting: {' '.join(shlex.quote(c) for c in cmd)} (log {log})", flush=True)
    try:
        srv.start()
        res["startup_s"] = round(srv.wait_ready(), 1)
        print(f"[{server}] ready after {res['startup_s']} s", flush=True)
        passes = plan_passes(args, srv.base_url, target, server, log_dir, seed_base)
        res["rows"], errors = run_passes(args, passes, log_dir, server)
        res["errors"] += errors
        for r in res["rows"]:
            m = r["metrics"]
            print(f"[{server}] {Row(**r['row']).key}: TTFT {m.get('median_ttft_ms', float('nan')):.1f} ms, TPOT "
                  f"{m.get('median_tpot_ms', float('nan')):.2f} ms, {m.get('output_throughput', float('nan')):.0f} "
                  f"tok/s", flush=True)
        if srv.poll() is not None:
            raise ServerError(f"{server} server exited with {srv.poll()}", srv.log_tail())
        if args.profile_prefill:
            for i, L in enumerate(args.input_lens):
                try:
                    res["profiles"].append(profile_prefill(args, srv.base_url, L, seed_base + 500 + i, log_dir, server))
                except (PassFailed, OSError, ValueError) as e:
                    res["errors"].append(f"profile in{L}: {e}")
        try:
            info = srv.get_json("/server_info")
            res["server_info"] = {k: info.get(k) for k in ("version", "speculative_algorithm", "chunked_prefill_size",
                                                           "cuda_graph_max_bs", "max_running_requests", "tp_size")
                                  if k in info}
        except (OSError, ValueError):
            pass
    except ServerError as e:
        res["errors"].append(str(e))
        res["log_tail"] = e.log_tail
        print(f"[{server}] {e}\n{e.log_tail}", flush=True)
    finally:
        srv.stop()
        res["plugin_log_lines"] = plugin_lines(log, limit=60)
        print(f"[{server}] stopped", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# records


def ratios(base: dict, cand: dict) -> dict:
    """Per metric: latency baseline / candidate, throughput candidate / baseline (> 1: the candidate is better)."""
    out = {}
    for name, key in LATENCY_RATIOS.items():
        b, c = base.get(key), cand.get(key)
        if b and c and b > 0 and c > 0:
            out[name] = b / c
    for name, key in THROUGHPUT_RATIOS.items():
        b, c = base.get(key), cand.get(key)
        if b and c and b > 0 and c > 0:
            out[name] = c / b
    return out


def make_records(results: dict[str, dict], pairs: list[tuple[str, str]], gpu: str, tp: int,
                 timestamp: str | None = None) -> list[dict]:
    recs = []
    for a, b in pairs:
        ra, rb = results.get(a), results.get(b)
        if not ra or not rb:
            continue
        rows_b = {json.dumps(r["row"], sort_keys=True): r for r in rb["rows"]}
        for r_a in ra["rows"]:
            r_b = rows_b.get(json.dumps(r_a["row"], sort_keys=True))
            if r_b is None:
                continue
            row = Row(**r_a["row"])
            ma, mb = r_a["metrics"], r_b["metrics"]
            rs = ratios(ma, mb)
            judged = {k: rs[k] for k in row.ratio_names() if k in rs}
            rec = common.record(
                SUITE, dict(row.case(), tp=tp, mtp=b.endswith(MTP_SUFFIX) or a.endswith(MTP_SUFFIX)),
                _label(a), _label(b), ma.get("median_e2e_latency_ms", float("nan")) * 1e3,
                mb.get("median_e2e_latency_ms", float("nan")) * 1e3, gpu=gpu,
                baseline_mode=a, candidate_mode=b, baseline_metrics=ma, candidate_metrics=mb,
                ratios=rs, worst_ratio=min(judged.values()) if judged else float("nan"),
                worst_of=list(judged), prompts=row.prompts,
                baseline_passes=len(r_a["passes"]), candidate_passes=len(r_b["passes"]),
                timing="sglang bench_serving (first token by meta_info.completion_tokens), median over requests; "
                       "median over passes",
                model="Gemma4 26B-A4B config, dummy weights (--load-format dummy), attention backend triton")
            if timestamp:
                rec["timestamp"] = timestamp
            recs.append(rec)
    return recs


def _label(server: str) -> str:
    m = e2e.MODES[base_mode(server)]
    return m.label + (", MTP (assistant draft)" if server.endswith(MTP_SUFFIX) else "")


def cold_vs_warm(res: dict) -> dict | None:
    """A server's cold pass against the same row run warm (throughput and TTFT ratios cold / warm)."""
    cold = next((r for r in res["rows"] if r["row"]["kind"] == "cold"), None)
    if cold is None:
        return None
    want = dict(cold["row"], kind="load")
    warm = next((r for r in res["rows"] if r["row"] == want), None)
    if warm is None:
        return None
    c, w = cold["metrics"], warm["metrics"]
    out = {"row": want}
    if c.get("output_throughput") and w.get("output_throughput"):
        out["throughput_cold_over_warm"] = c["output_throughput"] / w["output_throughput"]
    if c.get("median_ttft_ms") and w.get("median_ttft_ms"):
        out["ttft_cold_over_warm"] = c["median_ttft_ms"] / w["median_ttft_ms"]
    if c.get("p99_ttft_ms") and w.get("p99_ttft_ms"):
        out["p99_ttft_cold_over_warm"] = c["p99_ttft_ms"] / w["p99_ttft_ms"]
    return out


def results_path(out: Path, gpu: str, tp: int, tag: str = "") -> Path:
    """<out>/serve[-tp<N>][-<tag>]-<GPU>.json: one GPU's and a TP group's rows apart, a tagged run apart."""
    return out / f"{SUITE}{'' if tp == 1 else f'-tp{tp}'}{f'-{tag}' if tag else ''}-{common.slug(gpu)}.json"


def _gpu() -> str:
    try:
        return common.gpu_name()
    except Exception:  # no torch in this process: the record still says where it ran
        return "unknown GPU"


def table_rows(recs: list[dict]) -> list[list]:
    out = []
    for r in recs:
        c, mb, ma, rs = r["case"], r["candidate_metrics"], r["baseline_metrics"], r["ratios"]
        out.append([f"{r['baseline_mode']}->{r['candidate_mode']}", c["row"], c["input_len"], c["output_len"],
                    c["concurrency"], _f(ma.get("median_ttft_ms")), _f(mb.get("median_ttft_ms")),
                    _f(ma.get("median_tpot_ms"), ".2f"), _f(mb.get("median_tpot_ms"), ".2f"),
                    _f(ma.get("output_throughput"), ".0f"), _f(mb.get("output_throughput"), ".0f"),
                    _f(rs.get("ttft"), ".3f"), _f(rs.get("tpot"), ".3f"), _f(rs.get("throughput"), ".3f"),
                    _f(r.get("worst_ratio"), ".3f")])
    return out


TABLE_COLUMNS = ["pair", "row", "in", "out", "conc", "TTFT a ms", "TTFT b ms", "TPOT a", "TPOT b", "tok/s a",
                 "tok/s b", "TTFT x", "TPOT x", "tput x", "worst x"]


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def plot(recs: list[dict], path: Path) -> Path | None:
    """One panel per mode pair: TTFT, TPOT and throughput ratios per row (> 1: the candidate is better)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pairs = []
    for r in recs:
        p = (r["baseline_mode"], r["candidate_mode"])
        if p not in pairs:
            pairs.append(p)
    if not pairs:
        return None
    fig, axes = plt.subplots(len(pairs), 1, figsize=(12, 3.2 * len(pairs)), squeeze=False)
    for ax, (a, b) in zip(axes[:, 0], pairs):
        rs = [r for r in recs if (r["baseline_mode"], r["candidate_mode"]) == (a, b)]
        labels = [f"{r['case']['row']}\n{r['case']['input_len']}/{r['case']['output_len']}\nc{r['case']['concurrency']}"
                  for r in rs]
        for i, (name, color) in enumerate((("ttft", "tab:blue"), ("tpot", "tab:orange"), ("throughput", "tab:green"))):
            xs = [j + (i - 1) * 0.27 for j in range(len(rs))]
            ys = [r["ratios"].get(name, float("nan")) for r in rs]
            ax.bar(xs, ys, width=0.27, label=name, color=color)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.99, color="r", lw=0.6, ls="--")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(f"{b} vs {a} (x)")
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(f"bench-serve on {recs[0]['gpu']} (ratios > 1: {pairs[0][1]} better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def check_args(args) -> str | None:
    if args.output_len < 2:
        return "--output-len must be >= 2 (TPOT needs two tokens; the TTFT probe covers one)"
    for name in ("input_lens", "concurrencies"):
        if any(v < 1 for v in getattr(args, name)):
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.repeats < 1 or args.waves < 1 or args.ttft_prompts < 0 or (args.prompts is not None and args.prompts < 1):
        return "--repeats, --waves and --prompts must be >= 1, --ttft-prompts >= 0"
    if args.tp < 1:
        return "--tp must be >= 1"
    if args.tag and not re.fullmatch(r"[A-Za-z0-9.]+(-[A-Za-z0-9.]+)*", args.tag):
        return f"--tag {args.tag!r}: letters, digits, '.' and '-' only"
    if len(set(args.modes)) != len(args.modes):
        return f"--modes lists a mode twice: {' '.join(args.modes)}"
    return None


def run(args) -> int:
    why = check_args(args)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.mtp_only and not args.tag:
        args.tag = "mtp"
    names = servers(args)
    pairs = pairs_for(names)
    pr_dir = e2e.find_pr_tables(args.pr_moe_tables)
    if "pr" in args.modes and (pr_dir is None or not e2e.pr_table_files(pr_dir)):
        print(f"error: mode pr needs PR #26588's MoE tables (none at {pr_dir or e2e.PR_MOE_TABLES}); "
              "pass --pr-moe-tables DIR", file=sys.stderr)
        return 2
    if args.collect:
        return _collect(args, names, pairs)
    from ..tools.dummy_model import write_dummy_models
    from ..tools.server import Interrupted, stop_on_signals

    tmps: list[tempfile.TemporaryDirectory] = []

    def tmpdir(prefix: str) -> Path:
        tmps.append(tempfile.TemporaryDirectory(prefix=prefix))
        return Path(tmps[-1].name)

    try:
        target, draft = write_dummy_models(Path(args.model_dir) if args.model_dir else tmpdir("gemma4-dummy-"))
        log_dir = Path(args.log_dir) if args.log_dir else tmpdir("bench-serve-logs-")
        log_dir.mkdir(parents=True, exist_ok=True)
        pr_moe = None
        if "pr" in args.modes:
            base = Path(os.environ[e2e.ENV_MOE_DIR]) if os.environ.get(e2e.ENV_MOE_DIR) else e2e.sglang_moe_dir()
            pr_moe = e2e.build_pr_moe_dir(pr_dir, base, tmpdir("gemma4-pr-moe-"))
        if args.dry_run:
            for i, s in enumerate(names):
                env = server_env(s, pr_moe["dir"] if pr_moe else None)
                shown = " ".join(f"{k}={env[k]}" for k in (e2e.ENV_ENABLE, e2e.ENV_DISABLE, e2e.ENV_MOE_DIR) if k in env)
                print(f"server {s}: {shown} {' '.join(shlex.quote(c) for c in server_command(args, s, target, draft, args.port or 30000))}")
                for row in plan_rows(args):
                    print(f"  {row.key}: {row.prompts} prompts x {1 if row.kind == 'cold' else args.repeats} pass(es)")
            print("pairs: " + ", ".join(f"{a}:{b}" for a, b in pairs))
            return 0
        return _run_all(args, names, pairs, target, draft, log_dir, pr_moe, Interrupted, stop_on_signals)
    finally:
        for t in tmps:
            t.cleanup()


def _run_all(args, names, pairs, target, draft, log_dir, pr_moe, Interrupted, stop_on_signals) -> int:
    header = common.env_header()
    header.update(servers=names, pairs=[f"{a}:{b}" for a, b in pairs], tp=args.tp,
                  client="sglang bench_serving via sglang_gemma4_opt.bench.serve_client (random-ids, token ids "
                         "sent as ids; a streamed chunk counts as tokens by meta_info.completion_tokens)",
                  mode_labels={s: _label(s) for s in names})
    results: dict[str, dict] = {}
    interrupted = None
    path = None
    try:
        with stop_on_signals():
            for i, s in enumerate(names):
                results[s] = run_server(args, s, target, draft, log_dir, pr_moe["dir"] if pr_moe else None,
                                        seed_base=1000 * (i + 1))
                path = _write(args, header, results, pairs)
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted = getattr(e, "signum", 2)
        print(f"interrupted ({interrupted}); servers stopped", file=sys.stderr, flush=True)
        path = _write(args, header, results, pairs)
    if path is not None:
        _, recs = common.load_results(path)
        recs = [r for r in recs if r.get("timestamp") == header["timestamp"]]
        if recs:
            common.print_table(f"bench-serve on {recs[0]['gpu']} (TP {args.tp}; x = candidate vs baseline, "
                               "> 1 better)", TABLE_COLUMNS, table_rows(recs))
        for s, r in results.items():
            cw = cold_vs_warm(r)
            if cw and "throughput_cold_over_warm" in cw:
                print(f"[{s}] cold pass throughput {cw['throughput_cold_over_warm']:.3f}x the warm pass "
                      f"(startup {r.get('startup_s')} s)")
        print(f"wrote {path}")
    if interrupted is not None:
        return 128 + interrupted
    failed = [s for s, r in results.items() if r["errors"]]
    if failed:
        for s in failed:
            print(f"error: {s}: " + "; ".join(results[s]["errors"])[:2000], file=sys.stderr)
        return 1
    return 0


def _collect(args, names, pairs) -> int:
    log_dir = Path(args.collect)
    found = [s for s in names if (log_dir / f"{s}-plan.json").exists()]
    if not found:
        print(f"error: no plan file of {', '.join(names)} in {log_dir}", file=sys.stderr)
        return 2
    header = common.env_header()
    gpu = None
    if args.like:
        like, like_recs = common.load_results(Path(args.like))
        header["versions"] = like.get("versions", header["versions"])
        header.update(timestamp=like.get("timestamp", header["timestamp"]), run_command=like.get("command"))
        gpu = like.get("gpu")
    header.update(servers=found, pairs=[f"{a}:{b}" for a, b in pairs], tp=args.tp, collected_from=str(log_dir),
                  client="sglang bench_serving via sglang_gemma4_opt.bench.serve_client (random-ids, token ids "
                         "sent as ids; a streamed chunk counts as tokens by meta_info.completion_tokens)",
                  mode_labels={s: _label(s) for s in found})
    results = {s: collect_server(log_dir, s, args.profile_requests) for s in found}
    if gpu is None:
        gpu = next((g for r in results.values() for g in [_gpu_in_log(r["plugin_log_lines"])] if g), None)
    path = _write(args, header, results, pairs, gpu=gpu)
    _, recs = common.load_results(path)
    if recs:
        common.print_table(f"bench-serve on {recs[0]['gpu']} (collected from {log_dir})", TABLE_COLUMNS,
                           table_rows(recs))
    print(f"wrote {path}")
    return 0


def _gpu_in_log(lines: list[str]) -> str | None:
    """The GPU a server ran on, from the plugin's MoE-table lines (`...device_name=NVIDIA_H200.json`)."""
    for ln in lines:
        m = re.search(r"device_name=([A-Za-z0-9_.-]+?)(?:_down)?(?:,dtype=[^.]+)?\.json", ln)
        if m:
            return m.group(1).replace("_", " ")
    return None


def _write(args, header: dict, results: dict[str, dict], pairs, gpu: str | None = None) -> Path | None:
    """Rewrite the results file with what has run so far (a run stopped later keeps its finished servers)."""
    gpu = gpu or _gpu()
    recs = make_records(results, pairs, gpu, args.tp, header["timestamp"])
    for r in recs:  # the versions of the run (a collected run's come from --like)
        for k in ("sglang", "triton", "torch"):
            r[k] = (header.get("versions") or {}).get(k, r.get(k))
    header = dict(header, servers_run={
        s: {k: r.get(k) for k in ("command", "env", "startup_s", "errors", "log_tail", "server_info", "plugin_log_lines",
                                  "profiles", "collected_from") if r.get(k) is not None}
        | {"cold_vs_warm": cold_vs_warm(r), "rows": r["rows"]} for s, r in results.items()})
    path = results_path(Path(args.out), gpu, args.tp, args.tag)
    common.write_json_atomic(path, {"header": dict(header, suite=SUITE, gpu=gpu), "records": recs})
    if recs and not args.no_plot:
        plot(recs, path.with_suffix(".png"))
    return path
