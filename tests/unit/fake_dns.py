"""An in-memory IResolver subset for MX/address tests: answers are
`dns.RRHeader` lists, exactly what twisted.names resolvers return."""
from __future__ import annotations

from twisted.internet import defer
from twisted.names import dns, error


HANG = object()


class FakeResolver:
    """`zones`: {(name, "MX"|"A"|"AAAA"|"CNAME"|"TXT"|"PTR"): value}, where value
    is a list of records (MX: (preference, exchange); A/AAAA: address strings;
    CNAME: [target]; TXT: a str, or a list of str for one record of several
    character-strings; PTR: names), an exception class/instance to fail with,
    or HANG (a query that never answers: the caller's time budget must end it).
    A name never mentioned is NXDOMAIN; a name mentioned for another type
    answers NOERROR with no data. Names are matched case-insensitively.

    TTLs: `ttls` {(name, rtype): seconds} for the records of that answer,
    `default_ttl` for the others. `soas` {zone: (soa_ttl, minimum)}: a
    negative answer for a name in that zone carries the zone's SOA in its
    authority section, and its NXDOMAIN is the DNSNameError(dns.Message)
    twisted.names.client raises; without it, DNSNameError(name)."""

    def __init__(self, zones=None, *, ttls=None, default_ttl: int = 0, soas=None):
        self.zones = {(name.rstrip(".").lower(), rtype): value for (name, rtype), value in (zones or {}).items()}
        self.ttls = {(name.rstrip(".").lower(), rtype): ttl for (name, rtype), ttl in (ttls or {}).items()}
        self.default_ttl = default_ttl
        self.soas = {zone.rstrip(".").lower(): limits for zone, limits in (soas or {}).items()}
        self.queries: list[tuple[str, str]] = []

    def _names(self):
        return {name for name, _ in self.zones}

    def _answer(self, name: str, rtype: str):
        name = name.rstrip(".").lower()
        self.queries.append((name, rtype))
        value = self.zones.get((name, rtype))
        if value is HANG:
            return defer.Deferred()
        if isinstance(value, type) and issubclass(value, Exception):
            return defer.fail(value())
        if isinstance(value, Exception):
            return defer.fail(value)
        if value is None:
            cname = self.zones.get((name, "CNAME"))
            if cname and rtype != "CNAME":
                return defer.succeed(([self._rr(name, "CNAME", cname[0])], [], []))
            authority = self._authority(name)
            if name not in self._names():
                if not authority:
                    return defer.fail(error.DNSNameError(name))
                message = dns.Message(rCode=dns.ENAME)
                message.authority = authority
                return defer.fail(error.DNSNameError(message))
            return defer.succeed(([], authority, []))
        return defer.succeed(([self._rr(name, rtype, v) for v in value], [], []))

    def _rr(self, name: str, rtype: str, value):
        return _rr(name, rtype, value, self.ttls.get((name, rtype), self.default_ttl))

    def _authority(self, name: str):
        """The SOA of the closest zone in `soas` that holds `name`, as a list."""
        labels = name.split(".")
        for start in range(len(labels)):
            zone = ".".join(labels[start:])
            if zone in self.soas:
                soa_ttl, minimum = self.soas[zone]
                soa = dns.Record_SOA(b"ns." + zone.encode(), b"hostmaster." + zone.encode(), minimum=minimum,
                                     ttl=soa_ttl)
                return [dns.RRHeader(zone.encode(), dns.SOA, ttl=soa_ttl, payload=soa)]
        return []

    def lookupMailExchange(self, name, timeout=None):
        return self._answer(name, "MX")

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, "A")

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, "AAAA")

    def lookupText(self, name, timeout=None):
        return self._answer(name, "TXT")

    def lookupPointer(self, name, timeout=None):
        return self._answer(name, "PTR")


def _rr(name: str, rtype: str, value, ttl: int = 0):
    if rtype == "MX":
        preference, exchange = value
        payload = dns.Record_MX(preference, exchange.encode())
        return dns.RRHeader(name.encode(), dns.MX, ttl=ttl, payload=payload)
    if rtype == "A":
        return dns.RRHeader(name.encode(), dns.A, ttl=ttl, payload=dns.Record_A(value))
    if rtype == "AAAA":
        return dns.RRHeader(name.encode(), dns.AAAA, ttl=ttl, payload=dns.Record_AAAA(value))
    if rtype == "CNAME":
        return dns.RRHeader(name.encode(), dns.CNAME, ttl=ttl, payload=dns.Record_CNAME(value.encode()))
    if rtype == "TXT":
        strings = [value] if isinstance(value, (str, bytes)) else list(value)
        data = [s.encode() if isinstance(s, str) else s for s in strings]
        return dns.RRHeader(name.encode(), dns.TXT, ttl=ttl, payload=dns.Record_TXT(*data))
    if rtype == "PTR":
        return dns.RRHeader(name.encode(), dns.PTR, ttl=ttl, payload=dns.Record_PTR(value.encode()))
    raise ValueError(rtype)


class Sequence:
    """An injectable `random` whose shuffle reverses (deterministic, and not the identity)."""

    def __init__(self):
        self.shuffled = []

    def shuffle(self, items):
        items.reverse()
        self.shuffled.append(list(items))
