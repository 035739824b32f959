"""DSNs (RFC 3464 / RFC 3461 §6): parsed back with the stdlib, per kind, RET, recipients and wire form."""
from __future__ import annotations

import email
import email.policy
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgw.queue import model
from mailgw.queue.dsn import RETURN_LIMIT, NoticeRecipient, build_dsn, notice_envelope, should_send
from mailgw.queue.envelope import Envelope
from mailgw.queue.model import RecipientResult
from mailgw.queue.policy import KIND_DELAY, KIND_FAILURE, KIND_SUCCESS
from fuzzing import fuzz_settings

NOW = 1_700_003_600.0           # Tue, 14 Nov 2023 23:13:20 +0000
ARRIVAL = 1_700_000_000.0       # Tue, 14 Nov 2023 22:13:20 +0000
RETRY_UNTIL = ARRIVAL + 5 * 86400
HOST = "mx.example.org"
NOTICE_ID = "0123456789ABCDEG"
ORIGINAL = (b"Received: from client.example.net ([192.0.2.7]) by mx.example.org\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: bob@example.com\r\n"
            b"Subject: lunch\r\n"
            b"Message-ID: <lunch-1@example.org>\r\n"
            b"\r\n"
            b"Shall we meet at noon?\r\n"
            b"SECRET-BODY-MARKER\r\n")
ORIGINAL_HEADERS = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def recipient(address="bob@example.com", notify=None, **changes) -> NoticeRecipient:
    return NoticeRecipient(address, notify=None if notify is None else tuple(notify), **changes)


def envelope(*recipients, **changes) -> Envelope:
    env = {"version": 1, "id": "0123456789ABCDEF", "arrival": ARRIVAL, "sender": "alice@example.org",
           "sender_utf8": False, "body": "7BIT", "size": len(ORIGINAL), "envid": None, "ret": None,
           "client": {"ip": "192.0.2.7", "helo": "client.example.net", "tls": True, "auth": "alice",
                      "listener": "submission"},
           "recipients": [{"address": r.address, "orcpt": r.orcpt,
                           "notify": None if r.notify is None else list(r.notify),
                           "state": model.PENDING, "attempts": 1, "last_reply": None}
                          for r in recipients or [recipient()]],
           "attempts": 1, "next_attempt": NOW, "history": []}
    env.update(changes)
    return Envelope.from_json(env)


BOUNCE = RecipientResult("bob@example.com", model.STATUS_BOUNCED, 550, "5.1.1",
                         "<bob@example.com>: Recipient address rejected: User unknown")
DEFER = RecipientResult("carol@example.net", model.STATUS_DEFERRED, 451, "4.7.1", "Greylisted, try again later")
NO_REPLY = RecipientResult("dave@example.net", model.STATUS_DEFERRED, 0, "4.4.1", "Connection refused")
SENT = RecipientResult("bob@example.com", model.STATUS_SENT, 250, "2.0.0", "Ok: queued as 4ABC")


def make(kind=KIND_FAILURE, env=None, pairs=None, original=ORIGINAL, **kwargs) -> bytes:
    env = env or envelope()
    if pairs is None:
        pairs = [(NoticeRecipient.of(env.recipients[0]), BOUNCE)]
    kwargs.setdefault("will_retry_until", RETRY_UNTIL if kind == KIND_DELAY else None)
    data = build_dsn(kind, env, pairs, reporting_mta=HOST, now=NOW, original=original, **kwargs)
    assert_wire_form(data)
    return data


def assert_wire_form(data: bytes) -> None:
    """RFC 5321 §2.3.8 / RFC 5322 §2.1.1: CRLF only, lines of at most 998 octets."""
    assert isinstance(data, bytes)
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def report_parts(data: bytes):
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    return message, parts


def human_text(data: bytes) -> str:
    """The first part, its wrapped lines joined."""
    _, parts = report_parts(data)
    return " ".join(parts[0].get_content().split())


def status_groups(data: bytes):
    """The per-message field group and the per-recipient groups (RFC 3464 §2.1).

    The stdlib parses a message/delivery-status body into a list of header
    blocks, one Message per group."""
    _, parts = report_parts(data)
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    return blocks[0], blocks[1:]


# -- the report as a whole ------------------------------------------------------------------------

def test_failure_dsn_headers():
    message, parts = report_parts(make())
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"] == "Tue, 14 Nov 2023 23:13:20 +0000"
    assert re.fullmatch(r"<[^<>@\s]+@mx\.example\.org>", message["Message-ID"])
    assert message["Auto-Submitted"] == "auto-replied"         # RFC 3834 §5
    assert message["MIME-Version"] == "1.0"
    # Threaded with the original in the sender's mail reader.
    assert message["In-Reply-To"] == message["References"] == "<lunch-1@example.org>"
    assert len(parts) == 3


def test_threading_uses_the_header_message_id_only():
    original = b"Subject: fwd\r\n\r\nMessage-ID: <in-the-body@example.org>\r\n"
    message = parse(make(original=original))
    assert message["In-Reply-To"] is None and message["References"] is None


def test_each_dsn_has_a_fresh_message_id():
    assert parse(make())["Message-ID"] != parse(make())["Message-ID"]


def test_per_message_fields():
    per_message, _ = status_groups(make(env=envelope(envid="QQ314159")))
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert per_message["Original-Envelope-Id"] == "QQ314159"       # RFC 3461 §6.3 (a)
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"


def test_no_original_envelope_id_without_envid():
    per_message, _ = status_groups(make())
    assert per_message["Original-Envelope-Id"] is None          # RFC 3461 §6.3 (a): MUST NOT


def test_failure_per_recipient_fields():
    rcpt = recipient(orcpt="rfc822;Bob@Example.COM", relay="mx1.example.com[198.51.100.25]:25",
                     last_attempt=NOW - 60)
    _, (group,) = status_groups(make(env=envelope(rcpt), pairs=[(rcpt, BOUNCE)]))
    assert group["Original-Recipient"] == "rfc822; Bob@Example.COM"
    assert group["Final-Recipient"] == "rfc822; bob@example.com"
    assert group["Action"] == "failed"
    assert group["Status"] == "5.1.1"
    assert group["Remote-MTA"] == "dns; mx1.example.com"
    assert group["Diagnostic-Code"] == ("smtp; 550 5.1.1 <bob@example.com>: Recipient address rejected: "
                                        "User unknown")
    assert group["Last-Attempt-Date"] == "Tue, 14 Nov 2023 23:12:20 +0000"
    assert group["Will-Retry-Until"] is None


def test_optional_per_recipient_fields_are_left_out_when_unknown():
    _, (group,) = status_groups(make(pairs=[(recipient(), NO_REPLY)]))
    assert group["Original-Recipient"] is None                  # RFC 3461 §6.3 (d): only with ORCPT
    assert group["Remote-MTA"] is None
    assert group["Diagnostic-Code"] is None                     # no reply, nothing to transcribe
    assert group["Status"] == "4.4.1"


def test_remote_mta_of_a_server_without_a_name_is_a_domain_literal():
    rcpt = recipient(relay="[198.51.100.25]:25")
    _, (group,) = status_groups(make(pairs=[(rcpt, BOUNCE)]))
    assert group["Remote-MTA"] == "dns; [198.51.100.25]"


def test_human_part_lists_recipients_and_remote_replies_but_no_internals():
    text = human_text(make(pairs=[(recipient(relay="mx1.example.com[198.51.100.25]:25"), BOUNCE)]))
    assert "<bob@example.com>" in text
    assert "550 5.1.1" in text and "User unknown" in text
    assert "mx.example.org" in text
    for internal in ("0123456789ABCDEF", "submission", "198.51.100.25", "Traceback"):
        assert internal not in text


def test_long_remote_reply_is_folded_and_unfolds_to_the_same_text():
    long_reply = RecipientResult("bob@example.com", model.STATUS_BOUNCED, 550, "5.7.1",
                                 "Message rejected " + "because of policy reasons " * 40)
    data = make(pairs=[(recipient(), long_reply)])
    _, (group,) = status_groups(data)
    assert group["Diagnostic-Code"] == " ".join(f"smtp; 550 5.7.1 {long_reply.text}".split())
    status_part = data.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]
    assert max(len(line) for line in status_part.split(b"\r\n")) <= 78


# -- RET and the returned content (RFC 3461 §4.3, §6.2) -------------------------------------------

def test_failure_without_ret_returns_the_full_message_byte_for_byte():
    data = make()
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "message/rfc822"
    assert parts[2].get_payload(0)["Subject"] == "lunch"
    assert ORIGINAL in data


def test_ret_full_returns_the_full_message():
    data = make(env=envelope(ret="FULL"))
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "message/rfc822"
    inner = parts[2].get_payload(0)
    assert inner["Message-ID"] == "<lunch-1@example.org>"
    assert "SECRET-BODY-MARKER" in inner.get_content()
    assert ORIGINAL in data


def test_ret_hdrs_returns_only_the_headers():
    data = make(env=envelope(ret="HDRS"))
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert ORIGINAL_HEADERS in data
    assert b"SECRET-BODY-MARKER" not in data
    assert "Subject: lunch" in parts[2].get_content()


def test_large_message_returns_only_headers_even_with_ret_full():
    big = ORIGINAL_HEADERS + b"\r\n" + b"x" * 76 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 110
    assert len(big) > RETURN_LIMIT
    data = make(env=envelope(ret="FULL"), original=big)
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"yyyy" not in data
    assert "too large to return in full" in human_text(data)


def test_return_limit_can_be_set():
    _, parts = report_parts(make(original=ORIGINAL, return_limit=len(ORIGINAL) - 1))
    assert parts[2].get_content_type() == "text/rfc822-headers"
    _, parts = report_parts(make(original=ORIGINAL, return_limit=len(ORIGINAL)))
    assert parts[2].get_content_type() == "message/rfc822"


@pytest.mark.parametrize("kind", [KIND_DELAY, KIND_SUCCESS])
@pytest.mark.parametrize("ret", [None, "FULL", "HDRS"])
def test_reports_without_failures_return_only_headers(kind, ret):
    result = DEFER if kind == KIND_DELAY else SENT
    data = make(kind, env=envelope(ret=ret), pairs=[(recipient(notify=["SUCCESS", "DELAY"]), result)])
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"SECRET-BODY-MARKER" not in data


def test_no_original_available_means_two_parts():
    _, parts = report_parts(make(original=None))
    assert len(parts) == 2


# -- delay and success ----------------------------------------------------------------------------

def test_delay_dsn():
    rcpt = recipient(relay="mx1.example.net[203.0.113.9]:25")
    data = make(KIND_DELAY, env=envelope(rcpt), pairs=[(rcpt, DEFER)])
    message, parts = report_parts(data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    _, (group,) = status_groups(data)
    assert group["Action"] == "delayed"
    assert group["Status"] == "4.7.1"
    assert group["Diagnostic-Code"] == "smtp; 451 4.7.1 Greylisted, try again later"
    assert group["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert "keep trying until Sun, 19 Nov 2023 22:13:20 +0000" in human_text(data)
    assert "do not need to send it again" in human_text(data)


def test_delay_without_a_specific_code_is_4_0_0():
    weird = RecipientResult("bob@example.com", model.STATUS_DEFERRED, 0, "", "Connection timed out")
    _, (group,) = status_groups(make(KIND_DELAY, pairs=[(recipient(), weird)]))
    assert group["Status"] == "4.0.0"                            # RFC 3461 §6.3 (g)


def test_success_dsn_relayed_when_the_next_hop_does_not_do_dsn():
    # RFC 3461 §5.2.2 (b)
    rcpt = recipient(notify=["SUCCESS"], dsn_relayed=False, relay="mx1.example.com[198.51.100.25]:25")
    data = make(KIND_SUCCESS, pairs=[(rcpt, SENT)])
    message, parts = report_parts(data)
    assert message["Subject"] == "Successful Mail Delivery Report"
    _, (group,) = status_groups(data)
    assert group["Action"] == "relayed"
    assert group["Status"] == "2.0.0"
    assert group["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4ABC"
    assert "relayed" in human_text(data)


def test_success_from_the_relay_queue_is_relayed_by_default():
    # Only next hops without DSN get here: with DSN, should_send says no (below).
    _, (group,) = status_groups(make(KIND_SUCCESS, pairs=[(recipient(notify=["SUCCESS"]), SENT)]))
    assert group["Action"] == "relayed"


def test_success_dsn_delivered_for_final_delivery():
    # RFC 3461 §5.2.3 (a)
    rcpt = recipient(notify=["SUCCESS"], final_delivery=True)
    _, (group,) = status_groups(make(KIND_SUCCESS, pairs=[(rcpt, SENT)]))
    assert group["Action"] == "delivered"


# -- several recipients in one report (RFC 3461 §5.2.8) -------------------------------------------

def test_mixed_recipients_in_one_failure_report():
    bob = recipient("bob@example.com", orcpt="rfc822;bob@example.com", relay="mx1.example.com[198.51.100.25]:25")
    carol = recipient("carol@example.net", relay="mx.example.net[203.0.113.9]:25")
    dave = recipient("dave@example.net")
    erin = recipient("erin@example.net")
    env = envelope(bob, carol, dave, erin, envid="ENV-7")
    data = make(env=env, pairs=[(bob, BOUNCE), (carol, DEFER), (dave, NO_REPLY), (erin, None)])
    per_message, groups = status_groups(data)
    assert per_message["Original-Envelope-Id"] == "ENV-7"
    assert [g["Final-Recipient"] for g in groups] == [
        "rfc822; bob@example.com", "rfc822; carol@example.net", "rfc822; dave@example.net",
        "rfc822; erin@example.net"]
    assert [g["Action"] for g in groups] == ["failed"] * 4
    # Bounced: the remote's code. Expired: the last transient problem, or X.4.7 without one.
    assert [g["Status"] for g in groups] == ["5.1.1", "4.7.1", "4.4.1", "4.4.7"]
    assert [g["Original-Recipient"] for g in groups] == ["rfc822; bob@example.com", None, None, None]
    assert [g["Remote-MTA"] for g in groups] == ["dns; mx1.example.com", "dns; mx.example.net", None, None]
    assert groups[1]["Diagnostic-Code"] == "smtp; 451 4.7.1 Greylisted, try again later"
    assert groups[3]["Last-Attempt-Date"] is None               # never attempted
    text = human_text(data)
    for address in ("bob@example.com", "carol@example.net", "dave@example.net", "erin@example.net"):
        assert f"<{address}>" in text
    assert "Connection refused" in text and "expired" in text


def test_bounce_with_a_missing_or_mismatched_enhanced_code_says_5_0_0():
    for enhanced in ("", "4.1.1", "junk"):
        result = RecipientResult("bob@example.com", model.STATUS_BOUNCED, 554, enhanced, "No")
        _, (group,) = status_groups(make(pairs=[(recipient(), result)]))
        assert group["Status"] == "5.0.0"                        # RFC 3461 §6.3 (g)


# -- 8-bit, UTF-8 and broken originals ------------------------------------------------------------

def test_8bit_original_does_not_crash_and_is_returned_unchanged():
    original = (b"From: alice@example.org\r\nSubject: =?iso-8859-1?q?caf=E9?=\r\n"
                b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
                b"\r\nCaf\xe9 cr\xe8me \xff\xfe\r\n")
    data = make(env=envelope(body="8BITMIME"), original=original)
    assert original in data
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "message/rfc822"
    assert parts[2]["Content-Transfer-Encoding"] == "8bit"
    assert parts[2].get_payload(0)["Subject"] == "café"
    assert notice_envelope(envelope(), data, queue_id=NOTICE_ID, now=NOW).body == "8BITMIME"


def test_utf8_headers_are_returned_as_message_global():
    original = "From: jörg@exämple.org\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    data = make(env=envelope(sender_utf8=True), original=original)
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "message/global"       # RFC 6532 §3.7
    assert original in data
    data = make(env=envelope(ret="HDRS"), original=original)
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "message/global-headers"   # RFC 6533 §6.3
    assert b"Hallo" not in data


def test_non_ascii_recipient_uses_the_utf8_address_type():
    rcpt = recipient("jörg@exämple.org")
    _, (group,) = status_groups(make(pairs=[(rcpt, BOUNCE)]))
    assert group["Final-Recipient"] == r"utf-8; j\x{F6}rg@ex\x{E4}mple.org"   # RFC 6533 §3


def test_non_ascii_sender_gets_a_utf8_header():
    data = make(env=envelope(sender="jörg@exämple.org", sender_utf8=True))
    assert "To: <jörg@exämple.org>".encode() in data
    assert notice_envelope(envelope(sender="jörg@exämple.org"), data, queue_id=NOTICE_ID, now=NOW).sender_utf8 is True


@pytest.mark.parametrize("original", [
    b"garbage without any header separator",
    b"\r\nbody only, no headers\r\n",
    b"Subject: bare LF\nline ends\n\nbody\n",
    b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nbroken\xff",
    b"Content-Type: message/delivery-status\r\n\r\nnot really\r\n",
    b"",
])
def test_broken_originals_still_give_a_dsn(original):
    data = make(original=original)
    report_parts(data)


def test_original_with_a_line_over_998_octets_falls_back_to_headers():
    original = b"Subject: long\r\n\r\n" + b"z" * 2000 + b"\r\n"
    _, parts = report_parts(make(original=original))
    assert parts[2].get_content_type() == "text/rfc822-headers"


def test_original_with_a_header_line_over_998_octets_is_left_out():
    original = b"Subject: " + b"z" * 2000 + b"\r\n\r\nbody\r\n"
    _, parts = report_parts(make(original=original))
    assert len(parts) == 2


# -- threats: nothing from outside becomes a field of its own -------------------------------------

def test_injection_remote_reply_cannot_add_fields():
    evil = RecipientResult("bob@example.com", model.STATUS_BOUNCED, 550, "5.1.1",
                           "no\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; mallory@evil.example")
    per_message, groups = status_groups(make(pairs=[(recipient(), evil)]))
    assert len(groups) == 1
    assert groups[0]["Action"] == "failed"
    assert groups[0].get_all("Final-Recipient") == ["rfc822; bob@example.com"]


def test_injection_envid_and_orcpt_cannot_add_fields():
    rcpt = recipient(orcpt="rfc822;bob@example.com\r\nAction: delivered")
    env = envelope(rcpt, envid="x\r\nReporting-MTA: dns; evil.example")
    per_message, (group,) = status_groups(make(env=env, pairs=[(rcpt, BOUNCE)]))
    assert per_message.get_all("Reporting-MTA") == ["dns; mx.example.org"]
    assert group.get_all("Action") == ["failed"]


# -- who gets a DSN -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [KIND_FAILURE, KIND_DELAY, KIND_SUCCESS])
def test_should_send_never_to_the_null_sender(kind):
    # RFC 3461 §5.2, RFC 5321 §4.5.5: no DSN about a DSN.
    rcpt = recipient(notify=["SUCCESS", "FAILURE", "DELAY"])
    assert not should_send(kind, envelope(rcpt, sender=""), rcpt)


def test_build_refuses_the_null_sender():
    with pytest.raises(ValueError):
        build_dsn(KIND_FAILURE, envelope(sender=""), [(recipient(), BOUNCE)], reporting_mta=HOST,
                  now=NOW, original=ORIGINAL)


@pytest.mark.parametrize("kind", [KIND_FAILURE, KIND_DELAY, KIND_SUCCESS])
def test_should_send_respects_notify_never(kind):
    rcpt = recipient(notify=["NEVER"])
    assert not should_send(kind, envelope(rcpt), rcpt)


def test_should_send_follows_notify():
    absent = recipient()
    assert should_send(KIND_FAILURE, envelope(absent), absent)
    assert should_send(KIND_DELAY, envelope(absent), absent)
    assert not should_send(KIND_SUCCESS, envelope(absent), absent)
    success = recipient(notify=["SUCCESS"])
    assert should_send(KIND_SUCCESS, envelope(success), success)
    assert not should_send(KIND_FAILURE, envelope(success), success)


def test_no_success_dsn_when_the_next_hop_took_notify():
    # RFC 3461 §5.2.1 (c): the DSN-capable next hop reports it.
    rcpt = recipient(notify=["SUCCESS"], dsn_relayed=True)
    assert not should_send(KIND_SUCCESS, envelope(rcpt), rcpt)


def test_notice_envelope():
    data = make()
    notice = notice_envelope(envelope(), data, queue_id=NOTICE_ID, now=NOW)
    fields = notice.checked_json()
    assert fields["sender"] == ""                              # RFC 3461 §6.1
    assert fields["ret"] is None and fields["envid"] is None
    assert fields["size"] == len(data)
    assert fields["body"] == "7BIT"
    assert fields["sender_utf8"] is False
    (rcpt,) = fields["recipients"]
    assert rcpt["address"] == "alice@example.org"
    assert rcpt["notify"] == ["NEVER"]
    assert rcpt["state"] == model.PENDING
    assert fields["client"] == {"ip": "127.0.0.1", "helo": None, "tls": False, "auth": None, "listener": "dsn"}
    assert (fields["id"], fields["arrival"], fields["next_attempt"]) == (NOTICE_ID, NOW, NOW)
    assert (fields["attempts"], fields["history"]) == (0, [])
    to = notice_envelope(envelope(), data, queue_id=NOTICE_ID, now=NOW, to=["a@x.test", "b@y.test"])
    assert [r.address for r in to.recipients] == ["a@x.test", "b@y.test"]


# -- fuzz: whatever comes back from the network or the spool, the DSN is well formed --------------

@fuzz_settings(150)
@given(original=st.binary(max_size=3000),
       text=st.text(max_size=600),
       enhanced=st.text(max_size=12),
       code=st.integers(min_value=0, max_value=999),
       address=st.text(min_size=1, max_size=300),
       kind=st.sampled_from([KIND_FAILURE, KIND_DELAY, KIND_SUCCESS]),
       ret=st.sampled_from([None, "FULL", "HDRS"]))
def test_fuzz_any_input_gives_a_well_formed_dsn(original, text, enhanced, code, address, kind, ret):
    rcpt = recipient(address, orcpt=f"rfc822;{address}", relay=text[:40])
    result = RecipientResult(address, model.STATUS_BOUNCED, code, enhanced, text)
    data = make(kind, env=envelope(rcpt, ret=ret, envid=text[:100]), pairs=[(rcpt, result)], original=original)
    per_message, groups = status_groups(data)
    assert len(groups) == 1
    assert groups[0]["Action"] in ("failed", "delayed", "delivered", "relayed")
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", groups[0]["Status"])
