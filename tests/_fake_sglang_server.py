"""A stand-in for `python -m sglang.launch_server` that streams /generate the way sglang does.

Used by the bench-serve tests (started through the tool's --launcher). It answers /health_generate,
/server_info, /flush_cache, /start_profile and /stop_profile, and streams `data: {...}` chunks whose
`meta_info.completion_tokens` counts the tokens so far; the first `empty_tokens` tokens carry no text
(as special tokens decoded by the dummy tokenizer). Timing comes from FAKE_SERVE_CONFIG (JSON), per
plugin switch (SGLANG_GEMMA4_OPT = "0" or "1"): `prefill_s` before the first token, `token_s` per later
token; the first `cold_requests` requests after start take `cold_extra_s` longer (also per switch).
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--model-path", required=True)
ap.add_argument("--speculative-algorithm")
args, rest = ap.parse_known_args()
cfg = json.loads(os.environ["FAKE_SERVE_CONFIG"])
mode = os.environ.get("SGLANG_GEMMA4_OPT", "unset")
piddir = cfg["piddir"]
tag = mode + ("-mtp" if args.speculative_algorithm else "")
with open(os.path.join(piddir, f"argv-{tag}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
                                             if k.startswith(("SGLANG", "NCCL", "TORCH_SYMM", "NVSHMEM"))}}, f)
print(f"INFO sglang-gemma4-opt: (fake) plugin switch {mode}", flush=True)
if cfg.get("die_at_startup"):
    print("RuntimeError: fake failure while loading the model", flush=True)
    sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like sglang's scheduler
with open(os.path.join(piddir, f"pids-{tag}"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
timing = cfg["timing"][mode]
lock = threading.Lock()
state = {"served": 0, "profiling": None, "in_flight": 0}


def logprobs(ids, top_k):
    """Teacher-forced logprobs of a prompt, a fixed function of the ids; `logprob_noise` (per switch) and, while
    other requests are in flight, `mixed_noise` perturb them (as kernels and batch composition would)."""
    import random
    noise = timing.get("logprob_noise", 0.0) + (cfg.get("mixed_noise", 0.0) if state["in_flight"] > 1 else 0.0)
    rng = random.Random(sum(ids) + len(ids) + (0 if noise == 0 else time.monotonic_ns()))
    tok, top = [[None, ids[0], None]], [None]
    for pos in range(1, len(ids)):
        base = -((ids[pos - 1] * 2654435761 + pos) % 1000) / 100.0
        cand = [(base - j - 0.5 + rng.uniform(-noise, noise), (ids[pos - 1] * 31 + j) % 1000) for j in range(top_k)]
        top.append([[lp, i, None] for lp, i in sorted(cand, reverse=True)])
        tok.append([base - 1.0 + rng.uniform(-noise, noise), ids[pos], None])
    return tok, top


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, code, obj=None):
        body = json.dumps(obj if obj is not None else {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/health"):
            return self._send(200)
        if self.path in ("/server_info", "/get_server_info"):
            return self._send(200, {"version": "fake", "chunked_prefill_size": 8192, "tp_size": 1,
                                    "internal_states": [{"avg_spec_accept_length": 3.5 if args.speculative_algorithm else None}]})
        if self.path.startswith("/v1/models"):
            return self._send(200, {"data": [{"id": args.model_path}]})
        self._send(404)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(n) or b"{}")
        if self.path == "/flush_cache":
            return self._send(200)
        if self.path == "/start_profile":
            state["profiling"] = req
            return self._send(200)
        if self.path == "/stop_profile":
            p = state["profiling"] or {}
            d = p.get("output_dir") or "."
            ev = [{"ph": "X", "cat": "kernel", "name": name, "dur": dur}
                  for name, dur in cfg.get("kernels", {}).get(mode, [])]
            with gzip.open(os.path.join(d, f"{p.get('profile_prefix', 'x')}-TP-0.trace.json.gz"), "wt") as f:
                json.dump({"traceEvents": ev + [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 1e6}]}, f)
            state["profiling"] = None
            return self._send(200)
        if self.path != "/generate":
            return self._send(404)
        ids = req.get("input_ids") or []
        sp = req.get("sampling_params") or {}
        if not req.get("stream"):  # one JSON answer (teacher-forced logprobs when asked)
            with lock:
                state["in_flight"] += 1
            try:
                time.sleep(timing["prefill_s"])
                meta = {"completion_tokens": 1, "prompt_tokens": len(ids)}
                if req.get("return_logprob"):
                    meta["input_token_logprobs"], meta["input_top_logprobs"] = logprobs(ids, req.get("top_logprobs_num") or 1)
                return self._send(200, {"text": " t1", "meta_info": meta})
            finally:
                with lock:
                    state["in_flight"] -= 1
        max_new = int(sp.get("max_new_tokens", 16))
        with lock:
            state["served"] += 1
            cold = state["served"] <= timing.get("cold_requests", 0)
        extra = timing.get("cold_extra_s", 0.0) if cold else 0.0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(obj):
            data = (f"data: {obj}\n\n" if isinstance(obj, str) else f"data: {json.dumps(obj)}\n\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        time.sleep(timing["prefill_s"] + extra)
        text = ""
        for i in range(1, max_new + 1):
            if i > 1:
                time.sleep(timing["token_s"])
            if i > cfg.get("empty_tokens", 0):
                text += f" t{i}"
            chunk({"text": text, "meta_info": {"completion_tokens": i, "prompt_tokens": len(ids)}})
        chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


ThreadingHTTPServer((args.host, args.port), H).serve_forever()
