"""The POP3 server (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595) and SASL PLAIN (RFC 5034).

Our own protocol on the connection core (mailgw.session.core.LineSession),
not a subclass of Twisted's `pop3.POP3`, whose defects are everywhere
between the socket and the avatar (docs/twisted.md §3, §8.7): no STLS, a
SASL exchange that cannot do PLAIN, malformed arguments that drop the
connection, `DELE 0` deleting the last message, deleted messages still in
STAT/LIST/UIDL, per-16-KiB-chunk dot-stuffing (response injection), QUIT
answering +OK whatever the store said, USER/PASS after login, no maildrop
lock. The core owns the connection (framing, order, flow control, timers,
STLS's discard, max_errors, closing); this module adds:

- the command table (`COMMANDS`), per state (RFC 1939 §3);
- the command line bound (RFC 2449 §4: 255 octets with CRLF; AUTH lines and
  SASL responses up to 12288);
- STLS forgetting the USER name (RFC 2595 §4);
- RETR/TOP stuffing the whole message at once and writing it in one call;
- every reply produced by `reply()`.

The avatar is a `Maildrop` (mailgw.pop3.maildrop): the RFC 1939 view of
the user's INBOX, built by the realm from IMailStore.mailbox(address).
"""
from __future__ import annotations

from typing import NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import pop3

from mailgw.auth import sasl
from mailgw.config_types import Config, ListenerConfig
from mailgw.errors import log_failure
from mailgw.session.core import CommandTable, LineSession, LoginFailed, LoginUnavailable
from mailgw.session.listener import ListenerFactory
from mailgw.smtp.data import END, stuff
from mailgw.pop3.maildrop import Maildrop, MaildropInUse, MessageGone

AUTHORIZATION, SASL, TRANSACTION = "authorization", "sasl", "transaction"

# RFC 5034 §4: the 255-octet limit of RFC 2449 does not bind SASL responses;
# we allow AUTH lines (with an initial response) and responses this long.
SASL_LINE_LIMIT = 12288
# RFC 1939 §3: message numbers are decimal; more digits than this is no message of ours.
_MAX_NUMBER_DIGITS = 10

IMPLEMENTATION = "mailgw"


# -- replies ---------------------------------------------------------------------
class Reply(NamedTuple):
    """One status line: "+OK text" or "-ERR [CODE] text"."""
    ok: bool
    text: str
    # RFC 2449 §8 / RFC 3206 response code: AUTH, IN-USE, SYS/TEMP, SYS/PERM.
    code: str | None = None

    def with_text(self, text: str) -> "Reply":
        return self._replace(text=text)

    def line(self) -> str:
        parts = ["+OK" if self.ok else "-ERR"]
        if self.code:
            parts.append(f"[{self.code}]")
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


def ok(text: str = "") -> Reply:
    return Reply(True, text)


def err(text: str, code: str | None = None) -> Reply:
    return Reply(False, text, code)


# RFC 3206 §4: [AUTH] = the credentials (or the way they were sent) are the problem.
AUTH_FAILED = err("Authentication failed", "AUTH")
# RFC 2595 §2.1 / RFC 8314 §5: no cleartext passwords unless the operator allows them.
PLAINTEXT_DISALLOWED = err("Plaintext authentication disallowed on non-secure connection, use STLS first", "AUTH")
TOO_MANY_AUTH_FAILURES = err("Too many authentication failures, closing connection", "AUTH")
# RFC 2449 §8.1.2: [IN-USE] = another session holds the maildrop lock.
IN_USE = err("Mailbox is locked by another POP3 session, try again later", "IN-USE")
# RFC 3206 §4: [SYS/TEMP] = a problem on our side that should go away.
SYS_TEMP = err("Temporary server error, try again later", "SYS/TEMP")
AUTH_TEMPORARY = err("Temporary authentication failure, try again later", "SYS/TEMP")
TOO_MANY_CONNECTIONS = err("Too many connections, try again later", "SYS/TEMP")
UPDATE_FAILED = err("Deleted messages could not be removed, try again later", "SYS/TEMP")
# RFC 2449 §8.1.2: [SYS/TEMP] = temporary: we are stopping, come back later.
SHUTTING_DOWN = err("server shutting down", "SYS/TEMP")
TIMEOUT = err("Disconnected for inactivity")
SESSION_EXPIRED = err("Session time limit exceeded")
TOO_MANY_ERRORS = err("Too many errors, closing connection")
LINE_TOO_LONG = err("Line too long")
BAD_CHARACTERS = err("NUL or bare CR not allowed in commands")
UNKNOWN_COMMAND = err("Unknown command")
NOT_LOGGED_IN = err("Not logged in")
ALREADY_LOGGED_IN = err("Already logged in")
NOT_IN_TRANSACTION = err("Command not valid in this state")
BAD_ARGUMENTS = err("Syntax error in arguments")
USER_FIRST = err("Send USER first")
INVALID_NUMBER = err("Invalid message number")
NO_SUCH_MESSAGE = err("No such message")
ALREADY_DELETED = err("Message {n} already deleted")
MESSAGE_GONE = err("Message {n} was removed by another session")
TLS_ACTIVE = err("TLS already active")
TLS_UNAVAILABLE = err("STLS not available")
UNKNOWN_MECHANISM = err("Unsupported authentication mechanism")
AUTH_ABORTED = err("Authentication aborted")
BAD_BASE64 = err("Invalid base64 data")
BAD_PLAIN = err("Malformed PLAIN response")

# Not in the command table, so "-ERR Unknown command": APOP needs the
# plaintext secret (we keep argon2id hashes); RPOP, LAST and XTND are gone
# from RFC 1939.


def _line(reply: Reply) -> bytes:
    return reply.line().encode("utf-8") + b"\r\n"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def top(data: bytes, lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, and the first `lines` lines of the body."""
    if data.startswith(b"\r\n"):
        head_end = 2                       # no header fields at all
    else:
        separator = data.find(b"\r\n\r\n")
        if separator < 0:
            return data                    # no body: the whole message is header
        head_end = separator + 4
    body = data[head_end:]
    if lines == 0 or not body:
        return data[:head_end]
    parts = body.split(b"\r\n", lines)     # C speed, however large `lines` is
    if len(parts) <= lines:
        return data                        # fewer lines than asked: everything
    return data[:head_end + len(body) - len(parts[-1])]


# -- the session ---------------------------------------------------------------------
class POP3Factory(ListenerFactory):
    """One per POP3 listener (pop3 with STLS, pop3s)."""

    def __init__(self, *, config: Config, listener: ListenerConfig, portal, clock,
                 tls_context=None, implicit_tls: bool = False, metrics=None):
        if config.pop3 is None:
            raise ValueError("config.pop3 is missing: load the config with mailgw.config.load()")
        super().__init__(config=config, listener=listener, portal=portal, clock=clock, limits=config.pop3,
                         tls_context=tls_context, implicit_tls=implicit_tls, metrics=metrics)

    def make_protocol(self):
        return MailgwPOP3(self)


class MailgwPOP3(LineSession):
    log = Logger()
    protocol_name = "POP3"
    login_failure_log = "pop3 login failed"
    bare_lf_ends_line = True

    def __init__(self, factory: POP3Factory):
        super().__init__(factory)
        self._state = AUTHORIZATION
        self._user: bytes | None = None           # from USER, until PASS
        self._updating: defer.Deferred | None = None
        self.mbox: Maildrop | None = None
        self._logout = None

    # -- connection lifecycle -----------------------------------------------------
    def session_started(self):
        # RFC 1939 §4: no APOP, so no timestamp in the greeting.
        self.reply(ok(f"{self.factory.config.hostname} POP3 server ready"))

    def refusal(self) -> bytes:
        return _line(TOO_MANY_CONNECTIONS)

    def idle_timeout(self) -> float:
        return self.limits.command_timeout

    def idle_expired(self) -> bytes:
        return _line(TIMEOUT)

    def session_expired(self) -> bytes:
        return _line(SESSION_EXPIRED)

    def too_many_errors(self) -> bytes:
        return _line(TOO_MANY_ERRORS)

    def connection_ended(self):
        if self._updating is not None:
            # QUIT's UPDATE is still running: keep the lock until it is done.
            self._updating.addBoth(lambda _: self._do_logout())
        else:
            # RFC 1939 §6: without QUIT there is no UPDATE; nothing is removed.
            if self.mbox is not None and self._logout is not None:
                self.log.info("pop3 disconnect user={user} client=[{client}] without QUIT: nothing removed",
                              user=self.user, client=self.session.client_ip)
            self._do_logout()

    def shut_down(self):
        if self._updating is not None:
            return          # QUIT's UPDATE runs: its reply ends the session
        # RFC 2449 §8.1.2 / RFC 1939 §6: no unsolicited replies in POP3, so the
        # notice goes out as a reply and we close; no QUIT, so no UPDATE.
        self._close_with(SHUTTING_DOWN)

    def _close_with(self, reply: Reply | None):
        self.close(None if reply is None else _line(reply))

    # -- replies --------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        # Every send is one reply (a status line, maybe with its lines and
        # "."), or a SASL continuation ("+ "), which is not counted.
        if not self.closing:
            if data.startswith(b"+OK"):
                self.count_reply("+OK")
            elif data.startswith(b"-ERR"):
                self.count_reply("-ERR")
        super().send(data)

    def _send_line(self, text: str) -> None:
        self.send(text.encode("utf-8") + b"\r\n")

    def reply(self, reply: Reply, **fields) -> None:
        if fields:
            reply = reply.with_text(reply.text.format(**fields))
        self._send_line(reply.line())
        if not reply.ok and reply.code not in ("SYS/TEMP", "IN-USE"):
            self.count_error()

    def _reply_multiline(self, first: Reply, lines: list[str]) -> None:
        """RFC 1939 §3: a status line, lines (none starting with "." here), then "."."""
        text = "\r\n".join([first.line(), *lines, "."]) + "\r\n"
        self.send(text.encode("utf-8"))

    def internal_error(self, context):
        return SYS_TEMP

    def send_reply(self, reply, context):
        self.reply(reply)

    # -- input framing ------------------------------------------------------------
    def line_received(self, line: bytes) -> None:
        if self._state == SASL:
            self.run(self._sasl_response, line)
        else:
            self.run(self._command, line)

    def line_limit(self) -> int:
        return SASL_LINE_LIMIT

    def line_too_long(self) -> None:
        if self._state == SASL:
            self._state = AUTHORIZATION
        self.reply(LINE_TOO_LONG)

    # -- commands -----------------------------------------------------------------
    def _command(self, line: bytes):
        verb, _, rest = line.partition(b" ")
        known = verb.upper().decode("ascii", "replace")
        self.count_command(known if COMMANDS.find(known) is not None else "other")
        if len(line) + 2 > (SASL_LINE_LIMIT if verb.upper() == b"AUTH" else self.limits.max_command_line):
            return self.reply(LINE_TOO_LONG)          # RFC 2449 §4
        if b"\0" in line or b"\r" in line:
            return self.reply(BAD_CHARACTERS)
        if not verb.isalpha() or len(verb) > 8:        # bytes.isalpha: ASCII letters only
            return self.reply(UNKNOWN_COMMAND)
        verb = verb.upper().decode("ascii")
        command = COMMANDS.find(verb)
        if command is None:
            return self.reply(UNKNOWN_COMMAND)
        if self._state not in command.states:
            if self._state != TRANSACTION:
                return self.reply(NOT_LOGGED_IN)
            return self.reply(ALREADY_LOGGED_IN if verb != "STLS" else NOT_IN_TRANSACTION)
        return command.handler(self, rest)

    def _arguments(self, rest: bytes, minimum: int, maximum: int) -> list[bytes] | None:
        """RFC 1939 §3: arguments separated by spaces; None (after -ERR) for the wrong number."""
        args = rest.split()
        if not minimum <= len(args) <= maximum:
            self.reply(BAD_ARGUMENTS)
            return None
        return args

    def _auth_allowed(self) -> bool:
        return self.session.tls or self.limits.allow_plaintext_auth

    def do_CAPA(self, rest: bytes):
        # RFC 2449 §5: the list may differ between AUTHORIZATION and TRANSACTION.
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._state == AUTHORIZATION:
            if self._auth_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self.can_starttls and not self.session.tls:
                caps.append("STLS")                    # RFC 2595 §4
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        self._reply_multiline(ok("Capability list follows"), caps)

    def do_QUIT(self, rest: bytes):
        if self._state != TRANSACTION:
            return self._close_with(ok("Bye"))
        # RFC 1939 §6: UPDATE only now.
        self._updating = self.mbox.sync()
        return self._updating.addCallbacks(self._updated, self._update_failed)

    def _updated(self, removed: int):
        self._updating = None
        self.log.info("pop3 logout user={user} client=[{client}] removed={removed}",
                      user=self.user, client=self.session.client_ip, removed=removed)
        self._close_with(ok(f"Logging out, {_count(removed, 'message')} removed" if removed else "Logging out"))
        self._do_logout()

    def _update_failed(self, failure):
        self._updating = None
        log_failure(self.log, failure, "pop3 UPDATE failed for {user}", user=self.user)
        # RFC 1939 §6: "-ERR some deleted messages not removed"; the session ends anyway.
        self._close_with(UPDATE_FAILED)
        self._do_logout()

    # -- STLS (RFC 2595) -----------------------------------------------------------
    def do_STLS(self, rest: bytes):
        if rest.strip():
            return self.reply(BAD_ARGUMENTS)
        if self.session.tls:
            return self.reply(TLS_ACTIVE)
        if not self.can_starttls:
            return self.reply(TLS_UNAVAILABLE)
        self.reply(ok("Begin TLS negotiation"))
        self.start_tls()

    def tls_started(self) -> None:
        # RFC 2595 §4: forget what was said before TLS.
        self._user = None

    # -- USER/PASS (RFC 1939 §7) ---------------------------------------------------
    def do_USER(self, rest: bytes):
        if not self._auth_allowed():
            return self.reply(PLAINTEXT_DISALLOWED)
        name = rest.strip()
        if not name or len(name.split()) != 1:
            self._user = None
            return self.reply(BAD_ARGUMENTS)
        self._user = name
        # The same answer for every name: no user enumeration.
        self.reply(ok("Send PASS"))

    def do_PASS(self, rest: bytes):
        if not self._auth_allowed():
            return self.reply(PLAINTEXT_DISALLOWED)
        if self._user is None:
            return self.reply(USER_FIRST)
        user, self._user = self._user, None
        # RFC 1939 §7: the argument is the rest of the line; spaces may be part of it.
        if not rest:
            return self.reply(BAD_ARGUMENTS)
        return self._logged_in(self.log_in(user, rest, pop3.IMailbox))

    # -- AUTH (RFC 5034, SASL PLAIN RFC 4616) ---------------------------------------
    def do_AUTH(self, rest: bytes):
        if not self._auth_allowed():
            return self.reply(PLAINTEXT_DISALLOWED)
        args = rest.split()
        if not args:
            # Not in RFC 5034, but clients (and Dovecot) use the older form to list mechanisms.
            return self._reply_multiline(ok("Mechanisms follow"), ["PLAIN"])
        if len(args) > 2:
            return self.reply(BAD_ARGUMENTS)
        if args[0].upper() != b"PLAIN":
            return self.reply(UNKNOWN_MECHANISM)
        if len(args) == 1:
            self._state = SASL
            self._send_line("+ ")                      # RFC 5034 §4: empty challenge
            return None
        # RFC 5034 §4: "=" is an empty initial response.
        return self._sasl_plain(args[1])

    def _sasl_response(self, line: bytes):
        self._state = AUTHORIZATION
        if len(line) + 2 > SASL_LINE_LIMIT:
            return self.reply(LINE_TOO_LONG)
        if line == b"*":
            return self.reply(AUTH_ABORTED)          # RFC 5034 §4
        return self._sasl_plain(line)

    def _sasl_plain(self, encoded: bytes):
        try:
            login = self.log_in_plain(sasl.decode_response(encoded), pop3.IMailbox)
        except sasl.BadEncoding:
            return self.reply(BAD_BASE64)
        except sasl.MalformedPlain:
            return self.reply(BAD_PLAIN)
        return self._logged_in(login)

    def _logged_in(self, login: defer.Deferred):
        def logged_in(result):
            avatar, logout = result
            if self.closing:          # the client left meanwhile
                logout()
                return None
            opened = defer.maybeDeferred(avatar.open)
            return opened.addCallbacks(self._opened, self._open_failed,
                                       callbackArgs=(avatar, logout), errbackArgs=(avatar, logout))

        def failed(failure):
            if failure.check(LoginFailed):
                return self._refused(failure.value)
            failure.trap(LoginUnavailable)
            if not self.closing:
                self.reply(AUTH_TEMPORARY)
        return login.addCallbacks(logged_in, failed)

    def _opened(self, _, avatar: Maildrop, logout):
        if self.closing:
            logout()
            return
        self._do_logout()
        self.mbox, self._logout = avatar, logout
        self.user = avatar.address
        self._user = None
        self._state = TRANSACTION
        count, octets = avatar.stat()
        self.log.info("pop3 login user={user} client=[{client}] messages={count} tls={tls}",
                      user=self.user, client=self.session.client_ip, count=count,
                      tls="yes" if self.session.tls else "no")
        self.reply(ok(f"maildrop has {_count(count, 'message')} ({_count(octets, 'octet')})"))

    def _open_failed(self, failure, avatar, logout):
        logout()                                 # RFC 1939 §7: release before -ERR
        if self.closing:
            return
        if failure.check(MaildropInUse):
            self.log.info("pop3 maildrop of {user} in use, refusing client [{client}]",
                          user=avatar.address, client=self.session.client_ip)
            return self.reply(IN_USE)
        log_failure(self.log, failure, "cannot open the maildrop of {user}", user=avatar.address)
        self.reply(SYS_TEMP)

    def _refused(self, refused: LoginFailed):
        if self.closing:
            return
        self.reply(AUTH_FAILED if refused.lockout is None else err(refused.lockout.text, "SYS/TEMP"))
        if refused.last:
            self._close_with(TOO_MANY_AUTH_FAILURES)

    def _do_logout(self):
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    # -- TRANSACTION (RFC 1939 §5) ----------------------------------------------------
    def _message_index(self, arg: bytes, *, deleted_ok: bool = False) -> int | None:
        """0-based index of message number `arg`, or None after the -ERR."""
        if not arg.isdigit() or len(arg) > _MAX_NUMBER_DIGITS:
            self.reply(INVALID_NUMBER)
            return None
        number = int(arg)
        if not 1 <= number <= len(self.mbox):    # RFC 1939 §5: DELE 0 is no message
            self.reply(NO_SUCH_MESSAGE)
            return None
        if self.mbox.is_deleted(number - 1) and not deleted_ok:
            self.reply(ALREADY_DELETED, n=number)
            return None
        return number - 1

    def do_STAT(self, rest: bytes):
        if self._arguments(rest, 0, 0) is None:
            return
        count, octets = self.mbox.stat()
        self.reply(ok(f"{count} {octets}"))

    def do_LIST(self, rest: bytes):
        args = self._arguments(rest, 0, 1)
        if args is None:
            return
        if args:
            index = self._message_index(args[0])
            if index is not None:
                self.reply(ok(f"{index + 1} {self.mbox.info(index).size}"))
            return
        count, octets = self.mbox.stat()
        self._reply_multiline(ok(f"{_count(count, 'message')} ({_count(octets, 'octet')})"),
                              [f"{i + 1} {m.size}" for i, m in self.mbox.undeleted()])

    def do_UIDL(self, rest: bytes):
        args = self._arguments(rest, 0, 1)
        if args is None:
            return
        if args:
            index = self._message_index(args[0])
            if index is not None:
                self.reply(ok(f"{index + 1} {self.mbox.uidl(index)}"))
            return
        self._reply_multiline(ok("Unique-ID listing follows"),
                              [f"{i + 1} {self.mbox.uidl(i)}" for i, _ in self.mbox.undeleted()])

    def do_RETR(self, rest: bytes):
        args = self._arguments(rest, 1, 1)
        if args is None:
            return None
        index = self._message_index(args[0])
        if index is None:
            return None
        return self.mbox.read(index, retrieved=True).addCallbacks(
            self._send_message, self._read_failed, errbackArgs=(index,))

    def do_TOP(self, rest: bytes):
        args = self._arguments(rest, 2, 2)
        if args is None:
            return None
        index = self._message_index(args[0])
        if index is None:
            return None
        if not args[1].isdigit():
            return self.reply(BAD_ARGUMENTS)
        lines = int(args[1]) if len(args[1]) <= _MAX_NUMBER_DIGITS else 10 ** _MAX_NUMBER_DIGITS
        return self.mbox.read(index).addCallbacks(
            lambda data: self._send_message(top(data, lines)), self._read_failed, errbackArgs=(index,))

    def _send_message(self, data: bytes):
        if self.closing:
            return
        # One send for status, whole stuffed message and terminator (no
        # per-line Python work, one segment train for the client).
        self.send(b"".join([
            f"+OK {_count(len(data), 'octet')}\r\n".encode("ascii"), stuff(data), END]))

    def _read_failed(self, failure, index: int):
        if self.closing:
            return
        if failure.check(MessageGone):
            return self.reply(MESSAGE_GONE, n=index + 1)
        self.log.failure("cannot read message {n} of {user}", failure=failure, n=index + 1, user=self.user)
        self.reply(SYS_TEMP)

    def do_DELE(self, rest: bytes):
        args = self._arguments(rest, 1, 1)
        if args is None:
            return
        index = self._message_index(args[0])
        if index is None:
            return
        self.mbox.delete(index)
        self.reply(ok(f"Message {index + 1} deleted"))

    def do_RSET(self, rest: bytes):
        if self._arguments(rest, 0, 0) is None:
            return
        self.mbox.undeleteMessages()
        count, octets = self.mbox.stat()
        self.reply(ok(f"maildrop has {_count(count, 'message')} ({_count(octets, 'octet')})"))

    def do_NOOP(self, rest: bytes):
        if self._arguments(rest, 0, 0) is None:
            return
        self.reply(ok())


_AUTHORIZATION, _TRANSACTION, _BOTH = (AUTHORIZATION,), (TRANSACTION,), (AUTHORIZATION, TRANSACTION)
# RFC 1939 §3: which command is valid in which state; every other word is
# "-ERR Unknown command", in order, and counts towards max_errors.
COMMANDS = CommandTable({
    "CAPA": (MailgwPOP3.do_CAPA, _BOTH),            # RFC 2449 §5
    "QUIT": (MailgwPOP3.do_QUIT, _BOTH),
    "USER": (MailgwPOP3.do_USER, _AUTHORIZATION),
    "PASS": (MailgwPOP3.do_PASS, _AUTHORIZATION),
    "AUTH": (MailgwPOP3.do_AUTH, _AUTHORIZATION),   # RFC 5034
    "STLS": (MailgwPOP3.do_STLS, _AUTHORIZATION),   # RFC 2595 §4
    "STAT": (MailgwPOP3.do_STAT, _TRANSACTION),
    "LIST": (MailgwPOP3.do_LIST, _TRANSACTION),
    "RETR": (MailgwPOP3.do_RETR, _TRANSACTION),
    "TOP": (MailgwPOP3.do_TOP, _TRANSACTION),
    "DELE": (MailgwPOP3.do_DELE, _TRANSACTION),
    "RSET": (MailgwPOP3.do_RSET, _TRANSACTION),
    "NOOP": (MailgwPOP3.do_NOOP, _TRANSACTION),
    "UIDL": (MailgwPOP3.do_UIDL, _TRANSACTION),
})
