"""The float32 MoE the fused-MoE GPU tests compare sglang's fused_experts against (Gemma4's experts):
gelu(x W_gate^T) * (x W_up^T) -> W_down^T, weighted sum over each token's top-k experts."""

import torch


def moe_reference(x, w13, w2, topk_w, topk_ids):
    M, K = x.shape
    N = w2.shape[2]
    out = torch.zeros(M, K, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in torch.unique(topk_ids).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = xf[tok] @ w13[e].float().t()
        a = torch.nn.functional.gelu(h[:, :N]) * h[:, N:]
        out.index_add_(0, tok, (a @ w2[e].float().t()) * topk_w[tok, slot, None].float())
    return out
