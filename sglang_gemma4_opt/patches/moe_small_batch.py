"""Patch: the plugin's own fused-MoE kernels at decode sizes (small batch) and at prefill sizes (expert-
grouped GEMMs), each decided per call from a per-GPU table.

Target:   `fused_experts_impl` in `sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe` (what sglang's
          inplace/outplace fused-experts ops run for the Triton MoE backend; Gemma4's FusedMoE uses it).
          One AROUND hook for both paths: sglang's hook registry keeps one hook per target.
Why:      decode: sglang runs moe_align_block_size, an up GEMM in 16-row tensor-core tiles, the
          activation, a down GEMM and moe_sum: five launches for a memory-bound job. On H200 Gemma4's MoE
          at M=1 takes ~40 us where streaming its 8 experts' weights takes ~22 us.
          `kernels/moe_small_batch.py` does it in two (up + activation, down + weighted sum).
          prefill: sglang's GEMMs load every tile through pointer loads, write gate/up to a [M*topk, 2N]
          buffer, run the activation as a third launch and sum the top-k with torch; at M >= 2048 on H200
          that runs at 250-390 TFLOP/s whatever the tile table. `kernels/moe_grouped.py`: weight tiles through
          TMA, gate and up in one program with the activation fused, the down GEMM reading the sorted
          intermediate through TMA, an expert's last tile at half height when half of it is padding, a
          streaming top-k sum.
Routing:  per call, cheapest check first: M between the small-batch table's max and the grouped table's
          min (`configs/moe_small_batch.json`, `configs/moe_grouped.json`; a GPU or shape in neither never
          takes either path) -> sglang with one comparison; sglang's deterministic inference -> sglang (the
          path depends on the batch size, so it would break batch invariance); then every argument:
          bf16/fp16, no quantization (fp8/int8/int4, scales, zero points, block shape), no biases, gated
          silu/gelu, no gemm1 alpha/limit or swiglu limit, router weight on the output, combined output,
          and any argument newer sglang added at its default. Routing (top-k ids and weights) is an input
          here and is not touched. Numerics: sglang's rounding points (gate/up, activation, weighted rows,
          one rounding of the sum); only the K-reduction order differs, as between sglang's own tile configs.
Switches: `SGLANG_GEMMA4_OPT_DISABLE=moe_small_batch` turns both paths off; `SGLANG_GEMMA4_OPT_DISABLE=
          moe_grouped` only the prefill path (read when the patch is applied).
Upstream: none (plugin-only kernels).
Remove:   when sglang's Triton MoE reaches the weight-streaming roof at decode sizes and tensor-core
          throughput at prefill sizes.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging

from ..core import (Broken, HookSpec, NotApplicable, TargetChanged, import_first, path_failed, path_off,
                    sglang_deterministic)
from ..settings import disabled_patches, trace_enabled

NAME = "moe_small_batch"
SUMMARY = ("plugin fused-MoE kernels: decode sizes in two Triton kernels (up+act, down+sum), prefill sizes as "
           "expert-grouped TMA GEMMs (switch moe_grouped); per-GPU tables")
UPSTREAM = "none (plugin-only kernels)"
REMOVE_WHEN = "sglang's Triton MoE streams weights at the HBM roof at decode sizes and keeps the tensor cores busy at prefill"
GROUPED_SWITCH = "moe_grouped"  # SGLANG_GEMMA4_OPT_DISABLE=moe_grouped: only the prefill path off

MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe"
FUNC = "fused_experts_impl"
# sglang 0.5.11/0.5.12's parameters, in order, each with the value this path supports (None: any)
BASE_PARAMS = (
    "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "b1", "b2", "inplace", "activation", "is_gated",
    "apply_router_weight_on_input", "use_fp8_w8a8", "use_int8_w8a8", "use_int8_w8a16", "use_int4_w4a16",
    "per_channel_quant", "w1_scale", "w2_scale", "w1_zp", "w2_zp", "a1_scale", "a2_scale", "block_shape",
    "no_combine", "routed_scaling_factor", "gemm1_alpha", "gemm1_limit", "filter_expert", "swiglu_limit",
)
MUST_BE = {
    "b1": None, "b2": None, "apply_router_weight_on_input": False, "use_fp8_w8a8": False, "use_int8_w8a8": False,
    "use_int8_w8a16": False, "use_int4_w4a16": False, "per_channel_quant": False, "w1_scale": None,
    "w2_scale": None, "w1_zp": None, "w2_zp": None, "a1_scale": None, "a2_scale": None, "block_shape": None,
    "no_combine": False, "gemm1_alpha": None, "gemm1_limit": None, "swiglu_limit": None,
}

logger = logging.getLogger("sglang_gemma4_opt")
_traced: set = set()
_gpu_names: dict = {}


def gpu_of(t) -> str | None:
    """The name of the CUDA GPU holding tensor t (cached per device index), None off CUDA."""
    if not getattr(t, "is_cuda", False):
        return None
    import torch

    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    name = _gpu_names.get(idx)
    if name is None:
        name = _gpu_names[idx] = torch.cuda.get_device_name(idx)
    return name


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and not hasattr(a, "shape") and bool(a == b)
    except Exception:
        return False


def _call_reason(call: dict, extra_defaults: dict):
    """Why neither plugin path can take this call's arguments (None: they can)."""
    for k, v in MUST_BE.items():
        if not _same(call.get(k), v):
            return f"{k}={call.get(k)!r}"
    rsf = call.get("routed_scaling_factor")
    if rsf is not None and not isinstance(rsf, (int, float)):
        return f"routed_scaling_factor {type(rsf).__name__}"
    for k, default in extra_defaults.items():
        if k in call and not _same(call[k], default):
            return f"{k}={call[k]!r}"
    return None


def _lookup(call: dict, table: dict, params_for):
    from ..kernels import moe_small_batch as km

    x = call["hidden_states"]
    gpu = gpu_of(x)
    if gpu is None:
        return None, "not on a CUDA device"
    w1 = call["w1"]
    key = km.shape_key(w1.shape[0], w1.shape[1] // 2, w1.shape[2], call["topk_ids"].shape[-1], x.dtype)
    params = params_for(table, gpu, key, x.shape[0])
    if params is None:
        return None, f"M={x.shape[0]} {key}: not in this GPU's table"
    return params, None


def route(call: dict, extra_defaults: dict, table: dict):
    """Small-batch path: (params, None) when its kernels take this call, else (None, reason sglang's path runs it)."""
    from ..kernels import moe_small_batch as km

    params, why = _lookup(call, table, km.params_for)
    why = why or _call_reason(call, extra_defaults) or km.unsupported_reason(
        call["hidden_states"], call["w1"], call["w2"], call["topk_weights"], call["topk_ids"], call["activation"],
        call["is_gated"])
    return (params, None) if why is None else (None, why)


def route_grouped(call: dict, extra_defaults: dict, table: dict):
    """Prefill path: (GroupedParams, None) when the grouped kernels take this call, else (None, reason)."""
    from ..kernels import moe_grouped as kg
    from ..kernels import moe_small_batch as km

    params, why = _lookup(call, table, kg.params_for)
    args = (call["hidden_states"], call["w1"], call["w2"], call["topk_weights"], call["topk_ids"], call["activation"])
    why = (why or _call_reason(call, extra_defaults) or km.unsupported_reason(*args, call["is_gated"])
           or kg.unsupported_reason(*args))
    return (params, None) if why is None else (None, why)


def grouped_enabled() -> bool:
    return GROUPED_SWITCH not in disabled_patches()


def _trace(call: dict, why, path: str) -> None:
    try:
        kind = (tuple(call["hidden_states"].shape), tuple(call["w1"].shape), why)
    except Exception:
        return
    if kind not in _traced and len(_traced) < 256:
        _traced.add(kind)
        logger.info("sglang-gemma4-opt trace: fused MoE x %s w1 %s -> %s", kind[0], kind[1],
                    f"plugin {path} kernels" if why is None else f"sglang's path ({why})")


def make_hook(signature: inspect.Signature, extra_defaults: dict, table: dict | None = None,
              grouped_table: dict | None = None):
    """AROUND hook for sglang's fused_experts_impl; the tables default to the shipped per-GPU ones (the
    grouped one is empty when the moe_grouped switch is off)."""
    from ..kernels import moe_grouped as kg
    from ..kernels import moe_small_batch as km

    trace = trace_enabled()
    table = km.load_table() if table is None else table
    if not grouped_enabled():
        grouped_table = {}
    elif grouped_table is None:
        try:
            grouped_table = kg.load_table()
        except Exception as e:  # a broken grouped table must not take the decode path down
            logger.warning("sglang-gemma4-opt: moe_grouped table does not load (%s); prefill MoE stays sglang's", e)
            grouped_table = {}
    max_m = max((e[0] for shapes in table.values() for e in shapes.values()), default=0)
    min_g = min((e[0] for shapes in grouped_table.values() for e in shapes.values()), default=None)

    def fused_experts_impl_hook(original, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        m = getattr(x, "shape", (max_m + 1,))[0]
        if m > max_m and (min_g is None or m < min_g):  # between the tables: one comparison, then sglang
            return original(*args, **kwargs)
        grouped = m > max_m
        path = "grouped" if grouped else "small-batch"
        if path_off(f"{NAME} ({path} path)"):  # failed before in this process
            return original(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            call = bound.arguments
            if sglang_deterministic():
                params, why = None, "deterministic inference"
            elif grouped:
                params, why = route_grouped(call, extra_defaults, grouped_table)
            else:
                params, why = route(call, extra_defaults, table)
        except Exception as e:  # never let routing take the call down
            call, params, why = None, None, f"routing failed: {e}"
        if trace and call is not None:
            _trace(call, why, path)
        if params is not None:
            try:
                out = call["hidden_states"] if call["inplace"] else None
                fn = kg.fused_moe_grouped if grouped else km.fused_moe_small_batch
                return fn(call["hidden_states"], call["w1"], call["w2"], call["topk_weights"], call["topk_ids"],
                          call["activation"], out=out, routed_scaling_factor=call["routed_scaling_factor"],
                          params=params)
            except Exception as e:  # e.g. a compile failure: sglang's path answers, now and from now on
                path_failed(f"{NAME} ({path} path)", e)
        return original(*args, **kwargs)

    fused_experts_impl_hook.route = route
    fused_experts_impl_hook.route_grouped = route_grouped
    return fused_experts_impl_hook


def signature_info(func) -> tuple[inspect.Signature, dict]:
    """(signature, {parameter newer sglang added: default}); raises TargetChanged."""
    sig = inspect.signature(func)
    ps = list(sig.parameters.values())
    names = tuple(p.name for p in ps)
    if names[:len(BASE_PARAMS)] != BASE_PARAMS:
        raise TargetChanged(f"{FUNC} takes {list(names)}, expected {list(BASE_PARAMS)} first")
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ps):
        raise TargetChanged(f"{FUNC} takes *args/**kwargs")
    extra = {}
    for p in ps[len(BASE_PARAMS):]:
        if p.default is inspect.Parameter.empty:
            raise TargetChanged(f"{FUNC} has a new required argument {p.name}")
        extra[p.name] = p.default
    return sig, extra


@contextlib.contextmanager
def stock_path():
    """Inside: sglang's module global is its own fused_experts_impl (for tuners that time sglang's path)."""
    mod = importlib.import_module(MODULE)
    old = mod.__dict__[FUNC]
    setattr(mod, FUNC, stock_impl())
    try:
        yield
    finally:
        setattr(mod, FUNC, old)


def stock_impl():
    """sglang's own fused_experts_impl, whether or not the patch is applied (for benchmarks and tests)."""
    fn = getattr(importlib.import_module(MODULE), FUNC)
    return getattr(fn, "__wrapped__", fn)


def prepare() -> list[HookSpec]:
    module = import_first(MODULE)
    func = getattr(module, FUNC, None)
    if func is None:
        raise NotApplicable(f"{module.__name__} has no {FUNC}")
    sig, extra = signature_info(func)
    try:
        km = importlib.import_module("..kernels.moe_small_batch", __package__)
        table = km.load_table()
        kg = importlib.import_module("..kernels.moe_grouped", __package__)
    except Exception as e:  # the plugin's own module or shipped table is broken: a failure
        raise Broken(f"kernel module or table does not load: {type(e).__name__}: {e}")
    try:
        grouped = kg.load_table() if grouped_enabled() else {}
    except Exception:
        grouped = {}  # make_hook logs it; the decode path still applies
    if not table and not grouped:
        raise NotApplicable("no GPU in configs/moe_small_batch.json or configs/moe_grouped.json")
    return [HookSpec(f"{module.__name__}.{FUNC}", make_hook(sig, extra), "around")]
