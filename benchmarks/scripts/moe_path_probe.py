"""GPU probe: does the plugin's prefill MoE cost more when sglang's fused_experts reaches it (as in the fused_moe
suite and a server) than when the grouped kernels are called directly (as the tuner times them)?

  PROBE_MS="2048 4096 8192" python -u benchmarks/scripts/moe_path_probe.py
  # -> $OUT/moe_path_probe-N704-<gpu>.json

Side by side in one process, CUDA-graph replay with the suite's settings (4 rounds, 0.25 s per block, 1 s preheat,
fresh routing per captured call, hidden states rotating): sglang's kernels with the PR's tables, sglang's
fused_experts with the plugin on (its hook sends M >= min_m to the grouped kernels), and fused_moe_grouped called
directly with the table's launch shape. Per-kernel lists (torch.profiler) of both plugin variants show whether the
fused_experts path launches anything the direct call does not.
"""
import json
import os
import sys
from pathlib import Path

import torch

from sglang_gemma4_opt.bench import fused_moe as fm
from sglang_gemma4_opt.bench.common import (ensure_server_args, env_header, side_by_side, slug, time_variants,
                                            write_json_atomic)
from sglang_gemma4_opt.kernels import moe_grouped as mg
from sglang_gemma4_opt.kernels.moe_small_batch import shape_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel_breakdown import kernel_times  # noqa: E402

OUT = Path(os.environ.get("OUT", "."))
N = int(os.environ.get("PROBE_N", "704"))
K, TOPK = 2816, 8
PR_ROOT = Path("benchmarks/baselines/pr26588")


def main():
    ensure_server_args()
    sbs = side_by_side()
    fe = fm.fused_experts_fn()
    rcfg = fm.runner_config(N=N)
    w = fm.Weights(N=N)
    gpu = torch.cuda.get_device_name()
    key = shape_key(w.w13.shape[0], N, K, TOPK, torch.bfloat16)
    table = mg.load_table()
    rows = []
    for M in [int(m) for m in os.environ.get("PROBE_MS", "2048 4096 8192").split()]:
        p = mg.params_for(table, gpu, key, M)
        if p is None:
            print(f"M={M}: no grouped entry for {gpu}", flush=True)
            continue
        calls = 3 if M <= 2048 else 2 if M <= 4096 else 1
        routes = [fm.random_routing(M) for _ in range(calls)]
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]

        def via_fused_experts(i):
            tw, ids = routes[i % calls]
            fe(xs[i % calls], w.w13, w.w2, fm.topk_output(tw, ids), rcfg)

        def direct(i):
            tw, ids = routes[i % calls]
            mg.fused_moe_grouped(xs[i % calls], w.w13, w.w2, tw, ids, "gelu", params=p)

        def pr_use():
            return fm._both(sbs, fm.use_tables(sbs, PR_ROOT), "stock")

        def plugin_use():
            return fm._both(sbs, sbs.use("moe_configs", "plugin"), "plugin")

        with plugin_use():
            a = fe(xs[0], w.w13, w.w2, fm.topk_output(*routes[0]), rcfg).clone()
            kt_fe = kernel_times(lambda: via_fused_experts(0))
        b = mg.fused_moe_grouped(xs[0], w.w13, w.w2, *routes[0], "gelu", params=p)
        kt_direct = kernel_times(lambda: direct(0))
        t = time_variants({"pr_tables": (via_fused_experts, pr_use), "plugin_fused_experts": (via_fused_experts,
                                                                                            plugin_use),
                           "grouped_direct": (direct, None)}, calls=calls, rounds=4, budget_s=0.25, preheat_s=1.0)
        row = dict(M=M, params=p.as_dict(), same_bits=bool(torch.equal(a, b)),
                   us={k: v.median_us for k, v in t.items()},
                   round_medians_us={k: v.round_medians_us for k, v in t.items()},
                   kernels_fused_experts=kt_fe, kernels_direct=kt_direct)
        print(f"M={M}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row["us"].items())
              + f"; same bits {row['same_bits']}", flush=True)
        print("  fused_experts path kernels:", json.dumps(kt_fe), flush=True)
        print("  direct kernels:", json.dumps(kt_direct), flush=True)
        rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    write_json_atomic(OUT / f"moe_path_probe-N{N}-{slug(gpu)}.json",
                      {"header": dict(env_header(sys.argv), gpu=gpu), "N": N, "rows": rows})


if __name__ == "__main__":
    main()
