"""Plays every tests/transcripts/pop3/*.txt through a POP3 server on StringTransport.

The format is the SMTP transcripts' (tests/unit/test_smtp_transcripts.py), with
POP3 set-up directives:
    # comment                  ignored (cite the RFC clause here)
    @session key=value ...     first line if present: role (pop3|pop3s), client, tls, starttls,
                               plaintext (yes/no: pop3.allow_plaintext_auth) and any [pop3] limit
    @message python-bytes      add a message to alice@example.test's INBOX (user=ADDRESS before
                               the literal for another mailbox)
    @deliver python-bytes      a message that arrives in alice's INBOX after the next sync
    @lock ADDRESS              another POP3 session holds ADDRESS's maildrop
    @unlock ADDRESS            ... and lets it go
    @fail METHOD               alice's INBOX fails every later METHOD call (sync, open, expunge, store_flags)
    C: text                    client line, sent at once with CRLF
    C| text                    client line, held and sent together with the following lines (pipelining)
    R: python-bytes-expression raw client bytes, e.g. R: b"x\\ny\\r\\n" or R: b"USER " + b"a" * 300 + b"\\r\\n"
    S: text                    expected server line, exact ("S:" alone: an empty line)
    S~ regex                   expected server line, re.fullmatch
    = closed | open            connection state
    = messages N | seen N      messages in alice's INBOX now / how many of them are \\Seen
    = tls                      STLS started the handshake
Every block of S lines must match the server's output since the previous
client input exactly: no missing and no extra lines.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from mailgw.config_types import POP3Limits
from mailgw.store.events import SEEN
from pop3_harness import ALICE, Session

TRANSCRIPTS = sorted((Path(__file__).parent.parent / "transcripts" / "pop3").glob("*.txt"))
_LIMIT_KEYS = {f.name: f.type for f in dataclasses.fields(POP3Limits)}


def _session(text: str) -> Session:
    options, limits = {}, {}
    for item in text.split():
        key, _, value = item.partition("=")
        value = {"yes": True, "no": False}.get(value, value)
        if key in _LIMIT_KEYS:
            limits[key] = value if isinstance(value, bool) else (
                float(value) if _LIMIT_KEYS[key] == "float" else int(value))
        else:
            options[key] = value
    return Session(pop3=limits or None, **options)


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
        if raw.startswith("@session"):
            assert session is None, f"{path.name}:{lineno}: @session must come first"
            session = _session(raw[len("@session"):])
            continue
        if session is None:
            session = Session()
        inbox = session.store.inbox(ALICE)
        if raw.startswith("@"):
            directive, _, argument = raw[1:].partition(" ")
            if directive == "message":
                user = ALICE
                if argument.startswith("user="):
                    user, _, argument = argument[len("user="):].partition(" ")
                session.store.inbox(user).add(ast.literal_eval(argument))
            elif directive == "deliver":
                inbox.deliver_later(ast.literal_eval(argument))
            elif directive == "lock":
                session.world.realm.pop3_locks.acquire(argument.strip(), None)
            elif directive == "unlock":
                session.world.realm.pop3_locks._held[argument.strip()].release()
            elif directive == "fail":
                inbox.fail[argument.strip()] = OSError("injected by the transcript")
            else:
                raise AssertionError(f"{path.name}:{lineno}: unknown directive {raw!r}")
            continue
        tag, body = raw[:2], raw[3:]
        if tag == "= ":
            body = raw[2:].strip()
        if tag in ("C:", "C|", "R:") and expected:
            flush_and_check()
        if tag == "C:":
            pending += body.encode("utf-8") + b"\r\n"
            session.server.dataReceived(pending)
            pending = b""
        elif tag == "C|":
            pending += body.encode("utf-8") + b"\r\n"
        elif tag == "R:":
            # An expression over bytes literals (b"x" * 300): test data, no names available.
            pending += eval(body, {"__builtins__": {}})
        elif tag in ("S:", "S~"):
            expected.append((tag, body, lineno))
        elif tag == "= ":
            flush_and_check()
            what, _, number = body.partition(" ")
            if what == "closed":
                assert session.closed, f"{path.name}:{lineno}: connection should be closed"
            elif what == "open":
                assert not session.closed, f"{path.name}:{lineno}: connection should be open"
            elif what == "tls":
                assert session.transport.tls_started, f"{path.name}:{lineno}: TLS should have started"
            elif what == "messages":
                assert len(inbox.uids) == int(number), f"{path.name}:{lineno}: {inbox.uids}"
            elif what == "seen":
                seen = [uid for uid in inbox.uids if SEEN in inbox.flags(uid)]
                assert len(seen) == int(number), f"{path.name}:{lineno}: seen {seen}"
            else:
                raise AssertionError(f"{path.name}:{lineno}: unknown assertion {body!r}")
        else:
            raise AssertionError(f"{path.name}:{lineno}: cannot parse {raw!r}")
    flush_and_check()


def test_there_are_transcripts():
    assert len(TRANSCRIPTS) >= 15


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path):
    play(path)
