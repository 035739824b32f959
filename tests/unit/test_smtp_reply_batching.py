"""How replies reach the transport: the replies to one batch of input leave in
one write, at its end; nothing that must follow them on the wire (the TLS
handshake, the close) overtakes them; replies made later (a commit finishing)
leave at once."""
from __future__ import annotations

from smtp_harness import Session, TLSStringTransport


class RecordingTransport(TLSStringTransport):
    """Records every write, startTLS and close, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[tuple] = []

    def write(self, data):
        self.events.append(("write", bytes(data)))
        super().write(data)

    def startTLS(self, contextFactory):
        self.events.append(("startTLS",))
        super().startTLS(contextFactory)

    def loseConnection(self):
        self.events.append(("close",))
        super().loseConnection()

    def writes(self) -> list[bytes]:
        return [event[1] for event in self.events if event[0] == "write"]


def recorded_session(**kwargs) -> tuple[Session, RecordingTransport]:
    s = Session(**kwargs)
    transport = RecordingTransport(peerAddress=s.transport.getPeer())
    s.transport = transport
    s.server = s.factory.buildProtocol(transport.getPeer())
    s.server.makeConnection(transport)
    assert s.read()[0].startswith("220 ")
    s.ehlo()
    transport.events.clear()
    return s, transport


def test_replies_to_a_pipelined_group_leave_in_one_write():
    s, transport = recorded_session()
    s.server.dataReceived(b"MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n"
                          b"RCPT TO:<nobody@example.test>\r\nDATA\r\n")
    assert transport.writes() == [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                                  b"550 5.1.1 User unknown in local recipient table\r\n"
                                  b"354 End data with <CR><LF>.<CR><LF>\r\n"]


def test_the_reply_to_a_commit_leaves_when_the_commit_finishes_not_with_the_next_input():
    s, transport = recorded_session()
    s.store.pending = []
    s.send(b"MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    transport.events.clear()
    s.server.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert transport.writes() == []                       # the commit is still running
    d, paths = s.store.pending.pop()
    d.callback(paths)
    assert transport.writes() == [b"250 2.0.0 Ok: queued as Q000000000000001\r\n"]


def test_the_220_to_starttls_leaves_before_the_handshake_and_alone():
    s, transport = recorded_session()
    s.server.dataReceived(b"STARTTLS\r\nMAIL FROM:<injected@elsewhere.test>\r\n")
    assert transport.events == [("write", b"220 2.0.0 Ready to start TLS\r\n"), ("startTLS",)]


def test_replies_before_a_close_leave_before_it():
    s, transport = recorded_session()
    s.server.dataReceived(b"NOOP\r\nQUIT\r\nNOOP\r\n")
    assert transport.events == [("write", b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"), ("close",)]


def test_too_many_errors_closes_after_the_replies_it_answers():
    s, transport = recorded_session(smtp={"max_errors": 3})
    s.server.dataReceived(b"BOGUS\r\n" * 5)
    writes = b"".join(transport.writes())
    assert transport.events[-1] == ("close",)
    assert writes.count(b"500 5.5.2") == 3
    assert writes.endswith(b"421 4.7.0 Too many errors, closing transmission channel\r\n")


def test_held_replies_are_bounded():
    s, transport = recorded_session(smtp={"max_commands_before_mail": 20000})
    s.server.dataReceived(b"NOOP\r\n" * 10000)          # 140 KiB of replies
    writes = transport.writes()
    assert b"".join(writes) == b"250 2.0.0 Ok\r\n" * 10000
    assert len(writes) >= 2
    assert max(len(w) for w in writes) <= 64 * 1024 + len(b"250 2.0.0 Ok\r\n")
