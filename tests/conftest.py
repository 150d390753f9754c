import os
import zlib

import pytest
import torch


def pytest_configure(config):
    # Also declared in pyproject.toml; registering here keeps `pytest tests/` warning-free
    # from any directory.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and libfcsa built with CUDA")
    config.addinivalue_line("markers", "distributed: starts several processes (gloo on the CPU)")


def cuda_ready() -> bool:
    import fcsa

    return torch.cuda.is_available() and fcsa.cuda_available()


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and libfcsa built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs for each test, reproducible from the test's id; set
    FCSA_TEST_SEED to draw another set."""
    salt = os.environ.get("FCSA_TEST_SEED", "")
    torch.manual_seed(zlib.crc32((request.node.nodeid + salt).encode()))
