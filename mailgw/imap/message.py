"""What IMAP needs to know about a message's text: header fields, the MIME
tree, ENVELOPE and BODYSTRUCTURE, and a bounded cache of all that.

Messages arrive as bytes in wire form (CRLF line ends, IFolder.open). The MIME
parser works on offsets into those bytes (no copies of parts), is iterative
in breadth and bounded in depth (MAX_MIME_DEPTH), and never raises on
malformed input: whatever it cannot make sense of becomes an opaque leaf.

Twisted's equivalents (`imap4.getEnvelope`, `getBodyStructure`) work on its
IMessagePart objects, re-read the body for every line count and describe a
message without Content-Type as (NIL NIL ...) (docs/twisted.md
§4.1); these follow RFC 3501 §7.4.2 and RFC 2045 §5.2 instead.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
from collections import OrderedDict
from email.utils import parsedate_tz
from typing import Any

from mailgw.imap.wire import nstring, string

# RFC 2046 §5.1.1 allows 70-character boundaries; deeper nesting than this is
# not mail, it is an attack on the parser.
MAX_MIME_DEPTH = 24
MAX_PARTS = 1000

# A header field: name, colon, value, continuation lines (RFC 5322 §2.2, §2.2.3).
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*(?:\r\n)?", re.M)
_UNFOLD = re.compile(rb"\r\n(?=[ \t])")


def split_header(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Offset just past the header block (including its empty line)."""
    if end is None:
        end = len(data)
    if data.startswith(b"\r\n", start):
        return start + 2
    index = data.find(b"\r\n\r\n", start, end)
    return end if index < 0 else index + 4


def parse_fields(header: bytes) -> list[tuple[bytes, int, int]]:
    """(lower-case name, start, end) of each field of a header block."""
    return [(m.group(1).lower(), m.start(), m.end()) for m in _FIELD.finditer(header)]


def field_value(header: bytes, start: int, end: int) -> bytes:
    value = header[header.index(b":", start, end) + 1:end]
    if b"\r\n" in value[:-2]:
        value = _UNFOLD.sub(b"", value)
    return value.strip(b" \t\r\n")


class Header:
    """A parsed header block."""

    __slots__ = ("raw", "fields", "_index")

    def __init__(self, raw: bytes):
        self.raw = raw
        self.fields = parse_fields(raw)
        self._index: dict[bytes, list] | None = None     # name -> [(start, end)]

    def values(self, name: bytes) -> list[bytes]:
        """Unfolded values of every field called `name` (lower case)."""
        if self._index is None:
            index: dict[bytes, list] = {}
            for lname, start, end in self.fields:
                spans = index.get(lname)
                if spans is None:
                    index[lname] = [(start, end)]
                else:
                    spans.append((start, end))
            self._index = index
        spans = self._index.get(name)
        if not spans:
            return []
        raw = self.raw
        return [field_value(raw, start, end) for start, end in spans]

    def first(self, name: bytes) -> bytes | None:
        values = self.values(name)
        return values[0] if values else None

    def select(self, names: frozenset[bytes], exclude: bool) -> bytes:
        """BODY[HEADER.FIELDS (...)] / HEADER.FIELDS.NOT: the raw lines, then
        the empty line (RFC 3501 §6.4.5)."""
        raw = self.raw
        lines = [raw[start:end] for lname, start, end in self.fields if (lname in names) != exclude]
        out = b"".join(line if line.endswith(b"\r\n") else line + b"\r\n" for line in lines)
        return out + b"\r\n"


# --- structured header values ---------------------------------------------------

# RFC 5322 §3.2: quoted strings, comments, domain literals, specials, atoms (dots included).
_ADDRESS_TOKEN = re.compile(
    rb'\s*(?:("(?:[^"\\]|\\.)*"?)|(\((?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*\)?)|(\[[^\]]*\]?)|([<>@,;:])'
    rb'|([^\s"()<>@,;:\[\]]+))', re.S)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.S)
MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"


def _unquote(token: bytes) -> bytes:
    body = token[1:-1] if token.endswith(b'"') and len(token) > 1 else token[1:]
    return _QUOTED_PAIR.sub(rb"\1", body)


# The forms nearly all mail uses, one address without groups, routes or
# comments: "local@domain", "<local@domain>", "Name <local@domain>",
# "\"Name\" <local@domain>". Anything else takes the general path.
_SIMPLE_ADDRESS = re.compile(
    rb'\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^"<>()\[\],;:@\\]*?))\s*<([^<>@\s"(),;:\\\[\]]+)@([^<>@\s"(),;:\\\[\]]+)>\s*\Z'
    rb'|\s*([^<>@\s"(),;:\\\[\]]+)@([^<>@\s"(),;:\\\[\]]+)\s*\Z')


def parse_address_list(value: bytes) -> list[tuple]:
    """RFC 3501 §7.4.2 address structures (name, adl, mailbox, host), with
    group start (NIL NIL name NIL) and end (NIL NIL NIL NIL) markers."""
    simple = _SIMPLE_ADDRESS.match(value)
    if simple:
        quoted_name, bare_name, local, domain, plain_local, plain_domain = simple.groups()
        if plain_local is not None:
            return [(None, None, plain_local, plain_domain)]
        if quoted_name is not None:
            name = _QUOTED_PAIR.sub(rb"\1", quoted_name)
        else:
            name = b" ".join(bare_name.split()) or None
        return [(name, None, local, domain)]
    return parse_address_list_general(value)


def parse_address_list_general(value: bytes) -> list[tuple]:
    """The full RFC 5322 §3.4 address-list parse (groups, routes, comments)."""
    tokens = []
    for m in _ADDRESS_TOKEN.finditer(value):
        if m.group(1) is not None:
            tokens.append(("q", m.group(1)))
        elif m.group(2) is not None:
            tokens.append(("c", m.group(2)))
        elif m.group(3) is not None:
            tokens.append(("a", m.group(3)))
        elif m.group(4) is not None:
            tokens.append(("s", m.group(4)))
        elif m.group(5) is not None:
            tokens.append(("a", m.group(5)))
    result: list[tuple] = []
    current: list[tuple[str, bytes]] = []
    in_angle = in_group = False
    for kind, text in tokens:
        if kind == "s" and text == b"<":
            in_angle = True
        elif kind == "s" and text == b">":
            in_angle = False
        elif kind == "s" and text == b":" and not in_angle and not in_group and _is_phrase(current):
            result.append((None, None, _phrase(current) or b"", None))
            current = []
            in_group = True
            continue
        elif kind == "s" and text == b";" and in_group and not in_angle:
            _flush_mailbox(current, result)
            current = []
            result.append((None, None, None, None))
            in_group = False
            continue
        elif kind == "s" and text == b"," and not in_angle:
            _flush_mailbox(current, result)
            current = []
            continue
        current.append((kind, text))
    _flush_mailbox(current, result)
    if in_group:
        result.append((None, None, None, None))
    return result


def _is_phrase(tokens) -> bool:
    return bool(tokens) and all(kind in ("a", "q", "c") for kind, _ in tokens)


def _phrase(tokens) -> bytes | None:
    words = [_unquote(text) if kind == "q" else text for kind, text in tokens if kind in ("a", "q")]
    return b" ".join(words) if words else None


def _flush_mailbox(tokens, result) -> None:
    if not any(kind != "c" for kind, _ in tokens):
        return
    kinds = [text for kind, text in tokens if kind == "s"]
    if b"<" in kinds:
        lt = next(i for i, (kind, text) in enumerate(tokens) if kind == "s" and text == b"<")
        name = _phrase(tokens[:lt])
        inner = []
        for kind, text in tokens[lt + 1:]:
            if kind == "s" and text == b">":
                break
            inner.append((kind, text))
        adl = None
        colon = next((i for i, (kind, text) in enumerate(inner) if kind == "s" and text == b":"), None)
        if colon is not None and inner and inner[0] == ("s", b"@"):
            adl = b"".join(text for kind, text in inner[:colon] if kind != "c")
            inner = inner[colon + 1:]
        mailbox, host = _addr_spec(inner)
        if mailbox is None and host is None and name is None:
            return
        result.append((name, adl, mailbox or MISSING_MAILBOX, host or MISSING_DOMAIN))
        return
    comments = [text for kind, text in tokens if kind == "c"]
    mailbox, host = _addr_spec(tokens)
    name = None
    if comments:
        name = _QUOTED_PAIR.sub(rb"\1", comments[-1][1:-1]).strip() or None
    result.append((name, None, mailbox or MISSING_MAILBOX, host or MISSING_DOMAIN))


def _addr_spec(tokens) -> tuple[bytes | None, bytes | None]:
    at = None
    for index in range(len(tokens) - 1, -1, -1):
        if tokens[index] == ("s", b"@"):
            at = index
            break
    local_tokens = tokens if at is None else tokens[:at]
    local = b"".join(text for kind, text in local_tokens if kind in ("a", "q")) or None
    if at is None:
        return local, None
    host = b"".join(text for kind, text in tokens[at + 1:] if kind == "a") or None
    return local, host


def _address_structure(value: bytes | None) -> bytes:
    if value is None:
        return b"NIL"
    addresses = parse_address_list(value)
    if not addresses:
        return b"NIL"
    return b"(" + b"".join(
        b"(" + b" ".join(nstring(part) for part in address) + b")" for address in addresses) + b")"


def envelope(header: Header) -> bytes:
    """RFC 3501 §7.4.2 ENVELOPE. Sender and Reply-To default to From."""
    first = header.first
    from_value = first(b"from")
    from_structure = _address_structure(from_value)
    sender, reply_to = first(b"sender"), first(b"reply-to")
    return b"(" + b" ".join((
        nstring(first(b"date")),
        nstring(first(b"subject")),
        from_structure,
        from_structure if sender is None or sender == from_value else _address_structure(sender),
        from_structure if reply_to is None or reply_to == from_value else _address_structure(reply_to),
        _address_structure(first(b"to")),
        _address_structure(first(b"cc")),
        _address_structure(first(b"bcc")),
        nstring(first(b"in-reply-to")),
        nstring(first(b"message-id")),
    )) + b")"


# RFC 2045 §5.1: type "/" subtype *(";" parameter); parameter values may be quoted.
_CTYPE = re.compile(rb'\s*([^\s/;()"]+)\s*/\s*([^\s;()"]+)')
_PARAM = re.compile(rb'\s*;\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^\s;"]*)', re.S)
_DISPOSITION = re.compile(rb'\s*([^\s;()"]+)')
_COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)")


def _params(value: bytes, start: int) -> list[tuple[bytes, bytes]]:
    params = []
    for m in _PARAM.finditer(value, start):
        raw = m.group(2)
        params.append((m.group(1), _unquote(raw) if raw.startswith(b'"') else raw))
        if len(params) >= 64:
            break
    return params


def parse_content_type(value: bytes | None, default: tuple[bytes, bytes]):
    """(type, subtype, [(name, value)]); the default per RFC 2045 §5.2 when
    the field is missing or unparseable."""
    if value is None:
        if default[0].lower() == b"text":
            return default[0], default[1], [(b"CHARSET", b"US-ASCII")]
        return default[0], default[1], []
    value = _COMMENT.sub(b"", value)
    m = _CTYPE.match(value)
    if not m:
        return b"TEXT", b"PLAIN", [(b"CHARSET", b"US-ASCII")]
    return m.group(1), m.group(2), _params(value, m.end())


def _param_list(params) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(string(name) + b" " + string(value) for name, value in params) + b")"


class Entity:
    """One MIME entity inside `data`: header [start, header_end), body [header_end, end)."""

    __slots__ = ("start", "header_end", "end", "header", "type", "subtype", "params", "children",
                 "encapsulated")

    def __init__(self, start, header_end, end, header, ctype, subtype, params):
        self.start = start
        self.header_end = header_end
        self.end = end
        self.header = header
        self.type = ctype
        self.subtype = subtype
        self.params = params
        self.children: list[Entity] = []
        self.encapsulated: Entity | None = None

    @property
    def is_multipart(self) -> bool:
        return self.type.lower() == b"multipart"


def parse_mime(data: bytes) -> Entity:
    """The MIME tree of a whole message."""
    budget = [MAX_PARTS]
    return _parse_entity(data, 0, len(data), 0, (b"TEXT", b"PLAIN"), budget)


def _parse_entity(data: bytes, start: int, end: int, depth: int, default, budget) -> Entity:
    header_end = split_header(data, start, end)
    header = Header(data[start:header_end])
    ctype, subtype, params = parse_content_type(header.first(b"content-type"), default)
    entity = Entity(start, header_end, end, header, ctype, subtype, params)
    budget[0] -= 1
    if depth >= MAX_MIME_DEPTH or budget[0] <= 0:
        return entity
    lower_type, lower_sub = ctype.lower(), subtype.lower()
    if lower_type == b"multipart":
        boundary = next((value for name, value in params if name.lower() == b"boundary"), None)
        child_default = (b"MESSAGE", b"RFC822") if lower_sub == b"digest" else (b"TEXT", b"PLAIN")
        if boundary:
            for part_start, part_end in _split_multipart(data, header_end, end, boundary):
                if budget[0] <= 0:
                    break
                entity.children.append(
                    _parse_entity(data, part_start, part_end, depth + 1, child_default, budget))
    elif lower_type == b"message" and lower_sub in (b"rfc822", b"global"):
        entity.encapsulated = _parse_entity(data, header_end, end, depth + 1, (b"TEXT", b"PLAIN"), budget)
    return entity


def _split_multipart(data: bytes, start: int, end: int, boundary: bytes):
    """(start, end) of each body part between the delimiter lines (RFC 2046 §5.1.1)."""
    delimiter = b"--" + boundary
    parts = []
    part_start = None
    position = start
    while position < end:
        index = data.find(delimiter, position, end)
        if index < 0:
            break
        position = index + len(delimiter)
        if index != start and data[index - 2:index] != b"\r\n":
            continue
        line_end = data.find(b"\r\n", position, end)
        line_end = end if line_end < 0 else line_end
        closing = data.startswith(b"--", position)
        if not closing and data[position:line_end].strip(b" \t"):
            continue          # a longer boundary that merely starts with ours
        if part_start is not None:
            parts.append((part_start, max(part_start, index - 2 if index != start else index)))
        if closing:
            return parts
        part_start = min(line_end + 2, end)
        position = part_start
        if len(parts) >= MAX_PARTS:
            return parts
    if part_start is not None:
        parts.append((part_start, end))    # no closing delimiter: the rest is the last part
    return parts


def _line_count(data: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    lines = data.count(b"\r\n", start, end)
    return lines if data.endswith(b"\r\n", start, end) else lines + 1


def body_structure(data: bytes, entity: Entity, extended: bool) -> bytes:
    """RFC 3501 §7.4.2 BODYSTRUCTURE (extended) or BODY (not extended)."""
    header = entity.header
    if entity.is_multipart:
        children = entity.children or [_EMPTY_TEXT]
        out = b"".join(body_structure(data, child, extended) if child is not _EMPTY_TEXT
                       else _EMPTY_TEXT_STRUCTURE[extended] for child in children)
        out += b" " + string(entity.subtype)
        if extended:
            out += b" " + b" ".join((_param_list(entity.params), _disposition(header),
                                     _language(header), nstring(header.first(b"content-location"))))
        return b"(" + out + b")"
    encoding = header.first(b"content-transfer-encoding") or b"7BIT"
    fields = [string(entity.type), string(entity.subtype), _param_list(entity.params),
              nstring(header.first(b"content-id")), nstring(header.first(b"content-description")),
              string(encoding.strip()), b"%d" % (entity.end - entity.header_end)]
    lower_type = entity.type.lower()
    if entity.encapsulated is not None:
        inner = entity.encapsulated
        fields += [envelope(inner.header), body_structure(data, inner, extended),
                   b"%d" % _line_count(data, entity.header_end, entity.end)]
    elif lower_type == b"text":
        fields.append(b"%d" % _line_count(data, entity.header_end, entity.end))
    if extended:
        fields += [nstring(header.first(b"content-md5")), _disposition(header), _language(header),
                   nstring(header.first(b"content-location"))]
    return b"(" + b" ".join(fields) + b")"


_EMPTY_TEXT = object()
_EMPTY_TEXT_STRUCTURE = {
    False: b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)',
    True: b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0 NIL NIL NIL NIL)',
}


def _disposition(header: Header) -> bytes:
    value = header.first(b"content-disposition")
    if value is None:
        return b"NIL"
    value = _COMMENT.sub(b"", value)
    m = _DISPOSITION.match(value)
    if not m:
        return b"NIL"
    return b"(" + string(m.group(1)) + b" " + _param_list(_params(value, m.end())) + b")"


def _language(header: Header) -> bytes:
    value = header.first(b"content-language")
    if value is None:
        return b"NIL"
    tags = [tag.strip() for tag in _COMMENT.sub(b"", value).split(b",") if tag.strip()]
    if not tags:
        return b"NIL"
    if len(tags) == 1:
        return string(tags[0])
    return b"(" + b" ".join(string(tag) for tag in tags) + b")"


# --- sections (RFC 3501 §6.4.5 BODY[section]) -----------------------------------------

def resolve_part(root: Entity, path: tuple[int, ...]) -> tuple[Entity, bool] | None:
    """The entity a part number names, and whether it is a message (True only
    for the root with an empty path). Part 1 of a non-multipart message is
    its body; the parts of a message/rfc822 part are its message's parts."""
    entity, is_message = root, True
    for number in path:
        if entity.children:
            if number > len(entity.children):
                return None
            entity, is_message = entity.children[number - 1], False
        elif is_message:
            if number != 1:
                return None
            is_message = False
        elif entity.encapsulated is not None:
            inner = entity.encapsulated
            if inner.children:
                if number > len(inner.children):
                    return None
                entity = inner.children[number - 1]
            elif number == 1:
                entity = inner
            else:
                return None
        else:
            return None
    return entity, is_message


def section_bytes(data: bytes, root: Entity, path: tuple[int, ...], spec: str,
                  fields: frozenset[bytes]) -> bytes | None:
    """The octets of BODY[path.spec]; None when the section does not exist."""
    if not path:
        if spec == "":
            return data
        target = root
    else:
        found = resolve_part(root, path)
        if found is None:
            return None
        entity, _ = found
        if spec == "":
            return data[entity.header_end:entity.end]
        if spec == "MIME":
            return data[entity.start:entity.header_end]
        # HEADER / TEXT / HEADER.FIELDS of a part: the part must be a message.
        target = entity.encapsulated
        if target is None:
            return None
    if spec == "HEADER":
        return data[target.start:target.header_end]
    if spec == "TEXT":
        return data[target.header_end:target.end]
    if spec == "HEADER.FIELDS":
        return target.header.select(fields, exclude=False)
    if spec == "HEADER.FIELDS.NOT":
        return target.header.select(fields, exclude=True)
    return None


# --- decoding for SEARCH -------------------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(rb"(\?=)\s+(=\?)")


def _codec(charset: bytes) -> str:
    name = charset.split(b"*", 1)[0].decode("ascii", "replace").strip().lower()
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def decode_header_text(value: bytes) -> str:
    """A header value as text: RFC 2047 encoded words decoded, the rest UTF-8."""
    if b"=?" not in value:
        return value.decode("utf-8", "replace")
    value = _BETWEEN_WORDS.sub(rb"\1\2", value)
    out = []
    position = 0
    for m in _ENCODED_WORD.finditer(value):
        out.append(value[position:m.start()].decode("utf-8", "replace"))
        charset, kind, text = m.groups()
        try:
            if kind in b"bB":
                raw = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
            else:
                raw = quopri.decodestring(text.replace(b"_", b" "), header=True)
            out.append(raw.decode(_codec(charset), "replace"))
        except (binascii.Error, ValueError, LookupError):
            out.append(m.group(0).decode("ascii", "replace"))
        position = m.end()
    out.append(value[position:].decode("utf-8", "replace"))
    return "".join(out)


def body_text(data: bytes, root: Entity) -> str:
    """The message body as searchable text: text parts decoded from their
    transfer encoding and charset, other leaves as they are."""
    pieces: list[str] = []
    stack = [root]
    while stack:
        entity = stack.pop()
        if entity.children:
            stack.extend(reversed(entity.children))
            continue
        if entity.encapsulated is not None and entity is not root:
            inner = entity.encapsulated
            pieces.append(decode_header_text(_UNFOLD.sub(b"", data[inner.start:inner.header_end])))
            stack.append(inner)
            continue
        raw = data[entity.header_end:entity.end]
        encoding = (entity.header.first(b"content-transfer-encoding") or b"").strip().lower()
        try:
            if encoding == b"base64":
                raw = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", raw) + b"==", validate=False)
            elif encoding == b"quoted-printable":
                raw = quopri.decodestring(raw)
        except (binascii.Error, ValueError):
            pass
        charset = next((value for name, value in entity.params if name.lower() == b"charset"), b"utf-8")
        pieces.append(raw.decode(_codec(charset), "replace"))
    return "\n".join(pieces)


def sent_date(header: Header) -> tuple[int, int, int] | None:
    """(year, month, day) of the Date: field as written (RFC 3501 SENTON etc.)."""
    value = header.first(b"date")
    if value is None:
        return None
    try:
        parsed = parsedate_tz(value.decode("ascii", "replace"))
    except (ValueError, IndexError, TypeError):
        return None
    if not parsed:
        return None
    return parsed[0], parsed[1], parsed[2]


# --- the cache ---------------------------------------------------------------------------

class Parsed:
    """What is cached per message: the header and what was derived from it."""

    __slots__ = ("header", "envelope", "structure", "body", "weight")

    def __init__(self, header: Header):
        self.header = header
        self.envelope: bytes | None = None
        self.structure: bytes | None = None       # BODYSTRUCTURE
        self.body: bytes | None = None            # BODY (non-extensible)
        # The header is held about three times (raw, field index, values), the
        # ENVELOPE and structures add about as much again: an estimate, fixed at
        # insertion so the cache's account stays exact.
        self.weight = 5 * len(header.raw) + 400

    def get_envelope(self) -> bytes:
        if self.envelope is None:
            self.envelope = envelope(self.header)
        return self.envelope


def parse_header_of(data: bytes) -> Parsed:
    return Parsed(Header(data[:split_header(data)]))


class MessageCache:
    """Least-recently-used map (folder key, uid) -> Parsed, bounded by an
    estimate of the memory it holds. One per process (shared by listeners)."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Any, Parsed] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key) -> Parsed | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key, entry: Parsed) -> Parsed:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.weight
        self._entries[key] = entry
        self.bytes += entry.weight
        self.trim()
        return entry

    def discard(self, key) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.weight

    def trim(self) -> None:
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.weight
