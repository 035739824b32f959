"""DKIM signing (RFC 6376, RFC 8463): one DKIM-Signature header field per
active key of the From: domain, RSA first, then Ed25519.

What a signature covers (docs/dkim.md):
- c=relaxed/relaxed: survives the whitespace and folding changes relays make.
- The header fields of RFC 6376 §5.4.1's list, plus Message-ID, MIME-Version,
  Content-Type, Content-Transfer-Encoding and List-Unsubscribe-Post (RFC 8058
  §4: it MUST be signed with List-Unsubscribe), each named once per occurrence.
- From, Subject, Date and To named once more than they occur ("oversigned",
  RFC 6376 §8.15): a copy added later, above or below, breaks the signature,
  instead of being shown to the reader as the signed one.
- No l= (RFC 6376 §8.2: appended content would pass) and no x=.

The crypto is `cryptography`'s (OpenSSL), not dkimpy's pure-Python RSA:
~0.5 ms instead of ~8 ms per 2048-bit signature. Everything here is pure CPU
and reads only its arguments and the key store's immutable snapshot, so it
runs in pool threads.
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import re
from typing import Iterable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from mailgw.mailauth.keys import ALGORITHMS, DKIMKey, normalize_domain

# RFC 6376 §5.4.1: the fields that SHOULD be signed, in that order ...
SIGNED_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc",
    "Resent-Date", "Resent-From", "Resent-To", "Resent-Cc",
    "In-Reply-To", "References",
    "List-Id", "List-Help", "List-Unsubscribe", "List-Subscribe", "List-Post", "List-Owner", "List-Archive",
    # ... and what the reader's client shows or decodes by.
    "Message-ID", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    # RFC 8058 §4: one-click unsubscription only counts when this is signed.
    "List-Unsubscribe-Post",
)
# RFC 6376 §8.15: listed one extra time, so one more cannot be added unnoticed.
OVERSIGNED_HEADERS = ("From", "Subject", "Date", "To")

SIGNATURE_ALGORITHM = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
_FOLD_WIDTH = 76                     # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters

_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")     # RFC 5322 §3.6.8 ftext, obs WSP before ":"


# -- parsing -------------------------------------------------------------------------

def _to_crlf(message: bytes, lf: bool) -> bytes:
    return message.replace(b"\n", b"\r\n") if lf else message


def _split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(header fields as (name, raw field with its CRLFs), body) of a CRLF
    message. Lines in the header that are not fields are skipped: nothing can
    sign them."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[:end + 2], message[end + 4:])
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            # RFC 5322 §2.2.3: a continuation line belongs to the field above.
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
            continue
        match = _FIELD_NAME.match(line)
        if match:
            fields.append((match.group(1).lower(), line + b"\r\n"))
    return fields, body


def _field_value(raw: bytes) -> bytes:
    return raw.split(b":", 1)[1]


# -- canonicalization (RFC 6376 §3.4) ----------------------------------------------

def relaxed_header(raw: bytes) -> bytes:
    """RFC 6376 §3.4.2: name lower-cased; value unfolded, WSP runs made one SP,
    WSP at either end and around the colon removed; ends in CRLF."""
    name, value = raw.split(b":", 1)
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" \t")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4: WSP at line ends removed, other WSP runs made one SP,
    empty lines at the end removed; a non-empty body ends in CRLF."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _WSP_RUN.sub(b" ", _WSP_BEFORE_CRLF.sub(b"\r\n", body))
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[:end] + b"\r\n" if end else b""


def body_hash(body: bytes) -> str:
    # RFC 6376 §3.7: bh= is the hash of the canonicalized body (no l=: all of it).
    return base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")


def header_names_for(fields: Sequence[tuple[bytes, bytes]], extra_headers: Iterable[str] = ()) -> list[str]:
    """h=: each name of the signed set once per occurrence, the oversigned
    ones once more."""
    present: dict[bytes, int] = {}
    for name, _ in fields:
        present[name] = present.get(name, 0) + 1
    wanted = list(SIGNED_HEADERS)
    known = {n.lower() for n in wanted}
    for name in extra_headers:
        if name.lower() not in known and name.lower() != "dkim-signature":
            wanted.append(name)
            known.add(name.lower())
    oversigned = {n.lower() for n in OVERSIGNED_HEADERS}
    names: list[str] = []
    for name in wanted:
        count = present.get(name.lower().encode("ascii"), 0) + (1 if name.lower() in oversigned else 0)
        names.extend([name] * count)
    return names


def _selected(fields: Sequence[tuple[bytes, bytes]], names: Sequence[str]) -> bytes:
    """The canonicalized fields h= names, in h= order. RFC 6376 §5.4.2: the
    n-th mention of a name takes its n-th occurrence from the bottom; a
    mention beyond the last occurrence stands for a field that is absent
    and contributes nothing."""
    taken: dict[bytes, int] = {}
    out = []
    for name in names:
        key = name.lower().encode("ascii")
        index = taken.get(key, len(fields))
        while index > 0:
            index -= 1
            if fields[index][0] == key:
                out.append(relaxed_header(fields[index][1]))
                break
        taken[key] = index
    return b"".join(out)


# -- the header field ------------------------------------------------------------

def _fold(prefix: str, pieces: Sequence[tuple[str, str]]) -> str:
    """Lay out `pieces` ((joiner, text): the joiner goes before the text when
    they share a line) in lines of at most _FOLD_WIDTH. A line break replaces
    the joiner with CRLF SP: the same text after relaxed canonicalization
    when the joiner is one space, and where it is "" (inside h=) the added
    space is folding white space the syntax allows (RFC 6376 §3.5)."""
    out, line = [prefix], len(prefix)
    for joiner, text in pieces:
        if line + len(joiner) + len(text) > _FOLD_WIDTH and line > 1:
            out.append("\r\n " + text)
            line = 1 + len(text)
        else:
            out.append(joiner + text)
            line += len(joiner) + len(text)
    return "".join(out)


def _fold_base64(head: str, value: str) -> str:
    """Append b='s value to the folded header, filling the last line, then
    whole lines. FWS inside b= is ignored by verifiers (RFC 6376 §3.5)."""
    last_line = len(head) - (head.rfind("\r\n") + 2) if "\r\n" in head else len(head)
    room = max(_FOLD_WIDTH - last_line, 0)
    out, rest = [head, value[:room]], value[room:]
    while rest:
        out.append("\r\n " + rest[:_FOLD_WIDTH - 1])
        rest = rest[_FOLD_WIDTH - 1:]
    return "".join(out)


def _sign_bytes(key: DKIMKey, data: bytes) -> bytes:
    if key.algorithm == "rsa":
        # RFC 6376 §3.3.1: RSASSA-PKCS1-v1_5 with SHA-256.
        return key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    # RFC 8463 §3: Ed25519 (pure, RFC 8032) over the SHA-256 hash of the data.
    return key.private_key.sign(hashlib.sha256(data).digest())


def sign_message(message: bytes, key: DKIMKey, *, timestamp: int, lf: bool = False,
                 extra_headers: Iterable[str] = (), header_names: Sequence[str] | None = None,
                 extra_tags: Sequence[tuple[str, str]] = (), header_separator: str = ":") -> bytes:
    """The DKIM-Signature header field for `message` (the whole message; its
    lines end in LF when `lf`), CRLF line ends, ending in CRLF.

    `extra_headers` adds field names to sign besides the default set (each
    once per occurrence). `header_names` replaces the h= list outright
    (exactly as given: no counting, no oversigning), and `extra_tags` (put
    after d=) and `header_separator` shape the field; these three exist to
    reproduce published signatures such as RFC 8463 Appendix A, production
    leaves them alone. ValueError when the message has no From: (RFC 6376
    §5.4: From MUST be signed)."""
    fields, body = _split(_to_crlf(message, lf))
    if not any(name == b"from" for name, _ in fields):
        raise ValueError("the message has no From: header field; DKIM requires signing it (RFC 6376 §5.4)")
    names = list(header_names) if header_names is not None else header_names_for(fields, extra_headers)
    if not any(n.strip().lower() == "from" for n in names):
        raise ValueError("h= must name From (RFC 6376 §5.4)")
    tags = [("v", "1"), ("a", SIGNATURE_ALGORITHM[key.algorithm]), ("c", "relaxed/relaxed"), ("d", key.domain),
            *extra_tags, ("s", key.selector), ("t", str(int(timestamp)))]
    pieces: list[tuple[str, str]] = [(" " if i else "", f"{tag}={value};") for i, (tag, value) in enumerate(tags)]
    # h= may break after each separator; a separator with spaces breaks at its space.
    joiner, separator = (" ", header_separator.rstrip(" ")) if header_separator.endswith(" ") \
        else ("", header_separator)
    for i, name in enumerate(names):
        text = f"h={name}" if i == 0 else name
        last = i == len(names) - 1
        pieces.append((" " if i == 0 else joiner, text + (";" if last else separator)))
    pieces.append((" ", f"bh={body_hash(body)};"))
    pieces.append((" ", "b="))
    unsigned = _fold("DKIM-Signature: ", pieces)
    # RFC 6376 §3.7: the signed fields, then this field with b= empty and without its final CRLF.
    data = _selected(fields, names) + relaxed_header(unsigned.encode("ascii"))[:-2]
    signature = base64.b64encode(_sign_bytes(key, data)).decode("ascii")
    return (_fold_base64(unsigned, signature) + "\r\n").encode("ascii")


# -- the From: domain ------------------------------------------------------------

def header_from_domain(message: bytes) -> str | None:
    """The domain (lower case, A-label) of the one address in the message's
    From: (LF or CRLF line ends); None when there is no From:, several
    (fields or addresses), or it cannot be parsed."""
    # Only the header is needed: cut it off before normalising line ends (this
    # runs on the reactor, once per message that may be signed).
    ends = [at for at in (message.find(b"\n\n"), message.find(b"\n\r\n")) if at >= 0]
    head = message[:min(ends) + 1] if ends else message
    fields, _ = _split(head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n")
    values = [_field_value(raw) for name, raw in fields if name == b"from"]
    if len(values) != 1:
        return None
    try:
        text = values[0].replace(b"\r\n", b"").decode("utf-8")       # RFC 6532: UTF-8 headers
    except UnicodeDecodeError:
        return None
    addresses = [address for _, address in email.utils.getaddresses([text]) if address]
    if len(addresses) != 1 or addresses[0].count("@") != 1:
        return None
    local, _, domain = addresses[0].partition("@")
    if not local or not domain:
        return None
    try:
        return normalize_domain(domain)
    except ValueError:
        return None


# -- the signer the pipeline uses -------------------------------------------------

class DKIMSigner:
    """Signs with every active key of a domain. `clock` (seconds()) gives t=.
    The store is checked for changes (`mailgw dkim activate` on a running
    server) at most every `check_interval` seconds."""

    def __init__(self, store, *, clock, check_interval: float = 5.0):
        self.store = store
        self.clock = clock
        self.check_interval = check_interval
        self._last_check = clock.seconds()

    def _refresh(self) -> None:
        now = self.clock.seconds()
        if now - self._last_check >= self.check_interval:
            # A race here costs at most one extra stat() round, never a torn read:
            # the store swaps whole snapshots.
            self._last_check = now
            self.store.reload_if_changed()

    def has_key(self, domain: str) -> bool:
        self._refresh()
        return bool(self.store.signing_keys(domain))

    def signatures_for(self, message: bytes, *, lf: bool, domain: str) -> bytes:
        """The DKIM-Signature fields to put on top of `message`, RSA first
        (b"" when the domain has no active key). CRLF line ends."""
        keys = self.store.signing_keys(domain)
        if not keys:
            return b""
        timestamp = int(self.clock.seconds())
        ordered = sorted(keys, key=lambda k: ALGORITHMS.index(k.algorithm))
        return b"".join(sign_message(message, key, timestamp=timestamp, lf=lf) for key in ordered)
