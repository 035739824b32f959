"""Fuzzing (bounded): any input in any state gets well-formed replies and no
unexpected exception; the message parsers never raise on any bytes.

The suite runs a fixed, derandomized set of examples; for a longer random
campaign: MAILGW_FUZZ_EXAMPLES=5000 python3 -m pytest tests/unit/test_imap_fuzz.py
"""
from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from imap_harness import MESSAGES, IMAPSession, filled
from mailgw.imap import message as mime
from mailgw.imap.parser import ParseError, Reader
from mailgw.imap.search import BadCharset
from mailgw.imap.search import parse as parse_search

COMMANDS = [
    "CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE", "SELECT", "EXAMINE", "CREATE",
    "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "NAMESPACE", "ENABLE",
    "IDLE", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
    "UID FETCH", "UID STORE", "UID SEARCH", "UID COPY", "UID MOVE", "UID EXPUNGE", "UID", "XYZZY",
]
TOKENS = [
    "1", "*", "1:*", "2:4", "1,3", "0", "4294967296", "(", ")", "()", "[", "]", "<0.5>", '"x"', '""', '"a\\"b"',
    "{3}", "{2+}", "{0}", "{-1}", "NIL", "INBOX", "Trash", "&-", "&Jjo-", "BODY[]", "BODY.PEEK[TEXT]<1.2>",
    "BODY[HEADER.FIELDS (From To)]", "BODY[1.2.MIME]", "BODY[3]", "FLAGS", "+FLAGS.SILENT", "-FLAGS",
    "\\Seen", "\\Deleted", "\\Recent", "$kw", "ALL", "FULL", "ENVELOPE", "BODYSTRUCTURE", "RFC822",
    "OR", "NOT", "HEADER", "SUBJECT", "BODY", "TEXT", "UID", "CHARSET", "UTF-8", "KOI8-R", "SINCE",
    "1-Jan-2024", '"5-Mar-2024 10:11:12 +0100"', "%", "*a%", "RETURN", "(SPECIAL-USE)", "(MESSAGES UNSEEN)",
    "PLAIN", "AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=", "=", "alice@example.test", "secret", "DONE",
]
token = st.one_of(st.sampled_from(TOKENS), st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                                   max_size=6))
command_line = st.builds(
    lambda tag, name, args: (tag + " " + name + (" " + " ".join(args) if args else "")).encode("utf-8"),
    st.sampled_from(["a1", "t", "x.y", "+", ""]), st.sampled_from(COMMANDS), st.lists(token, max_size=7))
raw_bytes = st.binary(max_size=64)
STATES = ["not authenticated", "authenticated", "selected", "idle", "examined"]

# RFC 3501 §9: tag = 1*<any ASTRING-CHAR except "+">
_RESPONSE_START = re.compile(rb"(\* |\+( |$)|[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+ (OK|NO|BAD)( |$))")
_LITERAL_END = re.compile(rb"\{(\d+)\}$")


def _session(state: str) -> IMAPSession:
    session = IMAPSession(store=filled(messages=list(MESSAGES), count=3), imap={"max_errors": 1000})
    if state != "not authenticated":
        session.login()
    if state in ("selected", "idle"):
        session.select()
    if state == "examined":
        session.run("EXAMINE INBOX")
    if state == "idle":
        session.cmd("i1 IDLE")
    return session


def assert_well_formed(data: bytes) -> None:
    """Every response starts like one and ends with CRLF; literals are skipped by their size."""
    position = 0
    at_start = True
    while position < len(data):
        end = data.find(b"\r\n", position)
        assert end >= 0, f"unterminated output {data[position:position + 80]!r}"
        line = data[position:end]
        if at_start:
            assert _RESPONSE_START.match(line), f"malformed response {line[:120]!r}"
        literal = _LITERAL_END.search(line)
        if literal:
            position = end + 2 + int(literal.group(1))
            at_start = False
            continue
        position = end + 2
        at_start = True


@pytest.fixture(scope="module")
def failures():
    events = []

    def observer(event):
        if event.get("log_failure") is not None:
            events.append(event)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


_EXAMPLES = int(os.environ.get("MAILGW_FUZZ_EXAMPLES", "0"))
_SETTINGS = settings(max_examples=_EXAMPLES or 150, deadline=None, derandomize=not _EXAMPLES, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_PARSER_SETTINGS = settings(max_examples=_EXAMPLES or 300, deadline=None, derandomize=not _EXAMPLES, database=None)


@_SETTINGS
@given(state=st.sampled_from(STATES), lines=st.lists(command_line, min_size=1, max_size=4))
def test_any_command_in_any_state_gets_well_formed_replies(failures, state, lines):
    session = _session(state)
    session.read_bytes()
    for line in lines:
        session.server.dataReceived(line + b"\r\n")
    data = session.read_bytes()
    assert_well_formed(data)
    assert b"[SERVERBUG]" not in data
    assert not failures, failures[0]["log_failure"].getTraceback()


@_SETTINGS
@given(state=st.sampled_from(STATES), chunks=st.lists(raw_bytes, min_size=1, max_size=5))
def test_any_bytes_in_any_state_get_well_formed_replies(failures, state, chunks):
    session = _session(state)
    session.read_bytes()
    for chunk in chunks:
        session.server.dataReceived(chunk)
    session.server.dataReceived(b"\r\n")
    data = session.read_bytes()
    assert_well_formed(data)
    assert b"[SERVERBUG]" not in data
    assert not failures, failures[0]["log_failure"].getTraceback()


@_SETTINGS
@given(state=st.sampled_from(["selected", "examined"]),
       line=st.builds(lambda name, args: (name + " " + " ".join(args)).encode(),
                      st.sampled_from(["FETCH", "UID FETCH", "SEARCH", "UID SEARCH", "STORE", "COPY", "MOVE"]),
                      st.lists(token, min_size=1, max_size=8)))
def test_selected_state_commands_with_random_arguments(failures, state, line):
    session = _session(state)
    session.read_bytes()
    session.server.dataReceived(b"t " + line + b"\r\n")
    data = session.read_bytes()
    assert_well_formed(data)
    assert b"[SERVERBUG]" not in data
    assert not failures, failures[0]["log_failure"].getTraceback()


_MIME_PIECES = [b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
                b"Content-Type: text/plain; charset=\"x\r\n", b"--b\r\n", b"--b--\r\n", b"\r\n", b"x: y\r\n",
                b"Subject: =?utf-8?q?a_b?=\r\n", b"From: \"a\" <b@c>, (c) d@e; g: h@i;\r\n", b"\r\n\r\n",
                b"To: <@a,@b:c@d>\r\n", b"Content-Disposition: attachment; filename*=x\r\n", b"body\r\n",
                b"Content-Type: multipart/digest; boundary=\"b\"\r\n", b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"]


@_PARSER_SETTINGS
@given(st.lists(st.one_of(st.sampled_from(_MIME_PIECES), st.binary(max_size=20)), max_size=30))
def test_message_parsers_never_raise(pieces):
    data = b"".join(pieces)
    root = mime.parse_mime(data)
    mime.body_structure(data, root, extended=True)
    mime.body_structure(data, root, extended=False)
    mime.envelope(root.header)
    mime.body_text(data, root)
    mime.sent_date(root.header)
    for path in ((), (1,), (1, 1), (2,), (3, 1)):
        for spec in ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS"):
            if spec == "MIME" and not path:
                continue
            mime.section_bytes(data, root, path, spec, frozenset({b"from"}))


@_PARSER_SETTINGS
@given(st.lists(token, min_size=1, max_size=12))
def test_search_parser_raises_only_parse_errors(tokens):
    reader = Reader([" ".join(tokens).encode()], max_depth=8)
    try:
        query = parse_search(reader)
    except (ParseError, BadCharset):
        return
    query.bind(3, 3)


def test_deeply_nested_mime_is_bounded():
    data = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n) for n in range(3000))
    root = mime.parse_mime(data)
    structure = mime.body_structure(data, root, extended=True)
    assert structure.count(b"(") < 200
