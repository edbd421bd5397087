"""slim.metrics: each streaming metric against numpy over several batches, reset, aggregation, bad labels."""
import doctest
import functools

import numpy as np
import pytest
import torch
import torchmetrics
from hypothesis import given, settings
from hypothesis import strategies as st

import torchslim as slim
from torchslim import metrics
from torchslim.collections import get_collection

RNG = np.random.default_rng(0)
BATCHES = 4


def _batches(make):
    return [make(RNG) for _ in range(BATCHES)]


def _t(a):
    return torch.from_numpy(np.asarray(a))


def _run(metric, batches, **update_kwargs):
    for batch in batches:
        metric.update(*[_t(a) for a in batch], **update_kwargs)
    return metric.compute()


def _check_streams_and_resets(metric, batches, expected, atol=1e-5):
    """The value over all batches, then again after a reset (no state left over)."""
    np.testing.assert_allclose(np.asarray(_run(metric, batches)), expected, rtol=1e-5, atol=atol)
    metric.reset()
    np.testing.assert_allclose(np.asarray(_run(metric, batches)), expected, rtol=1e-5, atol=atol)


def _classes(rng, n=20, k=5):
    return rng.integers(0, k, n), rng.integers(0, k, n)


def _bools(rng, n=30):
    return rng.random(n) > 0.5, rng.random(n) > 0.4


def _regression(rng, n=16):
    return rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)


def _flat(batches, i):
    return np.concatenate([b[i] for b in batches])


def test_accuracy_mean_and_errors_match_numpy():
    cls = _batches(_classes)
    p, l = _flat(cls, 0), _flat(cls, 1)
    _check_streams_and_resets(metrics.streaming_accuracy(), cls, np.mean(p == l))

    reg = _batches(_regression)
    p, l = _flat(reg, 0), _flat(reg, 1)
    _check_streams_and_resets(metrics.streaming_mean_squared_error(), reg, np.mean((p - l) ** 2))
    _check_streams_and_resets(metrics.streaming_root_mean_squared_error(), reg, np.sqrt(np.mean((p - l) ** 2)))
    _check_streams_and_resets(metrics.streaming_mean_absolute_error(), reg, np.mean(np.abs(p - l)))
    _check_streams_and_resets(metrics.streaming_mean(), [(b[0],) for b in reg], np.mean(p))
    _check_streams_and_resets(metrics.streaming_percentage_less(threshold=0.3), [(b[0],) for b in reg], np.mean(p < 0.3))

    norm = [(b[0], b[1], np.where(RNG.random(16) < 0.2, 0.0, RNG.random(16) + 0.5).astype(np.float32)) for b in reg]
    n = _flat(norm, 2)
    rel = np.where(n == 0, 0.0, np.abs(p - l) / np.where(n == 0, 1, n))
    _check_streams_and_resets(metrics.streaming_mean_relative_error(), norm, np.mean(rel))


def test_weighted_means_match_numpy():
    cls = _batches(lambda r: (*_classes(r), r.random(20).astype(np.float32)))
    p, l, w = (_flat(cls, i) for i in range(3))
    # weights as the third positional argument (TF's order) or as a keyword
    _check_streams_and_resets(metrics.streaming_accuracy(), cls, np.sum((p == l) * w) / np.sum(w))
    m = metrics.streaming_accuracy()
    for a, b, c in cls:
        m(_t(a), _t(b), weights=_t(c))
    np.testing.assert_allclose(float(m.compute()), np.sum((p == l) * w) / np.sum(w), rtol=1e-5)

    reg = _batches(lambda r: (*_regression(r), (r.random(16) > 0.3).astype(np.float32)))
    p, l, w = (_flat(reg, i) for i in range(3))
    _check_streams_and_resets(metrics.streaming_mean_squared_error(), reg, np.sum((p - l) ** 2 * w) / np.sum(w))
    _check_streams_and_resets(metrics.streaming_mean_absolute_error(), reg, np.sum(np.abs(p - l) * w) / np.sum(w))

    # a scalar weight scales every value alike, so the mean is unchanged; a [batch, 1] weight broadcasts
    m = metrics.streaming_mean()
    m(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1.0], [3.0]]))
    assert float(m.compute()) == pytest.approx((1 + 3 + 3 * 5 + 3 * 7) / 8)
    m = metrics.streaming_mean()
    m(torch.tensor([2.0, 4.0]), 5.0)
    assert float(m.compute()) == pytest.approx(3.0)


def test_mean_tensor_concat_cosine_and_counts():
    vals = [RNG.normal(size=(3, 2)).astype(np.float32) for _ in range(BATCHES)]
    _check_streams_and_resets(metrics.streaming_mean_tensor(), [(v,) for v in vals], np.mean(vals, axis=0))
    _check_streams_and_resets(metrics.streaming_concat(), [(v[:, 0],) for v in vals],
                              np.concatenate([v[:, 0] for v in vals]))

    def unit(rng):
        a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
        return ((a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32),
                (b / np.linalg.norm(b, axis=1, keepdims=True)).astype(np.float32))

    cos = _batches(unit)
    p, l = _flat(cos, 0), _flat(cos, 1)
    _check_streams_and_resets(metrics.streaming_mean_cosine_distance(dim=1), cos, np.mean(1 - np.sum(p * l, axis=1)))

    bools = _batches(_bools)
    p, l = _flat(bools, 0), _flat(bools, 1)
    _check_streams_and_resets(metrics.streaming_true_positives(), bools, np.sum(p & l))
    _check_streams_and_resets(metrics.streaming_false_positives(), bools, np.sum(p & ~l))
    _check_streams_and_resets(metrics.streaming_true_negatives(), bools, np.sum(~p & ~l))
    _check_streams_and_resets(metrics.streaming_false_negatives(), bools, np.sum(~p & l))
    weighted = [(a, b, np.full(a.shape, 0.5, np.float32)) for a, b in bools]
    _check_streams_and_resets(metrics.streaming_true_positives(), weighted, 0.5 * np.sum(p & l))


def test_precision_recall_auc_iou_pearson_match_hand_computation():
    bools = _batches(_bools)
    p, l = _flat(bools, 0), _flat(bools, 1)
    tp, fp, fn = np.sum(p & l), np.sum(p & ~l), np.sum(~p & l)
    _check_streams_and_resets(metrics.streaming_precision(), bools, tp / (tp + fp))
    _check_streams_and_resets(metrics.streaming_recall(), bools, tp / (tp + fn))
    m = metrics.streaming_precision()   # nothing predicted positive: 0, as TF
    m(torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    assert float(m.compute()) == 0.0

    scores = _batches(lambda r: (r.random(25).astype(np.float32), r.random(25) > 0.5))
    s, y = _flat(scores, 0), _flat(scores, 1)
    # exact ROC AUC = P(score of a positive > score of a negative) (Mann-Whitney)
    pos, neg = s[y], s[~y]
    auc = np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :])
    _check_streams_and_resets(metrics.streaming_auc(num_thresholds=None), scores, auc)
    binned = float(_run(metrics.streaming_auc(), scores))   # TF's 200 thresholds: close to the exact area
    assert binned == pytest.approx(auc, abs=0.02)
    # average precision: mean over positives of the precision at their rank
    order = np.argsort(-s)
    hits = y[order]
    ap = np.sum((np.cumsum(hits) / np.arange(1, len(s) + 1))[hits]) / hits.sum()
    _check_streams_and_resets(metrics.streaming_auc(num_thresholds=None, curve="PR"), scores, ap)

    cls = _batches(lambda r: _classes(r, k=4))
    p, l = _flat(cls, 0), _flat(cls, 1)
    cm = np.zeros((4, 4))
    np.add.at(cm, (l, p), 1)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    _check_streams_and_resets(metrics.streaming_mean_iou(num_classes=4), cls, np.mean(inter[union > 0] / union[union > 0]))
    # a class never seen nor predicted is left out of the mean, as in TF: (1 + 1/2) / 2
    m = metrics.streaming_mean_iou(num_classes=3)
    m(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    assert float(m.compute()) == pytest.approx((1 / 2 + 1 / 2) / 2)

    reg = _batches(_regression)
    _check_streams_and_resets(metrics.streaming_pearson_correlation(), reg,
                              np.corrcoef(_flat(reg, 0), _flat(reg, 1))[0, 1])


def test_recall_at_k_and_sparse_at_k():
    def topk_batch(rng):
        return rng.random((10, 6)).astype(np.float32), rng.integers(0, 6, 10)

    batches = _batches(topk_batch)
    s, l = _flat(batches, 0), _flat(batches, 1)
    top2 = np.argsort(-s, axis=1)[:, :2]
    _check_streams_and_resets(metrics.streaming_recall_at_k(k=2), batches, np.mean((top2 == l[:, None]).any(1)))

    def multi(rng):
        labels = np.stack([rng.permutation(6)[:3] for _ in range(10)])
        labels[rng.random((10, 3)) < 0.3] = -1          # padding, ignored
        return rng.random((10, 6)).astype(np.float32), labels

    batches = _batches(multi)
    s, l = _flat(batches, 0), _flat(batches, 1)
    top = np.argsort(-s, axis=1)[:, :3]
    tp = sum(int(x in top[i]) for i in range(len(l)) for x in l[i] if x >= 0)
    n_labels = int(np.sum(l >= 0))
    _check_streams_and_resets(metrics.streaming_sparse_recall_at_k(k=3), batches, tp / n_labels)
    _check_streams_and_resets(metrics.streaming_sparse_precision_at_k(k=3), batches, tp / (3 * len(l)))
    # class_id=2: recall over rows labelled 2, precision over rows predicting 2
    rows_with_2 = [i for i in range(len(l)) if 2 in l[i]]
    rows_pred_2 = [i for i in range(len(l)) if 2 in top[i]]
    both = len(set(rows_with_2) & set(rows_pred_2))
    _check_streams_and_resets(metrics.streaming_sparse_recall_at_k(k=3, class_id=2), batches, both / len(rows_with_2))
    _check_streams_and_resets(metrics.streaming_sparse_precision_at_k(k=3, class_id=2), batches, both / len(rows_pred_2))
    m = metrics.streaming_sparse_recall_at_k(k=1)     # no label seen: 0
    m(torch.rand(2, 4), torch.full((2, 1), -1))
    assert float(m.compute()) == 0.0


def test_value_update_pair_unpacks_like_tf_and_collections():
    value, update = metrics.streaming_mean(metrics_collections=["eval_values"], updates_collections="eval_updates")
    update(torch.tensor([1.0, 2.0]))
    update(torch.tensor([3.0, 4.0]))
    assert float(value()) == 2.5
    assert get_collection("eval_values") == [value]
    assert get_collection("eval_updates") == [update]


def test_aggregate_metric_map_and_aggregate_metrics_shapes():
    raw = torchmetrics.SumMetric()
    acc = metrics.streaming_accuracy()
    pair = (lambda: torch.tensor(7.0), lambda *a: None)
    names_to_values, names_to_updates = slim.metrics.aggregate_metric_map(
        {"accuracy": acc, "sum": raw, "custom": pair})
    assert list(names_to_values) == list(names_to_updates) == ["accuracy", "sum", "custom"]
    names_to_updates["accuracy"](torch.tensor([1, 2]), torch.tensor([1, 1]))
    names_to_updates["sum"](torch.tensor([2.0, 3.0]))
    assert float(names_to_values["accuracy"]()) == 0.5
    assert float(names_to_values["sum"]()) == 5.0
    assert names_to_values["custom"] is pair[0] and names_to_updates["custom"] is pair[1]

    values, updates = slim.metrics.aggregate_metrics(metrics.streaming_mean(), metrics.streaming_mean_absolute_error())
    assert len(values) == len(updates) == 2
    updates[0](torch.tensor([4.0]))
    updates[1](torch.tensor([1.0]), torch.tensor([3.0]))
    assert [float(v()) for v in values] == [4.0, 2.0]

    with pytest.raises(TypeError, match="names_to_tuples"):
        metrics.aggregate_metric_map([acc])
    with pytest.raises(TypeError, match="metric 'bad'"):
        metrics.aggregate_metric_map({"bad": 3})
    with pytest.raises(TypeError, match="argument 0"):
        metrics.aggregate_metrics("accuracy")


def test_metrics_of_finds_metrics_through_dicts_methods_and_closures():
    names_to_values, names_to_updates = metrics.aggregate_metric_map(
        {"a": metrics.streaming_mean(), "b": metrics.streaming_accuracy()})
    extra = torchmetrics.MeanMetric()

    def eval_op(batch):
        names_to_updates["a"](batch)
        extra.update(batch)

    found = metrics.metrics_of(eval_op, names_to_values)
    assert {id(m) for m in found} == {id(names_to_values["a"].__self__), id(names_to_values["b"].__self__), id(extra)}
    eval_op(torch.tensor([1.0]))
    metrics.reset_metrics(eval_op)
    eval_op(torch.tensor([3.0]))
    assert float(names_to_values["a"]()) == 3.0 and float(extra.compute()) == 3.0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"'predictions' \(shape \(2, 3\)\).*argmax"):
        metrics.streaming_accuracy()(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(TypeError, match="'labels' must be a torch.Tensor"):
        metrics.streaming_mean_squared_error()(torch.zeros(2), [0.0, 1.0])
    with pytest.raises(ValueError, match="'weights' .* must broadcast"):
        metrics.streaming_mean()(torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match="'weights' is not supported: torchmetrics' BinaryPrecision"):
        metrics.streaming_precision()(torch.ones(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="'k' must be an int >= 1, got 0"):
        metrics.streaming_recall_at_k(k=0)
    with pytest.raises(ValueError, match="'k' \\(7\\) exceeds the number of classes \\(3\\)"):
        metrics.streaming_recall_at_k(k=7)(torch.rand(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="'curve' must be 'ROC' or 'PR', got 'XY'"):
        metrics.streaming_auc(curve="XY")
    with pytest.raises(ValueError, match="'num_classes' must be an int >= 1"):
        metrics.streaming_mean_iou(num_classes="3")
    with pytest.raises(TypeError, match=r"streaming_accuracy.*update\(\) missing 1 required positional argument: 'labels'"):
        metrics.streaming_accuracy()(torch.zeros(2))


# --------------------------------------------------------------- label ranges and dtypes
@pytest.mark.parametrize("make, predictions, labels, message", [
    (metrics.streaming_auc, torch.rand(4), torch.tensor([0, 1, 2, 3]),
     r"streaming_auc: argument 'labels' must hold booleans or the integers 0 and 1, got values \[0, 1, 2, 3\]"),
    (metrics.streaming_precision, torch.tensor([1, 0, 1]), torch.tensor([0.0, 1.0, 0.7]),
     r"streaming_precision: argument 'labels' must hold booleans or the integers 0 and 1, got dtype torch.float32"),
    (metrics.streaming_recall, torch.tensor([0.2, 0.9]), torch.tensor([0, 1]),
     r"streaming_recall: argument 'predictions' must hold booleans .* got dtype torch.float32"),
    (metrics.streaming_precision, torch.tensor([0, 1, -1]), torch.tensor([0, 1, 1]),
     r"argument 'predictions' must hold booleans or the integers 0 and 1, got values \[-1, 0, 1\]"),
    (functools.partial(metrics.streaming_recall_at_k, k=1), torch.rand(3, 4), torch.tensor([0, 1, 4]),
     r"streaming_recall_at_k: argument 'labels' must hold class ids in \[0, 4\).*got values \[0, 1, 4\]"),
    (functools.partial(metrics.streaming_recall_at_k, k=1), torch.rand(2, 4), torch.tensor([0.0, 1.0]),
     r"streaming_recall_at_k: argument 'labels' must hold integer class ids, got dtype torch.float32"),
    (functools.partial(metrics.streaming_mean_iou, 3), torch.tensor([0, 1]), torch.tensor([0, 5]),
     r"streaming_mean_iou: argument 'labels' must hold class ids in \[0, 3\) \(num_classes\), got values \[0, 5\]"),
    (functools.partial(metrics.streaming_sparse_recall_at_k, k=1), torch.rand(2, 3), torch.tensor([[0.0], [1.0]]),
     r"streaming_sparse_recall_at_k: argument 'labels' must hold integer class ids \(-1 for padding\)"),
])
def test_labels_out_of_range_or_of_the_wrong_dtype_name_the_argument_and_the_values(make, predictions, labels, message):
    m = make()
    with pytest.raises(ValueError, match=message):
        m(predictions, labels)
    m(*_good_batch(make))  # the refused batch left no state behind: a good one still works
    assert torch.isfinite(torch.as_tensor(m.compute())).all()


def _good_batch(make):
    name = getattr(make, "func", make).__name__
    if name in ("streaming_recall_at_k", "streaming_sparse_recall_at_k"):
        return torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1]]), torch.tensor([0, 2])
    if name == "streaming_mean_iou":
        return torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])
    if name == "streaming_auc":
        return torch.tensor([0.2, 0.7, 0.4]), torch.tensor([0, 1, 1])
    return torch.tensor([True, False, True]), torch.tensor([1, 0, 0])


def test_bool_and_integer_binary_labels_give_the_same_value():
    p, l = torch.tensor([1, 1, 0, 1]), torch.tensor([1, 0, 0, 1])
    for make in (metrics.streaming_precision, metrics.streaming_recall):
        a, b = make(), make()
        a(p, l)
        b(p.bool(), l.bool())
        assert torch.equal(a.compute(), b.compute())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the deferred device-side check needs an accelerator")
def test_on_an_accelerator_the_label_check_is_deferred_to_compute():
    m = metrics.streaming_auc()
    m(torch.rand(4, device="cuda"), torch.tensor([0, 1, 3, 1], device="cuda"))  # no host read here
    with pytest.raises(ValueError, match=r"argument 'labels' must hold .* got values from 0 to 3"):
        m.compute()


@settings(max_examples=80, deadline=None)
@given(labels=st.lists(st.integers(-3, 6), min_size=1, max_size=8), classes=st.integers(2, 5))
def test_fuzzed_class_ids_are_refused_exactly_when_out_of_range(labels, classes):
    preds = torch.rand(len(labels), classes)
    m = metrics.streaming_recall_at_k(k=1)
    if all(0 <= v < classes for v in labels):
        m(preds, torch.tensor(labels))
    else:
        with pytest.raises(ValueError, match=rf"argument 'labels' must hold class ids in \[0, {classes}\)"):
            m(preds, torch.tensor(labels))


def test_doctests():
    result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
