"""`sglang-gemma4-opt bench`: kernel suites, sglang's stock path vs the plugin's, side by side in one
process on this GPU.

    sglang-gemma4-opt bench                          # every suite, every size
    sglang-gemma4-opt bench --suite qkv_norm --sizes 1 16 256
    sglang-gemma4-opt bench --suite extend_attention --sizes 8x1024
    sglang-gemma4-opt bench --quick --out /tmp/res   # a few sizes of each suite

Writes <out>/<suite>-<GPU>.json (header + one record per case), prints a table per suite and saves
<out>/speedup-<GPU>.png when matplotlib is installed. fused_moe runs of another shape or baseline get
their own file, so they never replace the default rows: `fused_moe-N352-<GPU>.json` (--moe-n 352),
`fused_moe-N704-vs-<label>-<GPU>.json` (--moe-baseline, --moe-results-tag names the label part).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from . import common

DEFAULT_MOE_N = 704  # fused_moe.N: Gemma4 26B-A4B's expert width at TP=1 (not imported: that module needs torch)
SUITE_MODULES = {
    "qkv_norm": "sglang_gemma4_opt.bench.qkv_norm",
    "extend_attention": "sglang_gemma4_opt.bench.extend_attention",
    "fused_moe": "sglang_gemma4_opt.bench.fused_moe",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", nargs="+", default=["all"], choices=["all", *common.SUITES],
                   help="suites to run (default: all)")
    p.add_argument("--sizes", nargs="+", default=None, metavar="SIZE",
                   help="token counts M for qkv_norm/fused_moe (e.g. 1 16 256) and/or BATCHxLEN shapes for "
                        "extend_attention (e.g. 8x1024); a suite given none of its kind runs its defaults")
    p.add_argument("--quick", action="store_true", help="a few sizes per suite, shorter timing")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per case, stock/plugin order reversed every other round (default 4; 1 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of replays per variant per case (default 0.3; 0.1 with --quick)")
    p.add_argument("--preheat", type=float, default=None, metavar="S",
                   help="seconds of untimed replays before each timed block of a case whose call takes >= "
                        f"{common.PREHEAT_MIN_US:g} us, so long kernels are timed at the clock a sustained load "
                        "holds (default 1.0; 0 with --quick; 0 turns it off)")
    p.add_argument("--max-calls", type=int, default=20, help="calls captured per CUDA graph (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-roofs", action="store_true", help="skip measuring copy bandwidth and matmul rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moe-n", type=int, default=None, metavar="N",
                   help="fused_moe: intermediate size per TP rank (default 704, TP=1; 352 is TP=2)")
    p.add_argument("--moe-dtype", default="bf16", choices=["bf16", "fp8_w8a8"],
                   help="fused_moe: expert weights in bf16 (default) or fp8_w8a8 (per-expert scales, activations "
                        "quantised by sglang per call); fp8 runs write fused_moe-N<N>-fp8-<GPU>.json")
    p.add_argument("--moe-baseline", default=None, metavar="DIR",
                   help="fused_moe: baseline = the tables in DIR (a folder of sglang-named tables or a configs "
                        "root with triton_x_y_z/) instead of sglang's stock lookup")
    p.add_argument("--moe-baseline-label", default=None, help="fused_moe: name of that baseline in the records")
    p.add_argument("--moe-results-tag", default=None, metavar="TAG",
                   help="fused_moe with --moe-baseline: the results file is fused_moe-N<N>-vs-TAG-<GPU>.json "
                        "(default: the baseline label, or the folder's name)")


@dataclasses.dataclass
class Ctx:
    """What a suite's run_case gets: the stock/plugin functions and the timing settings."""

    sbs: Any
    rounds: int
    budget_s: float
    max_calls: int
    l2_bytes: int
    preheat_s: float = 0.0
    hbm_tbps: float | None = None
    mm_tflops: float | None = None
    moe_weights: Any = None
    moe_baseline: str | None = None
    moe_baseline_label: str | None = None

    def time(self, variants, calls):
        return common.time_variants(variants, calls=calls, rounds=self.rounds, budget_s=self.budget_s,
                                    preheat_s=self.preheat_s)

    def estimate(self, step):
        return common.estimate_us(step)

    def calls_for(self, est_us):
        return common.calls_for(est_us, self.max_calls)


def split_sizes(tokens):
    """--sizes tokens -> (M values, extend shapes)."""
    from .extend_attention import parse_shape

    ms, shapes = [], []
    for tok in tokens or []:
        shape = parse_shape(tok)
        if shape:
            shapes.append(shape)
        elif tok.strip().isdigit() and int(tok) > 0:
            ms.append(int(tok))
        else:
            raise ValueError(f"--sizes: {tok!r} is neither a token count (64) nor BATCHxLEN (8x1024)")
    return ms, shapes


def selected_suites(names):
    if "all" in names:
        return list(common.SUITES)
    return [s for s in common.SUITES if s in names]


def results_tag(suite: str, args) -> str:
    """The part of the results file name between the suite and the GPU: '' for the default runs; for fused_moe
    'N352' at another N and 'N704-vs-pr' against another baseline, so such runs never overwrite the default rows."""
    if suite != "fused_moe":
        return ""
    n = getattr(args, "moe_n", None) or DEFAULT_MOE_N
    fp8 = "-fp8" if getattr(args, "moe_dtype", "bf16") == "fp8_w8a8" else ""
    base = getattr(args, "moe_baseline", None)
    if base:
        label = getattr(args, "moe_results_tag", None) or getattr(args, "moe_baseline_label", None) or Path(base).name
        return f"N{n}{fp8}-vs-{common.slug(label).replace('_', '-')}"
    return "" if n == DEFAULT_MOE_N and not fp8 else f"N{n}{fp8}"


def plan(args):
    """[(suite, module, [case, ...]), ...] for the arguments, without touching the GPU."""
    import importlib

    ms, shapes = split_sizes(args.sizes)
    out = []
    for suite in selected_suites(args.suite):
        mod = importlib.import_module(SUITE_MODULES[suite])
        if suite == "extend_attention":
            cs = mod.cases(shapes or None, args.quick)
        else:
            cs = mod.cases(ms or None, args.quick)
            if suite == "fused_moe" and getattr(args, "moe_n", None):
                cs = [dict(c, N=args.moe_n) for c in cs]
            if suite == "fused_moe" and getattr(args, "moe_dtype", "bf16") == "fp8_w8a8":
                cs = [dict(c, dtype="fp8_w8a8") for c in cs]
        out.append((suite, mod, cs))
    return out


def run(args) -> int:
    try:
        suites = plan(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: `bench` needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    from .. import settings

    if not settings.plugin_enabled():
        print(f"warning: {settings.ENV_ENABLE}=0: the plugin column will equal stock", file=sys.stderr)
    logging.getLogger("sglang_gemma4_opt").setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    rounds = args.rounds or (1 if args.quick else 4)
    budget = args.budget or (0.1 if args.quick else 0.3)
    preheat = args.preheat if args.preheat is not None else (0.0 if args.quick else 1.0)
    props = torch.cuda.get_device_properties(0)
    sbs = common.side_by_side()
    ctx = Ctx(sbs, rounds, budget, args.max_calls, int(getattr(props, "L2_cache_size", 50 << 20)),
              moe_baseline=getattr(args, "moe_baseline", None), moe_baseline_label=getattr(args, "moe_baseline_label", None),
              preheat_s=preheat)
    gpu = common.gpu_name()
    print(f"{gpu}: " + ", ".join(f"{k} {v}" for k, v in common.versions().items()))
    for key in sbs.targets:
        print(f"  patch for {key}: {sbs.status(key)}")
    if not args.no_roofs and any(s in ("fused_moe", "extend_attention") for s, _, _ in suites):
        ctx.hbm_tbps = common.measure_copy_tbps()
        ctx.mm_tflops = common.measure_matmul_tflops()
        print(f"  roofs measured here: copy {ctx.hbm_tbps:.2f} TB/s (read+write), bf16 matmul {ctx.mm_tflops:.0f} TFLOP/s")
    header = common.env_header()
    header.update(rounds=rounds, budget_s=budget, preheat_s=preheat, preheat_min_us=common.PREHEAT_MIN_US,
                  max_calls=args.max_calls, seed=args.seed,
                  hbm_roof_tbps=ctx.hbm_tbps, matmul_roof_tflops=ctx.mm_tflops,
                  patches={k: sbs.status(k) for k in sbs.targets})
    if ctx.moe_baseline:
        header.update(moe_baseline=ctx.moe_baseline, moe_baseline_label=ctx.moe_baseline_label)
    all_records: dict[str, list[dict]] = {}
    failures = 0
    paths = []
    for suite, mod, cs in suites:
        recs = []
        for case in common.progress(cs, total=len(cs), desc=suite):
            try:
                recs.append(mod.run_case(ctx, case))
            except Exception as e:  # one broken case must not cost the rest of the run
                failures += 1
                print(f"\n{suite} {case}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc()
            finally:
                torch.cuda.empty_cache()
        all_records[suite] = recs
        if recs:
            paths.append(common.write_results(args.out, suite, gpu, recs, header, results_tag(suite, args)))
            common.print_table(f"{suite} on {gpu} (median us per call, CUDA-graph replay)", mod.COLUMNS,
                               [mod.table_row(r) for r in recs])
    ctx.moe_weights = None
    if not args.no_plot and any(all_records.values()):
        png = plot(all_records, Path(args.out) / f"speedup-{common.slug(gpu)}.png", gpu)
        if png:
            paths.append(png)
    for p in paths:
        print(f"wrote {p}")
    bad = [r for rs in all_records.values() for r in rs if r.get("bit_exact") is False and r["suite"] == "qkv_norm"]
    if bad:
        print(f"error: {len(bad)} qkv_norm rows are not bit-exact", file=sys.stderr)
    return 1 if failures or bad else 0


def plot(all_records: dict[str, list[dict]], path: Path, gpu: str):
    """Speedup (stock time / plugin time) by size, one panel per suite; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    import importlib

    suites = [s for s in common.SUITES if all_records.get(s)]
    fig, axes = plt.subplots(1, len(suites), figsize=(5.5 * len(suites), 4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        mod = importlib.import_module(SUITE_MODULES[suite])
        series: dict[str, list[tuple[str, float]]] = {}
        for r in all_records[suite]:
            x, group = mod.size_label(r["case"])
            series.setdefault(group, []).append((x, r["speedup"]))
        xs = list(dict.fromkeys(x for pts in series.values() for x, _ in pts))
        for group, pts in series.items():
            d = dict(pts)
            idx = [i for i, x in enumerate(xs) if x in d]
            ax.plot(idx, [d[xs[i]] for i in idx], marker="o", label=group)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=45, ha="right", fontsize=8)
        ax.set_title(suite)
        ax.set_ylabel("speedup (stock / plugin)")
        ax.set_xlabel("M" if suite != "extend_attention" else "batch x length")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sglang-gemma4-opt vs stock sglang, {gpu}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
