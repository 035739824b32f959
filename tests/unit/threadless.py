"""Test doubles that run the code's thread-pool work at once, on the test's
thread: what deferToThreadPool (callInThreadWithCallback, then
callFromThread) and DurableWriter (callInThread) use. Time stays a Clock."""
from __future__ import annotations

from twisted.internet import task
from twisted.python.failure import Failure


class ThreadlessClock(task.Clock):
    """A Clock whose callFromThread runs the call at once."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class ImmediatePool:
    """A thread pool that runs every job at once; `jobs` counts the
    callInThreadWithCallback ones (proof that work went to the pool)."""

    joined = False

    def __init__(self):
        self.jobs = 0

    def callInThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)
