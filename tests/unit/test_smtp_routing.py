"""SMTP sessions through the routing stages: aliases and lists, forwards with
SRS, bounces to SRS addresses, catch-all, subaddress folders, who may send as
what (MAIL FROM and header From:), quota at RCPT (RFC 3463 4.2.2)."""
from __future__ import annotations

from twisted.internet import task

from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.routing import aliases as table_module
from mailgw.routing.resolver import Resolver, StaticAliases
from mailgw.routing.srs import SRS
from mailgw.store.quota import IQuota
from mailgw.smtp.inbound import Router
from smtp_harness import FakeUserDB, Session, make_config

SECRET = b"k" * 32
DAY = 86400.0


@implementer(IQuota)
class FakeQuota:
    """Over quota: the addresses in `full`."""

    def __init__(self, *full):
        self.full = set(full)

    def over(self, address, incoming_octets=0, incoming_messages=0):
        return address in self.full

    def limits(self, address):
        return (1, 0)

    def usage(self, address):
        return (2 if address in self.full else 0, 0)

    def record(self, address, octets_delta, messages_delta):
        pass

    def status(self, address):
        return {}


def routed_session(aliases: str = "", *, quota=None, mail_dir=None, clock=None, **session):
    clock = clock or task.Clock()
    config = make_config(**session.pop("server", {}))
    userdb = FakeUserDB()
    parsed, problems = table_module.parse_aliases(aliases.encode(), config.local_domains,
                                                  max_depth=10, max_expansion=1000)
    assert problems == []
    srs = SRS(SECRET, "example.test", clock=clock.seconds)
    resolver = Resolver(local_domains=config.local_domains, postmaster=config.postmaster,
                        abuse=config.postmaster, recipient_delimiter="+", users=userdb,
                        aliases=StaticAliases(parsed), srs=srs, mail_dir=mail_dir)
    router = Router(config, userdb, resolver, quota=quota, srs=srs)
    return Session(config=config, userdb=userdb, clock=clock, router=router, **session)


def send(s: Session, sender: str, recipients, body=b"Subject: hi\r\n\r\nhello\r\n", expect="250"):
    s.ehlo()
    assert s.last(f"MAIL FROM:<{sender}>").startswith("250"), sender
    for rcpt in recipients:
        reply = s.last(f"RCPT TO:<{rcpt}>")
        if not reply.startswith("250"):
            return reply
    assert s.last("DATA").startswith("354")
    reply = s.send(body + b".\r\n")[-1]
    assert reply.startswith(expect), reply
    return reply


LIST = "team@example.test alice@example.test, bob@example.test, friend@elsewhere.example\n"


def test_alias_with_two_local_members_and_one_external_srs_forward():
    s = routed_session(LIST)
    send(s, "someone@sender.example", ["team@example.test"])
    (boxes, _), = s.store.delivered
    assert boxes == ["alice@example.test", "bob@example.test"]
    (queue_id, envelope, _), = s.spool.queued
    # RFC-less but universal: the forward's envelope sender is ours (SRS0), so
    # the receiver's SPF check of our server passes; the sender is inside it.
    assert envelope["sender"].startswith("SRS0=") and envelope["sender"].endswith("@example.test")
    assert "=sender.example=someone@" in envelope["sender"]
    (rcpt,) = envelope["recipients"]
    assert rcpt["address"] == "friend@elsewhere.example"
    assert rcpt["orig_to"] == "team@example.test"
    assert rcpt["orcpt"] == "rfc822;team@example.test"         # RFC 3461 §4.2
    assert SRS(SECRET, "example.test", clock=s.clock.seconds).reverse(envelope["sender"]) == \
        "someone@sender.example"


def test_direct_remote_recipient_keeps_the_sender_and_the_forward_gets_its_own_entry():
    s = routed_session(LIST, client="10.0.0.5")          # trusted: may relay
    send(s, "someone@sender.example", ["team@example.test", "direct@remote.example"])
    senders = sorted((envelope["sender"][:5], [r["address"] for r in envelope["recipients"]])
                     for _, envelope, _ in s.spool.queued)
    assert senders == [("SRS0=", ["friend@elsewhere.example"]), ("someo", ["direct@remote.example"])]
    assert len({queue_id for queue_id, _, _ in s.spool.queued}) == 2


def test_forward_of_our_own_or_the_null_sender_is_not_rewritten():
    s = routed_session(LIST, client="10.0.0.5")
    send(s, "alice@example.test", ["team@example.test"])
    assert s.spool.queued[-1][1]["sender"] == "alice@example.test"
    s = routed_session(LIST)
    send(s, "", ["team@example.test"])
    assert s.spool.queued[-1][1]["sender"] == ""


def test_a_bounce_to_our_srs_address_goes_on_to_the_original_sender():
    clock = task.Clock()
    clock.advance(100 * DAY)
    srs = SRS(SECRET, "example.test", clock=clock.seconds)
    address = srs.forward("someone@sender.example")
    s = routed_session("", clock=clock)
    send(s, "", [address], body=b"Subject: Undelivered Mail\r\n\r\nbounce\r\n")
    (_, envelope, _), = s.spool.queued
    assert envelope["sender"] == ""
    assert [r["address"] for r in envelope["recipients"]] == ["someone@sender.example"]
    assert s.store.delivered == []


def test_a_bounce_to_a_long_srs_address_is_accepted_past_64_octets():
    # A VERP sender, as newsletters use, makes the SRS local part longer than
    # RFC 5321's 64 octets; the bounce must still come back in.
    clock = task.Clock()
    sender = "bounce-1234567890-abcdefabcdef-subscriber=example.net@mailing.bigsender.example"
    address = SRS(SECRET, "example.test", clock=clock.seconds).forward(sender)
    assert len(address.split("@")[0]) > 64
    s = routed_session("", clock=clock)
    send(s, "", [address])
    assert [r["address"] for r in s.spool.queued[-1][1]["recipients"]] == [sender]
    s = routed_session("", clock=clock)
    assert send(s, "", ["x" * 65 + "@example.test"]).startswith("501")


def test_forged_and_expired_srs_addresses_are_refused_at_rcpt():
    clock = task.Clock()
    clock.advance(100 * DAY)
    srs = SRS(SECRET, "example.test", clock=clock.seconds)
    good = srs.forward("someone@sender.example")
    forged = SRS(b"x" * 32, "example.test", clock=clock.seconds).forward("someone@sender.example")
    s = routed_session("", clock=clock)
    reply = send(s, "", [forged])
    assert reply.startswith("550 5.7.1"), reply
    clock.advance(22 * DAY)                                     # srs_max_age defaults to 21 days
    s = routed_session("", clock=clock)
    reply = send(s, "", [good])
    assert reply.startswith("550 5.7.1"), reply


def test_catch_all_takes_unknown_addresses_only():
    s = routed_session("@example.test postmaster@example.test\n")
    send(s, "x@sender.example", ["nobody@example.test", "alice@example.test"])
    (boxes, _), = s.store.delivered
    assert boxes == ["alice@example.test", "postmaster@example.test"]


def test_unknown_without_catch_all_is_550():
    s = routed_session("")
    assert send(s, "x@sender.example", ["nobody@example.test"]).startswith("550 5.1.1")


def test_subaddress_is_filed_into_the_folder(tmp_path):
    (tmp_path / "example.test" / "alice" / ".Lists" / "new").mkdir(parents=True)
    s = routed_session("", mail_dir=tmp_path)
    send(s, "x@sender.example", ["alice+Lists@example.test", "bob+nofolder@example.test"])
    (boxes, _), = s.store.delivered
    assert boxes == [("alice@example.test", "Lists"), "bob@example.test"]


def test_two_routes_to_one_mailbox_give_one_copy():
    s = routed_session(LIST)
    send(s, "x@sender.example", ["team@example.test", "alice@example.test", "Alice@example.test"])
    (boxes, _), = s.store.delivered
    assert boxes == ["alice@example.test", "bob@example.test"]


# -- who may send as what ------------------------------------------------------------------

SALES = "sales@example.test alice@example.test, bob@example.test [send-as]\ninfo@example.test alice@example.test\n"


def submit(s: Session, sender: str, header_from: str, expect: str):
    s.ehlo()
    assert s.login().startswith("235")
    reply = s.last(f"MAIL FROM:<{sender}>")
    if not reply.startswith("250"):
        return reply
    assert s.last("RCPT TO:<carol@remote.example>").startswith("250")
    assert s.last("DATA").startswith("354")
    reply = s.send(f"From: Someone <{header_from}>\r\nSubject: x\r\n\r\nbody\r\n.\r\n".encode())[-1]
    assert reply.startswith(expect), reply
    return reply


def test_member_of_a_send_as_alias_may_use_it_in_mail_from_and_from_header():
    s = routed_session(SALES, role="submission", tls=True)
    submit(s, "sales@example.test", "sales@example.test", "250")
    assert s.spool.queued[-1][1]["sender"] == "sales@example.test"


def test_alias_without_send_as_is_refused_in_mail_from():
    s = routed_session(SALES, role="submission", tls=True)
    assert submit(s, "info@example.test", "info@example.test", "250").startswith("553 5.7.1")


def test_header_from_not_owned_is_refused_at_end_of_data_and_nothing_is_queued():
    s = routed_session(SALES, role="submission", tls=True)
    reply = submit(s, "alice@example.test", "bob@example.test", "550")
    assert reply.startswith("550 5.7.1")
    assert s.spool.queued == [] and s.store.delivered == []


def test_subaddress_in_header_from_is_the_users_own():
    s = routed_session(SALES, role="submission", tls=True)
    submit(s, "alice+lists@example.test", "alice+news@example.test", "250")


def test_allow_sender_mismatch_lets_both_through():
    s = routed_session(SALES, role="submission", tls=True, server={"allow_sender_mismatch": True})
    submit(s, "ceo@example.test", "ceo@example.test", "250")


# -- quota at RCPT -------------------------------------------------------------------------------

def test_over_quota_user_gets_452_4_2_2_and_others_still_receive():
    quota = FakeQuota("alice@example.test")
    verifyObject(IQuota, quota)
    s = routed_session(LIST, quota=quota)
    s.ehlo()
    s.last("MAIL FROM:<x@sender.example>")
    assert s.last("RCPT TO:<alice@example.test>").startswith("452 4.2.2")
    assert s.last("RCPT TO:<bob@example.test>").startswith("250")
    # A list with a member under quota goes on (the full one may exceed once).
    assert s.last("RCPT TO:<team@example.test>").startswith("250")
    assert s.last("DATA").startswith("354")
    assert s.send(b"hi\r\n.\r\n")[-1].startswith("250")
    (boxes, _), = s.store.delivered
    assert boxes == ["alice@example.test", "bob@example.test"]
