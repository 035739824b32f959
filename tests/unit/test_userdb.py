"""The users file: format, validation, reload, verification off the reactor."""
from __future__ import annotations

import os
import stat

import pytest
from argon2 import PasswordHasher
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailgw.auth import userdb
from mailgw.auth.userdb import UserFile, hash_password, parse_users, validate_address, write_users
from mailgw.interfaces import IUserDB
from fuzzing import fuzz_settings
from threadless import ImmediatePool, ThreadlessClock


class CountingHasher(PasswordHasher):
    """Fast argon2id that records which hashes it verified against."""

    def __init__(self):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified = []

    def verify(self, hash, password):
        self.verified.append(hash)
        return super().verify(hash, password)


FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE = "alice@example.test"
BOB = "bob@example.test"


def result_of(d):
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


@pytest.fixture
def events(monkeypatch):
    captured = []
    monkeypatch.setattr(UserFile, "log", Logger(observer=captured.append))
    return captured


@pytest.fixture
def clock():
    return ThreadlessClock()


@pytest.fixture
def pool():
    return ImmediatePool()


@pytest.fixture
def hasher():
    return CountingHasher()


@pytest.fixture
def users_path(tmp_path):
    path = tmp_path / "users"
    write_users(path, {ALICE: hash_password("alice-pw", FAST), BOB: hash_password("bob-pw", FAST)})
    return path


def make_db(path, clock, pool, hasher, **kwargs):
    return UserFile(path, threadpool=pool, reactor=clock, hasher=hasher, **kwargs)


def all_text(events):
    return "\n".join(repr(e) + "\n" + (formatEvent(e) or "") for e in events)


def test_provides_IUserDB(users_path, clock, pool, hasher):
    assert verifyObject(IUserDB, make_db(users_path, clock, pool, hasher))


def test_lookup_and_listing(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    assert db.exists(ALICE)
    assert not db.exists("carol@example.test")
    assert db.addresses() == [ALICE, BOB]


def test_right_password_returns_the_address(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    assert result_of(db.verify(ALICE, "alice-pw")) == ALICE


def test_wrong_password_returns_none(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    assert result_of(db.verify(ALICE, "bob-pw")) is None


def test_hashing_runs_in_the_thread_pool(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    result_of(db.verify(ALICE, "alice-pw"))
    result_of(db.verify("nobody@example.test", "x"))
    assert pool.jobs == 2


def test_unknown_user_still_costs_a_verification_no_timing_oracle(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    assert result_of(db.verify("nobody@example.test", "alice-pw")) is None
    assert len(hasher.verified) == 1
    dummy = hasher.verified[0]
    assert dummy.startswith("$argon2id$")
    # Same parameters as real hashes, so the work (and the time) is the same.
    assert dummy.split("$")[3] == hash_password("x", hasher).split("$")[3]


def test_unknown_user_with_the_dummy_password_is_not_let_in(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    result_of(db.verify("nobody@example.test", "guess"))
    # Whatever the dummy was made from, nobody can log in as an unknown user.
    assert result_of(db.verify("nobody@example.test", "")) is None


def test_missing_file_means_no_users(tmp_path, clock, pool, hasher, events):
    db = make_db(tmp_path / "absent", clock, pool, hasher)
    assert db.addresses() == []
    assert result_of(db.verify(ALICE, "alice-pw")) is None


def test_file_created_later_is_picked_up(tmp_path, clock, pool, hasher, events):
    path = tmp_path / "users"
    db = make_db(path, clock, pool, hasher)
    write_users(path, {ALICE: hash_password("alice-pw", FAST)})
    clock.advance(1.0)
    assert db.exists(ALICE)


def test_change_is_picked_up_after_check_interval_without_restart(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher, check_interval=5.0)
    generation = db.generation
    carol = "carol@example.test"
    write_users(users_path, {carol: hash_password("carol-pw", FAST)})

    clock.advance(4.9)
    assert db.exists(ALICE), "stat at most once per check_interval"
    assert not db.exists(carol)

    clock.advance(0.1)
    assert db.exists(carol)
    assert not db.exists(ALICE)
    assert db.generation > generation
    assert result_of(db.verify(carol, "carol-pw")) == carol
    assert result_of(db.verify(ALICE, "alice-pw")) is None


def test_in_place_edit_is_picked_up(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    carol_line = f"carol@example.test:{hash_password('c', FAST)}\n"
    with open(users_path, "a") as f:  # same inode: size and mtime change
        f.write(carol_line)
    clock.advance(1.0)
    assert db.exists("carol@example.test")


def test_unchanged_file_is_not_reloaded(users_path, clock, pool, hasher):
    db = make_db(users_path, clock, pool, hasher)
    generation = db.generation
    clock.advance(10)
    db.exists(ALICE)
    assert db.generation == generation


def test_deleted_file_removes_all_users(users_path, clock, pool, hasher, events):
    db = make_db(users_path, clock, pool, hasher)
    os.unlink(users_path)
    clock.advance(1.0)
    assert db.addresses() == []


def test_unreadable_file_keeps_previous_users_and_logs_once(users_path, clock, pool, hasher, events):
    db = make_db(users_path, clock, pool, hasher)
    os.unlink(users_path)
    users_path.mkdir()  # open() now fails with IsADirectoryError
    for _ in range(3):
        clock.advance(1.0)
        assert db.exists(ALICE)
    errors = [e for e in events if e["log_level"].name == "error"]
    assert len(errors) == 1


def test_malformed_lines_are_skipped_and_logged_without_hashes(tmp_path, clock, pool, hasher, events):
    good = hash_password("alice-pw", FAST)
    other = hash_password("other", FAST)
    path = tmp_path / "users"
    path.write_bytes(
        b"# a comment\n"
        b"\n"
        b"no colon here\n"                                      # 3
        + f"../x@example.test:{other}\n".encode()               # 4
        + b"bob@example.test:plaintext-password\n"              # 5
        + b"carol@example.test:$argon2id$garbage\n"             # 6
        + b"dave@example.test:$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA\n"  # 7: not argon2id
        + b"\xff\xfe@example.test:" + other.encode() + b"\n"    # 8
        + f"Alice@Example.TEST:{good}\r\n".encode()             # 9: normalised, CRLF ok
        + f"alice@example.test:{other}\n".encode()              # 10: duplicate
    )
    db = make_db(path, clock, pool, hasher)
    assert db.addresses() == [ALICE]
    assert result_of(db.verify(ALICE, "alice-pw")) == ALICE

    warnings = [e for e in events if e["log_level"].name == "warn"]
    assert sorted(e["line"] for e in warnings) == [3, 4, 5, 6, 7, 8, 10]
    text = all_text(events)
    for secret in (good, other, "plaintext-password", "$argon2id$garbage"):
        assert secret not in text


def test_needs_rehash_does_not_rewrite_the_file(tmp_path, clock, pool):
    # A hash made with weaker parameters than the server's hasher: still
    # accepted, and the server leaves the file alone (only the CLI writes).
    path = tmp_path / "users"
    write_users(path, {ALICE: hash_password("pw", FAST)})
    before = path.read_bytes()
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    assert stronger.check_needs_rehash(hash_password("pw", FAST))
    db = UserFile(path, threadpool=pool, reactor=clock, hasher=stronger)
    assert result_of(db.verify(ALICE, "pw")) == ALICE
    assert path.read_bytes() == before


# -- addresses -------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "../x@example.test",
    "a/b@example.test",
    ".a@example.test",
    "a..b@example.test",
    "a.@example.test",
    "..@example.test",
    "a\\b@example.test",
    "a b@example.test",
    "a\x00b@example.test",
    "a:b@example.test",
    "\u212aate@example.test",      # KELVIN SIGN lower-cases to "k"
    "j\u00f6rg@example.test",
    "x" * 65 + "@example.test",
    "@example.test",
    "alice@",
    "alice",
    "a@b@example.test",
    "alice@example..test",
    "alice@.example.test",
    "alice@example.test.",
    "alice@-example.test",
    "alice@exa_mple.test",
    "alice@ex/ample.test",
    "alice@" + "a" * 64 + ".test",
    "alice@" + ".".join(["abcdefghi"] * 26),
])
def test_invalid_addresses_are_rejected(bad):
    with pytest.raises(ValueError):
        validate_address(bad)


@pytest.mark.parametrize("given_address, expected", [
    ("Alice@Example.TEST", "alice@example.test"),
    ("  bob+tag@example.test\n", "bob+tag@example.test"),
    ("first.last_1-x@mail.example.test", "first.last_1-x@mail.example.test"),
    ("x" * 64 + "@example.test", "x" * 64 + "@example.test"),
    ("postmaster@localhost", "postmaster@localhost"),
    ("a@xn--bcher-kva.example", "a@xn--bcher-kva.example"),
])
def test_valid_addresses_are_normalised(given_address, expected):
    assert validate_address(given_address) == expected


def test_rejection_message_is_clear():
    with pytest.raises(ValueError, match="local part"):
        validate_address("a/b@example.test")


@fuzz_settings(300)
@given(st.text(max_size=80))
def test_any_accepted_address_is_a_safe_directory_name(text):
    """SECURITY: the local part and domain become directory names in the store."""
    try:
        address = validate_address(text)
    except ValueError:
        return
    local, domain = address.split("@")
    for part in (local, domain):
        assert part not in ("", ".", "..")
        assert "/" not in part and "\x00" not in part and "\\" not in part
        assert not part.startswith(".")
        assert part == part.lower() and part.isascii()
    assert len(local.encode()) <= 64


# -- writing -------------------------------------------------------------------

def test_write_users_is_0600_atomic_and_round_trips(tmp_path):
    path = tmp_path / "users"
    mapping = {BOB: hash_password("b", FAST), ALICE: hash_password("a", FAST)}
    write_users(path, mapping)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["users"], "no temporary file left behind"
    users, problems = userdb.read_users(path)
    assert users == mapping and problems == []
    text = path.read_text()
    assert text.index(ALICE) < text.index(BOB), "sorted"


def test_write_users_replaces_an_existing_file(tmp_path):
    path = tmp_path / "users"
    write_users(path, {ALICE: hash_password("a", FAST)})
    old_inode = os.stat(path).st_ino
    write_users(path, {BOB: hash_password("b", FAST)})
    assert os.stat(path).st_ino != old_inode, "replaced by rename, not rewritten in place"
    assert userdb.read_users(path)[0].keys() == {BOB}


@pytest.mark.parametrize("mapping", [
    {"../x@example.test": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"},
    {"Alice@example.test": hash_password("a", FAST)},   # not normalised
    {ALICE: "plaintext"},
    {ALICE: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFz\nbob@example.test:x"},
])
def test_write_users_refuses_bad_entries_and_leaves_the_file(tmp_path, mapping):
    path = tmp_path / "users"
    write_users(path, {BOB: hash_password("b", FAST)})
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_users(path, mapping)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["users"]


def test_hash_password_is_argon2id_with_library_defaults():
    password_hash = hash_password("secret")
    assert password_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert PasswordHasher().verify(password_hash, "secret")


def test_parse_users_reports_problems_with_line_numbers():
    users, problems = parse_users(b"# c\nbad line\n")
    assert users == {} and problems == [(2, "expected address:hash")]


def test_file_is_statted_at_most_once_per_check_interval(users_path, clock, pool, hasher,
                                                          monkeypatch):
    db = make_db(users_path, clock, pool, hasher)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(userdb.os, "stat", lambda *a, **kw: stats.append(a) or real_stat(*a, **kw))
    for _ in range(100):
        db.exists(ALICE)
        result_of(db.verify(ALICE, "wrong"))
        db.addresses()
    assert stats == []
    clock.advance(1.0)
    for _ in range(100):
        db.exists(ALICE)
    assert len(stats) == 1
