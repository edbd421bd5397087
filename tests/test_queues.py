"""Tests for torchslim.queues: Coordinator, QueueRunner, QueueRunners, prefetch_queue.

Real threads, real queues, real DataLoader worker processes. Timing
assertions are on recorded timestamps or on generous bounds (1 s) so they
hold on a loaded 2-core machine.
"""
from __future__ import annotations

import collections as py_collections
import contextlib
import itertools
import sys
import threading
import time
import traceback

import pytest
import torch

import torchslim as slim
from torchslim import collections as slim_collections
from torchslim.queues import (
    Coordinator,
    NestedQueueRunnerError,
    PrefetchQueue,
    QueueRunner,
    QueueRunners,
    ThreadsStillRunningError,
    prefetch_queue,
    start_queue_runners,
)

QUEUE_RUNNERS = slim_collections.GraphKeys.QUEUE_RUNNERS


def producer_threads(name_part: str = "-producer-") -> list[threading.Thread]:
    return [t for t in threading.enumerate() if name_part in t.name]


@pytest.fixture(autouse=True)
def _no_thread_left_behind():
    """Every test must leave no producer thread alive (checked after a short settle)."""
    before = set(producer_threads())
    yield
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and set(producer_threads()) - before:
        time.sleep(0.01)
    left = set(producer_threads()) - before
    assert not left, f"producer threads left running: {[t.name for t in left]}"


# ---------------------------------------------------------------------------
# Coordinator (scenarios of TF's coordinator_test)
# ---------------------------------------------------------------------------


def _stop_in(coord, secs):
    time.sleep(secs)
    coord.request_stop()


def _raise_in(coord, secs, ex, report_exc_info):
    try:
        time.sleep(secs)
        raise ex
    except RuntimeError as e:
        coord.request_stop(sys.exc_info() if report_exc_info else e)


def _raise_in_with_handler(coord, secs, ex):
    with coord.stop_on_exception():
        time.sleep(secs)
        raise ex


def test_stop_api():
    coord = Coordinator()
    assert not coord.should_stop()
    assert not coord.wait_for_stop(0.01)
    coord.request_stop()
    assert coord.should_stop()
    assert coord.wait_for_stop(0.01)


def test_stop_async():
    coord = Coordinator()
    t = threading.Thread(target=_stop_in, args=(coord, 0.05))
    t.start()
    assert not coord.should_stop()
    assert coord.wait_for_stop(5.0)
    assert coord.should_stop()
    t.join()


def test_join_waits_for_threads_without_stop_request():
    coord = Coordinator()
    threads = [threading.Thread(target=time.sleep, args=(s,)) for s in (0.01, 0.05, 0.02)]
    for t in threads:
        t.start()
    coord.join(threads)
    assert not any(t.is_alive() for t in threads)
    assert coord.joined


def test_join_registered_and_given_threads():
    coord = Coordinator()
    registered = threading.Thread(target=time.sleep, args=(0.05,))
    given = threading.Thread(target=time.sleep, args=(0.02,))
    coord.register_thread(registered)
    for t in (registered, given):
        t.start()
    coord.join([given])
    assert not registered.is_alive() and not given.is_alive()


def test_join_grace_expires_names_the_threads():
    coord = Coordinator()
    release = threading.Event()
    stopper = threading.Thread(target=_stop_in, args=(coord, 0.01), name="stopper")
    sleeper = threading.Thread(target=release.wait, args=(10.0,), name="sleepy-worker", daemon=True)
    for t in (stopper, sleeper):
        t.start()
    try:
        with pytest.raises(ThreadsStillRunningError, match="threads still running.*sleepy-worker") as info:
            coord.join([stopper, sleeper], stop_grace_period_secs=0.05)
        assert isinstance(info.value, RuntimeError)
        assert info.value.thread_names == ["sleepy-worker"]
    finally:
        release.set()
        sleeper.join()


def test_join_ignore_live_threads():
    coord = Coordinator()
    release = threading.Event()
    sleeper = threading.Thread(target=release.wait, args=(10.0,), daemon=True)
    sleeper.start()
    coord.request_stop()
    try:
        coord.join([sleeper], stop_grace_period_secs=0.02, ignore_live_threads=True)  # no error
    finally:
        release.set()
        sleeper.join()


@pytest.mark.parametrize("report_exc_info", [False, True], ids=["exception", "exc_info"])
def test_join_raises_first_reported_exception(report_exc_info):
    coord = Coordinator()
    threads = [
        threading.Thread(target=_raise_in, args=(coord, 0.01, RuntimeError("First"), report_exc_info)),
        threading.Thread(target=_raise_in, args=(coord, 0.1, RuntimeError("Too late"), report_exc_info)),
    ]
    for t in threads:
        t.start()
    with pytest.raises(RuntimeError, match="First"):
        coord.join(threads)


def test_join_raises_first_exception_using_stop_on_exception():
    coord = Coordinator()
    threads = [
        threading.Thread(target=_raise_in_with_handler, args=(coord, 0.01, RuntimeError("First"))),
        threading.Thread(target=_raise_in_with_handler, args=(coord, 0.1, RuntimeError("Too late"))),
    ]
    for t in threads:
        t.start()
    with pytest.raises(RuntimeError, match="First"):
        coord.join(threads)


def test_clean_stop_exceptions_are_not_raised():
    coord = Coordinator()
    t = threading.Thread(target=_raise_in_with_handler, args=(coord, 0.01, StopIteration()))
    t.start()
    coord.join([t])  # StopIteration is TF's OutOfRangeError: a clean stop

    class MyStop(Exception):
        pass

    coord = Coordinator(clean_stop_exception_types=(MyStop,))
    with coord.stop_on_exception():
        raise MyStop("done")
    assert coord.should_stop()
    coord.join([])
    coord2 = Coordinator(clean_stop_exception_types=(MyStop,))
    coord2.request_stop(StopIteration())  # no longer clean with a custom tuple
    with pytest.raises(StopIteration):
        coord2.join([])


def test_stop_on_exception_reraises_keyboard_interrupt():
    coord = Coordinator()
    with pytest.raises(KeyboardInterrupt):
        with coord.stop_on_exception():
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        coord.raise_requested_exception()


def test_clear_stop_clears_exception_too():
    coord = Coordinator()
    coord.request_stop(ValueError("x"))
    assert coord.should_stop()
    coord.clear_stop()
    assert not coord.should_stop()
    coord.raise_requested_exception()  # nothing left to raise
    coord.join([])


def test_request_stop_after_join_raises():
    coord = Coordinator()
    coord.request_stop()
    coord.join([])
    with pytest.raises(ValueError, match="too late"):
        coord.request_stop(ValueError("too late"))
    coord.request_stop()  # a plain stop after join is fine
    coord.request_stop(StopIteration())  # and so is a clean one


def _failing_function():
    raise KeyError("original site")


def test_raise_requested_exception_keeps_original_traceback():
    coord = Coordinator()

    def worker():
        try:
            _failing_function()
        except KeyError as e:
            coord.request_stop(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    with pytest.raises(KeyError) as info:
        coord.raise_requested_exception()
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "_failing_function" in names
    # raising twice does not grow the traceback
    with pytest.raises(KeyError) as info2:
        coord.raise_requested_exception()
    assert len(traceback.extract_tb(info2.value.__traceback__)) == len(traceback.extract_tb(info.value.__traceback__))


def test_coordinator_bad_arguments():
    coord = Coordinator()
    with pytest.raises(TypeError, match=r"request_stop\(ex=.*'not an exception'"):
        coord.request_stop("not an exception")
    with pytest.raises(TypeError, match="sys.exc_info"):
        coord.request_stop((1, 2))
    with pytest.raises(ValueError, match="stop_grace_period_secs must be >= 0.*-1"):
        coord.join([], stop_grace_period_secs=-1)
    with pytest.raises(TypeError, match="threads must contain threading.Thread.*int 3"):
        coord.join([3])
    with pytest.raises(TypeError, match="threads must be a list"):
        coord.join(threading.Thread(target=print))
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        coord.wait_for_stop(-0.5)
    with pytest.raises(TypeError, match="thread must be a threading.Thread"):
        coord.register_thread("t")
    with pytest.raises(TypeError, match="clean_stop_exception_types"):
        Coordinator(clean_stop_exception_types=[int])
    assert not coord.should_stop()  # nothing above changed its state


# ---------------------------------------------------------------------------
# QueueRunner: end of data, errors, stops
# ---------------------------------------------------------------------------


def test_queue_runner_is_registered_in_collection():
    runner = QueueRunner(range(3))
    assert slim_collections.get_collection(QUEUE_RUNNERS) == [runner]
    unregistered = QueueRunner(range(3), collection=None)
    assert unregistered not in slim_collections.get_collection(QUEUE_RUNNERS)
    pq = prefetch_queue([1])
    assert slim_collections.get_collection(QUEUE_RUNNERS) == [runner, pq]
    assert isinstance(pq, QueueRunner) and isinstance(pq, PrefetchQueue)


@pytest.mark.parametrize("num_threads", [1, 4])
@pytest.mark.parametrize("managed", [False, True], ids=["standalone", "in_QueueRunners"])
def test_end_of_data_every_item_once_then_stop_iteration(num_threads, managed):
    n = 57
    runner = QueueRunner(iter(range(n)), capacity=3, num_threads=num_threads)
    with QueueRunners() if managed else contextlib.nullcontext():
        it = iter(runner)
        got = [next(it) for _ in range(n)]
        with pytest.raises(StopIteration):
            next(it)
        with pytest.raises(StopIteration):  # stays ended
            next(it)
    if num_threads == 1:
        assert got == list(range(n))
    else:
        assert sorted(got) == list(range(n))
    assert not producer_threads()


@pytest.mark.parametrize("num_threads", [1, 4])
def test_callable_source_each_thread_until_stop_iteration(num_threads):
    counter, lock = itertools.count(), threading.Lock()
    callers = set()

    def read_record():
        callers.add(threading.current_thread().name)
        with lock:
            i = next(counter)
        if i >= 40:
            raise StopIteration
        time.sleep(0.001)
        return i

    runner = QueueRunner(read_record, capacity=2, num_threads=num_threads)
    with QueueRunners():
        got = list(runner)
    assert sorted(got) == list(range(40))
    if num_threads == 1:
        assert got == list(range(40))
    assert len(callers) == num_threads


def test_producer_exception_reaches_blocked_consumer_within_one_second():
    raised_at = []

    def records():
        yield 0
        time.sleep(0.3)  # the consumer is blocked in next() meanwhile
        raised_at.append(time.monotonic())
        raise ValueError("corrupt record 1")

    runner = QueueRunner(records())
    it = iter(runner)
    assert next(it) == 0
    with pytest.raises(ValueError, match="corrupt record 1") as info:
        next(it)
    delay = time.monotonic() - raised_at[0]
    assert delay < 1.0, f"consumer saw the producer error after {delay:.3f} s"
    assert "records" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert runner.exceptions_raised == [info.value]


def test_producer_exception_with_other_threads_still_producing():
    """One of 4 threads fails while the others keep producing: the error still wins, fast."""
    lock = threading.Lock()
    counter = itertools.count()

    def read():
        with lock:
            i = next(counter)
        if i == 20:
            raise OSError("disk gone")
        time.sleep(0.005)
        return i

    runner = QueueRunner(read, num_threads=4, capacity=2)
    with pytest.raises(OSError, match="disk gone"):
        with QueueRunners():
            for _ in runner:
                time.sleep(0.002)


def test_consumer_wakes_on_stop_request():
    release = threading.Event()

    def hung():
        yield 1
        release.wait(10)  # a producer stuck on slow I/O
        yield 2

    runner = QueueRunner(hung(), collection=None)
    coord = Coordinator()
    threads = runner.create_threads(coord, start=True)
    it = iter(runner)
    assert next(it) == 1
    stop_at = []

    def stopper():
        time.sleep(0.2)
        stop_at.append(time.monotonic())
        coord.request_stop()

    s = threading.Thread(target=stopper)
    s.start()
    with pytest.raises(StopIteration):
        next(it)
    woke = time.monotonic() - stop_at[0]
    assert woke < 0.2, f"consumer woke {woke:.3f} s after the stop request"
    s.join()
    release.set()
    coord.join(threads, stop_grace_period_secs=5)


def test_poll_wakes_consumer_even_without_callback():
    """The stop flag alone (no queue cancel) wakes a blocked consumer within ~0.1 s."""
    release = threading.Event()

    def hung():
        release.wait(10)
        return 1

    runner = QueueRunner(hung, collection=None)
    coord = Coordinator()
    threads = runner.create_threads(coord, start=True)
    it = iter(runner)
    timer = threading.Timer(0.1, coord._stop_event.set)  # bypasses the callbacks on purpose
    t0 = time.monotonic()
    timer.start()
    with pytest.raises(StopIteration):
        next(it)
    assert time.monotonic() - t0 < 0.1 + 0.5
    timer.join()
    release.set()
    coord.join(threads, stop_grace_period_secs=5)


@pytest.mark.parametrize("how", ["break", "exception"])
def test_consumer_stops_early_standalone_threads_joined(how):
    runner = prefetch_queue(itertools.count(), capacity=2, num_threads=3)

    def consume():
        for i, _ in enumerate(runner):
            if i == 5:
                if how == "break":
                    break
                raise RuntimeError("consumer failed")

    if how == "break":
        consume()
    else:
        with pytest.raises(RuntimeError, match="consumer failed"):
            consume()
    # the owning iteration joined its threads before returning
    assert not producer_threads(), [t.name for t in threading.enumerate()]
    assert not runner.is_running()


@pytest.mark.parametrize("how", ["break", "exception"])
def test_consumer_stops_early_in_queue_runners_threads_joined(how):
    runner = QueueRunner(itertools.count(), capacity=2, num_threads=4)
    t0 = time.monotonic()
    try:
        with QueueRunners(stop_grace_period_secs=5):
            for i in runner:
                if i == 5:
                    if how == "break":
                        break
                    raise KeyError("stop here")
    except KeyError:
        assert how == "exception"
    assert time.monotonic() - t0 < 5
    assert not producer_threads()


def test_queue_is_bounded():
    produced = []
    consumed = []
    ahead = []

    def source():
        for i in range(30):
            produced.append(i)
            ahead.append(len(produced) - len(consumed))
            yield i

    capacity, num_threads = 3, 2
    for item in QueueRunner(source(), capacity=capacity, num_threads=num_threads, collection=None):
        time.sleep(0.003)
        consumed.append(item)
    # at most `capacity` queued + one item in each producer's hands + the one being consumed
    assert max(ahead) <= capacity + num_threads + 1
    assert sorted(consumed) == list(range(30))


def test_restart_gives_new_pass_over_reiterable_source():
    runner = prefetch_queue([1, 2, 3], collection=None)
    assert list(runner) == [1, 2, 3]
    assert list(runner) == [1, 2, 3]
    with QueueRunners(runners=[runner]):
        assert list(runner) == [1, 2, 3]
    gen_runner = QueueRunner(iter([1, 2]), collection=None)
    assert list(gen_runner) == [1, 2]
    assert list(gen_runner) == []  # a one-shot iterator stays exhausted


def test_items_queued_before_first_iteration_are_not_lost():
    runner = QueueRunner([1, 2, 3], capacity=5)
    with QueueRunners():
        deadline = time.monotonic() + 2
        while runner.is_running() and time.monotonic() < deadline:  # producers finish first
            time.sleep(0.01)
        assert runner.size() == 3
        assert list(runner) == [1, 2, 3]


def test_threads_are_daemon_and_named():
    release = threading.Event()
    runner = QueueRunner(lambda: release.wait(5) and 1, num_threads=2, name="reader")
    with QueueRunners() as coord:
        names = sorted(t.name for t in producer_threads())
        assert names == ["reader-producer-0", "reader-producer-1"]
        assert all(t.daemon for t in producer_threads())
        release.set()
        assert not coord.should_stop()
        assert runner.name == "reader" and runner.num_threads == 2 and runner.capacity == 2


def test_create_threads_returns_nothing_when_already_running():
    release = threading.Event()
    runner = QueueRunner(lambda: release.wait(5) and 1, collection=None)
    coord = Coordinator()
    threads = runner.create_threads(coord, start=True)
    assert len(threads) == 1
    assert runner.create_threads(coord, start=True) == []
    release.set()
    coord.request_stop()
    coord.join(threads, stop_grace_period_secs=5)


def test_queue_runner_bad_arguments():
    with pytest.raises(ValueError, match=r"capacity must be a positive int \(>= 1\), got 0"):
        QueueRunner([1], capacity=0)
    with pytest.raises(ValueError, match="num_threads must be a positive int.*got -2"):
        QueueRunner([1], num_threads=-2)
    with pytest.raises(TypeError, match="capacity must be a positive int, got bool True"):
        QueueRunner([1], capacity=True)
    with pytest.raises(TypeError, match="capacity must be a positive int, got float 2.5"):
        QueueRunner([1], capacity=2.5)
    with pytest.raises(TypeError, match="source must be an iterable .* or a callable.*got int 5"):
        QueueRunner(5)

    def gen():
        yield 1

    with pytest.raises(TypeError, match=r"generator function .*gen.*pass the generator"):
        QueueRunner(gen)
    with pytest.raises(TypeError, match="transform must be a callable"):
        QueueRunner([1], transform=3)
    with pytest.raises(TypeError, match="coord must be a torchslim.queues.Coordinator"):
        QueueRunner([1], collection=None).create_threads(coord="c")
    assert slim_collections.get_collection(QUEUE_RUNNERS) == []  # nothing half-registered


# ---------------------------------------------------------------------------
# QueueRunners (TF-Slim's queues.QueueRunners)
# ---------------------------------------------------------------------------


def test_queue_runners_nested_raises_and_outer_still_works():
    runner = QueueRunner(range(10), capacity=2)
    with QueueRunners() as coord:
        first = [x for _, x in zip(range(3), runner)]
        with pytest.raises(NestedQueueRunnerError, match="cannot be nested"):
            with QueueRunners():
                pass  # pragma: no cover
        rest = list(runner)
        assert not coord.should_stop()
    assert first + rest == list(range(10))
    with QueueRunners():  # the lock was released: a new block opens fine
        pass


def test_queue_runners_nested_from_another_thread_also_refused():
    errors = []
    with QueueRunners():
        def other():
            try:
                with QueueRunners():
                    pass
            except NestedQueueRunnerError as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1


def test_queue_runners_yields_its_coordinator_and_accepts_one():
    given = Coordinator()
    runner = QueueRunner(range(3))
    with QueueRunners(coordinator=given) as coord:
        assert coord is given
        assert list(runner) == [0, 1, 2]
    assert given.should_stop() and given.joined


def test_queue_runners_with_explicit_runners_ignores_collection():
    in_collection = QueueRunner(itertools.count(), name="not_started")
    explicit = QueueRunner(itertools.count(), name="explicit", collection=None)
    with QueueRunners(runners=[explicit]):
        assert [t.name for t in producer_threads()] == ["explicit-producer-0"]
        assert not in_collection.is_running()
        assert [x for _, x in zip(range(4), explicit)] == [0, 1, 2, 3]


def test_queue_runners_body_exception_propagates_unchanged_and_threads_joined():
    runner = QueueRunner(itertools.count(), num_threads=2)
    err = ValueError("body failed")
    with pytest.raises(ValueError) as info:
        with QueueRunners():
            next(iter(runner))
            raise err
    assert info.value is err
    assert not producer_threads()


def test_queue_runners_exit_reraises_producer_error_body_did_not_see():
    def bad():
        raise IndexError("bad shard")

    QueueRunner(bad)
    with pytest.raises(IndexError, match="bad shard"):
        with QueueRunners() as coord:
            assert coord.wait_for_stop(5)  # the producer failed; the body ignores it


def test_queue_runners_exit_body_error_is_kept_and_producer_error_noted():
    def bad():
        raise IndexError("bad shard")

    QueueRunner(bad)
    with pytest.raises(KeyError) as info:
        with QueueRunners() as coord:
            coord.wait_for_stop(5)
            raise KeyError("body")
    assert any("bad shard" in note for note in getattr(info.value, "__notes__", []))


def test_queue_runners_hung_producer_named_after_grace_period():
    release = threading.Event()

    def stuck():
        release.wait(30)
        return 0

    QueueRunner(stuck, name="stuck_reader")
    try:
        t0 = time.monotonic()
        with pytest.raises(ThreadsStillRunningError, match="stuck_reader-producer-0"):
            with QueueRunners(stop_grace_period_secs=0.2):
                pass
        assert time.monotonic() - t0 < 3
    finally:
        release.set()
    for t in producer_threads("stuck_reader"):
        t.join(5)


def test_queue_runners_bad_arguments():
    with pytest.raises(TypeError, match="runners must contain QueueRunner objects only, got list"):
        QueueRunners(runners=[[1, 2]])
    with pytest.raises(TypeError, match="runners must be a list of QueueRunner"):
        QueueRunners(runners=QueueRunner([1], collection=None))
    with pytest.raises(TypeError, match="coordinator must be a torchslim.queues.Coordinator"):
        QueueRunners(coordinator=object())
    with pytest.raises(ValueError, match="stop_grace_period_secs must be >= 0"):
        QueueRunners(stop_grace_period_secs=-3)
    slim_collections.add_to_collection(QUEUE_RUNNERS, "not a runner")
    with pytest.raises(TypeError, match="runners must contain QueueRunner objects only, got str"):
        with QueueRunners():
            pass  # pragma: no cover
    slim_collections.clear_collection(QUEUE_RUNNERS)
    with QueueRunners():  # the failed entry released the lock
        pass


def test_start_queue_runners_like_tf():
    a = QueueRunner(range(3))
    b = prefetch_queue(range(10, 12))
    coord = Coordinator()
    threads = start_queue_runners(coord)
    assert len(threads) == 2
    assert list(a) == [0, 1, 2]
    assert list(b) == [10, 11]
    coord.request_stop()
    coord.join(threads)


# ---------------------------------------------------------------------------
# Overlap (timestamps, not wall time)
# ---------------------------------------------------------------------------


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total = 0.0
    for s1, e1 in a:
        for s2, e2 in b:
            total += max(0.0, min(e1, e2) - max(s1, s2))
    return total


def test_production_and_consumption_overlap():
    produce, consume = [], []

    def batches():
        for i in range(15):
            t0 = time.monotonic()
            time.sleep(0.02)
            produce.append((t0, time.monotonic()))
            yield i

    for _ in prefetch_queue(batches(), capacity=2, collection=None):
        t0 = time.monotonic()
        time.sleep(0.02)
        consume.append((t0, time.monotonic()))
    busy = sum(e - s for s, e in consume)
    overlap = _overlap(produce, consume)
    # Serial code would give exactly 0; ideal prefetch ~14/15 of the consumer's busy time.
    assert overlap >= 0.5 * busy, f"overlap {overlap:.3f} s of {busy:.3f} s consumer time"
    # and the producer really ran ahead: batch i+1 started before step i ended, most of the time
    ahead = sum(1 for i in range(14) if produce[i + 1][0] < consume[i][1])
    assert ahead >= 10, ahead


# ---------------------------------------------------------------------------
# prefetch_queue (scenarios of TF-Slim's prefetch_queue_test)
# ---------------------------------------------------------------------------


def _counter_batches(num_batches, batch_size=10, image_size=32):
    for i in range(num_batches):
        yield (
            torch.arange(i * batch_size, (i + 1) * batch_size),
            torch.randn(batch_size, image_size, image_size, 3),
            torch.randint(0, 10, (batch_size, 1)),
        )


def test_prefetch_one_thread_keeps_order():
    batches = prefetch_queue(_counter_batches(5))
    with QueueRunners():
        it = iter(batches)
        for i in range(5):
            counter, images, labels = next(it)
            assert torch.equal(counter, torch.arange(i * 10, (i + 1) * 10))
            assert images.shape == (10, 32, 32, 3) and labels.shape == (10, 1)
        with pytest.raises(StopIteration):  # TF: OutOfRangeError
            next(it)


def test_prefetch_multi_thread_every_batch_once():
    batches = prefetch_queue(_counter_batches(5), num_threads=4)
    with QueueRunners():
        got = [b[0] for b in batches]
    assert torch.equal(torch.sort(torch.cat(got)).values, torch.arange(50))


def test_prefetch_multiple_consumers_share_the_queue():
    batches = prefetch_queue(_counter_batches(4), num_threads=4)
    with QueueRunners():
        iters = [iter(batches), iter(batches)]
        got = [next(it)[0] for _ in range(2) for it in iters]
        for it in iters:
            with pytest.raises(StopIteration):
                next(it)
    assert torch.equal(torch.sort(torch.cat(got)).values, torch.arange(40))


def test_prefetch_nested_structures_are_preserved():
    Pair = py_collections.namedtuple("Pair", "x y")
    batch = {
        "first": torch.tensor([1]),
        "second": torch.tensor([2.0, 2.1]),
        "nested": [Pair(torch.ones(2), (torch.zeros(1), "label")), 7],
    }
    (out,) = list(prefetch_queue([batch], collection=None))
    assert isinstance(out, dict) and set(out) == {"first", "second", "nested"}
    assert out["first"].dtype == torch.int64 and out["second"].dtype == torch.float32
    assert isinstance(out["nested"][0], Pair) and out["nested"][0].y[1] == "label" and out["nested"][1] == 7
    # device=None: the very same objects, no copy
    assert out is batch

    (out_cpu,) = list(prefetch_queue([batch], device="cpu", collection=None))
    assert out_cpu is not batch  # containers rebuilt ...
    assert out_cpu["first"] is batch["first"]  # ... but CPU tensors not copied
    assert out_cpu["nested"][0].x is batch["nested"][0].x
    assert isinstance(out_cpu["nested"][0], Pair)
    assert out_cpu["nested"][0].y[1] == "label"


def test_prefetch_torch_dataloader_with_workers():
    dataset = torch.utils.data.TensorDataset(torch.arange(40).float().unsqueeze(1), torch.arange(40))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    batches = prefetch_queue(loader, capacity=2)
    for _ in range(2):  # two epochs: each pass re-iterates the loader
        with QueueRunners():
            labels = [y for _, y in batches]
        assert torch.equal(torch.cat(labels), torch.arange(40))


def test_prefetch_bad_arguments():
    with pytest.raises(TypeError, match="iterable must be an iterable of batches.*got int 5"):
        prefetch_queue(5)
    with pytest.raises(TypeError, match="iterable must be an iterable.*function"):
        prefetch_queue(lambda: 1)
    with pytest.raises(ValueError, match="capacity must be a positive int.*got 0"):
        prefetch_queue([1], capacity=0)
    with pytest.raises(ValueError, match="num_threads must be a positive int.*got 0"):
        prefetch_queue([1], num_threads=0)
    with pytest.raises(ValueError, match="device must be None, a torch.device.*'gpu!'"):
        prefetch_queue([1], device="gpu!")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' was requested but CUDA is not available"):
            prefetch_queue([1], device="cuda")
    assert slim_collections.get_collection(QUEUE_RUNNERS) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_cuda_side_stream_copy():
    host = [(torch.randn(64, 3, 8, 8), torch.arange(64) + i) for i in range(6)]
    batches = prefetch_queue(host, device="cuda", collection=None)
    assert batches.device.type == "cuda"
    for (x, y), (hx, hy) in zip(batches, host):
        assert x.is_cuda and y.is_cuda
        assert torch.equal(x.cpu(), hx) and torch.equal(y.cpu(), hy)


# ---------------------------------------------------------------------------
# Through slim.learning.train (the lead's integration)
# ---------------------------------------------------------------------------


def test_producer_error_surfaces_in_train_within_one_second(tmp_path):
    model = torch.nn.Linear(3, 1)
    raised_at = []

    def batches():
        for i in range(1000):
            if i == 5:
                raised_at.append(time.monotonic())
                raise ValueError("corrupt batch 5")
            yield torch.randn(4, 3), torch.randn(4, 1)

    def total_loss(batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    data = prefetch_queue(batches(), capacity=2)  # registered: train runs it under QueueRunners
    train_op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="corrupt batch 5") as info:
        slim.learning.train(train_op, str(tmp_path / "logdir"), data=data, number_of_steps=100)
    assert time.monotonic() - raised_at[0] < 1.0
    assert "batches" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert not producer_threads()


def test_side_runner_error_stops_train_via_should_stop(tmp_path):
    """A registered runner that is not the data source fails: train notices via coord.should_stop()."""
    model = torch.nn.Linear(3, 1)
    raised_at = []

    def side_input():
        time.sleep(0.3)
        raised_at.append(time.monotonic())
        raise OSError("side input lost")

    QueueRunner(side_input)
    batch = (torch.randn(4, 3), torch.randn(4, 1))

    def total_loss(b):
        time.sleep(0.005)
        x, y = b
        return torch.nn.functional.mse_loss(model(x), y)

    train_op = slim.learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(OSError, match="side input lost"):
        slim.learning.train(train_op, str(tmp_path / "logdir"), data=itertools.repeat(batch), number_of_steps=100_000)
    assert time.monotonic() - raised_at[0] < 1.0
    assert not producer_threads()
