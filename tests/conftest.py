"""Shared test setup.

Without a GPU the Triton interpreter is switched on here, before any kernel module is imported
(the first file pytest loads), so CPU CI runs the kernels on tiny shapes. With a GPU it stays off
and the `gpu`-marked tests run the kernels for real.
"""

import os
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402


def _interpreter_scalar_index_fix():
    """Triton 3.6's interpreter turns a scalar kernel argument into a 1-element array and indexes it
    with int(array), which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so a
    loop bounded by a runtime argument (`tl.range(0, K, ...)`) fails under TRITON_INTERPRET with the
    numpy that sglang 0.5.23 resolves. Newer Triton reads the value through squeeze(); do the same
    here. Test-only: compiled kernels on a GPU never take this path."""
    if not INTERPRET:
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._scalar_index_fix = True
    interpreter._patch_lang_tensor = patched


_interpreter_scalar_index_fix()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="runs kernels under TRITON_INTERPRET=1 (CPU)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture(scope="session")
def sglang_version():
    import sglang

    return tuple(int(x) for x in sglang.__version__.split(".")[:3])


@pytest.fixture(autouse=True)
def _fresh_fallbacks(monkeypatch):
    """A plugin path that failed stays off for the rest of its process (core.path_failed); each test starts
    with none failed, so an expected failure in one test does not turn a path off in the next."""
    from sglang_gemma4_opt import core

    monkeypatch.setattr(core, "_FALLBACKS", {})
