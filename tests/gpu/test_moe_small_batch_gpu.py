"""The plugin's small-batch fused MoE on the GPU, bf16: every launch shape this GPU's table ships, at every
batch size the table covers, against a float32 reference and no worse than sglang's own kernel sequence
on the same inputs; both forms of kernel 1; inplace mode; CUDA-graph capture and replay; and that
sglang's own `fused_experts`, as Gemma4's FusedMoE calls it, reaches the plugin's kernels exactly at the
table's batch sizes.

Tolerance: max abs error <= 1.25x sglang's own max abs error (+2e-3) and relative Frobenius error <= 1e-2,
both against float32 on the same bf16 inputs (both paths round at the same points: the up projection, the
activation, each expert's weighted down projection, the sum).
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from _moe_reference import moe_reference  # noqa: E402  (tests/gpu/_moe_reference.py)

pytestmark = pytest.mark.gpu

E, K, TOPK = 128, 2816, 8
REL_TOL = 1e-2


def _table_rows():
    from sglang_gemma4_opt.kernels import moe_small_batch as km

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    rows = []
    for key, (max_m, by_m) in km.load_table().get(gpu, {}).items():
        N = int(key.split("-")[1][1:])
        rows += [(N, M) for M in range(1, max_m + 1)]
    return rows


ROWS = _table_rows()


@pytest.fixture(autouse=True, scope="module")
def _server_args():
    """sglang's fused MoE reads its global server args (outside a server: the defaults)."""
    from sglang_gemma4_opt.bench.common import ensure_server_args

    ensure_server_args()


@pytest.fixture(scope="module")
def weights():
    cache = {}

    def get(N):
        if N not in cache:
            cache.clear()
            cache[N] = ((torch.randn(E, 2 * N, K, device="cuda") * K ** -0.5).to(torch.bfloat16),
                        (torch.randn(E, K, N, device="cuda") * N ** -0.5).to(torch.bfloat16))
        return cache[N]

    return get


def _routing(M):
    ids = torch.rand(M, E, device="cuda").topk(TOPK, dim=-1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(M, TOPK, device="cuda"), dim=-1)
    return w, ids


def _check(out, stock, ref):
    assert torch.isfinite(out).all()
    e_out = (out.float() - ref).abs().max().item()
    e_stock = (stock.float() - ref).abs().max().item()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL, (rel, e_out, e_stock)
    assert e_out <= 1.25 * e_stock + 2e-3, (e_out, e_stock)


def test_this_gpu_has_a_table():
    if torch.cuda.get_device_name() not in ("NVIDIA H200",):
        pytest.skip("only the H200's table is required")
    assert ROWS


@pytest.mark.parametrize("N, M", ROWS)
def test_table_entries_against_reference_and_sglang(weights, N, M):
    from sglang_gemma4_opt.kernels import moe_small_batch as km
    from sglang_gemma4_opt.patches.moe_small_batch import stock_impl

    w13, w2 = weights(N)
    params = km.params_for(km.load_table(), torch.cuda.get_device_name(), km.shape_key(E, N, K, TOPK, torch.bfloat16), M)
    assert params is not None
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w, ids = _routing(M)
    out = km.fused_moe_small_batch(x, w13, w2, w, ids, "gelu", params=params)
    stock = stock_impl()(x, w13, w2, w, ids, activation="gelu", inplace=False)
    _check(out, stock, moe_reference(x, w13, w2, w, ids))


@pytest.mark.parametrize("up_dot", [False, True])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_both_kernel_forms_odd_shapes(M, up_dot):
    """Shapes off every block multiple (N=88, K=200), filtered experts (-1), silu and gelu, scale."""
    from sglang_gemma4_opt.kernels import moe_small_batch as km

    e, n, k, topk = 9, 88, 200, 3
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(e, 2 * n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, k, n, device="cuda") * n ** -0.5).to(torch.bfloat16)
    ids = torch.rand(M, e, device="cuda").topk(topk, dim=-1).indices.to(torch.int32)
    ids[0, 1] = -1
    w = torch.softmax(torch.randn(M, topk, device="cuda"), -1)
    p = km.Params(16, 64, 4, 8, 32, 4, up_stages=3, up_dot=up_dot, down_stages=2)
    for act in ("gelu", "silu"):
        out = km.fused_moe_small_batch(x, w13, w2, w, ids, act, routed_scaling_factor=2.0, params=p)
        ref = km.reference(x, w13, w2, w, ids, act, 2.0)
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() < REL_TOL


def test_inplace_and_cuda_graph(weights):
    from sglang_gemma4_opt.kernels import moe_small_batch as km

    w13, w2 = weights(704)
    M = 2
    p = km.Params()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w, ids = _routing(M)
    expect = km.fused_moe_small_batch(x, w13, w2, w, ids, "gelu", params=p)
    y = x.clone()
    km.fused_moe_small_batch(y, w13, w2, w, ids, "gelu", out=y, params=p)
    assert torch.equal(y, expect)  # inplace: the same bits

    sx, sw, sids = x.clone(), w.clone(), ids.clone()
    km.fused_moe_small_batch(sx, w13, w2, sw, sids, "gelu", params=p)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = km.fused_moe_small_batch(sx, w13, w2, sw, sids, "gelu", params=p)
    x2 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w2r, ids2 = _routing(M)
    sx.copy_(x2), sw.copy_(w2r), sids.copy_(ids2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, km.fused_moe_small_batch(x2, w13, w2, w2r, ids2, "gelu", params=p))
    assert not torch.equal(out, expect)


def test_sglang_fused_experts_reaches_the_kernels_at_table_sizes(sbs, weights, monkeypatch):
    """sglang's fused_experts (as Gemma4's FusedMoE calls it) runs the plugin's kernels for M <= max_m and
    sglang's own above; and inplace mode still returns the right values through sglang's custom op."""
    from sglang_gemma4_opt.bench import fused_moe as bfm
    from sglang_gemma4_opt.kernels import moe_small_batch as km

    if not sbs.applied("moe_small_batch"):
        pytest.skip(f"moe_small_batch: {sbs.status('moe_small_batch')}")
    key = km.shape_key(E, 704, K, TOPK, torch.bfloat16)
    entry = km.load_table().get(torch.cuda.get_device_name(), {}).get(key)
    if entry is None:
        pytest.skip("no small-batch entry for Gemma4's shape on this GPU")
    max_m = entry[0]
    w13, w2 = weights(704)
    calls = []
    real = km.fused_moe_small_batch
    monkeypatch.setattr(km, "fused_moe_small_batch", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    fused_experts = bfm.fused_experts_fn()
    for M in (1, max_m, max_m + 1, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w, ids = _routing(M)
        out = fused_experts(x, w13, w2, bfm.topk_output(w, ids), bfm.runner_config())
        ref = moe_reference(x, w13, w2, w, ids)
        assert ((out.float() - ref).norm() / ref.norm()).item() < REL_TOL
    assert calls == [1, max_m]
