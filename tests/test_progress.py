"""What train() and the evaluation loops show: a bar on a terminal (a real pty), log lines in a file."""
import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap

import pytest
import torch

import torchslim as slim
from torchslim import progress

# A user's script: 150 steps of ~3 ms, so the bar is redrawn several times; it reports the handlers at the end.
SCRIPT = textwrap.dedent("""
    import logging, sys, tempfile, time
    import torch
    import torchslim as slim

    net = torch.nn.Linear(4, 1)
    def total_loss(batch):
        time.sleep(0.003)
        return torch.nn.functional.mse_loss(net(batch[0]), batch[1])

    train_op = slim.learning.create_train_op(total_loss, torch.optim.SGD(net.parameters(), lr=0.1))
    data = slim.data.repeat([(torch.randn(8, 4), torch.randn(8, 1))] * 5)
    if len(sys.argv) > 2 and sys.argv[2] == 'basicConfig':
        logging.basicConfig(level=logging.INFO, format='APP %(name)s %(message)s')
    slim.learning.train(train_op, tempfile.mkdtemp(), data=data, number_of_steps=150, log_every_n_steps=50,
                        progress=sys.argv[1])
    print('handlers:', len(logging.getLogger().handlers), len(logging.getLogger('torchslim').handlers),
          logging.getLogger('torchslim').level, file=sys.stderr)
""")


def _run_in_pty(args, env, columns=None, timeout=120):
    """Runs ``python -c SCRIPT args`` with stdout and stderr on a pseudo-terminal; returns (status, output)."""
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_train_on_a_terminal_shows_a_bar_with_rate_loss_and_eta(subprocess_env):
    # a pty nobody sized, as in some CI containers: tqdm alone would draw nothing there
    status, out = _run_in_pty(["auto"], subprocess_env)
    assert status == 0, out
    frames = re.findall(r"train +(\d+)/150 \|[^|]*\| ([0-9.]+) step/s, loss=([0-9.]+) ETA (\d\d:\d\d)", out)
    assert len(frames) >= 3, out                           # redrawn as it goes...
    assert frames[-1][0] == "150", out                     # ...and ends at the last step
    steps = [int(f[0]) for f in frames]
    assert steps == sorted(steps)                           # (a message printed above the bar redraws it as it was)
    # ~0.45 s of training, at most 10 redraws a second (+ the first, the last, and redraws after messages)
    assert len(set(steps)) <= 30, steps
    assert "global step 50: loss" not in out               # the bar replaces the log lines
    assert "Finished training! Saving model to disk." in out   # torchslim's INFO messages still reach the terminal
    assert "handlers: 0 0 0" in out                         # no root handler, and torchslim's is gone again


@pytest.mark.slow
def test_train_with_stderr_in_a_file_logs_tf_slim_lines(tmp_path, subprocess_env):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, "auto"], stderr=f, env=subprocess_env, timeout=120)
    text = err.read_text()
    assert proc.returncode == 0, text
    lines = re.findall(r"^global step (\d+): loss = [0-9.]+ \([0-9.]+ sec/step\)$", text, re.M)
    assert lines == ["50", "100", "150"], text
    assert "ETA" not in text and "\r" not in text
    assert "handlers: 0 0 0" in text


@pytest.mark.slow
def test_a_configured_logging_gets_the_records_and_no_second_handler(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "log", "basicConfig"], capture_output=True, text=True,
                          env=subprocess_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^APP torchslim global step (\d+): loss", proc.stderr, re.M) == ["50", "100", "150"]
    assert "\nglobal step" not in proc.stderr               # printed once, by the application's handler
    assert "handlers: 1 0 0" in proc.stderr                 # its root handler only; torchslim added none


@pytest.mark.slow
def test_progress_log_overrides_the_terminal(subprocess_env):
    status, out = _run_in_pty(["log"], subprocess_env)
    assert status == 0, out
    assert "ETA" not in out and "global step 150: loss" in out


def _train_op(check_numerics=False):
    net = torch.nn.Linear(2, 1)

    def total_loss(batch):
        return torch.nn.functional.mse_loss(net(batch[0]), batch[1])

    return slim.learning.create_train_op(total_loss, torch.optim.SGD(net.parameters(), lr=0.1),
                                         check_numerics=check_numerics)


def _count_item_calls(monkeypatch):
    calls = []
    item = torch.Tensor.item

    def counting(self):
        calls.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    return calls


def test_logging_every_step_reads_no_loss_when_no_handler_would_print(monkeypatch, caplog):
    data = [(torch.randn(4, 2), torch.randn(4, 1))] * 20
    calls = _count_item_calls(monkeypatch)
    caplog.set_level(logging.WARNING, logger="torchslim")
    slim.learning.train(_train_op(), None, data=data, log_every_n_steps=1, progress="log")
    assert len(calls) == 1                                  # train()'s return value only, not one per step
    assert "global step" not in caplog.text

    slim.collections.reset()
    calls.clear()
    caplog.set_level(logging.INFO, logger="torchslim")
    slim.learning.train(_train_op(), None, data=data, log_every_n_steps=5, progress="log")
    assert len(calls) == 4 + 1                              # steps 5, 10, 15, 20, then the return value
    assert [r.getMessage().split(":")[0] for r in caplog.records if "loss =" in r.getMessage()] == [
        "global step 5", "global step 10", "global step 15", "global step 20"]

    slim.collections.reset()
    caplog.clear()
    slim.learning.train(_train_op(), None, data=data, log_every_n_steps=5, progress="none")
    assert "loss =" not in caplog.text                      # 'none': no per-step lines


def test_the_bar_reads_the_loss_only_when_it_redraws(monkeypatch):
    clock_times = iter([0.0] + [0.01 * i for i in range(1, 10_000)])
    p = progress.Progress("bar", total=100, desc="train", unit=" step", file=io.StringIO(),
                          clock=lambda: next(clock_times))
    tick = p.start(0)
    reads = []

    class Loss:
        def item(self):
            reads.append(1)
            return 0.25

    for n in range(1, 101):                                  # 100 steps of 10 ms: 1 s
        tick(n, Loss())
    p.close(100)
    assert 9 <= len(reads) <= 11                             # ~10 redraws a second, the last step included
    assert "train 100/100" in p.file.getvalue()


def test_bad_progress_is_refused_before_anything_is_written(tmp_path):
    logdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"progress must be one of 'auto', 'bar', 'log', 'none', got 'yes'"):
        slim.learning.train(_train_op(), logdir, data=[(torch.zeros(1, 2), torch.zeros(1, 1))], progress="yes")
    assert not logdir.exists()
    with pytest.raises(ValueError, match="progress must be one of"):
        slim.evaluation.evaluation_loop(tmp_path, tmp_path / "eval", timeout=0, progress=True)


def test_evaluation_logs_its_progress_and_draws_a_bar(tmp_path, caplog, capsys):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "model.ckpt-10.pt"
    slim.checkpoint.save_checkpoint(str(path), {"global_step": 10, "model": net.state_dict()})
    acc = slim.metrics.streaming_accuracy()

    def eval_op(batch):
        acc.update(net(batch[0]).argmax(1), batch[1])

    data = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))] * 20
    caplog.set_level(logging.INFO, logger="torchslim")
    slim.evaluation.evaluate_once(path, tmp_path / "eval", num_evals=None, eval_op=eval_op,
                                  final_op={"accuracy": acc.compute}, data=data, progress="log")
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluation [")] == [
        f"Evaluation [{k}/20]" for k in range(2, 21, 2)]
    capsys.readouterr()
    slim.evaluation.evaluate_once(path, tmp_path / "eval", num_evals=8, eval_op=eval_op,
                                  final_op={"accuracy": acc.compute}, data=data, progress="bar")
    err = capsys.readouterr().err
    assert re.search(r"Evaluation 8/8 \|", err), err


def test_console_logging_leaves_a_configured_logger_alone():
    torchslim_logger = logging.getLogger("torchslim")
    before = (list(logging.getLogger().handlers), list(torchslim_logger.handlers), torchslim_logger.level)
    with progress.console_logging():
        # pytest's own handlers sit on the root logger: torchslim adds nothing
        assert torchslim_logger.handlers == before[1]
    assert (list(logging.getLogger().handlers), list(torchslim_logger.handlers), torchslim_logger.level) == before
