"""Plays every tests/transcripts/imap/*.txt through an IMAP session on StringTransport.

Transcript format (one file per behaviour; the file name says what it pins):
    # comment                   ignored (cite the RFC clause here)
    @session key=value ...      IMAPSession options: tls (yes/no), starttls (yes/no), client,
                                plaintext=yes (imap.allow_plaintext_auth), max_append=N,
                                max_literal=N, max_command_line=N, max_errors=N, max_paren_depth=N
    @store count=N messages=a,b store content before the session starts: N numbered messages
                                and/or named messages from imap_harness.MESSAGES, in INBOX
                                (folder=NAME for another folder); already synced, not \\Recent
    @deliver FOLDER NAME        an MDA drops message NAME into FOLDER's new/ (seen at the next sync)
    @add FOLDER NAME            a message added through the store (an event reaches sessions at once)
    C: text                     client line, sent at once with CRLF
    C| text                     client line, held and sent with the following lines (pipelining)
    R: python-bytes-expression  raw client bytes, e.g. R: b"a1 LOGIN {5+}\\r\\n" or b"x" * 5000
    S: text                     expected server line, exact
    S~ regex                    expected server line, re.fullmatch
    S> prefix                   expected server line starting with prefix (a tagged "a1 OK")
    S* prefix                   skip server lines up to and including one starting with prefix
    = closed | open             connection state
Every block of S lines must account for the server's output since the previous
client input: no missing and no extra lines (S* consumes the lines it skips).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from imap_harness import MESSAGES, IMAPSession, filled

TRANSCRIPTS = sorted((Path(__file__).parent.parent / "transcripts" / "imap").glob("*.txt"))
_LIMIT_KEYS = ("max_append", "max_literal", "max_command_line", "max_errors", "max_paren_depth",
               "max_auth_failures")


def _options(text: str) -> dict:
    options = {}
    for item in text.split():
        key, _, value = item.partition("=")
        options[key] = {"yes": True, "no": False}.get(value, value)
    return options


def _bytes(expression: str) -> bytes:
    """A bytes literal, or bytes literals joined with + and repeated with * count."""
    tree = ast.parse(expression, mode="eval").body

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (bytes, int)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"not a bytes expression: {expression!r}")
    result = value(tree)
    assert isinstance(result, bytes), expression
    return result


def _session(options: dict, store) -> IMAPSession:
    imap = {}
    if options.pop("plaintext", False):
        imap["allow_plaintext_auth"] = True
    for key in _LIMIT_KEYS:
        if key in options:
            imap[key] = int(options.pop(key))
    return IMAPSession(store=store, imap=imap or None, **options)


def play(path: Path) -> None:
    session = None
    store = None
    session_options: dict = {}
    pending = b""
    expected: list[tuple[str, str, int]] = []

    def start():
        nonlocal session
        if session is None:
            session = _session(dict(session_options), store if store is not None else filled())

    def check():
        nonlocal pending, expected
        start()
        if pending:
            session.server.dataReceived(pending)
            pending = b""
        output = session.read()
        if session.greeting:
            output = session.greeting + output
            session.greeting = []
        index = 0
        for kind, text, lineno in expected:
            if kind == "S*":
                while index < len(output) and not output[index].startswith(text):
                    index += 1
                assert index < len(output), f"{path.name}:{lineno}: no line starting {text!r}\nall output: {output}"
                index += 1
                continue
            got = output[index] if index < len(output) else "<nothing>"
            if kind == "S:":
                ok = got == text
            elif kind == "S~":
                ok = re.fullmatch(text, got) is not None
            else:
                ok = got.startswith(text)
            assert ok, f"{path.name}:{lineno}: expected {kind} {text!r}, got {got!r}\nall output: {output}"
            index += 1
        assert index == len(output), \
            f"{path.name}: extra server output {output[index:]} (expected {len(expected)} lines)"
        expected = []

    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw.startswith("@session"):
            session_options = _options(raw[len("@session"):])
            continue
        if raw.startswith("@store"):
            opts = _options(raw[len("@store"):])
            names = [n for n in opts.get("messages", "").split(",") if n]
            store = filled(store, count=int(opts.get("count", 0)), messages=names,
                           folder=opts.get("folder", "INBOX"))
            continue
        if raw.startswith("@deliver") or raw.startswith("@add"):
            if expected:
                check()
            start()
            _, folder, name = raw.split()
            target = session.folder(folder)
            (target.deliver if raw.startswith("@deliver") else target.add)(MESSAGES[name])
            continue
        tag, body = raw[:2], raw[3:]
        if tag in ("C:", "C|", "R:") and expected:
            check()
        start()
        if tag == "C:":
            pending += body.encode("utf-8") + b"\r\n"
            session.server.dataReceived(pending)
            pending = b""
        elif tag == "C|":
            pending += body.encode("utf-8") + b"\r\n"
        elif tag == "R:":
            pending += _bytes(body)
        elif tag in ("S:", "S~", "S>", "S*"):
            expected.append((tag, body, lineno))
        elif raw.startswith("= "):
            check()
            what = raw[2:].strip()
            if what == "closed":
                assert session.closed, f"{path.name}:{lineno}: connection should be closed"
            elif what == "open":
                assert not session.closed, f"{path.name}:{lineno}: connection should be open"
            else:
                raise AssertionError(f"{path.name}:{lineno}: unknown assertion {what!r}")
        else:
            raise AssertionError(f"{path.name}:{lineno}: cannot parse {raw!r}")
    check()


def test_there_are_transcripts():
    assert len(TRANSCRIPTS) >= 20


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path):
    play(path)
