"""`python -m sglang_gemma4_opt.bench.tune_extend_attention --config HD:BM,BN,W,S,TMA,DV`: extra launch
shapes from the command line (the next head-dim-512 candidates are swept without editing the module)."""

import argparse

import pytest

from sglang_gemma4_opt.bench import tune_extend_attention as te


def test_parse_config():
    assert te.parse_config("512:128,64,8,1,0,2") == (512, (128, 64, 8, 1, False, 2))
    assert te.parse_config("256:64,32,4,3,1,1") == (256, (64, 32, 4, 3, True, 1))


@pytest.mark.parametrize("bad", ["512:128,64,8,1,0", "128:64,32,4,2,1,1", "512:128,64,8,1,2,2",
                                 "512:128,64,0,1,0,2", "512-128,64,8,1,0,2", "512:a,64,8,1,0,2"])
def test_parse_config_rejects(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        te.parse_config(bad)


def test_configs_match_the_kernel_launcher():
    """Every default sweep entry has the tuple layout the parser produces."""
    for hd, cfgs in te.CONFIGS.items():
        for c in cfgs:
            assert len(c) == 6 and isinstance(c[4], bool)
            assert te.parse_config(f"{hd}:{c[0]},{c[1]},{c[2]},{c[3]},{int(c[4])},{c[5]}") == (hd, c)


def test_shared_softmax_variants_only_without_prefix():
    """The Gluon head-dim-512 kernel is swept on fresh-prefill shapes only (it does not take prefix keys)."""
    from sglang_gemma4_opt.kernels.extend_attention import SharedSoftmax

    for name, (hd, _, _, _, prefix, _) in te.SHAPES.items():
        ss = [cfg for _, kind, cfg in te._variants(hd, any(prefix)) if isinstance(cfg, SharedSoftmax)]
        want = [SharedSoftmax(bn) for bn in te.SHARED_SOFTMAX_BNS] if hd == 512 and not any(prefix) else []
        assert ss == want, name
    assert te._config_json(SharedSoftmax(64)) == ["shared_softmax", 64]
    assert te._config_json((128, 32, 8, 2, False, 2)) == [128, 32, 8, 2, False, 2]
