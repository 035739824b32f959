"""What every listener shares (SMTP, POP3, IMAP): connection limits, the
factory base, closing with a deadline, and running commands one at a time."""
from __future__ import annotations

from collections import Counter

from twisted.internet import defer, protocol, tcp

# Seconds a connection we close may take to go: its last reply to drain and, on
# TLS, the client's answer to our close_notify. Twisted's TLS waits for that
# answer without limit (RFC 8446 §6.1 does not require waiting at all), so a
# client that never answers, or never reads, would keep its connection, its
# slot in the limits below and a file descriptor after every timeout. After
# the grace the connection is aborted (the queue's client does the same).
CLOSE_GRACE = 2.0


def close_connection(transport, clock):
    """loseConnection now; abortConnection CLOSE_GRACE seconds later if the
    connection is still there. Returns the timer: cancel it in connectionLost."""
    transport.loseConnection()
    return clock.callLater(CLOSE_GRACE, transport.abortConnection)


def cancel_timer(timer) -> None:
    if timer is not None and timer.active():
        timer.cancel()


_PLAIN_TCP = (tcp.Server, tcp.Client)


def send_now(transport, data: bytes) -> None:
    """transport.write(data), but on a plain TCP connection (accepted or
    made by us) with nothing queued the bytes go to the socket at once.

    Twisted's write only queues: the send happens on the reactor's next turn,
    after two epoll_ctl calls (start and stop watching for writability). For
    a peer that sends one command and waits for its reply (POP3 RETR one by
    one, every SMTP round trip), that turn is most of our share of the round
    trip. What the kernel does not take now is queued as usual, behind
    nothing, so order is kept; with TLS, or anything already queued, it is a
    plain write. Relies on FileDescriptor's buffer attributes (Twisted is
    pinned in pyproject)."""
    if (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._tempDataBuffer
            and len(transport.dataBuffer) == transport.offset):
        try:
            sent = transport.socket.send(data)
        except OSError:     # EAGAIN, or an error the queued write will report
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class SerialCommands:
    """Mixin for line protocols (SMTP, POP3): one command at a time. A handler
    that returns a Deferred holds the input after it until the Deferred fires.
    Errors go to the protocol's `_reply_error` (its one place for turning
    errors into replies); then `_after_command` lets the protocol read on."""

    _busy = False                  # a command's Deferred is outstanding

    def _run(self, handler, *args) -> None:
        try:
            result = handler(*args)
        except Exception as error:
            self._reply_error(error)
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._reply_error)
            result.addBoth(self._command_done)

    def _command_done(self, _) -> None:
        self._busy = False
        self._after_command()

    def _reply_error(self, error) -> None:
        raise NotImplementedError

    def _after_command(self) -> None:
        raise NotImplementedError


class ConnectionLimits:
    """Open connections of one listener, in total and per client address.

    `exempt` networks (SMTP's trusted_networks, like Postfix's
    smtpd_client_event_limit_exceptions) count towards the total only."""

    def __init__(self, *, max_total: int, max_per_client: int, exempt=()):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.exempt = tuple(exempt)
        self.open_total = 0
        self.open_per_client: Counter = Counter()

    def _exempt(self, client_ip) -> bool:
        return any(client_ip in network for network in self.exempt if network.version == client_ip.version)

    def admit(self, client_ip) -> bool:
        """Count a new connection; False (and nothing counted) if over a limit."""
        if self.open_total >= self.max_total:
            return False
        if self.open_per_client[client_ip] >= self.max_per_client and not self._exempt(client_ip):
            return False
        self.open_total += 1
        self.open_per_client[client_ip] += 1
        return True

    def release(self, client_ip) -> None:
        self.open_total -= 1
        self.open_per_client[client_ip] -= 1
        if self.open_per_client[client_ip] <= 0:
            del self.open_per_client[client_ip]


class ListenerFactory(protocol.ServerFactory):
    """What every listener's factory holds (SMTP, POP3, IMAP): the config,
    its role, the portal, the clock, TLS and the connection counts. Each
    protocol's factory adds its own parts and says which protocol to build."""

    noisy = False       # the listener service logs what it listens on

    def __init__(self, *, config, listener, portal, clock, limits, tls_context=None,
                 implicit_tls: bool = False, exempt=()):
        self.config = config
        self.limits = limits
        self.listener = listener
        self.portal = portal
        self.clock = clock
        self.tls_context = tls_context          # for STARTTLS/STLS; None on implicit TLS
        self.implicit_tls = implicit_tls
        self.connections = ConnectionLimits(max_total=limits.max_connections,
                                            max_per_client=limits.max_connections_per_ip, exempt=exempt)
        self.sessions: set = set()          # admitted and not yet lost
        self._all_gone: list[defer.Deferred] = []

    def make_protocol(self):
        raise NotImplementedError

    def buildProtocol(self, addr):
        server = self.make_protocol()
        server.factory = self
        return server

    def admit(self, client_ip) -> bool:
        return self.connections.admit(client_ip)

    def release(self, client_ip) -> None:
        self.connections.release(client_ip)

    def session_started(self, session) -> None:
        self.sessions.add(session)

    def session_ended(self, session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            waiting, self._all_gone = self._all_gone, []
            for gone in waiting:
                gone.callback(None)

    def shutdown_sessions(self) -> defer.Deferred:
        """We are stopping: each session's `shut_down()` sends its protocol's
        notice (421, * BYE, -ERR) and closes; fires when all are gone."""
        gone = defer.Deferred()
        if not self.sessions:
            gone.callback(None)
            return gone
        self._all_gone.append(gone)
        for session in list(self.sessions):
            session.shut_down()
        return gone
