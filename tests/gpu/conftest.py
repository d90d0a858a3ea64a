"""GPU tests: every test here is marked `gpu` and is skipped cleanly where no CUDA device is visible
(CI has none); modules import torch/sglang through `pytest.importorskip`, so a machine without them
skips too instead of failing collection.

Run on a GPU host: `pytest -m gpu tests/gpu` (or `bash ci/gpu-run.sh tests`).
"""

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no torch, or a torch without CUDA support
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sbs():
    """sglang's stock functions and the plugin's, side by side in this process (apply() runs once)."""
    from sglang_gemma4_opt import settings
    from sglang_gemma4_opt.bench.common import side_by_side

    if not settings.plugin_enabled():
        pytest.skip(f"{settings.ENV_ENABLE}=0: nothing to compare")
    return side_by_side()


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A different seed per test (fresh random inputs everywhere), fixed by the test's id so a failure
    reproduces."""
    try:
        import torch
    except ImportError:
        return
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF)
