"""Variables: TF-Slim's ``slim.variables`` over a model's named tensors.

    import torchslim as slim

    # fine-tune: restore everything but the classifier from a pretrained file
    variables = slim.variables.get_variables_to_restore(model, exclude=['fc'])
    init_fn = slim.variables.assign_from_checkpoint_fn('/tmp/pretrained.pth', variables)
    slim.learning.train(train_op, logdir, data=loader, init_fn=init_fn)

    # moving averages of the weights (TF's ExponentialMovingAverage), evaluated through their names
    ema = slim.variables.ExponentialMovingAverage(0.9999, num_updates=slim.learning.get_or_create_global_step())
    slim.collections.add_to_collection(slim.GraphKeys.UPDATE_OPS, ema.apply(model))
    slim.evaluation.evaluate_once(path, logdir, ..., variables_to_restore=ema.variables_to_restore())

    # a checkpoint whose names differ: map checkpoint names to the model's tensors
    var_list = {'InceptionV3/Conv2d_1a_3x3/weights': model.stem.conv.weight}
    init_fn = slim.variables.assign_from_checkpoint_fn(path, var_list, ignore_missing_vars=True)

A PyTorch model has no graph-wide variable collection, so every query
takes the ``model`` (an ``nn.Module``, or a dict ``name -> tensor``) and
returns an ordered dict ``name -> tensor`` keyed by PyTorch's qualified
(dotted) state-dict names, so names survive filtering. The tensors are the
model's own parameters and buffers: assigning to them changes the model.

TF-Slim's scope filters carry over: ``scope``/``include``/``exclude``
select names that *start with* the given pattern (``re.match``, as TF), so
``'conv1'`` also matches ``'conv10.weight'``; write ``'conv1\\.'`` to be exact.
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchslim import checkpoint as _checkpoint

__all__ = [
    "AssignFn",
    "ExponentialMovingAverage",
    "assign_from_checkpoint_fn",
    "assign_from_values_fn",
    "filter_variables",
    "get_model_variables",
    "get_trainable_variables",
    "get_unique_variable",
    "get_variables",
    "get_variables_by_name",
    "get_variables_by_suffix",
    "get_variables_to_restore",
    "list_checkpoint_variables",
    "load_checkpoint_variables",
    "moving_average_variables",
]

logger = logging.getLogger("torchslim")


# ------------------------------------------------------------------ queries
def _all_variables(model: Any) -> OrderedDict[str, torch.Tensor]:
    """Parameters and persistent buffers (the state dict) of a module, or a validated name->tensor dict."""
    if isinstance(model, nn.Module):
        return OrderedDict(
            (name, t) for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)
        )
    if isinstance(model, Mapping):
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, t in model.items():
            if not isinstance(name, str):
                raise TypeError(f"model dict keys must be variable names (str), got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"model dict value for {name!r} must be a tensor, got {type(t).__name__}")
            out[name] = t
        return out
    raise TypeError(f"model must be a torch.nn.Module or a dict name -> tensor, got {type(model).__name__}")


def _check_optional_str(value: Any, arg: str) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{arg} must be a string or None, got {value!r}")


def _filter(variables: Mapping[str, torch.Tensor], scope: str | None, suffix: str | None):
    _check_optional_str(scope, "scope")
    _check_optional_str(suffix, "suffix")
    pattern = re.compile(scope) if scope else None
    return OrderedDict(
        (n, t)
        for n, t in variables.items()
        if (pattern is None or pattern.match(n)) and (suffix is None or n.endswith(suffix))
    )


def get_variables(model: Any, scope: str | None = None, suffix: str | None = None) -> OrderedDict[str, torch.Tensor]:
    """Every variable of ``model`` (parameters and persistent buffers), filtered by scope and/or suffix.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> list(get_variables(net, scope='1', suffix='running_mean'))
        ['1.running_mean']
    """
    return _filter(_all_variables(model), scope, suffix)


def get_model_variables(
    model: Any, scope: str | None = None, suffix: str | None = None
) -> OrderedDict[str, torch.Tensor]:
    """TF's model variables: parameters plus persistent buffers (moving averages included).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> list(get_model_variables(net))[:4]
        ['0.weight', '0.bias', '1.weight', '1.bias']
    """
    return get_variables(model, scope, suffix)


def get_trainable_variables(
    model: Any, scope: str | None = None, suffix: str | None = None
) -> OrderedDict[str, torch.Tensor]:
    """Parameters with ``requires_grad`` (a dict ``model`` keeps its tensors that require grad).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> _ = net[0].bias.requires_grad_(False)
        >>> list(get_trainable_variables(net))
        ['0.weight', '1.weight', '1.bias']
    """
    variables: OrderedDict[str, torch.Tensor]
    if isinstance(model, nn.Module):
        variables = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    else:
        variables = OrderedDict((n, t) for n, t in _all_variables(model).items() if t.requires_grad)
    return _filter(variables, scope, suffix)


def _check_scopes(value: Any, arg: str) -> None:
    if value is not None:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{arg} is provided but is not a list or a tuple: got {value!r}")
        for s in value:
            if not isinstance(s, str):
                raise TypeError(f"{arg} must hold scope strings, got {s!r}")


def get_variables_to_restore(
    model: Any, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> OrderedDict[str, torch.Tensor]:
    """Variables to restore: those under any ``include`` scope (all if None), minus those under an ``exclude`` scope.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> list(get_variables_to_restore(net, exclude=['2']))
        ['0.weight', '0.bias']
    """
    _check_scopes(include, "include")
    _check_scopes(exclude, "exclude")
    variables = _all_variables(model)
    if include is None:
        selected = OrderedDict(variables)
    else:
        selected = OrderedDict()
        for scope in include:
            for name, t in _filter(variables, scope, None).items():
                selected.setdefault(name, t)
    for scope in exclude or ():
        for name in _filter(variables, scope, None):
            selected.pop(name, None)
    return selected


def get_variables_by_suffix(model: Any, suffix: str, scope: str | None = None) -> OrderedDict[str, torch.Tensor]:
    """Variables whose name ends with ``suffix``.

    Example:
        >>> list(get_variables_by_suffix(nn.Linear(2, 1), 'bias'))
        ['bias']
    """
    if not isinstance(suffix, str) or not suffix:
        raise ValueError(f"suffix must be a non-empty string, got {suffix!r}")
    return get_variables(model, scope, suffix)


def get_variables_by_name(model: Any, given_name: str, scope: str | None = None) -> OrderedDict[str, torch.Tensor]:
    """Variables whose last name component is ``given_name`` (``'weight'`` finds ``'fc.weight'``, not ``'fc.myweight'``).

    Example:
        >>> list(get_variables_by_name(nn.Sequential(nn.Linear(2, 1)), 'weight'))
        ['0.weight']
    """
    if not isinstance(given_name, str) or not given_name:
        raise ValueError(f"given_name must be a non-empty string, got {given_name!r}")
    return OrderedDict(
        (n, t) for n, t in get_variables(model, scope).items() if n == given_name or n.endswith("." + given_name)
    )


def get_unique_variable(model: Any, var_op_name: str) -> torch.Tensor:
    """The variable named exactly ``var_op_name``; ValueError if there is none.

    Example:
        >>> get_unique_variable(nn.Linear(2, 1), 'bias').shape
        torch.Size([1])
    """
    variables = _all_variables(model)
    if var_op_name not in variables:
        candidates = list(_filter(variables, re.escape(var_op_name), None))
        hint = f"; names starting with it: {candidates[:5]}" if candidates else ""
        raise ValueError(f"Couldn't find variable {var_op_name!r}{hint}")
    return variables[var_op_name]


def filter_variables(
    var_list: Any,
    include_patterns: Sequence[str] | None = None,
    exclude_patterns: Sequence[str] | None = None,
    reg_search: bool = True,
) -> OrderedDict[str, torch.Tensor]:
    """Keeps the variables matching any include pattern, then drops those matching an exclude pattern.

    ``reg_search=True`` matches anywhere in the name (``re.search``),
    ``False`` from the start (``re.match``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> list(filter_variables(net, include_patterns=['weight'], exclude_patterns=['^1']))
        ['0.weight']
    """
    _check_scopes(include_patterns, "include_patterns")
    _check_scopes(exclude_patterns, "exclude_patterns")
    find = re.search if reg_search else re.match
    variables = _all_variables(var_list)
    return OrderedDict(
        (n, t)
        for n, t in variables.items()
        if (include_patterns is None or any(find(p, n) for p in include_patterns))
        and not any(find(p, n) for p in exclude_patterns or ())
    )


# -------------------------------------------------------------- checkpoints
def _resolve_path(model_path: Any) -> str:
    if not isinstance(model_path, (str, os.PathLike)) or not str(model_path):
        raise ValueError(f"model_path must be a checkpoint file or directory path, got {model_path!r}")
    path = str(model_path)
    if os.path.isdir(path):
        latest = _checkpoint.latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"model_path {path!r} is a directory with no torchslim checkpoint in it")
        return latest
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model_path {path!r} does not exist")
    return path


def _flatten(prefix: str, value: Any, out: OrderedDict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)


def load_checkpoint_variables(model_path: str) -> OrderedDict[str, torch.Tensor]:
    """The named tensors of a checkpoint, read without executing any code.

    ``model_path`` is a torchslim checkpoint (its ``'model'`` state dict is
    used, plus its moving averages named as :func:`moving_average_variables`;
    integrity is verified), a directory (its newest torchslim
    checkpoint), or a plain ``torch.save`` file of a state dict such as a
    downloaded ``.pth`` (a ``{'state_dict': ...}`` or ``{'model': ...}``
    wrapper is unwrapped). Plain files are read with
    ``torch.load(weights_only=True)``: a file that would run code when
    unpickled is refused with :class:`torchslim.checkpoint.CorruptCheckpointError`.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), 'w.pth')
        >>> torch.save(nn.Linear(2, 1).state_dict(), path)
        >>> list(load_checkpoint_variables(path))
        ['weight', 'bias']
    """
    path = _resolve_path(model_path)
    with open(path, "rb") as f:
        head = f.read(len(_checkpoint.MAGIC))
    averages: OrderedDict[str, torch.Tensor] = OrderedDict()
    if head in (_checkpoint.MAGIC, _checkpoint.MAGIC_V1):
        state: Any = _checkpoint.load_checkpoint(path)
        averages = moving_average_variables(state)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unsafe pickle, a foreign or damaged file
            raise _checkpoint.CorruptCheckpointError(
                path, f"refused to load as a tensor file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    _flatten("", state, tensors)
    tensors.update(averages)
    if not tensors:
        raise ValueError(f"model_path {path!r} holds no named tensors (got a {type(state).__name__})")
    return tensors


def list_checkpoint_variables(model_path: str) -> list[tuple[str, list[int]]]:
    """``(name, shape)`` of every tensor in a checkpoint, as ``tf.train.list_variables``.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), 'w.pth')
        >>> torch.save(nn.Linear(2, 1).state_dict(), path)
        >>> list_checkpoint_variables(path)
        [('weight', [1, 2]), ('bias', [1])]
    """
    return [(n, list(t.shape)) for n, t in load_checkpoint_variables(model_path).items()]


class AssignFn:
    """A no-argument callable that copies prepared values into tensors in place (an ``init_fn``).

    ``names`` lists the source names it assigns, in order.

    Example:
        >>> w = torch.zeros(2)
        >>> fn = AssignFn([('w', w, torch.ones(2))])
        >>> fn(); w
        tensor([1., 1.])
    """

    def __init__(self, assignments: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        self._assignments = list(assignments)
        self.names = list(dict.fromkeys(name for name, _, _ in self._assignments))

    def __call__(self) -> None:
        with torch.no_grad():
            for _, target, value in self._assignments:
                target.copy_(value)

    def __repr__(self) -> str:
        return f"AssignFn({len(self._assignments)} tensors: {self.names[:3]}{'...' if len(self.names) > 3 else ''})"


def _group_targets(var_list: Any) -> OrderedDict[str, list[torch.Tensor]]:
    grouped: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
    if isinstance(var_list, nn.Module):
        var_list = _all_variables(var_list)
    if isinstance(var_list, Mapping):
        items: Iterable[Any] = var_list.items()
    elif isinstance(var_list, (list, tuple)):
        items = var_list
    else:
        raise TypeError(
            f"var_list must be a dict checkpoint_name -> tensor, a list of (name, tensor) pairs or a module, "
            f"got {type(var_list).__name__}"
        )
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(
                f"var_list[{i}] must be a (checkpoint_name, tensor) pair, got {type(item).__name__}; "
                "PyTorch tensors carry no names, so pass a dict such as get_variables_to_restore(model)"
            )
        name, value = item
        if not isinstance(name, str) or not name:
            raise TypeError(f"var_list names must be non-empty strings, got {name!r}")
        targets = list(value) if isinstance(value, (list, tuple)) else [value]
        for t in targets:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"var_list[{name!r}] must be a tensor (or a list of tensors), got {type(t).__name__}")
        grouped.setdefault(name, []).extend(targets)
    return grouped


def _prepare_value(name: str, target: torch.Tensor, value: torch.Tensor, reshape: bool, source: str) -> torch.Tensor:
    if value.shape != target.shape:
        if reshape and value.numel() == target.numel():
            value = value.reshape(target.shape)
        else:
            hint = " (reshape_variables=True would reshape it: same number of elements)" if value.numel() == target.numel() else ""
            raise ValueError(
                f"shape mismatch for variable {name!r}: {source} has shape {list(value.shape)}, "
                f"the model's tensor has shape {list(target.shape)}{hint}"
            )
    return value.detach().to(device=target.device, dtype=target.dtype)


def assign_from_checkpoint_fn(
    model_path: str,
    var_list: Any,
    ignore_missing_vars: bool = False,
    reshape_variables: bool = False,
) -> AssignFn | None:
    """An ``init_fn()`` that copies the tensors of ``var_list`` from a checkpoint, in place.

    Args:
        model_path: a torchslim checkpoint file, a directory (its newest
            checkpoint), or a plain ``torch.save`` state-dict file; see
            :func:`load_checkpoint_variables` (never runs code from the file).
        var_list: a dict ``checkpoint_name -> tensor`` (or list of tensors),
            e.g. :func:`get_variables_to_restore`; names may differ from the
            model's, so checkpoints of other frameworks or versions can be
            mapped; or a list of ``(checkpoint_name, tensor)`` pairs; or a module.
        ignore_missing_vars: skip names missing from the checkpoint with a
            warning instead of raising ValueError.
        reshape_variables: reshape checkpoint values whose shape differs but
            whose number of elements matches.

    The checkpoint is read and every name and shape checked now, so errors
    surface before training starts; the returned callable only copies.
    Returns None (with a warning) when ``ignore_missing_vars`` leaves
    nothing to restore, as TF-Slim does.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), 'w.pth')
        >>> torch.save({'dense/kernel': torch.ones(1, 2)}, path)
        >>> net = nn.Linear(2, 1)
        >>> init_fn = assign_from_checkpoint_fn(path, {'dense/kernel': net.weight})
        >>> init_fn(); net.weight
        Parameter containing:
        tensor([[1., 1.]], requires_grad=True)
    """
    if not isinstance(ignore_missing_vars, bool):
        raise TypeError(f"ignore_missing_vars must be a bool, got {ignore_missing_vars!r}")
    if var_list is None or (not isinstance(var_list, nn.Module) and len(var_list) == 0):
        raise ValueError("var_list cannot be empty")
    grouped = _group_targets(var_list)
    values = load_checkpoint_variables(model_path)
    path = str(model_path)
    missing = [name for name in grouped if name not in values]
    if missing and not ignore_missing_vars:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(
            f"Checkpoint {path!r} is missing variable(s) [{shown}] "
            f"(it has {len(values)} tensors, e.g. {list(values)[:3]}); "
            "pass ignore_missing_vars=True to skip them or map the names in var_list"
        )
    for name in missing:
        logger.warning("Variable %s missing in checkpoint %s", name, path)
    assignments = [
        (name, target, _prepare_value(name, target, values[name], reshape_variables, f"checkpoint {path!r}"))
        for name, targets in grouped.items()
        if name in values
        for target in targets
    ]
    if not assignments:
        logger.warning("No Variables to restore from %s", path)
        return None
    return AssignFn(assignments)


def assign_from_values_fn(var_names_to_values: Mapping[str, Any], var_list: Any) -> AssignFn:
    """An ``init_fn()`` that assigns the given values to the variables of ``var_list`` with those names.

    ``var_list`` (our addition: TF looks names up in its graph) is the model,
    or a dict ``name -> tensor`` such as :func:`get_model_variables`. Every
    name must exist (ValueError otherwise); values (tensors, arrays, lists)
    are reshaped to the variable's shape, as TF does, so their number of
    elements must match.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> init_fn = assign_from_values_fn({'bias': [0.5]}, net)
        >>> init_fn(); net.bias
        Parameter containing:
        tensor([0.5000], requires_grad=True)
    """
    if not isinstance(var_names_to_values, Mapping):
        raise TypeError(f"var_names_to_values must be a dict name -> value, got {type(var_names_to_values).__name__}")
    variables = _all_variables(var_list)
    assignments = []
    for name, raw in var_names_to_values.items():
        if name not in variables:
            close = [n for n in variables if n.endswith(str(name)) or str(name).endswith(n)][:3]
            hint = f"; did you mean {close}?" if close else f"; it has {list(variables)[:5]}..."
            raise ValueError(f"Variable {name!r} wasn't found in var_list{hint}")
        target = variables[name]
        try:
            value = raw if isinstance(raw, torch.Tensor) else torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"value for variable {name!r} is not tensor-like: {e}") from None
        if value.numel() != target.numel():
            raise ValueError(
                f"value for variable {name!r} has shape {list(value.shape)} ({value.numel()} elements), "
                f"the variable has shape {list(target.shape)} ({target.numel()} elements)"
            )
        assignments.append((name, target, _prepare_value(name, target, value, True, "the value")))
    return AssignFn(assignments)


# ------------------------------------------------------------------ moving averages
class _MovingAverageUpdate:
    """The update op :meth:`ExponentialMovingAverage.apply` returns: one fused lerp of the shadows."""

    def __init__(self, ema: ExponentialMovingAverage, names: list[str]) -> None:
        self.moving_average = ema  # the train op checkpoints the averages it finds here
        self.names = names
        self._shadows = [ema._shadows[n] for n in names]
        self._variables = [ema._variables[n].detach() for n in names]  # views: the weights change in place

    def __call__(self) -> None:
        weight = 1.0 - self.moving_average.current_decay()
        with torch.no_grad():
            torch._foreach_lerp_(self._shadows, self._variables, weight)

    def __repr__(self) -> str:
        return f"<update op: {self.moving_average.name} of {len(self.names)} variables>"


class ExponentialMovingAverage:
    """Moving averages of variables, as ``tf.train.ExponentialMovingAverage``.

    ``apply(model)`` makes a shadow copy of each float variable (parameters
    and float buffers of a module, or a dict name -> tensor) and returns an
    update op (add it to ``update_ops`` or the UPDATE_OPS collection) that
    does ``shadow -= (1 - decay) * (shadow - variable)`` for all of them in
    one fused ``torch._foreach_lerp_``. With ``num_updates`` (a GlobalStep,
    usually ``slim.learning.get_or_create_global_step()``, or an int) the
    decay is TF's ``min(decay, (1 + n) / (10 + n))``, ``n`` the global step
    when the op runs (the train op runs update ops before it counts the
    step, so ``n`` is 0 at the first update). The train op checkpoints the
    shadows (under ``'moving_averages'``) and restores them on resume;
    :meth:`variables_to_restore` maps their checkpoint names
    (``'<name>/ExponentialMovingAverage'``) to the model's tensors, so
    ``evaluate_once(..., variables_to_restore=ema.variables_to_restore())``
    evaluates the averaged weights.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad(): _ = net.weight.fill_(0.0)
        >>> ema = ExponentialMovingAverage(0.9)
        >>> update = ema.apply(net)
        >>> with torch.no_grad(): _ = net.weight.fill_(1.0)
        >>> update(); ema.average(net.weight)
        tensor([[0.1000, 0.1000]])
        >>> list(ema.variables_to_restore())
        ['weight/ExponentialMovingAverage']
    """

    def __init__(
        self, decay: float, num_updates: Any = None, zero_debias: bool = False, name: str = "ExponentialMovingAverage"
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1] (e.g. 0.9999), got {decay!r}")
        if num_updates is not None and not (
            (isinstance(num_updates, int) and not isinstance(num_updates, bool)) or hasattr(num_updates, "value")
        ):
            raise ValueError(f"num_updates must be None, an int or a GlobalStep, got {type(num_updates).__name__}")
        if zero_debias:
            raise ValueError("zero_debias=True is not supported (TF uses it only for Adam-style debiasing); leave it False")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
        self.decay = float(decay)
        self.num_updates = num_updates
        self.name = name
        self._variables: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._shadows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._others: OrderedDict[str, torch.Tensor] = OrderedDict()

    def current_decay(self) -> float:
        """The decay the next update uses: ``min(decay, (1 + n) / (10 + n))`` with num_updates, else decay."""
        if self.num_updates is None:
            return self.decay
        n = int(self.num_updates.value if hasattr(self.num_updates, "value") else self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def apply(self, var_list: Any = None) -> _MovingAverageUpdate:
        """Creates shadows of ``var_list`` (a module or a dict name -> tensor) and returns their update op."""
        if var_list is None:
            raise ValueError("var_list must be a module or a dict name -> tensor (PyTorch has no global variable list)")
        variables = _all_variables(var_list)
        names = []
        for name, t in variables.items():
            if not t.is_floating_point():
                if isinstance(var_list, nn.Module):  # e.g. batch norm's num_batches_tracked: restored as it is
                    self._others[name] = t
                    continue
                raise TypeError(f"variable {name!r} has dtype {t.dtype}; only floating point variables can be averaged")
            if name in self._shadows:
                raise ValueError(f"variable {name!r} already has a moving average in {self.name!r}")
            self._variables[name] = t
            self._shadows[name] = t.detach().clone()
            names.append(name)
        return _MovingAverageUpdate(self, names)

    def average_name(self, var: Any) -> str:
        """The checkpoint name of a variable's average: ``'<variable name>/<self.name>'``."""
        return f"{self._name_of(var)}/{self.name}"

    def average(self, var: Any) -> torch.Tensor:
        """The shadow tensor of a variable (given by name or as the tensor itself)."""
        return self._shadows[self._name_of(var)]

    def _name_of(self, var: Any) -> str:
        if isinstance(var, str):
            if var not in self._shadows:
                raise ValueError(f"{var!r} has no moving average in {self.name!r} (averaged: {list(self._shadows)[:5]})")
            return var
        for name, t in self._variables.items():
            if t is var:
                return name
        raise ValueError(f"the tensor of shape {tuple(getattr(var, 'shape', ()))} has no moving average in {self.name!r}")

    def variables_to_restore(self, moving_avg_variables: Any = None) -> OrderedDict[str, torch.Tensor]:
        """``{checkpoint name: model tensor}``: the averages for averaged variables, the plain names for the rest.

        ``moving_avg_variables`` (names or tensors) limits which are taken
        from their averages; default: all averaged variables.
        """
        chosen = set(self._shadows) if moving_avg_variables is None else {self._name_of(v) for v in moving_avg_variables}
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, t in self._variables.items():
            out[f"{name}/{self.name}" if name in chosen else name] = t
        out.update(self._others)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors by variable name (live references)."""
        return dict(self._shadows)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self._shadows if n not in state]
        if missing:
            raise ValueError(f"the checkpoint's moving averages {self.name!r} lack {missing[:5]}")
        with torch.no_grad():
            for name, shadow in self._shadows.items():
                shadow.copy_(state[name])

    def reset(self) -> None:
        """Sets every shadow to its variable's current value."""
        with torch.no_grad():
            torch._foreach_copy_(list(self._shadows.values()), [v.detach() for v in self._variables.values()])


def moving_average_variables(state: Mapping[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """The moving averages of a loaded checkpoint by checkpoint name (``'fc.weight/ExponentialMovingAverage'``).

    Example:
        >>> dict(moving_average_variables({'moving_averages': {'EMA': {'w': torch.ones(1)}}}))
        {'w/EMA': tensor([1.])}
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    averages = state.get("moving_averages")
    if isinstance(averages, Mapping):
        for ema_name, shadows in averages.items():
            if isinstance(shadows, Mapping):
                for name, t in shadows.items():
                    if isinstance(t, torch.Tensor):
                        out[f"{name}/{ema_name}"] = t
    return out
