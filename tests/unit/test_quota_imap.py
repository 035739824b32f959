"""RFC 9208 QUOTA over IMAP, on the real store and a real Quota (Maildir in a
temporary directory): CAPABILITY, GETQUOTAROOT, GETQUOTA, SETQUOTA, and
APPEND / COPY refused with NO [OVERQUOTA] storing nothing; MOVE and local
delivery never refused for quota."""
from __future__ import annotations

import pytest
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from imap_harness import SIMPLE, IMAPSession, filled
from mailgw.config_types import QuotaConfig
from mailgw.durable import DurableWriter
from mailgw.store.folder import Folder
from mailgw.store.mailbox import MailStore
from mailgw.store.maildir import MaildirStore
from mailgw.store.quota import IQuota, Quota, QuotasFile
from threadless import ImmediatePool, ThreadlessClock

try:
    from test_quota import FakeQuota
except ImportError:  # pragma: no cover
    from tests.unit.test_quota import FakeQuota
try:  # rootdir-relative import, or tests as a package
    from test_store import result
except ImportError:  # pragma: no cover
    from tests.unit.test_store import result

ALICE = "alice@example.test"
ON_DISK = len(SIMPLE.replace(b"\r\n", b"\n"))     # 224 octets; RFC822.SIZE 233


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch):
    silent = Logger(observer=lambda event: None)
    for cls in (Folder, Quota, QuotasFile):
        monkeypatch.setattr(cls, "log", silent)


class World:
    def __init__(self, tmp_path, *, default_bytes=0, default_messages=0, quota=True):
        self.tmp_path = tmp_path
        self.reactor = ThreadlessClock()
        pool = ImmediatePool()
        writer = DurableWriter(reactor=self.reactor, threadpool=pool)
        self.quota = Quota(tmp_path / "mail", QuotaConfig(default_bytes, default_messages, tmp_path / "quotas"),
                           clock=self.reactor, check_interval=1.0) if quota else None
        self.store = MailStore(tmp_path / "mail", reactor=self.reactor, threadpool=pool, writer=writer,
                               quota=self.quota)
        self.maildir = MaildirStore(tmp_path / "mail", writer=writer, hostname="mx.example.test",
                                    on_delivered=self.store.delivered, quota=self.quota)
        self.home = tmp_path / "mail" / "example.test" / "alice"

    def session(self) -> IMAPSession:
        session = IMAPSession(store=self.store, clock=self.reactor)
        session.login()
        return session

    def deliver(self, count=1, message=SIMPLE):
        for _ in range(count):
            result(self.maildir.deliver([ALICE], message))

    def files(self, folder=None) -> list[str]:
        base = self.home / folder if folder else self.home
        return sorted(p.name for sub in ("cur", "new", "tmp") if (base / sub).is_dir() for p in (base / sub).iterdir())


def append(session, message=SIMPLE, folder="INBOX", expect="OK"):
    return session.run(f"APPEND {folder} {{{len(message)}+}}\r\n" + message.decode(), expect=expect)


# -- CAPABILITY ---------------------------------------------------------------------------------

def test_quota_capabilities_after_login_only(tmp_path):
    world = World(tmp_path, default_bytes=10 * 1024)
    session = IMAPSession(store=world.store, clock=world.reactor)
    assert "QUOTA" not in session.greeting[0]
    assert "QUOTA" not in session.run("CAPABILITY")[0]
    login = session.login()
    assert "QUOTA QUOTA=RES-STORAGE QUOTA=RES-MESSAGE" in login[-1], login    # the OK [CAPABILITY ...]
    caps = session.run("CAPABILITY")[0].split()
    assert {"QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"} <= set(caps)
    assert "QUOTASET" not in caps


def test_without_a_quota_there_is_no_extension(tmp_path):
    world = World(tmp_path, quota=False)
    session = world.session()
    assert "QUOTA" not in session.run("CAPABILITY")[0]
    assert session.run("GETQUOTAROOT INBOX", expect="BAD")[-1] == "a3 BAD Unknown command GETQUOTAROOT"
    session.run('GETQUOTA ""', expect="BAD")
    session.run('SETQUOTA "" (STORAGE 1)', expect="BAD")
    append(session)                                 # and nothing refuses


# -- GETQUOTAROOT / GETQUOTA / SETQUOTA ----------------------------------------------------

def test_getquotaroot_and_getquota(tmp_path):
    world = World(tmp_path, default_bytes=10 * 1024, default_messages=5)
    world.deliver(2)
    session = world.session()
    assert session.run("GETQUOTAROOT INBOX") == [
        '* QUOTAROOT INBOX ""',
        '* QUOTA "" (STORAGE 1 10 MESSAGE 2 5)',           # 448 octets: 1 unit of 1024, rounded up
        "a2 OK GETQUOTAROOT completed"]
    assert session.run("GETQUOTAROOT Sent")[:2] == ['* QUOTAROOT Sent ""', '* QUOTA "" (STORAGE 1 10 MESSAGE 2 5)']
    assert session.run('GETQUOTA ""') == ['* QUOTA "" (STORAGE 1 10 MESSAGE 2 5)', "a4 OK GETQUOTA completed"]
    assert session.run('GETQUOTA "INBOX"', expect="NO")[-1] == "a5 NO [NONEXISTENT] No such quota root"
    assert session.run("GETQUOTAROOT Nowhere", expect="NO")[-1] == "a6 NO [NONEXISTENT] No such mailbox"


def test_a_resource_without_limit_is_left_out(tmp_path):
    world = World(tmp_path, default_messages=100)
    world.deliver(3)
    session = world.session()
    assert session.run("GETQUOTAROOT INBOX")[:2] == ['* QUOTAROOT INBOX ""', '* QUOTA "" (MESSAGE 3 100)']


def test_no_limits_at_all_means_no_quota_root(tmp_path):
    world = World(tmp_path)
    session = world.session()
    assert session.run("GETQUOTAROOT INBOX") == ["* QUOTAROOT INBOX", "a2 OK GETQUOTAROOT completed"]
    assert session.run('GETQUOTA ""', expect="NO")[-1] == "a3 NO [NONEXISTENT] No such quota root"


def test_an_override_reaches_imap_after_the_check_interval(tmp_path):
    world = World(tmp_path, default_bytes=10 * 1024)
    session = world.session()
    assert session.run('GETQUOTA ""')[0] == '* QUOTA "" (STORAGE 0 10)'
    (tmp_path / "quotas").write_text(f"{ALICE} bytes=1G messages=7\n")
    world.reactor.advance(1)
    assert session.run('GETQUOTA ""')[0] == '* QUOTA "" (STORAGE 0 1048576 MESSAGE 0 7)'


def test_setquota_is_refused(tmp_path):
    world = World(tmp_path, default_bytes=1024)
    session = world.session()
    assert session.run('SETQUOTA "" (STORAGE 512)', expect="NO")[-1] == \
        "a2 NO [NOPERM] Quotas are set by the administrator"
    session.run('SETQUOTA "" ()', expect="NO")
    session.run('SETQUOTA "" (STORAGE 512 MESSAGE 10)', expect="NO")
    session.run('SETQUOTA "" (STORAGE)', expect="BAD")
    session.run('SETQUOTA "" STORAGE 512', expect="BAD")
    assert world.quota.limits(ALICE) == (1024, 0)


# -- APPEND / COPY / MOVE -----------------------------------------------------------------------

def test_append_that_would_go_over_stores_nothing(tmp_path):
    world = World(tmp_path, default_bytes=2 * ON_DISK + 100)
    session = world.session()
    append(session)
    append(session)                                      # 448 of 548 octets
    before = world.files()
    lines = append(session, expect="NO")
    assert lines[-1] == "a4 NO [OVERQUOTA] Mailbox is over quota"
    assert world.files() == before, "nothing stored, not even in tmp/"
    assert world.quota.usage(ALICE) == (2 * ON_DISK, 2)
    append(session, b"Subject: small\r\n\r\nfits\r\n")     # what fits still goes in
    assert len(world.files()) == 3


def test_append_to_a_full_mailbox_is_refused_before_the_literal(tmp_path):
    world = World(tmp_path, default_messages=1)
    world.deliver(1)
    session = world.session()
    tag = session.next_tag()
    lines = session.cmd(f"{tag} APPEND INBOX {{{len(SIMPLE)}}}")
    assert lines == [f"{tag} NO [OVERQUOTA] Mailbox is over quota"], "no '+': the client never sends it"
    assert session.run("NOOP")[-1].endswith("OK NOOP completed")
    # A non-synchronizing literal's octets are skipped, never taken as commands.
    tag = session.next_tag()
    lines = session.send(f"{tag} APPEND INBOX {{20+}}\r\na9 LOGOUT\r\nxxxxxxxx\r\n")
    assert lines == [f"{tag} NO [OVERQUOTA] Mailbox is over quota"]
    assert not session.closed
    assert len(world.files()) == 1


def test_copy_that_would_go_over_stores_nothing(tmp_path):
    world = World(tmp_path, default_messages=3)
    world.deliver(2)
    session = world.session()
    session.select()
    lines = session.run("COPY 1:2 Sent", expect="NO")
    assert lines[-1] == "a3 NO [OVERQUOTA] Mailbox is over quota"
    assert world.files(".Sent") == []
    assert world.quota.usage(ALICE) == (2 * ON_DISK, 2)
    assert session.run("COPY 1 Sent")[-1].startswith("a4 OK [COPYUID ")
    assert len(world.files(".Sent")) == 1
    assert world.quota.usage(ALICE) == (3 * ON_DISK, 3)
    session.run("UID COPY 1 Sent", expect="NO")          # now full


def test_copy_checks_octets_too(tmp_path):
    world = World(tmp_path, default_bytes=3 * ON_DISK)
    world.deliver(2)
    session = world.session()
    session.select()
    assert session.run("COPY 1:2 Sent", expect="NO")[-1] == "a3 NO [OVERQUOTA] Mailbox is over quota"
    session.run("COPY 2 Sent")


def test_move_at_the_limit_is_allowed_and_changes_no_usage(tmp_path):
    world = World(tmp_path, default_bytes=2 * ON_DISK, default_messages=2)
    world.deliver(2)
    session = world.session()
    session.select()
    assert world.quota.over(ALICE)
    lines = session.run("MOVE 1 Trash")
    assert lines[-1] == "a3 OK MOVE completed" and "* 1 EXPUNGE" in lines
    assert world.quota.usage(ALICE) == (2 * ON_DISK, 2)
    assert len(world.files(".Trash")) == 1
    # Making room: expunge (as a client deleting from Trash does) lets mail in again.
    session.select("Trash")
    session.run("STORE 1 +FLAGS (\\Deleted)")
    session.run("EXPUNGE")
    assert world.quota.usage(ALICE) == (ON_DISK, 1)
    append(session)


def test_delivery_over_quota_is_still_stored_and_shown(tmp_path):
    world = World(tmp_path, default_messages=1)
    world.deliver(1)
    assert world.quota.over(ALICE)
    world.deliver(1)                                   # got its 250 already: never refused here
    session = world.session()
    assert "* 2 EXISTS" in session.select()
    assert session.run('GETQUOTA ""')[0] == '* QUOTA "" (MESSAGE 2 1)'


def test_any_store_whose_mailbox_has_a_quota_gets_the_extension():
    """The server asks only IQuota (here a fake) and IFolder: RFC822.SIZE stands in
    for the octets on disk when the folder cannot say."""
    store = filled(count=2)
    quota = FakeQuota(limits=(0, 0))
    assert verifyObject(IQuota, quota)
    store.mailbox(ALICE).quota = quota
    session = IMAPSession(store=store)
    session.login()
    assert "QUOTA=RES-MESSAGE" in session.run("CAPABILITY")[0]
    sizes = [info.size for info in store.mailbox(ALICE).get("INBOX").messages()]
    quota._limits = (sum(sizes) + sizes[0] - 1, 0)
    quota.used[ALICE] = (sum(sizes), 2)
    session.select()
    assert session.run("COPY 1 Sent", expect="NO")[-1] == "a4 NO [OVERQUOTA] Mailbox is over quota"
    assert store.mailbox(ALICE).get("Sent").messages() == []
    quota._limits = (sum(sizes) + sizes[0], 0)
    session.run("COPY 1 Sent")
