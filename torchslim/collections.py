"""Collections: TF's graph collections as a small, thread-safe registry.

    import torchslim as slim

    slim.collections.add_to_collection(slim.GraphKeys.UPDATE_OPS, my_update_fn)
    slim.collections.get_collection(slim.GraphKeys.UPDATE_OPS)   # [my_update_fn]

    with slim.collections.step_scope():          # what each train step opens
        slim.collections.add_to_collection(slim.GraphKeys.LOSSES, loss)
        slim.collections.get_collection(slim.GraphKeys.LOSSES)   # [loss]
    slim.collections.get_collection(slim.GraphKeys.LOSSES)       # []

Two lifetimes, as design.md describes:

* set-up entries (update ops, regularizers, watched tensors, queue runners)
  are added outside any step and persist in the current :class:`Registry`;
* per-step entries (losses and summaries computed inside ``total_loss``) are
  added while a :func:`step_scope` is open and vanish when it closes, so a
  step never sees the losses of the step before.

``get_collection`` returns the persistent entries followed by the open
step's. The step scope is held in a ``contextvars.ContextVar``, so each
thread (a queue runner, the summary writer) sees its own; the registry is
shared by all threads and guarded by a lock.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "GraphKeys",
    "Registry",
    "add_to_collection",
    "add_to_collections",
    "clear_collection",
    "get_collection",
    "get_default_registry",
    "in_step_scope",
    "reset",
    "step_scope",
]


class GraphKeys:
    """The standard collection names, as in ``tf.GraphKeys``."""

    UPDATE_OPS = "update_ops"
    LOSSES = "losses"
    REGULARIZATION_LOSSES = "regularization_losses"
    SUMMARIES = "summaries"
    MODEL_VARIABLES = "model_variables"
    QUEUE_RUNNERS = "queue_runners"
    TRAIN_OP = "train_op"
    GLOBAL_STEP = "global_step"


class Registry:
    """A set of named collections (the part of a TF graph torchslim keeps).

    Example:
        >>> reg = Registry()
        >>> with reg.as_default():
        ...     add_to_collection('my_things', 1)
        ...     get_collection('my_things')
        [1]
        >>> get_collection('my_things')
        []
    """

    def __init__(self) -> None:
        # Re-entrant: a weakref finalizer (e.g. a batch norm's update op leaving UPDATE_OPS) may run
        # during a garbage collection that happens while this thread holds the lock.
        self._lock = threading.RLock()
        self._collections: dict[str, list[Any]] = {}

    def add(self, name: str, value: Any) -> None:
        with self._lock:
            self._collections.setdefault(name, []).append(value)

    def get(self, name: str) -> list[Any]:
        with self._lock:
            return list(self._collections.get(name, ()))

    def clear(self, name: str | None = None) -> None:
        # Entries are dropped after the lock is released: freeing them may run finalizers that call remove().
        with self._lock:
            if name is None:
                dropped: Any = self._collections
                self._collections = {}
            else:
                dropped = self._collections.pop(name, None)
        del dropped

    def remove(self, name: str, value: Any) -> None:
        """Removes every entry of ``name`` that is ``value`` (identity)."""
        with self._lock:
            items = self._collections.get(name)
            if items:
                self._collections[name] = [v for v in items if v is not value]
        del items

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._collections)

    @contextlib.contextmanager
    def as_default(self) -> Iterator[Registry]:
        """Makes this registry the current one for the enclosed block."""
        token = _registry.set(self)
        try:
            yield self
        finally:
            _registry.reset(token)


_GLOBAL = Registry()
_registry: contextvars.ContextVar[Registry] = contextvars.ContextVar("torchslim_registry", default=_GLOBAL)
_step: contextvars.ContextVar[dict[str, list[Any]] | None] = contextvars.ContextVar("torchslim_step", default=None)


def get_default_registry() -> Registry:
    """Returns the registry that set-up entries go into now."""
    return _registry.get()


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"collection name must be a non-empty string, got {name!r}")


def add_to_collection(name: str, value: Any) -> None:
    """Adds ``value`` to collection ``name``.

    Inside a :func:`step_scope` the entry lives until the step ends;
    outside, it persists in the current registry.

    Example:
        >>> add_to_collection('my_ops', print)
        >>> print in get_collection('my_ops')
        True
        >>> clear_collection('my_ops')
    """
    _check_name(name)
    _append(name, value)


def _append(name: str, value: Any) -> None:
    """add_to_collection for a name known to be good (the summary functions' GraphKeys.SUMMARIES)."""
    step = _step.get()
    if step is not None:
        step.setdefault(name, []).append(value)
    else:
        _registry.get().add(name, value)


def add_to_collections(names: Any, value: Any) -> None:
    """Adds ``value`` to each collection in ``names`` (a name or a list).

    Example:
        >>> add_to_collections(['a_ops', 'b_ops'], print)
        >>> get_collection('b_ops') == [print]
        True
        >>> clear_collection('a_ops'); clear_collection('b_ops')
    """
    if isinstance(names, str):
        names = [names]
    for name in dict.fromkeys(names):
        add_to_collection(name, value)


def _entry_name(value: Any) -> str | None:
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else None


def get_collection(name: str, scope: str | None = None) -> list[Any]:
    """Returns a new list: the persistent entries, then the open step's.

    ``scope`` keeps only entries whose ``name`` attribute matches it from the
    start (``re.match``), as TF does with name scopes.

    Example:
        >>> get_collection('nothing_here')
        []
    """
    _check_name(name)
    items = _registry.get().get(name)
    step = _step.get()
    if step is not None:
        items.extend(step.get(name, ()))
    if scope is not None:
        pattern = re.compile(scope)
        items = [v for v in items if (n := _entry_name(v)) is not None and pattern.match(n)]
    return items


def clear_collection(name: str) -> None:
    """Empties collection ``name`` in the open step (if any) and the registry.

    Example:
        >>> add_to_collection('tmp', 1); clear_collection('tmp'); get_collection('tmp')
        []
    """
    _check_name(name)
    step = _step.get()
    if step is not None:
        step.pop(name, None)
    _registry.get().clear(name)


def reset() -> None:
    """Empties every collection of the current registry (tests, notebooks).

    Example:
        >>> reset()
    """
    _registry.get().clear()


def in_step_scope() -> bool:
    """True while a :func:`step_scope` is open in this thread/context."""
    return _step.get() is not None


class step_scope:
    """Opens a per-step scope; ``with step_scope() as step`` gives the dict of this step's collections.

    A small class rather than a generator-based context manager: it runs on
    every training and evaluation step.

    Example:
        >>> with step_scope() as step:
        ...     add_to_collection(GraphKeys.LOSSES, 1.0)
        >>> step
        {'losses': [1.0]}
    """

    __slots__ = ("_token", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, list[Any]] = {}

    def __enter__(self) -> dict[str, list[Any]]:
        self._token = _step.set(self.entries)
        return self.entries

    def __exit__(self, *exc: object) -> None:
        _step.reset(self._token)
