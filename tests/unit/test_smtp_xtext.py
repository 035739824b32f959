"""xtext (RFC 3461 §4) and utf-8-addr-xtext (RFC 6533 §3): mailgw.smtp.xtext,
what the server decodes and the outbound client encodes."""
from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz_settings
from mailgw.smtp import codes
from mailgw.smtp.address import AddressError, parse_mail_from, parse_rcpt_to
from mailgw.smtp.xtext import (XtextError, decode_utf8_addr, decode_xtext, encode_orcpt, encode_utf8_addr,
                               encode_xtext)

# RFC 3461 §4, exactly: xchar or "+" and two upper-case hex digits.
XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# RFC 6533 §3 utf-8-addr-xtext (ASCII only: what we send).
UTF8_ADDR_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|\\x\{[0-9A-F]{2,6}\})+")

# Any Unicode string but surrogates (which have no UTF-8 form).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def test_xtext_examples():
    assert encode_xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert encode_xtext("") == ""
    assert encode_xtext("plain!~") == "plain!~"
    assert encode_xtext("\x00\x7f\r\n") == "+00+7F+0D+0A"
    assert decode_xtext("a+2Bb+3Dc+20d+C3+A9") == "a+b=c d\u00e9"
    assert decode_xtext("caf+C3+A9") == "caf\u00e9"
    assert decode_xtext("") == ""


@pytest.mark.parametrize("bad", ["+", "+2", "+2b", "a=b", "a b", "caf\u00e9", "+C3", "+FF", "+C3+28", "\x00"])
def test_invalid_xtext_is_refused(bad):
    with pytest.raises(XtextError):
        decode_xtext(bad)


def test_utf8_addr_examples():
    assert encode_utf8_addr("j\u00f6@example.net") == "j\\x{F6}@example.net"
    assert encode_utf8_addr("a+b=c\\d e") == "a\\x{2B}b\\x{3D}c\\x{5C}d\\x{20}e"
    assert encode_utf8_addr("\U0001F600") == "\\x{1F600}"
    assert decode_utf8_addr("caf\\x{E9}@x.test") == "caf\u00e9@x.test"
    assert decode_utf8_addr("caf\u00e9@x.test") == "caf\u00e9@x.test"      # utf-8-addr-unitext
    assert decode_utf8_addr("\\x{10FFFF}") == "\U0010ffff"


@pytest.mark.parametrize("bad", ["", "a+b", "a=b", "a b", "a\\b", "\\x{E}", "\\x{e9}", "\\x{1234567}",
                                 "\\x{D800}", "\\x{110000}", "\\x{E9"])
def test_invalid_utf8_addr_is_refused(bad):
    with pytest.raises(XtextError):
        decode_utf8_addr(bad)


def test_orcpt_encoding():
    assert encode_orcpt("rfc822;bob+tag@example.net") == "rfc822;bob+2Btag@example.net"
    assert encode_orcpt("rfc822;j\u00f6@example.net") == "utf-8;j\\x{F6}@example.net"
    assert encode_orcpt("UTF-8;a@b.test") == "utf-8;a@b.test"


def test_the_server_answers_bad_xtext_with_501():
    with pytest.raises(AddressError) as refused:
        parse_mail_from("FROM:<a@b.test> ENVID=caf+C3")
    assert refused.value.reply == codes.BAD_ARGUMENTS.with_text("Invalid xtext")
    with pytest.raises(AddressError) as refused:
        parse_rcpt_to("TO:<a@b.test> ORCPT=utf-8;\\x{D800}", smtputf8=True)
    assert refused.value.reply == codes.BAD_ARGUMENTS.with_text("Bad ORCPT parameter")
    assert parse_mail_from("FROM:<a@b.test> ENVID=caf+C3+A9").envid == "caf\u00e9"


@fuzz_settings(300)
@given(TEXT)
def test_xtext_encode_decode_round_trips(value):
    encoded = encode_xtext(value)
    assert XTEXT.fullmatch(encoded)
    assert decode_xtext(encoded) == value


@fuzz_settings(300)
@given(TEXT.filter(bool))
def test_utf8_addr_xtext_encode_decode_round_trips(value):
    encoded = encode_utf8_addr(value)
    assert UTF8_ADDR_XTEXT.fullmatch(encoded)
    assert decode_utf8_addr(encoded) == value


@fuzz_settings(300)
@given(st.text(st.sampled_from("+=\\x{}0129ACEFa@. \u00e9"), max_size=20) | st.text(max_size=20))
def test_any_text_decodes_or_raises_xtext_error(value):
    for decode, encode in ((decode_xtext, encode_xtext), (decode_utf8_addr, encode_utf8_addr)):
        try:
            decoded = decode(value)
        except XtextError:
            continue
        assert decode(encode(decoded)) == decoded
