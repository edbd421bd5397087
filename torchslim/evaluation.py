"""Evaluation: run metrics over a checkpoint once, or over each new checkpoint as training writes it.

    import torchslim as slim

    names_to_values, names_to_updates = slim.metrics.aggregate_metric_map({
        'accuracy': slim.metrics.streaming_accuracy(),
        'mse': slim.metrics.streaming_mean_squared_error(),
    })

    def eval_op(batch):                      # one batch; runs under torch.no_grad(), model in eval mode
        images, labels = batch
        logits = model(images)
        names_to_updates['accuracy'](logits.argmax(1), labels)
        names_to_updates['mse'](logits.softmax(1).max(1).values, torch.ones(len(labels)))

    values = slim.evaluation.evaluate_once(
        '/tmp/train/model.ckpt-1000.pt', '/tmp/eval', num_evals=100,
        eval_op=eval_op, final_op=names_to_values, data=loader)
    # {'accuracy': 0.97, 'mse': 0.02}, also written to /tmp/eval at global step 1000

    slim.evaluation.evaluation_loop(         # beside a running trainer
        '/tmp/train', '/tmp/eval', num_evals=100, eval_op=eval_op,
        final_op=names_to_values, data=loader, eval_interval_secs=600)

One evaluation, in order of events::

    state = load_checkpoint(path)            # verified; a missing or damaged file is an error
                                             # (evaluation_loop skips it with a log line)
    reset the metrics found in eval_op and final_op
    initial_op()                             # like TF's init_op, before the restore
    load state['model'] into the model (variables_to_restore); init_fn() (evaluation_loop)
    put the model in eval mode (batch norm: moving statistics; dropout off)
    hooks.begin(context)
    with torch.no_grad():
        for batch in data (at most num_evals batches; without data, num_evals calls):
            with step_scope():               # per-step summaries and losses vanish after the step
                hooks.before_run(context)
                outputs = eval_op(batch)
                hooks.after_run(context, outputs)    # a hook may context.request_stop()
        values = final_op evaluated (tensors with one value become Python numbers)
        hooks.end(context)                   # SummaryAtEndHook writes the scalar values and the
                                             # SUMMARIES collection at the checkpoint's global step
    restore each module's previous train/eval mode
    return values

The model object is found as ``slim.learning.train`` finds it: the
``nn.Module`` objects that ``eval_op``, ``final_op`` and ``initial_op`` refer
to (see ``torchslim._modules.modules_of``), so a checkpoint written by
``train`` restores into the same model code without naming it. Pass
``variables_to_restore`` (a module, or ``{name: tensor}``) to choose.

The loop itself does no per-batch work beyond calling ``eval_op`` (no
``.item()``, no summary work); hooks are only called where they implement
the method.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torchmetrics

from torchslim import collections as _collections
from torchslim import progress as _progress
from torchslim._modules import as_single_module, modules_of
from torchslim.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    _find,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
)
from torchslim.learning import _USE_DEFAULT
from torchslim.metrics import StreamingMetric, metrics_of
from torchslim.summaries import SummaryRecord, SummaryWriter
from torchslim.variables import moving_average_variables

__all__ = [
    "CheckpointNotFoundError",
    "EvaluationContext",
    "EvaluationHook",
    "StopAfterNEvalsHook",
    "SummaryAtEndHook",
    "checkpoints_iterator",
    "evaluate_once",
    "evaluation_loop",
    "wait_for_new_checkpoint",
]

logger = logging.getLogger("torchslim")

_DICT_VIEWS: tuple[type, ...] = (type({}.values()), type({}.keys()))


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """The checkpoint to evaluate does not exist (a ValueError, as in TF-Slim, and a FileNotFoundError)."""


# ----------------------------------------------------------------- hooks
class EvaluationContext:
    """What hooks see of one evaluation (TF's session and run context in one).

    Attributes: ``checkpoint_path``, ``global_step`` (the checkpoint's),
    ``logdir``, ``evals_completed`` (batches run so far), ``batch`` (the
    current batch, None without data), ``final_values`` (set before
    ``end``), ``summary_scalars`` (``[(tag, number)]`` taken from the final
    values, set before ``end``) and ``stop_requested``.

    Example:
        >>> ctx = EvaluationContext('/tmp/model.ckpt-5.pt', 5, '/tmp/eval')
        >>> ctx.request_stop(); ctx.stop_requested
        True
    """

    def __init__(self, checkpoint_path: str, global_step: int, logdir: str) -> None:
        self.checkpoint_path = checkpoint_path
        self.global_step = global_step
        self.logdir = logdir
        self.evals_completed = 0
        self.batch: Any = None
        self.final_values: Any = None
        self.summary_scalars: list[tuple[str, float]] = []
        self.stop_requested = False

    def request_stop(self) -> None:
        """Ends the evaluation after the current batch (as TF's ``run_context.request_stop``)."""
        self.stop_requested = True

    def __repr__(self) -> str:
        return (f"EvaluationContext({self.checkpoint_path!r}, global_step={self.global_step}, "
                f"evals_completed={self.evals_completed})")


class EvaluationHook:
    """Base class of evaluation hooks (TF's ``SessionRunHook``); override what you need.

    Any object with some of these methods works as a hook; only the methods
    a hook actually implements are called. All are called on the evaluating
    thread; ``begin`` and ``end`` once per evaluation (per checkpoint).

    Example:
        >>> class CountBatches(EvaluationHook):
        ...     def end(self, context):
        ...         print('evaluated', context.evals_completed, 'batches')
    """

    def begin(self, context: EvaluationContext) -> None:
        """After the checkpoint is restored, before the first batch."""

    def before_run(self, context: EvaluationContext) -> None:
        """Before ``eval_op`` runs on ``context.batch``."""

    def after_run(self, context: EvaluationContext, outputs: Any) -> None:
        """After ``eval_op`` returned ``outputs``; ``context.request_stop()`` ends the evaluation."""

    def end(self, context: EvaluationContext) -> None:
        """After ``final_op`` was evaluated (``context.final_values``)."""


_HOOK_METHODS = ("begin", "before_run", "after_run", "end")


def _implements(hook: Any, method: str) -> bool:
    fn = getattr(hook, method, None)
    if not callable(fn):
        return False
    return getattr(fn, "__func__", None) is not getattr(EvaluationHook, method)


class StopAfterNEvalsHook(EvaluationHook):
    """Requests a stop once ``num_evals`` batches have run (TF-Slim's hook of that name).

    ``evaluate_once`` bounds its loop by ``num_evals`` itself; this hook is
    for hook lists built by hand. With ``log_progress`` it logs
    ``Evaluation [i/N]`` about ten times per evaluation, as TF does.

    Example:
        >>> hook = StopAfterNEvalsHook(2)
        >>> ctx = EvaluationContext('/tmp/model.ckpt-1.pt', 1, '/tmp/eval')
        >>> ctx.evals_completed = 2; hook.after_run(ctx, None); ctx.stop_requested
        True
    """

    def __init__(self, num_evals: int, log_progress: bool = True) -> None:
        if isinstance(num_evals, bool) or not isinstance(num_evals, int) or num_evals < 1:
            raise ValueError(f"StopAfterNEvalsHook: argument 'num_evals' must be an int >= 1, got {num_evals!r}")
        self.num_evals = num_evals
        self.log_progress = bool(log_progress)
        self._log_every = max(1, num_evals // 10)

    def after_run(self, context: EvaluationContext, outputs: Any) -> None:
        done = context.evals_completed
        if self.log_progress and (done % self._log_every == 0 or done == self.num_evals):
            logger.info("Evaluation [%d/%d]", done, self.num_evals)
        if done >= self.num_evals:
            context.request_stop()


def _check_records(fn: str, summary_op: Any) -> list[SummaryRecord] | None:
    if summary_op is None:
        return None
    if isinstance(summary_op, SummaryRecord):
        return [summary_op]
    if isinstance(summary_op, (list, tuple)) and all(isinstance(r, SummaryRecord) for r in summary_op):
        return list(summary_op)
    raise TypeError(
        f"{fn}: argument 'summary_op' must be a SummaryRecord or a list of them (made by "
        f"slim.summaries.add_*_summary), None, or left out for the SUMMARIES collection; got {type(summary_op).__name__}"
    )


def _no_feed_dict(fn: str, **feed_dicts: Any) -> None:
    for arg, value in feed_dicts.items():
        if value is not None:
            raise ValueError(
                f"{fn}: argument {arg!r} is not applicable in eager PyTorch (there is no graph to feed); "
                f"got {type(value).__name__}. Pass the inputs through 'data' or close over them in the op"
            )


class SummaryAtEndHook(EvaluationHook):
    """Writes the evaluation's results for TensorBoard at its end (TF-Slim's hook of that name).

    Writes the numeric scalars of the final values (tagged by their
    ``final_op`` dict key or metric name) and ``summary_op`` (a list of
    :class:`~torchslim.summaries.SummaryRecord`; None: the SUMMARIES
    collection, including the summaries the last batch recorded) at the
    checkpoint's global step, then flushes. Give ``log_dir`` (a writer is
    opened at the first ``end`` and closed by :meth:`close`) or an open
    ``summary_writer``.

    Example:
        >>> import tempfile
        >>> hook = SummaryAtEndHook(log_dir=tempfile.mkdtemp())
        >>> ctx = EvaluationContext('/tmp/model.ckpt-7.pt', 7, hook.log_dir)
        >>> ctx.summary_scalars = [('accuracy', 0.9)]
        >>> hook.end(ctx); hook.close()
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        summary_writer: SummaryWriter | None = None,
        summary_op: Any = None,
        feed_dict: Any = None,
    ) -> None:
        if log_dir is None and summary_writer is None:
            raise ValueError("SummaryAtEndHook: one of 'log_dir' or 'summary_writer' must be given")
        if log_dir is not None and (not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir)):
            raise ValueError(f"SummaryAtEndHook: argument 'log_dir' must be a non-empty directory path, got {log_dir!r}")
        if summary_writer is not None and not isinstance(summary_writer, SummaryWriter):
            raise TypeError(
                f"SummaryAtEndHook: argument 'summary_writer' must be a torchslim.summaries.SummaryWriter, "
                f"got {type(summary_writer).__name__}"
            )
        _no_feed_dict("SummaryAtEndHook", feed_dict=feed_dict)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._records = _check_records("SummaryAtEndHook", summary_op)
        self._writer = summary_writer
        self._owns_writer = summary_writer is None

    def end(self, context: EvaluationContext) -> None:
        if self._writer is None:
            # written and flushed once per evaluation: a background thread would only add a join
            self._writer = SummaryWriter(self.log_dir, asynchronous=False)  # type: ignore[arg-type]
        records = [SummaryRecord(tag, "scalar", torch.tensor(value, dtype=torch.float64))
                   for tag, value in context.summary_scalars]
        records += _collections.get_collection(_collections.GraphKeys.SUMMARIES) if self._records is None else self._records
        self._writer.write(context.global_step, records)
        self._writer.flush()

    def close(self) -> None:
        """Closes the writer this hook opened (not one it was given)."""
        if self._owns_writer and self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


# ------------------------------------------------------- final values
def _is_sequence(obj: Any) -> bool:
    return isinstance(obj, (list, tuple, *_DICT_VIEWS))


def _check_final_op(obj: Any, where: str = "final_op") -> None:
    if obj is None or isinstance(obj, (StreamingMetric, torchmetrics.Metric, torch.Tensor)) or callable(obj):
        return
    if isinstance(obj, Mapping):
        for key, item in obj.items():
            _check_final_op(item, f"{where}[{key!r}]")
        return
    if _is_sequence(obj):
        for i, item in enumerate(obj):
            _check_final_op(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} must be a callable (e.g. a metric's value function), a metric, a tensor, "
        f"or a dict/list of those; got {type(obj).__name__}"
    )


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.item() if value.dim() == 0 else value.cpu()
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_python(v) for v in value)
    return value


def _fetch(op: Any) -> Any:
    """Evaluates ``final_op``: metrics are computed, callables called, tensors read."""
    if op is None:
        return None
    if isinstance(op, (StreamingMetric, torchmetrics.Metric)):
        return _to_python(op.compute())
    if isinstance(op, Mapping):
        return {k: _fetch(v) for k, v in op.items()}
    if _is_sequence(op):
        return [_fetch(v) for v in op]
    if isinstance(op, torch.Tensor):
        return _to_python(op)
    return _to_python(op())


def _op_name(op: Any) -> str | None:
    owner = op.__self__ if isinstance(op, types.MethodType) else op
    if isinstance(owner, StreamingMetric):
        return owner.name
    return None


def _scalars(op: Any, value: Any, tag: str | None) -> list[tuple[str, float]]:
    """``(tag, number)`` for every numeric scalar among the final values."""
    if isinstance(op, Mapping) and isinstance(value, Mapping):
        out: list[tuple[str, float]] = []
        for key in op:
            out += _scalars(op[key], value.get(key), f"{tag}/{key}" if tag else str(key))
        return out
    if _is_sequence(op) and isinstance(value, list):
        out = []
        for i, (o, v) in enumerate(zip(op, value)):
            out += _scalars(o, v, _op_name(o) or f"{tag or 'final_op'}/{i}")
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(tag or _op_name(op) or "final_op", float(value))]
    return []


# ---------------------------------------------------------- one evaluation
def _as_eval_fn(eval_op: Any) -> tuple[Callable[..., Any] | None, Any]:
    """(the per-batch callable, eval_op in a form modules_of and metrics_of can read)."""
    if eval_op is None:
        return None, None
    if isinstance(eval_op, Mapping):
        items = tuple(eval_op.items())
        for key, fn in items:
            if not callable(fn):
                raise TypeError(f"eval_op[{key!r}] must be a callable, got {type(fn).__name__}")
        return (lambda *batch: {k: fn(*batch) for k, fn in items}), dict(items)
    if callable(eval_op):
        return eval_op, eval_op
    if isinstance(eval_op, Iterable) and not isinstance(eval_op, (str, bytes)):
        ops = tuple(eval_op)
        for i, fn in enumerate(ops):
            if not callable(fn):
                raise TypeError(f"eval_op[{i}] must be a callable, got {type(fn).__name__}")
        return (lambda *batch: [fn(*batch) for fn in ops]), list(ops)
    raise TypeError(f"eval_op must be a callable, a list or a dict of callables, or None; got {type(eval_op).__name__}")


def _check_variables_to_restore(fn: str, value: Any) -> None:
    if value is None or isinstance(value, torch.nn.Module):
        return
    if isinstance(value, Mapping):
        for name, t in value.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{fn}: argument 'variables_to_restore' must map names to tensors, got {name!r}: {type(t).__name__}"
                )
        return
    raise TypeError(
        f"{fn}: argument 'variables_to_restore' must be None, an nn.Module or a dict name -> tensor "
        f"(as slim.variables.get_variables_to_restore returns), got {type(value).__name__}"
    )


def _global_step(state: Mapping[str, Any], path: str) -> int:
    step = state.get("global_step")
    if step is not None:
        return int(step)
    try:
        return checkpoint_step(path)
    except ValueError:
        return 0


class _Evaluation:
    """Everything decided once (modules, metrics, hooks), then :meth:`run` per checkpoint."""

    def __init__(
        self,
        fn: str,
        logdir: Any,
        num_evals: Any,
        initial_op: Any,
        eval_op: Any,
        final_op: Any,
        summary_op: Any,
        variables_to_restore: Any,
        hooks: Any,
        data: Any,
        init_fn: Any = None,
        progress: Any = "auto",
    ) -> None:
        if num_evals is not None and (isinstance(num_evals, bool) or not isinstance(num_evals, int) or num_evals < 1):
            raise ValueError(f"{fn}: argument 'num_evals' must be an int >= 1 or None (run until data runs out), got {num_evals!r}")
        if num_evals is None and data is None and eval_op is not None:
            raise ValueError(f"{fn}: num_evals=None runs until 'data' runs out, so 'data' must be given")
        if data is not None and not isinstance(data, Iterable):
            raise TypeError(f"{fn}: argument 'data' must be an iterable of batches (a list, a DataLoader) or None, got {type(data).__name__}")
        for arg, value in (("initial_op", initial_op), ("init_fn", init_fn)):
            if value is not None and not callable(value):
                raise TypeError(f"{fn}: argument {arg!r} must be a callable taking no argument or None, got {type(value).__name__}")
        if summary_op is not _USE_DEFAULT:
            _check_records(fn, summary_op)
        if summary_op is not None and (not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir)):
            raise ValueError(
                f"{fn}: argument 'logdir' must be a non-empty directory path for the summaries, got {logdir!r} "
                f"(pass summary_op=None to write none)"
            )
        _check_final_op(final_op)
        _check_variables_to_restore(fn, variables_to_restore)
        if hooks is None:
            hooks = []
        if not isinstance(hooks, (list, tuple)):
            raise TypeError(f"{fn}: argument 'hooks' must be a list of hooks or None, got {type(hooks).__name__}")
        for i, hook in enumerate(hooks):
            if not any(callable(getattr(hook, m, None)) for m in _HOOK_METHODS):
                raise TypeError(f"{fn}: hooks[{i}] ({type(hook).__name__}) has none of the hook methods {_HOOK_METHODS}")

        self.logdir = "" if logdir is None else os.fspath(logdir)
        self.num_evals = num_evals
        self.initial_op = initial_op
        self.init_fn = init_fn
        self.final_op = final_op
        self.data = data
        self.eval_fn, eval_ops = _as_eval_fn(eval_op)

        found = modules_of(*(op for op in (eval_ops, final_op, initial_op) if op is not None))
        found = {k: m for k, m in found.items() if not isinstance(m, torchmetrics.Metric)}
        # What the checkpoint's 'model' state dict is loaded into: the given module or dict, else the
        # modules found, with or without the stateless ones (a loss module the trainer did not use).
        self.candidates: list[torch.nn.Module] = []
        if isinstance(variables_to_restore, torch.nn.Module):
            self.restore_into: Any = variables_to_restore
            self.modules = [variables_to_restore] + [m for m in found.values() if m is not variables_to_restore]
        else:
            self.restore_into = variables_to_restore
            self.modules = list(found.values())
            if variables_to_restore is None and found:
                stateful = {k: m for k, m in found.items() if m.state_dict()}
                self.candidates = [as_single_module(found)]
                if stateful and len(stateful) < len(found):
                    self.candidates.append(as_single_module(stateful))
                self.restore_into = self.candidates[0]
        self._candidate_keys = [frozenset(m.state_dict()) for m in self.candidates]
        if self.restore_into is None and eval_op is not None:
            logger.warning("%s: no nn.Module found in eval_op, final_op or initial_op; no weights will be restored "
                           "(pass variables_to_restore)", fn)
        self.metrics = metrics_of(eval_ops, final_op)

        self.own_hooks: list[SummaryAtEndHook] = []
        if summary_op is not None:
            records = None if summary_op is _USE_DEFAULT else summary_op
            self.own_hooks.append(SummaryAtEndHook(log_dir=self.logdir, summary_op=records))
        all_hooks = [*self.own_hooks, *hooks]
        self.begin_hooks = [h for h in all_hooks if _implements(h, "begin")]
        self.before_hooks = [h for h in all_hooks if _implements(h, "before_run")]
        self.after_hooks = [h for h in all_hooks if _implements(h, "after_run")]
        self.end_hooks = [h for h in all_hooks if _implements(h, "end")]
        self.progress_mode = _progress.resolve_mode(progress)
        self._console = contextlib.ExitStack()  # torchslim's messages on stderr until close(), if nothing else shows them
        self._console.enter_context(_progress.console_logging())

    def _restore(self, state: Mapping[str, Any], path: str) -> None:
        if self.restore_into is None:
            return
        weights = state.get("model")
        if not isinstance(weights, Mapping):
            raise CheckpointError(f"checkpoint {path!r} has no 'model' state dict (keys: {sorted(state)})")
        if isinstance(self.restore_into, torch.nn.Module):
            target = self.restore_into
            if len(self.candidates) > 1:
                keys = frozenset(weights)
                target = next((m for m, k in zip(self.candidates, self._candidate_keys) if k == keys), target)
            try:
                target.load_state_dict(weights)
            except RuntimeError as e:
                raise ValueError(
                    f"checkpoint {path!r} does not match the model to restore ({e}); pass "
                    f"variables_to_restore=<the module or a dict name -> tensor> to choose what is restored"
                ) from e
            return
        weights = {**weights, **moving_average_variables(state)}  # 'w/ExponentialMovingAverage' names
        missing = [name for name in self.restore_into if name not in weights]
        if missing:
            raise ValueError(f"checkpoint {path!r} has no value for variables_to_restore {missing[:5]} "
                             f"(it has {sorted(weights)[:5]}...)")
        with torch.no_grad():
            for name, tensor in self.restore_into.items():
                value = weights[name]
                if tuple(value.shape) != tuple(tensor.shape):
                    raise ValueError(f"checkpoint {path!r}: {name!r} has shape {tuple(value.shape)}, "
                                     f"the variable to restore has {tuple(tensor.shape)}")
                tensor.copy_(value)

    def _batches(self) -> Iterator[tuple[Any, ...]]:
        if self.data is None:
            return itertools.repeat(()) if self.num_evals is None else itertools.repeat((), self.num_evals)
        batches = zip(self.data)  # 1-tuples, made in C
        return batches if self.num_evals is None else itertools.islice(batches, self.num_evals)

    def _shown(self, batches: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        """The batches, with a progress bar or an 'Evaluation [k/N]' line every tenth (see torchslim.progress)."""
        if self.progress_mode == "none":
            return batches
        total = self.num_evals
        length = getattr(self.data, "__len__", None)
        if length is not None:
            total = length() if total is None else min(total, length())
        shown = _progress.Progress(self.progress_mode, total, "Evaluation", " batch", leave=False)
        return shown.wrap(batches, log_every=max(total // 10, 1) if total else None)

    def _run_batches(self, ctx: EvaluationContext) -> dict[str, list[Any]]:
        """Runs ``eval_op`` on each batch in its own step scope; returns the last step's collections."""
        last_step: dict[str, list[Any]] = {}
        eval_fn, before, after = self.eval_fn, self.before_hooks, self.after_hooks
        if eval_fn is None:
            return last_step
        step_scope = _collections.step_scope
        if not (before or after):  # no per-batch hook: nothing but the op and its step scope
            n = 0
            for batch in self._shown(self._batches()):
                with step_scope() as last_step:
                    eval_fn(*batch)
                n += 1
            ctx.evals_completed = n
        else:
            for batch in self._shown(self._batches()):
                with step_scope() as last_step:
                    ctx.batch = batch[0] if batch else None
                    for hook in before:
                        hook.before_run(ctx)
                    outputs = eval_fn(*batch)
                    ctx.evals_completed += 1
                    for hook in after:
                        hook.after_run(ctx, outputs)
                if ctx.stop_requested:
                    break
        if self.data is not None and ctx.evals_completed == 0:
            logger.warning("Evaluation of %s ran no batch: 'data' yielded nothing (a one-shot iterator "
                           "already used up?)", ctx.checkpoint_path)
        elif self.data is not None and not ctx.stop_requested and ctx.evals_completed != self.num_evals:
            logger.info("Data ran out after %d batches", ctx.evals_completed)
        return last_step

    def run(self, path: str, state: Mapping[str, Any]) -> Any:
        ctx = EvaluationContext(path, _global_step(state, path), self.logdir)
        for metric in self.metrics:
            metric.reset()
        if self.initial_op is not None:
            self.initial_op()
        self._restore(state, path)
        if self.init_fn is not None:
            self.init_fn()
        modes = [(m, m.training) for top in self.modules for m in top.modules()]
        for top in self.modules:
            top.eval()
        try:
            for hook in self.begin_hooks:
                hook.begin(ctx)
            logger.info("Starting evaluation of %s (global step %d) at %s", path, ctx.global_step,
                        time.strftime("%Y-%m-%d-%H:%M:%S", time.gmtime()))
            with torch.no_grad():
                last_step = self._run_batches(ctx)
                with _collections.step_scope() as end_step:  # the last batch's summaries stay visible
                    end_step.update(last_step)
                    ctx.final_values = _fetch(self.final_op)
                    ctx.summary_scalars = _scalars(self.final_op, ctx.final_values, None)
                    for hook in self.end_hooks:
                        hook.end(ctx)
            logger.info("Finished evaluation of %s at %s", path, time.strftime("%Y-%m-%d-%H:%M:%S", time.gmtime()))
        finally:
            for module, training in modes:
                module.training = training
        return ctx.final_values

    def close(self) -> None:
        try:
            for hook in self.own_hooks:
                hook.close()
        finally:
            self._console.close()


def _check_not_applicable(fn: str, master: Any, session_config: Any) -> None:
    if master not in ("", None):
        raise ValueError(
            f"{fn}: argument 'master' is not applicable: evaluation runs in this process; got {master!r}. "
            f"Run one evaluation process per checkpoint directory (no master address is needed)"
        )
    if session_config is not None:
        raise ValueError(f"{fn}: argument 'session_config' is not applicable in eager PyTorch (there is no session); "
                         f"got {type(session_config).__name__}")


def evaluate_once(
    checkpoint_path: str | os.PathLike[str],
    logdir: str | os.PathLike[str],
    num_evals: int | None = 1,
    initial_op: Callable[[], Any] | None = None,
    initial_op_feed_dict: Any = None,
    eval_op: Any = None,
    eval_op_feed_dict: Any = None,
    final_op: Any = None,
    final_op_feed_dict: Any = None,
    summary_op: Any = _USE_DEFAULT,
    summary_op_feed_dict: Any = None,
    variables_to_restore: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    session_config: Any = None,
    hooks: Sequence[Any] | None = None,
    data: Iterable[Any] | None = None,
    master: str = "",
    *,
    progress: _progress.ProgressMode = "auto",
) -> Any:
    """Evaluates the model at ``checkpoint_path``; returns the value of ``final_op``.

    Args:
        checkpoint_path: a checkpoint file (``slim.checkpoint.latest_checkpoint(dir)``
            gives the newest). Missing: :class:`CheckpointNotFoundError` (a
            ValueError); damaged: ``CorruptCheckpointError``; both name the path.
        logdir: where the summaries are written (TensorBoard reads them beside training's).
        num_evals: how many batches ``eval_op`` runs on (fewer if ``data`` runs out);
            None: all of ``data``. Without ``data``, how many times it is called.
        initial_op: called with no argument before the checkpoint is restored.
        eval_op: a callable run on each batch (a list or dict of them: each is
            run); without ``data`` it is called with no argument.
        final_op: what is returned: a metric value function (``names_to_values[name]``),
            a metric, a tensor, or a dict/list of those; tensors holding one
            value come back as Python numbers, like the arrays TF returns.
        summary_op: default: the SUMMARIES collection; a list of SummaryRecords;
            None: write nothing. The numeric scalars of ``final_op`` are written with it.
        variables_to_restore: an ``nn.Module``, a dict name -> tensor, or None
            (the modules ``eval_op``/``final_op``/``initial_op`` refer to).
        hooks: more hooks (see :class:`EvaluationHook`), after the SummaryAtEndHook.
        data: an iterable of batches (a DataLoader, a list).
        master, session_config, *_feed_dict: not applicable in eager PyTorch;
            a value other than the default raises a ValueError.
        progress: ``'auto'`` (a bar over the batches when stderr is a terminal,
            else an ``Evaluation [k/N]`` log line every tenth), ``'bar'``,
            ``'log'`` or ``'none'`` (see :mod:`torchslim.progress`).

    Example:
        >>> import os, tempfile
        >>> from torchslim import checkpoint, metrics
        >>> net = torch.nn.Linear(3, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), 'model.ckpt-10.pt')
        >>> checkpoint.save_checkpoint(path, {'global_step': 10, 'model': net.state_dict()})
        >>> acc = metrics.streaming_accuracy()
        >>> def eval_op(batch):
        ...     acc.update(net(batch[0]).argmax(1), batch[1])
        >>> data = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))] * 3
        >>> value = evaluate_once(path, tempfile.mkdtemp(), num_evals=None, eval_op=eval_op,
        ...                       final_op={'accuracy': acc.compute}, data=data)
        >>> sorted(value)
        ['accuracy']
    """
    fn = "evaluate_once"
    _check_not_applicable(fn, master, session_config)
    _no_feed_dict(fn, initial_op_feed_dict=initial_op_feed_dict, eval_op_feed_dict=eval_op_feed_dict,
                  final_op_feed_dict=final_op_feed_dict, summary_op_feed_dict=summary_op_feed_dict)
    if not isinstance(checkpoint_path, (str, os.PathLike)) or not os.fspath(checkpoint_path):
        raise ValueError(f"{fn}: argument 'checkpoint_path' must be a checkpoint file path, got {checkpoint_path!r} "
                         f"(torchslim has no leading 'master' argument)")
    path = os.fspath(checkpoint_path)
    if os.path.isdir(path):
        raise ValueError(f"{fn}: checkpoint_path {path!r} is a directory; pass one checkpoint file, e.g. "
                         f"slim.checkpoint.latest_checkpoint({path!r})")
    evaluation = _Evaluation(fn, logdir, num_evals, initial_op, eval_op, final_op, summary_op,
                             variables_to_restore, hooks, data, progress=progress)
    try:
        try:
            state = load_checkpoint(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{fn}: checkpoint {path!r} does not exist") from None
        return evaluation.run(path, state)
    finally:
        evaluation.close()


# ------------------------------------------------------- waiting for checkpoints
def _check_seconds(fn: str, arg: str, value: Any, allow_none: bool = True, allow_zero: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: argument {arg!r} must be a number of seconds {bound}{' or None' if allow_none else ''}, got {value!r}")


def _wait_until(find: Callable[[], str | None], seconds_to_sleep: float, timeout: float | None,
                clock: Callable[[], float], sleep: Callable[[float], None]) -> str | None:
    stop_time = None if timeout is None else clock() + timeout
    while True:
        found = find()
        if found is not None:
            return found
        if stop_time is not None and clock() + seconds_to_sleep > stop_time:
            return None
        sleep(seconds_to_sleep)


def wait_for_new_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    last_checkpoint: str | None = None,
    seconds_to_sleep: float = 1,
    timeout: float | None = None,
    *,
    prefix: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Waits until the newest checkpoint in ``checkpoint_dir`` is not ``last_checkpoint``; returns its path.

    Polls every ``seconds_to_sleep``; returns None once waiting longer would
    pass ``timeout`` seconds (None: wait forever). "Newest" is by the global
    step stored in each file; ``prefix`` (default: the one the directory's
    index records, else any) as in ``slim.checkpoint.list_checkpoints``.
    ``clock`` and ``sleep`` are injectable so tests need not wait.

    Example:
        >>> slept = []
        >>> wait_for_new_checkpoint('/nonexistent', timeout=1.0, seconds_to_sleep=0.5,
        ...                         clock=lambda: sum(slept), sleep=slept.append) is None
        True
        >>> slept
        [0.5, 0.5]
    """
    fn = "wait_for_new_checkpoint"
    _check_dir(fn, checkpoint_dir)
    _check_seconds(fn, "seconds_to_sleep", seconds_to_sleep, allow_none=False, allow_zero=False)
    _check_seconds(fn, "timeout", timeout)
    _check_prefix(fn, prefix)
    directory = os.fspath(checkpoint_dir)
    logger.info("Waiting for new checkpoint at %s", directory)

    def find() -> str | None:
        path = latest_checkpoint(directory, prefix)
        return None if path is None or path == last_checkpoint else path

    found = _wait_until(find, seconds_to_sleep, timeout, clock, sleep)
    if found is not None:
        logger.info("Found new checkpoint at %s", found)
    return found


def _check_dir(fn: str, checkpoint_dir: Any) -> None:
    if not isinstance(checkpoint_dir, (str, os.PathLike)) or not os.fspath(checkpoint_dir):
        raise ValueError(f"{fn}: argument 'checkpoint_dir' must be a non-empty directory path, got {checkpoint_dir!r} "
                         f"(torchslim has no leading 'master' argument)")


def _check_prefix(fn: str, prefix: Any) -> None:
    if prefix is not None and (not isinstance(prefix, str) or not prefix or os.sep in prefix):
        raise ValueError(f"{fn}: argument 'prefix' must be None (the prefix the directory's index records) or the "
                         f"Saver's file name prefix such as 'model.ckpt', got {prefix!r}")


def _iterate_checkpoints(
    directory: str,
    min_interval_secs: float,
    timeout: float | None,
    timeout_fn: Callable[[], bool] | None,
    every: bool,
    seconds_to_sleep: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    prefix: str | None = None,
) -> Iterator[str]:
    # A file is "seen" by its path and its identity on disk (inode, size, mtime), so a checkpoint
    # rewritten in place, or written by a trainer restarted from an older step, is not waited past.
    last: tuple[str, tuple[int, int, int]] | None = None
    seen: set[tuple[str, tuple[int, int, int]]] = set()
    chosen: tuple[str, tuple[int, int, int]] | None = None

    def newest() -> str | None:
        nonlocal chosen
        found = _find(directory, prefix)
        if not found or (found[-1].path, found[-1].identity) == last:
            return None
        chosen = (found[-1].path, found[-1].identity)
        return found[-1].path

    def oldest_unseen() -> str | None:
        nonlocal chosen
        for f in _find(directory, prefix):  # oldest first by stored global step
            if (f.path, f.identity) not in seen:
                chosen = (f.path, f.identity)
                return f.path
        return None

    while True:
        logger.info("Waiting for new checkpoint at %s", directory)
        path = _wait_until(oldest_unseen if every else newest, seconds_to_sleep, timeout, clock, sleep)
        if path is None:
            if timeout_fn is None:
                logger.info("Timed-out waiting for a checkpoint.")
                return
            if timeout_fn():
                return
            continue
        start = clock()
        last = chosen
        if chosen is not None:
            seen.add(chosen)
        yield path
        remaining = start + min_interval_secs - clock()
        if remaining > 0:
            sleep(remaining)


def checkpoints_iterator(
    checkpoint_dir: str | os.PathLike[str],
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    *,
    seconds_to_sleep: float = 1,
    prefix: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[str]:
    """Yields the newest checkpoint each time a new one appears (TF semantics).

    Waits at most ``timeout`` seconds for the next one (None: forever);
    then, without ``timeout_fn``, stops; with it, stops when it returns
    True and waits again when it returns False. Yields are at least
    ``min_interval_secs`` apart. Checkpoints written while the caller works
    on the previous one are skipped in favour of the newest (use
    :func:`evaluation_loop` to evaluate every one). Checkpoints are ordered
    by the global step stored in each; ``prefix`` as in
    :func:`wait_for_new_checkpoint` (default: whatever prefix the Saver used).

    Example:
        >>> list(checkpoints_iterator('/nonexistent', timeout=0))
        []
    """
    fn = "checkpoints_iterator"
    _check_dir(fn, checkpoint_dir)
    _check_seconds(fn, "min_interval_secs", min_interval_secs, allow_none=False)
    _check_seconds(fn, "timeout", timeout)
    _check_seconds(fn, "seconds_to_sleep", seconds_to_sleep, allow_none=False, allow_zero=False)
    if timeout_fn is not None and not callable(timeout_fn):
        raise TypeError(f"{fn}: argument 'timeout_fn' must be a callable taking no argument or None, got {timeout_fn!r}")
    _check_prefix(fn, prefix)
    return _iterate_checkpoints(os.fspath(checkpoint_dir), min_interval_secs, timeout, timeout_fn, False,
                                seconds_to_sleep, clock, sleep, prefix)


def evaluation_loop(
    checkpoint_dir: str | os.PathLike[str],
    logdir: str | os.PathLike[str],
    num_evals: int | None = 1,
    initial_op: Callable[[], Any] | None = None,
    initial_op_feed_dict: Any = None,
    init_fn: Callable[[], Any] | None = None,
    eval_op: Any = None,
    eval_op_feed_dict: Any = None,
    final_op: Any = None,
    final_op_feed_dict: Any = None,
    summary_op: Any = _USE_DEFAULT,
    summary_op_feed_dict: Any = None,
    variables_to_restore: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    eval_interval_secs: float = 60,
    max_number_of_evaluations: int | None = None,
    session_config: Any = None,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    hooks: Sequence[Any] | None = None,
    data: Iterable[Any] | None = None,
    master: str = "",
    *,
    prefix: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    progress: _progress.ProgressMode = "auto",
) -> Any:
    """Evaluates each new checkpoint in ``checkpoint_dir`` once, oldest first; returns the last final values.

    Arguments as in :func:`evaluate_once`, plus: ``init_fn`` (called with no
    argument after each restore), ``eval_interval_secs`` (evaluations start
    at least this far apart; the directory is polled every
    ``min(1, eval_interval_secs)`` seconds, at least 0.05),
    ``max_number_of_evaluations`` (None: forever), ``timeout`` and
    ``timeout_fn`` (as :func:`checkpoints_iterator`), ``prefix`` (the
    Saver's file prefix; default: the one the directory's index records,
    else any), ``clock`` and ``sleep`` (injectable time), ``progress`` (as
    :func:`evaluate_once`).

    Unlike TF, a checkpoint written while another is evaluated is not
    skipped: each one newer than the last evaluated is evaluated in turn.
    One that vanishes before it is loaded (a trainer's ``max_to_keep``) or
    cannot be read is skipped with a warning (a file rewritten later is
    evaluated then); "oldest" is by the global step stored in each file. An error raised by the
    evaluation itself stops the loop. All summaries go to one event file
    in ``logdir``.

    Example:
        >>> import tempfile
        >>> evaluation_loop(tempfile.mkdtemp(), tempfile.mkdtemp(), timeout=0) is None   # no checkpoint came
        True
    """
    fn = "evaluation_loop"
    _check_not_applicable(fn, master, session_config)
    _no_feed_dict(fn, initial_op_feed_dict=initial_op_feed_dict, eval_op_feed_dict=eval_op_feed_dict,
                  final_op_feed_dict=final_op_feed_dict, summary_op_feed_dict=summary_op_feed_dict)
    _check_dir(fn, checkpoint_dir)
    _check_prefix(fn, prefix)
    _check_seconds(fn, "eval_interval_secs", eval_interval_secs, allow_none=False)
    _check_seconds(fn, "timeout", timeout)
    if timeout_fn is not None and not callable(timeout_fn):
        raise TypeError(f"{fn}: argument 'timeout_fn' must be a callable taking no argument or None, got {timeout_fn!r}")
    if max_number_of_evaluations is not None and (
        isinstance(max_number_of_evaluations, bool) or not isinstance(max_number_of_evaluations, int)
        or max_number_of_evaluations < 1
    ):
        raise ValueError(f"{fn}: argument 'max_number_of_evaluations' must be None or an int >= 1, "
                         f"got {max_number_of_evaluations!r}")
    if data is not None and isinstance(data, Iterator) and max_number_of_evaluations != 1:
        raise ValueError(
            f"{fn}: argument 'data' is a one-shot iterator ({type(data).__name__}), so only the first evaluation "
            f"would get batches; pass a re-iterable (a list, a DataLoader)"
        )
    evaluation = _Evaluation(fn, logdir, num_evals, initial_op, eval_op, final_op, summary_op,
                             variables_to_restore, hooks, data, init_fn, progress=progress)
    poll = min(1.0, max(float(eval_interval_secs), 0.05))
    values = None
    done = 0
    try:
        for path in _iterate_checkpoints(os.fspath(checkpoint_dir), eval_interval_secs, timeout, timeout_fn, True,
                                         poll, clock, sleep, prefix):
            try:
                state = load_checkpoint(path)
            except (OSError, CorruptCheckpointError) as e:
                logger.warning("Skipping checkpoint %s: %s", path, e)
                continue
            values = evaluation.run(path, state)
            done += 1
            if max_number_of_evaluations is not None and done >= max_number_of_evaluations:
                break
    finally:
        evaluation.close()
    return values
