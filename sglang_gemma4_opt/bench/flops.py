"""Work counts the benchmarks divide by: FLOPs and the fewest bytes each kernel must move.

Pure integer arithmetic, so it is checked on the CPU (and against brute-force mask counts in the tests).
"""

from __future__ import annotations

BF16_BYTES = 2


def attention_pairs(seq_len: int, window: int | None = None) -> int:
    """(query, key) pairs one head of one causal sequence attends, prefill without prefix.

    `window` is the model's sliding window in keys per query, the query's own key included
    (Hugging Face / Gemma semantics: Gemma4 26B-A4B has 1024). sglang's extend kernel takes
    `sliding_window_size = window - 1` and masks keys with `q - k > sliding_window_size`, which
    leaves the same `window` keys. None or <= 0: full causal.
    """
    L = int(seq_len)
    if L <= 0:
        return 0
    if window is None or window <= 0 or window >= L:
        return L * (L + 1) // 2
    w = int(window)
    # queries 0..w-1 see i+1 keys; queries w..L-1 see w keys each
    return w * (w + 1) // 2 + (L - w) * w


def extend_attention_flops(batch: int, seq_len: int, q_heads: int, head_dim: int, window: int | None) -> int:
    """4 * heads * head_dim per attended pair: QK^T and PV, each 2 FLOPs per multiply-add."""
    return 4 * q_heads * head_dim * batch * attention_pairs(seq_len, window)


def moe_flops(M: int, N: int, K: int, topk: int) -> int:
    """Fused MoE (gate/up GEMM with 2N outputs, down GEMM with K outputs) for M tokens x topk experts."""
    return 2 * M * topk * (2 * N * K + N * K)


def moe_weight_bytes(experts_touched: int, N: int, K: int, elt: int = BF16_BYTES) -> int:
    """Weight bytes the experts actually routed to must stream once: w13 (2N x K) and w2 (K x N) each."""
    return experts_touched * (2 * N * K + K * N) * elt


def qkv_norm_bytes(M: int, q_heads: int, kv_heads: int, head_dim: int, elt: int = BF16_BYTES) -> int:
    """In-place Q/K/V RMSNorm: every element read once and written once (the weights are negligible)."""
    return 2 * M * (q_heads + 2 * kv_heads) * head_dim * elt
