"""The SMTP server (RFC 5321, with the ESMTP extensions of mailgw.smtp.extensions).

Our own protocol on the connection core (mailgw.session.core.LineSession),
not a subclass of Twisted's ESMTP, whose line handling is where its defects
live (docs/twisted.md §1, §8.3): replies out of order under pipelining, a
DATA line over 16 KiB turning the rest of the body into commands, an
unbounded buffer without line ends, STARTTLS command injection, a Python
call per DATA line, and `do_<VERB>` dispatch by name. The core owns the
connection (framing, order, flow control, timers, STARTTLS, max_errors,
closing); this module adds:

- the command table (`COMMANDS`): the only verbs a client can reach;
- the command line bound (RFC 5321 §4.5.3.1.4 plus the extensions'
  allowances), AUTH and SASL lines of 12288 octets (RFC 4954 §4);
- DATA, scanned in bulk for the one terminator CRLF "." CRLF; a bare CR
  anywhere in it refuses the whole message (SMTP smuggling), a bare LF too
  unless [smtp] bare_newline lets this client's LF count as CRLF; the
  message size bounds what is kept in memory;
- every reply produced by `reply()` (which also logs every refused MAIL,
  RCPT and DATA), every error by `error_reply()`.

Policy (who may send what to whom) is in mailgw.smtp.inbound, reached
through the avatar the portal returns.
"""
from __future__ import annotations

import base64
import functools
import re

from twisted.cred import credentials
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp

from mailgw import metrics
from mailgw.auth import sasl
from mailgw.config_types import ROLE_RELAY, Config, ListenerConfig
from mailgw.errors import MailError
from mailgw.session.core import CommandTable, LineSession, LoginFailed, LoginUnavailable
from mailgw.session.listener import ListenerFactory
from mailgw.mailauth.dns import forward_confirmed_name
from mailgw.smtp import codes
from mailgw.smtp.address import AddressError, parse_mail_from, parse_rcpt_to
from mailgw.smtp.codes import Reply
from mailgw.smtp.data import has_long_line, to_lf, unstuff_lf
from mailgw.smtp.extensions import server_extensions

COMMAND, DATA, SASL = "command", "data", "sasl"
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

# Refusals are counted by their name in mailgw/smtp/codes.py (lower case):
# the exact reply, a template's text with its fields filled in, or the one
# named reply with that code and enhanced code; else "other".
_NAMED = {value: name.lower() for name, value in vars(codes).items()
          if isinstance(value, Reply) and name.isupper()}
_TEMPLATES = [(reply.code, reply.enhanced, re.compile(re.sub(r"\\\{\w+\\\}", ".*", re.escape(reply.text)), re.S), name)
              for reply, name in _NAMED.items() if "{" in reply.text]
_BY_CODE: dict = {}
for _reply, _name in _NAMED.items():
    _BY_CODE.setdefault((_reply.code, _reply.enhanced), []).append(_name)
del _reply, _name


@functools.lru_cache(maxsize=256)
def refusal_reason(reply: Reply) -> str:
    """The metrics label of a refusal: its name in mailgw/smtp/codes.py."""
    reply = Reply(*reply)
    name = _NAMED.get(reply)
    if name is not None:
        return name
    for code, enhanced, pattern, name in _TEMPLATES:
        if code == reply.code and enhanced == reply.enhanced and pattern.fullmatch(reply.text):
            return name
    names = _BY_CODE.get((reply.code, reply.enhanced), ())
    return names[0] if len(names) == 1 else "other"


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


class SMTPFactory(ListenerFactory):
    """One per SMTP listener (relay, submission, submissions)."""

    def __init__(self, *, config: Config, listener: ListenerConfig, portal, clock,
                 new_queue_id, tls_context=None, implicit_tls: bool = False, mail_dns=None, screen=None,
                 metrics=None):
        # Trusted networks count towards the total only (see ConnectionLimits).
        super().__init__(config=config, listener=listener, portal=portal, clock=clock, limits=config.smtp,
                         tls_context=tls_context, implicit_tls=implicit_tls, exempt=config.trusted_networks,
                         metrics=metrics)
        self.new_queue_id = new_queue_id
        # MailDNS for the client's reverse DNS ([checks] reverse_dns); None: not looked up.
        checks = config.checks
        self.mail_dns = mail_dns if checks is not None and checks.reverse_dns else None
        # The screen before the greeting (mailgw.spam.screen): the relay role only.
        self.screen = screen if listener.role == ROLE_RELAY else None

    def make_protocol(self):
        return MailgwSMTP(self)


class MailgwSMTP(LineSession):
    log = Logger()
    protocol_name = "SMTP"
    login_failure_log = "AUTH failed"

    def __init__(self, factory: SMTPFactory):
        super().__init__(factory)
        self.host = factory.config.hostname.encode("ascii")
        self._mode = COMMAND
        self._commands_without_mail = 0
        self._shutting_down = False   # 421 due once the outstanding command is answered
        self._stage: str | None = None          # MAIL, RCPT, DATA, END-OF-MESSAGE or None (not logged)
        self._stage_argument = ""               # that command's argument, as the client wrote it
        self._data_envelope = None              # (MailFrom, [RcptTo]) of the message being answered
        self._name_lookup = None                # the client's reverse DNS lookup while it runs
        self._body: bytearray | None = None
        self._refused_session = False           # a 554 greeting: nothing but QUIT (RFC 5321 §3.1)
        self.delivery = None
        self._logout = None
        self._reset_transaction_state()

    # -- connection lifecycle ---------------------------------------------
    def session_started(self):
        self._login_anonymous()
        if self.factory.mail_dns is not None:
            self._look_up_client_name()
        screen = self.factory.screen
        if screen is not None and screen.screens(self.session.client_ip):
            # Held like a command: nothing the client sends is read until the screen is done.
            self.run(self._screen, screen)
            return
        self._greet_client()

    def _greet_client(self) -> None:
        self._send_line(f"220 {self.factory.config.hostname} ESMTP mailgw")

    # -- the screen before the greeting (mailgw.spam.screen) -----------------
    def _screen(self, screen):
        client = self.session.client_text

        def listed(verdict):
            if self.closing:
                return None
            if verdict is not None and verdict.refused:
                screen.dnsbl_refused += 1
                self._refused_session = True
                reply = codes.DNSBL_BLOCKED.with_text(verdict.reply_text())
                self.log.info("NOQUEUE: reject: CONNECT from [{client}]: {code} {enhanced} {text}; "
                              "score={score} threshold={threshold}", client=client, code=reply.code,
                              enhanced=reply.enhanced, text=reply.text, score=verdict.score,
                              threshold=verdict.threshold)
                self.send(self._format(reply))
                return None
            if not screen.needs_pregreet(client):
                self._greet_client()
                return None
            # Postscreen's pregreet test: the first line of a multi-line
            # greeting, then silence; a client must wait for the last line.
            self._send_line(f"220-{self.factory.config.hostname} ESMTP mailgw")
            waited = defer.Deferred()
            self.start_timer("pregreet", screen.pregreet_wait, lambda: waited.callback(None))
            return waited.addCallback(judge)

        def judge(_):
            if self._buffer:
                screen.failed_pregreet(client)
                first = bytes(self._buffer[:_LOG_ARGUMENT_LIMIT]).split(b"\r\n", 1)[0]
                self.log.info("PREGREET {count} after {wait:g} from [{client}]: {first}",
                              count=len(self._buffer), wait=screen.pregreet_wait, client=client,
                              first=_loggable(first.decode("utf-8", "replace")))
                self._close_with(codes.PREGREET)
                return None
            screen.passed(client)
            self._greet_client()
            return None
        return screen.blocklists(client).addCallback(listed)

    def refusal(self) -> bytes:
        return self._format(codes.TOO_MANY_CONNECTIONS)

    def idle_timeout(self) -> float:
        return self.limits.command_timeout

    def idle_expired(self) -> bytes:
        return self._format(codes.TIMEOUT)

    def session_expired(self) -> bytes:
        return self._format(codes.TIMEOUT.with_text("Session time limit exceeded"))

    def too_many_errors(self) -> bytes:
        return self._format(codes.TOO_MANY_ERRORS)

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

    def connection_ended(self):
        self._body = None
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

    def _close_with(self, reply: Reply):
        self.close(self._format(reply))

    # -- replies ----------------------------------------------------------
    def send(self, data: bytes) -> None:
        # Every send is one reply (multi-line EHLO and 220- included): counted by class.
        if not self.closing and data[:1].isdigit():
            self.count_reply(data[:1].decode() + "xx")
        super().send(data)

    def _send_line(self, text: str) -> None:
        # RFC 5321 §2.4: replies are ASCII; anything else would be a bug, sent as "?".
        self.send(text.encode("ascii", "replace") + b"\r\n")

    @staticmethod
    def _format(reply: Reply, **fields) -> bytes:
        text = reply.text.format(**fields) if fields else reply.text
        # RFC 2034 §3: the enhanced code prefaces the text of every reply
        # except the greeting and HELO/EHLO (which do not come through here).
        enhanced = f"{reply.enhanced} " if reply.enhanced else ""
        return f"{reply.code} {enhanced}{text}\r\n".encode("ascii", "replace")

    def reply(self, reply: Reply, **fields) -> None:
        if self.closing:
            return      # after our last word (421, 221): a late answer must not follow it
        self.send(self._format(reply, **fields))
        if reply.code >= 400 and reply.code != 421:
            if self._stage is not None:
                self.metrics.inc(metrics.MESSAGES_REFUSED, self.factory.listener.name,
                                 "message" if self._stage == END_OF_MESSAGE else self._stage.lower(),
                                 refusal_reason(reply))
                self._log_reject(reply, reply.text.format(**fields) if fields else reply.text)
            self.count_error()

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

    def error_reply(self, error, context):
        if isinstance(error, MailError):
            return Reply(error.code, error.enhanced, error.text)
        if isinstance(error, AddressError):
            return error.reply
        return None

    def internal_error(self, context):
        return codes.LOCAL_ERROR

    def send_reply(self, reply, context):
        self.reply(reply)

    # -- input framing ------------------------------------------------------
    def input_received(self, data: bytes) -> None:
        if self._mode == DATA and not self._busy:
            self._body += data
        else:
            self._buffer += data

    def step(self) -> bool:
        if self._mode == DATA:
            return self._consume_data()
        return super().step()

    def line_received(self, line: bytes) -> None:
        if self._mode == SASL:
            self.run(self._sasl_response, line)
        else:
            self.run(self._command, line)

    def line_limit(self) -> int:
        if self._mode == SASL:
            return _SASL_LINE_LIMIT
        return max(_SASL_LINE_LIMIT, self.limits.max_command_line + max(_EXTENSION_ALLOWANCE.values()))

    def line_too_long(self) -> None:
        # An over-long SASL response ends the exchange (RFC 4954 §4: 12288 octets).
        self._mode = COMMAND
        self.reply(codes.LINE_TOO_LONG)

    def after_command(self) -> None:
        if self._shutting_down:
            self._shutting_down = False
            self.shut_down()
            return
        if self._mode == DATA and self._buffer:
            # Body bytes that arrived while the 354 was pending.
            self._body += self._buffer
            self.discard_input()

    # -- commands -----------------------------------------------------------
    def _command(self, line: bytes):
        head, _, argument = line.lstrip(b" \t").partition(b" ")
        verb = head.upper().decode("ascii", "replace")
        self.count_command(verb if verb in _VERBS else "other")
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
        if self._refused_session and verb != "QUIT":
            return self.reply(codes.REFUSED_SESSION)
        command = COMMANDS.find(verb)
        if command is None:
            return self.reply(codes.SYNTAX_ERROR)
        return command.handler(self, rest.strip(" \t"))

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
        lines = [first, *server_extensions(self.limits.max_message_size, can_starttls=self.can_starttls,
                                            tls_active=self.session.tls, auth_offered=self.portal is not None)]
        out = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
        self.send(("\r\n".join(out) + "\r\n").encode("ascii"))

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
        self.discard_input()
        self._scan_from = 0
        self._data_overflow = False
        self.set_idle_timeout(self.limits.data_timeout)
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
        self._buffer[:0] = body[end + 5:]
        del body[end + 2:]
        self._body = None
        self._mode = COMMAND
        self._stage = END_OF_MESSAGE
        self._data_envelope = (self.transaction, list(self.recipients))
        self.set_idle_timeout(self.limits.command_timeout)
        self.run(self._message_received, body)
        return True

    def _message_received(self, content: bytearray):
        """`content` is the data as received, after a virtual leading CRLF.

        Each check is one C-speed pass, and there are as few as possible: a
        1 MiB message must not cost a Python call per line (docs/twisted.md §1)."""
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
        lf = to_lf(content)
        line_ends = lf.count(b"\n")
        if b"\r" in lf or (line_ends != len(content) - len(lf) and not self.delivery.may_normalize_bare_lf()):
            self._reset_transaction()
            return self.reply(codes.BARE_LINE_ENDING)
        # RFC 5321 §4.5.2: a leading "." on any line is removed (transparency).
        # The virtual leading newline covers the first line and then ends the
        # Received: header put in front.
        lf = unstuff_lf(lf)
        # RFC 5321 §4.5.3.1.6: 1000 octets with the CRLF, "not counting the
        # leading dot duplicated for transparency": so measured unstuffed.
        limit = self.limits.max_text_line
        if has_long_line(lf, limit - 2):
            self._reset_transaction()
            return self.reply(codes.TEXT_LINE_TOO_LONG, limit=limit)
        header = self.delivery.receivedHeader(self.session.helo, self.transaction, self.recipients)
        header_lf = to_lf(header)
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
        self.metrics.inc(metrics.MESSAGES_ACCEPTED, self.factory.listener.name)
        self.reply(codes.QUEUED, queue_id=queue_id)

    # -- STARTTLS (RFC 3207) ------------------------------------------------
    def do_STARTTLS(self, rest: str):
        if rest:
            return self.reply(codes.BAD_ARGUMENTS)
        if self.session.tls:
            return self.reply(codes.TLS_ALREADY_ACTIVE)
        if not self.can_starttls:
            return self.reply(codes.TLS_UNAVAILABLE)
        self.reply(codes.READY_TLS)
        self.start_tls()

    def tls_started(self) -> None:
        # RFC 3207 §4.2: forget everything learned before TLS; the client must EHLO again.
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
        if len(line) + 2 > _SASL_LINE_LIMIT:
            return self.reply(codes.LINE_TOO_LONG)        # RFC 4954 §4
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
            return self._logged_in(self.log_in(self._sasl_username, decoded, smtp.IMessageDelivery))
        try:
            login = self.log_in_plain(decoded, smtp.IMessageDelivery)
        except sasl.MalformedPlain:
            return self.reply(codes.AUTH_BAD_BASE64.with_text("Malformed PLAIN response"))
        return self._logged_in(login)

    def _logged_in(self, login: defer.Deferred):
        def succeeded(result):
            avatar, logout = result
            self._do_logout()
            self.delivery, self._logout = avatar, logout
            self.user = avatar.user
            self.reply(codes.AUTH_OK)

        def failed(failure):
            if failure.check(LoginFailed):
                return self._refused(failure.value)
            failure.trap(LoginUnavailable)
            self.reply(codes.AUTH_TEMPORARY)
        return login.addCallbacks(succeeded, failed)

    def _refused(self, refused: LoginFailed):
        lockout = refused.lockout
        self.reply(codes.AUTH_FAILED if lockout is None else Reply(lockout.code, lockout.enhanced, lockout.text))
        if refused.last:
            self._close_with(codes.TOO_MANY_AUTH_FAILURES)

    # -- avatar and transaction state -----------------------------------------
    def _login_anonymous(self):
        def got(result):
            _, self.delivery, self._logout = result
        self.portal.login(credentials.Anonymous(), self.session, smtp.IMessageDelivery) \
            .addCallbacks(got, self.command_failed)

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


_ANY = ("command",)
# The only verbs a client reaches (RFC 5321 §4.1, RFC 3207, RFC 4954); every
# other word is "500 5.5.2", in order, and counts towards max_errors.
COMMANDS = CommandTable({
    "HELO": (MailgwSMTP.do_HELO, _ANY),
    "EHLO": (MailgwSMTP.do_EHLO, _ANY),
    "MAIL": (MailgwSMTP.do_MAIL, _ANY),
    "RCPT": (MailgwSMTP.do_RCPT, _ANY),
    "DATA": (MailgwSMTP.do_DATA, _ANY),
    "RSET": (MailgwSMTP.do_RSET, _ANY),
    "NOOP": (MailgwSMTP.do_NOOP, _ANY),
    "QUIT": (MailgwSMTP.do_QUIT, _ANY),
    "VRFY": (MailgwSMTP.do_VRFY, _ANY),
    "EXPN": (MailgwSMTP.do_EXPN, _ANY),
    "HELP": (MailgwSMTP.do_HELP, _ANY),
    "STARTTLS": (MailgwSMTP.do_STARTTLS, _ANY),
    "AUTH": (MailgwSMTP.do_AUTH, _ANY),
})
_VERBS = COMMANDS.verbs()
