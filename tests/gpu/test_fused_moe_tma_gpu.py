"""The down projection's TMA path (`"USE_TMA": true` in a `_down` table), as sglang runs it and as
`tune-moe` times and checks it.

sglang (0.5.11+) pops USE_TMA from the down entry; when set, the up kernel stores its rows in
moe_align_block_size's sorted, block-padded order (c_sorted), the activation runs over those rows and
the down kernel reads them and w2 through TMA descriptors (a_use_tma, b_use_tma). These tests serve
tables with USE_TMA through sglang's own lookup, check that sglang took that path, and compare its
whole fused_experts output with a float32 gated-gelu MoE (relative Frobenius error <= 1e-2, as the
shipped-table test). Hopper only (TMA); skipped elsewhere.
"""

import importlib
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from _moe_reference import moe_reference  # noqa: E402  (tests/gpu/_moe_reference.py)

pytestmark = pytest.mark.gpu

K_HIDDEN = 2816
E = 128
TOPK = 8
REL_TOL = 1e-2
CFG_MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config"
FUSED_MOE_MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe"


def _tma_or_skip():
    from sglang_gemma4_opt.tools import tune_moe as tm

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    kmod = tm._import_first(tm.KERNEL_MODULES, "invoke_fused_moe_kernel")
    import inspect

    ok, why = tm.tma_support(kmod, inspect.signature(kmod.invoke_fused_moe_kernel).parameters)
    if not ok:
        pytest.skip(why)
    return tm


@pytest.fixture(scope="module")
def weights():
    cache = {}

    def get(N):
        if N not in cache:
            cache.clear()
            w13 = (torch.randn(E, 2 * N, K_HIDDEN, device="cuda") * K_HIDDEN ** -0.5).to(torch.bfloat16)
            w2 = (torch.randn(E, K_HIDDEN, N, device="cuda") * N ** -0.5).to(torch.bfloat16)
            cache[N] = (w13, w2)
        return cache[N]

    yield get
    cache.clear()


# (M, BLOCK_SIZE_M, N, K, GROUP_SIZE_M, num_warps, num_stages): decode and prefill tiles, BLOCK_K that
# does not divide N (704 = 5.5 x 128, 352 = 1.375 x 256: the TMA loads past the row end read zeros)
CASES = [(1, 16, 64, 64, 1, 4, 4), (7, 16, 64, 128, 1, 4, 3), (64, 16, 64, 256, 1, 4, 3),
         (512, 32, 64, 128, 32, 4, 3), (1024, 64, 128, 64, 1, 4, 3), (4096, 128, 128, 64, 1, 8, 3),
         (16384, 128, 256, 64, 16, 8, 3)]


@pytest.mark.parametrize("N", [704, 352])
@pytest.mark.parametrize("case", CASES, ids=[f"M{c[0]}-BM{c[1]}-BN{c[2]}-BK{c[3]}" for c in CASES])
def test_fused_experts_with_a_tma_down_entry_matches_fp32(monkeypatch, weights, N, case):
    tm = _tma_or_skip()
    from sglang_gemma4_opt.bench import fused_moe as bm
    from sglang_gemma4_opt.bench.common import ensure_server_args

    ensure_server_args()
    M, bmk, bn, bk, g, w, s = case
    up = tm.make_cfg(bmk, bn, bk, g, w, s)
    down = tm.make_cfg(bmk, bn, bk, 1, w, s, tma=True)
    cfg_mod = importlib.import_module(CFG_MODULE)
    monkeypatch.setattr(cfg_mod, "get_moe_configs", lambda E_, N_, dtype, block_n=0, block_k=0,
                        per_channel_quant=False, down_moe=False: {M: dict(down if down_moe else up)})
    fm = importlib.import_module(FUSED_MOE_MODULE)
    calls = []
    real = fm.invoke_fused_moe_kernel

    def spy(*a, **k):
        config = k.get("config", a[14] if len(a) > 14 else {})  # positional in _fused_moe_kernel_sequence
        calls.append(dict({n: k.get(n, False) for n in ("a_use_tma", "b_use_tma", "c_sorted")},
                          USE_TMA_left="USE_TMA" in config))
        return real(*a, **k)

    monkeypatch.setattr(fm, "invoke_fused_moe_kernel", spy)
    w13, w2 = weights(N)
    x = torch.randn(M, K_HIDDEN, device="cuda", dtype=torch.bfloat16)
    tw, ids = bm.random_routing(M, E, TOPK)
    from sglang_gemma4_opt.patches.moe_small_batch import stock_path

    with stock_path():  # sglang's kernels even at the sizes the plugin's small-batch path takes
        out = bm.fused_experts_fn()(x, w13, w2, bm.topk_output(tw, ids), bm.runner_config(E, N, K_HIDDEN, TOPK))
    torch.cuda.synchronize()
    # sglang took the TMA path: sorted up store, TMA down
    assert calls == [{"a_use_tma": False, "b_use_tma": False, "c_sorted": True, "USE_TMA_left": False},
                     {"a_use_tma": True, "b_use_tma": True, "c_sorted": False, "USE_TMA_left": False}], calls
    assert torch.isfinite(out).all()
    ref = moe_reference(x, w13, w2, tw, ids)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel <= REL_TOL, f"relative error {rel:.2e} with up {up}, down {down}"


@pytest.mark.parametrize("M", [1, 256, 4096])
def test_tuner_backend_runs_and_checks_the_tma_path(M):
    """The tuner's own TMA code: the down kernel on sorted, padded input, the whole-MoE pair check and
    the whole-MoE timing with a TMA pair."""
    tm = _tma_or_skip()
    from sglang_gemma4_opt.bench.common import ensure_server_args

    ensure_server_args()
    p = tm.Problem(E=E, N=704, K=K_HIDDEN, topk=TOPK, dtype=None, device=torch.cuda.get_device_name())
    be = tm.KernelBackend(p, compile_workers=4)
    assert be.supports_tma, be.tma_why_not
    bmk = tm.block_m_range(M, TOPK, E)[0]
    up = tm.make_cfg(bmk, 64 if bmk < 64 else 128, 128 if bmk < 64 else 64, 1, 4, 3)
    down = tm.with_tma(up)
    assert be.check("down", M, down) < REL_TOL
    assert be.check("down", M, tm.with_tma(up, False)) < REL_TOL
    assert be.check_pair(M, up, down) < REL_TOL
    be.setup(M)
    t_tma = be.time("down", M, down)
    assert math.isfinite(t_tma) and t_tma > 0
    us = be.time_pipeline(M, [(up, tm.with_tma(up, False)), (up, down)])
    assert len(us) == 2 and all(math.isfinite(u) and u > 0 for u in us)
    with pytest.raises(ValueError, match="down-table option"):
        be.check("up", M, down)


def test_tune_small_shape_with_the_tma_stage(tmp_path):
    """A tiny real run with the TMA stage: TMA downs timed, whole-MoE re-ranking at M=64 (below
    --pipeline-from), both tables written, USE_TMA only in the down table."""
    tm = _tma_or_skip()
    from sglang_gemma4_opt.bench.common import ensure_server_args

    ensure_server_args()
    p = tm.Problem(E=16, N=128, K=256, topk=4, dtype=None, device="TEST GPU")
    base = {m: tm.make_cfg(16, 64, 64, 1, 4, 3) for m in (1, 64)}
    state = tm.State.new(tmp_path / "s.json", p, base, None, "test", [1, 64])
    be = tm.KernelBackend(p, compile_workers=4, pipeline_budget_s=0.02)
    t = tm.Tuner(state, be, out_dir=tmp_path, refine_rounds=0, reserve_s=0, tma_top=2)
    assert t.tma
    assert t.run([64])["left"] == []
    b = state.bucket(64)
    assert b["tma"]["status"] == "done" and b.get("pipeline")
    assert any(tm.key_uses_tma(k) and isinstance(v, float) for k, v in state.measured("down", 64).items())
    assert b["up_rel_err"] < REL_TOL and b["down_rel_err"] < REL_TOL
    up, down = tm.read_table(tmp_path / p.file_name()), tm.read_table(tmp_path / p.file_name(True))
    assert not any("USE_TMA" in e for e in up.values())
    assert all(up[m]["BLOCK_SIZE_M"] == down[m]["BLOCK_SIZE_M"] for m in up)
    if tm.key_uses_tma(b["down"]):
        assert down[64]["USE_TMA"] is True and b["moe_rel_err"] < REL_TOL
