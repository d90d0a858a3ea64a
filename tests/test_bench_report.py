"""README and benchmarks/README.md numbers are generated from the committed result files, never typed."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from sglang_gemma4_opt.bench import report

ROOT = Path(__file__).resolve().parents[1]


def test_committed_readmes_match_result_files():
    rc = report.main(["--results", str(ROOT / "benchmarks/results"), "--output", str(ROOT / "benchmarks/README.md"),
                      "--readme", str(ROOT / "README.md"), "--check"])
    assert rc == 0, "run: python -m sglang_gemma4_opt.bench.report"


def test_readme_block_follows_the_records(tmp_path):
    """Change a record and the generated block changes with it (the block is not a constant)."""
    src = ROOT / "benchmarks/results/qkv_norm-NVIDIA_H200.json"
    data = json.loads(src.read_text())
    recs = data["records"] if isinstance(data, dict) else data
    for r in recs:
        r["candidate_us"] = r["baseline_us"] * 2  # the plugin twice as slow
        r["speedup"] = 0.5
    (tmp_path / src.name).write_text(json.dumps(data))
    block = report.readme_block(tmp_path)
    assert "qkv_norm ≥0.95× at every M | min 0.500×" in block
    assert "| **no** |" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\noutro\n")
    new = report.update_readme(readme, block)
    assert new.startswith("intro\n") and new.endswith("\noutro\n") and "old" not in new


def _moe(M, speedup, base, cand, base_down=None, cand_down=None):
    return {"case": {"M": M, "N": 704}, "speedup": speedup, "baseline_config": base, "candidate_config": cand,
            "baseline_down_config": base_down, "candidate_down_config": cand_down}


def test_same_moe_configs():
    a, b = {"BLOCK_SIZE_M": 64}, {"BLOCK_SIZE_M": 128}
    assert report.same_moe_configs(_moe(1, 1, a, dict(a)))
    assert report.same_moe_configs(_moe(1, 1, a, a, None, dict(a)))  # no down table = the up entry
    assert not report.same_moe_configs(_moe(1, 1, a, b))
    assert not report.same_moe_configs(_moe(1, 1, a, a, None, dict(a, USE_TMA=True)))
    assert not report.same_moe_configs({"case": {"M": 1}, "speedup": 1})
    rows = report._moe_vs_table([_moe(2048, 1.2, a, b), _moe(4096, 0.97, a, a)], "t", 1.2, "never slower", 1.0)
    assert rows[0] == ("fused_moe N=704 vs t ≥1.2× for M ≥ 2048", "min 0.970× (M=4096, same configs both sides)", False)
    rows = report._moe_vs_table([_moe(2048, 0.9, a, b), _moe(4096, 0.97, a, a)], "t", 1.2, "never slower", 1.0)
    assert rows[1] == ("fused_moe N=704 vs t never slower", "min 0.900× (M=2048)", False)


def _e2e(pair, batch, base_ms, cand_ms, tp=1, note=""):
    return {"baseline_mode": pair[0], "candidate_mode": pair[1], "timestamp": "t",
            "case": {"batch": batch, "input_len": 1024, "output_len": 64, "phase": "prefill", "tp": tp},
            "baseline_us": base_ms * 1e3, "candidate_us": cand_ms * 1e3, "baseline_moe_tables": {"note": note}}


def test_e2e_targets_tp2_rows_and_a_gpu_without_pr_tables():
    rows = {n: (v, ok) for n, v, ok in report._e2e_targets([
        _e2e(("off", "on"), 64, 1000.0, 600.0, tp=2), _e2e(("off", "on"), 16, 300.0, 180.0, tp=2),
        _e2e(("on-pr-moe", "on"), 64, 950.0, 900.0, note="the PR has no table for NVIDIA H100 80GB HBM3, so ...")])}
    assert rows["issue 7: e2e prefill bs64×1024 at TP 2 (off→on; no target)"] == ("-40.0% (1000.0 → 600.0 ms)", None)
    assert rows["issue 7: e2e prefill bs16×1024 at TP 2 (off→on; no target)"][1] is None
    # TP 2 rows never stand in for the TP 1 targets
    assert rows["issue 3: e2e prefill bs64×1024 ≥20% shorter (off→on)"] == (report.NOT_MEASURED, None)
    name = ("issue 4: e2e prefill bs64×1024 ≥15% shorter than the plugin with sglang's own MoE tables "
            "(PR #26588 has none for this GPU) (on-pr-moe→on)")
    assert rows[name] == ("-5.3% (950.0 → 900.0 ms)", False)
    # no TP 2 record: no TP 2 row (it has no target to miss)
    assert not any("TP 2" in n for n, _, _ in report._e2e_targets([]))


def test_fp8_rows_stay_out_of_the_bf16_targets_and_small_batch_rows_are_named():
    a, b = {"BLOCK_SIZE_M": 64}, {"BLOCK_SIZE_M": 128}
    bf16 = [dict(_moe(M, 1.5, a, b), baseline="sglang stock config (default)", candidate_us=30.0) for M in (256, 4096)]
    fp8 = [dict(_moe(M, 0.5, a, b), baseline="sglang stock config (default)") for M in (256, 4096)]
    for r in fp8:
        r["case"]["dtype"] = "fp8_w8a8"
    rows = {n: (v, ok) for n, v, ok in report.targets({"fused_moe": bf16 + fp8})}
    assert rows["fused_moe ≥1.3× for M in 256…4096"] == ("min 1.500× (M=256)", True)
    assert "fp8_w8a8" in report._title("fused_moe", fp8) and "bf16" in report._title("fused_moe", bf16)
    small = dict(_moe(1, 1.4, a, a), candidate_path="plugin small-batch kernels")
    assert report.small_batch(small) and not report.same_moe_configs(small)
    assert not report.small_batch(_moe(1, 1.0, a, a))


def test_grouped_rows_are_named_and_never_count_as_same_configs():
    a = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64}
    g = dict(_moe(4096, 1.1, a, dict(a)), candidate_path="plugin grouped kernels", baseline_us=1200.0,
             candidate_us=1090.0, candidate_tbps=1.0, candidate_tflops=350.0)
    assert report.grouped(g) and not report.small_batch(g)
    assert not report.same_moe_configs(g)  # same sglang table both sides, yet a different kernel ran
    assert not report.grouped(_moe(4096, 1.0, a, a))
    _, rs = report.rows("fused_moe", [g])
    assert rs[0][2] == "grouped kernels"


def test_kernel_breakdown_diagnostics_line(tmp_path):
    """A moe_kernel_breakdown file (benchmarks/scripts/moe_kernel_breakdown.py) gets one line with the grouped
    up / down / top-k sum kernel times and sglang's GEMM time per M, taken from the file."""
    up, down, sm, sg = 341.7, 184.2, 26.4, 612.9
    row = {"M": 2048,
           "grouped": {"grouped_up_act_kernel": up, "grouped_down_kernel": down, "topk_sum_kernel": sm,
                       "void moe_align_block_size_kernel<int>(...)": 8.7},
           "sglang_plugin_tables": {"fused_moe_kernel": sg, "void moe_sum_reduce_warp_per_token_vec_kernel": 25.6}}
    d = tmp_path / "diagnostics"
    d.mkdir()
    (d / "moe_kernel_breakdown-N704-GPU.json").write_text(json.dumps({"header": {}, "N": 704, "rows": [row]}))
    lines = [x for x in report._diagnostics(d) if x.startswith("- ")]
    assert len(lines) == 1
    want = f"M=2048: {report._us(up)} / {report._us(down)} / {report._us(sm)} vs {report._us(sg)}"
    assert want in lines[0], lines[0]


def test_ws_probe_diagnostics_line(tmp_path):
    """A moe_ws_probe file (benchmarks/scripts/moe_ws_probe.py) gets one line with the Triton vs Gluon medians
    per M from the file, and says whether the probe found equal outputs."""
    med = {"sglang": 731.9, "triton_grouped": 643.4, "gluon_ws_up3": 703.1, "gluon_ws_up2": 688.7}
    d = tmp_path / "diagnostics"
    d.mkdir()
    for equal, says in ((True, "same bits"), (False, "outputs differ")):
        doc = {"header": {}, "N": 704, "equal": [{"M": 37, "equal": True}, {"M": 2048, "equal": equal}],
               "rows": [{"M": 2048, "median_us": med}]}
        (d / "moe_ws_probe-N704-GPU.json").write_text(json.dumps(doc))
        lines = [x for x in report._diagnostics(d) if x.startswith("- ")]
        assert len(lines) == 1
        want = (f"M=2048: {report._us(med['triton_grouped'])} vs {report._us(med['gluon_ws_up3'])} / "
                f"{report._us(med['gluon_ws_up2'])}")
        assert want in lines[0] and says in lines[0], lines[0]


def _probe_row(M, base_key, base, cand):
    a = {"isolated_us": base[0], "sustained_us": base[1], "sm_clock_mhz": 1485.0, "power_w": 694.5,
         "clock_event_reasons": ["sw_power_cap"]}
    b = {"isolated_us": cand[0], "sustained_us": cand[1], "sm_clock_mhz": 1620.0, "power_w": 693.0,
         "clock_event_reasons": []}
    return {"M": M, "baseline": base_key, base_key: a, "plugin_grouped": b,
            "speedup_isolated": base[0] / cand[0], "speedup_sustained": base[1] / cand[1]}



@pytest.mark.parametrize("base_key, label", [("sglang_pr_tables", "PR's tables"),
                                             ("sglang_stock_lookup", "stock lookup")])
def test_power_probe_diagnostics_line(tmp_path, base_key, label):
    """A moe_power_probe file gets one line naming its baseline, with the isolated and sustained medians and the
    speedups per M taken from the file, and the clock-event reasons seen."""
    d = tmp_path / "diagnostics"
    d.mkdir()
    rows = [_probe_row(2048, base_key, (693.1, 754.9), (604.0, 659.8)),
            _probe_row(8192, base_key, (2204.7, 2369.2), (1640.5, 1870.0))]
    (d / "moe_power_probe-N704-GPU.json").write_text(json.dumps({"header": {}, "N": 704, "rows": rows}))
    lines = [x for x in report._diagnostics(d) if x.startswith("- ")]
    assert len(lines) == 1
    line = lines[0]
    assert label in line and "sw_power_cap" in line
    for r in rows:
        a, b = r[base_key], r["plugin_grouped"]
        assert (f"M={r['M']}: isolated {report._us(a['isolated_us'])} → {report._us(b['isolated_us'])} µs "
                f"({r['speedup_isolated']:.2f}×), sustained {report._us(a['sustained_us'])} → "
                f"{report._us(b['sustained_us'])} µs ({r['speedup_sustained']:.2f}×)") in line, line


def test_preheat_sentence_follows_the_header():
    assert "2.5 s of untimed replays" in report._preheat_sentence({"preheat_s": 2.5, "preheat_min_us": 200.0})
    assert "≥ 300 µs" in report._preheat_sentence({"preheat_s": 1.0, "preheat_min_us": 300.0})
    for h in ({}, {"preheat_s": 0.0}):
        assert report._preheat_sentence(h).startswith("No preheat")


def _ncu_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "ncu_summary.py"
    spec = importlib.util.spec_from_file_location("ncu_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ncu_summary_reads_a_raw_page_and_the_report_quotes_it(tmp_path):
    """ncu_summary.py on a raw-page CSV (ncu's layout: header row, unit row, one row per launch): one entry per
    kernel name and grid (sglang's one kernel runs as up and down), units converted, stall samples as shares;
    the report's diagnostics line quotes those values."""
    ncu = _ncu_script()
    hdr = ["ID", "Kernel Name", "Grid Size", "launch__grid_size", "gpu__time_duration.sum", "sm__cycles_elapsed.avg.per_second",
           "dram__bytes_read.sum", "l1tex__m_xbar2l1tex_read_bytes.sum",
           "lts__throughput.avg.pct_of_peak_sustained_elapsed",
           "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
           "lts__t_sectors_srcunit_tex_op_read.sum", "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum",
           "smsp__pcsamp_warps_issue_stalled_barrier", "smsp__pcsamp_warps_issue_stalled_barrier_not_issued",
           "smsp__pcsamp_warps_issue_stalled_wait", "smsp__pcsamp_warps_issue_stalled_math_pipe_throttle"]
    units = ["", "", "", "", "ms", "Mhz", "Mbyte", "Gbyte", "%", "%", "sector", "sector", "warp", "warp", "warp", "warp"]
    launches = [["0", "grouped_up_act_kernel", "(1536, 1, 1)", "1,536", "0.429", "1307.5", "1,258.4", "2.09", "84.4", "58.5",
                 "1000", "327", "600", "590", "300", "100"],
                ["1", "fused_moe_kernel", "(4213, 1, 1)", "4,213", "0.421", "1291", "1128.6", "3.57", "95.5", "56.6",
                 "2000", "1000", "10", "5", "980", "10"],
                ["2", "fused_moe_kernel", "(8426, 1, 1)", "8,426", "0.267", "1280", "531.8", "1.80", "85.2", "45.1",
                 "500", "250", "1", "1", "1", "98"],
                ["3", "fused_moe_kernel", "(4213, 1, 1)", "4,213", "0.9", "1291", "1", "1", "1", "1", "1", "1", "1", "1",
                 "1", "1"]]
    raw = tmp_path / "raw.csv"
    with open(raw, "w", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows([hdr, units, *launches])
    ks = ncu.summarise(raw)
    assert [(k["kernel"], k["grid_size"]) for k in ks] == [("grouped_up_act_kernel", 1536.0),
                                                            ("fused_moe_kernel", 4213.0), ("fused_moe_kernel", 8426.0)]
    up = ks[0]
    assert up["duration_us"] == pytest.approx(429.0) and up["sm_clock_ghz"] == pytest.approx(1.3075)
    assert up["dram_read_gb"] == pytest.approx(1.2584) and up["l2_read_hit_pct"] == pytest.approx(32.7)
    assert up["stall_sample_share_pct"] == {"barrier": 60.0, "wait": 30.0, "math_pipe_throttle": 10.0}
    assert len(ncu.summarise(raw, all_launches=True)) == 4
    d = tmp_path / "diagnostics"
    d.mkdir()
    (d / "moe_ncu-M2048-GPU.json").write_text(json.dumps({"header": {}, "kernels": ks}))
    lines = [x for x in report._diagnostics(d) if x.startswith("- ")]
    assert len(lines) == 1
    assert (f"grouped_up_act_kernel (grid 1536): {report._us(429.0)} µs at 1.31 GHz, tensor pipe 58% active, "
            "L2 84%") in lines[0], lines[0]
    assert "fused_moe_kernel (grid 8426)" in lines[0] and "stalls barrier 60%, wait 30%" in lines[0]
