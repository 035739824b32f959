"""Round-trip properties (docs/fuzzing.md): what one side of the server
writes, the other side reads back unchanged.

- SMTP addresses: parse (MAIL FROM/RCPT TO) -> format (str, what the queue
  relays) -> parse again gives the same mailbox and DSN parameters;
- IMAP sequence sets: format (uid_set) -> parse (Reader.sequence_set) ->
  resolve gives the same numbers, and resolving clamps "1:4294967295"
  without allocating per number of the range;
- IMAP strings and literals: wire.string/astring/nstring -> the server's
  framing and Reader give the same octets; APPEND -> FETCH BODY[] too;
- dot-stuffing: the queue's dot_stuff -> our SMTP server's DATA gives the
  message back; POP3's stuff -> a client's un-stuffing gives it back;
- IMAP mailbox names: modified UTF-7 encode -> decode.
"""
from __future__ import annotations

import re
import tracemalloc
from array import array

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fuzzing import fuzz_settings, no_logged_failures
from imap_harness import IMAPSession, crlf, filled
from mailgw.imap import wire
from mailgw.imap.mailbox import SequenceError, SessionView
from mailgw.imap.parser import MAX_NUMBER, STAR, ParseError, Reader
from mailgw.pop3.server import stuff
from mailgw.smtp.data import canonical_line_ends, dot_stuff
from mailgw.smtp.xtext import encode_orcpt, encode_xtext as xtext
from mailgw.smtp import codes
from mailgw.smtp.address import AddressError, Mailbox, parse_mail_from, parse_mailbox, parse_rcpt_to
from mailgw.store.folder import to_crlf
from smtp_harness import FakeUserDB, Session as SMTPSession

# --- SMTP addresses (RFC 5321 §4.1.2) -------------------------------------------------------------

ATEXT = "abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=8)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
# qtextSMTP and quoted-pairSMTP: the quoted form is kept as sent ("a b"@x stays quoted).
quoted_local = st.lists(st.one_of(st.sampled_from(list(' !#[]~azAZ09@.,;:<>()')), st.sampled_from(['\\"', "\\\\",
                                                                                                    "\\a", "\\ "])),
                        max_size=10).map(lambda parts: '"' + "".join(parts) + '"')
local_part = (dot_atom | quoted_local).filter(lambda local: len(local.encode()) <= 64)
label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
domain_name = st.lists(label, min_size=1, max_size=4).map(".".join)
address_literal = st.one_of(
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"))
domain = st.one_of(domain_name, domain_name, address_literal)
source_route = st.lists(domain_name, max_size=2).map(lambda hops: ",".join("@" + hop for hop in hops) + ":"
                                                     if hops else "")
# RFC 6531: UTF-8 in atoms, quoted strings and labels (only with SMTPUTF8).
utf8_atom = st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
                    min_size=1, max_size=4).map(lambda text: "a" + text)


@fuzz_settings(150)
@given(route=source_route, local=local_part, domain=domain)
def test_address_parse_format_parse_round_trips(route, local, domain):
    # The relay decision depends on the domain: it must come out exactly, case-folded.
    mailbox = parse_mailbox(f"<{route}{local}@{domain}>", utf8=False, bad=codes.BAD_SENDER_SYNTAX)
    assert mailbox == Mailbox(local, domain.lower())
    assert str(mailbox) == f"{local}@{domain.lower()}"           # the source route is dropped
    assert parse_mailbox(f"<{mailbox}>", utf8=False, bad=codes.BAD_SENDER_SYNTAX) == mailbox
    assert mailbox.is_ascii


@fuzz_settings(100)
@given(local=utf8_atom, domain=domain_name)
def test_utf8_address_round_trips_with_smtputf8_and_is_refused_without(local, domain):
    path = f"<{local}@{domain}>"
    mailbox = parse_mailbox(path, utf8=True, bad=codes.BAD_SENDER_SYNTAX)
    assert mailbox == Mailbox(local, domain.lower()) and not mailbox.is_ascii
    assert parse_mailbox(f"<{mailbox}>", utf8=True, bad=codes.BAD_SENDER_SYNTAX) == mailbox
    with pytest.raises(AddressError) as refused:
        parse_mailbox(path, utf8=False, bad=codes.BAD_SENDER_SYNTAX)
    assert refused.value.reply == codes.NEEDS_SMTPUTF8


@fuzz_settings(300)
@given(path=st.one_of(st.text(max_size=40).map(lambda text: f"<{text}>"), st.text(max_size=40)),
       utf8=st.booleans())
def test_any_path_is_refused_or_parses_to_a_fixed_point(path, utf8):
    try:
        mailbox = parse_mailbox(path, utf8=utf8, bad=codes.BAD_SENDER_SYNTAX)
    except AddressError:
        return
    assert mailbox.domain == mailbox.domain.lower()
    assert parse_mailbox(f"<{mailbox}>", utf8=utf8, bad=codes.BAD_SENDER_SYNTAX) == mailbox


printable_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@fuzz_settings(150)
@given(sender=st.one_of(st.just(None), st.builds(Mailbox, local_part, domain_name.map(str.lower))),
       recipient=st.one_of(st.builds(Mailbox, local_part, domain.map(str.lower)), st.just(Mailbox("postmaster", ""))),
       envid=st.one_of(st.none(), any_text),
       notify=st.one_of(st.none(), st.just(("NEVER",)),
                        st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, unique=True)
                        .map(tuple)),
       orcpt=st.one_of(st.none(), printable_ascii.filter(bool).map(lambda text: f"rfc822;{text}"),
                       any_text.map(lambda text: f"utf-8;{text}")),
       ret=st.sampled_from([None, "FULL", "HDRS"]))
def test_relayed_envelope_parses_back_to_what_was_received(sender, recipient, envid, notify, orcpt, ret):
    # What the queue's client sends (mailgw/queue/client.py _start_transaction)
    # for an envelope our server received, read by a server like ours.
    mail = f"FROM:<{sender or ''}>"
    if ret:
        mail += f" RET={ret}"
    if envid:
        mail += f" ENVID={xtext(envid)}"
    rcpt = f"TO:<{recipient}>"
    if notify:
        rcpt += f" NOTIFY={','.join(notify)}"
    if orcpt:
        rcpt += f" ORCPT={encode_orcpt(orcpt)}"
    mail_from = parse_mail_from(mail)
    assert (mail_from.sender, mail_from.envid, mail_from.ret) == (sender, envid, ret)
    rcpt_to = parse_rcpt_to(rcpt, smtputf8=False)
    assert (rcpt_to.recipient, rcpt_to.notify, rcpt_to.orcpt) == (recipient, notify, orcpt)


def test_a_utf8_orcpt_survives_a_relay_hop():
    received = parse_rcpt_to("TO:<a@b.test> ORCPT=utf-8;caf\\x{E9}@x.test", smtputf8=True)
    relayed = parse_rcpt_to(f"TO:<{received.recipient}> ORCPT={encode_orcpt(received.orcpt)}", smtputf8=True)
    assert relayed.orcpt == received.orcpt == "utf-8;café@x.test"


def test_xtext_octets_survive_a_relay_hop():
    received = parse_mail_from("FROM:<a@b.test> ENVID=caf+C3+A9")
    assert xtext(received.envid) == "caf+C3+A9"


# --- IMAP sequence sets (RFC 3501 §9) --------------------------------------------------------------

uid = st.integers(min_value=1, max_value=MAX_NUMBER)
seq_value = st.one_of(st.integers(min_value=1, max_value=50), uid, st.just(MAX_NUMBER), st.just(STAR))


def expand(ranges) -> list[int]:
    """A sequence set's numbers in the order written (small ranges only)."""
    out = []
    for low, high in ranges:
        assert low is not STAR and high is not STAR
        out.extend(range(low, high + 1) if low <= high else range(low, high - 1, -1))
    return out


def format_ranges(ranges) -> bytes:
    def one(value):
        return b"*" if value is STAR else b"%d" % value
    return b",".join(one(low) if low == high else one(low) + b":" + one(high) for low, high in ranges)


@fuzz_settings(300)
@given(uids=st.lists(st.one_of(st.integers(min_value=1, max_value=200), uid), min_size=1, max_size=60, unique=True))
def test_uid_set_format_parse_round_trips(uids):
    text = wire.uid_set(sorted(uids))
    assert expand(Reader([text]).sequence_set()) == sorted(uids)
    # COPYUID's ordered sets keep the order, element by element (RFC 4315 §3).
    ordered = wire.ordered_uid_set(uids)
    assert expand(Reader([ordered]).sequence_set()) == uids


@fuzz_settings(300)
@given(ranges=st.lists(st.tuples(seq_value, seq_value), min_size=1, max_size=8))
def test_sequence_set_parse_format_parse_round_trips(ranges):
    text = format_ranges(ranges)
    parsed = Reader([text]).sequence_set()
    assert parsed == tuple(ranges)
    assert Reader([format_ranges(parsed)]).sequence_set() == parsed


@fuzz_settings(300)
@given(text=st.one_of(st.binary(max_size=30), st.text(alphabet="0123456789*:,", max_size=30).map(str.encode)))
def test_any_sequence_set_text_parses_or_is_a_parse_error(text):
    try:
        parsed = Reader([text]).sequence_set()
    except ParseError:
        return
    for low, high in parsed:
        for value in (low, high):
            assert value is STAR or 1 <= value <= MAX_NUMBER


def _view(uids) -> SessionView:
    view = SessionView(folder=None, readonly=True)
    view.uids = array("I", uids)
    return view


def resolve_by_definition(uids, ranges, uid_mode):
    """RFC 3501 §6.4.8/§9 by brute force over the messages (never over a range):
    "*" is the largest number in use; a:b is b:a; in UID mode numbers not in
    use are skipped; a message-number range lying wholly above the last
    message is an error (BAD)."""
    count = len(uids)
    if uid_mode and not count:
        return []
    star = uids[-1] if uid_mode else count
    spans = []
    for low, high in ranges:
        if not uid_mode and low is STAR and high is STAR and not count:
            continue
        low, high = sorted((star if low is STAR else low, star if high is STAR else high))
        if not uid_mode and low > count:
            raise SequenceError
        spans.append((low, high))
    keys = uids if uid_mode else range(1, count + 1)
    return [seq for seq, key in enumerate(keys, 1) if any(low <= key <= high for low, high in spans)]


@fuzz_settings(200)
@given(uids=st.lists(st.one_of(st.integers(min_value=1, max_value=100), uid), max_size=40, unique=True)
       .map(sorted),
       ranges=st.lists(st.tuples(seq_value, seq_value), min_size=1, max_size=6),
       uid_mode=st.booleans())
def test_sequence_set_resolves_by_definition_without_expanding_ranges(uids, ranges, uid_mode):
    view = _view(uids)
    try:
        expected = resolve_by_definition(uids, ranges, uid_mode)
    except SequenceError:
        with pytest.raises(SequenceError):
            view.resolve(ranges, uid_mode)
        return
    tracemalloc.start()
    try:
        got = view.resolve(ranges, uid_mode)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == expected
    # "1:4294967295" over a few messages: memory for the messages found, not for the range.
    assert peak < 16_384 + 64 * len(uids), peak


@fuzz_settings(100)
@given(gaps=st.lists(st.one_of(st.integers(min_value=1, max_value=3), st.integers(min_value=1, max_value=10**9)),
                     min_size=1, max_size=6),
       ranges=st.lists(st.tuples(seq_value, seq_value), min_size=1, max_size=4),
       uid_mode=st.booleans())
def test_fetch_over_the_wire_answers_exactly_the_set(gaps, ranges, uid_mode):
    # Sparse, huge UIDs in the folder; the set goes through the server's parser
    # and comes back as the UIDs of the FETCH responses.
    store = filled()
    folder = store.mailbox("alice@example.test").get("INBOX")
    uids = []
    for gap in gaps:
        folder.uidnext = min(folder.uidnext - 1 + gap, MAX_NUMBER)
        if uids and folder.uidnext <= uids[-1]:
            continue
        uids.append(folder._insert(b"Subject: x\r\n\r\nbody\r\n", (), None))
    with no_logged_failures():
        session = IMAPSession(store=store)
        session.login()
        session.select()
        command = b"UID FETCH " if uid_mode else b"FETCH "
        session.server.dataReceived(b"t " + command + format_ranges(ranges) + b" (UID)\r\n")
        lines = session.read()
    try:
        expected = resolve_by_definition(uids, ranges, uid_mode)
    except SequenceError:
        assert lines[-1].startswith("t BAD"), lines
        return
    assert lines[-1].startswith("t OK"), lines
    fetched = [(int(m.group(1)), int(m.group(2))) for m in map(re.compile(r"\* (\d+) FETCH \(UID (\d+)\)").fullmatch,
                                                              lines[:-1]) if m]
    assert fetched == [(seq, uids[seq - 1]) for seq in expected]


def test_huge_ranges_are_clamped_without_per_number_allocation():
    view = _view([1, 7, MAX_NUMBER])
    tracemalloc.start()
    try:
        assert view.resolve(((1, MAX_NUMBER), (MAX_NUMBER, 1), (STAR, 1)), True) == [1, 2, 3]
        assert view.resolve(((1, MAX_NUMBER), (2, STAR)), False) == [1, 2, 3]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_384


# --- IMAP strings and literals (RFC 3501 §4.3, RFC 7888) -----------------------------------------

_LITERAL_MARKER = re.compile(rb"\{(\d+)(\+?)\}$")


def frame(data: bytes) -> list[bytes]:
    """A command as the server frames it: text segments and literals, a
    literal announced by {n} or {n+} at the end of a line."""
    segments, text, position = [], b"", 0
    while True:
        end = data.index(b"\r\n", position)
        line = data[position:end]
        marker = _LITERAL_MARKER.search(line)
        if marker is None:
            assert end + 2 == len(data)
            return segments + [text + line]
        size = int(marker.group(1))
        segments += [text + line[:marker.start()], data[end + 2:end + 2 + size]]
        text, position = b"", end + 2 + size


def non_synchronizing(encoded: bytes) -> bytes:
    """A client with LITERAL+ writes {n+} instead of {n} (RFC 7888)."""
    return re.sub(rb"\{(\d+)\}\r\n", rb"{\1+}\r\n", encoded, count=1)


@fuzz_settings(300)
@given(value=st.binary(max_size=200), kind=st.sampled_from(["string", "astring", "nstring"]),
       plus=st.booleans())
def test_string_encode_parse_round_trips(value, kind, plus):
    encoded = getattr(wire, kind)(value)
    if plus:
        encoded = non_synchronizing(encoded)
    reader = Reader(frame(b"t X " + encoded + b" y\r\n"))
    reader.tag(), reader.sp(), reader.atom(), reader.sp()
    assert getattr(reader, kind)() == value
    reader.sp()
    assert reader.atom() == b"y"
    reader.end()


@fuzz_settings(150)
@given(password=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                        min_size=1, max_size=40),
       plus=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=4))
def test_login_arguments_round_trip_through_the_server(password, plus, cuts):
    # Whatever form wire.astring picks (atom, quoted, literal; {n} or {n+}),
    # the server reads back the exact password: LOGIN succeeds.
    user = "alice@example.test"
    encoded = wire.astring(password.encode())
    if plus:
        encoded = non_synchronizing(encoded)
    data = b"t LOGIN " + wire.astring(user.encode()) + b" " + encoded + b"\r\n"
    with no_logged_failures():
        session = IMAPSession(userdb=FakeUserDB({user: password}))
        start = 0
        for cut in sorted({cut % (len(data) + 1) for cut in cuts}) + [len(data)]:
            session.server.dataReceived(data[start:cut])
            start = cut
        lines = session.read()
    assert lines and lines[-1].startswith("t OK"), lines


def _nstring_at(data: bytes, position: int) -> tuple[bytes | None, int]:
    """A client's reading of an nstring in a response."""
    if data.startswith(b"NIL", position):
        return None, position + 3
    if data[position:position + 1] == b'"':
        out, position = bytearray(), position + 1
        while data[position:position + 1] != b'"':
            if data[position:position + 1] == b"\\":
                position += 1
            out += data[position:position + 1]
            position += 1
        return bytes(out), position + 1
    match = re.compile(rb"\{(\d+)\}\r\n").match(data, position)
    assert match, data[position:position + 40]
    size = int(match.group(1))
    return data[match.end():match.end() + size], match.end() + size


@fuzz_settings(150)
@given(message=st.binary(min_size=1, max_size=300), plus=st.booleans(),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_append_then_fetch_gives_the_octets_back(message, plus, cuts):
    assume(b"\0" not in message)                   # RFC 3501 CHAR8: no NUL in a literal
    data = b"t APPEND INBOX {%d%s}\r\n%s\r\n" % (len(message), b"+" if plus else b"", message)
    with no_logged_failures():
        session = IMAPSession(store=filled())
        session.login()
        start = 0
        for cut in sorted({cut % (len(data) + 1) for cut in cuts}) + [len(data)]:
            session.server.dataReceived(data[start:cut])
            start = cut
        appended = session.read_bytes()
        assert re.search(rb"(^|\r\n)t OK \[APPENDUID \d+ 1\]", appended), appended
        session.select()
        session.server.dataReceived(b"f UID FETCH 1 BODY.PEEK[]\r\n")
        response = session.read_bytes()
    label = b"BODY[] "
    body, _ = _nstring_at(response, response.index(label) + len(label))
    assert body == crlf(message)               # the store keeps CRLF line ends (the fake as the real one)


# --- dot-stuffing (RFC 5321 §4.5.2, RFC 1939 §3) ---------------------------------------------------

text_line = st.one_of(st.binary(max_size=40).map(lambda line: line.replace(b"\r", b"").replace(b"\n", b"")),
                      st.sampled_from([b"", b".", b"..", b"...", b". ", b".x", b"x.", b".\t", b"From x"]))
message_lines = st.lists(text_line, max_size=30)


def unstuff_smtp(payload: bytes) -> bytes:
    """A receiving SMTP server's reading (RFC 5321 §4.5.2): up to the first
    line that is just ".", a leading "." removed from every other line."""
    lines = []
    data = payload
    while True:
        line, sep, data = data.partition(b"\r\n")
        assert sep, "no terminating .CRLF"
        if line == b".":
            assert data == b"", "data after the terminator would be read as commands"
            return b"".join(lines)
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


@fuzz_settings(300)
@given(raw=st.one_of(message_lines.map(b"\r\n".join), st.binary(max_size=300)))
def test_dot_stuff_unstuff_round_trips(raw):
    message = canonical_line_ends(raw)            # what the queue's client does before dot_stuff
    expected = message if message == b"" or message.endswith(b"\r\n") else message + b"\r\n"
    assert unstuff_smtp(dot_stuff(message)) == expected


@fuzz_settings(150)
@given(lines=message_lines, final_crlf=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=600),
                                                                    max_size=4))
def test_dot_stuffed_message_reaches_the_store_unchanged(lines, final_crlf, cuts):
    # Our client's dot_stuff, our server's DATA: the message arrives as it left.
    message = b"\r\n".join(lines) + (b"\r\n" if final_crlf and lines else b"")
    payload = dot_stuff(message)
    with no_logged_failures():
        s = SMTPSession()
        s.ehlo()
        assert s.last("MAIL FROM:<x@elsewhere.test>").startswith("250 ")
        assert s.last("RCPT TO:<alice@example.test>").startswith("250 ")
        assert s.last("DATA").startswith("354 ")
        start = 0
        for cut in sorted({cut % (len(payload) + 1) for cut in cuts}) + [len(payload)]:
            s.server.dataReceived(payload[start:cut])
            start = cut
        assert s.read()[-1].startswith("250 2.0.0 Ok: queued as ")
    (_, stored), = s.store.delivered
    expected = message if message == b"" or message.endswith(b"\r\n") else message + b"\r\n"
    header, body = stored[:len(stored) - len(expected)], stored[len(stored) - len(expected):]
    assert body == expected
    assert re.fullmatch(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", header), header


def unstuff_pop3(response: bytes) -> bytes:
    """A POP3 client's reading of a multi-line response body (RFC 1939 §3)."""
    return unstuff_smtp(response)


@fuzz_settings(300)
@given(stored=st.one_of(message_lines.map(b"\n".join), st.binary(max_size=300)))
def test_pop3_byte_stuffing_round_trips(stored):
    data = to_crlf(stored)                        # what the store hands POP3
    expected = data if data == b"" or data.endswith(b"\r\n") else data + b"\r\n"
    assert unstuff_pop3(stuff(data) + b".\r\n") == expected


# --- IMAP mailbox names (RFC 3501 §5.1.3 modified UTF-7) ------------------------------------------

mailbox_name = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@fuzz_settings(300)
@given(name=mailbox_name)
def test_mailbox_name_encode_decode_round_trips(name):
    assume(not any(0x7F <= ord(char) < 0xA0 for char in name))
    encoded = wire.encode_mailbox(name)
    assert encoded.isascii()
    assert wire.decode_mailbox(encoded) == name


@fuzz_settings(300)
@given(raw=st.one_of(st.binary(max_size=30), mailbox_name.map(lambda name: name.encode("utf-8")),
                     st.text(alphabet="&-+,AZaz09/", max_size=20).map(str.encode)))
def test_any_mailbox_name_is_refused_or_decodes_to_a_fixed_point(raw):
    try:
        name = wire.decode_mailbox(raw)
    except wire.BadMailboxName:
        return
    assert wire.decode_mailbox(wire.encode_mailbox(name)) == name

