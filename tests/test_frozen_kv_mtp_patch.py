"""frozen_kv_mtp_finished_batch: why stock sglang 0.5.12 crashes under MTP load (a verify input left on a decode
batch whose requests all finished cannot be merged), and that the patch leaves an idle draft input that can."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import pytest
import torch

info = pytest.importorskip("sglang.srt.speculative.frozen_kv_mtp_info")
from sglang_gemma4_opt.core import AlreadyUpstream, NotApplicable  # noqa: E402
from sglang_gemma4_opt.patches import frozen_kv_mtp_finished_batch as pf  # noqa: E402

# The hook runs where sglang has the v1 worker (0.5.11/0.5.12; its module needs sgl_kernel to import, so the
# file's presence is the test). Newer sglang builds draft inputs from its runtime config, outside a server.
has_v1_worker = pytest.mark.skipif(importlib.util.find_spec(pf.MODULE) is None,
                                   reason="this sglang has no v1 Frozen-KV MTP worker (the patch is not applicable)")


class _Mode:
    def __init__(self, extend: bool):
        self._extend = extend

    def is_extend(self):
        return self._extend


def _batch(spec, extend=False):
    return types.SimpleNamespace(forward_mode=_Mode(extend), is_extend_in_batch=False, spec_info=spec)


def _worker(hidden=16):
    return types.SimpleNamespace(device="cpu", _recurrent_hidden_size=hidden, topk=1,
                                 model_config=types.SimpleNamespace(dtype=torch.bfloat16))


def _verify_input():
    return object.__new__(info.FrozenKVMTPVerifyInput)  # isinstance is all the patch looks at


def _draft(rows, hidden=16, g=None):
    return info.FrozenKVMTPDraftInput(
        topk_p=torch.rand(rows, 1, generator=g), topk_index=torch.randint(0, 100, (rows, 1), generator=g),
        hidden_states=torch.randn(rows, hidden, generator=g).to(torch.bfloat16),
        bonus_tokens=torch.randint(0, 100, (rows,), generator=g, dtype=torch.int32))


@has_v1_worker
def test_a_verify_input_has_no_merge_batch_the_crash_stock_sglang_shows():
    # ScheduleBatch.merge_batch calls self.spec_info.merge_batch(other.spec_info): a verify input left on the
    # running batch raises AttributeError there (and filter_batch would too); a draft input has both.
    assert not hasattr(info.FrozenKVMTPVerifyInput, "merge_batch")
    assert not hasattr(info.FrozenKVMTPVerifyInput, "filter_batch")
    assert hasattr(info.FrozenKVMTPDraftInput, "merge_batch") and hasattr(info.FrozenKVMTPDraftInput, "filter_batch")


@has_v1_worker
def test_hook_swaps_a_left_verify_input_for_an_idle_draft_that_merges():
    batch = _batch(_verify_input())
    calls = []

    def original(self, b, *a, **kw):
        calls.append((self, b, a, kw))
        return "step result"

    w = _worker()
    assert pf.hook(original, w, batch, 1, k=2) == "step result"
    assert calls == [(w, batch, (1,), {"k": 2})]
    idle = batch.spec_info
    assert isinstance(idle, info.FrozenKVMTPDraftInput)
    assert idle.topk_index.shape[0] == 0 and idle.hidden_states.shape == (0, 16)
    # the scheduler then merges the next prefill's draft input into it: it becomes that input
    g = torch.Generator().manual_seed(1)
    other = _draft(3, g=g)
    idle.merge_batch(other)
    assert torch.equal(idle.topk_index, other.topk_index) and torch.equal(idle.hidden_states, other.hidden_states)
    assert torch.equal(idle.bonus_tokens, other.bonus_tokens)


@has_v1_worker
@pytest.mark.parametrize("case", ["extend", "draft"])
def test_hook_leaves_other_batches_alone(case):
    spec = _verify_input() if case == "extend" else _draft(2)
    batch = _batch(spec, extend=case == "extend")
    assert pf.hook(lambda self, b: 5, _worker(), batch) == 5
    assert batch.spec_info is spec


@has_v1_worker
def test_a_failure_is_logged_once_and_leaves_sglangs_batch(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sglang_gemma4_opt")
    monkeypatch.setattr(pf, "_failed_logged", False)
    monkeypatch.setattr(pf, "idle_draft_input", lambda w: (_ for _ in ()).throw(RuntimeError("no device")))
    for _ in range(2):
        spec = _verify_input()
        batch = _batch(spec)
        assert pf.hook(lambda self, b: "r", _worker(), batch) == "r"
        assert batch.spec_info is spec
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "RuntimeError: no device" in warn[0].getMessage()


def _fake_worker_module(monkeypatch, body: str):
    mod = types.ModuleType(pf.MODULE)
    exec(f"class FrozenKVMTPWorker:\n    def forward_batch_generation(self, batch):\n        {body}\n", mod.__dict__)
    monkeypatch.setitem(sys.modules, pf.MODULE, mod)
    return mod


def test_prepare_hooks_the_worker_step_and_stands_aside_when_upstream_has_the_branch(monkeypatch, tmp_path):
    _fake_worker_module(monkeypatch, "return batch")
    (spec,) = pf.prepare()
    assert spec.target == f"{pf.MODULE}.FrozenKVMTPWorker.forward_batch_generation" and spec.kind == "around"
    # a worker whose step builds the idle input itself: already upstream (source read from a real file)
    src = tmp_path / "fixed_worker.py"
    src.write_text("class FrozenKVMTPWorker:\n    def forward_batch_generation(self, batch):\n"
                   "        batch.spec_info = FrozenKVMTPDraftInput.create_idle_input()\n")
    mod = types.ModuleType(pf.MODULE)
    mod.__file__ = str(src)
    exec(compile(src.read_text(), str(src), "exec"), mod.__dict__)
    monkeypatch.setitem(sys.modules, pf.MODULE, mod)
    with pytest.raises(AlreadyUpstream):
        pf.prepare()


def test_prepare_without_the_v1_worker_is_not_applicable(monkeypatch):
    monkeypatch.setitem(sys.modules, pf.MODULE, None)  # import raises ImportError
    with pytest.raises(NotApplicable):
        pf.prepare()
