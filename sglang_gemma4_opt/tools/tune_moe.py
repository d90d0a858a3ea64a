"""`sglang-gemma4-opt tune-moe`: tune sglang's fused-MoE Triton kernel on this GPU and write its config
tables in sglang's format, named as sglang names them.

    sglang-gemma4-opt tune-moe --N 704 --budget 6                      # Gemma4 26B-A4B, TP=1, bf16
    sglang-gemma4-opt tune-moe --N 352 --budget 6                      # TP=2
    sglang-gemma4-opt tune-moe --N 704 --dry-run                       # the plan, no GPU needed
    sglang-gemma4-opt tune-moe --refinalize --state benchmarks/tuning/<shape>.state.json   # no GPU

What it does, per M bucket (token count; M is a run-time argument of the kernel, so a config compiles
once and serves every M of one specialisation class):

* the up projection (w13: M*topk rows gathered from the hidden states, 2N outputs) and the down
  projection (w2: K outputs, routed weight applied, top_k=1) are tuned separately, each kernel timed
  alone by CUDA-graph replay of `calls` launches, each launch with its own random routing (top-k
  distinct experts per token, uniformly over all E, as in `bench --suite fused_moe`);
* the base table's entry for M (the table serving would use now, e.g. sglang PR #26588's) is timed
  first, then a coarse grid over BLOCK_SIZE_M/N/K, num_warps, num_stages, then rounds of one-parameter
  moves (GROUP_SIZE_M, num_stages, BLOCK_K, BLOCK_N, num_warps) around the best configs of each
  BLOCK_SIZE_M;
* the written pair has one BLOCK_SIZE_M (sglang asserts it: both kernels walk one
  `moe_align_block_size` layout): the BLOCK_SIZE_M with the least up + down time wins;
* from M=256 on (--pipeline-from), up to 12 of the best pairs (the base pair included) are re-ranked by
  timing sglang's whole `fused_experts` (align, up, activation, down, sum) with the pair served as its
  table, interleaved over two rounds of 0.1 s each: under sustained load the clocks drop more for some
  tiles than for others, which the short per-kernel timings miss (seen on the H200: kernel-level
  winners 1.29x faster than the PR's pair at M=16384 were 1.13x faster in the whole MoE);
* the base pair is kept (its entries written verbatim) unless the winner beats it by --min-gain (3%) in
  the whole-MoE timing, or --min-gain-kernel (1%) where only kernels were timed: smaller "gains" are
  run-to-run noise. `--refinalize` re-applies these thresholds to a state file without a GPU;
* each winner is checked against a torch float32 reference on fresh random inputs (outputs poisoned
  with NaN first, so an unwritten element fails): relative Frobenius error <= --rel-tol (default 1e-2
  for bf16: bf16 rounding of the output alone is ~2e-3); a failing config is rejected and the next
  best taken.

Pruning for Hopper (`block_m_range`, `is_valid`): BLOCK_SIZE_M from next_pow2(2*M*topk/E) down to a
quarter of it, within 16..--max-block-m; BLOCK_N 32..256, BLOCK_K 64..256, GROUP_SIZE_M {1,16,32,64},
num_warps {4,8}, num_stages {2..5}; configs whose pipeline buffers exceed 227 KB of shared memory, 8 warps
on tiles under 64x64 and 4 warps on tiles over 128x128 (accumulator spills) are never compiled.
Configs that still fail to compile or launch are recorded as failed and skipped.

Compiling dominates: candidates are compiled on a thread pool (`triton.AsyncCompileMode`, Triton's
compiler releases the GIL) before they are timed; the state records serial vs parallel compile rates.

Resumable: every measured (projection, M, config) -> median us goes to a state file (JSON, saved after
every compile batch); a rerun with the same state file skips what is measured and continues. Tables are
(re)written after every bucket and at the end. --budget MINUTES tunes buckets in order of value (prefill
M >= 2048 largest first, then M=1, then the other powers of two downwards, then the rest) and stops
cleanly, keeping the best of a half-searched bucket only if its base entry was timed for both kernels.
Keys not tuned keep the base table's entries, so the written tables are always complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

# ---------------------------------------------------------------------------------------------
# search space (pure; checked on the CPU)

DEFAULT_MS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
BLOCK_MS = (16, 32, 64, 128, 256)
BLOCK_NS = (32, 64, 128, 256)
BLOCK_KS = (64, 128, 256)
GROUPS = (1, 16, 32, 64)
WARPS = (4, 8)
STAGES = (2, 3, 4, 5)
SMEM_LIMIT = 227 * 1024  # Hopper: 227 KB of shared memory per block (opt-in maximum)
CFG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
PROJS = ("up", "down")
DTYPES = {"bf16": None, "bfloat16": None, "fp8_w8a8": "fp8_w8a8"}  # CLI name -> sglang's dtype selector
STATE_FORMAT = 1


def next_pow2(x: float) -> int:
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


def block_m_range(M: int, topk: int, E: int, max_block_m: int = 256) -> list[int]:
    """BLOCK_SIZE_M worth trying at M: up to next_pow2(2 * mean tokens per expert), down to a quarter of
    that, within 16..max_block_m. Bigger tiles only pad more rows with nothing; much smaller ones
    re-read the expert's weights once per tile."""
    hi = min(max_block_m, max(16, next_pow2(2 * M * topk / E)))
    lo = max(16, hi // 4)
    return [b for b in BLOCK_MS if lo <= b <= hi]


def smem_bytes(cfg: dict, elt_bytes: int = 2) -> int:
    """Shared memory the software pipeline holds: num_stages copies of the A and B tiles."""
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    return cfg.get("num_stages", 3) * (bm * bk + bk * bn) * elt_bytes


def is_valid(cfg: dict, elt_bytes: int = 2, smem_limit: int = SMEM_LIMIT) -> bool:
    if smem_bytes(cfg, elt_bytes) > smem_limit:
        return False
    tile = cfg["BLOCK_SIZE_M"] * cfg["BLOCK_SIZE_N"]
    w = cfg.get("num_warps", 4)
    if w >= 8 and tile < 64 * 64:
        return False  # under 16 accumulator elements per thread: warps idle
    if w <= 4 and tile > 128 * 128:
        return False  # over 128 fp32 accumulators per thread: spills
    if tile > 256 * 128:
        return False  # over 128 per thread even with 8 warps
    return True


def make_cfg(bm, bn, bk, g, w, s) -> dict:
    return dict(zip(CFG_KEYS, (bm, bn, bk, g, w, s)))


def normalize(cfg: dict) -> dict:
    """A table entry as the kernel runs it: Triton's defaults (4 warps, 3 stages) where it names none."""
    out = {k: int(cfg[k]) for k in CFG_KEYS[:3]}
    out["GROUP_SIZE_M"] = int(cfg.get("GROUP_SIZE_M", 1))
    out["num_warps"] = int(cfg.get("num_warps", 4))
    out["num_stages"] = int(cfg.get("num_stages", 3))
    return out


def cfg_key(cfg: dict) -> str:
    c = normalize(cfg)
    return ",".join(str(c[k]) for k in CFG_KEYS)


def parse_key(key: str) -> dict:
    return make_cfg(*(int(x) for x in key.split(",")))


def coarse_space(M: int, topk: int, E: int, elt_bytes: int = 2, max_block_m: int = 256) -> list[dict]:
    """First pass at M. Decode sizes (BLOCK_M 16 only): every BLOCK_N/K, warps, stages (the grid is
    small, so tile shape and pipeline depth decide). Larger M: BLOCK_N {64,128,256} x BLOCK_K {64,128} x
    warps {4,8} x stages {3,4}, GROUP_SIZE_M 1; the refinement moves GROUP_SIZE_M and the rest."""
    bms = block_m_range(M, topk, E, max_block_m)
    out = []
    if bms == [16]:
        for bn in BLOCK_NS:
            for bk in BLOCK_KS:
                for w in WARPS:
                    for s in STAGES:
                        out.append(make_cfg(16, bn, bk, 1, w, s))
    else:
        for bm in bms:
            for bn in (64, 128, 256):
                for bk in (64, 128):
                    for w in WARPS:
                        for s in (3, 4):
                            out.append(make_cfg(bm, bn, bk, 1, w, s))
    return [c for c in out if is_valid(c, elt_bytes)]


def neighbours(cfg: dict, elt_bytes: int = 2) -> list[dict]:
    """Configs one parameter away (BLOCK_SIZE_M kept: the joint choice compares BLOCK_SIZE_M values)."""
    c = normalize(cfg)
    out = []
    for key, values in (("GROUP_SIZE_M", GROUPS), ("num_stages", STAGES), ("BLOCK_SIZE_K", BLOCK_KS),
                        ("BLOCK_SIZE_N", BLOCK_NS), ("num_warps", WARPS)):
        for v in values:
            if v != c[key]:
                n = dict(c, **{key: v})
                if is_valid(n, elt_bytes):
                    out.append(n)
    return out


def order_buckets(ms: Iterable[int], prefill_from: int = 2048) -> list[int]:
    """Most valuable first, for a budget: prefill sizes (M >= prefill_from) largest first: they carry
    most of the prefill time, and a large M falls on the largest key; then M=1 (the decode-latency
    key); then the other powers of two downwards; then the keys in between (24, 48, ...), downwards."""
    ms = sorted(set(int(m) for m in ms), reverse=True)
    prefill = [m for m in ms if m >= prefill_from]
    rest = [m for m in ms if m < prefill_from]
    pow2 = [m for m in rest if m & (m - 1) == 0]
    other = [m for m in rest if m & (m - 1)]
    head = [1] if 1 in pow2 else []
    return prefill + head + [m for m in pow2 if m != 1] + other


# ---------------------------------------------------------------------------------------------
# tables (pure)


def config_file_name(E: int, N: int, device_name: str, dtype: str | None = None, down: bool = False) -> str:
    """sglang's `get_config_file_name` for this device (no block shape, no per-channel quant)."""
    return (f"E={E},N={N},device_name={device_name.replace(' ', '_')}"
            + (f",dtype={dtype}" if dtype else "") + ("_down" if down else "") + ".json")


def nearest_entry(table: dict[int, dict], M: int) -> dict:
    """The entry sglang picks for M (`min(keys, key=|key - M|)`; ties go to the smaller key)."""
    return table[min(sorted(table), key=lambda k: abs(k - M))]


def build_tables(base_up: dict[int, dict], base_down: dict[int, dict] | None,
                 tuned: dict[int, tuple[dict, dict]]) -> tuple[dict[int, dict], dict[int, dict]]:
    """(up, down) tables: base keys keep their entries unless tuned; tuned keys (new ones too) get the
    tuned pair. Both tables get the same keys and, per key, the same BLOCK_SIZE_M (sglang asserts it);
    a base pair that breaks that rule keeps its up entry for both kernels (what sglang runs when it
    has no down table)."""
    up, down = {}, {}
    for m in sorted(set(base_up) | set(tuned)):
        if m in tuned:
            u, d = tuned[m]
            if u["BLOCK_SIZE_M"] != d["BLOCK_SIZE_M"]:
                raise ValueError(f"M={m}: tuned BLOCK_SIZE_M differ ({u['BLOCK_SIZE_M']} vs {d['BLOCK_SIZE_M']})")
            up[m], down[m] = dict(u), dict(d)
            continue
        u = dict(base_up[m])
        d = dict(nearest_entry(base_down, m)) if base_down else dict(u)
        if d.get("BLOCK_SIZE_M") != u.get("BLOCK_SIZE_M"):
            d = dict(u)
        up[m], down[m] = u, d
    return up, down


def table_json(table: dict[int, dict]) -> str:
    """sglang's file format: {"M": {BLOCK_SIZE_M, ..., num_stages}} by increasing M, indent 4."""
    out = {}
    for m in sorted(table):
        e = table[m]
        out[str(m)] = {**{k: e[k] for k in CFG_KEYS if k in e}, **{k: v for k, v in e.items() if k not in CFG_KEYS}}
    return json.dumps(out, indent=4) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_table(path: Path) -> dict[int, dict]:
    return {int(k): dict(v) for k, v in json.loads(Path(path).read_text()).items()}


# ---------------------------------------------------------------------------------------------
# state (pure)


class BudgetExhausted(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Problem:
    E: int
    N: int
    K: int
    topk: int
    dtype: str | None  # sglang's dtype selector: None (bf16) or "fp8_w8a8"
    device: str

    @property
    def elt_bytes(self) -> int:
        return 1 if self.dtype == "fp8_w8a8" else 2

    def file_name(self, down: bool = False) -> str:
        return config_file_name(self.E, self.N, self.device, self.dtype, down)

    def slug(self) -> str:
        d = self.device.replace(" ", "_")
        return f"E{self.E}-N{self.N}-K{self.K}-top{self.topk}-{self.dtype or 'bf16'}-{d}"


class State:
    """Everything measured, as JSON: resumable, diffable, committed beside the tables."""

    def __init__(self, path: Path | None, data: dict):
        self.path = Path(path) if path else None
        self.data = data

    @classmethod
    def new(cls, path, problem: Problem, base_up, base_down, base_source: str, ms):
        data = {
            "format": STATE_FORMAT,
            "problem": dataclasses.asdict(problem),
            "files": {"up": problem.file_name(False), "down": problem.file_name(True)},
            "ms": sorted(int(m) for m in ms),
            "base": {"source": base_source, "up": {str(k): v for k, v in sorted(base_up.items())},
                     "down": ({str(k): v for k, v in sorted(base_down.items())} if base_down else None)},
            "measured": {p: {} for p in PROJS},
            "checks": {p: {} for p in PROJS},
            "buckets": {},
            "sessions": [],
        }
        return cls(path, data)

    @classmethod
    def load(cls, path) -> "State":
        data = json.loads(Path(path).read_text())
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: state format {data.get('format')} (this tuner writes {STATE_FORMAT})")
        return cls(path, data)

    def save(self) -> None:
        if self.path is not None:
            write_atomic(self.path, json.dumps(self.data, indent=0, sort_keys=False) + "\n")

    # --- accessors
    @property
    def problem(self) -> Problem:
        return Problem(**self.data["problem"])

    def base(self, proj: str) -> dict[int, dict] | None:
        t = self.data["base"]["up" if proj == "up" else "down"]
        return {int(k): v for k, v in t.items()} if t else None

    def base_entry(self, proj: str, M: int) -> dict:
        t = self.base(proj) if proj == "down" and self.base("down") else self.base("up")
        return nearest_entry(t, M)

    def measured(self, proj: str, M: int) -> dict[str, Any]:
        return self.data["measured"][proj].setdefault(str(M), {})

    def times(self, proj: str, M: int) -> dict[str, float]:
        """Config key -> us for configs that ran and were not rejected by the check."""
        checks = self.data["checks"][proj].get(str(M), {})
        return {k: v for k, v in self.measured(proj, M).items()
                if isinstance(v, (int, float)) and not (k in checks and not checks[k]["ok"])}

    def check(self, proj: str, M: int, key: str) -> dict | None:
        return self.data["checks"][proj].get(str(M), {}).get(key)

    def set_check(self, proj: str, M: int, key: str, ok: bool, rel_err, why: str = "") -> None:
        self.data["checks"][proj].setdefault(str(M), {})[key] = {"ok": bool(ok), "rel_err": rel_err, "why": why}

    def bucket(self, M: int) -> dict:
        return self.data["buckets"].setdefault(str(M), {"status": "todo"})

    def tuned(self) -> dict[int, tuple[dict, dict]]:
        out = {}
        for m, b in self.data["buckets"].items():
            if b.get("kept_base"):  # the base table's entries, verbatim
                down = self.base("down") or self.base("up")
                out[int(m)] = (dict(nearest_entry(self.base("up"), int(m))), dict(nearest_entry(down, int(m))))
            elif b.get("up") and b.get("down"):
                out[int(m)] = (parse_key(b["up"]), parse_key(b["down"]))
        return out


def select_joint(state: State, M: int) -> tuple[str, str] | None:
    """(up key, down key) with one BLOCK_SIZE_M and the least up + down time, or None."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for proj in PROJS:
        per_bm: dict[int, tuple[float, str]] = {}
        for key, us in state.times(proj, M).items():
            bm = parse_key(key)["BLOCK_SIZE_M"]
            if bm not in per_bm or us < per_bm[bm][0]:
                per_bm[bm] = (us, key)
        best[proj] = per_bm
    common = set(best["up"]) & set(best["down"])
    if not common:
        return None
    bm = min(common, key=lambda b: (best["up"][b][0] + best["down"][b][0], b))
    return best["up"][bm][1], best["down"][bm][1]


def pipeline_pairs(state: State, M: int, per_bm: int = 2, max_pairs: int = 12) -> list[tuple[str, str]]:
    """Pairs for the whole-MoE re-ranking: the base pair first, then for each BLOCK_SIZE_M (best kernel
    sum first) every combination of its `per_bm` fastest up and down configs, up to `max_pairs`."""
    by_bm: dict[str, dict[int, list[tuple[float, str]]]] = {}
    for proj in PROJS:
        d: dict[int, list[tuple[float, str]]] = {}
        for key, us in state.times(proj, M).items():
            d.setdefault(parse_key(key)["BLOCK_SIZE_M"], []).append((us, key))
        by_bm[proj] = {bm: sorted(v)[:per_bm] for bm, v in d.items()}
    out: list[tuple[str, str]] = []
    bu, bd = cfg_key(state.base_entry("up", M)), cfg_key(state.base_entry("down", M))
    times = {p: state.times(p, M) for p in PROJS}
    if bu in times["up"] and bd in times["down"] and parse_key(bu)["BLOCK_SIZE_M"] == parse_key(bd)["BLOCK_SIZE_M"]:
        out.append((bu, bd))
    combos = []
    for bm in set(by_bm["up"]) & set(by_bm["down"]):
        for tu, ku in by_bm["up"][bm]:
            for td, kd in by_bm["down"][bm]:
                combos.append((tu + td, ku, kd))
    for _, ku, kd in sorted(combos):
        if len(out) >= max_pairs:
            break
        if (ku, kd) not in out:
            out.append((ku, kd))
    return out


def seeds(state: State, proj: str, M: int, top: int = 3) -> list[dict]:
    """Refinement seeds: the `top` fastest configs and the fastest of every BLOCK_SIZE_M."""
    times = state.times(proj, M)
    ranked = sorted(times, key=times.get)
    out = list(ranked[:top])
    seen_bm = set()
    for k in ranked:
        bm = parse_key(k)["BLOCK_SIZE_M"]
        if bm not in seen_bm:
            seen_bm.add(bm)
            if k not in out:
                out.append(k)
    return [parse_key(k) for k in out]


# ---------------------------------------------------------------------------------------------
# the search loop (backend-agnostic: the GPU backend below, a fake one in the CPU tests)


class Tuner:
    def __init__(self, state: State, backend, *, budget_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 out_dir: Path | None = None, max_block_m: int = 256, refine_rounds: int = 2, chunk: int = 64,
                 reserve_s: float | None = None, log: Callable[[str], None] = print, progress=None,
                 pipeline_from: int = 256, pipeline_pairs: int = 12, min_gain: float = 0.03,
                 min_gain_kernel: float = 0.01):
        self.state = state
        self.backend = backend
        self.clock = clock
        self.t0 = clock()
        self.budget_s = budget_s
        self.reserve_s = (min(15.0, 0.05 * budget_s) if budget_s else 0.0) if reserve_s is None else reserve_s
        self.out_dir = Path(out_dir) if out_dir else None
        self.max_block_m = max_block_m
        self.refine_rounds = refine_rounds
        self.pipeline_from = pipeline_from
        self.pipeline_max = pipeline_pairs
        self.min_gain = min_gain
        self.min_gain_kernel = min_gain_kernel
        self.chunk = chunk
        self.log = log
        self.progress = progress or (lambda it, total=None, desc="": it)
        self.problem = state.problem
        self.session = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "budget_s": budget_s, "measured": 0, "compiled_batches": [], "buckets": [],
                        "stopped": None}
        state.data["sessions"].append(self.session)

    # --- budget
    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (self.clock() - self.t0)

    def check_budget(self) -> None:
        if self.left() <= self.reserve_s:
            raise BudgetExhausted()

    # --- measuring
    def measure(self, proj: str, M: int, cands: list[dict], desc: str) -> int:
        done = self.state.measured(proj, M)
        todo, seen = [], set()
        for c in cands:
            k = cfg_key(c)
            if k not in done and k not in seen:
                seen.add(k)
                todo.append(normalize(c))
        n = 0
        for i in range(0, len(todo), self.chunk):
            self.check_budget()
            part = todo[i:i + self.chunk]
            stats = self.backend.precompile(proj, M, part)
            if stats:
                self.session["compiled_batches"].append(dict(stats, proj=proj, M=M))
            try:
                for cfg in self.progress(part, total=len(part), desc=f"M={M} {proj} {desc}"):
                    self.check_budget()
                    try:
                        us = float(self.backend.time(proj, M, cfg))
                        val: Any = round(us, 3) if math.isfinite(us) else "error: not finite"
                    except BudgetExhausted:
                        raise
                    except Exception as e:  # failed to compile, out of resources, ...
                        val = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    done[cfg_key(cfg)] = val
                    self.session["measured"] += 1
                    n += 1
            finally:
                self.state.save()
        return n

    def best_us(self, proj: str, M: int) -> float:
        t = self.state.times(proj, M)
        return min(t.values()) if t else math.inf

    # --- one bucket
    def tune_bucket(self, M: int) -> None:
        b = self.state.bucket(M)
        if b.get("status") == "done":
            if self.wants_pipeline(M) and not b.get("pipeline"):  # tuned before the whole-MoE stage
                self.backend.setup(M)
                try:
                    self.pipeline(M)
                except BudgetExhausted:
                    return
                self.finalize(M, True)
            return
        E, topk, elt = self.problem.E, self.problem.topk, self.problem.elt_bytes
        self.backend.setup(M)
        b["status"] = "partial"
        try:
            for proj in PROJS:
                base = normalize(self.state.base_entry(proj, M))
                self.measure(proj, M, [base], "base")
            for proj in PROJS:
                self.measure(proj, M, coarse_space(M, topk, E, elt, self.max_block_m), "coarse")
            rounds = b.setdefault("rounds", [])
            for r in range(self.refine_rounds):
                if r == len(rounds):
                    # seeds and the best time before the round are frozen in the state, so a resumed
                    # run makes the same moves as an uninterrupted one
                    rounds.append({p: {"seeds": [cfg_key(s) for s in seeds(self.state, p, M)],
                                       "before": self.best_us(p, M)} for p in PROJS})
                    self.state.save()
                rd = rounds[r]
                for proj in PROJS:
                    cands = [n for s in rd[proj]["seeds"] for n in neighbours(parse_key(s), elt)]
                    self.measure(proj, M, cands, f"refine {r + 1}")
                if not any(self.best_us(p, M) < rd[p]["before"] for p in PROJS):
                    break
            self.pipeline(M)
            complete = True
        except BudgetExhausted:
            complete = False
        self.finalize(M, complete)

    def pipeline(self, M: int) -> None:
        """Re-rank the best pairs by the whole fused MoE (sglang's `fused_experts`: align, up, activation,
        down, sum) with the pair served as sglang's table, timed for longer and interleaved: sustained
        load lowers clocks more for some tiles than others, which short kernel timings do not see."""
        b = self.state.bucket(M)
        if not self.wants_pipeline(M) or b.get("pipeline"):
            return
        pairs = pipeline_pairs(self.state, M, max_pairs=self.pipeline_max)
        if len(pairs) < 2:
            return
        self.check_budget()
        us = self.backend.time_pipeline(M, [(parse_key(u), parse_key(d)) for u, d in pairs])
        b["pipeline"] = [[u, d, round(float(t), 3)] for (u, d), t in zip(pairs, us)]
        self.state.save()

    def wants_pipeline(self, M: int) -> bool:
        return M >= self.pipeline_from and hasattr(self.backend, "time_pipeline")

    def _check(self, proj: str, M: int, key: str) -> bool:
        if self.state.check(proj, M, key) is None:
            try:
                rel = float(self.backend.check(proj, M, parse_key(key)))
                ok = math.isfinite(rel) and rel <= self.backend.rel_tol
                why = "" if ok else f"relative error {rel:.3g} > {self.backend.rel_tol:g}"
            except Exception as e:
                rel, ok, why = None, False, f"{type(e).__name__}: {str(e)[:160]}"
            self.state.set_check(proj, M, key, ok, rel if rel is None or math.isfinite(rel) else None, why)
            if not ok:
                self.log(f"M={M} {proj} {key}: rejected ({why})")
        return self.state.check(proj, M, key)["ok"]

    def finalize(self, M: int, complete: bool) -> None:
        b = self.state.bucket(M)
        base_keys = {p: cfg_key(self.state.base_entry(p, M)) for p in PROJS}
        base_ok = all(base_keys[p] in self.state.measured(p, M) for p in PROJS)
        b["status"] = "done" if complete else "partial"
        if not complete and not base_ok:
            b.pop("up", None), b.pop("down", None)
            self.state.save()
            return
        pl = {(u, d): t for u, d, t in b.get("pipeline") or []}
        for u, d in sorted(pl, key=pl.get):  # whole-MoE ranking first, where there is one
            if self._check("up", M, u) and self._check("down", M, d):
                sel = (u, d)
                break
        else:
            sel = None
        while sel is None:
            sel = select_joint(self.state, M)
            if sel is None:
                break
            if not (self._check("up", M, sel[0]) and self._check("down", M, sel[1])):
                sel = None
                continue
        if sel is None:
            b.pop("up", None), b.pop("down", None)
        else:
            up_t, down_t = self.state.times("up", M), self.state.times("down", M)
            b.update(up=sel[0], down=sel[1], up_us=up_t[sel[0]], down_us=down_t[sel[1]],
                     up_rel_err=self.state.check("up", M, sel[0])["rel_err"],
                     down_rel_err=self.state.check("down", M, sel[1])["rel_err"],
                     base_up=base_keys["up"], base_down=base_keys["down"],
                     base_up_us=self.state.measured("up", M).get(base_keys["up"]),
                     base_down_us=self.state.measured("down", M).get(base_keys["down"]),
                     measured={p: len(self.state.measured(p, M)) for p in PROJS})
            if pl:
                b.update(pipeline_us=pl[sel], pipeline_base_us=pl.get((base_keys["up"], base_keys["down"])))
            b.update(best_up=sel[0], best_down=sel[1])
            self.apply_min_gain(M)
        self.state.save()

    def apply_min_gain(self, M: int) -> None:
        """Keep the base pair unless the winner beats it by --min-gain on the whole MoE (where that was
        timed) or --min-gain-kernel on the kernel sum: a smaller "gain" is run-to-run noise (the same
        pair measured 0.98x-1.02x against itself in separate runs), and the base entries are what
        serving runs today. Sets `up`/`down` (written) from `best_up`/`best_down` (the search's choice)."""
        b = self.state.bucket(M)
        if not b.get("up"):
            return
        sel = (b.setdefault("best_up", b["up"]), b.setdefault("best_down", b["down"]))
        bu, bd = cfg_key(self.state.base_entry("up", M)), cfg_key(self.state.base_entry("down", M))
        pl = {(u, d): t for u, d, t in b.get("pipeline") or []}
        ut, dt = self.state.times("up", M), self.state.times("down", M)
        tb = ts = None
        if (bu, bd) in pl and sel in pl:
            tb, ts, thr = pl[(bu, bd)], pl[sel], self.min_gain
        elif bu in ut and bd in dt and sel[0] in ut and sel[1] in dt:
            tb, ts, thr = ut[bu] + dt[bd], ut[sel[0]] + dt[sel[1]], self.min_gain_kernel
        same_bm = parse_key(bu)["BLOCK_SIZE_M"] == parse_key(bd)["BLOCK_SIZE_M"]
        keep = sel != (bu, bd) and same_bm and tb is not None and ts * (1 + thr) > tb
        b["kept_base"] = bool(keep)
        b["up"], b["down"] = (bu, bd) if keep else sel
        b["up_us"], b["down_us"] = ut.get(b["up"]), dt.get(b["down"])
        for proj in PROJS:  # the base table's entries are served today: not checked by the tuner
            c = self.state.check(proj, M, b[proj])
            b[f"{proj}_rel_err"] = c["rel_err"] if c else None
        if pl:
            b["pipeline_us"] = pl.get((b["up"], b["down"]))

    # --- everything
    def tables(self) -> tuple[dict[int, dict], dict[int, dict]]:
        return build_tables(self.state.base("up"), self.state.base("down"), self.state.tuned())

    def write_tables(self) -> list[Path]:
        if self.out_dir is None:
            return []
        up, down = self.tables()
        paths = []
        for table, down_flag in ((up, False), (down, True)):
            p = self.out_dir / self.problem.file_name(down_flag)
            write_atomic(p, table_json(table))
            paths.append(p)
        return paths

    def run(self, ms: Iterable[int]) -> dict:
        order = order_buckets(ms)
        self.session["order"] = order
        stopped = None
        for M in order:
            b = self.state.bucket(M)
            if b.get("status") == "done" and not (self.wants_pipeline(M) and not b.get("pipeline")):
                continue
            if self.left() <= self.reserve_s:
                stopped = f"budget spent before M={M}"
                break
            t = self.clock()
            self.tune_bucket(M)
            self.session["buckets"].append({"M": M, "s": round(self.clock() - t, 1),
                                            "status": self.state.bucket(M)["status"]})
            self.write_tables()
            if self.state.bucket(M)["status"] != "done":
                stopped = f"budget spent during M={M}"
                break
        self.session["stopped"] = stopped
        self.session["seconds"] = round(self.clock() - self.t0, 1)
        self.state.save()
        self.write_tables()
        return {"stopped": stopped, "left": [m for m in order if self.state.bucket(m).get("status") != "done"]}


def summary_rows(state: State) -> list[list[str]]:
    rows = []
    for m in sorted(int(k) for k in state.data["buckets"]):
        b = state.data["buckets"][str(m)]
        if not b.get("up"):
            rows.append([str(m), b.get("status", "?")] + ["-"] * 9)
            continue
        num = lambda v: v if isinstance(v, (int, float)) else math.nan  # noqa: E731
        base = num(b.get("base_up_us")) + num(b.get("base_down_us"))
        new = b["up_us"] + b["down_us"]
        pb, pn = num(b.get("pipeline_base_us")), num(b.get("pipeline_us"))
        rows.append([str(m), b["status"] + (" (base kept)" if b.get("kept_base") else ""), b["up"], b["down"], f"{base:.1f}", f"{new:.1f}",
                     f"{base / new:.2f}x" if new else "-", f"{pb:.1f}" if pb == pb else "-",
                     f"{pn:.1f}" if pn == pn else "-", f"{pb / pn:.2f}x" if pb == pb and pn == pn else "-",
                     f"{max(b.get('up_rel_err') or 0, b.get('down_rel_err') or 0):.1e}"])
    return rows


SUMMARY_COLUMNS = ["M", "status", "up cfg (BM,BN,BK,G,W,S)", "down cfg", "base up+down us", "tuned up+down us",
                   "speedup", "base MoE us", "tuned MoE us", "MoE speedup", "max rel err"]


# ---------------------------------------------------------------------------------------------
# GPU backend: sglang's kernel through its own `invoke_fused_moe_kernel`

KERNEL_MODULES = (
    "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_kernels",  # 0.5.11/0.5.12
    "sglang.kernels.ops.moe.fused_moe_triton_kernels",  # newer
    "sglang.srt.layers.moe.fused_moe_triton.fused_moe_triton_kernels",  # older
)
ALIGN_MODULES = (
    "sglang.srt.layers.moe.moe_runner.triton_utils.moe_align_block_size",
    "sglang.srt.layers.moe.fused_moe_triton.moe_align_block_size",
)


def _import_first(names, attr):
    from ..bench.common import _first_module_with  # one implementation of "first layout that has it"

    return _first_module_with(names, attr)


def align_torch(topk_ids, block_m: int, E: int):
    """moe_align_block_size in plain torch (same layout as sgl_kernel's): slots sorted by expert, each
    expert padded to a multiple of block_m with the sentinel M*topk; one expert id per block."""
    import torch

    flat = topk_ids.flatten().to(torch.int64)
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    sorted_ids, expert_ids, pos = [], [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        ids = order[pos:pos + c]
        pos += c
        pad = (-c) % block_m
        sorted_ids.append(torch.cat([ids, torch.full((pad,), n, dtype=torch.int64)]))
        expert_ids += [e] * ((c + pad) // block_m)
    s = torch.cat(sorted_ids).to(torch.int32) if sorted_ids else torch.empty(0, dtype=torch.int32)
    return (s.to(topk_ids.device), torch.tensor(expert_ids, dtype=torch.int32, device=topk_ids.device),
            torch.tensor([s.numel()], dtype=torch.int32, device=topk_ids.device))


class KernelBackend:
    """Times and checks one projection's kernel at one M with one config, through sglang's
    `invoke_fused_moe_kernel` (so every argument, constexpr and specialisation is sglang's).

    device "cuda": CUDA-graph timing (the benchmark suite's `time_variants`), thread-pool precompile.
    device "cpu": for tests under TRITON_INTERPRET=1 (fp16, tiny shapes): `check` only.
    """

    def __init__(self, problem: Problem, *, device: str = "cuda", seed: int = 0, time_budget_s: float = 0.02,
                 max_calls: int = 10, compile_workers: int | None = None, rel_tol: float | None = None,
                 act_dtype=None, pipeline_budget_s: float = 0.1, log: Callable[[str], None] = print):
        import torch

        self.torch = torch
        self.p = problem
        self.device = device
        self.time_budget_s = time_budget_s
        self.pipeline_budget_s = pipeline_budget_s
        self.max_calls = max_calls
        self.workers = (os.cpu_count() or 1) if compile_workers is None else max(1, compile_workers)
        self.fp8 = problem.dtype == "fp8_w8a8"
        self.rel_tol = rel_tol if rel_tol is not None else (5e-2 if self.fp8 else 1e-2)
        self.log = log
        self.kmod = _import_first(KERNEL_MODULES, "invoke_fused_moe_kernel")
        self.invoke = self.kmod.invoke_fused_moe_kernel
        import inspect

        self.invoke_params = set(inspect.signature(self.invoke).parameters)
        self.act_dtype = act_dtype or torch.bfloat16
        self.gen = torch.Generator(device=device).manual_seed(seed)
        E, N, K = problem.E, problem.N, problem.K
        # Scaled like trained weights (unit-variance outputs), as the benchmark suite's Weights.
        w13 = torch.randn(E, 2 * N, K, device=device, generator=self.gen) * K ** -0.5
        w2 = torch.randn(E, K, N, device=device, generator=self.gen) * N ** -0.5
        if self.fp8:
            fp8 = torch.float8_e4m3fn
            s13 = w13.abs().amax(dim=(1, 2)) / torch.finfo(fp8).max
            s2 = w2.abs().amax(dim=(1, 2)) / torch.finfo(fp8).max
            self.w13, self.w2 = (w13 / s13[:, None, None]).to(fp8), (w2 / s2[:, None, None]).to(fp8)
            self.s13, self.s2 = s13.float(), s2.float()
        else:
            self.w13, self.w2 = w13.to(self.act_dtype), w2.to(self.act_dtype)
            self.s13 = self.s2 = None
        del w13, w2
        self.M = None
        self.align = None
        if device == "cuda":
            try:
                self.align = _import_first(ALIGN_MODULES, "moe_align_block_size").moe_align_block_size
            except ImportError:
                self.align = None
        self.compile_serial_s: float | None = None

    # --- inputs
    def routing(self, M):
        torch = self.torch
        ids = torch.rand(M, self.p.E, device=self.device, generator=self.gen).topk(self.p.topk, dim=-1).indices
        w = torch.softmax(torch.randn(M, self.p.topk, device=self.device, generator=self.gen), dim=-1)
        return w.float().contiguous(), ids.to(torch.int32).contiguous()

    def aligned(self, ids, bm):
        if self.align is not None:
            return self.align(ids, bm, self.p.E)
        return align_torch(ids, bm, self.p.E)

    def setup(self, M: int, calls: int | None = None) -> None:
        """Inputs for M: `calls` routings (one per captured launch), hidden states, intermediates, outputs."""
        if self.M == M:
            return
        torch = self.torch
        self.M = M
        self.inputs = {}
        self.calls = {}
        self.routes = [self.routing(M) for _ in range(calls or self.max_calls)]
        self.x = torch.randn(M, self.p.K, device=self.device, generator=self.gen).to(self.act_dtype)
        self.inter = torch.randn(M * self.p.topk, self.p.N, device=self.device, generator=self.gen).to(self.act_dtype)
        self.c_up = torch.empty(M * self.p.topk, 2 * self.p.N, device=self.device, dtype=self.act_dtype)
        self.c_down = torch.empty(M, self.p.topk, self.p.K, device=self.device, dtype=self.act_dtype)
        self._aligned = {}
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _aligned_for(self, bm):
        if bm not in self._aligned:
            self._aligned[bm] = [self.aligned(ids, bm) for _, ids in self.routes]
        return self._aligned[bm]

    def launch(self, proj, cfg, A, C, topk_w, topk_ids, al):
        import triton.language as tl

        sorted_ids, expert_ids, ntpp = al
        up = proj == "up"
        kw = dict(A=A, B=self.w13 if up else self.w2, bias=None, C=C, A_scale=None,
                  B_scale=(self.s13 if up else self.s2) if self.fp8 else None, B_zp=None, topk_weights=topk_w,
                  topk_ids=topk_ids, sorted_token_ids=sorted_ids, expert_ids=expert_ids,
                  num_tokens_post_padded=ntpp, mul_routed_weight=not up, top_k=self.p.topk if up else 1,
                  config=dict(cfg), compute_type=tl.bfloat16 if self.act_dtype == self.torch.bfloat16 else tl.float16,
                  use_fp8_w8a8=self.fp8, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
                  per_channel_quant=False, block_shape=None, filter_expert=False,
                  router_topk=1 if up else self.p.topk)  # as fused_experts passes them (same compiled kernel)
        self.invoke(**{k: v for k, v in kw.items() if k in self.invoke_params})

    def step_fn(self, proj, cfg):
        al = self._aligned_for(cfg["BLOCK_SIZE_M"])
        A, C = (self.x, self.c_up) if proj == "up" else (self.inter, self.c_down)
        routes = self.routes

        def step(i):
            w, ids = routes[i % len(routes)]
            self.launch(proj, cfg, A, C, w, ids, al[i % len(al)])

        return step

    # --- compile
    @contextlib.contextmanager
    def _warmup_only(self):
        """Inside: sglang's launches compile (asynchronously, on the pool) instead of running."""
        real = self.kmod.fused_moe_kernel

        class _Warm:
            def __getitem__(self, grid):
                return lambda *a, **k: real.run(*a, grid=grid, warmup=True, **k)

        self.kmod.fused_moe_kernel = _Warm()
        try:
            yield
        finally:
            self.kmod.fused_moe_kernel = real

    def _compile(self, proj, cfgs, workers):
        import concurrent.futures

        import triton

        if workers <= 1 or not hasattr(triton, "AsyncCompileMode"):
            with self._warmup_only():
                for c in cfgs:
                    try:
                        self.step_fn(proj, c)(0)
                    except Exception:
                        pass  # the timed launch reports it
            return
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            with triton.AsyncCompileMode(ex, ignore_errors=True):
                with self._warmup_only():
                    for c in cfgs:
                        try:
                            self.step_fn(proj, c)(0)
                        except Exception:
                            pass

    def precompile(self, proj: str, M: int, cfgs: list[dict]) -> dict | None:
        """Compile `cfgs` for this M's specialisation before timing them; returns timing stats. The
        first batch also compiles 3 configs one by one, so the state records what the pool gains."""
        if self.device != "cuda" or not cfgs:
            return None
        stats = {"n": len(cfgs), "workers": self.workers}
        cfgs = list(cfgs)
        if self.compile_serial_s is None and self.workers > 1 and len(cfgs) >= 8:
            ts = []
            for c in cfgs[:3]:
                t = time.perf_counter()
                self._compile(proj, [c], 1)
                ts.append(time.perf_counter() - t)
            self.compile_serial_s = sorted(ts)[1]
            stats["serial_s_per_config"] = round(self.compile_serial_s, 3)
            cfgs = cfgs[3:]
        t = time.perf_counter()
        self._compile(proj, cfgs, self.workers)
        dt = time.perf_counter() - t
        stats.update(parallel_s=round(dt, 2), parallel_n=len(cfgs))
        return stats

    # --- time
    def time(self, proj: str, M: int, cfg: dict) -> float:
        from ..bench import common

        step = self.step_fn(proj, cfg)
        key = (proj, M)
        if key not in self.calls:  # graph length from the first config timed at this M (the base entry)
            est = common.estimate_us(step)
            self.calls[key] = common.calls_for(est, self.max_calls, target_graph_us=1000.0)
        t = common.time_variants({"c": (step, None)}, calls=self.calls[key], rounds=1,
                                 budget_s=self.time_budget_s, min_replays=5, max_replays=200, warmup=2)
        return t["c"].median_us

    # --- whole MoE
    def time_pipeline(self, M: int, pairs: list[tuple[dict, dict]]) -> list[float]:
        """us per sglang `fused_experts` call with each (up, down) pair served as sglang's table for M;
        variants interleaved over rounds (the benchmark suite's `time_variants`)."""
        import importlib

        from ..bench import common
        from ..bench import fused_moe as bfm
        from ..patches.moe_configs import MODULE

        cfg_mod = importlib.import_module(MODULE)
        fused_experts = bfm.fused_experts_fn()
        rcfg = bfm.runner_config(E=self.p.E, N=self.p.N, K=self.p.K, topk=self.p.topk)
        kw = dict(use_fp8_w8a8=True, w1_scale=self.s13, w2_scale=self.s2) if self.fp8 else {}
        routes, x = self.routes, self.x

        def step(i):
            w, ids = routes[i % len(routes)]
            fused_experts(x, self.w13, self.w2, bfm.topk_output(w, ids), rcfg, **kw)

        @contextlib.contextmanager
        def use(up, down):
            old = cfg_mod.__dict__["get_moe_configs"]
            cfg_mod.get_moe_configs = (lambda E, N, dtype, block_n=0, block_k=0, per_channel_quant=False,
                                       down_moe=False: {M: dict(down if down_moe else up)})
            try:
                yield
            finally:
                cfg_mod.get_moe_configs = old

        for proj, i in (("up", 0), ("down", 1)):  # the kernels fused_experts launches, compiled on the pool
            self.precompile(proj, M, [p[i] for p in pairs])
        with use(*pairs[0]):
            est = common.estimate_us(step)
        calls = common.calls_for(est, self.max_calls, target_graph_us=2000.0)
        variants = {str(i): (step, (lambda u=u, d=d: use(u, d))) for i, (u, d) in enumerate(pairs)}
        t = common.time_variants(variants, calls=calls, rounds=2, budget_s=self.pipeline_budget_s)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        return [t[str(i)].median_us for i in range(len(pairs))]

    # --- check
    def reference(self, proj, A, topk_w, topk_ids):
        """float32: up row s = A[s // topk] @ w13[e_s]^T; down (t, j) = (A[t*topk+j] @ w2[e]^T) * w[t, j]."""
        torch = self.torch
        up = proj == "up"
        B = self.w13 if up else self.w2
        S = self.s13 if up else self.s2
        flat = topk_ids.flatten().long()
        out = torch.empty(flat.numel(), B.shape[1], device=A.device, dtype=torch.float32)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.p.E).tolist()
        pos = 0
        Af = A.float()
        for e, c in enumerate(counts):
            if not c:
                continue
            slots = order[pos:pos + c]
            pos += c
            rows = slots // self.p.topk if up else slots
            be = B[e].float() * (S[e] if S is not None else 1.0)
            out[slots] = Af[rows] @ be.t()
        if up:
            return out
        return (out * topk_w.flatten()[:, None]).view(-1, self.p.topk, B.shape[1])

    def check(self, proj: str, M: int, cfg: dict) -> float:
        """Relative Frobenius error vs float32 on fresh random inputs; inf if an output is not written."""
        torch = self.torch
        w, ids = self.routing(M)
        al = self.aligned(ids, cfg["BLOCK_SIZE_M"])
        if proj == "up":
            A = torch.randn(M, self.p.K, device=self.device, generator=self.gen).to(self.act_dtype)
            C = torch.full((M * self.p.topk, 2 * self.p.N), float("nan"), device=self.device, dtype=self.act_dtype)
        else:
            A = torch.randn(M * self.p.topk, self.p.N, device=self.device, generator=self.gen).to(self.act_dtype)
            C = torch.full((M, self.p.topk, self.p.K), float("nan"), device=self.device, dtype=self.act_dtype)
        self.launch(proj, cfg, A, C, w, ids, al)
        if self.device == "cuda":
            torch.cuda.synchronize()
        out = C.float()
        if not bool(torch.isfinite(out).all()):
            return math.inf
        ref = self.reference(proj, A, w, ids).view_as(out)
        return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# base tables


def base_tables(problem: Problem, base_dir: str | None, log=print) -> tuple[dict, dict | None, str]:
    """(up, down or None, source): `base_dir`'s files (a folder of tables, or a configs root with
    triton_x_y_z/ folders); else what sglang's lookup (with the plugin applied) serves now, e.g. the
    PR's tables or another triton version's; else sglang's default config for every key of DEFAULT_MS."""
    if base_dir:
        import triton

        from ..patches.moe_configs import version_dir

        root = Path(base_dir)
        for d in (root / version_dir(triton.__version__), root / "configs" / version_dir(triton.__version__), root):
            p = d / problem.file_name(False)
            if p.exists():
                pd = d / problem.file_name(True)
                return read_table(p), (read_table(pd) if pd.exists() else None), str(p)
        raise FileNotFoundError(f"no {problem.file_name(False)} under {base_dir}")
    from ..bench.common import ensure_server_args

    ensure_server_args()
    import sglang_gemma4_opt

    sglang_gemma4_opt.apply()
    from ..patches import moe_configs as mc

    mod = mc.import_first(mc.MODULE)
    up = mod.get_moe_configs(problem.E, problem.N, problem.dtype, 0, 0, False, False)
    if up:
        down = mod.get_moe_configs(problem.E, problem.N, problem.dtype, 0, 0, False, True)
        return {int(k): dict(v) for k, v in up.items()}, ({int(k): dict(v) for k, v in down.items()}
                                                          if down else None), "sglang lookup (plugin applied)"
    default = {m: dict(mod.get_default_config(m, problem.E, problem.N, problem.K, problem.topk, problem.dtype, False))
               for m in DEFAULT_MS}
    return default, None, "sglang get_default_config (no table)"


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--E", type=int, default=128, help="experts (default: %(default)s)")
    p.add_argument("--N", type=int, default=704, help="intermediate size per TP rank (704 at TP=1, 352 at TP=2)")
    p.add_argument("--K", type=int, default=2816, help="hidden size (default: %(default)s)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights (and activations for fp8)")
    p.add_argument("--ms", type=int, nargs="+", default=list(DEFAULT_MS), metavar="M",
                   help="M keys to tune (default: 1 ... 16384)")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="stop cleanly after this many minutes (most valuable M first); default: no limit")
    p.add_argument("--out-dir", default=None,
                   help="where the tables go (default: the plugin's configs/triton_<version>/ in this checkout)")
    p.add_argument("--state", default=None,
                   help="state file (default: benchmarks/tuning/<shape>.state.json); resumed when it exists")
    p.add_argument("--base-dir", default=None,
                   help="tables to start from and keep for untuned keys (default: what sglang's lookup, with "
                        "the plugin, serves now)")
    p.add_argument("--device-name", default=None, help="device name for file names (default: this GPU's)")
    p.add_argument("--max-block-m", type=int, default=256, choices=BLOCK_MS)
    p.add_argument("--refine-rounds", type=int, default=2)
    p.add_argument("--compile-workers", type=int, default=None,
                   help="threads compiling candidates (default: CPU count; 1 = compile one by one)")
    p.add_argument("--time-ms", type=float, default=20.0, help="replay time per config (default: %(default)s ms)")
    p.add_argument("--rel-tol", type=float, default=None, help="winner check tolerance (bf16 1e-2, fp8 5e-2)")
    p.add_argument("--pipeline-from", type=int, default=256, metavar="M",
                   help="from this M on, re-rank the best pairs by timing sglang's whole fused_experts "
                        "(default: %(default)s; 0 = always, a huge value = never)")
    p.add_argument("--pipeline-pairs", type=int, default=12, help="pairs re-ranked per M (default: %(default)s)")
    p.add_argument("--pipeline-ms", type=float, default=100.0,
                   help="whole-MoE replay time per pair per round (default: %(default)s ms; 2 rounds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-gain", type=float, default=0.03,
                   help="keep the base entry unless the winner is this much faster in the whole-MoE timing "
                        "(default: %(default)s)")
    p.add_argument("--min-gain-kernel", type=float, default=0.01,
                   help="the same for M tuned on kernel timings alone (default: %(default)s)")
    p.add_argument("--refinalize", action="store_true",
                   help="no GPU: re-apply --min-gain/--min-gain-kernel to the state's measurements and rewrite "
                        "the tables (needs --state or --device-name)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (order, candidates per M) and exit")


def default_state_path(problem: Problem) -> Path:
    return Path("benchmarks") / "tuning" / f"{problem.slug()}.state.json"


def _plan(problem: Problem, ms, max_block_m) -> list[list[str]]:
    rows = []
    for m in order_buckets(ms):
        c = coarse_space(m, problem.topk, problem.E, problem.elt_bytes, max_block_m)
        rows.append([str(m), "/".join(map(str, block_m_range(m, problem.topk, problem.E, max_block_m))),
                     str(len(c))])
    return rows


def run(args) -> int:
    from ..bench import common

    dtype = DTYPES[args.dtype]
    device_name = args.device_name
    if device_name is None:
        try:
            import torch

            device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        except Exception:
            device_name = None
    if device_name is None:
        if not (args.dry_run or args.refinalize):
            print("error: tune-moe needs a CUDA GPU (or --dry-run with --device-name)", file=sys.stderr)
            return 2
        device_name = "GPU"
    problem = Problem(args.E, args.N, args.K, args.topk, dtype, device_name)
    if args.dry_run:
        print(f"{problem.file_name()} / {problem.file_name(True)}: tuning order and coarse candidates")
        common.print_table("plan", ["M (in tuning order)", "BLOCK_SIZE_M", "coarse configs"],
                           _plan(problem, args.ms, args.max_block_m))
        return 0
    import triton

    from ..patches.moe_configs import CONFIG_ROOT, version_dir

    out_dir = Path(args.out_dir) if args.out_dir else CONFIG_ROOT / version_dir(triton.__version__)
    state_path = Path(args.state) if args.state else default_state_path(problem)
    if args.refinalize:
        state = State.load(state_path)
        tuner = Tuner(state, None, out_dir=out_dir, min_gain=args.min_gain, min_gain_kernel=args.min_gain_kernel)
        state.data["sessions"].pop()  # not a measuring session
        for m in sorted(int(k) for k in state.data["buckets"]):
            tuner.apply_min_gain(m)
        state.save()
        common.print_table(f"tune-moe --refinalize {state.problem.file_name()}", SUMMARY_COLUMNS, summary_rows(state))
        for p in tuner.write_tables():
            print(f"wrote {p}")
        return 0
    if state_path.exists():
        state = State.load(state_path)
        if state.problem != problem:
            print(f"error: {state_path} is for {state.problem}, not {problem}", file=sys.stderr)
            return 2
        print(f"resuming {state_path}: " + ", ".join(
            f"{p} {sum(len(v) for v in state.data['measured'][p].values())} measured" for p in PROJS))
    else:
        up, down, src = base_tables(problem, args.base_dir)
        state = State.new(state_path, problem, up, down, src, args.ms)
        state.save()
        print(f"new state {state_path}; base tables: {src}")
    state.data["ms"] = sorted(set(state.data["ms"]) | set(args.ms))
    import logging

    logging.getLogger("sglang_gemma4_opt").setLevel(logging.WARNING)
    from ..bench.common import ensure_server_args

    ensure_server_args()
    t0 = time.monotonic()
    backend = KernelBackend(problem, seed=args.seed, time_budget_s=args.time_ms / 1000,
                            compile_workers=args.compile_workers, rel_tol=args.rel_tol,
                            pipeline_budget_s=args.pipeline_ms / 1000)
    v = common.versions()
    tuner = Tuner(state, backend, budget_s=args.budget * 60 if args.budget else None,
                  clock=lambda: time.monotonic() - t0, out_dir=out_dir, max_block_m=args.max_block_m,
                  refine_rounds=args.refine_rounds, progress=common.progress,
                  pipeline_from=args.pipeline_from, pipeline_pairs=args.pipeline_pairs,
                  min_gain=args.min_gain, min_gain_kernel=args.min_gain_kernel)
    tuner.t0 = 0.0  # the budget counts from the start of `run`, weights included
    tuner.session.update(versions=v, device=device_name, command=" ".join(sys.argv), rel_tol=backend.rel_tol,
                         compile_workers=backend.workers)
    res = tuner.run(args.ms)
    common.print_table(f"tune-moe {problem.file_name()} (us per kernel call, CUDA-graph replay)",
                       SUMMARY_COLUMNS, summary_rows(state))
    batches = tuner.session["compiled_batches"]
    if batches:
        n = sum(b["parallel_n"] for b in batches)
        s = sum(b["parallel_s"] for b in batches)
        serial = backend.compile_serial_s
        print(f"compile: {n} configs on {backend.workers} threads in {s:.1f} s ({n / max(s, 1e-9):.1f}/s)"
              + (f"; one by one {serial:.2f} s each ({1 / serial:.1f}/s)" if serial else ""))
    for p in (tuner.write_tables() if tuner.out_dir else []):
        print(f"wrote {p}")
    print(f"state: {state_path}; stopped: {res['stopped'] or 'no (all buckets done)'}; "
          f"not done: {res['left'] or 'none'}")
    return 0
