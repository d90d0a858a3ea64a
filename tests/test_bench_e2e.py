"""bench-e2e without a GPU: modes, pairs, the PR's MoE-table folder, records, the results file and the
report's whole-model rows, with a stand-in for bench_one_batch that prints what the real one prints."""

import argparse
import json
import sys
from pathlib import Path

import pytest

from sglang_gemma4_opt.bench import e2e, report

ROOT = Path(__file__).resolve().parents[1]
# e2e results as written before bench-e2e had modes (off -> on only), kept as a fixture
LEGACY = ROOT / "tests" / "data" / "e2e-legacy-NVIDIA_H200.json"
PR_TABLES = ROOT / "benchmarks/baselines/pr26588"

# Prefill seconds per (batch x 1024 tokens) for each mode, as the stand-in reports them.
SCALE = {"off": 1.0, "pr": 0.8, "on-pr-moe": 0.75, "no-attn": 0.7, "on": 0.6}

FAKE = r'''
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
def values(flag):
    i = argv.index(flag)
    out = []
    for a in argv[i + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out

env = os.environ
dis = set(filter(None, env.get("SGLANG_GEMMA4_OPT_DISABLE", "").split(",")))
if env.get("SGLANG_GEMMA4_OPT") == "0":
    mode = "off"
elif {"extend_attention_kernel", "moe_configs"} <= dis:
    mode = "pr"
elif "moe_configs" in dis:
    mode = "on-pr-moe"
elif "extend_attention_kernel" in dis:
    mode = "no-attn"
else:
    mode = "on"
if values("--run-name")[0] != "plugin-" + mode:
    print("environment says", mode, "run name says", values("--run-name"))
    sys.exit(3)
if env.get("FAKE_FAIL") == mode:
    print("boom")
    sys.exit(1)
gpu = env.get("FAKE_GPU", "NVIDIA H200")
names = ["patch_a", "extend_attention_kernel", "moe_configs"]
patches = {n: {"status": "disabled" if mode == "off" or n in dis else "applied"} for n in names}
print("G4OPT_STATUS " + json.dumps({"versions": {"sglang": "0.5.12", "triton": "3.6.0", "torch": "2.11"},
                                     "gpu": gpu + " (sm90)", "patches": patches}))
name = "E=128,N=704,device_name=" + gpu.replace(" ", "_") + ".json"
moe_dir = env.get("SGLANG_MOE_CONFIG_DIR")
sglang_dir = Path(env["FAKE_SGLANG_DIR"])
if moe_dir and (Path(moe_dir) / "configs/triton_3_6_0" / name).exists():
    print(f"[TP0] Using MoE kernel config from {Path(moe_dir) / 'configs/triton_3_6_0' / name}.")
elif mode != "off" and "moe_configs" not in dis:
    plugin = Path(env["FAKE_PLUGIN_DIR"]) / "triton_3_6_0" / name
    print(f"Capturing 1/3\r[TP0] Using MoE kernel config from {plugin} (sglang-gemma4-opt).")
else:
    root = Path(moe_dir) if moe_dir else sglang_dir
    old = root / "configs/triton_3_5_1" / name
    if old.exists():
        print(f"[TP0] Config file not found at {root / 'configs/triton_3_6_0' / name}. Fallback to triton version 3.5.1 "
              f"and use MoE kernel config from {old}. Performance might be sub-optimal!")
    else:
        print(f"Capturing 0/3\r[TP0] Using default MoE kernel config. Performance might be sub-optimal! Config file not "
              f"found at {root / 'configs/triton_3_6_0' / name}, you can create them with ...")
scale = json.loads(env["FAKE_SCALE"])[mode]
L = int(values("--input-len")[0])
print("Warmup ...")
print("Prefill. latency: 9.0 s, throughput: 1 token/s")
print("Decode.  median latency: 5.0 s, median throughput: 1 token/s")
print("Benchmark ...")
with open(values("--result-filename")[0], "a") as f:
    for i, b in enumerate(values("--batch-size")):
        b = int(b)
        first = i < len(set(values("--batch-size")))
        pre = scale * b * L / 1024 * 0.02 * (3 if first else 1)  # the first pass compiles
        dec = 0.006 * (1 + scale) / 2
        print(f"Prefill. latency: {pre:.5f} s, throughput: 1 token/s")
        print(f"Decode.  median latency: {dec:.5f} s, median throughput: 1 token/s")
        f.write(json.dumps({"run_name": values("--run-name")[0], "batch_size": b, "input_len": L,
                            "prefill_latency": pre, "median_decode_latency": dec}) + "\n")
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """bench-e2e with bench_one_batch replaced by FAKE; sglang's own tables are a small fake folder."""
    script = tmp_path / "fake_one_batch.py"
    script.write_text(FAKE)
    sg = tmp_path / "sglang_moe"
    for v, n in (("triton_3_6_0", "E=64,N=1,device_name=NVIDIA_H200.json"),
                 ("triton_3_5_1", "E=128,N=704,device_name=NVIDIA_H100_80GB_HBM3.json")):
        (sg / "configs" / v).mkdir(parents=True)
        (sg / "configs" / v / n).write_text("{}")
    (sg / "configs" / "README.md").write_text("sglang's")
    orig = e2e.build_command
    monkeypatch.setattr(e2e, "build_command", lambda *a: [sys.executable, str(script)] + orig(*a)[4:])
    monkeypatch.setattr(e2e, "sglang_moe_dir", lambda: sg)
    for k in ("SGLANG_GEMMA4_OPT", "SGLANG_GEMMA4_OPT_DISABLE", "SGLANG_MOE_CONFIG_DIR", "FAKE_FAIL", "FAKE_GPU"):
        monkeypatch.delenv(k, raising=False)
    from sglang_gemma4_opt.patches.moe_configs import CONFIG_ROOT

    monkeypatch.setenv("FAKE_SGLANG_DIR", str(sg))
    monkeypatch.setenv("FAKE_PLUGIN_DIR", str(CONFIG_ROOT))
    monkeypatch.setenv("FAKE_SCALE", json.dumps(SCALE))
    out = tmp_path / "out"

    def bench(*argv):
        p = argparse.ArgumentParser()
        e2e.add_arguments(p)
        args = p.parse_args(["--out", str(out), "--quiet", "--timeout", "60", "--pr-moe-tables", str(PR_TABLES),
                             "--model-dir", str(tmp_path / "model"), *argv])
        return e2e.run(args)

    bench.out = out
    return bench


def _by_pair(recs):
    return {(r["baseline_mode"], r["candidate_mode"], r["case"]["batch"], r["case"]["phase"]): r for r in recs}


# ---------------------------------------------------------------------------------------------
# pure logic


def test_default_pairs():
    assert e2e.resolve_pairs(["off", "on"], None) == [("off", "on")]
    assert e2e.resolve_pairs(["off", "pr", "on-pr-moe", "no-attn", "on"], None) == [
        ("off", "pr"), ("off", "on-pr-moe"), ("off", "no-attn"), ("off", "on"), ("on-pr-moe", "on"), ("no-attn", "on")]
    assert e2e.resolve_pairs(["no-attn", "on"], None) == [("no-attn", "on")]
    assert e2e.resolve_pairs(["off", "no-small-moe", "on"], None) == [
        ("off", "no-small-moe"), ("off", "on"), ("no-small-moe", "on")]
    assert e2e.resolve_pairs(["on-pr-moe", "no-grouped-moe", "on"], None) == [
        ("on-pr-moe", "on"), ("no-grouped-moe", "on")]
    assert e2e.resolve_pairs(["pr", "on"], None) == [("pr", "on")]  # none of the rules: first vs the rest
    assert e2e.resolve_pairs(["on"], None) == []
    assert e2e.resolve_pairs(["off", "pr", "on"], ["pr:on", "off:on", "pr:on"]) == [("pr", "on"), ("off", "on")]


@pytest.mark.parametrize("modes, compare", [
    (["off", "on"], ["off-on"]), (["off", "on"], ["off:pr"]), (["off", "on"], ["on:on"]), (["off", "on"], ["x:on"]),
    (["off", "off"], None)])
def test_bad_pairs(modes, compare):
    with pytest.raises(ValueError):
        e2e.resolve_pairs(modes, compare)


def test_mode_env():
    base = {"SGLANG_MOE_CONFIG_DIR": "/mine"}
    assert e2e.mode_env("off", {}, None) == {"SGLANG_GEMMA4_OPT": "0", "SGLANG_GEMMA4_OPT_DISABLE": None,
                                              "SGLANG_MOE_CONFIG_DIR": None}
    assert e2e.mode_env("on", base, "/pr") == {"SGLANG_GEMMA4_OPT": "1", "SGLANG_GEMMA4_OPT_DISABLE": None,
                                               "SGLANG_MOE_CONFIG_DIR": "/mine"}
    assert e2e.mode_env("no-attn", {}, "/pr")["SGLANG_GEMMA4_OPT_DISABLE"] == "extend_attention_kernel"
    assert e2e.mode_env("on-pr-moe", base, "/pr") == {"SGLANG_GEMMA4_OPT": "1",
                                                      "SGLANG_GEMMA4_OPT_DISABLE": "moe_configs,moe_small_batch",
                                                      "SGLANG_MOE_CONFIG_DIR": "/pr"}
    assert (e2e.mode_env("pr", {}, "/pr")["SGLANG_GEMMA4_OPT_DISABLE"]
            == "extend_attention_kernel,moe_configs,moe_small_batch")
    assert e2e.mode_env("no-small-moe", {}, None)["SGLANG_GEMMA4_OPT_DISABLE"] == "moe_small_batch"
    assert e2e.mode_env("no-grouped-moe", {}, None)["SGLANG_GEMMA4_OPT_DISABLE"] == "moe_grouped"
    assert e2e.mode_env("no-hd512-gluon", {}, None)["SGLANG_GEMMA4_OPT_DISABLE"] == "extend_attention_hd512"
    with pytest.raises(ValueError):
        e2e.mode_env("pr", {}, None)
    env = e2e.apply_env({"SGLANG_GEMMA4_OPT_DISABLE": "qkv_rmsnorm", "X": "1"}, e2e.mode_env("on", {}, None))
    assert env == {"X": "1", "SGLANG_GEMMA4_OPT": "1"}  # an inherited DISABLE does not leak into a mode


def test_pr_moe_dir_is_sglangs_tables_with_the_prs_on_top(tmp_path):
    sg = tmp_path / "sg"
    (sg / "configs/triton_3_6_0").mkdir(parents=True)
    (sg / "configs/triton_3_5_1").mkdir(parents=True)
    (sg / "configs/triton_3_6_0/E=8,N=8,device_name=X.json").write_text("{}")
    (sg / "configs/triton_3_6_0/E=128,N=704,device_name=NVIDIA_H200.json").write_text('{"sglang": 1}')
    (sg / "configs/triton_3_5_1/old.json").write_text("{}")
    info = e2e.build_pr_moe_dir(PR_TABLES, sg, tmp_path / "merged")
    c = tmp_path / "merged/configs"
    assert sorted(p.name for p in c.iterdir()) == ["triton_3_5_1", "triton_3_6_0"]
    assert (c / "triton_3_5_1/old.json").exists() and (c / "triton_3_6_0/E=8,N=8,device_name=X.json").exists()
    for name in ("E=128,N=704,device_name=NVIDIA_H200.json", "E=128,N=704,device_name=NVIDIA_H200_down.json"):
        assert (c / "triton_3_6_0" / name).read_text() == (PR_TABLES / "triton_3_6_0" / name).read_text()
    assert info["replaced_sglang_files"] == ["triton_3_6_0/E=128,N=704,device_name=NVIDIA_H200.json"]
    assert len(info["pr_files"]) == 2
    assert (sg / "configs/triton_3_6_0/E=128,N=704,device_name=NVIDIA_H200.json").read_text() == '{"sglang": 1}'


def test_pr_has_tables_for_h200_only():
    assert e2e.pr_has_gpu(PR_TABLES, "NVIDIA H200")
    assert not e2e.pr_has_gpu(PR_TABLES, "NVIDIA H100 80GB HBM3")
    assert "no table for NVIDIA H100" in e2e.moe_tables_note("pr", "NVIDIA H100 80GB HBM3", PR_TABLES)
    assert "no table" not in e2e.moe_tables_note("on-pr-moe", "NVIDIA H200", PR_TABLES)
    assert e2e.moe_tables_note("off", "NVIDIA H200", PR_TABLES) == "sglang's own lookup"


def test_parse_moe_table_lines(tmp_path):
    text = ("Capturing 1/3\r[TP0] Using MoE kernel config from /x/plugin/triton_3_6_0/A.json (sglang-gemma4-opt).\n"
            "[TP0] Using MoE kernel config from /x/plugin/triton_3_6_0/A.json (sglang-gemma4-opt).\n"
            "[TP0] Using default MoE kernel config. Performance might be sub-optimal! Config file not found at "
            "/s/configs/triton_3_6_0/B.json, you can create them\n"
            "[TP0] Using MoE kernel config from /elsewhere/C.json.\n")
    got = e2e.parse_moe_tables(text, {"plugin": Path("/x/plugin")})
    assert got == {"used": ["plugin/triton_3_6_0/A.json", "/elsewhere/C.json"], "missing": ["triton_3_6_0/B.json"]}


def test_parse_output_and_per_batch():
    text = "\n".join(["G4OPT_STATUS {\"gpu\": \"G\"}", "Warmup ...", "Prefill. latency: 9.0 s, x",
                      "Decode.  median latency: 5.0 s, x"]
                     + [f"Prefill. latency: {p} s, x\nDecode.  median latency: {d} s, x"
                        for p, d in ((3, 0.3), (30, 0.6), (1, 0.1), (10, 0.2), (2, 0.1), (12, 0.4))])
    status, runs = e2e.parse_output(text)
    assert status == {"gpu": "G"} and len(runs) == 6 and runs[0] == {"prefill_latency": 3.0, "median_decode_latency": 0.3}
    g = e2e.per_batch(runs, [1, 16], 3)
    assert g == {1: {"prefill": [1.0, 2.0], "decode": [0.1, 0.1]}, 16: {"prefill": [10.0, 12.0], "decode": [0.2, 0.4]}}


def test_legacy_records_are_off_to_on():
    legacy = json.loads(LEGACY.read_text())["records"]
    assert {report.e2e_pair(r) for r in legacy} == {("off", "on")}
    assert e2e.record_key(legacy[0]) == e2e.record_key(dict(legacy[0], baseline_mode="off", candidate_mode="on"))


# ---------------------------------------------------------------------------------------------
# the command, with the stand-in


def test_five_modes_then_8k_then_a_rerun(fake):
    assert fake("--modes", "off", "on", "no-attn", "on-pr-moe", "pr", "--batch-sizes", "1", "16", "64") == 0
    f1024 = fake.out / "e2e-NVIDIA_H200.json"
    doc = json.loads(f1024.read_text())
    recs = doc["records"]
    assert len(recs) == 6 * 3 * 2  # pairs x batch sizes x phases
    by = _by_pair(recs)
    r = by[("off", "on", 64, "prefill")]
    assert r["baseline"] == "plugin off (SGLANG_GEMMA4_OPT=0)" and r["candidate"] == "plugin on"
    assert r["baseline_us"] == pytest.approx(SCALE["off"] * 64 * 0.02 * 1e6)  # median of passes 2 and 3 only
    assert r["candidate_us"] == pytest.approx(SCALE["on"] * 64 * 0.02 * 1e6)
    assert r["latency_change"] == pytest.approx(SCALE["on"] / SCALE["off"] - 1)
    assert len(r["candidate_runs_us"]) == 2 and r["timestamp"] == doc["header"]["timestamp"]
    r = by[("on-pr-moe", "on", 64, "prefill")]
    assert r["latency_change"] == pytest.approx(SCALE["on"] / SCALE["on-pr-moe"] - 1)
    assert r["baseline_env"] == {"SGLANG_GEMMA4_OPT": "1", "SGLANG_GEMMA4_OPT_DISABLE": "moe_configs,moe_small_batch",
                                 "SGLANG_MOE_CONFIG_DIR": "<PR #26588's tables over sglang's, a temp folder>"}
    assert r["baseline_moe_tables"]["used"] == ["pr26588/triton_3_6_0/E=128,N=704,device_name=NVIDIA_H200.json"]
    assert r["candidate_moe_tables"]["used"] == ["plugin/triton_3_6_0/E=128,N=704,device_name=NVIDIA_H200.json"]
    assert r["baseline_plugin_status"]["moe_configs"] == "disabled" and r["plugin_status"]["moe_configs"] == "applied"
    r = by[("off", "pr", 1, "decode")]
    assert r["candidate_env"]["SGLANG_GEMMA4_OPT_DISABLE"] == "extend_attention_kernel,moe_configs,moe_small_batch"
    assert r["baseline_moe_tables"]["used"] == [] and r["baseline_moe_tables"]["missing"]
    h = doc["header"]
    assert set(h["modes"]) == {"off", "on", "no-attn", "on-pr-moe", "pr"} and "runs" not in h["modes"]["on"]
    assert h["pr_moe_tables"]["pr_files"] and len(h["runs"]) == 1
    assert (fake.out / "e2e-pr.log").exists() and (fake.out / "e2e-pr.jsonl").exists()

    # the 8k prompt lands next to the 1024 file, not over it
    assert fake("--modes", "no-attn", "on", "--batch-sizes", "1", "--input-len", "8192") == 0
    f8k = fake.out / "e2e-in8192-NVIDIA_H200.json"
    recs8k = json.loads(f8k.read_text())["records"]
    assert {(report.e2e_pair(r), r["case"]["input_len"]) for r in recs8k} == {(("no-attn", "on"), 8192)}
    assert json.loads(f1024.read_text()) == doc
    assert (fake.out / "e2e-in8192-on.log").exists()

    # a later off/on run replaces off -> on and keeps the other pairs (and says which run each came from)
    assert fake("--modes", "off", "on", "--batch-sizes", "64") == 0
    doc2 = json.loads(f1024.read_text())
    by2 = _by_pair(doc2["records"])
    assert len(doc2["records"]) == len(recs)  # same keys: bs64 off->on replaced, the rest kept
    assert by2[("off", "on", 64, "prefill")]["timestamp"] == doc2["header"]["timestamp"]
    assert by2[("no-attn", "on", 64, "prefill")]["timestamp"] == doc["header"]["timestamp"]
    assert len(doc2["header"]["runs"]) == 2 or doc2["header"]["timestamp"] == doc["header"]["timestamp"]

    # the report: one section per file, a table per pair, the targets from these records
    md = report.generate(fake.out)
    assert "## Whole model, bench_one_batch, dummy weights, input 1024, output 64: NVIDIA H200" in md
    assert "## Whole model, bench_one_batch, dummy weights, input 8192, output 64: NVIDIA H200" in md
    for a, b in e2e.resolve_pairs(["off", "pr", "on-pr-moe", "no-attn", "on"], None):
        assert f"### {a} → {b}: {e2e.MODES[a].label} → {e2e.MODES[b].label}" in md
    assert "| batch | phase | off ms | pr ms | on-pr-moe ms | no-attn ms | on ms |" in md
    assert f"| 64 | prefill | {SCALE['off'] * 64 * 20:.1f} | {SCALE['pr'] * 64 * 20:.1f} |" in md
    assert "- `pr`: PR #26588 state" in md
    assert "its log: tables `pr26588/triton_3_6_0/E=128,N=704,device_name=NVIDIA_H200.json`" in md
    assert ("its log: no table (sglang's default config), looked for "
            "`sglang/triton_3_6_0/E=128,N=704,device_name=NVIDIA_H200.json`") in md
    assert "| issue 3: e2e prefill bs64×1024 ≥20% shorter (off→on) | -40.0% (1280.0 → 768.0 ms) | yes |" in md
    assert "| issue 4: e2e prefill bs64×1024 ≥15% shorter than the plugin with PR #26588's MoE tables " \
           "(on-pr-moe→on) | -20.0% (960.0 → 768.0 ms) | yes |" in md
    assert "| issue 6: e2e prefill bs64×1024 ≥10% shorter (no-attn→on) | -14.3% (896.0 → 768.0 ms) | yes |" in md
    assert "| issue 6: e2e prefill bs1×8192 ≥25% shorter (no-attn→on) | -14.3% (112.0 → 96.0 ms) | **no** |" in md
    assert "not measured" not in md.split("## Whole model")[0]
    block = report.readme_block(fake.out)
    assert "issue 6: e2e prefill bs1×8192" in block and "-14.3% (112.0 → 96.0 ms)" in block


def test_h100_pr_tables_are_sglangs_own_lookup(fake, monkeypatch):
    monkeypatch.setenv("FAKE_GPU", "NVIDIA H100 80GB HBM3")
    assert fake("--modes", "off", "pr", "--batch-sizes", "1", "--passes", "1") == 0
    recs = json.loads((fake.out / "e2e-NVIDIA_H100_80GB_HBM3.json").read_text())["records"]
    t = recs[0]["candidate_moe_tables"]
    assert "the PR has no table for NVIDIA H100 80GB HBM3, so this is sglang's own lookup" in t["note"]
    assert t["used"] == ["sglang/triton_3_5_1/E=128,N=704,device_name=NVIDIA_H100_80GB_HBM3.json"]
    assert recs[0]["baseline_moe_tables"]["used"] == t["used"]  # off: the same sglang table


def test_a_failed_mode_keeps_the_finished_pairs(fake, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "no-attn")
    assert fake("--modes", "off", "on", "no-attn", "--batch-sizes", "1", "--passes", "1") == 1
    recs = json.loads((fake.out / "e2e-NVIDIA_H200.json").read_text())["records"]
    assert {report.e2e_pair(r) for r in recs} == {("off", "on")}


def test_missing_pr_tables_is_an_error_before_anything_runs(fake, tmp_path, capsys):
    assert fake("--modes", "off", "pr", "--pr-moe-tables", str(tmp_path / "nowhere")) == 2
    assert "need PR #26588's MoE tables" in capsys.readouterr().err
    assert fake("--modes", "off", "on", "--compare", "on:pr") == 2
    assert not fake.out.exists() or not list(fake.out.iterdir())
    # modes that do not need the tables run without them
    assert fake("--modes", "off", "on", "--batch-sizes", "1", "--passes", "1", "--pr-moe-tables",
                str(tmp_path / "nowhere")) == 0


def test_report_rows_say_not_measured(tmp_path):
    """A GPU with only kernel results still lists every whole-model target, marked not measured."""
    src = ROOT / "benchmarks/results/qkv_norm-NVIDIA_H200.json"
    (tmp_path / src.name).write_text(src.read_text())
    rows = {n: (v, ok) for n, v, ok in report.targets({"qkv_norm": report.load_results(src)[1]})}
    e2e_rows = [n for n in rows if "e2e" in n]
    assert len(e2e_rows) == 6 and all(rows[n] == ("not measured", None) for n in e2e_rows)
    block = report.readme_block(tmp_path)
    assert "| issue 6: e2e prefill bs1×8192 ≥25% shorter (no-attn→on) | not measured | - |" in block


def test_legacy_file_reports_off_on(tmp_path):
    (tmp_path / "e2e-NVIDIA_H200.json").write_text(LEGACY.read_text())
    md = report.generate(tmp_path)
    assert "### off → on: plugin off (SGLANG_GEMMA4_OPT=0) → plugin on" in md
    assert "| issue 3: e2e prefill bs16×1024 ≥20% shorter (off→on) | -27.4%" in md
    assert "| issue 4: e2e prefill bs64×1024 ≥15% shorter than the plugin with PR #26588's MoE tables " \
           "(on-pr-moe→on) | not measured | - |" in md


def test_newest_record_wins(tmp_path):
    old = {"suite": "e2e", "gpu": "G", "case": {"batch": 64, "input_len": 1024, "output_len": 64, "phase": "prefill",
                                                "tp": 1},
           "baseline_mode": "no-attn", "candidate_mode": "on", "baseline_us": 100.0, "candidate_us": 95.0,
           "timestamp": "2026-01-01T00:00:00+00:00"}
    new = dict(old, candidate_us=80.0, timestamp="2026-02-01T00:00:00+00:00")
    rows = {n: v for n, v, _ in report.targets({"e2e": [new, old]})}
    assert rows["issue 6: e2e prefill bs64×1024 ≥10% shorter (no-attn→on)"].startswith("-20.0%")


def test_tp2_rows_go_to_their_own_file(fake, capsys):
    assert fake("--modes", "off", "on", "--batch-sizes", "16", "--passes", "2") == 0
    f1 = fake.out / "e2e-NVIDIA_H200.json"
    tp1 = json.loads(f1.read_text())
    assert fake("--modes", "off", "on", "--batch-sizes", "16", "--passes", "2", "--tp", "2") == 0
    f2 = fake.out / "e2e-tp2-NVIDIA_H200.json"
    recs = json.loads(f2.read_text())["records"]
    assert {r["case"]["tp"] for r in recs} == {2} and len(recs) == 2
    assert json.loads(f1.read_text()) == tp1  # the TP 1 rows are untouched
    assert (fake.out / "e2e-tp2-on.log").exists() and "--tp-size 2" in capsys.readouterr().out
    md = report.generate(fake.out)
    assert md.count("## Whole model, bench_one_batch") == 2
    # the issue targets are TP 1 targets: the TP 2 file alone does not satisfy them
    f1.unlink()
    assert "| issue 3: e2e prefill bs16×1024 ≥20% shorter (off→on) | not measured" in report.generate(fake.out)
