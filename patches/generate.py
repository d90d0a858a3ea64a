#!/usr/bin/env python3
"""Generate patches/*.patch: the plugin's changes as git patches against sglang v0.5.12's source.

    python patches/generate.py            # (re)write patches/*.patch
    python patches/generate.py --check    # exit 1 if patches/*.patch differ from what would be written

The patches are never edited by hand: this script builds them from the plugin's own source
(sglang_gemma4_opt/patches/extend_attention_blocks.py, sglang_gemma4_opt/kernels/qkv_rmsnorm.py,
sglang_gemma4_opt/configs/triton_*/*.json) and sglang 0.5.12's files, with real git in a temporary
repository (base commit = sglang 0.5.12's files, one commit per change, `git format-patch`) under a
fixed author, date and configuration, so the output is byte-for-byte the same on every run.

Where sglang 0.5.12's source comes from (first that works; every file read is verified):
  1. --wheel PATH, or the sglang-0.5.12 wheel in $SGLANG_WHEEL_DIR (the folder ci/install-test-env.sh
     also reads);
  2. the sglang 0.5.12 installed in the Python running this script (pip installs the wheel's files
     unchanged; each file is checked against the installed RECORD);
  3. the wheel cached in $SGLANG_GEMMA4_OPT_CACHE (default ~/.cache/sglang-gemma4-opt)/wheels;
  4. `pip download --no-deps sglang==0.5.12` (PyPI) into that cache.
The wheel is checked against its PyPI sha256, and the two Python files the patches edit against
pinned hashes, whichever way they came.
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "sglang_gemma4_opt"
PATCH_DIR = REPO / "patches"

SGLANG_VERSION = "0.5.12"
WHEEL_NAME = "sglang-0.5.12-cp311-cp311-manylinux_2_34_x86_64.whl"  # the only file PyPI has
WHEEL_SHA256 = "4ed786a38655851fd055ef57380c34d29b87753b53f63457309f51e5bf48c2e6"

# Paths inside the wheel (= inside sglang's repo under python/).
EXTEND_ATTENTION = "sglang/srt/layers/attention/triton_ops/extend_attention.py"
FUSED_OPS = "sglang/srt/layers/gemma4_fused_ops.py"
MOE_CONFIGS = "sglang/srt/layers/moe/moe_runner/triton_utils/configs"
BASE_SHA256 = {  # sglang v0.5.12's files that the patches edit
    EXTEND_ATTENTION: "564212736ec4eb02e1566effff571d9c35402772598c4d190d07af09903c6d28",
    FUSED_OPS: "169a498ad0326b55802e7382ce66102317fb3d66808d57d3daf601f741497c53",
}
REPO_PREFIX = "python/"  # where the wheel's sglang/ lives in sglang's git repository

# Fixed identity, date and config: the output must not depend on who runs this, when or where.
AUTHOR = ("sglang-gemma4-opt", "sglang-gemma4-opt@users.noreply.github.com")
DATE = "2026-01-01T00:00:00+00:00"
GIT_CONFIG = {
    "core.autocrlf": "false",
    "core.safecrlf": "false",
    "core.quotepath": "true",
    "diff.algorithm": "myers",
    "diff.renames": "false",
    "diff.noprefix": "false",
    "diff.mnemonicPrefix": "false",
    "format.numbered": "true",
    "init.defaultBranch": "main",
    "commit.gpgSign": "false",
}


class SourceError(RuntimeError):
    """sglang 0.5.12's source could not be found or did not verify."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- sglang 0.5.12's source


class Source:
    """Read-only view of sglang 0.5.12's wheel content (paths as in the wheel: sglang/...)."""

    origin: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        if getattr(self, "_name_set", None) is None:
            self._name_set = set(self.names())
        return name in self._name_set

    def extract(self, dest: Path) -> Path:
        """Write the whole sglang/ package under dest (dest/sglang/...); returns dest."""
        raise NotImplementedError


class WheelSource(Source):
    def __init__(self, path: Path):
        data = Path(path).read_bytes()
        if _sha256(data) != WHEEL_SHA256:
            raise SourceError(f"{path}: sha256 {_sha256(data)} is not PyPI's sglang {SGLANG_VERSION} wheel")
        self.path = Path(path)
        self.origin = f"wheel {path}"
        self._zip = zipfile.ZipFile(io.BytesIO(data))
        self._names = [n for n in self._zip.namelist() if n.startswith("sglang/") and not n.endswith("/")]

    def names(self):
        return self._names

    def read(self, name):
        return self._zip.read(name)

    def extract(self, dest):
        dest = Path(dest)
        self._zip.extractall(dest, members=self._names)
        return dest


class InstalledSource(Source):
    """The sglang installed in this interpreter, file by file checked against pip's RECORD."""

    def __init__(self):
        from importlib import metadata

        try:
            dist = metadata.distribution("sglang")
        except metadata.PackageNotFoundError:
            raise SourceError("no sglang installed in this Python") from None
        if dist.version != SGLANG_VERSION:
            raise SourceError(f"the installed sglang is {dist.version}, not {SGLANG_VERSION}")
        record = dist.read_text("RECORD")
        if not record:
            raise SourceError("the installed sglang has no RECORD")
        self._hashes = {}
        for row in csv.reader(io.StringIO(record)):
            if len(row) >= 2 and row[0].startswith("sglang/") and row[1].startswith("sha256="):
                self._hashes[row[0]] = row[1].removeprefix("sha256=")
        self.root = Path(str(dist.locate_file("")))
        if not (self.root / "sglang" / "__init__.py").exists():
            raise SourceError(f"installed sglang not found under {self.root}")
        self.origin = f"installed sglang {SGLANG_VERSION} at {self.root / 'sglang'}"

    def names(self):
        return sorted(n for n in self._hashes if "/__pycache__/" not in n)

    def read(self, name):
        data = (self.root / name).read_bytes()
        want = self._hashes.get(name)
        got = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if want != got:
            raise SourceError(f"installed {name} differs from the wheel's (RECORD sha256 {want}, file {got})")
        return data

    def extract(self, dest):
        dest = Path(dest)
        for name in self.names():
            out = dest / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(self.read(name))
        return dest


def cache_dir() -> Path:
    if os.environ.get("SGLANG_GEMMA4_OPT_CACHE"):
        return Path(os.environ["SGLANG_GEMMA4_OPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sglang-gemma4-opt"


def _download(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", "--abi", "cp311", "--platform", "manylinux_2_34_x86_64",
           "--disable-pip-version-check", "--timeout", "60", "--retries", "2", "-q", "-d", str(dest),
           f"sglang=={SGLANG_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if res.returncode != 0 or not wheel.exists():
        raise SourceError(f"pip download of sglang=={SGLANG_VERSION} failed: {(res.stderr or res.stdout)[-800:]}")
    return wheel


def find_source(wheel: str | None = None, download: bool = True, installed: bool = True) -> Source:
    """sglang 0.5.12's wheel content, from the first place that has it (see the module docstring)."""
    tried = []
    candidates = []
    if wheel:
        candidates.append(Path(wheel))
    elif os.environ.get("SGLANG_WHEEL_DIR"):
        candidates.append(Path(os.environ["SGLANG_WHEEL_DIR"]) / WHEEL_NAME)
    for path in candidates:
        if path.exists():
            return WheelSource(path)  # an explicit wheel that does not verify is an error
        tried.append(f"{path}: missing")
    if wheel:
        raise SourceError(f"--wheel {wheel} does not exist")
    if installed:
        try:
            return InstalledSource()
        except SourceError as e:
            tried.append(str(e))
    cached = cache_dir() / "wheels" / WHEEL_NAME
    if cached.exists():
        try:
            return WheelSource(cached)
        except SourceError as e:
            tried.append(str(e))
            cached.unlink()
    if download:
        try:
            return WheelSource(_download(cached.parent))
        except SourceError as e:
            tried.append(str(e))
    raise SourceError(f"sglang {SGLANG_VERSION}'s source not found: " + "; ".join(tried))


def read_base(src: Source, name: str) -> bytes:
    data = src.read(name)
    if name in BASE_SHA256 and _sha256(data) != BASE_SHA256[name]:
        raise SourceError(f"{name} from {src.origin} is not sglang v{SGLANG_VERSION}'s (sha256 {_sha256(data)})")
    return data


# ---------------------------------------------------------------------------- the changes


@dataclass
class Change:
    subject: str
    body: str
    files: dict[str, bytes] = field(default_factory=dict)  # wheel path -> new content


def _plugin_text(rel: str) -> str:
    return (PLUGIN / rel).read_text()


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"{what}: expected exactly one match of the stock code, found {text.count(old)}")
    return text.replace(old, new)


def _module_constant(src: str, name: str):
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"constant {name} not found")


def block_sizes_change(src: Source) -> Change:
    plugin = _plugin_text("patches/extend_attention_blocks.py")
    blocks = _module_constant(plugin, "HOPPER_BLOCKS")
    # The rule below is the plugin's hopper_blocks(); fail rather than write a stale one if it changes.
    for rule in ("cap[0] == 9", "129 <= Lq <= 256"):
        if rule not in plugin:
            raise RuntimeError(f"extend_attention_blocks.hopper_blocks no longer says {rule!r}: update generate.py")
    text = read_base(src, EXTEND_ATTENTION).decode()
    old = """\
        elif _is_cuda and CUDA_CAPABILITY[0] >= 9:
            # Hopper architecture (H100, etc.)
            if Lq <= 256:
                BLOCK_M, BLOCK_N = (128, 64)
            else:
                BLOCK_M, BLOCK_N = (32, 64)
"""
    new = f"""\
        elif _is_cuda and CUDA_CAPABILITY[0] >= 9:
            # Hopper architecture (H100, etc.)
            if Lq <= 128:
                BLOCK_M, BLOCK_N = (128, 64)
            elif Lq <= 256 and CUDA_CAPABILITY[0] == 9:
                # sm90 at head dim 129-256 (Gemma4's 256-dim sliding layers): {blocks!r} is 1.2-1.5x
                # faster than (128, 64) and bit-identical (same BLOCK_N, same KV accumulation order).
                BLOCK_M, BLOCK_N = {blocks!r}
            elif Lq <= 256:
                BLOCK_M, BLOCK_N = (128, 64)
            else:
                BLOCK_M, BLOCK_N = (32, 64)
"""
    text = _replace_once(text, old, new, EXTEND_ATTENTION)
    return Change(
        subject=f"extend_attention: {blocks[0]}x{blocks[1]} blocks for Lq 129-256 on sm90",
        body=f"""\
On compute capability 9.x, _get_block_sizes_for_extend_attention picks
(BLOCK_M, BLOCK_N) = (128, 64) for query head dims up to 256. For head
dims 129-256 (Gemma4's 256-dim sliding-window layers) {blocks!r} is
1.2-1.5x faster on H200 and bit-identical: BLOCK_N, and so the order in
which KV blocks are accumulated, is unchanged.

Only capability major 9 changes; other GPUs that reach this branch
(major >= 9 that is not 10 or 12) keep (128, 64), as do head dims <= 128
and > 256.

From sglang PR #26588 (upstream from sglang 0.5.13, there for every
major >= 9). Same change as the sglang-gemma4-opt plugin's
extend_attention_blocks patch; generated by its patches/generate.py.
""",
        files={EXTEND_ATTENTION: text.encode()},
    )


def _node_span(lines: list[str], node: ast.stmt) -> tuple[int, int]:
    """0-based [start, end) line span of a top-level statement: decorators and comments just above included."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start, node.end_lineno


def _rename(code: str, renames: dict[str, str]) -> str:
    """Rename identifiers (NAME tokens only: comments and strings are left alone)."""
    lines = code.splitlines(keepends=True)
    edits = [(t.start, t.end, renames[t.string]) for t in tokenize.generate_tokens(io.StringIO(code).readline)
             if t.type == tokenize.NAME and t.string in renames]
    for (row, c0), (_, c1), new in reversed(edits):
        lines[row - 1] = lines[row - 1][:c0] + new + lines[row - 1][c1:]
    return "".join(lines)


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise RuntimeError(f"function {name} not found")


def _drop_by_head(code: str, stock_doc: list[str]) -> str:
    """The plugin's wrapper takes an extra `by_head=None` (for its tests and benchmarks); sglang's callers
    and the plugin's own signature check expect sglang's signature, so it becomes a local again.
    The docstring becomes sglang's, plus one paragraph on the launch shape."""
    tree = ast.parse(code)
    fn = _function(tree, "gemma_qkv_rmsnorm")
    lines = code.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # 0-based [start, end) -> new lines
    doc = fn.body[0]
    if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        indent = lines[doc.lineno - 1][: doc.col_offset]
        new_doc = stock_doc[:-1] + [
            "\n",
            f"{indent}Launch shape: one program per token-head (grid (M, heads)) for\n",
            f"{indent}M <= BY_HEAD_MAX_M, where one program per token would leave the GPU almost\n",
            f"{indent}empty, and one program per token (grid (M,)) above. Both are bit-identical.\n",
            stock_doc[-1],
        ]
        edits.append((doc.lineno - 1, doc.end_lineno, new_doc))
    args = [a.arg for a in fn.args.args]
    if "by_head" in args:
        arg = fn.args.args[args.index("by_head")]
        line = lines[arg.lineno - 1]
        if not re.fullmatch(r"\s*by_head\b[^,]*,?\s*", line):
            raise RuntimeError(f"gemma_qkv_rmsnorm's by_head parameter is not on a line of its own: {line!r}")
        edits.append((arg.lineno - 1, arg.lineno, []))
        found = False
        for node in ast.walk(fn):
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                    and isinstance(node.test.left, ast.Name) and node.test.left.id == "by_head"
                    and isinstance(node.test.ops[0], ast.Is) and not node.orelse and len(node.body) == 1):
                (assign,) = node.body
                indent = lines[node.lineno - 1][: node.col_offset]
                value = ast.get_source_segment(code, assign.value)
                edits.append((node.lineno - 1, node.end_lineno, [f"{indent}by_head = {value}\n"]))
                found = True
        if not found:
            raise RuntimeError("gemma_qkv_rmsnorm: `if by_head is None: by_head = ...` not found")
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    return "".join(lines)


def qkv_rmsnorm_change(src: Source) -> Change:
    plugin = _plugin_text("kernels/qkv_rmsnorm.py")
    ptree = ast.parse(plugin)
    plines = plugin.splitlines(keepends=True)
    for name in ("_rmsnorm_one_head", "gemma_qkv_rmsnorm_kernel", "gemma_qkv_rmsnorm"):
        _function(ptree, name)
    max_m = _module_constant(plugin, "BY_HEAD_MAX_M")

    # Everything the plugin's module defines, as written there (its imports and docstring aside).
    imports, defs = [], []
    for node in ptree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if defs:
                raise RuntimeError("kernels/qkv_rmsnorm.py: an import after the first definition")
            if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                imports.append(ast.get_source_segment(plugin, node))
        elif not (node is ptree.body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            defs.append(node)
    first, last = _node_span(plines, defs[0])[0], defs[-1].end_lineno
    new_code = _rename("".join(plines[first:last]), {"gemma_qkv_rmsnorm_kernel": "_gemma_qkv_rmsnorm_kernel"})

    text = read_base(src, FUSED_OPS).decode()
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    kernel, wrapper = _function(tree, "_gemma_qkv_rmsnorm_kernel"), _function(tree, "gemma_qkv_rmsnorm")
    stock_doc = lines[wrapper.body[0].lineno - 1: wrapper.body[0].end_lineno]
    new_code = _drop_by_head(new_code, stock_doc)
    k0, k1 = _node_span(lines, kernel)
    w0, w1 = _node_span(lines, wrapper)
    if k1 > w0 or any(line.strip() for line in lines[k1:w0]):
        raise RuntimeError(f"{FUSED_OPS}: _gemma_qkv_rmsnorm_kernel and gemma_qkv_rmsnorm are not adjacent")
    ours = {t.id if isinstance(t, ast.Name) else None for n in defs for t in getattr(n, "targets", [])}
    ours |= {n.name for n in defs if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    theirs = {t.id for n in tree.body if n not in (kernel, wrapper)
              for t in (n.targets if isinstance(n, ast.Assign) else []) if isinstance(t, ast.Name)}
    theirs |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n not in (kernel, wrapper)}
    clash = (ours - {None, "gemma_qkv_rmsnorm_kernel", "gemma_qkv_rmsnorm"}) & theirs
    if clash:
        raise RuntimeError(f"{FUSED_OPS} already defines {sorted(clash)}")
    lines[k0:w1] = [new_code]

    # Imports the plugin's code needs that sglang's module lacks go at the top of its import block.
    present = {ast.get_source_segment(text, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    missing = [i for i in imports if i not in present]
    first_import = min(n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))) - 1
    missing_std = [i for i in missing if i.startswith("import ") and i.split()[1] in sys.stdlib_module_names]
    missing_other = [i for i in missing if i not in missing_std]
    if missing_other:
        raise RuntimeError(f"{FUSED_OPS} lacks imports the plugin's kernel needs: {missing_other}")
    lines[first_import:first_import] = [i + "\n" for i in sorted(missing_std)]
    new_text = "".join(lines)
    compile(new_text, FUSED_OPS, "exec")
    return Change(
        subject="gemma4_fused_ops: by-head Q/K/V RMSNorm for small M",
        body=f"""\
gemma_qkv_rmsnorm launched one program per token, so at decode sizes
(M=1) a single program looped over all 32 heads of Gemma4: 11.6 us on
H200. The kernel now has a BY_HEAD constexpr: with BY_HEAD, the grid is
(M, heads) and each program normalises one token-head (1.45 us at M=1);
without it, the grid is (M,) as before. gemma_qkv_rmsnorm launches by
head for M <= BY_HEAD_MAX_M ({max_m}), where that is faster on H200.

The arithmetic is the old kernel's operation for operation (fp32 upcast,
sum of squares / head_dim, + eps, rsqrt, x * rrms * w, cast back) and
each head is still reduced by one program, so results are bit-identical
for every M and dtype. Inputs are checked with ValueErrors instead of
asserts; CPU tensors are accepted under TRITON_INTERPRET=1 only.

From sglang PR #26588 (upstream from sglang 0.5.13). The kernel is the
sglang-gemma4-opt plugin's (sglang_gemma4_opt/kernels/qkv_rmsnorm.py,
its qkv_rmsnorm patch), copied by its patches/generate.py with the kernel
named _gemma_qkv_rmsnorm_kernel and sglang's gemma_qkv_rmsnorm signature.
""",
        files={FUSED_OPS: new_text.encode()},
    )


def moe_table_changes(src: Source) -> list[Change]:
    changes = []
    root = PLUGIN / "configs"
    vdirs = sorted((d for d in root.iterdir() if d.is_dir() and re.fullmatch(r"triton_\d+(_\d+)*", d.name)),
                   key=lambda d: tuple(int(x) for x in d.name.split("_")[1:]))
    for vdir in vdirs:
        files, added, changed = {}, [], []
        for f in sorted(vdir.glob("*.json")):
            name = f"{MOE_CONFIGS}/{vdir.name}/{f.name}"
            data = f.read_bytes()
            if src.exists(name):
                if src.read(name) == data:
                    continue  # sglang ships it already
                changed.append(f.name)
            else:
                added.append(f.name)
            files[name] = data
        if not files:
            continue
        version = vdir.name.removeprefix("triton_").replace("_", ".")
        listing = "".join(f"  {n}\n" for n in added) + "".join(f"  {n} (replaced)\n" for n in changed)
        changes.append(Change(
            subject=f"moe: Gemma4 fused-MoE configs for triton {version}",
            body=f"""\
sglang {SGLANG_VERSION} has no tuned fused-MoE table for Gemma4's expert
shapes (26B-A4B: E=128, N=704 at TP=1) and falls back to the default
config; the tuned H200 tables are 1.4x faster at M=256-1024.

Tables for triton {version}, under configs/{vdir.name}/:
{listing}
The H200 E=128,N=704 tables are sglang PR #26588's (upstream from sglang
0.5.13); any others are the sglang-gemma4-opt plugin's own tuning. Same
tables as the plugin's moe_configs patch serves
(sglang_gemma4_opt/configs/{vdir.name}/); generated by its
patches/generate.py.
""",
            files=files,
        ))
    return changes


def all_changes(src: Source) -> list[Change]:
    return [block_sizes_change(src), qkv_rmsnorm_change(src), *moe_table_changes(src)]


# ---------------------------------------------------------------------------- git


def _git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C", "LANG": "C", "TZ": "UTC",
        "GIT_AUTHOR_NAME": AUTHOR[0], "GIT_AUTHOR_EMAIL": AUTHOR[1], "GIT_AUTHOR_DATE": DATE,
        "GIT_COMMITTER_NAME": AUTHOR[0], "GIT_COMMITTER_EMAIL": AUTHOR[1], "GIT_COMMITTER_DATE": DATE,
    })
    return env


def _git(repo: Path, env: dict, *args: str, input: str | None = None) -> str:
    cfg = [x for k, v in GIT_CONFIG.items() for x in ("-c", f"{k}={v}")]
    res = subprocess.run(["git", *cfg, *args], cwd=repo, env=env, input=input, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def generate(out: Path, src: Source) -> list[Path]:
    """Write the patch files into out (replacing NNNN-*.patch there); returns them in order."""
    changes = all_changes(src)
    touched = sorted({name for c in changes for name in c.files})
    with tempfile.TemporaryDirectory(prefix="sglang-gemma4-opt-patches-") as tmp:
        repo, home = Path(tmp) / "sglang", Path(tmp) / "home"
        repo.mkdir()
        home.mkdir()
        env = _git_env(home)
        _git(repo, env, "init", "-q")
        for name in touched:
            if src.exists(name):
                path = repo / REPO_PREFIX / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(read_base(src, name))
        _git(repo, env, "add", "-A")
        _git(repo, env, "commit", "-q", "--allow-empty", "-F", "-",
             input=f"sglang v{SGLANG_VERSION} (the files the patches touch, from the PyPI wheel)\n")
        _git(repo, env, "tag", "base")
        for c in changes:
            for name, data in c.files.items():
                path = repo / REPO_PREFIX / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            _git(repo, env, "add", "-A")
            _git(repo, env, "commit", "-q", "-F", "-", input=f"{c.subject}\n\n{c.body}")
        fmt = Path(tmp) / "out"
        _git(repo, env, "format-patch", "-q", "--numbered", "--zero-commit", "--no-signature", "--full-index",
             "--stat=80", "--no-renames", "-o", str(fmt), "base..HEAD")
        made = sorted(fmt.glob("*.patch"))
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("[0-9][0-9][0-9][0-9]-*.patch"):
            old.unlink()
        for p in made:
            shutil.copyfile(p, out / p.name)
        return [out / p.name for p in made]


def committed_patches(d: Path | None = None) -> dict[str, bytes]:
    d = PATCH_DIR if d is None else d
    return {p.name: p.read_bytes() for p in sorted(d.glob("[0-9][0-9][0-9][0-9]-*.patch"))}


def check(src: Source) -> list[str]:
    """Differences between patches/*.patch and what generate() writes (empty: up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), src)
        want = committed_patches(Path(tmp))
    have = committed_patches()
    problems = [f"missing: patches/{n}" for n in want if n not in have]
    problems += [f"stale (not generated any more): patches/{n}" for n in have if n not in want]
    problems += [f"differs: patches/{n}" for n in want if n in have and have[n] != want[n]]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if patches/*.patch are not what would be written")
    ap.add_argument("--out", type=Path, default=PATCH_DIR, help="where to write the patches (default: patches/)")
    ap.add_argument("--wheel", help=f"sglang {SGLANG_VERSION} wheel to read instead of looking for one")
    ap.add_argument("--no-download", action="store_true", help="never run pip download")
    ap.add_argument("--no-installed", action="store_true", help="ignore the sglang installed in this Python")
    args = ap.parse_args(argv)
    try:
        src = find_source(args.wheel, download=not args.no_download, installed=not args.no_installed)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sglang {SGLANG_VERSION} source: {src.origin}", file=sys.stderr)
    if args.check:
        problems = check(src)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("patches are out of date: run `python patches/generate.py`", file=sys.stderr)
            return 1
        print("patches are up to date", file=sys.stderr)
        return 0
    for p in generate(args.out, src):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
