"""Preemption-safe stop: SIGTERM and Ctrl-C end training at a step boundary, with a checkpoint.

    from torchslim.preemption import StopSignals

    signals = StopSignals()
    signals.install()                    # what the Supervisor does on start, in the main thread
    while signals.received is None:      # the Supervisor checks it after every step
        step()
    save_checkpoint()
    signals.restore()
    signals.raise_for_signal()           # KeyboardInterrupt for SIGINT, Preempted (exit 143) for SIGTERM

While ``train()`` runs in the main thread, SIGTERM (what SLURM, Kubernetes,
torchrun and spot machines send) and SIGINT (Ctrl-C) no longer kill the
step in flight. The first one is noted; the loop finishes the step, the
chief writes a checkpoint synchronously (fsynced), writers are closed and
queue runners stopped; then SIGINT raises ``KeyboardInterrupt`` and SIGTERM
raises :class:`Preempted`, a ``SystemExit`` whose code is 143 (128 + 15),
so an uncaught one ends the process with the status schedulers expect for
a terminated job. A second signal stops at once: the handlers in place
before are put back and the exception is raised where the program is.

SLURM's early-warning signal (``sbatch --signal=USR1@120``) is SIGUSR1,
whose default action kills the process without a checkpoint. Under SLURM
(``SLURM_JOB_ID`` set) and only while nothing else has claimed SIGUSR1, it
is treated like SIGTERM (exit status 138 = 128 + 10), so the job stops with
a checkpoint before its time limit; requeue it in the batch script
(``scontrol requeue $SLURM_JOB_ID``) and it resumes at the next step.

Signals that were ignored when training started (``nohup``, a background
job's SIGINT) stay ignored; outside the main thread nothing is installed.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

__all__ = ["Preempted", "StopSignals", "exception_for"]


class Preempted(SystemExit):
    """Training stopped on SIGTERM (or SLURM's SIGUSR1) after its checkpoint; ``code`` is 128 + the signal."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.detail = detail

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}{': ' + self.detail if self.detail else ''}"


def exception_for(signum: int, detail: str = "") -> BaseException:
    """What a stop on ``signum`` raises: KeyboardInterrupt for SIGINT, :class:`Preempted` otherwise.

    Example:
        >>> exception_for(signal.SIGTERM).code
        143
        >>> type(exception_for(signal.SIGINT)).__name__
        'KeyboardInterrupt'
    """
    if signum == signal.SIGINT:
        return KeyboardInterrupt(detail) if detail else KeyboardInterrupt()
    return Preempted(signum, detail)


def _signals_to_handle() -> list[tuple[int, bool]]:
    """(signal, only if unclaimed): SIGTERM and SIGINT always, SIGUSR1 under SLURM when nobody handles it."""
    handled = [(int(signal.SIGTERM), False), (int(signal.SIGINT), False)]
    if os.environ.get("SLURM_JOB_ID") and hasattr(signal, "SIGUSR1"):
        handled.append((int(signal.SIGUSR1), True))
    return handled


class StopSignals:
    """Handlers that turn the first stop signal into a request (``received``) and a second into a stop now.

    Example:
        >>> before = signal.getsignal(signal.SIGTERM)
        >>> s = StopSignals(); s.install()
        >>> os.kill(os.getpid(), signal.SIGTERM)      # noted, not fatal
        >>> signal.Signals(s.received).name
        'SIGTERM'
        >>> s.restore(); signal.getsignal(signal.SIGTERM) is before
        True
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Installs the handlers (main thread only; a no-op elsewhere or when already installed)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum, only_if_unclaimed in _signals_to_handle():
            current = signal.getsignal(signum)
            if current is None or current is signal.SIG_IGN:  # set outside Python (cannot restore) or ignored
                continue
            if only_if_unclaimed and current is not signal.SIG_DFL:
                continue
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            return
        self.restore()
        raise exception_for(signum, f"a second {signal.Signals(signum).name} stopped training at once")

    def restore(self) -> None:
        """Puts back the handlers that were in place before :meth:`install`."""
        if not self._previous or threading.current_thread() is not threading.main_thread():
            return
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def raise_for_signal(self, detail: str = "") -> None:
        """Raises what the received signal asks for (see :func:`exception_for`); nothing if none came."""
        if self.received is not None:
            raise exception_for(self.received, detail)
