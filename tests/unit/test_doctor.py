"""`mailgw doctor` (mailgw.mailauth.doctor): a correct zone is all OK, a
broken one gives every FAIL with the record to publish, an unreachable DNS
is one line, and the command works against a real twisted.names server on
127.0.0.1."""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, task
from twisted.internet.selectreactor import SelectReactor
from twisted.names import common, dns, error, server

from deferreds import result_of
from fake_dns import HANG, FakeResolver
from mailgw.config import load
from mailgw.mailauth import doctor
from mailgw.mailauth.dns import MailDNS
from mailgw.mailauth.keys import DKIMKeyStore, txt_strings

UTC = datetime.timezone.utc
NOW = datetime.datetime(2025, 1, 15, tzinfo=UTC)
HOST = "mail.example.org"


# -- helpers -------------------------------------------------------------------------------



def _name(text):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_certificate(directory, names, *, ca=True, not_before=datetime.datetime(2025, 1, 1, tzinfo=UTC),
                     not_after=datetime.datetime(2025, 4, 1, tzinfo=UTC), san=True):
    """A leaf for `names` signed by a test CA (or self-signed), as cert.pem/key.pem in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    if ca:
        signer = ec.generate_private_key(ec.SECP256R1())
        issuer = _name("mailgw test CA")
    else:
        signer, issuer = key, _name(names[0])
    builder = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                                        critical=False)
    certificate = builder.sign(signer, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return directory / "cert.pem", directory / "key.pem"


def make_config(tmp_path, *, domains=("example.org",), cert_names=(HOST,), ca=True, extra="", **cert):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    cert_path, key_path = make_certificate(tmp_path / "tls", list(cert_names), ca=ca, **cert)
    path = tmp_path / "mailgw.toml"
    listed = ", ".join(f'"{d}"' for d in domains)
    path.write_text(f'[server]\nhostname = "{HOST}"\ndata_dir = "{data}"\nlocal_domains = [{listed}]\n'
                    f'[tls]\ncertificate = "{cert_path}"\nprivate_key = "{key_path}"\n{extra}')
    return path, load(path)


def key_store(config, *domains, algorithm="rsa"):
    store = DKIMKeyStore(config.dkim.keys_dir)
    for domain in domains:
        store.keygen(domain, selector="s1", algorithm=algorithm, now=NOW)
    return DKIMKeyStore(config.dkim.keys_dir)


def dkim_txt(key):
    return [txt_strings(key.dns_record)]         # one record of several character-strings


def good_zone(store):
    key = store.keys("example.org")[0]
    return {
        (HOST, "A"): ["192.0.2.10"],
        (HOST, "AAAA"): ["2001:db8::10"],
        ("10.2.0.192.in-addr.arpa", "PTR"): [HOST],
        ("0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR"): [HOST],
        ("example.org", "MX"): [(10, HOST)],
        ("example.org", "TXT"): ["v=spf1 mx -all", "google-site-verification=abc"],
        (key.dns_name, "TXT"): dkim_txt(key),
        ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject; rua=mailto:dmarc@example.org"],
    }


def run(config, zone_or_resolver, *, store=None, outbound=(), domains=None, now=NOW, clock=None,
        nameserver="test resolver"):
    clock = clock or task.Clock()
    resolver = zone_or_resolver if not isinstance(zone_or_resolver, dict) else FakeResolver(zone_or_resolver)
    mail_dns = MailDNS(resolver, clock=clock, timeout=5.0)
    return doctor.run_checks(config, mail_dns, clock=clock, key_store=store, outbound_ips=list(outbound),
                             domains=domains, now=now, nameserver=nameserver)


def text_of(findings) -> list[str]:
    return [line for finding in findings for line in finding.lines()]


# -- a correct zone --------------------------------------------------------------------------

GOOD = [
    "OK address mail.example.org: 192.0.2.10, 2001:db8::10",
    "OK ptr 192.0.2.10: mail.example.org, forward-confirmed",
    "OK ptr 2001:db8::10: mail.example.org, forward-confirmed",
    "OK mx example.org: 10 mail.example.org",
    "OK spf example.org: pass for 192.0.2.10, 2001:db8::10; 1 of 10 lookups",
    "OK dkim s1._domainkey.example.org: published, matches the rsa key on disk",
    "OK dmarc example.org: p=reject, rua=mailto:dmarc@example.org",
    "OK tls name: the certificate covers mail.example.org",
    "OK tls expiry: valid until 2025-04-01 (76 days)",
    "OK tls issuer: issued by CN=mailgw test CA",
]


def test_a_correct_zone_is_all_ok(tmp_path):
    _, config = make_config(tmp_path)
    store = key_store(config, "example.org")
    findings = result_of(run(config, good_zone(store), store=store))
    assert text_of(findings) == GOOD
    assert doctor.exit_code(findings) == 0


def test_mx_to_another_name_with_our_addresses_is_ok(tmp_path):
    _, config = make_config(tmp_path)
    store = key_store(config, "example.org")
    zone = good_zone(store)
    zone[("example.org", "MX")] = [(20, "backup.example.net"), (10, "mx.example.org")]
    zone[("mx.example.org", "A")] = ["192.0.2.10"]
    zone[("mx.example.org", "AAAA")] = ["2001:db8::10"]
    zone[("backup.example.net", "A")] = ["198.51.100.1"]
    findings = {f.name: f for f in result_of(run(config, zone, store=store))}
    assert findings["mx example.org"].lines() == [
        "OK mx example.org: 10 mx.example.org, 20 backup.example.net "
        "(mx.example.org has the addresses of mail.example.org)"]


def test_explicit_outbound_ip_is_the_one_checked(tmp_path):
    _, config = make_config(tmp_path)
    store = key_store(config, "example.org")
    findings = text_of(result_of(run(config, good_zone(store), store=store, outbound=["192.0.2.10"])))
    assert "OK ptr 192.0.2.10: mail.example.org, forward-confirmed" in findings
    assert not any(line.startswith("OK ptr 2001:db8::10") for line in findings)
    assert "OK spf example.org: pass for 192.0.2.10; 1 of 10 lookups" in findings


# -- a broken zone ------------------------------------------------------------------------------

def broken_zone(store):
    stale = DKIMKeyStore(store.directory + "-old")
    old = stale.keygen("example.org", selector="s1", algorithm="rsa", now=NOW)
    return {
        (HOST, "A"): ["192.0.2.10"],
        ("example.org", "MX"): [(10, "mx.elsewhere.example")],
        ("mx.elsewhere.example", "A"): ["198.51.100.1"],
        ("example.org", "TXT"): ["v=spf1 ip4:198.51.100.0/24 -all"],
        ("s1._domainkey.example.org", "TXT"): dkim_txt(old),
        ("example.net", "MX"): [(10, HOST)],
        ("example.net", "TXT"): ["v=spf1 mx a include:_spf.example.net -all"],
        ("_spf.example.net", "TXT"): ["v=spf1 " + " ".join(f"a:h{n}.example.net" for n in range(1, 9))
                                      + " ip4:203.0.113.7 -all"],
        ("_dmarc.example.net", "TXT"): ["v=DMARC1; p=none"],
    }


def test_a_broken_zone_fails_each_check_with_the_record_to_publish(tmp_path):
    _, config = make_config(tmp_path, domains=("example.org", "example.net"), cert_names=("other.example.com",),
                            ca=False)
    store = key_store(config, "example.org")
    key = store.keys("example.org")[0]
    head, *rest = txt_strings(key.dns_record)
    findings = result_of(run(config, broken_zone(store), store=store, outbound=["203.0.113.7"]))
    assert text_of(findings) == [
        "FAIL address mail.example.org: 192.0.2.10; the outbound address 203.0.113.7 is not among them "
        "(receivers check the HELO name leads to the sender)",
        "    mail.example.org. IN A 203.0.113.7",
        "FAIL ptr 203.0.113.7: no PTR record; ask the provider of 203.0.113.7 to publish",
        "    7.113.0.203.in-addr.arpa. IN PTR mail.example.org.",
        "OK mx example.net: 10 mail.example.org",
        "FAIL spf example.net: 11 of 10 lookups: receivers see permerror (RFC 7208 §4.6.4)",
        '    example.net. IN TXT "v=spf1 ip4:203.0.113.7 -all"',
        "WARN dkim example.net: no DKIM key; make one, then publish the record it prints",
        "    mailgw dkim keygen example.net",
        "WARN dmarc example.net: p=none: receivers only report, they act on no failure",
        '    _dmarc.example.net. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.net"',
        "FAIL mx example.org: 10 mx.elsewhere.example: not mail.example.org, nor a name with its addresses",
        "    example.org. IN MX 10 mail.example.org.",
        "FAIL spf example.org: fail for 203.0.113.7; 0 of 10 lookups",
        '    example.org. IN TXT "v=spf1 ip4:203.0.113.7 ip4:198.51.100.0/24 -all"',
        "FAIL dkim s1._domainkey.example.org: the record has another public key (stale)",
        "    s1._domainkey.example.org. IN TXT (",
        f'        "{head}"',
        *[f'        "{part}"' for part in rest],
        "    )",
        "FAIL dmarc example.org: no DMARC record",
        '    _dmarc.example.org. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"',
        "FAIL tls name: the certificate is for other.example.com, not mail.example.org",
        "    get a certificate for mail.example.org (e.g. certbot certonly -d mail.example.org)",
        "    and set [tls] certificate and private_key to its files",
        "OK tls expiry: valid until 2025-04-01 (76 days)",
        "WARN tls issuer: self-signed: senders and clients that verify refuse it",
        "    get a certificate for mail.example.org (e.g. certbot certonly -d mail.example.org)",
        "    and set [tls] certificate and private_key to its files",
    ]
    assert doctor.exit_code(findings) == 1
    # The DKIM record is split into strings of at most 255 octets and joins to the key's record.
    assert all(len(part.encode()) <= 255 for part in [head, *rest]) and len(rest) >= 2
    assert "".join([head, *rest]) == key.dns_record


def test_missing_records_each_give_the_record_to_publish(tmp_path):
    _, config = make_config(tmp_path)
    store = key_store(config, "example.org")
    key = store.keys("example.org")[0]
    findings = text_of(result_of(run(config, {(HOST, "A"): ["192.0.2.10"],
                                              ("10.2.0.192.in-addr.arpa", "PTR"): ["vps-1.provider.example"]},
                                     store=store)))
    assert findings[:14] == [
        "OK address mail.example.org: 192.0.2.10",
        "FAIL ptr 192.0.2.10: PTR is vps-1.provider.example, not mail.example.org (the HELO name); "
        "ask the provider of 192.0.2.10 to publish",
        "    10.2.0.192.in-addr.arpa. IN PTR mail.example.org.",
        "FAIL mx example.org: no MX record",
        "    example.org. IN MX 10 mail.example.org.",
        "FAIL spf example.org: no SPF record",
        '    example.org. IN TXT "v=spf1 mx -all"',
        "FAIL dkim s1._domainkey.example.org: no DKIM record",
        "    s1._domainkey.example.org. IN TXT (",
        f'        "{txt_strings(key.dns_record)[0]}"',
        f'        "{txt_strings(key.dns_record)[1]}"',
        f'        "{txt_strings(key.dns_record)[2]}"',
        "    )",
        "FAIL dmarc example.org: no DMARC record",
    ]


def test_no_address_for_the_hostname(tmp_path):
    _, config = make_config(tmp_path)
    findings = text_of(result_of(run(config, {("example.org", "MX"): [(10, HOST)]}, store=None)))
    assert findings[:4] == [
        "FAIL address mail.example.org: no A or AAAA record",
        "    mail.example.org. IN A <this server's public IPv4 address>",
        "WARN ptr: no outbound address to check: the hostname has none; give --outbound-ip",
        "OK mx example.org: 10 mail.example.org",
    ]
    findings = text_of(result_of(run(config, {("example.org", "MX"): [(10, HOST)]}, outbound=["2001:db8::5"])))
    assert findings[:2] == ["FAIL address mail.example.org: no A or AAAA record",
                            "    mail.example.org. IN AAAA 2001:db8::5"]


def test_ptr_to_us_but_not_forward_confirmed(tmp_path):
    _, config = make_config(tmp_path)
    zone = {(HOST, "A"): ["192.0.2.10"], ("7.113.0.203.in-addr.arpa", "PTR"): [HOST]}
    findings = {f.name: f for f in result_of(run(config, zone, outbound=["203.0.113.7"]))}
    assert findings["ptr 203.0.113.7"].lines() == [
        "FAIL ptr 203.0.113.7: mail.example.org, but mail.example.org does not lead back to 203.0.113.7",
        "    mail.example.org. IN A 203.0.113.7"]


def test_null_mx_and_two_spf_records_and_two_dmarc_records(tmp_path):
    _, config = make_config(tmp_path)
    zone = {(HOST, "A"): ["192.0.2.10"], ("example.org", "MX"): [(0, ".")],
            ("example.org", "TXT"): ["v=spf1 mx -all", "v=spf1 a -all"],
            ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}
    findings = {f.name: f for f in result_of(run(config, zone))}
    assert findings["mx example.org"].verdict == "null MX: the domain says it accepts no mail (RFC 7505)"
    assert findings["spf example.org"].lines() == [
        "FAIL spf example.org: 2 SPF records, receivers see permerror (RFC 7208 §4.5); publish only one",
        '    example.org. IN TXT "v=spf1 mx -all"']
    assert findings["dmarc example.org"].lines()[0] == \
        "FAIL dmarc example.org: 2 DMARC records: receivers use none (RFC 7489 §6.6.3)"


def test_spf_plus_all_warns_and_an_invalid_dmarc_policy_fails(tmp_path):
    _, config = make_config(tmp_path)
    zone = {(HOST, "A"): ["192.0.2.10"], ("example.org", "MX"): [(10, HOST)],
            ("example.org", "TXT"): ["v=spf1 +all"],
            ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=maybe"]}
    findings = {f.name: f for f in result_of(run(config, zone))}
    assert findings["spf example.org"].level == "WARN"
    assert "+all lets anyone send as example.org" in findings["spf example.org"].verdict
    assert findings["dmarc example.org"].verdict == "p=maybe is no policy (RFC 7489 §6.3)"


def test_revoked_dkim_record_and_an_ed25519_key(tmp_path):
    _, config = make_config(tmp_path)
    store = key_store(config, "example.org", algorithm="ed25519")
    key = store.keys("example.org")[0]
    zone = good_zone(store)
    findings = {f.name: f for f in result_of(run(config, zone, store=store))}
    assert findings[f"dkim {key.dns_name}"].lines() == [
        "OK dkim s1._domainkey.example.org: published, matches the ed25519 key on disk"]
    # The published key with whitespace inside p= still matches (RFC 6376 §3.6.1: FWS allowed).
    spaced = key.public_key_b64[:10] + " \t" + key.public_key_b64[10:]
    zone[(key.dns_name, "TXT")] = [f"v=DKIM1; k=ed25519; p={spaced}"]
    assert result_of(run(config, zone, store=store))[5].level == "OK"
    zone[(key.dns_name, "TXT")] = ["v=DKIM1; k=ed25519; p="]
    findings = {f.name: f for f in result_of(run(config, zone, store=store))}
    assert findings[f"dkim {key.dns_name}"].lines() == [
        "FAIL dkim s1._domainkey.example.org: the record is revoked (empty p=)",
        "    s1._domainkey.example.org. IN TXT (",
        '        "v=DKIM1; k=ed25519; "',
        f'        "p={key.public_key_b64}"',
        "    )"]


def test_a_domain_outside_local_domains_is_a_warning(tmp_path):
    _, config = make_config(tmp_path)
    findings = result_of(run(config, {(HOST, "A"): ["192.0.2.10"]}, domains=["Other.Example."]))
    assert findings[0].lines() == [
        "WARN domain other.example: not one of [server] local_domains: this server accepts no mail for it"]
    assert [f.name for f in findings[1:5]] == ["address mail.example.org", "ptr 192.0.2.10",
                                                "mx other.example", "spf other.example"]


# -- DNS failures ------------------------------------------------------------------------------

class HangingResolver:
    """Every query waits forever: only the MailDNS time budget ends it."""

    def __init__(self):
        self.pending = []

    def _hang(self, name, timeout=None):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    lookupAddress = lookupIPV6Address = lookupMailExchange = lookupText = lookupPointer = _hang


class RefusingResolver:
    def _refuse(self, name, timeout=None):
        return defer.fail(error.DNSServerError(name))

    lookupAddress = lookupIPV6Address = lookupMailExchange = lookupText = lookupPointer = _refuse


def test_a_hanging_dns_is_one_unreachable_line_after_the_timeout(tmp_path):
    _, config = make_config(tmp_path)
    clock = task.Clock()
    d = run(config, HangingResolver(), clock=clock, nameserver="192.0.2.53:53")
    results = []
    d.addBoth(results.append)
    clock.advance(4.9)
    assert not results
    clock.advance(0.2)
    assert text_of(results[0]) == [
        "FAIL dns: DNS unreachable (192.0.2.53:53)",
        "OK tls name: the certificate covers mail.example.org",
        "OK tls expiry: valid until 2025-04-01 (76 days)",
        "OK tls issuer: issued by CN=mailgw test CA",
    ]
    assert doctor.exit_code(results[0]) == 1
    assert not clock.getDelayedCalls()


def test_a_refusing_dns_is_one_unreachable_line(tmp_path):
    _, config = make_config(tmp_path, domains=("example.org", "example.net"))
    findings = result_of(run(config, RefusingResolver(), nameserver="127.0.0.1:53"))
    assert findings[0].lines() == ["FAIL dns: DNS unreachable (127.0.0.1:53)"]
    assert [f.name for f in findings] == ["dns", "tls name", "tls expiry", "tls issuer"]


def test_one_failing_lookup_fails_its_check_only(tmp_path):
    _, config = make_config(tmp_path)
    store = key_store(config, "example.org")
    zone = good_zone(store)
    zone[("_dmarc.example.org", "TXT")] = error.DNSServerError
    zone[("example.org", "TXT")] = HANG
    clock = task.Clock()
    d = run(config, zone, store=store, clock=clock)
    clock.advance(5.1)
    clock.advance(5.1)
    findings = {f.name: f for f in result_of(d)}
    assert findings["dmarc example.org"].level == "FAIL"
    assert findings["dmarc example.org"].verdict.startswith("DNS lookup failed: TXT _dmarc.example.org")
    assert findings["spf example.org"].verdict.startswith("DNS lookup failed: TXT example.org")
    assert findings["mx example.org"].level == findings["dkim s1._domainkey.example.org"].level == "OK"


# -- certificate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, hostname, matches", [
    ("*.example.org", "mail.example.org", True),
    ("*.example.org", "a.b.example.org", False),
    ("*.example.org", "example.org", False),
    ("*.org", "example.org", False),
    ("MAIL.example.org", "mail.example.org.", True),
    ("mail.example.org", "mx.example.org", False),
])
def test_certificate_name_matching(pattern, hostname, matches):
    assert doctor._name_matches(hostname, pattern) is matches


def test_wildcard_certificate_expiring_soon_and_expired(tmp_path):
    _, config = make_config(tmp_path, cert_names=("*.example.org",),
                            not_after=datetime.datetime(2025, 2, 1, tzinfo=UTC))
    findings = doctor.check_certificate(config.tls, HOST, NOW)
    assert text_of(findings) == [
        "OK tls name: the certificate covers mail.example.org",
        "WARN tls expiry: expires on 2025-02-01, in 17 days: renew it",
        "OK tls issuer: issued by CN=mailgw test CA",
    ]
    later = doctor.check_certificate(config.tls, HOST, datetime.datetime(2025, 3, 1, tzinfo=UTC))
    assert later[1].lines()[0] == "FAIL tls expiry: expired on 2025-02-01"


def test_certificate_without_san_uses_the_common_name(tmp_path):
    _, config = make_config(tmp_path, cert_names=(HOST,), san=False)
    assert doctor.check_certificate(config.tls, HOST, NOW)[0].level == "OK"


def test_the_generated_certificate_not_made_yet_is_a_warning(tmp_path):
    data = tmp_path / "data"
    path = tmp_path / "mailgw.toml"
    path.write_text(f'[server]\nhostname = "{HOST}"\ndata_dir = "{data}"\nlocal_domains = ["example.org"]\n')
    config = load(path)
    assert config.tls.generated
    findings = doctor.check_certificate(config.tls, HOST, NOW)
    assert [f.level for f in findings] == ["WARN"]
    assert findings[0].verdict.startswith("no certificate yet: a self-signed one for mail.example.org")


# -- SPF lookup counting and record text ---------------------------------------------------------

def test_spf_lookup_count_follows_includes_and_redirects_once():
    resolver = FakeResolver({
        ("a.example", "TXT"): ["v=spf1 include:b.example a mx/24 ptr exists:%{i}.x.example ip4:192.0.2.1 -all"],
        ("b.example", "TXT"): ["v=spf1 redirect=c.example"],
        ("c.example", "TXT"): ["v=spf1 include:a.example a:d.example ?all"],   # a loop back to a.example
    })
    mail_dns = MailDNS(resolver, clock=task.Clock())
    record = "v=spf1 include:b.example a mx/24 ptr exists:%{i}.x.example ip4:192.0.2.1 -all"
    # a.example: include, a, mx, ptr, exists = 5; b: redirect = 1; c: include, a = 2 (a.example not followed again).
    assert result_of(doctor.count_spf_lookups(mail_dns, record, seen=frozenset({"a.example"}))) == 8
    # redirect= is ignored when the record has "all" (RFC 7208 §6.1).
    assert result_of(doctor.count_spf_lookups(mail_dns, "v=spf1 redirect=c.example -all")) == 0


def test_txt_record_splits_at_255_octets():
    assert doctor.txt_record("example.org", "v=spf1 -all") == ('example.org. IN TXT "v=spf1 -all"',)
    lines = doctor.txt_record("x.example", "a" * 300)
    assert lines == ("x.example. IN TXT (", '    "' + "a" * 255 + '"', '    "' + "a" * 45 + '"', ")")


# -- the command, against a real DNS server on 127.0.0.1 -------------------------------------------

class ZoneAuthority(common.ResolverBase):
    """Authoritative for everything: the zone's names, else NXDOMAIN."""

    types = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR}

    def __init__(self, zone):
        super().__init__()
        self.zone = {}
        for (name, kind), values in zone.items():
            self.zone.setdefault(name.lower(), {})[kind] = values

    def _lookup(self, name, cls, type_code, timeout=None):
        text = name.decode().rstrip(".").lower()
        if text not in self.zone:
            return defer.fail(error.AuthoritativeDomainError(text))
        kind = next((k for k, code in self.types.items() if code == type_code), None)
        answers = [self._record(text, kind, value) for value in self.zone[text].get(kind, ())]
        return defer.succeed((answers, [], []))

    @staticmethod
    def _record(name, kind, value):
        if kind == "A":
            payload = dns.Record_A(value, ttl=60)
        elif kind == "AAAA":
            payload = dns.Record_AAAA(value, ttl=60)
        elif kind == "MX":
            payload = dns.Record_MX(value[0], value[1].encode(), ttl=60)
        elif kind == "TXT":
            strings = [value] if isinstance(value, str) else value
            payload = dns.Record_TXT(*(s.encode() for s in strings), ttl=60)
        else:
            payload = dns.Record_PTR(value.encode(), ttl=60)
        return dns.RRHeader(name.encode(), payload.TYPE, dns.IN, 60, payload, auth=True)


def serve(reactor, zone) -> int:
    factory = server.DNSServerFactory(authorities=[ZoneAuthority(zone)])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    return port.getHost().port


def test_doctor_main_against_a_real_dns_server(tmp_path, capsys):
    # Certificates dated around today: the command uses the real time.
    today = datetime.datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    path, config = make_config(tmp_path, not_before=today - datetime.timedelta(days=1),
                               not_after=today + datetime.timedelta(days=90))
    store = key_store(config, "example.org")
    reactor = SelectReactor()
    port = serve(reactor, good_zone(store))
    code = doctor.doctor_main(["--config", str(path), "--nameserver", f"127.0.0.1:{port}", "--timeout", "2"],
                              reactor=reactor)
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[:7] == GOOD[:7]
    assert out.splitlines()[7:] == ["OK tls name: the certificate covers mail.example.org",
                                    "OK tls expiry: valid until "
                                    f"{today + datetime.timedelta(days=90):%Y-%m-%d} (89 days)",
                                    "OK tls issuer: issued by CN=mailgw test CA"]
    assert code == 0


def test_doctor_main_for_one_domain_with_failures_exits_1(tmp_path, capsys):
    path, config = make_config(tmp_path, domains=("example.org", "example.net"))
    store = key_store(config, "example.org")
    reactor = SelectReactor()
    port = serve(reactor, good_zone(store))
    code = doctor.doctor_main(["example.org", "--config", str(path), "--nameserver", f"127.0.0.1:{port}",
                               "--outbound-ip", "203.0.113.7", "--timeout", "2"], reactor=reactor)
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert "FAIL ptr 203.0.113.7: no PTR record; ask the provider of 203.0.113.7 to publish" in lines
    assert not any("example.net" in line for line in lines)


def test_doctor_main_with_a_closed_port_says_dns_unreachable_quickly(tmp_path, capsys):
    path, _ = make_config(tmp_path)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    started = time.monotonic()
    code = doctor.doctor_main(["--config", str(path), "--nameserver", f"127.0.0.1:{port}", "--timeout", "1"],
                              reactor=SelectReactor())
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 1 and err == ""
    assert out.splitlines()[0] == f"FAIL dns: DNS unreachable (127.0.0.1:{port})"
    assert "Traceback" not in out
    assert elapsed < 5


@pytest.mark.parametrize("argv, message", [
    (["--outbound-ip", "not-an-ip"], "--outbound-ip"),
    (["--nameserver", "dns.example:53"], "--nameserver dns.example:53: must be an IP address"),
    (["--nameserver", "127.0.0.1:0"], "port must be 1-65535"),
    (["--timeout", "0"], "--timeout must be more than 0 seconds"),
    (["--bogus"], "unrecognized arguments"),
    (["a.example", "b.example"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert doctor.doctor_main(argv, reactor=SelectReactor()) == 2
    err = capsys.readouterr().err
    assert message in err and "usage: mailgw doctor" in err


def test_help_and_a_bad_config(tmp_path, capsys):
    assert doctor.doctor_main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: mailgw doctor")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nnope = 1\n")
    assert doctor.doctor_main(["--config", str(bad)], reactor=SelectReactor()) == 1
    assert "configuration error" in capsys.readouterr().err


def test_nameserver_parsing():
    assert doctor.parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
    assert doctor.parse_nameserver("192.0.2.53:5353") == ("192.0.2.53", 5353)
    assert doctor.parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    assert doctor.parse_nameserver("[2001:db8::53]:5353") == ("2001:db8::53", 5353)


def test_keys_of_which_none_signs_are_a_warning(tmp_path):
    _, config = make_config(tmp_path)
    store = key_store(config, "example.org")
    store.keygen("example.org", selector="s2", algorithm="rsa", bits=1024, now=NOW)
    os.remove(os.path.join(store.directory, "example.org", "active"))     # keys copied in by hand
    store = DKIMKeyStore(config.dkim.keys_dir)
    assert [k.active for k in store.keys("example.org")] == [False, False]
    findings = {f.name: f for f in result_of(run(config, {(HOST, "A"): ["192.0.2.10"]}, store=store))}
    assert findings["dkim example.org"].lines() == [
        "WARN dkim example.org: 2 keys (s1, s2) but none signs; publish one, then activate it",
        "    mailgw dkim activate example.org s1"]
    assert findings["dkim keys"].level == "WARN"       # the store's own problem line, passed on


# -- rspamd ------------------------------------------------------------------------------------

class FakePinger:
    """RspamdClient.ping: url -> "pong", other text, or an exception."""

    def __init__(self, answers):
        self.answers = answers

    def ping(self, url=None):
        from mailgw.spam.rspamd import RspamdUnavailable
        answer = self.answers.get(url, RspamdUnavailable("Connection was refused by other side: 111"))
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)


def test_rspamd_is_asked_only_when_configured_and_each_worker_is_named(tmp_path):
    _, config = make_config(tmp_path, extra='[spam]\nrspamd_url = "http://127.0.0.1:11333"\n'
                                          'controller_url = "http://127.0.0.1:11334"\n')
    store = key_store(config, "example.org")
    pinger = FakePinger({"http://127.0.0.1:11333": "pong", "http://127.0.0.1:11334": "<html>nginx</html>"})
    findings = text_of(result_of(doctor.run_checks(
        config, MailDNS(FakeResolver(good_zone(store)), clock=task.Clock(), timeout=5.0), clock=task.Clock(),
        key_store=store, now=NOW, rspamd=pinger)))
    assert "OK rspamd: http://127.0.0.1:11333 answers" in findings
    assert ("FAIL rspamd controller: http://127.0.0.1:11334/ping answered '<html>nginx</html>', not 'pong': "
            "is it rspamd?") in findings
    down = text_of(result_of(doctor.check_rspamd(config, FakePinger({}))))
    assert down[0] == "FAIL rspamd: http://127.0.0.1:11333: Connection was refused by other side: 111"
    (tmp_path / "plain").mkdir()
    _, plain = make_config(tmp_path / "plain")
    assert result_of(doctor.check_rspamd(plain, pinger)) == []
