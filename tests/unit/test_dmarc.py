"""DMARC (RFC 7489): Organizational Domains from the PSL (§3.2), strict and relaxed
alignment of DKIM and SPF (§3.1), policy discovery with the fallback to the
Organizational Domain and sp= (§6.6.3, §6.3), pct sampling (§6.6.4), several records,
DNS failures, record parsing, and the From domains the caller checks (§6.6.1)."""
from __future__ import annotations

import os

import pytest
from twisted.internet import task
from twisted.names import error

from deferreds import result_of
from fake_dns import HANG, FakeResolver
from mailgw.mailauth import dmarc
from mailgw.mailauth.dkim_verify import DKIMResult
from mailgw.mailauth.dns import MailDNS


def dkim_pass(domain: str, result: str = "pass") -> DKIMResult:
    return DKIMResult(result, domain, "sel", "rsa-sha256", "@" + domain, "abcdefgh", "")


def evaluate(zones, from_domain="example.com", *, spf_result="none", spf_domain="", dkim=(), clock=None, **kw):
    clock = clock or task.Clock()
    d = dmarc.evaluate_dmarc(MailDNS(FakeResolver(zones), clock=clock), from_domain=from_domain,
                             spf_result=spf_result, spf_domain=spf_domain, dkim_results=list(dkim),
                             clock=clock, **kw)
    return d


def check(zones, from_domain="example.com", **kw) -> dmarc.DMARCResult:
    return result_of(evaluate(zones, from_domain, **kw))


def record(text, name="example.com"):
    return {(f"_dmarc.{name}", "TXT"): [text]}


# --- Organizational Domain (§3.2) ----------------------------------------------------

@pytest.mark.parametrize("name, org", [
    ("a.b.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"),
    ("Mail.Example.COM.", "example.com"),
    ("co.uk", "co.uk"),                    # a public suffix is its own
])
def test_organizational_domain(name, org):
    assert dmarc.organizational_domain(name) == org


def test_the_newer_public_suffix_list_is_used(tmp_path):
    old = tmp_path / "old.dat"
    new = tmp_path / "new.dat"
    old.write_text("// VERSION: 2023-01-01_00-00-00_UTC\ncom\n")
    new.write_text("// VERSION: 2026-01-01_00-00-00_UTC\ncom\n")
    assert dmarc.psl_path(system=str(new), bundled=str(old)) == str(new)
    assert dmarc.psl_path(system=str(old), bundled=str(new)) == str(new)
    assert dmarc.psl_path(system=str(tmp_path / "absent"), bundled=str(old)) == str(old)
    undated = tmp_path / "undated.dat"         # Debian's file has no VERSION line: its mtime counts
    undated.write_text("com\n")
    os.utime(undated, (0, 0))
    assert dmarc.psl_path(system=str(undated), bundled=str(old)) == str(old)


# --- record parsing (§6.3, §6.4) -----------------------------------------------------

def test_parse_record_defaults_and_tags():
    r = dmarc.parse_record("v=DMARC1; p=Reject; rua=mailto:d@example.com; future=1")
    assert r == dmarc.DMARCRecord(p="reject", sp=None, pct=100, adkim="r", aspf="r",
                                  rua="mailto:d@example.com", ruf=None)
    r = dmarc.parse_record(b"v=DMARC1;p=none;sp=quarantine;pct=20;adkim=s;aspf=s;ruf=mailto:f@example.com")
    assert (r.p, r.sp, r.pct, r.adkim, r.aspf, r.ruf) == ("none", "quarantine", 20, "s", "s", "mailto:f@example.com")


@pytest.mark.parametrize("text", ["p=reject; v=DMARC1", "v=DMARC2; p=reject", "v=dmarc1; p=reject",
                                  "v=spf1 -all", "", "v=DMARC1; p=bogus", "v=DMARC1"])
def test_not_a_usable_record(text):
    assert dmarc.parse_record(text) is None


def test_invalid_p_with_rua_acts_as_p_none():
    # RFC 7489 §6.6.3 step 6.1
    r = dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:d@example.com")
    assert r.p == "none"
    r = dmarc.parse_record("v=DMARC1; p=reject; sp=bogus; rua=mailto:d@example.com")
    assert (r.p, r.sp) == ("none", None)


@pytest.mark.parametrize("pct", ["101", "-1", "x"])
def test_unusable_pct_is_the_default(pct):
    assert dmarc.parse_record(f"v=DMARC1; p=reject; pct={pct}").pct == 100


# --- alignment (§3.1) ----------------------------------------------------------------

def test_dkim_relaxed_alignment_accepts_a_subdomain_signer():
    r = check(record("v=DMARC1; p=reject"), "example.com", dkim=[dkim_pass("mail.example.com")])
    assert (r.result, r.dkim_aligned, r.spf_aligned, r.disposition) == ("pass", True, False, "none")


def test_dkim_strict_alignment_needs_the_same_domain():
    zones = record("v=DMARC1; p=reject; adkim=s")
    r = check(zones, "example.com", dkim=[dkim_pass("mail.example.com")])
    assert (r.result, r.dkim_aligned, r.disposition) == ("fail", False, "reject")
    r = check(zones, "example.com", dkim=[dkim_pass("EXAMPLE.com")])
    assert (r.result, r.dkim_aligned) == ("pass", True)


def test_spf_relaxed_and_strict_alignment():
    r = check(record("v=DMARC1; p=reject"), spf_result="pass", spf_domain="bounces.example.com")
    assert (r.result, r.spf_aligned) == ("pass", True)
    r = check(record("v=DMARC1; p=reject; aspf=s"), spf_result="pass", spf_domain="bounces.example.com")
    assert (r.result, r.spf_aligned) == ("fail", False)
    r = check(record("v=DMARC1; p=reject; aspf=s"), spf_result="pass", spf_domain="example.com")
    assert (r.result, r.spf_aligned) == ("pass", True)


def test_unaligned_or_unpassed_identifiers_do_not_count():
    zones = record("v=DMARC1; p=reject")
    r = check(zones, spf_result="pass", spf_domain="example.net", dkim=[dkim_pass("example.org")])
    assert (r.result, r.spf_aligned, r.dkim_aligned) == ("fail", False, False)
    r = check(zones, spf_result="softfail", spf_domain="example.com",
              dkim=[dkim_pass("example.com", "fail"), dkim_pass("example.com", "policy")])
    assert r.result == "fail"


def test_relaxed_alignment_does_not_cross_a_public_suffix():
    r = check(record("v=DMARC1; p=reject", "a.example.co.uk"), "a.example.co.uk",
              dkim=[dkim_pass("b.co.uk")])
    assert r.result == "fail"


def test_pass_when_dkim_aligned_even_if_spf_fails():
    r = check(record("v=DMARC1; p=reject"), spf_result="fail", spf_domain="example.com",
              dkim=[dkim_pass("example.com")])
    assert (r.result, r.dkim_aligned, r.spf_aligned, r.disposition) == ("pass", True, False, "none")


# --- policy (§6.3, §6.6.3, §6.6.4) ---------------------------------------------------

def test_reject_policy_fail_is_disposition_reject():
    r = check(record("v=DMARC1; p=reject"))
    assert r == dmarc.DMARCResult("fail", "reject", "reject", "example.com", "example.com", False, False,
                                  "no aligned SPF or DKIM pass")


def test_subdomain_uses_sp_of_the_organizational_domain_record():
    zones = record("v=DMARC1; p=reject; sp=quarantine")
    r = check(zones, "news.example.com")
    assert (r.result, r.policy, r.disposition, r.domain, r.policy_domain) == \
        ("fail", "quarantine", "quarantine", "news.example.com", "example.com")
    # ... and sp= does not apply to the Organizational Domain itself.
    assert check(zones, "example.com").policy == "reject"


def test_fallback_to_the_organizational_domain_record_uses_p_without_sp():
    r = check(record("v=DMARC1; p=quarantine", "example.co.uk"), "a.b.example.co.uk")
    assert (r.result, r.policy, r.policy_domain) == ("fail", "quarantine", "example.co.uk")


def test_a_record_at_the_from_domain_wins_over_the_organizational_domain():
    zones = {**record("v=DMARC1; p=none", "news.example.com"), **record("v=DMARC1; p=reject")}
    r = check(zones, "news.example.com")
    assert (r.policy, r.disposition, r.policy_domain) == ("none", "none", "news.example.com")


def test_pct_zero_with_reject_is_quarantine():
    r = check(record("v=DMARC1; p=reject; pct=0"))
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "quarantine")


def test_pct_samples_with_the_injected_random():
    zones = record("v=DMARC1; p=quarantine; pct=30")
    assert check(zones, random=lambda: 0.29).disposition == "quarantine"
    assert check(zones, random=lambda: 0.30).disposition == "none"
    zones = record("v=DMARC1; p=reject; pct=30")
    assert check(zones, random=lambda: 0.10).disposition == "reject"
    assert check(zones, random=lambda: 0.99).disposition == "quarantine"


def test_p_none_fail_is_disposition_none():
    r = check(record("v=DMARC1; p=none"))
    assert (r.result, r.policy, r.disposition) == ("fail", "none", "none")


def test_two_records_is_none():
    zones = {("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}
    r = check(zones)
    assert (r.result, r.disposition, r.policy_domain) == ("none", "none", None)


def test_other_txt_records_are_discarded():
    zones = {("_dmarc.example.com", "TXT"): ["v=spf1 -all", "v=DMARC1; p=reject", "hello"]}
    assert check(zones).policy == "reject"


def test_no_record_anywhere_is_none():
    r = check({}, "news.example.com", dkim=[dkim_pass("example.com")])
    assert (r.result, r.disposition, r.dkim_aligned) == ("none", "none", True)


def test_txt_temporary_error_is_temperror():
    r = check({("_dmarc.example.com", "TXT"): error.DNSServerError})
    assert (r.result, r.disposition) == ("temperror", "none")
    # The same at the Organizational Domain after nothing at the From domain.
    r = check({("_dmarc.example.com", "TXT"): error.DNSServerError}, "news.example.com")
    assert r.result == "temperror"


def test_hanging_dns_is_temperror_when_the_budget_ends():
    clock = task.Clock()
    d = evaluate({("_dmarc.example.com", "TXT"): HANG}, clock=clock, budget=10.0)
    results = []
    d.addCallback(results.append)
    clock.advance(9.9)
    assert results == []
    clock.advance(0.1)
    assert results[0].result == "temperror"


def test_no_single_from_domain_is_permerror():
    r = check(record("v=DMARC1; p=reject"), None)
    assert (r.result, r.disposition) == ("permerror", "none")


# --- From domains (§6.6.1) -----------------------------------------------------------

def test_header_from_domains():
    message = (b"From: Joe <joe@Example.COM>, \"Ann, B\" <ann@b.example.org>\r\n"
               b"To: x@example.net\r\nFrom: third@example.net\r\n\r\nFrom: body@not.header\r\n")
    assert dmarc.header_from_domains(message) == ["example.com", "b.example.org", "example.net"]


def test_header_from_domains_without_from_or_domain():
    assert dmarc.header_from_domains(b"To: x@example.net\r\n\r\nbody\r\n") == []
    assert dmarc.header_from_domains(b"From: joe\r\n\r\nbody\r\n") == [""]
    assert dmarc.header_from_domains(b"From: Friends: a@x.example, b@y.example;\r\n\r\n") == \
        ["x.example", "y.example"]
