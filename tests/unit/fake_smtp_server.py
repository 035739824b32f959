"""A tiny in-process SMTP server on 127.0.0.1 for outbound-delivery tests.

It records every session (commands, TLS, AUTH) and every completed
transaction (MAIL args, accepted RCPT args, the message after un-stuffing),
and can be told what to answer at any stage:

    replies={"greeting": "421 4.3.2 busy", "rcpt:bob@example.net": "550 5.1.1 no such user",
             "rcpt": "451 4.3.0 try later", "mail": ..., "data": ..., "eom": ..., "ehlo": ...,
             "starttls": ..., "auth": ...}

A reply value "drop" closes the connection instead of answering. It parses
DATA the way a conforming server does (end only at CRLF.CRLF, one leading dot
removed) and goes on executing whatever follows, so a smuggled transaction
would show up as an extra entry in `transactions`.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory


@dataclass
class Transaction:
    mail: str                      # what followed "MAIL FROM:"
    rcpts: list[str] = field(default_factory=list)       # accepted, what followed "RCPT TO:"
    refused: list[str] = field(default_factory=list)
    data: bytes | None = None      # the message after un-stuffing, CRLF line ends
    tls: bool = False
    auth: str | None = None


@dataclass
class Session:
    tls: bool
    commands: list[tuple[bool, str]] = field(default_factory=list)   # (inside TLS, line)
    auth_user: str | None = None
    transactions: list[Transaction] = field(default_factory=list)
    closed: defer.Deferred = field(default_factory=defer.Deferred)

    def verbs(self) -> list[str]:
        return [line.split(" ", 1)[0].upper() for _, line in self.commands]


class FakeSMTPProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        server = self.factory.server
        self.server = server
        self.session = Session(tls=server.implicit)
        server.sessions.append(self.session)
        server.connections.append(self)
        self.mode = "command"
        self.transaction: Transaction | None = None
        self.auth_login: list[str] | None = None
        self.auth_plain_pending = False
        if not self._override("greeting"):
            self.say(f"220 {server.name} ESMTP fake")

    def connectionLost(self, reason=None):
        if self in self.server.connections:
            self.server.connections.remove(self)
        if not self.session.closed.called:
            self.session.closed.callback(None)

    def say(self, text: str):
        self.transport.write(text.encode("utf-8") + b"\r\n")

    def _override(self, stage: str) -> bool:
        reply = self.server.replies.get(stage)
        if reply is None:
            return False
        if reply == "drop":
            self.transport.abortConnection()
        elif reply != "hang":
            self.say(reply)
        return True

    # --- lines

    def lineReceived(self, line: bytes):
        if self.mode == "data":
            return self._data_line(line)
        text = line.decode("utf-8", "replace")
        self.session.commands.append((self.session.tls, text))
        if self.auth_login is not None or self.auth_plain_pending:
            return self._auth_continue(text)
        verb, _, rest = text.partition(" ")
        handler = getattr(self, "do_" + verb.upper(), None)
        if handler is None:
            return self.say("500 5.5.2 Command unrecognized")
        handler(rest)

    def do_EHLO(self, rest):
        self.transaction = None
        if self._override("ehlo"):
            return
        lines = [self.server.name] + self.server.ehlo_keywords(self.session.tls)
        for line in lines[:-1]:
            self.say("250-" + line)
        self.say("250 " + lines[-1])

    def do_HELO(self, rest):
        self.transaction = None
        if not self._override("helo"):
            self.say(f"250 {self.server.name}")

    def do_NOOP(self, rest):
        self.say("250 2.0.0 Ok")

    def do_RSET(self, rest):
        self.transaction = None
        self.say("250 2.0.0 Ok")

    def do_QUIT(self, rest):
        self.say("221 2.0.0 Bye")
        self.transport.loseConnection()

    def do_STARTTLS(self, rest):
        server = self.server
        if server.tls_options is None or self.session.tls or not server.starttls:
            return self.say("502 5.5.1 Not implemented")
        if self._override("starttls"):
            return
        if server.starttls_break == "close":
            self.say("220 2.0.0 Ready to start TLS")
            return self.transport.loseConnection()
        if server.starttls_break == "garbage":
            self.say("220 2.0.0 Ready to start TLS")
            self.transport.write(b"this is not a TLS handshake\r\n" * 10)
            return self.transport.loseConnection()
        self.transport.write(b"220 2.0.0 Ready to start TLS\r\n" + server.inject_after_starttls)
        self.transport.startTLS(server.tls_options)
        self.clearLineBuffer()                 # RFC 3207 §4.2: nothing from before TLS survives
        self.session.tls = True
        self.transaction = None

    def do_AUTH(self, rest):
        if self._override("auth"):
            return
        mechanism, _, initial = rest.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN" and "PLAIN" in self.server.auth_mechanisms:
            if not initial:
                self.auth_plain_pending = True
                return self.say("334 ")
            return self._auth_plain(initial)
        if mechanism == "LOGIN" and "LOGIN" in self.server.auth_mechanisms:
            self.auth_login = []
            return self.say("334 VXNlcm5hbWU6")
        self.say("504 5.5.4 Unrecognized authentication mechanism")

    def _auth_continue(self, text):
        if text == "*":
            self.auth_login = None
            self.auth_plain_pending = False
            return self.say("501 5.7.0 Authentication aborted")
        if self.auth_plain_pending:
            self.auth_plain_pending = False
            return self._auth_plain(text)
        self.auth_login.append(base64.b64decode(text).decode())
        if len(self.auth_login) == 1:
            return self.say("334 UGFzc3dvcmQ6")
        user, password = self.auth_login
        self.auth_login = None
        self._auth_result(user, password)

    def _auth_plain(self, token):
        _, user, password = base64.b64decode(token).decode().split("\0")
        self._auth_result(user, password)

    def _auth_result(self, user, password):
        if self.server.users.get(user) == password:
            self.session.auth_user = user
            self.say("235 2.7.0 Authentication successful")
        else:
            self.say("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, rest):
        if self._override("mail"):
            return
        self.transaction = Transaction(mail=rest[len("FROM:"):], tls=self.session.tls,
                                       auth=self.session.auth_user)
        self.say("250 2.1.0 Ok")

    def do_RCPT(self, rest):
        if self.transaction is None:
            return self.say("503 5.5.1 Need MAIL command")
        args = rest[len("TO:"):]
        address = args.split(">", 1)[0].lstrip("<")
        reply = self.server.replies.get(f"rcpt:{address}", self.server.replies.get("rcpt"))
        if reply == "drop":
            return self.transport.abortConnection()
        reply = reply or "250 2.1.5 Ok"
        (self.transaction.rcpts if reply.startswith("2") else self.transaction.refused).append(args)
        self.say(reply)

    def do_DATA(self, rest):
        if self.transaction is None or not self.transaction.rcpts:
            return self.say("554 5.5.1 No valid recipients")
        if self._override("data"):
            return
        self.mode = "data"
        self.lines: list[bytes] = []
        self.say("354 End data with <CR><LF>.<CR><LF>")

    def _data_line(self, line: bytes):
        if self.server.drop_in_data:
            return self.transport.abortConnection()
        if line == b".":
            self.mode = "command"
            self.transaction.data = b"".join(part + b"\r\n" for part in self.lines)
            self.session.transactions.append(self.transaction)
            self.transaction = None
            if not self._override("eom"):
                self.say("250 2.0.0 Ok: queued")
            return
        self.lines.append(line[1:] if line.startswith(b".") else line)


class FakeSMTPServer:
    def __init__(self, reactor, *, name="mx.example.net", tls_options=None, starttls=True, implicit=False,
                 extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"), users=None,
                 auth_mechanisms=("PLAIN", "LOGIN"), replies=None, starttls_break=None,
                 inject_after_starttls=b"", drop_in_data=False):
        self.reactor = reactor
        self.name = name
        self.tls_options = tls_options
        self.starttls = starttls
        self.implicit = implicit
        self.extensions = list(extensions)
        self.users = dict(users or {})
        self.auth_mechanisms = tuple(auth_mechanisms)
        self.replies = dict(replies or {})
        self.starttls_break = starttls_break
        self.inject_after_starttls = inject_after_starttls
        self.drop_in_data = drop_in_data
        self.sessions: list[Session] = []
        self.connections: list[FakeSMTPProtocol] = []
        self.port = None

    def ehlo_keywords(self, tls: bool) -> list[str]:
        keywords = list(self.extensions)
        if self.tls_options is not None and self.starttls and not tls:
            keywords.append("STARTTLS")
        if self.users:
            keywords.append("AUTH " + " ".join(self.auth_mechanisms))
        return keywords

    @property
    def transactions(self) -> list[Transaction]:
        return [t for s in self.sessions for t in s.transactions]

    def start(self) -> int:
        factory = Factory.forProtocol(FakeSMTPProtocol)
        factory.server = self
        if self.implicit:
            factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self.port.getHost().port

    def stop(self) -> defer.Deferred:
        waits = [defer.maybeDeferred(self.port.stopListening)] if self.port is not None else []
        for connection in list(self.connections):
            connection.transport.abortConnection()
        waits.extend(session.closed for session in self.sessions)
        return defer.DeferredList(waits)
