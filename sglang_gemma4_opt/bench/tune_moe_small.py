"""Offline sweep of the small-batch fused-MoE kernels (`kernels/moe_small_batch.py`; never at serving time).

For each MoE shape (E=128, K=2816, top-8, bf16, gelu; N=704 at TP 1 and N=352 at TP 2) and each batch
size M: times every launch shape of the up kernel and of the down kernel alone (CUDA-graph replay,
fresh random routing per captured call so weights stream from HBM), then the best pair against
sglang's own kernel sequence (`fused_experts_impl` with the configs the plugin serves), side by side,
and checks both against a float32 reference. Writes one JSON with every measurement and the table the
plugin ships (`configs/moe_small_batch.json` format), for `--write-table` or by hand.

    python -m sglang_gemma4_opt.bench.tune_moe_small --out DIR [--ms 1 2 4 8] [--ns 704 352] [--write-table]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from . import common

E, K, TOPK = 128, 2816, 8
MS = (1, 2, 3, 4, 6, 8, 12, 16)
NS = (704, 352)
# (block_n, block_k, warps, stages[, form]): up form "dot" = the tensor-core form, "fma" the plain one
UP = ([(bn, bk, w, s, "fma") for bn, bk, w, s in itertools.product((8, 16, 32), (128, 256, 512), (4, 8), (1, 2, 3))]
      + [(bn, bk, 4, s, "dot") for bn, bk, s in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 5))])
DOWN = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((4, 8, 16), (32, 64, 128), (4, 8), (1, 2, 3))]


def up_params(c, base=None):
    from ..kernels.moe_small_batch import Params

    b = base or Params()
    return Params(c[0], c[1], c[2], b.down_block_n, b.down_block_k, b.down_warps, up_stages=c[3],
                  up_dot=c[4] == "dot", down_stages=b.down_stages)


def down_params(c, base=None):
    from ..kernels.moe_small_batch import Params

    b = base or Params()
    return Params(b.up_block_n, b.up_block_k, b.up_warps, c[0], c[1], c[2], up_stages=b.up_stages, up_dot=b.up_dot,
                  down_stages=c[3])
MIN_GAIN = 0.03  # a batch size joins the table only when the small-batch path is this much faster
MAX_LOSS = 0.02  # ... and at most this much slower when all tokens share their experts (the worst case)


def shape_key(E, N, K, topk, dtype="bf16"):
    return f"E{E}-N{N}-K{K}-top{topk}-{dtype}"


def _sweep(label, variants, calls, budget_s):
    """label -> median us for each runnable variant; failures (resources, compile) are skipped."""
    out = {}
    for name, step in variants.items():
        try:
            t = common.time_variants({name: (step, None)}, calls=calls, rounds=1, budget_s=budget_s, min_replays=5)
            out[name] = t[name].median_us
        except Exception as e:  # noqa: BLE001 - a launch shape that cannot run is just not a candidate
            print(f"  {label} {name}: skipped ({type(e).__name__}: {str(e)[:80]})", flush=True)
    return out


def tune_shape(N, ms, args, log):
    import torch
    from ..kernels import moe_small_batch as ks
    from ..patches.moe_small_batch import stock_impl
    from .fused_moe import Weights, random_routing

    impl = stock_impl()
    w = Weights(N=N)
    rows = []
    for M in ms:
        x0 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w0, ids0 = random_routing(M)
        ref = ks.reference(x0, w.w13, w.w2, w0, ids0, "gelu")
        out_s = impl(x0, w.w13, w.w2, w0, ids0, activation="gelu", inplace=False)
        calls = args.calls
        routes = [random_routing(M) for _ in range(calls)]
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]
        inters = [torch.randn(M * TOPK, N, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]
        out = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)

        def up_step(p):
            def step(i):
                ks.launch_up(xs[i % calls], w.w13, routes[i % calls][1], inters[i % calls], "gelu", p)
            return step

        def down_step(p):
            def step(i):
                rw, rid = routes[i % calls]
                ks.launch_down(inters[i % calls], w.w2, rid, rw, out, None, p)
            return step

        up = _sweep(f"N={N} M={M} up", {u: up_step(up_params(u)) for u in UP}, calls, args.budget)
        down = _sweep(f"N={N} M={M} down", {d: down_step(down_params(d)) for d in DOWN}, calls, args.budget)
        bu, bd = min(up, key=up.get), min(down, key=down.get)
        best = down_params(bd, up_params(bu))
        out_k = ks.fused_moe_small_batch(x0, w.w13, w.w2, w0, ids0, "gelu", params=best)
        torch.cuda.synchronize()
        err_k = float((out_k.float() - ref).abs().max())
        err_s = float((out_s.float() - ref).abs().max())
        diff = float((out_k.float() - out_s.float()).abs().max())

        def small(i):
            rw, rid = routes[i % calls]
            ks.fused_moe_small_batch(xs[i % calls], w.w13, w.w2, rw, rid, "gelu", params=best)

        def stock(i):
            rw, rid = routes[i % calls]
            impl(xs[i % calls], w.w13, w.w2, rw, rid, activation="gelu", inplace=False)

        t = common.time_variants({"stock": (stock, None), "small": (small, None)}, calls=calls, rounds=args.rounds,
                                 budget_s=args.final_budget)
        # Worst case for per-pair kernels: every token of the batch routed to the same top-k experts (real
        # batches repeat experts across tokens; sglang's GEMMs then read each expert once, these kernels
        # once per pair). Random routing above rarely repeats an expert at these M.
        shared = [shared_routing(M) for _ in range(calls)]

        def small_shared(i):
            rw, rid = shared[i % calls]
            ks.fused_moe_small_batch(xs[i % calls], w.w13, w.w2, rw, rid, "gelu", params=best)

        def stock_shared(i):
            rw, rid = shared[i % calls]
            impl(xs[i % calls], w.w13, w.w2, rw, rid, activation="gelu", inplace=False)

        ts = common.time_variants({"stock": (stock_shared, None), "small": (small_shared, None)}, calls=calls,
                                  rounds=2, budget_s=args.final_budget)
        row = dict(N=N, M=M, params=best.as_dict(), up_us=up[bu], down_us=down[bd],
                   shared_stock_us=ts["stock"].median_us, shared_small_us=ts["small"].median_us,
                   shared_speedup=ts["stock"].median_us / ts["small"].median_us,
                   stock_us=t["stock"].median_us, small_us=t["small"].median_us,
                   stock_round_medians_us=t["stock"].round_medians_us,
                   small_round_medians_us=t["small"].round_medians_us,
                   speedup=t["stock"].median_us / t["small"].median_us,
                   max_abs_err_small=err_k, max_abs_err_stock=err_s, max_abs_diff=diff,
                   up_sweep={str(k): v for k, v in sorted(up.items(), key=lambda kv: kv[1])[:8]},
                   down_sweep={str(k): v for k, v in sorted(down.items(), key=lambda kv: kv[1])[:8]})
        log(f"N={N} M={M}: stock {row['stock_us']:.1f} us, small {row['small_us']:.1f} us "
            f"({row['speedup']:.3f}x; up {row['up_us']:.1f} + down {row['down_us']:.1f}), params {best.as_dict()}, "
            f"|err| small {err_k:.3g} stock {err_s:.3g}; all tokens on the same experts: stock "
            f"{row['shared_stock_us']:.1f} us, small {row['shared_small_us']:.1f} us ({row['shared_speedup']:.3f}x)")
        rows.append(row)
        del w0, ids0, x0, routes, xs, inters
    return rows


def profile_stock(M, N=NS[0], iters=50):
    """{kernel name: mean device us per MoE call} of sglang's path at M (torch.profiler, eager calls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..patches.moe_small_batch import stock_impl
    from .fused_moe import Weights, random_routing

    impl = stock_impl()
    w = Weights(N=N)
    routes = [random_routing(M) for _ in range(iters)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    for i in range(3):
        impl(x, w.w13, w.w2, *routes[i], activation="gelu", inplace=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            impl(x, w.w13, w.w2, *routes[i], activation="gelu", inplace=False)
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        dev = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev and ev.count:
            out[ev.key[:60]] = round(dev / iters, 2)
    del w
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:12])


def shared_routing(M):
    """Every token routed to the same TOPK distinct experts (random per call), random weights."""
    import torch

    ids = torch.randperm(E, device="cuda")[:TOPK].to(torch.int32).expand(M, TOPK).contiguous()
    w = torch.softmax(torch.randn(M, TOPK, device="cuda"), dim=-1).to(torch.float32)
    return w, ids


def table_from(rows, min_gain=MIN_GAIN):
    """{shape key: {"max_m": m, "by_m": {M: params}}}: the batch sizes (from 1 up, without a gap) where the
    small-batch path is at least `min_gain` faster with random routing and not slower (by more than
    MAX_LOSS) with every token on the same experts."""
    table = {}
    for N in sorted({r["N"] for r in rows}, reverse=True):
        rs = sorted((r for r in rows if r["N"] == N), key=lambda r: r["M"])
        by_m, max_m = {}, 0
        for r in rs:
            if r["speedup"] < 1 + min_gain or r.get("shared_speedup", 0.0) < 1 - MAX_LOSS:
                break
            by_m[str(r["M"])] = r["params"]
            max_m = r["M"]
        if max_m:
            table[shape_key(E, N, K, TOPK)] = {"max_m": max_m, "by_m": by_m}
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS))
    ap.add_argument("--calls", type=int, default=8, help="calls per captured graph (fresh routing each)")
    ap.add_argument("--budget", type=float, default=0.03, help="replay seconds per sweep candidate")
    ap.add_argument("--final-budget", type=float, default=0.3, help="replay seconds per round, best vs stock")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--profile-m", type=int, default=1, help="profile sglang's kernels at this M first (0: no)")
    ap.add_argument("--write-table", action="store_true", help="merge this GPU's table into configs/moe_small_batch.json")
    args = ap.parse_args(argv)

    import torch

    from .. import core

    common.ensure_server_args()
    core.apply()  # the plugin's MoE tables serve sglang's lookup, as in a server with the plugin
    gpu = torch.cuda.get_device_name()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    t0 = time.time()
    profile = profile_stock(args.profile_m) if args.profile_m else None
    if profile:
        log(f"sglang's path at M={args.profile_m} (N={NS[0]}), per-kernel device time: {json.dumps(profile)}")
    rows = []
    for N in args.ns:
        rows += tune_shape(N, args.ms, args, log)
    table = table_from(rows)
    doc = {"header": dict(common.env_header(sys.argv), gpu=gpu, seconds=time.time() - t0, min_gain=MIN_GAIN,
                          max_loss_shared=MAX_LOSS),
           "stock_profile": profile, "rows": rows, "table": {gpu: table}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune_moe_small-{common.slug(gpu)}.json"
    common.write_json_atomic(path, doc)
    log(f"wrote {path}; table {json.dumps(table)}")
    if args.write_table:
        from ..kernels.moe_small_batch import TABLE_PATH

        cur = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
        cur[gpu] = table
        TABLE_PATH.write_text(json.dumps(cur, indent=1, sort_keys=True) + "\n")
        log(f"updated {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
