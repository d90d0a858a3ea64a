"""Applying the patch table through sglang's HookRegistry, all-or-nothing per patch.

Every patch module in `sglang_gemma4_opt.patches` exposes NAME, SUMMARY, UPSTREAM, REMOVE_WHEN and
`prepare() -> list[HookSpec]`. `prepare` resolves and checks its targets and raises
`NotApplicable` / `AlreadyUpstream` / `TargetChanged` instead of returning hooks when it should
stand aside. Hooks are then registered with sglang's `HookRegistry` (which rebinds stale
`from x import f` names in every loaded module) and applied; if any target of a patch did not take
the hook, the patch's other targets are rolled back so nothing is half-applied. No exception leaves
`apply()`: a failure is logged once and reported by `status`.
"""

from __future__ import annotations

import logging
import os
import pkgutil
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable

from . import settings

logger = logging.getLogger("sglang_gemma4_opt")

PLUGIN_NAME = "gemma4_opt"  # the entry-point name, which SGLANG_PLUGINS lists
DIST_NAME = "sglang-gemma4-opt"

APPLIED = "applied"
UPSTREAM = "already upstream"
DISABLED = "disabled"
NOT_APPLICABLE = "not applicable"
FAILED = "failed"


class PatchSkip(Exception):
    status = FAILED


class NotApplicable(PatchSkip):
    status = NOT_APPLICABLE


class AlreadyUpstream(PatchSkip):
    status = UPSTREAM


class Broken(PatchSkip):
    """The plugin's own part (a kernel module, a shipped table) does not load: a failure, shown as such."""

    status = FAILED


class TargetChanged(PatchSkip):
    """The target exists but is not what the patch was written against."""

    status = FAILED


@dataclass(frozen=True)
class HookSpec:
    target: str  # dotted path, as HookRegistry takes it
    hook: Callable
    kind: str = "around"  # "around" (hook(original, *a, **kw)) or "replace"


@dataclass
class PatchResult:
    name: str
    status: str
    reason: str = ""
    targets: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, "targets": list(self.targets)}


_lock = threading.RLock()
_results: dict[str, PatchResult] | None = None


def resolve_attr(target: str):
    """(owner, attribute name, raw attribute) for a dotted target; raw = from __dict__ for classes."""
    obj_path, attr = target.rsplit(".", 1)
    owner = pkgutil.resolve_name(obj_path)
    raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
    if raw is None:
        raw = getattr(owner, attr)
    return owner, attr, raw


def import_first(*module_names: str) -> types.ModuleType:
    """The first of several candidate module layouts that imports (sglang moves modules between releases)."""
    errors = []
    for name in module_names:
        try:
            return __import__(name, fromlist=["_"])
        except ImportError as e:  # ModuleNotFoundError, or an import error inside the module
            errors.append(f"{name}: {e}")
    raise NotApplicable("no module of " + ", ".join(module_names) + " (" + "; ".join(errors) + ")")


def _deterministic_reader():
    """The module that publishes sglang's deterministic-inference flag in this version, found once.

    sglang >= 0.5.13 keeps it in `runtime_context.get_exec().deterministic` (its `server_args.
    get_global_server_args()` is retired and raises); <= 0.5.12 in `get_global_server_args()`. The
    module is cached, not the function, so the attribute is looked up at each call (tests patch it).
    """
    global _DET_READER
    if _DET_READER is None:
        try:
            import sglang.srt.runtime_context as rc  # >= 0.5.13

            if hasattr(rc, "get_exec"):
                _DET_READER = ("exec", rc)
        except Exception:
            pass
    if _DET_READER is None:
        try:
            import sglang.srt.server_args as sa  # <= 0.5.12

            _DET_READER = ("server_args", sa)
        except Exception:
            return None
    return _DET_READER


_DET_READER = None


def sglang_deterministic() -> bool:
    """sglang's --enable-deterministic-inference, read where the running version keeps it.

    False when no server arguments are published (a benchmark or test outside a server). Called on
    every extend-attention call, so the version probe runs once and each call is one attribute read.
    """
    reader = _deterministic_reader()
    if reader is None:
        return False
    kind, mod = reader
    try:
        if kind == "exec":
            return bool(mod.get_exec().deterministic.enable_deterministic_inference)
        return bool(mod.get_global_server_args().enable_deterministic_inference)
    except Exception:
        return False


def _rebind(old: object, new: object) -> None:
    for mod in list(sys.modules.values()):
        if not isinstance(mod, types.ModuleType):
            continue
        try:
            items = list(vars(mod).items())
        except TypeError:
            continue
        for k, v in items:
            if v is old:
                try:
                    setattr(mod, k, new)
                except (AttributeError, TypeError):
                    pass


def _install(name: str, specs: list[HookSpec]) -> PatchResult:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

    source = HookSource(plugin_name=PLUGIN_NAME, dist_name=DIST_NAME)
    before = []
    for spec in specs:
        owner, attr, raw = resolve_attr(spec.target)
        before.append((spec, owner, attr, raw))
    marked_before = {spec.target for spec in specs if spec.target in HookRegistry._patched}  # another plugin's
    registered: list[HookSpec] = []
    try:
        for spec in specs:
            HookRegistry.register(spec.target, spec.hook, HookType[spec.kind.upper()], source=source)
            registered.append(spec)
    except Exception:
        # All or nothing: a hook left registered would be applied by the next apply_hooks() (sglang's loader
        # calls it after every plugin) while status says failed. HookRegistry has no public way to take a
        # hook back; its `_hooks` table is the one place this module reaches into.
        for spec in registered:
            hooks = HookRegistry._hooks.get(spec.target, [])
            hooks[:] = [h for h in hooks if h[1] is not spec.hook]
        raise
    HookRegistry.apply_hooks()

    missing = [spec.target for spec, owner, attr, raw in before if _raw(owner, attr) is raw]
    if not missing:
        return PatchResult(name, APPLIED, targets=tuple(s.target for s in specs))

    # Roll back whatever did take, so the patch is all or nothing.
    for spec, owner, attr, raw in before:
        now = _raw(owner, attr)
        if now is not raw:
            setattr(owner, attr, raw)
            _rebind(now.__func__ if isinstance(now, (classmethod, staticmethod)) else now, raw)
        hooks = HookRegistry._hooks.get(spec.target, [])
        hooks[:] = [h for h in hooks if h[1] is not spec.hook]
        if spec.target not in marked_before:  # a mark another plugin's hook set stays, or it would apply twice
            HookRegistry._patched.discard(spec.target)
    return PatchResult(name, FAILED, f"HookRegistry did not apply {', '.join(missing)}; rolled back")


def _raw(owner, attr):
    if isinstance(owner, type) and attr in owner.__dict__:
        return owner.__dict__[attr]
    return getattr(owner, attr, None)


def _ensure_log_handler() -> None:
    """Make the per-patch lines visible in every sglang process.

    sglang's scheduler processes call load_plugins() before they configure logging, so at that
    moment INFO records would be dropped. With no configured root handler, the plugin's logger gets
    its own stderr handler in sglang's format (and stops propagating, so nothing prints twice).
    """
    if logger.handlers or logging.getLogger().handlers:
        return
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(h)
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _log(result: PatchResult) -> None:
    msg = "sglang-gemma4-opt: patch %s: %s%s"
    args = (result.name, result.status, f" ({result.reason})" if result.reason else "")
    if result.status == FAILED:
        logger.warning(msg, *args)
    else:
        logger.info(msg, *args)


def apply() -> dict[str, PatchResult]:
    """Apply every enabled patch once per process; later calls return the first call's results."""
    global _results
    with _lock:
        if _results is not None:
            return _results
        from .patches import PATCHES, SWITCH_NAMES

        _ensure_log_handler()
        for problem in settings.switch_problems(SWITCH_NAMES):
            logger.warning("sglang-gemma4-opt: %s", problem)
        results: dict[str, PatchResult] = {}
        if not settings.plugin_enabled():
            for p in PATCHES:
                results[p.NAME] = PatchResult(p.NAME, DISABLED, f"{settings.ENV_ENABLE}=0")
            logger.info("sglang-gemma4-opt: disabled by %s=0; sglang runs unpatched", settings.ENV_ENABLE)
            _results = results
            return results

        for p in PATCHES:
            if not settings.patch_enabled(p.NAME):
                res = PatchResult(p.NAME, DISABLED, f"listed in {settings.ENV_DISABLE}")
            else:
                try:
                    res = _install(p.NAME, p.prepare())
                except PatchSkip as e:
                    res = PatchResult(p.NAME, e.status, str(e))
                except Exception as e:  # never let the plugin take sglang down
                    res = PatchResult(p.NAME, FAILED, f"{type(e).__name__}: {e}")
            results[p.NAME] = res
            _log(res)
        counts: dict[str, int] = {}
        for r in results.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        from . import __version__

        logger.info("sglang-gemma4-opt %s in pid %d: %s", __version__, os.getpid(),
                    ", ".join(f"{n} {st}" for st, n in counts.items()))
        _results = results
        return results


def results() -> dict[str, PatchResult] | None:
    return _results


# Plugin paths that raised in this process: the first error turns the path off (a compile error would
# otherwise recompile on every call), is logged once per path, and every call sglang answers since is counted.
_FALLBACKS: dict[str, dict] = {}


def path_off(path: str) -> bool:
    """True once `path` has failed in this process; counts the call, which the caller sends to sglang."""
    rec = _FALLBACKS.get(path)
    if rec is None:
        return False
    rec["calls_to_sglang"] += 1
    return True


def path_failed(path: str, exc: BaseException) -> None:
    """Record that `path` raised: it is off from now on in this process, with one warning."""
    with _lock:
        if path in _FALLBACKS:
            _FALLBACKS[path]["calls_to_sglang"] += 1
            return
        _FALLBACKS[path] = {"error": f"{type(exc).__name__}: {exc}", "calls_to_sglang": 1}
    logger.warning("sglang-gemma4-opt: %s failed (%s: %s); sglang's path runs its calls for the rest of this "
                   "process", path, type(exc).__name__, exc)


def fallbacks() -> dict[str, dict]:
    """{path: {"error": first error, "calls_to_sglang": n}} for the paths that failed in this process."""
    with _lock:
        return {k: dict(v) for k, v in _FALLBACKS.items()}
