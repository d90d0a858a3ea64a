"""Activation through sglang's own plugin loader, env switches, idempotency, robustness.

Each case runs in a fresh interpreter: plugin state (and sglang's `_plugins_loaded`) is per process.
Expected statuses depend on the installed sglang: 0.5.12 gets the backport, >= 0.5.13 already has it
upstream and gets the routing restored instead, 0.5.11 has no fused QKV norm.
"""

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from _subproc import run_py

PROBE = """
import json, sys, logging
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
{pre}
from sglang.srt.plugins import load_plugins
load_plugins()
{post}
import sglang_gemma4_opt.core as core
from sglang_gemma4_opt.patches import PATCHES
sys.path.insert(0, {tests!r})
from _subproc import is_hooked
def hooked(target):
    return is_hooked(core.resolve_attr(target)[2])
res = core.results()
out = {{"loaded": res is not None,
        "status": {{k: v.status for k, v in (res or {{}}).items()}},
        "reason": {{k: v.reason for k, v in (res or {{}}).items()}},
        "targets": {{k: list(v.targets) for k, v in (res or {{}}).items()}}}}
{extra}
print("RESULT" + json.dumps(out))
"""


def probe(env=None, pre="", post="", extra=""):
    tests = str(Path(__file__).parent)
    r = run_py(PROBE.format(pre=pre, post=post, extra=extra, tests=tests), env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):]), r.stderr


def _moe_tables_all_upstream() -> bool:
    """Independently of the patch code: does this sglang ship every plugin table, unchanged?"""
    import importlib.util

    import triton

    vdir = "triton_" + triton.__version__.replace(".", "_")
    plugin_dir = Path(importlib.util.find_spec("sglang_gemma4_opt").origin).parent / "configs" / vdir
    cfg = importlib.util.find_spec("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config")
    sglang_dir = Path(cfg.origin).parent / "configs" / vdir
    ours = sorted(plugin_dir.glob("*.json"))
    return bool(ours) and all((sglang_dir / f.name).exists()
                              and json.loads(f.read_text()) == json.loads((sglang_dir / f.name).read_text())
                              for f in ours)


def expected_status(version):
    new = version >= (0, 5, 13)
    exp = {
        "extend_attention_blocks": "already upstream" if new else "applied",
        "qkv_rmsnorm": "already upstream" if new else ("not applicable" if version < (0, 5, 12) else "applied"),
        "moe_configs": "already upstream" if _moe_tables_all_upstream() else "applied",
        "unfused_routing": "applied" if new else "not applicable",
        "extend_attention_kernel": "applied",
    }
    from sglang_gemma4_opt.patches import PATCH_NAMES

    for name in PATCH_NAMES:  # patches added after these tests were written: they must at least not fail
        exp.setdefault(name, None)
    return exp


def assert_statuses(got: dict, exp: dict):
    assert set(got) == set(exp), (got, exp)
    for name, want in exp.items():
        if want is None:
            assert got[name] != "failed", (name, got[name])
        else:
            assert got[name] == want, (name, got[name], want)


def test_entry_point_registered():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "gemma4_opt"]
    assert len(eps) == 1 and eps[0].value == "sglang_gemma4_opt:load_plugin"


def test_load_plugins_applies_every_patch(sglang_version):
    extra = """
out["qkv_rebound"] = None
try:
    import sglang.srt.models.gemma4_causal as g
    from sglang_gemma4_opt.patches import qkv_rmsnorm as q
    if "qkv_rmsnorm" in res and res["qkv_rmsnorm"].status == "applied":
        src = q._find_module()
        out["qkv_rebound"] = g.gemma_qkv_rmsnorm is src.gemma_qkv_rmsnorm and is_hooked(g.gemma_qkv_rmsnorm)
except ImportError as e:
    out["qkv_rebound"] = repr(e)
out["hooked"] = {k: all(hooked(t) for t in v.targets) for k, v in res.items() if v.targets}
"""
    out, log = probe(extra=extra)
    assert out["loaded"]
    assert_statuses(out["status"], expected_status(sglang_version))
    for name, ok in out["hooked"].items():
        assert ok, name
    if out["status"]["qkv_rmsnorm"] == "applied":
        assert out["qkv_rebound"] is True
    # one log line per patch, naming it
    for name in out["status"]:
        assert sum(f"patch {name}:" in ln for ln in log.splitlines()) == 1, log[-3000:]


def test_model_module_imported_before_plugin_is_rebound(sglang_version):
    if sglang_version < (0, 5, 12) or sglang_version >= (0, 5, 13):
        pytest.skip("qkv_rmsnorm is applied only on 0.5.12")
    extra = """
import sglang.srt.models.gemma4_causal as g
from sglang_gemma4_opt.patches import qkv_rmsnorm as q
out["rebound"] = g.gemma_qkv_rmsnorm is q._find_module().gemma_qkv_rmsnorm
out["wrapped"] = is_hooked(g.gemma_qkv_rmsnorm)
"""
    out, _ = probe(pre="import sglang.srt.models.gemma4_causal", extra=extra)
    assert out["rebound"] and out["wrapped"]


def test_sglang_plugins_whitelist_is_honoured():
    out, _ = probe(env={"SGLANG_PLUGINS": "some_other_plugin"})
    assert not out["loaded"]
    out, _ = probe(env={"SGLANG_PLUGINS": "some_other_plugin, gemma4_opt"})
    assert out["loaded"]


def test_master_switch_off_leaves_sglang_untouched():
    extra = """
from sglang.srt.plugins.hook_registry import HookRegistry
out["registered"] = sum(len(v) for v in HookRegistry._hooks.values())
"""
    out, log = probe(env={"SGLANG_GEMMA4_OPT": "0"}, extra=extra)
    assert set(out["status"].values()) == {"disabled"}
    assert out["registered"] == 0
    assert "disabled by SGLANG_GEMMA4_OPT=0" in log


def test_single_patch_switch(sglang_version):
    exp = expected_status(sglang_version)
    name = "moe_configs" if exp["moe_configs"] == "applied" else "unfused_routing"
    extra = f"""
from sglang_gemma4_opt.patches import moe_configs as m
import importlib
mod = importlib.import_module(m.MODULE)
out["moe_hooked"] = is_hooked(mod.get_moe_configs)
"""
    out, _ = probe(env={"SGLANG_GEMMA4_OPT_DISABLE": name}, extra=extra)
    assert out["status"][name] == "disabled"
    exp[name] = "disabled"
    assert_statuses(out["status"], exp)
    if name == "moe_configs":
        assert out["moe_hooked"] is False


def test_apply_twice_and_after_load_plugins_changes_nothing():
    extra = """
import sglang_gemma4_opt
first = {k: core.resolve_attr(t)[2] for v in res.values() for t in v.targets for k in [t]}
again = sglang_gemma4_opt.apply()
again2 = sglang_gemma4_opt.apply()
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.plugins.hook_registry import HookRegistry
HookRegistry.apply_hooks()
second = {k: core.resolve_attr(t)[2] for v in res.values() for t in v.targets for k in [t]}
out["same_results"] = again is res and again2 is res
out["same_objects"] = all(first[k] is second[k] for k in first)
def depth(f):
    n = 0
    f = f.__func__ if isinstance(f, (classmethod, staticmethod)) else f
    while hasattr(f, "__wrapped__") and n < 10:
        f = f.__wrapped__; n += 1
    return n
out["depths"] = sorted({depth(v) for v in second.values()})
out["n_targets"] = len(first)
"""
    out, _ = probe(extra=extra)
    assert out["same_results"] and out["same_objects"]
    assert out["n_targets"] >= 1
    # HookRegistry wraps once; the moe hook's original is itself an lru_cache wrapper (depth 2)
    assert max(out["depths"]) <= 2


def test_embedded_apply_without_loader(sglang_version):
    code = """
import json, sglang_gemma4_opt
res = sglang_gemma4_opt.apply()
print("RESULT" + json.dumps({k: v.status for k, v in res.items()}))
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    assert_statuses(got, expected_status(sglang_version))


def test_missing_target_is_skipped_with_one_warning_and_others_apply(sglang_version):
    pre = """
from sglang_gemma4_opt.patches import extend_attention_blocks as e
mod = e.import_first(*e.MODULES)
del mod._get_block_sizes_for_extend_attention
"""
    out, log = probe(pre=pre)
    assert out["status"]["extend_attention_blocks"] == "failed"
    assert "missing" in out["reason"]["extend_attention_blocks"]
    exp = expected_status(sglang_version)
    exp["extend_attention_blocks"] = "failed"
    assert_statuses(out["status"], exp)
    warn = [ln for ln in log.splitlines() if "extend_attention_blocks: failed" in ln]
    assert len(warn) == 1 and "WARNING" in warn[0]


def test_changed_signature_is_skipped_and_target_untouched():
    pre = """
import sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config as cfg
def get_moe_configs(E, N, dtype, something_new=1):
    return None
cfg.get_moe_configs = get_moe_configs
"""
    extra = """
import sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config as cfg
out["untouched"] = cfg.get_moe_configs.__name__ == "get_moe_configs" and not is_hooked(cfg.get_moe_configs)
"""
    out, _ = probe(pre=pre, extra=extra)
    assert out["status"]["moe_configs"] == "failed"
    assert "something_new" in out["reason"]["moe_configs"]
    assert out["untouched"]


def test_patch_that_only_half_applies_is_rolled_back():
    """A multi-target patch whose second target HookRegistry refuses leaves the first untouched."""
    pre = """
from sglang_gemma4_opt.core import HookSpec
from sglang_gemma4_opt.patches import extend_attention_blocks as e
import sglang_gemma4_opt.patches as P
import types, importlib
mod = importlib.import_module("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config")
from sglang.srt.plugins.hook_registry import HookRegistry
HookRegistry._patched.add(mod.__name__ + ".get_default_config")  # as if another plugin had it
def around(orig, *a, **k):
    return orig(*a, **k)
fake = types.SimpleNamespace(NAME="two_targets", SUMMARY="", UPSTREAM="", REMOVE_WHEN="",
    prepare=lambda: [HookSpec(mod.__name__ + ".get_config_file_name", around),
                     HookSpec(mod.__name__ + ".get_default_config", around)])
P.PATCHES = P.PATCHES + (fake,)
orig_name_fn = mod.get_config_file_name
"""
    extra = """
out["first_untouched"] = mod.get_config_file_name is orig_name_fn
out["second_untouched"] = not is_hooked(mod.get_default_config)
"""
    out, log = probe(pre=pre, extra=extra)
    assert out["status"]["two_targets"] == "failed"
    assert "rolled back" in out["reason"]["two_targets"]
    assert out["first_untouched"] and out["second_untouched"]


def test_rollback_keeps_another_plugins_hook_applied_once():
    """Another plugin hooked a target before us; our patch on it and a second target fails and is rolled back.
    The other plugin's hook must still run once per call after the next apply_hooks(), not twice."""
    pre = """
from sglang_gemma4_opt.core import HookSpec
import sglang_gemma4_opt.patches as P
import types, importlib
mod = importlib.import_module("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config")
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
seen = []
def other(orig, *a, **k):
    seen.append(1)
    return orig(*a, **k)
HookRegistry.register(mod.__name__ + ".get_config_dtype_str", other, HookType.AROUND)
HookRegistry.apply_hooks()  # the other plugin, loaded first
refused = mod.__name__ + ".get_default_config"
HookRegistry._patched.add(refused)  # so our second target does not take the hook: the patch rolls back
def around(orig, *a, **k):
    return orig(*a, **k)
fake = types.SimpleNamespace(NAME="two_targets", SUMMARY="", UPSTREAM="", REMOVE_WHEN="",
    prepare=lambda: [HookSpec(mod.__name__ + ".get_config_dtype_str", around), HookSpec(refused, around)])
P.PATCHES = P.PATCHES + (fake,)
"""
    extra = """
import torch
HookRegistry.apply_hooks()  # what sglang's loader does after the next plugin
seen.clear()
mod.get_config_dtype_str(torch.float32)
out["other_hook_calls"] = len(seen)
"""
    out, log = probe(pre=pre, extra=extra)
    assert out["status"]["two_targets"] == "failed"
    assert out["other_hook_calls"] == 1


def test_register_failing_on_a_second_target_leaves_no_hook_behind():
    """HookRegistry.register raising on a patch's second spec: the first spec's hook is taken back, so no later
    apply_hooks() (sglang's loader runs one after every plugin) applies half the patch."""
    pre = """
from sglang_gemma4_opt.core import HookSpec
import sglang_gemma4_opt.patches as P
import types, importlib
mod = importlib.import_module("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config")
from sglang.srt.plugins.hook_registry import HookRegistry
real_register = HookRegistry.register.__func__
calls = []
def register(cls, target, hook, *a, **k):
    calls.append(target)
    if target.endswith("get_default_config"):
        raise ValueError("refused")
    return real_register(cls, target, hook, *a, **k)
HookRegistry.register = classmethod(register)
def around(orig, *a, **k):
    return orig(*a, **k)
fake = types.SimpleNamespace(NAME="two_targets", SUMMARY="", UPSTREAM="", REMOVE_WHEN="",
    prepare=lambda: [HookSpec(mod.__name__ + ".get_config_file_name", around),
                     HookSpec(mod.__name__ + ".get_default_config", around)])
P.PATCHES = P.PATCHES + (fake,)
orig_name_fn = mod.get_config_file_name
"""
    extra = """
HookRegistry.apply_hooks()  # what the loader does after the next plugin
out["first_untouched"] = mod.get_config_file_name is orig_name_fn
out["left_registered"] = [t for t, hs in HookRegistry._hooks.items() for h in hs if h[1] is around]
"""
    out, log = probe(pre=pre, extra=extra)
    assert out["status"]["two_targets"] == "failed" and "refused" in out["reason"]["two_targets"]
    assert out["left_registered"] == [] and out["first_untouched"]


def test_exception_in_prepare_never_reaches_sglang():
    pre = """
from sglang_gemma4_opt.patches import qkv_rmsnorm as q
def boom():
    raise RuntimeError("kaboom")
q.prepare = boom
"""
    out, log = probe(pre=pre)
    assert out["status"]["qkv_rmsnorm"] == "failed"
    assert "kaboom" in out["reason"]["qkv_rmsnorm"]


@pytest.mark.parametrize("argv", [["-m", "sglang_gemma4_opt", "status"], ["-m", "sglang_gemma4_opt.cli", "status"]])
def test_status_command(argv, sglang_version):
    import subprocess
    import sys

    import sglang

    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "SGLANG_GEMMA4_OPT_DISABLE": "moe_configs"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert sglang.__version__ in out and "triton" in out and "torch" in out
    import torch

    if not torch.cuda.is_available():
        assert "no GPU" in out
    exp = expected_status(sglang_version)
    exp["moe_configs"] = "disabled"
    for name, st in exp.items():
        line = [ln for ln in out.splitlines() if ln.split(" ", 1)[0] == name]
        assert line, out
        if st is not None:
            assert line[0].split(None, 1)[1].startswith(st), out


def test_status_json_and_console_script(sglang_version):
    import shutil
    import subprocess

    exe = shutil.which("sglang-gemma4-opt", path=str(Path(sys.executable).parent)) or shutil.which("sglang-gemma4-opt")
    assert exe, "console script not installed"
    r = subprocess.run([exe, "status", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert_statuses({p["name"]: p["status"] for p in rep["patches"]}, expected_status(sglang_version))
    assert rep["versions"]["sglang"] and rep["gpu"]


def test_patch_lines_visible_before_sglang_configures_logging():
    """sglang's schedulers call load_plugins() before configuring logging: the lines must still show."""
    r = run_py("""
from sglang.srt.plugins import load_plugins
load_plugins()
import logging
logging.basicConfig(level=logging.INFO, force=True)  # what sglang's configure_logger does next
logging.getLogger("sglang_gemma4_opt").info("after configure")
""")
    assert r.returncode == 0, r.stderr[-3000:]
    from sglang_gemma4_opt.patches import PATCH_NAMES

    for name in PATCH_NAMES:
        assert sum(f"patch {name}:" in ln for ln in r.stderr.splitlines()) == 1, r.stderr[-3000:]
    from sglang_gemma4_opt import __version__

    assert f"sglang-gemma4-opt {__version__} in pid" in r.stderr
    assert r.stderr.count("after configure") == 1  # no double printing once the root logger exists
