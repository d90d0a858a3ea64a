"""Head-dim-512 Gluon kernel (kernels/extend_attention_hd512.py): which calls the tables send to it,
that a failure in it falls back to the Triton kernel, and, compiled ahead of time for sm_90 on this CPU
host, that it is the kernel it claims to be: the QK product issued once over both warpgroups (not
duplicated), within shared memory, without register spills. Numerics are checked on the GPU
(tests/gpu/test_extend_attention_kernel_gpu.py): Gluon kernels do not run under the interpreter.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch

from sglang_gemma4_opt.kernels import extend_attention as ka

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


@pytest.fixture(autouse=True)
def _gluon_on(monkeypatch):
    monkeypatch.delenv("SGLANG_GEMMA4_OPT_DISABLE", raising=False)
    monkeypatch.setattr(ka, "_GLUON_FAILED", [])


def test_plan_sends_only_hd512_without_prefix_to_gluon(monkeypatch):
    for name in (H100, H200, "NVIDIA GH200 480GB"):  # listed GPUs and an unlisted sm90 one
        plan = ka.plan_for(name, 512, has_prefix=False)
        assert isinstance(plan, ka.SharedSoftmax), name
        assert plan == ka.SHARED_SOFTMAX.get(name, ka.DEFAULT_SM90_SHARED_SOFTMAX)
        assert ka.plan_for(name, 512, has_prefix=True) == ka.config_for(name, 512)
        assert ka.plan_for(name, 256, has_prefix=False) == ka.config_for(name, 256)
    monkeypatch.setenv("SGLANG_GEMMA4_OPT_DISABLE", ka.HD512_SWITCH)
    assert ka.plan_for(H100, 512, has_prefix=False) == ka.config_for(H100, 512)


def test_table_entries_are_kernel_shapes():
    from sglang_gemma4_opt.kernels import extend_attention_hd512 as g

    for ss in (*ka.SHARED_SOFTMAX.values(), ka.DEFAULT_SM90_SHARED_SOFTMAX):
        assert ss.block_n in g.BLOCK_NS


def _case(prefix=(0, 0), lens=(5, 9), hd=512, dtype=torch.bfloat16):
    return ka.random_case(list(prefix), list(lens), 4, 2, hd, dtype=dtype)


def test_shared_softmax_scope():
    c = _case()
    args = (c["q_extend"], c["k_extend"], c["v_extend"])
    assert ka.shared_softmax_reason(*args, c["kv_indices"]) is None
    p = _case(prefix=(3, 0))
    assert ka.shared_softmax_reason(p["q_extend"], p["k_extend"], p["v_extend"], p["kv_indices"]) == "prefix keys"
    h = _case(hd=256)
    assert ka.shared_softmax_reason(h["q_extend"], h["k_extend"], h["v_extend"], h["kv_indices"]) == "head dim not 512"
    # q as a transposed (non-TMA) view
    qt = c["q_extend"].transpose(0, 1).contiguous().transpose(0, 1)
    assert ka.shared_softmax_reason(qt, *args[1:], c["kv_indices"]) == "q/k/v not TMA-able"
    with pytest.raises(ValueError, match="prefix keys"):
        ka.extend_attention_fwd(**{k: v for k, v in p.items() if k != "max_len"}, custom_mask=None, is_causal=True,
                                mask_indptr=None, max_len_extend=p["max_len"], k_scale=1.0, v_scale=1.0,
                                config=ka.SharedSoftmax(64))


def test_gluon_failure_falls_back_to_the_triton_kernel(monkeypatch, caplog):
    """A Gluon error (say, a compile failure on another triton) is logged once; the call is answered by
    the Triton kernel (the same output as running it directly), and later calls skip Gluon."""
    monkeypatch.setattr(ka, "device_reason", lambda t: None)
    monkeypatch.setattr(ka, "_device_info", lambda d: ((9, 0), H100))
    calls = []

    class Broken:
        @staticmethod
        def launch(*a, **k):
            calls.append(1)
            raise RuntimeError("no gluon here")

    monkeypatch.setattr(ka, "_gluon_module", lambda: Broken)
    small = (32, 16, 4, 2, False, 2)  # interpreter-sized stand-in for the H100's Triton entry
    monkeypatch.setitem(ka.CONFIGS, H100, {**ka.CONFIGS[H100], 512: small})
    c = ka.random_case([0, 0], [7, 3], 2, 1, 512, dtype=torch.float16, generator=torch.Generator().manual_seed(3))
    kw = dict(custom_mask=None, is_causal=True, mask_indptr=None, max_len_extend=c["max_len"], k_scale=1.0,
              v_scale=1.0, sliding_window_size=-1)
    base = {k: v for k, v in c.items() if k != "max_len"}
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel on CPU tensors: needs TRITON_INTERPRET=1")
    with caplog.at_level("WARNING", logger="sglang_gemma4_opt"):
        out = ka.extend_attention_fwd(**dict(base, o_extend=torch.full_like(c["o_extend"], float("nan"))), **kw)
    want = ka.extend_attention_fwd(**dict(base, o_extend=torch.full_like(c["o_extend"], float("nan"))), **kw,
                                   config=small)
    assert calls == [1] and len(ka._GLUON_FAILED) == 1
    assert "Gluon attention failed" in caplog.text
    assert torch.equal(out, want) and torch.isfinite(out).all()
    ka.extend_attention_fwd(**dict(base, o_extend=torch.empty_like(c["o_extend"])), **kw)
    assert calls == [1], "after one failure the Gluon kernel is not tried again"
    assert ka.plan_for(H100, 512, has_prefix=False) == ka.config_for(H100, 512)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile for sm_90 (no GPU needed)

# Runs in a fresh interpreter without TRITON_INTERPRET: the interpreter tests in this session patch
# triton.language builtins (gl.num_programs then fails to compile here, seen with sglang 0.5.23's test run).
_AOT = """
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from sglang_gemma4_opt.kernels import extend_attention_hd512 as g

block_n, window = int(sys.argv[1]), sys.argv[2] == "1"
q = torch.empty(256, 16, 512, dtype=torch.bfloat16)
k = torch.empty(256, 2, 512, dtype=torch.bfloat16)
qd, kd, vd = g.descriptors(q, k, k, block_n)
fn = g._hd512_extend_kernel
sig = {"q_desc": mangle_type(qd), "k_desc": mangle_type(kd), "v_desc": mangle_type(vd), "O": "*bf16",
       "qo_indptr": "*i32", "qk_scale": "fp32", "W": "i32", "kv_group": "i32", "stride_ot": "i32",
       "stride_oh": "i32", "BLOCK_N": "constexpr", "WINDOW": "constexpr", "num_warps": "constexpr"}
assert set(sig) == set(fn.arg_names), f"kernel signature changed ({fn.arg_names}): update this test"
const = {(fn.arg_names.index("BLOCK_N"),): block_n, (fn.arg_names.index("WINDOW"),): window,
         (fn.arg_names.index("num_warps"),): g.NUM_WARPS}
c = triton.compile(GluonASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": g.NUM_WARPS})
out = {"shared": c.metadata.shared,
       "mma_n": re.findall(r"wgmma\\.mma_async\\.sync\\.aligned\\.m64n(\\d+)k16", c.asm["ptx"])}
import triton.backends.nvidia as nv
cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
if os.path.exists(cuobjdump):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        out["usage"] = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                      check=True).stdout
print("AOT " + json.dumps(out))
"""


def _compile(block_n, window):
    import json
    import sys

    pytest.importorskip("triton")
    try:
        import triton.experimental.gluon.language.nvidia.hopper  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no Gluon in this triton: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT, str(block_n), str(int(window))], capture_output=True,
                       text=True, env=env, timeout=600)
    if r.returncode != 0 and "ptxas" in r.stderr.lower() and not shutil.which("ptxas"):
        pytest.skip(f"no ptxas for sm_90 here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("AOT ")]
    assert line, r.stdout[-2000:]
    return json.loads(line[-1][4:])


@pytest.mark.parametrize("block_n,window", [(64, False), (32, True)])
def test_compiles_for_sm90_without_duplicated_qk(block_n, window):
    from sglang_gemma4_opt.kernels import extend_attention_hd512 as g

    c = _compile(block_n, window)
    assert c["shared"] <= 227 * 1024
    mma = c["mma_n"]
    # QK: each warpgroup issues m64 n(BLOCK_N/2) k16 over head dim 512 (32 instructions): the two
    # warpgroups split the key columns, so together they compute the 64 x BLOCK_N scores once.
    assert mma.count(str(block_n // 2)) == g.HEAD_DIM // 16, mma
    # PV: each warpgroup owns 256 of the 512 output columns, BLOCK_N/16 k-steps
    assert mma.count(str(g.HEAD_DIM // 2)) == block_n // 16, mma
    assert set(mma) == {str(block_n // 2), str(g.HEAD_DIM // 2)}
    if "usage" not in c:
        pytest.skip("triton ships no cuobjdump here")
    regs = re.search(r"REG:(\d+)", c["usage"])
    local = re.search(r"LOCAL:(\d+)", c["usage"])
    assert regs and local, c["usage"]
    assert int(local.group(1)) == 0, f"register spills: {c['usage']}"
    assert int(regs.group(1)) <= 255
