"""SMTP fuzzing: any bytes in any state get well-formed replies, nothing
escapes (no exception out of dataReceived, none caught and logged either),
and the session is still usable afterwards (NOOP answers 250).

CI runs a bounded, derandomized number of examples; a long campaign is
MAILGW_FUZZ_EXAMPLES=20000 python3 -m pytest tests/unit/test_smtp_fuzz.py
(docs/fuzzing.md).
"""
from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, strategies as st

from fuzzing import fuzz_settings, no_logged_failures
from smtp_harness import Session

# RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP textstring ] CRLF.
# The text is checked to be one line of UTF-8 without NUL (HELO/EHLO and SMTPUTF8 replies may echo UTF-8).
_REPLY_LINE = re.compile(rb"([2-5][0-5]\d)(?:([ -])([^\x00\r\n]*))?")
PLAIN_ALICE = base64.b64encode(b"\0alice@example.test\0secret").decode()

_EHLO = ["EHLO fuzz.test"]
_MAIL = _EHLO + ["MAIL FROM:<a@x.test>"]
_RCPT = _MAIL + ["RCPT TO:<alice@example.test>"]
# state -> (Session keyword arguments, lines that put the session into the state, the last reply expected)
STATES = {
    "fresh": (dict(), [], None),
    "helo": (dict(), ["HELO fuzz.test"], "250 "),
    "ehlo": (dict(), _EHLO, "250 "),
    "mail": (dict(), _MAIL, "250 "),
    "rcpt": (dict(), _RCPT, "250 "),
    "data": (dict(), _RCPT + ["DATA"], "354 "),
    "after-message": (dict(), _RCPT + ["DATA", "Subject: x\r\n\r\nbody\r\n."], "250 "),
    "starttls-refused": (dict(starttls=False), _EHLO + ["STARTTLS"], "454 "),
    "after-starttls": (dict(), _EHLO + ["STARTTLS", "EHLO fuzz.test"], "250 "),
    "submission-cleartext": (dict(role="submission"), _EHLO + [f"AUTH PLAIN {PLAIN_ALICE}"], "538 "),
    "auth-login": (dict(role="submissions", tls=True, starttls=False), _EHLO + ["AUTH LOGIN"], "334 "),
    "auth-login-password": (dict(role="submissions", tls=True, starttls=False),
                            _EHLO + ["AUTH LOGIN", base64.b64encode(b"alice@example.test").decode()], "334 "),
    "auth-plain": (dict(role="submissions", tls=True, starttls=False), _EHLO + ["AUTH PLAIN"], "334 "),
    "authenticated": (dict(role="submissions", tls=True, starttls=False),
                      _EHLO + [f"AUTH PLAIN {PLAIN_ALICE}"], "235 "),
    "authenticated-mail": (dict(role="submissions", tls=True, starttls=False),
                           _EHLO + [f"AUTH PLAIN {PLAIN_ALICE}", "MAIL FROM:<alice@example.test>",
                                    "RCPT TO:<bob@example.test>"], "250 "),
}
LIMITS = {"max_errors": 100000, "max_commands_before_mail": 100000}

VERBS = st.sampled_from([b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT",
                         b"VRFY", b"EXPN", b"HELP", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS", b"BDAT",
                         b"mail from:", b"rcpt to:", b"ehlo", b".", b"..", b"*", b"="])
ARGS = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=40).map(lambda text: text.encode("utf-8")),
    # one printable word, ASCII or not: a HELO/EHLO name, a SASL response, a parameter
    st.text(alphabet=st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=20)
    .map(lambda text: text.encode("utf-8")),
    st.sampled_from([b"<a@x.test>", b"<>", b"<alice@example.test>", b"<postmaster>", b"<@a,@b:c@d.test>",
                     b'<"a b"@x.test>', b"<\xc3\xa9@x.test> SMTPUTF8", b"<a@x.test> SIZE=99999999999",
                     b"<a@x.test> BODY=8BITMIME RET=HDRS ENVID=a+2Bb", b"<a@x.test> NOTIFY=NEVER ORCPT=rfc822;a@b",
                     PLAIN_ALICE.encode(), b"=", b"*", b"x" * 600, b"\x00", b"\r", b"\n", b"\xff"]),
)
LINES = st.builds(lambda verb, rest: verb + b" " + rest, VERBS, ARGS) | st.binary(max_size=600)


def _session(state: str) -> Session:
    kwargs, setup, expected = STATES[state]
    s = Session(smtp=LIMITS, **kwargs)
    s.read()
    for line in setup:
        replies = s.cmd(line)
    if expected is not None:
        assert replies and replies[-1].startswith(expected), (state, replies)
    return s


def take_replies(s: Session) -> list[bytes]:
    """What the server wrote since the last call, checked line by line:
    complete lines, each a reply line, multi-line replies with one code."""
    data = s.transport.value()
    s.transport.clear()
    if not data:
        return []
    assert data.endswith(b"\r\n"), f"incomplete reply {data[-80:]!r}"
    lines = data[:-2].split(b"\r\n")
    continuing = None
    for line in lines:
        match = _REPLY_LINE.fullmatch(line)
        assert match, f"malformed reply line {line[:120]!r}"
        assert continuing is None or match.group(1) == continuing, f"code changed inside a reply: {lines!r}"
        continuing = match.group(1) if match.group(2) == b"-" else None
        line.decode("utf-8")                       # raises on invalid UTF-8
        assert b"Traceback" not in line
    assert continuing is None, f"multi-line reply not finished: {lines!r}"
    return lines


def assert_still_usable(s: Session) -> None:
    """End whatever was going on (DATA, a SASL exchange, a long line being
    skipped), then a NOOP must answer 250."""
    if s.closed:
        return                                     # QUIT, or a limit closed it with a 421: fine
    s.send(b"\r\n.\r\n*\r\n")
    take_replies(s)
    if s.closed:
        return
    s.server.dataReceived(b"NOOP\r\n")
    assert take_replies(s) == [b"250 2.0.0 Ok"]


@fuzz_settings(300)
@given(state=st.sampled_from(sorted(STATES)), lines=st.lists(LINES, min_size=1, max_size=8),
       separator=st.sampled_from([b"\r\n", b"\n", b"\r", b""]))
def test_any_input_in_any_state_gets_well_formed_replies(state, lines, separator):
    data = separator.join(lines) + b"\r\n"
    with no_logged_failures():
        s = _session(state)
        s.server.dataReceived(data)
        take_replies(s)
        assert_still_usable(s)


@fuzz_settings(150)
@given(state=st.sampled_from(sorted(STATES)), lines=st.lists(LINES, min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6))
def test_input_split_anywhere_gets_the_same_replies(state, lines, cuts):
    # TCP may cut the stream anywhere: the replies depend on the bytes only.
    # (STARTTLS discards what was pipelined behind it on purpose, so it is left out.)
    data = b"".join(line.replace(b"\n", b"") + b"\r\n" for line in lines if b"STARTTLS" not in line.upper())
    with no_logged_failures():
        whole = _session(state)
        whole.server.dataReceived(data)
        expected = whole.transport.value()
        pieces = _session(state)
        start = 0
        for cut in sorted({cut % (len(data) + 1) for cut in cuts}) + [len(data)]:
            pieces.server.dataReceived(data[start:cut])
            start = cut
        assert pieces.transport.value() == expected


@pytest.mark.parametrize("verb", ["EHLO", "HELO", "ehlo"])
@pytest.mark.parametrize("name", ["é", "\u00a1", "bücher.example", "例え.テスト"])
def test_a_non_ascii_helo_name_is_answered_not_crashed(verb, name):
    # Found by the fuzzer: "EHLO é" raised UnicodeEncodeError in _greet (451 and a
    # logged traceback) and "HELO é" echoed UTF-8 before SMTPUTF8 could be in use.
    with no_logged_failures():
        s = _session("fresh")
        s.server.dataReceived(f"{verb} {name}\r\n".encode())
        (reply,) = take_replies(s)
        assert reply.isascii() and not reply.startswith(b"451"), reply
        assert_still_usable(s)
