"""Data positions that survive a restart: the part of exact resume that concerns input.

    import torchslim as slim

    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    data = slim.data.repeat(loader, num_epochs=10)      # TF's num_epochs; None: forever
    slim.learning.train(train_op, logdir, data=data)     # resumes mid-epoch after a crash

What resumes exactly (the same batches, in the same order, as an
uninterrupted run):

* any object with ``state_dict()`` / ``load_state_dict()`` and
  ``__iter__`` (e.g. torchdata's StatefulDataLoader): its own state is saved;
* re-iterable collections whose order per pass is fixed or drawn from torch's
  RNG: lists, tensors, datasets, and ``DataLoader`` with any sampler, shuffled
  or not, with or without workers, with or without an explicit
  ``generator``. torchslim records the RNG states at the start of the epoch
  and the number of batches taken; on restore it rewinds those states,
  starts the epoch again and skips the batches already trained on (skipping
  loads them, so it costs one partial pass of data loading).

Epochs reshuffle: at the start of each epoch (a resumed one included) the
epoch number is given to ``set_epoch`` of the data and of its sampler and
batch sampler when they have one, as a ``DistributedSampler`` needs to draw
a new order per epoch; the epoch is part of the saved position, so a run
resumed in its second epoch continues that epoch's order.

What does not: one-shot iterators and generators (``iter(x) is x``); after a
restart they continue from wherever the new iterator starts, and a warning
says so. Samplers that draw from numpy's or Python's global RNG are not
rewound either.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["ResumableIterable", "is_one_shot", "make_resumable", "repeat", "set_epoch"]

logger = logging.getLogger("torchslim")


def is_one_shot(data: Any) -> bool:
    """True when iterating ``data`` consumes it (``iter(data) is data``).

    Example:
        >>> is_one_shot([1, 2]), is_one_shot(iter([1, 2]))
        (False, True)
    """
    try:
        return iter(data) is data
    except TypeError:
        raise TypeError(f"data must be iterable, got {type(data).__name__}") from None


def _generators(data: Any) -> list[torch.Generator]:
    """The torch generators a DataLoader or sampler draws its order from."""
    found: list[torch.Generator] = []
    for owner in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        if owner is None:
            continue
        for candidate in (getattr(owner, "generator", None), getattr(getattr(owner, "sampler", None), "generator", None)):
            if isinstance(candidate, torch.Generator) and all(candidate is not g for g in found):
                found.append(candidate)
    return found


def set_epoch(data: Any, epoch: int) -> list[Any]:
    """Calls ``set_epoch(epoch)`` on ``data`` and its samplers that have one; returns those called.

    Example:
        >>> ds = list(range(8))
        >>> sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
        >>> loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4)
        >>> [type(s).__name__ for s in set_epoch(loader, 1)], sampler.epoch
        (['DistributedSampler'], 1)
    """
    called: list[Any] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        method = getattr(owner, "set_epoch", None)
        if owner is not None and callable(method) and all(owner is not c for c in called):
            method(epoch)
            called.append(owner)
    return called


class ResumableIterable:
    """Iterates ``data`` for ``num_epochs`` passes and can resume mid-epoch.

    Args:
        data: a re-iterable (list, tensor, Dataset, DataLoader, ...).
        num_epochs: passes to make; None for no end.

    Each epoch starts with :func:`set_epoch` on ``data`` (DistributedSampler).

    Example:
        >>> r = ResumableIterable([1, 2, 3], num_epochs=2)
        >>> it = iter(r); [next(it), next(it)]
        [1, 2]
        >>> s = r.state_dict()
        >>> r2 = ResumableIterable([1, 2, 3], num_epochs=2); r2.load_state_dict(s)
        >>> list(r2)
        [3, 1, 2, 3]
    """

    def __init__(self, data: Iterable[Any], num_epochs: int | None = 1) -> None:
        if is_one_shot(data):
            raise ValueError(
                "data must be re-iterable (a list, Dataset or DataLoader) to resume its position; "
                f"got a one-shot iterator of type {type(data).__name__}"
            )
        if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs <= 0):
            raise ValueError(f"num_epochs must be None or a positive int, got {num_epochs!r}")
        self.data = data
        self.num_epochs = num_epochs
        self.epoch = 0
        self.index = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None

    def _capture_rng(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in _generators(self.data)]}

    def _set_rng(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        for g, s in zip(_generators(self.data), state["generators"]):
            g.set_state(s)

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is None:
            self.epoch, self.index = 0, 0
        while self.num_epochs is None or self.epoch < self.num_epochs:
            skip = 0
            set_epoch(self.data, self.epoch)
            if resume is not None and resume["epoch_rng"] is not None:
                now = torch.get_rng_state()
                self._epoch_rng = resume["epoch_rng"]
                self._set_rng(self._epoch_rng)
                it = iter(self.data)
                skip = resume["index"]
                for _ in range(skip):
                    next(it)
                torch.set_rng_state(now)
            else:
                self._epoch_rng = self._capture_rng()
                it = iter(self.data)
            resume = None
            self.index = skip
            for item in it:
                self.index += 1
                yield item
            self.epoch += 1
            self.index = 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches taken in it, and the RNG states at its start."""
        return {"epoch": self.epoch, "index": self.index, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Makes the next ``iter()`` continue after the last batch taken before ``state`` was saved."""
        if not isinstance(state, dict) or not {"epoch", "index", "epoch_rng"} <= set(state):
            raise ValueError(f"state must be a ResumableIterable.state_dict(), got {state!r:.80}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._resume = dict(state)


def repeat(data: Iterable[Any], num_epochs: int | None = None) -> ResumableIterable:
    """Passes over ``data`` ``num_epochs`` times (None: forever), resumably.

    Example:
        >>> list(repeat([1, 2], num_epochs=2))
        [1, 2, 1, 2]
    """
    return ResumableIterable(data, num_epochs=num_epochs)


def make_resumable(data: Any) -> Any:
    """What train() iterates: stateful data as is, a re-iterable as one resumable pass, an iterator as is.

    Example:
        >>> type(make_resumable([1, 2])).__name__
        'ResumableIterable'
    """
    if data is None or (hasattr(data, "state_dict") and hasattr(data, "load_state_dict")):
        return data
    if is_one_shot(data):
        return data
    return ResumableIterable(data, num_epochs=1)


def __getattr__(name: str) -> Any:
    if name == "digits":  # the shipped data set, imported on first use
        import importlib

        module = importlib.import_module(f"{__name__}.digits")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
