"""POP3 server: the avatar over IFolder, threats (one test each, named after the threat,
design.md §3.10), limits, store trouble, config, and a Hypothesis fuzz.

Behaviour per command and response code is pinned by tests/transcripts/pop3/*.txt.
"""
from __future__ import annotations

import base64
import dataclasses
import subprocess
import sys
import textwrap
from io import BytesIO

import pytest
from hypothesis import given, strategies as st
from twisted.cred.checkers import ANONYMOUS
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.interfaces import IPushProducer
from twisted.mail import pop3
from zope.interface.verify import verifyObject

from mailgw import config as config_module
from mailgw.realm import MailRealm
from mailgw.config import ConfigError, load
from mailgw.config_types import ListenerConfig, POP3Limits
from mailgw.interfaces import IFolder, IMailStore, ISessionInfo, IUserMailbox
from mailgw.pop3.maildrop import LOCK_FILE_NAME, Maildrop, MaildropInUse, MaildropLocks
from mailgw.pop3.server import POP3Factory, stuff, top
from mailgw.session.core import LineSession
from mailgw.smtp.inbound import Router
from mailgw.store.events import SEEN
from fuzzing import fuzz_settings, no_logged_failures
from pop3_harness import ALICE, FakeFolder, FakeMailStore, FakeUserMailbox, Session, World
from smtp_harness import FakeSpool, FakeStore, FakeUserDB

BOB = "bob@example.test"
PLAIN_ALICE = base64.b64encode(f"\0{ALICE}\0secret".encode()).decode()


def logged_in(*messages: bytes, **kwargs) -> Session:
    """A session on 995 (implicit TLS), alice logged in, with these messages in her INBOX."""
    kwargs.setdefault("role", "pop3s")
    kwargs.setdefault("tls", True)
    kwargs.setdefault("starttls", False)
    s = Session(**kwargs)
    for message in messages:
        s.inbox.add(message)
    s.read()
    assert s.login().startswith("+OK maildrop has"), "login failed"
    return s


def unstuff_multiline(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """A client's parser of one multi-line response (RFC 1939 §3):
    (status line, body with the byte-stuffing removed, what follows the terminator)."""
    status, sep, rest = raw.partition(b"\r\n")
    assert sep, raw
    lines = []
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, "response not terminated by CRLF.CRLF"
        if line == b".":
            return status, b"".join(lines), rest
        if line.startswith(b"."):
            line = line[1:]
        lines.append(line + b"\r\n")


def retr(s: Session, number: int) -> tuple[bytes, bytes]:
    s.server.dataReceived(f"RETR {number}\r\n".encode())
    status, body, rest = unstuff_multiline(s.raw())
    assert rest == b""
    return status, body


# -- contracts: every provider and fake passes verifyObject (design.md §3.1) -------------
def test_fakes_implement_the_store_contract():
    store = FakeMailStore()
    verifyObject(IMailStore, store)
    verifyObject(IUserMailbox, store.mailbox(ALICE))
    verifyObject(IFolder, FakeFolder())


def test_maildrop_is_a_twisted_pop3_mailbox():
    maildrop = Maildrop(FakeUserMailbox(ALICE), locks=MaildropLocks())
    verifyObject(pop3.IMailbox, maildrop)


def test_server_is_a_line_session_with_output_backpressure():
    # Nothing of Twisted's pop3.POP3 is inherited any more (docs/twisted.md §3).
    s = Session()
    assert isinstance(s.server, LineSession) and not isinstance(s.server, pop3.POP3)
    verifyObject(IPushProducer, s.transport.producer)
    assert s.transport.streaming
    verifyObject(ISessionInfo, s.server.session)


# -- the realm gives POP3 its avatar ---------------------------------------------------
def make_realm(mail_store):
    config = load(overrides={"server": {"data_dir": "/nonexistent-mailgw-test"}})
    return MailRealm(router=Router(config, FakeUserDB()), store=FakeStore(), spool=FakeSpool(),
                     clock=None, mail_store=mail_store)


def test_realm_returns_a_maildrop_for_the_address():
    store = FakeMailStore()
    interface, avatar, logout = make_realm(store).requestAvatar(ALICE, None, pop3.IMailbox)
    assert interface is pop3.IMailbox
    verifyObject(pop3.IMailbox, avatar)
    assert isinstance(avatar, Maildrop) and avatar.mailbox is store.mailbox(ALICE)
    assert logout == avatar.close


def test_realm_refuses_anonymous_pop3():
    with pytest.raises(UnauthorizedLogin):
        make_realm(FakeMailStore()).requestAvatar(ANONYMOUS, None, pop3.IMailbox)


def test_realm_refuses_anonymous_imap_and_a_missing_store_for_either():
    from twisted.mail import imap4
    with pytest.raises(UnauthorizedLogin):
        make_realm(FakeMailStore()).requestAvatar(ANONYMOUS, None, imap4.IAccount)
    for interface in (pop3.IMailbox, imap4.IAccount):
        with pytest.raises(NotImplementedError):
            make_realm(None).requestAvatar(ALICE, None, interface)


def test_realm_without_mail_store_gives_sys_temp_not_a_crash():
    s = Session(role="pop3s", tls=True, starttls=False)
    s.world.realm.mail_store = None
    s.read()
    assert s.last(f"AUTH PLAIN {PLAIN_ALICE}") == "-ERR [SYS/TEMP] Temporary authentication failure, try again later"
    assert not s.closed


def test_login_sets_client_ip_on_the_credentials():
    s = Session(role="pop3s", tls=True, starttls=False, client="198.51.100.7")
    s.login()
    assert s.checker.attempts == [(ALICE, "198.51.100.7")]


# -- the maildrop (pop3.IMailbox over IFolder) ------------------------------------------
def open_maildrop(*messages, locks=None, mailbox=None):
    mailbox = mailbox or FakeUserMailbox(ALICE)
    for message in messages:
        mailbox.inbox.add(message)
    maildrop = Maildrop(mailbox, locks=locks or MaildropLocks())
    results = []
    maildrop.open().addBoth(results.append)
    assert results == [None], results
    return maildrop, mailbox.inbox


def test_maildrop_index_methods_are_zero_based_and_refuse_bad_indices():
    maildrop, inbox = open_maildrop(b"a\r\n", b"bb\r\n")
    assert maildrop.listMessages() == [3, 4]
    assert maildrop.listMessages(1) == 4
    files = []
    maildrop.getMessage(0).addCallback(files.append)
    assert isinstance(files[0], BytesIO) and files[0].read() == b"a\r\n"
    assert maildrop.getUidl(1) == b"0012d68700000002"
    for bad in (-1, 2, "0", True, None):
        with pytest.raises(ValueError):
            maildrop.deleteMessage(bad)           # -1 is how stock Twisted's DELE 0 deleted the last one
    maildrop.deleteMessage(0)
    assert maildrop.listMessages() == [0, 4]
    with pytest.raises(ValueError):
        maildrop.deleteMessage(0)
    with pytest.raises(ValueError):
        maildrop.getMessage(0)
    maildrop.undeleteMessages()
    assert maildrop.listMessages() == [3, 4]


def test_maildrop_sync_is_update_expunge_and_seen():
    maildrop, inbox = open_maildrop(b"a\r\n", b"b\r\n", b"c\r\n")
    maildrop.read(1, retrieved=True)
    maildrop.deleteMessage(2)
    removed = []
    maildrop.sync().addCallback(removed.append)
    assert removed == [1]
    assert inbox.uids == [1, 2]
    assert inbox.flags(2) == {SEEN} and inbox.flags(1) == frozenset()


def test_maildrop_close_releases_the_lock():
    locks = MaildropLocks()
    maildrop, _ = open_maildrop(locks=locks)
    assert ALICE in locks and maildrop.locked
    maildrop.close()
    assert ALICE not in locks and not maildrop.locked


def test_stuff_and_top_helpers():
    assert stuff(b"") == b""
    assert stuff(b".") == b"..\r\n"
    assert stuff(b"a\r\n.\r\n.b\r\n") == b"a\r\n..\r\n..b\r\n"
    message = b"H: 1\r\n\r\nl1\r\nl2\r\n"
    assert top(message, 0) == b"H: 1\r\n\r\n"
    assert top(message, 1) == b"H: 1\r\n\r\nl1\r\n"
    assert top(message, 2) == message and top(message, 10 ** 10) == message
    assert top(b"H: 1\r\n", 3) == b"H: 1\r\n"                       # header only
    assert top(b"\r\nbody\r\nmore\r\n", 1) == b"\r\nbody\r\n"       # no header fields


# -- threats ------------------------------------------------------------------------------
def test_stls_command_injection_is_discarded():
    # CVE-2011-0411 class: what was pipelined in the clear after STLS must not run inside TLS.
    s = Session(plaintext=True)
    s.inbox.add(b"Subject: x\r\n\r\nx\r\n")
    s.read()
    replies = s.send(b"STLS\r\nUSER alice@example.test\r\nPASS secret\r\nDELE 1\r\nQUIT\r\n")
    assert replies == ["+OK Begin TLS negotiation"]
    assert s.transport.tls_started and not s.closed
    assert s.checker.attempts == [] and s.server.mbox is None
    assert s.last("STAT") == "-ERR Not logged in"


def test_stls_forgets_the_user_given_in_the_clear():
    # RFC 2595 §4: the client must discard what it learned, the server what it was told.
    s = Session(plaintext=True)
    s.read()
    assert s.last(f"USER {ALICE}") == "+OK Send PASS"
    assert s.last("STLS") == "+OK Begin TLS negotiation"
    assert s.last("PASS secret") == "-ERR Send USER first"


def test_plaintext_login_is_refused_before_tls():
    s = Session()                      # port 110, allow_plaintext_auth = false (the default)
    capa = s.send("CAPA\r\n")
    assert "USER" not in capa and "SASL PLAIN" not in capa and "STLS" in capa
    for line in (f"USER {ALICE}", "PASS secret", f"AUTH PLAIN {PLAIN_ALICE}", "AUTH PLAIN", "AUTH"):
        assert s.last(line).startswith("-ERR [AUTH] Plaintext authentication disallowed"), line
    assert s.checker.attempts == []    # the password was never even checked
    assert s.server._state == "authorization"


def test_no_stls_where_tls_is_unavailable_or_already_on():
    s = Session(starttls=False)        # a pop3 listener without a TLS context
    assert "STLS" not in s.send("CAPA\r\n")
    assert s.last("STLS") == "-ERR STLS not available"
    s = Session(role="pop3s", tls=True, starttls=False)
    assert "STLS" not in s.send("CAPA\r\n")
    assert s.last("STLS") == "-ERR TLS already active"
    assert not s.transport.tls_started


def test_dele_0_deletes_nothing():
    # Stock Twisted: DELE 0 -> deleteMessage(-1) -> the LAST message is removed at QUIT.
    s = logged_in(b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n")
    assert s.last("DELE 0") == "-ERR No such message"
    assert s.last("QUIT") == "+OK Logging out"
    assert s.inbox.uids == [1, 2]
    assert not any(call[0] == "expunge" for call in s.inbox.calls)


@pytest.mark.parametrize("argument", ["3", "99", "abc", "-1", "+1", "1.0", "１", "99999999999999999999", ""])
def test_dele_of_no_message_is_an_error_and_keeps_the_session(argument):
    s = logged_in(b"a\r\n", b"b\r\n")
    assert s.last(f"DELE {argument}").startswith("-ERR ")
    assert not s.closed and s.last("STAT") == "+OK 2 6"


def test_deleted_messages_leave_stat_list_and_uidl():
    s = logged_in(b"a\r\n", b"bb\r\n", b"ccc\r\n")
    assert s.last("DELE 2") == "+OK Message 2 deleted"
    assert s.last("DELE 2") == "-ERR Message 2 already deleted"
    assert s.last("STAT") == "+OK 2 8"
    assert s.cmd("LIST") == ["+OK 2 messages (8 octets)", "1 3", "3 5", "."]
    assert s.cmd("UIDL") == ["+OK Unique-ID listing follows", "1 0012d68700000001", "3 0012d68700000003", "."]
    assert s.last("LIST 2") == "-ERR Message 2 already deleted"
    assert s.last("UIDL 2") == "-ERR Message 2 already deleted"
    assert s.last("TOP 2 0") == "-ERR Message 2 already deleted"


DOT_MESSAGES = [
    b".\r\n",                                                   # the first line is a lone dot
    b".leading\r\n",
    b"Subject: x\r\n\r\n.\r\n",                                 # a lone dot as the last line
    b"Subject: x\r\n\r\n.\r\nafter\r\n..\r\n...\r\n. \r\n",
    b"Subject: x\r\n\r\n" + b"x" * (16384 - 16) + b"\r\n.\r\nMAIL FROM:<evil@x.test>\r\n",
    b"Subject: x\r\n\r\n" + b"y" * (16384 - 18) + b"\r\n.\r\n",  # "." right at the 16 KiB mark
    b"Subject: x\r\n\r\n" + b"\r\n.".join([b"z" * 1000] * 100) + b"\r\n",
]


@pytest.mark.parametrize("message", DOT_MESSAGES, ids=range(len(DOT_MESSAGES)))
def test_dot_stuffing_at_every_position_round_trips(message):
    # Stock Twisted stuffs per 16 KiB chunk: a "." line at a chunk start ends the
    # response early and the rest is read as server replies (response injection).
    s = logged_in(message)
    status, body = retr(s, 1)
    assert status == f"+OK {len(message)} octets".encode()
    assert body == message
    s.server.dataReceived(b"TOP 1 1000000\r\n")
    status, body, rest = unstuff_multiline(s.raw())
    assert body == message and rest == b""


@fuzz_settings(200)
@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) |
                st.sampled_from([b".", b"..", b". ", b".x"]), max_size=30))
def test_dot_stuffing_round_trips_any_message(lines):
    message = b"".join(line + b"\r\n" for line in lines)
    s = logged_in(message)
    assert retr(s, 1)[1] == message


def test_message_without_final_crlf_still_ends_cleanly():
    s = logged_in(b"Subject: x\r\n\r\nno newline at the end.")
    status, body = retr(s, 1)
    assert body == b"Subject: x\r\n\r\nno newline at the end.\r\n"
    assert s.last("NOOP") == "+OK"


@pytest.mark.parametrize("message", [b"", b"a", b"a\r\n", b".\r\n..\r\n", b"x" * 70000 + b"\r\n",
                                     b"Subject: \xc3\xa9t\xc3\xa9\r\n\r\n\x00\xff binary\r\n"])
def test_list_sizes_equal_retr_octets(message):
    other = b"Subject: other\r\n\r\n.\r\n"
    s = logged_in(message, other)
    listed = {int(n): int(size) for n, size in (line.split() for line in s.cmd("LIST")[1:-1])}
    for number, stored in ((1, message), (2, other)):
        assert listed[number] == len(stored)
        assert s.last(f"LIST {number}") == f"+OK {number} {len(stored)}"
        status, body = retr(s, number)
        assert status == f"+OK {len(stored)} octet{'' if len(stored) == 1 else 's'}".encode()
        # The client reassembles exactly the stored octets (plus the line end a
        # multi-line response needs, only when the message has none).
        assert body == (stored if stored == b"" or stored.endswith(b"\r\n") else stored + b"\r\n")
    assert s.last("STAT") == f"+OK 2 {len(message) + len(other)}"


def test_maildrop_lock_second_session_gets_in_use():
    world = World()
    first = world.session(role="pop3s", tls=True, starttls=False)
    first.login()
    second = world.session(role="pop3", plaintext=False)     # another listener, same realm and locks
    second.read()
    assert second.last("STLS") == "+OK Begin TLS negotiation"
    assert second.last(f"AUTH PLAIN {PLAIN_ALICE}") == \
        "-ERR [IN-USE] Mailbox is locked by another POP3 session, try again later"
    assert not second.closed and second.server.mbox is None
    # bob is not locked out by alice
    third = world.session(role="pop3s", tls=True, starttls=False)
    assert third.login(BOB, "hunter2").startswith("+OK maildrop")
    assert first.last("QUIT") == "+OK Logging out"
    assert second.last(f"AUTH PLAIN {PLAIN_ALICE}").startswith("+OK maildrop")


def test_maildrop_lock_file_is_flocked_across_processes(tmp_path):
    world = World(store=FakeMailStore(root=tmp_path))
    lock_file = tmp_path / "example.test" / "alice" / LOCK_FILE_NAME
    # Another process (another mailgw, a maintenance script) holds the lock.
    lock_file.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys
            f = open({str(lock_file)!r}, "a")
            fcntl.flock(f, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        s = world.session(role="pop3s", tls=True, starttls=False)
        s.read()
        assert s.last(f"AUTH PLAIN {PLAIN_ALICE}").startswith("-ERR [IN-USE]")
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert s.last(f"AUTH PLAIN {PLAIN_ALICE}").startswith("+OK maildrop")
    assert lock_file.exists()
    # And we hold it now: the other process cannot take it.
    probe = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys
            f = open({str(lock_file)!r}, "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(3)
        """)], timeout=10)
    assert probe.returncode == 3
    s.disconnect()
    assert subprocess.run([sys.executable, "-c", f"import fcntl; fcntl.flock(open({str(lock_file)!r}, 'a'), "
                                                 "fcntl.LOCK_EX | fcntl.LOCK_NB)"], timeout=10).returncode == 0


def test_lock_file_goes_to_the_mailbox_path_else_the_inbox_path(tmp_path):
    # IUserMailbox does not promise a path; the real INBOX Folder has one (the Maildir root).
    mailbox = FakeUserMailbox(ALICE)                 # no path
    mailbox.inbox.path = tmp_path / "inbox-root"
    maildrop, _ = open_maildrop(mailbox=mailbox)
    assert (tmp_path / "inbox-root" / LOCK_FILE_NAME).exists()
    maildrop.close()
    mailbox.path = tmp_path / "mailbox-root"
    maildrop, _ = open_maildrop(mailbox=mailbox)
    assert (tmp_path / "mailbox-root" / LOCK_FILE_NAME).exists()
    maildrop.close()
    del mailbox.inbox.path
    mailbox.path = None
    assert Maildrop(mailbox, locks=MaildropLocks()).lock_directory(mailbox.inbox) is None


def test_two_lock_tables_share_the_file_lock(tmp_path):
    # As two processes would: separate tables, one file.
    one, two = MaildropLocks(), MaildropLocks()
    lock = one.acquire(ALICE, tmp_path)
    with pytest.raises(MaildropInUse):
        two.acquire(ALICE, tmp_path)
    lock.release()
    two.acquire(ALICE, tmp_path).release()


def test_dropped_connection_deletes_nothing():
    s = logged_in(b"a\r\n", b"b\r\n")
    assert s.last("DELE 1") == "+OK Message 1 deleted"
    retr(s, 2)
    s.disconnect()
    assert s.inbox.uids == [1, 2]
    assert [call for call in s.inbox.calls if call[0] in ("expunge", "store_flags")] == []
    assert ALICE not in s.world.realm.pop3_locks            # and the lock is gone
    again = s.world.session(role="pop3s", tls=True, starttls=False)
    assert again.login() == "+OK maildrop has 2 messages (6 octets)"


def test_timeout_drops_the_connection_without_update():
    s = logged_in(b"a\r\n")
    s.cmd("DELE 1")
    s.clock.advance(600)
    assert s.closed and s.read() == ["-ERR Disconnected for inactivity"]
    s.disconnect()
    assert s.inbox.uids == [1]


def test_no_user_after_login():
    s = logged_in()
    for line in (f"USER {BOB}", "PASS hunter2", "AUTH PLAIN " + base64.b64encode(f"\0{BOB}\0hunter2".encode()).decode()):
        assert s.last(line) == "-ERR Already logged in"
    assert s.checker.attempts == [(ALICE, "192.0.2.10")]
    assert s.server.user == ALICE and s.server.mbox.address == ALICE


def test_apop_is_not_offered():
    s = Session(role="pop3s", tls=True, starttls=False)
    greeting = s.read()[0]
    assert "<" not in greeting                  # RFC 1939 §7: no APOP timestamp
    assert s.last("APOP alice@example.test c4c9334bac560ecc979e58001b3e22fb") == "-ERR Unknown command"
    assert s.checker.attempts == []


def test_over_long_line_is_refused_whole_and_never_split():
    s = logged_in(b"a\r\n", pop3={"max_errors": 100})
    # 300 octets: over the 255 of RFC 2449 §4, one -ERR, nothing of it executed.
    assert s.cmd("DELE 1" + " " * 300) == ["-ERR Line too long"]
    # No line end for 20 000 octets: one -ERR, and the tail (a DELE) is dropped with it.
    assert s.send(b"NOOP " + b"x" * 20000) == ["-ERR Line too long"]
    assert s.send(b"x" * 20000 + b" DELE 1\r\n") == []
    assert s.last("STAT") == "+OK 1 3"
    assert not s.closed


def test_auth_lines_and_sasl_responses_may_be_longer_than_255():
    # RFC 5034 §4: SASL responses are not bound by the 255 octets of RFC 2449.
    long_password = "p" * 2000
    token = base64.b64encode(f"\0{ALICE}\0{long_password}".encode()).decode()
    s = Session(role="pop3s", tls=True, starttls=False)
    s.world.userdb.users[ALICE] = long_password
    s.read()
    assert s.last(f"AUTH PLAIN {token}").startswith("+OK maildrop")
    s = Session(role="pop3s", tls=True, starttls=False)
    s.read()
    assert s.cmd("AUTH PLAIN") == ["+ "]
    assert s.send(b"A" * 20000 + b"\r\n") == ["-ERR Line too long"]
    assert s.server._state == "authorization"


# -- limits ---------------------------------------------------------------------------------
def test_idle_timeout_is_ten_minutes_by_default():
    # RFC 1939 §3: the autologout timer is at least 10 minutes.
    s = Session()
    s.read()
    s.clock.advance(599)
    s.cmd("CAPA")
    s.clock.advance(599)
    assert not s.closed
    s.clock.advance(1)
    assert s.closed and s.read() == ["-ERR Disconnected for inactivity"]


def test_session_timeout():
    s = Session(pop3={"session_timeout": 100, "command_timeout": 60})
    s.read()
    replies = []
    for _ in range(3):
        s.clock.advance(40)
        replies += s.cmd("CAPA")
    assert s.closed and replies[-1] == "-ERR Session time limit exceeded"


def test_connection_limits_in_all_and_per_ip():
    world = World(pop3={"max_connections": 2, "max_connections_per_ip": 1})
    a = world.session(client="192.0.2.1")
    refused = world.session(client="192.0.2.1")
    assert refused.read() == ["-ERR [SYS/TEMP] Too many connections, try again later"] and refused.closed
    world.session(client="192.0.2.2")
    full = world.session(client="2001:db8::9")
    assert full.read() == ["-ERR [SYS/TEMP] Too many connections, try again later"] and full.closed
    a.disconnect()
    assert not world.session(client="192.0.2.1").closed
    assert world.factory().connections.open_total == 2


def test_max_auth_failures_closes():
    s = Session(role="pop3s", tls=True, starttls=False, pop3={"max_auth_failures": 2})
    s.read()
    assert s.last(f"USER {ALICE}") == "+OK Send PASS"
    assert s.cmd("PASS wrong") == ["-ERR [AUTH] Authentication failed"]
    s.cmd(f"USER {ALICE}")
    assert s.cmd("PASS wrong") == ["-ERR [AUTH] Authentication failed",
                                   "-ERR [AUTH] Too many authentication failures, closing connection"]
    assert s.closed


def test_output_flow_control_holds_pipelined_commands():
    # A client that pipelines RETRs and does not read must not make us buffer the maildrop.
    s = logged_in(b"a" * 100 + b"\r\n", b"b\r\n")
    s.transport.producer.pauseProducing()                  # what the transport does when its buffer is full
    assert s.send(b"RETR 1\r\nRETR 2\r\nSTAT\r\n") == []
    s.clock.advance(500)
    s.transport.producer.resumeProducing()                 # drained: the client reads, the timer restarts
    replies = s.read()
    assert replies[0] == "+OK 102 octets" and replies[-1] == "+OK 2 105"
    s.clock.advance(500)
    assert not s.closed


def test_input_is_paused_when_too_much_is_pipelined():
    s = logged_in(b"a\r\n")
    s.transport.producer.pauseProducing()
    s.send(b"NOOP\r\n" * 50000)
    assert s.transport.producerState == "paused"
    s.transport.producer.resumeProducing()
    assert s.transport.producerState == "producing"
    assert s.read().count("+OK") == 50000


def test_pipelined_replies_stay_in_order_while_the_store_is_slow():
    s = logged_in(b"one\r\n", b"two\r\n")
    s.inbox.hold = []
    assert s.send(b"RETR 1\r\nSTAT\r\nRETR 2\r\nDELE 1\r\nQUIT\r\n") == []
    s.inbox.release()                          # one read for both: RETR 2 was read ahead
    assert s.read() == ["+OK 5 octets", "one", ".", "+OK 2 10", "+OK 5 octets", "two", ".",
                        "+OK Message 1 deleted"]
    assert s.inbox.calls.count(("open_many", (1, 2))) == 1
    assert not s.closed                        # QUIT's UPDATE is still running
    s.inbox.release()                          # store_flags (\Seen)
    s.inbox.release()                          # expunge
    assert s.read() == ["+OK Logging out, 1 message removed"] and s.closed
    assert s.inbox.uids == [2] and s.inbox.flags(2) == {SEEN}


def test_retr_is_one_write_with_tcp_nodelay():
    message = b"Subject: x\r\n\r\n" + b"line\r\n" * 5000
    s = logged_in(message)
    assert s.transport.no_delay is True
    calls = []
    real_write, real_sequence = s.transport.write, s.transport.writeSequence
    s.transport.write = lambda data: (calls.append("write"), real_write(data))
    s.transport.writeSequence = lambda seq: (calls.append("writeSequence"), real_sequence(seq))
    s.server.dataReceived(b"RETR 1\r\n")
    assert calls == ["write"]          # status, message and terminator together (limits.send_now)
    assert unstuff_multiline(s.raw())[1] == message


# -- the snapshot, storage trouble, UPDATE ------------------------------------------------------
def test_login_syncs_then_snapshots():
    s = Session(role="pop3s", tls=True, starttls=False)
    s.inbox.deliver_later(b"new\r\n")
    s.read()
    assert s.login() == "+OK maildrop has 1 message (5 octets)"
    assert s.inbox.calls[0] == ("sync",)
    s.inbox.deliver_later(b"later\r\n")
    s.inbox.sync()                               # someone else syncs: still not in this session
    assert s.last("STAT") == "+OK 1 5"


def test_uidl_is_stable_across_sessions():
    s = logged_in(b"a\r\n", b"b\r\n", b"c\r\n")
    before = dict(line.split() for line in s.cmd("UIDL")[1:-1])
    s.cmd("DELE 1")
    s.cmd("QUIT")
    again = s.world.session(role="pop3s", tls=True, starttls=False)
    again.login()
    after = dict(line.split() for line in again.cmd("UIDL")[1:-1])
    assert after == {"1": before["2"], "2": before["3"]}
    assert all(len(uid) == 16 and uid.isalnum() for uid in after.values())


@pytest.mark.parametrize("method", ["sync", "folder"])
def test_storage_trouble_at_login_is_sys_temp_and_releases_the_lock(method):
    s = Session(role="pop3s", tls=True, starttls=False)
    if method == "folder":
        s.store.mailbox(ALICE).fail_folder = OSError("disk on fire")
    else:
        s.inbox.fail["sync"] = OSError("disk on fire")
    s.read()
    assert s.last(f"AUTH PLAIN {PLAIN_ALICE}") == "-ERR [SYS/TEMP] Temporary server error, try again later"
    assert ALICE not in s.world.realm.pop3_locks and not s.closed
    s.store.mailbox(ALICE).fail_folder = None
    s.inbox.fail.clear()
    assert s.last(f"AUTH PLAIN {PLAIN_ALICE}").startswith("+OK maildrop")


def test_read_errors_are_sys_temp_and_keep_the_session():
    s = logged_in(b"a\r\n", b"b\r\n")
    s.inbox.fail["open"] = s.inbox.fail["open_many"] = OSError("EIO")
    assert s.last("RETR 1") == "-ERR [SYS/TEMP] Temporary server error, try again later"
    assert s.last("TOP 1 0") == "-ERR [SYS/TEMP] Temporary server error, try again later"
    s.inbox.fail.clear()
    s.inbox.remove(2)                          # an IMAP session expunged it meanwhile
    assert s.last("RETR 2") == "-ERR Message 2 was removed by another session"
    assert retr(s, 1)[1] == b"a\r\n"


def test_update_failure_keeps_messages_and_releases_the_lock():
    s = logged_in(b"a\r\n")
    s.cmd("DELE 1")
    s.inbox.fail["expunge"] = OSError("EROFS")
    assert s.cmd("QUIT") == ["-ERR [SYS/TEMP] Deleted messages could not be removed, try again later"]
    assert s.closed and s.inbox.uids == [1]
    assert ALICE not in s.world.realm.pop3_locks


def test_seen_flag_failure_does_not_fail_quit():
    s = logged_in(b"a\r\n", b"b\r\n")
    retr(s, 1)
    s.cmd("DELE 2")
    s.inbox.fail["store_flags"] = OSError("EIO")
    assert s.cmd("QUIT") == ["+OK Logging out, 1 message removed"]
    assert s.inbox.uids == [1]


def test_only_retrieved_kept_unseen_messages_are_flagged_seen():
    s = Session(role="pop3s", tls=True, starttls=False)
    for message in (b"a\r\n", b"b\r\n", b"c\r\n"):
        s.inbox.add(message)
    s.inbox.add(b"d\r\n", flags={SEEN})      # read before, e.g. over IMAP
    s.login()
    retr(s, 1)
    retr(s, 3)
    retr(s, 4)
    s.cmd("TOP 2 0")
    s.cmd("DELE 3")
    s.cmd("QUIT")
    store_calls = [call for call in s.inbox.calls if call[0] == "store_flags"]
    assert store_calls[-1] == ("store_flags", (1,), frozenset({SEEN}), "add")


def test_connection_lost_during_update_keeps_the_lock_until_it_is_done():
    s = logged_in(b"a\r\n")
    s.cmd("DELE 1")
    s.inbox.hold = []
    s.cmd("QUIT")
    s.disconnect()
    assert ALICE in s.world.realm.pop3_locks     # a new session must not see the half-done UPDATE
    s.inbox.release()
    assert s.inbox.uids == [] and ALICE not in s.world.realm.pop3_locks


def test_connection_lost_during_login_leaves_no_lock():
    s = Session(role="pop3s", tls=True, starttls=False)
    s.inbox.hold = []
    s.read()
    s.cmd(f"AUTH PLAIN {PLAIN_ALICE}")
    assert ALICE in s.world.realm.pop3_locks     # locked, syncing
    s.disconnect()
    s.inbox.release()
    assert ALICE not in s.world.realm.pop3_locks and s.server.mbox is None


# -- config -----------------------------------------------------------------------------------
def test_pop3_config_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load().pop3 == POP3Limits(max_command_line=255, max_errors=10, max_auth_failures=3,
                                     command_timeout=600.0, session_timeout=3600.0, max_connections=500,
                                     max_connections_per_ip=20, allow_plaintext_auth=False)


def test_pop3_config_errors_are_all_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load(overrides={"pop3": {"max_command_line": 100, "max_errors": True, "command_timeout": "10 minutes",
                                 "allow_plaintext_auth": "yes", "max_connections": 5,
                                 "max_connections_per_ip": 6, "timeout": 5}})
    errors = info.value.errors
    assert "pop3.max_command_line: must be an integer >= 255, got 100" in errors
    assert "pop3.max_errors: must be an integer >= 1, got true" in errors
    assert 'pop3.command_timeout: must be a number of seconds >= 1, got "10 minutes"' in errors
    assert 'pop3.allow_plaintext_auth: must be true or false, got "yes"' in errors
    assert "pop3.max_connections_per_ip: must not exceed pop3.max_connections (5), got 6" in errors
    assert any(error.startswith("pop3.timeout: unknown key") for error in errors)
    assert len(errors) == 6


def test_default_toml_documents_every_pop3_key():
    text = config_module.EMBEDDED_DEFAULT.read_text()
    section = text.split("\n[pop3]\n", 1)[1].split("\n[", 1)[0]
    for field in dataclasses.fields(POP3Limits):
        assert f"\n{field.name} = " in section, field.name


def test_factory_needs_pop3_limits():
    config = dataclasses.replace(load(overrides={"server": {"data_dir": "/nonexistent-mailgw-test"}}), pop3=None)
    with pytest.raises(ValueError):
        POP3Factory(config=config, listener=ListenerConfig("pop3", "tcp:0", "pop3"), portal=None, clock=None)


# -- fuzz: any line in any state gets +OK/-ERR and no exception (design.md §3.11) -----------------
STATES = {
    "authorization-plain": dict(role="pop3", plaintext=False),
    "authorization-tls": dict(role="pop3s", tls=True, starttls=False),
    "sasl": dict(role="pop3s", tls=True, starttls=False),
    "user-given": dict(role="pop3s", tls=True, starttls=False),
    "transaction": dict(role="pop3s", tls=True, starttls=False),
}
VERBS = st.sampled_from([b"USER", b"PASS", b"AUTH", b"AUTH PLAIN", b"STLS", b"CAPA", b"STAT", b"LIST", b"RETR",
                         b"TOP", b"DELE", b"RSET", b"NOOP", b"UIDL", b"QUIT", b"APOP", b"list", b""])
ARGS = (st.binary(max_size=40) | st.text(max_size=30).map(lambda text: text.encode("utf-8"))
        | st.sampled_from([b"0", b"1", b"2", b"3", b"-1", b"1 1", b"1 0", b"=", b"*", PLAIN_ALICE.encode(), b"\xff",
                           b" "]))
LINES = (st.builds(lambda verb, rest: verb + b" " + rest, VERBS, ARGS) | st.binary(max_size=300)) \
    .map(lambda line: line.replace(b"\n", b""))
LIMITS = {"max_errors": 100000, "max_auth_failures": 100000}


def fuzz_session(state: str) -> Session:
    s = Session(pop3=LIMITS, **STATES[state])
    for message in (b"Subject: a\r\n\r\n.a\r\n", b"b\r\n", b""):
        s.inbox.add(message)
    s.read()
    if state == "sasl":
        assert s.cmd("AUTH PLAIN") == ["+ "]
    elif state == "user-given":
        assert s.cmd(f"USER {ALICE}") == ["+OK Send PASS"]
    elif state == "transaction":
        assert s.login().startswith("+OK")
    return s


def check_response(lines: list[str]) -> None:
    assert lines, "no reply"
    first = lines[0]
    assert first == "+ " or first == "+OK" or first.startswith(("+OK ", "-ERR ")), lines
    assert "SYS/TEMP" not in first, lines              # only an unexpected exception gives that here
    if len(lines) > 1:
        assert first.startswith("+OK") and lines[-1] == ".", lines
        assert "." not in lines[1:-1], lines           # stuffed: no early terminator


@fuzz_settings(300)
@given(state=st.sampled_from(sorted(STATES)), lines=st.lists(LINES, min_size=1, max_size=8))
def test_any_line_in_any_state_gets_ok_or_err(state, lines):
    with no_logged_failures():
        s = fuzz_session(state)
        for line in lines:
            if s.closed:
                break
            check_response(s.send(line + b"\r\n"))
        if not s.closed:
            s.send(b"*\r\n")                                # leave SASL if we are in it
            assert s.last("CAPA") == "."
            if state == "transaction":                    # still logged in: only QUIT ends TRANSACTION
                assert s.last("NOOP") == "+OK"


@fuzz_settings(200)
@given(state=st.sampled_from(sorted(STATES)), lines=st.lists(LINES, min_size=1, max_size=8))
def test_pipelined_replies_equal_one_by_one_replies(state, lines):
    # RFC 2449 §6.6: pipelining changes nothing but the timing. (STLS discards on purpose.)
    lines = [line for line in lines if not line.upper().startswith(b"STLS")]
    one_by_one = fuzz_session(state)
    expected = b""
    for line in lines:
        one_by_one.server.dataReceived(line + b"\r\n")
        expected += one_by_one.raw()
    together = fuzz_session(state)
    together.server.dataReceived(b"".join(line + b"\r\n" for line in lines))
    assert together.raw() == expected


def test_read_ahead_is_bounded_and_skips_deleted_messages():
    from mailgw.pop3 import maildrop as pop3_server
    size = pop3_server.READ_AHEAD_MESSAGES
    bodies = [b"x" * 100 + b"\r\n" for _ in range(2 * size + 8)]
    s = logged_in(*bodies)
    s.cmd("DELE 2")
    retr(s, 1)

    def batches():
        return [call[1] for call in s.inbox.calls if call[0] == "open_many"]
    (first,) = batches()
    assert 2 not in first and len(first) == size
    # The next batch is read in the background once half of this one is used,
    # so a download in order never waits for a read; none is read twice.
    for number in range(3, size + 2):
        retr(s, number)
    assert len(batches()) == 2
    second = batches()[1]
    assert len(second) == size and not set(first) & set(second)
    for number in range(size + 2, len(bodies) + 1):
        assert retr(s, number)[1] == bodies[number - 1]
    uids = [uid for batch in batches() for uid in batch]
    assert len(uids) == len(set(uids)) == len(bodies) - 1      # every message read once; 2 never


def test_a_retr_of_a_message_being_read_ahead_waits_for_that_read():
    from mailgw.pop3 import maildrop as pop3_server
    size = pop3_server.READ_AHEAD_MESSAGES
    bodies = [f"message {i}\r\n".encode() for i in range(2 * size)]
    s = logged_in(*bodies)
    retr(s, 1)
    s.inbox.hold = []                              # reads from now on wait
    for number in range(2, size // 2 + 2):
        retr(s, number)                            # from the first batch; starts the background read
    assert len(s.inbox.hold) == 1
    s.server.dataReceived(f"RETR {size + 1}\r\n".encode())
    assert s.raw() == b""                          # waits for the read in flight, no second read
    (d, result), = s.inbox.hold
    s.inbox.hold = None
    d.callback(result)
    status, body, rest = unstuff_multiline(s.raw())
    assert status.startswith(b"+OK") and body == bodies[size] and rest == b""
    assert sum(1 for call in s.inbox.calls if call[0] == "open_many") == 2


def test_a_failed_read_ahead_costs_nothing_the_retr_reads_again():
    from mailgw.pop3 import maildrop as pop3_server
    size = pop3_server.READ_AHEAD_MESSAGES
    bodies = [f"message {i}\r\n".encode() for i in range(2 * size)]
    s = logged_in(*bodies)
    retr(s, 1)
    s.inbox.fail["open_many"] = OSError("EIO")        # the background read fails
    for number in range(2, size // 2 + 2):
        retr(s, number)
    del s.inbox.fail["open_many"]
    assert retr(s, size + 1)[1] == bodies[size]
    assert sum(1 for call in s.inbox.calls if call[0] == "open_many") == 3
