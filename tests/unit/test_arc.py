"""ARC chain validation (RFC 8617 §4.1.3 states): chains sealed here with dkimpy's
arc_sign and a key served by the fake DNS; one and two hops pass, a changed body or a
hop that sealed cv=fail fails, no ARC headers is none, a hanging key ends at the budget."""
from __future__ import annotations

import base64

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import task

from deferreds import inline as sync, result_of
from fake_dns import HANG, FakeResolver
from mailgw.mailauth.arc import ARCResult, verify_arc
from mailgw.mailauth.dns import MailDNS

MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: list@lists.example.net\r\nSubject: hello\r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nHello list.\r\n")
HOP1 = "arc._domainkey.relay1.example"
HOP2 = "arc._domainkey.relay2.example"






@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture
def zones(key):
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    return {(HOP1, "TXT"): [record], (HOP2, "TXT"): [record]}


def seal(key, message: bytes, relay: bytes, results: str) -> bytes:
    """What a forwarder does: its Authentication-Results, then its ARC set on top."""
    message = b"Authentication-Results: " + relay + b"; " + results.encode() + b"\r\n" + message
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    arc_set = dkim.arc_sign(message, b"arc", relay, pem, relay)
    assert arc_set, "dkimpy produced no ARC set"
    return b"".join(arc_set) + message


def check(zones, message, **kw) -> ARCResult:
    clock = task.Clock()
    return result_of(verify_arc(MailDNS(FakeResolver(zones), clock=clock), message,
                                run_in_thread=sync, clock=clock, **kw))


def test_one_hop_chain_passes(key, zones):
    sealed = seal(key, MESSAGE, b"relay1.example", "spf=pass smtp.mailfrom=example.org")
    assert check(zones, sealed) == ARCResult("pass", 1, "")


def test_two_hop_chain_passes(key, zones):
    first = seal(key, MESSAGE, b"relay1.example", "spf=pass smtp.mailfrom=example.org")
    second = seal(key, first, b"relay2.example", "arc=pass; spf=fail smtp.mailfrom=relay1.example")
    assert check(zones, second) == ARCResult("pass", 2, "")


def test_tampered_body_fails(key, zones):
    sealed = seal(key, MESSAGE, b"relay1.example", "spf=pass smtp.mailfrom=example.org")
    result = check(zones, sealed.replace(b"Hello list.", b"Hello world."))
    assert (result.result, result.instance) == ("fail", 1)
    assert "ARC-Message-Signature" in result.reason


def test_a_hop_that_sealed_cv_fail_ends_the_chain(key, zones):
    first = seal(key, MESSAGE, b"relay1.example", "spf=pass smtp.mailfrom=example.org")
    second = seal(key, first, b"relay2.example", "arc=fail")
    result = check(zones, second)
    assert result.result == "fail"


def test_no_arc_headers_is_none_without_dns():
    clock = task.Clock()
    resolver = FakeResolver({})
    result = result_of(verify_arc(MailDNS(resolver, clock=clock), MESSAGE, run_in_thread=sync, clock=clock))
    assert result == ARCResult("none", 0, "no ARC headers")
    assert resolver.queries == []


def test_missing_key_fails(key, zones):
    sealed = seal(key, MESSAGE, b"relay1.example", "spf=pass smtp.mailfrom=example.org")
    assert check({}, sealed).result == "fail"


def test_hanging_key_lookup_fails_when_the_budget_ends(key, zones):
    sealed = seal(key, MESSAGE, b"relay1.example", "spf=pass smtp.mailfrom=example.org")
    zones[(HOP1, "TXT")] = HANG
    clock = task.Clock()
    d = verify_arc(MailDNS(FakeResolver(zones), clock=clock), sealed, run_in_thread=sync, clock=clock, budget=4.0)
    results = []
    d.addCallback(results.append)
    clock.advance(3.9)
    assert results == []
    clock.advance(0.1)
    assert results[0].result == "fail" and "for now" in results[0].reason
