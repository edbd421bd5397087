"""Replicated training: synchronous replicas on torch.distributed, asynchronous Hogwild workers.

    >>> import torch, torchslim as slim
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = slim.SyncReplicasOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    >>> x = torch.randn(64, 4)
    >>> shard = x[slim.distributed.get_rank()::slim.distributed.get_world_size()]   # this replica's data
    >>> train_op = slim.learning.create_train_op(lambda batch: model(batch).pow(2).mean(), optimizer,
    ...                                          global_step=slim.learning.GlobalStep())
    >>> _ = slim.learning.train(train_op, None, data=shard.split(8), sync_optimizer=optimizer, log_every_n_steps=0)
    >>> train_op.step
    8

The same script runs in one process (as here) and under ``torchrun``::

    python train.py                                  one process
    torchrun --nproc-per-node 4 train.py             four replicas on this machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
             --max-restarts 3 train.py               two machines, restarted together on a failure
    # or: slim.distributed.initialize('tcp://10.0.0.1:29500', rank=r, world_size=n) before train()

The pieces, one module each:

* :mod:`torchslim.process_group` -- joining the group (``initialize``),
  ``get_rank``, ``get_world_size``, collective timeouts, restarts that agree
  across nodes;
* :mod:`torchslim.sync_replicas` -- ``SyncReplicasOptimizer`` and its
  bucketed gradient all-reduce;
* :mod:`torchslim.hogwild` -- ``run_hogwild``: asynchronous workers on one
  machine sharing weights and a global step;
* :mod:`torchslim.replicas` -- one process's part: the chief, a common
  start, per-replica RNG streams and data position, saves every replica
  agrees on.

This module keeps the ``slim.distributed.X`` names and :func:`prepare`, which
``slim.learning.train`` calls to pick the replica for this process.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from torchslim import hogwild as _hogwild
from torchslim.hogwild import _HogwildReplica, run_hogwild
from torchslim.process_group import (
    TIMEOUT_ENV,
    DistributedError,
    agree_on_generation,
    default_timeout,
    get_rank,
    get_world_size,
    initialize,
)
from torchslim.replicas import GroupReplica, LocalReplica, Replica
from torchslim.sync_replicas import SyncReplicasOptimizer

__all__ = [
    "TIMEOUT_ENV",
    "DistributedError",
    "Replica",
    "SyncReplicasOptimizer",
    "agree_on_generation",
    "default_timeout",
    "get_rank",
    "get_world_size",
    "initialize",
    "prepare",
    "run_hogwild",
]


def _uses_ddp(train_op: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    from torchslim._modules import modules_of

    candidates = [train_op.model, train_op.total_loss, *modules_of(train_op.total_loss, unwrap=False).values()]
    for c in candidates:
        if isinstance(c, torch.nn.Module) and any(isinstance(m, DistributedDataParallel) for m in c.modules()):
            return True
    return False


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
) -> Replica:
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

    hogwild = _hogwild._HOGWILD
    if hogwild is not None:
        if syncs:
            raise ValueError(
                "sync_optimizer was given in a run_hogwild worker; Hogwild workers are asynchronous. "
                "For synchronous replicas launch with torchrun (or master=) instead"
            )
        if master:
            raise ValueError(f"master={master!r} was given in a run_hogwild worker; leave master=''")
        return _HogwildReplica(train_op, hogwild, is_chief, startup_delay_steps, number_of_steps)

    initialize(master)
    if not (dist.is_available() and dist.is_initialized()):
        for s in syncs:
            s.check_replicas(1)
        return LocalReplica(is_chief)
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
    return GroupReplica(train_op, is_chief, syncs)
