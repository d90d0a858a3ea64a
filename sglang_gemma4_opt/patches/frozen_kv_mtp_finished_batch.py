"""Patch: a Frozen-KV MTP decode step in which every request finishes leaves a draft input, not a verify input.

Target:   `FrozenKVMTPWorker.forward_batch_generation` in `sglang.srt.speculative.frozen_kv_mtp_worker` (the v1
          speculative worker that serves Gemma4's MTP assistant: NEXTN/EAGLE with a Gemma4AssistantForCausalLM
          draft is promoted to FROZEN_KV_MTP).
Why:      after verify, the worker hands the batch a fresh `FrozenKVMTPDraftInput` only when some request is
          still running (`draft_extend_input.input_ids.shape[0] > 0`). When all requests of the decode batch
          finish in the same step (same output lengths, as under load with fixed lengths), `batch.spec_info`
          stays the `FrozenKVMTPVerifyInput`. The finished requests are filtered out only when the batch decodes
          again; if a prefill runs first, the scheduler merges that prefill into the stale running batch and
          `ScheduleBatch.merge_batch` calls `spec_info.merge_batch`, which a verify input does not have:
          `AttributeError: 'FrozenKVMTPVerifyInput' object has no attribute 'merge_batch'` (stock sglang 0.5.12
          crashed so under 64 concurrent 1024/256 requests on an H200). sglang's EAGLE worker has the missing
          branch (`EAGLEWorker._draft_preprocess_idle`: "Install an idle EagleDraftInput so next iter's scheduler
          ops (merge_batch / filter_batch) see well-typed empty tensors"); this patch adds it: after the
          original step, a decode batch still holding a verify input gets the idle draft input the worker builds
          itself for an all-finished batch (`FrozenKVMTPDraftInput.create_idle_input`, as in its
          `forward_draft_extend_after_decode`). Nothing else changes: the step's result is returned as is.
Routing:  every decode step of the worker (a correctness fix: on in deterministic mode too). A failure while
          building the idle input is logged once and leaves the batch as sglang left it.
          `SGLANG_GEMMA4_OPT_DISABLE=frozen_kv_mtp_finished_batch` turns it off.
Upstream: sglang's v1 Frozen-KV MTP worker (0.5.11/0.5.12) lacks the branch; sglang 0.5.23 has no v1 worker
          (FROZEN_KV_MTP runs on `frozen_kv_mtp_worker_v2`, which seeds an idle draft input itself).
Remove:   when the plugin no longer supports sglang versions with the v1 Frozen-KV MTP worker.
"""

from __future__ import annotations

import inspect
import logging

from ..core import AlreadyUpstream, HookSpec, NotApplicable, import_first

NAME = "frozen_kv_mtp_finished_batch"
SUMMARY = "MTP (Frozen-KV) decode step where every request finishes: idle draft input, no merge_batch crash"
UPSTREAM = "none in sglang's v1 Frozen-KV MTP worker (EAGLE's worker has the branch); gone with the v1 worker"
REMOVE_WHEN = "no supported sglang has the v1 Frozen-KV MTP worker"

MODULE = "sglang.srt.speculative.frozen_kv_mtp_worker"
CLASS, METHOD = "FrozenKVMTPWorker", "forward_batch_generation"
UPSTREAM_MARK = "create_idle_input"  # the branch, if forward_batch_generation itself ever builds the idle input

logger = logging.getLogger("sglang_gemma4_opt")
_failed_logged = False


def idle_draft_input(worker):
    """The idle draft input the worker installs for a batch whose requests all finished."""
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
    from sglang.srt.speculative.frozen_kv_mtp_info import FrozenKVMTPDraftInput

    return FrozenKVMTPDraftInput.create_idle_input(
        device=worker.device, hidden_size=worker._recurrent_hidden_size, dtype=worker.model_config.dtype,
        topk=worker.topk, capture_hidden_mode=CaptureHiddenMode.LAST)


def left_with_verify_input(batch) -> bool:
    """True for a decode batch whose spec_info is still the step's verify input."""
    from sglang.srt.speculative.frozen_kv_mtp_info import FrozenKVMTPVerifyInput

    if batch.forward_mode.is_extend() or getattr(batch, "is_extend_in_batch", False):
        return False
    return isinstance(batch.spec_info, FrozenKVMTPVerifyInput)


def hook(original, self, batch, *args, **kwargs):
    global _failed_logged
    out = original(self, batch, *args, **kwargs)
    try:
        if left_with_verify_input(batch):
            batch.spec_info = idle_draft_input(self)
    except Exception as e:  # leave the batch as sglang left it
        if not _failed_logged:
            _failed_logged = True
            logger.warning("sglang-gemma4-opt: %s could not install an idle draft input (%s: %s)", NAME,
                           type(e).__name__, e)
    return out


def prepare() -> list[HookSpec]:
    module = import_first(MODULE)  # NotApplicable where sglang has no v1 Frozen-KV MTP worker (0.5.23)
    cls = getattr(module, CLASS, None)
    func = cls.__dict__.get(METHOD) if cls is not None else None
    if func is None:
        raise NotApplicable(f"{MODULE} has no {CLASS}.{METHOD}")
    try:
        src = inspect.getsource(func)
    except (OSError, TypeError):
        src = ""
    if UPSTREAM_MARK in src:
        raise AlreadyUpstream(f"{CLASS}.{METHOD} installs an idle draft input itself")
    try:
        import_first("sglang.srt.speculative.frozen_kv_mtp_info").FrozenKVMTPDraftInput.create_idle_input
    except AttributeError as e:
        raise NotApplicable(f"FrozenKVMTPDraftInput has no create_idle_input ({e})")
    return [HookSpec(f"{MODULE}.{CLASS}.{METHOD}", hook, "around")]
