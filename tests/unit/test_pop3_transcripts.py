"""Plays every tests/transcripts/pop3/*.txt through a POP3 server on StringTransport.

The format is tests/unit/transcript.py's; for POP3:
    @session key=value ...     role (pop3|pop3s), client, tls, starttls,
                               plaintext (yes/no: pop3.allow_plaintext_auth) and any [pop3] limit
    @message python-bytes      add a message to alice@example.test's INBOX (user=ADDRESS before
                               the literal for another mailbox)
    @deliver python-bytes      a message that arrives in alice's INBOX after the next sync
    @lock ADDRESS              another POP3 session holds ADDRESS's maildrop
    @unlock ADDRESS            ... and lets it go
    @fail METHOD               alice's INBOX fails every later METHOD call (sync, open, expunge, store_flags)
    = messages N | seen N      messages in alice's INBOX now / how many of them are \\Seen
    = tls                      STLS started the handshake
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from mailgw.config_types import POP3Limits
from mailgw.store.events import SEEN
from pop3_harness import ALICE, Session
from transcript import Transcript

TRANSCRIPTS = sorted((Path(__file__).parent.parent / "transcripts" / "pop3").glob("*.txt"))
_LIMIT_KEYS = {f.name: f.type for f in dataclasses.fields(POP3Limits)}


class POP3Transcript(Transcript):
    def new_session(self, options: dict):
        limits = {}
        for key in [k for k in options if k in _LIMIT_KEYS]:
            value = options.pop(key)
            limits[key] = value if isinstance(value, bool) else (
                float(value) if _LIMIT_KEYS[key] == "float" else int(value))
        return Session(pop3=limits or None, **options)

    def directive(self, name: str, argument: str) -> None:
        store = self.start().store
        if name == "message":
            user = ALICE
            if argument.startswith("user="):
                user, _, argument = argument[len("user="):].partition(" ")
            store.inbox(user).add(ast.literal_eval(argument))
        elif name == "deliver":
            store.inbox(ALICE).deliver_later(ast.literal_eval(argument))
        elif name == "lock":
            self.session.world.realm.pop3_locks.acquire(argument, None)
        elif name == "unlock":
            self.session.world.realm.pop3_locks._held[argument].release()
        elif name == "fail":
            store.inbox(ALICE).fail[argument] = OSError("injected by the transcript")
        else:
            super().directive(name, argument)

    def check(self, what: str, argument: str) -> None:
        inbox = self.session.store.inbox(ALICE)
        if what == "tls":
            assert self.session.transport.tls_started, "TLS should have started"
        elif what == "messages":
            assert len(inbox.uids) == int(argument), inbox.uids
        elif what == "seen":
            seen = [uid for uid in inbox.uids if SEEN in inbox.flags(uid)]
            assert len(seen) == int(argument), f"seen {seen}"
        else:
            super().check(what, argument)


def play(path: Path) -> None:
    POP3Transcript(path).play()


def test_there_are_transcripts():
    assert len(TRANSCRIPTS) >= 15


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path):
    play(path)
