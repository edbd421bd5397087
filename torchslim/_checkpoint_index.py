"""Finding checkpoints: listing by stored global step across Saver prefixes, and the index file.

    list_checkpoints(dir)          # every checkpoint, oldest first by the global step stored inside each
    latest_checkpoint(dir, prefix='chkpt')
    read_index(dir)                # checkpoint.json, {} when missing or malformed

Public through ``torchslim.checkpoint``. Listing reads only each file's
48-byte header (cached while the file is unchanged), never the index alone:
the files are the truth, and the global step stored in a header outranks
the one in the file's name.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

from torchslim import _checkpoint_format as _format

logger = logging.getLogger("torchslim")

DEFAULT_PREFIX = "model.ckpt"
INDEX_FILE = "checkpoint.json"


def _check_path(arg: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{arg} must be a non-empty file path, got {path!r}")
    return os.fspath(path)


# ----------------------------------------------------------------- finding checkpoints
_STEP_RE = re.compile(r"^(?P<prefix>.+)-(?P<step>\d+)\.pt$")
_probe_cache: dict[str, tuple[tuple[int, int, int], tuple[int, int | None] | None]] = {}


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The global step encoded in a checkpoint file name (see :func:`stored_step` for the one inside).

    Example:
        >>> checkpoint_step('/tmp/logdir/model.ckpt-1200.pt')
        1200
    """
    m = _STEP_RE.match(os.path.basename(os.fspath(path)))
    if m is None:
        raise ValueError(f"path must name a checkpoint like 'model.ckpt-<step>.pt', got {path!r}")
    return int(m.group("step"))


def _probe(path: str) -> tuple[tuple[int, int, int], tuple[int, int | None] | None] | None:
    """``(identity, (format, stored step))`` of a file, from its header, cached while the file is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    identity = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _probe_cache.get(path)
    if cached is not None and cached[0] == identity:
        return cached
    entry = (identity, _format.probe(path))
    if len(_probe_cache) > 4096:
        _probe_cache.clear()
    _probe_cache[path] = entry
    name_step = checkpoint_step(path) if _STEP_RE.match(os.path.basename(path)) else None
    stored = entry[1][1] if entry[1] else None
    if stored is not None and name_step is not None and stored != name_step:
        logger.warning("Checkpoint %s holds global step %d although its name says %d; it is ordered by its "
                       "stored step", path, stored, name_step)
    return entry


def stored_step(path: str | os.PathLike[str]) -> int | None:
    """The global step recorded inside a checkpoint's header (None: not recorded, or a format 1 file).

    Example:
        >>> import tempfile, os
        >>> from torchslim.checkpoint import save_checkpoint
        >>> p = os.path.join(tempfile.mkdtemp(), 'model.ckpt-500.pt')
        >>> save_checkpoint(p, {'global_step': 20})
        >>> stored_step(p), checkpoint_step(p)
        (20, 500)
    """
    found = _probe(_check_path("path", path))
    return found[1][1] if found is not None and found[1] is not None else None


def _index_prefix(checkpoint_dir: str) -> str | None:
    prefix = read_index(checkpoint_dir).get("prefix")
    return prefix if isinstance(prefix, str) and prefix and os.sep not in prefix else None


class _Found:
    __slots__ = ("identity", "name_step", "path", "step")

    def __init__(self, path: str, step: int, name_step: int, identity: tuple[int, int, int]) -> None:
        self.path, self.step, self.name_step, self.identity = path, step, name_step, identity


def _find(checkpoint_dir: str, prefix: str | None) -> list[_Found]:
    """Checkpoint files of ``checkpoint_dir`` ordered by stored global step (the name's when none is stored).

    ``prefix`` None: the prefix the index records when files of it exist,
    else every file named ``<anything>-<step>.pt`` that is a torchslim
    checkpoint (whatever Saver prefix wrote it).
    """
    try:
        names = os.listdir(checkpoint_dir)
    except OSError:
        return []
    matches = [(m.group("prefix"), int(m.group("step")), name) for name in names
               if not name.startswith(".tmp-") and (m := _STEP_RE.match(name))]
    if prefix is None:
        indexed = _index_prefix(checkpoint_dir)
        chosen = [c for c in matches if c[0] == indexed] if indexed is not None else []
        any_prefix = not chosen
        if any_prefix:
            chosen = matches
    else:
        chosen, any_prefix = [c for c in matches if c[0] == prefix], False
    found = []
    for _, name_step, name in chosen:
        path = os.path.join(checkpoint_dir, name)
        probed = _probe(path)
        if probed is None:  # gone, or a dangling link: listed by name, so a reader says why it cannot load it
            found.append(_Found(path, name_step, name_step, (0, 0, 0)))
            continue
        if any_prefix and probed[1] is None:
            continue  # searching every prefix: not a torchslim checkpoint
        stored = probed[1][1] if probed[1] else None
        found.append(_Found(path, name_step if stored is None else stored, name_step, probed[0]))
    found.sort(key=lambda f: (f.step, f.name_step, f.path))
    return found


def list_checkpoints(checkpoint_dir: str | os.PathLike[str], prefix: str | None = None) -> list[str]:
    """Complete checkpoint files in ``checkpoint_dir``, oldest first by the global step stored in each.

    ``prefix``: only files ``<prefix>-<step>.pt``; None (default): the
    prefix recorded in the directory's index, or, without one, every
    torchslim checkpoint whatever its prefix. Temporary files of a save in
    progress are never listed; a file whose name disagrees with its stored
    step is reported once (a warning) and ordered by the stored step.
    Integrity is not checked here (see :func:`verify_checkpoint`).

    Example:
        >>> list_checkpoints('/nonexistent')
        []
    """
    return [f.path for f in _find(os.fspath(checkpoint_dir), prefix)]


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str], prefix: str | None = None) -> str | None:
    """Path of the newest checkpoint (highest stored global step) in ``checkpoint_dir``, or None.

    ``prefix`` as in :func:`list_checkpoints`.

    Example:
        >>> latest_checkpoint('/nonexistent') is None
        True
    """
    found = _find(os.fspath(checkpoint_dir), prefix)
    return found[-1].path if found else None


# ----------------------------------------------------------------- the index
def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, expected an object"
    name = entry.get("file")
    if not isinstance(name, str) or os.path.basename(name) != name or not _STEP_RE.match(name):
        return f"has no checkpoint file name (file={name!r})"
    if "step" not in entry:
        return "has no 'step'"
    step = entry["step"]
    if type(step) is not int or step < 0:
        return f"has step {step!r}, expected an int >= 0"
    t = entry.get("time")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        return f"has time {t!r}, expected a number"
    return None


def _parse_index(checkpoint_dir: str) -> tuple[dict[str, Any], str | None]:
    """The index and, when it is malformed, what is wrong with it."""
    path = os.path.join(checkpoint_dir, INDEX_FILE)
    if not os.path.lexists(path):
        return {}, None
    if os.path.isdir(path):
        return {}, "it is a directory"
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read())
    except (OSError, ValueError) as e:
        return {}, f"it is not readable JSON ({type(e).__name__}: {e})"
    if not isinstance(index, dict):
        return {}, f"it holds a {type(index).__name__}, expected an object"
    for key in ("recent", "kept"):
        entries = index.get(key, [])
        if not isinstance(entries, list):
            return {}, f"{key!r} is a {type(entries).__name__}, expected a list"
        for i, entry in enumerate(entries):
            problem = _entry_problem(entry)
            if problem is not None:
                return {}, f"entry {i} of {key!r} {problem}"
    preserved = index.get("last_preserved_time")
    if preserved is not None and (type(preserved) not in (int, float) or not math.isfinite(preserved)):
        return {}, f"'last_preserved_time' is {preserved!r}, expected a number"
    if not isinstance(index.get("prefix", DEFAULT_PREFIX), str):
        return {}, f"'prefix' is {index.get('prefix')!r}, expected a string"
    return index, None


def read_index(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``checkpoint.json`` of a directory ({} when missing or malformed).

    Example:
        >>> read_index('/nonexistent')
        {}
    """
    return _parse_index(os.fspath(checkpoint_dir))[0]
