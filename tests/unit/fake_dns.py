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
    answers NOERROR with no data. Names are matched case-insensitively."""

    def __init__(self, zones=None):
        self.zones = {(name.rstrip(".").lower(), rtype): value for (name, rtype), value in (zones or {}).items()}
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
                return defer.succeed(([_rr(name, "CNAME", cname[0])], [], []))
            if name not in self._names():
                return defer.fail(error.DNSNameError(name))
            return defer.succeed(([], [], []))
        return defer.succeed(([_rr(name, rtype, v) for v in value], [], []))

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


def _rr(name: str, rtype: str, value):
    if rtype == "MX":
        preference, exchange = value
        payload = dns.Record_MX(preference, exchange.encode())
        return dns.RRHeader(name.encode(), dns.MX, payload=payload)
    if rtype == "A":
        return dns.RRHeader(name.encode(), dns.A, payload=dns.Record_A(value))
    if rtype == "AAAA":
        return dns.RRHeader(name.encode(), dns.AAAA, payload=dns.Record_AAAA(value))
    if rtype == "CNAME":
        return dns.RRHeader(name.encode(), dns.CNAME, payload=dns.Record_CNAME(value.encode()))
    if rtype == "TXT":
        strings = [value] if isinstance(value, (str, bytes)) else list(value)
        data = [s.encode() if isinstance(s, str) else s for s in strings]
        return dns.RRHeader(name.encode(), dns.TXT, payload=dns.Record_TXT(*data))
    if rtype == "PTR":
        return dns.RRHeader(name.encode(), dns.PTR, payload=dns.Record_PTR(value.encode()))
    raise ValueError(rtype)


class Sequence:
    """An injectable `random` whose shuffle reverses (deterministic, and not the identity)."""

    def __init__(self):
        self.shuffled = []

    def shuffle(self, items):
        items.reverse()
        self.shuffled.append(list(items))
