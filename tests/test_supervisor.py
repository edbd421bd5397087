"""The Supervisor's recovery duties, in one process: stop signals, the logdir lock, storage checks, arguments.

Real signals (os.kill of this process from inside a step), real locks (a
second Supervisor, a child process, a forked child), real OS errors (a
logdir that is a file, a logdir removed under a background save). The
subprocess versions (random steps, exit statuses, exact resumes, read-only
and full file systems) are in test_resume.py and test_recovery.py.
"""
from __future__ import annotations

import doctest
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchslim as slim
from torchslim import checkpoint, logdir, preemption, supervisor
from torchslim.logdir import LogdirError, LogdirLock, LogdirLockedError
from torchslim.preemption import Preempted, StopSignals

NO_SUMMARIES = {"save_summaries_secs": None, "log_every_n_steps": 0}


def _train_op(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(5)]

    def total_loss(batch):
        x, y = batch
        return torch.nn.functional.mse_loss(net(x), y)

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(net.parameters(), lr=0.1),
                                       global_step=slim.learning.GlobalStep())
    return op, slim.data.repeat(data)


def _step_then(at_step: int, action):
    """A train_step_fn that runs ``action()`` inside step ``at_step`` (after the update, before it returns)."""

    def step_fn(train_op, batch, global_step, kwargs):
        result = slim.learning.train_step(train_op, batch, global_step, kwargs)
        if train_op.step == at_step:
            action()
        return result

    return step_fn


def _handlers():
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


def _steps(logdir_path) -> list[int]:
    return [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(str(logdir_path))]


# --------------------------------------------------------------------------- stop signals


def test_sigint_finishes_the_step_saves_it_and_raises_keyboard_interrupt(tmp_path):
    op, data = _train_op()
    before = _handlers()
    with pytest.raises(KeyboardInterrupt, match="at global step 7, checkpoint .*model.ckpt-7.pt"):
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=50, save_interval_secs=None,
                            train_step_fn=_step_then(7, lambda: os.kill(os.getpid(), signal.SIGINT)), **NO_SUMMARIES)
    assert op.step == 7
    assert _steps(tmp_path) == [7]
    checkpoint.verify_checkpoint(str(tmp_path / "model.ckpt-7.pt"))
    assert _handlers() == before, "the handlers in place before train() are restored"
    with LogdirLock(tmp_path):  # and the logdir is free again
        pass


def test_sigterm_raises_preempted_with_status_143_after_the_checkpoint(tmp_path):
    op, data = _train_op()
    with pytest.raises(Preempted) as info:
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=50, save_interval_secs=None,
                            train_step_fn=_step_then(4, lambda: os.kill(os.getpid(), signal.SIGTERM)), **NO_SUMMARIES)
    assert isinstance(info.value, SystemExit) and info.value.code == 143
    assert "SIGTERM" in str(info.value) and "model.ckpt-4.pt" in str(info.value)
    assert _steps(tmp_path) == [4]
    state = checkpoint.load_checkpoint(str(tmp_path / "model.ckpt-4.pt"))
    assert state["global_step"] == 4


def test_the_resume_after_a_signal_continues_at_the_next_step_bitwise(tmp_path):
    op, data = _train_op()
    slim.learning.train(op, str(tmp_path / "a"), data=data, number_of_steps=12, save_interval_secs=None, **NO_SUMMARIES)
    uninterrupted = {k: v.clone() for k, v in op.model.state_dict().items()}

    slim.collections.reset()
    op, data = _train_op()
    with pytest.raises(Preempted):
        slim.learning.train(op, str(tmp_path / "b"), data=data, number_of_steps=12, save_interval_secs=None,
                            train_step_fn=_step_then(5, lambda: os.kill(os.getpid(), signal.SIGTERM)), **NO_SUMMARIES)
    slim.collections.reset()
    op, data = _train_op()
    slim.learning.train(op, str(tmp_path / "b"), data=data, number_of_steps=12, save_interval_secs=None, **NO_SUMMARIES)
    assert op.step == 12
    for k, v in op.model.state_dict().items():
        assert torch.equal(v, uninterrupted[k]), k


def test_a_second_signal_stops_at_once_without_finishing_the_step(tmp_path):
    op, data = _train_op()
    before = _handlers()

    def twice():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # raises here, in the middle of step 3
        raise AssertionError("not reached")

    with pytest.raises(Preempted, match="a second SIGTERM stopped training at once"):
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=50, save_interval_secs=None,
                            train_step_fn=_step_then(3, twice), **NO_SUMMARIES)
    assert _steps(tmp_path) == [], "stopping at once writes no checkpoint"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert _handlers() == before


def test_a_signal_during_the_last_step_still_ends_with_the_signal(tmp_path):
    op, data = _train_op()
    with pytest.raises(KeyboardInterrupt):
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=6, save_interval_secs=None,
                            train_step_fn=_step_then(6, lambda: os.kill(os.getpid(), signal.SIGINT)), **NO_SUMMARIES)
    assert _steps(tmp_path) == [6]


def test_without_logdir_a_signal_stops_after_the_step_with_nothing_written():
    op, data = _train_op()
    with pytest.raises(KeyboardInterrupt):
        slim.learning.train(op, None, data=data, number_of_steps=50,
                            train_step_fn=_step_then(2, lambda: os.kill(os.getpid(), signal.SIGINT)), **NO_SUMMARIES)
    assert op.step == 2


def test_an_ignored_signal_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        op, data = _train_op()
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=5, save_interval_secs=None,
                            train_step_fn=_step_then(2, lambda: os.kill(os.getpid(), signal.SIGINT)), **NO_SUMMARIES)
        assert op.step == 5
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_no_handler_is_installed(tmp_path):
    seen = {}
    op, data = _train_op()

    def look():
        seen["during"] = _handlers()

    def run():
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=3, save_interval_secs=None,
                            train_step_fn=_step_then(2, look), **NO_SUMMARIES)

    before = _handlers()
    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive()
    assert seen["during"] == before
    assert op.step == 3


def test_slurm_sigusr1_is_handled_only_under_slurm_and_when_unclaimed(monkeypatch):
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    s = StopSignals()
    s.install()
    try:
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    finally:
        s.restore()
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    s = StopSignals()
    s.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.received == signal.SIGUSR1
        with pytest.raises(Preempted) as info:
            s.raise_for_signal()
        assert info.value.code == 128 + signal.SIGUSR1
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)  # claimed by someone else: left alone
    try:
        s = StopSignals()
        s.install()
        assert signal.getsignal(signal.SIGUSR1) is mine
        s.restore()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_should_stop_reports_a_signal_to_a_loop_of_ones_own(tmp_path):
    op, data = _train_op()
    sv = supervisor.Supervisor(op, str(tmp_path), data=data, save_interval_secs=None, save_summaries_secs=None)
    with pytest.raises(KeyboardInterrupt):
        with sv:
            batches = sv.batches()
            while not sv.should_stop(number_of_steps=100):
                op(next(batches))
                if op.step == 3:
                    os.kill(os.getpid(), signal.SIGINT)
            sv.finish()
    assert op.step == 3 and _steps(tmp_path) == [3]


# --------------------------------------------------------------------------- one writer per logdir


def test_a_second_train_on_a_held_logdir_fails_within_a_second_writing_nothing(tmp_path):
    op, data = _train_op()
    first = supervisor.Supervisor(op, str(tmp_path), data=data, save_interval_secs=None, save_summaries_secs=None)
    with first:
        listing = sorted(os.listdir(tmp_path))
        lock_content = (tmp_path / logdir.LOCK_FILE).read_bytes()
        slim.collections.reset()
        op2, data2 = _train_op()
        started = time.monotonic()
        with pytest.raises(LogdirLockedError, match="in use by another train.*this very process"):
            slim.learning.train(op2, str(tmp_path), data=data2, number_of_steps=3, **NO_SUMMARIES)
        assert time.monotonic() - started < 1.0
        assert sorted(os.listdir(tmp_path)) == listing
        assert (tmp_path / logdir.LOCK_FILE).read_bytes() == lock_content
        assert op2.step == 0
    assert logdir.holder(tmp_path) == {}, "a stopped Supervisor clears its line"


def test_the_holder_in_another_process_is_named_and_its_exit_frees_the_logdir(tmp_path, subprocess_env):
    code = ("import sys, time; from torchslim.logdir import LogdirLock; lock = LogdirLock(sys.argv[1]); "
            "lock.acquire(); print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=subprocess_env, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        op, data = _train_op()
        with pytest.raises(LogdirLockedError, match=f"pid {child.pid} on host ") as info:
            slim.learning.train(op, str(tmp_path), data=data, number_of_steps=3, **NO_SUMMARIES)
        assert info.value.holder["pid"] == child.pid
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
    slim.collections.reset()
    op, data = _train_op()
    slim.learning.train(op, str(tmp_path), data=data, number_of_steps=3, **NO_SUMMARIES)  # killed: the lock died too
    assert op.step == 3


def test_a_forked_child_does_not_keep_the_lock_of_its_parent(tmp_path):
    lock = LogdirLock(tmp_path)
    lock.acquire()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a DataLoader worker, say, outliving its parent's lock
        os.close(read_end)
        os.write(write_end, b"up")
        time.sleep(3)
        os._exit(0)
    try:
        os.close(write_end)
        assert os.read(read_end, 2) == b"up"
        lock.release()
        with LogdirLock(tmp_path):  # the child is alive, and the logdir is free
            pass
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_the_lock_is_released_when_training_fails(tmp_path):
    op, data = _train_op()

    def boom():
        raise RuntimeError("user error in step 2")

    with pytest.raises(RuntimeError, match="user error"):
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=5, train_step_fn=_step_then(2, boom),
                            **NO_SUMMARIES)
    with LogdirLock(tmp_path):
        pass


def test_evaluation_takes_no_lock(tmp_path):
    op, data = _train_op()
    slim.learning.train(op, str(tmp_path), data=data, number_of_steps=3, **NO_SUMMARIES)
    with LogdirLock(tmp_path):  # a trainer holds the logdir; evaluation still reads it
        net = op.model
        value = slim.evaluation.evaluate_once(
            checkpoint.latest_checkpoint(str(tmp_path)), str(tmp_path / "eval"), num_evals=1,
            final_op=lambda: net.weight.sum().item(), variables_to_restore=net, summary_op=None,
        )
    assert value == pytest.approx(net.weight.sum().item())


# --------------------------------------------------------------------------- storage


def test_a_logdir_that_is_a_file_is_reported_before_the_first_step(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a directory")
    for bad in (path, path / "sub"):
        slim.collections.reset()
        op, data = _train_op()
        with pytest.raises(LogdirError, match=f"logdir '{bad}' cannot be used for training.*Errno"):
            slim.learning.train(op, str(bad), data=data, number_of_steps=3, **NO_SUMMARIES)
        assert op.step == 0
    assert path.read_text() == "not a directory"


def test_too_little_free_space_for_one_checkpoint_is_reported():
    with pytest.raises(LogdirError, match="free, but a checkpoint of this model needs at least"):
        logdir.check_free_space("/tmp", 2**62)
    logdir.check_free_space("/tmp", 1)


def test_a_failed_background_save_is_raised_at_the_next_step_naming_the_file(tmp_path):
    op, data = _train_op()
    run = tmp_path / "run"
    taken = []

    def step_fn(train_op, batch, global_step, kwargs):
        result = slim.learning.train_step(train_op, batch, global_step, kwargs)
        taken.append(train_op.step)
        if train_op.step == 4:  # a directory where the next background save (step 6) renames its file
            os.makedirs(run / "model.ckpt-6.pt" / "in-the-way")
        if train_op.step in (7, 8):
            time.sleep(0.3)  # steps as long as the save of this tiny model takes, so it fails during step 7
        return result

    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model\.ckpt-6\.pt' failed in the background: IsADirectoryError.*model\.ckpt-3\.pt"):
        slim.learning.train(op, str(run), data=data, number_of_steps=100, save_interval_secs=None,
                            save_interval_steps=3, train_step_fn=step_fn, **NO_SUMMARIES)
    assert 6 < taken[-1] < 9, f"raised at step {taken[-1]}, before the next save is due"


# --------------------------------------------------------------------------- arguments

BAD_TRAIN_ARGS = {
    "save_summaries_secs": [math.nan, math.inf, -1, 0, "600", True],
    "save_interval_secs": [math.nan, -math.inf, 0, "x"],
    "save_interval_steps": [math.nan, 0, 2.5, -3],
    "save_summaries_steps": [math.inf, 0, 1.5],
    "summary_op": [5, "loss", [1, 2]],
    "summary_writer": ["w", 5, object()],
    "saver": ["saver", 3, object()],
    "log_every_n_steps": [-1, 1.5, math.nan],
    "number_of_steps": [0, math.nan, 2.5],
    "trace_every_n_steps": [0, math.nan, 1.5],
    "is_chief": ["yes", 2],
    "init_fn": [5, "f"],
    "data": [5, 1.5],
    "train_step_fn": [5, "train_step"],
    "ignore_live_threads": ["no", 1],
}


@pytest.mark.parametrize("arg, value", [(a, v) for a, vs in BAD_TRAIN_ARGS.items() for v in vs])
def test_each_bad_train_argument_is_named_before_any_file_is_written(tmp_path, arg, value):
    op, data = _train_op()
    kwargs = {"data": data, "number_of_steps": 3, **NO_SUMMARIES, arg: value}
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=arg):
        slim.learning.train(op, str(run), **kwargs)
    assert not run.exists()
    assert op.step == 0


@pytest.mark.parametrize("norm", [math.nan, math.inf, -1.0, "4"])
def test_create_train_op_refuses_a_non_finite_clip_norm(norm):
    net = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=f"clip_gradient_norm must be a finite number >= 0.*got {norm!r}"):
        slim.learning.create_train_op(lambda: net(torch.ones(1, 2)).sum(), torch.optim.SGD(net.parameters(), lr=0.1),
                                      clip_gradient_norm=norm)


def _interval_is_valid(value, integer):
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return math.isfinite(value) and value > 0


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=3), st.lists(st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arg=st.sampled_from(["save_summaries_secs", "save_interval_secs", "save_interval_steps",
                            "save_summaries_steps"]), value=_values)
def test_fuzzed_intervals_are_accepted_exactly_when_valid(tmp_path_factory, arg, value):
    slim.collections.reset()
    op, data = _train_op()
    run = tmp_path_factory.mktemp("fuzz") / "run"
    valid = _interval_is_valid(value, integer=arg.endswith("_steps"))
    kwargs = {"data": data, "number_of_steps": 2, "log_every_n_steps": 0, "save_summaries_secs": None, arg: value}
    if valid:
        slim.learning.train(op, str(run), **kwargs)
        assert op.step == 2
    else:
        with pytest.raises(ValueError, match=arg):
            slim.learning.train(op, str(run), **kwargs)
        assert not run.exists()


# --------------------------------------------------------------------------- docstrings


@pytest.mark.parametrize("module", [supervisor, logdir, preemption], ids=lambda m: m.__name__)
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_under_slurm_sigusr1_stops_train_like_sigterm_with_status_138(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    op, data = _train_op()
    with pytest.raises(Preempted) as info:
        slim.learning.train(op, str(tmp_path), data=data, number_of_steps=50, save_interval_secs=None,
                            train_step_fn=_step_then(3, lambda: os.kill(os.getpid(), signal.SIGUSR1)), **NO_SUMMARIES)
    assert info.value.code == 138 and "SIGUSR1" in str(info.value)
    assert _steps(tmp_path) == [3]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
