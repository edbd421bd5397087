"""FSDP2: train a model sharded with ``torch.distributed.fsdp.fully_shard`` under ``slim.learning.train``.

    import torchslim as slim
    from torch.distributed.fsdp import fully_shard

    slim.distributed.initialize()                  # torchrun's environment
    model = Net()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)                             # every parameter is now a sharded DTensor
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_op = slim.learning.create_train_op(total_loss, optimizer, clip_gradient_norm=1.0)
    slim.learning.train(train_op, '/tmp/logdir', data=my_shard, number_of_steps=1000)

    # torchrun --nproc-per-node 2 train.py

``train`` sees that the model is sharded and drives an :class:`FSDPReplica`
instead of the synchronous replica of ``slim.distributed``:

- no second averaging: FSDP reduce-scatters (averages) the gradients; a
  ``SyncReplicasOptimizer`` may be passed and only steps the optimizer it wraps;
- gradient multipliers and per-tensor clipping (TF-Slim's ``clip_by_norm``)
  act on the sharded gradients, whose norms are those of the full tensors
  (DTensor norms are reduced across the shards);
- the numerics check sees every shard: each rank notes, on the device, the
  first step at which each of its shards (or its loss) held NaN or Inf; the
  ranks combine their notes in one asynchronous all-reduce every
  ``FSDPReplica.numerics_every_n_steps`` (100) steps, read at the start of
  the next step before its first collective, and at once wherever the loop
  reads numerics (logs, saves, the end), so all ranks raise together naming
  the step, the rank and the parameter, and no step waits on it. The updates
  since the bad step were applied then, and no checkpoint holds them (every
  save reads first); the train op's ``sync_numerics=True`` combines before
  every update instead, so a bad step does not run. The chief's time-based
  save decision rides on the same all-reduce. Measured: an all-reduce
  of the flags on every step made the FSDP2 benchmark 0.85-0.88x a raw loop;
  combined every 100 steps, 0.97x (0.94-0.98; ``benchmarks/distributed_overhead.py --fsdp``);
- checkpoints are sharded (:mod:`torchslim.sharded_checkpoint`): every rank
  writes its shard with torch.distributed.checkpoint, the chief commits; each
  rank's RNG streams and data position are saved and restored to it;
- ``summarize_gradients`` is refused (histograms of sharded gradients
  would need every rank on the chief's summary steps).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from torchslim import checkpoint as _checkpoint
from torchslim import sharded_checkpoint as _sharded
from torchslim import triggers as _triggers
from torchslim.replicas import elect_chief

__all__ = ["FSDPReplica", "is_fully_sharded"]

_NEVER = float(2**62)  # no bad step noted

logger = logging.getLogger("torchslim")


def is_fully_sharded(model: Any) -> bool:
    """True when ``model`` (or a module in it) was sharded with ``fully_shard`` (FSDP2).

    Example:
        >>> is_fully_sharded(torch.nn.Linear(2, 1))
        False
    """
    if not isinstance(model, torch.nn.Module):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without torch.distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def _only_steps(trigger: Any) -> bool:
    if isinstance(trigger, (_triggers.EveryNSteps, _triggers.AtSteps)):
        return True
    return isinstance(trigger, _triggers.AnyOf) and all(_only_steps(t) for t in trigger.triggers)


class _AgreedTrigger(_triggers.Trigger):
    """The chief's time-based trigger, agreed by every rank.

    With ``check_numerics`` the chief's 'save' is kept until the ranks next
    combine their numerics flags (every ``numerics_every_n_steps`` steps, or
    where the loop reads numerics), rides on that all-reduce, and acts at
    the step after it is read (``carrier``): at most
    ``numerics_every_n_steps + 1`` steps after the chief said it. Otherwise
    it travels in an asynchronous 1-element broadcast launched at step n and
    waited for at step n + 1. Either way no rank waits on it, and no
    collective is added to a step that has one.
    """

    def __init__(self, inner: _triggers.Trigger | None, chief: int, device: torch.device,
                 carrier: Callable[[int], bool] | None = None) -> None:
        self.inner = inner
        self.device = device
        self.chief = chief
        self.carrier = carrier  # step -> the decision that step's numerics flags carried
        self.decision = 0.0  # the chief's answer, before it is agreed (1.0: 'save')
        self._pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, step: int, t: float | None = None) -> bool:
        due = self.carrier(step - 1) if self.carrier is not None else self.collect()
        said = self.inner is not None and self.inner(step, t)
        if self.carrier is None:
            self.decision = 1.0 if said else 0.0
        elif said:
            self.decision = 1.0  # kept until a combine carries it
        if self.carrier is None:
            flag = torch.full((1,), self.decision, device=self.device)
            self._pending = (dist.broadcast(flag, src=self.chief, async_op=True), flag)
        return due

    def collect(self) -> bool:
        """The broadcast decision of the previous step, agreed by every rank: True when the chief said 'save'."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item() > 0)


class FSDPReplica:
    """One rank of an FSDP2 job, driven by the Supervisor (see ``slim.distributed``'s module docstring).

    ``slim.distributed.prepare`` returns it when the train op's model is
    sharded. Besides the replica protocol (``after_restore``,
    ``before_training``, ``should_stop``, ``close``; ``restore``,
    ``save_due``, ``replica_states`` of torchslim.replicas) it says
    ``sharded = True``, on which the Supervisor calls ``attach`` once built
    (every rank saves, on agreed steps) and ``save`` instead of its own
    (collective: every rank writes its shard).

    Example (on every rank; see the module docstring)::

        replica = FSDPReplica(train_op, is_chief=None, sync_optimizers=[])
    """

    numerics_every_n_steps = 100  # the ranks combine their numerics notes this often (and at every read)

    def __init__(self, train_op: Any, is_chief: bool | None, sync_optimizers: Sequence[Any] = ()) -> None:
        if train_op.summarize_gradients:
            raise ValueError(
                "summarize_gradients=True is not supported for a model sharded with fully_shard: the chief would "
                "need every rank's gradient shard on its summary steps; build the train op with "
                "summarize_gradients=False"
            )
        params = train_op.variables_to_train if train_op.variables_to_train is not None else [
            p for group in train_op.optimizer.param_groups for p in group["params"]]
        names = {id(p): n for n, p in (train_op.names or {}).items()}
        for p in params:
            if not _is_dtensor(p):
                raise ValueError(
                    f"parameter {names.get(id(p), tuple(p.shape))!r} is trained but not sharded by fully_shard, so "
                    "nothing would average its gradient across ranks; call fully_shard on the root module too "
                    "(fully_shard(model) after its blocks)"
                )
        self.train_op = train_op
        self._device = _local(params[0]).device if params else torch.device("cpu")  # where the flags travel
        self.sync_optimizers = list(sync_optimizers)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.chief_rank, self.is_chief = elect_chief(is_chief, self.rank, self.world_size)
        self.sharded = True  # the Supervisor hands its saves to this replica
        self.saver: _sharded.ShardedSaver | None = None
        self._trigger: _AgreedTrigger | None = None
        self._last_saved: int | None = None
        # (step, params, what to wait for, the flags on the host) of the last all-reduce not yet read
        self._pending: tuple[int, list[torch.Tensor], Any, torch.Tensor] | None = None
        self._first: torch.Tensor | None = None  # per parameter shard, and the loss: the first bad step noted
        self._read_at: int | None = None  # the global step at which the ranks last combined their notes
        self._params = params
        self._carried: dict[int, bool] = {}  # step -> the chief's save decision its flags carried
        self._hook = self._check_shards if train_op.check_numerics else None
        if self._hook is not None:
            train_op.after_backward.append(self._hook)
            train_op.before_step.append(self._collect)
            train_op.before_numerics_read.append(self._read_now)
            train_op.gradients_checked_by_hooks = True

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        opt = self.train_op.optimizer
        return getattr(opt, "optimizer", opt)  # a SyncReplicasOptimizer: the optimizer it wraps

    # -- numerics ----------------------------------------------------------
    def _check_shards(self, params: list[torch.Tensor]) -> None:
        """after_backward hook: notes the first step at which each of this rank's shards (and its loss) went bad.

        A few fused ops on the device, no host read, no collective; every
        ``numerics_every_n_steps`` steps (and before every save) the ranks
        combine what they noted (:meth:`_combine`).
        """
        op = self.train_op
        step = op.step + 1
        n = len(params)
        if self._first is None or self._first.numel() != n + 1:
            self._first = torch.full((n + 1,), _NEVER, dtype=torch.float64, device=self._device)
        present = [i for i, p in enumerate(params)
                   if (g := p.grad) is not None and g.dtype.is_floating_point and _local(g).numel()]
        tensors = [_local(params[i].grad) for i in present]  # type: ignore[arg-type]
        if op._last_loss is not None:
            present.append(n)
            tensors.append(op._last_loss.detach().reshape(1))
        if tensors:
            # The max-abs norm is NaN or Inf exactly when the tensor holds one: one fused kernel per dtype.
            norms = torch._foreach_norm(tensors, float("inf"))
            norm = torch.stack(norms if len({t.dtype for t in norms}) == 1 else [t.float() for t in norms])
            seen = torch.where(torch.isfinite(norm), _NEVER, float(step))
            if len(present) == n + 1:
                torch.minimum(self._first, seen, out=self._first)
            else:
                index = torch.tensor(present, device=self._first.device)
                self._first.index_copy_(0, index, torch.minimum(self._first.index_select(0, index), seen))
        sync = op.sync_numerics or op.grad_scaler is not None
        if sync or step % self.numerics_every_n_steps == 0:
            self._collect()
            self._combine(step, params, sync)

    def _read_now(self) -> None:
        """before_numerics_read hook (logs, saves, the end): combines what every rank noted, now.

        A collective, as the weight check that follows it: the loop reads
        numerics at the same steps on every rank.
        """
        self._collect()
        if self._first is not None and self._read_at != self.train_op.step:
            self._combine(self.train_op.step, self._params, sync=True)

    def _combine(self, step: int, params: list[torch.Tensor], sync: bool) -> None:
        """One all-reduce (MIN) of every rank's first bad steps and the chief's save decision.

        Asynchronous unless ``sync``: read at the start of the next step,
        before that step's first collective, so every rank raises at the same
        point and no rank waits on it.
        """
        first = self._first
        n = len(params)
        flags = torch.full((self.world_size * (n + 1) + 1,), _NEVER, dtype=torch.float64, device=self._device)
        if first is not None and first.numel() == n + 1:
            flags[self.rank * (n + 1):(self.rank + 1) * (n + 1)] = first
        trigger = self._trigger
        if trigger is not None and trigger.decision:
            flags[-1] = 0.0  # the chief's 'save'
            trigger.decision = 0.0
        work = dist.all_reduce(flags, op=dist.ReduceOp.MIN, async_op=not sync)
        if sync or flags.device.type == "cpu":
            host, done = flags, work
        else:  # the stream waits for the collective, then copies the flags out; the host does not wait
            work.wait()
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self._pending = (step, params, done, host)
        if sync:
            self._read_at = self.train_op.step
            self._collect()

    def _collect(self, raise_errors: bool = True) -> None:
        """Reads the pending combined flags (waiting for them); raises NumericsError if any rank noted a bad step."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, params, done, host = pending
        if isinstance(done, torch.cuda.Event):
            done.synchronize()
        elif done is not None:
            done.wait()
        values = host.tolist()
        if self._trigger is not None and self._trigger.carrier is not None:
            self._carried[step] = values[-1] == 0.0
        first = min(values[:-1], default=_NEVER)
        if not raise_errors or first == _NEVER:
            return
        n = len(params)
        names = {id(p): name for name, p in (self.train_op.names or {}).items()}
        where = []
        for r in range(self.world_size):
            row = values[r * (n + 1):(r + 1) * (n + 1)]
            bad = [names.get(id(p), str(tuple(p.shape))) for p, s in zip(params, row) if s == first]
            bad += ["the loss"] if row[n] == first else []
            if bad:
                where.append(f"rank {r}: {', '.join(bad)}")
        from torchslim.learning import NumericsError

        bad_step = int(first)
        if bad_step > self.train_op.step:  # read before the update of that step
            note = "weights left as they were before this step"
        else:
            note = (f"read at step {step}: the updates from step {bad_step} on were applied; no checkpoint holds "
                    "them: restart from the last checkpoint, or set the train op's sync_numerics=True to read the flags "
                    "before each update")
        raise NumericsError(f"step {bad_step}: NaN or Inf in the gradient shards of parameters ({'; '.join(where)}) "
                            f"({note})")

    def _carried_decision(self, step: int) -> bool:
        """The chief's save decision carried by the numerics flags of ``step`` (read at the next step)."""
        if self._pending is not None and self._pending[0] == step:
            self._collect()
        for old in [s for s in self._carried if s < step]:
            del self._carried[old]
        return self._carried.pop(step, False)

    # -- the Supervisor's hooks ---------------------------------------------
    def attach(self, supervisor: Any) -> None:
        """Makes every rank save sharded checkpoints on the steps the chief's trigger picks."""
        plain = supervisor.saver
        if plain is not None:
            self.saver = _sharded.ShardedSaver(
                max_to_keep=plain.max_to_keep, keep_checkpoint_every_n_hours=plain.keep_checkpoint_every_n_hours,
                prefix=plain.prefix, chief=self.chief_rank,
            )
            supervisor.saver = _SupervisorSaver(self, supervisor)
        box: list[Any] = [None]
        if self.is_chief:
            trigger = supervisor.save_trigger
            box = [("steps", trigger) if trigger is None or _only_steps(trigger) else ("time", None)]
        dist.broadcast_object_list(box, src=self.chief_rank)
        kind, steps_trigger = box[0]
        if kind == "steps":
            supervisor.save_trigger = steps_trigger if not self.is_chief else supervisor.save_trigger
        else:
            self._trigger = _AgreedTrigger(supervisor.save_trigger if self.is_chief else None, self.chief_rank,
                                           self._device, self._carried_decision if self._hook is not None else None)
            supervisor.save_trigger = self._trigger
        if supervisor.logdir is None:
            supervisor.save_trigger = None

    def state(self, supervisor: Any) -> dict[str, Any]:
        """What a sharded checkpoint holds: DCP state dicts of model and optimizer, and this rank's own part."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        full = supervisor.state_dict()
        model_state, optim_state = get_state_dict(self.train_op.model, self.optimizer)
        state = {k: v for k, v in full.items() if k not in ("model", "optimizer", "rng", "data")}
        state["model"], state["optimizer"] = model_state, optim_state
        own = {k: full[k] for k in ("rng", "data") if k in full}
        buf = io.BytesIO()
        torch.save(own, buf)
        state[_sharded.REPLICAS_KEY] = {str(self.rank): torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)}
        return state

    def save(self, supervisor: Any, block: bool = True) -> str | None:
        """Every rank writes its shard of the current state; the chief commits. Blocks (see README)."""
        if self.saver is None or supervisor.logdir is None:
            return None
        step = self.train_op.step
        path = self.saver.checkpoint_path(supervisor.logdir, step)
        if step == self._last_saved:
            return path
        self.saver.save(supervisor.logdir, self.state(supervisor), step)
        self._last_saved = step
        return path

    def restore_latest(self, supervisor: Any, logdir: str) -> tuple[str, dict[str, Any]] | None:
        """Loads the newest valid sharded checkpoint (chosen by the chief) on every rank."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        assert self.saver is not None  # attach() made it
        box = [_sharded.latest_valid(logdir, self.saver.prefix) if self.is_chief else None]
        dist.broadcast_object_list(box, src=self.chief_rank)
        path = box[0]
        if path is None:
            plain = [p for p in _checkpoint.list_checkpoints(logdir, self.saver.prefix)
                     if self.is_chief and not _sharded.is_sharded(p)]
            if plain:
                logger.warning("%s holds checkpoints that are not sharded (%s, ...): an FSDP2 run restores only "
                               "sharded ones, so it starts afresh", logdir, os.path.basename(plain[-1]))
            return None
        marker = _sharded.read_marker(path)
        template = self.state(supervisor)
        own_key = f"{_sharded.REPLICAS_KEY}.{self.rank}"
        sizes = _sharded._reader(path).read_metadata().state_dict_metadata
        if marker.get("world_size") == self.world_size and own_key in sizes:
            template[_sharded.REPLICAS_KEY] = {str(self.rank): torch.empty(tuple(sizes[own_key].size), dtype=torch.uint8)}
        else:
            del template[_sharded.REPLICAS_KEY]
            logger.warning(
                "Checkpoint %s was written by %s ranks, this run has %d: weights, optimizer and global step are "
                "resharded, but each rank's RNG streams and data position start afresh", path,
                marker.get("world_size"), self.world_size,
            )
        _sharded.load_into(path, template)
        set_state_dict(self.train_op.model, self.optimizer, model_state_dict=template.pop("model"),
                       optim_state_dict=template.pop("optimizer"))
        own = template.pop(_sharded.REPLICAS_KEY, None)
        state = dict(template)
        state["model"] = self.train_op.model.state_dict()  # already loaded: the train op loads it again as is
        state["optimizer"] = self.train_op.optimizer.state_dict()
        if own is not None:
            state.update(torch.load(io.BytesIO(own[str(self.rank)].numpy().tobytes()), weights_only=True))
        return path, state

    def after_restore(self, supervisor: Any) -> None:
        mine = (self.train_op.step, supervisor.restored_from)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        if any(e != everyone[self.chief_rank] for e in everyone):
            from torchslim.distributed import DistributedError

            raise DistributedError(f"the ranks start from different states (global step, checkpoint): {everyone}")

    def before_training(self, supervisor: Any) -> None:
        pass

    def restore(self, state: dict[str, Any]) -> None:
        """Nothing to keep: :meth:`restore_latest` already gave this rank its own RNG streams and data position."""

    def save_due(self, step: int, trigger: Any) -> bool:
        """The agreed answer: ``attach`` made the Supervisor's trigger the same on every rank."""
        return trigger is not None and bool(trigger(step))

    def replica_states(self, supervisor: Any) -> None:
        """None: each rank writes its own state into its shard, not through the chief."""
        return None

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        # Every rank launched the same collectives: none is left in flight.
        if self._trigger is not None:
            self._trigger.collect()
        self._collect(raise_errors=False)
        if self._hook is not None:
            op = self.train_op
            for hooks, hook in ((op.after_backward, self._hook), (op.before_step, self._collect),
                                (op.before_numerics_read, self._read_now)):
                with contextlib.suppress(ValueError):
                    hooks.remove(hook)
            op.gradients_checked_by_hooks = False
            self._hook = None


class _SupervisorSaver:
    """What the Supervisor calls on its saver, for sharded checkpoints (restore, wait, close)."""

    def __init__(self, replica: FSDPReplica, supervisor: Any) -> None:
        self.replica = replica
        self.supervisor = supervisor
        assert replica.saver is not None
        self.prefix = replica.saver.prefix
        self.max_to_keep = replica.saver.max_to_keep

    def restore_latest(self, logdir: str, map_location: Any = "cpu") -> tuple[str, dict[str, Any]] | None:
        return self.replica.restore_latest(self.supervisor, logdir)

    def checkpoint_path(self, logdir: str, global_step: int) -> str:
        assert self.replica.saver is not None
        return self.replica.saver.checkpoint_path(logdir, global_step)

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass
