"""`sglang-gemma4-opt bench` runs every suite end to end on a couple of sizes and writes records in the
documented schema (the full suite is `bash ci/gpu-run.sh kernels`)."""

import argparse
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

pytestmark = pytest.mark.gpu

COMMON = {"suite", "gpu", "sglang", "triton", "torch", "case", "baseline", "candidate", "baseline_us",
          "candidate_us", "speedup"}
CASE_KEYS = {
    "qkv_norm": {"M", "q_heads", "kv_heads", "head_dim"},
    "extend_attention": {"head_dim", "batch", "seq_len", "window"},
    "fused_moe": {"E", "N", "K", "topk", "M", "dtype"},
}


def test_bench_quick_writes_records(sbs, tmp_path):
    from sglang_gemma4_opt.bench import kernels

    p = argparse.ArgumentParser()
    kernels.add_arguments(p)
    args = p.parse_args(["--sizes", "1", "256", "16x128", "--quick", "--no-roofs", "--no-plot",
                         "--budget", "0.02", "--out", str(tmp_path)])
    assert kernels.run(args) == 0
    for suite, keys in CASE_KEYS.items():
        files = list(tmp_path.glob(f"{suite}-*.json"))
        assert len(files) == 1, files
        doc = json.loads(files[0].read_text())
        assert {"command", "timestamp", "versions"} <= set(doc["header"])
        assert doc["records"], suite
        for r in doc["records"]:
            assert COMMON <= set(r), COMMON - set(r)
            assert keys <= set(r["case"]), keys - set(r["case"])
            assert r["gpu"] == torch.cuda.get_device_name()
            assert r["baseline_us"] > 0 and r["candidate_us"] > 0
            assert abs(r["speedup"] - r["baseline_us"] / r["candidate_us"]) < 1e-9
        if suite == "qkv_norm":
            assert all(r["bit_exact"] is True for r in doc["records"])
        if suite == "extend_attention":
            assert all(r["max_abs_diff"] == 0.0 for r in doc["records"])
