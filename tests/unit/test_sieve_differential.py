"""Differential tests: our Sieve interpreter against Dovecot Pigeonhole.

Each case in tests/sieve_corpus/ (see regenerate.py there for the layout
and the normalized form) is run through mailgw.sieve and compared with the
stored `.expected` (Pigeonhole's normalized result) and, when `sieve-test`
is installed, with a live run of Pigeonhole too.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from mailgw.sieve.interpreter import (
    Envelope, FileInto, Keep, Redirect, Reject, compile_script, run,
)
from mailgw.sieve.message import SieveMessage

CORPUS = Path(__file__).resolve().parent.parent / "sieve_corpus"

_spec = importlib.util.spec_from_file_location("sieve_corpus_regenerate", CORPUS / "regenerate.py")
regenerate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regenerate)

# Cases where we differ from Pigeonhole on purpose: name -> reason.
INTENDED_DIFFERENCES: dict[str, str] = {
    "151-var-string-test": "RFC 5228 §2.7.3: the default comparator is i;ascii-casemap, also for the "
                           "variables `string` test; Pigeonhole 2.3 compares `string` octet-wise "
                           "unless :comparator is given (see 120-string-explicit-casemap)",
}

# Cases where our interpreter is wrong (see /tmp/sieve-diff.md): name -> reason.
KNOWN_BUGS: dict[str, str] = {
    "022-mailboxexists-inbox": "RFC 5490 `mailbox` is advertised but its `mailboxexists` test is "
                               "missing: compile_script refuses the script",
}


def normalize_ours(outcome) -> str:
    lines: list[str] = []
    for action in outcome.actions:
        if isinstance(action, Keep):
            lines.append(f"keep flags={regenerate.format_flags(action.flags)}")
        elif isinstance(action, FileInto):
            lines.append(regenerate._store(action.mailbox, action.flags))
        elif isinstance(action, Redirect):
            lines.append(f"redirect {action.address}")
        elif isinstance(action, Reject):
            lines.append("reject")
        else:
            lines.append("discard")
    if outcome.failed is not None:
        lines.append("failed")
    return regenerate.finish(lines)


def ours(path: Path) -> str:
    header = regenerate.parse_header(path)
    script = compile_script(path.read_text(encoding="utf-8"), name=path.stem)
    message = SieveMessage.from_bytes(header["message"].read_bytes())
    envelope = Envelope(sender=header["sender"], recipient=header["recipient"])
    return normalize_ours(run([script], message, envelope))


def _params():
    out = []
    for path in regenerate.cases():
        name = path.stem
        marks = []
        if name in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name]))
        out.append(pytest.param(path, id=name, marks=marks))
    return out


def test_corpus_is_big_enough():
    assert len(regenerate.cases()) >= 100
    for path in regenerate.cases():
        assert path.with_suffix(".expected").exists(), f"{path.name}: run regenerate.py"


def test_tables_name_real_cases():
    names = {p.stem for p in regenerate.cases()}
    assert set(INTENDED_DIFFERENCES) <= names
    assert set(KNOWN_BUGS) <= names
    assert not set(INTENDED_DIFFERENCES) & set(KNOWN_BUGS)


@pytest.mark.parametrize("path", _params())
def test_matches_stored_pigeonhole_result(path: Path):
    if path.stem in INTENDED_DIFFERENCES:
        pytest.skip(INTENDED_DIFFERENCES[path.stem])
    expected = path.with_suffix(".expected").read_text()
    assert ours(path) == expected


@pytest.mark.skipif(not shutil.which("sieve-test"), reason="sieve-test (Pigeonhole) not installed")
@pytest.mark.parametrize("path", _params())
def test_matches_live_pigeonhole(path: Path):
    if path.stem in INTENDED_DIFFERENCES:
        pytest.skip(INTENDED_DIFFERENCES[path.stem])
    live = regenerate.run_pigeonhole(path, shutil.which("sieve-test"))
    assert live == path.with_suffix(".expected").read_text(), "Pigeonhole changed: run regenerate.py"
    assert ours(path) == live
