"""Fused MoE for large batches (prefill): expert-grouped GEMMs with TMA weight tiles.

sglang's Triton MoE at prefill sizes runs moe_align_block_size -> up GEMM -> gelu_and_mul -> down GEMM
-> moe_sum, both GEMMs loading every tile (tokens and weights) through pointer loads. On H200 that
reaches ~300-400 TFLOP/s at M=4096-16384 whatever the tile config (issue 4's tuning, 1.00-1.17x the
PR's table). Here, on the same alignment (sglang's moe_align_block_size, so each BLOCK_M rows of the
sorted order belong to one expert):

  kernel 1 (up + activation): a program owns BLOCK_M sorted rows and BLOCK_N columns of BOTH halves
      of w13 (gate rows n, up rows N + n), loads the weight tiles through TMA descriptors, the token
      rows by pointer gather (or TMA from a pre-gathered copy), and writes act(gate) * up straight to
      an intermediate kept in sorted order: no [M*topk, 2N] buffer and no activation launch.
  kernel 2 (down): the intermediate is contiguous per block, so both operands come through TMA; the
      routing weight is applied in fp32 and each row is scattered to its (token, k) slot.
  kernel 3 (top-k sum): one streaming pass over those slots, fp32 sum, one rounding.

Variants (GroupedParams): tile shapes per GPU and M from `configs/moe_grouped.json` (tuner:
`python -m sglang_gemma4_opt.bench.tune_moe_grouped`); `half_tail` runs an expert's last tile at half
height when its second half is padding (expert runs padded to < block_m / 2 rows in MMA work, alignment
unchanged); `split_n` runs the up kernel's last column tile at half width (N=704 over 128 columns); `one_dot` loads a
tile's gate and up weight rows as one TMA box of a [E, 2, N, K] view of w13 and multiplies them in one dot of
2 * BLOCK_N columns (one m64n256k16 wgmma per warpgroup and k-step instead of two m64n128k16 that each read
the token tile from shared memory; the accumulator splits into gate and up in registers; bit-identical to
two dots, tested on the GPU; H200 session 13: 3-5% off the whole MoE at M=2048/4096/16384, 1% at 8192);
`split_m` aligns to half tiles and pairs them (mixed-expert blocks cost a second pass over the weights:
loses to half_tail below M=16384); `swap_ab` puts weight rows on the MMA's M side and 16-64 token rows on
its N side (slower on H200/H100 at M >= 2048, kept as a candidate); `a_tma` loads the token rows from a
pre-gathered copy through TMA (slower: the copy costs more than it saves); `quarter_tail` (with half_tail) runs
a tail tile with three quarters padding at 32 rows (mma.sync: wgmma's M is 64 per warpgroup); `persistent_down`
runs the down GEMM as one program per SM with the tile loop flattened into the K loop (Triton's
tl.range(flatten=True)), tails at full height; the top-k sum is a streaming Triton kernel (torch's reads cache3
at ~1.8 TB/s on an H200).

Session 14 (H200, tuner side by side, `diagnostics/tune_moe_grouped-quarter_tail-*`,
`...-fused_sum-persistent_down-*`): quarter_tail 626 vs 633 us at M=2048 and 1033 vs 1011 at 4096, persistent_down
598 vs 597 and 995 vs 978 (persistent_down bit-identical to the shipped down kernel, quarter_tail within the
fp32-reference tolerance, both GPU-tested): kept as tuner candidates. Session 15's re-tune (`ci/gpu-run.sh moe-retune`,
`diagnostics/tune_moe_grouped-retune-*`) ships persistent_down for N=352 (TP=2) at M >= 4096 on the H200, where the down
K loop is only 352 / 64 = 6 steps and the flattened loop hides the epilogue: 3-6% off the whole MoE there (suite: 620
-> 581 us at M=4096, 1093 -> 1033 at 8192, 2067 -> 1962 at 16384); at N=704 the shipped forms stay within 0.3% of the
best at M 2048-8192. Rejected and removed: the top-k
sum fused into the down kernel's epilogue (per-(token, column tile) arrival counters, acq_rel atomics after a CTA
barrier, the last arriver summing the TOPK cache3 rows in k order: the same bits, GPU-tested, but 667 vs 597 us at
M=2048 and 1089 vs 978 at 4096, 702 / 1098 persistent: the epilogue's dependent L2 round trips are not overlapped
with one 196 KB program per SM, and cost ~3x the 26 us pass they replace). Session 16: programmatic dependent launch
between the up, down and sum kernels (launch_pdl, griddepcontrol wait / launch_dependents; commit 1aaff34, the same
bits, GPU-tested): no gain, pdl / plain 0.975-1.025 over the seven shipped H200 shapes at M 2048-16384, mean below 1
(`diagnostics/tune_moe_grouped-pdl-N704-NVIDIA_H200.json`): the launch latency it hides is small against 0.6-3.3 ms.

Measured (H200, CUDA-graph replay; `benchmarks/results/diagnostics/tune_moe_grouped-*.json`, per-kernel
split `moe_kernel_breakdown-*.json`): sglang's path with the plugin's tables -> grouped 731 -> 622 us at
M=2048, 1179 -> 1016 at 4096, 2123 -> 1844 at 8192, 4031 -> 3501 at 16384 (half_tail runs), 14935 -> 13047
at 65536. Per kernel at M=2048 (profiler): up 342 us, down 185, top-k sum 26, align 13, against 613 us for
sglang's two GEMMs; the GEMMs run at ~380/350 TFLOP/s of real work there (570/537 at M=16384) with the
weights (1.52 GB, 317 us at 4.8 TB/s) streamed at ~2.9 TB/s. Rejected after measuring: torch._grouped_mm
(CUTLASS grouped GEMM, exact row offsets; 892 vs 691 us at M=2048, `moe_gmm_probe-*.json`), a Triton
moe_align (no faster than sglang's CUDA one, `moe_align_probe-*.json`), and persistent warp-specialised Gluon
versions of both GEMMs (benchmarks/scripts/moe_grouped_ws.py: three or two 64-row warpgroups share each weight
stage, a load warp for the down GEMM; same bits as these kernels, slower at every M on an H200: 704 / 689 vs
644 us at M=2048, 1923 vs 1803 at 8192, 3681 vs 3461 at 16384, `moe_ws_probe-*.json`).

What bounds it (session 11): a sustained prefill load holds an H200 or H100 at its 700 W cap (SM clock ~1.5-1.65
GHz instead of 1.98), sglang's path and this one alike, so sustained time follows energy per call
(`moe_power_probe-*.json`: at M=2048 on an H200 isolated 693 -> 604 us, sustained 755 -> 660). Nsight Compute at
M=2048 (`moe_ncu-*.json`, base clock): up / down tensor pipe 59% / 55% active, L2 at 84% / 83% of peak (SM-side
sectors ~50%), DRAM ~60%; the top warp stalls are the K loop's barrier and wgmma waits (one 8-warp CTA per SM).
Re-tuning with the clock settled picked the same shapes (`tune_moe_grouped-preheat-*.json`).
Why the tiles cannot simply grow (session 16, arithmetic): a tile's L2 -> SM traffic per FLOP goes as 1/BLOCK_M +
1/BLOCK_N, and 128 x 256 fp32 accumulators already take half the register file of the one 8-warp CTA an SM holds
(256 x 128 is the same traffic; 256 x 256 does not fit; Triton's warps come in powers of two). Weight traffic is
row tiles x each expert's weights: at M=2048 (~128 rows per expert) about half the experts run a tail tile that
re-reads their whole weight slab for <= 64 rows, ~1.5 weight passes in all (~2.3 GB of the ~3.1 GB the two GEMMs
move through L2). Sharing one weight tile between CTAs needs cluster TMA multicast, which Triton 3.6 does not
expose on Hopper.

Rounding mirrors sglang's: gate and up rounded to the activation dtype before the activation
(intermediate_cache1), the activation output (cache2), each expert's weighted down row (cache3), the
sum rounded once. Only the K-reduction order differs, as between sglang's own tile configs.
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

from .moe_small_batch import ACTIVATIONS, _act


@dataclass(frozen=True)
class GroupedParams:
    block_m: int = 128
    up_block_n: int = 64
    up_block_k: int = 64
    up_warps: int = 8
    up_stages: int = 3
    down_block_n: int = 128
    down_block_k: int = 64
    down_warps: int = 8
    down_stages: int = 3
    group_m: int = 8
    a_tma: bool = False  # gather the token rows once (torch) and load them through TMA
    warp_specialize: bool = False  # Triton's automatic warp specialisation of the K loops (Hopper+)
    # swap_ab: weight rows are the MMA's M side and the block_m sorted token rows its N side, so the
    # token tile (and the padding of each expert's run to it) can be 16-64 rows where wgmma's M is 64
    swap_ab: bool = False
    torch_sum: bool = False  # the top-k sum through torch (slower; kept for the probe's comparison)
    sum_block_h: int = 1024
    # split_m: align each expert's run to block_m // 2 rows; a program runs one full tile where two half
    # blocks share an expert and a half tile each where they do not (padding per expert: < block_m / 2)
    split_m: bool = False
    # split_n: the up kernel's last column tile at half width when half of it or less is real (N=704)
    split_n: bool = False
    # half_tail: alignment to block_m as usual; a tile whose second half is all padding (the last tile of an
    # expert's run with block_m / 2 real rows or fewer) runs at half height in both kernels: the padding
    # each expert pays drops below block_m / 2 rows without split_m's mixed-expert blocks
    half_tail: bool = False
    # quarter_tail (with half_tail): a tail tile whose last three quarters are padding runs at a quarter of the
    # height (32 of 128 rows; Triton takes mma.sync for a 32-row dot, wgmma's M being 64 per warpgroup)
    quarter_tail: bool = False
    # one_dot: gate and up columns of a tile come in one TMA box of a [E, 2, N, K] view of w13 and go through
    # one dot of 2 * up_block_n columns (one m64n256 wgmma per warpgroup and k-step at up_block_n 128, where
    # two dots issue two m64n128 that each read the token tile from shared memory); the accumulator is split
    # into gate and up in registers. Same sums, same rounding points
    one_dot: bool = False
    # persistent_down: the down GEMM as one program per SM looping over the tiles, the tile loop and its K loop
    # flattened by Triton's pipeliner (tl.range(flatten=True)) so the next tile's loads are in flight during a
    # tile's epilogue (the K loop is only N/BLOCK_K = 11 steps at N=704); tail tiles at full height
    persistent_down: bool = False

    def __post_init__(self):
        if (self.split_m or self.split_n or self.half_tail) and (self.swap_ab or self.a_tma):
            raise ValueError("split_m / split_n / half_tail apply to the plain kernels with pointer-loaded token "
                             "rows only")
        if (self.split_m or self.half_tail) and self.block_m < 32:
            raise ValueError("split_m / half_tail need block_m >= 32 (half tiles of at least 16 rows)")
        if self.split_m and self.half_tail:
            raise ValueError("split_m and half_tail are two ways of cutting the same padding; pick one")
        if self.split_n and self.up_block_n < 32:
            raise ValueError("split_n needs up_block_n >= 32")
        if self.one_dot and (self.swap_ab or self.up_block_n > 128):
            raise ValueError("one_dot applies to the plain up kernel with up_block_n <= 128 (wgmma's N <= 256)")
        if self.quarter_tail and (not self.half_tail or self.block_m < 64):
            raise ValueError("quarter_tail refines half_tail and needs block_m >= 64 (quarter tiles of 16+ rows)")
        if self.persistent_down and self.swap_ab:
            raise ValueError("persistent_down applies to the plain down kernel")
        if self.persistent_down and self.split_m:
            raise ValueError("persistent_down runs whole tiles of one expert: not with split_m")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@triton.jit
def _tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _second_half_is_padding(sorted_ptr, row0, num_valid, BLOCK_M: tl.constexpr):
    """half_tail's test, shared by both kernels so they cut the same tiles: padding (sorted id num_valid)
    sits at the end of an expert's run, so the tile's middle row tells whether its second half is empty."""
    return tl.load(sorted_ptr + row0 + BLOCK_M // 2) >= num_valid


@triton.jit
def _tail_rows(sorted_ptr, row0, num_valid, BLOCK_M: tl.constexpr, HALF_TAIL: tl.constexpr,
               QUARTER_TAIL: tl.constexpr):
    """The height a tile runs at under half_tail / quarter_tail: BLOCK_M // 4 when its rows from a quarter on are
    padding, BLOCK_M // 2 when its second half is, else BLOCK_M (as a code 4 / 2 / 1 of the divisor)."""
    div = 1
    if HALF_TAIL:
        if _second_half_is_padding(sorted_ptr, row0, num_valid, BLOCK_M):
            div = 2
            if QUARTER_TAIL:
                if tl.load(sorted_ptr + row0 + BLOCK_M // 4) >= num_valid:
                    div = 4
    return div


@triton.jit
def _up_tile(x_ptr, a_desc, w_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF, stride_xm, stride_om,
             TOPK: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr,
             STAGES: tl.constexpr, A_TMA: tl.constexpr, WS: tl.constexpr, ONE_DOT: tl.constexpr):
    """act(rows @ W_gate[e]^T) * (rows @ W_up[e]^T) for sorted rows row0 .. row0+BM, columns n0 .. n0+BN
    (w_desc's block is (BN, BLOCK_K))."""
    dt = out_ptr.dtype.element_ty
    rows = row0 + tl.arange(0, BM)
    offs_n = n0 + tl.arange(0, BN)
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    n_mask = offs_n[None, :] < N_HALF
    if e == -1:  # expert not on this rank (EP): sglang writes zeros
        tl.store(o_ptrs, tl.zeros((BM, BN), dtype=dt), mask=n_mask)
    else:
        gate_row = e * 2 * N_HALF + n0
        up_row = gate_row + N_HALF
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        tok = tl.load(sorted_ptr + rows)
        t_mask = tok < num_valid
        a_ptrs = x_ptr + (tok // TOPK).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        # ONE_DOT: w_desc is a [E, 2, N_HALF, K] view with block (1, 2, BN, BLOCK_K), the tile's gate rows then
        # its up rows, through one dot into acc; else two boxes of the [E * 2N, K] view into acc_g and acc_u (the
        # accumulators a variant does not use stay out of the loop: unchanged loop values fold away)
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
            if A_TMA:
                a = a_desc.load([row0, k])
            else:
                a = tl.load(a_ptrs, mask=t_mask[:, None] & (k + offs_k[None, :] < K), other=0.0)
                a_ptrs += BLOCK_K
            if ONE_DOT:
                b = w_desc.load([e, 0, n0, k]).reshape(2 * BN, BLOCK_K)
                acc = tl.dot(a, b.T, acc)
            else:
                bg = w_desc.load([gate_row, k])
                bu = w_desc.load([up_row, k])
                acc_g = tl.dot(a, bg.T, acc_g)
                acc_u = tl.dot(a, bu.T, acc_u)
        if ONE_DOT:
            acc_g, acc_u = acc.reshape(BM, 2, BN).permute(0, 2, 1).split()
        g = acc_g.to(dt).to(tl.float32)  # sglang's intermediate_cache1 is in dt
        u = acc_u.to(dt).to(tl.float32)
        h = _act(g, ACT) * u
        tl.store(o_ptrs, h.to(dt), mask=n_mask)


@triton.jit
def _up_rows(x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF,
             stride_xm, stride_om, TOPK: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, STAGES: tl.constexpr, A_TMA: tl.constexpr, WS: tl.constexpr,
             SPLIT_N: tl.constexpr, ONE_DOT: tl.constexpr):
    """One tile of BM rows; with SPLIT_N the last column tile, when half of it or less is real (N=704 over
    128-column tiles: 64 of 128), runs at half width instead of multiplying padding."""
    if SPLIT_N:
        if N_HALF - n0 <= BLOCK_N // 2:
            _up_tile(x_ptr, a_desc, w1h_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF, stride_xm,
                     stride_om, TOPK, ACT, BM, BLOCK_N // 2, BLOCK_K, STAGES, A_TMA, WS, ONE_DOT)
        else:
            _up_tile(x_ptr, a_desc, w1_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF, stride_xm,
                     stride_om, TOPK, ACT, BM, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, ONE_DOT)
    else:
        _up_tile(x_ptr, a_desc, w1_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF, stride_xm,
                 stride_om, TOPK, ACT, BM, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, ONE_DOT)


@triton.jit
def grouped_up_act_kernel(
    x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, experts_ptr, npost_ptr, out_ptr,
    num_valid, EM, K, N_HALF, stride_xm, stride_om,
    TOPK: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr, A_TMA: tl.constexpr,
    WS: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr, HALF_TAIL: tl.constexpr,
    ONE_DOT: tl.constexpr = False, QUARTER_TAIL: tl.constexpr = False,
):
    """Up projection + activation. SPLIT_M: the alignment is to BLOCK_M // 2 rows (each expert's run padded
    to half a tile); a program owns two half blocks and runs one full tile when both belong to the same
    expert, else a half tile for each (real rows only: the second may lie past the end). HALF_TAIL: a tile
    whose second half is padding (sorted id == num_valid: padding sits at the end of an expert's run) runs
    at half height; its other rows of `out` stay unwritten and the down kernel, deciding the same way, never
    reads them."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N_HALF, BLOCK_N)
    pid_m, pid_n = _tile(pid, num_pid_m, num_pid_n, GROUP_M)
    npost = tl.load(npost_ptr)
    row0 = pid_m * BLOCK_M
    if row0 >= npost:
        return
    n0 = pid_n * BLOCK_N
    if SPLIT_M:
        HM: tl.constexpr = BLOCK_M // 2
        e0 = tl.load(experts_ptr + 2 * pid_m)
        has1 = row0 + HM < npost
        e1 = tl.load(experts_ptr + 2 * pid_m + 1, mask=has1, other=-2)
        if e0 == e1:
            _up_rows(x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, out_ptr, row0, e0, n0, num_valid, K, N_HALF,
                     stride_xm, stride_om, TOPK, ACT, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, SPLIT_N, ONE_DOT)
        else:
            _up_rows(x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, out_ptr, row0, e0, n0, num_valid, K, N_HALF,
                     stride_xm, stride_om, TOPK, ACT, HM, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, SPLIT_N, ONE_DOT)
            if has1:
                _up_rows(x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, out_ptr, row0 + HM, e1, n0, num_valid, K,
                         N_HALF, stride_xm, stride_om, TOPK, ACT, HM, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, SPLIT_N,
                         ONE_DOT)
    else:
        e = tl.load(experts_ptr + pid_m)
        div = _tail_rows(sorted_ptr, row0, num_valid, BLOCK_M, HALF_TAIL, QUARTER_TAIL)
        if QUARTER_TAIL and div == 4:  # constexpr first: a variant without it never compiles the branch
            _up_rows(x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF,
                     stride_xm, stride_om, TOPK, ACT, BLOCK_M // 4, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, SPLIT_N,
                     ONE_DOT)
        elif HALF_TAIL and div == 2:
            _up_rows(x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF,
                     stride_xm, stride_om, TOPK, ACT, BLOCK_M // 2, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, SPLIT_N,
                     ONE_DOT)
        else:
            _up_rows(x_ptr, a_desc, w1_desc, w1h_desc, sorted_ptr, out_ptr, row0, e, n0, num_valid, K, N_HALF,
                     stride_xm, stride_om, TOPK, ACT, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, A_TMA, WS, SPLIT_N, ONE_DOT)


@triton.jit
def _down_tile(h_desc, w2_desc, sorted_ptr, wts_ptr, out_ptr, row0, e, n0, num_valid, HIDDEN, N_HALF, stride_om,
               BM: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr):
    """Sorted rows row0 .. row0+BM of the intermediate @ W2[e]^T, columns n0 .. n0+BN, times the routing
    weight in fp32, scattered to the rows' (token, k) slots (h_desc's block is (BM, BLOCK_K))."""
    dt = out_ptr.dtype.element_ty
    rows = row0 + tl.arange(0, BM)
    offs_n = n0 + tl.arange(0, BN)
    tok = tl.load(sorted_ptr + rows)
    t_mask = tok < num_valid
    o_ptrs = out_ptr + tok.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = t_mask[:, None] & (offs_n[None, :] < HIDDEN)
    if e == -1:
        tl.store(o_ptrs, tl.zeros((BM, BN), dtype=dt), mask=o_mask)
    else:
        b_row = e * HIDDEN + n0
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, N_HALF, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
            a = h_desc.load([row0, k])
            b = w2_desc.load([b_row, k])
            acc = tl.dot(a, b.T, acc)
        w = tl.load(wts_ptr + tok, mask=t_mask, other=0.0)
        acc = acc * w[:, None]
        tl.store(o_ptrs, acc.to(dt), mask=o_mask)


@triton.jit
def grouped_down_kernel(
    h_desc, hh_desc, hq_desc, w2_desc, sorted_ptr, experts_ptr, npost_ptr, wts_ptr, out_ptr,
    num_valid, EM, HIDDEN, N_HALF, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr, WS: tl.constexpr, SPLIT_M: tl.constexpr, HALF_TAIL: tl.constexpr,
    QUARTER_TAIL: tl.constexpr = False,
):
    """Down projection; SPLIT_M, HALF_TAIL and QUARTER_TAIL as in grouped_up_act_kernel (hh_desc / hq_desc: the
    intermediate in half / quarter blocks)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(HIDDEN, BLOCK_N)
    pid_m, pid_n = _tile(pid, num_pid_m, num_pid_n, GROUP_M)
    npost = tl.load(npost_ptr)
    row0 = pid_m * BLOCK_M
    if row0 >= npost:
        return
    n0 = pid_n * BLOCK_N
    if SPLIT_M:
        HM: tl.constexpr = BLOCK_M // 2
        e0 = tl.load(experts_ptr + 2 * pid_m)
        has1 = row0 + HM < npost
        e1 = tl.load(experts_ptr + 2 * pid_m + 1, mask=has1, other=-2)
        if e0 == e1:
            _down_tile(h_desc, w2_desc, sorted_ptr, wts_ptr, out_ptr, row0, e0, n0, num_valid, HIDDEN, N_HALF,
                       stride_om, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, WS)
        else:
            _down_tile(hh_desc, w2_desc, sorted_ptr, wts_ptr, out_ptr, row0, e0, n0, num_valid, HIDDEN, N_HALF,
                       stride_om, HM, BLOCK_N, BLOCK_K, STAGES, WS)
            if has1:
                _down_tile(hh_desc, w2_desc, sorted_ptr, wts_ptr, out_ptr, row0 + HM, e1, n0, num_valid, HIDDEN,
                           N_HALF, stride_om, HM, BLOCK_N, BLOCK_K, STAGES, WS)
    else:
        e = tl.load(experts_ptr + pid_m)
        div = _tail_rows(sorted_ptr, row0, num_valid, BLOCK_M, HALF_TAIL, QUARTER_TAIL)
        if QUARTER_TAIL and div == 4:  # constexpr first: a variant without it never compiles the branch
            _down_tile(hq_desc, w2_desc, sorted_ptr, wts_ptr, out_ptr, row0, e, n0, num_valid, HIDDEN, N_HALF,
                       stride_om, BLOCK_M // 4, BLOCK_N, BLOCK_K, STAGES, WS)
        elif HALF_TAIL and div == 2:
            _down_tile(hh_desc, w2_desc, sorted_ptr, wts_ptr, out_ptr, row0, e, n0, num_valid, HIDDEN, N_HALF,
                       stride_om, BLOCK_M // 2, BLOCK_N, BLOCK_K, STAGES, WS)
        else:
            _down_tile(h_desc, w2_desc, sorted_ptr, wts_ptr, out_ptr, row0, e, n0, num_valid, HIDDEN, N_HALF,
                       stride_om, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, WS)


@triton.jit
def grouped_down_persistent_kernel(
    h_desc, w2_desc, sorted_ptr, experts_ptr, npost_ptr, wts_ptr, out_ptr,
    num_valid, HIDDEN, N_HALF, stride_om, NUM_PROGS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr, WS: tl.constexpr,
):
    """grouped_down_kernel as NUM_PROGS programs striding over the tiles of the aligned rows (the same tile
    order, so the tiles in flight at once are the same), the tile loop and its K loop flattened into one
    pipelined loop. Expert -1 (EP-filtered) runs expert 0's weights and stores zeros; every tile at full
    height (rows past a half-tail tile's real rows are padding: their products are never stored)."""
    npost = tl.load(npost_ptr)
    num_pid_m = tl.cdiv(npost, BLOCK_M)
    num_pid_n = tl.cdiv(HIDDEN, BLOCK_N)
    k_tiles = tl.cdiv(N_HALF, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _tile(tile, num_pid_m, num_pid_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        e = tl.load(experts_ptr + pid_m)
        b_row = tl.maximum(e, 0) * HIDDEN + n0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = h_desc.load([row0, ki * BLOCK_K])
            b = w2_desc.load([b_row, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        rows = row0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tok = tl.load(sorted_ptr + rows)
        t_mask = tok < num_valid
        w = tl.load(wts_ptr + tok, mask=t_mask, other=0.0)
        acc = tl.where(e == -1, 0.0, acc * w[:, None])
        o_mask = t_mask[:, None] & (offs_n[None, :] < HIDDEN)
        tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(dt), mask=o_mask)


@triton.jit
def grouped_up_act_swap_kernel(
    x_ptr, w1_desc, sorted_ptr, experts_ptr, npost_ptr, out_ptr,
    num_valid, EM, K, N_HALF, stride_xm, stride_om,
    TOPK: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr,
):
    """As grouped_up_act_kernel with the operands swapped: acc[BLOCK_W weight rows, BLOCK_T tokens]."""
    pid = tl.program_id(0)
    num_pid_t = tl.cdiv(EM, BLOCK_T)
    num_pid_w = tl.cdiv(N_HALF, BLOCK_W)
    pid_t, pid_w = _tile(pid, num_pid_t, num_pid_w, GROUP_M)
    if pid_t * BLOCK_T >= tl.load(npost_ptr):
        return
    dt = out_ptr.dtype.element_ty
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    o_ptrs = out_ptr + rows.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    n_mask = offs_n[:, None] < N_HALF
    e = tl.load(experts_ptr + pid_t)
    if e == -1:
        tl.store(o_ptrs, tl.zeros((BLOCK_W, BLOCK_T), dtype=dt), mask=n_mask)
        return
    gate_row = e * 2 * N_HALF + pid_w * BLOCK_W
    up_row = gate_row + N_HALF
    acc_g = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    tok = tl.load(sorted_ptr + rows)
    t_mask = tok < num_valid
    a_ptrs = x_ptr + (tok // TOPK).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        a = tl.load(a_ptrs, mask=t_mask[:, None] & (k + offs_k[None, :] < K), other=0.0)
        a_ptrs += BLOCK_K
        bg = w1_desc.load([gate_row, k])
        bu = w1_desc.load([up_row, k])
        acc_g = tl.dot(bg, a.T, acc_g)
        acc_u = tl.dot(bu, a.T, acc_u)
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    h = _act(g, ACT) * u
    tl.store(o_ptrs, h.to(dt), mask=n_mask)


@triton.jit
def grouped_down_swap_kernel(
    h_desc, w2_desc, sorted_ptr, experts_ptr, npost_ptr, wts_ptr, out_ptr,
    num_valid, EM, HIDDEN, N_HALF, stride_om,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr, WS: tl.constexpr,
):
    """As grouped_down_kernel with the operands swapped: acc[BLOCK_H hidden rows, BLOCK_T tokens]."""
    pid = tl.program_id(0)
    num_pid_t = tl.cdiv(EM, BLOCK_T)
    num_pid_h = tl.cdiv(HIDDEN, BLOCK_H)
    pid_t, pid_h = _tile(pid, num_pid_t, num_pid_h, GROUP_M)
    if pid_t * BLOCK_T >= tl.load(npost_ptr):
        return
    dt = out_ptr.dtype.element_ty
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    tok = tl.load(sorted_ptr + rows)
    t_mask = tok < num_valid
    o_ptrs = out_ptr + tok.to(tl.int64)[None, :] * stride_om + offs_h[:, None]
    o_mask = t_mask[None, :] & (offs_h[:, None] < HIDDEN)
    e = tl.load(experts_ptr + pid_t)
    if e == -1:
        tl.store(o_ptrs, tl.zeros((BLOCK_H, BLOCK_T), dtype=dt), mask=o_mask)
        return
    b_row = e * HIDDEN + pid_h * BLOCK_H
    acc = tl.zeros((BLOCK_H, BLOCK_T), dtype=tl.float32)
    for k in tl.range(0, N_HALF, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        b = w2_desc.load([b_row, k])
        a = h_desc.load([pid_t * BLOCK_T, k])
        acc = tl.dot(b, a.T, acc)
    w = tl.load(wts_ptr + tok, mask=t_mask, other=0.0)
    acc = acc * w[None, :]
    tl.store(o_ptrs, acc.to(dt), mask=o_mask)


@triton.jit
def topk_sum_kernel(c3_ptr, out_ptr, M, HIDDEN, stride_c3, stride_om, scale,
                    TOPK: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, SCALE: tl.constexpr):
    """out[t] = sum_k cache3[t * TOPK + k] in fp32, rounded once to out's dtype (sglang's moe_sum), then
    optionally scaled in fp32 and rounded again (sglang applies routed_scaling_factor after the sum).
    torch's sum reads [M, TOPK, HIDDEN] at ~1.8 TB/s on an H200; this streams each row once."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    dt = out_ptr.dtype.element_ty
    for r in tl.static_range(ROWS):
        t = pid_t * ROWS + r
        if t < M:
            base = c3_ptr + t.to(tl.int64) * TOPK * stride_c3 + offs_h
            acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for k in tl.static_range(TOPK):
                acc += tl.load(base + k * stride_c3, mask=h_mask, other=0.0).to(tl.float32)
            y = acc.to(dt)
            if SCALE:
                y = (y.to(tl.float32) * scale).to(dt)
            tl.store(out_ptr + t.to(tl.int64) * stride_om + offs_h, y, mask=h_mask)


def topk_sum(cache3: torch.Tensor, M: int, topk: int, out: torch.Tensor, routed_scaling_factor=None,
             block_h: int = 1024, rows: int = 1):
    """cache3 [M * topk, H] -> out [M, H] (see topk_sum_kernel)."""
    H = cache3.shape[1]
    scale = routed_scaling_factor is not None and routed_scaling_factor != 1.0
    grid = (triton.cdiv(M, rows), triton.cdiv(H, block_h))
    topk_sum_kernel[grid](cache3, out, M, H, cache3.stride(0), out.stride(0),
                          float(routed_scaling_factor) if scale else 1.0,
                          TOPK=topk, BLOCK_H=block_h, ROWS=rows, SCALE=scale, num_warps=4)
    return out


def unsupported_reason(x, w1, w2, topk_weights, topk_ids, activation) -> str | None:
    """Why this path cannot take a call (None: it can)."""
    if activation not in ACTIVATIONS:
        return f"activation {activation}"
    if x.dtype not in (torch.bfloat16, torch.float16) or w1.dtype != x.dtype or w2.dtype != x.dtype:
        return f"dtypes {x.dtype}/{w1.dtype}/{w2.dtype}"
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3 or topk_ids.dim() != 2:
        return "shapes"
    E, two_n, K = w1.shape
    if two_n % 2 or x.shape[1] != K or w2.shape[0] != E or w2.shape[2] != two_n // 2:
        return f"shapes x {tuple(x.shape)} w1 {tuple(w1.shape)} w2 {tuple(w2.shape)}"
    if not (w1.is_contiguous() and w2.is_contiguous()):
        return "weights not contiguous"
    align = 16 // x.element_size()  # TMA: row strides in multiples of 16 bytes
    if K % align or (two_n // 2) % align:
        return f"K={K} or N={two_n // 2} not a multiple of {align}"
    if topk_weights.shape != topk_ids.shape:
        return "topk shapes"
    return None


def align_torch(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """sglang's moe_align_block_size in torch (same outputs and layout, for CPU tests): pair indices
    sorted by expert, each expert's run padded to block_m with the value topk_ids.numel(); experts
    filtered out (id -1) form a run whose block is labelled -1; blocks past the end are labelled -1."""
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    if numel < num_experts + 1:
        max_padded = numel * block_m
    else:
        max_padded = numel + (num_experts + 1) * (block_m - 1)
    runs, experts = [], []
    for e in list(range(num_experts)) + [-1]:
        idx = (flat == e).nonzero().flatten().to(torch.int32)
        if idx.numel() == 0:
            continue
        pad = (-idx.numel()) % block_m
        runs.append(torch.cat([idx, torch.full((pad,), numel, dtype=torch.int32)]))
        experts += [e] * ((idx.numel() + pad) // block_m)
    s = torch.cat(runs) if runs else torch.empty(0, dtype=torch.int32)
    npost = s.numel()
    s = torch.cat([s, torch.full((max_padded - npost,), numel, dtype=torch.int32)])
    blocks = triton.cdiv(max_padded, block_m)
    ex = torch.tensor(experts + [-1] * (blocks - len(experts)), dtype=torch.int32)
    dev = topk_ids.device
    return s.to(dev), ex.to(dev), torch.tensor([npost], dtype=torch.int32, device=dev)


def _sglang_align():
    from sglang.srt.layers.moe.moe_runner.triton_utils.moe_align_block_size import moe_align_block_size

    return moe_align_block_size


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter (CPU tests): a few programs, each looping over several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _desc(t: torch.Tensor, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, list(block))


def fused_moe_grouped(x, w1, w2, topk_weights, topk_ids, activation="gelu", params=GroupedParams(),
                      align=None, routed_scaling_factor=None, out=None):
    """x [M, K], w1 [E, 2N, K], w2 [E, K, N] (contiguous), topk [M, topk]. `align`: default sglang's
    moe_align_block_size on CUDA, `align_torch` elsewhere (CPU tests under the interpreter)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    E, two_n, _ = w1.shape
    n_half = two_n // 2
    hidden = w2.shape[1]
    topk = topk_ids.shape[1]
    p = params
    if align is None:
        align = _sglang_align() if x.is_cuda else align_torch
    if topk_ids.dtype != torch.int32:  # sglang's align kernel is written for its int32 ids
        topk_ids = topk_ids.to(torch.int32)
    split_m = p.split_m and not p.swap_ab
    half_tail = p.half_tail and not p.swap_ab
    quarter_tail = p.quarter_tail and half_tail
    # half-width last column tile only where it saves work: the remainder fits half a tile
    rem = n_half % p.up_block_n
    split_n = p.split_n and not p.swap_ab and 0 < rem <= p.up_block_n // 2
    sorted_ids, expert_ids, npost = align(topk_ids, p.block_m // 2 if split_m else p.block_m, E)
    EM = sorted_ids.numel()
    inter = torch.empty(EM, n_half, device=x.device, dtype=x.dtype)
    if p.one_dot:  # gate and up rows of a tile in one box of the [E, 2, N, K] view
        w4 = w1.view(E, 2, n_half, K)
        w1_desc = _desc(w4, (1, 2, p.up_block_n, p.up_block_k))
        w1h_desc = _desc(w4, (1, 2, p.up_block_n // 2, p.up_block_k)) if split_n else w1_desc
    else:
        w1_desc = _desc(w1.view(E * two_n, K), (p.up_block_n, p.up_block_k))
        w1h_desc = _desc(w1.view(E * two_n, K), (p.up_block_n // 2, p.up_block_k)) if split_n else w1_desc
    cache3 = torch.empty(M * topk, hidden, device=x.device, dtype=x.dtype)
    h_desc = _desc(inter, (p.block_m, p.down_block_k))
    w2_desc = _desc(w2.view(E * hidden, n_half), (p.down_block_n, p.down_block_k))
    up_grid = (triton.cdiv(EM, p.block_m) * triton.cdiv(n_half, p.up_block_n),)
    down_grid = (triton.cdiv(EM, p.block_m) * triton.cdiv(hidden, p.down_block_n),)
    wts = topk_weights.reshape(-1).contiguous()
    if p.swap_ab:
        grouped_up_act_swap_kernel[up_grid](
            x, w1_desc, sorted_ids, expert_ids, npost, inter,
            topk_ids.numel(), EM, K, n_half, x.stride(0), inter.stride(0),
            TOPK=topk, ACT=ACTIVATIONS[activation], BLOCK_T=p.block_m, BLOCK_W=p.up_block_n,
            BLOCK_K=p.up_block_k, GROUP_M=p.group_m, STAGES=p.up_stages, WS=p.warp_specialize,
            num_warps=p.up_warps,
        )
        grouped_down_swap_kernel[down_grid](
            h_desc, w2_desc, sorted_ids, expert_ids, npost, wts, cache3,
            topk_ids.numel(), EM, hidden, n_half, cache3.stride(0),
            BLOCK_T=p.block_m, BLOCK_H=p.down_block_n, BLOCK_K=p.down_block_k, GROUP_M=p.group_m,
            STAGES=p.down_stages, WS=p.warp_specialize, num_warps=p.down_warps,
        )
    else:
        if p.a_tma:
            a = x[(sorted_ids // topk).clamp_(max=M - 1).long()]
            a_desc = _desc(a, (p.block_m, p.up_block_k))
        else:
            a_desc = w1_desc  # unused
        hh_desc = _desc(inter, (p.block_m // 2, p.down_block_k)) if split_m or half_tail else h_desc
        hq_desc = _desc(inter, (p.block_m // 4, p.down_block_k)) if quarter_tail else h_desc
        grouped_up_act_kernel[up_grid](
            x, a_desc, w1_desc, w1h_desc, sorted_ids, expert_ids, npost, inter,
            topk_ids.numel(), EM, K, n_half, x.stride(0), inter.stride(0),
            TOPK=topk, ACT=ACTIVATIONS[activation], BLOCK_M=p.block_m, BLOCK_N=p.up_block_n,
            BLOCK_K=p.up_block_k, GROUP_M=p.group_m, STAGES=p.up_stages, A_TMA=p.a_tma,
            WS=p.warp_specialize, SPLIT_M=split_m, SPLIT_N=split_n, HALF_TAIL=half_tail, ONE_DOT=p.one_dot,
            QUARTER_TAIL=quarter_tail, num_warps=p.up_warps,
        )
        consts = dict(BLOCK_M=p.block_m, BLOCK_N=p.down_block_n, BLOCK_K=p.down_block_k, GROUP_M=p.group_m,
                      STAGES=p.down_stages, WS=p.warp_specialize, num_warps=p.down_warps)
        if p.persistent_down:
            progs = min(down_grid[0], _num_sms(x.device))
            grouped_down_persistent_kernel[(progs,)](
                h_desc, w2_desc, sorted_ids, expert_ids, npost, wts, cache3,
                topk_ids.numel(), hidden, n_half, cache3.stride(0), progs, **consts,
            )
        else:
            grouped_down_kernel[down_grid](
                h_desc, hh_desc, hq_desc, w2_desc, sorted_ids, expert_ids, npost, wts, cache3,
                topk_ids.numel(), EM, hidden, n_half, cache3.stride(0),
                SPLIT_M=split_m, HALF_TAIL=half_tail, QUARTER_TAIL=quarter_tail, **consts,
            )
    if out is None or out.stride(-1) != 1 or out.dtype != x.dtype:
        y = torch.empty(M, hidden, device=x.device, dtype=x.dtype)
    else:
        y = out
    if p.torch_sum:
        s = cache3.view(M, topk, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)  # one rounding
        if routed_scaling_factor is not None and routed_scaling_factor != 1.0:
            s = (s.float() * routed_scaling_factor).to(x.dtype)
        y.copy_(s)
    else:
        topk_sum(cache3, M, topk, y, routed_scaling_factor, block_h=p.sum_block_h)
    if out is not None and y is not out:
        out.copy_(y)
        return out
    return y


# ---------------------------------------------------------------------------------------------
# per-GPU table: {gpu name: {shape key (moe_small_batch.shape_key): {"min_m": m, "by_m": {M: GroupedParams
# fields}}}}, written by `python -m sglang_gemma4_opt.bench.tune_moe_grouped --write-table`; a GPU or shape
# not in it, or M below its min_m: sglang's path
TABLE_PATH = Path(__file__).resolve().parents[1] / "configs" / "moe_grouped.json"


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    """{gpu: {key: (min_m, {M: GroupedParams})}}; raises on a malformed entry."""
    p = Path(path)
    if not p.exists():
        return {}
    table = {}
    for gpu, shapes in json.loads(p.read_text()).items():
        table[gpu] = {}
        for key, entry in shapes.items():
            by_m = {int(m): GroupedParams(**v) for m, v in entry["by_m"].items()}
            min_m = int(entry["min_m"])
            if not by_m or min_m < 1 or min_m > max(by_m):
                raise ValueError(f"{gpu} {key}: bad entry (min_m {min_m}, tuned {sorted(by_m)})")
            table[gpu][key] = (min_m, by_m)
    return table


def params_for(table: dict, gpu: str, key: str, M: int) -> Optional[GroupedParams]:
    """The launch shape of the nearest tuned M at or above the entry's min_m; None below min_m or for a
    GPU/shape not in the table."""
    entry = table.get(gpu, {}).get(key)
    if entry is None or M < entry[0]:
        return None
    by_m = entry[1]
    return by_m[min(by_m, key=lambda m: (abs(m - M), m))]
