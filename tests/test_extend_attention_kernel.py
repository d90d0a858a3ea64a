"""Hopper extend-attention kernel: per-call routing (every unsupported case runs sglang's kernel) and the
kernel itself under TRITON_INTERPRET=1 on tiny shapes against a float32 reference and sglang's kernel.

The interpreter runs fp16 here: triton 3.6's interpreter multiplies bf16 tensors in tl.dot as raw
uint16 bit patterns (a bf16 `tl.dot` of random 16x16 tiles is off by 1e10 on CPU), so bf16 numerics
are checked on the GPU (tests/gpu/test_extend_attention_kernel_gpu.py). The kernel's code is the same
for both dtypes.
"""

import pytest
import torch

from sglang_gemma4_opt.kernels import extend_attention as ka
from sglang_gemma4_opt.patches import extend_attention_kernel as pk


# ---------------------------------------------------------------------------------------------
# routing


def _call(hd=256, q_heads=4, kv_heads=2, dtype=torch.bfloat16, **over):
    """A call the kernel supports (on a Hopper GPU), as keyword arguments; `over` replaces some."""
    c = ka.random_case([3, 0], [5, 4], q_heads, kv_heads, hd, dtype=dtype)
    max_len = c.pop("max_len")
    call = dict(c, custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=max_len, k_scale=1.0,
                v_scale=1.0, sm_scale=None, logit_cap=0.0, skip_prefix_custom_mask=True, sliding_window_size=1023,
                sinks=None, window_kv_offsets=None, xai_temperature_len=-1)
    call.update(over)
    return call


@pytest.fixture
def hopper(monkeypatch):
    """Routing sees a Hopper GPU for the CPU tensors of these tests."""
    monkeypatch.setattr(ka, "device_reason", lambda t: None)


@pytest.fixture
def hooked():
    """The patch's hook around a stand-in for sglang's function, plus a record of where calls went."""
    went = []

    def original(*args, **kwargs):
        went.append("stock")

    hook = pk.make_hook(pk.BASE_PARAMS, {})
    return (lambda *a, **k: hook(original, *a, **k)), went


def _positional(call):
    return [call[k] for k in pk.BASE_PARAMS]


def test_supported_call_goes_to_kernel(hopper, hooked, monkeypatch):
    fwd, went = hooked
    monkeypatch.setattr(ka, "extend_attention_fwd", lambda **kw: went.append("kernel"))
    call = _call()
    assert pk.route(call, {}) is None
    fwd(**call)
    fwd(*_positional(call))  # sglang's triton backend passes most arguments positionally
    assert went == ["kernel", "kernel"]


def test_sglang_backend_index_dtypes_go_to_kernel(hopper, hooked, monkeypatch):
    """sglang's triton backend keeps qo_indptr in int64 (kv_indptr int32, kv_indices int64): such calls
    must reach the plugin's kernel (a dtype check once sent every real call to sglang's kernel)."""
    fwd, went = hooked
    monkeypatch.setattr(ka, "extend_attention_fwd", lambda **kw: went.append("kernel"))
    base = _call()
    for qo_dt, kv_dt in ((torch.int64, torch.int32), (torch.int64, torch.int64), (torch.int32, torch.int64)):
        call = dict(base, qo_indptr=base["qo_indptr"].to(qo_dt), kv_indptr=base["kv_indptr"].to(kv_dt),
                    kv_indices=base["kv_indices"].to(torch.int64))
        assert pk.route(call, {}) is None, (qo_dt, kv_dt)
        fwd(**call)
    assert went == ["kernel"] * 3
    assert pk.route(dict(base, qo_indptr=base["qo_indptr"].to(torch.int16)), {}) == "indptr dtype"


def test_trace_logs_each_kind_of_call_once(hopper, monkeypatch, caplog):
    """SGLANG_GEMMA4_OPT_TRACE=1: one line per kind of call naming the kernel that ran it (and why not the
    plugin's); repeated calls add nothing; without the variable, nothing is logged."""
    import logging

    monkeypatch.setattr(ka, "extend_attention_fwd", lambda **kw: None)
    monkeypatch.setattr(pk, "_traced", set())
    original = lambda *a, **k: None  # noqa: E731
    calls = [_call(), _call(), _call(logit_cap=30.0), _call(logit_cap=30.0)]
    monkeypatch.delenv("SGLANG_GEMMA4_OPT_TRACE", raising=False)
    hook = pk.make_hook(pk.BASE_PARAMS, {})
    with caplog.at_level(logging.INFO, logger="sglang_gemma4_opt"):
        for c in calls:
            hook(original, **c)
    assert not [r for r in caplog.records if "trace" in r.getMessage()]
    monkeypatch.setenv("SGLANG_GEMMA4_OPT_TRACE", "1")
    hook = pk.make_hook(pk.BASE_PARAMS, {})
    with caplog.at_level(logging.INFO, logger="sglang_gemma4_opt"):
        for c in calls:
            hook(original, **c)
    lines = [r.getMessage() for r in caplog.records if "trace" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].endswith("-> plugin kernel")
    assert lines[1].endswith("-> sglang's kernel (logit cap)")


UNSUPPORTED = {
    "custom mask (speculative verify)": dict(custom_mask=torch.ones(8, dtype=torch.uint8),
                                             mask_indptr=torch.zeros(3, dtype=torch.int64)),
    "not causal": dict(is_causal=False),
    "sinks": dict(sinks=torch.zeros(4)),
    "k scale": dict(k_scale=0.5),
    "v scale": dict(v_scale=2.0),
    "k scale tensor": dict(k_scale=torch.tensor(1.0)),
    "logit cap": dict(logit_cap=30.0),
    "xai temperature": dict(xai_temperature_len=4),
    "negative sm_scale": dict(sm_scale=-1.0),
    "max_len not an int": dict(max_len_extend=torch.tensor(5)),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_arguments_go_to_stock(hopper, hooked, monkeypatch, case):
    fwd, went = hooked
    monkeypatch.setattr(ka, "extend_attention_fwd", lambda **kw: went.append("kernel"))
    call = _call(**UNSUPPORTED[case])
    assert pk.route(call, {}) is not None
    fwd(**call)
    assert went == ["stock"]


@pytest.mark.parametrize("hd", [64, 128, 192, 288, 576])
def test_other_head_dims_go_to_stock(hopper, hooked, hd):
    fwd, went = hooked
    fwd(**_call(hd=hd))
    assert went == ["stock"]


def test_v_head_dim_differs_goes_to_stock(hopper, hooked):
    fwd, went = hooked
    call = _call()
    call["v_extend"] = torch.randn(9, 2, 128).bfloat16()
    fwd(**call)
    assert went == ["stock"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_other_dtypes_go_to_stock(hopper, hooked, dtype):
    fwd, went = hooked
    call = _call()
    for k in ("q_extend", "k_extend", "v_extend", "o_extend", "k_buffer", "v_buffer"):
        call[k] = call[k].float().to(dtype)
    fwd(**call)
    assert went == ["stock"]


def test_fp8_kv_cache_goes_to_stock(hopper, hooked):
    fwd, went = hooked
    call = _call()
    call["k_buffer"] = call["k_buffer"].float().to(torch.float8_e4m3fn)
    call["v_buffer"] = call["v_buffer"].float().to(torch.float8_e4m3fn)
    fwd(**call)
    assert went == ["stock"]


def test_fp16_is_supported(hopper):
    assert pk.route(_call(dtype=torch.float16), {}) is None


def test_gqa_head_counts(hopper, hooked):
    assert pk.route(_call(q_heads=16, kv_heads=8), {}) is None
    assert pk.route(_call(q_heads=16, kv_heads=2, hd=512), {}) is None
    fwd, went = hooked
    fwd(**_call(q_heads=6, kv_heads=4))  # not a whole group per kv head
    assert went == ["stock"]


def test_non_contiguous_head_dim_goes_to_stock(hopper, hooked):
    fwd, went = hooked
    call = _call()
    call["q_extend"] = torch.randn(9, 4, 512).bfloat16()[..., ::2]
    fwd(**call)
    assert went == ["stock"]


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_non_hopper_gpu_goes_to_stock(hooked, monkeypatch, cap):
    """The real device check, fed a CUDA-looking tensor and a non-Hopper compute capability."""
    fwd, went = hooked
    monkeypatch.setattr(ka, "_device_info", lambda device: (cap, "some GPU"))

    class FakeCuda(torch.Tensor):
        is_cuda = True

    call = _call()
    call["q_extend"] = call["q_extend"].as_subclass(FakeCuda)
    assert ka.device_reason(call["q_extend"]) is not None
    fwd(**call)
    assert went == ["stock"]


def test_hopper_device_check_passes(monkeypatch):
    monkeypatch.setattr(ka, "_device_info", lambda device: ((9, 0), "NVIDIA H200"))

    class FakeCuda(torch.Tensor):
        is_cuda = True

    assert ka.device_reason(torch.zeros(1).as_subclass(FakeCuda)) is None


def test_cpu_tensors_go_to_stock(hooked):
    fwd, went = hooked
    fwd(**_call())
    assert went == ["stock"]


def test_newer_sglang_arguments(hopper):
    """Arguments newer sglang added: at their defaults the kernel runs, at any other value sglang's."""
    extra = {"lse_extend": None, "skip_prefix": False, "skip_extend": False, "page_size": 1, "score_mod": None,
             "aux_tensors": None, "extend_seq_lens_cpu": None, "identity_kv_indices": False}
    assert pk.route(_call(), extra) is None
    assert pk.route(dict(_call(), lse_extend=None, page_size=1, extend_seq_lens_cpu=[5, 4]), extra) is None
    for k, v in {"lse_extend": torch.zeros(9, 4), "skip_prefix": True, "skip_extend": True, "page_size": 16,
                 "score_mod": (lambda *a: a), "aux_tensors": [torch.zeros(1)], "identity_kv_indices": True}.items():
        assert pk.route(dict(_call(), **{k: v}), extra) is not None, k


def test_kernel_failure_falls_back_to_stock_and_is_not_retried(hopper, hooked, monkeypatch):
    from sglang_gemma4_opt import core

    fwd, went = hooked
    tries = []

    def broken(**kw):
        tries.append(1)
        raise RuntimeError("compile failed")

    monkeypatch.setattr(ka, "extend_attention_fwd", broken)
    monkeypatch.setattr(core, "_FALLBACKS", {})
    fwd(**_call())
    fwd(**_call())
    assert went == ["stock", "stock"] and len(tries) == 1
    assert core.fallbacks()["extend_attention_kernel"] == {"error": "RuntimeError: compile failed",
                                                           "calls_to_sglang": 2}


def test_signature_of_installed_sglang():
    """The patch resolves sglang's function and accepts its signature (0.5.12 exactly; newer: extras)."""
    specs = pk.prepare()
    assert len(specs) == 1 and specs[0].target.endswith(".extend_attention_fwd") and specs[0].kind == "around"
    mod = pk.import_first(*pk.MODULES)
    fn = mod.extend_attention_fwd
    names, extra = pk.signature_info(getattr(fn, "__wrapped__", fn))
    assert names[:len(pk.BASE_PARAMS)] == pk.BASE_PARAMS


def test_signature_change_is_refused():
    def f(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
          custom_mask, is_causal, mask_indptr, max_len_extend, k_scale, v_scale, sm_scale=None, logit_cap=0.0,
          skip_prefix_custom_mask=True, sliding_window_size=-1, sinks=None, window_kv_offsets=None,
          xai_temperature_len=-1, new_required=None, *, must):
        pass

    with pytest.raises(pk.TargetChanged):
        pk.signature_info(f)


def test_config_table():
    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H20", "NVIDIA GH200 480GB"):
        for hd in ka.HEAD_DIMS:
            bm, bn, warps, stages, tma, dv = ka.config_for(name, hd)
            assert bm % bn == 0 and stages >= 2 and warps in (4, 8) and hd % dv == 0
            # shared memory of the pipelined loop: Q, then per stage one K tile and one V tile
            smem = 2 * (bm * hd + stages * bn * (hd + hd // dv))
            assert smem <= 227 * 1024, (name, hd, smem)


# ---------------------------------------------------------------------------------------------
# the kernel under the interpreter


@pytest.fixture(autouse=True)
def _interpreter_numpy_2_4(request, monkeypatch):
    """triton 3.6's interpreter turns a scalar into an int with `int(ndarray)`, which numpy >= 2.4
    refuses for the 1-element arrays its scalars are (`range(0, n, BLOCK)` over a loaded n fails, in
    sglang's kernel too). Interpreter tests here get an `__index__` that takes the one element."""
    if request.node.get_closest_marker("interpret") is None:
        return
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(ti, "_patch_lang_tensor", patched)


KERNEL_CASES = [
    # prefix lens, extend lens, q heads, kv heads, head dim, sliding_window_size, config
    ([0], [37], 2, 1, 256, -1, (32, 16, 4, 2, False, 1)),
    ([0, 0], [37, 70], 4, 2, 256, 20, (32, 16, 4, 2, False, 1)),          # window, batch of 2, GQA
    ([13, 50, 0], [37, 5, 70], 4, 1, 256, 23, (32, 16, 4, 2, False, 1)),  # prefix through kv_indices
    ([13, 50, 0], [37, 5, 70], 4, 1, 256, 23, (32, 16, 4, 2, True, 1)),   # the same through TMA descriptors
    ([40, 3], [9, 64], 2, 1, 256, 0, (32, 16, 4, 2, False, 1)),           # 0: no window (sglang: > 0 only)
    ([40, 3], [9, 64], 2, 1, 256, 1, (32, 16, 4, 2, False, 1)),           # window of 2 keys
    ([100, 3], [33, 64], 2, 2, 256, 31, (64, 32, 4, 2, True, 1)),
    ([13, 50, 0], [37, 5, 70], 4, 2, 512, -1, (32, 16, 4, 2, True, 2)),   # head dim 512, split output
    ([7, 0], [1, 19], 4, 2, 512, 5, (16, 16, 4, 2, False, 1)),            # one-token request
]


def _run(case, cfg, sliding_window_size):
    c = dict(case)
    max_len = c.pop("max_len")
    ka.extend_attention_fwd(**c, custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=max_len,
                            k_scale=1.0, v_scale=1.0, sm_scale=None, sliding_window_size=sliding_window_size,
                            config=cfg)
    return c["o_extend"]


@pytest.mark.interpret
@pytest.mark.parametrize("pl,el,hq,hkv,hd,w,cfg", KERNEL_CASES)
def test_kernel_matches_fp32_reference(pl, el, hq, hkv, hd, w, cfg):
    g = torch.Generator().manual_seed(hash((tuple(pl), tuple(el), hd, w, cfg)) & 0xFFFF)
    case = ka.random_case(pl, el, hq, hkv, hd, dtype=torch.float16, generator=g)
    out = _run(case, cfg, w)
    ref = ka.reference(case["q_extend"], case["k_extend"], case["v_extend"], case["k_buffer"], case["v_buffer"],
                       case["qo_indptr"], case["kv_indptr"], case["kv_indices"], None, w)
    assert torch.isfinite(out).all(), "every output element written"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-3, rel
    assert (out.float() - ref).abs().max().item() < 1e-2


@pytest.mark.interpret
def test_kernel_with_int64_indptrs_matches_int32():
    """The same call with sglang's backend dtypes (int64 qo/kv indptr) computes the same output."""
    g = torch.Generator().manual_seed(7)
    case = ka.random_case([9, 0], [21, 13], 4, 2, 256, dtype=torch.float16, generator=g)
    cfg = (16, 16, 4, 2, False, 1)
    a = _run(case, cfg, 11).clone()
    c64 = dict(case, qo_indptr=case["qo_indptr"].to(torch.int64), kv_indptr=case["kv_indptr"].to(torch.int64),
               o_extend=torch.full_like(case["o_extend"], float("nan")))
    b = _run(c64, cfg, 11)
    assert torch.isfinite(b).all()
    assert torch.equal(a, b)


@pytest.mark.interpret
@pytest.mark.parametrize("w", [-1, 0, 1, 23])
def test_kernel_matches_sglang_kernel(w):
    """Same inputs through sglang's own kernel (interpreted): which keys each query sees is identical."""
    mod = pk.import_first(*pk.MODULES)
    stock = mod.extend_attention_fwd
    stock = getattr(stock, "__wrapped__", stock)
    g = torch.Generator().manual_seed(w + 100)
    case = ka.random_case([29, 0, 64], [40, 33, 17], 4, 2, 256, dtype=torch.float16, generator=g)
    ours = _run(case, (32, 16, 4, 2, False, 1), w).clone()
    c = dict(case)
    max_len = c.pop("max_len")
    c["o_extend"] = torch.full_like(c["o_extend"], float("nan"))
    stock(*[c[k] for k in pk.BASE_PARAMS[:9]], None, True, None, max_len, 1.0, 1.0, None, sliding_window_size=w)
    assert torch.isfinite(c["o_extend"]).all()
    assert (ours.float() - c["o_extend"].float()).abs().max().item() < 5e-3


@pytest.mark.interpret
def test_tma_rows_of_other_requests_do_not_leak():
    """Through TMA a tile past a request's end reads the next request's rows; inf/nan there must not
    reach this request's output (sglang masks those loads to 0)."""
    g = torch.Generator().manual_seed(5)
    case = ka.random_case([0, 0], [21, 16], 2, 1, 256, dtype=torch.float16, generator=g)
    for name in ("k_extend", "v_extend"):
        case[name][21:] = float("inf")
    out = _run(case, (32, 16, 4, 2, True, 1), -1)
    ref = ka.reference(case["q_extend"][:21], case["k_extend"][:21], case["v_extend"][:21], case["k_buffer"],
                       case["v_buffer"], case["qo_indptr"][:2], case["kv_indptr"][:2], case["kv_indices"], None, -1)
    assert torch.isfinite(out[:21]).all()
    assert (out[:21].float() - ref).abs().max().item() < 1e-2


def test_deterministic_inference_goes_to_stock(hopper, hooked, monkeypatch):
    """sglang's deterministic-inference mode keeps sglang's own kernel for every call."""
    fwd, went = hooked
    monkeypatch.setattr(ka, "extend_attention_fwd", lambda **kw: went.append("kernel"))
    monkeypatch.setattr(pk, "sglang_deterministic", lambda: True)
    fwd(**_call())
    monkeypatch.setattr(pk, "sglang_deterministic", lambda: False)
    fwd(**_call())
    assert went == ["stock", "kernel"]


def test_sglang_deterministic_reads_server_args(monkeypatch):
    """The flag is read from where the running sglang publishes it (>= 0.5.13: runtime_context's
    get_exec(); <= 0.5.12: get_global_server_args()); outside a server it is False."""
    from types import SimpleNamespace

    from sglang_gemma4_opt import core

    assert core.sglang_deterministic() in (False, True)
    try:
        import sglang.srt.server_args as sa
    except ImportError:
        pytest.skip("no sglang")
    try:
        import sglang.srt.runtime_context as rc
    except ImportError:
        rc = None
    for flag in (True, False, True):
        if rc is not None and hasattr(rc, "get_exec"):
            bag = SimpleNamespace(deterministic=SimpleNamespace(enable_deterministic_inference=flag))
            monkeypatch.setattr(rc, "get_exec", lambda bag=bag: bag)
        else:
            monkeypatch.setattr(sa, "get_global_server_args",
                                lambda flag=flag: SimpleNamespace(enable_deterministic_inference=flag))
        assert core.sglang_deterministic() is flag