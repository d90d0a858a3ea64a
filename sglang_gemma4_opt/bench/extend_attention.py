"""Suite extend_attention: sglang's Triton prefill (extend) attention with sglang's block sizes vs the
plugin's, through sglang's own `extend_attention_fwd`.

Gemma4 26B-A4B shapes: sliding layers (16 q heads, 8 kv heads, head dim 256, window 1024) and global
layers (16 q heads, 2 kv heads, head dim 512, full causal). Pure prefill (no cached prefix), with
qo_indptr / kv_indptr / kv_indices laid out as sglang's triton backend builds them for a batch of
fresh requests: kv_indptr all zero and kv_indices empty (prefix lengths 0), qo_indptr the cumulative
extend lengths.

Window semantics: `window` is the model's sliding window (keys per query, its own included; HF
`sliding_window`). sglang's kernel masks `q - k > sliding_window_size`, so the model must pass
`window - 1` (= 1023; sglang >= 0.5.13's Gemma4 does; 0.5.12's Gemma4Attention passes
`config.sliding_window` = 1024, one key more than HF's model: timing is the same to within a tile).
"""

from __future__ import annotations

import re

from .common import record
from .flops import attention_pairs, extend_attention_flops

SUITE = "extend_attention"
MODULES = ("sglang.kernels.ops.attention.extend_attention",
           "sglang.srt.layers.attention.triton_ops.extend_attention")
# (head_dim, q_heads, kv_heads, window): sliding layers, global layers
LAYERS = ((256, 16, 8, 1024), (512, 16, 2, None))
SHAPES = ((16, 128), (8, 1024), (64, 1024), (4, 4096), (1, 8192))
QUICK_SHAPES = ((16, 128), (8, 1024))
COLUMNS = ["hd", "batch x len", "window", "stock blocks", "plugin blocks", "stock us", "plugin us", "speedup",
           "plugin TFLOP/s", "max|d|"]


def parse_shape(tok: str):
    m = re.fullmatch(r"(\d+)[x*](\d+)", tok.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def cases(shapes=None, quick=False):
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    return [{"head_dim": hd, "batch": b, "seq_len": L, "window": w, "q_heads": qh, "kv_heads": kvh}
            for hd, qh, kvh, w in LAYERS for b, L in shapes]


def module():
    import importlib

    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "extend_attention_fwd"):
            return mod
    raise ImportError("no sglang extend_attention module among " + ", ".join(MODULES))


def make_inputs(batch, seq_len, q_heads, kv_heads, head_dim, device="cuda"):
    """Fresh random q/k/v for `batch` requests of `seq_len` new tokens, and sglang's index tensors."""
    import torch

    n = batch * seq_len
    dt = torch.bfloat16
    q = torch.randn(n, q_heads, head_dim, device=device, dtype=dt)
    k = torch.randn(n, kv_heads, head_dim, device=device, dtype=dt)
    v = torch.randn(n, kv_heads, head_dim, device=device, dtype=dt)
    # The KV pool: the backend writes k/v there before attention; with no prefix the kernel never
    # reads it, but sglang passes it (and its strides), so we do too.
    k_buf, v_buf = k.clone(), v.clone()
    qo_indptr = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seq_len
    kv_indptr = torch.zeros(batch + 1, device=device, dtype=torch.int32)
    kv_indices = torch.empty(0, device=device, dtype=torch.int64)
    return q, k, v, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices


def call(mod, inputs, o, max_len, window, sm_scale):
    q, k, v, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices = inputs
    mod.extend_attention_fwd(
        q, k, v, o, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices,
        None,  # custom_mask
        True,  # is_causal
        None,  # mask_indptr
        max_len,
        1.0, 1.0,  # k_scale, v_scale (bf16 KV cache)
        sm_scale,
        logit_cap=0.0,
        sliding_window_size=(window - 1) if window else -1,
    )


def run_case(ctx, case):
    import torch

    sbs = ctx.sbs
    if "extend_blocks" not in sbs.targets:
        raise RuntimeError("this sglang has no _get_block_sizes_for_extend_attention")
    mod = module()
    hd, B, L, w = case["head_dim"], case["batch"], case["seq_len"], case["window"]
    qh, kvh = case["q_heads"], case["kv_heads"]
    # 1/sqrt(d) keeps softmax mixing many keys, so the stock-vs-plugin comparison means something
    # (Gemma4 itself uses scale 1 on RMS-normalised q/k; the kernel's work does not depend on it).
    sm_scale = hd ** -0.5
    inputs = make_inputs(B, L, qh, kvh, hd)
    o_stock = torch.full_like(inputs[0], float("nan"))  # poisoned: every element must be written
    o_plugin = torch.full_like(inputs[0], float("nan"))

    def blocks(which):
        with sbs.use("extend_blocks", which):
            return tuple(mod._get_block_sizes_for_extend_attention(hd, hd)[3:5])

    with sbs.use("extend_blocks", "stock"):
        call(mod, inputs, o_stock, L, w, sm_scale)
    with sbs.use("extend_blocks", "plugin"):
        call(mod, inputs, o_plugin, L, w, sm_scale)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(o_stock).all() and torch.isfinite(o_plugin).all())
    max_abs_diff = float((o_stock.float() - o_plugin.float()).abs().max())
    bit_exact = bool(torch.equal(o_stock, o_plugin))

    est = ctx.estimate(lambda i: call(mod, inputs, o_stock, L, w, sm_scale))
    calls = ctx.calls_for(est)
    timings = ctx.time({
        "stock": (lambda i: call(mod, inputs, o_stock, L, w, sm_scale), lambda: sbs.use("extend_blocks", "stock")),
        "plugin": (lambda i: call(mod, inputs, o_plugin, L, w, sm_scale), lambda: sbs.use("extend_blocks", "plugin")),
    }, calls=calls)
    flops = extend_attention_flops(B, L, qh, hd, w)
    t_s, t_p = timings["stock"].median_us, timings["plugin"].median_us
    rec = record(
        SUITE, dict(case, sliding_window_size=(w - 1) if w else -1, sm_scale=sm_scale, dtype="bfloat16", prefix=0),
        f"sglang stock blocks {blocks('stock')}", f"plugin blocks {blocks('plugin')}", timings["stock"],
        timings["plugin"],
        flops=flops, pairs_per_head=B * attention_pairs(L, w),
        flop_count="4 * q_heads * head_dim * attended (q,k) pairs (causal, window-aware)",
        candidate_tflops=flops / (t_p * 1e-6) / 1e12, baseline_tflops=flops / (t_s * 1e-6) / 1e12,
        max_abs_diff=max_abs_diff, bit_exact=bit_exact, outputs_finite=finite,
        baseline_blocks=list(blocks("stock")), candidate_blocks=list(blocks("plugin")),
        plugin_status=sbs.status("extend_blocks"),
    )
    if ctx.mm_tflops:
        rec["matmul_roof_tflops"] = ctx.mm_tflops
    return rec


def table_row(r):
    c = r["case"]
    return [str(c["head_dim"]), f"{c['batch']}x{c['seq_len']}", str(c["window"] or "full"),
            str(tuple(r["baseline_blocks"])), str(tuple(r["candidate_blocks"])), r["baseline_us"],
            r["candidate_us"], f"{r['speedup']:.2f}x", r["candidate_tflops"], r["max_abs_diff"]]


def size_label(c):
    return f"{c['batch']}x{c['seq_len']}", f"hd{c['head_dim']}" + (f" w{c['window']}" if c["window"] else "")
