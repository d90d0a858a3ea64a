"""Small-batch fused MoE (`moe_small_batch`): per-call routing (every unsupported case runs sglang's path),
the shipped per-GPU table, and the two kernels under TRITON_INTERPRET=1 on tiny shapes against a float32
reference and against sglang's rounding points written out in torch.

The interpreter runs fp32/fp16 here (triton 3.6's interpreter mishandles bf16 in tl.dot, which the
tensor-core form of kernel 1 uses); bf16 is checked on the GPU (tests/gpu/test_moe_small_batch_gpu.py).
"""

import inspect
import json

import pytest
import torch

from _moe_torch import moe_inputs, moe_torch
from sglang_gemma4_opt.kernels import moe_grouped as kg
from sglang_gemma4_opt.kernels import moe_small_batch as km
from sglang_gemma4_opt.patches import moe_small_batch as pm

GPU = "Fake GPU"


_moe = moe_inputs


def _table(M_max=4, key=None, params=km.Params()):
    key = key or km.shape_key(6, 40, 48, 4, torch.float16)
    return {GPU: {key: (M_max, {1: params, 2: params})}}


def _call(x, w1, w2, w, ids, **over):
    """Every argument of sglang 0.5.12's fused_experts_impl, for a call the plugin takes."""
    c = dict(hidden_states=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids, b1=None, b2=None, inplace=False,
             activation="gelu", is_gated=True, apply_router_weight_on_input=False, use_fp8_w8a8=False,
             use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
             w1_scale=None, w2_scale=None, w1_zp=None, w2_zp=None, a1_scale=None, a2_scale=None, block_shape=None,
             no_combine=False, routed_scaling_factor=None, gemm1_alpha=None, gemm1_limit=None, filter_expert=False,
             swiglu_limit=None)
    c.update(over)
    return c


def _signature(extra=()):
    """A stand-in for sglang's fused_experts_impl (0.5.12's parameters, plus `extra` newer ones)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=inspect.Parameter.empty if i < 5 else None)
              for i, n in enumerate(pm.BASE_PARAMS)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in extra]
    return inspect.Signature(params)


@pytest.fixture
def on_gpu(monkeypatch):
    """Routing sees the CPU tensors of these tests as living on GPU `GPU`."""
    monkeypatch.setattr(pm, "gpu_of", lambda t: GPU)
    monkeypatch.setattr(pm, "sglang_deterministic", lambda: False)


@pytest.fixture
def hooked(on_gpu, monkeypatch):
    """The patch's hook around a stand-in for sglang's function, and a record of where calls went."""
    went = []
    monkeypatch.setattr(km, "fused_moe_small_batch", lambda *a, **k: went.append(("kernel", k)) or "ours")

    def original(*args, **kwargs):
        went.append(("stock", None))
        return "theirs"

    hook = pm.make_hook(_signature([("defer_sum", False)]), {"defer_sum": False}, _table())
    return (lambda *a, **k: hook(original, *a, **k)), went


# ---------------------------------------------------------------------------------------------
# routing


def test_supported_call_goes_to_kernels(hooked):
    fn, went = hooked
    call = _call(*_moe())
    assert fn(**call) == "ours"
    assert fn(*[call[k] for k in pm.BASE_PARAMS]) == "ours"  # sglang's custom ops pass arguments positionally
    assert [w[0] for w in went] == ["kernel", "kernel"]
    kw = went[0][1]
    assert kw["out"] is None and kw["params"] == km.Params() and kw["routed_scaling_factor"] is None


def test_inplace_writes_into_hidden_states(hooked):
    fn, went = hooked
    call = _call(*_moe(), inplace=True)
    fn(**call)
    assert went[0][1]["out"] is call["hidden_states"]


@pytest.mark.parametrize("over, why", [
    ({"b1": torch.zeros(1)}, "b1"), ({"b2": torch.zeros(1)}, "b2"),
    ({"apply_router_weight_on_input": True}, "apply_router_weight_on_input"),
    ({"use_fp8_w8a8": True}, "use_fp8_w8a8"), ({"use_int8_w8a8": True}, "use_int8_w8a8"),
    ({"use_int8_w8a16": True}, "use_int8_w8a16"), ({"use_int4_w4a16": True}, "use_int4_w4a16"),
    ({"per_channel_quant": True}, "per_channel_quant"), ({"w1_scale": torch.ones(1)}, "w1_scale"),
    ({"w2_scale": torch.ones(1)}, "w2_scale"), ({"a1_scale": torch.ones(1)}, "a1_scale"),
    ({"a2_scale": torch.ones(1)}, "a2_scale"), ({"w1_zp": torch.ones(1)}, "w1_zp"), ({"w2_zp": torch.ones(1)}, "w2_zp"),
    ({"block_shape": [128, 128]}, "block_shape"), ({"no_combine": True}, "no_combine"),
    ({"gemm1_alpha": 1.702}, "gemm1_alpha"), ({"gemm1_limit": 7.0}, "gemm1_limit"),
    ({"swiglu_limit": 10.0}, "swiglu_limit"), ({"activation": "relu2"}, "activation"),
    ({"is_gated": False}, "not gated"), ({"defer_sum": True}, "defer_sum"),
    ({"routed_scaling_factor": torch.ones(1)}, "routed_scaling_factor"),
])
def test_unsupported_calls_go_to_sglang(hooked, over, why):
    fn, went = hooked
    call = _call(*_moe(), **over)
    params, reason = pm.route(call, {"defer_sum": False}, _table())
    assert params is None and why in reason
    assert fn(**call) == "theirs" and went == [("stock", None)]


def test_shape_and_dtype_routes(on_gpu):
    x, w1, w2, w, ids = _moe()
    t = _table()
    assert pm.route(_call(x, w1, w2, w, ids), {}, t)[0] is not None
    assert "not in this GPU's table" in pm.route(_call(*_moe(M=5)), {}, t)[1]  # M above max_m
    assert "not in this GPU's table" in pm.route(_call(*_moe(N=24)), {}, t)[1]  # another shape
    assert "not in this GPU's table" in pm.route(_call(*_moe(dtype=torch.float32)), {}, t)[1]  # fp32: no key
    t32 = _table(key=km.shape_key(6, 40, 48, 4, torch.float32))
    assert "dtypes" in pm.route(_call(*_moe(dtype=torch.float32)), {}, t32)[1]  # and the kernel refuses fp32
    assert "dtypes" in pm.route(_call(x, w1.float(), w2, w, ids), {}, t)[1]
    assert "topk dtypes" in pm.route(_call(x, w1, w2, w, ids.to(torch.int16)), {}, t)[1]
    assert "topk not contiguous" in pm.route(_call(x, w1, w2, w, ids.t().contiguous().t()), {}, t)[1]
    assert "weights not K-contiguous" in pm.route(
        _call(x, w1.transpose(1, 2).contiguous().transpose(1, 2), w2, w, ids), {}, t)[1]
    assert pm.route(_call(x, w1, w2, w, ids.long()), {}, t)[0] is not None  # int64 ids are fine
    assert pm.route(_call(x, w1, w2, w, ids, routed_scaling_factor=2.5), {}, t)[0] is not None


def test_other_gpu_or_cpu_goes_to_sglang(monkeypatch):
    monkeypatch.setattr(pm, "gpu_of", lambda t: "Another GPU")
    assert "not in this GPU's table" in pm.route(_call(*_moe()), {}, _table())[1]
    monkeypatch.setattr(pm, "gpu_of", lambda t: None)
    assert pm.route(_call(*_moe()), {}, _table())[1] == "not on a CUDA device"


def test_large_batches_skip_routing_entirely(hooked, monkeypatch):
    """Prefill sizes go straight to sglang: one comparison, no argument binding, no route()."""
    fn, went = hooked
    monkeypatch.setattr(pm, "route", lambda *a, **k: pytest.fail("route() ran for a prefill-sized call"))
    assert fn(**_call(*_moe(M=7))) == "theirs"


def test_deterministic_inference_goes_to_sglang(hooked, monkeypatch):
    fn, went = hooked
    monkeypatch.setattr(pm, "sglang_deterministic", lambda: True)
    assert fn(**_call(*_moe())) == "theirs" and went == [("stock", None)]


def test_kernel_error_falls_back_logs_once_and_is_not_retried(on_gpu, monkeypatch, caplog):
    from sglang_gemma4_opt import core

    tries = []

    def boom(*a, **k):
        tries.append(1)
        raise RuntimeError("out of resources")

    monkeypatch.setattr(km, "fused_moe_small_batch", boom)
    monkeypatch.setattr(core, "_FALLBACKS", {})
    hook = pm.make_hook(_signature(), {}, _table())
    with caplog.at_level("WARNING", logger="sglang_gemma4_opt"):
        for _ in range(3):
            assert hook(lambda *a, **k: "theirs", **_call(*_moe())) == "theirs"
    assert len(tries) == 1, "a failed path must not be retried (a compile error would recompile every call)"
    assert sum("moe_small_batch (small-batch path) failed" in r.getMessage() for r in caplog.records) == 1
    assert core.fallbacks() == {"moe_small_batch (small-batch path)": {"error": "RuntimeError: out of resources",
                                                                       "calls_to_sglang": 3}}


def test_a_failed_decode_path_leaves_the_prefill_path_on_and_each_logs_its_own(on_gpu, monkeypatch, caplog):
    from sglang_gemma4_opt import core

    monkeypatch.setattr(core, "_FALLBACKS", {})
    core.path_failed("moe_small_batch (small-batch path)", RuntimeError("decode"))
    assert not core.path_off("moe_small_batch (grouped path)")
    with caplog.at_level("WARNING", logger="sglang_gemma4_opt"):
        core.path_failed("moe_small_batch (grouped path)", RuntimeError("prefill"))
    assert any("grouped path) failed (RuntimeError: prefill)" in r.getMessage() for r in caplog.records)


def test_routing_error_falls_back(on_gpu, monkeypatch):
    monkeypatch.setattr(pm, "route", lambda *a, **k: 1 / 0)
    hook = pm.make_hook(_signature(), {}, _table())
    assert hook(lambda *a, **k: "theirs", **_call(*_moe())) == "theirs"


def test_signature_checks():
    sig, extra = pm.signature_info(pm.stock_impl())
    assert tuple(sig.parameters)[:len(pm.BASE_PARAMS)] == pm.BASE_PARAMS
    assert all(k not in pm.BASE_PARAMS for k in extra)

    def renamed(hidden, w1, w2, topk_weights, topk_ids):
        pass

    def new_required(*a):
        pass

    with pytest.raises(pm.TargetChanged):
        pm.signature_info(renamed)
    with pytest.raises(pm.TargetChanged):
        pm.signature_info(new_required)
    def newer(*a):
        pass

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in pm.BASE_PARAMS + ("newer",)]
    newer.__signature__ = inspect.Signature(params)
    with pytest.raises(pm.TargetChanged, match="newer"):
        pm.signature_info(newer)
    newer.__signature__ = _signature([("newer", False)])
    assert pm.signature_info(newer)[1] == {"newer": False}


def test_stock_path_context_restores_the_global():
    import importlib

    mod = importlib.import_module(pm.MODULE)
    before = mod.__dict__[pm.FUNC]
    with pm.stock_path():
        assert mod.__dict__[pm.FUNC] is pm.stock_impl()
    assert mod.__dict__[pm.FUNC] is before


# ---------------------------------------------------------------------------------------------
# the shipped table


def test_shipped_table_is_valid():
    raw = json.loads(km.TABLE_PATH.read_text())
    table = km.load_table(str(km.TABLE_PATH))
    assert set(table) == set(raw) and table
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    for gpu, shapes in table.items():
        assert gpu.startswith("NVIDIA H"), gpu  # Hopper GPUs only
        for key, (max_m, by_m) in shapes.items():
            assert max_m == max(by_m) and min(by_m) == 1, (gpu, key)
            assert raw[gpu][key]["max_m"] == max_m
            for m, p in by_m.items():
                assert pow2(p.up_block_n) and pow2(p.up_block_k) and pow2(p.down_block_n) and pow2(p.down_block_k)
                assert p.up_warps in (1, 2, 4, 8, 16) and p.down_warps in (1, 2, 4, 8, 16)
                assert 1 <= p.up_stages <= 6 and 1 <= p.down_stages <= 6
                assert not p.up_dot or p.up_block_n >= 16  # tl.dot needs 16 columns
    assert km.shape_key(128, 704, 2816, 8, torch.bfloat16) in table["NVIDIA H200"]  # Gemma4 26B-A4B, TP 1


def test_params_for_picks_the_nearest_tuned_size():
    a, b, c = km.Params(up_block_n=8), km.Params(up_block_n=16), km.Params(up_block_n=32)
    t = {GPU: {"k": (8, {1: a, 4: b, 8: c})}}
    assert km.params_for(t, GPU, "k", 1) == a
    assert km.params_for(t, GPU, "k", 2) == a  # |2-1| < |2-4|
    assert km.params_for(t, GPU, "k", 3) == b
    assert km.params_for(t, GPU, "k", 6) == b  # a tie goes to the smaller size
    assert km.params_for(t, GPU, "k", 8) == c
    assert km.params_for(t, GPU, "k", 9) is None and km.params_for(t, GPU, "k", 0) is None
    assert km.params_for(t, "other", "k", 1) is None and km.params_for(t, GPU, "other", 1) is None


def test_table_rejects_empty_entries(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({GPU: {"k": {"max_m": 0, "by_m": {}}}}))
    with pytest.raises(ValueError):
        km.load_table(str(p))
    assert km.load_table(str(tmp_path / "missing.json")) == {}


def test_tuner_table_stops_at_the_first_size_without_a_gain():
    from sglang_gemma4_opt.bench.tune_moe_small import shape_key, table_from

    rows = [dict(N=704, M=1, speedup=1.4, shared_speedup=1.4, params={"a": 1}),
            dict(N=704, M=2, speedup=1.2, shared_speedup=0.99, params={"a": 2}),
            dict(N=704, M=4, speedup=1.01, shared_speedup=1.1, params={}),
            dict(N=704, M=8, speedup=1.2, shared_speedup=1.1, params={}),
            dict(N=352, M=1, speedup=0.9, shared_speedup=1.0, params={}),
            dict(N=2, M=1, speedup=1.3, shared_speedup=1.3, params={"b": 1}),
            dict(N=2, M=2, speedup=1.3, shared_speedup=0.5, params={"b": 2})]  # repeated experts: far slower
    t = table_from(rows)
    assert t == {shape_key(128, 704, 2816, 8): {"max_m": 2, "by_m": {"1": {"a": 1}, "2": {"a": 2}}},
                 shape_key(128, 2, 2816, 8): {"max_m": 1, "by_m": {"1": {"b": 1}}}}


# ---------------------------------------------------------------------------------------------
# the kernels under the interpreter


def sglang_path(x, w1, w2, w, ids, activation, scale=None):
    """sglang's rounding points in torch (tests/_moe_torch.py)."""
    return moe_torch(x, w1, w2, w, ids, activation, scale)


CASES = [
    # M, E, N, K, topk, activation, dtype, params
    (1, 4, 32, 64, 2, "gelu", torch.float16, km.Params(8, 32, 4, 8, 16, 4)),
    (3, 6, 40, 48, 4, "gelu", torch.float16, km.Params(16, 32, 4, 16, 32, 4, up_stages=2, down_stages=2)),
    (2, 5, 24, 80, 3, "silu", torch.float32, km.Params(8, 64, 4, 4, 16, 4)),  # topk 3: not a power of two
    (3, 6, 40, 48, 4, "silu", torch.float16, km.Params(16, 32, 4, 16, 32, 4, up_dot=True, up_stages=3)),
    (2, 8, 24, 40, 8, "gelu", torch.float32, km.Params(16, 16, 4, 8, 8, 4, up_dot=True)),  # N, K not block multiples
]


@pytest.mark.interpret
@pytest.mark.parametrize("M, E, N, K, topk, act, dtype, params", CASES)
def test_kernels_match_reference_and_sglangs_rounding(M, E, N, K, topk, act, dtype, params):
    x, w1, w2, w, ids = _moe(M, E, N, K, topk, dtype, seed=M * 7 + K)
    if M > 1:
        ids[1, 0] = -1  # an expert filtered out (EP): contributes nothing
    out = km.fused_moe_small_batch(x, w1, w2, w, ids, act, params=params)
    ref = km.reference(x, w1, w2, w, ids, act)
    assert out.dtype == dtype and out.shape == (M, K)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - ref).abs().max() <= tol * max(1.0, ref.abs().max())
    mirror = sglang_path(x, w1, w2, w, ids, act)
    ulp = 2e-6 if dtype == torch.float32 else 2 ** -10
    assert (out.float() - mirror.float()).abs().max() <= 2 * ulp * max(1.0, float(mirror.abs().max()))


@pytest.mark.interpret
def test_inplace_strided_int64_ids_and_scale():
    """out = hidden_states (sglang's inplace mode), a row-strided hidden view, int64 ids, routed_scaling_factor."""
    M, E, N, K, topk = 3, 6, 40, 48, 4
    x, w1, w2, w, ids = _moe(M, E, N, K, topk, torch.float16, seed=3)
    big = torch.zeros(M, K + 16, dtype=torch.float16)
    big[:, :K] = x
    xv = big[:, :K]  # stride(0) = K + 16
    expect = sglang_path(x, w1, w2, w, ids, "gelu", 1.5)
    out = km.fused_moe_small_batch(xv, w1, w2, w, ids.long(), "gelu", out=xv, routed_scaling_factor=1.5,
                                   params=km.Params(8, 16, 4, 8, 16, 4))
    assert out is xv
    assert (xv.float() - expect.float()).abs().max() <= 2 * 2 ** -10 * max(1.0, float(expect.abs().max()))
    assert torch.equal(big[:, K:], torch.zeros(M, 16, dtype=torch.float16))  # nothing written past the view


@pytest.mark.interpret
def test_fresh_inputs_differ():
    """A test that cannot fail is a defect: different routing gives a different output."""
    x, w1, w2, w, ids = _moe(2, 6, 40, 48, 4, torch.float16, seed=5)
    p = km.Params(8, 16, 4, 8, 16, 4)
    a = km.fused_moe_small_batch(x, w1, w2, w, ids, "gelu", params=p)
    b = km.fused_moe_small_batch(x, w1, w2, w, ids.roll(1, dims=1).contiguous(), "gelu", params=p)
    c = km.fused_moe_small_batch(x, w1, w2, w.roll(1, dims=1).contiguous(), ids.roll(1, dims=1).contiguous(),
                                 "gelu", params=p)
    assert not torch.equal(a, b)
    assert (a.float() - c.float()).abs().max() <= 4 * 2 ** -10 * max(1.0, float(a.abs().max()))  # same pairs


def test_bench_labels_the_path_each_size_takes(monkeypatch):
    """The fused_moe suite's record says which path the plugin side ran: the small-batch kernels exactly up
    to the table's max_m for this GPU (an earlier labeller called route() without sglang's defaults and
    labelled every size "sglang's kernels")."""
    from types import SimpleNamespace

    from sglang_gemma4_opt.bench import fused_moe as bfm

    table = km.load_table()
    max_m = table["NVIDIA H200"][km.shape_key(128, 704, 2816, 8, torch.bfloat16)][0]
    monkeypatch.setattr(pm, "gpu_of", lambda t: "NVIDIA H200")
    store = torch.empty(2816, dtype=torch.bfloat16)  # Gemma4-shaped weights without the memory
    wts = SimpleNamespace(w13=store.as_strided((128, 1408, 2816), (0, 0, 1)),
                          w2=store.as_strided((128, 2816, 704), (0, 0, 1)))
    sbs = SimpleNamespace(targets={"moe_small_batch": None}, applied=lambda k: True)
    assert [bfm.small_batch_path(sbs, m, wts) for m in (1, max_m, max_m + 1)] == [True, True, False]
    min_g = kg.load_table()["NVIDIA H200"][km.shape_key(128, 704, 2816, 8, torch.bfloat16)][0]
    # the grouped path wants contiguous weights (TMA descriptors): metadata-only tensors of Gemma4's shape
    wts = SimpleNamespace(w13=torch.empty(128, 1408, 2816, dtype=torch.bfloat16, device="meta"),
                          w2=torch.empty(128, 2816, 704, dtype=torch.bfloat16, device="meta"))
    assert [bfm.plugin_path(sbs, m, wts) for m in (max_m + 1, min_g - 1, min_g, 10 ** 5)] == [
        "sglang's kernels", "sglang's kernels", "plugin grouped kernels", "plugin grouped kernels"]
    monkeypatch.setenv("SGLANG_GEMMA4_OPT_DISABLE", "moe_grouped")
    assert bfm.plugin_path(sbs, min_g, wts) == "sglang's kernels"
    monkeypatch.delenv("SGLANG_GEMMA4_OPT_DISABLE")
    sbs.applied = lambda k: False
    assert not bfm.small_batch_path(sbs, 1, wts)
    assert bfm.plugin_path(sbs, min_g, wts) == "sglang's kernels"


# ---------------------------------------------------------------------------------------------
# the prefill (expert-grouped) path in the same hook

GP = kg.GroupedParams(block_m=16, up_block_n=16, up_block_k=16, down_block_n=16, down_block_k=16, group_m=2)


def _gtable(min_m=6, key=None, params=GP):
    key = key or km.shape_key(6, 40, 48, 4, torch.float16)
    return {GPU: {key: (min_m, {8: params, 64: params})}}


@pytest.fixture
def hooked_both(on_gpu, monkeypatch):
    went = []
    monkeypatch.setattr(km, "fused_moe_small_batch", lambda *a, **k: went.append(("small", k)) or "small")
    monkeypatch.setattr(kg, "fused_moe_grouped", lambda *a, **k: went.append(("grouped", k)) or "grouped")
    monkeypatch.delenv("SGLANG_GEMMA4_OPT_DISABLE", raising=False)

    def original(*args, **kwargs):
        went.append(("stock", None))
        return "theirs"

    hook = pm.make_hook(_signature(), {}, _table(M_max=2), _gtable())
    return (lambda *a, **k: hook(original, *a, **k)), went


def test_batch_size_picks_the_path(hooked_both, monkeypatch):
    fn, went = hooked_both
    assert fn(**_call(*_moe(M=2))) == "small"
    assert fn(**_call(*_moe(M=7))) == "grouped"
    assert fn(**_call(*_moe(M=300), inplace=True)) == "grouped"  # above every tuned M: the nearest entry
    assert went[1][1]["params"] == GP and went[2][1]["out"] is not None
    # between the tables: straight to sglang, no routing at all
    monkeypatch.setattr(pm, "route", lambda *a, **k: pytest.fail("route() ran"))
    monkeypatch.setattr(pm, "route_grouped", lambda *a, **k: pytest.fail("route_grouped() ran"))
    assert fn(**_call(*_moe(M=3))) == "theirs" and fn(**_call(*_moe(M=5))) == "theirs"


@pytest.mark.parametrize("over, why", [
    ({"use_fp8_w8a8": True}, "use_fp8_w8a8"), ({"activation": "relu2"}, "activation"),
    ({"is_gated": False}, "not gated"), ({"no_combine": True}, "no_combine"),
])
def test_grouped_unsupported_calls_go_to_sglang(hooked_both, over, why):
    fn, went = hooked_both
    call = _call(*_moe(M=7), **over)
    params, reason = pm.route_grouped(call, {}, _gtable())
    assert params is None and why in reason
    assert fn(**call) == "theirs" and went == [("stock", None)]


def test_grouped_route_checks_weight_layout_and_table(on_gpu):
    x, w1, w2, w, ids = _moe(M=7)
    t = _gtable()
    assert pm.route_grouped(_call(x, w1, w2, w, ids), {}, t)[0] == GP
    # TMA descriptors need contiguous weights (sglang's are); a transposed view: sglang
    wt = w1.transpose(1, 2).contiguous().transpose(1, 2)
    assert "contiguous" in pm.route_grouped(_call(x, wt, w2, w, ids), {}, t)[1]
    assert "not in this GPU's table" in pm.route_grouped(_call(*_moe(M=5)), {}, t)[1]  # below min_m
    assert "not in this GPU's table" in pm.route_grouped(_call(*_moe(M=7, N=24)), {}, t)[1]


def test_grouped_switch_and_deterministic_mode(on_gpu, monkeypatch):
    monkeypatch.setattr(kg, "fused_moe_grouped", lambda *a, **k: "grouped")
    monkeypatch.setenv("SGLANG_GEMMA4_OPT_DISABLE", "moe_grouped")
    hook = pm.make_hook(_signature(), {}, _table(M_max=2), _gtable())
    assert hook(lambda *a, **k: "theirs", **_call(*_moe(M=7))) == "theirs"
    monkeypatch.delenv("SGLANG_GEMMA4_OPT_DISABLE")
    hook = pm.make_hook(_signature(), {}, _table(M_max=2), _gtable())
    assert hook(lambda *a, **k: "theirs", **_call(*_moe(M=7))) == "grouped"
    monkeypatch.setattr(pm, "sglang_deterministic", lambda: True)
    assert hook(lambda *a, **k: "theirs", **_call(*_moe(M=7))) == "theirs"


def test_grouped_kernel_error_falls_back(on_gpu, monkeypatch):
    monkeypatch.setattr(kg, "fused_moe_grouped", lambda *a, **k: 1 / 0)
    hook = pm.make_hook(_signature(), {}, _table(M_max=2), _gtable())
    assert hook(lambda *a, **k: "theirs", **_call(*_moe(M=7))) == "theirs"


def test_broken_grouped_table_keeps_decode_path(on_gpu, monkeypatch, caplog):
    def broken():
        raise ValueError("bad entry")

    monkeypatch.setattr(kg, "load_table", broken)
    monkeypatch.setattr(km, "fused_moe_small_batch", lambda *a, **k: "small")
    with caplog.at_level("WARNING", logger="sglang_gemma4_opt"):
        hook = pm.make_hook(_signature(), {}, _table(M_max=2))
    assert any("moe_grouped table does not load" in r.getMessage() for r in caplog.records)
    assert hook(lambda *a, **k: "theirs", **_call(*_moe(M=2))) == "small"
    assert hook(lambda *a, **k: "theirs", **_call(*_moe(M=7))) == "theirs"


@pytest.mark.interpret
def test_hooked_grouped_call_runs_the_kernels(on_gpu, monkeypatch):
    """Through the hook with the real kernels (interpreter, fp16): sglang's rounding points within 2 ulp."""
    monkeypatch.delenv("SGLANG_GEMMA4_OPT_DISABLE", raising=False)
    x, w1, w2, w, ids = _moe(M=9, seed=5)
    hook = pm.make_hook(_signature(), {}, _table(M_max=2), _gtable())
    out = hook(lambda *a, **k: pytest.fail("sglang's path ran"), **_call(x, w1, w2, w, ids, routed_scaling_factor=1.5))
    expect = moe_torch(x, w1, w2, w, ids, "gelu", 1.5)
    assert (out.float() - expect.float()).abs().max() <= 2 * 2 ** -10 * max(1.0, float(expect.abs().max()))


def test_shipped_grouped_table_loads_and_is_sane():
    t = kg.load_table()
    assert km.shape_key(128, 704, 2816, 8, torch.bfloat16) in t["NVIDIA H200"]
    for gpu, shapes in t.items():
        for key, (min_m, by_m) in shapes.items():
            assert key in {km.shape_key(128, n, 2816, 8, torch.bfloat16) for n in (704, 352)}, key
            assert min_m >= 256 and min_m in by_m  # prefill sizes only: the decode table covers the rest
            for p in by_m.values():
                assert p.up_block_n % 16 == 0 and p.block_m in (16, 32, 64, 128, 256)
