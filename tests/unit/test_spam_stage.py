"""rspamd in the checks and modifiers stages (mailgw/mailauth/stages.py): each
action's verdict, on_failure, who is scanned, what rspamd is told, and the
X-Spam-* / Subject: modifiers. rspamd is a fake scanner here (the HTTP client
has its own tests, tests/unit/test_rspamd_client.py); DNS is the
FakeResolver, time a Clock, the thread pool inline."""
from __future__ import annotations

import dataclasses

import pytest
from twisted.internet import defer, task

from deferreds import inline, result_of
from fake_dns import FakeResolver
from mailgw.config_types import ChecksConfig, SpamConfig
from mailgw.errors import MailError, PermanentError
from mailgw.mailauth import stages
from mailgw.mailauth.dns import MailDNS
from mailgw.mailauth.stages import INBOUND, SUBMISSION, TRUSTED_RELAY, AuthenticationStage, Origin
from mailgw.spam.rspamd import RspamdUnavailable, Scan

CHECKS = ChecksConfig(spf=True, dkim=True, dmarc=True, arc=False, authserv_id="mx.example.test",
                      dmarc_enforce=True, quarantine_folder="Junk", on_temperror="accept", budget=10.0,
                      received_spf=False, reverse_dns=True, min_key_bits=1024)
SPAM = SpamConfig(rspamd_url="http://127.0.0.1:11333", controller_url="", password="", timeout=15.0,
                  on_failure="accept", scan_outbound=False, max_scan_size=1024 * 1024, junk_folder="Junk",
                  subject_tag="", learn=False, learn_concurrency=2, learn_backlog=100, dnsbl_sites=(),
                  dnsbl_threshold=1, dnsbl_budget=3.0, allow_networks=(), pregreet_wait=0.0,
                  pregreet_pass_ttl=86400.0)
ZONE = {("good.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"]}
MESSAGE = (b"Received: from mail.good.example ([192.0.2.1])\n\tby mx.example.test; Mon, 7 Dec 2026 10:00:00 +0000\n"
           b"From: Friend <friend@good.example>\nTo: alice@example.test\nSubject: lunch\n"
           b"X-Spam-Status: No, score=-100\nX-Spam-Flag: NO\nX-Rspamd-Score: -50\n"
           b"Date: Mon, 07 Dec 2026 10:00:00 +0000\nMessage-ID: <1@good.example>\n\n"
           b"X-Spam-Flag: NO in the body stays\n")


class FakeScanner:
    """RspamdClient.check, answering with `scan` (a Scan or an exception)."""

    def __init__(self, scan):
        self.scan = scan
        self.calls = []

    def check(self, message, envelope):
        self.calls.append((message, envelope))
        if isinstance(self.scan, Exception):
            return defer.fail(self.scan)
        return defer.succeed(self.scan)


def scan(action, score=1.0, **extra):
    return Scan(action, score, 15.0, (("BAYES_SPAM", 5.1), ("R_SPF_ALLOW", -0.2)), **extra)


def stage(scanner, *, spam=SPAM, checks=CHECKS):
    clock = task.Clock()
    return AuthenticationStage(checks=checks, add_missing_headers=True, signer=None,
                               mail_dns=MailDNS(FakeResolver(ZONE), clock=clock, timeout=5.0),
                               run_in_thread=inline, clock=clock, hostname="mx.example.test",
                               is_local_domain=lambda domain: domain == "example.test",
                               spam=spam, rspamd=scanner)


def inbound():
    return Origin(INBOUND, "192.0.2.1", "mail.good.example", "friend@good.example", client_name="mail.good.example")


def process(scanner, origin=None, message=MESSAGE, **kwargs):
    return result_of(stage(scanner, **kwargs).process(message, lf=True, origin=origin or inbound(), queue_id="Q1",
                                                      recipients=("alice@example.test", "bob@example.test")))


def head_of(message: bytes) -> str:
    return message.split(b"\n\n", 1)[0].decode()


def test_no_action_goes_to_the_inbox_with_an_honest_spam_status():
    scanner = FakeScanner(scan("no action", -0.2))
    outcome = process(scanner)
    assert outcome.quarantine_folder is None and outcome.results["spam"] == "no action"
    head = head_of(outcome.message)
    assert "X-Spam-Flag" not in head and "X-Rspamd" not in head and "score=-100" not in head
    assert "X-Spam-Status: No, score=-0.20 required=15.00" in head
    assert "X-Spam-Score: -0.20 / 15.00" in head
    assert outcome.message.endswith(b"X-Spam-Flag: NO in the body stays\n")


def test_rspamd_is_told_the_envelope_and_our_spf_dkim_dmarc_results():
    scanner = FakeScanner(scan("no action"))
    process(scanner)
    message, envelope = scanner.calls[0]
    assert b"\r\nSubject: lunch\r\n" in message          # CRLF on the wire to rspamd
    assert envelope.recipients == ("alice@example.test", "bob@example.test")
    assert (envelope.sender, envelope.client_ip, envelope.helo, envelope.client_name, envelope.queue_id) == \
        ("friend@good.example", "192.0.2.1", "mail.good.example", "mail.good.example", "Q1")
    assert (envelope.spf, envelope.dkim, envelope.dmarc) == ("pass", (), "none")


@pytest.mark.parametrize("action", ["add header", "rewrite subject"])
def test_spam_goes_to_junk_with_x_spam_headers_under_our_trace(action):
    outcome = process(FakeScanner(scan(action, 7.3, subject="***SPAM*** lunch")))
    assert outcome.quarantine_folder == "Junk" and outcome.results["spam"] == action
    head = head_of(outcome.message)
    lines = head.split("\n")
    assert lines[0].startswith("Received: from mail.good.example")
    assert lines[2].startswith("Authentication-Results: mx.example.test;")
    assert "X-Spam-Flag: YES\nX-Spam-Score: 7.30 / 15.00\nX-Spam-Action: " + action in head
    assert "X-Spam-Status: Yes, score=7.30 required=15.00\n\ttests=BAYES_SPAM(5.10), R_SPF_ALLOW(-0.20)" in head
    assert head.count("X-Spam-Flag") == 1 and "score=-100" not in head
    # No subject_tag: only "rewrite subject" takes rspamd's subject.
    expected = "Subject: ***SPAM*** lunch" if action == "rewrite subject" else "Subject: lunch"
    assert expected in lines


def test_the_subject_tag_is_put_in_front_once():
    spam = dataclasses.replace(SPAM, subject_tag="[SPAM] ")
    outcome = process(FakeScanner(scan("add header", 8.0)), spam=spam)
    assert "Subject: [SPAM] lunch" in head_of(outcome.message).split("\n")
    tagged = MESSAGE.replace(b"Subject: lunch", b"Subject: [SPAM] lunch")
    outcome = process(FakeScanner(scan("add header", 8.0)), spam=spam, message=tagged)
    assert head_of(outcome.message).count("[SPAM]") == 1


def test_a_non_ascii_rewritten_subject_is_an_encoded_word():
    outcome = process(FakeScanner(scan("rewrite subject", 8.0, subject="*** SPAM *** déjeuner")))
    assert "Subject: =?utf-8?q?***_SPAM_***_d=C3=A9jeuner?=" in head_of(outcome.message).split("\n")


def test_reject_is_554_5_7_1_with_rspamds_text_when_it_gave_one():
    with pytest.raises(PermanentError) as refused:
        process(FakeScanner(scan("reject", 20.0)))
    assert (refused.value.code, refused.value.enhanced, refused.value.text) == (554, "5.7.1", "Spam message rejected")
    with pytest.raises(PermanentError) as refused:
        process(FakeScanner(scan("reject", 20.0, reply_text="Gtube pattern")))
    assert refused.value.text == "Gtube pattern"


@pytest.mark.parametrize("action, text", [("soft reject", "Try again later"),
                                          ("greylist", "Greylisted, please try again later")])
def test_soft_reject_and_greylist_are_451_4_7_1(action, text):
    with pytest.raises(MailError) as deferred:
        process(FakeScanner(scan(action, 5.0)))
    assert (deferred.value.code, deferred.value.enhanced, deferred.value.text) == (451, "4.7.1", text)
    assert not deferred.value.permanent


def test_rspamd_unavailable_accepts_unscanned_by_default_and_counts():
    scanner = FakeScanner(RspamdUnavailable("connection refused"))
    the_stage = stage(scanner)
    outcome = result_of(the_stage.process(MESSAGE, lf=True, origin=inbound(), queue_id="Q1"))
    assert outcome.quarantine_folder is None and "spam" not in outcome.results
    assert the_stage.unscanned == 1
    # The client's own verdict headers still go: the message was meant to be scanned.
    assert "score=-100" not in head_of(outcome.message) and "X-Spam-Status" not in head_of(outcome.message)


def test_rspamd_unavailable_defers_when_configured():
    spam = dataclasses.replace(SPAM, on_failure="defer")
    with pytest.raises(MailError) as deferred:
        process(FakeScanner(RspamdUnavailable("no answer within 15 s")), spam=spam)
    assert (deferred.value.code, deferred.value.enhanced) == (451, "4.7.1")


def test_only_inbound_mail_is_scanned_unless_scan_outbound():
    user = Origin(SUBMISSION, "192.0.2.9", "laptop", "carol@example.test", user="carol@example.test")
    trusted = Origin(TRUSTED_RELAY, "10.0.0.5", "app", "app@example.test")
    dsn = Origin(SUBMISSION, "127.0.0.1", None, "")
    scanner = FakeScanner(scan("add header", 9.0))
    for origin in (user, trusted, dsn):
        outcome = process(scanner, origin=origin)
        assert outcome.quarantine_folder is None and b"X-Spam" in outcome.message   # not scanned: left alone
    assert scanner.calls == []
    outbound = dataclasses.replace(SPAM, scan_outbound=True)
    for origin in (trusted, dsn):
        process(scanner, origin=origin, spam=outbound)
    assert scanner.calls == []
    with pytest.raises(PermanentError):
        process(FakeScanner(scan("reject", 30.0)), origin=user, spam=outbound)
    outcome = process(scanner, origin=user, spam=outbound)
    assert outcome.quarantine_folder == "Junk" and scanner.calls[0][1].user == "carol@example.test"


def test_a_message_over_max_scan_size_is_delivered_unscanned():
    scanner = FakeScanner(scan("reject", 30.0))
    spam = dataclasses.replace(SPAM, max_scan_size=100)
    outcome = process(scanner, spam=spam)
    assert scanner.calls == [] and outcome.quarantine_folder is None


def test_without_checks_rspamd_still_scans_and_gets_no_results():
    scanner = FakeScanner(scan("add header", 7.0))
    outcome = process(scanner, checks=None)
    envelope = scanner.calls[0][1]
    assert (envelope.spf, envelope.dkim, envelope.dmarc) == (None, None, None)
    assert outcome.quarantine_folder == "Junk"
    assert "Authentication-Results" not in head_of(outcome.message)
    assert head_of(outcome.message).split("\n")[2].startswith("X-Spam-Flag: YES")


def test_strip_spam_headers_takes_every_spelling_and_keeps_the_body():
    message = (b"X-Spam-Flag: NO\nx-spam-status: No,\n\tscore=1\nX-Spamd-Result: default\nX-Spam: no\n"
               b"X-Rspamd-Action: no action\nX-Spammy-Name-Is-Fine-To-Drop: 1\nSubject: s\n\nX-Spam-Flag: NO\n")
    stripped, removed = stages.strip_spam_headers(message, b"\n")
    assert removed == 6
    assert stripped == b"Subject: s\n\nX-Spam-Flag: NO\n"
