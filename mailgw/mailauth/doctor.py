"""`mailgw doctor [DOMAIN]`: what an admin must check before going live, from
this server's configuration and the public DNS.

One line per check, `OK|WARN|FAIL <check>: <verdict>`, and under a failure
the exact record to publish (indented, zone-file syntax):

    address   the hostname ([server] hostname, our HELO name) has A/AAAA records,
              and every outbound address (--outbound-ip) is one of them
    ptr       each outbound address has a PTR record naming the hostname, and the
              hostname leads back to the address (FCrDNS, as receivers check it)
    mx        each local domain's MX is the hostname, or a name with its addresses
    spf       one "v=spf1" TXT record that passes for every outbound address,
              within 10 DNS lookups (RFC 7208 §4.6.4)
    dkim      every active key on disk (`mailgw dkim keygen`) is published with
              the same public key at <selector>._domainkey.<domain>
    dmarc     _dmarc.<domain> has a v=DMARC1 record with a policy that acts
    tls       the configured certificate covers the hostname, is valid for three
              more weeks and is not self-signed
    rspamd    ([spam] rspamd_url / controller_url set) each answers /ping with "pong"

When the DNS does not answer at all, one `FAIL dns: DNS unreachable (...)` line
replaces the DNS checks. Exit 0 without FAIL, 1 with one, 2 on usage errors.

`run_checks` is the whole logic over an injected MailDNS, clock and key store
(the tests use a fake resolver and task.Clock); `doctor_main` only builds the
real twisted.names resolver and runs the reactor.
"""
from __future__ import annotations

import datetime
import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.python.failure import Failure

from mailgw.admin_cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, AdminError, Parser, UsageError, load_config
from mailgw.mailauth.dns import DEFAULT_TIMEOUT, TempDNSError, reverse_name

OK, WARN, FAIL = "OK", "WARN", "FAIL"

# RFC 7208 §4.6.4: at most 10 terms that cause DNS queries, includes and redirects followed.
SPF_LOOKUP_LIMIT = 10
SPF_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists")
CERT_WARN_DAYS = 21
SPF_BUDGET = 20.0            # seconds one SPF evaluation may take
TXT_STRING_MAX = 255         # RFC 1035 §3.3: one character-string is at most 255 octets

USAGE = """usage: mailgw doctor [DOMAIN] [--config PATH] [--nameserver HOST[:PORT]]...
                     [--outbound-ip IP...] [--timeout SECONDS]

Checks what must be right before this server goes live, for every local
domain (or only DOMAIN): the hostname's A/AAAA records, the PTR of each
outbound address (FCrDNS to the HELO name), MX, SPF (and its 10-lookup limit),
DKIM (the keys in the key store are published), DMARC, the TLS
certificate and, when [spam] names it, that rspamd answers. One line per check, OK, WARN or FAIL; under each FAIL the record
to publish.

  --nameserver HOST[:PORT]   ask this server (repeatable; default: [dns]
                             nameservers, else /etc/resolv.conf)
  --outbound-ip IP           the address(es) mail leaves from (default: the
                             hostname's own A/AAAA records)
  --timeout SECONDS          per DNS query (default: [dns] timeout, 5)

Exit 0 when nothing FAILs, 1 otherwise, 2 on usage errors.
"""

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class Finding:
    level: str                   # OK | WARN | FAIL
    name: str                    # "mx example.org"
    verdict: str
    fix: tuple[str, ...] = ()    # the record(s) to publish, printed indented below

    def lines(self) -> list[str]:
        return [f"{self.level} {self.name}: {self.verdict}"] + ["    " + line for line in self.fix]


# -- zone-file text -----------------------------------------------------------------------

def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def txt_record(name: str, text: str, *, strings: list[str] | None = None) -> tuple[str, ...]:
    """The zone-file lines of a TXT record, split into strings of at most 255
    octets (RFC 1035 §3.3; RFC 6376 §3.6.2.2 joins them again for DKIM), or
    into the `strings` given."""
    data = text.encode("utf-8")
    chunks = strings or [data[i:i + TXT_STRING_MAX].decode("utf-8", "replace")
                         for i in range(0, len(data), TXT_STRING_MAX)] or [""]
    if len(chunks) == 1:
        return (f"{name}. IN TXT {_quoted(chunks[0])}",)
    return (f"{name}. IN TXT (",) + tuple("    " + _quoted(chunk) for chunk in chunks) + (")",)


def _address_record(name: str, ip: str) -> str:
    kind = "A" if ipaddress.ip_address(ip).version == 4 else "AAAA"
    return f"{name}. IN {kind} {ip}"


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _ip_set(addresses) -> set:
    found = set()
    for text in addresses:
        try:
            found.add(ipaddress.ip_address(text))
        except ValueError:
            pass
    return found


def _tags(record: str) -> dict[str, str]:
    """Tag=value; lists (RFC 6376 §3.2, RFC 7489 §6.4): names lower case, values stripped."""
    tags = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _text(record: bytes) -> str:
    return record.decode("utf-8", "replace")


def _dns_problem(failure: Failure) -> str:
    return f"DNS lookup failed: {failure.getErrorMessage()}"


# -- SPF lookups -----------------------------------------------------------------------------

def spf_records(records: list[bytes]) -> list[str]:
    """The TXT strings that are SPF records (RFC 7208 §4.5: "v=spf1" then a space or the end)."""
    found = []
    for record in records:
        text = _text(record)
        if text.lower() == "v=spf1" or text.lower().startswith("v=spf1 "):
            found.append(text)
    return found


def _spf_terms(record: str) -> list[str]:
    return record.split()[1:]


def _spf_target(term: str) -> tuple[str, str | None]:
    """(mechanism or modifier name, its domain-spec or None) of one SPF term, qualifier removed."""
    term = term.lstrip("+-~?")
    if "=" in term and (":" not in term or term.index("=") < term.index(":")):
        name, _, value = term.partition("=")
        return name.lower(), value
    name, _, value = term.partition(":")
    name = name.split("/", 1)[0].lower()
    return name, (value.split("/", 1)[0] if value else None)


@defer.inlineCallbacks
def count_spf_lookups(mail_dns, record: str, *, seen: frozenset = frozenset(), depth: int = 0):
    """Deferred[int]: the terms of `record` that cost a DNS lookup (RFC 7208
    §4.6.4: include, a, mx, ptr, exists, redirect), the records behind
    include: and redirect= counted too. A domain-spec with macros is counted
    but not followed; a loop or a missing record is counted once."""
    terms = [_spf_target(term) for term in _spf_terms(record)]
    has_all = any(name == "all" for name, _ in terms)
    total = 0
    for name, target in terms:
        if name in SPF_LOOKUP_TERMS or (name == "redirect" and not has_all):
            total += 1
        if name not in ("include", "redirect") or not target or (name == "redirect" and has_all):
            continue
        target = target.rstrip(".").lower()
        if "%" in target or target in seen or depth >= SPF_LOOKUP_LIMIT or total > SPF_LOOKUP_LIMIT:
            continue
        found = spf_records((yield mail_dns.txt(target)))
        if len(found) == 1:
            total += yield count_spf_lookups(mail_dns, found[0], seen=seen | {target}, depth=depth + 1)
    return total


def _spf_term_for(ips: list[str], explicit: bool) -> str:
    if not explicit or not ips:
        return "mx"
    return " ".join(("ip4:" if ipaddress.ip_address(ip).version == 4 else "ip6:") + ip for ip in ips)


# -- certificate ------------------------------------------------------------------------------

def _name_matches(hostname: str, pattern: str) -> bool:
    """A wildcard stands for exactly one whole left-most label, as TLS clients match it."""
    hostname, pattern = hostname.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = hostname.partition(".")
        return bool(label) and rest == pattern[2:] and "." in rest
    return hostname == pattern


def check_certificate(tls, hostname: str, now: datetime.datetime) -> list[Finding]:
    """The [tls] certificate: for the hostname, in date, not self-signed."""
    get_one = (f"get a certificate for {hostname} (e.g. certbot certonly -d {hostname})",
               "and set [tls] certificate and private_key to its files")
    if tls is None:
        return [Finding(FAIL, "tls", "no [tls] configuration")]
    path = Path(tls.certificate)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if tls.generated:
            return [Finding(WARN, "tls", f"no certificate yet: a self-signed one for {hostname} is made "
                                         "on first start, and clients that verify refuse it", get_one)]
        return [Finding(FAIL, "tls", f"{path}: no such file", get_one)]
    except OSError as error:
        return [Finding(FAIL, "tls", f"{path}: cannot read: {error.strerror}")]
    from cryptography import x509

    chain = _PEM_CERT.findall(data)
    try:
        certificate = x509.load_pem_x509_certificate(chain[0]) if chain else None
    except ValueError:
        certificate = None
    if certificate is None:
        return [Finding(FAIL, "tls", f"{path}: no valid PEM certificate")]
    findings = []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        # The CN only when there is no subjectAltName (what TLS clients still accept).
        names = [attribute.value for attribute in
                 certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    if any(_name_matches(hostname, name) for name in names):
        findings.append(Finding(OK, "tls name", f"the certificate covers {hostname}"))
    else:
        findings.append(Finding(FAIL, "tls name", f"the certificate is for {', '.join(names) or 'no name'}, "
                                                  f"not {hostname}", get_one))
    before, after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    days = (after - now).days
    if now > after:
        findings.append(Finding(FAIL, "tls expiry", f"expired on {after:%Y-%m-%d}", get_one))
    elif now < before:
        findings.append(Finding(FAIL, "tls expiry", f"not valid before {before:%Y-%m-%d %H:%M} UTC"))
    elif after - now < datetime.timedelta(days=CERT_WARN_DAYS):
        findings.append(Finding(WARN, "tls expiry", f"expires on {after:%Y-%m-%d}, in {days} days: renew it"))
    else:
        findings.append(Finding(OK, "tls expiry", f"valid until {after:%Y-%m-%d} ({days} days)"))
    if certificate.issuer == certificate.subject:
        findings.append(Finding(WARN, "tls issuer", "self-signed: senders and clients that verify refuse it",
                                get_one))
    else:
        findings.append(Finding(OK, "tls issuer", f"issued by {certificate.issuer.rfc4514_string()}"))
    return findings


# -- the checks --------------------------------------------------------------------------------

class _Doctor:
    def __init__(self, config, mail_dns, *, clock, key_store, outbound_ips, now):
        self.config = config
        self.dns = mail_dns
        self.clock = clock
        self.key_store = key_store
        self.host = config.hostname.rstrip(".").lower()
        self.explicit_ips = bool(outbound_ips)
        self.outbound_ips = [str(ipaddress.ip_address(ip)) for ip in outbound_ips or ()]
        self.now = now
        self.host_addresses: list[str] | None = None     # None: the lookup failed

    # server-wide ----------------------------------------------------------------------
    def check_addresses(self, result) -> list[Finding]:
        name = f"address {self.host}"
        if isinstance(result, Failure):
            return [Finding(FAIL, name, _dns_problem(result))]
        if not result:
            fix = tuple(_address_record(self.host, ip) for ip in self.outbound_ips) or (
                f"{self.host}. IN A <this server's public IPv4 address>",)
            return [Finding(FAIL, name, "no A or AAAA record", fix)]
        listed = ", ".join(result)
        known = _ip_set(result)
        missing = [ip for ip in self.outbound_ips if ipaddress.ip_address(ip) not in known]
        if missing:
            return [Finding(FAIL, name, f"{listed}; the outbound address {', '.join(missing)} is not among "
                                        "them (receivers check the HELO name leads to the sender)",
                            tuple(_address_record(self.host, ip) for ip in missing))]
        return [Finding(OK, name, listed)]

    @defer.inlineCallbacks
    def check_ptr(self, ip: str):
        name = f"ptr {ip}"
        record = (f"{reverse_name(ip)}. IN PTR {self.host}.",)
        names = yield self.dns.ptr(ip)
        if not names:
            return [Finding(FAIL, name, f"no PTR record; ask the provider of {ip} to publish", record)]
        if self.host not in names:
            return [Finding(FAIL, name, f"PTR is {', '.join(names)}, not {self.host} (the HELO name); "
                                        f"ask the provider of {ip} to publish", record)]
        forward = yield self.dns.query(self.host, "A" if ipaddress.ip_address(ip).version == 4 else "AAAA")
        if not any(_same_ip(ip, address) for address in forward):
            return [Finding(FAIL, name, f"{self.host}, but {self.host} does not lead back to {ip}",
                            (_address_record(self.host, ip),))]
        return [Finding(OK, name, f"{self.host}, forward-confirmed")]

    # per domain -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def check_mx(self, domain: str, result):
        name = f"mx {domain}"
        fix = (f"{domain}. IN MX 10 {self.host}.",)
        if isinstance(result, Failure):
            return [Finding(FAIL, name, _dns_problem(result))]
        records = sorted(result)
        if not records:
            return [Finding(FAIL, name, "no MX record", fix)]
        if all(exchange in ("", ".") for _, exchange in records):
            return [Finding(FAIL, name, "null MX: the domain says it accepts no mail (RFC 7505)", fix)]
        listed = ", ".join(f"{preference} {exchange}" for preference, exchange in records)
        if any(exchange == self.host for _, exchange in records):
            return [Finding(OK, name, listed)]
        ours = _ip_set(self.host_addresses or ())
        problems = []
        if ours:
            for _, exchange in records:
                try:
                    addresses = yield self.dns.addresses(exchange)
                except TempDNSError as error:
                    problems.append(str(error))
                    continue
                if _ip_set(addresses) == ours:
                    return [Finding(OK, name, f"{listed} ({exchange} has the addresses of {self.host})")]
        if problems:
            return [Finding(FAIL, name, f"{listed}; DNS lookup failed: {'; '.join(problems)}")]
        return [Finding(FAIL, name, f"{listed}: not {self.host}, nor a name with its addresses", fix)]

    @defer.inlineCallbacks
    def check_spf(self, domain: str):
        name = f"spf {domain}"
        ips = self.outbound_ips or list(self.host_addresses or ())
        ours = _spf_term_for(ips, self.explicit_ips)
        fresh = txt_record(domain, f"v=spf1 {ours} -all")
        found = spf_records((yield self.dns.txt(domain)))
        if not found:
            return [Finding(FAIL, name, "no SPF record", fresh)]
        if len(found) > 1:
            return [Finding(FAIL, name, f"{len(found)} SPF records, receivers see permerror (RFC 7208 §4.5); "
                                        "publish only one", fresh)]
        record = found[0]
        lookups = yield count_spf_lookups(self.dns, record, seen=frozenset({domain}))
        counted = f"{lookups} of {SPF_LOOKUP_LIMIT} lookups"
        if lookups > SPF_LOOKUP_LIMIT:
            return [Finding(FAIL, name, f"{counted}: receivers see permerror (RFC 7208 §4.6.4)", fresh)]
        if not ips:
            return [Finding(WARN, name, f"not evaluated: no outbound address known; {counted}")]
        failed = []
        for ip in ips:
            verdict = yield self._evaluate_spf(domain, ip)
            if verdict is not None:
                failed.append(f"{verdict} for {ip}")
        if failed:
            rest = " ".join(_spf_terms(record))
            return [Finding(FAIL, name, f"{'; '.join(failed)}; {counted}",
                            txt_record(domain, f"v=spf1 {ours} {rest}".rstrip()))]
        if any(_spf_target(term) == ("all", None) and term[:1] in ("+", "a") for term in _spf_terms(record)):
            return [Finding(WARN, name, f"pass for {', '.join(ips)}, but +all lets anyone send as {domain}; "
                                        f"{counted}", fresh)]
        return [Finding(OK, name, f"pass for {', '.join(ips)}; {counted}")]

    @defer.inlineCallbacks
    def _evaluate_spf(self, domain: str, ip: str):
        """None when the record passes `ip`, else the result (and explanation)."""
        from mailgw.mailauth import spf

        result = yield spf.check_spf(self.dns, ip=ip, sender="postmaster@" + domain, helo=self.host,
                                     receiver=self.host, clock=self.clock, budget=SPF_BUDGET)
        if result.result == "pass":
            return None
        if result.result in ("temperror", "permerror") and result.smtp_comment:
            return f"{result.result} ({result.smtp_comment})"
        return result.result

    @defer.inlineCallbacks
    def check_dkim(self, domain: str):
        if self.key_store is None:
            return [Finding(WARN, f"dkim {domain}", "no DKIM key store configured")]
        try:
            every = self.key_store.keys(domain)
        except (OSError, ValueError) as error:
            return [Finding(FAIL, f"dkim {domain}", f"cannot read the DKIM keys: {error}")]
        keys = [key for key in every if key.active]
        if every and not keys:
            return [Finding(WARN, f"dkim {domain}", f"{len(every)} keys ({', '.join(k.selector for k in every)}) "
                                                    "but none signs; publish one, then activate it",
                            (f"mailgw dkim activate {domain} {every[0].selector}",))]
        if not keys:
            return [Finding(WARN, f"dkim {domain}", "no DKIM key; make one, then publish the record it prints",
                            (f"mailgw dkim keygen {domain}",))]
        from mailgw.mailauth.keys import txt_strings

        findings = []
        for key in keys:
            name = f"dkim {key.dns_name}"
            # Split as `mailgw dkim keygen` prints it: the tags, then p= in 255-octet strings.
            fix = txt_record(key.dns_name, key.dns_record, strings=txt_strings(key.dns_record))
            wanted = "".join(key.public_key_b64.split())
            published = [_tags(_text(record)) for record in (yield self.dns.txt(key.dns_name))]
            published = [tags for tags in published if tags.get("v", "DKIM1") == "DKIM1" and "p" in tags]
            keys_there = ["".join(tags["p"].split()) for tags in published]
            if wanted in keys_there:
                findings.append(Finding(OK, name, f"published, matches the {key.algorithm} key on disk"))
            elif not published:
                findings.append(Finding(FAIL, name, "no DKIM record", fix))
            elif keys_there == [""]:
                findings.append(Finding(FAIL, name, "the record is revoked (empty p=)", fix))
            else:
                findings.append(Finding(FAIL, name, "the record has another public key (stale)", fix))
        return findings

    @defer.inlineCallbacks
    def check_dmarc(self, domain: str):
        name = f"dmarc {domain}"
        owner = f"_dmarc.{domain}"
        fix = txt_record(owner, f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}")
        records = [_text(record) for record in (yield self.dns.txt(owner))]
        # RFC 7489 §6.6.3: records not starting with v=DMARC1 are discarded.
        records = [record for record in records if re.match(r"v\s*=\s*DMARC1\s*(;|$)", record)]
        if not records:
            return [Finding(FAIL, name, "no DMARC record", fix)]
        if len(records) > 1:
            return [Finding(FAIL, name, f"{len(records)} DMARC records: receivers use none (RFC 7489 §6.6.3)",
                            fix)]
        tags = _tags(records[0])
        policy = tags.get("p", "").lower()
        reports = f", rua={tags['rua']}" if tags.get("rua") else ""
        if policy == "none":
            return [Finding(WARN, name, f"p=none{reports}: receivers only report, they act on no failure", fix)]
        if policy in ("quarantine", "reject"):
            return [Finding(OK, name, f"p={policy}{reports}")]
        return [Finding(FAIL, name, f"p={policy or '(missing)'} is no policy (RFC 7489 §6.3)", fix)]


def _guarded(name: str, d: defer.Deferred) -> defer.Deferred:
    """A check's Deferred that always gives findings: a DNS failure or a bug is a FAIL line, not a traceback."""
    def failed(failure):
        if failure.check(TempDNSError, defer.TimeoutError):
            return [Finding(FAIL, name, _dns_problem(failure))]
        return [Finding(FAIL, name, f"check failed: {failure.type.__name__}: {failure.getErrorMessage()}")]
    return d.addErrback(failed)


def _temporary(result) -> bool:
    return isinstance(result, Failure) and result.check(TempDNSError, defer.TimeoutError) is not None


def check_rspamd(config, client) -> defer.Deferred:
    """Deferred[list[Finding]]: does each configured rspamd worker answer?"""
    spam = config.spam
    wanted = []
    if spam is not None and spam.rspamd_url:
        wanted.append(("rspamd", spam.rspamd_url))
    if spam is not None and spam.controller_url and spam.learn:
        wanted.append(("rspamd controller", spam.controller_url))
    if not wanted:
        return defer.succeed([])
    if client is None:
        return defer.succeed([Finding(FAIL, name, "no rspamd client") for name, _ in wanted])

    def pinged(answer, name, url):
        if answer == "pong":
            return Finding(OK, name, f"{url} answers")
        return Finding(FAIL, name, f"{url}/ping answered {answer[:60]!r}, not 'pong': is it rspamd?")

    def failed(failure, name, url):
        return Finding(FAIL, name, f"{url}: {failure.getErrorMessage()}")
    return defer.gatherResults([
        client.ping(url).addCallbacks(pinged, failed, callbackArgs=(name, url), errbackArgs=(name, url))
        for name, url in wanted])


@defer.inlineCallbacks
def run_checks(config, mail_dns, *, clock, key_store, outbound_ips=(), domains=None, now=None,
               nameserver: str = "the system resolver", rspamd=None):
    """Deferred[list[Finding]] for every check, in print order."""
    # Asked first, and at once: rspamd is on our side, the DNS may be slow.
    rspamd_findings = check_rspamd(config, rspamd)
    findings = yield _checks_of_dns(config, mail_dns, clock=clock, key_store=key_store, outbound_ips=outbound_ips,
                                    domains=domains, now=now, nameserver=nameserver)
    return findings + (yield rspamd_findings)


@defer.inlineCallbacks
def _checks_of_dns(config, mail_dns, *, clock, key_store, outbound_ips, domains, now, nameserver):
    now = now or datetime.datetime.now(datetime.timezone.utc)
    domains = [d.rstrip(".").lower() for d in (domains or sorted(config.local_domains))]
    doctor = _Doctor(config, mail_dns, clock=clock, key_store=key_store, outbound_ips=outbound_ips, now=now)
    findings: list[Finding] = []
    for domain in domains:
        if domain not in config.local_domains:
            findings.append(Finding(WARN, f"domain {domain}", "not one of [server] local_domains: "
                                                              "this server accepts no mail for it"))
    for problem in getattr(key_store, "problems", None) or ():
        findings.append(Finding(WARN, "dkim keys", problem))

    # The first queries tell whether there is a DNS at all.
    probes = [mail_dns.addresses(doctor.host)] + [mail_dns.query(domain, "MX") for domain in domains]
    answered = yield defer.DeferredList(probes, consumeErrors=True)
    results = [value for _, value in answered]
    if all(_temporary(result) for result in results):
        findings.append(Finding(FAIL, "dns", f"DNS unreachable ({nameserver})"))
        return findings + check_certificate(config.tls, doctor.host, now)
    host_result, mx_results = results[0], results[1:]
    doctor.host_addresses = None if isinstance(host_result, Failure) else host_result

    findings += doctor.check_addresses(host_result)
    ips = doctor.outbound_ips or list(doctor.host_addresses or ())
    started = [_guarded(f"ptr {ip}", defer.maybeDeferred(doctor.check_ptr, ip)) for ip in ips]
    if not ips:
        started.append(defer.succeed([Finding(WARN, "ptr", "no outbound address to check: the hostname has "
                                                           "none; give --outbound-ip")]))
    for domain, mx_result in zip(domains, mx_results):
        started += [
            _guarded(f"mx {domain}", defer.maybeDeferred(doctor.check_mx, domain, mx_result)),
            _guarded(f"spf {domain}", defer.maybeDeferred(doctor.check_spf, domain)),
            _guarded(f"dkim {domain}", defer.maybeDeferred(doctor.check_dkim, domain)),
            _guarded(f"dmarc {domain}", defer.maybeDeferred(doctor.check_dmarc, domain)),
        ]
    for found in (yield defer.gatherResults(started)):
        findings += found
    return findings + check_certificate(config.tls, doctor.host, now)


def exit_code(findings) -> int:
    return EXIT_ERROR if any(finding.level == FAIL for finding in findings) else EXIT_OK


# -- the command ---------------------------------------------------------------------------------

def parse_nameserver(text: str) -> tuple[str, int]:
    """"HOST", "HOST:PORT", "[V6]:PORT" or a bare IPv6 address -> (ip, port)."""
    host, port = text, 53
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise UsageError(f"--nameserver {text}: expected HOST[:PORT]")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise UsageError(f"--nameserver {text}: expected HOST[:PORT]")
        port = int(port_text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"--nameserver {text}: must be an IP address, optionally with :port") from None
    if not 0 < port < 65536:
        raise UsageError(f"--nameserver {text}: port must be 1-65535")
    return host, port


def _describe(servers) -> str:
    return ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in servers)


def _resolv_conf_servers(path: str = "/etc/resolv.conf") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as resolv:
            servers = [line.split()[1] for line in resolv if line.split()[:1] == ["nameserver"]
                       and len(line.split()) > 1]
    except OSError:
        servers = []
    return f"{path}: {', '.join(servers) or 'no nameserver'}"


def _parser():
    parser = Parser(prog="mailgw doctor", add_help=False)
    parser.add_argument("domain", nargs="?")
    parser.add_argument("--config", metavar="PATH")
    parser.add_argument("--nameserver", action="append", default=[], metavar="HOST[:PORT]")
    parser.add_argument("--outbound-ip", nargs="+", action="extend", default=[], metavar="IP")
    parser.add_argument("--timeout", type=float, metavar="SECONDS")
    return parser


def _run_on(reactor, function, *, install_signal_handlers: bool):
    """Run `function()` (a Deferred) on `reactor` until it fires; its result,
    or None when the reactor stopped first (Ctrl-C)."""
    outcome = []

    def start():
        d = defer.maybeDeferred(function)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=install_signal_handlers)
    return outcome[0] if outcome else None


def doctor_main(argv: list[str], *, reactor=None) -> int:
    """`mailgw doctor ...`; `reactor` for tests (a fresh one each: a reactor runs once)."""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help", "help") or "--help" in argv or "-h" in argv:
        print(USAGE, end="")
        return EXIT_OK
    try:
        args = _parser().parse_args(argv)
        servers = [parse_nameserver(text) for text in args.nameserver]
        try:
            outbound = [str(ipaddress.ip_address(ip)) for ip in args.outbound_ip]
        except ValueError as error:
            raise UsageError(f"--outbound-ip: {error}") from None
        if args.timeout is not None and not args.timeout > 0:
            raise UsageError("--timeout must be more than 0 seconds")
        domain = args.domain.rstrip(".").lower() if args.domain else None
        if args.domain is not None and not domain:
            raise UsageError("DOMAIN must not be empty")
    except UsageError as error:
        print(f"mailgw doctor: {error}\n\n{USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
    except AdminError as error:
        print(f"mailgw doctor: {error}", file=sys.stderr)
        return EXIT_ERROR

    install_signal_handlers = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    from twisted.names import client

    from mailgw.mailauth.dns import MailDNS

    dns_config = config.dns
    if not servers and dns_config is not None and dns_config.nameservers:
        servers = list(dns_config.nameservers)
    timeout = args.timeout or (dns_config.timeout if dns_config is not None else DEFAULT_TIMEOUT)
    # client.Resolver, not createResolver: the public DNS is the question, not /etc/hosts.
    if servers:
        resolver = client.Resolver(servers=servers, reactor=reactor)
        nameserver = _describe(servers)
    else:
        resolver = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
        nameserver = _resolv_conf_servers()
    mail_dns = MailDNS(resolver, clock=reactor, timeout=timeout)
    key_store = _key_store(config)

    from mailgw.mailauth.stages import build_rspamd
    rspamd = build_rspamd(config, reactor)

    def checks():
        return run_checks(config, mail_dns, clock=reactor, key_store=key_store, outbound_ips=outbound,
                          domains=[domain] if domain else None, nameserver=nameserver, rspamd=rspamd)
    findings = _run_on(reactor, checks, install_signal_handlers=install_signal_handlers)
    if findings is None:
        print("mailgw doctor: interrupted", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(findings, Failure):
        print(f"mailgw doctor: {findings.type.__name__}: {findings.getErrorMessage()}", file=sys.stderr)
        return EXIT_ERROR
    for finding in findings:
        print("\n".join(finding.lines()))
    return exit_code(findings)


def _key_store(config):
    from mailgw.mailauth.keys import DKIMKeyStore

    keys_dir = config.dkim.keys_dir if config.dkim is not None else Path(config.data_dir) / "dkim"
    return DKIMKeyStore(str(keys_dir))


if __name__ == "__main__":
    sys.exit(doctor_main(sys.argv[1:]))
