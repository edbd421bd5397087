"""The summary writer: reads summary records and writes TensorBoard event files.

    from torchslim.summary_writer import SummaryWriter   # also slim.summaries.SummaryWriter

    with SummaryWriter('/tmp/logdir') as writer:        # one event file, one writer thread
        writer.add_scalar('learning_rate', 0.1, step=1)
        writer.write(step=1)                             # every record in GraphKeys.SUMMARIES

Order of events in :meth:`SummaryWriter.write`:

    caller's thread:  detach + copy each record's tensor (CPU clone, or a queued
                      non-blocking copy from a GPU), put the copies on a bounded queue
    writer thread:    wait for GPU copies, histograms (numpy), PNGs (zlib), one
                      encoded Event per step, TFRecord framing with CRC-32C, file

Design, measured on ``benchmarks/summaries_overhead.py`` (the MLP; histograms
of its 4 parameters and 4 scalars every 10 steps): the summary run against
the no-summary run at 1 / 2 torch threads, medians of paired rounds, 2-core VM:

    writer thread, histograms as torch ops (torch.bucketize):   0.60x / 0.32x
    writer thread, histograms as numpy passes over float32:      0.75x / 0.78x
    the same, woken once a second (the queue bounded by bytes,
        below) and events encoded by event_file (now):           0.79-0.82x / 0.77-0.82x
    the thread's work dropped (writes taken and discarded):      0.87x / 0.90x
    a helper process writing the file (``python -c`` loading
        event_file: numpy and the CRC, no torch; 0.1 s and 32 MB
        to start; nice 19), the thread piping it the batches:    0.81-0.83x / 0.52-0.63x

so the writer is a thread. It wakes once a second (or when its queue is half
full, by count or by the bytes of its copies, or for a flush or close) and
takes every queued write at once, so the training thread loses the GIL once
a batch instead of once a write, and all the histograms of that batch are
one numpy computation (``event_file._histogram_encodings``). What it costs
at 1 torch thread is its time holding the GIL, which training waits out one
for one: numpy's concatenate, bincount and repeat hold it over the whole
batch (a training loop beside each, run without pause, went 3.3x, 3.4x and
2.1x slower; beside ``np.log``, which releases it, 1.27x). torch's cat and
bincount release it, but at 2 torch threads they start OpenMP work beside
training's (0.50x). A helper process removes the GIL part, but its pipe, its
start and its CPU cost about as much at 1 thread, and at 2 threads it takes a
core from training's OpenMP regions even at nice 19. The earlier helper
process (with torch imported) measured 0.924x against the thread's 0.988x
under heavy load, with 2.0-2.6 s to start and 60 MB more memory.

Every wait on the writer is bounded by ``timeout`` seconds
(default :data:`DEFAULT_TIMEOUT`): a write that finds the queue full, a
flush, and close. A writer thread stuck that long (a hung file system, a log
handler that never returns) becomes :class:`SummaryWriterError`, and
:meth:`SummaryWriter.close` returns within ``timeout``. Event files are
written by :mod:`torchslim.event_file` with TensorBoard's protos and the ``crc32c`` C package
(0.6 us a record, where TensorBoard's pure-Python CRC takes about 1 ms for
6 KB); TensorBoard's reader checks those checksums.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from torchslim.collections import GraphKeys, get_collection
from torchslim.event_file import BUCKET_LIMITS, MAX_IMAGE_OUTPUTS, EventFile, print_value

__all__ = ["BUCKET_LIMITS", "DEFAULT_TIMEOUT", "MAX_IMAGE_OUTPUTS", "MAX_QUEUED_BYTES", "SummaryRecord", "SummaryWriter", "SummaryWriterError", "read_values"]

logger = logging.getLogger("torchslim")

DEFAULT_TIMEOUT = 60.0  # seconds any call waits for the writer thread before raising SummaryWriterError
THREAD_NAME = "torchslim-summary-writer"  # tests/conftest.py finds leftover torchslim threads by this prefix
_PENDING_SECS = 2.0  # add_scalar values wait at most this long for a write() to travel with


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


class SummaryWriterError(RuntimeError):
    """Writing summaries failed in the background, or the writer thread did not answer in time."""


# ------------------------------------------------------------------ reading values
_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}


@dataclasses.dataclass
class _Snapshot:
    """Copies of the records' values, possibly still in flight from a GPU.

    ``items`` pairs each record with its copy, or, for the float32 CPU
    tensors (histograms and scalars alike), with a slice of ``flat``: their
    values copied together by one ``torch.cat``. ``ready`` holds values that
    need no copy: ``(tag, 'scalar', float)``."""

    items: list[tuple[SummaryRecord, Any]]
    events: list[Any]
    flat: torch.Tensor | None = None
    ready: list[tuple[str, str, Any]] = dataclasses.field(default_factory=list)
    pooled: bool = False  # flat came from a _FlatBuffers, to be handed back once written

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()
        self.events = []

    @property
    def nbytes(self) -> int:
        n = 0 if self.flat is None else self.flat.nbytes
        for _, value in self.items:
            if isinstance(value, torch.Tensor):
                n += value.nbytes
        return n


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


_CPU, _FLOAT32 = torch.device("cpu"), torch.float32


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

    float32 CPU values are copied by one ``torch.cat`` into one buffer (from
    ``buffers`` when it has one): on the summaries benchmark's write (4
    histograms, 2 scalars) one copy in place of six clones and their
    allocations."""
    events: dict[torch.device, Any] = {}
    items: list[tuple[SummaryRecord, Any]] = []
    fused: list[torch.Tensor] = []
    offset = 0
    for i, record in enumerate(records):
        if type(record) is not SummaryRecord and not isinstance(record, SummaryRecord):
            raise _record_error(i, record)
        t = record.tensor.detach()  # detached here, at write time, not on every step it is recorded
        if record.reduce is None:
            if t.dtype is _FLOAT32 and t.device == _CPU and record.kind != "image":
                n = t.numel()
                fused.append(t.reshape(-1))
                items.append((record, slice(offset, offset + n)))
                offset += n
                continue
            if record.kind == "image":
                t = t[:MAX_IMAGE_OUTPUTS]
            if t.dtype not in _NUMPY_DTYPES:
                t = t.float()  # bfloat16, float8, unsigned: numpy has no twin
            value: Any = _to_cpu(t, events)
        elif record.reduce == "zero_fraction":
            value = (_to_cpu(torch.count_nonzero(t), events), t.numel())
        else:  # "norm"
            value = _to_cpu(torch.linalg.vector_norm(t, dtype=torch.float32), events)
        items.append((record, value))
    flat = buf = None
    if fused:
        buf = buffers.take(offset) if buffers is not None else None
        if buf is None:
            flat = torch.cat(fused) if len(fused) > 1 else fused[0].clone()
        else:
            flat = torch.cat(fused, out=buf) if len(fused) > 1 else buf.copy_(fused[0])
    recorded = []
    for device in events:
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record()
            recorded.append(event)
    return _Snapshot(items, recorded, flat, ready if ready is not None else [], pooled=buffers is not None)


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


# ------------------------------------------------------------------ the writer
_CLOSE = object()
# The writer thread wakes this often, or when its queue is half full, or for a flush or close. Each wake
# costs the training thread GIL hand-overs; so writes are taken in batches, whose histograms are one
# computation (event_file._histogram_encodings). Waking on every write instead, as queue.get does, made
# training with histograms of 4 parameters every 10 steps <0.6x as fast as without (summaries benchmark).
_LINGER_SECS = 1.0
# The copies that may wait for the writer thread: it is woken at half of this, and write() waits for room
# past it. Bounding the queue by bytes, not only by count, lets a small model's writes wait for the whole
# linger (at 8 writes, the writer woke every 4 writes and the summaries benchmark ran at 0.76x, at 256
# with this bound at 0.84x, 1 torch thread) while a large model's writes still wake it at once.
MAX_QUEUED_BYTES = 64 << 20
# ...and it is woken once this many bytes of float32 copies wait: enough for a few histogram groups
# (event_file._GROUP_VALUES), and few enough that the buffers it hands back are there for the next
# writes (_FlatBuffers): a write that found none took a fresh 38 KB buffer on the summaries benchmark,
# 10 page faults on the training thread.
_WAKE_BYTES = 1 << 20


def _copied_bytes(item: Any) -> int:
    """Bytes of tensor copies a queued write holds (0 for markers and add_scalar values)."""
    n = 0
    if isinstance(item, list):
        for _, _, payload in item:
            if isinstance(payload, _Snapshot):
                n += payload.nbytes
    return n


def _merge_writes(items: list[Any]) -> list[Any]:
    """Queue items in order, each run of consecutive writes (lists of steps) joined into one."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, list) and out and isinstance(out[-1], list):
            out[-1] = out[-1] + item
        else:
            out.append(item)
    return out


def _scalar_entry(method: str, tag: Any, value: Any) -> SummaryRecord | tuple[str, str, float]:
    """A scalar to write: a record of a one-element tensor (copied at write time), or a final value."""
    # add_scalar names its arguments; write names its dict and the entry
    tag_arg, value_arg = ("argument 'tag'", "argument 'value'") if method == "add_scalar" else (
        "argument 'scalars': a tag", f"argument 'scalars': the value of {tag!r}")
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"SummaryWriter.{method}: {tag_arg} must be a non-empty string, got {tag!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(
                f"SummaryWriter.{method}: {value_arg} must hold one real value, got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        return SummaryRecord(tag, "scalar", value.reshape(()))
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(
            f"SummaryWriter.{method}: {value_arg} must be a number or a one-element tensor, "
            f"got {type(value).__name__} {value!r:.80}"
        )
    return (tag, "scalar", float(value))


_writer_ids = itertools.count(1)


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"SummaryWriter: argument 'timeout' must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


class SummaryWriter:
    """Writes summaries for TensorBoard into ``logdir`` (the train()/evaluation bridge).

    :meth:`write` reads the summary records on the caller's thread (detached
    CPU copies; from a GPU the copies are queued without waiting for them) and
    the writer thread computes histograms, encodes images and appends one
    event per step to the event file, holding all of that step's values, as
    TF's merged summary does. An error there is raised at the next call; pass
    ``asynchronous=False`` to do everything on the calling thread when
    debugging. No call waits on the writer thread longer than ``timeout``
    seconds: then it raises :class:`SummaryWriterError`.

    Writes wait for the writer thread, which wakes once a second, up to
    ``max_pending`` writes or :data:`MAX_QUEUED_BYTES` of copies; past either,
    :meth:`write` waits for room (at most ``timeout`` seconds).

    ``purge_step``: a run resumed from a checkpoint taken at step ``S`` passes
    ``S + 1``; TensorBoard then drops the events the previous run wrote at
    steps ``>= S + 1``, so no step is shown twice or rewound.

    Example:
        >>> import tempfile
        >>> from torchslim.summaries import add_scalar_summary
        >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
        ...     writer.add_scalar('learning_rate', 0.1, step=1)
        ...     _ = add_scalar_summary(torch.tensor(0.5), 'loss')
        ...     writer.write(step=1)
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        purge_step: int | None = None,
        asynchronous: bool = True,
        max_pending: int = 256,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
            raise ValueError(f"SummaryWriter: argument 'logdir' must be a non-empty path, got {logdir!r}")
        if purge_step is not None and (isinstance(purge_step, bool) or not isinstance(purge_step, int) or purge_step < 0):
            raise ValueError(f"SummaryWriter: argument 'purge_step' must be None or an int >= 0, got {purge_step!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"SummaryWriter: argument 'max_pending' must be an int >= 1, got {max_pending!r}")
        self.timeout = _check_timeout(timeout)
        self.logdir = os.fspath(logdir)
        self.asynchronous = bool(asynchronous)
        os.makedirs(self.logdir, exist_ok=True)  # a bad path fails here, on the caller's thread
        self._file = EventFile(self.logdir, purge_step)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stalled: str | None = None
        self._closed = False
        self._abandoned = False  # close() could not queue its end marker: the thread ends when it drains
        # add_scalar values not yet handed over: (step, walltime, snapshot or values), sent with the next write.
        self._pending: list[tuple[int, float, Any]] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._queued_bytes = 0  # of the copies in the queue (see MAX_QUEUED_BYTES)
        self._buffers = _FlatBuffers()
        self._drained = threading.Condition(self._lock)
        self._wake = threading.Event()  # set for a flush, close, or a queue half full
        self._thread: threading.Thread | None = None
        if self.asynchronous:
            self._thread = threading.Thread(target=self._run, name=f"{THREAD_NAME}-{next(_writer_ids)}", daemon=True)
            self._thread.start()

    # -- the writer thread
    def _run(self) -> None:
        while True:
            self._wake.wait(_LINGER_SECS)
            self._wake.clear()
            items: list[Any] = []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._queue.get_nowait())
            taken = sum(_copied_bytes(item) for item in items)
            if taken:
                with self._drained:
                    self._queued_bytes -= taken
                    self._drained.notify_all()
            if not items:  # idle: what was written reaches the OS
                items = [self._file.flush_if_due]
            for item in _merge_writes(items):
                try:
                    if item is _CLOSE:
                        self._file.close()
                        return
                    if self._error is None:
                        self._process(item)
                    elif isinstance(item, threading.Event):
                        item.set()
                except BaseException as e:
                    self._error = self._error or e
                    if isinstance(item, threading.Event):
                        item.set()
            if self._abandoned and self._queue.empty():  # close() gave up on it: end once unstuck
                self._file.close()
                return

    def _process(self, item: Any) -> None:
        if callable(item):  # the idle flush
            item()
            return
        if isinstance(item, threading.Event):  # a flush marker
            try:
                self._file.flush()
            finally:
                item.set()
            return
        batch: list[tuple[int, float, Any]] = []
        prints: list[tuple[str, str, Any]] = []
        values: Any = None
        for step, walltime, payload in item:
            if isinstance(payload, _Snapshot):
                printed = {r.tag for r, _ in payload.items if r.print_summary}
                values = _finalize(payload)
                prints.extend(v for v in values if v[0] in printed)
            else:  # add_scalar's values, final already
                values = payload
            batch.append((step, walltime, values))
        self._file.write(batch)
        for tag, kind, value in prints:
            print_value(tag, kind, value)
        del batch, prints, values  # the views of the copies, before their buffers are reused
        for _, _, payload in item:
            if isinstance(payload, _Snapshot) and payload.pooled and payload.flat is not None:
                self._buffers.give_back(payload.flat)

    # -- the caller's side
    def _raise_pending(self) -> None:
        if self._stalled is not None:
            raise SummaryWriterError(self._stalled)
        error, self._error = self._error, None
        if error is not None:
            raise SummaryWriterError(
                f"writing summaries to {self.logdir!r} failed in the background: "
                f"{type(error).__name__}: {error}. Pass asynchronous=False to SummaryWriter to "
                f"run the writing on the calling thread and debug it"
            ) from error

    def _stall(self, what: str) -> None:
        self._stalled = (
            f"the summary writer thread for {self.logdir!r} did not {what} within timeout={self.timeout:g} s "
            f"(a hung file system, or a logging handler that does not return?); summaries written since "
            f"the last flush may be lost. Pass SummaryWriter(..., timeout=...) to wait longer"
        )
        raise SummaryWriterError(self._stalled)

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise ValueError(f"SummaryWriter.{method}: the writer for {self.logdir!r} is closed")

    def _submit(self, item: Any, timeout: float | None = None) -> None:
        if self._thread is None:
            self._process(item)
            return
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)  # both waits below, together
        nbytes = _copied_bytes(item)
        if nbytes:
            with self._drained:
                def room() -> bool:
                    return self._queued_bytes == 0 or self._queued_bytes + nbytes <= MAX_QUEUED_BYTES

                if not room():
                    self._wake.set()
                    if not self._drained.wait_for(room, max(0.0, deadline - time.monotonic())):
                        self._stall("take a write from its full queue")
                self._queued_bytes += nbytes
        if self._queue.full():
            self._wake.set()
        try:
            self._queue.put(item, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            with self._drained:
                self._queued_bytes -= nbytes
            self._stall("take a write from its full queue")
        if (
            not isinstance(item, list) or 2 * self._queue.qsize() >= self._queue.maxsize
            or 2 * self._queued_bytes >= MAX_QUEUED_BYTES or self._queued_bytes >= _WAKE_BYTES
        ):
            self._wake.set()

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

    def write(
        self,
        step: int,
        records: Sequence[SummaryRecord] | None = None,
        scalars: Mapping[str, float | torch.Tensor] | None = None,
    ) -> None:
        """Writes ``records`` (default: ``get_collection(SUMMARIES)``) and ``scalars``
        (``{tag: number or one-element tensor}``) at ``step``, in one event.

        Values are read now, on this thread; the rest happens in the
        background (or here when ``asynchronous=False``).

        Example:
            >>> import tempfile
            >>> from torchslim.summaries import add_histogram_summaries
            >>> w = SummaryWriter(tempfile.mkdtemp())
            >>> _ = add_histogram_summaries(torch.nn.Linear(4, 2), prefix='weights')
            >>> w.write(step=10, scalars={'learning_rate': 0.1}); w.close()
        """
        self._raise_pending()
        self._check_open("write")
        step = self._check_step("write", step)
        if torch.autograd._profiler_enabled():  # a traced step shows this as its own region
            with torch.profiler.record_function("torchslim/summaries"):
                self._write(step, records, scalars)
        else:
            self._write(step, records, scalars)

    def _write(self, step: int, records: Sequence[SummaryRecord] | None, scalars: Mapping[str, Any] | None) -> None:
        if records is None:
            records = get_collection(GraphKeys.SUMMARIES)
        elif not isinstance(records, (list, tuple)) and (isinstance(records, SummaryRecord) or not isinstance(records, Iterable)):
            raise ValueError(
                f"SummaryWriter.write: argument 'records' must be a list of SummaryRecord or None, "
                f"got {type(records).__name__}"
            )
        ready: list[tuple[str, str, Any]] = []
        if scalars:
            if not isinstance(scalars, Mapping):
                raise ValueError(
                    f"SummaryWriter.write: argument 'scalars' must be a dict of tag -> number or one-element "
                    f"tensor, or None, got {type(scalars).__name__}"
                )
            records = list(records)
            for tag, value in scalars.items():
                entry = _scalar_entry("write", tag, value)
                if type(entry) is SummaryRecord:
                    records.append(entry)
                else:
                    ready.append(entry)  # type: ignore[arg-type]
        snapshot = _snapshot(records if type(records) is list else list(records), ready, self._buffers)
        item = self._take_pending()
        if snapshot.items or ready:
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
        entry = _scalar_entry("add_scalar", tag, value)
        step = self._check_step("add_scalar", step)
        # a tensor's value is copied now and read by the writer thread: no device sync here
        payload: Any = _snapshot([entry]) if type(entry) is SummaryRecord else [entry]
        now = time.time()
        with self._lock:
            self._pending.append((step, now, payload))
            overdue = now - self._pending[0][1] > _PENDING_SECS
        if overdue:
            self._submit(self._take_pending())

    def flush(self) -> None:
        """Waits (at most ``timeout`` seconds) until everything written so far is readable by TensorBoard.

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
        if not marker.wait(self.timeout):
            self._stall("flush")
        self._raise_pending()

    def close(self) -> None:
        """Writes what is pending, closes the event file and ends the writer thread.

        Idempotent; returns within ``timeout`` seconds. Raises
        :class:`SummaryWriterError` if the background writing failed since
        the last call or the thread did not end in time.

        Example:
            >>> import tempfile
            >>> w = SummaryWriter(tempfile.mkdtemp()); w.close(); w.close()
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + (0.0 if self._stalled else self.timeout)
        try:
            pending = self._take_pending()
            if pending and self._stalled is None:
                self._submit(pending, timeout=self.timeout)
        finally:
            thread = self._thread
            if thread is None:
                self._file.close()
            else:
                try:
                    self._wake.set()
                    self._queue.put(_CLOSE, timeout=max(0.0, deadline - time.monotonic()))
                except queue.Full:
                    self._abandoned = True
                self._wake.set()
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive() and self._stalled is None:
                    self._stall("end")
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
