"""`sglang-gemma4-opt tune-moe`: tune sglang's fused-MoE Triton kernel on this GPU and write its config
tables in sglang's format, named as sglang names them.

    sglang-gemma4-opt tune-moe --N 704 --budget 6                      # Gemma4 26B-A4B, TP=1, bf16
    sglang-gemma4-opt tune-moe --N 352 --budget 6                      # TP=2
    sglang-gemma4-opt tune-moe --N 704 --dry-run                       # the plan, no GPU needed
    sglang-gemma4-opt tune-moe --N 704 --down-tma-only --budget 4      # add the TMA stage to a tuned state
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
* then the TMA stage (where the GPU, triton and sglang have the path: Hopper, triton's
  TensorDescriptor, an sglang whose fused_experts reads USE_TMA; --no-tma leaves it out): the down
  kernel with `"USE_TMA": true`, i.e. as sglang runs it then: the up kernel stores its rows in the
  sorted, block-padded `moe_align_block_size` order (c_sorted; M*topk + min(M*topk, E+1)*(BLOCK_M-1)
  rows), the activation runs over those rows, and the down kernel reads them and w2 through TMA
  descriptors (a_use_tma, b_use_tma). The down kernel is timed that way (sglang's
  `invoke_fused_moe_kernel`, sorted and padded input): the TMA twins of the base entry and of the 6
  (--tma-top) fastest plain down configs of every BLOCK_SIZE_M, the coarse grid on the TMA path, then
  rounds of one-parameter moves around the best TMA configs. USE_TMA goes in the down table only:
  sglang 0.5.11/0.5.12 have no up TMA path (they pass the up entry to the kernel as arguments);
* the written pair has one BLOCK_SIZE_M (sglang asserts it: both kernels walk one
  `moe_align_block_size` layout): the BLOCK_SIZE_M with the least up + down time wins;
* from M=256 on (--pipeline-from), and at every M where TMA downs were timed, up to 12 of the best
  pairs (the base pair included) are re-ranked by timing sglang's whole `fused_experts` (align, up,
  activation, down, sum) with the pair served as its table, interleaved over two rounds of 0.1 s each:
  under sustained load the clocks drop more for some tiles than for others, which the short per-kernel
  timings miss (seen on the H200: kernel-level winners 1.29x faster than the PR's pair at M=16384 were
  1.13x faster in the whole MoE). Plain and TMA pairs take turns in those 12 (best kernel sum first),
  and the bucket's earlier choice is among them when the TMA stage comes to a tuned bucket; the
  kernel timings miss what TMA changes around the down kernel (the sorted up store, the activation over
  the padded rows), so a TMA pair is only ever chosen on this whole-MoE timing;
* the base pair is kept (its entries written verbatim) unless the winner beats it by --min-gain (3%) in
  the whole-MoE timing, or --min-gain-kernel (1%) where only kernels were timed: smaller "gains" are
  run-to-run noise; likewise a TMA pair is written only if it beats the best plain pair of the same
  whole-MoE timing by --min-gain. `--refinalize` re-applies these thresholds to a state file without
  a GPU;
* each winner is checked against a torch float32 reference on fresh random inputs (outputs poisoned
  with NaN first, so an unwritten element fails): relative Frobenius error <= --rel-tol (default 1e-2
  for bf16: bf16 rounding of the output alone is ~2e-3); a failing config is rejected and the next
  best taken. A pair with a TMA down is also checked whole: sglang's `fused_experts` with the pair as
  its table vs a float32 gated-gelu MoE (the final output, not the sorted intermediate; free allocator
  memory filled with NaN first, best effort); a failing pair is rejected (state "pair_checks").

Pruning for Hopper (`block_m_range`, `is_valid`): BLOCK_SIZE_M from next_pow2(2*M*topk/E) down to a
quarter of it, within 16..--max-block-m; BLOCK_N 32..256, BLOCK_K 64..256, GROUP_SIZE_M {1,16,32,64},
num_warps {4,8}, num_stages {2..5}; configs whose pipeline buffers exceed 227 KB of shared memory, 8 warps
on tiles under 64x64 and 4 warps on tiles over 128x128 (accumulator spills) are never compiled.
Configs that still fail to compile or launch are recorded as failed and skipped.

Compiling dominates: candidates are compiled on a thread pool (`triton.AsyncCompileMode`, Triton's
compiler releases the GIL) before they are timed; the state records serial vs parallel compile rates.

Resumable: every measured (projection, M, config) -> median us goes to a state file (JSON, saved after
every compile batch); a rerun with the same state file skips what is measured and continues. Config keys
are "BM,BN,BK,G,W,S", with ",tma" appended for a down config on the TMA path: keys of state files written
before the TMA option mean USE_TMA=False and stay valid. Tables are (re)written after every bucket and at
the end. --budget MINUTES tunes buckets in order of value (prefill M >= 2048 largest first, then M=1,
then the other powers of two downwards, then the rest) and stops cleanly, keeping the best of a
half-searched bucket only if its base entry was timed for both kernels. Keys not tuned keep the base
table's entries, so the written tables are always complete.

--down-tma-only: a pass over an existing state that runs only the TMA stage (and its whole-MoE
re-ranking) in the buckets whose search is done, in the same order of value, within --budget; the plain
search is not extended, and a bucket whose TMA stage the budget cuts keeps its earlier pick (the stage
resumes next time). The whole-MoE ranking the TMA stage replaces is kept as "pipeline_before_tma".
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
TMA_KEY = "USE_TMA"  # down table only: sglang 0.5.11/0.5.12 splat the up entry into the kernel call
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


def make_cfg(bm, bn, bk, g, w, s, tma: bool = False) -> dict:
    c = dict(zip(CFG_KEYS, (bm, bn, bk, g, w, s)))
    if tma:
        c[TMA_KEY] = True
    return c


def uses_tma(cfg: dict) -> bool:
    return bool(cfg.get(TMA_KEY, False))


def normalize(cfg: dict) -> dict:
    """A table entry as the kernel runs it: Triton's defaults (4 warps, 3 stages) where it names none;
    `USE_TMA: True` kept (a false or missing USE_TMA is the same entry: sglang pops it, default False)."""
    out = {k: int(cfg[k]) for k in CFG_KEYS[:3]}
    out["GROUP_SIZE_M"] = int(cfg.get("GROUP_SIZE_M", 1))
    out["num_warps"] = int(cfg.get("num_warps", 4))
    out["num_stages"] = int(cfg.get("num_stages", 3))
    if uses_tma(cfg):
        out[TMA_KEY] = True
    return out


def with_tma(cfg: dict, on: bool = True) -> dict:
    """The same tiles with the down kernel's TMA path on (or off)."""
    c = normalize(cfg)
    c.pop(TMA_KEY, None)
    if on:
        c[TMA_KEY] = True
    return c


def kernel_config(cfg: dict) -> dict:
    """What `invoke_fused_moe_kernel` gets (it splats the dict into the kernel's constexprs): sglang pops
    USE_TMA from the down entry first and passes it as a_use_tma/b_use_tma instead."""
    return {k: v for k, v in cfg.items() if k != TMA_KEY}


def cfg_key(cfg: dict) -> str:
    """"BM,BN,BK,G,W,S", plus ",tma" for a down config on the TMA path. Keys without the suffix (every
    key of a state file written before the TMA option) mean USE_TMA=False."""
    c = normalize(cfg)
    return ",".join(str(c[k]) for k in CFG_KEYS) + (",tma" if c.get(TMA_KEY) else "")


def key_uses_tma(key: str) -> bool:
    return key.endswith(",tma")


def parse_key(key: str) -> dict:
    parts = key.split(",")
    tma = parts[-1] == "tma"
    if tma:
        parts = parts[:-1]
    if len(parts) != len(CFG_KEYS):
        raise ValueError(f"not a config key: {key!r}")
    return make_cfg(*(int(x) for x in parts), tma=tma)


def tma_possible(N: int, elt_bytes: int = 2) -> bool:
    """TMA descriptors need 16-byte aligned row strides: the down kernel's A (tokens, N) and B (E, K, N)."""
    return (N * elt_bytes) % 16 == 0


def total_tokens(M: int, topk: int, E: int, block_m: int) -> int:
    """Rows of sglang's intermediate caches on the TMA down path (`_fused_moe_kernel_sequence`): the up
    kernel stores them in `moe_align_block_size`'s sorted, block-padded order (c_sorted)."""
    return M * topk + min(M * topk, E + 1) * (block_m - 1)


def coarse_space(M: int, topk: int, E: int, elt_bytes: int = 2, max_block_m: int = 256,
                 tma: bool = False) -> list[dict]:
    """First pass at M. Decode sizes (BLOCK_M 16 only): every BLOCK_N/K, warps, stages (the grid is
    small, so tile shape and pipeline depth decide). Larger M: BLOCK_N {64,128,256} x BLOCK_K {64,128} x
    warps {4,8} x stages {3,4}, GROUP_SIZE_M 1; the refinement moves GROUP_SIZE_M and the rest.
    tma=True: the same grid on the down kernel's TMA path."""
    bms = block_m_range(M, topk, E, max_block_m)
    out = []
    if bms == [16]:
        for bn in BLOCK_NS:
            for bk in BLOCK_KS:
                for w in WARPS:
                    for s in STAGES:
                        out.append(make_cfg(16, bn, bk, 1, w, s, tma))
    else:
        for bm in bms:
            for bn in (64, 128, 256):
                for bk in (64, 128):
                    for w in WARPS:
                        for s in (3, 4):
                            out.append(make_cfg(bm, bn, bk, 1, w, s, tma))
    return [c for c in out if is_valid(c, elt_bytes)]


def neighbours(cfg: dict, elt_bytes: int = 2) -> list[dict]:
    """Configs one parameter away (BLOCK_SIZE_M kept: the joint choice compares BLOCK_SIZE_M values;
    USE_TMA kept: the TMA stage refines TMA configs, the search before it plain ones)."""
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


def tma_candidates(down_times: dict[str, float], base_down: dict, M: int, topk: int, E: int, elt_bytes: int = 2,
                   max_block_m: int = 256, top: int = 6) -> list[dict]:
    """First pass of the TMA stage (down kernel): the TMA twin of the base entry, the TMA twins of the
    `top` fastest plain down configs of every BLOCK_SIZE_M measured, then the coarse grid on the TMA
    path (its best tiles may differ: loads are asynchronous)."""
    by_bm: dict[int, list[tuple[float, str]]] = {}
    for k, us in down_times.items():
        if not key_uses_tma(k):
            by_bm.setdefault(parse_key(k)["BLOCK_SIZE_M"], []).append((us, k))
    out = [with_tma(base_down)]
    for bm in sorted(by_bm):
        out += [with_tma(parse_key(k)) for _, k in sorted(by_bm[bm])[:top]]
    out += coarse_space(M, topk, E, elt_bytes, max_block_m, tma=True)
    seen, uniq = set(), []
    for c in out:
        if cfg_key(c) not in seen and is_valid(c, elt_bytes):
            seen.add(cfg_key(c))
            uniq.append(c)
    return uniq


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
    has no down table). USE_TMA only ever lands in the down table: sglang 0.5.11/0.5.12 pass the up
    entry to the kernel as keyword arguments (an up USE_TMA would fail there), and only the down
    kernel has a TMA path in them."""
    up, down = {}, {}
    for m in sorted(set(base_up) | set(tuned)):
        if m in tuned:
            u, d = tuned[m]
            if u["BLOCK_SIZE_M"] != d["BLOCK_SIZE_M"]:
                raise ValueError(f"M={m}: tuned BLOCK_SIZE_M differ ({u['BLOCK_SIZE_M']} vs {d['BLOCK_SIZE_M']})")
            if TMA_KEY in u:
                raise ValueError(f"M={m}: USE_TMA in a tuned up entry (a down-table option)")
            up[m], down[m] = dict(u), dict(d)
            continue
        u = dict(base_up[m])
        d = dict(nearest_entry(base_down, m)) if base_down else dict(u)
        if d.get("BLOCK_SIZE_M") != u.get("BLOCK_SIZE_M"):
            d = dict(u)
        u.pop(TMA_KEY, None)
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
        if proj == "down" and self.base("down"):
            return nearest_entry(self.base("down"), M)
        e = dict(nearest_entry(self.base("up"), M))
        e.pop(TMA_KEY, None)  # an up entry's USE_TMA (sglang 0.5.23+ only) is not what the tuner writes
        return e

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

    def pair_check(self, M: int, up: str, down: str) -> dict | None:
        """Whole-MoE check of an (up, down) pair (pairs with a TMA down: the up kernel's sorted store,
        the activation over the padded rows and the TMA down kernel, through sglang's fused_experts)."""
        return self.data.get("pair_checks", {}).get(str(M), {}).get(f"{up}|{down}")

    def set_pair_check(self, M: int, up: str, down: str, ok: bool, rel_err, why: str = "") -> None:
        self.data.setdefault("pair_checks", {}).setdefault(str(M), {})[f"{up}|{down}"] = {
            "ok": bool(ok), "rel_err": rel_err, "why": why}

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


def _tma_filter(key: str, tma: bool | None) -> bool:
    return tma is None or key_uses_tma(key) == tma


def select_joint(state: State, M: int, tma: bool = False) -> tuple[str, str] | None:
    """(up key, down key) with one BLOCK_SIZE_M and the least up + down time, or None. TMA downs only
    with tma=True: the kernel timings miss what TMA changes around the down kernel (the up kernel's
    sorted store, the activation over the padded rows), so a TMA pair is chosen on the whole MoE."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for proj in PROJS:
        per_bm: dict[int, tuple[float, str]] = {}
        for key, us in state.times(proj, M).items():
            if proj == "down" and not tma and key_uses_tma(key):
                continue
            bm = parse_key(key)["BLOCK_SIZE_M"]
            if bm not in per_bm or us < per_bm[bm][0]:
                per_bm[bm] = (us, key)
        best[proj] = per_bm
    common = set(best["up"]) & set(best["down"])
    if not common:
        return None
    bm = min(common, key=lambda b: (best["up"][b][0] + best["down"][b][0], b))
    return best["up"][bm][1], best["down"][bm][1]


def pipeline_pairs(state: State, M: int, per_bm: int = 2, max_pairs: int = 12,
                   keep: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Pairs for the whole-MoE re-ranking: the base pair first, then the `keep` pairs (the bucket's
    earlier choice, when the TMA stage re-ranks a tuned bucket), then for each BLOCK_SIZE_M every
    combination of its `per_bm` fastest up and down configs, best kernel sum first, up to `max_pairs`.
    Where TMA downs were measured, plain and TMA combinations take turns (plain, TMA, plain, ...), so
    TMA pairs are re-ranked even where their kernel sums trail."""
    times = {p: state.times(p, M) for p in PROJS}
    out: list[tuple[str, str]] = []

    def ok(u, d):
        return (u in times["up"] and d in times["down"]
                and parse_key(u)["BLOCK_SIZE_M"] == parse_key(d)["BLOCK_SIZE_M"])

    bu, bd = cfg_key(state.base_entry("up", M)), cfg_key(state.base_entry("down", M))
    if ok(bu, bd):
        out.append((bu, bd))
    for u, d in keep:
        if u and d and ok(u, d) and (u, d) not in out:
            out.append((u, d))
    lists = []
    for tma in (False, True):
        by_bm: dict[str, dict[int, list[tuple[float, str]]]] = {}
        for proj in PROJS:
            d: dict[int, list[tuple[float, str]]] = {}
            for key, us in times[proj].items():
                if proj == "down" and key_uses_tma(key) != tma:
                    continue
                d.setdefault(parse_key(key)["BLOCK_SIZE_M"], []).append((us, key))
            by_bm[proj] = {bm: sorted(v)[:per_bm] for bm, v in d.items()}
        combos = []
        for bm in set(by_bm["up"]) & set(by_bm["down"]):
            for tu, ku in by_bm["up"][bm]:
                for td, kd in by_bm["down"][bm]:
                    combos.append((tu + td, ku, kd))
        lists.append([(ku, kd) for _, ku, kd in sorted(combos)])
    merged = []
    for i in range(max(len(x) for x in lists)):
        merged += [x[i] for x in lists if i < len(x)]
    for pair in merged:
        if len(out) >= max_pairs:
            break
        if pair not in out:
            out.append(pair)
    return out


def seeds(state: State, proj: str, M: int, top: int = 3, tma: bool | None = None) -> list[dict]:
    """Refinement seeds: the `top` fastest configs and the fastest of every BLOCK_SIZE_M (tma=False:
    plain configs only; True: TMA configs only; None: all)."""
    times = {k: v for k, v in state.times(proj, M).items() if _tma_filter(k, tma)}
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
                 min_gain_kernel: float = 0.01, tma: bool = True, tma_only: bool = False, tma_top: int = 6):
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
        # The TMA stage needs a backend that runs the down kernel's TMA path (Hopper, a triton with
        # TensorDescriptor, an sglang that reads USE_TMA), times the whole MoE and checks whole-MoE pairs.
        self.tma = bool(tma and getattr(backend, "supports_tma", False) and hasattr(backend, "time_pipeline")
                        and hasattr(backend, "check_pair") and tma_possible(self.problem.N, self.problem.elt_bytes))
        self.tma_only = tma_only
        self.tma_top = tma_top
        self.session = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "budget_s": budget_s, "measured": 0, "compiled_batches": [], "buckets": [],
                        "stopped": None, "tma": self.tma, "tma_only": tma_only}
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

    def best_us(self, proj: str, M: int, tma: bool | None = None) -> float:
        t = [us for k, us in self.state.times(proj, M).items() if _tma_filter(k, tma)]
        return min(t) if t else math.inf

    # --- one bucket
    def pending(self, M: int) -> bool:
        """Whether `run` has work at M: the search (not with --down-tma-only), the TMA stage, or the
        whole-MoE stage of a bucket tuned before it existed."""
        b = self.state.bucket(M)
        if b.get("status") != "done":
            return not self.tma_only
        if self.tma and b.get("tma", {}).get("status") != "done":
            return True
        return not self.tma_only and self.wants_pipeline(M) and not b.get("pipeline")

    def tune_bucket(self, M: int) -> None:
        b = self.state.bucket(M)
        if not self.pending(M):
            return
        searched = b.get("status") == "done"  # tuned before: only the TMA (or whole-MoE) stage is new
        self.backend.setup(M)
        try:
            if not searched:
                b["status"] = "partial"
                self.search(M)
            if self.tma:
                self.tma_stage(M)
            self.pipeline(M)
            complete = True
        except BudgetExhausted:
            complete = False
        if searched and not complete:
            self.state.save()  # the bucket keeps its pick; the TMA stage goes on where it stopped next time
            return
        self.finalize(M, complete)

    def search(self, M: int) -> None:
        """Base entries, the coarse grid, rounds of one-parameter moves: plain configs (no TMA)."""
        b = self.state.bucket(M)
        E, topk, elt = self.problem.E, self.problem.topk, self.problem.elt_bytes
        for proj in PROJS:
            self.measure(proj, M, [normalize(self.state.base_entry(proj, M))], "base")
        for proj in PROJS:
            self.measure(proj, M, coarse_space(M, topk, E, elt, self.max_block_m), "coarse")
        rounds = b.setdefault("rounds", [])
        for r in range(self.refine_rounds):
            if r == len(rounds):
                # seeds and the best time before the round are frozen in the state, so a resumed
                # run makes the same moves as an uninterrupted one
                rounds.append({p: {"seeds": [cfg_key(s) for s in seeds(self.state, p, M, tma=False)],
                                   "before": self.best_us(p, M, tma=False)} for p in PROJS})
                self.state.save()
            rd = rounds[r]
            for proj in PROJS:
                cands = [n for s in rd[proj]["seeds"] for n in neighbours(parse_key(s), elt)]
                self.measure(proj, M, cands, f"refine {r + 1}")
            if not any(self.best_us(p, M, tma=False) < rd[p]["before"] for p in PROJS):
                break

    def tma_stage(self, M: int) -> None:
        """The down kernel on sglang's TMA path (`"USE_TMA": true` in the down table): TMA twins of the
        base entry and of the fastest plain down configs, the coarse grid on the TMA path, rounds of
        one-parameter moves around the best TMA configs. Status in the bucket's "tma": todo, partial,
        searched (measured; the whole-MoE re-ranking with TMA pairs still to come), done."""
        b = self.state.bucket(M)
        t = b.setdefault("tma", {"status": "todo"})
        if t["status"] in ("searched", "done"):
            return
        t["status"] = "partial"
        E, topk, elt = self.problem.E, self.problem.topk, self.problem.elt_bytes
        base = normalize(self.state.base_entry("down", M))
        # a deterministic function of the plain measurements, which this stage does not change: a
        # resumed run measures the same candidates
        cands = tma_candidates(self.state.times("down", M), base, M, topk, E, elt, self.max_block_m, self.tma_top)
        self.measure("down", M, cands, "tma")
        rounds = t.setdefault("rounds", [])
        for r in range(self.refine_rounds):
            if r == len(rounds):
                rounds.append({"seeds": [cfg_key(s) for s in seeds(self.state, "down", M, tma=True)],
                               "before": self.best_us("down", M, tma=True)})
                self.state.save()
            rd = rounds[r]
            self.measure("down", M, [n for s in rd["seeds"] for n in neighbours(parse_key(s), elt)],
                         f"tma refine {r + 1}")
            if not self.best_us("down", M, tma=True) < rd["before"]:
                break
        t["status"] = "searched"
        self.state.save()

    def pipeline(self, M: int) -> None:
        """Re-rank the best pairs by the whole fused MoE (sglang's `fused_experts`: align, up, activation,
        down, sum) with the pair served as sglang's table, timed for longer and interleaved: sustained
        load lowers clocks more for some tiles than others, which short kernel timings do not see. After
        the TMA stage it runs again (at any M), with TMA pairs, the base pair and the bucket's earlier
        choice in one interleaved timing; the earlier ranking is kept as "pipeline_before_tma"."""
        b = self.state.bucket(M)
        t = b.get("tma") or {}
        redo = t.get("status") == "searched"
        if redo and not any(key_uses_tma(k) for k in self.state.times("down", M)):
            redo, t["status"] = False, "done"  # no TMA config ran: nothing new to rank
        if not self.wants_pipeline(M) or (b.get("pipeline") and not redo):
            if redo:
                t["status"] = "done"
            return
        keep = [(b.get("up"), b.get("down")), (b.get("best_up"), b.get("best_down"))] if redo else []
        pairs = pipeline_pairs(self.state, M, max_pairs=self.pipeline_max, keep=keep)
        if len(pairs) >= 2:
            self.check_budget()
            us = self.backend.time_pipeline(M, [(parse_key(u), parse_key(d)) for u, d in pairs])
            if redo and b.get("pipeline") and "pipeline_before_tma" not in b:
                b["pipeline_before_tma"] = b["pipeline"]
            b["pipeline"] = [[u, d, round(float(t), 3)] for (u, d), t in zip(pairs, us)]
        if redo:
            t["status"] = "done"
        self.state.save()

    def wants_pipeline(self, M: int) -> bool:
        if not hasattr(self.backend, "time_pipeline"):
            return False
        return M >= self.pipeline_from or any(key_uses_tma(k) for k in self.state.times("down", M))

    def _checked(self, get, put, run, what: str, label: str) -> bool:
        """A check's verdict from the state, running it once when absent: `run()` gives the relative error
        against the float32 reference; `put(ok, rel_err, why)` stores it; `get()` reads it back."""
        if get() is None:
            try:
                rel = float(run())
                ok = math.isfinite(rel) and rel <= self.backend.rel_tol
                why = "" if ok else f"{what}relative error {rel:.3g} > {self.backend.rel_tol:g}"
            except Exception as e:
                rel, ok, why = None, False, f"{type(e).__name__}: {str(e)[:160]}"
            put(ok, rel if rel is None or math.isfinite(rel) else None, why)
            if not ok:
                self.log(f"{label}: rejected ({why})")
        return get()["ok"]

    def _check(self, proj: str, M: int, key: str) -> bool:
        return self._checked(lambda: self.state.check(proj, M, key),
                             lambda ok, rel, why: self.state.set_check(proj, M, key, ok, rel, why),
                             lambda: self.backend.check(proj, M, parse_key(key)), "", f"M={M} {proj} {key}")

    def _check_pair(self, M: int, up: str, down: str) -> bool:
        """Pairs with a TMA down: sglang's whole fused_experts with the pair as its table vs a float32
        MoE (the final output: the sorted intermediate layout is sglang's business)."""
        return self._checked(lambda: self.state.pair_check(M, up, down),
                             lambda ok, rel, why: self.state.set_pair_check(M, up, down, ok, rel, why),
                             lambda: self.backend.check_pair(M, parse_key(up), parse_key(down)), "whole-MoE ",
                             f"M={M} pair {up} | {down}")

    def _pair_ok(self, M: int, up: str, down: str) -> bool:
        return (self._check("up", M, up) and self._check("down", M, down)
                and (not key_uses_tma(down) or self._check_pair(M, up, down)))

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
        sel = plain = None
        for u, d in sorted(pl, key=pl.get):  # whole-MoE ranking first, where there is one
            if sel is not None and key_uses_tma(d):
                continue
            if self._pair_ok(M, u, d):
                if sel is None:
                    sel = (u, d)
                    if not key_uses_tma(d):
                        break
                else:  # a TMA pair won: the best plain pair too, for apply_min_gain
                    plain = (u, d)
                    break
        while sel is None:  # kernel sums: plain pairs only (a TMA pair needs the whole-MoE timing)
            sel = select_joint(self.state, M)
            if sel is None:
                break
            if not self._pair_ok(M, *sel):
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
            b.update(best_up=sel[0], best_down=sel[1], plain_up=plain and plain[0], plain_down=plain and plain[1])
            self.apply_min_gain(M)
        self.state.save()

    def apply_min_gain(self, M: int) -> None:
        """Keep the base pair unless the winner beats it by --min-gain on the whole MoE (where that was
        timed) or --min-gain-kernel on the kernel sum: a smaller "gain" is run-to-run noise (the same
        pair measured 0.98x-1.02x against itself in separate runs), and the base entries are what
        serving runs today. Likewise a TMA pair must beat the best plain pair of the same whole-MoE
        timing (`plain_up`/`plain_down`) by --min-gain, else that plain pair stands in for it. Sets
        `up`/`down` (written) from `best_up`/`best_down` (the search's choice)."""
        b = self.state.bucket(M)
        if not b.get("up"):
            return
        sel = (b.setdefault("best_up", b["up"]), b.setdefault("best_down", b["down"]))
        bu, bd = cfg_key(self.state.base_entry("up", M)), cfg_key(self.state.base_entry("down", M))
        pl = {(u, d): t for u, d, t in b.get("pipeline") or []}
        plain = (b.get("plain_up"), b.get("plain_down"))
        b["tma_below_min_gain"] = bool(key_uses_tma(sel[1]) and sel in pl and plain in pl
                                       and pl[sel] * (1 + self.min_gain) > pl[plain])
        if b["tma_below_min_gain"]:
            sel = plain
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
        c = self.state.pair_check(M, b["up"], b["down"])
        b["moe_rel_err"] = c["rel_err"] if c else None
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
            if not self.pending(M):
                continue
            if self.left() <= self.reserve_s:
                stopped = f"budget spent before M={M}"
                break
            t = self.clock()
            self.tune_bucket(M)
            self.session["buckets"].append({"M": M, "s": round(self.clock() - t, 1),
                                            "status": self.state.bucket(M)["status"]})
            self.write_tables()
            if self.pending(M) and self.left() <= self.reserve_s:
                stopped = f"budget spent during M={M}"
                break
        self.session["stopped"] = stopped
        self.session["seconds"] = round(self.clock() - self.t0, 1)
        self.state.save()
        self.write_tables()
        left = [m for m in order if self.pending(m) or self.state.bucket(m).get("status") != "done"]
        return {"stopped": stopped, "left": left}


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
        tma = (b.get("tma") or {}).get("status")
        status = (b["status"] + (" (base kept)" if b.get("kept_base") else "")
                  + (" (TMA gain < min-gain)" if b.get("tma_below_min_gain") else "")
                  + (f", tma stage {tma}" if tma and tma != "done" else ""))
        rows.append([str(m), status, b["up"], b["down"], f"{base:.1f}", f"{new:.1f}",
                     f"{base / new:.2f}x" if new else "-", f"{pb:.1f}" if pb == pb else "-",
                     f"{pn:.1f}" if pn == pn else "-", f"{pb / pn:.2f}x" if pb == pb and pn == pn else "-",
                     f"{max(b.get('up_rel_err') or 0, b.get('down_rel_err') or 0, b.get('moe_rel_err') or 0):.1e}"])
    return rows


SUMMARY_COLUMNS = ["M", "status", "up cfg (BM,BN,BK,G,W,S)", "down cfg (,tma: TMA path)", "base up+down us",
                   "tuned up+down us", "speedup", "base MoE us", "tuned MoE us", "MoE speedup", "max rel err"]


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
FUSED_MOE_MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe"
# sglang reads USE_TMA from the down entry where its fused_moe module has one of these (0.5.11:
# `_down_moe_use_tma`; 0.5.23: `_moe_support_tma`, which also serves the up table's USE_TMA)
TMA_FLAG_FUNCS = ("_down_moe_use_tma", "_moe_support_tma")


def tma_support(kmod, invoke_params, device: str = "cuda") -> tuple[bool, str]:
    """(whether sglang runs the down kernel on its TMA path here, why not)."""
    if device != "cuda":
        return False, "not a CUDA device"
    import torch

    if torch.cuda.get_device_capability()[0] < 9:
        return False, "TMA needs compute capability 9.0+ (Hopper)"
    f = getattr(kmod, "support_tensor_descriptor", None)
    if f is None or not f():
        return False, "this triton has no triton.tools.tensor_descriptor.TensorDescriptor"
    if not {"a_use_tma", "b_use_tma", "c_sorted"} <= set(invoke_params):
        return False, "this sglang's invoke_fused_moe_kernel has no a_use_tma/b_use_tma/c_sorted"
    try:
        import importlib

        fm = importlib.import_module(FUSED_MOE_MODULE)
    except ImportError as e:
        return False, f"cannot import {FUSED_MOE_MODULE}: {e}"
    flag = next((getattr(fm, n) for n in TMA_FLAG_FUNCS if hasattr(fm, n)), None)
    if flag is None:
        return False, "this sglang's fused_experts does not read USE_TMA"
    if not flag():
        return False, f"sglang's {FUSED_MOE_MODULE} reports no TMA support"
    return True, ""


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

    A down config with USE_TMA runs as `_fused_moe_kernel_sequence` runs it then: A is the intermediate
    in `moe_align_block_size`'s sorted, block-padded order (`total_tokens` rows, as the up kernel stores
    it with c_sorted=True), read through TensorDescriptors (a_use_tma, b_use_tma), same sorted ids and
    expert ids as the plain kernel.

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
        self.supports_tma, self.tma_why_not = tma_support(self.kmod, self.invoke_params, device)

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
        self._sorted = {}
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _aligned_for(self, bm):
        if bm not in self._aligned:
            self._aligned[bm] = [self.aligned(ids, bm) for _, ids in self.routes]
        return self._aligned[bm]

    def total_tokens(self, M, bm):
        return total_tokens(M, self.p.topk, self.p.E, bm)

    def _sorted_buffers(self, bm):
        """TMA path, per BLOCK_SIZE_M: the down kernel's sorted, padded input (total_tokens x N) and the
        up kernel's sorted output (total_tokens x 2N), as `_fused_moe_kernel_sequence` allocates them."""
        if bm not in self._sorted:
            torch = self.torch
            rows = self.total_tokens(self.M, bm)
            self._sorted[bm] = (
                torch.randn(rows, self.p.N, device=self.device, generator=self.gen).to(self.act_dtype),
                torch.empty(rows, 2 * self.p.N, device=self.device, dtype=self.act_dtype))
        return self._sorted[bm]

    def launch(self, proj, cfg, A, C, topk_w, topk_ids, al, c_sorted=False):
        """One kernel launch as `_fused_moe_kernel_sequence` makes it (same arguments, so the same compiled
        kernel). proj "down" with USE_TMA: A must be the sorted intermediate (a_use_tma, b_use_tma);
        c_sorted: the up kernel's store on the TMA path."""
        import triton.language as tl

        sorted_ids, expert_ids, ntpp = al
        up = proj == "up"
        tma = not up and uses_tma(cfg)
        if up and uses_tma(cfg):
            raise ValueError("USE_TMA is a down-table option (sglang 0.5.11/0.5.12 have no up TMA path)")
        kw = dict(A=A, B=self.w13 if up else self.w2, bias=None, C=C, A_scale=None,
                  B_scale=(self.s13 if up else self.s2) if self.fp8 else None, B_zp=None, topk_weights=topk_w,
                  topk_ids=topk_ids, sorted_token_ids=sorted_ids, expert_ids=expert_ids,
                  num_tokens_post_padded=ntpp, mul_routed_weight=not up, top_k=self.p.topk if up else 1,
                  config=kernel_config(cfg),
                  compute_type=tl.bfloat16 if self.act_dtype == self.torch.bfloat16 else tl.float16,
                  use_fp8_w8a8=self.fp8, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
                  per_channel_quant=False, block_shape=None, filter_expert=False,
                  router_topk=1 if up else self.p.topk)  # as fused_experts passes them (same compiled kernel)
        if tma:
            kw.update(a_use_tma=True, b_use_tma=True)
        if up and c_sorted:
            kw.update(c_sorted=True)
        for k in ("a_use_tma", "c_sorted"):
            if k in kw and k not in self.invoke_params:
                raise ValueError(f"this sglang's invoke_fused_moe_kernel has no {k}")
        self.invoke(**{k: v for k, v in kw.items() if k in self.invoke_params})

    def step_fn(self, proj, cfg):
        """Launch i of a captured graph. proj "up_sorted": the up kernel with the TMA path's sorted store
        (compiled for the whole-MoE timing of pairs with a TMA down; not a tuned projection)."""
        bm = cfg["BLOCK_SIZE_M"]
        al = self._aligned_for(bm)
        c_sorted = proj == "up_sorted"
        if proj == "up":
            A, C = self.x, self.c_up
        elif c_sorted:
            A, C = self.x, self._sorted_buffers(bm)[1]
        elif uses_tma(cfg):
            A, C = self._sorted_buffers(bm)[0], self.c_down
        else:
            A, C = self.inter, self.c_down
        kproj = "up" if c_sorted else proj
        routes = self.routes

        def step(i):
            w, ids = routes[i % len(routes)]
            self.launch(kproj, cfg, A, C, w, ids, al[i % len(al)], c_sorted=c_sorted)

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
    @contextlib.contextmanager
    def serving(self, M: int, up: dict, down: dict):
        """Inside: sglang's config lookup serves {M: up} / {M: down} (a fresh dict per call: sglang pops
        USE_TMA from the down entry it gets)."""
        import importlib

        from ..patches.moe_configs import MODULE

        from ..patches.moe_small_batch import stock_path

        cfg_mod = importlib.import_module(MODULE)
        old = cfg_mod.__dict__["get_moe_configs"]
        cfg_mod.get_moe_configs = (lambda E, N, dtype, block_n=0, block_k=0, per_channel_quant=False,
                                   down_moe=False: {M: dict(down if down_moe else up)})
        try:
            with stock_path():  # sglang's kernels, even at the sizes the plugin's small-batch path takes
                yield
        finally:
            cfg_mod.get_moe_configs = old

    def _fused_experts(self):
        from ..bench import fused_moe as bfm

        fused_experts = bfm.fused_experts_fn()
        rcfg = bfm.runner_config(E=self.p.E, N=self.p.N, K=self.p.K, topk=self.p.topk)
        kw = dict(use_fp8_w8a8=True, w1_scale=self.s13, w2_scale=self.s2) if self.fp8 else {}
        return lambda x, w, ids: fused_experts(x, self.w13, self.w2, bfm.topk_output(w, ids), rcfg, **kw)

    def time_pipeline(self, M: int, pairs: list[tuple[dict, dict]]) -> list[float]:
        """us per sglang `fused_experts` call with each (up, down) pair served as sglang's table for M;
        variants interleaved over rounds (the benchmark suite's `time_variants`). A pair with a TMA down
        runs sglang's TMA path end to end (sorted up store, activation over total_tokens rows, TMA down)."""
        from ..bench import common

        moe = self._fused_experts()
        routes, x = self.routes, self.x

        def step(i):
            w, ids = routes[i % len(routes)]
            moe(x, w, ids)

        for proj, i in (("up", 0), ("down", 1)):  # the kernels fused_experts launches, compiled on the pool
            self.precompile(proj, M, [p[i] for p in pairs])
        self.precompile("up_sorted", M, [u for u, d in pairs if uses_tma(d)])
        with self.serving(M, *pairs[0]):
            est = common.estimate_us(step)
        calls = common.calls_for(est, self.max_calls, target_graph_us=2000.0)
        variants = {str(i): (step, (lambda u=u, d=d: self.serving(M, u, d))) for i, (u, d) in enumerate(pairs)}
        t = common.time_variants(variants, calls=calls, rounds=2, budget_s=self.pipeline_budget_s)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        return [t[str(i)].median_us for i in range(len(pairs))]

    def moe_reference(self, x, topk_w, topk_ids):
        """float32 MoE as Gemma4 runs it: gelu(x W_gate^T) * (x W_up^T) -> W_down^T, weighted sum."""
        torch = self.torch
        N = self.p.N
        out = torch.zeros(x.shape[0], self.p.K, dtype=torch.float32, device=x.device)
        xf = x.float()
        for e in torch.unique(topk_ids).tolist():
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            w13 = self.w13[e].float() * (self.s13[e] if self.s13 is not None else 1.0)
            w2 = self.w2[e].float() * (self.s2[e] if self.s2 is not None else 1.0)
            h = xf[tok] @ w13.t()
            a = torch.nn.functional.gelu(h[:, :N]) * h[:, N:]
            out.index_add_(0, tok, (a @ w2.t()) * topk_w[tok, slot, None].float())
        return out

    def check_pair(self, M: int, up: dict, down: dict) -> float:
        """Relative Frobenius error of sglang's whole `fused_experts` with the pair as its table vs the
        float32 MoE, on fresh random inputs; inf if an output is not finite. The allocator's free memory
        is filled with NaN first (best effort), so rows the kernels leave unwritten show."""
        torch = self.torch
        w, ids = self.routing(M)
        x = torch.randn(M, self.p.K, device=self.device, generator=self.gen).to(self.act_dtype)
        moe = self._fused_experts()
        if self.device == "cuda":
            rows = self.total_tokens(M, up["BLOCK_SIZE_M"])
            n = rows * 3 * self.p.N + 2 * M * self.p.topk * self.p.K
            torch.full((n,), float("nan"), device=self.device, dtype=self.act_dtype)  # freed at once
        with self.serving(M, up, down):
            out = moe(x, w, ids)
        if self.device == "cuda":
            torch.cuda.synchronize()
        out = out.float()
        if not bool(torch.isfinite(out).all()):
            return math.inf
        ref = self.moe_reference(x, w, ids)
        return float((out - ref).norm() / ref.norm().clamp_min(1e-30))

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

    def sort_rows(self, A, al, M, bm):
        """A (M*topk rows, slot order) in the TMA path's layout: row p of the result is A[sorted_ids[p]]
        for the valid slots, NaN on the padding rows (sglang leaves them unwritten or computes them from
        unwritten rows: the down kernel must never let them through). fp8_w8a8 (per-tensor): sglang
        quantises the whole padded buffer with one dynamic scale, so garbage there reaches every row;
        the NaN rows make such configs fail the check, on purpose."""
        torch = self.torch
        sorted_ids, _, ntpp = al
        n = int(ntpp.reshape(-1)[0].item())
        out = torch.full((self.total_tokens(M, bm), A.shape[1]), float("nan"), device=A.device, dtype=A.dtype)
        sid = sorted_ids[:n].long()
        pos = torch.nonzero(sid < A.shape[0]).flatten()
        out[pos] = A[sid[pos]]
        return out

    def check(self, proj: str, M: int, cfg: dict) -> float:
        """Relative Frobenius error vs float32 on fresh random inputs; inf if an output is not written.
        A TMA down config reads the sorted, padded layout built from the same random intermediate."""
        torch = self.torch
        w, ids = self.routing(M)
        al = self.aligned(ids, cfg["BLOCK_SIZE_M"])
        if proj == "up":
            A = torch.randn(M, self.p.K, device=self.device, generator=self.gen).to(self.act_dtype)
            C = torch.full((M * self.p.topk, 2 * self.p.N), float("nan"), device=self.device, dtype=self.act_dtype)
        else:
            A = torch.randn(M * self.p.topk, self.p.N, device=self.device, generator=self.gen).to(self.act_dtype)
            C = torch.full((M, self.p.topk, self.p.K), float("nan"), device=self.device, dtype=self.act_dtype)
        A_in = self.sort_rows(A, al, M, cfg["BLOCK_SIZE_M"]) if proj == "down" and uses_tma(cfg) else A
        self.launch(proj, cfg, A_in, C, w, ids, al)
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
    p.add_argument("--no-tma", action="store_true",
                   help="leave the down kernel's TMA path (USE_TMA in the down table) out of the search")
    p.add_argument("--down-tma-only", action="store_true",
                   help="a pass over an existing state: only the TMA stage (TMA down configs, then the whole-MoE "
                        "re-ranking with TMA pairs and the bucket's earlier choice) in the buckets already tuned, "
                        "most valuable M first, within --budget; nothing else is measured")
    p.add_argument("--tma-top", type=int, default=6,
                   help="TMA stage: TMA twins of this many fastest plain down configs per BLOCK_SIZE_M "
                        "(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (order, candidates per M) and exit")


def default_state_path(problem: Problem) -> Path:
    return Path("benchmarks") / "tuning" / f"{problem.slug()}.state.json"


def _plan(problem: Problem, ms, max_block_m, tma: bool = True) -> list[list[str]]:
    rows = []
    tma = tma and tma_possible(problem.N, problem.elt_bytes)
    for m in order_buckets(ms):
        c = coarse_space(m, problem.topk, problem.E, problem.elt_bytes, max_block_m)
        t = coarse_space(m, problem.topk, problem.E, problem.elt_bytes, max_block_m, tma=True) if tma else []
        rows.append([str(m), "/".join(map(str, block_m_range(m, problem.topk, problem.E, max_block_m))),
                     str(len(c)), str(len(t)) if tma else "-"])
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
        common.print_table("plan", ["M (in tuning order)", "BLOCK_SIZE_M", "coarse configs (each kernel)",
                                    "TMA stage coarse (down)"],
                           _plan(problem, args.ms, args.max_block_m, not args.no_tma))
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
    if args.down_tma_only and args.no_tma:
        print("error: --down-tma-only and --no-tma contradict each other", file=sys.stderr)
        return 2
    if args.down_tma_only and not state_path.exists():
        print(f"error: --down-tma-only needs a tuned state ({state_path} does not exist)", file=sys.stderr)
        return 2
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
                  min_gain=args.min_gain, min_gain_kernel=args.min_gain_kernel, tma=not args.no_tma,
                  tma_only=args.down_tma_only, tma_top=args.tma_top)
    tuner.t0 = 0.0  # the budget counts from the start of `run`, weights included
    if not args.no_tma and not tuner.tma:
        why = backend.tma_why_not or f"N={problem.N} rows are not 16-byte aligned"
        if args.down_tma_only:
            state.data["sessions"].pop()
            print(f"error: --down-tma-only: no TMA path here ({why})", file=sys.stderr)
            return 2
        print(f"note: the down kernel's TMA path is left out ({why})")
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
    if args.down_tma_only:
        skipped = [m for m in order_buckets(args.ms) if state.bucket(m).get("status") != "done"]
        if skipped:
            print(f"--down-tma-only: not searched yet, so skipped: {skipped} (a run without it tunes them)")
    return 0
