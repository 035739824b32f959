"""mailgw/sd_notify.py against a real AF_UNIX datagram socket as $NOTIFY_SOCKET."""
from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest
from twisted.application import service

from mailgw import sd_notify


@pytest.fixture
def notify_socket(monkeypatch):
    # A short path of our own: AF_UNIX paths are limited to ~107 bytes, pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def received(sock) -> str:
    return sock.recv(4096).decode()


def first(sock) -> str:
    """The first KEY=VALUE line of the next datagram (a STATUS= line may follow)."""
    return received(sock).split("\n")[0]


class RunningReactor:
    """callWhenRunning at once: the reactor is running."""

    def callWhenRunning(self, f, *args, **kwargs):
        f(*args, **kwargs)


def test_ready_stopping_status(notify_socket):
    assert sd_notify.ready()
    assert first(notify_socket) == "READY=1"
    assert sd_notify.stopping()
    assert first(notify_socket) == "STOPPING=1"
    assert sd_notify.status("serving\n3 listeners")
    assert received(notify_socket) == "STATUS=serving 3 listeners"


def test_reloading_carries_monotonic_usec(notify_socket):
    before = time.monotonic_ns() // 1000
    assert sd_notify.reloading()
    lines = received(notify_socket).split("\n")
    after = time.monotonic_ns() // 1000
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_notifier_and_ready_notifier(notify_socket):
    notifier = sd_notify.Notifier()
    notifier.reloading()
    assert received(notify_socket).startswith("RELOADING=1\n")
    notifier.ready()
    assert first(notify_socket) == "READY=1"

    top = service.MultiService()
    sd_notify.ReadyNotifier(RunningReactor()).setServiceParent(top)
    top.startService()
    assert first(notify_socket) == "READY=1"
    top.stopService()
    assert first(notify_socket) == "STOPPING=1"


def test_abstract_socket(monkeypatch):
    name = f"mailgw-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.ready()
        assert first(sock) == "READY=1"
    finally:
        sock.close()


def test_no_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.ready() is False
    assert sd_notify.reloading() is False
    sd_notify.Notifier().ready()
    top = service.MultiService()
    sd_notify.ReadyNotifier(RunningReactor()).setServiceParent(top)
    top.startService()
    top.stopService()


def test_unreachable_socket_never_raises_and_warns_once(monkeypatch, tmp_path):
    from twisted.logger import globalLogPublisher

    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    monkeypatch.setattr(sd_notify, "_warned", False)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert sd_notify.ready() is False
        assert sd_notify.stopping() is False
        assert sd_notify.reloading() is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [event for event in events if "cannot notify systemd" in event.get("log_format", "")]
    assert len(warnings) == 1
