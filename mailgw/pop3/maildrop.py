"""The POP3 maildrop: RFC 1939's view of one user's INBOX.

`Maildrop` is the POP3 avatar the realm hands out (a twisted.mail.pop3.IMailbox
over the user's INBOX IFolder): message numbers fixed at login, DELE marks,
UPDATE at QUIT, the maildrop lock (`MaildropLocks`) and read-ahead. The wire
protocol is in mailgw.pop3.server.
"""
from __future__ import annotations

import fcntl
import os
from io import BytesIO
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import pop3
from zope.interface import implementer

from mailgw.store.events import SEEN, MessageInfo

LOCK_FILE_NAME = "mailgw-pop3.lock"

class MaildropInUse(Exception):
    """Another POP3 session holds this maildrop (RFC 2449 §8.1.2 [IN-USE])."""


class MessageGone(Exception):
    """The message was expunged by someone else after the session's snapshot."""


READ_AHEAD_MESSAGES = 32
READ_AHEAD_OCTETS = 2 * 1024 * 1024


class MaildropLocks:
    """RFC 1939 §8: a POP3 session has exclusive access to its maildrop.

    Two layers: the addresses locked in this process (so one mailgw never
    needs a file to refuse a second session), and a non-blocking flock on
    `<mailbox dir>/mailgw-pop3.lock` against other processes. flock locks
    belong to the open file, so the lock goes away with the process however
    it dies; the file is never unlinked (unlinking a lock file races with a
    process that has just opened it). One MaildropLocks per process: the
    realm holds it, and every POP3 listener shares the realm.
    """

    def __init__(self):
        self._held: dict[str, MaildropLock] = {}

    def __contains__(self, address: str) -> bool:
        return address in self._held

    def acquire(self, address: str, directory: Path | None) -> "MaildropLock":
        """Lock now or raise MaildropInUse; OSError for trouble with the lock file.
        A few microseconds of local file work: done on the reactor thread."""
        if address in self._held:
            raise MaildropInUse(address)
        fd = None
        if directory is not None:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(directory / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MaildropInUse(address) from None
            except BaseException:
                os.close(fd)
                raise
        lock = self._held[address] = MaildropLock(self, address, fd)
        return lock

    def _forget(self, lock: "MaildropLock") -> None:
        if self._held.get(lock.address) is lock:
            del self._held[lock.address]


class MaildropLock:
    def __init__(self, locks: MaildropLocks, address: str, fd: int | None):
        self._locks = locks
        self.address = address
        self._fd = fd

    def release(self) -> None:
        self._locks._forget(self)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)        # closing the last descriptor drops the flock


@implementer(pop3.IMailbox)
class Maildrop:
    """One POP3 session's view of a user's INBOX: `pop3.IMailbox` over IFolder.

    RFC 1939 numbers the messages 1..N for the whole session: `open()` locks
    the maildrop and takes a snapshot (folder.sync(), then folder.messages());
    mail arriving later is for the next session. DELE only marks; `sync()` is
    the UPDATE state (QUIT): it expunges the marked messages and flags the
    retrieved ones \\Seen (as Dovecot does). `close()` releases the lock and is
    the realm's logout, called however the session ends; a session that ends
    without QUIT removes nothing.

    The `pop3.IMailbox` methods take 0-based indices and raise ValueError for
    a bad one, as Twisted defines them. `listMessages` gives 0 for a deleted
    message (Twisted's convention); the server uses `stat`/`undeleted`
    instead, because an empty message also has size 0.
    """

    loginDelay = 0              # RFC 2449 §6.8 LOGIN-DELAY: not advertised
    messageExpiration = None    # RFC 2449 §6.7 EXPIRE: never

    log = Logger()

    def __init__(self, mailbox, *, locks: MaildropLocks):
        self.mailbox = mailbox                  # IUserMailbox
        self.address = mailbox.address
        self._locks = locks
        self._lock: MaildropLock | None = None
        self._closed = False
        self.folder = None                      # the INBOX IFolder, after open()
        self.uidvalidity = 0
        self._messages: tuple[MessageInfo, ...] = ()
        self._deleted: set[int] = set()         # 0-based indices
        self._retrieved: set[int] = set()
        # Messages read ahead (index -> bytes, or None if gone): a client
        # downloading everything then costs one pool job per batch, not per RETR.
        self._ahead: dict[int, bytes | None] = {}
        # The next batch, read while the client downloads this one, so that a
        # RETR in order never waits for a pool job: its indices and waiters.
        self._prefetching: set[int] = set()
        self._prefetch_waiters: list[defer.Deferred] = []
        self._prefetch_failed = False           # no more background reads until a RETR's own read works

    # -- session lifecycle ---------------------------------------------------------
    def open(self) -> defer.Deferred:
        """Lock and snapshot. Fails with MaildropInUse, or whatever the store raised."""
        return defer.Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        folder = await self.mailbox.folder("INBOX")
        self._check_not_closed()
        self._lock = self._locks.acquire(self.address, self.lock_directory(folder))
        try:
            await folder.sync()
            self._check_not_closed()
            messages = tuple(folder.messages())
        except BaseException:
            self._release()
            raise
        self.folder = folder
        self.uidvalidity = folder.uidvalidity
        self._messages = messages

    def lock_directory(self, folder) -> Path | None:
        """Where the lock file goes: the user's Maildir root. IUserMailbox does
        not promise a path, so: its `path`, else the INBOX folder's `path`
        (INBOX is the root Maildir); with neither, the lock is per process only."""
        for owner in (self.mailbox, folder):
            path = getattr(owner, "path", None)
            if path is not None:
                return Path(path)
        return None

    def _check_not_closed(self) -> None:
        if self._closed:
            self._release()
            raise defer.CancelledError("POP3 session ended while opening the maildrop")

    def close(self) -> None:
        self._closed = True
        self._ahead.clear()
        self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    @property
    def locked(self) -> bool:
        return self._lock is not None

    # -- what the server asks -----------------------------------------------------
    def __len__(self) -> int:
        return len(self._messages)

    def info(self, index: int) -> MessageInfo:
        return self._messages[index]

    def is_deleted(self, index: int) -> bool:
        return index in self._deleted

    def undeleted(self) -> list[tuple[int, MessageInfo]]:
        return [(i, m) for i, m in enumerate(self._messages) if i not in self._deleted]

    def stat(self) -> tuple[int, int]:
        """RFC 1939 §5 STAT: (messages, octets), deleted ones not counted."""
        live = self.undeleted()
        return len(live), sum(m.size for _, m in live)

    def uidl(self, index: int) -> str:
        """RFC 1939 §7: 1-70 characters 0x21-0x7E, the same for the message in every
        session. UIDVALIDITY changes only when the UIDs do, so the pair is stable."""
        return f"{self.uidvalidity:08x}{self._messages[index].uid:08x}"

    def read(self, index: int, *, retrieved: bool = False) -> defer.Deferred:
        """Deferred[bytes]: the message in wire form (CRLF). MessageGone if it was expunged."""
        info = self._messages[index]

        def got(data):
            if retrieved:
                self._retrieved.add(index)
            data = bytes(data)
            if len(data) != info.size:
                self.log.warn("{address}: UID {uid} is {actual} octets, the store said {size}",
                              address=self.address, uid=info.uid, actual=len(data), size=info.size)
            return data

        def gone(failure):
            failure.trap(KeyError)
            raise MessageGone(info.uid)

        if index in self._ahead:
            data = self._ahead.pop(index)
            self._prefetch_after(index)
            return defer.fail(MessageGone(info.uid)) if data is None else defer.succeed(got(data))
        if index in self._prefetching:
            waiter = defer.Deferred()
            self._prefetch_waiters.append(waiter)
            return waiter.addCallback(lambda _: self.read(index, retrieved=retrieved))
        open_many = getattr(self.folder, "open_many", None)
        if open_many is None:
            return defer.maybeDeferred(self.folder.open, info.uid).addCallbacks(got, gone)
        # Read the next few undeleted messages too, bounded in count and octets.
        batch = self._batch(index)

        def fill(contents):
            self._prefetch_failed = False
            self._ahead.update(zip(batch[1:], contents[1:]))
            if contents[0] is None:
                raise MessageGone(info.uid)
            return got(contents[0])
        return defer.maybeDeferred(open_many, [self._messages[i].uid for i in batch]).addCallback(fill)

    def _batch(self, first: int) -> list[int]:
        """`first` and the undeleted messages after it not yet read, up to
        READ_AHEAD_MESSAGES / READ_AHEAD_OCTETS."""
        batch, total = [first], self._messages[first].size
        for following in range(first + 1, len(self._messages)):
            size = self._messages[following].size
            if len(batch) >= READ_AHEAD_MESSAGES or total + size > READ_AHEAD_OCTETS:
                break
            if following not in self._deleted and following not in self._ahead:
                batch.append(following)
                total += size
        return batch

    def _prefetch_after(self, index: int) -> None:
        """Once half the read-ahead is used, read the batch after it in the background."""
        open_many = getattr(self.folder, "open_many", None)
        if self._prefetching or self._prefetch_failed or self._closed or open_many is None:
            return
        ahead = [i for i in self._ahead if i > index]
        if len(ahead) > READ_AHEAD_MESSAGES // 2:
            return
        first = max(ahead, default=index) + 1
        while first < len(self._messages) and first in self._deleted:
            first += 1
        if first >= len(self._messages):
            return
        batch = self._batch(first)
        self._prefetching = set(batch)

        def fill(contents):
            if not self._closed:
                self._ahead.update(zip(batch, contents))

        def failed(failure):
            # Not fatal: each RETR of these messages reads it again (and reports).
            self._prefetch_failed = True
            self.log.info("{address}: read-ahead failed: {why}", address=self.address,
                          why=failure.getErrorMessage())

        def done(_):
            self._prefetching = set()
            waiters, self._prefetch_waiters = self._prefetch_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        d = defer.maybeDeferred(open_many, [self._messages[i].uid for i in batch])
        d.addCallbacks(fill, failed).addBoth(done)

    def delete(self, index: int) -> None:
        self._deleted.add(index)

    # -- twisted.mail.pop3.IMailbox ----------------------------------------------
    def _check_index(self, i) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._messages):
            raise ValueError(f"no message {i!r}")

    def listMessages(self, i=None):
        if i is None:
            return [0 if n in self._deleted else m.size for n, m in enumerate(self._messages)]
        self._check_index(i)
        return 0 if i in self._deleted else self._messages[i].size

    def getMessage(self, i):
        self._check_index(i)
        if i in self._deleted:
            raise ValueError(f"message {i} is deleted")
        return self.read(i, retrieved=True).addCallback(BytesIO)

    def getUidl(self, i):
        self._check_index(i)
        return self.uidl(i).encode("ascii")

    def deleteMessage(self, i):
        self._check_index(i)
        if i in self._deleted:
            raise ValueError(f"message {i} is already deleted")
        self.delete(i)

    def undeleteMessages(self):
        self._deleted.clear()

    def sync(self) -> defer.Deferred:
        """RFC 1939 §6 UPDATE. Deferred[int]: the number of messages removed."""
        return defer.Deferred.fromCoroutine(self._update())

    async def _update(self) -> int:
        deleted = sorted(self._messages[i].uid for i in self._deleted)
        seen = sorted(self._messages[i].uid for i in self._retrieved - self._deleted
                      if SEEN not in self._messages[i].flags)
        if seen:
            try:
                await self.folder.store_flags(seen, frozenset({SEEN}), "add")
            except Exception:
                # The mail was delivered to the client; a lost \Seen is not worth an error.
                self.log.failure("{address}: could not flag retrieved messages \\Seen", address=self.address)
        if deleted:
            await self.folder.expunge(deleted)
        self._deleted.clear()
        return len(deleted)
