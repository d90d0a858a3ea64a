"""`sglang-gemma4-opt bench-e2e`: the whole Gemma4 26B-A4B model (dummy weights), plugin off vs on,
each in its own process, through sglang's `bench_one_batch`.

    sglang-gemma4-opt bench-e2e                              # bs 1 16 64, input 1024, output 64, TP 1
    sglang-gemma4-opt bench-e2e --batch-sizes 16 --tp 2

Each mode runs `python -m sglang_gemma4_opt.bench.one_batch` (bench_one_batch after load_plugins(),
which plain `python -m sglang.bench_one_batch` skips) with `SGLANG_GEMMA4_OPT=0` (off) or `1` (on),
`--load-format dummy --attention-backend triton`, on a model folder this command writes
(`sglang_gemma4_opt.tools.dummy_model`: config.json with the real shape, a tiny tokenizer).

Warm-up: bench_one_batch warms up once, with the first batch size only. Triton compiles a kernel the
first time it meets a new config, and the fused-MoE config depends on the token count, so the first
prefill at every other batch size would include compilation. So the sweep is passed `--passes` times
(default 3: 1 16 64 1 16 64 1 16 64); the first pass is discarded and the median of the others recorded.
Decode runs from CUDA graphs captured at start-up; its latency is the median over the output tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import signal
import tempfile
import threading
import time
from pathlib import Path

from . import common
from .one_batch import STATUS_PREFIX

SUITE = "e2e"
MODES = {"off": "0", "on": "1"}
COLUMNS = ["batch", "phase", "off ms", "on ms", "speedup", "change"]

_PREFILL_RE = re.compile(r"^Prefill\. latency: ([0-9.]+) s")
_DECODE_RE = re.compile(r"^Decode\.\s+median latency: ([0-9.]+) s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=64, help="decode steps + 1 (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size passed to bench_one_batch")
    p.add_argument("--passes", type=int, default=3,
                   help="sweeps over the batch sizes in one process; the first is discarded, the median of the "
                        "rest recorded (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["off", "on"], choices=list(MODES))
    p.add_argument("--model-dir", default=None, help="where to write the dummy model (default: a temp folder)")
    p.add_argument("--mem-fraction-static", type=float, default=0.8)
    p.add_argument("--cuda-graph-max-bs", type=int, default=None,
                   help="default: the largest batch size (bench_one_batch sets this itself anyway)")
    p.add_argument("--cuda-graph-bs", type=int, nargs="+", default=None,
                   help="decode batch sizes to capture (default: the batch sizes benchmarked, so start-up captures "
                        "and compiles 3 graphs instead of sglang's 13 up to 64; decode runs unpadded either way)")
    p.add_argument("--extra-args", default="",
                   help="more bench_one_batch/server arguments as one string; write it --extra-args=\"--flag ...\"")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per process (default: %(default)s)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder (default: %(default)s)")
    p.add_argument("--log-dir", default=None, help="bench_one_batch logs (default: the results folder)")
    p.add_argument("--quiet", action="store_true", help="do not echo bench_one_batch's output")


def build_command(args, model_dir: Path, result_file: Path, mode: str) -> list[str]:
    bs = [str(b) for b in args.batch_sizes] * max(1, args.passes)
    cmd = [sys.executable, "-u", "-m", "sglang_gemma4_opt.bench.one_batch",
           "--model-path", str(model_dir), "--load-format", "dummy", "--attention-backend", "triton",
           "--tp-size", str(args.tp), "--mem-fraction-static", str(args.mem_fraction_static),
           "--cuda-graph-max-bs", str(args.cuda_graph_max_bs or max(args.batch_sizes)),
           "--cuda-graph-bs", *[str(b) for b in (args.cuda_graph_bs or sorted(set(args.batch_sizes)))],
           "--batch-size", *bs, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--run-name", f"plugin-{mode}", "--result-filename", str(result_file)]
    return cmd + shlex.split(args.extra_args)


def parse_output(text: str) -> tuple[dict | None, list[dict]]:
    """(G4OPT_STATUS JSON, [{'prefill_latency': s, 'median_decode_latency': s}, ...] in sweep order)
    from bench_one_batch's stdout; the warm-up run is the first pair printed and is dropped."""
    status = None
    runs: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(STATUS_PREFIX) and status is None:
            try:
                status = json.loads(line[len(STATUS_PREFIX):])
            except ValueError:
                pass
        m = _PREFILL_RE.match(line)
        if m:
            runs.append({"prefill_latency": float(m.group(1))})
            continue
        m = _DECODE_RE.match(line)
        if m and runs:
            runs[-1]["median_decode_latency"] = float(m.group(1))
    return status, runs[1:]  # bench_one_batch's own warm-up prints first


def read_result_file(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def per_batch(runs: list[dict], batch_sizes: list[int], passes: int) -> dict[int, dict[str, list[float]]]:
    """Group sweep results by batch size, dropping each size's first pass when there are several."""
    order = list(batch_sizes) * max(1, passes)
    if runs and "batch_size" not in runs[0]:
        runs = [dict(r, batch_size=b) for r, b in zip(runs, order)]
    seen: dict[int, int] = {}
    out: dict[int, dict[str, list[float]]] = {}
    for r in runs:
        b = int(r["batch_size"])
        seen[b] = seen.get(b, 0) + 1
        if passes > 1 and seen[b] == 1:
            continue  # first pass: may include Triton compiling this size's configs
        d = out.setdefault(b, {"prefill": [], "decode": []})
        if r.get("prefill_latency") is not None:
            d["prefill"].append(float(r["prefill_latency"]))
        if r.get("median_decode_latency") is not None:
            d["decode"].append(float(r["median_decode_latency"]))
    return out


def run_mode(args, mode: str, model_dir: Path, log_dir: Path) -> dict:
    result_file = log_dir / f"e2e-{mode}.jsonl"
    log_file = log_dir / f"e2e-{mode}.log"
    result_file.unlink(missing_ok=True)  # bench_one_batch appends
    env = dict(os.environ, SGLANG_GEMMA4_OPT=MODES[mode], PYTHONUNBUFFERED="1")
    cmd = build_command(args, model_dir, result_file, mode)
    print(f"[{mode}] SGLANG_GEMMA4_OPT={MODES[mode]} " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    lines = []
    with open(log_file, "w") as log:
        # Own process group, so a timeout also ends the TP workers and compile helpers it started.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        _LIVE.add(proc)
        timer = threading.Timer(args.timeout, _kill_group, (proc, mode, args.timeout))
        timer.start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line)
                log.write(line)
                log.flush()
                if not args.quiet:
                    sys.stdout.write(f"[{mode}] {line}")
                    sys.stdout.flush()
        finally:
            rc = proc.wait()
            timer.cancel()
            _LIVE.discard(proc)
            _kill_group(proc, mode, None)  # leftovers of the run (TP workers, compile workers), if any
    text = "".join(lines)
    status, printed = parse_output(text)
    runs = read_result_file(result_file) or printed
    return {"mode": mode, "rc": rc, "seconds": time.time() - t0, "status": status, "runs": runs,
            "from": "result file" if result_file.exists() else "stdout", "log": str(log_file)}


# bench_one_batch runs in its own session (so a timeout can end its whole process group); these are
# the ones still running, ended if this process is itself terminated.
_LIVE: set = set()


def _kill_group(proc, mode, timeout):
    if timeout is not None:
        print(f"[{mode}] killed after {timeout:.0f} s", file=sys.stderr, flush=True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        if proc.poll() is None:
            proc.kill()


def _on_terminate(signum, frame):
    for proc in list(_LIVE):
        _kill_group(proc, "e2e", None)
    raise SystemExit(128 + signum)


def make_records(args, results: dict[str, dict]) -> list[dict]:
    off, on = results.get("off"), results.get("on")
    if not off or not on:
        return []
    g_off = per_batch(off["runs"], args.batch_sizes, args.passes)
    g_on = per_batch(on["runs"], args.batch_sizes, args.passes)
    st_on, st_off = on.get("status") or {}, off.get("status") or {}
    gpu = st_on.get("gpu") or st_off.get("gpu") or "unknown GPU"
    gpu = re.sub(r" \(sm\d+\)$", "", gpu)  # cli.gpu_name() appends the compute capability
    recs = []
    for b in args.batch_sizes:
        for phase in ("prefill", "decode"):
            a, c = g_off.get(b, {}).get(phase), g_on.get(b, {}).get(phase)
            if not a or not c:
                continue
            a_us, c_us = statistics.median(a) * 1e6, statistics.median(c) * 1e6
            rec = common.record(
                SUITE, {"batch": b, "input_len": args.input_len, "output_len": args.output_len, "phase": phase,
                        "tp": args.tp},
                "plugin off (SGLANG_GEMMA4_OPT=0)", "plugin on", a_us, c_us, gpu=gpu,
                baseline_ms=a_us / 1e3, candidate_ms=c_us / 1e3, latency_change=c_us / a_us - 1,
                baseline_runs_us=[x * 1e6 for x in a], candidate_runs_us=[x * 1e6 for x in c],
                timing=("wall clock around one prefill forward" if phase == "prefill"
                        else "median wall clock of the decode steps (CUDA graphs)"),
                model="Gemma4 26B-A4B config, dummy weights (--load-format dummy), attention backend triton",
                plugin_status={k: v.get("status") for k, v in (st_on.get("patches") or {}).items()},
                plugin_off_status={k: v.get("status") for k, v in (st_off.get("patches") or {}).items()},
                passes=args.passes,
            )
            if st_on.get("versions"):
                rec["sglang"] = st_on["versions"].get("sglang", rec["sglang"])
                rec["triton"] = st_on["versions"].get("triton", rec["triton"])
                rec["torch"] = st_on["versions"].get("torch", rec["torch"])
            recs.append(rec)
    return recs


def run(args) -> int:
    if args.output_len < 2:
        print("error: --output-len must be >= 2 (decode latency is measured from the 2nd token)", file=sys.stderr)
        return 2
    out = Path(args.out)
    log_dir = Path(args.log_dir) if args.log_dir else out
    log_dir.mkdir(parents=True, exist_ok=True)
    # The Gemma4 26B-A4B folder the project writes for dummy-weight runs (the shape that ran on the GPU host).
    from ..tools.dummy_model import target_config, write_folder

    tmp = None
    if args.model_dir:
        model_dir = write_folder(args.model_dir, target_config())
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gemma4-dummy-")
        model_dir = write_folder(tmp.name, target_config())
    header = common.env_header()
    results = {}
    signal.signal(signal.SIGTERM, _on_terminate)
    try:
        for mode in args.modes:
            results[mode] = run_mode(args, mode, model_dir, log_dir)
            r = results[mode]
            patches = (r["status"] or {}).get("patches") or {}
            print(f"[{mode}] rc={r['rc']} in {r['seconds']:.0f} s; {len(r['runs'])} timed runs (from {r['from']}); "
                  + ", ".join(f"{k}: {v.get('status')}" for k, v in patches.items()), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    failed = [m for m, r in results.items() if r["rc"] != 0 or not r["runs"]]
    recs = make_records(args, results)
    if recs:
        header.update(model_dir=str(model_dir), modes={m: {k: v for k, v in r.items() if k != "runs"}
                                                       for m, r in results.items()})
        path = common.write_results(out, SUITE, recs[0]["gpu"], recs, header)
        common.print_table(f"e2e on {recs[0]['gpu']} (input {args.input_len}, output {args.output_len}, TP {args.tp})",
                           COLUMNS, [table_row(r) for r in recs])
        print(f"wrote {path}")
    elif len(args.modes) < 2:
        print("one mode only: no comparison records written; see the log", file=sys.stderr)
    if failed:
        print(f"error: mode(s) {', '.join(failed)} failed; logs in {log_dir}", file=sys.stderr)
        return 1
    on_status = (results.get("on", {}).get("status") or {}).get("patches") or {}
    if any(v.get("status") == "failed" for v in on_status.values()):
        print("warning: a patch failed to apply in the plugin-on process", file=sys.stderr)
    return 0


def table_row(r):
    c = r["case"]
    return [str(c["batch"]), c["phase"], r["baseline_ms"], r["candidate_ms"], f"{r['speedup']:.2f}x",
            f"{100 * r['latency_change']:+.1f}%"]
