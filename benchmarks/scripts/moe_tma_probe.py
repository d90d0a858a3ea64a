"""Scratch GPU probe: does USE_TMA in the down table (sglang's c_sorted + TMA down path) beat the
shipped H200 N=704 pair? Whole fused MoE through sglang's fused_experts, CUDA-graph replay."""
import contextlib, functools, importlib, json, os
import torch
from sglang_gemma4_opt.bench.common import ensure_server_args, time_variants
from sglang_gemma4_opt.bench import fused_moe as fm
from sglang_gemma4_opt.patches.moe_configs import load_table, CONFIG_ROOT

ensure_server_args()
N = int(os.environ.get("PROBE_N", "704"))
dev = torch.cuda.get_device_name().replace(" ", "_")
root = CONFIG_ROOT / "triton_3_6_0"
up = load_table(root / f"E=128,N={N},device_name={dev}.json")
down = load_table(root / f"E=128,N={N},device_name={dev}_down.json")
pr_dir = os.environ.get("PR_DIR")
pr = None
if pr_dir:
    pr = (load_table(os.path.join(pr_dir, "triton_3_6_0", f"E=128,N={N},device_name={dev}.json")),
          load_table(os.path.join(pr_dir, "triton_3_6_0", f"E=128,N={N},device_name={dev}_down.json")))
cfg_mod = importlib.import_module(fm.MODULE_CFG)
orig = cfg_mod.get_moe_configs
state = {}


def lookup(E, N_, dtype, block_n=0, block_k=0, per_channel_quant=False, down_moe=False):
    t = state["down" if down_moe else "up"]
    return {k: dict(v) for k, v in t.items()}


cfg_mod.get_moe_configs = lookup


@contextlib.contextmanager
def serving(tables):
    """sglang's lookup answers with these (up, down) tables inside the block (warm-up and capture)."""
    state["up"], state["down"] = tables
    yield


def nearest(table, M):
    return dict(table[min(table, key=lambda k: abs(k - M))])

fe = fm.fused_experts_fn()
rcfg = fm.runner_config(N=N)
w = fm.Weights(N=N)


def ref_moe(x, tw, ids):
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for j in range(ids.shape[1]):
        e = ids[:, j].long()
        h = torch.einsum("mk,mnk->mn", x.float(), w.w13[e].float())
        g, u = h[:, :N], h[:, N:]
        a = torch.nn.functional.gelu(g, approximate="tanh") * u
        out += tw[:, j:j + 1] * torch.einsum("mn,mkn->mk", a.bfloat16().float(), w.w2[e].float())
    return out


ms = [int(m) for m in os.environ.get("PROBE_MS", "1 64 256 1024 2048 4096 8192 16384").split()]
rows = []
for M in ms:
    u, d0 = nearest(up, M), nearest(down, M)
    bm = u["BLOCK_SIZE_M"]
    cands = {"shipped": d0, "shipped+tma": dict(d0, USE_TMA=True)}
    for bn, bk, nw, ns in ((64, 128, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (128, 64, 8, 4)):
        if bm >= 128 and bn == 64:
            continue
        if bm <= 32 and bn == 256:
            continue
        cands[f"tma {bn}/{bk}/w{nw}/s{ns}"] = dict(d0, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, num_warps=nw, num_stages=ns,
                                                   USE_TMA=True)
    x = torch.randn(M, 2816, device="cuda", dtype=torch.bfloat16)
    tw, ids = fm.random_routing(M)
    row = {"M": M, "up": u}
    ref = ref_moe(x, tw, ids) if M <= 4096 else None
    calls = 20 if M <= 256 else (4 if M <= 4096 else 2)
    routes = [fm.random_routing(M) for _ in range(calls)]
    variants = {}
    run = lambda i: fe(x, w.w13, w.w2, fm.topk_output(*routes[i % calls]), rcfg)  # noqa: E731
    for name, dc in cands.items():
        ctx = functools.partial(serving, ({M: u}, {M: dc}))
        try:
            with ctx():
                y = fe(x, w.w13, w.w2, fm.topk_output(tw, ids), rcfg)
                torch.cuda.synchronize()
            if ref is not None:
                row[name + "_relerr"] = float((y.float() - ref).norm() / ref.norm())
        except Exception as e:  # noqa
            row[name + "_error"] = repr(e)[:200]
            continue
        variants[name] = (run, ctx)
    if pr is not None:
        variants["pr"] = (run, functools.partial(serving, ({M: nearest(pr[0], M)}, {M: nearest(pr[1], M)})))
    t = time_variants(variants, calls=calls, rounds=3, budget_s=0.25)
    for n, tm in t.items():
        row[n + "_us"] = round(tm.median_us, 2)
    print(json.dumps(row), flush=True)
    rows.append(row)
json.dump({"gpu": torch.cuda.get_device_name(), "N": N, "rows": rows},
          open(os.path.join(os.environ.get("OUT", "."), f"moe_tma_probe_N{N}.json"), "w"), indent=1)
