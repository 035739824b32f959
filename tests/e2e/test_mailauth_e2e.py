"""End to end, issue 14: SPF, DKIM and DMARC checked on port 25 against a
real DNS server on loopback (tests/e2e/dns_server.py), DKIM signatures on
submitted mail verified by an independent verifier (libopendkim, `opendkim -t`) after
relaying to a sink, forged Authentication-Results removed, reverse DNS in
Received:. Real twistd, real smtplib."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sink import wait_until_queue_empty

pytestmark = pytest.mark.e2e
ALICE = "alice@example.test"


@pytest.fixture
def zone(loopback_dns):
    """Set the loopback DNS zone for one test; emptied again afterwards."""
    yield loopback_dns.set
    loopback_dns.set({})


def _rsa_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()


def _split(record: str) -> list[str]:
    return [record[i:i + 250] for i in range(0, len(record), 250)]


def _inbound(server, sender: str, recipient: str, message: bytes):
    client = server.smtp("relay")                  # 127.0.0.1: an untrusted client on port 25
    client.ehlo(server.CLIENT_NAME)
    try:
        client.mail(sender)
        code, _ = client.rcpt(recipient)
        assert code == 250
        return client.data(message)
    finally:
        client.quit()


def test_dmarc_reject_quarantine_and_pass_with_forged_results_removed(make_server, zone):
    import dkim

    pem, public = _rsa_key()
    zone({
        # Forged as a p=reject domain: SPF fails for 127.0.0.1, no signature.
        "reject.example": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
        "_dmarc.reject.example": {"TXT": ["v=DMARC1; p=reject"]},
        # Forged as a p=quarantine domain.
        "quarantine.example": {"TXT": ["v=spf1 -all"]},
        "_dmarc.quarantine.example": {"TXT": ["v=DMARC1; p=quarantine"]},
        # A sender that does everything right: SPF for 127.0.0.1 and a DKIM key.
        "good.example": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
        "sel._domainkey.good.example": {"TXT": [_split(f"v=DKIM1; k=rsa; p={public}")]},
        "_dmarc.good.example": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
    })
    server = make_server().start()

    mark = uuid.uuid4().hex
    message = (f"From: CEO <ceo@reject.example>\r\nTo: {ALICE}\r\nSubject: wire money {mark}\r\n"
               f"Message-ID: <{mark}@reject.example>\r\n\r\npay now\r\n").encode()
    code, reply = _inbound(server, "ceo@reject.example", ALICE, message)
    assert code == 550 and reply.startswith(b"5.7.1 ") and b"DMARC policy of reject.example" in reply
    assert not [m for m in server.messages(ALICE).values() if mark.encode() in m]

    mark = uuid.uuid4().hex
    message = (f"From: billing@quarantine.example\r\nTo: {ALICE}\r\nSubject: invoice {mark}\r\n"
               f"Message-ID: <{mark}@quarantine.example>\r\n\r\nopen the attachment\r\n").encode()
    code, _ = _inbound(server, "billing@quarantine.example", ALICE, message)
    assert code == 250
    junk = server.mailbox(ALICE) / ".Junk"
    stored = [p.read_bytes() for sub in ("new", "cur") for p in (junk / sub).iterdir()
              if mark.encode() in p.read_bytes()]
    assert len(stored) == 1, "the p=quarantine message is in Junk"
    assert not [m for m in server.messages(ALICE).values() if mark.encode() in m], "and not in INBOX"
    # The folder was made by the delivery (alice never logged in): IMAP sees it and the message.
    import imaplib
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    imap.starttls(ssl_context=server.tls_client_context())
    imap.login(ALICE, "secret")
    assert imap.select("Junk")[0] == "OK"
    assert len(imap.search(None, "SUBJECT", mark)[1][0].split()) == 1
    imap.logout()
    results = _results(stored[0], server.HOSTNAME)
    assert "dmarc=fail" in results and "spf=fail" in results and "header.from=quarantine.example" in results

    mark = uuid.uuid4().hex
    body = (f"From: Friend <friend@good.example>\r\nTo: {ALICE}\r\nSubject: lunch {mark}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{mark}@good.example>\r\n\r\n"
            f"see you at noon\r\n").encode()
    signature = dkim.sign(body, b"sel", b"good.example", pem, canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    # The client also tries to hand alice a verdict in our name (and one in another's, which stays).
    forged = (f"Authentication-Results: {server.HOSTNAME}; dkim=pass header.d=bank.example\r\n"
              f"Authentication-Results: (comment) {server.HOSTNAME.upper()} ; spf=pass\r\n"
              f"Authentication-Results: relay.good.example; spf=pass smtp.mailfrom=good.example\r\n").encode()
    code, _ = _inbound(server, "friend@good.example", ALICE, forged + signature + body)
    assert code == 250
    stored, = [m for m in server.messages(ALICE).values() if mark.encode() in m]
    results = _results(stored, server.HOSTNAME)
    assert "spf=pass" in results and "smtp.mailfrom=friend@good.example" in results
    assert "dkim=pass" in results and "header.d=good.example" in results and "header.s=sel" in results
    assert "dmarc=pass" in results and "header.from=good.example" in results
    ours = re.findall(rb"^Authentication-Results:\s*(?:\([^)]*\)\s*)?" + re.escape(server.HOSTNAME.encode()),
                      stored, re.M | re.I)
    assert len(ours) == 1, "only our own verdict claims our authserv-id"
    assert b"header.d=bank.example" not in stored
    assert b"Authentication-Results: relay.good.example; spf=pass" in stored
    log = server.log_text()
    assert "spf=pass dkim=pass dmarc=pass" in log and "spf=fail dkim=none dmarc=fail" in log


def _results(stored: bytes, authserv_id: str) -> str:
    """Our Authentication-Results field, unfolded."""
    match = re.search(rb"^Authentication-Results: " + re.escape(authserv_id.encode()) + rb";(.*?)\n(?=\S)",
                      stored, re.M | re.S)
    assert match, stored[:600]
    return " ".join(match.group(1).decode().split())


def test_submitted_mail_is_signed_and_an_independent_verifier_accepts_it(e2e, make_server, sink, zone, tmp_path):
    server = make_server(relay_port=sink.controller.port)
    server.write_config()
    server.add_users()
    keygen = e2e.run_cli(["dkim", "keygen", "example.test", "--selector", "mail1",
                          "--config", str(server.config_path)], cwd=server.root)
    assert keygen.returncode == 0, keygen.stderr
    record = re.search(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+", keygen.stdout.replace('" "', "").replace("\n", " "))
    assert record, keygen.stdout
    key_file = server.data_dir / "dkim" / "example.test" / "mail1.rsa.pem"
    assert oct(os.stat(key_file).st_mode & 0o777) == "0o600"
    zone({"mail1._domainkey.example.test": {"TXT": [_split(record.group(0))]}})
    server.start()

    mark = uuid.uuid4().hex
    client = server.smtp("submission")
    client.ehlo(server.CLIENT_NAME)
    client.starttls(context=server.tls_client_context())
    client.ehlo(server.CLIENT_NAME)
    client.login(ALICE, "secret")
    # No Date: and no Message-ID:: the submission server adds both before it signs.
    message = (f"From: Alice <{ALICE}>\r\nTo: partner@remote.example\r\nSubject: contract {mark}\r\n"
               f"List-Unsubscribe: <mailto:unsubscribe@example.test>\r\n\r\n"
               f"the signed copy is attached\r\n").encode()
    server.send(client, ALICE, ["partner@remote.example"], message)
    client.quit()
    sink.wait_for(1)
    wait_until_queue_empty(server)
    (_, _, relayed), = sink.messages
    relayed = relayed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert re.search(rb"^Date: ", relayed, re.M) and re.search(rb"^Message-ID: <", relayed, re.M)
    signature = re.search(rb"^DKIM-Signature:.*?\r\n(?=\S)", relayed, re.M | re.S).group(0)
    assert b"d=example.test" in signature and b"s=mail1" in signature and b"c=relaxed/relaxed" in signature
    tags = dict(part.strip().split("=", 1) for part in
                " ".join(signature.decode()[len("DKIM-Signature:"):].split()).split(";") if "=" in part)
    signed = [name.strip().lower() for name in tags["h"].split(":")]
    assert signed.count("from") == 2 and signed.count("subject") == 2, "From and Subject oversigned"
    assert "list-unsubscribe" in signed and "date" in signed and "message-id" in signed

    verifier = shutil.which("opendkim", path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if verifier is None:
        pytest.skip("opendkim is not installed (apt packages opendkim, opendkim-tools; .ci/run installs them)")
    assert "succeeded" in _opendkim(verifier, tmp_path, relayed, record.group(0)), "opendkim accepts it"
    tampered = relayed.replace(b"the signed copy", b"the signed cop!")
    assert "failed" in _opendkim(verifier, tmp_path, tampered, record.group(0)), "a changed body fails"

    # `mailgw sendmail` goes through the same stages: signed too.
    import sys
    mark = uuid.uuid4().hex
    done = subprocess.run([sys.executable, "-m", "mailgw.cli", "sendmail", "-i", "-f", ALICE,
                           "--config", str(server.config_path), "partner@remote.example"],
                          input=f"From: {ALICE}\nTo: partner@remote.example\nSubject: cron {mark}\n\nreport\n".encode(),
                          capture_output=True, env=e2e.server_env(), cwd=server.root, timeout=30)
    assert done.returncode == 0, done.stderr
    sink.wait_for(2)
    relayed = sink.messages[1][2].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert mark.encode() in relayed and relayed.startswith(b"DKIM-Signature: ")
    assert "succeeded" in _opendkim(verifier, tmp_path, relayed, record.group(0)), "sendmail's copy verifies"


def _opendkim(verifier: str, tmp_path, message: bytes, record: str) -> str:
    """libopendkim's verifier in test mode (`opendkim -t FILE`), the key
    record read from a file (opendkim.conf TestPublicKeys), never from DNS.
    (opendkim-testmsg cannot take a key from a file, and Debian 12's fails
    on every input: `dkim_chunk(): Syntax error`.) It exits 0 either way and
    says "verification (...) succeeded" or "... failed" on stdout."""
    keys = tmp_path / "test-keys"
    keys.write_text(f"mail1._domainkey.example.test {record}\n")
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    done = subprocess.run([verifier, "-x", str(conf), "-t", str(path)], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def test_a_loopback_client_is_localhost_in_received(make_server, zone):
    """Loopback clients are "localhost", as Postfix writes them, whatever the DNS says
    (here a PTR that would otherwise name it); forward-confirmed names of other
    clients are tested through the SMTP protocol in tests/unit/test_auth_stages.py."""
    zone({"1.0.0.127.in-addr.arpa": {"PTR": ["client.example.net"]},
          "client.example.net": {"A": ["127.0.0.1"]}})
    server = make_server().start()
    mark = uuid.uuid4().hex
    code, _ = _inbound(server, "someone@elsewhere.example", ALICE,
                       f"From: someone@elsewhere.example\r\nX-Test-Marker: {mark}\r\n\r\nhi\r\n".encode())
    assert code == 250
    _, stored = server.find(ALICE, mark)
    assert re.search(rb"^Received: from client\.example\.net \(localhost \[127\.0\.0\.1\]\)",
                     stored, re.M), stored[:400]
