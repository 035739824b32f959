"""The ManageSieve server (RFC 5804) on the connection core.

Like mailgw.pop3.server, our own protocol on mailgw.session.core.LineSession:
the core owns framing, one command at a time, flow control, timers,
STARTTLS's discard, max_errors and closing; this module adds

- the command parser: atoms, quoted strings and literals (`{n+}` / `{n}`,
  RFC 5804 §1.4), a literal read straight from the input buffer and bounded
  by the script size limit (a larger one is read and dropped, never kept);
- the command table (`COMMANDS`) per state (RFC 5804 §2);
- every response produced by `Response.encode()` (RFC 5804 §1.3);
- the ScriptStore calls, each through `run_in_thread` with the user's address.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.auth import sasl
from mailgw.interfaces import ISieveAccount
from mailgw.session.core import CommandTable, LineSession, LoginFailed, LoginUnavailable
from mailgw.session.listener import ListenerFactory
from mailgw.sieve import scripts as scripts_module
from mailgw.sieve.interpreter import SUPPORTED_EXTENSIONS, Limits, compile_script

NONAUTH, AUTH, SASL = "nonauth", "auth", "sasl"
IMPLEMENTATION = "mailgw"
# RFC 5804 §1.7: MAXREDIRECTS, the redirects one script may do (the interpreter's limit).
MAX_REDIRECTS = Limits().max_redirects
# Room beyond max_script_size for a literal (a name, a SASL response).
LITERAL_SLACK = 16 * 1024
# Server strings longer than this (or with CR/LF) go out as literals.
MAX_QUOTED = 1024

_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}\Z")


class Syntax(Exception):
    """The command's arguments do not parse: NO, counted as an error."""


class Token(NamedTuple):
    kind: str          # "atom" or "string"
    value: bytes


# -- responses -------------------------------------------------------------------
def quote(text: str) -> str:
    """RFC 5804 §1.2 / §4: a quoted string, or a literal when it cannot be one."""
    if len(text) > MAX_QUOTED or any(c in text for c in "\r\n\0"):
        return f"{{{len(text.encode('utf-8'))}}}\r\n{text}"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Response(NamedTuple):
    """RFC 5804 §1.3: OK / NO / BYE [SP "(" code ")"] [SP string]."""
    kind: str
    text: str = ""
    code: str | None = None
    protocol_error: bool = False      # counts towards max_errors

    def with_text(self, text: str) -> "Response":
        return self._replace(text=text)

    def encode(self) -> bytes:
        parts = [self.kind]
        if self.code:
            parts.append(f"({self.code})")
        if self.text:
            parts.append(quote(self.text))
        return (" ".join(parts) + "\r\n").encode("utf-8")


def ok(text: str = "") -> Response:
    return Response("OK", text)


def no(text: str, code: str | None = None, *, protocol_error: bool = False) -> Response:
    return Response("NO", text, code, protocol_error)


def bye(text: str, code: str | None = None) -> Response:
    return Response("BYE", text, code)


UNKNOWN_COMMAND = no("Unknown command", protocol_error=True)
BAD_ARGUMENTS = no("Syntax error in arguments", protocol_error=True)
LINE_TOO_LONG = no("Line too long", protocol_error=True)
NOT_AUTHENTICATED = no("Authenticate first", protocol_error=True)
ALREADY_AUTHENTICATED = no("Already authenticated", protocol_error=True)
# RFC 5804 §2.1 / RFC 8314: no cleartext passwords unless the operator allows them.
ENCRYPT_NEEDED = no("Plaintext authentication disallowed, use STARTTLS first", "ENCRYPT-NEEDED")
AUTH_FAILED = no("Authentication failed")
AUTH_ABORTED = no("Authentication aborted")
BAD_BASE64 = no("Invalid base64 data", protocol_error=True)
BAD_PLAIN = no("Malformed PLAIN response", protocol_error=True)
UNKNOWN_MECHANISM = no("Unsupported authentication mechanism", protocol_error=True)
# RFC 5804 §1.3: TRYLATER = a temporary problem on our side.
AUTH_TEMPORARY = no("Temporary authentication failure, try again later", "TRYLATER")
SYS_TEMP = no("Temporary server error, try again later", "TRYLATER")
TLS_ACTIVE = no("TLS already active", protocol_error=True)
TLS_UNAVAILABLE = no("STARTTLS not available", protocol_error=True)
# RFC 5804 §1.3: QUOTA/MAXSIZE, QUOTA/MAXSCRIPTS, NONEXISTENT, ACTIVE, ALREADYEXISTS.
TOO_BIG = no("Script too large", "QUOTA/MAXSIZE")
TOO_MANY_SCRIPTS = no("Too many scripts", "QUOTA/MAXSCRIPTS")
NONEXISTENT = no("No such script", "NONEXISTENT")
IS_ACTIVE = no("Script is active", "ACTIVE")
EXISTS = no("A script of that name exists", "ALREADYEXISTS")
BAD_NAME = no("Invalid script name")
BAD_UTF8 = no("Not valid UTF-8")
TOO_MANY_CONNECTIONS = bye("Too many connections, try again later", "TRYLATER")
SHUTTING_DOWN = bye("Server shutting down", "TRYLATER")
TIMEOUT = bye("Disconnected for inactivity")
SESSION_EXPIRED = bye("Session time limit exceeded")
TOO_MANY_ERRORS = bye("Too many errors, closing connection")
TOO_MANY_AUTH_FAILURES = bye("Too many authentication failures, closing connection")


def _sync(fn, *args) -> defer.Deferred:
    return defer.maybeDeferred(fn, *args)


# -- the factory -------------------------------------------------------------------
class ManageSieveFactory(ListenerFactory):
    """One per ManageSieve listener (port 4190, STARTTLS)."""

    def __init__(self, *, config, listener, portal, clock, scripts, limits=None, tls_context=None,
                 implicit_tls: bool = False, metrics=None, run_in_thread=None):
        if limits is None:
            limits = config.pop3
        if limits is None:
            raise ValueError("no limits: config.pop3 is missing")
        super().__init__(config=config, listener=listener, portal=portal, clock=clock, limits=limits,
                         tls_context=tls_context, implicit_tls=implicit_tls, metrics=metrics)
        self.scripts = scripts
        self.run_in_thread = run_in_thread or _sync

    def make_protocol(self):
        return ManageSieveSession(self)


class ManageSieveSession(LineSession):
    log = Logger()
    protocol_name = "ManageSieve"
    login_failure_log = "managesieve login failed"

    def __init__(self, factory: ManageSieveFactory):
        super().__init__(factory)
        self.scripts = factory.scripts
        self._state = NONAUTH
        self._logout = None
        self._reset_parser()

    def _reset_parser(self) -> None:
        self._tokens: list[Token] = []
        self._literal_left: int | None = None    # octets of the literal still to read
        self._literal = bytearray()
        self._command_octets = 0
        self._oversized = False                  # a literal over the bound: read and dropped

    def literal_limit(self) -> int:
        return self.scripts.max_script_size + LITERAL_SLACK

    # -- connection lifecycle -----------------------------------------------------
    def session_started(self):
        # RFC 5804 §1.7: the capabilities are the greeting.
        self._send_capabilities()

    def refusal(self) -> bytes:
        return TOO_MANY_CONNECTIONS.encode()

    def idle_timeout(self) -> float:
        return self.limits.command_timeout

    def idle_expired(self) -> bytes:
        return TIMEOUT.encode()

    def session_expired(self) -> bytes:
        return SESSION_EXPIRED.encode()

    def too_many_errors(self) -> bytes:
        return TOO_MANY_ERRORS.encode()

    def connection_ended(self):
        self._do_logout()

    def shut_down(self):
        # RFC 5804 §1.3: BYE is how the server ends a session.
        self.close(SHUTTING_DOWN.encode())

    def _do_logout(self):
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    # -- replies ------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not self.closing:
            for kind in ("OK", "NO", "BYE"):
                if data.startswith(kind.encode()):
                    self.count_reply(kind)
                    break
        super().send(data)

    def reply(self, response: Response) -> None:
        self.send(response.encode())
        if response.protocol_error:
            self.count_error()

    def capabilities(self) -> list[str]:
        tls = self.session.tls
        lines = [f'"IMPLEMENTATION" {quote(IMPLEMENTATION)}']
        # RFC 5804 §1.7: SASL lists the mechanisms usable now; "" when none is.
        lines.append('"SASL" "PLAIN"' if tls or self.limits.allow_plaintext_auth else '"SASL" ""')
        lines.append(f'"SIEVE" {quote(" ".join(SUPPORTED_EXTENSIONS))}')
        if self.can_starttls and not tls:
            lines.append('"STARTTLS"')
        lines.append(f'"MAXREDIRECTS" "{MAX_REDIRECTS}"')
        lines.append('"VERSION" "1.0"')
        return lines

    def _send_capabilities(self) -> None:
        self.send(("\r\n".join(self.capabilities()) + "\r\nOK\r\n").encode("utf-8"))

    def error_reply(self, error: Exception, context):
        if isinstance(error, Syntax):
            return BAD_ARGUMENTS
        if isinstance(error, scripts_module.QuotaError):
            # RFC 5804 §1.3: which quota: the size or the number of scripts.
            return TOO_BIG.with_text(str(error)) if "octets" in str(error) \
                else TOO_MANY_SCRIPTS.with_text(str(error))
        if isinstance(error, scripts_module.ActiveScriptError):
            return IS_ACTIVE
        if isinstance(error, scripts_module.ExistsError):
            return EXISTS
        if isinstance(error, scripts_module.BadNameError):
            return BAD_NAME.with_text(f"Invalid script name: {error}")
        if isinstance(error, KeyError) and context == "script":
            return NONEXISTENT
        if isinstance(error, scripts_module.ScriptStoreError):
            return no(str(error))
        if isinstance(error, UnicodeDecodeError):
            return BAD_UTF8
        if isinstance(error, ValueError) and context == "script":
            # RFC 5804 §2.6: a script that does not compile: NO with the reason.
            return no(str(error))
        return None

    def internal_error(self, context):
        return SYS_TEMP

    def send_reply(self, reply, context):
        self.reply(reply)

    # -- input: lines and literals (RFC 5804 §1.4) ----------------------------------
    def line_limit(self) -> int:
        # A quoted script may double in size with escapes.
        return max(self.limits.max_command_line, 2 * self.scripts.max_script_size + 1024)

    def line_too_long(self) -> None:
        self._reset_parser()
        if self._state == SASL:
            self._state = NONAUTH
        self.reply(LINE_TOO_LONG)

    def line_received(self, line: bytes) -> None:       # unused: step() reads
        raise AssertionError("step() reads the input")

    def step(self) -> bool:
        if self._literal_left is not None:
            return self._read_literal()
        line = self.next_line()
        if line is None:
            return False
        try:
            literal = self._tokenize(line)
        except Syntax:
            self._reset_parser()
            if self._state == SASL:
                self._state = NONAUTH
            self.reply(BAD_ARGUMENTS)
            return True
        if literal is not None:
            self._command_octets += literal
            self._literal_left = literal
            if self._command_octets > self.literal_limit():
                self._oversized = True
            return True
        tokens, oversized = self._tokens, self._oversized
        self._reset_parser()
        if oversized:
            # Read and dropped: the script could not be stored anyway.
            self.reply(TOO_BIG.with_text(f"Literal exceeds the limit of {self.scripts.max_script_size} octets"))
        elif tokens or self._state == SASL:
            self.run(self._execute, tokens)
        return True

    def _read_literal(self) -> bool:
        buffer = self._buffer
        if not buffer:
            return False
        take = min(len(buffer), self._literal_left)
        if not self._oversized:
            self._literal += buffer[:take]
        del buffer[:take]
        self._scan = 0
        self._literal_left -= take
        if self._literal_left:
            return False
        self._literal_left = None
        self._tokens.append(Token("string", bytes(self._literal)))
        self._literal = bytearray()
        return True

    def _tokenize(self, line: bytes) -> int | None:
        """Append the line's tokens; the size of a literal that ends it, or None."""
        i, n = 0, len(line)
        while i < n:
            c = line[i:i + 1]
            if c == b" ":
                i += 1
            elif c == b'"':
                out = bytearray()
                i += 1
                while True:
                    if i >= n:
                        raise Syntax("unterminated string")
                    ch = line[i:i + 1]
                    if ch == b"\\":
                        if i + 1 >= n or line[i + 1:i + 2] not in (b"\\", b'"'):
                            raise Syntax("bad escape")
                        out += line[i + 1:i + 2]
                        i += 2
                    elif ch == b'"':
                        i += 1
                        break
                    else:
                        out += ch
                        i += 1
                self._tokens.append(Token("string", bytes(out)))
            elif c == b"{":
                match = _LITERAL.match(line, i)
                if match is None:
                    raise Syntax("bad literal")
                # RFC 5804 §1.4: the server sends no continuation for "{n}" either.
                return int(match.group(1))
            else:
                end = line.find(b" ", i)
                end = n if end < 0 else end
                atom = line[i:end]
                if b'"' in atom or b"{" in atom or b"\0" in atom or b"\r" in atom:
                    raise Syntax("bad atom")
                self._tokens.append(Token("atom", atom))
                i = end
        return None

    def tls_started(self) -> None:
        # CVE-2011-0411: nothing parsed in the clear survives into TLS.
        self._reset_parser()

    # -- commands -----------------------------------------------------------------
    def _execute(self, tokens: list[Token]):
        if self._state == SASL:
            return self._sasl_response(tokens)
        verb_token, args = tokens[0], tokens[1:]
        verb = verb_token.value.upper().decode("ascii", "replace") if verb_token.kind == "atom" else ""
        command = COMMANDS.find(verb) if verb.isalpha() else None
        self.count_command(verb if command is not None else "other")
        if command is None:
            return self.reply(UNKNOWN_COMMAND)
        if self._state not in command.states:
            return self.reply(NOT_AUTHENTICATED if self._state == NONAUTH else ALREADY_AUTHENTICATED)
        return command.handler(self, args)

    @staticmethod
    def _strings(args: list[Token], count: int) -> list[str]:
        if len(args) != count or any(a.kind != "string" for a in args):
            raise Syntax("wrong arguments")
        return [a.value.decode("utf-8") for a in args]

    def _store(self, fn, *args) -> defer.Deferred:
        """A ScriptStore call in the I/O pool, for the logged-in user."""
        return self.factory.run_in_thread(fn, self.user, *args)

    def do_CAPABILITY(self, args):
        if args:
            raise Syntax("no arguments")
        self._send_capabilities()

    def do_LOGOUT(self, args):
        # RFC 5804 §2.3: OK, then the server closes.
        self.close(ok("Logout completed").encode())

    def do_NOOP(self, args):
        if len(args) > 1 or (args and args[0].kind != "string"):
            raise Syntax("NOOP [tag]")
        if args:
            # RFC 5804 §2.13: the tag comes back in the TAG response code.
            tag = args[0].value
            self.send(b"OK (TAG {%d}\r\n%s) \"Done\"\r\n" % (len(tag), tag))
            return None
        self.reply(ok("Done"))

    def do_STARTTLS(self, args):
        if args:
            raise Syntax("no arguments")
        if self.session.tls:
            return self.reply(TLS_ACTIVE)
        if not self.can_starttls:
            return self.reply(TLS_UNAVAILABLE)
        self.reply(ok("Begin TLS negotiation now"))
        self.start_tls()
        # RFC 5804 §2.2: after the TLS negotiation the server re-sends its capabilities.
        self._send_capabilities()

    # -- AUTHENTICATE (RFC 5804 §2.1, SASL PLAIN RFC 4616) -----------------------------
    def do_AUTHENTICATE(self, args):
        if not args or len(args) > 2 or any(a.kind != "string" for a in args):
            raise Syntax("AUTHENTICATE mechanism [initial-response]")
        if args[0].value.upper() != b"PLAIN":
            return self.reply(UNKNOWN_MECHANISM)
        if not (self.session.tls or self.limits.allow_plaintext_auth):
            # RFC 5804 §2.1: ENCRYPT-NEEDED: this mechanism needs TLS first.
            return self.reply(ENCRYPT_NEEDED)
        if len(args) == 1:
            # RFC 5804 §2.1: the empty challenge is an empty string.
            self._state = SASL
            self.send(b'""\r\n')
            return None
        return self._sasl_plain(args[1].value)

    def _sasl_response(self, tokens: list[Token]):
        self._state = NONAUTH
        if len(tokens) != 1 or tokens[0].kind != "string":
            return self.reply(BAD_ARGUMENTS)
        if tokens[0].value == b"*":
            # RFC 5804 §2.1: "*" aborts the exchange with NO.
            return self.reply(AUTH_ABORTED)
        return self._sasl_plain(tokens[0].value)

    def _sasl_plain(self, encoded: bytes):
        try:
            login = self.log_in_plain(sasl.decode_response(encoded), ISieveAccount)
        except sasl.BadEncoding:
            return self.reply(BAD_BASE64)
        except sasl.MalformedPlain:
            return self.reply(BAD_PLAIN)

        def logged_in(result):
            avatar, logout = result
            if self.closing:
                logout()
                return
            self._do_logout()
            self._logout = logout
            self.user = avatar.address
            self._state = AUTH
            self.log.info("managesieve login user={user} client=[{client}] tls={tls}", user=self.user,
                          client=self.session.client_ip, tls="yes" if self.session.tls else "no")
            self.reply(ok("Logged in"))

        def failed(failure):
            if self.closing:
                return
            if failure.check(LoginFailed):
                refused = failure.value
                self.reply(AUTH_FAILED if refused.lockout is None else no(refused.lockout.text, "TRYLATER"))
                if refused.last:
                    self.close(TOO_MANY_AUTH_FAILURES.encode())
                return
            failure.trap(LoginUnavailable)
            self.reply(AUTH_TEMPORARY)
        return login.addCallbacks(logged_in, failed)

    def do_UNAUTHENTICATE(self, args):
        if args:
            raise Syntax("no arguments")
        # RFC 5804 §2.14: back to the non-authenticated state.
        self._do_logout()
        self.user = None
        self._state = NONAUTH
        self.reply(ok())

    # -- script commands (RFC 5804 §2.3-§2.12) -------------------------------------------
    def _script_call(self, fn, *args, text: str = ""):
        def done(_):
            if not self.closing:
                self.reply(ok(text))
        return self._store(fn, *args).addCallback(done)

    def do_HAVESPACE(self, args):
        if len(args) != 2 or args[0].kind != "string" or args[1].kind != "atom" \
                or not args[1].value.isdigit() or len(args[1].value) > 10:
            raise Syntax("HAVESPACE name size")
        name = args[0].value.decode("utf-8")
        return self._script_call(self.scripts.have_space, name, int(args[1].value))

    def do_PUTSCRIPT(self, args):
        name, text = self._strings(args, 2)
        return self._script_call(self.scripts.put, name, text)

    def do_CHECKSCRIPT(self, args):
        (text,) = self._strings(args, 1)
        size = len(text.encode("utf-8"))
        if size > self.scripts.max_script_size:
            return self.reply(TOO_BIG)

        def check():
            compile_script(text, max_size=self.scripts.max_script_size)
        d = self.factory.run_in_thread(check)

        def done(_):
            if not self.closing:
                self.reply(ok())
        return d.addCallback(done)

    def do_LISTSCRIPTS(self, args):
        if args:
            raise Syntax("no arguments")

        def listed(names):
            if self.closing:
                return
            lines = [quote(name) + (" ACTIVE" if active else "") for name, active in names]
            self.send(("".join(line + "\r\n" for line in lines) + "OK\r\n").encode("utf-8"))
        return self._store(self.scripts.list).addCallback(listed)

    def do_SETACTIVE(self, args):
        (name,) = self._strings(args, 1)
        return self._script_call(self.scripts.set_active, name)

    def do_GETSCRIPT(self, args):
        (name,) = self._strings(args, 1)

        def got(text):
            if self.closing:
                return
            data = text.encode("utf-8")
            # RFC 5804 §2.9: the script as a literal, then OK.
            self.send(b"{%d}\r\n%s\r\nOK\r\n" % (len(data), data))
        return self._store(self.scripts.get, name).addCallback(got)

    def do_DELETESCRIPT(self, args):
        (name,) = self._strings(args, 1)
        return self._script_call(self.scripts.delete, name)

    def do_RENAMESCRIPT(self, args):
        old, new = self._strings(args, 2)
        return self._script_call(self.scripts.rename, old, new)

    def command_failed(self, failure, context):
        # Every script command's errors (KeyError = no such script, ValueError
        # = the script does not compile) are named in the "script" context.
        super().command_failed(failure, "script" if self._state == AUTH else context)


_NONAUTH, _AUTH, _BOTH = (NONAUTH,), (AUTH,), (NONAUTH, AUTH)
# RFC 5804 §2: which command is valid in which state; anything else is NO.
COMMANDS = CommandTable({
    "CAPABILITY": (ManageSieveSession.do_CAPABILITY, _BOTH),       # RFC 5804 §2.4
    "LOGOUT": (ManageSieveSession.do_LOGOUT, _BOTH),               # RFC 5804 §2.3
    "NOOP": (ManageSieveSession.do_NOOP, _BOTH),                   # RFC 5804 §2.13
    "STARTTLS": (ManageSieveSession.do_STARTTLS, _NONAUTH),        # RFC 5804 §2.2
    "AUTHENTICATE": (ManageSieveSession.do_AUTHENTICATE, _NONAUTH),  # RFC 5804 §2.1
    "UNAUTHENTICATE": (ManageSieveSession.do_UNAUTHENTICATE, _AUTH),  # RFC 5804 §2.14
    "HAVESPACE": (ManageSieveSession.do_HAVESPACE, _AUTH),         # RFC 5804 §2.5
    "PUTSCRIPT": (ManageSieveSession.do_PUTSCRIPT, _AUTH),         # RFC 5804 §2.6
    "LISTSCRIPTS": (ManageSieveSession.do_LISTSCRIPTS, _AUTH),     # RFC 5804 §2.7
    "SETACTIVE": (ManageSieveSession.do_SETACTIVE, _AUTH),         # RFC 5804 §2.8
    "GETSCRIPT": (ManageSieveSession.do_GETSCRIPT, _AUTH),         # RFC 5804 §2.9
    "DELETESCRIPT": (ManageSieveSession.do_DELETESCRIPT, _AUTH),   # RFC 5804 §2.10
    "RENAMESCRIPT": (ManageSieveSession.do_RENAMESCRIPT, _AUTH),   # RFC 5804 §2.11
    "CHECKSCRIPT": (ManageSieveSession.do_CHECKSCRIPT, _AUTH),     # RFC 5804 §2.12
})
