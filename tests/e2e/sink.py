"""A real SMTP sink (aiosmtpd) on 127.0.0.1 for the relay queue to deliver to,
and helpers that watch the server's queue through `mailgw queue list`."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller", reason="aiosmtpd is in the [test] extras")

WAIT = 20.0


class Sink:
    """aiosmtpd on 127.0.0.1 that records every transaction; `refuse` maps
    recipients to a reply to give at RCPT."""

    def __init__(self, port: int):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.refuse: dict[str, str] = {}
        self.arrived = threading.Event()
        self.controller = aiosmtpd_controller.Controller(self, hostname="127.0.0.1", port=port)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 Ok: sunk"

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(self.messages) < count:
            self.arrived.clear()
            assert self.arrived.wait(max(0.0, deadline - time.monotonic())) or len(self.messages) >= count, \
                f"sink got {len(self.messages)} of {count} messages"


def queue_list(server, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailgw.cli", "queue", "list", *args, "--config",
                           str(server.config_path)], capture_output=True, text=True, timeout=30,
                          env=server_env(), cwd=server.root)


def server_env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def wait_until_queue_empty(server) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        done = queue_list(server)
        assert done.returncode == 0, done.stderr
        if "mail queue is empty" in done.stdout:
            return
        assert time.monotonic() < deadline, done.stdout
