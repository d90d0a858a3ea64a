"""Offline sweep of the expert-grouped prefill MoE (`kernels/moe_grouped.py`; never at serving time).

For each MoE shape (E=128, K=2816, top-8, bf16, gelu; N=704 at TP 1, N=352 at TP 2) and each prefill size
M: times every candidate launch shape and sglang's own kernel sequence (`fused_experts_impl` with the
tables the plugin serves), side by side in one process, CUDA-graph replay, fresh random top-8 routing per
captured call; checks each candidate's output against sglang's on the same inputs; then times the best
candidate against sglang with skewed routing (a few experts take most tokens, as real routers do).
Above 16384 tokens only the previous size's four best candidates are timed (memory: one captured call
there holds ~4 GB of intermediates), and with `--candidates @shipped` the shapes the table ships now.

An M joins the table when the grouped path is >= 3% faster with random routing and <= 2% slower with
skewed routing; the table's min_m is the smallest tuned M from which every larger tuned M joins (the
hook sends every M >= min_m to the nearest tuned entry). Writes one JSON with every measurement (and,
for scale, cuBLAS on dense operands of the same FLOPs, sglang's align and torch's top-k sum) and the
table the plugin ships (`configs/moe_grouped.json` format), for `--write-table` or by hand.

    python -m sglang_gemma4_opt.bench.tune_moe_grouped --out DIR [--ns 704 352] [--ms 1024 2048 ...] [--write-table]
        [--candidates PATTERN ...]   (e.g. @shipped '*_od*': the shapes shipped now and every one_dot form)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

from . import common
from .tune_moe_small import shape_key

E, K, TOPK = 128, 2816, 8
MS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
NS = (704, 352)
MIN_GAIN = 0.03  # an M joins the table only when the grouped path is this much faster (random routing)
MAX_LOSS = 0.02  # ... and at most this much slower with skewed routing
FULL_SWEEP_MAX_M = 16384  # above: only the previous size's best few
KEEP = 4


def _p(bm, un, uk, uw, us, dn, dk, dw, ds, **kw):
    return dict(block_m=bm, up_block_n=un, up_block_k=uk, up_warps=uw, up_stages=us,
                down_block_n=dn, down_block_k=dk, down_warps=dw, down_stages=ds, **kw)


# From the H200 probes of session 6 (benchmarks/scripts/moe_grouped_probe.py): 128-row tiles, gate and
# up 128 columns each, down 256 columns, 8 warps won at M >= 2048; the swapped-operand and 64-row
# forms stay in for other GPUs and smaller M.
CANDIDATES = {
    "bm128_u128x64w8s3_d256x64w8s3": _p(128, 128, 64, 8, 3, 256, 64, 8, 3),
    "bm128_u128x64w8s3_d256x64w8s3_g4": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, group_m=4),
    "bm128_u128x64w8s3_d256x64w8s3_g16": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, group_m=16),
    "bm128_u128x64w8s4_d256x64w8s4": _p(128, 128, 64, 8, 4, 256, 64, 8, 4),
    "bm128_u128x64w8s4_d256x64w8s4_g4": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=4),
    "bm128_u128x64w8s4_d256x64w8s4_g16": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=16),
    "bm128_u128x64w8s4_d256x64w8s4_sum512": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, sum_block_h=512),
    "bm128_u128x64w8s4_d128x64w8s4": _p(128, 128, 64, 8, 4, 128, 64, 8, 4),
    "bm128_u64x64w8s3_d256x64w8s3": _p(128, 64, 64, 8, 3, 256, 64, 8, 3),
    "bm64_u128x64w4s3_d256x64w4s3": _p(64, 128, 64, 4, 3, 256, 64, 4, 3),
    # session 7: half tiles (split_m: experts padded to 64 rows, one 128-row tile where two halves share an
    # expert; split_n: the last up column tile at N=704 half wide)
    "bm128_u128x64w8s4_d256x64w8s4_sm_sn": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, split_m=True, split_n=True),
    "bm128_u128x64w8s4_d256x64w8s4_sm": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, split_m=True),
    "bm128_u128x64w8s4_d256x64w8s4_sn": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, split_n=True),
    "bm128_u128x64w8s4_d256x64w8s4_g4_sm_sn": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=4, split_m=True,
                                                 split_n=True),
    "bm128_u128x64w8s4_d256x64w8s4_g16_sm_sn": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=16, split_m=True,
                                                  split_n=True),
    "bm128_u128x64w8s3_d256x64w8s3_sm_sn": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, split_m=True, split_n=True),
    "bm128_u128x64w8s3_d256x64w8s3_sn": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, split_n=True),
    # session 8: alignment to 128 rows as sglang's, the tail tile of an expert at half height when its second
    # half is padding (no mixed-expert blocks, unlike split_m)
    "bm128_u128x64w8s4_d256x64w8s4_ht": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, half_tail=True),
    "bm128_u128x64w8s4_d256x64w8s4_g4_ht": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=4, half_tail=True),
    "bm128_u128x64w8s4_d256x64w8s4_ht_sn": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, half_tail=True, split_n=True),
    "bm128_u128x64w8s4_d256x64w8s4_g16_ht_sn": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=16, half_tail=True,
                                                  split_n=True),
    "bm128_u128x64w8s3_d256x64w8s3_ht_sn": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, half_tail=True, split_n=True),
    "bm128_u128x64w8s3_d256x64w8s3_g4_ht_sn": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, group_m=4, half_tail=True,
                                                 split_n=True),
    # session 13: gate and up through one dot (one m64n256 wgmma per warpgroup and k-step instead of two m64n128),
    # with the shipped shapes' options; BLOCK_K 128 at two stages halves the K loop's barriers per FLOP
    "bm128_u128x64w8s4_d256x64w8s4_ht_sn_od": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, half_tail=True, split_n=True,
                                                 one_dot=True),
    "bm128_u128x64w8s4_d256x64w8s4_g16_ht_sn_od": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=16, half_tail=True,
                                                     split_n=True, one_dot=True),
    "bm128_u128x64w8s3_d256x64w8s3_ht_sn_od": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, half_tail=True, split_n=True,
                                                 one_dot=True),
    "bm128_u128x64w8s3_d256x64w8s3_sn_od": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, split_n=True, one_dot=True),
    "bm128_u128x128w8s2_d256x64w8s4_ht_sn_od": _p(128, 128, 128, 8, 2, 256, 64, 8, 4, half_tail=True, split_n=True,
                                                  one_dot=True),
    "bm128_u128x64w8s4_d256x64w8s4_g4_ht_od": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=4, half_tail=True,
                                                 one_dot=True),
    "bm128_u128x64w8s4_d256x64w8s4_g16_sm_sn_od": _p(128, 128, 64, 8, 4, 256, 64, 8, 4, group_m=16, split_m=True,
                                                     split_n=True, one_dot=True),
    "bm128_u128x128w8s2_d256x64w8s4_ht_sn": _p(128, 128, 128, 8, 2, 256, 64, 8, 4, half_tail=True, split_n=True),
    "swap_t64_w64x64w4s4_h128x64w4s4": _p(64, 64, 64, 4, 4, 128, 64, 4, 4, swap_ab=True),
    "swap_t128_w128x64w8s3_h256x64w8s3": _p(128, 128, 64, 8, 3, 256, 64, 8, 3, swap_ab=True),
}
# session 14: the down GEMM persistent, its tile loop flattened into the K loop (pd), on the one_dot shapes the H200
# table ships (session 14 on an H200: as fast as the shipped form at M=2048, 1% slower at 4096)
CANDIDATES.update({
    f"{name}_pd": dict(CANDIDATES[name], persistent_down=True)
    for name in ("bm128_u128x64w8s4_d256x64w8s4_ht_sn_od", "bm128_u128x64w8s3_d256x64w8s3_ht_sn_od",
                 "bm128_u128x64w8s3_d256x64w8s3_sn_od")
})
# session 14: tail tiles at a quarter of the height too (32 rows, mma.sync) (qt)
CANDIDATES.update({
    f"{name}_qt": dict(CANDIDATES[name], quarter_tail=True)
    for name in ("bm128_u128x64w8s4_d256x64w8s4_ht_sn_od", "bm128_u128x64w8s3_d256x64w8s3_ht_sn_od",
                 "bm128_u128x64w8s4_d256x64w8s4_g16_ht_sn_od")
})

SHIPPED = "@shipped"  # a --candidates pattern: the candidates this GPU's table ships now (any shape, any M)


def shipped_names(table: dict, gpu: str) -> list:
    """Names of the candidates whose launch shapes `table` (configs/moe_grouped.json's format) ships for `gpu`,
    in CANDIDATES order; a shipped shape that no candidate spells is refused (a re-tune could not keep it)."""
    from ..kernels.moe_grouped import GroupedParams

    by_params = {GroupedParams(**c): n for n, c in CANDIDATES.items()}
    names = set()
    for key, entry in table.get(gpu, {}).items():
        for m, fields in entry["by_m"].items():
            name = by_params.get(GroupedParams(**fields))
            if name is None:
                raise SystemExit(f"{gpu} {key} M={m}: the shipped launch shape is no candidate: {fields}")
            names.add(name)
    return [n for n in CANDIDATES if n in names]


def selected(patterns=None, shipped=()):
    """The candidates whose names match any of the shell-style patterns (all of them without patterns); the
    pattern @shipped stands for the names in `shipped` (see shipped_names)."""
    if not patterns:
        return list(CANDIDATES)
    names = [n for n in CANDIDATES
             if any(n in shipped if pat == SHIPPED else fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not names:
        raise SystemExit(f"no candidate matches {patterns}; candidates: {sorted(CANDIDATES)}")
    return names


def skewed_routing(M, alpha=1.2, device="cuda"):
    """Top-k distinct experts per token drawn with probability ~ 1/rank^alpha over a random ranking of
    the experts (a handful of experts take a large share of the tokens); softmax weights."""
    import torch

    rank = torch.randperm(E, device=device).float() + 1.0
    probs = (rank ** -alpha).expand(M, E)
    ids = torch.multinomial(probs, TOPK, replacement=False).to(torch.int32)
    w = torch.softmax(torch.randn(M, TOPK, device=device), dim=-1).to(torch.float32)
    return w, ids


def calls_for(M):
    return 4 if M <= 4096 else 2 if M <= FULL_SWEEP_MAX_M else 1


def tune_shape(N, ms, args, log, shipped=()):
    import torch

    from ..kernels import moe_grouped as kg
    from ..patches.moe_small_batch import stock_impl
    from .fused_moe import Weights, random_routing

    impl = stock_impl()
    w = Weights(N=N)
    rows = []
    names = selected(args.candidates, shipped)
    for M in sorted(ms):
        if M > FULL_SWEEP_MAX_M and rows:
            prev = rows[-1]["candidates_us"]
            names = sorted(prev, key=prev.get)[:KEEP]
            names += [n for n in shipped if n not in names]  # what ships is always in the comparison
        calls = calls_for(M)
        x0 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w0, ids0 = random_routing(M)
        out_s = impl(x0, w.w13, w.w2, w0, ids0, activation="gelu", inplace=False)
        n_s = out_s.float().norm()
        routes = [random_routing(M) for _ in range(calls)]
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(min(calls, 2))]

        def stock(i, routes=routes):
            rw, rid = routes[i % len(routes)]
            impl(xs[i % len(xs)], w.w13, w.w2, rw, rid, activation="gelu", inplace=False)

        def grouped(p, routes=routes):
            def step(i):
                rw, rid = routes[i % len(routes)]
                kg.fused_moe_grouped(xs[i % len(xs)], w.w13, w.w2, rw, rid, "gelu", params=p)
            return step

        variants = {"stock": (stock, None)}
        relerr, skipped = {}, {}
        for name in names:
            p = kg.GroupedParams(**CANDIDATES[name])
            try:
                y = kg.fused_moe_grouped(x0, w.w13, w.w2, w0, ids0, "gelu", params=p)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a launch shape that cannot run is not a candidate
                skipped[name] = f"{type(e).__name__}: {str(e)[:120]}"
                continue
            relerr[name] = float((y.float() - out_s.float()).norm() / n_s)
            if not torch.isfinite(y).all() or relerr[name] > 1e-2:
                skipped[name] = f"output differs from sglang's (relative {relerr[name]:.3g})"
                continue
            variants[name] = (grouped(p), None)
        pieces = {}
        if args.pieces:
            a_up = torch.randn(M * TOPK, K, device="cuda", dtype=torch.bfloat16)
            a_dn = torch.randn(M * TOPK, N, device="cuda", dtype=torch.bfloat16)
            c3 = torch.randn(M * TOPK, K, device="cuda", dtype=torch.bfloat16)
            w_up, w_dn = w.w13[0], w.w2[0]
            align = kg._sglang_align()
            pieces = {
                "cublas_up_dense": (lambda i: a_up @ w_up.T, None),
                "cublas_down_dense": (lambda i: a_dn @ w_dn.T, None),
                "sglang_align_bm128": (lambda i: align(routes[i % calls][1], 128, E), None),
                "torch_topk_sum": (lambda i: c3.view(M, TOPK, K).sum(1, dtype=torch.float32).to(torch.bfloat16), None),
            }
        t = common.time_variants(dict(variants, **pieces), calls=calls, rounds=args.rounds, budget_s=args.budget,
                                 preheat_s=args.preheat)
        cand = {n: t[n].median_us for n in variants if n != "stock"}
        if not cand:
            log(f"N={N} M={M}: no candidate ran ({json.dumps(skipped)})")
            continue
        best = min(cand, key=cand.get)
        bp = kg.GroupedParams(**CANDIDATES[best])
        skew = [skewed_routing(M) for _ in range(calls)]
        ts = common.time_variants({"stock": ((lambda i: stock(i, skew)), None),
                                   "grouped": (grouped(bp, skew), None)},
                                  calls=calls, rounds=2, budget_s=args.budget, preheat_s=args.preheat)
        row = dict(N=N, M=M, best=best, params=bp.as_dict(), stock_us=t["stock"].median_us, best_us=cand[best],
                   speedup=t["stock"].median_us / cand[best],
                   stock_round_medians_us=t["stock"].round_medians_us,
                   best_round_medians_us=t[best].round_medians_us,
                   skew_stock_us=ts["stock"].median_us, skew_grouped_us=ts["grouped"].median_us,
                   skew_speedup=ts["stock"].median_us / ts["grouped"].median_us,
                   flops=2 * M * TOPK * 3 * N * K,
                   best_tflops=2 * M * TOPK * 3 * N * K / (cand[best] * 1e-6) / 1e12,
                   candidates_us=dict(sorted(cand.items(), key=lambda kv: kv[1])),
                   relerr_vs_stock=relerr, skipped=skipped,
                   pieces_us={n: t[n].median_us for n in pieces})
        log(f"N={N} M={M}: stock {row['stock_us']:.1f} us, grouped {best} {row['best_us']:.1f} us "
            f"({row['speedup']:.3f}x, {row['best_tflops']:.0f} TFLOP/s); skewed routing: stock "
            f"{row['skew_stock_us']:.1f} us, grouped {row['skew_grouped_us']:.1f} us ({row['skew_speedup']:.3f}x)"
            + (f"; skipped {sorted(skipped)}" if skipped else ""))
        rows.append(row)
        del variants, pieces, routes, xs, x0, out_s, t, ts, skew
        torch.cuda.empty_cache()
    del w
    torch.cuda.empty_cache()
    return rows


def _joins(row, min_gain=MIN_GAIN, max_loss=MAX_LOSS) -> bool:
    return row["speedup"] >= 1 + min_gain and row["skew_speedup"] >= 1 - max_loss


def merge_into(mine: dict, rows, min_gain=MIN_GAIN, max_loss=MAX_LOSS) -> dict:
    """Merge tuned rows into one GPU's table `mine` ({shape key: {"min_m", "by_m"}}, changed in place and
    returned). Per shape tuned now: each tuned M takes its new result (in the entry when the grouped path is at
    least `min_gain` faster with random routing and at most `max_loss` slower with skewed routing, out when not);
    an M not tuned now keeps what the entry had (a re-tune of a few sizes leaves the others alone); the entry
    then holds the sizes from the smallest M on which every larger size is in (the hook sends every M >= min_m
    to the nearest entry), and no entry when the largest size is out."""
    for N in sorted({r["N"] for r in rows}, reverse=True):
        key = shape_key(E, N, K, TOPK)
        tuned = {r["M"]: r for r in rows if r["N"] == N}
        kept = {int(m): p for m, p in mine.get(key, {}).get("by_m", {}).items() if int(m) not in tuned}
        by_m = {}
        for m in sorted(set(kept) | set(tuned), reverse=True):
            if m in tuned and not _joins(tuned[m], min_gain, max_loss):
                break
            by_m[m] = tuned[m]["params"] if m in tuned else kept[m]
        mine.pop(key, None)
        if by_m:
            mine[key] = {"min_m": min(by_m), "by_m": {str(m): by_m[m] for m in sorted(by_m)}}
    return mine


def table_from(rows, min_gain=MIN_GAIN, max_loss=MAX_LOSS):
    """{shape key: {"min_m": m, "by_m": {M: params}}}: the tuned sizes from the smallest M on which every
    larger tuned M is at least `min_gain` faster (random routing) and at most `max_loss` slower (skewed)."""
    return merge_into({}, rows, min_gain, max_loss)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS))
    ap.add_argument("--budget", type=float, default=0.3, help="replay seconds per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preheat", type=float, default=1.0,
                    help=f"seconds of untimed replays before each timed block (calls >= {common.PREHEAT_MIN_US:g} us): "
                         "candidates are ranked at the clock a sustained prefill load holds, not from a cool GPU "
                         "(0: off)")
    ap.add_argument("--candidates", nargs="+", metavar="PATTERN",
                    help="time only the candidates whose names match one of these shell-style patterns "
                         f"(e.g. 'bm128_*_ht_sn*'; {SHIPPED}: those this GPU's table ships now); default: all")
    ap.add_argument("--no-pieces", dest="pieces", action="store_false",
                    help="skip the cuBLAS / align / torch-sum reference timings")
    ap.add_argument("--write-table", action="store_true", help="merge this GPU's table into configs/moe_grouped.json")
    args = ap.parse_args(argv)

    import torch

    from .. import core
    from ..kernels.moe_grouped import TABLE_PATH

    common.ensure_server_args()
    core.apply()  # the plugin's MoE tables serve sglang's lookup, as in a server with the plugin
    gpu = torch.cuda.get_device_name()

    def log(s):
        print(s, flush=True)

    t0 = time.time()
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune_moe_grouped-{common.slug(gpu)}.json"
    shipped = ()
    if args.candidates and SHIPPED in args.candidates:  # read once, before --write-table rewrites the table
        shipped = shipped_names(json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}, gpu)
        log(f"{SHIPPED}: {shipped or 'none (no table entry for this GPU)'}")
    for N in args.ns:
        rows += tune_shape(N, args.ms, args, log, shipped)
        table = table_from(rows)
        doc = {"header": dict(common.env_header(sys.argv), gpu=gpu, seconds=time.time() - t0, min_gain=MIN_GAIN,
                              max_loss_skewed=MAX_LOSS), "rows": rows, "table": {gpu: table}}
        common.write_json_atomic(path, doc)  # after every shape: an interrupted run keeps what it measured
    log(f"wrote {path}; table {json.dumps(table)}")
    if args.write_table:
        cur = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
        mine = merge_into(cur.setdefault(gpu, {}), rows)  # the sizes tuned now; the others as they were
        if not mine:
            del cur[gpu]
        TABLE_PATH.write_text(json.dumps(cur, indent=1, sort_keys=True) + "\n")
        log(f"updated {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
