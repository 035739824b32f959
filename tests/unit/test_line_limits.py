"""Boundary tests for every line limit of every protocol (issue 15, item 6).

For each limit: a line of exactly the limit (its line end included) is
taken, one octet more is refused with the protocol's exact reply, and the
session goes on as if the refused line had never been sent (the next command
gets its normal answer). Each limit is tested at its default and at a
configured, non-default value, so that a constant hard-coded in a server, or
an off-by-one in the arithmetic (`len(line) + 2 > limit`, `has_long_line(lf,
limit - 2)`, `available > limit`), fails here.

Only the wire is used: bytes in through the harnesses, replies out, never a
server's internals, so that these tests hold across refactors of the servers.
The limits are written out as numbers (512, 1000, 255, 12288, 65536): a test
that read them from the server would move with a wrong constant.

Three groups of tests here first found real SMTP defects (marked "Was a defect"),
fixed in mailgw/smtp/server.py while this file was written; they now guard the fix.
"""
from __future__ import annotations

import base64

import pytest

from imap_harness import IMAPSession, filled
from pop3_harness import ALICE, Session as POP3Session
from smtp_harness import FakeUserDB, Session as SMTPSession

CRLF = b"\r\n"


def exact(total: int, head: bytes, tail: bytes = b"", fill: bytes = b"x", end: bytes = CRLF) -> bytes:
    """head + fill... + tail + end: exactly `total` octets, the line end included."""
    pad = total - len(head) - len(tail) - len(end)
    assert pad >= 0, (total, head)
    line = head + fill * pad + tail + end
    assert len(line) == total
    return line


def plain_token(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def password_for_token(user: str, token_length: int) -> str:
    """A password whose PLAIN response ("\\0user\\0password") is `token_length`
    octets of base64 without padding (token_length % 4 == 0)."""
    assert token_length % 4 == 0
    password = "p" * (token_length // 4 * 3 - len(user) - 2)
    assert len(plain_token(user, password)) == token_length
    return password


# == SMTP =====================================================================================
# RFC 5321 §4.5.3.1.4: a command line is 512 octets with its CRLF ([smtp] max_command_line);
# MAIL gets the extensions' allowance of 658 octets more (SIZE 26, ENVID 100, AUTH= 500,
# BODY, SMTPUTF8, RET), RCPT 500 more (NOTIFY, ORCPT: RFC 3461 §4); AUTH lines and SASL
# responses 12288 (RFC 4954 §4). RFC 5321 §4.5.3.1.6: a text line is 1000 octets with its
# CRLF ([smtp] max_text_line).

SMTP_TOO_LONG = "500 5.5.2 Line too long"
SMTP_OK = "250 2.0.0 Ok"
SMTP_SENDER_OK = "250 2.1.0 Ok"
SMTP_RECIPIENT_OK = "250 2.1.5 Ok"
SMTP_START_DATA = "354 End data with <CR><LF>.<CR><LF>"
SMTP_AUTH_OK = "235 2.7.0 Authentication successful"
SMTP_CANNOT_DECODE = "501 5.5.2 Cannot decode response"
MAIL_ALLOWANCE = 658
RCPT_ALLOWANCE = 500
SASL_LIMIT = 12288
ALICE_PASSWORD = "secret"
RELAY_CLIENT = "10.1.1.1"        # in the harness's trusted_networks


def smtp_queued(n: int = 1) -> str:
    return f"250 2.0.0 Ok: queued as Q{n:015d}"


def smtp_text_too_long(limit: int) -> str:
    return f"554 5.6.0 Message refused: line longer than {limit} octets (RFC 5321 section 4.5.3.1.6)"


def smtp_session(**options) -> SMTPSession:
    s = SMTPSession(**options)
    assert s.read() == ["220 mail.example.test ESMTP mailgw"]
    return s


def smtp_greeted(**options) -> SMTPSession:
    s = smtp_session(**options)
    s.ehlo()
    return s


def smtp_auth_session(smtp=None, userdb=None) -> SMTPSession:
    """Submission over implicit TLS, where AUTH is offered."""
    return smtp_greeted(role="submissions", tls=True, starttls=False, smtp=smtp, userdb=userdb)


def smtp_in_data(smtp=None, client="192.0.2.10") -> SMTPSession:
    s = smtp_greeted(smtp=smtp, client=client)
    assert s.cmd("MAIL FROM:<x@elsewhere.test>") == [SMTP_SENDER_OK]
    assert s.cmd("RCPT TO:<alice@example.test>") == [SMTP_RECIPIENT_OK]
    assert s.cmd("DATA") == [SMTP_START_DATA]
    return s


def smtp_goes_on(s: SMTPSession, queue_number: int) -> None:
    """After a refusal: NOOP is answered, and a whole new transaction works."""
    assert not s.closed
    assert s.cmd("NOOP") == [SMTP_OK]
    assert s.cmd("MAIL FROM:<x@elsewhere.test>") == [SMTP_SENDER_OK]
    assert s.cmd("RCPT TO:<alice@example.test>") == [SMTP_RECIPIENT_OK]
    assert s.cmd("DATA") == [SMTP_START_DATA]
    assert s.send(b"Subject: next\r\n\r\nnext\r\n.\r\n") == [smtp_queued(queue_number)]


# The configured values: [smtp] max_command_line may only be raised (512 is its minimum),
# so the non-default values are larger; 20000 also lifts the overall bound on a line
# without CRLF above the 12288 an AUTH line needs.
COMMAND_LINE_CONFIGS = [pytest.param(None, 512, id="default-512"),
                        pytest.param({"max_command_line": 600}, 600, id="configured-600"),
                        pytest.param({"max_command_line": 20000}, 20000, id="configured-20000")]


@pytest.mark.parametrize("smtp, base", COMMAND_LINE_CONFIGS)
def test_smtp_command_line_at_the_limit_is_taken_one_over_refused(smtp, base):
    s = smtp_greeted(smtp=smtp)
    assert s.send(exact(base, b"NOOP ")) == [SMTP_OK]
    assert s.send(exact(base + 1, b"NOOP ")) == [SMTP_TOO_LONG]
    assert s.cmd("NOOP") == [SMTP_OK]
    assert not s.closed


@pytest.mark.parametrize("smtp, base", COMMAND_LINE_CONFIGS)
def test_smtp_mail_line_has_the_extension_allowance(smtp, base):
    # A real parameter fills the line: AUTH=<mailbox> (RFC 4954 §5), taken and not trusted.
    s = smtp_greeted(smtp=smtp)
    head = b"MAIL FROM:<x@elsewhere.test> AUTH="
    assert s.send(exact(base + MAIL_ALLOWANCE + 1, head)) == [SMTP_TOO_LONG]
    # The refused MAIL opened no transaction: this one is not "nested".
    assert s.send(exact(base + MAIL_ALLOWANCE, head)) == [SMTP_SENDER_OK]
    assert s.cmd("RSET") == [SMTP_OK]
    smtp_goes_on(s, 1)


@pytest.mark.parametrize("smtp, base", COMMAND_LINE_CONFIGS)
def test_smtp_rcpt_line_has_the_extension_allowance(smtp, base):
    # A real parameter fills the line: ORCPT=rfc822;<address> (RFC 3461 §4.2).
    s = smtp_greeted(smtp=smtp)
    assert s.cmd("MAIL FROM:<x@elsewhere.test>") == [SMTP_SENDER_OK]
    head, tail = b"RCPT TO:<alice@example.test> ORCPT=rfc822;", b"@example.test"
    assert s.send(exact(base + RCPT_ALLOWANCE + 1, head, tail)) == [SMTP_TOO_LONG]
    # The refused RCPT added no recipient.
    assert s.cmd("DATA") == ["503 5.5.1 Need RCPT command"]
    assert s.send(exact(base + RCPT_ALLOWANCE, head, tail)) == [SMTP_RECIPIENT_OK]
    assert s.cmd("DATA") == [SMTP_START_DATA]
    assert s.send(b"Subject: t\r\n\r\nbody\r\n.\r\n") == [smtp_queued(1)]
    smtp_goes_on(s, 2)


@pytest.mark.parametrize("smtp", [None, {"max_command_line": 600}], ids=["default", "configured-600"])
def test_smtp_auth_line_may_have_12288_octets(smtp):
    # RFC 4954 §4: the AUTH line has its own bound, whatever max_command_line is.
    # Strict base64 comes in groups of 4, so a valid PLAIN line can be 12285 octets
    # at most ("AUTH PLAIN " + 12272 + CRLF); the line of exactly 12288 carries a
    # response that is not base64: refused by the decoder (501), so it got past
    # the length check (which would say 500).
    password = password_for_token(ALICE, 12272)
    s = smtp_auth_session(smtp=smtp, userdb=FakeUserDB({ALICE: password}))
    assert s.send(exact(SASL_LIMIT, b"AUTH PLAIN ", fill=b"!")) == [SMTP_CANNOT_DECODE]
    assert s.send(exact(SASL_LIMIT + 1, b"AUTH PLAIN ", fill=b"!")) == [SMTP_TOO_LONG]
    assert s.cmd("NOOP") == [SMTP_OK]
    longest = b"AUTH PLAIN " + plain_token(ALICE, password) + CRLF
    assert len(longest) == 12285
    assert s.send(longest) == [SMTP_AUTH_OK]


def test_smtp_auth_line_one_over_with_a_valid_response_logs_nobody_in():
    password = password_for_token(ALICE, 12276)
    s = smtp_auth_session(userdb=FakeUserDB({ALICE: password}))
    line = b"AUTH PLAIN " + plain_token(ALICE, password) + CRLF
    assert len(line) == SASL_LIMIT + 1
    assert s.send(line) == [SMTP_TOO_LONG]
    assert s.checker.attempts == []
    assert s.cmd("MAIL FROM:<alice@example.test>") == ["530 5.7.0 Authentication required"]


@pytest.mark.parametrize("smtp", [None, {"max_command_line": 20000}], ids=["default", "configured-20000"])
def test_smtp_sasl_response_at_the_limit_is_taken(smtp):
    # The response line alone (no "AUTH PLAIN " in front) may have 12288 octets with
    # its CRLF: 12286 non-base64 octets reach the decoder; the longest valid response
    # is 12284 octets.
    password = password_for_token(ALICE, 12284)
    s = smtp_auth_session(smtp=smtp, userdb=FakeUserDB({ALICE: password}))
    assert s.cmd("AUTH PLAIN") == ["334 "]
    assert s.send(exact(SASL_LIMIT, b"", fill=b"!")) == [SMTP_CANNOT_DECODE]
    assert s.cmd("NOOP") == [SMTP_OK]
    assert s.cmd("AUTH PLAIN") == ["334 "]
    assert s.send(plain_token(ALICE, password) + CRLF) == [SMTP_AUTH_OK]


# Was a defect: MailgwSMTP._sasl_response did not check the length of a complete SASL
# response line; only a line still without CRLF was bounded (line_limit()), so a
# response of 12287 octets + CRLF (or of any length, if its CRLF came in the same
# read: 80 KB logged in) was decoded and could log in. RFC 4954 §4: 12288 octets, as
# POP3 and IMAP enforce.
@pytest.mark.parametrize("valid", [False, True], ids=["12289-not-base64", "12290-valid-login"])
def test_smtp_sasl_response_one_over_is_refused(valid):
    password = password_for_token(ALICE, 12288)
    s = smtp_auth_session(userdb=FakeUserDB({ALICE: password}))
    assert s.cmd("AUTH PLAIN") == ["334 "]
    line = plain_token(ALICE, password) + CRLF if valid else exact(SASL_LIMIT + 1, b"", fill=b"!")
    assert len(line) > SASL_LIMIT
    assert s.send(line) == [SMTP_TOO_LONG]
    assert s.cmd("NOOP") == [SMTP_OK]


@pytest.mark.parametrize("smtp, limit", [pytest.param(None, 12288, id="default"),
                                         pytest.param({"max_command_line": 600}, 12288, id="configured-600"),
                                         pytest.param({"max_command_line": 20000}, 20658,
                                                      id="configured-20000")])
def test_smtp_line_without_crlf_is_answered_once_then_dropped(smtp, limit):
    # With no CRLF in sight, input is held up to the longest line any command may have:
    # 12288 (an AUTH line), or max_command_line + MAIL's allowance when that is more.
    s = smtp_greeted(smtp=smtp)
    assert s.send(b"NOOP " + b"x" * (limit - 5)) == []            # `limit` octets held
    assert s.send(b"x") == [SMTP_TOO_LONG]                        # one more: answered once
    assert s.send(b"x" * 70000 + b" QUIT") == []                  # the rest is dropped...
    assert s.send(b"more QUIT\r\nNOOP\r\n") == [SMTP_OK]          # ...to its CRLF, never run
    assert not s.closed
    smtp_goes_on(s, 1)


@pytest.mark.parametrize("smtp", [None, {"max_command_line": 20000}], ids=["default", "configured-20000"])
def test_smtp_sasl_response_without_crlf_is_bounded_by_12288(smtp):
    # In the SASL exchange the bound is 12288, even where commands may be longer.
    s = smtp_auth_session(smtp=smtp)
    assert s.cmd("AUTH PLAIN") == ["334 "]
    assert s.send(b"A" * SASL_LIMIT) == []
    assert s.send(b"A") == [SMTP_TOO_LONG]
    assert s.send(b"A" * 70000) == []
    assert s.send(b"A\r\n") == []
    assert not s.closed


# Was a defect: after "500 5.5.2 Line too long" for a SASL response without CRLF the
# server stayed in the SASL exchange: the 500 told the client the AUTH command was
# over (RFC 4954 §4: a 5xx reply ends it), but the client's next command was decoded
# as a SASL response (NOOP -> "501 5.5.2 Malformed PLAIN response"; QUIT did not quit).
# MailgwSMTP.line_too_long() now leaves the SASL mode, as POP3 and IMAP do.
def test_smtp_session_goes_on_after_an_overlong_sasl_response_without_crlf():
    s = smtp_auth_session()
    assert s.cmd("AUTH PLAIN") == ["334 "]
    assert s.send(b"A" * (SASL_LIMIT + 1)) == [SMTP_TOO_LONG]
    assert s.send(b"\r\n") == []
    assert s.cmd("NOOP") == [SMTP_OK]


TEXT_LINE_CONFIGS = [pytest.param(None, 1000, id="default-1000"),
                     pytest.param({"max_text_line": 1200}, 1200, id="configured-1200"),
                     pytest.param({"max_text_line": 5000}, 5000, id="configured-5000")]


def _body_with(line: bytes, where: str, limit: int) -> bytes:
    """A message body (before the terminator) with `line` (CRLF included) at `where`."""
    if where == "first":           # the first line of the data, right after the 354
        return line + b"Subject: after\r\n\r\nbody\r\n"
    if where == "middle":
        return b"Subject: boundary\r\n\r\nbefore\r\n" + line + b"after\r\n"
    if where == "last":            # the line just before CRLF "." CRLF
        return b"Subject: boundary\r\n\r\nbefore\r\n" + line
    if where == "among-full-lines":  # many lines exactly at the limit around it
        full = b"y" * (limit - 2) + CRLF
        return b"Subject: boundary\r\n\r\n" + full * 13 + line + full * 7
    raise AssertionError(where)


POSITIONS = ["first", "middle", "last", "among-full-lines"]


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("smtp, limit", TEXT_LINE_CONFIGS)
def test_smtp_text_line_at_the_limit_is_taken(smtp, limit, where):
    # RFC 5321 §4.5.3.1.6: 1000 octets INCLUDING the CRLF: 998 octets of text.
    s = smtp_in_data(smtp=smtp)
    line = b"x" * (limit - 2) + CRLF
    body = _body_with(line, where, limit)
    assert s.send(body + b".\r\n") == [smtp_queued(1)]
    [(mailboxes, stored)] = s.store.delivered
    assert mailboxes == ["alice@example.test"]
    assert stored.endswith(CRLF + body) and (CRLF + line) in stored
    assert s.cmd("NOOP") == [SMTP_OK]


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("smtp, limit", TEXT_LINE_CONFIGS)
def test_smtp_text_line_one_over_is_refused(smtp, limit, where):
    s = smtp_in_data(smtp=smtp)
    body = _body_with(b"x" * (limit - 1) + CRLF, where, limit)
    assert s.send(body + b".\r\n") == [smtp_text_too_long(limit)]
    assert s.store.delivered == [] and s.spool.queued == []
    smtp_goes_on(s, 2)


@pytest.mark.parametrize("smtp, limit", TEXT_LINE_CONFIGS)
def test_smtp_text_line_limit_with_bare_lf_taken_as_crlf(smtp, limit):
    # A trusted client's bare LF counts as CRLF ([smtp] bare_newline = "normalize-trusted",
    # the default): the line is measured as if it had been sent with CRLF.
    # (Only CRLF "." CRLF ends the data, so the last line before it has a CRLF.)
    s = smtp_in_data(smtp=smtp, client=RELAY_CLIENT)
    assert s.send(b"Subject: lf\n\n" + b"x" * (limit - 2) + b"\nend\r\n.\r\n") == [smtp_queued(1)]
    [(_, stored)] = s.store.delivered
    assert stored.endswith(b"\r\n\r\n" + b"x" * (limit - 2) + b"\r\nend\r\n")
    assert s.cmd("MAIL FROM:<x@elsewhere.test>") == [SMTP_SENDER_OK]
    assert s.cmd("RCPT TO:<alice@example.test>") == [SMTP_RECIPIENT_OK]
    assert s.cmd("DATA") == [SMTP_START_DATA]
    assert s.send(b"Subject: lf\n\n" + b"x" * (limit - 1) + b"\nend\r\n.\r\n") == \
        [smtp_text_too_long(limit)]
    assert len(s.store.delivered) == 1
    smtp_goes_on(s, 3)


# Dot-stuffing (RFC 5321 §4.5.2): the client doubles a leading "."; we remove one.
# RFC 5321 §4.5.3.1.6: "The maximum total length of a text line including the <CRLF>
# is 1000 octets (not counting the leading dot duplicated for transparency)", so the
# limit applies to the line as it is after unstuffing (the message's own line), and
# a stuffed line may take one octet more on the wire.
@pytest.mark.parametrize("smtp, limit", TEXT_LINE_CONFIGS)
def test_smtp_stuffed_line_below_the_limit_is_taken_and_unstuffed(smtp, limit):
    s = smtp_in_data(smtp=smtp)
    wire = b".." + b"x" * (limit - 4) + CRLF            # limit - 2 octets on the wire
    assert s.send(b"Subject: dots\r\n\r\n" + wire + b".\r\n") == [smtp_queued(1)]
    [(_, stored)] = s.store.delivered
    assert stored.endswith(b"\r\n\r\n." + b"x" * (limit - 4) + CRLF)


@pytest.mark.parametrize("smtp, limit", TEXT_LINE_CONFIGS)
def test_smtp_stuffed_line_over_the_limit_even_unstuffed_is_refused(smtp, limit):
    s = smtp_in_data(smtp=smtp)
    wire = b".." + b"x" * (limit - 2) + CRLF            # limit - 1 octets + CRLF once unstuffed
    assert s.send(b"Subject: dots\r\n\r\n" + wire + b".\r\n") == [smtp_text_too_long(limit)]
    assert s.store.delivered == []
    smtp_goes_on(s, 2)


# Was a defect: MailgwSMTP._message_received measured the lines (`has_long_line(lf,
# limit - 2)`) BEFORE removing the transparency dots, so that dot was counted: a
# 998-octet line of the message starting with "." (999 octets + CRLF on the wire)
# was refused with 554 5.6.0, though RFC 5321 §4.5.3.1.6 does not count that dot.
@pytest.mark.parametrize("smtp, limit", TEXT_LINE_CONFIGS)
def test_smtp_stuffed_line_at_the_limit_once_unstuffed_is_taken(smtp, limit):
    s = smtp_in_data(smtp=smtp)
    wire = b".." + b"x" * (limit - 3) + CRLF            # limit - 1 + CRLF on the wire, limit - 2 unstuffed
    assert s.send(b"Subject: dots\r\n\r\n" + wire + b".\r\n") == [smtp_queued(1)]
    [(_, stored)] = s.store.delivered
    assert stored.endswith(b"\r\n\r\n." + b"x" * (limit - 3) + CRLF)


def test_smtp_received_header_is_not_counted_against_the_first_line():
    # Our Received: header goes in front of the client's first line, but on its own
    # lines: a first line of 998 octets stays 998 octets long, however long the
    # header is (the longest EHLO name the 512-octet command line allows).
    helo = "h" * (512 - len("EHLO ") - 2)
    s = smtp_session()
    assert s.ehlo(helo)[-1] == "250 HELP"
    assert s.cmd("MAIL FROM:<x@elsewhere.test>") == [SMTP_SENDER_OK]
    assert s.cmd("RCPT TO:<alice@example.test>") == [SMTP_RECIPIENT_OK]
    assert s.cmd("DATA") == [SMTP_START_DATA]
    first = b"X-First: " + b"x" * (998 - 9) + CRLF
    assert s.send(first + b"\r\nbody\r\n.\r\n") == [smtp_queued(1)]
    [(_, stored)] = s.store.delivered
    assert stored.startswith(b"Received: from " + helo.encode() + b" ")
    header, _, message = stored.partition(CRLF + first)
    assert message == b"\r\nbody\r\n"
    assert header.startswith(b"Received: ") and b"\n" + first not in header
    assert all(len(line) <= 998 for line in stored.split(CRLF))


# == POP3 =====================================================================================
# RFC 2449 §4: a command line is 255 octets with its CRLF ([pop3] max_command_line);
# RFC 5034 §4: AUTH lines and SASL responses have their own bound, 12288.

POP3_TOO_LONG = "-ERR Line too long"
POP3_SEND_PASS = "+OK Send PASS"
POP3_LOGGED_IN = "+OK maildrop has 0 messages (0 octets)"


def pop3_session(pop3=None) -> POP3Session:
    s = POP3Session(plaintext=True, pop3=pop3)
    assert s.read() == ["+OK mail.example.test POP3 server ready"]
    return s


POP3_CONFIGS = [pytest.param(None, 255, id="default-255"),
                pytest.param({"max_command_line": 300}, 300, id="configured-300"),
                pytest.param({"max_command_line": 1000}, 1000, id="configured-1000")]


@pytest.mark.parametrize("pop3, limit", POP3_CONFIGS)
def test_pop3_user_line_at_the_limit_is_taken_one_over_refused(pop3, limit):
    s = pop3_session(pop3)
    assert s.send(exact(limit + 1, b"USER ", fill=b"u")) == [POP3_TOO_LONG]
    assert s.cmd("PASS secret") == ["-ERR Send USER first"]       # the refused USER never ran
    assert s.send(exact(limit, b"USER ", fill=b"u")) == [POP3_SEND_PASS]
    assert not s.closed


@pytest.mark.parametrize("pop3, limit", POP3_CONFIGS)
def test_pop3_pass_line_at_the_limit_logs_in(pop3, limit):
    # RFC 1939 §7: the password is the rest of the line; this one fills it to the octet.
    password = "p" * (limit - len("PASS ") - 2)
    s = pop3_session(pop3)
    s.world.userdb.users[ALICE] = password
    assert s.cmd(f"USER {ALICE}") == [POP3_SEND_PASS]
    assert s.send(exact(limit + 1, b"PASS ", fill=b"p")) == [POP3_TOO_LONG]
    assert s.world.checker.attempts == []
    assert s.cmd(f"USER {ALICE}") == [POP3_SEND_PASS]
    assert s.send(exact(limit, b"PASS ", fill=b"p")) == [POP3_LOGGED_IN]
    # In the TRANSACTION state the same limit holds.
    assert s.send(exact(limit + 1, b"NOOP ", fill=b" ")) == [POP3_TOO_LONG]
    assert s.cmd("STAT") == ["+OK 0 0"]


@pytest.mark.parametrize("pop3", [None, {"max_command_line": 300}], ids=["default", "configured-300"])
def test_pop3_auth_line_may_have_12288_octets(pop3):
    # 12288 octets exactly: not base64, so refused by the decoder, not for its length.
    password = password_for_token(ALICE, 12272)
    s = pop3_session(pop3)
    s.world.userdb.users[ALICE] = password
    assert s.send(exact(SASL_LIMIT, b"AUTH PLAIN ", fill=b"!")) == ["-ERR Invalid base64 data"]
    assert s.send(exact(SASL_LIMIT + 1, b"AUTH PLAIN ", fill=b"!")) == [POP3_TOO_LONG]
    assert s.cmd("PASS x") == ["-ERR Send USER first"]
    longest = b"AUTH PLAIN " + plain_token(ALICE, password) + CRLF     # 12285: the longest valid one
    assert len(longest) == 12285
    assert s.send(longest) == [POP3_LOGGED_IN]


@pytest.mark.parametrize("pop3", [None, {"max_command_line": 300}], ids=["default", "configured-300"])
def test_pop3_sasl_response_at_the_limit_is_taken_one_over_refused(pop3):
    password = password_for_token(ALICE, 12284)
    s = pop3_session(pop3)
    s.world.userdb.users[ALICE] = password
    assert s.cmd("AUTH PLAIN") == ["+ "]
    assert s.send(exact(SASL_LIMIT, b"", fill=b"!")) == ["-ERR Invalid base64 data"]
    assert s.cmd("AUTH PLAIN") == ["+ "]
    assert s.send(exact(SASL_LIMIT + 1, b"", fill=b"A")) == [POP3_TOO_LONG]
    # The exchange is over: the next line is a command again.
    assert s.cmd(f"USER {ALICE}") == [POP3_SEND_PASS]
    assert s.cmd("AUTH PLAIN") == ["+ "]
    assert s.send(plain_token(ALICE, password) + CRLF) == [POP3_LOGGED_IN]


@pytest.mark.parametrize("pop3", [None, {"max_command_line": 300}], ids=["default", "configured-300"])
@pytest.mark.parametrize("in_sasl", [False, True], ids=["command", "sasl-response"])
def test_pop3_line_without_line_end_is_answered_once_then_dropped(pop3, in_sasl):
    # Without a line end, input is held up to 12288 octets (the longest AUTH line).
    s = pop3_session(pop3)
    if in_sasl:
        assert s.cmd("AUTH PLAIN") == ["+ "]
    assert s.send(b"A" * SASL_LIMIT) == []
    assert s.send(b"A") == [POP3_TOO_LONG]
    assert s.send(b"A" * 70000 + b" QUIT") == []
    assert s.send(b"QUIT\r\n") == []                       # the tail of the long line: dropped
    assert not s.closed
    assert s.cmd(f"USER {ALICE}") == [POP3_SEND_PASS]
    assert s.cmd("PASS secret") == [POP3_LOGGED_IN]


# == IMAP =====================================================================================
# [imap] max_command_line: 65536 octets with the CRLF (min 1024), for each line of a
# command outside its literals; SASL lines max(12288, max_command_line); literals
# max_literal (65536, min 1024); APPEND max_append (0 = smtp.max_message_size, the
# APPENDLIMIT of RFC 7889).

IMAP_LINE_TOO_LONG = "BAD Command line too long"


def imap_selected(**options) -> IMAPSession:
    s = IMAPSession(store=filled(count=3), **options)
    s.login()
    s.select()
    return s


IMAP_LINE_CONFIGS = [pytest.param(None, 65536, id="default-65536"),
                     pytest.param({"max_command_line": 1024}, 1024, id="configured-1024"),
                     pytest.param({"max_command_line": 3000}, 3000, id="configured-3000")]


def search_text_line(tag: bytes, total: int) -> bytes:
    return exact(total, tag + b' SEARCH TEXT "', b'"')


@pytest.mark.parametrize("imap, limit", IMAP_LINE_CONFIGS)
def test_imap_command_line_at_the_limit_is_taken_one_over_refused(imap, limit):
    s = imap_selected(imap=imap)
    assert s.send(search_text_line(b"a3", limit)) == ["* SEARCH", "a3 OK SEARCH completed"]
    assert s.send(search_text_line(b"a4", limit + 1)) == [f"a4 {IMAP_LINE_TOO_LONG}"]
    assert s.cmd("a5 NOOP") == ["a5 OK NOOP completed"]
    assert not s.closed


@pytest.mark.parametrize("imap, limit", IMAP_LINE_CONFIGS)
def test_imap_login_line_at_the_limit_logs_in(imap, limit):
    head = b'a1 LOGIN "alice@example.test" "'
    password = "p" * (limit - len(head) - 3)
    s = IMAPSession(imap=imap, userdb=FakeUserDB({ALICE: password}))
    assert s.send(exact(limit + 1, head, b'"', fill=b"p")) == [f"a1 {IMAP_LINE_TOO_LONG}"]
    assert s.checker.attempts == []
    lines = s.send(exact(limit, head, b'"', fill=b"p"))
    assert len(lines) == 1 and lines[0].startswith("a1 OK [CAPABILITY IMAP4rev1 ") \
        and lines[0].endswith("] Logged in")
    assert s.cmd("a2 NOOP") == ["a2 OK NOOP completed"]


@pytest.mark.parametrize("imap, limit", IMAP_LINE_CONFIGS)
@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_imap_line_without_crlf_is_answered_once_then_dropped(imap, limit, tagged):
    s = imap_selected(imap=imap)
    head = b'a5 SEARCH TEXT "' if tagged else b"X"
    assert s.send(head + b"x" * (limit - len(head))) == []          # `limit` octets held
    reply = f"a5 {IMAP_LINE_TOO_LONG}" if tagged else "* BAD Line too long"
    assert s.send(b"x") == [reply]
    assert s.send(b"x" * 70000 + b" a9 LOGOUT") == []
    assert s.send(b'a9 LOGOUT"\r\na6 NOOP\r\n') == ["a6 OK NOOP completed"]
    assert not s.closed


@pytest.mark.parametrize("imap, limit", [pytest.param(None, 65536, id="default-65536"),
                                         pytest.param({"max_command_line": 1024}, 12288, id="configured-1024"),
                                         pytest.param({"max_command_line": 20000}, 20000,
                                                      id="configured-20000")])
def test_imap_sasl_response_at_the_limit_is_taken_one_over_refused(imap, limit):
    # The response line to "+ " may have max(12288, max_command_line) octets.
    token_length = (limit - 2) // 4 * 4
    password = password_for_token(ALICE, token_length)
    s = IMAPSession(imap=imap, userdb=FakeUserDB({ALICE: password}))
    assert s.cmd("a1 AUTHENTICATE PLAIN") == ["+ "]
    assert s.send(exact(limit, b"", fill=b"!")) == ["a1 BAD Invalid base64"]
    assert s.cmd("a2 AUTHENTICATE PLAIN") == ["+ "]
    assert s.send(exact(limit + 1, b"", fill=b"A")) == [f"a2 {IMAP_LINE_TOO_LONG}"]
    # The exchange is over: the next line is a command again, and nobody is logged in.
    assert s.cmd("a3 NOOP") == ["a3 OK NOOP completed"]
    assert s.cmd("a4 SELECT INBOX") == ["a4 BAD SELECT is not valid in the not authenticated state"]
    assert s.cmd("a5 AUTHENTICATE PLAIN") == ["+ "]
    lines = s.send(plain_token(ALICE, password) + CRLF)
    assert len(lines) == 1 and lines[0].startswith("a5 OK [CAPABILITY ") and lines[0].endswith("] Logged in")


@pytest.mark.parametrize("imap, limit", [pytest.param({"max_command_line": 1024}, 12288, id="configured-1024"),
                                         pytest.param({"max_command_line": 20000}, 20000,
                                                      id="configured-20000")])
def test_imap_sasl_response_without_crlf_is_answered_once_then_dropped(imap, limit):
    s = IMAPSession(imap=imap)
    assert s.cmd("a1 AUTHENTICATE PLAIN") == ["+ "]
    assert s.send(b"A" * limit) == []
    assert s.send(b"A") == [f"a1 {IMAP_LINE_TOO_LONG}"]
    assert s.send(b"A" * 70000) == []
    assert s.send(b"AAA\r\na2 NOOP\r\n") == ["a2 OK NOOP completed"]
    assert s.cmd("a3 SELECT INBOX") == ["a3 BAD SELECT is not valid in the not authenticated state"]


@pytest.mark.parametrize("imap, limit", IMAP_LINE_CONFIGS)
def test_imap_sasl_initial_response_is_bounded_by_the_command_line(imap, limit):
    # SASL-IR (RFC 4959): the initial response is part of the AUTHENTICATE command
    # line, so max_command_line bounds it (not the 12288 of a separate response line).
    s = IMAPSession(imap=imap)
    head = b"a1 AUTHENTICATE PLAIN "
    assert s.send(exact(limit, head, fill=b"!")) == ["a1 BAD Invalid base64"]
    assert s.send(exact(limit + 1, head, fill=b"!")) == [f"a1 {IMAP_LINE_TOO_LONG}"]
    assert s.cmd("a2 NOOP") == ["a2 OK NOOP completed"]


@pytest.mark.parametrize("imap, limit", IMAP_LINE_CONFIGS)
def test_imap_line_over_the_limit_during_idle(imap, limit):
    s = imap_selected(imap=imap)
    assert s.cmd("a4 IDLE") == ["+ idling"]
    # At the limit the line is read as an IDLE line (not DONE: an error, IDLE goes on).
    assert s.send(exact(limit, b"", fill=b"D")) == ["* BAD Expected DONE"]
    # One over: refused for its length, IDLE goes on.
    assert s.send(exact(limit + 1, b"", fill=b"D")) == ["* BAD Line too long"]
    # Without CRLF: the same, once, and the rest of the line is dropped (even a DONE in it).
    assert s.send(b"D" * limit) == []
    assert s.send(b"D") == ["* BAD Line too long"]
    assert s.send(b"D" * 1000 + b" DONE") == []
    assert s.send(b"DONE\r\n") == []
    assert s.cmd("DONE") == ["a4 OK IDLE terminated"]
    assert s.cmd("a5 NOOP") == ["a5 OK NOOP completed"]


LITERAL_CONFIGS = [pytest.param(None, 65536, id="default-65536"),
                   pytest.param({"max_literal": 1024}, 1024, id="configured-1024"),
                   pytest.param({"max_literal": 2000}, 2000, id="configured-2000")]


@pytest.mark.parametrize("imap, limit", LITERAL_CONFIGS)
def test_imap_literal_at_the_limit_is_taken_one_over_refused(imap, limit):
    s = imap_selected(imap=imap)
    # One over, synchronizing: no "+", so the client never sends it.
    assert s.cmd("a3 SEARCH TEXT {%d}" % (limit + 1)) == [f"a3 BAD Literal larger than {limit} octets"]
    assert s.cmd("a4 NOOP") == ["a4 OK NOOP completed"]
    assert s.cmd("a5 SEARCH TEXT {%d}" % limit) == ["+ Ready for literal data"]
    assert s.send(b"z" * limit + CRLF) == ["* SEARCH", "a5 OK SEARCH completed"]


@pytest.mark.parametrize("imap, limit", LITERAL_CONFIGS)
def test_imap_non_synchronizing_literal_at_the_limit_is_taken_one_over_skipped(imap, limit):
    s = imap_selected(imap=imap)
    evil = b"x1 DELETE Trash\r\n"
    over = (evil * (limit // len(evil) + 1))[:limit + 1]
    assert s.send(b"a3 SEARCH TEXT {%d+}\r\n%s\r\na4 NOOP\r\n" % (limit + 1, over)) == \
        [f"a3 BAD Literal larger than {limit} octets", "a4 OK NOOP completed"]
    # The skipped bytes never ran: Trash is still there.
    assert s.cmd("a6 STATUS Trash (MESSAGES)") == ["* STATUS Trash (MESSAGES 0)", "a6 OK STATUS completed"]
    assert s.send(b"a5 SEARCH TEXT {%d+}\r\n%s\r\n" % (limit, b"z" * limit)) == \
        ["* SEARCH", "a5 OK SEARCH completed"]


def test_imap_literals_of_one_command_are_bounded_together():
    # All literal-announcing lines and literals of one command (outside APPEND) may
    # have max_literal + max_command_line octets: 1024 + 1024 here. The first line
    # and literal take 21 + 2 + 1000 = 1023; the second line " TEXT {N}" 12 + 2,
    # so N = 1011 fills the bound exactly and 1012 is over.
    for n, replies in ((1012, ["a3 BAD Command too large"]), (1011, ["+ Ready for literal data"])):
        s = imap_selected(imap={"max_literal": 1024, "max_command_line": 1024})
        first = b"a3 SEARCH TEXT {1000}"
        assert len(first) == 21
        assert s.send(first + CRLF) == ["+ Ready for literal data"]
        second = b" TEXT {%d}" % n
        assert len(second) == 12
        assert s.send(b"y" * 1000 + second + CRLF) == replies
        if n == 1011:
            assert s.send(b"z" * n + CRLF) == ["* SEARCH", "a3 OK SEARCH completed"]
        assert s.cmd("a4 NOOP") == ["a4 OK NOOP completed"]


def _appendlimit(s: IMAPSession) -> str:
    [capability, done] = s.cmd("a9 CAPABILITY")
    assert done == "a9 OK CAPABILITY completed"
    return [word for word in capability.split() if word.startswith("APPENDLIMIT=")][0]


APPEND_CONFIGS = [pytest.param({"smtp": {"max_message_size": 4096}}, 4096, id="from-smtp-max_message_size"),
                  pytest.param({"imap": {"max_append": 5000}}, 5000, id="configured-5000"),
                  pytest.param({"imap": {"max_append": 1024}}, 1024, id="configured-1024")]


@pytest.mark.parametrize("options, limit", APPEND_CONFIGS)
def test_imap_append_at_the_limit_is_stored_one_over_refused(options, limit):
    s = IMAPSession(**options)
    s.login()
    assert _appendlimit(s) == f"APPENDLIMIT={limit}"
    # One over: NO [TOOBIG] and no "+" (RFC 7889 §4), so the message is never sent.
    assert s.cmd("a3 APPEND INBOX {%d}" % (limit + 1)) == \
        [f"a3 NO [TOOBIG] Message larger than APPENDLIMIT={limit}"]
    assert s.cmd("a4 NOOP") == ["a4 OK NOOP completed"]
    inbox = s.folder("INBOX")
    message = exact(limit, b"Subject: big\r\n\r\n", fill=b"m")
    assert s.cmd("a5 APPEND INBOX {%d}" % limit) == ["+ Ready for literal data"]
    assert s.send(message + CRLF) == [f"a5 OK [APPENDUID {inbox.uidvalidity} 1] APPEND completed"]
    assert [info.size for info in inbox.messages()] == [limit]


@pytest.mark.parametrize("options, limit", APPEND_CONFIGS)
def test_imap_non_synchronizing_append_one_over_is_skipped(options, limit):
    s = IMAPSession(**options)
    s.login()
    over = exact(limit + 1, b"Subject: big\r\n\r\n", fill=b"m")
    assert s.send(b"a3 APPEND INBOX {%d+}\r\n%s\r\na4 NOOP\r\n" % (limit + 1, over)) == \
        [f"a3 NO [TOOBIG] Message larger than APPENDLIMIT={limit}", "a4 OK NOOP completed"]
    assert s.folder("INBOX").messages() == []
    message = over[:limit]
    assert s.send(b"a5 APPEND INBOX {%d+}\r\n%s\r\n" % (limit, message)) == \
        [f"a5 OK [APPENDUID {s.folder('INBOX').uidvalidity} 1] APPEND completed"]


def test_imap_default_appendlimit_is_smtp_max_message_size():
    # The default: max_append = 0 = smtp.max_message_size (35 MiB); exactly that much
    # is stored, one octet more is refused before it is sent.
    limit = 35 * 1024 * 1024
    s = IMAPSession()
    s.login()
    assert _appendlimit(s) == f"APPENDLIMIT={limit}"
    assert s.cmd("a3 APPEND INBOX {%d}" % (limit + 1)) == \
        [f"a3 NO [TOOBIG] Message larger than APPENDLIMIT={limit}"]
    assert s.cmd("a4 APPEND INBOX {%d}" % limit) == ["+ Ready for literal data"]
    assert s.send(b"m" * limit + CRLF) == [f"a4 OK [APPENDUID {s.folder('INBOX').uidvalidity} 1] APPEND completed"]
    assert s.cmd("a5 NOOP") == ["a5 OK NOOP completed"]
