"""patches/*.patch (the plugin's changes as git patches for sglang 0.5.12 forks).

* they are exactly what `patches/generate.py` writes (never edited by hand, never stale);
* they are git-format patches that `git apply` and `git am` take, in order, on sglang 0.5.12;
* patched sglang WITHOUT the plugin behaves like stock sglang WITH it, on what a CPU can check:
  extend-attention block sizes (faked device globals), fused-MoE config lookup (faked device name,
  triton version and deterministic flag) and the Q/K/V RMSNorm kernel (Triton interpreter);
* the plugin, installed next to patched sglang, stands aside ("already upstream").

sglang 0.5.12's source comes from the generator's lookup (the installed sglang when it is 0.5.12,
else the cached or downloaded PyPI wheel); without it the tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "patches" / "generate.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("sglang_gemma4_opt_patch_generator", GENERATOR)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()
PATCHES = sorted((REPO / "patches").glob("[0-9][0-9][0-9][0-9]-*.patch"))


def _git_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def git(cwd, *args):
    res = subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=cwd, env=_git_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, f"git {' '.join(args)}: {res.stderr}{res.stdout}"
    return res.stdout


@pytest.fixture(scope="module")
def source():
    try:
        return gen.find_source()
    except gen.SourceError as e:
        pytest.skip(f"no sglang {gen.SGLANG_VERSION} source: {e}")


# ---------------------------------------------------------------------------- generated, current, well-formed


def test_patches_are_current(source, tmp_path):
    """patches/*.patch are byte for byte what the generator writes, and it writes the same every run."""
    assert PATCHES, "no patches/*.patch: run `python patches/generate.py`"
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    want = gen.committed_patches(out)
    have = gen.committed_patches()
    assert sorted(want) == sorted(have), "patch set changed: run `python patches/generate.py`"
    stale = [n for n in want if want[n] != have[n]]
    assert not stale, f"stale: {stale}; run `python patches/generate.py` (never edit them by hand)"
    again = gen.generate(tmp_path / "again", source)
    assert {p.name: p.read_bytes() for p in again} == want


def test_check_mode_reports_stale(source, tmp_path, monkeypatch):
    assert gen.check(source) == []
    copy = tmp_path / "patches"
    shutil.copytree(REPO / "patches", copy, ignore=shutil.ignore_patterns("__pycache__"))
    first = sorted(copy.glob("0001-*.patch"))[0]
    first.write_bytes(first.read_bytes().replace(b"(64, 64)", b"(64, 32)", 1))
    (copy / "0099-leftover.patch").write_text("x")
    monkeypatch.setattr(gen, "PATCH_DIR", copy)
    problems = gen.check(source)
    assert f"differs: patches/{first.name}" in problems
    assert "stale (not generated any more): patches/0099-leftover.patch" in problems


def _diff_paths(text: str) -> list[str]:
    paths = []
    for m in re.finditer(r"^diff --git a/(\S+) b/(\S+)$", text, re.M):
        assert m.group(1) == m.group(2)
        paths.append(m.group(1))
    return paths


def test_patch_format_and_contents(source):
    n = len(PATCHES)
    plugin_tables = sorted(
        p.relative_to(gen.PLUGIN / "configs").as_posix() for p in (gen.PLUGIN / "configs").glob("triton_*/*.json")
        if not (source.exists(name := f"{gen.MOE_CONFIGS}/{p.parent.name}/{p.name}")
                and source.read(name) == p.read_bytes()))  # tables sglang already ships need no patch
    seen_tables = []
    for i, p in enumerate(PATCHES, 1):
        text = p.read_text()
        head, _, rest = text.partition("\n---\n")
        lines = head.splitlines()
        assert lines[0] == "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001"
        assert lines[1].startswith("From: ") and lines[2].startswith("Date: ")
        assert lines[3].startswith(f"Subject: [PATCH {i}/{n}] ")
        assert len("\n".join(lines[5:])) > 200, f"{p.name}: the message must say what and why"
        assert not text.endswith("\n-- \n") and "\n-- \n" not in text  # no version signature
        paths = _diff_paths(rest)
        assert paths and all(x.startswith("python/sglang/") for x in paths), paths
        if i == 1:
            assert paths == ["python/" + gen.EXTEND_ATTENTION]
        elif i == 2:
            assert paths == ["python/" + gen.FUSED_OPS]
        else:
            prefix = f"python/{gen.MOE_CONFIGS}/"
            assert all(x.startswith(prefix) for x in paths)
            assert len({x[len(prefix):].split("/")[0] for x in paths}) == 1  # one patch per triton version
            seen_tables += [x[len(prefix):] for x in paths]
    assert sorted(seen_tables) == plugin_tables


# ---------------------------------------------------------------------------- they apply


@pytest.fixture(scope="module")
def patched_tree(source, tmp_path_factory):
    """sglang 0.5.12 with patches/*.patch applied by `git apply`, in order: the directory holding sglang/."""
    patched = tmp_path_factory.mktemp("sglang-0.5.12-patched")
    source.extract(patched / "python")
    git(patched, "init", "-q")  # so `git apply` works here whatever encloses the temp dir
    for p in PATCHES:
        git(patched, "apply", "--whitespace=nowarn", str(p))
    return patched / "python"


def test_patches_apply_with_git_am(source, patched_tree, tmp_path):
    """`git am` from a repository holding sglang 0.5.12 gives the same files as `git apply`."""
    repo = tmp_path / "sglang"
    repo.mkdir()
    git(repo, "init", "-q")
    for name in (gen.EXTEND_ATTENTION, gen.FUSED_OPS):
        (repo / "python" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "python" / name).write_bytes(gen.read_base(source, name))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "am", "-q", *map(str, PATCHES))
    assert len(git(repo, "log", "--format=%s").splitlines()) == len(PATCHES) + 1
    patched = patched_tree
    changed = git(repo, "diff", "--name-only", "HEAD~%d" % len(PATCHES), "HEAD").split()
    for path in changed:
        assert (repo / path).read_bytes() == (patched / path.removeprefix("python/")).read_bytes(), path


def test_patched_sources_compile(patched_tree):
    patched = patched_tree
    for name in (gen.EXTEND_ATTENTION, gen.FUSED_OPS):
        src = (patched / name).read_text()
        compile(src, name, "exec")
    fused = (patched / gen.FUSED_OPS).read_text()
    for keep in ("def gemma_rmsnorm_residual_scalar(", "def gemma_dual_rmsnorm_residual_scalar(",
                 "def _gemma_rmsnorm_residual_kernel(", "def _gemma_dual_rmsnorm_residual_kernel(",
                 "def _gemma_qkv_rmsnorm_kernel(", "def gemma_qkv_rmsnorm(", "BY_HEAD: tl.constexpr"):
        assert keep in fused, keep


# ---------------------------------------------------------------------------- patched sglang == stock + plugin

PROBE = r'''
import json, os, re, sys
from types import SimpleNamespace

role, root, out = sys.argv[1:4]
sys.path.insert(0, root)
import torch, triton
import sglang

assert os.path.realpath(sglang.__file__).startswith(os.path.realpath(root) + os.sep), sglang.__file__
import sglang.srt.layers.attention.triton_ops.extend_attention as ea
import sglang.srt.layers.gemma4_fused_ops as fo
import sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config as cfg
from sglang.srt.plugins import load_plugins

load_plugins()  # stock: sglang's loader applies the plugin; patched: SGLANG_PLUGINS excludes it
import sglang_gemma4_opt
from sglang_gemma4_opt import core
from sglang_gemma4_opt.kernels.qkv_rmsnorm import BY_HEAD_MAX_M
from sglang_gemma4_opt.patches import moe_configs as mc

res = {"sglang": sglang.__version__, "plugin": {k: v.status for k, v in (core.results() or {}).items()},
       "by_head_kernel": "BY_HEAD" in getattr(fo._gemma_qkv_rmsnorm_kernel, "arg_names", ())}

# Extend-attention block sizes under faked device globals.
blocks = {}
devices = [("hip", False, True, None)] + [
    (f"cuda{c[0]}.{c[1]}", True, False, c)
    for c in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (11, 0), (12, 0)]]
for name, is_cuda, is_hip, cap in devices:
    ea._is_cuda, ea._is_hip = is_cuda, is_hip
    if cap is not None:
        ea.CUDA_CAPABILITY = cap
    for lq, lv in [(64, 64), (128, 128), (129, 129), (192, 128), (256, 256), (257, 257), (288, 256),
                   (512, 512), (576, 512)]:
        blocks[f"{name} Lq={lq} Lv={lv}"] = list(ea._get_block_sizes_for_extend_attention(lq, lv))
res["blocks"] = blocks

# Fused-MoE config lookup under faked device names, triton versions and deterministic flag.
os.environ.pop("SGLANG_MOE_CONFIG_DIR", None)
shapes = {(128, 704, None, 0, 0, False), (128, 352, None, 0, 0, False), (8, 14336, None, 0, 0, False),
          (256, 256, "fp8_w8a8", 128, 128, False)}
names = {"NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA B200", "NVIDIA H20"}
pat = re.compile(r"E=(\d+),N=(\d+),device_name=(.+?)(?:,dtype=([^,]+?))?(?:,block_shape=\[(\d+), ?(\d+)\])?"
                 r"(,per_channel_quant=True)?(?:_down)?\.json")
for f in mc.CONFIG_ROOT.glob("triton_*/*.json"):
    m = pat.fullmatch(f.name)
    if m:
        e, n, dev, dt, bn, bk, pcq = m.groups()
        names.add(dev)
        shapes.add((int(e), int(n), dt, int(bn or 0), int(bk or 0), bool(pcq)))
real_version = triton.__version__
moe = {}
try:
    for version in sorted({"3.5.1", real_version, "3.7.0"}):
        triton.__version__ = version
        for det in (False, True):
            cfg.get_global_server_args = lambda det=det: SimpleNamespace(enable_deterministic_inference=det)
            for dev in sorted(names):
                cfg.get_device_name = lambda *a, dev=dev, **k: dev
                for shape in sorted(shapes, key=str):
                    for down in (False, True):
                        if det and (dev, shape[:2]) != ("NVIDIA H200", (128, 704)):
                            continue
                        mc.clear_caches()
                        got = cfg.get_moe_configs(*shape, down_moe=down)
                        moe[f"triton {version} det={det} {dev} {shape} down={down}"] = got
finally:
    triton.__version__ = real_version
res["moe"] = json.loads(json.dumps(moe))
res["moe_found"] = sum(v is not None for v in moe.values())

# Q/K/V RMSNorm through the function sglang's Gemma4 attention calls.
device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
qkv = {}
cases = [(dt, m, 4, 2, hd, shared) for dt in (torch.bfloat16, torch.float16, torch.float32)
         for m, hd, shared in [(1, 256, False), (5, 80, False), (3, 256, True)]]
cases.append((torch.bfloat16, BY_HEAD_MAX_M + 1, 2, 1, 64, False))  # per-token launch shape
for i, (dt, m, nq, nkv, hd, shared) in enumerate(cases):
    g = torch.Generator().manual_seed(i)
    buf = (torch.randn(m, (nq + 2 * nkv) * hd, generator=g) * 3).to(dt).to(device)
    qw = (torch.randn(hd, generator=g) + 1).to(dt).to(device)
    kw = (torch.randn(hd, generator=g) + 1).to(dt).to(device)
    q, k, v = buf.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
    if shared:
        fo.gemma_qkv_rmsnorm(q, None, None, qw, None, nq, nkv, hd, 1e-6)
    else:
        fo.gemma_qkv_rmsnorm(q, k, v, qw, kw, nq, nkv, hd, 1e-6)
    qkv[f"{dt} M={m} heads={nq}/{nkv} head_dim={hd} kv_shared={shared}"] = buf.cpu()
torch.save(qkv, os.path.join(out, role + ".pt"))

if role == "patched":  # the plugin installed next to patched sglang must find everything upstream
    os.environ["SGLANG_GEMMA4_OPT"] = "1"
    res["plugin_on_patched"] = {k: v.status for k, v in sglang_gemma4_opt.apply().items()}
with open(os.path.join(out, role + ".json"), "w") as f:
    json.dump(res, f)
'''


@pytest.fixture(scope="module")
def probes(source, patched_tree, tmp_path_factory):
    """Run the probe on stock sglang 0.5.12 + plugin and on patched sglang without it, side by side."""
    from importlib import metadata

    installed = metadata.version("sglang")
    if installed != gen.SGLANG_VERSION:
        pytest.skip(f"importing sglang {gen.SGLANG_VERSION} needs its own dependencies; this venv has sglang "
                    f"{installed} (the 0.5.12 venv runs these)")
    out = tmp_path_factory.mktemp("probe")
    if isinstance(source, gen.InstalledSource):
        stock = source.root  # the installed copy (the patched tree was verified against its RECORD)
    else:
        stock = source.extract(out / "stock")
    patched = patched_tree
    script = out / "probe.py"
    script.write_text(PROBE)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SGLANG_GEMMA4_OPT") and k not in ("SGLANG_PLUGINS", "SGLANG_MOE_CONFIG_DIR")}
    if not __import__("torch").cuda.is_available():
        base["TRITON_INTERPRET"] = "1"
    envs = {"stock": base, "patched": {**base, "SGLANG_PLUGINS": "none", "SGLANG_GEMMA4_OPT": "0"}}
    roots = {"stock": stock, "patched": patched}
    procs = {role: subprocess.Popen([sys.executable, str(script), role, str(roots[role]), str(out)], cwd=out,
                                    env=envs[role], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for role in ("stock", "patched")}
    logs = {role: p.communicate(timeout=600)[0] for role, p in procs.items()}
    for role, p in procs.items():
        if p.returncode != 0:
            pytest.fail(f"{role} probe failed:\n{textwrap.indent(logs[role][-6000:], '  ')}")
    return {role: json.loads((out / f"{role}.json").read_text()) for role in procs}, out


PLUGIN_ONLY = ("unfused_routing", "extend_attention_kernel", "moe_small_batch", "prefill_warmup",
               "frozen_kv_mtp_finished_batch")


def test_stock_run_has_the_plugin_and_patched_run_does_not(probes):
    res, _ = probes
    assert res["stock"]["sglang"] == res["patched"]["sglang"] == gen.SGLANG_VERSION
    # unfused_routing and the plugin-only kernels (not in the fork patches) are not compared
    assert {k: v for k, v in res["stock"]["plugin"].items() if k not in PLUGIN_ONLY} == {
        "extend_attention_blocks": "applied", "qkv_rmsnorm": "applied", "moe_configs": "applied"}
    assert res["patched"]["plugin"] == {}  # not loaded at all
    assert res["patched"]["by_head_kernel"] and not res["stock"]["by_head_kernel"]


def test_block_sizes_match(probes):
    res, _ = probes
    stock, patched = res["stock"]["blocks"], res["patched"]["blocks"]
    assert stock == patched
    assert stock["cuda9.0 Lq=256 Lv=256"][3:5] == [64, 64]
    assert stock["cuda11.0 Lq=256 Lv=256"][3:5] == [128, 64]  # sm 11 reaches the Hopper branch too


def test_moe_config_lookup_matches(probes):
    res, _ = probes
    stock, patched = res["stock"]["moe"], res["patched"]["moe"]
    assert stock.keys() == patched.keys()
    assert {k for k in stock if stock[k] != patched[k]} == set()
    h200 = [k for k in stock if "det=False NVIDIA H200 (128, 704," in k]
    assert h200 and all(stock[k] is not None for k in h200)
    assert all(v is None for k, v in stock.items() if "det=True" in k)


def test_qkv_rmsnorm_matches(probes):
    import torch

    _, out = probes
    stock, patched = torch.load(out / "stock.pt"), torch.load(out / "patched.pt")
    assert stock.keys() == patched.keys()
    differ = [k for k in stock if not torch.equal(stock[k], patched[k])]
    assert not differ, differ


def test_plugin_stands_aside_on_patched_sglang(probes):
    res, _ = probes
    got = res["patched"]["plugin_on_patched"]
    assert {k: v for k, v in got.items() if k not in PLUGIN_ONLY} == {
        "extend_attention_blocks": "already upstream", "qkv_rmsnorm": "already upstream",
        "moe_configs": "already upstream"}
    assert got["unfused_routing"] == "not applicable"
    for name in ("extend_attention_kernel", "moe_small_batch", "prefill_warmup"):  # plugin-only: no fork patch has them
        assert got.get(name, "applied") == "applied", (name, got.get(name))
