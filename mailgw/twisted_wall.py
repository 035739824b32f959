"""Every use of Twisted's internals, behind one wall.

mailgw subclasses nothing of twisted.mail any more, but five things need
more than Twisted's public API; they live here, and only here, so that a
Twisted upgrade has one module to check. `tests/unit/test_twisted_wall.py`
fails loudly when the installed Twisted no longer has what these rely on,
and pyproject.toml pins Twisted to the release range they were checked
against (docs/twisted.md §9).

- `send_now`: FileDescriptor's write buffer (`dataBuffer`, `offset`,
  `_tempDataBuffer`), `TLS` and `socket` of tcp.Server/tcp.Client;
- `accept_exclusively`: the epoll reactor's `_poller` and `_reads`;
- `listening_family`: a listening port's `socket`;
- `stop_accepting`: `stopReading` on a listening port (it stays bound);
- `quiet_http_pool`: HTTPConnectionPool's `_factory` (the client factory class).
"""
from __future__ import annotations

import select

from twisted.internet import tcp
from twisted.web import client as web_client

_PLAIN_TCP = (tcp.Server, tcp.Client)

# What each function reads, checked by tests/unit/test_twisted_wall.py.
RELIED_ON = {
    "send_now": (tcp.Server, ("TLS", "connected", "disconnecting", "_tempDataBuffer", "dataBuffer",
                              "offset", "socket")),
    "listening_family": (tcp.Port, ("socket",)),
    "stop_accepting": (tcp.Port, ("stopReading", "startReading")),
    "quiet_http_pool": (web_client.HTTPConnectionPool, ("_factory",)),
}


def send_now(transport, data: bytes) -> None:
    """transport.write(data), but on a plain TCP connection (accepted or
    made by us) with nothing queued the bytes go to the socket at once.

    Twisted's write only queues: the send happens on the reactor's next turn,
    after two epoll_ctl calls (start and stop watching for writability). For
    a peer that sends one command and waits for its reply (POP3 RETR one by
    one, every SMTP round trip), that turn is most of our share of the round
    trip. What the kernel does not take now is queued as usual, behind
    nothing, so order is kept; with TLS, or anything already queued, it is a
    plain write."""
    if (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._tempDataBuffer
            and len(transport.dataBuffer) == transport.offset):
        try:
            sent = transport.socket.send(data)
        except OSError:     # EAGAIN, or an error the queued write will report
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def accept_exclusively(reactor, port) -> bool:
    """Let epoll wake only one of the processes waiting on a shared listening
    socket (EPOLLEXCLUSIVE, Linux 4.5) instead of every worker for every new
    connection, of which all but one find nothing to accept.

    Twisted registers a reader with plain EPOLLIN; a listening port is only
    ever a reader, so it is registered again here with the flag, and
    Twisted's own unregister on stopReading still applies. Returns False
    (and changes nothing) on other reactors or kernels."""
    poller = getattr(reactor, "_poller", None)
    flag = getattr(select, "EPOLLEXCLUSIVE", None)
    fd = port.fileno()
    if not isinstance(poller, select.epoll) or flag is None or fd not in getattr(reactor, "_reads", ()):
        return False
    poller.unregister(fd)
    try:
        poller.register(fd, select.EPOLLIN | flag)
    except OSError:
        poller.register(fd, select.EPOLLIN)
        return False
    return True


def listening_family(port) -> int:
    """The address family of a listening port (for adoptStreamPort in a worker)."""
    return port.socket.family


def stop_accepting(port) -> None:
    """Keep the port bound and listening but take no connections in this
    process (the SMTP workers accept on it instead)."""
    port.stopReading()


def quiet_http_pool(reactor, *, max_per_host: int):
    """A persistent HTTPConnectionPool whose connections log nothing.

    Twisted's client factory logs "Starting factory" and "Stopping factory"
    for every connection: two log lines per rspamd scan, since rspamd 3.4
    closes each connection after its answer. The pool builds its factories
    from the class in `_factory`; ours is the same class, not noisy."""
    class QuietFactory(web_client.HTTPConnectionPool._factory):
        noisy = False

    pool = web_client.HTTPConnectionPool(reactor, persistent=True)
    pool._factory = QuietFactory
    pool.maxPersistentPerHost = max_per_host
    return pool
