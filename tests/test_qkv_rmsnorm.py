"""The plugin's QKV RMSNorm kernel vs sglang's stock kernel, bit for bit, under the Triton interpreter.

The stock wrapper asserts CUDA tensors, so the stock *kernel* is launched directly here with the
arguments its wrapper passes (grid (M,), one program per token). Real-GPU bf16 exactness is in
tests/gpu.
"""

import importlib

import pytest
import torch

from sglang_gemma4_opt.kernels.qkv_rmsnorm import BY_HEAD_MAX_M, gemma_qkv_rmsnorm
from sglang_gemma4_opt.patches import qkv_rmsnorm as patch

pytestmark = pytest.mark.interpret

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MS = [1, 3, 256, 257, 300]
SMALL = (4, 2, 32)  # q heads, kv heads, head dim: keeps the interpreter fast at large M
GEMMA = (16, 8, 256)


def stock_module():
    try:
        return patch._find_module()
    except Exception as e:
        pytest.skip(f"this sglang has no stock gemma_qkv_rmsnorm kernel ({e})")


def launch_stock(q, k, v, qw, kw, hq, hkv, d, eps):
    mod = stock_module()
    kern = mod._gemma_qkv_rmsnorm_kernel
    has_kv = k is not None
    kwargs = dict(NUM_Q_HEADS=hq, NUM_KV_HEADS=hkv if has_kv else 0, HEAD_DIM=d, eps=eps, HAS_KV=has_kv,
                  BLOCK=1 << (d - 1).bit_length())
    if "BY_HEAD" in kern.arg_names:  # newer sglang: its loop launch is the stock shape
        kwargs["BY_HEAD"] = False
    M = q.shape[0]
    kern[(M,)](q, k if has_kv else q, v if has_kv else q, qw, kw if has_kv else qw,
               q.stride(0), k.stride(0) if has_kv else 0, v.stride(0) if has_kv else 0, **kwargs)


def make_qkv(M, hq, hkv, d, dtype, gen, pad=0):
    """q, k, v as strided views of one qkv buffer (as `qkv.split` gives), optionally with padding per row."""
    width = (hq + 2 * hkv) * d
    buf = (torch.randn(M, width + pad, generator=gen) * 3 + 0.5).to(dtype)
    qkv = buf[:, :width]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    qw = (torch.randn(d, generator=gen) * 0.5 + 1).to(dtype)
    kw = (torch.randn(d, generator=gen) * 0.5 + 1).to(dtype)
    return buf, q, k, v, qw, kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("by_head", [None, True, False])
def test_bit_exact_vs_stock(dtype, M, by_head):
    hq, hkv, d = SMALL
    gen = torch.Generator().manual_seed(1000 * M + DTYPES.index(dtype))
    buf, q, k, v, qw, kw = make_qkv(M, hq, hkv, d, dtype, gen, pad=8)
    before = buf.clone()
    ref_buf = buf.clone()
    rq, rk, rv = ref_buf[:, : buf.shape[1] - 8].split([hq * d, hkv * d, hkv * d], dim=-1)
    launch_stock(rq, rk, rv, qw, kw, hq, hkv, d, 1e-6)
    gemma_qkv_rmsnorm(q, k, v, qw, kw, hq, hkv, d, eps=1e-6, by_head=by_head)
    assert torch.equal(buf, ref_buf)
    # every row of q, k and v was rewritten; the padding between rows was not
    old = before[:, : buf.shape[1] - 8].split([hq * d, hkv * d, hkv * d], -1)
    for new_part, old_part in zip((q, k, v), old):
        assert not (new_part == old_part).all(dim=-1).any()
    assert torch.equal(buf[:, -8:], before[:, -8:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemma_shape_and_kv_shared(dtype):
    hq, hkv, d = GEMMA
    gen = torch.Generator().manual_seed(7)
    for has_kv in (True, False):
        buf, q, k, v, qw, kw = make_qkv(3, hq, hkv, d, dtype, gen)
        ref = buf.clone()
        rq, rk, rv = ref.split([hq * d, hkv * d, hkv * d], dim=-1)
        if has_kv:
            launch_stock(rq, rk, rv, qw, kw, hq, hkv, d, 1e-6)
            gemma_qkv_rmsnorm(q, k, v, qw, kw, hq, hkv, d, eps=1e-6)
        else:
            launch_stock(rq, None, None, qw, None, hq, hkv, d, 1e-6)
            gemma_qkv_rmsnorm(q, None, None, qw, None, hq, hkv, d, eps=1e-6)
            assert torch.equal(k, ref.split([hq * d, hkv * d, hkv * d], dim=-1)[1])  # K untouched
        assert torch.equal(buf, ref)


def test_matches_fp32_math():
    """Independent of sglang: per-head RMSNorm written in torch, fp32 inputs (tolerance: fp32 rounding)."""
    hq, hkv, d = 3, 1, 48  # head dim not a power of two: masked lanes
    gen = torch.Generator().manual_seed(3)
    buf, q, k, v, qw, kw = make_qkv(5, hq, hkv, d, torch.float32, gen)
    x = buf.clone().view(5, hq + 2 * hkv, d)
    w = torch.stack([qw] * hq + [kw] * hkv + [torch.ones(d)] * hkv)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    gemma_qkv_rmsnorm(q, k, v, qw, kw, hq, hkv, d, eps=1e-6)
    torch.testing.assert_close(buf.view(5, hq + 2 * hkv, d), want, rtol=2e-6, atol=2e-6)


def test_default_launch_shape_switches_at_256(monkeypatch):
    import sglang_gemma4_opt.kernels.qkv_rmsnorm as mod

    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *a, **k: None

    monkeypatch.setattr(mod, "gemma_qkv_rmsnorm_kernel", Spy())
    for M in (1, BY_HEAD_MAX_M, BY_HEAD_MAX_M + 1):
        q = torch.randn(M, 4 * 8)
        k, v = torch.randn(M, 2 * 8), torch.randn(M, 2 * 8)
        mod.gemma_qkv_rmsnorm(q, k, v, torch.ones(8), torch.ones(8), 4, 2, 8)
    assert grids == [(1, 8), (BY_HEAD_MAX_M, 8), (BY_HEAD_MAX_M + 1,)]


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(4, 64)
    k, v = torch.randn(4, 32), torch.randn(4, 32)
    w = torch.ones(16)
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        gemma_qkv_rmsnorm(torch.randn(64, 4).t(), k, v, w, w, 4, 2, 16)
    with pytest.raises(ValueError, match="q_weight has 8 values"):
        gemma_qkv_rmsnorm(q, k, v, torch.ones(8), w, 4, 2, 16)
    with pytest.raises(ValueError, match="k_weight"):
        gemma_qkv_rmsnorm(q, k, v, w, torch.ones(15), 4, 2, 16)
    with pytest.raises(ValueError, match="both k and v"):
        gemma_qkv_rmsnorm(q, k, None, w, w, 4, 2, 16)
    with pytest.raises(ValueError, match="unsupported dtype"):
        gemma_qkv_rmsnorm(q.double(), k.double(), v.double(), w, w, 4, 2, 16)
    with pytest.raises(ValueError, match="needs 128"):
        gemma_qkv_rmsnorm(q, k, v, w, w, 8, 2, 16)


def test_hook_falls_back_to_sglang_on_error():
    calls = []

    def original(*a, **k):
        calls.append(a)

    hook = patch.make_hook()
    q = torch.randn(2, 64)
    hook(original, q, None, None, torch.ones(8), None, 4, 2, 16)  # wrong weight size: ours refuses
    assert len(calls) == 1
