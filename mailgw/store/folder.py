"""One Maildir folder with persistent UIDs (IFolder). Format: docs/store-format.md.

Threads. The in-memory state of a Folder is a `_State` owned by the reactor
thread. Every operation runs under the Folder's DeferredLock as ONE job in
the store's thread pool: the job gets the current `_State` as a read-only
snapshot, works on a copy (under the folder's flock when it reads or
changes the files), and returns the new `_State` plus the events; back on the
reactor thread the new state replaces the old one (states are never changed
in place once handed over) and the events are published.

Files. A message in cur/ is named `<key>,U=<uid>:2,<letters>` where `<key>`
is the name it was delivered under minus any U= field (it carries S= and W=),
so a lost index is rebuilt from the names. The index adds what names cannot
carry: keywords, cached sizes and INTERNALDATEs, and which name is which UID
when someone else renamed a file.
"""
from __future__ import annotations

import itertools
import os
import re
import socket
import time
from datetime import datetime
from pathlib import Path

from twisted.internet.defer import DeferredLock, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.errors import MailError, StorageFailed, StorageFull
from mailgw.interfaces import IFolder
from mailgw.store import index as ix
from mailgw.store.maildir import _escape_hostname
from mailgw.store.quota import size_from_name
from mailgw.store.events import (
    MAILDIR_LETTERS, SYSTEM_FLAGS, Added, Expunged, FlagsChanged, MessageInfo, SyncResult,
)

LETTER_FLAGS = {letter: flag for flag, letter in MAILDIR_LETTERS.items()}
_SYSTEM_BY_LOWER = {flag.lower(): flag for flag in SYSTEM_FLAGS}
_DIGITS = re.compile(r"[0-9]{1,10}")
# A directory mtime this close to the moment we looked may still change
# without changing its value (coarse file-system timestamps): such a value is
# not trusted to mean "unchanged" next time (docs/store-format.md §6).
MTIME_SLACK_NS = 1_000_000_000
MODES = ("add", "remove", "replace")


class FolderGone(KeyError):
    """The folder's directory no longer exists (deleted or renamed)."""


# -- file names ------------------------------------------------------------------------

def parse_name(name: str):
    """(key, uid or None, wire size or None, info letters) of a Maildir file name."""
    base, _, info = name.partition(":")
    uid = wire = None
    if "," in base:
        parts = base.split(",")
        kept = [parts[0]]
        for part in parts[1:]:
            if part[:2] == "U=" and uid is None and _DIGITS.fullmatch(part, 2):
                uid = int(part[2:])
                continue
            if part[:2] == "W=" and _DIGITS.fullmatch(part, 2):
                wire = int(part[2:])
            kept.append(part)
        key = ",".join(kept)
    else:
        key = base
    letters = info[2:] if info[:2] == "2," else ""
    return key, uid, wire, letters


def make_name(key: str, uid: int, letters: str) -> str:
    return f"{key},U={uid}:2,{letters}"


def crlf_size(data: bytes) -> int:
    """Octets of `data` in wire form (every line end CRLF), as to_crlf makes it."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def to_crlf(data: bytes) -> bytes:
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r\n")


_counter = itertools.count(1)
_HOST = _escape_hostname(socket.gethostname() or "localhost")


def fresh_base() -> str:
    """A unique Maildir base name (same scheme as MaildirStore's deliveries)."""
    now = time.time()
    seconds = int(now)
    return f"{seconds}.M{int((now - seconds) * 1_000_000)}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def split_flags(flags) -> tuple[frozenset, tuple]:
    """(Maildir letters of the system flags, keywords) of IMAP flags;
    ValueError for anything that is neither (\\Recent included: it cannot be stored)."""
    if isinstance(flags, str):
        flags = (flags,)
    letters, keywords, seen = set(), [], set()
    for flag in flags:
        if not isinstance(flag, str):
            raise ValueError(f"not a flag: {flag!r}")
        if flag.startswith("\\"):
            system = _SYSTEM_BY_LOWER.get(flag.lower())
            if system is None:
                raise ValueError(f"not a storable system flag: {flag!r}")
            letters.add(MAILDIR_LETTERS[system])
        elif ix.valid_keyword(flag):
            if flag.lower() not in seen:
                seen.add(flag.lower())
                keywords.append(flag)
        else:
            raise ValueError(f"not a valid keyword: {flag!r}")
    return frozenset(letters), tuple(keywords)


# -- state ---------------------------------------------------------------------------------

class _Rec:
    """One message. Immutable once built (replaced, never changed)."""

    __slots__ = ("uid", "name", "key", "size", "internaldate", "kw", "letters", "info")

    def __init__(self, uid, name, key, size, internaldate, kw, letters, info):
        self.uid, self.name, self.key, self.size = uid, name, key, size
        self.internaldate, self.kw, self.letters, self.info = internaldate, kw, letters, info


class _State:
    __slots__ = ("uidvalidity", "uidnext", "reserved", "generation", "keywords",
                 "recs", "by_name", "by_key", "new_sig", "cur_sig")

    def __init__(self, uidvalidity, uidnext, reserved, generation, keywords=()):
        self.uidvalidity, self.uidnext, self.reserved, self.generation = uidvalidity, uidnext, reserved, generation
        self.keywords = list(keywords)
        self.recs: dict[int, _Rec] = {}        # ascending UID order
        self.by_name: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.new_sig = None   # mtime_ns of new/ when it can be trusted, else None
        self.cur_sig = None

    def copy(self) -> "_State":
        s = _State(self.uidvalidity, self.uidnext, self.reserved, self.generation, self.keywords)
        s.recs, s.by_name, s.by_key = dict(self.recs), dict(self.by_name), dict(self.by_key)
        s.new_sig, s.cur_sig = self.new_sig, self.cur_sig
        return s

    def put(self, rec: _Rec, old: _Rec | None = None) -> None:
        if old is not None and old.name != rec.name:
            self.by_name.pop(old.name, None)
        self.recs[rec.uid] = rec
        self.by_name[rec.name] = rec.uid
        self.by_key[rec.key] = rec.uid

    def drop(self, uid: int) -> _Rec | None:
        rec = self.recs.pop(uid, None)
        if rec is not None:
            self.by_name.pop(rec.name, None)
            if self.by_key.get(rec.key) == uid:
                del self.by_key[rec.key]
        return rec


class _Ctx:
    """One job's working copy and bookkeeping (pool thread only)."""

    def __init__(self, st: _State, t0: int):
        self.st = st
        self.t0 = t0
        self.dirty = False          # the index must be written
        self.changed = False        # messages or flags differ from the snapshot
        self.recent: list[int] = []
        self.notes: list[tuple[str, str]] = []   # (level, text) logged on the reactor
        self.synced_dirs: set[str] = set()       # directories to fsync before the index
        self.scanned_new = False
        self.flagsets: dict = {}

    def note(self, level, text):
        self.notes.append((level, text))


class _Outcome:
    __slots__ = ("state", "events", "result", "notes")

    def __init__(self, state, events, result, notes=()):
        self.state, self.events, self.result, self.notes = state, events, result, notes


def _diff(old: _State | None, new: _State) -> tuple:
    if old is None:
        return ()
    if old.uidvalidity != new.uidvalidity:
        events = [Expunged(tuple(old.recs)), Added(tuple(new.recs))]
        return tuple(e for e in events if e.uids)
    expunged = tuple(u for u in old.recs if u not in new.recs)
    added = tuple(u for u in new.recs if u not in old.recs)
    changed = []
    for uid, rec in new.recs.items():
        before = old.recs.get(uid)
        if before is not None and before is not rec and before.info.flags != rec.info.flags:
            changed.append(uid)
    events = [Expunged(expunged), FlagsChanged(tuple(changed)), Added(added)]
    return tuple(e for e in events if e.uids)


# -- the folder ---------------------------------------------------------------------------

@implementer(IFolder)
class Folder:
    """Use MailStore / UserMailbox to get one; never construct directly."""

    log = Logger()

    def __init__(self, store, address: str, name: str, path: Path):
        self._store = store
        self.address = address
        self.name = name
        self.path = Path(path)
        self._cur = str(self.path / "cur")
        self._new = str(self.path / "new")
        self._tmp = str(self.path / "tmp")
        self._index_path = str(self.path / ix.INDEX_NAME)
        self._lock_path = str(self.path / ix.LOCK_NAME)
        self._lock = DeferredLock()
        self._state: _State | None = None
        self._infos: list | None = None
        self._listeners: list = []
        self._unclaimed: list[int] = []     # \Recent found by background syncs, for the next sync() caller
        self._sync_pending = False
        self._gone = False

    def __repr__(self):
        return f"<Folder {self.address} {self.name!r}>"

    # -- IFolder: attributes ----------------------------------------------------

    @property
    def uidvalidity(self) -> int:
        return self._state.uidvalidity if self._state else 0

    @property
    def uidnext(self) -> int:
        return self._state.uidnext if self._state else 1

    def messages(self) -> list:
        if self._state is None:
            return []
        if self._infos is None:
            self._infos = [rec.info for rec in self._state.recs.values()]
        return list(self._infos)

    # -- IFolder: operations ----------------------------------------------------

    def sync(self):
        return self._lock.run(self._sync, False)

    def open(self, uid):
        rec = self._state.recs.get(uid) if self._state is not None and not self._gone else None
        if rec is None:
            return fail(KeyError(uid))
        d = self._defer(self._job_open, rec.name, rec.key)

        def check(data):
            if len(data) != rec.size:
                self.log.warn("{folder}: UID {uid} is {actual} octets, its size says {size}",
                              folder=self, uid=uid, actual=len(data), size=rec.size)
            return data

        return d.addCallback(check)

    def open_many(self, uids):
        """Deferred[list of bytes or None]: the messages of `uids` in order
        (None for a UID that is gone), read in ONE thread-pool job. A large
        IMAP FETCH BODY[] otherwise pays a job (and a reactor turn) per message."""
        state = self._state if not self._gone else None
        wanted = []
        for uid in uids:
            rec = state.recs.get(uid) if state is not None else None
            wanted.append(None if rec is None else (rec.name, rec.key))
        return self._defer(self._job_open_many, wanted)

    def _job_open_many(self, wanted):
        contents = []
        for item in wanted:
            if item is None:
                contents.append(None)
                continue
            try:
                contents.append(self._job_open(*item))
            except KeyError:
                contents.append(None)
        return contents

    def octets_on_disk(self, uids) -> int:
        """What copies of `uids` would add to the quota (S= of their names; the CRLF
        size where a name has none): from memory, no I/O. Not in IFolder: IMAP asks for
        it when the folder has it, and takes RFC822.SIZE otherwise."""
        state = self._state
        total = 0
        for uid in uids:
            rec = state.recs.get(uid) if state is not None else None
            if rec is not None:
                size = size_from_name(rec.key)
                total += rec.size if size is None else size
        return total

    def store_flags(self, uids, flags, mode):
        try:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}: {mode!r}")
            letters, keywords = split_flags(flags)
            uids = sorted(set(int(uid) for uid in uids))
        except (TypeError, ValueError):
            return fail()
        return self._lock.run(self._op, self._job_store, uids, letters, keywords, mode)

    def expunge(self, uids):
        try:
            uids = sorted(set(int(uid) for uid in uids))
        except (TypeError, ValueError):
            return fail()
        return self._lock.run(self._op, self._job_expunge, uids)

    def append(self, message, flags=(), internaldate=None):
        try:
            if not isinstance(message, (bytes, bytearray, memoryview)):
                raise TypeError("message must be bytes")
            letters, keywords = split_flags(flags)
            if isinstance(internaldate, datetime):
                internaldate = internaldate.timestamp()
            if internaldate is not None:
                internaldate = float(internaldate)
        except (TypeError, ValueError):
            return fail()
        return self._lock.run(self._op, self._job_append, bytes(message), letters, keywords, internaldate)

    def copy(self, uids, target):
        if not isinstance(target, Folder):
            return fail(TypeError("copy target must be a Folder of the same store"))
        try:
            uids = sorted(set(int(uid) for uid in uids))
        except (TypeError, ValueError):
            return fail()
        return target._lock.run(target._copy_in, self, uids)

    def subscribe(self, listener):
        if listener not in self._listeners:
            self._listeners.append(listener)
        self._store._watch(self)

    def unsubscribe(self, listener):
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners:
            self._store._unwatch(self)

    # -- reactor-side plumbing ---------------------------------------------------------

    def _defer(self, f, *args):
        return deferToThreadPool(self._store._reactor, self._store._pool, f, *args)

    def _run(self, job, *args):
        """Run `job(snapshot, *args)` in the pool; apply its _Outcome here."""
        if self._gone:
            return fail(FolderGone(self.name))
        d = self._defer(job, self._state, *args)
        d.addCallbacks(self._applied, self._failed)
        return d

    def _op(self, job, *args):
        return self._run(job, *args).addCallback(lambda outcome: outcome.result)

    def _applied(self, outcome: _Outcome) -> _Outcome:
        for level, text in outcome.notes:
            getattr(self.log, level)("{folder}: {text}", folder=self, text=text)
        if outcome.state is not self._state:
            self._state = outcome.state
            self._infos = None
        self._publish(outcome.events)
        return outcome

    def _failed(self, failure):
        if failure.check(FolderGone):
            self._gone = True
            self._store._forget(self)
            return failure
        if failure.check(KeyError, ValueError, TypeError, FileExistsError, MailError):
            if failure.check(MailError):
                self.log.warn("{folder}: {error}", folder=self, error=failure.value)
            return failure
        error = ix.storage_error(failure.value)
        if isinstance(error, StorageFull):
            # Expected in operation, and the client is told to retry: one line, no traceback.
            self.log.error("{folder}: store operation failed: disk full ({error})", folder=self,
                           error=failure.value)
        else:
            self.log.failure("{folder}: store operation failed", failure, folder=self)
        return fail(error)

    def _publish(self, events) -> None:
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    self.log.failure("{folder}: listener {listener} failed", folder=self, listener=listener)

    def _sync(self, background: bool):
        if background:
            self._sync_pending = False
        d = self._run(self._job_sync, True)

        def done(outcome):
            recent = list(outcome.result)
            if background:
                self._unclaimed.extend(recent)
                return SyncResult((), outcome.events)
            if self._unclaimed:
                recent = sorted(set(recent).union(u for u in self._unclaimed if u in self._state.recs))
                self._unclaimed = []
            return SyncResult(tuple(recent), outcome.events)

        return d.addCallback(done)

    def _request_background_sync(self) -> None:
        """Sync soon on behalf of nobody (new mail for IDLE): the \\Recent
        UIDs it finds go to the next sync() caller. Coalesced."""
        if self._sync_pending or self._gone:
            return
        self._sync_pending = True
        d = self._lock.run(self._sync, True)
        d.addErrback(lambda f: self.log.failure("{folder}: background sync failed", f, folder=self))

    def _open(self):
        """Load the state (index, cur/) once; Deferred[self]."""
        if self._state is not None and not self._gone:
            return succeed(self)

        def load():
            if self._state is not None:
                return succeed(self)
            return self._run(self._job_sync, False).addCallback(lambda _: self)

        return self._lock.run(load)

    def _copy_in(self, source: "Folder", uids):
        """On the target (self), under self's lock: take the source's
        current state here, on the reactor thread."""
        state = source._state
        items = []
        if state is not None:
            for uid in uids:
                rec = state.recs.get(uid)
                if rec is not None:
                    names = [state.keywords[i] for i in range(len(state.keywords)) if rec.kw >> i & 1]
                    items.append((uid, rec.name, rec.key, rec.letters, names, rec.size, rec.internaldate))
        if not items:
            return succeed([])
        return self._op(self._job_copy_in, source._cur, items)

    def _mark_gone(self) -> None:
        """The directory was deleted or renamed: tell subscribers every message is gone."""
        self._gone = True
        state, self._state, self._infos = self._state, None, None
        if state is not None and state.recs:
            self._publish((Expunged(tuple(state.recs)),))
        self._store._unwatch(self)

    # -- pool thread: jobs ---------------------------------------------------------------

    def _job_sync(self, snap, move_new):
        if snap is not None and move_new and self._unchanged(snap):
            return _Outcome(snap, (), ())
        with self._locked():
            ctx = self._refresh(snap, move_new)
            self._commit(ctx)
        return self._outcome(snap, ctx, tuple(ctx.recent))

    def _job_open(self, name, key):
        read = self._store._read
        try:
            data = read(f"{self._cur}/{name}")
        except FileNotFoundError:  # renamed (flags) by another process since our last look
            found = self._find_key(self._cur, key)
            if found is None:
                raise KeyError(name) from None
            data = read(f"{self._cur}/{found}")
        return to_crlf(data)

    def _job_store(self, snap, uids, letters, keywords, mode):
        with self._locked():
            ctx = self._refresh(snap, False)
            st = ctx.st
            mask = self._keyword_mask(ctx, keywords, create=mode != "remove")
            result = {}
            listing = None
            # Few distinct info strings in a folder: work each one out once per job.
            letters_after: dict[str, str] = {}
            # 10,000 messages per STORE are common (mark all read): the loop
            # does per message only what differs, and fsyncs cur/ once.
            renamed = False
            for uid in uids:
                rec = st.recs.get(uid)
                if rec is None:
                    continue
                new_letters = letters_after.get(rec.letters)
                if new_letters is None:
                    system = {c for c in rec.letters if c in LETTER_FLAGS}
                    extra = {c for c in rec.letters if c not in LETTER_FLAGS}
                    if mode == "add":
                        system |= letters
                    elif mode == "remove":
                        system -= letters
                    else:
                        system = set(letters)
                    new_letters = letters_after[rec.letters] = "".join(sorted(system | extra))
                kw = rec.kw | mask if mode == "add" else rec.kw & ~mask if mode == "remove" else mask
                if new_letters == rec.letters and kw == rec.kw:
                    result[uid] = rec.info.flags
                    continue
                name = make_name(rec.key, uid, new_letters)
                if name != rec.name:
                    try:
                        os.rename(f"{self._cur}/{rec.name}", f"{self._cur}/{name}")
                    except FileNotFoundError:
                        if listing is None:
                            listing = self._keys(self._cur)
                        current = listing.get(rec.key)
                        if current is None:  # removed by someone who does not take our lock
                            st.drop(uid)
                            ctx.dirty = ctx.changed = True
                            continue
                        os.rename(f"{self._cur}/{current}", f"{self._cur}/{name}")
                    renamed = True
                new = self._rec(ctx, uid, name, rec.key, rec.size, rec.internaldate, kw, new_letters)
                st.put(new, rec)
                result[uid] = new.info.flags
                ctx.dirty = ctx.changed = True
            if renamed:
                ctx.synced_dirs.add(self._cur)
            self._commit(ctx)
        return self._outcome(snap, ctx, result)

    def _job_expunge(self, snap, uids):
        freed = [0, 0]          # octets on disk, files: what this job unlinked
        try:
            with self._locked():
                ctx = self._refresh(snap, False)
                st = ctx.st
                removed = []
                listing = None
                for uid in uids:
                    rec = st.recs.get(uid)
                    if rec is None:
                        continue
                    if not self._unlink(f"{self._cur}/{rec.name}", rec.key, freed):
                        if listing is None:
                            listing = self._keys(self._cur)
                        current = listing.get(rec.key)
                        if current is not None:
                            self._unlink(f"{self._cur}/{current}", rec.key, freed)
                    st.drop(uid)
                    removed.append(uid)
                    ctx.dirty = ctx.changed = True
                if removed:
                    ctx.synced_dirs.add(self._cur)
                self._commit(ctx)
        finally:
            # Unlinked is gone, even if the index write failed afterwards.
            self._record_quota(-freed[0], -freed[1])
        return self._outcome(snap, ctx, removed)

    def _unlink(self, path: str, key: str, freed: list) -> bool:
        """Remove one message file, adding its octets (S=, else a stat) to `freed`;
        False if it was not there (someone else removed it, and counted it)."""
        size = size_from_name(key)
        try:
            if size is None:
                size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return False
        freed[0] += size
        freed[1] += 1
        return True

    def _record_quota(self, octets: int, messages: int) -> None:
        """Tell the quota (mailgw.store.quota) what a job stored or removed."""
        quota = getattr(self._store, "quota", None)
        if quota is not None and (octets or messages):
            try:
                quota.record(self.address, octets, messages)
            except Exception:  # the operation is done: a failed count must not fail it
                self.log.failure("{folder}: quota record failed", folder=self)

    def _job_append(self, snap, message, letters, keywords, internaldate):
        osc = self._store._os
        if not os.path.isdir(self._tmp):
            self._make_directories()  # FolderGone if the folder was removed
        stored = message.replace(b"\r\n", b"\n")
        key = f"{fresh_base()},S={len(stored)},W={crlf_size(stored)}"
        tmp = f"{self._tmp}/{key}"
        # The content is made durable before taking the lock: other processes
        # wait only for the rename and the index.
        fd = osc.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(stored)
                while view:
                    view = view[osc.write(fd, view):]
                osc.fsync(fd)
            finally:
                osc.close(fd)
            if internaldate is not None:
                os.utime(tmp, (internaldate, internaldate))
            date = os.stat(tmp).st_mtime
            with self._locked():
                ctx = self._refresh(snap, False)
                mask = self._keyword_mask(ctx, keywords, create=True)
                uid = self._allocate(ctx)
                name = make_name(key, uid, "".join(sorted(letters)))
                osc.move(tmp, f"{self._cur}/{name}")
                tmp = None
                ctx.synced_dirs.add(self._cur)
                ctx.st.put(self._rec(ctx, uid, name, key, crlf_size(stored), date, mask, "".join(sorted(letters))))
                ctx.dirty = ctx.changed = True
                self._commit(ctx)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            else:   # in cur/: counts, even if the index write failed (the next sync adopts it)
                self._record_quota(len(stored), 1)
        return self._outcome(snap, ctx, uid)

    def _job_copy_in(self, snap, source_cur, items):
        added = [0, 0]          # octets on disk, files: each copy counts (Maildir++, as Dovecot: links too)
        try:
            with self._locked():
                ctx = self._refresh(snap, False)
                st = ctx.st
                pairs = []
                listing = None
                for src_uid, src_name, src_key, letters, keywords, size, date in items:
                    mask = self._keyword_mask(ctx, keywords, create=True)
                    fields = src_key.split(",", 1)[1] if "," in src_key else f"W={size}"
                    key = f"{fresh_base()},{fields}"
                    uid = self._allocate(ctx)
                    name = make_name(key, uid, letters)
                    source = f"{source_cur}/{src_name}"
                    target = f"{self._cur}/{name}"
                    try:
                        try:
                            self._link_or_copy(source, target, date)
                        except FileNotFoundError:
                            if listing is None:
                                listing = self._keys(source_cur)
                            current = listing.get(src_key)
                            if current is None:
                                continue  # expunged meanwhile: nothing to copy (the UID stays unused)
                            self._link_or_copy(f"{source_cur}/{current}", target, date)
                    except FileNotFoundError:
                        continue
                    on_disk = size_from_name(key)
                    if on_disk is None:
                        on_disk = os.stat(target).st_size
                    added[0] += on_disk
                    added[1] += 1
                    ctx.synced_dirs.add(self._cur)
                    st.put(self._rec(ctx, uid, name, key, size, date, mask, letters))
                    pairs.append((src_uid, uid))
                    ctx.dirty = ctx.changed = True
                self._commit(ctx)
        finally:
            # Linked is stored, even if the index write failed afterwards (the next sync adopts it).
            self._record_quota(*added)
        return self._outcome(snap, ctx, pairs)

    def _link_or_copy(self, source: str, target: str, date: float) -> None:
        # Maildir files never change once written: a hard link is a copy
        # (and keeps the mtime, i.e. INTERNALDATE, RFC 3501 §6.4.7).
        try:
            os.link(source, target)
            return
        except FileNotFoundError:
            raise
        except OSError:
            pass  # EXDEV, EPERM, EMLINK...: copy the bytes
        osc = self._store._os
        data = self._store._read(source)
        tmp = f"{self._tmp}/{os.path.basename(target).partition(':')[0]}"
        fd = osc.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[osc.write(fd, view):]
                osc.fsync(fd)
            finally:
                osc.close(fd)
            os.utime(tmp, (date, date))
            osc.move(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # -- pool thread: the shared machinery -------------------------------------------------

    def _outcome(self, snap, ctx: _Ctx, result) -> _Outcome:
        events = _diff(snap, ctx.st) if ctx.changed else ()
        return _Outcome(ctx.st, events, result, tuple(ctx.notes))

    def _mtime(self, directory: str) -> int:
        try:
            return os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            self._make_directories()
            return os.stat(directory).st_mtime_ns

    def _make_directories(self) -> None:
        if self.name != "INBOX" and not os.path.isdir(self.path):
            raise FolderGone(self.name)
        for sub in (self._tmp, self._new, self._cur):
            os.makedirs(sub, mode=0o700, exist_ok=True)

    def _locked(self):
        """The folder's flock (FolderGone if the directory was removed)."""
        if not os.path.isdir(self.path):
            if self.name != "INBOX":
                raise FolderGone(self.name)
            self._make_directories()
        return ix.locked(self._lock_path)

    def _unchanged(self, snap: _State) -> bool:
        """Nothing to do for a sync: new/ and cur/ have the trusted mtimes we
        saw and nobody wrote the index. Two stats and one small read."""
        try:
            return (
                snap.new_sig is not None and snap.cur_sig is not None
                and os.stat(self._new).st_mtime_ns == snap.new_sig
                and os.stat(self._cur).st_mtime_ns == snap.cur_sig
                and ix.read_generation(self._index_path) == snap.generation
            )
        except OSError:
            return False

    def _list(self, directory: str) -> list[str]:
        # One scandir, no stat: d_type tells directories apart. Names starting
        # with "." are not messages (Maildir spec).
        with os.scandir(directory) as entries:
            return [e.name for e in entries if e.name[0] != "." and not e.is_dir(follow_symlinks=False)]

    def _keys(self, directory: str) -> dict[str, str]:
        return {parse_name(name)[0]: name for name in self._list(directory)}

    def _find_key(self, directory: str, key: str) -> str | None:
        return self._keys(directory).get(key)

    def _refresh(self, snap: _State | None, move_new: bool) -> _Ctx:
        """Under the folder lock: bring the snapshot up to date with the index
        file (someone else wrote it?), cur/ (renames, removals, new files) and,
        when asked, new/ (moved into cur/ with fresh UIDs: the \\Recent ones)."""
        t0 = time.time_ns()
        cur_mtime = self._mtime(self._cur)
        new_mtime = self._mtime(self._new)
        generation = ix.read_generation(self._index_path)
        if snap is not None and generation is not None and generation == snap.generation:
            ctx = _Ctx(snap.copy(), t0)
            if snap.cur_sig is None or snap.cur_sig != cur_mtime:
                self._scan_cur(ctx)
        else:
            ctx = self._load(snap, t0)
        if move_new and (snap is None or snap.new_sig is None or snap.new_sig != new_mtime):
            self._move_new(ctx)
        return ctx

    def _load(self, snap: _State | None, t0: int) -> _Ctx:
        try:
            data = read_file(self._index_path)
        except FileNotFoundError:
            data = None
        index = None
        problem = None
        if data is not None:
            try:
                index = ix.parse_index(data)
            except ix.IndexCorrupt as e:
                problem = f"index corrupt ({e})"
        else:
            problem = "index missing"
        stored = ix.read_uidvalidity(self.path)
        if index is not None:
            st = _State(index.uidvalidity, index.uidnext, 1, index.generation, index.keywords)
            ctx = _Ctx(st, t0)
            if stored is not None and stored[0] == index.uidvalidity:
                st.reserved = stored[1]
            else:
                # Lost or not ours: the index is the better witness. Rewrite it.
                ctx.note("warn", "uidvalidity file missing or different; rewritten from the index")
                self._reserve(ctx, st.uidnext)
            for e in index.entries:
                key, _uid, _wire, letters = parse_name(e.name)
                st.put(self._rec(ctx, e.uid, e.name, key, e.size, e.internaldate, e.keywords, letters))
            ctx.changed = True
            self._scan_cur(ctx)
            if snap is not None:
                st.new_sig = snap.new_sig
            return ctx
        return self._rebuild(snap, stored, problem, t0)

    def _rebuild(self, snap, stored, problem, t0) -> _Ctx:
        """No usable index: recover UIDs from the file names (docs §5)."""
        names = self._list(self._cur)
        if stored is not None:
            uidvalidity, reserved = stored
            how = "same UIDVALIDITY"
        elif snap is not None:  # this process still knows it
            uidvalidity, reserved = snap.uidvalidity, max(snap.uidnext, snap.reserved)
            how = "same UIDVALIDITY (from memory)"
        else:
            uidvalidity = ix.allocate_uidvalidity(self._store._os, self._store._user_dir(self.address))
            reserved = 1
            how = "NEW UIDVALIDITY (uidvalidity file lost too)"
        st = _State(uidvalidity, 1, reserved, 0)
        ctx = _Ctx(st, t0)
        if names or problem != "index missing":
            ctx.note("warn", f"{problem}: rebuilt from {len(names)} files in cur/ with {how} {uidvalidity}")
        if stored is None:
            self._reserve(ctx, 1)
        parsed = sorted(
            ((name, *parse_name(name)) for name in names),
            key=lambda p: (p[2] is None, p[2] or 0, p[0]),
        )
        keep, rest, keys = [], [], set()
        used = set()
        for item in parsed:
            name, key, uid, wire, letters = item
            if uid is not None and 0 < uid <= ix.MAX_UID and uid not in used and key not in keys:
                used.add(uid)
                keys.add(key)
                keep.append(item)
            else:
                rest.append(item)
        st.uidnext = max(reserved, max(used) + 1 if used else 1)
        for name, key, uid, wire, letters in keep:
            self._adopt(ctx, self._cur, name, key, uid, wire, letters)
        for name, key, _uid, wire, letters in rest:
            if key in st.by_key:
                key = self._rekey(key)
            self._adopt(ctx, self._cur, name, key, None, wire, letters)
        ctx.dirty = ctx.changed = True
        return ctx

    def _scan_cur(self, ctx: _Ctx) -> None:
        """Reconcile the state with one listing of cur/: renamed (flags
        changed), removed, and new files (given UIDs)."""
        st = ctx.st
        by_name = st.by_name
        seen = set()
        unknown = []
        for name in self._list(self._cur):
            uid = by_name.get(name)
            if uid is None:
                unknown.append(name)
            else:
                seen.add(uid)
        if not unknown and len(seen) == len(st.recs):
            return
        leftovers = []
        for name in unknown:
            key, uid_field, wire, letters = parse_name(name)
            uid = st.by_key.get(key)
            if uid is not None and uid not in seen:
                rec = st.recs[uid]
                seen.add(uid)
                st.put(self._rec(ctx, uid, name, key, rec.size, rec.internaldate, rec.kw, letters), rec)
                ctx.dirty = ctx.changed = True
            else:
                leftovers.append((name, key, uid_field, wire, letters))
        for uid in [uid for uid in st.recs if uid not in seen]:
            st.drop(uid)
            ctx.dirty = ctx.changed = True
        leftovers.sort(key=lambda p: (p[2] is None, p[2] or 0, p[0]))
        for name, key, uid, wire, letters in leftovers:
            # A U= at or above UIDNEXT is ours from a job whose index write
            # failed (crash, ENOSPC): keep it. Lower ones may have been used
            # for other messages, or come from another folder: new UID.
            if uid is not None and not st.uidnext <= uid <= ix.MAX_UID:
                uid = None
            if key in st.by_key:
                key = self._rekey(key)
                uid = None
            self._adopt(ctx, self._cur, name, key, uid, wire, letters)

    def _move_new(self, ctx: _Ctx) -> None:
        ctx.scanned_new = True
        for name in sorted(self._list(self._new)):
            key, _uid, wire, letters = parse_name(name)  # a U= in new/ means nothing
            if key in ctx.st.by_key:
                key = self._rekey(key)  # a second copy of a message we have
            rec = self._adopt(ctx, self._new, name, key, None, wire, letters)
            if rec is not None:
                ctx.recent.append(rec.uid)
                ctx.synced_dirs.add(self._new)

    def _rekey(self, key: str) -> str:
        return fresh_base() + ("," + key.split(",", 1)[1] if "," in key else "")

    def _adopt(self, ctx: _Ctx, directory: str, name: str, key: str, uid, wire, letters):
        """Give a file found on disk a record (and `uid`, or a new UID), and
        rename it into cur/ as <key>,U=<uid>:2,<letters>."""
        st = ctx.st
        path = f"{directory}/{name}"
        try:
            if wire is None:  # not delivered by us: count once, remember in the name and index
                wire = crlf_size(self._store._read(path))
                key = f"{key},W={wire}"
            date = os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        if uid is None:
            uid = self._allocate(ctx)
        elif uid >= st.uidnext:
            st.uidnext = uid + 1
        target = make_name(key, uid, letters)
        if directory != self._cur or target != name:
            try:
                os.rename(path, f"{self._cur}/{target}")
            except FileNotFoundError:
                return None
            ctx.synced_dirs.add(self._cur)
        rec = self._rec(ctx, uid, target, key, wire, date, 0, letters)
        st.put(rec)
        ctx.dirty = ctx.changed = True
        return rec

    def _allocate(self, ctx: _Ctx) -> int:
        st = ctx.st
        uid = st.uidnext
        if uid > ix.MAX_UID:
            raise StorageFailed("UID space exhausted")
        if uid >= st.reserved:  # record the mark before any file carries this UID
            self._reserve(ctx, uid + 1)
        st.uidnext = uid + 1
        return uid

    def _reserve(self, ctx: _Ctx, needed: int) -> None:
        st = ctx.st
        reserved = needed + ix.RESERVE_BLOCK
        current = ix.read_uidvalidity(self.path)
        if current is not None and current[0] == st.uidvalidity:
            reserved = max(reserved, current[1])
        ix.write_atomic(self._store._os, self.path, ix.UIDVALIDITY_NAME,
                        ix.format_uidvalidity(st.uidvalidity, reserved))
        st.reserved = reserved

    def _keyword_mask(self, ctx: _Ctx, keywords, *, create: bool) -> int:
        """The bits of `keywords` in the folder's table, adding the missing
        ones when `create` (ValueError when the table is full even after
        dropping unused keywords)."""
        st = ctx.st
        table = {known.lower(): i for i, known in enumerate(st.keywords)}
        missing = [k for k in keywords if k.lower() not in table]
        if create and missing:
            if len(st.keywords) + len(missing) > ix.MAX_KEYWORDS:
                self._collect_keywords(ctx)
            if len(st.keywords) + len(missing) > ix.MAX_KEYWORDS:
                raise ValueError(f"too many keywords in this folder (at most {ix.MAX_KEYWORDS})")
            st.keywords.extend(missing)
            ctx.dirty = True
            table = {known.lower(): i for i, known in enumerate(st.keywords)}
        mask = 0
        for keyword in keywords:
            i = table.get(keyword.lower())
            if i is not None:
                mask |= 1 << i
        return mask

    def _collect_keywords(self, ctx: _Ctx) -> None:
        """The table is full: drop keywords no message has (renumbering the rest)."""
        st = ctx.st
        used = 0
        for rec in st.recs.values():
            used |= rec.kw
        kept = [i for i in range(len(st.keywords)) if used >> i & 1]
        if len(kept) == len(st.keywords):
            return
        remap = {old: new for new, old in enumerate(kept)}
        st.keywords = [st.keywords[i] for i in kept]
        ctx.flagsets.clear()
        for uid, rec in list(st.recs.items()):
            if rec.kw:
                kw = sum(1 << remap[i] for i in kept if rec.kw >> i & 1)
                st.put(self._rec(ctx, uid, rec.name, rec.key, rec.size, rec.internaldate, kw, rec.letters), rec)
        ctx.dirty = True

    def _rec(self, ctx: _Ctx, uid, name, key, size, date, kw, letters) -> _Rec:
        flags = ctx.flagsets.get((letters, kw))
        if flags is None:
            names = {LETTER_FLAGS[c] for c in letters if c in LETTER_FLAGS}
            keywords = ctx.st.keywords
            names.update(keywords[i] for i in range(len(keywords)) if kw >> i & 1)
            flags = ctx.flagsets[(letters, kw)] = frozenset(names)
        return _Rec(uid, name, key, size, date, kw, letters, MessageInfo(uid, flags, size, date))

    def _commit(self, ctx: _Ctx) -> None:
        """End of a locked job: make renames durable, then write the index
        (once), then remember the directory mtimes we may trust."""
        st = ctx.st
        osc = self._store._os
        for directory in sorted(ctx.synced_dirs):
            ix.fsync_directory(osc, directory)
        if st.uidnext > st.reserved:
            self._reserve(ctx, st.uidnext)
        if ctx.dirty:
            st.generation += 1
            index = ix.Index(st.uidvalidity, st.uidnext, st.generation, st.keywords, [
                ix.Entry(r.uid, r.internaldate, r.size, r.kw, r.name) for r in st.recs.values()
            ])
            ix.write_atomic(osc, self.path, ix.INDEX_NAME, ix.format_index(index))
        limit = ctx.t0 - MTIME_SLACK_NS
        mtime = os.stat(self._cur).st_mtime_ns
        st.cur_sig = mtime if mtime < limit else None
        if ctx.scanned_new:
            mtime = os.stat(self._new).st_mtime_ns
            st.new_sig = mtime if mtime < limit else None
