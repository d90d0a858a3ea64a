"""Patch: by-head launch of Gemma4's fused Q/K/V RMSNorm for small batches.

Target:   `gemma_qkv_rmsnorm` in `sglang.srt.layers.gemma4_fused_ops` (0.5.12) or
          `sglang.kernels.ops.layernorm.gemma4_fused_ops` (newer layouts), and every module that
          imported it by name (`sglang.srt.models.gemma4_causal` at least: HookRegistry rebinds them).
Why:      the stock kernel runs one program per token, so at decode sizes (M=1) a single program
          loops over all 32 heads: 11.6 us on H200. One program per token-head takes 1.45 us.
          Results are bit-identical for every M and dtype.
Upstream: sglang PR #26588 (kernel with a BY_HEAD constexpr).
Remove:   when the oldest supported sglang's kernel has BY_HEAD (detected: the patch stands aside).
          Not applicable on sglang 0.5.11, whose Gemma4 attention runs three separate norms.
"""

from __future__ import annotations

import inspect
import logging

from ..core import AlreadyUpstream, HookSpec, NotApplicable, TargetChanged

NAME = "qkv_rmsnorm"
SUMMARY = "Q/K/V RMSNorm kernel with one program per token-head for M <= 256"
UPSTREAM = "sglang PR #26588"
REMOVE_WHEN = "sglang >= 0.5.13 is the oldest supported version"

MODULES = (
    "sglang.kernels.ops.layernorm.gemma4_fused_ops",
    "sglang.srt.layers.gemma4_fused_ops",
)
FUNC = "gemma_qkv_rmsnorm"
KERNEL = "_gemma_qkv_rmsnorm_kernel"
SIGNATURE = ["q", "k", "v", "q_weight", "k_weight", "num_q_heads", "num_kv_heads", "head_dim", "eps"]

logger = logging.getLogger("sglang_gemma4_opt")
_fallback_logged = False


def make_hook():
    from ..kernels.qkv_rmsnorm import gemma_qkv_rmsnorm

    def qkv_rmsnorm_hook(original, *args, **kwargs):
        global _fallback_logged
        try:
            return gemma_qkv_rmsnorm(*args, **kwargs)
        except Exception as e:  # sglang's own kernel decides (and raises its own errors)
            if not _fallback_logged:
                _fallback_logged = True
                logger.warning("sglang-gemma4-opt: qkv_rmsnorm fell back to sglang's kernel: %s", e)
            return original(*args, **kwargs)

    return qkv_rmsnorm_hook


def _find_module():
    import importlib

    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, FUNC):
            return mod
    raise NotApplicable(f"this sglang has no {FUNC} (Gemma4 attention runs separate norms)")


def prepare() -> list[HookSpec]:
    mod = _find_module()
    func = getattr(mod, FUNC)
    params = list(inspect.signature(func).parameters)
    if params != SIGNATURE:
        raise TargetChanged(f"{FUNC} takes {params}, expected {SIGNATURE}")
    kernel = getattr(mod, KERNEL, None)
    if kernel is not None and "BY_HEAD" in getattr(kernel, "arg_names", ()):
        raise AlreadyUpstream(f"{mod.__name__}.{KERNEL} already has BY_HEAD")
    # Import the model module first so HookRegistry rebinds its `from ... import gemma_qkv_rmsnorm`.
    try:
        import sglang.srt.models.gemma4_causal  # noqa: F401
    except Exception:  # a later import of it reads the patched name from the source module
        pass
    return [HookSpec(f"{mod.__name__}.{FUNC}", make_hook(), "around")]
