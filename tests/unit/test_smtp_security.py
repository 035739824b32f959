"""SMTP threats, one test each, named after the threat (design.md §3.10)."""
from __future__ import annotations

import base64

import pytest
from hypothesis import given, strategies as st

from fuzzing import fuzz_settings
from mailgw.smtp.data import has_long_line
from smtp_harness import Session

RELAY_CLIENT = "10.1.1.1"


def start_data(s: Session, rcpt="alice@example.test"):
    s.ehlo()
    assert s.last("MAIL FROM:<x@elsewhere.test>").startswith("250 ")
    assert s.last(f"RCPT TO:<{rcpt}>").startswith("250 ")
    assert s.last("DATA").startswith("354 ")


# -- STARTTLS (CVE-2011-0411 class, RFC 3207 §4.2) ----------------------------
def test_starttls_command_injection_is_discarded():
    s = Session()
    s.ehlo()
    replies = s.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert replies == ["220 2.0.0 Ready to start TLS"]
    assert s.transport.tls_started
    # The injected MAIL was not executed: inside TLS the session starts afresh.
    assert s.last("MAIL FROM:<a@x.test>") == "503 5.5.1 Send HELO/EHLO first"


def test_starttls_resets_session_state():
    s = Session()
    s.ehlo()
    assert s.last("MAIL FROM:<a@x.test>").startswith("250")
    assert s.last("STARTTLS") == "220 2.0.0 Ready to start TLS"
    assert s.server.transaction is None and s.server.session.helo is None
    replies = s.ehlo()
    assert "250-STARTTLS" not in replies and "250-AUTH PLAIN LOGIN" in replies
    assert s.last("STARTTLS") == "503 5.5.1 TLS already active"


def test_no_starttls_inside_implicit_tls():
    s = Session(role="submissions", tls=True, starttls=False)
    assert not any("STARTTLS" in line for line in s.ehlo())
    assert s.last("STARTTLS") == "503 5.5.1 TLS already active"


def test_auth_never_before_tls_on_any_role():
    for role in ("relay", "submission"):
        s = Session(role=role)
        assert not any("AUTH" in line for line in s.ehlo())
        token = base64.b64encode(b"\0alice@example.test\0secret").decode()
        assert s.last(f"AUTH PLAIN {token}").startswith("538 5.7.11")
        assert s.checker.attempts == []      # the password was never even checked


# -- SMTP smuggling: bare CR / LF in DATA --------------------------------------
SMUGGLING_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\n.\r", b"\r.\r\n"]


# Refused from an untrusted client (the default bare_newline), and from a
# trusted one under bare_newline = "reject". Where bare LF is taken as CRLF
# (trusted clients by default) the same input is one message: test_smtp_bare_lf.py.
@pytest.mark.parametrize("client, smtp", [("192.0.2.10", None), (RELAY_CLIENT, {"bare_newline": "reject"})],
                         ids=["untrusted", "trusted-reject"])
@pytest.mark.parametrize("fake_end", SMUGGLING_ENDINGS, ids=repr)
def test_smtp_smuggling_bare_line_endings_refused(fake_end, client, smtp):
    s = Session(client=client, smtp=smtp)
    start_data(s)
    smuggled = (b"Subject: first\r\n\r\nbody" + fake_end +
                b"MAIL FROM:<spoof@example.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nSMUGGLED\r\n.\r\n")
    replies = s.send(smuggled)
    # One reply for the one message the client really sent, and it is a refusal.
    assert replies == ["554 5.6.0 Message refused: bare CR or LF in message (RFC 5321 section 2.3.8)"]
    assert s.store.delivered == [] and s.spool.queued == []
    assert s.last("NOOP") == "250 2.0.0 Ok"


def test_bare_lf_anywhere_in_data_refused():
    s = Session()
    start_data(s)
    assert s.send(b"line one\nline two\r\n.\r\n")[0].startswith("554 5.6.0")
    assert s.store.delivered == []


# -- long lines and unbounded input ---------------------------------------------
def test_long_data_line_does_not_turn_body_into_commands():
    s = Session(client=RELAY_CLIENT)
    start_data(s)
    body = b"X" * 20000 + b"\r\nRCPT TO:<victim@elsewhere.test>\r\nQUIT\r\n.\r\n"
    replies = s.send(body)
    assert replies == ["554 5.6.0 Message refused: line longer than 1000 octets (RFC 5321 section 4.5.3.1.6)"]
    assert not s.closed and s.store.delivered == [] and s.spool.queued == []


def test_text_line_of_exactly_1000_octets_accepted():
    s = Session()
    start_data(s)
    replies = s.send(b"Y" * 998 + b"\r\n.\r\n")
    assert replies[0].startswith("250 2.0.0")


def test_overlong_command_line_gets_one_reply_and_is_not_split():
    s = Session()
    s.ehlo()
    replies = s.send(b"NOOP " + b"A" * 600 + b"RSET\r\n")
    assert replies == ["500 5.5.2 Line too long"]
    replies = s.send(b"NOOP " + b"B" * 20000 + b"QUIT\r\nNOOP\r\n")
    assert replies == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]
    assert not s.closed


def test_input_without_line_end_is_bounded():
    s = Session()
    s.ehlo()
    replies = []
    for _ in range(200):
        replies += s.send(b"Z" * 65536)
    assert replies == ["500 5.5.2 Line too long"]
    assert len(s.server._buffer) < 20000
    assert s.send(b"tail of the long line\r\nNOOP\r\n") == ["250 2.0.0 Ok"]


def test_data_without_line_end_is_bounded_and_refused_as_too_big():
    s = Session(smtp={"max_message_size": 100_000})
    start_data(s)
    for _ in range(100):
        assert s.send(b"W" * 65536) == []
        assert len(s.server._body) < 200_000
    assert s.send(b"\r\n.\r\n") == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert s.store.delivered == [] and s.last("NOOP") == "250 2.0.0 Ok"


# -- arguments ---------------------------------------------------------------
@pytest.mark.parametrize("line", [b"HELO a\rb", b"HELO a\nb", b"MAIL FROM:<a@b.test>\0", b"NOOP \x00",
                                  b"RCPT TO:<alice@example.test>\nX-Injected: yes"])
def test_cr_lf_nul_inside_arguments_refused(line):
    s = Session()
    s.ehlo()
    s.last("MAIL FROM:<a@x.test>") if line.startswith(b"RCPT") else None
    assert s.send(line + b"\r\n") == ["501 5.5.2 CR, LF or NUL not allowed in commands"]
    assert s.server.recipients == []


def test_invalid_utf8_gets_5xx_and_session_stays_usable():
    s = Session()
    s.ehlo()
    assert s.send(b"MAIL FROM:<\xff\xfe@x.test>\r\n") == ["500 5.5.2 Invalid UTF-8 in command"]
    assert s.last("MAIL FROM:<ok@x.test>") == "250 2.1.0 Ok"


def test_auth_without_argument_is_501_not_a_dropped_connection():
    s = Session(role="submissions", tls=True, starttls=False)
    s.ehlo()
    assert s.last("AUTH") == "501 5.5.4 Syntax error in parameters or arguments"
    assert s.last("AUTH PLAIN a b c") == "501 5.5.4 Syntax error in parameters or arguments"
    assert not s.closed


def test_auth_plain_authorization_identity_must_match_login():
    s = Session(role="submissions", tls=True, starttls=False)
    s.ehlo()
    token = base64.b64encode(b"bob@example.test\0alice@example.test\0secret").decode()
    assert s.last(f"AUTH PLAIN {token}") == "535 5.7.8 Authentication credentials invalid"
    assert s.server.user is None


def test_authenticated_user_cannot_forge_another_sender():
    s = Session(role="submissions", tls=True, starttls=False)
    s.ehlo()
    assert s.login() == "235 2.7.0 Authentication successful"
    assert s.last("MAIL FROM:<bob@example.test>") == "553 5.7.1 Sender address rejected: not owned by user"
    assert s.last("MAIL FROM:<ALICE+lists@Example.Test>") == "250 2.1.0 Ok"


def test_authenticated_client_may_relay_on_relay_port_after_starttls():
    s = Session(client="192.0.2.99")
    s.ehlo()
    s.last("STARTTLS")
    s.ehlo()
    assert s.login() == "235 2.7.0 Authentication successful"
    assert s.checker.attempts == [("alice@example.test", "192.0.2.99")]
    s.last("MAIL FROM:<alice@example.test>")
    assert s.last("RCPT TO:<friend@elsewhere.test>") == "250 2.1.5 Ok"


def test_client_that_never_reads_replies_cannot_grow_our_buffers():
    s = Session(smtp={"max_commands_before_mail": 100_000})
    s.ehlo()
    producer = s.transport.producer
    assert producer is not None and s.transport.streaming
    producer.pauseProducing()                  # the transport: write buffer full
    assert s.send(b"NOOP\r\n" * 40) == []    # no more replies while the client does not read
    assert s.transport.producerState == "producing"
    s.send(b"NOOP\r\n" * 50_000)             # 300 KB more: now reading stops too
    assert s.transport.producerState == "paused"
    producer.resumeProducing()
    assert s.transport.producerState == "producing"
    assert s.read() == ["250 2.0.0 Ok"] * 50_040


@fuzz_settings(500)
@given(st.lists(st.sampled_from([0, 1, 5, 997, 998, 999, 1000, 2500]), max_size=8))
def test_long_line_check_agrees_with_the_definition(lengths):
    data = b"\n".join(b"a" * n for n in lengths)
    assert has_long_line(data, 998) == (max(map(len, data.split(b"\n"))) > 998)
