"""The outbound SMTP client: one connection, one transaction, per-recipient replies.

Our own, not Twisted's SMTPClient/ESMTPSender (docs/twisted.md §0.1, §2.1):
theirs dot-stuffs per 16 KiB chunk (a "." line at a chunk boundary or at
offset 0 is not stuffed: SMTP smuggling), believes plaintext replies injected
after the STARTTLS 220, QUITs on a TLS failure without a plaintext retry
(#10334), tries CRAM-MD5 first (#5803), and waits forever by default.

What this protocol does, as an explicit state machine driven by replies:

    greeting -> EHLO (HELO on 5xx) -> [STARTTLS -> EHLO] -> [AUTH] ->
    MAIL -> RCPT... -> [DATA -> body -> final reply] -> QUIT
                                                     -> idle -> MAIL ... (reuse)

Every command registers the handler of its reply in a FIFO (`_pending`), so
PIPELINING (RFC 2920: MAIL, every RCPT and DATA in one write) and lock-step
use the same code. Time comes from an injected clock: `reply_timeout` per reply,
`data_timeout` from the end of the DATA payload to its final reply.

The outcome is one of
- `SessionResult`: the transaction got as far as a reply to MAIL (or was
  refused locally before MAIL: SIZE, 8BITMIME, SMTPUTF8); one `Reply` per
  recipient of the request, in order;
- `SessionFailure`: nothing recipient-specific happened (connection lost,
  greeting 4xx/5xx, EHLO refused, TLS trouble, AUTH refused, timeout before
  MAIL was answered): the caller may try the next host.

`result` fires once the connection is closed (QUIT is not waited for long),
so a caller that counts deliveries also counts open connections; except when
the protocol has a connection `cache` and the transaction ended with the
final reply to the message: then it goes idle, registers itself with the
cache (which bounds how many idle connections there are) and `result` fires
at once. `reuse(request, message)` starts the next transaction on it; the
idle timer, a reply out of turn or the peer closing ends it (QUIT) and takes
it out of the cache.
"""
from __future__ import annotations

import base64
import ipaddress
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import idna
from OpenSSL import SSL
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config_types import TLS_IMPLICIT, TLS_NONE, TLS_OPPORTUNISTIC, TLS_REQUIRED
from mailgw.twisted_wall import send_now
from mailgw.queue.model import DeliveryRequest
from mailgw.smtp import extensions as ext
from mailgw.smtp.codes import Reply
from mailgw.smtp.data import canonical_line_ends, dot_stuff
from mailgw.smtp.xtext import encode_orcpt, encode_xtext

log = Logger()

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF. Real
# servers overshoot a little, so we tolerate up to MAX_REPLY_LINE; anything
# longer (or a line that never ends) fails the connection.
MAX_REPLY_LINE = 2048
# A multi-line reply that never ends ("250-" forever) is cut off here; EHLO
# answers have ~20 lines.
MAX_REPLY_LINES = 100
MAX_REPLY_TEXT = 1000          # characters of remote text kept in a result
QUIT_TIMEOUT = 10.0            # seconds we wait for 221 (also bounded by reply_timeout)
CLOSE_GRACE = 5.0              # seconds for a polite close before we abort the connection

# Why a session failed before any recipient-specific reply (SessionFailure.kind).
FAIL_CONNECT = "connect"              # could not connect (set by the caller, mailgw.queue.outbound)
FAIL_GREETING = "greeting"            # greeting was not 220
FAIL_HELO = "helo"                    # EHLO and HELO refused
FAIL_TLS = "tls"                      # STARTTLS/implicit TLS handshake or certificate failed
FAIL_TLS_REQUIRED = "tls-required"    # policy needs TLS and the server does not offer/allow it
FAIL_AUTH = "auth"                    # AUTH refused, or no way to authenticate safely
FAIL_LOST = "lost"                    # connection lost before MAIL was answered
FAIL_TIMEOUT = "timeout"              # a reply did not come in time before MAIL was answered
FAIL_PROTOCOL = "protocol"            # malformed, overlong or unexpected reply before MAIL was answered
FAIL_LOCAL = "local"                  # our own trouble (bad TLS configuration, a bug)

# Our own verdicts (code 0: no remote reply said so).
TIMEOUT = Reply(0, "4.4.2", "Timeout waiting for a reply from the remote server")
CONNECTION_LOST = Reply(0, "4.4.2", "Connection lost")
PROTOCOL_ERROR = Reply(0, "4.5.0", "Protocol error: malformed or unexpected reply from the remote server")
# RFC 3463 X.7.4 "Security features not supported"; X.7.5 "Cryptographic failure".
TLS_NOT_OFFERED = Reply(0, "4.7.4", "TLS required but not available: the server does not offer STARTTLS")
TLS_FAILED = Reply(0, "4.7.5", "TLS negotiation or certificate verification failed")
NO_CLEARTEXT_AUTH = Reply(0, "4.7.0", "Credentials configured, but not sending them without verified TLS")
NO_AUTH_MECHANISM = Reply(0, "4.7.0", "The server offers no authentication mechanism we use (PLAIN, LOGIN)")
# RFC 1870 §6.2 / RFC 3463 5.3.4; RFC 6152 §3 / 5.6.3; RFC 6531 §3.5 / 5.6.7.
NO_8BITMIME = Reply(0, "5.6.3", "8BITMIME not supported by next hop")
NO_SMTPUTF8 = Reply(0, "5.6.7", "SMTPUTF8 not supported by next hop")
BAD_SENDER = Reply(0, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(0, "5.1.3", "Bad recipient address syntax")


@dataclass(frozen=True)
class SessionResult:
    """A transaction that produced per-recipient answers."""
    replies: tuple[Reply, ...]    # one per request recipient, same order; code 0 = our own verdict
    tls: str | None               # e.g. "TLSv1.3" when the transaction ran over TLS
    dsn: bool                     # the server advertised DSN (RFC 3461), so our parameters went along
    greeting_name: str            # first word of the server's 220 greeting


def shown_reply(reply: Reply) -> str:
    """A reply for a log line: code 0 means no server said it (our own verdict),
    so only the enhanced code and the text are shown."""
    return f"{reply.code} {reply.enhanced} {reply.text}" if reply.code else f"{reply.enhanced} {reply.text}"


class SessionFailure(Exception):
    """Nothing recipient-specific happened; try the next host (or defer)."""

    def __init__(self, kind: str, reply: Reply, *, greeting_name: str = "", answered: bool = False):
        super().__init__(f"{kind}: {shown_reply(reply)}")
        self.kind = kind
        self.reply = reply                # code 0 when no remote reply said so
        self.greeting_name = greeting_name
        self.answered = answered          # the server sent a greeting

    @property
    def tls_failed(self) -> bool:
        return self.kind == FAIL_TLS


# --- TLS client options ------------------------------------------------------

@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedClientTLS:
    """Opportunistic STARTTLS: encrypt, send SNI, do not verify the certificate.

    Without a policy (MTA-STS, DANE) an MX certificate cannot be checked
    meaningfully (RFC 7435 opportunistic security), and verifying would
    fail hard on self-signed MX hosts (docs/twisted.md §2.1)."""

    def __init__(self, hostname: str):
        self._options = ssl.CertificateOptions(verify=False)
        self._server_name: bytes | None = None
        try:
            ipaddress.ip_address(hostname)
        except ValueError:
            try:
                self._server_name = idna.encode(hostname.rstrip("."))
            except idna.IDNAError:
                self._server_name = None

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def client_tls_options(policy: str, hostname: str, ca_file: Path | None = None):
    """TLS client options for `policy` towards `hostname` (None for TLS_NONE).

    required/implicit: `ssl.optionsForClientTLS` (service_identity check of
    the host name, platform trust or the CAs in `ca_file`). Reads `ca_file`
    (small; the caller may cache the options)."""
    if policy == TLS_NONE:
        return None
    if policy == TLS_OPPORTUNISTIC:
        return UnverifiedClientTLS(hostname)
    if policy not in (TLS_REQUIRED, TLS_IMPLICIT):
        raise ValueError(f"unknown TLS policy {policy!r}")
    trust = None                     # None: the platform's trust store
    if ca_file is not None:
        pems = _PEM_CERT.findall(Path(ca_file).read_bytes())
        if not pems:
            raise ValueError(f"{ca_file}: no PEM certificate found")
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])
    return ssl.optionsForClientTLS(hostname.rstrip("."), trustRoot=trust)


# --- replies and commands (xtext, EHLO keywords, dot-stuffing: mailgw.smtp) ------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.S)
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?:\s+|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")


def _clean(raw: bytes) -> str:
    return _CONTROL.sub("?", raw.decode("utf-8", "replace")).strip()


def _tls_version(transport) -> str:
    try:
        name = transport.getHandle().get_protocol_version_name()
    except Exception:                  # not an OpenSSL transport (tests) or no handshake yet
        return "TLS"
    return name if isinstance(name, str) and name and name != "unknown" else "TLS"


# --- the protocol -----------------------------------------------------------------

class OutboundSMTP(Protocol):
    """One outbound SMTP session for one DeliveryRequest.

    `tls_policy`: TLS_NONE, TLS_OPPORTUNISTIC, TLS_REQUIRED or TLS_IMPLICIT
    (the caller has wrapped the transport in TLS already). `tls_options`: an
    IOpenSSLClientConnectionCreator (client_tls_options) for STARTTLS;
    needed for opportunistic and required. `credentials`: (username, password)
    or None; sent only over TLS verified by policy required/implicit.
    """

    def __init__(self, *, request: DeliveryRequest, message: bytes, hostname: str, clock,
                 reply_timeout: float, data_timeout: float, tls_policy: str = TLS_NONE,
                 tls_options=None, credentials: tuple[str, str] | None = None,
                 cache=None, cache_key=None):
        if tls_policy in (TLS_OPPORTUNISTIC, TLS_REQUIRED) and tls_options is None:
            raise ValueError(f"TLS policy {tls_policy!r} needs tls_options")
        self.greeting_name = ""
        self.extensions: dict[str, tuple[str, ...]] = {}
        self.discarded = b""             # plaintext that followed the STARTTLS 220 (dropped)
        self.closed: defer.Deferred = defer.Deferred()    # fires when the connection is gone
        self.cache_key = cache_key
        self.transactions = 1            # on this connection, counting the current one
        self._cache = cache
        self._connected_at: float | None = None
        self._hostname = hostname
        self._clock = clock
        self._reply_timeout = reply_timeout
        self._data_timeout = data_timeout
        self._policy = tls_policy
        self._tls_options = tls_options
        self._credentials = credentials

        self._state = "connecting"
        self._buffer = b""
        self._lines: list[str] = []
        self._code = 0
        self._pending: deque[tuple[str, Callable[[int, list[str]], None]]] = deque()
        self._timer = None
        self._discard_input = False
        self._tls = tls_policy == TLS_IMPLICIT
        self._tls_version: str | None = None
        self._in_handshake = False
        self._starttls_tried = False
        self._authenticated = False
        self._greeted = False
        self._closing = False
        self._begin(request, message)

    def _begin(self, request: DeliveryRequest, message: bytes):
        """Per-transaction state: everything a reused connection starts afresh."""
        self.request = request
        self.result: defer.Deferred = defer.Deferred()
        self._message = canonical_line_ends(message)
        self._has_8bit: bool | None = None
        self._pipelined = False
        self._mail_answered = False
        self._mail_reply: Reply | None = None
        self._data_reply: Reply | None = None
        self._final_reply = False        # the message's final reply came: the transaction is over
        n = len(request.recipients)
        self._local: list[Reply | None] = [None] * n      # refused by us before RCPT
        self._rcpt: list[Reply | None] = [None] * n
        self._outcome: SessionResult | SessionFailure | None = None
        self._fired = False

    # --- connection events

    def connectionMade(self):
        self._connected_at = self._clock.seconds()
        self._state = "greeting"
        self._expect(self._on_greeting)

    def reuse(self, request: DeliveryRequest, message: bytes) -> defer.Deferred:
        """The next transaction on this idle connection; Deferred like `result`.
        A SessionFailure means nothing reached the peer's transaction state:
        the caller can send the same request on a new connection."""
        if self._state != "idle":
            raise RuntimeError(f"reuse of a connection in state {self._state!r}")
        self._cancel_timer()
        self._begin(request, message)
        self.transactions += 1
        self._start_transaction()
        return self.result

    def quit_idle(self) -> defer.Deferred:
        """Close an idle connection politely (QUIT); fires when it is closed."""
        if self._state == "idle":
            self._cancel_timer()
            self._idle_expired()
        return self.closed

    def dataReceived(self, data: bytes):
        if self._closing:
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for index, raw in enumerate(lines):
            if len(raw) + 1 > MAX_REPLY_LINE:
                return self._protocol_error("reply line too long")
            self._reply_line(raw[:-1] if raw.endswith(b"\r") else raw)
            if self._closing:
                return
            if self._discard_input:
                # RFC 3207 §4.2 / CVE-2011-0411 mirrored: whatever followed the
                # 220 to STARTTLS arrived in plaintext and must not be taken as
                # a reply inside TLS.
                self._discard_input = False
                self.discarded = b"\n".join(lines[index + 1:] + [self._buffer]) if index + 1 < len(lines) \
                    else self._buffer
                self._buffer = b""
                if self.discarded:
                    log.warn("discarded {n} octets of plaintext sent after the STARTTLS 220 by {peer}",
                             n=len(self.discarded), peer=self.greeting_name)
                return
        if len(self._buffer) + 1 > MAX_REPLY_LINE:
            self._protocol_error("reply line too long")

    def connectionLost(self, reason: Failure = None):
        self._cancel_timer()
        self._closing = True
        if self._cache is not None:
            self._cache.forget(self)
        if self._fired:                  # idle, or QUIT after an idle period: nobody waits for a result
            self.closed.callback(None)
            return
        if self._outcome is None:
            tls_error = reason is not None and reason.check(SSL.Error) is not None
            if tls_error or self._tls_phase():
                if reason is not None:
                    log.info("TLS with {peer} failed: {why}", peer=self.greeting_name or "server",
                             why=reason.getErrorMessage())
                self._outcome = self._failure(FAIL_TLS, TLS_FAILED)
            else:
                self._outcome = self._failure(
                    FAIL_LOST, CONNECTION_LOST._replace(text=f"Connection lost {self._during()}"))
        self._fire()
        self.closed.callback(None)

    # --- reply framing

    def _reply_line(self, raw: bytes):
        match = _REPLY_LINE.fullmatch(raw)
        if not match:
            return self._protocol_error("malformed reply line")
        code = int(match.group(1))
        if self._lines and code != self._code:
            return self._protocol_error("reply code changed inside a multi-line reply")
        self._code = code
        self._lines.append(_clean(match.group(3) or b""))
        if len(self._lines) > MAX_REPLY_LINES:
            return self._protocol_error("multi-line reply too long")
        if match.group(2) == b"-":
            return
        lines, self._lines = self._lines, []
        if not self._pending and self._state == "idle":
            # Typically "421 timeout" from a peer closing an idle connection.
            log.debug("{peer} ended the idle connection: {code}", peer=self.greeting_name, code=code)
            return self._close()
        if not self._pending:
            return self._protocol_error("unexpected reply")
        _, handler = self._pending.popleft()
        self._cancel_timer()
        handler(code, lines)
        if self._pending and self._timer is None and not self._closing:
            self._arm(self._reply_timeout)

    def _reply(self, code: int, lines: list[str]) -> Reply:
        """RFC 2034: with ENHANCEDSTATUSCODES every line starts with the code.
        Many servers send the code without advertising the extension; like
        Postfix we take it whenever its class matches the reply's."""
        enhanced = None
        stripped = []
        for line in lines:
            match = _ENHANCED.match(line)
            if match and match.group(1) == str(code)[0]:
                enhanced = enhanced or match.group(0).strip()
                line = line[match.end():]
            stripped.append(line)
        lines = stripped
        text = " ".join(line for line in lines if line)[:MAX_REPLY_TEXT]
        return Reply(code, enhanced or f"{code // 100}.0.0", text)

    # --- sending

    def _write_commands(self, commands: list[tuple[str, Callable]], state: str):
        self._state = state
        data = []
        for line, handler in commands:
            self._pending.append((state, handler))
            data.append(line.encode("utf-8") + b"\r\n")
        send_now(self.transport, b"".join(data))
        if self._timer is None:
            self._arm(self._reply_timeout)

    def _send(self, line: str, handler, state: str):
        self._write_commands([(line, handler)], state)

    def _expect(self, handler):
        self._pending.append((self._state, handler))
        if self._timer is None:
            self._arm(self._reply_timeout)

    # --- timers

    def _arm(self, seconds: float, callback=None):
        self._cancel_timer()
        self._timer = self._clock.callLater(seconds, callback or self._on_timeout)

    def _cancel_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _on_timeout(self):
        self._timer = None
        if self._outcome is None:
            log.info("timeout {during} with {peer}", during=self._during(), peer=self.greeting_name or "server")
            kind = FAIL_TLS if self._tls_phase() else FAIL_TIMEOUT
            reply = TLS_FAILED if kind == FAIL_TLS else TIMEOUT._replace(text=f"Timeout {self._during()}")
            self._outcome = self._failure(kind, reply)
        self._close(abort=True)

    # --- states

    def _on_greeting(self, code, lines):
        self._greeted = True
        first = lines[0] if lines else ""
        self.greeting_name = first.split(" ", 1)[0][:255] if first else ""
        if code != 220:
            # RFC 5321 §3.1: 554 (or 4xx) instead of 220: QUIT, maybe try elsewhere.
            return self._fail_politely(FAIL_GREETING, self._reply(code, lines))
        if self._policy == TLS_IMPLICIT:
            self._tls_version = _tls_version(self.transport)
        self._ehlo()

    def _ehlo(self):
        self._send(f"EHLO {self._hostname}", self._on_ehlo, "ehlo")

    def _on_ehlo(self, code, lines):
        if code == 250:
            self.extensions = ext.parse_ehlo_lines(lines[1:])
            return self._after_hello()
        if 500 <= code <= 599:
            # RFC 5321 §4.1.4 / §3.2: an old server; HELO gives no extensions.
            return self._send(f"HELO {self._hostname}", self._on_helo, "helo")
        self._fail_politely(FAIL_HELO, self._reply(code, lines))

    def _on_helo(self, code, lines):
        if code == 250:
            self.extensions = {}
            return self._after_hello()
        self._fail_politely(FAIL_HELO, self._reply(code, lines))

    def _after_hello(self):
        if self._in_handshake:
            # A reply inside TLS means the handshake (and any verification) passed.
            self._in_handshake = False
            self._tls_version = _tls_version(self.transport)
        if not self._tls and self._policy in (TLS_OPPORTUNISTIC, TLS_REQUIRED) and not self._starttls_tried:
            if ext.STARTTLS in self.extensions:
                self._starttls_tried = True
                return self._send("STARTTLS", self._on_starttls, "starttls")
            if self._policy == TLS_REQUIRED:
                return self._fail_politely(FAIL_TLS_REQUIRED, TLS_NOT_OFFERED)
        if self._credentials and not self._authenticated:
            return self._authenticate()
        self._start_transaction()

    def _on_starttls(self, code, lines):
        if code != 220:
            reply = self._reply(code, lines)
            if self._policy == TLS_REQUIRED:
                return self._fail_politely(FAIL_TLS_REQUIRED, TLS_NOT_OFFERED._replace(
                    code=reply.code, text=f"TLS required but STARTTLS was refused: {reply.text}"))
            # RFC 3207 §4: the client may go on without TLS; opportunistic does.
            log.info("STARTTLS refused by {peer} ({code}); continuing without TLS",
                     peer=self.greeting_name, code=code)
            return self._after_hello()
        try:
            self.transport.startTLS(self._tls_options)
        except Exception:
            log.failure("could not start TLS")
            self._outcome = self._failure(FAIL_TLS, TLS_FAILED)
            return self._close(abort=True)
        # RFC 3207 §4.2: forget everything learned before TLS; EHLO again.
        self._discard_input = True
        self._tls = True
        self._in_handshake = True
        self.extensions = {}
        self._ehlo()

    # AUTH (RFC 4954): PLAIN, else LOGIN; never CRAM-MD5 (needs plaintext-equivalent secrets).

    def _authenticate(self):
        if not self._tls or self._policy not in (TLS_REQUIRED, TLS_IMPLICIT):
            return self._fail_politely(FAIL_AUTH, NO_CLEARTEXT_AUTH)
        mechanisms = self.extensions.get(ext.AUTH, ())
        username, password = self._credentials
        if "PLAIN" in mechanisms:
            # RFC 4616: empty authzid (Twisted sends authzid=user, §2.1).
            token = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode()).decode()
            self._auth_steps = [token]
            return self._send(f"AUTH PLAIN {token}", self._on_auth, "auth")
        if "LOGIN" in mechanisms:
            self._auth_steps = [base64.b64encode(username.encode()).decode(),
                                base64.b64encode(password.encode()).decode()]
            return self._send("AUTH LOGIN", self._on_auth, "auth")
        self._fail_politely(FAIL_AUTH, NO_AUTH_MECHANISM)

    def _on_auth(self, code, lines):
        if code == 235:
            self._authenticated = True
            return self._start_transaction()
        if code == 334 and self._auth_steps:
            # PLAIN without initial-response support, or the next LOGIN prompt.
            return self._send(self._auth_steps.pop(0), self._on_auth, "auth")
        if code == 334:
            self._send("*", self._on_auth, "auth")    # RFC 4954 §4: cancel
            return
        reply = self._reply(code, lines)
        self._fail_politely(FAIL_AUTH, reply._replace(text=f"Authentication failed: {reply.text}"))

    # the transaction

    def _start_transaction(self):
        self._state = "mail"
        request = self.request
        refusal = self._refusal()
        if refusal is not None:
            self._local = [refusal] * len(request.recipients)
            return self._finish()
        dsn = ext.DSN in self.extensions
        mail = f"MAIL FROM:<{request.sender}>"
        if ext.SIZE in self.extensions:
            mail += f" SIZE={len(self._message)}"              # RFC 1870 §6
        if ext.EIGHTBITMIME in self.extensions and (request.body == "8BITMIME" or self._eight_bit()):
            mail += " BODY=8BITMIME"                             # RFC 6152 §2
        if self._needs_smtputf8():
            mail += " SMTPUTF8"                                  # RFC 6531 §3.4
        if dsn and request.ret:
            mail += f" RET={request.ret}"                        # RFC 3461 §4.3
        if dsn and request.envid:
            mail += f" ENVID={encode_xtext(request.envid)}"             # RFC 3461 §4.4
        commands = [(mail, self._on_mail)]
        for index, recipient in enumerate(request.recipients):
            if _BAD_ADDRESS.search(recipient.address) or not recipient.address:
                self._local[index] = BAD_RECIPIENT
                continue
            rcpt = f"RCPT TO:<{recipient.address}>"
            if dsn and recipient.notify:
                rcpt += f" NOTIFY={','.join(recipient.notify)}"  # RFC 3461 §4.1
            if dsn and recipient.orcpt:
                rcpt += f" ORCPT={encode_orcpt(recipient.orcpt)}"  # RFC 3461 §4.2
            commands.append((rcpt, self._rcpt_handler(index, len(commands) - 1)))
        if len(commands) == 1:
            return self._finish()
        self._rcpt_commands = commands[1:]
        self._pipelined = ext.PIPELINING in self.extensions
        if self._pipelined:
            # RFC 2920 §3.1: MAIL and RCPT anywhere in a group, DATA as its last
            # command: one round trip to the 354 instead of two (as Postfix does).
            self._write_commands(commands + [("DATA", self._on_pipelined_data)], "mail")
        else:
            self._send(mail, self._on_mail, "mail")

    def _refusal(self) -> Reply | None:
        request = self.request
        if _BAD_ADDRESS.search(request.sender):
            return BAD_SENDER
        limit = ext.size_limit(self.extensions)
        if limit is not None and len(self._message) > limit:
            return Reply(0, "5.3.4", f"Message size {len(self._message)} exceeds the next hop's limit "
                                     f"of {limit} octets")
        if self._eight_bit() and ext.EIGHTBITMIME not in self.extensions:
            # RFC 6152 §3 allows converting to 7 bit instead; doing that right
            # (MIME structure, broken DKIM signatures) is out of scope, so the
            # simplest honest behaviour: a permanent failure.
            return NO_8BITMIME
        if self._needs_smtputf8() and ext.SMTPUTF8 not in self.extensions:
            return NO_SMTPUTF8                                   # RFC 6531 §3.2: no downgrade here
        return None

    def _eight_bit(self) -> bool:
        if self._has_8bit is None:
            self._has_8bit = not self._message.isascii()      # C speed, no regex
        return self._has_8bit

    def _needs_smtputf8(self) -> bool:
        request = self.request
        return request.smtputf8 or not request.sender.isascii() or \
            not all(r.address.isascii() for r in request.recipients)

    def _on_mail(self, code, lines):
        self._mail_answered = True
        if code // 100 != 2:
            self._mail_reply = self._reply(code, lines)
            if not self._pipelined:
                self._finish()
            return
        if not self._pipelined:
            line, handler = self._rcpt_commands[0]
            self._send(line, handler, "rcpt")

    def _rcpt_handler(self, index: int, position: int):
        """Reply handler for request recipient `index`, the `position`-th RCPT sent."""
        def on_rcpt(code, lines):
            self._rcpt[index] = self._reply(code, lines)
            if self._pipelined:
                return                          # DATA's reply, already on its way, decides
            if position + 1 < len(self._rcpt_commands):
                line, handler = self._rcpt_commands[position + 1]
                self._send(line, handler, "rcpt")
                return
            if not self._recipient_accepted():
                return self._finish()           # no DATA without an accepted recipient
            self._send("DATA", self._on_data, "data")
        return on_rcpt

    def _recipient_accepted(self) -> bool:
        return self._mail_reply is None and any(r and r.code // 100 == 2 for r in self._rcpt)

    def _on_pipelined_data(self, code, lines):
        if code == 354 and not self._recipient_accepted():
            # The server should have refused DATA (no valid recipient), but it
            # waits for a message now: end it at once, empty, so that nothing
            # is delivered, and leave this confused server (no reuse).
            self._state = "data-body"
            self._pending.append(("data-body", lambda code, lines: self._finish()))
            send_now(self.transport, b".\r\n")
            return self._arm(self._data_timeout)
        if code != 354 and not self._recipient_accepted():
            return self._finish()               # the expected 503/554: the RCPT replies say why
        self._on_data(code, lines)

    def _on_data(self, code, lines):
        if code != 354:
            self._data_reply = self._reply(code, lines)
            return self._finish()
        self._state = "data-body"
        payload = dot_stuff(self._message)
        self._pending.append(("data-body", self._on_final))
        # One write: the transport buffers and sends it; RFC 5321 §4.5.3.2.5/6
        # timeouts become one deadline for the payload and its final reply.
        send_now(self.transport, payload)
        self._arm(self._data_timeout)

    def _on_final(self, code, lines):
        self._data_reply = self._reply(code, lines)
        self._final_reply = True
        self._finish()

    # --- outcomes

    def _recipient_replies(self, unresolved: Reply | None) -> tuple[Reply, ...]:
        out = []
        for index in range(len(self.request.recipients)):
            rcpt = self._rcpt[index]
            if self._local[index] is not None:
                out.append(self._local[index])
            elif self._mail_reply is not None:
                out.append(self._mail_reply)
            elif rcpt is None:
                out.append(unresolved or CONNECTION_LOST)
            elif rcpt.code // 100 != 2:
                out.append(rcpt)
            elif self._data_reply is not None:
                out.append(self._data_reply)
            else:
                out.append(unresolved or CONNECTION_LOST)
        return tuple(out)

    def _session_result(self, unresolved: Reply | None = None) -> SessionResult:
        return SessionResult(replies=self._recipient_replies(unresolved),
                             tls=self._tls_version if self._tls else None,
                             dsn=ext.DSN in self.extensions, greeting_name=self.greeting_name)

    def _failure(self, kind: str, reply: Reply):
        """What a failure means now: before MAIL was answered nothing is
        recipient-specific (SessionFailure); afterwards every recipient
        without an answer is deferred with `reply`."""
        if self._mail_answered or any(r is not None for r in self._local):
            return self._session_result(reply.as_temporary())
        return SessionFailure(kind, reply.as_temporary(), greeting_name=self.greeting_name,
                              answered=self._greeted)

    def _tls_phase(self) -> bool:
        if self._state == "starttls" or self._in_handshake:
            return True
        return self._policy == TLS_IMPLICIT and not self._greeted

    def _during(self) -> str:
        return {"connecting": "while connecting", "greeting": "waiting for the greeting",
                "ehlo": "after EHLO", "helo": "after HELO", "starttls": "after STARTTLS",
                "auth": "during AUTH", "mail": "after MAIL FROM", "rcpt": "after RCPT TO",
                "data": "after DATA", "data-body": "after end of data", "quit": "after QUIT",
                "idle": "while idle"}.get(self._state, "")

    def _protocol_error(self, why: str):
        log.info("protocol error from {peer} {during}: {why}", peer=self.greeting_name or "server",
                 during=self._during(), why=why)
        if self._outcome is None:
            self._outcome = self._failure(FAIL_PROTOCOL, PROTOCOL_ERROR)
        self._close(abort=True)

    def _fail_politely(self, kind: str, reply: Reply):
        self._outcome = self._failure(kind, reply)
        self._quit()

    def _finish(self):
        self._outcome = self._session_result()
        if self._may_idle() and self._cache.keep(self):
            return self._idle()
        self._quit()

    def _may_idle(self) -> bool:
        # Only after the final reply to a message: the peer's transaction is
        # over (RFC 5321 §4.1.1.4), so the next MAIL needs no RSET.
        return (self._cache is not None and self._final_reply and not self._closing
                and self._clock.seconds() - self._connected_at < self._cache.reuse_time)

    def _idle(self):
        self._state = "idle"
        self._pending.clear()
        self._arm(self._cache.idle_time, self._idle_expired)
        self._fire()

    def _idle_expired(self):
        self._timer = None
        self._cache.forget(self)
        self._quit()

    def _quit(self):
        self._pending.clear()
        self._send("QUIT", self._on_quit, "quit")
        # Don't wait long for 221: the outcome is already known.
        self._arm(min(QUIT_TIMEOUT, self._reply_timeout), lambda: self._close(abort=True))

    def _on_quit(self, code, lines):
        self._close()

    def _close(self, abort: bool = False):
        if self._closing:
            if abort and self.transport is not None:
                self.transport.abortConnection()
            return
        self._closing = True
        self._cancel_timer()
        self._pending.clear()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
            self._timer = self._clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def _fire(self):
        if self._fired:
            return
        self._fired = True
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, SessionFailure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)


class OneShotFactory(Factory):
    """Hands out one prepared protocol (connect() takes a factory)."""

    noisy = False       # one per session; the runner logs each delivery

    def __init__(self, protocol: Protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.factory = self
        return protocol
