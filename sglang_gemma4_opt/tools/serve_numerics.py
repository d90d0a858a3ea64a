"""`sglang-gemma4-opt serve-numerics`: does the plugin's server compute what stock sglang's server computes,
within the amount stock differs from itself?

The GSM8K gate runs in deterministic mode, where the plugin's own MoE and attention kernels stand aside; this
check runs the servers as users do (no deterministic mode), so the plugin's kernels are what it measures.

For each server (stock `SGLANG_GEMMA4_OPT=0`, then the plugin), the same prompts (random token ids, lengths
drawn from --min-len..--max-len, seeded) go through `/generate` teacher-forced: `max_new_tokens` 1,
`return_logprob` from position 0, `top_logprobs_num` K. Each server answers them twice, in two batch
compositions: one request at a time (`solo`), and all of them `--concurrency` at a time in a shuffled order
(`mixed`), so the prefill batches differ. Compared per position bucket:

  * top-1 agreement: the most likely next token (first of the top-K list) is the same;
  * mean and max |Δ logprob| of the prompt's own tokens (the teacher-forced log-likelihood);
  * mean KL over the top-K: sum over the reference's top-K tokens of p_ref (log p_ref - log p_other), each side
    renormalised over the tokens of that list both sides report (an estimate of the full-vocabulary KL, which
    the server does not return).

Pairs: stock solo vs stock mixed (how far stock differs from itself when only the batch composition changes),
plugin solo vs stock solo (only the kernels differ) and plugin mixed vs stock mixed (reported; both sides move
with the batch composition there). Verdict: for every bucket and metric plugin solo's difference from stock solo
is at most the stock-vs-stock difference times (1 + --tolerance) plus a floor
(--abs-floor: bf16 rounding makes a zero stock difference no bound). With dummy weights (the default here) the
numbers say whether the plugin's kernels compute the same function; on real weights (`--model-path`) they are
the numerics gate for serving. Results: `<out>/serve-numerics-<GPU>.json` and a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import random
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BUCKETS = (0, 1024, 2048, 4096, 8192)  # position buckets [a, b), the last open-ended
METRICS = ("top1_agree", "mean_abs_dlogprob", "max_abs_dlogprob", "mean_topk_kl")
HIGHER_IS_BETTER = {"top1_agree"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", type=int, default=200, help="(default: %(default)s)")
    g.add_argument("--min-len", type=int, default=1024, help="(default: %(default)s)")
    g.add_argument("--max-len", type=int, default=8192, help="(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=5, help="top logprobs per position (default: %(default)s)")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight in the mixed pass (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--vocab", type=int, default=250000, help="token ids are drawn from [16, vocab) (default: %(default)s)")
    g = p.add_argument_group("verdict")
    g.add_argument("--tolerance", type=float, default=0.25,
                   help="plugin-vs-stock may exceed stock-vs-stock by this fraction (default: %(default)s)")
    g.add_argument("--abs-floor", type=float, default=0.02,
                   help="absolute slack per metric: |Δ logprob| and KL in nats, top-1 agreement as a fraction "
                        "(default: %(default)s)")
    g = p.add_argument_group("server")
    g.add_argument("--model-path", help="model folder (default: the dummy 26B-A4B folder this command writes, "
                                        "--load-format dummy)")
    g.add_argument("--tp", type=int, default=1, help="(default: %(default)s)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=0, help="(default: a free one)")
    g.add_argument("--mem-fraction-static", type=float, default=0.85, help="(default: %(default)s)")
    g.add_argument("--extra-server-args", default="", help="more launch_server arguments as one string")
    g.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m sglang.launch_server",
                   help="command that starts a server (default: %(default)s)")
    g.add_argument("--startup-timeout", type=float, default=900.0, help="(default: %(default)s)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    g.add_argument("--stop-grace", type=float, default=30.0, help="(default: %(default)s)")
    g.add_argument("--out", default="benchmarks/results", help="(default: %(default)s)")
    g.add_argument("--log-dir", default=None, help="server logs (default: a temp folder)")


def make_prompts(n: int, lo: int, hi: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def bucket_of(pos: int) -> str:
    for a, b in zip(BUCKETS, BUCKETS[1:]):
        if a <= pos < b:
            return f"{a}-{b}"
    return f"{BUCKETS[-1]}+"


def parse_response(resp: dict) -> dict:
    """{"logprob": [per position: log p(prompt token)], "top": [per position: [(logprob, id), ...]]}, positions
    1..n-1 (position 0 has no prediction). The top list at position i is the distribution that predicts token i."""
    meta = resp.get("meta_info") or {}
    lp = [e[0] for e in (meta.get("input_token_logprobs") or [])][1:]
    top = [[(e[0], e[1]) for e in (t or [])] for t in (meta.get("input_top_logprobs") or [])][1:]
    if not lp or len(lp) != len(top):
        raise ValueError("response has no input logprobs (return_logprob / top_logprobs_num not honoured?)")
    return {"logprob": lp, "top": top}


def topk_kl(ref: list[tuple[float, int]], oth: list[tuple[float, int]]) -> float:
    """KL(ref || other) over the tokens both top-K lists hold, each side renormalised over them."""
    o = {i: l for l, i in oth}
    common = [(l, i) for l, i in ref if i in o and l is not None and o[i] is not None]
    if not common:
        return float("nan")
    pr = [math.exp(l) for l, _ in common]
    po = [math.exp(o[i]) for _, i in common]
    zr, zo = sum(pr), sum(po)
    return sum((a / zr) * (math.log(a / zr) - math.log(b / zo)) for a, b in zip(pr, po) if a > 0 and b > 0)


def compare(a: list[dict], b: list[dict]) -> dict[str, dict[str, float]]:
    """Per bucket the METRICS of run b against run a (the same prompts, in the same order)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for ra, rb in zip(a, b):
        for i, (la, lb, ta, tb) in enumerate(zip(ra["logprob"], rb["logprob"], ra["top"], rb["top"])):
            d = acc.setdefault(bucket_of(i + 1), {"agree": [], "dlp": [], "kl": []})
            d["agree"].append(float(bool(ta and tb and ta[0][1] == tb[0][1])))
            if la is not None and lb is not None:
                d["dlp"].append(abs(la - lb))
            kl = topk_kl(ta, tb)
            if kl == kl:
                d["kl"].append(kl)
    out = {}
    for bk, d in sorted(acc.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+"))):
        n = len(d["agree"])
        out[bk] = {"positions": n, "top1_agree": sum(d["agree"]) / n if n else float("nan"),
                   "mean_abs_dlogprob": sum(d["dlp"]) / len(d["dlp"]) if d["dlp"] else float("nan"),
                   "max_abs_dlogprob": max(d["dlp"]) if d["dlp"] else float("nan"),
                   "mean_topk_kl": sum(d["kl"]) / len(d["kl"]) if d["kl"] else float("nan")}
    return out


def verdict(noise: dict, plugin: dict, tolerance: float, floor: float) -> dict:
    """Per bucket and metric: is the plugin's difference from stock within the stock-vs-stock one?"""
    checks, ok = [], True
    for bk, m in plugin.items():
        ref = noise.get(bk)
        if ref is None:
            continue
        for k in METRICS:
            if k in HIGHER_IS_BETTER:  # compare disagreement rates
                got, base = 1 - m[k], 1 - ref[k]
            else:
                got, base = m[k], ref[k]
            limit = base * (1 + tolerance) + floor
            passed = got <= limit
            ok &= passed
            checks.append({"bucket": bk, "metric": k, "plugin": got, "stock_vs_stock": base, "limit": limit,
                           "passed": passed})
    return {"passed": ok, "checks": checks}


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_pass(base_url: str, prompts: list[list[int]], top_k: int, concurrency: int, order_seed: int | None,
             timeout: float) -> list[dict]:
    """Every prompt through /generate teacher-forced; results in prompt order whatever the send order."""
    body = {"sampling_params": {"max_new_tokens": 1, "temperature": 0.0}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": top_k}
    order = list(range(len(prompts)))
    if order_seed is not None:
        random.Random(order_seed).shuffle(order)
    out: list[dict | None] = [None] * len(prompts)

    def one(i):
        out[i] = parse_response(_post(base_url + "/generate", dict(body, input_ids=prompts[i]), timeout))

    with cf.ThreadPoolExecutor(max_workers=concurrency) as ex:
        for f in [ex.submit(one, i) for i in order]:
            f.result()
    return out  # type: ignore[return-value]


def run_server(args, name: str, plugin: bool, model: Path, prompts, log_dir: Path) -> dict:
    from ..bench import serve
    from .server import Server, free_port

    port = args.port or free_port(args.host)
    cmd = shlex.split(args.launcher) + [
        "--model-path", str(model), "--host", args.host, "--port", str(port), "--tp-size", str(args.tp),
        "--attention-backend", "triton", "--grammar-backend", "none", "--skip-server-warmup",
        "--mem-fraction-static", str(args.mem_fraction_static)]
    if not args.model_path:
        cmd += ["--load-format", "dummy"]
    cmd += shlex.split(args.extra_server_args)
    env = serve.server_env("on" if plugin else "off", None)
    srv = Server(cmd, args.host, port, log_dir / f"server-{name}.log", env=env, health_path=serve.HEALTH_PATH,
                 startup_timeout=args.startup_timeout, grace=args.stop_grace, name=f"{name} server")
    print(f"[{name}] starting (log {srv.log_path})", flush=True)
    try:
        srv.start()
        ready = srv.wait_ready()
        t0 = time.monotonic()
        solo = run_pass(srv.base_url, prompts, args.top_k, 1, None, args.request_timeout)
        mixed = run_pass(srv.base_url, prompts, args.top_k, args.concurrency, args.seed + 1, args.request_timeout)
        print(f"[{name}] ready after {ready:.0f} s; both passes in {time.monotonic() - t0:.0f} s", flush=True)
        return {"solo": solo, "mixed": mixed, "startup_s": round(ready, 1)}
    finally:
        srv.stop()


def run(args) -> int:
    if not (1 <= args.min_len <= args.max_len) or args.prompts < 1 or args.top_k < 1 or args.concurrency < 1:
        print("error: need 1 <= --min-len <= --max-len, --prompts, --top-k and --concurrency >= 1", file=sys.stderr)
        return 2
    from ..bench import common
    from .dummy_model import target_config, write_folder
    from .server import Interrupted, ServerError, stop_on_signals

    tmp = tempfile.TemporaryDirectory(prefix="serve-numerics-")
    try:
        model = Path(args.model_path) if args.model_path else write_folder(Path(tmp.name) / "target", target_config(),
                                                                           processor=True)
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp.name)
        log_dir.mkdir(parents=True, exist_ok=True)
        prompts = make_prompts(args.prompts, args.min_len, args.max_len, args.seed, args.vocab)
        runs = {}
        try:
            with stop_on_signals():
                for name, plugin in (("stock", False), ("plugin", True)):
                    runs[name] = run_server(args, name, plugin, model, prompts, log_dir)
        except (Interrupted, KeyboardInterrupt) as e:
            print("interrupted; servers stopped", file=sys.stderr)
            return 128 + getattr(e, "signum", 2)
        except (ServerError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        pairs = {"stock solo vs stock mixed": compare(runs["stock"]["solo"], runs["stock"]["mixed"]),
                 "plugin solo vs stock solo": compare(runs["stock"]["solo"], runs["plugin"]["solo"]),
                 "plugin mixed vs stock mixed": compare(runs["stock"]["mixed"], runs["plugin"]["mixed"])}
        # The verdict compares like with like: plugin solo vs stock solo (both deterministic for a batch of one, so
        # only the kernels differ) against stock solo vs stock mixed (one side moved by the batch composition).
        # Plugin mixed vs stock mixed has both sides moved and is reported only.
        v = verdict(pairs["stock solo vs stock mixed"], pairs["plugin solo vs stock solo"], args.tolerance,
                    args.abs_floor)
        gpu = common.gpu_name()
        header = dict(common.env_header(), suite="serve-numerics", gpu=gpu, prompts=args.prompts,
                      lengths=[args.min_len, args.max_len], top_k=args.top_k, concurrency=args.concurrency,
                      seed=args.seed, dummy_weights=not args.model_path, tolerance=args.tolerance,
                      abs_floor=args.abs_floor, startup_s={k: r["startup_s"] for k, r in runs.items()})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"serve-numerics-{common.slug(gpu)}.json"
        common.write_json_atomic(path, {"header": header, "pairs": pairs, "verdict": v})
        rows = [[p, bk, f"{m['positions']}", f"{m['top1_agree']:.4f}", f"{m['mean_abs_dlogprob']:.4f}",
                 f"{m['max_abs_dlogprob']:.3f}", f"{m['mean_topk_kl']:.2e}"] for p, by in pairs.items()
                for bk, m in by.items()]
        common.print_table(f"serving numerics on {gpu} ({'dummy' if not args.model_path else 'real'} weights)",
                           ["pair", "positions", "n", "top-1 agree", "mean |Δlogp|", "max |Δlogp|", "top-K KL"], rows)
        print(f"verdict: {'PASS' if v['passed'] else 'FAIL'} (plugin within stock-vs-stock x (1 + {args.tolerance}) "
              f"+ {args.abs_floor}); wrote {path}")
        return 0 if v["passed"] else 1
    finally:
        tmp.cleanup()
