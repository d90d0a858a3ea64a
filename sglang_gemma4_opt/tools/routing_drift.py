"""`sglang-gemma4-opt routing-drift`: how far a Gemma4 routing drifts from the unfused reference.

    sglang-gemma4-opt routing-drift                                   # installed sglang >= 0.5.13
    sglang-gemma4-opt routing-drift --sglang-src /path/to/sglang-0.5.23 --out results/
    sglang-gemma4-opt routing-drift --candidate mypkg.routing:fused --input logits

Inputs: hidden states (default; through the reference router and the candidate's router) or router
logits, drawn at random (seeded, one batch per --scales entry) or loaded from a .pt file. Output:
a table, and routing_drift.json / routing_drift.md with --out. Triton candidates run on the GPU;
without one they run under TRITON_INTERPRET=1 on a few tokens (slow, but the same kernel code).
See tools/drift.py for the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--candidate", default="upstream",
                   help="upstream (sglang >= 0.5.13: folded router + fused top-k/softmax/scale kernel), "
                        "upstream-post-topk (torch.topk + its fused softmax/scale kernel), or module:function / "
                        "file.py:function taking (gating_output, per_expert_scale, topk)")
    p.add_argument("--sglang-src", help="unzipped newer sglang (or its gemma4_routing.py) to take the upstream "
                                        "kernels from, instead of the installed sglang")
    p.add_argument("--input", choices=["hidden", "logits"], default="hidden",
                   help="draw hidden states (router + routing compared) or router logits (routing only)")
    p.add_argument("--from-file", help=".pt file: a tensor or a dict (hidden_states, router_logits, "
                                       "per_expert_scale, router_scale, router_proj); parameters it lacks are "
                                       "drawn at random (seeded)")
    p.add_argument("--candidate-router", choices=["auto", "unfused", "folded"], default="auto",
                   help="router in front of the candidate with --input hidden (auto: folded for upstream)")
    p.add_argument("--tokens", type=int, help="tokens per scale (default 16384; 64 under TRITON_INTERPRET)")
    p.add_argument("--scales", default="0.5,1,2,4,8", help="standard deviations of the random inputs")
    p.add_argument("--hidden-size", type=int, default=2816)
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for routing_drift.json and routing_drift.md")
    p.add_argument("--fail-on-drift", action="store_true", help="exit 1 unless ids and weights are bit-exact")


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for d in ("torch", "triton", "sglang", "sglang-gemma4-opt"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    return out


def _batches(args, dtype, device, drift):
    """(label, inputs dict) per batch: one per scale, or the file's contents."""
    if args.from_file:
        data = drift.load_inputs(args.from_file, device)
        if "tensor" in data:
            t = data.pop("tensor")
            key = "router_logits" if (args.input == "logits" or t.shape[-1] == args.num_experts) else "hidden_states"
            data[key] = t
        yield Path(args.from_file).name, data
        return
    for i, s in enumerate(float(x) for x in args.scales.split(",")):
        width = args.hidden_size if args.input == "hidden" else args.num_experts
        key = "hidden_states" if args.input == "hidden" else "router_logits"
        yield f"{s:g}", {key: drift.random_batch(args.tokens, width, s, args.seed + i, dtype, device)}


def measure(args) -> dict:
    """Run the comparison; returns the report dict (rows per batch, overall)."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from . import drift

    if drift.is_triton_candidate(args.candidate) and device == "cpu":
        # Triton kernels need a GPU; the interpreter runs the same kernel code on CPU tensors.
        # It is read when the kernel file is loaded (its @triton.jit), so set it before that.
        os.environ["TRITON_INTERPRET"] = "1"
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and device == "cpu"
    if args.tokens is None:
        args.tokens = 64 if interpret else 16384
    fn, origin = drift.get_candidate(args.candidate, args.sglang_src)
    router = args.candidate_router
    if router == "auto":
        router = "folded" if args.candidate == "upstream" else "unfused"
    dtype = getattr(torch, args.dtype)
    params = drift.random_router(args.hidden_size, args.num_experts, args.seed + 1000, dtype, device)

    rows, norm_impl, has_hidden = [], None, False
    with torch.no_grad():
        for label, data in _batches(args, dtype, device, drift):
            p = {k: data.get(k, v) for k, v in params.items()}
            pes = p["per_expert_scale"]
            if "hidden_states" in data:
                has_hidden = True
                x = data["hidden_states"]
                ref_logits, norm_impl = drift.router_unfused(x, p["router_scale"], p["router_proj"])
                cand_router = drift.router_folded if router == "folded" else drift.router_unfused
                cand_logits, _ = cand_router(x, p["router_scale"], p["router_proj"])
            else:
                ref_logits = cand_logits = data["router_logits"]
            r_w, r_ids = drift.ref.unfused_routing(ref_logits, pes, args.topk)
            c_w, c_ids = fn(cand_logits, pes, args.topk)
            row = drift.compare(r_w, r_ids, c_w, c_ids, ref_logits.shape[-1])
            dl = (ref_logits.float() - cand_logits.float()).abs()
            row.update(batch=label, max_abs_dlogit=float(dl.max()),
                       logits_differ_share=float((dl > 0).any(dim=-1).float().mean()))
            rows.append(row)
    overall = drift.merge(rows)
    overall["max_abs_dlogit"] = max(r["max_abs_dlogit"] for r in rows)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {
        "candidate": args.candidate, "origin": origin, "reference": "sglang_gemma4_opt.kernels.routing.unfused_routing"
        + (" after the 0.5.12 router" if has_hidden else ""),
        "input": "file " + args.from_file if args.from_file else f"random {args.input}, seed {args.seed}",
        "candidate_router": router if has_hidden else None, "norm": norm_impl,
        "device": device, "gpu": gpu, "triton_interpret": interpret, "dtype": args.dtype, "topk": args.topk,
        "versions": _versions(), "rows": rows, "overall": overall,
    }


COLUMNS = [("batch", "scale", "{}"), ("tokens", "tokens", "{}"), ("set_differs_share", "set differs", "{:.4%}"),
           ("order_differs_share", "order differs", "{:.4%}"), ("max_abs_dweight", "max abs dw", "{:.3e}"),
           ("mean_abs_dweight", "mean abs dw", "{:.3e}"), ("max_abs_dweight_same_set", "max abs dw, same set", "{:.3e}"),
           ("max_abs_dlogit", "max abs dlogit", "{:.3e}")]


def table(rep: dict) -> str:
    rows = rep["rows"] + [dict(rep["overall"], batch="all")]
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def markdown(rep: dict) -> str:
    where = rep["gpu"] or ("CPU, TRITON_INTERPRET=1" if rep["triton_interpret"] else "CPU")
    return "\n".join([
        f"# Routing drift: `{rep['candidate']}` vs the unfused reference", "",
        f"- candidate: `{rep['origin']}`" + (f", router {rep['candidate_router']}" if rep["candidate_router"] else ""),
        f"- reference: {rep['reference']}" + (f"; RMSNorm: {rep['norm']}" if rep["norm"] else ""),
        f"- input: {rep['input']}; dtype {rep['dtype']}; top-{rep['topk']}; {where}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in rep['versions'].items())}",
        f"- bit-exact: ids {rep['overall']['ids_equal']}, weights {rep['overall']['weights_equal']}", "",
        table(rep), ""])


def run(args) -> int:
    try:
        rep = measure(args)
    except (FileNotFoundError, ImportError, ValueError, AttributeError) as e:
        print(f"routing-drift: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    md = markdown(rep)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing_drift.json").write_text(json.dumps(rep, indent=1) + "\n")
        (out / "routing_drift.md").write_text(md)
        print(f"wrote {out / 'routing_drift.json'} and {out / 'routing_drift.md'}")
    exact = rep["overall"]["ids_equal"] and rep["overall"]["weights_equal"]
    return 1 if args.fail_on_drift and not exact else 0
