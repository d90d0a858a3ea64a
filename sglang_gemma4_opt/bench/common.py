"""What the kernel suites, the e2e runner and the GPU tests share: versions, the stock and plugin
functions side by side in one process, CUDA-graph timing, and JSON records.

Stock functions are captured *before* `apply()` and kept in a dict, never in a module global:
HookRegistry (and core._rebind) rebind every module attribute that still points at the original,
so a module-level `STOCK = f` would silently become the hooked function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

SUITES = ("qkv_norm", "extend_attention", "fused_moe")
PREHEAT_MIN_US = 200.0  # time_variants' preheat applies to variants whose one call takes at least this long
DEFAULT_OUT = Path("benchmarks") / "results"


# ---------------------------------------------------------------------------------------------
# environment


def versions() -> dict[str, str]:
    from ..cli import versions as _versions

    return _versions()


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def slug(text: str) -> str:
    """File-name-safe form of a device name ('NVIDIA H200' -> 'NVIDIA_H200')."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "unknown"


def env_header(argv: Iterable[str] | None = None) -> dict[str, Any]:
    """Header of every results file: what ran, where and when."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "command": " ".join(shlex.quote(a) for a in argv),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "python": sys.version.split()[0],
    }


class _ServerArgsDefaults:
    """Stands in for sglang's global ServerArgs outside a server: every field reads as its default.

    sglang 0.5.12's fused-MoE path reads `get_global_server_args()` (deterministic inference,
    fused sum all-reduce); a bare kernel benchmark has no server, so the defaults are what a
    server started with no flags would see. Building a real ServerArgs needs a model path and
    runs the whole argument post-processing, which a kernel benchmark has no business doing.
    """

    def __init__(self, cls):
        self._fields = {f.name: f for f in dataclasses.fields(cls)}

    def __getattr__(self, name):
        f = self.__dict__.get("_fields", {}).get(name)
        if f is None:
            raise AttributeError(name)
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            return f.default_factory()  # type: ignore[misc]
        raise AttributeError(name)


def ensure_server_args() -> None:
    """Make `get_global_server_args()` answer (with defaults) when no server set it."""
    try:
        sa = importlib.import_module("sglang.srt.server_args")
    except ImportError:
        return
    if getattr(sa, "_global_server_args", "absent") is None and hasattr(sa, "set_global_server_args_for_scheduler"):
        sa.set_global_server_args_for_scheduler(_ServerArgsDefaults(sa.ServerArgs))


# ---------------------------------------------------------------------------------------------
# stock vs plugin in one process


@dataclasses.dataclass
class Target:
    key: str  # our name for it
    patch: str  # the patch's NAME
    module: Any  # the module whose global sglang looks up
    attr: str


@dataclasses.dataclass
class SideBySide:
    """Stock and plugin versions of each patched function, and what apply() reported."""

    targets: dict[str, Target]
    stock: dict[str, Callable]
    plugin: dict[str, Callable]
    results: dict[str, Any]

    def applied(self, key: str) -> bool:
        t = self.targets[key]
        r = self.results.get(t.patch)
        return r is not None and r.status == "applied" and self.plugin[key] is not self.stock[key]

    def status(self, key: str) -> str:
        r = self.results.get(self.targets[key].patch)
        if r is None:
            return "unknown"
        return r.status + (f" ({r.reason})" if r.reason else "")

    @contextlib.contextmanager
    def use(self, key: str, which: str):
        """Make sglang's module global `key` the stock or the plugin function for the block's duration.

        sglang calls these helpers through module globals (`extend_attention_fwd` looks up
        `_get_block_sizes_for_extend_attention`, `try_get_optimal_moe_config` looks up
        `get_moe_configs`), so swapping the global selects the path without touching sglang.
        """
        t = self.targets[key]
        fn = self.stock[key] if which == "stock" else self.plugin[key]
        old = t.module.__dict__[t.attr]
        setattr(t.module, t.attr, fn)
        try:
            yield fn
        finally:
            setattr(t.module, t.attr, old)


_SIDE_BY_SIDE: dict[str, SideBySide] = {}


def _first_module_with(names: Iterable[str], attr: str):
    errors = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if hasattr(mod, attr):
            return mod
        errors.append(f"{name}: no {attr}")
    raise ImportError("; ".join(errors))


def side_by_side() -> SideBySide:
    """Capture sglang's stock functions, then apply the plugin; once per process."""
    if "x" in _SIDE_BY_SIDE:
        return _SIDE_BY_SIDE["x"]
    from .. import core
    from ..patches import extend_attention_blocks as pe
    from ..patches import moe_configs as pm
    from ..patches import moe_small_batch as pms
    from ..patches import qkv_rmsnorm as pq

    ensure_server_args()
    targets: dict[str, Target] = {}
    for key, patch, modules, attr in (
        ("qkv_norm", pq.NAME, pq.MODULES, pq.FUNC),
        ("extend_blocks", pe.NAME, pe.MODULES, pe.FUNC),
        ("moe_configs", pm.NAME, (pm.MODULE,), pm.FUNC),
        ("moe_small_batch", pms.NAME, (pms.MODULE,), pms.FUNC),
    ):
        try:
            targets[key] = Target(key, patch, _first_module_with(modules, attr), attr)
        except ImportError:
            continue  # this sglang has no such target; the suite that needs it says so

    before = core.results()
    stock = {}
    for key, t in targets.items():
        fn = getattr(t.module, t.attr)
        r = before.get(t.patch) if before else None
        if r is not None and r.status == "applied":
            fn = fn.__wrapped__  # HookRegistry's AROUND wrapper keeps sglang's original here
        stock[key] = fn
    results = core.apply()
    plugin = {key: getattr(t.module, t.attr) for key, t in targets.items()}
    sbs = SideBySide(targets, stock, plugin, results)
    _SIDE_BY_SIDE["x"] = sbs
    return sbs


# ---------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    calls_per_graph: int
    replays: int
    round_medians_us: list[float]
    method: str = "cuda-graph replay"
    preheat_s: float = 0.0  # untimed replays before each timed block (0: none)

    def as_dict(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_us": self.median_us,
            f"{prefix}_p10_us": self.p10_us,
            f"{prefix}_p90_us": self.p90_us,
            f"{prefix}_round_medians_us": self.round_medians_us,
        }


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def estimate_us(step: Callable[[int], Any], reps: int = 3) -> float:
    """Rough eager time of one step (after a warm-up call), only to size graphs and replay counts."""
    import torch

    step(0)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(reps):
        step(i)
    e.record()
    e.synchronize()
    return s.elapsed_time(e) * 1e3 / reps


def calls_for(est_us: float, max_calls: int = 20, target_graph_us: float = 2000.0) -> int:
    """Calls per captured graph: up to `max_calls`, fewer for long kernels so a replay stays ~2 ms."""
    return int(max(1, min(max_calls, round(target_graph_us / max(est_us, 1e-3)))))


def _capture(step: Callable[[int], Any], calls: int, warmup: int):
    import torch

    # Warm up on a side stream (as torch's graph docs ask): Triton compiles, torch.compile traces,
    # allocator pools fill, so none of that is captured or timed.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            step(i)
    g.replay()
    torch.cuda.synchronize()
    return g


def _replay_block(g, calls: int, replays: int) -> list[float]:
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    torch.cuda.synchronize()
    # Keep the GPU busy while the CPU queues the replays: otherwise a start event can fire on an
    # idle GPU before the graph launch arrives, and the launch gap lands inside the measurement.
    # ~30 us of CPU per replay is generous; at ~2 GHz that is 6e4 cycles per replay, capped at 50 ms.
    torch.cuda._sleep(int(min(1e8, 6e4 * replays)))
    for r in range(replays):
        starts[r].record()
        g.replay()
        ends[r].record()
    torch.cuda.synchronize()
    return [starts[r].elapsed_time(ends[r]) * 1e3 / calls for r in range(replays)]


def _preheat(g, seconds: float, per_graph_us: float) -> None:
    """Untimed replays for about `seconds`, so the timed block that follows starts in the clock and power state
    this variant's load holds the GPU in."""
    import torch

    for _ in range(int(max(1, min(100_000, seconds * 1e6 / max(per_graph_us, 1.0))))):
        g.replay()
    torch.cuda.synchronize()


def time_variants(
    variants: dict[str, tuple[Callable[[int], Any], Callable[[], Any] | None]],
    *,
    calls: int,
    rounds: int = 2,
    budget_s: float = 0.3,
    min_replays: int = 10,
    max_replays: int = 400,
    warmup: int = 3,
    preheat_s: float = 0.0,
    preheat_min_us: float = PREHEAT_MIN_US,
) -> dict[str, Timing]:
    """Median per-call time of each variant from CUDA-graph replays, variants interleaved by round.

    variants: label -> (step(i), context factory or None). step(i) enqueues call i (rotating its
    inputs by i); the context (e.g. `SideBySide.use`) is entered for warm-up and capture, which is
    when sglang picks block sizes and configs; replays need no Python. Each round replays every
    variant's graph in turn, the order reversed every other round (A B, B A, ...), so drift in clocks
    or temperature hits both alike;
    round medians are kept in the record to show the spread.

    preheat_s: when one call takes preheat_min_us or more, each timed block is preceded by about preheat_s of
    untimed replays of the same graph. Long MoE GEMMs hold an H200 at its 700 W cap, and its clock then falls
    from 1980 MHz to ~1500 over a few seconds: short blocks timed from a cooler GPU land anywhere on that slope
    (a 25% p10-p90 spread at M=8192 without it), while a busy prefill server runs at the bottom.
    """
    import torch

    graphs = {}
    for label, (step, ctx) in variants.items():
        with (ctx() if ctx is not None else contextlib.nullcontext()):
            graphs[label] = _capture(step, calls, warmup)
    # size the replay count from one timed replay of the first graph
    first = next(iter(graphs.values()))
    est = _replay_block(first, calls, 3)
    per_graph_us = max(statistics.median(est) * calls, 1.0)
    replays = int(max(min_replays, min(max_replays, budget_s * 1e6 / per_graph_us / max(rounds, 1))))
    heat = preheat_s if preheat_s > 0 and per_graph_us / calls >= preheat_min_us else 0.0
    samples: dict[str, list[float]] = {k: [] for k in graphs}
    round_medians: dict[str, list[float]] = {k: [] for k in graphs}
    order = list(graphs)
    for r in range(rounds):
        # A B, then B A, ...: a variant timed second in every round would carry whatever drifts
        # within a round (clocks falling as the GPU heats under long GEMMs: 4% on an H100 between
        # two identical MoE configs at M=4096 with a fixed A-B order).
        for label in (order if r % 2 == 0 else order[::-1]):
            g = graphs[label]
            if heat:
                _preheat(g, heat, per_graph_us)
            block = _replay_block(g, calls, replays)
            samples[label] += block
            round_medians[label].append(statistics.median(block))
    out = {}
    for label, vals in samples.items():
        vals.sort()
        out[label] = Timing(statistics.median(vals), _percentile(vals, 0.1), _percentile(vals, 0.9), calls,
                            replays * rounds, round_medians[label], preheat_s=heat)
    del graphs
    torch.cuda.synchronize()
    return out


def measure_copy_tbps(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), the HBM roof we compare to."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e12


def measure_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 n x n x n product on random data, the matrix roof we compare to."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------
# records


def record(suite: str, case: dict, baseline: str, candidate: str, baseline_t: Timing | float,
           candidate_t: Timing | float, **extra) -> dict[str, Any]:
    """One measured case in the schema every results file uses."""
    v = versions()
    rec: dict[str, Any] = {
        "suite": suite,
        "gpu": extra.pop("gpu", None) or gpu_name(),
        "sglang": v.get("sglang"),
        "triton": v.get("triton"),
        "torch": v.get("torch"),
        "plugin": v.get("sglang-gemma4-opt"),
        "case": case,
        "baseline": baseline,
        "candidate": candidate,
    }
    for prefix, t in (("baseline", baseline_t), ("candidate", candidate_t)):
        if isinstance(t, Timing):
            rec.update(t.as_dict(prefix))
            rec["timing"] = t.method
            rec["calls_per_graph"] = t.calls_per_graph
            rec["replays"] = t.replays
            if t.preheat_s:
                rec["preheat_s"] = t.preheat_s
        else:
            rec[f"{prefix}_us"] = float(t)
    b, c = rec["baseline_us"], rec["candidate_us"]
    rec["speedup"] = b / c if c and c > 0 and not math.isnan(c) else float("nan")
    rec.update(extra)
    return rec


def write_results(out_dir: Path | str, suite: str, gpu: str, records: list[dict], header: dict,
                  tag: str = "") -> Path:
    """benchmarks/results/<suite>[-<tag>]-<GPU>.json: {"header": ..., "records": [...]}, replaced whole."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}{'-' + tag if tag else ''}-{slug(gpu)}.json"
    write_json_atomic(path, {"header": dict(header, suite=suite, gpu=gpu), "records": records})
    return path


def write_json_atomic(path: Path, doc) -> None:
    """Write a results document through a temp file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def load_results(path: Path | str) -> tuple[dict, list[dict]]:
    doc = json.loads(Path(path).read_text())
    if isinstance(doc, list):  # a bare list of records
        return {}, doc
    return doc.get("header", {}), doc.get("records", [])


# ---------------------------------------------------------------------------------------------
# console output


def progress(iterable, total: int | None = None, desc: str = ""):
    """tqdm if installed, else rich, else the bare iterable (progress goes to stderr)."""
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
    except ImportError:
        pass
    try:
        from rich.progress import track

        return track(iterable, total=total, description=desc, console=None)
    except ImportError:
        return iterable


def fmt(x, spec: str = ".3g", no: str = "NO") -> str:
    """A table cell: '-' for None, yes/`no` for booleans, floats with `spec`."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else no
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return format(x, spec)
    return str(x)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table when rich is installed, plain aligned text otherwise."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for c in columns:
            t.add_column(c, justify="right")
        for r in cells:
            t.add_row(*r)
        Console(width=200).print(t)
        return
    except ImportError:
        pass
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
