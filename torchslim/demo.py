"""The demo: every part of torchslim on a real task, from one command, in seconds on a CPU.

    python -m torchslim demo --logdir /tmp/torchslim-demo     # train, evaluate, analyze
    python -m torchslim demo --logdir /tmp/torchslim-demo --steps 2000   # resume, train on
    python -m torchslim eval /tmp/torchslim-demo --once       # evaluate the newest checkpoint
    tensorboard --logdir /tmp/torchslim-demo

The same pieces from Python, to reuse the model elsewhere::

    import torchslim as slim
    from torchslim import demo

    model = demo.build_model()
    total_loss = demo.make_total_loss(model)             # batch -> total loss, records summaries
    eval_op, names_to_values = demo.make_eval(model)     # per-batch metric updates, final values

``demo`` trains a small CNN (two 3x3 convolutions and a hidden layer, each
followed by ``slim.layers.batch_norm``, whose moving averages are update
ops; 38k parameters) on the 1,437 training digits of
:mod:`torchslim.data.digits`, with an L2 regularizer on the weights, an
exponentially decaying learning rate, summaries (losses, learning rate,
weight histograms, zero fractions of the activations, input images) and
checkpoints, its batches prefetched by ``slim.queues.prefetch_queue``. Then
it evaluates every checkpoint the run wrote on the 360 held-out digits with
``slim.evaluation.evaluate_once`` (summaries in ``LOGDIR/eval``, under the
training's tag names, ``accuracy`` and ``losses/cross_entropy``, so
TensorBoard overlays the two runs' curves) and prints
``slim.model_analyzer``'s report. Run again on the same directory, it
resumes from the newest checkpoint (weights, optimizer, schedule, global
step, position in the data); when that checkpoint is already at
``--steps``, it only evaluates it and reports.

Progress goes to stderr: train()'s bar (steps/s, loss, ETA) when stderr is
a terminal, TF-Slim's ``global step N: loss = X`` log lines otherwise.
Results go to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim import checkpoint as _checkpoint
from torchslim import evaluation as _evaluation
from torchslim import layers as _layers
from torchslim import learning as _learning
from torchslim import losses as _losses
from torchslim import metrics as _metrics
from torchslim import model_analyzer as _model_analyzer
from torchslim import progress as _progress
from torchslim import queues as _queues
from torchslim import summaries as _summaries
from torchslim.cli import ArgumentParser
from torchslim.collections import Registry
from torchslim.data import ResumableIterable, repeat
from torchslim.data import digits as _digits

__all__ = [
    "DigitsNet",
    "ResumablePrefetch",
    "add_model_summaries",
    "build_model",
    "eval_main",
    "evaluate_checkpoint",
    "main",
    "make_eval",
    "make_eval_data",
    "make_total_loss",
    "make_train_data",
    "newest_intact_checkpoint",
    "train_demo",
]

logger = logging.getLogger("torchslim")

DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 0.1
DEFAULT_DECAY_STEPS = 250
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_BN_DECAY = 0.9
EVAL_BATCH_SIZE = 120
EVAL_SUBDIR = "eval"
CROSS_ENTROPY = "losses/cross_entropy"  # the training summary's tag, used for the evaluation's value too


# --------------------------------------------------------------------------- the model


class DigitsNet(nn.Module):
    """A small CNN for 1x8x8 images: conv-bn-relu x2, max pool, fc-bn-relu, fc to 10 logits.

    The convolutions and the hidden layer have no bias (batch norm's ``beta``
    is the offset, as in TF-Slim's ``conv2d(..., normalizer_fn=batch_norm)``).
    ``bn_decay`` is the batch norms' moving-average decay; 0.9 suits runs of
    a few hundred steps (TF-Slim's default 0.999 needs thousands).

    Example:
        >>> net = DigitsNet()
        >>> tuple(net(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
        >>> logits, end_points = net.forward_with_end_points(torch.zeros(2, 1, 8, 8))
        >>> list(end_points)
        ['conv1', 'conv2', 'pool', 'fc1', 'logits']
    """

    def __init__(self, bn_decay: float = DEFAULT_BN_DECAY, num_classes: int = _digits.NUM_CLASSES) -> None:
        super().__init__()
        if isinstance(bn_decay, bool) or not isinstance(bn_decay, (int, float)) or not 0.0 <= bn_decay < 1.0:
            raise ValueError(f"bn_decay must be a number in [0, 1), got {bn_decay!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = _layers.batch_norm(16, decay=bn_decay, scope="conv1/BatchNorm")
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = _layers.batch_norm(32, decay=bn_decay, scope="conv2/BatchNorm")
        self.fc1 = nn.Linear(32 * 4 * 4, 64, bias=False)
        self.bn3 = _layers.batch_norm(64, decay=bn_decay, scope="fc1/BatchNorm")
        self.logits = nn.Linear(64, num_classes)

    def forward_with_end_points(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(logits, end_points)``, TF-Slim's nets' convention: the named activations."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != _digits.IMAGE_SHAPE:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor of shape [N, 1, 8, 8], got {got}")
        end_points: dict[str, torch.Tensor] = {}
        net = end_points["conv1"] = F.relu(self.bn1(self.conv1(images)))
        net = end_points["conv2"] = F.relu(self.bn2(self.conv2(net)))
        net = end_points["pool"] = F.max_pool2d(net, 2).flatten(1)
        net = end_points["fc1"] = F.relu(self.bn3(self.fc1(net)))
        logits = end_points["logits"] = self.logits(net)
        return logits, end_points

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_end_points(images)[0]


def build_model(bn_decay: float = DEFAULT_BN_DECAY, seed: int | None = 0) -> DigitsNet:
    """The demo's model, its weights drawn from ``torch.manual_seed(seed)`` (None: the current RNG).

    Its batch norms register their update ops in the current registry's
    UPDATE_OPS, which ``create_train_op`` picks up.

    Example:
        >>> sum(p.numel() for p in build_model().parameters())
        38282
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DigitsNet(bn_decay=bn_decay)
    return DigitsNet(bn_decay=bn_decay)


def add_model_summaries(model: nn.Module) -> list[_summaries.SummaryRecord]:
    """Set-up summaries that follow training: a histogram of every parameter, tagged ``conv1/weight`` etc.

    Example:
        >>> [r.tag for r in add_model_summaries(build_model())][:2]
        ['conv1/weight', 'bn1/beta']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _summaries.add_histogram_summaries([(n.replace(".", "/"), p) for n, p in model.named_parameters()])


def make_total_loss(model: DigitsNet) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    """The train op's ``total_loss``: ``(images, labels) -> cross entropy + regularization``.

    Each call records, for the step it runs in: the cross entropy
    (``losses/cross_entropy``), regularization (``losses/regularization``)
    and batch accuracy (``accuracy``) scalars, the zero fraction of every ReLU activation
    (``sparsity/<layer>/Fraction_of_Zero_Values``) and the first input
    images (``inputs``). They cost nothing unless the step's summaries are
    written.

    Example:
        >>> from torchslim.collections import step_scope
        >>> loss_fn = make_total_loss(build_model())
        >>> with step_scope():
        ...     loss = loss_fn(_digits.load_digits('test'))
        >>> loss.dim(), bool(loss > 0)
        (0, True)
    """
    if not isinstance(model, DigitsNet):
        raise TypeError(f"model must be the demo's DigitsNet (build_model()), got {type(model).__name__}")

    def total_loss(batch: Sequence[torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        logits, end_points = model.forward_with_end_points(images)
        cross_entropy = _losses.softmax_cross_entropy(logits, labels)
        total = _losses.get_total_loss()
        _summaries.add_scalar_summary(cross_entropy, "cross_entropy", prefix="losses")
        _summaries.add_scalar_summary(total - cross_entropy, "regularization", prefix="losses")
        _summaries.add_scalar_summary((logits.detach().argmax(1) == labels).float().mean(), "accuracy")
        _summaries.add_zero_fraction_summaries(
            [(name, end_points[name]) for name in ("conv1", "conv2", "fc1")], prefix="sparsity")
        _summaries.add_image_summary(images, "inputs", data_format="NCHW")
        return total

    return total_loss


def make_eval(model: DigitsNet) -> tuple[Callable[[Sequence[torch.Tensor]], None], dict[str, Callable[[], Any]]]:
    """``(eval_op, names_to_values)`` for ``slim.evaluation``: accuracy and mean cross entropy.

    ``eval_op(batch)`` updates both streaming metrics with one batch;
    ``names_to_values['accuracy']()`` and ``['losses/cross_entropy']()``
    return their values over every batch since the evaluation began. The
    names are the training summaries' tags for the same quantities, so the
    evaluation's curves lie over the training's in TensorBoard.

    Example:
        >>> eval_op, values = make_eval(build_model())
        >>> eval_op(_digits.load_digits('test'))
        >>> 0.0 <= float(values['accuracy']()) <= 1.0
        True
    """
    if not isinstance(model, DigitsNet):
        raise TypeError(f"model must be the demo's DigitsNet (build_model()), got {type(model).__name__}")
    names_to_values, names_to_updates = _metrics.aggregate_metric_map({
        "accuracy": _metrics.streaming_accuracy(),
        CROSS_ENTROPY: _metrics.streaming_mean(name=CROSS_ENTROPY),
    })

    def eval_op(batch: Sequence[torch.Tensor]) -> None:
        images, labels = batch
        logits = model(images)
        names_to_updates["accuracy"](logits.argmax(1), labels)
        names_to_updates[CROSS_ENTROPY](F.cross_entropy(logits, labels, reduction="none"))

    return eval_op, names_to_values


# --------------------------------------------------------------------------- data


class _WithPosition:
    """Iterates ``data`` as ``(position after the item, item)`` pairs (run by the prefetch thread)."""

    def __init__(self, data: ResumableIterable) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Any]]:
        data = self.data
        for item in data:
            yield data.state_dict(), item


class ResumablePrefetch:
    """Batches of a :class:`~torchslim.data.ResumableIterable`, prefetched in a background thread,
    whose ``state_dict`` is the position of the last batch *taken* (not the last one prefetched).

    The prefetching is a ``slim.queues.prefetch_queue`` registered in
    QUEUE_RUNNERS, so ``slim.learning.train`` starts and stops its thread.
    Each batch travels with the data position after it, so a checkpoint
    records exactly the batches trained on and a resumed run continues
    with the next one.

    Example:
        >>> from torchslim import queues
        >>> data = ResumablePrefetch(repeat([1, 2, 3], num_epochs=1), capacity=2)
        >>> with queues.QueueRunners():
        ...     it = iter(data); first = next(it)
        ...     state = data.state_dict()
        >>> first, state['index']
        (1, 1)
    """

    def __init__(self, data: ResumableIterable, capacity: int = 2) -> None:
        if not isinstance(data, ResumableIterable):
            raise TypeError(f"data must be a torchslim.data.ResumableIterable (slim.data.repeat(...)), got {type(data).__name__}")
        self.data = data
        self._state = data.state_dict()
        self.queue = _queues.prefetch_queue(_WithPosition(data), capacity=capacity, num_threads=1, name="digits_prefetch")

    def __iter__(self) -> Iterator[Any]:
        for state, batch in self.queue:
            self._state = state
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch taken from this iterator."""
        return self._state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Makes the next pass start after the batch ``state`` was taken at."""
        self.data.load_state_dict(dict(state))
        self._state = dict(state)


def make_train_data(batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, capacity: int = 2) -> ResumablePrefetch:
    """The training digits, shuffled by a generator seeded with ``seed``, in batches, forever, prefetched.

    Example:
        >>> data = make_train_data(batch_size=32)
        >>> data.data.num_epochs is None, len(data.data.data)      # 1437 // 32 full batches per epoch
        (True, 44)
    """
    _positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if batch_size > _digits.TRAIN_SIZE:
        raise ValueError(f"batch_size must be at most the {_digits.TRAIN_SIZE} training digits, got {batch_size}")
    loader = torch.utils.data.DataLoader(
        _digits.DigitsDataset("train"), batch_size=batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(seed))
    return ResumablePrefetch(repeat(loader, num_epochs=None), capacity=capacity)


def make_eval_data(batch_size: int = EVAL_BATCH_SIZE) -> torch.utils.data.DataLoader:
    """The 360 held-out digits, in order, in batches.

    Example:
        >>> len(make_eval_data())
        3
    """
    _positive_int("batch_size", batch_size)
    return torch.utils.data.DataLoader(_digits.DigitsDataset("test"), batch_size=batch_size, shuffle=False)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------- progress


class _StartStep:
    """train()'s ``train_step_fn``: TF-Slim's train_step, noting the global step training started from."""

    def __init__(self) -> None:
        self.start_step: int | None = None

    def __call__(self, train_op: Any, batch: Any, global_step: Any, kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
        if self.start_step is None:
            self.start_step = train_op.step
        return _learning.train_step(train_op, batch, global_step, kwargs)


def newest_intact_checkpoint(logdir: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint in ``logdir`` whose digest verifies (the one training resumes from), or None.

    Example:
        >>> newest_intact_checkpoint('/nonexistent') is None
        True
    """
    for path in reversed(_checkpoint.list_checkpoints(os.fspath(logdir))):
        try:
            _checkpoint.verify_checkpoint(path)
        except (_checkpoint.CorruptCheckpointError, OSError):
            continue
        return path
    return None


@contextlib.contextmanager
def _console_logging(verbose: bool) -> Iterator[None]:
    """torchslim's messages on stderr for the span of a command (unless logging is configured): INFO or WARNING."""
    with _progress.console_logging(logging.INFO if verbose else logging.WARNING):
        yield


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- training and evaluation


def train_demo(
    logdir: str | os.PathLike[str],
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    decay_steps: int = DEFAULT_DECAY_STEPS,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    bn_decay: float = DEFAULT_BN_DECAY,
    seed: int = 0,
    save_summaries_steps: int = 20,
    save_interval_steps: int = 200,
    log_every_n_steps: int = 100,
    progress: _progress.ProgressMode = "auto",
) -> dict[str, Any]:
    """Trains the demo model into ``logdir`` (resuming from its newest checkpoint) up to ``steps``.

    The learning rate decays exponentially, halving every ``decay_steps``
    steps: TF's ``exponential_decay(learning_rate, global_step,
    decay_steps, 0.5)``, a function of the global step alone, so a run
    resumed with a larger ``steps`` continues the same schedule. Returns ``{'start_step',
    'global_step', 'loss', 'seconds', 'restored'}`` (``loss`` is None when
    no step ran, ``restored`` the checkpoint resumed from or None).
    ``progress`` is train()'s (``'auto'``: a bar on a terminal, log lines
    every ``log_every_n_steps`` otherwise).

    Example:
        >>> import tempfile
        >>> info = train_demo(tempfile.mkdtemp(), steps=20, log_every_n_steps=0)
        >>> info['global_step'], info['restored']
        (20, None)
    """
    if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
        raise ValueError(f"logdir must be a directory path, got {logdir!r}")
    _positive_int("steps", steps)
    _positive_int("decay_steps", decay_steps)
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "learning_rate" and value == 0):
            raise ValueError(f"{name} must be a number {'> 0' if name == 'learning_rate' else '>= 0'}, got {value!r}")
    logdir = os.fspath(logdir)
    with Registry().as_default():
        model = build_model(bn_decay=bn_decay, seed=seed)
        if weight_decay > 0:
            _layers.regularize(model, _layers.l2_regularizer(float(weight_decay)))
        add_model_summaries(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step / decay_steps))
        train_op = _learning.create_train_op(make_total_loss(model), optimizer, model=model, scheduler=scheduler)
        data = make_train_data(batch_size=batch_size, seed=seed)

        fresh: list[bool] = []
        step_fn = _StartStep()
        started = time.monotonic()
        loss = _learning.train(
            train_op, logdir, data=data, train_step_fn=step_fn, number_of_steps=steps,
            log_every_n_steps=log_every_n_steps, progress=progress,
            save_summaries_secs=None, save_summaries_steps=save_summaries_steps,
            save_interval_secs=None, save_interval_steps=save_interval_steps,
            init_fn=lambda: fresh.append(True),   # called only when no checkpoint was restored
        )
        start_step = train_op.step if step_fn.start_step is None else step_fn.start_step
        return {
            "start_step": start_step,
            "global_step": train_op.step,
            "loss": loss,
            "seconds": time.monotonic() - started,
            "restored": None if fresh else os.path.join(logdir, f"{_checkpoint.DEFAULT_PREFIX}-{start_step}.pt"),
        }


class _PrintResults:
    """An evaluation hook that prints each checkpoint's accuracy and cross entropy to stdout."""

    def __init__(self) -> None:
        self.results: list[tuple[int, dict[str, float]]] = []

    def end(self, context: _evaluation.EvaluationContext) -> None:
        values = dict(context.final_values)
        self.results.append((context.global_step, values))
        correct = round(values["accuracy"] * _digits.TEST_SIZE)
        print(f"global step {context.global_step}: held-out accuracy = {values['accuracy']:.4f} "
              f"({correct}/{_digits.TEST_SIZE} digits), cross entropy = {values[CROSS_ENTROPY]:.4f} "
              f"[{os.path.basename(context.checkpoint_path)}]", flush=True)


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike[str],
    eval_logdir: str | os.PathLike[str],
    bn_decay: float = DEFAULT_BN_DECAY,
    progress: _progress.ProgressMode = "auto",
) -> dict[str, float]:
    """Evaluates one demo checkpoint on the 360 held-out digits; returns ``{'accuracy', 'losses/cross_entropy'}``.

    The values are also printed and written for TensorBoard into
    ``eval_logdir`` at the checkpoint's global step.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); _ = train_demo(d, steps=20, log_every_n_steps=0)
        >>> values = evaluate_checkpoint(_checkpoint.latest_checkpoint(d), os.path.join(d, 'eval'))  # doctest: +ELLIPSIS
        global step 20: held-out accuracy = ...
        >>> sorted(values)
        ['accuracy', 'losses/cross_entropy']
    """
    with Registry().as_default():
        model = build_model(bn_decay=bn_decay)
        eval_op, names_to_values = make_eval(model)
        data = make_eval_data()
        return _evaluation.evaluate_once(
            checkpoint_path, eval_logdir, num_evals=len(data), eval_op=eval_op, final_op=names_to_values,
            data=data, variables_to_restore=model, hooks=[_PrintResults()], progress=progress)


# --------------------------------------------------------------------------- command line


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _float_at_least(minimum: float, strict: bool) -> Callable[[str], float]:
    bound = f"{'>' if strict else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or math.isnan(value):
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        return value

    return parse


def _demo_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="torchslim demo",
        description="Train a small CNN on the shipped 8x8 digits (batch norm, L2 regularization, summaries, "
                    "checkpoints, a prefetch queue), evaluate it on the 360 held-out digits and print the model "
                    "analyzer's report. Run again on the same --logdir to resume.",
    )
    parser.add_argument("--logdir", required=True, help="directory for checkpoints and TensorBoard summaries")
    parser.add_argument("--steps", type=_int_at_least(1), default=DEFAULT_STEPS,
                        help=f"train up to this global step (default: {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=_int_at_least(2), default=DEFAULT_BATCH_SIZE,
                        help=f"training batch size (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--learning-rate", type=_float_at_least(0.0, strict=True), default=DEFAULT_LEARNING_RATE,
                        help=f"initial learning rate of SGD with momentum 0.9 (default: {DEFAULT_LEARNING_RATE})")
    parser.add_argument("--decay-steps", type=_int_at_least(1), default=DEFAULT_DECAY_STEPS,
                        help=f"the learning rate halves every N global steps (default: {DEFAULT_DECAY_STEPS})")
    parser.add_argument("--weight-decay", type=_float_at_least(0.0, strict=False), default=DEFAULT_WEIGHT_DECAY,
                        help=f"scale of the L2 regularizer on the weights; 0 turns it off (default: {DEFAULT_WEIGHT_DECAY})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order (default: 0)")
    parser.add_argument("--save-summaries-steps", type=_int_at_least(1), default=20,
                        help="write summaries every N steps (default: 20)")
    parser.add_argument("--save-interval-steps", type=_int_at_least(1), default=200,
                        help="write a checkpoint every N steps, and at the end (default: 200)")
    parser.add_argument("--log-every-n-steps", type=_int_at_least(0), default=100,
                        help="log the loss every N steps when stderr is not a terminal; 0: never (default: 100)")
    parser.add_argument("--progress", choices=_progress.MODES, default="auto",
                        help="'bar': a progress bar with steps/s, loss and ETA; 'log': log lines; 'none': neither; "
                             "'auto' (default): a bar when stderr is a terminal, log lines otherwise")
    parser.add_argument("--threads", type=_int_at_least(1), default=1,
                        help="CPU threads for torch (default: 1, the fastest for this small model)")
    parser.add_argument("--no-analyze", action="store_true", help="skip the model analyzer's report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``torchslim demo``: train (or resume), evaluate and analyze; returns the exit status.

    Example:
        >>> import tempfile
        >>> main(['--logdir', tempfile.mkdtemp(), '--steps', '20', '--no-analyze'])  # doctest: +ELLIPSIS
        Training the demo CNN ...
        0
    """
    args = _demo_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logdir = os.path.abspath(args.logdir)
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        print(f"torchslim demo: error: --logdir {args.logdir!r} exists and is not a directory", file=sys.stderr)
        return 2
    started = time.monotonic()
    with _console_logging(verbose=True), _torch_threads(args.threads):
        latest = newest_intact_checkpoint(logdir)
        done = _checkpoint.checkpoint_step(latest) if latest is not None else 0
        if done >= args.steps:
            print(f"{logdir} already holds a checkpoint at global step {done} (--steps {args.steps}); "
                  f"nothing to train, evaluating it.", flush=True)
        else:
            if latest is None:
                print(f"Training the demo CNN on {_digits.TRAIN_SIZE} digits for {args.steps} steps "
                      f"(batch size {args.batch_size}) into {logdir}", flush=True)
            else:
                print(f"Resuming the demo CNN from {os.path.basename(latest)} (global step {done}) "
                      f"up to step {args.steps} in {logdir}", flush=True)
            info = train_demo(
                logdir, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                decay_steps=args.decay_steps,
                weight_decay=args.weight_decay, seed=args.seed, save_summaries_steps=args.save_summaries_steps,
                save_interval_steps=args.save_interval_steps, log_every_n_steps=args.log_every_n_steps,
                progress=args.progress,
            )
            ran = info["global_step"] - info["start_step"]
            loss = "n/a" if info["loss"] is None else f"{info['loss']:.4f}"
            print(f"Trained {ran} steps in {info['seconds']:.1f} s ({ran / max(info['seconds'], 1e-9):.0f} steps/s); "
                  f"global step {info['global_step']}, last total loss {loss}", flush=True)
        checkpoint_path = newest_intact_checkpoint(logdir)
        if checkpoint_path is None:
            print(f"torchslim demo: error: no checkpoint was written to {logdir}", file=sys.stderr)
            return 1
        # Every checkpoint this run wrote (the newest alone when nothing was trained): a curve in TensorBoard.
        written = [p for p in _checkpoint.list_checkpoints(logdir) if _checkpoint.checkpoint_step(p) > done]
        to_evaluate = written or [checkpoint_path]
        names = ", ".join(os.path.basename(p) for p in to_evaluate)
        print(f"Evaluating {names} on the {_digits.TEST_SIZE} held-out digits:", flush=True)
        for path in to_evaluate:
            evaluate_checkpoint(path, os.path.join(logdir, EVAL_SUBDIR), progress=args.progress)
        if not args.no_analyze:
            _print_analysis(checkpoint_path)
    print(f"Done in {time.monotonic() - started:.1f} s. To see the curves (training and held-out): "
          f"tensorboard --logdir {logdir}", flush=True)
    return 0


def _print_analysis(checkpoint_path: str) -> None:
    with Registry().as_default():
        model = build_model()
        _checkpoint.restore_model(checkpoint_path, model)
        model.eval()
        print(f"\nModel analysis (slim.model_analyzer) of {os.path.basename(checkpoint_path)}, in eval mode:")
        _model_analyzer.analyze_vars(model, print_info=True)
        example, _ = _digits.load_digits("test")
        _model_analyzer.analyze_ops(model, example[:1], print_info=True)
    sys.stdout.flush()


def _eval_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="torchslim eval",
        description="Evaluate the demo model's checkpoints in CHECKPOINT_DIR on the 360 held-out digits, "
                    "each new one as it appears (or the newest once, with --once), printing the accuracy.",
    )
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="the demo's --logdir")
    parser.add_argument("--logdir", default=None,
                        help=f"where to write the evaluation summaries (default: CHECKPOINT_DIR/{EVAL_SUBDIR})")
    parser.add_argument("--once", action="store_true", help="evaluate the newest checkpoint once and exit")
    parser.add_argument("--eval-interval-secs", type=_float_at_least(0.0, strict=False), default=60.0,
                        help="start evaluations at least this many seconds apart (default: 60)")
    parser.add_argument("--timeout", type=_float_at_least(0.0, strict=False), default=None,
                        help="stop after waiting this many seconds for a new checkpoint (default: wait forever)")
    parser.add_argument("--max-evaluations", type=_int_at_least(1), default=None,
                        help="stop after this many evaluations (default: no limit)")
    parser.add_argument("--threads", type=_int_at_least(1), default=1, help="CPU threads for torch (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="print only the results, no log lines")
    return parser


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``torchslim eval``: evaluates the demo's checkpoints; returns the exit status (1: none found).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = train_demo(d, steps=20, log_every_n_steps=0)
        >>> eval_main([d, '--once', '--quiet'])  # doctest: +ELLIPSIS
        global step 20: held-out accuracy = ...
        0
    """
    args = _eval_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    checkpoint_dir = os.path.abspath(args.checkpoint_dir)
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        print(f"torchslim eval: error: CHECKPOINT_DIR {args.checkpoint_dir!r} is not a directory "
              f"(give the demo's --logdir)", file=sys.stderr)
        return 2
    eval_logdir = os.path.abspath(args.logdir) if args.logdir else os.path.join(checkpoint_dir, EVAL_SUBDIR)
    progress: _progress.ProgressMode = "none" if args.quiet else "auto"
    with _console_logging(verbose=not args.quiet), _torch_threads(args.threads):
        if args.once:
            path = newest_intact_checkpoint(checkpoint_dir)
            if path is None:
                print(f"torchslim eval: error: no checkpoint in {checkpoint_dir}", file=sys.stderr)
                return 1
            evaluate_checkpoint(path, eval_logdir, progress=progress)
            return 0
        with Registry().as_default():
            model = build_model()
            eval_op, names_to_values = make_eval(model)
            printer = _PrintResults()
            data = make_eval_data()
            _evaluation.evaluation_loop(
                checkpoint_dir, eval_logdir, num_evals=len(data), eval_op=eval_op, final_op=names_to_values,
                data=data, variables_to_restore=model, hooks=[printer],
                eval_interval_secs=args.eval_interval_secs, timeout=args.timeout,
                max_number_of_evaluations=args.max_evaluations, progress=progress,
            )
        if not printer.results:
            print(f"torchslim eval: error: no checkpoint appeared in {checkpoint_dir}", file=sys.stderr)
            return 1
    return 0
