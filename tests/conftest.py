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


# ------------------------------------------------ nothing torchslim starts outlives a test
_LEFTOVER_GRACE_SECS = 5.0  # a thread or process that is ending gets this long; stuck ones fail the test
_NOT_OURS = ("resource_tracker", "forkserver")  # multiprocessing's own helpers live for the whole session


def _torchslim_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("torchslim") and t.is_alive()]


def _child_processes() -> dict[int, str]:
    """Live (not zombie) children of this process: pid -> command line."""
    children: dict[int, str] = {}
    try:
        tasks = os.listdir(f"/proc/{os.getpid()}/task")
    except OSError:  # no /proc: nothing to check
        return children
    for tid in tasks:
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:  # it ended meanwhile
                continue
            if not any(marker in cmdline for marker in _NOT_OURS):
                children[pid] = cmdline
    return children


@pytest.fixture(autouse=True)
def _no_leftover_threads_or_processes(request):
    """Fails a test that leaves a torchslim thread (named 'torchslim...') or a child process running."""
    threads_before = set(_torchslim_threads())
    children_before = set(_child_processes())
    yield
    import gc
    import time

    deadline = time.monotonic() + _LEFTOVER_GRACE_SECS
    while True:
        threads = [t for t in _torchslim_threads() if t not in threads_before]
        children = {p: c for p, c in _child_processes().items() if p not in children_before}
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        gc.collect()  # an unreferenced DataLoader or writer ends its workers when collected
        time.sleep(0.05)
    problems = [f"thread {t.name!r}" for t in threads] + [f"child process {p}: {c[:120]}" for p, c in children.items()]
    pytest.fail(f"{request.node.nodeid} left running: " + "; ".join(problems), pytrace=False)
