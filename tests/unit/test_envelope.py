"""The spool envelope (mailgw/queue/envelope.py): the JSON form, versions, validation, round trips."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgw.queue import envelope as envelope_module
from mailgw.queue.envelope import (
    ENVELOPE_VERSION, Envelope, EnvelopeClient, EnvelopeError, EnvelopeRecipient, HistoryRecord, HistoryResult,
    check_json,
)
from fuzzing import fuzz_settings

QUEUE_ID = "01HZX3K9V5T7Q2MB"


def sample(**changes) -> dict:
    """A version-1 envelope JSON object, keys in the order mailgw writes them."""
    value = {
        "version": 1, "id": QUEUE_ID, "arrival": 1700000000.25, "sender": "alice@example.org",
        "sender_utf8": False, "body": "8BITMIME", "size": 1234, "envid": "ENV-1", "ret": "HDRS",
        "client": {"ip": "192.0.2.1", "helo": "client.example", "tls": True, "auth": "alice@example.org",
                   "listener": "submission"},
        "recipients": [
            {"address": "bob@example.net", "orcpt": "rfc822;bob@example.net", "notify": ["FAILURE", "DELAY"],
             "state": "pending", "attempts": 2, "last_reply": "smtp; 451 4.3.0 later"},
            {"address": "carol@example.com", "orcpt": "rfc822;sales@example.org", "notify": None, "state": "sent",
             "attempts": 1, "last_reply": "smtp; 250 2.0.0 ok", "orig_to": "sales@example.org"},
        ],
        "attempts": 2, "next_attempt": 1700000900,
        "history": [{"time": 1700000000.5, "results": [
            {"address": "bob@example.net", "relay": "mx.example.net[192.0.2.9]:25", "status": "deferred",
             "dsn": "4.3.0", "reply": "smtp; 451 4.3.0 later"}]}],
    }
    value.update(changes)
    return value


def old_encoding(value: dict) -> bytes:
    """How mailgw wrote an envelope before the typed Envelope (the dict, dumped)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_is_the_identity_and_byte_for_byte():
    value = sample(hold=True, delay_notice_sent=True)
    envelope = Envelope.from_json(copy.deepcopy(value))
    assert envelope.to_json() == value
    assert list(envelope.to_json()) == list(value)            # the key order too
    assert envelope.encode() == old_encoding(value)
    assert Envelope.decode(envelope.encode(), QUEUE_ID) == envelope


def test_attributes():
    envelope = Envelope.from_json(sample())
    assert envelope.version == ENVELOPE_VERSION == 1
    assert (envelope.id, envelope.sender, envelope.size, envelope.ret) == (QUEUE_ID, "alice@example.org", 1234, "HDRS")
    assert envelope.client == EnvelopeClient("192.0.2.1", "client.example", True, "alice@example.org", "submission")
    bob, carol = envelope.recipients
    assert bob == EnvelopeRecipient("bob@example.net", "rfc822;bob@example.net", ("FAILURE", "DELAY"), "pending", 2,
                                    "smtp; 451 4.3.0 later")
    assert carol.orig_to == "sales@example.org" and bob.orig_to is None
    assert envelope.pending() == [bob]
    assert envelope.hold is None and envelope.bounce_requested is None and envelope.delay_notice_sent is None


def test_a_new_envelope_is_written_as_the_targets_stage_always_wrote_it():
    envelope = Envelope(
        id=QUEUE_ID, arrival=1700000000.25, sender="alice@example.org", sender_utf8=False, body="7BIT", size=10,
        client=EnvelopeClient("127.0.0.1", None, False, None, "sendmail"),
        recipients=[EnvelopeRecipient("bob@example.net")], next_attempt=1700000000.25)
    assert envelope.encode() == old_encoding({
        "version": 1, "id": QUEUE_ID, "arrival": 1700000000.25, "sender": "alice@example.org", "sender_utf8": False,
        "body": "7BIT", "size": 10, "envid": None, "ret": None,
        "client": {"ip": "127.0.0.1", "helo": None, "tls": False, "auth": None, "listener": "sendmail"},
        "recipients": [{"address": "bob@example.net", "orcpt": None, "notify": None, "state": "pending",
                        "attempts": 0, "last_reply": None}],
        "attempts": 0, "next_attempt": 1700000000.25, "history": []})


def test_numbers_keep_their_json_type():
    value = sample(arrival=1700000000, next_attempt=0)
    assert Envelope.from_json(value).encode() == old_encoding(value)
    assert b'"arrival": 1700000000,' in old_encoding(value)


def test_unknown_keys_are_kept_at_every_level_and_written_after_the_known_ones():
    value = sample(later_release={"a": [1, 2]})
    value["client"]["port"] = 587
    value["recipients"][0]["x_note"] = "kept"
    envelope = Envelope.from_json(copy.deepcopy(value))
    assert envelope.extra == {"later_release": {"a": [1, 2]}}
    assert envelope.client.extra == {"port": 587}
    assert envelope.recipients[0].extra == {"x_note": "kept"}
    assert envelope.to_json() == value and envelope.encode() == old_encoding(value)


def test_optional_keys_stay_absent_or_keep_their_stored_value():
    assert "hold" not in Envelope.from_json(sample()).to_json()
    released = Envelope.from_json(sample(hold=False, bounce_requested=False))
    assert released.to_json()["hold"] is False and not released.hold
    odd = Envelope.from_json(sample(hold=1))         # never written by mailgw; truthy, as readers always took it
    assert odd.hold and odd.to_json()["hold"] == 1


# -- every version the spool reads ------------------------------------------------------------

def test_indented_files_written_before_2026_11_22_load():
    value = sample()
    data = json.dumps(value, indent=2, ensure_ascii=False).encode() + b"\n"
    assert Envelope.decode(data, QUEUE_ID).to_json() == value


def test_files_from_before_the_optional_keys_load():
    value = sample()
    del value["recipients"][1]["orig_to"]
    envelope = Envelope.from_json(value)
    assert all(r.orig_to is None for r in envelope.recipients)
    assert envelope.encode() == old_encoding(value)


def test_an_older_version_is_read_through_its_upgrade(monkeypatch):
    def from_zero(value):
        value = dict(value, version=1)
        value["sender"] = value.pop("from")
        return value
    monkeypatch.setitem(envelope_module._UPGRADES, 0, from_zero)
    old = sample(version=0)
    old["from"] = old.pop("sender")
    envelope = Envelope.from_json(old)
    assert envelope.sender == "alice@example.org" and envelope.to_json() == sample()


# -- refused, as the spool always refused it --------------------------------------------------

def missing(key, where=None):
    value = sample()
    (value if where is None else where(value)).pop(key)
    return value


@pytest.mark.parametrize("value, message", [
    ([], "envelope: not an object"),
    (sample(version=2), "unknown envelope version 2"),
    (sample(version=None), "unknown envelope version None"),
    (missing("version"), "unknown envelope version None"),
    (missing("recipients"), "envelope: missing 'recipients'"),
    (missing("history"), "envelope: missing 'history'"),
    (sample(id="0123456789ABCDEI"), "envelope: bad 'id': '0123456789ABCDEI'"),
    (sample(arrival="now"), "envelope: bad 'arrival': 'now'"),
    (sample(sender_utf8=0), "envelope: bad 'sender_utf8': 0"),
    (sample(body="BINARYMIME"), "envelope: bad 'body': 'BINARYMIME'"),
    (sample(size=-1), "envelope: bad 'size': -1"),
    (sample(size=True), "envelope: bad 'size': True"),
    (sample(ret="NONE"), "envelope: bad 'ret': 'NONE'"),
    (sample(recipients=[]), "envelope: bad 'recipients': []"),
    (sample(attempts=1.5), "envelope: bad 'attempts': 1.5"),
    (sample(client=None), "envelope: bad 'client': None"),
    (sample(client={"ip": "192.0.2.1"}), "client: missing 'helo'"),
    (sample(client={"ip": "192.0.2.1", "helo": None, "tls": "yes", "auth": None, "listener": "x"}),
     "client: bad 'tls': 'yes'"),
    (sample(recipients=["bob@example.net"]), "recipient 0: not an object"),
    (missing("last_reply", lambda v: v["recipients"][1]), "recipient 1: missing 'last_reply'"),
    (sample(recipients=[dict(sample()["recipients"][0], notify="FAILURE")]), "recipient 0: bad 'notify': 'FAILURE'"),
    (sample(recipients=[dict(sample()["recipients"][0], attempts=-1)]), "recipient 0: bad 'attempts': -1"),
])
def test_invalid_envelopes_are_refused_with_the_spools_message(value, message):
    with pytest.raises(EnvelopeError) as error:
        Envelope.from_json(value)
    assert str(error.value) == message
    with pytest.raises(EnvelopeError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        check_json(value)


@pytest.mark.parametrize("data, message", [
    (b"{not json", "not UTF-8 JSON: "),
    (b"\xff\xfe", "not UTF-8 JSON: "),
    (old_encoding(sample(id="0123456789ABCDEF")), "id '0123456789ABCDEF' does not match the file name"),
])
def test_decode_refuses_what_recovery_moves_to_corrupt(data, message):
    with pytest.raises(EnvelopeError, match="^" + message):
        Envelope.decode(data, QUEUE_ID)


def test_encode_refuses_what_a_reader_would_refuse():
    envelope = Envelope.from_json(sample())
    for change, message in [({"body": "BINARYMIME"}, "envelope: bad 'body'"), ({"recipients": []}, "envelope: bad"),
                            ({"client": {"ip": "x"}}, "envelope: "), ({"recipients": [{"address": "x"}]}, "envelope: "),
                            ({"id": "short"}, "envelope: bad 'id'")]:
        with pytest.raises(EnvelopeError, match="^" + message):
            dataclasses.replace(envelope, **change).encode()
    with pytest.raises(EnvelopeError):
        dataclasses.replace(envelope, recipients=[EnvelopeRecipient("x", notify="NEVER")]).encode()
    with pytest.raises(ValueError):                     # RFC 8259: no NaN
        dataclasses.replace(envelope, arrival=float("nan")).encode()


def test_a_deep_copy_shares_nothing_mutable():
    value = sample(later={"a": [1]})
    value["client"]["port"] = [587]
    envelope = Envelope.from_json(value)
    twin = copy.deepcopy(envelope)
    assert twin == envelope
    twin.recipients[0].state = "sent"
    twin.history[0]["results"].clear()
    twin.extra["later"]["a"].append(2)
    twin.client.extra["port"].append(25)
    twin.recipients.append(EnvelopeRecipient("x@example.com"))
    assert envelope.to_json() == value == sample(later={"a": [1]}, client=value["client"])


def test_an_envelope_is_not_a_dict():
    envelope = Envelope.from_json(sample())
    with pytest.raises(TypeError):
        envelope["id"]


# -- where the JSON form crosses a process boundary --------------------------------------------

def test_spool_listeners_get_the_json_form_as_written(tmp_path):
    from twisted.internet.task import Clock

    from mailgw.durable import DurableWriter
    from mailgw.queue.spool import Spool
    from threadless import ImmediatePool, ThreadlessClock

    spool = Spool(tmp_path / "queue", writer=DurableWriter(reactor=ThreadlessClock(), threadpool=ImmediatePool()),
                  reactor=Clock())
    heard = []
    spool.add_listener(heard.append)
    envelope = Envelope.from_json(sample(size=3))
    spool.enqueue(QUEUE_ID, envelope, b"abc")
    envelope.attempts = 99                           # changed after the call: not what was written
    (data,) = heard
    assert data == sample(size=3) and json.dumps(data)  # what an SMTP worker sends over its pipe
    assert old_encoding(data) == (spool.active / f"{QUEUE_ID}.env").read_bytes()


def test_the_runner_takes_an_envelope_or_its_json_form(tmp_path):
    from test_runner import Rig

    runner = Rig(tmp_path).runner
    runner.add(sample())                             # as an SMTP worker's `queued` line brings it
    assert runner.envelopes[QUEUE_ID] == Envelope.from_json(sample())
    other = Envelope.from_json(sample(id="01HZX3K9V5T7Q2MC", hold=True))
    runner.add(other)
    assert runner.envelopes[other.id] is other
    with pytest.raises(EnvelopeError):
        runner.add(sample(id="01HZX3K9V5T7Q2MD", recipients=[]))
    assert sorted(runner.envelopes) == [QUEUE_ID, other.id]


# -- the attempt log --------------------------------------------------------------------------

def test_history_records_round_trip_and_read_leniently():
    record = HistoryRecord(1700000000.5, (HistoryResult("bob@example.net", None, "bounced", "5.1.1", "no"),))
    assert record.to_json() == {"time": 1700000000.5, "results": [
        {"address": "bob@example.net", "relay": None, "status": "bounced", "dsn": "5.1.1", "reply": "no"}]}
    assert HistoryRecord.from_json(record.to_json()) == record
    assert HistoryRecord.from_json("a note") is None and HistoryRecord.from_json({"time": 1}) is None
    odd = HistoryRecord.from_json({"results": ["free text", {"status": "sent"}]})
    assert odd.time is None and odd.results == ("free text", HistoryResult(None, None, "sent", None, None))


# -- property: any valid envelope survives from_json / to_json / encode / decode unchanged -----

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=20)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_numbers = st.integers(min_value=0, max_value=2**40) | st.floats(min_value=0, max_value=2e9)
_optional_text = st.none() | st.text(max_size=30)


def _with_extra(known: dict, reserved, extra: dict) -> dict:
    return {**known, **{key: value for key, value in extra.items() if key not in reserved}}


@st.composite
def _recipients(draw):
    value = {"address": draw(st.text(max_size=40)), "orcpt": draw(_optional_text),
             "notify": draw(st.none() | st.lists(st.sampled_from(["NEVER", "SUCCESS", "FAILURE", "DELAY"]),
                                                 max_size=3)),
             "state": draw(st.sampled_from(["pending", "sent", "bounced", "expired"])),
             "attempts": draw(st.integers(min_value=0, max_value=1000)), "last_reply": draw(_json_values)}
    if draw(st.booleans()):
        value["orig_to"] = draw(st.text(min_size=1, max_size=40))
    return _with_extra(value, envelope_module._RECIPIENT_KEYS, draw(st.dictionaries(st.text(max_size=8),
                                                                                  _json_values, max_size=2)))


@st.composite
def _envelopes(draw):
    value = {
        "version": 1, "id": draw(st.text(_CROCKFORD, min_size=16, max_size=16)), "arrival": draw(_numbers),
        "sender": draw(st.text(max_size=40)), "sender_utf8": draw(st.booleans()),
        "body": draw(st.sampled_from(["7BIT", "8BITMIME"])), "size": draw(st.integers(min_value=0, max_value=2**40)),
        "envid": draw(_optional_text), "ret": draw(st.sampled_from([None, "FULL", "HDRS"])),
        "client": _with_extra({"ip": draw(st.text(max_size=40)), "helo": draw(_optional_text),
                               "tls": draw(st.booleans()), "auth": draw(_optional_text),
                               "listener": draw(st.text(max_size=10))}, envelope_module._CLIENT_KEYS,
                              draw(st.dictionaries(st.text(max_size=8), _json_values, max_size=2))),
        "recipients": draw(st.lists(_recipients(), min_size=1, max_size=4)),
        "attempts": draw(st.integers(min_value=0, max_value=1000)), "next_attempt": draw(_numbers),
        "history": draw(st.lists(_json_values, max_size=3)),
    }
    for flag in ("hold", "bounce_requested", "delay_notice_sent"):
        if draw(st.booleans()):
            value[flag] = draw(st.booleans())
    return _with_extra(value, envelope_module._ENVELOPE_KEYS,
                       draw(st.dictionaries(st.text(max_size=8), _json_values, max_size=2)))


@fuzz_settings(200)
@given(value=_envelopes())
def test_any_valid_envelope_round_trips_byte_for_byte(value):
    envelope = Envelope.from_json(copy.deepcopy(value))
    assert envelope.to_json() == value
    data = envelope.encode()
    assert data == old_encoding(value)
    assert Envelope.decode(data, value["id"]).to_json() == value
