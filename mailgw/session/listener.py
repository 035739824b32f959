"""What every listener's factory shares (SMTP, POP3, IMAP): its config and
role, the portal, the clock, TLS, the connection limits and the sessions
that a shutdown must end."""
from __future__ import annotations

from collections import Counter

from twisted.internet import defer, protocol

from mailgw import metrics as metrics_module


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
                 implicit_tls: bool = False, exempt=(), metrics=None):
        self.config = config
        self.metrics = metrics_module.registry_or_default(metrics)     # its sessions count here
        self.limits = limits
        self.listener = listener
        self.portal = portal
        self.clock = clock
        self.tls_context = tls_context          # for STARTTLS/STLS; None on implicit TLS
        self.implicit_tls = implicit_tls
        self.connections_exempt = tuple(exempt)
        self.connections = ConnectionLimits(max_total=limits.max_connections,
                                            max_per_client=limits.max_connections_per_ip, exempt=exempt)
        self.sessions: set = set()          # admitted and not yet lost
        self._all_gone: list[defer.Deferred] = []

    def make_protocol(self):
        raise NotImplementedError

    def take_over(self, previous: "ListenerFactory") -> None:
        """A reload built this factory to replace `previous` on the same
        listener: the open connections keep counting against the limits
        (now this config's), and a shutdown ends the sessions `previous`
        started too. Those sessions keep `previous` as their factory."""
        self.connections = previous.connections
        self.connections.max_total = self.limits.max_connections
        self.connections.max_per_client = self.limits.max_connections_per_ip
        self.connections.exempt = self.connections_exempt
        self.sessions = previous.sessions
        self._all_gone = previous._all_gone

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
            # Emptied in place: a factory that took over (take_over) shares the list.
            waiting = list(self._all_gone)
            self._all_gone.clear()
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
