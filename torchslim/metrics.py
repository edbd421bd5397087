"""Streaming metrics: TF-Slim's ``streaming_*`` names, backed by torchmetrics.

    import torchslim as slim

    names_to_values, names_to_updates = slim.metrics.aggregate_metric_map({
        'accuracy': slim.metrics.streaming_accuracy(),
        'mse': slim.metrics.streaming_mean_squared_error(),
    })
    for images, labels in loader:                   # or let slim.evaluation run the loop
        logits = model(images)
        names_to_updates['accuracy'](logits.argmax(1), labels)
        names_to_updates['mse'](logits.softmax(1).max(1).values, torch.ones(len(labels)))
    names_to_values['accuracy']()                   # tensor(0.93): the value over every batch so far

In TF-Slim a metric function takes the prediction tensors and returns a
``(value_op, update_op)`` pair. In eager PyTorch the predictions only exist
inside the evaluation step, so each ``streaming_*`` function here takes the
metric's settings and returns a :class:`StreamingMetric`; its ``update``
(also its ``__call__``) takes the batch's predictions and labels in TF's
argument order, ``compute`` returns the value accumulated since the last
``reset``. It unpacks into TF's pair, so ``value, update = streaming_mean()``
reads as it did in TF-Slim.

Each metric keeps its state in a ``torchmetrics.Metric`` (``metric.metric``):
the weighted means (accuracy, mean, errors, top-k recall) in a two-state
``torchmetrics.Metric`` that accepts TF's ``weights`` (``MeanMetric``
ignores weights when its per-update NaN check is off); precision,
recall, AUC, mean IoU and Pearson correlation in the torchmetrics class of
that name, which has no sample weights, so passing ``weights`` to those
raises a ValueError. The state moves to the device of the first tensor it
is given, and in a ``torch.distributed`` job ``compute`` reduces it across
processes (torchmetrics' own synchronisation).

No ``update`` reads a value back to the host (no ``.item()``), so updating
every batch costs no device synchronisation, except AUC: torchmetrics checks
whether the predictions are probabilities.

Labels and class ids are checked, naming the argument and the values seen:
precision, recall and AUC take booleans or integers 0 and 1 (not floats,
which TF would silently cast to bool), top-k recall and mean IoU take
integer class ids below the number of classes. The check runs at once on
CPU tensors; on an accelerator the smallest and largest values are kept on
the device and checked by ``compute``, so ``update`` still never waits.
"""
from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torchmetrics
from torchmetrics import classification as _tmc

from torchslim.collections import add_to_collections

__all__ = [
    "StreamingMetric",
    "aggregate_metric_map",
    "aggregate_metrics",
    "metrics_of",
    "reset_metrics",
    "streaming_accuracy",
    "streaming_auc",
    "streaming_concat",
    "streaming_false_negatives",
    "streaming_false_positives",
    "streaming_mean",
    "streaming_mean_absolute_error",
    "streaming_mean_cosine_distance",
    "streaming_mean_iou",
    "streaming_mean_relative_error",
    "streaming_mean_squared_error",
    "streaming_mean_tensor",
    "streaming_pearson_correlation",
    "streaming_percentage_less",
    "streaming_precision",
    "streaming_recall",
    "streaming_recall_at_k",
    "streaming_root_mean_squared_error",
    "streaming_sparse_precision_at_k",
    "streaming_sparse_recall_at_k",
    "streaming_true_negatives",
    "streaming_true_positives",
]

_CPU = torch.device("cpu")


class StreamingMetric:
    """A metric accumulated over batches: ``update`` per batch, ``compute``, ``reset``.

    Built by the ``streaming_*`` functions; ``metric`` is the torchmetrics
    object holding the state. ``prepare`` turns the arguments of ``update``
    (TF's order: predictions, labels, weights) into those of
    ``metric.update`` and checks them; ``finish`` post-processes the value.

    Example:
        >>> m = streaming_mean()
        >>> m.update(torch.tensor([1.0, 2.0])); m(torch.tensor([6.0]))   # __call__ is update
        >>> m.compute()
        tensor(3.)
        >>> value, update = m            # TF-Slim's (value_op, update_op) pair
        >>> m.reset(); update(torch.tensor(5.0)); value()
        tensor(5.)
    """

    def __init__(
        self,
        name: str,
        metric: torchmetrics.Metric,
        prepare: Callable[..., tuple[Any, ...]],
        finish: Callable[[Any], Any] | None = None,
        metrics_collections: Any = None,
        updates_collections: Any = None,
        checks: Sequence[_ValueCheck] = (),
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"StreamingMetric: argument 'name' must be a non-empty string, got {name!r}")
        if not isinstance(metric, torchmetrics.Metric):
            raise TypeError(
                f"StreamingMetric: argument 'metric' must be a torchmetrics.Metric, got {type(metric).__name__}"
            )
        self.name = name
        self.metric = metric
        self._prepare = prepare
        self._finish = finish
        self._checks = tuple(checks)
        self._device = _CPU
        if metrics_collections:
            add_to_collections(metrics_collections, self.compute)
        if updates_collections:
            add_to_collections(updates_collections, self.update)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Adds one batch to the metric (arguments as the ``streaming_*`` function documents)."""
        inputs = self._prepare(*args, **kwargs) if kwargs else self._prepare(*args)
        device = inputs[0].device
        if device != self._device:
            self.metric.to(device)
            self._device = device
        self.metric.update(*inputs)

    __call__ = update

    def compute(self) -> Any:
        """The value over every batch since the last :meth:`reset` (a tensor)."""
        for check in self._checks:
            check.verify()
        value = self.metric.compute()
        return self._finish(value) if self._finish is not None else value

    def reset(self) -> None:
        """Forgets every batch seen so far."""
        self.metric.reset()
        for check in self._checks:
            check.reset()

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return iter((self.compute, self.update))

    def __repr__(self) -> str:
        return f"StreamingMetric({self.name!r}, {type(self.metric).__name__})"


# --------------------------------------------------------------- checks
def _tensor(fn: str, arg: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value  # torchmetrics updates its state with gradients off, so no detach is needed
    raise TypeError(f"{fn}: argument '{arg}' must be a torch.Tensor, got {type(value).__name__}")


def _pair(fn: str, predictions: Any, labels: Any, hint: str = "") -> None:
    """Raises the error that explains why ``predictions`` and ``labels`` are not two tensors of one shape."""
    _tensor(fn, "predictions", predictions)
    _tensor(fn, "labels", labels)
    _same_shape(fn, predictions, labels, hint)


def _same_shape(fn: str, predictions: torch.Tensor, labels: torch.Tensor, hint: str = "") -> None:
    if predictions.shape != labels.shape:
        raise ValueError(
            f"{fn}: arguments 'predictions' (shape {tuple(predictions.shape)}) and 'labels' "
            f"(shape {tuple(labels.shape)}) must have the same shape{hint}"
        )


def _weights(fn: str, weights: Any, shape: torch.Size) -> torch.Tensor | None:
    if weights is None:
        return None
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        return torch.tensor(float(weights))
    w = _tensor(fn, "weights", weights)
    try:
        torch.broadcast_shapes(w.shape, shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: argument 'weights' (shape {tuple(w.shape)}) must broadcast to the values' shape {tuple(shape)}"
        ) from None
    return w.float()


def _no_weights(fn: str, weights: Any, backing: str) -> None:
    if weights is not None:
        raise ValueError(
            f"{fn}: argument 'weights' is not supported: torchmetrics' {backing} has no sample weights "
            f"(got a {type(weights).__name__}); drop the examples whose weight is 0 before the update instead"
        )


def _values_seen(t: torch.Tensor) -> str:
    values = torch.unique(t.detach().cpu()).tolist()
    shown = values if len(values) <= 8 else [*values[:5], "...", *values[-2:]]
    return "[" + ", ".join(str(v) for v in shown) + "]"


def _integer_dtype(fn: str, arg: str, t: torch.Tensor, expected: str, allow_bool: bool) -> None:
    if t.is_floating_point() or t.is_complex() or (t.dtype == torch.bool and not allow_bool):
        fix = "threshold them first, e.g. labels > 0.5" if allow_bool else "pass integer class ids, e.g. labels.long()"
        raise ValueError(f"{fn}: argument '{arg}' must hold {expected}, got dtype {t.dtype} ({fix})")


class _ValueCheck:
    """Checks that a tensor argument's values lie in ``[low, high)``; names the argument and the values seen.

    CPU tensors are checked at once. For other devices the smallest and
    largest values are kept on the device and :meth:`verify` (called by
    ``compute``) reads them once, so ``update`` never waits for the device.
    """

    def __init__(self, fn: str, arg: str, expected: str) -> None:
        self.fn, self.arg, self.expected = fn, arg, expected
        self.reset()

    def reset(self) -> None:
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._low = 0
        self._high: int | None = None

    def _error(self, seen: str, high: int) -> ValueError:
        return ValueError(f"{self.fn}: argument '{self.arg}' must hold {self.expected.format(high=high)}, "
                          f"got values {seen}")

    def __call__(self, t: torch.Tensor, low: int, high: int) -> None:
        if t.numel() == 0 or t.dtype == torch.bool:
            return
        lo, hi = torch.aminmax(t.detach())
        if t.device.type == "cpu":
            if int(lo) < low or int(hi) >= high:
                raise self._error(_values_seen(t), high)
            return
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        self._low, self._high = low, high if self._high is None else min(self._high, high)

    def verify(self) -> None:
        if self._lo is None or self._hi is None or self._high is None:
            return
        lo, hi, low, high = int(self._lo), int(self._hi), self._low, self._high
        self.reset()
        if lo < low or hi >= high:
            raise self._error(f"from {lo} to {hi} (in some batch since the last reset)", high)


def _binary(fn: str, arg: str, t: torch.Tensor, check: _ValueCheck) -> torch.Tensor:
    """``t`` as 0/1 longs, after checking that it holds booleans or the integers 0 and 1."""
    _integer_dtype(fn, arg, t, "booleans or the integers 0 and 1", allow_bool=True)
    check(t, 0, 2)
    return t.bool().long() if t.dtype == torch.bool else t.long()


def _positive_int(fn: str, arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: argument '{arg}' must be an int >= 1, got {value!r}")
    return value


def _name(fn: str, name: Any, default: str) -> str:
    if name is None:
        return default
    if not isinstance(name, str) or not name:
        raise ValueError(f"{fn}: argument 'name' must be None or a non-empty string, got {name!r}")
    return name


class _Mean(torchmetrics.Metric):
    """``sum(values * weights) / sum(weights)`` over every update; element-wise when ``elementwise``.

    Not ``torchmetrics.MeanMetric``: in torchmetrics 1.9 it ignores the
    weights once its NaN check is disabled, and the check reads a value
    back from the device on every update.
    """

    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, elementwise: bool = False) -> None:
        super().__init__()
        self.elementwise = elementwise
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        if self.elementwise:
            count = torch.ones_like(values) if weights is None else torch.broadcast_to(weights, values.shape)
            self.total = self.total + values * count
            self.count = self.count + count
        elif weights is None:
            self.total = self.total + values.sum()
            self.count = self.count + values.numel()
        else:
            count = torch.broadcast_to(weights, values.shape)
            self.total = self.total + (values * count).sum()
            self.count = self.count + count.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def _weighted(fn: str, values: torch.Tensor, weights: Any) -> tuple[Any, ...]:
    """The arguments of ``_Mean.update``: ``values`` and, when given, ``weights`` checked against them."""
    if weights is None:
        return (values,)
    return values, _weights(fn, weights, values.shape).to(values.device)  # type: ignore[union-attr]


def _mean_metric(
    name: str,
    update: Callable[..., tuple[Any, ...]],
    finish: Callable[[Any], Any] | None,
    metrics_collections: Any,
    updates_collections: Any,
) -> StreamingMetric:
    """A weighted mean over every element of every batch (TF's streaming_mean) of what ``update`` returns."""
    return StreamingMetric(name, _Mean(), update, finish, metrics_collections, updates_collections)


# --------------------------------------------------------------- means
def streaming_mean(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """The (weighted) mean of every value given: ``update(values, weights=None)``.

    Example:
        >>> m = streaming_mean()
        >>> m(torch.tensor([1.0, 3.0]), weights=torch.tensor([1.0, 0.0])); m(torch.tensor([5.0]))
        >>> m.compute()
        tensor(3.)
    """
    fn = "streaming_mean"

    def update(values: Any, weights: Any = None) -> tuple[Any, ...]:
        return _weighted(fn, _tensor(fn, "values", values).float(), weights)

    return _mean_metric(_name(fn, name, "mean"), update, None, metrics_collections, updates_collections)


def streaming_accuracy(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """How often ``predictions`` equals ``labels``: ``update(predictions, labels, weights=None)``.

    Both are class ids of the same shape (pass ``logits.argmax(1)``, as in TF).

    Example:
        >>> m = streaming_accuracy()
        >>> m(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0])); m(torch.tensor([0]), torch.tensor([0]))
        >>> m.compute()
        tensor(0.7500)
    """
    fn = "streaming_accuracy"

    def update(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        if not (isinstance(predictions, torch.Tensor) and isinstance(labels, torch.Tensor)) or (
            predictions.shape != labels.shape
        ):
            _pair(fn, predictions, labels, " (compare class ids: pass logits.argmax(1) as predictions)")
        return _weighted(fn, (predictions == labels).float(), weights)

    return _mean_metric(_name(fn, name, "accuracy"), update, None, metrics_collections, updates_collections)


def _error_metric(fn: str, default: str, error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  finish: Callable[[Any], Any] | None, metrics_collections: Any, updates_collections: Any,
                  name: str | None) -> StreamingMetric:
    def update(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        if not (isinstance(predictions, torch.Tensor) and isinstance(labels, torch.Tensor)) or (
            predictions.shape != labels.shape
        ):
            _pair(fn, predictions, labels)
        if not (predictions.is_floating_point() and labels.is_floating_point()):
            predictions, labels = predictions.float(), labels.float()
        return _weighted(fn, error(predictions, labels), weights)

    return _mean_metric(_name(fn, name, default), update, finish, metrics_collections, updates_collections)


def streaming_mean_squared_error(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Mean of ``(predictions - labels) ** 2``: ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_mean_squared_error()
        >>> m(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])); m.compute()
        tensor(2.)
    """
    return _error_metric("streaming_mean_squared_error", "mean_squared_error", lambda p, l: (p - l).square(),
                         None, metrics_collections, updates_collections, name)


def streaming_root_mean_squared_error(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Square root of the streaming mean squared error: ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_root_mean_squared_error()
        >>> m(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])); m.compute()
        tensor(3.5355)
    """
    return _error_metric("streaming_root_mean_squared_error", "root_mean_squared_error",
                         lambda p, l: (p - l).square(), torch.sqrt, metrics_collections, updates_collections, name)


def streaming_mean_absolute_error(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Mean of ``|predictions - labels|``: ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_mean_absolute_error()
        >>> m(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])); m.compute()
        tensor(1.5000)
    """
    return _error_metric("streaming_mean_absolute_error", "mean_absolute_error", lambda p, l: (p - l).abs(),
                         None, metrics_collections, updates_collections, name)


def streaming_mean_relative_error(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Mean of ``|predictions - labels| / normalizer`` (0 where normalizer is 0):
    ``update(predictions, labels, normalizer, weights=None)``.

    Example:
        >>> m = streaming_mean_relative_error()
        >>> m(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 4.0])); m.compute()
        tensor(0.7500)
    """
    fn = "streaming_mean_relative_error"

    def update(predictions: Any, labels: Any, normalizer: Any, weights: Any = None) -> tuple[Any, ...]:
        p, l = _tensor(fn, "predictions", predictions).float(), _tensor(fn, "labels", labels).float()
        n = _tensor(fn, "normalizer", normalizer).float()
        _same_shape(fn, p, l)
        if n.shape != p.shape:
            raise ValueError(f"{fn}: argument 'normalizer' (shape {tuple(n.shape)}) must have the predictions' shape {tuple(p.shape)}")
        error = (p - l).abs()
        return _weighted(fn, torch.where(n == 0, torch.zeros_like(error), error / n), weights)

    return _mean_metric(_name(fn, name, "mean_relative_error"), update, None, metrics_collections, updates_collections)


def streaming_mean_cosine_distance(
    dim: int, metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Mean of ``1 - sum(predictions * labels, dim)`` (inputs unit-normalised, as TF expects):
    ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_mean_cosine_distance(dim=1)
        >>> m(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])); m.compute()
        tensor(0.5000)
    """
    fn = "streaming_mean_cosine_distance"
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{fn}: argument 'dim' must be an int, got {dim!r}")

    def update(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        p, l = _tensor(fn, "predictions", predictions).float(), _tensor(fn, "labels", labels).float()
        _same_shape(fn, p, l)
        return _weighted(fn, 1.0 - (p * l).sum(dim), weights)

    return _mean_metric(_name(fn, name, "mean_cosine_distance"), update, None, metrics_collections, updates_collections)


def streaming_percentage_less(
    threshold: float, metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Fraction of values below ``threshold``: ``update(values, weights=None)``.

    Example:
        >>> m = streaming_percentage_less(threshold=2.0)
        >>> m(torch.tensor([1.0, 2.0, 3.0, 0.0])); m.compute()
        tensor(0.5000)
    """
    fn = "streaming_percentage_less"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{fn}: argument 'threshold' must be a number, got {threshold!r}")

    def update(values: Any, weights: Any = None) -> tuple[Any, ...]:
        return _weighted(fn, (_tensor(fn, "values", values) < threshold).float(), weights)

    return _mean_metric(_name(fn, name, "percentage_less"), update, None, metrics_collections, updates_collections)


def streaming_recall_at_k(
    k: int, metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """How often ``labels`` is among the ``k`` highest ``predictions``:
    ``update(predictions [batch, classes], labels [batch], weights=None)`` (TF's in_top_k mean).

    Example:
        >>> m = streaming_recall_at_k(k=2)
        >>> scores = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
        >>> m(scores, torch.tensor([2, 2])); m.compute()
        tensor(0.5000)
    """
    fn = "streaming_recall_at_k"
    k = _positive_int(fn, "k", k)

    def update(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        p, l = _tensor(fn, "predictions", predictions), _tensor(fn, "labels", labels)
        if p.dim() != 2 or l.shape != p.shape[:1]:
            raise ValueError(
                f"{fn}: arguments 'predictions' and 'labels' must have shapes [batch, classes] and [batch], "
                f"got {tuple(p.shape)} and {tuple(l.shape)}"
            )
        if k > p.shape[1]:
            raise ValueError(f"{fn}: argument 'k' ({k}) exceeds the number of classes ({p.shape[1]})")
        _integer_dtype(fn, "labels", l, "integer class ids", allow_bool=False)
        label_range(l, 0, p.shape[1])
        return _weighted(fn, (p.topk(k, dim=1).indices == l.unsqueeze(1)).any(1).float(), weights)

    label_range = _ValueCheck(fn, "labels", "class ids in [0, {high}) (the number of classes of 'predictions')")
    return StreamingMetric(_name(fn, name, f"recall_at_{k}"), _Mean(), update, None, metrics_collections,
                           updates_collections, checks=[label_range])


# ---------------------------------------------------------- elementwise means
def streaming_mean_tensor(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """The element-wise mean of equally shaped tensors: ``update(values, weights=None)``.

    Example:
        >>> m = streaming_mean_tensor()
        >>> m(torch.tensor([1.0, 10.0])); m(torch.tensor([3.0, 20.0])); m.compute()
        tensor([ 2., 15.])
    """
    fn = "streaming_mean_tensor"

    def update(values: Any, weights: Any = None) -> tuple[Any, ...]:
        return _weighted(fn, _tensor(fn, "values", values).float(), weights)

    return StreamingMetric(_name(fn, name, "mean_tensor"), _Mean(elementwise=True), update, None,
                           metrics_collections, updates_collections)


def streaming_concat(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Every value given, concatenated along the first axis: ``update(values)``.

    Example:
        >>> m = streaming_concat()
        >>> m(torch.tensor([1, 2])); m(torch.tensor([3])); m.compute()
        tensor([1., 2., 3.])
    """
    fn = "streaming_concat"

    def prepare(values: Any) -> tuple[Any, ...]:
        v = _tensor(fn, "values", values)
        return (v.reshape(1) if v.dim() == 0 else v,)

    return StreamingMetric(_name(fn, name, "concat"), torchmetrics.CatMetric(nan_strategy="disable"), prepare, None,
                           metrics_collections, updates_collections)


# ------------------------------------------------- binary counts and rates
def _count_metric(fn: str, default: str, select: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  metrics_collections: Any, updates_collections: Any, name: str | None) -> StreamingMetric:
    def prepare(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        p, l = _tensor(fn, "predictions", predictions).bool(), _tensor(fn, "labels", labels).bool()
        _same_shape(fn, p, l)
        hits = select(p, l).float()
        w = _weights(fn, weights, hits.shape)
        return ((hits if w is None else hits * w.to(hits.device)).sum(),)

    return StreamingMetric(_name(fn, name, default), torchmetrics.SumMetric(nan_strategy="disable"), prepare, None,
                           metrics_collections, updates_collections)


def streaming_true_positives(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Weighted count of ``predictions & labels`` (both cast to bool): ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_true_positives()
        >>> m(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0])); m.compute()
        tensor(1.)
    """
    return _count_metric("streaming_true_positives", "true_positives", lambda p, l: p & l,
                         metrics_collections, updates_collections, name)


def streaming_false_positives(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Weighted count of ``predictions & ~labels``: ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_false_positives()
        >>> m(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0])); m.compute()
        tensor(1.)
    """
    return _count_metric("streaming_false_positives", "false_positives", lambda p, l: p & ~l,
                         metrics_collections, updates_collections, name)


def streaming_true_negatives(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Weighted count of ``~predictions & ~labels``: ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_true_negatives()
        >>> m(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0])); m.compute()
        tensor(1.)
    """
    return _count_metric("streaming_true_negatives", "true_negatives", lambda p, l: ~p & ~l,
                         metrics_collections, updates_collections, name)


def streaming_false_negatives(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Weighted count of ``~predictions & labels``: ``update(predictions, labels, weights=None)``.

    Example:
        >>> m = streaming_false_negatives()
        >>> m(torch.tensor([0, 1, 0]), torch.tensor([1, 1, 1])); m.compute()
        tensor(2.)
    """
    return _count_metric("streaming_false_negatives", "false_negatives", lambda p, l: ~p & l,
                         metrics_collections, updates_collections, name)


def _binary_metric(fn: str, default: str, metric: torchmetrics.Metric, metrics_collections: Any,
                   updates_collections: Any, name: str | None) -> StreamingMetric:
    def prepare(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        _no_weights(fn, weights, type(metric).__name__)
        p, l = _tensor(fn, "predictions", predictions), _tensor(fn, "labels", labels)
        _same_shape(fn, p, l)
        return _binary(fn, "predictions", p, checks[0]), _binary(fn, "labels", l, checks[1])

    checks = [_ValueCheck(fn, arg, "booleans or the integers 0 and 1") for arg in ("predictions", "labels")]
    return StreamingMetric(_name(fn, name, default), metric, prepare, None, metrics_collections, updates_collections,
                           checks=checks)


def streaming_precision(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """``tp / (tp + fp)`` (0 when nothing was predicted positive) of boolean
    ``predictions`` and ``labels``: ``update(predictions, labels)``; torchmetrics' BinaryPrecision.

    Example:
        >>> m = streaming_precision()
        >>> m(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 1, 1])); m.compute()
        tensor(0.6667)
    """
    return _binary_metric("streaming_precision", "precision", _tmc.BinaryPrecision(validate_args=False),
                          metrics_collections, updates_collections, name)


def streaming_recall(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """``tp / (tp + fn)`` (0 when there was no positive label) of boolean
    ``predictions`` and ``labels``: ``update(predictions, labels)``; torchmetrics' BinaryRecall.

    Example:
        >>> m = streaming_recall()
        >>> m(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 1, 1])); m.compute()
        tensor(0.6667)
    """
    return _binary_metric("streaming_recall", "recall", _tmc.BinaryRecall(validate_args=False),
                          metrics_collections, updates_collections, name)


def streaming_auc(
    num_thresholds: int | None = 200,
    metrics_collections: Any = None,
    updates_collections: Any = None,
    curve: str = "ROC",
    name: str | None = None,
) -> StreamingMetric:
    """Area under the ROC curve (``curve='ROC'``, torchmetrics' BinaryAUROC) or the
    precision-recall curve (``curve='PR'``, torchmetrics' BinaryAveragePrecision) of
    probabilities ``predictions`` in [0, 1] against boolean ``labels``: ``update(predictions, labels)``.

    ``num_thresholds`` evenly spaced thresholds bin the predictions as TF
    does (memory stays constant); ``None`` computes the exact area from every
    prediction. TF's PR area uses the trapezoidal rule; average precision is
    the step-wise sum, which is close but not equal.

    Example:
        >>> m = streaming_auc(num_thresholds=None)
        >>> m(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])); m.compute()
        tensor(0.7500)
    """
    fn = "streaming_auc"
    if num_thresholds is not None:
        num_thresholds = _positive_int(fn, "num_thresholds", num_thresholds)
        if num_thresholds < 2:
            raise ValueError(f"{fn}: argument 'num_thresholds' must be >= 2 or None, got {num_thresholds}")
    if curve == "ROC":
        metric: torchmetrics.Metric = _tmc.BinaryAUROC(thresholds=num_thresholds, validate_args=False)
    elif curve == "PR":
        metric = _tmc.BinaryAveragePrecision(thresholds=num_thresholds, validate_args=False)
    else:
        raise ValueError(f"{fn}: argument 'curve' must be 'ROC' or 'PR', got {curve!r}")

    def prepare(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        _no_weights(fn, weights, type(metric).__name__)
        p, l = _tensor(fn, "predictions", predictions), _tensor(fn, "labels", labels)
        _same_shape(fn, p, l)
        return p.float(), _binary(fn, "labels", l, label_range)

    label_range = _ValueCheck(fn, "labels", "booleans or the integers 0 and 1")
    return StreamingMetric(_name(fn, name, "auc"), metric, prepare, None, metrics_collections, updates_collections,
                           checks=[label_range])


def streaming_mean_iou(
    num_classes: int, metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Mean over classes of ``tp / (tp + fp + fn)``, classes never seen nor predicted
    left out (as TF): ``update(predictions, labels)`` with class ids in ``[0, num_classes)``;
    torchmetrics' MulticlassJaccardIndex.

    Example:
        >>> m = streaming_mean_iou(num_classes=3)
        >>> m(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])); m.compute()   # (1 + 1/2 + 1/2) / 3
        tensor(0.6667)
    """
    fn = "streaming_mean_iou"
    num_classes = _positive_int(fn, "num_classes", num_classes)
    metric = _tmc.MulticlassJaccardIndex(num_classes=max(num_classes, 2), average="macro", validate_args=False)

    def prepare(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        _no_weights(fn, weights, "MulticlassJaccardIndex")
        p, l = _tensor(fn, "predictions", predictions), _tensor(fn, "labels", labels)
        _same_shape(fn, p, l)
        for (arg, t), check in zip((("predictions", p), ("labels", l)), checks):
            _integer_dtype(fn, arg, t, "integer class ids", allow_bool=False)
            check(t, 0, num_classes)
        return p.reshape(-1).long(), l.reshape(-1).long()

    checks = [_ValueCheck(fn, arg, "class ids in [0, {high}) (num_classes)") for arg in ("predictions", "labels")]
    return StreamingMetric(_name(fn, name, "mean_iou"), metric, prepare, None, metrics_collections, updates_collections,
                           checks=checks)


def streaming_pearson_correlation(
    metrics_collections: Any = None, updates_collections: Any = None, name: str | None = None
) -> StreamingMetric:
    """Pearson correlation of ``predictions`` and ``labels`` over every element:
    ``update(predictions, labels)``; torchmetrics' PearsonCorrCoef.

    Example:
        >>> m = streaming_pearson_correlation()
        >>> m(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])); m(torch.tensor([3.0]), torch.tensor([6.5]))
        >>> round(float(m.compute()), 4)
        0.9979
    """
    fn = "streaming_pearson_correlation"

    def prepare(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        _no_weights(fn, weights, "PearsonCorrCoef")
        p, l = _tensor(fn, "predictions", predictions), _tensor(fn, "labels", labels)
        _same_shape(fn, p, l)
        return p.reshape(-1).float(), l.reshape(-1).float()

    return StreamingMetric(_name(fn, name, "pearson_r"), torchmetrics.PearsonCorrCoef(), prepare, None,
                           metrics_collections, updates_collections)


# ------------------------------------------------------------ sparse @ k
class _Ratio(torchmetrics.Metric):
    """``hits / (hits + misses)`` of summed counts; 0 when both are 0."""

    full_state_update = False
    hits: torch.Tensor
    misses: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hits", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("misses", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, hits: torch.Tensor, misses: torch.Tensor) -> None:
        self.hits = self.hits + hits
        self.misses = self.misses + misses

    def compute(self) -> torch.Tensor:
        total = self.hits + self.misses
        return torch.where(total > 0, self.hits / total.clamp(min=1e-30), torch.zeros_like(total))


def _sparse_at_k(fn: str, default: str, k: int, class_id: int | None, precision: bool,
                 metrics_collections: Any, updates_collections: Any, name: str | None) -> StreamingMetric:
    k = _positive_int(fn, "k", k)
    if class_id is not None and (isinstance(class_id, bool) or not isinstance(class_id, int) or class_id < 0):
        raise ValueError(f"{fn}: argument 'class_id' must be None or an int >= 0, got {class_id!r}")

    def prepare(predictions: Any, labels: Any, weights: Any = None) -> tuple[Any, ...]:
        p, l = _tensor(fn, "predictions", predictions), _tensor(fn, "labels", labels)
        if l.dim() == 1:
            l = l.unsqueeze(1)
        if p.dim() != 2 or l.dim() != 2 or l.shape[0] != p.shape[0]:
            raise ValueError(
                f"{fn}: arguments 'predictions' and 'labels' must have shapes [batch, classes] and "
                f"[batch] or [batch, num_labels], got {tuple(p.shape)} and {tuple(labels.shape)}"
            )
        if k > p.shape[1]:
            raise ValueError(f"{fn}: argument 'k' ({k}) exceeds the number of classes ({p.shape[1]})")
        _integer_dtype(fn, "labels", l, "integer class ids (-1 for padding)", allow_bool=False)
        top = p.topk(k, dim=1).indices                                 # [batch, k]
        valid = (l >= 0) & (l < p.shape[1])                             # -1 pads rows of unequal length
        if class_id is not None:
            valid &= l == class_id
        label_in_top = (l.unsqueeze(2) == top.unsqueeze(1)).any(2)     # [batch, num_labels]
        w = torch.ones(p.shape[0], device=p.device)
        if weights is not None:
            w = torch.broadcast_to(_weights(fn, weights, w.shape).to(p.device), w.shape)  # type: ignore[union-attr]
        hits = ((label_in_top & valid).float().sum(1) * w).sum()
        if precision:  # predicted classes that are not labels
            top_in_label = (top.unsqueeze(2) == torch.where(valid, l, -1).unsqueeze(1)).any(2)  # [batch, k]
            counted = top == class_id if class_id is not None else torch.ones_like(top, dtype=torch.bool)
            misses = ((~top_in_label & counted).float().sum(1) * w).sum()
        else:  # labels that are not predicted
            misses = ((~label_in_top & valid).float().sum(1) * w).sum()
        return hits, misses

    return StreamingMetric(_name(fn, name, default), _Ratio(), prepare, None, metrics_collections, updates_collections)


def streaming_sparse_recall_at_k(
    k: int,
    class_id: int | None = None,
    metrics_collections: Any = None,
    updates_collections: Any = None,
    name: str | None = None,
) -> StreamingMetric:
    """Of all labels, the fraction found in the ``k`` top predictions:
    ``update(predictions [batch, classes], labels [batch] or [batch, num_labels], weights=None)``.

    Each row's labels are distinct class ids; ids outside ``[0, classes)``
    (e.g. -1 padding) are ignored, as in TF. ``class_id`` counts only that
    class. ``weights`` weigh rows. 0 when no label was seen.

    Example:
        >>> m = streaming_sparse_recall_at_k(k=1)
        >>> scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
        >>> m(scores, torch.tensor([[1, 2], [1, -1]])); m.compute()      # only label 1 of row 0 is found
        tensor(0.3333)
    """
    return _sparse_at_k("streaming_sparse_recall_at_k", f"recall_at_{k}", k, class_id, False,
                        metrics_collections, updates_collections, name)


def streaming_sparse_precision_at_k(
    k: int,
    class_id: int | None = None,
    metrics_collections: Any = None,
    updates_collections: Any = None,
    name: str | None = None,
) -> StreamingMetric:
    """Of all ``k`` top predictions, the fraction that are labels:
    ``update(predictions [batch, classes], labels [batch] or [batch, num_labels], weights=None)``.

    Labels as in :func:`streaming_sparse_recall_at_k`; ``class_id`` counts
    only the top-k predictions of that class.

    Example:
        >>> m = streaming_sparse_precision_at_k(k=2)
        >>> scores = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3]])
        >>> m(scores, torch.tensor([[1, 2], [1, -1]])); m.compute()      # 2 of row 0's, 0 of row 1's
        tensor(0.5000)
    """
    return _sparse_at_k("streaming_sparse_precision_at_k", f"precision_at_{k}", k, class_id, True,
                        metrics_collections, updates_collections, name)


# ------------------------------------------------------------- aggregation
def _value_update(fn: str, key: str, item: Any) -> tuple[Callable[[], Any], Callable[..., None]]:
    if isinstance(item, StreamingMetric):
        return item.compute, item.update
    if isinstance(item, torchmetrics.Metric):
        return item.compute, item.update
    if isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[0]) and callable(item[1]):
        return item[0], item[1]
    raise TypeError(
        f"{fn}: {key} must be a StreamingMetric, a torchmetrics.Metric or a (value_fn, update_fn) pair, "
        f"got {type(item).__name__}"
    )


def aggregate_metric_map(
    names_to_tuples: Mapping[str, Any],
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[..., None]]]:
    """Splits ``{name: metric}`` into ``(names_to_values, names_to_updates)``, as TF-Slim does.

    ``names_to_values[name]()`` returns the metric's current value and
    ``names_to_updates[name](...)`` adds a batch. A metric may be a
    :class:`StreamingMetric`, a ``torchmetrics.Metric`` or a
    ``(value_fn, update_fn)`` pair. Pass ``names_to_values`` as
    ``final_op`` to :func:`torchslim.evaluation.evaluate_once`.

    Example:
        >>> values, updates = aggregate_metric_map({'acc': streaming_accuracy(), 'mae': streaming_mean_absolute_error()})
        >>> updates['acc'](torch.tensor([1, 0]), torch.tensor([1, 1]))
        >>> values['acc']()
        tensor(0.5000)
    """
    if not isinstance(names_to_tuples, Mapping):
        raise TypeError(
            f"aggregate_metric_map: argument 'names_to_tuples' must be a dict of name -> metric, "
            f"got {type(names_to_tuples).__name__}"
        )
    names_to_values: dict[str, Callable[[], Any]] = {}
    names_to_updates: dict[str, Callable[..., None]] = {}
    for name, item in names_to_tuples.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"aggregate_metric_map: metric names must be non-empty strings, got {name!r}")
        names_to_values[name], names_to_updates[name] = _value_update("aggregate_metric_map", f"metric {name!r}", item)
    return names_to_values, names_to_updates


def aggregate_metrics(*value_update_tuples: Any) -> tuple[list[Callable[[], Any]], list[Callable[..., None]]]:
    """Splits metrics into ``([value_fn, ...], [update_fn, ...])``, in the order given.

    Example:
        >>> (acc_value, mse_value), (acc_update, mse_update) = aggregate_metrics(
        ...     streaming_accuracy(), streaming_mean_squared_error())
        >>> mse_update(torch.tensor([1.0]), torch.tensor([3.0])); mse_value()
        tensor(4.)
    """
    values: list[Callable[[], Any]] = []
    updates: list[Callable[..., None]] = []
    for i, item in enumerate(value_update_tuples):
        value, update = _value_update("aggregate_metrics", f"argument {i}", item)
        values.append(value)
        updates.append(update)
    return values, updates


# ------------------------------------------------------------ discovery
_MAX_DEPTH = 4


def metrics_of(*objs: Any) -> list[StreamingMetric | torchmetrics.Metric]:
    """The metrics reachable from ``objs``: metrics themselves, their bound
    ``compute``/``update``, dicts and lists of those, and the globals and
    closure variables of functions (a few levels deep), in discovery order.

    :func:`torchslim.evaluation.evaluate_once` resets the metrics of its
    ``eval_op`` and ``final_op`` this way before each evaluation, as TF's
    local variable initializer resets its metric variables.

    Example:
        >>> values, updates = aggregate_metric_map({'acc': streaming_accuracy()})
        >>> metrics_of(values)
        [StreamingMetric('accuracy', _Mean)]
    """
    found: dict[int, StreamingMetric | torchmetrics.Metric] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > _MAX_DEPTH:
            return
        seen.add(id(obj))
        if isinstance(obj, (StreamingMetric, torchmetrics.Metric)):
            found.setdefault(id(obj), obj)
        elif isinstance(obj, types.MethodType):
            visit(obj.__self__, depth)
        elif isinstance(obj, Mapping):
            for item in list(obj.values()):
                visit(item, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset, type({}.values()))):
            for item in list(obj):
                visit(item, depth + 1)
        elif isinstance(obj, functools.partial):
            for item in (obj.func, *obj.args, *obj.keywords.values()):
                visit(item, depth + 1)
        elif isinstance(obj, types.FunctionType):
            if (obj.__module__ or "").startswith(("torch.", "torchmetrics")):
                return
            try:
                refs = inspect.getclosurevars(obj)
            except (TypeError, ValueError):
                return
            for item in (*refs.nonlocals.values(), *refs.globals.values(), *(obj.__defaults__ or ())):
                visit(item, depth + 1)

    for obj in objs:
        visit(obj, 0)
    return list(found.values())


def reset_metrics(*objs: Any) -> list[StreamingMetric | torchmetrics.Metric]:
    """Resets every metric :func:`metrics_of` finds in ``objs``; returns them.

    Example:
        >>> m = streaming_mean(); m(torch.tensor(4.0))
        >>> _ = reset_metrics([m]); m(torch.tensor(2.0)); m.compute()
        tensor(2.)
    """
    found = metrics_of(*objs)
    for metric in found:
        metric.reset()
    return found
