"""A per-pair torch MoE for the CPU kernel tests (Gemma4-style gated experts), in float32 or with sglang's
rounding points: up GEMM -> dt, act_and_mul in fp32 -> dt, down GEMM x routing weight -> dt per expert,
fp32 sum over the experts -> dt, times routed_scaling_factor -> dt. Expert id -1 contributes nothing.
Also the random inputs those tests share."""

import torch

ACTS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}


def moe_torch(x, w1, w2, w, ids, activation, scale=None, sglang_rounding=True):
    dt = x.dtype
    r = (lambda t: t.to(dt).float()) if sglang_rounding else (lambda t: t)
    n = w1.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = r(w1[e].float() @ x[t].float())
            a = r(ACTS[activation](h[:n]) * h[n:])
            out[t] += r((w2[e].float() @ a) * float(w[t, j]))
    if not sglang_rounding:
        return out if scale is None else out * scale
    out = out.to(dt)
    if scale is not None:
        out = (out.float() * scale).to(dt)
    return out


def moe_inputs(M=3, E=6, N=40, K=48, topk=4, dtype=torch.float16, seed=0):
    """x [M, K], w13 [E, 2N, K], w2 [E, K, N] (unit-variance outputs), top-k distinct ids per token, softmax weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * N, K, generator=g) / K ** 0.5).to(dtype)
    w2 = (torch.randn(E, K, N, generator=g) / N ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(M)]).to(torch.int32)
    w = torch.softmax(torch.randn(M, topk, generator=g), -1)
    return x, w1, w2, w, ids
