#!/usr/bin/env bash
# Build a CPU-only test venv for one sglang version:
#
#   bash ci/install-test-env.sh SGLANG_VERSION VENV_DIR      # e.g. 0.5.12 .venvs/sglang-0.5.12
#
# A full `pip install sglang==X` pulls a CUDA torch (GBs) and many GPU-only packages, so this installs
#   * torch 2.13.0+cpu (the wheel in /opt/wheels, found through pip's find-links) and triton 3.6.0
#     (for TRITON_INTERPRET=1 kernels on CPU tensors),
#   * sglang==X with --no-deps,
#   * only the packages that importing sglang's plugin framework, Gemma4 model, fused-MoE config,
#     extend attention and Gemma4 fused ops needs (found by trial), pinned below,
#   * pytest, setuptools and wheel (the caller then runs `pip install --no-build-isolation .`).
# Every install goes through a constraints file, so nothing can swap torch for a CUDA build.
#
# Env overrides: PYTHON (default python3), TORCH_WHEEL_DIR (default /opt/wheels),
# SGLANG_WHEEL_DIR (a folder holding sglang wheels to use instead of PyPI), SKIP_IMPORT_CHECK=1.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 SGLANG_VERSION VENV_DIR" >&2
  exit 2
fi
SGL_VER=$1
VENV=$2
PY=${PYTHON:-python3}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
t_start=$SECONDS

log() { printf '[install-test-env %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ---------------------------------------------------------------- what each sglang version needs
# Top-level packages imported by the modules checked at the end (sglang's own pins where it has them).
deps="numpy orjson psutil pybase64 requests packaging pillow starlette torchvision tqdm ipython
pydantic aiohttp pyzmq transformers openai partial-json-parser dill sentencepiece einops
compressed-tensors gguf msgspec kernels>=0.14.1,<0.15"
# kernels: not imported by what the tests load, but pinned as sglang's Gemma4 needs it: a plain
# `pip install sglang==0.5.12` resolves kernels 0.17, and then the Gemma4 import fails with
# "ValueError: Either a revision or a version must be specified".
tools="triton pytest setuptools wheel"

case "$SGL_VER" in
  0.5.11 | 0.5.12) family=old ;;
  0.5.23) family=new ;;
  *)
    if [ "$(printf '%s\n' "$SGL_VER" 0.5.13 | sort -V | head -1)" = "$SGL_VER" ]; then family=old; else family=new; fi
    log "WARNING: sglang $SGL_VER is untested here; using the pins of the '$family' family"
    ;;
esac

# Versions shared by both families (resolved 2026-11 on this machine; transitive deps included).
common_pins="torch==2.13.0
triton==3.6.0
torchvision==0.28.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
asttokens==3.0.2
attrs==26.1.0
certifi==2026.10.18
charset-normalizer==3.5.2
click==8.5.1
dill==0.4.1
distro==1.9.0
einops==0.8.2
executing==2.3.0
filelock==4.2.12
frozenlist==1.8.0
fsspec==2026.9.0
gguf==0.19.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpx==0.28.1
huggingface_hub==1.33.0
idna==3.20
iniconfig==2.3.1
ipython==9.18.1
ipython_pygments_lexers==1.1.1
jedi==0.20.1
Jinja2==3.1.6
jiter==0.19.0
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
matplotlib-inline==0.2.2
mdurl==0.1.2
mpmath==1.3.0
msgspec==0.22.0
multidict==7.2.1
networkx==3.6.1
orjson==3.13.0
packaging==26.3
parso==0.8.7
partial-json-parser==0.2.1.1.post7
pexpect==4.9.0
pillow==13.0.0
pluggy==1.7.0
prompt_toolkit==3.0.53
propcache==0.5.4
psutil==7.2.2
ptyprocess==0.7.0
pure_eval==0.2.4
pybase64==1.5.1
pydantic==2.14.3
pydantic_core==2.50.4
Pygments==2.21.0
pytest==9.2.0
PyYAML==6.0.3
pyzmq==27.3.0
regex==2026.11.15
requests==2.34.2
rich==15.0.0
safetensors==0.8.0
setuptools==84.2.1
shellingham==1.5.4
sniffio==1.3.1
stack-data==0.6.3
starlette==1.10.0
sympy==1.14.0
tqdm==4.70.1
traitlets==5.16.1
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
wcwidth==0.9.4
wheel==0.48.0
yarl==1.25.1"

if [ "$family" = old ]; then
  # sglang 0.5.11 / 0.5.12 (versions from sglang 0.5.12's resolved environment).
  version_pins="transformers==5.6.0
tokenizers==0.22.2
openai==2.6.1
compressed-tensors==0.20.0
sentencepiece==0.2.3
numpy==2.3.5"
  check_mods="sglang.srt.layers.attention.triton_ops.extend_attention sglang.srt.layers.gemma4_fused_ops"
else
  # sglang 0.5.23 (its METADATA pins transformers, tokenizers, openai, compressed-tensors,
  # sentencepiece, apache-tvm-ffi; sglang.kernels imports tvm_ffi).
  deps="$deps apache-tvm-ffi"
  version_pins="transformers==5.19.0
tokenizers==0.23.2
openai==2.8.0
compressed-tensors==0.18.0
sentencepiece==0.2.1
apache-tvm-ffi==0.1.11
numpy==2.4.6"
  check_mods="sglang.kernels.ops.attention.extend_attention sglang.kernels.ops.layernorm.gemma4_fused_ops sglang.kernels.ops.moe.gemma4_routing"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cons="$tmp/constraints.txt"
printf '%s\n%s\n' "$common_pins" "$version_pins" > "$cons"

# pip -q still prints the image's harmless "Location 'file:///opt/pypi-more/...' is ignored"
# warnings, and (because sglang is installed --no-deps on purpose) "sglang X requires Y" conflict
# lines: drop those, keep everything else. pip's own exit status is kept (pipefail).
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input -c "$cons" "$@" 2>&1 |
    { grep -vE "^WARNING: Location 'file:|^sglang [^ ]+ requires |^ERROR: pip's dependency resolver does not currently take into account" || true; }
}

# ---------------------------------------------------------------- install
log "sglang $SGL_VER ($family family) -> venv $VENV with $($PY --version 2>&1)"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv"
  "$PY" -m venv "$VENV"
else
  log "reusing existing venv"
fi

t=$SECONDS
log "installing torch==2.13.0+cpu (find-links $TORCH_WHEEL_DIR)"
pip_install --find-links "$TORCH_WHEEL_DIR" "torch==2.13.0+cpu"
log "  torch done in $((SECONDS - t))s"

t=$SECONDS
log "installing deps: ${deps//$'\n'/ } + $tools"
# shellcheck disable=SC2086
pip_install --find-links "$TORCH_WHEEL_DIR" $deps $tools
log "  deps done in $((SECONDS - t))s"

t=$SECONDS
sgl_src=()
if [ -n "${SGLANG_WHEEL_DIR:-}" ]; then sgl_src=(--find-links "$SGLANG_WHEEL_DIR"); fi
log "installing sglang==$SGL_VER --no-deps"
pip_install --no-deps "${sgl_src[@]}" "sglang==$SGL_VER"
log "  sglang done in $((SECONDS - t))s"

# torchvision 0.28.0 on PyPI is a CUDA build: its _C ops cannot load with CPU torch, and its
# _meta_registrations then fails on `register_fake("torchvision::nms")` at import time. sglang imports
# torchvision at module level (0.5.12: sglang.srt.utils.common; 0.5.23: multimodal utils), so guard
# those two decorators the same way torchvision already guards its other meta registrations.
tv_dir=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
tv_meta="$tv_dir/_meta_registrations.py"
if grep -qE '^@torch\.library\.register_fake\("torchvision::q?nms"\)$' "$tv_meta"; then
  log "patching $tv_meta (torchvision ops unavailable with CPU torch)"
  sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$tv_meta"
fi

# ---------------------------------------------------------------- check
if [ "${SKIP_IMPORT_CHECK:-0}" != 1 ]; then
  t=$SECONDS
  log "checking imports"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -W ignore - $check_mods <<'EOF'
import importlib, sys
import torch, triton
assert torch.version.cuda is None, f"expected a CPU torch, got {torch.__version__}"
assert triton.__version__ == "3.6.0", triton.__version__
import sglang
from sglang.srt.plugins import load_plugins  # noqa: F401
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: F401
import sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config  # noqa: F401
import sglang.srt.models.gemma4_causal  # noqa: F401
for m in sys.argv[1:]:
    importlib.import_module(m)
print(f"ok: sglang {sglang.__version__}, torch {torch.__version__}, triton {triton.__version__}")
EOF
  log "  check done in $((SECONDS - t))s"
fi
log "done in $((SECONDS - t_start))s: $VENV"
