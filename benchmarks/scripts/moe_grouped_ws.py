"""PROBE (not used by the plugin): the grouped MoE GEMMs of `sglang_gemma4_opt/kernels/moe_grouped.py` as
persistent, warp-specialised Gluon kernels for Hopper, kept with `moe_ws_probe.py` as the measured record of a
rejected design (session 10, issue 4). They give the same bits as the Triton grouped kernels and are slower
at every prefill size on an H200 (numbers: `benchmarks/results/diagnostics/moe_ws_probe-*.json`).

Design: three (or two) warpgroups of 64 rows each own one alignment block (sglang's moe_align_block_size
with block 64) of one expert and share each weight stage, so a 192-row tile reads the expert's weights once
where the Triton kernels' 128-row tiles read them once per tile; tiles come from `tile_table_kernel` (runs of
up to WGS blocks of one expert). Programs are persistent (grid = SM count) and the loads run STAGES - 1 K steps
ahead across tile boundaries.
  up: each warpgroup gathers its token rows by cp.async (mbarrier arrive per thread), warpgroup 0 issues the
      gate and up weight tiles by TMA into a ring shared by all; epilogue act(gate) * up from registers,
      rounded as sglang rounds (intermediate_cache1 in the activation dtype).
  down: two consumer warpgroups and one load warp (TMA for the weight tile and the tile's intermediate
      blocks); a third consumer warpgroup does not fit beside the load warp (ptxas: 128 registers a thread,
      the 64 x 256 fp32 accumulator needs >= 154); epilogue times the routing weight in fp32, scattered to
      cache3 as the Triton kernel does.
K order (BLOCK_K steps of wgmma k16) is the Triton kernels' tl.dot order: outputs equal bit for bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sglang_gemma4_opt.kernels import moe_grouped as kg
from sglang_gemma4_opt.kernels.moe_small_batch import ACTIVATIONS, _act

ROWS = gl.constexpr(64)  # one warpgroup's wgmma M, and the alignment block
GDT = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}

_act_g = gluon.jit(_act.fn)  # the Triton kernels' activation, compiled as Gluon: same arithmetic


# ------------------------------------------------------------------------------------------------------
# tile table (Triton: runs under the interpreter in CPU tests)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def tile_table_kernel(experts_ptr, npost_ptr, tiles_ptr, ntiles_ptr, NB_MAX, stride_t,
                      ROWS: tl.constexpr, WGS: tl.constexpr, CHUNK: tl.constexpr):
    """Tile i: tiles[0, i] its first alignment block, tiles[1, i] its expert, tiles[2, i] its number of blocks
    (1 .. WGS); a tile is WGS consecutive blocks of one expert's run counted from the run's start (the last
    tile of a run may be shorter). ntiles[0]: their number."""
    nb = tl.cdiv(tl.load(npost_ptr), ROWS)
    count = tl.zeros((), dtype=tl.int32)
    carry = tl.zeros((), dtype=tl.int32)  # start block of the run the previous chunk ended in
    for c0 in range(0, NB_MAX, CHUNK):
        b = c0 + tl.arange(0, CHUNK)
        valid = b < nb
        e = tl.load(experts_ptr + b, mask=valid, other=-7)
        ep = tl.load(experts_ptr + b - 1, mask=valid & (b > 0), other=-7)
        start = valid & ((b == 0) | (e != ep))
        rs = tl.maximum(tl.associative_scan(tl.where(start, b, -1), 0, _max_combine), carry)
        first = valid & ((b - rs) % WGS == 0)
        # blocks of the same run after b (an expert's blocks are one run: alignment sorts by expert)
        nblk = tl.full((CHUNK,), 1, dtype=tl.int32)
        same = valid
        for j in tl.static_range(1, WGS):
            ej = tl.load(experts_ptr + b + j, mask=valid & (b + j < nb), other=-7)
            same = same & (ej == e)
            nblk += same.to(tl.int32)
        idx = count + tl.cumsum(first.to(tl.int32), 0) - 1
        tl.store(tiles_ptr + idx, b, mask=first)
        tl.store(tiles_ptr + stride_t + idx, e, mask=first)
        tl.store(tiles_ptr + 2 * stride_t + idx, nblk, mask=first)
        count += tl.sum(first.to(tl.int32), 0)
        carry = tl.max(rs, 0)
    tl.store(ntiles_ptr, count)


def tile_table(expert_ids: torch.Tensor, npost: torch.Tensor, chunk: int | None = None, wgs: int = 3):
    """(tiles [3, max blocks] int32: first block, expert, blocks; ntiles [1] int32) on expert_ids' device; no
    host sync. `chunk`: blocks per step of the scan (tests set it small to cross chunk boundaries)."""
    nb_max = expert_ids.numel()
    tiles = torch.empty(3, max(nb_max, 1), dtype=torch.int32, device=expert_ids.device)
    ntiles = torch.empty(1, dtype=torch.int32, device=expert_ids.device)
    chunk = chunk or min(4096, triton.next_power_of_2(max(nb_max, 16)))
    tile_table_kernel[(1,)](expert_ids, npost, tiles, ntiles, nb_max, tiles.stride(0), ROWS=ROWS.value,
                            WGS=wgs, CHUNK=chunk, num_warps=4)
    return tiles, ntiles


def tile_table_reference(expert_ids: torch.Tensor, npost: int, wgs: int = 3) -> list[tuple[int, int, int]]:
    """Python statement of the same table (for tests): (first block, expert, blocks) per tile."""
    ex = expert_ids.tolist()
    nb = -(-npost // ROWS.value)
    out, pos = [], 0
    for b in range(nb):
        pos = 0 if b == 0 or ex[b] != ex[b - 1] else pos + 1
        if pos % wgs == 0:
            n = 1
            while n < wgs and b + n < nb and ex[b + n] == ex[b]:
                n += 1
            out.append((b, ex[b], n))
    return out


# ------------------------------------------------------------------------------------------------------
# shared pieces of the two GEMM kernels


@gluon.jit
def _tile_mn(t, num_tm, num_tn, GROUP_M: gl.constexpr):
    """The grouped order of moe_grouped._tile: GROUP_M row tiles share each column sweep."""
    width = GROUP_M * num_tn
    first = (t // width) * GROUP_M
    size = gl.minimum(num_tm - first, GROUP_M)
    return first + (t % width) % size, (t % width) // size


@gluon.jit
def _tile_info(t, live, tiles_ptr, stride_t, num_tm, num_tn, W: gl.constexpr, GROUP_M: gl.constexpr):
    """Tile t -> (column tile, this warpgroup's block, the tile's expert, whether the block is part of it).
    Three independent loads (one memory latency); `live` False (a tile past the program's last, which the
    loads look ahead to) reads a valid entry and reports the block as not part of the tile."""
    m, n = _tile_mn(t, num_tm, num_tn, GROUP_M)
    m = gl.maximum(gl.minimum(m, num_tm - 1), 0)
    first = gl.load(tiles_ptr + m)
    e = gl.load(tiles_ptr + stride_t + m)
    nblk = gl.load(tiles_ptr + 2 * stride_t + m)
    return n, first + W, e, live & (W < nblk)


# ------------------------------------------------------------------------------------------------------
# up projection + activation


@gluon.jit
def _up_operands(sorted_ptr, n, blk, e0, ok, r_g, num_valid, stride_xm, N_HALF, TOPK: gl.constexpr,
                 BN: gl.constexpr):
    """Where a tile's loads come from: this warpgroup's token rows (offsets into x, which rows are real) and
    the first gate row of the weight tile."""
    tok = gl.load(sorted_ptr + blk * ROWS + r_g, mask=ok, other=num_valid)
    a_off = (tok // TOPK).to(gl.int64) * stride_xm
    a_ok = ok & (e0 >= 0) & (tok < num_valid)
    return a_off, a_ok, e0 * 2 * N_HALF + n * BN


@gluon.jit
def _up_wg(W: gl.constexpr, x_ptr, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, out_ptr,
           a_smem, b_smem, a_ready, b_ready, b_empty, num_valid, K, N_HALF, stride_xm, stride_om, stride_t,
           TOPK: gl.constexpr, ACT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
           GROUP_M: gl.constexpr):
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    gat_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 16-byte cp.async, 128-byte rows
    dt: gl.constexpr = out_ptr.dtype.element_ty
    num_tm = gl.load(ntiles_ptr)
    num_tn = gl.cdiv(N_HALF, BN)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    my_tiles = gl.cdiv(gl.maximum(num_tm * num_tn - pid, 0), nprog)
    KT = gl.cdiv(K, BK)  # >= STAGES (host): the load cursor is in the compute cursor's tile at its start
    total = my_tiles * KT
    r_g = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gat_l))
    k_g = gl.arange(0, BK, layout=gl.SliceLayout(0, gat_l))

    # load cursor: K step ld_k of local tile ld_t, its tile's info; nx_*: the next tile's, loaded a tile ahead
    ld_t = 0
    ld_k = 0
    n, blk, e0, ok = _tile_info(pid, my_tiles > 0, tiles_ptr, stride_t, num_tm, num_tn, W, GROUP_M)
    nx_n, nx_blk, nx_e0, nx_ok = _tile_info(pid + nprog, my_tiles > 1, tiles_ptr, stride_t, num_tm, num_tn, W,
                                            GROUP_M)
    a_off, a_ok, w_row = _up_operands(sorted_ptr, n, blk, e0, ok, r_g, num_valid, stride_xm, N_HALF, TOPK, BN)
    for i in gl.static_range(STAGES - 1):
        if i < total:
            kk = i * BK + k_g
            async_copy.async_copy_global_to_shared(a_smem.index(W * STAGES + i), x_ptr + a_off[:, None] + kk[None, :],
                                                   mask=a_ok[:, None] & (kk < K)[None, :])
            async_copy.mbarrier_arrive(a_ready.index(W * STAGES + i), increment_count=False)
            if W == 0:
                mbarrier.expect(b_ready.index(i), 2 * w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [w_row, i * BK], b_ready.index(i),
                                                b_smem.index(i).slice(0, BN))
                tma.async_copy_global_to_shared(w_desc, [w_row + N_HALF, i * BK], b_ready.index(i),
                                                b_smem.index(i).slice(BN, BN))
    ld_k = STAGES - 1

    c = 0
    for t in range(my_tiles):
        # the load cursor is still in tile t: its info is this tile's
        cn = n
        cblk = blk
        cok = ok
        mma_ok = ok & (e0 >= 0)
        acc_g = gl.zeros([ROWS, BN], gl.float32, acc_l)
        acc_u = gl.zeros([ROWS, BN], gl.float32, acc_l)
        for k in range(KT):
            s = c % STAGES
            ph = (c // STAGES) & 1
            mbarrier.wait(a_ready.index(W * STAGES + s), ph)
            mbarrier.wait(b_ready.index(s), ph)
            fence_async_shared()  # cp.async wrote A through the generic proxy; wgmma reads the async one
            acc_g = warpgroup_mma_init(acc_g)  # an async accumulator on both paths of the branch
            acc_u = warpgroup_mma_init(acc_u)
            if mma_ok:
                a = a_smem.index(W * STAGES + s)
                b = b_smem.index(s)
                acc_g = warpgroup_mma(a, b.slice(0, BN).permute((1, 0)), acc_g, is_async=True)
                acc_u = warpgroup_mma(a, b.slice(BN, BN).permute((1, 0)), acc_u, is_async=True)
            acc_g, acc_u = warpgroup_mma_wait(num_outstanding=2, deps=(acc_g, acc_u))
            # step c - 1's MMAs have retired: its stage takes step c + STAGES - 1
            if c > 0:
                mbarrier.arrive(b_empty.index((c - 1) % STAGES), count=1)
            if ld_k == KT:  # the load cursor enters the next tile
                ld_k = 0
                ld_t += 1
                n = nx_n
                blk = nx_blk
                e0 = nx_e0
                ok = nx_ok
                nx_n, nx_blk, nx_e0, nx_ok = _tile_info(pid + (ld_t + 1) * nprog, ld_t + 1 < my_tiles, tiles_ptr,
                                                        stride_t, num_tm, num_tn, W, GROUP_M)
                a_off, a_ok, w_row = _up_operands(sorted_ptr, n, blk, e0, ok, r_g, num_valid, stride_xm, N_HALF,
                                                  TOPK, BN)
            nxt = c + STAGES - 1
            if nxt < total:
                sl = nxt % STAGES
                kk = ld_k * BK + k_g
                async_copy.async_copy_global_to_shared(a_smem.index(W * STAGES + sl),
                                                       x_ptr + a_off[:, None] + kk[None, :],
                                                       mask=a_ok[:, None] & (kk < K)[None, :])
                async_copy.mbarrier_arrive(a_ready.index(W * STAGES + sl), increment_count=False)
                if W == 0:
                    mbarrier.wait(b_empty.index(sl), ((nxt // STAGES) & 1) ^ 1)
                    mbarrier.expect(b_ready.index(sl), 2 * w_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(w_desc, [w_row, ld_k * BK], b_ready.index(sl),
                                                    b_smem.index(sl).slice(0, BN))
                    tma.async_copy_global_to_shared(w_desc, [w_row + N_HALF, ld_k * BK], b_ready.index(sl),
                                                    b_smem.index(sl).slice(BN, BN))
            ld_k += 1
            c += 1
        acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g, acc_u))
        if cok:
            g = acc_g.to(dt).to(gl.float32)  # sglang's intermediate_cache1 is in dt
            u = acc_u.to(dt).to(gl.float32)
            h = _act_g(g, ACT) * u  # an expert not on this rank (-1): no MMA, act(0) * 0 = 0 as sglang writes
            rows = cblk * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_l))
            cols = cn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_l))
            gl.store(out_ptr + rows.to(gl.int64)[:, None] * stride_om + cols[None, :], h.to(dt),
                     mask=(cols < N_HALF)[None, :])


@gluon.jit
def grouped_up_ws_kernel(x_ptr, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, out_ptr,
                         num_valid, K, N_HALF, stride_xm, stride_om, stride_t,
                         TOPK: gl.constexpr, ACT: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                         GROUP_M: gl.constexpr, REGS: gl.constexpr, NWG: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    dtype: gl.constexpr = w_desc.dtype
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BK], dtype)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * BN, BK], dtype)
    a_smem = gl.allocate_shared_memory(dtype, [NWG * STAGES, ROWS, BK], a_layout)
    b_smem = gl.allocate_shared_memory(dtype, [STAGES, 2 * BN, BK], b_layout)  # gate rows, then up rows
    a_ready = gl.allocate_shared_memory(gl.int64, [NWG * STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NWG * STAGES):
        mbarrier.init(a_ready.index(i), count=128)  # every thread's cp.async group arrives (noinc)
    for i in gl.static_range(STAGES):
        mbarrier.init(b_ready.index(i), count=1)
        mbarrier.init(b_empty.index(i), count=NWG)
    fence_async_shared()
    if NWG == 3:
        gl.warp_specialize([
            (_up_wg, (0, x_ptr, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, out_ptr, a_smem, b_smem, a_ready, b_ready,
                  b_empty, num_valid, K, N_HALF, stride_xm, stride_om, stride_t, TOPK, ACT, BN, BK, STAGES, GROUP_M)),
            (_up_wg, (1, x_ptr, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, out_ptr, a_smem, b_smem, a_ready, b_ready,
                  b_empty, num_valid, K, N_HALF, stride_xm, stride_om, stride_t, TOPK, ACT, BN, BK, STAGES, GROUP_M)),
            (_up_wg, (2, x_ptr, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, out_ptr, a_smem, b_smem, a_ready, b_ready,
                  b_empty, num_valid, K, N_HALF, stride_xm, stride_om, stride_t, TOPK, ACT, BN, BK, STAGES, GROUP_M)),
        ], [4, 4], [REGS, REGS])
    else:
        gl.warp_specialize([
            (_up_wg, (0, x_ptr, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, out_ptr, a_smem, b_smem, a_ready, b_ready,
                  b_empty, num_valid, K, N_HALF, stride_xm, stride_om, stride_t, TOPK, ACT, BN, BK, STAGES, GROUP_M)),
            (_up_wg, (1, x_ptr, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, out_ptr, a_smem, b_smem, a_ready, b_ready,
                  b_empty, num_valid, K, N_HALF, stride_xm, stride_om, stride_t, TOPK, ACT, BN, BK, STAGES, GROUP_M)),
        ], [4], [REGS])


# ------------------------------------------------------------------------------------------------------
# down projection


@gluon.jit
def _down_consumer(W: gl.constexpr, sorted_ptr, tiles_ptr, ntiles_ptr, wts_ptr, out_ptr, a_smem, b_smem, ready, empty,
                   num_valid, HIDDEN, N_HALF, stride_om, stride_t,
                   BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    dt: gl.constexpr = out_ptr.dtype.element_ty
    num_tm = gl.load(ntiles_ptr)
    num_tn = gl.cdiv(HIDDEN, BN)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    my_tiles = gl.cdiv(gl.maximum(num_tm * num_tn - pid, 0), nprog)
    KT = gl.cdiv(N_HALF, BK)
    r_acc = gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_l))
    nx_n, nx_blk, nx_e0, nx_ok = _tile_info(pid, my_tiles > 0, tiles_ptr, stride_t, num_tm, num_tn, W, GROUP_M)
    c = 0
    for t in range(my_tiles):
        cn = nx_n
        cblk = nx_blk
        cok = nx_ok
        mma_ok = nx_ok & (nx_e0 >= 0)
        # the next tile's info and this tile's pair ids: loaded now, used after the K loop
        nx_n, nx_blk, nx_e0, nx_ok = _tile_info(pid + (t + 1) * nprog, t + 1 < my_tiles, tiles_ptr, stride_t, num_tm,
                                                num_tn, W, GROUP_M)
        tok = gl.load(sorted_ptr + cblk * ROWS + r_acc, mask=cok, other=num_valid)
        acc = gl.zeros([ROWS, BN], gl.float32, acc_l)
        for k in range(KT):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            acc = warpgroup_mma_init(acc)
            if mma_ok:
                acc = warpgroup_mma(a_smem.index(W * STAGES + s), b_smem.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if c > 0:  # step c - 1's MMA has retired: release its stage
                mbarrier.arrive(empty.index((c - 1) % STAGES), count=1)
            c += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if cok:
            cols = cn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_l))
            t_ok = tok < num_valid
            w = gl.load(wts_ptr + tok, mask=t_ok, other=0.0)
            y = acc * w[:, None]  # routing weight in fp32, one rounding (cache3), as the Triton kernel
            gl.store(out_ptr + tok.to(gl.int64)[:, None] * stride_om + cols[None, :], y.to(dt),
                     mask=t_ok[:, None] & (cols < HIDDEN)[None, :])
    if c > 0:
        mbarrier.arrive(empty.index((c - 1) % STAGES), count=1)


@gluon.jit
def _down_producer(h_desc, w_desc, tiles_ptr, ntiles_ptr, a_smem, b_smem, ready, empty, HIDDEN, N_HALF, stride_t,
                   BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, NWG: gl.constexpr):
    """One warp: every stage's weight tile and the tile's token blocks by TMA, as far ahead as the ring allows
    (the consumers' epilogues do not stall it)."""
    num_tm = gl.load(ntiles_ptr)
    num_tn = gl.cdiv(HIDDEN, BN)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    my_tiles = gl.cdiv(gl.maximum(num_tm * num_tn - pid, 0), nprog)
    KT = gl.cdiv(N_HALF, BK)
    c = 0
    for t in range(my_tiles):
        m, n = _tile_mn(pid + t * nprog, num_tm, num_tn, GROUP_M)
        first = gl.load(tiles_ptr + m)
        e0 = gl.load(tiles_ptr + stride_t + m)
        nblk = gl.where(e0 >= 0, gl.load(tiles_ptr + 2 * stride_t + m), 0)
        w_row = e0 * HIDDEN + n * BN
        for k in range(KT):
            s = c % STAGES
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            for j in gl.static_range(NWG + 1):  # the byte count is a constant: one predicated expect per case
                mbarrier.expect(bar, w_desc.block_type.nbytes + j * h_desc.block_type.nbytes, pred=nblk == j)
            tma.async_copy_global_to_shared(w_desc, [w_row, k * BK], bar, b_smem.index(s))
            for j in gl.static_range(NWG):
                if j < nblk:
                    tma.async_copy_global_to_shared(h_desc, [(first + j) * ROWS, k * BK], bar,
                                                    a_smem.index(j * STAGES + s))
            c += 1


@gluon.jit
def grouped_down_ws_kernel(h_desc, w_desc, sorted_ptr, tiles_ptr, ntiles_ptr, wts_ptr, out_ptr,
                           num_valid, HIDDEN, N_HALF, stride_om, stride_t,
                           STAGES: gl.constexpr, GROUP_M: gl.constexpr, REGS: gl.constexpr, NWG: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BK: gl.constexpr = w_desc.block_type.shape[1]
    dtype: gl.constexpr = w_desc.dtype
    a_smem = gl.allocate_shared_memory(dtype, [NWG * STAGES, ROWS, BK], h_desc.layout)
    b_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NWG)
    fence_async_shared()
    gl.static_assert(NWG == 2, "with a load warp the consumers' 64 x 256 accumulators fit two warpgroups only")
    gl.warp_specialize([
        (_down_consumer, (0, sorted_ptr, tiles_ptr, ntiles_ptr, wts_ptr, out_ptr, a_smem, b_smem, ready, empty,
                          num_valid, HIDDEN, N_HALF, stride_om, stride_t, BN, BK, STAGES, GROUP_M)),
        (_down_consumer, (1, sorted_ptr, tiles_ptr, ntiles_ptr, wts_ptr, out_ptr, a_smem, b_smem, ready, empty,
                          num_valid, HIDDEN, N_HALF, stride_om, stride_t, BN, BK, STAGES, GROUP_M)),
        (_down_producer, (h_desc, w_desc, tiles_ptr, ntiles_ptr, a_smem, b_smem, ready, empty, HIDDEN, N_HALF, stride_t,
                          BN, BK, STAGES, GROUP_M, NWG)),
    ], [4, 1], [REGS, PRODUCER_REGS])


# ------------------------------------------------------------------------------------------------------
# host side

SMEM_LIMIT = 232448  # bytes of shared memory a Hopper block may use
PRODUCER_REGS = gl.constexpr(24)  # the load warp: addresses and barrier phases only
REGS = 168  # 3 warpgroups x 128 threads x 168 registers = 64512 of the SM's 65536


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _desc(t: torch.Tensor, block):
    layout = gl.NVMMASharedLayout.get_default_for(list(block), GDT[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), layout)


def _grid(x: torch.Tensor, programs=None):
    if programs is not None:
        return (programs,)
    return (_num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()),)


def up_act(x, w1, sorted_ids, tiles, ntiles, inter, topk, act_code, num_valid, block_n=128, block_k=64, stages=4,
           group_m=8, programs=None, wgs=3):
    """inter[sorted row] = act(x[row // topk] @ W_gate[e]^T) * (x[row // topk] @ W_up[e]^T), rows of every tile."""
    E, two_n, K = w1.shape
    n_half = two_n // 2
    assert triton.cdiv(K, block_k) >= stages, "the K loop must have at least `stages` steps"
    w_desc = _desc(w1.view(E * two_n, K), (block_n, block_k))
    grouped_up_ws_kernel[_grid(x, programs)](
        x, w_desc, sorted_ids, tiles, ntiles, inter,
        num_valid, K, n_half, x.stride(0), inter.stride(0), tiles.stride(0),
        TOPK=topk, ACT=act_code, BK=block_k, STAGES=stages, GROUP_M=group_m, REGS=REGS, NWG=wgs, num_warps=4,
    )
    return inter


def down(inter, w2, sorted_ids, tiles, ntiles, wts, cache3, num_valid, block_n=256, block_k=64, stages=4, group_m=8,
         programs=None, wgs=2):
    """cache3[pair] = wts[pair] * (inter[sorted row] @ W2[e]^T) for the real rows of every tile."""
    E, hidden, n_half = w2.shape
    assert triton.cdiv(n_half, block_k) >= stages, "the K loop must have at least `stages` steps"
    h_desc = _desc(inter, (ROWS.value, block_k))
    w_desc = _desc(w2.view(E * hidden, n_half), (block_n, block_k))
    grouped_down_ws_kernel[_grid(inter, programs)](
        h_desc, w_desc, sorted_ids, tiles, ntiles, wts, cache3,
        num_valid, hidden, n_half, cache3.stride(0), tiles.stride(0),
        STAGES=stages, GROUP_M=group_m, REGS=REGS, NWG=wgs, num_warps=4,
    )
    return cache3


def fused_moe_ws(x, w1, w2, topk_weights, topk_ids, activation="gelu", up_wgs=3, stages=4, group_m=8):
    """moe_grouped.fused_moe_grouped with the two GEMMs above (x [M, K] rows contiguous, K % 16 == 0)."""
    M, K = x.shape
    E, two_n, _ = w1.shape
    n_half = two_n // 2
    hidden = w2.shape[1]
    topk = topk_ids.shape[1]
    ids = topk_ids.to(torch.int32)
    sorted_ids, expert_ids, npost = kg._sglang_align()(ids, ROWS.value, E)
    up_tiles = tile_table(expert_ids, npost, wgs=up_wgs)
    down_tiles = up_tiles if up_wgs == 2 else tile_table(expert_ids, npost, wgs=2)
    inter = torch.empty(sorted_ids.numel(), n_half, device=x.device, dtype=x.dtype)
    cache3 = torch.empty(M * topk, hidden, device=x.device, dtype=x.dtype)
    up_act(x, w1, sorted_ids, *up_tiles, inter, topk, ACTIVATIONS[activation], ids.numel(), stages=stages,
           group_m=group_m, wgs=up_wgs)
    down(inter, w2, sorted_ids, *down_tiles, topk_weights.reshape(-1).contiguous(), cache3, ids.numel(),
         stages=stages, group_m=group_m)
    y = torch.empty(M, hidden, device=x.device, dtype=x.dtype)
    return kg.topk_sum(cache3, M, topk, y)
