#!/usr/bin/env bash
# Everything the GPU host runs, in one call: set up sglang 0.5.12 (offline bundle) and the plugin,
# then the GPU tests and/or the benchmarks. Results and logs go to $OUT (the device tool brings that
# folder back; elsewhere it defaults to ./gpu-out).
#
#   bash ci/gpu-run.sh smoke          # GPU tests + every kernel suite at a few sizes + a tiny e2e run
#   bash ci/gpu-run.sh tests          # pytest -m gpu tests/gpu
#   bash ci/gpu-run.sh kernels [ARGS] # the full kernel suite (ARGS go to `sglang-gemma4-opt bench`)
#   bash ci/gpu-run.sh e2e [ARGS]     # plugin off vs on, whole model (ARGS go to `bench-e2e`)
#   bash ci/gpu-run.sh all            # tests, kernels, e2e
#   bash ci/gpu-run.sh kernels,tests  # several modes in one call, in that order
#
# With the device tool: carry `.gpu-bundle` and run just `bash ci/gpu-run.sh MODE` (the script
# installs the plugin and sources the bundle itself; sourcing the bundle *before* a bare `pip install`
# fails on that host, see below).
#
# Each step runs under its own time limit (env: TESTS_TIMEOUT, KERNELS_TIMEOUT, E2E_TIMEOUT, seconds)
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
run_e2e() { step "e2e" "${E2E_TIMEOUT:-1500}" python3 -u -m sglang_gemma4_opt bench-e2e --out "$OUT" "$@"; }

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
    all)
      run_tests
      run_kernels
      run_e2e
      ;;
    *)
      echo "usage: $0 {smoke|tests|kernels|e2e|all}[,MODE...] [args for bench / bench-e2e]" >&2
      exit 2
      ;;
  esac
done
echo "=== done: exit $status; files in $OUT:"
ls -la "$OUT"
exit $status
