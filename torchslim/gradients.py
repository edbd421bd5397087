"""Gradient helpers and the numerics check of the train op: TF-Slim's clip/multiply/summarise, dense or sparse.

    grads_and_vars = [(p.grad, p) for p in model.parameters()]
    slim.learning.multiply_gradients(grads_and_vars, {model.fc.weight: 10.0})   # multipliers first
    slim.learning.clip_gradient_norms(grads_and_vars, 4.0)                       # then per-tensor clipping

Sparse COO gradients (``nn.Embedding(sparse=True)``) are accepted everywhere:
clipping uses the norm of the coalesced values (the norm of the dense
gradient), the numerics check and the summaries look at the values.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["add_gradients_summaries", "clip_gradient_norms", "multiply_gradients"]

logger = logging.getLogger("torchslim")

GradsAndVars = Sequence[tuple[Any, Any]]


def values_of(grad: torch.Tensor) -> torch.Tensor:
    """The dense tensor holding a gradient's numbers: itself, or a sparse COO gradient's values."""
    return grad._values() if grad.is_sparse else grad


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce() if grad.is_sparse and not grad.is_coalesced() else grad


def clip_by_norm_(grads: list[torch.Tensor], max_norm: float) -> None:
    """``g *= min(1, max_norm / ||g||)`` for each dense tensor, in a few fused foreach calls."""
    if not grads:
        return
    coef = torch._foreach_norm(grads)
    # One foreach call takes all plain tensors or all DTensors, so the first norm tells what they all are.
    if type(coef[0]) is torch.Tensor:
        torch._foreach_reciprocal_(coef)  # in place: one list of tensors fewer (7% of a CPU clip at 1,000 tensors)
    else:  # a sharded (DTensor) gradient's norm is a pending reduction that an in-place op can't keep
        coef = torch._foreach_reciprocal(coef)
    torch._foreach_mul_(coef, max_norm)
    torch._foreach_clamp_max_(coef, 1.0)  # exactly 1.0 for the gradients left as they are
    torch._foreach_mul_(grads, coef)


def clip_gradient_norms(gradients_to_variables: GradsAndVars, max_norm: float) -> list[tuple[Any, Any]]:
    """Clips each gradient to ``max_norm`` by its own L2 norm (TF's ``clip_by_norm``, per tensor).

    None gradients pass through. The gradients are clipped in place and the
    list of pairs is returned, as TF-Slim does. A sparse COO gradient is
    coalesced (the returned pair holds the coalesced tensor) and clipped by
    the norm of its values.

    Example:
        >>> g = torch.tensor([3.0, 4.0]); v = torch.zeros(2)
        >>> clip_gradient_norms([(g, v)], 1.0)[0][0]
        tensor([0.6000, 0.8000])
    """
    if not isinstance(gradients_to_variables, (list, tuple)):
        raise ValueError(f"gradients_to_variables must be a list of (gradient, variable) pairs, got {type(gradients_to_variables).__name__}")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0 or max_norm == float("inf"):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    pairs = [(None if g is None else coalesced(g), v) for g, v in gradients_to_variables]
    clip_by_norm_([values_of(g) for g, _ in pairs if g is not None], float(max_norm))
    return pairs


def multiply_gradients(
    grads_and_vars: GradsAndVars,
    gradient_multipliers: Mapping[Any, Any],
    names: Mapping[str, Any] | None = None,
) -> list[tuple[Any, Any]]:
    """Multiplies the gradients of the named or given variables (in place); returns the pairs.

    Keys of ``gradient_multipliers`` are parameters, or parameter names
    resolved through ``names`` (name -> parameter, e.g.
    ``dict(model.named_parameters())``). Values are numbers or tensors.
    Sparse COO gradients are multiplied too.

    Example:
        >>> v = torch.nn.Parameter(torch.zeros(2)); g = torch.ones(2)
        >>> multiply_gradients([(g, v)], {v: 3.0})[0][0]
        tensor([3., 3.])
    """
    if not isinstance(grads_and_vars, list):
        raise ValueError(f"grads_and_vars must be a list, got {type(grads_and_vars).__name__}")
    if not isinstance(gradient_multipliers, Mapping) or not gradient_multipliers:
        raise ValueError(f"gradient_multipliers must be a non-empty dictionary, got {gradient_multipliers!r}")
    by_id = resolve_multipliers(gradient_multipliers, names)
    for grad, var in grads_and_vars:
        m = by_id.get(id(var))
        if m is None:
            continue
        if grad is None:
            raise ValueError(f"Requested multiple of `None` gradient (variable {describe_var(var, names)})")
        values_of(grad).mul_(m)
    return grads_and_vars


def describe_var(var: Any, names: Mapping[str, Any] | None) -> str:
    for name, v in (names or {}).items():
        if v is var:
            return repr(name)
    return f"of shape {tuple(var.shape)}" if hasattr(var, "shape") else repr(var)


def resolve_multipliers(gradient_multipliers: Mapping[Any, Any], names: Mapping[str, Any] | None) -> dict[int, Any]:
    by_id: dict[int, Any] = {}
    for key, multiplier in gradient_multipliers.items():
        if isinstance(key, str):
            if names is None or key not in names:
                known = ", ".join(sorted(names or {})[:8]) or "none known"
                raise ValueError(f"gradient_multipliers names variable {key!r}, which is not a parameter (known: {known})")
            key = names[key]
        if not isinstance(key, torch.Tensor):
            raise ValueError(f"gradient_multipliers keys must be parameters or parameter names, got {type(key).__name__}")
        if not isinstance(multiplier, (int, float, torch.Tensor)) or isinstance(multiplier, bool):
            raise ValueError(f"gradient_multipliers values must be numbers or tensors, got {multiplier!r}")
        by_id[id(key)] = multiplier
    return by_id


def add_gradients_summaries(grads_and_vars: GradsAndVars, names: Mapping[str, Any] | None = None) -> list[Any]:
    """Records a histogram '<name>/gradient' and a scalar '<name>/gradient_norm' per gradient.

    Variables are named through ``names`` (name -> parameter), or given as
    names directly. None gradients are skipped with a log line, as TF-Slim.
    A sparse gradient is summarised by its (coalesced) values, as TF-Slim
    summarises ``IndexedSlices``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> len(add_gradients_summaries([(torch.ones(2), w)], {'w': w}))
        2
    """
    from torchslim import summaries

    by_id = {id(v): n for n, v in (names or {}).items()}
    named = []
    for grad, var in grads_and_vars:
        name = var if isinstance(var, str) else by_id.get(id(var))
        if name is None:
            raise ValueError(f"cannot name variable {describe_var(var, None)}; pass names= (name -> parameter)")
        if grad is None:
            logger.info("Var %s has no gradient", name)
            continue
        named.append((name, values_of(coalesced(grad)) if grad.is_sparse else grad))
    return summaries.add_gradient_summaries(named)
