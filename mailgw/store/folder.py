"""One Maildir folder with persistent UIDs (IFolder). Format: docs/store-format.md.

Threads. The in-memory state of a Folder is a `_State` owned by the reactor
thread. Every operation runs under the Folder's DeferredLock as ONE job in
the store's thread pool: the job gets the current `_State` as a read-only
snapshot, works on a copy (under the folder's flock when it reads or
changes the files), and returns the new `_State` plus the events; back on the
reactor thread the new state replaces the old one (states are never changed
in place once handed over) and the events are published. The machinery the
jobs share (sync, recovery, commit) is FolderFiles, in folder_files.py.

Files. A message in cur/ is named `<key>,U=<uid>:2,<letters>` where `<key>`
is the name it was delivered under minus any U= field (it carries S= and W=),
so a lost index is rebuilt from the names (mailgw.store.maildir_name). The
index adds what names cannot carry: keywords, cached sizes and INTERNALDATEs,
and which name is which UID when someone else renamed a file.
"""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from twisted.internet.defer import DeferredLock, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.errors import MailError, StorageFull
from mailgw.interfaces import IFolder
from mailgw.store import index as ix
from mailgw.store import maildir_name as mn
from mailgw.store.events import Expunged, SyncResult
from mailgw.store.folder_files import FolderFiles, FolderGone, _Outcome, _State, crlf_size, fresh_base, to_crlf

MODES = mn.MODES


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
            letter = mn.letter_of_flag(flag)
            if letter is None:
                raise ValueError(f"not a storable system flag: {flag!r}")
            letters.add(letter)
        elif ix.valid_keyword(flag):
            if flag.lower() not in seen:
                seen.add(flag.lower())
                keywords.append(flag)
        else:
            raise ValueError(f"not a valid keyword: {flag!r}")
    return frozenset(letters), tuple(keywords)


# -- the folder ---------------------------------------------------------------------------

@implementer(IFolder)
class Folder(FolderFiles):
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
                size = mn.size_from_name(rec.key)
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
                    new_letters = letters_after[rec.letters] = mn.change_letters(rec.letters, letters, mode)
                kw = rec.kw | mask if mode == "add" else rec.kw & ~mask if mode == "remove" else mask
                if new_letters == rec.letters and kw == rec.kw:
                    result[uid] = rec.info.flags
                    continue
                name = mn.make_name(rec.key, uid, new_letters)
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
        size = mn.size_from_name(key)
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
        key = mn.delivery_name(fresh_base(), len(stored), crlf_size(stored))
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
                info_letters = mn.sorted_letters(letters)
                name = mn.make_name(key, uid, info_letters)
                osc.move(tmp, f"{self._cur}/{name}")
                tmp = None
                ctx.synced_dirs.add(self._cur)
                ctx.st.put(self._rec(ctx, uid, name, key, crlf_size(stored), date, mask, info_letters))
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
                    key = mn.copy_key(src_key, fresh_base(), size)
                    uid = self._allocate(ctx)
                    name = mn.make_name(key, uid, letters)
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
                    on_disk = mn.size_from_name(key)
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
        tmp = f"{self._tmp}/{mn.strip_info(os.path.basename(target))}"
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

