"""Extend attention with the plugin's block sizes equals sglang's stock blocks bit for bit, and both are
close to a float32 torch reference.

Tolerance: bf16 inputs, the kernel rounds P to bf16 before PV and the output to bf16; outputs are
averages of unit-normal values. Relative Frobenius error <= 1e-2 and max abs error <= 2e-2 against
float32 arithmetic on the same bf16 inputs (bf16 operands land between 1e-3 and 1e-2).
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

pytestmark = pytest.mark.gpu

REL_TOL = 1e-2
ABS_TOL = 2e-2


def _module():
    from sglang_gemma4_opt.bench.extend_attention import module

    return module()


def _reference(q, k_all, v_all, seqs, window, sm_scale, kv_group):
    """float32 attention per sequence. seqs: [(q_start, n_new, prefix_positions_in_k_all, new_in_k_all)]"""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for q0, n, kv_rows in seqs:
        qs = q[q0:q0 + n].float()  # (n, H, d)
        ks = k_all[kv_rows].float().repeat_interleave(kv_group, dim=1)  # (P+n, H, d)
        vs = v_all[kv_rows].float().repeat_interleave(kv_group, dim=1)
        P = len(kv_rows) - n
        qpos = torch.arange(P, P + n, device=q.device)[:, None]
        kpos = torch.arange(0, P + n, device=q.device)[None, :]
        allowed = kpos <= qpos
        if window:
            allowed &= (qpos - kpos) <= (window - 1)  # `window` keys per query, its own included
        s = torch.einsum("nhd,khd->hnk", qs, ks) * sm_scale
        s = s.masked_fill(~allowed[None], float("-inf"))
        out[q0:q0 + n] = torch.einsum("hnk,khd->nhd", torch.softmax(s, dim=-1), vs)
    return out


def _case(prefix_lens, extend_lens, q_heads, kv_heads, hd):
    """Inputs laid out as sglang's triton backend has them: the KV pool holds every token (prefix and
    new) at scattered slots; kv_indices lists each request's prefix slots; k/v_extend the new tokens."""
    dev, dt = "cuda", torch.bfloat16
    B = len(extend_lens)
    total_new = sum(extend_lens)
    pool = sum(prefix_lens) + total_new + 17
    k_buf = torch.randn(pool, kv_heads, hd, device=dev, dtype=dt)
    v_buf = torch.randn(pool, kv_heads, hd, device=dev, dtype=dt)
    slots = torch.randperm(pool, device=dev)
    q = torch.randn(total_new, q_heads, hd, device=dev, dtype=dt)
    k_ext = torch.empty(total_new, kv_heads, hd, device=dev, dtype=dt)
    v_ext = torch.empty_like(k_ext)
    kv_indices, seqs = [], []
    qo, kv = [0], [0]
    s_ptr, q_ptr = 0, 0
    for P, n in zip(prefix_lens, extend_lens):
        pre = slots[s_ptr:s_ptr + P]
        new = slots[s_ptr + P:s_ptr + P + n]
        s_ptr += P + n
        k_ext[q_ptr:q_ptr + n] = k_buf[new]
        v_ext[q_ptr:q_ptr + n] = v_buf[new]
        kv_indices.append(pre)
        seqs.append((q_ptr, n, torch.cat([pre, new])))
        q_ptr += n
        qo.append(q_ptr)
        kv.append(kv[-1] + P)
    tensors = dict(
        q=q, k_ext=k_ext, v_ext=v_ext, k_buf=k_buf, v_buf=v_buf,
        qo_indptr=torch.tensor(qo, device=dev, dtype=torch.int32),
        kv_indptr=torch.tensor(kv, device=dev, dtype=torch.int32),
        kv_indices=torch.cat(kv_indices).to(torch.int64) if kv_indices else torch.empty(0, device=dev, dtype=torch.int64),
        max_len=max(extend_lens),
    )
    assert B == len(prefix_lens)
    return tensors, seqs


def _run(mod, t, window, sm_scale):
    o = torch.full_like(t["q"], float("nan"))  # poisoned: every element must be written
    # sglang's own function (the extend_attention_kernel patch, when applied, wraps it): these tests
    # are about the block sizes sglang's kernel runs with
    fwd = getattr(mod.extend_attention_fwd, "__wrapped__", mod.extend_attention_fwd)
    fwd(
        t["q"], t["k_ext"], t["v_ext"], o, t["k_buf"], t["v_buf"], t["qo_indptr"], t["kv_indptr"], t["kv_indices"],
        None, True, None, t["max_len"], 1.0, 1.0, sm_scale, logit_cap=0.0,
        sliding_window_size=(window - 1) if window else -1)
    return o


CASES = [
    # (head dim, q heads, kv heads, window, prefix lengths, extend lengths)
    pytest.param(256, 16, 8, 1024, (0, 0), (1500, 700), id="hd256-w1024-prefill-1500-700"),
    pytest.param(256, 16, 8, 1024, (0,) * 3, (129, 64, 1), id="hd256-w1024-short"),
    pytest.param(256, 16, 8, 1024, (600, 0), (900, 200), id="hd256-w1024-with-prefix"),
    pytest.param(512, 16, 2, None, (0, 0), (300, 129), id="hd512-full-prefill"),
    pytest.param(512, 16, 2, None, (200,), (150,), id="hd512-full-with-prefix"),
]


def test_blocks_differ_only_where_the_patch_says(sbs):
    assert sbs.applied("extend_blocks"), sbs.status("extend_blocks")
    mod = _module()
    with sbs.use("extend_blocks", "plugin"):
        p256 = mod._get_block_sizes_for_extend_attention(256, 256)
        p512 = mod._get_block_sizes_for_extend_attention(512, 512)
    with sbs.use("extend_blocks", "stock"):
        s256 = mod._get_block_sizes_for_extend_attention(256, 256)
        s512 = mod._get_block_sizes_for_extend_attention(512, 512)
    if torch.cuda.get_device_capability()[0] == 9:
        assert tuple(p256[3:5]) == (64, 64)
        assert p256[4] == s256[4], "BLOCK_N (the KV accumulation order) must stay sglang's"
    assert p512 == s512, "head dim 512 is outside the patch"
    assert p256[:3] == s256[:3] and p256[5] == s256[5]


@pytest.mark.parametrize("hd,qh,kvh,window,prefix,extend", CASES)
def test_plugin_equals_stock_and_reference(sbs, hd, qh, kvh, window, prefix, extend):
    mod = _module()
    t, seqs = _case(prefix, extend, qh, kvh, hd)
    sm_scale = hd ** -0.5
    with sbs.use("extend_blocks", "stock"):
        o_s = _run(mod, t, window, sm_scale)
    with sbs.use("extend_blocks", "plugin"):
        o_p = _run(mod, t, window, sm_scale)
    torch.cuda.synchronize()
    assert torch.isfinite(o_s).all() and torch.isfinite(o_p).all(), "an output element was not written"
    assert torch.equal(o_s, o_p), f"max |d| {(o_s.float() - o_p.float()).abs().max().item()}"
    ref = _reference(t["q"], t["k_buf"], t["v_buf"], seqs, window, sm_scale, qh // kvh)
    err = (o_p.float() - ref)
    rel = (err.norm() / ref.norm()).item()
    assert rel <= REL_TOL, rel
    assert err.abs().max().item() <= ABS_TOL, err.abs().max().item()


def test_window_matters(sbs):
    """The reference's window handling is live: a 2000-token sequence differs with and without it."""
    mod = _module()
    t, seqs = _case((0,), (2000,), 16, 8, 256)
    with sbs.use("extend_blocks", "plugin"):
        o_w = _run(mod, t, 1024, 256 ** -0.5)
        o_f = _run(mod, t, None, 256 ** -0.5)
    torch.cuda.synchronize()
    inside = (o_w[:1024].float() - o_f[:1024].float()).abs().max().item()
    outside = (o_w[1100:].float() - o_f[1100:].float()).abs().max().item()
    assert inside <= 1e-2, "queries that see fewer than 1024 keys must not change"
    assert outside > 5e-2, "queries past the window must change"
