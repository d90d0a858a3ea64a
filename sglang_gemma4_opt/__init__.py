"""sglang-gemma4-opt: Gemma4 speedups for sglang on Hopper, routing kept bit-exact.

sglang's plugin loader calls `load_plugin()` (entry point `gemma4_opt` in the group
`sglang.srt.plugins`) in every process; people who embed sglang can call `apply()` themselves.
Both are idempotent.
"""

from __future__ import annotations

__version__ = "0.1.0"


def apply():
    """Apply every enabled patch (once per process) and return {name: PatchResult}."""
    from .core import apply as _apply

    return _apply()


def load_plugin() -> None:
    """Entry point for sglang's `load_plugins()`; never raises."""
    try:
        apply()
    except Exception:  # pragma: no cover - apply() already catches per patch
        import logging

        logging.getLogger("sglang_gemma4_opt").exception("sglang-gemma4-opt: could not apply")


__all__ = ["apply", "load_plugin", "__version__"]
