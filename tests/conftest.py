import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # One intra-op thread: small CPU tensors run faster and more deterministically on a busy 2-core machine.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_collections():
    """Every test starts with an empty default registry, as TF tests start with a new graph."""
    from torchslim import collections

    collections.reset()
    yield
    collections.reset()


@pytest.fixture
def subprocess_env():
    """Environment for child Python processes that import torchslim from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def python_exe():
    return sys.executable
