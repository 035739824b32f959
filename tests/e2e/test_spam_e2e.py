"""End to end: spam defences with a real rspamd from Debian (tests/e2e/rspamd_server.py:
our config, no network, Bayes in a temp directory) and a real mailgw.

At DATA: GTUBE is refused with 554 5.7.1, a clean message lands in INBOX, one
scored for "add header" in Junk with X-Spam-*, a soft reject is 451; rspamd
down: accepted unscanned (on_failure = "accept"). Junk learning: 200 messages
moved into Junk over IMAP show up as 200 learned spam in rspamd's /stat.
Before the greeting: a client that talks first is refused, a patient one
passes (and is greeted at once next time); a client listed by a blocklist on
the loopback DNS server gets a 554 greeting. Real twistd, smtplib, imaplib,
raw sockets for the pregreet."""
from __future__ import annotations

import imaplib
import smtplib
import socket
import uuid

import pytest

from rspamd_server import ADD_HEADER_TRIGGER, GTUBE, SOFT_REJECT_TRIGGER, RspamdServer, spam_message

pytestmark = pytest.mark.e2e
ALICE, PASSWORD = "alice@example.test", "secret"
LEARNS = 200


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    server = RspamdServer(tmp_path_factory.mktemp("rspamd"))
    server.start()
    yield server
    server.stop()


def spam_config(rspamd, **more) -> str:
    lines = ["[spam]", f'rspamd_url = "{rspamd.normal_url}"', f'controller_url = "{rspamd.controller_url}"',
             f'password = "{rspamd.password}"', "timeout = 10.0"]
    lines += [f"{key} = {value}" for key, value in more.items()]
    return "\n".join(lines) + "\n"


def message(marker: str, *, extra: str = "", body: str = "") -> bytes:
    body = body or ("Hi Alice,\r\n\r\nare we still on for lunch on Friday? The usual place at noon. "
                    "I will bring the notes from the meeting.\r\n\r\nBob\r\n")
    return (f"From: Bob <bob@friends.example>\r\nTo: Alice <{ALICE}>\r\nSubject: lunch {marker}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{marker}@friends.example>\r\n"
            f"X-Test-Marker: {marker}\r\n{extra}\r\n{body}").encode()


def send_inbound(server, data: bytes):
    """From 127.0.0.1, an untrusted client on the relay role (127.0.0.2 is the trusted one)."""
    client = server.smtp("relay")
    try:
        client.ehlo(server.CLIENT_NAME)
        client.mail("bob@friends.example")
        assert client.rcpt(ALICE)[0] == 250
        return client.data(data)
    finally:
        client.quit()


def junk(server, user=ALICE) -> dict[str, bytes]:
    found = {}
    for sub in ("new", "cur"):
        directory = server.mailbox(user) / ".Junk" / sub
        if directory.is_dir():
            found.update({path.name: path.read_bytes() for path in directory.iterdir()})
    return found


def test_gtube_is_refused_clean_mail_is_delivered_and_spam_goes_to_junk(make_server, rspamd):
    server = make_server(extra=spam_config(rspamd)).start()
    scanned_before = rspamd.stat()["scanned"]

    gtube = uuid.uuid4().hex
    code, text = send_inbound(server, message(gtube, body=f"{GTUBE}\r\n"))
    assert (code, text[:5]) == (554, b"5.7.1"), text
    assert not [d for d in server.messages(ALICE).values() if gtube.encode() in d] and not junk(server)

    clean = uuid.uuid4().hex
    code, _ = send_inbound(server, message(clean, extra="X-Spam-Score: -100.00 / 15.00\r\n"))
    assert code == 250
    _, stored = server.find(ALICE, clean)
    head = stored.split(b"\n\n", 1)[0].decode()
    assert "X-Spam-Status: No, score=" in head and "X-Spam-Action: no action" in head
    assert "-100" not in head and head.count("X-Spam-Score") == 1      # the sender's own verdict was removed

    scored = uuid.uuid4().hex
    name, value = ADD_HEADER_TRIGGER
    code, _ = send_inbound(server, message(scored, extra=f"{name}: {value}\r\n"))
    assert code == 250
    [stored] = [d for d in junk(server).values() if scored.encode() in d]
    head = stored.split(b"\n\n", 1)[0].decode()
    assert "X-Spam-Flag: YES" in head and "X-Spam-Action: add header" in head and "MAILGW_TEST_ADD_HEADER" in head
    assert not [d for d in server.messages(ALICE).values() if scored.encode() in d]

    name, value = SOFT_REJECT_TRIGGER
    code, text = send_inbound(server, message(uuid.uuid4().hex, extra=f"{name}: {value}\r\n"))
    assert (code, text[:5]) == (451, b"4.7.1"), text

    assert rspamd.stat()["scanned"] - scanned_before == 4
    log = server.log_text()
    assert "rspamd action=reject" in log and "rspamd action=add header" in log
    assert "quarantined" in log


def test_mail_from_trusted_and_authenticated_clients_is_not_scanned(make_server, rspamd):
    server = make_server(extra=spam_config(rspamd)).start()
    scanned_before = rspamd.stat()["scanned"]
    marker = uuid.uuid4().hex
    client = server.smtp("relay", source="127.0.0.2")            # [server] trusted_networks
    client.ehlo(server.CLIENT_NAME)
    client.sendmail("app@example.test", [ALICE], message(marker, body=f"{GTUBE}\r\n"))
    client.quit()
    server.find(ALICE, marker)
    assert rspamd.stat()["scanned"] == scanned_before


def test_rspamd_down_accepts_unscanned_and_says_so(make_server, rspamd, e2e):
    dead = f"http://127.0.0.1:{e2e.free_ports(1)[0]}"
    server = make_server(extra=f'[spam]\nrspamd_url = "{dead}"\ntimeout = 5.0\n').start()
    marker = uuid.uuid4().hex
    code, _ = send_inbound(server, message(marker))
    assert code == 250
    _, stored = server.find(ALICE, marker)
    assert b"X-Spam-Status" not in stored
    assert "accepted unscanned" in server.log_text()


def test_rspamd_down_defers_when_asked(make_server, e2e):
    dead = f"http://127.0.0.1:{e2e.free_ports(1)[0]}"
    server = make_server(extra=f'[spam]\nrspamd_url = "{dead}"\non_failure = "defer"\n').start()
    code, text = send_inbound(server, message(uuid.uuid4().hex))
    assert (code, text[:5]) == (451, b"4.7.1"), text


def test_200_messages_moved_into_junk_are_learned_as_spam(make_server, rspamd, e2e):
    server = make_server(extra=spam_config(rspamd)).start()
    before = rspamd.learned("BAYES_SPAM")
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=e2e.tls_client_context(),
                               timeout=30)
    client.login(ALICE, PASSWORD)
    for i in range(LEARNS):
        # Distinct plain-English bodies: rspamd's learn cache keys on the body's words.
        typ, _ = client.append("INBOX", None, None, spam_message(10_000 + i))
        assert typ == "OK"
    assert client.select("INBOX") == ("OK", [str(LEARNS).encode()])
    typ, _ = client.uid("MOVE", "1:*", "Junk")
    assert typ == "OK"
    e2e.wait_until(lambda: rspamd.learned("BAYES_SPAM") - before >= LEARNS,
                   f"{LEARNS} learned spam in rspamd's stat", within=120.0, poll=0.2)
    assert rspamd.learned("BAYES_SPAM") - before == LEARNS
    assert rspamd.learned("BAYES_HAM") == 0
    # And one moved back out of Junk is learned as ham.
    client.select("Junk")
    typ, _ = client.uid("MOVE", "1", "INBOX")
    assert typ == "OK"
    e2e.wait_until(lambda: rspamd.learned("BAYES_HAM") == 1, "1 learned ham", within=30.0, poll=0.1)
    client.logout()


# -- before the greeting -------------------------------------------------------------------

def raw_smtp(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.ports["relay"]), timeout=15)
    return sock


def read_reply(sock) -> list[bytes]:
    """One whole SMTP reply (through its last line)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(len(line) >= 4 and line[3:4] == b" " for line in lines[:-1]):
            break
    return [line for line in data.split(b"\r\n") if line]


def test_a_client_that_talks_before_the_greeting_is_refused_and_a_patient_one_passes(make_server):
    server = make_server(extra="[spam]\npregreet_wait = 1.0\n").start()
    hasty = raw_smtp(server)
    first = hasty.recv(4096)
    assert first == f"220-{server.HOSTNAME} ESMTP mailgw\r\n".encode(), first
    hasty.sendall(b"EHLO bot.example\r\n")             # before the greeting's last line
    rest = read_reply(hasty)
    assert rest == [b"554 5.5.1 Protocol error: talked before the greeting"], rest
    assert hasty.recv(4096) == b""                     # and the connection is closed
    hasty.close()
    assert "PREGREET" in server.log_text()

    # A patient client (smtplib waits for the whole greeting) passes ...
    client = server.smtp("relay")
    assert client.ehlo(server.CLIENT_NAME)[0] == 250
    client.quit()
    # ... and its next connection is greeted at once, in one line.
    again = raw_smtp(server)
    assert read_reply(again) == [f"220 {server.HOSTNAME} ESMTP mailgw".encode()]
    again.close()


def test_a_listed_client_gets_a_554_greeting(make_server, loopback_dns):
    # RFC 5782 §5: 127.0.0.2 is listed by every blocklist; the client is 127.0.0.1 here, so the zone lists that.
    loopback_dns.set({"1.0.0.127.bl.example.test": {"A": ["127.0.0.2"], "TXT": ["listed for the test"]}})
    try:
        server = make_server(extra='[spam]\ndnsbl_sites = ["bl.example.test=127.0.0.[2..11]*2"]\n'
                                   "dnsbl_threshold = 2\n").start()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            server.smtp("relay")
        assert refused.value.smtp_code == 554
        assert b"5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.example.test" in \
            refused.value.smtp_error
        assert "NOQUEUE: reject: CONNECT from [127.0.0.1]" in server.log_text()
    finally:
        loopback_dns.set({})
