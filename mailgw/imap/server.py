"""The IMAP4rev1 server (RFC 3501) with IDLE, UIDPLUS, MOVE, NAMESPACE, ID,
ENABLE, UNSELECT, LITERAL+, CHILDREN, SPECIAL-USE, APPENDLIMIT, SASL-IR and,
when the store has a quota, QUOTA (RFC 9208).

Why not a subclass of twisted.mail.imap4.IMAP4Server. Its defects sit in
exactly the parts a subclass would inherit (../shared/twisted-traps.md §4):
the LineReceiver framing (16 KiB lines drop the connection, STARTTLS command
injection, `{n+}` bytes executed as commands, negative and unbounded literal
sizes, O(n²) re-splitting), the command loop (IDLE ending on any line and
swallowing it, pipelined commands buffered without bound), the
generator-per-item FETCH engine (one reactor turn per item, whole-body
partials), the quadratic SEARCH and the shared-IMailbox sequence numbers with
no expunge notification. Fixing those means overriding name-mangled
internals (`_IMAP4Server__cbFetch`, ...) that change between releases. So
this module owns the protocol the way mailgw.smtp.server does: its own
framing and command loop, one place that turns errors into replies. What is
reused from Twisted: `protocol.Protocol`, `policies.TimeoutMixin`, the cred
portal, and `imap4.IAccount` as the avatar contract. Response formatting is
ours (mailgw.imap.wire): Twisted's `collapseNestedLists` quotes every string
and refuses non-ASCII.

The shape of a session:

- framing (`_step`): a command is text segments and literals; `{n}` gets a
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
  and pausing while the transport's buffer is full (IPushProducer).
"""
from __future__ import annotations

import ipaddress
import re

from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IPushProducer, ITLSTransport
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.auth import sasl
from mailgw.limits import ListenerFactory, close_connection
from mailgw.config_types import Config, IMAPLimits, ListenerConfig
from mailgw.errors import LoginsRefused, MailError
from mailgw.imap import fetch, listing, search
from mailgw.imap.mailbox import SequenceError, SessionView, normalise_name
from mailgw.imap.message import MessageCache, parse_header_of
from mailgw.imap.parser import ParseError, Reader
from mailgw.imap.wire import (
    BadMailboxName,
    astring,
    decode_mailbox,
    encode_mailbox,
    flag_list,
    ordered_uid_set,
    sorted_flags,
)
from mailgw.interfaces import ISessionInfo
from mailgw.store.events import DELETED, SEEN

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED = "not authenticated", "authenticated", "selected"
# Input modes of the framing.
COMMAND, LITERAL, SKIP_LITERAL, SKIP_LINE, IDLE, SASL, CLOSING = (
    "command", "literal", "skip literal", "skip line", "idle", "sasl", "closing")

# RFC 3501 §4.3 / RFC 7888 §3: a literal marker ends its line: {n} or {n+}.
_LITERAL_MARKER = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")
_TAG_PREFIX = re.compile(rb"([!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+) ")
_COMMAND_PREFIX = re.compile(rb"[^ ]+ (?:[Uu][Ii][Dd] )?([A-Za-z]+)")
# RFC 4954 §4 allows SASL lines of 12288 octets; more than enough for PLAIN.
_SASL_LINE_LIMIT = 12288
# Pipelined input held while a command runs; above it, reading pauses.
_MAX_PENDING_INPUT = 1024 * 1024
# FETCH/SEARCH work in chunks: at most this many messages, or this many
# octets of message text, per chunk (one write, one batch of file reads).
CHUNK_MESSAGES = 512
CHUNK_OCTETS = 1024 * 1024
# While idling, sync this often: changes made through the store arrive at once
# as events, and the store polls folders that have subscribers; this sync also
# claims the \Recent of mail the store found in the background.
IDLE_SYNC_INTERVAL = 60.0
# RFC 2971 §3.3: at most 30 field-value pairs.
_MAX_ID_PAIRS = 30

NO_REPLY = None          # a handler that answered (or will answer) by itself


def OK(text: str, code: bytes | None = None):
    return ("OK", code, text)


class IMAPError(Exception):
    """A tagged NO or BAD with an optional response code (RFC 5530)."""

    def __init__(self, status: str, text: str, code: bytes | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


def NO(text: str, code: bytes | None = None) -> IMAPError:
    return IMAPError("NO", text, code)


def BAD(text: str) -> IMAPError:
    return IMAPError("BAD", text)


def _trap(kind, error: IMAPError):
    """An errback turning one store exception type into a reply."""
    def errback(failure):
        failure.trap(kind)
        raise error
    return errback


# The store's ValueError for data it cannot keep (RFC 5530 LIMIT): more
# keywords than a folder's table holds, a keyword too long, ...
_STORE_REFUSED = NO("The mailbox cannot store this (too many or too long keywords?)", b"LIMIT")


def _selected(d):
    """A call on the selected folder: KeyError means it was deleted or renamed
    (by another session) since SELECT."""
    return d.addErrback(_trap(KeyError, NO("The selected mailbox no longer exists", b"NONEXISTENT")))


def _gone(failure):
    failure.trap(KeyError)
    return None


@implementer(ISessionInfo)
class SessionInfo:
    """The cred `mind`: what the realm may know of the session."""

    def __init__(self, listener: ListenerConfig, client_ip):
        self.listener = listener
        self.client_ip = client_ip
        self.client_text = str(client_ip)
        self.tls = False
        self.helo = None


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
                 tls_context=None, implicit_tls: bool = False, message_cache: MessageCache | None = None):
        limits = config.imap if config.imap is not None else default_limits(config)
        super().__init__(config=config, listener=listener, portal=portal, clock=clock, limits=limits,
                         tls_context=tls_context, implicit_tls=implicit_tls)
        self.cache = message_cache if message_cache is not None else MessageCache()

    def make_protocol(self):
        return IMAPServer(self)


@implementer(IPushProducer)
class IMAPServer(protocol.Protocol, policies.TimeoutMixin):
    log = Logger()

    def __init__(self, factory: IMAPFactory):
        self.factory = factory
        self.limits = factory.limits
        self.portal = factory.portal
        self.clock = factory.clock
        self.callLater = factory.clock.callLater        # TimeoutMixin uses this
        self.cache = factory.cache
        self.state = NOT_AUTHENTICATED
        self.session: SessionInfo | None = None
        self.account = None
        self.user: str | None = None
        self.view: SessionView | None = None
        self.can_starttls = False
        self._logout = None
        self._admitted = False
        self._mode = COMMAND
        self._buffer = bytearray()
        self._offset = 0
        self._scan = 0
        self._segments: list[bytes] = []
        self._command_size = 0
        self._literal = bytearray()
        self._literal_need = 0
        self._skip_need = 0
        self._skip_tail = b""
        self._after_skip = COMMAND
        self._busy = False
        self._looping = False
        self._input_paused = False
        self._errors = 0
        self._auth_failures = 0
        self._close_after: str | None = None
        self._idle_tag = b""
        self._idle_flush = None
        self._idle_timer = None
        self._sasl_tag = b""
        self._login_timer = None
        self._session_timer = None
        self._abort_timer = None      # close_connection's: abort if the close takes too long
        self._output_paused = False
        self._output_waiter: defer.Deferred | None = None
        self._streaming = False

    # -- connection lifecycle -------------------------------------------------
    def connectionMade(self):
        peer = self.transport.getPeer()
        try:
            client_ip = ipaddress.ip_address(peer.host)
        except (AttributeError, ValueError):
            client_ip = ipaddress.ip_address("0.0.0.0")
        self.session = SessionInfo(self.factory.listener, client_ip)
        self.session.tls = self.factory.implicit_tls
        if not self.factory.admit(client_ip):
            self.log.warn("IMAP connection limit: refusing {client} on {listener}",
                          client=client_ip, listener=self.factory.listener.name)
            self._close("[UNAVAILABLE] Too many connections, try again later")
            return
        self._admitted = True
        self.factory.session_started(self)
        self.can_starttls = (ITLSTransport.providedBy(self.transport)
                             and self.factory.tls_context is not None and not self.factory.implicit_tls)
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self._write(b"* OK [CAPABILITY " + self._capabilities() + b"] mailgw IMAP4rev1 ready\r\n")
        self.setTimeout(self.limits.idle_timeout)
        self._login_timer = self.clock.callLater(self.limits.login_timeout, self._login_expired)
        if self.limits.session_timeout > 0:
            self._session_timer = self.clock.callLater(self.limits.session_timeout, self._session_expired)

    def connectionLost(self, reason=protocol.connectionDone):
        self._mode = CLOSING
        self.setTimeout(None)
        for name in ("_login_timer", "_session_timer", "_idle_timer", "_idle_flush", "_abort_timer"):
            timer = getattr(self, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, name, None)
        self._deselect()
        if self._admitted:
            self.factory.release(self.session.client_ip)
            self._admitted = False
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()
        self.stopProducing()
        self.factory.session_ended(self)

    def timeoutConnection(self):
        self._close("Autologout; idle for too long")

    def shut_down(self):
        # RFC 3501 §7.1.5: an untagged BYE may be sent at any time (in IDLE too).
        self._close("Server shutting down")

    def _login_expired(self):
        self._login_timer = None
        if self.state == NOT_AUTHENTICATED:
            self._close("Login timeout")

    def _session_expired(self):
        self._session_timer = None
        self._close("Session time limit exceeded")

    def _close(self, text: str) -> None:
        if self._mode == CLOSING:
            return
        self._write(b"* BYE " + text.encode("utf-8") + b"\r\n")
        self._mode = CLOSING
        self._buffer = bytearray()
        self._offset = self._scan = 0
        self._abort_timer = close_connection(self.transport, self.clock)

    # -- output ---------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._mode != CLOSING:
            self.transport.write(data)

    def _tagged(self, tag: bytes, status: str, text: str, code: bytes | None = None) -> None:
        line = tag + b" " + status.encode("ascii")
        if code:
            line += b" [" + code + b"]"
        self._write(line + b" " + text.encode("utf-8", "replace") + b"\r\n")
        if status == "BAD":
            self._count_error()

    def _untagged_bad(self, text: str) -> None:
        self._write(b"* BAD " + text.encode("utf-8", "replace") + b"\r\n")
        self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            self._close("Too many errors")

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

    # -- IPushProducer: the transport tells us when its buffer is full -------------
    def pauseProducing(self):
        self._output_paused = True

    def resumeProducing(self):
        self._output_paused = False
        waiter, self._output_waiter = self._output_waiter, None
        if waiter is not None:
            waiter.callback(None)

    def stopProducing(self):
        self._output_paused = False
        waiter, self._output_waiter = self._output_waiter, None
        if waiter is not None:
            waiter.callback(None)

    def _start_streaming(self) -> None:
        if not self._streaming and self._mode != CLOSING:
            self._streaming = True
            self.transport.registerProducer(self, True)

    def _stop_streaming(self) -> None:
        if self._streaming:
            self._streaming = False
            self._output_paused = False
            if self._mode != CLOSING:
                self.transport.unregisterProducer()

    def _writable(self):
        """Deferred that fires when more output may be written: at once if the
        transport is not full (after one reactor turn, so other connections
        get their share), else when it asks for more."""
        if self._output_paused:
            self._output_waiter = defer.Deferred()
            return self._output_waiter
        return task.deferLater(self.clock, 0, lambda: None)

    # -- input framing ------------------------------------------------------------
    def dataReceived(self, data: bytes):
        if self._mode == CLOSING:
            return
        self.resetTimeout()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._looping:
            return
        self._looping = True
        try:
            while not self._busy and self._mode != CLOSING and self._step():
                pass
        finally:
            self._looping = False
        self._flow_control()

    def _flow_control(self) -> None:
        if self._mode == CLOSING:
            return
        pending = len(self._buffer) - self._offset
        if not self._input_paused and self._busy and pending > _MAX_PENDING_INPUT:
            self._input_paused = True
            self.transport.pauseProducing()
        elif self._input_paused and (not self._busy or pending <= _MAX_PENDING_INPUT):
            self._input_paused = False
            self.transport.resumeProducing()

    def _consume(self, count: int) -> None:
        self._offset += count
        if self._offset >= len(self._buffer):
            self._buffer = bytearray()
            self._offset = self._scan = 0
        elif self._offset > 65536 and self._offset * 2 > len(self._buffer):
            del self._buffer[:self._offset]
            self._scan = max(0, self._scan - self._offset)
            self._offset = 0

    def _line_limit(self) -> int:
        if self._mode == SASL:
            return max(_SASL_LINE_LIMIT, self.limits.max_command_line)
        return self.limits.max_command_line

    def _step(self) -> bool:
        """Consume one piece of input; False when more input is needed."""
        buffer, offset = self._buffer, self._offset
        available = len(buffer) - offset
        mode = self._mode
        if mode == LITERAL:
            if not available:
                return False
            take = min(available, self._literal_need)
            self._literal += memoryview(buffer)[offset:offset + take]
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
        line = bytes(buffer[offset:end])
        self._consume(end + 2 - offset)
        self._scan = self._offset
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
            first = bytes(self._buffer[self._offset:self._offset + 200])
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
                return NO(_OVER_QUOTA_TEXT, b"OVERQUOTA")
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
        if self._mode == CLOSING:
            return
        if line is None:
            # No line end yet: drop what we have and the rest of the line as it comes.
            buffer = self._buffer
            end = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
            self._skip_tail = bytes(buffer[max(self._offset, end - 32):end])
            self._consume(end - self._offset)
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
            self._untagged_bad("Missing or invalid tag")
            return
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
            entry = _COMMANDS.get(name)
            if entry is None:
                raise ParseError(f"Unknown command {name[:40]}")
            handler, states = entry
            if self.state not in states:
                raise ParseError(f"{name} is not valid in the {self.state} state")
        except ParseError as error:
            self._tagged(tag, "BAD", str(error))
            return
        label = "UID " + name if uid else name
        try:
            result = handler(self, tag, reader, uid)
        except Exception as error:
            self._failed(error, tag, label)
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addCallbacks(self._finish, self._failed, callbackArgs=(tag, label),
                                errbackArgs=(tag, label))
            result.addErrback(self._unexpected)
            result.addBoth(self._command_done)
        else:
            self._finish(result, tag, label)

    def _command_done(self, _):
        self._busy = False
        if self._mode != CLOSING:
            self._process()

    def _finish(self, result, tag: bytes, label: str) -> None:
        if result is NO_REPLY or self._mode == CLOSING:
            return
        status, code, text = result
        self._send_updates(allow_expunge=label not in _NO_EXPUNGE)
        self._tagged(tag, status, text, code)
        if self._close_after is not None:
            self._close(self._close_after)

    def _failed(self, error, tag: bytes, label: str) -> None:
        """The one place where exceptions become replies."""
        if isinstance(error, Failure):
            failure, error = error, error.value
        else:
            failure = Failure(error)
        if isinstance(error, IMAPError):
            result = (error.status, error.code, error.text)
        elif isinstance(error, (ParseError, SequenceError)):
            result = ("BAD", None, str(error))
        elif isinstance(error, search.BadCharset):
            result = ("NO", b"BADCHARSET (US-ASCII UTF-8)", "Unsupported charset")
        elif isinstance(error, BadMailboxName):
            result = ("NO", b"CANNOT", f"Invalid mailbox name: {error}")
        elif isinstance(error, MailError):
            result = ("NO", b"UNAVAILABLE", error.text)
        else:
            # Never show internals to the client; the log has the traceback.
            self.log.failure("unexpected error in IMAP {command} from {client} user={user}",
                             failure=failure, command=label, client=self.session.client_ip,
                             user=self.user or "-")
            result = ("NO", b"SERVERBUG", "Internal server error")
        self._finish(result, tag, label)

    def _unexpected(self, failure):
        self.log.failure("unexpected error finishing an IMAP command", failure=failure)

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
        return _selected(self.view.sync()).addCallback(lambda _: OK("NOOP completed"))

    def do_LOGOUT(self, tag, reader, uid):
        reader.end()
        self._write(b"* BYE mailgw logging out\r\n")
        self._tagged(tag, "OK", "LOGOUT completed")
        self._deselect()
        self._mode = CLOSING
        self._abort_timer = close_connection(self.transport, self.clock)
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
        # CVE-2011-0411: whatever the client pipelined after STARTTLS in the
        # clear must not be executed inside the TLS session.
        self._buffer = bytearray()
        self._offset = self._scan = 0
        self._segments, self._command_size = [], 0
        self.transport.startTLS(self.factory.tls_context)
        self.session.tls = True
        return NO_REPLY

    def do_LOGIN(self, tag, reader, uid):
        reader.sp()
        username = reader.astring()
        reader.sp()
        password = reader.astring()
        reader.end()
        if not self._auth_allowed():
            raise NO("Log in after STARTTLS", b"PRIVACYREQUIRED")     # RFC 3501 §6.2.3, RFC 5530
        return self._login(username, password)

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
            if self._mode != CLOSING:
                self._skip_literal(int(marker.group(1)))
            return
        if line == b"*":
            self._tagged(tag, "BAD", "Authentication cancelled")       # RFC 3501 §6.2.2
            return
        try:
            result = self._sasl_plain(line)
        except Exception as error:
            self._failed(error, tag, "AUTHENTICATE")
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addCallbacks(self._finish, self._failed, callbackArgs=(tag, "AUTHENTICATE"),
                                errbackArgs=(tag, "AUTHENTICATE"))
            result.addErrback(self._unexpected)
            result.addBoth(self._command_done)
        else:
            self._finish(result, tag, "AUTHENTICATE")

    def _sasl_plain(self, encoded: bytes):
        try:
            authcid, password = sasl.parse_plain(sasl.decode_response(encoded))
        except sasl.BadEncoding:
            raise BAD("Invalid base64") from None
        except sasl.MalformedPlain:
            raise BAD("Malformed PLAIN response") from None
        except sasl.ForeignIdentity as refused:
            return self._auth_failed(refused.authcid, str(refused))
        return self._login(authcid, password)

    def _login(self, username: bytes, password: bytes):
        creds = credentials.UsernamePassword(username, password)
        creds.client_ip = str(self.session.client_ip)
        login = self.portal.login(creds, self.session, imap4.IAccount)

        def succeeded(result):
            _, avatar, logout = result
            if self._mode == CLOSING:
                if logout is not None:
                    logout()
                return NO_REPLY
            self.account, self._logout = avatar, logout
            self.user = avatar.address
            self.state = AUTHENTICATED
            if self._login_timer is not None and self._login_timer.active():
                self._login_timer.cancel()
            self._login_timer = None
            self.log.info("IMAP login user={user} client=[{client}] tls={tls}",
                          user=self.user, client=self.session.client_ip, tls=self.session.tls)
            return OK("Logged in", b"CAPABILITY " + self._capabilities())

        def failed(failure):
            if failure.check(UnauthorizedLogin):
                return self._auth_failed(username, "bad credentials")
            if failure.check(LoginsRefused):       # the checker logged it
                self._auth_failed(username, "address locked out")
                return ("NO", b"UNAVAILABLE", failure.value.text)      # RFC 5530: temporary
            self.log.failure("IMAP login error for client {client}", failure=failure,
                             client=self.session.client_ip)
            return ("NO", b"UNAVAILABLE", "Authentication temporarily unavailable")
        return login.addCallbacks(succeeded, failed)

    def _auth_failed(self, username: bytes, why: str):
        self._auth_failures += 1
        self.log.warn("IMAP login failed user={user!r} client=[{client}]: {why}",
                      user=username.decode("utf-8", "replace")[:100], client=self.session.client_ip, why=why)
        if self._auth_failures >= self.limits.max_auth_failures:
            self._close_after = "Too many failed logins"
        return ("NO", b"AUTHENTICATIONFAILED", "Authentication failed")

    # -- authenticated ------------------------------------------------------------------
    def _mailbox(self, reader: Reader) -> str:
        raw = reader.astring()
        if not raw:
            raise NO("Empty mailbox name", b"CANNOT")
        return normalise_name(raw)

    def do_SELECT(self, tag, reader, uid):
        return self._select(reader, readonly=False)

    def do_EXAMINE(self, tag, reader, uid):
        return self._select(reader, readonly=True)

    def _select(self, reader, readonly: bool):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        # RFC 3501 §6.3.1: a SELECT, even a failing one, leaves the old mailbox.
        self._deselect()

        def got(folder):
            view = SessionView(folder, readonly=readonly)
            prefix = self._cache_prefix(folder)
            cache = self.cache

            def forget(uids):
                # Parsed headers of expunged messages are dead weight in the shared cache.
                for uid in uids:
                    cache.discard(prefix + (uid,))
            view.on_expunged = forget
            return view.start()

        def started(view):
            if self._mode == CLOSING:
                view.close()
                return NO_REPLY
            self.view = view
            self.state = SELECTED
            messages = view.folder.messages()
            out = [view.flags_response(),
                   b"* %d EXISTS\r\n" % len(view),
                   b"* %d RECENT\r\n" % len(view.recent)]
            for seq, info in enumerate(messages, 1):
                if SEEN not in info.flags:
                    out.append(b"* OK [UNSEEN %d] First unseen message\r\n" % seq)
                    break
            out.append(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % view.folder.uidvalidity)
            out.append(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % view.folder.uidnext)
            self._write(b"".join(out))
            if readonly:
                return OK("EXAMINE completed", b"READ-ONLY")
            return OK("SELECT completed", b"READ-WRITE")
        return (self.account.folder(name)
                .addErrback(_trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got).addCallback(started))

    def _deselect(self) -> None:
        view, self.view = self.view, None
        if view is not None:
            view.close()
        if self.state == SELECTED:
            self.state = AUTHENTICATED

    def do_CREATE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        # RFC 3501 §6.3.3: a trailing separator only declares the name a parent.
        name = name.rstrip(listing.SEPARATOR) or name
        if name == "INBOX":
            raise NO("INBOX always exists", b"ALREADYEXISTS")
        return (self.account.create(name)
                .addCallback(lambda _: OK("CREATE completed"))
                .addErrback(_trap(FileExistsError, NO("Mailbox already exists", b"ALREADYEXISTS")))
                .addErrback(_trap(KeyError, NO("Parent mailbox does not exist", b"NONEXISTENT")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def do_DELETE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        if name == "INBOX":
            raise NO("INBOX cannot be deleted", b"CANNOT")
        if self.view is not None and self.view.folder.name == name:
            raise NO("Mailbox is selected; CLOSE it first", b"INUSE")
        return (self.account.delete(name)
                .addCallback(lambda _: OK("DELETE completed"))
                .addErrback(_trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(_trap(ValueError, NO("Mailbox cannot be deleted", b"CANNOT"))))

    def do_RENAME(self, tag, reader, uid):
        reader.sp()
        old = self._mailbox(reader)
        reader.sp()
        new = self._mailbox(reader).rstrip(listing.SEPARATOR)
        reader.end()
        if not new:
            raise NO("Invalid mailbox name", b"CANNOT")
        if new == "INBOX":
            raise NO("INBOX already exists", b"ALREADYEXISTS")
        if self.view is not None and (self.view.folder.name == old
                                      or self.view.folder.name.startswith(old + listing.SEPARATOR)):
            raise NO("Mailbox is selected; CLOSE it first", b"INUSE")
        return (self.account.rename(old, new)
                .addCallback(lambda _: OK("RENAME completed"))
                .addErrback(_trap(FileExistsError, NO("Target mailbox already exists", b"ALREADYEXISTS")))
                .addErrback(_trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def do_SUBSCRIBE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        return (self.account.subscribe(name)
                .addCallback(lambda _: OK("SUBSCRIBE completed"))
                .addErrback(_trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def do_UNSUBSCRIBE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        return (self.account.unsubscribe(name)
                .addCallback(lambda _: OK("UNSUBSCRIBE completed"))
                .addErrback(_trap(KeyError, NO("Not subscribed", b"NONEXISTENT")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def _options(self, reader: Reader) -> set[str]:
        reader.open_paren()
        options = set()
        if not reader.maybe(b")"):
            while True:
                options.add(reader.keyword())
                if reader.maybe(b")"):
                    break
                reader.sp()
        reader.leave()
        return options

    def do_LIST(self, tag, reader, uid):
        # RFC 3501 §6.3.8, with the RFC 5258 selection and return options
        # that SPECIAL-USE (RFC 6154 §5) and CHILDREN need.
        reader.sp()
        selection = set()
        if reader.peek() == 0x28:
            selection = self._options(reader)
            reader.sp()
        reference = _pattern(reader.astring())
        reader.sp()
        if reader.peek() == 0x28:
            reader.open_paren()
            patterns = [reader.list_mailbox()]
            while not reader.maybe(b")"):
                reader.sp()
                patterns.append(reader.list_mailbox())
            reader.leave()
        else:
            patterns = [reader.list_mailbox()]
        returns = set()
        if reader.maybe_sp():
            if reader.keyword() != "RETURN":
                raise ParseError("Expected RETURN")
            reader.sp()
            returns = self._options(reader)
        reader.end()
        unknown = (selection - {"SUBSCRIBED", "SPECIAL-USE", "REMOTE", "RECURSIVEMATCH"}) | \
            (returns - {"SUBSCRIBED", "SPECIAL-USE", "CHILDREN"})
        if unknown:
            raise BAD(f"Unsupported LIST option {sorted(unknown)[0]}")
        if patterns == [b""] and not selection:
            # RFC 3501 §6.3.8: the hierarchy delimiter and root name.
            self._write(b'* LIST (\\Noselect) "/" ""\r\n')
            return OK("LIST completed")
        try:
            patterns = [reference + _pattern(raw) for raw in patterns]
        except BadMailboxName as error:
            raise NO(f"Invalid mailbox pattern: {error}", b"CANNOT") from None
        want_subscribed = "SUBSCRIBED" in selection or "SUBSCRIBED" in returns

        def listed(results):
            folders, subscribed = results
            seen = set()
            out = []
            for pattern in patterns:
                for name, attributes in listing.list_entries(
                        folders, pattern, subscribed=set(subscribed) if want_subscribed else None,
                        only_subscribed="SUBSCRIBED" in selection,
                        only_special="SPECIAL-USE" in selection):
                    if name not in seen:
                        seen.add(name)
                        out.append(b"* LIST (" + " ".join(attributes).encode("ascii") + b') "/" '
                                   + astring(encode_mailbox(name)) + b"\r\n")
            self._write(b"".join(out))
            return OK("LIST completed")
        subscriptions = self.account.subscriptions() if want_subscribed else defer.succeed([])
        return defer.gatherResults([self.account.folders(), subscriptions], consumeErrors=True) \
            .addErrback(lambda failure: failure.value.subFailure).addCallback(listed)

    def do_LSUB(self, tag, reader, uid):
        reader.sp()
        reference = reader.astring()
        reader.sp()
        raw = reader.list_mailbox()
        reader.end()
        try:
            pattern = _pattern(reference) + _pattern(raw)
        except BadMailboxName as error:
            raise NO(f"Invalid mailbox pattern: {error}", b"CANNOT") from None

        def listed(subscribed):
            out = [b"* LSUB (" + " ".join(attributes).encode("ascii") + b') "/" '
                   + astring(encode_mailbox(name)) + b"\r\n"
                   for name, attributes in listing.lsub_entries(list(subscribed), pattern)]
            self._write(b"".join(out))
            return OK("LSUB completed")
        return self.account.subscriptions().addCallback(listed)

    def do_STATUS(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.sp()
        reader.open_paren()
        items = [reader.keyword()]
        while not reader.maybe(b")"):
            reader.sp()
            items.append(reader.keyword())
        reader.leave()
        reader.end()
        for item in items:
            if item not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"):
                raise BAD(f"Unknown STATUS item {item[:40]}")
        view = self.view
        state = {}

        def got(folder):
            state["folder"] = folder
            return folder.sync()

        def synced(result):
            folder = state["folder"]
            if view is not None and view.folder is folder:
                # Our own selected folder: the \Recent found now are ours.
                view.recent.update(result.recent)
                recent = len(view.recent)
            else:
                # RFC 3501 §6.3.10: this session is the first to see these.
                recent = len(result.recent)
            messages = folder.messages()
            values = {
                "MESSAGES": len(messages),
                "RECENT": recent,
                "UIDNEXT": folder.uidnext,
                "UIDVALIDITY": folder.uidvalidity,
                "UNSEEN": sum(1 for m in messages if SEEN not in m.flags),
            }
            body = " ".join(f"{item} {values[item]}" for item in items).encode("ascii")
            self._write(b"* STATUS " + astring(encode_mailbox(folder.name)) + b" (" + body + b")\r\n")
            return OK("STATUS completed")
        return (self.account.folder(name)
                .addErrback(_trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got).addCallback(synced))

    def do_APPEND(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.sp()
        flags: list[str] = []
        date = None
        if reader.peek() == 0x28:
            flags = reader.flag_list()
            reader.sp()
        if reader.peek() == 0x22:
            date = reader.date_time()
            reader.sp()
        if not reader.at_literal():
            raise ParseError("APPEND needs the message as a literal")
        message = reader.literal()
        reader.end()
        if len(message) > self.limits.max_append:
            raise NO(f"Message larger than APPENDLIMIT={self.limits.max_append}", b"TOOBIG")
        if not message:
            raise NO("Empty message")

        def got(folder):
            quota = self._quota()
            # Stored with LF line ends: the octets it takes on disk (S=).
            if quota is not None and quota.over(self.user, len(message) - message.count(b"\r\n"), 1):
                raise NO(_OVER_QUOTA_TEXT, b"OVERQUOTA")             # RFC 9208 §4.3: nothing stored
            return (defer.maybeDeferred(folder.append, message, flags=tuple(flags), internaldate=date)
                    .addErrback(_trap(ValueError, _STORE_REFUSED))
                    .addCallback(lambda new_uid: OK(
                        "APPEND completed", b"APPENDUID %d %d" % (folder.uidvalidity, new_uid))))   # RFC 4315
        return (self.account.folder(name)
                .addErrback(_trap(KeyError, NO("No such mailbox", b"TRYCREATE")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got))

    def do_NAMESPACE(self, tag, reader, uid):
        reader.end()
        # RFC 2342: personal, other users', shared: only the personal one.
        self._write(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        return OK("NAMESPACE completed")

    def do_ENABLE(self, tag, reader, uid):
        reader.sp()
        reader.atom()
        while reader.maybe_sp():
            reader.atom()
        reader.end()
        # RFC 5161: nothing we offer needs enabling (no CONDSTORE, no UTF8=ACCEPT).
        self._write(b"* ENABLED\r\n")
        return OK("ENABLE completed")

    def do_IDLE(self, tag, reader, uid):
        reader.end()
        self._idle_tag = tag
        self._mode = IDLE
        self._write(b"+ idling\r\n")
        if self.view is not None:
            self._send_updates(allow_expunge=True)
            self.view.on_change = self._idle_changed
            self._idle_timer = self.clock.callLater(IDLE_SYNC_INTERVAL, self._idle_sync)
        return NO_REPLY

    def _idle_changed(self) -> None:
        if self._mode == IDLE and (self._idle_flush is None or not self._idle_flush.active()):
            self._idle_flush = self.clock.callLater(0, self._idle_push)

    def _idle_push(self) -> None:
        self._idle_flush = None
        if self._mode == IDLE:
            self._send_updates(allow_expunge=True)

    def _idle_sync(self) -> None:
        self._idle_timer = None
        if self._mode != IDLE or self.view is None:
            return

        def again(_):
            if self._mode == IDLE and self.view is not None:
                self._idle_timer = self.clock.callLater(IDLE_SYNC_INTERVAL, self._idle_sync)

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
            if marker and marker.group(2) and self._mode != CLOSING:
                self._skip_literal(int(marker.group(1)), IDLE)
            return
        self._mode = COMMAND
        for name in ("_idle_timer", "_idle_flush"):
            timer = getattr(self, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, name, None)
        if self.view is not None:
            self.view.on_change = None
        self._finish(OK("IDLE terminated"), self._idle_tag, "IDLE")

    # -- selected ---------------------------------------------------------------------
    def do_CHECK(self, tag, reader, uid):
        reader.end()
        return _selected(self.view.sync()).addCallback(lambda _: OK("CHECK completed"))

    def do_CLOSE(self, tag, reader, uid):
        reader.end()
        view = self.view
        if view.readonly:
            self._deselect()
            return OK("CLOSE completed")
        find = view.lookup(len(view))
        doomed = [u for u in view.uids if (info := find(u)) is not None and DELETED in info.flags]

        def expunged(_):
            self._deselect()
            return OK("CLOSE completed")
        # RFC 3501 §6.4.2: expunge silently, no EXPUNGE responses.
        if not doomed:
            return expunged(None)
        return _selected(defer.maybeDeferred(view.folder.expunge, doomed)).addCallback(expunged)

    def do_UNSELECT(self, tag, reader, uid):
        reader.end()
        self._deselect()                                  # RFC 3691: like CLOSE, without expunging
        return OK("UNSELECT completed")

    def do_EXPUNGE(self, tag, reader, uid):
        ranges = None
        if uid:
            reader.sp()
            ranges = reader.sequence_set()                # RFC 4315 §2.1 UID EXPUNGE
        reader.end()
        view = self.view
        if view.readonly:
            raise NO("Mailbox is read-only", b"READ-ONLY")
        uids = view.uids if ranges is None else [view.uids[s - 1] for s in view.resolve(ranges, True)]
        find = view.lookup(len(uids))
        doomed = [u for u in uids if (info := find(u)) is not None and DELETED in info.flags]
        if not doomed:
            return OK("EXPUNGE completed")

        def expunged(removed):
            view.expunged_here(removed)
            return OK("EXPUNGE completed")
        return _selected(defer.maybeDeferred(view.folder.expunge, doomed)).addCallback(expunged)

    def do_SEARCH(self, tag, reader, uid):
        reader.sp()
        query = search.parse(reader)
        return self._search(query, uid)

    @defer.inlineCallbacks
    def _search(self, query: search.Query, uid_mode: bool):
        view = self.view
        count = len(view)
        query.bind(count, view.uids[-1] if count else 0)
        find = view.lookup(count)
        folder = view.folder
        prefix = self._cache_prefix()
        hits: list[int] = []
        candidates = []
        for index, uid in enumerate(view.uids):
            info = find(uid)
            if info is not None:
                candidates.append((index + 1, uid, info))
        position = 0
        while position < len(candidates):
            if query.needs == search.META:
                chunk = candidates
            else:
                chunk, octets = [], 0
                for entry in candidates[position:]:
                    chunk.append(entry)
                    octets += entry[2].size
                    if len(chunk) >= CHUNK_MESSAGES or (query.needs == search.TEXT and octets >= CHUNK_OCTETS):
                        break
            position += len(chunk)
            headers = {}
            data = {}
            if query.needs >= search.HEADER:
                missing = []
                for seq, uid, info in chunk:
                    parsed = self.cache.get(prefix + (uid,))
                    if parsed is None:
                        missing.append(uid)
                    else:
                        headers[uid] = parsed.header
                wanted = [uid for _, uid, _ in chunk] if query.needs == search.TEXT else missing
                if wanted:
                    opened = yield self._open_many(folder, wanted)
                    data = {uid: content for uid, content in opened.items() if content is not None}
                    for uid in missing:
                        if uid in data:
                            headers[uid] = self.cache.put(prefix + (uid,), parse_header_of(data[uid])).header
            for seq, uid, info in chunk:
                candidate = search.Candidate(seq, uid, info, uid in view.recent,
                                             headers.get(uid), data.get(uid))
                if query.match(candidate):
                    hits.append(uid if uid_mode else seq)
            if position < len(candidates) and query.needs != search.META:
                yield task.deferLater(self.clock, 0, lambda: None)
            if self._mode == CLOSING or self.view is not view:
                return NO_REPLY
        self._write(b"* SEARCH" + b"".join(b" %d" % hit for hit in hits) + b"\r\n")
        return OK("SEARCH completed")

    def _cache_prefix(self, folder=None) -> tuple:
        """Keys of `folder`'s (default: the selected one's) messages in the shared MessageCache."""
        folder = folder or self.view.folder
        return (self.account.address, folder.name, folder.uidvalidity)

    @staticmethod
    def _open_many(folder, uids):
        """Deferred[dict uid -> bytes or None (gone)]: one batch of reads.

        IFolder.open reads one message per thread-pool job; at ~80 µs of
        reactor time per job that is most of a large FETCH BODY[]. A folder
        that also offers `open_many(uids)` (Deferred[list of bytes or None, in
        order]: one job for the batch) is used that way; otherwise the reads
        run in parallel, one job each."""
        open_many = getattr(folder, "open_many", None)
        if open_many is not None:
            return defer.maybeDeferred(open_many, uids).addCallback(
                lambda contents: dict(zip(uids, contents)))
        reads = [defer.maybeDeferred(folder.open, uid).addErrback(_gone) for uid in uids]
        return (defer.gatherResults(reads, consumeErrors=True)
                .addErrback(lambda failure: failure.value.subFailure)
                .addCallback(lambda contents: dict(zip(uids, contents))))

    def do_FETCH(self, tag, reader, uid):
        reader.sp()
        ranges = reader.sequence_set()
        reader.sp()
        items = fetch.parse_items(reader)
        reader.end()
        view = self.view
        seqs = view.resolve(ranges, uid)
        plan = fetch.Plan(items, uid)
        if not seqs:
            return OK("FETCH completed")
        if plan.sets_seen and not view.readonly:
            find = view.lookup(len(seqs))
            unseen = [u for u in (view.uids[s - 1] for s in seqs)
                      if (info := find(u)) is not None and SEEN not in info.flags]
            if unseen:
                # RFC 3501 §6.4.5: BODY[...] sets \Seen; the FETCH then says so.
                def stored(new_flags):
                    view.stored(new_flags)
                    return self._fetch(plan, seqs, set(new_flags))
                return _selected(defer.maybeDeferred(view.folder.store_flags, unseen, [SEEN], "add")) \
                    .addCallback(stored)
        return self._fetch(plan, seqs, set())

    @defer.inlineCallbacks
    def _fetch(self, plan: fetch.Plan, seqs: list[int], seen_changed: set[int]):
        view = self.view
        folder = view.folder
        find = view.lookup(len(seqs))
        prefix = self._cache_prefix()
        cache = self.cache
        wants_parsed = plan.wants_header or plan.wants_structure
        vanished = False
        position = 0
        self._start_streaming()
        try:
            while position < len(seqs):
                chunk = []
                octets = 0
                while position < len(seqs) and len(chunk) < CHUNK_MESSAGES and octets < CHUNK_OCTETS:
                    seq = seqs[position]
                    position += 1
                    uid = view.uids[seq - 1]
                    info = find(uid)
                    if info is None:
                        vanished = True
                        continue
                    parsed = cache.get(prefix + (uid,)) if wants_parsed else None
                    needs = plan.needs_content(parsed)
                    if needs:
                        octets += info.size
                    chunk.append((seq, uid, info, parsed, needs))
                opened = {}
                wanted = [entry[1] for entry in chunk if entry[4]]
                if wanted:
                    opened = yield self._open_many(folder, wanted)
                    if self._mode == CLOSING or self.view is not view:
                        return NO_REPLY
                out = []
                for seq, uid, info, parsed, needs in chunk:
                    data = None
                    if needs:
                        data = opened.get(uid)
                        if data is None:
                            vanished = True
                            continue
                        if parsed is None and wants_parsed:
                            parsed = cache.put(prefix + (uid,), parse_header_of(data))
                    flags = view.flags_of(uid, info)
                    if uid in seen_changed:
                        flags = flags | {SEEN}
                    out.append(fetch.render(plan, seq, info, flags, parsed, data, uid in seen_changed))
                if out:
                    self._write(b"".join(out))
                if position < len(seqs):
                    yield self._writable()
                    if self._mode == CLOSING or self.view is not view:
                        return NO_REPLY
        finally:
            self._stop_streaming()
        if vanished and not plan.uid_mode:
            # RFC 2180 §4.1.2, RFC 5530: some messages were expunged meanwhile.
            # (A UID FETCH names UIDs, which stay valid: the gone ones are just absent.)
            return ("NO", b"EXPUNGEISSUED", "Some messages no longer exist")
        return OK("FETCH completed")

    def do_STORE(self, tag, reader, uid):
        reader.sp()
        ranges = reader.sequence_set()
        reader.sp()
        operation = reader.atom().upper()
        modes = {b"FLAGS": "replace", b"+FLAGS": "add", b"-FLAGS": "remove"}
        silent = operation.endswith(b".SILENT")
        mode = modes.get(operation[:-7] if silent else operation)
        if mode is None:
            raise ParseError("Expected FLAGS, +FLAGS or -FLAGS")
        reader.sp()
        if reader.peek() == 0x28:
            flags = reader.flag_list()
        else:
            flags = [reader.flag()]
            while reader.maybe_sp():
                flags.append(reader.flag())
        reader.end()
        view = self.view
        if view.readonly:
            raise NO("Mailbox is read-only", b"READ-ONLY")
        seqs = view.resolve(ranges, uid)
        find = view.lookup(len(seqs))
        targets = [(seq, view.uids[seq - 1]) for seq in seqs]
        present = [u for _, u in targets if find(u) is not None]
        if not present:
            return OK("STORE completed")
        def stored(new_flags):
            if view.new_keywords(flags):
                # RFC 3501 §7.2.6: the new keywords before any FETCH that uses them.
                self._write(view.flags_response())
            view.stored(new_flags)
            if not silent:
                out = []
                for seq, target in targets:
                    current = new_flags.get(target)
                    if current is None:
                        continue
                    if target in view.recent:
                        current = current | {"\\Recent"}
                    listed = flag_list(sorted_flags(current))
                    if uid:
                        out.append(b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, target, listed))
                    else:
                        out.append(b"* %d FETCH (FLAGS %s)\r\n" % (seq, listed))
                self._write(b"".join(out))
            return OK("STORE completed")
        return (_selected(defer.maybeDeferred(view.folder.store_flags, present, flags, mode))
                .addErrback(_trap(ValueError, _STORE_REFUSED)).addCallback(stored))

    def do_COPY(self, tag, reader, uid):
        return self._copy(reader, uid, move=False)

    def do_MOVE(self, tag, reader, uid):
        return self._copy(reader, uid, move=True)       # RFC 6851

    def _copy(self, reader, uid_mode: bool, move: bool):
        reader.sp()
        ranges = reader.sequence_set()
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        view = self.view
        if move and view.readonly:
            raise NO("Mailbox is read-only", b"READ-ONLY")
        seqs = view.resolve(ranges, uid_mode)
        find = view.lookup(len(seqs))
        infos = [info for info in (find(u) for u in (view.uids[s - 1] for s in seqs)) if info is not None]
        uids = [info.uid for info in infos]
        verb = "MOVE" if move else "COPY"

        def got(target):
            if not uids:
                return OK(f"{verb} completed")
            quota = self._quota()
            # RFC 9208 §4.3: a COPY that would go over stores nothing. A MOVE never changes
            # the usage of our one quota root (a full mailbox can still move mail to Trash),
            # so it is never refused for quota (Dovecot does the same).
            if not move and quota is not None and quota.over(self.user, self._copy_octets(infos), len(infos)):
                raise NO(_OVER_QUOTA_TEXT, b"OVERQUOTA")
            return (_selected(defer.maybeDeferred(view.folder.copy, uids, target))
                    .addErrback(_trap(ValueError, _STORE_REFUSED)).addCallback(copied, target))

        def copied(pairs, target):
            code = None
            if pairs:
                code = (b"COPYUID %d " % target.uidvalidity + ordered_uid_set([s for s, _ in pairs])
                        + b" " + ordered_uid_set([t for _, t in pairs]))          # RFC 4315 §3
            if not move:
                return OK("COPY completed", code)
            if code is not None:
                self._write(b"* OK [" + code + b"] Moved\r\n")                    # RFC 6851 §4.3
            return _selected(defer.maybeDeferred(view.folder.expunge, [s for s, _ in pairs])).addCallback(moved)

        def moved(removed):
            view.expunged_here(removed)
            return OK("MOVE completed")
        return (self.account.folder(name)
                .addErrback(_trap(KeyError, NO("No such mailbox", b"TRYCREATE")))
                .addErrback(_trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got))

    # -- RFC 9208 QUOTA ------------------------------------------------------------------
    def _copy_octets(self, infos) -> int:
        """Octets copies of `infos` take on disk: the store's exact figure when its folder
        has one, else RFC822.SIZE (a little more than the LF-only files: errs on refusing)."""
        measure = getattr(self.view.folder, "octets_on_disk", None)
        return measure([info.uid for info in infos]) if measure is not None else sum(info.size for info in infos)

    def _require_quota(self, name: str):
        quota = self._quota()
        if quota is None:
            raise ParseError(f"Unknown command {name}")     # not advertised: as if it did not exist
        return quota

    def _quota_line(self, quota) -> bytes | None:
        """`* QUOTA "" (...)` of the user's one quota root, None when it has no limit."""
        resources = _quota_resources(quota.status(self.user))
        return b'* QUOTA "" (' + resources + b")\r\n" if resources else None

    def do_GETQUOTAROOT(self, tag, reader, uid):
        quota = self._require_quota("GETQUOTAROOT")
        reader.sp()
        name = self._mailbox(reader)
        reader.end()

        def listed(names):
            if name not in names:
                raise NO("No such mailbox", b"NONEXISTENT")
            line = self._quota_line(quota)
            mailbox = astring(encode_mailbox(name))
            if line is None:
                # RFC 9208 §4.2.2: a mailbox without quota roots (no limits at all).
                self._write(b"* QUOTAROOT " + mailbox + b"\r\n")
            else:
                # RFC 9208 §4.1.2: every folder of the user shares the root "".
                self._write(b"* QUOTAROOT " + mailbox + b' ""\r\n' + line)
            return OK("GETQUOTAROOT completed")
        return self.account.folders().addCallback(listed)

    def do_GETQUOTA(self, tag, reader, uid):
        quota = self._require_quota("GETQUOTA")
        reader.sp()
        root = reader.astring()
        reader.end()
        line = self._quota_line(quota) if root == b"" else None
        if line is None:
            raise NO("No such quota root", b"NONEXISTENT")    # RFC 9208 §4.1.1
        self._write(line)
        return OK("GETQUOTA completed")

    def do_SETQUOTA(self, tag, reader, uid):
        self._require_quota("SETQUOTA")
        # RFC 9208 §4.1.3: SETQUOTA root (resource limit ...); parsed, so that bad syntax is BAD.
        reader.sp()
        reader.astring()
        reader.sp()
        reader.open_paren()
        if not reader.maybe(b")"):
            while True:
                reader.atom()
                reader.sp()
                if not reader.atom().isdigit():                # number64
                    raise ParseError("Expected a number")
                if reader.maybe(b")"):
                    break
                reader.sp()
        reader.leave()
        reader.end()
        # RFC 9208 §4.1.3: without QUOTASET it is not supported; limits are `mailgw quota set`'s.
        raise NO("Quotas are set by the administrator", b"NOPERM")


_OVER_QUOTA_TEXT = "Mailbox is over quota"


def _quota_resources(status: dict) -> bytes:
    """The resource list of a QUOTA response; a resource without limit is left out."""
    parts = []
    if status["bytes_limit"]:
        # RFC 9208 §5.1: STORAGE counts units of 1024 octets; usage rounded up, the limit down.
        parts.append(b"STORAGE %d %d" % (-(-status["bytes"] // 1024), max(status["bytes_limit"] // 1024, 1)))
    if status["messages_limit"]:
        parts.append(b"MESSAGE %d %d" % (status["messages"], status["messages_limit"]))    # RFC 9208 §5.2
    return b" ".join(parts)


def _pattern(raw: bytes) -> str:
    """A LIST reference or pattern: the mailbox-name encoding decoded, wildcards
    kept (INBOX's case is handled by the matcher)."""
    return decode_mailbox(raw)


_ANY = (NOT_AUTHENTICATED, AUTHENTICATED, SELECTED)
_AUTH = (AUTHENTICATED, SELECTED)
_SELECTED = (SELECTED,)
_COMMANDS = {
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
}
_UID_COMMANDS = ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE")
# RFC 3501 §7.4.1: no EXPUNGE response while answering these (we also hold
# them back for the UID forms, which the RFC would allow).
_NO_EXPUNGE = frozenset({"FETCH", "STORE", "SEARCH", "UID FETCH", "UID STORE", "UID SEARCH"})
