"""prefill_warmup: which token counts and attention shapes it compiles, that it calls sglang's own MoE entry
point with them, and that it never changes what the wrapped start-up step returns or lets an error out."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from sglang_gemma4_opt import warmup
from sglang_gemma4_opt.patches import prefill_warmup as pw


def test_token_counts_cover_the_tables_odd_and_even_up_to_the_prefill_size():
    got = warmup.moe_token_counts(8192, grouped_ms=[2048, 4096, 8192, 16384, 65536])
    assert got[0] == 3 and got[-1] == 8192
    for m in (4, 5, 8, 9, 1024, 1025, 1536, 1537, 2048, 2049, 3072, 4096, 8192):
        assert m in got
    assert 8193 not in got and 16384 not in got and 2 not in got  # M <= 2 compiles at decode-graph capture
    assert warmup.moe_token_counts(5000)[-3:] == [4096, 4097, 5000]
    assert len(got) == len(set(got)) and got == sorted(got)


class _Args:
    def __init__(self, chunked=None, max_prefill=None):
        self.chunked_prefill_size, self.max_prefill_tokens = chunked, max_prefill


@pytest.mark.parametrize("chunked,max_prefill,want", [(8192, 16384, 8192), (-1, 4096, 4096), (None, 65536, 16384),
                                                      (None, None, warmup.DEFAULT_MAX_TOKENS)])
def test_max_prefill_tokens(chunked, max_prefill, want):
    assert warmup.max_prefill_tokens(_Args(chunked, max_prefill)) == want


class _Moe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w13_weight = torch.nn.Parameter(torch.randn(4, 2 * 16, 32, dtype=torch.bfloat16), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.randn(4, 32, 16, dtype=torch.bfloat16), requires_grad=False)
        self.moe_runner_config = types.SimpleNamespace(top_k=2)
        self.top_k = 2


class _Attn(torch.nn.Module):
    def __init__(self, hkv, d, window):
        super().__init__()
        self.tp_q_head_num, self.tp_k_head_num, self.qk_head_dim, self.v_head_dim = 16, hkv, d, d
        self.sliding_window_size, self.scaling, self.logit_cap = window, 1.0, 0.0


def _model():
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList([_Attn(8, 256, 1024), _Attn(8, 256, 1024), _Attn(2, 512, -1), _Moe(), _Moe()])
    return m


def test_finds_the_first_moe_layer_and_each_attention_shape_once():
    model = _model()
    assert warmup.find_moe_layer(model) is model.layers[3]
    shapes = warmup.attention_shapes(model)
    assert [(s["hkv"], s["d"], s["window"]) for s in shapes] == [(8, 256, 1024), (2, 512, -1)]
    assert warmup.find_moe_layer(torch.nn.Linear(2, 2)) is None


def test_warm_moe_calls_sglangs_fused_experts_at_each_count(monkeypatch):
    fm = pytest.importorskip("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe")
    calls = []

    def fake(x, w1, w2, topk_output, cfg):
        calls.append((tuple(x.shape), x.dtype, tuple(topk_output.topk_ids.shape), topk_output.topk_ids.dtype,
                      topk_output.topk_weights.dtype, int(topk_output.topk_ids.max()), cfg))
        assert len(set(topk_output.topk_ids[0].tolist())) == 2  # distinct experts per token, as a router gives
        return x

    monkeypatch.setattr(fm, "fused_experts", fake)
    layer = _Moe()
    assert warmup.warm_moe(layer, [3, 8, 9], 2) == 3
    assert [c[0] for c in calls] == [(3, 32), (8, 32), (9, 32)]
    assert all(c[1] == torch.bfloat16 and c[3] == torch.int32 and c[4] == torch.float32 and c[5] < 4
               and c[6] is layer.moe_runner_config for c in calls)


def _runner(device="cuda", draft=False):
    return types.SimpleNamespace(device=device, is_draft_worker=draft, model=_model(), server_args=_Args(8192))


def test_hook_returns_what_sglang_returned_and_skips_off_cuda(caplog):
    caplog.set_level(logging.INFO, logger="sglang_gemma4_opt")
    seen = []

    def original(self, *a, **kw):
        seen.append((self, a, kw))
        return "graphs"

    r = _runner(device="cpu")
    assert pw.hook(original, r, 1, x=2) == "graphs"
    assert seen == [(r, (1,), {"x": 2})]
    assert "prefill warm-up skipped (device 'cpu')" in caplog.text
    assert pw.skip_reason(_runner(draft=True)) == "draft worker"


def test_an_error_in_the_warm_up_is_one_warning_and_the_start_goes_on(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sglang_gemma4_opt")
    monkeypatch.setattr(pw, "skip_reason", lambda r: None)

    def boom(r):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(warmup, "warm_up", boom)
    assert pw.hook(lambda self: 7, _runner()) == 7
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "prefill warm-up stopped (RuntimeError: compile failed)" in warn[0].getMessage()


def test_skip_when_no_kernel_patch_applied(monkeypatch):
    from sglang_gemma4_opt import core

    monkeypatch.setattr(pw, "results", lambda: {"qkv_rmsnorm": core.PatchResult("qkv_rmsnorm", core.APPLIED)})
    assert pw.skip_reason(_runner()).startswith("none of moe_configs")
    monkeypatch.setattr(pw, "results", lambda: {"moe_configs": core.PatchResult("moe_configs", core.APPLIED)})
    assert pw.skip_reason(_runner()) is None
    monkeypatch.setattr(pw, "sglang_deterministic", lambda: True)
    assert pw.skip_reason(_runner()) == "deterministic inference"


def test_prepare_targets_the_runners_graph_step_where_sglang_has_it():
    mr = pytest.importorskip("sglang.srt.model_executor.model_runner")
    from sglang_gemma4_opt.core import NotApplicable

    if "init_device_graphs" in mr.ModelRunner.__dict__:
        (spec,) = pw.prepare()
        assert spec.target == "sglang.srt.model_executor.model_runner.ModelRunner.init_device_graphs"
        assert spec.kind == "around"
    else:
        with pytest.raises(NotApplicable):
            pw.prepare()
