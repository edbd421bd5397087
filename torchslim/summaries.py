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
only place values are read: it copies them to the CPU on the caller's thread
(the cheap part) and hands them to a background thread, which passes them to
a helper process (one per training process) that builds the histograms and
PNG images and writes the event file with TensorBoard's writer, away from the
training process's GIL. ``SummaryWriter(..., asynchronous=False)`` does all of
it on the calling thread instead.

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
import dataclasses
import itertools
import logging
import math
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
import types
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from torchslim.collections import GraphKeys, add_to_collection, get_collection

__all__ = [
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
    "trace_step",
]

logger = logging.getLogger("torchslim")

ZERO_FRACTION_POSTFIX = "Fraction_of_Zero_Values"
MAX_IMAGE_OUTPUTS = 3  # TF's summary.image default, which TF-Slim keeps
_IMAGE_CHANNELS = (1, 3, 4)
_KINDS = ("scalar", "histogram", "image")
_REDUCTIONS = (None, "zero_fraction", "norm")


# ----------------------------------------------------------------- records
@dataclasses.dataclass(eq=False, slots=True)  # not frozen: a frozen init costs microseconds per step
class SummaryRecord:
    """One summary in ``GraphKeys.SUMMARIES``: what to write, not a value.

    ``kind`` is what is written ('scalar', 'histogram' or 'image');
    ``reduce`` is applied to the tensor when it is read: None, 'zero_fraction'
    (the fraction of elements equal to zero) or 'norm' (the L2 norm of all
    elements). ``name`` is the tag, so ``get_collection(SUMMARIES, scope=...)``
    filters by tag as TF filters summary ops by name scope.

    Example:
        >>> r = add_scalar_summary(torch.tensor(3.0), 'my_score', prefix='eval')
        >>> (r.tag, r.kind)
        ('eval/my_score', 'scalar')
    """

    tag: str
    kind: str
    tensor: torch.Tensor
    reduce: str | None = None
    print_summary: bool = False
    data_format: str | None = None  # images only: 'NHWC' or 'NCHW'

    @property
    def name(self) -> str:
        return self.tag


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
    add_to_collection(GraphKeys.SUMMARIES, record)
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
@dataclasses.dataclass
class _Snapshot:
    """CPU copies of the records' values, possibly still in flight from a GPU."""

    items: list[tuple[SummaryRecord, Any]]
    events: list[Any]

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()
        self.events = []


def _to_cpu(t: torch.Tensor, events: dict[torch.device, Any]) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.clone()
    if t.device.type == "cuda":
        dst = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        dst.copy_(t, non_blocking=True)
        if t.device not in events:
            events[t.device] = None  # recorded once, after all copies are queued
        return dst
    return t.to("cpu")


_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}


def _snapshot(records: Sequence[Any]) -> _Snapshot:
    """Reads the records now on the caller's thread; no host-device sync."""
    events: dict[torch.device, Any] = {}
    items: list[tuple[SummaryRecord, Any]] = []
    for i, record in enumerate(records):
        if type(record) is not SummaryRecord and not isinstance(record, SummaryRecord):
            raise ValueError(
                f"records: item {i} must be a SummaryRecord (made by slim.summaries.add_*_summary), "
                f"got {type(record).__name__} {record!r:.80}"
            )
        t = record.tensor  # detached here, at write time, not on every step it is recorded
        if t.requires_grad:
            t = t.detach()
        reduce = record.reduce
        on_cpu = t.device.type == "cpu"
        if reduce is None:
            if record.kind == "image":
                t = t[:MAX_IMAGE_OUTPUTS]
            if t.dtype not in _NUMPY_DTYPES:
                t = t.float()  # bfloat16, float8, unsigned: numpy has no twin
            if not on_cpu:
                value: Any = _to_cpu(t, events)
            elif record.kind == "scalar":
                value = float(t.item())
            else:
                value = t.numpy().copy()
        elif reduce == "zero_fraction":
            nonzero = torch.count_nonzero(t)
            value = (int(nonzero) if on_cpu else _to_cpu(nonzero, events), t.numel())
        else:  # "norm"
            norm = torch.linalg.vector_norm(t, dtype=torch.float32)
            value = float(norm) if on_cpu else _to_cpu(norm, events)
        items.append((record, value))
    recorded = []
    for device in events:
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record()
            recorded.append(event)
    return _Snapshot(items, recorded)


def _to_uint8_nhwc(images: np.ndarray, data_format: str) -> np.ndarray:
    if data_format == "NCHW":
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        images = np.clip(np.rint(np.nan_to_num(images.astype(np.float32) * 255.0)), 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(images)


def _finalize(snapshot: _Snapshot) -> list[tuple[str, str, Any]]:
    """CPU values -> (tag, kind, value): float, float64 array, uint8 NHWC array.

    numpy only: this runs on the writer thread, and torch's intra-op thread
    pool there would compete with the training thread's."""
    snapshot.wait()
    out: list[tuple[str, str, Any]] = []
    for record, value in snapshot.items:
        if record.reduce == "zero_fraction":
            nonzero, numel = value
            v: Any = (numel - int(nonzero)) / numel
        elif record.kind == "scalar":
            v = value if isinstance(value, float) else float(value.item())
        elif record.kind == "histogram":
            v = (value if isinstance(value, np.ndarray) else value.numpy()).reshape(-1)
        elif record.kind == "image":
            v = _to_uint8_nhwc(value if isinstance(value, np.ndarray) else value.numpy(), record.data_format or "NHWC")
        else:  # pragma: no cover - SummaryRecord kinds are made here
            raise ValueError(f"unknown summary kind {record.kind!r} for tag {record.tag!r}")
        out.append((record.tag, record.kind, v))
    return out


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
    return _finalize(_snapshot(list(records)))


# -------------------------------------------------------------- encoding
def _png(image: np.ndarray) -> bytes:
    """Encodes one uint8 HxWxC (C in 1, 3, 4) image as PNG (no PIL needed)."""
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 on each row
    raw[:, 1:] = image.reshape(height, width * channels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b"")


def _image_tags(tag: str, n: int) -> list[str]:
    # TF's image summary: 'tag/image' when max_outputs is 1, else 'tag/image/<i>'.
    if MAX_IMAGE_OUTPUTS == 1:
        return [tag + "/image"]
    return [f"{tag}/image/{i}" for i in range(n)]


def _tf_bucket_limits() -> torch.Tensor:
    """TensorFlow's default histogram bucket limits (histogram.cc): +-1e-12 * 1.1**k, 0, +-DBL_MAX."""
    v, pos = 1e-12, []
    while v < 1e20:
        pos.append(v)
        v *= 1.1
    big = float(np.finfo(np.float64).max)
    return torch.tensor([-big] + [-x for x in reversed(pos)] + [0.0] + pos + [big], dtype=torch.float64)


_LIMITS = _tf_bucket_limits().numpy()


def _histogram_proto(tag: str, values: np.ndarray) -> Any:
    """A HistogramProto as TensorFlow encodes one: value v falls in the bucket
    whose right limit is the first limit > v; runs of empty buckets inside
    the range collapse into one. Sorting first makes counting a search of
    the few hundred limits in range among the values, not the reverse."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    v = np.sort(values.reshape(-1).astype(np.float64, copy=False))
    lo, hi = float(v[0]), float(v[-1])
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN sorts last, infinities at the ends
        raise ValueError(f"histogram summary {tag!r}: the tensor holds NaN or infinite values")
    first, last = np.searchsorted(_LIMITS, [lo, hi], side="right")
    last = min(int(last), len(_LIMITS) - 1)
    below = np.searchsorted(v, _LIMITS[first:last], side="left")  # values < each inner limit
    counts = np.diff(np.concatenate(([0], below, [v.size])))
    limits = _LIMITS[first : last + 1]
    nonzero = counts > 0
    keep = nonzero.copy()
    keep[:-1] |= nonzero[1:]  # of a run of empty buckets, the last one
    return HistogramProto(
        min=lo,
        max=hi,
        num=int(v.size),
        sum=float(v.sum()),
        sum_squares=float(v.dot(v)),
        bucket_limit=limits[keep].tolist(),
        bucket=counts[keep].astype(np.float64).tolist(),
    )


def _summary_values(tag: str, kind: str, value: Any) -> list[Any]:
    """The Summary.Value protos for one finalized value."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    if kind == "scalar":
        return [Summary.Value(tag=tag, simple_value=value)]
    if kind == "histogram":
        return [Summary.Value(tag=tag, histo=_histogram_proto(tag, value))]
    out = []
    for image_tag, image in zip(_image_tags(tag, len(value)), value):
        h, w, c = image.shape
        img = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=_png(image))
        out.append(Summary.Value(tag=image_tag, image=img))
    return out


def _print_value(tag: str, kind: str, value: Any) -> None:
    if kind == "image":
        logger.info("%s: uint8 images of shape %s, min %d, max %d", tag, list(value.shape), value.min(), value.max())
    else:
        logger.info("%s: %s", tag, value)


# TensorBoard's event files checksum every record with CRC-32C, which the
# tensorboard package computes in pure Python (about 0.1 us a byte, holding
# the GIL the training thread needs). The same checksum, vectorised with numpy:
# CRC is linear, so a block's contribution is the XOR of per-(position, byte)
# table entries, and blocks chain through a fixed linear map.
_CRC_BLOCK = 256


def _crc_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    poly = 0x82F63B78
    table = np.zeros(256, dtype=np.uint32)
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[b] = c

    def step(c: np.ndarray) -> np.ndarray:  # one zero byte through the register
        return table[c & 0xFF] ^ (c >> np.uint32(8))

    per_position = np.empty((_CRC_BLOCK, 256), dtype=np.uint32)  # [k, b]: byte b followed by k bytes
    per_position[0] = table
    for k in range(1, _CRC_BLOCK):
        per_position[k] = step(per_position[k - 1])
    # The register after k zero bytes from the initial 0xFFFFFFFF, k < _CRC_BLOCK.
    init = np.empty(_CRC_BLOCK + 1, dtype=np.uint32)
    init[0] = 0xFFFFFFFF
    for k in range(1, _CRC_BLOCK + 1):
        init[k] = step(init[k - 1 : k])[0]
    # Advancing a register by one whole block: linear, so four 256-entry tables.
    shift = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]).astype(np.uint32)
    for _ in range(_CRC_BLOCK):
        shift = step(shift)
    return table, per_position, init, shift


_CRC: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as tensorboard's pure-Python ``crc32c``."""
    global _CRC
    if _CRC is None:
        _CRC = _crc_tables()
    _, per_position, init, shift = _CRC
    buf = np.frombuffer(data, dtype=np.uint8)
    head = len(buf) % _CRC_BLOCK
    # The first `head` bytes start from the initial register.
    reg = int(init[head])
    if head:
        reg ^= int(np.bitwise_xor.reduce(per_position[np.arange(head - 1, -1, -1), buf[:head]]))
    if len(buf) > head:
        blocks = buf[head:].reshape(-1, _CRC_BLOCK)
        rows = np.arange(_CRC_BLOCK - 1, -1, -1)
        contrib = np.bitwise_xor.reduce(per_position[rows[None, :], blocks], axis=1)
        s0, s1, s2, s3 = shift
        for c in contrib.tolist():
            reg = int(s0[reg & 0xFF] ^ s1[(reg >> 8) & 0xFF] ^ s2[(reg >> 16) & 0xFF] ^ s3[reg >> 24]) ^ c
    return reg ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    x = _crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _fast_record_write(self: Any, data: bytes) -> None:
    # Byte for byte what tensorboard's RecordWriter.write writes.
    header = struct.pack("<Q", len(data))
    self._writer.write(
        header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data))
    )


def _use_fast_crc(torch_writer: Any) -> bool:
    """Gives this writer's tensorboard RecordWriter the numpy checksum (this writer only)."""
    try:
        record_writer = torch_writer.file_writer.event_writer._async_writer._writer
        record_writer._writer  # noqa: B018 - the attribute _fast_record_write uses
    except AttributeError:  # another tensorboard layout: keep its own checksum
        return False
    record_writer.write = types.MethodType(_fast_record_write, record_writer)
    return True


# ------------------------------------------------------------ event files
_Batch = list  # [(step, walltime, [(tag, kind, finalized value), ...]), ...]


class _EventSink:
    """One event file, written with torch.utils.tensorboard's writer: one event per step."""

    def __init__(self, logdir: str, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter as _TorchWriter

        self._writer = _TorchWriter(log_dir=logdir, purge_step=purge_step, max_queue=100, flush_secs=30)
        _use_fast_crc(self._writer)

    def write(self, batch: _Batch) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        by_step: dict[int, tuple[float, list[Any]]] = {}
        for step, walltime, values in batch:
            out = by_step.setdefault(step, (walltime, []))[1]
            for tag, kind, value in values:
                out.extend(_summary_values(tag, kind, value))
        file_writer = self._writer._get_file_writer()
        for step, (walltime, out) in by_step.items():
            if out:
                file_writer.add_summary(Summary(value=out), step, walltime)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# ------------------------------------------------------------ worker process
# Building histograms, encoding PNGs, serialising and checksumming events is
# Python-level work; on the training process's writer thread it holds the GIL
# the training thread needs between its own kernels (a tiny model's step is a
# fraction of a millisecond, so a few hundred microseconds of writing every ten
# steps cost it a third of its speed). Asynchronous writers therefore hand the
# finalised CPU values to one helper process per training process, which
# writes the event files with the same _EventSink. If that process cannot be
# started, the writer thread writes them itself.
_WORKER_BOOT = "from torchslim.summaries import _worker_main; _worker_main()"


def _send_msg(stream: Any, msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _recv_msg(stream: Any) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (n,) = struct.unpack("<Q", header)
    data = stream.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _portable_error(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _worker_main() -> None:
    """The helper process: reads (op, writer id, ...) messages on stdin until EOF."""
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the replies
    sinks: dict[int, _EventSink] = {}
    while (msg := _recv_msg(inp)) is not None:
        op, wid = msg[0], msg[1]
        error: BaseException | None = None
        try:
            if op == "open":
                sinks[wid] = _EventSink(msg[2], msg[3])
            elif op == "write":
                sinks[wid].write(msg[2])
            elif op == "flush":
                sinks[wid].flush()
            elif op == "close":
                sinks.pop(wid).close()
        except Exception as e:
            error = _portable_error(e)
        if op in ("flush", "close"):
            _send_msg(out, ("ack", msg[2], error))
        elif error is not None:
            _send_msg(out, ("error", wid, error))
    for sink in sinks.values():  # the training process ended without closing: keep what it wrote
        sink.close()


class _Worker:
    """The parent side of the helper process: a send lock, a reader thread for replies."""

    _instance: _Worker | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> _Worker | None:
        with cls._instance_lock:
            worker = cls._instance
            if worker is None or not worker.alive or worker.owner != os.getpid():
                try:
                    worker = cls._instance = cls()
                except OSError as e:
                    logger.warning("could not start the summary writer process (%s); writing on a thread", e)
                    cls._instance = None
                    return None
            return worker

    def __init__(self) -> None:
        import torchslim

        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(torchslim.__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.owner = os.getpid()
        self.alive = True
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._waiting: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._writers: dict[int, Any] = {}  # writer id -> error callback
        self._reader = threading.Thread(target=self._read, name="torchslim-summary-worker-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while (msg := _recv_msg(self.proc.stdout)) is not None:
            if msg[0] == "ack":
                with self._lock:
                    event, box = self._waiting.pop(msg[1])
                box.append(msg[2])
                event.set()
            else:
                with self._lock:
                    callback = self._writers.get(msg[1])
                if callback is not None:
                    callback(msg[2])
        code = self.proc.wait()
        gone = RuntimeError(f"the summary writer process exited with code {code}")
        with self._lock:
            self.alive = False
            waiting, self._waiting = self._waiting, {}
            writers = list(self._writers.values())
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        for event, box in waiting.values():
            box.append(gone)
            event.set()
        for callback in writers:
            callback(gone)

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._lock:
            if not self.alive:
                raise RuntimeError("the summary writer process is not running")
            try:
                _send_msg(self.proc.stdin, msg)
            except (BrokenPipeError, OSError) as e:
                raise RuntimeError(f"the summary writer process is not running ({e})") from e

    def request(self, op: str, wid: int) -> BaseException | None:
        """Sends ``op`` for writer ``wid`` and waits for the reply; returns its error, if any."""
        event, box = threading.Event(), []
        with self._lock:
            token = next(self._tokens)
            self._waiting[token] = (event, box)
        try:
            self.send((op, wid, token))
        except RuntimeError as e:
            with self._lock:
                self._waiting.pop(token, None)
            return e
        event.wait()
        return box[0]

    def register(self, wid: int, callback: Any) -> None:
        with self._lock:
            self._writers[wid] = callback

    def unregister(self, wid: int) -> None:
        with self._lock:
            self._writers.pop(wid, None)


# ----------------------------------------------------------------- writer
class SummaryWriterError(RuntimeError):
    """Raised at the next call when the writer's background thread failed."""


_CLOSE = object()
_PENDING_SECS = 2.0  # add_scalar values wait at most this long for a write() to travel with
_writer_ids = itertools.count(1)


class SummaryWriter:
    """Writes summaries for TensorBoard into ``logdir`` (the train()/evaluation bridge).

    Built on ``torch.utils.tensorboard.SummaryWriter``. :meth:`write` reads
    the summary records on the caller's thread (detached CPU copies; from a
    GPU the copies are queued without waiting for them) and a background
    thread hands the values to a helper process that computes histograms,
    encodes images and writes the event file (off the training process's
    GIL): one event per step holding all of that step's values, as TF's
    merged summary does. An error there is raised at the next call; pass
    ``asynchronous=False`` to do everything on the calling thread when
    debugging.

    ``purge_step``: a run resumed from a checkpoint taken at step ``S`` passes
    ``S + 1``; TensorBoard then drops the events the previous run wrote at
    steps ``>= S + 1``, so no step is shown twice or rewound.

    Example:
        >>> import tempfile
        >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
        ...     writer.add_scalar('learning_rate', 0.1, step=1)
        ...     _ = add_scalar_summary(torch.tensor(0.5), 'loss')
        ...     writer.write(step=1)
    """

    def __init__(
        self, logdir: str | os.PathLike, purge_step: int | None = None, asynchronous: bool = True, max_pending: int = 8
    ) -> None:
        if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
            raise ValueError(f"SummaryWriter: argument 'logdir' must be a non-empty path, got {logdir!r}")
        if purge_step is not None and (isinstance(purge_step, bool) or not isinstance(purge_step, int) or purge_step < 0):
            raise ValueError(f"SummaryWriter: argument 'purge_step' must be None or an int >= 0, got {purge_step!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"SummaryWriter: argument 'max_pending' must be an int >= 1, got {max_pending!r}")
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)  # a bad path fails here, on the caller's thread
        self.asynchronous = bool(asynchronous)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        # add_scalar values not yet handed over: (step, walltime, snapshot or values), sent with the next write.
        self._pending: list[tuple[int, float, Any]] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._worker: _Worker | None = None
        self._sink: _EventSink | None = None
        self._wid = next(_writer_ids)
        if self.asynchronous:
            self._worker = _Worker.get()
        if self._worker is not None:
            self._worker.register(self._wid, self._worker_failed)
            try:
                self._worker.send(("open", self._wid, self.logdir, purge_step))
            except RuntimeError:
                self._worker.unregister(self._wid)
                self._worker = None
        if self._worker is None:
            self._sink = _EventSink(self.logdir, purge_step)
        if self.asynchronous:
            self._thread = threading.Thread(target=self._run, name="torchslim-summary-writer", daemon=True)
            self._thread.start()

    # -- background side
    def _worker_failed(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _CLOSE:
                    self._finish()
                    return
                if self._error is None:
                    self._process(item)
                elif isinstance(item, threading.Event):
                    item.set()
            except BaseException as e:
                self._error = e
                if isinstance(item, threading.Event):
                    item.set()
            finally:
                self._queue.task_done()

    def _process(self, item: Any) -> None:
        if isinstance(item, threading.Event):  # a flush marker
            try:
                if self._worker is not None:
                    error = self._worker.request("flush", self._wid)
                    if error is not None:
                        raise error
                elif self._sink is not None:
                    self._sink.flush()
            finally:
                item.set()
            return
        batch: _Batch = []
        prints: list[tuple[str, str, Any]] = []
        for step, walltime, payload in item:
            if isinstance(payload, _Snapshot):
                printed = {r.tag for r, _ in payload.items if r.print_summary}
                values = _finalize(payload)
                prints.extend(v for v in values if v[0] in printed)
            else:  # add_scalar's values, final already
                values = payload
            batch.append((step, walltime, values))
        if self._worker is not None:
            self._worker.send(("write", self._wid, batch))
        elif self._sink is not None:
            self._sink.write(batch)
        for tag, kind, value in prints:
            _print_value(tag, kind, value)

    def _finish(self) -> None:
        """Closes the event file (worker or local); errors land in self._error."""
        try:
            if self._worker is not None:
                error = self._worker.request("close", self._wid)
                self._worker.unregister(self._wid)
                if error is not None and self._error is None:
                    self._error = error
            elif self._sink is not None:
                self._sink.close()
        except BaseException as e:
            if self._error is None:
                self._error = e

    # -- caller side
    def _raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise SummaryWriterError(
                f"writing summaries to {self.logdir!r} failed in the background: "
                f"{type(error).__name__}: {error}. Pass asynchronous=False to SummaryWriter to "
                f"run the writing on the calling thread and debug it"
            ) from error

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise ValueError(f"SummaryWriter.{method}: the writer for {self.logdir!r} is closed")

    def _submit(self, item: Any) -> None:
        if self._thread is None:
            self._process(item)
        elif self._worker is not None and self._direct(item):
            # With the helper process, CPU values go straight down its pipe from this thread: the
            # pickling is C code, and skipping the hop to the writer thread spares the training
            # thread a GIL hand-off per write. Only when nothing is queued, so order is kept.
            try:
                self._process(item)
            except BaseException as e:
                self._error = e
                self._raise_pending()
        else:
            self._queue.put(item)

    def _direct(self, item: Any) -> bool:
        if not isinstance(item, list) or self._queue.unfinished_tasks:
            return False  # flush markers go through the thread, which waits for the helper's reply
        for _, _, payload in item:
            if isinstance(payload, _Snapshot) and (payload.events or any(r.print_summary for r, _ in payload.items)):
                return False
        return True

    def _take_pending(self) -> list[tuple[int, float, Any]]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    @staticmethod
    def _check_step(method: str, step: Any) -> int:
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step.item())
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"SummaryWriter.{method}: argument 'step' must be an int >= 0, got {step!r}")
        return int(step)

    def write(self, step: int, records: Sequence[SummaryRecord] | None = None) -> None:
        """Writes ``records`` (default: ``get_collection(SUMMARIES)``) at ``step``.

        Values are read now, on this thread; the rest happens in the
        background (or here when ``asynchronous=False``).

        Example:
            >>> import tempfile
            >>> w = SummaryWriter(tempfile.mkdtemp())
            >>> net = torch.nn.Linear(4, 2)
            >>> _ = add_histogram_summaries(net, prefix='weights')
            >>> w.write(step=10); w.close()
        """
        self._raise_pending()
        self._check_open("write")
        step = self._check_step("write", step)
        if records is None:
            records = get_collection(GraphKeys.SUMMARIES)
        elif not isinstance(records, (list, tuple)) and (isinstance(records, SummaryRecord) or not isinstance(records, Iterable)):
            raise ValueError(
                f"SummaryWriter.write: argument 'records' must be a list of SummaryRecord or None, "
                f"got {type(records).__name__}"
            )
        snapshot = _snapshot(list(records))
        item = self._take_pending()
        if snapshot.items:
            item.append((step, time.time(), snapshot))
        if item:
            self._submit(item)

    def add_scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        """Writes one scalar ``value`` (a number or a one-element tensor) under ``tag``.

        The value travels with the next :meth:`write` (or :meth:`flush`,
        :meth:`close`, or after two seconds), so a step's scalars and
        summaries land in one event.

        Example:
            >>> import tempfile
            >>> with SummaryWriter(tempfile.mkdtemp()) as w:
            ...     w.add_scalar('global_step/sec', 12.5, step=100)
        """
        self._raise_pending()
        self._check_open("add_scalar")
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"SummaryWriter.add_scalar: argument 'tag' must be a non-empty string, got {tag!r}")
        step = self._check_step("add_scalar", step)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex():
                raise ValueError(
                    f"SummaryWriter.add_scalar: argument 'value' must hold one real value, got shape "
                    f"{tuple(value.shape)} and dtype {value.dtype}"
                )
            if value.device.type == "cpu":  # reading it costs nothing
                payload: Any = [(tag, "scalar", float(value.item()))]
            else:  # queue the copy; the writer thread waits for it
                payload = _snapshot([SummaryRecord(tag, "scalar", value.detach())])
        elif isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(
                f"SummaryWriter.add_scalar: argument 'value' must be a number or a one-element tensor, "
                f"got {type(value).__name__} {value!r:.80}"
            )
        else:
            payload = [(tag, "scalar", float(value))]
        now = time.time()
        with self._lock:
            self._pending.append((step, now, payload))
            overdue = now - self._pending[0][1] > _PENDING_SECS
        if overdue:
            self._submit(self._take_pending())

    def flush(self) -> None:
        """Waits until everything written so far is on disk (readable by TensorBoard).

        Example:
            >>> import tempfile
            >>> w = SummaryWriter(tempfile.mkdtemp()); w.flush(); w.close()
        """
        self._raise_pending()
        self._check_open("flush")
        pending = self._take_pending()
        if pending:
            self._submit(pending)
        marker = threading.Event()
        self._submit(marker)
        marker.wait()
        self._raise_pending()

    def close(self) -> None:
        """Writes what is pending, closes the event file and stops the background thread.

        Idempotent. Raises :class:`SummaryWriterError` if the background
        writing failed since the last call.

        Example:
            >>> import tempfile
            >>> w = SummaryWriter(tempfile.mkdtemp()); w.close(); w.close()
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            pending = self._take_pending()
            if pending:
                self._submit(pending)
        finally:
            if self._thread is not None:
                self._queue.put(_CLOSE)
                self._thread.join()
            else:
                self._finish()
        self._raise_pending()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not hide the error already on its way out
            self.close()
        except SummaryWriterError as e:
            logger.error("%s", e)

    def __repr__(self) -> str:
        return f"SummaryWriter({self.logdir!r}, asynchronous={self.asynchronous})"


# ---------------------------------------------------------------- tracing
def trace_file(logdir: str | os.PathLike, step: int) -> str:
    """The Chrome trace file :func:`trace_step` writes for ``step``.

    Example:
        >>> trace_file('/tmp/logdir', 120)
        '/tmp/logdir/trace-step-000120.json'
    """
    return os.path.join(os.fspath(logdir), f"trace-step-{int(step):06d}.json")


@contextlib.contextmanager
def trace_step(logdir: str | os.PathLike, step: int) -> Iterator[str]:
    """Profiles the enclosed code with ``torch.profiler`` and writes a Chrome
    trace (Perfetto, chrome://tracing) to ``logdir/trace-step-<step>.json``.

    This is ``train(trace_every_n_steps=...)``'s tracer, TF-Slim's
    ``FULL_TRACE`` timeline. CUDA activity is traced too when CUDA is
    available. The file appears atomically when the block ends; yields its path.

    Example:
        >>> import tempfile
        >>> with trace_step(tempfile.mkdtemp(), step=3) as path:
        ...     _ = torch.ones(4, 4) @ torch.ones(4, 4)
        >>> os.path.basename(path)
        'trace-step-000003.json'
    """
    if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
        raise ValueError(f"trace_step: argument 'logdir' must be a non-empty path, got {logdir!r}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"trace_step: argument 'step' must be an int >= 0, got {step!r}")
    from torch.profiler import ProfilerActivity, profile

    path = trace_file(logdir, int(step))
    os.makedirs(os.fspath(logdir), exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield path
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        prof.export_chrome_trace(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("Wrote trace of step %d to %s", step, path)
