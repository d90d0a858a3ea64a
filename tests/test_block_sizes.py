"""Extend-attention block sizes: (64, 64) only on sm 9.x for head dims 129-256, sglang's answer elsewhere."""

import pytest

from _subproc import is_hooked
from sglang_gemma4_opt.patches import extend_attention_blocks as eab

CAPS = [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)]
HEAD_DIMS = [64, 128, 192, 256, 288, 512, 576]


@pytest.fixture
def module():
    return eab.import_first(*eab.MODULES)


def _lv(lq):
    return 512 if lq == 576 else lq


def _hooked(module):
    hook = eab.make_hook(module)
    orig = module._get_block_sizes_for_extend_attention
    orig = getattr(orig, "__wrapped__", orig)  # sglang's own function, hooked or not
    return orig, (lambda lq, lv: hook(orig, lq, lv))


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("lq", HEAD_DIMS)
def test_block_sizes(module, monkeypatch, cap, lq):
    monkeypatch.setattr(module, "_is_cuda", True)
    monkeypatch.setattr(module, "_is_hip", False)
    monkeypatch.setattr(module, "CUDA_CAPABILITY", cap, raising=False)
    stock, patched = _hooked(module)
    want = stock(lq, _lv(lq))
    got = patched(lq, _lv(lq))
    if cap[0] == 9 and 129 <= lq <= 256:
        assert got[3:5] == (64, 64)
        assert got[:3] == want[:3] and got[5] == want[5]  # dmodel, dpe, dv, num_warps unchanged
    else:
        assert got == want


def test_hip_and_no_gpu_unchanged(module, monkeypatch):
    stock, patched = _hooked(module)
    monkeypatch.setattr(module, "_is_cuda", False)
    assert patched(256, 256) == stock(256, 256)
    monkeypatch.setattr(module, "_is_hip", True)
    monkeypatch.setattr(module, "CUDA_CAPABILITY", (9, 0), raising=False)
    assert patched(256, 256) == stock(256, 256)


def test_patch_installed_matches_hook(module, monkeypatch, sglang_version):
    """After apply(), the function sglang calls is the hooked one on 0.5.12 and stock upstream."""
    import sglang_gemma4_opt

    res = sglang_gemma4_opt.apply()["extend_attention_blocks"]
    monkeypatch.setattr(module, "_is_cuda", True)
    monkeypatch.setattr(module, "_is_hip", False)
    monkeypatch.setattr(module, "CUDA_CAPABILITY", (9, 0), raising=False)
    got = module._get_block_sizes_for_extend_attention(256, 256)
    assert got[3:5] == (64, 64)
    if sglang_version >= (0, 5, 13):
        assert res.status == "already upstream"
        assert not is_hooked(module._get_block_sizes_for_extend_attention)
    else:
        assert res.status == "applied"
        assert is_hooked(module._get_block_sizes_for_extend_attention)
    # the probe used for upstream detection restored the module's device globals
    assert module._is_cuda is True and module.CUDA_CAPABILITY == (9, 0)


def test_probe_restores_globals(module):
    before = {k: module.__dict__.get(k, "absent") for k in ("_is_cuda", "_is_hip", "CUDA_CAPABILITY")}
    eab._probe(module, getattr(module._get_block_sizes_for_extend_attention, "__wrapped__",
                               module._get_block_sizes_for_extend_attention), 256)
    after = {k: module.__dict__.get(k, "absent") for k in ("_is_cuda", "_is_hip", "CUDA_CAPABILITY")}
    assert before == after
