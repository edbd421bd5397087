import logging
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
