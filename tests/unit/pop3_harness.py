"""A POP3 server on StringTransport with an in-memory mail store, for unit and transcript tests.

FakeMailStore / FakeUserMailbox / FakeFolder implement the store contract of
mailgw.interfaces (IMailStore, IUserMailbox, IFolder) in memory; they pass
verifyObject, so the server is tested against the interface, not against the
real Maildir store.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailgw import config as config_module
from mailgw.realm import MailRealm
from mailgw.config_types import ListenerConfig
from mailgw.interfaces import IFolder, IMailStore, IUserMailbox
from mailgw.pop3.server import POP3Factory
from mailgw.smtp.inbound import Router
from mailgw.store.events import Added, Expunged, FlagsChanged, MessageInfo, SyncResult
from smtp_harness import FakeChecker, FakeSpool, FakeStore, FakeUserDB

HOSTNAME = "mail.example.test"
ALICE = "alice@example.test"


@implementer(IFolder)
class FakeFolder:
    """One folder in memory. Messages are kept in wire form (CRLF).

    `fail` maps a method name ("sync", "open", "expunge", "store_flags") to an
    exception its Deferred fails with; `hold` (a list) makes every Deferred
    wait there until the test fires it: `folder.release()`.
    """

    def __init__(self, name="INBOX", uidvalidity=1234567, messages=()):
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = 1
        self._messages: dict[int, tuple[bytes, frozenset, float]] = {}
        self._listeners = []
        self.fail: dict[str, Exception] = {}
        self.hold: list | None = None
        self.calls: list[tuple] = []
        self.on_disk: list[bytes] = []         # appended but not yet picked up by sync()
        for message in messages:
            self.add(message)

    # -- test helpers -------------------------------------------------------------
    def add(self, message: bytes, flags=()) -> int:
        uid = self.uidnext
        self.uidnext += 1
        self._messages[uid] = (bytes(message), frozenset(flags), 1.7e9 + uid)
        return uid

    def deliver_later(self, message: bytes) -> None:
        """Another process delivered: seen by the next sync()."""
        self.on_disk.append(bytes(message))

    def remove(self, uid: int) -> None:
        """Someone else (an IMAP session) expunged it."""
        del self._messages[uid]

    def flags(self, uid: int) -> frozenset:
        return self._messages[uid][1]

    @property
    def uids(self) -> list[int]:
        return sorted(self._messages)

    def release(self) -> None:
        held, self.hold = self.hold or [], []
        for d, result in held:
            if isinstance(result, Exception):
                d.errback(result)
            else:
                d.callback(result)

    def _result(self, method: str, result):
        if method in self.fail:
            result = self.fail[method]
        if self.hold is not None:
            d = defer.Deferred()
            self.hold.append((d, result))
            return d
        return defer.fail(result) if isinstance(result, Exception) else defer.succeed(result)

    def _publish(self, event) -> None:
        for listener in list(self._listeners):
            listener(event)

    # -- IFolder ------------------------------------------------------------------
    def sync(self):
        self.calls.append(("sync",))
        added = tuple(self.add(message) for message in self.on_disk)
        self.on_disk = []
        events = (Added(added),) if added else ()
        for event in events:
            self._publish(event)
        return self._result("sync", SyncResult(recent=added, events=events))

    def messages(self):
        return [MessageInfo(uid=uid, flags=flags, size=len(data), internaldate=date)
                for uid, (data, flags, date) in sorted(self._messages.items())]

    def open(self, uid):
        self.calls.append(("open", uid))
        if uid not in self._messages:
            return self._result("open", KeyError(uid))
        return self._result("open", self._messages[uid][0])

    def open_many(self, uids):
        self.calls.append(("open_many", tuple(uids)))
        return self._result("open_many", [self._messages[uid][0] if uid in self._messages else None
                                          for uid in uids])

    def store_flags(self, uids, flags, mode):
        self.calls.append(("store_flags", tuple(uids), frozenset(flags), mode))
        if "store_flags" in self.fail:
            return self._result("store_flags", None)
        result = {}
        for uid in uids:
            if uid not in self._messages:
                continue
            data, old, date = self._messages[uid]
            new = {"add": old | set(flags), "remove": old - set(flags), "replace": frozenset(flags)}[mode]
            self._messages[uid] = (data, frozenset(new), date)
            result[uid] = frozenset(new)
        if result:
            self._publish(FlagsChanged(tuple(sorted(result))))
        return self._result("store_flags", result)

    def expunge(self, uids):
        self.calls.append(("expunge", tuple(uids)))
        if "expunge" in self.fail:
            return self._result("expunge", None)
        removed = [uid for uid in uids if self._messages.pop(uid, None) is not None]
        if removed:
            self._publish(Expunged(tuple(removed)))
        return self._result("expunge", removed)

    def append(self, message, flags=(), internaldate=None):
        uid = self.add(bytes(message).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), flags)
        self._publish(Added((uid,)))
        return self._result("append", uid)

    def copy(self, uids, target):
        pairs = [(uid, target.add(self._messages[uid][0], self._messages[uid][1]))
                 for uid in sorted(uids) if uid in self._messages]
        return self._result("copy", pairs)

    def subscribe(self, listener):
        self._listeners.append(listener)

    def unsubscribe(self, listener):
        self._listeners.remove(listener)


@implementer(IUserMailbox)
class FakeUserMailbox:
    def __init__(self, address: str, path: Path | None = None):
        self.address = address
        self.path = path                # the real store's Maildir root: the POP3 lock file lives there
        self._folders = {"INBOX": FakeFolder("INBOX")}
        for name in ("Drafts", "Sent", "Junk", "Trash"):
            self._folders[name] = FakeFolder(name)
        self._subscriptions: set[str] = set()
        self.fail_folder: Exception | None = None

    @property
    def inbox(self) -> FakeFolder:
        return self._folders["INBOX"]

    def _key(self, name: str) -> str:
        return "INBOX" if name.upper() == "INBOX" else name

    def folders(self):
        return defer.succeed(list(self._folders))

    def folder(self, name):
        if self.fail_folder is not None:
            return defer.fail(self.fail_folder)
        key = self._key(name)
        if key not in self._folders:
            return defer.fail(KeyError(name))
        return defer.succeed(self._folders[key])

    def create(self, name):
        if self._key(name) in self._folders:
            return defer.fail(FileExistsError(name))
        self._folders[name] = FakeFolder(name)
        return defer.succeed(None)

    def delete(self, name):
        if self._key(name) == "INBOX":
            return defer.fail(ValueError("INBOX cannot be deleted"))
        self._folders.pop(name)
        return defer.succeed(None)

    def rename(self, old, new):
        self._folders[new] = self._folders.pop(self._key(old))
        return defer.succeed(None)

    def subscriptions(self):
        return defer.succeed(sorted(self._subscriptions))

    def subscribe(self, name):
        self._subscriptions.add(name)
        return defer.succeed(None)

    def unsubscribe(self, name):
        self._subscriptions.discard(name)
        return defer.succeed(None)


@implementer(IMailStore)
class FakeMailStore:
    def __init__(self, root: Path | None = None):
        self.root = root                # with a root, mailboxes have a path (and a lock file)
        self.mailboxes: dict[str, FakeUserMailbox] = {}

    def mailbox(self, address):
        if "@" not in address or "/" in address:
            raise ValueError(address)
        if address not in self.mailboxes:
            local, domain = address.split("@")
            path = self.root / domain / local if self.root is not None else None
            self.mailboxes[address] = FakeUserMailbox(address, path)
        return self.mailboxes[address]

    def inbox(self, address: str = ALICE) -> FakeFolder:
        return self.mailbox(address).inbox


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """StringTransport that records startTLS (the handshake itself is out of scope here)."""
    tls_started = False

    def startTLS(self, contextFactory):
        self.tls_started = True

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


def make_config(*, pop3=None, **server):
    overrides = {"server": {"hostname": HOSTNAME, "local_domains": ["example.test"],
                            "data_dir": "/nonexistent-mailgw-test", **server}}
    if pop3:
        overrides["pop3"] = pop3
    return config_module.load(None, overrides=overrides)


class World:
    """What several sessions share: config, users, checker, realm (with its locks), store, clock."""

    def __init__(self, *, pop3=None, store=None, clock=None, userdb=None):
        self.clock = clock or task.Clock()
        self.config = make_config(pop3=pop3)
        self.userdb = userdb or FakeUserDB()
        self.store = store or FakeMailStore()
        self.checker = FakeChecker(self.userdb)
        self.realm = MailRealm(router=Router(self.config, self.userdb), store=FakeStore(), spool=FakeSpool(),
                               clock=self.clock, mail_store=self.store)
        self.portal = Portal(self.realm, [self.checker, AllowAnonymousAccess()])
        self.factories: dict[tuple, POP3Factory] = {}

    def factory(self, role="pop3", starttls=True, tls=False) -> POP3Factory:
        key = (role, starttls, tls)
        if key not in self.factories:
            listener = ListenerConfig(role=role, endpoint="tcp:0", name=role)
            self.factories[key] = POP3Factory(config=self.config, listener=listener, portal=self.portal,
                                              clock=self.clock, tls_context=object() if starttls else None,
                                              implicit_tls=tls)
        return self.factories[key]

    def session(self, **kwargs) -> "Session":
        return Session(world=self, **kwargs)


class Session:
    """One POP3 session: feed bytes, read reply lines."""

    def __init__(self, *, role="pop3", client="192.0.2.10", tls=False, starttls=True, plaintext=False,
                 pop3=None, world: World | None = None, store=None, clock=None):
        if world is None:
            limits = dict(pop3 or {})
            if plaintext:
                limits["allow_plaintext_auth"] = True
            world = World(pop3=limits or None, store=store, clock=clock)
        self.world = world
        self.clock = world.clock
        self.store = world.store
        self.checker = world.checker
        self.factory = world.factory(role=role, starttls=starttls, tls=tls)
        ip = ipaddress.ip_address(client)
        peer = (IPv6Address if ip.version == 6 else IPv4Address)("TCP", client, 40000)
        self.transport = TLSStringTransport(peerAddress=peer)
        self.server = self.factory.buildProtocol(peer)
        self.server.makeConnection(self.transport)

    @property
    def inbox(self) -> FakeFolder:
        return self.store.inbox(ALICE)

    def raw(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def read(self) -> list[str]:
        """Reply lines; empty lines (inside RETR/TOP) are kept."""
        text = self.raw().decode("utf-8", "replace")
        lines = text.split("\r\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines

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

    def disconnect(self) -> None:
        """The client went away (no QUIT)."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        self.transport.disconnecting = True
        self.server.connectionLost(Failure(ConnectionDone()))

    def login(self, user=ALICE, password="secret") -> str:
        """USER/PASS; on port 110 without allow_plaintext_auth, STLS first."""
        if not self.server.session.tls and not self.factory.limits.allow_plaintext_auth:
            assert self.last("STLS") == "+OK Begin TLS negotiation"
        assert self.last(f"USER {user}") == "+OK Send PASS"
        return self.last(f"PASS {password}")
