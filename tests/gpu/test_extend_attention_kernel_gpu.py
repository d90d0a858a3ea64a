"""The plugin's Hopper extend-attention kernel on the GPU: against a float32 reference and no worse than
sglang's own kernel on the same bf16 inputs (fresh random inputs, odd lengths, prefixes through a
shuffled KV pool, batch mixes), every output element written, CUDA-graph capturable, and the route
the patch picks for sglang's calls.

Tolerance: bf16 inputs, P rounded to bf16 before PV, output rounded to bf16. Relative Frobenius error
<= 1e-2 against float32 attention, and <= 1.05x sglang's kernel's own error (+1e-4) on the same inputs.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

pytestmark = pytest.mark.gpu

REL_TOL = 1e-2


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(autouse=True)
def _needs_hopper():
    if not _hopper():
        pytest.skip("the kernel is for Hopper (sm 9.x)")


def _stock():
    from sglang_gemma4_opt.patches import extend_attention_kernel as pk

    fn = pk.import_first(*pk.MODULES).extend_attention_fwd
    return getattr(fn, "__wrapped__", fn)


def _run(fn, case, window, **kw):
    from sglang_gemma4_opt.patches.extend_attention_kernel import BASE_PARAMS

    c = dict(case)
    max_len = c.pop("max_len")
    c["o_extend"] = torch.full_like(c["o_extend"], float("nan"))  # poisoned
    args = [c[k] for k in BASE_PARAMS[:9]] + [None, True, None, max_len, 1.0, 1.0, None]
    fn(*args, sliding_window_size=window, **kw)
    torch.cuda.synchronize()
    return c["o_extend"]


def _check(case, window, config=None):
    from sglang_gemma4_opt.kernels import extend_attention as ka

    ours = _run(ka.extend_attention_fwd, case, window, **({"config": config} if config else {}))
    stock = _run(_stock(), case, window)
    ref = ka.reference(case["q_extend"], case["k_extend"], case["v_extend"], case["k_buffer"], case["v_buffer"],
                       case["qo_indptr"], case["kv_indptr"], case["kv_indices"], None, window)
    assert torch.isfinite(ours).all(), "every output element written"
    e_ours = ((ours.float() - ref).norm() / ref.norm()).item()
    e_stock = ((stock.float() - ref).norm() / ref.norm()).item()
    assert e_ours < REL_TOL, (e_ours, e_stock)
    assert e_ours <= 1.05 * e_stock + 1e-4, (e_ours, e_stock)
    return e_ours, e_stock


CASES = [
    # prefix lens, extend lens, q heads, kv heads, head dim, sliding_window_size (sglang's value)
    ([0] * 3, [1024, 517, 1], 16, 8, 256, 1023),
    ([0, 0], [2111, 64], 16, 8, 256, 1023),
    ([1500, 0, 37, 3000], [700, 333, 129, 1], 16, 8, 256, 1023),  # chunked prefill: prefix through kv_indices
    ([1023, 200], [1025, 77], 16, 8, 256, 1024),                   # 0.5.12's Gemma4 passes 1024
    ([300, 0], [257, 999], 16, 8, 256, -1),
    ([0, 0, 0], [1024, 333, 65], 16, 2, 512, -1),
    ([2000, 5, 0], [511, 130, 1], 16, 2, 512, -1),
    ([0, 64], [200, 100], 16, 2, 512, 50),
]


@pytest.mark.parametrize("pl,el,hq,hkv,hd,w", CASES)
def test_matches_reference_and_stock(pl, el, hq, hkv, hd, w):
    from sglang_gemma4_opt.kernels import extend_attention as ka

    case = ka.random_case(pl, el, hq, hkv, hd, device="cuda")
    _check(case, w)


@pytest.mark.parametrize("hd", [256, 512])
def test_sglang_backend_index_dtypes(hd):
    """qo_indptr int64 as sglang's triton backend makes it (kv_indptr int32, kv_indices int64): the patch
    routes the call to the plugin's kernel and the output equals the int32-indptr run bit for bit."""
    from sglang_gemma4_opt.kernels import extend_attention as ka
    from sglang_gemma4_opt.patches import extend_attention_kernel as pk

    w = 1023 if hd == 256 else -1
    case = ka.random_case([700, 0], [1500, 333], 16, 8 if hd == 256 else 2, hd, device="cuda")
    a = _run(ka.extend_attention_fwd, case, w).clone()
    c64 = dict(case, qo_indptr=case["qo_indptr"].to(torch.int64), kv_indices=case["kv_indices"].to(torch.int64))
    call = dict(c64, custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=c64["max_len"],
                k_scale=1.0, v_scale=1.0, sm_scale=None, logit_cap=0.0, skip_prefix_custom_mask=True,
                sliding_window_size=w, sinks=None, window_kv_offsets=None, xai_temperature_len=-1)
    call.pop("max_len")
    assert pk.route(call, {}) is None
    b = _run(ka.extend_attention_fwd, c64, w)
    assert torch.equal(a, b)
    _check(c64, w)


SHARED_SOFTMAX_CASES = [
    # extend lens, q heads, kv heads, sliding_window_size, dtype, q as a view of a fused qkv buffer
    ([1024, 517, 1], 16, 2, -1, torch.bfloat16, False),
    ([1, 63, 64, 65, 200, 1000], 16, 2, -1, torch.bfloat16, False),
    ([1, 63, 64, 65, 200, 1000], 16, 2, 100, torch.bfloat16, False),  # window edge tiles
    ([5, 1500, 1100], 16, 2, 1023, torch.bfloat16, False),
    ([33, 97], 16, 2, 31, torch.bfloat16, False),
    ([1, 63, 64, 65, 200, 1000], 16, 2, -1, torch.float16, False),
    ([77, 300, 129], 16, 8, -1, torch.bfloat16, True),                # GQA 2, strided q
]


@pytest.mark.parametrize("el,hq,hkv,w,dt,fused", SHARED_SOFTMAX_CASES)
def test_shared_softmax_kernel(el, hq, hkv, w, dt, fused):
    """The Gluon head-dim-512 kernel at each key tile it is built for (fresh prefill, no prefix)."""
    from sglang_gemma4_opt.kernels import extend_attention as ka
    from sglang_gemma4_opt.kernels import extend_attention_hd512 as g

    case = ka.random_case([0] * len(el), el, hq, hkv, 512, dtype=dt, device="cuda")
    if fused:
        n = case["q_extend"].shape[0]
        qkv = torch.randn(n, (hq + 2 * hkv) * 512, device="cuda", dtype=dt)
        q = qkv[:, :hq * 512].view(n, hq, 512)
        q.copy_(case["q_extend"])
        case["q_extend"] = q
    for bn in g.BLOCK_NS:
        _check(case, w, config=ka.SharedSoftmax(bn))


def test_shared_softmax_next_request_rows_do_not_leak():
    """The last key tile of a request reaches into the next request's rows; p is 0 there, but inf/nan
    values in those rows must not reach the output (0 * inf = nan)."""
    from sglang_gemma4_opt.kernels import extend_attention as ka
    from sglang_gemma4_opt.kernels import extend_attention_hd512 as g

    case = ka.random_case([0, 0], [100, 50], 16, 2, 512, device="cuda")
    case["v_extend"][100:] = float("inf")
    case["k_extend"][100:] = float("nan")
    one = {k: v[:100] if k in ("q_extend", "k_extend", "v_extend", "o_extend") else v for k, v in case.items()}
    ref = ka.reference(one["q_extend"], one["k_extend"], one["v_extend"], case["k_buffer"], case["v_buffer"],
                       torch.tensor([0, 100], device="cuda"), case["kv_indptr"][:2], case["kv_indices"], None, -1)
    for bn in g.BLOCK_NS:
        out = _run(ka.extend_attention_fwd, case, -1, config=ka.SharedSoftmax(bn))[:100]
        assert torch.isfinite(out).all(), bn
        assert ((out.float() - ref).norm() / ref.norm()).item() < REL_TOL


def test_table_route_for_hd512(monkeypatch):
    """Without prefix keys the table sends head dim 512 to the Gluon kernel on this GPU (bit-identical to
    calling it directly); with prefix keys, or with SGLANG_GEMMA4_OPT_DISABLE=extend_attention_hd512, the Triton kernel."""
    from sglang_gemma4_opt.kernels import extend_attention as ka

    name = torch.cuda.get_device_name()
    plan = ka.plan_for(name, 512, has_prefix=False)
    case = ka.random_case([0, 0], [700, 129], 16, 2, 512, device="cuda")
    table = _run(ka.extend_attention_fwd, case, -1).clone()
    if isinstance(plan, ka.SharedSoftmax):
        assert torch.equal(table, _run(ka.extend_attention_fwd, case, -1, config=plan))
    monkeypatch.setenv("SGLANG_GEMMA4_OPT_DISABLE", ka.HD512_SWITCH)
    assert torch.equal(_run(ka.extend_attention_fwd, case, -1), _run(ka.extend_attention_fwd, case, -1,
                                                                     config=ka.config_for(name, 512)))
    monkeypatch.delenv("SGLANG_GEMMA4_OPT_DISABLE")
    pre = ka.random_case([300, 0], [200, 129], 16, 2, 512, device="cuda")
    assert torch.equal(_run(ka.extend_attention_fwd, pre, -1), _run(ka.extend_attention_fwd, pre, -1,
                                                                    config=ka.config_for(name, 512)))
    assert not ka._GLUON_FAILED


def test_shared_softmax_cuda_graph_replay():
    from sglang_gemma4_opt.kernels import extend_attention as ka

    case = ka.random_case([0, 0], [500, 77], 16, 2, 512, device="cuda")
    cfg = ka.SharedSoftmax(64)
    want = _run(ka.extend_attention_fwd, case, -1, config=cfg).clone()
    c = dict(case)
    max_len = c.pop("max_len")
    kw = dict(custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=max_len, k_scale=1.0, v_scale=1.0,
              sliding_window_size=-1, config=cfg)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ka.extend_attention_fwd(**c, **kw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ka.extend_attention_fwd(**c, **kw)
    c["o_extend"].fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(c["o_extend"], want)


@pytest.mark.parametrize("hd", [256, 512])
def test_every_table_config_is_correct(hd):
    """Each GPU's shipped config (and the sm90 default) computes the same function on this GPU."""
    from sglang_gemma4_opt.kernels import extend_attention as ka

    configs = {tuple(t[hd]) for t in ka.CONFIGS.values()} | {tuple(ka.DEFAULT_SM90[hd])}
    case = ka.random_case([100, 0], [300, 77], 16, 8 if hd == 256 else 2, hd, device="cuda")
    for cfg in sorted(configs):
        _check(case, 1023 if hd == 256 else -1, config=cfg)
    if hd == 512:  # the Gluon kernel's entries (calls without prefix keys)
        fresh = ka.random_case([0, 0], [300, 77], 16, 2, 512, device="cuda")
        for ss in {*ka.SHARED_SOFTMAX.values(), ka.DEFAULT_SM90_SHARED_SOFTMAX}:
            _check(fresh, -1, config=ss)


@pytest.mark.parametrize("tma", [True, False])
def test_q_as_view_of_fused_qkv(tma):
    """sglang hands q as a view of the fused qkv projection (row stride (Hq + 2 Hkv) * D)."""
    from sglang_gemma4_opt.kernels import extend_attention as ka

    case = ka.random_case([0, 40], [333, 100], 16, 8, 256, device="cuda")
    n = case["q_extend"].shape[0]
    qkv = torch.randn(n, (16 + 16) * 256, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :16 * 256].view(n, 16, 256)
    q.copy_(case["q_extend"])
    case["q_extend"] = q
    cfg = ka.config_for(torch.cuda.get_device_name(), 256)
    _check(case, 1023, config=cfg[:4] + (tma,) + cfg[5:])


def test_fp16():
    from sglang_gemma4_opt.kernels import extend_attention as ka

    case = ka.random_case([50, 0], [300, 129], 16, 8, 256, dtype=torch.float16, device="cuda")
    _check(case, 1023)


def test_cuda_graph_replay():
    from sglang_gemma4_opt.kernels import extend_attention as ka

    case = ka.random_case([64, 0], [500, 77], 16, 8, 256, device="cuda")
    want = _run(ka.extend_attention_fwd, case, 1023).clone()
    c = dict(case)
    max_len = c.pop("max_len")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ka.extend_attention_fwd(**c, custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=max_len,
                                k_scale=1.0, v_scale=1.0, sliding_window_size=1023)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ka.extend_attention_fwd(**c, custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=max_len,
                                k_scale=1.0, v_scale=1.0, sliding_window_size=1023)
    c["o_extend"].fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(c["o_extend"], want)


def test_sglang_call_routes_to_kernel():
    """What sglang's triton backend passes for Gemma4 (scale 1.0, descale 1.0, logit cap 0) is taken;
    a custom mask (speculative verify) is not."""
    from sglang_gemma4_opt.kernels import extend_attention as ka
    from sglang_gemma4_opt.patches import extend_attention_kernel as pk

    names, extra = pk.signature_info(_stock())
    case = ka.random_case([10], [20], 16, 8, 256, device="cuda")
    c = dict(case)
    max_len = c.pop("max_len")
    call = dict(c, custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=max_len, k_scale=1.0,
                v_scale=1.0, sm_scale=1.0, logit_cap=0.0, sliding_window_size=1023, sinks=None,
                window_kv_offsets=None, xai_temperature_len=-1)
    assert pk.route(call, extra) is None
    call["custom_mask"] = torch.ones(20 * 30, dtype=torch.uint8, device="cuda")
    assert pk.route(call, extra) == "custom mask"
