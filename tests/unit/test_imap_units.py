"""Unit tests of the IMAP helper modules, the store contract of the fakes, and the [imap] config."""
from __future__ import annotations

import dataclasses
import time

import pytest
from twisted.mail import imap4
from zope.interface.verify import verifyObject

from imap_harness import MULTIPART, SIMPLE, FakeFolder, FakeMailStore, FakeUserMailbox
from mailgw import config as config_module
from mailgw.config import ConfigError, load
from mailgw.imap import message as mime
from mailgw.imap.listing import list_entries, lsub_entries, match_pattern
from mailgw.imap.mailbox import IMAPAccount, normalise_name
from mailgw.imap.message import MessageCache, parse_address_list, parse_header_of
from mailgw.imap.parser import STAR, ParseError, Reader
from mailgw.imap.wire import (
    BadMailboxName,
    astring,
    decode_mailbox,
    encode_mailbox,
    internaldate,
    ordered_uid_set,
    string,
    uid_set,
)
from mailgw.interfaces import IFolder, IMailStore, IUserMailbox


# -- the fakes keep the store contract ------------------------------------------------------

def test_fake_store_provides_the_store_interfaces():
    store = FakeMailStore()
    assert verifyObject(IMailStore, store)
    mailbox = store.mailbox("alice@example.test")
    assert verifyObject(IUserMailbox, mailbox)
    assert verifyObject(IFolder, mailbox.get("INBOX"))


def test_account_provides_imap4_iaccount():
    assert verifyObject(imap4.IAccount, IMAPAccount(FakeUserMailbox("alice@example.test")))


def test_account_iaccount_methods_work_on_the_store():
    mailbox = FakeUserMailbox("alice@example.test")
    account = IMAPAccount(mailbox)
    results = []
    account.create(b"Lists").addCallback(results.append)
    account.subscribe("Lists").addCallback(results.append)
    account.isSubscribed("Lists").addCallback(results.append)
    account.listMailboxes("", "L*").addCallback(results.append)
    account.select("INBOX", rw=False).addCallback(lambda view: results.append(view.readonly))
    account.rename("Lists", "Mailing").addCallback(results.append)
    account.unsubscribe("Lists").addCallback(results.append)
    account.delete("Mailing").addCallback(results.append)
    assert results == [None, None, True, [("Lists", None)], True, None, None, None]


# -- wire -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["INBOX", "Entwürfe", "日本語", "a&b", "&", "Ünïcödé/Sub", "~peter/mail/台北"])
def test_mailbox_names_round_trip_modified_utf7(name):
    assert decode_mailbox(encode_mailbox(name)) == name


def test_modified_utf7_known_values():
    # RFC 3501 §5.1.3 example.
    assert encode_mailbox("~peter/mail/台北/日本語") == b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert encode_mailbox("a&b") == b"a&-b"


@pytest.mark.parametrize("raw", [b"&Jjo", b"&U,BTFw", b"&AGE-", b"&!!-", b"a\x01b", b"\xff\xfe", b"&-\xc3\xa9",
                                 b"&2D3-"])
def test_modified_utf7_decoding_is_strict(raw):
    with pytest.raises(BadMailboxName):
        decode_mailbox(raw)


def test_raw_utf8_names_are_accepted():
    assert decode_mailbox("Entwürfe".encode()) == "Entwürfe"


def test_strings_are_quoted_or_literal():
    assert string(b"abc") == b'"abc"'
    assert string(b'a"b\\c') == b'"a\\"b\\\\c"'
    assert string(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert string("é".encode()) == b"{2}\r\n\xc3\xa9"
    assert string(b"x" * 2000).startswith(b"{2000}\r\n")
    assert astring(b"INBOX") == b"INBOX"
    assert astring(b"NIL") == b'"NIL"'
    assert astring(b"a b") == b'"a b"'


def test_uid_sets_are_compact():
    assert uid_set([1, 2, 3, 7, 9, 10]) == b"1:3,7,9:10"
    assert uid_set([]) == b""
    assert ordered_uid_set([5, 6, 2, 3]) == b"5:6,2:3"


def test_internaldate_format():
    assert internaldate(1_700_000_000) == b'"14-Nov-2023 22:13:20 +0000"'
    assert internaldate(1_709_629_872) == b'" 5-Mar-2024 09:11:12 +0000"'


# -- parser ---------------------------------------------------------------------------------------------

def reader(text: bytes, *literals: bytes) -> Reader:
    segments = [text]
    for literal in literals:
        segments[-1:] = [segments[-1].split(b"{", 1)[0], literal, segments[-1].split(b"}", 1)[1]]
    return Reader(segments)


def test_sequence_sets_are_pairs_not_expanded():
    r = Reader([b"1:4294967295,*,3:1,7"])
    assert r.sequence_set() == ((1, 4294967295), (STAR, STAR), (3, 1), (7, 7))


@pytest.mark.parametrize("text", [b"0", b"1:0", b"4294967296", b"1,,2", b":", b"1:", b"12345678901", b"a"])
def test_bad_sequence_sets(text):
    with pytest.raises(ParseError):
        Reader([text]).sequence_set()


def test_quoted_strings_and_literals():
    r = Reader([b'"a\\"b" ', b"lit\r\neral", b" x"])
    assert r.astring() == b'a"b'
    r.sp()
    assert r.astring() == b"lit\r\neral"
    r.sp()
    assert r.astring() == b"x"
    r.end()
    with pytest.raises(ParseError):
        Reader([b'"a\\b"']).quoted()
    with pytest.raises(ParseError):
        Reader([b'"abc']).quoted()


def test_dates():
    assert Reader([b'" 5-Mar-2024 10:11:12 +0100"']).date_time() == 1_709_629_872.0
    assert Reader([b"1-Feb-2024"]).date() == (2024, 2, 1)
    assert Reader([b'"01-Feb-2024"']).date() == (2024, 2, 1)
    for bad in (b'"5-Foo-2024 10:11:12 +0100"', b'"5-Mar-2024 25:11:12 +0100"', b'"5-Mar-2024"'):
        with pytest.raises(ParseError):
            Reader([bad]).date_time()


def test_flags_are_canonical():
    assert Reader([b"(\\seen \\DELETED $Label)"]).flag_list() == ["\\Seen", "\\Deleted", "$Label"]
    with pytest.raises(ParseError):
        Reader([b"(\\Recent)"]).flag_list()
    with pytest.raises(ParseError):
        Reader([b"(\\*)"]).flag_list()


# -- LIST patterns --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,name,result", [
    ("*", "a/b/c", True), ("%", "a/b", False), ("%", "a", True), ("a/%", "a/b", True), ("a/%", "a/b/c", False),
    ("a*c", "a/b/c", True), ("a%c", "a/b/c", False), ("inbox", "INBOX", True), ("InBox/%", "INBOX/x", True),
    ("Inbox", "Inbox2", False), ("sent", "Sent", False), ("", "", True), ("a", "", False), ("*x", "x", True),
])
def test_match_pattern(pattern, name, result):
    assert match_pattern(pattern, name) is result


def test_match_pattern_is_fast_on_pathological_input():
    started = time.monotonic()
    assert not match_pattern("*a" * 500 + "b", "a" * 255)
    assert not match_pattern("%a" * 500 + "b", "a" * 255)
    assert time.monotonic() - started < 1


def test_list_entries_attributes():
    entries = dict(list_entries(["INBOX", "Sent", "a/b/c"], "*", subscribed={"Sent"}))
    assert entries["INBOX"] == ["\\HasNoChildren"]
    assert entries["Sent"] == ["\\HasNoChildren", "\\Sent", "\\Subscribed"]
    assert entries["a"] == ["\\Noselect", "\\HasChildren"]
    assert entries["a/b/c"] == ["\\HasNoChildren"]
    assert lsub_entries(["a/b"], "%") == [("a", ["\\Noselect"])]


# -- message parsing --------------------------------------------------------------------------------------

def test_address_lists():
    assert parse_address_list(b'"Doe, John" <john@x.example>, jane@y.example (Jane Y)') == [
        (b"Doe, John", None, b"john", b"x.example"), (b"Jane Y", None, b"jane", b"y.example")]
    assert parse_address_list(b"team: a@x, b@y; c@z") == [
        (None, None, b"team", None), (None, None, b"a", b"x"), (None, None, b"b", b"y"),
        (None, None, None, None), (None, None, b"c", b"z")]
    assert parse_address_list(b"undisclosed-recipients:;") == [
        (None, None, b"undisclosed-recipients", None), (None, None, None, None)]
    assert parse_address_list(b"<@relay.example:user@host.example>") == [
        (None, b"@relay.example", b"user", b"host.example")]
    assert parse_address_list(b"nobody") == [(None, None, b"nobody", b"MISSING_DOMAIN")]
    assert parse_address_list(b"") == []


@pytest.mark.parametrize("value", [
    b"a@b.example", b"  a@b.example ", b"<a@b.example>", b"Name <a@b.example>", b"Two  Words\t<x.y@z>",
    b'"Quoted, Name" <a@b>', b'"Q \\"x\\"" <a@b>', b"A. B. <c@d>", b"=?utf-8?q?x?= <a@b>",
])
def test_simple_address_fast_path_agrees_with_the_full_parser(value):
    from mailgw.imap.message import _SIMPLE_ADDRESS, parse_address_list_general
    assert _SIMPLE_ADDRESS.match(value), value
    assert parse_address_list(value) == parse_address_list_general(value)


def test_envelope_defaults_and_quoting():
    envelope = mime.envelope(parse_header_of(SIMPLE).header)
    assert envelope.startswith(b'("Tue, 14 Nov 2023 22:13:20 +0000" "Hello there" (("Alice Example" NIL')
    odd = parse_header_of(b'Subject: a "quoted" \\ line\r\nFrom: x@y\r\n\r\n').header
    assert b'"a \\"quoted\\" \\\\ line"' in mime.envelope(odd)


def test_header_fields_are_raw_and_folded_lines_kept():
    header = parse_header_of(b"Subject: one\r\n two\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody").header
    assert header.values(b"subject") == [b"one two"]
    assert header.values(b"x-a") == [b"1", b"2"]
    assert header.select(frozenset({b"subject"}), exclude=False) == b"Subject: one\r\n two\r\n\r\n"


def test_mime_tree_of_the_multipart_fixture():
    root = mime.parse_mime(MULTIPART)
    assert [child.type for child in root.children] == [b"text", b"application", b"message"]
    inner = root.children[2].encapsulated
    assert inner.header.first(b"subject") == b"inner"
    assert mime.section_bytes(MULTIPART, root, (3, 1), "", frozenset()) == b"inner body"


def test_multipart_without_parts_still_has_one_body():
    data = b"Content-Type: multipart/mixed; boundary=zz\r\n\r\nno parts here\r\n"
    root = mime.parse_mime(data)
    assert mime.body_structure(data, root, extended=False) == \
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "mixed")'


def test_boundary_prefix_of_a_longer_boundary_is_not_a_delimiter():
    data = (b"Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\none\r\n--abc\r\n"
            b"\r\n--ab\r\n\r\ntwo\r\n--ab--\r\n")
    root = mime.parse_mime(data)
    assert [data[c.header_end:c.end] for c in root.children] == [b"one\r\n--abc\r\n", b"two"]


def test_encoded_words_are_decoded_for_search():
    assert mime.decode_header_text(b"=?UTF-8?B?R3LDvMOfZQ==?= =?iso-8859-1?q?caf=E9?= x") == "Grüßecafé x"
    assert mime.decode_header_text(b"=?bogus?Q?a_b?=") == "a b"
    assert mime.decode_header_text(b"=?utf-8?B?!!!?=") == "=?utf-8?B?!!!?="


def test_body_text_decodes_transfer_encodings():
    root = mime.parse_mime(MULTIPART)
    text = mime.body_text(MULTIPART, root)
    assert "café au lait" in text and "inner body" in text


def test_cache_is_bounded_and_least_recently_used():
    cache = MessageCache(max_bytes=10_000)
    for uid in range(100):
        cache.put(("a", "INBOX", 1, uid), parse_header_of(SIMPLE))
    assert cache.bytes <= 10_000
    assert cache.get(("a", "INBOX", 1, 99)) is not None
    assert cache.get(("a", "INBOX", 1, 0)) is None
    assert len(cache) < 100


def test_normalise_name():
    assert normalise_name(b"inbox") == "INBOX"
    assert normalise_name(b"Inbox/Sub") == "INBOX/Sub"
    assert normalise_name(b"Entw&APw-rfe") == "Entwürfe"


# -- [imap] configuration -----------------------------------------------------------------------------------

def test_imap_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load()
    limits = config.imap
    assert limits.idle_timeout == 1800.0                  # RFC 3501 §5.4: at least 30 minutes
    assert limits.session_timeout == 0.0
    assert limits.max_command_line == 65536 and limits.max_literal == 65536
    assert limits.max_append == config.smtp.max_message_size
    assert limits.max_paren_depth == 32
    assert limits.allow_plaintext_auth is False


def test_imap_max_append_follows_smtp_unless_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(overrides={"smtp": {"max_message_size": 5000}}).imap.max_append == 5000
    assert load(overrides={"smtp": {"max_message_size": 5000}, "imap": {"max_append": 9000}}).imap.max_append == 9000


def test_imap_errors_are_collected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        load(overrides={"imap": {"idle_timeout": 0, "max_paren_depth": 1, "max_append": 10, "bogus": 1,
                                 "max_connections": 2, "max_connections_per_ip": 3,
                                 "allow_plaintext_auth": "yes"}})
    errors = raised.value.errors
    assert any(e.startswith("imap.idle_timeout:") for e in errors)
    assert any(e.startswith("imap.max_paren_depth:") for e in errors)
    assert any(e.startswith("imap.max_append:") for e in errors)
    assert any(e.startswith("imap.bogus: unknown key") for e in errors)
    assert any(e.startswith("imap.max_connections_per_ip:") for e in errors)
    assert any(e.startswith("imap.allow_plaintext_auth:") for e in errors)


def test_default_toml_documents_every_imap_key():
    text = config_module.EMBEDDED_DEFAULT.read_text()
    section = text[text.index("[imap]"):]
    section = section[:section.index("\n[", 1)]
    for key in [*config_module.IMAP_INTEGER_LIMITS, *config_module.IMAP_SECONDS_LIMITS, "allow_plaintext_auth"]:
        assert f"\n{key} = " in section, key


def test_imap_limits_are_frozen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        load().imap.max_literal = 1  # type: ignore[misc]


def test_hand_built_config_without_imap_gets_defaults():
    from mailgw.imap.server import default_limits
    config = dataclasses.replace(load(overrides={"server": {"data_dir": "/nonexistent"}}), imap=None)
    assert default_limits(config).max_append == config.smtp.max_message_size


def test_fake_folder_sizes_are_wire_octets():
    folder = FakeFolder("INBOX", 1)
    folder.add(b"a\nb\n")
    assert folder.messages()[0].size == 6
