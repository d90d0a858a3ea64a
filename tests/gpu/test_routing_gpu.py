"""Gemma4 routing with the plugin is bit-exact (ids and weights) with the unfused reference on GPU
bf16, tied logits included.

On sglang 0.5.12 the routing is stock sglang's (the patch is not applicable): its closure inside
`Gemma4MoE.__init__` is rebuilt from its code object and compared too. On sglang >= 0.5.13 the
patched `gemma4_fused_routing` must match the reference.
"""

import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

pytestmark = pytest.mark.gpu

E, TOPK = 128, 8
MS = (1, 7, 64, 1024, 4096)


def reference(gating_output, per_expert_scale, topk):
    """Gemma4 routing written out: top-k of the logits, softmax over those k (in the logits' dtype),
    times the expert's scale; float32 weights, int32 ids."""
    vals, ids = torch.topk(gating_output, k=topk, dim=-1)
    w = torch.softmax(vals, dim=-1)
    w = w * per_expert_scale[ids].to(w.dtype)
    return w.to(torch.float32), ids.to(torch.int32)


def _logits(M, kind):
    if kind == "random":
        return (2.0 * torch.randn(M, E, device="cuda")).to(torch.bfloat16)
    if kind == "ties":  # few distinct values: many exact ties, several straddling the top-k boundary
        return torch.randint(-2, 3, (M, E), device="cuda").to(torch.bfloat16) * 0.5
    if kind == "all-equal":
        return torch.full((M, E), 0.25, device="cuda", dtype=torch.bfloat16)
    raise ValueError(kind)


def _scale():
    return (1.0 + 0.2 * torch.randn(E, device="cuda")).to(torch.bfloat16)


def _assert_same(a, b):
    (wa, ia), (wb, ib) = a, b
    assert ia.dtype == ib.dtype == torch.int32 and wa.dtype == wb.dtype == torch.float32
    assert torch.equal(ia, ib), "expert ids differ"
    assert torch.equal(wa, wb), f"weights differ, max |d| {(wa - wb).abs().max().item()}"


KINDS = ("random", "ties", "all-equal")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M", MS)
def test_unfused_routing_matches_reference(M, kind):
    from sglang_gemma4_opt.kernels.routing import unfused_routing

    g, s = _logits(M, kind), _scale()
    _assert_same(unfused_routing(g, s, TOPK), reference(g, s, TOPK))


def _stock_routing_closure():
    """sglang 0.5.12's routing function (a closure in Gemma4MoE.__init__), rebuilt without the module."""
    import sglang.srt.models.gemma4_causal as model

    cls = getattr(model, "Gemma4MoE", None)
    init = getattr(cls, "__init__", None)
    init = getattr(init, "__wrapped__", init)
    code = next((c for c in getattr(getattr(init, "__code__", None), "co_consts", ())
                 if isinstance(c, types.CodeType) and c.co_name == "routing_function"), None)
    if code is None or code.co_freevars != ("per_expert_scale",):
        return None

    def make(per_expert_scale):
        return types.FunctionType(code, model.__dict__, "routing_function", None, (types.CellType(per_expert_scale),))

    return make


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M", MS)
def test_stock_sglang_routing_matches_reference(M, kind):
    make = _stock_routing_closure()
    if make is None:
        pytest.skip("this sglang has no unfused routing closure in Gemma4MoE (fused routing: see next test)")
    g, s = _logits(M, kind), _scale()
    stock = make(s)(None, g, TOPK, True)
    _assert_same(stock, reference(g, s, TOPK))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M", MS)
def test_routing_with_plugin_matches_reference(sbs, M, kind):
    """What the model calls with the plugin loaded: the patched fused routing (sglang >= 0.5.13) or,
    where the patch stands aside, sglang's own unfused closure (0.5.12)."""
    import sglang.srt.models.gemma4_causal as model

    g, s = _logits(M, kind), _scale()
    fused = getattr(model, "gemma4_fused_routing", None)
    if fused is not None:
        r = sbs.results.get("unfused_routing")
        assert r is not None and r.status == "applied", r
        got = fused(g, s, TOPK)
    else:
        make = _stock_routing_closure()
        if make is None:
            pytest.skip("no routing function found in this sglang's Gemma4 model")
        got = make(s)(None, g, TOPK, True)
    _assert_same(got, reference(g, s, TOPK))


def test_ties_really_tie_at_the_boundary():
    """The tie inputs exercise what they claim: rows where the k-th and (k+1)-th logits are equal."""
    g = _logits(4096, "ties")
    top = torch.topk(g.float(), TOPK + 1, dim=-1).values
    assert (top[:, TOPK - 1] == top[:, TOPK]).float().mean().item() > 0.5
