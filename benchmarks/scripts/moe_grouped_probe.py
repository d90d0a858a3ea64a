"""GPU probe (not run yet): the expert-grouped MoE (sglang_gemma4_opt/kernels/moe_grouped.py) against
sglang's fused_experts with the plugin's shipped tables and with the PR's tables, whole MoE, CUDA-graph
replay (bench.common.time_variants), random top-8 routing, output compared with sglang's.

  PROBE_MS="4096 2048 16384" PROBE_N=704 python -u benchmarks/scripts/moe_grouped_probe.py   # writes $OUT/grouped_probe_N704.json

The first M sweeps the up-kernel shapes (UP) with one down shape; later Ms sweep the down shapes (DOWN)
under the best up shape. Decide from its rows whether (and from which M) the grouped path is wired into
the fused-MoE hook; a table of its launch shapes per GPU would then come from a tuner like tune_moe_small."""
import json, os, traceback
from pathlib import Path
import torch
from sglang_gemma4_opt.bench.common import side_by_side, time_variants
from sglang_gemma4_opt.bench import fused_moe as fm
from sglang_gemma4_opt.patches.moe_configs import CONFIG_ROOT
from sglang_gemma4_opt.kernels import moe_grouped as mg

sbs = side_by_side()
OUT = os.environ.get("OUT", ".")
N = int(os.environ.get("PROBE_N", "704"))
PR_ROOT = Path("benchmarks/baselines/pr26588")


def serving(folder):
    """Context factory: sglang's own fused_experts_impl (not the plugin hook) with the tables in `folder`."""
    return lambda: fm._both(sbs, fm.use_tables(sbs, folder), "stock")


fe = fm.fused_experts_fn()
rcfg = fm.runner_config(N=N)
w = fm.Weights(N=N)
P = mg.GroupedParams


def grouped(x, tw, ids, p):
    return mg.fused_moe_grouped(x, w.w13, w.w2, tw, ids, "gelu", params=p)


UP = {
    "u64x64w8s3": dict(up_block_n=64, up_block_k=64, up_warps=8, up_stages=3),
    "u64x64w8s4": dict(up_block_n=64, up_block_k=64, up_warps=8, up_stages=4),
    "u128x64w8s3": dict(up_block_n=128, up_block_k=64, up_warps=8, up_stages=3),
    "u64x128w8s3": dict(up_block_n=64, up_block_k=128, up_warps=8, up_stages=3),
    "u64x64w4s4": dict(up_block_n=64, up_block_k=64, up_warps=4, up_stages=4),
    "u64x64w8s3tma": dict(up_block_n=64, up_block_k=64, up_warps=8, up_stages=3, a_tma=True),
    "u128x64w8s3tma": dict(up_block_n=128, up_block_k=64, up_warps=8, up_stages=3, a_tma=True),
    "u64x64w8s3tma_ws": dict(up_block_n=64, up_block_k=64, up_warps=8, up_stages=3, a_tma=True, warp_specialize=True),
    "u64x64w4s3tma_ws": dict(up_block_n=64, up_block_k=64, up_warps=4, up_stages=3, a_tma=True, warp_specialize=True),
    "bm64u64x64w4s4": dict(block_m=64, up_block_n=64, up_block_k=64, up_warps=4, up_stages=4,
                           down_block_n=128, down_block_k=64, down_warps=4, down_stages=4),
}
DOWN = {
    "d128x64w8s3": dict(down_block_n=128, down_block_k=64, down_warps=8, down_stages=3),
    "d256x64w8s3": dict(down_block_n=256, down_block_k=64, down_warps=8, down_stages=3),
    "d128x128w8s3": dict(down_block_n=128, down_block_k=128, down_warps=8, down_stages=3),
    "d128x64w8s4": dict(down_block_n=128, down_block_k=64, down_warps=8, down_stages=4),
    "d128x64w4s4": dict(down_block_n=128, down_block_k=64, down_warps=4, down_stages=4),
    "d128x64w4s3ws": dict(down_block_n=128, down_block_k=64, down_warps=4, down_stages=3, warp_specialize=True),
}
ms = [int(m) for m in os.environ.get("PROBE_MS", "4096 2048 16384").split()]
rows = []
best_up = None
shipped, pr = serving(CONFIG_ROOT), serving(PR_ROOT) if PR_ROOT.is_dir() else None
for M in ms:
    x = torch.randn(M, 2816, device="cuda", dtype=torch.bfloat16)
    tw, ids = fm.random_routing(M)
    calls = 4 if M <= 4096 else 2
    routes = [fm.random_routing(M) for _ in range(calls)]
    with shipped():
        y_stock = fe(x, w.w13, w.w2, fm.topk_output(tw, ids), rcfg).clone()
    run = lambda i: fe(x, w.w13, w.w2, fm.topk_output(*routes[i % calls]), rcfg)  # noqa: E731
    variants = {"shipped": (run, shipped)}
    if pr is not None:
        variants["pr"] = (run, pr)
    row = {"M": M}
    if best_up is None:
        cands = {k: dict(v) for k, v in UP.items()}
    else:
        cands = {best_up: dict(UP[best_up])}
        for dk, dv in DOWN.items():
            cands[best_up + "+" + dk] = dict(UP[best_up], **dv)
    for name, kw in cands.items():
        p = P(**kw)
        try:
            y = grouped(x, tw, ids, p)
            torch.cuda.synchronize()
            row[name + "_relerr_vs_stock"] = float((y.float() - y_stock.float()).norm() / y_stock.float().norm())
            row[name + "_maxabs_vs_stock"] = float((y.float() - y_stock.float()).abs().max())
        except Exception as e:  # noqa
            row[name + "_error"] = repr(e)[:300]
            traceback.print_exc()
            continue
        variants[name] = ((lambda p: (lambda i: grouped(x, *routes[i % calls], p)))(p), None)
    t = time_variants(variants, calls=calls, rounds=3, budget_s=0.3)
    for n, tm in t.items():
        row[n + "_us"] = round(tm.median_us, 2)
    g = {n: tm.median_us for n, tm in t.items() if n not in ("shipped", "pr")}
    if best_up is None and g:
        best_up = min(g, key=g.get)
    row["best"] = min(g, key=g.get) if g else None
    row["flops"] = 2 * M * 8 * 3 * N * 2816
    print(json.dumps(row), flush=True)
    rows.append(row)
    json.dump({"gpu": torch.cuda.get_device_name(), "N": N, "rows": rows},
              open(os.path.join(OUT, f"grouped_probe_N{N}.json"), "w"), indent=1)
