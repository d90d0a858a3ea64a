"""GPU probe: where the prefill MoE's time goes, kernel by kernel, for sglang's path (PR tables, plugin
tables) and the plugin's grouped kernels (shipped `configs/moe_grouped.json` params), random top-8 routing.

  PROBE_MS="2048 4096 16384" PROBE_N=704 python -u benchmarks/scripts/moe_kernel_breakdown.py
  # -> $OUT/moe_kernel_breakdown-N704-<gpu>.json

Per-kernel GPU durations come from torch.profiler (CUPTI kernel records) over eager calls: at M >= 2048 every
kernel runs for tens of microseconds or more, so launch gaps between kernels do not enter the durations
(they would in a wall-clock timing; whole-path times stay the suite's CUDA-graph numbers). For each kernel:
mean duration over the profiled calls, and for the GEMMs the achieved TFLOP/s on the real (unpadded) work and
the weight-streaming floor (every expert's weights read once from HBM at the GPU's nominal bandwidth).
"""
import json, os, sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sglang_gemma4_opt.bench import fused_moe as fm
from sglang_gemma4_opt.bench.common import env_header, side_by_side
from sglang_gemma4_opt.kernels import moe_grouped as mg
from sglang_gemma4_opt.bench.tune_moe_grouped import CANDIDATES
from sglang_gemma4_opt.kernels.moe_small_batch import shape_key
from sglang_gemma4_opt.patches.moe_configs import CONFIG_ROOT

OUT = os.environ.get("OUT", ".")
N = int(os.environ.get("PROBE_N", "704"))
K, TOPK = 2816, 8
ITERS = int(os.environ.get("PROBE_ITERS", "20"))
PR_ROOT = Path("benchmarks/baselines/pr26588")
GPU = torch.cuda.get_device_name()
FALLBACK = CANDIDATES["bm128_u128x64w8s4_d256x64w8s4"]  # a GPU or M the table does not hold
HBM_TBS = {"NVIDIA H200": 4.8, "NVIDIA H100 80GB HBM3": 3.35}.get(GPU)


def kernel_times(fn, iters=ITERS):
    """{kernel name: mean us per call} over `iters` eager calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0:
            out[ev.key[:90]] = round(t / iters, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main():
    sbs = side_by_side()
    fe = fm.fused_experts_fn()
    rcfg = fm.runner_config(N=N)
    w = fm.Weights(N=N)
    E = w.w13.shape[0]
    key = shape_key(E, N, K, TOPK, torch.bfloat16)
    table = mg.load_table()
    weight_bytes = (w.w13.numel() + w.w2.numel()) * w.w13.element_size()
    rows = []
    for M in [int(m) for m in os.environ.get("PROBE_MS", "2048 4096 8192 16384").split()]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        tw, ids = fm.random_routing(M)
        row = {"M": M, "up_flops": 2 * M * TOPK * 2 * N * K, "down_flops": 2 * M * TOPK * N * K}
        if HBM_TBS:
            row["weights_once_floor_us"] = round(weight_bytes / (HBM_TBS * 1e12) * 1e6, 1)
        for label, root in (("sglang_plugin_tables", CONFIG_ROOT), ("sglang_pr_tables", PR_ROOT)):
            if not Path(root).is_dir():
                continue
            with fm._both(sbs, fm.use_tables(sbs, root), "stock"):
                row[label] = kernel_times(lambda: fe(x, w.w13, w.w2, fm.topk_output(tw, ids), rcfg))
        p = mg.params_for(table, GPU, key, M) or mg.GroupedParams(**FALLBACK)
        row["grouped_params"] = p.as_dict()
        row["grouped"] = kernel_times(lambda: mg.fused_moe_grouped(x, w.w13, w.w2, tw, ids, "gelu", params=p))
        for name, t in row["grouped"].items():
            if "up_act" in name:
                row["grouped_up_tflops"] = round(row["up_flops"] / t / 1e6, 1)
            elif "grouped_down" in name:
                row["grouped_down_tflops"] = round(row["down_flops"] / t / 1e6, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        name = f"moe_kernel_breakdown-N{N}-{GPU.replace(' ', '_')}.json"
        json.dump({"header": dict(env_header(sys.argv), gpu=GPU, iters=ITERS), "N": N, "rows": rows},
                  open(os.path.join(OUT, name), "w"), indent=1)
        del x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
