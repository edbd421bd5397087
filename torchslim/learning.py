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

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from torchslim import collections as _collections
from torchslim import progress as _progress
from torchslim._modules import as_single_module, callable_name, modules_of
from torchslim.collections import GraphKeys

__all__ = [
    "NO_BATCH",
    "GlobalStep",
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
_USE_GLOBAL_STEP: Any = _Sentinel("_USE_GLOBAL_STEP")


NO_BATCH: Any = _Sentinel("NO_BATCH")
"""What train() passes for each step when it has no data: the train op then calls total_loss()."""


class NumericsError(FloatingPointError):
    """A NaN or Inf in the loss or a gradient; raised before the weights change."""


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


# --------------------------------------------------------------------------- gradient helpers

GradsAndVars = Sequence[tuple[Any, Any]]


def clip_gradient_norms(gradients_to_variables: GradsAndVars, max_norm: float) -> list[tuple[Any, Any]]:
    """Clips each gradient to ``max_norm`` by its own L2 norm (TF's ``clip_by_norm``, per tensor).

    None gradients pass through. The gradients are clipped in place and the
    list of pairs is returned, as TF-Slim does.

    Example:
        >>> g = torch.tensor([3.0, 4.0]); v = torch.zeros(2)
        >>> clip_gradient_norms([(g, v)], 1.0)[0][0]
        tensor([0.6000, 0.8000])
    """
    if not isinstance(gradients_to_variables, (list, tuple)):
        raise ValueError(f"gradients_to_variables must be a list of (gradient, variable) pairs, got {type(gradients_to_variables).__name__}")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    grads = [g for g, _ in gradients_to_variables if g is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        for g, n in zip(grads, norms):
            g.mul_(torch.clamp(max_norm / n, max=1.0))
    return list(gradients_to_variables)


def multiply_gradients(
    grads_and_vars: GradsAndVars,
    gradient_multipliers: Mapping[Any, Any],
    names: Mapping[str, Any] | None = None,
) -> list[tuple[Any, Any]]:
    """Multiplies the gradients of the named or given variables (in place); returns the pairs.

    Keys of ``gradient_multipliers`` are parameters, or parameter names
    resolved through ``names`` (name -> parameter, e.g.
    ``dict(model.named_parameters())``). Values are numbers or tensors.

    Example:
        >>> v = torch.nn.Parameter(torch.zeros(2)); g = torch.ones(2)
        >>> multiply_gradients([(g, v)], {v: 3.0})[0][0]
        tensor([3., 3.])
    """
    if not isinstance(grads_and_vars, list):
        raise ValueError(f"grads_and_vars must be a list, got {type(grads_and_vars).__name__}")
    if not isinstance(gradient_multipliers, Mapping) or not gradient_multipliers:
        raise ValueError(f"gradient_multipliers must be a non-empty dictionary, got {gradient_multipliers!r}")
    by_id = _resolve_multipliers(gradient_multipliers, names)
    for grad, var in grads_and_vars:
        m = by_id.get(id(var))
        if m is None:
            continue
        if grad is None:
            raise ValueError(f"Requested multiple of `None` gradient (variable {_describe_var(var, names)})")
        grad.mul_(m)
    return grads_and_vars


def _describe_var(var: Any, names: Mapping[str, Any] | None) -> str:
    for name, v in (names or {}).items():
        if v is var:
            return repr(name)
    return f"of shape {tuple(var.shape)}" if hasattr(var, "shape") else repr(var)


def _resolve_multipliers(gradient_multipliers: Mapping[Any, Any], names: Mapping[str, Any] | None) -> dict[int, Any]:
    by_id: dict[int, Any] = {}
    for key, multiplier in gradient_multipliers.items():
        if isinstance(key, str):
            if names is None or key not in names:
                known = ", ".join(sorted(names or {})[:8]) or "none known"
                raise ValueError(f"gradient_multipliers names variable {key!r}, which is not a parameter (known: {known})")
            key = names[key]
        if not isinstance(key, torch.Tensor):
            raise ValueError(f"gradient_multipliers keys must be parameters or parameter names, got {type(key).__name__}")
        if not isinstance(multiplier, (int, float, torch.Tensor)) or isinstance(multiplier, bool):
            raise ValueError(f"gradient_multipliers values must be numbers or tensors, got {multiplier!r}")
        by_id[id(key)] = multiplier
    return by_id


def add_gradients_summaries(grads_and_vars: GradsAndVars, names: Mapping[str, Any] | None = None) -> list[Any]:
    """Records a histogram '<name>/gradient' and a scalar '<name>/gradient_norm' per gradient.

    Variables are named through ``names`` (name -> parameter), or given as
    names directly. None gradients are skipped with a log line, as TF-Slim.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> len(add_gradients_summaries([(torch.ones(2), w)], {'w': w}))
        2
    """
    from torchslim import summaries

    by_id = {id(v): n for n, v in (names or {}).items()}
    named = []
    for grad, var in grads_and_vars:
        name = var if isinstance(var, str) else by_id.get(id(var))
        if name is None:
            raise ValueError(f"cannot name variable {_describe_var(var, None)}; pass names= (name -> parameter)")
        if grad is None:
            logger.info("Var %s has no gradient", name)
            continue
        named.append((name, grad))
    return summaries.add_gradient_summaries(named)


# --------------------------------------------------------------------------- the train op


class TrainOp:
    """A callable training step: loss, gradients, update, update ops, global step.

    Build it with :func:`create_train_op`. Calling it on a batch returns the
    (detached) loss. Attributes used by :func:`train`: ``model`` (one module
    whose state_dict holds every model weight and buffer), ``optimizer``,
    ``scheduler``, ``global_step``, ``last_step`` (the collections recorded
    by the last call), ``record_summaries`` (set by the loop on steps whose
    summaries will be written).
    """

    def __init__(
        self,
        total_loss: Callable[..., torch.Tensor],
        optimizer: torch.optim.Optimizer,
        global_step: GlobalStep | None,
        update_ops: list[Callable[[], Any]],
        variables_to_train: list[torch.Tensor] | None,
        clip_gradient_norm: float,
        summarize_gradients: bool,
        gradient_multipliers: dict[int, Any],
        check_numerics: bool,
        model: torch.nn.Module | None,
        scheduler: Any,
        names: dict[str, torch.Tensor],
    ) -> None:
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
        self.record_summaries = False
        self.last_step: dict[str, list[Any]] = {}
        # Called with the list of trained parameters after backward (distributed gradient averaging).
        self.after_backward: list[Callable[[list[torch.Tensor]], Any]] = []
        self._params = variables_to_train if variables_to_train is not None else [
            p for group in optimizer.param_groups for p in group["params"]
        ]
        self._multiplied = [(p, gradient_multipliers[id(p)]) for p in self._params if id(p) in gradient_multipliers]
        self._found_inf: torch.Tensor | None = None  # made on the gradients' device at the first check
        self._one: torch.Tensor | None = None
        self._fused_check = True

    @property
    def step(self) -> int:
        """The current global step (0 when the op counts none)."""
        return self.global_step.value if self.global_step is not None else 0

    def __call__(self, batch: Any = NO_BATCH) -> torch.Tensor:
        entries: dict[str, list[Any]] = {}
        token = _collections._step.set(entries)
        try:
            loss = self.total_loss() if batch is NO_BATCH else self.total_loss(batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"total_loss must return a scalar tensor, got "
                    f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else f'a tensor of shape {tuple(loss.shape)}'}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.variables_to_train is None:
                loss.backward()
            else:
                loss.backward(inputs=self.variables_to_train)
            self._apply(loss)
        finally:
            self.last_step = entries
            _collections._step.reset(token)
        return loss.detach()

    def _apply(self, loss: torch.Tensor) -> None:
        params = self._params
        for hook in self.after_backward:
            hook(params)
        for p, m in self._multiplied:
            if p.grad is None:
                raise ValueError(f"Requested multiple of `None` gradient (parameter {self._name(p)})")
            p.grad.mul_(m)
        if self.clip_gradient_norm > 0:
            clip_gradient_norms([(p.grad, p) for p in params], self.clip_gradient_norm)
        if self.check_numerics:
            self._check_numerics(loss)
        if self.summarize_gradients and self.record_summaries:
            add_gradients_summaries([(p.grad, p) for p in params], self.names)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for op in self.update_ops:
            op()
        if self.global_step is not None:
            self.global_step.value += 1

    def _name(self, param: torch.Tensor) -> str:
        return _describe_var(param, self.names)

    def _check_numerics(self, loss: torch.Tensor) -> None:
        # The loss: math.isfinite on .item() is the cheapest check there is (one read, no kernel).
        # The gradients: one fused call (the kernel GradScaler uses) sets a flag if any element is
        # NaN or Inf, and one read of the flag; about 3 us per step for a small model on a CPU.
        if not math.isfinite(loss.item()):
            self._raise_numerics(loss)
        grads = [g for p in self._params if (g := p.grad) is not None]
        if not grads:
            return
        found = self._found_inf
        if found is None:
            found = self._found_inf = torch.zeros(1, device=grads[0].device)
            self._one = torch.ones(1, device=grads[0].device)
        if self._fused_check:
            # The kernel only ever sets the flag, and a set flag raises (and is cleared) below, so the
            # flag is zero here without a zero_() per step.
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
            except RuntimeError:  # gradients on several devices, or of a dtype the kernel does not take
                self._fused_check = False
                return self._check_numerics(loss)
            bad = found.item() != 0
            if bad:
                found.zero_()
        else:
            bad = any(not bool(torch.isfinite(g).all()) for g in grads if g.dtype.is_floating_point)
        if bad:
            self._raise_numerics(loss)

    def _raise_numerics(self, loss: torch.Tensor) -> None:
        step = self.step + 1
        if not bool(torch.isfinite(loss)):
            raise NumericsError(
                f"step {step}: the loss {callable_name(self.total_loss)!r} is {loss.item()} "
                "(weights left as they were before this step)"
            )
        for p in self._params:
            g = p.grad
            if g is not None and not bool(torch.isfinite(g).all()):
                kinds = [k for k, bad in (("NaN", torch.isnan(g).any()), ("Inf", torch.isinf(g).any())) if bool(bad)]
                raise NumericsError(
                    f"step {step}: the gradient of parameter {self._name(p)} has {' and '.join(kinds)} values "
                    "(weights left as they were before this step)"
                )

    def state_dict(self) -> dict[str, Any]:
        """Model weights and buffers, optimizer, scheduler and global step (live references)."""
        if self.model is None:
            raise ValueError(
                "create_train_op found no nn.Module used by total_loss, so there is nothing to checkpoint; "
                "pass model=your_module to create_train_op"
            )
        state: dict[str, Any] = {
            "global_step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.model is None:
            raise ValueError("cannot restore: create_train_op found no nn.Module; pass model= to create_train_op")
        from torchslim.checkpoint import load_model_state  # names the file and the first mismatching parameter

        load_model_state(self.model, state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.global_step is not None:
            self.global_step.value = int(state["global_step"])


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
) -> TrainOp:
    """Creates the train op: a callable that computes the loss and applies the gradients.

    Args:
        total_loss: a callable (function or nn.Module) from a batch (or from
            nothing, when train() gets no data) to the scalar total loss.
        optimizer: a ``torch.optim.Optimizer``.
        global_step: a :class:`GlobalStep` to increment, the default one of
            the registry when not given, None to count nothing.
        update_ops: callables run after each update; None: the UPDATE_OPS
            collection (batch norm moving averages); []: none.
        variables_to_train: the parameters to update (list, dict or module);
            None: every parameter the optimizer holds.
        clip_gradient_norm: if > 0, each gradient is clipped to this norm
            (per tensor, after the multipliers).
        summarize_gradients: record gradient histograms and norms on steps
            whose summaries are written.
        gate_gradients, aggregation_method, colocate_gradients_with_ops:
            TF graph options with no meaning in eager PyTorch; only their
            defaults are accepted.
        gradient_multipliers: {parameter or parameter name: multiplier}.
        check_numerics: raise :class:`NumericsError` naming the tensor and
            the step when the loss or any gradient holds NaN or Inf, before
            the weights change. (TF-Slim checks only the loss.)
        model: torchslim extension: the module(s) whose weights and buffers
            are checkpointed. Default: ``total_loss`` if it is a module, else
            the modules its code refers to.
        scheduler: torchslim extension: an LR scheduler stepped after every
            update and checkpointed.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> def loss_fn(batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(net(x), y)
        >>> op = create_train_op(loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), global_step=GlobalStep())
        >>> loss = op((torch.ones(4, 2), torch.zeros(4, 1)))
        >>> op.step
        1
    """
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
    if isinstance(clip_gradient_norm, bool) or not isinstance(clip_gradient_norm, (int, float)) or not math.isfinite(clip_gradient_norm) or clip_gradient_norm < 0:
        raise ValueError(f"clip_gradient_norm must be a finite number >= 0 (0: no clipping), got {clip_gradient_norm!r}")

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
    names = dict(single.named_parameters()) if single is not None else {}

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
                    f"({_describe_var(p, names)}); give the optimizer those parameters"
                )

    multipliers: dict[int, Any] = {}
    if gradient_multipliers is not None:
        if not isinstance(gradient_multipliers, Mapping) or not gradient_multipliers:
            raise ValueError(f"gradient_multipliers must be a non-empty dictionary, got {gradient_multipliers!r}")
        multipliers = _resolve_multipliers(gradient_multipliers, names)

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
    )
    _collections.add_to_collection(GraphKeys.TRAIN_OP, op)
    return op


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
        logger.info("global step %d: loss = %.4f (%.3f sec/step)", step, total_loss.item(), elapsed)
    number_of_steps = train_step_kwargs.get("number_of_steps")
    should_stop = number_of_steps is not None and step >= number_of_steps
    return total_loss, should_stop


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
    if trace_every_n_steps is not None and logdir is not None and sv.is_chief:  # only the chief writes files
        kwargs.setdefault("trace_every_n_steps", trace_every_n_steps)
        kwargs.setdefault("logdir", str(logdir))
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
        tick = shown.start(train_op.step) if sv.is_chief else None
        while True:
            if number_of_steps is not None and train_op.step >= number_of_steps:
                break
            if extra_stop_checks and sv.should_stop(number_of_steps):
                break
            try:
                batch = next(batches)
            except StopIteration:
                logger.info("Data ran out at global step %d. Stopping Training.", train_op.step)
                break
            if wants_summaries is not None:
                train_op.record_summaries = wants_summaries(train_op.step + 1)
            total_loss, should_stop = train_step_fn(train_op, batch, gs, kwargs)
            after_step(total_loss)
            if tick is not None:
                tick(train_op.step, total_loss)
            if should_stop:
                logger.info("Stopping Training.")
                break
        shown.close(train_op.step)
        sv.finish()
    return None if total_loss is None else total_loss.item()
