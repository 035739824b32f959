"""What mailgw/twisted_wall.py relies on in Twisted's internals is still there.

This is the test that fails loudly on a Twisted upgrade that renamed or
removed one of them (docs/twisted.md §9), before anything subtle breaks: a
send that silently stops being immediate, or a worker that no longer
accepts exclusively."""
from __future__ import annotations

import re
import select
import socket
import types
from pathlib import Path

import pytest
import twisted
from twisted.internet import epollreactor, tcp
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactor

from mailgw import twisted_wall

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server():
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    port = types.SimpleNamespace(_realPortNumber=25, _type="TCP")
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 4000), port, 1, MemoryReactor())
    yield transport
    ours.close()
    peer.close()


def test_a_connection_still_has_the_write_buffer_send_now_reads(server):
    cls, names = twisted_wall.RELIED_ON["send_now"]
    assert isinstance(server, cls)
    missing = [name for name in names if not hasattr(server, name)]
    assert missing == [], f"Twisted {twisted.__version__} has no {missing} on tcp.Server: see docs/twisted.md §9"
    # The buffer's meaning, not only its names: empty means offset at its end.
    assert len(server.dataBuffer) == server.offset and not server._tempDataBuffer
    server.write(b"queued")
    assert bytes(server.dataBuffer[server.offset:]) + b"".join(server._tempDataBuffer) == b"queued"


def test_the_http_pool_still_builds_its_factories_from_factory():
    from twisted.internet import task
    from twisted.internet.protocol import Factory
    from twisted.web.client import HTTPConnectionPool

    cls, names = twisted_wall.RELIED_ON["quiet_http_pool"]
    assert cls is HTTPConnectionPool and all(hasattr(cls, name) for name in names)
    assert issubclass(HTTPConnectionPool._factory, Factory)
    pool = twisted_wall.quiet_http_pool(task.Clock(), max_per_host=7)
    assert pool.maxPersistentPerHost == 7 and pool.persistent
    assert issubclass(pool._factory, HTTPConnectionPool._factory) and pool._factory.noisy is False


def test_a_listening_port_still_has_its_socket_and_reader_switch():
    reactor = epollreactor.EPollReactor()
    try:
        port = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        cls, names = twisted_wall.RELIED_ON["listening_family"]
        assert isinstance(port, cls) and all(hasattr(port, name) for name in names)
        assert twisted_wall.listening_family(port) == socket.AF_INET
        assert all(hasattr(port, name) for name in twisted_wall.RELIED_ON["stop_accepting"][1])
        assert port.fileno() in reactor._reads
        twisted_wall.stop_accepting(port)
        assert port.fileno() not in reactor._reads           # bound, but not accepted on here
        port.startReading()
        assert twisted_wall.accept_exclusively(reactor, port) is (hasattr(select, "EPOLLEXCLUSIVE"))
        port.stopListening()
    finally:
        reactor._poller.close()


def test_the_epoll_reactor_still_has_its_poller_and_reader_set():
    reactor = epollreactor.EPollReactor()
    try:
        assert isinstance(reactor._poller, select.epoll)
        assert isinstance(reactor._reads, (set, dict))
    finally:
        reactor._poller.close()


def test_the_installed_twisted_is_in_the_pinned_range():
    pin = re.search(r'"twisted\[tls\]>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins Twisted with >=low,<high"

    def version(text):
        return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())
    low, high = version(pin.group(1)), version(pin.group(2))
    assert low <= version(twisted.__version__) < high


def test_no_other_module_reads_twisted_internals():
    """The wall is the only place: no `_tempDataBuffer`, `dataBuffer`,
    `_poller`, `_reads` or `stopReading()` on a port elsewhere in mailgw/."""
    pattern = re.compile(r"_tempDataBuffer|\.dataBuffer|\._poller|\._reads\b|port\.stopReading|port\.socket\b")
    offenders = []
    for path in (ROOT / "mailgw").rglob("*.py"):
        if path.name == "twisted_wall.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
