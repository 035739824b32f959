"""MX and address resolution: RFC 5321 §5.1 order and implicit MX, RFC 7505 Null MX,
NXDOMAIN vs SERVFAIL, address literals, A + AAAA, CNAMEs."""
from __future__ import annotations

import random

import pytest
from twisted.internet import defer
from twisted.names import error
from twisted.python.failure import Failure

from fake_dns import FakeResolver, Sequence
from mailgw.queue import mx


def result_of(d: defer.Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred did not fire"
    value = results[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


def failure_of(d: defer.Deferred) -> mx.DNSFailure:
    with pytest.raises(mx.DNSFailure) as info:
        result_of(d)
    return info.value


def test_mx_in_preference_order():
    resolver = FakeResolver({("example.net", "MX"): [(20, "mx2.example.net"), (10, "mx1.example.net"),
                                                     (30, "MX3.example.net.")]})
    assert result_of(mx.resolve_mx(resolver, "example.net")) == \
        ["mx1.example.net", "mx2.example.net", "mx3.example.net"]


def test_equal_preferences_are_shuffled_with_the_injected_random():
    resolver = FakeResolver({("example.net", "MX"): [(10, "a.example.net"), (10, "b.example.net"),
                                                     (5, "first.example.net"), (10, "c.example.net")]})
    sequence = Sequence()
    hosts = result_of(mx.resolve_mx(resolver, "example.net", random=sequence))
    assert hosts == ["first.example.net", "c.example.net", "b.example.net", "a.example.net"]
    seen = {tuple(result_of(mx.resolve_mx(resolver, "example.net", random=random.Random(seed)))[1:])
            for seed in range(30)}
    assert len(seen) > 1


def test_duplicate_mx_names_are_tried_once():
    resolver = FakeResolver({("example.net", "MX"): [(10, "mx.example.net"), (20, "mx.example.net")]})
    assert result_of(mx.resolve_mx(resolver, "example.net")) == ["mx.example.net"]


def test_no_mx_records_means_implicit_mx():
    resolver = FakeResolver({("example.net", "A"): ["192.0.2.1"]})
    assert result_of(mx.resolve_mx(resolver, "example.net")) == ["example.net"]


@pytest.mark.parametrize("exchange", [".", ""])
def test_null_mx_is_permanent(exchange):
    resolver = FakeResolver({("example.net", "MX"): [(0, exchange)]})
    failure = failure_of(mx.resolve_mx(resolver, "example.net"))
    assert failure.permanent and failure.enhanced == "5.1.10"
    assert failure.text == "Recipient address has null MX"


def test_null_mx_next_to_real_mx_is_ignored():
    resolver = FakeResolver({("example.net", "MX"): [(0, "."), (10, "mx.example.net")]})
    assert result_of(mx.resolve_mx(resolver, "example.net")) == ["mx.example.net"]


def test_nxdomain_is_permanent():
    failure = failure_of(mx.resolve_mx(FakeResolver(), "nowhere.example"))
    assert failure.permanent and failure.enhanced == "5.1.2" and failure.code == 550


@pytest.mark.parametrize("exception", [error.DNSServerError, error.DNSQueryTimeoutError(1), defer.TimeoutError,
                                       error.DNSQueryRefusedError])
def test_servfail_and_timeout_are_temporary(exception):
    resolver = FakeResolver({("example.net", "MX"): exception})
    failure = failure_of(mx.resolve_mx(resolver, "example.net"))
    assert not failure.permanent and failure.enhanced == "4.4.3" and failure.code == 451


def test_addresses_ipv4_then_ipv6():
    resolver = FakeResolver({("mx.example.net", "A"): ["192.0.2.1", "192.0.2.2"],
                             ("mx.example.net", "AAAA"): ["2001:db8::1"]})
    assert result_of(mx.resolve_addresses(resolver, "mx.example.net")) == ["192.0.2.1", "192.0.2.2", "2001:db8::1"]
    assert result_of(mx.resolve_addresses(resolver, "mx.example.net", prefer_ipv6=True)) == \
        ["2001:db8::1", "192.0.2.1", "192.0.2.2"]


def test_addresses_of_an_ip_are_the_ip():
    resolver = FakeResolver()
    assert result_of(mx.resolve_addresses(resolver, "192.0.2.7")) == ["192.0.2.7"]
    assert resolver.queries == []


def test_addresses_follow_cnames():
    resolver = FakeResolver({("alias.example.net", "CNAME"): ["real.example.net"],
                             ("real.example.net", "A"): ["192.0.2.9"]})
    assert result_of(mx.resolve_addresses(resolver, "alias.example.net")) == ["192.0.2.9"]


def test_cname_loops_end():
    resolver = FakeResolver({("a.example.net", "CNAME"): ["b.example.net"],
                             ("b.example.net", "CNAME"): ["a.example.net"]})
    assert result_of(mx.resolve_addresses(resolver, "a.example.net")) == []


def test_no_address_is_an_empty_list_not_an_error():
    assert result_of(mx.resolve_addresses(FakeResolver(), "nowhere.example")) == []
    resolver = FakeResolver({("mx.example.net", "MX"): [(10, "other.example.net")]})
    assert result_of(mx.resolve_addresses(resolver, "mx.example.net")) == []


def test_one_family_failing_is_fine_when_the_other_answers():
    resolver = FakeResolver({("mx.example.net", "A"): ["192.0.2.1"], ("mx.example.net", "AAAA"): error.DNSServerError})
    assert result_of(mx.resolve_addresses(resolver, "mx.example.net")) == ["192.0.2.1"]


def test_address_servfail_is_temporary():
    resolver = FakeResolver({("mx.example.net", "A"): error.DNSServerError,
                             ("mx.example.net", "AAAA"): error.DNSNameError})
    failure = failure_of(mx.resolve_addresses(resolver, "mx.example.net"))
    assert not failure.permanent and failure.enhanced == "4.4.3"


@pytest.mark.parametrize("domain, address", [("[192.0.2.1]", "192.0.2.1"), ("[IPv6:2001:db8::1]", "2001:db8::1"),
                                             ("[ipv6:2001:DB8:0::2]", "2001:db8::2"), ("example.net", None)])
def test_address_literals(domain, address):
    assert mx.address_literal(domain) == address


@pytest.mark.parametrize("domain", ["[300.1.1.1]", "[IPv6:nonsense]", "[192.0.2.1", "[2001:db8::1]"])
def test_bad_address_literals(domain):
    with pytest.raises(ValueError):
        mx.address_literal(domain)
