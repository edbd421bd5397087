"""What train() and the evaluation loops show while they run: a bar on a terminal, log lines otherwise.

    import torchslim as slim

    slim.learning.train(train_op, logdir, data=loader, number_of_steps=3000)                 # 'auto'
    slim.learning.train(train_op, logdir, data=loader, number_of_steps=3000, progress='log')
    slim.evaluation.evaluate_once(path, eval_dir, eval_op=eval_op, data=batches, progress='none')

The choice follows Keras' ``verbose='auto'``:

* ``'bar'`` (``'auto'`` when stderr is a terminal): one line redrawn in place,
  ``train 120/1000 |####      | 231 steps/s loss=0.1234 ETA 00:04``. It is
  redrawn at most 10 times a second, and the loss is read (``.item()``, a
  device sync on a GPU) only when it is redrawn, so the steps in between cost
  one clock read each.
* ``'log'`` (``'auto'`` otherwise: a file, a pipe, a batch job): TF-Slim's
  ``global step N: loss = X (Y sec/step)`` line every ``log_every_n_steps``,
  and ``Evaluation [k/N]`` lines about every tenth of an evaluation.
* ``'none'``: neither. Other messages (restored checkpoints, warnings) still go
  to the ``torchslim`` logger.

When nothing has configured logging (no handler on the root logger nor on
``torchslim``), :func:`console_logging` gives the ``torchslim`` logger a
stderr handler, and the INFO level if it had none, for as long as the call
runs; the root logger is never touched. Once an application configures
logging (``logging.basicConfig(...)``), torchslim's records go where it says,
and a record no handler would print is never formatted (``isEnabledFor``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Literal

__all__ = ["MODES", "Progress", "console_logging", "resolve_mode"]

logger = logging.getLogger("torchslim")

MODES = ("auto", "bar", "log", "none")
ProgressMode = Literal["auto", "bar", "log", "none"]

REDRAW_SECS = 0.1  # at most 10 redraws a second


def resolve_mode(progress: Any, stream: IO[str] | None = None, arg: str = "progress") -> str:
    """``'bar'``, ``'log'`` or ``'none'`` for a ``progress=`` argument; ``'auto'`` asks whether ``stream`` is a terminal.

    Example:
        >>> import io
        >>> resolve_mode('auto', io.StringIO()), resolve_mode('bar'), resolve_mode('none')
        ('log', 'bar', 'none')
    """
    if not isinstance(progress, str) or progress not in MODES:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, MODES))}, got {progress!r}")
    if progress != "auto":
        return progress
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream is not None and stream.isatty() else "log"
    except (AttributeError, ValueError):  # a closed or replaced stream
        return "log"


class _ConsoleHandler(logging.StreamHandler):
    """torchslim's records on stderr, written above the progress bar while one is shown."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.bar: Any = None  # the tqdm bar being shown

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"

    def emit(self, record: logging.LogRecord) -> None:
        bar = self.bar
        if bar is None:
            super().emit(record)
            return
        try:
            bar.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


_console: _ConsoleHandler | None = None


@contextlib.contextmanager
def console_logging(level: int = logging.INFO) -> Iterator[None]:
    """Shows torchslim's messages on stderr for the span of the block, unless logging is configured.

    Adds a handler to the ``torchslim`` logger (never to the root logger) only
    when neither has one, and sets ``level`` only when the logger has none;
    both are undone on exit. Nested blocks share the outer handler.

    Example:
        >>> with console_logging():
        ...     pass
        >>> logging.getLogger().handlers == [] or True   # the root logger is left as it was
        True
    """
    global _console
    root = logging.getLogger()
    if root.handlers or logger.handlers:
        yield
        return
    handler = _console = _ConsoleHandler()
    old_level = logger.level
    logger.addHandler(handler)
    if old_level == logging.NOTSET:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        _console = None


def _width(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| {rate_noinv_fmt}{postfix} ETA {remaining}"
_COUNT_FORMAT = "{desc} {n_fmt}{unit}s [{elapsed}, {rate_noinv_fmt}{postfix}]"


class Progress:
    """Drives one loop's progress display; made by train() and the evaluation loops.

    ``mode`` is what :func:`resolve_mode` returns. ``start(n)`` opens a tqdm
    bar (in ``'bar'`` mode) and returns ``tick(n, loss=None)``, or None when
    there is nothing to draw per step, so the loop then pays nothing. ``tick``
    reads the clock and, at most every :data:`REDRAW_SECS`, ``loss.item()``,
    and redraws. ``close()`` draws the last state and ends the line.

    Example:
        >>> import io
        >>> times = iter([0.0, 0.05, 0.2, 0.3]).__next__
        >>> p = Progress('bar', total=3, desc='train', unit='step', file=io.StringIO(), clock=times)
        >>> tick = p.start(0)
        >>> reads = []
        >>> class Loss:
        ...     def item(self):
        ...         reads.append(1); return 0.5
        >>> for n in (1, 2, 3):
        ...     tick(n, Loss())
        >>> len(reads)      # step 1 came too soon after the start to redraw; 2 and 3 (the last) redrew
        2
        >>> p.close()
    """

    def __init__(self, mode: str, total: int | None, desc: str, unit: str, *, file: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic, leave: bool = True) -> None:
        self.mode, self.total, self.desc, self.unit = mode, total, desc, unit
        self.file, self.clock, self.leave = file, clock, leave
        self.bar: Any = None
        self._next = 0.0

    @property
    def logs(self) -> bool:
        """True when the loop should write its periodic log lines (``'log'`` mode)."""
        return self.mode == "log"

    def start(self, n: int) -> Callable[..., None] | None:
        """Opens the bar at ``n``; returns the per-step ``tick``, or None outside ``'bar'`` mode."""
        if self.mode != "bar":
            return None
        from tqdm import tqdm

        file = self.file or sys.stderr
        # A terminal that reports no size (a pty nobody sized) would get no bar from tqdm: use 80x24.
        sized = _width(file) > 0
        self.bar = tqdm(
            total=self.total, initial=n, desc=self.desc, unit=self.unit, file=file, leave=self.leave,
            dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24,
            mininterval=0, miniters=1, smoothing=0.1,  # torchslim decides when to redraw
            bar_format=_BAR_FORMAT if self.total is not None else _COUNT_FORMAT,
        )
        self._next = self.clock() + REDRAW_SECS
        if _console is not None:
            _console.bar = self.bar
        return self.tick

    def tick(self, n: int, loss: Any = None) -> None:
        """Called after each step or batch with the count so far; redraws at most every REDRAW_SECS."""
        now = self.clock()
        if now < self._next and n != self.total:
            return
        self._next = now + REDRAW_SECS
        bar = self.bar
        if bar is not None:
            if loss is not None:
                bar.set_postfix_str(f"loss={float(loss.item()):.4f}", refresh=False)
            bar.update(n - bar.n)

    def wrap(self, items: Iterable[Any], log_every: int | None = None) -> Iterator[Any]:
        """Yields ``items``, ticking after each: the bar, or a ``DESC [k/N]`` log line every ``log_every``."""
        tick = self.start(0)
        n = 0
        try:
            if tick is not None:
                for item in items:
                    yield item
                    n += 1
                    tick(n)
            elif self.mode == "log" and log_every and logger.isEnabledFor(logging.INFO):
                for item in items:
                    yield item
                    n += 1
                    if n % log_every == 0 or n == self.total:
                        logger.info("%s [%d/%s]", self.desc, n, "?" if self.total is None else self.total)
            else:
                yield from items
        finally:
            self.close(n)

    def close(self, n: int | None = None) -> None:
        """Draws the final count ``n`` (when given) and closes the bar; a no-op when none is shown."""
        bar = self.bar
        if bar is None:
            return
        self.bar = None
        if _console is not None and _console.bar is bar:
            _console.bar = None
        if n is not None and n != bar.n:
            bar.update(n - bar.n)
        bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
