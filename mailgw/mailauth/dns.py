"""The DNS every authentication stage asks: one `MailDNS` over the injected
twisted.names resolver (`twisted.internet.interfaces.IResolver`), so nothing
blocks the reactor and tests answer from a fake.

Answers are plain values, in the shapes pyspf's DNS hook uses:

    "TXT"   list[list[bytes]]   each record's character-strings, in order
    "A"     list[str]           dotted quads
    "AAAA"  list[str]           compressed IPv6 text
    "MX"    list[(int, str)]    (preference, exchange)
    "PTR"   list[str]           names, no trailing dot, lower case

NXDOMAIN and "no records of that type" are both `[]` (RFC 7208 §4.6.4 counts
them alike as void lookups). A server failure, refusal or timeout is
`TempDNSError`: every check turns it into its own temperror. Each query has a
time budget on the injected clock, whatever the resolver's own retries.
"""
from __future__ import annotations

import ipaddress
import socket

from twisted.internet import defer
from twisted.names import dns, error

from mailgw import metrics as metrics_module

DEFAULT_TIMEOUT = 5.0

_LOOKUPS = {
    "TXT": ("lookupText", dns.TXT),
    "A": ("lookupAddress", dns.A),
    "AAAA": ("lookupIPV6Address", dns.AAAA),
    "MX": ("lookupMailExchange", dns.MX),
    "PTR": ("lookupPointer", dns.PTR),
}


class TempDNSError(Exception):
    """The DNS could not answer now (SERVFAIL, refused, timeout)."""


def _name(name) -> str:
    text = name.name.decode("ascii", "replace") if isinstance(name, dns.Name) else str(name)
    return text.rstrip(".").lower()


def _value(rtype: str, payload):
    if rtype == "TXT":
        return [bytes(part) for part in payload.data]
    if rtype == "A":
        return payload.dottedQuad()
    if rtype == "AAAA":
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    if rtype == "MX":
        return (payload.preference, _name(payload.name))
    return _name(payload.name)          # PTR


def reverse_name(ip: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address (RFC 1035 §3.5, RFC 3596 §2.5)."""
    return ipaddress.ip_address(ip).reverse_pointer


class MailDNS:
    """`query(name, rtype)` -> Deferred of the values above; `txt(name)` ->
    Deferred[list[bytes]] with each record's strings joined (DKIM, DMARC)."""

    def __init__(self, resolver, *, clock, timeout: float = DEFAULT_TIMEOUT, metrics=None):
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.queries = 0                 # for tests and metrics
        # mailgw_dns_query_seconds{type}, mailgw_dns_query_errors_total{type}
        self.metrics = metrics_module.registry_or_default(metrics)

    def query(self, name: str, rtype: str, *, timeout: float | None = None) -> defer.Deferred:
        return self._lookup(name, rtype, timeout).addCallback(lambda found: found[0])

    def query_ttl(self, name: str, rtype: str, *, timeout: float | None = None,
                  negative_ttl: float = 300.0) -> defer.Deferred:
        """`query` with how long its answer may be kept: Deferred[(values, ttl)].

        ttl is the smallest TTL of the answer's records. For NXDOMAIN or no
        records it is the negative TTL of the SOA the server put in the
        authority section, when there is one: twisted.names.client raises
        DNSNameError with the whole `dns.Message` as its argument, and a
        NOERROR answer carries its authority section. Other resolvers (a
        zone file's AuthoritativeDomainError, a hosts file) give only the
        name: then `negative_ttl`. Errors are mapped as by `query`."""
        def with_ttl(found):
            values, answers, authority = found
            if values:
                return values, min(rr.ttl for rr in answers)
            # RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM).
            limits = [min(rr.ttl, rr.payload.minimum) for rr in authority if rr.type == dns.SOA]
            return values, min(limits) if limits else negative_ttl
        return self._lookup(name, rtype, timeout).addCallback(with_ttl)

    def _lookup(self, name: str, rtype: str, timeout: float | None) -> defer.Deferred:
        """One query for `query` and `query_ttl`: Deferred[(values, answer RRs,
        authority RRs)], NXDOMAIN as no values, any other failure TempDNSError."""
        method_name, type_code = _LOOKUPS[rtype]
        budget = self.timeout if timeout is None else timeout
        name = name.rstrip(".")
        self.queries += 1
        try:
            d = defer.maybeDeferred(getattr(self.resolver, method_name), name, timeout=(budget,))
        except Exception as failure:       # noqa: BLE001 - a broken resolver is a temporary failure
            return defer.fail(TempDNSError(f"{rtype} {name}: {failure}"))
        d.addTimeout(budget, self.clock)

        def answered(result):
            answers, authority = list(result[0]), list(result[1])
            values = [_value(rtype, rr.payload) for rr in answers if rr.type == type_code]
            # A CNAME on the way bounds the answer's lifetime too: every answer RR counts.
            return values, answers, authority

        def failed(failure):
            if failure.check(error.DNSNameError, error.AuthoritativeDomainError):
                message = failure.value.args[0] if failure.value.args else None
                return [], [], list(message.authority) if isinstance(message, dns.Message) else []
            self.metrics.inc(metrics_module.DNS_ERRORS, rtype)
            raise TempDNSError(f"{rtype} {name}: {failure.getErrorMessage() or failure.type.__name__}")
        started = self.clock.seconds()

        def timed(result):
            self.metrics.observe(metrics_module.DNS_QUERY_SECONDS, self.clock.seconds() - started, rtype)
            return result
        return d.addBoth(timed).addCallbacks(answered, failed)

    def txt(self, name: str, *, timeout: float | None = None) -> defer.Deferred:
        d = self.query(name, "TXT", timeout=timeout)
        return d.addCallback(lambda records: [b"".join(parts) for parts in records])

    def ptr(self, ip: str, *, timeout: float | None = None) -> defer.Deferred:
        return self.query(reverse_name(ip), "PTR", timeout=timeout)

    def addresses(self, name: str, *, timeout: float | None = None) -> defer.Deferred:
        """A and AAAA together; a temporary failure of either is one."""
        d = defer.gatherResults([self.query(name, "A", timeout=timeout),
                                 self.query(name, "AAAA", timeout=timeout)], consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure)
        return d.addCallback(lambda both: both[0] + both[1])


def forward_confirmed_name(mail_dns: MailDNS, ip: str, *, max_names: int = 10) -> defer.Deferred:
    """FCrDNS (Postfix's "verified" client name): Deferred[(name | None, verified)].
    The PTR names of `ip` whose own A/AAAA records lead back to `ip`; the
    first such name and True, or the first PTR name and False, or (None,
    False) when there is no PTR. TempDNSError when the DNS cannot say."""
    address = ipaddress.ip_address(ip)

    def got_names(names):
        if not names:
            return (None, False)
        names = names[:max_names]
        checks = [mail_dns.query(n, "A" if address.version == 4 else "AAAA") for n in names]
        d = defer.gatherResults(checks, consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure)

        def compare(answers):
            for name, found in zip(names, answers):
                if any(ipaddress.ip_address(a) == address for a in found):
                    return (name, True)
            return (names[0], False)
        return d.addCallback(compare)
    return mail_dns.ptr(ip).addCallback(got_names)
