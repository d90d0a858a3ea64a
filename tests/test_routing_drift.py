"""routing-drift: metrics on constructed cases with known answers, candidate loading, the CLI, and
(under TRITON_INTERPRET=1 or on a GPU) sglang >= 0.5.13's fused kernels against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sglang_gemma4_opt.kernels import routing as ref
from sglang_gemma4_opt.tools import drift

E, K = 16, 8


def routed(T=6, seed=0):
    """Reference-shaped output: distinct ids per token, float32 weights on a dyadic grid (exact sums)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.randint(1, 64, (T, K), generator=g).float() / 128
    return w, ids


def test_identical_outputs_have_no_drift():
    w, ids = routed()
    m = drift.compare(w, ids, w.clone(), ids.clone(), E)
    assert m["set_differs"] == m["order_differs"] == 0
    assert m["max_abs_dweight"] == m["mean_abs_dweight"] == 0.0
    assert m["ids_equal"] and m["weights_equal"]


def test_a_swapped_order_counts_as_order_only():
    w, ids = routed(T=8)
    cw, cids = w.clone(), ids.clone()
    cw[3, [0, 5]], cids[3, [0, 5]] = cw[3, [5, 0]], cids[3, [5, 0]]  # same experts, same weights, other order
    m = drift.compare(w, ids, cw, cids, E)
    assert (m["order_differs"], m["set_differs"]) == (1, 0)
    assert m["order_differs_share"] == 1 / 8
    assert m["max_abs_dweight"] == 0.0, "weights are compared by expert id, not by slot"
    assert not m["ids_equal"]


def test_a_different_set_counts_the_moved_weight():
    w, ids = routed(T=4)
    cw, cids = w.clone(), ids.clone()
    old = int(ids[2, 7])
    new = next(e for e in range(E) if e not in ids[2].tolist())
    cids[2, 7] = new  # the same weight goes to another expert
    m = drift.compare(w, ids, cw, cids, E)
    assert (m["set_differs"], m["order_differs"], m["set_differs_share"]) == (1, 0, 0.25)
    moved = float(w[2, 7])
    assert m["max_abs_dweight"] == moved
    # chosen pairs: 8 per token, plus one extra for the token whose set changed
    assert m["chosen_pairs"] == 4 * K + 1
    assert m["mean_abs_dweight"] == pytest.approx(2 * moved / (4 * K + 1), rel=1e-12)
    assert m["max_abs_dweight_same_set"] == 0.0 and old != new


def test_weights_perturbed_by_a_known_delta():
    w, ids = routed(T=5)
    delta = 2.0 ** -10
    m = drift.compare(w, ids, w + delta, ids, E)
    assert m["set_differs"] == m["order_differs"] == 0
    assert m["max_abs_dweight"] == delta and m["mean_abs_dweight"] == delta
    assert m["max_abs_dweight_same_set"] == delta and m["mean_abs_dweight_same_set"] == delta
    cw = w.clone()
    cw[1, 2] += 3 * delta  # one entry off by 3 delta, the rest exact
    m = drift.compare(w, ids, cw, ids, E)
    assert m["max_abs_dweight"] == 3 * delta
    assert m["mean_abs_dweight"] == pytest.approx(3 * delta / (5 * K), rel=1e-12)


def test_merge_equals_one_big_batch():
    w, ids = routed(T=10, seed=3)
    cw, cids = w.clone(), ids.clone()
    cw[0] += 2.0 ** -8
    cids[7, [1, 2]] = cids[7, [2, 1]]
    cids[9, 0] = next(e for e in range(E) if e not in ids[9].tolist())
    whole = drift.compare(w, ids, cw, cids, E)
    parts = drift.merge([drift.compare(w[:4], ids[:4], cw[:4], cids[:4], E),
                         drift.compare(w[4:], ids[4:], cw[4:], cids[4:], E)])
    for k in ("tokens", "set_differs", "order_differs", "max_abs_dweight", "chosen_pairs", "ids_equal"):
        assert parts[k] == whole[k], k
    assert parts["mean_abs_dweight"] == pytest.approx(whole["mean_abs_dweight"], rel=1e-12)


def test_shape_mismatch_is_an_error():
    w, ids = routed()
    with pytest.raises(ValueError):
        drift.compare(w, ids, w[:, :4], ids[:, :4], E)


def test_unfused_router_is_sglang_0_5_12s():
    """Same ops as test_routing.py's reference router (0.5.12 CPU path), so bit-equal."""
    g = torch.Generator().manual_seed(5)
    H = 64
    x = torch.randn(9, H, generator=g).to(torch.bfloat16)
    scale = (1 + torch.randn(H, generator=g) / 4).to(torch.bfloat16)
    proj = (torch.randn(E, H, generator=g) / 8).to(torch.bfloat16)
    xf = x.float()
    normed = (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)).type_as(x)
    s = (scale * torch.tensor(H ** -0.5, dtype=scale.dtype)).to(scale.dtype)
    want = torch.nn.functional.linear(normed * s, proj)
    got, how = drift.router_unfused(x, scale, proj)
    assert torch.equal(got, want) and how == "torch (fp32)"
    folded, _ = drift.router_folded(x, scale, proj)
    # one rounding fewer: close, and in bf16 not identical (the drift the tool measures)
    assert torch.allclose(folded.float(), want.float(), atol=0.05) and not torch.equal(folded, want)


# --------------------------------------------------------------------------------- candidates
def test_load_function_module_and_file(tmp_path):
    assert drift.load_function("sglang_gemma4_opt.kernels.routing:unfused_routing") is ref.unfused_routing
    f = tmp_path / "cand.py"
    f.write_text("def route(g, s, k):\n    return 42\n")
    assert drift.load_function(f"{f}:route")(None, None, 8) == 42
    for bad in ("no_colon", ":f", "mod:"):
        with pytest.raises(ValueError):
            drift.load_function(bad)


def test_kernel_file_locations(tmp_path):
    f = tmp_path / "src" / drift.KERNEL_REL
    f.parent.mkdir(parents=True)
    f.write_text("# kernels\n")
    for given in (tmp_path / "src", tmp_path / "src" / "sglang", f):
        assert drift.kernel_file(str(given)) == f
    with pytest.raises(FileNotFoundError):
        drift.kernel_file(str(tmp_path / "nowhere"))


def test_installed_sglang_without_fused_routing_says_so(sglang_version):
    if sglang_version >= (0, 5, 13):
        assert drift.kernel_file(None).is_file()
    else:
        with pytest.raises(FileNotFoundError, match="0.5.13"):
            drift.kernel_file(None)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sglang_gemma4_opt", "routing-drift", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_reference_against_itself_is_bit_exact(tmp_path):
    p = _cli("--candidate", "sglang_gemma4_opt.kernels.routing:unfused_routing", "--tokens", "512",
             "--scales", "1,8", "--device", "cpu", "--out", str(tmp_path), "--fail-on-drift")
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "routing_drift.json").read_text())
    o = rep["overall"]
    assert o["tokens"] == 1024 and o["ids_equal"] and o["weights_equal"]
    assert o["set_differs"] == o["order_differs"] == 0 and o["max_abs_dweight"] == 0.0
    assert rep["candidate_router"] == "unfused" and o["max_abs_dlogit"] == 0.0
    assert "| all | 1024 |" in (tmp_path / "routing_drift.md").read_text()


def test_cli_flags_a_candidate_that_reverses_the_order(tmp_path):
    cand = tmp_path / "rev.py"
    cand.write_text(textwrap.dedent("""
        from sglang_gemma4_opt.kernels.routing import unfused_routing
        def route(g, s, k):
            w, ids = unfused_routing(g, s, k)
            return w.flip(1), ids.flip(1)
    """))
    p = _cli("--candidate", f"{cand}:route", "--input", "logits", "--tokens", "300", "--scales", "2",
             "--device", "cpu", "--out", str(tmp_path), "--fail-on-drift")
    assert p.returncode == 1, p.stderr
    o = json.loads((tmp_path / "routing_drift.json").read_text())["overall"]
    assert o["order_differs_share"] == 1.0 and o["set_differs"] == 0 and o["max_abs_dweight"] == 0.0


def test_cli_input_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    torch.save({"router_logits": torch.randn(40, 128, generator=g).to(torch.bfloat16),
                "per_expert_scale": torch.ones(128, dtype=torch.bfloat16)}, tmp_path / "in.pt")
    p = _cli("--candidate", "sglang_gemma4_opt.kernels.routing:unfused_routing", "--from-file",
             str(tmp_path / "in.pt"), "--device", "cpu", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "routing_drift.json").read_text())
    assert rep["overall"]["tokens"] == 40 and rep["rows"][0]["batch"] == "in.pt"


def test_cli_reports_a_missing_kernel_file(tmp_path):
    p = _cli("--sglang-src", str(tmp_path), "--tokens", "4")
    assert p.returncode == 2 and "gemma4_routing.py" in p.stderr


# ------------------------------------------------------------------ upstream's fused kernels
def _upstream_src() -> str | None:
    """Where sglang >= 0.5.13's kernel file is: the installed sglang (None), else G4OPT_SGLANG_SRC."""
    try:
        drift.kernel_file(None)
        return None
    except FileNotFoundError:
        pass
    src = os.environ.get("G4OPT_SGLANG_SRC")
    if not src:
        pytest.skip("sglang < 0.5.13 has no fused Gemma4 routing; set G4OPT_SGLANG_SRC to a newer sglang")
    return src


@pytest.mark.interpret
def test_upstream_fused_routing_drift_is_measured():
    """Known properties of upstream's kernel: with distinct fp32 logits it picks the same experts in
    the same order and its fp32 softmax agrees to fp32 rounding; with bf16 logits the reference's
    softmax runs in bf16, so the weights drift while the sets stay the same."""
    fn, origin = drift.get_candidate("upstream", _upstream_src())
    assert origin.endswith("gemma4_routing.py")
    g = torch.Generator().manual_seed(2)
    T, EXP = 12, 128
    logits = torch.randn(T, EXP, generator=g) * 2
    pes = (torch.rand(EXP, generator=g) + 0.5)
    m = drift.compare(*ref.unfused_routing(logits, pes, 8), *fn(logits, pes, 8), EXP)
    assert m["ids_equal"] and m["max_abs_dweight"] < 1e-6

    # bf16 logits without ties (a tie's order is not specified for torch.topk): distinct values, shuffled
    grid = torch.linspace(-4, 4, EXP).to(torch.bfloat16)
    assert grid.unique().numel() == EXP
    lb = torch.stack([grid[torch.randperm(EXP, generator=g)] for _ in range(T)])
    pb = pes.to(torch.bfloat16)
    m = drift.compare(*ref.unfused_routing(lb, pb, 8), *fn(lb, pb, 8), EXP)
    assert m["set_differs"] == 0 and m["ids_equal"]
    assert not m["weights_equal"] and m["max_abs_dweight_same_set"] > 1e-4
    assert m["candidate_dtypes"] == ["torch.float32", "torch.int32"]
