"""Replicated training: synchronous replicas on torch.distributed, asynchronous Hogwild workers.

Synchronous (TF's SyncReplicasOptimizer): every replica computes gradients on
its own batch, the gradients are averaged across replicas, and every replica
applies the same update. The same script runs in one process and under
``torchrun``::

    import torchslim as slim

    optimizer = slim.SyncReplicasOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    train_op = slim.learning.create_train_op(total_loss, optimizer)
    slim.learning.train(train_op, '/tmp/logdir', data=my_shard_of_the_data,
                        sync_optimizer=optimizer, number_of_steps=1000)

    # python train.py                                  one process
    # torchrun --nproc-per-node 4 train.py             four replicas on this machine
    # master='tcp://10.0.0.1:29500' with RANK/WORLD_SIZE set, or
    # slim.distributed.initialize(master, rank=r, world_size=n) before train()

Asynchronous (several workers on one machine, each applying its own updates to
shared weights without waiting for the others; one global step shared by all)::

    def worker(rank, model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_op = slim.learning.create_train_op(make_total_loss(model), optimizer)
        slim.learning.train(train_op, '/tmp/logdir', data=shard(rank), number_of_steps=1000)

    if __name__ == '__main__':
        model = Net()
        model.share_memory()
        slim.distributed.run_hogwild(worker, num_workers=4, args=(model,))

In both, the chief (rank 0 unless ``is_chief`` says otherwise) alone writes
checkpoints and summaries, and every replica starts from the same state: the
newest checkpoint in ``logdir`` (read by all) or the chief's initial weights,
broadcast. ``slim.learning.train`` calls :func:`prepare`; the object it
returns is driven by the Supervisor in this order::

    replica = prepare(train_op, master, is_chief, sync_optimizer, ...)  # process group, hooks
    restore the newest checkpoint or call init_fn
    replica.after_restore(supervisor)      # sync: broadcast the chief's state; hogwild: barrier
    replica.before_training(supervisor)    # hogwild non-chief: wait for startup_delay_steps
    loop:  replica.should_stop()           # hogwild: claims the next shared global step
           train_op(batch)                 # sync: bucketed gradient all-reduce during backward
    replica.close()                        # remove the hooks
"""
from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "SyncReplicasOptimizer",
    "default_timeout",
    "get_rank",
    "get_world_size",
    "initialize",
    "prepare",
    "run_hogwild",
]

logger = logging.getLogger("torchslim")

TIMEOUT_ENV = "TORCHSLIM_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0
_owned_group = False  # True when initialize() created the default process group


class DistributedError(RuntimeError):
    """A collective between replicas failed or timed out (a peer died, hung or stopped early)."""


# --------------------------------------------------------------------------- process group


def default_timeout() -> float:
    """Seconds a collective may wait for a peer: ``$TORCHSLIM_DIST_TIMEOUT`` or 600.

    Example:
        >>> default_timeout() > 0
        True
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _check_int(name: str, value: Any, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")


def _torchrun_env() -> bool:
    return "WORLD_SIZE" in os.environ and ("MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ)


def initialize(
    master: str = "",
    rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    timeout: float | None = None,
) -> bool:
    """Joins (or creates) the default process group; returns True when there are several replicas.

    Args:
        master: an init URL, ``'tcp://host:port'`` or ``'file:///path'``;
            ``''`` takes torchrun's environment (``MASTER_ADDR``, ``RANK``,
            ``WORLD_SIZE``) when present and stays single-process otherwise.
        rank, world_size: this replica's rank and the number of replicas;
            default ``$RANK`` and ``$WORLD_SIZE``.
        backend: default ``'gloo'`` on a CPU-only machine and
            ``'cpu:gloo,cuda:nccl'`` when CUDA is available (CPU tensors go
            through gloo, CUDA tensors through nccl).
        timeout: seconds a collective waits for a peer before failing
            (default :func:`default_timeout`); gloo honours it, so a dead or
            stuck peer ends the others with :class:`DistributedError`.

    Calling it again once a group exists does nothing (and returns whether
    that group has several replicas).

    Example:
        >>> initialize('')              # no torchrun environment: one process
        False
    """
    global _owned_group
    if not isinstance(master, str):
        raise ValueError(f"master must be a string ('', 'tcp://host:port' or 'file:///path'), got {master!r}")
    if master and not master.startswith(("tcp://", "file://", "env://")):
        raise ValueError(f"master must be '', 'tcp://host:port', 'file:///path' or 'env://', got {master!r}")
    _check_int("rank", rank, 0)
    _check_int("world_size", world_size, 1)
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend must be None or a string such as 'gloo' or 'nccl', got {backend!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    if _HOGWILD is not None:
        raise ValueError(
            "initialize() was called in a run_hogwild worker; Hogwild workers share memory and need no process group"
        )
    if not dist.is_available():
        if master or (world_size or 1) > 1:
            raise DistributedError("this PyTorch build has no torch.distributed; it cannot run several replicas")
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    rank = rank if rank is not None else _env_int("RANK")
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE")
    if not master:
        if not _torchrun_env():
            if world_size is not None and world_size > 1:
                raise ValueError(
                    f"world_size is {world_size} but master is '' and there is no torchrun environment "
                    "(MASTER_ADDR); pass master='tcp://host:port' or launch with torchrun"
                )
            return False
        master = "env://"
    if rank is None or world_size is None:
        raise ValueError(
            f"master={master!r} needs this replica's rank and the world size: set RANK and WORLD_SIZE in the "
            "environment or call slim.distributed.initialize(master, rank=..., world_size=...)"
        )
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size, got rank={rank} and world_size={world_size}")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "nccl" in backend:
        local_rank = _env_int("LOCAL_RANK")
        torch.cuda.set_device(local_rank if local_rank is not None else rank % torch.cuda.device_count())
    seconds = float(timeout) if timeout is not None else default_timeout()
    delta = datetime.timedelta(seconds=seconds)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    try:
        if master == "env://" and restart is not None:
            # torchrun may hand every restarted round the store of the first one; keys left there by the
            # replicas that died would point the new ones at dead peers. Each round gets its own prefix.
            store, rank, world_size = next(dist.rendezvous(master, rank=rank, world_size=world_size, timeout=delta))
            store = dist.PrefixStore(f"torchslim/restart_{restart}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=delta)
        else:
            dist.init_process_group(backend=backend, init_method=master, rank=rank, world_size=world_size, timeout=delta)
    except Exception as e:
        raise DistributedError(
            f"replica {rank} of {world_size} could not join the others at {master} (backend {backend}, timeout "
            f"{seconds:.0f} s): {type(e).__name__}: {e}"
        ) from e
    if not _owned_group:
        atexit.register(_destroy_owned_group)
    _owned_group = True
    logger.info("Replica %d of %d joined %s (%s, timeout %.0f s)", rank, world_size, master, backend, seconds)
    return world_size > 1


def _destroy_owned_group() -> None:
    global _owned_group
    if _owned_group and dist.is_available() and dist.is_initialized():
        # Free what only torchslim's collections keep alive (train ops -> loss functions -> a user's
        # DistributedDataParallel) before the group goes: a DDP reducer outliving its process group
        # aborts the interpreter at exit ('terminate called without an active exception').
        import gc

        from torchslim import collections

        collections._GLOBAL.clear()
        gc.collect()
        try:
            dist.destroy_process_group()
        except Exception:  # the process is exiting; a dead peer must not turn exit into an error
            pass
    _owned_group = False


def get_rank() -> int:
    """This replica's rank: the Hogwild worker's, the process group's, else ``$RANK`` (torchrun's), else 0.

    Usable before ``train`` joins the group, e.g. to shard the data.

    Example:
        >>> get_rank()
        0
    """
    if _HOGWILD is not None:
        return _HOGWILD.rank
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK") or 0


def get_world_size() -> int:
    """The number of replicas: the Hogwild workers', the process group's, else ``$WORLD_SIZE``, else 1.

    Example:
        >>> get_world_size()
        1
    """
    if _HOGWILD is not None:
        return _HOGWILD.num_workers
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE") or 1


def _group_timeout() -> float:
    try:
        from torch.distributed.distributed_c10d import _get_default_group

        t = getattr(_get_default_group(), "options", None)
        t = getattr(t, "_timeout", None)
        if isinstance(t, datetime.timedelta):
            return t.total_seconds()
    except Exception:
        pass
    return default_timeout()


def _collective_error(what: str, step: int | None, error: BaseException) -> DistributedError:
    where = f" at global step {step}" if step is not None else ""
    return DistributedError(
        f"replica {get_rank()} of {get_world_size()}: {what}{where} failed: a peer replica died, hung or left "
        f"training early (every replica must run the same number of steps). The collective timeout is "
        f"{_group_timeout():.0f} s (set it with slim.distributed.initialize(timeout=...) or ${TIMEOUT_ENV}). "
        f"Cause: {type(error).__name__}: {error}"
    )


# --------------------------------------------------------------------------- gradient averaging


class _Bucket:
    __slots__ = ("count", "flat", "missing", "numel", "offsets", "ones", "params", "ready", "views", "work")

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        # The flat buffer holds the gradients then one "had a gradient" flag per parameter.
        self.flat = torch.zeros(n + len(params), dtype=params[0].dtype, device=params[0].device)
        self.views = [self.flat[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, params)]
        self.ready = [False] * len(params)
        self.count = 0
        self.work: Any = None
        self.missing = False

    def reset(self) -> None:
        self.ready = [False] * len(self.params)
        self.count = 0
        self.work = None
        self.missing = False


class _GradientAverager:
    """Averages the gradients of ``params`` across the default process group, bucket by bucket.

    Each ``p.grad`` is a view of its bucket's flat buffer (after
    :meth:`zero_grad`; a gradient the optimizer reset to None is copied in by
    the hook), so backward accumulates straight into the buckets. A
    post-accumulate-grad hook on each parameter counts the gradients ready;
    a full bucket is scaled by 1/world and all-reduced asynchronously while
    backward goes on.
    Buckets are launched in a fixed order on every replica (as DDP does), so
    the collectives match even when gradients arrive in a different order.
    :meth:`finish` launches what is left (a parameter without a gradient
    contributes zeros), waits, and leaves each ``p.grad`` holding the
    average; a parameter no replica produced a gradient for keeps
    ``grad=None``.
    """

    def __init__(self, params: Sequence[torch.Tensor], bucket_cap_mb: float, first_bucket_mb: float = 1.0) -> None:
        unique: dict[int, torch.Tensor] = {}
        for p in params:
            if p.requires_grad and id(p) not in unique:
                if p.is_sparse:
                    raise ValueError("SyncReplicasOptimizer cannot average sparse parameters")
                unique[id(p)] = p
        self.params = list(unique.values())
        self.world = dist.get_world_size()
        self.scale = 1.0 / self.world
        self.buckets: list[_Bucket] = []
        open_: dict[tuple[Any, Any], list[torch.Tensor]] = {}
        sizes: dict[tuple[Any, Any], int] = {}
        cap = [min(first_bucket_mb, bucket_cap_mb) * 2**20, bucket_cap_mb * 2**20]
        for p in reversed(self.params):  # gradients of the last layers arrive first
            key = (p.device, p.dtype)
            open_.setdefault(key, []).append(p)
            sizes[key] = sizes.get(key, 0) + p.numel() * p.element_size()
            if sizes[key] >= cap[min(len(self.buckets), 1)]:
                self.buckets.append(_Bucket(open_.pop(key)))
                sizes[key] = 0
        for group in open_.values():
            self.buckets.append(_Bucket(group))
        self.where: dict[int, tuple[_Bucket, int]] = {}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self.where[id(p)] = (b, i)
        self.next = 0
        self.synced = False
        self.step_of: Callable[[], int | None] = lambda: None
        self.buffers: list[list[torch.Tensor]] = []  # groups of model buffers the chief broadcasts each step
        self.chief_rank = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def signature(self) -> list[tuple[int, str, str]]:
        """Bucket layout, compared across replicas before training (they must hold the same model)."""
        return [(b.numel, str(b.flat.dtype), b.flat.device.type) for b in self.buckets]

    def _on_grad(self, p: torch.Tensor) -> None:
        b, i = self.where[id(p)]
        if b.ready[i] and b.work is not None:
            raise DistributedError(
                "SyncReplicasOptimizer: a second backward pass reached a parameter whose gradient is already "
                "being averaged; accumulating gradients over several backward passes per step is not supported"
            )
        view = b.views[i]
        grad = p.grad
        if grad is not view:  # grads were set to None (or accumulated out of place): copy into the bucket
            if grad is None:
                return
            if grad.is_sparse:
                raise DistributedError("SyncReplicasOptimizer cannot average sparse gradients")
            view.copy_(grad)
            p.grad = view
        if b.ready[i]:
            return  # a second backward before the bucket left: accumulated into the view
        self.synced = False
        b.ready[i] = True
        b.count += 1
        if b.count == len(b.params) and self.buckets[self.next] is b:
            self._launch_ready()

    def zero_grad(self) -> None:
        """Zeroes the buckets and makes each ``p.grad`` a view of its bucket, so backward accumulates there."""
        for b in self.buckets:
            b.flat.zero_()
            for p, v in zip(b.params, b.views):
                if p.grad is not v:
                    p.grad = v

    def _launch_ready(self) -> None:
        buckets = self.buckets
        while self.next < len(buckets) and buckets[self.next].count == len(buckets[self.next].params):
            self._launch(buckets[self.next])
            self.next += 1

    def _launch(self, b: _Bucket) -> None:
        tail = b.flat[b.numel:]
        if b.count == len(b.params):
            tail.fill_(1.0)
        else:
            b.missing = True
            for i, done in enumerate(b.ready):
                if not done:
                    b.views[i].zero_()
            tail.copy_(torch.tensor([1.0 if r else 0.0 for r in b.ready], dtype=tail.dtype))
        b.flat.mul_(self.scale)
        try:
            b.work = dist.all_reduce(b.flat, async_op=True)
        except Exception as e:
            raise _collective_error("the gradient all-reduce", self.step_of(), e) from e

    def finish(self, *_: Any) -> None:
        """Launches the buckets not launched yet, waits, and leaves the averaged gradients in ``p.grad``."""
        buckets = self.buckets
        while self.next < len(buckets):
            self._launch(buckets[self.next])
            self.next += 1
        buffer_work = None
        flat_buffers = None
        if self.buffers:
            flat_buffers = [torch._utils._flatten_dense_tensors(group) for group in self.buffers]
            try:
                buffer_work = [dist.broadcast(f, src=self.chief_rank, async_op=True) for f in flat_buffers]
            except Exception as e:
                raise _collective_error("the buffer broadcast", self.step_of(), e) from e
        try:
            for b in buckets:
                b.work.wait()
            for w in buffer_work or ():
                w.wait()
        except Exception as e:
            raise _collective_error("the gradient all-reduce", self.step_of(), e) from e
        for b in buckets:
            if b.missing:
                counts = b.flat[b.numel:].tolist()
                for i, p in enumerate(b.params):
                    p.grad = b.views[i] if counts[i] > 0 else None
            else:
                for i, p in enumerate(b.params):
                    if p.grad is not b.views[i]:
                        p.grad = b.views[i]
            b.reset()
        if flat_buffers is not None and dist.get_rank() != self.chief_rank:
            for group, flat in zip(self.buffers, flat_buffers):
                torch._foreach_copy_(group, torch._utils._unflatten_dense_tensors(flat, group))
        self.next = 0
        self.synced = True

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# --------------------------------------------------------------------------- SyncReplicasOptimizer


class SyncReplicasOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer so that replicas apply the average of their gradients (synchronous training).

    Pass it to ``create_train_op`` (or the optimizer it wraps) and as
    ``sync_optimizer`` to ``slim.learning.train``. With N replicas of batch
    b each, training matches one process with batch N*b: gradients are
    averaged (bucketed all-reduce, overlapped with backward) before gradient
    multipliers, clipping, the numerics check and the update. In one process
    it is the wrapped optimizer. Its state_dict is the wrapped optimizer's, so
    checkpoints move freely between single-process and replicated runs.

    Args:
        opt: the ``torch.optim.Optimizer`` that applies the averaged gradients.
        replicas_to_aggregate: gradients aggregated per step; None or the
            number of replicas (all-reduce aggregates every replica; TF's
            backup workers, fewer than all, have no all-reduce equivalent).
        total_num_replicas: None or the number of replicas.
        bucket_cap_mb: torchslim extension: size of an all-reduce bucket
            (DDP's default, 25 MB; the first bucket is 1 MB).
        broadcast_buffers: torchslim extension: copy the chief's model
            buffers (batch norm statistics) to every replica each step, as
            DDP does, so the replicas' buffers never drift apart.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
        >>> net(torch.ones(1, 2)).sum().backward(); opt.step()      # one process: plain SGD
        >>> opt.param_groups[0]['lr']
        0.1
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        replicas_to_aggregate: int | None = None,
        total_num_replicas: int | None = None,
        *,
        bucket_cap_mb: float = 25.0,
        broadcast_buffers: bool = True,
    ) -> None:
        if isinstance(opt, SyncReplicasOptimizer):
            raise ValueError("opt is already a SyncReplicasOptimizer; wrap the plain optimizer once")
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
        _check_int("replicas_to_aggregate", replicas_to_aggregate, 1)
        _check_int("total_num_replicas", total_num_replicas, 1)
        if (replicas_to_aggregate is not None and total_num_replicas is not None
                and replicas_to_aggregate != total_num_replicas):
            raise ValueError(
                f"replicas_to_aggregate ({replicas_to_aggregate}) must equal total_num_replicas ({total_num_replicas}): "
                "gradients are all-reduced over every replica, so backup workers are not supported"
            )
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
        self.optimizer = opt
        self.replicas_to_aggregate = replicas_to_aggregate
        self.total_num_replicas = total_num_replicas
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.broadcast_buffers = bool(broadcast_buffers)
        self._averager: _GradientAverager | None = None
        self._managed = False  # True when a train op averages in after_backward
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # The wrapped optimizer's groups, state and defaults are this one's (schedulers change lr here).
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return f"SyncReplicasOptimizer({self.optimizer!r}, replicas_to_aggregate={self.replicas_to_aggregate})"

    def check_replicas(self, world_size: int) -> None:
        """Raises ValueError unless replicas_to_aggregate / total_num_replicas fit ``world_size`` replicas."""
        for name in ("replicas_to_aggregate", "total_num_replicas"):
            value = getattr(self, name)
            if value is not None and value != world_size:
                raise ValueError(
                    f"{name}={value} but there are {world_size} replicas; gradients are all-reduced over every "
                    f"replica, so leave it None or set it to {world_size}"
                )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Averages the gradients across replicas (unless the train op did already), then steps."""
        averager = self._averager
        if averager is not None and not self._managed and not averager.synced:
            averager.finish()
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients; while replicas train, zeroes the all-reduce buckets the grads live in."""
        if self._averager is not None:
            self._averager.zero_grad()  # backward accumulates straight into the buckets (no copy)
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._averager is not None:
            raise ValueError("cannot add a parameter group while replicas are training; add it before train()")
        self.optimizer.add_param_group(param_group)

    def _attach(self, params: Sequence[torch.Tensor], managed: bool) -> _GradientAverager:
        if self._averager is not None:
            raise ValueError("this SyncReplicasOptimizer is already in use by a running train(); one at a time")
        self._averager = _GradientAverager(params, self.bucket_cap_mb)
        self._managed = managed
        return self._averager

    def _detach(self) -> None:
        if self._averager is not None:
            self._averager.close()
        self._averager = None
        self._managed = False


# --------------------------------------------------------------------------- replicas


class _Replica:
    """One process's part in training; see the module docstring for when each method is called."""

    rank = 0
    world_size = 1
    is_chief = True

    def after_restore(self, supervisor: Any) -> None:
        pass

    def before_training(self, supervisor: Any) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _LocalReplica(_Replica):
    """One process (no process group): sync_optimizer given but nothing to synchronise with."""

    def __init__(self, is_chief: bool | None) -> None:
        self.is_chief = True if is_chief is None else bool(is_chief)


def _trained_params(train_op: Any) -> list[torch.Tensor]:
    if train_op.variables_to_train is not None:
        return list(train_op.variables_to_train)
    return [p for group in train_op.optimizer.param_groups for p in group["params"]]


def _uses_ddp(train_op: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    from torchslim._modules import modules_of

    candidates = [train_op.model, train_op.total_loss, *modules_of(train_op.total_loss).values()]
    for c in candidates:
        if isinstance(c, torch.nn.Module) and any(isinstance(m, DistributedDataParallel) for m in c.modules()):
            return True
    return False


def _state_tensors(module: torch.nn.Module | None) -> list[list[torch.Tensor]]:
    """The module's parameters and buffers, grouped by (device, dtype) for coalesced broadcasts."""
    if module is None:
        return []
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


class _GroupReplica(_Replica):
    """A replica in a torch.distributed process group: synchronous, or the user's own DDP model."""

    def __init__(self, train_op: Any, is_chief: bool | None, sync_optimizers: list[SyncReplicasOptimizer]) -> None:
        self.train_op = train_op
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        mine = self.rank == 0 if is_chief is None else bool(is_chief)
        flags: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(flags, mine)
        except Exception as e:
            raise _collective_error("choosing the chief", None, e) from e
        chiefs = [r for r, f in enumerate(flags) if f]
        if len(chiefs) != 1:
            raise ValueError(
                f"exactly one replica must be the chief, but is_chief is True on ranks {chiefs}; "
                "leave is_chief=None (rank 0 is the chief) or set it True on one rank only"
            )
        self.chief_rank = chiefs[0]
        self.is_chief = mine
        self.sync_optimizers = sync_optimizers
        self.averagers: list[_GradientAverager] = []
        self._installed: Callable[..., Any] | None = None
        step_of = lambda: train_op.step + 1  # noqa: E731 - the step being taken
        for opt in sync_optimizers:
            if opt is train_op.optimizer or opt.optimizer is train_op.optimizer:
                averager = opt._attach(_trained_params(train_op), managed=True)
                if opt.broadcast_buffers and train_op.model is not None:
                    averager.buffers = [g for g in _buffer_groups(train_op.model)]
                self._installed = averager.finish
                train_op.after_backward.append(averager.finish)
            else:  # another optimizer stepped by the user's own code: averages in its step()
                averager = opt._attach([p for g in opt.param_groups for p in g["params"]], managed=False)
            averager.step_of = step_of
            averager.chief_rank = self.chief_rank
            self.averagers.append(averager)

    def after_restore(self, supervisor: Any) -> None:
        op = self.train_op
        mine = {
            "step": op.step,
            "restored_from": os.path.basename(supervisor.restored_from or ""),
            "layout": [a.signature() for a in self.averagers],
        }
        everyone: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(everyone, mine)
        except Exception as e:
            raise _collective_error("comparing the replicas' starting state", None, e) from e
        chief = everyone[self.chief_rank]
        for r, theirs in enumerate(everyone):
            if theirs["layout"] != chief["layout"]:
                raise DistributedError(
                    f"replica {r} trains a model whose gradient layout differs from the chief's "
                    f"({theirs['layout']} vs {chief['layout']}); every replica must build the same model"
                )
        differ = [r for r, t in enumerate(everyone) if (t["step"], t["restored_from"]) != (chief["step"], chief["restored_from"])]
        try:
            with torch.no_grad():
                self._broadcast_state(supervisor, differ)
        except DistributedError:
            raise
        except Exception as e:
            raise _collective_error("broadcasting the chief's starting state", op.step, e) from e

    def _broadcast_state(self, supervisor: Any, differ: list[int]) -> None:
        op = self.train_op
        if differ:
            # Some replica restored another checkpoint (or none): send the chief's whole state.
            logger.info("Replicas %s start from another state than the chief's; sending the chief's", differ)
            from torchslim import checkpoint

            payload = [checkpoint.snapshot(supervisor.state_dict()) if self.is_chief else None]
            dist.broadcast_object_list(payload, src=self.chief_rank)
            if self.rank in differ:
                supervisor.load_state_dict(payload[0])
        for group in _state_tensors(op.model):
            flat = torch._utils._flatten_dense_tensors(group)
            dist.broadcast(flat, src=self.chief_rank)
            if not self.is_chief:
                torch._foreach_copy_(group, torch._utils._unflatten_dense_tensors(flat, group))

    def close(self) -> None:
        if self._installed is not None:
            try:
                self.train_op.after_backward.remove(self._installed)
            except ValueError:
                pass
            self._installed = None
        for opt in self.sync_optimizers:
            opt._detach()


def _buffer_groups(module: torch.nn.Module) -> list[list[torch.Tensor]]:
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for b in module.buffers():
        groups.setdefault((b.device, b.dtype), []).append(b)
    return list(groups.values())


# --------------------------------------------------------------------------- Hogwild


@dataclass
class _HogwildContext:
    rank: int
    num_workers: int
    step: Any  # multiprocessing Value('q'): the shared global step
    done: Any  # multiprocessing Value('i'): workers that stopped training
    barrier: Any
    timeout: float


_HOGWILD: _HogwildContext | None = None


class _HogwildReplica(_Replica):
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


# --------------------------------------------------------------------------- prepare


def _as_sync_list(sync_optimizer: Any) -> list[SyncReplicasOptimizer]:
    items = sync_optimizer if isinstance(sync_optimizer, (list, tuple)) else [sync_optimizer]
    if not items:
        raise ValueError("sync_optimizer must be None, a SyncReplicasOptimizer or a non-empty list of them, got []")
    for item in items:
        if not isinstance(item, SyncReplicasOptimizer):
            raise ValueError(
                f"sync_optimizer must be a slim.SyncReplicasOptimizer (or a list of them), got {type(item).__name__}"
            )
    return list(items)


def prepare(
    train_op: Any,
    master: str = "",
    is_chief: bool | None = None,
    sync_optimizer: SyncReplicasOptimizer | Sequence[SyncReplicasOptimizer] | None = None,
    startup_delay_steps: int = 0,
    number_of_steps: int | None = None,
) -> _Replica:
    """Sets up this process's replica for ``train``; the Supervisor calls it (see the module docstring).

    Joins the process group (``master`` or torchrun's environment), picks the
    chief, and installs the gradient averaging of ``sync_optimizer`` on the
    train op. In a :func:`run_hogwild` worker it returns the asynchronous
    replica. Without any process group it returns a single-process replica.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
        >>> from torchslim import learning
        >>> op = learning.create_train_op(lambda: net(torch.ones(1, 2)).sum(), opt, global_step=learning.GlobalStep(), model=net)
        >>> replica = prepare(op, sync_optimizer=opt); (replica.is_chief, replica.world_size)
        (True, 1)
        >>> replica.close()
    """
    if not hasattr(train_op, "after_backward") or not hasattr(train_op, "optimizer"):
        raise ValueError(f"train_op must be made by create_train_op, got {type(train_op).__name__}")
    if is_chief is not None and not isinstance(is_chief, (bool, int)):
        raise ValueError(f"is_chief must be None (rank 0 is the chief) or a bool, got {is_chief!r}")
    if isinstance(startup_delay_steps, bool) or not isinstance(startup_delay_steps, int) or startup_delay_steps < 0:
        raise ValueError(f"startup_delay_steps must be an int >= 0, got {startup_delay_steps!r}")
    syncs = _as_sync_list(sync_optimizer) if sync_optimizer is not None else []
    if syncs and startup_delay_steps > 0:
        raise ValueError("startup_delay_steps must be zero when sync_optimizer is supplied.")
    if syncs and not any(s is train_op.optimizer or s.optimizer is train_op.optimizer for s in syncs):
        raise ValueError(
            f"sync_optimizer wraps {type(syncs[0].optimizer).__name__} but the train op steps another optimizer "
            f"({type(train_op.optimizer).__name__}); build the train op from the SyncReplicasOptimizer "
            "(or from the optimizer it wraps)"
        )

    if _HOGWILD is not None:
        if syncs:
            raise ValueError(
                "sync_optimizer was given in a run_hogwild worker; Hogwild workers are asynchronous. "
                "For synchronous replicas launch with torchrun (or master=) instead"
            )
        if master:
            raise ValueError(f"master={master!r} was given in a run_hogwild worker; leave master=''")
        return _HogwildReplica(train_op, _HOGWILD, is_chief, startup_delay_steps, number_of_steps)

    initialize(master)
    if not (dist.is_available() and dist.is_initialized()):
        for s in syncs:
            s.check_replicas(1)
        return _LocalReplica(is_chief)
    world = dist.get_world_size()
    for s in syncs:
        s.check_replicas(world)
    from torchslim import fsdp  # FSDP2 averages the gradients itself and checkpoints shards: its own replica
    if fsdp.is_fully_sharded(train_op.model):
        return fsdp.FSDPReplica(train_op, is_chief, syncs)  # type: ignore[return-value]
    if syncs and _uses_ddp(train_op):
        raise ValueError(
            "the model is wrapped in DistributedDataParallel, which averages the gradients itself; give "
            "total_loss the plain model (SyncReplicasOptimizer averages them) or pass sync_optimizer=None"
        )
    if not syncs and world > 1:
        if not _uses_ddp(train_op):
            raise ValueError(
                f"there are {world} replicas but sync_optimizer is None: asynchronous training across processes "
                "is not supported. Pass sync_optimizer=slim.SyncReplicasOptimizer(optimizer) for synchronous "
                "replicas, wrap the model in DistributedDataParallel yourself, or use slim.distributed.run_hogwild "
                "for asynchronous workers on one machine"
            )
        if startup_delay_steps > 0:
            raise ValueError("startup_delay_steps must be zero with a DistributedDataParallel model (its replicas "
                             "step together, so a delayed replica would stall the others)")
    return _GroupReplica(train_op, is_chief, syncs)
