"""Issue 24: when mailgw stops, connected clients are told so before the
connection closes (POP3 -ERR [SYS/TEMP], IMAP * BYE), and a stopping
listener waits for that, within a bound, before the reactor stops."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailgw.services import SHUTDOWN_GRACE, ListenerService
from imap_harness import IMAPSession, filled
from pop3_harness import Session


def lost(server) -> None:
    """The transport finished closing (StringTransport only records the close)."""
    server.connectionLost(Failure(ConnectionDone()))


# -- POP3 -------------------------------------------------------------------------
def pop3_logged_in(*messages: bytes) -> Session:
    s = Session(role="pop3s", tls=True, starttls=False)
    for message in messages:
        s.inbox.add(message)
    s.read()
    assert s.login().startswith("+OK maildrop has")
    return s


def test_pop3_shutdown_sends_sys_temp_and_closes_without_update():
    s = pop3_logged_in(b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n")
    assert s.last("DELE 1") == "+OK Message 1 deleted"
    gone = s.factory.shutdown_sessions()
    # RFC 2449 §8.1.2: SYS/TEMP; RFC 1939 §6: no QUIT, so no UPDATE.
    assert s.read() == ["-ERR [SYS/TEMP] server shutting down"]
    assert s.closed
    assert not gone.called
    lost(s.server)
    assert gone.called
    assert s.inbox.uids == [1, 2]
    assert not any(call[0] == "expunge" for call in s.inbox.calls)


def test_pop3_shutdown_reaches_every_session_also_before_login():
    first = pop3_logged_in()
    second = first.world.session(role="pop3s", tls=True, starttls=False)
    second.read()
    gone = first.factory.shutdown_sessions()
    for s in (first, second):
        assert s.read() == ["-ERR [SYS/TEMP] server shutting down"] and s.closed
    lost(first.server)
    assert not gone.called          # one session is still there
    lost(second.server)
    assert gone.called


def test_pop3_shutdown_without_sessions_fires_at_once():
    s = Session()
    s.read()
    s.disconnect()
    assert s.factory.shutdown_sessions().called


# -- IMAP -------------------------------------------------------------------------
def test_imap_shutdown_sends_bye_and_closes():
    s = IMAPSession(store=filled(count=1))
    s.login()
    s.select()
    gone = s.factory.shutdown_sessions()
    # RFC 3501 §7.1.5: an untagged BYE at any time.
    assert s.read() == ["* BYE Server shutting down"]
    assert s.closed
    assert not gone.called
    lost(s.server)
    assert gone.called


def test_imap_shutdown_reaches_an_idle_session():
    s = IMAPSession(store=filled(count=1))
    s.login()
    s.select()
    assert s.cmd("a9 IDLE") == ["+ idling"]
    s.factory.shutdown_sessions()
    assert s.read() == ["* BYE Server shutting down"]
    assert s.closed


def test_imap_shutdown_before_login():
    s = IMAPSession(tls=False)
    s.factory.shutdown_sessions()
    assert s.read() == ["* BYE Server shutting down"]
    assert s.closed


# -- ListenerService.stopService ------------------------------------------------------
class FakeFactory:
    """A protocol factory with shutdown_sessions(); `result` is what it returns."""

    def __init__(self, result=None, open_total=0):
        self.result = result
        self.calls = 0
        self.connections = type("Counts", (), {"open_total": open_total})()

    def shutdown_sessions(self):
        self.calls += 1
        return self.result

    def doStart(self):
        pass

    def doStop(self):
        pass


def stopped(factory, reactor=None):
    reactor = reactor or MemoryReactorClock()
    listening = ListenerService(reactor, "tcp:0:interface=127.0.0.1", factory, "test")
    listening.startService()
    return reactor, listening.stopService()


def test_stop_service_waits_for_the_sessions_to_go():
    sessions_gone = defer.Deferred()
    factory = FakeFactory(sessions_gone)
    reactor, d = stopped(factory)
    assert factory.calls == 1
    assert not d.called
    sessions_gone.callback(None)
    assert d.called
    assert not reactor.getDelayedCalls()       # the grace timer was cancelled


def test_stop_service_waits_no_longer_than_the_grace():
    factory = FakeFactory(defer.Deferred())     # sessions that never go
    reactor, d = stopped(factory)
    reactor.advance(SHUTDOWN_GRACE - 0.01)
    assert not d.called
    reactor.advance(0.01)
    assert d.called


def test_stop_service_reaches_the_factory_inside_tls():
    factory = FakeFactory(defer.succeed(None))
    _, d = stopped(TLSMemoryBIOFactory(CertificateOptions(), False, factory))
    assert factory.calls == 1
    assert d.called


def test_stop_service_of_a_factory_without_shutdown_sessions():
    class Plain:
        def doStart(self):
            pass

        def doStop(self):
            pass
    _, d = stopped(Plain())
    assert d.called
