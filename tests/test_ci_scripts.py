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
