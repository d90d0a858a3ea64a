"""GPU probe: the prefill MoE on torch._grouped_mm (CUTLASS grouped GEMM on sm90: exact per-expert row
offsets, no padding to 128-row tiles) against sglang's fused_experts (plugin tables, PR tables) and the
plugin's Triton grouped kernels (sglang_gemma4_opt/kernels/moe_grouped.py), whole MoE, CUDA-graph replay,
random top-8 routing, output compared with sglang's.

  PROBE_MS="2048 4096 16384" PROBE_N=704 python -u benchmarks/scripts/moe_gmm_probe.py  # $OUT/gmm_probe_N704.json

Pipeline measured (each piece also timed alone):
  sort the (token, k) slots by expert (torch.sort, stable) -> per-expert end offsets (searchsorted) and the
  inverse permutation -> gather token rows -> _grouped_mm up (w13 as a transposed view, no copy) ->
  activation (Triton, rounding as sglang's caches) -> _grouped_mm down -> weighted top-k gather-sum (Triton).
"""
import json, os, sys
from pathlib import Path
import torch
import triton
import triton.language as tl
from sglang_gemma4_opt.bench.common import env_header, side_by_side, time_variants
from sglang_gemma4_opt.bench import fused_moe as fm
from sglang_gemma4_opt.patches.moe_configs import CONFIG_ROOT
from sglang_gemma4_opt.kernels import moe_grouped as mg
from sglang_gemma4_opt.bench.tune_moe_grouped import CANDIDATES
from sglang_gemma4_opt.kernels.moe_small_batch import _act, shape_key

sbs = side_by_side()
OUT = os.environ.get("OUT", ".")
N = int(os.environ.get("PROBE_N", "704"))
PR_ROOT = Path("benchmarks/baselines/pr26588")
GPU = torch.cuda.get_device_name()
FALLBACK = CANDIDATES["bm128_u128x64w8s4_d256x64w8s4"]  # a GPU or M the table does not hold


@triton.jit
def act_kernel(h_ptr, o_ptr, rows, N_HALF, stride_h, stride_o, ACT: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N_HALF
    g = tl.load(h_ptr + r.to(tl.int64) * stride_h + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r.to(tl.int64) * stride_h + N_HALF + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + r.to(tl.int64) * stride_o + offs, (_act(g, ACT) * u).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def gather_sum_kernel(y_ptr, inv_ptr, ids_ptr, w_ptr, out_ptr, H, stride_y, stride_o,
                      TOPK: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        e = tl.load(ids_ptr + t * TOPK + k)
        if e >= 0:
            row = tl.load(inv_ptr + t * TOPK + k)
            wk = tl.load(w_ptr + t * TOPK + k).to(tl.float32)
            acc += wk * tl.load(y_ptr + row.to(tl.int64) * stride_y + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def prep(ids, E):
    flat = ids.reshape(-1)
    key = torch.where(flat < 0, E, flat)
    sorted_e, order = torch.sort(key, stable=True)
    bounds = torch.arange(1, E + 1, device=ids.device, dtype=sorted_e.dtype)
    offs = torch.searchsorted(sorted_e, bounds, out_int32=True)
    inv = torch.empty_like(order)
    inv.scatter_(0, order, torch.arange(order.numel(), device=ids.device, dtype=order.dtype))
    return order, offs, inv


def gmm_moe(x, w13, w2, tw, ids, w13_b=None, w2_b=None, act_block=1024, sum_block=1024):
    M, K = x.shape
    E, two_n, _ = w13.shape
    n_half = two_n // 2
    topk = ids.shape[1]
    order, offs, inv = prep(ids, E)
    xs = x.index_select(0, order // topk)
    h = torch._grouped_mm(xs, w13.transpose(1, 2) if w13_b is None else w13_b, offs=offs)
    a = torch.empty(h.shape[0], n_half, device=x.device, dtype=x.dtype)
    act_kernel[(h.shape[0], triton.cdiv(n_half, act_block))](h, a, h.shape[0], n_half, h.stride(0), a.stride(0),
                                                              ACT=1, BLOCK=act_block, num_warps=4)
    y = torch._grouped_mm(a, w2.transpose(1, 2) if w2_b is None else w2_b, offs=offs)
    out = torch.empty(M, K, device=x.device, dtype=x.dtype)
    gather_sum_kernel[(M, triton.cdiv(K, sum_block))](y, inv, ids, tw, out, K, y.stride(0), out.stride(0),
                                                       TOPK=topk, BLOCK_H=sum_block, num_warps=4)
    return out


def serving(folder):
    return lambda: fm._both(sbs, fm.use_tables(sbs, folder), "stock")


fe = fm.fused_experts_fn()
rcfg = fm.runner_config(N=N)
w = fm.Weights(N=N)
E = w.w13.shape[0]
table = mg.load_table()
key = shape_key(E, N, 2816, 8, torch.bfloat16)
ms = [int(m) for m in os.environ.get("PROBE_MS", "2048 4096 8192 16384 65536").split()]
bcontig = os.environ.get("PROBE_BCONTIG", "1") == "1"
w13_t = w.w13.transpose(1, 2).contiguous() if bcontig else None
w2_t = w.w2.transpose(1, 2).contiguous() if bcontig else None
rows = []
shipped, pr = serving(CONFIG_ROOT), serving(PR_ROOT) if PR_ROOT.is_dir() else None
header = dict(env_header(sys.argv), gpu=GPU)
for M in ms:
    x = torch.randn(M, 2816, device="cuda", dtype=torch.bfloat16)
    calls = 4 if M <= 4096 else 2 if M <= 16384 else 1
    routes = [fm.random_routing(M) for _ in range(calls)]
    tw, ids = routes[0]
    with shipped():
        y_stock = fe(x, w.w13, w.w2, fm.topk_output(tw, ids), rcfg).clone()
    ref = y_stock.float()
    row = {"M": M}

    def err(name, y):
        row[name + "_relerr_vs_stock"] = float((y.float() - ref).norm() / ref.norm())
        row[name + "_maxabs_vs_stock"] = float((y.float() - ref).abs().max())

    run = lambda i: fe(x, w.w13, w.w2, fm.topk_output(*routes[i % calls]), rcfg)  # noqa: E731
    variants = {"shipped": (run, shipped)}
    if pr is not None:
        variants["pr"] = (run, pr)
    p = None
    try:
        p = mg.params_for(table, GPU, key, M)
    except Exception as e:  # noqa
        row["table_error"] = repr(e)[:200]
    if p is None:
        p = mg.GroupedParams(**FALLBACK)
    row["grouped_params"] = p.as_dict()
    err("grouped", mg.fused_moe_grouped(x, w.w13, w.w2, tw, ids, "gelu", params=p))
    variants["grouped"] = (lambda i: mg.fused_moe_grouped(x, w.w13, w.w2, *routes[i % calls], "gelu", params=p), None)
    for name, kw in {"gmm": {}, "gmm_bcontig": dict(w13_b=w13_t, w2_b=w2_t)}.items():
        if name == "gmm_bcontig" and not bcontig:
            continue
        try:
            err(name, gmm_moe(x, w.w13, w.w2, tw, ids, **kw))
            torch.cuda.synchronize()
        except Exception as e:  # noqa
            row[name + "_error"] = repr(e)[:400]
            print(name, "failed:", repr(e)[:400], flush=True)
            continue
        variants[name] = ((lambda kw: (lambda i: gmm_moe(x, w.w13, w.w2, *routes[i % calls], **kw)))(kw), None)
    # pieces (first routing)
    order, offs, inv = prep(ids, E)
    xs = x.index_select(0, order // 8)
    MT = xs.shape[0]
    h = torch.randn(MT, 2 * N, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(MT, N, device="cuda", dtype=torch.bfloat16)
    yb = torch.randn(MT, 2816, device="cuda", dtype=torch.bfloat16)
    outb = torch.empty(M, 2816, device="cuda", dtype=torch.bfloat16)
    w_up = w.w13[0].new_empty(2 * N, 2816).normal_()
    w_dn = w.w13[0].new_empty(2816, N).normal_()
    variants["piece_prep"] = (lambda i: prep(routes[i % calls][1], E), None)
    variants["piece_sort_only"] = (lambda i: torch.sort(routes[i % calls][1].reshape(-1), stable=True), None)
    variants["piece_gather"] = (lambda i: x.index_select(0, order // 8), None)
    variants["piece_gmm_up"] = (lambda i: torch._grouped_mm(xs, w.w13.transpose(1, 2), offs=offs), None)
    variants["piece_gmm_down"] = (lambda i: torch._grouped_mm(a, w.w2.transpose(1, 2), offs=offs), None)
    if bcontig:
        variants["piece_gmm_up_bcontig"] = (lambda i: torch._grouped_mm(xs, w13_t, offs=offs), None)
        variants["piece_gmm_down_bcontig"] = (lambda i: torch._grouped_mm(a, w2_t, offs=offs), None)
    variants["piece_act"] = (lambda i: act_kernel[(MT, 1)](h, a, MT, N, h.stride(0), a.stride(0), ACT=1, BLOCK=1024), None)
    variants["piece_gather_sum"] = (lambda i: gather_sum_kernel[(M, 3)](yb, inv, ids, tw, outb, 2816, yb.stride(0),
                                                                         outb.stride(0), TOPK=8, BLOCK_H=1024), None)
    variants["piece_cublas_up_dense"] = (lambda i: xs @ w_up.T, None)
    variants["piece_cublas_down_dense"] = (lambda i: a @ w_dn.T, None)
    try:
        t = time_variants(variants, calls=calls, rounds=3, budget_s=0.3)
    except Exception as e:  # noqa
        row["timing_error"] = repr(e)[:400]
        print("timing failed", repr(e)[:400], flush=True)
        t = {}
    for n, tm in t.items():
        row[n + "_us"] = round(tm.median_us, 2)
    row["flops"] = 2 * M * 8 * 3 * N * 2816
    for n in ("shipped", "pr", "grouped", "gmm", "gmm_bcontig"):
        if n + "_us" in row:
            row[n + "_tflops"] = round(row["flops"] / row[n + "_us"] / 1e6, 1)
    print(json.dumps({k: v for k, v in row.items() if k.endswith("_us") or k == "M" or "relerr" in k}), flush=True)
    rows.append(row)
    json.dump({"header": header, "N": N, "rows": rows}, open(os.path.join(OUT, f"gmm_probe_N{N}.json"), "w"), indent=1)
    torch.cuda.empty_cache()
