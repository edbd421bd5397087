"""Sharded checkpoints: every rank writes its shard with torch.distributed.checkpoint (DCP).

    from torchslim import sharded_checkpoint

    saver = sharded_checkpoint.ShardedSaver(max_to_keep=5)
    path = saver.save('/tmp/logdir', {'global_step': 100, 'model': model.state_dict()}, global_step=100)
    # path == '/tmp/logdir/model.ckpt-100.pt': the commit marker; the shards are in model.ckpt-100.shards/
    state = sharded_checkpoint.load_full(path)     # any world size, no process group: full tensors
    slim.checkpoint.load_checkpoint(path)          # the same (it recognizes the marker)

A sharded checkpoint at step N is the directory ``<prefix>-N.shards`` that
DCP wrote (one ``__<rank>_<i>.distcp`` file per rank and DCP's
``.metadata``) and, beside it, the commit marker ``<prefix>-N.pt``. The
order of a save::

    chief: remove what a killed save of step N left; everyone waits for it
    every rank: DCP writes its shard (DCP's coordinator writes .metadata once all have)
    every rank: sha256 of its own files -> gathered on the chief (all ranks finished)
    chief: writes the marker (digests of every file) atomically, last; prunes old checkpoints

So a rank killed at any instant of a save leaves no marker for step N, and
the previous checkpoint stays the newest valid one. Loading checks every
file's size and digest against the marker before DCP reads a byte; a
missing, truncated or altered shard makes the checkpoint invalid. The marker
has the name a plain checkpoint file would have, so ``latest_checkpoint``,
``evaluate_once``, ``evaluation_loop`` and ``torchslim inspect`` find it;
:func:`load_full` gathers the shards into full tensors (DCP resharding), so a
checkpoint written by 2 ranks loads in one process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from torchslim import _checkpoint_format as _format
from torchslim import checkpoint as _checkpoint
from torchslim.checkpoint import CheckpointError, CorruptCheckpointError

__all__ = [
    "SHARDED_FORMAT",
    "ShardedSaver",
    "is_sharded",
    "latest_valid",
    "load_full",
    "load_into",
    "read_marker",
    "shards_dir",
    "verify_sharded",
]

logger = logging.getLogger("torchslim")

MAGIC = _format.SHARDED_MARKER_MAGIC
_HEADER = struct.Struct("<8s32sQ")
SHARDED_FORMAT = "torchslim-dcp/1"
SHARDS_SUFFIX = ".shards"
REPLICAS_KEY = "replicas"  # per-rank state: {'0': {...}, '1': {...}}, loaded only by its owner
_CHUNK = 1 << 20


def is_sharded(path: str) -> bool:
    """True when ``path`` is the commit marker of a sharded checkpoint.

    Example:
        >>> is_sharded('/nonexistent/model.ckpt-1.pt')
        False
    """
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def shards_dir(path: str) -> str:
    """The directory holding the shards of the checkpoint whose marker is ``path``.

    Example:
        >>> shards_dir('/tmp/logdir/model.ckpt-100.pt')
        '/tmp/logdir/model.ckpt-100.shards'
    """
    path = os.fspath(path)
    if not path.endswith(".pt"):
        raise ValueError(f"path must name a checkpoint marker like 'model.ckpt-<step>.pt', got {path!r}")
    return path[: -len(".pt")] + SHARDS_SUFFIX


def _digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _write_marker(path: str, marker: Mapping[str, Any]) -> None:
    payload = json.dumps(dict(marker), indent=1, sort_keys=True).encode()
    header = _HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload))

    def write(f: Any) -> None:
        f.write(header)
        f.write(payload)

    _checkpoint._atomic_write(path, write)


def read_marker(path: str) -> dict[str, Any]:
    """The verified contents of a commit marker (step, world size, digests of every shard file).

    Raises :class:`CorruptCheckpointError` for a damaged marker or a plain checkpoint.

    Example:
        >>> import tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-1.pt')
        >>> _write_marker(p, {'format': SHARDED_FORMAT, 'global_step': 1, 'world_size': 2, 'files': {}})
        >>> read_marker(p)['world_size']
        2
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size:
        raise CorruptCheckpointError(path, f"marker has {len(data)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, digest, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptCheckpointError(path, "not the commit marker of a sharded checkpoint (bad magic bytes)")
    payload = data[_HEADER.size:]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(path, "commit marker truncated or altered (sha256 mismatch)")
    marker = json.loads(payload)
    if not isinstance(marker, dict) or marker.get("format") != SHARDED_FORMAT:
        raise CorruptCheckpointError(path, f"commit marker of unknown format {marker.get('format')!r}")
    return marker


def verify_sharded(path: str) -> dict[str, Any]:
    """Checks the marker and the size and sha256 of every shard file; returns the marker.

    Raises :class:`CorruptCheckpointError` naming the first bad file.

    Example (``path`` written by :class:`ShardedSaver`)::

        verify_sharded('/tmp/logdir/model.ckpt-100.pt')['global_step']   # 100
    """
    marker = read_marker(path)
    directory = shards_dir(path)
    for name, expected in marker["files"].items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise CorruptCheckpointError(path, f"shard file {name!r} is missing")
        if os.path.getsize(file) != expected["size"]:
            raise CorruptCheckpointError(path, f"shard file {name!r} has {os.path.getsize(file)} bytes, "
                                               f"the marker says {expected['size']} (truncated?)")
        if _digest(file)["sha256"] != expected["sha256"]:
            raise CorruptCheckpointError(path, f"shard file {name!r}: sha256 digest mismatch (altered or partly written)")
    return marker


def latest_valid(logdir: str, prefix: str = _checkpoint.DEFAULT_PREFIX) -> str | None:
    """The marker of the newest sharded checkpoint in ``logdir`` whose files all verify, or None.

    Damaged ones are skipped with a warning naming them.

    Example:
        >>> latest_valid('/nonexistent') is None
        True
    """
    for path in reversed(_checkpoint.list_checkpoints(logdir, prefix)):
        if not is_sharded(path):
            continue
        try:
            verify_sharded(path)
            return path
        except (CorruptCheckpointError, OSError, ValueError) as e:
            logger.warning("Skipping sharded checkpoint %s: %s", path, e)
    return None


def _reader(path: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(shards_dir(path))


def load_into(path: str, state: dict[str, Any], process_group: Any = None) -> dict[str, Any]:
    """Loads the checkpoint at ``path`` into ``state`` in place (DCP; collective when a group exists).

    ``state`` holds the tensors (plain or DTensor) to fill and placeholders
    for the other values; keys the checkpoint lacks are left as they are.
    Every rank of the group calls it. Returns the verified marker.

    Example (every rank of an FSDP2 job)::

        state = {'model': get_model_state_dict(model), 'global_step': 0}
        load_into('/tmp/logdir/model.ckpt-100.pt', state)
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    marker = read_marker(path)
    use_group = dist.is_available() and dist.is_initialized()
    try:
        with _single_process():
            dcp.load(state, storage_reader=_reader(path), planner=DefaultLoadPlanner(allow_partial_load=True),
                     process_group=process_group if use_group else None, no_dist=not use_group)
    except Exception as e:
        raise CheckpointError(f"could not load sharded checkpoint {path!r}: {type(e).__name__}: {e}") from e
    return marker


def load_full(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Every entry of a sharded checkpoint as full tensors, in this process alone (any world size).

    The shards are verified first. Per-rank entries (each replica's RNG
    streams and data position) are left out: they belong to the ranks of
    the run that wrote them. ``slim.checkpoint.load_checkpoint`` calls this
    for a marker, so ``evaluate_once`` and ``torchslim inspect`` read a
    checkpoint written by any number of ranks.

    Example (a checkpoint written by 2 FSDP2 ranks)::

        plain_model.load_state_dict(load_full('/tmp/logdir/model.ckpt-100.pt')['model'])
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    verify_sharded(path)
    with tempfile.TemporaryDirectory(prefix="torchslim-dcp-") as tmp:
        full = os.path.join(tmp, "full.pt")
        try:
            with _single_process():
                dcp_to_torch_save(shards_dir(path), full)
            state = torch.load(full, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"could not load sharded checkpoint {path!r}: {type(e).__name__}: {e}") from e
    state.pop(REPLICAS_KEY, None)
    if map_location not in (None, "cpu"):
        state = _to(state, map_location)
    return state


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Silences DCP's warning that it runs in one process, which is what is asked for there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _to(obj: Any, device: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _group_rank(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class ShardedSaver:
    """Saves sharded checkpoints from every rank and prunes old ones (``max_to_keep``), like ``Saver``.

    Every rank of the process group calls :meth:`save` with its own state
    (DTensors for its shards; entries under ``'replicas'`` keyed by its rank
    for what only it owns). ``chief`` (a rank of the group) writes the
    commit marker and prunes.

    Args:
        max_to_keep: how many recent checkpoints to keep (None or 0: all).
        keep_checkpoint_every_n_hours: besides, keep the oldest checkpoint
            of every such period forever (decided from the markers' times).
        prefix: markers are ``<prefix>-<step>.pt``, shards ``<prefix>-<step>.shards/``.
        chief: the rank that writes markers (default 0).
        process_group: the group whose ranks write shards (default: the default group).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> saver = ShardedSaver(max_to_keep=1)
        >>> for step in (1, 2):
        ...     _ = saver.save(d, {'global_step': step, 'w': torch.ones(2) * step}, global_step=step)
        >>> sorted(os.listdir(d))
        ['model.ckpt-2.pt', 'model.ckpt-2.shards']
        >>> load_full(os.path.join(d, 'model.ckpt-2.pt'))['w']
        tensor([2., 2.])
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        prefix: str = _checkpoint.DEFAULT_PREFIX,
        chief: int = 0,
        process_group: Any = None,
    ) -> None:
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 0):
            raise ValueError(f"max_to_keep must be None or an int >= 0, got {max_to_keep!r}")
        if isinstance(keep_checkpoint_every_n_hours, bool) or not isinstance(keep_checkpoint_every_n_hours, (int, float)) \
                or keep_checkpoint_every_n_hours <= 0:
            raise ValueError(f"keep_checkpoint_every_n_hours must be a number > 0, got {keep_checkpoint_every_n_hours!r}")
        if not isinstance(prefix, str) or not prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a non-empty file name prefix, got {prefix!r}")
        if isinstance(chief, bool) or not isinstance(chief, int) or chief < 0:
            raise ValueError(f"chief must be the rank (an int >= 0) that writes the commit markers, got {chief!r}")
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = float(keep_checkpoint_every_n_hours)
        self.prefix = prefix
        self.chief = chief
        self.process_group = process_group
        self._last_preserved: float | None = None

    def checkpoint_path(self, logdir: str, global_step: int) -> str:
        """The marker path of step ``global_step`` in ``logdir``."""
        return os.path.join(logdir, f"{self.prefix}-{int(global_step)}.pt")

    def _broadcast(self, value: Any) -> Any:
        if _group_rank(self.process_group)[1] == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.process_group, self.chief)
                                   if self.process_group is not None else self.chief, group=self.process_group)
        return box[0]

    def save(self, logdir: str, state: Mapping[str, Any], global_step: int, now: float | None = None) -> str:
        """Writes this rank's part of step ``global_step``; the chief commits it. Returns the marker path.

        Collective: every rank calls it. A step that already has an intact
        marker is not written again.
        """
        if not isinstance(logdir, (str, os.PathLike)) or not str(logdir):
            raise ValueError(f"logdir must be a directory path, got {logdir!r}")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        logdir = os.fspath(logdir)
        rank, world = _group_rank(self.process_group)
        is_chief = rank == self.chief
        path = self.checkpoint_path(logdir, global_step)
        directory = shards_dir(path)
        decision: Any = None
        if is_chief:
            try:
                decision = self._prepare(logdir, path, directory)
            except OSError as e:  # told to the others too, so that none waits for a save that never starts
                decision = f"{type(e).__name__}: {e}"
        try:
            decision = self._broadcast(decision)  # everyone waits for the chief's clean-up
        except Exception as e:
            raise CheckpointError(f"rank {rank} of {world}: saving sharded checkpoint {path!r} failed: the ranks "
                                  f"could not agree to start it ({type(e).__name__}: {e})") from e
        if decision == "exists":
            return path
        if decision != "write":
            raise CheckpointError(f"saving sharded checkpoint {path!r} failed: the chief could not prepare "
                                  f"{directory!r}: {decision}")
        try:
            if not is_chief:
                os.makedirs(directory, exist_ok=True)
            with _single_process():
                dcp.save(dict(state), storage_writer=FileSystemWriter(directory, sync_files=True),
                         process_group=self.process_group, no_dist=world == 1)
            mine = {name: _digest(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
                    if name.startswith(f"__{rank}_")}
            everyone: list[Any] = [None] * world
            if world == 1:
                everyone = [mine]
            else:
                dist.gather_object(mine, everyone if is_chief else None, dst=self._chief_global(), group=self.process_group)
        except Exception as e:
            raise CheckpointError(
                f"rank {rank} of {world}: saving sharded checkpoint {path!r} failed (a peer rank died or the disk "
                f"failed?); the previous checkpoint stays the newest valid one. Cause: {type(e).__name__}: {e}"
            ) from e
        if is_chief:
            self._commit(logdir, path, directory, everyone, global_step, world, time.time() if now is None else now)
        return path

    def _chief_global(self) -> int:
        return dist.get_global_rank(self.process_group, self.chief) if self.process_group is not None else self.chief

    def _prepare(self, logdir: str, path: str, directory: str) -> str:
        os.makedirs(logdir, exist_ok=True)
        if os.path.exists(path):
            try:
                verify_sharded(path)
                return "exists"
            except (CorruptCheckpointError, OSError, ValueError):
                os.unlink(path)  # not a checkpoint: its files are rewritten below
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.makedirs(directory)
        return "write"

    def _commit(self, logdir: str, path: str, directory: str, parts: list[Any], step: int, world: int,
                now: float) -> None:
        files: dict[str, Any] = {}
        for part in parts:
            files.update(part)
        files[".metadata"] = _digest(os.path.join(directory, ".metadata"))
        unlisted = sorted(set(os.listdir(directory)) - set(files))
        if unlisted:
            raise CheckpointError(f"sharded checkpoint {path!r}: files {unlisted} were written but no rank reported "
                                  "them; not committing it")
        _checkpoint._fsync_dir(directory)
        _write_marker(path, {"format": SHARDED_FORMAT, "global_step": int(step), "world_size": world,
                             "time": now, "files": files})
        self._prune(logdir)

    def _prune(self, logdir: str) -> None:
        committed = []
        for marker in _checkpoint.list_checkpoints(logdir, self.prefix):
            try:
                committed.append((marker, read_marker(marker)))
            except (CorruptCheckpointError, OSError, ValueError):
                continue
        live = {os.path.basename(shards_dir(m)) for m, _ in committed}
        for name in os.listdir(logdir):  # what killed saves left: shards without a marker
            if name.startswith(self.prefix + "-") and name.endswith(SHARDS_SUFFIX) and name not in live:
                shutil.rmtree(os.path.join(logdir, name), ignore_errors=True)
        recent = [(m, info) for m, info in committed if not info.get("kept")]
        if self._last_preserved is None:  # a new process: the newest checkpoint kept forever, if any
            kept = [float(info.get("time", 0.0)) for _, info in committed if info.get("kept")]
            self._last_preserved = max(kept) if kept else None
        if not self.max_to_keep:
            return
        period = self.keep_checkpoint_every_n_hours * 3600
        for marker, info in recent[: max(len(recent) - self.max_to_keep, 0)]:
            t = float(info.get("time", 0.0))
            if self._last_preserved is None:
                self._last_preserved = t
            if t - self._last_preserved >= period:
                self._last_preserved = t
                _write_marker(marker, {**info, "kept": True})  # kept forever: never pruned
                continue
            os.unlink(marker)  # first: from here on it is no checkpoint
            shutil.rmtree(shards_dir(marker), ignore_errors=True)


def sharded_checkpoints(logdir: str, prefix: str = _checkpoint.DEFAULT_PREFIX) -> Iterable[str]:
    """Markers of the sharded checkpoints in ``logdir``, oldest first (not verified).

    Example:
        >>> list(sharded_checkpoints('/nonexistent'))
        []
    """
    return [p for p in _checkpoint.list_checkpoints(logdir, prefix) if is_sharded(p)]
