"""DurableWriter: tmp -> fsync -> move (no replace) -> fsync(dir), group commit, cleanup on failure."""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
from pathlib import Path

import pytest
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mailgw import durable
from mailgw.durable import DurableWriter, rename_noreplace
from mailgw.errors import StorageFailed, StorageFull
from mailgw.interfaces import IDurableWriter
from threadless import ImmediatePool, ThreadlessClock


# -- fakes --------------------------------------------------------------------


class ManualPool:
    """Jobs wait until the test runs them, one at a time, in order."""

    joined = False

    def __init__(self):
        self.jobs = []

    def callInThread(self, f, *args, **kwargs):
        self.jobs.append((f, args, kwargs))

    def run_next(self):
        f, args, kwargs = self.jobs.pop(0)
        f(*args, **kwargs)


class Fault:
    def __init__(self, op, match, err):
        self.op, self.match, self.err = op, match, err
        self.remaining = 1


class RecordingOS:
    """The real OS calls, recorded as (op, path), with injectable faults and a
    hook that runs while a directory fsync is "in progress"."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.faults: list[Fault] = []
        self.during_directory_fsync = None  # called once, inside the next dir fsync
        self.max_write = None  # force short writes
        self._paths: dict[int, Path] = {}

    def fail(self, op, match=lambda path: True, err=errno.ENOSPC):
        self.faults.append(Fault(op, match, err))

    def _check(self, op, path):
        for fault in self.faults:
            if fault.remaining and fault.op == op and fault.match(Path(path)):
                fault.remaining -= 1
                raise OSError(fault.err, os.strerror(fault.err), str(path))

    def open(self, path, flags, mode=0o777):
        self.calls.append(("open", Path(path)))
        self._check("open", path)
        fd = os.open(path, flags, mode)
        self._paths[fd] = Path(path)
        return fd

    def write(self, fd, data):
        self.calls.append(("write", self._paths[fd]))
        self._check("write", self._paths[fd])
        if self.max_write is not None:
            data = data[: self.max_write]
        return os.write(fd, data)

    def fsync(self, fd):
        path = self._paths[fd]
        self.calls.append(("fsync", path))
        self._check("fsync", path)
        if path.is_dir() and self.during_directory_fsync is not None:
            hook, self.during_directory_fsync = self.during_directory_fsync, None
            hook()
        os.fsync(fd)
        self.calls.append(("fsynced", path))

    def close(self, fd):
        self.calls.append(("close", self._paths.pop(fd)))
        os.close(fd)

    def move(self, src, dst):
        self.calls.append(("move", Path(dst)))
        self._check("move", dst)
        rename_noreplace(src, dst)

    def rename(self, src, dst):
        self.calls.append(("rename", Path(dst)))
        self._check("rename", dst)
        os.rename(src, dst)

    def unlink(self, path):
        self.calls.append(("unlink", Path(path)))
        self._check("unlink", path)
        os.unlink(path)

    def mkdir(self, path, mode=0o777):
        self.calls.append(("mkdir", Path(path)))
        self._check("mkdir", path)
        os.mkdir(path, mode)


def result_of(d):
    """The result of a Deferred that has already fired (failures returned)."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def make_dirs(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / "tmp"
    final.mkdir()
    tmp.mkdir()
    return final, tmp


@pytest.fixture
def recording_writer():
    writer = DurableWriter(reactor=ThreadlessClock(), threadpool=ImmediatePool())
    writer._os = RecordingOS()
    writer.events = []
    writer.log = Logger(observer=writer.events.append)
    return writer


# -- tests --------------------------------------------------------------------


def test_provides_the_interface():
    writer = DurableWriter(reactor=ThreadlessClock(), threadpool=ImmediatePool())
    assert verifyObject(IDurableWriter, writer)


def test_files_land_with_their_data_and_tmp_is_empty(tmp_path, recording_writer):
    final, tmp = make_dirs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    d = recording_writer.commit([(final, tmp, "a", b"alpha"), (other, tmp, "b", b"beta" * 10000)])
    assert result_of(d) == [final / "a", other / "b"]
    assert (final / "a").read_bytes() == b"alpha"
    assert (other / "b").read_bytes() == b"beta" * 10000
    assert (final / "a").stat().st_mode & 0o777 == 0o600
    assert list(tmp.iterdir()) == []
    synced = [path for op, path in recording_writer._os.calls if op == "fsynced"]
    # Both files and both directories reached the disk.
    assert set(synced) == {tmp / "a", tmp / "b", final, other}


def test_order_is_write_fsync_link_then_directory_fsync(tmp_path, recording_writer):
    final, tmp = make_dirs(tmp_path)
    result_of(recording_writer.commit([(final, tmp, "a", b"x")]))
    ops = [(op, path) for op, path in recording_writer._os.calls if op != "close"]
    assert ops == [
        ("open", tmp / "a"),
        ("write", tmp / "a"),
        ("fsync", tmp / "a"),
        ("fsynced", tmp / "a"),
        ("move", final / "a"),
        ("open", final),
        ("fsync", final),
        ("fsynced", final),
    ]


def test_short_writes_are_completed(tmp_path, recording_writer):
    final, tmp = make_dirs(tmp_path)
    recording_writer._os.max_write = 7
    data = bytes(range(256)) * 3
    result_of(recording_writer.commit([(final, tmp, "a", data)]))
    assert (final / "a").read_bytes() == data


def test_empty_commit_fires_at_once(recording_writer):
    assert result_of(recording_writer.commit([])) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_names_must_be_plain(tmp_path, recording_writer, name):
    final, tmp = make_dirs(tmp_path)
    with pytest.raises(ValueError):
        recording_writer.commit([(final, tmp, name, b"x")])


# Each step of the second of two writes (so the first one's finished file must
# be removed too), and the directory fsync that follows them.
STEPS = [
    ("open", lambda p: p.name == "b"),
    ("write", lambda p: p.name == "b"),
    ("fsync", lambda p: p.name == "b"),
    ("move", lambda p: p.name == "b"),
    ("fsync", lambda p: p.name == "final"),
]


@pytest.mark.parametrize("op,match", STEPS, ids=[f"{op}-{i}" for i, (op, _) in enumerate(STEPS)])
def test_disk_full_at_any_step_fails_with_storage_full_and_leaves_nothing(
    tmp_path, recording_writer, op, match
):
    final, tmp = make_dirs(tmp_path)
    recording_writer._os.fail(op, match, errno.ENOSPC)
    outcome = result_of(recording_writer.commit([(final, tmp, "a", b"1"), (final, tmp, "b", b"2")]))
    assert outcome.check(StorageFull)
    assert outcome.value.code == 452 and outcome.value.enhanced == "4.3.1"
    assert list(tmp.iterdir()) == []
    assert list(final.iterdir()) == []
    # The OS error is logged (one line: disk full is an operating condition,
    # not a bug, so no traceback), not shown to the client.
    [event] = recording_writer.events
    assert "log_failure" not in event and event["error"].errno == errno.ENOSPC
    assert event["log_level"].name == "error"
    outcome.trap(StorageFull)


def test_quota_exceeded_is_storage_full(tmp_path, recording_writer):
    final, tmp = make_dirs(tmp_path)
    recording_writer._os.fail("write", err=errno.EDQUOT)
    outcome = result_of(recording_writer.commit([(final, tmp, "a", b"1")]))
    outcome.trap(StorageFull)


@pytest.mark.parametrize("op", ["open", "write", "fsync", "move"])
def test_other_errors_are_storage_failed(tmp_path, recording_writer, op):
    final, tmp = make_dirs(tmp_path)
    recording_writer._os.fail(op, err=errno.EIO)
    outcome = result_of(recording_writer.commit([(final, tmp, "a", b"1")]))
    assert outcome.check(StorageFailed)
    assert (outcome.value.code, outcome.value.enhanced) == (451, "4.3.0")
    assert list(tmp.iterdir()) == [] and list(final.iterdir()) == []
    outcome.trap(StorageFailed)


def test_never_overwrites_an_existing_final_file(tmp_path, recording_writer):
    final, tmp = make_dirs(tmp_path)
    (final / "a").write_bytes(b"old")
    outcome = result_of(recording_writer.commit([(final, tmp, "a", b"new")]))
    outcome.trap(StorageFailed)
    assert (final / "a").read_bytes() == b"old"  # not replaced, and not removed by cleanup
    assert list(tmp.iterdir()) == []


def test_never_removes_a_tmp_file_it_did_not_create(tmp_path, recording_writer):
    final, tmp = make_dirs(tmp_path)
    (tmp / "a").write_bytes(b"someone else's")
    result_of(recording_writer.commit([(final, tmp, "a", b"new")])).trap(StorageFailed)
    assert (tmp / "a").read_bytes() == b"someone else's"
    assert list(final.iterdir()) == []


def test_stopped_pool_fails_instead_of_hanging(tmp_path):
    pool = ImmediatePool()
    pool.joined = True
    writer = DurableWriter(reactor=ThreadlessClock(), threadpool=pool)
    writer.log = Logger(observer=lambda event: None)
    final, tmp = make_dirs(tmp_path)
    result_of(writer.commit([(final, tmp, "a", b"1")])).trap(StorageFailed)


# -- group commit ---------------------------------------------------------------


def manual_writer():
    pool = ManualPool()
    writer = DurableWriter(reactor=ThreadlessClock(), threadpool=pool)
    writer._os = RecordingOS()
    return writer, pool


def directory_fsyncs(writer, directory):
    return [c for c in writer._os.calls if c == ("fsync", directory)]


def test_the_writing_thread_runs_the_directory_fsync_itself(tmp_path):
    """No runner active: the pool thread that wrote the file syncs the
    directory in the same job, with no second hand-off."""
    writer, pool = manual_writer()
    final, tmp = make_dirs(tmp_path)
    d = writer.commit([(final, tmp, "a", b"a")])
    assert len(pool.jobs) == 1
    pool.run_next()
    assert result_of(d) == [final / "a"]
    assert pool.jobs == [] and len(directory_fsyncs(writer, final)) == 1


def test_commits_renamed_during_a_directory_fsync_share_the_next_one(tmp_path):
    writer, pool = manual_writer()
    final, tmp = make_dirs(tmp_path)
    da = writer.commit([(final, tmp, "a", b"a")])
    db = writer.commit([(final, tmp, "b", b"b")])
    dc = writer.commit([(final, tmp, "c", b"c")])
    writer._os.during_directory_fsync = lambda: (pool.run_next(), pool.run_next())  # b and c
    pool.run_next()   # writes a and syncs; b and c are renamed meanwhile and join one round
    assert result_of(da) == [final / "a"] and result_of(db) == [final / "b"] and result_of(dc) == [final / "c"]
    assert len(directory_fsyncs(writer, final)) == 2
    assert pool.jobs == []
    calls = writer._os.calls
    second = len(calls) - 1 - calls[::-1].index(("fsync", final))
    assert second > calls.index(("move", final / "b")) and second > calls.index(("move", final / "c"))


def test_commit_renamed_during_a_directory_fsync_waits_for_the_next(tmp_path):
    writer, pool = manual_writer()
    final, tmp = make_dirs(tmp_path)
    order = writer._os.calls
    da = writer.commit([(final, tmp, "a", b"a")])
    dc = writer.commit([(final, tmp, "c", b"c")])
    da.addCallback(lambda _: order.append(("fired", "a")))
    dc.addCallback(lambda _: order.append(("fired", "c")))
    writer._os.during_directory_fsync = pool.run_next  # c is written while a's fsync runs
    pool.run_next()                                    # writes a, then runs the directory fsync
    assert pool.jobs == []
    events = [c for c in order if c[0] in ("move", "fsync", "fsynced", "fired") and c[1] != tmp / "a"]
    events = [c for c in events if c[1] != tmp / "c"]
    assert events == [
        ("move", final / "a"),
        ("fsync", final),          # first round: takes only a
        ("move", final / "c"),     # c renamed while it runs
        ("fsynced", final),
        ("fired", "a"),
        ("fsync", final),          # c's own round: started after its rename
        ("fsynced", final),
        ("fired", "c"),
    ]
    assert result_of(dc) is None


def test_failed_directory_fsync_fails_and_cleans_every_waiter(tmp_path):
    writer, pool = manual_writer()
    writer.log = Logger(observer=lambda event: None)
    final, tmp = make_dirs(tmp_path)
    directory_syncs = []

    def second_directory_sync(path):
        if path != final:
            return False
        directory_syncs.append(path)
        return len(directory_syncs) == 2

    writer._os.fail("fsync", second_directory_sync, errno.ENOSPC)
    da = writer.commit([(final, tmp, "a", b"a")])
    db = writer.commit([(final, tmp, "b", b"b")])
    dc = writer.commit([(final, tmp, "c", b"c")])
    writer._os.during_directory_fsync = lambda: (pool.run_next(), pool.run_next())  # b and c
    pool.run_next()   # a's round succeeds; the round of b and c fails
    while pool.jobs:
        pool.run_next()   # their cleanup
    assert result_of(da) == [final / "a"]
    result_of(db).trap(StorageFull)
    result_of(dc).trap(StorageFull)
    assert list(final.iterdir()) == [final / "a"] and list(tmp.iterdir()) == []
    # The next commit gets a fresh fsync and succeeds.
    dd = writer.commit([(final, tmp, "d", b"d")])
    while pool.jobs:
        pool.run_next()
    assert result_of(dd) == [final / "d"]


def test_ensure_directories_creates_chains_and_fsyncs_their_parents(tmp_path, recording_writer):
    root = tmp_path / "root"
    root.mkdir()
    box = root / "example.org" / "alice"
    result_of(recording_writer.ensure_directories(root, [box / "tmp", box / "new"]))
    assert (box / "tmp").is_dir() and (box / "new").is_dir()
    assert (box / "tmp").stat().st_mode & 0o777 == 0o700
    synced = {path for op, path in recording_writer._os.calls if op == "fsynced"}
    assert synced == {root, root / "example.org", box}
    # Existing directories are fine, and their parents are fsynced again.
    recording_writer._os.calls.clear()
    result_of(recording_writer.ensure_directories(root, [box / "tmp"]))
    assert {path for op, path in recording_writer._os.calls if op == "fsynced"} == {
        root, root / "example.org", box
    }


def test_ensure_directories_failure_is_a_storage_error(tmp_path, recording_writer):
    root = tmp_path / "root"
    root.mkdir()
    recording_writer._os.fail("mkdir", err=errno.ENOSPC)
    result_of(recording_writer.ensure_directories(root, [root / "x"])).trap(StorageFull)


def test_ensure_directories_refuses_paths_outside_root(tmp_path, recording_writer):
    with pytest.raises(ValueError):
        recording_writer.ensure_directories(tmp_path / "root", [tmp_path / "elsewhere"])


# -- the real thread pool ---------------------------------------------------------


class QueueReactor:
    """callFromThread hands the call to the test's thread, like a reactor."""

    def __init__(self):
        self.calls = queue.Queue()
        self.thread = threading.current_thread()

    def callFromThread(self, f, *args, **kwargs):
        self.calls.put((f, args, kwargs))

    def run_until(self, condition, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            f, args, kwargs = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args, **kwargs)


def test_real_thread_pool_concurrent_commits(tmp_path):
    reactor = QueueReactor()
    pool = ThreadPool(minthreads=4, maxthreads=8, name="test-durable")
    pool.start()
    try:
        writer = DurableWriter(reactor=reactor, threadpool=pool)
        on_reactor = []
        final, tmp = make_dirs(tmp_path)
        results = {}
        for i in range(64):
            d = writer.commit([(final, tmp, f"m{i}", b"%d" % i * 1000)])

            def done(result, i=i):
                results[i] = result
                on_reactor.append(threading.current_thread())

            d.addBoth(done)
        reactor.run_until(lambda: len(results) == 64)
    finally:
        pool.stop()
    assert all(results[i] == [final / f"m{i}"] for i in range(64))
    assert all(thread is reactor.thread for thread in on_reactor)  # Deferreds fire on the "reactor"
    assert all((final / f"m{i}").read_bytes() == b"%d" % i * 1000 for i in range(64))
    assert list(tmp.iterdir()) == []


def test_pool_stopping_after_the_writes_still_syncs_and_fires(tmp_path):
    writer, pool = manual_writer()
    final, tmp = make_dirs(tmp_path)
    d = writer.commit([(final, tmp, "a", b"a")])
    pool.joined = True  # stop() called while the write job was queued: it still runs
    pool.run_next()
    assert result_of(d) == [final / "a"]
    assert pool.jobs == []


def test_remove_unlinks_in_order_then_syncs_and_never_fails(tmp_path, recording_writer):
    final, tmp = make_dirs(tmp_path)
    result_of(recording_writer.commit([(final, tmp, "a", b"a"), (final, tmp, "b", b"b")]))
    recording_writer._os.calls.clear()
    assert result_of(recording_writer.remove([final / "b", final / "missing", final / "a"])) is None
    assert list(final.iterdir()) == []
    calls = [c for c in recording_writer._os.calls if c[0] in ("unlink", "fsynced")]
    assert calls == [("unlink", final / "b"), ("unlink", final / "missing"), ("unlink", final / "a"),
                     ("fsynced", final)]


def test_unsynced_removals_are_batched_into_one_pool_job_and_never_synced(tmp_path):
    writer, pool = manual_writer()
    final, tmp = make_dirs(tmp_path)
    names = ["a", "b", "c", "d"]
    for name in names:
        (final / name).write_bytes(b"x")
    first = writer.remove([final / "a"], sync=False)
    second = writer.remove([final / "b", final / "missing"], sync=False)
    assert len(pool.jobs) == 1                     # the second waits for the first's job

    def arrives_while_unlinking():                 # taken by the same job's next round
        third.append(writer.remove([final / "c"], sync=False))

    third = []
    real_unlink = writer._os.unlink

    def unlink(path):
        if path == final / "a" and not third:
            arrives_while_unlinking()
        return real_unlink(path)

    writer._os.unlink = unlink
    pool.run_next()
    assert pool.jobs == []
    assert sorted(p.name for p in final.iterdir()) == ["d"]
    assert first.called and second.called and third[0].called
    assert not [c for c in writer._os.calls if c[0] in ("fsync", "fsynced")]
    # the batch job is over: the next removal schedules a new one
    writer.remove([final / "d"], sync=False)
    assert len(pool.jobs) == 1
    pool.run_next()
    assert list(final.iterdir()) == []


def test_a_batch_fsyncs_each_directory_of_its_synced_removals_once(tmp_path):
    writer, pool = manual_writer()
    final, tmp = make_dirs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for path in (final / "a", final / "b", other / "c"):
        path.write_bytes(b"x")
    done = [writer.remove([final / "a"]), writer.remove([final / "b"]), writer.remove([other / "c"], sync=False)]
    pool.run_next()
    assert all(d.called for d in done)
    assert [c for c in writer._os.calls if c[0] == "fsynced"] == [("fsynced", final)]


@pytest.mark.parametrize("sync", [True, False])
def test_a_failed_removal_is_logged_and_still_fires(tmp_path, recording_writer, sync):
    final, tmp = make_dirs(tmp_path)
    (final / "e").write_bytes(b"e")
    recording_writer._os.fail("unlink", err=errno.EIO)
    assert result_of(recording_writer.remove([final / "e"], sync=sync)) is None     # logged, not raised
    assert any("removing" in e.get("log_format", "") and e.get("path") == final / "e"
               for e in recording_writer.events)


def test_an_unexpected_removal_error_does_not_stop_later_removals(tmp_path, recording_writer):
    """Not only OSError: whatever a removal raises is logged, and the batch
    mechanism is not left scheduled for good (later removals still run)."""
    final, tmp = make_dirs(tmp_path)
    (final / "a").write_bytes(b"a")
    (final / "b").write_bytes(b"b")
    real_unlink = recording_writer._os.unlink

    def unlink(path):
        if path == final / "a":
            raise ValueError("unexpected")
        real_unlink(path)

    recording_writer._os.unlink = unlink
    assert result_of(recording_writer.remove([final / "a"])) is None
    assert any(e.get("path") == final / "a" for e in recording_writer.events)
    assert result_of(recording_writer.remove([final / "b"])) is None
    assert sorted(final.iterdir()) == [final / "a"]


# -- unnamed files: O_TMPFILE + linkat(AT_EMPTY_PATH) ------------------------------

def tmpfile_writer():
    writer = DurableWriter(reactor=ThreadlessClock(), threadpool=ImmediatePool())
    writer.events = []
    writer.log = Logger(observer=writer.events.append)
    return writer


needs_tmpfile = pytest.mark.skipif(not durable._O_TMPFILE_AVAILABLE, reason="no O_TMPFILE/linkat here")


@needs_tmpfile
def test_unnamed_file_path_never_touches_the_tmp_directory(tmp_path):
    final, tmp = make_dirs(tmp_path)
    writer = tmpfile_writer()
    assert result_of(writer.commit([(final, tmp, "a", b"data")])) == [final / "a"]
    assert (final / "a").read_bytes() == b"data" and list(tmp.iterdir()) == []
    assert writer._tmpfile, "O_TMPFILE was used, not the fallback"
    assert oct((final / "a").stat().st_mode & 0o777) == oct(durable.FILE_MODE)


@needs_tmpfile
def test_unnamed_file_never_replaces_an_existing_file(tmp_path):
    final, tmp = make_dirs(tmp_path)
    (final / "a").write_bytes(b"theirs")
    writer = tmpfile_writer()
    result_of(writer.commit([(final, tmp, "a", b"ours")])).trap(StorageFailed)
    assert (final / "a").read_bytes() == b"theirs"


@needs_tmpfile
def test_unnamed_file_disk_full_leaves_nothing(tmp_path):
    final, tmp = make_dirs(tmp_path)
    writer = tmpfile_writer()

    class FullDisk(durable._OSCalls):
        @staticmethod
        def write(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._os = FullDisk()
    result_of(writer.commit([(final, tmp, "a", b"1"), (final, tmp, "b", b"2")])).trap(StorageFull)
    assert list(final.iterdir()) == [] and list(tmp.iterdir()) == []


def test_falls_back_to_named_tmp_files_when_unnamed_files_are_unsupported(tmp_path):
    final, tmp = make_dirs(tmp_path)
    writer = tmpfile_writer()
    writer._tmpfile = True

    class NoTmpfile(durable._OSCalls):
        @staticmethod
        def open_tmpfile(directory):
            raise durable.TmpfileUnsupported()

    writer._os = NoTmpfile()
    assert result_of(writer.commit([(final, tmp, "a", b"x")])) == [final / "a"]
    assert writer._tmpfile is False and (final / "a").read_bytes() == b"x"
    assert result_of(writer.commit([(final, tmp, "b", b"y")])) == [final / "b"]


# -- the shared helpers: fsync_directory, read_file ------------------------------------

def test_fsync_directory_uses_the_os_it_is_given(tmp_path):
    durable.fsync_directory(tmp_path)                    # the os module by default
    osc = RecordingOS()
    durable.fsync_directory(tmp_path, osc=osc)
    assert osc.calls == [("open", tmp_path), ("fsync", tmp_path), ("fsynced", tmp_path), ("close", tmp_path)]


def test_fsync_directory_closes_the_directory_when_fsync_fails(tmp_path):
    osc = RecordingOS()
    osc.fail("fsync", err=errno.EIO)
    with pytest.raises(OSError) as caught:
        durable.fsync_directory(tmp_path, osc=osc)
    assert caught.value.errno == errno.EIO and osc.calls[-1] == ("close", tmp_path) and not osc._paths


def test_fsync_directory_refuses_what_is_no_directory(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        durable.fsync_directory(tmp_path / "file")
    with pytest.raises(FileNotFoundError):
        durable.fsync_directory(tmp_path / "missing")


def test_every_directory_fsync_goes_through_the_one_helper():
    from mailgw.mailauth import keys
    from mailgw.store import folder_files, index, mailbox
    for module in (keys, index, mailbox, folder_files):
        assert module.fsync_directory is durable.fsync_directory, module.__name__
    assert mailbox.read_file is folder_files.read_file is durable.read_file


def test_the_writer_fsyncs_directories_through_its_os_calls(tmp_path, recording_writer):
    recording_writer._fsync_directory(tmp_path)         # looked up at each call: tests swap _os
    assert ("fsynced", tmp_path) in recording_writer._os.calls


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17])
def test_read_file_returns_the_whole_file(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    before = _open_fds()
    assert durable.read_file(tmp_path / "f") == data
    assert durable.read_file(str(tmp_path / "f")) == data      # str or Path
    assert _open_fds() == before


def test_read_file_errors_are_those_of_the_system_calls(tmp_path):
    before = _open_fds()
    with pytest.raises(FileNotFoundError):
        durable.read_file(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):                      # open(2) succeeds, read(2) fails: closed
        durable.read_file(tmp_path)
    assert _open_fds() == before
