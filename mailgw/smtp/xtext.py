"""xtext (RFC 3461 §4) and utf-8-addr-xtext (RFC 6533 §3), both directions.

The server decodes ENVID and ORCPT parameters (mailgw.smtp.address), the
outbound client encodes them again for the next hop (mailgw.queue.client);
one module for both, so that what one side writes the other reads back
(decode(encode(s)) == s for every string without surrogates).

    xtext       = *( xchar / hexchar )
    xchar       = "!".."~" except "+" and "="        (%x21-2A / %x2C-3C / %x3E-7E)
    hexchar     = "+" 2(%x30-39 / %x41-46)          ; upper-case hex only

Our xtext carries UTF-8: a non-ASCII character is encoded as its UTF-8
octets (+HH each) and decoding refuses octets that are not UTF-8.

    utf-8-addr-xtext   = 1*( QCHAR / EmbeddedUnicodeChar )
    utf-8-addr-unitext = 1*( QUCHAR / EmbeddedUnicodeChar )   ; QCHAR or raw UTF-8
    QCHAR              = "!".."~" except "+", "=" and "\\"
    EmbeddedUnicodeChar = "\\x{" HEXPOINT "}"                  ; 2 to 6 hex digits

Decoding errors are `XtextError` (a ValueError); the SMTP server turns them
into 501 replies (mailgw.smtp.address).
"""
from __future__ import annotations

import re

__all__ = ["XtextError", "encode_xtext", "decode_xtext", "encode_utf8_addr", "decode_utf8_addr",
           "encode_orcpt"]


class XtextError(ValueError):
    """The value is not valid xtext / utf-8-addr-xtext."""


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(rb"\+([0-9A-F]{2})")
_UTF8_ADDR = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\x\{[0-9A-F]{2,6}\})+")
_HEXPOINT = re.compile(r"\\x\{([0-9A-F]{2,6})\}")


def encode_xtext(value: str) -> str:
    """RFC 3461 §4: "!".."~" except "+" and "=" as is, every other octet of
    the UTF-8 form as +HH."""
    if value.isascii() and value.isprintable() and " " not in value and "+" not in value and "=" not in value:
        return value                              # the common case: nothing to escape
    out = []
    for octet in value.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def decode_xtext(value: str) -> str:
    """RFC 3461 §4: undo the +HH escapes. The octets must form UTF-8 (what
    encode_xtext writes); anything else is an XtextError."""
    if not _XTEXT.fullmatch(value):
        raise XtextError("Invalid xtext")
    if "+" not in value:
        return value
    octets = _HEXCHAR.sub(lambda m: bytes([int(m.group(1), 16)]), value.encode("ascii"))
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        raise XtextError("Invalid xtext") from None


def encode_utf8_addr(value: str) -> str:
    """RFC 6533 §3: utf-8-addr-xtext, non-ASCII, controls, space and the
    specials "+", "=", "\\" as \\x{HEX} (at least two digits: HEXPOINT)."""
    out = []
    for char in value:
        if 0x21 <= ord(char) <= 0x7E and char not in "+=\\":
            out.append(char)
        else:
            out.append(f"\\x{{{ord(char):02X}}}")
    return "".join(out)


def decode_utf8_addr(value: str) -> str:
    """RFC 6533 §3: utf-8-addr-xtext or utf-8-addr-unitext (raw UTF-8 allowed),
    its \\x{HEX} escapes undone. An escape outside Unicode or naming a
    surrogate is an XtextError, as is an empty value."""
    if not _UTF8_ADDR.fullmatch(value):
        raise XtextError("Invalid utf-8-addr-xtext")

    def char(match):
        point = int(match.group(1), 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            raise XtextError("Invalid utf-8-addr-xtext")
        return chr(point)
    return _HEXPOINT.sub(char, value)


def encode_orcpt(orcpt: str) -> str:
    """A stored ORCPT ("type;decoded address", as mailgw.smtp.address keeps it)
    -> the ORCPT= value: "utf-8;" utf-8-addr-xtext for a non-ASCII address or
    type utf-8 (RFC 6533 §3), else "type;" xtext (RFC 3461 §4.2)."""
    addr_type, _, address = orcpt.partition(";")
    if not address.isascii() or addr_type.lower() == "utf-8":
        return f"utf-8;{encode_utf8_addr(address)}"
    return f"{addr_type};{encode_xtext(address)}"
