"""The plugin's variables say what they do or why not: a misspelt patch name or switch value gets a warning
and shows in `status` (and fails `status --strict`); a broken kernel module or shipped table is a failure,
not "not applicable"."""

from __future__ import annotations

import json
import sys

import pytest
from _subproc import run_py

from sglang_gemma4_opt import settings
from sglang_gemma4_opt.core import FAILED, Broken
from sglang_gemma4_opt.patches import SWITCH_NAMES


def _status(env, *extra):
    return run_py(f"import sys; from sglang_gemma4_opt.cli import main; sys.exit(main(['status', *{list(extra)!r}]))",
                  env=env)


def test_switch_problems_name_the_typos(monkeypatch):
    monkeypatch.setenv("SGLANG_GEMMA4_OPT_DISABLE", "moe_small_bach,MOE_CONFIGS,moe_grouped,all")
    monkeypatch.setenv("SGLANG_GEMMA4_OPT", "fasle")
    got = settings.switch_problems(SWITCH_NAMES)
    assert len(got) == 2
    assert got[0].startswith("SGLANG_GEMMA4_OPT='fasle' is not a switch value") and "stays on" in got[0]
    assert "names MOE_CONFIGS, moe_small_bach:" in got[1]
    assert settings.plugin_enabled()  # an unknown value leaves the plugin on, and says so
    for ok in ("0", "off", "TRUE", " yes "):
        monkeypatch.setenv("SGLANG_GEMMA4_OPT", ok)
        monkeypatch.setenv("SGLANG_GEMMA4_OPT_DISABLE", "extend_attention_hd512, moe_grouped;prefill_warmup")
        assert settings.switch_problems(SWITCH_NAMES) == []


def test_sub_switch_names_are_the_ones_the_code_reads():
    from sglang_gemma4_opt.bench import e2e
    from sglang_gemma4_opt.kernels import extend_attention as ka
    from sglang_gemma4_opt.patches import extend_attention_kernel as pk
    from sglang_gemma4_opt.patches import moe_small_batch as pm

    assert pk.HD512_SWITCH == ka.HD512_SWITCH == e2e.HD512_SWITCH
    assert pm.GROUPED_SWITCH == e2e.GROUPED_MOE_SWITCH
    assert {pk.HD512_SWITCH, pm.GROUPED_SWITCH} <= SWITCH_NAMES


def test_status_shows_a_typo_and_strict_fails_on_it():
    env = {"SGLANG_GEMMA4_OPT_DISABLE": "moe_small_bach"}
    r = _status(env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: SGLANG_GEMMA4_OPT_DISABLE names moe_small_bach" in r.stdout
    assert _status(env, "--strict").returncode == 1
    r = _status(env, "--json")
    assert json.loads(r.stdout)["switch_problems"][0].startswith("SGLANG_GEMMA4_OPT_DISABLE names moe_small_bach")
    assert _status({"SGLANG_GEMMA4_OPT_DISABLE": "moe_grouped"}, "--strict").returncode == 0


def test_a_typo_is_logged_where_the_plugin_loads():
    r = run_py("import sglang_gemma4_opt; sglang_gemma4_opt.apply()", env={"SGLANG_GEMMA4_OPT": "fasle"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SGLANG_GEMMA4_OPT='fasle' is not a switch value" in r.stderr
    assert "patch moe_configs: applied" in r.stderr or "patch moe_configs: already upstream" in r.stderr


def test_a_broken_table_is_a_failure(monkeypatch):
    pytest.importorskip("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe")
    from sglang_gemma4_opt.kernels import moe_small_batch as km
    from sglang_gemma4_opt.patches import moe_small_batch as pm

    def broken():
        raise ValueError("NVIDIA H200 E128-N704: bad entry")

    monkeypatch.setattr(km, "load_table", broken)
    with pytest.raises(Broken) as e:
        pm.prepare()
    assert e.value.status == FAILED and "bad entry" in str(e.value)


def test_a_kernel_module_that_does_not_import_is_a_failure(monkeypatch):
    from sglang_gemma4_opt.patches import extend_attention_kernel as pk

    real = pk.importlib.import_module

    def fake(name, package=None):
        if name.endswith("kernels.extend_attention"):
            raise SyntaxError("broken kernel module")
        return real(name, package)

    monkeypatch.setattr(pk.importlib, "import_module", fake)
    try:
        pk.import_first(*pk.MODULES)
    except Exception:
        pytest.skip("sglang has no extend attention module here")
    with pytest.raises(Broken) as e:
        pk.prepare()
    assert e.value.status == FAILED and "SyntaxError: broken kernel module" in str(e.value)


def test_status_strict_fails_on_a_broken_table():
    code = """
        import sys
        from sglang_gemma4_opt.kernels import moe_small_batch as km
        def broken():
            raise ValueError("bad entry")
        km.load_table = broken
        from sglang_gemma4_opt.cli import main
        sys.exit(main(["status", "--strict"]))
    """
    r = run_py(code)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("moe_small_batch")]
    if line and "not applicable" in line[0] and "does not load" not in line[0]:
        pytest.skip(line[0])  # no fused-MoE target in this sglang
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert line and "failed (kernel module or table does not load: ValueError: bad entry)" in line[0]
