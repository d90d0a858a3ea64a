"""serve-numerics: the comparison math on known inputs, and whole runs against the fake server whose logprobs
move by a set amount per switch and under concurrency."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_gemma4_opt.tools import serve_numerics as sn

FAKE = Path(__file__).with_name("_fake_sglang_server.py")


def test_buckets_and_parse():
    assert [sn.bucket_of(p) for p in (1, 1023, 1024, 5000, 9000)] == ["0-1024", "0-1024", "1024-2048", "4096-8192",
                                                                       "8192+"]
    resp = {"meta_info": {"input_token_logprobs": [[None, 5, None], [-1.0, 6, None], [-2.0, 7, None]],
                          "input_top_logprobs": [None, [[-0.5, 9, None], [-1.0, 6, None]], [[-0.1, 7, None]]]}}
    assert sn.parse_response(resp) == {"logprob": [-1.0, -2.0], "top": [[(-0.5, 9), (-1.0, 6)], [(-0.1, 7)]]}
    with pytest.raises(ValueError):
        sn.parse_response({"meta_info": {}})


def test_topk_kl_known_values():
    ref = [(math.log(0.5), 1), (math.log(0.5), 2)]
    assert sn.topk_kl(ref, ref) == pytest.approx(0.0)
    other = [(math.log(0.75), 1), (math.log(0.25), 2), (math.log(0.01), 3)]
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert sn.topk_kl(ref, other) == pytest.approx(want)
    assert math.isnan(sn.topk_kl(ref, [(-1.0, 9)]))  # nothing in common


def test_compare_and_verdict():
    a = [{"logprob": [-1.0, -2.0, -3.0], "top": [[(-0.1, 1)], [(-0.1, 2)], [(-0.1, 3)]]}]
    b = [{"logprob": [-1.1, -2.0, -2.5], "top": [[(-0.1, 1)], [(-0.1, 5)], [(-0.1, 3)]]}]
    m = sn.compare(a, b)["0-1024"]
    assert m["positions"] == 3 and m["top1_agree"] == pytest.approx(2 / 3)
    assert m["mean_abs_dlogprob"] == pytest.approx(0.2) and m["max_abs_dlogprob"] == pytest.approx(0.5)
    noise = {"0-1024": {"top1_agree": 0.99, "mean_abs_dlogprob": 0.01, "max_abs_dlogprob": 0.1, "mean_topk_kl": 1e-4}}
    close = {"0-1024": {"top1_agree": 0.989, "mean_abs_dlogprob": 0.012, "max_abs_dlogprob": 0.11, "mean_topk_kl": 1e-4}}
    assert sn.verdict(noise, close, 0.25, 0.0)["passed"]
    far = dict(close["0-1024"], mean_abs_dlogprob=0.05)
    v = sn.verdict(noise, {"0-1024": far}, 0.25, 0.0)
    assert not v["passed"] and [c["metric"] for c in v["checks"] if not c["passed"]] == ["mean_abs_dlogprob"]
    worse_top1 = dict(close["0-1024"], top1_agree=0.9)  # 10% disagreement against stock's 1%
    assert not sn.verdict(noise, {"0-1024": worse_top1}, 0.25, 0.0)["passed"]


def _run(tmp_path, plugin_noise, mixed_noise=0.05):
    piddir = tmp_path / "pids"
    piddir.mkdir()
    cfg = {"piddir": str(piddir), "mixed_noise": mixed_noise,
           "timing": {"0": {"prefill_s": 0.02, "token_s": 0.0},
                      "1": {"prefill_s": 0.02, "token_s": 0.0, "logprob_noise": plugin_noise}}}
    env = dict(os.environ, FAKE_SERVE_CONFIG=json.dumps(cfg))
    env.pop("SGLANG_GEMMA4_OPT", None)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "sglang_gemma4_opt", "serve-numerics", "--prompts", "8", "--min-len",
                        "20", "--max-len", "40", "--concurrency", "4", "--top-k", "3", "--out", str(out),
                        "--launcher", f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))}",
                        "--startup-timeout", "60", "--stop-grace", "5"], env=env, capture_output=True, text=True,
                       timeout=300)
    docs = list(out.glob("serve-numerics-*.json"))
    return p, (json.loads(docs[0].read_text()) if docs else None), piddir


def test_plugin_within_stock_noise_passes(tmp_path):
    p, doc, piddir = _run(tmp_path, plugin_noise=0.01)
    assert p.returncode == 0, p.stdout + p.stderr
    noise = doc["pairs"]["stock solo vs stock mixed"]["0-1024"]
    assert 0.005 < noise["mean_abs_dlogprob"] < 0.05  # the fake's mixed-batch noise, uniform in +-0.05
    assert doc["pairs"]["plugin solo vs stock solo"]["0-1024"]["mean_abs_dlogprob"] < 0.01
    assert doc["verdict"]["passed"] and doc["header"]["dummy_weights"]
    argv = json.loads((piddir / "argv-1.json").read_text())["argv"]
    assert "--load-format" in argv and "--enable-deterministic-inference" not in argv


def test_plugin_further_from_stock_than_stock_from_itself_fails(tmp_path):
    p, doc, _ = _run(tmp_path, plugin_noise=0.5)
    assert p.returncode == 1, p.stdout + p.stderr
    assert not doc["verdict"]["passed"] and "FAIL" in p.stdout
