"""The IPv6 half of a wildcard listener.

Twisted's `tcp:25` binds 0.0.0.0 only, so `::1` and every IPv6 client were
refused though `trusted_networks` lists `::1/128`. A `tcp6:` wildcard
socket would take IPv4 too on Linux, with clients seen as `::ffff:a.b.c.d`,
which every address check would have to unmap; instead, as Postfix and Dovecot
do, each wildcard listener gets a second socket, `[::]:PORT` with IPV6_V6ONLY,
so each family is seen as itself. Where the host has no IPv6 (disabled, or a
container without it) the listener stays IPv4-only and says so once.
"""
from __future__ import annotations

import errno
import re
import socket

from twisted.logger import Logger

from mailgw.services import ListenerService, _cannot_listen

log = Logger()

# "tcp:25", "tcp:port=25", "tcp:25:backlog=100": no interface= means all addresses.
_TCP_PORT = re.compile(r"^tcp:(?:port=)?(\d+)(?::|$)")
# The host cannot do IPv6 at all: not an error of the configuration.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})
BACKLOG = 50     # Twisted's default for TCP endpoints


def wildcard_port(description: str) -> int | None:
    """The port of a `tcp:` endpoint that listens on every IPv4 address
    (no `interface=`), else None (explicit address, tcp6:, ssl:, unix:...)."""
    match = _TCP_PORT.match(description)
    if match is None or re.search(r"(^|:)interface=", description):
        return None
    return int(match.group(1))


def ipv6_socket(port: int) -> socket.socket:
    """A listening, non-blocking `[::]:port` socket for IPv6 only."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        # IPv4 stays with the tcp: listener on the same port.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as Twisted does for tcp:
        sock.bind(("::", port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class IPv6ListenerService(ListenerService):
    """The `[::]:PORT` twin of a wildcard `tcp:PORT` listener. `port` is None
    when the host has no IPv6; otherwise it behaves as ListenerService."""

    def __init__(self, reactor, port_number: int, factory, role: str):
        self.reactor = reactor
        self.description = f"[::]:{port_number}"
        self.factory = factory
        self.role = role
        self.port = None
        try:
            sock = ipv6_socket(port_number)
        except OSError as error:
            if error.errno in _NO_IPV6:
                log.info("no IPv6 on this host ({error}); {role} listens on IPv4 only",
                         error=error.strerror, role=role)
                return
            raise SystemExit(_cannot_listen(self.description, role, error)) from None
        try:
            self._listening(reactor.adoptStreamPort(sock.fileno(), socket.AF_INET6, factory))
        finally:
            sock.close()        # adoptStreamPort made its own copy
