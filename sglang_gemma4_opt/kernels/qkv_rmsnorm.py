"""Gemma4 Q/K/V per-head RMSNorm, in place, with two launch shapes from one kernel body.

BY_HEAD=True : grid (M, total_heads), one program per token-head. At small M (decode) the stock
               grid (M,) leaves the GPU almost empty: M=1 runs one program for all 32 heads.
BY_HEAD=False: grid (M,), one program per token looping over heads (sglang's stock shape), which
               wins once M alone fills the GPU (M > 256 on H200).

Arithmetic is the stock kernel's, operation for operation (fp32 upcast, sum of squares / head_dim,
+eps, rsqrt, x*rrms*w, cast back), and each head is reduced by one program with the same block and
warp count, so results are bit-identical to sglang's `_gemma_qkv_rmsnorm_kernel`.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Above this many tokens the per-token loop (stock launch shape) is faster (H200, sglang 0.5.12).
BY_HEAD_MAX_M = 256

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rmsnorm_one_head(ptr, w, stride_m, m, h, cols, mask, HEAD_DIM: tl.constexpr, eps,
                      HAS_WEIGHT: tl.constexpr):
    off = m * stride_m + h * HEAD_DIM + cols
    x = tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)
    rrms = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
    if HAS_WEIGHT:
        out = x * rrms * w
    else:
        out = x * rrms  # Gemma4's V norm has no weight
    tl.store(ptr + off, out.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemma_qkv_rmsnorm_kernel(
    Q_ptr, K_ptr, V_ptr, Q_w_ptr, K_w_ptr,
    stride_q_m, stride_k_m, stride_v_m,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    eps,
    HAS_KV: tl.constexpr, BY_HEAD: tl.constexpr, BLOCK: tl.constexpr,
):
    m = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HEAD_DIM
    if BY_HEAD:
        hh = tl.program_id(1)
        if hh < NUM_Q_HEADS:
            qw = tl.load(Q_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            _rmsnorm_one_head(Q_ptr, qw, stride_q_m, m, hh, cols, mask, HEAD_DIM, eps, True)
        elif HAS_KV:
            if hh < NUM_Q_HEADS + NUM_KV_HEADS:
                kw = tl.load(K_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                _rmsnorm_one_head(K_ptr, kw, stride_k_m, m, hh - NUM_Q_HEADS, cols, mask,
                                  HEAD_DIM, eps, True)
            else:
                _rmsnorm_one_head(V_ptr, 1.0, stride_v_m, m, hh - NUM_Q_HEADS - NUM_KV_HEADS,
                                  cols, mask, HEAD_DIM, eps, False)
    else:
        qw = tl.load(Q_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        for h in tl.static_range(NUM_Q_HEADS):
            _rmsnorm_one_head(Q_ptr, qw, stride_q_m, m, h, cols, mask, HEAD_DIM, eps, True)
        if HAS_KV:
            kw = tl.load(K_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            for h in tl.static_range(NUM_KV_HEADS):
                _rmsnorm_one_head(K_ptr, kw, stride_k_m, m, h, cols, mask, HEAD_DIM, eps, True)
            for h in tl.static_range(NUM_KV_HEADS):
                _rmsnorm_one_head(V_ptr, 1.0, stride_v_m, m, h, cols, mask, HEAD_DIM, eps, False)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # CPU tensors are fine for the interpreter


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, width: int) -> None:
    if not (t.is_cuda or _interpreting()):
        raise ValueError(f"gemma_qkv_rmsnorm: {name} must be a CUDA tensor, got device {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"gemma_qkv_rmsnorm: {name} has dtype {t.dtype}, q has {dtype}")
    if t.dim() == 0 or t.stride(-1) != 1:
        raise ValueError(f"gemma_qkv_rmsnorm: {name}'s last dim must be contiguous (stride {t.stride()})")
    if t.dim() >= 2 and math.prod(t.shape[1:]) < width:
        raise ValueError(f"gemma_qkv_rmsnorm: {name} has {math.prod(t.shape[1:])} values per token, needs {width}")


def gemma_qkv_rmsnorm(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    q_weight: torch.Tensor,
    k_weight: Optional[torch.Tensor],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float = 1e-6,
    by_head: Optional[bool] = None,
) -> None:
    """In-place RMSNorm of Q (x q_weight), K (x k_weight) and V (no weight), per head.

    Same signature and semantics as sglang's `gemma_qkv_rmsnorm`: q/k/v may be strided views of one
    qkv buffer (token stride taken from stride(0)); k=v=None is a KV-shared layer (only Q is
    normalised). `by_head` forces a launch shape (None: by head for M <= BY_HEAD_MAX_M).
    """
    if q.dtype not in _DTYPES:
        raise ValueError(f"gemma_qkv_rmsnorm: unsupported dtype {q.dtype}")
    _check("q", q, q.dtype, num_q_heads * head_dim)
    if q_weight.shape[-1] != head_dim:
        raise ValueError(f"gemma_qkv_rmsnorm: q_weight has {q_weight.shape[-1]} values, head_dim is {head_dim}")
    if (k is None) != (v is None):
        raise ValueError("gemma_qkv_rmsnorm: pass both k and v, or neither (KV-shared layer)")
    has_kv = k is not None
    if has_kv:
        _check("k", k, q.dtype, num_kv_heads * head_dim)
        _check("v", v, q.dtype, num_kv_heads * head_dim)
        if k_weight is None or k_weight.shape[-1] != head_dim:
            got = None if k_weight is None else k_weight.shape[-1]
            raise ValueError(f"gemma_qkv_rmsnorm: k_weight has {got} values, head_dim is {head_dim}")
    M = q.shape[0] if q.dim() >= 2 else 1
    if has_kv and k.dim() >= 2 and (k.shape[0] != M or v.shape[0] != M):
        raise ValueError(f"gemma_qkv_rmsnorm: q, k, v have {M}, {k.shape[0]}, {v.shape[0]} tokens")
    if M == 0:
        return
    if by_head is None:
        by_head = M <= BY_HEAD_MAX_M
    heads = num_q_heads + (2 * num_kv_heads if has_kv else 0)
    grid = (M, heads) if by_head else (M,)
    gemma_qkv_rmsnorm_kernel[grid](
        q,
        k if has_kv else q,
        v if has_kv else q,
        q_weight,
        k_weight if has_kv else q_weight,
        q.stride(0),
        k.stride(0) if has_kv else 0,
        v.stride(0) if has_kv else 0,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads if has_kv else 0,
        HEAD_DIM=head_dim,
        eps=eps,
        HAS_KV=has_kv,
        BY_HEAD=by_head,
        BLOCK=triton.next_power_of_2(head_dim),
    )
