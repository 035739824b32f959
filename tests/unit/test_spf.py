"""SPF (RFC 7208) over MailDNS by replaying pyspf: the Appendix A examples,
the processing limits of §4.6.4, DNS failures and time budgets on a
`task.Clock`, the HELO identity (§2.3, §2.4), Received-SPF (§9.1), and the
`spf.DNSLookup` hook leaving every other user of pyspf alone.

The Appendix A zone below is transcribed from RFC 7208 Appendix A (as quoted
verbatim in public SPF test suites); where the appendix gives no record
(example.net in A.2) the test says what it adds.
"""
from __future__ import annotations

import pytest
import spf
from twisted.internet import defer, task
from twisted.names import error

from deferreds import result_of
from fake_dns import HANG, FakeResolver
from mailgw.mailauth import spf as mspf
from mailgw.mailauth.dns import MailDNS
from mailgw.mailauth.spf import SPFResult, check_helo, check_spf, install_hook, received_spf_header

RECEIVER = "mx.mailgw.test"


# RFC 7208 Appendix A: "The example.com zone" and friends.
#   $ORIGIN example.com.
#   @       600 MX  10 mail-a
#               MX  20 mail-b
#               A   192.0.2.10
#               A   192.0.2.11
#   amy         A   192.0.2.65
#   bob         A   192.0.2.66
#   mail-a      A   192.0.2.129
#   mail-b      A   192.0.2.130
#   www         CNAME example.com.
#   $ORIGIN example.org.
#   @       600 MX  10 mail-c
#   mail-c      A   192.0.2.140
#   $ORIGIN 2.0.192.in-addr.arpa.   10, 11 -> example.com; 65 -> amy.example.com;
#       66 -> bob.example.com; 129 -> mail-a.example.com; 130 -> mail-b.example.com;
#       140 -> mail-c.example.org
#   $ORIGIN 0.0.10.in-addr.arpa.    4 -> bob.example.com   ("a rogue reverse IP domain")
APPENDIX_A = {
    ("example.com", "MX"): [(10, "mail-a.example.com"), (20, "mail-b.example.com")],
    ("example.com", "A"): ["192.0.2.10", "192.0.2.11"],
    ("amy.example.com", "A"): ["192.0.2.65"],
    ("bob.example.com", "A"): ["192.0.2.66"],
    ("mail-a.example.com", "A"): ["192.0.2.129"],
    ("mail-b.example.com", "A"): ["192.0.2.130"],
    ("www.example.com", "CNAME"): ["example.com"],
    ("example.org", "MX"): [(10, "mail-c.example.org")],
    ("mail-c.example.org", "A"): ["192.0.2.140"],
    ("10.2.0.192.in-addr.arpa", "PTR"): ["example.com"],
    ("11.2.0.192.in-addr.arpa", "PTR"): ["example.com"],
    ("65.2.0.192.in-addr.arpa", "PTR"): ["amy.example.com"],
    ("66.2.0.192.in-addr.arpa", "PTR"): ["bob.example.com"],
    ("129.2.0.192.in-addr.arpa", "PTR"): ["mail-a.example.com"],
    ("130.2.0.192.in-addr.arpa", "PTR"): ["mail-b.example.com"],
    ("140.2.0.192.in-addr.arpa", "PTR"): ["mail-c.example.org"],
    ("4.0.0.10.in-addr.arpa", "PTR"): ["bob.example.com"],
}


def zone(**txt):
    """Appendix A plus TXT records: zone(**{"example.com": "v=spf1 a -all"})."""
    zones = dict(APPENDIX_A)
    for name, value in txt.items():
        zones[(name, "TXT")] = value if isinstance(value, list) else [value]
    return zones




def evaluate(zones, *, ip, sender="someone@example.com", helo="relay.example.net", budget=10.0,
             timeout=5.0, resolver=None, clock=None):
    clock = clock or task.Clock()
    resolver = resolver if resolver is not None else FakeResolver(zones)
    mail_dns = MailDNS(resolver, clock=clock, timeout=timeout)
    d = check_spf(mail_dns, ip=ip, sender=sender, helo=helo, receiver=RECEIVER, clock=clock, budget=budget)
    return d, clock, resolver


def verdict(zones, **kw) -> SPFResult:
    d, clock, _ = evaluate(zones, **kw)
    result = result_of(d)
    assert clock.getDelayedCalls() == []           # budget timer and query timeouts all gone
    return result


class HeldResolver(FakeResolver):
    """FakeResolver whose answers wait until `release()`: one release, one round."""

    def __init__(self, zones=None):
        super().__init__(zones)
        self.held = []

    def _answer(self, name, rtype):
        d = defer.Deferred()
        self.held.append((d, super()._answer(name, rtype)))
        return d

    def release(self) -> int:
        held, self.held = self.held, []
        for d, answer in held:
            answer.chainDeferred(d)
        return len(held)


# ---------------------------------------------------------------------------
# RFC 7208 Appendix A.1: simple examples, <domain> is example.com.

A1 = [
    # "v=spf1 +all" -- any <ip> passes
    ("v=spf1 +all", "192.0.2.10", "pass"),
    ("v=spf1 +all", "10.0.0.4", "pass"),
    ("v=spf1 +all", "192.0.2.200", "pass"),
    # "v=spf1 a -all" -- hosts 192.0.2.10 and 192.0.2.11 pass
    ("v=spf1 a -all", "192.0.2.10", "pass"),
    ("v=spf1 a -all", "192.0.2.11", "pass"),
    ("v=spf1 a -all", "192.0.2.65", "fail"),
    ("v=spf1 a -all", "192.0.2.129", "fail"),
    # "v=spf1 a:example.org -all" -- no sending hosts pass since example.org has no A records
    ("v=spf1 a:example.org -all", "192.0.2.10", "fail"),
    ("v=spf1 a:example.org -all", "192.0.2.140", "fail"),
    ("v=spf1 a:example.org -all", "192.0.2.200", "fail"),
    # "v=spf1 mx -all" -- sending hosts 192.0.2.129 and 192.0.2.130 pass
    ("v=spf1 mx -all", "192.0.2.129", "pass"),
    ("v=spf1 mx -all", "192.0.2.130", "pass"),
    ("v=spf1 mx -all", "192.0.2.10", "fail"),
    ("v=spf1 mx -all", "192.0.2.140", "fail"),
    # "v=spf1 mx:example.org -all" -- sending host 192.0.2.140 passes
    ("v=spf1 mx:example.org -all", "192.0.2.140", "pass"),
    ("v=spf1 mx:example.org -all", "192.0.2.129", "fail"),
    # "v=spf1 mx mx:example.org -all" -- sending hosts 192.0.2.129, 192.0.2.130, and 192.0.2.140 pass
    ("v=spf1 mx mx:example.org -all", "192.0.2.129", "pass"),
    ("v=spf1 mx mx:example.org -all", "192.0.2.130", "pass"),
    ("v=spf1 mx mx:example.org -all", "192.0.2.140", "pass"),
    ("v=spf1 mx mx:example.org -all", "192.0.2.65", "fail"),
    # "v=spf1 mx/30 mx:example.org/30 -all" -- any sending host in 192.0.2.128/30 or 192.0.2.140/30 passes
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.128", "pass"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.131", "pass"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.140", "pass"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.143", "pass"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.132", "fail"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.139", "fail"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.144", "fail"),
    # "v=spf1 ptr -all" -- 192.0.2.65 passes (reverse DNS is valid and is in example.com);
    # 192.0.2.140 fails (valid, but not in example.com); 10.0.0.4 fails (reverse IP is not valid)
    ("v=spf1 ptr -all", "192.0.2.65", "pass"),
    ("v=spf1 ptr -all", "192.0.2.140", "fail"),
    ("v=spf1 ptr -all", "10.0.0.4", "fail"),
    ("v=spf1 ptr -all", "192.0.2.10", "pass"),        # example.com itself, forward-confirmed
    # "v=spf1 ip4:192.0.2.128/28 -all" -- 192.0.2.65 fails; 192.0.2.129 passes
    ("v=spf1 ip4:192.0.2.128/28 -all", "192.0.2.65", "fail"),
    ("v=spf1 ip4:192.0.2.128/28 -all", "192.0.2.129", "pass"),
    ("v=spf1 ip4:192.0.2.128/28 -all", "192.0.2.200", "fail"),
]


@pytest.mark.parametrize("record, ip, expected", A1)
def test_rfc7208_appendix_a1_simple_examples(record, ip, expected):
    result = verdict(zone(**{"example.com": record}), ip=ip)
    assert (result.result, result.identity, result.domain) == (expected, "mailfrom", "example.com")


# RFC 7208 Appendix A.2: example.org includes example.com and example.net;
# la/ny/sf.example.org redirect to example.org. The appendix gives no record
# for example.com or example.net here: example.com keeps A.1's "mx -all" and
# example.net (not in the appendix zone) gets ip4:192.0.2.200.
A2_ZONE = zone(**{
    "example.org": "v=spf1 include:example.com include:example.net -all",
    "la.example.org": "v=spf1 redirect=example.org",
    "ny.example.org": "v=spf1 redirect=example.org",
    "sf.example.org": "v=spf1 redirect=example.org",
    "example.com": "v=spf1 mx -all",
    "example.net": "v=spf1 ip4:192.0.2.200 -all",
})


@pytest.mark.parametrize("domain", ["example.org", "la.example.org", "ny.example.org", "sf.example.org"])
@pytest.mark.parametrize("ip, expected", [("192.0.2.129", "pass"), ("192.0.2.130", "pass"),
                                          ("192.0.2.200", "pass"), ("192.0.2.65", "fail"),
                                          ("192.0.2.140", "fail")])
def test_rfc7208_appendix_a2_multiple_domains(domain, ip, expected):
    result = verdict(A2_ZONE, ip=ip, sender=f"someone@{domain}")
    assert (result.result, result.domain) == (expected, domain)


# RFC 7208 Appendix A.3: DNSBL style, mobile and remote users by %{l1r+} and %{ir}.
A3_ZONE = {
    **zone(**{
        "example.com": "v=spf1 mx include:mobile-users._spf.%{d} include:remote-users._spf.%{d} -all",
        "mobile-users._spf.example.com": "v=spf1 exists:%{l1r+}.%{d}",
        "remote-users._spf.example.com": "v=spf1 exists:%{ir}.%{l1r+}.%{d}",
    }),
    ("mary.mobile-users._spf.example.com", "A"): ["127.0.0.2"],
    ("fred.mobile-users._spf.example.com", "A"): ["127.0.0.2"],
    ("15.15.168.192.joel.remote-users._spf.example.com", "A"): ["127.0.0.2"],
    ("16.15.168.192.joel.remote-users._spf.example.com", "A"): ["127.0.0.2"],
}


@pytest.mark.parametrize("local, ip, expected", [
    ("mary", "198.51.100.4", "pass"), ("fred", "198.51.100.4", "pass"),
    ("fred+wildcard", "198.51.100.4", "pass"),       # %{l1r+}: the part before the "+"
    ("joel", "198.51.100.4", "fail"), ("joel", "192.168.15.15", "pass"), ("joel", "192.168.15.16", "pass"),
    ("joel", "192.168.15.17", "fail"), ("other", "192.0.2.129", "pass"),   # the mx term
    ("other", "198.51.100.4", "fail"),
])
def test_rfc7208_appendix_a3_dnsbl_style(local, ip, expected):
    assert verdict(A3_ZONE, ip=ip, sender=f"{local}@example.com").result == expected


# RFC 7208 Appendix A.4: "both in range and with matching reverse DNS", by
# De Morgan. The example.com record is several character-strings (RFC 7208
# §3.3: concatenated without spaces). ptr._spf uses "-ptr:example.com" as in
# erratum 6216: a bare "-ptr" would match the PTR names against ptr._spf.example.com.
A4_ZONE = {
    **zone(**{
        "example.com": [["v=spf1 ", "-include:ip4._spf.%{d} ", "-include:ptr._spf.%{d} ", "+all"]],
        "ip4._spf.example.com": "v=spf1 -ip4:192.0.2.0/24 +all",
        "ptr._spf.example.com": "v=spf1 -ptr:example.com +all",
    }),
    ("1.2.0.192.in-addr.arpa", "PTR"): ["a.example.com"],
    ("1.0.0.192.in-addr.arpa", "PTR"): ["b.example.com"],
    ("a.example.com", "A"): ["192.0.2.1"],
    ("b.example.com", "A"): ["192.0.0.1"],
}


@pytest.mark.parametrize("ip, expected", [
    ("192.0.2.1", "pass"),      # in range, PTR matches
    ("192.0.2.2", "fail"),      # in range, no PTR
    ("192.0.0.1", "fail"),      # PTR matches, out of range
    ("192.0.0.2", "fail"),      # neither
])
def test_rfc7208_appendix_a4_multiple_requirements(ip, expected):
    assert verdict(A4_ZONE, ip=ip).result == expected


# ---------------------------------------------------------------------------
# RFC 7208 §4.6.4 processing limits, per evaluation although pyspf runs many times.

def include_chain(length: int) -> dict:
    """example.com includes i1, i1 includes i2, ... the last one allows 192.0.2.1."""
    txt = {"example.com": "v=spf1 include:i1.example.com -all"}
    for n in range(1, length):
        txt[f"i{n}.example.com"] = f"v=spf1 include:i{n + 1}.example.com -all"
    txt[f"i{length}.example.com"] = "v=spf1 ip4:192.0.2.1 -all"
    return zone(**txt)


def test_include_chain_of_ten_lookups_passes():
    assert verdict(include_chain(10), ip="192.0.2.1").result == "pass"


def test_include_chain_of_eleven_lookups_is_permerror():
    result = verdict(include_chain(11), ip="192.0.2.1")
    assert result.result == "permerror"
    assert "Too many DNS lookups" in result.smtp_comment


def test_limits_start_afresh_for_each_evaluation():
    zones = include_chain(10)
    assert [verdict(zones, ip="192.0.2.1").result for _ in range(3)] == ["pass"] * 3


def test_two_void_lookups_are_allowed():
    zones = zone(**{"example.com": "v=spf1 a:nx1.example.com a:nx2.example.com ip4:192.0.2.1 -all"})
    assert verdict(zones, ip="192.0.2.1").result == "pass"


def test_three_void_lookups_are_permerror():
    zones = zone(**{"example.com": "v=spf1 a:nx1.example.com a:nx2.example.com a:nx3.example.com "
                                   "ip4:192.0.2.1 -all"})
    result = verdict(zones, ip="192.0.2.1")
    assert result.result == "permerror"
    assert "Void lookup limit" in result.smtp_comment


def test_too_many_rounds_is_temperror(monkeypatch):
    monkeypatch.setattr(mspf, "MAX_ROUNDS", 3)
    result = verdict(include_chain(5), ip="192.0.2.1")
    assert result.result == "temperror"
    assert "rounds" in result.smtp_comment


# ---------------------------------------------------------------------------
# DNS failures and the time budget.

def test_hanging_txt_is_temperror_when_the_budget_runs_out():
    zones = {("example.com", "TXT"): HANG}
    d, clock, _ = evaluate(zones, ip="192.0.2.1", budget=10.0, timeout=30.0)
    assert not d.called
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    result = result_of(d)
    assert (result.result, result.domain) == ("temperror", "example.com")
    assert "10s" in result.smtp_comment
    assert clock.getDelayedCalls() == []           # the hanging query was cancelled


def test_hanging_lookup_ends_at_the_query_timeout_within_the_budget():
    zones = zone(**{"example.com": "v=spf1 a:slow.example.com -all"})
    zones[("slow.example.com", "A")] = HANG
    d, clock, _ = evaluate(zones, ip="192.0.2.1", budget=10.0, timeout=5.0)
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert result_of(d).result == "temperror"
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("failure", [error.DNSServerError, error.DNSQueryRefusedError])
def test_servfail_on_the_record_is_temperror(failure):
    result = verdict({("example.com", "TXT"): failure}, ip="192.0.2.1")
    assert result.result == "temperror"
    assert result.smtp_comment.startswith("SPF Temporary Error")


def test_servfail_on_a_mechanism_lookup_is_temperror():
    zones = zone(**{"example.com": "v=spf1 ip4:198.51.100.1 a:broken.example.net -all"})
    zones[("broken.example.net", "A")] = error.DNSServerError
    assert verdict(zones, ip="192.0.2.1").result == "temperror"
    # ... but not when an earlier term already matched (the lookup is never made).
    assert verdict(zones, ip="198.51.100.1").result == "pass"


def test_nxdomain_is_none():
    result = verdict({}, ip="192.0.2.1", sender="someone@nowhere.example")
    assert (result.result, result.domain, result.explanation) == ("none", "nowhere.example", "")


def test_txt_records_without_spf_are_none():
    result = verdict({("example.com", "TXT"): ["google-site-verification=abc", "v=spf10 nope"]}, ip="192.0.2.1")
    assert result.result == "none"


def test_two_spf_records_are_permerror():
    result = verdict({("example.com", "TXT"): ["v=spf1 +all", "v=spf1 -all"]}, ip="192.0.2.1")
    assert result.result == "permerror"
    assert "Two or more" in result.smtp_comment


def test_a_result_never_waits_for_the_reactor():
    # FakeResolver answers at once: three rounds (TXT; MX + the exchanges;
    # PTR + its names' addresses, which the a: term then reuses) and the
    # Deferred has fired on return.
    zones = zone(**{"example.com": "v=spf1 mx ptr a:mail-c.example.org -all"})
    d, clock, resolver = evaluate(zones, ip="192.0.2.140")
    assert d.called
    assert result_of(d).result == "pass"
    assert clock.getDelayedCalls() == []
    assert ("example.com", "MX") in resolver.queries and ("mail-c.example.org", "A") in resolver.queries


def test_mx_exchange_addresses_come_in_the_same_round():
    zones = zone(**{"example.com": "v=spf1 mx -all"})
    zones[("example.com", "MX")] = [(n, f"mx{n}.example.com") for n in range(1, 6)]
    for n in range(1, 6):
        zones[(f"mx{n}.example.com", "A")] = [f"198.51.100.{n}"]
    resolver = HeldResolver(zones)
    d, clock, _ = evaluate(zones, ip="198.51.100.5", resolver=resolver)
    releases = [resolver.release()]
    while not d.called:
        releases.append(resolver.release())
    # TXT; MX; the five exchanges at once (not five rounds of one each).
    assert releases == [1, 1, 5]
    assert result_of(d).result == "pass"


def test_evaluations_in_flight_do_not_share_answers():
    zones = {("a.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
             ("b.example", "TXT"): ["v=spf1 ip4:192.0.2.2 -all"]}
    resolver = HeldResolver(zones)
    clock = task.Clock()
    mail_dns = MailDNS(resolver, clock=clock)
    first = check_spf(mail_dns, ip="192.0.2.1", sender="x@a.example", helo="h.example", receiver=RECEIVER,
                      clock=clock)
    second = check_spf(mail_dns, ip="192.0.2.1", sender="x@b.example", helo="h.example", receiver=RECEIVER,
                       clock=clock)
    assert resolver.release() == 2
    assert (result_of(first).result, result_of(second).result) == ("pass", "fail")
    assert mspf._CURRENT.get() is None


def test_cancelling_stops_the_evaluation():
    d, clock, _ = evaluate({("example.com", "TXT"): HANG}, ip="192.0.2.1", timeout=30.0)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        result_of(d)
    assert clock.getDelayedCalls() == []


def test_macro_t_is_the_injected_clock():
    # RFC 7208 §7.2: %{t} (exp= text only) is the evaluation's start on our clock, not time.time().
    zones = {("example.com", "TXT"): ["v=spf1 -all exp=explain.example.com"],
             ("explain.example.com", "TXT"): ["refused at %{t}"]}
    clock = task.Clock()
    clock.advance(1000)
    d, _, _ = evaluate(zones, ip="192.0.2.1", clock=clock)
    assert result_of(d).explanation == "refused at 1000"


def test_ipv6_client_uses_aaaa_and_ip6():
    zones = {("example.com", "TXT"): ["v=spf1 ip6:2001:db8:1::/48 a:v6.example.com -all"],
             ("v6.example.com", "AAAA"): ["2001:db8:2::25"]}
    assert verdict(zones, ip="2001:db8:1::7").result == "pass"
    assert verdict(zones, ip="2001:db8:2::25").result == "pass"
    assert verdict(zones, ip="2001:db8:3::1").result == "fail"


# ---------------------------------------------------------------------------
# exp= (RFC 7208 §6.2): fetched behind pyspf's bare "except:", hence the
# recorded misses.

def test_explanation_is_fetched_and_expanded():
    zones = {("example.com", "TXT"): ["v=spf1 -all exp=explain.example.com"],
             ("explain.example.com", "TXT"): ["%{i} is not one of %{d}'s designated mail servers."]}
    result = verdict(zones, ip="192.0.2.1")
    assert result.result == "fail"
    assert result.explanation == "192.0.2.1 is not one of example.com's designated mail servers."
    assert result.smtp_comment == "SPF fail - not authorized"


def test_explanation_is_only_for_fail():
    zones = {("example.com", "TXT"): ["v=spf1 ~all exp=explain.example.com"],
             ("explain.example.com", "TXT"): ["go away"]}
    result = verdict(zones, ip="192.0.2.1")
    assert (result.result, result.explanation) == ("softfail", "")


def test_hanging_explanation_gives_the_fail_without_text():
    zones = {("example.com", "TXT"): ["v=spf1 -all exp=explain.example.com"],
             ("explain.example.com", "TXT"): HANG}
    d, clock, _ = evaluate(zones, ip="192.0.2.1", timeout=5.0)
    clock.advance(5)
    result = result_of(d)
    assert (result.result, result.explanation) == ("fail", "")


def test_explanation_cannot_inject_smtp_reply_lines():
    zones = {("example.com", "TXT"): ["v=spf1 -all exp=explain.example.com"],
             ("explain.example.com", "TXT"): ["denied\r\n250 2.0.0 Ok\r\n"]}
    result = verdict(zones, ip="192.0.2.1")
    assert result.result == "fail"
    assert "\r" not in result.explanation and "\n" not in result.explanation
    assert result.explanation.startswith("denied")


# ---------------------------------------------------------------------------
# Identities: RFC 7208 §2.3 HELO, §2.4 MAIL FROM (null -> postmaster@HELO).

HELO_ZONE = {("mail.example.com", "TXT"): ["v=spf1 a -all"], ("mail.example.com", "A"): ["192.0.2.25"],
             ("example.com", "TXT"): ["v=spf1 -all"]}


def test_null_sender_checks_the_helo_identity():
    result = verdict(HELO_ZONE, ip="192.0.2.25", sender="", helo="mail.example.com")
    assert (result.result, result.identity, result.domain) == ("pass", "helo", "mail.example.com")


def test_mail_from_is_checked_when_present():
    result = verdict(HELO_ZONE, ip="192.0.2.25", sender="bounce@example.com", helo="mail.example.com")
    assert (result.result, result.identity, result.domain) == ("fail", "mailfrom", "example.com")


def test_check_helo_alone():
    clock = task.Clock()
    d = check_helo(MailDNS(FakeResolver(HELO_ZONE), clock=clock), ip="192.0.2.26", helo="MAIL.example.com.",
                   receiver=RECEIVER, clock=clock)
    result = result_of(d)
    assert (result.result, result.identity, result.domain) == ("fail", "helo", "mail.example.com")


@pytest.mark.parametrize("helo", ["[192.0.2.25]", "[IPv6:2001:db8::1]", "192.0.2.25", "localhost", "",
                                  "bad..example.com", "x" * 64 + ".example.com"])
def test_helo_that_is_no_domain_is_none_without_dns(helo):
    resolver = FakeResolver(HELO_ZONE)
    result = verdict(HELO_ZONE, ip="192.0.2.25", sender="", helo=helo, resolver=resolver)
    assert (result.result, result.identity) == ("none", "helo")
    assert resolver.queries == []


@pytest.mark.parametrize("sender", ["user@localhost", "user@", "user@[192.0.2.1]"])
def test_sender_domain_that_is_no_domain_is_none(sender):
    result = verdict(HELO_ZONE, ip="192.0.2.25", sender=sender)
    assert (result.result, result.identity) == ("none", "mailfrom")


def test_domain_is_taken_after_the_last_at_sign():
    zones = {("example.com", "TXT"): ["v=spf1 exists:%{l}.users.example.com -all"]}
    d, _, resolver = evaluate(zones, ip="192.0.2.1", sender='"a@b"@example.com')
    result = result_of(d)
    assert (result.result, result.domain) == ("fail", "example.com")
    assert ('"a@b".users.example.com', "A") in resolver.queries       # %{l} is all before the last "@"


def test_a_pyspf_bug_is_temperror_not_a_lost_message(monkeypatch):
    def broken(self, spf=None):
        raise RuntimeError("boom")
    monkeypatch.setattr(spf.query, "check", broken)
    result = verdict({("example.com", "TXT"): ["v=spf1 -all"]}, ip="192.0.2.1")
    assert (result.result, result.smtp_comment) == ("temperror", "SPF Temporary Error: evaluation failed")


# ---------------------------------------------------------------------------
# The hook: pyspf outside our evaluations is untouched.

def test_hook_is_installed_once():
    first = install_hook()
    assert install_hook() is first is spf.DNSLookup


def test_hook_delegates_to_the_original_when_no_evaluation_runs(monkeypatch):
    hook = install_hook()
    calls = []

    def original(name, qtype, strict=True, timeout=20):
        calls.append((name, qtype, strict, timeout))
        if (name, qtype) == ("example.com", "TXT"):
            return [(("example.com", "TXT"), [b"v=spf1 ip4:192.0.2.1 -all"])]
        return []
    monkeypatch.setattr(hook, "original", original)
    assert spf.DNSLookup("example.com", "TXT", True, 20) == [(("example.com", "TXT"), [b"v=spf1 ip4:192.0.2.1 -all"])]
    # pyspf itself, used directly by someone else, reaches the original too ...
    assert spf.query(i="192.0.2.1", s="x@example.com", h="h.example.com").check()[0] == "pass"
    assert ("example.com", "TXT", True, 20) in calls
    calls.clear()
    # ... while our evaluation never does, and leaves no evaluation behind.
    assert verdict({("example.com", "TXT"): ["v=spf1 -all"]}, ip="192.0.2.1").result == "fail"
    assert calls == []
    assert mspf._CURRENT.get() is None
    spf.DNSLookup("example.com", "TXT", True, 20)
    assert calls


def test_hook_wraps_a_lookup_installed_after_it(monkeypatch):
    install_hook()
    def theirs(name, qtype, strict=True, timeout=20):
        return [((name, qtype), [b"v=spf1 +all"])] if qtype == "TXT" else []
    monkeypatch.setattr(spf, "DNSLookup", theirs)       # as pyspf's test suite does
    assert verdict({("example.com", "TXT"): ["v=spf1 -all"]}, ip="192.0.2.1").result == "fail"
    assert spf.DNSLookup is not theirs and spf.DNSLookup.original is theirs
    assert spf.query(i="192.0.2.1", s="x@example.com", h="h.example.com").check()[0] == "pass"


# ---------------------------------------------------------------------------
# RFC 7208 §9.1 Received-SPF.

def test_received_spf_for_mail_from():
    result = SPFResult("pass", "mailfrom", "example.com", "", "sender SPF authorized")
    header = received_spf_header(result, ip="192.0.2.1", helo="foo.example.com", sender="myname@example.com",
                                 receiver="mybox.example.org")
    assert header == ('Received-SPF: pass (mybox.example.org: domain of myname@example.com designates '
                      '192.0.2.1 as permitted sender) client-ip=192.0.2.1; envelope-from="myname@example.com"; '
                      'helo=foo.example.com; receiver=mybox.example.org; identity=mailfrom')


def test_received_spf_for_helo_and_errors():
    result = SPFResult("permerror", "helo", "mail.example.com", "",
                       "SPF Permanent Error: Two or more type TXT spf records found.")
    header = received_spf_header(result, ip="::ffff:192.0.2.1", helo="mail.example.com", sender="",
                                 receiver="mx.mailgw.test")
    assert header.startswith("Received-SPF: permerror (mx.mailgw.test: permanent error in processing domain "
                             "of mail.example.com) client-ip=192.0.2.1; helo=mail.example.com; ")
    assert 'problem="Two or more type TXT spf records found."' in header
    assert "envelope-from" not in header and header.endswith("identity=helo")


def test_received_spf_is_one_line_whatever_the_client_said():
    result = verdict(zone(**{"example.com": "v=spf1 -all"}), ip="192.0.2.1", sender="a(b)@example.com")
    header = received_spf_header(result, ip="192.0.2.1", helo="evil\r\nX-Injected: yes",
                                 sender="a(b)@example.com", receiver=RECEIVER)
    assert "\r" not in header and "\n" not in header
    assert "a\\(b\\)@example.com" in header                # comment: quoted-pairs
    assert 'envelope-from="a(b)@example.com"' in header
