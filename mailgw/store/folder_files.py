"""The pool-thread half of a Folder (folder.py): its state, and bringing that
state up to date with the files. Format: docs/store-format.md.

`_State` is what a Folder knows of its folder (UIDs, names, keys, flags);
`FolderFiles` holds the machinery every job of folder.py shares, all of it
blocking file work run in the store's thread pool under the folder's flock:
reading the index, reconciling it with listings of cur/ and new/ (renames by
other programs, removals, files to adopt), rebuilding a lost index from the
file names, reserving UIDs, and committing (directory fsyncs, then the
index). File names are parsed and built by mailgw.store.maildir_name only.
"""
from __future__ import annotations

import itertools
import os
import socket
import time

from mailgw.durable import fsync_directory, read_file
from mailgw.errors import StorageFailed
from mailgw.store import index as ix
from mailgw.store import maildir_name as mn
from mailgw.store.events import Added, Expunged, FlagsChanged, MessageInfo

# A directory mtime this close to the moment we looked may still change
# without changing its value (coarse file-system timestamps): such a value is
# not trusted to mean "unchanged" next time (docs/store-format.md §7).
MTIME_SLACK_NS = 1_000_000_000


class FolderGone(KeyError):
    """The folder's directory no longer exists (deleted or renamed)."""


def crlf_size(data: bytes) -> int:
    """Octets of `data` in wire form (every line end CRLF), as to_crlf makes it."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def to_crlf(data: bytes) -> bytes:
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r\n")


_counter = itertools.count(1)
_HOST = mn.escape_hostname(socket.gethostname() or "localhost")


def fresh_base() -> str:
    """A unique Maildir base name (same scheme as MaildirStore's deliveries)."""
    return mn.unique_base(time.time(), os.getpid(), next(_counter), _HOST)


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


# -- the machinery ----------------------------------------------------------------------------

class FolderFiles:
    """Base of Folder: the shared pool-thread machinery. Needs the attributes
    Folder.__init__ sets: _store, address, name, path and the paths _cur,
    _new, _tmp, _index_path, _lock_path."""

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
        return {mn.parse_name(name).key: name for name in self._list(directory)}

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
                key, _uid, _wire, letters = mn.parse_name(e.name)
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
            ((name, *mn.parse_name(name)) for name in names),
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
            key, uid_field, wire, letters = mn.parse_name(name)
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
        for name in sorted(self._list(self._new), key=mn.arrival_order):
            key, _uid, wire, letters = mn.parse_name(name)  # a U= in new/ means nothing
            if key in ctx.st.by_key:
                key = self._rekey(key)  # a second copy of a message we have
            rec = self._adopt(ctx, self._new, name, key, None, wire, letters)
            if rec is not None:
                ctx.recent.append(rec.uid)
                ctx.synced_dirs.add(self._new)

    def _rekey(self, key: str) -> str:
        return mn.rekey(key, fresh_base())

    def _adopt(self, ctx: _Ctx, directory: str, name: str, key: str, uid, wire, letters):
        """Give a file found on disk a record (and `uid`, or a new UID), and
        rename it into cur/ as <key>,U=<uid>:2,<letters>."""
        st = ctx.st
        path = f"{directory}/{name}"
        try:
            if wire is None:  # not delivered by us: count once, remember in the name and index
                wire = crlf_size(self._store._read(path))
                key = mn.with_wire(key, wire)
            date = os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        if uid is None:
            uid = self._allocate(ctx)
        elif uid >= st.uidnext:
            st.uidnext = uid + 1
        target = mn.make_name(key, uid, letters)
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
            names = set(mn.flags_of_letters(letters))
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
            fsync_directory(directory, osc=osc)
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
