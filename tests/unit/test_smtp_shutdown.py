"""SMTPFactory.shutdown_sessions(): every live session gets 421 4.3.2 and is
closed (RFC 5321 §3.8); an open transaction ends without a 250."""
from __future__ import annotations

from smtp_harness import FakeStore, Session

NOTICE = "421 4.3.2 Service shutting down"


def test_every_live_session_gets_421_and_is_closed():
    first = Session()
    second = Session(factory=first.factory, clock=first.clock)
    first.read(), second.read()
    first.ehlo()
    assert first.factory.sessions == {first.server, second.server}
    gone = first.factory.shutdown_sessions()
    for s in (first, second):
        assert s.read() == [NOTICE] and s.closed
    # Gone from the factory (and its counts) once the connections are lost;
    # the Deferred fires only then.
    first.server.connectionLost(None)
    assert not gone.called
    second.server.connectionLost(None)
    assert gone.called
    assert first.factory.sessions == set() and first.factory.connections.open_total == 0


def test_no_sessions_nothing_to_do():
    s = Session()
    s.server.connectionLost(None)
    assert s.factory.shutdown_sessions().called
    assert s.read() == ["220 mail.example.test ESMTP mailgw"]


def test_open_transaction_ends_without_250():
    s = Session()
    s.ehlo()
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<alice@example.test>")
    s.last("DATA")
    assert s.send(b"Subject: half\r\n\r\nsome of the body\r\n") == []
    s.factory.shutdown_sessions()
    assert s.read() == [NOTICE] and s.closed
    # The rest of the message, should it still arrive, is ignored.
    assert s.send(b"more\r\n.\r\n") == []
    assert s.store.delivered == [] and s.server.transaction is None


def test_message_being_stored_gets_its_reply_then_421():
    store = FakeStore()
    store.pending = []
    s = Session(store=store)
    s.ehlo()
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<alice@example.test>")
    s.last("DATA")
    # Pipelined after the message: must never run.
    assert s.send(b"hi\r\n.\r\nMAIL FROM:<b@elsewhere.test>\r\n") == []
    s.factory.shutdown_sessions()
    assert s.read() == [] and not s.closed      # the message is on its way to disk
    (d, paths), = store.pending
    d.callback(paths)
    # It is stored: the client hears so (else it would send it again), then 421.
    assert s.read() == ["250 2.0.0 Ok: queued as Q000000000000001", NOTICE] and s.closed


def test_nothing_is_sent_after_a_421():
    # A late answer must not follow our last word: here the command timeout
    # closes the session while the store is still writing the message.
    store = FakeStore()
    store.pending = []
    s = Session(store=store)
    s.ehlo()
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<alice@example.test>")
    s.last("DATA")
    assert s.send(b"hi\r\n.\r\n") == []
    s.clock.advance(s.config.smtp.command_timeout)
    assert s.read() == ["421 4.4.2 Timeout, closing transmission channel"] and s.closed
    (d, paths), = store.pending
    d.callback(paths)
    assert s.read() == []


def test_after_quit_no_second_goodbye():
    s = Session()
    s.ehlo()
    assert s.cmd("QUIT") == ["221 2.0.0 Bye"]
    s.factory.shutdown_sessions()
    assert s.read() == []
