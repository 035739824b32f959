"""Parsing of MAIL FROM / RCPT TO arguments: paths and ESMTP parameters.

The relay decision depends on the domain this module returns, so it follows
the RFC 5321 §4.1.2 grammar exactly and treats nothing else as routing:
source routes (RFC 5321 §4.1.1.3, "MUST accept, SHOULD ignore") are dropped,
and `%`, `!` and a quoted `@` stay inside the local part.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mailgw.smtp import codes, xtext
from mailgw.smtp.codes import Reply

# RFC 5322 §3.2.3 atext; RFC 6531 §3.3 adds any UTF-8 beyond ASCII.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ATOM_ASCII = rf"[{_ATEXT}]+"
_ATOM_UTF8 = rf"[{_ATEXT}\u0080-\U0010ffff]+"
# RFC 5321 §4.1.2 qtextSMTP / quoted-pairSMTP.
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_QUOTED_UTF8 = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LABEL_UTF8 = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?"
_ADDRESS_LITERAL = r"\[[^\[\]\\\s]{1,253}\]"


def _mailbox_re(atom: str, quoted: str, label: str) -> re.Pattern:
    domain = rf"(?:{label}(?:\.{label})*|{_ADDRESS_LITERAL})"
    at_domain = rf"@{domain}"
    return re.compile(
        rf"<(?:{at_domain}(?:,{at_domain})*:)?"       # source route, dropped
        rf"(?P<local>{atom}(?:\.{atom})*|{quoted})"
        rf"@(?P<domain>{domain})>"
    )


_MAILBOX_ASCII = _mailbox_re(_ATOM_ASCII, _QUOTED, _LABEL)
_MAILBOX_UTF8 = _mailbox_re(_ATOM_UTF8, _QUOTED_UTF8, _LABEL_UTF8)
_FROM = re.compile(r"FROM:[ ]*", re.IGNORECASE)
_TO = re.compile(r"TO:[ ]*", re.IGNORECASE)
_PARAM = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?")

# RFC 5321 §4.5.3.1.1/.2: local part 64, domain 255 octets.
MAX_LOCAL_PART = 64
# An SRS address (routing/srs.py) wraps another sender's whole address, so a
# bounce to one can pass 64 octets; §4.5.3.1 asks receivers to impose no
# limits where they can, and Postfix imposes none. The command line limit
# still bounds it.
MAX_SRS_LOCAL_PART = 255
_SRS_TAG = re.compile(r"(?i)srs[01][=+-]")
MAX_DOMAIN = 255


@dataclass(frozen=True)
class Mailbox:
    local: str      # as sent (case kept: RFC 5321 §2.4, the local part belongs to the receiver)
    domain: str     # lower-case; an address literal keeps its brackets

    def __str__(self) -> str:
        # RFC 5321 §4.1.1.3: the one address without a domain is <Postmaster>.
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()


class AddressError(Exception):
    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


def _split_path_and_params(rest: str, prefix: re.Pattern, bad: Reply) -> tuple[str, str]:
    match = prefix.match(rest)
    if not match:
        raise AddressError(bad)
    rest = rest[match.end():]
    if not rest.startswith("<"):
        raise AddressError(bad)
    # The path ends at the first ">" outside a quoted string.
    in_quotes = escaped = False
    for index, char in enumerate(rest):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            path, params = rest[: index + 1], rest[index + 1:]
            if params and not params.startswith(" "):
                raise AddressError(bad)
            return path, params.strip(" ")
    raise AddressError(bad)


def parse_mailbox(path: str, *, utf8: bool, bad: Reply) -> Mailbox:
    """`<local@domain>` (optionally with a source route) -> Mailbox."""
    match = (_MAILBOX_UTF8 if utf8 else _MAILBOX_ASCII).fullmatch(path)
    if not match:
        if not utf8 and not path.isascii() and _MAILBOX_UTF8.fullmatch(path):
            raise AddressError(codes.NEEDS_SMTPUTF8)
        raise AddressError(bad)
    local, domain = match.group("local"), match.group("domain")
    limit = MAX_SRS_LOCAL_PART if _SRS_TAG.match(local) else MAX_LOCAL_PART
    if len(local.encode()) > limit or len(domain.encode()) > MAX_DOMAIN:
        raise AddressError(bad)
    return Mailbox(local, domain.lower())


def parse_params(text: str) -> dict[str, str | None]:
    """`KEY=VALUE KEY2 ...` -> {KEY: VALUE|None}, keys upper-cased, no duplicates."""
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        match = _PARAM.fullmatch(word)
        if not match:
            raise AddressError(codes.BAD_ARGUMENTS)
        key = match.group("key").upper()
        if key in params:
            raise AddressError(codes.BAD_ARGUMENTS.with_text(f"Duplicate parameter {key}"))
        params[key] = match.group("value")
    return params


def decode_xtext(value: str) -> str:
    """RFC 3461 §4 xtext (mailgw.smtp.xtext), refused with 501 5.5.4."""
    try:
        return xtext.decode_xtext(value)
    except xtext.XtextError:
        raise AddressError(codes.BAD_ARGUMENTS.with_text("Invalid xtext")) from None


def decode_utf8_addr(value: str) -> str:
    """The address of an ORCPT of type utf-8 (RFC 6533 §3, mailgw.smtp.xtext),
    its \\x{HEX} escapes undone; refused with 501 5.5.4."""
    try:
        return xtext.decode_utf8_addr(value)
    except xtext.XtextError:
        raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad ORCPT parameter")) from None


@dataclass(frozen=True)
class MailFrom:
    sender: Mailbox | None          # None for the null reverse-path <>
    size: int | None
    body: str                       # "7BIT" or "8BITMIME"
    smtputf8: bool
    ret: str | None                 # RFC 3461 RET=FULL|HDRS
    envid: str | None               # RFC 3461 ENVID, decoded


@dataclass(frozen=True)
class RcptTo:
    recipient: Mailbox
    notify: tuple[str, ...] | None  # RFC 3461 NOTIFY
    orcpt: str | None               # RFC 3461 ORCPT, "type;decoded-address"


def parse_mail_from(rest: str) -> MailFrom:
    path, param_text = _split_path_and_params(rest, _FROM, codes.BAD_SENDER_SYNTAX)
    params = parse_params(param_text)
    size = body = ret = envid = None
    smtputf8 = False
    for key, value in params.items():
        if key == "SIZE":               # RFC 1870 §3
            if value is None or not value.isdigit() or len(value) > 20:
                raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad SIZE parameter"))
            size = int(value)
        elif key == "BODY":             # RFC 6152 §2
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad BODY parameter"))
            body = value.upper()
        elif key == "SMTPUTF8":         # RFC 6531 §3.4
            if value is not None:
                raise AddressError(codes.BAD_ARGUMENTS.with_text("SMTPUTF8 takes no value"))
            smtputf8 = True
        elif key == "RET":              # RFC 3461 §4.3
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad RET parameter"))
            ret = value.upper()
        elif key == "ENVID":            # RFC 3461 §4.4: up to 100 characters
            if value is None:
                raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad ENVID parameter"))
            envid = decode_xtext(value)
            if len(envid) > 100:
                raise AddressError(codes.BAD_ARGUMENTS.with_text("ENVID too long"))
        elif key == "AUTH":             # RFC 4954 §5: accepted, we trust only our own AUTH
            if value is None:
                raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad AUTH parameter"))
        else:
            raise AddressError(codes.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {key}"))
    sender = None if path == "<>" else parse_mailbox(path, utf8=smtputf8, bad=codes.BAD_SENDER_SYNTAX)
    return MailFrom(sender, size, body or "7BIT", smtputf8, ret, envid)


_NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")


def parse_rcpt_to(rest: str, *, smtputf8: bool) -> RcptTo:
    path, param_text = _split_path_and_params(rest, _TO, codes.BAD_RECIPIENT_SYNTAX)
    params = parse_params(param_text)
    notify = orcpt = None
    for key, value in params.items():
        if key == "NOTIFY":             # RFC 3461 §4.1: NEVER alone, or a list of the others
            words = tuple((value or "").upper().split(","))
            if words != ("NEVER",) and (not all(w in _NOTIFY_VALUES for w in words) or len(set(words)) != len(words)):
                raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad NOTIFY parameter"))
            notify = words
        elif key == "ORCPT":            # RFC 3461 §4.2: addr-type ";" xtext
            addr_type, _, encoded = (value or "").partition(";")
            if not addr_type or not encoded or not re.fullmatch(r"[A-Za-z0-9-]+", addr_type):
                raise AddressError(codes.BAD_ARGUMENTS.with_text("Bad ORCPT parameter"))
            addr_type = addr_type.lower()
            decoded = decode_utf8_addr(encoded) if addr_type == "utf-8" else decode_xtext(encoded)
            orcpt = f"{addr_type};{decoded}"
        else:
            raise AddressError(codes.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {key}"))
    # RFC 5321 §4.5.1: <postmaster> without a domain must be accepted.
    if path.lower() == "<postmaster>":
        recipient = Mailbox("postmaster", "")
    else:
        recipient = parse_mailbox(path, utf8=smtputf8, bad=codes.BAD_RECIPIENT_SYNTAX)
    return RcptTo(recipient, notify, orcpt)
