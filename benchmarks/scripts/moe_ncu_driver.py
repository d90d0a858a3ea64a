"""Workload for Nsight Compute (session 11, issue 4): two calls each of the plugin's grouped MoE (shipped
`configs/moe_grouped.json` params) and of sglang's path with the PR's tables, at each M in PROBE_MS, random top-8
routing. Profile it, then summarise the report with `ncu_summary.py`:

  PROBE_MS=2048 ncu --clock-control base --target-processes all \
      -k regex:"grouped_up_act_kernel|grouped_down_kernel|fused_moe_kernel" -s 0 -c 8 --set full \
      -o $OUT/moe2048 python benchmarks/scripts/moe_ncu_driver.py
  ncu -i $OUT/moe2048.ncu-rep --page raw --csv > $OUT/moe2048_raw.csv
  python benchmarks/scripts/ncu_summary.py $OUT/moe2048_raw.csv --out benchmarks/results/diagnostics/moe_ncu-M2048-N704-<gpu>.json
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel_breakdown import GPU, PR_ROOT, K, N, TOPK  # noqa: E402  (the probes' shared settings)

from sglang_gemma4_opt.bench import fused_moe as fm  # noqa: E402
from sglang_gemma4_opt.bench.common import side_by_side  # noqa: E402
from sglang_gemma4_opt.kernels import moe_grouped as mg  # noqa: E402
from sglang_gemma4_opt.kernels.moe_small_batch import shape_key  # noqa: E402


def main():
    w = fm.Weights(N=N)
    table = mg.load_table()
    key = shape_key(w.w13.shape[0], N, K, TOPK, torch.bfloat16)
    sbs = side_by_side()
    fe = fm.fused_experts_fn()
    rcfg = fm.runner_config(N=N)
    for M in [int(m) for m in os.environ.get("PROBE_MS", "2048").split()]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        tw, ids = fm.random_routing(M)
        p = mg.params_for(table, GPU, key, M)
        if p is not None:
            for _ in range(2):
                mg.fused_moe_grouped(x, w.w13, w.w2, tw, ids, "gelu", params=p)
        with fm._both(sbs, fm.use_tables(sbs, PR_ROOT), "stock"):
            for _ in range(2):
                fe(x, w.w13, w.w2, fm.topk_output(tw, ids), rcfg)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
