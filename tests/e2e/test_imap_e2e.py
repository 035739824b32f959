"""End to end, issue 5: the real service with imaplib, IMAPClient, mbsync and
curl, over STARTTLS (143-role) and implicit TLS (993-role)."""
from __future__ import annotations

import imaplib
import os
import shutil
import subprocess
import time
import uuid

import pytest

pytestmark = pytest.mark.e2e
ALICE, PASSWORD = "alice@example.test", "secret"


def deliver(server, mark: str, body: str = "hello") -> bytes:
    client = server.smtp("relay")
    client.sendmail("someone@elsewhere.test", [ALICE],
                    f"Subject: {mark}\r\nX-Test-Marker: {mark}\r\n\r\n{body}\r\n".encode())
    client.quit()
    _, stored = server.find(ALICE, mark)
    return stored.replace(b"\n", b"\r\n")


def imap_starttls(server) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    assert "LOGINDISABLED" in client.capabilities          # no password before TLS
    client.starttls(ssl_context=server.tls_client_context())
    client.login(ALICE, PASSWORD)
    return client


def test_imaplib_starttls_fetch_store_expunge(make_server):
    server = make_server().start()
    plain = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED|LOGINDISABLED|disabled"):
        plain.login(ALICE, PASSWORD)
    plain.logout()
    expected = deliver(server, uuid.uuid4().hex)
    client = imap_starttls(server)
    typ, data = client.select("INBOX")
    assert typ == "OK" and data == [b"1"]
    typ, data = client.fetch("1", "(UID RFC822.SIZE BODY.PEEK[])")
    assert typ == "OK"
    meta, body = data[0]
    assert body == expected and f"RFC822.SIZE {len(expected)}".encode() in meta
    typ, data = client.fetch("1", "(BODY.PEEK[]<0.10>)")
    assert data[0][1] == expected[:10] and b"<0>" in data[0][0]
    assert client.store("1", "+FLAGS", "(\\Seen \\Flagged $Important)")[0] == "OK"
    typ, data = client.fetch("1", "(FLAGS)")
    assert b"\\Seen" in data[0] and b"\\Flagged" in data[0] and b"$Important" in data[0]
    typ, data = client.uid("SEARCH", None, "HEADER", "X-Test-Marker", expected.split(b"X-Test-Marker: ")[1][:8].decode())
    assert typ == "OK" and data[0].split()
    client.store("1", "+FLAGS", "(\\Deleted)")
    client.expunge()
    assert client.select("INBOX")[1] == [b"0"]
    client.logout()
    assert server.messages(ALICE) == {}


def test_imaps_append_copy_move_and_folders(make_server):
    server = make_server().start()
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls_client_context(),
                               timeout=10)
    client.login(ALICE, PASSWORD)
    typ, listing = client.list()
    names = b"\n".join(listing)
    for folder, use in ((b"Drafts", b"\\Drafts"), (b"Sent", b"\\Sent"), (b"Junk", b"\\Junk"), (b"Trash", b"\\Trash")):
        assert folder in names and use in names
    message = b"Subject: appended\r\n\r\nbody\r\n"
    typ, data = client.append("Sent", None, None, message)      # no flags, no date (docs/twisted.md §4.1)
    assert typ == "OK" and b"APPENDUID" in data[0]
    typ, data = client.append("NoSuchFolder", None, None, message)
    assert typ == "NO" and b"TRYCREATE" in data[0]
    assert client.create("Projects/2026")[0] == "OK"
    client.select("Sent")
    typ, data = client.copy("1", "Projects/2026")
    assert typ == "OK"
    typ, data = client._simple_command("MOVE", "1", "Trash")
    assert typ == "OK"
    assert client.select("Sent")[1] == [b"0"]
    assert client.select("Trash")[1] == [b"1"]
    assert client.select('"Projects/2026"')[1] == [b"1"]
    typ, data = client.select("../../etc")
    assert typ == "NO"
    client.logout()


def test_imapclient_idle_sees_smtp_delivery(make_server):
    imapclient = pytest.importorskip("imapclient")
    server = make_server().start()
    context = server.tls_client_context()
    client = imapclient.IMAPClient("127.0.0.1", port=server.ports["imaps"], ssl=True, ssl_context=context, timeout=10)
    client.login(ALICE, PASSWORD)
    client.select_folder("INBOX")
    client.idle()
    mark = uuid.uuid4().hex
    deliver(server, mark)
    responses = client.idle_check(timeout=15)           # arrives in ~50 ms; generous for a loaded CI box
    client.idle_done()
    assert any(r[1] == b"EXISTS" for r in responses if len(r) > 1), responses
    messages = client.search(["HEADER", "X-Test-Marker", mark])
    assert len(messages) == 1
    fetched = client.fetch(messages, ["ENVELOPE", "BODYSTRUCTURE", "FLAGS"])
    envelope = fetched[messages[0]][b"ENVELOPE"]
    assert envelope.subject.decode() == mark
    client.logout()


def test_two_sessions_see_each_others_changes(make_server):
    server = make_server().start()
    deliver(server, uuid.uuid4().hex)
    deliver(server, uuid.uuid4().hex)
    first, second = imap_starttls(server), imap_starttls(server)
    first.select("INBOX")
    second.select("INBOX")
    first.store("1", "+FLAGS", "(\\Deleted)")
    first.expunge()
    typ, _ = second.noop()
    assert typ == "OK"
    assert second.untagged_responses.get("EXPUNGE") == [b"1"]
    typ, data = second.fetch("1:*", "(UID)")
    assert len([d for d in data if d]) == 1
    first.logout()
    second.logout()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_curl_imap_starttls_and_imaps(make_server):
    server = make_server().start()
    expected = deliver(server, uuid.uuid4().hex)
    for url, extra in ((f"imap://127.0.0.1:{server.ports['imap']}/INBOX;UID=1", ["--ssl-reqd"]),
                       (f"imaps://127.0.0.1:{server.ports['imaps']}/INBOX;UID=1", [])):
        done = subprocess.run(["curl", "-s", "-k", *extra, "--max-time", "20", "-u", f"{ALICE}:{PASSWORD}", url],
                              capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (isync) is installed by .ci/run")
@pytest.mark.parametrize("tls", ["STARTTLS", "IMAPS"])
def test_mbsync_syncs_both_ways(make_server, tmp_path, tls):
    server = make_server().start()
    marks = [uuid.uuid4().hex for _ in range(3)]
    for mark in marks:
        deliver(server, mark)
    local = tmp_path / "local"
    local.mkdir()
    cert = server.data_dir / "tls" / "cert.pem"
    port = server.ports["imap" if tls == "STARTTLS" else "imaps"]
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"IMAPAccount gw\nHost 127.0.0.1\nPort {port}\nUser {ALICE}\nPass {PASSWORD}\n"
        f"SSLType {tls}\nCertificateFile {cert}\n\n"
        f"IMAPStore remote\nAccount gw\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        f"Channel inbox\nFar :remote:INBOX\nNear :local:INBOX\nCreate Both\nExpunge Both\nSync All\n"
        f"SyncState *\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    run = lambda: subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True,
                                 timeout=60, env=env)
    done = run()
    if "certificate" in (done.stderr + done.stdout).lower() and done.returncode != 0:
        pytest.skip(f"mbsync refuses the self-signed certificate here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stdout + done.stderr
    pulled = [p.read_bytes() for p in (local / "INBOX" / "new").iterdir()] + \
             [p.read_bytes() for p in (local / "INBOX" / "cur").iterdir()]
    assert len(pulled) == 3 and all(any(m.encode() in p for p in pulled) for m in marks)
    # Near -> far: a message written locally is uploaded by the next sync.
    up = uuid.uuid4().hex
    (local / "INBOX" / "new" / f"{int(time.time())}.local.{up}").write_bytes(
        f"Subject: {up}\nX-Test-Marker: {up}\n\nfrom the laptop\n".encode())
    done = run()
    assert done.returncode == 0, done.stdout + done.stderr
    server.find(ALICE, up)                              # now on the server


def test_imapclient_over_starttls(make_server):
    imapclient = pytest.importorskip("imapclient")
    server = make_server().start()
    mark = uuid.uuid4().hex
    deliver(server, mark, body="over starttls")
    client = imapclient.IMAPClient("127.0.0.1", port=server.ports["imap"], ssl=False, timeout=10)
    assert b"LOGINDISABLED" in client.capabilities()
    client.starttls(ssl_context=server.tls_client_context())
    client.login(ALICE, PASSWORD)
    assert b"IDLE" in client.capabilities() and b"UIDPLUS" in client.capabilities()
    client.select_folder("INBOX")
    (uid,) = client.search(["HEADER", "X-Test-Marker", mark])
    body = client.fetch([uid], ["BODY.PEEK[TEXT]"])[uid][b"BODY[TEXT]"]
    assert body == b"over starttls\r\n"
    client.add_flags([uid], [b"\\Flagged"])
    assert b"\\Flagged" in client.get_flags([uid])[uid]
    client.logout()
