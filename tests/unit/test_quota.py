"""Mailbox quotas (mailgw.store.quota): the quotas file, maildirsize tracking
and recalculation, over() at the edges, and the store hooks that keep usage
right across deliver / append / copy / move / expunge / folder delete.

Store work runs at once on the test's thread (ImmediatePool + ThreadlessClock);
the quotas file's reload interval is driven by a Clock."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.logger import Logger, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.config_types import QuotaConfig
from mailgw.durable import DurableWriter
from mailgw.pop3.maildrop import Maildrop, MaildropLocks
from mailgw.store import quota as quota_module
from mailgw.store.folder import Folder
from mailgw.store.mailbox import MailStore
from mailgw.store.maildir import MaildirStore
from mailgw.store.quota import (
    MAILDIRSIZE, IQuota, Override, Quota, QuotasFile, format_size, parse_quotas, parse_size,
)
from threadless import ImmediatePool, ThreadlessClock

try:  # rootdir-relative import, or tests as a package
    from test_store import result
except ImportError:  # pragma: no cover
    from tests.unit.test_store import result

ALICE = "alice@example.org"
MESSAGE = b"From: bob@example.net\r\nSubject: hello\r\n\r\nline 1\r\nline 2\r\n"
ON_DISK = len(MESSAGE.replace(b"\r\n", b"\n"))          # what a stored copy takes (S=)


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch):
    silent = Logger(observer=lambda event: None)
    for cls in (Folder, Quota, QuotasFile):
        monkeypatch.setattr(cls, "log", silent)


def make_quota(tmp_path, *, default_bytes=0, default_messages=0, clock=None, threadpool=None):
    config = QuotaConfig(default_bytes, default_messages, tmp_path / "quotas")
    return Quota(tmp_path / "mail", config, clock=clock or task.Clock(), threadpool=threadpool,
                 check_interval=1.0)


def user_dir(tmp_path, address=ALICE) -> Path:
    local, domain = address.split("@")
    return tmp_path / "mail" / domain / local


def put(directory: Path, name: str, data: bytes = b"x" * 10) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def maildirsize(tmp_path, address=ALICE) -> list[str]:
    return (user_dir(tmp_path, address) / MAILDIRSIZE).read_text().splitlines()


@implementer(IQuota)
class FakeQuota:
    """What other tests may use instead of the file-backed Quota."""

    def __init__(self, limits=(0, 0)):
        self._limits = limits
        self.used = {}

    def limits(self, address):
        return self._limits

    def usage(self, address):
        return self.used.get(address, (0, 0))

    def over(self, address, incoming_octets=0, incoming_messages=0):
        used_bytes, used_messages = self.usage(address)
        return quota_module._over(used_bytes, used_messages, *self._limits, incoming_octets, incoming_messages)

    def record(self, address, octets_delta, messages_delta):
        used_bytes, used_messages = self.usage(address)
        self.used[address] = (used_bytes + octets_delta, used_messages + messages_delta)

    def status(self, address):
        return {}


def test_the_quota_and_its_fake_provide_iquota(tmp_path):
    assert verifyObject(IQuota, make_quota(tmp_path))
    assert verifyObject(IQuota, FakeQuota())
    assert verifyObject(quota_module.IQuotaOverrides, QuotasFile(tmp_path / "quotas", clock=task.Clock()))


# -- the quotas file ----------------------------------------------------------------------

def test_sizes_are_powers_of_1024_and_round_trip():
    assert [parse_size(t) for t in ("0", "512", "1K", "1k", "10M", "1G", "2T")] == \
        [0, 512, 1024, 1024, 10 * 2**20, 2**30, 2 * 2**40]
    for bad in ("", "G", "1.5G", "1 G", "-1", "1GB", "1P", str(2**63)):
        with pytest.raises(ValueError):
            parse_size(bad)
    for value in (0, 1, 1023, 1024, 1536, 2**30, 3 * 2**40, 2**30 + 1):
        assert parse_size(format_size(value)) == value
    assert format_size(2**30) == "1G" and format_size(1536) == "1536"


def test_bad_lines_are_reported_with_their_number_and_skipped():
    data = b"\n".join([
        b"# quotas",                                               # 1
        b"alice@example.com  bytes=1G messages=10000",             # 2
        b"bob@example.com bytes=1.5G",                             # 3 bad size
        b"  Carol@Example.COM   messages=5   # a comment",         # 4 normalised
        b"not-an-address bytes=1",                                 # 5
        b"dave@example.com",                                       # 6 nothing set
        b"alice@example.com bytes=2G",                             # 7 duplicate
        b"eve@example.com colour=blue",                            # 8 unknown key
        b"frank@example.com bytes=0 messages=0",                   # 9 explicit no limit
        b"gina@example.com bytes=1K bytes=2K",                     # 10 twice
        b"\xff@example.com bytes=1",                               # 11 not UTF-8
        b"",
    ])
    overrides, problems = parse_quotas(data)
    assert overrides == {
        "alice@example.com": Override(2**30, 10000, 2),
        "carol@example.com": Override(None, 5, 4),
        "frank@example.com": Override(0, 0, 9),
    }
    assert [line for line, _ in problems] == [3, 5, 6, 7, 8, 10, 11]
    reasons = dict(problems)
    assert "1.5G" in reasons[3] and "already on line 2" in reasons[7] and "colour=blue" in reasons[8]


def test_limits_come_from_defaults_and_overrides_reloaded_after_the_check_interval(tmp_path):
    clock = task.Clock()
    (tmp_path / "quotas").write_text("alice@example.org bytes=1M\nbob@example.org messages=7\n")
    quota = make_quota(tmp_path, default_bytes=5000, default_messages=50, clock=clock)
    assert quota.limits(ALICE) == (2**20, 50)
    assert quota.limits("bob@example.org") == (5000, 7)
    assert quota.limits("carol@example.org") == (5000, 50)

    # A new version (as `mailgw quota set` writes it: a rename, so a new inode).
    new = tmp_path / "quotas.new"
    new.write_text("alice@example.org bytes=0 messages=3\n")
    os.replace(new, tmp_path / "quotas")
    clock.advance(0.5)
    assert quota.limits(ALICE) == (2**20, 50), "no stat before check_interval"
    clock.advance(0.5)
    assert quota.limits(ALICE) == (0, 3)
    assert quota.limits("bob@example.org") == (5000, 50)

    (tmp_path / "quotas").unlink()
    clock.advance(1)
    assert quota.limits(ALICE) == (5000, 50)


def test_a_bad_line_is_logged_with_file_and_line_and_the_rest_loads(tmp_path):
    events = []
    path = tmp_path / "quotas"
    path.write_text("alice@example.org bytes=1M\nbob@example.org bytes=lots\ncarol@example.org messages=2\n")
    table = QuotasFile(path, clock=task.Clock())
    table.log = Logger(observer=events.append)
    table._key = None            # force the reload, now with our observer
    table._last_check = None
    assert set(table.overrides()) == {"alice@example.org", "carol@example.org"}
    texts = [formatEvent(event) for event in events]
    assert any(text.startswith(f"{path}:2: ") and "lots" in text for text in texts), texts


# -- maildirsize ------------------------------------------------------------------------

def test_a_missing_maildirsize_is_recalculated_from_every_folder(tmp_path):
    home = user_dir(tmp_path)
    put(home / "new", "1.M1P1Q1.h,S=100,W=103")
    put(home / "cur", "2.M1P1Q2.h,S=200,W=210,U=4:2,S")
    put(home / "cur", "3.M1P1Q3.other-mda:2,", b"y" * 37)         # no S=: stat
    put(home / "tmp", "4.M1P1Q4.h,S=999")                          # being written: not stored yet
    put(home / "cur", ".hidden,S=999")                             # not a message (Maildir)
    put(home / ".Sent" / "cur", "5.M1P1Q5.h,S=1000,W=1020,U=1:2,")
    put(home / ".Work.2024%2EQ1" / "new", "6.M1P1Q6.h,S=1")
    put(home / ".a%2fb" / "cur", "7.M1P1Q7.h,S=5000")              # not a folder name of ours: invisible
    quota = make_quota(tmp_path, default_bytes=10_000, default_messages=100)
    assert quota.usage(ALICE) == (100 + 200 + 37 + 1000 + 1, 5)
    assert maildirsize(tmp_path) == ["10000S,100C", "1338 5"]


def test_no_mailbox_yet_is_empty_and_creates_nothing(tmp_path):
    quota = make_quota(tmp_path, default_bytes=100)
    assert quota.usage(ALICE) == (0, 0)
    quota.record(ALICE, 10, 1)
    assert not (tmp_path / "mail").exists()


def test_a_check_reads_only_the_appended_tail_never_the_directories(tmp_path, monkeypatch):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    quota = make_quota(tmp_path, default_bytes=10_000)
    assert quota.usage(ALICE) == (100, 1)

    def no_scan(*args):
        raise AssertionError("a directory scan per message")
    monkeypatch.setattr(quota_module, "mailbox_usage", no_scan)
    reads = []
    real = quota_module._parse
    monkeypatch.setattr(quota_module, "_parse", lambda data, base: reads.append(data) or real(data, base))

    assert quota.usage(ALICE) == (100, 1)
    assert reads == [], "unchanged: one stat, nothing read"
    quota.record(ALICE, 50, 1)
    quota.record(ALICE, -20, -1)
    assert quota.usage(ALICE) == (130, 1)
    assert reads == [b"50 1\n-20 -1\n"], "only the lines appended since"
    assert maildirsize(tmp_path) == ["10000S,0C", "100 1", "50 1", "-20 -1"]


def test_a_line_being_written_is_read_when_it_is_whole(tmp_path):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    quota = make_quota(tmp_path)
    assert quota.usage(ALICE) == (100, 1)
    with open(user_dir(tmp_path) / MAILDIRSIZE, "ab") as f:
        f.write(b"40")
    assert quota.usage(ALICE) == (100, 1)
    with open(user_dir(tmp_path) / MAILDIRSIZE, "ab") as f:
        f.write(b"0 2\n")
    assert quota.usage(ALICE) == (500, 3)


def test_record_without_a_maildirsize_creates_none(tmp_path):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    quota = make_quota(tmp_path)
    quota.record(ALICE, 100, 1)
    assert not (user_dir(tmp_path) / MAILDIRSIZE).exists()
    assert quota.usage(ALICE) == (100, 1), "the next check lists the Maildir"


def test_a_file_over_5120_octets_is_recalculated(tmp_path):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    quota = make_quota(tmp_path)
    assert quota.usage(ALICE) == (100, 1)
    for _ in range(1500):                      # drifted: says 1500 more messages than there are
        quota.record(ALICE, 1, 1)
    assert (user_dir(tmp_path) / MAILDIRSIZE).stat().st_size > 5120
    assert quota.usage(ALICE) == (100, 1)
    assert maildirsize(tmp_path) == ["0S,0C", "100 1"]


def test_with_a_pool_a_big_file_answers_now_and_is_recalculated_there(tmp_path):
    class HeldPool:
        """Keeps the jobs for the test to run."""
        def __init__(self):
            self.jobs = []

        def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
            self.jobs.append((on_result, f, args, kwargs))

    pool = HeldPool()
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    quota = make_quota(tmp_path, clock=ThreadlessClock(), threadpool=pool)
    assert quota.usage(ALICE) == (100, 1), "missing: listed at once, there is no other answer"
    assert pool.jobs == []
    for _ in range(1500):
        quota.record(ALICE, 1, 0)
    assert quota.usage(ALICE) == (1600, 1), "the file's sums answer meanwhile"
    assert quota.usage(ALICE) == (1600, 1)
    assert len(pool.jobs) == 1, "one recalculation, not one per check"
    on_result, f, args, kwargs = pool.jobs.pop()
    on_result(True, f(*args, **kwargs))
    assert maildirsize(tmp_path) == ["0S,0C", "100 1"]
    assert quota.usage(ALICE) == (100, 1)


def test_a_changed_limit_rewrites_the_definition_line(tmp_path):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    clock = task.Clock()
    quota = make_quota(tmp_path, default_bytes=1000, clock=clock)
    assert quota.usage(ALICE) == (100, 1)
    assert maildirsize(tmp_path)[0] == "1000S,0C"
    (tmp_path / "quotas").write_text("alice@example.org bytes=2K messages=9\n")
    clock.advance(1)
    assert quota.usage(ALICE) == (100, 1)
    assert maildirsize(tmp_path) == ["2048S,9C", "100 1"]


@pytest.mark.parametrize("content", [b"", b"0S,0C", b"0S,0C\n100 1\nnonsense\n", b"0S,0C\n1 2 3\n"])
def test_a_damaged_file_is_recalculated(tmp_path, content):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    (user_dir(tmp_path) / MAILDIRSIZE).write_bytes(content)
    assert make_quota(tmp_path).usage(ALICE) == (100, 1)
    assert maildirsize(tmp_path) == ["0S,0C", "100 1"]


def test_negative_sums_are_recalculated(tmp_path):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    (user_dir(tmp_path) / MAILDIRSIZE).write_bytes(b"0S,0C\n100 1\n-300 -2\n")
    assert make_quota(tmp_path).usage(ALICE) == (100, 1)


def test_over_quota_for_15_minutes_is_recalculated(tmp_path):
    now = time.time()
    clock = task.Clock()
    clock.advance(now)
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    path = user_dir(tmp_path) / MAILDIRSIZE
    path.write_bytes(b"1000S,0C\n5000 1\n")        # someone removed mail without telling us
    quota = make_quota(tmp_path, default_bytes=1000, clock=clock)
    assert quota.over(ALICE), "a fresh file is believed"
    os.utime(path, (now - 14 * 60, now - 14 * 60))
    assert quota.over(ALICE)
    os.utime(path, (now - 16 * 60, now - 16 * 60))
    assert not quota.over(ALICE)
    assert quota.usage(ALICE) == (100, 1)


# -- over() ---------------------------------------------------------------------------------

def usage_file(tmp_path, octets, messages, definition="1000S,3C"):
    """A maildirsize saying so, for the limits in `definition` (else it is recalculated)."""
    put(user_dir(tmp_path) / "cur", "placeholder")    # a mailbox exists
    (user_dir(tmp_path) / MAILDIRSIZE).write_text(f"{definition}\n{octets} {messages}\n")


@pytest.mark.parametrize("octets, messages, incoming_octets, incoming_messages, over", [
    (999, 0, 0, 0, False),
    (999, 0, 1, 1, False),      # lands exactly on the limit: allowed
    (999, 0, 2, 1, True),       # would go over
    (1000, 0, 0, 0, True),      # at the limit: full
    (1001, 0, 0, 0, True),
    (0, 2, 0, 1, False),
    (0, 2, 0, 2, True),
    (0, 3, 0, 0, True),         # at the message limit
    (500, 1, 600, 1, True),
])
def test_over_at_the_edges(tmp_path, octets, messages, incoming_octets, incoming_messages, over):
    usage_file(tmp_path, octets, messages)
    quota = make_quota(tmp_path, default_bytes=1000, default_messages=3)
    assert quota.over(ALICE, incoming_octets, incoming_messages) is over


def test_without_limits_nothing_is_over_and_nothing_is_read(tmp_path, monkeypatch):
    usage_file(tmp_path, 10**12, 10**9)
    quota = make_quota(tmp_path)
    monkeypatch.setattr(quota_module, "read_maildirsize", lambda *a: pytest.fail("read without a limit"))
    assert quota.over(ALICE, 10**15, 10**9) is False


def test_one_unlimited_resource_is_ignored(tmp_path):
    usage_file(tmp_path, 10**9, 2, "0S,3C")
    quota = make_quota(tmp_path, default_bytes=0, default_messages=3)
    assert not quota.over(ALICE, 10**9, 1)
    assert quota.over(ALICE, 0, 2)


def test_status(tmp_path):
    (tmp_path / "quotas").write_text("alice@example.org messages=3\n")
    usage_file(tmp_path, 2048, 3, "1000S,3C")
    assert make_quota(tmp_path, default_bytes=1000).status(ALICE) == {
        "address": ALICE, "bytes": 2048, "bytes_limit": 1000, "bytes_from": "default",
        "messages": 3, "messages_limit": 3, "messages_from": "override", "over": True}


# -- concurrent appenders -----------------------------------------------------------------------

def _append_many(mail_dir: str, quotas: str, count: int) -> None:
    quota = Quota(Path(mail_dir), QuotaConfig(0, 0, Path(quotas)), check_interval=1.0)
    for _ in range(count):
        quota.record(ALICE, 3, 1)


def test_concurrent_appenders_lose_no_line(tmp_path):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    quota = make_quota(tmp_path)
    assert quota.usage(ALICE) == (100, 1)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(tmp_path / "mail"), str(tmp_path / "q"), 500))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    _append_many(str(tmp_path / "mail"), str(tmp_path / "q"), 500)      # and this process meanwhile
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    lines = maildirsize(tmp_path)
    assert len(lines) == 2 + 1500 and set(lines[2:]) == {"3 1"}
    assert quota_module._parse((user_dir(tmp_path) / MAILDIRSIZE).read_bytes(), None)[1:3] == (4600, 1501)
    # 1500 * 4 octets: more than 5120, so the check recalculates: back to what is on disk.
    assert quota._current(ALICE, (0, 0)).bytes == 100
    assert quota.usage(ALICE) == (100, 1)


# -- the store hooks ----------------------------------------------------------------------------

@pytest.fixture
def world(tmp_path):
    reactor = ThreadlessClock()
    pool = ImmediatePool()
    writer = DurableWriter(reactor=reactor, threadpool=pool)
    quota = make_quota(tmp_path, default_bytes=10**9, clock=reactor)
    store = MailStore(tmp_path / "mail", reactor=reactor, threadpool=pool, writer=writer, quota=quota)
    maildir = MaildirStore(tmp_path / "mail", writer=writer, hostname="mx.example.org",
                           on_delivered=store.delivered, quota=quota)
    return store, maildir, quota


def recalculated(tmp_path) -> tuple[int, int]:
    """What a fresh listing says (the truth the deltas must match)."""
    return quota_module.mailbox_usage(user_dir(tmp_path))


def test_usage_follows_deliver_append_copy_move_expunge_and_delete(tmp_path, world):
    store, maildir, quota = world
    mailbox = store.mailbox(ALICE)
    inbox = result(mailbox.folder("INBOX"))
    assert quota.usage(ALICE) == (0, 0)                     # maildirsize made now, empty

    result(maildir.deliver([ALICE], MESSAGE))
    assert quota.usage(ALICE) == (ON_DISK, 1)
    # An INBOX copy and a folder copy (subaddress filing) in one delivery, with headers that differ in size.
    paths = result(maildir.deliver([ALICE, (ALICE, "Lists")], MESSAGE, return_path="bob@example.net"))
    assert len(paths) == 2
    delivered = sum(os.path.getsize(p) for p in paths)
    assert quota.usage(ALICE) == (ON_DISK + delivered, 3)
    assert maildirsize(tmp_path)[-1] == f"{delivered} 2", "one line per address and delivery"

    uid = result(inbox.append(b"Subject: appended\r\n\r\nbody\r\n"))
    assert quota.usage(ALICE) == recalculated(tmp_path)
    result(inbox.sync())
    sent = result(mailbox.folder("Sent"))
    result(inbox.copy([uid], sent))
    assert quota.usage(ALICE) == recalculated(tmp_path)
    count_before = quota.usage(ALICE)
    trash = result(mailbox.folder("Trash"))
    moved = [src for src, _ in result(inbox.copy([uid], trash))]        # MOVE = copy + expunge
    result(inbox.expunge(moved))
    assert quota.usage(ALICE) == count_before == recalculated(tmp_path)

    result(trash.sync())
    result(trash.expunge([m.uid for m in trash.messages()]))
    assert quota.usage(ALICE) == recalculated(tmp_path)

    result(mailbox.create("Old"))
    old = result(mailbox.folder("Old"))
    result(old.append(b"Subject: old\r\n\r\n" + b"x" * 5000 + b"\r\n"))
    assert quota.usage(ALICE) == recalculated(tmp_path)
    result(mailbox.delete("Old"))
    assert quota.usage(ALICE) == recalculated(tmp_path)
    assert quota.usage(ALICE)[1] == 4
    assert len(maildirsize(tmp_path)) > 2, "kept by deltas, not by listings"


def test_pop3_dele_and_quit_subtract(tmp_path, world):
    store, maildir, quota = world
    result(maildir.deliver([ALICE], MESSAGE))
    result(maildir.deliver([ALICE], MESSAGE + b"more\r\n"))
    assert quota.usage(ALICE) == (2 * ON_DISK + 5, 2)
    maildrop = Maildrop(store.mailbox(ALICE), locks=MaildropLocks())
    result(maildrop.open())
    maildrop.deleteMessage(0)
    assert quota.usage(ALICE) == (2 * ON_DISK + 5, 2), "DELE only marks"
    result(maildrop.sync())
    maildrop.close()
    assert quota.usage(ALICE) == (ON_DISK + 5, 1) == recalculated(tmp_path)


def test_delivery_over_quota_is_still_stored(tmp_path, world):
    store, maildir, quota = world
    (tmp_path / "quotas").write_text("alice@example.org bytes=10 messages=1\n")
    quota._overrides._last_check = None
    result(maildir.deliver([ALICE], MESSAGE))
    assert quota.over(ALICE)
    # Got its 250 already (or is a bounce, a queued message): stored anyway, counted.
    paths = result(maildir.deliver([ALICE], MESSAGE))
    assert len(paths) == 1 and paths[0].exists()
    assert quota.usage(ALICE) == (2 * ON_DISK, 2)


def test_discard_subtracts_what_it_removed(tmp_path, world):
    store, maildir, quota = world
    result(maildir.deliver([ALICE], MESSAGE))
    assert quota.usage(ALICE) == (ON_DISK, 1)
    paths = result(maildir.deliver([ALICE], MESSAGE + b"x\r\n"))
    result(maildir.discard(paths))
    assert quota.usage(ALICE) == (ON_DISK, 1) == recalculated(tmp_path)


def test_a_failing_quota_never_fails_a_delivery(tmp_path, monkeypatch):
    class Broken(FakeQuota):
        def record(self, address, octets_delta, messages_delta):
            raise RuntimeError("boom")

    import mailgw.store.maildir as maildir_module
    logged = []
    monkeypatch.setattr(maildir_module, "Logger", lambda: Logger(observer=logged.append))
    reactor, pool = ThreadlessClock(), ImmediatePool()
    writer = DurableWriter(reactor=reactor, threadpool=pool)
    maildir = MaildirStore(tmp_path / "mail", writer=writer, hostname="mx", quota=Broken())
    paths = result(maildir.deliver([ALICE], MESSAGE))
    assert paths[0].exists()
    assert any(event.get("log_failure") for event in logged)


def test_a_failing_recalculation_is_retried_after_a_minute_not_per_check(tmp_path, monkeypatch):
    put(user_dir(tmp_path) / "new", "1.M1P1Q1.h,S=100")
    clock = task.Clock()
    quota = make_quota(tmp_path, default_bytes=1000, clock=clock)
    scans = []

    def denied(user_dir):
        scans.append(user_dir)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(quota_module, "mailbox_usage", denied)
    assert quota.usage(ALICE) == (0, 0)
    assert not quota.over(ALICE)
    clock.advance(59)
    quota.usage(ALICE)
    assert len(scans) == 1
    monkeypatch.undo()
    clock.advance(1)
    assert quota.usage(ALICE) == (100, 1)
