"""sd_notify(3) without a library: tell systemd (Type=notify) how we are.

systemd passes the address of a datagram socket in $NOTIFY_SOCKET; each
notification is one datagram of newline-separated "KEY=VALUE" lines. A
leading "@" names a Linux abstract socket (the "@" stands for the leading
NUL byte). Without $NOTIFY_SOCKET (not run by systemd, or Type= is not
notify) every call is a no-op. Nothing here raises: a failed send is logged
once and forgotten, since a server must never stop over a status message;
a send waits at most SEND_TIMEOUT seconds, so the reactor never hangs on it.

    READY=1        start-up finished: every listener bound, every service started
    RELOADING=1    a reload began (with MONOTONIC_USEC=, as Type=notify-reload wants);
                   READY=1 again when it ended, whatever its outcome
    STOPPING=1     shutdown began
    STATUS=...     one line of free text, shown by `systemctl status`

For the reload (mailgw/reload.py): `Reloader(notify=Notifier())` calls
`notifier.reloading()` before it re-reads the config and `notifier.ready()`
after; `notify_reloading()` and `notify_ready()` are the same as functions.
systemd itself then waits for READY=1 before it takes the next job.
"""
from __future__ import annotations

import os
import socket
import time

from twisted.application import service
from twisted.logger import Logger

log = Logger()

SEND_TIMEOUT = 1.0       # seconds; systemd reads its socket at once, a full queue is not worth a stall

_warned = False

RUNNING = "running: accepting connections"      # STATUS= once ready


def _address() -> str | None:
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None           # sd_notify(3): anything else (vsock:, a relative path) is not ours to guess


def _one_line(text: str) -> str:
    # A newline would start another KEY=VALUE assignment.
    return " ".join(str(text).split("\n")).replace("\r", " ")


def notify(*assignments: str) -> bool:
    """Send "KEY=VALUE" lines in one datagram to $NOTIFY_SOCKET; True if sent. Never raises."""
    global _warned
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto("\n".join(assignments).encode("utf-8"), address)
        return True
    except (OSError, ValueError) as error:
        if not _warned:
            _warned = True
            log.warn("cannot notify systemd through {socket}: {error} (not reported again)",
                     socket=os.environ.get("NOTIFY_SOCKET"), error=error)
        return False


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else ("STATUS=" + _one_line(text),)


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *_status(status))


def reloading(status: str | None = "reloading the configuration") -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  *_status(status))


def stopping(status: str | None = "stopping") -> bool:
    return notify("STOPPING=1", *_status(status))


def status(text: str) -> bool:
    return notify(*_status(text))


# The names the reload code asks for.
notify_ready = ready
notify_reloading = reloading


class Notifier:
    """What mailgw/reload.py's Reloader(notify=...) calls around a reload."""

    def reloading(self) -> None:
        reloading()

    def ready(self) -> None:
        ready(status=RUNNING)



class ReadyNotifier(service.Service):
    """READY=1 once the server runs, STOPPING=1 when it stops.

    Added to the top service after every listener (they bind while the
    service is built) and every other service, so by its startService they
    have all started; READY=1 itself goes out when the reactor runs
    (`callWhenRunning`), i.e. once twistd has installed its SIGTERM/SIGINT
    handlers, so a `systemctl stop` right after the start is a clean stop.
    MultiService stops in reverse order: STOPPING=1 is sent before the
    listeners close."""

    def __init__(self, reactor=None):
        self.reactor = reactor

    def startService(self):
        super().startService()
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.callWhenRunning(self._ready)

    def _ready(self):
        if self.running:            # not if a stop came first
            ready(status=RUNNING)

    def stopService(self):
        stopping()
        return super().stopService()
