"""The process group: joining it, the chief's rank, collective timeouts, restarts that agree across nodes.

    >>> import torchslim as slim
    >>> slim.distributed.initialize('')          # no torchrun environment: one process, no group
    False
    >>> slim.distributed.get_rank(), slim.distributed.get_world_size()
    (0, 1)

Under ``torchrun`` (``initialize('')`` reads its environment) or with an init
URL (``initialize('tcp://host:port', rank=r, world_size=n)``) it joins the
default process group, gloo on CPU and ``cpu:gloo,cuda:nccl`` with CUDA. A
collective that waits longer than :func:`default_timeout` for a peer fails
with :class:`DistributedError` instead of hanging.

Restarts: torchrun hands every restarted round the same store, so the keys
the dead round left there would point the new replicas at dead peers. Each
round therefore works under its own key prefix, ``torchslim/<run id>/
generation_<g>/``, where ``g`` is a number the replicas of the round agree on
through that store when they start (:func:`agree_on_generation`): every node
sees the same ``g``, whatever its own restart counter says.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import sys
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "TIMEOUT_ENV",
    "DistributedError",
    "agree_on_generation",
    "default_timeout",
    "get_rank",
    "get_world_size",
    "initialize",
]

logger = logging.getLogger("torchslim")

TIMEOUT_ENV = "TORCHSLIM_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0
_owned_group = False  # True when initialize() created the default process group


class DistributedError(RuntimeError):
    """A collective between replicas failed or timed out (a peer died, hung or stopped early)."""


def _hogwild_context() -> Any:
    # The run_hogwild worker this process is, if any (read without importing torchslim.hogwild).
    hogwild = sys.modules.get("torchslim.hogwild")
    return None if hogwild is None else hogwild._HOGWILD

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



def agree_on_generation(store: Any, rank: int, world_size: int, timeout: float, prefix: str = "torchslim") -> int:
    """The number of this round of replicas, the same on every rank of the round, agreed through ``store``.

    Rank 0 (the round's leader) draws the next number from a counter in the
    store; every other rank says hello to the newest number it sees with a
    fresh nonce and waits for the leader of that number to echo it. A
    number left by an earlier round, whose leader is dead, is never echoed,
    so a rank that read it moves on when the new leader draws its number.
    The store may be shared by every round (torchrun's agent store): keys of
    dead rounds cannot mislead the new one, and a per-node counter such as
    ``TORCHELASTIC_RESTART_COUNT`` is never consulted.

    Example:
        >>> import threading
        >>> store = torch.distributed.HashStore()
        >>> got = {}
        >>> workers = [threading.Thread(target=lambda r=r: got.update({r: agree_on_generation(store, r, 2, 10)}))
        ...            for r in range(2)]
        >>> _ = [w.start() for w in workers]; _ = [w.join() for w in workers]
        >>> got[0] == got[1] == 1
        True
    """
    counter = f"{prefix}/generation"
    deadline = time.monotonic() + timeout

    def wait_a_little(what: str) -> None:
        if time.monotonic() > deadline:
            raise DistributedError(
                f"replica {rank} of {world_size}: {what} within {timeout:.0f} s while the replicas of this round "
                "agreed on its number (a peer did not start, or started in another round)"
            )
        time.sleep(0.005)

    if rank == 0:
        generation = int(store.add(counter, 1))
        pending = list(range(1, world_size))
        while pending:
            for r in list(pending):
                hello = f"{prefix}/generation_{generation}/hello_{r}"
                if store.check([hello]):
                    store.set(f"{prefix}/generation_{generation}/welcome_{r}", store.get(hello))
                    pending.remove(r)
            if pending:
                wait_a_little(f"ranks {pending} did not say hello")
        return generation
    nonce = uuid.uuid4().hex.encode()
    greeted = 0
    while True:
        newest = int(store.add(counter, 0))
        if newest > greeted:  # a new leader (or the first one seen): greet it
            store.set(f"{prefix}/generation_{newest}/hello_{rank}", nonce)
            greeted = newest
        if greeted:
            welcome = f"{prefix}/generation_{greeted}/welcome_{rank}"
            if store.check([welcome]) and store.get(welcome) == nonce:
                return greeted
        wait_a_little("no leader answered")


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
    if _hogwild_context() is not None:
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
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    try:
        if master == "env://" and run_id is not None:
            # torchrun hands every restarted round the store of the first one; keys left there by the
            # replicas that died would point the new ones at dead peers. Each round gets its own prefix,
            # named by a number the round agrees on (the restart counter is per node: nodes disagree).
            store, rank, world_size = next(dist.rendezvous(master, rank=rank, world_size=world_size, timeout=delta))
            prefix = f"torchslim/{run_id}"
            generation = agree_on_generation(store, rank, world_size, seconds, prefix=prefix)
            store = dist.PrefixStore(f"{prefix}/generation_{generation}", store)
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
    hogwild = _hogwild_context()
    if hogwild is not None:
        return int(hogwild.rank)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK") or 0


def get_world_size() -> int:
    """The number of replicas: the Hogwild workers', the process group's, else ``$WORLD_SIZE``, else 1.

    Example:
        >>> get_world_size()
        1
    """
    hogwild = _hogwild_context()
    if hogwild is not None:
        return int(hogwild.num_workers)
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
