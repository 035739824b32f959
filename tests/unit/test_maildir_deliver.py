"""MaildirStore.deliver: LF files in new/ with Dovecot S=/W= names, all or nothing."""
from __future__ import annotations

import errno
import os
import re
import shutil

import pytest
from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from mailgw.durable import DurableWriter
from mailgw.errors import StorageFailed, StorageFull
from mailgw.interfaces import ILocalStore
from mailgw.store.maildir import MaildirStore

try:  # the fakes live with the writer's tests (rootdir-relative import, or tests as a package)
    from test_durable import RecordingOS, result_of
except ImportError:  # pragma: no cover
    from tests.unit.test_durable import RecordingOS, result_of
from threadless import ImmediatePool, ThreadlessClock

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nline 1\r\nline 2\r\n"
NAME = re.compile(
    r"(?P<sec>\d+)\.M(?P<usec>\d+)P(?P<pid>\d+)Q(?P<q>\d+)\.(?P<host>[^,:/]+)"
    r",S=(?P<s>\d+),W=(?P<w>\d+)"
)


@pytest.fixture
def writer():
    writer = DurableWriter(reactor=ThreadlessClock(), threadpool=ImmediatePool())
    writer._os = RecordingOS()
    writer.log = Logger(observer=lambda event: None)
    return writer


@pytest.fixture
def store(tmp_path, writer):
    return MaildirStore(tmp_path / "mail", writer=writer, hostname="mx.example.org")


def test_provides_the_interface(store):
    assert verifyObject(ILocalStore, store)


def test_delivers_lf_files_with_sizes_in_the_name(tmp_path, store):
    paths = result_of(store.deliver(["alice@example.org", "bob@example.net"], MESSAGE))
    mail = tmp_path / "mail"
    assert [p.parent for p in paths] == [
        mail / "example.org" / "alice" / "new",
        mail / "example.net" / "bob" / "new",
    ]
    stored = MESSAGE.replace(b"\r\n", b"\n")
    for path in paths:
        assert path.read_bytes() == stored
        match = NAME.fullmatch(path.name)
        assert match, path.name
        assert int(match["s"]) == len(stored) == path.stat().st_size
        assert int(match["w"]) == len(MESSAGE)  # RFC 822 size, CRLF
        assert match["host"] == "mx.example.org"
        assert int(match["pid"]) == os.getpid()
        assert (path.parent.parent / "tmp").is_dir() and (path.parent.parent / "cur").is_dir()
        assert list((path.parent.parent / "tmp").iterdir()) == []
        assert path.parent.parent.stat().st_mode & 0o777 == 0o700


def test_first_delivery_makes_the_mailbox_directories_durable(tmp_path, store, writer):
    result_of(store.deliver(["alice@example.org"], MESSAGE))
    mail = tmp_path / "mail"
    box = mail / "example.org" / "alice"
    synced = [path for op, path in writer._os.calls if op == "fsynced" and path.is_dir()]
    assert {mail, mail / "example.org", box} <= set(synced)
    # Once made durable, later deliveries only sync new/.
    writer._os.calls.clear()
    result_of(store.deliver(["alice@example.org"], MESSAGE))
    synced = [path for op, path in writer._os.calls if op == "fsynced" and path.is_dir()]
    assert synced == [box / "new"]


def test_same_mailbox_twice_is_stored_once(store):
    paths = result_of(store.deliver(["alice@example.org", "alice@example.org"], MESSAGE))
    assert len(paths) == 1


def test_hostname_separators_are_escaped(tmp_path, writer):
    store = MaildirStore(tmp_path / "mail", writer=writer, hostname="a/b:c,d")
    [path] = result_of(store.deliver(["alice@example.org"], MESSAGE))
    assert "a\\057b\\072c\\054d,S=" in path.name


class NameRecordingWriter:
    """Accepts every commit without touching the disk."""

    def __init__(self):
        self.names = []

    def ensure_directories(self, root, directories):
        return succeed(None)

    def commit(self, writes):
        self.names.extend(name for _, _, name, _ in writes)
        return succeed([directory / name for directory, _, name, _ in writes])


def test_names_are_unique_across_10000_deliveries(tmp_path):
    writer = NameRecordingWriter()
    store = MaildirStore(tmp_path / "mail", writer=writer, hostname="mx")
    for _ in range(10_000):
        result_of(store.deliver(["alice@example.org"], MESSAGE))
    assert len(set(writer.names)) == 10_000


def test_names_are_unique_even_when_the_clock_stands_still(tmp_path):
    writer = NameRecordingWriter()
    store = MaildirStore(tmp_path / "mail", writer=writer, hostname="mx", clock=lambda: 1700000000.5)
    for _ in range(100):
        result_of(store.deliver(["alice@example.org"], MESSAGE))
    assert len(set(writer.names)) == 100
    assert writer.names[0].startswith("1700000000.M500000P")


UNSAFE = [
    "../etc@example.org",
    "a/b@example.org",
    ".hidden@example.org",
    "a..b@example.org",
    "alice@../../etc",
    "alice@example.org/../x",
    "alice@.example.org",
    "alice@example..org",
    "alice@example.org.",
    "alice@-example.org",
    "Alice@example.org",
    "alice@Example.org",
    "alice\0@example.org",
    "ali ce@example.org",
    "alice@",
    "@example.org",
    "alice",
    "a@b@example.org",
    "",
    "x" * 65 + "@example.org",
    "alice@" + "a" * 64 + ".org",
]


@pytest.mark.parametrize("address", UNSAFE)
def test_unsafe_addresses_are_refused(tmp_path, store, address):
    with pytest.raises(ValueError):
        store.mailbox_path(address)
    result_of(store.deliver(["bob@example.org", address], MESSAGE)).trap(ValueError)
    assert list((tmp_path / "mail").iterdir()) == []  # nothing created, not even bob's


@pytest.mark.parametrize("address", ["a.b+tag@example.org", "x_y-z@mx-1.example.org", "postmaster@localhost"])
def test_safe_addresses(tmp_path, store, address):
    local, domain = address.split("@")
    assert store.mailbox_path(address) == tmp_path / "mail" / domain / local


@pytest.mark.parametrize("step", ["open", "write", "fsync", "move"])
def test_failure_in_the_second_mailbox_removes_the_first(tmp_path, store, writer, step):
    second = tmp_path / "mail" / "example.net" / "bob"
    writer._os.fail(step, lambda p: second in p.parents and p.parent.name in ("tmp", "new"), errno.ENOSPC)
    outcome = result_of(store.deliver(["alice@example.org", "bob@example.net"], MESSAGE))
    outcome.trap(StorageFull)
    for box in (tmp_path / "mail" / "example.org" / "alice", second):
        for sub in ("tmp", "new", "cur"):
            assert list((box / sub).iterdir()) == []
    # The mailboxes stay usable.
    assert len(result_of(store.deliver(["alice@example.org", "bob@example.net"], MESSAGE))) == 2


def test_failed_directory_creation_fails_the_delivery(tmp_path, store, writer):
    writer._os.fail("mkdir", err=errno.ENOSPC)
    result_of(store.deliver(["alice@example.org"], MESSAGE)).trap(StorageFull)
    # Retried next time (the mailbox was not marked ready).
    assert len(result_of(store.deliver(["alice@example.org"], MESSAGE))) == 1


def test_no_mailboxes(store):
    assert result_of(store.deliver([], MESSAGE)) == []


def test_mailbox_removed_behind_our_back_is_recreated_on_the_next_delivery(tmp_path, store):
    result_of(store.deliver(["alice@example.org"], MESSAGE))
    shutil.rmtree(tmp_path / "mail" / "example.org")
    result_of(store.deliver(["alice@example.org"], MESSAGE)).trap(StorageFailed)
    [path] = result_of(store.deliver(["alice@example.org"], MESSAGE))
    assert path.read_bytes() == MESSAGE.replace(b"\r\n", b"\n")


def test_discard_removes_what_deliver_stored(tmp_path, store):
    paths = result_of(store.deliver(["alice@example.org", "bob@example.net"], MESSAGE))
    result_of(store.discard([str(p) for p in paths]))
    assert not any(p.exists() for p in paths)


def test_discard_touches_nothing_outside_new_below_mail_dir(tmp_path, store):
    outside = tmp_path / "precious"
    outside.write_bytes(b"x")
    [path] = result_of(store.deliver(["alice@example.org"], MESSAGE))
    sneaky = path.parent / ".." / ".." / ".." / ".." / ".." / "precious"
    result_of(store.discard([outside, sneaky, path.parent.parent / "cur" / "x"]))
    assert outside.exists() and path.exists()


def test_clean_tmp_removes_only_stale_files(tmp_path):
    from mailgw.store.maildir import MaildirStore
    store = MaildirStore(tmp_path, writer=None, hostname="h", clock=lambda: 1_000_000.0)
    inbox_tmp = tmp_path / "example.test" / "alice" / "tmp"
    folder_tmp = tmp_path / "example.test" / "alice" / ".Sent" / "tmp"
    for directory in (inbox_tmp, folder_tmp):
        directory.mkdir(parents=True)
        old, young = directory / "old", directory / "young"
        old.write_bytes(b"x")
        young.write_bytes(b"y")
        os.utime(old, (0, 1_000_000.0 - 37 * 3600))
        os.utime(young, (0, 1_000_000.0 - 3600))
    assert store.clean_tmp() == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["young", "young"]
