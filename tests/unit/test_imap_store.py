"""IMAP sessions on the real mailbox store (mailgw.store.mailbox.MailStore over
Maildir in a temporary directory). The store's file work runs at once on the
test's thread (the store tests' ImmediatePool + ThreadlessClock); its poll of
subscribed folders is driven by the Clock."""
from __future__ import annotations

import re

import pytest
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from imap_harness import MULTIPART, SIMPLE, IMAPSession
from mailgw.interfaces import IFolder, IMailStore, IUserMailbox

store_module = pytest.importorskip("mailgw.store.mailbox")
folder_module = pytest.importorskip("mailgw.store.folder")

try:  # rootdir-relative import, or tests as a package
    from test_store import make_store, result
except ImportError:  # pragma: no cover
    from tests.unit.test_store import make_store, result
from threadless import ImmediatePool, ThreadlessClock

ALICE = "alice@example.test"


@pytest.fixture(autouse=True)
def _quiet_store_logs(monkeypatch):
    monkeypatch.setattr(folder_module.Folder, "log", Logger(observer=lambda event: None))


@pytest.fixture
def world(tmp_path):
    reactor = ThreadlessClock()
    store = make_store(tmp_path / "mail", reactor=reactor, pool=ImmediatePool())
    return store, reactor, tmp_path / "mail" / "example.test" / "alice"


def session_on(world, **options) -> IMAPSession:
    store, reactor, _ = world
    session = IMAPSession(store=store, clock=reactor, **options)
    session.login()
    return session


def drop(user_dir, name, data=SIMPLE.replace(b"\r\n", b"\n")):
    """An MDA delivers into INBOX's new/."""
    (user_dir / "new").mkdir(parents=True, exist_ok=True)
    (user_dir / "new" / name).write_bytes(data)


def test_the_real_store_keeps_the_contract(world):
    store, _, _ = world
    assert verifyObject(IMailStore, store)
    mailbox = store.mailbox(ALICE)
    assert verifyObject(IUserMailbox, mailbox)
    assert verifyObject(IFolder, result(mailbox.folder("INBOX")))


def test_append_fetch_search_store_expunge_on_maildir(world):
    session = session_on(world)
    assert session.run("APPEND INBOX (\\Flagged) {%d+}\r\n" % len(SIMPLE) + SIMPLE.decode())[-1] \
        .startswith("a2 OK [APPENDUID ")
    session.run("APPEND INBOX {%d+}\r\n" % len(MULTIPART) + MULTIPART.decode())
    lines = session.select()
    assert "* 2 EXISTS" in lines and lines[-1] == "a4 OK [READ-WRITE] SELECT completed"
    lines = session.run("FETCH 1:2 (UID FLAGS RFC822.SIZE ENVELOPE)")
    assert lines[0].startswith('* 1 FETCH (UID 1 FLAGS (\\Flagged) RFC822.SIZE 233 ENVELOPE ("Tue, 14 Nov 2023')
    assert "RFC822.SIZE 551" in lines[1]
    assert session.run("FETCH 2 BODY.PEEK[3.1]")[:2] == ["* 2 FETCH (BODY[3.1] {10}", "inner body)"]
    body = session.run("FETCH 1 BODY.PEEK[]<0.4>")
    assert body[:2] == ["* 1 FETCH (BODY[]<0> {4}", "Date)"]
    assert session.run('UID SEARCH HEADER X-Tag "first"')[0] == "* SEARCH 1"
    assert session.run("SEARCH FLAGGED")[0] == "* SEARCH 1"
    assert session.run("STORE 1 +FLAGS (\\Deleted $Done)")[:3] == [
        "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Done)",
        "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Done \\*)] Flags permitted",
        "* 1 FETCH (FLAGS (\\Flagged \\Deleted $Done))"]
    assert session.run("EXPUNGE") == ["* 1 EXPUNGE", "a11 OK EXPUNGE completed"]
    assert session.run("FETCH 1 UID")[0] == "* 1 FETCH (UID 2)"


def test_copy_move_and_folders_on_maildir(world):
    session = session_on(world)
    session.run("APPEND INBOX {%d+}\r\n" % len(SIMPLE) + SIMPLE.decode())
    session.run("APPEND INBOX {%d+}\r\n" % len(SIMPLE) + SIMPLE.decode())
    session.select()
    assert re.fullmatch(r"a5 OK \[COPYUID \d+ 1:2 1:2\] COPY completed", session.run("COPY 1:2 Trash")[-1])
    lines = session.run("MOVE 1 Junk")
    assert re.fullmatch(r"\* OK \[COPYUID \d+ 1 1\] Moved", lines[0]) and lines[1:] == [
        "* 1 EXPUNGE", "a6 OK MOVE completed"]
    assert session.run("COPY 1 Nowhere", expect="NO")[-1] == "a7 NO [TRYCREATE] No such mailbox"
    session.run("CREATE Projects/2024")
    session.run("RENAME Projects/2024 Archive/2024")
    lines = session.run('LIST "" "*"')
    assert '* LIST (\\HasNoChildren \\Trash) "/" Trash' in lines
    assert any(line.endswith('"/" Archive/2024') for line in lines)
    assert session.run("STATUS Trash (MESSAGES UNSEEN)")[0] == "* STATUS Trash (MESSAGES 2 UNSEEN 2)"
    assert session.run("DELETE Nowhere", expect="NO")[-1].endswith("NO [NONEXISTENT] No such mailbox")
    for name in ("../bob", "a/../../b", "&AC4ALg-"):
        assert session.run(f"CREATE {name}", expect="NO")


def test_mail_delivered_to_new_is_recent_for_the_session_that_finds_it(world):
    _, _, user_dir = world
    a = session_on(world)
    a.select()
    b = session_on(world)
    b.select()
    drop(user_dir, "1700000000.M1P1Q1.host,S=200")
    assert a.run("NOOP") == ["* 1 EXISTS", "* 1 RECENT", "a3 OK NOOP completed"]
    assert b.run("NOOP") == ["* 1 EXISTS", "* 0 RECENT", "a3 OK NOOP completed"]
    assert a.run("FETCH 1 FLAGS")[0] == "* 1 FETCH (FLAGS (\\Recent))"
    assert b.run("FETCH 1 FLAGS")[0] == "* 1 FETCH (FLAGS ())"


def test_idle_is_woken_by_the_store_poll_and_by_other_sessions(world):
    store, reactor, user_dir = world
    a = session_on(world)
    a.select()
    b = session_on(world)
    b.select()
    a.cmd("a9 IDLE")
    b.run("APPEND INBOX {5+}\r\nHi!\r\n")
    assert a.read() == ["* 1 EXISTS", "* 0 RECENT"]
    drop(user_dir, "1700000001.M1P1Q1.host,S=200")
    reactor.advance(1.0)                           # the store's poll of subscribed folders
    assert a.read()[0] == "* 2 EXISTS"
    b.run("STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert a.read() == ["* 1 FETCH (UID 1 FLAGS (\\Deleted))"]
    b.run("EXPUNGE")
    assert a.read() == ["* 1 EXPUNGE"]
    assert a.cmd("DONE") == ["a9 OK IDLE terminated"]


def test_expunge_by_another_session_waits_while_fetching(world):
    a = session_on(world)
    b = session_on(world)
    for _ in range(3):
        b.run("APPEND INBOX {%d+}\r\n" % len(SIMPLE) + SIMPLE.decode())
    a.select()
    b.select()
    b.run("STORE 2 +FLAGS.SILENT (\\Deleted)")
    b.run("EXPUNGE")
    lines = a.run("FETCH 1:3 (UID)", expect="NO")
    assert lines == ["* 1 FETCH (UID 1)", "* 3 FETCH (UID 3)", "a3 NO [EXPUNGEISSUED] Some messages no longer exist"]
    assert a.run("NOOP") == ["* 2 EXPUNGE", "a4 OK NOOP completed"]


def test_keywords_the_store_cannot_keep_are_no_limit_not_a_server_bug(world):
    session = session_on(world)
    session.run("APPEND INBOX {5+}\r\nHi!\r\n")
    session.select()
    flags = " ".join(f"$k{n}" for n in range(70))
    assert session.run(f"STORE 1 +FLAGS ({flags})", expect="NO")[-1].split()[1:3] == ["NO", "[LIMIT]"]
    assert session.run("STORE 1 +FLAGS ($" + "x" * 200 + ")", expect="NO")[-1].split()[1:3] == ["NO", "[LIMIT]"]
    assert session.run("APPEND INBOX ($" + "y" * 200 + ") {5+}\r\nHi!\r\n", expect="NO")[-1].split()[2] == "[LIMIT]"
    assert session.run("NOOP")[-1].endswith("OK NOOP completed")
