"""How far a Gemma4 routing (router + top-k routing) drifts from the unfused reference.

The reference is what sglang 0.5.12 runs (`sglang_gemma4_opt.kernels.routing`): RMSNorm without
weight, x the bf16 product scale * hidden**-0.5, proj; torch.topk on the logits, softmax over the
top-k in the logits' dtype, x per_expert_scale[ids]. The candidates: sglang >= 0.5.13's fused
kernels (`upstream`: the router's scale folded into the norm weight, then one Triton launch for
top-k + fp32 softmax + scale), `upstream-post-topk` (torch.topk, then its fused softmax/scale
kernel), or any `module:function` / `file.py:function` with the signature
`(gating_output, per_expert_scale, topk) -> (weights [T, K], ids [T, K])`.

Metrics per token: its top-k expert SET differs; same set, different ORDER; |Δweight| with weights
aligned by expert id (an expert chosen by one side only counts its whole weight).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

from ..kernels import routing as ref

KERNEL_REL = Path("sglang") / "kernels" / "ops" / "moe" / "gemma4_routing.py"


# ----------------------------------------------------------------------------------------- metrics
def dense_weights(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] float64 map expert id -> weight (0 where not chosen); float64 so the map adds no error."""
    out = torch.zeros(weights.shape[0], num_experts, dtype=torch.float64, device=weights.device)
    return out.scatter_(1, ids.long(), weights.to(torch.float64))


def compare(ref_w: torch.Tensor, ref_ids: torch.Tensor, cand_w: torch.Tensor, cand_ids: torch.Tensor,
            num_experts: int) -> dict:
    """Drift of one candidate output from the reference over T tokens (both [T, K]).

    Mean |Δweight| is over the (token, expert) pairs that either side chose, so a token whose set
    differs contributes the weights it moved; the `_same_set` figures leave those tokens out and
    show the numeric drift alone.
    """
    if ref_ids.shape != cand_ids.shape or ref_w.shape != cand_w.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref_ids.shape)}, candidate {tuple(cand_ids.shape)}")
    r_ids, c_ids = ref_ids.long().cpu(), cand_ids.long().cpu()
    set_diff = (r_ids.sort(dim=1).values != c_ids.sort(dim=1).values).any(dim=1)
    order_diff = ~set_diff & (r_ids != c_ids).any(dim=1)
    delta = (dense_weights(ref_w.cpu(), r_ids, num_experts) - dense_weights(cand_w.cpu(), c_ids, num_experts)).abs()
    chosen = torch.zeros_like(delta, dtype=torch.bool)
    chosen.scatter_(1, r_ids, True).scatter_(1, c_ids, True)
    same = ~set_diff
    parts = {
        "tokens": r_ids.shape[0],
        "set_differs": int(set_diff.sum()),
        "order_differs": int(order_diff.sum()),
        "max_abs_dweight": float(delta.max()) if delta.numel() else 0.0,
        "max_abs_dweight_same_set": float(delta[same].max()) if same.any() else 0.0,
        "sum_abs_dweight": float(delta.sum()),
        "chosen_pairs": int(chosen.sum()),
        "sum_abs_dweight_same_set": float(delta[same].sum()),
        "chosen_pairs_same_set": int(chosen[same].sum()),
        "ids_equal": bool(torch.equal(r_ids, c_ids)),
        "weights_equal": bool(torch.equal(ref_w.cpu(), cand_w.cpu())),
        "candidate_dtypes": [str(cand_w.dtype), str(cand_ids.dtype)],
    }
    return _finish(parts)


def _finish(p: dict) -> dict:
    T = p["tokens"]
    p["set_differs_share"] = p["set_differs"] / T if T else 0.0
    p["order_differs_share"] = p["order_differs"] / T if T else 0.0
    p["mean_abs_dweight"] = p["sum_abs_dweight"] / p["chosen_pairs"] if p["chosen_pairs"] else 0.0
    n = p["chosen_pairs_same_set"]
    p["mean_abs_dweight_same_set"] = p["sum_abs_dweight_same_set"] / n if n else 0.0
    return p


def merge(parts: list[dict]) -> dict:
    """`compare` results of several batches combined as if they were one batch."""
    out = {k: sum(p[k] for p in parts) for k in ("tokens", "set_differs", "order_differs", "sum_abs_dweight",
                                                  "chosen_pairs", "sum_abs_dweight_same_set", "chosen_pairs_same_set")}
    out["max_abs_dweight"] = max((p["max_abs_dweight"] for p in parts), default=0.0)
    out["max_abs_dweight_same_set"] = max((p["max_abs_dweight_same_set"] for p in parts), default=0.0)
    out["ids_equal"] = all(p["ids_equal"] for p in parts)
    out["weights_equal"] = all(p["weights_equal"] for p in parts)
    out["candidate_dtypes"] = sorted({d for p in parts for d in p["candidate_dtypes"]})
    return _finish(out)


# -------------------------------------------------------------------------------------- candidates
def _load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernel_file(sglang_src: str | None) -> Path:
    """Where sglang >= 0.5.13 keeps its Gemma4 routing kernels: in `sglang_src` (an unzipped sglang
    wheel or source tree, the `sglang` package folder, or the .py file itself), else the installed sglang.

    Only this one file is loaded (it imports nothing but torch and triton): a second whole sglang
    cannot be imported next to the installed one.
    """
    if sglang_src:
        p = Path(sglang_src)
        for cand in (p, p / KERNEL_REL, p / Path(*KERNEL_REL.parts[1:]), p / "python" / KERNEL_REL):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"no {KERNEL_REL} under {p}")
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sglang is not installed; pass --sglang-src")
    f = Path(list(spec.submodule_search_locations)[0]) / Path(*KERNEL_REL.parts[1:])
    if not f.is_file():
        raise FileNotFoundError(f"the installed sglang has no {Path(*KERNEL_REL.parts[1:])} (fused Gemma4 routing "
                                f"arrived in 0.5.13); pass --sglang-src with a newer sglang")
    return f


def load_upstream(sglang_src: str | None):
    return _load_file(kernel_file(sglang_src), "_g4opt_upstream_gemma4_routing")


def load_function(spec: str) -> Callable:
    """'package.module:function' or 'path/to/file.py:function'."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"candidate {spec!r}: expected module:function or file.py:function")
    if mod_name.endswith(".py") or os.sep in mod_name:
        mod = _load_file(Path(mod_name), "_g4opt_candidate_" + Path(mod_name).stem)
    else:
        mod = importlib.import_module(mod_name)
    return getattr(mod, fn_name)


def upstream_post_topk(mod) -> Callable:
    def fn(gating_output, per_expert_scale, topk):
        vals, ids = torch.topk(gating_output, k=topk, dim=-1)
        return mod.gemma_routing_post_topk(vals, ids, per_expert_scale)

    return fn


def is_triton_candidate(name: str) -> bool:
    return name in ("upstream", "upstream-post-topk")


def get_candidate(name: str, sglang_src: str | None) -> tuple[Callable, str]:
    """(routing function, where it came from)."""
    if is_triton_candidate(name):
        mod = load_upstream(sglang_src)
        fn = mod.gemma4_fused_routing if name == "upstream" else upstream_post_topk(mod)
        return fn, str(Path(mod.__file__))
    return load_function(name), name


# ------------------------------------------------------------------------------------------ router
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, str]:
    """RMSNorm as the server runs it: sgl_kernel's CUDA kernel on CUDA tensors when importable
    (Gemma4RMSNorm.forward_cuda), else the same math in torch (fp32, x weight, cast back)."""
    if x.is_cuda:
        try:
            from sgl_kernel import rmsnorm as sgl_rmsnorm

            return sgl_rmsnorm(x, weight.to(x.dtype), eps), "sgl_kernel.rmsnorm"
        except ImportError:
            pass
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5) * weight.float()
    return out.type_as(x), "torch (fp32)"


def router_unfused(x, scale, proj, eps=1e-6):
    """sglang 0.5.12 Gemma4Router.forward: norm(x) without weight, x (scale * root) in bf16, proj."""
    root = torch.tensor(x.shape[-1] ** -0.5, dtype=scale.dtype, device=scale.device)
    normed, how = rmsnorm(x, torch.ones_like(scale), eps)
    return torch.nn.functional.linear(normed * ref.router_input_scale(scale, root).to(normed.dtype), proj), how


def router_folded(x, scale, proj, eps=1e-6):
    """sglang >= 0.5.13 Gemma4Router: (scale * root) folded into the norm weight, one norm, proj."""
    root = torch.tensor(x.shape[-1] ** -0.5, dtype=scale.dtype, device=scale.device)
    fused = (scale * root).to(x.dtype)
    normed, how = rmsnorm(x, fused, eps)
    return torch.nn.functional.linear(normed, proj), how


# ------------------------------------------------------------------------------------------ inputs
def random_router(hidden: int, experts: int, seed: int, dtype, device) -> dict:
    """Router parameters at plausible magnitudes: per-dimension scale around 1, proj ~ N(0, 1/hidden)
    (logits of O(1)), per-expert scale around 1."""
    g = torch.Generator().manual_seed(seed)
    return {
        "router_scale": (1 + 0.25 * torch.randn(hidden, generator=g)).to(dtype).to(device),
        "router_proj": (torch.randn(experts, hidden, generator=g) / hidden ** 0.5).to(dtype).to(device),
        "per_expert_scale": (1 + 0.25 * torch.randn(experts, generator=g)).abs().to(dtype).to(device),
    }


def random_batch(tokens: int, width: int, scale: float, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(tokens, width, generator=g)).to(dtype).to(device)


def load_inputs(path: str, device) -> dict:
    """A .pt file: a tensor (hidden states, or logits when its width is the expert count) or a dict
    with any of hidden_states [T, H], router_logits / gating_output [T, E], per_expert_scale [E],
    router_scale [H], router_proj [E, H]."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        obj = {"tensor": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out["router_logits" if k == "gating_output" else k] = v.to(device)
    return out
