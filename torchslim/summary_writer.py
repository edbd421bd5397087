"""The summary writer: reads summary records and writes TensorBoard event files.

    from torchslim.summary_writer import SummaryWriter   # also slim.summaries.SummaryWriter

    with SummaryWriter('/tmp/logdir') as writer:        # one event file, one writer thread
        writer.add_scalar('learning_rate', 0.1, step=1)
        writer.write(step=1)                             # every record in GraphKeys.SUMMARIES

Order of events in :meth:`SummaryWriter.write`:

    caller's thread:  float32 CPU values copied by address in one compiled call
                      (or one torch.cat) into a reused buffer, others cloned under
                      no_grad (or a queued non-blocking copy from a GPU); put the
                      write on a bounded queue
    writer thread:    wait for GPU copies, histograms (numpy), PNGs (zlib), one
                      encoded Event per step, TFRecord framing with CRC-32C, file;
                      the buffers handed back

Design, measured on ``benchmarks/summaries_overhead.py`` (the MLP; histograms
of its 4 parameters and 4 scalars every 10 steps): the summary run against
the no-summary run at 1 / 2 torch threads, medians of paired rounds, 2-core VM
(whose speed drifts by +-25% from second to second: each line is one run):

    writer thread, histograms as torch ops (torch.bucketize):   0.60x / 0.32x
    writer thread, histograms as numpy passes over float32:      0.75x / 0.78x
    the same, woken once a second (the queue bounded by bytes,
        below) and events encoded by event_file:                 0.79-0.82x / 0.77-0.82x
    the thread's work dropped (writes taken and discarded):      0.87x / 0.90x
    a helper process writing the file (``python -c`` loading
        event_file: numpy and the CRC, no torch; 0.1 s and 32 MB
        to start; nice 19), the thread piping it the batches:    0.81-0.83x / 0.52-0.63x
    the thread, every write copied by one torch.cat into a
        reused buffer with train()'s scalars, histogram groups
        in a kept workspace:                                     0.80-0.83x / 0.82-0.87x
    the same, the batches processed on the training thread
        (every 8 writes) instead:                                0.89x / 0.76x
    the same, the writer thread at SCHED_IDLE / nice 19:         0.80x / 0.82-1.01x
    the thread, buckets looked up by bit pattern, a wake's
        writes in one histogram group, the write path trimmed
        (three runs; before these changes 0.84x / 0.85x):        0.81-0.87x / 0.86-0.88x
    the same, the thread handing each batch to a helper
        process (``python -c`` loading event_file alone; the
        histograms as raw float32 through a 1 MB pipe; the
        histograms, encoding and file there), against the
        thread in the same run:                                  0.82x / 0.64x (thread 0.84x / 0.87x)
    the thread, the summary step's gradient check one kernel
        and one read, one lock a write, events encoded whole
        (six runs):                                              0.80-0.93x / 0.84-0.91x
    the same, float32 histograms by a compiled loop without the
        GIL (min, max, sums, counts; the writer's CPU a write
        190 -> 97 / 128 -> 68 us), two in-process A/B runs
        against numpy:                                           0.907, 0.868x / 0.884, 0.892x
                                                                 (numpy 0.859, 0.895x / 0.877, 0.872x)
        three runs of the benchmark itself:                      0.830-0.886x / 0.866-0.906x
    the same, the kept buckets and the proto's bytes in C too
        (event_file._native_protos; the writer's CPU a write
        95 -> 62 / 68 -> 55 us), one run:                        0.873x (0.725-1.042) / 0.929x (0.853-1.196)
    the same, the caller's copy by address in one compiled call
        (summary_records._snapshot; now; its summary step 312-337
        -> 282-294 us, old and new alternating), two runs:       0.895, 0.914x / 0.905, 0.931x

so the writer is a thread. It wakes once a second, when its queue is half
full (by count or by the bytes of its copies), when 1 MB of copies wait, or
for a flush or close, and takes every queued write at once; the histograms
of a batch are computed in groups of up to 256k values (the 1 MB that wakes it)
(``event_file._histogram_encodings``).

Where the time goes now (2026-12-05, the same VM, one run of 9 interleaved
rounds of 2,000 steps a variant, 1 torch thread): with the writer thread's processing replaced by
handing the buffers back (no histogram, no event, no file) the run was 0.900x
against 0.904x with it: the writer no longer costs training anything these runs
resolve. What is left is on the training thread: the summary step's median
+65 us (the train op's gradient check and the write path), and steps after a
write slower on average (+40, +32, +26 ... +11 us; their medians only +20, +13,
+10 ... +8), as after any extra Python work at that point: a 90 us pure-Python
loop put there instead slowed the next step by 13 us and those after by 4-5.
The loss's ``add_scalar_summary`` costs 3.6 us every step (a record built
and discarded there, 1.8).

Earlier (one write every 10 steps of about 225 us; medians by
position in the 10-step cycle over 5 runs of 3,000 steps, 1 torch thread):
the summary step is 90-110 us longer (the write 55 us, of which 33
copying the records' values; the train op's gradient check before the
update 12 us, 22 before it became one kernel and one read), the next two
steps 25 and 15 us, and every other step 3-9 us: with the writes removed,
steps 3-9 of the cycle were that much longer with the loss's
``add_scalar_summary`` than without it (three in-process A/B runs; the
call itself takes 3 us there, 1 us in a tight loop, as every Python call
at the end of a step costs about three times as much). With the writes
dropped (no write_summaries) the run is 0.97x the no-summary run; with
the writer thread's processing dropped, 0.88-0.93x / 0.94x against
0.84-0.87x / 0.89x in the same runs, and with it replaced by a GIL-free
sleep of the same length 0.93x against 0.87x: the writer's CPU (80-90 us a write alone,
2.0 ms for 26 writes; 185-240 us a write beside training) costs training
about 5% at either thread count. Each numpy call
of the writer releases the GIL and each return takes it back, and training
waits out every hand-over (a GIL-free ``np.sort`` in a thread beside
training cost it nothing, a Python loop one for one; numpy's bincount holds
the GIL), hence few and large calls. Beside a raw loop a helper process cost
training 7 us a write where the thread cost 199 (97 and 250 at 2 threads), but
inside ``train()`` it gained nothing measurable at 1 thread, even over 8,000
steps (0.84x against 0.86x), and its start (0.17 s of CPU for each writer)
preempts the OpenMP worker that holds the other core at 2 threads. Fresh
arrays for each group cost 4,700 page faults a 400-tensor group, half its
time, hence the workspace. torch's cat and bincount release the GIL, but at
2 torch threads they start OpenMP work beside training's (0.50x). The
earlier helper process (with torch imported) measured 0.924x against the
thread's 0.988x under heavy load, with 2.0-2.6 s to start and 60 MB more
memory.

Every wait on the writer is bounded by ``timeout`` seconds
(default :data:`DEFAULT_TIMEOUT`): a write that finds the queue full, a
flush, and close. A writer thread stuck that long (a hung file system, a log
handler that never returns) becomes :class:`SummaryWriterError`, and
:meth:`SummaryWriter.close` returns within ``timeout``. Event files are
written by :mod:`torchslim.event_file`, encoded as TensorBoard's protos encode them, with the ``crc32c`` C package
(0.6 us a record, where TensorBoard's pure-Python CRC takes about 1 ms for
6 KB); TensorBoard's reader checks those checksums.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from torchslim.collections import GraphKeys, get_collection
from torchslim.event_file import BUCKET_LIMITS, MAX_IMAGE_OUTPUTS, EventFile, print_value
from torchslim.summary_records import (
    SummaryRecord,
    _finalize,
    _FlatBuffers,
    _scalar_entry,
    _Snapshot,
    _snapshot,
    read_values,
)

__all__ = ["BUCKET_LIMITS", "DEFAULT_TIMEOUT", "MAX_IMAGE_OUTPUTS", "MAX_QUEUED_BYTES", "SummaryRecord", "SummaryWriter", "SummaryWriterError", "read_values"]

logger = logging.getLogger("torchslim")

DEFAULT_TIMEOUT = 60.0  # seconds any call waits for the writer thread before raising SummaryWriterError
THREAD_NAME = "torchslim-summary-writer"  # tests/conftest.py finds leftover torchslim threads by this prefix
_PENDING_SECS = 2.0  # add_scalar values wait at most this long for a write() to travel with


class SummaryWriterError(RuntimeError):
    """Writing summaries failed in the background, or the writer thread did not answer in time."""


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
        # The queue: a list under self._lock, which the writer thread takes whole. One lock a write, where
        # queue.Queue and the byte count took three (its put, its qsize, the count): 12 -> 7 us a write.
        self._queue: list[Any] = []
        self._max_pending = max_pending
        self._queued_bytes = 0  # of the copies in the queue (see MAX_QUEUED_BYTES)
        self._buffers = _FlatBuffers()
        self._drained = threading.Condition(self._lock)  # notified when the writer thread takes the queue
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
            with self._drained:
                items, self._queue = self._queue, []
                if items:
                    self._queued_bytes = 0
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
            if self._abandoned and not self._queue:  # close() gave up on it: end once unstuck
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
        if not self._enqueue(item, self.timeout if timeout is None else timeout):
            self._stall("take a write from its full queue")

    def _has_room(self, nbytes: int) -> bool:
        queued = self._queued_bytes
        return len(self._queue) < self._max_pending and (queued == 0 or queued + nbytes <= MAX_QUEUED_BYTES)

    def _enqueue(self, item: Any, timeout: float) -> bool:
        """Queues ``item``, waiting at most ``timeout`` seconds for room; False if none came."""
        nbytes = _copied_bytes(item)
        with self._drained:
            if not self._has_room(nbytes):
                self._wake.set()
                if not self._drained.wait_for(lambda: self._has_room(nbytes), timeout):
                    return False
            self._queue.append(item)
            queued = self._queued_bytes = self._queued_bytes + nbytes
            wake = (
                not isinstance(item, list) or 2 * len(self._queue) >= self._max_pending
                or 2 * queued >= MAX_QUEUED_BYTES or queued >= _WAKE_BYTES
            )
        if wake:
            self._wake.set()
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
        # The checks of every write inline, their messages made by calls only for a bad one.
        if self._stalled is not None or self._error is not None:
            self._raise_pending()
        if self._closed:
            self._check_open("write")
        if type(step) is not int or step < 0:
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
        if scalars is not None:
            if type(scalars) is not dict and not isinstance(scalars, Mapping):
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
        # add_scalar appends under the lock; one appended while this reads goes with the next write
        item = self._take_pending() if self._pending else []
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
                if not self._enqueue(_CLOSE, max(0.0, deadline - time.monotonic())):
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
