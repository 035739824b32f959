"""When to try a queued message again, when to give up, and whom to tell.

Pure functions: no I/O and no clock. The runner passes the time in (design
§3.3) and acts on the answers; the spool only stores (design §3.4).

How the runner is meant to use them:

* A message is attempted when its stored `next_attempt` time comes, even when
  that time is long past (after downtime): that is the final try Postfix also
  makes before it gives up.
* After an attempt, each recipient's reply goes through `classify`. For the
  recipients still pending the runner asks `next_attempt(queue, arrival,
  attempts, now)`: a time to store, or None. None means the message is out of
  time (`is_expired` says the same): the pending recipients expire and get a
  "failure" DSN where `wants_notice` allows.
* `next_attempt` never returns a time after `arrival + max_lifetime`: when the
  schedule would step past that moment it returns the moment itself, so the
  last try happens at the end of the lifetime instead of one retry interval
  early (and the lifetime configured is the lifetime honoured).
* `delay_notice_due` is asked after an unsuccessful attempt; when it says yes
  the runner sends one "delay" DSN and records that it did.
"""
from __future__ import annotations

from collections.abc import Iterable

from mailgw.config_types import QueueConfig
from mailgw.queue import model

# The three kinds of delivery status notification (RFC 3464 §2.3.3 Action:
# failed / delayed / delivered or relayed).
KIND_FAILURE = "failure"
KIND_DELAY = "delay"
KIND_SUCCESS = "success"
KINDS = (KIND_FAILURE, KIND_DELAY, KIND_SUCCESS)


def retry_delay(schedule: tuple[float, ...], attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based).

    The last entry of the schedule repeats for every later attempt.
    RFC 5321 §4.5.4.1: retry at least 30 minutes apart after the first
    failure; the configured schedule is the operator's to choose.
    """
    if not schedule:
        raise ValueError("empty retry schedule")
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts}")
    return float(schedule[min(attempts, len(schedule)) - 1])


def deadline(queue: QueueConfig, arrival: float) -> float:
    """The end of a message's lifetime: no attempt starts after this."""
    # RFC 5321 §4.5.4.1: give up after at least 4-5 days.
    return arrival + queue.max_lifetime


def is_expired(queue: QueueConfig, arrival: float, now: float) -> bool:
    """True once the lifetime is over; equivalent to `next_attempt` being None."""
    return now >= deadline(queue, arrival)


def next_attempt(queue: QueueConfig, arrival: float, attempts: int, now: float) -> float | None:
    """When to try next after `attempts` attempts (0: none yet), or None to give up.

    The schedule's wait is counted from `now` (the end of the last attempt).
    A next try that would fall after the deadline is moved to the deadline
    itself (one final attempt); once `now` has reached the deadline the answer
    is None and the runner expires the message.
    """
    end = deadline(queue, arrival)
    if now >= end:
        return None
    if attempts <= 0:
        return now
    return min(now + retry_delay(queue.retry_schedule, attempts), end)


def delay_notice_due(queue: QueueConfig, arrival: float, now: float, already_sent: bool) -> bool:
    """Whether to send the (single) "delayed" DSN now.

    RFC 3461 §5.2.5: an MTA MAY issue a delayed DSN after an extended time,
    and is never required to. One notice per message, `delay_notice_after`
    seconds after arrival (0: never), and none once the message has expired:
    then the failure DSN says it all.
    """
    if already_sent or queue.delay_notice_after <= 0:
        return False
    return arrival + queue.delay_notice_after <= now < deadline(queue, arrival)


def classify(code: int) -> str:
    """A reply code's meaning for the recipient: model.STATUS_*.

    RFC 5321 §4.2.1: 2yz positive completion, 4yz transient negative
    completion (try again), 5yz permanent negative completion. 0 means no
    reply at all (connection, TLS or DNS trouble): transient. Anything else
    (1yz/3yz where they do not belong, garbage) is treated as transient too:
    when in doubt we retry, and the lifetime bounds the doubt.
    """
    if 200 <= code <= 299:
        return model.STATUS_SENT
    if 500 <= code <= 599:
        return model.STATUS_BOUNCED
    return model.STATUS_DEFERRED


def wants_notice(notify: Iterable[str] | None, kind: str) -> bool:
    """Whether a recipient's NOTIFY asks for a DSN of `kind` (KIND_*).

    RFC 3461 §4.1: NEVER means no DSN at all; otherwise the list names the
    kinds wanted (SUCCESS, FAILURE, DELAY). Without NOTIFY the MTA may act as
    if NOTIFY=FAILURE or NOTIFY=FAILURE,DELAY; we take FAILURE,DELAY, so no
    success DSN unless asked (§5.2.2 (e), §5.2.3 (c)), failures always
    (§5.2.6 (c)), delays allowed (§5.2.5 (b)).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    if notify is None:
        return kind in (KIND_FAILURE, KIND_DELAY)
    # RFC 3461 §4.1 note b: the keywords are case-insensitive.
    words = {word.upper() for word in notify}
    if "NEVER" in words:
        return False
    return kind.upper() in words
