"""Storage faults made for real, and the command line's one-line errors.

A read-only or full logdir is made in a private mount namespace
(``unshare -m``) with a read-only bind mount or a small tmpfs; the mounts
vanish with the namespace when its last process exits, so nothing is left
behind. Where the kernel refuses the namespace, the tests skip saying why.
The training job is tests/scripts/resume_train.py, as in test_resume.py.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import torchslim as slim
from torchslim import checkpoint

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "resume_train.py")
pytestmark = pytest.mark.slow


@functools.lru_cache(maxsize=1)
def _why_no_namespace() -> str | None:
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True,
                           timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    return None if r.returncode == 0 else f"the kernel refused a mount namespace: {r.stderr.strip()}"


def _in_mount_namespace(script: str, env: dict[str, str], timeout: float = 240) -> None:
    """Runs a bash script in a private mount namespace; kills its whole process group on a timeout."""
    reason = _why_no_namespace()
    if reason:
        pytest.skip(reason)
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-uc", script], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the job in the mount namespace timed out")
    if proc.returncode != 0:
        pytest.skip(f"could not set up the mounts: {err.strip()}")  # mount refused inside the namespace


def _job(logdir, out, result, *extra) -> str:
    """The bash line that runs the training job and records its stdout, stderr and status under ``result``."""
    args = " ".join(str(a) for a in extra)
    return (f"{sys.executable} {SCRIPT} {logdir} {out} --print-steps {args} > {result}.out 2> {result}.err; "
            f"echo $? > {result}.rc")


def _outcome(result):
    return (int(open(f"{result}.rc").read()), [int(s) for s in open(f"{result}.out").read().split()],
            open(f"{result}.err").read())


def _small_run(logdir, steps=6):
    net = torch.nn.Linear(3, 1)
    op = slim.learning.create_train_op(lambda: net(torch.ones(2, 3)).pow(2).mean(),
                                       torch.optim.SGD(net.parameters(), lr=0.1), global_step=slim.learning.GlobalStep())
    slim.learning.train(op, str(logdir), number_of_steps=steps, save_interval_secs=None, save_interval_steps=3,
                        save_summaries_secs=None, log_every_n_steps=0)


def test_a_read_only_logdir_is_reported_before_the_first_step_and_its_checkpoints_restore(tmp_path, subprocess_env):
    logdir, result = tmp_path / "logdir", tmp_path / "job"
    _small_run(logdir)  # a preempted job's logdir, with checkpoints 3 and 6
    before = {n: (logdir / n).read_bytes() for n in os.listdir(logdir)}
    _in_mount_namespace(
        "set -e; "
        f"mount --bind {logdir} {logdir}; mount -o remount,bind,ro {logdir}; "
        "set +e; " + _job(logdir, tmp_path / "out.pt", result),
        subprocess_env,
    )
    rc, steps, err = _outcome(result)
    assert rc == 1, err
    assert steps == [], "no step was taken"
    assert "LogdirError" in err and "Read-only file system" in err and str(logdir) in err
    assert {n: (logdir / n).read_bytes() for n in os.listdir(logdir)} == before
    path, state = checkpoint.Saver().restore_latest(str(logdir))
    assert path.endswith("model.ckpt-6.pt") and state["global_step"] == 6


def test_a_full_disk_is_reported_before_the_first_step(tmp_path, subprocess_env):
    mnt, result = tmp_path / "mnt", tmp_path / "job"
    mnt.mkdir()
    _in_mount_namespace(
        "set -e; "
        f"mount -t tmpfs -o size=64k tmpfs {mnt}; "
        f"dd if=/dev/zero of={mnt}/filler bs=4k 2>/dev/null || true; "  # until the disk is full
        "set +e; " + _job(mnt / "logdir", tmp_path / "out.pt", result),
        subprocess_env,
    )
    rc, steps, err = _outcome(result)
    assert rc == 1, err
    assert steps == []
    assert "LogdirError" in err and "No space left on device" in err and "the disk is full" in err


def test_a_disk_that_fills_during_training_fails_at_the_next_step_and_keeps_old_checkpoints(tmp_path, subprocess_env):
    mnt, result, copy = tmp_path / "mnt", tmp_path / "job", tmp_path / "copy"
    mnt.mkdir()
    # Each checkpoint of the job is about 30 KB and all are kept: the disk fills after a few saves.
    _in_mount_namespace(
        "set -e; "
        f"mount -t tmpfs -o size=256k tmpfs {mnt}; "
        "set +e; " + _job(mnt / "logdir", tmp_path / "out.pt", result, "--steps 1000 --save-every 20 --max-to-keep 0")
        + f"; cp -a {mnt}/logdir {copy}",
        subprocess_env,
    )
    rc, steps, err = _outcome(result)
    assert rc == 1, err
    assert "CheckpointError" in err and "failed in the background: OSError: [Errno 28] No space left on device" in err
    named = re.search(r"saving checkpoint '[^']*model\.ckpt-(\d+)\.pt' failed", err)
    if named:  # the checkpoint itself failed (not the index after it): raised before the next save was due
        failed_step = int(named.group(1))
        assert failed_step % 20 == 0 and failed_step < steps[-1] < failed_step + 20
    kept = checkpoint.list_checkpoints(str(copy))
    assert len(kept) >= 2, "the disk held a few checkpoints before it filled"
    for path in kept:
        checkpoint.verify_checkpoint(path)
    assert not [n for n in os.listdir(copy) if n.startswith(".tmp-")]
    path, state = checkpoint.Saver().restore_latest(str(copy))
    assert state["global_step"] == checkpoint.checkpoint_step(path) and path == kept[-1]


def test_the_command_line_prints_one_line_errors_and_exits_1(tmp_path, subprocess_env):
    other = torch.nn.Linear(2, 2)  # not the demo's model
    checkpoint.save_checkpoint(str(tmp_path / "model.ckpt-5.pt"), {"global_step": 5, "model": other.state_dict()})
    r = subprocess.run([sys.executable, "-m", "torchslim", "eval", str(tmp_path), "--once", "--quiet"],
                       env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchslim eval: error: ")
    assert "model.ckpt-5.pt" in lines[0]
