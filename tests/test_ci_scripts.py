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
