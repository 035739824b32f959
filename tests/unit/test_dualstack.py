"""The IPv6 twin of wildcard listeners (mailgw/dualstack.py)."""
from __future__ import annotations

import errno
import socket

import pytest

from mailgw import dualstack


@pytest.mark.parametrize("description, port", [
    ("tcp:25", 25), ("tcp:port=587", 587), ("tcp:2525:backlog=100", 2525),
    ("tcp:25:interface=127.0.0.1", None), ("tcp:interface=0.0.0.0:port=25", None),
    ("tcp6:25", None), ("ssl:465:privateKey=k.pem", None), ("unix:/run/x.sock", None),
])
def test_only_tcp_endpoints_without_an_address_are_wildcards(description, port):
    assert dualstack.wildcard_port(description) == port


class FakeReactor:
    def __init__(self):
        self.adopted = []

    def adoptStreamPort(self, fd, family, factory):
        self.adopted.append((family, factory))
        port = FakePort()
        return port


class FakePort:
    def getHost(self):
        class Address:
            host, port = "::", 2525
        return Address()


def failing_socket(number):
    def make(port):
        raise OSError(number, "test")
    return make


def test_a_host_without_ipv6_stays_ipv4_only(monkeypatch):
    monkeypatch.setattr(dualstack, "ipv6_socket", failing_socket(errno.EAFNOSUPPORT))
    reactor = FakeReactor()
    service = dualstack.IPv6ListenerService(reactor, 2525, object(), "relay")
    assert service.port is None and reactor.adopted == []


def test_a_taken_ipv6_port_ends_the_start_with_one_line(monkeypatch):
    monkeypatch.setattr(dualstack, "ipv6_socket", failing_socket(errno.EADDRINUSE))
    with pytest.raises(SystemExit) as exited:
        dualstack.IPv6ListenerService(FakeReactor(), 2525, object(), "relay")
    assert "cannot listen on [::]:2525 (relay)" in str(exited.value)


def test_the_ipv6_socket_is_ipv6_only():
    try:
        sock = dualstack.ipv6_socket(0)
    except OSError as error:
        pytest.skip(f"no IPv6 here: {error}")
    with sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getblocking() is False
