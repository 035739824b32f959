"""Several sessions on one shared folder: each has its own sequence numbers;
changes from the others arrive as untagged EXPUNGE / EXISTS / FETCH FLAGS at
the moments RFC 3501 §7.4.1 and RFC 2180 allow (docs/twisted.md §4.4:
Twisted sent no EXPUNGE to other sessions, so their numbers silently shifted)."""
from __future__ import annotations

import re

from twisted.internet import task

from imap_harness import SIMPLE, IMAPSession, filled, release


def sessions(count: int, *, messages: int = 3, store=None):
    store = store or filled(count=messages)
    clock = task.Clock()
    result = []
    for _ in range(count):
        session = IMAPSession(store=store, clock=clock)
        session.login()
        session.select()
        result.append(session)
    return result


def expunges(lines):
    return [line for line in lines if re.fullmatch(r"\* \d+ EXPUNGE", line)]


def test_expunge_by_another_session_is_announced_on_noop_not_during_fetch():
    a, b = sessions(2)
    b.run("STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert expunges(b.run("EXPUNGE")) == ["* 2 EXPUNGE"]
    # A still numbers the messages 1, 2, 3: message 2 is gone, 3 is still 3.
    lines = a.run("FETCH 1:3 (UID)", expect="NO")
    assert lines == ["* 1 FETCH (UID 1)", "* 3 FETCH (UID 3)",
                     "a3 NO [EXPUNGEISSUED] Some messages no longer exist"]
    assert a.run("NOOP") == ["* 2 EXPUNGE", "a4 OK NOOP completed"]
    assert a.run("FETCH 2 (UID)") == ["* 2 FETCH (UID 3)", "a5 OK FETCH completed"]


def test_expunge_is_never_sent_during_store_or_search_nor_their_uid_forms():
    a, b = sessions(2, messages=4)
    b.run("STORE 1,3 +FLAGS.SILENT (\\Deleted)")
    b.run("EXPUNGE")
    for command in ("SEARCH ALL", "UID SEARCH ALL", "STORE 4 +FLAGS (\\Seen)", "UID STORE 4 -FLAGS (\\Seen)",
                    "FETCH 2 FLAGS", "UID FETCH 2 FLAGS"):
        lines = a.run(command, expect=None)
        assert not expunges(lines), (command, lines)
    # SEARCH keeps A's numbering: the ghosts do not match, the others keep their numbers.
    assert a.run("SEARCH ALL")[0] == "* SEARCH 2 4"
    assert a.run("CHECK") == ["* 3 EXPUNGE", "* 1 EXPUNGE", "a10 OK CHECK completed"]
    assert a.run("SEARCH ALL")[0] == "* SEARCH 1 2"


def test_expunge_during_a_fetch_in_flight_waits_for_the_next_allowed_command():
    a, b = sessions(2, messages=3)
    folder = a.folder()
    folder.hold = []                     # A's FETCH reads park here
    tag = a.next_tag()
    a.server.dataReceived(f"{tag} FETCH 1:3 BODY.PEEK[]\r\n".encode())
    assert a.read() == []
    held = list(folder.hold)
    folder.hold = None
    b.run("STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.run("EXPUNGE")
    folder.hold = held
    release(folder.hold)
    folder.hold = None
    lines = a.read()
    assert not expunges(lines)
    assert lines[-1] == f"{tag} OK FETCH completed"
    assert a.run("NOOP") == ["* 1 EXPUNGE", "a4 OK NOOP completed"]


def test_exists_never_decreases_expunge_comes_first():
    a, b = sessions(2, messages=3)
    b.run("STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.run("EXPUNGE")
    b.folder().add(SIMPLE)
    # During FETCH the ghost stays counted: 3 + 1 new = 4, never 3.
    lines = a.run("FETCH 2 (UID)")
    assert "* 4 EXISTS" in lines and not expunges(lines)
    assert a.run("NOOP") == ["* 1 EXPUNGE", "a4 OK NOOP completed"]
    assert a.run("FETCH 3 (UID)")[0] == "* 3 FETCH (UID 4)"


def test_flag_changes_reach_other_sessions_once_and_not_the_storing_one_twice():
    a, b = sessions(2)
    lines = b.run("STORE 1:2 +FLAGS (\\Flagged)")
    assert lines == ["* 1 FETCH (FLAGS (\\Flagged))", "* 2 FETCH (FLAGS (\\Flagged))", "a3 OK STORE completed"]
    assert b.run("NOOP") == ["a4 OK NOOP completed"]
    assert a.run("NOOP") == ["* 1 FETCH (UID 1 FLAGS (\\Flagged))", "* 2 FETCH (UID 2 FLAGS (\\Flagged))",
                             "a3 OK NOOP completed"]
    assert a.run("NOOP") == ["a4 OK NOOP completed"]


def test_store_silent_sends_nothing_to_the_storing_session_but_tells_the_others():
    a, b = sessions(2)
    assert b.run("STORE 3 +FLAGS.SILENT (\\Seen)") == ["a3 OK STORE completed"]
    assert b.run("NOOP") == ["a4 OK NOOP completed"]
    assert a.run("NOOP") == ["* 3 FETCH (UID 3 FLAGS (\\Seen))", "a3 OK NOOP completed"]


def test_recent_is_seen_by_exactly_one_session():
    a, b, c = sessions(3, messages=1)
    a.folder().deliver(SIMPLE)               # an MDA drops it into new/
    assert a.run("NOOP") == ["* 2 EXISTS", "* 1 RECENT", "a3 OK NOOP completed"]
    assert b.run("NOOP") == ["* 2 EXISTS", "* 0 RECENT", "a3 OK NOOP completed"]
    assert c.run("CHECK") == ["* 2 EXISTS", "* 0 RECENT", "a3 OK CHECK completed"]
    assert a.run("FETCH 2 FLAGS")[0] == "* 2 FETCH (FLAGS (\\Recent))"
    assert b.run("FETCH 2 FLAGS")[0] == "* 2 FETCH (FLAGS ())"
    assert a.run("SEARCH RECENT")[0] == "* SEARCH 2"
    assert b.run("SEARCH RECENT")[0] == "* SEARCH"
    # A later SELECT elsewhere does not make it \Recent again.
    d = IMAPSession(store=a.store, clock=a.clock)
    d.login()
    assert "* 0 RECENT" in d.select()


def test_idle_session_is_woken_by_an_added_event_at_once():
    a, b = sessions(2, messages=1)
    tag = a.next_tag()
    assert a.cmd(f"{tag} IDLE") == ["+ idling"]
    b.run("APPEND INBOX {5}\r\nHi!\r\n".replace("{5}\r\nHi!\r\n", "{5+}\r\nHi!\r\n"))
    assert a.read() == ["* 2 EXISTS", "* 0 RECENT"]
    assert a.cmd("DONE") == [f"{tag} OK IDLE terminated"]


def test_idle_session_gets_flags_and_expunges_pushed():
    a, b, c = sessions(3, messages=5)
    tag = a.next_tag()
    a.cmd(f"{tag} IDLE")
    c.run("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    assert a.read() == ["* 2 FETCH (UID 2 FLAGS (\\Deleted))", "* 4 FETCH (UID 4 FLAGS (\\Deleted))"]
    c.run("EXPUNGE")
    assert a.read() == ["* 4 EXPUNGE", "* 2 EXPUNGE"]
    assert a.cmd("DONE") == [f"{tag} OK IDLE terminated"]
    # B was not idling: it learns everything at its next NOOP, in a valid order.
    assert b.run("NOOP") == ["* 4 EXPUNGE", "* 2 EXPUNGE", "a3 OK NOOP completed"]
    assert a.run("FETCH 1:* (UID)")[:3] == ["* 1 FETCH (UID 1)", "* 2 FETCH (UID 3)", "* 3 FETCH (UID 5)"]


def test_idle_finds_mail_delivered_behind_the_stores_back_by_polling():
    from mailgw.imap.server import IDLE_SYNC_INTERVAL
    (a,) = sessions(1, messages=1)
    tag = a.next_tag()
    a.cmd(f"{tag} IDLE")
    a.folder().deliver(SIMPLE)
    assert a.read() == []
    a.clock.advance(IDLE_SYNC_INTERVAL)
    assert a.read() == ["* 2 EXISTS", "* 1 RECENT"]
    a.clock.advance(IDLE_SYNC_INTERVAL)
    assert a.read() == []
    assert a.cmd("DONE") == [f"{tag} OK IDLE terminated"]


def test_move_by_one_session_is_an_expunge_for_the_others():
    a, b = sessions(2, messages=3)
    lines = b.run("MOVE 1 Trash")
    assert lines == ["* OK [COPYUID 1004 1 1] Moved", "* 1 EXPUNGE", "a3 OK MOVE completed"]
    assert a.run("NOOP") == ["* 1 EXPUNGE", "a3 OK NOOP completed"]


def test_append_and_copy_into_a_folder_selected_elsewhere_announce_exists():
    a, b = sessions(2, messages=2)
    b.run("COPY 1:2 INBOX")
    assert b.run("NOOP") == ["a4 OK NOOP completed"]     # already told with the COPY reply
    assert a.run("NOOP") == ["* 4 EXISTS", "* 0 RECENT", "a3 OK NOOP completed"]


def test_two_users_never_see_each_other():
    store = filled(count=2)
    filled(store, count=5, address="bob@example.test")
    clock = task.Clock()
    alice = IMAPSession(store=store, clock=clock)
    alice.login()
    bob = IMAPSession(store=store, clock=clock)
    bob.login("bob@example.test", "hunter2")
    assert "* 2 EXISTS" in alice.select()
    assert "* 5 EXISTS" in bob.select()
    bob.run("STORE 1:5 +FLAGS.SILENT (\\Deleted)")
    bob.run("EXPUNGE")
    assert alice.run("NOOP") == ["a3 OK NOOP completed"]


def test_closing_sessions_stop_listening():
    store = filled(count=1)
    a, b = sessions(2, store=store)
    folder = a.folder()
    assert folder.listeners == 2
    a.run("UNSELECT")
    assert folder.listeners == 1
    b.server.connectionLost(None)
    assert folder.listeners == 0
    c = IMAPSession(store=store)
    c.login()
    c.select()
    c.run("EXAMINE Trash")
    assert folder.listeners == 0
    c.run("LOGOUT")
    assert store.mailbox("alice@example.test").get("Trash").listeners == 0


def test_each_session_keeps_its_own_numbering_across_many_changes():
    a, b, c = sessions(3, messages=10)
    b.run("STORE 2:4 +FLAGS.SILENT (\\Deleted)")
    b.run("EXPUNGE")                      # b: 1,5..10 -> 7 messages
    c.folder().add(SIMPLE)                # uid 11
    c.run("NOOP")
    c.run("STORE 1 +FLAGS.SILENT (\\Deleted)")
    c.run("EXPUNGE")                      # removes uid 1
    lines = a.run("NOOP")
    assert lines[:4] == ["* 4 EXPUNGE", "* 3 EXPUNGE", "* 2 EXPUNGE", "* 1 EXPUNGE"]
    assert "* 7 EXISTS" in lines
    uids = [int(m) for m in re.findall(r"UID (\d+)", " ".join(a.run("FETCH 1:* UID")))]
    assert uids == [5, 6, 7, 8, 9, 10, 11]
    # B has not been told about UID 1's expunge nor UID 11 yet: "*" is its highest known UID (10),
    # the expunged UID 1 is simply absent, and the new message is announced after the FETCH.
    lines = b.run("UID FETCH 1:* UID")
    assert [int(m) for m in re.findall(r"UID (\d+)", " ".join(lines))] == [5, 6, 7, 8, 9, 10]
    assert lines[-3:] == ["* 8 EXISTS", "* 0 RECENT", "a5 OK FETCH completed"]
    assert b.run("NOOP")[0] == "* 1 EXPUNGE"
    uids_b = [int(m) for m in re.findall(r"UID (\d+)", " ".join(b.run("UID FETCH 1:* UID")))]
    assert uids_b == [5, 6, 7, 8, 9, 10, 11]


def test_selected_mailbox_deleted_by_another_session_is_no_nonexistent():
    store = filled(count=2)
    store.mailbox("alice@example.test").create("Work")
    work = store.mailbox("alice@example.test").get("Work")
    work._insert(b"Subject: w\r\n\r\nw\r\n", (), None)
    a, b = sessions(2, store=store)
    a.run("SELECT Work")
    assert b.run("DELETE Work")[-1].endswith("OK DELETE completed")
    assert a.run("RENAME Work Other", expect="NO")[-1].endswith("NO [INUSE] Mailbox is selected; CLOSE it first")

    def gone(*args, **kwargs):
        from twisted.internet import defer
        return defer.fail(KeyError("Work"))
    work.sync = work.store_flags = work.expunge = gone
    assert a.run("NOOP", expect="NO")[-1].endswith("NO [NONEXISTENT] The selected mailbox no longer exists")
    assert a.run("STORE 1 +FLAGS (\\Seen)", expect="NO")[-1].endswith("NO [NONEXISTENT] The selected mailbox no longer exists")
    assert a.run("SELECT INBOX")[-1].endswith("OK [READ-WRITE] SELECT completed")


def test_parsed_headers_of_expunged_messages_leave_the_shared_cache():
    # Soak finding: the cache kept dead entries until LRU pushed them out, so
    # a busy server's memory grew for hours.
    a, b = sessions(2)
    b.server.cache = a.server.cache = a.factory.cache        # one cache per process, as in tap.py
    a.run("FETCH 1:3 (ENVELOPE)")
    cache = a.factory.cache
    assert len(cache) == 3
    b.run("STORE 2 +FLAGS.SILENT (\\Deleted)")
    b.run("EXPUNGE")
    assert len(cache) == 2 and all(key[-1] != 2 for key in cache._entries)
    assert cache.bytes == sum(entry.weight for entry in cache._entries.values())
