"""GSM8K regression tool: answer extraction, scoring, limits, reports, and the server lifecycle.

The lifecycle tests start a small but real HTTP server (FAKE_SERVER below, a stand-in for
`python -m sglang.launch_server` that answers /health, /get_model_info, /generate and /server_info
the way sglang does) through the tool's --launcher option, and the tool runs sglang's real
`python -m sglang.test.few_shot_gsm8k` client against it. The fake server answers the first
`correct` share of the questions right (it looks each question up in the data file), so the
scores the tool reports are known in advance.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _subproc import alive, wait_dead

from sglang_gemma4_opt.tools import gsm8k_score as gs
from sglang_gemma4_opt.tools import server as srv
from sglang_gemma4_opt.tools.gsm8k_report import RunResult, Thresholds, evaluate, exit_code, write_reports

FAKE_SERVER = textwrap.dedent(r'''
    import argparse, json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--speculative-algorithm")
    args, rest = ap.parse_known_args()
    cfg = json.loads(os.environ["FAKE_SERVER_CONFIG"])
    mode = os.environ.get("SGLANG_GEMMA4_OPT", "unset")
    piddir = cfg["piddir"]
    with open(os.path.join(piddir, f"argv-{mode}.json"), "w") as f:
        json.dump(sys.argv[1:], f)
    print(f"fake server: SGLANG_GEMMA4_OPT={mode}", flush=True)
    if cfg.get("die_at_startup"):
        print("RuntimeError: fake failure while loading the model", flush=True)
        sys.exit(3)
    # like sglang's scheduler: a child in the same process group that must die with the server
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(piddir, f"pids-{mode}"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    print(f"INFO sglang-gemma4-opt: (fake) plugin switch {mode}", flush=True)

    rows = [json.loads(l) for l in open(cfg["data"]) if l.strip()]
    index = {r["question"]: i for i, r in enumerate(rows)}
    n_right = round(cfg["correct"][mode] * cfg["n"])
    ready_at = time.time() + cfg.get("startup_delay", 0.0)

    class H(BaseHTTPRequestHandler):
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
                return self._send(200 if time.time() >= ready_at else 503)
            if self.path in ("/get_model_info", "/model_info"):
                return self._send(200, {"model_path": args.model_path, "is_generation": True})
            if self.path == "/server_info":
                return self._send(200, {"version": "fake", "speculative_algorithm":
                                        "FROZEN_KV_MTP" if args.speculative_algorithm else None,
                                        "internal_states": [{"avg_spec_accept_length": cfg["accept"][mode]}]})
            self._send(404)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = req["text"]
            q = text[text.rfind("Question: ") + len("Question: "): text.rfind("\nAnswer:")]
            i = index[q]
            gold = int(rows[i]["answer"].rsplit("####", 1)[1].replace(",", ""))
            ans = gold if i < n_right else gold + 1
            self._send(200, {"text": f" Some steps.\n#### {ans}",
                             "meta_info": {"completion_tokens": 7, "prompt_tokens": len(text.split())}})

    ThreadingHTTPServer((args.host, args.port), H).serve_forever()
''')

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A shirt costs $1,200 and is cut by $200. Price?", "answer": "1200-200=1000\n#### 1,000"},
    {"question": "Negative test: 2 minus 5?", "answer": "2-5=-3\n#### -3"},
    {"question": "Half of 5?", "answer": "5/2=2.5\n#### 2.5"},
]


# ------------------------------------------------------------------------ extraction and scoring
@pytest.mark.parametrize("text,want", [("72", 72), (" $1,234.50. ", 1234.5), ("-3", -3), ("18.", 18),
                                       ("1,000", 1000), ("$ 5", 5), ("abc", None), ("", None), ("1.2.3", None)])
def test_normalize_number(text, want):
    got = gs.normalize_number(text)
    assert got == want and type(got) is type(want)


def test_gold_answer_takes_the_number_after_the_last_hashes():
    assert [gs.gold_answer(r["answer"]) for r in ROWS] == [7, 1000, -3, 2.5]
    with pytest.raises(ValueError):
        gs.gold_answer("no marker 5")
    with pytest.raises(ValueError):
        gs.gold_answer("#### five")


def test_sglang_rule_is_last_run_of_digits_like_few_shot_gsm8k():
    assert gs.sglang_answer_value("so 3 then 1,234 apples") == 1234
    assert gs.sglang_answer_value("It is -3.") == 3  # sign ignored, as upstream
    assert gs.sglang_answer_value("2.5") == 5  # decimals split, as upstream
    assert gs.sglang_answer_value("none") == gs.INVALID


def test_sglang_rule_matches_the_client_function():
    fs = pytest.importorskip("sglang.test.few_shot_gsm8k")
    for text in ["so 3 then 1,234 apples", "It is -3.", "2.5", "none", "#### 18\nQuestion 4", ""]:
        assert gs.sglang_answer_value(text) == fs.get_answer_value(text), text
    assert gs.INVALID == fs.INVALID


@pytest.mark.parametrize("rule,want", [("first", 3), ("last", 42), ("hash", 18), ("sglang", 42)])
def test_extract_answer_rules(rule, want):
    assert gs.extract_answer("3 cats, $1,000 each? #### 18\nThen 42", rule) == want


def test_extract_answer_hash_falls_back_and_reads_decimals():
    assert gs.extract_answer("The total is 2.50 dollars", "hash") == 2.5
    assert gs.extract_answer("#### -3", "hash") == -3
    assert gs.extract_answer("#### none\n5", "hash") == gs.INVALID
    assert gs.extract_answer("nothing", "last") == gs.INVALID
    with pytest.raises(ValueError):
        gs.extract_answer("1", "middle")


def test_score_counts_correct_and_invalid():
    s = gs.score([7, 5, gs.INVALID, 3], [7, 1000, 3, 3])
    assert (s.correct, s.total, s.invalid) == (2, 4, 1) and s.accuracy == 0.5
    with pytest.raises(ValueError):
        gs.score([1], [1, 2])


def test_parse_client_output_reads_the_printed_metrics():
    out = "progress 100%\nAccuracy: 0.445\nInvalid: 0.010\nLatency: 12.500 s\nOutput throughput: 321.000 token/s\n"
    assert gs.parse_client_output(out) == {"accuracy": 0.445, "invalid": 0.01, "latency_s": 12.5,
                                           "output_throughput": 321.0}
    with pytest.raises(ValueError):
        gs.parse_client_output("Traceback ...\nConnectionRefusedError")


def _dump(states):
    """What sglang.utils.dump_state_text writes for string states."""
    return "".join("=" * 40 + f" {i} " + "=" * 40 + "\n" + s + "\n" + "=" * 80 + "\n\n" for i, s in enumerate(states))


def test_state_dump_round_trip_and_rescore():
    shots = 2
    prefix = gs.few_shot_prefix(ROWS, shots)
    gens = [" 3 and 4 make #### 7", " Price #### 999\n" + "=" * 40, " #### 3", " nothing"]
    states = [prefix + gs.question_prompt(ROWS, i) + g for i, g in enumerate(gens)]
    assert gs.parse_state_dump(_dump(states)) == states
    sc, per_q = gs.rescore(states, ROWS, shots)
    # labels by the sglang rule: 7, 1000, 3 (sign dropped), 5 ("2.5" -> last digits 5)
    assert [q["label"] for q in per_q] == [7, 1000, 3, 5]
    assert [q["correct"] for q in per_q] == [True, False, True, False]
    assert (sc.correct, sc.total, sc.invalid) == (2, 4, 1)
    with pytest.raises(ValueError):
        gs.rescore(["not the prompt"], ROWS, shots)


def test_packaged_data_is_the_gsm8k_test_split():
    path = gs.default_data_path()
    rows = gs.load_questions(path)
    assert len(rows) == 1319
    assert all(isinstance(gs.gold_answer(r["answer"]), (int, float)) for r in rows)
    assert (path.parent / "LICENSE").read_text().startswith("MIT License")


# ------------------------------------------------------------------------------- limits, reports
def _run(name, score, accept=2.0, error=None):
    return RunResult(name=name, plugin_enabled=name == "plugin", score=score, accept_length=accept, error=error)


TH = Thresholds()


@pytest.mark.parametrize("plugin,stock,passed,failing", [
    (0.445, 0.445, True, []),
    (0.425, 0.445, True, []),  # exactly at stock - max_drop: passes
    (0.420, 0.445, False, ["plugin score vs stock"]),
    (0.360, 0.445, False, ["plugin score", "plugin score vs stock"]),  # the reverted fusion's drop
    (0.405, 0.400, False, ["plugin score"]),
    (0.410, 0.410, True, []),  # exactly at min_score
])
def test_limits(plugin, stock, passed, failing):
    v = evaluate(_run("plugin", plugin), _run("stock", stock), TH)
    assert v["passed"] is passed
    assert [c["name"] for c in v["checks"] if c["enforced"] and not c["passed"]] == failing
    assert exit_code(v) == (0 if passed else 1)


def test_accept_length_limit_and_missing_value():
    v = evaluate(_run("plugin", 0.45, accept=1.49), _run("stock", 0.45), TH)
    assert not v["passed"] and [c["name"] for c in v["checks"] if not c["passed"]] == ["plugin accept length"]
    v = evaluate(_run("plugin", 0.45, accept=None), _run("stock", 0.45), TH)
    assert not v["passed"]
    v = evaluate(_run("plugin", 0.45, accept=None), _run("stock", 0.45, accept=None), TH, need_accept=False)
    assert v["passed"], "without a draft model there is no accept length to check"


def test_stock_checks_are_informational():
    v = evaluate(_run("plugin", 0.45), _run("stock", 0.30, accept=1.0), TH)
    stock_checks = [c for c in v["checks"] if c["name"].startswith("stock")]
    assert stock_checks and all(not c["passed"] and not c["enforced"] for c in stock_checks)
    assert v["passed"]


def test_random_weights_report_but_do_not_enforce():
    v = evaluate(_run("plugin", 0.0, accept=1.0), _run("stock", 0.01), TH, enforce=False)
    assert v["passed"] and exit_code(v) == 0
    assert any(not c["passed"] for c in v["checks"])


def test_a_failed_run_is_exit_code_2_even_unenforced():
    v = evaluate(_run("plugin", None, error="server died"), _run("stock", 0.45), TH, enforce=False)
    assert not v["passed"] and v["errors"] == ["plugin"] and exit_code(v) == 2


def test_write_reports(tmp_path):
    v = evaluate(_run("plugin", 0.36), _run("stock", 0.445), TH)
    payload = {"verdict": v, "random_weights": False, "config": {
        "model_path": "m", "draft_model_path": "d", "tp": 1, "num_questions": 200, "num_shots": 5,
        "data_path": "x.jsonl", "server_args": ["--tp-size", "1"]}, "versions": {"sglang": "0.5.12"},
        "runs": [vars(_run("plugin", 0.36)), vars(_run("stock", 0.445))]}
    j, m = write_reports(tmp_path, payload)
    assert json.loads(j.read_text())["verdict"]["passed"] is False
    md = m.read_text()
    assert md.startswith("# GSM8K regression: FAILED")
    assert "| plugin score vs stock | 0.360 | >= 0.425 | FAIL |" in md
    payload["random_weights"] = True
    payload["verdict"] = evaluate(_run("plugin", 0.0), _run("stock", 0.0), TH, enforce=False)
    _, m = write_reports(tmp_path, payload)
    assert "random (dummy) weights: scores are ~0" in m.read_text()


def test_server_command_and_environment():
    from sglang_gemma4_opt.tools import gsm8k

    p = argparse.ArgumentParser()
    gsm8k.add_arguments(p)
    a = p.parse_args(["--model-path", "m", "--draft-model-path", "d", "--tp", "2",
                      "--extra-server-args=--load-format=dummy --mem-fraction-static 0.7"])
    cmd = gsm8k.server_command(a, plugin=True)
    assert cmd[cmd.index("--speculative-algorithm") + 1] == "NEXTN"
    assert cmd[cmd.index("--tp-size") + 1] == "2" and cmd[-3:] == ["--load-format=dummy", "--mem-fraction-static", "0.7"]
    assert "--enable-deterministic-inference" in cmd
    assert gsm8k.load_format(a) == "dummy", "dummy weights named in the extra args count too"
    assert gsm8k.server_env(False, {"SGLANG_GEMMA4_OPT": "1"})["SGLANG_GEMMA4_OPT"] == "0"
    assert gsm8k.server_env(True, {"SGLANG_GEMMA4_OPT": "0"})["SGLANG_GEMMA4_OPT"] == "1"
    assert gsm8k.accept_length({"internal_states": [{"avg_spec_accept_length": 2.0}, {},
                                                    {"avg_spec_accept_length": 3.0}]}) == 2.5
    assert gsm8k.accept_length({"internal_states": [{}]}) is None


# ----------------------------------------------------------------------------- server lifecycle


@pytest.fixture
def fake(tmp_path):
    """Writes the fake server and the data file; returns a helper that builds the tool's command."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    data = tmp_path / "gsm8k.jsonl"
    src = gs.load_questions(gs.default_data_path())[:12]
    data.write_text("".join(json.dumps(r) + "\n" for r in src))
    piddir = tmp_path / "pids"
    piddir.mkdir()

    def make(out, n=10, correct=(0.5, 0.5), accept=(2.0, 2.0), extra=(), **cfg):
        config = {"piddir": str(piddir), "data": str(data), "n": n,
                  "correct": {"1": correct[0], "0": correct[1]}, "accept": {"1": accept[0], "0": accept[1]}, **cfg}
        env = dict(os.environ, FAKE_SERVER_CONFIG=json.dumps(config))
        env.pop("SGLANG_GEMMA4_OPT", None)
        cmd = [sys.executable, "-m", "sglang_gemma4_opt", "gsm8k", *make.options(out, n, extra)]
        return cmd, env

    def options(out, n=10, extra=()):
        return ["--model-path", "fake/gemma4",
               "--draft-model-path", "fake/assistant", "--port", str(srv.free_port()), "--data-path", str(data),
               "--num-questions", str(n), "--num-shots", "2", "--parallel", "4", "--out", str(out),
               "--launcher", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}",
               "--startup-timeout", "60", "--stop-grace", "5", *extra]

    make.options = options
    make.piddir = piddir
    return make


def _pids(piddir: Path, mode: str) -> list[int]:
    return [int(x) for x in (piddir / f"pids-{mode}").read_text().split()]


def test_plugin_vs_stock_end_to_end_detects_a_drop(fake, tmp_path):
    """Plugin answers 5/10 right, stock 7/10: a 0.2 drop must fail with exit 1; both servers stop."""
    out = tmp_path / "out"
    cmd, env = fake(out, correct=(0.5, 0.7), accept=(2.25, 2.5))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 1, p.stdout + p.stderr
    rep = json.loads((out / "gsm8k_report.json").read_text())
    runs = {r["name"]: r for r in rep["runs"]}
    assert [r["name"] for r in rep["runs"]] == ["plugin", "stock"]  # plugin first by default
    assert runs["plugin"]["score"] == 0.5 and runs["stock"]["score"] == 0.7
    assert runs["plugin"]["rescored"] == {"correct": 5, "total": 10, "invalid": 0, "accuracy": 0.5}
    assert runs["plugin"]["accept_length"] == 2.25 and runs["stock"]["accept_length"] == 2.5
    assert runs["plugin"]["server"]["speculative_algorithm"] == "FROZEN_KV_MTP"
    failing = [c["name"] for c in rep["verdict"]["checks"] if c["enforced"] and not c["passed"]]
    assert failing == ["plugin score vs stock"]
    # the switch reached each server, and only there: plugin run 1, stock run 0
    assert runs["plugin"]["plugin_log_lines"] == ["INFO sglang-gemma4-opt: (fake) plugin switch 1"]
    assert runs["stock"]["plugin_log_lines"] == ["INFO sglang-gemma4-opt: (fake) plugin switch 0"]
    argv = json.loads((fake.piddir / "argv-1.json").read_text())
    for flag in ("--enable-deterministic-inference", "--speculative-draft-model-path", "--attention-backend"):
        assert flag in argv
    assert argv[argv.index("--attention-backend") + 1] == "triton"
    assert not wait_dead(_pids(fake.piddir, "1") + _pids(fake.piddir, "0"))
    assert (out / "gsm8k_report.md").read_text().startswith("# GSM8K regression: FAILED")
    assert (out / "plugin" / "tmp_output_gsm8k.txt").exists()


def test_dummy_weights_run_is_reported_not_enforced(fake, tmp_path):
    out = tmp_path / "out"
    cmd, env = fake(out, correct=(0.0, 0.0), accept=(1.0, 1.0),
                    extra=("--load-format", "dummy", "--runs", "plugin", "--no-deterministic"))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((out / "gsm8k_report.json").read_text())
    assert rep["random_weights"] and not rep["verdict"]["enforced"]
    assert [r["name"] for r in rep["runs"]] == ["plugin"] and rep["runs"][0]["score"] == 0.0
    argv = json.loads((fake.piddir / "argv-1.json").read_text())
    assert "--enable-deterministic-inference" not in argv
    assert argv[argv.index("--load-format") + 1] == "dummy"
    assert argv[argv.index("--speculative-draft-load-format") + 1] == "dummy"
    assert "scores are ~0" in (out / "gsm8k_report.md").read_text()


def test_server_dying_at_startup_is_reported_with_its_log(fake, tmp_path):
    out = tmp_path / "out"
    cmd, env = fake(out, die_at_startup=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    rep = json.loads((out / "gsm8k_report.json").read_text())
    plugin = rep["runs"][0]
    assert "exited with code 3 before it was ready" in plugin["error"]
    assert "fake failure while loading the model" in plugin["error_log_tail"]
    assert "fake failure while loading the model" in (out / "gsm8k_report.md").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupting_the_tool_kills_the_server_group(fake, tmp_path, sig):
    out = tmp_path / "out"
    cmd, env = fake(out, startup_delay=600)  # never ready: we interrupt while it "loads"
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pidfile = fake.piddir / "pids-1"
        deadline = time.time() + 60
        while not pidfile.exists() and time.time() < deadline:
            time.sleep(0.1)
        pids = _pids(fake.piddir, "1")
        assert all(alive(x) for x in pids)
        p.send_signal(sig)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + sig, p.stdout.read()
    assert not wait_dead(pids), "server or its child survived the interrupt"
    rep = json.loads((out / "gsm8k_report.json").read_text())
    assert rep["interrupted_by_signal"] == sig
    assert not (fake.piddir / "pids-0").exists(), "stock run must not start after an interrupt"


def test_ci_script_passes_sigterm_on_and_the_server_group_dies(fake, tmp_path):
    """ci/gsm8k_regression.sh runs the tool in the background and forwards signals to it."""
    script = Path(__file__).resolve().parents[1] / "ci" / "gsm8k_regression.sh"
    if not script.exists():
        pytest.skip("no ci/ folder beside tests/")
    out = tmp_path / "out"
    _, env = fake(out, startup_delay=600)
    env.update(PYTHON=sys.executable, MODEL_PATH="fake/gemma4", DRAFT_MODEL_PATH="fake/assistant", OUT=str(out),
               NUM_QUESTIONS="10", EXTRA_SERVER_ARGS="--skip-server-warmup")
    p = subprocess.Popen(["bash", str(script), *fake.options(out)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not (fake.piddir / "pids-1").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        pids = _pids(fake.piddir, "1")
        p.send_signal(signal.SIGTERM)  # to bash only, as a runner cancelling the step might
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + signal.SIGTERM, p.stdout.read()
    assert not wait_dead(pids)
    argv = json.loads((fake.piddir / "argv-1.json").read_text())
    assert argv[-1] == "--skip-server-warmup", "EXTRA_SERVER_ARGS reach the server"


def test_startup_timeout_and_busy_port(fake, tmp_path):
    cmd, env = fake(tmp_path / "a", startup_delay=600)
    cmd[cmd.index("--startup-timeout") + 1] = "2"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    rep = json.loads((tmp_path / "a" / "gsm8k_report.json").read_text())
    assert [r["name"] for r in rep["runs"]] == ["plugin", "stock"]
    assert all("not ready after 2 s" in r["error"] for r in rep["runs"])
    assert not wait_dead(_pids(fake.piddir, "1") + _pids(fake.piddir, "0"))

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cmd, env = fake(tmp_path / "b")
        cmd[cmd.index("--port") + 1] = str(s.getsockname()[1])
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    rep = json.loads((tmp_path / "b" / "gsm8k_report.json").read_text())
    assert "already in use" in rep["runs"][0]["error"]


def test_stop_escalates_to_sigkill_for_a_group_that_ignores_sigterm(tmp_path):
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
            "print(c.pid, flush=True); time.sleep(600)")
    p = srv.ManagedProcess([sys.executable, "-c", code], tmp_path / "log", grace=1.0, name="stubborn").start()
    deadline = time.time() + 30
    while time.time() < deadline and len((tmp_path / "log").read_text().splitlines()) < 2:
        time.sleep(0.05)
    child = int((tmp_path / "log").read_text().splitlines()[1])
    assert srv.group_members(p.pgid)
    t0 = time.time()
    p.stop()
    assert 1.0 <= time.time() - t0 < 15
    assert p.proc.returncode == -signal.SIGKILL
    assert not wait_dead([p.pgid, child]) and not srv.group_members(p.pgid)
    assert p not in srv.live()
    p.stop()  # idempotent


# ------------------------------------------------------------------------- dummy model folders
def test_dummy_folders_have_the_real_shapes(tmp_path):
    from sglang_gemma4_opt.tools import dummy_model as dm

    t, d = dm.write_dummy_models(tmp_path)
    tc, dc = json.loads((t / "config.json").read_text()), json.loads((d / "config.json").read_text())
    text, dtext = tc["text_config"], dc["text_config"]
    assert (tc["model_type"], tc["architectures"]) == ("gemma4", ["Gemma4ForConditionalGeneration"])
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_experts"], text["top_k_experts"],
            text["moe_intermediate_size"], text["vocab_size"]) == (2816, 30, 128, 8, 704, 262144)
    assert dc["architectures"] == ["Gemma4AssistantForCausalLM"]
    assert dc["backbone_hidden_size"] == text["hidden_size"] and dc["use_ordered_embeddings"] is False
    # the assistant attends over the target's KV cache: same attention shape
    for k in ("num_attention_heads", "num_key_value_heads", "num_global_key_value_heads", "head_dim",
              "global_head_dim", "attention_k_eq_v", "sliding_window", "vocab_size", "rope_parameters"):
        assert dtext[k] == text[k], k
    assert set(dtext["layer_types"]) == {"sliding_attention", "full_attention"}
    assert dtext["layer_types"][-1] == "full_attention" and len(dtext["layer_types"]) == dtext["num_hidden_layers"]
    assert dtext["enable_moe_block"] is False and dtext["num_kv_shared_layers"] == dtext["num_hidden_layers"]
    vocab = json.loads((t / "tokenizer.json").read_text())["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(text["vocab_size"]))  # dense: every id decodes
    assert all(vocab[tok] == i for tok, i in dm.MM_TOKENS.values())
    assert (t / "processor_config.json").exists() and not (d / "processor_config.json").exists()


def test_dummy_folders_load_the_way_sglang_reads_them(tmp_path):
    """sglang's config parser, its NEXTN -> FROZEN_KV_MTP promotion for the draft, and the HF
    processor its tokenizer manager loads for the (multimodal) target."""
    pytest.importorskip("transformers")
    from sglang.srt.utils.hf_transformers.config import get_config

    from sglang_gemma4_opt.tools import dummy_model as dm

    t, d = dm.write_dummy_models(tmp_path)
    tc, dc = get_config(str(t), trust_remote_code=False), get_config(str(d), trust_remote_code=False)
    # sglang's Gemma4 convention: base = full-attention shape, swa_* = sliding
    assert (tc.text_config.head_dim, tc.text_config.swa_head_dim) == (512, 256)
    assert (tc.text_config.num_key_value_heads, tc.text_config.swa_num_key_value_heads) == (2, 8)
    assert dc.architectures == ["Gemma4AssistantForCausalLM"] and dc.backbone_hidden_size == 2816
    assert (dc.text_config.head_dim, dc.text_config.swa_head_dim, dc.text_config.hidden_size) == (512, 256, 1024)
    try:
        from sglang.srt.server_args import _resolve_speculative_algorithm_alias
    except ImportError:  # moved after 0.5.12
        _resolve_speculative_algorithm_alias = None
    if _resolve_speculative_algorithm_alias is not None:
        assert _resolve_speculative_algorithm_alias("NEXTN", str(d)) == "FROZEN_KV_MTP"

    pytest.importorskip("PIL")
    from sglang.srt.utils.hf_transformers.processor import get_processor

    proc = get_processor(str(t))
    assert type(proc).__name__ == "Gemma4Processor"
    tok = proc.tokenizer
    assert (tok.eos_token_id, tok.bos_token_id, proc.image_token_id) == (1, 2, 258880)
    assert tok.decode([10, 200000]) == "t10 t200000"
