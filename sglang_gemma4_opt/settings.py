"""Environment switches, read each time they are needed (never cached at import).

SGLANG_GEMMA4_OPT=0            turns the whole plugin off (also: false, off, no).
SGLANG_GEMMA4_OPT_DISABLE=a,b  turns off single patches by name (see `sglang-gemma4-opt status`);
                               `all` turns every patch off.
SGLANG_GEMMA4_OPT_TRACE=1      logs, once per kind of call, which kernel a routed call went to and why
                               (extend attention: the plugin's kernel or sglang's, with the reason);
                               read when the patch is applied, not on every call.
"""

from __future__ import annotations

import os

ENV_ENABLE = "SGLANG_GEMMA4_OPT"
ENV_DISABLE = "SGLANG_GEMMA4_OPT_DISABLE"
ENV_TRACE = "SGLANG_GEMMA4_OPT_TRACE"

_FALSE = {"0", "false", "off", "no", "disable", "disabled"}
_TRUE = {"1", "true", "on", "yes", "enable", "enabled"}


def plugin_enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in _FALSE


def disabled_patches() -> set[str]:
    raw = os.environ.get(ENV_DISABLE, "")
    return {p.strip() for p in raw.replace(";", ",").replace(" ", ",").split(",") if p.strip()}


def patch_enabled(name: str) -> bool:
    off = disabled_patches()
    return plugin_enabled() and name not in off and "all" not in off


def trace_enabled() -> bool:
    return os.environ.get(ENV_TRACE, "0").strip().lower() not in _FALSE | {""}


def switch_problems(known: set[str] | frozenset[str]) -> list[str]:
    """What the plugin's variables say that it does not understand: a value of SGLANG_GEMMA4_OPT that is no
    switch value (the plugin then stays on), and names in SGLANG_GEMMA4_OPT_DISABLE that are no patch or
    switch in `known` (a typo there would otherwise leave the patch on without a word)."""
    out = []
    raw = os.environ.get(ENV_ENABLE)
    if raw is not None and raw.strip().lower() not in _FALSE | _TRUE:
        out.append(f"{ENV_ENABLE}={raw!r} is not a switch value (0/1, false/true, off/on, no/yes); the plugin stays on")
    unknown = sorted(disabled_patches() - set(known) - {"all"})
    if unknown:
        out.append(f"{ENV_DISABLE} names {', '.join(unknown)}: no patch or switch has that name "
                   f"(known: {', '.join(sorted(known))})")
    return out
