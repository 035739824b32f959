"""The mailbox store: every user's Maildir folders (IMailStore, IUserMailbox).

Layout, names and files: docs/store-format.md. POP3 and IMAP both reach the
messages through `MailStore.mailbox(address).folder(name)`, which returns the
one `Folder` object of that folder in this process.
"""
from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path
from weakref import WeakValueDictionary

from twisted.internet.defer import fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.durable import DurableWriter, _OSCalls, fsync_directory, read_file
from mailgw.interfaces import IMailStore, IUserMailbox
from mailgw.store import index as ix
from mailgw.store.events import DEFAULT_FOLDERS
from mailgw.store.folder import Folder
from mailgw.store.maildir import MAILDIR_SUBDIRECTORIES, split_mailbox_address
from mailgw.store.names import INBOX, NAME_MAX, decode_dirname, folder_dirname
from mailgw.store.quota import folder_usage

SUBSCRIPTIONS_HEADER = b"mailgw-subscriptions 1\n"
# Folders kept loaded after their last user left (MailStore._recent): at most
# this many, holding at most this many messages together (~0.5 KiB each).
KEEP_FOLDERS = 16
KEEP_MESSAGES = 100_000


# -- the store ------------------------------------------------------------------------------

@implementer(IMailStore)
class MailStore:
    """All users' mailboxes under `mail_dir` (the MaildirStore's directory).

    `threadpool` is started and stopped by its owner; every blocking file
    operation runs there through deferToThreadPool(reactor, threadpool, ...).
    `clock` (default: reactor) drives the poll of folders with subscribers.
    `quota` (mailgw.store.quota.IQuota or None) is told what appends,
    copies, expunges and folder deletions change; IMAP reaches it as
    `UserMailbox.quota`."""

    log = Logger()

    def __init__(self, mail_dir: Path, *, reactor, threadpool, writer: DurableWriter, clock=None,
                 poll_interval: float = 1.0, quota=None):
        self._mail_dir = Path(mail_dir)
        self.quota = quota
        self._reactor = reactor
        self._pool = threadpool
        self._writer = writer
        self._clock = clock if clock is not None else reactor
        self._poll_interval = poll_interval
        # Seams for tests: the OS calls of durable writes (index, appends), and reading a message.
        self._os = _OSCalls()
        self._read = read_file
        # One object per mailbox / folder while anyone holds it.
        self._mailboxes: WeakValueDictionary = WeakValueDictionary()
        self._folders: WeakValueDictionary = WeakValueDictionary()
        # The folders used last stay loaded after their last session has gone,
        # so a client that reconnects (most do, per command or per check)
        # revalidates a snapshot (two stats and a header read) instead of
        # parsing the index again. Bounded in folders and in messages.
        self._recent: OrderedDict[tuple[str, str], Folder] = OrderedDict()
        self._ready: set[str] = set()         # addresses whose default folders exist
        self._watched: set[Folder] = set()    # folders with subscribers (polled)
        self._loop: LoopingCall | None = None
        self._polling = False
        # Start-up, before the reactor runs (as MaildirStore does).
        self._mail_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def mailbox(self, address):
        local, domain = split_mailbox_address(address)
        mailbox = self._mailboxes.get(address)
        if mailbox is None:
            mailbox = UserMailbox(self, address, self._mail_dir / domain / local)
            self._mailboxes[address] = mailbox
        return mailbox

    def delivered(self, addresses) -> None:
        """New mail reached the INBOX of `addresses` (an address or a list;
        MaildirStore's on_delivered): sync the INBOXes open here that have
        subscribers, so IDLE sees it now rather than at the next poll."""
        if isinstance(addresses, str):
            addresses = [addresses]
        for address in addresses:
            folder = self._folders.get((address, INBOX))
            if folder is not None and folder._listeners and folder._state is not None:
                folder._request_background_sync()

    def stop(self) -> None:
        """Stop polling (service shutdown)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- internals ---------------------------------------------------------------------

    def _defer(self, f, *args):
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _user_dir(self, address: str) -> Path:
        local, domain = split_mailbox_address(address)
        return self._mail_dir / domain / local

    def _folder(self, address: str, name: str, path: Path) -> Folder:
        key = (address, name)
        folder = self._folders.get(key)
        if folder is None or folder._gone:
            folder = Folder(self, address, name, path)
            self._folders[key] = folder
        self._recent[key] = folder
        self._recent.move_to_end(key)
        self._trim_recent()
        return folder

    def _trim_recent(self) -> None:
        messages = sum(len(f._state.recs) for f in self._recent.values() if f._state is not None)
        while self._recent and (len(self._recent) > KEEP_FOLDERS or messages > KEEP_MESSAGES):
            _, oldest = self._recent.popitem(last=False)
            if oldest._state is not None:
                messages -= len(oldest._state.recs)

    def _forget(self, folder: Folder) -> None:
        key = (folder.address, folder.name)
        if self._folders.get(key) is folder:
            del self._folders[key]
        if self._recent.get(key) is folder:
            del self._recent[key]
        self._unwatch(folder)

    def _watch(self, folder: Folder) -> None:
        self._watched.add(folder)
        if self._loop is None:
            self._loop = LoopingCall(self._poll)
            self._loop.clock = self._clock
            self._loop.start(self._poll_interval, now=False)

    def _unwatch(self, folder: Folder) -> None:
        self._watched.discard(folder)
        if not self._watched:
            self.stop()

    def _poll(self) -> None:
        """Every poll_interval: for each folder with subscribers, two stats and
        a header read (in the pool); sync the folders that changed."""
        if self._polling:
            return
        targets = [(f, f._state) for f in self._watched if f._state is not None and not f._gone]
        if not targets:
            return
        self._polling = True

        def check():
            return [folder for folder, state in targets if not folder._unchanged(state)]

        def changed(folders):
            for folder in folders:
                folder._request_background_sync()

        def done(result):
            self._polling = False
            return result

        d = self._defer(check)
        d.addCallback(changed)
        d.addErrback(lambda f: self.log.failure("mailbox poll failed", f))
        d.addBoth(done)


# -- one user -------------------------------------------------------------------------------

@implementer(IUserMailbox)
class UserMailbox:
    log = Logger()

    def __init__(self, store: MailStore, address: str, path: Path):
        self._store = store
        self.address = address
        self.path = Path(path)

    def __repr__(self):
        return f"<UserMailbox {self.address}>"

    @property
    def quota(self):
        """The store's IQuota (all folders of this address share one quota root), or None."""
        return self._store.quota

    # -- IUserMailbox ----------------------------------------------------------------

    def folders(self):
        return self._ensure().addCallback(lambda _: self._store._defer(self._job_list))

    def folder(self, name):
        try:
            name, dirname = folder_dirname(name)
        except ValueError:
            return fail()

        def get(_):
            return self._store._folder(self.address, name, self._path(dirname))._open()

        return self._ensure().addCallback(get)

    def create(self, name):
        try:
            name, dirname = folder_dirname(name)
        except ValueError:
            return fail()
        if dirname is None:
            return fail(FileExistsError(INBOX))
        return self._ensure().addCallback(lambda _: self._store._defer(self._job_create, name, self._path(dirname)))

    def delete(self, name):
        try:
            name, dirname = folder_dirname(name)
        except ValueError:
            return fail()
        if dirname is None:
            return fail(ValueError("INBOX cannot be deleted"))

        def delete(_):
            folder = self._store._folder(self.address, name, self._path(dirname))

            def gone(result):
                folder._mark_gone()
                self._store._forget(folder)
                return result

            # Under the folder's lock: no operation of this process is half-way.
            return folder._lock.run(lambda: self._store._defer(self._job_delete, name, folder.path).addCallback(gone))

        return self._ensure().addCallback(delete)

    def rename(self, old, new):
        try:
            old, old_dir = folder_dirname(old)
            new, new_dir = folder_dirname(new)
        except ValueError:
            return fail()
        if new_dir is None:
            return fail(FileExistsError(INBOX))

        def renamed(moved):
            for name in moved:
                for (address, folder_name), folder in list(self._store._folders.items()):
                    if address == self.address and folder_name == name:
                        folder._mark_gone()
                        self._store._forget(folder)
            if old_dir is None:
                inbox = self._store._folders.get((self.address, INBOX))
                if inbox is not None and inbox._state is not None:
                    inbox._request_background_sync()  # publishes the Expunged

        def run(_):
            if old_dir is None:
                d = self._store._defer(self._job_rename_inbox, new, self._path(new_dir))
            else:
                d = self._store._defer(self._job_rename, old, old_dir, new_dir)
            return d.addCallback(renamed)

        return self._ensure().addCallback(run)

    def subscriptions(self):
        return self._store._defer(self._job_subscriptions, None, None)

    def subscribe(self, name):
        try:
            name, _ = folder_dirname(name)
        except ValueError:
            return fail()
        return self._store._defer(self._job_subscriptions, "add", name).addCallback(lambda _: None)

    def unsubscribe(self, name):
        try:
            name, _ = folder_dirname(name)
        except ValueError:
            return fail()
        return self._store._defer(self._job_subscriptions, "remove", name).addCallback(lambda _: None)

    # -- reactor thread --------------------------------------------------------------

    def _path(self, dirname: str | None) -> Path:
        return self.path if dirname is None else self.path / dirname

    def _ensure(self):
        """INBOX and the default folders exist (durably) - once per process."""
        if self.address in self._store._ready:
            return succeed(None)
        wanted = [self.path / sub for sub in MAILDIR_SUBDIRECTORIES]
        for name in DEFAULT_FOLDERS:
            wanted += [self._path(folder_dirname(name)[1]) / sub for sub in MAILDIR_SUBDIRECTORIES]
        d = self._store._writer.ensure_directories(self._store._mail_dir, wanted)
        return d.addCallback(lambda _: self._store._ready.add(self.address))

    # -- pool thread -----------------------------------------------------------------

    def _job_list(self):
        names = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name[0] == "." and entry.is_dir(follow_symlinks=False):
                    name = decode_dirname(entry.name)
                    if name is not None:
                        names.append(name)
        return [INBOX] + sorted(names)

    def _job_create(self, name: str, path: Path) -> None:
        osc = self._store._os
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise FileExistsError(name) from None
        with ix.locked(path / ix.LOCK_NAME):  # a loader racing us waits for the uidvalidity file
            for sub in MAILDIR_SUBDIRECTORIES:
                os.mkdir(path / sub, 0o700)
            uidvalidity = ix.allocate_uidvalidity(osc, self.path)
            ix.write_atomic(osc, path, ix.UIDVALIDITY_NAME, ix.format_uidvalidity(uidvalidity, 1))
        fsync_directory(self.path, osc=osc)

    def _job_delete(self, name: str, path: Path) -> None:
        if not os.path.isdir(path):
            raise KeyError(name)
        with ix.locked(path / ix.LOCK_NAME):
            # Counted under the lock: no job of ours adds or removes meanwhile.
            octets, messages = folder_usage(path) if self._store.quota is not None else (0, 0)
            shutil.rmtree(path)
        fsync_directory(self.path, osc=self._store._os)
        if octets or messages:
            self._store.quota.record(self.address, -octets, -messages)

    def _job_rename(self, old: str, old_dir: str, new_dir: str) -> list[str]:
        """Rename the folder and its inferiors (RFC 3501 §6.3.5); returns the
        old names of every folder moved."""
        with ix.locked(self.path / ix.USER_LOCK_NAME):
            if not os.path.isdir(self.path / old_dir):
                raise KeyError(old)
            moves = [(old_dir, new_dir)]
            with os.scandir(self.path) as entries:
                for entry in entries:
                    if entry.name.startswith(old_dir + ".") and entry.is_dir(follow_symlinks=False):
                        moves.append((entry.name, new_dir + entry.name[len(old_dir):]))
            for _, target in moves:
                if len(target.encode("utf-8", "surrogateescape")) > NAME_MAX:
                    raise ValueError(f"folder name too long: {decode_dirname(target)!r}")
                if os.path.lexists(self.path / target):
                    raise FileExistsError(decode_dirname(target) or target)
            for source, target in moves:
                os.rename(self.path / source, self.path / target)
            fsync_directory(self.path, osc=self._store._os)
        return [name for name in (decode_dirname(source) for source, _ in moves) if name]

    def _job_rename_inbox(self, new: str, path: Path) -> list[str]:
        """RFC 3501 §6.3.5: move every message of INBOX into a new folder;
        INBOX stays, empty, with its UIDVALIDITY and UIDNEXT. The files keep
        their names (and U= fields, which the new folder adopts)."""
        self._job_create(new, path)
        osc = self._store._os
        with ix.locked(self.path / ix.LOCK_NAME):
            for sub in ("new", "cur"):
                source = self.path / sub
                with os.scandir(source) as entries:
                    names = [e.name for e in entries if e.name[0] != "." and not e.is_dir(follow_symlinks=False)]
                for name in names:
                    try:
                        os.rename(source / name, path / sub / name)
                    except FileNotFoundError:
                        pass
                fsync_directory(path / sub, osc=osc)
                fsync_directory(source, osc=osc)
        return []

    def _job_subscriptions(self, change, name):
        path = self.path / ix.SUBSCRIPTIONS_NAME
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        with ix.locked(self.path / ix.USER_LOCK_NAME):
            try:
                data = read_file(path)
            except FileNotFoundError:
                data = None
            if data is None or not data.startswith(SUBSCRIPTIONS_HEADER):
                # First use (or unreadable): INBOX and the default folders.
                names = [INBOX, *DEFAULT_FOLDERS]
            else:
                names = [line for line in data[len(SUBSCRIPTIONS_HEADER):].decode("utf-8", "replace").split("\n") if line]
            before = list(names)
            if change == "add" and name not in names:
                names.append(name)
            elif change == "remove" and name in names:
                names.remove(name)
            if change is not None and (names != before or data is None):
                text = SUBSCRIPTIONS_HEADER + "".join(f"{n}\n" for n in names).encode("utf-8")
                ix.write_atomic(self._store._os, self.path, ix.SUBSCRIPTIONS_NAME, text)
        return names
