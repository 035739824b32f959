"""Return-Path: and Delivered-To: at local delivery (RFC 5321 §4.4: the final
delivery MTA records the reverse-path; Delivered-To as Postfix's local(8)),
one copy per mailbox, still one durable commit."""
from __future__ import annotations

import re

import pytest
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.durable import DurableWriter
from mailgw.store.maildir import MaildirStore
from smtp_harness import Session
from threadless import ImmediatePool, ThreadlessClock

try:  # rootdir-relative import, or tests as a package
    from test_durable import result_of
    from test_runner import STATUS_BOUNCED, Rig
except ImportError:  # pragma: no cover
    from tests.unit.test_durable import result_of
    from tests.unit.test_runner import STATUS_BOUNCED, Rig

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nline 1\r\n"
SIZES = re.compile(r",S=(\d+),W=(\d+)$")


class CountingWriter(DurableWriter):
    def __init__(self):
        super().__init__(reactor=ThreadlessClock(), threadpool=ImmediatePool())
        self.log = Logger(observer=lambda event: None)
        self.commits = []

    def commit(self, writes):
        self.commits.append(list(writes))
        return super().commit(writes)


@pytest.fixture
def writer():
    return CountingWriter()


@pytest.fixture
def store(tmp_path, writer):
    return MaildirStore(tmp_path / "mail", writer=writer, hostname="mx.example.test")


def check_sizes(path):
    size, wire = map(int, SIZES.search(path.name).groups())
    data = path.read_bytes()
    assert size == len(data) and wire == len(data) + data.count(b"\n")


def test_each_mailbox_gets_its_own_headers_in_one_commit(store, writer):
    paths = result_of(store.deliver(["alice@example.test", "bob@example.org"], MESSAGE,
                                    return_path="sender@elsewhere.test"))
    assert len(writer.commits) == 1 and len(writer.commits[0]) == 2
    body = MESSAGE.replace(b"\r\n", b"\n")
    assert paths[0].read_bytes() == (b"Return-Path: <sender@elsewhere.test>\n"
                                     b"Delivered-To: alice@example.test\n" + body)
    assert paths[1].read_bytes() == (b"Return-Path: <sender@elsewhere.test>\n"
                                     b"Delivered-To: bob@example.org\n" + body)
    for path in paths:
        check_sizes(path)


def test_null_sender_is_an_empty_return_path(store):
    (path,) = result_of(store.deliver(["alice@example.test"], MESSAGE.replace(b"\r\n", b"\n"), lf=True,
                                      return_path=""))
    assert path.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\nFrom: ")
    check_sizes(path)


@pytest.mark.parametrize("bad", ["a@b\nX-Injected: 1", "a>@b", "a\r@b", "a\0@b"])
def test_a_return_path_that_could_inject_a_header_is_refused(store, writer, bad):
    outcome = result_of(store.deliver(["alice@example.test"], MESSAGE, return_path=bad))
    assert isinstance(outcome, Failure) and outcome.check(ValueError)
    assert writer.commits == []


def test_without_return_path_copies_stay_identical(store):
    paths = result_of(store.deliver(["alice@example.test", "bob@example.org"], MESSAGE))
    assert {path.read_bytes() for path in paths} == {MESSAGE.replace(b"\r\n", b"\n")}


@pytest.mark.parametrize("sender, expected", [("a@elsewhere.test", b"<a@elsewhere.test>"), ("", b"<>")])
def test_smtp_delivery_adds_return_path_and_delivered_to(tmp_path, sender, expected):
    writer = CountingWriter()
    store = MaildirStore(tmp_path / "mail", writer=writer, hostname="mx.example.test")
    s = Session(store=store)
    s.ehlo()
    assert s.last(f"MAIL FROM:<{sender}>").startswith("250 ")
    assert s.last("RCPT TO:<alice@example.test>").startswith("250 ")
    assert s.last("RCPT TO:<Bob+x@example.test>").startswith("250 ")
    assert s.last("DATA").startswith("354 ")
    assert s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")[0].startswith("250 2.0.0")
    assert len(writer.commits) == 1
    for user in ("alice", "bob"):
        (path,) = (tmp_path / "mail" / "example.test" / user / "new").iterdir()
        data = path.read_bytes()
        assert data.startswith(b"Return-Path: " + expected + b"\nDelivered-To: " + user.encode()
                               + b"@example.test\nReceived: from client.test")
        assert data.endswith(b"\nSubject: hi\n\nbody\n")
        check_sizes(path)


def test_dsn_to_a_local_sender_has_the_null_return_path(tmp_path):
    rig = Rig(tmp_path)
    rig.transport.default = STATUS_BOUNCED
    rig.enqueue(sender="alice@example.test")
    rig.run()
    (report,) = rig.inbox()
    assert report["Return-Path"] == "<>"
    assert report["Delivered-To"] == "alice@example.test"
