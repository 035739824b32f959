"""The IMAP4rev1 server (RFC 3501) with IDLE, UIDPLUS, MOVE, NAMESPACE, ID,
ENABLE, UNSELECT, LITERAL+, CHILDREN, SPECIAL-USE, APPENDLIMIT, SASL-IR and,
when the store has a quota, QUOTA (RFC 9208).

Why not a subclass of twisted.mail.imap4.IMAP4Server. Its defects sit in
exactly the parts a subclass would inherit (docs/twisted.md §4):
the LineReceiver framing (16 KiB lines drop the connection, STARTTLS command
injection, `{n+}` bytes executed as commands, negative and unbounded literal
sizes, O(n²) re-splitting), the command loop (IDLE ending on any line and
swallowing it, pipelined commands buffered without bound), the
generator-per-item FETCH engine (one reactor turn per item, whole-body
partials), the quadratic SEARCH and the shared-IMailbox sequence numbers with
no expunge notification. Fixing those means overriding name-mangled
internals (`_IMAP4Server__cbFetch`, ...) that change between releases. So
this module is our own protocol on the connection core
(mailgw.session.core.LineSession), like SMTP and POP3: the core owns the
connection (order, flow control both ways, timers, STARTTLS's discard,
max_errors, closing, the one place errors become replies); this module adds
the literal-aware framing, the command table (`_COMMANDS`) and its replies.
What is reused from Twisted: the cred portal, and `imap4.IAccount` as the
avatar contract. Response formatting is
ours (mailgw.imap.wire): Twisted's `collapseNestedLists` quotes every string
and refuses non-ASCII.

The shape of a session:

- framing (`step`): a command is text segments and literals; `{n}` gets a
  "+" only after its size and the command's state were checked (a refused
  synchronizing literal never gets one, so the client does not send it);
  the bytes of a refused `{n+}` are skipped, never parsed; a line longer than
  `max_command_line` gets BAD and is dropped whole; the session goes on;
- one command at a time: while a command's Deferred is outstanding, later
  input waits (and reading pauses when too much of it piles up); replies
  leave in order;
- untagged updates from other sessions (mailbox.SessionView) go out before
  each tagged reply and during IDLE; EXPUNGE never while answering FETCH,
  STORE or SEARCH (nor their UID forms);
- long FETCHes are produced in chunks of many messages (one write each),
  with message files read in batches, yielding to the reactor between chunks
  and pausing while the transport's buffer is full (`LineSession.writable`).
"""
from __future__ import annotations

import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import imap4

from mailgw.auth import sasl
from mailgw.config_types import Config, IMAPLimits, ListenerConfig
from mailgw.errors import MailError
from mailgw.imap import search
from mailgw.imap.mailboxes import MailboxCommands
from mailgw.imap.mailbox import SequenceError, SessionView
from mailgw.imap.message import MessageCache
from mailgw.imap.parser import ParseError, Reader
from mailgw.imap.replies import (
    AUTHENTICATED,
    BAD,
    NO,
    NO_REPLY,
    NOT_AUTHENTICATED,
    OK,
    OVER_QUOTA_TEXT,
    SELECTED,
    IMAPError,
    selected_call,
)
from mailgw.imap.selected import SelectedCommands
from mailgw.imap.wire import BadMailboxName
from mailgw.session.core import CommandTable, LineSession, LoginFailed, LoginUnavailable
from mailgw.session.listener import ListenerFactory

# Input modes of the framing.
COMMAND, LITERAL, SKIP_LITERAL, SKIP_LINE, IDLE, SASL = (
    "command", "literal", "skip literal", "skip line", "idle", "sasl")

# RFC 3501 §4.3 / RFC 7888 §3: a literal marker ends its line: {n} or {n+}.
_LITERAL_MARKER = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")
_TAG_PREFIX = re.compile(rb"([!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+) ")
_COMMAND_PREFIX = re.compile(rb"[^ ]+ (?:[Uu][Ii][Dd] )?([A-Za-z]+)")
# RFC 4954 §4 allows SASL lines of 12288 octets; more than enough for PLAIN.
_SASL_LINE_LIMIT = 12288
# While idling, sync this often: changes made through the store arrive at once
# as events, and the store polls folders that have subscribers; this sync also
# claims the \Recent of mail the store found in the background.
IDLE_SYNC_INTERVAL = 60.0
# RFC 2971 §3.3: at most 30 field-value pairs.
_MAX_ID_PAIRS = 30

def _bye(text: str) -> bytes:
    return b"* BYE " + text.encode("utf-8") + b"\r\n"


def default_limits(config: Config) -> IMAPLimits:
    """The [imap] defaults, for hand-built configs without an `imap` table."""
    from mailgw import config as config_module
    errors: list[str] = []
    limits = config_module._imap(config_module._Table({}, "imap", errors), config.smtp)
    assert limits is not None and not errors, errors
    return limits


class IMAPFactory(ListenerFactory):
    """One per IMAP listener (imap with STARTTLS, imaps). `message_cache`
    (mailgw.imap.message.MessageCache) may be shared by the listeners of one
    process; each factory makes its own otherwise."""

    def __init__(self, *, config: Config, listener: ListenerConfig, portal, clock,
                 tls_context=None, implicit_tls: bool = False, message_cache: MessageCache | None = None,
                 metrics=None):
        limits = config.imap if config.imap is not None else default_limits(config)
        super().__init__(config=config, listener=listener, portal=portal, clock=clock, limits=limits,
                         tls_context=tls_context, implicit_tls=implicit_tls, metrics=metrics)
        self.cache = message_cache if message_cache is not None else MessageCache()

    def make_protocol(self):
        return IMAPServer(self)


class IMAPServer(MailboxCommands, SelectedCommands, LineSession):
    log = Logger()
    protocol_name = "IMAP"
    login_failure_log = "IMAP login failed"
    # Pipelined input held while a command runs; above it, reading pauses.
    max_pending_input = 1024 * 1024

    def __init__(self, factory: IMAPFactory):
        super().__init__(factory)
        self.cache = factory.cache
        self.state = NOT_AUTHENTICATED
        self.account = None
        self.view: SessionView | None = None
        self._logout = None
        self._mode = COMMAND
        self._segments: list[bytes] = []
        self._command_size = 0
        self._literal = bytearray()
        self._literal_need = 0
        self._skip_need = 0
        self._skip_tail = b""
        self._after_skip = COMMAND
        self._close_after: str | None = None
        self._idle_tag = b""
        self._sasl_tag = b""

    # -- connection lifecycle -------------------------------------------------
    def session_started(self):
        self._write(b"* OK [CAPABILITY " + self._capabilities() + b"] mailgw IMAP4rev1 ready\r\n")
        self.start_timer("login", self.limits.login_timeout, self._login_expired)

    def refusal(self) -> bytes:
        return _bye("[UNAVAILABLE] Too many connections, try again later")

    def idle_timeout(self) -> float:
        return self.limits.idle_timeout

    def idle_expired(self) -> bytes:
        return _bye("Autologout; idle for too long")

    def session_expired(self) -> bytes:
        return _bye("Session time limit exceeded")

    def too_many_errors(self) -> bytes:
        return _bye("Too many errors")

    def connection_ended(self):
        self._deselect()
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    def shut_down(self):
        # RFC 3501 §7.1.5: an untagged BYE may be sent at any time (in IDLE too).
        self._close("Server shutting down")

    def _login_expired(self):
        if self.state == NOT_AUTHENTICATED:
            self._close("Login timeout")

    def _close(self, text: str) -> None:
        self.close(_bye(text))

    # -- output ---------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self.send(data)

    def _tagged(self, tag: bytes, status: str, text: str, code: bytes | None = None) -> None:
        line = tag + b" " + status.encode("ascii")
        if code:
            line += b" [" + code + b"]"
        self._write(line + b" " + text.encode("utf-8", "replace") + b"\r\n")
        self.count_reply(status)
        if status == "BAD":
            self.count_error()

    def _untagged_bad(self, text: str) -> None:
        self._write(b"* BAD " + text.encode("utf-8", "replace") + b"\r\n")
        self.count_reply("BAD")
        self.count_error()

    def _capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT",
                "UIDPLUS", "MOVE", "CHILDREN", "SPECIAL-USE", f"APPENDLIMIT={self.limits.max_append}"]
        if self.state == NOT_AUTHENTICATED:
            if self.can_starttls and not self.session.tls:
                caps.append("STARTTLS")                  # RFC 3501 §6.2.1
            if self._auth_allowed():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")             # RFC 3501 §6.2.3
        elif self._quota() is not None:
            # RFC 9208 §5: QUOTA=RES-<name> per resource; after login only (the quota is the
            # user's; Dovecot does the same). No QUOTASET: limits are the administrator's.
            caps += ["QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"]
        return " ".join(caps).encode("ascii")

    def _quota(self):
        """The logged-in user's IQuota, or None (then there is no QUOTA extension)."""
        return getattr(self.account, "quota", None) if self.account is not None else None

    def _auth_allowed(self) -> bool:
        return self.session.tls or self.limits.allow_plaintext_auth

    # -- input framing ------------------------------------------------------------
    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._scan = max(0, self._scan - count)

    def _line_limit(self) -> int:
        if self._mode == SASL:
            return max(_SASL_LINE_LIMIT, self.limits.max_command_line)
        return self.limits.max_command_line

    def step(self) -> bool:
        """Consume one piece of input; False when more input is needed."""
        buffer, offset = self._buffer, 0
        available = len(buffer)
        mode = self._mode
        if mode == LITERAL:
            if not available:
                return False
            take = min(available, self._literal_need)
            self._literal += buffer[:take]
            self._consume(take)
            self._literal_need -= take
            if self._literal_need == 0:
                self._segments.append(bytes(self._literal))
                self._literal = bytearray()
                self._mode = COMMAND
            return True
        if mode == SKIP_LITERAL:
            if not available:
                return False
            take = min(available, self._skip_need)
            self._consume(take)
            self._skip_need -= take
            if self._skip_need == 0:
                self._mode = SKIP_LINE
                self._skip_tail = b""
            return True
        end = buffer.find(b"\r\n", max(self._scan, offset))
        if end < 0:
            if mode == SKIP_LINE:
                keep = 1 if buffer.endswith(b"\r") else 0
                self._skip_tail = (self._skip_tail + bytes(buffer[offset:len(buffer) - keep]))[-32:]
                self._consume(available - keep)
                return False
            if available > self._line_limit():
                self._line_too_long(None)
                return True
            self._scan = max(offset, len(buffer) - 1)
            return False
        line = bytes(buffer[:end])
        self._consume(end + 2)
        self._scan = 0
        if mode == SKIP_LINE:
            tail = (self._skip_tail + line)[-32:]
            self._skip_tail = b""
            marker = _LITERAL_MARKER.search(tail)
            if marker and marker.group(2):
                self._skip_literal(int(marker.group(1)), self._after_skip)
            else:
                self._mode = self._after_skip
            return True
        if len(line) + 2 > self._line_limit():
            self._line_too_long(line)
            return True
        if mode == IDLE:
            self._idle_line(line)
        elif mode == SASL:
            self._sasl_line(line)
        else:
            self._command_line(line)
        return True

    def _command_line(self, line: bytes) -> None:
        marker = _LITERAL_MARKER.search(line)
        if marker is None:
            self._segments.append(line)
            segments, self._segments, self._command_size = self._segments, [], 0
            self._command(segments)
            return
        size, non_synchronizing = int(marker.group(1)), bool(marker.group(2))
        self._segments.append(line[:marker.start()])
        self._command_size += len(line) + 2 + size
        refusal = self._literal_refusal(size)
        if refusal is not None:
            tag = self._current_tag()
            self._segments, self._command_size = [], 0
            if tag is None:
                self._untagged_bad(refusal.text)
            else:
                self._tagged(tag, refusal.status, refusal.text, refusal.code)
            if non_synchronizing:
                # RFC 7888 §4: the client sends these bytes anyway; they are
                # data, never commands.
                self._skip_literal(size)
            return
        if not non_synchronizing:
            self._write(b"+ Ready for literal data\r\n")
        if size == 0:
            self._segments.append(b"")
            return
        self._mode = LITERAL
        self._literal_need = size
        self._literal = bytearray()

    def _current_tag(self, line: bytes | None = None) -> bytes | None:
        if self._segments:
            first = self._segments[0]
        elif line is not None:
            first = line
        else:
            first = bytes(self._buffer[:200])
        m = _TAG_PREFIX.match(first)
        return m.group(1) if m else None

    def _current_command(self) -> str:
        m = _COMMAND_PREFIX.match(self._segments[0]) if self._segments else None
        return m.group(1).decode("ascii").upper() if m else ""

    def _literal_refusal(self, size: int) -> IMAPError | None:
        """Why a literal of `size` octets is not welcome here, or None."""
        command = self._current_command()
        if self.state == NOT_AUTHENTICATED and command not in ("LOGIN", "AUTHENTICATE", "ID"):
            return BAD("Literals are not accepted before login")
        limit = self.limits.max_literal
        if command == "APPEND":
            if self.state == NOT_AUTHENTICATED:
                return BAD("Command not valid in this state")
            if size > self.limits.max_append:
                # RFC 7889 §4: NO [TOOBIG], and for a synchronizing literal
                # no continuation, so the message is never sent.
                return NO(f"Message larger than APPENDLIMIT={self.limits.max_append}", b"TOOBIG")
            quota = self._quota()
            if quota is not None and quota.over(self.user):
                # RFC 9208 §4.3: already full: refused before the message is sent (the
                # exact check, with its size on disk, follows the literal).
                return NO(OVER_QUOTA_TEXT, b"OVERQUOTA")
            limit = self.limits.max_append + self.limits.max_literal
        elif size > limit:
            return BAD(f"Literal larger than {limit} octets")
        if self._command_size > limit + self.limits.max_command_line:
            return BAD("Command too large")
        return None

    def _skip_literal(self, size: int, after: str = COMMAND) -> None:
        """Drop the `size` octets of a refused {n+} literal and the rest of its
        command, then continue in mode `after`."""
        if size > max(self.limits.max_append, self.limits.max_literal) * 2:
            self._close("Literal too large to skip")
            return
        self._mode = SKIP_LITERAL if size else SKIP_LINE
        self._after_skip = after
        self._skip_need = size
        self._skip_tail = b""

    def _line_too_long(self, line: bytes | None) -> None:
        mode = self._mode
        tag = self._current_tag(line) if mode == COMMAND else (self._sasl_tag if mode == SASL else None)
        self._segments, self._command_size = [], 0
        if mode == SASL:
            self._mode = COMMAND
        if tag is None:
            self._untagged_bad("Line too long")
        else:
            self._tagged(tag, "BAD", "Command line too long")
        if self.closing:
            return
        if line is None:
            # No line end yet: drop what we have and the rest of the line as it comes.
            buffer = self._buffer
            end = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
            self._skip_tail = bytes(buffer[max(0, end - 32):end])
            self._consume(end)
            self._after_skip = IDLE if mode == IDLE else COMMAND
            self._mode = SKIP_LINE
            return
        marker = _LITERAL_MARKER.search(line)
        if marker and marker.group(2):
            self._skip_literal(int(marker.group(1)), IDLE if mode == IDLE else COMMAND)

    # -- commands -------------------------------------------------------------------
    def _command(self, segments: list[bytes]) -> None:
        reader = Reader(segments, self.limits.max_paren_depth)
        try:
            tag = reader.tag()
        except ParseError:
            self.count_command("other")
            self._untagged_bad("Missing or invalid tag")
            return
        entry = None
        try:
            reader.sp()
            name = reader.keyword()
            uid = False
            if name == "UID":
                reader.sp()
                name = reader.keyword()
                uid = True
                if name not in _UID_COMMANDS:
                    raise ParseError(f"Unknown UID command {name[:40]}")
            entry = _COMMANDS.find(name)
            if entry is None:
                raise ParseError(f"Unknown command {name[:40]}")
            self.count_command("UID " + name if uid else name)
            handler, states = entry
            if self.state not in states:
                raise ParseError(f"{name} is not valid in the {self.state} state")
        except ParseError as error:
            if entry is None:
                self.count_command("other")
            self._tagged(tag, "BAD", str(error))
            return
        label = "UID " + name if uid else name
        self.run(handler, self, tag, reader, uid, context=(tag, label))

    def command_finished(self, result, context) -> None:
        self._finish(result, *context)

    def send_reply(self, reply, context) -> None:
        self._finish(reply, *context)

    def _finish(self, result, tag: bytes, label: str) -> None:
        if result is NO_REPLY or self.closing:
            return
        status, code, text = result
        self._send_updates(allow_expunge=label not in _NO_EXPUNGE)
        self._tagged(tag, status, text, code)
        if self._close_after is not None:
            self._close(self._close_after)

    def error_reply(self, error, context):
        if isinstance(error, IMAPError):
            return (error.status, error.code, error.text)
        if isinstance(error, (ParseError, SequenceError)):
            return ("BAD", None, str(error))
        if isinstance(error, search.BadCharset):
            return ("NO", b"BADCHARSET (US-ASCII UTF-8)", "Unsupported charset")
        if isinstance(error, BadMailboxName):
            return ("NO", b"CANNOT", f"Invalid mailbox name: {error}")
        if isinstance(error, MailError):
            return ("NO", b"UNAVAILABLE", error.text)
        return None

    def internal_error(self, context):
        return ("NO", b"SERVERBUG", "Internal server error")

    def _send_updates(self, allow_expunge: bool) -> None:
        if self.view is not None and self.view.pending:
            lines = self.view.updates(allow_expunge)
            if lines:
                self._write(b"".join(lines))

    # -- any state ------------------------------------------------------------------
    def do_CAPABILITY(self, tag, reader, uid):
        reader.end()
        self._write(b"* CAPABILITY " + self._capabilities() + b"\r\n")
        return OK("CAPABILITY completed")

    def do_NOOP(self, tag, reader, uid):
        reader.end()
        if self.view is None:
            return OK("NOOP completed")
        return selected_call(self.view.sync()).addCallback(lambda _: OK("NOOP completed"))

    def do_LOGOUT(self, tag, reader, uid):
        reader.end()
        self._write(b"* BYE mailgw logging out\r\n")
        self._tagged(tag, "OK", "LOGOUT completed")
        self._deselect()
        self.close()
        return NO_REPLY

    def do_ID(self, tag, reader, uid):
        # RFC 2971: "ID" SP ( "(" string SP nstring *(SP string SP nstring) ")" / nil )
        reader.sp()
        if reader.peek() == 0x28:
            reader.open_paren()
            pairs = 0
            while True:
                reader.string()
                reader.sp()
                reader.nstring()
                pairs += 1
                if pairs > _MAX_ID_PAIRS:
                    raise ParseError("Too many ID fields")
                if reader.maybe(b")"):
                    break
                reader.sp()
            reader.leave()
        elif reader.nstring() is not None:
            raise ParseError("Expected a list or NIL")
        reader.end()
        self._write(b'* ID ("name" "mailgw")\r\n')
        return OK("ID completed")

    # -- not authenticated ------------------------------------------------------------
    def do_STARTTLS(self, tag, reader, uid):
        reader.end()
        if self.session.tls:
            raise BAD("TLS is already active")
        if not self.can_starttls:
            raise NO("STARTTLS is not available here")
        self._tagged(tag, "OK", "Begin TLS negotiation now")
        self.start_tls()
        return NO_REPLY

    def tls_started(self) -> None:
        self._segments, self._command_size = [], 0

    def do_LOGIN(self, tag, reader, uid):
        reader.sp()
        username = reader.astring()
        reader.sp()
        password = reader.astring()
        reader.end()
        if not self._auth_allowed():
            raise NO("Log in after STARTTLS", b"PRIVACYREQUIRED")     # RFC 3501 §6.2.3, RFC 5530
        return self._logged_in(self.log_in(username, password, imap4.IAccount))

    def do_AUTHENTICATE(self, tag, reader, uid):
        reader.sp()
        mechanism = reader.atom().upper()
        initial = None
        if reader.maybe_sp():
            initial = reader.atom()                                     # RFC 4959 SASL-IR
        reader.end()
        if mechanism != b"PLAIN":
            raise NO("Unsupported authentication mechanism")
        if not self._auth_allowed():
            raise NO("Authenticate after STARTTLS", b"PRIVACYREQUIRED")
        if initial is None:
            self._sasl_tag = tag
            self._mode = SASL
            self._write(b"+ \r\n")
            return NO_REPLY
        return self._sasl_plain(initial)

    def _sasl_line(self, line: bytes) -> None:
        self._mode = COMMAND
        tag = self._sasl_tag
        marker = _LITERAL_MARKER.search(line)
        if marker and marker.group(2):
            self._tagged(tag, "BAD", "Invalid base64")
            if not self.closing:
                self._skip_literal(int(marker.group(1)))
            return
        if line == b"*":
            self._tagged(tag, "BAD", "Authentication cancelled")       # RFC 3501 §6.2.2
            return
        self.run(self._sasl_plain, line, context=(tag, "AUTHENTICATE"))

    def _sasl_plain(self, encoded: bytes):
        try:
            login = self.log_in_plain(sasl.decode_response(encoded), imap4.IAccount)
        except sasl.BadEncoding:
            raise BAD("Invalid base64") from None
        except sasl.MalformedPlain:
            raise BAD("Malformed PLAIN response") from None
        return self._logged_in(login)

    def _logged_in(self, login: defer.Deferred):
        def succeeded(result):
            avatar, logout = result
            if self.closing:
                if logout is not None:
                    logout()
                return NO_REPLY
            self.account, self._logout = avatar, logout
            self.user = avatar.address
            self.state = AUTHENTICATED
            self.cancel_timer("login")
            self.log.info("IMAP login user={user} client=[{client}] tls={tls}",
                          user=self.user, client=self.session.client_ip, tls=self.session.tls)
            return OK("Logged in", b"CAPABILITY " + self._capabilities())

        def failed(failure):
            if failure.check(LoginFailed):
                return self._refused(failure.value)
            failure.trap(LoginUnavailable)
            return ("NO", b"UNAVAILABLE", "Authentication temporarily unavailable")
        return login.addCallbacks(succeeded, failed)

    def _refused(self, refused: LoginFailed):
        if refused.last:
            self._close_after = "Too many failed logins"
        if refused.lockout is not None:
            return ("NO", b"UNAVAILABLE", refused.lockout.text)      # RFC 5530: temporary
        return ("NO", b"AUTHENTICATIONFAILED", "Authentication failed")

    def do_IDLE(self, tag, reader, uid):
        reader.end()
        self._idle_tag = tag
        self._mode = IDLE
        self._write(b"+ idling\r\n")
        if self.view is not None:
            self._send_updates(allow_expunge=True)
            self.view.on_change = self._idle_changed
            self.start_timer("idle sync", IDLE_SYNC_INTERVAL, self._idle_sync)
        return NO_REPLY

    def _idle_changed(self) -> None:
        if self._mode == IDLE and not self.timer_active("idle push"):
            self.start_timer("idle push", 0, self._idle_push)

    def _idle_push(self) -> None:
        if self._mode == IDLE:
            self._send_updates(allow_expunge=True)

    def _idle_sync(self) -> None:
        if self._mode != IDLE or self.view is None:
            return

        def again(_):
            if self._mode == IDLE and self.view is not None:
                self.start_timer("idle sync", IDLE_SYNC_INTERVAL, self._idle_sync)

        def failed(failure):
            self.log.failure("IMAP IDLE sync failed", failure=failure)
        self.view.sync().addErrback(failed).addCallback(again)

    def _idle_line(self, line: bytes) -> None:
        if line.strip(b" ").upper() != b"DONE":
            # RFC 2177 §3: only DONE ends IDLE; anything else is an error and we
            # keep idling (the line is not executed, nor the bytes of a {n+}
            # literal it announces, which might spell DONE).
            self._untagged_bad("Expected DONE")
            marker = _LITERAL_MARKER.search(line)
            if marker and marker.group(2) and not self.closing:
                self._skip_literal(int(marker.group(1)), IDLE)
            return
        self._mode = COMMAND
        self.cancel_timer("idle sync")
        self.cancel_timer("idle push")
        if self.view is not None:
            self.view.on_change = None
        self._finish(OK("IDLE terminated"), self._idle_tag, "IDLE")

_ANY = (NOT_AUTHENTICATED, AUTHENTICATED, SELECTED)
_AUTH = (AUTHENTICATED, SELECTED)
_SELECTED = (SELECTED,)
# The only commands a client reaches; every other word is a tagged BAD,
# in order, counted towards max_errors.
_COMMANDS = CommandTable({
    "CAPABILITY": (IMAPServer.do_CAPABILITY, _ANY),
    "NOOP": (IMAPServer.do_NOOP, _ANY),
    "LOGOUT": (IMAPServer.do_LOGOUT, _ANY),
    "ID": (IMAPServer.do_ID, _ANY),                          # RFC 2971
    "STARTTLS": (IMAPServer.do_STARTTLS, (NOT_AUTHENTICATED,)),
    "LOGIN": (IMAPServer.do_LOGIN, (NOT_AUTHENTICATED,)),
    "AUTHENTICATE": (IMAPServer.do_AUTHENTICATE, (NOT_AUTHENTICATED,)),
    "SELECT": (IMAPServer.do_SELECT, _AUTH),
    "EXAMINE": (IMAPServer.do_EXAMINE, _AUTH),
    "CREATE": (IMAPServer.do_CREATE, _AUTH),
    "DELETE": (IMAPServer.do_DELETE, _AUTH),
    "RENAME": (IMAPServer.do_RENAME, _AUTH),
    "SUBSCRIBE": (IMAPServer.do_SUBSCRIBE, _AUTH),
    "UNSUBSCRIBE": (IMAPServer.do_UNSUBSCRIBE, _AUTH),
    "LIST": (IMAPServer.do_LIST, _AUTH),
    "LSUB": (IMAPServer.do_LSUB, _AUTH),
    "STATUS": (IMAPServer.do_STATUS, _AUTH),
    "APPEND": (IMAPServer.do_APPEND, _AUTH),
    "NAMESPACE": (IMAPServer.do_NAMESPACE, _AUTH),           # RFC 2342
    "ENABLE": (IMAPServer.do_ENABLE, _AUTH),                 # RFC 5161
    "IDLE": (IMAPServer.do_IDLE, _AUTH),                     # RFC 2177
    "CHECK": (IMAPServer.do_CHECK, _SELECTED),
    "CLOSE": (IMAPServer.do_CLOSE, _SELECTED),
    "UNSELECT": (IMAPServer.do_UNSELECT, _SELECTED),         # RFC 3691
    "EXPUNGE": (IMAPServer.do_EXPUNGE, _SELECTED),
    "SEARCH": (IMAPServer.do_SEARCH, _SELECTED),
    "FETCH": (IMAPServer.do_FETCH, _SELECTED),
    "STORE": (IMAPServer.do_STORE, _SELECTED),
    "COPY": (IMAPServer.do_COPY, _SELECTED),
    "MOVE": (IMAPServer.do_MOVE, _SELECTED),                 # RFC 6851
    "GETQUOTAROOT": (IMAPServer.do_GETQUOTAROOT, _AUTH),     # RFC 9208
    "GETQUOTA": (IMAPServer.do_GETQUOTA, _AUTH),
    "SETQUOTA": (IMAPServer.do_SETQUOTA, _AUTH),
})
_UID_COMMANDS = ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE")
# RFC 3501 §7.4.1: no EXPUNGE response while answering these (we also hold
# them back for the UID forms, which the RFC would allow).
_NO_EXPUNGE = frozenset({"FETCH", "STORE", "SEARCH", "UID FETCH", "UID STORE", "UID SEARCH"})
