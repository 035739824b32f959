"""DNS blocklists (mailgw.spam.dnsbl, RFC 5782) in postscreen's model: query
names (§2.1, IPv6 nibbles §2.4), the test entries (§5: 127.0.0.2 listed,
127.0.0.1 not), answer filters and weights, the one time budget (a slow or
failing zone counts 0), allow networks, the TTL cache and shared in-flight
checks, postscreen_dnsbl_sites syntax, the 554 reply text; and
MailDNS.query_ttl (RFC 2308 §5 negative TTLs)."""
from __future__ import annotations

import gc
import ipaddress
import re

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.names import error

from deferreds import result_of
from fake_dns import HANG, FakeResolver
from mailgw.mailauth.dns import MailDNS, TempDNSError
from mailgw.spam.dnsbl import (AddressPattern, DNSBLChecker, DNSBLSite, DNSBLVerdict, parse_site,
                               query_name)

BL = "bl.example.test"
ZEN = "zen.example.test"
COP = "cop.example.test"
WL = "wl.example.test"


def listing(zone, ip="127.0.0.2", answers=("127.0.0.2",)):
    return {(query_name(ip, zone), "A"): list(answers)}


def make(zones=None, *, sites=(BL,), threshold=1, budget=3.0, resolver=None, clock=None, **kw):
    clock = clock or task.Clock()
    resolver = resolver if resolver is not None else FakeResolver(zones or {})
    checker = DNSBLChecker(MailDNS(resolver, clock=clock), sites=[parse_site(s) for s in sites],
                           threshold=threshold, budget=budget, clock=clock, **kw)
    return checker, resolver, clock


class GatedResolver(FakeResolver):
    """A FakeResolver whose A answers wait until `release()`: checks stay in flight."""

    def __init__(self, zones=None, **kw):
        super().__init__(zones, **kw)
        self.held: list[tuple[defer.Deferred, str]] = []

    def lookupAddress(self, name, timeout=None):
        d = defer.Deferred()
        self.held.append((d, name))
        return d

    def release(self):
        held, self.held = self.held, []
        for d, name in held:
            self._answer(name, "A").chainDeferred(d)


@pytest.fixture
def logged_failures():
    """Failures logged while the test runs, garbage (unhandled errors in Deferreds) included."""
    failures = []

    def observer(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"])
    globalLogPublisher.addObserver(observer)
    yield failures
    gc.collect()
    globalLogPublisher.removeObserver(observer)


# --- query names and the RFC 5782 §5 test entries -----------------------------------

def test_query_name_ipv4_is_the_reversed_octets_before_the_zone():
    assert query_name("192.0.2.99", ZEN) == "99.2.0.192.zen.example.test"


def test_query_name_ipv6_is_32_nibbles_low_order_first():
    assert query_name("2001:db8::1:abcd", BL) == (
        "d.c.b.a.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2." + BL)


def test_an_ipv4_mapped_client_is_looked_up_as_ipv4():
    checker, resolver, _ = make(listing(BL, "192.0.2.7"))
    verdict = result_of(checker.check("::ffff:192.0.2.7"))
    assert resolver.queries == [("7.2.0.192." + BL, "A")]
    assert verdict.ip == "192.0.2.7"
    assert verdict.refused is True


def test_rfc5782_s5_test_address_127_0_0_2_is_listed():
    checker, resolver, _ = make(listing(BL))
    verdict = result_of(checker.check("127.0.0.2"))
    assert resolver.queries == [("2.0.0.127." + BL, "A")]
    assert verdict == DNSBLVerdict("127.0.0.2", 1, 1, True, ((BL, ("127.0.0.2",)),), blocked_by=(BL,))
    assert (checker.queries, checker.listed, checker.refused) == (1, 1, 1)


def test_rfc5782_s5_127_0_0_1_is_not_listed():
    checker, resolver, _ = make(listing(BL))
    verdict = result_of(checker.check("127.0.0.1"))
    assert resolver.queries == [("1.0.0.127." + BL, "A")]
    assert (verdict.score, verdict.refused, verdict.listed, verdict.timed_out) == (0, False, (), ())
    assert (checker.listed, checker.refused) == (0, 0)


def test_ipv6_client_is_asked_by_its_nibble_name():
    ip = "2001:db8::25"
    checker, resolver, _ = make(listing(BL, ip))
    verdict = result_of(checker.check(ip))
    assert resolver.queries == [(query_name(ip, BL), "A")]
    assert resolver.queries[0][0].startswith("5.2.0.0.0.0.0.0.")
    assert (verdict.ip, verdict.score, verdict.refused) == (ip, 1, True)


# --- answer filters ----------------------------------------------------------------

@pytest.mark.parametrize("site, answer, hit", [
    (ZEN + "=127.0.0.[2..11]", "127.0.0.4", True),
    (ZEN + "=127.0.0.[2..11]", "127.0.0.11", True),
    (ZEN + "=127.0.0.[2..11]", "127.0.0.12", False),
    (ZEN + "=127.0.0.[2..11]", "127.255.255.254", False),    # Spamhaus's "you may not ask"
    (ZEN + "=127.0.0.2", "127.0.0.2", True),
    (ZEN + "=127.0.0.2", "127.0.0.3", False),
    (ZEN + "=127.0.0.[2;4;10]", "127.0.0.10", True),
    (ZEN + "=127.0.0.[2;4;10]", "127.0.0.5", False),
    (ZEN + "=127.0.[0..255].[1..3]", "127.0.17.3", True),
    (ZEN + "=127.0.[0..255].[1..3]", "127.1.17.3", False),
    (ZEN, "127.0.0.200", True),                               # no filter: any answer lists
])
def test_answer_filter(site, answer, hit):
    checker, _, _ = make(listing(ZEN, answers=[answer]), sites=[site])
    verdict = result_of(checker.check("127.0.0.2"))
    assert verdict.listed == (((ZEN, (answer,)),) if hit else ())
    assert verdict.score == (1 if hit else 0)
    assert verdict.refused is hit


def test_one_matching_answer_of_several_lists():
    checker, _, _ = make(listing(ZEN, answers=["127.0.0.200", "127.0.0.3"]), sites=[ZEN + "=127.0.0.[2..11]"])
    verdict = result_of(checker.check("127.0.0.2"))
    assert verdict.listed == ((ZEN, ("127.0.0.200", "127.0.0.3")),)


def test_a_set_of_answers_as_filter():
    site = DNSBLSite(ZEN, 2, ["127.0.0.2", "127.0.0.4"])
    assert site.filter == frozenset({"127.0.0.2", "127.0.0.4"})
    assert site.matches(["127.0.0.4"]) is True
    assert site.matches(["127.0.0.3"]) is False
    assert DNSBLSite(ZEN, 1, "127.0.0.[2..3]").filter == parse_site(ZEN + "=127.0.0.[2..3]").filter


# --- weights and the threshold ------------------------------------------------------

def test_weights_add_up_to_the_threshold():
    zones = {**listing(ZEN), **listing(COP)}
    checker, _, _ = make(zones, sites=[ZEN + "*2", COP], threshold=3)
    verdict = result_of(checker.check("127.0.0.2"))
    assert (verdict.score, verdict.threshold, verdict.refused) == (3, 3, True)
    assert [zone for zone, _ in verdict.listed] == [ZEN, COP]


def test_one_below_the_threshold_is_not_refused():
    checker, _, _ = make(listing(ZEN), sites=[ZEN + "*2", COP], threshold=3)
    verdict = result_of(checker.check("127.0.0.2"))
    assert (verdict.score, verdict.refused) == (2, False)
    assert verdict.listed == ((ZEN, ("127.0.0.2",)),)
    assert (checker.listed, checker.refused) == (1, 0)


def test_an_allow_list_with_a_negative_weight_outweighs_a_block_list():
    zones = {**listing(ZEN), **listing(WL, answers=["127.0.15.2"])}
    checker, _, _ = make(zones, sites=[ZEN + "*3", WL + "=127.0.[0..255].[1..3]*-5"], threshold=1)
    verdict = result_of(checker.check("127.0.0.2"))
    assert (verdict.score, verdict.refused) == (-2, False)
    assert verdict.listed == ((ZEN, ("127.0.0.2",)), (WL, ("127.0.15.2",)))
    assert verdict.blocked_by == (ZEN,)


def test_one_zone_written_twice_is_asked_once_and_each_matching_site_counts():
    zones = listing(WL, answers=["127.0.5.1"])
    checker, resolver, _ = make(zones, sites=[WL + "=127.0.[0..255].0*-2", WL + "=127.0.[0..255].1*-3",
                                              WL + "*1"])
    verdict = result_of(checker.check("127.0.0.2"))
    assert resolver.queries == [("2.0.0.127." + WL, "A")]
    assert verdict.score == -2                   # -3 and 1; the .0 filter does not match
    assert verdict.listed == ((WL, ("127.0.5.1",)),)


# --- the time budget and DNS failures -----------------------------------------------

def test_a_slow_zone_times_out_within_the_budget_and_the_others_still_count(logged_failures):
    zones = {(query_name("127.0.0.2", ZEN), "A"): HANG, **listing(COP)}
    checker, _, clock = make(zones, sites=[ZEN + "*5", COP], budget=2.0)
    d = checker.check("127.0.0.2")
    results = []
    d.addBoth(results.append)
    clock.advance(1.99)
    assert results == []
    clock.advance(0.01)
    verdict = results[0]
    assert (verdict.score, verdict.refused) == (1, True)
    assert verdict.timed_out == (ZEN,)
    assert verdict.listed == ((COP, ("127.0.0.2",)),)
    assert checker.timeouts == 1
    del d, results
    gc.collect()
    assert logged_failures == []


def test_all_zones_timing_out_refuses_nobody_and_takes_the_budget(logged_failures):
    zones = {(query_name("127.0.0.2", ZEN), "A"): HANG, (query_name("127.0.0.2", COP), "A"): HANG}
    checker, _, clock = make(zones, sites=[ZEN, COP], budget=3.0)
    d = checker.check("127.0.0.2")
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.1)
    verdict = result_of(d)
    assert (verdict.score, verdict.refused, verdict.listed) == (0, False, ())
    assert verdict.timed_out == (ZEN, COP)
    assert (checker.timeouts, checker.queries) == (2, 2)
    assert clock.getDelayedCalls() == []        # no timer left behind
    del d
    gc.collect()
    assert logged_failures == []


def test_the_budget_holds_even_when_mail_dns_ignores_its_timeout(logged_failures):
    class DeafDNS:
        """A MailDNS whose queries never end by themselves."""
        def query_ttl(self, name, rtype, *, timeout=None, negative_ttl=300.0):
            return defer.Deferred()

    clock = task.Clock()
    checker = DNSBLChecker(DeafDNS(), sites=[parse_site(BL)], threshold=1, budget=1.5, clock=clock)
    d = checker.check("127.0.0.2")
    clock.advance(1.5)
    verdict = result_of(d)
    assert (verdict.refused, verdict.timed_out) == (False, (BL,))
    del d
    gc.collect()
    assert logged_failures == []


@pytest.mark.parametrize("failure", [error.DNSServerError, error.DNSQueryRefusedError, RuntimeError("socket")])
def test_a_temporary_dns_error_counts_zero(failure):
    zones = {(query_name("127.0.0.2", ZEN), "A"): failure, **listing(COP)}
    checker, _, _ = make(zones, sites=[ZEN + "*5", COP], threshold=2)
    verdict = result_of(checker.check("127.0.0.2"))
    assert (verdict.score, verdict.refused) == (1, False)
    assert verdict.failed == (ZEN,)
    assert verdict.timed_out == ()
    assert checker.timeouts == 0


def test_a_temporary_error_of_the_only_zone_refuses_nobody():
    checker, _, _ = make({(query_name("127.0.0.2", BL), "A"): error.DNSServerError})
    verdict = result_of(checker.check("127.0.0.2"))
    assert (verdict.score, verdict.refused, verdict.failed) == (0, False, (BL,))


# --- allow networks -----------------------------------------------------------------

def test_allow_networks_are_never_asked():
    checker, resolver, _ = make(listing(BL), allow_networks=[ipaddress.ip_network("127.0.0.0/24"),
                                                            ipaddress.ip_network("2001:db8::/32")])
    for ip in ("127.0.0.2", "2001:db8::1"):
        verdict = result_of(checker.check(ip))
        assert (verdict.allowed, verdict.refused, verdict.score, verdict.cached) == (True, False, 0, False)
    assert resolver.queries == []
    assert checker.queries == 0


def test_loopback_outside_the_allow_networks_is_asked():
    checker, resolver, _ = make(listing(BL), allow_networks=[ipaddress.ip_network("10.0.0.0/8")])
    verdict = result_of(checker.check("127.0.0.2"))
    assert (verdict.allowed, verdict.refused) == (False, True)
    assert len(resolver.queries) == 1


# --- the cache ----------------------------------------------------------------------

def test_cached_within_the_ttl_and_asked_again_after_it():
    name = query_name("127.0.0.2", BL)
    checker, resolver, clock = make(resolver=FakeResolver(listing(BL), ttls={(name, "A"): 120}))
    first = result_of(checker.check("127.0.0.2"))
    assert first.cached is False
    clock.advance(119)
    second = result_of(checker.check("127.0.0.2"))
    assert second.cached is True
    assert (second.score, second.refused, second.listed) == (first.score, first.refused, first.listed)
    assert len(resolver.queries) == 1
    assert (checker.cache_hits, checker.refused) == (1, 2)
    clock.advance(1)
    third = result_of(checker.check("127.0.0.2"))
    assert third.cached is False
    assert len(resolver.queries) == 2
    assert checker.cache_hits == 1


@pytest.mark.parametrize("ttl, lifetime", [(5, 60), (86400, 3600), (700, 700)])
def test_cache_lifetime_is_clamped(ttl, lifetime):
    checker, resolver, clock = make(resolver=FakeResolver(listing(BL), default_ttl=ttl))
    result_of(checker.check("127.0.0.2"))
    clock.advance(lifetime - 0.5)
    assert result_of(checker.check("127.0.0.2")).cached is True
    clock.advance(0.5)
    assert result_of(checker.check("127.0.0.2")).cached is False
    assert len(resolver.queries) == 2


def test_a_miss_lives_the_negative_ttl_of_the_soa():
    # RFC 2308 §5: min(SOA TTL, SOA MINIMUM) = 600.
    checker, resolver, clock = make(resolver=FakeResolver({}, soas={BL: (900, 600)}))
    assert result_of(checker.check("127.0.0.1")).listed == ()
    clock.advance(599)
    assert result_of(checker.check("127.0.0.1")).cached is True
    clock.advance(1)
    assert result_of(checker.check("127.0.0.1")).cached is False
    assert len(resolver.queries) == 2


def test_a_miss_without_an_soa_lives_negative_ttl():
    checker, resolver, clock = make({}, negative_ttl=200)
    result_of(checker.check("127.0.0.1"))
    clock.advance(199)
    assert result_of(checker.check("127.0.0.1")).cached is True
    clock.advance(1)
    assert result_of(checker.check("127.0.0.1")).cached is False


def test_cache_lifetime_is_the_smallest_ttl_over_the_zones():
    zones = {**listing(ZEN), **listing(COP)}
    resolver = FakeResolver(zones, ttls={(query_name("127.0.0.2", ZEN), "A"): 3000,
                                         (query_name("127.0.0.2", COP), "A"): 400})
    checker, _, clock = make(resolver=resolver, sites=[ZEN, COP])
    result_of(checker.check("127.0.0.2"))
    clock.advance(399)
    assert result_of(checker.check("127.0.0.2")).cached is True
    clock.advance(1)
    assert result_of(checker.check("127.0.0.2")).cached is False
    assert len(resolver.queries) == 4


def test_a_verdict_with_a_timed_out_zone_is_kept_only_min_ttl():
    zones = {(query_name("127.0.0.2", ZEN), "A"): HANG, **listing(COP)}
    resolver = FakeResolver(zones, default_ttl=3000)
    checker, _, clock = make(resolver=resolver, sites=[ZEN, COP], budget=1.0)
    d = checker.check("127.0.0.2")
    clock.advance(1.0)
    assert result_of(d).timed_out == (ZEN,)
    clock.advance(59)
    assert result_of(checker.check("127.0.0.2")).cached is True
    clock.advance(1)
    d = checker.check("127.0.0.2")
    assert len(resolver.queries) == 4
    clock.advance(1.0)
    assert result_of(d).cached is False


def test_the_cache_is_bounded_and_drops_the_oldest():
    zones = {**listing(BL, "127.0.0.2"), **listing(BL, "127.0.0.3"), **listing(BL, "127.0.0.4")}
    checker, resolver, _ = make(zones, cache_max=2)
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        result_of(checker.check(ip))
    assert result_of(checker.check("127.0.0.4")).cached is True
    assert result_of(checker.check("127.0.0.3")).cached is True
    assert result_of(checker.check("127.0.0.2")).cached is False      # dropped: asked again
    assert [name for name, _ in resolver.queries].count(query_name("127.0.0.2", BL)) == 2


# --- concurrent checks of one address -----------------------------------------------

def test_concurrent_checks_of_one_address_share_its_queries():
    resolver = GatedResolver({**listing(ZEN), **listing(COP)})
    checker, _, _ = make(resolver=resolver, sites=[ZEN, COP])
    first = checker.check("127.0.0.2")
    second = checker.check("127.0.0.2")
    assert [name for _, name in resolver.held] == [query_name("127.0.0.2", ZEN), query_name("127.0.0.2", COP)]
    assert not first.called and not second.called
    assert first is not second                  # each caller may chain its own callbacks
    resolver.release()
    one, two = result_of(first), result_of(second)
    assert one == two
    assert (one.score, one.refused, one.cached) == (2, True, False)
    assert (checker.queries, checker.refused) == (2, 2)
    assert resolver.held == []


def test_a_cancelled_waiter_leaves_the_other_its_verdict():
    resolver = GatedResolver(listing(BL))
    checker, _, _ = make(resolver=resolver)
    first = checker.check("127.0.0.2")
    second = checker.check("127.0.0.2")
    first.cancel()
    with pytest.raises(defer.CancelledError):
        result_of(first)
    resolver.release()
    assert result_of(second).refused is True
    assert result_of(checker.check("127.0.0.2")).cached is True    # the result was still cached


def test_different_addresses_are_not_shared():
    resolver = GatedResolver({})
    checker, _, _ = make(resolver=resolver)
    checker.check("127.0.0.2")
    checker.check("127.0.0.3")
    assert len(resolver.held) == 2


# --- postscreen_dnsbl_sites syntax ---------------------------------------------------

@pytest.mark.parametrize("text, zone, weight, matching, not_matching", [
    ("zen.spamhaus.org", "zen.spamhaus.org", 1, "127.0.0.99", None),
    ("  Zen.Spamhaus.ORG.  ", "zen.spamhaus.org", 1, "127.0.0.2", None),
    ("bl.spamcop.net*2", "bl.spamcop.net", 2, "127.0.0.2", None),
    ("zen.spamhaus.org=127.0.0.2", "zen.spamhaus.org", 1, "127.0.0.2", "127.0.0.3"),
    ("zen.spamhaus.org=127.0.0.[2..11]*3", "zen.spamhaus.org", 3, "127.0.0.11", "127.0.0.1"),
    ("b.example.net=127.0.0.[2;4;10]", "b.example.net", 1, "127.0.0.4", "127.0.0.3"),
    ("b.example.net=127.0.0.[2;5..6]*+4", "b.example.net", 4, "127.0.0.6", "127.0.0.4"),
    ("list.dnswl.org=127.0.[0..255].[1..3]*-5", "list.dnswl.org", -5, "127.0.200.3", "127.0.200.0"),
    ("swl.example.org*-4", "swl.example.org", -4, "127.0.0.2", None),
])
def test_parse_site_valid(text, zone, weight, matching, not_matching):
    site = parse_site(text)
    assert (site.zone, site.weight) == (zone, weight)
    assert site.matches([matching]) is True
    if not_matching is not None:
        assert isinstance(site.filter, AddressPattern)
        assert site.matches([not_matching]) is False
    else:
        assert site.filter is None
    assert site.matches([]) is False


@pytest.mark.parametrize("text, message", [
    ("", "empty: expected zone[=filter][*weight], e.g. zen.spamhaus.org=127.0.0.[2..11]*3"),
    ("   ", "empty: expected zone[=filter][*weight], e.g. zen.spamhaus.org=127.0.0.[2..11]*3"),
    ("*3", "missing zone: expected zone[=filter][*weight], e.g. zen.spamhaus.org=127.0.0.[2..11]*3"),
    ("=127.0.0.2", "missing zone: expected zone[=filter][*weight], e.g. zen.spamhaus.org=127.0.0.[2..11]*3"),
    ("bl.example.test*", "weight '' after '*' is not a whole number such as 3 or -5"),
    ("bl.example.test*x", "weight 'x' after '*' is not a whole number such as 3 or -5"),
    ("bl.example.test*1.5", "weight '1.5' after '*' is not a whole number such as 3 or -5"),
    ("bl.example.test=", "nothing after '=': expected an answer filter such as 127.0.0.[2..11]"),
    ("bl.example.test=127.0.0", "answer filter '127.0.0': expected four octets d.d.d.d, each a number or "
                                "[n;n..m], e.g. 127.0.0.[2..11]"),
    ("bl.example.test=127.0.0.x", "answer filter '127.0.0.x': expected four octets d.d.d.d, each a number or "
                                  "[n;n..m], e.g. 127.0.0.[2..11]"),
    ("bl.example.test=127.0.0.2.5", "answer filter '127.0.0.2.5': expected four octets d.d.d.d, each a number "
                                    "or [n;n..m], e.g. 127.0.0.[2..11]"),
    ("bl.example.test=127.0.0.256", "answer filter '127.0.0.256': 256 is over 255"),
    ("bl.example.test=127.0.0.[2..300]", "answer filter '127.0.0.[2..300]': 300 is over 255"),
    ("bl.example.test=127.0.0.[11..2]", "answer filter '127.0.0.[11..2]': range 11..2 runs backwards"),
    ("bl.example.test=127.0.0.[]", "answer filter '127.0.0.[]': empty item in []"),
    ("bl.example.test=127.0.0.[2;;4]", "answer filter '127.0.0.[2;;4]': empty item in [2;;4]"),
    ("bl.example.test=127.0.0.[2..x]", "answer filter '127.0.0.[2..x]': '2..x' is neither a number nor a range n..m"),
    ("bl.example.test=127.0.0.[2-4]", "answer filter '127.0.0.[2-4]': '2-4' is neither a number nor a range n..m"),
    ("zen", "zone 'zen': expected a DNS zone of two or more labels, such as zen.spamhaus.org"),
    ("bl..example.test", "zone 'bl..example.test': empty label"),
    ("bad_zone.example.test", "zone 'bad_zone.example.test': label 'bad_zone' may contain only a-z 0-9 and "
                              "inner '-', at most 63 characters"),
    ("-bl.example.test", "zone '-bl.example.test': label '-bl' may contain only a-z 0-9 and inner '-', "
                         "at most 63 characters"),
    ("bl.example.test *2", "zone 'bl.example.test ': label 'test ' may contain only a-z 0-9 and inner '-', "
                           "at most 63 characters"),
    ("a" * 64 + ".test", f"zone '{'a' * 64}.test': label '{'a' * 64}' may contain only a-z 0-9 and inner '-', "
                         "at most 63 characters"),
    (".".join(["a" * 60] * 4), f"zone '{'.'.join(['a' * 60] * 4)}' is longer than 189 characters (with an "
                               "IPv6 address in front of it, a query name must fit in 253)"),
    ("127.0.0.1", "zone '127.0.0.1': the last label is all digits, which is an address, not a zone"),
    ("blöck.example.test", "zone 'blöck.example.test': only ASCII (write international names in their xn-- form)"),
])
def test_parse_site_invalid(text, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_site(text)


def test_site_constructor_validates_too():
    with pytest.raises(ValueError, match="^weight must be a whole number, not '2'$"):
        DNSBLSite(BL, "2")
    with pytest.raises(ValueError, match="^answer filter of bl.example.test: no addresses"):
        DNSBLSite(BL, 1, [])
    with pytest.raises(ValueError, match="^answer filter of bl.example.test: .*'127.0.0'"):
        DNSBLSite(BL, 1, ["127.0.0"])


def test_checker_refuses_a_threshold_below_one():
    with pytest.raises(ValueError, match="^threshold must be a whole number of at least 1, not 0$"):
        make({}, threshold=0)


# --- the reply ----------------------------------------------------------------------

def test_reply_text_in_postfix_words():
    checker, _, _ = make(listing(ZEN, "192.0.2.1"), sites=[ZEN])
    verdict = result_of(checker.check("192.0.2.1"))
    assert verdict.reply_text() == "Service unavailable; client [192.0.2.1] blocked using zen.example.test"


def test_reply_text_names_the_blocking_lists_heaviest_first_and_not_the_allow_lists():
    zones = {**listing(ZEN, "2001:db8::1"), **listing(COP, "2001:db8::1"), **listing(WL, "2001:db8::1")}
    checker, _, _ = make(zones, sites=[COP, ZEN + "*3", WL + "*-1"], threshold=1)
    verdict = result_of(checker.check("2001:db8::1"))
    assert verdict.reply_text() == ("Service unavailable; client [2001:db8::1] blocked using "
                                    "zen.example.test, cop.example.test")


def test_reply_text_stays_within_a_reply_line():
    zones = [f"{'z' * 60}.{index}.example.test" for index in range(8)]
    verdict = DNSBLVerdict("192.0.2.1", 8, 1, True, tuple((zone, ("127.0.0.2",)) for zone in zones),
                           blocked_by=tuple(zones))
    text = verdict.reply_text()
    # RFC 5321 §4.5.3.1.5: with "554 5.7.1 " and CRLF, at most 512 octets.
    assert len(text) + len("554 5.7.1 \r\n") <= 512
    assert text.endswith(", " + zones[2]) and zones[3] not in text


# --- MailDNS.query_ttl --------------------------------------------------------------

def ask(resolver, name, rtype="A", **kw):
    return result_of(MailDNS(resolver, clock=task.Clock()).query_ttl(name, rtype, **kw))


def test_query_ttl_is_the_smallest_ttl_of_the_answer():
    resolver = FakeResolver({("a.example.test", "A"): ["192.0.2.1", "192.0.2.2"]},
                            ttls={("a.example.test", "A"): 77})
    assert ask(resolver, "a.example.test") == (["192.0.2.1", "192.0.2.2"], 77)
    assert result_of(MailDNS(resolver, clock=task.Clock()).query("a.example.test", "A")) == [
        "192.0.2.1", "192.0.2.2"]


def test_query_ttl_counts_a_cname_on_the_way():
    class Chained(FakeResolver):
        def lookupAddress(self, name, timeout=None):
            return defer.succeed(([self._rr("a.example.test", "CNAME", "b.example.test"),
                                   self._rr("b.example.test", "A", "192.0.2.9")], [], []))
    resolver = Chained({}, ttls={("a.example.test", "CNAME"): 30, ("b.example.test", "A"): 500})
    assert ask(resolver, "a.example.test") == (["192.0.2.9"], 30)


def test_query_ttl_of_nxdomain_is_the_soa_negative_ttl():
    resolver = FakeResolver({}, soas={"example.test": (3600, 120)})
    assert ask(resolver, "nothing.example.test") == ([], 120)
    resolver = FakeResolver({}, soas={"example.test": (90, 120)})
    assert ask(resolver, "nothing.example.test") == ([], 90)


def test_query_ttl_of_nodata_is_the_soa_negative_ttl():
    resolver = FakeResolver({("mx.example.test", "MX"): [(10, "x.example.test")]}, soas={"example.test": (600, 45)})
    assert ask(resolver, "mx.example.test", "A") == ([], 45)


def test_query_ttl_without_an_soa_is_negative_ttl():
    assert ask(FakeResolver({}), "nothing.example.test") == ([], 300.0)
    assert ask(FakeResolver({}), "nothing.example.test", negative_ttl=42) == ([], 42)
    authoritative = FakeResolver({("x.example.test", "A"): error.AuthoritativeDomainError})
    assert ask(authoritative, "x.example.test", negative_ttl=17) == ([], 17)


def test_query_ttl_maps_errors_like_query():
    resolver = FakeResolver({("x.example.test", "A"): error.DNSServerError})
    with pytest.raises(TempDNSError, match="^A x.example.test: "):
        ask(resolver, "x.example.test")
    clock = task.Clock()
    d = MailDNS(FakeResolver({("slow.example.test", "A"): HANG}), clock=clock).query_ttl(
        "slow.example.test", "A", timeout=2)
    clock.advance(2)
    with pytest.raises(TempDNSError):
        result_of(d)
