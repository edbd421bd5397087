"""Exact resume with real processes: kill -9 a training job, restart it, compare bitwise."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from torchslim import checkpoint
from torchslim import logdir as slim_logdir

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "resume_train.py")
pytestmark = pytest.mark.slow


def _run(logdir, out, env, *extra, timeout=120):
    subprocess.run([sys.executable, SCRIPT, str(logdir), str(out), *extra], env=env, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _start(logdir, out, env, *extra):
    return subprocess.Popen([sys.executable, SCRIPT, str(logdir), str(out), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the training job exited (status {proc.returncode}) before the kill")
        time.sleep(0.01)
    pytest.fail("timed out waiting for the training job")


def _assert_bitwise_equal(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {path}"
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {path}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), OMP_NUM_THREADS="1")
    d = tmp_path_factory.mktemp("run_a")
    _run(d / "logdir", d / "final.pt", env)
    return torch.load(d / "final.pt", weights_only=True), env


def test_uninterrupted_run_reaches_the_last_step(uninterrupted):
    final, _ = uninterrupted
    assert final["step"] == 200


def test_kill_at_a_random_step_then_restart_matches_bitwise(uninterrupted, tmp_path):
    final_a, env = uninterrupted
    logdir, out = tmp_path / "logdir", tmp_path / "final.pt"
    proc = _start(logdir, out, env)
    try:
        _wait_for(lambda: checkpoint.list_checkpoints(str(logdir)), 60, proc)
        time.sleep(random.uniform(0.05, 0.6))  # a random step after the first checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it was killed; lengthen it"
    killed_at = checkpoint.checkpoint_step(checkpoint.latest_checkpoint(str(logdir)))
    assert 0 < killed_at < 200
    _run(logdir, out, env)
    final_b = torch.load(out, weights_only=True)
    assert final_b["step"] == 200
    _assert_bitwise_equal(final_a["model"], final_b["model"], "model")
    _assert_bitwise_equal(final_a["optimizer"], final_b["optimizer"], "optimizer")


def test_kill_while_a_checkpoint_is_being_written(uninterrupted, tmp_path):
    final_a, env = uninterrupted
    logdir, out, marker = tmp_path / "logdir", tmp_path / "final.pt", tmp_path / "saving"
    proc = _start(logdir, out, env, "--slow-save-marker", str(marker))
    try:
        _wait_for(marker.exists, 60, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [n for n in os.listdir(logdir) if n.startswith(".tmp-")]
    assert leftovers, "the kill should have left a half-written temporary file"
    complete = checkpoint.list_checkpoints(str(logdir))
    assert complete and all(not n.startswith(".tmp-") for n in map(os.path.basename, complete))
    for path in complete:
        checkpoint.verify_checkpoint(path)  # every listed checkpoint is whole
    _run(logdir, out, env)
    final_b = torch.load(out, weights_only=True)
    assert final_b["step"] == 200
    _assert_bitwise_equal(final_a["model"], final_b["model"], "model")
    _assert_bitwise_equal(final_a["optimizer"], final_b["optimizer"], "optimizer")
    assert not [n for n in os.listdir(logdir) if n.startswith(".tmp-")], "stale temporary files are cleaned up"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(uninterrupted, tmp_path, damage):
    final_a, env = uninterrupted
    logdir, out = tmp_path / "logdir", tmp_path / "final.pt"
    _run(logdir, out, env, "--steps", "120", "--step-sleep", "0")
    paths = checkpoint.list_checkpoints(str(logdir))
    newest = paths[-1]
    assert checkpoint.checkpoint_step(newest) == 120
    data = bytearray(open(newest, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    open(newest, "wb").write(bytes(data))
    proc = subprocess.run([sys.executable, SCRIPT, str(logdir), str(out), "--step-sleep", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Skipping checkpoint" in proc.stderr and os.path.basename(newest) in proc.stderr
    final_b = torch.load(out, weights_only=True)
    assert final_b["step"] == 200
    # It resumed from step 110, so it retrained 110..120 on the same data with the same RNG: bitwise equal.
    _assert_bitwise_equal(final_a["model"], final_b["model"], "model")


# --------------------------------------------------------------------------- preemption: SIGTERM, SIGINT


def _start_printing(logdir, out, env, *extra):
    return subprocess.Popen([sys.executable, SCRIPT, str(logdir), str(out), "--print-steps", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until_step(proc, target):
    """Reads the steps the job prints until it reached ``target``; returns the last one read."""
    step = 0
    while step < target:
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            pytest.fail(f"the training job exited (status {proc.returncode}) at step {step}, before step {target}")
        step = int(line)
    return step


def _finish(proc, timeout=60):
    try:
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return rest.split(), err


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_at_a_random_step_saves_that_step_exits_and_resumes_bitwise(uninterrupted, tmp_path, sig, status):
    final_a, env = uninterrupted
    logdir, out = tmp_path / "logdir", tmp_path / "final.pt"
    # No periodic checkpoint before step 1000: the one the signal makes is the only one.
    proc = _start_printing(logdir, out, env, "--save-every", "1000")
    target = random.randint(5, 150)
    _read_until_step(proc, target)
    proc.send_signal(sig)
    rest, err = _finish(proc)
    # Python ends an uncaught KeyboardInterrupt by re-raising SIGINT (status -2, 130 in a shell);
    # SIGTERM ends with Preempted, a SystemExit(143).
    assert proc.returncode == status, err
    stopped_at = int(rest[-1]) if rest else target
    assert target <= stopped_at < 200
    assert checkpoint.list_checkpoints(str(logdir)) == [str(logdir / f"model.ckpt-{stopped_at}.pt")], err
    assert f"Received {sig.name}: stopping at global step {stopped_at}" in err
    checkpoint.verify_checkpoint(str(logdir / f"model.ckpt-{stopped_at}.pt"))
    _run(logdir, out, env, "--save-every", "1000")
    final_b = torch.load(out, weights_only=True)
    assert final_b["step"] == 200
    _assert_bitwise_equal(final_a["model"], final_b["model"], "model")
    _assert_bitwise_equal(final_a["optimizer"], final_b["optimizer"], "optimizer")


def test_a_second_sigterm_during_the_final_save_stops_at_once(uninterrupted, tmp_path):
    _, env = uninterrupted
    logdir, out, marker = tmp_path / "logdir", tmp_path / "final.pt", tmp_path / "saving"
    proc = _start_printing(logdir, out, env, "--save-every", "1000", "--save-sleep", "60", "--save-marker", str(marker))
    try:
        _read_until_step(proc, 10)
        proc.send_signal(signal.SIGTERM)
        _wait_for(marker.exists, 60, proc)  # the checkpoint of the first signal is being written (for 60 s)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = _finish(proc, timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - sent < 40, "the second signal did not stop the job at once"
    assert proc.returncode == 143, err
    assert checkpoint.list_checkpoints(str(logdir)) == [], "the interrupted save left no checkpoint"
    assert not [n for n in os.listdir(logdir) if n.startswith(".tmp-")], "nor a temporary file"


# --------------------------------------------------------------------------- one writer per logdir


def test_a_second_job_on_a_logdir_fails_at_start_naming_the_first_which_is_undisturbed(uninterrupted, tmp_path):
    final_a, env = uninterrupted
    logdir = tmp_path / "logdir"
    first = _start_printing(logdir, tmp_path / "first.pt", env, "--step-sleep", "0.1")  # 200 steps: about 20 s
    try:
        _read_until_step(first, 1)
        holder = slim_logdir.holder(logdir)
        second = subprocess.run([sys.executable, SCRIPT, str(logdir), str(tmp_path / "second.pt")], env=env,
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first job ended before the second started; slow it down"
        assert slim_logdir.holder(logdir) == holder, "the second job did not touch the lock file"
        _, first_err = _finish(first, timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert second.returncode == 1, second.stderr
    assert "LogdirLockedError" in second.stderr and f"pid {first.pid} on host" in second.stderr
    assert "Restored" not in second.stderr and not (tmp_path / "second.pt").exists()
    assert first.returncode == 0, first_err
    final_first = torch.load(tmp_path / "first.pt", weights_only=True)
    _assert_bitwise_equal(final_a["model"], final_first["model"], "model")
    _assert_bitwise_equal(final_a["optimizer"], final_first["optimizer"], "optimizer")
