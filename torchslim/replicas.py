"""One process's part in replicated training: the chief, a common start, per-replica state, agreed saves.

    >>> import torch, torchslim as slim
    >>> net = torch.nn.Linear(2, 1)
    >>> op = slim.learning.create_train_op(lambda: net(torch.ones(1, 2)).sum(), torch.optim.SGD(net.parameters(), lr=0.1),
    ...                                    global_step=slim.learning.GlobalStep(), model=net)
    >>> replica = slim.distributed.prepare(op)       # no process group: a local replica
    >>> replica.is_chief, replica.world_size, replica.save_due(10, slim.triggers.EveryNSteps(5))
    (True, 1, True)

``slim.distributed.prepare`` returns one; the Supervisor drives it::

    replica = prepare(train_op, ...)       # the chief agreed on; gradient averaging installed
    start:  restore the newest checkpoint  -> replica.restore(state)    (keeps the checkpoint's replica parts)
            replica.after_restore(sv)      # every replica takes the chief's weights, then its own
                                           # RNG streams and data position from the chief's checkpoint
            replica.before_training(sv)
    loop:   replica.should_stop()
            train_op(batch)
            if replica.save_due(step, sv.save_trigger):   # the same answer on every replica
                sv.save()  -> replica.replica_states(sv)  # every rank's part, gathered to the chief
    replica.close()

Per-replica state: each replica draws its own dropout masks and shuffles its
own shard, so its torch / numpy / Python RNG streams and its data position
are its own. Every checkpoint holds them all (``state['replicas'][rank]``),
gathered to the chief and written in the chief's one file, so a checkpoint
is complete only when every rank's part is (the file is written atomically).
On resume the chief sends each rank its own part. A checkpoint written by N
replicas resumes only with N replicas: another number is refused with an
error that says so (the weights still load anywhere, e.g. into
``evaluate_once`` or a single process, which takes the chief's streams).

A new kind of replica (FSDP, say) subclasses :class:`Replica` and is
returned by ``prepare``; :class:`GroupReplica` holds what every group
replica shares (chief, start state, per-replica parts, agreed saves).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from torchslim import triggers as _triggers
from torchslim.process_group import DistributedError, _collective_error
from torchslim.sync_replicas import SyncReplicasOptimizer, _GradientAverager

__all__ = ["GroupReplica", "LocalReplica", "Replica"]

logger = logging.getLogger("torchslim")


class Replica:
    """One process's part in training; the base is a single process that owns every decision.

    Example:
        >>> r = Replica(); r.save_due(3, None), r.replica_states(None), r.should_stop()
        (False, None, False)
    """

    rank = 0
    world_size = 1
    is_chief = True

    def restore(self, state: dict[str, Any]) -> None:
        """Sees a checkpoint the Supervisor just loaded (before :meth:`after_restore`)."""

    def after_restore(self, supervisor: Any) -> None:
        """Makes every replica start from the same state (the chief's)."""

    def before_training(self, supervisor: Any) -> None:
        """Called once before the first step."""

    def should_stop(self) -> bool:
        """True to end training before the next step."""
        return False

    def save_due(self, step: int, trigger: Any) -> bool:
        """Whether to checkpoint after ``step``: the same answer on every replica."""
        return trigger is not None and bool(trigger(step))

    def replica_states(self, supervisor: Any) -> list[dict[str, Any]] | None:
        """Every rank's own part of the checkpoint (on the chief; None elsewhere and in one process)."""
        return None

    def close(self) -> None:
        """Removes what :func:`prepare` installed."""


class LocalReplica(Replica):
    """One process (no process group): sync_optimizer given but nothing to synchronise with.

    Example:
        >>> LocalReplica(is_chief=False).is_chief
        False
    """

    def __init__(self, is_chief: bool | None) -> None:
        self.is_chief = True if is_chief is None else bool(is_chief)


def own_state(supervisor: Any) -> dict[str, Any]:
    """This replica's own part of a checkpoint: its RNG streams and its data position.

    Example:
        >>> sorted(own_state(None))
        ['data', 'rng']
    """
    from torchslim.supervisor import rng_state

    data: Any = getattr(supervisor, "data", None)
    return {"rng": rng_state(), "data": data.state_dict() if hasattr(data, "state_dict") else None}


def load_own_state(supervisor: Any, part: dict[str, Any]) -> None:
    """Restores what :func:`own_state` returned, into this process.

    Example:
        >>> part = own_state(None); a = torch.rand(1); load_own_state(None, part); bool(torch.rand(1) == a)
        True
    """
    from torchslim.supervisor import set_rng_state

    set_rng_state(part["rng"])
    data: Any = getattr(supervisor, "data", None)
    if part.get("data") is not None and hasattr(data, "load_state_dict"):
        data.load_state_dict(part["data"])


def _step_only(trigger: Any) -> bool:
    # A trigger whose answer depends on the step alone: every replica can ask its own copy.
    if isinstance(trigger, _triggers.AnyOf):
        return all(_step_only(t) for t in trigger.triggers)
    return isinstance(trigger, (_triggers.EveryNSteps, _triggers.AtSteps))


def _trained_params(train_op: Any) -> list[torch.Tensor]:
    if train_op.variables_to_train is not None:
        return list(train_op.variables_to_train)
    return [p for group in train_op.optimizer.param_groups for p in group["params"]]


def _state_tensors(module: torch.nn.Module | None) -> list[list[torch.Tensor]]:
    """The module's parameters and buffers, grouped by (device, dtype) for coalesced broadcasts."""
    if module is None:
        return []
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _buffer_groups(module: torch.nn.Module) -> list[list[torch.Tensor]]:
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for b in module.buffers():
        groups.setdefault((b.device, b.dtype), []).append(b)
    return list(groups.values())


def elect_chief(is_chief: bool | None, rank: int, world_size: int) -> tuple[int, bool]:
    """``(chief's rank, whether this rank is it)``, agreed by every rank (a collective); one chief or an error."""
    mine = rank == 0 if is_chief is None else bool(is_chief)
    flags: list[Any] = [None] * world_size
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
    return chiefs[0], mine


class GroupReplica(Replica):
    """A replica in a torch.distributed process group: synchronous, or the user's own DDP model.

    Built by ``slim.distributed.prepare`` once the group exists (a subclass
    may override :meth:`broadcast_start_state` for sharded models).
    """

    def __init__(self, train_op: Any, is_chief: bool | None, sync_optimizers: list[SyncReplicasOptimizer]) -> None:
        self.train_op = train_op
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.chief_rank, self.is_chief = elect_chief(is_chief, self.rank, self.world_size)
        self.sync_optimizers = sync_optimizers
        self.averagers: list[_GradientAverager] = []
        self._managed: _GradientAverager | None = None  # the averager the train op waits for
        self._installed: Callable[..., Any] | None = None
        self._restored_parts: Any = None  # the chief's checkpoint's per-replica parts
        self._save_mode = "never"  # how replicas agree on saves: never / local / piggyback / broadcast
        self._trigger: Any = None
        self._chief_saves = False
        self._gathered_step: int | None = None
        step_of = lambda: train_op.step + 1  # noqa: E731 - the step being taken
        for opt in sync_optimizers:
            if opt is train_op.optimizer or opt.optimizer is train_op.optimizer:
                averager = opt._attach(_trained_params(train_op), managed=True)
                if opt.broadcast_buffers and train_op.model is not None:
                    averager.buffers = [g for g in _buffer_groups(train_op.model)]
                averager.holding = lambda: train_op.accumulating
                self._installed = averager.finish
                self._managed = averager
                train_op.after_backward.append(averager.finish)
            else:  # another optimizer stepped by the user's own code: averages in its step()
                averager = opt._attach([p for g in opt.param_groups for p in g["params"]], managed=False)
            averager.step_of = step_of
            averager.chief_rank = self.chief_rank
            self.averagers.append(averager)

    # -- start -----------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        if self.is_chief:
            self._restored_parts = state.get("replicas")

    def after_restore(self, supervisor: Any) -> None:
        op = self.train_op
        trigger = supervisor.save_trigger if self.is_chief else None
        mine = {
            "step": op.step,
            "restored_from": os.path.basename(supervisor.restored_from or ""),
            "layout": [a.signature() for a in self.averagers],
            "saves": self.is_chief and supervisor.saver is not None and supervisor.logdir is not None,
            "trigger": (trigger if _step_only(trigger) else "timed") if trigger is not None else None,
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
        self._agree_on_saves(chief, trigger)
        differ = [r for r, t in enumerate(everyone) if (t["step"], t["restored_from"]) != (chief["step"], chief["restored_from"])]
        from torchslim.supervisor import rng_state, set_rng_state

        own_rng = rng_state()
        try:
            with torch.no_grad():
                self.broadcast_start_state(supervisor, differ)
            part = self._scatter_parts(supervisor)
        except (DistributedError, ValueError):
            raise
        except Exception as e:
            raise _collective_error("broadcasting the chief's starting state", op.step, e) from e
        if part is not None:
            load_own_state(supervisor, part)
        elif self.rank in differ:
            set_rng_state(own_rng)  # the chief's state came with the chief's RNG; keep this replica's own

    def _agree_on_saves(self, chief: dict[str, Any], trigger: Any) -> None:
        self._chief_saves = bool(chief["saves"])
        wanted = chief["trigger"]
        if wanted is None or not self._chief_saves:
            self._save_mode = "never"
        elif wanted != "timed":
            self._save_mode, self._trigger = "local", trigger if self.is_chief else wanted
        elif self._managed is not None:
            # The chief's answer rides in the last gradient bucket of each step: no extra collective.
            self._save_mode = "piggyback"
            if self.is_chief:
                self._managed.request = lambda: bool(trigger(self.train_op.step + 1))
        else:
            self._save_mode, self._trigger = "broadcast", trigger

    def broadcast_start_state(self, supervisor: Any, differ: list[int]) -> None:
        """Gives every replica the chief's model (and its whole state to the ranks in ``differ``)."""
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

    def _scatter_parts(self, supervisor: Any) -> dict[str, Any] | None:
        parts: list[Any] = [None] * self.world_size
        if self.is_chief and self._restored_parts is not None:
            saved = self._restored_parts
            if not isinstance(saved, list) or len(saved) != self.world_size:
                n = len(saved) if isinstance(saved, list) else "?"
                error = (
                    f"checkpoint {supervisor.restored_from!r} was written by {n} replicas but this run has "
                    f"{self.world_size}; each replica's RNG streams and data position are checkpointed per rank, "
                    f"so a run resumes only with the number of replicas that wrote it. Resume with {n} replicas, or "
                    "start a new logdir from its weights (init_fn=lambda: slim.checkpoint.restore_model(path, model))"
                )
                parts = [{"error": error}] * self.world_size
            else:
                parts = list(saved)
        self._restored_parts = None
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, parts if self.is_chief else None, src=self.chief_rank)
        part = mine[0]
        if isinstance(part, dict) and "error" in part:
            raise ValueError(part["error"])
        return part

    # -- saves -----------------------------------------------------------------
    def save_due(self, step: int, trigger: Any) -> bool:
        mode = self._save_mode
        if mode == "never":
            return False
        if mode == "local":
            return bool(self._trigger(step))
        if mode == "piggyback":
            return self._managed is not None and self._managed.save_requested()
        flag = torch.tensor([1.0 if self.is_chief and self._trigger(step) else 0.0], device=self._flag_device())
        try:
            dist.broadcast(flag, src=self.chief_rank)
        except Exception as e:
            raise _collective_error("agreeing on the next checkpoint", step, e) from e
        return bool(flag.item() > 0)

    def _flag_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def replica_states(self, supervisor: Any) -> list[dict[str, Any]] | None:
        step = self.train_op.step
        if not self._chief_saves or step == self._gathered_step:
            return None
        self._gathered_step = step
        parts: list[Any] | None = [None] * self.world_size if self.is_chief else None
        try:
            dist.gather_object(own_state(supervisor), parts, dst=self.chief_rank)
        except Exception as e:
            raise _collective_error("gathering every replica's part of the checkpoint", step, e) from e
        return parts

    def close(self) -> None:
        if self._installed is not None:
            try:
                self.train_op.after_backward.remove(self._installed)
            except ValueError:
                pass
            self._installed = None
        if self._managed is not None:
            self._managed.request = None
        for opt in self.sync_optimizers:
            opt._detach()
