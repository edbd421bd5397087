"""The command line, run as users run it: ``python -m torchslim ...`` in a real subprocess."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import tomllib
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchslim import checkpoint, cli, demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchslim(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "torchslim", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo training directory with checkpoints at steps 10 and 20 (trained in-process: ~1 s)."""
    logdir = tmp_path_factory.mktemp("demo_run")
    demo.train_demo(str(logdir), steps=20, save_interval_steps=10, log_every_n_steps=0)
    assert [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(str(logdir))] == [10, 20]
    return logdir


def test_console_script_entry_point_resolves_to_cli_main():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    module_name, _, func_name = scripts["torchslim"].partition(":")
    entry = getattr(importlib.import_module(module_name), func_name)
    assert entry is cli.main
    assert entry(["--help"]) == 0
    assert entry([]) == 2


def test_help_lists_every_command_with_one_line(subprocess_env):
    result = _torchslim(subprocess_env, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: torchslim [-h] [--version] COMMAND ...")
    for name, (_, _, help_) in cli.COMMANDS.items():
        assert re.search(rf"^ +{name} +{re.escape(help_)}$", result.stdout, re.M), result.stdout


def test_version(subprocess_env):
    from importlib import metadata

    import torchslim

    result = _torchslim(subprocess_env, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"torchslim {torchslim.__version__} (torch {metadata.version('torch')}")


@pytest.mark.parametrize("command", ["demo", "eval", "inspect", "analyze"])
def test_each_subcommand_help_exits_0(capsys, command):
    # in-process (the subprocess path is covered above and below): main returns argparse's status
    assert cli.main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: torchslim {command}")


def test_unknown_command_exits_2_with_one_line(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchslim: error: argument COMMAND: invalid choice: 'trian'" in err
    assert cli.main(["--bogus"]) == 2
    assert capsys.readouterr().err.startswith("torchslim: error: unrecognized arguments: --bogus")
    assert cli.main([]) == 2                               # no command: the help, on stderr
    assert "demo" in capsys.readouterr().err


def _one_line_error(result, status, *fragments):
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_errors_are_one_line_never_a_traceback(tmp_path, subprocess_env):
    # bad arguments: 2
    _one_line_error(_torchslim(subprocess_env, "demo", "--logdir", str(tmp_path), "--steps", "x"), 2,
                    "torchslim demo: error: argument --steps: expected an integer >= 1, got 'x'")
    _one_line_error(_torchslim(subprocess_env, "analyze", "torch.nn:Linear"), 2,
                    "torchslim analyze: error:", "needs in_features, out_features")
    # failures: 1 (a logdir below a plain file cannot be made; nothing at the path to evaluate)
    a_file = tmp_path / "file"
    a_file.write_text("")
    _one_line_error(_torchslim(subprocess_env, "demo", "--logdir", str(a_file / "run"), "--steps", "2"), 1,
                    "torchslim demo: error:", str(a_file))
    _one_line_error(_torchslim(subprocess_env, "eval", str(tmp_path / "none"), "--once"), 1,
                    "torchslim eval: error: no checkpoint in")


@pytest.mark.parametrize("args, buffered", [
    (["--help"], True),                                                     # fails at the final flush
    (["analyze", "torchslim.demo:DigitsNet", "--device", "meta"], False),   # fails in the first print
])
def test_a_closed_pipe_ends_quietly(subprocess_env, args, buffered):
    env = dict(subprocess_env)
    env.pop("PYTHONUNBUFFERED", None) if buffered else env.update(PYTHONUNBUFFERED="1")
    read_end, write_end = os.pipe()
    os.close(read_end)                                     # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "torchslim", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == "", proc.stderr                   # no traceback, no "Exception ignored"
    assert proc.returncode == 1


# ------------------------------------------------------------------ inspect


def test_inspect_a_good_checkpoint(demo_run, subprocess_env):
    path = demo_run / "model.ckpt-20.pt"
    result = _torchslim(subprocess_env, "inspect", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == str(path)
    assert "integrity: ok" in out and "global step: 20" in out
    # the demo model's tensors, with their dtypes and shapes
    assert re.search(r"model\.conv1\.weight\s+float32\s+16x1x3x3", out), out
    assert re.search(r"model\.bn3\.moving_variance\s+float32\s+64", out), out
    assert re.search(r"model\.logits\.bias\s+float32\s+10", out), out
    # a directory means its newest checkpoint
    by_dir = _torchslim(subprocess_env, "inspect", str(demo_run))
    assert by_dir.returncode == 0 and by_dir.stdout.splitlines()[0] == str(path)


def test_inspect_a_corrupted_checkpoint_exits_1(demo_run, tmp_path, subprocess_env):
    good = demo_run / "model.ckpt-20.pt"
    flipped = tmp_path / "model.ckpt-20.pt"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01                       # one bit, in the middle of the payload
    flipped.write_bytes(bytes(data))
    result = _torchslim(subprocess_env, "inspect", str(flipped))
    assert result.returncode == 1
    assert "integrity: CORRUPT" in result.stdout and "digest mismatch" in result.stdout

    truncated = tmp_path / "model.ckpt-21.pt"
    truncated.write_bytes(good.read_bytes()[:-100])
    result = _torchslim(subprocess_env, "inspect", str(truncated))
    assert result.returncode == 1
    assert "integrity: CORRUPT" in result.stdout and "truncated" in result.stdout


def test_inspect_argument_errors_take_one_line(capsys):
    assert cli.main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torchslim inspect: error: the following arguments are required")


def test_inspect_a_missing_checkpoint_exits_1(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "model.ckpt-5.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------ eval


def _results(stdout):
    return [(int(s), float(a)) for s, a in
            re.findall(r"^global step (\d+): held-out accuracy = ([0-9.]+) \(\d+/360 digits\)", stdout, re.M)]


def test_eval_once_evaluates_the_newest_checkpoint(demo_run, tmp_path, subprocess_env):
    eval_dir = tmp_path / "eval"
    result = _torchslim(subprocess_env, "eval", str(demo_run), "--once", "--logdir", str(eval_dir))
    assert result.returncode == 0, result.stderr
    [(step, accuracy)] = _results(result.stdout)
    assert step == 20 and 0.0 <= accuracy <= 1.0
    events = EventAccumulator(str(eval_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy")] == [20]
    assert events.Scalars("accuracy")[0].value == pytest.approx(accuracy, abs=1e-4)


def test_eval_loop_evaluates_every_checkpoint_in_order(demo_run, tmp_path, subprocess_env):
    eval_dir = tmp_path / "eval"
    result = _torchslim(subprocess_env, "eval", str(demo_run), "--logdir", str(eval_dir),
                        "--eval-interval-secs", "0", "--timeout", "0")
    assert result.returncode == 0, result.stderr
    assert [s for s, _ in _results(result.stdout)] == [10, 20]
    events = EventAccumulator(str(eval_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy")] == [10, 20]
    assert [e.step for e in events.Scalars("losses/cross_entropy")] == [10, 20]

    limited = _torchslim(subprocess_env, "eval", str(demo_run), "--logdir", str(tmp_path / "eval2"),
                         "--eval-interval-secs", "0", "--max-evaluations", "1", "--quiet")
    assert limited.returncode == 0, limited.stderr
    assert [s for s, _ in _results(limited.stdout)] == [10]
    assert limited.stderr == ""                                   # --quiet: results only


def test_eval_without_checkpoints_exits_1(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path), "--once"]) == 1
    assert "no checkpoint in" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--timeout", "0", "--eval-interval-secs", "0"]) == 1
    assert "no checkpoint appeared" in capsys.readouterr().err


def test_eval_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path), "--max-evaluations", "0"]) == 2
    assert "--max-evaluations: expected an integer >= 1, got 0" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert cli.main(["eval", str(a_file), "--once"]) == 2
    assert "is not a directory" in capsys.readouterr().err
