"""Fused MoE for small batches (decode): two GEMV-shaped Triton kernels instead of sglang's five steps.

sglang's Triton MoE runs, for every batch size, moe_align_block_size -> up GEMM (tiles of >= 16 rows of
expert-sorted tokens) -> gelu_and_mul -> down GEMM -> moe_sum. At M=1 that is five launches, a
sort, and tensor-core tiles 16 rows tall of which one is used; on H200 Gemma4's MoE (8 experts of
E=128, N=704, K=2816: 95 MB of weights) takes ~40 us where streaming the weights takes ~22 us.
Here a token-expert pair needs no sorting, and the work is memory-bound, so:

  kernel 1 (up + activation): grid (M*topk, N/BLOCK_N). A program reads the gate and the up rows of
      its expert for BLOCK_N output columns, dots them with the token's hidden state, applies the
      activation and writes the pair's intermediate row (bf16/fp16).
  kernel 2 (down + weighted sum): grid (M, hidden/BLOCK_N). A program loads the down rows of all the
      token's top-k experts together, dots each with its pair's intermediate row, scales by the routing
      weight and sums over the experts: the combined output, with no per-expert buffer.

Both are plain FMA reductions with pipelined pointer loads (num_stages via tl.range); kernel 1 also has a
tensor-core form (the token padded to a 16-row tile) that a few shapes prefer. H200, M=1, graph replay:
sglang 39.9 us (its two GEMMs 29.9 us, align/sort 3.7, activation 2.0, sum 1.3) -> 28.4 us
(`benchmarks/results/diagnostics/tune_moe_small-NVIDIA_H200.json`).

Rounding mirrors sglang's path step for step: the up projection is rounded to the activation dtype
before the activation (sglang's intermediate_cache1), the activation output too (cache2), each
expert's weighted down projection too (cache3), and the sum of the experts is rounded once (moe_sum),
then multiplied by routed_scaling_factor. Only the order of the K reductions differs from sglang's
(which itself changes with the tile config), so outputs match sglang's to bf16 rounding, not bits.

No atomics: results do not depend on scheduling. They do depend on the batch size (this path runs only
up to a per-GPU M), so the patch stands aside under sglang's deterministic-inference mode.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu": 1}
DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Params:
    """Launch shape of the two kernels (per GPU, from `tune-moe-small`)."""

    up_block_n: int = 8
    up_block_k: int = 256
    up_warps: int = 4
    down_block_n: int = 8
    down_block_k: int = 64
    down_warps: int = 4
    up_stages: int = 3
    up_dot: bool = False  # tensor-core form: the token's row padded to 16 rows
    down_stages: int = 3

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu, as sgl_kernel's silu_and_mul: x / (1 + exp(-x)) in fp32
        return g / (1.0 + tl.exp(-g))
    else:  # gelu (erf form), as sgl_kernel's gelu_and_mul
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def moe_up_act_kernel(
    x_ptr, w1_ptr, ids_ptr, inter_ptr,
    K, N_HALF,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_im,
    TOPK: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, STAGES: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_HALF
    dt = inter_ptr.dtype.element_ty
    if e >= 0:  # a negative id (an expert filtered out by EP) contributes nothing; kernel 2 skips it
        offs_k = tl.arange(0, BLOCK_K)
        t = pair // TOPK
        if USE_DOT:
            # [16, BLOCK_K] tile holding the token in row 0 (zeros elsewhere) times [BLOCK_K, BLOCK_N]
            # weight tiles: tensor cores waste the padding but the loads get Triton's software pipeline
            rows = tl.arange(0, 16)
            x_ptrs = x_ptr + t * stride_xm + rows[:, None] * 0 + offs_k[None, :] * stride_xk
            g_ptrs = w1_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
            u_ptrs = g_ptrs + N_HALF * stride_wn
            acc_g2 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            acc_u2 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                k_mask = (k + offs_k) < K
                x = tl.load(x_ptrs, mask=(rows[:, None] == 0) & k_mask[None, :], other=0.0)
                wg = tl.load(g_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
                wu = tl.load(u_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
                acc_g2 = tl.dot(x, wg, acc_g2)
                acc_u2 = tl.dot(x, wu, acc_u2)
                x_ptrs += BLOCK_K * stride_xk
                g_ptrs += BLOCK_K * stride_wk
                u_ptrs += BLOCK_K * stride_wk
            g = tl.sum(acc_g2, axis=0)  # rows 1..15 are exact zeros
            u = tl.sum(acc_u2, axis=0)
        else:
            x_ptrs = x_ptr + t * stride_xm + offs_k * stride_xk
            g_ptrs = w1_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
            u_ptrs = g_ptrs + N_HALF * stride_wn
            acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                if EVEN_K:
                    x = tl.load(x_ptrs).to(tl.float32)
                    wg = tl.load(g_ptrs, mask=n_mask[:, None], other=0.0).to(tl.float32)
                    wu = tl.load(u_ptrs, mask=n_mask[:, None], other=0.0).to(tl.float32)
                else:
                    k_mask = (k + offs_k) < K
                    x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
                    wmask = n_mask[:, None] & k_mask[None, :]
                    wg = tl.load(g_ptrs, mask=wmask, other=0.0).to(tl.float32)
                    wu = tl.load(u_ptrs, mask=wmask, other=0.0).to(tl.float32)
                acc_g += wg * x[None, :]
                acc_u += wu * x[None, :]
                x_ptrs += BLOCK_K * stride_xk
                g_ptrs += BLOCK_K * stride_wk
                u_ptrs += BLOCK_K * stride_wk
            g = tl.sum(acc_g, axis=1)
            u = tl.sum(acc_u, axis=1)
        g = g.to(dt).to(tl.float32)  # sglang's intermediate_cache1 is in dt
        u = u.to(dt).to(tl.float32)
        h = _act(g, ACT) * u
        tl.store(inter_ptr + pair * stride_im + offs_n, h.to(dt), mask=n_mask)


@triton.jit
def moe_down_sum_kernel(
    inter_ptr, w2_ptr, ids_ptr, wts_ptr, out_ptr,
    HIDDEN, N_HALF, scale,
    stride_im, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, STAGES: tl.constexpr,
):
    """Kernel 2. Every expert of the token is in one [TOPK, BLOCK_N, BLOCK_K] tile per step: walking the
    experts one after another left each program a 1 KB load in flight and ran at half the bandwidth."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_j = tl.arange(0, TOPK_P2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < HIDDEN
    dt = out_ptr.dtype.element_ty
    j_mask = offs_j < TOPK
    e = tl.load(ids_ptr + t * TOPK + offs_j, mask=j_mask, other=-1).to(tl.int64)
    valid = e >= 0
    wt = tl.load(wts_ptr + t * TOPK + offs_j, mask=valid, other=0.0).to(tl.float32)
    e = tl.where(valid, e, 0)
    a_ptrs = inter_ptr + (t * TOPK + offs_j)[:, None] * stride_im + offs_k[None, :]
    w_ptrs = (w2_ptr + e[:, None, None] * stride_we + offs_n[None, :, None] * stride_wn
              + offs_k[None, None, :] * stride_wk)
    acc = tl.zeros((TOPK_P2, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(0, N_HALF, BLOCK_K, num_stages=STAGES):
        k_mask = (k + offs_k) < N_HALF
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=valid[:, None, None] & n_mask[None, :, None] & k_mask[None, None, :],
                    other=0.0).to(tl.float32)
        acc += w * a[:, None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    y = tl.sum(acc, axis=2) * wt[:, None]  # sglang: routed weight applied in the down GEMM's epilogue
    y = y.to(dt).to(tl.float32)  # ... which writes intermediate_cache3 in dt
    res = tl.sum(y, axis=0).to(dt)  # moe_sum: fp32 sum of the experts, rounded once
    if HAS_SCALE:
        res = (res.to(tl.float32) * scale).to(dt)
    tl.store(out_ptr + t * stride_om + offs_n * stride_on, res, mask=n_mask)


def unsupported_reason(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu", is_gated=True) -> Optional[str]:
    """Why this path cannot run a call (None when it can). Metadata only: no device sync."""
    if activation not in ACTIVATIONS:
        return f"activation {activation!r}"
    if not is_gated:
        return "not gated"
    if hidden_states.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        return "shapes"
    if hidden_states.dtype not in DTYPES or w1.dtype != hidden_states.dtype or w2.dtype != hidden_states.dtype:
        return f"dtypes {hidden_states.dtype}/{w1.dtype}/{w2.dtype}"
    E, n2, k1 = w1.shape
    if k1 != hidden_states.shape[1] or n2 % 2 or w2.shape[0] != E or w2.shape[2] != n2 // 2:
        return "weight shapes"
    if w2.shape[1] != hidden_states.shape[1]:
        return "w2 rows != hidden size"
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != hidden_states.shape[0]:
        return "topk shapes"
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_weights.is_floating_point():
        return "topk dtypes"
    if not (topk_ids.is_contiguous() and topk_weights.is_contiguous()):
        return "topk not contiguous"
    if w1.stride(2) != 1 or w2.stride(2) != 1:
        return "weights not K-contiguous"
    devs = {t.device for t in (hidden_states, w1, w2, topk_weights, topk_ids)}
    if len(devs) != 1:
        return "devices"
    return None


def fused_moe_small_batch(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    out: Optional[torch.Tensor] = None,
    routed_scaling_factor: Optional[float] = None,
    params: Params = Params(),
) -> torch.Tensor:
    """sum_j w[t,j] * W2[e_tj] @ act_and_mul(W1[e_tj] @ x[t]) for every token t (sglang's gated MoE).

    w1: [E, 2N, K] (gate rows then up rows, as sglang's w13), w2: [E, K, N]. `out` may be
    `hidden_states` itself (sglang's inplace mode): kernel 2 reads only the intermediate rows.
    """
    M, K = hidden_states.shape
    topk = topk_ids.shape[1]
    n_half = w1.shape[1] // 2
    hidden = w2.shape[1]
    if out is None:
        out = torch.empty((M, hidden), dtype=hidden_states.dtype, device=hidden_states.device)
    if M == 0:
        return out
    inter = torch.empty((M * topk, n_half), dtype=hidden_states.dtype, device=hidden_states.device)
    launch_up(hidden_states, w1, topk_ids, inter, activation, params)
    launch_down(inter, w2, topk_ids, topk_weights, out, routed_scaling_factor, params)
    return out


def launch_up(x, w1, topk_ids, inter, activation: str, p: Params) -> None:
    """Kernel 1: inter[t*topk + j] = act(W1[e_tj, :N] @ x[t]) * (W1[e_tj, N:] @ x[t])."""
    n_half = w1.shape[1] // 2
    K = x.shape[1]
    moe_up_act_kernel[(topk_ids.numel(), triton.cdiv(n_half, p.up_block_n))](
        x, w1, topk_ids, inter,
        K, n_half,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), inter.stride(0),
        TOPK=topk_ids.shape[1], ACT=ACTIVATIONS[activation], BLOCK_N=p.up_block_n, BLOCK_K=p.up_block_k,
        EVEN_K=K % p.up_block_k == 0, USE_DOT=p.up_dot, STAGES=p.up_stages, num_warps=p.up_warps,
    )


def launch_down(inter, w2, topk_ids, topk_weights, out, routed_scaling_factor, p: Params) -> None:
    """Kernel 2: out[t] = sum_j w[t,j] * (W2[e_tj] @ inter[t*topk + j]) (times routed_scaling_factor)."""
    M, topk = topk_ids.shape
    hidden, n_half = w2.shape[1], w2.shape[2]
    scale = 1.0 if routed_scaling_factor is None else float(routed_scaling_factor)
    moe_down_sum_kernel[(M, triton.cdiv(hidden, p.down_block_n))](
        inter, w2, topk_ids, topk_weights, out,
        hidden, n_half, scale,
        inter.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0), out.stride(1),
        TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), BLOCK_N=p.down_block_n, BLOCK_K=p.down_block_k,
        HAS_SCALE=scale != 1.0, STAGES=p.down_stages, num_warps=p.down_warps,
    )


def reference(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu", routed_scaling_factor=None):
    """float32 reference (no intermediate rounding), for tests."""
    x = hidden_states.float()
    M = x.shape[0]
    n_half = w1.shape[1] // 2
    out = torch.zeros(M, w2.shape[1], dtype=torch.float32, device=x.device)
    for t in range(M):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e < 0:
                continue
            h = w1[e].float() @ x[t]
            g, u = h[:n_half], h[n_half:]
            a = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g)
            out[t] += float(topk_weights[t, j]) * (w2[e].float() @ (a * u))
    if routed_scaling_factor is not None:
        out *= routed_scaling_factor
    return out


# ---------------------------------------------------------------------------------------------
# per-GPU table: {gpu name: {shape key: {"max_m": m, "by_m": {M: Params fields}}}}, written by
# `python -m sglang_gemma4_opt.bench.tune_moe_small --write-table` (a GPU or shape not in it: sglang's path)

TABLE_PATH = Path(__file__).resolve().parents[1] / "configs" / "moe_small_batch.json"


def shape_key(E: int, N: int, K: int, topk: int, dtype: torch.dtype) -> str:
    return f"E{E}-N{N}-K{K}-top{topk}-" + {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    raw = json.loads(p.read_text())
    table = {}
    for gpu, shapes in raw.items():
        table[gpu] = {}
        for key, entry in shapes.items():
            by_m = {int(m): Params(**v) for m, v in entry["by_m"].items()}
            max_m = int(entry["max_m"])
            if not by_m or max_m < 1:
                raise ValueError(f"{gpu} {key}: empty entry")
            table[gpu][key] = (max_m, by_m)
    return table


def params_for(table: dict, gpu: str, key: str, M: int) -> Optional[Params]:
    """The launch shape for M (the entry of the nearest tuned M, as sglang's tables), or None when M is
    beyond the GPU's max_m for this shape, or the GPU/shape is not in the table."""
    entry = table.get(gpu, {}).get(key)
    if entry is None or M > entry[0] or M < 1:
        return None
    by_m = entry[1]
    return by_m[min(by_m, key=lambda m: (abs(m - M), m))]
