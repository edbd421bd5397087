"""Asynchronous workers on one machine (Hogwild): shared weights, one shared global step, no waiting.

    >>> import torch, torchslim as slim
    >>> seen = torch.zeros(2).share_memory_()          # shared memory: every worker writes the same tensor
    >>> def worker(rank, seen):
    ...     seen[rank] += 1
    >>> slim.distributed.run_hogwild(worker, 2, args=(seen,), start_method='fork')
    >>> seen
    tensor([1., 1.])

A real worker calls ``slim.learning.train`` (spawned workers need the
script's ``if __name__ == '__main__':`` guard)::

    def worker(rank, model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_op = slim.learning.create_train_op(make_total_loss(model), optimizer)
        slim.learning.train(train_op, '/tmp/logdir', data=shard(rank), number_of_steps=1000)

    if __name__ == '__main__':
        model = Net()
        model.share_memory()
        slim.distributed.run_hogwild(worker, num_workers=4, args=(model,))

Each worker applies its own updates to the shared weights; ``number_of_steps``
counts every worker's steps (TF's single global step); worker 0 is the chief
and alone writes; the others wait for ``startup_delay_steps``.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchslim.process_group import DistributedError, _check_int, default_timeout
from torchslim.replicas import Replica

__all__ = ["run_hogwild"]

logger = logging.getLogger("torchslim")


@dataclass
class _HogwildContext:
    rank: int
    num_workers: int
    step: Any  # multiprocessing Value('q'): the shared global step
    done: Any  # multiprocessing Value('i'): workers that stopped training
    barrier: Any
    timeout: float


_HOGWILD: _HogwildContext | None = None


class _HogwildReplica(Replica):
    """A run_hogwild worker: shared weights, one shared global step, no waiting for the others."""

    def __init__(self, train_op: Any, ctx: _HogwildContext, is_chief: bool | None,
                 startup_delay_steps: int, number_of_steps: int | None) -> None:
        if train_op.global_step is None:
            raise ValueError("Hogwild workers share the global step; build the train op with a global step")
        self.train_op = train_op
        self.ctx = ctx
        self.rank = ctx.rank
        self.world_size = ctx.num_workers
        self.is_chief = ctx.rank == 0 if is_chief is None else bool(is_chief)
        self.startup_delay_steps = startup_delay_steps
        self.number_of_steps = number_of_steps
        self.steps_taken = 0
        self._stopped = False

    def after_restore(self, supervisor: Any) -> None:
        # Every worker restored the same newest checkpoint into the shared weights; none trains
        # before all have, and worker 0's global step becomes the shared one.
        if self.rank == 0:
            with self.ctx.step.get_lock():
                self.ctx.step.value = self.train_op.step
        self._wait_barrier("restoring the checkpoint")
        self.train_op.global_step.value = int(self.ctx.step.value)

    def _wait_barrier(self, what: str) -> None:
        import threading

        try:
            self.ctx.barrier.wait(self.ctx.timeout)
        except threading.BrokenBarrierError:
            raise DistributedError(
                f"Hogwild worker {self.rank} of {self.world_size}: the other workers did not finish {what} within "
                f"{self.ctx.timeout:.0f} s (every worker must call train() once)"
            ) from None

    def before_training(self, supervisor: Any) -> None:
        if self.is_chief or self.startup_delay_steps <= 0:
            return
        target = self.startup_delay_steps if self.number_of_steps is None else min(self.startup_delay_steps, self.number_of_steps)
        logger.info("Worker %d waits for the global step to reach %d before training", self.rank, target)
        while self.ctx.step.value < target:
            if self.ctx.done.value > 0:  # a worker stopped before the step it waits for: it failed
                raise DistributedError(
                    f"Hogwild worker {self.rank}: another worker stopped before the global step reached {target}"
                )
            time.sleep(0.02)

    def should_stop(self) -> bool:
        if self._stopped:
            return True
        ctx = self.ctx
        with ctx.step.get_lock():
            n = ctx.step.value
            last = self.number_of_steps is not None and n >= self.number_of_steps
            if not last:
                ctx.step.value = n + 1  # this worker takes step n + 1
        if last:
            self._mark_done()
            if self.is_chief:
                self._wait_for_others()
            self.train_op.global_step.value = n
            return True
        self.train_op.global_step.value = n  # the train op counts it to n + 1
        self.steps_taken += 1
        if self.is_chief and self.number_of_steps is not None and n + 1 == self.number_of_steps:
            self._wait_for_others()  # the final checkpoint then holds every worker's last update
        return False

    def _mark_done(self) -> None:
        if not self._stopped:
            self._stopped = True
            with self.ctx.done.get_lock():
                self.ctx.done.value += 1

    def _wait_for_others(self) -> None:
        others = self.world_size - 1
        deadline = time.monotonic() + self.ctx.timeout
        while self.ctx.done.value < others + (1 if self._stopped else 0):
            if time.monotonic() > deadline:
                logger.warning("Hogwild chief: other workers still training after %.0f s; saving anyway", self.ctx.timeout)
                return
            time.sleep(0.002)

    def close(self) -> None:
        self._mark_done()


def _hogwild_entry(rank: int, ctx: _HogwildContext, fn: Callable[..., Any], args: tuple[Any, ...], threads: int) -> None:
    global _HOGWILD
    ctx.rank = rank
    _HOGWILD = ctx
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(ctx.num_workers)  # makes the Supervisor ask prepare() for a replica
    if threads > 0:
        torch.set_num_threads(threads)
    fn(rank, *args)


def run_hogwild(
    fn: Callable[..., Any],
    num_workers: int,
    args: Sequence[Any] = (),
    *,
    start_method: str = "spawn",
    timeout: float | None = None,
    threads_per_worker: int | None = None,
) -> None:
    """Runs ``fn(rank, *args)`` in ``num_workers`` processes that train asynchronously (Hogwild).

    Build the model in the caller and call ``model.share_memory()`` before,
    and pass it in ``args``: every worker then updates the same weights
    without waiting for the others. In each worker, ``slim.learning.train``
    shares one global step across workers (``number_of_steps`` counts every
    worker's steps, as TF's single global step does), makes worker 0 the
    chief (it alone writes checkpoints and summaries; the others read the
    same logdir on start) and makes the others wait for
    ``startup_delay_steps``. Every worker must call ``train`` once. When a
    worker fails, the others are stopped and the error is raised here.

    Args:
        fn: a picklable (top-level) function ``fn(rank, *args)``.
        num_workers: number of worker processes, >= 1.
        args: further arguments of ``fn``; shared-memory tensors and modules
            pass by reference.
        start_method: ``'spawn'`` (default; the caller needs an
            ``if __name__ == '__main__':`` guard), ``'fork'`` or ``'forkserver'``.
        timeout: seconds a worker waits for the others at start and at the
            end (default :func:`default_timeout`).
        threads_per_worker: torch threads per worker; default: the CPU count
            split among the workers (unless ``$OMP_NUM_THREADS`` is set).

    Example (in a script)::

        model = torch.nn.Linear(4, 1); model.share_memory()
        slim.distributed.run_hogwild(worker, 4, args=(model, '/tmp/logdir'))
    """
    import torch.multiprocessing as mp

    if not callable(fn):
        raise ValueError(f"fn must be a function fn(rank, *args), got {fn!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise ValueError(f"args must be a tuple of fn's further arguments, got {type(args).__name__}")
    if start_method not in mp.get_all_start_methods():
        raise ValueError(f"start_method must be one of {mp.get_all_start_methods()}, got {start_method!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    _check_int("threads_per_worker", threads_per_worker, 1)
    if _HOGWILD is not None:
        raise ValueError("run_hogwild was called inside a Hogwild worker")
    if threads_per_worker is None:
        threads_per_worker = 0 if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // num_workers)
    context = mp.get_context(start_method)
    ctx = _HogwildContext(
        rank=-1, num_workers=num_workers, step=context.Value("q", 0), done=context.Value("i", 0),
        barrier=context.Barrier(num_workers), timeout=float(timeout) if timeout is not None else default_timeout(),
    )
    mp.start_processes(
        _hogwild_entry, args=(ctx, fn, tuple(args), threads_per_worker), nprocs=num_workers,
        join=True, start_method=start_method,
    )
