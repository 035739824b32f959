"""ESMTP extensions (mailgw.smtp.extensions): the EHLO reply the outbound
client reads and the list our server advertises."""
from __future__ import annotations

import pytest

from mailgw.smtp import extensions as ext
from mailgw.smtp.extensions import parse_ehlo_lines, server_extensions, size_limit
from smtp_harness import Session


def test_extensions_are_parsed():
    extensions = parse_ehlo_lines(["SIZE 1000", "8BITMIME", "smtputf8", "DSN", "PIPELINING", "STARTTLS",
                                   "AUTH PLAIN login CRAM-MD5", "AUTH=PLAIN XOAUTH2"])
    assert extensions[ext.SIZE] == ("1000",)
    assert {ext.EIGHTBITMIME, ext.SMTPUTF8, ext.DSN, ext.PIPELINING, ext.STARTTLS} <= set(extensions)
    assert extensions[ext.AUTH] == ("CRAM-MD5", "LOGIN", "PLAIN", "XOAUTH2")


def test_keywords_are_case_insensitive_and_parameters_kept_as_sent():
    # RFC 5321 §2.2.2: keywords are not case sensitive; parameters are the server's.
    extensions = parse_ehlo_lines(["Starttls", "pipelining", "x-Vendor Foo bar", "Size 10240000"])
    assert extensions == {"STARTTLS": (), "PIPELINING": (), "X-VENDOR": ("Foo", "bar"), "SIZE": ("10240000",)}


def test_odd_lines():
    assert parse_ehlo_lines([]) == {}
    assert parse_ehlo_lines(["", "   ", "\tDSN\t"]) == {"DSN": ()}
    assert parse_ehlo_lines(["SIZE 1", "SIZE 2"]) == {"SIZE": ("2",)}     # the last one counts
    assert parse_ehlo_lines(["AUTH=LOGIN", "AUTH login plain"]) == {"AUTH": ("LOGIN", "PLAIN")}
    assert parse_ehlo_lines(["AUTH"]) == {"AUTH": ()}


@pytest.mark.parametrize("lines, limit", [
    ([], None), (["SIZE"], None), (["SIZE 0"], None), (["SIZE abc"], None), (["SIZE \u00b2"], None),
    (["SIZE -5"], None), (["SIZE 1000"], 1000), (["size 52428800 extra"], 52428800),
])
def test_size_limit(lines, limit):
    # RFC 1870 §4: SIZE 0 (or no number) means no fixed maximum.
    assert size_limit(parse_ehlo_lines(lines)) == limit


def test_server_extensions_in_order():
    base = ["SIZE 1000", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
    assert server_extensions(1000, can_starttls=True, tls_active=False, auth_offered=True) == \
        base + ["STARTTLS", "HELP"]
    assert server_extensions(1000, can_starttls=True, tls_active=True, auth_offered=True) == \
        base + ["AUTH PLAIN LOGIN", "HELP"]
    assert server_extensions(1000, can_starttls=False, tls_active=True, auth_offered=True) == \
        base + ["AUTH PLAIN LOGIN", "HELP"]
    assert server_extensions(1000, can_starttls=False, tls_active=False, auth_offered=True) == base + ["HELP"]
    # No AUTH without TLS (RFC 4954 §4), none when the listener cannot log users in.
    assert server_extensions(1000, can_starttls=False, tls_active=True, auth_offered=False) == base + ["HELP"]


def test_what_the_server_advertises_parses_back():
    lines = server_extensions(5000, can_starttls=False, tls_active=True, auth_offered=True)
    extensions = parse_ehlo_lines(lines)
    assert size_limit(extensions) == 5000
    assert extensions[ext.AUTH] == ("LOGIN", "PLAIN")
    assert list(extensions) == [line.split()[0] for line in lines]


def _advertised(session) -> list[str]:
    """The ehlo-lines of the server's EHLO reply, after its greeting line."""
    replies = [line for line in session.ehlo() if line.startswith("250")]
    return [line[4:] for line in replies[1:]]


@pytest.mark.parametrize("tls, starttls", [(False, True), (True, False), (False, False)])
def test_the_server_advertises_exactly_server_extensions(tls, starttls):
    s = Session(role="submissions" if tls else "relay", tls=tls, starttls=starttls)
    assert _advertised(s) == server_extensions(s.server.limits.max_message_size, can_starttls=starttls,
                                               tls_active=tls, auth_offered=True)


def test_the_server_advertises_exactly_server_extensions_after_starttls():
    s = Session(role="submission")
    s.ehlo()
    assert s.last("STARTTLS").startswith("220 ")
    assert _advertised(s) == server_extensions(s.server.limits.max_message_size, can_starttls=True,
                                               tls_active=True, auth_offered=True)
