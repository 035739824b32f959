"""The per-folder index of the mailbox store, and its small companion files.

Format and recovery rules: docs/store-format.md. Everything here is blocking
file work: it runs in the store's thread pool, never on the reactor thread.

Files in every folder directory (INBOX = the user's directory, other folders
= its ".Name" Maildir++ subdirectories):

    mailgw-index          the index: UIDVALIDITY, UIDNEXT, keyword table,
                          one line per message (UID, INTERNALDATE, size,
                          keywords, file name). A cache of what the file names
                          carry plus what they cannot (keywords, cached sizes).
    mailgw-uidvalidity    UIDVALIDITY and the UID reservation mark, so a lost
                          index is rebuilt with the same UIDVALIDITY and never
                          hands out a UID that was ever used.
    mailgw-index.lock     flock(2) target: held for every read-modify-write.

Per user (in the INBOX directory): mailgw-subscriptions, mailgw-next-uidvalidity
and mailgw-user.lock (see mailbox.py).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from mailgw.durable import fsync_directory
from mailgw.errors import StorageFailed, StorageFull

INDEX_NAME = "mailgw-index"
UIDVALIDITY_NAME = "mailgw-uidvalidity"
LOCK_NAME = "mailgw-index.lock"
USER_LOCK_NAME = "mailgw-user.lock"                 # per user: subscriptions, UIDVALIDITY counter
NEXT_UIDVALIDITY_NAME = "mailgw-next-uidvalidity"   # per user
SUBSCRIPTIONS_NAME = "mailgw-subscriptions"         # per user
INDEX_VERSION = 1
UIDVALIDITY_VERSION = 1
INDEX_MAGIC = b"mailgw-index"
UIDVALIDITY_MAGIC = b"mailgw-uidvalidity"

MAX_UID = 2**32 - 1                # RFC 3501 §2.3.1.1: nz-number, 32 bits
MAX_KEYWORDS = 64                  # per folder; the mask is written as hex
MAX_KEYWORD_LENGTH = 128
# The reservation mark in mailgw-uidvalidity runs this far ahead of UIDNEXT,
# so it is rewritten once per RESERVE_BLOCK assigned UIDs, not per message.
RESERVE_BLOCK = 1024

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_HEADER = re.compile(
    rb"mailgw-index (?P<version>[0-9]+) uidvalidity=(?P<uidvalidity>[0-9]{1,10})"
    rb" uidnext=(?P<uidnext>[0-9]{1,10}) generation=(?P<generation>[0-9]{1,20})"
    rb" keywords=(?P<keywords>[0-9]{1,3}) messages=(?P<messages>[0-9]{1,10})"
    rb" crc32=(?P<crc>[0-9a-f]{8})"
)
_UIDVALIDITY = re.compile(rb"mailgw-uidvalidity 1 ([0-9]{1,10}) ([0-9]{1,10})\n")
# RFC 3501 §9: flag-keyword = atom; ATOM-CHAR = any 7-bit CHAR except
# atom-specials: ( ) { SP CTL % * " \ ] (and no NUL).
_ATOM = re.compile(r'[^(){ \x00-\x1f\x7f%*"\\\]\x80-\U0010ffff]+')
# File names written as they are: printable ASCII without "%" (escaped) and space.
_PLAIN_NAME = re.compile(r"[!-$&-~]+")
_NAME_SAFE = "!\"#$&'()*+,/:;<=>?@[\\]^`{|}"   # quote() keeps alnum and _.-~ anyway


class IndexCorrupt(ValueError):
    """The index (or uidvalidity file) is not what this version writes."""


def valid_keyword(name) -> bool:
    """A keyword (IMAP flag without backslash) this store can keep."""
    return isinstance(name, str) and 0 < len(name) <= MAX_KEYWORD_LENGTH and _ATOM.fullmatch(name) is not None


@dataclass
class Entry:
    uid: int
    internaldate: float
    size: int
    keywords: int        # bit i set = keyword table entry i
    name: str            # file name in cur/


@dataclass
class Index:
    uidvalidity: int
    uidnext: int
    generation: int
    keywords: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)


# -- file names inside the index ---------------------------------------------------

def escape_name(name: str) -> str:
    if _PLAIN_NAME.fullmatch(name):
        return name
    return quote(os.fsencode(name), safe=_NAME_SAFE)


def unescape_name(text: str) -> str:
    if "%" not in text:
        return text
    return os.fsdecode(unquote_to_bytes(text))


# -- the index file ------------------------------------------------------------------

def format_index(index: Index) -> bytes:
    lines = [f"k {keyword}\n" for keyword in index.keywords]
    for e in index.entries:
        lines.append(f"m {e.uid} {e.internaldate!r} {e.size} {e.keywords:x} {escape_name(e.name)}\n")
    body = "".join(lines).encode("ascii")
    head = (
        f"mailgw-index {INDEX_VERSION} uidvalidity={index.uidvalidity} uidnext={index.uidnext}"
        f" generation={index.generation} keywords={len(index.keywords)} messages={len(index.entries)}"
    ).encode("ascii")
    # The checksum covers the header's fields and the body: any damage shows.
    return head + f" crc32={zlib.crc32(body, zlib.crc32(head)):08x}\n".encode("ascii") + body


def parse_header(line: bytes) -> dict:
    match = _HEADER.fullmatch(line)
    if match is None:
        raise IndexCorrupt(f"bad index header: {line[:120]!r}")
    if int(match["version"]) != INDEX_VERSION:
        raise IndexCorrupt(f"unknown index version {int(match['version'])}")
    return {key: (value if key == "crc" else int(value)) for key, value in match.groupdict().items()}


def parse_index(data: bytes) -> Index:
    """Strict: any deviation (checksum, counts, order, syntax) raises IndexCorrupt."""
    head, newline, body = data.partition(b"\n")
    if not newline:
        raise IndexCorrupt("no index header line")
    header = parse_header(head)
    covered = head[: head.rindex(b" crc32=")]
    if f"{zlib.crc32(body, zlib.crc32(covered)):08x}".encode() != header["crc"]:
        raise IndexCorrupt("index checksum mismatch (truncated or damaged)")
    if body and not body.endswith(b"\n"):
        raise IndexCorrupt("index does not end with a newline")
    lines = body.split(b"\n")[:-1] if body else []
    nkeywords, nmessages = header["keywords"], header["messages"]
    if len(lines) != nkeywords + nmessages:
        raise IndexCorrupt("index line count differs from its header")
    if nkeywords > MAX_KEYWORDS:
        raise IndexCorrupt("too many keywords")
    uidvalidity, uidnext = header["uidvalidity"], header["uidnext"]
    if not 0 < uidvalidity <= MAX_UID or not 0 < uidnext <= MAX_UID + 1:
        raise IndexCorrupt("uidvalidity/uidnext out of range")
    try:
        text = [line.decode("ascii") for line in lines]
    except UnicodeDecodeError:
        raise IndexCorrupt("non-ASCII index line") from None
    keywords = []
    for line in text[:nkeywords]:
        tag, _, keyword = line.partition(" ")
        if tag != "k" or not valid_keyword(keyword) or keyword.lower() in {k.lower() for k in keywords}:
            raise IndexCorrupt(f"bad keyword line {line!r}")
        keywords.append(keyword)
    limit = 1 << nkeywords
    entries = []
    previous = 0
    names = set()
    try:
        for line in text[nkeywords:]:
            tag, uid, date, size, mask, name = line.split(" ")
            uid, size, mask = int(uid), int(size), int(mask, 16)
            date = float(date)
            name = unescape_name(name)
            if (
                tag != "m" or not previous < uid < uidnext or size < 0 or not 0 <= mask < limit
                or not name or "/" in name or "\0" in name or name in names or date != date
            ):
                raise ValueError(line)
            previous = uid
            names.add(name)
            entries.append(Entry(uid, date, size, mask, name))
    except ValueError as e:  # includes wrong field counts and bad numbers
        raise IndexCorrupt(f"bad message line: {e}") from None
    return Index(uidvalidity, uidnext, header["generation"], keywords, entries)


def read_generation(path) -> int | None:
    """The generation in the index header, None if missing or unreadable.
    One small read: the cheap "has anyone written the index?" check."""
    try:
        with open(path, "rb") as f:
            line = f.readline(512)
    except FileNotFoundError:
        return None
    try:
        return parse_header(line.rstrip(b"\n"))["generation"]
    except IndexCorrupt:
        return None


# -- the uidvalidity file ------------------------------------------------------------

def format_uidvalidity(uidvalidity: int, reserved: int) -> bytes:
    """`reserved`: no UID >= it was ever assigned in this UIDVALIDITY."""
    return f"mailgw-uidvalidity {UIDVALIDITY_VERSION} {uidvalidity} {reserved}\n".encode("ascii")


def parse_uidvalidity(data: bytes) -> tuple[int, int]:
    match = _UIDVALIDITY.fullmatch(data)
    if match is None:
        raise IndexCorrupt(f"bad uidvalidity file: {data[:80]!r}")
    uidvalidity, reserved = int(match[1]), int(match[2])
    if not 0 < uidvalidity <= MAX_UID or reserved > MAX_UID + 1:
        raise IndexCorrupt("uidvalidity out of range")
    return uidvalidity, max(reserved, 1)


def read_uidvalidity(directory: Path) -> tuple[int, int] | None:
    try:
        with open(directory / UIDVALIDITY_NAME, "rb") as f:
            return parse_uidvalidity(f.read(256))
    except (FileNotFoundError, IndexCorrupt):
        return None


def allocate_uidvalidity(osc, user_dir: Path) -> int:
    """A UIDVALIDITY for a new (or re-created) folder of this user: the
    current unix time, but always above any value handed out before for
    this user (mailgw-next-uidvalidity), so a folder deleted and created
    again, or rebuilt without its uidvalidity file, never gets an old value
    back (RFC 3501 §2.3.1.1)."""
    user_dir = Path(user_dir)
    with locked(user_dir / USER_LOCK_NAME):
        stored = 0
        try:
            with open(user_dir / NEXT_UIDVALIDITY_NAME, "rb") as f:
                match = re.fullmatch(rb"mailgw-next-uidvalidity 1 ([0-9]{1,10})\n", f.read(128))
            if match:
                stored = int(match[1])
        except FileNotFoundError:
            pass
        value = max(int(time.time()), stored, 1)
        if value >= MAX_UID:  # in 2106; start again low rather than fail
            value = 1
        write_atomic(osc, user_dir, NEXT_UIDVALIDITY_NAME, f"mailgw-next-uidvalidity 1 {value + 1}\n".encode())
        return value


# -- writing ---------------------------------------------------------------------------

def write_atomic(osc, directory: Path, name: str, data: bytes) -> None:
    """Replace directory/name with `data`: write name.tmp, fsync, rename(2)
    over the old file, fsync the directory. Readers see the old or the new
    file, never a mix; on any error the old file is left as it was and
    StorageFull (ENOSPC/EDQUOT) or the OSError is raised.

    The caller holds the lock that covers `name`, so a name.tmp found here is
    a leftover of a crashed writer and is overwritten (O_TRUNC).
    `osc`: mailgw.durable._OSCalls or a test double with the same calls."""
    tmp = directory / f"{name}.tmp"
    final = directory / name
    try:
        fd = osc.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[osc.write(fd, view):]
            osc.fsync(fd)
        finally:
            osc.close(fd)
        osc.rename(tmp, final)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if e.errno in _DISK_FULL:
            raise StorageFull() from e
        raise
    fsync_directory(directory, osc=osc)


@contextmanager
def locked(path):
    """Hold an exclusive flock(2) on `path` (created if missing). flock locks
    belong to the open file description, so two Folder objects - in one
    process or in two - exclude each other."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def storage_error(error: BaseException):
    """The MailError for a failed store operation (RFC 3463 §3.4)."""
    if isinstance(error, (StorageFull, StorageFailed)):
        return error
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        return StorageFull()
    return StorageFailed()
