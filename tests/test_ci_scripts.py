"""Pieces of the GPU-host scripts that decide something, run with a fake nvidia-smi."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("smi_out, want", [("81559", "--mem-fraction-static 0.85"),  # H100 80GB: MiB
                                           ("143771", ""),  # H200
                                           ("[N/A]", ""), (None, "")])  # unreadable / no nvidia-smi
def test_e2e_kv_pool_fraction_on_80gb_cards(tmp_path, smi_out, want):
    """bs64 x 1024 needs a larger KV pool than bench-e2e's default leaves on an 80 GB card."""
    if smi_out is None and shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("a real nvidia-smi is on the path")
    if smi_out is not None:
        smi = tmp_path / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '{smi_out}'\n")
        smi.chmod(0o755)
    script = (f"eval \"$(sed -n '/^e2e_mem_args() {{/,/^}}/p' {ROOT / 'ci/gpu-run.sh'})\"; "
              f"PATH={tmp_path}:/usr/bin:/bin; e2e_mem_args")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == want


def _fake_venv(root: Path, version: str) -> Path:
    """A venv whose python only records its arguments: run-tests.sh's install and pytest steps become log lines."""
    venv = root / f"sglang-{version}"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\necho \"$PWD :: $*\" >> {root / 'calls.log'}\n")
    py.chmod(0o755)
    (venv / ".complete").touch()
    return venv


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("entry, env, dropped", [("ci/run-tests.sh", {}, False),
                                                 ("ci/run-tests.sh", {"DROP_VENVS": "1"}, True),
                                                 (".ci/run", {}, True)])  # CI drops them: disk for one venv
def test_run_tests_installs_runs_and_drops_venvs(tmp_path, entry, env, dropped):
    if not (ROOT / entry).exists():
        pytest.skip(f"no {entry} next to the tests (installed copy)")
    root = tmp_path / "venvs"
    venvs = [_fake_venv(root, v) for v in ("9.9.1", "9.9.2")]
    run_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SGLANG_VERSIONS": "9.9.1 9.9.2",
               "VENV_ROOT": str(root), **env}  # absolute VENV_ROOT: the pytest step runs from tests/
    extra = [] if entry == ".ci/run" else ["-k", "nothing"]  # run-tests.sh hands extra arguments to pytest
    r = subprocess.run(["bash", str(ROOT / entry), *extra], capture_output=True, text=True, env=run_env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (root / "calls.log").read_text().splitlines()
    assert calls == [f"{ROOT} :: -m pip install -q --no-deps --no-build-isolation --force-reinstall .",
                     " ".join([f"{ROOT / 'tests'} :: -m pytest -q -p no:cacheprovider", *extra, "."])] * 2
    assert all(v.exists() != dropped for v in venvs)
    assert r.stdout.count("venv removed") == (2 if dropped else 0)


FIXED = "--no-pieces --rounds 3 --budget 0.2 --preheat 0.6 --write-table"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("env, extra, want, changed", [
    ({}, "--budget 0.1", f"--ns 704 --ms 2048 4096 8192 16384 65536 --candidates @shipped *_od* {FIXED} --budget 0.1",
     True),
    ({"RETUNE_NS": "352", "RETUNE_MS": "2048 4096", "RETUNE_CANDIDATES": "*_od *_pd"}, "",
     f"--ns 352 --ms 2048 4096 --candidates *_od *_pd {FIXED}", False)])
def test_moe_retune_runs_the_tuner_and_returns_a_changed_table(tmp_path, env, extra, want, changed):
    """ci/gpu-run.sh moe-retune: the tuner's command line (patterns reach it unglobbed, even with a file in the
    working directory that matches one; the script's arguments last, so they win), and the rewritten table is
    copied to $OUT only when the tuner changed it."""
    if not (ROOT / "ci/gpu-run.sh").exists():
        pytest.skip("no ci/gpu-run.sh next to the tests (installed copy)")
    work, out, bin_ = tmp_path / "work", tmp_path / "out", tmp_path / "bin"
    for d in (work, out, bin_):
        d.mkdir()
    (work / "x_od_y").touch()  # *_od* would expand to it if the script let the shell glob the patterns
    installed = tmp_path / "installed.json"  # the table the tuner's --write-table rewrites
    installed.write_text("{}\n")
    calls = tmp_path / "calls.log"
    # python3: answers the TABLE_PATH query with that table; as the tuner, records its arguments and (changed)
    # rewrites the table
    rewrite = f"echo '{{\"GPU\": {{}}}}' > {installed}" if changed else ":"
    py = bin_ / "python3"
    py.write_text(f'#!/bin/bash\nif [ "$1" = -c ]; then echo {installed}; else echo "$*" >> {calls}; {rewrite}; fi\n')
    py.chmod(0o755)
    script = (f"eval \"$(sed -n '/^run_moe_retune() {{/,/^}}/p' {ROOT / 'ci/gpu-run.sh'})\"; "
              f"step() {{ shift 2; \"$@\"; }}; PATH={bin_}:/usr/bin:/bin; OUT={out}; run_moe_retune {extra}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=work,
                       env={"PATH": "/usr/bin:/bin", **env})
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls.read_text().split() == \
        f"-u -m sglang_gemma4_opt.bench.tune_moe_grouped --out {out} {want}".split()
    assert (out / "moe_grouped.json").exists() == changed
    if changed:
        assert (out / "moe_grouped.json").read_text() == installed.read_text() == '{"GPU": {}}\n'
    assert ("unchanged" in r.stdout) != changed
    assert sorted(p.name for p in out.iterdir()) == (["moe_grouped.json"] if changed else [])
