"""SEARCH (RFC 3501 §6.4.4): keys parsed into a tree, evaluated once per message.

Twisted's evaluator re-copies the query for every message and the remaining
message list every five messages (quadratic), compares str headers with bytes
keys, never matches KEYWORD/UNKEYWORD and ignores CHARSET
(docs/twisted.md §4.1, §4.5). This one:

- parses without recursion: an explicit stack, parentheses and NOT counted
  against the session's max depth, OR chains flattened (so evaluation depth
  stays small however long the chain);
- says what it needs (`needs`): flags and sizes only, the header (served from
  the parsed-message cache), or the whole text;
- compares case-insensitively on decoded text: header values with RFC 2047
  encoded words decoded, bodies decoded from their transfer encoding and
  charset; keys in US-ASCII or UTF-8 (anything else: NO [BADCHARSET]).
"""
from __future__ import annotations

import time

from mailgw.imap import message as mime
from mailgw.imap.parser import STAR, ParseError, Reader
from mailgw.store.events import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN

META, HEADER, TEXT = 0, 1, 2
CHARSETS = ("US-ASCII", "UTF-8")


class BadCharset(Exception):
    """NO [BADCHARSET (US-ASCII UTF-8)] (RFC 3501 §6.4.4)."""


_FLAG_KEYS = {
    "ANSWERED": (ANSWERED, True), "DELETED": (DELETED, True), "DRAFT": (DRAFT, True),
    "FLAGGED": (FLAGGED, True), "SEEN": (SEEN, True),
    "UNANSWERED": (ANSWERED, False), "UNDELETED": (DELETED, False), "UNDRAFT": (DRAFT, False),
    "UNFLAGGED": (FLAGGED, False), "UNSEEN": (SEEN, False),
}
_ADDRESS_KEYS = {"BCC": b"bcc", "CC": b"cc", "FROM": b"from", "SUBJECT": b"subject", "TO": b"to"}
_DATE_KEYS = ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE")
_MAX_OR_NESTING = 10_000


class Candidate:
    """One message as SEARCH sees it."""

    __slots__ = ("seq", "uid", "flags", "recent", "size", "internaldate", "header", "data", "_text")

    def __init__(self, seq, uid, info, recent, header=None, data=None):
        self.seq = seq
        self.uid = uid
        self.flags = info.flags
        self.recent = recent
        self.size = info.size
        self.internaldate = info.internaldate
        self.header = header
        self.data = data
        self._text = None

    def body_text(self) -> str:
        if self._text is None:
            root = mime.parse_mime(self.data)
            self._text = mime.body_text(self.data, root).casefold()
        return self._text


class Query:
    def __init__(self, node, needs: int):
        self.node = node
        self.needs = needs
        self.star_seq = 0
        self.max_uid = 0

    def bind(self, count: int, max_uid: int) -> None:
        """What "*" means in sequence sets: the last message of the view."""
        self.star_seq = count
        self.max_uid = max_uid

    def match(self, candidate: Candidate) -> bool:
        return _evaluate(self.node, candidate, self)


def parse(reader: Reader) -> Query:
    """The arguments of SEARCH after the command name's space."""
    charset = "UTF-8"
    if reader.peek_bytes(8).upper() == b"CHARSET ":
        reader.pos += 8
        name = reader.astring().decode("ascii", "replace").upper()
        if name not in CHARSETS:
            raise BadCharset(name)
        charset = name
        reader.sp()
    needs = [META]
    stack: list[list] = [["AND", [], "top"]]
    while True:
        frame = stack[-1]
        if frame[0] == "AND" and frame[1]:
            if frame[2] == "top":
                if reader.at_end():
                    break
                reader.sp()
            elif reader.maybe(b")"):
                reader.leave()
                stack.pop()
                _deliver(stack, _and(frame[1]), reader)
                continue
            else:
                reader.sp()
        if reader.peek() == 0x28:                   # "("
            reader.open_paren()
            stack.append(["AND", [], "paren"])
            continue
        if reader.at_literal() or reader.peek() is None:
            raise ParseError("Expected a search key")
        first = reader.peek()
        if first == 0x2A or 0x30 <= first <= 0x39:  # sequence set
            _deliver(stack, ("SEQ", reader.sequence_set()), reader)
            continue
        key = reader.keyword()
        if key == "OR":
            if len(stack) > _MAX_OR_NESTING:
                raise ParseError("Too deeply nested")
            reader.sp()
            stack.append(["OR", [], None])
            continue
        if key == "NOT":
            reader.enter()
            reader.sp()
            stack.append(["NOT", [], None])
            continue
        _deliver(stack, _simple_key(key, reader, charset, needs), reader)
    return Query(_and(stack[0][1]), max(needs))


def _deliver(stack, node, reader) -> None:
    while True:
        frame = stack[-1]
        if frame[0] == "AND":
            frame[1].append(node)
            return
        if frame[0] == "NOT":
            stack.pop()
            reader.leave()
            node = node[1] if node[0] == "NOT" else ("NOT", node)
            continue
        frame[1].append(node)                       # OR
        if len(frame[1]) == 1:
            reader.sp()
            return
        stack.pop()
        children = []
        for child in frame[1]:
            children.extend(child[1] if child[0] == "OR" else [child])
        node = ("OR", children)


def _and(children):
    flat = []
    for child in children:
        flat.extend(child[1] if child[0] == "AND" else [child])
    return flat[0] if len(flat) == 1 else ("AND", flat)


def _text_arg(reader: Reader, charset: str) -> str:
    raw = reader.astring()
    try:
        text = raw.decode("ascii" if charset == "US-ASCII" else "utf-8")
    except UnicodeDecodeError:
        raise ParseError(f"Search string is not {charset}") from None
    return text.casefold()


def _simple_key(key: str, reader: Reader, charset: str, needs: list) -> tuple:
    if key == "ALL":
        return ("ALL",)
    if key in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[key]
        return ("FLAG", flag, present)
    if key in ("NEW", "OLD", "RECENT"):
        return (key,)
    if key in ("KEYWORD", "UNKEYWORD"):
        reader.sp()
        return ("FLAG", reader.flag(), key == "KEYWORD")
    if key in ("LARGER", "SMALLER"):
        reader.sp()
        return (key, reader.number())
    if key in _DATE_KEYS:
        reader.sp()
        date = reader.date()
        if key.startswith("SENT"):
            needs.append(HEADER)
        return (key, date)
    if key == "UID":
        reader.sp()
        return ("UID", reader.sequence_set())
    if key in _ADDRESS_KEYS:
        reader.sp()
        needs.append(HEADER)
        return ("HEADER", _ADDRESS_KEYS[key], _text_arg(reader, charset))
    if key == "HEADER":
        reader.sp()
        name = reader.astring().lower()
        reader.sp()
        needs.append(HEADER)
        return ("HEADER", name, _text_arg(reader, charset))
    if key in ("BODY", "TEXT"):
        reader.sp()
        needs.append(TEXT)
        return (key, _text_arg(reader, charset))
    raise ParseError(f"Unknown search key {key[:40]}")


def _in_ranges(value: int, ranges, star: int) -> bool:
    for low, high in ranges:
        low = star if low is STAR else low
        high = star if high is STAR else high
        if low > high:
            low, high = high, low
        if low <= value <= high:
            return True
    return False


def _day(unix: float) -> tuple[int, int, int]:
    t = time.gmtime(unix)
    return t.tm_year, t.tm_mon, t.tm_mday


def _header_contains(candidate: Candidate, name: bytes, needle: str) -> bool:
    header = candidate.header
    if header is None:
        return False
    values = header.values(name)
    if not needle:
        return bool(values)
    return any(needle in mime.decode_header_text(value).casefold() for value in values)


def _evaluate(node, c: Candidate, query: Query) -> bool:
    kind = node[0]
    if kind == "FLAG":
        return (node[1] in c.flags) == node[2]
    if kind == "HEADER":
        return _header_contains(c, node[1], node[2])
    if kind == "AND":
        return all(_evaluate(child, c, query) for child in node[1])
    if kind == "OR":
        return any(_evaluate(child, c, query) for child in node[1])
    if kind == "NOT":
        return not _evaluate(node[1], c, query)
    if kind == "ALL":
        return True
    if kind == "SEQ":
        return _in_ranges(c.seq, node[1], query.star_seq)
    if kind == "UID":
        return _in_ranges(c.uid, node[1], query.max_uid)
    if kind == "RECENT":
        return c.recent
    if kind == "NEW":
        return c.recent and SEEN not in c.flags
    if kind == "OLD":
        return not c.recent
    if kind == "LARGER":
        return c.size > node[1]
    if kind == "SMALLER":
        return c.size < node[1]
    if kind in ("BEFORE", "ON", "SINCE"):
        day = _day(c.internaldate)
        return _compare_day(kind, day, node[1])
    if kind in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        day = mime.sent_date(c.header) if c.header is not None else None
        return day is not None and _compare_day(kind[4:], day, node[1])
    if kind == "BODY":
        return c.data is not None and node[1] in c.body_text()
    if kind == "TEXT":
        if c.header is not None and node[1] in mime.decode_header_text(c.header.raw).casefold():
            return True
        return c.data is not None and node[1] in c.body_text()
    raise AssertionError(kind)


def _compare_day(kind: str, day, wanted) -> bool:
    if kind == "BEFORE":
        return day < wanted
    if kind == "ON":
        return day == wanted
    return day >= wanted          # SINCE: on or after

