"""FETCH attributes (RFC 3501 §6.4.5): parsing them and rendering one message.

Fixed against Twisted's FETCH engine (docs/twisted.md §4.1, #5613):
a partial `BODY[...]<o.n>` returns exactly that slice, labelled `<o>`;
`BODY[n]` of a single-part message is its body and a part that does not exist
is NIL instead of an exception that drops the connection.
"""
from __future__ import annotations

import re

from mailgw.imap import message as mime
from mailgw.imap.parser import ParseError, Reader
from mailgw.imap.wire import astring, flag_list, internaldate, literal, sorted_flags

UID, FLAGS, INTERNALDATE, SIZE, ENVELOPE, BODYSTRUCTURE, BODY, SECTION = (
    "UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY", "SECTION")

_SIMPLE = {
    "UID": UID, "FLAGS": FLAGS, "INTERNALDATE": INTERNALDATE, "RFC822.SIZE": SIZE,
    "ENVELOPE": ENVELOPE, "BODYSTRUCTURE": BODYSTRUCTURE,
}
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SECTION = re.compile(rb"((?:[1-9]\d{0,8})(?:\.[1-9]\d{0,8}){0,63})?(?:(?<=\d)\.)?"
                      rb"(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?", re.I)
_PARTIAL = re.compile(rb"<(\d{1,10})\.(\d{1,10})>")
_MAX_FIELDS = 512


class Item:
    __slots__ = ("kind", "peek", "path", "spec", "fields", "partial", "label")

    def __init__(self, kind: str, *, peek=True, path=(), spec="", fields=frozenset(),
                 partial=None, label=b""):
        self.kind = kind
        self.peek = peek
        self.path = path
        self.spec = spec
        self.fields = fields
        self.partial = partial
        self.label = label or kind.encode("ascii")

    @property
    def header_only(self) -> bool:
        """Served from the cached top-level header, without the message."""
        return self.kind == SECTION and not self.path and self.spec.startswith("HEADER")


def parse_items(reader: Reader) -> list[Item]:
    if reader.peek() == 0x28:           # "("
        reader.open_paren()
        items = [_item(reader)]
        while not reader.maybe(b")"):
            reader.sp()
            items.append(_item(reader))
        reader.leave()
        return items
    name = reader.peek_bytes(4).upper()
    if name[:3] in (b"ALL", b"FAS", b"FUL"):
        m = _NAME.match(reader.text, reader.pos)
        word = m.group(0).decode("ascii").upper() if m else ""
        if word in _MACROS:
            reader.pos = m.end()
            return [Item(_SIMPLE.get(n, BODY if n == "BODY" else n)) for n in _MACROS[word]]
    return [_item(reader)]


def _item(reader: Reader) -> Item:
    m = _NAME.match(reader.text, reader.pos)
    if not m:
        raise ParseError("Expected a FETCH attribute")
    reader.pos = m.end()
    name = m.group(0).decode("ascii").upper()
    if name in _SIMPLE:
        return Item(_SIMPLE[name])
    if name == "RFC822":
        return Item(SECTION, peek=False, label=b"RFC822")
    if name == "RFC822.HEADER":
        return Item(SECTION, peek=True, spec="HEADER", label=b"RFC822.HEADER")
    if name == "RFC822.TEXT":
        return Item(SECTION, peek=False, spec="TEXT", label=b"RFC822.TEXT")
    if name in ("BODY", "BODY.PEEK"):
        if reader.peek() != 0x5B:       # "["
            if name == "BODY":
                return Item(BODY)
            raise ParseError("BODY.PEEK needs a section")
        return _section(reader, peek=(name == "BODY.PEEK"))
    raise ParseError(f"Unknown FETCH attribute {name[:40]}")


def _section(reader: Reader, peek: bool) -> Item:
    reader.expect(b"[")
    m = _SECTION.match(reader.text, reader.pos)
    path_text, spec_text = m.group(1), m.group(2)
    reader.pos = m.end()
    path = tuple(int(number) for number in path_text.split(b".")) if path_text else ()
    if path_text and spec_text is None and m.group(0).endswith(b"."):
        raise ParseError("Invalid section")
    spec = spec_text.decode("ascii").upper() if spec_text else ""
    if spec == "MIME" and not path:
        raise ParseError("MIME needs a part number")
    fields: list[bytes] = []
    if spec.startswith("HEADER.FIELDS"):
        reader.sp()
        reader.open_paren()
        fields.append(reader.astring())
        while not reader.maybe(b")"):
            reader.sp()
            fields.append(reader.astring())
            if len(fields) > _MAX_FIELDS:
                raise ParseError("Too many header fields")
        reader.leave()
    reader.expect(b"]")
    partial = None
    partial_label = b""
    if reader.peek() == 0x3C:           # "<"
        p = _PARTIAL.match(reader.text, reader.pos)
        if not p:
            raise ParseError("Invalid partial")
        offset, length = int(p.group(1)), int(p.group(2))
        if length == 0 or offset > 2**32 - 1 or length > 2**32 - 1:
            raise ParseError("Invalid partial")
        reader.pos = p.end()
        partial = (offset, length)
        partial_label = b"<%d>" % offset   # RFC 3501 §7.4.2: only the origin octet
    section = b".".join(b"%d" % n for n in path)
    if spec:
        section += (b"." if section else b"") + spec.encode("ascii")
    if fields:
        section += b" (" + b" ".join(astring(name) for name in fields) + b")"
    return Item(SECTION, peek=peek, path=path, spec=spec,
                fields=frozenset(name.lower() for name in fields),
                partial=partial, label=b"BODY[" + section + b"]" + partial_label)


class Plan:
    """What a FETCH needs, decided once for all its messages."""

    def __init__(self, items: list[Item], uid_mode: bool):
        if uid_mode and not any(item.kind == UID for item in items):
            items = [Item(UID)] + items         # RFC 3501 §6.4.8: UID FETCH always returns UID
        self.items = items
        self.uid_mode = uid_mode
        self.sets_seen = any(item.kind == SECTION and not item.peek for item in items)
        self.wants_flags = any(item.kind == FLAGS for item in items)
        self.wants_header = any(item.kind == ENVELOPE or item.header_only for item in items)
        self.wants_content = any(item.kind == SECTION and not item.header_only for item in items)
        self.wants_structure = any(item.kind in (BODYSTRUCTURE, BODY) for item in items)

    def needs_content(self, parsed) -> bool:
        if self.wants_content:
            return True
        if parsed is None:
            return self.wants_header or self.wants_structure
        if self.wants_structure:
            return any((item.kind == BODYSTRUCTURE and parsed.structure is None)
                       or (item.kind == BODY and parsed.body is None) for item in self.items)
        return False


def render(plan: Plan, seq: int, info, flags, parsed, data: bytes | None, add_flags: bool) -> bytes:
    """`* seq FETCH (...)` for one message. `flags`: its flags including
    \\Recent; `parsed`: the cached mime.Parsed (or None when not needed);
    `data`: the message when the plan needs it; `add_flags`: append FLAGS
    (an implicit \\Seen changed them, RFC 3501 §6.4.5)."""
    out = []
    root = None
    for item in plan.items:
        kind = item.kind
        if kind == UID:
            out.append(b"UID %d" % info.uid)
        elif kind == FLAGS:
            out.append(b"FLAGS " + flag_list(sorted_flags(flags)))
        elif kind == SIZE:
            out.append(b"RFC822.SIZE %d" % info.size)
        elif kind == INTERNALDATE:
            out.append(b"INTERNALDATE " + internaldate(info.internaldate))
        elif kind == ENVELOPE:
            out.append(b"ENVELOPE " + parsed.get_envelope())
        elif kind == BODYSTRUCTURE:
            if parsed.structure is None:
                root = root or mime.parse_mime(data)
                parsed.structure = mime.body_structure(data, root, extended=True)
            out.append(b"BODYSTRUCTURE " + parsed.structure)
        elif kind == BODY:
            if parsed.body is None:
                root = root or mime.parse_mime(data)
                parsed.body = mime.body_structure(data, root, extended=False)
            out.append(b"BODY " + parsed.body)
        else:
            if item.header_only and parsed is not None:
                header = parsed.header
                value = header.raw if item.spec == "HEADER" else \
                    header.select(item.fields, exclude=item.spec.endswith(".NOT"))
            elif not item.path and item.spec == "":
                value = data
            else:
                root = root or mime.parse_mime(data)
                value = mime.section_bytes(data, root, item.path, item.spec, item.fields)
            if value is None:
                out.append(item.label + b" NIL")
                continue
            if item.partial is not None:
                offset, length = item.partial
                value = value[offset:offset + length]
            out.append(item.label + b" " + literal(value))
    if add_flags and not plan.wants_flags:
        out.append(b"FLAGS " + flag_list(sorted_flags(flags)))
    return b"* %d FETCH (" % seq + b" ".join(out) + b")\r\n"
