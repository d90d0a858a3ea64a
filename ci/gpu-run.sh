#!/usr/bin/env bash
# Everything the GPU host runs, in one call: set up sglang 0.5.12 (offline bundle) and the plugin,
# then the GPU tests and/or the benchmarks. Results and logs go to $OUT (the device tool brings that
# folder back; elsewhere it defaults to ./gpu-out).
#
#   bash ci/gpu-run.sh smoke          # GPU tests + every kernel suite at a few sizes + a tiny e2e run
#   bash ci/gpu-run.sh tests          # pytest -m gpu tests/gpu
#   bash ci/gpu-run.sh kernels [ARGS] # the full kernel suite (ARGS go to `sglang-gemma4-opt bench`)
#   bash ci/gpu-run.sh e2e [ARGS]     # plugin off vs on, whole model (ARGS go to `bench-e2e`)
#   bash ci/gpu-run.sh e2e-full [ARGS] # whole model, every optimisation isolated (issues 3, 4, 6): modes
#                                     # off on no-attn on-pr-moe pr at bs 1 16 64 x 1024, then no-attn on at
#                                     # bs 1 x 8192; ARGS go to both bench-e2e runs. Sized for one 10-minute call.
#   bash ci/gpu-run.sh moe-retune [ARGS] # re-tune the prefill MoE table (configs/moe_grouped.json) on this GPU:
#                                     # the shapes it ships now and every one_dot form; the new table comes back
#                                     # as $OUT/moe_grouped.json (ARGS go to tune_moe_grouped). One N per call.
#   bash ci/gpu-run.sh serve [ARGS]   # the serving benchmark (ARGS go to `bench-serve`); logs as serve-logs.tgz
#   bash ci/gpu-run.sh numerics [ARGS] # plugin vs stock server logprobs (ARGS go to `serve-numerics`)
#   bash ci/gpu-run.sh all            # tests, kernels, e2e
#   bash ci/gpu-run.sh kernels,tests  # several modes in one call, in that order
#
# With the device tool: carry `.gpu-bundle` and run just `bash ci/gpu-run.sh MODE` (the script
# installs the plugin and sources the bundle itself; sourcing the bundle *before* a bare `pip install`
# fails on that host, see below).
#
# Each step runs under its own time limit (env: TESTS_TIMEOUT, KERNELS_TIMEOUT, E2E_TIMEOUT, seconds;
# e2e-full: E2E_FULL_BUDGET, seconds from the script's start that both its runs must end within)
# so one stuck step cannot take the others' results with it; the script's exit code is the first
# failing step's. Nothing here changes GPU clocks or settings: nvidia-smi is only queried.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
mode=${1:-all}
shift || true
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/${mode//,/-}.log") 2>&1

status=0
step() {  # step NAME TIMEOUT CMD...: run, report its time and exit code, remember the first failure
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

# --- setup: the plugin installed with its entry point (as sglang's load_plugins() expects), then the
# bundle (sglang 0.5.12 and what it imports). The install runs first, with the bundle off the path:
# setuptools loads every installed `egg_info.writers` entry point, and the bundle's `kernels` package
# has one that imports huggingface_hub, which the host's system pip cannot import.
if ! python3 -c "import importlib.metadata as m; m.distribution('sglang-gemma4-opt')" 2>/dev/null; then
  PYTHONPATH="" python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/p . \
    || { echo "cannot install the plugin" >&2; exit 1; }
  export PYTHONPATH=/tmp/p${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .gpu-bundle/activate.sh ] && [[ ":${PYTHONPATH:-}:" != *":/tmp/gpu-site:"* ]]; then
  # shellcheck disable=SC1091
  source .gpu-bundle/activate.sh
fi
export PYTHONUNBUFFERED=1
# The shared GPU hosts forbid NVLink multicast (it can take the host's GPUs down): off in NCCL, PyTorch
# and NVSHMEM for every process this starts (bench-e2e --tp 2 spawns one per GPU).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

echo "=== host"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv 2>/dev/null || echo "(nvidia-smi unavailable)"
python3 -m sglang_gemma4_opt status || status=1

run_tests() {  # PYTEST_K: a -k expression to select tests
  local sel=()
  [ -n "${PYTEST_K:-}" ] && sel=(-k "$PYTEST_K")
  step "gpu tests" "${TESTS_TIMEOUT:-600}" python3 -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider "${sel[@]}" "$@"
}
run_kernels() { step "kernel suite" "${KERNELS_TIMEOUT:-900}" python3 -u -m sglang_gemma4_opt bench --out "$OUT" "$@"; }
run_e2e() {
  # shellcheck disable=SC2046
  step "e2e" "${E2E_TIMEOUT:-1500}" python3 -u -m sglang_gemma4_opt bench-e2e --out "$OUT" $(e2e_mem_args) "$@"
}

# Whole-model targets: issue 3 (off -> on), issue 4 (on-pr-moe -> on: the plugin's MoE tables vs the PR's),
# issue 6 (no-attn -> on: the Hopper attention kernel, at 1024 and at an 8k prompt); `pr` (PR #26588's
# state) shows off -> pr -> on. Time, from the H200 logs of earlier calls (each process loads a dummy
# 26B-A4B and starts in ~21 s of imports): the first process of a call ~125-150 s (Triton compiles
# everything cold), each later one ~45-55 s at 1024 (bs 1 16 64, 3 passes), ~40 s at 8192 (bs 1), plus
# ~13 s per bench-e2e run and ~25 s of setup: about 25 + 355 + 90 = ~470 s in all, worst seen ~505 s.
# Modes run in target order (off, on, no-attn, on-pr-moe, then pr, which no target needs) and results
# are rewritten after every mode, so a run cut short keeps issue 3's, 6's and 4's pairs first. The 1024
# run gets the budget less a reserve for the 8192 one, which gets the rest. E2E_FULL_MODES overrides the
# 1024 modes (e.g. "off on no-attn on-pr-moe" to drop pr, ~45 s).
# A KV pool big enough for bs64 x (1024 + 64) tokens: on an 80 GB card (H100) bench-e2e's default
# --mem-fraction-static 0.8 leaves 67968 sliding-window slots, fewer than the 69632 that bs64 needs (decode
# then fails allocating); 0.85 fits. Arguments given to the script come later and win.
e2e_mem_args() {
  local total
  total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 2>/dev/null | head -1)
  [[ "$total" =~ ^[0-9]+$ ]] && [ "$total" -lt 100000 ] && echo "--mem-fraction-static 0.85"
  return 0
}

run_e2e_full() {
  local budget=${E2E_FULL_BUDGET:-570} reserve=${E2E_8K_RESERVE:-130} logs="$OUT/e2e-logs" limit mem
  mem=$(e2e_mem_args)
  mkdir -p "$logs"
  pack() { tar -C "$OUT" -czf "$OUT/e2e-full-logs.tgz" e2e-logs; }  # few files come back from $OUT: one archive
  limit=$((budget - SECONDS - reserve))
  [ "$limit" -lt 60 ] && limit=60  # (timeout 0 would mean none)
  # shellcheck disable=SC2086
  step "e2e-full 1024" "$limit" python3 -u -m sglang_gemma4_opt bench-e2e --out "$OUT" --log-dir "$logs" --quiet \
    --modes ${E2E_FULL_MODES:-off on no-attn on-pr-moe pr} --batch-sizes 1 16 64 --input-len 1024 --timeout 240 $mem "$@"
  pack
  limit=$((budget - SECONDS))
  if [ "$limit" -ge 60 ]; then
    step "e2e-full 8192" "$limit" python3 -u -m sglang_gemma4_opt bench-e2e --out "$OUT" --log-dir "$logs" --quiet \
      --modes no-attn on --batch-sizes 1 --input-len 8192 --timeout 150 "$@"
  else
    echo "=== e2e-full 8192: skipped, ${limit}s left of E2E_FULL_BUDGET=${budget}s"
    [ $status -eq 0 ] && status=124
  fi
  pack && rm -rf "$logs"
}

# Issue 4's re-tune of the expert-grouped prefill MoE (tune_moe_grouped, CUDA-graph replay side by side with sglang's
# path): by default N=704 at the table's sizes, the candidates this GPU's table ships now (@shipped) and every one_dot
# form (*_od*), the timing of session 14's H200 runs. On an H200 (15 candidates x 4 sizes, the best 4 and the
# shipped ones at 65536) the tuner took 217 s for N=704 and 227 s for N=352 of the 10 minutes a call may run: one N
# per call (RETUNE_NS=352 for the next). --write-table rewrites the table python imports (the sizes tuned now;
# RETUNE_MS="16384 65536" leaves the others as they were); it is copied to $OUT to be committed, then
# `kernels --suite fused_moe` measures it.
# RETUNE_NS, RETUNE_MS, RETUNE_CANDIDATES (split on blanks, never globbed) and RETUNE_TIMEOUT override.
run_moe_retune() {
  local -a ns ms cands
  local table before
  # the table the tuner will rewrite (the package python imports here: the checkout or an installed copy)
  if ! table=$(python3 -c "from sglang_gemma4_opt.kernels.moe_grouped import TABLE_PATH; print(TABLE_PATH)"); then
    echo "=== moe retune: cannot import the plugin"
    [ $status -eq 0 ] && status=1
    return 0
  fi
  before=$(mktemp)
  cp "$table" "$before" 2>/dev/null || echo '{}' > "$before"
  read -r -a ns <<< "${RETUNE_NS:-704}"
  read -r -a ms <<< "${RETUNE_MS:-2048 4096 8192 16384 65536}"
  read -r -a cands <<< "${RETUNE_CANDIDATES:-@shipped *_od*}"
  step "moe retune" "${RETUNE_TIMEOUT:-570}" python3 -u -m sglang_gemma4_opt.bench.tune_moe_grouped --out "$OUT" \
    --ns "${ns[@]}" --ms "${ms[@]}" --candidates "${cands[@]}" --no-pieces --rounds 3 --budget 0.2 --preheat 0.6 \
    --write-table "$@"
  if cmp -s "$table" "$before"; then
    echo "=== moe retune: the table is unchanged"
  else
    cp "$table" "$OUT/moe_grouped.json" && echo "=== moe retune: the new table is $OUT/moe_grouped.json"
  fi
  rm -f "$before"
}

# The serving benchmark (issue 25): one sglang.launch_server per mode, sglang's bench_serving against it. Server and
# client logs travel back as one archive (few files come back from $OUT). SERVE_TIMEOUT (default 570 s) bounds it;
# results are rewritten after every server, so a run cut short keeps the servers it finished.
run_serve() {
  local logs="$OUT/serve-logs"
  mkdir -p "$logs"
  step "bench-serve" "${SERVE_TIMEOUT:-570}" python3 -u -m sglang_gemma4_opt bench-serve --out "$OUT" --log-dir "$logs" "$@"
  tar -C "$OUT" -czf "$OUT/serve-logs.tgz" serve-logs && rm -rf "$logs"
}

# Serving numerics (issue 25): stock and plugin servers, teacher-forced logprobs of the same prompts, against how far
# stock differs from itself (sglang-gemma4-opt serve-numerics; ARGS go to it). NUMERICS_TIMEOUT (default 570 s).
run_numerics() {
  local logs="$OUT/numerics-logs"
  mkdir -p "$logs"
  step "serve-numerics" "${NUMERICS_TIMEOUT:-570}" python3 -u -m sglang_gemma4_opt serve-numerics --out "$OUT" \
    --log-dir "$logs" "$@"
  tar -C "$OUT" -czf "$OUT/numerics-logs.tgz" numerics-logs && rm -rf "$logs"
}

for m in ${mode//,/ }; do
  case "$m" in
    smoke)
      # Limits sized so the whole smoke fits one 9-minute device call; the bench smoke test is left
      # to the kernel step below, which runs the same code at more sizes.
      TESTS_TIMEOUT=${TESTS_TIMEOUT:-200} run_tests -k "not bench_quick"
      step "kernel smoke" "${KERNELS_TIMEOUT:-100}" python3 -u -m sglang_gemma4_opt bench --quick \
        --sizes 1 16 256 2048 8x1024 --out "$OUT/smoke"
      # A tiny whole-model run with the plugin on: it loads, the patches apply in bench_one_batch's
      # process, and latencies parse. No CUDA graphs, to keep start-up short.
      step "e2e smoke" "${E2E_TIMEOUT:-200}" python3 -u -m sglang_gemma4_opt bench-e2e --modes on --batch-sizes 4 \
        --input-len 256 --output-len 8 --passes 1 --quiet --out "$OUT/smoke" --timeout 190 \
        --extra-args="--disable-cuda-graph"
      # Few files come back from $OUT: pack the smoke outputs into one.
      tar -C "$OUT" -czf "$OUT/smoke-results.tgz" smoke && rm -rf "$OUT/smoke"
      ;;
    tests) run_tests ;;
    kernels) run_kernels "$@" ;;
    e2e) run_e2e "$@" ;;
    e2e-full) run_e2e_full "$@" ;;
    moe-retune) run_moe_retune "$@" ;;
    serve) run_serve "$@" ;;
    numerics) run_numerics "$@" ;;
    all)
      run_tests
      run_kernels
      run_e2e
      ;;
    *)
      echo "usage: $0 {smoke|tests|kernels|e2e|e2e-full|moe-retune|serve|numerics|all}[,MODE...] [args for bench / bench-e2e /" \
        "tune_moe_grouped / bench-serve]" >&2
      exit 2
      ;;
  esac
done
echo "=== done: exit $status; files in $OUT:"
ls -la "$OUT"
exit $status
