"""The SMTP server: Twisted's ESMTP behind a subclass that owns the framing.

Twisted's ESMTP gives us the protocol skeleton (cred plumbing, TimeoutMixin,
do_<VERB> naming). Its line handling is where its defects live
(../shared/twisted-traps.md §1, §8.3): replies out of order under
pipelining, a DATA line over 16 KiB turning the rest of the body into
commands, an unbounded buffer without line ends, STARTTLS command injection,
a Python call per DATA line. So this subclass replaces `dataReceived` with
its own loop:

- commands are taken one at a time; while a command's Deferred is
  outstanding, later (pipelined) input waits, so replies leave in order
  (RFC 2920 §3);
- a command line is bounded (RFC 5321 §4.5.3.1.4 plus the extensions'
  allowances); an over-long line gets one reply and is dropped whole, never
  split into several commands;
- DATA is scanned in bulk for the one terminator CRLF "." CRLF; a bare CR
  anywhere in it refuses the whole message (SMTP smuggling), a bare LF too
  unless [smtp] bare_newline lets this client's LF count as CRLF; the
  message size bounds what is kept in memory;
- every reply is produced by `reply()` (which also logs every refused
  MAIL, RCPT and DATA), every error by `_reply_error()`.

Policy (who may send what to whom) is in mailgw.smtp.delivery, reached
through the avatar the portal returns.
"""
from __future__ import annotations

import base64
import ipaddress

from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from mailgw.auth import sasl
from mailgw.config_types import Config, ListenerConfig
from mailgw.errors import LoginsRefused, MailError
from mailgw.interfaces import ISessionInfo
from mailgw.limits import ListenerFactory, SerialCommands, cancel_timer, close_connection, send_now
from mailgw.mailauth.dns import forward_confirmed_name
from mailgw.smtp import codes
from mailgw.smtp.address import AddressError, parse_mail_from, parse_rcpt_to
from mailgw.smtp.codes import Reply

COMMAND, DATA, SASL, CLOSING = "command", "data", "sasl", "closing"
# The commands whose refusals are logged, as Postfix names them ("NOQUEUE:
# reject: RCPT from ..."); END-OF-MESSAGE is the reply to the message data.
_LOGGED_STAGES = {b"MAIL": "MAIL", b"RCPT": "RCPT", b"DATA": "DATA"}
END_OF_MESSAGE = "END-OF-MESSAGE"
# Client text quoted in a log line is cut here (and never carries a line end).
_LOG_ARGUMENT_LIMIT = 256

# RFC 5321 §4.5.3.1.4 gives 512 octets per command line; extensions raise it
# for the commands that carry their parameters:
# RFC 1870 §3 SIZE +26, RFC 3461 §4 ENVID +100 and RET, RFC 4954 §5 AUTH= +500,
# RFC 6152 BODY=8BITMIME and RFC 6531 SMTPUTF8 (a few octets each),
# RFC 3461 §4 NOTIFY+ORCPT +500 on RCPT.
_EXTENSION_ALLOWANCE = {"MAIL": 26 + 100 + 500 + 14 + 9 + 9, "RCPT": 500}
# RFC 4954 §4: an AUTH command (and each SASL response) may be up to 12288 octets.
_SASL_LINE_LIMIT = 12288
# Pipelined input held while a command's Deferred is outstanding; above this we
# stop reading from the socket until we catch up.
_MAX_PENDING_INPUT = 256 * 1024
# Replies held while one batch of input is processed; beyond this they go out
# at once (only a client pipelining thousands of commands gets that far).
_MAX_HELD_REPLIES = 64 * 1024

_SASL_USERNAME = base64.b64encode(b"Username:").decode()
_SASL_PASSWORD = base64.b64encode(b"Password:").decode()


def _loggable(text: str) -> str:
    """Client-chosen text, safe in a one-line log: bounded, no control characters."""
    text = text[:_LOG_ARGUMENT_LIMIT]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _path_argument(argument: str) -> str | None:
    """The <path> a MAIL FROM:/RCPT TO: argument names, as written, for logs."""
    _, colon, path = argument.partition(":")
    if not colon:
        return None
    path = path.lstrip(" ")
    if path.startswith("<"):
        end = path.find(">")
        return path[1:end] if end >= 0 else path[1:]
    return path.split(" ", 1)[0] or None


def has_long_line(data, limit: int) -> bool:
    """True if a line of `data` (LF-separated) has more than `limit` octets.

    One backward search per window of limit+1 octets (about len/limit C calls
    in all) instead of splitting a big message into thousands of objects."""
    pos, end = 0, len(data)
    while end - pos > limit:
        newline = data.rfind(b"\n", pos, pos + limit + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False


@implementer(IPushProducer)
class _ReplyBackpressure:
    """Registered with the transport: paused when our replies are not read."""

    def __init__(self, server: "MailgwSMTP"):
        self.server = server

    def pauseProducing(self):
        self.server._output_blocked(True)

    def resumeProducing(self):
        self.server._output_blocked(False)

    def stopProducing(self):
        pass


@implementer(ISessionInfo)
class SessionInfo:
    """What the avatar may know of the session (the cred `mind`)."""

    def __init__(self, listener: ListenerConfig, client_ip, transport):
        self.listener = listener
        self.client_ip = client_ip
        self.client_text = str(client_ip)   # for Received:, the EHLO reply and logs
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.queue_id: str | None = None
        # The forward-confirmed reverse DNS name, "unknown" when there is none
        # (Postfix's client name); None until looked up, or when not looked up.
        self.client_name: str | None = None
        self._transport = transport

    @property
    def tls_details(self) -> str | None:
        """RFC 5321 §4.4 allows comments in Received: say how the client was protected."""
        if not self.tls:
            return None
        try:
            connection = self._transport.getHandle()
            version = connection.get_protocol_version_name()
            cipher = connection.get_cipher_name()
            bits = connection.get_cipher_bits()
        except Exception:   # not an OpenSSL connection (tests) or handshake not done
            return "using TLS"
        return f"using {version} with cipher {cipher} ({bits} bits)"


class SMTPFactory(ListenerFactory):
    """One per SMTP listener (relay, submission, submissions)."""

    def __init__(self, *, config: Config, listener: ListenerConfig, portal, clock,
                 new_queue_id, tls_context=None, implicit_tls: bool = False, mail_dns=None):
        # Trusted networks count towards the total only (see ConnectionLimits).
        super().__init__(config=config, listener=listener, portal=portal, clock=clock, limits=config.smtp,
                         tls_context=tls_context, implicit_tls=implicit_tls, exempt=config.trusted_networks)
        self.new_queue_id = new_queue_id
        # MailDNS for the client's reverse DNS ([checks] reverse_dns); None: not looked up.
        checks = config.checks
        self.mail_dns = mail_dns if checks is not None and checks.reverse_dns else None

    def make_protocol(self):
        return MailgwSMTP(self)


class MailgwSMTP(SerialCommands, smtp.ESMTP):
    log = Logger()

    def __init__(self, factory: SMTPFactory):
        super().__init__(chal={}, contextFactory=factory.tls_context)
        self.factory = factory
        self.limits = factory.limits
        self.portal = factory.portal
        self.host = factory.config.hostname.encode("ascii")
        self.clock = factory.clock
        self.callLater = factory.clock.callLater      # TimeoutMixin uses this
        self._mode = COMMAND
        self._buffer = b""
        self._busy = False          # a command's Deferred is outstanding
        self._looping = False       # inside _process (re-entrancy guard)
        self._held: list[bytes] = []  # replies to the input being processed (_process)
        self._held_size = 0
        self._paused = False        # reading from the socket is paused (see _flow_control)
        self._output_full = False   # the transport's write buffer is full: the client is not reading
        self._skipping_long_line = False
        self._admitted = False
        self._errors = 0
        self._auth_failures = 0
        self._commands_without_mail = 0
        self._session_timer = None
        self._abort_timer = None      # close_connection's: abort if the close takes too long
        self._shutting_down = False   # 421 due once the outstanding command is answered
        self._stage: str | None = None          # MAIL, RCPT, DATA, END-OF-MESSAGE or None (not logged)
        self._stage_argument = ""               # that command's argument, as the client wrote it
        self._data_envelope = None              # (MailFrom, [RcptTo]) of the message being answered
        self._name_lookup = None                # the client's reverse DNS lookup while it runs
        self._producing = False       # _ReplyBackpressure is registered with the transport
        self.session: SessionInfo | None = None
        self.user: str | None = None
        self._logout = None
        self._reset_transaction_state()

    # -- connection lifecycle ---------------------------------------------
    def connectionMade(self):
        peer = self.transport.getPeer()
        try:
            client_ip = ipaddress.ip_address(peer.host)
        except (AttributeError, ValueError):
            client_ip = ipaddress.ip_address("0.0.0.0")
        self.session = SessionInfo(self.factory.listener, client_ip, self.transport)
        self.session.tls = self.factory.implicit_tls
        if not self.factory.admit(client_ip):
            self.log.warn("connection limit: refusing {client} on {listener}",
                          client=client_ip, listener=self.factory.listener.name)
            self._close_with(codes.TOO_MANY_CONNECTIONS)
            return
        self._admitted = True
        self.factory.session_started(self)
        self.canStartTLS = (ITLSTransport.providedBy(self.transport)
                            and self.ctx is not None and not self.factory.implicit_tls)
        if hasattr(self.transport, "setTcpNoDelay"):
            # One reply per request: never let Nagle hold it for the peer's delayed ACK.
            self.transport.setTcpNoDelay(True)
        # The transport tells this producer when its write buffer fills up.
        self.transport.registerProducer(_ReplyBackpressure(self), True)
        self._producing = True
        self._login_anonymous()
        if self.factory.mail_dns is not None:
            self._look_up_client_name()
        self._send_line(f"220 {self.factory.config.hostname} ESMTP mailgw")
        self.setTimeout(self.limits.command_timeout)
        self._session_timer = self.clock.callLater(self.limits.session_timeout, self._session_expired)

    def _look_up_client_name(self) -> None:
        """FCrDNS of the client, for Received:, logs and policy. It runs while
        the client talks; the Received: line waits for it (two queries, each
        bounded by [dns] timeout), and a failure or timeout is "unknown"."""
        session = self.session
        if session.client_ip.is_loopback:
            # What Postfix writes for these (its resolver reads /etc/hosts first):
            # loopback is "localhost" (RFC 6761 §6.3), nothing to ask the DNS about.
            session.client_name = "localhost"
            return

        def found(result):
            name, verified = result
            session.client_name = name if verified else "unknown"

        def failed(failure):
            session.client_name = "unknown"
            self.log.info("reverse DNS of {client}: {why}", client=session.client_text,
                          why=failure.getErrorMessage())
        self._name_lookup = forward_confirmed_name(self.factory.mail_dns, session.client_text)
        self._name_lookup.addCallbacks(found, failed)

    def connectionLost(self, reason=protocol.connectionDone):
        self.setTimeout(None)
        if self._session_timer is not None and self._session_timer.active():
            self._session_timer.cancel()
        cancel_timer(self._abort_timer)
        self._abort_timer = None
        if self._admitted:
            self.factory.release(self.session.client_ip)
            self.factory.session_ended(self)
            self._admitted = False
        self._mode = CLOSING
        self._do_logout()

    def shut_down(self) -> None:
        """The server stops: 421 (RFC 5321 §3.8), then close. An open
        transaction ends without a 250; a message already being stored gets
        its reply first (it is on disk once the store answers, and a client
        told 421 would send it again)."""
        if self._busy:
            self._shutting_down = True
            return
        self._reset_transaction()
        self._close_with(codes.SHUTTING_DOWN)

    def timeoutConnection(self):
        self._close_with(codes.TIMEOUT)

    def _session_expired(self):
        self._session_timer = None
        self._close_with(codes.TIMEOUT.with_text("Session time limit exceeded"))

    def _close_with(self, reply: Reply):
        if self._mode == CLOSING:
            return
        self.reply(reply)
        self._mode = CLOSING
        self._buffer = b""
        self._release_replies()
        if self._producing:
            # A registered producer holds TLS shutdown back (every close of a
            # TLS session would wait for the client): let go first.
            self._producing = False
            self.transport.unregisterProducer()
        self._abort_timer = close_connection(self.transport, self.clock)

    # -- replies ----------------------------------------------------------
    def _send_line(self, text: str) -> None:
        # RFC 5321 §2.4: replies are ASCII; anything else would be a bug, sent as "?".
        self._send(text.encode("ascii", "replace") + b"\r\n")

    def _send(self, data: bytes) -> None:
        """Replies made while a batch of input is processed wait for its end
        (RFC 2920: the replies to a pipelined group may go out as one unit),
        then leave in one send; any other reply leaves at once. Either way
        straight to the socket when nothing is queued (limits.send_now)."""
        if not self._looping:
            return send_now(self.transport, data)
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > _MAX_HELD_REPLIES:
            self._release_replies()

    def _release_replies(self) -> None:
        """Send the held replies: at the end of _process, and before anything
        that must come after them on the wire (a close, the TLS handshake)."""
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._held_size = 0
            send_now(self.transport, data)

    def reply(self, reply: Reply, **fields) -> None:
        if self._mode == CLOSING:
            return      # after our last word (421, 221): a late answer must not follow it
        text = reply.text.format(**fields) if fields else reply.text
        # RFC 2034 §3: the enhanced code prefaces the text of every reply
        # except the greeting and HELO/EHLO (which do not come through here).
        enhanced = f"{reply.enhanced} " if reply.enhanced else ""
        self._send_line(f"{reply.code} {enhanced}{text}")
        if reply.code >= 400 and reply.code != 421 and self._stage is not None:
            self._log_reject(reply, text)
        if reply.code >= 400 and reply.code != 421 and self._mode != CLOSING:
            self._errors += 1
            if self._errors >= self.limits.max_errors:
                self._close_with(codes.TOO_MANY_ERRORS)

    def _log_reject(self, reply: Reply, text: str) -> None:
        """One Postfix-shaped line per refused MAIL, RCPT, DATA or message, for
        fail2ban and for the operator: "NOQUEUE: reject: RCPT from
        unknown[ip]: 550 5.1.1 <x@y>: text; from=<a@b> to=<x@y> proto=ESMTP
        helo=<name>" (no reverse DNS here, so the host is always "unknown")."""
        stage, session = self._stage, self.session
        if stage == END_OF_MESSAGE and self._data_envelope is not None:
            mail_from, recipients = self._data_envelope
        else:
            mail_from, recipients = self.transaction, self.recipients
        sender = None if mail_from is None else str(mail_from.sender or "")
        to = ",".join(str(rcpt.recipient) for rcpt in recipients) or None
        about = ""
        if stage in ("MAIL", "RCPT"):
            path = _path_argument(self._stage_argument)
            if path is not None:
                about = f"<{_loggable(path)}>: "
                if stage == "MAIL":
                    sender = path
                else:
                    to = path
        details = [f"from=<{_loggable(sender)}>"] if sender is not None else []
        if to is not None:
            details.append(f"to=<{_loggable(to)}>")
        details.append("proto=ESMTP" if session.esmtp else "proto=SMTP")
        if session.helo is not None:
            details.append(f"helo=<{_loggable(session.helo)}>")
        enhanced = f"{reply.enhanced} " if reply.enhanced else ""
        queue_id = session.queue_id if stage == END_OF_MESSAGE and session.queue_id else "NOQUEUE"
        # Postfix's name[ip]: the forward-confirmed name, or "unknown".
        self.log.info("{queue_id}: reject: {stage} from {name}[{client}]: "
                      "{code} {enhanced}{about}{text}; {details}",
                      queue_id=queue_id, stage=stage, name=session.client_name or "unknown",
                      client=session.client_text, code=reply.code,
                      enhanced=enhanced, about=about, text=text, details=" ".join(details))

    def _reply_error(self, failure_or_error) -> None:
        """The one place where exceptions become replies."""
        error = getattr(failure_or_error, "value", failure_or_error)
        if isinstance(error, MailError):
            self.reply(Reply(error.code, error.enhanced, error.text))
        elif isinstance(error, AddressError):
            self.reply(error.reply)
        else:
            # Never show internals to the client; the log has the traceback.
            if isinstance(failure_or_error, Exception):
                self.log.failure("unexpected error in SMTP session from {client}",
                                 client=self.session.client_ip)
            else:
                self.log.failure("unexpected error in SMTP session from {client}",
                                 failure=failure_or_error, client=self.session.client_ip)
            self.reply(codes.LOCAL_ERROR)

    # -- input framing ------------------------------------------------------
    def dataReceived(self, data: bytes):
        if self._mode == CLOSING:
            return
        self.resetTimeout()
        if self._mode == DATA and not self._busy:
            self._body += data
        else:
            self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._looping:
            return
        self._looping = True
        try:
            while not self._busy and not self._output_full and self._mode != CLOSING:
                if self._mode == DATA:
                    if not self._consume_data():
                        break
                    continue
                line = self._next_line()
                if line is None:
                    break
                if self._mode == SASL:
                    self._run(self._sasl_response, line)
                else:
                    self._run(self._command, line)
        finally:
            self._looping = False
            self._release_replies()
        self._flow_control()

    def _flow_control(self) -> None:
        """Stop reading while pipelined input piles up behind a slow command,
        or while the client does not read our replies (its window is full):
        either way our buffers stay bounded."""
        # Only a real backlog stops reading: TLS pauses its producer during the
        # handshake, and not reading then would deadlock the handshake.
        waiting = self._busy or self._output_full
        pause = waiting and len(self._buffer) > _MAX_PENDING_INPUT
        if pause and not self._paused and self._mode != CLOSING:
            self._paused = True
            self.transport.pauseProducing()
        elif not pause and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _output_blocked(self, blocked: bool) -> None:
        self._output_full = blocked
        self._flow_control()
        if not blocked and not self._busy:
            self._process()

    def _line_limit(self) -> int:
        if self._mode == SASL:
            return _SASL_LINE_LIMIT
        return max(_SASL_LINE_LIMIT, self.limits.max_command_line + max(_EXTENSION_ALLOWANCE.values()))

    def _next_line(self) -> bytes | None:
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > self._line_limit():
                    # No line end in sight: answer once, then drop input up to
                    # the next CRLF so the tail is never parsed as a command.
                    if not self._skipping_long_line:
                        self._skipping_long_line = True
                        self.reply(codes.LINE_TOO_LONG)
                    self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
                return None
            line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            if self._skipping_long_line:
                self._skipping_long_line = False
                continue
            return line

    def _after_command(self) -> None:
        if self._shutting_down:
            self._shutting_down = False
            return self.shut_down()
        if self._mode == DATA and self._buffer:
            # Body bytes that arrived while the 354 was pending.
            self._body += self._buffer
            self._buffer = b""
        if self._mode != CLOSING:
            self._process()

    # -- commands -----------------------------------------------------------
    def _command(self, line: bytes):
        head, _, argument = line.lstrip(b" \t").partition(b" ")
        self._stage = _LOGGED_STAGES.get(head.upper())
        self._stage_argument = argument.decode("utf-8", "replace") if self._stage else ""
        # RFC 5321 §2.3.8: CR and LF only as a pair; NUL nowhere. Bare ones in an
        # argument would end up inside header lines (Received:) or logs.
        if b"\r" in line or b"\n" in line or b"\0" in line:
            return self.reply(codes.BAD_CHARACTERS)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self.reply(codes.INVALID_UTF8)
        verb, _, rest = text.strip(" \t").partition(" ")
        verb = verb.upper()
        if not verb.isascii() or not verb.isalpha():
            return self.reply(codes.SYNTAX_ERROR)
        limit = self.limits.max_command_line + _EXTENSION_ALLOWANCE.get(verb, 0)
        if verb == "AUTH":
            limit = _SASL_LINE_LIMIT
        if len(line) + 2 > limit:
            return self.reply(codes.LINE_TOO_LONG)
        if verb != "MAIL" and self.transaction is None and verb not in ("QUIT", "AUTH", "STARTTLS", "EHLO"):
            self._commands_without_mail += 1
            if self._commands_without_mail > self.limits.max_commands_before_mail:
                return self._close_with(codes.TOO_MANY_COMMANDS)
        handler = getattr(self, f"do_{verb}", None)
        if handler is None:
            return self.reply(codes.SYNTAX_ERROR)
        return handler(rest.strip(" \t"))

    def do_HELO(self, rest: str):
        return self._greet(rest, esmtp=False)

    def do_EHLO(self, rest: str):
        return self._greet(rest, esmtp=True)

    def _greet(self, rest: str, *, esmtp: bool):
        if not rest or " " in rest or not rest.isprintable():
            return self.reply(codes.BAD_ARGUMENTS.with_text("HELO/EHLO requires a domain name or address literal"))
        if not rest.isascii():
            # RFC 5321 §4.1.1.1: EHLO takes an (ASCII) domain; SMTPUTF8 (RFC 6531)
            # cannot be in use before our reply to it, so an IDN comes as A-labels.
            return self.reply(codes.BAD_ARGUMENTS.with_text("HELO/EHLO domain must be ASCII (IDNs as A-labels)"))
        # RFC 5321 §4.1.4: EHLO resets the transaction like RSET.
        self._reset_transaction()
        self.session.helo = rest
        self.session.esmtp = esmtp
        first = f"{self.factory.config.hostname} Hello {rest} [{self.session.client_text}]"
        if not esmtp:
            return self._send_line(f"250 {first}")
        lines = [first, *self._extensions()]
        out = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
        self._send(("\r\n".join(out) + "\r\n").encode("ascii"))

    def _extensions(self) -> list[str]:
        extensions = [
            f"SIZE {self.limits.max_message_size}",     # RFC 1870
            "8BITMIME",                                  # RFC 6152
            "PIPELINING",                                # RFC 2920
            "ENHANCEDSTATUSCODES",                       # RFC 2034
            "SMTPUTF8",                                  # RFC 6531
            "DSN",                                       # RFC 3461
        ]
        if self.canStartTLS and not self.session.tls:
            extensions.append("STARTTLS")                # RFC 3207
        if self.session.tls and self.portal is not None:
            # RFC 4954 §4 / RFC 8314: AUTH only where the password is protected.
            extensions.append("AUTH PLAIN LOGIN")
        extensions.append("HELP")
        return extensions

    def do_NOOP(self, rest: str):
        self.reply(codes.OK)

    def do_HELP(self, rest: str):
        self.reply(codes.HELP)

    def do_VRFY(self, rest: str):
        if not rest:
            return self.reply(codes.BAD_ARGUMENTS)
        self.reply(codes.CANNOT_VRFY)

    def do_EXPN(self, rest: str):
        self.reply(codes.NOT_IMPLEMENTED)

    def do_RSET(self, rest: str):
        if rest:
            return self.reply(codes.BAD_ARGUMENTS)
        self._reset_transaction()
        self.reply(codes.OK)

    def do_QUIT(self, rest: str):
        self._close_with(codes.BYE)

    def do_MAIL(self, rest: str):
        if self.session.helo is None:
            return self.reply(codes.HELO_FIRST)
        if self.transaction is not None:
            return self.reply(codes.NESTED_MAIL)
        mail_from = parse_mail_from(rest)
        if mail_from.size is not None and mail_from.size > self.limits.max_message_size:
            return self.reply(codes.MESSAGE_TOO_BIG)        # RFC 1870 §6.2
        return self._maybe_deferred(self.delivery.validateFrom, self.session.helo, mail_from) \
            .addCallback(self._mail_accepted)

    def _mail_accepted(self, mail_from):
        self.transaction = mail_from
        self._commands_without_mail = 0
        self.reply(codes.SENDER_OK)

    def do_RCPT(self, rest: str):
        if self.transaction is None:
            return self.reply(codes.NEED_MAIL)
        self._rcpt_attempted = True
        if len(self.recipients) >= self.limits.max_recipients:
            return self.reply(codes.TOO_MANY_RECIPIENTS)    # RFC 5321 §4.5.3.1.10
        rcpt = parse_rcpt_to(rest, smtputf8=self.transaction.smtputf8)
        return self._maybe_deferred(self.delivery.validateTo, rcpt) \
            .addCallback(self._rcpt_accepted, rcpt)

    def _rcpt_accepted(self, message_factory, rcpt):
        self.recipients.append(rcpt)
        self._message_factories.append(message_factory)
        self.reply(codes.RECIPIENT_OK)

    def do_DATA(self, rest: str):
        if rest:
            return self.reply(codes.BAD_ARGUMENTS)
        if self.transaction is None:
            return self.reply(codes.NEED_MAIL)
        if not self.recipients:
            return self.reply(codes.NO_VALID_RECIPIENTS if self._rcpt_attempted else codes.NEED_RCPT)
        self.session.queue_id = self.factory.new_queue_id(self.clock.seconds())
        self._mode = DATA
        # The scan starts on a virtual CRLF so that a first line of "." ends
        # the data and a first line of ".." is unstuffed like any other.
        self._body = bytearray(b"\r\n")
        self._body += self._buffer
        self._buffer = b""
        self._scan_from = 0
        self._data_overflow = False
        self.setTimeout(self.limits.data_timeout)
        self.reply(codes.START_DATA)

    def _consume_data(self) -> bool:
        """Look for CRLF.CRLF; True once the message is complete."""
        body = self._body
        end = body.find(b"\r\n.\r\n", self._scan_from)
        if end < 0:
            if len(body) > self.limits.max_message_size + 2:
                # Too big: keep only what could start the terminator, so memory
                # stays bounded however much the client sends.
                self._data_overflow = True
                del body[:-4]
            self._scan_from = max(0, len(body) - 4)
            return False
        self._buffer = bytes(body[end + 5:]) + self._buffer
        del body[end + 2:]
        self._body = None
        self._mode = COMMAND
        self._stage = END_OF_MESSAGE
        self._data_envelope = (self.transaction, list(self.recipients))
        self.setTimeout(self.limits.command_timeout)
        self._run(self._message_received, body)
        return True

    def _message_received(self, content: bytearray):
        """`content` is the data as received, after a virtual leading CRLF.

        Each check is one C-speed pass, and there are as few as possible: a
        1 MiB message must not cost a Python call per line (twisted-traps §1)."""
        lookup = self._name_lookup
        if lookup is not None and not lookup.called:
            # The Received: line names the client: wait for its reverse DNS
            # (bounded by [dns] timeout) rather than race it.
            waiter = defer.Deferred()
            lookup.addBoth(lambda result: (waiter.callback(None), result)[1])
            return waiter.addCallback(lambda _: self._message_received(content))
        if self._data_overflow or len(content) - 2 > self.limits.max_message_size:
            self._reset_transaction()
            return self.reply(codes.MESSAGE_TOO_BIG)
        # The store keeps LF line ends; convert once and check on the result:
        # any CR left was bare, and every LF must have come from a CRLF, unless
        # this client's bare LF may count as CRLF ([smtp] bare_newline). That is
        # safe because the data still ended only at CRLF "." CRLF (an LF "." LF
        # inside is one more line, its "." removed below like any leading dot),
        # and what is stored or relayed has no bare LF: the spool gets CRLF.
        lf = content.replace(b"\r\n", b"\n")
        line_ends = lf.count(b"\n")
        if b"\r" in lf or (line_ends != len(content) - len(lf) and not self.delivery.may_normalize_bare_lf()):
            self._reset_transaction()
            return self.reply(codes.BARE_LINE_ENDING)
        limit = self.limits.max_text_line
        if has_long_line(lf, limit - 2):
            self._reset_transaction()
            return self.reply(codes.TEXT_LINE_TOO_LONG, limit=limit)
        # RFC 5321 §4.5.2: a leading "." on any line is removed (transparency).
        # The virtual leading newline covers the first line and then ends the
        # Received: header put in front.
        lf = lf.replace(b"\n.", b"\n")
        header = self.delivery.receivedHeader(self.session.helo, self.transaction, self.recipients)
        header_lf = header.replace(b"\r\n", b"\n")
        message = header_lf + lf
        wire_size = len(message) + line_ends + header_lf.count(b"\n")
        transaction, recipients, queue_id = self.transaction, list(self.recipients), self.session.queue_id
        targets = []
        for factory in self._message_factories:
            target = factory()
            if all(target is not seen for seen in targets):
                targets.append(target)
        results = []
        for target in targets:
            target.queue_id = queue_id
            if hasattr(target, "bodyReceived"):
                target.bodyReceived(message, lf=True)
            else:
                for line in message.split(b"\n")[:-1]:
                    target.lineReceived(line)
            results.append(defer.maybeDeferred(target.eomReceived))
        self._reset_transaction()
        done = defer.gatherResults(results, consumeErrors=True)
        done.addErrback(lambda failure: failure.value.subFailure)   # first error, unwrapped
        return done.addCallback(self._message_accepted, transaction, recipients, queue_id, wire_size)

    def _message_accepted(self, _, transaction, recipients, queue_id, size):
        self.log.info(
            "{queue_id}: accepted client=[{client}] listener={listener} auth={auth} "
            "from=<{sender}> to={to} size={size} tls={tls}",
            queue_id=queue_id, client=self.session.client_text, listener=self.factory.listener.name,
            auth=self.user or "-", sender=transaction.sender or "", size=size,
            to=",".join(f"<{rcpt.recipient}>" for rcpt in recipients),
            tls=self.session.tls_details or "no")
        self.reply(codes.QUEUED, queue_id=queue_id)

    # -- STARTTLS (RFC 3207) ------------------------------------------------
    def do_STARTTLS(self, rest: str):
        if rest:
            return self.reply(codes.BAD_ARGUMENTS)
        if self.session.tls:
            return self.reply(codes.TLS_ALREADY_ACTIVE)
        if not self.canStartTLS:
            return self.reply(codes.TLS_UNAVAILABLE)
        self.reply(codes.READY_TLS)
        # CVE-2011-0411: anything the client sent after STARTTLS in the clear
        # must not be executed inside the TLS session.
        self._buffer = b""
        self._release_replies()         # the 220 goes out in the clear, before the handshake
        self.transport.startTLS(self.ctx)
        # RFC 3207 §4.2: forget everything learned before TLS; the client must EHLO again.
        self.session.tls = True
        self.session.helo = None
        self.session.esmtp = False
        self._reset_transaction()
        self._do_logout()
        self.user = None
        self._login_anonymous()

    # -- AUTH (RFC 4954) ------------------------------------------------------
    def do_AUTH(self, rest: str):
        if not self.session.tls:
            return self.reply(codes.ENCRYPTION_REQUIRED)
        if self.user is not None:
            return self.reply(codes.ALREADY_AUTHENTICATED)
        if self.transaction is not None:
            return self.reply(codes.AUTH_IN_TRANSACTION)
        if self.session.helo is None:
            return self.reply(codes.HELO_FIRST)
        words = rest.split(" ")
        if not rest or len(words) > 2 or not words[0]:
            return self.reply(codes.BAD_ARGUMENTS)
        mechanism = words[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            return self.reply(codes.UNKNOWN_MECHANISM)
        self._sasl_mechanism = mechanism
        self._sasl_username = None
        if len(words) == 1:
            self._mode = SASL
            self._send_line("334 " if mechanism == "PLAIN" else f"334 {_SASL_USERNAME}")
            return None
        # RFC 4954 §4: "=" is an empty initial response.
        return self._sasl_step(words[1].encode("ascii", "replace"))

    def _sasl_response(self, line: bytes):
        self._stage = None
        self._mode = COMMAND
        if line == b"*":
            return self.reply(codes.AUTH_ABORTED)
        return self._sasl_step(line)

    def _sasl_step(self, encoded: bytes):
        try:
            decoded = sasl.decode_response(encoded)
        except sasl.BadEncoding:
            return self.reply(codes.AUTH_BAD_BASE64)
        if self._sasl_mechanism == "LOGIN":
            if self._sasl_username is None:
                self._sasl_username = decoded
                self._mode = SASL
                self._send_line(f"334 {_SASL_PASSWORD}")
                return None
            return self._login(self._sasl_username, decoded)
        try:
            authcid, password = sasl.parse_plain(decoded)
        except sasl.MalformedPlain:
            return self.reply(codes.AUTH_BAD_BASE64.with_text("Malformed PLAIN response"))
        except sasl.ForeignIdentity as refused:
            return self._auth_failed(refused.authcid, str(refused))
        return self._login(authcid, password)

    def _login(self, username: bytes, password: bytes):
        creds = credentials.UsernamePassword(username, password)
        creds.client_ip = self.session.client_text
        login = self.portal.login(creds, self.session, smtp.IMessageDelivery)

        def succeeded(result):
            _, avatar, logout = result
            self._do_logout()
            self.delivery, self._logout = avatar, logout
            self.user = avatar.user
            self.reply(codes.AUTH_OK)

        def failed(failure):
            if failure.check(UnauthorizedLogin):
                return self._auth_failed(username, "bad credentials")
            if failure.check(LoginsRefused):       # the checker logged it
                error = failure.value
                return self._auth_failed(username, "address locked out",
                                         Reply(error.code, error.enhanced, error.text))
            self.log.failure("AUTH error for client {client}", failure=failure, client=self.session.client_ip)
            self.reply(codes.AUTH_TEMPORARY)
        return login.addCallbacks(succeeded, failed)

    def _auth_failed(self, username: bytes, why: str, reply: Reply = codes.AUTH_FAILED):
        self._auth_failures += 1
        self.log.warn("AUTH failed user={user!r} client=[{client}]: {why}",
                      user=username.decode("utf-8", "replace")[:100], client=self.session.client_ip, why=why)
        self.reply(reply)
        if self._auth_failures >= self.limits.max_auth_failures:
            self._close_with(codes.TOO_MANY_AUTH_FAILURES)

    # -- avatar and transaction state -----------------------------------------
    def _login_anonymous(self):
        def got(result):
            _, self.delivery, self._logout = result
        self.portal.login(credentials.Anonymous(), self.session, smtp.IMessageDelivery) \
            .addCallbacks(got, self._reply_error)

    def _do_logout(self):
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    def _reset_transaction_state(self):
        self.transaction = None            # the accepted MailFrom
        self.recipients = []               # accepted RcptTo
        self._message_factories = []
        self._rcpt_attempted = False

    def _reset_transaction(self):
        self._reset_transaction_state()
        if self.delivery is not None:
            self.delivery.reset()

    @staticmethod
    def _maybe_deferred(function, *args):
        return defer.maybeDeferred(function, *args)
