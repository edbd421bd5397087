"""Finds the nn.Modules a callable uses, so a checkpoint knows what to save.

TF-Slim saves every variable of the graph; an eager callable has no graph,
so torchslim looks at what the callable refers to: an ``nn.Module`` itself,
or the modules its code names (globals, closure cells, default arguments,
bound ``self``), following plain Python functions it calls a few levels
deep. Modules nested in other found modules are dropped, so each parameter
is saved once under its name in its top-level model.
"""
from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

_MAX_DEPTH = 3


def _referenced(fn: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(fn, functools.partial):
        yield from ((f"arg{i}", a) for i, a in enumerate(fn.args))
        yield from fn.keywords.items()
        yield "func", fn.func
        return
    if isinstance(fn, types.MethodType):
        yield "self", fn.__self__
        fn = fn.__func__
    if not isinstance(fn, types.FunctionType):
        call = getattr(type(fn), "__call__", None)  # noqa: B004 (the function itself, to read its closure)
        if isinstance(call, types.FunctionType):  # a callable object: look at its attributes and __call__
            yield from vars(fn).items() if hasattr(fn, "__dict__") else ()
            yield "__call__", types.MethodType(call, fn)
        return
    try:
        closure = inspect.getclosurevars(fn)
    except (TypeError, ValueError):
        return
    yield from closure.nonlocals.items()
    yield from closure.globals.items()
    for i, default in enumerate(fn.__defaults__ or ()):
        yield f"default{i}", default


def _visit(name: str, obj: Any, depth: int, found: dict[int, tuple[str, torch.nn.Module]], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        found.setdefault(id(obj), (name, obj))
        return
    if isinstance(obj, (list, tuple)) and depth < _MAX_DEPTH:
        for i, item in enumerate(obj):
            _visit(f"{name}.{i}", item, depth + 1, found, seen)
        return
    if isinstance(obj, dict) and depth < _MAX_DEPTH:
        for key, item in obj.items():
            if isinstance(key, str):
                _visit(f"{name}.{key}", item, depth + 1, found, seen)
        return
    if depth >= _MAX_DEPTH or not callable(obj) or isinstance(obj, type):
        return
    module_name = getattr(obj, "__module__", "") or ""
    if module_name.startswith(("torch", "torchslim", "numpy", "builtins")):
        return
    for ref_name, ref in _referenced(obj):
        _visit(ref_name, ref, depth + 1, found, seen)


def modules_of(*callables: Any) -> dict[str, torch.nn.Module]:
    """Top-level modules used by ``callables``, keyed by the name they are referred to by.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> def loss(batch):
        ...     return net(batch).sum()
        >>> loss.__module__ = 'my_script'   # a user's function: torchslim's own code is not searched
        >>> list(modules_of(loss))
        ['net']
    """
    found: dict[int, tuple[str, torch.nn.Module]] = {}
    seen: set[int] = set()

    for i, fn in enumerate(callables):
        if isinstance(fn, torch.nn.Module):
            found.setdefault(id(fn), ("model", fn))
        else:
            _visit(f"fn{i}", fn, 0, found, seen)

    modules = list(found.values())
    nested: set[int] = set()
    for _, m in modules:
        for child in m.modules():
            if child is not m:
                nested.add(id(child))
    result: dict[str, torch.nn.Module] = {}
    for name, m in modules:
        # Stateless modules (a CrossEntropyLoss, a ReLU) hold nothing to save; leaving them out keeps the
        # checkpoint's names the same whichever callable (train or eval) the modules were found from.
        if id(m) not in nested and next(iter(m.state_dict()), None) is not None:
            key, n = name, 1
            while key in result:
                n += 1
                key = f"{name}_{n}"
            result[key] = m
    return result


def as_single_module(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """One module whose state_dict covers ``modules``: the module itself when there is one."""
    if len(modules) == 1:
        return next(iter(modules.values()))
    return torch.nn.ModuleDict({k.replace(".", "_"): m for k, m in modules.items()})


def callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
