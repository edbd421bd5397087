"""Losses: TF-Slim's ``slim.losses`` (``tf.contrib.losses``) on PyTorch tensors.

    import torchslim as slim

    def total_loss(batch):
        images, labels = batch
        logits = model(images)
        slim.losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1)  # -> LOSSES
        slim.losses.mean_squared_error(aux(images), targets, weights=0.5)      # -> LOSSES
        return slim.losses.get_total_loss()    # sum of LOSSES + REGULARIZATION_LOSSES

Every loss function computes a scalar and adds it to the ``LOSSES``
collection (``loss_collection=None`` to skip). Inside a train step that is
the step's scope, so a step never sees the losses of the step before.

Argument order is TF-Slim's: ``(predictions, labels)`` and
``(logits, onehot_labels)``. ``weights`` is a scalar, a per-example tensor of
shape ``[batch]`` (or ``[batch, 1]``) or a per-element tensor whose shape is a
leading part of the loss's shape; it is broadcast from the left (over the
batch axis first), as in TF-Slim. The default reduction is TF's
``SUM_BY_NONZERO_WEIGHTS``: ``sum(weights * losses) / (number of elements
with a non-zero weight)``, and 0 when every weight is zero.
"""
from __future__ import annotations

import numbers
import sys
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from torchslim import collections as _collections
from torchslim.collections import GraphKeys

__all__ = [
    "Reduction",
    "absolute_difference",
    "add_loss",
    "compute_weighted_loss",
    "cosine_distance",
    "get_losses",
    "get_regularization_losses",
    "get_total_loss",
    "hinge_loss",
    "huber_loss",
    "log_loss",
    "mean_pairwise_squared_error",
    "mean_squared_error",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "sparse_softmax_cross_entropy",
]


class Reduction:
    """How a weighted loss tensor is reduced, as ``tf.losses.Reduction``.

    * ``NONE``: the weighted element-wise losses, unreduced (not added to a collection).
    * ``SUM``: ``sum(weights * losses)``.
    * ``MEAN``: ``sum(weights * losses) / sum(weights)``.
    * ``SUM_OVER_BATCH_SIZE``: ``sum(weights * losses) / number of loss elements``.
    * ``SUM_BY_NONZERO_WEIGHTS`` (default, TF-Slim's only mode):
      ``sum(weights * losses) / number of elements with a non-zero weight``.

    Example:
        >>> Reduction.SUM_BY_NONZERO_WEIGHTS in Reduction.all()
        True
    """

    NONE = "none"
    SUM = "weighted_sum"
    MEAN = "weighted_mean"
    SUM_OVER_BATCH_SIZE = "weighted_sum_over_batch_size"
    SUM_BY_NONZERO_WEIGHTS = "weighted_sum_by_nonzero_weights"

    @classmethod
    def all(cls) -> tuple[str, ...]:
        return (cls.NONE, cls.SUM, cls.MEAN, cls.SUM_OVER_BATCH_SIZE, cls.SUM_BY_NONZERO_WEIGHTS)


# ----------------------------------------------------------------- helpers
def _as_tensor(value: Any, arg: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{arg} must be a tensor or a number, got None")
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{arg} must be a tensor or array-like, got {type(value).__name__}: {e}") from None
    if like is not None and t.device != like.device:
        t = t.to(like.device)
    return t


def _as_float(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    if like is not None and t.dtype != like.dtype and like.is_floating_point():
        return t.to(like.dtype)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} shape {list(a.shape)} is not compatible with {b_name} shape {list(b.shape)}: "
            "they must be equal"
        )


def _check_collection(loss_collection: Any) -> None:
    if loss_collection is not None and (not isinstance(loss_collection, str) or not loss_collection):
        raise ValueError(f"loss_collection must be a collection name or None, got {loss_collection!r}")


def _check_label_smoothing(label_smoothing: Any) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not 0 <= float(label_smoothing) <= 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def _broadcast_weights(losses: torch.Tensor, weights: Any) -> torch.Tensor:
    """Weights broadcast from the left to ``losses.shape`` (TF-Slim's rule)."""
    w = _as_float(_as_tensor(weights, "weights", like=losses), losses)
    if w.dim() > 1 and w.shape[-1] == 1:
        w = w.squeeze(-1)
    if w.dim() > losses.dim():
        raise ValueError(
            f"weights shape {list(w.shape)} has more dimensions than the losses {list(losses.shape)}; "
            "expected a scalar, [batch_size] or a leading part of the losses' shape"
        )
    for i, n in enumerate(w.shape):
        if n not in (1, losses.shape[i]):
            raise ValueError(
                f"weights shape {list(w.shape)} is not compatible with the losses shape {list(losses.shape)}: "
                f"dimension {i} is {n}, expected 1 or {losses.shape[i]} "
                "(weights must be a scalar, [batch_size] or a leading part of the losses' shape)"
            )
    return w.reshape(tuple(w.shape) + (1,) * (losses.dim() - w.dim())).expand(losses.shape)


def compute_weighted_loss(
    losses: torch.Tensor,
    weights: Any = 1.0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weights and reduces element-wise ``losses``; adds the result to ``loss_collection``.

    ``weights`` is broadcast from the left: shape ``[]``, ``[batch]``,
    ``[batch, 1]`` or any leading part of ``losses.shape``. With the default
    reduction the result is ``sum(weights * losses) / count(weights != 0)``
    (0 when every weight is zero). ``scope`` is accepted for TF-Slim
    compatibility; tensors carry no names, so it has no effect.

    Example:
        >>> losses = torch.tensor([[1., 2.], [3., 4.]])
        >>> compute_weighted_loss(losses, weights=torch.tensor([1., 0.]), loss_collection=None)
        tensor(1.5000)
    """
    if not isinstance(losses, torch.Tensor):
        losses = _as_tensor(losses, "losses")
    losses = _as_float(losses)
    if weights is None:
        raise ValueError("weights must be a number or a tensor, got None")
    if reduction not in Reduction.all():
        raise ValueError(f"reduction must be one of {Reduction.all()}, got {reduction!r}")
    _check_collection(loss_collection)
    if isinstance(weights, numbers.Real) and not isinstance(weights, bool) and reduction != Reduction.NONE:
        # fast path for the common scalar weight: no broadcast tensor needed
        w_scalar = float(weights)
        total = losses.sum() * w_scalar if w_scalar != 1.0 else losses.sum()
        if reduction == Reduction.SUM_BY_NONZERO_WEIGHTS:
            loss = total / losses.numel() if w_scalar != 0 and losses.numel() else total * 0.0
        elif reduction == Reduction.MEAN:
            loss = total / (w_scalar * losses.numel()) if w_scalar != 0 and losses.numel() else total * 0.0
        elif reduction == Reduction.SUM_OVER_BATCH_SIZE:
            loss = total / max(losses.numel(), 1)
        else:
            loss = total
        add_loss(loss, loss_collection)
        return loss
    w = _broadcast_weights(losses, weights)
    weighted = losses * w
    if reduction == Reduction.NONE:
        return weighted
    total = weighted.sum()
    if reduction == Reduction.SUM:
        loss = total
    elif reduction == Reduction.MEAN:
        denominator = w.sum()
        loss = torch.where(denominator != 0, total / torch.where(denominator != 0, denominator, 1.0), 0.0)
    elif reduction == Reduction.SUM_OVER_BATCH_SIZE:
        loss = total / max(losses.numel(), 1)
    else:
        num_present = (w != 0).sum()
        loss = total / num_present.clamp(min=1).to(total.dtype)
    add_loss(loss, loss_collection)
    return loss


# ------------------------------------------------------------- collection
def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside this module (seen from add_loss)."""
    level = 2
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def add_loss(loss: torch.Tensor, loss_collection: str | None = GraphKeys.LOSSES) -> None:
    """Adds an externally computed loss to ``loss_collection`` (None: do nothing).

    Example:
        >>> from torchslim.collections import Registry, step_scope
        >>> with Registry().as_default(), step_scope():   # a train step opens a step scope
        ...     add_loss(torch.tensor(0.5))
        ...     get_losses()
        [tensor(0.5000)]
    """
    _check_collection(loss_collection)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss_collection:
        if not _collections.in_step_scope():
            warnings.warn(
                f"a loss was added to {loss_collection!r} outside a train step: it stays there (and in every "
                "get_total_loss) until clear_collection; compute losses inside the train op's loss function, "
                "inside torchslim.collections.step_scope(), or pass loss_collection=None",
                stacklevel=_caller_stacklevel(),
            )
        _collections.add_to_collection(loss_collection, loss)


def get_losses(scope: str | None = None, loss_collection: str = GraphKeys.LOSSES) -> list[Any]:
    """The losses in ``loss_collection``: set-up entries, then the open step's.

    ``scope`` keeps only entries with a matching ``name`` attribute (tensors
    have none, so a scope filters every plain loss tensor out).

    Example:
        >>> from torchslim.collections import Registry, step_scope
        >>> with Registry().as_default(), step_scope():
        ...     _ = mean_squared_error(torch.ones(2), torch.zeros(2))
        ...     len(get_losses())
        1
    """
    return _collections.get_collection(loss_collection, scope)


def get_regularization_losses(scope: str | None = None) -> list[torch.Tensor]:
    """The regularization losses, each evaluated now.

    Entries registered by :func:`torchslim.layers.apply_regularization` (or
    any no-argument callable in ``REGULARIZATION_LOSSES``) are evaluated on
    the parameters' current values, so the result is differentiable and
    follows training; plain tensors added to the collection are returned
    as they are. Penalties that evaluate to None are left out.

    Example:
        >>> import torchslim as slim
        >>> w = torch.nn.Parameter(torch.tensor([3.0]))
        >>> with slim.collections.Registry().as_default():
        ...     _ = slim.layers.apply_regularization(slim.layers.l2_regularizer(0.1), [w])
        ...     with torch.no_grad():
        ...         _ = w.fill_(1.0)                  # the penalty follows the current value
        ...     [round(p.item(), 4) for p in get_regularization_losses()]
        [0.05]
    """
    out: list[torch.Tensor] = []
    for entry in _collections.get_collection(GraphKeys.REGULARIZATION_LOSSES, scope):
        if isinstance(entry, torch.Tensor):
            value = entry
        elif callable(entry):
            value = entry()
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"regularization entry {entry!r} returned {type(value).__name__}, expected a scalar tensor"
                )
        else:
            raise TypeError(
                f"REGULARIZATION_LOSSES holds {type(entry).__name__} {entry!r}; "
                "expected a tensor or a no-argument callable returning one"
            )
        out.append(value)
    return out


def get_total_loss(add_regularization_losses: bool = True, name: str = "total_loss") -> torch.Tensor:
    """The sum of :func:`get_losses` and (by default) :func:`get_regularization_losses`.

    Raises ValueError when there is no loss at all, or when a collected loss
    is not a scalar. ``name`` is accepted for TF-Slim compatibility.

    Example:
        >>> from torchslim.collections import Registry, step_scope
        >>> with Registry().as_default(), step_scope():
        ...     _ = absolute_difference(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
        ...     add_loss(torch.tensor(0.5))
        ...     get_total_loss()
        tensor(2.)
    """
    losses = list(get_losses())
    if add_regularization_losses:
        losses += get_regularization_losses()
    if not losses:
        raise ValueError(
            "get_total_loss found no loss: the LOSSES collection is empty"
            + (" and so is REGULARIZATION_LOSSES" if add_regularization_losses else "")
            + "; call a slim.losses function (or slim.losses.add_loss) first"
        )
    for i, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss #{i} in the collections is not a scalar tensor (got {shape}); reduce it first")
    device = losses[0].device
    total = losses[0].reshape(())
    for loss in losses[1:]:
        total = total + loss.reshape(()).to(device)
    return total


# ------------------------------------------------------------------ losses
def _prepare(predictions: Any, labels: Any, p_name: str = "predictions", l_name: str = "labels"):
    if labels is None:
        raise ValueError(f"{l_name} must be given, got None")
    predictions = _as_float(_as_tensor(predictions, p_name))
    labels = _as_float(_as_tensor(labels, l_name, like=predictions), predictions)
    _check_same_shape(predictions, labels, p_name, l_name)
    return predictions, labels


def absolute_difference(
    predictions: Any,
    labels: Any = None,
    weights: Any = 1.0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted mean of ``|predictions - labels|``, added to LOSSES.

    Example:
        >>> absolute_difference(torch.tensor([[4., 8.], [1., 3.]]), torch.tensor([[1., 9.], [-2., 6.]]))
        tensor(2.5000)
    """
    predictions, labels = _prepare(predictions, labels)
    return compute_weighted_loss((predictions - labels).abs(), weights, scope, loss_collection, reduction)


def mean_squared_error(
    predictions: Any,
    labels: Any = None,
    weights: Any = 1.0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted mean of ``(predictions - labels) ** 2``, added to LOSSES.

    Example:
        >>> mean_squared_error(torch.tensor([1., 2.]), torch.tensor([0., 0.]), weights=torch.tensor([1., 0.]))
        tensor(1.)
    """
    predictions, labels = _prepare(predictions, labels)
    return compute_weighted_loss((predictions - labels).square(), weights, scope, loss_collection, reduction)


def log_loss(
    predictions: Any,
    labels: Any = None,
    weights: Any = 1.0,
    epsilon: float = 1e-7,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted binary log loss of probabilities ``predictions`` against ``labels`` in [0, 1].

    ``-labels * log(predictions + epsilon) - (1 - labels) * log(1 - predictions + epsilon)``.

    Example:
        >>> round(log_loss(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0])).item(), 4)
        0.1643
    """
    predictions, labels = _prepare(predictions, labels)
    losses = -labels * torch.log(predictions + epsilon) - (1 - labels) * torch.log(1 - predictions + epsilon)
    return compute_weighted_loss(losses, weights, scope, loss_collection, reduction)


def hinge_loss(
    logits: Any,
    labels: Any = None,
    weights: Any = 1.0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted hinge loss ``max(0, 1 - y * logits)`` with labels in {0, 1} mapped to y in {-1, 1}.

    As ``tf.losses.hinge_loss`` (weighted, reduced, added to LOSSES).
    ``tf.contrib.losses.hinge_loss`` returned the unreduced losses and added
    nothing: pass ``reduction=Reduction.NONE`` for that.

    Example:
        >>> hinge_loss(torch.tensor([1.2, 0.4, -1.0, -1.1]), torch.tensor([1., 0., 0., 1.]), reduction='none')
        tensor([0.0000, 1.4000, 0.0000, 2.1000])
    """
    logits, labels = _prepare(logits, labels, "logits", "labels")
    signs = 2 * labels - 1
    return compute_weighted_loss(torch.relu(1 - signs * logits), weights, scope, loss_collection, reduction)


def huber_loss(
    predictions: Any,
    labels: Any = None,
    weights: Any = 1.0,
    delta: float = 1.0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted Huber loss, as ``tf.losses.huber_loss``.

    With ``e = |predictions - labels|``: ``0.5 * e**2`` where ``e <= delta``,
    ``0.5 * delta**2 + delta * (e - delta)`` elsewhere. The loss depends only
    on ``|predictions - labels|``, so TF's ``(labels, predictions)`` order
    gives the same value.

    Example:
        >>> huber_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))
        tensor(1.3125)
    """
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not delta > 0:
        raise ValueError(f"delta must be a number > 0, got {delta!r}")
    predictions, labels = _prepare(predictions, labels)
    losses = F.huber_loss(predictions, labels, reduction="none", delta=float(delta))
    return compute_weighted_loss(losses, weights, scope, loss_collection, reduction)


def sigmoid_cross_entropy(
    logits: Any,
    multi_class_labels: Any,
    weights: Any = 1.0,
    label_smoothing: float = 0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted sigmoid cross-entropy of ``logits`` against labels in [0, 1].

    With ``label_smoothing = L > 0`` the labels become ``z * (1 - L) + 0.5 * L``.

    Example:
        >>> sigmoid_cross_entropy(torch.tensor([[100., -100.]]), torch.tensor([[1, 0]])) < 1e-6
        tensor(True)
    """
    smoothing = _check_label_smoothing(label_smoothing)
    logits, labels = _prepare(logits, multi_class_labels, "logits", "multi_class_labels")
    if smoothing > 0:
        labels = labels * (1 - smoothing) + 0.5 * smoothing
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return compute_weighted_loss(losses, weights, scope, loss_collection, reduction)


def _class_indices(logits: torch.Tensor, labels: torch.Tensor, arg: str) -> torch.Tensor | None:
    """Integer class labels as indices of shape logits.shape without dim 1, or None if one-hot."""
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.shape == logits.shape:
        return None
    without_class = logits.shape[:1] + logits.shape[2:]
    if labels.shape == without_class:
        return labels.long()
    if logits.dim() == 2 and labels.shape == (logits.shape[0], 1):
        return labels.reshape(-1).long()
    raise ValueError(
        f"{arg} shape {list(labels.shape)} is not compatible with logits shape {list(logits.shape)}: expected "
        f"one-hot labels of shape {list(logits.shape)} or integer class indices of shape {list(without_class)}"
    )


def _check_indices(indices: torch.Tensor, num_classes: int, arg: str) -> None:
    if not indices.numel():
        return
    low, high = (int(v) for v in torch.stack(torch.aminmax(indices)).tolist())  # one device sync
    if low < 0 or high >= num_classes:
        raise ValueError(f"{arg} holds class indices in [{low}, {high}], expected values in [0, {num_classes})")


def softmax_cross_entropy(
    logits: Any,
    onehot_labels: Any,
    weights: Any = 1.0,
    label_smoothing: float = 0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted softmax cross-entropy over the class axis (dim 1) of ``logits``.

    ``logits`` is ``[batch, num_classes]`` (or ``[batch, num_classes, d1, ...]``,
    PyTorch's layout; the class axis is dim 1). ``onehot_labels`` has the
    logits' shape (one-hot or soft labels). As a convenience, integer class
    indices of shape ``[batch]`` (``[batch, 1]``, or ``[batch, d1, ...]``) are
    accepted too. With ``label_smoothing = L > 0`` the one-hot labels become
    ``onehot * (1 - L) + L / num_classes``. ``weights`` is a scalar or
    per-example (one value per loss element, i.e. per example and position).

    Example:
        >>> logits = torch.tensor([[10., 0., 0.], [0., 10., 0.]])
        >>> softmax_cross_entropy(logits, torch.tensor([[1, 0, 0], [0, 1, 0]])) < 1e-3
        tensor(True)
        >>> softmax_cross_entropy(logits, torch.tensor([0, 1])) < 1e-3       # class indices
        tensor(True)
    """
    smoothing = _check_label_smoothing(label_smoothing)
    logits = _as_float(_as_tensor(logits, "logits"))
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [batch, num_classes, ...], got {list(logits.shape)}")
    labels = _as_tensor(onehot_labels, "onehot_labels", like=logits)
    num_classes = logits.shape[1]
    indices = _class_indices(logits, labels, "onehot_labels")
    if indices is not None:
        _check_indices(indices, num_classes, "onehot_labels")
        if smoothing == 0:
            losses = F.cross_entropy(logits, indices, reduction="none")
            return compute_weighted_loss(losses, weights, scope, loss_collection, reduction)
        labels = F.one_hot(indices, num_classes).movedim(-1, 1)
    labels = _as_float(labels, logits)
    _check_same_shape(logits, labels, "logits", "onehot_labels")
    if smoothing > 0:
        labels = labels * (1 - smoothing) + smoothing / num_classes
    losses = -(labels * F.log_softmax(logits, dim=1)).sum(dim=1)
    return compute_weighted_loss(losses, weights, scope, loss_collection, reduction)


def sparse_softmax_cross_entropy(
    logits: Any,
    labels: Any,
    weights: Any = 1.0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted softmax cross-entropy with integer class ``labels`` of shape ``[batch]`` or ``[batch, 1]``.

    Example:
        >>> sparse_softmax_cross_entropy(torch.tensor([[0., 10., 0.]]), torch.tensor([[1]])) < 1e-3
        tensor(True)
    """
    logits = _as_float(_as_tensor(logits, "logits"))
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [batch, num_classes, ...], got {list(logits.shape)}")
    labels = _as_tensor(labels, "labels", like=logits)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if labels.shape == logits.shape and logits.shape[1] != 1:
        raise ValueError(
            f"labels shape {list(labels.shape)} equals the logits shape: sparse labels are class indices "
            f"of shape {[logits.shape[0], *logits.shape[2:]]}; use softmax_cross_entropy for one-hot labels"
        )
    indices = _class_indices(logits, labels, "labels")
    if indices is None:  # logits [batch, 1] and labels [batch, 1]
        indices = labels.reshape(-1).long()
    _check_indices(indices, logits.shape[1], "labels")
    losses = F.cross_entropy(logits, indices, reduction="none")
    return compute_weighted_loss(losses, weights, scope, loss_collection, reduction)


def mean_pairwise_squared_error(
    predictions: Any,
    labels: Any = None,
    weights: Any = 1.0,
    scope: str | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
) -> torch.Tensor:
    """Weighted mean, over the batch, of the squared differences of all pairs within each example.

    For ``labels = [a, b, c]`` and ``predictions = [x, y, z]`` the loss of the
    example is ``(((a-b)-(x-y))**2 + ((a-c)-(x-z))**2 + ((b-c)-(y-z))**2) / 3``
    (computed in closed form). ``weights`` is a scalar or ``[batch]``. An
    empty batch (or examples of one element, which have no pairs) gives a
    zero loss that still backpropagates, as the other losses do.

    Example:
        >>> mean_pairwise_squared_error(torch.tensor([[1., 2., 3.]]), torch.tensor([[1., 2., 3.]]))
        tensor(0.)
    """
    predictions, labels = _prepare(predictions, labels)
    _check_collection(loss_collection)
    if weights is None:
        raise ValueError("weights must be a number or a tensor, got None")
    if predictions.dim() < 1:
        raise ValueError(f"predictions must have a batch dimension, got shape {list(predictions.shape)}")
    batch = predictions.shape[0]
    diffs = (predictions - labels).reshape(batch, -1) if batch else (predictions - labels).reshape(0, 0)
    w = _as_float(_as_tensor(weights, "weights", like=diffs), diffs)
    if w.dim() > 1 and w.shape[-1] == 1:
        w = w.squeeze(-1)
    if w.dim() > 1 or (w.dim() == 1 and w.shape[0] not in (1, diffs.shape[0])):
        raise ValueError(
            f"weights shape {list(w.shape)} must be a scalar or [batch_size] = [{diffs.shape[0]}] "
            "for mean_pairwise_squared_error"
        )
    w = w.reshape(-1).expand(diffs.shape[0]) if w.dim() else w.expand(diffs.shape[0])
    num_present = (w != 0).to(diffs.dtype) * diffs.shape[1]
    safe = num_present.clamp(min=1)
    term1 = 2.0 * diffs.square().sum(1) / safe
    term2 = 2.0 * diffs.sum(1).square() / safe.square()
    per_example = torch.where(num_present > 0, term1 - term2, torch.zeros_like(term1))
    loss = (per_example * w).sum()
    add_loss(loss, loss_collection)
    return loss


def cosine_distance(
    predictions: Any,
    labels: Any = None,
    axis: int | None = None,
    weights: Any = 1.0,
    scope: str | None = None,
    dim: int | None = None,
    loss_collection: str | None = GraphKeys.LOSSES,
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> torch.Tensor:
    """Weighted ``1 - sum(predictions * labels, axis)``; inputs are assumed unit-normalized.

    ``axis`` is required (``dim`` is its old name); it is reduced away, so
    ``weights`` applies to the remaining shape.

    Example:
        >>> cosine_distance(torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[1., 0.], [1., 0.]]), axis=1)
        tensor(0.5000)
    """
    if axis is not None and dim is not None and axis != dim:
        raise ValueError(f"give axis or its old name dim, not both (axis={axis!r}, dim={dim!r})")
    axis = axis if axis is not None else dim
    if axis is None:
        raise ValueError("cosine_distance needs axis (the dimension along which to compute the distance)")
    predictions, labels = _prepare(predictions, labels)
    if not -predictions.dim() <= axis < predictions.dim():
        raise ValueError(f"axis {axis} is out of range for predictions of shape {list(predictions.shape)}")
    losses = 1 - (predictions * labels).sum(dim=axis)
    return compute_weighted_loss(losses, weights, scope, loss_collection, reduction)

