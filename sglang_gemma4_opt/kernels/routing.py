"""Gemma4 routing exactly as sglang 0.5.12 runs it: unfused torch ops, rounding for rounding.

These are the reference the plugin restores on sglang >= 0.5.13 (whose fused router kernels drifted
in BF16: MTP GSM8K 0.445 -> 0.360, sglang PR #26588) and that `routing-drift` measures against.
"""

from __future__ import annotations

import torch


def router_input_scale(scale: torch.Tensor, root_size: torch.Tensor) -> torch.Tensor:
    """0.5.12 `Gemma4Router.fuse_scale`: the product scale * hidden_size**-0.5 in the scale's dtype."""
    return (scale * root_size).to(scale.dtype)


def routing_post_topk(topk_logits: torch.Tensor, topk_ids: torch.Tensor, per_expert_scale: torch.Tensor):
    """softmax over the top-k logits (in their dtype), x per_expert_scale[ids]; f32 weights, i32 ids."""
    topk_weights = torch.nn.functional.softmax(topk_logits, dim=-1)
    topk_weights = topk_weights * per_expert_scale[topk_ids].to(topk_weights.dtype)
    return topk_weights.to(torch.float32), topk_ids.to(torch.int32)


def unfused_routing(gating_output: torch.Tensor, per_expert_scale: torch.Tensor, topk: int):
    """0.5.12 `Gemma4MoE` routing function: torch.topk on the logits, then `routing_post_topk`."""
    topk_logits, topk_ids = torch.topk(gating_output, k=topk, dim=-1)
    return routing_post_topk(topk_logits, topk_ids, per_expert_scale)
