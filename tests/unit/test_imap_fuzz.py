"""IMAP fuzzing: any command or bytes in any state get well-formed responses,
nothing escapes (no exception out of dataReceived, none caught and logged
either, no [SERVERBUG]), and the session is still usable afterwards (NOOP
answers OK); the message and SEARCH parsers never raise on any bytes.

CI runs a bounded, derandomized number of examples; a long campaign is
MAILGW_FUZZ_EXAMPLES=20000 python3 -m pytest tests/unit/test_imap_fuzz.py
(docs/fuzzing.md).
"""
from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz_settings, no_logged_failures
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
                                                   max_size=6), st.text(max_size=6))
command_line = st.builds(
    lambda tag, name, args: (tag + " " + name + (" " + " ".join(args) if args else "")).encode("utf-8"),
    st.sampled_from(["a1", "t", "x.y", "+", ""]), st.sampled_from(COMMANDS), st.lists(token, max_size=7))
raw_bytes = st.binary(max_size=64) | st.sampled_from([b"\r\n", b"{5}\r\n", b"{3+}\r\n", b"DONE", b"*", b" "])
# RFC 3501 §3 states (plus the ones inside a command: IDLE, an AUTHENTICATE exchange, a literal).
STATES = ["not authenticated", "not authenticated cleartext", "authenticate in progress", "literal in progress",
          "authenticated", "selected", "examined", "idle"]

# RFC 3501 §9: tag = 1*<any ASTRING-CHAR except "+">
_RESPONSE_START = re.compile(rb"(\* |\+( |$)|[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+ (OK|NO|BAD)( |$))")
_LITERAL_END = re.compile(rb"\{(\d+)\}$")
_NOOP_DONE = re.compile(rb"(?:^|\r\n)z OK NOOP completed\r\n")


def _session(state: str) -> IMAPSession:
    session = IMAPSession(store=filled(messages=list(MESSAGES), count=3), imap={"max_errors": 100000},
                          tls=state != "not authenticated cleartext")
    if state == "authenticate in progress":
        assert session.cmd("s1 AUTHENTICATE PLAIN") == ["+ "]
    if state == "literal in progress":
        assert session.cmd("l1 LOGIN {18}") == ["+ Ready for literal data"]
    if state in ("authenticated", "selected", "examined", "idle"):
        session.login()
    if state in ("selected", "idle"):
        session.select()
    if state == "examined":
        session.run("EXAMINE INBOX")
    if state == "idle":
        assert session.cmd("i1 IDLE") == ["+ idling"]
    session.read_bytes()
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
    assert b"[SERVERBUG]" not in data


def assert_still_usable(session: IMAPSession) -> None:
    """Leave whatever the input left us in (a literal, IDLE, an AUTHENTICATE
    exchange, a line being skipped), then NOOP must answer OK. A literal's
    octets are data, whatever they spell: the test feeds exactly the number
    the server still waits for (which it cannot learn any other way)."""
    for _ in range(4):
        if session.closed:
            return                                  # LOGOUT, or a limit closed it with BYE: fine
        server = session.server
        if server._mode == "literal":
            server.dataReceived(b"x" * server._literal_need)
        elif server._mode == "skip literal":
            server.dataReceived(b"x" * server._skip_need)
        server.dataReceived(b"\r\n*\r\nDONE\r\nz NOOP\r\n")
        data = session.read_bytes()
        assert_well_formed(data)
        if _NOOP_DONE.search(data):
            return
    raise AssertionError("the session no longer answers NOOP")


def _fuzz(state: str, chunks: list[bytes]) -> None:
    with no_logged_failures():
        session = _session(state)
        for chunk in chunks:
            session.server.dataReceived(chunk)
        assert_well_formed(session.read_bytes())
        assert_still_usable(session)


@fuzz_settings(150)
@given(state=st.sampled_from(STATES), lines=st.lists(command_line, min_size=1, max_size=4))
def test_any_command_in_any_state_gets_well_formed_replies(state, lines):
    _fuzz(state, [line + b"\r\n" for line in lines])


@fuzz_settings(150)
@given(state=st.sampled_from(STATES), chunks=st.lists(raw_bytes, min_size=1, max_size=5))
def test_any_bytes_in_any_state_get_well_formed_replies(state, chunks):
    _fuzz(state, chunks + [b"\r\n"])


@fuzz_settings(150)
@given(state=st.sampled_from(["selected", "examined"]),
       line=st.builds(lambda name, args: (name + " " + " ".join(args)).encode(),
                      st.sampled_from(["FETCH", "UID FETCH", "SEARCH", "UID SEARCH", "STORE", "COPY", "MOVE"]),
                      st.lists(token, min_size=1, max_size=8)))
def test_selected_state_commands_with_random_arguments(state, line):
    _fuzz(state, [b"t " + line + b"\r\n"])


_MIME_PIECES = [b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
                b"Content-Type: text/plain; charset=\"x\r\n", b"--b\r\n", b"--b--\r\n", b"\r\n", b"x: y\r\n",
                b"Subject: =?utf-8?q?a_b?=\r\n", b"From: \"a\" <b@c>, (c) d@e; g: h@i;\r\n", b"\r\n\r\n",
                b"To: <@a,@b:c@d>\r\n", b"Content-Disposition: attachment; filename*=x\r\n", b"body\r\n",
                b"Content-Type: multipart/digest; boundary=\"b\"\r\n", b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"]


@fuzz_settings(300)
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


@fuzz_settings(300)
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
