"""An SMTP server on StringTransport with in-memory fakes, for unit and transcript tests."""
from __future__ import annotations

import ipaddress
from pathlib import Path

from twisted.cred.checkers import AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailgw import config as config_module
from mailgw.realm import MailRealm
from mailgw.config_types import ListenerConfig
from mailgw.interfaces import ILocalStore, ISpool, IUserDB
from mailgw.smtp.inbound import Router
from mailgw.smtp.server import SMTPFactory

HOSTNAME = "mail.example.test"
USERS = {"alice@example.test": "secret", "bob@example.test": "hunter2", "postmaster@example.test": "pm"}


@implementer(IUserDB)
class FakeUserDB:
    def __init__(self, users=USERS):
        self.users = dict(users)

    def exists(self, address):
        return address in self.users

    def verify(self, address, password):
        return defer.succeed(address if self.users.get(address) == password else None)

    def addresses(self):
        return sorted(self.users)


@implementer(ICredentialsChecker)
class FakeChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, userdb):
        self.userdb = userdb
        self.attempts = []

    def requestAvatarId(self, credentials):
        try:    # as the real PasswordChecker: undecodable credentials are simply wrong
            username = credentials.username.decode()
            password = credentials.password.decode()
        except UnicodeDecodeError:
            return defer.fail(UnauthorizedLogin())
        self.attempts.append((username, getattr(credentials, "client_ip", None)))
        if self.userdb.users.get(username) == password:
            return defer.succeed(username)
        return defer.fail(UnauthorizedLogin())


@implementer(ILocalStore)
class FakeStore:
    def __init__(self):
        self.delivered = []        # (mailboxes, message)
        self.return_paths = []     # the return_path of each deliver()
        self.discarded = []
        self.fail_with = None
        self.pending = None        # set to a list to hold Deferreds instead of firing

    def deliver(self, mailboxes, message, lf=False, return_path=None):
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        self.return_paths.append(return_path)
        # Recorded in the wire form (CRLF), whichever form the server hands over.
        self.delivered.append((list(mailboxes), bytes(message).replace(b"\n", b"\r\n") if lf else bytes(message)))
        paths = [f"/fake/{m}/new/{len(self.delivered)}" for m in mailboxes]
        if self.pending is not None:
            d = defer.Deferred()
            self.pending.append((d, paths))
            return d
        return defer.succeed(paths)

    def discard(self, paths):
        self.discarded.extend(paths)


@implementer(ISpool)
class FakeSpool:
    def __init__(self):
        self.queued = []           # (queue_id, the envelope's JSON form as stored, message)
        self.discarded = []
        self.fail_with = None

    def enqueue(self, queue_id, envelope, message):
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        try:
            stored = envelope.checked_json()     # refused as the real spool refuses it
        except ValueError:
            return defer.fail()
        self.queued.append((queue_id, stored, bytes(message)))
        return defer.succeed(queue_id)

    def discard(self, queue_id):
        self.discarded.append(queue_id)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """StringTransport that records startTLS (the handshake itself is out of scope here)."""
    tls_started = False

    def startTLS(self, contextFactory):
        self.tls_started = True


def make_config(tmp: Path | None = None, *, smtp=None, queue=None, **server):
    overrides = {"server": {"hostname": HOSTNAME, "local_domains": ["example.test", "example.org"],
                            "trusted_networks": ["10.0.0.0/8", "2001:db8::/32"],
                            "data_dir": str(tmp or "/nonexistent-mailgw-test"), **server}}
    if smtp:
        overrides["smtp"] = smtp
    if queue:
        overrides["queue"] = queue
    return config_module.load(None, overrides=overrides)


class Session:
    """One SMTP session: feed bytes, read replies."""

    def __init__(self, *, role="relay", client="192.0.2.10", tls=False, starttls=True, config=None,
                 smtp=None, userdb=None, store=None, spool=None, clock=None, queue_ids=None, factory=None,
                 router=None, mail_dns=None, screen=None):
        self.clock = clock or task.Clock()
        self.config = config or make_config(smtp=smtp)
        self.userdb = userdb or FakeUserDB()
        self.store = store or FakeStore()
        self.spool = spool or FakeSpool()
        self.checker = FakeChecker(self.userdb)
        self.router = router or Router(self.config, self.userdb)
        realm = MailRealm(router=self.router, store=self.store, spool=self.spool, clock=self.clock)
        portal = Portal(realm, [self.checker, AllowAnonymousAccess()])
        listener = ListenerConfig(role=role, endpoint="tcp:0", name=role)
        ids = iter(queue_ids or (f"Q{n:015d}" for n in range(1, 10**6)))
        self.factory = factory or SMTPFactory(
            config=self.config, listener=listener, portal=portal, clock=self.clock,
            new_queue_id=lambda now: next(ids), tls_context=object() if starttls else None,
            implicit_tls=tls, mail_dns=mail_dns, screen=screen)
        ip = ipaddress.ip_address(client)
        peer = (IPv6Address if ip.version == 6 else IPv4Address)("TCP", client, 40000)
        self.transport = TLSStringTransport(peerAddress=peer)
        self.server = self.factory.buildProtocol(peer)
        self.server.makeConnection(self.transport)

    def read(self) -> list[str]:
        data = self.transport.value()
        self.transport.clear()
        return [line for line in data.decode("utf-8", "replace").split("\r\n") if line]

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.server.dataReceived(data)
        return self.read()

    def cmd(self, line: str) -> list[str]:
        return self.send(line + "\r\n")

    def last(self, line: str) -> str:
        replies = self.cmd(line)
        assert replies, f"no reply to {line!r}"
        return replies[-1]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def ehlo(self, name="client.test"):
        replies = self.cmd(f"EHLO {name}")
        assert replies[-1].startswith("250 "), replies
        return replies

    def login(self, user="alice@example.test", password="secret"):
        import base64
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.last(f"AUTH PLAIN {token}")
