"""Start-up compilation of the kernels a server's prefills meet, so that no Triton compile runs while
requests wait (the `prefill_warmup` patch calls `warm_up(model_runner)` once the decode CUDA graphs exist).

Decode kernels compile when sglang captures its CUDA graphs at start-up. Prefill kernels do not: every
launch shape a table gives a token count, and every Triton specialisation of its integer arguments (even
and odd token counts differ in `num_valid_tokens = M * top_k`), compiles on the first request that meets it.
With the plugin's tables that is about twenty MoE launch shapes for sglang's fused-MoE kernel and the
grouped kernels, and the attention kernels with and without prefix keys; measured on an H200 (sglang
0.5.12), the first pass after start ran at 0.37x the warm pass's throughput. This module runs, on random
data:

* MoE: sglang's own `fused_experts` (the path the server takes, with the plugin's hooks and tables) on the
  first MoE layer's weights, at each token count of sglang's tuning grid (the keys of every sglang-format
  MoE table) and of the plugin's grouped table, odd and even, up to the largest prefill batch the server
  forms (chunked-prefill size);
* attention: the (hooked) extend-attention function for each distinct attention shape of the model, with
  and without prefix keys.

Nothing here changes a result: the outputs are thrown away. It runs on the model runner's stream before the
server takes requests, never inside a CUDA graph capture, and any error ends the warm-up with one log line
(the server then compiles on first use, as stock sglang does).
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("sglang_gemma4_opt")

# sglang's fused-MoE tuning grid: the keys of its (and the plugin's) sglang-format MoE tables
TUNING_MS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
DEFAULT_MAX_TOKENS = 8192  # when the server has no chunked-prefill size


def moe_token_counts(max_tokens: int, grouped_ms=(), min_m: int = 3) -> list[int]:
    """Token counts to run the MoE at: each tuning-grid and grouped-table size from `min_m` up to
    `max_tokens`, and the next odd count beside each, and `max_tokens` itself."""
    out = set()
    for m in list(TUNING_MS) + [int(x) for x in grouped_ms] + [max_tokens]:
        for x in (m, m + 1):
            if min_m <= x <= max_tokens:
                out.add(x)
    return sorted(out)


def max_prefill_tokens(server_args) -> int:
    n = getattr(server_args, "chunked_prefill_size", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(server_args, "max_prefill_tokens", None)
    return min(n, 16384) if isinstance(n, int) and n > 0 else DEFAULT_MAX_TOKENS


def find_moe_layer(model):
    """The first module holding fused-MoE weights and a runner config (sglang's FusedMoE), or None."""
    for m in model.modules():
        if all(hasattr(m, a) for a in ("w13_weight", "w2_weight", "moe_runner_config")):
            return m
    return None


def attention_shapes(model) -> list[dict]:
    """Distinct shapes of the model's attention layers (sglang's RadixAttention attributes)."""
    seen, out = set(), []
    for m in model.modules():
        if not all(hasattr(m, a) for a in ("tp_q_head_num", "tp_k_head_num", "qk_head_dim", "v_head_dim")):
            continue
        s = dict(hq=int(m.tp_q_head_num), hkv=int(m.tp_k_head_num), d=int(m.qk_head_dim), dv=int(m.v_head_dim),
                 window=int(getattr(m, "sliding_window_size", -1) or -1), scaling=float(getattr(m, "scaling", 0) or 0),
                 logit_cap=float(getattr(m, "logit_cap", 0.0) or 0.0))
        key = tuple(sorted(s.items()))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def grouped_sizes(layer, device) -> list[int]:
    """The token counts the plugin's grouped-MoE table lists for this layer's shape on this GPU."""
    try:
        from .kernels import moe_grouped as kg
        from .kernels import moe_small_batch as km
        from .patches.moe_small_batch import gpu_of

        w1 = layer.w13_weight
        top_k = int(getattr(layer, "top_k", 0) or getattr(layer.moe_runner_config, "top_k", 0) or 8)
        key = km.shape_key(w1.shape[0], w1.shape[1] // 2, w1.shape[2], top_k, w1.dtype)
        entry = kg.load_table().get(gpu_of(w1), {}).get(key)
        return [m for m in entry[1] if m >= entry[0]] if entry else []
    except Exception:
        return []


def warm_moe(layer, counts: list[int], top_k: int) -> int:
    import torch

    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    w1, w2 = layer.w13_weight, layer.w2_weight
    E, K = w1.shape[0], w2.shape[1]
    g = torch.Generator(device=w1.device).manual_seed(0)
    for m in counts:
        x = torch.randn(m, K, device=w1.device, dtype=w1.dtype, generator=g)
        ids = torch.rand(m, E, device=w1.device, generator=g).topk(top_k, dim=-1).indices.to(torch.int32)
        weights = torch.rand(m, top_k, device=w1.device, dtype=torch.float32, generator=g)
        fused_experts(x, w1, w2, StandardTopKOutput(weights, ids, None), layer.moe_runner_config)
    return len(counts)


def warm_attention(shapes: list[dict], device, dtype) -> int:
    import torch

    from .core import import_first
    from .patches import extend_attention_kernel as pk

    fn = getattr(import_first(*pk.MODULES), pk.FUNC)
    n = 0
    for s in shapes:
        for prefix in (0, 48):
            ext = [96, 37]  # two requests, one of odd length
            tot = sum(ext)
            q = torch.randn(tot, s["hq"], s["d"], device=device, dtype=dtype)
            k = torch.randn(tot, s["hkv"], s["d"], device=device, dtype=dtype)
            v = torch.randn(tot, s["hkv"], s["dv"], device=device, dtype=dtype)
            o = torch.empty(tot, s["hq"], s["dv"], device=device, dtype=dtype)
            pool = 2 * prefix + tot + 8
            kb = torch.randn(pool, s["hkv"], s["d"], device=device, dtype=dtype)
            vb = torch.randn(pool, s["hkv"], s["dv"], device=device, dtype=dtype)
            qo = torch.tensor([0, ext[0], tot], dtype=torch.int32, device=device)
            kv = torch.tensor([0, prefix, 2 * prefix], dtype=torch.int32, device=device)
            idx = torch.randperm(pool, device=device)[:2 * prefix].to(torch.int64)
            fn(q, k, v, o, kb, vb, qo, kv, idx, None, True, None, max(ext), None, None, s["scaling"] or None,
               logit_cap=s["logit_cap"], sliding_window_size=s["window"], sinks=None, window_kv_offsets=None)
            n += 1
    return n


def warm_up(model_runner) -> str:
    """Compile what the server's prefills would; returns the one line it logs."""
    import torch

    t0 = time.monotonic()
    model = model_runner.model
    done = []
    with torch.inference_mode():
        layer = find_moe_layer(model)
        if layer is not None:
            top_k = int(getattr(layer, "top_k", 0) or getattr(layer.moe_runner_config, "top_k", 0) or 0)
            if top_k > 0:
                counts = moe_token_counts(max_prefill_tokens(model_runner.server_args),
                                          grouped_sizes(layer, layer.w13_weight.device))
                done.append(f"MoE at {warm_moe(layer, counts, top_k)} token counts ({counts[0]}-{counts[-1]})")
        shapes = attention_shapes(model)
        if shapes:
            dtype = getattr(model_runner, "dtype", torch.bfloat16)
            done.append(f"extend attention in {warm_attention(shapes, model_runner.device, dtype)} shapes")
        torch.cuda.synchronize()
    return f"prefill warm-up: {', '.join(done) or 'nothing to compile'} in {time.monotonic() - t0:.1f} s"
