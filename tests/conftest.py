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
