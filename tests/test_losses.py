"""Tests for torchslim.losses, ported from TF-Slim's loss_ops_test scenarios.

Expected values are hand-computed (the arithmetic is in the comments) or
come from numpy formulas independent of the implementation.
"""
from __future__ import annotations

import contextvars
import warnings

import numpy as np
import pytest
import torch

from torchslim import collections, layers, losses
from torchslim.collections import GraphKeys


@pytest.fixture(autouse=True)
def _in_step():
    """Losses are computed inside a train step, as slim.learning does."""
    with collections.step_scope():
        yield


def close(value, expected, places=3):
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert value == pytest.approx(expected, abs=10**-places), (value, expected)


# ---------------------------------------------------------------- absolute
PRED = torch.tensor([4, 8, 12, 8, 1, 3], dtype=torch.float32).reshape(2, 3)
LAB = torch.tensor([1, 9, 2, -5, -2, 6], dtype=torch.float32).reshape(2, 3)
# |diff| = [[3, 1, 10], [13, 3, 3]] -> sum 33, mean 5.5
# diff^2 = [[9, 1, 100], [169, 9, 9]] -> sum 297, mean 49.5


class TestAbsoluteDifference:
    def test_weights_none_raises(self):
        with pytest.raises(ValueError, match="weights"):
            losses.absolute_difference(PRED, PRED, weights=None)

    def test_all_correct(self):
        close(losses.absolute_difference(PRED, PRED), 0.0)

    def test_non_zero(self):
        close(losses.absolute_difference(PRED, LAB), 5.5)

    @pytest.mark.parametrize("w", [2.3, torch.tensor(2.3)])
    def test_scalar_weight(self, w):
        close(losses.absolute_difference(PRED, LAB, w), 5.5 * 2.3)

    @pytest.mark.parametrize("shape", [(2,), (2, 1)])
    def test_batch_weights(self, shape):
        # row sums 14 and 19; (1.2 * 14 + 0 * 19) / 3 present elements = 5.6
        w = torch.tensor([1.2, 0.0]).reshape(shape)
        close(losses.absolute_difference(PRED, LAB, w), 5.6)

    def test_element_weights(self):
        # 3*3 + 6*1 + 5*10 + 0*13 + 4*3 + 2*3 = 83, over 5 non-zero weights
        w = torch.tensor([3, 6, 5, 0, 4, 2], dtype=torch.float32).reshape(2, 3)
        close(losses.absolute_difference(PRED, LAB, w), 16.6)

    def test_element_weights_most_zero(self):
        w = torch.tensor([0, 0, 0, 0, 0, 2.0]).reshape(2, 3)
        close(losses.absolute_difference(PRED, LAB, w), 6.0)

    def test_all_zero_weights(self):
        close(losses.absolute_difference(PRED, LAB, torch.zeros(2, 3)), 0.0)
        close(losses.absolute_difference(PRED, LAB, 0.0), 0.0)

    def test_shape_mismatch_names_arguments(self):
        with pytest.raises(ValueError, match=r"predictions shape \[2, 3\].*labels shape \[3, 2\]"):
            losses.absolute_difference(PRED, LAB.reshape(3, 2))


class TestMeanSquaredError:
    def test_non_zero(self):
        close(losses.mean_squared_error(PRED, LAB), 49.5)

    @pytest.mark.parametrize("shape", [(2,), (2, 1)])
    def test_batch_weights(self, shape):
        # 1.2 * 110 + 3.4 * 187 = 767.8 over 6 elements
        close(losses.mean_squared_error(PRED, LAB, torch.tensor([1.2, 3.4]).reshape(shape)), 767.8 / 6)

    def test_element_weights(self):
        # 3*9 + 6*1 + 5*100 + 0 + 4*9 + 2*9 = 587, over 5
        w = torch.tensor([3, 6, 5, 0, 4, 2.0]).reshape(2, 3)
        close(losses.mean_squared_error(PRED, LAB, w), 587 / 5)

    def test_most_zero(self):
        close(losses.mean_squared_error(PRED, LAB, torch.tensor([0, 0, 0, 0, 0, 2.0]).reshape(2, 3)), 18.0)

    def test_integer_inputs_are_cast(self):
        close(losses.mean_squared_error(PRED.long(), LAB.long()), 49.5)

    def test_gradient_flows(self):
        p = PRED.clone().requires_grad_(True)
        losses.mean_squared_error(p, LAB).backward()
        np.testing.assert_allclose(p.grad.numpy(), (2 * (PRED - LAB) / 6).numpy(), rtol=1e-6)


# ---------------------------------------------------------------- softmax
LOGITS = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
RIGHT = torch.eye(3, dtype=torch.int64)
WRONG = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0]])


class TestSoftmaxCrossEntropy:
    def test_weights_none(self):
        with pytest.raises(ValueError):
            losses.softmax_cross_entropy(LOGITS, RIGHT, weights=None)

    def test_all_correct(self):
        close(losses.softmax_cross_entropy(LOGITS, RIGHT), 0.0)

    def test_all_wrong(self):
        # -log softmax = 10 + log(1 + 2e-10) ~ 10
        close(losses.softmax_cross_entropy(LOGITS, WRONG), 10.0)

    @pytest.mark.parametrize("w", [2.3, torch.tensor(2.3)])
    def test_scalar_weight(self, w):
        close(losses.softmax_cross_entropy(LOGITS, WRONG, w), 23.0)

    @pytest.mark.parametrize("shape", [(3,), (3, 1)])
    def test_batch_weights(self, shape):
        w = torch.tensor([1.2, 3.4, 5.6]).reshape(shape)
        close(losses.softmax_cross_entropy(LOGITS, WRONG, w), (1.2 + 3.4 + 5.6) * 10 / 3)

    def test_all_weights_missing(self):
        close(losses.softmax_cross_entropy(LOGITS, WRONG, torch.zeros(3)), 0.0)

    def test_some_weights_missing(self):
        close(losses.softmax_cross_entropy(LOGITS, WRONG, torch.tensor([1.2, 0, 0])), 12.0)

    def test_measurement_specific_weights_raise(self):
        w = torch.tensor([[3, 4, 5], [2, 6, 0], [8, 0, 1.0]])
        with pytest.raises(ValueError, match="weights shape"):
            losses.softmax_cross_entropy(LOGITS, RIGHT, weights=w)

    def test_label_smoothing(self):
        # log softmax of [100, -100, -100] = [0, -200, -200]; smoothed labels
        # [1 - L + L/3, L/3, L/3] -> loss = 400 * L / 3
        loss = losses.softmax_cross_entropy(torch.tensor([[100.0, -100, -100]]), torch.tensor([[1, 0, 0]]), label_smoothing=0.1)
        close(loss, 400 * 0.1 / 3)

    def test_integer_class_labels(self):
        idx = torch.tensor([2, 0, 1])
        close(losses.softmax_cross_entropy(LOGITS, idx), 10.0)
        close(losses.softmax_cross_entropy(LOGITS, idx.reshape(3, 1)), 10.0)
        close(losses.softmax_cross_entropy(LOGITS, idx, label_smoothing=0.1),
              float(losses.softmax_cross_entropy(LOGITS, WRONG, label_smoothing=0.1)), 5)

    def test_class_indices_out_of_range(self):
        with pytest.raises(ValueError, match=r"expected values in \[0, 3\)"):
            losses.softmax_cross_entropy(LOGITS, torch.tensor([0, 1, 3]))

    def test_label_shape_mismatch(self):
        with pytest.raises(ValueError, match="onehot_labels shape"):
            losses.softmax_cross_entropy(LOGITS, torch.ones(3, 4, dtype=torch.int64))
        with pytest.raises(ValueError, match="onehot_labels shape"):
            losses.softmax_cross_entropy(LOGITS, torch.ones(3, 4))

    def test_spatial_logits_class_axis_is_dim1(self):
        logits = torch.randn(2, 4, 3, 3)
        labels = torch.randint(0, 4, (2, 3, 3))
        expected = torch.nn.functional.cross_entropy(logits, labels)
        close(losses.softmax_cross_entropy(logits, labels), float(expected), 5)
        onehot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2)
        close(losses.softmax_cross_entropy(logits, onehot), float(expected), 5)

    def test_bad_label_smoothing(self):
        with pytest.raises(ValueError, match="label_smoothing"):
            losses.softmax_cross_entropy(LOGITS, RIGHT, label_smoothing=1.5)


class TestSparseSoftmaxCrossEntropy:
    @pytest.mark.parametrize("labels", [torch.tensor([[2], [0], [1]]), torch.tensor([2, 0, 1], dtype=torch.int32)])
    def test_all_wrong(self, labels):
        close(losses.sparse_softmax_cross_entropy(LOGITS, labels), 10.0)

    def test_column_weights(self):
        w = torch.tensor([[1.2], [3.4], [5.6]])
        close(losses.sparse_softmax_cross_entropy(LOGITS, torch.tensor([2, 0, 1]), w), (1.2 + 3.4 + 5.6) * 10 / 3)

    def test_inconsistent_sizes_raise(self):
        with pytest.raises(ValueError):
            losses.sparse_softmax_cross_entropy(LOGITS, torch.tensor([0, 1, 2]), torch.tensor([1.2, 3.4, 5.6, 7.8]))
        with pytest.raises(ValueError):
            losses.sparse_softmax_cross_entropy(LOGITS, torch.tensor([[0], [1], [2], [3]]))
        with pytest.raises(TypeError, match="integer class indices"):
            losses.sparse_softmax_cross_entropy(LOGITS, torch.tensor([0.0, 1.0, 2.0]))


# ---------------------------------------------------------------- sigmoid
SIG_LOGITS = torch.tensor([[100.0, -100, -100], [-100, 100, -100], [-100, -100, 100]])


class TestSigmoidCrossEntropy:
    def test_all_correct(self):
        close(losses.sigmoid_cross_entropy(SIG_LOGITS, RIGHT), 0.0)

    def test_single_column_with_weights(self):
        # logits 1, labels 1: log(1 + e^-1) = 0.3133
        loss = losses.sigmoid_cross_entropy(torch.ones(32, 1), torch.ones(32, 1), torch.ones(32, 1))
        close(loss, 0.313)
        close(losses.sigmoid_cross_entropy(torch.ones(32, 2), torch.ones(32, 2), torch.ones(32, 2)), 0.313)

    def test_all_wrong(self):
        # 6 of 9 entries are wrong by a logit of 100
        close(losses.sigmoid_cross_entropy(SIG_LOGITS, WRONG), 600 / 9)

    def test_all_wrong_measurement_weights(self):
        # each wrong entry costs 100; their weights (0,0)=3, (0,2)=5, (1,0)=2, (1,1)=6, (2,1)=0,
        # (2,2)=1 sum to 17 -> 1700, over the 7 non-zero weights
        w = torch.tensor([[3, 4, 5], [2, 6, 0], [8, 0, 1.0]])
        close(losses.sigmoid_cross_entropy(SIG_LOGITS, WRONG, w), 1700 / 7)

    def test_label_smoothing(self):
        # labels z' = z(1 - L) + L/2; loss = 1/3 * (100 + 50 L)
        loss = losses.sigmoid_cross_entropy(torch.tensor([[100.0, -100, -100]]), torch.tensor([[1, 0, 1]]), label_smoothing=0.1)
        close(loss, (100 + 50 * 0.1) / 3)

    def test_label_smoothing_equals_two_class_softmax(self):
        sig = losses.sigmoid_cross_entropy(torch.tensor([[100.0, -100, -100]]), torch.tensor([[1, 0, 1]]), label_smoothing=0.1)
        soft = losses.softmax_cross_entropy(
            torch.tensor([[0.0, 100], [100, 0], [100, 0]]), torch.tensor([[0, 1], [1, 0], [0, 1]]), label_smoothing=0.1
        )
        close(sig, float(soft))


# ---------------------------------------------------------------- log loss
LP = np.array([0.9, 0.2, 0.2, 0.8, 0.4, 0.6]).reshape(2, 3)
LL = np.array([1.0, 0, 1, 1, 0, 0]).reshape(2, 3)
EXPECTED_LOG = LL * np.log(LP + 1e-7) + (1 - LL) * np.log(1 - LP + 1e-7)


class TestLogLoss:
    def test_all_correct(self):
        close(losses.log_loss(torch.tensor(LL), torch.tensor(LL)), 0.0)

    def test_non_zero(self):
        close(losses.log_loss(torch.tensor(LP), torch.tensor(LL)), -EXPECTED_LOG.sum() / 6)

    def test_scalar_weight(self):
        close(losses.log_loss(torch.tensor(LP), torch.tensor(LL), 2.3), 2.3 * -EXPECTED_LOG.sum() / 6)

    def test_batch_weights(self):
        expected = EXPECTED_LOG * np.array([1.2, 3.4])[:, None]
        close(losses.log_loss(torch.tensor(LP), torch.tensor(LL), torch.tensor([1.2, 3.4])), -expected.sum() / 6)

    @pytest.mark.parametrize("shape", [(2,), (2, 1)])
    def test_batch_weights_some_zero(self, shape):
        expected = EXPECTED_LOG * np.array([1.2, 0])[:, None]
        w = torch.tensor([1.2, 0.0]).reshape(shape)
        close(losses.log_loss(torch.tensor(LP), torch.tensor(LL), w), -expected.sum() / 3)

    def test_wrong_weight_shape(self):
        with pytest.raises(ValueError, match=r"weights shape \[2, 4\]"):
            losses.log_loss(torch.tensor(LP), torch.tensor(LL), torch.randn(2, 4))

    def test_measurement_weights(self):
        w = np.array([3, 6, 5, 0, 4, 2.0]).reshape(2, 3)
        close(losses.log_loss(torch.tensor(LP), torch.tensor(LL), torch.tensor(w)), -(EXPECTED_LOG * w).sum() / 5)

    def test_all_zero(self):
        close(losses.log_loss(torch.tensor(LP), torch.tensor(LL), torch.zeros(2, 3)), 0.0)


# ---------------------------------------------------------------- hinge / huber
class TestHingeLoss:
    def test_incompatible_shapes(self):
        with pytest.raises(ValueError, match="logits shape"):
            losses.hinge_loss(torch.tensor([[-1.0], [2.1]]), torch.tensor([0.0, 1.0]))

    def test_all_outside_margin(self):
        out = losses.hinge_loss(torch.tensor([1.2, -1.4, -1.0, 2.1]), torch.tensor([1.0, 0, 0, 1]), reduction="none")
        np.testing.assert_allclose(out.numpy(), [0, 0, 0, 0], atol=1e-3)

    def test_some_inside_margin(self):
        out = losses.hinge_loss(torch.tensor([[-0.7], [-1.4], [1.4], [0.6]]), torch.tensor([[0.0], [0], [1], [1]]),
                                reduction=losses.Reduction.NONE)
        np.testing.assert_allclose(out.numpy(), [[0.3], [0.0], [0.0], [0.4]], atol=1e-3)

    def test_some_misclassified_reduced_and_weighted(self):
        logits, labels = torch.tensor([1.2, 0.4, -1.0, -1.1]), torch.tensor([1.0, 0, 0, 1])
        # element losses [0, 1.4, 0, 2.1]
        close(losses.hinge_loss(logits, labels), 3.5 / 4)
        close(losses.hinge_loss(logits, labels, weights=torch.tensor([1.0, 0, 0, 2])), 4.2 / 2)

    def test_unreduced_not_collected_then_compute_weighted_loss(self):
        per_element = losses.hinge_loss(torch.tensor([1.2, 0.4, -1.0, -1.1]), torch.tensor([1.0, 0, 0, 1]), reduction="none")
        assert losses.get_losses() == []
        loss = losses.compute_weighted_loss(per_element)
        assert len(losses.get_losses()) == 1
        close(loss, 3.5 / 4)


class TestHuberLoss:
    def test_values(self):
        # |e| = [0.5, 3.0]: 0.5*0.25 = 0.125 ; 0.5*1 + 1*(3-1) = 2.5 -> mean 1.3125
        close(losses.huber_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0])), 1.3125, 6)

    def test_delta_and_weights(self):
        # delta 2: |e|=3 -> 0.5*4 + 2*1 = 4 ; |e|=1 -> 0.5 ; weights [0, 1] -> 0.5
        pred, lab = torch.tensor([3.0, -1.0]), torch.zeros(2)
        close(losses.huber_loss(pred, lab, delta=2.0), 2.25, 6)
        close(losses.huber_loss(pred, lab, torch.tensor([0.0, 1.0]), delta=2.0), 0.5, 6)
        close(losses.huber_loss(lab, pred, delta=2.0), 2.25, 6)  # order does not matter

    def test_bad_delta(self):
        with pytest.raises(ValueError, match="delta"):
            losses.huber_loss(torch.ones(2), torch.zeros(2), delta=0)


# ---------------------------------------------------------------- pairwise / cosine
class TestMeanPairwiseSquaredError:
    P = np.array([[4, 8, 12], [8, 1, 3]], dtype=np.float32)
    L = np.array([[1, 9, 2], [-5, -5, 7]], dtype=np.float32)

    def expected(self):
        total = np.zeros(2)
        for b in range(2):
            for i in range(3):
                for j in range(3):
                    x = self.P[b, i] - self.P[b, j]
                    y = self.L[b, i] - self.L[b, j]
                    total[b] += (x - y) ** 2
        return total / 9.0

    def test_non_zero(self):
        close(losses.mean_pairwise_squared_error(torch.tensor(self.P), torch.tensor(self.L)), self.expected().sum())

    def test_weights(self):
        w = np.array([2.0, 1.0])
        close(losses.mean_pairwise_squared_error(torch.tensor(self.P), torch.tensor(self.L), torch.tensor(w)),
              (self.expected() * w).sum())
        close(losses.mean_pairwise_squared_error(torch.tensor(self.P), torch.tensor(self.L), 0.0), 0.0)

    def test_gradient_with_zero_weight_is_finite(self):
        w = torch.randn(3, 4, requires_grad=True)
        pred = torch.ones(2, 3) @ w
        losses.mean_pairwise_squared_error(pred, pred.detach(), 0.0).backward()
        assert torch.isfinite(w.grad).all()

    def test_associative_across_batch(self):
        g = torch.Generator().manual_seed(0)
        p0, l0, p1, l1 = (torch.rand(1, 3, 4, 1, generator=g) for _ in range(4))
        a = losses.mean_pairwise_squared_error(p0, l0)
        b = losses.mean_pairwise_squared_error(p1, l1)
        both = losses.mean_pairwise_squared_error(torch.cat([p0, p1]), torch.cat([l0, l1]))
        close(a + b, float(both), 5)

    @pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2), (0,)])
    def test_an_empty_batch_is_a_zero_loss_that_backpropagates(self, shape):
        pred = torch.zeros(shape, requires_grad=True)
        loss = losses.mean_pairwise_squared_error(pred, torch.zeros(shape), loss_collection=None)
        assert loss.shape == () and float(loss.detach()) == 0.0
        loss.backward()
        assert pred.grad.shape == pred.shape

    def test_weights_of_an_empty_batch_must_be_scalar_or_empty(self):
        with pytest.raises(ValueError, match=r"weights shape \[2\] must be a scalar or \[batch_size\] = \[0\]"):
            losses.mean_pairwise_squared_error(torch.zeros(0, 3), torch.zeros(0, 3), torch.ones(2), loss_collection=None)
        assert float(losses.mean_pairwise_squared_error(torch.zeros(0, 3), torch.zeros(0, 3), torch.ones(0),
                                                        loss_collection=None)) == 0.0


class TestCosineDistance:
    P = torch.tensor([[1, 0, 0], [0, 0, -1], [1, 0, 0], [1, 0, 0], [0, 0, -1], [1, 0, 0.0]]).reshape(3, 2, 3)
    L = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0.0]]).reshape(3, 2, 3)

    def test_axis_required(self):
        with pytest.raises(ValueError, match="axis"):
            losses.cosine_distance(self.P, self.L)

    def test_all_correct(self):
        close(losses.cosine_distance(self.L, self.L, dim=2), 0.0, 5)

    def test_partially_correct(self):
        # distances [[0, 2], [1, 0], [2, 1]] -> mean 1
        close(losses.cosine_distance(self.P, self.L, axis=2), 1.0, 5)

    def test_sample_weights(self):
        close(losses.cosine_distance(self.P, self.L, axis=2, weights=torch.tensor([1.0, 0, 0])), 1.0, 5)

    def test_measurement_weights(self):
        w = torch.tensor([1, 0, 0, 1, 1, 1.0]).reshape(3, 2)
        # (0 + 0 + 0 + 0 + 2 + 1) / 4
        close(losses.cosine_distance(self.P, self.L, axis=2, weights=w), 3 / 4, 5)

    def test_zero_weights(self):
        close(losses.cosine_distance(self.P, self.L, axis=2, weights=torch.zeros(3)), 0.0)
        close(losses.cosine_distance(self.P, self.L, axis=2, weights=torch.zeros(3, 2)), 0.0)


# ---------------------------------------------------------------- reductions
class TestReductions:
    def test_all_modes(self):
        l = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        w = torch.tensor([2.0, 0.0])
        kw = dict(loss_collection=None)
        np.testing.assert_allclose(losses.compute_weighted_loss(l, w, reduction="none", **kw).numpy(), [[2, 4], [0, 0]])
        close(losses.compute_weighted_loss(l, w, reduction=losses.Reduction.SUM, **kw), 6.0)
        close(losses.compute_weighted_loss(l, w, reduction=losses.Reduction.MEAN, **kw), 6.0 / 4)  # sum of weights 4
        close(losses.compute_weighted_loss(l, w, reduction=losses.Reduction.SUM_OVER_BATCH_SIZE, **kw), 6.0 / 4)
        close(losses.compute_weighted_loss(l, w, **kw), 6.0 / 2)

    @pytest.mark.parametrize("reduction", [r for r in losses.Reduction.all() if r != "none"])
    @pytest.mark.parametrize("w", [2.5, 0.0, 1.0])
    def test_scalar_fast_path_matches_tensor_weights(self, reduction, w):
        l = torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 6.0]])
        fast = losses.compute_weighted_loss(l, w, reduction=reduction, loss_collection=None)
        general = losses.compute_weighted_loss(l, torch.tensor(w), reduction=reduction, loss_collection=None)
        close(fast, float(general), 6)

    def test_bad_reduction(self):
        with pytest.raises(ValueError, match="reduction"):
            losses.compute_weighted_loss(torch.ones(2), reduction="avg")

    def test_weights_with_more_dims(self):
        with pytest.raises(ValueError, match="more dimensions"):
            losses.compute_weighted_loss(torch.ones(2), torch.ones(2, 2))


# ---------------------------------------------------------------- collections
class TestCollections:
    def test_each_loss_adds_itself(self):
        x, y = torch.tensor([[0.2, 0.7]]), torch.tensor([[0.0, 1.0]])
        made = [
            losses.absolute_difference(x, y), losses.log_loss(x, y), losses.mean_squared_error(x, y),
            losses.sigmoid_cross_entropy(x, y), losses.softmax_cross_entropy(x, y), losses.huber_loss(x, y),
            losses.hinge_loss(x, y), losses.cosine_distance(x, y, axis=1),
            losses.mean_pairwise_squared_error(x, y), losses.sparse_softmax_cross_entropy(x, torch.tensor([1])),
        ]
        assert losses.get_losses() == made

    def test_loss_collection_none(self):
        x, y = torch.tensor([[1.2, 0.4, -1.0, -1.1]] * 2), torch.tensor([[1.0, 0, 0, 1]] * 2)
        for fn in (losses.absolute_difference, losses.log_loss, losses.mean_squared_error,
                   losses.sigmoid_cross_entropy, losses.softmax_cross_entropy):
            fn(x, y, loss_collection=None)
        losses.add_loss(torch.tensor(1.0), loss_collection=None)
        assert losses.get_losses() == []

    def test_custom_collection(self):
        loss = losses.mean_squared_error(torch.ones(2), torch.zeros(2), loss_collection="aux_losses")
        assert losses.get_losses() == []
        assert losses.get_losses(loss_collection="aux_losses") == [loss]

    def test_losses_do_not_leak_out_of_a_step(self):
        with collections.step_scope():
            losses.mean_squared_error(torch.ones(2), torch.zeros(2))
            assert len(losses.get_losses()) == 1
        with collections.step_scope():
            assert losses.get_losses() == []

    def test_add_external_loss_and_total(self):
        per_element = losses.hinge_loss(torch.tensor([[1.2, 0.4, -1.0, -1.1]]), torch.tensor([[1.0, 0, 0, 1]]),
                                        reduction="none")
        losses.add_loss(per_element.mean())
        close(losses.get_total_loss(), 3.5 / 4)

    def test_total_loss_adds_regularization(self):
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        losses.add_loss(torch.tensor(1.0))
        layers.apply_regularization(layers.l2_regularizer(0.5), [w])  # 0.5 * 5 / 2 = 1.25
        close(losses.get_total_loss(), 2.25, 6)
        close(losses.get_total_loss(add_regularization_losses=False), 1.0, 6)
        with torch.no_grad():
            w.mul_(2)  # penalty follows the current value: 0.5 * 20 / 2 = 5
        close(losses.get_total_loss(), 6.0, 6)

    def test_regularization_losses_include_plain_tensors(self):
        collections.add_to_collection(GraphKeys.REGULARIZATION_LOSSES, torch.tensor(0.25))
        assert [float(v) for v in losses.get_regularization_losses()] == [0.25]

    def test_regularization_losses_reject_junk(self):
        collections.add_to_collection(GraphKeys.REGULARIZATION_LOSSES, "oops")
        with pytest.raises(TypeError, match="REGULARIZATION_LOSSES holds str"):
            losses.get_regularization_losses()

    def test_total_loss_empty_raises(self):
        with pytest.raises(ValueError, match="no loss"):
            losses.get_total_loss()

    def test_total_loss_rejects_non_scalar(self):
        losses.add_loss(torch.ones(3))
        with pytest.raises(ValueError, match="not a scalar"):
            losses.get_total_loss()

    def test_add_loss_type_check(self):
        with pytest.raises(TypeError, match="loss must be a torch.Tensor"):
            losses.add_loss(1.0)


def test_loss_outside_step_warns_and_persists():
    def outside_any_step():  # a fresh context: no step scope open
        assert not collections.in_step_scope()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = losses.mean_squared_error(torch.ones(2), torch.zeros(2))
        return loss, caught, collections.get_collection(GraphKeys.LOSSES)

    loss, caught, persisted = contextvars.Context().run(outside_any_step)
    assert [str(w.message) for w in caught if "outside a train step" in str(w.message)]
    assert caught[0].filename == __file__  # the warning points at the caller
    assert persisted == [loss]
