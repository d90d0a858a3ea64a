"""bench-serve: the plan, the records, the kernel profile parser, and whole runs against a real small HTTP
server (tests/_fake_sglang_server.py, a stand-in for sglang.launch_server that streams /generate as
sglang does) with sglang's real bench_serving as the client."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _subproc import wait_dead

from sglang_gemma4_opt.bench import serve
from sglang_gemma4_opt.tools import server as srv

FAKE = Path(__file__).with_name("_fake_sglang_server.py")
HAS_BENCH_SERVING = True
try:
    from sglang_gemma4_opt.bench import serve_client

    serve_client.load_bench_module()
except Exception:  # sglang without bench_serving's dependencies
    HAS_BENCH_SERVING = False
needs_client = pytest.mark.skipif(not HAS_BENCH_SERVING, reason="sglang's bench_serving does not import here")


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(list(extra))


# ------------------------------------------------------------------------------------------ plan
def test_plan_cold_first_then_per_length_ttft_probe_and_concurrencies():
    a = _args("--input-lens", "1024", "8192", "--concurrencies", "1", "16", "64")
    rows = serve.plan_rows(a)
    assert [r.key for r in rows] == [
        "cold in1024 out256 c64",
        "ttft in1024 out1 c1", "load in1024 out256 c1", "load in1024 out256 c16", "load in1024 out256 c64",
        "ttft in8192 out1 c1", "load in8192 out256 c1", "load in8192 out256 c16", "load in8192 out256 c64"]
    assert [r.prompts for r in rows] == [128, 16, 8, 32, 128, 16, 8, 32, 128]
    assert serve.plan_rows(_args("--no-cold", "--ttft-prompts", "0", "--input-lens", "7", "--concurrencies", "3",
                                 "--prompts", "5"))[0] == serve.Row("load", 7, 256, 3, 5)


def test_servers_and_pairs():
    a = _args("--modes", "off", "pr", "on", "--mtp")
    names = serve.servers(a)
    assert names == ["off", "pr", "on", "off+mtp", "pr+mtp", "on+mtp"]
    assert serve.pairs_for(names) == [("off", "pr"), ("off", "on"), ("pr", "on"), ("off+mtp", "pr+mtp"),
                                      ("off+mtp", "on+mtp"), ("pr+mtp", "on+mtp"), ("off", "off+mtp"),
                                      ("pr", "pr+mtp"), ("on", "on+mtp")]
    assert serve.servers(_args("--mtp-only", "--modes", "on")) == ["on+mtp"]


def test_server_command_and_environment(tmp_path):
    a = _args("--tp", "2", "--extra-server-args=--chunked-prefill-size 4096")
    cmd = serve.server_command(a, "on+mtp", tmp_path / "t", tmp_path / "d", 31000)
    s = " ".join(cmd)
    for part in ("--load-format dummy", "--attention-backend triton", "--tp-size 2", "--port 31000",
                 "--speculative-algorithm NEXTN", f"--speculative-draft-model-path {tmp_path / 'd'}",
                 "--speculative-draft-load-format dummy", "--speculative-num-steps 3",
                 "--speculative-num-draft-tokens 4", "--skip-server-warmup", "--grammar-backend none"):
        assert part in s
    assert cmd[-2:] == ["--chunked-prefill-size", "4096"]
    assert "--speculative-algorithm" not in serve.server_command(a, "off", tmp_path, tmp_path, 1)
    base = {"SGLANG_GEMMA4_OPT": "1", "SGLANG_GEMMA4_OPT_DISABLE": "qkv_rmsnorm", "NCCL_NVLS_ENABLE": "1"}
    off = serve.server_env("off", None, base)
    assert off["SGLANG_GEMMA4_OPT"] == "0" and "SGLANG_GEMMA4_OPT_DISABLE" not in off
    on = serve.server_env("on+mtp", None, base)
    assert on["SGLANG_GEMMA4_OPT"] == "1" and "SGLANG_GEMMA4_OPT_DISABLE" not in on
    assert on["SGLANG_ENABLE_SPEC_V2"] == "0"
    for env in (off, on):  # multicast off in every server, also over an inherited value
        assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == \
            ("0", "1", "1")
    pr = serve.server_env("pr", "/tmp/prdir", base)
    assert pr["SGLANG_MOE_CONFIG_DIR"] == "/tmp/prdir"
    assert set(pr["SGLANG_GEMMA4_OPT_DISABLE"].split(",")) == {"extend_attention_kernel", "moe_configs",
                                                                "moe_small_batch"}


@pytest.mark.parametrize("bad", [["--output-len", "1"], ["--concurrencies", "0"], ["--repeats", "0"],
                                 ["--modes", "on", "on"], ["--tag", "a/b"], ["--tp", "0"]])
def test_bad_arguments_are_one_line_and_exit_2(bad, capsys):
    assert serve.run(_args(*bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


# ------------------------------------------------------------------------------------------ records
def _res(server, rows):
    return {"server": server, "errors": [], "rows": [
        {"row": dict(kind=k, input_len=L, output_len=o, concurrency=c, prompts=8), "passes": [m], "metrics": m}
        for (k, L, o, c), m in rows]}


def test_records_ratios_and_worst_of_the_judged_metrics():
    base = {"median_ttft_ms": 50.0, "median_tpot_ms": 6.0, "output_throughput": 100.0, "median_e2e_latency_ms": 1500.0,
            "median_itl_ms": 6.0}
    cand = {"median_ttft_ms": 52.0, "median_tpot_ms": 5.0, "output_throughput": 125.0, "median_e2e_latency_ms": 1300.0,
            "median_itl_ms": 5.0}
    probe_b, probe_c = {"median_ttft_ms": 47.7, "median_e2e_latency_ms": 47.7}, {"median_ttft_ms": 52.0,
                                                                                   "median_e2e_latency_ms": 52.0}
    results = {"off": _res("off", [(("load", 1024, 256, 1), base), (("ttft", 1024, 1, 1), probe_b)]),
               "on": _res("on", [(("load", 1024, 256, 1), cand), (("ttft", 1024, 1, 1), probe_c),
                                 (("load", 8192, 256, 1), cand)])}
    recs = serve.make_records(results, [("off", "on")], "GPU X", 1, "t0")
    assert len(recs) == 2  # the 8192 row has no stock counterpart
    load, probe = recs
    assert load["case"] == {"row": "load", "input_len": 1024, "output_len": 256, "concurrency": 1, "tp": 1,
                            "mtp": False}
    assert load["ratios"]["ttft"] == pytest.approx(50 / 52) and load["ratios"]["tpot"] == pytest.approx(1.2)
    assert load["ratios"]["throughput"] == pytest.approx(1.25)
    assert load["worst_ratio"] == pytest.approx(50 / 52) and load["worst_of"] == ["ttft", "tpot", "throughput"]
    assert load["speedup"] == pytest.approx(1500 / 1300)  # the record schema's speedup: end-to-end latency
    assert probe["worst_of"] == ["ttft", "e2e"] and probe["worst_ratio"] == pytest.approx(47.7 / 52.0)
    assert load["gpu"] == "GPU X" and load["suite"] == "serve" and load["timestamp"] == "t0"


def test_cold_vs_warm():
    r = _res("on", [(("cold", 1024, 256, 64), {"output_throughput": 2862.0, "median_ttft_ms": 400.0}),
                    (("load", 1024, 256, 64), {"output_throughput": 3287.0, "median_ttft_ms": 200.0})])
    cw = serve.cold_vs_warm(r)
    assert cw["throughput_cold_over_warm"] == pytest.approx(2862 / 3287)
    assert cw["ttft_cold_over_warm"] == pytest.approx(2.0)
    assert serve.cold_vs_warm(_res("on", [(("load", 1024, 256, 64), {})])) is None


def test_kernel_profile_parse_and_groups(tmp_path):
    ev = [{"ph": "X", "cat": "kernel", "name": "_hopper_extend_kernel", "dur": 300.0},
          {"ph": "X", "cat": "kernel", "name": "_hopper_extend_kernel", "dur": 100.0},
          {"ph": "X", "cat": "kernel", "name": "fused_moe_kernel", "dur": 900.0},
          {"ph": "X", "cat": "kernel", "name": "nvjet_tst_128x256_64x4", "dur": 60.0},
          {"ph": "X", "cat": "kernel", "name": "void flashinfer::norm::RMSNormKernel<8u>", "dur": 20.0},
          {"ph": "X", "cat": "kernel", "name": "mystery", "dur": 2.0},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 5000.0},
          {"ph": "i", "cat": "kernel", "name": "instant", "dur": 7.0}]
    p = tmp_path / "x-TP-0.trace.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    k, spans = serve.parse_trace(p)
    assert k["_hopper_extend_kernel"] == {"us": 400.0, "n": 2} and "aten::mm" not in k and "instant" not in k
    s = serve.summarize_kernels(k, per=2)
    assert s["groups_us"] == {"moe": 450.0, "attention": 200.0, "gemm": 30.0, "norm": 10.0, "other": 1.0}
    assert s["total_us"] == pytest.approx(691.0)
    assert s["top_kernels"][0] == {"name": "fused_moe_kernel", "group": "moe", "us": 450.0, "launches": 0.5}
    assert "forward_span_us" not in s


def test_forward_windows_split_requests_and_measure_gpu_idle():
    # request 1: kernels 0-10 and 20-30 (10 us idle inside); request 2 after a long gap: 10000-10005, overlapping 10003-10008
    spans = [(0.0, 10.0), (20.0, 30.0), (10000.0, 10005.0), (10003.0, 10008.0)]
    assert serve.forward_windows(spans, 2) == [{"span_us": 30.0, "busy_us": 20.0},
                                                        {"span_us": 8.0, "busy_us": 8.0}]
    s = serve.summarize_kernels({"k": {"us": 33.0, "n": 4}}, per=2, spans=spans)
    assert s["forward_busy_us"] == 14.0 and s["forward_span_us"] == 19.0
    assert serve.forward_windows(spans, 1) == [{"span_us": 10008.0, "busy_us": 28.0}]


# ------------------------------------------------------------------------------------------ the client
def _fake_server(tmp_path, timing, **cfg):
    piddir = tmp_path / "pids"
    piddir.mkdir(exist_ok=True)
    conf = {"piddir": str(piddir), "timing": timing, **cfg}
    return dict(os.environ, FAKE_SERVE_CONFIG=json.dumps(conf)), piddir


@needs_client
def test_client_counts_the_first_token_by_completion_tokens(tmp_path):
    """The first three tokens stream with empty text: TTFT is the prefill (60 ms), not prefill + 2 tokens (180 ms);
    sglang's own client (the same module, unpatched) reports the later time, so the test can fail."""
    from sglang_gemma4_opt.tools.dummy_model import write_folder, target_config

    env, _ = _fake_server(tmp_path, {"1": {"prefill_s": 0.06, "token_s": 0.06}}, empty_tokens=3)
    env["SGLANG_GEMMA4_OPT"] = "1"
    port = srv.free_port()
    target = write_folder(tmp_path / "target", target_config())
    server = srv.Server([sys.executable, str(FAKE), "--port", str(port), "--model-path", "x"], "127.0.0.1", port,
                        tmp_path / "server.log", env=env, startup_timeout=30, grace=5).start()
    try:
        server.wait_ready(poll=0.1)
        common = ["--backend", "sglang", "--base-url", server.base_url, "--model", str(target), "--tokenizer",
                  str(target), "--dataset-name", "random-ids", "--tokenize-prompt", "--random-range-ratio", "1",
                  "--random-input-len", "32", "--random-output-len", "6", "--num-prompts", "3",
                  "--max-concurrency", "1", "--request-rate", "inf", "--warmup-requests", "0", "--disable-tqdm"]
        ours = tmp_path / "ours.jsonl"
        subprocess.run([sys.executable, "-m", "sglang_gemma4_opt.bench.serve_client", *common, "--output-file",
                        str(ours)], check=True, capture_output=True, timeout=120)
        theirs = tmp_path / "theirs.jsonl"
        code = ("import sys; from sglang_gemma4_opt.bench import serve_client as sc; m = sc.load_bench_module(); "
                f"sys.argv = ['x'] + {common + ['--output-file', str(theirs)]!r}; exec(sc._main_block(m), m.__dict__)")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    finally:
        server.stop()
    m_ours, m_theirs = serve.read_pass(ours), serve.read_pass(theirs)
    assert 55 <= m_ours["median_ttft_ms"] < 120, m_ours
    assert m_theirs["median_ttft_ms"] >= 170, m_theirs
    assert m_ours["total_output_tokens"] == 18 and m_ours["median_tpot_ms"] == pytest.approx(60, abs=15)


def test_token_counting_decoder_marks_only_token_bearing_chunks():
    dec = serve_client.TokenCountingDecoder(json)
    assert dec.loads('{"text": "", "meta_info": {"completion_tokens": 2}}')["text"] == serve_client.PLACEHOLDER
    assert dec.loads('{"text": "a", "meta_info": {"completion_tokens": 2}}')["text"] == "a"
    assert dec.loads('{"text": "", "meta_info": {"completion_tokens": 0}}')["text"] == ""
    assert dec.loads("[1, 2]") == [1, 2] and dec.dumps({"a": 1}) == '{"a": 1}'


# ------------------------------------------------------------------------------------------ whole runs
def _bench_cmd(tmp_path, *extra):
    out = tmp_path / "results"
    return [sys.executable, "-m", "sglang_gemma4_opt", "bench-serve", "--launcher",
            f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))}", "--out", str(out), "--log-dir",
            str(tmp_path / "logs"), "--model-dir", str(tmp_path / "model"), "--startup-timeout", "60",
            "--stop-grace", "5", "--client-timeout", "120", *extra], out


def _pids(piddir: Path, tag: str) -> list[int]:
    return [int(x) for x in (piddir / f"pids-{tag}").read_text().split()]


@needs_client
def test_off_vs_on_end_to_end_with_cold_pass_and_profile(tmp_path):
    """Stock prefill 80 ms / token 20 ms, plugin 60 / 15 ms: the recorded ratios come out near 80/60 and 20/15;
    the plugin server's first 4 requests take 150 ms longer (cold), which the cold-vs-warm ratio shows."""
    env, piddir = _fake_server(
        tmp_path, {"0": {"prefill_s": 0.08, "token_s": 0.02},
                   "1": {"prefill_s": 0.06, "token_s": 0.015, "cold_requests": 4, "cold_extra_s": 0.15}},
        empty_tokens=2,
        kernels={"0": [["fused_moe_kernel", 900.0], ["_fwd_kernel", 300.0]],
                 "1": [["fused_moe_kernel", 900.0], ["_hopper_extend_kernel", 100.0]]})
    cmd, out = _bench_cmd(tmp_path, "--input-lens", "64", "--output-len", "6", "--concurrencies", "1", "4",
                          "--cold-input-len", "64", "--ttft-prompts", "3", "--prompts", "4", "--profile-prefill",
                          "--profile-requests", "2", "--no-plot")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = list(out.glob("serve-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    recs = {(r["case"]["row"], r["case"]["concurrency"]): r for r in doc["records"]}
    assert set(recs) == {("cold", 4), ("ttft", 1), ("load", 1), ("load", 4)}
    assert all((r["baseline_mode"], r["candidate_mode"]) == ("off", "on") for r in recs.values())
    assert recs[("ttft", 1)]["ratios"]["ttft"] == pytest.approx(80 / 60, rel=0.15)
    assert recs[("load", 1)]["ratios"]["tpot"] == pytest.approx(20 / 15, rel=0.15)
    assert recs[("load", 1)]["ratios"]["ttft"] == pytest.approx(80 / 60, rel=0.15)
    runs = doc["header"]["servers_run"]
    assert runs["on"]["cold_vs_warm"]["throughput_cold_over_warm"] < 0.85
    assert runs["off"]["cold_vs_warm"]["throughput_cold_over_warm"] > 0.85
    prof = runs["on"]["profiles"][0]
    assert prof["groups_us"] == {"moe": 450.0, "attention": 50.0} and prof["input_len"] == 64
    assert runs["off"]["env"] == {"SGLANG_GEMMA4_OPT": "0"} and runs["on"]["env"] == {"SGLANG_GEMMA4_OPT": "1"}
    assert runs["on"]["plugin_log_lines"] == ["INFO sglang-gemma4-opt: (fake) plugin switch 1"]
    assert "bench-serve on" in p.stdout and "cold pass throughput" in p.stdout
    # servers (and the child each started) are gone
    assert not wait_dead(_pids(piddir, "0") + _pids(piddir, "1"))
    argv = json.loads((piddir / "argv-1.json").read_text())["argv"]
    assert argv[argv.index("--load-format") + 1] == "dummy"
    assert (tmp_path / "model" / "target" / "config.json").exists()
    # --collect rebuilds the same records from the logs alone (what a run cut short by a time limit leaves)
    out2 = tmp_path / "collected"
    p = subprocess.run([sys.executable, "-m", "sglang_gemma4_opt", "bench-serve", "--modes", "off", "on", "--collect",
                        str(tmp_path / "logs"), "--like", str(files[0]), "--profile-requests", "2", "--out", str(out2),
                        "--no-plot"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc2 = json.loads((out2 / files[0].name).read_text())
    assert [r["ratios"] for r in doc2["records"]] == [r["ratios"] for r in doc["records"]]
    assert doc2["header"]["timestamp"] == doc["header"]["timestamp"]
    assert doc2["header"]["servers_run"]["on"]["profiles"][0]["groups_us"] == prof["groups_us"]


@needs_client
def test_mtp_servers_get_the_draft_and_a_server_dying_is_reported(tmp_path):
    env, piddir = _fake_server(tmp_path, {"1": {"prefill_s": 0.01, "token_s": 0.005}}, die_at_startup=True)
    cmd, out = _bench_cmd(tmp_path, "--modes", "on", "--mtp-only", "--input-lens", "16", "--output-len", "3",
                          "--concurrencies", "1", "--no-cold", "--ttft-prompts", "0", "--prompts", "2")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "exited with code 3 before it was ready" in p.stderr
    argv = json.loads((piddir / "argv-1-mtp.json").read_text())["argv"]
    assert argv[argv.index("--speculative-draft-model-path") + 1] == str(tmp_path / "model" / "draft")
    doc = json.loads(next(out.glob("serve-mtp-*.json")).read_text())
    assert "fake failure while loading the model" in json.dumps(doc["header"]["servers_run"]["on+mtp"])


@needs_client
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_the_server_group(tmp_path, sig):
    env, piddir = _fake_server(tmp_path, {"0": {"prefill_s": 5.0, "token_s": 1.0}, "1": {"prefill_s": 0.01,
                                                                                           "token_s": 0.01}})
    cmd, out = _bench_cmd(tmp_path, "--input-lens", "16", "--output-len", "3", "--concurrencies", "1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not (piddir / "pids-0").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # inside the first (slow) pass
        pids = _pids(piddir, "0")
        p.send_signal(sig)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + sig, p.stdout.read()
    assert not wait_dead(pids)
    assert not (piddir / "pids-1").exists(), "no server starts after an interrupt"


def test_plan_files_of_older_runs_are_read_from_pass_names(tmp_path):
    argv = ["--random-output-len", "256", "--num-prompts", "64", "--output-file", "/elsewhere/on-load-in8192-c64-0.jsonl"]
    (tmp_path / "on-plan.json").write_text(json.dumps({"passes": [
        {"name": "on-load-in8192-c64-warmup", "argv": argv}, {"name": "on-load-in8192-c64-0", "argv": argv}]}))
    warm, timed = serve.load_plan(tmp_path / "on-plan.json", tmp_path)
    assert timed.row == serve.Row("load", 8192, 256, 64, 64) and timed.timed and not warm.timed
    assert timed.out_file == tmp_path / "on-load-in8192-c64-0.jsonl"
    (tmp_path / "on-client.log").write_text(serve.PASS_PREFIX + json.dumps({"name": "on-load-in8192-c64-warmup",
                                                                            "ok": True, "error": None}) + "\n")
    rows, errors = serve.collect_rows([warm, timed], tmp_path / "on-client.log")
    assert rows == [] and errors == ["on-load-in8192-c64-0: did not run"]


def test_dry_run_starts_nothing(tmp_path, capsys):
    a = _args("--dry-run", "--modes", "off", "on", "--mtp", "--model-dir", str(tmp_path / "m"), "--input-lens", "1024")
    assert serve.run(a) == 0
    out = capsys.readouterr().out
    starts = [ln for ln in out.splitlines() if ln.startswith("server ")]
    assert [ln.split(":")[0] for ln in starts] == ["server off", "server on", "server off+mtp", "server on+mtp"]
    assert "SGLANG_GEMMA4_OPT=0" in starts[0] and "pairs: off:on, off+mtp:on+mtp, off:off+mtp, on:on+mtp" in out
    assert "cold in1024 out256 c64: 128 prompts x 1 pass(es)" in out
