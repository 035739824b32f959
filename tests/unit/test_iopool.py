"""IOThreadPool with real threads: results and errors, threads on demand up to
the limit, order, calls before start, stop draining the queue, and that it
serves deferToThreadPool (the way every caller uses it). Every wait is
bounded by an Event timeout; nothing sleeps."""
from __future__ import annotations

import threading

import pytest
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from mailgw.iopool import IOThreadPool

WAIT = 10.0


@pytest.fixture
def pool():
    pool = IOThreadPool(maxthreads=3, name="test-io")
    pool.start()
    yield pool
    pool.stop()


def call(pool, f, *args):
    """Run f in the pool; (ok, result) once it is done."""
    done = threading.Event()
    box = []

    def on_result(ok, result):
        box.append((ok, result))
        done.set()

    pool.callInThreadWithCallback(on_result, f, *args)
    assert done.wait(WAIT)
    return box[0]


def test_result_and_error_reach_the_callback_in_a_pool_thread(pool):
    assert call(pool, lambda a, b: a + b, 2, 3) == (True, 5)
    ok, failure = call(pool, lambda: 1 / 0)
    assert not ok and isinstance(failure, Failure) and failure.check(ZeroDivisionError)
    ok, name = call(pool, lambda: threading.current_thread().name)
    assert ok and name.startswith("PoolThread-test-io-")


def test_threads_start_on_demand_up_to_the_limit_and_the_rest_wait_in_order(pool):
    release = threading.Event()
    all_busy = threading.Event()
    all_finished = threading.Event()
    started, finished = [], []
    lock = threading.Lock()

    def blocker(n):
        with lock:
            started.append(n)
            if len(started) == 3:
                all_busy.set()
        assert release.wait(WAIT)
        with lock:
            finished.append(n)
            if len(finished) == 6:
                all_finished.set()

    for n in range(6):
        pool.callInThread(blocker, n)
    assert all_busy.wait(WAIT)
    assert sorted(started) == [0, 1, 2]            # three threads, three calls running
    assert len(pool._threads) == 3                 # no fourth thread: the limit
    release.set()
    assert all_finished.wait(WAIT)
    assert sorted(finished) == list(range(6)) and sorted(started[3:]) == [3, 4, 5]


def test_an_idle_thread_takes_the_next_call_no_new_thread(pool):
    for _ in range(20):
        assert call(pool, lambda: 1) == (True, 1)
    assert len(pool._threads) == 1


def test_calls_before_start_wait_for_it():
    pool = IOThreadPool(maxthreads=2, name="late")
    ran = threading.Event()
    pool.callInThread(ran.set)
    assert not pool._threads and not ran.is_set()
    pool.start()
    try:
        assert ran.wait(WAIT)
    finally:
        pool.stop()


def test_stop_finishes_queued_calls_then_drops_new_ones():
    pool = IOThreadPool(maxthreads=1, name="stop")
    pool.start()
    gate = threading.Event()
    done = []
    pool.callInThread(gate.wait, WAIT)
    for n in range(5):
        pool.callInThread(done.append, n)
    stopper = threading.Thread(target=pool.stop)
    stopper.start()
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert done == [0, 1, 2, 3, 4]                 # nothing queued before stop() is lost
    assert pool.joined and not pool._threads
    pool.callInThread(done.append, "late")
    assert done == [0, 1, 2, 3, 4]


def test_a_failing_call_without_callback_is_logged_and_the_thread_goes_on():
    from twisted.logger import globalLogPublisher
    pool = IOThreadPool(maxthreads=1, name="one")   # one thread: the second call runs after the first
    pool.start()
    logged = []

    def observer(event):
        if "call failed" in event.get("log_format", "") and event.get("log_failure") is not None:
            logged.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    try:
        pool.callInThread(lambda: 1 / 0)
        assert call(pool, lambda: "alive") == (True, "alive")
    finally:
        globalLogPublisher.removeObserver(observer)
        pool.stop()
    assert len(logged) == 1 and logged[0].check(ZeroDivisionError)


def test_deferToThreadPool_works_with_it(pool):
    from twisted.internet.testing import MemoryReactor

    handed_back = threading.Event()
    calls = []

    class Reactor(MemoryReactor):
        def callFromThread(self, f, *args, **kwargs):    # the real reactor runs this on its thread
            calls.append((f, args, kwargs))
            handed_back.set()

    d = deferToThreadPool(Reactor(), pool, lambda: "read")
    assert handed_back.wait(WAIT)
    [(f, args, kwargs)] = calls
    f(*args, **kwargs)
    assert d.called and d.result == "read"
