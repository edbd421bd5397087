"""Synchronous replicas (TF's SyncReplicasOptimizer): gradients averaged across the process group.

    >>> import torch, torchslim as slim
    >>> net = torch.nn.Linear(2, 1)
    >>> optimizer = slim.SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    >>> train_op = slim.learning.create_train_op(lambda: net(torch.ones(4, 2)).pow(2).mean(), optimizer,
    ...                                          global_step=slim.learning.GlobalStep(), model=net)
    >>> _ = slim.learning.train(train_op, None, sync_optimizer=optimizer, number_of_steps=3, log_every_n_steps=0)
    >>> train_op.step                      # one process: the wrapped SGD; under torchrun: averaged gradients
    3

Every replica computes gradients on its own batch; a post-accumulate-grad
hook on each parameter counts the gradients ready, and each full bucket
(DDP's 25 MB, the first 1 MB) is all-reduced asynchronously while backward
goes on. The train op waits for the buckets after backward, so the average
reaches gradient multipliers, clipping, the numerics check and the update.
N replicas of batch b train as one process with batch N*b.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from torchslim.process_group import DistributedError, _check_int, _collective_error

__all__ = ["SyncReplicasOptimizer"]


class _Bucket:
    __slots__ = ("count", "flags", "flat", "missing", "numel", "offsets", "params", "ready", "request", "views", "work")

    def __init__(self, params: list[torch.Tensor], request_slot: bool = False) -> None:
        self.params = params
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        # The flat buffer holds the gradients, one "had a gradient" flag per parameter and, in the bucket
        # launched last, one slot where the chief asks every replica to checkpoint after this step.
        extra = 1 if request_slot else 0
        self.flat = torch.zeros(n + len(params) + extra, dtype=params[0].dtype, device=params[0].device)
        self.flags = self.flat[n:n + len(params)]
        self.request = self.flat[n + len(params):]
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
        last = self.buckets[-1] if self.buckets else None
        if last is not None:  # the same bucket again, with the chief's request slot
            self.buckets[-1] = _Bucket(last.params, request_slot=True)
        self.where: dict[int, tuple[_Bucket, int]] = {}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self.where[id(p)] = (b, i)
        self.next = 0
        self.synced = False
        self.step_of: Callable[[], int | None] = lambda: None
        self.buffers: list[list[torch.Tensor]] = []  # groups of model buffers the chief broadcasts each step
        self.chief_rank = 0
        # Set on the chief by its replica: asked once per step, as the last bucket leaves, whether every
        # replica should checkpoint after this step. The answer travels in that bucket (no extra collective).
        self.request: Callable[[], bool] | None = None
        # True during the backward passes of all but the last micro-batch of a step (accumulate_steps):
        # their gradients accumulate in place and only the last backward launches the all-reduce.
        self.holding: Callable[[], bool] = lambda: False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def signature(self) -> list[tuple[int, str, str]]:
        """Bucket layout, compared across replicas before training (they must hold the same model)."""
        return [(b.numel, str(b.flat.dtype), b.flat.device.type) for b in self.buckets]

    def _on_grad(self, p: torch.Tensor) -> None:
        if self.holding():
            return
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
        if b.count == len(b.params):
            b.flags.fill_(1.0)
        else:
            b.missing = True
            for i, done in enumerate(b.ready):
                if not done:
                    b.views[i].zero_()
            b.flags.copy_(torch.tensor([1.0 if r else 0.0 for r in b.ready], dtype=b.flags.dtype))
        if b.request.numel():
            b.request.fill_(1.0 if self.request is not None and self.request() else 0.0)
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
                counts = b.flags.tolist()
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

    def save_requested(self) -> bool:
        """Whether the chief asked, in the step just averaged, that every replica checkpoint now."""
        request = self.buckets[-1].request if self.buckets else None
        return request is not None and bool(request.item() > 0)

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
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
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

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
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
