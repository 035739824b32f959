"""Response formatting: the IMAP wire forms of strings, lists and mailbox names.

Twisted's helpers (`imap4.collapseNestedLists`, `_quote`) quote everything,
refuse non-ASCII and decide literal-or-quoted by length only; its
modified-UTF-7 decoder is lenient (unterminated shifts, raw 8-bit bytes). These
are small enough to own, and the strict decoder matters for security: a
mailbox name is a path into the user's directory.
"""
from __future__ import annotations

import base64
import binascii
import re
import time
from typing import Iterable

CRLF = b"\r\n"

# RFC 3501 §9: ATOM-CHAR is any CHAR except atom-specials: ( ) { SP CTL % * " \ ]
_ATOM = re.compile(rb"[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+\Z")
# What may go inside a quoted string on output: TEXT-CHAR (no CR, LF, NUL), 7-bit.
_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*\Z")
# Longer strings go as literals: quoted strings of any size are legal, but
# clients handle literals of any size better.
_MAX_QUOTED = 1024


def quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(value: bytes) -> bytes:
    return b"{%d}\r\n%b" % (len(value), value)


def string(value: bytes) -> bytes:
    """A string: quoted when it can be, else a literal (RFC 3501 §4.3)."""
    if len(value) <= _MAX_QUOTED and _QUOTABLE.match(value):
        return quoted(value)
    return literal(value)


def nstring(value: bytes | None) -> bytes:
    return b"NIL" if value is None else string(value)


def astring(value: bytes) -> bytes:
    if value and _ATOM.match(value) and value.upper() != b"NIL":
        return value
    return string(value)


def is_atom(value: bytes) -> bool:
    return bool(_ATOM.match(value))


def flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(flags).encode("ascii", "replace") + b")"


def sorted_flags(flags: Iterable[str]) -> list[str]:
    """System flags first in a fixed order, then keywords alphabetically."""
    system = [flag for flag in _SYSTEM_ORDER if flag in flags]
    return system + sorted(flag for flag in flags if not flag.startswith("\\"))


_SYSTEM_ORDER = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internaldate(unix: float) -> bytes:
    """RFC 3501 §9 date-time, always in UTC: "dd-Mon-yyyy hh:mm:ss +0000"."""
    t = time.gmtime(unix)
    return b'"%2d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def uid_set(uids: Iterable[int]) -> bytes:
    """Ascending UIDs as a compact sequence set: 1:3,7,9:10 (RFC 4315 COPYUID)."""
    parts: list[bytes] = []
    start = previous = None
    for uid in uids:
        if previous is not None and uid == previous + 1:
            previous = uid
            continue
        if start is not None:
            parts.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
        start = previous = uid
    if start is not None:
        parts.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
    return b",".join(parts)


def ordered_uid_set(uids: list[int]) -> bytes:
    """UIDs in the given order (COPYUID's destination set must pair up with the
    source set element by element, RFC 4315 §3), runs compressed."""
    parts: list[bytes] = []
    index = 0
    while index < len(uids):
        end = index
        while end + 1 < len(uids) and uids[end + 1] == uids[end] + 1:
            end += 1
        parts.append(b"%d" % uids[index] if end == index else b"%d:%d" % (uids[index], uids[end]))
        index = end + 1
    return b",".join(parts)


# --- mailbox names: modified UTF-7 (RFC 3501 §5.1.3) ---------------------------

_PRINTABLE = set(range(0x20, 0x7F))


def encode_mailbox(name: str) -> bytes:
    out = bytearray()
    pending: list[str] = []

    def flush():
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.extend(b"&" + base64.b64encode(data).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for char in name:
        code = ord(char)
        if code in _PRINTABLE:
            flush()
            out.extend(b"&-" if char == "&" else char.encode("ascii"))
        else:
            pending.append(char)
    flush()
    return bytes(out)


class BadMailboxName(ValueError):
    pass


def decode_mailbox(raw: bytes) -> str:
    """Strict modified UTF-7. A client that sends raw UTF-8 (not allowed in
    IMAP4rev1, but common) is accepted when the bytes are valid UTF-8 and
    contain no "&" shift."""
    if any(byte >= 0x80 for byte in raw):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMailboxName("mailbox name is neither modified UTF-7 nor UTF-8") from None
        if "&" in text:
            raise BadMailboxName("mailbox name mixes UTF-8 and modified UTF-7")
        return _checked(text)
    out: list[str] = []
    index = 0
    while index < len(raw):
        byte = raw[index]
        if byte != 0x26:          # "&"
            if byte not in _PRINTABLE:
                raise BadMailboxName("control character in mailbox name")
            out.append(chr(byte))
            index += 1
            continue
        end = raw.find(b"-", index + 1)
        if end < 0:
            raise BadMailboxName("unterminated &-shift in mailbox name")
        chunk = raw[index + 1:end]
        index = end + 1
        if not chunk:
            out.append("&")
            continue
        if not re.fullmatch(rb"[A-Za-z0-9+,]+", chunk):
            raise BadMailboxName("bad modified base64 in mailbox name")
        padded = chunk.replace(b",", b"/") + b"=" * (-len(chunk) % 4)
        try:
            data = base64.b64decode(padded, validate=True)
            text = data.decode("utf-16-be")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadMailboxName("bad modified base64 in mailbox name") from None
        # RFC 3501 §5.1.3: printable US-ASCII must not be encoded.
        if not text or any(ord(char) in _PRINTABLE for char in text):
            raise BadMailboxName("needlessly encoded characters in mailbox name")
        out.append(text)
    return _checked("".join(out))


def _checked(name: str) -> str:
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in name):
        raise BadMailboxName("control character in mailbox name")
    return name
