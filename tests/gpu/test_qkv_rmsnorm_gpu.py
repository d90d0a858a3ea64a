"""The plugin's Q/K/V RMSNorm is bit-identical to sglang's kernel (bf16, every M the benchmark uses,
both Gemma4 layer shapes, both launch shapes), also replayed from a captured CUDA graph."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

pytestmark = pytest.mark.gpu

MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SHAPES = ((16, 8, 256), (16, 2, 512))  # (q heads, kv heads, head dim): sliding, global layers
EPS = 1e-6


def _weights(hd, dtype=torch.bfloat16):
    return tuple((1.0 + 0.1 * torch.randn(hd, device="cuda")).to(dtype) for _ in range(2))


def _qkv(M, qh, kvh, hd, dtype=torch.bfloat16):
    return (3.0 * torch.randn(M, (qh + 2 * kvh) * hd, device="cuda")).to(dtype)


def _run(fn, buf, qh, kvh, hd, qw, kw, kv=True, **kw_args):
    q, k, v = buf.split([qh * hd, kvh * hd, kvh * hd], dim=-1)
    if kv:
        fn(q, k, v, qw, kw, qh, kvh, hd, EPS, **kw_args)
    else:
        fn(q, None, None, qw, None, qh, kvh, hd, EPS, **kw_args)


def test_patch_applied_and_rebound(sbs):
    assert sbs.applied("qkv_norm"), sbs.status("qkv_norm")
    import sglang.srt.models.gemma4_causal as model

    # The model module imported the function by name: it must now call the plugin's.
    assert model.gemma_qkv_rmsnorm is sbs.plugin["qkv_norm"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", MS)
def test_bit_exact_vs_stock(sbs, M, shape):
    qh, kvh, hd = shape
    qw, kw = _weights(hd)
    x = _qkv(M, qh, kvh, hd)
    a, b = x.clone(), x.clone()
    _run(sbs.stock["qkv_norm"], a, qh, kvh, hd, qw, kw)
    _run(sbs.plugin["qkv_norm"], b, qh, kvh, hd, qw, kw)
    torch.cuda.synchronize()
    assert not torch.equal(a, x), "stock kernel did not write"
    assert torch.equal(a, b), f"max |d| {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize("by_head", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", MS)
def test_both_launch_shapes_bit_exact(sbs, M, shape, by_head):
    """Both grids of the plugin's kernel, forced, at every M (the patch picks one by M)."""
    from sglang_gemma4_opt.kernels.qkv_rmsnorm import gemma_qkv_rmsnorm

    qh, kvh, hd = shape
    qw, kw = _weights(hd)
    x = _qkv(M, qh, kvh, hd)
    a, b = x.clone(), x.clone()
    _run(sbs.stock["qkv_norm"], a, qh, kvh, hd, qw, kw)
    _run(gemma_qkv_rmsnorm, b, qh, kvh, hd, qw, kw, by_head=by_head)
    torch.cuda.synchronize()
    assert torch.equal(a, b)


@pytest.mark.parametrize("M", (1, 16, 300))
def test_kv_shared_layer_bit_exact(sbs, M):
    qh, kvh, hd = 16, 8, 256
    qw, kw = _weights(hd)
    x = _qkv(M, qh, kvh, hd)
    a, b = x.clone(), x.clone()
    _run(sbs.stock["qkv_norm"], a, qh, kvh, hd, qw, kw, kv=False)
    _run(sbs.plugin["qkv_norm"], b, qh, kvh, hd, qw, kw, kv=False)
    torch.cuda.synchronize()
    assert torch.equal(a, b)
    assert torch.equal(a[:, qh * hd:], x[:, qh * hd:]), "K/V must be left alone on a KV-shared layer"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M", (1, 64, 1024))
def test_other_dtypes_bit_exact(sbs, M, dtype):
    qh, kvh, hd = 16, 8, 256
    qw, kw = _weights(hd, dtype)
    x = _qkv(M, qh, kvh, hd, dtype)
    a, b = x.clone(), x.clone()
    _run(sbs.stock["qkv_norm"], a, qh, kvh, hd, qw, kw)
    _run(sbs.plugin["qkv_norm"], b, qh, kvh, hd, qw, kw)
    torch.cuda.synchronize()
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", MS)
def test_bit_exact_in_cuda_graph(sbs, M, shape):
    """Captured once, replayed on fresh data copied into the static buffers (as sglang's decode
    graphs do): plugin replay == stock replay == eager plugin, bit for bit."""
    qh, kvh, hd = shape
    qw, kw = _weights(hd)
    buf_s, buf_p = _qkv(M, qh, kvh, hd), _qkv(M, qh, kvh, hd)
    graphs = []
    for fn, buf in ((sbs.stock["qkv_norm"], buf_s), (sbs.plugin["qkv_norm"], buf_p)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _run(fn, buf.clone(), qh, kvh, hd, qw, kw)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            _run(fn, buf, qh, kvh, hd, qw, kw)
        graphs.append(g)
    for _ in range(3):
        x = _qkv(M, qh, kvh, hd)
        buf_s.copy_(x)
        buf_p.copy_(x)
        graphs[0].replay()
        graphs[1].replay()
        eager = x.clone()
        _run(sbs.plugin["qkv_norm"], eager, qh, kvh, hd, qw, kw)
        torch.cuda.synchronize()
        assert not torch.equal(buf_s, x)
        assert torch.equal(buf_s, buf_p)
        assert torch.equal(buf_p, eager)
