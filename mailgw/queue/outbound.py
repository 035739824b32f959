"""RelayTransport: one DeliveryRequest -> one AttemptResult (IRelayTransport).

Route for `request.domain`, first match wins:
  1. `config.queue.routes`: exact domain match -> that relay host;
  2. `config.queue.smarthost` -> that relay host;
  3. MX (mailgw.queue.mx) on `config.queue.mx_port` with TLS policy `config.queue.mx_tls`;
     an address literal domain ("[192.0.2.1]") goes straight to that address.

Hosts are tried in order, each of their addresses in order (at most
MAX_SESSIONS connections per attempt), until a session gives per-recipient
replies (mailgw.queue.client.SessionResult). A SessionFailure (connection
refused or lost, greeting 4xx/5xx, EHLO refused, TLS trouble, AUTH refused,
timeout before MAIL) moves on to the next address. Under `opportunistic` a
TLS failure is retried once on the same address without TLS (Twisted has no
such fallback, #10334). Under `required`/`implicit` a missing STARTTLS or a
bad certificate defers for that host and the next one is tried.

Connections are reused (Postfix's connection cache): after the final reply
to a message a connection waits `connection_cache_time` seconds in a
ConnectionCache for the next request to the same address, port, TLS policy
and credentials, and takes none once `connection_reuse_time` old. A reused
connection that fails before MAIL is answered (the peer closed it meanwhile)
costs nothing: the request goes out on a new connection.

Everything becomes RecipientResults: a failed attempt defers every
recipient with the last failure; DNS gives permanent answers for NXDOMAIN
(5.1.2) and Null MX (5.1.10). Texts never carry internals; those are logged.
"""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, error, threads
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.config_types import TLS_IMPLICIT, TLS_NONE, TLS_OPPORTUNISTIC, Config, RelayHost
from mailgw.interfaces import IRelayTransport
from mailgw.queue import mx
from mailgw.queue.client import (FAIL_CONNECT, FAIL_LOCAL, TLS_FAILED, OneShotFactory, OutboundSMTP,
                                 SessionFailure, SessionResult, client_tls_options, shown_reply)
from mailgw.queue.model import (STATUS_BOUNCED, STATUS_DEFERRED, STATUS_SENT, AttemptResult, DeliveryRequest,
                                RecipientResult)
from mailgw.smtp.codes import Reply

log = Logger()

MAX_SESSIONS = 10      # connections per attempt (Postfix: smtp_mx_address_limit 5 x session limit 2)

LOCAL_ERROR = Reply(0, "4.3.0", "Local error in processing")
UNREADABLE = Reply(0, "4.3.0", "Could not read the queued message")
NO_ADDRESS = Reply(0, "4.4.4", "No address for the mail exchanger")
# RFC 3463 X.4.4 "Unable to route": the domain has neither MX nor address records.
NO_ROUTE = Reply(0, "5.4.4", "No MX or address records for the domain")
BAD_LITERAL = Reply(0, "5.1.2", "Bad address literal")


def default_connect(reactor, timeout: float):
    """connect(host_or_ip, port, protocol_factory, tls_options_or_None) -> Deferred[protocol]
    over TCP (IPv4/IPv6 by the address, HostnameEndpoint for a name), wrapped in
    TLS from the first byte when `tls_options` is given (implicit TLS)."""
    def connect(host: str, port: int, factory, tls_options=None):
        ip = mx._ip(host)
        if ip is None:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        elif ":" in ip:
            endpoint = TCP6ClientEndpoint(reactor, ip, port, timeout=timeout)
        else:
            endpoint = TCP4ClientEndpoint(reactor, ip, port, timeout=timeout)
        if tls_options is not None:
            endpoint = wrapClientTLS(tls_options, endpoint)
        return endpoint.connect(factory)
    return connect


def _read_in_thread(reactor):
    def read(path: Path):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), Path(path).read_bytes)
    return read


def _status(reply: Reply) -> str:
    if 200 <= reply.code <= 299:
        return STATUS_SENT
    if 500 <= reply.code <= 599 or (reply.code == 0 and reply.enhanced.startswith("5")):
        return STATUS_BOUNCED
    return STATUS_DEFERRED


def _all(request: DeliveryRequest, reply: Reply, status: str | None = None, *, relay=None) -> AttemptResult:
    return AttemptResult(relay=relay, tls=None, dsn_relayed=False, results=tuple(
        RecipientResult(r.address, status or _status(reply), reply.code, reply.enhanced, reply.text)
        for r in request.recipients))


class ConnectionCache:
    """Idle outbound connections (OutboundSMTP in state idle) by next hop, at
    most `limit` in all; the most recently used is handed out first."""

    def __init__(self, *, idle_time: float, reuse_time: float, limit: int):
        self.idle_time = idle_time
        self.reuse_time = reuse_time
        self._limit = limit
        self._idle: dict[tuple, list[OutboundSMTP]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def take(self, key: tuple) -> OutboundSMTP | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        protocol = idle.pop()
        if not idle:
            del self._idle[key]
        self._count -= 1
        return protocol

    def keep(self, protocol: OutboundSMTP) -> bool:
        if self._count >= self._limit:
            return False
        self._idle.setdefault(protocol.cache_key, []).append(protocol)
        self._count += 1
        return True

    def forget(self, protocol: OutboundSMTP) -> None:
        idle = self._idle.get(protocol.cache_key)
        if idle and protocol in idle:
            idle.remove(protocol)
            self._count -= 1
            if not idle:
                del self._idle[protocol.cache_key]

    def close(self) -> defer.Deferred:
        """QUIT every idle connection; fires when all are closed."""
        protocols = [protocol for idle in self._idle.values() for protocol in idle]
        return defer.DeferredList([protocol.quit_idle() for protocol in protocols])


class _Target:
    """One next hop: a host name (or IP) with how to talk to it."""

    def __init__(self, host: str, port: int, policy: str, credentials=None, ca_file=None):
        self.host = host
        self.port = port
        self.policy = policy
        self.credentials = credentials
        self.ca_file = ca_file


@implementer(IRelayTransport)
class RelayTransport:
    def __init__(self, *, config: Config, reactor, resolver, connect=None, read_message=None,
                 random=None):
        if config.queue is None:
            raise ValueError("RelayTransport needs config.queue")
        self._config = config
        self._queue = config.queue
        self._reactor = reactor
        self._resolver = resolver
        self._connect = connect or default_connect(reactor, self._queue.connect_timeout)
        self._read_message = read_message or _read_in_thread(reactor)
        self._random = random
        self._routes = dict(self._queue.routes)
        self._cache = ConnectionCache(idle_time=self._queue.connection_cache_time,
                                      reuse_time=self._queue.connection_reuse_time,
                                      limit=self._queue.max_deliveries) \
            if self._queue.connection_cache_time > 0 else None

    def idle_connections(self) -> int:
        """Connections waiting in the cache for the next message."""
        return len(self._cache) if self._cache is not None else 0

    def close(self) -> defer.Deferred:
        """Close idle connections politely (at shutdown)."""
        return self._cache.close() if self._cache is not None else defer.succeed(None)

    def deliver(self, request: DeliveryRequest) -> defer.Deferred:
        d = defer.maybeDeferred(self._deliver, request)

        def unexpected(failure):
            log.failure("delivery of {queue_id} to {domain} failed unexpectedly", failure,
                        queue_id=request.queue_id, domain=request.domain)
            return _all(request, LOCAL_ERROR, STATUS_DEFERRED)
        return d.addErrback(unexpected)

    def destination(self, domain: str) -> str:
        """Recipients with the same destination share one transaction: their
        relay host when a route or the smarthost applies, else their domain (MX)."""
        host = self._route(domain)
        return f"[{host.host}]:{host.port}" if host is not None else domain.lower()

    def destination_class(self, domain: str) -> str:
        """For metrics: "route" ([[queue.routes]]), "smarthost" or "mx"."""
        if self._routes.get(domain.lower().rstrip(".")) is not None:
            return "route"
        return "smarthost" if self._queue.smarthost is not None else "mx"

    def _route(self, domain: str) -> RelayHost | None:
        return self._routes.get(domain.lower().rstrip(".")) or self._queue.smarthost

    @defer.inlineCallbacks
    def _deliver(self, request: DeliveryRequest):
        try:
            message = yield self._read_message(request.message_path)
        except Exception:
            log.failure("could not read {path} for {queue_id}", path=str(request.message_path),
                        queue_id=request.queue_id)
            return _all(request, UNREADABLE, STATUS_DEFERRED)

        relay_host = self._route(request.domain)
        implicit_mx = False
        if relay_host is not None:
            credentials = (relay_host.username, relay_host.password) if relay_host.username else None
            targets = [_Target(relay_host.host, relay_host.port, relay_host.tls, credentials, relay_host.ca_file)]
        else:
            try:
                literal = mx.address_literal(request.domain)
            except ValueError:
                return _all(request, BAD_LITERAL)
            if literal is not None:
                names = [literal]
            else:
                try:
                    kwargs = {"random": self._random} if self._random is not None else {}
                    names = yield mx.resolve_mx(self._resolver, request.domain, **kwargs)
                except mx.DNSFailure as failure:
                    log.info("{queue_id}: {domain}: {text}", queue_id=request.queue_id, domain=request.domain,
                             text=failure.text)
                    return _all(request, Reply(0, failure.enhanced, failure.text),
                                STATUS_BOUNCED if failure.permanent else STATUS_DEFERRED)
                implicit_mx = names == [request.domain.lower().rstrip(".")]
            targets = [_Target(name, self._queue.mx_port, self._queue.mx_tls) for name in names]

        last: Reply | None = None
        last_relay: str | None = None
        sessions = 0
        dns_trouble = False
        for target in targets:
            try:
                addresses = yield mx.resolve_addresses(self._resolver, target.host)
            except mx.DNSFailure as failure:
                dns_trouble = True
                last = Reply(0, failure.enhanced, failure.text)
                continue
            if not addresses:
                last = NO_ADDRESS._replace(text=f"No address for {target.host}")
                continue
            for ip in addresses:
                if sessions >= MAX_SESSIONS:
                    break
                sessions += 1
                relay = f"{target.host}[{ip}]:{target.port}"
                outcome = yield self._session(request, message, target, ip, target.policy)
                if isinstance(outcome, SessionFailure) and outcome.tls_failed \
                        and target.policy == TLS_OPPORTUNISTIC:
                    # Opportunistic TLS failed: once more in plaintext, same address.
                    log.info("{queue_id}: TLS with {relay} failed, retrying without TLS",
                             queue_id=request.queue_id, relay=relay)
                    outcome = yield self._session(request, message, target, ip, TLS_NONE)
                if isinstance(outcome, SessionResult):
                    return self._result(request, outcome, relay)
                log.info("{queue_id}: {relay}: {kind}: {reply}", queue_id=request.queue_id,
                         relay=relay, kind=outcome.kind, reply=shown_reply(outcome.reply),
                         code=outcome.reply.code, enhanced=outcome.reply.enhanced, text=outcome.reply.text)
                last = outcome.reply
                if outcome.answered:
                    last_relay = relay
        if last is None:
            last = NO_ADDRESS
        if sessions == 0 and implicit_mx and not dns_trouble:
            # RFC 5321 §5.1: no MX and the implicit MX has no address: no route at all.
            return _all(request, NO_ROUTE, STATUS_BOUNCED)
        return _all(request, last.as_temporary(), STATUS_DEFERRED, relay=last_relay)

    def _session(self, request: DeliveryRequest, message: bytes, target: _Target, ip: str, policy: str):
        """Deferred[SessionResult | SessionFailure]: a transaction on an idle
        connection to `ip` if there is one, else on a new connection."""
        key = (ip, target.port, policy, target.host, target.credentials, target.ca_file)
        cached = self._cache.take(key) if self._cache is not None else None
        if cached is None:
            return self._new_session(request, message, target, ip, policy, key)

        def failed(failure):
            if failure.check(SessionFailure):
                log.debug("{queue_id}: reused connection to {ip} failed ({kind}); a new one",
                          queue_id=request.queue_id, ip=ip, kind=failure.value.kind)
                return self._new_session(request, message, target, ip, policy, key)
            log.failure("session with {ip}:{port}", failure, ip=ip, port=target.port)
            return SessionFailure(FAIL_LOCAL, LOCAL_ERROR)
        return cached.reuse(request, message).addErrback(failed)

    def _new_session(self, request: DeliveryRequest, message: bytes, target: _Target, ip: str, policy: str,
                     key: tuple):
        """Deferred[SessionResult | SessionFailure]: one new connection to `ip`."""
        queue = self._queue
        try:
            tls_options = client_tls_options(policy, target.host, target.ca_file)
        except Exception:
            log.failure("TLS client options for {host}", host=target.host)
            return defer.succeed(SessionFailure(FAIL_LOCAL, TLS_FAILED._replace(
                text="TLS required but the client TLS configuration is unusable")))
        protocol = OutboundSMTP(
            request=request, message=message, hostname=self._config.hostname, clock=self._reactor,
            reply_timeout=queue.reply_timeout, data_timeout=queue.data_timeout, tls_policy=policy,
            tls_options=tls_options, credentials=target.credentials, cache=self._cache, cache_key=key)
        try:
            d = self._connect(ip, target.port, OneShotFactory(protocol),
                              tls_options if policy == TLS_IMPLICIT else None)
        except Exception as exc:
            d = defer.fail(exc)

        def connected(_):
            return protocol.result

        def not_connected(failure):
            if failure.check(error.ConnectionRefusedError):
                text = "Connection refused"
            elif failure.check(error.TimeoutError, defer.TimeoutError, TimeoutError):
                text = "Connection timed out"
            else:
                text = "Could not connect"
                log.info("connecting to {ip}:{port} failed: {why}", ip=ip, port=target.port,
                         why=failure.getErrorMessage())
            return SessionFailure(FAIL_CONNECT, Reply(0, "4.4.1", f"{text} by {target.host}"))

        def session_failed(failure):
            if failure.check(SessionFailure):
                return failure.value
            log.failure("session with {ip}:{port}", failure, ip=ip, port=target.port)
            return SessionFailure(FAIL_LOCAL, LOCAL_ERROR)

        d.addCallbacks(connected, not_connected)
        d.addErrback(session_failed)
        return d

    def _result(self, request: DeliveryRequest, outcome: SessionResult, relay: str) -> AttemptResult:
        results = tuple(RecipientResult(r.address, _status(reply), reply.code, reply.enhanced, reply.text)
                        for r, reply in zip(request.recipients, outcome.replies))
        return AttemptResult(relay=relay, tls=outcome.tls, dsn_relayed=outcome.dsn, results=results)

