"""Maildir file names: the one place where they are parsed and built.

Format (docs/store-format.md §3; https://cr.yp.to/proto/maildir.html, with
Dovecot's size fields)::

    <unique>[,<field>]...[:2,<letters>]

* `<unique>`: for names made here `<sec>.M<usec>P<pid>Q<n>.<host>`
  (unique_base), where `<host>` has "/", ":" and "," written as \\057, \\072
  and \\054 (escape_hostname): ":" starts the info, "," separates the fields.
  Other writers' unique parts are taken as they are.
* fields: `S=<octets on disk>` and `W=<octets in CRLF form>` (Dovecot), and
  ours, `U=<uid>`: the message's UID in its folder. Unknown fields, and
  malformed ones (`U=x`, `W=`), are kept as they are and never interpreted.
* info: `:2,` then the flag letters in ASCII order: D \\Draft, F \\Flagged,
  R \\Answered, S \\Seen, T \\Deleted. Other letters (P "passed", Dovecot's
  lower-case keyword letters) are kept as they are. An info of another
  version (`:1,...`) carries no flags; a name may have no info at all.

The *key* of a name is the name without its `U=` field and without its
info: it stays the same when the flags change (a rename), so it identifies
the message in cur/ whoever renamed the file.

Everything here is pure string work (no I/O), cheap enough for a listing
of 10,000 files.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from mailgw.store.events import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN, SYSTEM_FLAGS
from mailgw.store.index import MAX_UID

INFO = ":2,"                       # the info of Maildir version 2: flag letters follow
# IMAP system flags <-> Maildir info letters (\Recent has none: it is never stored).
FLAG_LETTERS = {DRAFT: "D", FLAGGED: "F", ANSWERED: "R", SEEN: "S", DELETED: "T"}
LETTER_FLAGS = {letter: flag for flag, letter in FLAG_LETTERS.items()}
MODES = ("add", "remove", "replace")

_DIGITS = re.compile(r"[0-9]{1,10}")       # U= and W= values
_S_FIELD = re.compile(r"S=([0-9]{1,20})")
_LETTER_BY_LOWER = {flag.lower(): FLAG_LETTERS[flag] for flag in SYSTEM_FLAGS}


class ParsedName(NamedTuple):
    key: str                # the name without U= and info (see the module docstring)
    uid: int | None         # U=, or None
    wire: int | None        # W= (RFC822.SIZE), or None
    letters: str            # the info's flag letters ("" without a version 2 info)


# -- the unique part ---------------------------------------------------------------

def escape_hostname(hostname: str) -> str:
    """`hostname` as it may appear in a unique part."""
    return hostname.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")


def unique_base(now: float, pid: int, serial: int, host: str) -> str:
    """`<sec>.M<usec>P<pid>Q<serial>.<host>`: unique on this host when `pid`
    is the writing process and `serial` never repeats in it (the clock may).
    `host` as escape_hostname returns it."""
    seconds = int(now)
    return f"{seconds}.M{int((now - seconds) * 1_000_000)}P{pid}Q{serial}.{host}"


_ARRIVAL = re.compile(r"(\d+)\.(?:M(\d+))?(?:P\d+)?(?:Q(\d+))?")


def arrival_order(name: str) -> tuple:
    """A sort key putting names of new/ in the order they arrived: by the
    seconds, microseconds and serial of `unique_base` compared as numbers
    ("M99999" is earlier than "M100000", which plain string order gets
    wrong), then by the name. RFC 3501 §2.3.1.1: UIDs ascend in the order
    messages were added. Names of other writers sort by their leading
    seconds where they have them, then by name."""
    match = _ARRIVAL.match(name)
    if match is None:
        return (float("inf"), 0, 0, name)
    seconds, micros, serial = match.groups()
    return (int(seconds), int(micros or 0), int(serial or 0), name)


# -- building names ----------------------------------------------------------------

def delivery_name(base: str, size: int, wire: int) -> str:
    """The name of a new message: `<base>,S=<size>,W=<wire>` (octets on disk,
    octets in CRLF form)."""
    if size < 0 or wire < 0:
        raise ValueError(f"negative message size: S={size} W={wire}")
    return f"{base},S={size},W={wire}"


def with_wire(key: str, wire: int) -> str:
    """`key` with a `W=` field added (a file another writer made without one)."""
    if wire < 0:
        raise ValueError(f"negative message size: W={wire}")
    return f"{key},W={wire}"


def rekey(key: str, base: str) -> str:
    """`key` with its unique part replaced by `base`, its fields kept: a
    second file of one message (a copy) becomes a message of its own."""
    _, comma, fields = key.partition(",")
    return base + comma + fields


def copy_key(key: str, base: str, wire: int) -> str:
    """The key of a copy of message `key` (same content, so the same fields)
    under the fresh unique part `base`; `,W=<wire>` when `key` has no fields."""
    _, comma, fields = key.partition(",")
    return f"{base},{fields}" if comma else f"{base},W={wire}"


def make_name(key: str, uid: int, letters: str) -> str:
    """`<key>,U=<uid>:2,<letters>`: a message's name in cur/. ValueError for
    what no file name may hold (a key with ":" would move the info)."""
    if ":" in key or "/" in key or "\0" in key:
        raise ValueError(f"not a Maildir key: {key!r}")
    if not 0 < uid <= MAX_UID:
        raise ValueError(f"UID out of range: {uid!r}")
    if "/" in letters or "\0" in letters:
        raise ValueError(f"not Maildir info letters: {letters!r}")
    return f"{key},U={uid}{INFO}{letters}"


# -- parsing names -----------------------------------------------------------------

def parse_name(name: str) -> ParsedName:
    """(key, uid, wire, letters) of the file name `name`. Accepts whatever
    other Maildir writers make; ValueError only for what is not a file name
    ("", ".", "..", "/" or NUL in it)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a file name: {name!r}")
    base, _, info = name.partition(":")
    uid = wire = None
    if "," in base:
        parts = base.split(",")
        # Ours is the last well-formed U= (make_name appends it after the key);
        # any earlier one belongs to the key, so parse(make_name(parse(n))) is stable.
        at = 0
        for i in range(len(parts) - 1, 0, -1):
            if parts[i][:2] == "U=" and _DIGITS.fullmatch(parts[i], 2):
                at = i
                uid = int(parts[i][2:])
                break
        kept = [parts[0]]
        for i in range(1, len(parts)):
            part = parts[i]
            if i == at:
                continue
            if part[:2] == "W=" and _DIGITS.fullmatch(part, 2):
                wire = int(part[2:])    # the last well-formed W=
            kept.append(part)
        key = ",".join(kept)
    else:
        key = base
    letters = info[2:] if info[:2] == "2," else ""
    return ParsedName(key, uid, wire, letters)


def strip_info(name: str) -> str:
    """`name` without its info (":" and what follows): a name for tmp/."""
    return name.partition(":")[0]


def size_from_name(name: str) -> int | None:
    """The S= (octets on disk) of a Maildir file name or key, or None."""
    base = name.partition(":")[0]
    for part in base.split(",")[1:]:
        m = _S_FIELD.fullmatch(part)
        if m:
            return int(m[1])
    return None


# -- flag letters ------------------------------------------------------------------

def letter_of_flag(flag: str) -> str | None:
    """The info letter of an IMAP system flag (any case), None for anything
    else (keywords, \\Recent)."""
    return _LETTER_BY_LOWER.get(flag.lower())


def flags_of_letters(letters: str) -> frozenset:
    """The IMAP system flags of info letters; other letters carry none."""
    return frozenset(LETTER_FLAGS[c] for c in letters if c in LETTER_FLAGS)


def sorted_letters(letters) -> str:
    """Info letters as Maildir wants them: each once, in ASCII order."""
    return "".join(sorted(set(letters)))


def change_letters(letters: str, system, mode: str) -> str:
    """The info letters after a STORE: the system-flag letters `system` added
    to, removed from or replacing those of `letters` (`mode`); letters that
    are no system flag's (another program's) are kept."""
    have = {c for c in letters if c in LETTER_FLAGS}
    other = {c for c in letters if c not in LETTER_FLAGS}
    if mode == "add":
        have |= set(system)
    elif mode == "remove":
        have -= set(system)
    elif mode == "replace":
        have = set(system)
    else:
        raise ValueError(f"mode must be one of {MODES}: {mode!r}")
    return "".join(sorted(have | other))
