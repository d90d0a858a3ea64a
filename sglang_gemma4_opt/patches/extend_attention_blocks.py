"""Patch: Hopper extend-attention block sizes for query head dims 129-256.

Target:   `_get_block_sizes_for_extend_attention` in
          `sglang.kernels.ops.attention.extend_attention` (sglang >= 0.5.16) or
          `sglang.srt.layers.attention.triton_ops.extend_attention` (<= 0.5.15).
Why:      on compute capability 9.x sglang picks (BLOCK_M, BLOCK_N) = (128, 64) for head dims up to
          256; for Gemma4's 256-dim sliding layers (64, 64) is 1.2-1.5x faster on H200 and
          bit-identical (BLOCK_N, and so the KV accumulation order, is unchanged).
Upstream: sglang PR #26588.
Remove:   when the oldest supported sglang returns (64, 64) there (the patch already stands aside
          on such versions, detected by probing the function).
"""

from __future__ import annotations

import inspect

from ..core import AlreadyUpstream, HookSpec, TargetChanged, import_first

NAME = "extend_attention_blocks"
SUMMARY = "(BLOCK_M, BLOCK_N) = (64, 64) for extend attention at head dim 129-256 on sm90"
UPSTREAM = "sglang PR #26588"
REMOVE_WHEN = "sglang >= 0.5.13 is the oldest supported version"

MODULES = (
    "sglang.kernels.ops.attention.extend_attention",
    "sglang.srt.layers.attention.triton_ops.extend_attention",
)
FUNC = "_get_block_sizes_for_extend_attention"
HOPPER_BLOCKS = (64, 64)
_MISSING = object()


def hopper_blocks(module, Lq: int) -> bool:
    """True when the running call is one this patch changes (decided per call, on live device info)."""
    if getattr(module, "_is_hip", False) or not getattr(module, "_is_cuda", False):
        return False
    cap = getattr(module, "CUDA_CAPABILITY", None)
    return cap is not None and cap[0] == 9 and 129 <= Lq <= 256


def make_hook(module):
    def block_sizes_hook(original, Lq, Lv, *args, **kwargs):
        res = original(Lq, Lv, *args, **kwargs)
        try:
            if hopper_blocks(module, Lq):
                dmodel, dpe, dv, _, _, num_warps = res
                return (dmodel, dpe, dv, *HOPPER_BLOCKS, num_warps)
        except Exception:  # unexpected return shape: keep sglang's answer
            pass
        return res

    return block_sizes_hook


def _probe(module, func, Lq: int):
    """What sglang itself returns on an sm90 GPU, computed by briefly faking the module's device globals."""
    saved = {k: module.__dict__.get(k, _MISSING) for k in ("_is_cuda", "_is_hip", "CUDA_CAPABILITY")}
    try:
        module._is_cuda, module._is_hip, module.CUDA_CAPABILITY = True, False, (9, 0)
        return func(Lq, Lq)
    finally:
        for k, v in saved.items():
            if v is _MISSING:
                module.__dict__.pop(k, None)
            else:
                setattr(module, k, v)


def prepare() -> list[HookSpec]:
    module = import_first(*MODULES)
    func = getattr(module, FUNC, None)
    if func is None:
        raise TargetChanged(f"{module.__name__}.{FUNC} is missing")
    params = list(inspect.signature(func).parameters)
    if params[:2] != ["Lq", "Lv"]:
        raise TargetChanged(f"{FUNC} takes {params}, expected (Lq, Lv)")
    res = _probe(module, func, 256)
    if not (isinstance(res, tuple) and len(res) == 6):
        raise TargetChanged(f"{FUNC} returned {res!r}, expected a 6-tuple")
    if tuple(res[3:5]) == HOPPER_BLOCKS:
        raise AlreadyUpstream(f"{module.__name__} already picks {HOPPER_BLOCKS} at head dim 256 on sm90")
    return [HookSpec(f"{module.__name__}.{FUNC}", make_hook(module), "around")]
