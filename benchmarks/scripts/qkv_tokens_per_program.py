"""Scratch GPU sweep: by-head QKV RMSNorm with T tokens per program (T=1 is the shipped kernel)."""
import json, os, sys, statistics
import torch, triton, triton.language as tl
from sglang_gemma4_opt.bench.common import time_variants
from sglang_gemma4_opt.kernels.qkv_rmsnorm import gemma_qkv_rmsnorm as plugin_fn


@triton.jit
def _norm(x, w, HEAD_DIM: tl.constexpr, eps, HAS_WEIGHT: tl.constexpr):
    rrms = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
    if HAS_WEIGHT:
        return x * rrms * w
    return x * rrms


@triton.jit
def _rows(ptr, w, stride_m, m0, M, h, cols, mask, HEAD_DIM: tl.constexpr, eps, HAS_WEIGHT: tl.constexpr,
          TOKENS: tl.constexpr):
    off = m0 * stride_m + h * HEAD_DIM + cols
    mk1 = mask & (m0 + 1 < M)
    x0 = tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(ptr + off + stride_m, mask=mk1, other=0.0).to(tl.float32)
    if TOKENS == 4:
        mk2 = mask & (m0 + 2 < M)
        mk3 = mask & (m0 + 3 < M)
        x2 = tl.load(ptr + off + 2 * stride_m, mask=mk2, other=0.0).to(tl.float32)
        x3 = tl.load(ptr + off + 3 * stride_m, mask=mk3, other=0.0).to(tl.float32)
    o0 = _norm(x0, w, HEAD_DIM, eps, HAS_WEIGHT)
    o1 = _norm(x1, w, HEAD_DIM, eps, HAS_WEIGHT)
    tl.store(ptr + off, o0.to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + off + stride_m, o1.to(ptr.dtype.element_ty), mask=mk1)
    if TOKENS == 4:
        o2 = _norm(x2, w, HEAD_DIM, eps, HAS_WEIGHT)
        o3 = _norm(x3, w, HEAD_DIM, eps, HAS_WEIGHT)
        tl.store(ptr + off + 2 * stride_m, o2.to(ptr.dtype.element_ty), mask=mk2)
        tl.store(ptr + off + 3 * stride_m, o3.to(ptr.dtype.element_ty), mask=mk3)


@triton.jit
def kern(Q_ptr, K_ptr, V_ptr, Q_w_ptr, K_w_ptr, stride_q_m, stride_k_m, stride_v_m, M,
         NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, eps,
         BLOCK: tl.constexpr, TOKENS: tl.constexpr):
    m0 = tl.program_id(0) * TOKENS
    hh = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < HEAD_DIM
    if hh < NUM_Q_HEADS:
        qw = tl.load(Q_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        _rows(Q_ptr, qw, stride_q_m, m0, M, hh, cols, mask, HEAD_DIM, eps, True, TOKENS)
    elif hh < NUM_Q_HEADS + NUM_KV_HEADS:
        kw = tl.load(K_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        _rows(K_ptr, kw, stride_k_m, m0, M, hh - NUM_Q_HEADS, cols, mask, HEAD_DIM, eps, True, TOKENS)
    else:
        _rows(V_ptr, 1.0, stride_v_m, m0, M, hh - NUM_Q_HEADS - NUM_KV_HEADS, cols, mask, HEAD_DIM, eps, False, TOKENS)


def tok_fn(T):
    def f(q, k, v, qw, kw, qh, kvh, hd, eps):
        M = q.shape[0]
        kern[(triton.cdiv(M, T), qh + 2 * kvh)](q, k, v, qw, kw, q.stride(0), k.stride(0), v.stride(0), M,
                                               NUM_Q_HEADS=qh, NUM_KV_HEADS=kvh, HEAD_DIM=hd, eps=eps,
                                               BLOCK=triton.next_power_of_2(hd), TOKENS=T)
    return f


def main():
    out = []
    variants = {"T1": lambda *a: plugin_fn(*a, by_head=True), "T2": tok_fn(2), "T4": tok_fn(4)}
    for qh, kvh, hd in ((16, 8, 256), (16, 2, 512)):
        for M in (1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512):
            width = (qh + 2 * kvh) * hd
            qw = (1.0 + 0.1 * torch.randn(hd, device="cuda")).to(torch.bfloat16)
            kw = (1.0 + 0.1 * torch.randn(hd, device="cuda")).to(torch.bfloat16)
            x = (3.0 * torch.randn(M, width, device="cuda")).to(torch.bfloat16)
            ref = x.clone()
            q, k, v = ref.split([qh * hd, kvh * hd, kvh * hd], dim=-1)
            plugin_fn(q, k, v, qw, kw, qh, kvh, hd, 1e-6, by_head=False)
            row = {"M": M, "shape": f"{qh}/{kvh}/{hd}"}
            for name, fn in variants.items():
                y = x.clone()
                q, k, v = y.split([qh * hd, kvh * hd, kvh * hd], dim=-1)
                fn(q, k, v, qw, kw, qh, kvh, hd, 1e-6)
                torch.cuda.synchronize()
                row[name + "_exact"] = bool(torch.equal(y, ref))
            bufs = [(3.0 * torch.randn(M, width, device="cuda")).to(torch.bfloat16) for _ in range(20)]

            def step(fn):
                def s(i):
                    q, k, v = bufs[i % 20].split([qh * hd, kvh * hd, kvh * hd], dim=-1)
                    fn(q, k, v, qw, kw, qh, kvh, hd, 1e-6)
                return s
            vs = {n: (step(f), None) for n, f in variants.items()}
            vs["loop"] = (step(lambda *a: plugin_fn(*a, by_head=False)), None)
            t = time_variants(vs, calls=20, rounds=3, budget_s=0.3)
            for n, tm in t.items():
                row[n + "_us"] = round(tm.median_us, 3)
            print(json.dumps(row), flush=True)
            out.append(row)
    dst = os.path.join(os.environ.get("OUT", "."), "qkv_tokens_sweep.json")
    json.dump({"gpu": torch.cuda.get_device_name(), "rows": out}, open(dst, "w"), indent=1)


if __name__ == "__main__":
    main()
