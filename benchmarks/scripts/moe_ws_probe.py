"""GPU probe (session 10, issue 4): the persistent warp-specialised Gluon grouped MoE (`moe_grouped_ws.py`) against
the plugin's Triton grouped kernels (shipped `configs/moe_grouped.json` params) and sglang's path (plugin tables).

  PROBE_MS="2048 4096 8192 16384" python -u benchmarks/scripts/moe_ws_probe.py
  # -> $OUT/moe_ws_probe-N704-<gpu>.json

Records: the tile table against its Python statement; bit equality of the Gluon path (up with three and with two
warpgroups per tile) with the Triton grouped kernels at 64-row alignment (same K order) for random, skewed and
expert-parallel (-1 ids) routing; whole-path medians from CUDA-graph replay (common.time_variants, variants
interleaved by round); per-kernel durations from torch.profiler over eager calls.
"""
import json, os, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_grouped_ws as ws  # noqa: E402
from moe_kernel_breakdown import kernel_times  # noqa: E402

from sglang_gemma4_opt.bench import common  # noqa: E402
from sglang_gemma4_opt.bench.fused_moe import Weights, random_routing  # noqa: E402
from sglang_gemma4_opt.bench.tune_moe_grouped import skewed_routing  # noqa: E402
from sglang_gemma4_opt.kernels import moe_grouped as kg  # noqa: E402
from sglang_gemma4_opt.kernels.moe_small_batch import shape_key  # noqa: E402

OUT = os.environ.get("OUT", ".")
N = int(os.environ.get("PROBE_N", "704"))
K, TOPK = 2816, 8
GPU = torch.cuda.get_device_name()
WS = {"gluon_ws_up3": 3, "gluon_ws_up2": 2}  # warpgroups per up tile (down: two + a load warp)


def routing(kind, M):
    tw, ids = skewed_routing(M) if kind == "skew" else random_routing(M)
    if kind == "ep":  # experts 100.. live on another rank
        ids = torch.where(ids >= 100, torch.full_like(ids, -1), ids)
    return tw, ids


def main():
    common.ensure_server_args()
    from sglang_gemma4_opt import core
    from sglang_gemma4_opt.patches.moe_small_batch import stock_impl

    core.apply()
    impl = stock_impl()
    w = Weights(N=N)
    table = kg.load_table()
    key = shape_key(128, N, K, TOPK, torch.bfloat16)
    doc = {"header": dict(common.env_header(sys.argv), gpu=GPU), "N": N, "tile_table": [], "equal": [], "rows": []}
    path = Path(OUT) / f"moe_ws_probe-N{N}-{common.slug(GPU)}.json"

    for M in (1, 100, 2048):
        for kind in ("rand", "skew", "ep"):
            tw, ids = routing(kind, M)
            s, e, npost = kg._sglang_align()(ids, 64, 128)
            for wgs in (3, 2):
                tiles, nt = ws.tile_table(e, npost, wgs=wgs)
                got = list(zip(*[tiles[i, : int(nt)].tolist() for i in range(3)]))
                doc["tile_table"].append(dict(M=M, routing=kind, wgs=wgs, ok=got == ws.tile_table_reference(e.cpu(), int(npost), wgs)))
    triton64 = kg.GroupedParams(block_m=64, up_block_n=128, up_block_k=64, up_warps=4, up_stages=3,
                                down_block_n=256, down_block_k=64, down_warps=4, down_stages=3)
    for M in (37, 2048, 5000):
        for kind in ("rand", "skew", "ep"):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            tw, ids = routing(kind, M)
            ref = kg.fused_moe_grouped(x, w.w13, w.w2, tw, ids, "gelu", params=triton64)
            for name, wgs in WS.items():
                y = ws.fused_moe_ws(x, w.w13, w.w2, tw, ids, "gelu", up_wgs=wgs)
                doc["equal"].append(dict(M=M, routing=kind, variant=name, equal=bool(torch.equal(y, ref))))
    print(json.dumps({"tile_table_ok": all(r["ok"] for r in doc["tile_table"]),
                      "equal": all(r["equal"] for r in doc["equal"])}), flush=True)

    for M in [int(m) for m in os.environ.get("PROBE_MS", "2048 4096 8192 16384").split()]:
        calls = 4 if M <= 4096 else 2
        routes = [random_routing(M) for _ in range(calls)]
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        tab = kg.params_for(table, GPU, key, M)
        var = {"sglang": ((lambda i: impl(xs[i % 2], w.w13, w.w2, *routes[i % calls], activation="gelu",
                                          inplace=False)), None)}
        fns = {}
        if tab is not None:
            fns["triton_grouped"] = lambda i, tab=tab: kg.fused_moe_grouped(xs[i % 2], w.w13, w.w2, *routes[i % calls],
                                                                             "gelu", params=tab)
        for name, wgs in WS.items():
            fns[name] = lambda i, wgs=wgs: ws.fused_moe_ws(xs[i % 2], w.w13, w.w2, *routes[i % calls], "gelu",
                                                           up_wgs=wgs)
        var.update({k: (f, None) for k, f in fns.items()})
        t = common.time_variants(var, calls=calls, rounds=3, budget_s=0.3)
        row = {"M": M, "triton_grouped_params": tab.as_dict() if tab else None,
               "median_us": {k: t[k].median_us for k in var},
               "round_medians_us": {k: t[k].round_medians_us for k in var},
               "kernels_us": {k: kernel_times(lambda f=f: f(0), iters=10) for k, f in fns.items()}}
        print(json.dumps({"M": M, "median_us": row["median_us"]}), flush=True)
        doc["rows"].append(row)
        common.write_json_atomic(path, doc)
        del xs, routes
        torch.cuda.empty_cache()
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
