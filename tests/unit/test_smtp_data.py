"""Dot-stuffing and line ends (mailgw.smtp.data; RFC 5321 §4.5.2, §2.3.8;
RFC 1939 §3)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz_settings
from mailgw.smtp.data import (END, canonical_line_ends, dot_stuff, has_long_line, stuff, to_crlf, to_lf,
                              unstuff_lf)

# Lines made of the octets that matter: dots, CR, LF, and something else.
RAW = st.lists(st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"x", b".x", b" "]), max_size=30).map(b"".join)


def pop3_stuff(data: bytes) -> bytes:
    """POP3's stuff() before mailgw.smtp.data (mailgw/pop3/server.py)."""
    stuffed = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


def client_dot_stuff(message: bytes) -> bytes:
    """The outbound client's dot_stuff() before mailgw.smtp.data (mailgw/queue/client.py)."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def test_stuff_examples():
    assert stuff(b"") == b""
    assert stuff(b".") == b"..\r\n"
    assert stuff(b"a\r\n.\r\n.b\r\n") == b"a\r\n..\r\n..b\r\n"
    assert stuff(b"a\r\n.b") == b"a\r\n..b\r\n"
    assert stuff(b"a\r") == b"a\r\r\n"                   # not canonical: the caller's business
    assert dot_stuff(b"") == END == b".\r\n"
    assert dot_stuff(b".\r\nline\r\n.\r\n..\r\n") == b"..\r\nline\r\n..\r\n...\r\n.\r\n"


def test_unstuff_lf_examples():
    assert unstuff_lf(b"") == b""
    assert unstuff_lf(b".\n..\n.x\nx.\n") == b"\n.\nx\nx.\n"
    assert unstuff_lf(b"..") == b"."
    # The server's virtual leading line end comes back, and the first line is unstuffed after it.
    assert unstuff_lf(b"\n..a\n.\n") == b"\n.a\n\n"
    assert unstuff_lf(bytearray(b"\n.a")) == bytearray(b"\na")


def test_line_end_conversions():
    assert to_lf(b"a\r\nb\r\n\r\n") == b"a\nb\n\n"
    assert to_crlf(b"a\nb\n\n") == b"a\r\nb\r\n\r\n"
    assert canonical_line_ends(b"a\rb\nc\r\nd\r\r\ne\n\r") == b"a\r\nb\r\nc\r\nd\r\n\r\ne\r\n\r\n"
    canonical = b"a\r\nb\r\n"
    assert canonical_line_ends(canonical) is canonical         # no copy for the spool's messages


@pytest.mark.parametrize("limit", [0, 1, 76, 998])
def test_has_long_line_boundary(limit):
    # A line of exactly `limit` octets (its LF not counted) is fine, limit+1 is long.
    exactly, over = b"a" * limit, b"a" * (limit + 1)
    assert not has_long_line(exactly, limit)
    assert has_long_line(over, limit)
    assert not has_long_line(exactly + b"\n", limit)
    assert has_long_line(over + b"\n", limit)
    assert not has_long_line(b"\n".join([exactly] * 5) + b"\n", limit)
    assert has_long_line(b"\n".join([exactly] * 5 + [over] + [exactly] * 5), limit)
    assert not has_long_line(bytearray(b"\n" + exactly + b"\n" + exactly), limit)
    assert not has_long_line(b"", limit) and not has_long_line(b"\n" * 3, limit)


def test_has_long_line_as_the_server_uses_it():
    # [smtp] max_text_line counts the CRLF (RFC 5321 §4.5.3.1.6: 1000 octets);
    # the server checks its LF form against max_text_line - 2.
    assert not has_long_line(b"x" * 998 + b"\n" + b"y" * 998, 1000 - 2)
    assert has_long_line(b"x" * 998 + b"\n" + b"y" * 999, 1000 - 2)


@fuzz_settings(300)
@given(RAW)
def test_stuff_keeps_the_wire_bytes_of_pop3_and_the_client(raw):
    # POP3 (stuff, then ".\r\n") and the outbound client (dot_stuff) send
    # exactly what they sent with their own copies, for any data.
    assert stuff(raw) == pop3_stuff(raw)
    assert dot_stuff(raw) == client_dot_stuff(raw) == pop3_stuff(raw) + END


@fuzz_settings(300)
@given(RAW)
def test_stuff_unstuff_round_trips_and_ends_only_at_the_end(raw):
    message = canonical_line_ends(raw)
    assert b"\r" not in to_lf(message) and to_crlf(to_lf(message)) == message
    assert canonical_line_ends(message) == message
    payload = dot_stuff(message)
    body = payload[:-len(END)]
    assert b"\r\n.\r\n" not in b"\r\n" + body                  # no early terminator line
    complete = message if not message or message.endswith(b"\r\n") else message + b"\r\n"
    assert unstuff_lf(to_lf(body)) == to_lf(complete)
    assert to_crlf(unstuff_lf(b"\n" + to_lf(body))) == b"\r\n" + complete
