"""Expert-grouped fused MoE for prefill sizes (`kernels/moe_grouped.py`, the moe_small_batch patch's prefill
path) under TRITON_INTERPRET=1 on tiny shapes: against a float32 reference and against sglang's rounding
points written out in torch; the torch alignment against its contract; every argument check.

fp16 here (triton 3.6's interpreter mishandles bf16 in tl.dot); bf16 on the GPU
(tests/gpu/test_moe_grouped_gpu.py).
"""

import pytest
import torch

from _moe_torch import moe_inputs, moe_torch
from sglang_gemma4_opt.kernels import moe_grouped as mg


_moe = moe_inputs


def reference_fp32(x, w1, w2, w, ids, act):
    return moe_torch(x, w1, w2, w, ids, act, sglang_rounding=False)


def sglang_rounding(x, w1, w2, w, ids, act, scale=None):
    return moe_torch(x, w1, w2, w, ids, act, scale)


def test_align_torch_contract():
    """Every pair once, grouped by expert in runs padded to block_m, block labels match the run, -1 ids in
    a run of their own labelled -1, padding value numel, sizes as sglang allocates them."""
    g = torch.Generator().manual_seed(1)
    E, bm = 7, 4
    ids = torch.randint(0, E, (9, 3), generator=g).to(torch.int32)
    ids[2, 1] = -1
    s, ex, npost = mg.align_torch(ids, bm, E)
    numel = ids.numel()
    assert s.numel() == numel + (E + 1) * (bm - 1) and ex.numel() == -(-s.numel() // bm)
    n = int(npost)
    assert n % bm == 0
    body = s[:n]
    real = body[body < numel]
    assert sorted(real.tolist()) == list(range(numel))
    assert (s[n:] == numel).all()
    flat = ids.reshape(-1)
    for b in range(n // bm):
        blk = body[b * bm:(b + 1) * bm]
        blk = blk[blk < numel]
        assert len(blk) > 0 and (flat[blk.long()] == ex[b]).all()
    assert (ex[n // bm:] == -1).all()
    assert -1 in ex[: n // bm].tolist()


def _check_against_reference_and_sglang(x, w1, w2, w, ids, act, params):
    out = mg.fused_moe_grouped(x, w1, w2, w, ids, act, params=params)
    ref = reference_fp32(x, w1, w2, w, ids, act)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert (out.float() - ref).abs().max() <= 1e-2 * max(1.0, float(ref.abs().max()))
    mirror = sglang_rounding(x, w1, w2, w, ids, act)
    assert (out.float() - mirror.float()).abs().max() <= 2 * 2 ** -10 * max(1.0, float(mirror.abs().max()))


PARAMS = [
    mg.GroupedParams(block_m=16, up_block_n=16, up_block_k=16, down_block_n=16, down_block_k=16, group_m=2),
    mg.GroupedParams(block_m=16, up_block_n=32, up_block_k=32, down_block_n=32, down_block_k=16, group_m=1,
                     up_stages=2, down_stages=2, a_tma=True, warp_specialize=True),
    mg.GroupedParams(block_m=16, up_block_n=32, up_block_k=16, down_block_n=32, down_block_k=16, group_m=2,
                     swap_ab=True),
]


@pytest.mark.interpret
@pytest.mark.parametrize("M, E, N, K, topk, act, params", [
    (5, 6, 24, 64, 3, "gelu", PARAMS[0]),  # topk 3, N not a multiple of the up block
    (7, 4, 40, 48, 2, "silu", PARAMS[1]),  # K, N off the 32-blocks: TMA zero-fills
    (3, 9, 16, 32, 4, "gelu", PARAMS[1]),  # more experts than pairs: empty experts
    (6, 5, 40, 48, 3, "gelu", PARAMS[2]),  # swapped operands: weight rows as the MMA's M side
    (4, 9, 16, 32, 2, "silu", PARAMS[2]),
])
def test_kernels_match_reference_and_sglangs_rounding(M, E, N, K, topk, act, params):
    x, w1, w2, w, ids = _moe(M, E, N, K, topk, seed=M * 11 + N)
    ids[1, 0] = -1  # an expert filtered out (EP): contributes nothing
    _check_against_reference_and_sglang(x, w1, w2, w, ids, act, params)


SPLIT = [
    # half tiles of 16 rows / 16 columns: N=40 over 32-column tiles leaves 8 real columns in the last one
    mg.GroupedParams(block_m=32, up_block_n=32, up_block_k=16, down_block_n=32, down_block_k=16, group_m=2,
                     split_m=True, split_n=True),
    mg.GroupedParams(block_m=32, up_block_n=32, up_block_k=32, down_block_n=16, down_block_k=16, group_m=1,
                     up_stages=2, down_stages=2, split_m=True),
    mg.GroupedParams(block_m=16, up_block_n=32, up_block_k=16, down_block_n=16, down_block_k=16, split_n=True),
    # half-height tail tiles (16 of 32 rows), with and without the half-width column tile
    mg.GroupedParams(block_m=32, up_block_n=32, up_block_k=16, down_block_n=32, down_block_k=16, group_m=2,
                     half_tail=True, split_n=True),
    mg.GroupedParams(block_m=32, up_block_n=16, up_block_k=32, down_block_n=16, down_block_k=16, group_m=1,
                     up_stages=2, down_stages=2, half_tail=True),
    # gate and up through one dot (a [E, 2, N, K] box), with half-height tails and the half-width column tile
    mg.GroupedParams(block_m=32, up_block_n=32, up_block_k=16, down_block_n=32, down_block_k=16, group_m=2,
                     half_tail=True, split_n=True, one_dot=True),
    mg.GroupedParams(block_m=16, up_block_n=16, up_block_k=32, down_block_n=16, down_block_k=16, one_dot=True),
    # quarter-height tails (16 of 64 rows) next to the half-height ones, with one dot and the half-width column tile
    mg.GroupedParams(block_m=64, up_block_n=32, up_block_k=16, down_block_n=32, down_block_k=16, group_m=2,
                     half_tail=True, quarter_tail=True, split_n=True, one_dot=True),
]


def _program_kinds(ids, E, block_m):
    """(full tiles, half tiles) the split_m kernels run for this routing: pairs of half blocks of one
    expert, and half blocks whose partner is another expert's or past the end."""
    _, ex, npost = mg.align_torch(ids.to(torch.int32), block_m // 2, E)
    blocks = ex[: int(npost) // (block_m // 2)].tolist()
    full = half = 0
    for i in range(0, len(blocks), 2):
        pair = blocks[i:i + 2]
        if len(pair) == 2 and pair[0] == pair[1]:
            full += 1
        else:
            half += len(pair)
    return full, half


def _tail_kinds(ids, E, block_m, quarter=False):
    """(padded full tiles, half tiles, quarter tiles) the half_tail kernels run: a tile whose second half is all
    padding runs at half height (with quarter_tail: at a quarter when all but its first quarter is); one with
    padding that starts inside its second half runs whole."""
    s, _, npost = mg.align_torch(ids.to(torch.int32), block_m, E)
    numel = ids.numel()
    padded_full = half = quart = 0
    for r in range(0, int(npost), block_m):
        real = int((s[r:r + block_m] < numel).sum())
        q = quarter and real <= block_m // 4
        quart += q
        half += real <= block_m // 2 and not q
        padded_full += block_m // 2 < real < block_m
    return padded_full, half, quart


@pytest.mark.interpret
@pytest.mark.parametrize("M, E, N, K, topk, act, params", [
    (37, 5, 40, 48, 4, "gelu", SPLIT[0]),  # both splits; K off the 16-blocks
    (45, 3, 24, 32, 2, "silu", SPLIT[1]),  # split rows only, N off the tile (no half-width column tile)
    (9, 4, 40, 32, 3, "gelu", SPLIT[2]),  # split columns only
    # ~20 pairs per expert over 32-row tiles: tails of 14-16 rows (half height) and 17-22 (whole)
    (23, 5, 40, 48, 4, "gelu", SPLIT[3]),  # half-height tails and the half-width column tile
    (21, 4, 24, 32, 3, "silu", SPLIT[4]),  # half-height tails only
    (23, 5, 40, 48, 4, "gelu", SPLIT[5]),  # one dot for gate and up, tails and the half-width column tile
    (7, 6, 24, 48, 3, "silu", SPLIT[6]),  # one dot, N off the tile (TMA zero-fills the box past N)
    # ~34 pairs per expert over 64-row tiles: tails of every height (quarter, half, whole)
    (60, 7, 40, 48, 4, "gelu", SPLIT[7]),
])
def test_split_tiles_match_reference_and_sglangs_rounding(M, E, N, K, topk, act, params):
    x, w1, w2, w, ids = _moe(M, E, N, K, topk, seed=M * 3 + N)
    ids[2, 1] = -1
    if params.split_m:
        full, half = _program_kinds(ids, E, params.block_m)
        assert full > 0 and half > 0, (full, half)  # the routing reaches both kinds of program
    if params.half_tail:
        kinds = _tail_kinds(ids, E, params.block_m, params.quarter_tail)
        assert all(kinds[:2]) and (kinds[2] > 0) == params.quarter_tail, kinds  # the routing reaches each height
    if params.split_n:
        assert 0 < N % params.up_block_n <= params.up_block_n // 2
    _check_against_reference_and_sglang(x, w1, w2, w, ids, act, params)


@pytest.mark.parametrize("fields", [
    dict(split_m=True, swap_ab=True), dict(split_n=True, a_tma=True), dict(split_m=True, block_m=16),
    dict(split_n=True, up_block_n=16), dict(half_tail=True, swap_ab=True), dict(half_tail=True, a_tma=True),
    dict(half_tail=True, block_m=16), dict(half_tail=True, split_m=True), dict(one_dot=True, swap_ab=True),
    dict(one_dot=True, up_block_n=256), dict(persistent_down=True, swap_ab=True),
    dict(persistent_down=True, split_m=True), dict(quarter_tail=True),
    dict(quarter_tail=True, half_tail=True, block_m=32),
])
def test_split_params_refuse_what_the_kernels_cannot_do(fields):
    with pytest.raises(ValueError):
        mg.GroupedParams(**fields)


@pytest.mark.interpret
def test_strided_x_int64_ids_scale_and_out():
    M, E, N, K, topk = 4, 5, 24, 32, 2
    x, w1, w2, w, ids = _moe(M, E, N, K, topk, seed=4)
    big = torch.zeros(M, K + 8, dtype=torch.float16)
    big[:, :K] = x
    xv = big[:, :K]
    expect = sglang_rounding(x, w1, w2, w, ids, "gelu", 1.5)
    out = mg.fused_moe_grouped(xv, w1, w2, w, ids.long(), "gelu", params=PARAMS[0], routed_scaling_factor=1.5,
                               out=xv)
    assert out is xv
    assert (xv.float() - expect.float()).abs().max() <= 2 * 2 ** -10 * max(1.0, float(expect.abs().max()))
    assert torch.equal(big[:, K:], torch.zeros(M, 8, dtype=torch.float16))


@pytest.mark.interpret
@pytest.mark.parametrize("M, topk, H, block_h, rows, scale", [
    (5, 3, 40, 16, 2, None),  # H off the block, M off the rows per program
    (3, 8, 32, 32, 1, 2.5),  # routed scaling after the rounded sum
])
def test_topk_sum_is_one_fp32_sum_rounded_once(M, topk, H, block_h, rows, scale):
    g = torch.Generator().manual_seed(M * topk)
    c3 = (torch.randn(M * topk, H, generator=g) * 4).to(torch.float16)
    big = torch.full((M, H + 5), 7.0, dtype=torch.float16)
    out = big[:, 2:H + 2]  # strided rows
    mg.topk_sum(c3, M, topk, out, scale, block_h=block_h, rows=rows)
    expect = c3.view(M, topk, H).float().sum(1).to(torch.float16)
    if scale is not None:
        expect = (expect.float() * scale).to(torch.float16)
    assert torch.equal(out, expect)
    assert (big[:, :2] == 7).all() and (big[:, H + 2:] == 7).all()


@pytest.mark.interpret
def test_torch_sum_option_matches_kernel_sum():
    x, w1, w2, w, ids = _moe(6, 5, 24, 32, 3, seed=3)
    a = mg.fused_moe_grouped(x, w1, w2, w, ids, "gelu", params=PARAMS[0])
    b = mg.fused_moe_grouped(x, w1, w2, w, ids, "gelu", params=mg.GroupedParams(**dict(PARAMS[0].as_dict(),
                                                                                      torch_sum=True)))
    assert torch.equal(a, b)


@pytest.mark.interpret
def test_fresh_inputs_differ():
    x, w1, w2, w, ids = _moe(4, 6, 16, 32, 2, seed=9)
    a = mg.fused_moe_grouped(x, w1, w2, w, ids, "gelu", params=PARAMS[0])
    b = mg.fused_moe_grouped(x, w1, w2, w, ids.roll(1, dims=0).contiguous(), "gelu", params=PARAMS[0])
    assert not torch.equal(a, b)


@pytest.mark.parametrize("change, why", [
    (lambda a: a.update(activation="relu"), "activation"),
    (lambda a: a.update(x=a["x"].float()), "dtypes"),
    (lambda a: a.update(w1=a["w1"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
    (lambda a: a.update(w2=a["w2"][:, :, :20].contiguous()), "shapes"),
    (lambda a: a.update(x=a["x"][:, :36], w1=a["w1"][:, :, :36].contiguous(),
                        w2=a["w2"][:, :36].contiguous()), "multiple of 8"),
    (lambda a: a.update(topk_weights=a["topk_weights"][:, :1]), "topk"),
])
def test_unsupported_reasons(change, why):
    x, w1, w2, w, ids = _moe(3, 4, 24, 40, 2)
    args = dict(x=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids, activation="gelu")
    assert mg.unsupported_reason(**args) is None
    change(args)
    r = mg.unsupported_reason(**args)
    assert r is not None and why in r, r



# persistent_down (the down GEMM as a few programs looping over the tiles): the same bits as one program per tile
@pytest.mark.interpret
@pytest.mark.parametrize("M, E, N, K, topk, base", [
    (9, 5, 24, 32, 3, mg.GroupedParams(block_m=16, up_block_n=16, up_block_k=16, down_block_n=16, down_block_k=16,
                                       group_m=2)),
    # half tails (the persistent kernel runs them at full height); hidden 48 over 32-column tiles
    (23, 5, 40, 48, 4, mg.GroupedParams(block_m=32, up_block_n=32, up_block_k=16, down_block_n=32, down_block_k=16,
                                        group_m=2, half_tail=True, split_n=True, one_dot=True)),
])
def test_persistent_down_is_bit_identical(M, E, N, K, topk, base):
    x, w1, w2, w, ids = _moe(M, E, N, K, topk, seed=M * 5 + N)
    ids[1, 0] = -1  # an EP-filtered slot: zeros
    params = mg.GroupedParams(**dict(base.as_dict(), persistent_down=True))
    _, _, npost = mg.align_torch(ids.to(torch.int32), base.block_m, E)
    tiles = int(npost) // base.block_m * -(-K // base.down_block_n)
    assert tiles > 2 * mg._num_sms(x.device)  # programs loop over several tiles
    expect = mg.fused_moe_grouped(x, w1, w2, w, ids, "gelu", params=base, routed_scaling_factor=1.5)
    got = mg.fused_moe_grouped(x, w1, w2, w, ids, "gelu", params=params, routed_scaling_factor=1.5)
    assert torch.equal(got, expect)
