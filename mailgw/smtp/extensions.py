"""ESMTP service extensions: the keywords, what our server advertises, and
reading a peer's EHLO reply (RFC 5321 §2.2.2, §4.1.1.1).

    ehlo-ok-rsp = "250" SP Domain [ SP ehlo-greet ] CRLF
                / ( "250-" Domain [ SP ehlo-greet ] CRLF
                    *( "250-" ehlo-line CRLF )
                    "250" SP ehlo-line CRLF )
    ehlo-line    = ehlo-keyword *( SP ehlo-param )
    ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")

Keywords are case-insensitive (§2.2.2 "keywords ... are not case
sensitive"): `parse_ehlo_lines` upper-cases them, the constants here are
upper case. Parameters are kept as sent, except AUTH's mechanism names
(upper-cased: SASL mechanism names are upper case, RFC 4954 §3).
"""
from __future__ import annotations

SIZE = "SIZE"                                  # RFC 1870
EIGHTBITMIME = "8BITMIME"                      # RFC 6152
PIPELINING = "PIPELINING"                      # RFC 2920
ENHANCEDSTATUSCODES = "ENHANCEDSTATUSCODES"    # RFC 2034
SMTPUTF8 = "SMTPUTF8"                          # RFC 6531
DSN = "DSN"                                    # RFC 3461
STARTTLS = "STARTTLS"                          # RFC 3207
AUTH = "AUTH"                                  # RFC 4954
HELP = "HELP"                                  # RFC 5321 §4.1.1.8

# The SASL mechanisms our server offers (mailgw.auth.sasl), in this order.
AUTH_MECHANISMS = ("PLAIN", "LOGIN")

Extensions = dict[str, tuple[str, ...]]


def server_extensions(max_message_size: int, *, can_starttls: bool, tls_active: bool,
                      auth_offered: bool) -> list[str]:
    """The ehlo-lines our server advertises after its greeting line, in order.

    STARTTLS only while it can still be started (not over TLS already);
    AUTH only inside TLS, and only when `auth_offered` (the listener can log
    users in): RFC 4954 §4 / RFC 8314, the password is never sent in clear."""
    extensions = [
        f"{SIZE} {max_message_size}",
        EIGHTBITMIME,
        PIPELINING,
        ENHANCEDSTATUSCODES,
        SMTPUTF8,
        DSN,
    ]
    if can_starttls and not tls_active:
        extensions.append(STARTTLS)
    if tls_active and auth_offered:
        extensions.append(" ".join((AUTH, *AUTH_MECHANISMS)))
    extensions.append(HELP)
    return extensions


def parse_ehlo_lines(lines: list[str]) -> Extensions:
    """The text of an EHLO reply's lines after the first (the greeting line)
    -> {KEYWORD: (PARAM, ...)}, keywords upper-cased.

    Lenient like other MTAs: words are split on any white space, an empty
    line is skipped, a later line for the same keyword replaces the earlier
    one, except AUTH, whose mechanisms add up (upper-cased, sorted, no
    duplicates); `AUTH=PLAIN LOGIN` (pre-RFC 4954 servers) counts as AUTH."""
    extensions: Extensions = {}
    for line in lines:
        words = line.split()
        if not words:
            continue
        keyword, params = words[0].upper(), words[1:]
        if keyword.startswith("AUTH="):
            keyword, params = AUTH, [keyword[5:], *params]
        if keyword == AUTH:
            params = sorted(set(extensions.get(AUTH, ())) | {p.upper() for p in params if p})
        extensions[keyword] = tuple(params)
    return extensions


def size_limit(extensions: Extensions) -> int | None:
    """The peer's fixed maximum message size in octets (RFC 1870 §4), or None:
    no SIZE, "SIZE" without a number, or "SIZE 0" (no fixed maximum)."""
    params = extensions.get(SIZE, ())
    if not params or not params[0].isascii() or not params[0].isdigit():
        return None
    return int(params[0]) or None
