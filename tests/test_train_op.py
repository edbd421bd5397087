"""The train op's newer duties: mixed precision, accumulation, compile, placement, moving averages,
sparse gradients, the device-side numerics check and its host reads, profiler regions."""
import logging
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from torch import nn

import torchslim as slim
from torchslim import checkpoint
from torchslim.learning import NumericsError
from torchslim.train_op import _to_device

NO_SUMMARIES = {"save_summaries_secs": None}
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_op_resume.py")


def logistic_points(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float().unsqueeze(1)
    return x, y


class Logistic(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x)


def bce(model, seen=None):
    def total_loss(batch):
        x, y = batch
        logits = model(x)
        if seen is not None:
            seen.append(logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), y)

    return total_loss


def chunks(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- mixed precision


def test_bf16_runs_the_forward_in_bf16_and_converges():
    model, seen = Logistic(), []
    x, y = logistic_points(64)
    op = slim.learning.create_train_op(bce(model, seen), torch.optim.SGD(model.parameters(), lr=0.5),
                                       mixed_precision="bf16")
    first = float(op((x, y)))
    loss = slim.learning.train(op, None, data=[(x, y)] * 150, log_every_n_steps=0)
    assert seen[0] == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert loss < 0.3 < first
    assert model.fc.weight.dtype == torch.float32  # the weights stay fp32; only the forward is bf16


def _resume_run(logdir, steps, make, data, save_every):
    slim.collections.reset()
    model, op, extra = make()
    slim.learning.train(op, str(logdir), data=slim.data.repeat(data), number_of_steps=steps, log_every_n_steps=0,
                        save_interval_secs=None, save_interval_steps=save_every, **NO_SUMMARIES)
    return model, op, extra


def _assert_resume_is_exact(tmp_path, make, data, steps=20, stop=10):
    a = _resume_run(tmp_path / "a", steps, make, data, steps)
    _resume_run(tmp_path / "b", stop, make, data, stop)
    b = _resume_run(tmp_path / "b", steps, make, data, steps)  # a new program: restores step `stop`, trains on
    assert b[1].step == steps
    for (k, va), vb in zip(state_of(a[0]).items(), state_of(b[0]).values()):
        assert torch.equal(va, vb), k
    return a, b


def test_bf16_resume_is_exact(tmp_path):
    x, y = logistic_points(64)

    def make():
        model = Logistic()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        return model, slim.learning.create_train_op(bce(model), opt, mixed_precision="bf16"), None

    _assert_resume_is_exact(tmp_path, make, chunks(x, y, 16))


def _overflow_at(model, steps):
    def total_loss(batch):
        x, y = batch
        w = model.fc.weight
        if slim.learning.get_global_step().value + 1 in steps:  # finite loss, gradients that overflow
            w = w * 1.0
            w.register_hook(lambda g: torch.full_like(g, float("inf")))
        return nn.functional.binary_cross_entropy_with_logits((x @ w.t() + model.fc.bias).float(), y)

    return total_loss


def test_fp16_overflow_skips_the_update_lowers_the_scale_and_is_not_an_error():
    model = Logistic()
    x, y = logistic_points()
    op = slim.learning.create_train_op(_overflow_at(model, {3}), torch.optim.SGD(model.parameters(), lr=0.1),
                                       mixed_precision="fp16")
    snapshots = []
    for _ in range(4):
        snapshots.append(state_of(model))
        op((x, y))
    assert op.overflow_steps == 1 and op.step == 4
    assert op.grad_scaler.get_scale() == 65536.0 / 2
    for k in snapshots[2]:
        assert torch.equal(snapshots[2][k], snapshots[3][k]), k  # step 3 changed nothing
    assert not torch.equal(snapshots[3]["fc.weight"], state_of(model)["fc.weight"])  # step 4 trained again


def test_fp16_a_nan_loss_is_still_an_error():
    model = Logistic()
    x, y = logistic_points()
    op = slim.learning.create_train_op(lambda b: bce(model)(b) * float("nan"), torch.optim.SGD(model.parameters(), lr=0.1),
                                       mixed_precision="fp16", model=model, global_step=slim.learning.GlobalStep())
    with pytest.raises(NumericsError, match="step 1: the loss .* is nan"):
        op((x, y))


def test_fp16_a_non_finite_gradient_at_loss_scale_one_is_an_error():
    model = Logistic()
    x, y = logistic_points()
    op = slim.learning.create_train_op(_overflow_at(model, {1}), torch.optim.SGD(model.parameters(), lr=0.1),
                                       mixed_precision="fp16")
    op.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # nothing left to scale down: not an overflow
    with pytest.raises(NumericsError, match=r"step 1: the gradient of parameter 'fc\.weight' has Inf"):
        op((x, y))


def test_fp16_scaler_state_is_checkpointed_and_resumed_exactly(tmp_path):
    x, y = logistic_points()

    def make():
        model = Logistic()
        op = slim.learning.create_train_op(_overflow_at(model, {2, 13}), torch.optim.SGD(model.parameters(), lr=0.1),
                                           mixed_precision="fp16", model=model)
        op.grad_scaler = torch.amp.GradScaler("cpu", growth_interval=3)  # the scale moves during the run
        return model, op, None

    a, b = _assert_resume_is_exact(tmp_path, make, chunks(x, y, 8))
    assert a[1].grad_scaler.state_dict() == b[1].grad_scaler.state_dict()
    assert a[1].overflow_steps >= 2  # the two forced ones, and those of the scale growing past fp16's range
    assert b[1].overflow_steps == a[1].overflow_steps  # the count was restored with the scaler
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(tmp_path / "b")))
    assert state["grad_scaler"]["overflow_steps"] == a[1].overflow_steps


# --------------------------------------------------------------------------- accumulation


def test_four_micro_batches_of_8_equal_one_batch_of_32():
    x, y = logistic_points(32)
    runs = {}
    for name, size, n in (("accumulated", 8, 4), ("whole", 32, 1)):
        slim.collections.reset()
        model = Logistic()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        op = slim.learning.create_train_op(bce(model), opt, accumulate_steps=n, clip_gradient_norm=10.0)
        data = slim.data.repeat(chunks(x, y, size))
        slim.learning.train(op, None, data=data, number_of_steps=20, log_every_n_steps=0)
        assert op.step == 20  # the global step counts updates
        runs[name] = state_of(model)
    for k in runs["whole"]:
        torch.testing.assert_close(runs["accumulated"][k], runs["whole"][k], rtol=0, atol=1e-6)


def test_accumulation_averages_the_losses_and_takes_a_list_of_micro_batches():
    model = Logistic()
    x, y = logistic_points(32)
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.0), accumulate_steps=2,
                                       global_step=slim.learning.GlobalStep())
    parts = chunks(x, y, 16)
    loss = op(slim.learning.MicroBatches(parts))
    expected = (bce(model)(parts[0]) + bce(model)(parts[1])) / 2
    torch.testing.assert_close(loss, expected.detach())
    with pytest.raises(ValueError, match="accumulate_steps=2 the train op takes MicroBatches of 2 batches"):
        op(parts)  # a plain list could be one batch [x, y]: the micro-batches are marked
    assert isinstance(loss, torch.Tensor)


def test_accumulation_with_data_that_runs_out_drops_the_partial_group():
    model = Logistic()
    x, y = logistic_points(32)
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1), accumulate_steps=3)
    slim.learning.train(op, None, data=chunks(x, y, 4), log_every_n_steps=0)  # 8 batches: 2 updates
    assert op.step == 2


@pytest.mark.slow
def test_accumulation_fp16_and_moving_averages_survive_kill_9_bitwise(tmp_path, subprocess_env):
    def run(logdir, out):
        subprocess.run([sys.executable, SCRIPT, str(logdir), str(out)], env=subprocess_env, check=True, timeout=180,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    run(tmp_path / "a", tmp_path / "a.pt")
    logdir = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(logdir), str(tmp_path / "b.pt")], env=subprocess_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.list_checkpoints(str(logdir)) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it was killed; lengthen it"
    killed_at = checkpoint.checkpoint_step(checkpoint.latest_checkpoint(str(logdir)))
    assert 0 < killed_at < 60
    run(logdir, tmp_path / "b.pt")
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "ab")
    assert a["step"] == b["step"] == 60
    for part in ("model", "ema", "scaler"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            va, vb = a[part][k], b[part][k]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, (part, k)


# --------------------------------------------------------------------------- compile


def test_compile_with_options_trains_and_checkpoints_plain_names(tmp_path):
    def make():
        model = Logistic()
        op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.5),
                                           compile={"backend": "eager"})
        return model, op, None

    x, y = logistic_points()
    _assert_resume_is_exact(tmp_path, make, chunks(x, y, 8), steps=10, stop=5)
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(tmp_path / "b")))
    assert sorted(state["model"]) == ["fc.bias", "fc.weight"]


@pytest.mark.slow
def test_compile_true_trains_and_resumes(tmp_path):
    def make():
        model = Logistic()
        return model, slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.5),
                                                    compile=True), None

    x, y = logistic_points()
    _assert_resume_is_exact(tmp_path, make, chunks(x, y, 8), steps=6, stop=3)


# --------------------------------------------------------------------------- device placement


def test_batches_are_moved_leaf_by_leaf_keeping_their_structure():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.ones(2), [torch.zeros(1), "label"]), "b": (torch.ones(1),)}
    moved = _to_device(batch, torch.device("meta"))
    assert isinstance(moved["a"], Pair) and moved["a"].x.device.type == "meta"
    assert moved["a"].y[0].device.type == "meta" and moved["a"].y[1] == "label"
    assert isinstance(moved["b"], tuple) and moved["b"][0].device.type == "meta"


def test_cpu_parameters_do_not_walk_the_batch():
    model = Logistic()
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1))
    off = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1), place_batches=False)
    assert op._place is False and off._place is False
    with pytest.raises(ValueError, match="place_batches must be True or False"):
        slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1), place_batches="cuda")


# --------------------------------------------------------------------------- moving averages


def _ema_setup(decay=0.99, seed=0):
    model = Logistic(seed)
    gs = slim.learning.get_or_create_global_step()
    ema = slim.variables.ExponentialMovingAverage(decay, num_updates=gs)
    slim.collections.add_to_collection(slim.GraphKeys.UPDATE_OPS, ema.apply(model))
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    return model, op, ema


def test_moving_average_follows_tf_formula_over_10_steps():
    model, op, ema = _ema_setup()
    x, y = logistic_points()
    shadow = {k: v.clone().double() for k, v in state_of(model).items()}
    for n in range(10):
        op((x, y))
        decay = min(0.99, (1 + n) / (10 + n))  # n: the global step before this update
        for k, w in state_of(model).items():
            shadow[k] -= (1 - decay) * (shadow[k] - w.double())
    for k in shadow:
        torch.testing.assert_close(ema.average(k).double(), shadow[k], rtol=0, atol=1e-6)
    assert not torch.allclose(ema.average("fc.weight"), model.fc.weight)


def test_moving_averages_resume_bitwise_and_evaluate_through_variables_to_restore(tmp_path):
    x, y = logistic_points()
    data = chunks(x, y, 8)
    a, b = _assert_resume_is_exact(tmp_path, _ema_setup, data)
    for name in a[2].state_dict():
        assert torch.equal(a[2].average(name), b[2].average(name)), name
    path = checkpoint.latest_checkpoint(str(tmp_path / "b"))

    slim.collections.reset()
    evaluated = Logistic(seed=5)
    ema = slim.variables.ExponentialMovingAverage(0.99)
    ema.apply(evaluated)
    mse = slim.metrics.streaming_mean_squared_error()
    slim.evaluation.evaluate_once(
        path, str(tmp_path / "eval"), num_evals=None, data=data,
        eval_op=lambda batch: mse.update(torch.sigmoid(evaluated(batch[0])), batch[1]),
        final_op={"mse": mse.compute}, variables_to_restore=ema.variables_to_restore(), summary_op=None,
    )
    for name, value in a[2].state_dict().items():
        assert torch.equal(evaluated.state_dict()[name], value), name  # the averaged weights were restored
    assert not torch.equal(evaluated.fc.weight, a[0].fc.weight)
    names = [n for n, _ in slim.variables.list_checkpoint_variables(path)]
    assert "fc.weight/ExponentialMovingAverage" in names


# --------------------------------------------------------------------------- sparse gradients


class Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4, sparse=sparse)
        self.out = nn.Linear(4, 1)

    def forward(self, idx):
        return self.out(self.emb(idx).mean(1))


def _bag_data():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 20, (16, 5), generator=g)  # repeated indices: an uncoalesced sparse gradient
    return idx, (idx[:, 0] < 10).float().unsqueeze(1)


def test_sparse_embedding_trains_with_clipping_and_multipliers_like_the_dense_one():
    idx, y = _bag_data()
    final = {}
    for sparse in (True, False):
        slim.collections.reset()
        model = Bag(sparse)
        op = slim.learning.create_train_op(
            bce(model), torch.optim.SGD(model.parameters(), lr=0.5), clip_gradient_norm=0.05,
            gradient_multipliers={"emb.weight": 3.0}, summarize_gradients=True,
        )
        op.record_summaries = True
        first = float(op((idx, y)))
        op.record_summaries = False
        loss = slim.learning.train(op, None, data=[(idx, y)] * 30, log_every_n_steps=0)
        assert loss < first
        final[sparse] = state_of(model)
    for k in final[True]:
        torch.testing.assert_close(final[True][k], final[False][k], rtol=0, atol=1e-6)


def test_a_nan_in_a_sparse_gradient_is_named(caplog):
    caplog.set_level(logging.INFO, logger="torchslim")  # a shown log line reads the numerics flag at its step
    idx, y = _bag_data()
    model = Bag(True)

    def nan_values(g):
        return torch.sparse_coo_tensor(g._indices(), torch.full_like(g._values(), float("nan")), g.shape,
                                       check_invariants=False)

    model.emb.weight.register_hook(nan_values)
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.5), clip_gradient_norm=1.0)
    with pytest.raises(NumericsError, match=r"step 1: the gradient of parameter 'emb\.weight' has NaN"):
        slim.learning.train(op, None, data=[(idx, y)] * 3, log_every_n_steps=1, number_of_steps=3)


# --------------------------------------------------------------------------- host reads and the deferred check

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


def _count_reads(monkeypatch):
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _device_flags(op):
    """Makes ``op`` check with the device-side flags, as it does on an accelerator, on the CPU."""
    op._loss_on_host = False
    return op


@pytest.mark.parametrize("kwargs", [{}, {"clip_gradient_norm": 1.0}, {"gradient_multipliers": {"fc.weight": 2.0}}])
def test_a_plain_step_reads_nothing_back_to_the_host(monkeypatch, kwargs):
    model = Logistic()
    x, y = logistic_points()
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kwargs)
    _device_flags(op)((x, y))  # the first step makes the flags
    reads = _count_reads(monkeypatch)
    for _ in range(3):
        op((x, y))
    assert reads == []
    op.check_pending_numerics()  # the host looks when asked: this is where the reads are
    assert reads


def test_deferred_check_names_the_first_bad_step_when_read_at_the_end():
    model = Logistic()
    x, y = logistic_points()
    calls = []

    def total_loss(batch):
        calls.append(1)
        loss = bce(model)(batch)
        return loss * float("nan") if len(calls) == 5 else loss

    op = _device_flags(slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1), model=model))
    with pytest.raises(NumericsError, match=r"step 5: the loss or a gradient first held NaN or Inf \(read at step 10"):
        slim.learning.train(op, None, data=[(x, y)] * 10, log_every_n_steps=0)


def _nan_at_call_5(model):
    """A loss NaN at its 5th call, and the weights seen at the start of each call."""
    calls, snapshots = [], {}

    def total_loss(batch):
        calls.append(1)
        snapshots[len(calls)] = state_of(model)
        loss = bce(model)(batch)
        return loss * float("nan") if len(calls) == 5 else loss

    return total_loss, snapshots


def test_on_the_cpu_each_step_reads_only_its_loss_and_stops_before_a_bad_update(monkeypatch):
    model = Logistic()
    x, y = logistic_points()
    total_loss, snapshots = _nan_at_call_5(model)

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model)
    op((x, y))
    reads = _count_reads(monkeypatch)
    for _ in range(3):
        op((x, y))
    assert reads == ["item"] * 3  # the loss, free on the CPU; no flag kernel over the gradients
    with pytest.raises(NumericsError, match=r"step 5: the loss '.*total_loss' is nan \(weights left as they were before"):
        op((x, y))
    assert op.step == 4
    for k, v in state_of(model).items():
        assert torch.equal(v, snapshots[5][k]), k


def test_on_the_cpu_a_bad_gradient_is_found_in_the_weights_it_updated():
    model = Logistic()
    x, y = logistic_points()
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    op((x, y))
    op.check_pending_numerics()
    handle = model.fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))  # a finite loss, an Inf gradient
    op((x, y))
    handle.remove()
    with pytest.raises(NumericsError, match=r"step 2: the gradient of parameter 'fc\.weight' has Inf values \(that update"):
        op.check_pending_numerics()  # read right after the bad step: its gradient is still there to name
    # the next step's loss is NaN, made so by the weight: named too
    with pytest.raises(NumericsError, match=r"step 3: the loss .* is nan because 'fc\.weight' holds Inf values, "
                                            r"put there by an update at step 2"):
        op((x, y))


def test_on_the_cpu_a_summary_step_checks_its_gradients_with_one_read_before_the_update(monkeypatch):
    # A summary must not record weights that a bad gradient made NaN: that step checks before updating.
    model = Logistic()
    x, y = logistic_points()
    bad = []

    def total_loss(batch):
        w = model.fc.weight
        if "gradient" in bad:  # a finite loss, an Inf gradient
            w = w * 1.0
            w.register_hook(lambda g: torch.full_like(g, float("inf")))
        loss = nn.functional.binary_cross_entropy_with_logits(batch[0] @ w.t() + model.fc.bias, batch[1])
        return loss * float("nan") if "loss" in bad else loss

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    op((x, y))
    seen = []
    op.before_numerics_read.append(lambda: seen.append(op.step))
    reads = _count_reads(monkeypatch)
    op.record_summaries = True
    op((x, y))  # finite: one read
    assert reads == ["item"] and seen == [1]
    before = state_of(model)
    bad.append("gradient")
    with pytest.raises(NumericsError, match=r"step 3: the gradient of parameter 'fc\.weight' has Inf values "
                                            r"\(weights left as they were before this step\)"):
        op((x, y))
    assert op.step == 2 and seen == [1, 2]
    for k, v in state_of(model).items():
        assert torch.equal(v, before[k]), k
    bad.append("loss")
    with pytest.raises(NumericsError, match=r"step 3: the loss .* is nan \(weights left as they were before this step\)"):
        op((x, y))  # the loss is named before the gradients it made NaN
    assert op.step == 2
    bad.clear()
    op((x, y))  # the scratch flag was cleared: a good step passes again
    assert op.step == 3


def test_a_log_step_reads_the_check_and_names_the_loss(caplog):
    caplog.set_level(logging.INFO, logger="torchslim")
    model = Logistic()
    x, y = logistic_points()
    calls = []

    def total_loss(batch):
        calls.append(1)
        loss = bce(model)(batch)
        return loss * float("nan") if len(calls) == 5 else loss

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(NumericsError, match=r"step 5: the loss '.*total_loss' is nan \(that update was applied"):
        slim.learning.train(_device_flags(op), None, data=[(x, y)] * 10, log_every_n_steps=1)
    assert op.step == 5


def test_a_fused_optimizer_skips_the_bad_steps_on_the_device():
    model = Logistic()
    x, y = logistic_points()
    total_loss, snapshots = _nan_at_call_5(model)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    op = slim.learning.create_train_op(total_loss, opt, model=model)
    with pytest.raises(NumericsError, match="step 5: .*weights left as they were before that step"):
        slim.learning.train(op, None, data=[(x, y)] * 10, log_every_n_steps=0)
    assert op.step == 10
    for k, v in state_of(model).items():
        assert torch.equal(v, snapshots[5][k]), k  # steps 5..10 were all skipped on the device
    assert not torch.equal(snapshots[5]["fc.weight"], snapshots[1]["fc.weight"])


def test_weights_that_overflow_in_the_optimizer_step_are_never_checkpointed(tmp_path):
    model = Logistic()
    x, y = logistic_points()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 if n < 2 else 1e39)  # step 3: lr 1e38
    op = slim.learning.create_train_op(lambda b: bce(model)(b) * 1e4, opt, scheduler=scheduler, model=model)
    logdir = str(tmp_path)
    with pytest.raises(NumericsError, match=r"step (\d+): 'fc\.weight' holds Inf values, put there by an update at "
                                            r"step \1 \(the loss was finite") as info:
        slim.learning.train(op, logdir, data=[(x, y)] * 10, log_every_n_steps=0, save_interval_secs=None,
                            save_interval_steps=1, **NO_SUMMARIES)
    bad = int(str(info.value).split(":")[0].split()[1])
    assert bad in (3, 4)  # the first step at the huge learning rate
    paths = checkpoint.list_checkpoints(logdir)
    assert [checkpoint.checkpoint_step(p) for p in paths] == list(range(1, bad))
    for path in paths:
        for name, value in checkpoint.load_checkpoint(path)["model"].items():
            assert torch.isfinite(value).all(), (path, name)


# --------------------------------------------------------------------------- profiler regions

REGIONS = {"torchslim/loss", "torchslim/backward", "torchslim/gradients", "torchslim/optimizer", "torchslim/update_ops"}


PLAIN_CONFIGS = {
    "defaults": {},
    "clipped": {"clip_gradient_norm": 0.05},
    "unchecked": {"check_numerics": False},
    "device flags": {"device_flags": True, "clip_gradient_norm": 0.05},
    "trained subset": {"variables_to_train": "fc.weight"},
    "scheduled, averaged": {"scheduler": True, "ema": True},
    "summary steps": {"summarize_gradients": True, "summary_steps": True},
    "sync numerics": {"clip_gradient_norm": 0.05, "sync_numerics": True},
}


@pytest.mark.parametrize("config", PLAIN_CONFIGS, ids=list(PLAIN_CONFIGS))
def test_the_common_step_takes_the_plain_path_and_updates_as_the_general_one(monkeypatch, config):
    kwargs = dict(PLAIN_CONFIGS[config])
    device_flags, scheduled, averaged, summary_steps, sync_numerics = (
        kwargs.pop(k, False) for k in ("device_flags", "scheduler", "ema", "summary_steps", "sync_numerics")
    )
    general_calls = []
    real_general = slim.train_op.TrainOp._general_step

    def counted_general(self, batch):
        general_calls.append(self.step)
        return real_general(self, batch)

    monkeypatch.setattr(slim.train_op.TrainOp, "_general_step", counted_general)
    runs = {}
    for plain in (True, False):
        slim.collections.reset()
        model = Logistic()
        x, y = logistic_points()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        extra = dict(kwargs)
        if "variables_to_train" in extra:
            extra["variables_to_train"] = [model.fc.weight]
        if scheduled:
            extra["scheduler"] = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        if averaged:
            extra["update_ops"] = [slim.variables.ExponentialMovingAverage(0.9).apply(model)]
        op = slim.learning.create_train_op(bce(model), opt, **extra)
        if device_flags:
            _device_flags(op)
        op._plain = plain
        op.sync_numerics = sync_numerics
        losses, summaries = [], []
        for i in range(4):
            op.record_summaries = summary_steps and i % 2 == 1
            losses.append(op((x, y)))
            summaries.append(sorted(r.tag for r in op.last_step.get(slim.collections.GraphKeys.SUMMARIES, [])))
        op.check_pending_numerics()
        if summary_steps:  # the gradient summaries are recorded on the summary steps only
            assert [bool(tags) for tags in summaries] == [False, True, False, True], summaries
        runs[plain] = (losses, state_of(model), op.step, opt.param_groups[0]["lr"], summaries)
        assert bool(general_calls) is not plain  # the plain configuration never reaches the general path
        general_calls.clear()
    (plain_losses, plain_state, plain_step, plain_lr, plain_summaries), (losses, state, step, lr, summaries) = (
        runs[True], runs[False]
    )
    assert plain_step == step == 4 and plain_lr == lr and plain_summaries == summaries
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(plain_losses, losses))
    assert all(torch.equal(plain_state[k], state[k]) for k in state)


def test_a_hook_sends_the_step_down_the_general_path_and_a_summary_step_does_not(monkeypatch):
    model = Logistic()
    x, y = logistic_points()
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1))
    general_calls = []
    real_general = slim.train_op.TrainOp._general_step
    monkeypatch.setattr(slim.train_op.TrainOp, "_general_step",
                        lambda self, batch: general_calls.append(self.step) or real_general(self, batch))
    op((x, y))
    op.record_summaries = True
    op((x, y))
    op.record_summaries = False
    seen = []
    op.before_step.append(lambda: seen.append(op.step))
    op((x, y))
    assert general_calls == [2] and seen == [2]


def test_the_short_path_calls_the_optimizer_as_its_own_methods_would(recwarn):
    # Without a profiler the short path skips the optimizer's profiler regions; hooks, a scheduler's count
    # of steps, an overridden zero_grad and a replaced optimizer are still honoured.
    from torch.optim import optimizer as optimizer_module

    model = Logistic()
    x, y = logistic_points()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    op = slim.learning.create_train_op(bce(model), opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    op((x, y))
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]  # it saw the optimizer step first
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", op.step)))
    post = optimizer_module.register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("post", op.step)))
    try:
        op((x, y))
    finally:
        pre.remove()
        post.remove()
    op((x, y))
    assert calls == [("pre", 1), ("post", 1)] and op.step == 3 and opt.param_groups[0]["lr"] == 0.1 * 0.5**3

    class CountingSGD(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            calls.append("zero_grad")
            super().zero_grad(set_to_none)

    op.optimizer = CountingSGD(model.parameters(), lr=0.1)
    op.scheduler = None
    op((x, y))
    assert calls[-1] == "zero_grad"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        op((x, y))  # a traced step shows the optimizer's own regions
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#CountingSGD.step" in names and any(n.startswith("Optimizer.zero_grad#") for n in names)


def test_the_short_path_updates_as_a_hand_loop_does():
    runs = []
    for hand in (True, False):
        slim.collections.reset()
        torch.manual_seed(0)
        model = Logistic()
        x, y = logistic_points()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        op = slim.learning.create_train_op(bce(model), opt, check_numerics=False)
        for _ in range(5):
            if hand:
                opt.zero_grad()
                bce(model)((x, y)).backward()
                opt.step()
            else:
                op((x, y))
        runs.append(state_of(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_profiler_regions_appear_only_while_a_trace_is_recorded(monkeypatch):
    model = Logistic()
    x, y = logistic_points()
    op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        op((x, y))
    assert {e.name for e in prof.events()} >= REGIONS
    made = []
    real = torch.profiler.record_function
    monkeypatch.setattr(torch.profiler, "record_function", lambda name: made.append(name) or real(name))
    op((x, y))
    assert made == []


def test_a_profiled_step_updates_as_an_unprofiled_one():
    # Under a profiler each phase is a record_function region: the update must be the same as without.
    runs = []
    for profiled in (False, True):
        slim.collections.reset()
        torch.manual_seed(0)
        model = Logistic()
        x, y = logistic_points()
        op = slim.learning.create_train_op(bce(model), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                           clip_gradient_norm=0.5)
        losses = []
        for _ in range(3):
            if profiled:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
                    losses.append(op((x, y)))
            else:
                losses.append(op((x, y)))
        runs.append((losses, [p.detach().clone() for p in model.parameters()], op.step))
    (plain_losses, plain_params, plain_step), (prof_losses, prof_params, prof_step) = runs
    assert plain_step == prof_step == 3
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, prof_losses))
    assert all(torch.equal(a, b) for a, b in zip(plain_params, prof_params))
    with pytest.raises(ValueError, match=r"total_loss must return a scalar tensor, got a tensor of shape \(2,\)"):
        slim.learning.create_train_op(lambda: torch.ones(2, requires_grad=True),
                                      torch.optim.SGD(model.parameters(), lr=0.1))()
