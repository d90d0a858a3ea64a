"""Offline sweep of the Hopper extend-attention kernel's block shapes (never run at serving time): checks
and times each (BLOCK_M, BLOCK_N, num_warps, num_stages, tma, dv_split) on Gemma4's key shapes beside
sglang's own kernel with its stock (128, 64) and PR #26588's (64, 64) blocks, and writes one JSON.

    python -m sglang_gemma4_opt.bench.tune_extend_attention --out DIR [--jobs 8] [--shapes NAME ...]

Kernels compile first in `--jobs` parallel processes (Triton's disk cache then serves the timing
process). Errors: relative Frobenius against float32 attention on the same bf16 inputs; time: median
of `triton.testing.do_bench`. The winners go into `kernels/extend_attention.py`'s CONFIGS by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# name: (head dim, q heads, kv heads, sliding_window_size, prefix lens, extend lens)
SHAPES = {
    "hd256_w1024_8x1024": (256, 16, 8, 1023, [0] * 8, [1024] * 8),
    "hd256_w1024_4x4096": (256, 16, 8, 1023, [0] * 4, [4096] * 4),
    "hd256_w1024_4x1024_prefix3072": (256, 16, 8, 1023, [3072] * 4, [1024] * 4),
    "hd512_full_8x1024": (512, 16, 2, -1, [0] * 8, [1024] * 8),
    "hd512_full_2x1024_prefix4096": (512, 16, 2, -1, [4096] * 2, [1024] * 2),
}
CONFIGS = {
    256: [(128, 64, 8, 2, True, 1), (128, 64, 8, 2, False, 1), (128, 32, 8, 3, True, 1), (128, 32, 8, 2, True, 1),
          (64, 64, 4, 2, True, 1), (64, 32, 4, 2, True, 1), (64, 32, 4, 3, True, 1)],
    512: [(64, 32, 8, 2, True, 1), (64, 32, 8, 2, False, 1), (64, 16, 8, 3, True, 1), (64, 16, 8, 4, True, 1),
          (128, 32, 8, 2, True, 2), (128, 16, 8, 3, True, 2), (128, 32, 8, 2, False, 2)],
}
# the Gluon head-dim-512 kernel (calls without prefix keys only): its key tile sizes
SHARED_SOFTMAX_BNS = (32, 64)
DEVICE = "cuda"
SGLANG_BLOCKS = {"stock": (128, 64), "pr": (64, 64)}  # head dim 256; 512 runs sglang's (32, 64) for both


def attended_pairs(prefix_lens, extend_lens, window) -> int:
    """(query, key) pairs one head attends under sglang's masks (window on for sliding_window_size > 0)."""
    n = 0
    for P, L in zip(prefix_lens, extend_lens):
        for m in range(L):
            keys = P + m + 1
            n += min(keys, window + 1) if window > 0 else keys
    return n


def _stock_fn():
    from ..patches import extend_attention_kernel as pk

    mod = pk.import_first(*pk.MODULES)
    fn = mod.extend_attention_fwd
    return mod, getattr(fn, "__wrapped__", fn)


class _blocks:
    """Make sglang's kernel use (BLOCK_M, BLOCK_N) at this head dim for the block's duration."""

    def __init__(self, mod, bm_bn):
        self.mod, self.bm_bn = mod, bm_bn

    def __enter__(self):
        self.old = self.mod.__dict__["_get_block_sizes_for_extend_attention"]
        old, bm_bn = self.old, self.bm_bn

        def patched(Lq, Lv):
            r = old(Lq, Lv)
            return (*r[:3], *bm_bn, r[5]) if bm_bn else r

        self.mod._get_block_sizes_for_extend_attention = patched

    def __exit__(self, *exc):
        self.mod._get_block_sizes_for_extend_attention = self.old


def _call(fn, case, window, out=None, **kw):
    c = dict(case)
    max_len = c.pop("max_len")
    if out is not None:
        c["o_extend"] = out
    fn(c["q_extend"], c["k_extend"], c["v_extend"], c["o_extend"], c["k_buffer"], c["v_buffer"], c["qo_indptr"],
       c["kv_indptr"], c["kv_indices"], None, True, None, max_len, 1.0, 1.0, None, sliding_window_size=window, **kw)
    return c["o_extend"]


def _variants(hd, has_prefix=False):
    from ..kernels.extend_attention import SharedSoftmax

    out = [("sglang stock blocks", "stock", None), ("sglang PR blocks", "pr", None)] if hd == 256 else \
        [("sglang (32, 64)", "stock", None)]
    out += [(f"hopper {cfg}", "ours", cfg) for cfg in CONFIGS[hd]]
    if hd == 512 and not has_prefix:
        out += [(f"hopper shared-softmax (64, {bn})", "ours", SharedSoftmax(bn)) for bn in SHARED_SOFTMAX_BNS]
    return out


def _config_json(cfg):
    from ..kernels.extend_attention import SharedSoftmax

    if isinstance(cfg, SharedSoftmax):
        return ["shared_softmax", cfg.block_n]
    return list(cfg) if cfg else None


def _compile_job(job):
    """Run one variant once on a small case with the same specialisation (fills Triton's disk cache)."""
    name, kind, cfg = job
    try:
        import torch

        from ..kernels import extend_attention as ka

        hd, hq, hkv, w, pl, el = SHAPES[name]
        small = ka.random_case([min(p, 64) for p in pl[:2]], [64, 33], hq, hkv, hd, device=DEVICE)
        mod, stock = _stock_fn()
        if kind == "ours":
            _call(ka.extend_attention_fwd, small, w, config=cfg)
        else:
            with _blocks(mod, SGLANG_BLOCKS[kind] if hd == 256 else None):
                _call(stock, small, w)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported again (with a traceback) by the timing pass
        return f"{job}: {type(e).__name__}: {e}"


def precompile(names, jobs):
    import multiprocessing as mp

    todo = []
    for name in names:
        for _, kind, cfg in _variants(SHAPES[name][0], any(SHAPES[name][4])):
            todo.append((name, kind, cfg))
    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        errs = [e for e in pool.map(_compile_job, todo, chunksize=1) if e]
    print(f"precompiled {len(todo)} variants in {time.time() - t0:.0f}s with {jobs} processes", flush=True)
    for e in errs:
        print("  precompile error:", e, flush=True)


def sweep(names, rep_ms=100):
    import torch
    import triton

    from ..kernels import extend_attention as ka

    mod, stock = _stock_fn()
    results = []
    for name in names:
        hd, hq, hkv, w, pl, el = SHAPES[name]
        torch.manual_seed(hash(name) & 0xFFFF)
        case = ka.random_case(pl, el, hq, hkv, hd, device=DEVICE)
        ref = ka.reference(case["q_extend"], case["k_extend"], case["v_extend"], case["k_buffer"], case["v_buffer"],
                           case["qo_indptr"], case["kv_indptr"], case["kv_indices"], None, w)
        flops = 4 * hq * hd * attended_pairs(pl, el, w)
        rows = []
        for label, kind, cfg in _variants(hd, any(pl)):
            row = dict(shape=name, variant=label, config=_config_json(cfg))
            try:
                if kind == "ours":
                    def run(out=None):
                        return _call(ka.extend_attention_fwd, case, w, out=out, config=cfg)
                    ctx = None
                else:
                    ctx = _blocks(mod, SGLANG_BLOCKS[kind] if hd == 256 else None)

                    def run(out=None):
                        with ctx:
                            return _call(stock, case, w, out=out)
                o = run(torch.full_like(case["o_extend"], float("nan")))
                torch.cuda.synchronize()
                row["finite"] = bool(torch.isfinite(o).all())
                row["rel_err"] = float((o.float() - ref).norm() / ref.norm())
                row["max_abs_err"] = float((o.float() - ref).abs().max())
                ms = triton.testing.do_bench(run, warmup=25, rep=rep_ms, return_mode="median")
                ms2 = triton.testing.do_bench(run, warmup=5, rep=rep_ms, return_mode="median")
                row["us"] = 1e3 * ms
                row["us_again"] = 1e3 * ms2
                row["tflops"] = flops / (ms * 1e-3) / 1e12
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = {r["variant"]: r.get("us") for r in rows}
        pr = base.get("sglang PR blocks") or base.get("sglang (32, 64)")
        for r in rows:
            if r.get("us") and pr:
                r["vs_pr"] = pr / r["us"]
        results.append(dict(shape=name, head_dim=hd, q_heads=hq, kv_heads=hkv, sliding_window_size=w,
                            prefix_lens=pl, extend_lens=el, flops=flops, rows=rows))
        torch.cuda.empty_cache()
    return results


def parse_config(text: str) -> tuple[int, tuple]:
    """'HD:BLOCK_M,BLOCK_N,WARPS,STAGES,TMA,DV_SPLIT' (TMA 0/1) -> (head dim, config tuple)."""
    try:
        hd, rest = text.split(":")
        bm, bn, w, st, tma, dv = (int(v) for v in rest.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HD:BLOCK_M,BLOCK_N,WARPS,STAGES,TMA,DV_SPLIT")
    if int(hd) not in CONFIGS or tma not in (0, 1) or min(bm, bn, w, st, dv) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: head dim in {sorted(CONFIGS)}, TMA 0/1, sizes >= 1")
    return int(hd), (bm, bn, w, st, bool(tma), dv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile processes (0: compile while timing)")
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--config", type=parse_config, action="append", default=[], metavar="HD:BM,BN,W,S,TMA,DV",
                    help="extra launch shape to sweep, e.g. 512:128,64,8,1,0,2 (repeatable)")
    ap.add_argument("--only-extra", action="store_true",
                    help="sweep only the --config shapes for the head dims they name")
    args = ap.parse_args(argv)
    import torch

    extra: dict[int, list] = {}
    for hd, cfg in args.config:
        extra.setdefault(hd, []).append(cfg)
    for hd, cfgs in extra.items():
        CONFIGS[hd] = cfgs if args.only_extra else CONFIGS[hd] + [c for c in cfgs if c not in CONFIGS[hd]]

    if args.jobs > 0:
        precompile(args.shapes, args.jobs)
    res = sweep(args.shapes, args.rep_ms)
    doc = dict(gpu=torch.cuda.get_device_name(), versions=_versions(), configs={str(k): v for k, v in CONFIGS.items()},
               results=res)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tune_extend_attention-{doc['gpu'].replace(' ', '_')}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\n{'shape':32s} {'variant':44s} {'us':>9s} {'TFLOP/s':>8s} {'vs PR':>6s} {'rel err':>9s}")
    for r in res:
        for row in r["rows"]:
            print(f"{r['shape']:32s} {row['variant']:44s} {row.get('us', float('nan')):9.1f} "
                  f"{row.get('tflops', float('nan')):8.1f} {row.get('vs_pr', float('nan')):6.2f} "
                  f"{row.get('rel_err', float('nan')):9.2e} {row.get('error', '')}")
    print(f"wrote {path}")
    return 0


def _versions():
    try:
        from ..cli import versions

        return versions()
    except Exception:
        return {}


if __name__ == "__main__":
    sys.exit(main())
