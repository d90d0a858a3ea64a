"""Patch: fused-MoE Triton configs shipped with the plugin, found as if they were sglang's own.

Target:   `get_moe_configs` in `sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config`
          (an lru_cached function; every importer is rebound by HookRegistry).
Why:      sglang 0.5.11/0.5.12 have no E=128,N=704 table for H200 (Gemma4 26B-A4B's experts) and
          fall back to the default config: the PR's tables are 1.4x faster at M=256-1024. The plugin
          also ships tables upstream does not have (more sizes, H100 on triton 3.6, TP=2 shapes).
Lookup:   1. deterministic inference: sglang's own function (returns no config), untouched;
          2. a file for this shape under SGLANG_MOE_CONFIG_DIR for the running triton version: the
             user's explicit choice, so sglang's own function;
          3. the plugin's file for the running triton version;
          4. sglang's own file for the running triton version: sglang's own function;
          5. neither has one: the newest other-triton-version file of either source, the plugin's
             with the same warning sglang's fallback prints; else sglang's own function.
          A plugin file that cannot be read logs a warning and falls through to sglang.
Upstream: sglang PR #26588 (H200 E=128,N=704 tables, up and down).
Remove:   never wholly: drop files sglang ships identically (the patch stands aside when every
          file it has for the running triton version is already in sglang's folder, unchanged).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from pathlib import Path

from ..core import AlreadyUpstream, HookSpec, TargetChanged, import_first

NAME = "moe_configs"
SUMMARY = "fused-MoE configs for Gemma4 shapes (H200/H100, E=128, N=704/352), looked up before sglang's"
UPSTREAM = "sglang PR #26588 (H200 N=704); the rest is the plugin's own tuning"
REMOVE_WHEN = "never wholly; drop files that sglang ships identically"

MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config"
FUNC = "get_moe_configs"
SIGNATURE = ["E", "N", "dtype", "block_n", "block_k", "per_channel_quant", "down_moe"]
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"

logger = logging.getLogger("sglang_gemma4_opt")


def version_dir(version: str) -> str:
    return "triton_" + version.replace(".", "_")


def _version_key(dirname: str):
    try:
        return tuple(int(x) for x in dirname.removeprefix("triton_").split("_"))
    except ValueError:
        return ()


def _newest_with(root: Path, file_name: str, exclude: str) -> Path | None:
    if not root.is_dir():
        return None
    dirs = sorted((d for d in os.listdir(root) if d.startswith("triton_") and d != exclude and _version_key(d)),
                  key=_version_key, reverse=True)
    for d in dirs:
        p = root / d / file_name
        if p.exists():
            return p
    return None


def load_table(path: Path) -> dict[int, dict]:
    with open(path) as f:
        data = json.load(f)
    table = {int(k): dict(v) for k, v in data.items()}
    for m, cfg in table.items():
        for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
            if not isinstance(cfg.get(key), int):
                raise ValueError(f"M={m}: {key} missing or not an int")
    if not table:
        raise ValueError("empty table")
    return table


def deterministic(module) -> bool:
    if hasattr(module, "get_global_server_args"):  # <= 0.5.12
        return bool(module.get_global_server_args().enable_deterministic_inference)
    return bool(module.get_exec().deterministic.enable_deterministic_inference)  # newer


def sglang_config_dir(module) -> Path:
    return Path(os.environ.get("SGLANG_MOE_CONFIG_DIR", os.path.dirname(os.path.realpath(module.__file__))))


def plugin_lookup(module, E, N, dtype, block_n=0, block_k=0, per_channel_quant=False, down_moe=False):
    """(path, table, fallback_from) the plugin serves for this call, or None when sglang decides."""
    import triton

    if deterministic(module):
        return None
    file_name = module.get_config_file_name(E, N, dtype, [block_n, block_k], per_channel_quant, down_moe=down_moe)
    vdir = version_dir(triton.__version__)
    user_dir = os.environ.get("SGLANG_MOE_CONFIG_DIR")
    if user_dir and (Path(user_dir) / "configs" / vdir / file_name).exists():
        return None
    ours = CONFIG_ROOT / vdir / file_name
    if ours.exists():
        return ours, None
    theirs_root = sglang_config_dir(module) / "configs"
    if (theirs_root / vdir / file_name).exists():
        return None
    ours_other = _newest_with(CONFIG_ROOT, file_name, vdir)
    theirs_other = _newest_with(theirs_root, file_name, vdir)
    if ours_other is not None and (
        theirs_other is None or _version_key(ours_other.parent.name) > _version_key(theirs_other.parent.name)
    ):
        return ours_other, theirs_root / vdir / file_name
    return None


def make_hook(module):
    @functools.lru_cache(maxsize=None)
    def cached(original, E, N, dtype, block_n, block_k, per_channel_quant, down_moe):
        args = (E, N, dtype, block_n, block_k, per_channel_quant, down_moe)
        try:
            found = plugin_lookup(module, *args)
        except Exception as e:
            logger.warning("sglang-gemma4-opt: MoE config lookup failed (%s); using sglang's", e)
            found = None
        if found is None:
            return original(*args)
        path, missing = found
        try:
            table = load_table(path)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            logger.warning("sglang-gemma4-opt: cannot use MoE config %s (%s); using sglang's lookup", path, e)
            return original(*args)
        if missing is None:
            # the pid tells TP ranks apart: the plugin's logger has no "[TP0]" prefix in every process
            logger.info("Using MoE kernel config from %s (sglang-gemma4-opt, pid %d).", path, os.getpid())
        else:
            logger.warning(
                "Config file not found at %s. Fallback to triton version %s and use MoE kernel config from %s. "
                "Performance might be sub-optimal!", missing,
                path.parent.name.removeprefix("triton_").replace("_", "."), path)
        return table

    def moe_configs_hook(original, *args, **kwargs):
        # Called on every fused-MoE forward: normalise the arguments with a plain call (about 0.3 us;
        # inspect.Signature.bind cost 15 us) so each distinct call hits one cache entry.
        try:
            key = _normalise(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        return cached(original, *key)

    moe_configs_hook.cache_clear = cached.cache_clear
    _CACHES.append(cached)
    return moe_configs_hook


def _normalise(E, N, dtype, block_n=0, block_k=0, per_channel_quant=False, down_moe=False):
    return E, N, dtype, block_n, block_k, per_channel_quant, down_moe


_CACHES: list = []


def clear_caches() -> None:
    """Forget looked-up tables (ours and sglang's lru_cache), e.g. after changing the environment."""
    for c in _CACHES:
        c.cache_clear()
    try:
        mod = __import__(MODULE, fromlist=["_"])
        orig = getattr(mod, FUNC)
        while orig is not None:
            if hasattr(orig, "cache_clear"):
                orig.cache_clear()
            orig = getattr(orig, "__wrapped__", None)
    except Exception:
        pass


def shipped_files(vdir: str) -> list[Path]:
    d = CONFIG_ROOT / vdir
    return sorted(d.glob("*.json")) if d.is_dir() else []


def prepare() -> list[HookSpec]:
    import triton

    module = import_first(MODULE)
    func = getattr(module, FUNC, None)
    if func is None or not hasattr(module, "get_config_file_name"):
        raise TargetChanged(f"{MODULE}.{FUNC} or get_config_file_name is missing")
    params = list(inspect.signature(func).parameters)
    if params != SIGNATURE:
        raise TargetChanged(f"{FUNC} takes {params}, expected {SIGNATURE}")
    if not (hasattr(module, "get_global_server_args") or hasattr(module, "get_exec")):
        raise TargetChanged("cannot find how this sglang reads deterministic-inference mode")
    vdir = version_dir(triton.__version__)
    ours = shipped_files(vdir)
    theirs = Path(os.path.dirname(os.path.realpath(module.__file__))) / "configs" / vdir
    if ours and all(_same_table(p, theirs / p.name) for p in ours):
        raise AlreadyUpstream(f"sglang's {vdir} folder already has all {len(ours)} of the plugin's tables")
    if hasattr(func, "cache_clear"):
        func.cache_clear()  # drop anything sglang looked up before the plugin came in
    return [HookSpec(f"{MODULE}.{FUNC}", make_hook(module), "around")]


def _same_table(a: Path, b: Path) -> bool:
    try:
        return b.exists() and json.loads(a.read_text()) == json.loads(b.read_text())
    except (OSError, ValueError):
        return False
