"""Suite extend_attention: sglang's Triton prefill (extend) attention with sglang's block sizes
(baseline) and with PR #26588's (64, 64) blocks (`pr_*` fields), against the plugin's path (candidate):
the `extend_attention_kernel` patch's hook around sglang's `extend_attention_fwd`, which runs the
plugin's Hopper kernel for the calls it supports (`candidate` names the kernel and its config) and
sglang's kernel otherwise. Errors of all three against a float32 reference are recorded.

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
COLUMNS = ["hd", "batch x len", "window", "stock us", "PR us", "plugin us", "vs stock", "vs PR",
           "plugin TFLOP/s", "rel err plugin/stock"]


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


def call(mod, inputs, o, max_len, window, sm_scale, fn=None):
    q, k, v, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices = inputs
    (fn or mod.extend_attention_fwd)(
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


def plugin_path(mod):
    """(sglang's own extend_attention_fwd, the plugin's path around it, a label for that path's route).

    Built from the patch module directly, so the candidate is measured whether or not the patch is in
    the plugin's table yet; sglang's function is the hooked one's `__wrapped__` when it is applied.
    """
    from ..kernels import extend_attention as ka
    from ..patches import extend_attention_kernel as pk

    fwd = mod.extend_attention_fwd
    stock = getattr(fwd, "__wrapped__", fwd)
    names, extra = pk.signature_info(stock)
    hook = pk.make_hook(names, extra)

    def plugin(*args, **kwargs):
        return hook(stock, *args, **kwargs)

    def label(inputs, o, max_len, window, sm_scale):
        q, k, v, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices = inputs
        args = (q, k, v, o, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, None, True, None, max_len, 1.0, 1.0,
                sm_scale, 0.0, True, (window - 1) if window else -1)
        why = pk.route(dict(zip(names, args)), extra)
        if why is not None:
            return f"sglang kernel ({why})", None
        cfg = ka.launch_for(q, k, v, kv_indices)
        if isinstance(cfg, ka.SharedSoftmax):
            return (f"plugin hopper Gluon shared-softmax kernel (head dim 512, BLOCK_M 64, BLOCK_N {cfg.block_n})",
                    ["shared_softmax", cfg.block_n])
        return f"plugin hopper kernel (BLOCK_M, BLOCK_N, warps, stages, tma, dv_split) = {cfg}", list(cfg)

    return stock, plugin, label


def rel_err(out, ref):
    return float((out.float() - ref).norm() / ref.norm())


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
    o_pr = torch.full_like(inputs[0], float("nan"))
    o_plugin = torch.full_like(inputs[0], float("nan"))
    stock_fwd, plugin_fwd, route_label = plugin_path(mod)

    def blocks(which):
        with sbs.use("extend_blocks", which):
            return tuple(mod._get_block_sizes_for_extend_attention(hd, hd)[3:5])

    with sbs.use("extend_blocks", "stock"):
        call(mod, inputs, o_stock, L, w, sm_scale, stock_fwd)
    with sbs.use("extend_blocks", "plugin"):
        call(mod, inputs, o_pr, L, w, sm_scale, stock_fwd)
    with sbs.use("extend_blocks", "plugin"):
        call(mod, inputs, o_plugin, L, w, sm_scale, plugin_fwd)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(o_stock).all() and torch.isfinite(o_pr).all() and torch.isfinite(o_plugin).all())
    # PR blocks vs stock blocks: the blocks patch's bit-exactness claim
    max_abs_diff = float((o_stock.float() - o_pr.float()).abs().max())
    bit_exact = bool(torch.equal(o_stock, o_pr))
    from ..kernels.extend_attention import reference

    ref = reference(*inputs, sm_scale, (w - 1) if w else -1)
    errs = dict(baseline_rel_err=rel_err(o_stock, ref), pr_rel_err=rel_err(o_pr, ref),
                candidate_rel_err=rel_err(o_plugin, ref),
                baseline_max_abs_err=float((o_stock.float() - ref).abs().max()),
                candidate_max_abs_err=float((o_plugin.float() - ref).abs().max()),
                candidate_max_abs_diff_vs_stock=float((o_plugin.float() - o_stock.float()).abs().max()))
    del ref
    candidate_label, candidate_config = route_label(inputs, o_plugin, L, w, sm_scale)

    est = ctx.estimate(lambda i: call(mod, inputs, o_stock, L, w, sm_scale, stock_fwd))
    calls = ctx.calls_for(est)
    timings = ctx.time({
        "stock": (lambda i: call(mod, inputs, o_stock, L, w, sm_scale, stock_fwd),
                  lambda: sbs.use("extend_blocks", "stock")),
        "pr": (lambda i: call(mod, inputs, o_pr, L, w, sm_scale, stock_fwd), lambda: sbs.use("extend_blocks", "plugin")),
        "plugin": (lambda i: call(mod, inputs, o_plugin, L, w, sm_scale, plugin_fwd),
                   lambda: sbs.use("extend_blocks", "plugin")),
    }, calls=calls)
    flops = extend_attention_flops(B, L, qh, hd, w)
    t_s, t_r, t_p = timings["stock"].median_us, timings["pr"].median_us, timings["plugin"].median_us
    rec = record(
        SUITE, dict(case, sliding_window_size=(w - 1) if w else -1, sm_scale=sm_scale, dtype="bfloat16", prefix=0),
        f"sglang stock blocks {blocks('stock')}", candidate_label, timings["stock"], timings["plugin"],
        flops=flops, pairs_per_head=B * attention_pairs(L, w),
        flop_count="4 * q_heads * head_dim * attended (q,k) pairs (causal, window-aware)",
        candidate_tflops=flops / (t_p * 1e-6) / 1e12, baseline_tflops=flops / (t_s * 1e-6) / 1e12,
        pr_us=t_r, pr_tflops=flops / (t_r * 1e-6) / 1e12, candidate_vs_pr=t_r / t_p,
        pr_round_medians_us=timings["pr"].round_medians_us, pr_blocks=list(blocks("plugin")),
        max_abs_diff=max_abs_diff, bit_exact=bit_exact, outputs_finite=finite, **errs,
        baseline_blocks=list(blocks("stock")), candidate_blocks=list(blocks("plugin")),
        candidate_config=candidate_config,
        plugin_status=sbs.status("extend_blocks"),
    )
    if ctx.mm_tflops:
        rec["matmul_roof_tflops"] = ctx.mm_tflops
    return rec


def table_row(r):
    c = r["case"]
    return [str(c["head_dim"]), f"{c['batch']}x{c['seq_len']}", str(c["window"] or "full"), r["baseline_us"],
            r.get("pr_us"), r["candidate_us"], f"{r['speedup']:.2f}x", f"{r.get('candidate_vs_pr', float('nan')):.2f}x",
            r["candidate_tflops"], f"{r.get('candidate_rel_err', float('nan')):.2e}/{r.get('baseline_rel_err', float('nan')):.2e}"]


def size_label(c):
    return f"{c['batch']}x{c['seq_len']}", f"hd{c['head_dim']}" + (f" w{c['window']}" if c["window"] else "")
