"""Queues: producer threads, a coordinator that stops them, and a prefetch queue.

    import torchslim as slim

    batches = slim.queues.prefetch_queue(loader, capacity=2, device='cuda')  # a QueueRunner,
                                                            # registered in QUEUE_RUNNERS
    with slim.queues.QueueRunners() as coord:   # starts every registered runner's threads
        for batch in batches:                   # StopIteration after the last batch
            if coord.should_stop():             # an Event.is_set(): free to call every step
                coord.raise_requested_exception()
                break
            train_step(batch)
    # leaving the block requests stop and joins every producer thread

    for batch in slim.queues.prefetch_queue(loader):   # standalone: the loop owns the threads
        train_step(batch)                              # and joins them when it ends or breaks

TF-Slim's ``queues.QueueRunners(session)`` started the graph's queue runners
for the span of a ``with`` block; ``data.prefetch_queue`` added a runner that
kept a few batches ready. Here a :class:`QueueRunner` is a set of daemon
threads that fill a bounded in-memory queue from an iterable (shared by the
threads) or from a callable (called by each thread until it raises
``StopIteration``). The consumer iterates the runner. The three ways a run
ends:

* end of input: the last producer closes the queue; the consumer receives
  every item, then ``StopIteration``;
* a producer raises: the exception goes to the :class:`Coordinator`, which
  wakes every blocked producer and consumer at once; the consumer raises
  that same exception (original traceback included);
* the coordinator is asked to stop (``QueueRunners`` exit, another thread):
  producers and consumers wake at once; the consumer ends with
  ``StopIteration``; items still queued are dropped.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import numbers
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from torchslim import collections as _slim_collections

__all__ = [
    "Coordinator",
    "NestedQueueRunnerError",
    "PrefetchQueue",
    "QueueRunner",
    "QueueRunners",
    "ThreadsStillRunningError",
    "prefetch_queue",
    "start_queue_runners",
]

logger = logging.getLogger(__name__)

# Longest time a blocked producer or consumer sleeps before looking at the
# coordinator again. Stop requests also wake them at once (a stop callback
# cancels the queue); this bound is the safety net.
_POLL_SECS = 0.1

# Sentinels (compared with `is`, never with ==).
_END = object()  # the queue is closed and drained: end of input
_STOPPED = object()  # the coordinator was asked to stop

_runner_ids = itertools.count(1)


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return int(value)


def _check_seconds(name: str, value: Any, allow_none: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a number of seconds >= 0" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    seconds = float(value)
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return seconds


# --------------------------------------------------------------------------
# Coordinator
# --------------------------------------------------------------------------


class NestedQueueRunnerError(RuntimeError):
    """Raised when a :class:`QueueRunners` block is opened inside another one."""


class ThreadsStillRunningError(RuntimeError):
    """Raised by :meth:`Coordinator.join` when threads outlive the grace period.

    ``thread_names`` lists the names of the threads still alive.
    """

    def __init__(self, message: str, thread_names: Sequence[str]) -> None:
        super().__init__(message)
        self.thread_names = list(thread_names)


class Coordinator:
    """Stops a set of threads together and hands their first error to the caller.

    The counterpart of ``tf.train.Coordinator``: any thread may call
    :meth:`request_stop` (with an exception when it failed); every thread
    polls :meth:`should_stop` (or blocks in :meth:`wait_for_stop`); the main
    thread calls :meth:`join`, which waits for the threads and re-raises the
    first exception reported. Exceptions of ``clean_stop_exception_types``
    (``StopIteration`` by default, TF's ``OutOfRangeError``) count as a clean
    stop and are not re-raised.

    Example:
        >>> import threading, time
        >>> coord = Coordinator()
        >>> def worker():
        ...     with coord.stop_on_exception():
        ...         while not coord.should_stop():
        ...             time.sleep(0.01)
        >>> threads = [threading.Thread(target=worker) for _ in range(2)]
        >>> for t in threads:
        ...     t.start()
        >>> coord.request_stop()
        >>> coord.join(threads)
        >>> any(t.is_alive() for t in threads)
        False
    """

    def __init__(self, clean_stop_exception_types: Sequence[type[BaseException]] | None = None) -> None:
        if clean_stop_exception_types is None:
            clean_stop_exception_types = (StopIteration,)
        types_ = tuple(clean_stop_exception_types)
        for t in types_:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise TypeError(
                    "clean_stop_exception_types must be a sequence of exception classes, "
                    f"got {clean_stop_exception_types!r} (contains {t!r})"
                )
        self._clean_stop_exception_types = types_
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._exception: BaseException | None = None
        self._traceback: types.TracebackType | None = None
        self._joined = False
        self._registered_threads: dict[threading.Thread, None] = {}
        self._stop_callbacks: list[Callable[[], None]] = []

    # -- reporting ---------------------------------------------------------

    def _filter_exception(self, ex: Any) -> BaseException | None:
        if ex is None:
            return None
        if isinstance(ex, tuple):
            if len(ex) != 3 or not isinstance(ex[1], BaseException):
                raise TypeError(
                    "request_stop(ex=...) takes an exception or a sys.exc_info() tuple "
                    f"(type, value, traceback), got the tuple {ex!r}"
                )
            ex = ex[1]
        if not isinstance(ex, BaseException):
            raise TypeError(
                "request_stop(ex=...) takes an exception, a sys.exc_info() tuple or None, "
                f"got {type(ex).__name__} {ex!r}"
            )
        if isinstance(ex, self._clean_stop_exception_types):
            return None
        return ex

    def request_stop(self, ex: BaseException | tuple | None = None) -> None:
        """Asks every thread to stop; records ``ex`` if it is the first error.

        ``ex`` is an exception, a ``sys.exc_info()`` tuple or None. Only the
        first error reported before the stop is kept; later ones (and clean
        stop types) are dropped, as in TF. Called after :meth:`join` with an
        error, it raises that error, since nobody is left to report it.

        Example:
            >>> coord = Coordinator()
            >>> coord.request_stop(ValueError('bad record'))
            >>> coord.should_stop()
            True
            >>> coord.request_stop(KeyError('later'))   # dropped: not the first
            >>> try:
            ...     coord.raise_requested_exception()
            ... except ValueError as e:
            ...     print(e)
            bad record
        """
        exc = self._filter_exception(ex)
        with self._lock:
            if self._joined and exc is not None:
                raise exc.with_traceback(exc.__traceback__)
            if self._stop_event.is_set():
                return
            if exc is not None and self._exception is None:
                self._exception = exc
                self._traceback = exc.__traceback__
                logger.info("Error reported to Coordinator: %s: %s", type(exc).__name__, exc)
            self._stop_event.set()
            callbacks = list(self._stop_callbacks)
        for callback in callbacks:  # outside the lock: they take their own locks
            try:
                callback()
            except Exception:  # a broken callback must not hide the stop itself
                logger.exception("stop callback %r failed", callback)

    def should_stop(self) -> bool:
        """True once a stop was requested (an ``Event.is_set()``: cheap enough for every step).

        Example:
            >>> Coordinator().should_stop()
            False
        """
        return self._stop_event.is_set()

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Blocks until a stop is requested or ``timeout`` seconds pass; returns :meth:`should_stop`.

        Example:
            >>> Coordinator().wait_for_stop(0.01)
            False
        """
        timeout = None if timeout is None else _check_seconds("timeout", timeout, allow_none=True)
        return self._stop_event.wait(timeout)

    @contextlib.contextmanager
    def stop_on_exception(self) -> Iterator[None]:
        """Context for thread bodies: an exception in the block becomes :meth:`request_stop` (ex).

        ``Exception`` subclasses are swallowed after being reported (the
        thread then ends quietly; :meth:`join` re-raises the error).
        ``KeyboardInterrupt`` and ``SystemExit`` are reported and re-raised.

        Example:
            >>> coord = Coordinator()
            >>> with coord.stop_on_exception():
            ...     raise ValueError('worker failed')
            >>> coord.should_stop()
            True
        """
        try:
            yield
        except Exception as e:
            self.request_stop(e)
        except BaseException as e:
            self.request_stop(e)
            raise

    def raise_requested_exception(self) -> None:
        """Re-raises the exception given to :meth:`request_stop`, with its original traceback; else no-op.

        Example:
            >>> coord = Coordinator()
            >>> coord.raise_requested_exception()   # nothing reported: returns
            >>> coord.request_stop(RuntimeError('boom'))
            >>> try:
            ...     coord.raise_requested_exception()
            ... except RuntimeError as e:
            ...     print(e)
            boom
        """
        with self._lock:
            exc, tb = self._exception, self._traceback
        if exc is not None:
            raise exc.with_traceback(tb)

    def clear_stop(self) -> None:
        """Forgets the stop request and the recorded exception, so the threads can be run again.

        Example:
            >>> coord = Coordinator()
            >>> coord.request_stop(ValueError('x'))
            >>> coord.clear_stop()
            >>> coord.should_stop(), coord.raise_requested_exception()
            (False, None)
        """
        with self._lock:
            self._joined = False
            self._exception = None
            self._traceback = None
            self._stop_event.clear()

    # -- threads -----------------------------------------------------------

    @property
    def joined(self) -> bool:
        """True once :meth:`join` has run (until :meth:`clear_stop`)."""
        return self._joined

    def register_thread(self, thread: threading.Thread) -> None:
        """Adds ``thread`` to the threads that :meth:`join` waits for.

        Example:
            >>> import threading
            >>> coord = Coordinator()
            >>> t = threading.Thread(target=lambda: None)
            >>> coord.register_thread(t); t.start()
            >>> coord.join()
            >>> t.is_alive()
            False
        """
        if not isinstance(thread, threading.Thread):
            raise TypeError(f"thread must be a threading.Thread, got {type(thread).__name__} {thread!r}")
        with self._lock:
            self._registered_threads[thread] = None

    def join(
        self,
        threads: Iterable[threading.Thread] | None = None,
        stop_grace_period_secs: float = 120,
        ignore_live_threads: bool = False,
    ) -> None:
        """Waits for ``threads`` (and the registered ones) to finish; re-raises the first error.

        The wait has two phases, as in TF: until every thread has ended or
        a stop is requested; then, after a stop, at most
        ``stop_grace_period_secs`` more. Then: the first exception given to
        :meth:`request_stop` is re-raised (original traceback); otherwise,
        if threads are still alive, :class:`ThreadsStillRunningError` (a
        ``RuntimeError``) names them, unless ``ignore_live_threads`` is True
        (then they are only logged).

        ``join`` does not itself request a stop: call :meth:`request_stop`
        first when the threads would otherwise run on.

        Example:
            >>> import threading, time
            >>> coord = Coordinator()
            >>> t = threading.Thread(target=time.sleep, args=(0.01,))
            >>> t.start()
            >>> coord.join([t], stop_grace_period_secs=1)
        """
        grace = _check_seconds("stop_grace_period_secs", stop_grace_period_secs)
        if threads is None:
            threads = []
        elif isinstance(threads, threading.Thread) or not isinstance(threads, Iterable):
            raise TypeError(f"threads must be a list of threading.Thread or None, got {threads!r}")
        threads = list(threads)
        for t in threads:
            if not isinstance(t, threading.Thread):
                raise TypeError(f"threads must contain threading.Thread objects only, got {type(t).__name__} {t!r}")
        with self._lock:
            all_threads = list(dict.fromkeys([*threads, *self._registered_threads]))

        # Phase 1: until all threads are done or someone asks to stop.
        while True:
            alive = [t for t in all_threads if t.is_alive()]
            if not alive or self._stop_event.is_set():
                break
            alive[0].join(0.05)
        # Phase 2: the grace period.
        deadline = time.monotonic() + grace
        for t in all_threads:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            t.join(remaining)
        stragglers = [t.name for t in all_threads if t.is_alive()]

        with self._lock:
            self._joined = True
            self._registered_threads = {}
            exc, tb = self._exception, self._traceback
        if exc is not None:
            if stragglers:
                logger.warning("Coordinator stopped with threads still running: %s", ", ".join(stragglers))
            raise exc.with_traceback(tb)
        if stragglers:
            message = (
                f"Coordinator stopped with {len(stragglers)} threads still running after the "
                f"{grace:g} s grace period: {', '.join(stragglers)}"
            )
            if not ignore_live_threads:
                raise ThreadsStillRunningError(message, stragglers)
            logger.info("%s (ignored: ignore_live_threads=True)", message)

    # -- used by QueueRunner: wake blocked queues as soon as a stop comes --

    def _add_stop_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            stopped = self._stop_event.is_set()
            if not stopped:
                self._stop_callbacks.append(callback)
        if stopped:
            callback()

    def _remove_stop_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._stop_callbacks.remove(callback)


# --------------------------------------------------------------------------
# The bounded queue
# --------------------------------------------------------------------------


class _BoundedQueue:
    """FIFO of at most ``capacity`` items; ``close`` ends input, ``cancel`` stops everyone."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._cancelled = False

    def put(self, item: Any, stop: threading.Event) -> bool:
        """Blocks while full; False (item dropped) if the queue was closed or a stop came."""
        with self._lock:
            while len(self._items) >= self._capacity:
                if self._closed or self._cancelled or stop.is_set():
                    return False
                self._not_full.wait(_POLL_SECS)
            if self._closed or self._cancelled or stop.is_set():
                return False
            self._items.append(item)
            self._not_empty.notify()
            return True

    def get(self, stop: threading.Event) -> Any:
        """The next item, or ``_STOPPED`` after a stop, or ``_END`` once closed and drained."""
        with self._lock:
            while True:
                if self._cancelled or stop.is_set():
                    return _STOPPED
                if self._items:
                    item = self._items.popleft()
                    self._not_full.notify()
                    return item
                if self._closed:
                    return _END
                self._not_empty.wait(_POLL_SECS)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            self._items.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def size(self) -> int:
        with self._lock:
            return len(self._items)

    def drained(self) -> bool:
        with self._lock:
            return self._cancelled or (self._closed and not self._items)


class _Run:
    """One start of a runner: its queue, coordinator, threads and shared iterator."""

    def __init__(self, capacity: int, coord: Coordinator, num_threads: int) -> None:
        self.queue = _BoundedQueue(capacity)
        self.coord = coord
        self.threads: list[threading.Thread] = []
        self.live = num_threads  # producer threads not yet finished
        self.state_lock = threading.Lock()
        self.iter_lock = threading.Lock()  # serialises next() on the shared iterator
        self.iterator: Iterator[Any] | None = None
        self.exhausted = False
        self.exceptions: list[BaseException] = []

    def done(self) -> bool:
        with self.state_lock:
            live = self.live
        return live == 0 and self.queue.drained()


# --------------------------------------------------------------------------
# QueueRunner
# --------------------------------------------------------------------------


def _is_iterable(obj: Any) -> bool:
    return isinstance(obj, Iterable) or (hasattr(type(obj), "__getitem__") and not isinstance(obj, type))


class QueueRunner:
    """Producer threads that fill a bounded queue; the consumer iterates the runner.

    ``source`` is either

    * an iterable (a ``DataLoader``, a list, a generator): the
      ``num_threads`` threads share one iterator (``next`` is serialised),
      each applies ``transform`` in parallel and enqueues; each start of the
      runner calls ``iter(source)`` afresh, so a re-iterable source gives a
      new epoch each time;
    * a callable taking no arguments: every thread calls it repeatedly (so
      it must be thread-safe, like TF's enqueue ops) and stops when it
      raises ``StopIteration``.

    The queue holds at most ``capacity`` items; with ``num_threads`` threads
    at most ``capacity + num_threads`` items are produced ahead of the
    consumer. When every thread has finished, the queue closes: the consumer
    gets the remaining items, then ``StopIteration``. If a producer raises,
    the error goes to the coordinator and the consumer raises it (the same
    exception object, original traceback) within ~0.1 s, however long it
    was blocked.

    Order: with one thread, items arrive in source order. With several,
    every item still arrives exactly once and the items one thread takes
    keep their order, but a later item may overtake an earlier one taken
    by another thread.

    The runner is added to ``collection`` (``GraphKeys.QUEUE_RUNNERS``;
    None: not added), so :class:`QueueRunners` and
    :func:`start_queue_runners` start it. Iterating a runner that is not
    running (standalone use) starts it with its own coordinator; that
    iteration owns the threads and stops and joins them when it ends, breaks
    or raises (prefetched items are dropped).

    Threads are daemon threads: a producer stuck in ``source`` can never
    block interpreter exit; it is reported by name when it outlives
    ``stop_grace_period_secs``.

    Example:
        >>> runner = QueueRunner(range(5), capacity=2, collection=None)
        >>> list(runner)        # standalone: starts, drains, joins
        [0, 1, 2, 3, 4]
        >>> import itertools, threading
        >>> counter, lock = itertools.count(), threading.Lock()
        >>> def read_record():
        ...     with lock:
        ...         i = next(counter)
        ...     if i >= 6:
        ...         raise StopIteration
        ...     return i
        >>> sorted(QueueRunner(read_record, num_threads=3, collection=None))
        [0, 1, 2, 3, 4, 5]
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[[], Any],
        capacity: int = 2,
        num_threads: int = 1,
        *,
        transform: Callable[[Any], Any] | None = None,
        name: str | None = None,
        stop_grace_period_secs: float = 120,
        collection: str | None = _slim_collections.GraphKeys.QUEUE_RUNNERS,
    ) -> None:
        self._capacity = _check_positive_int("capacity", capacity)
        self._num_threads = _check_positive_int("num_threads", num_threads)
        if _is_iterable(source):
            self._source_is_callable = False
        elif callable(source):
            if inspect.isgeneratorfunction(source):
                raise TypeError(
                    f"source is the generator function {source.__qualname__!r}: pass the generator "
                    f"it returns ({source.__name__}()), or a callable that returns one item per call"
                )
            self._source_is_callable = True
        else:
            raise TypeError(
                "source must be an iterable (a DataLoader, list, generator...) or a callable "
                f"returning one item per call, got {type(source).__name__} {source!r}"
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a callable or None, got {type(transform).__name__} {transform!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        self._source = source
        self._transform = transform
        self._name = name or f"{self._default_name()}_{next(_runner_ids)}"
        self._grace = _check_seconds("stop_grace_period_secs", stop_grace_period_secs)
        self._lock = threading.Lock()
        self._run: _Run | None = None
        if collection is not None:
            _slim_collections.add_to_collection(collection, self)

    def _default_name(self) -> str:
        return "queue_runner"

    # -- properties --------------------------------------------------------

    @property
    def name(self) -> str:
        """The runner's name; its threads are called ``<name>-producer-<i>``."""
        return self._name

    @property
    def capacity(self) -> int:
        """The most items the queue holds."""
        return self._capacity

    @property
    def num_threads(self) -> int:
        """The number of producer threads per start."""
        return self._num_threads

    @property
    def exceptions_raised(self) -> list[BaseException]:
        """Exceptions the producer threads of the latest start raised (TF's ``exceptions_raised``)."""
        run = self._run
        return list(run.exceptions) if run is not None else []

    def size(self) -> int:
        """Items waiting in the queue now (0 when not started); ``size() / capacity`` is TF's fraction full.

        Example:
            >>> QueueRunner([1, 2], collection=None).size()
            0
        """
        run = self._run
        return run.queue.size() if run is not None else 0

    def is_running(self) -> bool:
        """True while some producer thread of the latest start has not finished.

        Example:
            >>> QueueRunner([1, 2], collection=None).is_running()
            False
        """
        run = self._run
        if run is None:
            return False
        with run.state_lock:
            return run.live > 0

    def __repr__(self) -> str:
        kind = "callable" if self._source_is_callable else "iterable"
        return (
            f"{type(self).__name__}(name={self._name!r}, source={kind}, capacity={self._capacity}, "
            f"num_threads={self._num_threads}, running={self.is_running()})"
        )

    # -- starting ----------------------------------------------------------

    def create_threads(
        self, coord: Coordinator | None = None, daemon: bool = True, start: bool = False
    ) -> list[threading.Thread]:
        """Creates (and with ``start=True`` starts) the producer threads of a new run.

        The threads register with ``coord`` (a new :class:`Coordinator` if
        None), report their errors to it and stop when it is asked to stop.
        Returns ``[]`` if the runner is already running, as TF does.

        Example:
            >>> coord = Coordinator()
            >>> runner = QueueRunner(range(3), collection=None)
            >>> threads = runner.create_threads(coord, start=True)
            >>> list(runner)
            [0, 1, 2]
            >>> coord.request_stop(); coord.join(threads)
        """
        if coord is None:
            coord = Coordinator()
        elif not isinstance(coord, Coordinator):
            raise TypeError(f"coord must be a torchslim.queues.Coordinator or None, got {type(coord).__name__} {coord!r}")
        with self._lock:
            if self.is_running():
                return []
            threads = self._new_run_locked(coord, daemon)
        if start:
            for t in threads:
                t.start()
        return threads

    def _new_run_locked(self, coord: Coordinator, daemon: bool) -> list[threading.Thread]:
        run = _Run(self._capacity, coord, self._num_threads)
        run.threads = [
            threading.Thread(
                target=self._produce, args=(run,), name=f"{self._name}-producer-{i}", daemon=bool(daemon)
            )
            for i in range(self._num_threads)
        ]
        self._run = run
        coord._add_stop_callback(run.queue.cancel)
        for t in run.threads:
            coord.register_thread(t)
        return list(run.threads)

    # -- producer side -----------------------------------------------------

    def _next_from_source(self, run: _Run) -> Any:
        if self._source_is_callable:
            try:
                return self._source()  # type: ignore[operator]
            except StopIteration:
                return _END
        with run.iter_lock:
            if run.exhausted:
                return _END
            if run.iterator is None:
                run.iterator = iter(self._source)  # type: ignore[arg-type]
            try:
                return next(run.iterator)
            except StopIteration:
                run.exhausted = True
                return _END

    def _produce(self, run: _Run) -> None:
        coord = run.coord
        try:
            while not coord.should_stop():
                item = self._next_from_source(run)
                if item is _END:
                    break
                if self._transform is not None:
                    item = self._transform(item)
                if not run.queue.put(item, coord._stop_event):
                    break
        except BaseException as e:
            run.exceptions.append(e)
            try:
                coord.request_stop(e)
            except BaseException:  # coordinator already joined: nobody else can report it
                logger.exception("producer %s failed after its coordinator was joined", threading.current_thread().name)
        finally:
            with run.state_lock:
                run.live -= 1
                last = run.live == 0
                if last:
                    run.iterator = None  # lets a DataLoader iterator shut its workers down
            if last:
                run.queue.close()
                coord._remove_stop_callback(run.queue.cancel)

    # -- consumer side -----------------------------------------------------

    def _finish(self, item: Any) -> Any:
        """Consumer-side hook applied to each dequeued item (see PrefetchQueue)."""
        return item

    def __iter__(self) -> Iterator[Any]:
        return self._consume()

    def _consume(self) -> Iterator[Any]:
        owned: tuple[Coordinator, list[threading.Thread]] | None = None
        with self._lock:
            run = self._run
            if run is None or run.done():
                coord = Coordinator()
                threads = self._new_run_locked(coord, daemon=True)
                run = self._run
                assert run is not None
                for t in threads:
                    t.start()
                owned = (coord, threads)
        error: BaseException | None = None
        try:
            stop = run.coord._stop_event
            while True:
                item = run.queue.get(stop)
                if item is _STOPPED or item is _END:
                    # A failed producer requests stop before it closes the queue,
                    # so its error is visible here in both cases.
                    run.coord.raise_requested_exception()
                    return
                yield self._finish(item)
        except BaseException as e:  # GeneratorExit (break) included
            error = e
            raise
        finally:
            if owned is not None:
                _stop_and_join(owned[0], owned[1], self._grace, False, error, f"iteration of {self._name}")


def _stop_and_join(
    coord: Coordinator,
    threads: list[threading.Thread],
    grace: float,
    ignore_live_threads: bool,
    error: BaseException | None,
    what: str,
) -> None:
    """request_stop + join; a join error never replaces an exception already in flight."""
    coord.request_stop()
    try:
        coord.join(threads, stop_grace_period_secs=grace, ignore_live_threads=ignore_live_threads)
    except BaseException as join_error:
        if error is None:
            raise
        if join_error is not error:
            logger.warning("while %s ended with %s, stopping its threads failed too: %r", what, type(error).__name__, join_error)
            if not isinstance(error, GeneratorExit) and hasattr(error, "add_note"):  # add_note: Python >= 3.11
                error.add_note(f"while stopping the queue runner threads: {type(join_error).__name__}: {join_error}")


# --------------------------------------------------------------------------
# QueueRunners and start_queue_runners
# --------------------------------------------------------------------------

_queue_runners_lock = threading.Lock()


def _check_runners(runners: Any) -> list[QueueRunner]:
    if isinstance(runners, QueueRunner) or not isinstance(runners, Iterable):
        raise TypeError(f"runners must be a list of QueueRunner or None, got {type(runners).__name__} {runners!r}")
    runners = list(runners)
    for r in runners:
        if not isinstance(r, QueueRunner):
            raise TypeError(f"runners must contain QueueRunner objects only, got {type(r).__name__} {r!r}")
    return runners


class QueueRunners:
    """Runs queue runners for the span of a ``with`` block (TF-Slim's ``queues.QueueRunners``).

    On entry: starts the threads of every runner in ``runners`` (default:
    the ``QUEUE_RUNNERS`` collection) under ``coordinator`` (default: a new
    :class:`Coordinator`) and returns that coordinator. On exit, also when
    the block raised: requests stop and joins the threads with
    ``stop_grace_period_secs``. If the block ended normally, exit re-raises
    the first producer error, or :class:`ThreadsStillRunningError` naming
    threads that outlived the grace period (unless
    ``ignore_live_threads``); if the block raised, its exception propagates
    unchanged (a different stop error is logged and added as a note).

    Blocks cannot be nested, even from another thread (one process-wide
    lock, as in TF-Slim): a second one raises
    :class:`NestedQueueRunnerError` and leaves the first one running.

    Example:
        >>> batches = prefetch_queue([1, 2, 3])          # registered in QUEUE_RUNNERS
        >>> with QueueRunners() as coord:
        ...     seen = [b for b in batches]
        ...     coord.should_stop()
        False
        >>> seen
        [1, 2, 3]
        >>> from torchslim import collections; collections.clear_collection(collections.GraphKeys.QUEUE_RUNNERS)
    """

    def __init__(
        self,
        runners: Iterable[QueueRunner] | None = None,
        coordinator: Coordinator | None = None,
        stop_grace_period_secs: float = 120,
        ignore_live_threads: bool = False,
    ) -> None:
        self._runners = None if runners is None else _check_runners(runners)
        if coordinator is not None and not isinstance(coordinator, Coordinator):
            raise TypeError(
                f"coordinator must be a torchslim.queues.Coordinator or None, got {type(coordinator).__name__} {coordinator!r}"
            )
        self._given_coordinator = coordinator
        self._grace = _check_seconds("stop_grace_period_secs", stop_grace_period_secs)
        self._ignore_live_threads = bool(ignore_live_threads)
        self.coordinator: Coordinator | None = None
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> Coordinator:
        if not _queue_runners_lock.acquire(blocking=False):
            raise NestedQueueRunnerError(
                "QueueRunners cannot be nested: a QueueRunners block is already open in this process "
                "(its runners keep running; consume them inside that block)"
            )
        try:
            runners = (
                self._runners
                if self._runners is not None
                else _check_runners(_slim_collections.get_collection(_slim_collections.GraphKeys.QUEUE_RUNNERS))
            )
            coord = self._given_coordinator if self._given_coordinator is not None else Coordinator()
            self.coordinator = coord
            self.threads = []
            try:
                for runner in runners:
                    self.threads.extend(runner.create_threads(coord, daemon=True, start=True))
            except BaseException as e:
                _stop_and_join(coord, self.threads, self._grace, True, e, "QueueRunners start")
                raise
        except BaseException:
            _queue_runners_lock.release()
            raise
        return coord

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        try:
            assert self.coordinator is not None
            _stop_and_join(self.coordinator, self.threads, self._grace, self._ignore_live_threads, exc, "the QueueRunners block")
        finally:
            self.threads = []
            _queue_runners_lock.release()
        return False


def start_queue_runners(
    coord: Coordinator | None = None,
    daemon: bool = True,
    start: bool = True,
    collection: str = _slim_collections.GraphKeys.QUEUE_RUNNERS,
) -> list[threading.Thread]:
    """Starts the threads of every runner in ``collection``; returns them (``tf.train.start_queue_runners``).

    Stopping is the caller's job: ``coord.request_stop(); coord.join(threads)``.

    Example:
        >>> runner = QueueRunner(range(4))
        >>> coord = Coordinator()
        >>> threads = start_queue_runners(coord)
        >>> list(runner)
        [0, 1, 2, 3]
        >>> coord.request_stop(); coord.join(threads)
        >>> from torchslim import collections; collections.clear_collection(collections.GraphKeys.QUEUE_RUNNERS)
    """
    if coord is None:
        coord = Coordinator()
    threads: list[threading.Thread] = []
    for runner in _check_runners(_slim_collections.get_collection(collection)):
        threads.extend(runner.create_threads(coord, daemon=daemon, start=start))
    return threads


# --------------------------------------------------------------------------
# prefetch_queue
# --------------------------------------------------------------------------


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Applies ``fn`` to every tensor in nested tuples / lists / dicts; keeps the containers' types."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        values = [_map_tensors(fn, v) for v in obj]
        if type(obj) in (list, tuple):
            return type(obj)(values)
        try:
            return type(obj)(values)
        except TypeError:
            return values if isinstance(obj, list) else tuple(values)
    if isinstance(obj, Mapping):
        items = {k: _map_tensors(fn, v) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:
            return type(obj)(items)  # type: ignore[call-arg]  # a Mapping subclass built from a dict
        except TypeError:
            return items
    return obj


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_tensors(v)


def _resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, bool):
        raise TypeError(f"device must be None, a torch.device, a string such as 'cuda:0' or an int, got {device!r}")
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"device must be None, a torch.device, a string such as 'cuda:0' or an int, got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available (torch.cuda.is_available() is False)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class _InFlight:
    """A batch whose host-to-device copy was issued on a side stream, and the event marking its end."""

    __slots__ = ("batch", "event")

    def __init__(self, batch: Any, event: Any) -> None:
        self.batch = batch
        self.event = event


class _CudaCopier:
    """Producer-side transform: pin host memory, copy on this thread's side stream, record an event."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._local = threading.local()

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def __call__(self, batch: Any) -> _InFlight:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(stream):
            out = _map_tensors(self._copy, batch)
            event = torch.cuda.Event()
            event.record(stream)
        return _InFlight(out, event)


class _ToDevice:
    """Producer-side transform for non-CUDA devices: ``tensor.to(device)`` (no copy when already there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, batch: Any) -> Any:
        return _map_tensors(lambda t: t.to(self.device), batch)


class PrefetchQueue(QueueRunner):
    """The :class:`QueueRunner` that :func:`prefetch_queue` returns; ``device`` is where batches land."""

    def __init__(
        self,
        iterable: Iterable[Any],
        capacity: int = 2,
        num_threads: int = 1,
        device: torch.device | str | int | None = None,
        *,
        name: str | None = None,
        stop_grace_period_secs: float = 120,
        collection: str | None = _slim_collections.GraphKeys.QUEUE_RUNNERS,
    ) -> None:
        if not _is_iterable(iterable):
            raise TypeError(
                "iterable must be an iterable of batches (a DataLoader, list, generator...), "
                f"got {type(iterable).__name__} {iterable!r}"
            )
        self._device = _resolve_device(device)
        transform: Callable[[Any], Any] | None
        if self._device is None:
            transform = None
        elif self._device.type == "cuda":
            transform = _CudaCopier(self._device)
        else:
            transform = _ToDevice(self._device)
        super().__init__(
            iterable,
            capacity,
            num_threads,
            transform=transform,
            name=name,
            stop_grace_period_secs=stop_grace_period_secs,
            collection=collection,
        )

    def _default_name(self) -> str:
        return "prefetch_queue"

    @property
    def device(self) -> torch.device | None:
        """The device batches are moved to (None: left where the iterable put them)."""
        return self._device

    def _finish(self, item: Any) -> Any:
        if isinstance(item, _InFlight):
            # Make the consumer's stream wait for the side-stream copy, and tell
            # the caching allocator the consumer's stream uses this memory now.
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(item.event)
            for t in _iter_tensors(item.batch):
                if t.is_cuda:
                    t.record_stream(stream)
            return item.batch
        return item


def prefetch_queue(
    iterable: Iterable[Any],
    capacity: int = 2,
    num_threads: int = 1,
    device: torch.device | str | int | None = None,
    *,
    name: str | None = None,
    stop_grace_period_secs: float = 120,
    collection: str | None = _slim_collections.GraphKeys.QUEUE_RUNNERS,
) -> PrefetchQueue:
    """Prefetches up to ``capacity`` batches of ``iterable`` in background threads.

    TF-Slim's ``data.prefetch_queue``: returns a :class:`QueueRunner`
    (registered in ``QUEUE_RUNNERS`` unless ``collection=None``) that is
    iterated like the original iterable. Use it standalone
    (``for batch in prefetch_queue(loader)``: the loop starts and joins the
    threads; each new loop is a new pass over ``iterable``) or inside a
    :class:`QueueRunners` block / ``slim.learning.train``.

    Batches are tensors or nested tuples / lists / dicts (namedtuples too)
    of tensors; other leaves pass through. ``device``:

    * None: batches are passed on untouched (no copy);
    * a CPU device: ``tensor.to('cpu')``, a no-op (no copy) for CPU tensors;
    * a CUDA device: each producer thread pins host memory (unless already
      pinned, e.g. by ``DataLoader(pin_memory=True)``) and issues the copy
      on its own side stream; the consumer's current stream waits on an
      event and the tensors are marked used by that stream
      (``record_stream``), so the copy of batch n+1 overlaps step n.

    Order: one thread (the default) keeps the iterable's order. With
    ``num_threads > 1`` every batch still arrives exactly once, but not
    necessarily in order (the threads take batches in order, copy them in
    parallel and enqueue whichever finishes first).

    Example:
        >>> import torch
        >>> data = [(torch.zeros(2, 3), torch.tensor([0, 1])) for _ in range(3)]
        >>> batches = prefetch_queue(data, capacity=2, collection=None)
        >>> [tuple(x.shape for x in b) for b in batches]
        [(torch.Size([2, 3]), torch.Size([2])), (torch.Size([2, 3]), torch.Size([2])), (torch.Size([2, 3]), torch.Size([2]))]
    """
    return PrefetchQueue(
        iterable,
        capacity,
        num_threads,
        device,
        name=name,
        stop_grace_period_secs=stop_grace_period_secs,
        collection=collection,
    )
