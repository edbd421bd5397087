"""Training: create_train_op, train_step and the train loop, as in TF-Slim's learning.py.

    import torchslim as slim

    def total_loss(batch):
        images, labels = batch
        slim.losses.softmax_cross_entropy(model(images), labels)
        return slim.losses.get_total_loss()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_op = slim.learning.create_train_op(total_loss, optimizer, clip_gradient_norm=4)
    final_loss = slim.learning.train(train_op, '/tmp/logdir', data=loader, number_of_steps=1000)

The train loop, in order of events::

    start: restore the newest intact checkpoint in logdir
           (weights, optimizer, scheduler, global step, RNG, data position)
           or, when there is none, call init_fn()
           start queue runners; open the summary writer
    loop:  stop if global_step >= number_of_steps
           batch = next(data)                    # data running out ends training
           loss, stop = train_step_fn(train_op, batch, global_step, kwargs)
               # train_op: forward, backward, multiply, clip, check numerics,
               #           optimizer step, update ops, global_step += 1
           write summaries if due (save_summaries_secs / _steps)
           checkpoint if due (save_interval_secs / _steps), written off-thread
           stop if asked
    stop:  save a final checkpoint (chief only), stop queue runners, close writers

A run killed at any instant and started again with the same arguments
continues from its newest checkpoint and ends with bitwise the same weights
as a run that was never interrupted (see torchslim.data for which data
sources resume exactly).
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from torchslim import collections as _collections
from torchslim import progress as _progress
from torchslim.collections import GraphKeys
from torchslim.gradients import add_gradients_summaries, clip_gradient_norms, multiply_gradients
from torchslim.numerics import NumericsError
from torchslim.train_op import MicroBatches, TrainOp, create_train_op  # it imports GlobalStep from here lazily

__all__ = [
    "NO_BATCH",
    "GlobalStep",
    "MicroBatches",
    "NumericsError",
    "TrainOp",
    "add_gradients_summaries",
    "clip_gradient_norms",
    "create_train_op",
    "get_global_step",
    "get_or_create_global_step",
    "multiply_gradients",
    "train",
    "train_step",
]

logger = logging.getLogger("torchslim")


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_USE_DEFAULT: Any = _Sentinel("_USE_DEFAULT")


NO_BATCH: Any = _Sentinel("NO_BATCH")
"""What train() passes for each step when it has no data: the train op then calls total_loss()."""


# --------------------------------------------------------------------------- global step


class GlobalStep:
    """The number of training steps taken, saved in every checkpoint.

    Example:
        >>> gs = GlobalStep(); gs.value += 1; int(gs)
        1
    """

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = int(value)

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"GlobalStep({self.value})"

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.value = int(state["value"])


def get_global_step() -> GlobalStep | None:
    """The global step of the current registry, or None if none was created.

    Example:
        >>> _collections.reset(); get_global_step() is None
        True
    """
    steps = _collections.get_default_registry().get(GraphKeys.GLOBAL_STEP)
    return steps[0] if steps else None


def get_or_create_global_step() -> GlobalStep:
    """The global step of the current registry, created at 0 on first use.

    Example:
        >>> get_or_create_global_step() is get_or_create_global_step()
        True
    """
    step = get_global_step()
    if step is None:
        step = GlobalStep()
        _collections.get_default_registry().add(GraphKeys.GLOBAL_STEP, step)
    return step


# --------------------------------------------------------------------------- train_step and train


def train_step(train_op: TrainOp, batch: Any, global_step: GlobalStep | None, train_step_kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
    """Runs one step; returns ``(total_loss, should_stop)``, as TF-Slim's train_step.

    ``train_step_kwargs`` may hold ``number_of_steps`` (stop once the
    global step reaches it), ``log_every_n_steps`` (log TF-Slim's line
    'global step N: loss = X (Y sec/step)'), ``trace_every_n_steps`` and
    ``logdir`` (write a torch.profiler trace of the step into logdir).

    Example:
        >>> net = torch.nn.Linear(1, 1)
        >>> op = create_train_op(lambda: net(torch.ones(1, 1)).pow(2).sum(),
        ...                      torch.optim.SGD(net.parameters(), lr=0.1), global_step=GlobalStep(), model=net)
        >>> loss, stop = train_step(op, NO_BATCH, op.global_step, {'number_of_steps': 1})
        >>> stop
        True
    """
    start = time.time()
    trace_every = train_step_kwargs.get("trace_every_n_steps")
    # TF-Slim traces the steps that start at global step 0, N, 2N, ...; the trace is named by that step.
    if trace_every and train_op.step % trace_every == 0 and train_step_kwargs.get("logdir"):
        from torchslim import summaries

        with summaries.trace_step(train_step_kwargs["logdir"], train_op.step):
            total_loss = train_op(batch)
    else:
        total_loss = train_op(batch)
    elapsed = time.time() - start
    step = int(global_step) if global_step is not None else train_op.step
    log_every = train_step_kwargs.get("log_every_n_steps")
    if log_every and step % log_every == 0 and logger.isEnabledFor(logging.INFO):  # no record, no loss read, unless shown
        _log_step(train_op, step, total_loss, elapsed)
    number_of_steps = train_step_kwargs.get("number_of_steps")
    should_stop = number_of_steps is not None and step >= number_of_steps
    return total_loss, should_stop


def _log_step(train_op: TrainOp, step: int, total_loss: torch.Tensor, elapsed: float) -> None:
    train_op.check_pending_numerics()
    logger.info("global step %d: loss = %.4f (%.3f sec/step)", step, total_loss.item(), elapsed)


def _take(batches: Any, n: int) -> MicroBatches:
    group = MicroBatches(itertools.islice(batches, n))
    if len(group) < n:  # a partial group at the end of the data is not trained on
        raise StopIteration
    return group


def _check_train_args(
    train_op: Any,
    logdir: Any,
    number_of_steps: Any,
    summary_op: Any,
    saver: Any,
    trace_every_n_steps: Any,
    sync_optimizer: Any,
    startup_delay_steps: Any,
    log_every_n_steps: Any,
    save_interval_secs: Any,
    save_interval_steps: Any,
    save_summaries_secs: Any,
    save_summaries_steps: Any,
    master: Any,
    train_step_fn: Any,
) -> None:
    if train_op is None:
        raise ValueError("train_op cannot be None.")
    if not isinstance(train_op, TrainOp):
        raise ValueError(f"train_op must be made by create_train_op, got {type(train_op).__name__}")
    if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
        raise ValueError(f"logdir must be a directory path or None, got {logdir!r}")
    if logdir is None:
        if summary_op is not _USE_DEFAULT and summary_op is not None:
            raise ValueError("Cannot provide summary_op because logdir=None")
        if saver is not None:
            raise ValueError("Cannot provide saver because logdir=None")
        if trace_every_n_steps is not None:
            raise ValueError("Cannot provide trace_every_n_steps because logdir=None")
    if number_of_steps is not None and train_op.global_step is None:
        raise ValueError(
            "number_of_steps needs a train op that counts steps; create_train_op was given global_step=None"
        )
    if number_of_steps is not None and (isinstance(number_of_steps, bool) or not isinstance(number_of_steps, int) or number_of_steps <= 0):
        raise ValueError(f"`number_of_steps` must be either None or a positive number, got {number_of_steps!r}")
    for name, value in (
        ("startup_delay_steps", startup_delay_steps),
        ("log_every_n_steps", log_every_n_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(sync_optimizer, list) and not sync_optimizer:
        raise ValueError("sync_optimizer must be None, a SyncReplicasOptimizer or a non-empty list of them, got []")
    if sync_optimizer is not None and startup_delay_steps > 0:
        raise ValueError("startup_delay_steps must be zero when sync_optimizer is supplied.")
    if trace_every_n_steps is not None and (
        isinstance(trace_every_n_steps, bool) or not isinstance(trace_every_n_steps, int) or trace_every_n_steps <= 0
    ):
        raise ValueError(f"trace_every_n_steps must be None or a positive int, got {trace_every_n_steps!r}")
    if not callable(train_step_fn):
        raise ValueError(f"train_step_fn must be a callable like slim.learning.train_step, got {train_step_fn!r}")
    from torchslim.supervisor import check_service_args  # the arguments train() hands to its Supervisor

    check_service_args(
        logdir=logdir, saver=saver, save_interval_secs=save_interval_secs, save_interval_steps=save_interval_steps,
        summary_op=summary_op, save_summaries_secs=save_summaries_secs, save_summaries_steps=save_summaries_steps,
    )
    if not isinstance(master, str):
        raise ValueError(f"master must be a string ('' for local or torchrun, 'tcp://host:port', 'file:///path'), got {master!r}")


def train(
    train_op: TrainOp,
    logdir: str | os.PathLike[str] | None,
    data: Iterable[Any] | None = None,
    train_step_fn: Callable[..., tuple[torch.Tensor, bool]] = train_step,
    train_step_kwargs: Any = _USE_DEFAULT,
    log_every_n_steps: int = 1,
    graph: Any = None,
    master: str = "",
    is_chief: bool | None = None,
    global_step: GlobalStep | None = None,
    number_of_steps: int | None = None,
    init_op: Any = _USE_DEFAULT,
    init_feed_dict: Any = None,
    local_init_op: Any = _USE_DEFAULT,
    init_fn: Callable[[], Any] | None = None,
    ready_op: Any = _USE_DEFAULT,
    summary_op: Any = _USE_DEFAULT,
    save_summaries_secs: float | None = 600,
    summary_writer: Any = _USE_DEFAULT,
    startup_delay_steps: int = 0,
    saver: Any = None,
    save_interval_secs: float | None = 600,
    sync_optimizer: Any = None,
    session_config: Any = None,
    session_wrapper: Any = None,
    trace_every_n_steps: int | None = None,
    ignore_live_threads: bool = False,
    *,
    save_interval_steps: int | None = None,
    save_summaries_steps: int | None = None,
    progress: _progress.ProgressMode = "auto",
) -> float | None:
    """Runs the training loop (see the module docstring); returns the last loss.

    Args follow TF-Slim's ``train``; the README's compatibility table says
    which are supported, mapped or not applicable. torchslim additions:
    ``data`` (an iterable of batches passed to the train op; None: the
    train op takes no batch), ``save_interval_steps`` and
    ``save_summaries_steps`` (step-based intervals, used alongside or
    instead of the second-based ones; pass ``*_secs=None`` to turn those off),
    ``progress`` (``'auto'``: a bar with steps/s, loss and ETA when stderr is
    a terminal, else TF-Slim's log line every ``log_every_n_steps``;
    ``'bar'``, ``'log'`` or ``'none'`` to choose; see :mod:`torchslim.progress`).
    When nothing has configured logging, torchslim's messages go to stderr
    for the span of the call (a handler on the ``torchslim`` logger only).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> def loss_fn(batch):
        ...     return torch.nn.functional.mse_loss(net(batch[0]), batch[1])
        >>> op = create_train_op(loss_fn, torch.optim.SGD(net.parameters(), lr=0.1))
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))] * 5
        >>> loss = train(op, None, data=data, log_every_n_steps=0)
        >>> op.step
        5
    """
    from torchslim.supervisor import Supervisor

    _check_train_args(
        train_op, logdir, number_of_steps, summary_op, saver, trace_every_n_steps, sync_optimizer,
        startup_delay_steps, log_every_n_steps, save_interval_secs, save_interval_steps,
        save_summaries_secs, save_summaries_steps, master, train_step_fn,
    )
    for name, value, default in (
        ("graph", graph, None), ("init_feed_dict", init_feed_dict, None), ("session_config", session_config, None),
        ("session_wrapper", session_wrapper, None), ("init_op", init_op, _USE_DEFAULT),
        ("local_init_op", local_init_op, _USE_DEFAULT), ("ready_op", ready_op, _USE_DEFAULT),
    ):
        if value is not default:
            raise ValueError(f"{name} has no meaning in eager PyTorch (there is no graph or session); leave it out (see README)")
    if global_step is not None and global_step is not train_op.global_step:
        raise ValueError("global_step must be the train op's global step (the one given to create_train_op)")
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"init_fn must be a callable taking no argument, got {init_fn!r}")
    if train_step_kwargs is _USE_DEFAULT:
        train_step_kwargs = {}
    elif not isinstance(train_step_kwargs, Mapping):
        raise ValueError(f"train_step_kwargs must be a dict, got {type(train_step_kwargs).__name__}")
    shown = _progress.Progress(_progress.resolve_mode(progress), number_of_steps, "train", " step")
    kwargs = {"number_of_steps": number_of_steps, "log_every_n_steps": log_every_n_steps if shown.logs else 0,
              **train_step_kwargs}

    sv = Supervisor(
        train_op,
        logdir=None if logdir is None else str(logdir),
        data=data,
        is_chief=is_chief,
        master=master,
        sync_optimizer=sync_optimizer,
        startup_delay_steps=startup_delay_steps,
        number_of_steps=number_of_steps,
        init_fn=init_fn,
        saver=saver,
        save_interval_secs=save_interval_secs,
        save_interval_steps=save_interval_steps,
        summary_op=summary_op,
        summary_writer=summary_writer,
        save_summaries_secs=save_summaries_secs,
        save_summaries_steps=save_summaries_steps,
        ignore_live_threads=ignore_live_threads,
    )
    # The loop traces whole steps (the train op, then the summaries and checkpoint due after it); only the
    # chief writes files. A train_step_fn still traces by itself when train_step_kwargs ask it to.
    trace_every = trace_every_n_steps if logdir is not None and sv.is_chief else None
    total_loss = None
    with _progress.console_logging(), shown, sv:
        if number_of_steps is not None and train_op.step >= number_of_steps:
            if sv.restored_from is None:
                logger.warning(
                    "The global step is already %d >= number_of_steps=%d with no checkpoint restored from logdir: "
                    "nothing to train (a new program should start with slim.collections.reset() or a new GlobalStep)",
                    train_op.step, number_of_steps,
                )
            else:
                logger.info("Global step %d already reached number_of_steps=%d.", train_op.step, number_of_steps)
        batches = sv.batches()
        gs = train_op.global_step
        wants_summaries = sv.summary_due
        # The per-step path is kept flat: the common checks inline, the rare ones behind one flag.
        extra_stop_checks = sv.coordinator is not None or sv.replica is not None
        after_step = sv.after_step
        per_step = train_op.batches_per_step  # accumulate_steps: one global step takes that many batches
        tick = shown.start(train_op.step) if sv.is_chief else None
        # The default train_step runs inline (the same step, log line and stop test), saving its call
        # and argument lookups on every step; a train_step_fn of the user's, or one that traces, is called.
        inline = train_step_fn is train_step and not kwargs.get("trace_every_n_steps")
        log_every, stop_at = kwargs.get("log_every_n_steps"), kwargs.get("number_of_steps")
        step = train_op.step
        while True:
            if number_of_steps is not None and step >= number_of_steps:
                break
            if extra_stop_checks and sv.should_stop(number_of_steps):
                break
            try:
                batch = next(batches) if per_step == 1 else _take(batches, per_step)
            except StopIteration:
                logger.info("Data ran out at global step %d. Stopping Training.", step)
                break
            if wants_summaries is not None:
                train_op.record_summaries = wants_summaries(step + 1)
            if trace_every is not None and step % trace_every == 0:  # TF-Slim's steps 0, N, 2N, ...
                from torchslim import summaries

                with summaries.trace_step(logdir, step):  # type: ignore[arg-type]  # not None here
                    total_loss, should_stop = train_step_fn(train_op, batch, gs, kwargs)
                    after_step(total_loss)
                step = train_op.step
            elif inline:
                start = time.time()
                total_loss = train_op(batch)
                step = gs.value if gs is not None else 0
                if log_every and step % log_every == 0 and logger.isEnabledFor(logging.INFO):
                    _log_step(train_op, step, total_loss, time.time() - start)
                should_stop = stop_at is not None and step >= stop_at
                after_step(total_loss)
            else:
                total_loss, should_stop = train_step_fn(train_op, batch, gs, kwargs)
                after_step(total_loss)
                step = train_op.step
            if tick is not None:
                tick(step, total_loss)
            if should_stop:
                logger.info("Stopping Training.")
                break
        train_op.check_pending_numerics()
        shown.close(train_op.step)
        sv.finish()
    return None if total_loss is None else total_loss.item()
