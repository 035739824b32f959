"""twisted_wall.send_now: a reply goes to the socket at once when nothing is queued
before it, and is queued (in order) otherwise. A real tcp.Server over a
socketpair, with a MemoryReactor that never runs: anything that arrives at
the peer was sent without a reactor turn."""
from __future__ import annotations

import socket
import types

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport

from mailgw.twisted_wall import send_now


@pytest.fixture
def connection():
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.settimeout(5)
    reactor = MemoryReactor()
    port = types.SimpleNamespace(_realPortNumber=25, _type="TCP")
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 4000), port, 1, reactor)
    yield transport, peer, reactor
    ours.close()
    peer.close()


def queued(transport) -> bytes:
    return transport.dataBuffer[transport.offset:] + b"".join(transport._tempDataBuffer)


def test_with_nothing_queued_the_reply_is_on_the_socket_without_a_reactor_turn(connection):
    transport, peer, reactor = connection
    send_now(transport, b"+OK 12 octets\r\n")
    assert peer.recv(100) == b"+OK 12 octets\r\n"
    assert queued(transport) == b""
    assert transport not in reactor.writers        # no epoll_ctl to watch for writability


def test_behind_queued_data_it_is_queued_too_so_the_order_is_kept(connection):
    transport, peer, _ = connection
    transport.write(b"first\r\n")                  # waits for the reactor's turn
    send_now(transport, b"second\r\n")
    assert queued(transport) == b"first\r\nsecond\r\n"
    transport.doWrite()                            # the reactor's turn
    assert peer.recv(100) == b"first\r\nsecond\r\n"


def test_what_the_kernel_does_not_take_now_is_queued_in_order(connection):
    transport, peer, _ = connection
    big = bytes(range(256)) * 40_000               # ~10 MB: more than a socketpair buffers
    send_now(transport, big)
    rest = queued(transport)
    assert 0 < len(rest) < len(big)
    received = bytearray()
    while len(received) < len(big) - len(rest):
        received += peer.recv(1 << 20)
    assert bytes(received) + rest == big


def test_on_tls_or_a_non_tcp_transport_it_is_a_plain_write(connection):
    transport, peer, _ = connection
    transport.TLS = True                           # startTLS sets this; writes then go through TLS
    writes = []
    transport.protocol.write = writes.append
    send_now(transport, b"secret\r\n")
    assert writes == [b"secret\r\n"]
    transport.TLS = False
    string_transport = StringTransport()
    send_now(string_transport, b"+OK\r\n")
    assert string_transport.value() == b"+OK\r\n"


def test_after_loseConnection_nothing_is_sent_directly(connection):
    transport, peer, _ = connection
    transport.loseConnection()
    send_now(transport, b"late\r\n")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_a_connection_we_made_sends_at_once_too():
    # The outbound SMTP client's transport: a tcp.Client, connected by hand on
    # a reactor that never runs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    reactor = MemoryReactorClock()
    protocol = Protocol()
    connector = types.SimpleNamespace(buildProtocol=lambda addr: protocol,
                                      connectionFailed=lambda reason: None)
    transport = tcp.Client("127.0.0.1", listener.getsockname()[1], None, connector, reactor)
    reactor.advance(0)              # resolve, start connecting
    transport.doConnect()           # loopback: connected by now
    peer, _ = listener.accept()
    peer.settimeout(5)
    try:
        assert protocol.transport is transport and transport.connected
        send_now(transport, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        assert peer.recv(200) == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        assert queued(transport) == b"" and transport not in reactor.writers
    finally:
        transport.socket.close()
        peer.close()
        listener.close()
