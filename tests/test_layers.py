"""Tests for torchslim.layers: regularizers (TF's regularizers_test) and batch_norm (layers_test)."""
from __future__ import annotations

import copy
import gc
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from torchslim import collections, layers, losses
from torchslim.collections import GraphKeys


def update_ops():
    return collections.get_collection(GraphKeys.UPDATE_OPS)


def run_update_ops():
    for op in update_ops():
        op()


# ------------------------------------------------------------ regularizers
VALUES = torch.tensor([1.0, -1.0, 4.0, 2.0])


class TestRegularizers:
    def test_l1(self):
        # 0.5 * (1 + 1 + 4 + 2)
        assert layers.l1_regularizer(0.5)(VALUES).item() == pytest.approx(4.0)

    def test_l2(self):
        # 0.42 * (1 + 1 + 16 + 4) / 2
        assert layers.l2_regularizer(0.42)(VALUES).item() == pytest.approx(0.42 * 11)

    def test_l1_l2(self):
        # 1.0 * 8 + 2.0 * 22 / 2
        assert layers.l1_l2_regularizer(1.0, 2.0)(VALUES).item() == pytest.approx(30.0)

    def test_l1_l2_with_a_zero_scale_is_the_other(self):
        assert layers.l1_l2_regularizer(0.0, 2.0)(VALUES).item() == pytest.approx(22.0)
        assert layers.l1_l2_regularizer(0.5, 0.0)(VALUES).item() == pytest.approx(4.0)

    @pytest.mark.parametrize("make", [layers.l1_regularizer, layers.l2_regularizer])
    def test_scale_checks(self, make):
        with pytest.raises(ValueError, match="cannot be an integer"):
            make(2)
        with pytest.raises(ValueError, match="less than 0"):
            make(-0.5)
        assert make(0.0)(VALUES) is None
        assert make(torch.tensor(0.5))(VALUES).item() > 0

    def test_l1_l2_integer_scales(self):
        with pytest.raises(ValueError, match="scale_l1"):
            layers.l1_l2_regularizer(1, 1.0)
        with pytest.raises(ValueError, match="scale_l2"):
            layers.l1_l2_regularizer(1.0, 1)

    def test_sum_regularizer(self):
        assert layers.sum_regularizer([None, None]) is None
        reg = layers.sum_regularizer([layers.l1_regularizer(0.5), None, layers.l2_regularizer(0.42)])
        assert reg(VALUES).item() == pytest.approx(4.0 + 0.42 * 11)
        assert layers.sum_regularizer([layers.l1_regularizer(0.0)])(VALUES) is None


class TestApplyRegularization:
    def test_sum_and_registration(self):
        w1, w2 = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([[3.0]]))
        value = layers.apply_regularization(layers.l1_regularizer(0.5), [w1, w2])
        assert value.item() == pytest.approx(3.0)  # 0.5 * (1 + 2 + 3)
        entries = collections.get_collection(GraphKeys.REGULARIZATION_LOSSES)
        assert len(entries) == 1 and isinstance(entries[0], layers.RegularizationPenalty)
        assert [v.item() for v in losses.get_regularization_losses()] == [pytest.approx(3.0)]

    def test_evaluated_on_current_value_and_differentiable(self):
        w = nn.Parameter(torch.tensor([1.0, -3.0]))
        layers.apply_regularization(layers.l2_regularizer(0.1), [w])
        opt = torch.optim.SGD([w], lr=1.0)
        for step in range(3):
            with collections.step_scope():
                opt.zero_grad()
                total = losses.get_total_loss()
                # 0.1 * |w|^2 / 2 with w shrinking by (1 - 0.1) each step
                assert total.item() == pytest.approx(0.05 * 10 * 0.81**step, rel=1e-5)
                total.backward()
                np.testing.assert_allclose(w.grad.numpy(), (0.1 * w.detach()).numpy(), rtol=1e-6)
                opt.step()
        np.testing.assert_allclose(w.detach().numpy(), np.array([1.0, -3.0]) * 0.9**3, rtol=1e-5)

    def test_none_penalties_count_as_zero(self):
        value = layers.apply_regularization(layers.l2_regularizer(0.0), [nn.Parameter(torch.ones(2))])
        assert value.item() == 0.0

    def test_errors(self):
        with pytest.raises(ValueError, match="No weights to regularize"):
            layers.apply_regularization(layers.l2_regularizer(0.1), [])
        with pytest.raises(ValueError, match="scalar"):
            layers.apply_regularization(lambda w: w * 2, [nn.Parameter(torch.ones(3))])
        with pytest.raises(TypeError, match="regularizer must be a callable"):
            layers.apply_regularization(0.1, [nn.Parameter(torch.ones(3))])
        with pytest.raises(ValueError, match="lazy parameter"):
            layers.regularize(nn.Sequential(nn.LazyLinear(2)), layers.l2_regularizer(0.1))
        with pytest.raises(TypeError, match=r"weights_list\[0\]"):
            layers.apply_regularization(layers.l2_regularizer(0.1), [[1.0]])
        assert collections.get_collection(GraphKeys.REGULARIZATION_LOSSES) == []

    def test_inside_a_step_lasts_one_step(self):
        w = nn.Parameter(torch.ones(2))
        with collections.step_scope():
            layers.apply_regularization(layers.l1_regularizer(1.0), [w])
            assert len(losses.get_regularization_losses()) == 1
        assert losses.get_regularization_losses() == []


class TestRegularize:
    def make(self):
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), layers.BatchNorm(2, scale=True), nn.Flatten(), nn.Linear(2, 3)
        )

    def test_default_takes_conv_and_linear_weights_only(self):
        net = self.make()
        layers.regularize(net, layers.l2_regularizer(1e-2))
        (entry,) = collections.get_collection(GraphKeys.REGULARIZATION_LOSSES)
        assert {id(w) for w in entry.weights} == {id(net[0].weight), id(net[4].weight)}
        expected = 1e-2 * (net[0].weight.square().sum() + net[4].weight.square().sum()) / 2
        assert losses.get_regularization_losses()[0].item() == pytest.approx(expected.item(), rel=1e-6)

    def test_include_and_exclude(self):
        net = self.make()
        layers.regularize(net, layers.l1_regularizer(1.0), include=["0\\.", "4\\."], exclude=[r".*bias"])
        (entry,) = collections.get_collection(GraphKeys.REGULARIZATION_LOSSES)
        assert {id(w) for w in entry.weights} == {id(net[0].weight), id(net[4].weight)}

    def test_nothing_selected(self):
        with pytest.raises(ValueError, match="No weights to regularize"):
            layers.regularize(nn.Sequential(nn.ReLU()), layers.l1_regularizer(1.0))
        with pytest.raises(TypeError, match="include must be a list"):
            layers.regularize(self.make(), layers.l1_regularizer(1.0), include="fc")


# -------------------------------------------------------------- batch norm
def batch(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3 + 2


def stats(x, channel_dim=1):
    dims = [d for d in range(x.dim()) if d != channel_dim]
    return x.mean(dims), x.var(dims, unbiased=True), x.var(dims, unbiased=False)


class TestBatchNorm:
    def test_alias_and_names(self):
        bn = layers.batch_norm(4, scale=True)
        assert isinstance(bn, layers.BatchNorm)
        assert list(bn.state_dict()) == ["beta", "gamma", "moving_mean", "moving_variance"]
        assert bn.decay == 0.999 and bn.epsilon == 0.001 and bn.center and layers.BatchNorm(4).gamma is None
        assert update_ops() == [bn.update_op]

    @pytest.mark.parametrize("shape", [(16, 3), (8, 3, 5), (4, 3, 4, 5)])
    def test_moving_stats_change_only_when_update_op_runs(self, shape):
        bn = layers.BatchNorm(3, decay=0.9)
        x = batch(*shape)
        bn(x)
        bn(x)
        assert torch.equal(bn.moving_mean, torch.zeros(3)) and torch.equal(bn.moving_variance, torch.ones(3))
        assert bn.has_pending_update
        assert bn.update_op() is True
        mean, var_unbiased, _ = stats(x)
        # TF's assign_moving_average: moving -= (moving - value) * (1 - decay)
        torch.testing.assert_close(bn.moving_mean, 0 - (0 - mean) * 0.1)
        torch.testing.assert_close(bn.moving_variance, 1 - (1 - var_unbiased) * 0.1)
        before = bn.moving_mean.clone()
        assert bn.update_op() is False  # nothing pending: a no-op
        assert torch.equal(bn.moving_mean, before)

    def test_empty_update_ops_freeze_moving_stats(self):
        bn = layers.BatchNorm(3, decay=0.5)
        opt = torch.optim.SGD(bn.parameters(), lr=0.1)
        for seed in range(5):  # train steps with update_ops=[]: the ops are never called
            opt.zero_grad()
            bn(batch(8, 3, seed=seed)).square().mean().backward()
            opt.step()
        assert torch.equal(bn.moving_mean, torch.zeros(3)) and torch.equal(bn.moving_variance, torch.ones(3))
        assert not torch.equal(bn.beta.detach(), torch.zeros(3))  # the parameters did train

    def test_decay_math_over_several_steps(self):
        bn = layers.BatchNorm(2, decay=0.75)
        expected_mean, expected_var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        for seed in range(4):
            x = batch(10, 2, seed=seed)
            bn(x)
            run_update_ops()
            mean, var, _ = stats(x.double())
            expected_mean -= (expected_mean - mean) * 0.25
            expected_var -= (expected_var - var) * 0.25
        torch.testing.assert_close(bn.moving_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.moving_variance.double(), expected_var, rtol=1e-5, atol=1e-6)

    def test_last_forward_wins(self):
        bn = layers.BatchNorm(2, decay=0.0)
        bn(batch(6, 2, seed=1))
        x2 = batch(6, 2, seed=2)
        bn(x2)
        bn.update_op()
        torch.testing.assert_close(bn.moving_mean, stats(x2)[0])

    def test_training_output_uses_batch_statistics(self):
        bn = layers.BatchNorm(3, scale=True, epsilon=1e-3)
        with torch.no_grad():
            bn.gamma.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.beta.copy_(torch.tensor([0.0, -1.0, 3.0]))
        x = batch(6, 3, 4, 4)
        mean, _, var_biased = stats(x)
        expected = (x - mean[:, None, None]) / torch.sqrt(var_biased[:, None, None] + 1e-3)
        expected = expected * bn.gamma.detach()[:, None, None] + bn.beta.detach()[:, None, None]
        torch.testing.assert_close(bn(x), expected, rtol=1e-4, atol=1e-5)

    def test_eval_uses_moving_statistics(self):
        bn = layers.BatchNorm(3, epsilon=0.01)
        with torch.no_grad():
            bn.moving_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
            bn.moving_variance.copy_(torch.tensor([4.0, 1.0, 0.25]))
            bn.beta.fill_(0.5)
        bn.eval()
        x = batch(5, 3)
        expected = (x - bn.moving_mean) / torch.sqrt(bn.moving_variance + 0.01) + 0.5
        torch.testing.assert_close(bn(x), expected)
        assert not bn.has_pending_update

    def test_is_training_overrides_module_mode(self):
        frozen = layers.BatchNorm(2, is_training=False)
        frozen.train()
        x = batch(4, 2)
        torch.testing.assert_close(frozen(x), x / torch.sqrt(torch.tensor(1.001)))
        assert not frozen.has_pending_update
        always = layers.BatchNorm(2, is_training=True).eval()
        always(x)
        assert always.has_pending_update

    def test_updates_collections_none_updates_in_place(self):
        bn = layers.BatchNorm(3, decay=0.9, updates_collections=None)
        assert bn.update_op is None and update_ops() == []
        x = batch(8, 3)
        bn(x)
        mean, var, _ = stats(x)
        torch.testing.assert_close(bn.moving_mean, mean * 0.1)
        torch.testing.assert_close(bn.moving_variance, 1 - (1 - var) * 0.1)

    def test_custom_updates_collections(self):
        bn = layers.BatchNorm(3, updates_collections=["my_updates", GraphKeys.UPDATE_OPS])
        assert collections.get_collection("my_updates") == [bn.update_op] == update_ops()

    def test_fused_false_uses_biased_variance(self):
        bn = layers.BatchNorm(3, decay=0.0, fused=False)
        x = batch(4, 3)
        bn(x)
        bn.update_op()
        torch.testing.assert_close(bn.moving_variance, stats(x)[2])

    def test_matches_torch_batchnorm(self):
        ours = layers.BatchNorm(4, decay=0.9, scale=True, epsilon=1e-5)
        ref = nn.BatchNorm2d(4, momentum=0.1, eps=1e-5)
        for seed in range(3):
            x = batch(5, 4, 3, 3, seed=seed)
            torch.testing.assert_close(ours(x), ref(x))
            run_update_ops()
            torch.testing.assert_close(ours.moving_mean, ref.running_mean)
            torch.testing.assert_close(ours.moving_variance, ref.running_var)
        ours.eval(), ref.eval()
        x = batch(2, 4, 3, 3, seed=9)
        torch.testing.assert_close(ours(x), ref(x))

    def test_nhwc(self):
        nchw = layers.BatchNorm(3, decay=0.5)
        nhwc = layers.BatchNorm(3, decay=0.5, data_format="NHWC")
        x = batch(2, 3, 4, 4)
        torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), nchw(x).permute(0, 2, 3, 1))
        run_update_ops()
        torch.testing.assert_close(nhwc.moving_mean, nchw.moving_mean)

    def test_gradients_reach_beta_and_gamma(self):
        bn = layers.BatchNorm(3, scale=True, activation_fn=torch.relu)
        out = bn(batch(6, 3))
        assert (out >= 0).all()
        out.sum().backward()
        assert bn.beta.grad is not None and bn.gamma.grad is not None
        assert bn.moving_mean.grad is None and not bn.moving_mean.requires_grad

    def test_trainable_false_and_initializers_and_regularizers(self):
        bn = layers.BatchNorm(
            2, scale=True, trainable=False,
            param_initializers={"gamma": 2.0, "moving_variance": nn.init.zeros_, "beta": torch.tensor([1.0, -1.0])},
            param_regularizers={"gamma": layers.l2_regularizer(0.5)},
        )
        assert not bn.gamma.requires_grad and not bn.beta.requires_grad
        assert bn.gamma.tolist() == [2.0, 2.0] and bn.beta.tolist() == [1.0, -1.0]
        assert bn.moving_variance.tolist() == [0.0, 0.0]
        assert [v.item() for v in losses.get_regularization_losses()] == [pytest.approx(2.0)]  # 0.5 * 8 / 2

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="num_features"):
            layers.BatchNorm(0)
        with pytest.raises(ValueError, match="decay"):
            layers.BatchNorm(3, decay=1.5)
        with pytest.raises(ValueError, match="epsilon"):
            layers.BatchNorm(3, epsilon=0)
        with pytest.raises(ValueError, match="data_format"):
            layers.BatchNorm(3, data_format="NWC")
        with pytest.raises(ValueError, match="param_initializers has unknown keys"):
            layers.BatchNorm(3, param_initializers={"weights": 1.0})
        with pytest.raises(ValueError, match="updates_collections"):
            layers.BatchNorm(3, updates_collections=[""])
        bn = layers.BatchNorm(3)
        with pytest.raises(ValueError, match="num_features=3"):
            bn(torch.randn(4, 5))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(torch.randn(1, 3))
        with pytest.raises(ValueError, match=r"shape \(N, C, ...\)"):
            bn(torch.randn(3))

    def test_update_op_is_dropped_with_its_layer(self):
        bn = layers.BatchNorm(3)
        op = bn.update_op
        bn(batch(4, 3))
        del bn
        gc.collect()
        assert update_ops() == []
        assert op() is False and op.module is None

    def test_copies_get_their_own_update_op(self):
        bn = layers.BatchNorm(3, decay=0.0)
        clone = copy.deepcopy(bn)
        restored = pickle.loads(pickle.dumps(bn))
        ops = update_ops()
        assert len(ops) == 3 and {op.module for op in ops} == {bn, clone, restored}
        x = batch(4, 3)
        clone(x)
        run_update_ops()
        torch.testing.assert_close(clone.moving_mean, stats(x)[0])
        assert torch.equal(bn.moving_mean, torch.zeros(3))

    def test_plain_torch_batchnorm_keeps_pytorch_behaviour(self):
        ref = nn.BatchNorm1d(3)
        ref(batch(4, 3))
        assert not torch.equal(ref.running_mean, torch.zeros(3))
        assert update_ops() == []


def test_train_loop_as_the_train_op_runs_it():
    """Per step: open a step scope, compute slim losses, optimizer step, then run UPDATE_OPS."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), layers.batch_norm(8, decay=0.5, scale=True), nn.ReLU(), nn.Linear(8, 1))
    layers.regularize(model, layers.l2_regularizer(1e-3))
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for _ in range(60):
        with collections.step_scope():
            model.train()
            opt.zero_grad()
            losses.mean_squared_error(model(x), y)
            total = losses.get_total_loss()
            assert len(losses.get_losses()) == 1  # this step's loss only
            total.backward()
            opt.step()
            run_update_ops()
        history.append(total.item())
    assert history[-1] < 0.1 * history[0]
    bn = model[1]
    with torch.no_grad():
        hidden = model[0](x)
    # after many updates with decay 0.5 the moving mean tracks the (slowly moving) batch mean
    torch.testing.assert_close(bn.moving_mean, hidden.mean(0), rtol=0.1, atol=0.1)
    model.eval()
    with torch.no_grad():
        eval_loss = losses.mean_squared_error(model(x), y, loss_collection=None).item()
    assert eval_loss < 0.2 * history[0]
