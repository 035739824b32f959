"""The connection core (mailgw.session.core.LineSession), tested once against
a minimal protocol and once per real protocol (SMTP, POP3, IMAP) with the same
tests: pipelining order, flow control both ways, STARTTLS's discard, max_errors,
the idle and session timers, the close grace. And for every protocol: each
verb a client can reach is in its command table, nothing else is."""
from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.mail import imap4, pop3, smtp

from mailgw.config_types import ListenerConfig
from mailgw.imap.server import _COMMANDS as IMAP_COMMANDS
from mailgw.imap.server import IMAPServer
from mailgw.pop3.server import COMMANDS as POP3_COMMANDS
from mailgw.pop3.server import MailgwPOP3
from mailgw.session.core import CLOSE_GRACE, CommandTable, LineSession
from mailgw.session.listener import ListenerFactory
from mailgw.smtp.server import COMMANDS as SMTP_COMMANDS
from mailgw.smtp.server import MailgwSMTP
from imap_harness import IMAPSession
from pop3_harness import Session as POP3Session
from smtp_harness import Session as SMTPSession
from smtp_harness import TLSStringTransport

PLAIN_ALICE = base64.b64encode(b"\0alice@example.test\0secret").decode()


# -- a minimal protocol on the core ---------------------------------------------------
class Refused(Exception):
    """An error the minimal protocol knows (its error_reply names the reply)."""


class EchoSession(LineSession):
    """PING -> +PONG; SLOW waits for the test; FAIL/REFUSE raise; STARTTLS."""

    protocol_name = "ECHO"

    def __init__(self, factory):
        super().__init__(factory)
        self.slow: list[defer.Deferred] = []
        self.tls_resets = 0

    def session_started(self):
        self.send(b"+READY\r\n")

    def refusal(self):
        return b"-BUSY\r\n"

    def idle_timeout(self):
        return self.limits.idle

    def idle_expired(self):
        return b"-IDLE\r\n"

    def session_expired(self):
        return b"-EXPIRED\r\n"

    def too_many_errors(self):
        return b"-ERRORS\r\n"

    def line_limit(self):
        return self.limits.max_line

    def line_too_long(self):
        self._answer("-LONG")

    def line_received(self, line):
        self.run(self._command, line)

    def _command(self, line):
        verb, _, rest = line.decode("ascii", "replace").partition(" ")
        command = ECHO_COMMANDS.find(verb.upper())
        if command is None:
            return self._answer("-UNKNOWN")
        return command.handler(self, rest)

    def _answer(self, text):
        self.send(text.encode("ascii") + b"\r\n")
        if text.startswith("-"):
            self.count_error()

    def error_reply(self, error, context):
        return "-REFUSED" if isinstance(error, Refused) else None

    def internal_error(self, context):
        return "-INTERNAL"

    def send_reply(self, reply, context):
        self._answer(reply)

    def tls_started(self):
        self.tls_resets += 1

    def shut_down(self):
        self.close(b"-BYE\r\n")

    def do_PING(self, rest):
        self._answer("+PONG")

    def do_SLOW(self, rest):
        waiting = defer.Deferred().addCallback(lambda _: self._answer("+SLOW"))
        self.slow.append(waiting)
        return waiting

    def do_FAIL(self, rest):
        raise RuntimeError("a bug")

    def do_REFUSE(self, rest):
        raise Refused()

    def do_STARTTLS(self, rest):
        self._answer("+GO")
        self.start_tls()

    def do_QUIT(self, rest):
        self.close(b"+BYE\r\n")


ECHO_COMMANDS = CommandTable({verb: (getattr(EchoSession, f"do_{verb}"), ("any",))
                              for verb in ("PING", "SLOW", "FAIL", "REFUSE", "STARTTLS", "QUIT")})


class EchoFactory(ListenerFactory):
    def make_protocol(self):
        return EchoSession(self)


class EchoHarness:
    def __init__(self, **limits):
        values = dict(idle=60.0, session_timeout=600.0, max_errors=5, max_line=100,
                      max_connections=10, max_connections_per_ip=10)
        values.update(limits)
        self.clock = task.Clock()
        listener = ListenerConfig(role="echo", endpoint="tcp:0", name="echo")
        self.factory = EchoFactory(config=None, listener=listener, portal=None, clock=self.clock,
                                   limits=SimpleNamespace(**values), tls_context=object())
        peer = IPv4Address("TCP", "192.0.2.10", 40000)
        self.transport = TLSStringTransport(peerAddress=peer)
        self.server = self.factory.buildProtocol(peer)
        self.server.makeConnection(self.transport)

    def read(self):
        data = self.transport.value()
        self.transport.clear()
        return [line for line in data.decode().split("\r\n") if line]

    def send(self, data):
        self.server.dataReceived(data if isinstance(data, bytes) else data.encode())
        return self.read()

    @property
    def closed(self):
        return self.transport.disconnecting


# -- one adapter per protocol: the same tests drive each ----------------------------
class Protocol:
    """How to talk to one protocol: a cheap command and its reply, the
    unknown-command reply, a command whose answer the test can hold back."""

    name: str

    def session(self, **limits):
        raise NotImplementedError

    def command(self, s, n):
        """Line n of a pipelined batch: a cheap command (NOOP)."""
        raise NotImplementedError

    def ok(self, n):
        raise NotImplementedError

    def unknown(self, n):
        """(line, reply) of an unknown verb."""
        raise NotImplementedError

    def hold_login(self, s):
        """Make the next login wait: returns the list its Deferreds go to."""
        held = []

        def waiting(credentials):
            d = defer.Deferred()
            held.append((d, credentials.username.decode()))
            return d
        s.checker.requestAvatarId = waiting
        return held


class Echo(Protocol):
    name = "echo"
    idle_limit = "idle"
    idle_reply, session_reply, errors_reply = "-IDLE", "-EXPIRED", "-ERRORS"
    starttls, starttls_reply = "STARTTLS", "+GO"

    def session(self, **limits):
        s = EchoHarness(**limits)
        s.read()
        return s

    def command(self, s, n):
        return "PING"

    def ok(self, n):
        return "+PONG"

    def unknown(self, n):
        return "UNKNOWN", "-UNKNOWN"

    def slow(self, s):
        """(line, [Deferred], fire(held), reply) of a command answered later."""
        def fire(held):
            held.pop(0).callback(None)
        return "SLOW", s.server.slow, fire, "+SLOW", "PING", "+PONG"


class SMTP(Protocol):
    name = "smtp"
    idle_limit = "command_timeout"
    idle_reply = "421 4.4.2 Timeout, closing transmission channel"
    session_reply = "421 4.4.2 Session time limit exceeded"
    errors_reply = "421 4.7.0 Too many errors, closing transmission channel"
    starttls, starttls_reply = "STARTTLS", "220 2.0.0 Ready to start TLS"

    def session(self, **limits):
        s = SMTPSession(role="relay", smtp={"max_commands_before_mail": 100_000, **limits})
        s.read()
        s.ehlo()
        return s

    def command(self, s, n):
        return "NOOP"

    def ok(self, n):
        return "250 2.0.0 Ok"

    def unknown(self, n):
        return "UNKNOWN", "500 5.5.2 Syntax error, command unrecognized"

    def slow(self, s):
        s.server.session.tls = True         # AUTH only under TLS
        held = self.hold_login(s)

        def fire(held):
            d, user = held.pop(0)
            d.callback(user)
        return f"AUTH PLAIN {PLAIN_ALICE}", held, fire, "235 2.7.0 Authentication successful", "NOOP", "250 2.0.0 Ok"


class POP3(Protocol):
    name = "pop3"
    idle_limit = "command_timeout"
    idle_reply, session_reply = "-ERR Disconnected for inactivity", "-ERR Session time limit exceeded"
    errors_reply = "-ERR Too many errors, closing connection"
    starttls, starttls_reply = "STLS", "+OK Begin TLS negotiation"

    def session(self, **limits):
        s = POP3Session(pop3=dict(limits, allow_plaintext_auth=True))
        s.read()
        return s

    def command(self, s, n):
        return "USER alice@example.test"

    def ok(self, n):
        return "+OK Send PASS"

    def unknown(self, n):
        return "UNKNOWN", "-ERR Unknown command"

    def slow(self, s):
        assert s.last("USER alice@example.test") == "+OK Send PASS"
        held = self.hold_login(s)

        def fire(held):
            d, user = held.pop(0)
            d.callback(user)
        return "PASS secret", held, fire, "+OK maildrop has 0 messages (0 octets)", "NOOP", "+OK"


class IMAP(Protocol):
    name = "imap"
    idle_limit = "idle_timeout"
    idle_reply, session_reply = "* BYE Autologout; idle for too long", "* BYE Session time limit exceeded"
    errors_reply = "* BYE Too many errors"
    starttls, starttls_reply = "s1 STARTTLS", "s1 OK Begin TLS negotiation now"

    def session(self, **limits):
        # The login timer (a protocol timer of its own) out of the way of the core's.
        return IMAPSession(tls=False, imap={"login_timeout": 10_000, **limits})

    def command(self, s, n):
        return f"a{n} NOOP"

    def ok(self, n):
        return f"a{n} OK NOOP completed"

    def unknown(self, n):
        return f"u{n} UNKNOWN", f"u{n} BAD Unknown command UNKNOWN"

    def slow(self, s):
        s.server.session.tls = True
        held = self.hold_login(s)

        def fire(held):
            d, user = held.pop(0)
            d.callback(user)
        return 'l1 LOGIN "alice@example.test" "secret"', held, fire, "l1 OK", "a1 NOOP", "a1 OK NOOP completed"


PROTOCOLS = [Echo(), SMTP(), POP3(), IMAP()]
ids = [p.name for p in PROTOCOLS]


def lines(p, s, *commands):
    return s.send("".join(c + "\r\n" for c in commands))


# -- pipelining ----------------------------------------------------------------------
@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_pipelined_replies_leave_in_order_in_one_send(p):
    s = p.session()
    writes = []
    original = s.transport.write
    s.transport.write = lambda data: (writes.append(data), original(data))
    unknown, unknown_reply = p.unknown(2)
    replies = lines(p, s, p.command(s, 1), unknown, p.command(s, 3))
    # The unknown verb is answered between the two, with the normal reply.
    assert replies == [p.ok(1), unknown_reply, p.ok(3)]
    assert len(writes) == 1


@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_a_slow_command_holds_the_input_behind_it(p):
    s = p.session()
    line, held, fire, reply, follow, follow_reply = p.slow(s)
    assert lines(p, s, line, follow) == []          # nothing: the first is not answered yet
    assert held
    fire(held)
    replies = s.read()
    assert replies[0].startswith(reply), replies
    assert replies[-1] == follow_reply


@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_an_unknown_verb_counts_towards_max_errors(p):
    s = p.session(max_errors=3)
    for n in range(2):
        line, reply = p.unknown(n)
        assert lines(p, s, line) == [reply]
    assert not s.closed
    line, reply = p.unknown(3)
    assert lines(p, s, line) == [reply, p.errors_reply]
    assert s.closed


# -- flow control --------------------------------------------------------------------
@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_commands_wait_while_the_client_does_not_read(p):
    s = p.session()
    s.transport.producer.pauseProducing()          # the transport's send buffer is full
    assert lines(p, s, p.command(s, 1), p.command(s, 2)) == []
    s.transport.producer.resumeProducing()
    replies = s.read()
    assert replies[0] == p.ok(1) and replies[-1] == p.ok(2)


@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_reading_pauses_when_pipelined_input_piles_up(p):
    s = p.session()
    s.transport.producer.pauseProducing()
    batch = "".join(p.command(s, n) + "\r\n" for n in range(1, 3))
    limit = type(s.server).max_pending_input
    for _ in range(limit // len(batch) + 2):
        s.server.dataReceived(batch.encode())
    assert s.transport.producerState == "paused"
    assert s.read() == []
    s.transport.producer.resumeProducing()
    assert s.transport.producerState == "producing"
    assert s.read()[0] == p.ok(1)


# -- STARTTLS ------------------------------------------------------------------------
@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_starttls_discards_what_was_pipelined_in_the_clear(p):
    s = p.session()
    replies = lines(p, s, p.starttls, p.command(s, 1))
    assert replies == [p.starttls_reply]                    # CVE-2011-0411: the NOOP is gone
    assert s.transport.tls_started and s.server.session.tls
    if p.name == "smtp":
        s.ehlo()                                            # RFC 3207 §4.2: EHLO again
    assert lines(p, s, p.command(s, 2))[-1] == p.ok(2)


# -- timers --------------------------------------------------------------------------
@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_idle_timer_is_reset_by_input_and_then_closes(p):
    s = p.session(**{p.idle_limit: 100})
    s.clock.advance(99)
    assert not s.closed
    assert lines(p, s, p.command(s, 1))[-1] == p.ok(1)
    s.clock.advance(99)
    assert not s.closed
    s.clock.advance(2)
    assert s.read() == [p.idle_reply] and s.closed


@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_session_timer_ends_even_a_busy_session(p):
    s = p.session(**{p.idle_limit: 100, "session_timeout": 150})
    s.clock.advance(80)
    assert lines(p, s, p.command(s, 1))[-1] == p.ok(1)
    s.clock.advance(80)
    assert s.read() == [p.session_reply] and s.closed


@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_a_close_that_hangs_is_aborted_after_the_grace(p):
    s = p.session(**{p.idle_limit: 100})
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    s.clock.advance(100)
    assert s.closed and not aborted
    s.clock.advance(CLOSE_GRACE)
    assert aborted == [True]


@pytest.mark.parametrize("p", PROTOCOLS, ids=ids)
def test_connection_lost_stops_every_timer(p):
    s = p.session()
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    s.server.connectionLost(Failure(ConnectionDone()))
    assert s.clock.getDelayedCalls() == []


# -- the minimal protocol: what the real ones cannot easily show --------------------
def test_an_unexpected_error_is_logged_and_answered_without_internals():
    from twisted.logger import globalLogPublisher
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        s = Echo().session()
        assert s.send("FAIL\r\nREFUSE\r\nPING\r\n") == ["-INTERNAL", "-REFUSED", "+PONG"]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    failures = [event for event in seen if "log_failure" in event]
    assert len(failures) == 1 and failures[0]["log_failure"].check(RuntimeError)


def test_an_overlong_line_is_answered_once_and_dropped_whole():
    s = Echo().session(max_line=100)
    assert s.send("PING " + "x" * 200) == ["-LONG"]
    assert s.send("x" * 300) == []
    assert s.send("PING\r\nPING\r\n") == ["+PONG"]         # the tail of the long line was not a command
    assert s.send("PING " + "x" * 90 + "\r\n") == ["+PONG"]


def test_tls_started_hook_runs_once_and_the_go_ahead_is_in_the_clear():
    s = Echo().session()
    sent_before_tls = []
    s.transport.startTLS = lambda context: sent_before_tls.append(s.transport.value())
    s.send("STARTTLS\r\nPING\r\n")
    assert sent_before_tls == [b"+GO\r\n"] and s.server.tls_resets == 1


def test_over_the_connection_limit_the_client_gets_the_refusal():
    first = EchoHarness(max_connections=1)
    peer = IPv4Address("TCP", "192.0.2.11", 40001)
    transport = TLSStringTransport(peerAddress=peer)
    second = first.factory.buildProtocol(peer)
    second.makeConnection(transport)
    assert transport.value() == b"-BUSY\r\n" and transport.disconnecting
    assert first.factory.connections.open_total == 1


# -- command tables: nothing reachable that is not in the table --------------------
# Every verb Twisted's classes would have answered, and a few more.
TWISTED_VERBS = {name[3:] for cls in (smtp.ESMTP, pop3.POP3, imap4.IMAP4Server)
                 for name in dir(cls) if name.startswith("do_")} | {"UNKNOWN", "TURN", "XEXCH50", "ATRN"}


@pytest.mark.parametrize("server, table", [(MailgwSMTP, SMTP_COMMANDS), (MailgwPOP3, POP3_COMMANDS),
                                           (IMAPServer, IMAP_COMMANDS)], ids=["smtp", "pop3", "imap"])
def test_every_handler_is_in_the_command_table_and_nothing_is_inherited(server, table):
    handlers = {name for name in dir(server) if name.startswith("do_")}
    assert {f"do_{verb}" for verb in table.verbs()} == handlers
    assert {getattr(server, name) for name in handlers} == table.handlers()
    assert not issubclass(server, (smtp.SMTP, pop3.POP3, imap4.IMAP4Server))


@pytest.mark.parametrize("p, table", [(SMTP(), SMTP_COMMANDS), (POP3(), POP3_COMMANDS),
                                      (IMAP(), IMAP_COMMANDS)], ids=["smtp", "pop3", "imap"])
def test_every_verb_not_in_the_table_gets_the_unknown_reply_in_order(p, table):
    s = p.session(max_errors=1000)
    # IMAP's UID is a prefix of the commands in _UID_COMMANDS, not a command.
    reachable = table.verbs() | ({"UID"} if p.name == "imap" else set())
    for verb in sorted(TWISTED_VERBS - reachable):
        line, reply = p.unknown(0)
        line = line.replace("UNKNOWN", verb)
        reply = reply.replace("UNKNOWN", verb)
        assert lines(p, s, p.command(s, 1), line, p.command(s, 3)) == [p.ok(1), reply, p.ok(3)], verb
    assert s.server._errors == len(TWISTED_VERBS - reachable)



# -- logins: one way through the portal, refusals counted alike ----------------------
FOREIGN = base64.b64encode(b"bob@example.test\0alice@example.test\0secret").decode()
REFUSALS = {
    "smtp": (f"AUTH PLAIN {FOREIGN}", "535 5.7.8 Authentication credentials invalid",
             "421 4.7.0 Too many failed authentications"),
    "pop3": (f"AUTH PLAIN {FOREIGN}", "-ERR [AUTH] Authentication failed",
             "-ERR [AUTH] Too many authentication failures, closing connection"),
    "imap": (f"x AUTHENTICATE PLAIN {FOREIGN}", "x NO [AUTHENTICATIONFAILED] Authentication failed",
             "* BYE Too many failed logins"),
}


@pytest.mark.parametrize("p", [SMTP(), POP3(), IMAP()], ids=["smtp", "pop3", "imap"])
def test_a_foreign_authorization_identity_is_a_refused_login_counted_like_a_bad_password(p):
    # RFC 4616 §2: we act only as the authenticated user; the portal is not even asked.
    limits = {"max_auth_failures": 2}
    s = p.session(**limits)
    s.server.session.tls = True
    asked = p.hold_login(s)
    line, refused, last = REFUSALS[p.name]
    assert lines(p, s, line) == [refused] and not s.closed
    assert lines(p, s, line) == [refused, last] and s.closed
    assert asked == []
