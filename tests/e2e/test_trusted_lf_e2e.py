"""End to end: `curl -T file smtp://...` with an LF-only file, the way people
send from scripts. From a trusted network (127.0.0.2, see conftest.py) the
LF line ends are taken as CRLF ([smtp] bare_newline = "normalize-trusted",
the default); from an untrusted client (127.0.0.1) the message is refused."""
from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")]

ALICE = "alice@example.test"


def curl(server, path, *, source: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", "--interface", source,
         "--mail-from", "sender@elsewhere.test", "--mail-rcpt", ALICE,
         "-T", str(path), f"smtp://127.0.0.1:{server.ports['relay']}/{server.CLIENT_NAME}"],
        capture_output=True, text=True, timeout=30)


def lf_message(marker: str) -> bytes:
    return (f"Subject: LF from curl\nX-Test-Marker: {marker}\n\nfirst line\nsecond line\n").encode()


def test_curl_lf_file_from_a_trusted_network_is_stored(server, tmp_path):
    marker = uuid.uuid4().hex
    path = tmp_path / "message.txt"
    path.write_bytes(lf_message(marker))
    done = curl(server, path, source="127.0.0.2")
    assert done.returncode == 0, done.stderr
    _, stored = server.find(ALICE, marker)
    assert b"\r" not in stored
    assert stored.startswith(b"Return-Path: <sender@elsewhere.test>\nDelivered-To: alice@example.test\n")
    received, rest = server.split_received(stored)
    assert b"[127.0.0.2]" in received
    # curl adds CRLF "." CRLF after the file's last LF: an empty last line.
    assert rest == lf_message(marker) + b"\n"
    server.wait_for_log("relay=local")
    assert "status=sent (delivered to maildir)" in server.log_text()


def test_curl_lf_file_from_an_untrusted_client_is_refused(server, tmp_path):
    marker = uuid.uuid4().hex
    path = tmp_path / "message.txt"
    path.write_bytes(lf_message(marker))
    done = curl(server, path, source="127.0.0.1")
    assert done.returncode != 0        # curl 7.88 says "(8) Weird server reply" to a 554 after DATA
    assert not any(marker.encode() in data for data in server.messages(ALICE).values())
    server.wait_for_log("reject: END-OF-MESSAGE from localhost[127.0.0.1]: 554 5.6.0")
