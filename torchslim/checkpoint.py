"""Checkpoints: crash-safe, self-verifying files and the index that lists them.

    import torchslim as slim

    saver = slim.checkpoint.Saver(max_to_keep=5)
    path = saver.save('/tmp/logdir', {'global_step': 100, 'model': model.state_dict()}, global_step=100)
    slim.checkpoint.latest_checkpoint('/tmp/logdir')       # '/tmp/logdir/model.ckpt-100.pt'
    state = slim.checkpoint.load_checkpoint(path)         # verified, no code executed
    slim.checkpoint.restore_model(path, model)            # loads the 'model' part, returns the step

A checkpoint file is ``MAGIC | sha256(payload) | len(payload) | payload``,
where the payload is ``torch.save`` of a dict of tensors, numbers, strings,
lists and dicts. Writing goes to a temporary name, is fsynced, renamed into
place and the directory fsynced, so a crash at any instant leaves either the
old set of complete files or the old set plus one complete new file.
Loading checks the length and the digest before unpickling, and unpickles
with ``weights_only=True``, so a truncated, bit-flipped or malicious file is
refused without running anything.

The index (``checkpoint.json`` in the directory, TF's ``checkpoint`` file)
records which files this saver manages and which it keeps forever
(``keep_checkpoint_every_n_hours``). It is a convenience, not the source of
truth: listing always looks at the files themselves, so a crash between the
rename and the index update loses nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import queue
import re
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "Saver",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_model",
    "save_checkpoint",
    "snapshot",
    "verify_checkpoint",
]

logger = logging.getLogger("torchslim")

MAGIC = b"TSLIMCK1"
_HEADER = struct.Struct("<8s32sQ")
DEFAULT_PREFIX = "model.ckpt"
INDEX_FILE = "checkpoint.json"
FORMAT = "torchslim/1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, altered or not a torchslim checkpoint."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"checkpoint {path!r} is corrupt: {reason}")
        self.path = path
        self.reason = reason


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _serialize(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def _write_payload(f: Any, payload: bytes) -> None:
    f.write(_HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload)))
    f.write(payload)


def save_checkpoint(path: str, state: Mapping[str, Any]) -> None:
    """Writes ``state`` to ``path`` atomically, with a digest for verification.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> save_checkpoint(os.path.join(d, 'model.ckpt-1.pt'), {'global_step': 1, 'w': torch.ones(2)})
        >>> load_checkpoint(os.path.join(d, 'model.ckpt-1.pt'))['w']
        tensor([1., 1.])
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path must be a non-empty file path, got {path!r}")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping (a dict of tensors, numbers, ...), got {type(state).__name__}")
    payload = _serialize(state)
    _atomic_write(str(path), lambda f: _write_payload(f, payload))


def _read_verified(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size:
        raise CorruptCheckpointError(path, f"file has {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, digest, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptCheckpointError(path, "not a torchslim checkpoint (bad magic bytes)")
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise CorruptCheckpointError(path, f"payload has {len(payload)} bytes, header says {length} (truncated?)")
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(path, "sha256 digest mismatch (file altered or partly written)")
    return payload


def verify_checkpoint(path: str) -> None:
    """Raises :class:`CorruptCheckpointError` unless ``path`` is intact.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-3.pt')
        >>> save_checkpoint(p, {'global_step': 3})
        >>> verify_checkpoint(p)
    """
    _read_verified(path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a checkpoint after checking its integrity; never executes code.

    Raises FileNotFoundError for a missing path and
    :class:`CorruptCheckpointError` for a damaged or foreign file.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-5.pt')
        >>> save_checkpoint(p, {'global_step': 5})
        >>> load_checkpoint(p)['global_step']
        5
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path must be a checkpoint file path, got {path!r}")
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    from torchslim import sharded_checkpoint  # the commit marker of a sharded (FSDP2/DCP) checkpoint
    if sharded_checkpoint.is_sharded(path):
        return sharded_checkpoint.load_full(path, map_location)
    payload = _read_verified(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # the digest matched, so this is a file made to run code, or a foreign pickle
        raise CorruptCheckpointError(path, f"refused to unpickle ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(path, f"payload is a {type(state).__name__}, expected a dict")
    return state


_STEP_RE = re.compile(r"^(?P<prefix>.+)-(?P<step>\d+)\.pt$")


def checkpoint_step(path: str) -> int:
    """The global step encoded in a checkpoint file name.

    Example:
        >>> checkpoint_step('/tmp/logdir/model.ckpt-1200.pt')
        1200
    """
    m = _STEP_RE.match(os.path.basename(str(path)))
    if m is None:
        raise ValueError(f"path must name a checkpoint like 'model.ckpt-<step>.pt', got {path!r}")
    return int(m.group("step"))


def list_checkpoints(checkpoint_dir: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Complete checkpoint files in ``checkpoint_dir``, oldest (lowest step) first.

    Temporary files of a save in progress are never listed. Integrity is
    not checked here (see :func:`verify_checkpoint`).

    Example:
        >>> list_checkpoints('/nonexistent')
        []
    """
    try:
        names = os.listdir(checkpoint_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        m = _STEP_RE.match(name)
        if m and m.group("prefix") == prefix:
            found.append((int(m.group("step")), os.path.join(checkpoint_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """Path of the newest checkpoint file in ``checkpoint_dir``, or None.

    Example:
        >>> latest_checkpoint('/nonexistent') is None
        True
    """
    found = list_checkpoints(checkpoint_dir, prefix)
    return found[-1] if found else None


def snapshot(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are cloned to CPU.

    Taken on the training thread, it freezes a consistent state that a
    background thread may then serialize while training goes on.

    Example:
        >>> w = torch.zeros(2); s = snapshot({'w': w}); w += 1; s['w']
        tensor([0., 0.])
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


def restore_model(checkpoint: str | Mapping[str, Any], model: torch.nn.Module, strict: bool = True) -> int:
    """Loads the ``'model'`` part of a checkpoint into ``model``; returns its global step.

    Example:
        >>> import tempfile, os
        >>> net = torch.nn.Linear(2, 1)
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-7.pt')
        >>> save_checkpoint(p, {'global_step': 7, 'model': net.state_dict()})
        >>> restore_model(p, torch.nn.Linear(2, 1))
        7
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if "model" not in state:
        raise CheckpointError(f"checkpoint has no 'model' entry (keys: {sorted(state)})")
    model.load_state_dict(state["model"], strict=strict)
    return int(state.get("global_step", 0))


class Saver:
    """Saves numbered checkpoints into a directory and prunes old ones, like ``tf.train.Saver``.

    Args:
        max_to_keep: how many recent checkpoints to keep (None or 0: all).
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per
            this many hours forever.
        prefix: file names are ``<prefix>-<step>.pt``.
        asynchronous: ``save_async`` serializes and writes on a background
            thread (at most one pending save); ``save`` always blocks.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> saver = Saver(max_to_keep=2)
        >>> for step in (1, 2, 3):
        ...     _ = saver.save(d, {'global_step': step}, global_step=step)
        >>> [os.path.basename(p) for p in list_checkpoints(d)]
        ['model.ckpt-2.pt', 'model.ckpt-3.pt']
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        prefix: str = DEFAULT_PREFIX,
        asynchronous: bool = True,
    ) -> None:
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 0):
            raise ValueError(f"max_to_keep must be None or an int >= 0, got {max_to_keep!r}")
        if not isinstance(keep_checkpoint_every_n_hours, (int, float)) or keep_checkpoint_every_n_hours <= 0:
            raise ValueError(
                f"keep_checkpoint_every_n_hours must be a number > 0, got {keep_checkpoint_every_n_hours!r}"
            )
        if not isinstance(prefix, str) or not prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a non-empty file name prefix, got {prefix!r}")
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = float(keep_checkpoint_every_n_hours)
        self.prefix = prefix
        self.asynchronous = asynchronous
        self._lock = threading.Lock()
        self._loaded_dir: str | None = None
        self._recent: list[dict[str, Any]] = []
        self._kept: list[dict[str, Any]] = []
        self._last_preserved: float | None = None
        self._jobs: queue.Queue[tuple | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- index -------------------------------------------------------------
    def _load_index(self, logdir: str) -> None:
        if self._loaded_dir == logdir:
            return
        index = read_index(logdir)
        self._remove_stale_temporaries(logdir)
        kept = [e for e in index.get("kept", []) if os.path.exists(os.path.join(logdir, e["file"]))]
        kept_files = {e["file"] for e in kept}
        known = {e["file"]: e for e in index.get("recent", [])}
        recent = []
        for path in list_checkpoints(logdir, self.prefix):
            name = os.path.basename(path)
            if name in kept_files:
                continue
            entry = known.get(name) or {"file": name, "step": checkpoint_step(path), "time": os.path.getmtime(path)}
            recent.append(entry)
        self._recent, self._kept = recent, kept
        self._last_preserved = index.get("last_preserved_time")
        self._loaded_dir = logdir

    def _remove_stale_temporaries(self, logdir: str) -> None:
        # Left by a process killed mid-save; this saver is the only writer of the directory.
        for name in os.listdir(logdir):
            if name.startswith((f".tmp-{self.prefix}-", f".tmp-{INDEX_FILE}-")):
                try:
                    os.unlink(os.path.join(logdir, name))
                except FileNotFoundError:
                    pass

    def _write_index(self, logdir: str) -> None:
        latest = max(self._recent + self._kept, key=lambda e: e["step"], default=None)
        index = {
            "format": FORMAT,
            "latest": latest["file"] if latest else None,
            "recent": self._recent,
            "kept": self._kept,
            "last_preserved_time": self._last_preserved,
        }
        data = json.dumps(index, indent=1).encode()
        _atomic_write(os.path.join(logdir, INDEX_FILE), lambda f: f.write(data))

    def _prune(self, logdir: str) -> None:
        if not self.max_to_keep:
            return
        while len(self._recent) > self.max_to_keep:
            oldest = self._recent.pop(0)
            if self._last_preserved is None:
                self._last_preserved = oldest["time"]
            if oldest["time"] - self._last_preserved >= self.keep_checkpoint_every_n_hours * 3600:
                self._last_preserved = oldest["time"]
                self._kept.append(oldest)
                continue
            try:
                os.unlink(os.path.join(logdir, oldest["file"]))
            except FileNotFoundError:
                pass

    # -- saving ------------------------------------------------------------
    def checkpoint_path(self, logdir: str, global_step: int) -> str:
        return os.path.join(logdir, f"{self.prefix}-{int(global_step)}.pt")

    def _save_now(self, logdir: str, state: Mapping[str, Any], global_step: int, now: float) -> str:
        path = self.checkpoint_path(logdir, global_step)
        with self._lock:
            self._load_index(logdir)
            save_checkpoint(path, state)
            name = os.path.basename(path)
            self._recent = [e for e in self._recent if e["file"] != name]
            self._kept = [e for e in self._kept if e["file"] != name]
            self._recent.append({"file": name, "step": int(global_step), "time": now})
            self._prune(logdir)
            self._write_index(logdir)
        return path

    def _check_args(self, logdir: Any, state: Any, global_step: Any) -> None:
        if not isinstance(logdir, (str, os.PathLike)) or not str(logdir):
            raise ValueError(f"logdir must be a directory path, got {logdir!r}")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")

    def save(self, logdir: str, state: Mapping[str, Any], global_step: int, now: float | None = None) -> str:
        """Writes ``state`` as ``<logdir>/<prefix>-<global_step>.pt`` now; returns the path."""
        self._check_args(logdir, state, global_step)
        self.wait()
        os.makedirs(logdir, exist_ok=True)
        return self._save_now(str(logdir), state, global_step, time.time() if now is None else now)

    def save_async(self, logdir: str, state: Mapping[str, Any], global_step: int, now: float | None = None) -> None:
        """Queues a save of an already snapshotted ``state``; blocks only while a previous save is pending.

        An error of a background save is raised by the next call to
        ``save``, ``save_async`` or ``wait``. Pass ``asynchronous=False`` to
        the Saver to get it at once.
        """
        self._check_args(logdir, state, global_step)
        self._raise_pending_error()
        os.makedirs(logdir, exist_ok=True)
        now = time.time() if now is None else now
        if not self.asynchronous:
            self._save_now(str(logdir), state, global_step, now)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="torchslim-saver", daemon=True)
            self._thread.start()
        self._jobs.put((str(logdir), state, global_step, now))

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._save_now(*job)
            except BaseException as e:  # surfaced on the caller's next call
                self._error = e
            finally:
                self._jobs.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(
                f"a background checkpoint save failed: {error!r} "
                "(construct the Saver with asynchronous=False to see it where it happens)"
            ) from error

    def wait(self) -> None:
        """Blocks until queued saves are written; raises a background save's error."""
        if self._thread is not None:
            self._jobs.join()
        self._raise_pending_error()

    def close(self) -> None:
        """Waits for pending saves and stops the background thread."""
        try:
            self.wait()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._jobs.put(None)
                self._thread.join()
            self._thread = None

    # -- restoring ---------------------------------------------------------
    def restore_latest(self, logdir: str, map_location: Any = "cpu") -> tuple[str, dict[str, Any]] | None:
        """Loads the newest intact checkpoint in ``logdir``; returns ``(path, state)`` or None.

        Damaged files are skipped with a warning that names them, and the
        previous intact one is used.
        """
        for path in reversed(list_checkpoints(logdir, self.prefix)):
            try:
                return path, load_checkpoint(path, map_location=map_location)
            except (CorruptCheckpointError, OSError) as e:
                logger.warning("Skipping checkpoint %s: %s", path, e)
        return None


def read_index(checkpoint_dir: str) -> dict[str, Any]:
    """The parsed ``checkpoint.json`` of a directory ({} when missing or unreadable).

    Example:
        >>> read_index('/nonexistent')
        {}
    """
    try:
        with open(os.path.join(checkpoint_dir, INDEX_FILE)) as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, torch.Tensor):
        shape = "x".join(str(d) for d in value.shape) or "scalar"
        out.append(f"  {prefix}  {str(value.dtype).replace('torch.', '')}  {shape}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _describe(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _describe(f"{prefix}[{i}]", v, out)


def inspect_main(argv: list[str]) -> int:
    """``torchslim inspect CHECKPOINT``: step, tensors and integrity; exit 1 when corrupt."""
    parser = argparse.ArgumentParser(
        prog="torchslim inspect",
        description="Show a checkpoint's global step and tensors, and check its integrity.",
    )
    parser.add_argument("checkpoint", help="a checkpoint file, or a directory (its newest checkpoint)")
    args = parser.parse_args(argv)
    path = args.checkpoint
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            print(f"torchslim inspect: no checkpoint in directory {path!r}", file=sys.stderr)
            return 1
        path = found
    try:
        state = load_checkpoint(path)
    except FileNotFoundError as e:
        print(f"torchslim inspect: {e}", file=sys.stderr)
        return 1
    except CorruptCheckpointError as e:
        print(f"{path}\nintegrity: CORRUPT ({e.reason})")
        return 1
    lines: list[str] = []
    _describe("", {k: v for k, v in state.items() if k != "rng"}, lines)
    print(path)
    print("integrity: ok (sha256 verified)")
    print(f"global step: {state.get('global_step', 'unknown')}")
    print(f"format: {state.get('format', 'unknown')}")
    print(f"tensors ({len(lines)}):")
    print("\n".join(lines))
    return 0
