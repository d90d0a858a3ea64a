"""Hopper extend (prefill) attention for head dims 256 and 512, with sglang's `extend_attention_fwd`
signature and semantics for the calls it supports (see `unsupported_reason`).

Same function as sglang's two-stage Triton kernel (sglang/srt/layers/attention/triton_ops/
extend_attention.py, `_fwd_kernel`): for request b with P prefix keys (KV pool slots
`kv_indices[kv_indptr[b]:kv_indptr[b+1]]`) and L new tokens (rows `qo_indptr[b]:qo_indptr[b+1]` of
q/k/v_extend), new query m (absolute position P+m) attends to
  * prefix key j (0 <= j < P)      iff  no window, or  P + m - j <= W
  * new key n    (0 <= n < L)      iff  n <= m  and (no window, or  m - n <= W)
where W = `sliding_window_size` and the window is on only for W > 0 (sglang's kernel: `q <= k + W`),
GQA head h reading kv head h // (Hq / Hkv), softmax scale `sm_scale or 1/sqrt(Lq)`.

What is different from sglang's kernel (speed only):
  * key range per query block computed up front: with a window, KV tiles wholly outside it are
    never visited (sglang's loop visits every tile from 0 and skips the masked ones one by one);
  * each key range split into masked edge tiles (window edge, causal diagonal, sequence end) and
    clean interior tiles that run with no mask arithmetic and no load masks;
  * software pipelining (num_stages >= 2: the next K/V tiles load while this one computes),
    BLOCK_M 128 over 8 warps (two warpgroups of wgmma, 64 query rows each) at head dim 256; at 512
    a 128x512 fp32 accumulator would need 256 registers a thread, so BLOCK_M is 64 over 8 warps
    (Triton has both warpgroups compute the same 64-row scores: 1.5x the matrix work), or 128 with
    each program owning half of the output columns (DV_SPLIT=2, also 1.5x, faster in the sweep);
  * exp2 with log2(e) folded into the scale; scores scaled after the row max on clean tiles.
Block shapes come from a small per-GPU table (`CONFIGS`), tuned offline, never at serving time.

Head dim 512 calls without prefix keys (fresh prefill, as in every chunk-free prompt) go instead to the
Gluon kernel in `extend_attention_hd512.py` where the GPU's `SHARED_SOFTMAX` entry says so: one
program of two warpgroups shares one softmax, so the QK product is computed once (1x the counted
work instead of 1.5x). Calls with prefix keys, q/k/v that cannot be TMA tensors, a triton without
Gluon, or `SGLANG_GEMMA4_OPT_DISABLE=extend_attention_hd512` stay on the Triton kernel here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (256, 512)
DTYPES = (torch.bfloat16, torch.float16)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, tma, dv_split) per GPU name and head dim. tma: new-token
# K/V and Q read through TMA tensor descriptors where the tensors allow it; dv_split: programs per
# (query block, head), each owning 1/dv_split of the output columns. A Hopper GPU missing here gets
# DEFAULT_SM90 (every entry fits sm90's 227 KB of shared memory per block).
Config = tuple[int, int, int, int, bool, int]
# H200 and H100: swept on 2026-11-24 (kernels/NOTES-extend-attention.md). Head dim 256: (128, 64, 8, 2,
# tma, 1) wins on both. Head dim 512: (128, 32, 8, 2, no tma, dv_split 2), 18% faster than v1's (64, 32,
# 8, 2, tma, 1) on the H200; on the H100 the tma variant of it is 1.6% faster without a prefix and 3.2%
# slower with one, so both GPUs run the same shapes. The GPU tests cover every entry of this table.
DEFAULT_SM90: dict[int, Config] = {256: (128, 64, 8, 2, True, 1), 512: (128, 32, 8, 2, False, 2)}
CONFIGS: dict[str, dict[int, Config]] = {
    "NVIDIA H200": {256: (128, 64, 8, 2, True, 1), 512: (128, 32, 8, 2, False, 2)},
    "NVIDIA H100 80GB HBM3": {256: (128, 64, 8, 2, True, 1), 512: (128, 32, 8, 2, False, 2)},
}


@dataclass(frozen=True)
class SharedSoftmax:
    """Launch of the Gluon head-dim-512 kernel (`extend_attention_hd512.py`): key tile BLOCK_N."""
    block_n: int = 64


# GPU name -> the Gluon head-dim-512 kernel's launch for calls without prefix keys (absent: the Triton
# kernel's CONFIGS entry runs them). Swept 2026-11-24 (session 9, kernels/NOTES-extend-attention.md):
# hd512 8x1024, BLOCK_N 64 / BLOCK_N 32 / the Triton entry: H100 461 / 627 / 657 us, H200 458 / 627 /
# 657 us. The GPU tests cover every entry of this table.
SHARED_SOFTMAX: dict[str, SharedSoftmax] = {
    "NVIDIA H100 80GB HBM3": SharedSoftmax(64),
    "NVIDIA H200": SharedSoftmax(64),
}
DEFAULT_SM90_SHARED_SOFTMAX = SharedSoftmax(64)
HD512_SWITCH = "extend_attention_hd512"  # SGLANG_GEMMA4_OPT_DISABLE=extend_attention_hd512: Gluon kernel off


@triton.jit
def _online_softmax(qk, m_i, l_i, qk_scale, mask, MASKED: tl.constexpr):
    """Online softmax of one score tile: (p, alpha for the old accumulator, new row max, new row sum).
    m_i is the running row max of scaled scores (log2 units). The Gluon head-dim-512 kernel runs this
    same function (extend_attention_hd512._softmax_step)."""
    if MASKED:
        qk = tl.where(mask, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with every key masked so far keeps m = -inf; subtract 0 instead (p = 0, alpha = 0)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        qk = qk - m_use[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        qk = qk * qk_scale - m_use[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _tile(acc, l_i, m_i, q, k, v, qk_scale, mask, MASKED: tl.constexpr):
    """One KV tile: scores, online softmax, PV."""
    qk = tl.dot(q, tl.trans(k))
    p, alpha, m_new, l_i = _online_softmax(qk, m_i, l_i, qk_scale, mask, MASKED)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _prefix_range(acc, l_i, m_i, q, qk_scale, K_Buf, V_Buf, kv_idx_ptr, stride_kb, stride_vb,
                  offs_d, offs_dv, offs_n, qpos, P, W, lo, hi,
                  WINDOW: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Prefix keys [lo, hi) read from the KV pool through kv_indices (qpos: absolute query positions)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs = start_n + offs_n
        if MASKED:
            valid = offs < P
            slot = tl.load(kv_idx_ptr + offs, mask=valid, other=0).to(tl.int64)
            k = tl.load(K_Buf + slot[:, None] * stride_kb + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(V_Buf + slot[:, None] * stride_vb + offs_dv[None, :], mask=valid[:, None], other=0.0)
            mask = valid[None, :]
            if WINDOW:
                mask = mask & ((qpos[:, None] - offs[None, :]) <= W)
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, mask, True)
        else:
            slot = tl.load(kv_idx_ptr + offs).to(tl.int64)
            k = tl.load(K_Buf + slot[:, None] * stride_kb + offs_d[None, :])
            v = tl.load(V_Buf + slot[:, None] * stride_vb + offs_dv[None, :])
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, None, False)
    return acc, l_i, m_i


@triton.jit
def _extend_range(acc, l_i, m_i, q, qk_scale, K_Ext, V_Ext, stride_kt, stride_vt, row0, col0, vcol0,
                  offs_d, offs_dv, offs_n, offs_m, L, W, lo, hi,
                  WINDOW: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """New keys [lo, hi) read from k/v_extend (offs_m: query rows relative to the extend start).

    USE_TMA: K_Ext/V_Ext are 2-d tensor descriptors over (tokens, kv_heads * head_dim) read at
    (row0 + n, col0) / (row0 + n, vcol0); else pointers already offset to this sequence's first token
    and kv head.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs = start_n + offs_n
        if MASKED:
            valid = offs < L
            if USE_TMA:
                k = K_Ext.load([row0 + start_n, col0])
                v = V_Ext.load([row0 + start_n, vcol0])
                # rows past the sequence end belong to the next request (or are TMA zero fill):
                # p is 0 there, but 0 * inf/nan is not, so they must not reach the PV product
                v = tl.where(valid[:, None], v, 0.0)
            else:
                k = tl.load(K_Ext + offs[:, None] * stride_kt + offs_d[None, :], mask=valid[:, None], other=0.0)
                v = tl.load(V_Ext + offs[:, None] * stride_vt + offs_dv[None, :], mask=valid[:, None], other=0.0)
            mask = valid[None, :] & (offs_m[:, None] >= offs[None, :])
            if WINDOW:
                mask = mask & ((offs_m[:, None] - offs[None, :]) <= W)
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, mask, True)
        else:
            if USE_TMA:
                k = K_Ext.load([row0 + start_n, col0])
                v = V_Ext.load([row0 + start_n, vcol0])
            else:
                k = tl.load(K_Ext + offs[:, None] * stride_kt + offs_d[None, :])
                v = tl.load(V_Ext + offs[:, None] * stride_vt + offs_dv[None, :])
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, None, False)
    return acc, l_i, m_i


@triton.jit
def _key_tiles(q0, hi, clean_hi, W, BM: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Key tiles of a query block whose first query sits at key position q0, keys below hi: (lo, c0, c1) with
    [lo, c0) the window edge (masked), [c0, c1) the clean tiles (no mask), [c1, hi) the tail (masked: causal
    diagonal or sequence end); clean_hi bounds the clean tiles from above. Both attention kernels call it (the
    Gluon one compiled as Gluon)."""
    if WINDOW:
        lo = tl.maximum(q0 - W, 0) // BLOCK_N * BLOCK_N
        clean_lo = tl.cdiv(tl.maximum(q0 + BM - 1 - W, 0), BLOCK_N) * BLOCK_N
    else:
        lo = 0
        clean_lo = 0
    c1 = tl.maximum(tl.minimum(clean_hi, hi), lo)
    c0 = tl.minimum(tl.maximum(clean_lo, lo), c1)
    return lo, c0, c1


@triton.jit
def _hopper_extend_kernel(
    Q, K_Ext, V_Ext, O, K_Buf, V_Buf,
    qo_indptr, kv_indptr, kv_indices,
    qk_scale, W, kv_group,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_kbt, stride_kbh, stride_vbt, stride_vbh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, USE_TMA: tl.constexpr, DV_SPLIT: tl.constexpr,
):
    """Grid (query blocks, q heads * DV_SPLIT, requests). DV_SPLIT > 1: each program computes the
    scores in full but only 1/DV_SPLIT of the output columns (bounds the accumulator's registers)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    BLOCK_DV: tl.constexpr = HEAD_DIM // DV_SPLIT
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heavier (later) query blocks first
    head = tl.program_id(1) // DV_SPLIT
    dv0 = (tl.program_id(1) % DV_SPLIT) * BLOCK_DV
    seq = tl.program_id(2)
    kv_head = head // kv_group

    # indptrs come as int32 or int64 (sglang's triton backend keeps qo_indptr in int64); token
    # counts fit int32, which keeps the index math and the TMA coordinates 32-bit
    q_start = tl.load(qo_indptr + seq).to(tl.int32)
    L = tl.load(qo_indptr + seq + 1).to(tl.int32) - q_start
    m0 = block_m * BLOCK_M
    if m0 >= L:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = dv0 + tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L

    if USE_TMA:  # rows past the sequence end are read but never stored
        q = Q.load([q_start + m0, head * HEAD_DIM])
    else:
        q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # ---- prefix keys (KV pool via kv_indices); query m sits at absolute position P + m
    if HAS_PREFIX:
        kv_start = tl.load(kv_indptr + seq).to(tl.int32)
        P = tl.load(kv_indptr + seq + 1).to(tl.int32) - kv_start
        lo, c0, c1 = _key_tiles(P + m0, P, P // BLOCK_N * BLOCK_N, W, BLOCK_M, BLOCK_N, WINDOW)
        kb = K_Buf + kv_head * stride_kbh
        vb = V_Buf + kv_head * stride_vbh
        idx = kv_indices + kv_start
        qpos = P + offs_m
        acc, l_i, m_i = _prefix_range(acc, l_i, m_i, q, qk_scale, kb, vb, idx, stride_kbt, stride_vbt,
                                      offs_d, offs_dv, offs_n, qpos, P, W, lo, c0, WINDOW, True, BLOCK_N)
        acc, l_i, m_i = _prefix_range(acc, l_i, m_i, q, qk_scale, kb, vb, idx, stride_kbt, stride_vbt,
                                      offs_d, offs_dv, offs_n, qpos, P, W, c0, c1, WINDOW, False, BLOCK_N)
        acc, l_i, m_i = _prefix_range(acc, l_i, m_i, q, qk_scale, kb, vb, idx, stride_kbt, stride_vbt,
                                      offs_d, offs_dv, offs_n, qpos, P, W, c1, P, WINDOW, True, BLOCK_N)

    # ---- new keys (k/v_extend), causal: [window edge (masked)] [clean] [diagonal (masked)]
    hi = tl.minimum(L, m0 + BLOCK_M)
    lo, c0, c1 = _key_tiles(m0, hi, m0, W, BLOCK_M, BLOCK_N, WINDOW)
    if USE_TMA:
        ke = K_Ext
        ve = V_Ext
    else:
        ke = K_Ext + q_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        ve = V_Ext + q_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    col0 = kv_head * HEAD_DIM
    acc, l_i, m_i = _extend_range(acc, l_i, m_i, q, qk_scale, ke, ve, stride_kt, stride_vt, q_start, col0, col0 + dv0,
                                  offs_d, offs_dv, offs_n, offs_m, L, W, lo, c0, WINDOW, True, BLOCK_N, USE_TMA)
    acc, l_i, m_i = _extend_range(acc, l_i, m_i, q, qk_scale, ke, ve, stride_kt, stride_vt, q_start, col0, col0 + dv0,
                                  offs_d, offs_dv, offs_n, offs_m, L, W, c0, c1, WINDOW, False, BLOCK_N, USE_TMA)
    acc, l_i, m_i = _extend_range(acc, l_i, m_i, q, qk_scale, ke, ve, stride_kt, stride_vt, q_start, col0, col0 + dv0,
                                  offs_d, offs_dv, offs_n, offs_m, L, W, c1, hi, WINDOW, True, BLOCK_N, USE_TMA)

    l_i = tl.where(row_ok, l_i, 1.0)  # rows past the sequence end are not stored
    out = acc / l_i[:, None]
    o_base = O + q_start.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# routing and launch

_CAPABILITY: dict[int, tuple[int, int]] = {}
_NAME: dict[int, str] = {}


def _device_info(device: torch.device) -> tuple[tuple[int, int], str]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
        _NAME[idx] = torch.cuda.get_device_name(idx)
    return _CAPABILITY[idx], _NAME[idx]


def config_for(device_name: str, head_dim: int) -> Config:
    """The Triton kernel's launch shape on this GPU (every call can run it)."""
    return CONFIGS.get(device_name, DEFAULT_SM90).get(head_dim, DEFAULT_SM90[head_dim])


def hd512_gluon_enabled() -> bool:
    """False when SGLANG_GEMMA4_OPT_DISABLE names extend_attention_hd512, or the Gluon kernel failed once
    in this process (its error is logged once and the Triton kernel takes over)."""
    from ..settings import disabled_patches

    return not _GLUON_FAILED and HD512_SWITCH not in disabled_patches()


_GLUON_FAILED: list = []  # the first exception the Gluon kernel raised in this process
_GLUON_IMPORT: list = []  # [module] or [exception], imported on first use


def _gluon_module():
    """kernels/extend_attention_hd512, or None when this triton has no (usable) Gluon."""
    if not _GLUON_IMPORT:
        try:
            from . import extend_attention_hd512 as g

            _GLUON_IMPORT.append(g)
        except Exception as e:  # older triton: no gluon / no hopper gluon ops
            _GLUON_IMPORT.append(e)
    m = _GLUON_IMPORT[0]
    return None if isinstance(m, Exception) else m


def plan_for(device_name: str, head_dim: int, has_prefix: bool) -> Union[Config, SharedSoftmax]:
    """The launch a call gets from the tables: the Gluon kernel's for head dim 512 without prefix keys
    where the GPU has a SHARED_SOFTMAX entry (or is an unlisted sm90 GPU) and Gluon is on, else the
    Triton kernel's. (extend_attention_fwd still falls back to the Triton kernel when q/k/v cannot be
    TMA tensors or Gluon does not import.)"""
    if head_dim == 512 and not has_prefix and hd512_gluon_enabled():
        ss = SHARED_SOFTMAX.get(device_name, None if device_name in CONFIGS else DEFAULT_SM90_SHARED_SOFTMAX)
        if ss is not None:
            return ss
    return config_for(device_name, head_dim)


def launch_for(q_extend, k_extend, v_extend, kv_indices) -> Union[Config, SharedSoftmax]:
    """The launch the tables give this (supported) call on its GPU: the Gluon kernel's when `plan_for` picks
    it and the call is in its scope, else the Triton kernel's."""
    name, D = _device_info(q_extend.device)[1], q_extend.shape[-1]
    plan = plan_for(name, D, kv_indices.numel() > 0)
    if isinstance(plan, SharedSoftmax) and shared_softmax_reason(q_extend, k_extend, v_extend, kv_indices) is None:
        return plan
    return config_for(name, D)


def shared_softmax_reason(q_extend, k_extend, v_extend, kv_indices) -> Optional[str]:
    """None when the Gluon head-dim-512 kernel can run this (already supported) call, else why not."""
    if q_extend.shape[-1] != 512:
        return "head dim not 512"
    if kv_indices.numel() > 0:
        return "prefix keys"
    if not _tma_ok(q_extend, k_extend, v_extend):
        return "q/k/v not TMA-able"
    if _gluon_module() is None:
        return f"no Gluon in this triton ({_GLUON_IMPORT[0]})"
    return None


def _unit_scale(s) -> bool:
    return s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and float(s) == 1.0)


def unsupported_reason(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr,
                       kv_indices, custom_mask, is_causal, mask_indptr, max_len_extend, k_scale, v_scale,
                       sm_scale=None, logit_cap=0.0, skip_prefix_custom_mask=True, sliding_window_size=-1,
                       sinks=None, window_kv_offsets=None, xai_temperature_len=-1,
                       check_device: bool = True) -> Optional[str]:
    """None when this kernel computes the call exactly as sglang's kernel would, else why not.

    Cheap: reads only Python scalars and tensor metadata (no device sync), once per call.
    """
    if custom_mask is not None:
        return "custom mask"
    if is_causal is not True:
        return "not causal"
    if sinks is not None:
        return "attention sinks"
    if not _unit_scale(k_scale) or not _unit_scale(v_scale):
        return "k/v scale"
    if not isinstance(logit_cap, (int, float)) or logit_cap > 0:
        return "logit cap"
    if not isinstance(xai_temperature_len, int) or xai_temperature_len > 0:
        return "xai temperature"
    if not isinstance(sliding_window_size, int) or isinstance(sliding_window_size, bool):
        return "sliding window size not an int"
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and sm_scale >= 0):
        return "sm_scale"
    if not isinstance(max_len_extend, int) or max_len_extend <= 0:
        return "max_len_extend"
    ts = (q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in ts):
        return "q/k/v/o/buffers not 3-d tensors"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in (qo_indptr, kv_indptr, kv_indices)):
        return "index tensors not 1-d"
    dt = q_extend.dtype
    if dt not in DTYPES or any(t.dtype != dt for t in ts):
        return f"dtype {dt} (k/v buffers {k_buffer.dtype})"
    if qo_indptr.dtype not in (torch.int32, torch.int64) or kv_indptr.dtype not in (torch.int32, torch.int64):
        return "indptr dtype"
    if kv_indices.dtype not in (torch.int64, torch.int32):
        return "kv_indices dtype"
    D = q_extend.shape[-1]
    if D not in HEAD_DIMS or any(t.shape[-1] != D for t in ts):
        return f"head dims {[t.shape[-1] for t in ts]}"
    Hq, Hkv = q_extend.shape[1], k_extend.shape[1]
    if (o_extend.shape[1] != Hq or v_extend.shape[1] != Hkv or k_buffer.shape[1] != Hkv
            or v_buffer.shape[1] != Hkv or Hkv == 0 or Hq % Hkv != 0):
        return "head counts"
    n = q_extend.shape[0]
    if k_extend.shape[0] != n or v_extend.shape[0] != n or o_extend.shape[0] != n or n == 0:
        return "token counts"
    if any(t.stride(-1) != 1 for t in ts):
        return "last dim not contiguous"
    if any(t.device != q_extend.device for t in (*ts, qo_indptr, kv_indptr, kv_indices)):
        return "tensors on different devices"
    if check_device:
        return device_reason(q_extend)
    return None


def device_reason(t: torch.Tensor) -> Optional[str]:
    """None on a Hopper (sm 9.x) CUDA device, else why not."""
    if not t.is_cuda or torch.version.hip is not None:
        return "not a CUDA tensor"
    cap, _ = _device_info(t.device)
    if cap[0] != 9:
        return f"compute capability {cap[0]}.{cap[1]} (Hopper only)"
    return None


def _tma_ok(*ts) -> bool:
    """Each tensor viewable as 2-d (tokens, heads * head_dim) for a TMA descriptor."""
    for t in ts:
        es = t.element_size()
        if (t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.data_ptr() % 16 or (t.stride(0) * es) % 16
                or t.stride(0) < t.shape[1] * t.shape[2]):
            return False
    return True


def extend_attention_fwd(
    q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
    custom_mask, is_causal, mask_indptr, max_len_extend, k_scale, v_scale, sm_scale=None, logit_cap=0.0,
    skip_prefix_custom_mask=True, sliding_window_size=-1, sinks=None, window_kv_offsets=None,
    xai_temperature_len=-1, *, config: Union[Config, SharedSoftmax, None] = None,
):
    """sglang's `extend_attention_fwd` for the calls `unsupported_reason` accepts (raises otherwise).

    `config` overrides the per-GPU tables: a Config tuple (BLOCK_M, BLOCK_N, num_warps, num_stages, tma,
    dv_split) runs the Triton kernel, a SharedSoftmax the Gluon head-dim-512 kernel (raises for a call
    outside its scope, see `shared_softmax_reason`).
    """
    why = unsupported_reason(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr,
                             kv_indptr, kv_indices, custom_mask, is_causal, mask_indptr, max_len_extend,
                             k_scale, v_scale, sm_scale, logit_cap, skip_prefix_custom_mask,
                             sliding_window_size, sinks, window_kv_offsets, xai_temperature_len,
                             check_device=config is None)
    if why is not None:
        raise ValueError(f"hopper extend attention does not support this call: {why}")
    D = q_extend.shape[-1]
    sm_scale = sm_scale or 1.0 / (D ** 0.5)
    window = sliding_window_size > 0
    if config is None:
        config = launch_for(q_extend, k_extend, v_extend, kv_indices)
        if isinstance(config, SharedSoftmax):
            try:
                return _run_shared_softmax(q_extend, k_extend, v_extend, o_extend, qo_indptr, max_len_extend,
                                           sm_scale, sliding_window_size, config)
            except Exception as e:  # e.g. a compile failure: the Triton kernel still answers
                _GLUON_FAILED.append(e)
                logging.getLogger("sglang_gemma4_opt").warning(
                    "sglang-gemma4-opt: head-dim-512 Gluon attention failed, using the Triton kernel: %s", e)
                config = config_for(_device_info(q_extend.device)[1], D)
    elif isinstance(config, SharedSoftmax):
        why = shared_softmax_reason(q_extend, k_extend, v_extend, kv_indices)
        if why is not None:
            raise ValueError(f"the shared-softmax head-dim-512 kernel does not support this call: {why}")
        return _run_shared_softmax(q_extend, k_extend, v_extend, o_extend, qo_indptr, max_len_extend, sm_scale,
                                   sliding_window_size, config)
    block_m, block_n, num_warps, num_stages, tma, dv_split = config
    batch = qo_indptr.shape[0] - 1
    Hq, Hkv = q_extend.shape[1], k_extend.shape[1]
    grid = (triton.cdiv(max_len_extend, block_m), Hq * dv_split, batch)
    q_arg, k_arg, v_arg = q_extend, k_extend, v_extend
    if tma and _tma_ok(q_extend, k_extend, v_extend):
        from triton.tools.tensor_descriptor import TensorDescriptor

        q_arg, k_arg, v_arg = (
            TensorDescriptor(t, [t.shape[0], t.shape[1] * D], [t.stride(0), 1], [rows, cols])
            for t, rows, cols in ((q_extend, block_m, D), (k_extend, block_n, D), (v_extend, block_n, D // dv_split)))
    else:
        tma = False
    _hopper_extend_kernel[grid](
        q_arg, k_arg, v_arg, o_extend, k_buffer, v_buffer,
        qo_indptr, kv_indptr, kv_indices,
        float(sm_scale) * LOG2E, int(sliding_window_size) if window else 0, Hq // Hkv,
        q_extend.stride(0), q_extend.stride(1), k_extend.stride(0), k_extend.stride(1),
        v_extend.stride(0), v_extend.stride(1), o_extend.stride(0), o_extend.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW=window,
        HAS_PREFIX=kv_indices.numel() > 0, USE_TMA=tma, DV_SPLIT=dv_split,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o_extend


def _run_shared_softmax(q, k, v, o, qo_indptr, max_len_extend, sm_scale, sliding_window_size, config):
    g = _gluon_module()
    window = int(sliding_window_size) if sliding_window_size > 0 else 0
    g.launch(q, k, v, o, qo_indptr, max_len_extend, float(sm_scale) * LOG2E, window, config.block_n)
    return o


# ---------------------------------------------------------------------------------------------
# reference math (tests, benchmark)


def reference(q_extend, k_extend, v_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, sm_scale=None,
              sliding_window_size=-1) -> torch.Tensor:
    """float32 causal extend attention with sglang's masks (see the module docstring), on q's device."""
    D = q_extend.shape[-1]
    sm_scale = sm_scale or 1.0 / (D ** 0.5)
    out = torch.zeros(q_extend.shape[:2] + (v_extend.shape[-1],), dtype=torch.float32, device=q_extend.device)
    g = q_extend.shape[1] // k_extend.shape[1]
    qo, kv = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        q0, q1, p0, p1 = qo[b], qo[b + 1], kv[b], kv[b + 1]
        L, P = q1 - q0, p1 - p0
        if L == 0:
            continue
        slots = kv_indices[p0:p1].long()
        ks = torch.cat([k_buffer[slots], k_extend[q0:q1]]).float().repeat_interleave(g, 1)
        vs = torch.cat([v_buffer[slots], v_extend[q0:q1]]).float().repeat_interleave(g, 1)
        qpos = torch.arange(P, P + L, device=q_extend.device)[:, None]
        kpos = torch.arange(0, P + L, device=q_extend.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window_size > 0:
            allowed &= (qpos - kpos) <= sliding_window_size
        s = torch.einsum("nhd,khd->hnk", q_extend[q0:q1].float(), ks) * sm_scale
        s = s.masked_fill(~allowed[None], float("-inf"))
        out[q0:q1] = torch.einsum("hnk,khd->nhd", torch.softmax(s, -1), vs)
    return out


def random_case(prefix_lens, extend_lens, q_heads, kv_heads, head_dim, dtype=torch.bfloat16, device="cpu",
                generator=None, spare_slots=7) -> dict[str, Any]:
    """Fresh random inputs laid out as sglang's triton backend has them: a KV pool holding every token
    (prefix and new) at shuffled slots, kv_indices listing each request's prefix slots, k/v_extend the
    new tokens (also written to the pool), qo/kv_indptr the cumulative lengths. Returns the arguments
    of `extend_attention_fwd` by name (o_extend poisoned with NaN) plus `max_len`."""
    total = sum(extend_lens)
    pool = sum(prefix_lens) + total + spare_slots

    def rnd(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    k_buf, v_buf = rnd(pool, kv_heads, head_dim), rnd(pool, kv_heads, head_dim)
    slots = torch.randperm(pool, generator=generator).to(device)
    q = rnd(total, q_heads, head_dim)
    k_ext = torch.empty(total, kv_heads, head_dim, dtype=dtype, device=device)
    v_ext = torch.empty_like(k_ext)
    idx, qo, kv, s, t = [], [0], [0], 0, 0
    for P, n in zip(prefix_lens, extend_lens):
        pre, new = slots[s:s + P], slots[s + P:s + P + n]
        s += P + n
        k_ext[t:t + n], v_ext[t:t + n] = k_buf[new], v_buf[new]
        idx.append(pre)
        t += n
        qo.append(t)
        kv.append(kv[-1] + P)
    return dict(
        q_extend=q, k_extend=k_ext, v_extend=v_ext, o_extend=torch.full_like(q, float("nan")),
        k_buffer=k_buf, v_buffer=v_buf,
        qo_indptr=torch.tensor(qo, dtype=torch.int32, device=device),
        kv_indptr=torch.tensor(kv, dtype=torch.int32, device=device),
        kv_indices=torch.cat(idx).to(torch.int64) if idx else torch.empty(0, dtype=torch.int64, device=device),
        max_len=max(extend_lens),
    )
