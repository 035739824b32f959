"""A real DNS server on 127.0.0.1 (twisted.names, UDP and TCP) for the
end-to-end tests: the mailgw under test asks it for SPF, DKIM, DMARC, PTR
and MX records, so no test depends on this machine's resolver or the
internet.

It is authoritative for every name: what the zone file lists is answered,
anything else is NXDOMAIN at once. The zone is a JSON file, re-read when it
changes (tests replace it atomically), of the form

    {"example.org": {"TXT": ["v=spf1 -all", ["two", "strings"]],
                     "MX": [[10, "mx.example.org"]], "A": ["192.0.2.1"]},
     "1.0.0.127.in-addr.arpa": {"PTR": ["mx.example.org"]},
     "slow.example": {"TXT": "SERVFAIL"}}

Run: python dns_server.py ZONE.json PORTFILE  (writes the UDP port it bound,
the TCP port is the same, then serves until killed).
"""
from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server

TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR, "CNAME": dns.CNAME}


class ZoneFileAuthority(common.ResolverBase):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._stamp = None
        self._zone: dict = {}

    def _current(self) -> dict:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return {}
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            with open(self.path, encoding="utf-8") as zone_file:
                self._zone = {name.rstrip(".").lower(): records for name, records in json.load(zone_file).items()}
            self._stamp = stamp
        return self._zone

    def _lookup(self, name, cls, type_code, timeout=None):
        text = name.decode("ascii", "replace").rstrip(".").lower()
        zone = self._current()
        if text not in zone:
            return defer.fail(error.AuthoritativeDomainError(text))
        records = zone[text]
        wanted = [key for key, code in TYPES.items() if code == type_code]
        values = records.get(wanted[0]) if wanted else None
        if values == "SERVFAIL":
            return defer.fail(RuntimeError(f"SERVFAIL for {text}"))   # not a DomainError: SERVFAIL on the wire
        if values is None and "CNAME" in records and type_code != dns.CNAME:
            answers = [_record(text, "CNAME", records["CNAME"][0])]
            return defer.succeed((answers, [], []))
        answers = [_record(text, wanted[0], value) for value in values or ()]
        return defer.succeed((answers, [], []))


def _record(name: str, kind: str, value) -> dns.RRHeader:
    if kind == "A":
        payload = dns.Record_A(value, ttl=60)
    elif kind == "AAAA":
        payload = dns.Record_AAAA(value, ttl=60)
    elif kind == "MX":
        payload = dns.Record_MX(value[0], value[1].encode(), ttl=60)
    elif kind == "TXT":
        strings = [value] if isinstance(value, str) else value
        payload = dns.Record_TXT(*(s.encode() for s in strings), ttl=60)
    elif kind == "PTR":
        payload = dns.Record_PTR(value.encode(), ttl=60)
    else:
        payload = dns.Record_CNAME(value.encode(), ttl=60)
    return dns.RRHeader(name.encode(), payload.TYPE, dns.IN, 60, payload, auth=True)


def main(zone_path: str, port_file: str) -> None:
    factory = server.DNSServerFactory(authorities=[ZoneFileAuthority(zone_path)])
    factory.noisy = False
    # The same port number for UDP and TCP (one nameserver address for the
    # client); the UDP port is free, the TCP one may not be: try again.
    for _ in range(50):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")
            break
        except CannotListenError:
            udp.stopListening()
    else:
        raise SystemExit("dns_server: no port free for both UDP and TCP")
    with open(port_file + ".tmp", "w") as out:
        out.write(str(port))
    os.rename(port_file + ".tmp", port_file)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
