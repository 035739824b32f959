"""IMAP sessions on StringTransport over an in-memory store, for unit and transcript tests.

FakeMailStore / FakeUserMailbox / FakeFolder implement the store contract
(mailgw.interfaces IMailStore / IUserMailbox / IFolder) the way the real store
promises to behave: events are published to every subscriber when a change
happens (before the caller's Deferred fires), `sync()` picks up mail an MDA
put into new/ and returns its UIDs as the caller's \\Recent, UIDs only grow.
`hold` turns the next operations into Deferreds the test fires itself, to
look at a session while a store call is in flight.
"""
from __future__ import annotations

import ipaddress
import re
import time

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from zope.interface import implementer

from mailgw.realm import MailRealm
from mailgw.config_types import ListenerConfig
from mailgw.imap.server import IMAPFactory
from mailgw.interfaces import IFolder, IMailStore, IUserMailbox
from mailgw.smtp.inbound import Router
from mailgw.store.events import DEFAULT_FOLDERS, Added, Expunged, FlagsChanged, MessageInfo, SyncResult
from smtp_harness import HOSTNAME, FakeChecker, FakeSpool, FakeStore, FakeUserDB, TLSStringTransport

BASE_TIME = 1_700_000_000.0      # 14-Nov-2023 22:13:20 +0000

SIMPLE = (b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
          b"From: Alice Example <alice@example.test>\r\n"
          b"To: bob@example.test, \"Carol, C.\" <carol@example.org>\r\n"
          b"Subject: Hello there\r\n"
          b"Message-ID: <m1@example.test>\r\n"
          b"X-Tag: first\r\n"
          b"\r\n"
          b"Hi Bob,\r\n"
          b"this is the body.\r\n")

NO_CONTENT_TYPE = b"Subject: plain\r\n\r\nno content type here\r\n"

MULTIPART = (b"From: alice@example.test\r\n"
             b"To: bob@example.test\r\n"
             b"Subject: =?UTF-8?B?R3LDvMOfZQ==?= and more\r\n"
             b"MIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n"
             b"\r\n"
             b"preamble\r\n"
             b"--XX\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: quoted-printable\r\n"
             b"\r\n"
             b"caf=C3=A9 au lait\r\n"
             b"--XX\r\n"
             b"Content-Type: application/octet-stream; name=\"a.bin\"\r\n"
             b"Content-Disposition: attachment; filename=\"a.bin\"\r\n"
             b"Content-Transfer-Encoding: base64\r\n"
             b"\r\n"
             b"AAECAw==\r\n"
             b"--XX\r\n"
             b"Content-Type: message/rfc822\r\n"
             b"\r\n"
             b"From: inner@example.org\r\n"
             b"Subject: inner\r\n"
             b"\r\n"
             b"inner body\r\n"
             b"--XX--\r\n"
             b"epilogue\r\n")

MESSAGES = {"simple": SIMPLE, "nocontenttype": NO_CONTENT_TYPE, "multipart": MULTIPART}


def crlf(message: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", message)


def _held(hold, value=None, error=None):
    """A Deferred: fired now, or parked in `hold` for the test to fire."""
    if hold is None:
        return defer.fail(error) if error is not None else defer.succeed(value)
    d = defer.Deferred()
    hold.append((d, value, error))
    return d


def release(hold: list) -> None:
    """Fire every parked Deferred, in order."""
    while hold:
        d, value, error = hold.pop(0)
        if error is not None:
            d.errback(error)
        else:
            d.callback(value)


@implementer(IFolder)
class FakeFolder:
    def __init__(self, name: str, uidvalidity: int, clock=None):
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = 1
        self._infos: list[MessageInfo] = []
        self._data: dict[int, bytes] = {}
        self._incoming: list[tuple[bytes, tuple, float]] = []
        self._listeners: list = []
        self.hold = None            # a list: park Deferreds there instead of firing
        self.opens = 0
        self.syncs = 0
        self.clock = clock

    # -- test helpers ----------------------------------------------------------
    def deliver(self, message: bytes, flags=(), internaldate=None) -> None:
        """An MDA drops a file into new/: nobody knows until someone syncs."""
        self._incoming.append((crlf(message), tuple(flags), internaldate or BASE_TIME))

    def add(self, message: bytes, flags=(), internaldate=None) -> int:
        """A change through the store (another process's APPEND, our SMTP
        delivery): published at once."""
        uid = self._insert(message, flags, internaldate)
        self._publish(Added((uid,)))
        return uid

    def flags(self, uid: int) -> frozenset:
        return next(info.flags for info in self._infos if info.uid == uid)

    def _insert(self, message, flags, internaldate) -> int:
        uid = self.uidnext
        self.uidnext += 1
        data = crlf(message)
        self._data[uid] = data
        self._infos.append(MessageInfo(uid=uid, flags=frozenset(flags), size=len(data),
                                       internaldate=internaldate or BASE_TIME))
        return uid

    def _publish(self, event) -> None:
        for listener in list(self._listeners):
            listener(event)

    # -- IFolder ------------------------------------------------------------------
    def sync(self):
        self.syncs += 1
        incoming, self._incoming = self._incoming, []
        uids = tuple(self._insert(message, flags, date) for message, flags, date in incoming)
        events = (Added(uids),) if uids else ()
        for event in events:
            self._publish(event)
        return _held(self.hold, SyncResult(recent=uids, events=events))

    def messages(self):
        return list(self._infos)

    def open(self, uid):
        self.opens += 1
        if uid not in self._data:
            return _held(self.hold, error=KeyError(uid))
        return _held(self.hold, self._data[uid])

    def open_many(self, uids):
        self.opens += len(uids)
        return _held(self.hold, [self._data.get(uid) for uid in uids])

    def store_flags(self, uids, flags, mode):
        assert mode in ("add", "remove", "replace"), mode
        flags = frozenset(flags)
        wanted = set(uids)
        result, changed = {}, []
        for index, info in enumerate(self._infos):
            if info.uid not in wanted:
                continue
            if mode == "add":
                new = info.flags | flags
            elif mode == "remove":
                new = info.flags - flags
            else:
                new = flags
            if new != info.flags:
                self._infos[index] = MessageInfo(info.uid, new, info.size, info.internaldate)
                changed.append(info.uid)
            result[info.uid] = new
        if changed:
            self._publish(FlagsChanged(tuple(changed)))
        return _held(self.hold, result)

    def expunge(self, uids):
        wanted = set(uids)
        removed = [info.uid for info in self._infos if info.uid in wanted]
        self._infos = [info for info in self._infos if info.uid not in wanted]
        for uid in removed:
            del self._data[uid]
        if removed:
            self._publish(Expunged(tuple(removed)))
        return _held(self.hold, removed)

    def append(self, message, flags=(), internaldate=None):
        uid = self._insert(message, flags, internaldate)
        self._publish(Added((uid,)))
        return _held(self.hold, uid)

    def copy(self, uids, target):
        wanted = set(uids)
        pairs = []
        for info in list(self._infos):
            if info.uid in wanted:
                pairs.append((info.uid, target._insert(self._data[info.uid], info.flags, info.internaldate)))
        if pairs:
            target._publish(Added(tuple(new for _, new in pairs)))
        return _held(self.hold, pairs)

    def subscribe(self, listener):
        self._listeners.append(listener)

    def unsubscribe(self, listener):
        self._listeners.remove(listener)

    @property
    def listeners(self) -> int:
        return len(self._listeners)


_BAD_NAME = re.compile(r"(^/|/$|//|[\x00-\x1f\x7f])")


@implementer(IUserMailbox)
class FakeUserMailbox:
    def __init__(self, address: str):
        self.address = address
        self._validity = iter(range(1000, 10**9))
        self._folders: dict[str, FakeFolder] = {"INBOX": FakeFolder("INBOX", next(self._validity))}
        for name in DEFAULT_FOLDERS:
            self._folders[name] = FakeFolder(name, next(self._validity))
        self._subscriptions: list[str] = ["INBOX", *DEFAULT_FOLDERS]

    def _check(self, name: str) -> str:
        if not isinstance(name, str) or not name or len(name) > 255 or _BAD_NAME.search(name) \
                or any(part in (".", "..") for part in name.split("/")):
            raise ValueError(f"bad folder name {name!r}")
        return "INBOX" if name.upper() == "INBOX" else name

    def folders(self):
        return defer.succeed(list(self._folders))

    def folder(self, name):
        try:
            name = self._check(name)
        except ValueError as error:
            return defer.fail(error)
        if name not in self._folders:
            return defer.fail(KeyError(name))
        return defer.succeed(self._folders[name])

    def create(self, name):
        try:
            name = self._check(name)
        except ValueError as error:
            return defer.fail(error)
        if name in self._folders:
            return defer.fail(FileExistsError(name))
        self._folders[name] = FakeFolder(name, next(self._validity))
        return defer.succeed(None)

    def delete(self, name):
        try:
            name = self._check(name)
        except ValueError as error:
            return defer.fail(error)
        if name == "INBOX":
            return defer.fail(ValueError("INBOX cannot be deleted"))
        if name not in self._folders:
            return defer.fail(KeyError(name))
        del self._folders[name]
        return defer.succeed(None)

    def rename(self, old, new):
        try:
            old, new = self._check(old), self._check(new)
        except ValueError as error:
            return defer.fail(error)
        if old not in self._folders:
            return defer.fail(KeyError(old))
        if new in self._folders:
            return defer.fail(FileExistsError(new))
        if old == "INBOX":
            # RFC 3501 §6.3.5: INBOX's messages move, INBOX stays (empty).
            inbox = self._folders["INBOX"]
            target = self._folders[new] = FakeFolder(new, next(self._validity))
            uids = [info.uid for info in inbox.messages()]
            inbox.copy(uids, target)
            inbox.expunge(uids)
            return defer.succeed(None)
        for name in [n for n in self._folders if n == old or n.startswith(old + "/")]:
            folder = self._folders.pop(name)
            folder.name = new + name[len(old):]
            self._folders[folder.name] = folder
        return defer.succeed(None)

    def subscriptions(self):
        return defer.succeed(list(self._subscriptions))

    def subscribe(self, name):
        try:
            name = self._check(name)
        except ValueError as error:
            return defer.fail(error)
        if name not in self._subscriptions:
            self._subscriptions.append(name)
        return defer.succeed(None)

    def unsubscribe(self, name):
        if name in self._subscriptions:
            self._subscriptions.remove(name)
        return defer.succeed(None)

    # test helper
    def get(self, name: str) -> FakeFolder:
        return self._folders[name]


@implementer(IMailStore)
class FakeMailStore:
    def __init__(self):
        self.boxes: dict[str, FakeUserMailbox] = {}
        self.requested: list[str] = []

    def mailbox(self, address):
        self.requested.append(address)
        if not isinstance(address, str) or address.count("@") != 1 or "/" in address or ".." in address:
            raise ValueError(f"unsafe mailbox address {address!r}")
        if address not in self.boxes:
            self.boxes[address] = FakeUserMailbox(address)
        return self.boxes[address]


class IMAPSession:
    """One IMAP session: feed bytes, read replies. Defaults to implicit TLS
    (role imaps) so that LOGIN is allowed; pass tls=False for port 143."""

    def __init__(self, *, role=None, client="192.0.2.10", tls=True, starttls=True, imap=None,
                 smtp=None, config=None, store=None, clock=None, factory=None, userdb=None, learner=None):
        self.clock = clock or task.Clock()
        self.config = config or make_imap_config(imap=imap, smtp=smtp)
        self.store = store if store is not None else FakeMailStore()
        self.userdb = userdb or FakeUserDB()
        self.checker = FakeChecker(self.userdb)
        if factory is None:
            realm = MailRealm(router=Router(self.config, self.userdb), store=FakeStore(), spool=FakeSpool(),
                              clock=self.clock, mail_store=self.store, learner=learner)
            portal = Portal(realm, [self.checker, AllowAnonymousAccess()])
            role = role or ("imaps" if tls else "imap")
            listener = ListenerConfig(role=role, endpoint="tcp:0", name=role)
            factory = IMAPFactory(config=self.config, listener=listener, portal=portal, clock=self.clock,
                                  tls_context=None if tls or not starttls else object(), implicit_tls=tls)
        self.factory = factory
        ip = ipaddress.ip_address(client)
        peer = (IPv6Address if ip.version == 6 else IPv4Address)("TCP", client, 40000)
        self.transport = TLSStringTransport(peerAddress=peer)
        self.server = factory.buildProtocol(peer)
        self.server.makeConnection(self.transport)
        self.greeting = self.read()
        self._tags = 0

    # -- raw ------------------------------------------------------------------------
    def pump(self) -> None:
        """Run every call scheduled for now (the server yields between chunks)."""
        for _ in range(100_000):
            due = [call for call in self.clock.getDelayedCalls() if call.getTime() <= self.clock.seconds()]
            if not due:
                return
            self.clock.advance(0)
        raise AssertionError("the server keeps scheduling work")

    def read_bytes(self) -> bytes:
        self.pump()
        data = self.transport.value()
        self.transport.clear()
        return data

    def read(self) -> list[str]:
        """Output lines; empty lines inside literals are kept."""
        data = self.read_bytes()
        if not data:
            return []
        lines = data.decode("utf-8", "replace").split("\r\n")
        if lines[-1] == "":
            lines.pop()
        return lines

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.server.dataReceived(data)
        return self.read()

    def cmd(self, line: str) -> list[str]:
        return self.send(line + "\r\n")

    # -- tagged --------------------------------------------------------------------
    def next_tag(self) -> str:
        self._tags += 1
        return f"a{self._tags}"

    def run(self, command: str, expect: str | None = "OK") -> list[str]:
        """Send `tag command`; the lines up to and including the tagged reply.
        With `expect`, the tagged status must be that."""
        tag = self.next_tag()
        lines = self.cmd(f"{tag} {command}")
        tagged = [line for line in lines if line.startswith(tag + " ")]
        assert tagged, f"no tagged reply to {command!r}: {lines}"
        if expect is not None:
            assert tagged[-1].startswith(f"{tag} {expect}"), f"{command!r}: {lines}"
        return lines

    def login(self, user="alice@example.test", password="secret") -> list[str]:
        return self.run(f'LOGIN "{user}" "{password}"')

    def select(self, name="INBOX") -> list[str]:
        return self.run(f"SELECT {name}")

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def mailbox(self, address="alice@example.test") -> FakeUserMailbox:
        return self.store.mailbox(address)

    def folder(self, name="INBOX", address="alice@example.test") -> FakeFolder:
        return self.mailbox(address).get(name)


def make_imap_config(*, imap=None, smtp=None):
    from mailgw import config as config_module
    overrides = {"server": {"hostname": HOSTNAME, "local_domains": ["example.test", "example.org"],
                            "trusted_networks": ["10.0.0.0/8", "2001:db8::/32"],
                            "data_dir": "/nonexistent-mailgw-test"}}
    if imap:
        overrides["imap"] = imap
    if smtp:
        overrides["smtp"] = smtp
    return config_module.load(None, overrides=overrides)


def filled(store: FakeMailStore | None = None, *, count=0, messages=(), address="alice@example.test",
           folder="INBOX") -> FakeMailStore:
    """A store whose folder holds `messages` (names from MESSAGES or bytes) and
    then `count` small numbered messages, all already synced (not \\Recent)."""
    store = store or FakeMailStore()
    target = store.mailbox(address).get(folder)
    for item in messages:
        target._insert(MESSAGES.get(item, item) if isinstance(item, str) else item, (), None)
    for number in range(1, count + 1):
        target._insert(b"Subject: message %d\r\nX-Seq: %06d\r\n\r\nbody %d\r\n" % (number, number, number),
                       (), BASE_TIME + number)
    return store


def now() -> float:
    return time.time()
