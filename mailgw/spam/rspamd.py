"""rspamd over its HTTP protocol (https://rspamd.com/doc/developers/protocol.html).

`RspamdClient.check` posts one message to the normal worker's /checkv2 with
the envelope as request headers (From, Rcpt, IP, Helo, Hostname, User,
Queue-Id) and our own SPF, DKIM and DMARC results in the JSON request
headers that rspamd's http_headers plugin reads (SPF, DKIM, DMARC): rspamd
then scores our verdicts instead of asking the DNS a second time.
`learn` posts to the controller's /learnspam or /learnham.

Twisted's Agent on the injected reactor, over a pool of kept-alive
connections; every failure (refused, timeout, HTTP error, a body that is not
rspamd's JSON) is one `RspamdUnavailable`, and the caller decides what that
means ([spam] on_failure).
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from twisted.internet import defer, endpoints, protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import (Agent, PotentialDataLoss, RequestTransmissionFailed,
                                ResponseDone, ResponseNeverReceived)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from mailgw import metrics as metrics_module
from mailgw.twisted_wall import quiet_http_pool

# rspamd's actions, strongest first (rspamd's metric actions).
REJECT = "reject"
SOFT_REJECT = "soft reject"
GREYLIST = "greylist"
ADD_HEADER = "add header"
REWRITE_SUBJECT = "rewrite subject"
NO_ACTION = "no action"
ACTIONS = (REJECT, SOFT_REJECT, GREYLIST, ADD_HEADER, REWRITE_SUBJECT, NO_ACTION)
SPAM_ACTIONS = (ADD_HEADER, REWRITE_SUBJECT)     # delivered, to the Junk folder

# A response is a few KiB of symbols; more is not rspamd.
MAX_RESPONSE = 1024 * 1024
# An SMTP reply text from rspamd (force_actions' message) is used only when it is this tame.
_MAX_REPLY_TEXT = 200


class RspamdUnavailable(Exception):
    """rspamd did not give a usable answer (the text says why, for the log)."""


@dataclass(frozen=True)
class Scan:
    """What rspamd made of a message."""
    action: str
    score: float
    required_score: float
    symbols: tuple[tuple[str, float], ...]     # (name, score), highest score first
    subject: str | None = None                 # the rewritten Subject: ("rewrite subject")
    reply_text: str | None = None              # rspamd's own SMTP reply text, when it gave a tame one
    skipped: bool = False                      # rspamd skipped the message (settings): no action

    @property
    def is_spam(self) -> bool:
        return self.action in SPAM_ACTIONS


@dataclass(frozen=True)
class ScanEnvelope:
    """The SMTP facts rspamd is told with the message."""
    sender: str                     # MAIL FROM, "" for <>
    recipients: tuple[str, ...]
    client_ip: str
    helo: str | None = None
    client_name: str | None = None  # forward-confirmed reverse DNS, or None
    user: str | None = None         # the authenticated user
    queue_id: str | None = None
    spf: str | None = None          # our results (mailgw.mailauth), None: not checked
    dkim: tuple[tuple[str, str], ...] | None = None     # (result, domain) per signature
    dmarc: str | None = None


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Where the Agent connects. An IP literal (the usual rspamd_url,
    http://127.0.0.1:11333) is connected to directly: Agent's default, a
    HostnameEndpoint, would resolve even a literal with getaddrinfo in the
    reactor's thread pool, for every scan, since rspamd closes each connection
    after its answer. Names go through HostnameEndpoint as usual."""

    def __init__(self, reactor, timeout: float):
        self.reactor = reactor
        self.timeout = timeout

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            endpoint = endpoints.HostnameEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        else:
            kind = endpoints.TCP4ClientEndpoint if address.version == 4 else endpoints.TCP6ClientEndpoint
            endpoint = kind(self.reactor, str(address), uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(host.strip("[]")), endpoint)
        return endpoint


@implementer(IBodyProducer)
class _Bytes:
    """The message as one write: no cooperator, no global reactor."""

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body) if body else UNKNOWN_LENGTH

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


# Our result words -> what rspamd's http_headers plugin understands.
_SPF_WORDS = {"pass": "pass", "fail": "fail", "softfail": "softfail", "neutral": "neutral",
              "none": "na", "permerror": "permfail"}
_DKIM_WORDS = {"pass": "pass", "fail": "fail", "temperror": "tempfail", "permerror": "permfail",
               "neutral": "permfail", "policy": "fail"}
_DMARC_WORDS = {"pass": "pass", "fail": "fail", "none": "na", "temperror": "tempfail",
                "permerror": "permfail"}


def _header_text(value: str) -> bytes:
    # Request header values: no line ends can come from SMTP, but never trust that here.
    return value.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def request_headers(envelope: ScanEnvelope, *, hostname: str, password: str = "") -> Headers:
    """rspamd's request headers for `envelope` (its protocol page, "Rspamd HTTP request")."""
    headers = Headers()
    put = headers.setRawHeaders
    put(b"From", [_header_text(envelope.sender or "<>")])
    if envelope.recipients:
        put(b"Rcpt", [_header_text(r) for r in envelope.recipients])
    put(b"IP", [_header_text(envelope.client_ip)])
    if envelope.helo:
        put(b"Helo", [_header_text(envelope.helo)])
    # rspamd reads "unknown" as "no verified reverse DNS" (its HFILTER rules).
    put(b"Hostname", [_header_text(envelope.client_name or "unknown")])
    if envelope.user:
        put(b"User", [_header_text(envelope.user)])
    if envelope.queue_id:
        put(b"Queue-Id", [_header_text(envelope.queue_id)])
    put(b"MTA-Name", [_header_text(hostname)])
    # With rspamd's http_headers module enabled, these replace rspamd's own
    # SPF/DKIM/DMARC checks; a temperror has no word there and is left out
    # (no symbol). With the module off (rspamd's default) they are ignored.
    if envelope.spf in _SPF_WORDS:
        put(b"SPF", [json.dumps({"result": _SPF_WORDS[envelope.spf]}).encode()])
    if envelope.dkim is not None:
        results = [{"result": _DKIM_WORDS[result], "domain": domain or "unknown"}
                   for result, domain in envelope.dkim if result in _DKIM_WORDS]
        if results or not envelope.dkim:
            put(b"DKIM", [json.dumps({"results": results} if results else {"result": "na"}).encode()])
    if envelope.dmarc in _DMARC_WORDS:
        put(b"DMARC", [json.dumps({"result": _DMARC_WORDS[envelope.dmarc]}).encode()])
    if password:
        put(b"Password", [_header_text(password)])
    return headers


def parse_scan(body: bytes) -> Scan:
    """A /checkv2 response body; RspamdUnavailable when it is not one."""
    try:
        reply = json.loads(body)
    except ValueError as error:
        raise RspamdUnavailable(f"not JSON ({error})") from None
    if not isinstance(reply, dict):
        raise RspamdUnavailable("not a JSON object")
    if reply.get("is_skipped") is True and "action" not in reply:
        return Scan(NO_ACTION, 0.0, 0.0, (), skipped=True)
    action = reply.get("action")
    if action not in ACTIONS:
        raise RspamdUnavailable(f"unknown action {str(action)[:40]!r}")
    try:
        score = float(reply.get("score", 0.0))
        required = float(reply.get("required_score", 0.0))
    except (TypeError, ValueError):
        raise RspamdUnavailable("score is not a number") from None
    symbols = []
    raw_symbols = reply.get("symbols")
    if isinstance(raw_symbols, dict):
        for name, detail in raw_symbols.items():
            value = detail.get("score", 0.0) if isinstance(detail, dict) else 0.0
            if isinstance(name, str) and isinstance(value, (int, float)):
                symbols.append((name, float(value)))
    symbols.sort(key=lambda item: (-item[1], item[0]))
    subject = reply.get("subject") if isinstance(reply.get("subject"), str) else None
    messages = reply.get("messages")
    text = messages.get("smtp_message") if isinstance(messages, dict) else None
    if not (isinstance(text, str) and text.isascii() and text.isprintable() and 0 < len(text) <= _MAX_REPLY_TEXT):
        text = None
    return Scan(action, score, required, tuple(symbols), subject=subject, reply_text=text,
                skipped=reply.get("is_skipped") is True)


class RspamdClient:
    """One per process: `check` against the normal worker, `learn` against
    the controller. `reactor` is the injected reactor (clock and TCP)."""

    def __init__(self, *, reactor, url: str, controller_url: str = "", password: str = "",
                 timeout: float = 15.0, hostname: str = "localhost", agent=None, max_connections: int = 64,
                 clock=None, metrics=None):
        self.reactor = reactor
        # mailgw_rspamd_scan_seconds; the plain counters below are read as a metrics source.
        self.metrics = metrics_module.registry_or_default(metrics)
        self.clock = clock or reactor           # the timeouts' clock (tests pass a task.Clock)
        self.url = url.rstrip("/")
        self.controller_url = controller_url.rstrip("/")
        self.password = password
        self.timeout = timeout
        self.hostname = hostname
        if agent is None:
            # One kept-alive connection per concurrent scan where the server
            # keeps connections (rspamd 3.4 closes each after its answer).
            pool = quiet_http_pool(reactor, max_per_host=max_connections)
            agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, timeout), pool=pool)
            self._pool = pool
        else:
            self._pool = None
        self.agent = agent
        # For metrics and tests.
        self.scans = 0
        self.failures = 0
        self.learns = 0

    # -- scanning ---------------------------------------------------------
    def check(self, message: bytes, envelope: ScanEnvelope) -> defer.Deferred:
        """Deferred[Scan]; fails with RspamdUnavailable."""
        self.scans += 1
        started = self.clock.seconds()
        headers = request_headers(envelope, hostname=self.hostname)
        d = self._post(self.url + "/checkv2", headers, message)
        d.addCallback(lambda result: parse_scan(result[1]))
        d.addErrback(self._failed)

        def timed(result):
            self.metrics.observe(metrics_module.RSPAMD_SCAN_SECONDS, self.clock.seconds() - started)
            return result
        return d.addBoth(timed)

    # -- learning ---------------------------------------------------------
    def learn(self, kind: str, message: bytes, *, user: str | None = None) -> defer.Deferred:
        """Deferred[str]: "learned" or "known" (rspamd had learned it already);
        fails with RspamdUnavailable. `kind` is "spam" or "ham"."""
        if kind not in ("spam", "ham"):
            raise ValueError(f"learn what? {kind!r}")
        if not self.controller_url:
            return defer.fail(RspamdUnavailable("no controller_url configured"))
        headers = Headers()
        if self.password:
            headers.setRawHeaders(b"Password", [_header_text(self.password)])
        if user:
            # Per-user statistics (rspamd's per_user) key on Deliver-To.
            headers.setRawHeaders(b"Deliver-To", [_header_text(user)])
        self.learns += 1
        # rspamd 3.4 answers a message it has learned already with 404 and
        # "... has been already learned as spam, ignore it" (208 in other versions).
        d = self._post(self.controller_url + "/learn" + kind, headers, message, accept=(200, 208, 404))

        def answered(result):
            code, body = result
            if code == 208:
                return "known"
            try:
                reply = json.loads(body)
            except ValueError:
                raise RspamdUnavailable("learn: not JSON") from None
            if isinstance(reply, dict) and reply.get("success") is True:
                return "learned"
            error = reply.get("error") if isinstance(reply, dict) else None
            if isinstance(error, str) and "already learned" in error:
                return "known"
            raise RspamdUnavailable(f"learn refused: {str(error)[:120]}")
        d.addCallback(answered)
        d.addErrback(self._failed)
        return d

    # -- probes (mailgw doctor) -------------------------------------------
    def ping(self, url: str | None = None) -> defer.Deferred:
        """Deferred[str] of GET /ping ("pong" when rspamd is up)."""
        d = self._request(b"GET", (url or self.url) + "/ping", Headers(), None)
        d.addCallback(lambda result: result[1].decode("utf-8", "replace").strip())
        return d.addErrback(self._failed)

    def stat(self) -> defer.Deferred:
        """Deferred[dict] of the controller's GET /stat."""
        headers = Headers()
        if self.password:
            headers.setRawHeaders(b"Password", [_header_text(self.password)])
        d = self._request(b"GET", self.controller_url + "/stat", headers, None)
        d.addCallback(lambda result: json.loads(result[1]))
        return d.addErrback(self._failed)

    def close(self) -> defer.Deferred:
        """Close the kept-alive connections (at shutdown, and in tests)."""
        return self._pool.closeCachedConnections() if self._pool is not None else defer.succeed(None)

    # -- HTTP -------------------------------------------------------------
    def _post(self, url: str, headers: Headers, body: bytes, accept=(200,)) -> defer.Deferred:
        d = self._send(b"POST", url, headers, body, accept)

        def retry(failure):
            # A kept-alive connection that rspamd closed meanwhile fails before
            # the request was read: once more, on a new connection. (Not when
            # the timeout cancelled it.)
            failure.trap(ResponseNeverReceived, RequestTransmissionFailed)
            if any(reason.check(defer.CancelledError) for reason in failure.value.reasons):
                return failure
            return self._send(b"POST", url, headers, body, accept)
        return d.addErrback(retry).addTimeout(self.timeout, self.clock)

    def _request(self, method: bytes, url: str, headers: Headers, body: bytes | None, accept=(200,)):
        return self._send(method, url, headers, body, accept).addTimeout(self.timeout, self.clock)

    def _send(self, method: bytes, url: str, headers: Headers, body: bytes | None, accept=(200,)):
        producer = _Bytes(body) if body is not None else None
        d = self.agent.request(method, url.encode("ascii"), headers, producer)

        def got(response):
            if response.length is not UNKNOWN_LENGTH and response.length > MAX_RESPONSE:
                ignored = defer.Deferred().addErrback(lambda _: None)
                response.deliverBody(_Collect(ignored, 0))
                raise RspamdUnavailable(f"response of {response.length} bytes")
            collect = _Collect(defer.Deferred(_stop_reading), MAX_RESPONSE)
            response.deliverBody(collect)
            return collect.finished.addCallback(lambda data: (response.code, data))

        def checked(result):
            code, data = result
            if code not in accept:
                raise RspamdUnavailable(f"HTTP {code}: {data[:120].decode('utf-8', 'replace')}")
            return result
        return d.addCallback(got).addCallback(checked)

    def _failed(self, failure):
        self.failures += 1
        if failure.check(RspamdUnavailable):
            return failure
        reasons = getattr(failure.value, "reasons", None) or [failure]      # the client's wrapped failures
        if failure.check(defer.TimeoutError, defer.CancelledError) or \
                any(reason.check(defer.CancelledError) for reason in reasons):
            raise RspamdUnavailable(f"no answer within {self.timeout:g} s")
        why = "; ".join(reason.getErrorMessage() or reason.type.__name__ for reason in reasons)
        raise RspamdUnavailable(why)


def _stop_reading(d: defer.Deferred) -> None:
    transport = getattr(d, "transport", None)
    if transport is not None:
        transport.stopProducing()


class _Collect(protocol.Protocol):
    """A response body, at most `limit` bytes (more: the connection is dropped)."""

    def __init__(self, finished: defer.Deferred, limit: int):
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def connectionMade(self):
        self.finished.transport = self.transport     # for a cancel (timeout) to stop reading
        if self.limit <= 0:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes):
        self.size += len(data)
        if self.size > self.limit:
            self.parts = []
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason):
        if self.finished.called:
            return
        if self.size > self.limit:
            self.finished.errback(RspamdUnavailable(f"response over {self.limit} bytes"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)
