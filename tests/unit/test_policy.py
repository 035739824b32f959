"""Queue policy: retry schedule, expiry, the one delay notice, reply classes, NOTIFY (RFC 3461 §4.1)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgw.config_types import TLS_OPPORTUNISTIC, QueueConfig
from mailgw.queue import model
from mailgw.queue.policy import (KIND_DELAY, KIND_FAILURE, KIND_SUCCESS, classify, deadline,
                                 delay_notice_due, is_expired, next_attempt, retry_delay, wants_notice)
from fuzzing import fuzz_settings

HOUR = 3600.0
DAY = 24 * HOUR
SCHEDULE = (300.0, 900.0, 1800.0, 3600.0, 4 * HOUR)
ARRIVAL = 1_700_000_000.0


def queue_config(**changes) -> QueueConfig:
    values = dict(retry_schedule=SCHEDULE, max_lifetime=5 * DAY, delay_notice_after=4 * HOUR,
                  max_deliveries=20, max_per_domain=5, connect_timeout=30.0, reply_timeout=300.0,
                  data_timeout=600.0, connection_cache_time=2.0, connection_reuse_time=300.0, mx_port=25,
                  mx_tls=TLS_OPPORTUNISTIC, smarthost=None, routes=())
    values.update(changes)
    return QueueConfig(**values)


# -- retry_delay ---------------------------------------------------------------------------------

def test_retry_delay_follows_the_schedule_one_based():
    assert [retry_delay(SCHEDULE, n) for n in range(1, 6)] == list(SCHEDULE)


def test_retry_delay_last_entry_repeats():
    assert retry_delay(SCHEDULE, 6) == 4 * HOUR
    assert retry_delay(SCHEDULE, 1000) == 4 * HOUR
    assert retry_delay((60.0,), 1) == retry_delay((60.0,), 50) == 60.0


@pytest.mark.parametrize("attempts", [0, -1])
def test_retry_delay_refuses_attempt_numbers_below_one(attempts):
    with pytest.raises(ValueError):
        retry_delay(SCHEDULE, attempts)


def test_retry_delay_refuses_an_empty_schedule():
    with pytest.raises(ValueError):
        retry_delay((), 1)


# -- next_attempt / is_expired -------------------------------------------------------------------

def test_first_attempt_is_immediate():
    assert next_attempt(queue_config(), ARRIVAL, 0, ARRIVAL) == ARRIVAL


def test_next_attempt_counts_the_wait_from_now():
    queue = queue_config()
    now = ARRIVAL + 10.0
    assert next_attempt(queue, ARRIVAL, 1, now) == now + 300.0
    assert next_attempt(queue, ARRIVAL, 3, now) == now + 1800.0
    assert next_attempt(queue, ARRIVAL, 9, now) == now + 4 * HOUR


def test_schedule_stepping_past_the_lifetime_gets_one_final_attempt_at_the_deadline():
    queue = queue_config()
    end = ARRIVAL + 5 * DAY
    now = end - HOUR            # the next regular try (4 h later) would be past the lifetime
    assert next_attempt(queue, ARRIVAL, 30, now) == end
    # That final attempt fails: give up.
    assert next_attempt(queue, ARRIVAL, 31, end) is None


def test_expiry_boundary():
    queue = queue_config()
    end = deadline(queue, ARRIVAL)
    assert end == ARRIVAL + 5 * DAY
    assert not is_expired(queue, ARRIVAL, end - 0.001)
    assert is_expired(queue, ARRIVAL, end)
    assert is_expired(queue, ARRIVAL, end + 1)
    assert next_attempt(queue, ARRIVAL, 5, end - 0.001) == end
    assert next_attempt(queue, ARRIVAL, 5, end) is None


def test_message_found_after_its_lifetime_is_expired_even_if_never_tried():
    queue = queue_config()
    assert next_attempt(queue, ARRIVAL, 0, ARRIVAL + 6 * DAY) is None


def test_a_whole_life_of_retries_ends_exactly_at_the_deadline():
    queue = queue_config()
    now, attempts, times = ARRIVAL, 0, []
    while (when := next_attempt(queue, ARRIVAL, attempts, now)) is not None:
        times.append(when)
        now, attempts = when, attempts + 1
    assert times[:6] == [ARRIVAL, ARRIVAL + 300, ARRIVAL + 1200, ARRIVAL + 3000, ARRIVAL + 6600,
                         ARRIVAL + 6600 + 4 * HOUR]
    assert times[-1] == ARRIVAL + 5 * DAY
    assert times == sorted(times) and len(set(times)) == len(times)


@fuzz_settings(300)
@given(attempts=st.integers(min_value=0, max_value=10_000),
       elapsed=st.floats(min_value=0, max_value=10 * DAY, allow_nan=False))
def test_next_attempt_is_never_in_the_past_nor_after_the_deadline(attempts, elapsed):
    queue = queue_config()
    now = ARRIVAL + elapsed
    when = next_attempt(queue, ARRIVAL, attempts, now)
    assert (when is None) == is_expired(queue, ARRIVAL, now)
    if when is not None:
        assert now <= when <= ARRIVAL + 5 * DAY


# -- delay_notice_due ----------------------------------------------------------------------------

def test_delay_notice_not_before_the_configured_time():
    queue = queue_config()
    assert not delay_notice_due(queue, ARRIVAL, ARRIVAL + 4 * HOUR - 1, False)
    assert delay_notice_due(queue, ARRIVAL, ARRIVAL + 4 * HOUR, False)
    assert delay_notice_due(queue, ARRIVAL, ARRIVAL + 2 * DAY, False)


def test_delay_notice_is_sent_once():
    queue = queue_config()
    assert not delay_notice_due(queue, ARRIVAL, ARRIVAL + 5 * HOUR, True)


def test_delay_notice_zero_means_never():
    queue = queue_config(delay_notice_after=0.0)
    assert not delay_notice_due(queue, ARRIVAL, ARRIVAL + 4 * DAY, False)


def test_no_delay_notice_once_expired():
    queue = queue_config()
    assert not delay_notice_due(queue, ARRIVAL, ARRIVAL + 5 * DAY, False)
    # A notice time beyond the lifetime never comes.
    late = queue_config(delay_notice_after=6 * DAY)
    assert not any(delay_notice_due(late, ARRIVAL, ARRIVAL + t * DAY, False) for t in range(0, 8))


# -- classify ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, status", [
    (250, model.STATUS_SENT), (251, model.STATUS_SENT), (200, model.STATUS_SENT),
    (421, model.STATUS_DEFERRED), (450, model.STATUS_DEFERRED), (452, model.STATUS_DEFERRED),
    (550, model.STATUS_BOUNCED), (552, model.STATUS_BOUNCED), (554, model.STATUS_BOUNCED),
    (0, model.STATUS_DEFERRED),                       # no reply: connection/TLS/DNS trouble
    (354, model.STATUS_DEFERRED), (199, model.STATUS_DEFERRED), (600, model.STATUS_DEFERRED),
    (-1, model.STATUS_DEFERRED),
])
def test_classify_reply_codes(code, status):
    assert classify(code) == status


# -- wants_notice (RFC 3461 §4.1) ----------------------------------------------------------------

def test_absent_notify_means_failure_and_delay():
    assert wants_notice(None, KIND_FAILURE)
    assert wants_notice(None, KIND_DELAY)
    assert not wants_notice(None, KIND_SUCCESS)


def test_notify_never_means_nothing():
    assert not any(wants_notice(("NEVER",), kind) for kind in (KIND_FAILURE, KIND_DELAY, KIND_SUCCESS))


def test_notify_success_only():
    assert wants_notice(("SUCCESS",), KIND_SUCCESS)
    assert not wants_notice(("SUCCESS",), KIND_FAILURE)
    assert not wants_notice(("SUCCESS",), KIND_DELAY)


def test_notify_failure_and_delay():
    notify = ("FAILURE", "DELAY")
    assert wants_notice(notify, KIND_FAILURE)
    assert wants_notice(notify, KIND_DELAY)
    assert not wants_notice(notify, KIND_SUCCESS)


def test_notify_failure_without_delay_forbids_delay_notices():
    # RFC 3461 §5.2.5 (c): a NOTIFY without DELAY: no "delayed" DSN.
    assert not wants_notice(("FAILURE",), KIND_DELAY)
    assert wants_notice(("FAILURE",), KIND_FAILURE)


def test_notify_keywords_are_case_insensitive_and_lists_work():
    assert wants_notice(["success", "Failure"], KIND_FAILURE)      # a JSON list from the spool
    assert not wants_notice(["never"], KIND_FAILURE)


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError):
        wants_notice(None, "bounce")
