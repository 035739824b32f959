"""Plays every tests/transcripts/smtp/*.txt through a server on StringTransport.

Transcript format (one file per behaviour; the file name says what it pins):
    # comment                  ignored (cite the RFC clause here)
    @session key=value ...     Session(...) options: role, client, tls (yes/no), starttls (yes/no)
    C: text                    client line, sent at once with CRLF
    C| text                    client line, held and sent together with the following lines (pipelining)
    R: python-bytes-literal    raw client bytes, e.g. R: b"x\\ny\\r\\n"
    S: text                    expected server line, exact
    S~ regex                   expected server line, re.fullmatch
    = closed | open            connection state
    = stored N | queued N      messages handed to the local store / the relay spool
Every block of S lines must match the server's output since the previous
client input exactly: no missing and no extra lines.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from smtp_harness import Session

TRANSCRIPTS = sorted((Path(__file__).parent.parent / "transcripts" / "smtp").glob("*.txt"))


def _session_options(text: str) -> dict:
    options = {}
    for item in text.split():
        key, _, value = item.partition("=")
        options[key] = {"yes": True, "no": False}.get(value, value)
    return options


def play(path: Path) -> None:
    session = None
    pending = b""
    expected: list[tuple[str, str, int]] = []

    def flush_and_check():
        nonlocal pending, expected
        if pending:
            session.server.dataReceived(pending)
            pending = b""
        output = session.read()
        for index, (kind, text, lineno) in enumerate(expected):
            got = output[index] if index < len(output) else "<nothing>"
            ok = got == text if kind == "S:" else re.fullmatch(text, got) is not None
            assert ok, f"{path.name}:{lineno}: expected {kind} {text!r}, got {got!r}\nall output: {output}"
        assert len(output) == len(expected), \
            f"{path.name}: extra server output {output[len(expected):]} (expected {len(expected)} lines)"
        expected = []

    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        tag, body = raw[:2], raw[3:]
        if tag == "= ":
            body = raw[2:].strip()
        if raw.startswith("@session"):
            session = Session(**_session_options(raw[len("@session"):]))
            continue
        if session is None:
            session = Session()
        if tag in ("C:", "C|", "R:") and expected:
            flush_and_check()
        if tag == "C:":
            pending += body.encode("utf-8") + b"\r\n"
            session.server.dataReceived(pending)
            pending = b""
        elif tag == "C|":
            pending += body.encode("utf-8") + b"\r\n"
        elif tag == "R:":
            pending += ast.literal_eval(body)
        elif tag in ("S:", "S~"):
            expected.append((tag, body, lineno))
        elif tag == "= ":
            flush_and_check()
            what, _, number = body.partition(" ")
            if what == "closed":
                assert session.closed, f"{path.name}:{lineno}: connection should be closed"
            elif what == "open":
                assert not session.closed, f"{path.name}:{lineno}: connection should be open"
            elif what == "stored":
                assert len(session.store.delivered) == int(number), f"{path.name}:{lineno}: {session.store.delivered}"
            elif what == "queued":
                assert len(session.spool.queued) == int(number), f"{path.name}:{lineno}: {session.spool.queued}"
            else:
                raise AssertionError(f"{path.name}:{lineno}: unknown assertion {body!r}")
        else:
            raise AssertionError(f"{path.name}:{lineno}: cannot parse {raw!r}")
    flush_and_check()


def test_there_are_transcripts():
    assert len(TRANSCRIPTS) >= 10


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path):
    play(path)
