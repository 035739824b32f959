"""Where mail for a domain goes: MX lookup (RFC 5321 §5.1, RFC 7505) and addresses.

Plain Twisted Deferreds over an injected `twisted.internet.interfaces.IResolver`
(`lookupMailExchange`, `lookupAddress`, `lookupIPV6Address`, each a Deferred of
(answers, authority, additional) lists of `dns.RRHeader`).

Failures are `DNSFailure` (enhanced code, text, permanent flag):

    NXDOMAIN for the domain           permanent 5.1.2
    Null MX (RFC 7505 §3)             permanent 5.1.10
    SERVFAIL, timeout, refused, ...   temporary 4.4.3
"""
from __future__ import annotations

import ipaddress
import random as random_module
import socket

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error

log = Logger()

MAX_CNAME_CHAIN = 5      # CNAMEs we chase when a resolver gives a CNAME without its target's records


class DNSFailure(Exception):
    """A DNS answer that stops delivery to a domain or host, as a queue verdict."""

    def __init__(self, enhanced: str, text: str, permanent: bool):
        super().__init__(f"{enhanced} {text}")
        self.enhanced = enhanced
        self.text = text
        self.permanent = permanent

    @property
    def code(self) -> int:
        """The reply code this verdict corresponds to (no remote server said it)."""
        return 550 if self.permanent else 451


def null_mx() -> DNSFailure:
    return DNSFailure("5.1.10", "Recipient address has null MX", True)      # RFC 7505 §4.1


def _not_found(domain: str) -> DNSFailure:
    return DNSFailure("5.1.2", f"Domain {domain} not found", True)          # RFC 3463 X.1.2


def _temporary(what: str) -> DNSFailure:
    return DNSFailure("4.4.3", f"Temporary DNS failure looking up {what}", False)   # RFC 3463 X.4.3


def _is_nxdomain(failure) -> bool:
    # AuthoritativeDomainError: what twisted.names' own authorities raise for "no such name".
    return failure.check(error.DNSNameError, error.AuthoritativeDomainError) is not None


def address_literal(domain: str) -> str | None:
    """RFC 5321 §4.1.3: "[192.0.2.1]" or "[IPv6:2001:db8::1]" -> the address;
    None for a domain name. ValueError for a malformed literal."""
    if not domain.startswith("["):
        return None
    if not domain.endswith("]"):
        raise ValueError(f"malformed address literal {domain!r}")
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        return str(ipaddress.IPv6Address(inner[5:]))
    return str(ipaddress.IPv4Address(inner))


def _ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _name(name) -> str:
    text = name.name.decode("ascii", "replace") if isinstance(name, dns.Name) else str(name)
    return text.rstrip(".").lower()


def resolve_mx(resolver, domain: str, *, random=random_module) -> defer.Deferred:
    """Deferred[list[str]]: the MX host names for `domain`, lowest preference
    first, equal preferences in random order (RFC 5321 §5.1), duplicates
    dropped. No MX records: [domain] (the implicit MX). Fails with DNSFailure."""
    d = defer.maybeDeferred(resolver.lookupMailExchange, domain)

    def answered(result):
        answers = result[0]
        records = [rr.payload for rr in answers if rr.type == dns.MX]
        if not records:
            # RFC 5321 §5.1: no MX -> the domain itself is the implicit MX.
            return [domain.lower().rstrip(".")]
        # RFC 7505 §3: a Null MX has exchange "." (root: b"" on the wire).
        real = [r for r in records if _name(r.name) != ""]
        if not real:
            raise null_mx()
        if len(real) < len(records):
            log.info("{domain}: ignoring a Null MX published next to other MX records", domain=domain)
        by_preference: dict[int, list[str]] = {}
        for record in real:
            by_preference.setdefault(record.preference, []).append(_name(record.name))
        hosts: list[str] = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            random.shuffle(group)
            hosts.extend(host for host in group if host not in hosts)
        return hosts

    def failed(failure):
        if failure.check(DNSFailure):
            return failure
        if _is_nxdomain(failure):
            raise _not_found(domain)
        log.info("MX lookup for {domain} failed: {why}", domain=domain, why=failure.getErrorMessage())
        raise _temporary(f"the mail exchanger of {domain}")

    d.addCallback(answered)
    d.addErrback(failed)
    return d


def _lookup(method, host: str, record_type: int, depth: int = 0) -> defer.Deferred:
    """Deferred[list[str]] of A or AAAA addresses for `host`, chasing CNAMEs."""
    d = defer.maybeDeferred(method, host)

    def answered(result):
        addresses = []
        cnames = []
        for rr in result[0]:
            if rr.type == record_type == dns.A:
                addresses.append(rr.payload.dottedQuad())
            elif rr.type == record_type == dns.AAAA:
                addresses.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
            elif rr.type == dns.CNAME:
                cnames.append(_name(rr.payload.name))
        if addresses or not cnames or depth >= MAX_CNAME_CHAIN:
            return addresses
        # The resolver gave the alias but not its target's records: follow it.
        return _lookup(method, cnames[-1], record_type, depth + 1)

    return d.addCallback(answered)


def resolve_addresses(resolver, host: str, *, prefer_ipv6: bool = False) -> defer.Deferred:
    """Deferred[list[str]]: IPv4 and IPv6 addresses of `host` (IPv4 first
    unless `prefer_ipv6`), [host] for an IP address, [] when the name has no
    address (NXDOMAIN or no data). Fails with a temporary DNSFailure when a
    lookup failed and the other gave nothing."""
    literal = _ip(host)
    if literal is not None:
        return defer.succeed([literal])
    lookups = [_lookup(resolver.lookupAddress, host, dns.A),
               _lookup(resolver.lookupIPV6Address, host, dns.AAAA)]
    if prefer_ipv6:
        lookups.reverse()

    def combine(results):
        addresses: list[str] = []
        temporary = False
        for ok, value in results:
            if ok:
                addresses.extend(a for a in value if a not in addresses)
            elif not _is_nxdomain(value):
                log.info("address lookup for {host} failed: {why}", host=host, why=value.getErrorMessage())
                temporary = True
        if not addresses and temporary:
            raise _temporary(f"the address of {host}")
        return addresses

    return defer.DeferredList(lookups, consumeErrors=True).addCallback(combine)
