"""ReactorInbox: calls from pool threads reach the reactor thread, in order,
each exactly once, with one reactor wake-up per burst. The reactor here is a
queue the test thread drains, as a real reactor's thread would; the threaded
test waits on that queue with a bounded timeout and never sleeps."""
from __future__ import annotations

import queue
import threading

from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher

from mailgw.iopool import IOThreadPool, ReactorInbox

WAIT = 10.0


class QueueReactor:
    """callFromThread queues the call; `turn()` runs what is queued now."""

    def __init__(self):
        self.calls = queue.Queue()
        self.wakeups = 0

    def callFromThread(self, f, *args, **kwargs):
        self.wakeups += 1
        self.calls.put((f, args, kwargs))

    def turn(self, timeout=0.0):
        f, args, kwargs = self.calls.get(timeout=timeout) if timeout else self.calls.get_nowait()
        f(*args, **kwargs)


def test_a_burst_of_calls_wakes_the_reactor_once_and_runs_in_order():
    reactor = QueueReactor()
    inbox = ReactorInbox(reactor)
    ran = []
    for n in range(5):
        inbox.callFromThread(ran.append, n)
    assert reactor.wakeups == 1 and ran == []
    reactor.turn()
    assert ran == [0, 1, 2, 3, 4]
    assert reactor.calls.empty()


def test_a_call_after_a_run_wakes_the_reactor_again():
    reactor = QueueReactor()
    inbox = ReactorInbox(reactor)
    ran = []
    inbox.callFromThread(ran.append, "first")
    reactor.turn()
    inbox.callFromThread(ran.append, "second")
    assert reactor.wakeups == 2
    reactor.turn()
    assert ran == ["first", "second"]


def test_a_call_made_while_calls_run_is_not_lost():
    """A call arriving during a run (here: made by a call being run) is not
    taken by that run, which only takes what was there, and wakes the reactor."""
    reactor = QueueReactor()
    inbox = ReactorInbox(reactor)
    ran = []
    inbox.callFromThread(lambda: (ran.append("outer"), inbox.callFromThread(ran.append, "inner")))
    reactor.turn()
    assert ran == ["outer"] and reactor.wakeups == 2
    reactor.turn()
    assert ran == ["outer", "inner"]


def test_keyword_arguments_and_a_failing_call_do_not_stop_the_others():
    reactor = QueueReactor()
    inbox = ReactorInbox(reactor)
    ran, logged = [], []

    def observer(event):
        if event.get("log_failure") is not None:
            logged.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    try:
        inbox.callFromThread(lambda: 1 / 0)
        inbox.callFromThread(lambda *, key: ran.append(key), key="after")
        reactor.turn()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert ran == ["after"]
    assert len(logged) == 1 and logged[0].check(ZeroDivisionError)


def test_a_reactor_that_calls_at_once_runs_everything_once():
    """Test doubles call callFromThread's function immediately; nested runs
    must neither repeat nor drop a call."""
    class ImmediateReactor:
        def callFromThread(self, f, *args, **kwargs):
            f(*args, **kwargs)

    inbox = ReactorInbox(ImmediateReactor())
    ran = []

    def chain(n):
        ran.append(n)
        if n < 3:
            inbox.callFromThread(chain, n + 1)

    inbox.callFromThread(chain, 0)
    inbox.callFromThread(ran.append, "last")
    assert ran == [0, 1, 2, 3, "last"]


def test_many_threads_every_call_exactly_once_in_each_threads_order():
    reactor = QueueReactor()
    inbox = ReactorInbox(reactor)
    threads, per_thread = 8, 2000
    seen = {t: [] for t in range(threads)}
    start = threading.Barrier(threads)

    def producer(t):
        start.wait(WAIT)
        for n in range(per_thread):
            inbox.callFromThread(seen[t].append, n)

    workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    total = threads * per_thread
    while sum(map(len, seen.values())) < total:
        reactor.turn(timeout=WAIT)     # queue.Empty (a failure) if a call was stranded
    for worker in workers:
        worker.join(WAIT)
    assert all(seen[t] == list(range(per_thread)) for t in range(threads))
    assert reactor.wakeups < total      # bursts were coalesced
    while not reactor.calls.empty():    # leftover wake-ups find nothing to run twice
        reactor.turn()
    assert sum(map(len, seen.values())) == total


def test_deferToThreadPool_takes_it_as_its_reactor():
    reactor = QueueReactor()
    pool = IOThreadPool(maxthreads=2, name="test-inbox")
    pool.start()
    try:
        d = deferToThreadPool(ReactorInbox(reactor), pool, lambda: "read")
        reactor.turn(timeout=WAIT)
    finally:
        pool.stop()
    assert d.called and d.result == "read"
