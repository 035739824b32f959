"""Plays every tests/transcripts/smtp/*.txt through a server on StringTransport.

The format is tests/unit/transcript.py's; for SMTP:
    @session key=value ...     Session(...) options: role, client, tls (yes/no), starttls (yes/no)
    = stored N | queued N      messages handed to the local store / the relay spool
"""
from __future__ import annotations

from pathlib import Path

import pytest

from smtp_harness import Session
from transcript import Transcript

TRANSCRIPTS = sorted((Path(__file__).parent.parent / "transcripts" / "smtp").glob("*.txt"))


class SMTPTranscript(Transcript):
    def new_session(self, options: dict):
        return Session(**options)

    def check(self, what: str, argument: str) -> None:
        if what == "stored":
            assert len(self.session.store.delivered) == int(argument), self.session.store.delivered
        elif what == "queued":
            assert len(self.session.spool.queued) == int(argument), self.session.spool.queued
        else:
            super().check(what, argument)


def play(path: Path) -> None:
    SMTPTranscript(path).play()


def test_there_are_transcripts():
    assert len(TRANSCRIPTS) >= 10


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path):
    play(path)
