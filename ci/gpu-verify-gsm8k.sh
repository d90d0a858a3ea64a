#!/usr/bin/env bash
# Issue 5 on the GPU host, in one command (no real Gemma4 weights there: dummy weights).
#
#   1. routing-drift: sglang 0.5.23's fused Gemma4 routing (its kernel file, carried in UPSTREAM_SRC)
#      against the unfused reference, on this GPU with the installed torch/triton: the folded router
#      + fused top-k kernel on hidden states, the fused kernel alone on logits, and the fused
#      softmax/scale after torch.topk.
#   2. gsm8k: dummy Gemma4 26B-A4B-it target + MTP assistant draft folders (real shapes, random
#      weights), the server with the plugin then with SGLANG_GEMMA4_OPT=0 (NEXTN -> FROZEN_KV_MTP,
#      triton attention, deterministic inference), sglang's few_shot_gsm8k on NUM_QUESTIONS
#      questions, /server_info accept length, both reports; servers stop. Scores are ~0.
#
# From the repo root, carrying .gpu-bundle (sglang 0.5.12 offline bundle) and .upstream:
#   bash ci/gpu-verify-gsm8k.sh [UPSTREAM_SRC]          # default .upstream/sglang-0.5.23
# Env: OUT (where the <= 6 result files go; default ./gpu-verify-out), NUM_QUESTIONS (20),
#   MAX_NEW_TOKENS (256), GSM8K_TIMEOUT (420 s for both server runs), STEPS ("drift gsm8k"),
#   GRAMMAR_ARGS (default "--grammar-backend none --skip-server-warmup": the offline bundle has no
#   xgrammar, which the scheduler imports at start for its default grammar backend, and the warm-up
#   request is a chat request the dummy tokenizer's template need not serve; set it empty elsewhere),
#   DECODE_LOG_INTERVAL (1: sglang 0.5.12 adds to the accept-length totals that /server_info reports
#   only when it logs decode stats, every 40 decode steps by default; short random-weight answers
#   may never reach 40), TP (1: tensor-parallel size of the servers), RUNS (both | plugin | stock).
# Results in $OUT: verify.log, routing_drift.json/.md, gsm8k_report.json/.md, logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-verify-out}
UPSTREAM_SRC=${1:-${UPSTREAM_SRC:-.upstream/sglang-0.5.23}}
NUM_QUESTIONS=${NUM_QUESTIONS:-20}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}
GSM8K_TIMEOUT=${GSM8K_TIMEOUT:-420}
STEPS=${STEPS:-"drift gsm8k"}
W=${WORK:-/tmp/g4opt-verify}
mkdir -p "$OUT"
rm -rf "$W" && mkdir -p "$W"
exec > >(tee "$OUT/verify.log") 2>&1
export PYTHONUNBUFFERED=1
# The shared GPU hosts forbid NVLink multicast (it can take the host's GPUs down): keep it off in NCCL,
# PyTorch and NVSHMEM for every process this starts, TP servers included.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$SECONDS
say() { echo "[gpu-verify $(date +%H:%M:%S) +$((SECONDS - t0))s] $*"; }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

# ------------------------------------------------------------------ environment
if [ -f .gpu-bundle/activate.sh ]; then
  # shellcheck disable=SC1091
  source .gpu-bundle/activate.sh
  # installed with its dist-info, so sglang's load_plugins() finds the entry point in every process
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/p . && export PYTHONPATH=/tmp/p:$PYTHONPATH
fi
say "GPU: $(nvidia-smi -L 2>/dev/null | tr '\n' ' ')"
python3 -m sglang_gemma4_opt status | tee "$W/status.txt"
python3 - <<'EOF' 2>&1 | tee "$W/preflight.txt"
# What the server, the client and the dummy target's HF processor import; a MISSING line names a
# package to add to the bundle (EXTRA_PACKAGES="..." bash ../shared/gpu-host/build-bundle.sh).
import importlib
for m in ("aiohttp", "uvloop", "PIL", "torchvision", "sgl_kernel", "sglang.test.few_shot_gsm8k"):
    try:
        importlib.import_module(m)
        print("ok      ", m)
    except Exception as e:
        print("MISSING ", m, f"({type(e).__name__}: {e})")
EOF

# ------------------------------------------------------------------ 1. routing drift
if has_step drift; then
  for spec in "router|--input hidden" "routing|--input logits" "post-topk|--candidate upstream-post-topk --input logits"; do
    name=${spec%%|*}
    say "routing-drift $name"
    # shellcheck disable=SC2086
    python3 -m sglang_gemma4_opt routing-drift --sglang-src "$UPSTREAM_SRC" ${spec#*|} --out "$W/drift-$name" \
      || say "routing-drift $name failed"
  done
  python3 - "$W" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
reps, md = {}, []
for name in ("router", "routing", "post-topk"):
    d = w / f"drift-{name}"
    if (d / "routing_drift.json").exists():
        reps[name] = json.loads((d / "routing_drift.json").read_text())
        md.append(f"<!-- {name} -->\n" + (d / "routing_drift.md").read_text())
(out / "routing_drift.json").write_text(json.dumps(reps, indent=1) + "\n")
(out / "routing_drift.md").write_text("\n".join(md))
EOF
fi

# ------------------------------------------------------------------ 2. GSM8K pipeline, dummy weights
rc=0
if has_step gsm8k; then
  say "gsm8k: dummy models, TP ${TP:-1}, runs: ${RUNS:-both} ($NUM_QUESTIONS questions, $MAX_NEW_TOKENS new tokens)"
  # SIGTERM at the limit: the tool then stops its server, writes its reports and exits 143.
  timeout -s TERM -k 60 "$GSM8K_TIMEOUT" python3 -m sglang_gemma4_opt gsm8k \
    --write-dummy-models "$W/models" --tp "${TP:-1}" --runs "${RUNS:-both}" --num-questions "$NUM_QUESTIONS" --parallel "$NUM_QUESTIONS" \
    --max-new-tokens "$MAX_NEW_TOKENS" --context-length 4096 --startup-timeout 300 \
    --extra-server-args="--cuda-graph-max-bs 32 --decode-log-interval ${DECODE_LOG_INTERVAL:-1} ${GRAMMAR_ARGS---grammar-backend none --skip-server-warmup}" --out "$W/gsm8k"
  rc=$?
  say "gsm8k exit code $rc (0 expected: random weights are reported, not enforced)"
  cp "$W/gsm8k/gsm8k_report.json" "$W/gsm8k/gsm8k_report.md" "$OUT/" 2>/dev/null || say "no gsm8k report"
  # the plugin in every server process: its summary line names the pid that applied it
  for log in $(find "$W/gsm8k" -name '*.log' 2>/dev/null); do
    say "$(basename "$log"): $(grep -c 'sglang-gemma4-opt .* in pid' "$log") plugin summary line(s) from pids" \
      "$(grep -o 'in pid [0-9]*' "$log" | sort -u | tr '\n' ' ')"
    grep -m 20 -E 'sglang-gemma4-opt|gemma4_opt' "$log" | sed 's/^/    /'
  done
  # the servers must be gone: list any launch_server process still alive
  left=$(pgrep -f "sglang.launch_server" || true)
  if [ -n "$left" ]; then
    say "LEFTOVER server processes:"
    ps -o pid,pgid,etime,cmd -p "$(echo $left | tr ' ' ',')"
    rc=3
  else
    say "no sglang.launch_server process left"
  fi
fi

# the 4.7 MB dummy tokenizers are rebuilt by the command; everything else comes back
tar -czf "$OUT/logs.tar.gz" -C "$W" --exclude='tokenizer.json' . 2>/dev/null
say "done in $((SECONDS - t0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
