"""Security regressions, each named after the threat (docs/twisted.md §0, §4, §8.6)."""
from __future__ import annotations

import time

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from imap_harness import SIMPLE, FakeFolder, IMAPSession, filled


@pytest.fixture
def logged_errors():
    """Every critical (traceback) log event during the test."""
    events = []

    def observer(event):
        if event.get("log_failure") is not None:
            events.append(event)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def selected(count=3, **options):
    session = IMAPSession(store=filled(count=count), **options)
    session.login()
    session.select()
    return session


# -- STARTTLS and cleartext passwords ------------------------------------------------------

def test_starttls_command_injection_is_discarded():
    # CVE-2011-0411: commands pipelined in the clear after STARTTLS must not run inside TLS.
    session = IMAPSession(tls=False)
    lines = session.send(b"a1 STARTTLS\r\na2 LOGIN alice@example.test secret\r\na3 SELECT INBOX\r\n")
    assert lines == ["a1 OK Begin TLS negotiation now"]
    assert session.transport.tls_started
    assert session.checker.attempts == []
    assert session.server.state == "not authenticated"


def test_starttls_discards_a_half_received_literal_too():
    session = IMAPSession(tls=False)
    assert session.send(b"a1 STARTTLS\r\na2 LOGIN {5+}\r\nab") == ["a1 OK Begin TLS negotiation now"]
    assert session.send(b"a3 NOOP\r\n") == ["a3 OK NOOP completed"]


def test_login_before_tls_is_refused_with_privacyrequired():
    session = IMAPSession(tls=False)
    assert "LOGINDISABLED" in session.greeting[0] and "AUTH=PLAIN" not in session.greeting[0]
    assert session.run("LOGIN alice@example.test secret", expect="NO")[-1] == \
        "a1 NO [PRIVACYREQUIRED] Log in after STARTTLS"
    assert session.checker.attempts == []        # the password never reached the checker


def test_starttls_not_offered_on_implicit_tls():
    session = IMAPSession(tls=True)
    assert "STARTTLS" not in session.greeting[0]
    assert session.run("STARTTLS", expect="BAD")[-1] == "a1 BAD TLS is already active"


def test_starttls_unavailable_without_certificate():
    session = IMAPSession(tls=False, starttls=False)
    assert "STARTTLS" not in session.greeting[0]
    assert session.run("STARTTLS", expect="NO")[-1] == "a1 NO STARTTLS is not available here"


def test_login_sets_client_ip_for_throttling():
    session = IMAPSession(client="2001:db8::7")
    session.login()
    assert session.checker.attempts == [("alice@example.test", "2001:db8::7")]


def test_authzid_of_another_user_is_refused():
    import base64
    token = base64.b64encode(b"bob@example.test\0alice@example.test\0secret").decode()
    session = IMAPSession()
    assert session.run(f"AUTHENTICATE PLAIN {token}", expect="NO")[-1] == \
        "a1 NO [AUTHENTICATIONFAILED] Authentication failed"
    assert session.checker.attempts == []


def test_password_guessing_closes_after_max_auth_failures():
    session = IMAPSession(imap={"max_auth_failures": 2})
    session.run("LOGIN alice@example.test x", expect="NO")
    lines = session.run("LOGIN alice@example.test y", expect="NO")
    assert lines[-1] == "* BYE Too many failed logins"
    assert session.closed


# -- literals --------------------------------------------------------------------------

def test_unbounded_append_literal_is_refused_without_continuation():
    session = IMAPSession(imap={"max_append": 4096})
    session.login()
    lines = session.cmd("a2 APPEND INBOX {99999999999}")
    assert lines == ["a2 NO [TOOBIG] Message larger than APPENDLIMIT=4096"]
    assert not any(line.startswith("+") for line in lines)
    assert session.run("NOOP")[-1].endswith("OK NOOP completed")


def test_non_synchronizing_literal_bytes_are_never_run_as_commands():
    # Twisted: "{3+}" was BAD and then the literal's bytes ran as a command.
    session = IMAPSession()
    session.login()
    evil = b"x1 DELETE Trash\r\n"
    lines = session.send(b"a2 SELECT {%d+}\r\n%s\r\n" % (len(evil), evil))
    assert lines == ["a2 NO [CANNOT] Invalid mailbox name: control character in mailbox name"]
    assert "Trash" in session.mailbox()._folders


def test_refused_non_synchronizing_literal_is_skipped_not_parsed():
    session = IMAPSession(imap={"max_literal": 1024})
    session.login()
    payload = b"x2 DELETE Trash\r\n" * 100            # 1700 octets, over max_literal
    lines = session.send(b"a2 SEARCH TEXT {%d+}\r\n%s\r\na3 NOOP\r\n" % (len(payload), payload))
    assert lines == ["a2 BAD Literal larger than 1024 octets", "a3 OK NOOP completed"]
    assert "Trash" in session.mailbox()._folders


def test_absurd_non_synchronizing_literal_closes_the_connection():
    session = IMAPSession(imap={"max_append": 4096, "max_literal": 1024})
    session.login()
    lines = session.send(b"a2 SEARCH TEXT {99999999999+}\r\nxxxx")
    assert lines == ["a2 BAD Literal larger than 1024 octets", "* BYE Literal too large to skip"]
    assert session.closed


def test_negative_literal_size_gets_no_continuation():
    session = IMAPSession()
    session.login()
    assert session.cmd("a2 APPEND INBOX {-5}") == ["a2 BAD APPEND needs the message as a literal"]
    assert session.cmd("a3 SELECT {-5}") == ["a3 BAD Expected a string"]
    assert session.cmd("a4 LOGIN {-1}") == ["a4 BAD LOGIN is not valid in the authenticated state"]


def test_literals_before_login_are_limited_to_login():
    session = IMAPSession()
    assert session.cmd("a1 APPEND INBOX {30000000}") == ["a1 BAD Literals are not accepted before login"]
    assert session.cmd("a2 LOGIN {18}") == ["+ Ready for literal data"]


def test_literal_bytes_are_counted_against_the_command_size():
    session = IMAPSession(imap={"max_literal": 1024})
    session.login()
    session.send(b"a2 SEARCH TEXT {1000}\r\n" + b"x" * 1000)
    # A second literal in the same command pushes the total over max_literal + max_command_line.
    big = b" TEXT {1000}\r\n" + b"y" * 1000
    lines = []
    for _ in range(70):
        lines += session.send(big)
        if any("too large" in line for line in lines):
            break
    assert any(line == "a2 BAD Command too large" for line in lines), lines[-3:]


# -- framing and parser bounds ---------------------------------------------------------------

def test_long_command_line_gets_bad_and_the_session_survives():
    # Twisted dropped the connection at 16 KiB (a 4,000-item UID set).
    session = selected(count=3)
    uid_set = ",".join(str(n) for n in range(1, 20000))
    lines = session.cmd(f"a3 UID FETCH {uid_set} FLAGS")
    assert lines == ["a3 BAD Command line too long"]
    assert not session.closed
    assert session.run("NOOP")[-1].endswith("OK NOOP completed")


def test_a_long_uid_set_within_the_limit_works():
    session = selected(count=3)
    uid_set = ",".join(str(n) for n in range(1, 4000))       # ~20 KB: over Twisted's 16 KiB
    lines = session.cmd(f"a3 UID FETCH {uid_set} (UID)")
    assert lines[-1] == "a3 OK FETCH completed" and len(lines) == 4


def test_line_without_crlf_keeps_memory_bounded():
    session = IMAPSession()
    chunk = b"A" * 65536
    started = time.monotonic()
    for _ in range(160):                                    # 10 MiB, never a line end
        session.server.dataReceived(chunk)
        assert len(session.server._buffer) < 200_000
    assert time.monotonic() - started < 5
    assert session.read() == ["* BAD Line too long"]
    assert session.send(b"\r\na1 NOOP\r\n") == ["a1 OK NOOP completed"]


def test_many_pipelined_small_commands_are_linear():
    session = IMAPSession()
    started = time.monotonic()
    lines = session.send(b"".join(b"a%d NOOP\r\n" % n for n in range(20000)))
    assert len(lines) == 20000
    assert time.monotonic() - started < 5


def test_paren_nesting_bomb_is_bad_without_recursion():
    session = selected(count=2)
    lines = session.cmd("a3 SEARCH " + "(" * 30000 + "ALL" + ")" * 30000)
    assert lines == ["a3 BAD Command line too long"] or lines == ["a3 BAD Too deeply nested"]
    assert session.cmd("a4 SEARCH " + "(" * 5000 + "ALL" + ")" * 5000) == ["a4 BAD Too deeply nested"]
    assert session.cmd("a5 SEARCH " + "NOT " * 5000 + "ALL") == ["a5 BAD Too deeply nested"]


def test_long_or_chain_is_flattened_and_evaluated_without_recursion():
    session = selected(count=3)
    lines = session.cmd("a3 SEARCH " + "OR 1 " * 5000 + "2")
    assert lines == ["* SEARCH 1 2", "a3 OK SEARCH completed"]
    lines = session.cmd("a4 SEARCH " + "OR " * 5000 + "1 " * 5000 + "3")
    assert lines == ["* SEARCH 1 3", "a4 OK SEARCH completed"]


def test_huge_sequence_ranges_allocate_nothing_per_number():
    session = selected(count=3)
    started = time.monotonic()
    sets = ",".join(["1:4294967295", "4294967295:1", "*:1", "2:*"] * 200)
    assert session.cmd(f"a3 UID FETCH {sets} (UID)")[-1] == "a3 OK FETCH completed"
    assert session.cmd(f"a4 UID SEARCH UID {sets}")[0] == "* SEARCH 1 2 3"
    assert session.cmd(f"a5 SEARCH {sets}")[0] == "* SEARCH 1 2 3"
    assert session.cmd(f"a6 UID STORE {sets} +FLAGS.SILENT (\\Seen)")[-1] == "a6 OK STORE completed"
    assert time.monotonic() - started < 2


def test_list_pattern_with_many_wildcards_is_not_exponential():
    session = IMAPSession()
    session.login()
    session.run('CREATE "' + "a" * 200 + '"')
    started = time.monotonic()
    lines = session.cmd('a3 LIST "" "' + "*a" * 2000 + 'b"')
    assert lines == ["a3 OK LIST completed"]
    assert time.monotonic() - started < 2


# -- mailboxes and other users' mail -------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "../bob@example.test", "../../etc", "a/../../b", "/etc", "INBOX/../..", ".", "..",
    '"a\\\\b/.."', "&AC4ALg-", "&AC8-etc", "a//b", '"x\x7f"', '"tab\there"',
])
def test_mailbox_names_escaping_the_user_directory_are_refused(name):
    session = IMAPSession()
    session.login()
    for command in (f"SELECT {name}", f"CREATE {name}", f"DELETE {name}", f"STATUS {name} (MESSAGES)",
                    f"APPEND {name} {{3+}}\r\nabc", f"RENAME Trash {name}", f"SUBSCRIBE {name}"):
        lines = session.run(command, expect=None)
        assert lines[-1].split()[1] in ("NO", "BAD"), (command, lines)
    assert session.store.requested == ["alice@example.test"]


def test_a_user_never_reaches_another_users_mail():
    store = filled(count=2, address="bob@example.test")
    store.requested.clear()
    session = IMAPSession(store=store)
    session.login()
    for name in ("bob@example.test", "bob@example.test/INBOX", "../bob@example.test", "~bob", "#shared/bob",
                 '"../example.test/bob"'):
        assert session.run(f"SELECT {name}", expect="NO")
        assert session.run(f"COPY 1 {name}", expect=None)
    assert session.run('LIST "" "*"')[-1].endswith("OK LIST completed")
    assert "bob" not in " ".join(session.run('LIST "../" "*"'))
    assert store.requested == ["alice@example.test"]
    assert len(store.mailbox("bob@example.test").get("INBOX").messages()) == 2


# -- timeouts and limits ---------------------------------------------------------------------------

def test_idle_timeout_says_bye():
    session = IMAPSession(imap={"idle_timeout": 60})
    session.login()
    session.clock.advance(59)
    assert not session.closed
    session.send(b"a2 NOOP\r\n")
    session.clock.advance(59)
    assert not session.closed
    session.clock.advance(2)
    assert session.read() == ["* BYE Autologout; idle for too long"]
    assert session.closed


def test_unauthenticated_sessions_time_out_sooner():
    session = IMAPSession(imap={"login_timeout": 10})
    session.clock.advance(11)
    assert session.read() == ["* BYE Login timeout"]
    assert session.closed
    other = IMAPSession(imap={"login_timeout": 10})
    other.login()
    other.clock.advance(11)
    assert not other.closed


def test_session_time_limit_when_configured():
    session = IMAPSession(imap={"session_timeout": 100})
    session.login()
    for _ in range(12):
        session.clock.advance(9)
        session.send(b"a NOOP\r\n")
    assert session.closed


def test_connection_limits_per_ip_and_in_total():
    first = IMAPSession(imap={"max_connections": 3, "max_connections_per_ip": 2})
    factory, clock = first.factory, first.clock
    second = IMAPSession(factory=factory, clock=clock)
    third = IMAPSession(factory=factory, clock=clock)
    assert third.greeting == ["* BYE [UNAVAILABLE] Too many connections, try again later"]
    assert third.closed
    other_ip = IMAPSession(factory=factory, clock=clock, client="192.0.2.99")
    assert other_ip.greeting[0].startswith("* OK")
    fourth = IMAPSession(factory=factory, clock=clock, client="192.0.2.100")
    assert fourth.closed
    second.server.connectionLost(None)
    assert IMAPSession(factory=factory, clock=clock).greeting[0].startswith("* OK")


def test_pipelined_input_stops_being_read_while_a_command_is_busy():
    session = selected(count=1)
    session.folder().hold = []
    session.server.dataReceived(b"a3 NOOP\r\n")             # sync parks in hold
    session.server.dataReceived(b"a4 NOOP\r\n" * 200_000)   # ~1.8 MB pipelined
    assert session.transport.producerState == "paused"
    folder = session.folder()
    folder.hold, held = None, folder.hold
    for d, value, error in held:
        d.callback(value)
    session.pump()
    assert session.transport.producerState == "producing"


def test_errors_never_show_internals(logged_errors):
    session = selected(count=1)

    def broken(uid):
        raise RuntimeError("/srv/secret/path exploded")
    session.folder().open = session.folder().open_many = broken
    lines = session.run("FETCH 1 BODY[]", expect="NO")
    assert lines[-1] == "a3 NO [SERVERBUG] Internal server error"
    assert "secret" not in " ".join(lines)
    assert len(logged_errors) == 1
    assert session.run("NOOP")[-1].endswith("OK NOOP completed")


def test_idle_lines_other_than_done_are_not_executed():
    # Twisted: IDLE ended on any line and swallowed it.
    session = selected(count=1)
    session.cmd("a3 IDLE")
    assert session.cmd("a4 DELETE Trash") == ["* BAD Expected DONE"]
    assert "Trash" in session.mailbox()._folders
    assert session.cmd("DONE") == ["a3 OK IDLE terminated"]


def test_too_many_bad_commands_close_the_session():
    session = IMAPSession(imap={"max_errors": 3})
    session.cmd("a1 BOGUS")
    session.cmd("a2 BOGUS")
    assert session.cmd("a3 BOGUS") == ["a3 BAD Unknown command BOGUS", "* BYE Too many errors"]
    assert session.closed


# -- output streaming ---------------------------------------------------------------------------

def _big_store(count, size=100):
    store = filled()
    folder = store.mailbox("alice@example.test").get("INBOX")
    body = b"Subject: x\r\n\r\n" + b"y" * size + b"\r\n"
    for _ in range(count):
        folder._insert(body, (), None)
    return store


def test_fetch_of_many_messages_streams_in_chunks_and_respects_backpressure():
    from mailgw.imap.selected import CHUNK_MESSAGES
    session = IMAPSession(store=_big_store(3 * CHUNK_MESSAGES + 10))
    session.login()
    session.select()
    writes = []
    original = session.transport.write
    session.transport.write = lambda data: (writes.append(len(data)), original(data))
    session.server.dataReceived(b"a3 FETCH 1:* BODY.PEEK[]\r\n")
    # The session is the transport's producer for its whole life (mailgw.session.core).
    assert session.transport.producer is not None and session.transport.streaming
    first = len(writes)
    assert first == 1                                         # one chunk, then a reactor turn
    session.transport.producer.pauseProducing()                           # the transport's buffer is full
    for _ in range(5):
        session.clock.advance(0)
    assert len(writes) == 2                                   # the second chunk was due; then it waits
    session.transport.producer.resumeProducing()
    session.pump()
    data = session.transport.value().decode()
    assert data.count(" FETCH (BODY[] {") == 3 * CHUNK_MESSAGES + 10
    assert data.endswith("a3 OK FETCH completed\r\n")
    assert len(writes) == 4 + 1                               # 4 chunks + the tagged reply


def test_connection_lost_during_a_streaming_fetch_stops_it():
    from mailgw.imap.selected import CHUNK_MESSAGES
    session = IMAPSession(store=_big_store(3 * CHUNK_MESSAGES))
    session.login()
    session.select()
    session.server.dataReceived(b"a3 FETCH 1:* (UID RFC822.SIZE)\r\n")
    session.server.connectionLost(None)
    session.pump()
    assert session.transport.value().count(b" FETCH (") == CHUNK_MESSAGES


def test_fetch_of_100000_messages_streams_without_one_reactor_turn_per_message():
    store = filled()
    folder: FakeFolder = store.mailbox("alice@example.test").get("INBOX")
    for _ in range(100_000):
        folder._insert(b"Subject: s\r\n\r\nb\r\n", (), None)
    clock = task.Clock()
    session = IMAPSession(store=store, clock=clock)
    session.login()
    started = time.monotonic()
    session.select()
    session.server.dataReceived(b"a3 FETCH 1:* (UID FLAGS RFC822.SIZE)\r\n")
    turns = 0
    while clock.getDelayedCalls() and turns < 10_000:
        due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        if not due:
            break
        clock.advance(0)
        turns += 1
    data = session.transport.value()
    assert data.endswith(b"a3 OK FETCH completed\r\n")
    assert data.count(b"* ") >= 100_000
    assert turns < 100_000 / 100
    assert time.monotonic() - started < 20


def test_simple_fixture_is_what_the_tests_assume():
    assert SIMPLE.count(b"\r\n\r\n") == 1


def test_fetch_reads_messages_in_batches_when_the_folder_offers_open_many():
    from mailgw.imap.selected import CHUNK_MESSAGES
    session = IMAPSession(store=_big_store(CHUNK_MESSAGES + 5))
    session.login()
    session.select()
    folder = session.folder()
    batches = []

    def open_many(uids):
        batches.append(len(uids))
        return defer.succeed([folder._data.get(uid) for uid in uids])
    folder.open_many = open_many
    folder.expunge([2])
    data = session.send(b"a3 FETCH 1:* BODY.PEEK[]\r\n")
    assert batches == [CHUNK_MESSAGES, 4]            # the expunged one is not read at all
    assert folder.opens == 0
    assert data[-1] == "a3 NO [EXPUNGEISSUED] Some messages no longer exist"


def test_literal_bytes_sent_during_idle_cannot_end_it():
    session = selected(count=1)
    session.cmd("a3 IDLE")
    payload = b"DONE\r\na4 DELETE Trash\r\n"
    lines = session.send(b"x APPEND INBOX {%d+}\r\n%s\r\n" % (len(payload), payload))
    assert lines == ["* BAD Expected DONE"]
    assert "Trash" in session.mailbox()._folders
    assert session.cmd("DONE") == ["a3 OK IDLE terminated"]


def test_literal_bytes_after_a_sasl_response_are_not_commands():
    session = IMAPSession()
    assert session.cmd("a1 AUTHENTICATE PLAIN") == ["+ "]
    payload = b"a2 LOGIN alice@example.test secret\r\n"
    lines = session.send(b"x{%d+}\r\n%s\r\na3 NOOP\r\n" % (len(payload), payload))
    assert lines == ["a1 BAD Invalid base64", "a3 OK NOOP completed"]
    assert session.checker.attempts == []
