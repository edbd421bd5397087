"""The Supervisor: start or recover, periodic services, and a clean stop.

    import torchslim as slim

    with slim.supervisor.Supervisor(train_op, logdir='/tmp/logdir', data=loader) as sv:
        batches = sv.batches()
        while not sv.should_stop(number_of_steps=1000):
            loss = train_op(next(batches))
            sv.after_step(loss)
        sv.finish()                         # the final checkpoint

``slim.learning.train`` drives one; use it directly only for a loop of your
own. On start it takes the logdir's lock (one writer per logdir, see
torchslim.logdir), checks that the logdir can be written, then restores the
newest intact checkpoint in ``logdir`` (weights, optimizer, scheduler,
global step, RNG streams, data position) or, when there is none, calls
``init_fn`` — one entry point for a fresh start and for recovery. While
running it writes checkpoints and summaries when their triggers say so, both
off the training thread, and raises a failed background save at the next
step. Only the chief writes.

In the main thread, SIGTERM and SIGINT end the run at the next step
boundary with a checkpoint (see torchslim.preemption): ``after_step`` (and
``should_stop``) see the signal, the chief saves synchronously, everything
is stopped, then KeyboardInterrupt (SIGINT) or ``Preempted`` (SIGTERM, exit
status 143) is raised.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch

from torchslim import checkpoint as _checkpoint
from torchslim import collections as _collections
from torchslim import logdir as _logdir
from torchslim import triggers as _triggers
from torchslim.collections import GraphKeys
from torchslim.data import is_one_shot, make_resumable
from torchslim.fsdp import is_fully_sharded
from torchslim.logdir import LogdirError, LogdirLockedError
from torchslim.preemption import Preempted, StopSignals

__all__ = ["LogdirError", "LogdirLockedError", "Preempted", "Supervisor", "check_service_args", "rng_state",
           "set_rng_state"]

logger = logging.getLogger("torchslim")


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states, in checkpointable types.

    Example:
        >>> s = rng_state(); a = torch.rand(1); set_rng_state(s); bool(torch.rand(1) == a)
        True
    """
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_interval(name: str, value: Any, integer: bool) -> None:
    if value is None:
        return
    number = value if isinstance(value, int) or (not integer and isinstance(value, float)) else None
    if isinstance(value, bool) or number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be None (off) or a positive finite {'int' if integer else 'number'}, "
                         f"got {value!r}")


def check_service_args(
    logdir: Any = None,
    data: Any = None,
    is_chief: Any = None,
    init_fn: Any = None,
    saver: Any = None,
    save_interval_secs: Any = None,
    save_interval_steps: Any = None,
    summary_op: Any = None,
    summary_writer: Any = None,
    save_summaries_secs: Any = None,
    save_summaries_steps: Any = None,
    ignore_live_threads: Any = False,
) -> None:
    """Checks the Supervisor's (and train()'s) service arguments; raises ValueError naming the bad one.

    Called before anything is written, so a bad value never leaves a file.

    Example:
        >>> check_service_args(save_summaries_secs=float('nan'))
        Traceback (most recent call last):
        ...
        ValueError: save_summaries_secs must be None (off) or a positive finite number, got nan
    """
    from torchslim.learning import _USE_DEFAULT
    from torchslim.summaries import SummaryRecord

    if logdir is not None and (not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir)):
        raise ValueError(f"logdir must be a directory path or None, got {logdir!r}")
    if data is not None and not hasattr(data, "__iter__") and not hasattr(data, "__getitem__"):
        raise ValueError(f"data must be None or an iterable of batches (list, Dataset, DataLoader), got "
                         f"{type(data).__name__}")
    if is_chief is not None and not isinstance(is_chief, bool):
        raise ValueError(f"is_chief must be None (decided by the rank) or a bool, got {is_chief!r}")
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"init_fn must be a callable taking no argument, got {init_fn!r}")
    if saver is not None and not isinstance(saver, _checkpoint.Saver):
        raise ValueError(f"saver must be None or a torchslim.checkpoint.Saver, got {type(saver).__name__}")
    for name, value in (("save_interval_secs", save_interval_secs), ("save_summaries_secs", save_summaries_secs)):
        _check_interval(name, value, integer=False)
    for name, value in (("save_interval_steps", save_interval_steps), ("save_summaries_steps", save_summaries_steps)):
        _check_interval(name, value, integer=True)
    if summary_op is not _USE_DEFAULT and summary_op is not None and (
        not isinstance(summary_op, (list, tuple)) or not all(isinstance(r, SummaryRecord) for r in summary_op)
    ):
        raise ValueError(
            "summary_op must be a list of summary records (what slim.summaries.add_*_summary returns), "
            f"or None for no summaries; got {type(summary_op).__name__}"
        )
    if summary_writer is not _USE_DEFAULT and summary_writer is not None:
        missing = [m for m in ("write", "add_scalar", "flush") if not callable(getattr(summary_writer, m, None))]
        if missing:
            raise ValueError(
                "summary_writer must be a torchslim.summaries.SummaryWriter (or None for no summaries), got "
                f"{type(summary_writer).__name__} (it has no {', '.join(missing)})"
            )
    if not isinstance(ignore_live_threads, bool):
        raise ValueError(f"ignore_live_threads must be a bool, got {ignore_live_threads!r}")


def _state_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.numel()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _wants_distributed(master: str, sync_optimizer: Any) -> bool:
    if master or sync_optimizer is not None:
        return True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Supervisor:
    """Start/restore, checkpoint and summary services, and stop, for one training run.

    See the module docstring; arguments are those of ``slim.learning.train``.
    """

    def __init__(
        self,
        train_op: Any,
        logdir: str | None,
        data: Any = None,
        is_chief: bool | None = None,
        master: str = "",
        sync_optimizer: Any = None,
        startup_delay_steps: int = 0,
        number_of_steps: int | None = None,
        init_fn: Callable[[], Any] | None = None,
        saver: Any = None,
        save_interval_secs: float | None = 600,
        save_interval_steps: int | None = None,
        summary_op: Any = None,
        summary_writer: Any = None,
        save_summaries_secs: float | None = 600,
        save_summaries_steps: int | None = None,
        ignore_live_threads: bool = False,
    ) -> None:
        from torchslim.learning import _USE_DEFAULT

        check_service_args(
            logdir, data, is_chief, init_fn, saver, save_interval_secs, save_interval_steps, summary_op,
            summary_writer, save_summaries_secs, save_summaries_steps, ignore_live_threads,
        )
        self.train_op = train_op
        self.logdir = logdir
        self.data = make_resumable(data)
        self.init_fn = init_fn
        self.ignore_live_threads = ignore_live_threads
        self.replica: Any = None
        if _wants_distributed(master, sync_optimizer) or is_fully_sharded(getattr(train_op, "model", None)):
            from torchslim import distributed

            self.replica = distributed.prepare(
                train_op, master=master, is_chief=is_chief, sync_optimizer=sync_optimizer,
                startup_delay_steps=startup_delay_steps, number_of_steps=number_of_steps,
            )
            is_chief = self.replica.is_chief
        self.is_chief = True if is_chief is None else bool(is_chief)
        writes = logdir is not None and self.is_chief
        self._writes = writes
        self.saver = (saver or _checkpoint.Saver()) if logdir is not None else None
        self.save_trigger = _triggers.make_trigger(save_interval_secs, save_interval_steps) if writes else None
        self.summary_op = summary_op if summary_op is not _USE_DEFAULT else None
        self._writer_arg = summary_writer if summary_writer is not _USE_DEFAULT else None
        summary_trigger = _triggers.make_trigger(save_summaries_secs, save_summaries_steps)
        self._summaries_on = writes and summary_op is not None and summary_writer is not None and summary_trigger is not None
        self.summary_due = summary_trigger if self._summaries_on else None
        self.writer: Any = None
        self._writer_takes_scalars = False
        self.restored_from: str | None = None
        self._queue_runners: Any = None
        self.coordinator: Any = None
        self._last_summary: tuple[int, float] | None = None
        self._last_saved_step: int | None = None
        self.signals = StopSignals()
        self._lock: _logdir.LogdirLock | None = None
        self._save_check: Callable[[], None] | None = None
        self._stopped = False
        self._signal_detail = ""
        if getattr(self.replica, "sharded", False):  # FSDP2: every rank saves its shard (torchslim.fsdp)
            self.replica.attach(self)

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, as live references (the Saver copies them off the training thread)."""
        state = self.train_op.state_dict()
        state["format"] = _checkpoint.FORMAT
        state["rng"] = rng_state()
        if self.data is not None and hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_op.load_state_dict(state)
        if "data" in state and self.data is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        elif self.data is not None and is_one_shot(self.data):
            logger.warning(
                "Resuming at global step %d, but data is a one-shot iterator whose position cannot be restored; "
                "it continues from wherever it starts now (use a list, Dataset, DataLoader or slim.data.repeat)",
                self.train_op.step,
            )
        if "rng" in state:
            set_rng_state(state["rng"])
        if self.replica is not None:  # keeps the checkpoint's per-replica parts (torchslim.replicas)
            self.replica.restore(state)

    # -- start ---------------------------------------------------------------
    def start(self) -> None:
        """Locks and checks the logdir, restores or initialises, starts the services (see the module docstring)."""
        self._stopped = False
        try:
            if self._writes:
                self._lock = _logdir.prepare(self.logdir)  # type: ignore[arg-type]
            self.signals.install()
            restored = None
            if self.logdir is not None and self.saver is not None:
                restored = self.saver.restore_latest(self.logdir)
            if restored is not None:
                self.restored_from, state = restored
                self.load_state_dict(state)
                logger.info("Restored %s (global step %d)", self.restored_from, self.train_op.step)
            elif self.init_fn is not None:
                self.init_fn()
            if self._writes and self.saver is not None:
                self._check_room_for_a_checkpoint()
            if self.replica is not None:
                self.replica.after_restore(self)
            if self._summaries_on:
                self._open_writer(purge_step=self.train_op.step + 1 if restored is not None else None)
            if _collections.get_collection(GraphKeys.QUEUE_RUNNERS):
                from torchslim import queues

                self._queue_runners = queues.QueueRunners(ignore_live_threads=self.ignore_live_threads)
                self.coordinator = self._queue_runners.__enter__()
            if self.replica is not None:
                self.replica.before_training(self)
        except BaseException as e:
            try:
                self.stop(e)
            except BaseException as again:
                logger.warning("While stopping after an error: %r", again)
            raise
        self._last_summary = (self.train_op.step, time.monotonic())

    def _check_room_for_a_checkpoint(self) -> None:
        try:
            state = self.state_dict()
        except ValueError:  # no module to checkpoint: the first save says so
            return
        _logdir.check_free_space(self.logdir, _state_bytes(state))  # type: ignore[arg-type]

    def _open_writer(self, purge_step: int | None) -> None:
        from torchslim import summaries

        if self._writer_arg is None:
            self.writer = summaries.SummaryWriter(cast(str, self.logdir), purge_step=purge_step)
            self._owns_writer = True
        else:
            self.writer = self._writer_arg
            self._owns_writer = False
        self._writer_takes_scalars = isinstance(self.writer, summaries.SummaryWriter)

    def batches(self) -> Iterator[Any]:
        """The iterator of batches the loop takes from (the train op's no-batch marker when data is None)."""
        if self.data is None:
            from torchslim.learning import NO_BATCH

            return itertools.repeat(NO_BATCH)
        return iter(self.data)

    # -- running -------------------------------------------------------------
    def should_stop(self, number_of_steps: int | None = None) -> bool:
        """True once the global step reached ``number_of_steps`` or a stop signal came; re-raises a queue runner's error."""
        if self.signals.received is not None:
            return True
        coord = self.coordinator
        if coord is not None and coord.should_stop():
            coord.raise_requested_exception()
            return True
        if self.replica is not None and self.replica.should_stop():
            return True
        return number_of_steps is not None and self.train_op.step >= number_of_steps

    def after_step(self, loss: torch.Tensor) -> None:
        """Writes summaries and checkpoints that are due after the step just taken.

        Raises a failed background save (naming the file and the OS error),
        and, once SIGTERM or SIGINT came, saves, stops and raises (see the
        module docstring).
        """
        op = self.train_op
        if op.record_summaries:
            self.write_summaries(loss)
        trigger = self.save_trigger
        if self.replica is not None:  # every replica gives the same answer (torchslim.replicas)
            due = self.replica.save_due(op.step, trigger)
        else:
            due = trigger is not None and trigger(op.step)
        if due:
            self.save(block=False)
        if self._save_check is not None:
            self._save_check()
        if self.signals.received is not None:
            self._stop_for_signal()

    def _stop_for_signal(self) -> None:
        signum = self.signals.received
        if signum is None:
            return
        name = signal.Signals(signum).name
        step = self.train_op.step
        # Across replicas a save is a collective that every replica must enter at the same step, and each
        # one got the signal at a step of its own: a multi-process job stops without it and resumes from its
        # last periodic checkpoint (agreeing on the stop step through the replicas would lift this).
        saves = self._writes and self.saver is not None and self.replica is None
        logger.warning("Received %s: stopping at global step %d%s (send it again to stop at once)", name, step,
                       " after saving a checkpoint" if saves else "")
        path = self.save(block=True) if self.replica is None else None
        self._signal_detail = f"at global step {step}" + (f", checkpoint {path}" if path else "")
        self.stop()  # raises KeyboardInterrupt or Preempted once everything is stopped

    def write_summaries(self, loss: torch.Tensor | None) -> None:
        op = self.train_op
        step = op.step
        if self.summary_op is None:
            records = _collections.get_collection(GraphKeys.SUMMARIES) + op.last_step.get(GraphKeys.SUMMARIES, [])
            scalars: dict[str, Any] = {}
            if loss is not None:
                scalars["losses/total_loss"] = loss
            for i, group in enumerate(op.optimizer.param_groups):
                lr = group.get("lr")
                if lr is not None:
                    scalars["learning_rate" if i == 0 else f"learning_rate/group_{i}"] = lr
            now = time.monotonic()
            if self._last_summary is not None and now > self._last_summary[1] and step > self._last_summary[0]:
                scalars["global_step/sec"] = (step - self._last_summary[0]) / (now - self._last_summary[1])
            self._last_summary = (step, now)
            if self._writer_takes_scalars:  # the scalars travel with the records' copy, in one hand-over
                self.writer.write(step, records, scalars=scalars)
                return
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        else:
            records = list(self.summary_op)
        self.writer.write(step, records)

    def save(self, block: bool = True) -> str | None:
        """Checkpoints the current state now (chief only); off-thread unless ``block``."""
        if torch.autograd._profiler_enabled():  # a traced step shows the save as its own region
            with torch.profiler.record_function("torchslim/checkpoint"):
                return self._save(block)
        return self._save(block)

    def _save(self, block: bool) -> str | None:
        if getattr(self.replica, "sharded", False):  # FSDP2: a collective sharded save on every rank
            return self.replica.save(self, block)
        # Every replica hands the chief its own RNG streams and data position (torchslim.replicas).
        parts = self.replica.replica_states(self) if self.replica is not None else None
        if self.saver is None or not self.is_chief or self.logdir is None:
            return None
        step = self.train_op.step
        if step == self._last_saved_step:
            self.saver.wait()
            return self.saver.checkpoint_path(self.logdir, step)
        state = self.state_dict()  # live references: the Saver copies them without blocking the loop
        if parts is not None:
            state["replicas"] = parts
        self._last_saved_step = step
        if block:
            return self.saver.save(self.logdir, state, step)
        if self._save_check is None and self.saver.asynchronous:
            self._save_check = self._raise_failed_background_save  # checked after every step from now on
        self.saver.save_async(self.logdir, state, step)
        return None

    def _raise_failed_background_save(self) -> None:
        try:
            self.saver.raise_if_failed()  # type: ignore[union-attr]  # set only once the saver saved in the background
        except _checkpoint.CheckpointError as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            failed = getattr(e, "path", None)
            on_disk = _checkpoint.list_checkpoints(self.logdir)  # type: ignore[arg-type]
            intact = next((p for p in reversed(on_disk) if os.path.isfile(p)), None)
            where = repr(failed) if failed else f"in {self.logdir!r}"
            raise _checkpoint.CheckpointError(
                f"saving checkpoint {where} failed in the background: "
                f"{type(cause).__name__}: {cause}; "
                + (f"the newest intact checkpoint is {intact}, where a restart resumes"
                   if intact else "no checkpoint was written yet")
            ) from cause

    def finish(self) -> None:
        """A clean end: the final checkpoint (TF-Slim: 'Finished training! Saving model to disk.')."""
        if self.logdir is not None and self.is_chief:
            logger.info("Finished training! Saving model to disk.")
            self.save(block=True)
        elif self.replica is not None:
            self.save(block=True)  # a non-chief replica hands the chief its part of the final checkpoint
        if self._summaries_on and self.writer is not None:
            self.writer.flush()

    # -- stop ----------------------------------------------------------------
    def stop(self, error: BaseException | None = None) -> None:
        """Stops queue runners, closes writers, waits for saves, releases the logdir; idempotent.

        ``error`` is the exception in flight, if any. Without one, a stop
        signal received while running is raised last (KeyboardInterrupt or
        :class:`Preempted`).
        """
        if self._stopped:
            return
        self._stopped = True
        errors: list[BaseException] = []
        for action in (self._stop_queue_runners, self._close_writer, self._close_saver, self._close_replica,
                       self._release_logdir, self.signals.restore):
            try:
                action(error) if action is self._stop_queue_runners else action()
            except BaseException as e:  # keep stopping the rest; report the first
                errors.append(e)
        if errors:
            raise errors[0]
        if error is None:
            self.signals.raise_for_signal(self._signal_detail)

    def _stop_queue_runners(self, error: BaseException | None = None) -> None:
        if self._queue_runners is not None:
            qr, self._queue_runners = self._queue_runners, None
            if error is None:
                qr.__exit__(None, None, None)
            else:
                qr.__exit__(type(error), error, error.__traceback__)

    def _close_writer(self) -> None:
        if self.writer is not None and getattr(self, "_owns_writer", False):
            self.writer.close()
        self.writer = None

    def _close_saver(self) -> None:
        if self.saver is not None:
            self.saver.close()

    def _close_replica(self) -> None:
        if self.replica is not None:
            self.replica.close()

    def _release_logdir(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            try:
                self.stop(exc)
            except BaseException as e:
                logger.warning("While stopping after an error: %r", e)
            return
        self.stop()
