"""TensorBoard event files: summaries encoded as TensorFlow encodes them.

    from torchslim.event_file import EventFile

    f = EventFile('/tmp/logdir', purge_step=None)   # events.out.tfevents.<time>.<host>.<pid>.<n>
    f.write([(step, walltime, [('loss', 'scalar', 0.5)])])
    f.flush(); f.close()

Histograms use TensorFlow's buckets (histogram.cc) computed with torch ops;
images are PNG-encoded with zlib; each event is framed as a TFRecord, as
TensorBoard's own ``RecordWriter`` frames it, with the CRC-32C of the
``crc32c`` C package. :class:`torchslim.summary_writer.SummaryWriter` calls
this on its writer thread; nothing here reads tensors from a device.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import crc32c
import numpy as np
import torch

__all__ = ["BUCKET_LIMITS", "FLUSH_SECS", "MAX_IMAGE_OUTPUTS", "EventFile", "print_value"]

logger = logging.getLogger("torchslim")

MAX_IMAGE_OUTPUTS = 3  # TF's summary.image default, which TF-Slim keeps
FLUSH_SECS = 30.0  # events reach the OS at least this often


def _tf_bucket_limits() -> list[float]:
    """TensorFlow's histogram bucket limits (histogram.cc): +-1e-12 * 1.1**k below 1e20, 0, +-DBL_MAX.

    The inner ones are ``torch.utils.tensorboard.SummaryWriter().default_bins``
    (tests check it); TF adds the two outer limits so that no value is dropped."""
    v, pos = 1e-12, []
    while v < 1e20:
        pos.append(v)
        v *= 1.1
    big = float(np.finfo(np.float64).max)
    return [-big] + [-x for x in reversed(pos)] + [0.0] + pos + [big]


BUCKET_LIMITS = _tf_bucket_limits()
_LIMITS_TENSOR = torch.tensor(BUCKET_LIMITS, dtype=torch.float64)


def _histogram_protos(named: list[tuple[str, torch.Tensor]]) -> list[Any]:
    """HistogramProtos as TensorFlow encodes them (histogram.cc), one per ``(tag, values)``:
    a value v falls in the bucket whose right limit is the first limit > v;
    runs of empty buckets inside the range collapse into their last one.

    This runs on the writer thread while training runs, and what the training
    thread feels is the GIL changing hands, not the arithmetic: every torch op
    here lets go of the GIL and takes it back, and each time the training
    thread waits on a wake-up of the other core. So all the histograms of a
    batch of writes are one computation of about 25 ops, however many tensors
    it holds. Measured on ``benchmarks/summaries_overhead.py`` (1 torch
    thread, this 2-core VM): about 9 ops per histogram made training with
    summaries 0.61x as fast as without."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    if not named:
        return []
    flat = [values.reshape(-1) for _, values in named]
    sizes = [t.numel() for t in flat]
    v = torch.cat(flat).to(torch.float64)
    lengths = torch.tensor(sizes)
    stats = torch.stack(
        [torch.segment_reduce(v, reduce, lengths=lengths) for reduce in ("min", "max", "sum")]
        + [torch.segment_reduce(v * v, "sum", lengths=lengths)]
    )
    if not bool((stats[:2].isfinite().all(0) | (lengths == 0)).all()):  # NaN or +-inf in a min or a max
        bad = next(tag for (tag, _), t in zip(named, flat) if not bool(t.isfinite().all()))
        raise ValueError(f"histogram summary {bad!r}: the tensor holds NaN or infinite values")
    width = len(BUCKET_LIMITS)
    index = torch.bucketize(v, _LIMITS_TENSOR, right=True).clamp_(max=width - 1)
    index += torch.repeat_interleave(torch.arange(0, width * len(sizes), width), lengths)
    counts = torch.bincount(index, minlength=width * len(sizes)).view(len(sizes), width)
    nonzero = counts > 0
    keep = nonzero.clone()
    keep[:, :-1] |= nonzero[:, 1:]  # of a run of empty buckets, the last one
    keep &= nonzero.cumsum(1) > 0  # but none below the lowest value
    rows, columns = keep.nonzero(as_tuple=True)
    kept_per_row, column_list, count_list = keep.sum(1).tolist(), columns.tolist(), counts[rows, columns].tolist()
    protos, start = [], 0
    for (lo, hi, total, squares), size, kept in zip(stats.T.tolist(), sizes, kept_per_row):
        end = start + kept
        if size == 0:  # TF's empty histogram
            lo, hi = BUCKET_LIMITS[-1], -BUCKET_LIMITS[-1]
        protos.append(HistogramProto(
            min=lo,
            max=hi,
            num=size,
            sum=total,
            sum_squares=squares,
            bucket_limit=[BUCKET_LIMITS[c] for c in column_list[start:end]],
            bucket=count_list[start:end],
        ))
        start = end
    return protos


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


def _summary_values(tag: str, kind: str, value: Any, histograms: Iterator[Any]) -> list[Any]:
    """The Summary.Value protos for one finalized value; a histogram's proto is the next of ``histograms``."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    if kind == "scalar":
        return [Summary.Value(tag=tag, simple_value=value)]
    if kind == "histogram":
        return [Summary.Value(tag=tag, histo=next(histograms))]
    out = []
    for image_tag, image in zip(_image_tags(tag, len(value)), value):
        h, w, c = image.shape
        img = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=_png(image))
        out.append(Summary.Value(tag=image_tag, image=img))
    return out


def print_value(tag: str, kind: str, value: Any) -> None:
    if kind == "image":
        logger.info("%s: uint8 images of shape %s, min %d, max %d", tag, list(value.shape), value.min(), value.max())
    elif kind == "histogram":
        logger.info("%s: %s", tag, value.tolist())
    else:
        logger.info("%s: %s", tag, value)


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C, with the ``crc32c`` C package."""
    x = crc32c.crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tf_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC (TensorBoard's RecordWriter format)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data))


_file_ids = itertools.count(1)
_Batch = list  # [(step, walltime, [(tag, kind, finalized value), ...]), ...]


class EventFile:
    """One TensorBoard event file, named and framed as TensorBoard's EventFileWriter does."""

    def __init__(self, logdir: str, purge_step: int | None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._last_flush = time.monotonic()
        self._append(Event(wall_time=now, file_version="brain.Event:2"))
        if purge_step is not None:  # TensorBoard drops the events of steps >= purge_step written before
            self._append(Event(wall_time=now, step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _append(self, event: Any) -> None:
        self._file.write(_tf_record(event.SerializeToString()))

    def write(self, batch: _Batch) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        histograms = iter(_histogram_protos([(t, v) for _, _, values in batch for t, k, v in values if k == "histogram"]))
        by_step: dict[int, tuple[float, list[Any]]] = {}
        for step, walltime, values in batch:
            out = by_step.setdefault(step, (walltime, []))[1]
            for tag, kind, value in values:
                out.extend(_summary_values(tag, kind, value, histograms))
        for step, (walltime, out) in by_step.items():
            if out:
                self._append(Event(wall_time=walltime, step=step, summary=Summary(value=out)))
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Flushes if the last flush is more than FLUSH_SECS old."""
        if time.monotonic() - self._last_flush > FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._file.close()
