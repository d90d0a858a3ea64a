"""The patch table: `apply()`, `status` and the tests all read this one list, in this order.

Each module opens with its target, why, the upstream PR and when it can be removed.
"""

from . import (extend_attention_blocks, extend_attention_kernel, frozen_kv_mtp_finished_batch, moe_configs,
               moe_small_batch, prefill_warmup, qkv_rmsnorm, unfused_routing)

PATCHES = (extend_attention_blocks, qkv_rmsnorm, moe_configs, unfused_routing, extend_attention_kernel, moe_small_batch,
           prefill_warmup, frozen_kv_mtp_finished_batch)
PATCH_NAMES = tuple(p.NAME for p in PATCHES)
# Names SGLANG_GEMMA4_OPT_DISABLE also takes: parts of a patch that can be turned off alone.
SUB_SWITCHES = (moe_small_batch.GROUPED_SWITCH, extend_attention_kernel.HD512_SWITCH)
SWITCH_NAMES = frozenset(PATCH_NAMES + SUB_SWITCHES)
