"""slim.evaluation: TF-Slim's evaluation_test scenarios, ported, plus restore, modes, races and a live trainer."""
import glob
import logging
import os
import subprocess
import textwrap
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torchslim as slim
from torchslim import checkpoint, evaluation, metrics

NUM_CLASSES, BATCH_SIZE = 8, 16


class ScaleModel(torch.nn.Module):
    """TF's TestModel: outputs = inputs * scale (scaling does not change the argmax)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * self.scale


def _test_data():
    rng = np.random.default_rng(0)
    inputs = torch.from_numpy(rng.random((BATCH_SIZE, NUM_CLASSES)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, BATCH_SIZE))
    return inputs, labels


def _ground_truth_accuracy(inputs, labels):
    return float(np.mean(inputs.numpy().argmax(1) == labels.numpy()))


class FakeTime:
    """An injected clock: sleeping advances it at once."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def _scalars(logdir, tag):
    acc = EventAccumulator(logdir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _save(directory, step, model):
    path = os.path.join(directory, f"model.ckpt-{step}.pt")
    checkpoint.save_checkpoint(path, {"global_step": step, "model": model.state_dict()})
    return path


@pytest.fixture
def scale_eval(tmp_path):
    """The TF test's set-up: a model, its checkpoint, an accuracy metric and an eval op over the data."""
    inputs, labels = _test_data()
    model = ScaleModel()
    chkpt_dir = str(tmp_path / "train")
    os.makedirs(chkpt_dir)
    path = _save(chkpt_dir, 3, model)
    value, update = metrics.streaming_accuracy()

    def eval_op(batch=None):
        x, y = batch if batch is not None else (inputs, labels)
        update(model(x).argmax(1), y)

    return dict(model=model, chkpt_dir=chkpt_dir, path=path, eval_op=eval_op, value=value,
                expected=_ground_truth_accuracy(inputs, labels), data=[(inputs, labels)],
                logdir=str(tmp_path / "eval"))


# ---------------------------------------------------------------- TF-Slim's scenarios
def test_final_ops_on_evaluation_loop(scale_eval):
    class CustomHook(evaluation.EvaluationHook):
        hook_was_run = False

        def end(self, context):
            CustomHook.hook_was_run = True

    accuracy = evaluation.evaluation_loop(
        scale_eval["chkpt_dir"], scale_eval["logdir"], eval_op=scale_eval["eval_op"], final_op=scale_eval["value"],
        hooks=[CustomHook()], max_number_of_evaluations=1)
    assert accuracy == pytest.approx(scale_eval["expected"])
    assert CustomHook.hook_was_run


def test_latest_checkpoint_returns_none_after_timeout():
    t = FakeTime()
    ret = evaluation.wait_for_new_checkpoint("/non-existent-dir", "foo", timeout=1.0, seconds_to_sleep=0.5,
                                             clock=t.clock, sleep=t.sleep)
    assert ret is None
    assert 0.5 < t.now < 1.1   # waited, and the timeout kicked in
    assert t.sleeps == [0.5, 0.5]


def test_timeout_fn_on_evaluation_loop(tmp_path):
    calls = []

    def timeout_fn():
        calls.append(1)
        return len(calls) >= 3

    t = FakeTime()
    assert evaluation.evaluation_loop(str(tmp_path / "none"), str(tmp_path / "eval"), timeout=0,
                                      timeout_fn=timeout_fn, clock=t.clock, sleep=t.sleep) is None
    assert len(calls) == 3
    assert not os.path.exists(tmp_path / "eval")   # nothing evaluated, nothing written


def test_monitor_checkpoints_loop_timeout():
    assert list(evaluation.checkpoints_iterator("/non-existent-dir", timeout=0)) == []


def test_with_epoch_limit(scale_eval):
    ran = []

    class Count(evaluation.EvaluationHook):
        def end(self, context):
            ran.append(context.evals_completed)

    accuracy = evaluation.evaluation_loop(
        scale_eval["chkpt_dir"], scale_eval["logdir"], eval_op=scale_eval["eval_op"], final_op=scale_eval["value"],
        max_number_of_evaluations=1, num_evals=10000, data=iter(scale_eval["data"]), hooks=[Count()])
    assert accuracy == pytest.approx(scale_eval["expected"])
    assert ran == [1]   # the data ran out after its one batch


def test_error_raised_if_checkpoint_doesnt_exist(tmp_path):
    missing = str(tmp_path / "this_file_doesnt_exist")
    with pytest.raises(ValueError, match="this_file_doesnt_exist.*does not exist"):
        evaluation.evaluate_once(missing, str(tmp_path / "error_raised"))
    with pytest.raises(FileNotFoundError):
        evaluation.evaluate_once(missing, str(tmp_path / "error_raised"))


def test_unreadable_checkpoint_names_the_path(tmp_path, scale_eval):
    bad = str(tmp_path / "model.ckpt-9.pt")
    with open(scale_eval["path"], "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(checkpoint.CorruptCheckpointError, match="model.ckpt-9.pt"):
        evaluation.evaluate_once(bad, scale_eval["logdir"], eval_op=scale_eval["eval_op"])


def test_restored_model_performance(tmp_path):
    """A model trained by slim.learning.train, restored into a fresh instance: the same accuracy."""
    torch.manual_seed(0)
    x = torch.randn(128, 4)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    trained = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def total_loss(batch):
        return torch.nn.functional.cross_entropy(trained(batch[0]), batch[1])

    train_op = slim.learning.create_train_op(total_loss, torch.optim.SGD(trained.parameters(), lr=0.5))
    slim.learning.train(train_op, str(tmp_path / "train"), data=[(x, y)] * 50, number_of_steps=50,
                        log_every_n_steps=0, save_summaries_secs=None)
    with torch.no_grad():
        expected = float((trained(x).argmax(1) == y).float().mean())
    assert expected > 0.6   # it learned something, so a wrong restore would show

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    names_to_values, names_to_updates = metrics.aggregate_metric_map({"accuracy": metrics.streaming_accuracy()})

    def eval_op(batch):
        names_to_updates["accuracy"](fresh(batch[0]).argmax(1), batch[1])

    path = checkpoint.latest_checkpoint(str(tmp_path / "train"))
    values = evaluation.evaluate_once(path, str(tmp_path / "eval"), num_evals=None, eval_op=eval_op,
                                      final_op=names_to_values, data=[(x[:64], y[:64]), (x[64:], y[64:])])
    assert values == {"accuracy": pytest.approx(expected)}
    assert _scalars(str(tmp_path / "eval"), "accuracy") == [(50, pytest.approx(expected))]


def test_additional_hooks(scale_eval):
    calls = []

    class Recorder:   # any object with hook methods works; no base class needed
        def begin(self, context):
            calls.append(("begin", context.global_step, context.checkpoint_path))

        def before_run(self, context):
            calls.append(("before_run", context.evals_completed))

        def after_run(self, context, outputs):
            calls.append(("after_run", context.evals_completed))

        def end(self, context):
            calls.append(("end", context.final_values))

    accuracy = evaluation.evaluate_once(scale_eval["path"], scale_eval["logdir"], num_evals=2,
                                        eval_op=scale_eval["eval_op"], final_op=scale_eval["value"],
                                        hooks=[Recorder()], data=scale_eval["data"] * 5)
    assert accuracy == pytest.approx(scale_eval["expected"])
    assert calls == [("begin", 3, scale_eval["path"]), ("before_run", 0), ("after_run", 1),
                     ("before_run", 1), ("after_run", 2), ("end", pytest.approx(scale_eval["expected"]))]


def test_stop_after_n_evals_hook_stops_early(scale_eval):
    seen = []

    class Count(evaluation.EvaluationHook):
        def end(self, context):
            seen.append(context.evals_completed)

    evaluation.evaluate_once(scale_eval["path"], scale_eval["logdir"], num_evals=None, eval_op=scale_eval["eval_op"],
                             hooks=[evaluation.StopAfterNEvalsHook(3), Count()], data=scale_eval["data"] * 10)
    assert seen == [3]


def test_summaries_verified_in_one_event_file(scale_eval):
    inputs, labels = scale_eval["data"][0]
    names_to_values, names_to_updates = metrics.aggregate_metric_map({
        "Accuracy": metrics.streaming_accuracy(), "Another_accuracy": metrics.streaming_accuracy()})
    model = scale_eval["model"]
    persistent = slim.summaries.add_scalar_summary(torch.tensor(42.0), "eval/constant")

    def eval_op(batch):
        predictions = model(batch[0]).argmax(1)
        names_to_updates["Accuracy"](predictions, batch[1])
        names_to_updates["Another_accuracy"](predictions + 1, batch[1])
        slim.summaries.add_scalar_summary(predictions.float().mean(), "eval/mean_prediction")   # this step's

    second = (inputs.flip(0), labels.flip(0))
    values = evaluation.evaluate_once(scale_eval["path"], scale_eval["logdir"], num_evals=2, eval_op=eval_op,
                                      final_op=names_to_values, data=[(inputs, labels), second])
    assert values["Accuracy"] == pytest.approx(scale_eval["expected"])
    assert values["Another_accuracy"] == pytest.approx(float(np.mean(inputs.numpy().argmax(1) + 1 == labels.numpy())))
    files = glob.glob(os.path.join(scale_eval["logdir"], "*"))
    assert len(files) == 1
    for name, value in values.items():
        assert _scalars(scale_eval["logdir"], name) == [(3, pytest.approx(value))]
    assert _scalars(scale_eval["logdir"], "eval/constant") == [(3, 42.0)]
    last_mean = float(model(second[0]).argmax(1).float().mean())
    assert _scalars(scale_eval["logdir"], "eval/mean_prediction") == [(3, pytest.approx(last_mean))]
    assert persistent in slim.collections.get_collection(slim.GraphKeys.SUMMARIES)


def test_summary_op_none_writes_nothing_and_list_form(scale_eval):
    value = evaluation.evaluate_once(scale_eval["path"], scale_eval["logdir"], eval_op=scale_eval["eval_op"],
                                     final_op=[scale_eval["value"]], summary_op=None)
    assert value == [pytest.approx(scale_eval["expected"])]
    assert not os.path.exists(scale_eval["logdir"])
    # a list final_op is tagged by metric name
    evaluation.evaluate_once(scale_eval["path"], scale_eval["logdir"], eval_op=scale_eval["eval_op"],
                             final_op=[scale_eval["value"]])
    assert _scalars(scale_eval["logdir"], "accuracy") == [(3, pytest.approx(scale_eval["expected"]))]


# ---------------------------------------------------------------- modes, restore, metrics reset
class BNDropNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.fc(x)))


def test_eval_mode_during_evaluation_and_nothing_trained_changes(tmp_path):
    torch.manual_seed(0)
    net = BNDropNet()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 4) * 3 + 1)   # moving statistics away from their initial values
    path = _save(str(tmp_path), 5, net)
    with open(path, "rb") as f:
        file_bytes = f.read()
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    net.drop.train(False)   # mixed modes must come back exactly
    before = [m.training for m in net.modules()]
    modes_seen, outputs = [], []
    x = torch.randn(8, 4)

    def eval_op():
        modes_seen.append([m.training for m in net.modules()])
        outputs.append(net(x))
        assert not torch.is_grad_enabled()

    evaluation.evaluate_once(path, str(tmp_path / "eval"), num_evals=3, eval_op=eval_op)
    assert modes_seen == [[False] * 4] * 3
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2])   # no dropout, moving stats
    with torch.no_grad():
        expected = (net.fc(x) - saved["bn.running_mean"]) / torch.sqrt(saved["bn.running_var"] + net.bn.eps)
        expected = expected * saved["bn.weight"] + saved["bn.bias"]
    torch.testing.assert_close(outputs[0], expected)
    assert [m.training for m in net.modules()] == before
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k]), k
    with open(path, "rb") as f:
        assert f.read() == file_bytes


def test_metrics_reset_at_each_evaluation_and_every_checkpoint_evaluated_oldest_first(tmp_path):
    model = ScaleModel()
    chkpt_dir = str(tmp_path / "train")
    os.makedirs(chkpt_dir)
    for step, scale in ((10, 1.0), (20, -1.0), (30, 2.0)):
        with torch.no_grad():
            model.scale.fill_(scale)
        _save(chkpt_dir, step, model)
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    names_to_values, names_to_updates = metrics.aggregate_metric_map({"mean_output": metrics.streaming_mean()})
    evaluated = []

    def eval_op():
        names_to_updates["mean_output"](model(x))

    class Steps(evaluation.EvaluationHook):
        def end(self, context):
            evaluated.append((context.global_step, context.final_values["mean_output"]))

    logdir = str(tmp_path / "eval")
    t = FakeTime()
    last = evaluation.evaluation_loop(chkpt_dir, logdir, num_evals=2, eval_op=eval_op, final_op=names_to_values,
                                      hooks=[Steps()], eval_interval_secs=5, timeout=0, clock=t.clock, sleep=t.sleep)
    # every checkpoint, oldest first, each on fresh metrics: mean(x) * scale = 1.75 * scale
    assert evaluated == [(10, 1.75), (20, -1.75), (30, 3.5)]
    assert last == {"mean_output": 3.5}
    assert t.sleeps == [5, 5, 5]   # eval_interval_secs between evaluations (they take no fake time)
    assert _scalars(logdir, "mean_output") == [(10, 1.75), (20, -1.75), (30, 3.5)]
    assert len(glob.glob(os.path.join(logdir, "*"))) == 1
    # TF's checkpoints_iterator yields only the newest one
    assert [checkpoint.checkpoint_step(p) for p in evaluation.checkpoints_iterator(chkpt_dir, timeout=0)] == [30]


def test_checkpoints_iterator_waits_for_new_ones(tmp_path):
    model = ScaleModel()
    t = FakeTime()
    _save(str(tmp_path), 1, model)
    it = evaluation.checkpoints_iterator(str(tmp_path), min_interval_secs=10, timeout=30, clock=t.clock, sleep=t.sleep)
    assert checkpoint.checkpoint_step(next(it)) == 1
    t.now += 4                        # the caller worked for 4 s; the iterator sleeps the other 6
    _save(str(tmp_path), 2, model)
    assert checkpoint.checkpoint_step(next(it)) == 2
    assert t.sleeps == [6]
    assert list(it) == []             # nothing new for 30 s: stops
    # 10 s after the second yield (min_interval_secs), then 1 s polls until one more would pass 30 s
    assert t.sleeps == [6, 10] + [1] * 30 and t.now == 50


def test_vanished_and_half_written_checkpoints_are_skipped(tmp_path, caplog):
    model = ScaleModel()
    chkpt_dir = str(tmp_path / "train")
    os.makedirs(chkpt_dir)
    _save(chkpt_dir, 1, model)
    # listed, then deleted before it is loaded (a trainer's max_to_keep): a dangling name
    os.symlink(str(tmp_path / "deleted-by-trainer"), os.path.join(chkpt_dir, "model.ckpt-2.pt"))
    with open(_save(chkpt_dir, 4, model), "rb") as f:
        data = f.read()
    with open(os.path.join(chkpt_dir, "model.ckpt-3.pt"), "wb") as f:   # written in place by a foreign writer
        f.write(data[:100])
    value, update = metrics.streaming_mean()
    steps = []

    class Steps(evaluation.EvaluationHook):
        def end(self, context):
            steps.append(context.global_step)

    with caplog.at_level(logging.WARNING, logger="torchslim"):
        evaluation.evaluation_loop(chkpt_dir, str(tmp_path / "eval"), eval_op=lambda: update(model.scale),
                                   final_op=value, hooks=[Steps()], eval_interval_secs=0, timeout=0)
    assert steps == [1, 4]
    skipped = [r.getMessage() for r in caplog.records if "Skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 2 and "model.ckpt-2.pt" in skipped[0] and "model.ckpt-3.pt" in skipped[1]
    assert [s for s, _ in _scalars(str(tmp_path / "eval"), "mean")] == [1, 4]


def test_variables_to_restore_module_and_dict(tmp_path):
    src = torch.nn.Linear(3, 2)
    path = _save(str(tmp_path), 7, src)
    dst = torch.nn.Linear(3, 2)
    evaluation.evaluate_once(path, str(tmp_path / "e1"), variables_to_restore=dst, summary_op=None)
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)

    only_bias = torch.nn.Linear(3, 2)
    w0 = only_bias.weight.detach().clone()
    evaluation.evaluate_once(path, str(tmp_path / "e2"), variables_to_restore={"bias": only_bias.bias}, summary_op=None)
    assert torch.equal(only_bias.bias, src.bias) and torch.equal(only_bias.weight, w0)

    with pytest.raises(ValueError, match="no value for variables_to_restore \\['nope'\\]"):
        evaluation.evaluate_once(path, str(tmp_path / "e3"), variables_to_restore={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not match the model to restore"):
        evaluation.evaluate_once(path, str(tmp_path / "e4"), variables_to_restore=torch.nn.Linear(5, 2))
    with pytest.raises(TypeError, match="'variables_to_restore' must be None, an nn.Module or a dict"):
        evaluation.evaluate_once(path, str(tmp_path / "e5"), variables_to_restore=[src.weight])


def test_not_applicable_and_bad_arguments_raise_clear_errors(scale_eval):
    path, logdir = scale_eval["path"], scale_eval["logdir"]
    with pytest.raises(ValueError, match="'master' is not applicable"):
        evaluation.evaluate_once(path, logdir, master="grpc://localhost:2222")
    with pytest.raises(ValueError, match="'session_config' is not applicable"):
        evaluation.evaluation_loop(scale_eval["chkpt_dir"], logdir, session_config=object())
    with pytest.raises(ValueError, match="'eval_op_feed_dict' is not applicable"):
        evaluation.evaluate_once(path, logdir, eval_op_feed_dict={"x": 1})
    with pytest.raises(ValueError, match="'num_evals' must be an int >= 1 or None"):
        evaluation.evaluate_once(path, logdir, num_evals=0)
    with pytest.raises(TypeError, match=r"eval_op\[1\] must be a callable"):
        evaluation.evaluate_once(path, logdir, eval_op=[scale_eval["eval_op"], 3])
    with pytest.raises(TypeError, match=r"final_op\['a'\] must be a callable"):
        evaluation.evaluate_once(path, logdir, final_op={"a": "accuracy"})
    with pytest.raises(ValueError, match="is a directory"):
        evaluation.evaluate_once(scale_eval["chkpt_dir"], logdir)
    with pytest.raises(ValueError, match="'checkpoint_dir' must be a non-empty directory path.*master"):
        evaluation.evaluation_loop("", logdir)
    with pytest.raises(ValueError, match="one-shot iterator"):
        evaluation.evaluation_loop(scale_eval["chkpt_dir"], logdir, data=iter(scale_eval["data"]))
    with pytest.raises(ValueError, match="'logdir' must be a non-empty directory path"):
        evaluation.evaluate_once(path, "")
    with pytest.raises(TypeError, match=r"hooks\[0\] \(int\) has none of the hook methods"):
        evaluation.evaluate_once(path, logdir, hooks=[3])
    with pytest.raises(ValueError, match="'seconds_to_sleep' must be a number of seconds > 0"):
        evaluation.wait_for_new_checkpoint(scale_eval["chkpt_dir"], seconds_to_sleep=0)


# ---------------------------------------------------------------- a live trainer
TRAINER = textwrap.dedent("""
    import sys, time, torch
    import torchslim as slim

    logdir = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def total_loss(batch):
        time.sleep(0.03)                       # a step that takes a while, as real ones do
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.5))
    slim.learning.train(op, logdir, data=[(x, y)] * 1000, number_of_steps=60, log_every_n_steps=0,
                        save_interval_secs=None, save_interval_steps=4, save_summaries_secs=None,
                        saver=slim.checkpoint.Saver(max_to_keep=2))
""")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_evaluation_loop_beside_a_live_trainer(tmp_path, python_exe, subprocess_env, caplog):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    train_dir, eval_dir = str(tmp_path / "train"), str(tmp_path / "eval")
    start = time.monotonic()
    proc = subprocess.Popen([python_exe, str(script), train_dir], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        torch.manual_seed(123)   # a different initialisation: only the restore makes it the trainer's model
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        names_to_values, names_to_updates = metrics.aggregate_metric_map({
            "accuracy": metrics.streaming_accuracy(), "loss": metrics.streaming_mean()})

        def eval_op(batch):
            logits = model(batch[0])
            names_to_updates["accuracy"](logits.argmax(1), batch[1])
            names_to_updates["loss"](torch.nn.functional.cross_entropy(logits, batch[1], reduction="none"))

        evaluated = []

        class Steps(evaluation.EvaluationHook):
            def end(self, context):
                evaluated.append(context.global_step)

        def trainer_done():
            if proc.poll() is None:
                return False
            latest = checkpoint.latest_checkpoint(train_dir)
            return latest is None or (evaluated and checkpoint.checkpoint_step(latest) == evaluated[-1])

        with caplog.at_level(logging.INFO, logger="torchslim"):
            final = evaluation.evaluation_loop(
                train_dir, eval_dir, num_evals=None, eval_op=eval_op, final_op=names_to_values,
                data=[(x[:32], y[:32]), (x[32:], y[32:])], eval_interval_secs=0, timeout=0.5,
                timeout_fn=trainer_done, hooks=[Steps()])
        out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert len(evaluated) >= 2 and evaluated == sorted(set(evaluated)) and evaluated[-1] == 60
    assert all(s % 4 == 0 for s in evaluated)
    acc_events = _scalars(eval_dir, "accuracy")
    loss_events = _scalars(eval_dir, "loss")
    steps = [s for s, _ in acc_events]
    assert steps == evaluated and [s for s, _ in loss_events] == evaluated   # steps increase, none crashed
    assert final["accuracy"] == pytest.approx(acc_events[-1][1])
    # the last evaluation is the trained model's: check it against the final checkpoint directly
    restored = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    checkpoint.restore_model(os.path.join(train_dir, "model.ckpt-60.pt"), restored)
    with torch.no_grad():
        assert final["accuracy"] == pytest.approx(float((restored(x).argmax(1) == y).float().mean()))
        assert final["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(restored(x), y)), rel=1e-5)
    assert final["loss"] < loss_events[0][1]   # training went on while we watched
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors
    assert len(checkpoint.list_checkpoints(train_dir)) == 2   # max_to_keep did prune behind us
    assert time.monotonic() - start < 30


def test_a_stateless_module_in_eval_op_does_not_break_the_restore(tmp_path):
    """The eval op uses a loss module the trainer did not: the checkpoint still restores into the model."""
    src = torch.nn.Linear(3, 2)
    path = _save(str(tmp_path), 4, src)
    model = torch.nn.Linear(3, 2)
    criterion = torch.nn.CrossEntropyLoss()
    value, update = metrics.streaming_mean()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])

    def eval_op():
        update(criterion(model(x), y))

    loss = evaluation.evaluate_once(path, str(tmp_path / "eval"), eval_op=eval_op, final_op=value)
    assert torch.equal(model.weight, src.weight)
    with torch.no_grad():
        assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(src(x), y)))


# ------------------------------------------------------- finding every checkpoint the trainer writes
def test_saver_prefix_checkpoints_are_found_by_evaluation_loop(tmp_path):
    torch.manual_seed(0)
    train_dir, model = str(tmp_path / "train"), ScaleModel()
    x = torch.ones(4, 1)
    op = slim.learning.create_train_op(lambda b: (model(b) - 2.0).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1))
    slim.learning.train(op, train_dir, data=[x] * 20, number_of_steps=6, log_every_n_steps=0, save_summaries_secs=None,
                        save_interval_secs=None, save_interval_steps=3, saver=checkpoint.Saver(prefix="chkpt"))
    assert sorted(n for n in os.listdir(train_dir) if n.endswith(".pt")) == ["chkpt-3.pt", "chkpt-6.pt"]
    value, update = metrics.streaming_mean()
    steps = []

    class Steps(evaluation.EvaluationHook):
        def end(self, context):
            steps.append(context.global_step)

    t = FakeTime()
    evaluation.evaluation_loop(train_dir, str(tmp_path / "eval"), eval_op=lambda: update(model.scale), final_op=value,
                               hooks=[Steps()], eval_interval_secs=0, timeout=5, clock=t.clock, sleep=t.sleep)
    assert steps == [3, 6]
    assert evaluation.wait_for_new_checkpoint(train_dir, timeout=0).endswith("chkpt-6.pt")
    assert [os.path.basename(p) for p in evaluation.checkpoints_iterator(train_dir, timeout=0)] == ["chkpt-6.pt"]
    # The readers also take the prefix, and find nothing under another one.
    assert evaluation.wait_for_new_checkpoint(train_dir, timeout=0, prefix="chkpt").endswith("chkpt-6.pt")
    assert evaluation.wait_for_new_checkpoint(train_dir, timeout=0, prefix="model.ckpt") is None
    with pytest.raises(ValueError, match="argument 'prefix'"):
        evaluation.evaluation_loop(train_dir, str(tmp_path / "eval"), timeout=0, prefix="")


def test_checkpoints_are_evaluated_by_their_stored_step_and_none_that_exists_is_waited_past(tmp_path):
    model, train_dir = ScaleModel(), str(tmp_path / "train")
    os.makedirs(train_dir)
    _save(train_dir, 10, model)
    os.rename(_save(train_dir, 20, model), os.path.join(train_dir, "model.ckpt-500.pt"))   # holds step 20
    _save(train_dir, 30, model)
    value, update = metrics.streaming_mean()
    seen = []

    class Steps(evaluation.EvaluationHook):
        def end(self, context):
            seen.append((os.path.basename(context.checkpoint_path), context.global_step))

    t = FakeTime()
    written = []

    def sleep(seconds):
        t.sleep(seconds)
        if not written:  # a trainer restarted from step 10 writes step 15 after the evaluator passed step 30
            written.append(_save(train_dir, 15, model))

    evaluation.evaluation_loop(train_dir, str(tmp_path / "eval"), eval_op=lambda: update(model.scale), final_op=value,
                               hooks=[Steps()], eval_interval_secs=0, timeout=5, clock=t.clock, sleep=sleep)
    assert seen == [("model.ckpt-10.pt", 10), ("model.ckpt-500.pt", 20), ("model.ckpt-30.pt", 30),
                    ("model.ckpt-15.pt", 15)]
