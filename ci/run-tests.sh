#!/usr/bin/env bash
# The project's CPU test command: for each sglang version, a venv with that sglang, the plugin
# installed the way users install it (so sglang's own load_plugins() finds its entry point), and
# the test suite. GPU tests (marked `gpu`) skip themselves without CUDA.
#
#   bash ci/run-tests.sh                 # sglang 0.5.12 and 0.5.23 (the newest on PyPI today)
#   SGLANG_VERSIONS="0.5.12" bash ci/run-tests.sh -k qkv    # extra args go to pytest
#   DROP_VENVS=1 bash ci/run-tests.sh    # delete each venv after its tests (CI: keeps the peak
#                                        # disk use to one venv; CI machines' free disk varies)
set -euo pipefail
cd "$(dirname "$0")/.."
versions=${SGLANG_VERSIONS:-"0.5.12 0.5.23"}
venv_root=${VENV_ROOT:-.venvs}
status=0
free_disk() { df -Pk "${1:-.}" | awk 'NR==2 {printf "%.1f GiB free", $4/1048576}'; }
for v in $versions; do
  venv="$venv_root/sglang-$v"
  echo "=== sglang $v: disk before install: $(free_disk .)"
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    bash ci/install-test-env.sh "$v" "$venv"
    touch "$venv/.complete"
  fi
  py="$(cd "$venv" && pwd)/bin/python"  # absolute: VENV_ROOT may be relative or absolute
  echo "=== sglang $v: installing the plugin"
  "$py" -m pip install -q --no-deps --no-build-isolation --force-reinstall . >/dev/null
  echo "=== sglang $v: pytest"
  # Run from tests/ so `import sglang_gemma4_opt` resolves to the installed copy, not the checkout.
  (cd tests && "$py" -m pytest -q -p no:cacheprovider "$@" .) || status=1
  if [ "${DROP_VENVS:-0}" = 1 ]; then
    rm -rf "$venv"
    echo "=== sglang $v: venv removed ($(free_disk .))"
  fi
done
exit $status
