"""What a summary is, and how its value is read: :class:`SummaryRecord`, the
copies :meth:`SummaryWriter.write <torchslim.summary_writer.SummaryWriter.write>`
takes on the caller's thread, and the final values the writer thread encodes.

    from torchslim.summary_records import SummaryRecord, read_values

    read_values([SummaryRecord('x', 'scalar', torch.tensor(2.0))])   # [('x', 'scalar', 2.0)]

Copies are taken without a host-device sync: float32 CPU values by one
compiled copy (or one ``torch.cat``) into a buffer the writer hands back (:class:`_FlatBuffers`),
others cloned, a GPU's as queued non-blocking copies to pinned memory with
one CUDA event per device; :func:`_finalize` waits for those events on the
writer thread.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from torchslim.event_file import MAX_IMAGE_OUTPUTS

__all__ = ["SummaryRecord", "read_values"]


@dataclasses.dataclass(eq=False, slots=True)  # not frozen: a frozen init costs microseconds per step
class SummaryRecord:
    """One summary in ``GraphKeys.SUMMARIES``: what to write, not a value.

    ``kind`` is what is written ('scalar', 'histogram' or 'image');
    ``reduce`` is applied to the tensor when it is read: None, 'zero_fraction'
    (the fraction of elements equal to zero) or 'norm' (the L2 norm of all
    elements). ``name`` is the tag, so ``get_collection(SUMMARIES, scope=...)``
    filters by tag as TF filters summary ops by name scope. Made by the
    ``slim.summaries.add_*_summary`` functions.

    Example:
        >>> r = SummaryRecord('eval/my_score', 'scalar', torch.tensor(3.0))
        >>> (r.name, r.kind)
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


_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}


@dataclasses.dataclass(slots=True)
class _Snapshot:
    """Copies of the records' values, possibly still in flight from a GPU.

    ``items`` pairs each record with its copy, or, for the float32 CPU
    tensors (histograms and scalars alike), with a slice of ``flat``: their
    values copied together into it. ``ready`` holds values that
    need no copy: ``(tag, 'scalar', float)``."""

    items: list[tuple[SummaryRecord, Any]]
    events: list[Any]
    flat: torch.Tensor | None = None
    ready: list[tuple[str, str, Any]] = dataclasses.field(default_factory=list)
    pooled: bool = False  # flat came from a _FlatBuffers, to be handed back once written
    nbytes: int = 0  # of the tensor copies, which the writer's queue is bounded by

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
        events.setdefault(t.device, None)  # one event per device, recorded after all copies are queued
        return dst
    return t.to("cpu")


def _record_error(i: int, record: Any) -> ValueError:
    return ValueError(
        f"records: item {i} must be a SummaryRecord (made by slim.summaries.add_*_summary), "
        f"got {type(record).__name__} {record!r:.80}"
    )


_FLOAT32, _STRIDED = torch.float32, torch.strided
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # whose data_ptr() is their values' address

_gather_float32: Callable[[int, int, list[tuple[int, int]]], int] | None
try:  # the compiled copy (torchslim/_histograms.c); where it was not built, torch.cat does the same
    from torchslim._histograms import gather_float32 as _gather_float32
except ImportError:  # pragma: no cover - built wherever a C compiler was found at install time
    _gather_float32 = None


class _FlatBuffers:
    """Buffers for the float32 copies of snapshots, handed back by the writer thread once written.

    Reused rather than allocated: on the summaries benchmark's MLP, malloc
    took 69k instructions of each write's 545k on the training thread
    (callgrind), and the fresh pages of its 38 KB buffer 10 page faults.
    Only small buffers are kept (each at most ``MAX_BYTES``, and as many as
    make ``KEPT_BYTES`` of the size handed back): a big one's copy costs far
    more than its allocation. list.append and list.pop are atomic, so the two threads
    share the list without a lock."""

    MAX_BYTES, KEPT_BYTES = 256 << 10, 8 << 20

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, numel: int) -> torch.Tensor | None:
        try:
            buf = self._free.pop()
        except IndexError:
            return None
        n = buf.numel()
        return buf if n == numel else buf[:numel] if n > numel else None

    def give_back(self, buf: torch.Tensor) -> None:
        nbytes = buf.nbytes
        if 0 < nbytes <= self.MAX_BYTES and len(self._free) < self.KEPT_BYTES // nbytes:
            self._free.append(buf)


def _snapshot(
    records: Sequence[Any], ready: list[tuple[str, str, Any]] | None = None, buffers: _FlatBuffers | None = None
) -> _Snapshot:
    """Copies the records' values now, on the caller's thread; no host-device sync.

    float32 CPU values are copied together into one buffer (from ``buffers``
    when it has one): on the summaries benchmark's write (4 histograms, 2
    scalars) one copy in place of six clones and their allocations."""
    events: dict[torch.device, Any] = {}
    items: list[tuple[SummaryRecord, Any]] = []
    fused: list[torch.Tensor] = []
    sources: list[tuple[int, int]] | None = [] if _gather_float32 is not None else None
    others = []
    offset = 0
    for i, record in enumerate(records):
        if not isinstance(record, SummaryRecord):
            raise _record_error(i, record)
        t = record.tensor
        if record.reduce is None and t.dtype is _FLOAT32 and t.is_cpu and record.kind != "image":
            n = t.numel()
            fused.append(t)
            if sources is not None:
                if type(t) in _PLAIN_TENSORS and t.layout is _STRIDED and t.is_contiguous():  # DTensor & co: torch.cat
                    sources.append((t.data_ptr(), n))
                else:
                    sources = None
            items.append((record, slice(offset, offset + n)))
            offset += n
        else:
            others.append(len(items))
            items.append((record, None))
    nbytes = 4 * offset
    if others:
        # Read under no_grad, not detached one by one: each torch call costs 1-3 us at the end of a step.
        with torch.no_grad():
            for j in others:
                record = items[j][0]
                value = _copy(record, events)
                items[j] = (record, value)
                nbytes += value.nbytes if isinstance(value, torch.Tensor) else 0
    flat = None
    if fused:
        buf = buffers.take(offset) if buffers is not None else None
        if sources is not None:
            # The compiled copy, not a torch.cat of reshape views (a torch call and a view a tensor): the
            # snapshot of the summaries benchmark's write took 14.2 us in a tight loop, now 7.6; inside
            # training, where torch calls cost more, its summary step went from 312-355 to 282-320 us
            # and the steps between writes from 246-254 to 240-245 (2-core VM, old and new alternating,
            # two runs of 4 pairs).
            flat = buf if buf is not None else torch.empty(offset, dtype=_FLOAT32)
            _gather_float32(flat.data_ptr(), offset, sources)  # type: ignore[misc]  # not None: sources is a list only then
        else:
            with torch.no_grad():
                flat_views = [t.reshape(-1) for t in fused]
                if buf is None:
                    flat = torch.cat(flat_views) if len(flat_views) > 1 else flat_views[0].clone()
                else:
                    flat = torch.cat(flat_views, out=buf) if len(flat_views) > 1 else buf.copy_(flat_views[0])
    recorded = []
    for device in events:
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record()
            recorded.append(event)
    return _Snapshot(items, recorded, flat, ready if ready is not None else [], buffers is not None, nbytes)


def _copy(record: SummaryRecord, events: dict[torch.device, Any]) -> Any:
    """A copy of a value that is not a float32 CPU tensor's, or of a reduced one."""
    t = record.tensor
    if record.reduce == "zero_fraction":
        return (_to_cpu(torch.count_nonzero(t), events), t.numel())
    if record.reduce is not None:  # "norm"
        return _to_cpu(torch.linalg.vector_norm(t, dtype=torch.float32), events)
    if record.kind == "image":
        t = t[:MAX_IMAGE_OUTPUTS]
    if t.dtype not in _NUMPY_DTYPES:
        t = t.float()  # bfloat16, float8, unsigned: numpy has no twin
    return _to_cpu(t, events)


def _to_uint8_nhwc(images: np.ndarray, data_format: str) -> np.ndarray:
    if data_format == "NCHW":
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        images = np.clip(np.rint(np.nan_to_num(images.astype(np.float32) * 255.0)), 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(images)


def _finalize(snapshot: _Snapshot) -> list[tuple[str, str, Any]]:
    """Copied values -> (tag, kind, value): a float, a flat array or CPU tensor (histograms), a uint8 NHWC array."""
    snapshot.wait()
    flat = snapshot.flat.numpy() if snapshot.flat is not None else None
    out: list[tuple[str, str, Any]] = []
    for record, value in snapshot.items:
        if type(value) is slice:  # a part of the flat float32 copy
            v: Any = float(flat[value.start]) if record.kind == "scalar" else flat[value]  # type: ignore[index]
        elif record.reduce == "zero_fraction":
            nonzero, numel = value
            v = (numel - int(nonzero)) / numel
        elif record.kind == "scalar":
            v = float(value)
        elif record.kind == "histogram":
            v = value.reshape(-1)
        elif record.kind == "image":
            v = _to_uint8_nhwc(value.numpy(), record.data_format or "NHWC")
        else:  # pragma: no cover - SummaryRecord kinds are made by slim.summaries
            raise ValueError(f"unknown summary kind {record.kind!r} for tag {record.tag!r}")
        out.append((record.tag, record.kind, v))
    out.extend(snapshot.ready)
    return out


def read_values(records: Sequence[SummaryRecord]) -> list[tuple[str, str, Any]]:
    """Reads ``records`` now: ``(tag, kind, value)`` with a float for scalars, a flat
    float64 numpy array for histograms and a uint8 ``[n, h, w, c]`` array for images.

    Example:
        >>> read_values([SummaryRecord('x', 'histogram', torch.tensor([[1, 2]]))])
        [('x', 'histogram', array([1., 2.]))]
    """
    values = _finalize(_snapshot(list(records)))
    return [(t, k, np.asarray(v, dtype=np.float64) if k == "histogram" else v) for t, k, v in values]


def _scalar_entry(method: str, tag: Any, value: Any) -> SummaryRecord | tuple[str, str, float]:
    """A scalar to write: a record of a one-element tensor (copied at write time), or a final value."""
    if isinstance(tag, str) and tag:  # the messages are made only for a bad entry (train()'s writes carry three)
        if isinstance(value, torch.Tensor):
            if value.numel() == 1 and not value.is_complex():
                return SummaryRecord(tag, "scalar", value)  # read by its one element
        elif isinstance(value, (float, int, np.integer, np.floating)) and not isinstance(value, bool):
            return (tag, "scalar", float(value))
    raise _scalar_error(method, tag, value)


def _scalar_error(method: str, tag: Any, value: Any) -> ValueError:
    # add_scalar names its arguments; write names its dict and the entry
    tag_arg, value_arg = ("argument 'tag'", "argument 'value'") if method == "add_scalar" else (
        "argument 'scalars': a tag", f"argument 'scalars': the value of {tag!r}")
    if not isinstance(tag, str) or not tag:
        return ValueError(f"SummaryWriter.{method}: {tag_arg} must be a non-empty string, got {tag!r}")
    if isinstance(value, torch.Tensor):
        return ValueError(
            f"SummaryWriter.{method}: {value_arg} must hold one real value, got shape "
            f"{tuple(value.shape)} and dtype {value.dtype}"
        )
    return ValueError(
        f"SummaryWriter.{method}: {value_arg} must be a number or a one-element tensor, "
        f"got {type(value).__name__} {value!r:.80}"
    )
