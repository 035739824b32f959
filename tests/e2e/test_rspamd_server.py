"""The real-rspamd fixture (tests/e2e/rspamd_server.py) does what the
end-to-end tests and benchmarks rely on: the stock verdicts (GTUBE rejects),
SPF/DKIM/DMARC taken from request headers, the test triggers, learning 200
messages shows as 200 learned in /stat, the milter proxy answers, and rspamd
asks no DNS at all.

Timings (startup, per learn, per check) are printed: run with -s to see them.
"""
from __future__ import annotations

import functools
import json
import socket
import struct
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection

import pytest

from rspamd_server import (ADD_HEADER_TRIGGER, AUTH_PASS_HEADERS, GREYLIST_TRIGGER, GTUBE, SOFT_REJECT_TRIGGER,
                           RspamdServer, http, message, spam_message)


LEARNS = 200
# What mailgw sends with every message (mailgw/spam/rspamd.py request_headers).
ENVELOPE = {"From": "alice@example.org", "Rcpt": "bob@example.test", "IP": "192.0.2.10",
            "Helo": "mail.example.org", "Hostname": "mail.example.org"}


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    server = RspamdServer(tmp_path_factory.mktemp("rspamd"), milter=True)
    server.start()
    print(f"\nrspamd startup: {server.startup_seconds:.2f} s to /ping, "
          f"{server.hyperscan_seconds:.2f} s to hyperscan loaded (pid {server.pid})")
    yield server
    server.stop()


CLEAN = message("Hi Bob,\r\n\r\nare we still on for lunch on Friday? The usual place at noon.\r\n\r\nAlice")


def check(rspamd: RspamdServer, data: bytes, headers: dict | None = None) -> dict:
    status, body = http("POST", rspamd.normal_url + "/checkv2", data, {**ENVELOPE, **(headers or AUTH_PASS_HEADERS)})
    assert status == 200, body
    return json.loads(body)


def test_gtube_is_rejected(rspamd):
    reply = check(rspamd, message(f"This is the GTUBE test.\r\n\r\n{GTUBE}\r\n", subject="GTUBE"))
    assert reply["action"] == "reject"
    assert "GTUBE" in reply["symbols"]


def test_clean_message_with_auth_headers(rspamd):
    reply = check(rspamd, CLEAN)
    assert reply["action"] == "no action", reply
    assert {"R_SPF_ALLOW", "R_DKIM_ALLOW", "DMARC_POLICY_ALLOW"} <= set(reply["symbols"])
    assert reply["symbols"]["R_SPF_ALLOW"]["options"] == ["http header"]   # from the header, not from DNS
    started = time.monotonic()
    for _ in range(50):
        check(rspamd, CLEAN)
    print(f"\nrspamd /checkv2: {(time.monotonic() - started) / 50 * 1000:.1f} ms per check (sequential)")


def test_auth_fail_headers_are_used_too(rspamd):
    reply = check(rspamd, CLEAN, {"SPF": '{"result":"fail"}', "DKIM": '{"results":[{"result":"fail",'
                                  '"domain":"example.org"}]}', "DMARC": '{"result":"reject"}'})
    assert {"R_SPF_FAIL", "R_DKIM_REJECT", "DMARC_POLICY_REJECT"} <= set(reply["symbols"])


@pytest.mark.parametrize("trigger, action", [(ADD_HEADER_TRIGGER, "add header"),
                                             (GREYLIST_TRIGGER, "greylist"),
                                             (SOFT_REJECT_TRIGGER, "soft reject")])
def test_trigger_header(rspamd, trigger, action):
    reply = check(rspamd, message("Hi Bob,\r\n\r\nsee you at noon.\r\n\r\nAlice", extra=(trigger,)))
    assert reply["action"] == action, reply


def test_no_dns_without_auth_headers(rspamd):
    """Received chains, URLs, addresses and no SPF/DKIM/DMARC headers: the
    checks that would look something up are off, SPF/DKIM/DMARC included
    (http_headers' condition skips them even without the header)."""
    data = message("Hi Bob,\r\n\r\nthe slides are at https://docs.example.net/q3/slides?id=42 and\r\n"
                   "http://203.0.113.7/files, or mail carol@example.com.\r\n\r\nAlice",
                   extra=(("Received", "from mail.example.org (mail.example.org [192.0.2.10]) by mx.example.test "
                                       "with ESMTPS id 4AbC; Mon, 07 Dec 2026 10:00:01 +0000"),
                          ("DKIM-Signature", "v=1; a=rsa-sha256; d=example.org; s=sel; h=from:to; bh=AAAA; b=BBBB"),
                          ("Reply-To", "alice@example.net")))
    reply = check(rspamd, data, {"Queue-Id": "4AbC"})
    assert not [name for name in reply["symbols"] if name.startswith(("R_SPF_", "R_DKIM_", "DMARC_"))], reply
    assert rspamd.dns_queries() == 0


# -- learning ---------------------------------------------------------------

def test_learning_200_spam_shows_in_stat(rspamd):
    before = rspamd.learned("BAYES_SPAM")
    started = time.monotonic()
    for i in range(LEARNS):
        status, body = http("POST", rspamd.controller_url + "/learnspam", spam_message(i))
        assert (status, json.loads(body)) == (200, {"success": True}), (i, body)
    elapsed = time.monotonic() - started
    print(f"\nrspamd /learnspam: {LEARNS} learns in {elapsed:.2f} s, {elapsed / LEARNS * 1000:.1f} ms per learn")

    stat = rspamd.stat()
    spam_file = next(entry for entry in stat["statfiles"] if entry["symbol"] == "BAYES_SPAM")
    assert spam_file["revision"] - before == LEARNS, stat["statfiles"]
    assert rspamd.learned("BAYES_SPAM") - before == LEARNS
    assert rspamd.learned("BAYES_HAM") == 0

    # The same messages again, the first ones too: refused by the learn cache, with HTTP 404.
    for i in range(0, LEARNS, 20):
        status, body = http("POST", rspamd.controller_url + "/learnspam", spam_message(i))
        assert status == 404 and "already learned as spam" in json.loads(body)["error"], (i, status, body)
    assert rspamd.learned("BAYES_SPAM") - before == LEARNS


class _From127002(urllib.request.HTTPHandler):
    """urllib from source address 127.0.0.2: loopback, but not secure_ip."""

    def http_open(self, request):
        return self.do_open(functools.partial(HTTPConnection, source_address=("127.0.0.2", 0)), request)


def test_controller_wants_the_password_from_elsewhere(rspamd):
    opener = urllib.request.build_opener(_From127002())

    def learn(headers):
        request = urllib.request.Request(rspamd.controller_url + "/learnham", data=CLEAN, headers=headers)
        try:
            with opener.open(request, timeout=15) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert learn({}) == 401         # rspamd: 401 Unauthorized, not 403
    assert learn({"Password": "wrong"}) == 401
    assert learn({"Password": rspamd.password}) == 200


# -- the milter proxy -------------------------------------------------------

# Protocol flags a milter may set in its OPTNEG reply (libmilter's mfapi.h).
_SKIP = {b"C": 0x1, b"H": 0x2, b"M": 0x4, b"R": 0x8, b"B": 0x10, b"L": 0x20, b"N": 0x40, b"T": 0x200}
_NO_REPLY = {b"L": 0x80, b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
             b"N": 0x40000, b"B": 0x80000}
_FINAL = set(b"acrtyd")


def milter_session(address: str, data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A minimal MTA side of the milter protocol (v6): one message, as
    Postfix would send it. Returns (final reply, modifications)."""
    _, host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        reader = sock.makefile("rb")

        def send(command: bytes, payload: bytes = b"") -> None:
            sock.sendall(struct.pack("!I", len(payload) + 1) + command + payload)

        def receive() -> tuple[bytes, bytes]:
            size = struct.unpack("!I", reader.read(4))[0]
            packet = reader.read(size)
            return packet[:1], packet[1:]

        send(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
        command, payload = receive()
        assert command == b"O", (command, payload)
        protocol = struct.unpack("!III", payload[:12])[2]

        def step(command: bytes, payload: bytes = b"") -> None:
            if protocol & _SKIP.get(command, 0):
                return
            send(command, payload)
            if not protocol & _NO_REPLY.get(command, 0):
                reply, text = receive()
                assert reply == b"c", (command, reply, text)

        head, _, body = data.partition(b"\r\n\r\n")
        step(b"C", b"mail.example.org\x004" + struct.pack("!H", 25000) + b"192.0.2.10\x00")
        step(b"H", b"mail.example.org\x00")
        step(b"M", b"<alice@example.org>\x00")
        step(b"R", b"<bob@example.test>\x00")
        step(b"T")
        for line in head.replace(b"\r\n ", b" ").split(b"\r\n"):
            name, _, value = line.partition(b":")
            step(b"L", name + b"\x00" + value.strip() + b"\x00")
        step(b"N")
        step(b"B", body)
        send(b"E")
        modifications = []
        while True:
            reply, text = receive()
            if reply[0] in _FINAL:
                send(b"Q")
                return reply + text, modifications
            modifications.append((reply, text))


def test_milter_proxy(rspamd):
    final, _ = milter_session(rspamd.milter_address, message(f"GTUBE by milter:\r\n{GTUBE}\r\n", subject="GTUBE"))
    assert final.startswith(b"y554 5.7.1 "), final      # GTUBE's own text, "Gtube pattern"

    final, modifications = milter_session(rspamd.milter_address,
                                          message("Hi Bob,\r\n\r\nsee you at noon.\r\n", extra=(ADD_HEADER_TRIGGER,)))
    assert final[:1] in (b"a", b"c"), final
    # rspamd sets the header with CHGHEADER ('m', index 1: added when absent) as Postfix applies it.
    assert (b"m", b"\x00\x00\x00\x01X-Spam\x00Yes\x00") in modifications, modifications

    final, _ = milter_session(rspamd.milter_address, CLEAN)
    assert final[:1] in (b"a", b"c"), final
