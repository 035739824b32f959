"""Message data on the wire: dot-stuffing and line ends (RFC 5321 §4.5.2,
§2.3.8; RFC 1939 §3 uses the same byte-stuffing for POP3 multi-line
responses).

Every function here is one or a few C-speed passes over the whole message:
never a Python call per line (a 1 MiB message has ~20,000 of them) and never
per chunk (stuffing per chunk is how a "." line at a chunk boundary escapes:
SMTP smuggling, docs/twisted.md §0.1).

Forms: the spool and what is relayed hold CRLF line ends; the store and the
SMTP server's DATA handling use LF (one octet fewer per line to scan and
keep). `to_lf` / `to_crlf` convert between the two and assume the input is
already canonical (no bare CR, no bare LF); `canonical_line_ends` makes
anything canonical.
"""
from __future__ import annotations

import re

# The end of the DATA payload (after the last CRLF of the message) and of a
# POP3 multi-line response.
END = b".\r\n"

_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")


def to_lf(crlf: bytes) -> bytes:
    """CRLF line ends -> LF."""
    return crlf.replace(b"\r\n", b"\n")


def to_crlf(lf: bytes) -> bytes:
    """LF line ends -> CRLF (the input has no CR)."""
    return lf.replace(b"\n", b"\r\n")


def canonical_line_ends(message: bytes) -> bytes:
    """CRLF everywhere: every bare CR and every bare LF becomes CRLF. A bare
    one passed on could end DATA early at a lenient next hop
    (CVE-2023-51764/-51765/-51766 smuggling), so the outbound client never
    passes one on. Already canonical data (the spool's) costs three counts
    and no copy."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") == crlf and message.count(b"\n") == crlf:
        return message
    return _ANY_LINE_END.sub(b"\r\n", message)


def stuff(crlf: bytes) -> bytes:
    """Byte-stuffing of CRLF data: every line that starts with "." gets
    another "." in front, the first line included; then CRLF at the end if
    the data does not end in one, so that the terminator ".\\r\\n" always
    starts a line of its own. Empty data stays empty.

    The body of an SMTP DATA payload (dot_stuff) and of a POP3 RETR/TOP
    response (RFC 1939 §3)."""
    stuffed = (b"\r\n" + crlf).replace(b"\r\n.", b"\r\n..")[2:]
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


def dot_stuff(crlf: bytes) -> bytes:
    """The whole DATA payload for a CRLF message: stuff(crlf), then ".\\r\\n"
    (RFC 5321 §4.5.2, §4.1.1.4). An empty message is just ".\\r\\n"."""
    return stuff(crlf) + END


def unstuff_lf(lf):
    """Undo the stuffing of LF-ended data (bytes or bytearray): one leading
    "." is removed from every line, the first one included.

    A leading LF counts as the end of a line before the data: the SMTP
    server scans DATA from a virtual CRLF (so that a first line of "." ends
    the data), converts it with the rest and passes it in; it comes back."""
    if lf.startswith(b"."):
        lf = lf[1:]
    return lf.replace(b"\n.", b"\n")


def has_long_line(data, limit: int) -> bool:
    """True if a line of `data` (LF-separated, bytes or bytearray) has more
    than `limit` octets, not counting its LF; a line of exactly `limit`
    octets is fine.

    One backward search per window of limit+1 octets (about len/limit C calls
    in all) instead of splitting a big message into thousands of objects."""
    pos, end = 0, len(data)
    while end - pos > limit:
        newline = data.rfind(b"\n", pos, pos + limit + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False
