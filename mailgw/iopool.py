"""IOThreadPool: the thread pool for blocking file work (fsync, reads, unlinks)
and password hashing; a drop-in for the parts of twisted.python.threadpool.
ThreadPool that deferToThreadPool and DurableWriter use.

Why not Twisted's own: every call goes through its Team coordinator and a
ThreadWorker whose queue is a Python Condition, so a hand-off costs several
lock allocations and futex calls. A relayed message makes two to three
hand-offs (spool commit, read, removal); measured with deferToThreadPool and
16 concurrent callers, Twisted's pool used ~78 us of CPU per call, this one
~37 us. Here a call is one put on a C queue (SimpleQueue) and one counter
update under a lock that is never held across a wait.

Semantics kept from Twisted's pool:
- calls made before `start()` wait for it; after it, threads start on demand,
  up to `maxthreads`, when no idle thread is waiting for the calls queued so
  far; calls beyond that wait their turn in order;
- `stop()` lets every call queued before it finish, then joins the threads;
  calls made after it are dropped (DurableWriter checks `joined` first);
- `callInThreadWithCallback(on_result, f, ...)` calls on_result(True, value)
  or on_result(False, Failure) in the pool thread; a call without a callback
  that raises is logged.
Threads are named "PoolThread-NAME-N", as Twisted names them (bench tools
tell pool threads from the reactor thread by that name).

`ReactorInbox` carries the results back: the reactor's callFromThread with one
wake-up per burst of calls instead of one per call.
"""
from __future__ import annotations

import collections
import queue
import threading

from twisted.logger import Logger
from twisted.python.failure import Failure

_STOP = object()


class IOThreadPool:
    log = Logger()

    def __init__(self, minthreads: int = 0, maxthreads: int = 10, name: str = "mailgw"):
        # minthreads: Twisted's signature; threads start on demand here.
        if maxthreads < 1:
            raise ValueError("maxthreads must be at least 1")
        self.max = maxthreads
        self.name = name
        self.started = False
        self.joined = False
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()      # guards the three fields below
        self._threads: list[threading.Thread] = []
        self._idle = 0                     # threads waiting for a call (or about to)
        self._queued = 0                   # calls put and not yet taken

    def start(self) -> None:
        """Start threads for the calls made before now (they waited, as with
        Twisted's pool); later calls start threads as they need them."""
        with self._lock:
            if not self._threads:          # a restart after stop(): its _STOPs are all taken
                self._idle = 0
                self._queued = self._calls.qsize()
            self.started = True
            self.joined = False
            wanted = min(self._queued - self._idle, self.max - len(self._threads))
            new = [self._new_thread() for _ in range(max(0, wanted))]
        for thread in new:
            thread.start()

    def _new_thread(self) -> threading.Thread:
        """Under the lock: a thread counted as idle until it takes a call."""
        self._idle += 1
        thread = threading.Thread(target=self._work, daemon=True,
                                  name=f"PoolThread-{self.name}-{len(self._threads) + 1}")
        self._threads.append(thread)
        return thread

    def stop(self) -> None:
        """Finish the calls queued so far, then end and join every thread."""
        with self._lock:                   # no thread starts after this snapshot
            self.joined = True
            threads = list(self._threads)
            self._threads.clear()
        for _ in threads:
            self._calls.put(_STOP)         # behind every queued call: FIFO
        for thread in threads:
            thread.join()
        self.started = False

    def callInThread(self, f, *args, **kwargs) -> None:
        self.callInThreadWithCallback(None, f, *args, **kwargs)

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs) -> None:
        if self.joined:
            return
        self._calls.put((on_result, f, args, kwargs))
        with self._lock:
            self._queued += 1
            if (self.joined or not self.started or self._queued <= self._idle
                    or len(self._threads) >= self.max):
                return
            thread = self._new_thread()
        thread.start()

    def _work(self) -> None:
        take, lock = self._calls.get, self._lock
        while True:
            call = take()
            with lock:
                self._idle -= 1
                self._queued -= 1
            if call is _STOP:
                return
            on_result, f, args, kwargs = call
            try:
                result, ok = f(*args, **kwargs), True
            except BaseException:
                result, ok = Failure(), False
            if on_result is not None:
                try:
                    on_result(ok, result)
                except BaseException:
                    self.log.failure("thread pool {name}: result callback failed", name=self.name)
            elif not ok:
                self.log.failure("thread pool {name}: call failed", result, name=self.name)
            del call, on_result, f, args, kwargs, result    # no references kept while idle
            with lock:
                self._idle += 1


class ReactorInbox:
    """Calls from pool threads to the reactor thread, one wake-up per burst.

    `reactor.callFromThread` wakes the reactor with a write to its waker pipe
    on every call: from a pool thread that is a system call and a GIL
    hand-off each time. Under load a dozen completions arrive between two
    reactor turns; here only the first of them wakes the reactor, which then
    runs them all, in the order they came. A drop-in wherever only
    `callFromThread` is used (deferToThreadPool takes it as its reactor).

    Why no call is stranded: a caller appends first and looks at the flag
    second; the reactor clears the flag first and takes the calls second. A
    caller that saw the flag set appended before it was cleared, so the run
    that cleared it takes the call; a caller that saw it cleared wakes the
    reactor itself.
    """

    log = Logger()

    def __init__(self, reactor):
        self._reactor = reactor
        self._calls: collections.deque = collections.deque()
        self._wake_pending = False

    def callFromThread(self, f, *args, **kwargs) -> None:
        self._calls.append((f, args, kwargs))
        if not self._wake_pending:
            self._wake_pending = True
            self._reactor.callFromThread(self._run)

    def _run(self) -> None:
        self._wake_pending = False
        calls = self._calls
        # Only the calls here now: later ones have woken the reactor again, and
        # a reactor that ran an endless stream here would starve its sockets.
        for _ in range(len(calls)):
            try:
                f, args, kwargs = calls.popleft()
            except IndexError:      # a nested run took it (a test reactor that calls at once)
                return
            try:
                f(*args, **kwargs)
            except BaseException:
                self.log.failure("call from a pool thread failed")
