"""DNS blocklists, in Postfix postscreen's model (postscreen_dnsbl_sites,
postscreen_dnsbl_threshold).

A site is written "zone[=filter][*weight]" (`parse_site`):

    zen.spamhaus.org                      listed on any answer, weight 1
    bl.spamcop.net*2                      weight 2
    zen.spamhaus.org=127.0.0.[2..11]*3    only these answers count
    b.example.net=127.0.0.[2;4;10]        a list of values for one octet
    list.dnswl.org=127.0.[0..255].[1..3]*-5   an allow list: a negative weight

The same zone may appear several times with different filters; it is asked
once and every site whose filter matches adds its weight.

`DNSBLChecker.check(ip)` asks every zone at once within one time budget and
adds up the weights of the sites that list the client; the client is refused
when the sum reaches the threshold. A zone that does not answer in time, or
answers with a temporary error, counts 0: DNS trouble never refuses anybody.
Verdicts are cached per address for the smallest TTL of the answers (clamped
to [min_ttl, max_ttl]), and concurrent checks of one address share one set
of queries.
"""
from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass, replace

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.mailauth.dns import TempDNSError
from mailgw.smtp.codes import DNSBL_BLOCKED

SYNTAX = "zone[=filter][*weight], e.g. zen.spamhaus.org=127.0.0.[2..11]*3"

# RFC 1035 §2.3.4: a name is at most 253 characters in text form. The longest
# query name is an IPv6 address's 32 nibble labels (64 characters) before the zone.
MAX_ZONE = 253 - 64
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_WEIGHT = re.compile(r"[+-]?\d{1,6}")
_OCTET = r"(\d+|\[[^\[\]]*\])"
_FILTER = re.compile(r"\.".join([_OCTET] * 4))
_RANGE = re.compile(r"(\d+)\.\.(\d+)")

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; the zones named
# in the reply stop here (the rest of the text is under 100).
_MAX_LISTS_TEXT = 300

# What a zone's query came to.
_ANSWERED, _TIMED_OUT, _FAILED = "answered", "timed out", "failed"


def parse_zone(text: str) -> str:
    """A blocklist zone, lower case and without a trailing dot; ValueError says why not."""
    if not isinstance(text, str):
        raise ValueError(f"zone must be text, not {type(text).__name__}")
    # ASCII before lower(): "\u212a".lower() == "k".
    if not text.isascii():
        raise ValueError(f"zone {text!r}: only ASCII (write international names in their xn-- form)")
    zone = text.lower()
    if zone.endswith("."):
        zone = zone[:-1]
    if not zone:
        raise ValueError(f"missing zone: expected {SYNTAX}")
    if len(zone) > MAX_ZONE:
        raise ValueError(f"zone {text!r} is longer than {MAX_ZONE} characters "
                         "(with an IPv6 address in front of it, a query name must fit in 253)")
    labels = zone.split(".")
    if len(labels) < 2:
        raise ValueError(f"zone {text!r}: expected a DNS zone of two or more labels, such as zen.spamhaus.org")
    for label in labels:
        if not label:
            raise ValueError(f"zone {text!r}: empty label")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"zone {text!r}: label {label!r} may contain only a-z 0-9 and inner '-', "
                             "at most 63 characters")
    # RFC 3696 §2: an all-numeric top-level label is no domain (this is an address).
    if labels[-1].isdigit():
        raise ValueError(f"zone {text!r}: the last label is all digits, which is an address, not a zone")
    return zone


@dataclass(frozen=True)
class AddressPattern:
    """postscreen's answer filter d.d.d.d: each octet a number or a bracketed
    list of numbers and ranges, "127.0.0.[2..11]", "127.0.0.[2;4;10]"."""
    text: str
    octets: tuple[tuple[tuple[int, int], ...], ...]    # per octet, (low, high) ranges

    def matches(self, answer: str) -> bool:
        try:
            values = ipaddress.IPv4Address(answer).packed
        except ValueError:
            return False
        return all(any(low <= value <= high for low, high in ranges) for value, ranges in zip(values, self.octets))


def parse_filter(text: str) -> AddressPattern:
    """An answer filter (`AddressPattern`); ValueError says why not."""
    match = _FILTER.fullmatch(text)
    if match is None:
        raise ValueError(f"answer filter {text!r}: expected four octets d.d.d.d, each a number or "
                         "[n;n..m], e.g. 127.0.0.[2..11]")
    octets = []
    for octet in match.groups():
        items = octet[1:-1].split(";") if octet.startswith("[") else [octet]
        ranges = []
        for item in items:
            if not item:
                raise ValueError(f"answer filter {text!r}: empty item in {octet}")
            found = _RANGE.fullmatch(item)
            if found is None and not item.isdigit():
                raise ValueError(f"answer filter {text!r}: {item!r} is neither a number nor a range n..m")
            low, high = (int(found.group(1)), int(found.group(2))) if found else (int(item), int(item))
            for number in (low, high):
                if number > 255:
                    raise ValueError(f"answer filter {text!r}: {number} is over 255")
            if low > high:
                raise ValueError(f"answer filter {text!r}: range {item} runs backwards")
            ranges.append((low, high))
        octets.append(tuple(ranges))
    return AddressPattern(text, tuple(octets))


@dataclass(frozen=True)
class DNSBLSite:
    """One entry of [spam] dnsbl_sites. `filter`: None (any answer lists), an
    `AddressPattern` (or its text), or a set of answer addresses."""
    zone: str
    weight: int = 1
    filter: AddressPattern | frozenset[str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "zone", parse_zone(self.zone))
        if isinstance(self.weight, bool) or not isinstance(self.weight, int):
            raise ValueError(f"weight must be a whole number, not {self.weight!r}")
        if isinstance(self.filter, str):
            object.__setattr__(self, "filter", parse_filter(self.filter))
        elif self.filter is not None and not isinstance(self.filter, AddressPattern):
            try:
                answers = frozenset(str(ipaddress.IPv4Address(answer)) for answer in self.filter)
            except ValueError as error:
                raise ValueError(f"answer filter of {self.zone}: {error}") from None
            if not answers:
                raise ValueError(f"answer filter of {self.zone}: no addresses (None: any answer)")
            object.__setattr__(self, "filter", answers)

    def matches(self, answers) -> bool:
        """Do these A answers of the zone list the client for this site?"""
        if self.filter is None:
            return bool(answers)
        if isinstance(self.filter, AddressPattern):
            return any(self.filter.matches(answer) for answer in answers)
        return any(answer in self.filter for answer in answers)


def parse_site(text: str) -> DNSBLSite:
    """One postscreen_dnsbl_sites entry, "zone[=filter][*weight]"; ValueError
    with a message for the operator (the config layer names the entry)."""
    if not isinstance(text, str):
        raise ValueError(f"expected text, {SYNTAX}")
    spec = text.strip()
    if not spec:
        raise ValueError(f"empty: expected {SYNTAX}")
    weight = 1
    if "*" in spec:
        spec, _, weight_text = spec.rpartition("*")
        if not _WEIGHT.fullmatch(weight_text):
            raise ValueError(f"weight {weight_text!r} after '*' is not a whole number such as 3 or -5")
        weight = int(weight_text)
    zone, equals, pattern = spec.partition("=")
    if equals and not pattern:
        raise ValueError("nothing after '=': expected an answer filter such as 127.0.0.[2..11]")
    return DNSBLSite(zone, weight, parse_filter(pattern) if equals else None)


def client_address(ip) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a client is looked up by: an IPv4-mapped IPv6 address
    (a dual-stack socket's view of an IPv4 client) is its IPv4 address."""
    address = ipaddress.ip_address(str(ip).split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def query_name(ip, zone: str) -> str:
    """The name to ask `zone` for an A record about `ip`."""
    address = client_address(ip)
    if address.version == 4:
        # RFC 5782 §2.1: the address's four octets in reverse order, then the zone.
        prefix = ".".join(reversed(str(address).split(".")))
    else:
        # RFC 5782 §2.4: the address's 32 nibbles, low-order first (as in ip6.arpa), then the zone.
        prefix = ".".join(reversed(address.exploded.replace(":", "")))
    return f"{prefix}.{zone}"


@dataclass(frozen=True)
class DNSBLVerdict:
    """What the blocklists say about one client."""
    ip: str
    score: int
    threshold: int
    refused: bool                               # score >= threshold
    listed: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (zone, its answers) of the zones that list ip
    timed_out: tuple[str, ...] = ()             # zones that did not answer within the budget (counted 0)
    allowed: bool = False                       # in allow_networks: nothing asked
    cached: bool = False                        # from the cache: nothing asked
    failed: tuple[str, ...] = ()                # zones that answered with a temporary error (counted 0)
    blocked_by: tuple[str, ...] = ()            # listing zones of positive weight, heaviest first

    def reply_text(self) -> str:
        """The text of the 554 5.7.1 refusal, in Postfix's words."""
        named = []
        for zone in self.blocked_by:
            if named and len(", ".join(named + [zone])) > _MAX_LISTS_TEXT:
                break
            named.append(zone)
        return DNSBL_BLOCKED.text.format(client=self.ip, lists=", ".join(named))


class DNSBLChecker:
    """`check(ip)` -> Deferred[DNSBLVerdict]; never fails on a DNS failure.

    Counters, for metrics: `queries` (zone queries sent), `timeouts` (of them,
    those that ran out of budget), `cache_hits` (verdicts from the cache),
    `listed` and `refused` (verdicts handed out that list, or refuse, the client)."""

    log = Logger()

    def __init__(self, mail_dns, *, sites, threshold: int, budget: float, clock, allow_networks=(),
                 cache_max: int = 10000, min_ttl: float = 60.0, max_ttl: float = 3600.0,
                 negative_ttl: float = 300.0):
        sites = tuple(sites)
        if not sites:
            raise ValueError("no DNSBL sites")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold must be a whole number of at least 1, not {threshold!r}")
        if not budget > 0:
            raise ValueError(f"budget must be more than 0 seconds, not {budget!r}")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"expected 0 <= min_ttl <= max_ttl, not {min_ttl!r} and {max_ttl!r}")
        self.mail_dns = mail_dns
        self.sites = sites
        self.threshold = threshold
        self.budget = budget
        self.clock = clock
        self.allow_networks = tuple(allow_networks)
        self.cache_max = cache_max
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._zones: dict[str, list[DNSBLSite]] = {}       # one query per zone, in the order written
        for site in sites:
            self._zones.setdefault(site.zone, []).append(site)
        self._cache: OrderedDict[str, tuple[float, DNSBLVerdict]] = OrderedDict()   # ip -> (expiry, verdict)
        self._in_flight: dict[str, list[defer.Deferred]] = {}                       # ip -> its waiters
        self.queries = 0
        self.cache_hits = 0
        self.listed = 0
        self.refused = 0
        self.timeouts = 0

    def check(self, ip) -> defer.Deferred:
        address = client_address(ip)
        key = str(address)
        if any(address in network for network in self.allow_networks):
            return defer.succeed(DNSBLVerdict(key, 0, self.threshold, False, allowed=True))
        entry = self._cache.get(key)
        if entry is not None:
            expiry, verdict = entry
            if self.clock.seconds() < expiry:
                self.cache_hits += 1
                return defer.succeed(self._hand_out(replace(verdict, cached=True)))
            del self._cache[key]
        waiters = self._in_flight.get(key)
        starting = waiters is None
        if starting:
            waiters = self._in_flight[key] = []
        # A caller that gives up (cancels) leaves the queries running for the others and the cache.
        waiter = defer.Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(waiter)
        if starting:
            # Appended first: the fake resolver of the tests answers at once.
            self._ask_all(address).addBoth(self._finish, key)
        return waiter

    # -- the queries of one address ----------------------------------------------
    def _ask_all(self, address) -> defer.Deferred:
        deadline = self.clock.seconds() + self.budget
        asked = [self._ask(zone, query_name(address, zone), deadline) for zone in self._zones]
        d = defer.gatherResults(asked, consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure)
        return d.addCallback(self._judge, str(address))

    def _ask(self, zone: str, name: str, deadline: float) -> defer.Deferred:
        """Deferred[(zone, state, answers, ttl)]; it fails only on a bug."""
        remaining = max(deadline - self.clock.seconds(), 0.0)
        self.queries += 1
        d = defer.maybeDeferred(self.mail_dns.query_ttl, name, "A", timeout=remaining,
                                negative_ttl=self.negative_ttl)
        # The budget is ours to keep, whatever mail_dns makes of its timeout:
        # the slow query is cancelled (its CancelledError ends below, logged nowhere).
        d.addTimeout(remaining, self.clock)

        def answered(found):
            answers, ttl = found
            return zone, _ANSWERED, tuple(answers), ttl

        def unanswered(failure):
            # mail_dns's own timeout is a TempDNSError too: one that comes at the
            # deadline is a zone that did not answer in time.
            if failure.check(defer.TimeoutError, defer.CancelledError) or (
                    failure.check(TempDNSError) and self.clock.seconds() >= deadline):
                self.timeouts += 1
                return zone, _TIMED_OUT, (), None
            if failure.check(TempDNSError):
                return zone, _FAILED, (), None
            return failure
        return d.addCallbacks(answered, unanswered)

    def _judge(self, outcomes, key: str) -> DNSBLVerdict:
        score = 0
        listed, weights, ttls = [], {}, []
        for zone, state, answers, ttl in outcomes:
            if state != _ANSWERED:
                continue
            ttls.append(ttl)
            matching = [site for site in self._zones[zone] if site.matches(answers)]
            if matching:
                weights[zone] = sum(site.weight for site in matching)
                score += weights[zone]
                listed.append((zone, answers))
        # Heaviest first; sorted() is stable, so equal weights keep the order written.
        blocked_by = tuple(zone for zone in sorted(weights, key=lambda zone: -weights[zone]) if weights[zone] > 0)
        verdict = DNSBLVerdict(
            key, score, self.threshold, score >= self.threshold, tuple(listed),
            timed_out=tuple(zone for zone, state, _, _ in outcomes if state == _TIMED_OUT),
            failed=tuple(zone for zone, state, _, _ in outcomes if state == _FAILED),
            blocked_by=blocked_by)
        if len(ttls) < len(outcomes):
            # A zone that did not answer is asked again soon, not after the others' TTLs.
            lifetime = self.min_ttl
        else:
            lifetime = min(max(min(ttls), self.min_ttl), self.max_ttl)
        self._remember(key, verdict, lifetime)
        return verdict

    def _remember(self, key: str, verdict: DNSBLVerdict, lifetime: float) -> None:
        if self.cache_max <= 0:
            return
        self._cache.pop(key, None)
        self._cache[key] = (self.clock.seconds() + lifetime, verdict)
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)         # the oldest entry

    def _finish(self, result, key: str) -> None:
        waiters = self._in_flight.pop(key, [])
        if not isinstance(result, DNSBLVerdict) and not waiters:
            # Nobody is left to hear of it (a waiter's caller logs it).
            self.log.failure("DNSBL check of {ip} failed", result, ip=key)
        for waiter in waiters:
            if isinstance(result, DNSBLVerdict):
                waiter.callback(self._hand_out(result))
            else:
                waiter.errback(result)
        return None

    def _hand_out(self, verdict: DNSBLVerdict) -> DNSBLVerdict:
        if verdict.listed:
            self.listed += 1
        if verdict.refused:
            self.refused += 1
        return verdict
