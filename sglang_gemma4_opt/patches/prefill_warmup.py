"""Patch: compile the prefill kernels while the server starts, not while the first requests wait.

Target:   `ModelRunner.init_device_graphs` in `sglang.srt.model_executor.model_runner` (sglang 0.5.11/0.5.12:
          it captures the decode CUDA graphs, the last step of the model runner's start-up). AROUND: sglang's
          method runs first, then `warmup.warm_up(model_runner)`.
Why:      decode kernels compile during graph capture, prefill kernels on first use. The plugin's MoE tables
          give about twenty launch shapes by token count and the plugin adds its own attention and grouped
          MoE kernels, so on an H200 (sglang 0.5.12, dummy 26B-A4B, fresh Triton cache) the first load after
          start ran at 0.37x the throughput of the same load warm (stock: 0.93x), its median TTFT 6.6 s. The
          warm-up runs sglang's own fused-MoE entry point and the hooked extend attention on random data at
          the token counts of the tables (`warmup.py`), outside any graph capture, before the server answers.
Routing:  skipped in deterministic-inference mode (the plugin's kernels stand aside there), for draft
          workers, off CUDA, and when neither `moe_configs`, `moe_small_batch` nor `extend_attention_kernel`
          is applied. An error ends the warm-up with one warning; the server starts as it would without it.
          `SGLANG_GEMMA4_OPT_DISABLE=prefill_warmup` turns it off.
Upstream: none (sglang's own `--skip-server-warmup`-less warm-up sends one short request, which compiles one
          token count).
Remove:   when sglang compiles its prefill kernels at start-up, or the plugin's kernels are compiled ahead of
          time.
"""

from __future__ import annotations

import logging

from ..core import HookSpec, NotApplicable, import_first, results, sglang_deterministic

NAME = "prefill_warmup"
SUMMARY = "compile the prefill kernels (MoE token counts of the tables, attention) at start-up, not on first use"
UPSTREAM = "none (plugin-only)"
REMOVE_WHEN = "sglang compiles its prefill kernels at start-up"

MODULE = "sglang.srt.model_executor.model_runner"
CLASS, METHOD = "ModelRunner", "init_device_graphs"
USERS = ("moe_configs", "moe_small_batch", "extend_attention_kernel")  # patches whose kernels it compiles

logger = logging.getLogger("sglang_gemma4_opt")


def skip_reason(model_runner) -> str | None:
    """Why this model runner is not warmed up (None: it is)."""
    if sglang_deterministic():
        return "deterministic inference"
    if getattr(model_runner, "is_draft_worker", False):
        return "draft worker"
    if str(getattr(model_runner, "device", "")) != "cuda":
        return f"device {getattr(model_runner, 'device', None)!r}"
    res = results() or {}
    if not any(res.get(n) is not None and res[n].status == "applied" for n in USERS):
        return "none of " + ", ".join(USERS) + " applied"
    return None


def hook(original, self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    try:
        why = skip_reason(self)
        if why is not None:
            logger.info("sglang-gemma4-opt: prefill warm-up skipped (%s)", why)
            return out
        from .. import warmup

        logger.info("sglang-gemma4-opt: %s", warmup.warm_up(self))
    except Exception as e:  # the server starts as it would without the warm-up
        logger.warning("sglang-gemma4-opt: prefill warm-up stopped (%s: %s); kernels compile on first use",
                       type(e).__name__, e)
    return out


def prepare() -> list[HookSpec]:
    module = import_first(MODULE)
    cls = getattr(module, CLASS, None)
    if cls is None:
        raise NotApplicable(f"{MODULE} has no {CLASS}")
    if not callable(cls.__dict__.get(METHOD)):  # sglang >= 0.5.13 reorganised the runner's start-up
        raise NotApplicable(f"{CLASS} has no {METHOD} (the start-up step this patch follows)")
    return [HookSpec(f"{MODULE}.{CLASS}.{METHOD}", hook, "around")]
