"""Head-dim-512 extend attention in Gluon: one softmax shared by two warpgroups (no duplicated QK).

Why a second kernel: the Triton kernel in `extend_attention.py` cannot hold a 128x512 fp32 output
accumulator in registers, so at head dim 512 it splits the output columns over two programs that each
recompute the full QK product (DV_SPLIT=2), or lets Triton put both warpgroups on the same 64-row scores
(Triton assigns a dot whose result feeds another dot `warps_per_cta = [num_warps, 1]`). Either way the
matrix work is 1.5x the counted work. Gluon states layouts explicitly, so here one program of 8 warps
(two warpgroups) owns 64 query rows and:
  * S = Q K^T with `warps_per_cta = [4, 2]`: each warpgroup computes half of the key columns;
  * the row max / row sum reduce across both warpgroups (the compiler's shared-memory reduction);
  * P (bf16/fp16) goes to shared memory once, and O += P V runs with `warps_per_cta = [4, 2]` over the
    512 output columns: each warpgroup owns 256 of them (64x256 fp32 = 128 registers a thread).
Q, K and V tiles come in by TMA (one K and one V buffer: the next K loads during softmax and PV, the
next V during the next QK), mbarriers track them.

Scope (the caller routes everything else to the Triton kernel): causal prefill over new tokens only
(no prefix keys in the KV pool), optional sliding window, GQA, head dim 512 for q/k/v, bf16/fp16,
q/k/v viewable as 2-d (tokens, heads * 512) TMA tensors. Same masks as the Triton kernel and the
same online-softmax function (`extend_attention._online_softmax`: exp2, log2(e) folded into the scale).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .extend_attention import _key_tiles as _triton_key_tiles
from .extend_attention import _online_softmax

HEAD_DIM = 512
BLOCK_M = 64  # one warpgroup's wgmma M; the two warpgroups split the columns, not the rows
NUM_WARPS = 8
BLOCK_NS = (32, 64)  # key tile sizes the kernel is built for (smem: Q 64 KB + K, V, P tiles)
DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


# The Triton kernel's online-softmax step, compiled as Gluon (as gluon's own standard library imports
# triton functions): both kernels round and mask identically by construction.
_softmax_step = gluon.jit(_online_softmax.fn)
_key_tiles = gluon.jit(_triton_key_tiles.fn)  # the same key-tile split as the Triton kernel's


@gluon.jit
def _hd512_extend_kernel(
    q_desc, k_desc, v_desc, O, qo_indptr,
    qk_scale, W, kv_group, stride_ot, stride_oh,
    BLOCK_N: gl.constexpr, WINDOW: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid (query blocks of 64, q heads, requests); heavier (later) query blocks first."""
    D: gl.constexpr = q_desc.block_type.shape[1]
    BM: gl.constexpr = q_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    gl.static_assert(BM == 64)
    gl.static_assert(num_warps == 8)

    block_m = gl.num_programs(0) - 1 - gl.program_id(0)
    head = gl.program_id(1)
    seq = gl.program_id(2)
    kv_head = head // kv_group
    q_start = gl.load(qo_indptr + seq).to(gl.int32)
    L = gl.load(qo_indptr + seq + 1).to(gl.int32) - q_start
    m0 = block_m * BM
    if m0 < L:
        # S: 64 x BLOCK_N, each warpgroup BLOCK_N/2 key columns; O: 64 x 512, each warpgroup 256 columns
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_N // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, D // 2, 16])
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BLOCK_N], dtype)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

        q_smem = gl.allocate_shared_memory(dtype, [BM, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], v_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [BM, BLOCK_N], p_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(k_bar, count=1)
        mbarrier.init(v_bar, count=1)

        # key range [lo, hi) of this query block; [c0, c1) are the clean tiles (no mask needed):
        # [window edge (masked)] [clean] [causal diagonal / sequence end (masked)]
        hi = gl.minimum(L, m0 + BM)
        lo, c0, c1 = _key_tiles(m0, hi, m0, W, BM, BLOCK_N, WINDOW)
        n_tiles = gl.cdiv(hi - lo, BLOCK_N)

        col = kv_head * D
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_start + m0, head * D], q_bar, q_smem)
        mbarrier.expect(k_bar, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [q_start + lo, col], k_bar, k_smem)
        mbarrier.expect(v_bar, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [q_start + lo, col], v_bar, v_smem)

        offs_m = m0 + gl.arange(0, BM, layout=row_s)
        offs_n = gl.arange(0, BLOCK_N, layout=col_s)
        m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.full([BM], 0.0, gl.float32, layout=row_s)
        acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BM, BLOCK_N], gl.float32, layout=s_layout)

        mbarrier.wait(q_bar, 0)
        for i in range(n_tiles):
            start_n = lo + i * BLOCK_N
            phase = i & 1
            mbarrier.wait(k_bar, phase)
            s = warpgroup_mma(q_smem, k_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            gl.thread_barrier()  # both warpgroups are done reading K: refill it
            if i + 1 < n_tiles:
                mbarrier.expect(k_bar, k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [q_start + start_n + BLOCK_N, col], k_bar, k_smem)

            if (start_n < c0) | (start_n >= c1):
                offs = start_n + offs_n
                mask = (offs[None, :] < L) & (offs_m[:, None] >= offs[None, :])
                if WINDOW:
                    mask = mask & ((offs_m[:, None] - offs[None, :]) <= W)
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, mask, True)
            else:
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, None, False)

            p_smem.store(p.to(dtype))
            mbarrier.wait(v_bar, phase)
            if start_n + BLOCK_N > L:
                # rows past the sequence end are the next request's tokens or TMA zero fill: p is 0
                # there, but 0 * inf/nan is not, so they must not reach the PV product
                fix: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
                v_rows = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, fix))
                v = v_smem.load(fix)
                v_smem.store(gl.where(v_rows[:, None] < L, v, 0.0).to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # P (both halves) and V visible to both warpgroups' wgmma
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(p_smem, v_smem, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            gl.thread_barrier()  # both warpgroups are done reading P and V: refill V
            if i + 1 < n_tiles:
                mbarrier.expect(v_bar, v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [q_start + start_n + BLOCK_N, col], v_bar, v_smem)

        mbarrier.invalidate(q_bar)
        mbarrier.invalidate(k_bar)
        mbarrier.invalidate(v_bar)

        rows = m0 + gl.arange(0, BM, layout=row_o)
        row_ok = rows < L
        l_o = gl.where(row_ok, gl.convert_layout(l_i, row_o), 1.0)  # rows past the end are not stored
        out = acc / l_o[:, None]
        cols = gl.arange(0, D, layout=col_o)
        o_base = O + q_start.to(gl.int64) * stride_ot + head * stride_oh
        gl.store(o_base + rows[:, None] * stride_ot + cols[None, :], out.to(dtype), mask=row_ok[:, None])


def descriptors(q, k, v, block_n: int):
    """Host TMA descriptors over q/k/v as 2-d (tokens, heads * 512)."""
    out = []
    for t, rows in ((q, BLOCK_M), (k, block_n), (v, block_n)):
        gdt = DTYPES[t.dtype]
        block = [rows, HEAD_DIM]
        layout = gl.NVMMASharedLayout.get_default_for(block, gdt)
        out.append(TensorDescriptor(t, [t.shape[0], t.shape[1] * HEAD_DIM], [t.stride(0), 1], block, layout))
    return out


def launch(q, k, v, o, qo_indptr, max_len_extend: int, qk_scale_log2: float, window: int, block_n: int):
    """Run the kernel; the caller has checked the call is in scope (see the module docstring)."""
    assert block_n in BLOCK_NS
    q_desc, k_desc, v_desc = descriptors(q, k, v, block_n)
    batch = qo_indptr.shape[0] - 1
    Hq, Hkv = q.shape[1], k.shape[1]
    grid = (triton.cdiv(max_len_extend, BLOCK_M), Hq, batch)
    _hd512_extend_kernel[grid](
        q_desc, k_desc, v_desc, o, qo_indptr,
        float(qk_scale_log2), int(window) if window > 0 else 0, Hq // Hkv, o.stride(0), o.stride(1),
        BLOCK_N=block_n, WINDOW=window > 0, num_warps=NUM_WARPS,
    )
    return o
