"""The checks and modifiers stages (mailgw/mailauth/stages.py): their order,
the verdicts, forged Authentication-Results, the headers a submission gets,
and signing last. DNS is the FakeResolver; time is a Clock; the thread pool
runs inline."""
from __future__ import annotations

import base64
import dataclasses

import dkim
import pytest
from hypothesis import given
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, task

from deferreds import inline, result_of
from fake_dns import HANG, FakeResolver
from fuzzing import fuzz_settings
from mailgw.config_types import ChecksConfig
from mailgw.errors import MailError
from mailgw.mailauth import stages
from mailgw.mailauth.dns import MailDNS
from mailgw.mailauth.stages import INBOUND, SUBMISSION, TRUSTED_RELAY, AuthenticationStage, Origin

CHECKS = ChecksConfig(spf=True, dkim=True, dmarc=True, arc=True, authserv_id="mx.example.test",
                      dmarc_enforce=True, quarantine_folder="Junk", on_temperror="accept", budget=10.0,
                      received_spf=False, reverse_dns=True, min_key_bits=1024)




def stage(zones=None, *, checks=CHECKS, signer=None, clock=None):
    clock = clock or task.Clock()
    return AuthenticationStage(checks=checks, add_missing_headers=True, signer=signer,
                               mail_dns=MailDNS(FakeResolver(zones or {}), clock=clock, timeout=5.0),
                               run_in_thread=inline, clock=clock, hostname="mx.example.test",
                               is_local_domain=lambda domain: domain == "example.test")




def rsa_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def inbound(sender="friend@good.example", helo="mail.good.example", ip="192.0.2.1"):
    return Origin(INBOUND, ip, helo, sender)


MESSAGE = (b"Received: from mail.good.example ([192.0.2.1])\n\tby mx.example.test; Mon, 7 Dec 2026 10:00:00 +0000\n"
           b"From: Friend <friend@good.example>\nTo: alice@example.test\nSubject: lunch\n"
           b"Date: Mon, 07 Dec 2026 10:00:00 +0000\nMessage-ID: <1@good.example>\n\nsee you\n")


# -- pure parts ------------------------------------------------------------------

def test_forged_results_with_our_id_are_removed_whatever_their_spelling():
    message = (b"Received: x\n"
               b"Authentication-Results: mx.example.test; dkim=pass\n"
               b"authentication-results:(a comment)\n MX.Example.Test ;\n\tspf=pass\n"
               b"Authentication-Results: mx.example.test.evil; spf=pass\n"
               b"Authentication-Results: other.example; spf=pass\n"
               b"Subject: s\n\nAuthentication-Results: mx.example.test; in the body stays\n")
    stripped, removed = stages.strip_our_results(message, b"\n", "mx.example.test")
    assert removed == 2
    assert stripped == (b"Received: x\nAuthentication-Results: mx.example.test.evil; spf=pass\n"
                        b"Authentication-Results: other.example; spf=pass\nSubject: s\n\n"
                        b"Authentication-Results: mx.example.test; in the body stays\n")


def test_split_header_handles_no_body_and_no_header():
    assert stages.split_header(b"A: 1\nB: 2\n", b"\n") == (b"A: 1\nB: 2\n", b"")
    assert stages.split_header(b"\nbody\n", b"\n") == (b"", b"\nbody\n")
    assert stages.header_fields(b"A: 1\n 2\nB: 3\n", b"\n") == [b"A: 1\n 2", b"B: 3"]


# -- checks and verdicts ------------------------------------------------------------

def good_zone(public_record):
    return {("good.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
            ("sel._domainkey.good.example", "TXT"): [[public_record[i:i + 250]
                                                      for i in range(0, len(public_record), 250)]],
            ("_dmarc.good.example", "TXT"): ["v=DMARC1; p=reject"],
            ("mail.good.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"]}


def test_a_correctly_signed_message_passes_spf_dkim_dmarc_and_gets_one_results_header():
    pem, public = rsa_key()
    signature = dkim.sign(MESSAGE.replace(b"\n", b"\r\n"), b"sel", b"good.example", pem,
                          canonicalize=(b"relaxed", b"relaxed")).replace(b"\r\n", b"\n")
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.example\n"
    received, rest = MESSAGE.split(b"\nFrom:", 1)
    received += b"\n"
    # As the server hands it over: our Received: on top, then what the client sent.
    message = received + forged + signature + b"From:" + rest
    outcome = result_of(stage(good_zone(public)).process(message, lf=True, origin=inbound(), queue_id="Q1"))
    assert outcome.quarantine_folder is None
    assert outcome.results == {"spf": "pass", "dkim": "pass", "dmarc": "pass", "arc": "none"}
    head = outcome.message.split(b"\n\n", 1)[0].decode()
    assert head.startswith(received.decode() + "Authentication-Results: mx.example.test;\n\tspf=pass"), head[:300]
    assert "smtp.mailfrom=friend@good.example" in head
    assert "dkim=pass header.d=good.example header.s=sel header.a=rsa-sha256 header.b=" in head
    assert "dmarc=pass (p=reject dis=none) header.from=good.example" in head
    assert "bank.example" not in head and head.count("Authentication-Results:") == 1


def test_p_reject_failure_is_550_5_7_1_and_quarantine_goes_to_junk():
    zone = {("bad.example", "TXT"): ["v=spf1 -all"], ("_dmarc.bad.example", "TXT"): ["v=DMARC1; p=reject"],
            ("junk.example", "TXT"): ["v=spf1 -all"], ("_dmarc.junk.example", "TXT"): ["v=DMARC1; p=quarantine"]}
    forged = MESSAGE.replace(b"friend@good.example", b"ceo@bad.example")
    with pytest.raises(MailError) as refused:
        result_of(stage(zone).process(forged, lf=True, origin=inbound("ceo@bad.example"), queue_id="Q2"))
    assert (refused.value.code, refused.value.enhanced) == (550, "5.7.1")
    assert "bad.example" in refused.value.text
    junk = MESSAGE.replace(b"friend@good.example", b"bill@junk.example")
    outcome = result_of(stage(zone).process(junk, lf=True, origin=inbound("bill@junk.example"), queue_id="Q3"))
    assert outcome.quarantine_folder == "Junk" and outcome.results["dmarc"] == "fail"
    # An admin who only wants the results recorded: delivered as usual, marked.
    marking = dataclasses.replace(CHECKS, dmarc_enforce=False)
    outcome = result_of(stage(zone, checks=marking).process(forged, lf=True, origin=inbound("ceo@bad.example"),
                                                            queue_id="Q4"))
    assert outcome.quarantine_folder is None and b"dmarc=fail" in outcome.message


def test_a_dns_server_that_never_answers_is_temperror_within_the_budget_and_accepted_by_default():
    clock = task.Clock()
    zone = {("slow.example", "TXT"): HANG, ("_dmarc.slow.example", "TXT"): HANG}
    message = MESSAGE.replace(b"friend@good.example", b"x@slow.example")
    d = stage(zone, clock=clock).process(message, lf=True, origin=inbound("x@slow.example"), queue_id="Q5")
    assert not d.called
    # One budget for everything: SPF's own ends at `budget`; DMARC, which starts
    # after SPF and DKIM, gets only the rest, so the whole stage is over well
    # before 2 x budget.
    clock.advance(CHECKS.budget)
    clock.advance(1.5)
    outcome = result_of(d)
    assert outcome.results["spf"] == "temperror" and outcome.results["dmarc"] == "temperror"
    deferring = dataclasses.replace(CHECKS, on_temperror="defer")
    d = stage(zone, checks=deferring, clock=clock).process(message, lf=True, origin=inbound("x@slow.example"),
                                                           queue_id="Q6")
    clock.advance(CHECKS.budget)
    clock.advance(1.5)
    with pytest.raises(MailError) as deferred:
        result_of(d)
    assert (deferred.value.code, deferred.value.enhanced) == (451, "4.7.24")


def test_trusted_and_submitted_mail_is_not_checked_but_forged_results_still_go():
    forged = b"Authentication-Results: mx.example.test; dmarc=pass\n" + MESSAGE
    resolver_zone = {}
    staged = stage(resolver_zone)
    for kind in (TRUSTED_RELAY, SUBMISSION):
        outcome = result_of(staged.process(forged, lf=True, origin=Origin(kind, "127.0.0.2", "h", "a@example.test"),
                                           queue_id="Q7"))
        assert b"Authentication-Results" not in outcome.message and outcome.results == {}
    assert staged.mail_dns.queries == 0, "no DNS for mail we do not check"


# -- modifiers on submission ----------------------------------------------------------

class KeyedSigner:
    """A DKIMSigner stand-in that records what it signed (the real one: test_dkim_sign.py)."""

    def __init__(self, domains):
        self.domains = domains
        self.signed = []

    def has_key(self, domain):
        return domain in self.domains

    def signatures_for(self, message, *, lf, domain):
        self.signed.append((message, domain))
        return b"DKIM-Signature: v=1; d=" + domain.encode() + b"\r\n\tb=xyz\r\n"


def test_submission_gets_date_and_message_id_then_the_signature_on_top_last():
    clock = task.Clock()
    clock.advance(1_800_000_000)
    signer = KeyedSigner({"example.test"})
    bare = b"From: alice@example.test\nTo: bob@remote.example\nSubject: hi\n\nbody\n"
    outcome = result_of(stage(signer=signer, clock=clock).process(
        bare, lf=True, origin=Origin(SUBMISSION, "127.0.0.1", None, "alice@example.test", "alice@example.test"),
        queue_id="ABC123"))
    signed_input, domain = signer.signed[0]
    assert domain == "example.test"
    assert b"\nDate: " in signed_input and b"\nMessage-ID: <ABC123@mx.example.test>\n" in signed_input
    assert outcome.message == b"DKIM-Signature: v=1; d=example.test\n\tb=xyz\n" + signed_input


def test_trusted_relay_is_signed_only_for_our_own_from_domains():
    signer = KeyedSigner({"example.test", "customer.example"})
    for sender, expected in (("a@example.test", 1), ("a@customer.example", 0)):
        signer.signed.clear()
        message = f"From: {sender}\nSubject: s\n\nbody\n".encode()
        result_of(stage(signer=signer).process(message, lf=True, origin=Origin(TRUSTED_RELAY, "127.0.0.2", "h", sender),
                                               queue_id="Q8"))
        assert len(signer.signed) == expected, sender


def test_inbound_mail_is_never_signed():
    signer = KeyedSigner({"example.test"})
    message = b"From: forged@example.test\nSubject: s\n\nbody\n"
    result_of(stage(signer=signer).process(message, lf=True, origin=inbound("forged@example.test"), queue_id="Q9"))
    assert signer.signed == []


def test_received_spf_is_added_when_asked():
    zone = {("good.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"]}
    checks = dataclasses.replace(CHECKS, received_spf=True, dkim=False, dmarc=False, arc=False)
    outcome = result_of(stage(zone, checks=checks).process(MESSAGE, lf=True, origin=inbound(), queue_id="Q10"))
    head = outcome.message.split(b"\n\n", 1)[0]
    assert b"\nReceived-SPF: pass " in head and b"client-ip=192.0.2.1" in head
    assert head.index(b"Authentication-Results:") < head.index(b"Received-SPF:") < head.index(b"From:")


@fuzz_settings(200)
@given(st.lists(st.sampled_from([b"Authentication-Results: mx.example.test; x=y", b"Authentication-Results:",
                                 b"authentication-results: (c) MX.example.test;", b"Subject: s", b" folded",
                                 b"\tfolded", b"From: a@b", b"Authentication-Results: other; y", b""]),
                max_size=12))
def test_stripping_never_touches_other_fields_or_the_body(lines):
    message = b"\n".join(lines) + b"\n\nbody\nAuthentication-Results: mx.example.test; z\n"
    stripped, removed = stages.strip_our_results(message, b"\n", "mx.example.test")
    assert stripped.endswith(b"\nbody\nAuthentication-Results: mx.example.test; z\n")
    before = stages.header_fields(stages.split_header(message, b"\n")[0], b"\n")
    after = stages.header_fields(stages.split_header(stripped, b"\n")[0], b"\n")
    assert len(before) - len(after) == removed
    assert [f for f in before if not f.lower().startswith(b"authentication-results")] == \
        [f for f in after if not f.lower().startswith(b"authentication-results")]


# -- the verdict reaches the targets stage (routing.dispatch) ---------------------------

def test_a_quarantined_message_goes_to_each_users_junk_folder_in_its_spelling_or_a_new_one(tmp_path):
    from mailgw.routing.dispatch import Dispatcher, Router, Transaction
    from mailgw.routing.resolver import Resolver, StaticAliases
    from mailgw.smtp.address import parse_mail_from, parse_rcpt_to

    class Users:
        def exists(self, address):
            return address in ("alice@example.test", "bob@example.test")

    class RecordingStore:
        def __init__(self):
            self.boxes = None

        def deliver(self, boxes, message, lf=False, return_path=None):
            self.boxes = boxes
            return defer.succeed(["path"])

    class QuarantiningStage:
        def process(self, message, *, lf, origin, queue_id, recipients=()):
            return defer.succeed(stages.Outcome(message, quarantine_folder="Junk"))

    (tmp_path / "example.test" / "alice" / ".junk" / "new").mkdir(parents=True)   # any case matches
    resolver = Resolver(local_domains=frozenset({"example.test"}), postmaster="alice@example.test",
                        abuse="alice@example.test", recipient_delimiter="+", users=Users(),
                        aliases=StaticAliases(), mail_dir=tmp_path)
    router = Router(config=None, userdb=Users(), resolver=resolver, stages=QuarantiningStage())
    store = RecordingStore()
    dispatcher = Dispatcher(router=router, store=store, spool=None, clock=task.Clock())
    transaction = Transaction(parse_mail_from("FROM:<x@junk.example>"))
    for address in ("alice@example.test", "bob@example.test"):
        dispatcher.add_local(transaction, parse_rcpt_to(f"TO:<{address}>", smtputf8=False))
    result_of(dispatcher.commit(transaction, b"Subject: s\n\nbody\n", "Q11", lf=True, client={},
                                origin=inbound("x@junk.example")))
    assert store.boxes == [("alice@example.test", "junk"), ("bob@example.test", "Junk")]


# -- the client's reverse DNS in Received: (smtp/server.py) ---------------------------------

def _received_of(zone, client, clock=None):
    from smtp_harness import Session

    clock = clock or task.Clock()
    mail_dns = MailDNS(FakeResolver(zone), clock=clock, timeout=5.0)
    session = Session(client=client, mail_dns=mail_dns, clock=clock)
    session.read()
    session.ehlo("mail.sender.example")
    assert session.last("MAIL FROM:<a@sender.example>").startswith("250")
    assert session.last("RCPT TO:<alice@example.test>").startswith("250")
    assert session.last("DATA").startswith("354")
    replies = session.send("Subject: s\r\n\r\nbody\r\n.\r\n")
    return session, replies


def test_a_forward_confirmed_client_name_is_in_received_and_an_unconfirmed_one_is_unknown():
    confirmed = {("1.2.0.192.in-addr.arpa", "PTR"): ["mail.sender.example"],
                 ("mail.sender.example", "A"): ["192.0.2.1"]}
    session, replies = _received_of(confirmed, "192.0.2.1")
    assert replies[-1].startswith("250 ")
    assert session.store.delivered[-1][1].startswith(
        b"Received: from mail.sender.example (mail.sender.example [192.0.2.1])")
    # The PTR name's address is somebody else's: not confirmed, so not shown (Postfix's "unknown").
    forged = {("1.2.0.192.in-addr.arpa", "PTR"): ["mail.bank.example"], ("mail.bank.example", "A"): ["198.51.100.7"]}
    session, _ = _received_of(forged, "192.0.2.1")
    assert session.store.delivered[-1][1].startswith(b"Received: from mail.sender.example (unknown [192.0.2.1])")


def test_the_received_line_waits_for_a_slow_reverse_lookup_within_the_dns_timeout():
    clock = task.Clock()
    session, replies = _received_of({("1.2.0.192.in-addr.arpa", "PTR"): HANG}, "192.0.2.1", clock=clock)
    assert replies == [] and session.store.delivered == [], "no reply before the name is known"
    clock.advance(5.0)
    replies = session.read()
    assert replies[-1].startswith("250 ")
    assert session.store.delivered[-1][1].startswith(b"Received: from mail.sender.example (unknown [192.0.2.1])")


def test_loopback_clients_are_localhost_without_a_query():
    session, _ = _received_of({}, "127.0.0.1")
    assert session.store.delivered[-1][1].startswith(b"Received: from mail.sender.example (localhost [127.0.0.1])")
    assert session.factory.mail_dns.queries == 0


def test_configured_nameservers_are_the_only_ones_asked():
    from twisted.names import client

    from mailgw.config import load
    config = load(None, overrides={"dns": {"nameservers": ["127.0.0.1:5353"]}})
    chain = stages.build_resolver(config)
    upstream, = [r for r in chain.resolvers if isinstance(r, client.Resolver)]
    assert upstream.servers == [("127.0.0.1", 5353)] and not upstream.dynServers
