"""SASL response decoding shared by SMTP AUTH, POP3 AUTH and IMAP AUTHENTICATE,
so the rules below cannot drift apart between the three protocols."""
from __future__ import annotations

import base64
import binascii


class BadEncoding(ValueError):
    """The response is not strict base64."""


class MalformedPlain(ValueError):
    """Not [authzid] NUL authcid NUL passwd."""


class ForeignIdentity(ValueError):
    """The authorization identity names someone other than the login."""

    def __init__(self, authcid: bytes):
        super().__init__("authorization identity differs from login")
        self.authcid = authcid


def decode_response(encoded: bytes) -> bytes:
    """A base64 SASL response. RFC 4954 §4 / RFC 5034 §4 / RFC 4959: "=" is
    an empty response; anything not strictly base64 is refused."""
    if encoded == b"=":
        return b""
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadEncoding() from None


def parse_plain(decoded: bytes) -> tuple[bytes, bytes]:
    """(authcid, password) of a decoded PLAIN response (RFC 4616 §2).

    Acting as another user is never allowed: an authorization identity that
    is not the login itself raises ForeignIdentity."""
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        raise MalformedPlain()
    authzid, authcid, password = parts
    if authzid and authzid.lower() != authcid.lower():
        raise ForeignIdentity(authcid)
    return authcid, password
