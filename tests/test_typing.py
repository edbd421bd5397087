"""Types reach users: a script written as the README writes it (``import torchslim as slim``) checked by mypy."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_SCRIPT = textwrap.dedent("""
    import pathlib

    import torch

    import torchslim as slim

    model = torch.nn.Linear(2, 1)


    def total_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        slim.losses.mean_squared_error(model(x), y)
        return slim.losses.get_total_loss()


    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_op = slim.learning.create_train_op(total_loss, optimizer, clip_gradient_norm=4)
    reveal_type(train_op)
    reveal_type(slim.create_train_op(total_loss, optimizer))
    final = slim.learning.train(train_op, pathlib.Path("/tmp/logdir"), data=[], number_of_steps=10, progress="log")
    reveal_type(final)
    reveal_type(slim.checkpoint.latest_checkpoint("/tmp/logdir"))
    reveal_type(slim.evaluation.evaluate_once)
    slim.learning.train(train_op, 42)                      # line 25: not a path
    slim.learning.train(train_op, None, progress="loud")   # line 26: not a progress mode
""")

# torch and the other dependencies are left out (their types become Any): only torchslim's own types are
# under test, and checking torch's sources would take a minute.
MYPY_INI = textwrap.dedent("""
    [mypy]
    follow_imports = silent
    ignore_missing_imports = true
    [mypy-torch.*,torchmetrics.*,numpy.*,tensorboard.*,tqdm.*]
    follow_imports = skip
""")


@pytest.mark.slow
def test_mypy_sees_torchslim_types_through_the_lazy_package(tmp_path):
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    (tmp_path / "mypy.ini").write_text(MYPY_INI)
    env = dict(os.environ, MYPYPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    revealed = re.findall(r"^user\.py:(\d+): note: Revealed type is \"(.*)\"$", out, re.M)
    assert [t for _, t in revealed][:4] == [
        "torchslim.train_op.TrainOp", "torchslim.train_op.TrainOp", "float | None", "str | None"], out
    assert "def (checkpoint_path:" in revealed[4][1], out   # a function with its signature, not Any
    errors = re.findall(r"^user\.py:(\d+): error: (.*)$", out, re.M)
    assert [int(line) for line, _ in errors] == [25, 26], out
    assert "PathLike[str]" in errors[0][1] and "progress" in errors[1][1], out
    assert proc.returncode == 1, out
