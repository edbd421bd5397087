"""Checkpoints: crash-safe, self-verifying files and the index that lists them.

    import torchslim as slim

    saver = slim.checkpoint.Saver(max_to_keep=5)
    path = saver.save('/tmp/logdir', {'global_step': 100, 'model': model.state_dict()}, global_step=100)
    slim.checkpoint.latest_checkpoint('/tmp/logdir')       # '/tmp/logdir/model.ckpt-100.pt'
    state = slim.checkpoint.load_checkpoint(path)         # verified, no code executed
    slim.checkpoint.restore_model(path, model)            # loads the 'model' part, returns the step

A checkpoint file holds a header (with the global step and a crc32c of the
rest), a small JSON table of the tensors, a ``torch.save`` of the state with
its tensors taken out, and the tensors' raw bytes (see
``torchslim._checkpoint_format``). Saving streams the tensors straight from
memory to the file, computing the digest on the way; writing goes to a
temporary name, is fsynced, renamed into place and the directory fsynced,
so a crash at any instant leaves either the old set of complete files or the
old set plus one complete new file. Loading reads the tensors straight into
place, checks the length and the digest before anything is unpickled, and
unpickles with ``weights_only=True``, so a truncated, bit-flipped or
malicious file is refused without running anything. Files of format 1
(sha256, before torchslim 0.2) are still read.

A background save (``Saver.save_async``) copies the state off the live
tensors and hands the copy to a writer thread: the training thread only
waits, at its next ``optimizer.step()``, until that copy is done.

The index (``checkpoint.json`` in the directory, TF's ``checkpoint`` file)
records the saver's file prefix, which files it manages and which it keeps
forever (``keep_checkpoint_every_n_hours``). It is a convenience, not the
source of truth: listing always looks at the files themselves, orders them by
the global step stored inside each (a renamed file is reported, not
believed), and a malformed index is rebuilt from the files with one warning.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchslim import _checkpoint_format as _format
from torchslim._checkpoint_format import MAGIC, MAGIC_V1, CheckpointError, CorruptCheckpointError
from torchslim._checkpoint_index import (
    DEFAULT_PREFIX,
    INDEX_FILE,
    _check_path,
    _find,
    _parse_index,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    read_index,
    stored_step,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointState",
    "CorruptCheckpointError",
    "Saver",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "read_index",
    "restore_model",
    "save_checkpoint",
    "snapshot",
    "stored_step",
    "verify_checkpoint",
]

logger = logging.getLogger("torchslim")

FORMAT = "torchslim/2"
_FORMATS = ("torchslim/1", FORMAT)
_ = (MAGIC, MAGIC_V1)  # re-exported: variables.py tells torchslim files from plain torch.save files by them


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint does not fit the model it is loaded into (another model's, or no model state)."""


class CheckpointState(dict[str, Any]):
    """The dict :func:`load_checkpoint` returns; ``.path`` names the file it came from (pickles as a plain dict)."""

    path: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self),)


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
        with os.fdopen(fd, "wb", buffering=0) as f:
            write(f)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _write_payload(f: Any, flat: _format.FlatState) -> None:
    _format.write_flat(f, flat)


def _write_flat_file(path: str, flat: _format.FlatState) -> None:
    _atomic_write(path, lambda f: _write_payload(f, flat))


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any], global_step: int | None = None) -> None:
    """Writes ``state`` to ``path`` atomically, with a digest for verification.

    The tensors are written straight from memory (GPU tensors one storage
    at a time through the host); ``global_step`` (default:
    ``state['global_step']``) is recorded in the header so listings can
    order files without reading them.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> save_checkpoint(os.path.join(d, 'model.ckpt-1.pt'), {'global_step': 1, 'w': torch.ones(2)})
        >>> load_checkpoint(os.path.join(d, 'model.ckpt-1.pt'))['w']
        tensor([1., 1.])
    """
    path = _check_path("path", path)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping (a dict of tensors, numbers, ...), got {type(state).__name__}")
    _write_flat_file(path, _format.flatten(state, global_step))


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Raises :class:`CorruptCheckpointError` unless ``path`` is intact (reads it once, keeps nothing).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-3.pt')
        >>> save_checkpoint(p, {'global_step': 3})
        >>> verify_checkpoint(p)
    """
    _format.verify_file(_check_path("path", path))


def _check_map_location(map_location: Any) -> None:
    if map_location is None or isinstance(map_location, (str, torch.device)):
        return
    if isinstance(map_location, dict) and all(isinstance(k, str) and isinstance(v, (str, torch.device))
                                              for k, v in map_location.items()):
        return
    raise TypeError(f"map_location must be None, a device ('cpu', 'cuda:0') or a dict device -> device, "
                    f"got {map_location!r}")


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> CheckpointState:
    """Reads a checkpoint after checking its integrity; never executes code.

    Returns a :class:`CheckpointState` (a dict whose ``.path`` names the
    file). ``map_location``: where tensors go ('cpu', a device, a dict
    ``{'cuda:0': 'cpu'}``, or None: where they were saved). Raises
    FileNotFoundError for a missing path and :class:`CorruptCheckpointError`
    for a damaged or foreign file.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-5.pt')
        >>> save_checkpoint(p, {'global_step': 5})
        >>> load_checkpoint(p)['global_step']
        5
    """
    path = _check_path("path", path)
    _check_map_location(map_location)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    from torchslim import sharded_checkpoint  # the commit marker of a sharded (FSDP2/DCP) checkpoint

    if sharded_checkpoint.is_sharded(path):
        state = sharded_checkpoint.load_full(path, map_location)
    else:
        state = _format.read_file(path, map_location)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(path, f"payload is a {type(state).__name__}, expected a dict")
    loaded = CheckpointState(state)
    loaded.path = path
    return loaded


# ----------------------------------------------------------------- snapshots and models
class _Snapshot(dict[str, Any]):
    """A state whose tensors are private copies: a background save writes it without copying again."""

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self),)


def _copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy(v) for v in obj)
    return obj


def snapshot(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are cloned to CPU.

    Taken on the training thread, it freezes a consistent state that a
    background thread may then serialize while training goes on. (A
    :class:`Saver`'s ``save_async`` needs none: it copies the live state
    itself, faster.)

    Example:
        >>> w = torch.zeros(2); s = snapshot({'w': w}); w += 1; s['w']
        tensor([0., 0.])
    """
    copied = _copy(obj)
    return _Snapshot(copied) if type(copied) is dict else copied


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _first_mismatch(model_state: Mapping[str, Any], saved: Mapping[str, Any], strict: bool) -> tuple[str | None, int]:
    problems = []
    for name, value in model_state.items():
        if name not in saved:
            if strict and not name.endswith("num_batches_tracked"):  # torch fills that in for old batch norms
                problems.append(f"parameter {name!r} of the model is missing from the checkpoint")
        elif isinstance(value, torch.Tensor) and isinstance(saved[name], torch.Tensor) \
                and tuple(value.shape) != tuple(saved[name].shape):
            problems.append(f"parameter {name!r} has shape {tuple(saved[name].shape)} in the checkpoint and "
                            f"{tuple(value.shape)} in the model")
    if strict:
        problems += [f"the checkpoint has {name!r}, which the model lacks" for name in saved if name not in model_state]
    return (problems[0] if problems else None), len(problems)


def load_model_state(model: torch.nn.Module, state: Mapping[str, Any], strict: bool = True) -> None:
    """Loads ``state['model']`` into ``model``; another model's checkpoint gets an error naming file and parameter.

    The :class:`CheckpointMismatchError` names the file (``state.path``
    from :func:`load_checkpoint`), the first parameter that is missing,
    unexpected or of another shape, how many differ, and the fix.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-1.pt')
        >>> save_checkpoint(p, {'global_step': 1, 'model': torch.nn.Linear(2, 1).state_dict()})
        >>> try:
        ...     load_model_state(torch.nn.Linear(3, 1), load_checkpoint(p))
        ... except CheckpointMismatchError as e:
        ...     print(str(e).split('the model: ')[1].split(';')[0])
        parameter 'weight' has shape (1, 2) in the checkpoint and (1, 3) in the model
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = getattr(state, "path", None)
    where = f"checkpoint {path!r}" if path else "the checkpoint"
    fix = (f"Fix: point logdir at a directory holding this model's checkpoints (or move {path or 'the file'} away), "
           "or load only what fits with slim.variables.assign_from_checkpoint_fn(..., ignore_missing_vars=True) "
           "as init_fn")
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        keys = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointMismatchError(f"{where} has no 'model' state dict (keys: {keys}), so it is not a "
                                      f"torchslim training checkpoint. {fix}")
    saved = state["model"]
    first, count = _first_mismatch(model.state_dict(), saved, strict)
    if first is not None:
        hint = ""
        for wrapper in _WRAPPER_PREFIXES:
            if saved and all(str(k).startswith(wrapper) for k in saved):
                hint = f" (its names start with {wrapper!r}: it was saved from a wrapped model)"
        more = f" ({count} entries differ)" if count > 1 else ""
        raise CheckpointMismatchError(f"{where} does not fit the model: {first}{more}{hint}; it was written by "
                                      f"another model or another version of this one. {fix}")
    try:
        model.load_state_dict(saved, strict=strict)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{where} does not fit the model: {e}. {fix}") from e


def restore_model(checkpoint: str | os.PathLike[str] | Mapping[str, Any], model: torch.nn.Module,
                  strict: bool = True) -> int:
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
    load_model_state(model, state, strict=strict)
    return int(state.get("global_step", 0))


class Saver:
    """Saves numbered checkpoints into a directory and prunes old ones, like ``tf.train.Saver``.

    Args:
        max_to_keep: how many recent checkpoints to keep (None or 0: all).
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per
            this many hours forever.
        prefix: file names are ``<prefix>-<step>.pt``; the index records it,
            so readers (``latest_checkpoint``, evaluation) find the files.
        asynchronous: ``save_async`` copies the state and writes it on a
            background thread; ``save`` always blocks.

    A background save holds at most one copy of the state (host buffers it
    reuses from save to save; ``close`` frees them). Its error is raised by
    :meth:`raise_if_failed` (cheap: call it every step), or by the next
    ``save``, ``save_async`` or ``wait``.

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
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 0):
            raise ValueError(f"max_to_keep must be None or an int >= 0, got {max_to_keep!r}")
        if (isinstance(keep_checkpoint_every_n_hours, bool) or not isinstance(keep_checkpoint_every_n_hours, (int, float))
                or not keep_checkpoint_every_n_hours > 0 or math.isnan(keep_checkpoint_every_n_hours)):
            raise ValueError(
                f"keep_checkpoint_every_n_hours must be a number > 0, got {keep_checkpoint_every_n_hours!r}"
            )
        if not isinstance(prefix, str) or not prefix or os.sep in prefix or prefix.startswith(".tmp-"):
            raise ValueError(f"prefix must be a non-empty file name prefix, got {prefix!r}")
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = float(keep_checkpoint_every_n_hours)
        self.prefix = prefix
        self.asynchronous = bool(asynchronous)
        self._lock = threading.Lock()
        self._loaded_dir: str | None = None
        self._recent: list[dict[str, Any]] = []
        self._kept: list[dict[str, Any]] = []
        self._last_preserved: float | None = None
        self._jobs: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: tuple[str, BaseException] | None = None
        self._stager = _format.Stager()

    # -- index -------------------------------------------------------------
    def _load_index(self, logdir: str) -> None:
        if self._loaded_dir == logdir:
            return
        index, problem = _parse_index(logdir)
        self._remove_stale_temporaries(logdir)
        files = _find(logdir, self.prefix)
        if problem is not None:
            index_path = os.path.join(logdir, INDEX_FILE)
            if os.path.isdir(index_path):
                aside = f"{index_path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
                os.replace(index_path, aside)
                problem += f"; moved it to {aside}"
            logger.warning("The checkpoint index %s is malformed (%s); rebuilt it from the %d checkpoint files "
                           "on disk", index_path, problem, len(files))
        if index.get("prefix", self.prefix) != self.prefix:
            index = {}  # another saver's index: start from the files of this prefix
        by_name = {os.path.basename(f.path): f for f in files}

        def current(entry: dict[str, Any]) -> dict[str, Any]:
            found = by_name[entry["file"]]
            return {**entry, "step": found.step}  # the step stored in the file is the truth

        kept = [current(e) for e in index.get("kept", []) if e["file"] in by_name]
        kept_files = {e["file"] for e in kept}
        known = {e["file"]: e for e in index.get("recent", [])}
        recent = []
        for found in files:
            name = os.path.basename(found.path)
            if name in kept_files:
                continue
            entry = known.get(name) or {"file": name, "step": found.step, "time": os.path.getmtime(found.path)}
            recent.append(current(entry))
        self._recent, self._kept = recent, kept
        self._last_preserved = index.get("last_preserved_time")
        self._loaded_dir = logdir
        if problem is not None:
            self._write_index(logdir)

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
            "prefix": self.prefix,
            "latest": latest["file"] if latest else None,
            "recent": self._recent,
            "kept": self._kept,
            "last_preserved_time": self._last_preserved,
        }
        data = json.dumps(index, indent=1).encode()
        try:
            _atomic_write(os.path.join(logdir, INDEX_FILE), lambda f: f.write(data))
        except OSError as e:  # the checkpoint itself is complete; listings read the files
            logger.warning("Could not update the checkpoint index in %s: %s", logdir, e)

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
    def checkpoint_path(self, logdir: str | os.PathLike[str], global_step: int) -> str:
        """The file a save at ``global_step`` writes: ``<logdir>/<prefix>-<global_step>.pt``."""
        return os.path.join(os.fspath(logdir), f"{self.prefix}-{int(global_step)}.pt")

    def _save_now(self, logdir: str, flat: _format.FlatState, global_step: int, now: float) -> str:
        path = self.checkpoint_path(logdir, global_step)
        with self._lock:
            self._load_index(logdir)
            _write_flat_file(path, flat)
            name = os.path.basename(path)
            step = flat.global_step if flat.global_step != _format.NO_STEP else int(global_step)
            self._recent = [e for e in self._recent if e["file"] != name]
            self._kept = [e for e in self._kept if e["file"] != name]
            self._recent.append({"file": name, "step": step, "time": now})
            self._prune(logdir)
            self._write_index(logdir)
        return path

    def _check_args(self, logdir: Any, state: Any, global_step: Any) -> None:
        if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
            raise ValueError(f"logdir must be a directory path, got {logdir!r}")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")

    def save(self, logdir: str | os.PathLike[str], state: Mapping[str, Any], global_step: int,
             now: float | None = None) -> str:
        """Writes ``state`` as ``<logdir>/<prefix>-<global_step>.pt`` now, straight from its tensors; returns the path."""
        self._check_args(logdir, state, global_step)
        self.wait()
        os.makedirs(logdir, exist_ok=True)
        flat = _format.flatten(state, global_step)
        return self._save_now(os.fspath(logdir), flat, global_step, time.time() if now is None else now)

    def save_async(self, logdir: str | os.PathLike[str], state: Mapping[str, Any], global_step: int,
                   now: float | None = None) -> None:
        """Copies ``state`` off its live tensors and writes the copy on a background thread.

        Pass the live state (``train_op.state_dict()``): large CPU tensors
        are copied by the background thread while the caller goes on, and
        the next ``optimizer.step()`` anywhere in the process waits until
        that copy is done; GPU tensors are copied to pinned memory in stream
        order. A state from :func:`snapshot` is written as it is. Blocks
        while the previous background save is still being written (at most
        one copy of the state is held). Errors: see :meth:`raise_if_failed`;
        ``asynchronous=False`` writes at once, in the caller.
        """
        self._check_args(logdir, state, global_step)
        self.raise_if_failed()
        os.makedirs(logdir, exist_ok=True)
        logdir, now = os.fspath(logdir), time.time() if now is None else now
        if not self.asynchronous:
            self._save_now(logdir, _format.flatten(state, global_step), global_step, now)
            return
        self._jobs.join()
        self.raise_if_failed()
        if isinstance(state, _Snapshot):
            flat = _format.flatten(state, global_step)
        else:
            flat = _format.flatten(state, global_step, clone_inline=True)
            self._stager.stage(flat)
        try:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="torchslim-saver", daemon=True)
                self._thread.start()
            self._jobs.put((logdir, flat, global_step, now))
        except BaseException:
            _format.release_staging(flat)
            raise

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                logdir, flat, global_step, now = job
                try:
                    _format.release_staging(flat)  # finish the copy first: training waits for it
                    if self._error is None:
                        self._save_now(logdir, flat, global_step, now)
                except BaseException as e:  # surfaced by raise_if_failed on the training thread
                    self._error = (self.checkpoint_path(logdir, global_step), e)
            finally:
                self._jobs.task_done()

    def raise_if_failed(self) -> None:
        """Raises the error of a failed background save, naming the file and the OS error; never blocks.

        Cheap enough to call at every training step (one attribute read).

        Example:
            >>> Saver().raise_if_failed()   # nothing failed
        """
        if self._error is not None:
            (path, error), self._error = self._error, None
            failure = CheckpointError(
                f"the background checkpoint save to {path!r} failed: {type(error).__name__}: {error} "
                "(the previous checkpoints are intact; construct the Saver with asynchronous=False to see the "
                "error where it happens)"
            )
            failure.path = path  # type: ignore[attr-defined]
            raise failure from error

    def wait(self) -> None:
        """Blocks until queued saves are written; raises a background save's error."""
        if self._thread is not None:
            self._jobs.join()
        self.raise_if_failed()

    def close(self) -> None:
        """Waits for pending saves, stops the background thread and frees the staging buffers."""
        try:
            self.wait()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._jobs.put(None)
                self._thread.join()
            self._thread = None
            self._stager.release()

    # -- restoring ---------------------------------------------------------
    def restore_latest(self, logdir: str | os.PathLike[str],
                       map_location: Any = "cpu") -> tuple[str, CheckpointState] | None:
        """Loads the newest intact checkpoint (by stored global step) in ``logdir``; returns ``(path, state)`` or None.

        Damaged files are skipped with a warning that names them, and the
        previous intact one is used. The index is not needed.
        """
        for path in reversed(list_checkpoints(os.fspath(logdir), self.prefix)):
            try:
                return path, load_checkpoint(path, map_location=map_location)
            except (CorruptCheckpointError, OSError) as e:
                logger.warning("Skipping checkpoint %s: %s", path, e)
        return None


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
    from torchslim.cli import ArgumentParser  # errors in one line, as every torchslim command

    parser = ArgumentParser(
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
    probed = _format.probe(path)
    print(path)
    print(f"integrity: ok ({'sha256' if probed and probed[0] in (1, 3) else 'crc32c'} verified)")
    print(f"global step: {state.get('global_step', 'unknown')}")
    print(f"format: {state.get('format', 'unknown')}")
    print(f"tensors ({len(lines)}):")
    print("\n".join(lines))
    return 0
