"""Command arguments (RFC 3501 §9 formal syntax), read from a framed command.

The server's framing (server.py) has already split a command into its text
segments and literals: `[text0, literal0, text1, literal1, ..., textN]`, where
each text segment but the last ended in a literal marker `{n}`/`{n+}` (marker
and CRLF removed). A `Reader` walks that list; a literal is read where the
grammar allows a string and the current text segment has ended. Nothing here
recurses on client input without a bound: parenthesised lists count depth
against `max_depth`.

Every syntax problem raises ParseError, which the server answers with BAD.
"""
from __future__ import annotations

import calendar
import re

from mailgw.store.events import SYSTEM_FLAGS


class ParseError(Exception):
    """The command does not follow the grammar: tagged BAD."""


MAX_NUMBER = 2**32 - 1          # RFC 3501 §9: number = 1*DIGIT, unsigned 32-bit
STAR = None                     # "*" in a sequence set

# RFC 3501 §9: tag = 1*<any ASTRING-CHAR except "+">
_TAG = re.compile(rb"[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+")
_ATOM = re.compile(rb"[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+")
_ASTRING_ATOM = re.compile(rb"[!#$&'+,\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+")
# list-mailbox: ATOM-CHAR plus list-wildcards (% *) and resp-specials (])
_LIST_ATOM = re.compile(rb"[!#$%&'*+,\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+")
_SEQUENCE = re.compile(rb"[0-9*:,]+")
_SEQ_RANGE = re.compile(rb"(\d{1,10}|\*)(?::(\d{1,10}|\*))?\Z")
_NUMBER = re.compile(rb"\d{1,10}")
_KEYWORD = re.compile(rb"[A-Za-z0-9.\-]+")
_MONTHS = {name: index for index, name in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"), 1)}
_DATE_TIME = re.compile(
    rb'"([ \d]?\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"')
_DATE = re.compile(rb'(\d{1,2})-([A-Za-z]{3})-(\d{4})')
_CANONICAL_FLAGS = {flag.lower(): flag for flag in SYSTEM_FLAGS}


class Reader:
    def __init__(self, segments: list[bytes], max_depth: int = 32):
        self.segments = segments
        self.index = 0
        self.text = segments[0]
        self.pos = 0
        self.max_depth = max_depth
        self.depth = 0

    # -- position -----------------------------------------------------------
    def peek(self) -> int | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def peek_bytes(self, count: int) -> bytes:
        return self.text[self.pos:self.pos + count]

    def at_literal(self) -> bool:
        return self.pos == len(self.text) and self.index + 1 < len(self.segments)

    def at_end(self) -> bool:
        return self.pos == len(self.text) and self.index == len(self.segments) - 1

    def end(self) -> None:
        if not self.at_end():
            raise ParseError("Unexpected extra arguments")

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise ParseError("Expected a space")
        self.pos += 1

    def maybe_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def expect(self, char: bytes) -> None:
        if self.peek() != char[0]:
            raise ParseError(f"Expected {char.decode()!r}")
        self.pos += 1

    def maybe(self, char: bytes) -> bool:
        if self.peek() == char[0]:
            self.pos += 1
            return True
        return False

    def open_paren(self) -> None:
        self.expect(b"(")
        self.enter()

    def close_paren(self) -> None:
        self.expect(b")")
        self.leave()

    def enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise ParseError("Too deeply nested")

    def leave(self) -> None:
        self.depth -= 1

    def _match(self, pattern: re.Pattern, what: str) -> bytes:
        m = pattern.match(self.text, self.pos)
        if not m:
            raise ParseError(f"Expected {what}")
        self.pos = m.end()
        return m.group(0)

    # -- tokens -------------------------------------------------------------
    def tag(self) -> bytes:
        return self._match(_TAG, "a tag")

    def atom(self) -> bytes:
        return self._match(_ATOM, "an atom")

    def keyword(self) -> str:
        """An atom made of letters, digits, "." and "-", upper-cased (command and key names)."""
        return self._match(_KEYWORD, "a keyword").decode("ascii").upper()

    def literal(self) -> bytes:
        value = self.segments[self.index + 1]
        self.index += 2
        self.text = self.segments[self.index]
        self.pos = 0
        return value

    def quoted(self) -> bytes:
        text = self.text
        if self.peek() != 0x22:
            raise ParseError("Expected a quoted string")
        out = bytearray()
        position = self.pos + 1
        while True:
            end = len(text)
            quote = text.find(b'"', position)
            backslash = text.find(b"\\", position)
            if quote < 0:
                raise ParseError("Unterminated quoted string")
            if 0 <= backslash < quote:
                out += text[position:backslash]
                escaped = text[backslash + 1:backslash + 2]
                if escaped not in (b'"', b"\\"):
                    raise ParseError("Bad escape in quoted string")
                out += escaped
                position = backslash + 2
                if position > end:
                    raise ParseError("Unterminated quoted string")
                continue
            out += text[position:quote]
            self.pos = quote + 1
            break
        if b"\0" in out:
            raise ParseError("NUL in quoted string")
        return bytes(out)

    def string(self) -> bytes:
        if self.peek() == 0x22:
            return self.quoted()
        if self.at_literal():
            return self.literal()
        raise ParseError("Expected a string")

    def astring(self) -> bytes:
        if self.peek() == 0x22 or self.at_literal():
            return self.string()
        return self._match(_ASTRING_ATOM, "a string")

    def nstring(self) -> bytes | None:
        if self.peek_bytes(3).upper() == b"NIL" and not _ASTRING_ATOM.match(self.text, self.pos + 3):
            self.pos += 3
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        if self.peek() == 0x22 or self.at_literal():
            return self.string()
        return self._match(_LIST_ATOM, "a mailbox pattern")

    def number(self) -> int:
        digits = self._match(_NUMBER, "a number")
        following = self.peek()
        if following is not None and 0x30 <= following <= 0x39:
            raise ParseError("Number too large")
        value = int(digits)
        if value > MAX_NUMBER:
            raise ParseError("Number too large")
        return value

    def nz_number(self) -> int:
        value = self.number()
        if value == 0:
            raise ParseError("Expected a number greater than zero")
        return value

    def sequence_set(self) -> tuple[tuple[int | None, int | None], ...]:
        """RFC 3501 §9 sequence-set as (low, high) pairs, STAR for "*".
        Nothing is expanded: "1:4294967295" is one pair."""
        raw = self._match(_SEQUENCE, "a sequence set")
        ranges = []
        for item in raw.split(b","):
            m = _SEQ_RANGE.match(item)
            if not m:
                raise ParseError("Invalid sequence set")
            low = STAR if m.group(1) == b"*" else int(m.group(1))
            high = low if m.group(2) is None else (STAR if m.group(2) == b"*" else int(m.group(2)))
            for value in (low, high):
                if value is not STAR and not 1 <= value <= MAX_NUMBER:
                    raise ParseError("Invalid sequence number")
            ranges.append((low, high))
        return tuple(ranges)

    def flag(self, *, allow_recent: bool = False) -> str:
        if self.maybe(b"\\"):
            name = self._match(_ATOM, "a flag").decode("ascii")
            lowered = "\\" + name.lower()
            if lowered == "\\recent":
                if allow_recent:
                    return "\\Recent"
                raise ParseError("\\Recent cannot be set by clients")
            canonical = _CANONICAL_FLAGS.get(lowered)
            if canonical is None:
                raise ParseError(f"Unknown system flag \\{name}")
            return canonical
        keyword = self._match(_ATOM, "a flag")
        if b"]" in keyword:
            raise ParseError("Invalid keyword")
        return keyword.decode("ascii")

    def flag_list(self) -> list[str]:
        self.open_paren()
        flags = []
        if not self.maybe(b")"):
            while True:
                flags.append(self.flag())
                if self.maybe(b")"):
                    break
                self.sp()
        self.leave()
        return flags

    def date_time(self) -> float:
        """RFC 3501 §9 date-time (APPEND), as a unix time."""
        m = _DATE_TIME.match(self.text, self.pos)
        if not m:
            raise ParseError("Invalid date-time")
        day, month, year, hour, minute, second, sign, zone_h, zone_m = m.groups()
        month_number = _MONTHS.get(month.lower())
        if month_number is None:
            raise ParseError("Invalid month")
        values = (int(year), month_number, int(day), int(hour), int(minute), int(second))
        if not (1 <= values[2] <= 31 and values[3] < 24 and values[4] < 60 and values[5] < 61
                and int(zone_h) < 24 and int(zone_m) < 60 and 1000 <= values[0] <= 9999):
            raise ParseError("Invalid date-time")
        self.pos = m.end()
        offset = (int(zone_h) * 3600 + int(zone_m) * 60) * (1 if sign == b"+" else -1)
        return float(calendar.timegm(values + (0, 0, 0)) - offset)

    def date(self) -> tuple[int, int, int]:
        """RFC 3501 §9 date (SEARCH), quoted or not: (year, month, day)."""
        quoted = self.maybe(b'"')
        m = _DATE.match(self.text, self.pos)
        if not m:
            raise ParseError("Invalid date")
        month = _MONTHS.get(m.group(2).lower())
        day, year = int(m.group(1)), int(m.group(3))
        if month is None or not 1 <= day <= 31:
            raise ParseError("Invalid date")
        self.pos = m.end()
        if quoted:
            self.expect(b'"')
        return year, month, day
