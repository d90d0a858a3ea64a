"""GPU probe (session 11, issue 4): is the prefill MoE power-bound? Each path's CUDA graph (one MoE call) is timed
twice: isolated (one replay, then the GPU idles a few ms, so it runs at its boost clock) and sustained (replays back to
back for several seconds, as the suite's timing and a prefill-heavy server do). nvidia-smi samples the SM clock, the
board power and the clock-event reasons every 100 ms meanwhile; each record carries the medians over its window.

  PROBE_MS="2048 4096 8192 16384" python -u benchmarks/scripts/moe_power_probe.py
  # -> $OUT/moe_power_probe-N704-<gpu>.json

Paths: sglang's kernels with the PR's tables (the issue's baseline; on a GPU the PR has no table for, e.g. an H100,
sglang's stock lookup instead, recorded as `sglang_stock_lookup`), and the plugin's grouped kernels (shipped
`configs/moe_grouped.json` params). Same weights, tokens and random top-8 routing for both.
"""
import datetime, json, os, statistics, subprocess, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel_breakdown import GPU, OUT, PR_ROOT, K, N, TOPK  # noqa: E402  (the probes' shared settings)

from sglang_gemma4_opt.bench import fused_moe as fm  # noqa: E402
from sglang_gemma4_opt.bench.common import _capture, env_header, side_by_side  # noqa: E402
from sglang_gemma4_opt.kernels import moe_grouped as mg  # noqa: E402
from sglang_gemma4_opt.kernels.moe_small_batch import shape_key  # noqa: E402

SUSTAIN_S = float(os.environ.get("PROBE_SUSTAIN_S", "5"))
SMI_FIELDS = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"
# bits of nvidia-smi's clocks_event_reasons.active that slow the clock (idle, 0x1, is not one)
REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}


class Sampler:
    """nvidia-smi in the background, one line per 100 ms; `window(t0, t1)` gives the medians between two
    datetime.now() stamps (nvidia-smi prints the host's local time too)."""

    def __init__(self, path):
        self.path = path
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits",
                                      "-lms", "100", "-i", str(torch.cuda.current_device())],
                                     stdout=open(path, "w"), stderr=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()

    def window(self, t0, t1):
        clk, pw, reasons = [], [], 0
        for line in open(self.path):
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 4:
                continue
            try:
                ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
                c, p, r = float(parts[1]), float(parts[2]), int(parts[3], 16)
            except ValueError:
                continue
            if t0 <= ts <= t1:
                clk.append(c)
                pw.append(p)
                reasons |= r
        if not clk:
            return {}
        return {"sm_clock_mhz": statistics.median(clk), "power_w": statistics.median(pw), "samples": len(clk),
                "clock_event_reasons": sorted(v for b, v in REASONS.items() if reasons & b)}


def graph_of(fn):
    """One call of fn captured in a CUDA graph (the suite's capture: warm-up on a side stream first)."""
    return _capture(lambda i: fn(), calls=1, warmup=1)


def timed_replays(g, n):
    evs = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    evs[0].record()
    for i in range(n):
        g.replay()
        evs[i + 1].record()
    torch.cuda.synchronize()
    return [evs[i].elapsed_time(evs[i + 1]) * 1e3 for i in range(n)]


def measure(g, call_us, sampler):
    iso = []
    for _ in range(60):
        iso += timed_replays(g, 1)
        time.sleep(max(0.003, 2 * call_us * 1e-6))
    block = max(5, int(20000 / call_us))  # ~20 ms of replays per block
    t_start = time.time()
    tail_from = datetime.datetime.now() + datetime.timedelta(seconds=SUSTAIN_S / 2)
    sus_tail = []
    while time.time() - t_start < SUSTAIN_S:
        times = timed_replays(g, block)
        if datetime.datetime.now() > tail_from:
            sus_tail += times
    t1 = datetime.datetime.now()
    time.sleep(0.3)
    rec = {"isolated_us": round(statistics.median(iso), 1), "sustained_us": round(statistics.median(sus_tail), 1),
           "sustained_replays": len(sus_tail)}
    w = sampler.window(tail_from, t1)
    rec.update(w)
    if w:
        rec["energy_mj_per_call"] = round(w["power_w"] * rec["sustained_us"] * 1e-3, 2)
    return rec


def main():
    sbs = side_by_side()
    fe = fm.fused_experts_fn()
    rcfg = fm.runner_config(N=N)
    w = fm.Weights(N=N)
    key = shape_key(w.w13.shape[0], N, K, TOPK, torch.bfloat16)
    table = mg.load_table()
    sampler = Sampler(os.path.join(OUT, "moe_power_probe-smi.csv"))
    time.sleep(1)
    rows = []
    name = f"moe_power_probe-N{N}-{GPU.replace(' ', '_')}.json"
    pr_has_gpu = any(PR_ROOT.rglob(f"E=*,N={N},device_name={GPU.replace(' ', '_')}.json"))  # else: stock lookup
    try:
        for M in [int(m) for m in os.environ.get("PROBE_MS", "2048 4096 8192 16384").split()]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            tw, ids = fm.random_routing(M)
            p = mg.params_for(table, GPU, key, M)
            row = {"M": M, "grouped_params": p.as_dict() if p else None}
            paths = {}

            def sglang_path(tables):
                with fm._both(sbs, tables, "stock"):
                    return graph_of(lambda: fe(x, w.w13, w.w2, fm.topk_output(tw, ids), rcfg))

            if pr_has_gpu:
                paths["sglang_pr_tables"] = lambda: sglang_path(fm.use_tables(sbs, PR_ROOT))
            else:
                paths["sglang_stock_lookup"] = lambda: sglang_path(sbs.use("moe_configs", "stock"))
            if p is not None:
                paths["plugin_grouped"] = lambda: graph_of(
                    lambda: mg.fused_moe_grouped(x, w.w13, w.w2, tw, ids, "gelu", params=p))
            for label, make in paths.items():
                g = make()
                call_us = statistics.median(timed_replays(g, 5))
                time.sleep(2)  # cool down between windows
                row[label] = measure(g, call_us, sampler)
                del g
            base = "sglang_pr_tables" if "sglang_pr_tables" in row else "sglang_stock_lookup"
            if base in row and "plugin_grouped" in row:
                row["baseline"] = base
                a, b = row[base], row["plugin_grouped"]
                row["speedup_isolated"] = round(a["isolated_us"] / b["isolated_us"], 3)
                row["speedup_sustained"] = round(a["sustained_us"] / b["sustained_us"], 3)
                if "energy_mj_per_call" in a and "energy_mj_per_call" in b:
                    row["energy_ratio"] = round(a["energy_mj_per_call"] / b["energy_mj_per_call"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            json.dump({"header": dict(env_header(sys.argv), gpu=GPU, sustain_s=SUSTAIN_S), "N": N, "rows": rows},
                      open(os.path.join(OUT, name), "w"), indent=1)
            del x
            torch.cuda.empty_cache()
    finally:
        sampler.stop()


if __name__ == "__main__":
    main()
