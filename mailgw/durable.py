"""Durable file writes with group commit of directory fsyncs.

A write is durable once the file's data and its directory entry are on disk.
Where Linux allows it (O_TMPFILE and linkat(AT_EMPTY_PATH)):

    open an unnamed file in directory/      (a crash before the link leaves nothing)
    write all, fsync(file)
    linkat -> directory/name                 (EEXIST: never overwrites)
    fsync(directory)

and otherwise, with a named temporary file:

    open tmp_directory/name O_CREAT|O_EXCL   (never reuse someone else's file)
    write all, fsync(file), close            (data on disk)
    move tmp -> directory/name               (renameat2 NOREPLACE: EEXIST, never overwrites)
    fsync(directory)                         (the new entry is on disk)

Only then does the Deferred fire, so "250 OK" follows a crash-proof commit
(design §3.6). Everything runs in a thread pool, never on the reactor thread.

Group commit: a directory fsync persists every entry created in that directory
before the fsync *started*. So per directory at most one fsync runs at a time;
a commit that finished its renames registers as a waiter; the next fsync to
start takes every waiter registered so far and releases them all when it
returns. A waiter registered while an fsync is running waits for the next one:
that fsync may have begun before the waiter's rename, so it proves nothing for
it. See `_GroupSync` for the argument in the code. A commit that finds no fsync
running runs it in its own pool thread, with no further hand-off.

Thread model: `_GroupSync` is the only state shared between threads (one
lock). Per-commit bookkeeping (`_Commit.remaining`, the Deferred) is touched on
the reactor thread only, reached through a `ReactorInbox` (callFromThread
with one wake-up per burst).
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.errors import MailError, StorageFailed, StorageFull
from mailgw.interfaces import IDurableWriter
from mailgw.iopool import ReactorInbox

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _load_renameat2():
    """Linux renameat2(2) with RENAME_NOREPLACE, or None where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_AT_EMPTY_PATH = 0x1000


def _load_linkat():
    try:
        function = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_LINKAT = _load_linkat()
# Errors that mean "this kernel, filesystem or privilege level cannot do
# O_TMPFILE + linkat(AT_EMPTY_PATH)": fall back to a named tmp file for good.
_NO_TMPFILE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT,
                                errno.EPERM, errno.EXDEV, errno.ENOSYS})


class TmpfileUnsupported(Exception):
    """O_TMPFILE + linkat is not available here; use the named tmp file."""


def open_tmpfile(directory) -> int:
    """An unnamed file in `directory` (O_TMPFILE): if we crash before it is
    linked, it simply vanishes - nothing to clean up."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, FILE_MODE)
    except OSError as error:
        if error.errno in _NO_TMPFILE_ERRNOS - {errno.ENOENT}:
            raise TmpfileUnsupported() from error
        raise


def link_tmpfile(fd: int, destination) -> None:
    """Give the unnamed file its name; EEXIST rather than replacing a file.
    linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH on older kernels."""
    if _LINKAT is None:
        raise TmpfileUnsupported()
    if _LINKAT(fd, b"", _AT_FDCWD, os.fsencode(destination), _AT_EMPTY_PATH) != 0:
        error = ctypes.get_errno()
        if error in _NO_TMPFILE_ERRNOS:
            raise TmpfileUnsupported()
        raise OSError(error, os.strerror(error), str(destination))


def fsync_directory(directory, *, osc=os) -> None:
    """fsync a directory, so the names just made or removed in it survive a crash
    (blocking: call it off the reactor thread or outside the reactor).
    `osc`: where open/fsync/close come from - the os module, or an `_OSCalls`
    (a test double that records the calls or injects faults)."""
    fd = osc.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        osc.fsync(fd)
    finally:
        osc.close(fd)


def read_file(path) -> bytes:
    """The whole file in as few system calls as possible (open, read, close):
    in a pool thread each one is a GIL hand-off. FileNotFoundError (and
    every other OSError) as open(2) or read(2) report it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def rename_noreplace(source, destination) -> None:
    """Move `source` to `destination`, failing with EEXIST rather than
    replacing an existing file. One directory operation (renameat2) where
    the kernel and filesystem offer it; otherwise link(2) + unlink(2), which
    gives the same guarantee with two."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(error, os.strerror(error), str(source), None, str(destination))
    os.link(source, destination)
    os.unlink(source)


class _OSCalls:
    """The OS calls this module makes, in one place so tests can replace them
    (fault injection: raise ENOSPC at a chosen step; or record the order).

    `move` never replaces an existing name (rename_noreplace); `rename`
    does, and is used only to replace an envelope on purpose.
    """

    open = staticmethod(os.open)
    write = staticmethod(os.write)
    fsync = staticmethod(os.fsync)
    close = staticmethod(os.close)
    move = staticmethod(rename_noreplace)
    rename = staticmethod(os.rename)
    # One directory operation per file instead of create + rename; None
    # disables it (the test doubles record named tmp files).
    open_tmpfile = staticmethod(open_tmpfile)
    link_tmpfile = staticmethod(link_tmpfile)
    unlink = staticmethod(os.unlink)
    mkdir = staticmethod(os.mkdir)


class _Write:
    """One file of a commit. `final_path` is joined once: a commit needs it
    three or four times, and a pathlib join costs more than the rest of
    the bookkeeping of a small message."""

    __slots__ = ("directory", "tmp_directory", "final_name", "data", "replace", "final_path", "tmp_name")

    def __init__(self, directory: Path, tmp_directory: Path, final_name: str, data: bytes,
                 replace: bool = False, tmp_name: str | None = None):
        self.directory = directory
        self.tmp_directory = tmp_directory
        self.final_name = final_name
        self.data = data
        self.replace = replace     # overwrite an existing final file (envelope updates)
        self.final_path = directory / final_name
        # A new file's final name is unique (O_EXCL/link refuse a second one),
        # so it can name its tmp file too; a replacement's cannot (two replacements
        # of one name may overlap).
        self.tmp_name = tmp_name or final_name

    @property
    def tmp_path(self) -> Path:    # only the named-tmp-file path needs it
        return self.tmp_directory / self.tmp_name


def _as_path(path) -> Path:
    return path if isinstance(path, Path) else Path(path)


@dataclass
class _Commit:
    writes: list[_Write]
    deferred: Deferred
    directories: frozenset[Path]
    # Files this commit created and has not removed yet; removed on failure.
    # Touched by one pool thread at a time (the write job, later the cleanup
    # job), handed over through callFromThread / callInThread.
    created: list[Path] = field(default_factory=list)
    # Reactor thread only (set before the job is handed to the pool).
    remaining: int = 0
    first_error: Failure | None = None


def _disk_full(failure: Failure) -> bool:
    return bool(failure.check(OSError)) and failure.value.errno in _DISK_FULL_ERRNOS


def storage_error(failure: Failure) -> MailError:
    """The MailError to show a client for a failed write (RFC 3463 §3.4)."""
    if failure.check(MailError):
        return failure.value
    if _disk_full(failure):
        return StorageFull()
    return StorageFailed()


class _GroupSync:
    """Per-directory group commit of fsyncs, shared by the pool threads.

    Invariant: `_waiters` has a key for a directory exactly while one runner
    for it is scheduled or running. The list holds the callbacks registered
    since that runner's current fsync started (or since it was scheduled).

    Why a waiter is only released by an fsync that started after its rename:
    the caller registers after its rename returned (program order, same
    thread); the runner takes the list under the lock and only then calls
    fsync, so every waiter it takes was appended - hence renamed - before that
    fsync began. Waiters appended during the fsync land in the fresh list and
    are taken by the runner's next round.
    """

    def __init__(self, fsync_directory: Callable[[Path], None], dispatch: Callable[..., bool]):
        self._fsync_directory = fsync_directory
        self._dispatch = dispatch  # run in the pool; False if the pool is stopped
        self._lock = threading.Lock()
        self._waiters: dict[Path, list[Callable[[Failure | None], None]]] = {}

    def request(self, directory: Path, on_synced: Callable[[Failure | None], None], *,
                inline: bool = False) -> None:
        """Call `on_synced(None)` (or with the Failure) from a pool thread once
        an fsync of `directory` that started after this call has finished.
        With `inline`, a caller (a pool thread with nothing else left to do)
        that finds no runner becomes the runner itself: one thread hand-off
        less per commit when commits do not overlap."""
        with self._lock:
            waiters = self._waiters.get(directory)
            if waiters is not None:
                waiters.append(on_synced)  # the active runner's next round takes it
                return
            self._waiters[directory] = [on_synced]
        if inline or not self._dispatch(self._run, directory):
            self._run(directory)  # (or the pool is stopping: we are on a pool thread, finish here)

    def _run(self, directory: Path) -> None:
        # One runner per directory, looping while there are waiters: under
        # load every round serves everyone who arrived during the last fsync.
        while True:
            with self._lock:
                batch = self._waiters[directory]
                if not batch:
                    del self._waiters[directory]
                    return
                self._waiters[directory] = []
            try:
                self._fsync_directory(directory)
                outcome = None
            except BaseException:
                outcome = Failure()
            for on_synced in batch:
                on_synced(outcome)


_O_TMPFILE_AVAILABLE = hasattr(os, "O_TMPFILE") and _LINKAT is not None


@implementer(IDurableWriter)
class DurableWriter:
    """Crash-safe file creation for the Maildir store and the relay spool.

    `threadpool` is a started `mailgw.iopool.IOThreadPool` (or anything
    with `callInThread(f, *args)` and `joined`, such as Twisted's
    ThreadPool); its owner starts and stops it.
    """

    log = Logger()

    def __init__(self, *, reactor, threadpool):
        # Completions go back through one inbox: a burst of them wakes the reactor once.
        self._to_reactor = ReactorInbox(reactor)
        self._pool = threadpool
        self._os = _OSCalls()
        self._tmpfile = _O_TMPFILE_AVAILABLE     # cleared for good at the first sign it does not work
        self._group_sync = _GroupSync(self._fsync_directory, self._dispatch)
        # Removals waiting for a pool job (see remove()): (paths, sync, Deferred).
        self._removal_lock = threading.Lock()
        self._removals: list[tuple[list[Path], bool, Deferred]] = []
        self._removal_scheduled = False
        # Tmp names of replacements: unique per write, so two replacements of
        # one name never share a tmp file (next() on a count is atomic under the GIL).
        self._replace_serial = itertools.count()

    # -- public API -----------------------------------------------------------

    def commit(self, writes) -> Deferred:
        """`writes`: [(directory, tmp_directory, final_name, data)]. Deferred
        firing with the final paths (same order) once every file and every
        directory entry is on disk; on failure nothing of this call is left
        behind and it fails with StorageFull or StorageFailed."""
        parsed = [_Write(_as_path(d), _as_path(t), _checked_name(n), bytes(b)) for d, t, n, b in writes]
        if not parsed:
            return succeed([])
        finals = [w.final_path for w in parsed]
        if len(set(finals)) != len(finals):
            raise ValueError("the same final path twice in one commit")
        directories = frozenset(w.directory for w in parsed)
        job = _Commit(parsed, Deferred(), directories, remaining=len(directories))
        if not self._dispatch(self._write_files, job):
            self._fail(job, Failure(RuntimeError("I/O thread pool stopped")))
        return job.deferred

    def replace(self, directory, tmp_directory, final_name: str, data: bytes) -> Deferred:
        """Like commit() for one file, but atomically replaces an existing
        `directory/final_name` (rename(2)): readers see the old or the new
        content, never a mix. For state that changes (the spool's envelopes).
        Each call writes its own tmp file (`<name>.<pid>.<serial>.tmp`), so
        overlapping calls never collide; which one lands last is not defined,
        so a caller that cares about order runs one per name at a time (the
        spool does: Spool.update)."""
        final_name = _checked_name(final_name)
        tmp_name = f"{final_name}.{os.getpid()}.{next(self._replace_serial)}.tmp"
        write = _Write(_as_path(directory), _as_path(tmp_directory), final_name, bytes(data),
                       replace=True, tmp_name=tmp_name)
        job = _Commit([write], Deferred(), frozenset([write.directory]), remaining=1)
        if not self._dispatch(self._write_files, job):
            self._fail(job, Failure(RuntimeError("I/O thread pool stopped")))
        return job.deferred.addCallback(lambda paths: paths[0])

    def ensure_directories(self, root: Path, directories) -> Deferred:
        """Create `directories` (each below `root`, which must exist) and every
        missing directory between, mode 0700, then fsync the parent of each
        directory on those chains - created now or earlier, since an entry
        created by a previous process may still be only in the page cache.
        Deferred fires with None when all are on disk."""
        root = Path(root)
        directories = [Path(d) for d in directories]
        for directory in directories:
            directory.relative_to(root)  # ValueError if outside
        d = Deferred()

        def work():
            try:
                self._make_chains(root, directories)
            except BaseException:
                self._to_reactor.callFromThread(self._errback_logged, d, Failure(), "creating directories")
            else:
                self._to_reactor.callFromThread(d.callback, None)

        if not self._dispatch(work):
            self._errback_logged(d, Failure(RuntimeError("I/O thread pool stopped")), "creating directories")
        return d

    def remove(self, paths, *, sync: bool = True) -> Deferred:
        """Undo committed files (in order), then fsync their directories
        (unless `sync` is false: a removal lost in a crash only repeats work).
        Missing files are fine. Never fails: errors are logged, and the
        Deferred fires with None either way.

        Removals are batched: while one pool job unlinks, later requests
        gather and the next round takes them all, with one fsync per
        directory, so a busy relay queue (one removal per delivered message)
        pays one hand-off per batch, not per message."""
        paths = [Path(p) for p in paths]
        d = Deferred()
        with self._removal_lock:
            self._removals.append((paths, sync, d))
            if self._removal_scheduled:
                return d
            self._removal_scheduled = True
        if not self._dispatch(self._remove_batches):
            # Pool stopped (shutdown): unlink here, on the reactor thread, rather
            # than leave an entry whose redelivery would be a duplicate.
            self._remove_batches()
        return d

    # -- pool thread ----------------------------------------------------------

    def _remove_batches(self) -> None:
        """Carry out every queued removal, batch after batch, until none is
        left; each batch's Deferreds fire with one hand-off."""
        while True:
            with self._removal_lock:
                batch, self._removals = self._removals, []
                if not batch:
                    self._removal_scheduled = False
                    return
            failed = []
            for paths, _, _ in batch:
                for path in paths:
                    try:
                        self._os.unlink(path)
                    except FileNotFoundError:
                        pass
                    except Exception as error:    # logged; never left scheduled for good
                        failed.append((path, error))
            for directory in sorted({path.parent for paths, sync, _ in batch if sync for path in paths}):
                try:
                    self._fsync_directory(directory)
                except Exception as error:
                    failed.append((directory, error))
            self._to_reactor.callFromThread(self._removed, [d for _, _, d in batch], failed)

    def _removed(self, deferreds: list[Deferred], failed) -> None:
        for path, error in failed:
            self.log.error("removing files: {path} failed: {error}", path=path, error=error)
        for d in deferreds:
            d.callback(None)

    def _dispatch(self, f, *args) -> bool:
        if getattr(self._pool, "joined", False):  # ThreadPool drops work silently once stopped
            return False
        self._pool.callInThread(f, *args)
        return True

    def _write_files(self, job: _Commit) -> None:
        try:
            for write in job.writes:  # in order: the spool relies on it (.msg before .env)
                self._write_one(write, job.created)
        except BaseException:
            failure = Failure()
            self._remove_created(job)
            self._to_reactor.callFromThread(self._fail, job, failure)
            return
        # Every rename of this commit has returned; only now ask for directory
        # fsyncs, so each one we get started after all our renames.
        def on_synced(outcome: Failure | None) -> None:
            self._to_reactor.callFromThread(self._directory_synced, job, outcome)

        *others, last = job.directories
        for directory in others:
            self._group_sync.request(directory, on_synced)
        # This thread's work for the commit is done: it may run the last sync itself.
        self._group_sync.request(last, on_synced, inline=True)

    def _write_one(self, write: _Write, created: list[Path]) -> None:
        if self._tmpfile and not write.replace and getattr(self._os, "open_tmpfile", None):
            try:
                return self._write_unnamed(write, created)
            except TmpfileUnsupported:
                self._tmpfile = False
                self._to_reactor.callFromThread(
                    self.log.info, "O_TMPFILE + linkat unavailable here; using named tmp files")
        o = self._os
        fd = o.open(write.tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, FILE_MODE)
        created.append(write.tmp_path)  # O_EXCL: it is ours to remove
        try:
            view = memoryview(write.data)
            while view:  # os.write may write less than asked (signals, pipes, quotas)
                view = view[o.write(fd, view):]
            o.fsync(fd)
        finally:
            o.close(fd)
        if write.replace:
            o.rename(write.tmp_path, write.final_path)
            created.remove(write.tmp_path)  # the old content is gone: nothing to undo
            return
        o.move(write.tmp_path, write.final_path)  # EEXIST rather than overwrite
        created.remove(write.tmp_path)
        created.append(write.final_path)

    def _write_unnamed(self, write: _Write, created: list[Path]) -> None:
        o = self._os
        fd = o.open_tmpfile(write.directory)
        try:
            view = memoryview(write.data)
            while view:
                view = view[o.write(fd, view):]
            o.fsync(fd)
            o.link_tmpfile(fd, write.final_path)      # EEXIST rather than overwrite
            created.append(write.final_path)
        finally:
            o.close(fd)

    def _fsync_directory(self, directory: Path) -> None:
        # Through self._os, looked up at each call: tests replace it after construction.
        fsync_directory(directory, osc=self._os)

    def _make_chains(self, root: Path, directories: list[Path]) -> None:
        parents: set[Path] = set()
        for directory in directories:
            current = root
            for part in directory.relative_to(root).parts:
                parents.add(current)
                current = current / part
                try:
                    self._os.mkdir(current, DIRECTORY_MODE)
                except FileExistsError:
                    pass  # ours from earlier, or a racing delivery; fsynced below either way
        for parent in sorted(parents):
            self._fsync_directory(parent)

    def _remove_created(self, job: _Commit) -> None:
        # Best effort; not fsynced: if a removal is lost in a crash the client,
        # who got a 4xx, retries and the message exists twice - never lost.
        for path in reversed(job.created):
            try:
                self._os.unlink(path)
            except OSError:
                pass
        job.created.clear()

    def _cleanup_then_fail(self, job: _Commit, failure: Failure) -> None:
        self._remove_created(job)
        self._to_reactor.callFromThread(self._fail, job, failure)

    # -- reactor thread -------------------------------------------------------

    def _directory_synced(self, job: _Commit, outcome: Failure | None) -> None:
        job.remaining -= 1
        if outcome is not None and job.first_error is None:
            job.first_error = outcome
        if job.remaining:
            return
        if job.first_error is None:
            job.deferred.callback([w.final_path for w in job.writes])
        elif not self._dispatch(self._cleanup_then_fail, job, job.first_error):
            self._fail(job, job.first_error)

    def _fail(self, job: _Commit, failure: Failure) -> None:
        self._errback_logged(job.deferred, failure, "durable write")

    def _errback_logged(self, d: Deferred, failure: Failure, what: str) -> None:
        if _disk_full(failure):
            # Expected in operation, and the client gets 452 4.3.1: one line, no traceback.
            self.log.error("{what} failed: disk full ({error})", what=what, error=failure.value)
        elif not failure.check(MailError):
            self.log.failure("{what} failed", failure, what=what)
        d.errback(storage_error(failure))


def _checked_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


# -- small private files (TLS keys, the ACME account): blocking, for start-up and threads --

def write_private_tmp(path: Path, data: bytes) -> Path:
    """`data` in PATH.tmp, mode 0600 (even over a stale tmp of another mode), fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600 (blocking)."""
    tmp = write_private_tmp(path, data)
    os.replace(tmp, path)
    fsync_directory(path.parent)
