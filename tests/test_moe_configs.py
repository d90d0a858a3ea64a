"""MoE config lookup: the plugin's tables first, sglang's lookup otherwise, faked device names."""

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import triton

from _subproc import is_hooked
from sglang_gemma4_opt.patches import moe_configs as mc

VDIR = mc.version_dir(triton.__version__)
H200 = "NVIDIA H200"


@pytest.fixture
def cfg(monkeypatch):
    mod = mc.import_first(mc.MODULE)
    state = SimpleNamespace(deterministic=False)
    if hasattr(mod, "get_global_server_args"):
        monkeypatch.setattr(mod, "get_global_server_args",
                            lambda: SimpleNamespace(enable_deterministic_inference=state.deterministic))
    else:
        monkeypatch.setattr(mod, "get_exec", lambda: SimpleNamespace(
            deterministic=SimpleNamespace(enable_deterministic_inference=state.deterministic)))
    monkeypatch.delenv("SGLANG_MOE_CONFIG_DIR", raising=False)
    original = mod.get_moe_configs
    while hasattr(original, "__wrapped__") and not hasattr(original, "cache_info"):
        original = original.__wrapped__  # sglang's own lru_cached function, hooked or not
    original.cache_clear()
    state.mod, state.original, state.hook = mod, original, mc.make_hook(mod)

    def device(name):
        monkeypatch.setattr(mod, "get_device_name", lambda *a, **k: name)
        original.cache_clear()
        state.hook.cache_clear()

    state.device = device
    state.lookup = lambda *a, **k: state.hook(original, *a, **k)
    yield state
    original.cache_clear()


def ours(name, down=False):
    f = mc.CONFIG_ROOT / VDIR / f"E=128,N=704,device_name={name.replace(' ', '_')}{'_down' if down else ''}.json"
    return {int(k): v for k, v in json.loads(f.read_text()).items()} if f.exists() else None


@pytest.mark.parametrize("down", [False, True])
def test_h200_finds_the_plugin_table(cfg, down):
    cfg.device(H200)
    got = cfg.lookup(128, 704, None, 0, 0, per_channel_quant=False, down_moe=down)
    assert got == ours(H200, down) and got is not None
    assert set(got) >= {1, 256, 1024}


@pytest.mark.parametrize("name", [H200, "NVIDIA H100 80GB HBM3"])
@pytest.mark.parametrize("N", [704, 352])  # TP=1 and TP=2 (each TP rank looks up its own N)
def test_every_shipped_gpu_and_tp_shape_is_found_and_logged_with_the_pid(cfg, name, N, caplog):
    import os

    cfg.device(name)
    for down in (False, True):
        f = mc.CONFIG_ROOT / VDIR / f"E=128,N={N},device_name={name.replace(' ', '_')}{'_down' if down else ''}.json"
        assert f.exists(), f.name
        with caplog.at_level(logging.INFO, logger="sglang_gemma4_opt"):
            got = cfg.lookup(128, N, None, 0, 0, per_channel_quant=False, down_moe=down)
        assert got == {int(k): v for k, v in json.loads(f.read_text()).items()}
        assert f"Using MoE kernel config from {f} (sglang-gemma4-opt, pid {os.getpid()})." in caplog.text


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA B200", "AMD Instinct MI300X"])
def test_other_devices_fall_through_to_sglang(cfg, name):
    cfg.device(name)
    if any((d / f"E=128,N=704,device_name={name.replace(' ', '_')}.json").exists() for d in mc.CONFIG_ROOT.iterdir()):
        pytest.skip("the plugin ships a table for this device")
    want = cfg.original(128, 704, None, 0, 0, False, False)
    cfg.original.cache_clear()
    got = cfg.lookup(128, 704, None, 0, 0, False, False)
    assert got == want
    if name.startswith("NVIDIA H100"):
        assert got is not None  # sglang's own triton_3_5_1 fallback table, untouched


def test_deterministic_mode_returns_no_config(cfg, caplog):
    cfg.device(H200)
    cfg.deterministic = True
    with caplog.at_level(logging.WARNING):
        assert cfg.lookup(128, 704, None) is None
    assert "Deterministic inference is enabled" in caplog.text


def test_corrupt_plugin_json_warns_and_falls_back(cfg, monkeypatch, tmp_path, caplog):
    root = tmp_path / "configs"
    shutil.copytree(mc.CONFIG_ROOT, root)
    (root / VDIR / "E=128,N=704,device_name=NVIDIA_H200.json").write_text('{"1": {"BLOCK_SIZE_M": 16,')
    monkeypatch.setattr(mc, "CONFIG_ROOT", root)
    cfg.device(H200)
    want = cfg.original(128, 704, None, 0, 0, False, False)
    cfg.original.cache_clear()
    with caplog.at_level(logging.WARNING):
        got = cfg.lookup(128, 704, None, 0, 0, False, False)
    assert got == want
    assert "cannot use MoE config" in caplog.text


def test_user_config_dir_wins(cfg, monkeypatch, tmp_path):
    d = tmp_path / "configs" / VDIR
    d.mkdir(parents=True)
    table = {"7": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}}
    (d / "E=128,N=704,device_name=NVIDIA_H200.json").write_text(json.dumps(table))
    monkeypatch.setenv("SGLANG_MOE_CONFIG_DIR", str(tmp_path))
    cfg.device(H200)
    assert cfg.lookup(128, 704, None) == {7: table["7"]}


def test_plugin_table_of_another_triton_version_serves_with_warning(cfg, monkeypatch, tmp_path, caplog):
    root = tmp_path / "configs"
    (root / "triton_3_0_0").mkdir(parents=True)
    table = {"3": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}}
    (root / "triton_3_0_0" / "E=128,N=704,device_name=NVIDIA_FAKE_GPU.json").write_text(json.dumps(table))
    monkeypatch.setattr(mc, "CONFIG_ROOT", root)
    cfg.device("NVIDIA FAKE GPU")
    with caplog.at_level(logging.WARNING):
        assert cfg.lookup(128, 704, None) == {3: table["3"]}
    assert "Fallback to triton version 3.0.0" in caplog.text


def test_sglang_newer_other_version_beats_older_plugin_file(cfg, monkeypatch, tmp_path):
    """H100: sglang has triton_3_5_1; a plugin file for triton 3.0.0 must not shadow it."""
    root = tmp_path / "configs"
    (root / "triton_3_0_0").mkdir(parents=True)
    (root / "triton_3_0_0" / "E=128,N=704,device_name=NVIDIA_H100_80GB_HBM3.json").write_text(
        json.dumps({"5": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}}))
    monkeypatch.setattr(mc, "CONFIG_ROOT", root)
    cfg.device("NVIDIA H100 80GB HBM3")
    want = cfg.original(128, 704, None, 0, 0, False, False)
    cfg.original.cache_clear()
    got = cfg.lookup(128, 704, None, 0, 0, False, False)
    assert got == want and 5 not in got


def test_lookups_are_cached(cfg, monkeypatch):
    cfg.device(H200)
    reads = []
    real = mc.load_table
    monkeypatch.setattr(mc, "load_table", lambda p: reads.append(p) or real(p))
    a = cfg.lookup(128, 704, None, 0, 0, False, False)
    b = cfg.lookup(128, 704, None, block_n=0, block_k=0)  # same call, other spelling
    assert a is b and len(reads) == 1


def test_installed_lookup(sglang_version):
    """Through sglang's own function after apply(): the plugin's tables are found, or sglang already has them."""
    import sglang_gemma4_opt

    res = sglang_gemma4_opt.apply()["moe_configs"]
    mod = mc.import_first(mc.MODULE)
    theirs = Path(mod.__file__).parent / "configs" / VDIR
    ours = mc.shipped_files(VDIR)
    upstream = all((theirs / f.name).exists() and json.loads(f.read_text()) == json.loads((theirs / f.name).read_text())
                   for f in ours)
    if upstream:
        assert res.status == "already upstream" and not is_hooked(mod.get_moe_configs)
    else:
        assert res.status == "applied" and is_hooked(mod.get_moe_configs)


def test_every_shipped_table_is_valid_sglang_format():
    files = sorted(mc.CONFIG_ROOT.glob("triton_*/*.json"))
    assert files
    for f in files:
        assert f.name.startswith("E=") and ",N=" in f.name and "device_name=" in f.name
        table = mc.load_table(f)
        for cfg in table.values():
            assert set(cfg) <= {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps",
                                "num_stages", "USE_TMA"}
            for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
                assert cfg[key] & (cfg[key] - 1) == 0  # powers of two
        if "_down" in f.name:  # sglang asserts equal BLOCK_SIZE_M between up and down tables
            up = mc.load_table(f.with_name(f.name.replace("_down", "")))
            assert set(up) == set(table)
            assert all(up[m]["BLOCK_SIZE_M"] == table[m]["BLOCK_SIZE_M"] for m in up)
