"""Patch: Hopper extend-attention kernel for head dims 256 and 512, decided per call.

Target:   `extend_attention_fwd` in `sglang.kernels.ops.attention.extend_attention` (sglang >= 0.5.16)
          or `sglang.srt.layers.attention.triton_ops.extend_attention` (<= 0.5.15), and every module
          that imported it by name (HookRegistry rebinds them; the triton backend imports it when it is
          built, after the plugin applied, so it gets the hooked one).
Why:      Gemma4 prefill runs sglang's Triton extend attention (head dim 512 on the global layers rules
          out the usual Hopper kernels). sglang's kernel launches with num_stages=1 and walks every KV
          tile from 0 even under a sliding window; on H200 it reaches ~85 TFLOP/s at head dim 256 with
          the (64, 64) blocks of PR #26588. `kernels/extend_attention.py` is pipelined, visits only the
          tiles a window or the causal diagonal leave, and uses per-GPU block shapes
          (`kernels/NOTES-extend-attention.md` has the measurements). Head dim 512 without prefix
          keys runs `kernels/extend_attention_hd512.py` (Gluon: one softmax shared by two warpgroups,
          QK computed once); `SGLANG_GEMMA4_OPT_DISABLE=extend_attention_hd512` keeps it on the Triton
          kernel, and an error in it falls back to the Triton kernel for the rest of the process.
Routing:  sglang's deterministic-inference mode always runs sglang's kernel. Otherwise every call is
          checked (Python scalars and tensor metadata only, no device sync): causal, no
          custom mask, no sinks, k/v scales None or 1.0, logit cap <= 0, no xai temperature, head dim
          256 or 512 for q/k/v/o and the KV pool, bf16 or fp16 everywhere, compute capability 9.x, and
          any argument newer sglang added at its neutral value; everything else runs sglang's kernel.
          `SGLANG_GEMMA4_OPT_DISABLE=extend_attention_kernel` turns the patch off.
Upstream: none (plugin-only kernel).
Remove:   when sglang's own extend attention is as fast at these head dims on Hopper.
"""

from __future__ import annotations

import importlib
import inspect
import logging

from ..core import (Broken, HookSpec, NotApplicable, TargetChanged, import_first, path_failed, path_off,
                    sglang_deterministic)
from ..settings import trace_enabled

NAME = "extend_attention_kernel"
HD512_SWITCH = "extend_attention_hd512"  # SGLANG_GEMMA4_OPT_DISABLE: only the Gluon head-dim-512 kernel off
SUMMARY = "Hopper Triton extend attention (pipelined, window-aware) for head dims 256/512, Gluon at 512"
UPSTREAM = "none (plugin-only kernel)"
REMOVE_WHEN = "sglang's extend attention matches it on Hopper at head dims 256/512"

MODULES = (
    "sglang.kernels.ops.attention.extend_attention",
    "sglang.srt.layers.attention.triton_ops.extend_attention",
)
FUNC = "extend_attention_fwd"
# sglang 0.5.12's signature: the kernel takes exactly these
BASE_PARAMS = (
    "q_extend", "k_extend", "v_extend", "o_extend", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr",
    "kv_indices", "custom_mask", "is_causal", "mask_indptr", "max_len_extend", "k_scale", "v_scale",
    "sm_scale", "logit_cap", "skip_prefix_custom_mask", "sliding_window_size", "sinks", "window_kv_offsets",
    "xai_temperature_len",
)
# arguments later sglang versions added that only hint and never change the result
IGNORED = frozenset({"extend_seq_lens_cpu"})

logger = logging.getLogger("sglang_gemma4_opt")
_traced: set = set()


def _trace(call: dict, why) -> None:
    """SGLANG_GEMMA4_OPT_TRACE=1: one log line per kind of call (head dim, heads, window, length, route)."""
    try:
        q = call.get("q_extend")
        kind = (tuple(q.shape[1:]) if q is not None else None, call.get("sliding_window_size"),
                call.get("max_len_extend"), why)
    except Exception:  # tracing must never matter
        return
    if kind not in _traced and len(_traced) < 256:
        _traced.add(kind)
        logger.info("sglang-gemma4-opt trace: extend attention q %s window %s max_len %s -> %s", kind[0], kind[1],
                    kind[2], "plugin kernel" if why is None else f"sglang's kernel ({why})")


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and not hasattr(a, "shape") and bool(a == b)
    except Exception:
        return False


def route(call: dict, extra_defaults: dict) -> str | None:
    """None when the plugin's kernel takes this call, else the reason sglang's kernel runs it.

    call: every argument by name; extra_defaults: the running sglang's arguments beyond BASE_PARAMS
    with their defaults (a call passing any of them at another value goes to sglang's kernel).
    """
    from ..kernels import extend_attention as ka

    for k, default in extra_defaults.items():
        if k in call and k not in IGNORED and not _same(call[k], default):
            return f"{k}={call[k]!r}"
    base = {k: call[k] for k in BASE_PARAMS if k in call}
    try:
        return ka.unsupported_reason(**base)
    except TypeError as e:  # a required argument missing: sglang's kernel raises its own error
        return f"arguments: {e}"


def make_hook(params: tuple[str, ...], extra_defaults: dict):
    """AROUND hook for sglang's extend_attention_fwd whose parameters are `params` (in order)."""
    from ..kernels import extend_attention as ka

    trace = trace_enabled()  # read once per process: the hook runs on every attention call

    def extend_attention_hook(original, *args, **kwargs):
        if path_off(NAME):  # the plugin's kernel failed before in this process
            return original(*args, **kwargs)
        call = dict(zip(params, args))
        call.update(kwargs)
        try:
            # deterministic-inference mode keeps sglang's own (batch-invariant) kernel
            why = "deterministic inference" if sglang_deterministic() else route(call, extra_defaults)
        except Exception as e:  # never let routing take the call down
            why = f"routing failed: {e}"
        if trace:
            _trace(call, why)
        if why is None:
            try:
                ka.extend_attention_fwd(**{k: call[k] for k in BASE_PARAMS if k in call})
                return None
            except Exception as e:  # e.g. a compile failure: sglang's kernel answers, now and from now on
                if trace:
                    _trace(call, f"plugin kernel raised {type(e).__name__}: {e}")
                path_failed(NAME, e)
        return original(*args, **kwargs)

    extend_attention_hook.route = route  # for tests and the benchmark
    return extend_attention_hook


def signature_info(func) -> tuple[tuple[str, ...], dict]:
    """(parameter names in order, {added parameter: default}) of sglang's function; raises TargetChanged."""
    sig = inspect.signature(func)
    ps = list(sig.parameters.values())
    names = tuple(p.name for p in ps)
    if names[:len(BASE_PARAMS)] != BASE_PARAMS:
        raise TargetChanged(f"{FUNC} takes {list(names)}, expected {list(BASE_PARAMS)} first")
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ps):
        raise TargetChanged(f"{FUNC} takes *args/**kwargs")
    extra = {}
    for p in ps[len(BASE_PARAMS):]:
        if p.default is inspect.Parameter.empty and p.name not in IGNORED:
            raise TargetChanged(f"{FUNC} has a new required argument {p.name}")
        extra[p.name] = p.default
    return names, extra


def prepare() -> list[HookSpec]:
    module = import_first(*MODULES)
    func = getattr(module, FUNC, None)
    if func is None:
        raise NotApplicable(f"{module.__name__} has no {FUNC}")
    names, extra = signature_info(func)
    try:  # triton must import for the kernel
        importlib.import_module("..kernels.extend_attention", __package__)
    except Exception as e:  # the plugin's own module is broken: a failure, not an absent target
        raise Broken(f"kernel module does not import: {type(e).__name__}: {e}")
    return [HookSpec(f"{module.__name__}.{FUNC}", make_hook(names, extra), "around")]
