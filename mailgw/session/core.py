"""`LineSession`: the one connection core under SMTP, POP3 and IMAP.

What makes a connection safe is written once, here (docs/twisted.md §8):

- input is buffered and split into lines; a line is bounded by the limit of
  the protocol's current state, and an over-long line gets one answer and is
  dropped whole up to its end, never split into several commands;
- one command at a time: while a command's Deferred is outstanding, later
  (pipelined) input waits, so replies leave in order (RFC 2920 §3,
  RFC 2449 §6.6, RFC 3501 §5.5); the replies made while one batch of input
  is processed leave in one send;
- flow control both ways: reading pauses while pipelined input piles up
  behind a slow command or while the client does not read our replies (we
  are the transport's push producer), so every buffer stays bounded;
- the idle timer, the session timer and the protocol's own timers run on the
  injected clock and all stop with the connection;
- `max_errors` counts what the protocol calls an error and then closes;
- STARTTLS: our go-ahead leaves in the clear, whatever the client pipelined
  behind the command is discarded (CVE-2011-0411), TLS starts, and the
  protocol forgets what it learned before (`tls_started`);
- closing: the last words, then loseConnection, and an abort after
  CLOSE_GRACE if the peer does not let go;
- the one place where an exception from a command becomes a reply
  (`command_failed`): the protocol names the reply for the errors it
  knows, anything else is logged with its traceback and answered with the
  protocol's "internal error", never with internals.

A protocol subclasses LineSession and adds its command table
(`CommandTable`: an explicit verb -> handler map, nothing dispatched by
name), its reply formatting and the hooks below (IMAP's literals, SMTP's
DATA and SASL continuations override `step` or `line_received`).
"""
from __future__ import annotations

import ipaddress
from typing import Callable, Collection, Mapping, NamedTuple

from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ITLSTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw import metrics
from mailgw.auth import sasl
from mailgw.errors import LoginsRefused
from mailgw.session.info import SessionInfo
from mailgw.twisted_wall import send_now

# Seconds a connection we close may take to go: its last reply to drain and, on
# TLS, the client's answer to our close_notify. Twisted's TLS waits for that
# answer without limit (RFC 8446 §6.1 does not require waiting at all), so a
# client that never answers, or never reads, would keep its connection, its
# slot in the limits and a file descriptor after every timeout. After the
# grace the connection is aborted (the queue's client does the same).
CLOSE_GRACE = 2.0


def cancel_timer(timer) -> None:
    if timer is not None and timer.active():
        timer.cancel()


class LoginFailed(Exception):
    """The credentials were refused (counted and logged by `log_in`).
    `lockout` is the checker's LoginsRefused when the address is locked out;
    `last` is True when this was the client's last allowed failure."""

    def __init__(self, why: str, lockout: LoginsRefused | None, last: bool):
        super().__init__(why)
        self.lockout = lockout
        self.last = last


class LoginUnavailable(Exception):
    """The portal could not decide now (logged by `log_in`): a temporary failure."""


class Command(NamedTuple):
    handler: Callable
    states: frozenset


class CommandTable:
    """verb -> (handler, the states it is valid in). The only way a client's
    verb reaches code: what is not in the table is an unknown command."""

    def __init__(self, commands: Mapping[str, tuple[Callable, Collection[str]]]):
        self._commands = {verb.upper(): Command(handler, frozenset(states))
                          for verb, (handler, states) in commands.items()}

    def find(self, verb: str) -> Command | None:
        return self._commands.get(verb)

    def verbs(self) -> frozenset:
        return frozenset(self._commands)

    def handlers(self) -> set:
        return {command.handler for command in self._commands.values()}


@implementer(IPushProducer)
class _OutputBackpressure:
    """Registered with the transport, which pauses it when our replies are not read."""

    def __init__(self, session: "LineSession"):
        self.session = session

    def pauseProducing(self):
        self.session._output_blocked(True)

    def resumeProducing(self):
        self.session._output_blocked(False)

    def stopProducing(self):
        self.session._wake_writers()


@implementer(IHandshakeListener)
class LineSession(protocol.Protocol):
    """One client connection. See the module docstring for what it owns.

    Metrics (mailgw/metrics.py, the factory's registry): connections admitted
    and open per listener, commands and replies (the protocol calls
    `count_command` and `count_reply`), TLS handshakes by version and those
    that never completed."""

    log = Logger()
    protocol_name = "line"
    # CRLF ends a line; True: a bare LF does too (POP3, where the client sends
    # no message data that could be smuggled).
    bare_lf_ends_line = False
    # Pipelined input held while a command runs; above it, reading pauses.
    max_pending_input = 256 * 1024
    # Replies held while one batch of input is processed; beyond this they go
    # out at once (only a client pipelining thousands of commands gets that far).
    max_held_output = 64 * 1024
    # How a refused login is logged (fail2ban filters match it): "<this> user='...' client=[...]: why".
    login_failure_log = "login failed"

    def __init__(self, factory):
        self.factory = factory
        self.limits = factory.limits
        self.portal = factory.portal
        self.clock = factory.clock
        self.metrics = metrics.registry_or_default(getattr(factory, "metrics", None))
        self._metrics_protocol = self.protocol_name.lower()
        self._tls_pending = False       # a handshake started and not completed
        self.session: SessionInfo | None = None
        self.user: str | None = None
        self.closing = False
        self.can_starttls = False
        self._buffer = bytearray()      # deleting from its front is O(1) amortised
        self._scan = 0                  # where to look for the next line end
        self._skipping_long_line = False
        self._busy = False              # a command's Deferred is outstanding
        self._looping = False           # inside _process (re-entrancy guard)
        self._held: list[bytes] = []
        self._held_size = 0
        self._input_paused = False      # we paused the transport (too much pipelined input)
        self._output_full = False       # the transport's send buffer is full
        self._producing = False         # _OutputBackpressure is registered
        self._writers: list[defer.Deferred] = []
        self._admitted = False
        self._errors = 0
        self._auth_failures = 0
        self._timers: dict = {}
        self._idle_seconds: float | None = None
        self._idle_timer = None         # active, or None (a DelayedCall reset per read)

    # -- hooks a protocol provides ------------------------------------------------
    def session_started(self) -> None:
        """Admitted: send the greeting (and start the protocol's own timers)."""
        raise NotImplementedError

    def refusal(self) -> bytes:
        """The last words to a client over the connection limits."""
        raise NotImplementedError

    def idle_timeout(self) -> float | None:
        raise NotImplementedError

    def session_timeout(self) -> float | None:
        """The longest a session may last; None or 0: no limit."""
        return getattr(self.limits, "session_timeout", None)

    def idle_expired(self) -> bytes:
        raise NotImplementedError

    def session_expired(self) -> bytes:
        raise NotImplementedError

    def too_many_errors(self) -> bytes:
        raise NotImplementedError

    def line_limit(self) -> int:
        """The longest line (with its CRLF) the current state takes."""
        raise NotImplementedError

    def line_received(self, line: bytes) -> None:
        """One line, without its end: usually `self.run(self.command, line)`."""
        raise NotImplementedError

    def line_too_long(self) -> None:
        """No line end within line_limit(): answer (once; the rest of the line is dropped)."""
        raise NotImplementedError

    def error_reply(self, error: Exception, context):
        """The reply for an error the protocol knows, or None (an internal error)."""
        return None

    def internal_error(self, context):
        """The reply to an unexpected error (it was logged)."""
        raise NotImplementedError

    def send_reply(self, reply, context) -> None:
        """Send the reply that error_reply/internal_error chose."""
        raise NotImplementedError

    def command_finished(self, result, context) -> None:
        """A command's handler returned (or its Deferred fired with) `result`."""

    def after_command(self) -> None:
        """A command's Deferred has fired, before reading on."""

    def tls_started(self) -> None:
        """TLS is starting: forget what was learned in the clear."""

    def connection_ended(self) -> None:
        """The connection is gone: release what the session holds (logout)."""

    def shut_down(self) -> None:
        """The server stops: the protocol's notice, then close."""
        raise NotImplementedError

    # -- connection lifecycle -------------------------------------------------------
    def connectionMade(self):
        try:
            client_ip = ipaddress.ip_address(self.transport.getPeer().host)
        except (AttributeError, ValueError):
            client_ip = ipaddress.ip_address("0.0.0.0")
        factory = self.factory
        self.session = SessionInfo(factory.listener, client_ip, self.transport, tls=factory.implicit_tls)
        self._tls_pending = bool(factory.implicit_tls)
        labels = (factory.listener.name, self._metrics_protocol)
        if not factory.admit(client_ip):
            self.metrics.inc(metrics.CONNECTIONS_OVER_LIMIT, *labels)
            self.log.warn("connection limit: refusing {client} on {listener}",
                          client=client_ip, listener=factory.listener.name)
            self.close(self.refusal())
            return
        self._admitted = True
        self.metrics.inc(metrics.CONNECTIONS, *labels)
        self.metrics.add(metrics.CONNECTIONS_OPEN, 1, *labels)
        factory.session_started(self)
        self.can_starttls = (ITLSTransport.providedBy(self.transport)
                             and factory.tls_context is not None and not factory.implicit_tls)
        if hasattr(self.transport, "setTcpNoDelay"):
            # One reply per request: never let Nagle hold it for the peer's delayed ACK.
            self.transport.setTcpNoDelay(True)
        # The transport tells this producer when its write buffer fills up.
        self.transport.registerProducer(_OutputBackpressure(self), True)
        self._producing = True
        self.session_started()
        self.set_idle_timeout(self.idle_timeout())
        limit = self.session_timeout()
        if limit:
            self.start_timer("session", limit, self._session_expired)

    def connectionLost(self, reason=protocol.connectionDone):
        self.closing = True
        self._buffer.clear()
        for timer in self._timers.values():
            cancel_timer(timer)
        self._timers.clear()
        cancel_timer(self._idle_timer)
        self._idle_timer = None
        self._wake_writers()
        self.connection_ended()
        if self.session is not None:
            labels = (self.factory.listener.name, self._metrics_protocol)
            if self._tls_pending:
                self._tls_pending = False
                self.metrics.inc(metrics.TLS_FAILURES, *labels)
            if self._admitted:
                self.metrics.add(metrics.CONNECTIONS_OPEN, -1, *labels)
        if self._admitted:
            self._admitted = False
            self.factory.release(self.session.client_ip)
            self.factory.session_ended(self)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: Twisted's TLS layer finished the handshake
        (implicit TLS or after STARTTLS)."""
        self._tls_pending = False
        try:
            version = self.transport.getHandle().get_protocol_version_name()
        except Exception:       # not an OpenSSL connection (tests)
            version = "unknown"
        self.metrics.inc(metrics.TLS_HANDSHAKES, self.factory.listener.name, self._metrics_protocol, version)

    def count_command(self, verb: str) -> None:
        """One command received; `verb` from the protocol's command table, or "other"."""
        self.metrics.inc(metrics.COMMANDS, self._metrics_protocol, verb)

    def count_reply(self, kind: str) -> None:
        """One reply sent: its class ("2xx", "+OK", "NO"...)."""
        self.metrics.inc(metrics.REPLIES, self._metrics_protocol, kind)

    def _session_expired(self) -> None:
        self.close(self.session_expired())

    def close(self, last_words: bytes | None = None) -> None:
        """Our last words (if any), then close, with an abort after CLOSE_GRACE."""
        if self.closing:
            return
        if last_words:
            self.send(last_words)
        self.closing = True
        self._buffer.clear()
        self._scan = 0
        self.release_output()
        if self._producing:
            # A registered producer holds TLS shutdown back (every close of a
            # TLS session would wait for the client): let go first.
            self._producing = False
            self.transport.unregisterProducer()
        cancel_timer(self._idle_timer)
        self._idle_timer = None
        self.transport.loseConnection()
        self.start_timer("abort", CLOSE_GRACE, self.transport.abortConnection)

    # -- timers ---------------------------------------------------------------------
    def start_timer(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """(Re)start the session's timer `name`; every timer stops with the connection."""
        cancel_timer(self._timers.get(name))
        self._timers[name] = self.clock.callLater(delay, self._timer_fired, name, callback)

    def cancel_timer(self, name: str) -> None:
        cancel_timer(self._timers.pop(name, None))

    def timer_active(self, name: str) -> bool:
        timer = self._timers.get(name)
        return timer is not None and timer.active()

    def _timer_fired(self, name: str, callback) -> None:
        self._timers.pop(name, None)
        callback()

    def set_idle_timeout(self, seconds: float | None) -> None:
        """How long the client may stay silent from now on; None: no limit."""
        self._idle_seconds = seconds
        cancel_timer(self._idle_timer)
        self._idle_timer = None
        if seconds is not None and not self.closing:
            self._idle_timer = self.clock.callLater(seconds, self._idle_expired)

    def _reset_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.reset(self._idle_seconds)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        self.close(self.idle_expired())

    # -- output ---------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Replies made while a batch of input is processed wait for its end
        (RFC 2920: the replies to a pipelined group may go out as one unit),
        then leave in one send; any other reply leaves at once. Nothing is
        sent after our last words."""
        if self.closing:
            return
        if not self._looping:
            send_now(self.transport, data)
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > self.max_held_output:
            self.release_output()

    def release_output(self) -> None:
        """Send the held replies: at the end of a batch, and before anything
        that must follow them on the wire (a close, the TLS handshake)."""
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._held_size = 0
            send_now(self.transport, data)

    def writable(self) -> defer.Deferred:
        """Fires when more output may be written (a long response in chunks):
        after one reactor turn if the transport is not full (so that other
        connections get their share), else when it asks for more."""
        if self._output_full:
            waiter = defer.Deferred()
            self._writers.append(waiter)
            return waiter
        return task.deferLater(self.clock, 0, lambda: None)

    def _wake_writers(self) -> None:
        writers, self._writers = self._writers, []
        for waiter in writers:
            waiter.callback(None)

    def _output_blocked(self, blocked: bool) -> None:
        self._output_full = blocked
        self._flow_control()
        if blocked:
            return
        # The client reads what we send: that is activity too.
        self._reset_idle()
        self._wake_writers()
        if not self._busy and not self.closing:
            self._process()

    # -- errors ---------------------------------------------------------------------
    def count_error(self) -> None:
        """One more error; at max_errors the session ends (RFC 5321 §4.3.2 421 etc.)."""
        if self.closing:
            return
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            self.close(self.too_many_errors())

    # -- logins ---------------------------------------------------------------------
    def log_in(self, username: bytes, password: bytes, interface) -> defer.Deferred:
        """Deferred[(avatar, logout)] for a username and password, through the
        portal. Fails with LoginFailed (refused: counted towards
        max_auth_failures, logged) or LoginUnavailable (trouble behind the
        portal: logged with its traceback)."""
        creds = credentials.UsernamePassword(username, password)
        creds.client_ip = self.session.client_text

        def failed(failure):
            if failure.check(UnauthorizedLogin):
                raise self.login_failed(username, "bad credentials")
            if failure.check(LoginsRefused):       # the checker logged it
                raise self.login_failed(username, "address locked out", failure.value)
            self.log.failure("{protocol} login error for client {client}", failure=failure,
                             protocol=self.protocol_name, client=self.session.client_text)
            raise LoginUnavailable()
        return self.portal.login(creds, self.session, interface).addCallbacks(
            lambda result: (result[1], result[2]), failed)

    def log_in_plain(self, response: bytes, interface) -> defer.Deferred:
        """log_in with a decoded SASL PLAIN response (RFC 4616). Raises
        sasl.MalformedPlain for the protocol to answer; an authorization
        identity other than the user's own is a refused login."""
        try:
            authcid, password = sasl.parse_plain(response)
        except sasl.ForeignIdentity as refused:
            return defer.fail(self.login_failed(refused.authcid, str(refused)))
        return self.log_in(authcid, password, interface)

    def login_failed(self, username: bytes, why: str, lockout: LoginsRefused | None = None) -> LoginFailed:
        """Count and log one refused login (also for a SASL exchange refused
        before the portal is asked); the protocol replies and, when `last`, closes."""
        self._auth_failures += 1
        self.log.warn(self.login_failure_log + " user={user!r} client=[{client}]: {why}",
                      user=username.decode("utf-8", "replace")[:100], client=self.session.client_ip, why=why)
        return LoginFailed(why, lockout, self._auth_failures >= self.limits.max_auth_failures)

    # -- input ----------------------------------------------------------------------
    def dataReceived(self, data: bytes):
        if self.closing:
            return
        if self._idle_timer is not None:
            self._idle_timer.reset(self._idle_seconds)
        self.input_received(data)
        self._process()

    def input_received(self, data: bytes) -> None:
        self._buffer += data

    def _process(self) -> None:
        if self._looping:
            return
        self._looping = True
        try:
            while not self._busy and not self._output_full and not self.closing:
                if not self.step():
                    break
        finally:
            self._looping = False
            if self._held:
                self.release_output()
        if self._input_paused or self._busy or self._output_full:
            self._flow_control()

    def step(self) -> bool:
        """Consume one piece of input; False when more input is needed."""
        line = self.next_line()
        if line is None:
            return False
        self.line_received(line)
        return True

    def _flow_control(self) -> None:
        """Stop reading while pipelined input piles up behind a slow command,
        or while the client does not read our replies."""
        if self.closing:
            return
        # Only a real backlog stops reading: TLS pauses its producer during the
        # handshake, and not reading then would deadlock the handshake.
        waiting = self._busy or self._output_full
        pause = waiting and len(self._buffer) > self.max_pending_input
        if pause and not self._input_paused:
            self._input_paused = True
            self.transport.pauseProducing()
        elif not pause and self._input_paused:
            self._input_paused = False
            self.transport.resumeProducing()

    def next_line(self) -> bytes | None:
        """The next line without its end, or None until one is complete."""
        buffer = self._buffer
        ending = b"\n" if self.bare_lf_ends_line else b"\r\n"
        while True:
            end = buffer.find(ending, self._scan)
            if end < 0:
                if buffer and len(buffer) > self.line_limit():
                    # No line end in sight: answer once, then drop input up to
                    # the next line end so the tail is never parsed as a command.
                    if not self._skipping_long_line:
                        self._skipping_long_line = True
                        self.line_too_long()
                    keep = 1 if not self.bare_lf_ends_line and buffer.endswith(b"\r") else 0
                    del buffer[:len(buffer) - keep]
                    self._scan = 0
                    return None
                self._scan = max(0, len(buffer) - len(ending) + 1)
                return None
            line = bytes(buffer[:end])
            del buffer[:end + len(ending)]
            self._scan = 0
            if self._skipping_long_line:
                self._skipping_long_line = False
                continue
            if self.bare_lf_ends_line and line.endswith(b"\r"):
                line = line[:-1]
            return line

    def discard_input(self) -> None:
        self._buffer.clear()
        self._scan = 0
        self._skipping_long_line = False

    # -- commands -------------------------------------------------------------------
    def run(self, handler, *args, context=None) -> None:
        """Run one command. A Deferred result holds the input after it until
        it fires; an exception, raised or in the Deferred, becomes a reply."""
        try:
            result = handler(*args)
        except Exception:
            self.command_failed(Failure(), context)
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addBoth(self._command_settled, context)
        else:
            self.command_finished(result, context)

    def _command_settled(self, result, context) -> None:
        """A command's Deferred fired: its result or error, then read on."""
        try:
            if isinstance(result, Failure):
                self.command_failed(result, context)
            else:
                self.command_finished(result, context)
        except Exception:
            self._unexpected(Failure())
        self._busy = False
        self.after_command()
        if not self.closing:
            self._process()

    def command_failed(self, failure: Failure, context) -> None:
        """The one place where exceptions become replies."""
        reply = self.error_reply(failure.value, context)
        if reply is None:
            # Never show internals to the client; the log has the traceback.
            self.log.failure("unexpected error in {protocol} session from {client} user={user}",
                             failure=failure, protocol=self.protocol_name,
                             client=self.session.client_text if self.session else "-", user=self.user or "-")
            reply = self.internal_error(context)
        if not self.closing:
            self.send_reply(reply, context)

    def _unexpected(self, failure: Failure) -> None:
        self.log.failure("unexpected error finishing a {protocol} command", failure=failure,
                         protocol=self.protocol_name)


    # -- STARTTLS ---------------------------------------------------------------------
    def start_tls(self) -> None:
        """After the protocol's go-ahead reply (RFC 3207 §4, RFC 2595 §4, RFC 3501 §6.2.1)."""
        # CVE-2011-0411: what the client pipelined in the clear is never executed inside TLS.
        self.discard_input()
        self.release_output()           # the go-ahead leaves in the clear, before the handshake
        self._tls_pending = True
        self.transport.startTLS(self.factory.tls_context)
        self.session.tls = True
        self.tls_started()
