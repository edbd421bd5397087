"""The checkpoint file: one pass to write, one pass to read, verified before anything is unpickled.

    flat = flatten(state)                     # tensor-free skeleton + the raw bytes of each storage
    write_flat(f, flat)                       # header | manifest | skeleton | storages, crc32c on the way
    state = read_file(path)                   # storages read straight into place, crc checked, then unpickled

Format 2 (``MAGIC``)::

    header   48 bytes  '<8sIIqQQQ': magic, crc32c, reserved (0), global step (-1: none),
                       manifest length, skeleton length, data length
    manifest JSON: the byte size of each storage, and for each tensor its ordinal, storage,
             dtype, shape, stride, offset and device
    skeleton torch.save of the state with every plain dense tensor replaced by an empty one
    data     the storages' bytes, back to back

The crc32c covers everything after the crc field. A reader checks the file
size against the header, reads each storage directly into its final
buffer while computing the crc, compares it, and only then unpickles the
skeleton with ``weights_only=True``. The manifest is JSON, so nothing in
the file runs before it is verified either.

Why crc32c and not sha256 (format 1): measured on the 768 MiB state of
``benchmarks/checkpoint_speed.py``, sha256 alone took longer (0.5 s) than
``torch.load`` of the whole file (0.4 s), so no restore that checks
integrity could stay within 1.3x of ``torch.load``; crc32c (SSE4.2, the
checksum of TF's own checkpoint and event records) takes 0.08 s and
releases the GIL. The digest guards against damage, not tampering: a forged
file is harmless anyway because nothing in it is executed.

Format 1 (``MAGIC_V1``: magic | sha256 | length | torch.save payload) is
still read.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import queue
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import crc32c as _crc32c
import torch

MAGIC = b"TSLIMCK2"
MAGIC_V1 = b"TSLIMCK1"
SHARDED_MARKER_MAGIC = b"TSLIMDCP"  # torchslim.sharded_checkpoint.MAGIC
HEADER = struct.Struct("<8sIIqQQQ")
HEADER_V1 = struct.Struct("<8s32sQ")
NO_STEP = -1
_CHUNK = 8 << 20  # small enough to hash while the bytes are still in cache
_DEFER_BYTES = 1 << 20  # a CPU storage this large is copied off the training thread
_MAX_MANIFEST = 256 << 20
_PLACEHOLDER = torch.empty(0)
_OrderedDict = collections.OrderedDict


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, altered or not a torchslim checkpoint."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"checkpoint {path!r} is corrupt: {reason}")
        self.path = path
        self.reason = reason


def _crc(data: Any, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


# ----------------------------------------------------------------- flattening
def _external(t: torch.Tensor) -> bool:
    # Plain dense tensors are written as raw bytes; anything else (sparse, quantized, subclasses,
    # tensors with Python attributes) stays in the skeleton for torch.save to handle.
    return (type(t) is torch.Tensor and t.layout == torch.strided and not t.is_quantized and not t.is_nested
            and not t.requires_grad and t.device.type != "meta" and not t.is_conj() and not t.is_neg()
            and not t.__dict__)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``t`` as a 1-D uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class FlatState:
    """A state split into a tensor-free ``skeleton`` and the byte ``storages`` its tensors live in."""

    def __init__(self) -> None:
        self.skeleton: Any = None
        self.tensors: list[list[Any]] = []  # [ordinal, storage, dtype, shape, stride, offset, device]
        self.storages: list[torch.Tensor] = []  # 1-D uint8, live until staged
        self.live: list[list[torch.Tensor]] = []  # per storage, the tensors of the state that use it
        self.global_step = NO_STEP
        self.finish_staging: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.storages)


def _step_of(state: Mapping[str, Any], fallback: int | None) -> int:
    step = state.get("global_step")
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step.item())
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return step
    return fallback if fallback is not None and fallback >= 0 else NO_STEP


def flatten(state: Mapping[str, Any], global_step: int | None = None, clone_inline: bool = False) -> FlatState:
    """Splits ``state`` without copying tensor data (``clone_inline`` copies the few tensors left inline)."""
    flat = FlatState()
    by_storage: dict[tuple[str, int, int], int] = {}
    ordinal = 0

    def walk(obj: Any) -> Any:
        nonlocal ordinal
        kind = type(obj)
        if isinstance(obj, torch.Tensor):
            n, ordinal = ordinal, ordinal + 1
            if not _external(obj):
                return obj.detach().clone() if clone_inline else obj
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr(), storage.nbytes())
            index = by_storage.get(key)
            if index is None:
                index = by_storage[key] = len(flat.storages)
                flat.storages.append(_bytes_of(obj))
                flat.live.append([])
            flat.live[index].append(obj)
            flat.tensors.append([n, index, str(obj.dtype).removeprefix("torch."), list(obj.shape),
                                 list(obj.stride()), obj.storage_offset(), str(obj.device)])
            return _PLACEHOLDER
        if kind is dict:
            return {k: walk(v) for k, v in obj.items()}
        if kind is _OrderedDict:
            new = _OrderedDict((k, walk(v)) for k, v in obj.items())
            new.__dict__.update(obj.__dict__)  # a module state dict's _metadata (versions of its layers)
            return new
        if kind is list:
            return [walk(v) for v in obj]
        if kind is tuple:
            return tuple(walk(v) for v in obj)
        return obj

    flat.skeleton = walk(dict(state))
    flat.global_step = _step_of(state, global_step)
    return flat


# ----------------------------------------------------------------- staging (background saves)
_pending: set[threading.Event] = set()
_hook_lock = threading.Lock()
_hook_installed = False
staging_wait_seconds = 0.0  # time optimizer steps spent waiting for a staging copy (benchmarks read it)


def _wait_for_staging(optimizer: Any, args: Any, kwargs: Any) -> None:
    if _pending:
        global staging_wait_seconds
        start = time.perf_counter()
        for event in list(_pending):
            event.wait()
        staging_wait_seconds += time.perf_counter() - start


def _install_step_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            # One permanent, process-wide hook: removing hooks while a step iterates them is unsafe.
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            register_optimizer_step_pre_hook(_wait_for_staging)
            _hook_installed = True


class Stager:
    """Copies a FlatState's storages off the live tensors into host buffers reused across saves.

    Small CPU storages (under 1 MiB: batch-norm statistics, RNG states) and
    CUDA storages (into pinned memory, ordered on the current stream) are
    copied during :meth:`stage`. Large CPU storages are copied by the
    background thread (``flat.finish_staging``) while training continues;
    until that copy is done every ``optimizer.step()`` in the process waits
    (a global optimizer step pre-hook), so the copy sees the weights of the
    step being saved. A tensor of the state changed in place before its copy
    finished (outside ``optimizer.step``) makes that save fail with a
    CheckpointError rather than write a mixed state.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def _buffer(self, i: int, n: int, pinned: bool) -> torch.Tensor:
        if i < len(self._buffers) and self._buffers[i].numel() == n and self._buffers[i].is_pinned() == pinned:
            return self._buffers[i]
        buf = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        if i < len(self._buffers):
            self._buffers[i] = buf
        else:
            self._buffers.append(buf)
        return buf

    def release(self) -> None:
        self._buffers = []

    def stage(self, flat: FlatState) -> None:
        staged: list[torch.Tensor] = []
        deferred: list[tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, int]]]] = []
        cuda_devices: set[torch.device] = set()
        for i, src in enumerate(flat.storages):
            n = src.numel()
            on_cuda = src.device.type == "cuda"
            dst = self._buffer(i, n, pinned=on_cuda)
            if src.device.type == "cpu" and n >= _DEFER_BYTES:
                deferred.append((dst, src, [(t, t._version) for t in flat.live[i]]))
            elif on_cuda:
                dst.copy_(src, non_blocking=True)
                cuda_devices.add(src.device)
            else:
                dst.copy_(src)
            staged.append(dst)
        del self._buffers[len(flat.storages):]
        events = []
        for device in cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        flat.storages, flat.live = staged, []
        done = threading.Event()
        if deferred:
            _install_step_hook()
            _pending.add(done)

        def finish() -> None:
            try:
                for event in events:
                    event.synchronize()
                for dst, src, _ in deferred:
                    dst.copy_(src)
                for _, _, versions in deferred:
                    for t, version in versions:
                        if t._version != version:
                            raise CheckpointError(
                                f"a tensor of shape {tuple(t.shape)} in the state was changed in place while it was "
                                "copied for a background checkpoint (outside optimizer.step()); construct the Saver "
                                "with asynchronous=False, or snapshot the state with slim.checkpoint.snapshot() first"
                            )
            finally:
                done.set()
                _pending.discard(done)

        flat.finish_staging = finish


def release_staging(flat: FlatState) -> None:
    """Runs (or abandons) a pending staging copy so no optimizer step waits for it."""
    finish, flat.finish_staging = flat.finish_staging, None
    if finish is not None:
        finish()


# ----------------------------------------------------------------- writing
def _write_all(f: BinaryIO, data: Any) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        if n is None or n <= 0:
            raise OSError(f"short write to {getattr(f, 'name', f)!r}")
        view = view[n:]


def write_flat(f: BinaryIO, flat: FlatState) -> None:
    """Writes ``flat`` to the unbuffered binary file ``f`` positioned at 0, crc computed on the way."""
    manifest = json.dumps({"byteorder": sys.byteorder, "storages": [s.numel() for s in flat.storages],
                           "tensors": flat.tensors}, separators=(",", ":")).encode()
    buf = io.BytesIO()
    torch.save(flat.skeleton, buf)
    skeleton = buf.getvalue()
    lengths = (0, flat.global_step, len(manifest), len(skeleton), flat.nbytes)
    head_tail = HEADER.pack(MAGIC, 0, *lengths)[12:]
    crc = _crc(head_tail)
    _write_all(f, HEADER.pack(MAGIC, 0, *lengths))
    for part in (manifest, skeleton):
        crc = _crc(part, crc)
        _write_all(f, part)
    # The digest runs on a second thread, chunk by chunk right behind the writes (both release the GIL),
    # so a save costs the write, not the write plus a pass over the data.
    chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
    digest = [crc]

    def checksum() -> None:
        value = digest[0]
        while (chunk := chunks.get()) is not None:
            value = _crc(chunk, value)
        digest[0] = value

    summer = threading.Thread(target=checksum, name="torchslim-crc32c", daemon=True)
    summer.start()
    try:
        for storage in flat.storages:
            host = storage if storage.device.type == "cpu" else storage.cpu()  # a synchronous save of GPU tensors
            view = host.numpy().data
            for start in range(0, len(view), _CHUNK):
                chunk = view[start:start + _CHUNK]
                chunks.put(chunk)
                _write_all(f, chunk)
    finally:
        chunks.put(None)
        summer.join()
    f.seek(0)
    _write_all(f, HEADER.pack(MAGIC, digest[0], *lengths))


# ----------------------------------------------------------------- reading
def _read_exact(f: BinaryIO, n: int, path: str) -> bytes:
    data = f.read(n) if n else b""
    if len(data) != n:
        raise CorruptCheckpointError(path, f"file ended {n - len(data)} bytes early (truncated?)")
    return data


def _read_into(f: BinaryIO, view: memoryview, crc: int, path: str) -> int:
    for start in range(0, len(view), _CHUNK):
        chunk = view[start:start + _CHUNK]
        got = 0
        while got < len(chunk):
            n = f.readinto(chunk[got:])  # type: ignore[attr-defined]
            if not n:
                raise CorruptCheckpointError(path, "file ended early (truncated?)")
            got += n
        crc = _crc(chunk, crc)
    return crc


def probe(path: str) -> tuple[int, int | None] | None:
    """``(format, stored global step or None)`` from a file's header; None when it is not a checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError:
        return None
    if head[:8] == MAGIC_V1:
        return 1, None
    if head[:8] == SHARDED_MARKER_MAGIC:  # torchslim.sharded_checkpoint's commit marker; its step is in its name
        return 3, None
    if head[:8] != MAGIC or len(head) < HEADER.size:
        return None
    step = HEADER.unpack(head)[3]
    return 2, (step if step >= 0 else None)


def _open_header(f: BinaryIO, path: str) -> tuple[bytes, int]:
    size = os.fstat(f.fileno()).st_size
    head = f.read(HEADER.size)
    if len(head) < 8 or head[:8] not in (MAGIC, MAGIC_V1):
        if len(head) < HEADER_V1.size:
            raise CorruptCheckpointError(path, f"file has {size} bytes, shorter than the {HEADER_V1.size}-byte header")
        raise CorruptCheckpointError(path, "not a torchslim checkpoint (bad magic bytes)")
    if len(head) < HEADER.size:
        raise CorruptCheckpointError(path, f"file has {size} bytes, shorter than the {HEADER.size}-byte header")
    return head, size


def _read_v1(f: BinaryIO, head: bytes, size: int, path: str) -> bytes:
    _, digest, length = HEADER_V1.unpack_from(head)
    if size - HEADER_V1.size != length:
        raise CorruptCheckpointError(path, f"payload has {size - HEADER_V1.size} bytes, header says {length} (truncated?)")
    payload = head[HEADER_V1.size:] + f.read()
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(path, "sha256 digest mismatch (file altered or partly written)")
    return payload


def _check_lengths(head: bytes, size: int, path: str) -> tuple[int, int, int, int, int]:
    _, crc, _, step, m, s, d = HEADER.unpack(head)
    expected = HEADER.size + m + s + d
    if expected != size:
        raise CorruptCheckpointError(path, f"file has {size} bytes, header says {expected} (truncated?)")
    return crc, step, m, s, d


def _crc_rest(f: BinaryIO, crc: int) -> int:
    while chunk := f.read(_CHUNK):
        crc = _crc(chunk, crc)
    return crc


def _parse_manifest(raw: bytes, data_length: int) -> tuple[list[int], list[list[Any]]]:
    manifest = json.loads(raw)
    sizes, tensors = manifest["storages"], manifest["tensors"]
    if manifest.get("byteorder") != sys.byteorder:
        raise ValueError(f"written on a {manifest.get('byteorder')}-endian machine, this one is {sys.byteorder}")
    if not (isinstance(sizes, list) and all(type(n) is int and n >= 0 for n in sizes) and sum(sizes) == data_length):
        raise ValueError("storage sizes do not add up to the data length")
    if not isinstance(tensors, list):
        raise ValueError("tensor table is not a list")
    return sizes, tensors


def verify_file(path: str) -> int:
    """Checks the length and digest of ``path`` without keeping its contents; returns its format."""
    with open(path, "rb", buffering=0) as f:
        head, size = _open_header(f, path)
        if head[:8] == MAGIC_V1:
            f.seek(0)
            _read_v1(f, f.read(HEADER_V1.size), size, path)
            return 1
        stored, *_ = _check_lengths(head, size, path)
        if _crc_rest(f, _crc(head[12:])) != stored:
            raise CorruptCheckpointError(path, "crc32c digest mismatch (file altered or partly written)")
    return 2


def _location(device: str, map_location: Any) -> Any:
    if map_location is None:
        return device
    if isinstance(map_location, dict):
        return map_location.get(device, device)
    return map_location


def _tensor(spec: list[Any], storages: list[torch.Tensor], path: str) -> torch.Tensor:
    _, index, dtype_name, shape, stride, offset, _device = spec
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype) or not 0 <= index < len(storages):
        raise CorruptCheckpointError(path, f"bad tensor entry {spec!r}")
    storage = storages[index]
    item = dtype.itemsize
    extent = 0 if 0 in shape else offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1
    if min([offset, *stride, *shape], default=0) < 0 or len(shape) != len(stride) or extent * item > storage.numel():
        raise CorruptCheckpointError(path, f"tensor entry {spec!r} lies outside its storage")
    return torch.empty(0, dtype=dtype, device=storage.device).set_(storage.untyped_storage(), offset, shape, stride)


def _rebuild(skeleton: Any, tensors: dict[int, torch.Tensor]) -> Any:
    ordinal = 0

    def walk(obj: Any) -> Any:
        nonlocal ordinal
        kind = type(obj)
        if isinstance(obj, torch.Tensor):
            n, ordinal = ordinal, ordinal + 1
            return tensors.get(n, obj)
        if kind is dict:
            return {k: walk(v) for k, v in obj.items()}
        if kind is _OrderedDict:
            new = _OrderedDict((k, walk(v)) for k, v in obj.items())
            new.__dict__.update(obj.__dict__)
            return new
        if kind is list:
            return [walk(v) for v in obj]
        if kind is tuple:
            return tuple(walk(v) for v in obj)
        return obj

    return walk(skeleton)


def _unpickle(data: bytes, map_location: Any, path: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # the digest matched, so this is a file made to run code, or a foreign pickle
        raise CorruptCheckpointError(path, f"refused to unpickle ({type(e).__name__}: {e})") from e


def read_file(path: str, map_location: Any = "cpu") -> Any:
    """Reads and verifies a format 1 or 2 file; returns the unpickled state (nothing runs before the check)."""
    with open(path, "rb", buffering=0) as f:
        head, size = _open_header(f, path)
        if head[:8] == MAGIC_V1:
            f.seek(0)
            return _unpickle(_read_v1(f, f.read(HEADER_V1.size), size, path), map_location, path)
        stored, _, m, s, d = _check_lengths(head, size, path)
        crc = _crc(head[12:])
        if m > _MAX_MANIFEST:
            raise CorruptCheckpointError(path, f"manifest length {m} is implausible (file altered?)")
        raw = _read_exact(f, m, path)
        crc = _crc(raw, crc)
        try:
            sizes, specs = _parse_manifest(raw, d)
        except (ValueError, KeyError, TypeError) as e:
            if _crc_rest(f, crc) != stored:
                raise CorruptCheckpointError(path, "crc32c digest mismatch (file altered or partly written)") from None
            raise CorruptCheckpointError(path, f"unreadable manifest ({e})") from None
        skeleton = _read_exact(f, s, path)
        crc = _crc(skeleton, crc)
        storages = []
        for n in sizes:
            buf = torch.empty(n, dtype=torch.uint8)
            crc = _read_into(f, buf.numpy().data, crc, path)
            storages.append(buf)
    if crc != stored:
        raise CorruptCheckpointError(path, "crc32c digest mismatch (file altered or partly written)")
    devices: dict[int, str] = {}
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 7 and type(spec[0]) is int and type(spec[1]) is int):
            raise CorruptCheckpointError(path, f"bad tensor entry {spec!r}")
        devices.setdefault(spec[1], str(spec[6]))
    placed = []
    for i, buf in enumerate(storages):  # per storage, so tensors that shared one still do
        target = torch.device(_location(devices.get(i, "cpu"), map_location))
        placed.append(buf if target == buf.device else buf.to(target))
    tensors = {spec[0]: _tensor(spec, placed, path) for spec in specs}
    return _rebuild(_unpickle(skeleton, map_location, path), tensors)
