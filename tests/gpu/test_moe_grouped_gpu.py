"""The expert-grouped fused MoE (`kernels/moe_grouped.py`, prefill sizes, not yet used by any patch) on the
GPU, bf16, Gemma4's shapes (E=128, K=2816, top-8, N=704 and 352), with sglang's own moe_align_block_size
(the kernel's default on CUDA):
against a float32 reference and no worse than sglang's kernel sequence on the same inputs; both ways of
loading the token rows; filtered experts; CUDA-graph capture and replay.

Tolerance as the small-batch path's: max abs error <= 1.25x sglang's (+2e-3), relative Frobenius < 1e-2.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from _moe_reference import moe_reference  # noqa: E402

pytestmark = pytest.mark.gpu

E, K, TOPK = 128, 2816, 8


@pytest.fixture(autouse=True, scope="module")
def _server_args():
    from sglang_gemma4_opt.bench.common import ensure_server_args

    ensure_server_args()


def _inputs(M, N, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w13 = (torch.randn(E, 2 * N, K, device="cuda", generator=g) * K ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, K, N, device="cuda", generator=g) * N ** -0.5).to(torch.bfloat16)
    ids = torch.rand(M, E, device="cuda", generator=g).topk(TOPK, dim=-1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(M, TOPK, device="cuda", generator=g), dim=-1)
    return x, w13, w2, w, ids


@pytest.mark.parametrize("a_tma", [False, True])
@pytest.mark.parametrize("M, N", [(333, 704), (2048, 704), (777, 352)])
def test_against_reference_and_sglang(M, N, a_tma):
    from sglang_gemma4_opt.kernels import moe_grouped as mg
    from sglang_gemma4_opt.patches.moe_small_batch import stock_impl

    x, w13, w2, w, ids = _inputs(M, N, seed=M + N)
    ids[3, 2] = -1  # filtered expert
    p = mg.GroupedParams(a_tma=a_tma)
    out = mg.fused_moe_grouped(x, w13, w2, w, ids, "gelu", params=p)
    stock = stock_impl()(x, w13, w2, w, ids, activation="gelu", inplace=False)
    keep = ids >= 0
    ref = moe_reference(x, w13, w2, w * keep, ids.clamp(min=0))
    assert torch.isfinite(out).all()
    e_out = (out.float() - ref).abs().max().item()
    e_stock = (stock.float() - ref).abs().max().item()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, (rel, e_out, e_stock)
    assert e_out <= 1.25 * e_stock + 2e-3, (e_out, e_stock)


def test_cuda_graph_replay_follows_new_routing():
    from sglang_gemma4_opt.kernels import moe_grouped as mg

    M, N = 512, 704
    x, w13, w2, w, ids = _inputs(M, N, seed=1)
    p = mg.GroupedParams()
    mg.fused_moe_grouped(x, w13, w2, w, ids, "gelu", params=p)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = mg.fused_moe_grouped(x, w13, w2, w, ids, "gelu", params=p)
    x2, _, _, w2r, ids2 = _inputs(M, N, seed=2)
    x.copy_(x2), w.copy_(w2r), ids.copy_(ids2)
    g.replay()
    torch.cuda.synchronize()
    expect = mg.fused_moe_grouped(x2, w13, w2, w2r, ids2, "gelu", params=p)
    assert torch.equal(out, expect)
