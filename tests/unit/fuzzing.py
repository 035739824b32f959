"""Shared Hypothesis settings for the fuzz and round-trip property tests (docs/fuzzing.md).

Every property test in tests/unit is decorated with `@fuzz_settings(N)`:

- in CI (MAILGW_FUZZ_EXAMPLES unset): N examples, derandomized (the same
  examples on every run, so a red CI run is reproducible and the suite stays
  fast), no example database, no deadline;
- in a campaign (MAILGW_FUZZ_EXAMPLES=20000): that many examples for every
  test, randomized (a new seed per run), still no deadline.  Hypothesis's
  example database (.hypothesis/, git-ignored) is used then, so re-running
  the same command first replays any failure the last campaign found.

A failure prints the falsifying example and an `@reproduce_failure(...)`
blob (print_blob) to paste onto the test; see docs/fuzzing.md.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

ENV = "MAILGW_FUZZ_EXAMPLES"

# The protocol harnesses build a whole server session per example (slow by
# Hypothesis's standards), some tests take pytest fixtures, and inputs are
# large on purpose: none of that is a problem with the test.
_SUPPRESSED = (HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
               HealthCheck.large_base_example, HealthCheck.filter_too_much)


def campaign_examples() -> int:
    """MAILGW_FUZZ_EXAMPLES as a positive int, or 0 when unset or empty (CI)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{ENV} must be a positive integer, got {raw!r}")
    return value


def fuzz_settings(default_examples: int, **overrides) -> settings:
    """Hypothesis settings: `default_examples` derandomized examples in CI,
    MAILGW_FUZZ_EXAMPLES random ones in a campaign. `overrides` go to
    hypothesis.settings last (use sparingly: they apply to campaigns too)."""
    examples = campaign_examples()
    values = dict(deadline=None, print_blob=True, suppress_health_check=_SUPPRESSED)
    if examples:
        values.update(max_examples=examples, derandomize=False)
    else:
        values.update(max_examples=default_examples, derandomize=True, database=None)
    values.update(overrides)
    return settings(**values)


@contextmanager
def no_logged_failures() -> Iterator[list]:
    """Fail if anything logs a failure (an unexpected exception the server
    caught and turned into a polite reply, or an unhandled error in a
    Deferred) while the block runs. Servers answer those with 451 / -ERR
    [SYS/TEMP] / [SERVERBUG], which look well-formed on the wire."""
    events: list = []

    def observer(event):
        if event.get("log_failure") is not None:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)
    if events:
        failure = events[0]["log_failure"]
        raise AssertionError(f"{len(events)} failure(s) logged, first: {events[0].get('log_format')!r}\n"
                             + failure.getTraceback())
