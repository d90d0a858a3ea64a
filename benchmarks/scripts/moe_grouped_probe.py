"""GPU probe: the expert-grouped MoE (sglang_gemma4_opt/kernels/moe_grouped.py) against
sglang's fused_experts with the plugin's shipped tables and with the PR's tables, whole MoE, CUDA-graph
replay (bench.common.time_variants), random top-8 routing, output compared with sglang's.

  PROBE_MS="4096 2048 16384" PROBE_N=704 python -u benchmarks/scripts/moe_grouped_probe.py   # writes $OUT/grouped_probe_N704.json

Every M times every candidate in CANDS (PROBE_ONLY=a,b keeps the names containing a or b), plus
pieces for scale: cuBLAS on dense operands of the same FLOPs, sglang's align, the top-k sum. Decide from its rows whether (and from which M) the grouped path is wired into
the fused-MoE hook; a table of its launch shapes per GPU would then come from a tuner like tune_moe_small."""
import json, os, sys
from pathlib import Path
import torch
from sglang_gemma4_opt.bench.common import env_header, side_by_side, time_variants
from sglang_gemma4_opt.bench import fused_moe as fm
from sglang_gemma4_opt.patches.moe_configs import CONFIG_ROOT
from sglang_gemma4_opt.kernels import moe_grouped as mg
from sglang_gemma4_opt.bench.tune_moe_grouped import _p

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


# name -> GroupedParams fields
CANDS = {
    # session 6, first H200 sweep: best at M=2048/4096 (s4) and 16384 (s3) with torch's top-k sum
    "bm128_u128x64w8s4_d256x64w8s4_torchsum": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, torch_sum=True),
    "bm128_u128x64w8s4_d256x64w8s4": _p(128, 128, 64, 8, 4, 256, 64, 8, 4),
    "bm128_u128x64w8s3_d256x64w8s3": _p(128, 128, 64, 8, 3, 256, 64, 8, 3),
    "bm128_u128x128w8s2_d256x128w8s2": _p(128, 128, 128, 8, 2, 256, 128, 8, 2),
    "bm128_u128x64w8s4_d256x128w8s2": _p(128, 128, 64, 8, 4, 256, 128, 8, 2),
    "bm128_u128x64w8s4_d128x64w8s4": _p(128, 128, 64, 8, 4, 128, 64, 8, 4),
    "bm128_u128x64w8s4_d256x64w8s4_g4": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=4),
    "bm128_u128x64w8s4_d256x64w8s4_g16": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=16),
    "bm128_u128x64w8s4_d256x64w8s4_sum512": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, sum_block_h=512),
    "bm128_u128x64w8s4_d256x64w8s4_sum2048": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, sum_block_h=2048),
    "swap_t64_w64x64w4s4_h128x64w4s4": _p(64, 64, 64, 4, 4, 128, 64, 4, 4, swap_ab=True),
    "swap_t128_w128x64w8s3_h256x64w8s3": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, swap_ab=True),
}
only = os.environ.get("PROBE_ONLY")
if only:
    CANDS = {k: v for k, v in CANDS.items() if any(o in k for o in only.split(","))}
ms = [int(m) for m in os.environ.get("PROBE_MS", "4096 2048 16384").split()]
rows = []
shipped, pr = serving(CONFIG_ROOT), serving(PR_ROOT) if PR_ROOT.is_dir() else None
for M in ms:
    x = torch.randn(M, 2816, device="cuda", dtype=torch.bfloat16)
    tw, ids = fm.random_routing(M)
    calls = 4 if M <= 4096 else 2 if M <= 16384 else 1
    routes = [fm.random_routing(M) for _ in range(calls)]
    with shipped():
        y_stock = fe(x, w.w13, w.w2, fm.topk_output(tw, ids), rcfg).clone()
    run = lambda i: fe(x, w.w13, w.w2, fm.topk_output(*routes[i % calls]), rcfg)  # noqa: E731
    variants = {"shipped": (run, shipped)}
    if pr is not None:
        variants["pr"] = (run, pr)
    # ceilings and pieces: cuBLAS on dense operands of the same FLOPs, sglang's align, the top-k sum
    a_up = torch.randn(M * 8, 2816, device="cuda", dtype=torch.bfloat16)
    a_dn = torch.randn(M * 8, N, device="cuda", dtype=torch.bfloat16)
    w_up = w.w13[0].new_empty(2 * N, 2816).normal_()
    w_dn = w.w13[0].new_empty(2816, N).normal_()
    c3 = torch.randn(M * 8, 2816, device="cuda", dtype=torch.bfloat16)
    al = mg._sglang_align()
    variants["piece_cublas_up_dense"] = (lambda i: a_up @ w_up.T, None)
    variants["piece_cublas_down_dense"] = (lambda i: a_dn @ w_dn.T, None)
    variants["piece_align_bm64"] = (lambda i: al(routes[i % calls][1], 64, 128), None)
    variants["piece_topk_sum"] = (lambda i: c3.view(M, 8, 2816).sum(1, dtype=torch.float32).to(torch.bfloat16), None)
    row = {"M": M}
    for name, kw in CANDS.items():
        p = P(**kw)
        try:
            y = grouped(x, tw, ids, p)
            torch.cuda.synchronize()
            row[name + "_relerr_vs_stock"] = float((y.float() - y_stock.float()).norm() / y_stock.float().norm())
            row[name + "_maxabs_vs_stock"] = float((y.float() - y_stock.float()).abs().max())
        except Exception as e:  # noqa
            row[name + "_error"] = repr(e)[:300]
            print(name, "failed:", repr(e)[:300], flush=True)
            continue
        variants[name] = ((lambda p: (lambda i: grouped(x, *routes[i % calls], p)))(p), None)
    t = time_variants(variants, calls=calls, rounds=3, budget_s=0.3)
    for n, tm in t.items():
        row[n + "_us"] = round(tm.median_us, 2)
    g = {n: tm.median_us for n, tm in t.items() if n not in ("shipped", "pr") and not n.startswith("piece_")}
    row["best"] = min(g, key=g.get) if g else None
    row["flops"] = 2 * M * 8 * 3 * N * 2816
    print(json.dumps({k: v for k, v in row.items() if k.endswith("_us") or k == "M" or k == "best"}), flush=True)
    rows.append(row)
    json.dump({"header": dict(env_header(sys.argv), gpu=torch.cuda.get_device_name()), "N": N, "rows": rows},
              open(os.path.join(OUT, f"grouped_probe_N{N}.json"), "w"), indent=1)
