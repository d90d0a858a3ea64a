"""Suite fused_moe: sglang's Triton fused MoE stock vs with the plugin: the plugin serves config tables
through `get_moe_configs`, and at the batch sizes of its per-GPU tables runs its own kernels in place of
sglang's `fused_experts_impl` (`moe_small_batch`: two kernels at decode sizes, expert-grouped TMA GEMMs at
prefill sizes).

Gemma4 26B-A4B experts: E=128, intermediate N=704, hidden K=2816, top-8, bf16, gelu (as Gemma4MoE
builds FusedMoE), all experts local (TP=1, no EP: sglang then runs with filter_expert=False).
Routing is random top-8 over all 128 experts, fresh per captured call, so consecutive calls stream
different experts' weights (the touched weights of one call, ~95 MB at M=1, exceed the L2).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

from .common import record
from .flops import moe_flops, moe_weight_bytes

SUITE = "fused_moe"
E, N, K, TOPK = 128, 704, 2816, 8
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_SIZES = (1, 64, 1024, 4096)
COLUMNS = ["M", "stock cfg (M,N,K)", "plugin cfg (M,N,K)", "stock us", "plugin us", "speedup", "plugin TB/s",
           "plugin TFLOP/s", "max|d|"]

MODULE_CFG = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config"


def cases(sizes=None, quick=False):
    ms = sizes or (QUICK_SIZES if quick else SIZES)
    return [{"E": E, "N": N, "K": K, "topk": TOPK, "M": int(m), "dtype": "bfloat16"} for m in ms]


class Weights:
    """The experts' weights, made once per run (1.5 GB) and shared by all sizes.

    dtype "fp8_w8a8": float8_e4m3fn weights with one scale per expert and projection (sglang's per-tensor
    fp8_w8a8; its table files carry `dtype=fp8_w8a8`); `kw` holds what fused_experts then needs."""

    def __init__(self, E=E, N=N, K=K, device="cuda", dtype="bfloat16"):
        import torch

        # Scaled like trained weights (unit-variance outputs), so activations stay in bf16's range.
        self.w13 = (torch.randn(E, 2 * N, K, device=device) * K ** -0.5).to(torch.bfloat16)
        self.w2 = (torch.randn(E, K, N, device=device) * N ** -0.5).to(torch.bfloat16)
        self.dtype = dtype
        self.kw = {}
        if dtype == "fp8_w8a8":
            fp8 = torch.float8_e4m3fn
            s13 = self.w13.float().abs().amax(dim=(1, 2)) / torch.finfo(fp8).max
            s2 = self.w2.float().abs().amax(dim=(1, 2)) / torch.finfo(fp8).max
            self.w13 = (self.w13.float() / s13[:, None, None]).to(fp8)
            self.w2 = (self.w2.float() / s2[:, None, None]).to(fp8)
            self.kw = dict(use_fp8_w8a8=True, w1_scale=s13, w2_scale=s2)

    @property
    def config_dtype(self):
        """sglang's dtype selector for config lookup: None (bf16) or "fp8_w8a8"."""
        return "fp8_w8a8" if self.dtype == "fp8_w8a8" else None

    @property
    def elt(self) -> int:
        return 1 if self.dtype == "fp8_w8a8" else 2


def random_routing(M, E=E, topk=TOPK, device="cuda"):
    """Top-k distinct experts per token, uniformly at random over all E; softmax weights (fp32, int32
    ids, as Gemma4's routing function returns them)."""
    import torch

    ids = torch.rand(M, E, device=device).topk(topk, dim=-1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(M, topk, device=device), dim=-1).to(torch.float32)
    return w, ids


def runner_config(E=E, N=N, K=K, topk=TOPK):
    import torch
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    # As FusedMoE builds it for Gemma4 (activation gelu), out of place so replays leave inputs alone.
    return MoeRunnerConfig(num_experts=E, num_local_experts=E, hidden_size=K, intermediate_size_per_partition=N,
                           top_k=topk, params_dtype=torch.bfloat16, activation="gelu", inplace=False)


def topk_output(w, ids):
    try:
        from sglang.srt.layers.moe.topk import StandardTopKOutput

        return StandardTopKOutput(w, ids, None)
    except ImportError:
        return (w, ids, None)


def fused_experts_fn():
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_experts

    return fused_experts


@contextlib.contextmanager
def use_tables(sbs, folder):
    """sglang's lookup serves the tables in `folder` (a folder of sglang-named tables, or a configs root
    with triton_x_y_z/ folders); a shape with no file there gets None, as sglang's lookup would."""
    import triton

    from ..patches.moe_configs import load_table, version_dir

    t = sbs.targets["moe_configs"]
    mod = t.module
    dirs = [Path(folder) / version_dir(triton.__version__), Path(folder)]

    @lru_cache(maxsize=None)
    def lookup(E, N, dtype, block_n=0, block_k=0, per_channel_quant=False, down_moe=False):
        name = mod.get_config_file_name(E, N, dtype, [block_n, block_k], per_channel_quant, down_moe=down_moe)
        for d in dirs:
            if (d / name).exists():
                return load_table(d / name)
        return None

    old = mod.__dict__[t.attr]
    setattr(mod, t.attr, lookup)
    try:
        yield lookup
    finally:
        setattr(mod, t.attr, old)


@contextlib.contextmanager
def _both(sbs, tables_cm, which: str):
    """tables_cm plus sglang's or the plugin's fused_experts_impl (when this sglang has the target)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(tables_cm)
        if "moe_small_batch" in sbs.targets:
            stack.enter_context(sbs.use("moe_small_batch", which))
        yield


def baseline_use(ctx):
    """Context factory for the baseline side: sglang's stock lookup, or --moe-baseline's tables; sglang's
    own kernel sequence either way."""
    folder = getattr(ctx, "moe_baseline", None)
    if folder:
        return lambda: _both(ctx.sbs, use_tables(ctx.sbs, folder), "stock")
    return lambda: _both(ctx.sbs, ctx.sbs.use("moe_configs", "stock"), "stock")


def plugin_use(ctx):
    """Context factory for the plugin side: its tables and, at its batch sizes, its small-batch path."""
    return lambda: _both(ctx.sbs, ctx.sbs.use("moe_configs", "plugin"), "plugin")


def plugin_path(sbs, M, weights, topk=TOPK) -> str:
    """Which kernels the plugin side runs for a Gemma4 MoE call of M tokens on this GPU: "plugin small-batch
    kernels", "plugin grouped kernels" or "sglang's kernels" (as the moe_small_batch hook decides)."""
    import torch

    if "moe_small_batch" not in sbs.targets or not sbs.applied("moe_small_batch"):
        return "sglang's kernels"
    from ..kernels import moe_grouped as kg
    from ..kernels import moe_small_batch as km
    from ..patches import moe_small_batch as pms

    dev = weights.w13.device
    x = torch.empty(M, weights.w13.shape[2], device=dev, dtype=torch.bfloat16)
    ids = torch.zeros(M, topk, device=dev, dtype=torch.int32)
    sig, extra = pms.signature_info(pms.stock_impl())
    # as fused_experts calls it
    bound = sig.bind(x, weights.w13, weights.w2, ids.float(), ids, activation="gelu", **getattr(weights, "kw", {}))
    bound.apply_defaults()
    call = dict(bound.arguments)
    if pms.route(call, extra, km.load_table())[0] is not None:
        return "plugin small-batch kernels"
    if pms.grouped_enabled() and pms.route_grouped(call, extra, kg.load_table())[0] is not None:
        return "plugin grouped kernels"
    return "sglang's kernels"


def small_batch_path(sbs, M, weights, topk=TOPK) -> bool:
    """True when the plugin's small-batch kernels take a Gemma4 MoE call of M tokens on this GPU."""
    return plugin_path(sbs, M, weights, topk) == "plugin small-batch kernels"


def picked_config(sbs, which, M, weights, topk=TOPK):
    """(config, down_config) sglang's lookup returns for M with the stock or the plugin get_moe_configs
    (`which` may also be a context factory, e.g. `baseline_use(ctx)`)."""
    import importlib

    cfg_mod = importlib.import_module(MODULE_CFG)
    with (which() if callable(which) else sbs.use("moe_configs", which)):
        cfg, (down, _) = cfg_mod.try_get_optimal_moe_config(weights.w13.shape, weights.w2.shape, topk,
                                                            getattr(weights, "config_dtype", None), M,
                                                            return_down_config=True)
    return dict(cfg), (dict(down) if down else None)


def _cfg_short(cfg):
    return f"{cfg['BLOCK_SIZE_M']},{cfg['BLOCK_SIZE_N']},{cfg['BLOCK_SIZE_K']}"


def run_case(ctx, case):
    import torch

    sbs = ctx.sbs
    if "moe_configs" not in sbs.targets:
        raise RuntimeError("this sglang has no get_moe_configs")
    n = case.get("N", N)
    dtype = case.get("dtype", "bfloat16")
    if ctx.moe_weights is None or ctx.moe_weights.w2.shape[2] != n or ctx.moe_weights.dtype != dtype:
        ctx.moe_weights = None
        ctx.moe_weights = Weights(N=n, dtype=dtype)
    wts = ctx.moe_weights
    M = case["M"]
    fused_experts = fused_experts_fn()
    rcfg = runner_config(N=n)
    base_use = baseline_use(ctx)

    def run(x, w, ids):
        return fused_experts(x, wts.w13, wts.w2, topk_output(w, ids), rcfg, **wts.kw)

    # Same inputs through both configs: how far apart are they (tiles change the K-reduction order,
    # so not bit-exact; the GPU tests hold each against a float32 reference).
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w, ids = random_routing(M)
    with base_use():
        out_s = run(x, w, ids).clone()
    plug_use = plugin_use(ctx)
    with plug_use():
        out_p = run(x, w, ids).clone()
    torch.cuda.synchronize()
    max_abs_diff = float((out_s.float() - out_p.float()).abs().max())
    rel_diff = float((out_s.float() - out_p.float()).norm() / out_s.float().norm().clamp_min(1e-30))
    finite = bool(torch.isfinite(out_s).all() and torch.isfinite(out_p).all())

    with plug_use():
        est = ctx.estimate(lambda i: run(x, w, ids))
    calls = ctx.calls_for(est)
    # Fresh routing per captured call; hidden states rotate too where memory allows.
    routes = [random_routing(M) for _ in range(calls)]
    n_x = int(max(1, min(calls, (256 << 20) // (M * K * 2))))
    xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(n_x)]
    touched = sum(int(torch.unique(r[1]).numel()) for r in routes) / len(routes)

    def step(i):
        rw, rid = routes[i % len(routes)]
        run(xs[i % n_x], rw, rid)

    timings = ctx.time({
        "stock": (step, base_use),
        "plugin": (step, plug_use),
    }, calls=calls)
    cfg_s, down_s = picked_config(sbs, base_use, M, wts)
    cfg_p, down_p = picked_config(sbs, "plugin", M, wts)
    flops = moe_flops(M, n, K, TOPK)
    nbytes = moe_weight_bytes(touched, n, K, wts.elt)
    t_s, t_p = timings["stock"].median_us, timings["plugin"].median_us
    rec = record(
        SUITE, dict(case, N=n),
        (ctx.moe_baseline_label or f"tables in {ctx.moe_baseline}") if getattr(ctx, "moe_baseline", None)
        else "sglang stock config" + (" (default)" if _is_default(sbs, wts) else ""),
        "plugin config", timings["stock"], timings["plugin"],
        baseline_config=cfg_s, baseline_down_config=down_s, candidate_config=cfg_p, candidate_down_config=down_p,
        flops=flops, flop_count="2 * M * topk * (2N*K + N*K)",
        experts_touched=touched, weight_bytes=nbytes,
        byte_count="weights of the experts touched (mean over the captured calls), w13 2N*K + w2 K*N, "
                   + ("fp8" if wts.elt == 1 else "bf16"),
        candidate_tflops=flops / (t_p * 1e-6) / 1e12, baseline_tflops=flops / (t_s * 1e-6) / 1e12,
        candidate_tbps=nbytes / (t_p * 1e-6) / 1e12, baseline_tbps=nbytes / (t_s * 1e-6) / 1e12,
        max_abs_diff=max_abs_diff, rel_diff=rel_diff, outputs_finite=finite,
        plugin_status=sbs.status("moe_configs"),
        candidate_path=plugin_path(sbs, M, wts),
    )
    if ctx.hbm_tbps:
        rec["hbm_roof_tbps"] = ctx.hbm_tbps
        rec["candidate_roof_frac"] = rec["candidate_tbps"] / ctx.hbm_tbps
    if ctx.mm_tflops:
        rec["matmul_roof_tflops"] = ctx.mm_tflops
    return rec


def _is_default(sbs, wts):
    """True when sglang's own lookup finds no table for this shape (so it falls back to its default)."""
    with sbs.use("moe_configs", "stock"):
        fn = sbs.stock["moe_configs"]
        return fn(wts.w2.shape[0], wts.w2.shape[2], getattr(wts, "config_dtype", None), 0, 0, False, False) is None


def table_row(r):
    c = r["case"]
    cand = "small-batch" if r.get("candidate_path", "").startswith("plugin small") else _cfg_short(r["candidate_config"])
    return [str(c["M"]), _cfg_short(r["baseline_config"]), cand, r["baseline_us"],
            r["candidate_us"], f"{r['speedup']:.2f}x", r["candidate_tbps"], r["candidate_tflops"], r["max_abs_diff"]]


def size_label(c):
    return str(c["M"]), f"E{c['E']} N{c['N']} K{c['K']} top{c['topk']}"
