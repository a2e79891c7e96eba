"""Shared pytest configuration: seeding, and markers for device-specific tests.

* ``gpu``: needs a CUDA device (skipped without one).
* ``triton``: Triton kernels; without a GPU they run through the interpreter (``TRITON_INTERPRET=1``,
  set below before anything imports triton).
"""
import os

import pytest
import torch

# Without a GPU, Triton kernels run through its interpreter; the variable must be set before triton is
# imported (resfuse imports it), i.e. here, before any test module imports resfuse.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        skip = pytest.mark.skip(reason="Triton tests need a GPU or TRITON_INTERPRET=1 (run by .ci/run)")
        for item in items:
            if "triton" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
