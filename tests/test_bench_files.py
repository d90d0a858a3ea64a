"""Where `bench` writes its records: runs of another MoE shape or baseline get their own file, so they never
replace the default rows (one run once overwrote the N=704 file with N=352 rows)."""

import argparse
import json
import re

import pytest

from sglang_gemma4_opt.bench import common, kernels


def _args(*argv):
    p = argparse.ArgumentParser()
    kernels.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, suite, tag", [
    ((), "fused_moe", ""),
    (("--moe-n", "704"), "fused_moe", ""),
    (("--moe-n", "352"), "fused_moe", "N352"),
    (("--moe-baseline", "benchmarks/baselines/pr26588"), "fused_moe", "N704-vs-pr26588"),
    (("--moe-baseline", "x/pr26588", "--moe-baseline-label", "pr26588 table"), "fused_moe", "N704-vs-pr26588-table"),
    (("--moe-n", "352", "--moe-baseline", "x/b", "--moe-results-tag", "pr"), "fused_moe", "N352-vs-pr"),
    (("--moe-dtype", "fp8_w8a8"), "fused_moe", "N704-fp8"),
    (("--moe-n", "352", "--moe-dtype", "fp8_w8a8"), "fused_moe", "N352-fp8"),
    (("--moe-dtype", "fp8_w8a8", "--moe-baseline", "x/b"), "fused_moe", "N704-fp8-vs-b"),
    (("--moe-dtype", "bf16"), "fused_moe", ""),
    (("--moe-n", "352"), "qkv_norm", ""),
    (("--moe-n", "352"), "extend_attention", ""),
])
def test_results_tag(argv, suite, tag):
    assert kernels.results_tag(suite, _args(*argv)) == tag


def test_tagged_files_sit_next_to_the_default_one(tmp_path):
    gpu = "NVIDIA H100 80GB HBM3"
    a = common.write_results(tmp_path, "fused_moe", gpu, [{"case": {"N": 704}}], {"x": 1})
    b = common.write_results(tmp_path, "fused_moe", gpu, [{"case": {"N": 352}}], {"x": 2}, "N352")
    assert a.name == "fused_moe-NVIDIA_H100_80GB_HBM3.json" and b.name == "fused_moe-N352-NVIDIA_H100_80GB_HBM3.json"
    assert json.loads(a.read_text())["records"] == [{"case": {"N": 704}}]
    assert json.loads(b.read_text())["header"] == {"x": 2, "suite": "fused_moe", "gpu": gpu}


def test_committed_moe_files_hold_the_shape_their_name_says():
    from pathlib import Path

    res = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    files = sorted(res.glob("fused_moe*.json"))
    assert files
    for f in files:
        recs = json.loads(f.read_text())["records"]
        ns = {r["case"]["N"] for r in recs}
        m = re.match(r"fused_moe-N(\d+)-", f.name)
        want = int(m.group(1)) if m else kernels.DEFAULT_MOE_N
        assert ns == {want}, f.name
        dtypes = {r["case"].get("dtype", "bfloat16") for r in recs}
        assert dtypes == ({"fp8_w8a8"} if re.match(r"fused_moe-N\d+-fp8-", f.name) else {"bfloat16"}), f.name


def test_default_moe_n_is_the_suites():
    pytest.importorskip("torch")
    from sglang_gemma4_opt.bench import fused_moe

    assert fused_moe.N == kernels.DEFAULT_MOE_N
