"""The mailbox store: MailStore / UserMailbox / Folder over Maildir.

Everything runs synchronously (ImmediatePool + ThreadlessClock) except the tests
marked "real thread pool"; polling is driven by the Clock.
"""
from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mailgw.durable import DurableWriter
from mailgw.errors import StorageFull
from mailgw.interfaces import IFolder, IMailStore, IUserMailbox
from mailgw.store import index as ix
from mailgw.store.events import Added, Expunged, FlagsChanged, MessageInfo, SyncResult
from mailgw.store.folder import Folder, crlf_size
from mailgw.store.maildir_name import parse_name
from mailgw.store.mailbox import MailStore, decode_dirname, folder_dirname
from mailgw.store.maildir import MaildirStore
from threadless import ImmediatePool, ThreadlessClock

try:  # rootdir-relative import, or tests as a package
    from test_durable import RecordingOS
except ImportError:  # pragma: no cover
    from tests.unit.test_durable import RecordingOS

ALICE = "alice@example.org"
MESSAGE = b"From: bob@example.net\r\nSubject: hello\r\n\r\nline 1\r\nline 2\r\n"


# -- fakes -----------------------------------------------------------------------------------

def result(d):
    """The result of a fired Deferred; a failure is raised."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure(d, kind):
    box = []
    d.addBoth(box.append)
    assert box and isinstance(box[0], Failure), box
    assert box[0].check(kind), box[0]
    return box[0].value


def quiet(obj):
    obj.log = Logger(observer=lambda event: None)


def make_store(mail_dir, *, reactor=None, pool=None):
    reactor = reactor or ThreadlessClock()
    pool = pool or ImmediatePool()
    writer = DurableWriter(reactor=reactor, threadpool=pool)
    store = MailStore(mail_dir, reactor=reactor, threadpool=pool, writer=writer)
    store.reactor, store.pool, store.writer = reactor, pool, writer
    return store


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch):
    monkeypatch.setattr(Folder, "log", Logger(observer=lambda event: None))


@pytest.fixture
def mail_dir(tmp_path):
    return tmp_path / "mail"


@pytest.fixture
def store(mail_dir):
    return make_store(mail_dir)


@pytest.fixture
def inbox(store):
    return result(store.mailbox(ALICE).folder("INBOX"))


def user_dir(mail_dir):
    return mail_dir / "example.org" / "alice"


def uids(folder):
    return [m.uid for m in folder.messages()]


def flags_by_uid(folder):
    return {m.uid: m.flags for m in folder.messages()}


def drop(directory: Path, name: str, data: bytes = b"Subject: dropped\n\nbody\n") -> Path:
    """A message put there by another MDA or MUA (no lock, no index)."""
    path = directory / name
    path.write_bytes(data)
    return path


def age_directories(folder, seconds=10):
    """Make new/ and cur/ look untouched for a while, so their mtimes count as stable."""
    then = time.time() - seconds
    for sub in ("new", "cur"):
        os.utime(folder.path / sub, (then, then))


# -- interfaces and layout ------------------------------------------------------------------

def test_provides_the_interfaces(store, inbox):
    assert verifyObject(IMailStore, store)
    assert verifyObject(IUserMailbox, store.mailbox(ALICE))
    assert verifyObject(IFolder, inbox)


def test_default_folders_exist_from_the_first_call(store, mail_dir):
    assert result(store.mailbox(ALICE).folders()) == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    home = user_dir(mail_dir)
    for directory in (home, *(home / f".{name}" for name in ("Drafts", "Sent", "Junk", "Trash"))):
        assert sorted(p.name for p in directory.iterdir() if p.name in ("tmp", "new", "cur")) == ["cur", "new", "tmp"]
        assert directory.stat().st_mode & 0o777 == 0o700
    trash = result(store.mailbox(ALICE).folder("Trash"))
    assert trash.name == "Trash" and trash.messages() == [] and trash.uidnext == 1 and trash.uidvalidity > 0


def test_one_folder_object_per_folder_and_inbox_is_case_insensitive(store):
    box = store.mailbox(ALICE)
    assert store.mailbox(ALICE) is box
    inbox = result(box.folder("INBOX"))
    assert result(box.folder("inbox")) is inbox and result(box.folder("InBoX")) is inbox
    assert result(box.folder("Sent")) is result(box.folder("Sent"))
    failure(box.folder("Nope"), KeyError)


def test_a_folder_stays_loaded_after_its_last_user_so_a_reconnect_does_not_parse_the_index(store, monkeypatch):
    import gc
    box = store.mailbox(ALICE)
    inbox = result(box.folder("INBOX"))
    result(inbox.append(b"Subject: one\r\n\r\nbody\r\n"))
    age_directories(inbox)
    result(inbox.sync())                       # now the snapshot's mtimes can be trusted
    first = id(inbox)
    del inbox
    gc.collect()
    parsed = []
    real_parse = ix.parse_index
    monkeypatch.setattr(ix, "parse_index", lambda data: parsed.append(1) or real_parse(data))
    again = result(box.folder("INBOX"))
    result(again.sync())
    assert id(again) == first and parsed == [] and len(again.messages()) == 1


def test_loaded_folders_are_bounded(store):
    from mailgw.store import mailbox as mailbox_module
    box = store.mailbox(ALICE)
    for n in range(mailbox_module.KEEP_FOLDERS + 5):
        result(box.create(f"F{n}"))
        result(box.folder(f"F{n}"))
    assert len(store._recent) == mailbox_module.KEEP_FOLDERS


def test_unsafe_addresses_are_refused(store):
    for address in ("../x@example.org", "a@b@c", ".alice@example.org", "alice@exa/mple.org", "ALICE@example.org"):
        with pytest.raises(ValueError):
            store.mailbox(address)


# -- append, open, sizes ------------------------------------------------------------------

def test_append_is_durable_and_named_with_uid_and_flags(store, inbox, mail_dir):
    osc = store._os = RecordingOS()
    uid = result(inbox.append(MESSAGE, flags=["\\Seen", "\\Flagged"], internaldate=1_600_000_000))
    assert uid == 1 and inbox.uidnext == 2
    [info] = inbox.messages()
    assert info == MessageInfo(1, frozenset({"\\Seen", "\\Flagged"}), len(MESSAGE), 1_600_000_000.0)
    [path] = (user_dir(mail_dir) / "cur").iterdir()
    key, file_uid, wire, letters = parse_name(path.name)
    assert (file_uid, wire, letters) == (1, len(MESSAGE), "FS")
    stored = MESSAGE.replace(b"\r\n", b"\n")
    assert path.name.endswith(",U=1:2,FS") and f",S={len(stored)},W={len(MESSAGE)}," in path.name
    assert path.read_bytes() == stored  # LF on disk
    assert path.stat().st_mtime == 1_600_000_000
    assert list((user_dir(mail_dir) / "tmp").iterdir()) == []
    # Order: message fsynced in tmp/, moved into cur/, cur/ fsynced, then the index written.
    calls = osc.calls

    def first(op, test):
        return next(i for i, (o, p) in enumerate(calls) if o == op and test(p))

    fsync_file = first("fsynced", lambda p: p.parent.name == "tmp")
    move = first("move", lambda p: p.parent.name == "cur")
    fsync_cur = first("fsynced", lambda p: p.name == "cur")
    index_rename = first("rename", lambda p: p.name == ix.INDEX_NAME)
    assert fsync_file < move < fsync_cur < index_rename


def test_open_returns_crlf_bytes_of_exactly_size_octets(inbox):
    odd = b"a\r\nb\nc\r\r\nd"  # mixed line ends, a bare CR and no final newline
    for message in (MESSAGE, MESSAGE.replace(b"\r\n", b"\n"), odd):
        uid = result(inbox.append(message))
        [info] = [m for m in inbox.messages() if m.uid == uid]
        data = result(inbox.open(uid))
        assert len(data) == info.size
        assert b"\n" not in data.replace(b"\r\n", b"")
    assert result(inbox.open(1)) == MESSAGE
    failure(inbox.open(999), KeyError)


def test_open_finds_a_message_renamed_by_another_process(store, inbox):
    uid = result(inbox.append(MESSAGE))
    [path] = (inbox.path / "cur").iterdir()
    path.rename(path.with_name(path.name + "S"))  # e.g. mutt marks it read, we have not synced
    assert result(inbox.open(uid)) == MESSAGE


def test_size_of_a_message_without_w_is_counted_once(store, inbox, mail_dir):
    reads = []

    def counting_read(path):
        reads.append(Path(path).name)
        with open(path, "rb") as f:
            return f.read()

    store._read = counting_read
    body = b"Subject: foreign\n\nno sizes in my name\n\n"
    drop(inbox.path / "new", "1700000000.foreign1.host", body)
    drop(inbox.path / "cur", "1700000000.foreign2.host:2,S", body.replace(b"\n", b"\r\n"))
    result(inbox.sync())
    assert [m.size for m in inbox.messages()] == [crlf_size(body)] * 2 == [len(body) + body.count(b"\n")] * 2
    assert len(reads) == 2
    # Synced again, restarted, synced again: the size comes from the index / the name.
    result(inbox.sync())
    again = make_store(mail_dir)
    again._read = counting_read
    folder = result(again.mailbox(ALICE).folder("INBOX"))
    result(folder.sync())
    assert [m.size for m in folder.messages()] == [crlf_size(body)] * 2
    assert len(reads) == 2
    for uid in uids(folder):
        assert len(result(folder.open(uid))) == crlf_size(body)


# -- UIDs that last -----------------------------------------------------------------------------
def test_mail_found_in_new_gets_uids_in_the_order_it_arrived(inbox):
    # RFC 3501 §2.3.1.1: UIDs ascend in the order messages were added. In plain
    # string order "M100000" comes before "M99999" (and "Q10" before "Q9").
    arrived = ["1700000000.M99999P7Q9.mx,S=28,W=31", "1700000000.M99999P7Q10.mx,S=28,W=31",
               "1700000000.M100000P7Q11.mx,S=28,W=31", "1700000001.M5P7Q12.mx,S=28,W=31"]
    for n, name in enumerate(reversed(arrived)):
        drop(inbox.path / "new", name, b"Subject: %d\n\nbody\n" % (len(arrived) - 1 - n))
    result(inbox.sync())
    subjects = [result(inbox.open(uid)).split(b"\r\n", 1)[0] for uid in uids(inbox)]
    assert subjects == [b"Subject: %d" % n for n in range(len(arrived))]



def fill(store, folder):
    """Three appends, one delivery found in new/, one flag change, one keyword."""
    result(folder.append(MESSAGE, flags=["\\Seen"]))
    result(folder.append(MESSAGE + b"2"))
    result(folder.append(MESSAGE + b"3", flags=["$Label1"]))
    drop(folder.path / "new", "1700000000.M1P1Q1.mx,S=20,W=22", b"Subject: new\n\nhello\n")
    result(folder.sync())
    result(folder.store_flags([2], ["\\Answered", "work"], "add"))
    return folder.uidvalidity, folder.uidnext, flags_by_uid(folder)


def reopen(mail_dir, name="INBOX"):
    store = make_store(mail_dir)
    folder = result(store.mailbox(ALICE).folder(name))
    result(folder.sync())
    return folder


def test_uids_survive_a_restart(store, inbox, mail_dir):
    before = fill(store, inbox)
    assert sorted(before[2]) == [1, 2, 3, 4]
    folder = reopen(mail_dir)
    assert (folder.uidvalidity, folder.uidnext, flags_by_uid(folder)) == before
    assert folder.messages() == inbox.messages()


def test_uids_survive_flag_renames_by_us_and_by_others(store, inbox):
    fill(store, inbox)
    sizes = {m.uid: m.size for m in inbox.messages()}
    result(inbox.store_flags([1, 2, 3, 4], ["\\Deleted"], "add"))
    result(inbox.store_flags([1, 2, 3, 4], ["\\Deleted", "\\Seen"], "remove"))
    # Another MUA renames a file to add \Draft (keeps the U= we wrote).
    cur = inbox.path / "cur"
    [name] = [p.name for p in cur.iterdir() if parse_name(p.name)[1] == 3]
    os.rename(cur / name, cur / name.replace(":2,", ":2,D"))
    events = result(inbox.sync()).events
    assert events == (FlagsChanged((3,)),)
    assert uids(inbox) == [1, 2, 3, 4]
    assert flags_by_uid(inbox)[3] == {"\\Draft", "$Label1"}  # keyword kept: it lives in the index
    assert {m.uid: m.size for m in inbox.messages()} == sizes


def test_rename_that_drops_the_uid_field_keeps_the_uid(store, inbox):
    fill(store, inbox)
    cur = inbox.path / "cur"
    [name] = [p.name for p in cur.iterdir() if parse_name(p.name)[1] == 2]
    stripped = name.replace(",U=2", "").replace(":2,R", ":2,RS")  # a tool that rewrites names its own way
    os.rename(cur / name, cur / stripped)
    result(inbox.sync())
    assert uids(inbox) == [1, 2, 3, 4] and "\\Seen" in flags_by_uid(inbox)[2]


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip", "empty", "version"])
def test_a_lost_or_damaged_index_is_rebuilt_with_the_same_uidvalidity_and_uids(store, inbox, mail_dir, damage):
    uidvalidity, uidnext, flags = fill(store, inbox)
    index = inbox.path / ix.INDEX_NAME
    data = index.read_bytes()
    if damage == "delete":
        index.unlink()
    elif damage == "truncate":
        index.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "flip":
        index.write_bytes(data.replace(b"m 2 ", b"m 9 "))
    elif damage == "empty":
        index.write_bytes(b"")
    else:
        index.write_bytes(data.replace(b"mailgw-index 1 ", b"mailgw-index 7 "))
    folder = reopen(mail_dir)
    assert folder.uidvalidity == uidvalidity
    assert uids(folder) == [1, 2, 3, 4]
    assert folder.uidnext >= uidnext
    system = {uid: {f for f in fl if f.startswith("\\")} for uid, fl in flags.items()}
    assert {uid: {f for f in fl if f.startswith("\\")} for uid, fl in flags_by_uid(folder).items()} == system
    assert ix.parse_index((folder.path / ix.INDEX_NAME).read_bytes()).uidvalidity == uidvalidity
    assert result(folder.append(MESSAGE)) >= uidnext


def test_a_corrupt_index_is_logged(store, inbox, mail_dir, monkeypatch):
    fill(store, inbox)
    index = inbox.path / ix.INDEX_NAME
    index.write_bytes(index.read_bytes()[:-5])
    logged = []
    monkeypatch.setattr(Folder, "log", Logger(observer=logged.append))
    reopen(mail_dir)
    [event] = [e for e in logged if "corrupt" in e.get("text", "")]
    assert event["log_level"].name == "warn" and "same UIDVALIDITY" in event["text"]


def test_an_index_lost_in_memory_of_a_running_folder_keeps_its_uids(store, inbox):
    uidvalidity, uidnext, flags = fill(store, inbox)
    (inbox.path / ix.INDEX_NAME).unlink()
    (inbox.path / ix.UIDVALIDITY_NAME).unlink()
    result(inbox.sync())  # this process still knows UIDVALIDITY: nothing to bump
    assert inbox.uidvalidity == uidvalidity and uids(inbox) == [1, 2, 3, 4]


def test_index_and_uidvalidity_file_lost_bumps_uidvalidity_and_keeps_every_message(store, inbox, mail_dir):
    uidvalidity, uidnext, flags = fill(store, inbox)
    (inbox.path / ix.INDEX_NAME).unlink()
    (inbox.path / ix.UIDVALIDITY_NAME).unlink()
    folder = reopen(mail_dir)
    assert folder.uidvalidity > uidvalidity
    assert len(folder.messages()) == 4 and len(set(uids(folder))) == 4
    assert sorted(result(folder.open(uid)) for uid in uids(folder)) == sorted(
        result(inbox.open(uid)) for uid in [1, 2, 3, 4])
    assert ix.read_uidvalidity(folder.path)[0] == folder.uidvalidity


def test_uidnext_never_goes_back_when_the_index_is_lost_after_expunging_the_newest(store, inbox, mail_dir):
    for _ in range(5):
        result(inbox.append(MESSAGE))
    result(inbox.expunge([4, 5]))
    assert inbox.uidnext == 6
    (inbox.path / ix.INDEX_NAME).unlink()
    folder = reopen(mail_dir)
    assert uids(folder) == [1, 2, 3] and folder.uidnext >= 6
    assert result(folder.append(MESSAGE)) >= 6


def test_uidvalidity_of_a_recreated_folder_differs(store):
    box = store.mailbox(ALICE)
    result(box.create("Projects"))
    first = result(box.folder("Projects")).uidvalidity
    result(box.delete("Projects"))
    result(box.create("Projects"))
    assert result(box.folder("Projects")).uidvalidity > first


# -- sync: changes made by others ----------------------------------------------------------------

def test_a_file_dropped_into_new_appears_and_is_recent_for_exactly_one_caller(store, inbox):
    result(inbox.append(MESSAGE))
    drop(inbox.path / "new", "1700000001.handmade.host")
    first = result(inbox.sync())
    second = result(inbox.sync())
    assert first == SyncResult(recent=(2,), events=(Added((2,)),))
    assert second.recent == () and second.events == ()
    assert uids(inbox) == [1, 2]
    assert list((inbox.path / "new").iterdir()) == []
    [name] = [p.name for p in (inbox.path / "cur").iterdir() if "handmade" in p.name]
    assert parse_name(name)[1] == 2


def test_files_put_into_cur_by_others_get_uids_and_copies_get_new_ones(store, inbox):
    result(inbox.append(MESSAGE))
    result(inbox.append(MESSAGE + b"x"))
    cur = inbox.path / "cur"
    [mine] = [p for p in cur.iterdir() if parse_name(p.name)[1] == 1]
    (cur / (mine.name.replace(":2,", ":2,S"))).write_bytes(mine.read_bytes())  # a duplicate (cp)
    drop(cur, "1700000002.other.host,U=1:2,S")        # a stale U= (moved from another folder)
    drop(cur, "1700000003.plain.host:2,")
    result(inbox.sync())
    assert len(inbox.messages()) == 5 and uids(inbox)[:2] == [1, 2]
    assert len({parse_name(p.name)[0] for p in cur.iterdir()}) == 5      # every file has its own key now
    assert sorted(parse_name(p.name)[1] for p in cur.iterdir()) == uids(inbox)
    folder = reopen(store._mail_dir)
    assert uids(folder) == uids(inbox)


def test_removed_files_are_expunged_and_flag_renames_reported(store, inbox):
    for _ in range(3):
        result(inbox.append(MESSAGE))
    events = []
    inbox.subscribe(events.append)
    cur = inbox.path / "cur"
    by_uid = {parse_name(p.name)[1]: p for p in cur.iterdir()}
    by_uid[1].unlink()
    by_uid[2].rename(by_uid[2].with_name(by_uid[2].name + "T"))
    sync = result(inbox.sync())
    assert sync.events == (Expunged((1,)), FlagsChanged((2,))) and events == list(sync.events)
    assert flags_by_uid(inbox) == {2: {"\\Deleted"}, 3: set()}


def test_unchanged_folder_sync_does_not_list_directories(store, inbox, monkeypatch):
    for _ in range(3):
        result(inbox.append(MESSAGE))
    result(inbox.sync())
    age_directories(inbox)
    result(inbox.sync())  # learns the (now stable) mtimes
    listed = []
    original = Folder._list
    monkeypatch.setattr(Folder, "_list", lambda self, d: listed.append(d) or original(self, d))
    for _ in range(3):
        assert result(inbox.sync()) == SyncResult((), ())
    assert listed == []
    drop(inbox.path / "new", "1700000004.late.host")  # changes new/'s mtime
    assert result(inbox.sync()).recent == (4,)


def test_changes_by_another_store_instance_are_seen(store, inbox, mail_dir):
    """Another process (here: a second MailStore) changes flags and keywords
    only through the index and renames: our sync picks them up."""
    for _ in range(2):
        result(inbox.append(MESSAGE))
    other = result(make_store(mail_dir).mailbox(ALICE).folder("INBOX"))
    result(other.store_flags([1], ["$Important"], "add"))   # index only, no rename
    result(other.store_flags([2], ["\\Seen"], "add"))
    result(other.append(MESSAGE))
    sync = result(inbox.sync())
    assert sync.events == (FlagsChanged((1, 2)), Added((3,)))
    assert flags_by_uid(inbox) == {1: {"$Important"}, 2: {"\\Seen"}, 3: set()}


def test_a_uid_written_before_a_failed_index_write_is_kept(store, inbox):
    result(inbox.append(MESSAGE))
    index_before = (inbox.path / ix.INDEX_NAME).read_bytes()
    store._os = RecordingOS()
    store._os.fail("write", match=lambda p: p.name == ix.INDEX_NAME + ".tmp")
    drop(inbox.path / "new", "1700000005.x.host")
    failure(inbox.sync(), StorageFull)
    assert (inbox.path / ix.INDEX_NAME).read_bytes() == index_before
    [name] = [p.name for p in (inbox.path / "cur").iterdir() if ".x.host" in p.name]
    assert parse_name(name)[1] == 2  # renamed into cur/ with its UID before the index failed
    result(inbox.sync())
    assert uids(inbox) == [1, 2] and inbox.uidnext == 3


def test_enospc_while_writing_the_index_keeps_the_old_one(store, inbox):
    for _ in range(3):
        result(inbox.append(MESSAGE))
    result(inbox.store_flags([1], ["Old"], "add"))
    index = inbox.path / ix.INDEX_NAME
    before, messages = index.read_bytes(), inbox.messages()
    store._os = RecordingOS()
    store._os.fail("write", match=lambda p: p.name == ix.INDEX_NAME + ".tmp")
    failure(inbox.store_flags([1, 2], ["\\Seen", "New"], "add"), StorageFull)
    assert index.read_bytes() == before
    assert not (inbox.path / (ix.INDEX_NAME + ".tmp")).exists()
    assert inbox.messages() == messages  # the failed call changed nothing in memory
    # Room again: the renames made before the failure are found; the keyword (index only) was not stored.
    result(inbox.sync())
    assert flags_by_uid(inbox) == {1: {"Old", "\\Seen"}, 2: {"\\Seen"}, 3: set()}
    assert ix.parse_index(index.read_bytes()).generation > ix.parse_index(before).generation


def test_enospc_while_writing_an_appended_message_leaves_nothing(store, inbox):
    result(inbox.append(MESSAGE))
    store._os = RecordingOS()
    store._os.fail("write", match=lambda p: p.parent.name == "tmp")
    failure(inbox.append(MESSAGE), StorageFull)
    assert list((inbox.path / "tmp").iterdir()) == [] and len(list((inbox.path / "cur").iterdir())) == 1
    assert uids(inbox) == [1] and result(inbox.append(MESSAGE)) == 2


# -- flags and keywords -----------------------------------------------------------------------------

def test_store_flags_modes_and_result(store, inbox):
    for _ in range(3):
        result(inbox.append(MESSAGE, flags=["\\Seen"]))
    assert result(inbox.store_flags([1, 2, 99], ["\\flagged", "Work"], "add")) == {
        1: {"\\Seen", "\\Flagged", "Work"}, 2: {"\\Seen", "\\Flagged", "Work"}}
    assert result(inbox.store_flags([1], ["\\Seen", "work"], "remove")) == {1: {"\\Flagged"}}
    assert result(inbox.store_flags([2, 3], ["\\Draft"], "replace")) == {2: {"\\Draft"}, 3: {"\\Draft"}}
    assert flags_by_uid(inbox) == {1: {"\\Flagged"}, 2: {"\\Draft"}, 3: {"\\Draft"}}
    for bad in (["\\Recent"], ["\\Bogus"], ["with space"], ["par(en"], [""], [42]):
        failure(inbox.store_flags([1], bad, "add"), ValueError)
    failure(inbox.store_flags([1], ["\\Seen"], "toggle"), ValueError)


def test_keywords_round_trip_and_are_limited(store, inbox, mail_dir):
    result(inbox.append(MESSAGE, flags=["$Forwarded", "Project-X"]))
    result(inbox.append(MESSAGE))
    result(inbox.store_flags([2], ["$forwarded", "NonJunk"], "add"))  # case-insensitive: same keyword
    assert flags_by_uid(inbox) == {1: {"$Forwarded", "Project-X"}, 2: {"$Forwarded", "NonJunk"}}
    assert flags_by_uid(reopen(mail_dir)) == flags_by_uid(inbox)
    many = [f"k{i}" for i in range(ix.MAX_KEYWORDS)]
    failure(inbox.store_flags([1], many, "add"), ValueError)  # 3 + 64 > 64
    assert flags_by_uid(inbox)[1] == {"$Forwarded", "Project-X"}
    # Unused keywords are dropped when the table is full.
    result(inbox.store_flags([1, 2], [], "replace"))
    result(inbox.store_flags([1], many, "add"))
    assert flags_by_uid(inbox)[1] == set(many)
    assert flags_by_uid(reopen(mail_dir))[1] == set(many)


def test_store_flags_on_many_messages_is_one_job_and_one_index_write(store, inbox):
    for _ in range(50):
        result(inbox.append(MESSAGE))
    store._os = RecordingOS()
    jobs = store.pool.jobs
    result(inbox.store_flags(uids(inbox), ["\\Seen", "read"], "add"))
    assert store.pool.jobs == jobs + 1
    assert [op for op, p in store._os.calls if op == "rename" and p.name == ix.INDEX_NAME] == ["rename"]
    assert all(m.flags == {"\\Seen", "read"} for m in inbox.messages())


# -- expunge and copy ------------------------------------------------------------------------------

def test_expunge_removes_files_and_reports_uids(store, inbox):
    for _ in range(4):
        result(inbox.append(MESSAGE))
    assert result(inbox.expunge([2, 4, 17])) == [2, 4]
    assert uids(inbox) == [1, 3] and len(list((inbox.path / "cur").iterdir())) == 2
    assert inbox.uidnext == 5
    assert result(inbox.append(MESSAGE)) == 5


def test_copy_returns_the_uid_mapping_in_source_order(store, inbox):
    for i in range(4):
        result(inbox.append(MESSAGE + str(i).encode(), flags=["\\Seen", "Tag"], internaldate=1_600_000_000 + i))
    trash = result(store.mailbox(ALICE).folder("Trash"))
    result(trash.append(MESSAGE))
    events = []
    trash.subscribe(events.append)
    assert result(inbox.copy([4, 2, 3, 77], trash)) == [(2, 2), (3, 3), (4, 4)]
    assert events == [Added((2, 3, 4))]
    copied = {m.uid: m for m in trash.messages()}
    originals = {m.uid: m for m in inbox.messages()}
    for src, dst in [(2, 2), (3, 3), (4, 4)]:
        assert copied[dst].flags == {"\\Seen", "Tag"}
        assert copied[dst].internaldate == originals[src].internaldate
        assert result(trash.open(dst)) == result(inbox.open(src))
    # The copies are independent of the originals.
    result(inbox.expunge([2]))
    result(inbox.store_flags([3], ["\\Deleted"], "add"))
    assert result(trash.open(2)) == MESSAGE + b"1" and copied[3].flags == flags_by_uid(trash)[3]
    assert result(inbox.copy([1], inbox)) == [(1, 5)]  # into the same folder


# -- events, delivery, polling ---------------------------------------------------------------------

def test_events_reach_every_subscriber_for_each_kind_of_change(store, inbox):
    session_a, session_b = [], []
    inbox.subscribe(session_a.append)
    inbox.subscribe(session_b.append)
    result(inbox.append(MESSAGE))
    result(inbox.append(MESSAGE))
    result(inbox.store_flags([1], ["\\Seen"], "add"))
    result(inbox.store_flags([1], ["\\Seen"], "add"))  # no change, no event
    result(inbox.expunge([2]))
    drop(inbox.path / "new", "1700000006.y.host")
    result(inbox.sync())
    expected = [Added((1,)), Added((2,)), FlagsChanged((1,)), Expunged((2,)), Added((3,))]
    assert session_a == expected and session_b == expected
    inbox.unsubscribe(session_b.append)
    result(inbox.append(MESSAGE))
    assert session_a[-1] == Added((4,)) and len(session_b) == len(expected)


def test_a_failing_listener_does_not_stop_the_others(store, inbox):
    seen = []
    inbox.subscribe(lambda event: 1 / 0)
    inbox.subscribe(seen.append)
    result(inbox.append(MESSAGE))
    assert seen == [Added((1,))]


def test_smtp_delivery_reaches_idle_subscribers_at_once(store, inbox, mail_dir):
    maildir = MaildirStore(mail_dir, writer=store.writer, hostname="mx.example.org", on_delivered=store.delivered)
    events = []
    inbox.subscribe(events.append)
    result(maildir.deliver([ALICE, "bob@example.org"], MESSAGE))
    assert events == [Added((1,))]  # no clock advance, no poll
    assert inbox.messages()[0].size == len(MESSAGE)
    # The background sync moved it to cur/; \Recent goes to the next sync() caller, once.
    assert result(inbox.sync()).recent == (1,)
    assert result(inbox.sync()).recent == ()


def test_delivery_to_a_folder_without_subscribers_syncs_nothing(store, inbox, mail_dir):
    maildir = MaildirStore(mail_dir, writer=store.writer, hostname="mx", on_delivered=store.delivered)
    jobs = store.pool.jobs
    result(maildir.deliver([ALICE], MESSAGE))
    assert store.pool.jobs == jobs and inbox.messages() == []
    assert result(inbox.sync()).recent == (1,)


def test_polling_finds_mail_from_other_processes(store, inbox):
    clock = store.reactor
    events = []
    inbox.subscribe(events.append)
    clock.advance(1.0)
    clock.advance(1.0)
    assert events == []
    drop(inbox.path / "new", "1700000007.z.host")
    clock.advance(0.5)
    assert events == []
    clock.advance(0.5)
    assert events == [Added((1,))]
    inbox.unsubscribe(events.append)
    assert store._loop is None and not clock.getDelayedCalls()
    drop(inbox.path / "new", "1700000008.z.host")
    clock.advance(5)
    assert events == [Added((1,))]


def test_polling_is_cheap_when_nothing_changed(store, inbox, monkeypatch):
    events = []
    inbox.subscribe(events.append)
    result(inbox.sync())
    age_directories(inbox)
    result(inbox.sync())
    listed = []
    original = Folder._list
    monkeypatch.setattr(Folder, "_list", lambda self, d: listed.append(d) or original(self, d))
    for _ in range(5):
        store.reactor.advance(1.0)
    assert listed == [] and events == []


# -- folder names ------------------------------------------------------------------------------------

def test_folder_names_map_to_escaped_maildirplusplus_directories():
    assert folder_dirname("Sent") == ("Sent", ".Sent")
    assert folder_dirname("inbox") == ("INBOX", None)
    assert folder_dirname("Work/2024.Q1") == ("Work/2024.Q1", ".Work.2024%2EQ1")
    assert folder_dirname("100%/a.b/c") == ("100%/a.b/c", ".100%25.a%2Eb.c")
    assert folder_dirname("Entwürfe/Ärger ~x") == ("Entwürfe/Ärger ~x", ".Entwürfe.Ärger ~x")
    for name in ("Sent", "Work/2024.Q1", "100%/a.b/c", "Entwürfe/Ärger ~x", "INBOX/child", "..x", "a..b"):
        assert decode_dirname(folder_dirname(name)[1]) == name
    for dirname in (".", "..", ".a..b", ".a.%2F", ".a%2e", ".INBOX", "Maildir", ".a.", ".a%00"):
        assert decode_dirname(dirname) is None, dirname


@pytest.mark.parametrize("name", [
    "", "..", ".", "../x", "x/..", "a/../b", "/etc", "/", "x/", "a//b", "a\0b", "a\nb", "tab\there",
    "\x7f", "\x85", "\udcff", "x" * 255, "a/" * 130 + "b", None, 5,
])
def test_names_that_could_escape_or_are_awkward_are_refused(store, mail_dir, name):
    box = store.mailbox(ALICE)
    before = sorted(p.name for p in mail_dir.rglob("*"))
    with pytest.raises(ValueError):
        folder_dirname(name)
    failure(box.folder(name), ValueError)
    failure(box.create(name), ValueError)
    failure(box.delete(name), ValueError)
    failure(box.rename("Sent", name), ValueError)
    failure(box.subscribe(name), ValueError)
    after = sorted(p.name for p in mail_dir.rglob("*"))
    assert set(after) - set(before) <= {"cur", "new", "tmp", ".Drafts", ".Sent", ".Junk", ".Trash",
                                        "example.org", "alice"}


def test_create_delete_rename(store, mail_dir):
    box = store.mailbox(ALICE)
    result(box.create("Work"))
    result(box.create("Work/2024.Q1"))
    result(box.create("Worker"))
    failure(box.create("Work"), FileExistsError)
    failure(box.create("inbox"), FileExistsError)
    assert (user_dir(mail_dir) / ".Work.2024%2EQ1" / "cur").is_dir()
    assert result(box.folders()) == ["INBOX", "Drafts", "Junk", "Sent", "Trash", "Work", "Work/2024.Q1", "Worker"]
    work = result(box.folder("Work"))
    result(work.append(MESSAGE))
    uidvalidity = work.uidvalidity
    events = []
    work.subscribe(events.append)
    result(box.rename("Work", "Job"))
    assert events == [Expunged((1,))]
    assert result(box.folders()) == ["INBOX", "Drafts", "Job", "Job/2024.Q1", "Junk", "Sent", "Trash", "Worker"]
    job = result(box.folder("Job"))
    assert uids(job) == [1] and job.uidvalidity == uidvalidity
    failure(box.folder("Work"), KeyError)
    failure(work.sync(), KeyError)
    failure(box.rename("Job", "Worker"), FileExistsError)
    failure(box.rename("Nope", "Other"), KeyError)
    result(box.delete("Job"))
    assert result(box.folders()) == ["INBOX", "Drafts", "Job/2024.Q1", "Junk", "Sent", "Trash", "Worker"]
    failure(box.delete("Job"), KeyError)
    failure(box.delete("INBOX"), ValueError)


def test_renaming_inbox_moves_its_messages(store, inbox):
    box = store.mailbox(ALICE)
    for _ in range(3):
        result(inbox.append(MESSAGE))
    drop(inbox.path / "new", "1700000009.w.host")
    events = []
    inbox.subscribe(events.append)
    result(box.rename("INBOX", "Old"))
    assert events == [Expunged((1, 2, 3))] and inbox.messages() == [] and inbox.uidnext == 4
    old = result(box.folder("Old"))
    assert uids(old) == [1, 2, 3]
    assert result(old.sync()).recent == (4,)
    assert result(inbox.append(MESSAGE)) == 4


def test_subscriptions_persist(store, mail_dir):
    box = store.mailbox(ALICE)
    assert result(box.subscriptions()) == ["INBOX", "Drafts", "Sent", "Junk", "Trash"]
    result(box.subscribe("Lists/python"))
    result(box.subscribe("inbox"))
    result(box.unsubscribe("Junk"))
    result(box.unsubscribe("never subscribed"))
    expected = ["INBOX", "Drafts", "Sent", "Trash", "Lists/python"]
    assert result(box.subscriptions()) == expected
    assert result(make_store(mail_dir).mailbox(ALICE).subscriptions()) == expected


# -- a real thread pool ------------------------------------------------------------------------------

class ThreadedReactor(Clock):
    """callFromThread queues; the test thread runs the queue (the reactor thread)."""

    def __init__(self):
        super().__init__()
        self.calls = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):
        self.calls.put((f, args, kwargs))

    def wait(self, d, timeout=60):
        box = []
        d.addBoth(box.append)
        while not box:
            f, args, kwargs = self.calls.get(timeout=timeout)
            f(*args, **kwargs)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]


@pytest.fixture
def threaded(mail_dir):
    pool = ThreadPool(minthreads=1, maxthreads=4, name="store-test")
    pool.start()
    reactor = ThreadedReactor()
    try:
        yield make_store(mail_dir, reactor=reactor, pool=pool)
    finally:
        pool.stop()


def test_with_a_real_thread_pool(threaded):
    store = threaded
    wait = store.reactor.wait
    box = store.mailbox(ALICE)
    inbox = wait(box.folder("INBOX"))
    trash = wait(box.folder("Trash"))
    # Several operations in flight at once: the DeferredLock keeps them in order.
    appends = [inbox.append(MESSAGE + str(i).encode()) for i in range(20)]
    flags = inbox.store_flags(range(1, 21), ["\\Seen"], "add")
    assert [wait(d) for d in appends] == list(range(1, 21))
    assert wait(flags) == {uid: {"\\Seen"} for uid in range(1, 21)}
    drop(inbox.path / "new", "1700000010.t.host")
    syncs = [inbox.sync(), inbox.sync()]
    assert sorted(wait(d).recent for d in syncs) == [(), (21,)]
    assert wait(inbox.copy([1, 21], trash)) == [(1, 1), (21, 2)]
    assert wait(inbox.open(21)) == b"Subject: dropped\r\n\r\nbody\r\n"
    assert wait(inbox.expunge(range(1, 11))) == list(range(1, 11))
    assert uids(inbox) == list(range(11, 22))


def test_timing_10000_messages_with_a_real_thread_pool(threaded):
    """Printed, not asserted (run with -s): the IMAP benchmark's shape."""
    store = threaded
    wait = store.reactor.wait
    inbox = wait(store.mailbox(ALICE).folder("INBOX"))
    new = inbox.path / "new"
    body = b"Subject: load\n\n" + b"x" * 4000 + b"\n"
    for i in range(10_000):
        (new / f"1700000000.M{i}P1Q{i}.bench,S={len(body)},W={crlf_size(body)}").write_bytes(body)
    timings = {}

    def timed(label, d):
        start = time.perf_counter()
        value = wait(d)
        timings[label] = time.perf_counter() - start
        return value

    assert len(timed("first sync (10k new/ -> cur/)", inbox.sync()).recent) == 10_000
    timed("sync right after (cur/ listed: mtime too recent to trust)", inbox.sync())
    age_directories(inbox)
    timed("sync, directories changed long ago (learns mtimes)", inbox.sync())
    timed("sync, unchanged", inbox.sync())
    timed("store_flags +\\Seen on 10k", inbox.store_flags(range(1, 10_001), ["\\Seen"], "add"))
    timed("store_flags +keyword on 10k (no renames)", inbox.store_flags(range(1, 10_001), ["Done"], "add"))
    timed("sync after store", inbox.sync())
    start = time.perf_counter()
    messages = inbox.messages()
    timings["messages()"] = time.perf_counter() - start
    assert len(messages) == 10_000 and all(m.flags == {"\\Seen", "Done"} for m in messages)
    restarted = make_store(store._mail_dir, reactor=store.reactor, pool=store.pool)
    timed("load after restart (index parse + cur/ listing)", restarted.mailbox(ALICE).folder("INBOX"))
    (inbox.path / ix.INDEX_NAME).unlink()
    again = make_store(store._mail_dir, reactor=store.reactor, pool=store.pool)
    timed("rebuild without index", again.mailbox(ALICE).folder("INBOX"))
    print()
    for label, seconds in timings.items():
        print(f"  {label:60s} {seconds * 1000:8.1f} ms")


def test_open_many_reads_a_batch_in_order_with_none_for_gone_uids(inbox):
    first = result(inbox.append(MESSAGE))
    second = result(inbox.append(MESSAGE.replace(b"hello", b"HELLO") if b"hello" in MESSAGE else MESSAGE + b"x\r\n"))
    jobs = []
    real = inbox._defer
    inbox._defer = lambda f, *args: jobs.append(f) or real(f, *args)
    contents = result(inbox.open_many([second, 999, first]))
    assert contents == [result(inbox.open(second)), None, result(inbox.open(first))]
    assert len(jobs) == 3                     # one job for the batch, then the two single opens
