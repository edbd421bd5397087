"""The training logdir: one writer at a time, and storage that can take a checkpoint.

    from torchslim.logdir import LogdirLock

    with LogdirLock('/tmp/logdir'):      # what train() holds for its whole life
        ...                              # a second train() on /tmp/logdir fails at once

``train()`` (through its Supervisor, chief only) takes this lock before it
writes anything and keeps it until it returns, so two jobs started on one
logdir by mistake cannot resume from each other's half-written state or
overwrite each other's ``model.ckpt-N.pt``: the second fails within a
second with :class:`LogdirLockedError`, naming the first job's pid and host.
Evaluation and ``torchslim inspect`` only read, and take no lock.

The lock is ``fcntl.flock`` on ``<logdir>/train.lock``: the kernel drops it
when the holder exits, however it exits (``kill -9`` included), so a
restarted job never finds a stale lock. The file also holds the holder's
pid, host and start time, for the message only; it is left in place (an
unlinked lock file would let two jobs lock two different files).

Writing the holder's line into the lock file doubles as the storage check:
a read-only, full or missing logdir, or one that is not a directory, is
reported by :func:`prepare` before the first training step, as is a disk
with less free space than one checkpoint needs (:func:`check_free_space`).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any

__all__ = ["LOCK_FILE", "LogdirError", "LogdirLock", "LogdirLockedError", "check_free_space", "holder", "prepare"]

logger = logging.getLogger("torchslim")

LOCK_FILE = "train.lock"
_HOLDER_WAIT_SECS = 0.5  # a holder that just took the lock writes its line within microseconds
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_held_fds: set[int] = set()


def _close_in_child() -> None:
    # flock belongs to the open file, which a forked child (a DataLoader worker) shares: closing the
    # child's copy keeps an orphaned child of a killed trainer from holding the lock after its parent died.
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LogdirError(OSError):
    """The logdir cannot be used for training: not writable, full, not a directory, or in use."""


class LogdirLockedError(LogdirError):
    """Another ``train()`` holds the logdir; ``holder`` is its pid, host and start time (or {})."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _describe_os_error(e: OSError) -> str:
    return f"{type(e).__name__}: [Errno {e.errno}] {e.strerror}" if e.errno is not None else f"{type(e).__name__}: {e}"


def _unusable(logdir: str, e: OSError, doing: str) -> LogdirError:
    fix = {
        errno.EROFS: "the file system is mounted read-only; give a logdir on a writable one",
        errno.ENOSPC: "the disk is full; free space or give a logdir on another disk",
        errno.EDQUOT: "the disk quota is exhausted; free space or give a logdir on another disk",
        errno.EACCES: "this user may not write there; fix its permissions or give another logdir",
        errno.EPERM: "this user may not write there; fix its permissions or give another logdir",
        errno.ENOTDIR: "a part of the path is a file, not a directory; give a directory path",
        errno.EEXIST: "a file of that name exists; give a directory path",
    }.get(e.errno or 0, "give a logdir this process can write to")
    error = LogdirError(f"logdir {logdir!r} cannot be used for training: {doing} failed with "
                        f"{_describe_os_error(e)}; {fix}")
    error.errno = e.errno
    return error


def holder(logdir: str | os.PathLike) -> dict[str, Any]:
    """The pid, host and start time last written into ``<logdir>/train.lock`` ({} if none).

    Only meaningful while the lock is held; a finished job clears it.

    Example:
        >>> holder('/nonexistent')
        {}
    """
    try:
        with open(os.path.join(os.fspath(logdir), LOCK_FILE), "rb") as f:
            return _parse_holder(f.read(4096))
    except OSError:
        return {}


def _parse_holder(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data.decode())
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "a process that has not written its pid yet"
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return "this very process: a train() or Supervisor here has not stopped"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


class LogdirLock:
    """An exclusive, process-lifetime lock on a training logdir (``fcntl.flock`` on ``train.lock``).

    ``acquire`` raises :class:`LogdirLockedError` naming the holder when
    another process (or another ``LogdirLock`` in this one) holds it, and
    :class:`LogdirError` when the file cannot be written. On a file system
    that keeps no locks it logs a warning and goes on unlocked.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with LogdirLock(d):
        ...     try:
        ...         LogdirLock(d).acquire()
        ...     except LogdirLockedError as e:
        ...         print(e.holder['pid'] == os.getpid())
        True
        >>> holder(d)
        {}
    """

    def __init__(self, logdir: str | os.PathLike) -> None:
        if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
            raise ValueError(f"LogdirLock: argument 'logdir' must be a directory path, got {logdir!r}")
        self.logdir = os.fspath(logdir)
        self.path = os.path.join(self.logdir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock and writes this process's pid, host and start time into the lock file."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _unusable(self.logdir, e, f"opening {LOCK_FILE}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self._read_holder(fd)
            os.close(fd)
            raise LogdirLockedError(
                f"logdir {self.logdir!r} is in use by another train() ({_holder_text(info)}): two jobs on one "
                "logdir would overwrite each other's checkpoints; stop that job, or give this one another logdir",
                info,
            ) from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise _unusable(self.logdir, e, f"locking {LOCK_FILE}") from e
            logger.warning("The file system of logdir %r keeps no locks (%s): a second train() on this logdir "
                           "would not be detected", self.logdir, _describe_os_error(e))
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        try:
            os.ftruncate(fd, 0)
            data = json.dumps(info).encode() + b"\n"
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise _unusable(self.logdir, e, f"writing {LOCK_FILE}") from e
        self._fd = fd
        _held_fds.add(fd)

    def _read_holder(self, fd: int) -> dict[str, Any]:
        deadline = time.monotonic() + _HOLDER_WAIT_SECS
        while True:
            try:
                info = _parse_holder(os.pread(fd, 4096, 0))
            except OSError:
                info = {}
            if info or time.monotonic() >= deadline:
                return info
            time.sleep(0.01)

    def release(self) -> None:
        """Clears the holder's line and drops the lock (also done by the kernel if the process dies)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held_fds.discard(fd)
        try:
            os.ftruncate(fd, 0)
        except OSError:  # the line stays; it only names a holder while the file is locked
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> LogdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def prepare(logdir: str | os.PathLike) -> LogdirLock:
    """Makes ``logdir`` if needed and takes its lock, with one clear error for every way it can fail.

    Returns the held :class:`LogdirLock`. Raises :class:`LogdirError` when
    the path is not a directory or cannot be written (read-only, full, no
    permission), :class:`LogdirLockedError` when another job holds it.

    Example:
        >>> import tempfile
        >>> lock = prepare(os.path.join(tempfile.mkdtemp(), 'new', 'logdir')); lock.held
        True
        >>> lock.release()
    """
    path = os.fspath(logdir)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _unusable(path, e, "creating the directory") from e
    if not os.path.isdir(path):
        raise _unusable(path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), "opening the directory")
    lock = LogdirLock(path)
    lock.acquire()
    return lock


def check_free_space(logdir: str | os.PathLike, needed_bytes: int) -> None:
    """Raises :class:`LogdirError` when ``logdir``'s file system has less than ``needed_bytes`` free.

    File systems that report no size (some network and FUSE mounts) pass.

    Example:
        >>> check_free_space('/tmp', 1)
    """
    path = os.fspath(logdir)
    try:
        st = os.statvfs(path)
    except OSError:
        return
    if st.f_blocks == 0:
        return
    free = st.f_bavail * st.f_frsize
    if free < needed_bytes:
        raise LogdirError(
            f"logdir {path!r} has {_mib(free)} free, but a checkpoint of this model needs at least "
            f"{_mib(needed_bytes)}: the first save would fail; free space or give a logdir on another disk"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
