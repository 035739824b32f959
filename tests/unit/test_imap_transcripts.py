"""Plays every tests/transcripts/imap/*.txt through an IMAP session on StringTransport.

The format is tests/unit/transcript.py's; for IMAP:
    @session key=value ...      IMAPSession options: tls (yes/no), starttls (yes/no), client,
                                plaintext=yes (imap.allow_plaintext_auth), max_append=N,
                                max_literal=N, max_command_line=N, max_errors=N, max_paren_depth=N
    @store count=N messages=a,b store content before the session starts: N numbered messages
                                and/or named messages from imap_harness.MESSAGES, in INBOX
                                (folder=NAME for another folder); already synced, not \\Recent
    @deliver FOLDER NAME        an MDA drops message NAME into FOLDER's new/ (seen at the next sync)
    @add FOLDER NAME            a message added through the store (an event reaches sessions at once)
The greeting counts as the first output.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from imap_harness import MESSAGES, IMAPSession, filled
from transcript import Transcript, session_options

TRANSCRIPTS = sorted((Path(__file__).parent.parent / "transcripts" / "imap").glob("*.txt"))
_LIMIT_KEYS = ("max_append", "max_literal", "max_command_line", "max_errors", "max_paren_depth",
               "max_auth_failures")


class IMAPTranscript(Transcript):
    store = None

    def new_session(self, options: dict):
        imap = {}
        if options.pop("plaintext", False):
            imap["allow_plaintext_auth"] = True
        for key in _LIMIT_KEYS:
            if key in options:
                imap[key] = int(options.pop(key))
        return IMAPSession(store=self.store if self.store is not None else filled(), imap=imap or None, **options)

    def output(self) -> list[str]:
        output = self.session.greeting + self.session.read()
        self.session.greeting = []
        return output

    def directive(self, name: str, argument: str) -> None:
        if name == "store":
            if self.session is not None:
                self.fail("@store must come before the session starts")
            opts = session_options(argument)
            names = [n for n in opts.get("messages", "").split(",") if n]
            self.store = filled(self.store, count=int(opts.get("count", 0)), messages=names,
                                folder=opts.get("folder", "INBOX"))
        elif name in ("deliver", "add"):
            folder, message = argument.split()
            target = self.start().folder(folder)
            (target.deliver if name == "deliver" else target.add)(MESSAGES[message])
        else:
            super().directive(name, argument)


def play(path: Path) -> None:
    IMAPTranscript(path).play()


def test_there_are_transcripts():
    assert len(TRANSCRIPTS) >= 20


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path):
    play(path)
