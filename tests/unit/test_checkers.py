"""PasswordChecker: results, failure throttling, logging without secrets, auth cache."""
from __future__ import annotations

import ipaddress

import pytest
from argon2 import PasswordHasher
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailgw.auth.checkers import FailureTable, PasswordChecker, _throttle_key
from mailgw.auth.userdb import UserFile, hash_password, write_users
from fuzzing import fuzz_settings
from threadless import ImmediatePool, ThreadlessClock


class CountingHasher(PasswordHasher):
    def __init__(self):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verify_calls = 0

    def verify(self, hash, password):
        self.verify_calls += 1
        return super().verify(hash, password)


FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE = "alice@example.test"
PASSWORD = "correct horse battery staple"
ATTACKER = "192.0.2.66"
HOME = "198.51.100.7"


class Outcome:
    """Watches a Deferred without consuming it before it fires."""

    def __init__(self, d):
        self.box = []
        d.addBoth(self.box.append)

    @property
    def fired(self):
        return bool(self.box)

    @property
    def value(self):
        assert self.fired, "not fired yet"
        assert not isinstance(self.box[0], Failure), self.box[0].getTraceback()
        return self.box[0]

    @property
    def unauthorized(self):
        assert self.fired, "not fired yet"
        return isinstance(self.box[0], Failure) and self.box[0].check(UnauthorizedLogin) is not None


def creds(username, password, client=ATTACKER):
    credentials = UsernamePassword(username, password)
    if client is not None:
        credentials.client_ip = ipaddress.ip_address(client)
    return credentials


@pytest.fixture
def clock():
    return ThreadlessClock()


@pytest.fixture
def hasher():
    return CountingHasher()


@pytest.fixture
def users_path(tmp_path):
    path = tmp_path / "users"
    write_users(path, {ALICE: hash_password(PASSWORD, FAST)})
    return path


@pytest.fixture
def userdb(users_path, clock, hasher):
    return UserFile(users_path, threadpool=ImmediatePool(), reactor=clock, hasher=hasher)


@pytest.fixture
def events():
    return []


@pytest.fixture
def checker(userdb, clock, events):
    return PasswordChecker(userdb, reactor=clock, failure_delay=1.0, max_delay=30.0,
                           log=Logger(observer=events.append), cache_ttl=0)


def login(checker, username, password, client=ATTACKER):
    return Outcome(checker.requestAvatarId(creds(username, password, client)))


def test_provides_ICredentialsChecker_for_passwords_only(checker):
    assert verifyObject(ICredentialsChecker, checker)
    from twisted.cred.credentials import IUsernamePassword
    assert checker.credentialInterfaces == (IUsernamePassword,)


@pytest.mark.parametrize("username, password", [
    (ALICE.encode(), PASSWORD.encode()),
    (ALICE, PASSWORD),
    (b"  Alice@Example.TEST ", PASSWORD.encode()),
])
def test_success_fires_with_the_canonical_address(checker, username, password):
    outcome = login(checker, username, password)
    assert outcome.value == ALICE
    assert isinstance(outcome.value, str)


def test_failure_is_answered_only_after_the_delay(checker, clock):
    outcome = login(checker, ALICE, "wrong")
    assert not outcome.fired
    clock.advance(0.999)
    assert not outcome.fired
    clock.advance(0.001)
    assert outcome.unauthorized


def test_unknown_user_fails_like_a_wrong_password(checker, clock, hasher):
    outcome = login(checker, "nobody@example.test", PASSWORD)
    assert hasher.verify_calls == 1, "dummy verification"
    clock.advance(1.0)
    assert outcome.unauthorized


def delay_of_next_failure(checker, clock, username=ALICE, client=ATTACKER):
    outcome = login(checker, username, "wrong", client)
    waited = 0.0
    while not outcome.fired:
        clock.advance(0.25)
        waited += 0.25
    assert outcome.unauthorized
    return waited


def test_consecutive_failures_double_the_delay_up_to_max(userdb, clock, events):
    checker = PasswordChecker(userdb, reactor=clock, failure_delay=1.0, max_delay=5.0,
                              log=Logger(observer=events.append), cache_ttl=0)
    delays = [delay_of_next_failure(checker, clock) for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_success_resets_the_client_counter(checker, clock):
    assert delay_of_next_failure(checker, clock) == 1.0
    assert delay_of_next_failure(checker, clock) == 2.0
    assert login(checker, ALICE, PASSWORD).value == ALICE
    assert delay_of_next_failure(checker, clock, username="other@example.test") == 1.0


def test_parallel_attempts_from_one_client_queue_behind_the_delay(checker, clock):
    # SECURITY: opening more connections must not multiply the guessing rate.
    first = login(checker, ALICE, "wrong-1")
    clock.advance(0.5)
    second = login(checker, ALICE, PASSWORD)
    assert not second.fired, "a blocked client waits even with the right password"
    clock.advance(0.5)
    assert first.unauthorized
    assert second.value == ALICE


def test_per_user_failures_do_not_delay_a_correct_login_from_elsewhere(checker, clock):
    for _ in range(4):
        delay_of_next_failure(checker, clock, client=ATTACKER)
    outcome = login(checker, ALICE, PASSWORD, client=HOME)
    assert outcome.value == ALICE, "answered at once, not locked out"


def test_per_user_failures_slow_down_guesses_from_new_clients(checker, clock):
    # A distributed guesser: every client is fresh, the user is not.
    for i in range(4):
        delay_of_next_failure(checker, clock, client=f"192.0.2.{i + 1}")
    assert delay_of_next_failure(checker, clock, client="203.0.113.9") == 16.0


def test_ipv6_clients_are_throttled_per_64():
    assert _throttle_key("2001:db8:1:2:aaaa::1") == _throttle_key("2001:db8:1:2:bbbb::2")
    assert _throttle_key("2001:db8:1:2::1") != _throttle_key("2001:db8:1:3::1")
    assert _throttle_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert _throttle_key("192.0.2.1") != _throttle_key("192.0.2.2")


def test_failures_from_one_ipv6_64_add_up(checker, clock):
    assert delay_of_next_failure(checker, clock, client="2001:db8::1") == 1.0
    assert delay_of_next_failure(checker, clock, client="2001:db8::2") == 2.0


@pytest.mark.parametrize("username, password", [
    (b"\xff\xfe@example.test", PASSWORD.encode()),
    (ALICE.encode(), b"\xc3\x28bad"),
    (ALICE, "\ud800"),
    (ALICE.encode(), b""),
    (ALICE, ""),
])
def test_undecodable_or_empty_input_is_unauthorized_after_the_delay(checker, clock, hasher,
                                                                   username, password):
    outcome = login(checker, username, password)
    assert not outcome.fired
    clock.advance(1.0)
    assert outcome.unauthorized
    assert hasher.verify_calls == 0


def test_failed_login_is_logged_with_client_and_username_never_the_password(checker, clock,
                                                                            events):
    login(checker, ALICE, "hunter2-wrong")
    clock.advance(1.0)
    login(checker, b"nobody@example.test", b"hunter2-unknown", client="2001:db8::5")
    clock.advance(2.0)
    login(checker, ALICE, PASSWORD, client=HOME)
    login(checker, ALICE.encode(), b"\xc3\x28hunter2-bad-utf8")
    clock.advance(30.0)

    warnings = [e for e in events if e["log_level"].name == "warn"]
    assert len(warnings) == 3
    assert warnings[0]["client"] == ATTACKER and ALICE in warnings[0]["username"]
    assert warnings[1]["client"] == "2001:db8::5"
    assert "nobody@example.test" in formatEvent(warnings[1])
    text = "\n".join(repr(e) + formatEvent(e) for e in events)
    assert "hunter2" not in text
    assert PASSWORD not in text


def test_client_unknown_when_the_protocol_did_not_set_it(checker, clock, events):
    outcome = Outcome(checker.requestAvatarId(creds(ALICE, "wrong", client=None)))
    clock.advance(1.0)
    assert outcome.unauthorized
    assert events[-1]["client"] == "unknown"


def test_client_may_be_a_plain_string(checker, clock, events):
    credentials = UsernamePassword(ALICE, "wrong")
    credentials.client_ip = "192.0.2.1"
    Outcome(checker.requestAvatarId(credentials))
    assert events[-1]["client"] == "192.0.2.1"


def test_unexpected_errors_pass_through_and_are_not_counted(clock):
    class BrokenUserDB:
        def exists(self, address):
            return True

        def verify(self, address, password):
            return defer.fail(RuntimeError("thread pool gone"))

        def addresses(self):
            return []

    checker = PasswordChecker(BrokenUserDB(), reactor=clock, log=Logger(observer=lambda e: None))
    outcome = Outcome(checker.requestAvatarId(creds(ALICE, PASSWORD)))
    assert outcome.box[0].check(RuntimeError)


@fuzz_settings(200)
@given(username=st.one_of(st.binary(max_size=40), st.text(max_size=40)),
       password=st.one_of(st.binary(max_size=40), st.text(max_size=40)))
def test_any_input_gives_an_address_or_unauthorized(userdb, clock, username, password):
    checker = PasswordChecker(userdb, reactor=clock, failure_delay=0.0,
                              log=Logger(observer=lambda e: None))
    outcome = Outcome(checker.requestAvatarId(creds(username, password)))
    assert outcome.fired
    assert outcome.unauthorized or outcome.value == ALICE


# -- auth cache ------------------------------------------------------------------

@pytest.fixture
def cached(userdb, clock, events):
    return PasswordChecker(userdb, reactor=clock, log=Logger(observer=events.append),
                           cache_ttl=60.0)


def test_cache_hit_avoids_a_second_argon2_verification(cached, hasher):
    assert login(cached, ALICE, PASSWORD).value == ALICE
    assert login(cached, ALICE, PASSWORD, client=HOME).value == ALICE
    assert hasher.verify_calls == 1


def test_cache_entries_expire(cached, clock, hasher):
    login(cached, ALICE, PASSWORD)
    clock.advance(60.0)
    assert login(cached, ALICE, PASSWORD).value == ALICE
    assert hasher.verify_calls == 2


def test_cache_is_dropped_when_the_users_file_reloads(cached, clock, hasher, users_path):
    login(cached, ALICE, PASSWORD)
    write_users(users_path, {ALICE: hash_password("new password", FAST)})
    clock.advance(1.0)  # past the userdb's check_interval
    old = login(cached, ALICE, PASSWORD)
    clock.advance(1.0)
    assert old.unauthorized, "a changed password stops working at once"
    assert login(cached, ALICE, "new password", client=HOME).value == ALICE
    assert hasher.verify_calls == 3


def test_cache_is_dropped_when_the_user_is_deleted(cached, clock, users_path):
    login(cached, ALICE, PASSWORD)
    write_users(users_path, {})
    clock.advance(1.0)
    outcome = login(cached, ALICE, PASSWORD)
    clock.advance(1.0)
    assert outcome.unauthorized


def test_failures_are_never_cached(cached, clock, hasher):
    delay_of_next_failure(cached, clock)
    delay_of_next_failure(cached, clock)
    assert hasher.verify_calls == 2


def test_cache_needs_the_same_password(cached, clock, hasher):
    login(cached, ALICE, PASSWORD)
    outcome = login(cached, ALICE, PASSWORD + "x")
    clock.advance(1.0)
    assert outcome.unauthorized
    assert hasher.verify_calls == 2


def test_cache_ttl_zero_disables_the_cache(checker, hasher):
    login(checker, ALICE, PASSWORD)
    login(checker, ALICE, PASSWORD)
    assert hasher.verify_calls == 2


def test_cache_stays_bounded(userdb, clock, users_path):
    users = {f"u{i}@example.test": hash_password(f"pw{i}", FAST) for i in range(5)}
    write_users(users_path, users)
    clock.advance(1.0)
    checker = PasswordChecker(userdb, reactor=clock, max_entries=3,
                              log=Logger(observer=lambda e: None))
    for i in range(5):
        assert login(checker, f"u{i}@example.test", f"pw{i}").value == f"u{i}@example.test"
    assert len(checker._cache) == 3


# -- failure tables ---------------------------------------------------------------

def test_failure_table_is_bounded():
    table = FailureTable(failure_delay=1.0, max_delay=30.0, max_entries=3)
    for i in range(10):
        table.record_failure(f"192.0.2.{i}", now=float(i))
    assert len(table) == 3
    assert table.count("192.0.2.9", now=10.0) == 1


def test_failure_table_entries_expire_after_15_minutes():
    table = FailureTable(failure_delay=1.0, max_delay=30.0)
    table.record_failure("192.0.2.1", now=0.0)
    table.record_failure("192.0.2.1", now=1.0)
    assert table.count("192.0.2.1", now=900.0) == 2
    assert table.count("192.0.2.1", now=901.0) == 0
    assert len(table) == 0


def test_failure_delay_survives_huge_counts():
    table = FailureTable(failure_delay=1.0, max_delay=30.0)
    assert table.delay(100_000) == 30.0


class HeldPool:
    """Verification jobs wait until the test runs them (a slow argon2 hash)."""

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs.append((on_result, f, args, kwargs))

    def run_all(self):
        while self.jobs:
            on_result, f, args, kwargs = self.jobs.pop(0)
            try:
                on_result(True, f(*args, **kwargs))
            except BaseException:
                on_result(False, Failure())


@pytest.mark.parametrize("password, ok", [(PASSWORD, True), ("wrong", False)])
def test_a_burst_of_identical_logins_costs_one_hash(users_path, clock, hasher, events, password, ok):
    pool = HeldPool()
    userdb = UserFile(users_path, threadpool=pool, reactor=clock, hasher=hasher)
    checker = PasswordChecker(userdb, reactor=clock, failure_delay=0.0,
                              log=Logger(observer=events.append), cache_ttl=60.0)
    outcomes = [login(checker, ALICE, password, client=f"198.51.100.{n}") for n in range(1, 51)]
    assert len(pool.jobs) == 1                 # one argon2 verification for all fifty
    pool.run_all()
    clock.advance(0)
    assert hasher.verify_calls == 1
    if ok:
        assert all(outcome.value == ALICE for outcome in outcomes)
    else:
        assert all(outcome.unauthorized for outcome in outcomes)


# -- lockout: temporary refusal per address after N failures in a row ------------------------

def lockout_checker(userdb, clock, events, failures=3, seconds=600.0):
    return PasswordChecker(userdb, reactor=clock, failure_delay=1.0, max_delay=4.0,
                           log=Logger(observer=events.append), cache_ttl=0,
                           lockout_failures=failures, lockout_time=seconds)


def refused(outcome) -> bool:
    from mailgw.errors import LoginsRefused
    assert outcome.fired, "not fired yet"
    return isinstance(outcome.box[0], Failure) and outcome.box[0].check(LoginsRefused) is not None


def test_after_n_failures_an_address_is_refused_even_with_the_right_password(userdb, clock, events, hasher):
    checker = lockout_checker(userdb, clock, events)
    for _ in range(3):
        delay_of_next_failure(checker, clock)
    verifications = hasher.verify_calls
    outcome = login(checker, ALICE, PASSWORD)
    assert refused(outcome), "answered at once with a temporary refusal"
    assert hasher.verify_calls == verifications, "a locked-out guesser costs no argon2 time"
    outcome.box[0].trap(Exception)
    logged = [formatEvent(e) for e in events]
    assert any("3 failed logins in a row, refusing its logins for 600 s" in line for line in logged)
    assert not any(PASSWORD in line for line in logged)


def test_a_locked_out_address_does_not_lock_out_the_user_elsewhere(userdb, clock, events):
    checker = lockout_checker(userdb, clock, events)
    for _ in range(3):
        delay_of_next_failure(checker, clock)
    assert login(checker, ALICE, PASSWORD, client=HOME).value == ALICE


def test_the_lockout_ends_after_its_time(userdb, clock, events):
    checker = lockout_checker(userdb, clock, events, seconds=600.0)
    for _ in range(3):
        delay_of_next_failure(checker, clock)
    clock.advance(590.0)                      # counted from the 3rd failure, answered 4 s later
    outcome = login(checker, ALICE, PASSWORD)
    assert refused(outcome)
    outcome.box[0].trap(Exception)
    clock.advance(10.0)
    assert login(checker, ALICE, PASSWORD).value == ALICE


def test_lockout_zero_never_locks_out(userdb, clock, events):
    checker = lockout_checker(userdb, clock, events, failures=0)
    for _ in range(12):
        delay_of_next_failure(checker, clock)
    outcome = login(checker, ALICE, PASSWORD)
    while not outcome.fired:
        clock.advance(1.0)
    assert outcome.value == ALICE


def test_a_success_before_the_nth_failure_resets_the_count(userdb, clock, events):
    checker = lockout_checker(userdb, clock, events)
    for _ in range(2):
        delay_of_next_failure(checker, clock)
    assert login(checker, ALICE, PASSWORD).value == ALICE
    for _ in range(2):
        delay_of_next_failure(checker, clock)
    assert login(checker, ALICE, PASSWORD).value == ALICE
