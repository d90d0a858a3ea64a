#!/usr/bin/env bash
# GSM8K regression of sglang-gemma4-opt on a GPU machine: Gemma4 26B-A4B-it + its MTP assistant
# draft, 5-shot GSM8K through sglang's own few_shot_gsm8k, once with the plugin and once with
# SGLANG_GEMMA4_OPT=0, then upstream's limits (see `sglang-gemma4-opt gsm8k --help`).
#
#   MODEL_PATH=/models/gemma-4-26B-A4B-it DRAFT_MODEL_PATH=/models/gemma-4-26B-A4B-it-assistant \
#     bash ci/gsm8k_regression.sh [more sglang-gemma4-opt gsm8k options]
#
# Settings (environment; the workflow ci/gsm8k-regression.yml sets them from its inputs):
#   MODEL_PATH, DRAFT_MODEL_PATH (required)   TP (1)   NUM_QUESTIONS (200)
#   MIN_SCORE (0.41)   MIN_ACCEPT_LENGTH (1.5)   MAX_DROP (0.02)   PORT (30300)
#   EXTRA_SERVER_ARGS ("")   OUT (gsm8k-report)   PYTHON (python3)
# Exit status: the tool's (0 pass, 1 a limit missed, 2 a run failed, 128+N interrupted by signal N).
set -euo pipefail

: "${MODEL_PATH:?set MODEL_PATH to the Gemma4 26B-A4B-it folder or hub id}"
: "${DRAFT_MODEL_PATH:?set DRAFT_MODEL_PATH to its MTP assistant draft}"
PYTHON=${PYTHON:-python3}

args=(gsm8k
  --model-path "$MODEL_PATH" --draft-model-path "$DRAFT_MODEL_PATH"
  --tp "${TP:-1}" --num-questions "${NUM_QUESTIONS:-200}"
  --min-score "${MIN_SCORE:-0.41}" --min-accept-length "${MIN_ACCEPT_LENGTH:-1.5}" --max-drop "${MAX_DROP:-0.02}"
  --port "${PORT:-30300}" --out "${OUT:-gsm8k-report}")
if [ -n "${EXTRA_SERVER_ARGS:-}" ]; then
  args+=("--extra-server-args=$EXTRA_SERVER_ARGS")  # "=": the value starts with "--"
fi

# The tool stops its servers when it gets SIGINT/SIGTERM/SIGHUP. Run it in the background and pass
# those signals on: bash would otherwise hold a trapped signal until the foreground child exits,
# and a runner that cancels the job signals this shell, not necessarily the whole group.
"$PYTHON" -m sglang_gemma4_opt "${args[@]}" "$@" &
child=$!
for sig in INT TERM HUP; do
  trap "kill -s $sig $child 2>/dev/null || true" "$sig"
done
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  # `wait` also returns (with 128+N) when a trapped signal arrives; go on until the tool has exited
  kill -0 "$child" 2>/dev/null || break
done
exit "$rc"
