"""Sieve comparators, match types and message access (mailgw.sieve)."""

from __future__ import annotations

import time

import pytest

from mailgw.sieve.matching import (
    MAX_PATTERN,
    MAX_VALUE,
    RegexError,
    check_comparator,
    check_regex,
    count_match,
    match,
)
from mailgw.sieve.message import (
    Address,
    SieveMessage,
    parse_date,
    split_subaddress,
)


def m(value, keys, match_type, comparator="i;ascii-casemap", relation=None):
    return match(value, keys, match_type=match_type, comparator=comparator,
                 relation=relation)


# --- comparators ------------------------------------------------------------

def test_octet_is_case_sensitive():
    assert m("Frobnitzm", ["Frobnitzm"], "is", "i;octet")
    assert m("Frobnitzm", ["frobnitzm"], "is", "i;octet") is None


def test_casemap_folds_ascii_only():
    assert m("FROBNITZM", ["frobnitzm"], "is")
    # RFC 4790 §9.2: only A-Z are folded.
    assert m("\u00c9t\u00e9", ["\u00e9t\u00e9"], "is") is None
    assert m("\u00c9T\u00e9", ["\u00c9t\u00e9"], "is")


def test_rfc5228_2_7_1_match_types():
    # RFC 5228 §2.7.1: :contains is a substring test (the empty key is in
    # every value); :matches must match the whole value, "*" any run of
    # characters, "?" exactly one.
    for key in ("frob", "nit", ""):
        assert m("frobnitzm", [key], "contains")
    assert m("frobnitzm", ["fbm"], "contains") is None
    assert m("frobnitzm", ["frob*"], "matches")
    assert m("frobnitzm", ["*nit*"], "matches")
    assert m("frobnitzm", ["f?obnitzm"], "matches")
    assert m("frobnitzm", ["frob"], "matches") is None
    assert m("frobnitzm", ["f?bnitzm"], "matches") is None


def test_any_key_matches_and_empty_keys():
    r = m("abc", ["x", "B"], "contains")
    assert r is not None and r.key == "B"
    assert m("abc", [], "is") is None


def test_ascii_numeric():
    c = "i;ascii-numeric"
    assert m("0123", ["123"], "is", c)
    assert m("123abc", ["123"], "is", c)
    assert m("124", ["123"], "is", c) is None
    assert m("10", ["9"], "value", c, "gt")
    assert m("10", ["9"], "value", "i;ascii-casemap", "gt") is None
    # RFC 4790 §9.1.1: no leading digit = positive infinity; equal
    # infinities are equal and greater than every number.
    assert m("abc", ["xyz"], "is", c)
    assert m("abc", ["99999999999999999999"], "value", c, "gt")
    assert m("5", ["none"], "value", c, "lt")
    assert m("", ["x"], "value", c, "eq")
    # long digit strings do not hit int() limits
    assert m("9" * 6000, ["9" * 5999], "value", c, "gt")


def test_ascii_numeric_refuses_substring_match_types():
    for mt in ("contains", "matches", "regex"):
        with pytest.raises(ValueError):
            check_comparator("i;ascii-numeric", mt)
    with pytest.raises(ValueError):
        check_comparator("i;unicode-casemap")


# --- relational (RFC 5231) --------------------------------------------------

def test_rfc5231_value():
    # RFC 5231 §4.1: the value from the message is on the left of the
    # relation and the key on the right; ordering is the comparator's.
    assert m("foo@example.com", ["M"], "value", relation="lt")  # "f" < "m"
    assert m("foo@example.com", ["M"], "value", relation="gt") is None
    assert m("Wed, 13 Feb 1999", ["M"], "value", relation="gt")
    assert m("2", ["3"], "value", "i;ascii-numeric", "le")
    assert m("3", ["3"], "value", "i;ascii-numeric", "ne") is None
    assert m("3", ["3"], "value", "i;ascii-numeric", "ge")
    assert m("abc", ["ABD"], "value", "i;ascii-casemap", "lt")
    assert m("abc", ["ABD"], "value", "i;octet", "gt")  # "a" > "A"


RFC5231_MSG = (
    b"received: ...\r\n"
    b"received: ...\r\n"
    b"subject: example\r\n"
    b"to: foo@example.com.invalid, baz@example.com.invalid\r\n"
    b"cc: qux@example.com.invalid\r\n"
    b"\r\n"
)


def test_rfc5231_count_example():
    # The RFC 5231 §6 example message: two To addresses, one Cc address,
    # two Received fields.
    msg = SieveMessage.from_bytes(RFC5231_MSG)

    def addr_count(*names):
        return sum(len(msg.addresses(n)) for n in names)

    def hdr_count(*names):
        return sum(len(msg.headers(n)) for n in names)

    # address :count "ge" :comparator "i;ascii-numeric" ["to", "cc"] ["3"]
    assert count_match(addr_count("to", "cc"), ["3"], "ge")
    assert count_match(addr_count("to"), ["3"], "ge") is None
    assert count_match(addr_count("cc"), ["3"], "ge") is None
    # header :count "ge" ... ["received"] ["3"] is false,
    # ["received", "subject"] ["3"] is true
    assert count_match(hdr_count("received"), ["3"], "ge") is None
    assert count_match(hdr_count("received", "subject"), ["3"], "ge")


def test_count_match():
    assert count_match(3, ["3"], "gt") is None
    assert count_match(2, ["1", "2"], "eq").key == "2"
    assert count_match(0, ["0"], "eq")
    assert count_match(10, ["9"], "gt")
    # with a string comparator "10" sorts before "9"
    assert count_match(10, ["9"], "gt", "i;ascii-casemap") is None
    with pytest.raises(ValueError):
        count_match(1, ["1"], "bogus")
    with pytest.raises(ValueError):
        m("x", ["1"], "value")
    with pytest.raises(ValueError):
        m("x", ["1"], "count", relation="eq")


# --- :matches and match variables (RFC 5229 §3.2) -----------------------------

def test_rfc5229_examples():
    r = m("[acme-users] [fwd] version 1.0 is out", ["[*] *"], "matches")
    assert r.groups == ("[acme-users] [fwd] version 1.0 is out",
                        "acme-users", "[fwd] version 1.0 is out")
    r = m("coyote@ACME.Example.COM", ["coyote@**.com", "wile@**.com"], "matches")
    assert r.groups == ("coyote@ACME.Example.COM", "", "ACME.Example")
    r = m("Acme List <acme-users@lists.example.com>", ["*<*@*"], "matches")
    assert r.groups[1:] == ("Acme List ", "acme-users", "lists.example.com>")


def test_matches_question_mark_and_escapes():
    r = m("abc", ["a?c"], "matches")
    assert r.groups == ("abc", "b")
    assert m("ac", ["a?c"], "matches") is None
    assert m("a*c", [r"a\*c"], "matches")
    assert m("abc", [r"a\*c"], "matches") is None
    assert m("a?c", [r"a\?c"], "matches")
    assert m("abc", [r"a\?c"], "matches") is None
    assert m(r"a\c", [r"a\\c"], "matches")
    # regex metacharacters in the pattern are literal
    assert m("a.c(d)", ["a.c(*)"], "matches").groups[1] == "d"
    assert m("abc(d)", ["a.c(*)"], "matches") is None
    # wildcards span line breaks; the whole value must match
    assert m("a\nb", ["a*"], "matches")
    assert m("xabc", ["abc"], "matches") is None


def test_matches_groups_keep_original_case():
    r = m("Hello WORLD", ["hello *"], "matches")
    assert r.groups == ("Hello WORLD", "WORLD")
    assert m("Hello WORLD", ["hello *"], "matches", "i;octet") is None


def test_long_value_is_cut_for_matches():
    value = "a" * (MAX_VALUE + 10) + "b"
    assert m(value, ["*b"], "matches") is None
    assert m(value, ["a*"], "matches")


# --- :regex -------------------------------------------------------------------

def test_regex_groups_and_search():
    r = m("Subject: [list] hello", [r"\[([a-z]+)\] (.*)"], "regex")
    assert r.groups == ("[list] hello", "list", "hello")
    assert m("ABC", ["abc"], "regex")
    assert m("ABC", ["abc"], "regex", "i;octet") is None
    r = m("a", ["(a)(x)?"], "regex")
    assert r.groups == ("a", "a", "")


def test_regex_refused_patterns():
    with pytest.raises(RegexError):
        check_regex("(?=lookahead)")
    with pytest.raises(RegexError):
        check_regex(r"(a)\1")
    with pytest.raises(RegexError):
        m("x", ["("], "regex")
    with pytest.raises(ValueError):
        check_regex("a", "i;ascii-numeric")
    check_regex("^[a-z]+$", "i;octet")
    with pytest.raises(RegexError):
        check_regex("a" * (MAX_PATTERN + 1))


def test_regex_no_catastrophic_backtracking():
    pattern = "(a+)+$"
    value = "a" * 40000 + "!"
    start = time.monotonic()
    assert m(value, [pattern], "regex") is None
    assert m("a" * 5000 + "b", ["(a|aa)*c"], "regex") is None
    assert time.monotonic() - start < 2.0


# --- headers -------------------------------------------------------------------

MSG = (
    b"Return-Path: <bounce@example.org>\r\n"
    b"From: =?UTF-8?B?SsO2cmcgTcO8bGxlcg==?= <joerg@example.com>\r\n"
    b"To: \"Wile E. (the) Coyote\" <coyote+acme@ACME.Example.COM> (genius),\r\n"
    b"  Road Runner <rr@example.com>\r\n"
    b"Cc: friends: a@example.net, B <b@example.net>;, undisclosed:;\r\n"
    b"Subject: =?ISO-8859-1?Q?Caf=E9_au_lait?= is\r\n"
    b"\tready\r\n"
    b"subject: second\r\n"
    b"Date: Sat, 13 Feb 1999 15:00:00 +0100\r\n"
    b"X-Bad: not an address at all <<\r\n"
    b"\r\n"
    b"Hello\r\n"
)


def test_headers_unfolded_decoded_in_order():
    msg = SieveMessage.from_bytes(MSG)
    assert msg.headers("SUBJECT") == ["Caf\u00e9 au lait is\tready", "second"]
    assert msg.headers("from") == ["J\u00f6rg M\u00fcller <joerg@example.com>"]
    assert msg.headers("x-missing") == []
    assert msg.raw_header_names[:3] == ["Return-Path", "From", "To"]
    assert msg.raw_header_names.count("subject") == 1


def test_size_counts_crlf():
    lf = MSG.replace(b"\r\n", b"\n")
    assert SieveMessage.from_bytes(lf).size == len(MSG)
    assert SieveMessage.from_bytes(MSG).size == len(MSG)
    lf_msg = SieveMessage.from_bytes(lf)
    assert lf_msg.headers("subject")[1] == "second"


def test_addresses_comments_and_groups():
    msg = SieveMessage.from_bytes(MSG)
    to = msg.addresses("to")
    assert [a.all for a in to] == ["coyote+acme@ACME.Example.COM", "rr@example.com"]
    assert to[0].localpart == "coyote+acme"
    assert to[0].domain == "ACME.Example.COM"
    assert [a.all for a in msg.addresses("cc")] == ["a@example.net", "b@example.net"]
    assert msg.addresses("from") == [Address("joerg@example.com", "joerg", "example.com")]
    # an unparsable value is taken whole as the address
    bad = msg.addresses("x-bad")
    assert [a.all for a in bad] == ["not an address at all <<"]
    one = SieveMessage.from_bytes(b"To: root\r\nCc: undisclosed-recipients:;\r\n\r\n")
    assert one.addresses("to") == [Address("root", "root", "")]
    assert one.addresses("cc") == []


def test_address_match_rfc5229_example():
    msg = SieveMessage.from_bytes(MSG)
    r = m(msg.addresses("to")[0].all, ["coyote+*@**.com"], "matches")
    assert r.groups[1:] == ("acme", "", "ACME.Example")


def test_split_subaddress():
    # RFC 5233 §4
    assert split_subaddress("ken+sieve") == ("ken", "sieve")
    assert split_subaddress("ken") == ("ken", None)
    assert split_subaddress("ken+") == ("ken", "")
    assert split_subaddress("ken+a+b") == ("ken", "a+b")
    assert split_subaddress("ken-x", "-") == ("ken", "x")


def test_parse_date():
    msg = SieveMessage.from_bytes(MSG)
    d = parse_date(msg.headers("date")[0])
    assert (d.year, d.month, d.day, d.hour) == (1999, 2, 13, 15)
    assert d.utcoffset().total_seconds() == 3600
    assert parse_date("not a date") is None
    assert parse_date("") is None


# --- body (RFC 5173) ------------------------------------------------------------

MULTI = (
    b"From: a@example.com\n"
    b"To: b@example.com\n"
    b"Subject: parts\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: multipart/mixed; boundary=\"OUTER\"\n"
    b"\n"
    b"preamble\n"
    b"--OUTER\n"
    b"Content-Type: multipart/alternative; boundary=\"INNER\"\n"
    b"\n"
    b"--INNER\n"
    b"Content-Type: text/plain; charset=iso-8859-1\n"
    b"Content-Transfer-Encoding: quoted-printable\n"
    b"\n"
    b"Caf=E9 plain\n"
    b"--INNER\n"
    b"Content-Type: text/html; charset=utf-8\n"
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    b"PHA+Q2Fmw6kgaHRtbDwvcD4K\n"
    b"--INNER--\n"
    b"--OUTER\n"
    b"Content-Type: application/octet-stream\n"
    b"Content-Disposition: attachment; filename=\"x.bin\"\n"
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    b"c2VjcmV0IHBheWxvYWQ=\n"
    b"--OUTER--\n"
)


def test_body_raw():
    msg = SieveMessage.from_bytes(MULTI)
    (raw,) = msg.body_text("raw")
    assert "Caf=E9 plain" in raw and "PHA+" in raw and raw.startswith("preamble")


def test_body_text():
    msg = SieveMessage.from_bytes(MULTI)
    parts = msg.body_text("text")
    assert len(parts) == 2
    assert "Caf\u00e9 plain" in parts[0]
    assert "<p>Caf\u00e9 html</p>" in parts[1]
    assert not any("secret" in p for p in parts)


def test_body_content():
    msg = SieveMessage.from_bytes(MULTI)
    html = msg.body_text("content", ("text/html",))
    assert len(html) == 1 and "html" in html[0]
    assert len(msg.body_text("content", ("text",))) == 2
    assert len(msg.body_text("content", ("TEXT/PLAIN",))) == 1
    every = msg.body_text("content", ("",))
    # RFC 5173 §5.2: "" matches the multipart too, whose prologue is searched.
    assert len(every) == 4 and every[0] == "preamble" and "secret payload" in every[3]
    assert msg.body_text("content", ("image",)) == []
    assert msg.body_text("content", ()) == []
    with pytest.raises(ValueError):
        msg.body_text("bogus")


def test_body_single_part_and_no_body():
    msg = SieveMessage.from_bytes(b"Subject: x\r\n\r\nplain body\r\n")
    assert msg.body_text("text") == ["plain body\r\n"]
    assert msg.body_text("raw") == ["plain body\r\n"]
    empty = SieveMessage.from_bytes(b"Subject: only headers\r\n")
    assert empty.headers("subject") == ["only headers"]
    assert empty.body_text("raw") == [""]
