"""Periodic triggers shared by checkpointing, summaries, logging and tracing.

    import torchslim as slim

    every_100 = slim.triggers.EveryNSteps(100)
    every_10_min = slim.triggers.EveryNSeconds(600)
    for step in range(1, 1001):
        if every_100(step) or every_10_min(step):
            save()

Each trigger is a callable ``trigger(step, t=None) -> bool``; ``t`` is the
current time in seconds, taken from ``time.monotonic()`` when not given, so
tests pass explicit times and never sleep.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

__all__ = ["AnyOf", "AtSteps", "EveryNSeconds", "EveryNSteps", "Trigger", "make_trigger"]


class Trigger:
    """Base class: says whether an action is due at ``step`` (and time ``t``)."""

    def __call__(self, step: int, t: float | None = None) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


def _positive(name: str, value: object, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive number, got {value!r}")


class EveryNSteps(Trigger):
    """Due when ``step`` is a multiple of ``n``.

    Example:
        >>> t = EveryNSteps(3)
        >>> [s for s in range(1, 10) if t(s)]
        [3, 6, 9]
    """

    def __init__(self, n: int) -> None:
        _positive("n", n, int)
        self.n = n

    def __call__(self, step: int, t: float | None = None) -> bool:
        return step % self.n == 0


class EveryNSeconds(Trigger):
    """Due when ``secs`` have passed since it was last due (the first call starts the clock).

    Example:
        >>> t = EveryNSeconds(10)
        >>> [t(1, t=0.0), t(2, t=5.0), t(3, t=10.0), t(4, t=15.0), t(5, t=21.0)]
        [False, False, True, False, True]
    """

    def __init__(self, secs: float) -> None:
        _positive("secs", secs, (int, float))
        self.secs = float(secs)
        self._last: float | None = None

    def __call__(self, step: int, t: float | None = None) -> bool:
        now = time.monotonic() if t is None else t
        if self._last is None:
            self._last = now
            return False
        if now - self._last >= self.secs:
            self._last = now
            return True
        return False


class AtSteps(Trigger):
    """Due at the given steps.

    Example:
        >>> t = AtSteps([1, 5])
        >>> [s for s in range(1, 8) if t(s)]
        [1, 5]
    """

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = frozenset(int(s) for s in steps)

    def __call__(self, step: int, t: float | None = None) -> bool:
        return step in self.steps


class AnyOf(Trigger):
    """Due when any of ``triggers`` is (each is called, so each keeps its own clock).

    Example:
        >>> t = AnyOf([EveryNSteps(2), AtSteps([3])])
        >>> [s for s in range(1, 6) if t(s)]
        [2, 3, 4]
    """

    def __init__(self, triggers: Iterable[Trigger]) -> None:
        self.triggers = list(triggers)

    def __call__(self, step: int, t: float | None = None) -> bool:
        due = False
        for trigger in self.triggers:
            due = trigger(step, t) or due
        return due


def make_trigger(secs: float | None = None, steps: int | None = None) -> Trigger | None:
    """A trigger for 'every ``secs`` seconds and/or every ``steps`` steps'; None when neither.

    Example:
        >>> make_trigger() is None, type(make_trigger(steps=5)).__name__
        (True, 'EveryNSteps')
    """
    triggers: list[Trigger] = []
    if secs is not None:
        triggers.append(EveryNSeconds(secs))
    if steps is not None:
        triggers.append(EveryNSteps(steps))
    if not triggers:
        return None
    return triggers[0] if len(triggers) == 1 else AnyOf(triggers)
