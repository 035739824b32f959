"""The message a Sieve script looks at (RFC 5228 §2.7.2, §2.7.4, §5.9).

The header section is parsed once; the MIME structure (RFC 5173 body test)
is parsed on first use with the email package.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import email.utils
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage

__all__ = [
    "Address",
    "SieveMessage",
    "parse_date",
    "split_subaddress",
]

MAX_PARTS = 100  # MIME leaf parts looked at by body_text
MAX_TEXT = 1024 * 1024  # characters of decoded body text, in total

TRANSFORMS = ("raw", "text", "content")


@dataclass(frozen=True)
class Address:
    """One address of an address test (RFC 5228 §2.7.4).

    ``all`` is the addr-spec (local-part@domain) without display name or
    comments; ``localpart`` is before the last "@", ``domain`` after it
    ("" when there is no "@").
    """

    all: str
    localpart: str
    domain: str

    @classmethod
    def from_addr_spec(cls, spec: str) -> "Address":
        local, at, domain = spec.rpartition("@")
        if not at:
            return cls(spec, spec, "")
        return cls(spec, local, domain)


def split_subaddress(localpart: str, delimiter: str = "+") -> tuple[str, str | None]:
    """RFC 5233 §4: split a local part into (:user, :detail).

    The user is the text before the first delimiter and the detail the text
    after it; without a delimiter the detail is None (RFC 5233 §4: then
    :detail does not match at all), "user+" gives the empty detail.
    """
    if not delimiter:
        return localpart, None
    user, sep, detail = localpart.partition(delimiter)
    if not sep:
        return localpart, None
    return user, detail


def parse_date(value: str) -> datetime | None:
    """Parse an RFC 5322 date-time (Date: header), None if it is not one."""
    try:
        return email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _decode_words(value: str) -> str:
    """RFC 5228 §2.7.2: header values are compared after RFC 2047 decoding."""
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
        # Unknown charset or a broken encoded word: compare the text as is.
        return value


def _split(data: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line into header section and body."""
    if data.startswith((b"\r\n", b"\n")):
        return b"", data[2:] if data.startswith(b"\r\n") else data[1:]
    candidates = []
    for sep in (b"\r\n\r\n", b"\n\n", b"\r\n\n", b"\n\r\n"):
        i = data.find(sep)
        if i >= 0:
            candidates.append((i, len(sep)))
    if not candidates:
        return data, b""
    i, n = min(candidates)
    return data[:i], data[i + n:]


class SieveMessage:
    """A message as seen by Sieve tests; build it with from_bytes()."""

    def __init__(self, data: bytes, header_section: bytes, body: bytes) -> None:
        self._data = data
        self._body = body
        self._headers: list[tuple[str, str]] = []  # (name, raw unfolded value)
        self._decoded: dict[str, list[str]] = {}
        self._mime: EmailMessage | None = None
        text = header_section.decode("utf-8", "replace")
        lines = text.replace("\r\n", "\n").split("\n")
        current: list[str] | None = None
        for line in lines:
            if line[:1] in (" ", "\t") and current is not None:
                # RFC 5322 §2.2.3: unfolding removes the line break only.
                current[1] += line
                continue
            name, colon, value = line.partition(":")
            if not colon or not name.strip() or " " in name.strip():
                current = None  # not a header field line: ignored
                continue
            current = [name.strip(), value]
            self._headers.append(current)  # type: ignore[arg-type]
        self._headers = [(n, v.strip()) for n, v in self._headers]
        # RFC 5228 §5.9: size is counted in octets of the message with CRLF
        # line endings, as it would be sent over SMTP.
        self.size = len(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    @classmethod
    def from_bytes(cls, data: bytes) -> "SieveMessage":
        header_section, body = _split(data)
        return cls(data, header_section, body)

    @property
    def raw_header_names(self) -> list[str]:
        """The field names in order, as written (with repeats)."""
        return [n for n, _ in self._headers]

    def raw_headers(self, name: str) -> list[str]:
        """Unfolded values of the named field, not RFC 2047 decoded."""
        key = name.lower()
        return [v for n, v in self._headers if n.lower() == key]

    def headers(self, name: str) -> list[str]:
        """Unfolded, RFC 2047 decoded values of the field, in order.

        RFC 5228 §2.7.2: header names compare case-insensitively and
        encoded words are decoded before comparison.
        """
        key = name.lower()
        cached = self._decoded.get(key)
        if cached is None:
            cached = [_decode_words(v) for v in self.raw_headers(name)]
            self._decoded[key] = cached
        return list(cached)

    def addresses(self, name: str) -> list[Address]:
        """The addresses in the named fields (RFC 5228 §2.7.4).

        Parsed from the undecoded value: RFC 2047 §5 keeps encoded words
        out of addr-specs, so decoding first would change only display
        names, and a decoded display name may hold "," or "<" that would
        confuse the parser.  Comments and group syntax are dropped; an
        empty group adds nothing; a value that does not parse gives itself
        as the address (RFC 5228 §2.7.4 leaves the handling of invalid
        addresses to the implementation, which must not fail).
        """
        result: list[Address] = []
        for value in self.raw_headers(name):
            if not value.strip():
                continue
            try:
                pairs = email.utils.getaddresses([value])
            except Exception:  # defensive: never fail a test on bad input
                pairs = []
            specs = [spec for _, spec in pairs if spec]
            if not specs:
                if value.rstrip().endswith(";") and ":" in value:
                    continue  # an empty group ("undisclosed-recipients:;")
                result.append(Address.from_addr_spec(_decode_words(value)))
                continue
            result.extend(Address.from_addr_spec(s) for s in specs)
        return result

    # --- body (RFC 5173) ----------------------------------------------------

    def _parsed(self) -> EmailMessage:
        if self._mime is None:
            self._mime = email.message_from_bytes(self._data, policy=email.policy.default)  # type: ignore[assignment]
        return self._mime  # type: ignore[return-value]

    def body_text(self, transform: str = "text",
                  content_types: tuple[str, ...] = ()) -> list[str]:
        """The body strings a body test compares against, one per part.

        RFC 5173 §5.1 :raw: the undecoded body as one string.
        RFC 5173 §5.3 :text: each text/* leaf part, transfer encoding and
        charset decoded.
        RFC 5173 §5.2 :content: each leaf part whose type matches one of
        content_types: "" matches every part, a type without "/" ("text")
        its whole top-level type, "text/html" only that type.  Non-text
        parts are transfer-decoded and read as UTF-8 with replacement.
        At most MAX_PARTS parts and MAX_TEXT characters in all.
        """
        if transform == "raw":
            return [self._body.decode("utf-8", "replace")[:MAX_TEXT]]
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown body transform {transform!r}")
        wanted = tuple(t.lower().strip() for t in content_types)
        out: list[str] = []
        budget = MAX_TEXT
        for n, part in enumerate(self._parsed().walk()):
            if n >= MAX_PARTS or budget <= 0:
                break
            ctype = part.get_content_type().lower()
            if part.is_multipart():
                # RFC 5173 §5.2: a multipart that matches is searched in its
                # prologue and epilogue (the text outside its body parts).
                if transform == "content" and any(_type_matches(w, ctype) for w in wanted):
                    text = "\n".join(t for t in (part.preamble, part.epilogue) if t)[:budget]
                    if text:
                        budget -= len(text)
                        out.append(text)
                continue
            if transform == "text":
                if part.get_content_maintype().lower() != "text":
                    continue
            elif not any(_type_matches(w, ctype) for w in wanted):
                continue
            text = _part_text(part)[:budget]
            budget -= len(text)
            out.append(text)
        return out


def _type_matches(wanted: str, ctype: str) -> bool:
    if wanted == "":
        return True
    if "/" in wanted:
        return ctype == wanted
    return ctype.split("/", 1)[0] == wanted


def _part_text(part: EmailMessage) -> str:
    try:
        content = part.get_content()
    except (LookupError, ValueError, UnicodeError, KeyError, AttributeError):
        content = None
    if isinstance(content, str):
        return content
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    if isinstance(content, bytes):
        return content.decode("utf-8", "replace")
    return ""
