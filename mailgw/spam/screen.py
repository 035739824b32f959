"""The screen before the greeting (Postfix's postscreen model), for the
relay role and clients outside the trusted and allowed networks only.

1. DNS blocklists (mailgw.spam.dnsbl): a client whose listed weights reach
   the threshold gets "554 5.7.1 ... blocked using <zone>" instead of the
   greeting (RFC 5321 §3.1) and nothing else but QUIT.
2. The pregreet test: the greeting's first line ("220-"), then
   [spam] pregreet_wait seconds before the rest. A client that talks in that
   time has not waited for the greeting (RFC 5321 §3.1, §4.3.1: the client
   waits for the server's 220); spambots that blast their commands do.
   An address that passed is remembered for pregreet_pass_ttl and is greeted
   at once on its next connections.

The SMTP session (mailgw.smtp.server) drives this: it asks `blocklists`
first (its verdict decides the greeting's code), then whether `needs_pregreet`.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.spam.dnsbl import DNSBLChecker


class ConnectionScreen:
    """One per relay listener; `clock` is the injected clock."""

    log = Logger()

    def __init__(self, *, dnsbl: DNSBLChecker | None, pregreet_wait: float, pass_ttl: float, clock,
                 exempt=(), max_passes: int = 100_000):
        self.dnsbl = dnsbl
        self.pregreet_wait = pregreet_wait
        self.pass_ttl = pass_ttl
        self.clock = clock
        self.exempt = tuple(exempt)         # trusted and allowed networks: never screened
        self.max_passes = max_passes
        self._passed: OrderedDict = OrderedDict()     # ip text -> expiry
        # For metrics and tests.
        self.pregreet_refused = 0
        self.dnsbl_refused = 0

    def screens(self, ip) -> bool:
        address = ipaddress.ip_address(ip)
        return not any(address in network for network in self.exempt)

    def blocklists(self, ip: str) -> defer.Deferred:
        """Deferred[DNSBLVerdict | None]: None when no lists are configured.
        Never fails: a broken check lets the client through (and is logged)."""
        if self.dnsbl is None:
            return defer.succeed(None)

        def broken(failure):
            self.log.failure("DNSBL check of {ip} failed", failure, ip=ip)
            return None
        return defer.maybeDeferred(self.dnsbl.check, ip).addErrback(broken)

    def needs_pregreet(self, ip: str) -> bool:
        if self.pregreet_wait <= 0:
            return False
        expiry = self._passed.get(ip)
        if expiry is None:
            return True
        if expiry <= self.clock.seconds():
            del self._passed[ip]
            return True
        return False

    def passed(self, ip: str) -> None:
        """`ip` waited for the whole greeting: no test for pass_ttl."""
        if self.pass_ttl <= 0:
            return
        self._passed.pop(ip, None)
        self._passed[ip] = self.clock.seconds() + self.pass_ttl
        while len(self._passed) > self.max_passes:
            self._passed.popitem(last=False)

    def failed_pregreet(self, ip: str) -> None:
        self.pregreet_refused += 1
        self._passed.pop(ip, None)


def build_screen(config, *, mail_dns, clock) -> ConnectionScreen | None:
    """The screen of a relay listener ([spam]), or None when nothing is screened."""
    spam = config.spam
    if spam is None or not spam.screens:
        return None
    dnsbl = None
    if spam.dnsbl_sites and mail_dns is not None:
        dnsbl = DNSBLChecker(mail_dns, sites=spam.dnsbl_sites, threshold=spam.dnsbl_threshold,
                             budget=spam.dnsbl_budget, clock=clock, allow_networks=spam.allow_networks)
    return ConnectionScreen(dnsbl=dnsbl, pregreet_wait=spam.pregreet_wait, pass_ttl=spam.pregreet_pass_ttl,
                            clock=clock, exempt=tuple(config.trusted_networks) + tuple(spam.allow_networks))
