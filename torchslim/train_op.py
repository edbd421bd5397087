"""The train op: loss, gradients, update, update ops and the global step, as TF-Slim's create_train_op.

    import torchslim as slim

    train_op = slim.learning.create_train_op(
        total_loss, optimizer, clip_gradient_norm=4,
        mixed_precision='bf16',          # or 'fp16' (dynamic loss scaling, checkpointed), None: fp32
        accumulate_steps=4,              # one update per 4 batches, the global step counts updates
    )

One call, in order of events (``accumulate_steps`` micro-batches)::

    for each micro-batch:  move it to the parameters' device; loss = total_loss(batch) under autocast
                           (loss / N).backward()          # scaled by GradScaler under fp16
    after_backward hooks (replicas average the gradients, once per update)
    unscale (fp16); multiply; clip per tensor; check numerics; gradient summaries
    optimizer.step(); scheduler.step(); update ops; global_step += 1

Each phase is a ``torch.profiler.record_function`` region ("torchslim/loss",
"torchslim/backward", "torchslim/gradients", "torchslim/optimizer",
"torchslim/update_ops") while a profiler records, and costs nothing otherwise.

``check_numerics`` without a host sync: the check runs on the device every
step and the host reads its flag only when it reads anyway: on steps whose
summaries are written (the check then runs before the update), when the loop
logs, before every checkpoint (:meth:`TrainOp.state_dict` calls
:meth:`TrainOp.check_pending_numerics`) and at the end of training. What
"weights left as they were" means:

* on a step whose flag is read before the update (summary steps,
  ``sync_numerics=True``, ``mixed_precision='fp16'``): the optimizer does
  not run; weights and optimizer state are those before the step;
* otherwise, with a fused optimizer (``fused=True``: SGD, Adam, AdamW,
  Adagrad) the device skips the update of the bad step and of every step
  after it until the host reads the flag, so the weights are those before
  the first bad step;
* otherwise (any other optimizer) the bad update is applied; the error
  names the step where the NaN first appeared and no checkpoint is written
  from that state; a restart resumes from the last good checkpoint.

In every case the scheduler, the update ops and the global step go on. On
the CPU in one process (non-fused optimizer) each step reads its loss at once
instead, free there, and stops before the update of a bad one; gradients are
checked through the weights they update (see
:meth:`NumericsChecks._loss_read_on_host`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from torchslim import collections as _collections
from torchslim._modules import as_single_module, modules_of
from torchslim._optimizer_calls import unlabelled_step, unlabelled_zero_grad
from torchslim._train_op_state import TrainOpState
from torchslim.collections import GraphKeys
from torchslim.gradients import (
    add_gradients_summaries,
    clip_by_norm_,
    coalesced,
    describe_var,
    resolve_multipliers,
    values_of,
)
from torchslim.numerics import NumericsChecks, NumericsFlags

__all__ = ["MicroBatches", "TrainOp", "create_train_op"]

logger = logging.getLogger("torchslim")

_PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
_OMITTED: Any = object()


class MicroBatches(tuple):
    """The batches of one global step under ``accumulate_steps`` (train() makes them from ``data``).

    A marked tuple, so a batch that is itself a list (``[images, labels]``
    from a DataLoader) is never mistaken for micro-batches.

    Example:
        >>> len(MicroBatches([(1, 2), (3, 4)]))
        2
    """


class _UseGlobalStep:
    def __repr__(self) -> str:
        return "_USE_GLOBAL_STEP"


_USE_GLOBAL_STEP: Any = _UseGlobalStep()
_NULL = contextlib.nullcontext()
_profiling = torch.autograd._profiler_enabled


def _region(name: str) -> Any:
    return torch.profiler.record_function(name)


def _no_region(name: str) -> Any:
    return _NULL


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)  # asynchronous from pinned memory, a no-op when already there
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    return batch


def _gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients present, sparse ones coalesced in place and taken by their values."""
    grads = []
    for p in params:
        g = p.grad
        if g is not None:
            if g.is_sparse:
                g = p.grad = coalesced(g)
                g = g._values()
            grads.append(g)
    return grads


def _loss_error(loss: Any) -> ValueError:
    got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {tuple(loss.shape)}"
    return ValueError(f"total_loss must return a scalar tensor, got {got}")


def _ddp_modules(candidates: Iterable[Any]) -> list[Any]:
    from torch.nn.parallel import DistributedDataParallel

    found: dict[int, Any] = {}
    for c in candidates:
        if isinstance(c, torch.nn.Module):
            for m in c.modules():
                if isinstance(m, DistributedDataParallel):
                    found[id(m)] = m
    return list(found.values())


class TrainOp(NumericsChecks, TrainOpState):
    """A callable training step: loss, gradients, update, update ops, global step.

    Build it with :func:`create_train_op`. Calling it on a batch (a list of
    ``batches_per_step`` micro-batches when accumulating) returns the
    (detached) loss, averaged over the micro-batches. Attributes used by
    :func:`train`: ``model`` (one module whose state_dict holds every model
    weight and buffer), ``optimizer``, ``scheduler``, ``global_step``,
    ``last_step`` (the collections recorded by the last micro-batch),
    ``record_summaries`` (set by the loop on steps whose summaries will be
    written), ``batches_per_step`` (how many batches one call consumes).
    ``overflow_steps`` counts fp16 steps skipped for a loss-scale overflow.
    """

    def __init__(
        self,
        total_loss: Callable[..., torch.Tensor],
        optimizer: torch.optim.Optimizer,
        global_step: Any,
        update_ops: list[Callable[[], Any]],
        variables_to_train: list[torch.Tensor] | None,
        clip_gradient_norm: float,
        summarize_gradients: bool,
        gradient_multipliers: dict[int, Any],
        check_numerics: bool,
        model: torch.nn.Module | None,
        scheduler: Any,
        names: dict[str, torch.Tensor],
        mixed_precision: str | None = None,
        accumulate_steps: int = 1,
        compile: bool | Mapping[str, Any] = False,
        place_batches: bool = True,
    ) -> None:
        from torchslim.learning import NO_BATCH

        self.total_loss = total_loss
        self.optimizer = optimizer
        self.global_step = global_step
        self.update_ops = update_ops
        self.variables_to_train = variables_to_train
        self.clip_gradient_norm = clip_gradient_norm
        self.summarize_gradients = summarize_gradients
        self.gradient_multipliers = gradient_multipliers
        self.check_numerics = check_numerics
        self.model = model
        self.scheduler = scheduler
        self.names = names
        self.mixed_precision = mixed_precision
        self.batches_per_step = accumulate_steps
        self.record_summaries = False
        self.sync_numerics = False  # True: read the numerics flag before every update (one host sync per step)
        self.overflow_steps = 0
        self.accumulating = False  # True during the backward passes of all but the last micro-batch
        self.last_step: dict[str, list[Any]] = {}
        # Called with the list of trained parameters after backward (distributed gradient averaging).
        self.after_backward: list[Callable[[list[torch.Tensor]], Any]] = []
        # Called at the start of every call, and before check_pending_numerics reads the flag: a replica
        # that checks numerics across ranks (torchslim.fsdp) reads the previous step's combined flag there.
        self.before_step: list[Callable[[], Any]] = []
        self.before_numerics_read: list[Callable[[], Any]] = []
        self.gradients_checked_by_hooks = False  # True: an after_backward hook checks loss and gradients instead
        self._no_batch = NO_BATCH
        self._params = variables_to_train if variables_to_train is not None else [
            p for group in optimizer.param_groups for p in group["params"]
        ]
        self._multiplied = [(p, gradient_multipliers[id(p)]) for p in self._params if id(p) in gradient_multipliers]
        self._device = self._params[0].device if self._params else torch.device("cpu")
        self._place = place_batches and self._device.type != "cpu"
        self._loss_fn: Callable[..., torch.Tensor] = total_loss
        if compile is not False:
            self._loss_fn = torch.compile(total_loss, **(dict(compile) if isinstance(compile, Mapping) else {}))
        self._autocast_dtype = _PRECISIONS[mixed_precision]
        self.grad_scaler = torch.amp.GradScaler(self._device.type) if mixed_precision == "fp16" else None
        self._ddp = _ddp_modules([model, total_loss, *modules_of(total_loss).values()]) if accumulate_steps > 1 else []
        self._flags = NumericsFlags()
        self._checked_step = self.step  # numerics known good up to this global step
        self._last_loss: torch.Tensor | None = None
        self._device_skip = any(g.get("fused") for g in optimizer.param_groups) and getattr(
            optimizer, "_step_supports_amp_scaling", False
        )
        # None: decided at the first step (see NumericsChecks._loss_read_on_host); False: device-side flags
        self._loss_on_host: bool | None = None
        self._graph: torch.Tensor | None = None
        self._bind_optimizer_calls()
        self._averages = [op.moving_average for op in update_ops if hasattr(op, "moving_average")]
        # The configuration whose steps take the short path of __call__; hooks and per-step switches
        # are checked at each call, since wrappers set them after construction.
        self._plain = (
            accumulate_steps == 1 and self.grad_scaler is None and not self._multiplied and not self._place
            and self._autocast_dtype is None and not self._device_skip
        )

    @property
    def step(self) -> int:
        """The current global step (0 when the op counts none)."""
        return self.global_step.value if self.global_step is not None else 0

    # -- one step --------------------------------------------------------------------------------

    def __call__(self, batch: Any = _OMITTED) -> torch.Tensor:
        # The common configuration (one batch; no hooks, fp16 scaler, multipliers, autocast or
        # profiler) runs here: the same updates in the same order as _general_step, without its
        # per-step branches, regions and calls: on benchmarks/loop_overhead.py's MLP the op's instructions
        # over a raw step of 1.15M went from 52k to 18k (callgrind).
        if not self._plain or self.before_step or self.after_backward or _profiling():
            return self._general_step(batch)
        if self._calls_for is not self.optimizer:  # op.optimizer was replaced
            self._bind_optimizer_calls()
        self._zero_grad()
        entries: dict[str, list[Any]] = {}
        token = _collections._step.set(entries)
        try:
            loss = self._loss_fn() if batch is _OMITTED or batch is self._no_batch else self._loss_fn(batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise _loss_error(loss)
            if self.variables_to_train is None:
                loss.backward()
                # Held to the next step, as a hand loop's variable holds it: autograd then reuses the
                # parameters' gradient accumulators instead of building them again (0.6% of a step).
                # Not under variables_to_train: nodes that backward did not run keep their activations.
                self._graph = loss
            else:
                loss.backward(inputs=self.variables_to_train)
            loss = loss.detach()
            checked = self.check_numerics and not self.gradients_checked_by_hooks
            if self.check_numerics:
                self._last_loss = loss
            # Summary steps and sync_numerics check the gradients before the update, as _apply does.
            special = self.record_summaries or self.sync_numerics
            on_host = checked and not special and (
                self._loss_on_host if self._loss_on_host is not None else self._loss_read_on_host()
            )
            flagged = checked and not special and not on_host
            if self.clip_gradient_norm > 0 or flagged or special:
                grads = _gradients(self._params)
                if self.clip_gradient_norm > 0:
                    clip_by_norm_(grads, self.clip_gradient_norm)
                if flagged:
                    self._flags.update([loss, *grads])
                elif special:
                    if checked:
                        self._check_now(loss, grads)  # no fp16 scaler here, so never a skipped step
                    if self.summarize_gradients and self.record_summaries:
                        add_gradients_summaries([(p.grad, p) for p in self._params], self.names)
            if on_host:
                self._check_loss_now(loss)
            self._optimizer_step()
            if self.scheduler is not None:
                self.scheduler.step()
            for op in self.update_ops:
                op()
            if self.global_step is not None:
                self.global_step.value += 1
        finally:
            self.last_step = entries
            _collections._step.reset(token)
        return loss

    def _bind_optimizer_calls(self) -> None:
        """The optimizer's zero_grad and step as the short path makes them: without profiler regions."""
        self._calls_for = self.optimizer
        self._zero_grad = unlabelled_zero_grad(self.optimizer)
        self._optimizer_step = unlabelled_step(self.optimizer)

    def _general_step(self, batch: Any) -> torch.Tensor:
        """A step of any configuration: hooks, micro-batches, autocast, fp16 scaling, profiler regions."""
        if self.before_step:
            for hook in self.before_step:
                hook()
        region = _region if _profiling() else _no_region
        n = self.batches_per_step
        if n == 1:
            micro = [self._no_batch if batch is _OMITTED else batch]
        elif batch is _OMITTED or batch is self._no_batch:
            micro = [self._no_batch] * n
        elif isinstance(batch, MicroBatches) and len(batch) == n:
            micro = list(batch)
        else:
            raise ValueError(
                f"with accumulate_steps={n} the train op takes MicroBatches of {n} batches, got "
                f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (list, tuple)) else ''} "
                f"(train() groups the batches of data for you; call it as op(slim.learning.MicroBatches(batches)))"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        for i, b in enumerate(micro):
            # Each micro-batch has its own step scope (its losses and summaries); the last one's
            # stays open for the update, whose gradient summaries belong to it too.
            entries: dict[str, list[Any]] = {}
            token = _collections._step.set(entries)
            try:
                if i < n - 1:
                    self.accumulating = True  # gradient averagers hold their all-reduce while this is set
                    try:
                        with contextlib.ExitStack() as stack:
                            for m in self._ddp:  # only the last micro-batch all-reduces
                                stack.enter_context(m.no_sync())
                            loss = self._forward_backward(b, region, n)
                    finally:
                        self.accumulating = False
                    total = loss if total is None else total + loss
                    continue
                loss = self._forward_backward(b, region, n)
                total = loss if total is None else (total + loss) / n
                self._apply(total, region)
            finally:
                self.last_step = entries
                _collections._step.reset(token)
        assert total is not None
        return total

    def _forward_backward(self, batch: Any, region: Any, n: int) -> torch.Tensor:
        with region("torchslim/loss"):
            if self._place and batch is not self._no_batch:
                batch = _to_device(batch, self._device)
            if self._autocast_dtype is None:
                loss = self._loss_fn() if batch is self._no_batch else self._loss_fn(batch)
            else:
                with torch.autocast(self._device.type, dtype=self._autocast_dtype):
                    loss = self._loss_fn() if batch is self._no_batch else self._loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise _loss_error(loss)
        with region("torchslim/backward"):
            scaled = loss if n == 1 else loss / n
            if self.grad_scaler is not None:
                scaled = self.grad_scaler.scale(scaled)
            if self.variables_to_train is None:
                scaled.backward()
            else:
                scaled.backward(inputs=self.variables_to_train)
        return loss.detach()

    def _apply(self, loss: torch.Tensor, region: Any) -> None:
        params = self._params
        scaler = self.grad_scaler
        with region("torchslim/gradients"):
            if self.check_numerics:
                self._last_loss = loss
            for hook in self.after_backward:
                hook(params)
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            for p, m in self._multiplied:
                if p.grad is None:
                    raise ValueError(f"Requested multiple of `None` gradient (parameter {self._name(p)})")
                values_of(p.grad).mul_(m)
            grads = _gradients(params)
            if self.clip_gradient_norm > 0:
                clip_by_norm_(grads, self.clip_gradient_norm)
            skip = deferred = False
            if self.check_numerics and not self.gradients_checked_by_hooks:
                if scaler is not None or self.record_summaries or self.sync_numerics:
                    skip = self._check_now(loss, grads)
                elif self._loss_on_host if self._loss_on_host is not None else self._loss_read_on_host():
                    self._check_loss_now(loss)
                else:
                    self._flags.update([loss, *grads])
                    deferred = True
            if self.summarize_gradients and self.record_summaries:
                add_gradients_summaries([(p.grad, p) for p in params], self.names)
        with region("torchslim/optimizer"):
            if scaler is not None:
                scale = scaler.get_scale()
                if not skip:
                    scaler.step(self.optimizer)
                scaler.update()
                if skip or scaler.get_scale() < scale:
                    self._count_overflow(scale)
            elif deferred and self._device_skip:
                opt: Any = self.optimizer
                opt.grad_scale, opt.found_inf = None, self._flags.found_inf
                try:
                    opt.step()
                finally:
                    del opt.grad_scale, opt.found_inf
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        with region("torchslim/update_ops"):
            for op in self.update_ops:
                op()
        if self.global_step is not None:
            self.global_step.value += 1

    def _count_overflow(self, scale: float) -> None:
        self.overflow_steps += 1
        logger.info(
            "global step %d: fp16 gradients overflowed at loss scale %g; update skipped, scale lowered to %g "
            "(%d overflow steps so far)", self.step + 1, scale, self.grad_scaler.get_scale() if self.grad_scaler else 0,
            self.overflow_steps,
        )

    def _name(self, param: torch.Tensor) -> str:
        return describe_var(param, self.names)


def _as_param_list(name: str, value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.nn.Module):
        return [p for p in value.parameters() if p.requires_grad]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)) or (isinstance(value, Iterable) and not isinstance(value, torch.Tensor)):
        items = list(value)
        for item in items:
            if not isinstance(item, torch.Tensor):
                raise ValueError(f"{name} must hold tensors (parameters), got an item of type {type(item).__name__}")
        return items
    raise ValueError(f"{name} must be a list or dict of parameters or an nn.Module, got {type(value).__name__}")


def create_train_op(
    total_loss: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    global_step: Any = _USE_GLOBAL_STEP,
    update_ops: Sequence[Callable[[], Any]] | None = None,
    variables_to_train: Any = None,
    clip_gradient_norm: float = 0,
    summarize_gradients: bool = False,
    gate_gradients: Any = None,
    aggregation_method: Any = None,
    colocate_gradients_with_ops: bool = False,
    gradient_multipliers: Mapping[Any, Any] | None = None,
    check_numerics: bool = True,
    *,
    model: torch.nn.Module | Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module] | None = None,
    scheduler: Any = None,
    mixed_precision: str | None = None,
    accumulate_steps: int = 1,
    compile: bool | Mapping[str, Any] = False,
    place_batches: bool = True,
) -> TrainOp:
    """Creates the train op: a callable that computes the loss and applies the gradients.

    Args:
        total_loss: a callable (function or nn.Module) from a batch (or from
            nothing, when train() gets no data) to the scalar total loss.
        optimizer: a ``torch.optim.Optimizer``.
        global_step: a :class:`GlobalStep` to increment, the default one of
            the registry when not given, None to count nothing.
        update_ops: callables run after each update; None: the UPDATE_OPS
            collection (batch norm moving averages, moving averages of
            :class:`slim.variables.ExponentialMovingAverage`); []: none.
        variables_to_train: the parameters to update (list, dict or module);
            None: every parameter the optimizer holds.
        clip_gradient_norm: if > 0, each gradient is clipped to this norm
            (per tensor, after the multipliers; a sparse gradient by the norm
            of its coalesced values).
        summarize_gradients: record gradient histograms and norms on steps
            whose summaries are written.
        gate_gradients, aggregation_method, colocate_gradients_with_ops:
            TF graph options with no meaning in eager PyTorch; only their
            defaults are accepted.
        gradient_multipliers: {parameter or parameter name: multiplier}.
        check_numerics: raise :class:`NumericsError` naming the tensor and
            the step when the loss, a gradient, or (before a checkpoint) a
            parameter or buffer holds NaN or Inf. (TF-Slim checks only the
            loss.) The check runs on the device; see the module docstring for
            when the host reads it and what happens to the weights.
        model: torchslim extension: the module(s) whose weights and buffers
            are checkpointed. Default: ``total_loss`` if it is a module, else
            the modules its code refers to.
        scheduler: torchslim extension: an LR scheduler stepped after every
            update and checkpointed.
        mixed_precision: None (fp32), ``'bf16'`` or ``'fp16'``: ``total_loss``
            runs under ``torch.autocast`` on the trained parameters' device;
            ``'fp16'`` scales the loss with ``torch.amp.GradScaler`` (its
            state is checkpointed); multipliers, clipping, the check and the
            summaries see unscaled gradients; a step skipped for a scale
            overflow is counted in ``overflow_steps`` and logged, not an error.
            fp16 reads the overflow flag every step (GradScaler does).
        accumulate_steps: N > 1: one call (one global step) takes N
            micro-batches and applies one update with their averaged
            gradient; only the last micro-batch all-reduces under DDP or
            SyncReplicasOptimizer.
        compile: True or a dict of ``torch.compile`` options: compiles
            ``total_loss`` (the model's own names stay in the checkpoints).
        place_batches: move the tensors of each batch to the trained
            parameters' device (``non_blocking``, so pinned memory copies
            asynchronously) when that is not the CPU.

    Example:
        >>> import torchslim as slim
        >>> net = torch.nn.Linear(2, 1)
        >>> def loss_fn(batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(net(x), y)
        >>> op = create_train_op(loss_fn, torch.optim.SGD(net.parameters(), lr=0.1),
        ...                      global_step=slim.learning.GlobalStep())
        >>> loss = op((torch.ones(4, 2), torch.zeros(4, 1)))
        >>> op.step
        1
    """
    from torchslim.learning import GlobalStep, get_or_create_global_step

    if total_loss is None or not callable(total_loss):
        raise ValueError(f"total_loss must be a callable from a batch to the scalar loss, got {total_loss!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for arg, value, default in (
        ("gate_gradients", gate_gradients, None),
        ("aggregation_method", aggregation_method, None),
        ("colocate_gradients_with_ops", colocate_gradients_with_ops, False),
    ):
        if value is not default and value != default:
            raise ValueError(f"{arg}={value!r} has no meaning in eager PyTorch; leave it at {default!r} (see README)")
    if (
        isinstance(clip_gradient_norm, bool) or not isinstance(clip_gradient_norm, (int, float))
        or not clip_gradient_norm >= 0 or clip_gradient_norm == float("inf")
    ):
        raise ValueError(f"clip_gradient_norm must be a finite number >= 0 (0: no clipping), got {clip_gradient_norm!r}")
    if mixed_precision not in _PRECISIONS:
        raise ValueError(f"mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}")
    if isinstance(accumulate_steps, bool) or not isinstance(accumulate_steps, int) or accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be an int >= 1 (1: no accumulation), got {accumulate_steps!r}")
    if not isinstance(compile, (bool, Mapping)):
        raise ValueError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
    if not isinstance(place_batches, bool):
        raise ValueError(f"place_batches must be True or False, got {place_batches!r}")

    if global_step is _USE_GLOBAL_STEP:
        global_step = get_or_create_global_step()
    elif global_step is not None and not isinstance(global_step, GlobalStep):
        raise ValueError(f"global_step must be a GlobalStep or None, got {type(global_step).__name__}")

    collection_ops = _collections.get_collection(GraphKeys.UPDATE_OPS)
    if update_ops is None:
        ops = collection_ops
    else:
        if isinstance(update_ops, (str, bytes)) or not isinstance(update_ops, Iterable):
            raise ValueError(f"update_ops must be None or a list of callables, got {type(update_ops).__name__}")
        ops = list(update_ops)
        if any(all(op is not mine for mine in ops) for op in collection_ops):
            logger.warning("update_ops in create_train_op does not contain all the update_ops in GraphKeys.UPDATE_OPS")
    for op in ops:
        if not callable(op):
            raise ValueError(f"update_ops must hold callables, got {op!r}")
    averages = [op.moving_average.name for op in ops if hasattr(op, "moving_average")]
    if len(set(averages)) != len(averages):
        raise ValueError(f"update_ops hold moving averages with the same name {averages}; give each its own name=")

    if model is None:
        found = modules_of(total_loss)
    elif isinstance(model, torch.nn.Module):
        found = {"model": model}
    elif isinstance(model, Mapping):
        found = dict(model)
    else:
        found = {f"model{i}": m for i, m in enumerate(model)}
    for name, m in found.items():
        if not isinstance(m, torch.nn.Module):
            raise ValueError(f"model must be an nn.Module (or a list/dict of them), got {type(m).__name__} for {name!r}")
    single = as_single_module(found) if found else None
    names: dict[str, torch.Tensor] = dict(single.named_parameters()) if single is not None else {}

    optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = None
    if variables_to_train is not None:
        trained = _as_param_list("variables_to_train", variables_to_train)
        if not trained:
            raise ValueError("variables_to_train must not be empty (None trains every parameter of the optimizer)")
        for p in trained:
            if id(p) not in optimizer_params:
                raise ValueError(
                    f"variables_to_train holds a parameter the optimizer does not update "
                    f"({describe_var(p, names)}); give the optimizer those parameters"
                )

    multipliers: dict[int, Any] = {}
    if gradient_multipliers is not None:
        if not isinstance(gradient_multipliers, Mapping) or not gradient_multipliers:
            raise ValueError(f"gradient_multipliers must be a non-empty dictionary, got {gradient_multipliers!r}")
        multipliers = resolve_multipliers(gradient_multipliers, names)

    op = TrainOp(
        total_loss=total_loss,
        optimizer=optimizer,
        global_step=global_step,
        update_ops=ops,
        variables_to_train=trained,
        clip_gradient_norm=float(clip_gradient_norm),
        summarize_gradients=bool(summarize_gradients),
        gradient_multipliers=multipliers,
        check_numerics=bool(check_numerics),
        model=single,
        scheduler=scheduler,
        names=names,
        mixed_precision=mixed_precision,
        accumulate_steps=accumulate_steps,
        compile=compile,
        place_batches=place_batches,
    )
    _collections.add_to_collection(GraphKeys.TRAIN_OP, op)
    return op
