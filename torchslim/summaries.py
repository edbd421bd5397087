"""Summaries: TF-Slim's summary helpers, written with TensorBoard's own writer.

    import torchslim as slim

    # At set-up: watch live tensors; each write reads their current value.
    slim.summaries.add_histogram_summaries(model)              # every parameter
    slim.summaries.add_zero_fraction_summaries(model.named_parameters(), prefix='sparsity')

    def total_loss(batch):                  # runs inside each train step's step_scope()
        logits = model(batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        slim.summaries.add_scalar_summary(loss, 'losses/cross_entropy')   # this step's value
        return loss

    # What train() does when summaries are due (any code can do the same):
    with slim.summaries.SummaryWriter('/tmp/logdir') as writer:
        with slim.collections.step_scope():
            loss = total_loss(batch)
            writer.write(step=1)            # snapshot now, histograms/PNGs/disk in a thread

Recording a summary only appends a small :class:`SummaryRecord` (tag, kind,
the detached tensor) to ``GraphKeys.SUMMARIES``: no ``.item()``, no device
synchronisation, no copy. A record added outside a step persists and holds
the tensor itself, so a parameter's histogram follows its training; a record
added inside a :func:`~torchslim.collections.step_scope` vanishes with the
step, so it records that step's value. :meth:`SummaryWriter.write` is the
only place values are read: it copies them on the caller's thread (the cheap
part) and hands them to a writer thread, which builds the histograms (torch
ops, which release the GIL) and PNG images and appends the event file; see
:mod:`torchslim.summary_writer` for that machinery, its measured costs and
its time bounds. ``SummaryWriter(..., asynchronous=False)`` does all of it
on the calling thread instead. :func:`trace_step` writes the
``trace_every_n_steps`` traces where TensorBoard's profiler plugin reads them.

Tags are composed as TF-Slim composes them: ``prefix + '/' + name``, and
``.../Fraction_of_Zero_Values`` for zero fractions; an image summary writes up
to three images tagged ``name/image/0``, ``name/image/1``, ``name/image/2``
as TF's image summary does. A tensor given without a name is looked up among
the parameters and buffers of the ``nn.Module`` entries of
``GraphKeys.MODEL_VARIABLES`` (its qualified name, e.g. ``'fc1.weight'``);
the plural forms also take ``(name, tensor)`` pairs, a ``{name: tensor}``
mapping or an ``nn.Module``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from torchslim import collections as _collections
from torchslim.collections import GraphKeys, get_collection
from torchslim.summary_writer import (
    DEFAULT_TIMEOUT,
    MAX_IMAGE_OUTPUTS,
    SummaryRecord,
    SummaryWriter,
    SummaryWriterError,
    read_values,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_IMAGE_OUTPUTS",
    "SummaryRecord",
    "SummaryWriter",
    "SummaryWriterError",
    "add_gradient_summaries",
    "add_histogram_summaries",
    "add_histogram_summary",
    "add_image_summaries",
    "add_image_summary",
    "add_scalar_summaries",
    "add_scalar_summary",
    "add_zero_fraction_summaries",
    "add_zero_fraction_summary",
    "evaluate_summaries",
    "trace_file",
    "trace_step",
]
# SummaryWriter, SummaryWriterError, SummaryRecord and the constants live in torchslim.summary_writer.

logger = logging.getLogger("torchslim")

ZERO_FRACTION_POSTFIX = "Fraction_of_Zero_Values"
_IMAGE_CHANNELS = (1, 3, 4)


def _check_tensor(fn: str, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(
            f"{fn}: argument 'tensor' must be a torch.Tensor, got {type(tensor).__name__} {tensor!r:.80}"
        )
    if tensor.is_complex():
        raise ValueError(f"{fn}: argument 'tensor' must be real, got dtype {tensor.dtype}")
    return tensor


def _check_optional_str(fn: str, arg: str, value: Any, allow_empty: bool) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{fn}: argument '{arg}' must be a string or None, got {type(value).__name__} {value!r:.80}")
    if not value and not allow_empty:
        raise ValueError(f"{fn}: argument '{arg}' must be a non-empty string or None, got ''")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    # p.data / p.detach() are new tensor objects over the same memory.
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.numel() > 0
        and a.data_ptr() == b.data_ptr()
    )


def _lookup_name(tensor: torch.Tensor) -> str | None:
    """The qualified name of ``tensor`` in a model registered in MODEL_VARIABLES."""
    for entry in get_collection(GraphKeys.MODEL_VARIABLES):
        if isinstance(entry, torch.nn.Module):
            for qualified, p in entry.named_parameters():
                if _same_tensor(p, tensor):
                    return qualified
            for qualified, b in entry.named_buffers():
                if _same_tensor(b, tensor):
                    return qualified
        elif (
            isinstance(entry, tuple)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], torch.Tensor)
            and _same_tensor(entry[1], tensor)
        ):
            return entry[0]
    return None


def _summary_name(fn: str, tensor: torch.Tensor, name: str | None, prefix: str | None, postfix: str | None = None) -> str:
    """TF-Slim's composition: [prefix/]name[/postfix]; the name defaults to the parameter's."""
    _check_optional_str(fn, "name", name, allow_empty=False)
    _check_optional_str(fn, "prefix", prefix, allow_empty=True)
    if name is None:
        name = _lookup_name(tensor)
        if name is None:
            raise ValueError(
                f"{fn}: argument 'name' is required for this tensor (shape {tuple(tensor.shape)}, "
                f"dtype {tensor.dtype}): it is not a parameter or buffer of any nn.Module in "
                f"GraphKeys.MODEL_VARIABLES. Pass name='...', or give the plural form (name, tensor) "
                f"pairs, a {{name: tensor}} dict or the nn.Module itself"
            )
    if prefix:
        name = prefix + "/" + name
    if postfix:
        name = name + "/" + postfix
    return name


def _record(record: SummaryRecord) -> SummaryRecord:
    _collections._append(GraphKeys.SUMMARIES, record)
    return record


def add_scalar_summary(
    tensor: torch.Tensor, name: str | None = None, prefix: str | None = None, print_summary: bool = False
) -> SummaryRecord:
    """Adds a scalar summary of ``tensor`` (one element) to ``GraphKeys.SUMMARIES``.

    Tag: ``prefix/name``. With ``print_summary=True`` the value is also logged
    (logger 'torchslim', level INFO) each time it is written.

    Example:
        >>> r = add_scalar_summary(torch.ones([]) * 3, 'my_score', 'eval')
        >>> r.tag, r in get_collection(GraphKeys.SUMMARIES)
        ('eval/my_score', True)
    """
    # The call a loss makes on every step, checked inline: in the loop, with the caches holding the step's
    # own work, each Python call costs about three times what it costs in a tight loop; through the checks
    # below (eleven calls) it took 4.0 us a step there, this way 3.4 (summaries benchmark, 2-core VM).
    if (
        type(name) is str and name and (prefix is None or type(prefix) is str) and isinstance(tensor, torch.Tensor)
        and tensor.numel() == 1 and not tensor.is_complex()
    ):
        return _record(SummaryRecord(prefix + "/" + name if prefix else name, "scalar", tensor, print_summary=bool(print_summary)))
    fn = "add_scalar_summary"
    tensor = _check_tensor(fn, tensor)
    if tensor.numel() != 1:
        raise ValueError(
            f"{fn}: argument 'tensor' must hold exactly one value (a 0-d tensor), got shape {tuple(tensor.shape)}"
        )
    tag = _summary_name(fn, tensor, name, prefix)
    return _record(SummaryRecord(tag, "scalar", tensor, print_summary=bool(print_summary)))


def add_histogram_summary(tensor: torch.Tensor, name: str | None = None, prefix: str | None = None) -> SummaryRecord:
    """Adds a histogram summary of ``tensor`` (any shape, at least one element).

    The histogram uses TensorFlow's exponential buckets, so TensorBoard's
    Histograms and Distributions tabs show it as they show a TF-Slim one.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> add_histogram_summary(net.weight, 'fc/weight').tag
        'fc/weight'
    """
    fn = "add_histogram_summary"
    tensor = _check_tensor(fn, tensor)
    if tensor.numel() == 0:
        raise ValueError(f"{fn}: argument 'tensor' has no element (shape {tuple(tensor.shape)}); a histogram needs one")
    tag = _summary_name(fn, tensor, name, prefix)
    return _record(SummaryRecord(tag, "histogram", tensor))


def _image_format(fn: str, tensor: torch.Tensor, data_format: str | None) -> str:
    if tensor.dim() != 4:
        raise ValueError(
            f"{fn}: argument 'tensor' must be a batch of images of rank 4 (NHWC or NCHW), "
            f"got rank {tensor.dim()} with shape {tuple(tensor.shape)}"
        )
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"{fn}: argument 'tensor' must be uint8 or floating point in [0, 1], got dtype {tensor.dtype}")
    shape = tuple(tensor.shape)
    if data_format is not None:
        if data_format not in ("NHWC", "NCHW"):
            raise ValueError(f"{fn}: argument 'data_format' must be 'NHWC', 'NCHW' or None, got {data_format!r}")
        channels = shape[3] if data_format == "NHWC" else shape[1]
        if channels not in _IMAGE_CHANNELS:
            raise ValueError(
                f"{fn}: argument 'tensor' has {channels} channels in {data_format} shape {shape}; expected 1, 3 or 4"
            )
        return data_format
    nhwc, nchw = shape[3] in _IMAGE_CHANNELS, shape[1] in _IMAGE_CHANNELS
    if nhwc and nchw:
        raise ValueError(
            f"{fn}: argument 'tensor' of shape {shape} could be NHWC or NCHW; pass data_format='NHWC' or 'NCHW'"
        )
    if nhwc:
        return "NHWC"
    if nchw:
        return "NCHW"
    raise ValueError(
        f"{fn}: argument 'tensor' of shape {shape} has no channel dimension of size 1, 3 or 4 "
        f"(last dimension for NHWC, second for NCHW)"
    )


def add_image_summary(
    tensor: torch.Tensor,
    name: str | None = None,
    prefix: str | None = None,
    print_summary: bool = False,
    data_format: str | None = None,
) -> SummaryRecord:
    """Adds an image summary of a batch of images to ``GraphKeys.SUMMARIES``.

    ``tensor`` is ``[batch, height, width, channels]`` (TF's layout) or
    ``[batch, channels, height, width]`` (PyTorch's), found from the channel
    count (1, 3 or 4); ``data_format`` ('NHWC' or 'NCHW', a torchslim
    addition) settles shapes that fit both. uint8 values are written as they
    are, floating values are taken to lie in [0, 1] (scaled by 255, values
    outside clipped). As TF does, the first three images are written, tagged
    ``prefix/name/image/0`` ... ``/image/2``.

    Example:
        >>> add_image_summary(torch.rand(2, 3, 8, 8), 'inputs').tag
        'inputs'
    """
    fn = "add_image_summary"
    tensor = _check_tensor(fn, tensor)
    fmt = _image_format(fn, tensor, data_format)
    if tensor.shape[0] == 0:
        raise ValueError(f"{fn}: argument 'tensor' holds no image (shape {tuple(tensor.shape)})")
    tag = _summary_name(fn, tensor, name, prefix)
    return _record(SummaryRecord(tag, "image", tensor, print_summary=bool(print_summary), data_format=fmt))


def add_zero_fraction_summary(
    tensor: torch.Tensor, name: str | None = None, prefix: str | None = None, print_summary: bool = False
) -> SummaryRecord:
    """Adds a scalar summary of the fraction of zero elements of ``tensor``.

    Tag: ``prefix/name/Fraction_of_Zero_Values`` as in TF-Slim. The count is
    made on the tensor's device when summaries are written.

    Example:
        >>> add_zero_fraction_summary(torch.tensor([0.0, 1.0]), 'relu1').tag
        'relu1/Fraction_of_Zero_Values'
    """
    fn = "add_zero_fraction_summary"
    tensor = _check_tensor(fn, tensor)
    if tensor.numel() == 0:
        raise ValueError(f"{fn}: argument 'tensor' has no element (shape {tuple(tensor.shape)})")
    tag = _summary_name(fn, tensor, name, prefix, ZERO_FRACTION_POSTFIX)
    return _record(
        SummaryRecord(tag, "scalar", tensor, reduce="zero_fraction", print_summary=bool(print_summary))
    )


def _named(fn: str, tensors: Any) -> list[tuple[str | None, torch.Tensor]]:
    """Normalises the plural forms' input to (name or None, tensor) pairs."""
    if isinstance(tensors, torch.nn.Module):
        return list(tensors.named_parameters())
    if isinstance(tensors, torch.Tensor):
        raise ValueError(
            f"{fn}: argument 'tensors' must be a list of tensors, (name, tensor) pairs, a dict or an "
            f"nn.Module, got a single tensor of shape {tuple(tensors.shape)}; use the singular form for one tensor"
        )
    if isinstance(tensors, Mapping):
        items: Iterable[Any] = tensors.items()
    elif isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise ValueError(
            f"{fn}: argument 'tensors' must be a list of tensors, (name, tensor) pairs, a dict or an "
            f"nn.Module, got {type(tensors).__name__} {tensors!r:.80}"
        )
    else:
        items = tensors
    out: list[tuple[str | None, torch.Tensor]] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            out.append((None, item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
        else:
            raise ValueError(
                f"{fn}: item {i} of argument 'tensors' must be a tensor or a (name, tensor) pair, "
                f"got {type(item).__name__} {item!r:.80}"
            )
    return out


def add_scalar_summaries(
    tensors: Any, prefix: str | None = None, print_summary: bool = False
) -> list[SummaryRecord]:
    """Adds a scalar summary for each tensor (see :func:`add_scalar_summary`).

    ``tensors``: tensors, ``(name, tensor)`` pairs, a ``{name: tensor}`` dict
    or an ``nn.Module`` (its named parameters).

    Example:
        >>> [r.tag for r in add_scalar_summaries({'a': torch.tensor(1.0)}, prefix='eval')]
        ['eval/a']
    """
    return [
        add_scalar_summary(t, name, prefix, print_summary) for name, t in _named("add_scalar_summaries", tensors)
    ]


def add_histogram_summaries(tensors: Any, prefix: str | None = None) -> list[SummaryRecord]:
    """Adds a histogram summary for each tensor (see :func:`add_histogram_summary`).

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> [r.tag for r in add_histogram_summaries(net)]
        ['weight', 'bias']
    """
    return [add_histogram_summary(t, name, prefix) for name, t in _named("add_histogram_summaries", tensors)]


def add_image_summaries(tensors: Any, prefix: str | None = None) -> list[SummaryRecord]:
    """Adds an image summary for each batch of images (see :func:`add_image_summary`).

    Example:
        >>> [r.tag for r in add_image_summaries([('x', torch.rand(1, 8, 8, 3))], prefix='in')]
        ['in/x']
    """
    return [add_image_summary(t, name, prefix) for name, t in _named("add_image_summaries", tensors)]


def add_zero_fraction_summaries(tensors: Any, prefix: str | None = None) -> list[SummaryRecord]:
    """Adds a zero-fraction summary for each tensor (see :func:`add_zero_fraction_summary`).

    Example:
        >>> [r.tag for r in add_zero_fraction_summaries({'relu': torch.zeros(3)})]
        ['relu/Fraction_of_Zero_Values']
    """
    return [add_zero_fraction_summary(t, name, prefix) for name, t in _named("add_zero_fraction_summaries", tensors)]


def add_gradient_summaries(named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> list[SummaryRecord]:
    """Records, for each ``(name, grad)``, a histogram ``name/gradient`` and a
    scalar ``name/gradient_norm`` (the L2 norm), as TF-Slim's
    ``add_gradients_summaries`` names them. A ``None`` gradient is logged and
    skipped, as TF-Slim does.

    The gradient is read when summaries are written, so call this inside the
    train step and write before the next ``zero_grad`` (``train()`` does).

    Example:
        >>> net = torch.nn.Linear(2, 1); net(torch.ones(1, 2)).sum().backward()
        >>> [r.tag for r in add_gradient_summaries(
        ...     (n, p.grad) for n, p in net.named_parameters())]
        ['weight/gradient', 'weight/gradient_norm', 'bias/gradient', 'bias/gradient_norm']
    """
    fn = "add_gradient_summaries"
    if isinstance(named_grads, (torch.Tensor, str, Mapping)) or not isinstance(named_grads, Iterable):
        raise ValueError(
            f"{fn}: argument 'named_grads' must be an iterable of (name, gradient) pairs, got "
            f"{type(named_grads).__name__}"
        )
    records = []
    for i, item in enumerate(named_grads):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and item[0]):
            raise ValueError(
                f"{fn}: item {i} of argument 'named_grads' must be a (non-empty name, gradient) pair, got {item!r:.80}"
            )
        name, grad = item
        if grad is None:
            logger.info("Var %s has no gradient", name)
            continue
        grad = _check_tensor(fn, grad)
        if grad.is_sparse:
            grad = grad.coalesce().values()
        grad = grad.detach()
        records.append(_record(SummaryRecord(name + "/gradient", "histogram", grad)))
        records.append(_record(SummaryRecord(name + "/gradient_norm", "scalar", grad, reduce="norm")))
    return records


# ------------------------------------------------------------- evaluation
def evaluate_summaries(records: Sequence[SummaryRecord] | None = None) -> list[tuple[str, str, Any]]:
    """Evaluates summary records now: a list of ``(tag, kind, value)``.

    ``records`` defaults to ``get_collection(GraphKeys.SUMMARIES)``. Values:
    a float for scalars, a flat float64 numpy array for histograms, a uint8
    ``[n, height, width, channels]`` numpy array (at most 3 images) for images.

    Example:
        >>> r = add_scalar_summary(torch.tensor(2.5), 'accuracy')
        >>> evaluate_summaries([r])
        [('accuracy', 'scalar', 2.5)]
    """
    if records is None:
        records = get_collection(GraphKeys.SUMMARIES)
    return read_values(list(records))


# ---------------------------------------------------------------- tracing
TRACE_SUBDIR = os.path.join("plugins", "profile")  # where TensorBoard's profiler plugins look


def trace_file(logdir: str | os.PathLike[str], step: int) -> str:
    """The trace :func:`trace_step` writes, in this process, for the step starting at global step ``step``.

    ``logdir/plugins/profile/<host>_<pid>.<step>.pt.trace.json``: the layout
    of ``torch.profiler.tensorboard_trace_handler``, with the step as the
    span, which TensorBoard's PyTorch profiler plugin (``pip install
    torch-tb-profiler``) lists as run ``plugins/profile``, worker
    ``<host>_<pid>``, one span per traced step.

    Example:
        >>> path = trace_file('/tmp/logdir', 120)
        >>> path.startswith('/tmp/logdir/plugins/profile/'), path.endswith('.000000000120.pt.trace.json')
        (True, True)
    """
    worker = f"{socket.gethostname()}_{os.getpid()}"
    return os.path.join(os.fspath(logdir), TRACE_SUBDIR, f"{worker}.{int(step):012d}.pt.trace.json")


@contextlib.contextmanager
def trace_step(logdir: str | os.PathLike[str], step: int) -> Iterator[str]:
    """Profiles the enclosed code with ``torch.profiler`` into :func:`trace_file`.

    This is ``train(trace_every_n_steps=N)``'s tracer, TF-Slim's
    ``FULL_TRACE`` timeline: it traces the steps that start at global step
    0, N, 2N, ... CUDA activity is traced too when CUDA is available. The
    file appears atomically when the block ends; yields its path. Open it
    with ``tensorboard --logdir LOGDIR`` (the PYTORCH_PROFILER tab, from
    ``pip install torch-tb-profiler``), or in Perfetto / chrome://tracing.

    Example:
        >>> import tempfile
        >>> with trace_step(tempfile.mkdtemp(), step=3) as path:
        ...     _ = torch.ones(4, 4) @ torch.ones(4, 4)
        >>> os.path.basename(path).endswith('.000000000003.pt.trace.json')
        True
    """
    if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
        raise ValueError(f"trace_step: argument 'logdir' must be a non-empty path, got {logdir!r}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"trace_step: argument 'step' must be an int >= 0, got {step!r}")
    from torch.profiler import ProfilerActivity, profile

    path = trace_file(logdir, int(step))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield path
    tmp = f"{path}.tmp-{threading.get_ident()}"  # not a *.pt.trace.json name: the plugin skips it
    try:
        prof.export_chrome_trace(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("Wrote the trace of the step from global step %d to %s", step, path)
