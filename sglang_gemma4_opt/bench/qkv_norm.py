"""Suite qkv_norm: Gemma4's fused Q/K/V RMSNorm, sglang's kernel vs the plugin's, per token count M.

Inputs are what Gemma4Attention passes: q, k, v as strided views of one (M, (qh + 2*kvh) * hd) bf16
buffer from `qkv.split`. Every row checks bit-exactness on fresh random inputs (torch.equal) and
times both from CUDA-graph replay.
"""

from __future__ import annotations

from .common import record
from .flops import qkv_norm_bytes

SUITE = "qkv_norm"
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_SIZES = (1, 16, 256, 1024)
# (q_heads, kv_heads, head_dim): Gemma4 26B-A4B sliding layers, then global (full-attention) layers.
SHAPES = ((16, 8, 256), (16, 2, 512))
EPS = 1e-6  # rms_norm_eps of Gemma4
COLUMNS = ["M", "heads q/kv/hd", "stock us", "plugin us", "speedup", "plugin TB/s", "bit-exact"]


def cases(sizes=None, quick=False):
    ms = sizes or (QUICK_SIZES if quick else SIZES)
    return [{"M": int(m), "q_heads": qh, "kv_heads": kvh, "head_dim": hd} for qh, kvh, hd in SHAPES for m in ms]


def _split(buf, qh, kvh, hd):
    return buf.split([qh * hd, kvh * hd, kvh * hd], dim=-1)


def run_case(ctx, case):
    import torch

    sbs = ctx.sbs
    if "qkv_norm" not in sbs.targets:
        raise RuntimeError("this sglang has no gemma_qkv_rmsnorm")
    stock, plugin = sbs.stock["qkv_norm"], sbs.plugin["qkv_norm"]
    M, qh, kvh, hd = case["M"], case["q_heads"], case["kv_heads"], case["head_dim"]
    width = (qh + 2 * kvh) * hd
    dev, dt = "cuda", torch.bfloat16
    # Weights near 1 like trained norm weights (Gemma4 keeps scale_shift 0: x * rrms * w).
    qw = (1.0 + 0.1 * torch.randn(hd, device=dev)).to(dt)
    kw = (1.0 + 0.1 * torch.randn(hd, device=dev)).to(dt)

    def call(fn, buf):
        q, k, v = _split(buf, qh, kvh, hd)
        fn(q, k, v, qw, kw, qh, kvh, hd, EPS)

    # Bit-exactness on fresh random data, same input for both.
    x = (3.0 * torch.randn(M, width, device=dev)).to(dt)
    a, b = x.clone(), x.clone()
    call(stock, a)
    call(plugin, b)
    torch.cuda.synchronize()
    bit_exact = bool(torch.equal(a, b))
    written = bool(not torch.equal(a, x))  # the stock kernel changed the data: the check compared something
    max_abs_diff = float((a.float() - b.float()).abs().max())

    # Timing: rotate over enough buffers that they do not all sit in L2 (as each layer's fresh qkv
    # would not), capped at one buffer per captured call.
    calls = ctx.max_calls
    per_buf = M * width * 2
    n_buf = int(max(1, min(calls, -(-2 * ctx.l2_bytes // per_buf))))
    bufs = [(3.0 * torch.randn(M, width, device=dev)).to(dt) for _ in range(n_buf)]
    timings = ctx.time({
        "stock": (lambda i: call(stock, bufs[i % n_buf]), None),
        "plugin": (lambda i: call(plugin, bufs[i % n_buf]), None),
    }, calls=calls)
    nbytes = qkv_norm_bytes(M, qh, kvh, hd)
    from ..kernels.qkv_rmsnorm import BY_HEAD_MAX_M

    applied = sbs.applied("qkv_norm")
    return record(
        SUITE, dict(case, dtype="bfloat16"), "sglang stock gemma_qkv_rmsnorm (grid (M,))",
        "plugin gemma_qkv_rmsnorm" + (f" ({'by head' if M <= BY_HEAD_MAX_M else 'per token'})" if applied else
                                      f" (NOT APPLIED: {sbs.status('qkv_norm')})"),
        timings["stock"], timings["plugin"],
        bit_exact=bit_exact, max_abs_diff=max_abs_diff, check_inputs_changed=written,
        bytes=nbytes, candidate_tbps=nbytes / (timings["plugin"].median_us * 1e-6) / 1e12,
        baseline_tbps=nbytes / (timings["stock"].median_us * 1e-6) / 1e12,
        rotating_buffers=n_buf, plugin_status=sbs.status("qkv_norm"),
    )


def table_row(r):
    c = r["case"]
    return [str(c["M"]), f"{c['q_heads']}/{c['kv_heads']}/{c['head_dim']}", r["baseline_us"], r["candidate_us"],
            f"{r['speedup']:.2f}x", r["candidate_tbps"], r["bit_exact"]]


def size_label(c):
    return str(c["M"]), f"{c['q_heads']}/{c['kv_heads']}/{c['head_dim']}"
