"""End to end, issue 4: mail sent over SMTP is retrieved over POP3 byte for
byte and deleted, with Python's poplib (STLS on the pop3 port, implicit TLS
on pop3s), fetchmail and curl."""
from __future__ import annotations

import os
import poplib
import shutil
import subprocess
import uuid

import pytest

pytestmark = pytest.mark.e2e
ALICE, PASSWORD = "alice@example.test", "secret"


def deliver(server, body: bytes) -> bytes:
    """Send to alice over SMTP; the stored message as POP3 must return it (CRLF)."""
    client = server.smtp("relay")
    client.sendmail("someone@elsewhere.test", [ALICE], body)
    client.quit()
    mark = body.split(b"X-Test-Marker: ", 1)[1].split(b"\r\n", 1)[0].decode()
    _, stored = server.find(ALICE, mark)
    return stored.replace(b"\n", b"\r\n")


def message(mark: str) -> bytes:
    return (f"Subject: {mark}\r\nX-Test-Marker: {mark}\r\nMessage-ID: <{mark}@example.test>\r\n\r\n"
            ".starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n").encode()


def pop3(server) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    return client


def retr_bytes(client, number: int) -> bytes:
    _, lines, _ = client.retr(number)
    return b"\r\n".join(lines) + b"\r\n"          # poplib un-stuffs the dots


def test_poplib_stls_retrieves_byte_for_byte_and_deletes(make_server):
    server = make_server().start()
    expected = deliver(server, message(uuid.uuid4().hex))
    client = pop3(server)
    caps = client.capa()
    assert "STLS" in caps and "USER" not in caps          # no plaintext login before TLS
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.user(ALICE)
    client.stls(context=server.tls_client_context())
    assert "STLS" not in client.capa() and "USER" in client.capa()
    client.user(ALICE)
    client.pass_(PASSWORD)
    count, size = client.stat()
    assert count == 1 and size == len(expected)          # sizes are the octets RETR sends
    assert int(client.list(1).split()[2]) == len(expected)
    uidl = client.uidl(1).split()[2]
    assert retr_bytes(client, 1) == expected
    client.dele(1)
    assert client.stat()[0] == 0
    client.quit()
    assert server.messages(ALICE) == {}
    # The unique id is the store's: stable, and never reused for the next message.
    expected2 = deliver(server, message(uuid.uuid4().hex))
    again = pop3(server)
    again.stls(context=server.tls_client_context())
    again.user(ALICE)
    again.pass_(PASSWORD)
    assert again.uidl(1).split()[2] != uidl and retr_bytes(again, 1) == expected2
    again.quit()


def test_poplib_implicit_tls_and_a_dropped_session_deletes_nothing(make_server):
    server = make_server().start()
    expected = deliver(server, message(uuid.uuid4().hex))
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls_client_context(), timeout=10)
    client.user(ALICE)
    client.pass_(PASSWORD)
    assert retr_bytes(client, 1) == expected
    client.dele(1)
    client.sock.close()                                   # no QUIT: no UPDATE state
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls_client_context(), timeout=10)
    client.user(ALICE)
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        second = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls_client_context(),
                                 timeout=10)
        second.user(ALICE)
        second.pass_(PASSWORD)
    client.quit()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_curl_pop3_with_stls_and_pop3s(make_server):
    server = make_server().start()
    expected = deliver(server, message(uuid.uuid4().hex))
    for url, extra in ((f"pop3://127.0.0.1:{server.ports['pop3']}/1", ["--ssl-reqd"]),
                       (f"pop3s://127.0.0.1:{server.ports['pop3s']}/1", [])):
        done = subprocess.run(["curl", "-s", "-k", *extra, "--max-time", "20", "-u", f"{ALICE}:{PASSWORD}", url],
                              capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected                     # curl un-stuffs too


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is installed by .ci/run")
def test_fetchmail_retrieves_and_deletes(make_server, tmp_path):
    server = make_server().start()
    bodies = [deliver(server, message(uuid.uuid4().hex)) for _ in range(3)]
    out = tmp_path / "fetched"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll 127.0.0.1 service {server.ports["pop3"]} protocol POP3 auth password\n'
        f'  user "{ALICE}" password "{PASSWORD}" is "nobody" here\n'
        f'  sslproto "TLS1.2+" no sslcertck\n'
        f'  mda "/bin/sh -c \'cat > {out}/$$.eml\'"\n'
        f'  nokeep\n')
    os.chmod(rc, 0o600)
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    done = subprocess.run(["fetchmail", "-f", str(rc), "--nosyslog", "-v", "--pidfile", str(tmp_path / "fm.pid")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    fetched = sorted(p.read_bytes() for p in out.iterdir())
    # fetchmail writes LF line ends and adds its own Received: line on top.
    wanted = sorted(b.replace(b"\r\n", b"\n") for b in bodies)
    assert len(fetched) == 3
    for got, want in zip(sorted(fetched, key=lambda m: m[-200:]), sorted(wanted, key=lambda m: m[-200:])):
        # fetchmail moves our Return-Path: and Delivered-To: above its Received:.
        assert got.startswith(b"Return-Path: <someone@elsewhere.test>\n")
        assert got.endswith(want[want.index(b"\nReceived: ") + 1:])
    assert server.messages(ALICE) == {}
