"""Layers: TF-Slim's ``batch_norm`` with deferred moving-average updates, and regularizers.

    import torchslim as slim

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), slim.layers.batch_norm(16, decay=0.9, scale=True), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 26 * 26, 10))    # 28x28 inputs
    slim.layers.regularize(net, slim.layers.l2_regularizer(1e-4))   # conv/linear weights
    # each train step: forward (batch statistics are held as a pending update),
    # optimizer step, then every op in UPDATE_OPS runs and folds them into
    # moving_mean / moving_variance. create_train_op(..., update_ops=[]) freezes them.

**Batch norm.** :class:`BatchNorm` (alias ``batch_norm``) normalizes over
every axis but the channel axis (dim 1, or the last with
``data_format='NHWC'``); inputs ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``
and ``(N, C, D, H, W)`` work. In training mode it uses the batch statistics
and stores them, detached, as a *pending update*; the ``moving_mean`` and
``moving_variance`` buffers change only when its update op (registered in
``UPDATE_OPS`` at construction) runs: ``moving -= (moving - batch) * (1 - decay)``,
TF's ``assign_moving_average``. In eval mode it uses the moving statistics.
With ``updates_collections=None`` the moving averages are updated in place
during the forward pass, as in TF-Slim. Plain ``torch.nn.BatchNorm*``
layers keep PyTorch's behaviour: they update their running statistics in
every training-mode forward pass, whatever ``update_ops`` says.

**Regularizers.** ``l1_regularizer``/``l2_regularizer``/``l1_l2_regularizer``
return a function ``weights -> scalar tensor`` as in TF.
:func:`apply_regularization` (and :func:`regularize` for a whole module)
registers a set-up entry in ``REGULARIZATION_LOSSES`` that
:func:`torchslim.losses.get_regularization_losses` evaluates on the
parameters' *current* values at every step.
"""
from __future__ import annotations

import logging
import numbers
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import is_lazy

from torchslim import collections as _collections
from torchslim.collections import GraphKeys

__all__ = [
    "BatchNorm",
    "BatchNormUpdate",
    "RegularizationPenalty",
    "apply_regularization",
    "batch_norm",
    "l1_l2_regularizer",
    "l1_regularizer",
    "l2_regularizer",
    "regularize",
    "sum_regularizer",
]

logger = logging.getLogger("torchslim")

Regularizer = Callable[[torch.Tensor], "torch.Tensor | None"]


# ------------------------------------------------------------ regularizers
def _check_scale(scale: Any, arg: str) -> bool:
    """Validates a regularizer scale; True when it disables the regularizer."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{arg} must be a scalar, got a tensor of shape {list(scale.shape)}")
        if scale.is_floating_point():
            scale = scale.item()
        else:
            raise ValueError(f"{arg} cannot be an integer: {scale}")
    if isinstance(scale, numbers.Integral):
        raise ValueError(f"{arg} cannot be an integer: {scale!r} (write {scale}.0 for a float scale)")
    if not isinstance(scale, numbers.Real):
        raise TypeError(f"{arg} must be a float or a scalar float tensor, got {type(scale).__name__}")
    if scale < 0.0:
        raise ValueError(f"Setting a scale less than 0 on a regularizer: {arg}={scale!r}")
    if scale == 0.0:
        logger.info("Scale of 0 disables regularizer.")
        return True
    return False


def _disabled(weights: torch.Tensor) -> None:
    return None


def l1_regularizer(scale: float, scope: str | None = None) -> Regularizer:
    """A function ``weights -> scale * sum(|weights|)``; scale 0.0 gives one returning None.

    Raises ValueError for an integer or negative ``scale``, as TF does.

    Example:
        >>> l1_regularizer(0.5)(torch.tensor([1.0, -2.0]))
        tensor(1.5000)
    """
    if _check_scale(scale, "scale"):
        return _disabled

    def l1(weights: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(scale, dtype=weights.dtype, device=weights.device) * weights.abs().sum()

    l1.__name__ = scope or "l1_regularizer"
    return l1


def l2_regularizer(scale: float, scope: str | None = None) -> Regularizer:
    """A function ``weights -> scale * sum(weights ** 2) / 2`` (TF's ``l2_loss``); scale 0.0 gives None.

    Example:
        >>> l2_regularizer(0.5)(torch.tensor([1.0, -2.0]))
        tensor(1.2500)
    """
    if _check_scale(scale, "scale"):
        return _disabled

    def l2(weights: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(scale, dtype=weights.dtype, device=weights.device) * weights.square().sum() / 2

    l2.__name__ = scope or "l2_regularizer"
    return l2


def sum_regularizer(regularizer_list: Sequence[Regularizer | None], scope: str | None = None) -> Regularizer | None:
    """A function applying the sum of ``regularizer_list`` (None entries dropped); None if all are None.

    Example:
        >>> reg = sum_regularizer([l1_regularizer(1.0), l2_regularizer(2.0)])
        >>> reg(torch.tensor([1.0, -2.0]))
        tensor(8.)
    """
    regs = [r for r in regularizer_list if r is not None]
    for r in regs:
        if not callable(r):
            raise TypeError(f"regularizer_list must hold callables, got {type(r).__name__}")
    if not regs:
        return None

    def sum_reg(weights: torch.Tensor) -> torch.Tensor | None:
        values = [v for v in (r(weights) for r in regs) if v is not None]
        if not values:
            return None
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total

    sum_reg.__name__ = scope or "sum_regularizer"
    return sum_reg


def l1_l2_regularizer(scale_l1: float = 1.0, scale_l2: float = 1.0, scope: str | None = None) -> Regularizer:
    """A function applying ``l1_regularizer(scale_l1) + l2_regularizer(scale_l2)``.

    Example:
        >>> l1_l2_regularizer(1.0, 2.0)(torch.tensor([1.0, -2.0]))
        tensor(8.)
    """
    if isinstance(scale_l1, numbers.Integral):
        raise ValueError(f"scale_l1 cannot be an integer: {scale_l1!r}")
    if isinstance(scale_l2, numbers.Integral):
        raise ValueError(f"scale_l2 cannot be an integer: {scale_l2!r}")
    scope = scope or "l1_l2_regularizer"
    if scale_l1 == 0.0:
        return l2_regularizer(scale_l2, scope)
    if scale_l2 == 0.0:
        return l1_regularizer(scale_l1, scope)
    result = sum_regularizer([l1_regularizer(scale_l1), l2_regularizer(scale_l2)], scope=scope)
    assert result is not None  # both scales are non-zero here
    return result


class RegularizationPenalty:
    """A ``REGULARIZATION_LOSSES`` entry: ``regularizer`` summed over ``weights``, evaluated when called.

    Calling it returns the penalty of the weights' current values (a scalar
    tensor that carries gradients). ``name`` lets ``get_collection(...,
    scope=...)`` filter it.

    Example:
        >>> w = nn.Parameter(torch.tensor([2.0]))
        >>> penalty = RegularizationPenalty(l1_regularizer(0.5), [w])
        >>> penalty().item()
        1.0
    """

    def __init__(self, regularizer: Regularizer, weights: Sequence[torch.Tensor], name: str | None = None) -> None:
        self.regularizer = regularizer
        self.weights = list(weights)
        self.name = name or getattr(regularizer, "__name__", "regularization_penalty")

    def __call__(self) -> torch.Tensor:
        total: torch.Tensor | None = None
        for i, w in enumerate(self.weights):
            p = self.regularizer(w)
            if p is None:
                p = torch.zeros((), dtype=w.dtype, device=w.device)
            elif not isinstance(p, torch.Tensor) or p.dim() != 0:
                rank = p.dim() if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(
                    f"regularizer must return a scalar tensor instead of a tensor with rank {rank} "
                    f"(weights #{i} of shape {list(w.shape)})"
                )
            total = p if total is None else total + p
        assert total is not None  # weights is never empty
        return total

    def __repr__(self) -> str:
        return f"RegularizationPenalty(name={self.name!r}, weights={len(self.weights)})"


def apply_regularization(regularizer: Regularizer, weights_list: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
    """Registers ``regularizer`` over ``weights_list`` in REGULARIZATION_LOSSES; returns the penalty now.

    The entry persists (outside a step scope) and is re-evaluated on the
    weights' current values by every ``get_regularization_losses()`` /
    ``get_total_loss()``. Raises ValueError when there are no weights
    (TF falls back to a ``WEIGHTS`` collection that PyTorch has no twin of).

    Example:
        >>> from torchslim.collections import Registry
        >>> w = nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> with Registry().as_default():      # a fresh registry; usually the default one
        ...     apply_regularization(l2_regularizer(0.5), [w]).item()
        1.25
    """
    if not callable(regularizer):
        raise TypeError(f"regularizer must be a callable weights -> scalar tensor, got {type(regularizer).__name__}")
    if isinstance(weights_list, torch.Tensor):
        weights_list = [weights_list]
    weights = list(weights_list or [])
    if not weights:
        raise ValueError("No weights to regularize: weights_list is empty")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights_list[{i}] must be a tensor/parameter, got {type(w).__name__}")
        if is_lazy(w):
            raise ValueError(
                f"weights_list[{i}] is an uninitialized lazy parameter; run one forward pass "
                "(or give the layer its input size) before registering a regularizer"
            )
    penalty = RegularizationPenalty(regularizer, weights)
    value = penalty()  # validates the regularizer's output before registering
    _collections.add_to_collection(GraphKeys.REGULARIZATION_LOSSES, penalty)
    return value


_WEIGHT_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)


def regularize(
    model: nn.Module,
    regularizer: Regularizer,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> torch.Tensor:
    """Registers ``regularizer`` over parameters of ``model``; returns the penalty now.

    By default it takes the ``weight`` of every ``Linear``, ``Bilinear`` and
    convolution (transposed too) layer: TF-Slim's ``weights_regularizer`` on
    ``conv2d``/``fully_connected``; biases and normalization parameters are
    left out. ``include`` instead selects every parameter whose qualified
    name matches one of its patterns (``re.match``, e.g. ``['fc', 'conv1\\.']``);
    ``exclude`` then drops matches. Raises ValueError when nothing is selected.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> from torchslim.collections import Registry, get_collection
        >>> with Registry().as_default():
        ...     _ = regularize(net, l2_regularizer(1e-4))
        ...     [len(p.weights) for p in get_collection(GraphKeys.REGULARIZATION_LOSSES)]
        [1]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include = _check_patterns(include, "include")
    exclude = _check_patterns(exclude, "exclude")
    selected: dict[str, torch.Tensor] = {}
    if include is None:
        for mod_name, module in model.named_modules():
            if isinstance(module, _WEIGHT_LAYERS) and isinstance(getattr(module, "weight", None), torch.Tensor):
                selected[f"{mod_name}.weight" if mod_name else "weight"] = module.weight
    else:
        for name, p in model.named_parameters():
            if any(re.match(pat, name) for pat in include):
                selected[name] = p
    if exclude:
        selected = {n: p for n, p in selected.items() if not any(re.match(pat, n) for pat in exclude)}
    if not selected:
        raise ValueError(
            f"No weights to regularize in {type(model).__name__} (include={include!r}, exclude={exclude!r})"
        )
    unique = list({id(p): p for p in selected.values()}.values())
    return apply_regularization(regularizer, unique)


def _check_patterns(patterns: Any, arg: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise TypeError(f"{arg} must be a list or tuple of name patterns, got {patterns!r}")
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must hold strings, got {p!r}")
    return list(patterns)


# ------------------------------------------------------------- batch norm
class BatchNormUpdate:
    """The update op of a :class:`BatchNorm`: folds its pending batch statistics into the moving averages.

    Holds the layer by weak reference; calling it after the layer is gone,
    or when no training-mode forward pass happened since the last call, does
    nothing. Returns True when it applied an update.

    Example:
        >>> bn = BatchNorm(2, decay=0.5)
        >>> _ = bn(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> bn.update_op(), bn.moving_mean
        (True, tensor([1., 2.]))
    """

    def __init__(self, module: BatchNorm, name: str) -> None:
        self._module = weakref.ref(module)
        self.name = name

    @property
    def module(self) -> BatchNorm | None:
        return self._module()

    def __call__(self) -> bool:
        module = self._module()
        return False if module is None else module.apply_pending_update()

    def __repr__(self) -> str:
        return f"BatchNormUpdate(name={self.name!r}, alive={self._module() is not None})"


_PARAM_KEYS = ("beta", "gamma", "moving_mean", "moving_variance")


class BatchNorm(nn.Module):
    """Batch normalization as TF-Slim's ``batch_norm``, with update-op moving averages.

    Args (TF-Slim's names and defaults):
        num_features: the number of channels C (TF infers it from the input).
        decay: moving average decay, ``moving -= (moving - batch) * (1 - decay)``.
        center: add the learned offset ``beta``.
        scale: multiply by the learned ``gamma`` (off by default, as in TF-Slim).
        epsilon: added to the variance.
        activation_fn: applied to the output, e.g. ``torch.relu``.
        param_initializers: dict with keys among beta, gamma, moving_mean,
            moving_variance; values are numbers (fill) or in-place initializers
            such as ``torch.nn.init.ones_``.
        param_regularizers: dict with keys beta/gamma -> regularizer, registered
            with :func:`apply_regularization`.
        updates_collections: collection name(s) the update op goes into
            (default UPDATE_OPS); None updates the moving averages in place
            during the forward pass.
        is_training: None (default) follows ``module.train()``/``eval()``;
            True/False fixes the mode regardless.
        trainable: False freezes beta and gamma (``requires_grad=False``).
        fused: None/True: the moving variance accumulates the unbiased
            (n/(n-1)) batch variance, as TF's fused kernel (TF-Slim's default
            path) and PyTorch do; False: the biased variance, as TF's
            non-fused ``nn.moments`` path. Normalization always uses the
            biased batch variance.
        data_format: 'NCHW' (channels at dim 1, PyTorch's layout; default) or
            'NHWC' (channels last).
        scope: name of the update op, for ``get_collection(scope=...)``.

    Several training forward passes before the update op runs leave the
    statistics of the last one pending (a TF graph runs its forward once).

    Example:
        >>> bn = batch_norm(3, decay=0.9)
        >>> y = bn(torch.randn(8, 3) + 5)
        >>> bool((bn.moving_mean == 0).all())        # nothing changes until the update op runs
        True
        >>> bn.update_op()                           # what the train op runs after the optimizer step
        True
        >>> bool((bn.moving_mean > 0).all())
        True
    """

    num_features: int
    decay: float
    center: bool
    scale: bool
    epsilon: float
    activation_fn: Callable[[torch.Tensor], torch.Tensor] | None
    updates_collections: tuple[str, ...] | None
    is_training: bool | None
    fused: bool | None
    data_format: str
    scope: str
    beta: nn.Parameter | None
    gamma: nn.Parameter | None
    moving_mean: torch.Tensor
    moving_variance: torch.Tensor

    def __init__(
        self,
        num_features: int,
        decay: float = 0.999,
        center: bool = True,
        scale: bool = False,
        epsilon: float = 0.001,
        activation_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        param_initializers: Mapping[str, Any] | None = None,
        param_regularizers: Mapping[str, Regularizer | None] | None = None,
        updates_collections: str | Sequence[str] | None = GraphKeys.UPDATE_OPS,
        is_training: bool | None = None,
        trainable: bool = True,
        fused: bool | None = None,
        data_format: str = "NCHW",
        scope: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1 (the channel count), got {num_features!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0:
            raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}")
        if activation_fn is not None and not callable(activation_fn):
            raise TypeError(f"activation_fn must be callable or None, got {type(activation_fn).__name__}")
        if is_training is not None and not isinstance(is_training, bool):
            raise TypeError(f"is_training must be None, True or False, got {is_training!r}")
        if data_format not in ("NCHW", "NHWC"):
            raise ValueError(f"data_format must be 'NCHW' or 'NHWC', got {data_format!r}")
        if updates_collections is not None:
            names = [updates_collections] if isinstance(updates_collections, str) else list(updates_collections)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"updates_collections must be None, a collection name or a list of names, got {updates_collections!r}"
                )
            updates_collections = tuple(dict.fromkeys(names))
        self.num_features = num_features
        self.decay = float(decay)
        self.center = bool(center)
        self.scale = bool(scale)
        self.epsilon = float(epsilon)
        self.activation_fn = activation_fn
        self.updates_collections = updates_collections
        self.is_training = is_training
        self.fused = fused
        self.data_format = data_format
        self.scope = scope or "BatchNorm"
        factory = {"device": device, "dtype": dtype}
        self.beta = nn.Parameter(torch.zeros(num_features, **factory), requires_grad=trainable) if center else None
        self.gamma = nn.Parameter(torch.ones(num_features, **factory), requires_grad=trainable) if scale else None
        self.register_buffer("moving_mean", torch.zeros(num_features, **factory))
        self.register_buffer("moving_variance", torch.ones(num_features, **factory))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._init_params(param_initializers)
        self._register_regularizers(param_regularizers)
        self.update_op: BatchNormUpdate | None = None
        self._register_update_op()

    # -- set-up --------------------------------------------------------------
    def _init_params(self, initializers: Mapping[str, Any] | None) -> None:
        if not initializers:
            return
        if not isinstance(initializers, Mapping):
            raise TypeError(f"param_initializers must be a dict, got {type(initializers).__name__}")
        unknown = set(initializers) - set(_PARAM_KEYS)
        if unknown:
            raise ValueError(f"param_initializers has unknown keys {sorted(unknown)}; expected some of {_PARAM_KEYS}")
        with torch.no_grad():
            for key, init in initializers.items():
                target = getattr(self, key)
                if target is None:
                    continue  # beta without center / gamma without scale: TF ignores it too
                if isinstance(init, (numbers.Real, torch.Tensor)) and not isinstance(init, bool):
                    target.copy_(torch.as_tensor(init, dtype=target.dtype).expand_as(target))
                elif callable(init):
                    init(target)
                else:
                    raise TypeError(
                        f"param_initializers[{key!r}] must be a number, a tensor or an in-place initializer, "
                        f"got {type(init).__name__}"
                    )

    def _register_regularizers(self, regularizers: Mapping[str, Regularizer | None] | None) -> None:
        if not regularizers:
            return
        if not isinstance(regularizers, Mapping):
            raise TypeError(f"param_regularizers must be a dict, got {type(regularizers).__name__}")
        unknown = set(regularizers) - {"beta", "gamma"}
        if unknown:
            raise ValueError(f"param_regularizers has unknown keys {sorted(unknown)}; expected some of beta, gamma")
        for key, reg in regularizers.items():
            param = getattr(self, key)
            if reg is not None and param is not None:
                apply_regularization(reg, [param])

    def _register_update_op(self) -> None:
        self.update_op = None
        if self.updates_collections is None:
            return
        op = BatchNormUpdate(self, f"{self.scope}/AssignMovingAvg")
        self.update_op = op
        registry = _collections.get_default_registry()
        for name in self.updates_collections:
            _collections.add_to_collection(name, op)
            weakref.finalize(self, registry.remove, name, op)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["update_op"] = None
        state["_pending"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (copy.deepcopy, pickling to a worker) gets its own update op.
        super().__setstate__(state)
        self._pending = None
        self._register_update_op()

    def reset_parameters(self) -> None:
        """Resets beta to 0, gamma to 1 and the moving statistics to 0 and 1."""
        with torch.no_grad():
            if self.beta is not None:
                self.beta.zero_()
            if self.gamma is not None:
                self.gamma.fill_(1.0)
            self.moving_mean.zero_()
            self.moving_variance.fill_(1.0)
        self._pending = None

    # -- running -------------------------------------------------------------
    @property
    def has_pending_update(self) -> bool:
        """True when a training forward pass left statistics the update op has not applied yet."""
        return self._pending is not None

    def apply_pending_update(self) -> bool:
        """Folds the pending batch statistics into the moving averages; False if there were none."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        self._assign_moving_average(*pending)
        return True

    def _assign_moving_average(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        with torch.no_grad():
            for moving, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
                moving.sub_((moving - value.to(moving.dtype)) * (1.0 - self.decay))

    def _training(self) -> bool:
        return self.training if self.is_training is None else self.is_training

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.dim() < 2:
            raise ValueError(f"inputs must have shape (N, C, ...), got {list(inputs.shape)}")
        channels_last = self.data_format == "NHWC"
        x = inputs.movedim(-1, 1) if channels_last and inputs.dim() > 2 else inputs
        if x.shape[1] != self.num_features:
            axis = "last" if channels_last else "1"
            raise ValueError(
                f"inputs has {x.shape[1]} channels (dim {axis} of shape {list(inputs.shape)}), "
                f"this batch_norm was built for num_features={self.num_features}"
            )
        if self._training():
            count = x.numel() // x.shape[1]
            if count < 2:
                raise ValueError(
                    f"batch_norm in training mode needs more than 1 value per channel, got inputs of shape "
                    f"{list(inputs.shape)}"
                )
            # momentum=1.0 makes F.batch_norm write the batch mean and the unbiased
            # batch variance into these fresh tensors in its fused kernel.
            batch_mean = torch.zeros_like(self.moving_mean)
            batch_var = torch.ones_like(self.moving_variance)
            out = F.batch_norm(x, batch_mean, batch_var, self.gamma, self.beta, True, 1.0, self.epsilon)
            if self.fused is False:
                batch_var = batch_var * ((count - 1) / count)
            if self.updates_collections is None:
                self._assign_moving_average(batch_mean, batch_var)
            else:
                self._pending = (batch_mean, batch_var)
        else:
            out = F.batch_norm(
                x, self.moving_mean, self.moving_variance, self.gamma, self.beta, False, 0.0, self.epsilon
            )
        if channels_last and inputs.dim() > 2:
            out = out.movedim(1, -1)
        if self.activation_fn is not None:
            out = self.activation_fn(out)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, decay={self.decay}, center={self.center}, scale={self.scale}, "
            f"epsilon={self.epsilon}, updates_collections={self.updates_collections}, "
            f"is_training={self.is_training}, data_format={self.data_format!r}"
        )


batch_norm = BatchNorm
"""TF-Slim's name: ``slim.layers.batch_norm(64)`` builds a :class:`BatchNorm`."""
