"""Every fused-MoE config the plugin ships for this GPU, at every M key of its tables, is the config
sglang's lookup picks with the plugin, and runs sglang's fused MoE close to a float32 torch reference.

The tables are named like sglang's (`E=..,N=..,device_name=..[_down].json`) and keyed by token count;
the hidden size is not in the name: Gemma4 26B-A4B's (2816) for every shipped N (704 at TP 1, 352 at
TP 2). Tolerance: relative Frobenius error <= 1e-2 vs float32 on the same bf16 inputs (the kernel keeps
bf16 intermediates between its two GEMMs and the activation).
"""

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from _moe_reference import moe_reference  # noqa: E402  (tests/gpu/_moe_reference.py)

pytestmark = pytest.mark.gpu

K_HIDDEN = 2816
TOPK = 8
REL_TOL = 1e-2
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "sglang_gemma4_opt" / "configs"
NAME_RE = re.compile(r"E=(\d+),N=(\d+),device_name=(.+?)(,dtype=[^,]+)?(,block_shape=[^,]+)?"
                     r"(,per_channel_quant=True)?(_down)?\.json$")


def _shipped():
    """[(vdir, device_name, E, N, M)] for every bf16 table and M key the plugin ships."""
    try:
        from sglang_gemma4_opt.patches.moe_configs import CONFIG_ROOT as root
    except Exception:
        root = CONFIG_ROOT
    out = set()
    for f in sorted(Path(root).glob("triton_*/*.json")):
        m = NAME_RE.match(f.name)
        if not m or m.group(4) or m.group(5) or m.group(6):
            continue  # quantised tables: not Gemma4's bf16 experts
        for key in json.loads(f.read_text()):
            out.add((f.parent.name, m.group(3), int(m.group(1)), int(m.group(2)), int(key)))
    return sorted(out)


SHIPPED = _shipped()


def test_some_table_is_shipped():
    assert SHIPPED, f"no fused-MoE tables under {CONFIG_ROOT}"


@pytest.fixture(scope="module")
def weights():
    cache = {}

    def get(E, N):
        if (E, N) not in cache:
            cache.clear()
            w13 = (torch.randn(E, 2 * N, K_HIDDEN, device="cuda") * K_HIDDEN ** -0.5).to(torch.bfloat16)
            w2 = (torch.randn(E, K_HIDDEN, N, device="cuda") * N ** -0.5).to(torch.bfloat16)
            cache[(E, N)] = (w13, w2)
        return cache[(E, N)]

    yield get
    cache.clear()


@pytest.mark.parametrize("vdir,device,E,N,M", SHIPPED, ids=[f"{v}-{d}-E{e}-N{n}-M{m}" for v, d, e, n, m in SHIPPED])
def test_shipped_config_is_picked_and_correct(sbs, weights, vdir, device, E, N, M):
    import triton

    from sglang_gemma4_opt.bench import fused_moe as bm
    from sglang_gemma4_opt.patches.moe_configs import CONFIG_ROOT as root
    from sglang_gemma4_opt.patches.moe_configs import load_table, version_dir

    if vdir != version_dir(triton.__version__):
        pytest.skip(f"table for {vdir}, running triton {triton.__version__}")
    here = torch.cuda.get_device_name().replace(" ", "_")
    if device != here:
        pytest.skip(f"table for {device}, running on {here}")
    assert sbs.applied("moe_configs"), sbs.status("moe_configs")

    w13, w2 = weights(E, N)
    up = root / vdir / f"E={E},N={N},device_name={device}.json"
    down = root / vdir / f"E={E},N={N},device_name={device}_down.json"

    class W:  # the benchmark's weight holder shape
        pass

    W.w13, W.w2 = w13, w2
    cfg, down_cfg = bm.picked_config(sbs, "plugin", M, W, TOPK)
    if up.exists():
        table = load_table(up)
        want = table[min(table, key=lambda k: abs(k - M))]
        assert {k: v for k, v in cfg.items()} == want, "sglang did not pick the plugin's config"
    if down.exists() and down_cfg is not None:
        dtable = load_table(down)
        want_d = dict(dtable[min(dtable, key=lambda k: abs(k - M))])
        assert down_cfg == want_d, "sglang did not pick the plugin's down-projection config"

    x = torch.randn(M, K_HIDDEN, device="cuda", dtype=torch.bfloat16)
    w, ids = bm.random_routing(M, E, TOPK)
    rcfg = bm.runner_config(E, N, K_HIDDEN, TOPK)
    fused_experts = bm.fused_experts_fn()
    with sbs.use("moe_configs", "plugin"):
        out = fused_experts(x, w13, w2, bm.topk_output(w, ids), rcfg)
    torch.cuda.synchronize()
    ref = moe_reference(x, w13, w2, w, ids)
    assert torch.isfinite(out).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel <= REL_TOL, f"relative error {rel:.2e} with {cfg}"
