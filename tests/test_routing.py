"""Routing stays bit-exact: the path the model runs equals a reference written here, op for op.

The reference is sglang 0.5.12's `Gemma4Router.forward` (CPU path: Gemma4RMSNorm.forward_native
without weight; x the bf16 product scale * hidden**-0.5; F.linear) and its `Gemma4MoE` routing
function (torch.topk; softmax over the top-k; x per_expert_scale[ids]; f32 weights, i32 ids).
On 0.5.11/0.5.12 the model's path is stock (the plugin must not touch it); on >= 0.5.13 it is the
plugin's restoration.
"""

import types

import pytest
import torch
import torch.nn.functional as F

import sglang_gemma4_opt
from _subproc import is_hooked
from sglang_gemma4_opt.kernels import routing as ours

HIDDEN, EXPERTS, TOPK = 64, 16, 8


def ref_router(x, scale, proj_w, eps=1e-6):
    root = torch.tensor(HIDDEN**-0.5, dtype=scale.dtype)
    xf = x.float()
    normed = (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)
    s = (scale * root).to(scale.dtype)
    return F.linear(normed * s.to(normed.dtype), proj_w)


def ref_routing(logits, per_expert_scale, k=TOPK):
    vals, ids = torch.topk(logits, k=k, dim=-1)
    w = torch.softmax(vals, dim=-1)
    w = w * per_expert_scale[ids].to(w.dtype)
    return w.to(torch.float32), ids.to(torch.int32)


def tied_logits(T, gen, dtype=torch.bfloat16):
    """Random logits where many tokens have exact and near ties around the top-8 boundary."""
    x = torch.randn(T, EXPERTS, generator=gen)
    x[::2, 5:11] = x[::2, 5:6]  # exact ties straddling rank 8
    x[1::4, :] = torch.round(x[1::4, :] * 4) / 4  # coarse grid: many equal values
    x[3::4, 2] = x[3::4, 3] + 1e-3  # near-ties that bf16 rounds together or apart
    return x.to(dtype)


def assert_same_routing(got, want):
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int32
    assert torch.equal(got[1], want[1]), "expert ids differ"
    assert torch.equal(got[0], want[0]), "weights differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_plugin_reference_equals_test_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    for T in (1, 7, 257):
        logits = tied_logits(T, gen, dtype)
        pes = (torch.rand(EXPERTS, generator=gen) + 0.5).to(dtype)
        assert_same_routing(ours.unfused_routing(logits, pes, TOPK), ref_routing(logits, pes))


def test_reference_would_catch_a_fused_style_difference():
    """Sanity: a routing that differs only in where it rounds is caught by these checks."""
    gen = torch.Generator().manual_seed(5)
    logits = tied_logits(64, gen)
    pes = (torch.rand(EXPERTS, generator=gen) + 0.5).to(torch.bfloat16)
    vals, ids = torch.topk(logits, TOPK, dim=-1)
    fused_like = (torch.softmax(vals.float(), -1) * pes[ids].float(), ids.to(torch.int32))
    with pytest.raises(AssertionError):
        assert_same_routing(fused_like, ref_routing(logits, pes))


def _model():
    try:
        import sglang.srt.models.gemma4_causal as g
    except ImportError as e:
        pytest.skip(f"no gemma4 model: {e}")
    return g


def _router(g):
    cfg = types.SimpleNamespace(hidden_size=HIDDEN, rms_norm_eps=1e-6, num_experts=EXPERTS)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as sglang builds the model: root_size becomes bf16
    try:
        r = g.Gemma4Router(cfg, prefix="router")
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        r.scale.copy_(torch.rand(HIDDEN) * 2 + 0.1)
        r.proj.weight.copy_(torch.randn(EXPERTS, HIDDEN) * 0.2)
    return r


def test_router_forward_bit_exact(sglang_version):
    sglang_gemma4_opt.apply()
    g = _model()
    if sglang_version < (0, 5, 13):  # stock path: the plugin leaves it alone
        assert not is_hooked(g.Gemma4Router.forward)
        assert not is_hooked(g.Gemma4Router.fuse_scale)
    else:
        assert is_hooked(g.Gemma4Router.forward) and is_hooked(g.Gemma4Router.fuse_scale)
    r = _router(g)
    gen = torch.Generator().manual_seed(1)
    for T in (1, 5, 300):
        x = (torch.randn(T, HIDDEN, generator=gen) * 3).to(torch.bfloat16)
        with torch.no_grad():
            got = r(x)
        assert torch.equal(got, ref_router(x, r.scale.data, r.proj.weight.data)), T
    # the router norm keeps a weight of ones (the scale is not folded into it)
    assert torch.equal(r.norm.weight, torch.ones_like(r.norm.weight))


def test_model_routing_bit_exact_with_ties(sglang_version):
    sglang_gemma4_opt.apply()
    g = _model()
    gen = torch.Generator().manual_seed(2)
    pes = (torch.rand(EXPERTS, generator=gen) + 0.5).to(torch.bfloat16)
    fns = []
    if hasattr(g, "gemma4_fused_routing"):  # >= 0.5.13: the names the routing closure calls
        fns.append(lambda lg: g.gemma4_fused_routing(lg, pes, TOPK))
        fns.append(lambda lg: g.gemma_routing_post_topk(*torch.topk(lg, TOPK, dim=-1), pes))
    fns.append(lambda lg: _closure(g, pes)(None, lg, TOPK, True))
    for fn in fns:
        for T in (1, 8, 129):
            logits = tied_logits(T, gen)
            assert_same_routing(fn(logits), ref_routing(logits, pes))


def _closure(g, pes):
    """The routing function Gemma4MoE builds in __init__, built with the experts stubbed out."""
    import inspect

    src = inspect.getsource(g.Gemma4MoE.__init__)
    assert "custom_routing_function=routing_function" in src
    captured = {}

    class FakeTopK:
        def __init__(self, *a, custom_routing_function=None, **k):
            captured["fn"] = custom_routing_function

        def bind_runner_backend(self, *a, **k):
            pass

    class FakeExperts(torch.nn.Module):
        runner_backend = None

        def __init__(self, *a, **k):
            super().__init__()

    moe = g.Gemma4MoE.__new__(g.Gemma4MoE)
    torch.nn.Module.__init__(moe)
    fake_args = types.SimpleNamespace(ep_num_redundant_experts=0)
    patches = {"TopK": FakeTopK, "get_moe_impl_class": lambda *a, **k: FakeExperts}
    for name in ("get_global_server_args", "get_server_args"):
        if hasattr(g, name):
            patches[name] = lambda: fake_args
    if hasattr(g, "get_exec"):
        patches["get_exec"] = lambda: types.SimpleNamespace(moe=fake_args)
    if hasattr(g, "get_tensor_model_parallel_world_size"):
        patches["get_tensor_model_parallel_world_size"] = lambda: 1
    saved = {k: getattr(g, k) for k in patches}
    try:
        for k, v in patches.items():
            setattr(g, k, v)
        cfg = types.SimpleNamespace(num_experts=EXPERTS, top_k_experts=TOPK, hidden_size=HIDDEN,
                                    moe_intermediate_size=32)
        g.Gemma4MoE.__init__(moe, HIDDEN, 0, cfg)
    finally:
        for k, v in saved.items():
            setattr(g, k, v)
    with torch.no_grad():
        moe.per_expert_scale.copy_(pes.float())
    moe.per_expert_scale.data = moe.per_expert_scale.data.to(pes.dtype)
    return captured["fn"]
