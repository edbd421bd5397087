"""Behaviour tests for slim.learning: the scenarios of TF-Slim's learning_test, on PyTorch.

Every test drives the public API (create_train_op, train, train_step and the
gradient helpers) on tiny real models: TF-Slim's logistic classifier on its
16-point, 4-feature data set, its batch-norm classifier, and one-parameter
models whose gradients are known in closed form, so clipped and multiplied
gradients can be checked against values worked out by hand.

Summaries are switched off (save_summaries_secs=None) except where a test
needs them, so the file stays fast. Exact resume after a crash and
checkpoint corruption are covered in test_resume.py / test_checkpoint.py.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import re
import threading
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import torchslim as slim
from torchslim.learning import NumericsError

NO_SUMMARIES = {"save_summaries_secs": None}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These models are tiny: with the cores shared, extra OpenMP threads only wait on each other
    (300 batch-norm steps: 0.2 s with one thread, 2-20 s with two on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- data and models


def logistic_data() -> tuple[torch.Tensor, torch.Tensor]:
    """TF-Slim's TrainTest set: 16 one-hot points whose hot column is 2*label + a coin flip."""
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 2, size=(16, 1)).astype(np.float32)
    inputs = np.zeros((16, 4), np.float32)
    for i in range(16):
        inputs[i, int(2 * labels[i, 0] + rng.randint(0, 2))] = 1.0
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def uniform_data() -> tuple[torch.Tensor, torch.Tensor]:
    """TF-Slim's CreateTrainOpTest set: 16 points uniform in [0, 1)^4 with random 0/1 labels."""
    rng = np.random.RandomState(0)
    inputs = rng.rand(16, 4).astype(np.float32)
    labels = rng.randint(0, 2, size=(16, 1)).astype(np.float32)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


class LogisticClassifier(nn.Module):
    """One fully connected unit with a sigmoid: TF's Glorot-uniform weights and zero bias."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.fc.weight, generator=torch.Generator().manual_seed(seed))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


class BatchNormClassifier(nn.Module):
    """slim batch_norm (decay 0.1, moving averages as update ops) before the logistic unit."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.bn = slim.layers.batch_norm(4, decay=0.1, fused=True)
        self.head = LogisticClassifier(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x))


class KnownGradient(nn.Module):
    """loss = sum(c * w) (+ sum(c2 * w2)): the gradient of w is c whatever w is; w starts at 0.

    With SGD at learning rate 1 one step leaves w = -(the gradient applied),
    so the applied (multiplied, clipped) gradient can be read off the weights.
    """

    def __init__(self, c, c2=None, unused: bool = False) -> None:
        super().__init__()
        self.c = torch.tensor(c, dtype=torch.float32)
        self.w = nn.Parameter(torch.zeros(len(c)))
        self.c2 = None if c2 is None else torch.tensor(c2, dtype=torch.float32)
        self.w2 = None if c2 is None else nn.Parameter(torch.zeros(len(c2)))
        self.unused = nn.Parameter(torch.zeros(2)) if unused else None

    def forward(self) -> torch.Tensor:
        loss = (self.w * self.c).sum()
        if self.w2 is not None:
            loss = loss + (self.w2 * self.c2).sum()
        return loss


def logistic_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, record: list | None = None):
    """The total_loss callable of TF-Slim's tests: log loss of model(x) through the LOSSES collection."""

    def total_loss() -> torch.Tensor:
        slim.losses.log_loss(model(x), y)
        loss = slim.losses.get_total_loss()
        if record is not None:
            record.append(float(loss.detach()))
        return loss

    return total_loss


def batch_log_loss(model: nn.Module):
    """A total_loss taking (x, y) batches from the data: log loss through the LOSSES collection."""

    def total_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        slim.losses.log_loss(model(batch[0]), batch[1])
        return slim.losses.get_total_loss()

    return total_loss


def logistic_train_op(seed=0, lr=1.0, gradient_multiplier=None, record=None, train_only=None, **kwargs):
    """TF-Slim's test set-up: the logistic classifier, SGD and a train op (train_only: 'weight' or 'bias')."""
    model = LogisticClassifier(seed)
    x, y = logistic_data()
    multipliers = None
    if gradient_multiplier is not None:
        multipliers = {name: gradient_multiplier for name, _ in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    op = slim.learning.create_train_op(
        logistic_loss(model, x, y, record),
        optimizer,
        gradient_multipliers=multipliers,
        variables_to_train=None if train_only is None else [getattr(model.fc, train_only)],
        **kwargs,
    )
    return model, op


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- clip_gradient_norms

# g = [1, 2, 3] has norm sqrt(14) = 3.7416574; clipped to norm 1: g / sqrt(14).
GRAD = [1.0, 2.0, 3.0]
GRAD_CLIPPED_TO_1 = [0.26726124, 0.53452248, 0.80178373]


def test_clip_gradient_norms_clips_an_ordinary_gradient():
    grad, var = torch.tensor(GRAD), torch.zeros(3)
    [(clipped, same_var)] = slim.learning.clip_gradient_norms([(grad, var)], 1.0)
    assert same_var is var
    np.testing.assert_allclose(clipped.numpy(), GRAD_CLIPPED_TO_1, rtol=1e-6)
    assert math.isclose(float(clipped.norm()), 1.0, rel_tol=1e-6)


def test_clip_gradient_norms_is_per_tensor_not_global():
    # [3, 4] has norm 5 -> [0.6, 0.8]; [0.3, 0.4] has norm 0.5 <= 1 and stays as it is.
    # (A global-norm clip would scale both by 1 / sqrt(25 + 0.25).)
    big, small = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    out = slim.learning.clip_gradient_norms([(big, torch.zeros(2)), (small, torch.zeros(2))], 1.0)
    np.testing.assert_allclose(out[0][0].numpy(), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out[1][0].numpy(), [0.3, 0.4], rtol=1e-6)


def test_clip_gradient_norms_leaves_a_zero_gradient_finite():
    [(grad, _)] = slim.learning.clip_gradient_norms([(torch.zeros(3), torch.zeros(3))], 1.0)
    np.testing.assert_array_equal(grad.numpy(), [0.0, 0.0, 0.0])  # 0 / 0 must not become NaN


def test_clip_gradient_norms_passes_a_none_gradient_through():
    var = torch.zeros(3)
    [(grad, same_var)] = slim.learning.clip_gradient_norms([(None, var)], 1.0)
    assert grad is None and same_var is var


@pytest.mark.parametrize("max_norm", [0, -1.0, "1", True])
def test_clip_gradient_norms_rejects_a_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        slim.learning.clip_gradient_norms([(torch.ones(2), torch.zeros(2))], max_norm)


def test_create_train_op_clips_each_gradient_to_clip_gradient_norm():
    net = KnownGradient(c=[3.0, 4.0], c2=[0.3, 0.4])
    op = slim.learning.create_train_op(net, torch.optim.SGD(net.parameters(), lr=1.0), clip_gradient_norm=1.0)
    op()
    # Applied gradients: [3, 4] clipped to [0.6, 0.8]; [0.3, 0.4] unchanged (per tensor).
    np.testing.assert_allclose(net.w.detach().numpy(), [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(net.w2.detach().numpy(), [-0.3, -0.4], rtol=1e-6)


def test_create_train_op_rejects_a_negative_clip_gradient_norm():
    net = KnownGradient(c=GRAD)
    with pytest.raises(ValueError, match="clip_gradient_norm"):
        slim.learning.create_train_op(net, torch.optim.SGD(net.parameters(), lr=1.0), clip_gradient_norm=-1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"total_loss": torch.tensor(1.0)}, "total_loss"),  # a TF user's loss tensor: not a callable
        ({"optimizer": "sgd"}, "optimizer"),
        ({"gate_gradients": 1}, "gate_gradients"),
        ({"aggregation_method": "ADD_N"}, "aggregation_method"),
        ({"colocate_gradients_with_ops": True}, "colocate_gradients_with_ops"),
        ({"global_step": 3}, "global_step"),
        ({"update_ops": "bn"}, "update_ops"),
        ({"update_ops": [1]}, "update_ops"),
    ],
)
def test_create_train_op_rejects_bad_arguments(kwargs, name):
    net = KnownGradient(c=GRAD)
    args = {"total_loss": net, "optimizer": torch.optim.SGD(net.parameters(), lr=1.0), **kwargs}
    with pytest.raises(ValueError, match=name):
        slim.learning.create_train_op(**args)


# --------------------------------------------------------------------------- multiply_gradients

MULTIPLIER = 3.7


def test_multiply_gradients_rejects_grads_and_vars_that_are_not_a_list():
    var = torch.zeros(3)
    with pytest.raises(ValueError, match="grads_and_vars"):
        slim.learning.multiply_gradients((torch.tensor(GRAD), var), {var: MULTIPLIER})


def test_multiply_gradients_rejects_empty_multipliers():
    with pytest.raises(ValueError, match="gradient_multipliers"):
        slim.learning.multiply_gradients([(torch.tensor(GRAD), torch.zeros(3))], {})


def test_multiply_gradients_rejects_multipliers_that_are_not_a_dict():
    with pytest.raises(ValueError, match="gradient_multipliers"):
        slim.learning.multiply_gradients([(torch.tensor(GRAD), torch.zeros(3))], 3)


def test_multiply_gradients_rejects_a_multiplier_for_a_none_gradient():
    var = torch.zeros(3)
    with pytest.raises(ValueError, match="None"):
        slim.learning.multiply_gradients([(None, var)], {var: MULTIPLIER})


def test_multiply_gradients_by_parameter():
    grad, var = torch.tensor(GRAD), torch.zeros(3)
    other_grad, other_var = torch.tensor(GRAD), torch.zeros(3)
    out = slim.learning.multiply_gradients([(grad, var), (other_grad, other_var)], {var: MULTIPLIER})
    assert out[0][1] is var
    np.testing.assert_allclose(out[0][0].numpy(), [3.7, 7.4, 11.1], rtol=1e-6)
    np.testing.assert_allclose(out[1][0].numpy(), GRAD)  # not named: untouched


def test_multiply_gradients_by_name():
    var = nn.Parameter(torch.zeros(3))
    out = slim.learning.multiply_gradients([(torch.tensor(GRAD), var)], {"layer.w": MULTIPLIER}, names={"layer.w": var})
    np.testing.assert_allclose(out[0][0].numpy(), [3.7, 7.4, 11.1], rtol=1e-6)
    with pytest.raises(ValueError, match="nope"):
        slim.learning.multiply_gradients([(torch.tensor(GRAD), var)], {"nope": 2.0}, names={"layer.w": var})


def test_multiply_gradients_by_a_tensor_multiplier():
    var = torch.zeros(3)
    out = slim.learning.multiply_gradients([(torch.tensor(GRAD), var)], {var: torch.tensor(MULTIPLIER)})
    np.testing.assert_allclose(out[0][0].numpy(), [3.7, 7.4, 11.1], rtol=1e-6)


def test_tensor_multiplier_in_create_train_op_is_read_at_every_step():
    # TF's flag-driven multiplier: a tensor changed in place between steps takes effect at the next step.
    net = KnownGradient(c=GRAD)
    multiplier = torch.tensor(MULTIPLIER)
    op = slim.learning.create_train_op(
        net, torch.optim.SGD(net.parameters(), lr=1.0), gradient_multipliers={net.w: multiplier}
    )
    op()
    np.testing.assert_allclose(net.w.detach().numpy(), [-3.7, -7.4, -11.1], rtol=1e-6)
    multiplier.fill_(1.0)
    op()  # w -= 1 * c
    np.testing.assert_allclose(net.w.detach().numpy(), [-4.7, -9.4, -14.1], rtol=1e-6)


@pytest.mark.parametrize(
    "multiplier, applied",
    [
        # 0.1 * [1, 2, 3] has norm 0.374 < 1: no clipping. (Clip first, then multiply: [0.0267, 0.0535, 0.0802].)
        (0.1, [0.1, 0.2, 0.3]),
        # 10 * [1, 2, 3] has norm 37.4 -> clipped to [1, 2, 3] / sqrt(14). (Clip first: 10x that.)
        (10.0, GRAD_CLIPPED_TO_1),
    ],
)
def test_gradient_multipliers_apply_before_clipping(multiplier, applied):
    net = KnownGradient(c=GRAD)
    op = slim.learning.create_train_op(
        net, torch.optim.SGD(net.parameters(), lr=1.0), clip_gradient_norm=1.0, gradient_multipliers={"w": multiplier}
    )
    op()
    np.testing.assert_allclose(-net.w.detach().numpy(), applied, rtol=1e-5)


def test_create_train_op_multiplier_for_a_parameter_without_gradient_raises():
    net = KnownGradient(c=GRAD, unused=True)
    op = slim.learning.create_train_op(
        net, torch.optim.SGD(net.parameters(), lr=1.0), gradient_multipliers={"unused": 2.0}
    )
    before = params_of(net)
    with pytest.raises(ValueError, match="None.*unused"):
        op()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("bad", [{}, 3, {"not_a_parameter": 2.0}, {"w": "x"}])
def test_create_train_op_rejects_bad_gradient_multipliers(bad):
    net = KnownGradient(c=GRAD)
    with pytest.raises(ValueError, match="gradient_multipliers"):
        slim.learning.create_train_op(net, torch.optim.SGD(net.parameters(), lr=1.0), gradient_multipliers=bad)


# --------------------------------------------------------------------------- update ops


@pytest.fixture
def own_registry():
    """A private collections registry for tests that build a slim batch_norm.

    Clearing a registry that holds the last reference to a batch_norm (here:
    the TRAIN_OP entry -> total_loss -> model) deadlocks, see
    test_reset_after_a_batch_norm_train_op_does_not_hang; conftest's reset
    of the global registry would hang these tests. A private registry is
    never cleared.
    """
    with slim.collections.Registry().as_default() as registry:
        yield registry


def batch_norm_train_op(data=uniform_data, **kwargs):
    model = BatchNormClassifier()
    x, y = data()
    op = slim.learning.create_train_op(
        logistic_loss(model, x, y), torch.optim.SGD(model.parameters(), lr=1.0), **kwargs
    )
    return model, op, x


def test_update_ops_default_to_the_collection_and_update_moving_statistics(caplog, own_registry):
    caplog.set_level(logging.WARNING, logger="torchslim")
    model, op, x = batch_norm_train_op()
    bn = model.bn
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0] * 4)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [1.0] * 4)
    for _ in range(10):
        op()
    # decay 0.1 and the same batch at every step: after 10 updates the moving averages are
    # the batch mean and the unbiased (n/(n-1), fused) batch variance, up to 0.1**10.
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.numpy().mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.numpy().var(0, ddof=1), rtol=1e-5)
    assert "UPDATE_OPS" not in caplog.text


def test_empty_update_ops_leave_moving_statistics_at_their_initial_values(caplog, own_registry):
    caplog.set_level(logging.WARNING, logger="torchslim")
    model, op, _ = batch_norm_train_op(update_ops=[])
    weight_before = model.head.fc.weight.detach().clone()
    for _ in range(10):
        op()
    np.testing.assert_array_equal(model.bn.moving_mean.numpy(), [0.0] * 4)
    np.testing.assert_array_equal(model.bn.moving_variance.numpy(), [1.0] * 4)
    assert not torch.equal(model.head.fc.weight, weight_before)  # training itself went on
    # [] leaves out the batch norm's op of the UPDATE_OPS collection: TF-Slim warns about that.
    assert "does not contain all the update_ops in GraphKeys.UPDATE_OPS" in caplog.text


def test_update_ops_list_that_leaves_out_collection_ops_warns_and_runs_only_its_ops(caplog, own_registry):
    caplog.set_level(logging.WARNING, logger="torchslim")
    calls = []
    model, op, _ = batch_norm_train_op(update_ops=[lambda: calls.append(1)])
    for _ in range(3):
        op()
    assert len(calls) == 3
    np.testing.assert_array_equal(model.bn.moving_mean.numpy(), [0.0] * 4)
    assert "does not contain all the update_ops" in caplog.text


def test_update_ops_list_with_every_collection_op_does_not_warn(caplog, own_registry):
    caplog.set_level(logging.WARNING, logger="torchslim")
    model = BatchNormClassifier()
    x, y = uniform_data()
    op = slim.learning.create_train_op(
        logistic_loss(model, x, y), torch.optim.SGD(model.parameters(), lr=1.0), update_ops=[model.bn.update_op]
    )
    op()
    assert not caplog.records
    assert not torch.equal(model.bn.moving_mean, torch.zeros(4))


def test_batch_norm_classifier_trains_to_low_loss(tmp_path, own_registry):
    # TF-Slim's TrainBNClassifierTest: the logistic data set through batch norm.
    _, op, _ = batch_norm_train_op(data=logistic_data)
    loss = slim.learning.train(op, str(tmp_path), number_of_steps=300, log_every_n_steps=0, **NO_SUMMARIES)
    assert loss < 0.1


def _build_and_drop_a_batch_norm_train_op() -> None:
    model = BatchNormClassifier()
    x, y = uniform_data()
    op = slim.learning.create_train_op(logistic_loss(model, x, y), torch.optim.SGD(model.parameters(), lr=1.0))
    op()  # the registry's TRAIN_OP entry now holds the last reference to the model


def test_reset_after_a_batch_norm_train_op_does_not_hang():
    # Run in a thread with its own registry, so that a deadlock blocks only that thread's lock.
    done = threading.Event()

    def build_then_reset() -> None:
        with slim.collections.Registry().as_default():
            _build_and_drop_a_batch_norm_train_op()
            gc.collect()  # free create_train_op's leftover reference cycle now (see the next test)
            slim.collections.reset()
        done.set()

    threading.Thread(target=build_then_reset, daemon=True, name="bn-reset").start()
    assert done.wait(timeout=3.0), "slim.collections.reset() deadlocked in the batch_norm finalizer"


def test_dropping_the_train_op_frees_the_model_without_waiting_for_gc():
    x, y = logistic_data()
    gc.collect()
    gc.disable()
    try:
        model = LogisticClassifier()
        alive = weakref.ref(model)
        op = slim.learning.create_train_op(logistic_loss(model, x, y), torch.optim.SGD(model.parameters(), lr=1.0))
        op()
        del model, op
        slim.collections.clear_collection(slim.GraphKeys.TRAIN_OP)
        assert alive() is None, "the model outlived its train op (held by a reference cycle)"
    finally:
        gc.enable()


# --------------------------------------------------------------------------- global step and collections


def test_global_step_increments_by_one_per_step():
    _, op = logistic_train_op()
    gs = slim.learning.get_global_step()
    assert gs is op.global_step and int(gs) == 0
    for i in range(10):
        op()
        assert int(gs) == i + 1
    assert op.step == 10


def test_global_step_none_counts_nothing():
    _, op = logistic_train_op(global_step=None)
    for _ in range(10):
        op()
    assert op.global_step is None and op.step == 0
    assert int(slim.learning.get_or_create_global_step()) == 0


def test_train_refuses_number_of_steps_with_a_train_op_that_counts_no_steps():
    x, y = logistic_data()
    model = LogisticClassifier()
    calls = []

    def total_loss(batch):
        calls.append(1)
        return nn.functional.binary_cross_entropy(model(batch[0]), batch[1])

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=1.0), global_step=None)
    with pytest.raises(ValueError, match="global_step"):
        # finite data, so that the bug ends the loop after 20 steps instead of hanging
        slim.learning.train(op, None, data=[(x, y)] * 20, number_of_steps=5, log_every_n_steps=0)
    assert calls == []


def test_explicit_global_step_is_the_one_counted():
    gs = slim.learning.GlobalStep(5)
    _, op = logistic_train_op(global_step=gs)
    op()
    assert int(gs) == 6
    assert slim.learning.get_global_step() is None  # the registry's default was never created


def test_train_op_is_recorded_in_the_train_op_collection():
    _, op = logistic_train_op()
    assert op in slim.collections.get_collection(slim.GraphKeys.TRAIN_OP)


# --------------------------------------------------------------------------- training to low loss


def test_train_without_logdir_reaches_near_zero_loss():
    record: list[float] = []
    _, op = logistic_train_op(record=record)
    loss = slim.learning.train(op, None, number_of_steps=300, log_every_n_steps=10)
    assert isinstance(loss, float)
    assert loss < 0.015
    assert len(record) == 300 and loss == record[-1]  # train returns the last step's loss
    assert op.step == 300


def test_train_with_logdir_reaches_near_zero_loss_and_saves_a_final_checkpoint(tmp_path):
    _, op = logistic_train_op()
    loss = slim.learning.train(op, str(tmp_path), number_of_steps=300, log_every_n_steps=10, **NO_SUMMARIES)
    assert loss < 0.015
    latest = slim.checkpoint.latest_checkpoint(str(tmp_path))
    assert os.path.basename(latest) == "model.ckpt-300.pt"


def test_train_with_batches_passes_each_batch_to_total_loss():
    model = LogisticClassifier()
    x, y = logistic_data()
    seen = []

    def total_loss(batch):
        bx, by = batch
        seen.append(bx.shape[0])
        slim.losses.log_loss(model(bx), by)
        return slim.losses.get_total_loss()

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=1.0))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])] * 150
    loss = slim.learning.train(op, None, data=batches, log_every_n_steps=0)
    assert seen[:2] == [8, 8] and len(seen) == 300
    assert loss < 0.02


def test_train_op_without_data_takes_no_batch():
    model = LogisticClassifier()
    x, y = logistic_data()
    calls = []

    def total_loss():  # no batch argument: the data lives in the closure
        calls.append(1)
        return nn.functional.binary_cross_entropy(model(x), y)

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=1.0))
    assert op.model is model  # found through the closure, so it can be checkpointed
    first = float(op())
    loss = slim.learning.train(op, None, data=None, number_of_steps=50, log_every_n_steps=0)
    assert len(calls) == 50 and op.step == 50
    assert loss < first


# --------------------------------------------------------------------------- resume and init_fn


def test_resume_continues_from_the_checkpoint_step_and_reaches_low_loss(tmp_path):
    logdir = str(tmp_path)
    record1: list[float] = []
    _, op = logistic_train_op(seed=0, record=record1)
    loss1 = slim.learning.train(op, logdir, number_of_steps=150, log_every_n_steps=0, **NO_SUMMARIES)
    assert len(record1) == 150

    for seed, (target, expected_calls) in enumerate([(300, 150), (301, 1), (305, 4)], start=1):
        slim.collections.reset()  # a new "graph": fresh model (other init), optimizer and train op
        record: list[float] = []
        _, op = logistic_train_op(seed=seed, record=record)
        loss = slim.learning.train(op, logdir, number_of_steps=target, log_every_n_steps=0, **NO_SUMMARIES)
        assert len(record) == expected_calls, "did not continue from the checkpoint's global step"
        assert op.step == target
        assert loss < 0.015
        if target == 300:
            # The first resumed step sees the restored weights, not the fresh initialisation.
            assert record[0] <= loss1 + 1e-6
    assert os.path.basename(slim.checkpoint.latest_checkpoint(logdir)) == "model.ckpt-305.pt"


def test_train_at_its_number_of_steps_already_takes_no_step_and_returns_none(tmp_path):
    _, op = logistic_train_op()
    slim.learning.train(op, str(tmp_path), number_of_steps=5, log_every_n_steps=0, **NO_SUMMARIES)
    slim.collections.reset()
    record: list[float] = []
    _, op = logistic_train_op(seed=1, record=record)
    assert slim.learning.train(op, str(tmp_path), number_of_steps=5, **NO_SUMMARIES) is None
    assert record == [] and op.step == 5


def test_init_from_checkpoint_starts_from_the_trained_loss(tmp_path):
    logdir1, logdir2 = str(tmp_path / "trained"), str(tmp_path / "fine_tuned")

    # One step from scratch: the loss is high.
    _, op = logistic_train_op(seed=0)
    assert slim.learning.train(op, str(tmp_path / "one_step"), number_of_steps=1, **NO_SUMMARIES) > 0.5

    # Train to convergence.
    slim.collections.reset()
    _, op = logistic_train_op(seed=1)
    assert slim.learning.train(op, logdir1, number_of_steps=300, log_every_n_steps=0, **NO_SUMMARIES) < 0.015
    model_path = os.path.join(logdir1, "model.ckpt-300.pt")
    assert os.path.isfile(model_path)

    # A new model, initialised from that checkpoint in a fresh logdir: its first step's loss is already low.
    slim.collections.reset()
    model, op = logistic_train_op(seed=2)
    init_fn = slim.variables.assign_from_checkpoint_fn(model_path, slim.variables.get_variables_to_restore(model))
    loss = slim.learning.train(op, logdir2, number_of_steps=1, init_fn=init_fn, **NO_SUMMARIES)
    assert loss < 0.015
    assert op.step == 1  # global step is not restored by init_fn: training starts at 0 here


def test_init_fn_is_called_on_a_fresh_start_only(tmp_path):
    logdir = str(tmp_path)
    calls = []
    _, op = logistic_train_op()
    slim.learning.train(op, logdir, number_of_steps=3, init_fn=lambda: calls.append("init"), **NO_SUMMARIES)
    assert calls == ["init"]

    slim.collections.reset()
    _, op = logistic_train_op(seed=1)
    slim.learning.train(op, logdir, number_of_steps=5, init_fn=lambda: calls.append("init again"), **NO_SUMMARIES)
    assert calls == ["init"]  # restored from model.ckpt-3.pt: init_fn not called
    assert op.step == 5


def test_init_fn_runs_before_the_first_step(tmp_path):
    model = LogisticClassifier()
    x, y = logistic_data()
    seen = []

    def total_loss():
        seen.append(float(model.fc.bias.detach()))
        slim.losses.log_loss(model(x), y)
        return slim.losses.get_total_loss()

    def init_fn():
        with torch.no_grad():
            model.fc.bias.fill_(42.0)

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.0))
    slim.learning.train(op, str(tmp_path), number_of_steps=1, init_fn=init_fn, **NO_SUMMARIES)
    assert seen == [42.0]


# --------------------------------------------------------------------------- subsets of variables


def test_training_all_variables_reaches_a_lower_loss_than_training_a_subset(tmp_path):
    # TF-Slim's sequence in one logdir: weights only to step 200, then biases only to 300
    # (neither gets under .015), then everything to 400 (under .015). Each phase resumes the last.
    logdir = str(tmp_path)
    frozen_name = {"weight": "fc.bias", "bias": "fc.weight"}
    for seed, (train_only, steps) in enumerate([("weight", 200), ("bias", 300), (None, 400)]):
        slim.collections.reset()
        before = slim.checkpoint.latest_checkpoint(logdir)
        _, op = logistic_train_op(seed=seed, train_only=train_only)
        loss = slim.learning.train(op, logdir, number_of_steps=steps, log_every_n_steps=0, **NO_SUMMARIES)
        if train_only is None:
            assert loss < 0.015
        else:
            assert 0.015 < loss < 0.05
        if before is not None and train_only is not None:
            old = slim.checkpoint.load_checkpoint(before)["model"]
            new = slim.checkpoint.load_checkpoint(slim.checkpoint.latest_checkpoint(logdir))["model"]
            name = frozen_name[train_only]
            assert torch.equal(old[name], new[name]), f"{name} changed while training only {train_only}"

    # From scratch, a bias alone cannot fit the data; all variables can.
    slim.collections.reset()
    model, op = logistic_train_op(seed=0, train_only="bias")
    weight0 = model.fc.weight.detach().clone()
    bias_only = slim.learning.train(op, None, number_of_steps=200, log_every_n_steps=0)
    assert torch.equal(model.fc.weight, weight0)
    slim.collections.reset()
    _, op = logistic_train_op(seed=0)
    assert slim.learning.train(op, None, number_of_steps=200, log_every_n_steps=0) < bias_only / 10


def test_training_subsets_of_variables_only_updates_those_variables():
    model = LogisticClassifier()
    x, y = logistic_data()
    loss_fn = logistic_loss(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    weights, biases = model.fc.weight, model.fc.bias
    train_all = slim.learning.create_train_op(loss_fn, optimizer)
    train_weights = slim.learning.create_train_op(loss_fn, optimizer, variables_to_train=[weights])
    train_biases = slim.learning.create_train_op(loss_fn, optimizer, variables_to_train={"fc.bias": biases})

    w, b = weights.detach().clone(), biases.detach().clone()
    assert w.norm() > 0 and b.norm() == 0
    assert float(train_all()) > 0.5
    assert not torch.equal(weights, w) and not torch.equal(biases, b)

    w, b = weights.detach().clone(), biases.detach().clone()
    assert float(train_weights()) > 0.5
    assert not torch.equal(weights, w) and torch.equal(biases, b)

    w, b = weights.detach().clone(), biases.detach().clone()
    assert float(train_biases()) > 0.45
    assert torch.equal(weights, w) and not torch.equal(biases, b)


def test_variables_to_train_outside_the_optimizer_is_refused():
    model = LogisticClassifier()
    x, y = logistic_data()
    optimizer = torch.optim.SGD([model.fc.weight], lr=1.0)
    with pytest.raises(ValueError, match="variables_to_train"):
        slim.learning.create_train_op(logistic_loss(model, x, y), optimizer, variables_to_train=[model.fc.bias])
    with pytest.raises(ValueError, match="variables_to_train"):
        slim.learning.create_train_op(logistic_loss(model, x, y), optimizer, variables_to_train=[])


# --------------------------------------------------------------------------- altered gradients


def test_zero_gradient_multipliers_leave_the_weights_unchanged():
    model, op = logistic_train_op(gradient_multiplier=0.0)
    before = params_of(model)
    slim.learning.train(op, None, number_of_steps=5, log_every_n_steps=0)
    assert op.step == 5
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_larger_gradient_multipliers_train_faster():
    # Same learning rate 0.001; multiplier 1000 is an effective learning rate of 1.
    _, op = logistic_train_op(seed=0, lr=0.001, gradient_multiplier=1.0)
    slow = slim.learning.train(op, None, number_of_steps=10, log_every_n_steps=0)
    slim.collections.reset()
    _, op = logistic_train_op(seed=0, lr=0.001, gradient_multiplier=1000.0)
    fast = slim.learning.train(op, None, number_of_steps=10, log_every_n_steps=0)
    assert slow > 0.5 and fast < 0.5 and slow > fast


# --------------------------------------------------------------------------- data limits


def test_training_ends_when_the_data_runs_out_and_saves_a_final_checkpoint(tmp_path):
    model = LogisticClassifier()
    x, y = logistic_data()

    op = slim.learning.create_train_op(batch_log_loss(model), torch.optim.SGD(model.parameters(), lr=1.0))
    data = [(x, y)] * 7
    loss = slim.learning.train(op, str(tmp_path), data=data, log_every_n_steps=0, **NO_SUMMARIES)
    assert loss is not None and op.step == 7
    assert os.path.basename(slim.checkpoint.latest_checkpoint(str(tmp_path))) == "model.ckpt-7.pt"


def test_epoch_limit_of_repeated_data_trains_to_low_loss(tmp_path):
    # TF's limit_epochs(num_epochs=300) on the whole set: 300 steps, then a final model.ckpt-300.
    model = LogisticClassifier()
    x, y = logistic_data()

    op = slim.learning.create_train_op(batch_log_loss(model), torch.optim.SGD(model.parameters(), lr=1.0))
    loss = slim.learning.train(
        op, str(tmp_path), data=slim.data.repeat([(x, y)], num_epochs=300), log_every_n_steps=10, **NO_SUMMARIES
    )
    assert loss < 0.015 and op.step == 300
    assert os.path.basename(slim.checkpoint.latest_checkpoint(str(tmp_path))) == "model.ckpt-300.pt"


def test_repeat_gives_num_epochs_times_len_steps_and_number_of_steps_stops_earlier():
    model = LogisticClassifier()
    x, y = logistic_data()
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]

    def total_loss(batch):
        return nn.functional.binary_cross_entropy(model(batch[0]), batch[1])

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=1.0))
    slim.learning.train(op, None, data=slim.data.repeat(batches, num_epochs=3), log_every_n_steps=0)
    assert op.step == 3 * len(batches)

    slim.collections.reset()
    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=1.0))
    slim.learning.train(op, None, data=slim.data.repeat(batches), number_of_steps=9, log_every_n_steps=0)
    assert op.step == 9


# --------------------------------------------------------------------------- argument errors


def _assert_no_files(path):
    assert not os.path.exists(path) or not os.listdir(path)


def test_train_op_none_raises():
    with pytest.raises(ValueError, match="train_op"):
        slim.learning.train(None, None, number_of_steps=10)


def test_summary_op_without_logdir_raises():
    _, op = logistic_train_op()
    summary_op = [slim.summaries.add_scalar_summary(torch.tensor(1.0), "total_loss")]
    with pytest.raises(ValueError, match="summary_op"):
        slim.learning.train(op, None, number_of_steps=300, summary_op=summary_op)
    assert op.step == 0


def test_saver_without_logdir_raises():
    _, op = logistic_train_op()
    with pytest.raises(ValueError, match="saver"):
        slim.learning.train(op, None, number_of_steps=300, saver=slim.checkpoint.Saver())
    assert op.step == 0


def test_trace_every_n_steps_without_logdir_raises():
    _, op = logistic_train_op()
    with pytest.raises(ValueError, match="trace_every_n_steps"):
        slim.learning.train(op, None, number_of_steps=300, trace_every_n_steps=10)
    assert op.step == 0


@pytest.mark.parametrize("number_of_steps", [0, -1, 2.5, True])
def test_number_of_steps_must_be_positive(tmp_path, number_of_steps):
    _, op = logistic_train_op()
    logdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="number_of_steps"):
        slim.learning.train(op, logdir, number_of_steps=number_of_steps, **NO_SUMMARIES)
    _assert_no_files(logdir)
    assert op.step == 0


def test_sync_optimizer_with_startup_delay_steps_raises(tmp_path):
    _, op = logistic_train_op()
    logdir = str(tmp_path / "run")
    sync = slim.SyncReplicasOptimizer(op.optimizer, replicas_to_aggregate=1)
    with pytest.raises(ValueError, match="startup_delay_steps"):
        slim.learning.train(op, logdir, number_of_steps=10, sync_optimizer=sync, startup_delay_steps=5)
    _assert_no_files(logdir)


@pytest.mark.parametrize(
    "arg, value",
    [("graph", object()), ("session_config", object()), ("init_feed_dict", {}), ("session_wrapper", object())],
)
def test_graph_and_session_arguments_are_refused(arg, value):
    _, op = logistic_train_op()
    with pytest.raises(ValueError, match=arg):
        slim.learning.train(op, None, number_of_steps=1, **{arg: value})


# --------------------------------------------------------------------------- check_numerics


def _nan_at_step(model, x, y, bad_step, snapshots):
    calls = []

    def total_loss():
        calls.append(1)
        snapshots[len(calls)] = params_of(model)  # the weights this step starts from
        slim.losses.log_loss(model(x), y)
        loss = slim.losses.get_total_loss()
        return loss * float("nan") if len(calls) == bad_step else loss

    return total_loss


def test_nan_loss_raises_naming_the_loss_and_step_and_leaves_the_weights():
    model = LogisticClassifier()
    x, y = logistic_data()
    snapshots: dict[int, dict] = {}
    op = slim.learning.create_train_op(
        _nan_at_step(model, x, y, 5, snapshots), torch.optim.SGD(model.parameters(), lr=1.0)
    )
    op.sync_numerics = True  # read before every update (the deferred default is tested in test_train_op)
    with pytest.raises(NumericsError, match=r"step 5: the loss '.*total_loss' is nan") as info:
        slim.learning.train(op, None, number_of_steps=10, log_every_n_steps=0)
    assert isinstance(info.value, FloatingPointError)
    assert op.step == 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[5][name]), name
    assert not torch.equal(snapshots[5]["fc.weight"], snapshots[1]["fc.weight"])  # it did train before


def test_inf_gradient_raises_naming_the_parameter():
    model = LogisticClassifier()
    x, y = logistic_data()
    calls = []

    def total_loss():
        calls.append(1)
        weight = model.fc.weight
        if len(calls) == 3:  # a finite loss whose weight gradient overflows to +Inf
            weight = weight * 1.0
            weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        pred = torch.sigmoid(x @ weight.t() + model.fc.bias)
        return nn.functional.binary_cross_entropy(pred, y)

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=1.0))
    op.sync_numerics = True
    with pytest.raises(NumericsError, match=r"step 3: the gradient of parameter 'fc\.weight' has Inf"):
        slim.learning.train(op, None, number_of_steps=10, log_every_n_steps=0)
    assert op.step == 2 and torch.isfinite(model.fc.weight).all()


def test_no_checkpoint_is_written_from_the_bad_state(tmp_path):
    model = LogisticClassifier()
    x, y = logistic_data()
    snapshots: dict[int, dict] = {}
    op = slim.learning.create_train_op(
        _nan_at_step(model, x, y, 5, snapshots), torch.optim.SGD(model.parameters(), lr=1.0)
    )
    logdir = str(tmp_path)
    with pytest.raises(NumericsError):
        slim.learning.train(
            op, logdir, number_of_steps=10, save_interval_secs=None, save_interval_steps=2, **NO_SUMMARIES
        )
    steps = [slim.checkpoint.checkpoint_step(p) for p in slim.checkpoint.list_checkpoints(logdir)]
    assert steps and max(steps) == 4
    state = slim.checkpoint.load_checkpoint(slim.checkpoint.latest_checkpoint(logdir))
    assert state["global_step"] == 4
    for name, value in state["model"].items():
        assert torch.isfinite(value).all()
        assert torch.equal(value, snapshots[5][name])  # step 4's weights, the last good state


def test_check_numerics_false_lets_a_nan_through():
    model = LogisticClassifier()
    x, y = logistic_data()
    op = slim.learning.create_train_op(
        _nan_at_step(model, x, y, 2, {}), torch.optim.SGD(model.parameters(), lr=1.0), check_numerics=False
    )
    slim.learning.train(op, None, number_of_steps=3, log_every_n_steps=0)
    assert op.step == 3 and torch.isnan(model.fc.weight).all()


# --------------------------------------------------------------------------- logging, chief, train_step_fn

LOG_LINE = re.compile(r"^global step (\d+): loss = (\d+\.\d{4}) \((\d+\.\d{3}) sec/step\)$")


def test_log_every_n_steps_logs_even_steps_only(caplog):
    caplog.set_level(logging.INFO, logger="torchslim")
    record: list[float] = []
    _, op = logistic_train_op(record=record)
    slim.learning.train(op, None, number_of_steps=7, log_every_n_steps=2)
    lines = [LOG_LINE.match(r.getMessage()) for r in caplog.records if r.getMessage().startswith("global step")]
    assert all(lines), [r.getMessage() for r in caplog.records]
    assert [int(m.group(1)) for m in lines] == [2, 4, 6]
    assert [float(m.group(2)) for m in lines] == [round(record[i - 1], 4) for i in (2, 4, 6)]


def test_log_every_n_steps_zero_logs_no_step_line(caplog):
    caplog.set_level(logging.INFO, logger="torchslim")
    _, op = logistic_train_op()
    slim.learning.train(op, None, number_of_steps=3, log_every_n_steps=0)
    assert not [r for r in caplog.records if r.getMessage().startswith("global step")]


@pytest.mark.parametrize("is_chief", [False, True])
def test_only_the_chief_writes_files(tmp_path, is_chief):
    logdir = str(tmp_path / "run")
    _, op = logistic_train_op()
    loss = slim.learning.train(
        op, logdir, number_of_steps=5, is_chief=is_chief, save_interval_steps=1, save_summaries_steps=1,
        log_every_n_steps=0,
    )
    assert loss is not None and op.step == 5
    if is_chief:  # the same arguments write checkpoints and an event file
        names = os.listdir(logdir)
        assert "model.ckpt-5.pt" in names and any(n.startswith("events.out.tfevents") for n in names)
    else:
        _assert_no_files(logdir)


def test_custom_train_step_fn_can_stop_training():
    seen_kwargs = []

    def train_step_fn(train_op, batch, global_step, train_step_kwargs):
        seen_kwargs.append(dict(train_step_kwargs))
        total_loss, should_stop = slim.learning.train_step(train_op, batch, global_step, train_step_kwargs)
        return total_loss, should_stop or float(total_loss) < 0.1

    record: list[float] = []
    _, op = logistic_train_op(record=record)
    loss = slim.learning.train(
        op, None, train_step_fn=train_step_fn, train_step_kwargs={"tag": "mine"}, number_of_steps=1000,
        log_every_n_steps=0,
    )
    assert loss < 0.1 <= record[-2]  # stopped at the first step under the threshold
    assert op.step == len(record) < 1000
    assert seen_kwargs[0]["tag"] == "mine" and seen_kwargs[0]["number_of_steps"] == 1000


@pytest.mark.parametrize("step_kwargs", [{}, {"log_every_n_steps": 3}, {"number_of_steps": 4}])
def test_the_inlined_default_train_step_logs_and_stops_as_train_step_called(caplog, step_kwargs):
    # train() runs its default train_step inline; a wrapper around the same train_step takes the called path.
    caplog.set_level(logging.INFO, logger="torchslim")
    runs = []
    for step_fn in (slim.learning.train_step, lambda *args: slim.learning.train_step(*args)):
        caplog.clear()
        slim.collections.reset()
        record: list[float] = []
        _, op = logistic_train_op(record=record)
        loss = slim.learning.train(op, None, train_step_fn=step_fn, train_step_kwargs=dict(step_kwargs),
                                   number_of_steps=9, log_every_n_steps=2)
        logged = [LOG_LINE.match(r.getMessage()) for r in caplog.records if r.getMessage().startswith("global step")]
        runs.append((op.step, loss, [(int(m.group(1)), m.group(2)) for m in logged]))
    assert runs[0] == runs[1]
    steps, _, logged = runs[0]
    assert steps == step_kwargs.get("number_of_steps", 9)
    assert [s for s, _ in logged] == list(range(step_kwargs.get("log_every_n_steps", 2), steps + 1,
                                               step_kwargs.get("log_every_n_steps", 2)))


def test_train_step_reports_should_stop_at_number_of_steps():
    model = LogisticClassifier()
    batch = logistic_data()

    def total_loss(batch):
        return nn.functional.binary_cross_entropy(model(batch[0]), batch[1])

    op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=1.0))
    kwargs = {"number_of_steps": 2, "log_every_n_steps": 0}
    first = slim.learning.train_step(op, batch, op.global_step, kwargs)
    second = slim.learning.train_step(op, batch, op.global_step, kwargs)
    assert first[1] is False and second[1] is True
    assert float(second[0]) < float(first[0]) and op.step == 2


def test_trace_every_n_steps_writes_chrome_traces(tmp_path):
    _, op = logistic_train_op()
    slim.learning.train(op, str(tmp_path), number_of_steps=4, trace_every_n_steps=2, log_every_n_steps=0,
                        **NO_SUMMARIES)
    # TF-Slim's steps: those starting at global step 0 and 2 (of 4), named by that step
    assert os.path.isfile(slim.summaries.trace_file(str(tmp_path), 0))
    assert os.path.isfile(slim.summaries.trace_file(str(tmp_path), 2))
    assert not os.path.exists(slim.summaries.trace_file(str(tmp_path), 1))
    assert not os.path.exists(slim.summaries.trace_file(str(tmp_path), 4))
