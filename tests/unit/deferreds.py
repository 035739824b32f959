"""Helpers for tests whose Deferreds fire synchronously (fake DNS, inline threads)."""
from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure


def result_of(d: defer.Deferred):
    """The result of a Deferred that must already have fired; its failure re-raised."""
    results = []
    d.addBoth(results.append)
    assert results, "Deferred did not fire"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def inline(function, *args, **kwargs) -> defer.Deferred:
    """A `run_in_thread` that runs the work at once, in this thread."""
    return defer.maybeDeferred(function, *args, **kwargs)
