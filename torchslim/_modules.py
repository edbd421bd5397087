"""Finds the nn.Modules a callable uses, so a checkpoint knows what to save.

TF-Slim saves every variable of the graph; an eager callable has no graph,
so torchslim looks at what the callable refers to: an ``nn.Module`` itself,
or the modules its code names (globals, closure cells, default arguments,
bound ``self``), following plain Python functions it calls a few levels
deep. Modules nested in other found modules are dropped, so each parameter
is saved once under its name in its top-level model.

Wrappers are looked through: a ``DistributedDataParallel`` (or
``DataParallel``) model is saved as its ``.module``, a ``torch.compile``'d one
as its ``._orig_mod``, so checkpoints carry the plain model's names and load
into it with ``strict=True``, whatever wrapped it in training.

    >>> net = torch.nn.Linear(2, 1)
    >>> compiled = torch.compile(net, backend='eager')
    >>> unwrap(compiled) is net, list(as_single_module({'model': compiled}).state_dict())
    (True, ['weight', 'bias'])
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


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting); others as they are.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> unwrap(torch.nn.DataParallel(net)) is net, unwrap(net) is net
        (True, True)
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(module, (DistributedDataParallel, DataParallel)):
            inner = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            inner = module._orig_mod
        else:
            return module
        module = inner


_unwrap = unwrap  # modules_of's argument shadows the function's name


def _visit(name: str, obj: Any, depth: int, found: dict[int, tuple[str, torch.nn.Module]], seen: set[int],
           look_through: bool = True) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        module = unwrap(obj) if look_through else obj
        found.setdefault(id(module), (name, module))
        return
    if isinstance(obj, (list, tuple)) and depth < _MAX_DEPTH:
        for i, item in enumerate(obj):
            _visit(f"{name}.{i}", item, depth + 1, found, seen, look_through)
        return
    if isinstance(obj, dict) and depth < _MAX_DEPTH:
        for key, item in obj.items():
            if isinstance(key, str):
                _visit(f"{name}.{key}", item, depth + 1, found, seen, look_through)
        return
    if depth >= _MAX_DEPTH or not callable(obj) or isinstance(obj, type):
        return
    module_name = getattr(obj, "__module__", "") or ""
    if module_name.startswith(("torch", "torchslim", "numpy", "builtins")):
        return
    for ref_name, ref in _referenced(obj):
        _visit(ref_name, ref, depth + 1, found, seen, look_through)


def modules_of(*callables: Any, unwrap: bool = True) -> dict[str, torch.nn.Module]:
    """Top-level modules used by ``callables``, keyed by the name they are referred to by.

    With ``unwrap`` (the default) a wrapped model (DDP, ``torch.compile``)
    is given as the model inside it.

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

    look_through = unwrap
    for i, fn in enumerate(callables):
        if isinstance(fn, torch.nn.Module):
            module = _unwrap(fn) if look_through else fn
            found.setdefault(id(module), ("model", module))
        else:
            _visit(f"fn{i}", fn, 0, found, seen, look_through)

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
    """One module whose state_dict covers ``modules`` (wrappers looked through): the module itself when there is one.

    Example:
        >>> a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
        >>> as_single_module({'a': a}) is a, sorted(as_single_module({'a': a, 'b': b}).state_dict())
        (True, ['a.bias', 'a.weight', 'b.bias', 'b.weight'])
    """
    plain: dict[str, torch.nn.Module] = {}
    for key, m in modules.items():
        inner = _unwrap(m)
        if all(inner is not other for other in plain.values()):
            plain[key] = inner
    if len(plain) == 1:
        return next(iter(plain.values()))
    return torch.nn.ModuleDict({k.replace(".", "_"): m for k, m in plain.items()})


def callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
