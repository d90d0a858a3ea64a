"""Patch: keep Gemma4's MoE routing unfused and bit-exact with sglang 0.5.12.

Target:   on sglang >= 0.5.13 only:
          - `Gemma4Router.fuse_scale` / `Gemma4Router.forward` in `sglang.srt.models.gemma4_causal`,
            which fold scale * hidden_size**-0.5 into the router norm's weight (one fused norm);
          - `gemma4_fused_routing` / `gemma_routing_post_topk` in `sglang.kernels.ops.moe.gemma4_routing`
            (rebound in gemma4_causal, whose routing closure looks them up at call time).
          Restored to 0.5.12's operations: RMSNorm without weight; x the bf16 product
          scale * hidden_size**-0.5; proj; torch.topk on the logits; softmax over the top-k;
          x per_expert_scale[ids]; float32 weights, int32 ids.
Why:      sglang PR #26588 reverted both fusions because BF16 routing drifted (Gemma4 MTP GSM8K
          0.445 -> 0.360); 0.5.13+ fuse again. Routing must stay bit-exact.
Upstream: sglang PR #26588 (the revert); re-fused after it.
Remove:   when upstream's routing is bit-exact with the unfused reference (`routing-drift` shows 0).
On 0.5.11/0.5.12 the routing is already unfused: this patch is "not applicable" and touches nothing.
"""

from __future__ import annotations

import inspect
import logging

import torch

from ..core import HookSpec, NotApplicable, TargetChanged
from ..kernels import routing as ref

NAME = "unfused_routing"
SUMMARY = "Gemma4 router and routing as in sglang 0.5.12 (unfused, bit-exact) on sglang >= 0.5.13"
UPSTREAM = "sglang PR #26588 (reverted the fusions; 0.5.13+ re-fuse)"
REMOVE_WHEN = "upstream's fused routing is bit-exact with the unfused reference"

MODEL = "sglang.srt.models.gemma4_causal"
ROUTING = "sglang.kernels.ops.moe.gemma4_routing"

logger = logging.getLogger("sglang_gemma4_opt")


def fuse_scale(self):
    """0.5.12: keep the product apart from the norm (the norm keeps a weight of ones)."""
    self._g4opt_scale = ref.router_input_scale(self.scale, self.root_size)
    self._scale_fused = True  # newer callers check this flag before folding


def router_forward(self, x: torch.Tensor) -> torch.Tensor:
    """0.5.12 `Gemma4Router.forward`: norm(x) * (scale * root_size), then proj."""
    if getattr(self, "_g4opt_scale", None) is None:
        if getattr(self, "_scale_fused", False):
            # Upstream's fuse_scale ran before the plugin came in: undo the fold.
            self.norm.weight.data.fill_(1.0)
        fuse_scale(self)
    x = self.norm(x)
    x = x * self._g4opt_scale.to(x.dtype)
    router_logits, _ = self.proj(x)
    return router_logits


def fused_routing_replacement(gating_output, per_expert_scale, topk, *args, **kwargs):
    return ref.unfused_routing(gating_output, per_expert_scale, topk)


def post_topk_replacement(topk_logits, topk_ids, per_expert_scale, *args, **kwargs):
    return ref.routing_post_topk(topk_logits, topk_ids, per_expert_scale)


def router_is_folded(router_cls) -> bool:
    try:
        src = inspect.getsource(router_cls.fuse_scale)
    except (OSError, TypeError, AttributeError):
        return False
    return "norm.weight" in src


def prepare() -> list[HookSpec]:
    import importlib

    try:
        model = importlib.import_module(MODEL)
    except ImportError as e:
        raise NotApplicable(f"no Gemma4 model in this sglang ({e})")
    router = getattr(model, "Gemma4Router", None)
    if router is None:
        raise TargetChanged(f"{MODEL}.Gemma4Router is missing")
    specs: list[HookSpec] = []
    if router_is_folded(router):
        for attr in ("scale", "root_size", "norm", "proj"):
            if attr not in inspect.getsource(router.__init__):
                raise TargetChanged(f"Gemma4Router has no {attr}")
        specs += [
            HookSpec(f"{MODEL}.Gemma4Router.fuse_scale", fuse_scale, "replace"),
            HookSpec(f"{MODEL}.Gemma4Router.forward", router_forward, "replace"),
        ]
    fused_names = [n for n in ("gemma4_fused_routing", "gemma_routing_post_topk") if hasattr(model, n)]
    if fused_names:
        try:
            routing = importlib.import_module(ROUTING)
        except ImportError:
            routing = None
        for n in fused_names:
            owner = ROUTING if routing is not None and getattr(routing, n, None) is getattr(model, n) else MODEL
            func = getattr(model, n)
            params = list(inspect.signature(func).parameters)
            want = ["gating_output", "per_expert_scale", "topk"] if n == "gemma4_fused_routing" else [
                "topk_logits", "topk_ids", "per_expert_scale"]
            if params[:3] != want:
                raise TargetChanged(f"{n} takes {params}, expected {want}")
            repl = fused_routing_replacement if n == "gemma4_fused_routing" else post_topk_replacement
            specs.append(HookSpec(f"{owner}.{n}", repl, "replace"))
    if not specs:
        raise NotApplicable("routing is already unfused in this sglang (0.5.12 behaviour); nothing to restore")
    return specs
