"""Maildir file names (mailgw.store.maildir_name, docs/store-format.md §3)."""
from __future__ import annotations

import itertools

import pytest

from mailgw.store import maildir_name as mn
from mailgw.store.events import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN, SYSTEM_FLAGS
from mailgw.store.maildir_name import ParsedName, make_name, parse_name

BASE = "1700000000.M123456P4242Q7.mx.example.org"


# -- building ----------------------------------------------------------------------

def test_unique_base_and_hostname_escapes():
    host = mn.escape_hostname("a/b:c,d.example")
    assert host == r"a\057b\072c\054d.example"
    assert ":" not in host and "," not in host and "/" not in host
    assert mn.unique_base(1_700_000_000.123456, 4242, 7, "mx.example.org") == BASE
    assert mn.unique_base(5.0, 1, 1, "h") == "5.M0P1Q1.h"
    # The microseconds are truncated, never rounded up into the next second.
    assert mn.unique_base(5.9999999, 1, 1, "h") == "5.M999999P1Q1.h"


def test_delivery_names_carry_both_sizes():
    assert mn.delivery_name(BASE, 10, 12) == BASE + ",S=10,W=12"
    assert mn.with_wire("foreign.host", 99) == "foreign.host,W=99"
    for size, wire in ((-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            mn.delivery_name(BASE, size, wire)
    with pytest.raises(ValueError):
        mn.with_wire("k", -5)


def test_make_name_is_the_cur_form():
    assert make_name(BASE + ",S=10,W=12", 7, "FS") == BASE + ",S=10,W=12,U=7:2,FS"
    assert make_name("plain", 1, "") == "plain,U=1:2,"
    assert make_name("", 1, "S") == ",U=1:2,S"            # a file named ":2,S" still gets a name


@pytest.mark.parametrize("key, uid, letters", [
    ("a:b", 1, ""),               # would move the info
    ("a/b", 1, ""),
    ("a\0b", 1, ""),
    ("k", 0, ""),
    ("k", -1, ""),
    ("k", 2**32, ""),
    ("k", 1, "S/"),
    ("k", 1, "S\0"),
])
def test_make_name_refuses_what_no_name_may_hold(key, uid, letters):
    with pytest.raises(ValueError):
        make_name(key, uid, letters)


def test_new_keys_for_copies():
    key = BASE + ",S=10,W=12"
    assert mn.rekey(key, "1.M2P3Q4.h") == "1.M2P3Q4.h,S=10,W=12"
    assert mn.rekey("nofields", "1.M2P3Q4.h") == "1.M2P3Q4.h"
    assert mn.copy_key(key, "1.M2P3Q4.h", 99) == "1.M2P3Q4.h,S=10,W=12"
    assert mn.copy_key("nofields", "1.M2P3Q4.h", 99) == "1.M2P3Q4.h,W=99"


# -- parsing -----------------------------------------------------------------------

def test_round_trip():
    for uid in (1, 2, 4242, mn.MAX_UID):
        for letters in ("", "S", "DFRST", "FPSa"):
            key = mn.delivery_name(BASE, 10, 12)
            name = make_name(key, uid, letters)
            assert parse_name(name) == ParsedName(key, uid, 12, letters)
            assert make_name(*parse_name(name)[:2], parse_name(name).letters) == name
            assert mn.size_from_name(name) == mn.size_from_name(key) == 10
            assert mn.strip_info(name) == f"{key},U={uid}"


def test_a_delivered_name_has_no_uid_and_no_letters():
    assert parse_name(BASE + ",S=10,W=12") == (BASE + ",S=10,W=12", None, 12, "")


@pytest.mark.parametrize("name, parsed, size", [
    # Dovecot: S= and W=, flags; read as ours.
    ("1700000000.M1P2Q3.host,S=1200,W=1234:2,S", ("1700000000.M1P2Q3.host,S=1200,W=1234", None, 1234, "S"), 1200),
    ("1700000000.M1P2Q3.host,S=1200,W=1234:2,Sab", ("1700000000.M1P2Q3.host,S=1200,W=1234", None, 1234, "Sab"), 1200),
    # No info at all, no fields at all (qmail, procmail).
    ("1700000000.12345.host", ("1700000000.12345.host", None, None, ""), None),
    ("1700000000.12345.host:2,", ("1700000000.12345.host", None, None, ""), None),
    # Only S= (no W=): the size on disk is known, the CRLF size is not.
    ("1.M1P1Q1.h,S=100", ("1.M1P1Q1.h,S=100", None, None, ""), 100),
    # An experimental info carries no flags.
    ("exp:1,whatever", ("exp", None, None, ""), None),
    # Passed (P) and other software's letters are kept; a second ":" belongs to the info.
    ("m:2,PRS", ("m", None, None, "PRS"), None),
    ("m:2,S:x", ("m", None, None, "S:x"), None),
    # Field order does not matter; unknown fields stay in the key.
    ("m,W=5,X=y,S=3,U=9:2,T", ("m,W=5,X=y,S=3", 9, 5, "T"), 3),
    # Malformed fields are never interpreted (and stay in the key).
    ("a,U=x,W=,U=3:2,S", ("a,U=x,W=", 3, None, "S"), None),
    ("a,U=12345678901,W=1e3,S=-1", ("a,U=12345678901,W=1e3,S=-1", None, None, ""), None),
    ("a,U=,S=", ("a,U=,S=", None, None, ""), None),
    # Only the last well-formed U= is ours (make_name appends it); the unique part is never a field.
    ("a,U=1,U=2", ("a,U=1", 2, None, ""), None),
    ("a,U=1,X=2,U=x", ("a,X=2,U=x", 1, None, ""), None),
    ("S=5,W=6", ("S=5,W=6", None, 6, ""), None),
    # A name that is only an info.
    (":2,S", ("", None, None, "S"), None),
    # Sizes in the info are not sizes.
    ("m:2,S=5", ("m", None, None, "S=5"), None),
])
def test_names_of_other_writers(name, parsed, size):
    assert parse_name(name) == parsed
    assert mn.size_from_name(name) == size


def test_the_last_well_formed_w_counts_and_s_takes_twenty_digits():
    assert parse_name("m,W=1,W=2").wire == 2
    assert mn.size_from_name("m,S=1,S=2") == 1
    assert mn.size_from_name("m,S=" + "9" * 20) == int("9" * 20)
    assert mn.size_from_name("m,S=" + "9" * 21) is None


@pytest.mark.parametrize("garbage", ["", ".", "..", "a/b", "/", "cur/x:2,S", "nul\0byte"])
def test_parse_refuses_what_is_no_file_name(garbage):
    with pytest.raises(ValueError):
        parse_name(garbage)


@pytest.mark.parametrize("name", [
    "a,U=1,U=2:2,S", "a,U=007:2,", "m,W=5,X=y,S=3,U=9:2,T", "a,U=x,W=,U=3:2,S", ":2,S", "plain", "exp:1,x",
])
def test_a_name_made_from_a_parsed_name_parses_the_same(name):
    key, uid, wire, letters = parse_name(name)
    again = make_name(key, uid or 1, letters)
    assert parse_name(again) == (key, uid or 1, wire, letters)
    assert make_name(*parse_name(again)[:2], letters) == again


def test_names_of_other_writers_get_our_form_on_adoption():
    # What Folder does with a file found in cur/: same key, our U= and info.
    for foreign in ("1700000000.M1P2Q3.host,S=1200,W=1234:2,RS", "plain:2,T", "exp:1,x"):
        key, _uid, _wire, letters = parse_name(foreign)
        adopted = make_name(key, 5, letters)
        assert parse_name(adopted) == (key, 5, parse_name(foreign).wire, letters)


# -- flag letters ------------------------------------------------------------------

def test_every_system_flag_has_its_letter():
    expected = {DRAFT: "D", FLAGGED: "F", ANSWERED: "R", SEEN: "S", DELETED: "T"}
    assert mn.FLAG_LETTERS == expected and set(mn.FLAG_LETTERS) == set(SYSTEM_FLAGS)
    for flag, letter in expected.items():
        for spelling in (flag, flag.lower(), flag.upper()):
            assert mn.letter_of_flag(spelling) == letter
        assert mn.LETTER_FLAGS[letter] == flag
        assert mn.flags_of_letters(letter) == {flag}
    for not_stored in ("\\Recent", "\\*", "Seen", "$Forwarded", "", "\\"):
        assert mn.letter_of_flag(not_stored) is None


def test_every_combination_of_flags_round_trips_through_a_name():
    for n in range(len(SYSTEM_FLAGS) + 1):
        for flags in itertools.combinations(SYSTEM_FLAGS, n):
            letters = mn.sorted_letters(mn.letter_of_flag(f) for f in flags)
            assert letters == "".join(sorted(letters))            # ASCII order, as Maildir wants
            name = make_name(BASE + ",S=1,W=1", 3, letters)
            assert mn.flags_of_letters(parse_name(name).letters) == frozenset(flags)


def test_letters_of_other_software_carry_no_flags_and_are_kept():
    assert mn.flags_of_letters("PSab") == {SEEN}
    assert mn.flags_of_letters("") == frozenset()
    assert mn.sorted_letters("TSST") == "ST"
    assert mn.sorted_letters(frozenset("TDS")) == "DST"


@pytest.mark.parametrize("letters, change, mode, after", [
    ("", "S", "add", "S"),
    ("S", "S", "add", "S"),
    ("RS", "DT", "add", "DRST"),
    ("DFRST", "DFRST", "remove", ""),
    ("FS", "S", "remove", "F"),
    ("FS", "T", "remove", "FS"),
    ("FS", "T", "replace", "T"),
    ("FS", "", "replace", ""),
    # Letters that are no system flag's stay whatever the mode.
    ("PSa", "S", "remove", "Pa"),
    ("PSa", "T", "replace", "PTa"),
    ("aP", "F", "add", "FPa"),
])
def test_change_letters(letters, change, mode, after):
    assert mn.change_letters(letters, frozenset(change), mode) == after


def test_change_letters_refuses_an_unknown_mode():
    with pytest.raises(ValueError):
        mn.change_letters("S", frozenset("S"), "toggle")


def test_arrival_order_compares_the_unique_part_as_numbers():
    names = ["1700000000.M100000P1Q3.h", "1700000000.M99999P1Q10.h", "1700000000.M99999P1Q9.h",
             "1699999999.M999999P1Q1.h", "foreign-name", "1700000000.other.h"]
    assert sorted(names, key=mn.arrival_order) == [
        "1699999999.M999999P1Q1.h", "1700000000.other.h", "1700000000.M99999P1Q9.h",
        "1700000000.M99999P1Q10.h", "1700000000.M100000P1Q3.h", "foreign-name"]

