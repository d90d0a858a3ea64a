"""`sglang-gemma4-opt bench-e2e`: the whole Gemma4 26B-A4B model (dummy weights) in several plugin
modes, each in its own process, through sglang's `bench_one_batch`, compared in pairs.

    sglang-gemma4-opt bench-e2e                              # off vs on: bs 1 16 64, input 1024, output 64, TP 1
    sglang-gemma4-opt bench-e2e --batch-sizes 16 --tp 2
    sglang-gemma4-opt bench-e2e --modes off on no-attn on-pr-moe pr       # every optimisation isolated
    sglang-gemma4-opt bench-e2e --modes no-attn on --batch-sizes 1 --input-len 8192

Modes (the environment each process gets; `SGLANG_GEMMA4_OPT_DISABLE` turns single patches off):
    off        SGLANG_GEMMA4_OPT=0: stock sglang
    pr         sglang PR #26588's state: the plugin without `extend_attention_kernel` (the plugin's own
               Hopper kernel), `moe_configs` and `moe_small_batch`, sglang reading its MoE tables from a folder
               that holds sglang's own tables with the PR's on top (SGLANG_MOE_CONFIG_DIR)
    on-pr-moe  every plugin patch but `moe_configs` and `moe_small_batch` (the plugin's decode MoE
               kernels), the PR's MoE tables as for `pr` (sglang's MoE kernels with the PR's tables)
    no-attn    every plugin patch but `extend_attention_kernel` (the plugin's MoE tables)
    no-small-moe  every plugin patch but `moe_small_batch` (sglang's MoE kernels at every batch size)
    no-grouped-moe  every plugin patch, its prefill MoE path off (switch `moe_grouped`)
    no-hd512-gluon  every plugin patch, head dim 512 attention on the Triton kernel instead of the Gluon one
                    (switch `extend_attention_hd512`)
    on         every plugin patch
The PR's tables come from `--pr-moe-tables` (default `benchmarks/baselines/pr26588`, a folder of
`triton_<ver>/E=...json`). Where the PR has no table for the GPU (it has only H200 ones), `pr` and
`on-pr-moe` run sglang's own lookup: each mode's record says which MoE tables its process logged.
The modes set SGLANG_GEMMA4_OPT and SGLANG_GEMMA4_OPT_DISABLE themselves (an inherited value is
replaced); an inherited SGLANG_MOE_CONFIG_DIR is kept, and is the base the PR's tables go on top of.

Pairs (`--compare A:B`, baseline A, candidate B; one record per pair, batch size and phase): by
default every mode against `off` when `off` ran, plus on-pr-moe:on and no-attn:on when both ran (and
the first mode against each other one when none of these applies).

Each mode runs `python -m sglang_gemma4_opt.bench.one_batch` (bench_one_batch after load_plugins(),
which plain `python -m sglang.bench_one_batch` skips), `--load-format dummy --attention-backend
triton`, on a model folder this command writes (`sglang_gemma4_opt.tools.dummy_model`: config.json
with the real shape, a tiny tokenizer).

Warm-up: bench_one_batch warms up once, with the first batch size only. Triton compiles a kernel the
first time it meets a new config, and the fused-MoE config depends on the token count, so the first
prefill at every other batch size would include compilation. So the sweep is passed `--passes` times
(default 3: 1 16 64 1 16 64 1 16 64); the first pass is discarded and the median of the others recorded.
Decode runs from CUDA graphs captured at start-up; its latency is the median over the output tokens.

Results: `<out>/e2e-<GPU>.json` for input 1024, `<out>/e2e-in<L>-<GPU>.json` for other input lengths
(`-tp<N>` added for TP > 1),
rewritten after every mode (a run stopped half-way keeps the pairs it finished). Records already in
the file whose case and modes this run does not measure are kept, so runs of other mode pairs or
batch sizes land next to each other; each record carries the timestamp of its run, and the header
lists the runs (command, modes) whose records the file holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import common
from .one_batch import STATUS_PREFIX

SUITE = "e2e"
ENV_ENABLE, ENV_DISABLE, ENV_MOE_DIR = "SGLANG_GEMMA4_OPT", "SGLANG_GEMMA4_OPT_DISABLE", "SGLANG_MOE_CONFIG_DIR"
ATTN_PATCH, MOE_PATCH, SMALL_MOE_PATCH = "extend_attention_kernel", "moe_configs", "moe_small_batch"
GROUPED_MOE_SWITCH = "moe_grouped"  # the prefill path inside moe_small_batch (patches/moe_small_batch.py)
HD512_SWITCH = "extend_attention_hd512"  # the Gluon head-dim-512 kernel inside extend_attention_kernel
PR_MOE_TABLES = Path("benchmarks") / "baselines" / "pr26588"  # relative to the working directory or the repo
DEFAULT_INPUT_LEN = 1024  # its results file has no input-length tag (e2e-<GPU>.json)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    label: str  # the record's baseline/candidate text
    enabled: bool  # SGLANG_GEMMA4_OPT
    disable: tuple[str, ...] = ()  # SGLANG_GEMMA4_OPT_DISABLE
    pr_moe: bool = False  # sglang reads the PR's MoE tables (moe_configs is then in `disable`)


MODES = {m.name: m for m in (
    Mode("off", "plugin off (SGLANG_GEMMA4_OPT=0)", False),
    Mode("pr", "PR #26588 state (plugin without extend_attention_kernel, PR's MoE tables)", True,
         (ATTN_PATCH, MOE_PATCH, SMALL_MOE_PATCH), True),
    Mode("on-pr-moe", "plugin on with PR #26588's MoE tables", True, (MOE_PATCH, SMALL_MOE_PATCH), True),
    Mode("no-attn", "plugin on without extend_attention_kernel", True, (ATTN_PATCH,)),
    Mode("no-small-moe", "plugin on without moe_small_batch", True, (SMALL_MOE_PATCH,)),
    Mode("no-grouped-moe", "plugin on without the grouped prefill MoE", True, (GROUPED_MOE_SWITCH,)),
    Mode("no-hd512-gluon", "plugin on without the Gluon head-dim-512 attention", True, (HD512_SWITCH,)),
    Mode("on", "plugin on", True),
)}
MODE_ORDER = tuple(MODES)  # off -> pr -> ... -> on: how the report orders columns

_PREFILL_RE = re.compile(r"^Prefill\. latency: ([0-9.]+) s")
_DECODE_RE = re.compile(r"^Decode\.\s+median latency: ([0-9.]+) s")
# sglang: "Using MoE kernel config from PATH." / the plugin: "... from PATH (sglang-gemma4-opt, pid N)."; both
# fallbacks: "Config file not found at PATH. Fallback to ... config from PATH"; no table at all: "Using
# default MoE kernel config. ... Config file not found at PATH". Searched anywhere in a line (tqdm's
# carriage returns put log lines after progress bars).
_MOE_USED_RE = re.compile(r"MoE kernel config from (\S+?\.json)")
_MOE_MISSING_RE = re.compile(r"Config file not found at (\S+?\.json)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=DEFAULT_INPUT_LEN)
    p.add_argument("--output-len", type=int, default=64, help="decode steps + 1 (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size passed to bench_one_batch")
    p.add_argument("--passes", type=int, default=3,
                   help="sweeps over the batch sizes in one process; the first is discarded, the median of the "
                        "rest recorded (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["off", "on"], choices=list(MODES),
                   help="processes to run, in this order (default: off on): off = stock sglang; pr = PR #26588's state "
                        "(plugin without extend_attention_kernel, PR's MoE tables); on-pr-moe = plugin with the PR's "
                        "MoE tables; no-attn = plugin without extend_attention_kernel; no-small-moe = plugin without "
                        "moe_small_batch; no-grouped-moe = plugin without its prefill MoE path; no-hd512-gluon = plugin "
                        "without its Gluon head-dim-512 attention; on = plugin")
    p.add_argument("--compare", nargs="+", default=None, metavar="A:B",
                   help="baseline:candidate mode pairs to record (default: every mode vs off when off runs, plus "
                        "on-pr-moe:on, no-attn:on, no-small-moe:on, no-grouped-moe:on and no-hd512-gluon:on when both ends "
                        "run)")
    p.add_argument("--pr-moe-tables", default=None, metavar="DIR",
                   help="PR #26588's MoE tables, a folder of triton_<ver>/E=...json, for the pr and on-pr-moe modes "
                        f"(default: {PR_MOE_TABLES} in the working directory or the repo)")
    p.add_argument("--model-dir", default=None, help="where to write the dummy model (default: a temp folder)")
    p.add_argument("--mem-fraction-static", type=float, default=0.8,
                   help="passed to bench_one_batch (default: %(default)s; on an 80 GB GPU batch 64 x 1024 needs 0.85: "
                        "at 0.8 the sliding-window KV pool is smaller than the batch and decode fails)")
    p.add_argument("--cuda-graph-max-bs", type=int, default=None,
                   help="default: the largest batch size (bench_one_batch sets this itself anyway)")
    p.add_argument("--cuda-graph-bs", type=int, nargs="+", default=None,
                   help="decode batch sizes to capture (default: the batch sizes benchmarked, so start-up captures "
                        "and compiles 3 graphs instead of sglang's 13 up to 64; decode runs unpadded either way)")
    p.add_argument("--extra-args", default="",
                   help="more bench_one_batch/server arguments as one string; write it --extra-args=\"--flag ...\"")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per process (default: %(default)s)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder (default: %(default)s)")
    p.add_argument("--log-dir", default=None, help="bench_one_batch logs (default: the results folder)")
    p.add_argument("--quiet", action="store_true", help="do not echo bench_one_batch's output")


# ---------------------------------------------------------------------------------------------
# modes, pairs, MoE tables


def resolve_pairs(modes: list[str], compare: list[str] | None) -> list[tuple[str, str]]:
    """(baseline, candidate) mode pairs, checked against the modes that run; ValueError if one cannot be."""
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes lists a mode twice: {' '.join(modes)}")
    if compare:
        pairs = []
        for spec in compare:
            a, sep, b = spec.partition(":")
            if not sep or not a or not b:
                raise ValueError(f"--compare {spec!r}: write BASELINE:CANDIDATE, e.g. off:on")
            for m in (a, b):
                if m not in MODES:
                    raise ValueError(f"--compare {spec!r}: unknown mode {m!r} (modes: {', '.join(MODES)})")
                if m not in modes:
                    raise ValueError(f"--compare {spec!r}: mode {m!r} is not in --modes ({' '.join(modes)})")
            if a == b:
                raise ValueError(f"--compare {spec!r}: a mode against itself")
            if (a, b) not in pairs:
                pairs.append((a, b))
        return pairs
    pairs = [("off", m) for m in modes if m != "off"] if "off" in modes else []
    for a, b in (("on-pr-moe", "on"), ("no-attn", "on"), ("no-small-moe", "on"), ("no-grouped-moe", "on"),
                 ("no-hd512-gluon", "on")):
        if a in modes and b in modes and (a, b) not in pairs:
            pairs.append((a, b))
    if not pairs and len(modes) > 1:
        pairs = [(modes[0], m) for m in modes[1:]]
    return pairs


def find_pr_tables(given: str | None) -> Path | None:
    """--pr-moe-tables, or benchmarks/baselines/pr26588 in the working directory or the repo checkout."""
    if given:
        return Path(given)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / PR_MOE_TABLES).is_dir():
            return base / PR_MOE_TABLES
    return None


def pr_table_files(pr_dir: Path) -> list[Path]:
    return sorted(pr_dir.glob("triton_*/*.json")) if pr_dir.is_dir() else []


def sglang_moe_dir() -> Path | None:
    """The folder whose `configs/triton_<ver>/` sglang reads MoE tables from when SGLANG_MOE_CONFIG_DIR is
    unset: the folder of its fused_moe_triton_config module (found without importing sglang)."""
    from ..patches.moe_configs import MODULE

    spec = importlib.util.find_spec("sglang")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    parts = MODULE.split(".")[1:]  # below the sglang package
    for root in roots:
        f = root.joinpath(*parts[:-1], parts[-1] + ".py")
        if f.exists():
            return f.resolve().parent
    for root in roots:  # moved: look for it
        for f in root.rglob(parts[-1] + ".py"):
            return f.resolve().parent
    return None


def build_pr_moe_dir(pr_dir: Path, base_dir: Path | None, dest: Path) -> dict:
    """dest/configs/triton_<ver>/: sglang's own tables (base_dir/configs, linked) with the PR's on top, the
    tree a sglang with PR #26588 merged would read. Returns what went in."""
    configs = dest / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    base = base_dir / "configs" if base_dir is not None else None
    pr_files = pr_table_files(pr_dir)
    pr_vdirs = sorted({f.parent.name for f in pr_files})
    if base is not None and base.is_dir():
        for entry in sorted(base.iterdir()):
            if entry.name not in pr_vdirs:
                (configs / entry.name).symlink_to(entry.resolve())
    replaced = []
    for v in pr_vdirs:
        d = configs / v
        d.mkdir(exist_ok=True)
        if base is not None and (base / v).is_dir():
            for f in sorted((base / v).iterdir()):
                (d / f.name).symlink_to(f.resolve())
    for f in pr_files:
        link = configs / f.parent.name / f.name
        if link.is_symlink() or link.exists():
            replaced.append(f"{f.parent.name}/{f.name}")
            link.unlink()
        link.symlink_to(f.resolve())
    return {"dir": str(dest), "pr_tables": str(pr_dir), "sglang_tables": str(base) if base else None,
            "pr_files": [f"{f.parent.name}/{f.name}" for f in pr_files], "replaced_sglang_files": replaced}


def mode_env(mode: str, base_env: dict, pr_moe_dir: str | None) -> dict[str, str | None]:
    """The variables a mode sets (None: removed from the process's environment)."""
    m = MODES[mode]
    env: dict[str, str | None] = {ENV_ENABLE: "1" if m.enabled else "0", ENV_DISABLE: ",".join(m.disable) or None}
    if m.pr_moe:
        if not pr_moe_dir:
            raise ValueError(f"mode {mode} needs the PR's MoE tables")
        env[ENV_MOE_DIR] = pr_moe_dir
    else:
        env[ENV_MOE_DIR] = base_env.get(ENV_MOE_DIR)  # inherited (recorded), or unset
    return env


def apply_env(base_env: dict, overrides: dict[str, str | None]) -> dict:
    env = dict(base_env)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


PR_NO_TABLE = "the PR has no table for"  # in a record's moe_tables note; the report reads it back


def moe_tables_note(mode: str, gpu: str | None, pr_dir: Path | None) -> str:
    """Which MoE tables a mode means to use, in words (the record also lists the files its process logged)."""
    m = MODES[mode]
    if not m.enabled or (MOE_PATCH in m.disable and not m.pr_moe):
        return "sglang's own lookup"
    if not m.pr_moe:
        return "the plugin's tables (moe_configs patch), sglang's lookup for shapes it has none for"
    note = f"PR #26588's tables ({_shown(pr_dir)}) over sglang's own (SGLANG_MOE_CONFIG_DIR; moe_configs patch off)"
    if gpu and pr_dir is not None and not pr_has_gpu(pr_dir, gpu):
        note += f"; {PR_NO_TABLE} {gpu}, so this is sglang's own lookup"
    return note


def _shown(p: Path | None) -> str:
    """A path as the record shows it: relative to the working directory (the repo on the GPU host) if inside."""
    if p is None:
        return "?"
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def pr_has_gpu(pr_dir: Path, gpu: str) -> bool:
    dev = re.escape(gpu.replace(" ", "_"))  # sglang's get_device_name().replace(" ", "_")
    return any(re.search(rf"device_name={dev}(_down)?\.json$", f.name) for f in pr_table_files(pr_dir))


def parse_moe_tables(text: str, roots: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """MoE table files a bench_one_batch log says it used or looked for in vain, in order, once each;
    paths under a known root are written `root/triton_<ver>/file` (symlinks resolved first)."""
    used: list[str] = []
    missing: list[str] = []
    for line in text.splitlines():
        for rx, dst in ((_MOE_USED_RE, used), (_MOE_MISSING_RE, missing)):
            for p in rx.findall(line):
                s = short_table_path(p, roots or {}, resolve=dst is used)
                if s not in dst:
                    dst.append(s)
    return {"used": used, "missing": missing}


def short_table_path(p: str, roots: dict[str, Path], resolve: bool = True) -> str:
    path = Path(p)
    if resolve:
        try:
            path = path.resolve()
        except OSError:
            pass
    for name, root in roots.items():
        for r in {root, root.resolve()}:
            try:
                return f"{name}/{path.relative_to(r)}"
            except ValueError:
                continue
    if not resolve:  # a file looked for in vain: where does not matter much, which file does
        return f"{path.parent.name}/{path.name}"
    return str(path)


# ---------------------------------------------------------------------------------------------
# one process per mode


def build_command(args, model_dir: Path, result_file: Path, mode: str) -> list[str]:
    bs = [str(b) for b in args.batch_sizes] * max(1, args.passes)
    cmd = [sys.executable, "-u", "-m", "sglang_gemma4_opt.bench.one_batch",
           "--model-path", str(model_dir), "--load-format", "dummy", "--attention-backend", "triton",
           "--tp-size", str(args.tp), "--mem-fraction-static", str(args.mem_fraction_static),
           "--cuda-graph-max-bs", str(args.cuda_graph_max_bs or max(args.batch_sizes)),
           "--cuda-graph-bs", *[str(b) for b in (args.cuda_graph_bs or sorted(set(args.batch_sizes)))],
           "--batch-size", *bs, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--run-name", f"plugin-{mode}", "--result-filename", str(result_file)]
    return cmd + shlex.split(args.extra_args)


def parse_output(text: str) -> tuple[dict | None, list[dict]]:
    """(G4OPT_STATUS JSON, [{'prefill_latency': s, 'median_decode_latency': s}, ...] in sweep order)
    from bench_one_batch's stdout; the warm-up run is the first pair printed and is dropped."""
    status = None
    runs: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(STATUS_PREFIX) and status is None:
            try:
                status = json.loads(line[len(STATUS_PREFIX):])
            except ValueError:
                pass
        m = _PREFILL_RE.match(line)
        if m:
            runs.append({"prefill_latency": float(m.group(1))})
            continue
        m = _DECODE_RE.match(line)
        if m and runs:
            runs[-1]["median_decode_latency"] = float(m.group(1))
    return status, runs[1:]  # bench_one_batch's own warm-up prints first


def read_result_file(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def per_batch(runs: list[dict], batch_sizes: list[int], passes: int) -> dict[int, dict[str, list[float]]]:
    """Group sweep results by batch size, dropping each size's first pass when there are several."""
    order = list(batch_sizes) * max(1, passes)
    if runs and "batch_size" not in runs[0]:
        runs = [dict(r, batch_size=b) for r, b in zip(runs, order)]
    seen: dict[int, int] = {}
    out: dict[int, dict[str, list[float]]] = {}
    for r in runs:
        b = int(r["batch_size"])
        seen[b] = seen.get(b, 0) + 1
        if passes > 1 and seen[b] == 1:
            continue  # first pass: may include Triton compiling this size's configs
        d = out.setdefault(b, {"prefill": [], "decode": []})
        if r.get("prefill_latency") is not None:
            d["prefill"].append(float(r["prefill_latency"]))
        if r.get("median_decode_latency") is not None:
            d["decode"].append(float(r["median_decode_latency"]))
    return out


def file_tag(input_len: int, tp: int = 1) -> str:
    """Names of the results file and the logs: '' for the default input length at TP 1, '-in8192' for
    another input length, '-tp2' for another TP size (one GPU's rows and a TP group's stay in separate files)."""
    return ("" if input_len == DEFAULT_INPUT_LEN else f"-in{input_len}") + ("" if tp == 1 else f"-tp{tp}")


def run_mode(args, mode: str, model_dir: Path, log_dir: Path, env_overrides: dict[str, str | None],
             roots: dict[str, Path] | None = None) -> dict:
    tag = file_tag(args.input_len, args.tp)
    result_file = log_dir / f"e2e{tag}-{mode}.jsonl"
    log_file = log_dir / f"e2e{tag}-{mode}.log"
    result_file.unlink(missing_ok=True)  # bench_one_batch appends
    env = apply_env(dict(os.environ, PYTHONUNBUFFERED="1"), env_overrides)
    cmd = build_command(args, model_dir, result_file, mode)
    shown = " ".join(f"{k}={v}" if v is not None else f"-u {k}" for k, v in env_overrides.items()
                     if v is not None or k in os.environ)
    print(f"[{mode}] {shown} " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    lines = []
    with open(log_file, "w") as log:
        # Own process group, so a timeout also ends the TP workers and compile helpers it started.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        _LIVE.add(proc)
        timer = threading.Timer(args.timeout, _kill_group, (proc, mode, args.timeout))
        timer.start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line)
                log.write(line)
                log.flush()
                if not args.quiet:
                    sys.stdout.write(f"[{mode}] {line}")
                    sys.stdout.flush()
        finally:
            rc = proc.wait()
            timer.cancel()
            _LIVE.discard(proc)
            _kill_group(proc, mode, None)  # leftovers of the run (TP workers, compile workers), if any
    text = "".join(lines)
    status, printed = parse_output(text)
    runs = read_result_file(result_file) or printed
    return {"mode": mode, "rc": rc, "seconds": time.time() - t0, "status": status, "runs": runs,
            "from": "result file" if result_file.exists() else "stdout", "log": str(log_file),
            "env": env_overrides, "moe_tables_logged": parse_moe_tables(text, roots)}


# bench_one_batch runs in its own session (so a timeout can end its whole process group); these are
# the ones still running, ended if this process is itself terminated.
_LIVE: set = set()


def _kill_group(proc, mode, timeout):
    if timeout is not None:
        print(f"[{mode}] killed after {timeout:.0f} s", file=sys.stderr, flush=True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        if proc.poll() is None:
            proc.kill()


def _on_terminate(signum, frame):
    for proc in list(_LIVE):
        _kill_group(proc, "e2e", None)
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------
# records and the results file


def _gpu(results: dict[str, dict]) -> str:
    for r in results.values():
        g = (r.get("status") or {}).get("gpu")
        if g:
            return re.sub(r" \(sm\d+\)$", "", g)  # cli.gpu_name() appends the compute capability
    return "unknown GPU"


def _patch_status(r: dict) -> dict:
    return {k: v.get("status") for k, v in ((r.get("status") or {}).get("patches") or {}).items()}


def make_records(args, results: dict[str, dict], pairs: list[tuple[str, str]] | None = None,
                 timestamp: str | None = None, pr_dir: Path | None = None) -> list[dict]:
    """One record per (pair, batch size, phase) whose two modes both have timings."""
    if pairs is None:
        pairs = [("off", "on")]
    gpu = _gpu(results)
    grouped = {m: per_batch(r["runs"], args.batch_sizes, args.passes) for m, r in results.items()}
    recs = []
    for a_mode, c_mode in pairs:
        a_res, c_res = results.get(a_mode), results.get(c_mode)
        if not a_res or not c_res:
            continue
        for b in args.batch_sizes:
            for phase in ("prefill", "decode"):
                a, c = grouped[a_mode].get(b, {}).get(phase), grouped[c_mode].get(b, {}).get(phase)
                if not a or not c:
                    continue
                a_us, c_us = statistics.median(a) * 1e6, statistics.median(c) * 1e6
                rec = common.record(
                    SUITE, {"batch": b, "input_len": args.input_len, "output_len": args.output_len, "phase": phase,
                            "tp": args.tp},
                    MODES[a_mode].label, MODES[c_mode].label, a_us, c_us, gpu=gpu,
                    baseline_mode=a_mode, candidate_mode=c_mode,
                    baseline_ms=a_us / 1e3, candidate_ms=c_us / 1e3, latency_change=c_us / a_us - 1,
                    baseline_runs_us=[x * 1e6 for x in a], candidate_runs_us=[x * 1e6 for x in c],
                    timing=("wall clock around one prefill forward" if phase == "prefill"
                            else "median wall clock of the decode steps (CUDA graphs)"),
                    model="Gemma4 26B-A4B config, dummy weights (--load-format dummy), attention backend triton",
                    plugin_status=_patch_status(c_res), baseline_plugin_status=_patch_status(a_res),
                    baseline_env=_env_for_record(a_res), candidate_env=_env_for_record(c_res),
                    baseline_moe_tables=_moe_tables(a_res, a_mode, gpu, pr_dir),
                    candidate_moe_tables=_moe_tables(c_res, c_mode, gpu, pr_dir),
                    passes=args.passes,
                )
                if timestamp:
                    rec["timestamp"] = timestamp
                st = c_res.get("status") or a_res.get("status") or {}
                if st.get("versions"):
                    for k in ("sglang", "triton", "torch"):
                        rec[k] = st["versions"].get(k, rec[k])
                recs.append(rec)
    return recs


def _env_for_record(r: dict) -> dict:
    """The mode's variables as the process saw them (a PR-table folder is a temp path: named, not kept)."""
    env = dict(r.get("env") or {})
    if env.get(ENV_MOE_DIR) and r.get("pr_moe_dir") and env[ENV_MOE_DIR] == r["pr_moe_dir"]:
        env[ENV_MOE_DIR] = "<PR #26588's tables over sglang's, a temp folder>"
    return env


def _moe_tables(r: dict, mode: str, gpu: str, pr_dir: Path | None) -> dict:
    """Which MoE tables the mode meant to use (note) and which files its process logged (used, missing)."""
    return {"note": moe_tables_note(mode, gpu, pr_dir), **(r.get("moe_tables_logged") or {"used": [], "missing": []})}


def record_key(r: dict) -> str:
    """What a record measures: its case and its two modes (records from before modes existed: off -> on)."""
    return json.dumps([r.get("gpu"), r.get("case"), r.get("baseline_mode", "off"), r.get("candidate_mode", "on")],
                      sort_keys=True)


def results_path(out: Path, gpu: str, input_len: int, tp: int = 1) -> Path:
    return out / f"{SUITE}{file_tag(input_len, tp)}-{common.slug(gpu)}.json"


def write_merged(path: Path, records: list[dict], header: dict) -> list[dict]:
    """Write `records` into the results file at `path`, keeping its other records (other cases or mode pairs)
    and the runs they came from in header["runs"]; returns every record written."""
    old_header: dict = {}
    old: list[dict] = []
    if path.exists():
        try:
            old_header, old = common.load_results(path)
        except (OSError, ValueError) as e:
            print(f"warning: cannot read {path} ({e}); replacing it", file=sys.stderr)
    new_keys = {record_key(r) for r in records}
    kept = []
    for r in old:
        if record_key(r) in new_keys:
            continue
        r = dict(r)
        r.setdefault("timestamp", old_header.get("timestamp"))
        kept.append(r)
    runs = {run.get("timestamp"): run for run in old_header.get("runs") or []}
    if old_header and old_header.get("timestamp") not in runs:
        runs[old_header.get("timestamp")] = _run_summary(old_header)
    this = _run_summary(header)
    runs[this["timestamp"]] = this
    live = {r.get("timestamp") for r in kept + records}
    header = dict(header, runs=sorted((v for k, v in runs.items() if k in live), key=lambda v: str(v["timestamp"])))
    all_recs = kept + records
    common.write_json_atomic(path, {"header": dict(header, suite=SUITE, gpu=(records or all_recs)[0]["gpu"]),
                                    "records": all_recs})
    return all_recs


def _run_summary(h: dict) -> dict:
    modes = {}
    for m, r in (h.get("modes") or {}).items():
        modes[m] = {k: r.get(k) for k in ("rc", "seconds", "env", "moe_tables_logged") if k in r}
    return {"timestamp": h.get("timestamp"), "command": h.get("command"), "modes": modes}


# ---------------------------------------------------------------------------------------------


def run(args) -> int:
    if args.output_len < 2:
        print("error: --output-len must be >= 2 (decode latency is measured from the 2nd token)", file=sys.stderr)
        return 2
    try:
        pairs = resolve_pairs(args.modes, args.compare)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pr_dir = find_pr_tables(args.pr_moe_tables)
    need_pr = [m for m in args.modes if MODES[m].pr_moe]
    if need_pr and (pr_dir is None or not pr_table_files(pr_dir)):
        where = pr_dir if pr_dir is not None else f"{PR_MOE_TABLES} (in {Path.cwd()} or the repo)"
        print(f"error: mode(s) {', '.join(need_pr)} need PR #26588's MoE tables, a folder of triton_<ver>/E=...json: "
              f"none at {where}; pass --pr-moe-tables DIR", file=sys.stderr)
        return 2
    if os.environ.get(ENV_ENABLE) is not None or os.environ.get(ENV_DISABLE):
        print(f"note: the modes set {ENV_ENABLE} and {ENV_DISABLE} themselves; the inherited values "
              f"({ENV_ENABLE}={os.environ.get(ENV_ENABLE)!r}, {ENV_DISABLE}={os.environ.get(ENV_DISABLE)!r}) "
              "are not used", file=sys.stderr)
    if os.environ.get(ENV_MOE_DIR):
        print(f"note: inherited {ENV_MOE_DIR}={os.environ[ENV_MOE_DIR]} applies to every mode (under the PR's "
              "tables in pr/on-pr-moe)", file=sys.stderr)
    out = Path(args.out)
    log_dir = Path(args.log_dir) if args.log_dir else out
    log_dir.mkdir(parents=True, exist_ok=True)
    # The Gemma4 26B-A4B folder the project writes for dummy-weight runs (the shape that ran on the GPU host).
    from ..tools.dummy_model import target_config, write_folder

    from ..patches.moe_configs import CONFIG_ROOT

    tmps = []
    if args.model_dir:
        model_dir = write_folder(args.model_dir, target_config())
    else:
        tmps.append(tempfile.TemporaryDirectory(prefix="gemma4-dummy-"))
        model_dir = write_folder(tmps[-1].name, target_config())
    header = common.env_header()
    header.update(model_dir=str(model_dir), pairs=[f"{a}:{b}" for a, b in pairs],
                  mode_labels={m: MODES[m].label for m in args.modes})
    # Where sglang reads its own MoE tables (an inherited SGLANG_MOE_CONFIG_DIR, else its package folder); the
    # log's table paths are shown relative to these roots.
    base = Path(os.environ[ENV_MOE_DIR]) if os.environ.get(ENV_MOE_DIR) else sglang_moe_dir()
    roots: dict[str, Path] = {"plugin": CONFIG_ROOT}
    if base is not None:
        roots["sglang"] = (base / "configs").resolve()
    pr_moe = None
    if need_pr:
        assert pr_dir is not None
        tmps.append(tempfile.TemporaryDirectory(prefix="gemma4-pr-moe-"))
        pr_moe = build_pr_moe_dir(pr_dir, base, Path(tmps[-1].name))
        header["pr_moe_tables"] = {k: v for k, v in pr_moe.items() if k != "dir"}
        roots = {"pr26588": pr_dir.resolve(), **roots}
        print(f"PR #26588's MoE tables: {', '.join(pr_moe['pr_files'])} over {pr_moe['sglang_tables']}", flush=True)
    results: dict[str, dict] = {}
    recs: list[dict] = []
    path = None
    signal.signal(signal.SIGTERM, _on_terminate)
    try:
        for mode in args.modes:
            env = mode_env(mode, os.environ, pr_moe["dir"] if pr_moe else None)
            r = run_mode(args, mode, model_dir, log_dir, env, roots)
            if pr_moe and MODES[mode].pr_moe:
                r["pr_moe_dir"] = pr_moe["dir"]
            results[mode] = r
            patches = (r["status"] or {}).get("patches") or {}
            print(f"[{mode}] rc={r['rc']} in {r['seconds']:.0f} s; {len(r['runs'])} timed runs (from {r['from']}); "
                  + ", ".join(f"{k}: {v.get('status')}" for k, v in patches.items())
                  + f"; MoE tables used: {', '.join(r['moe_tables_logged']['used']) or 'none (default config)'}",
                  flush=True)
            # Write after every mode: a run stopped later keeps the pairs it finished.
            recs = make_records(args, results, pairs, header["timestamp"], pr_dir)
            if recs:
                header["modes"] = {m: dict({k: v for k, v in x.items() if k not in ("runs", "pr_moe_dir")},
                                           env=_env_for_record(x),
                                           moe_tables=moe_tables_note(m, recs[0]["gpu"], pr_dir))
                                   for m, x in results.items()}
                path = results_path(out, recs[0]["gpu"], args.input_len, args.tp)
                write_merged(path, recs, header)
    finally:
        for t in tmps:
            t.cleanup()
    failed = [m for m, r in results.items() if r["rc"] != 0 or not r["runs"]]
    if recs:
        for a, b in pairs:
            rs = [r for r in recs if (r["baseline_mode"], r["candidate_mode"]) == (a, b)]
            if rs:
                common.print_table(f"e2e on {recs[0]['gpu']}, {a} -> {b} (input {args.input_len}, output "
                                   f"{args.output_len}, TP {args.tp})",
                                   ["batch", "phase", f"{a} ms", f"{b} ms", "speedup", "change"],
                                   [table_row(r) for r in rs])
        print(f"wrote {path}")
    elif len(args.modes) < 2:
        print("one mode only: no comparison records written; see the log", file=sys.stderr)
    if failed:
        print(f"error: mode(s) {', '.join(failed)} failed; logs in {log_dir}", file=sys.stderr)
        return 1
    for m, r in results.items():
        if any(v.get("status") == "failed" for v in ((r.get("status") or {}).get("patches") or {}).values()):
            print(f"warning: a patch failed to apply in the {m} process", file=sys.stderr)
    return 0


def table_row(r):
    c = r["case"]
    return [str(c["batch"]), c["phase"], r["baseline_ms"], r["candidate_ms"], f"{r['speedup']:.2f}x",
            f"{100 * r['latency_change']:+.1f}%"]
