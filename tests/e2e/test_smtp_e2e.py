"""End to end: the real `twistd mailgw` with smtplib, swaks and a raw socket.

One server for the whole module (see conftest.py): relay, submission and
submissions listeners on 127.0.0.1. 127.0.0.1 is an untrusted client;
127.0.0.2 (as source address) is in trusted_networks.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import uuid

import pytest


pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.test", "bob@example.test"
USERS = {ALICE: "secret", BOB: "hunter2"}      # as made by conftest.py


def marker() -> str:
    return uuid.uuid4().hex


def assert_stored(server, user: str, mark: str, message: bytes, queue_id: str) -> bytes:
    """The message is in user's Maildir new/ byte for byte (LF), behind our Received: header."""
    name, stored = server.find(user, mark)
    assert b"\r" not in stored, "Maildir files are stored with LF line ends"
    received, rest = server.split_received(stored)
    assert rest == message.replace(b"\r\n", b"\n")
    assert f"by {server.HOSTNAME} (mailgw) with ".encode() in received
    assert f" id {queue_id}".encode() in received
    # Dovecot-style sizes: S= octets on disk, W= octets in the CRLF (RFC 822) form.
    sizes = re.search(r",S=(\d+),W=(\d+)$", name)
    assert sizes, name
    assert int(sizes.group(1)) == len(stored)
    assert int(sizes.group(2)) == len(stored) + stored.count(b"\n")
    return received


def queued_envelope(server, queue_id: str) -> tuple[dict, bytes]:
    env = server.queue_active / f"{queue_id}.env"
    msg = server.queue_active / f"{queue_id}.msg"
    assert env.is_file() and msg.is_file(), sorted(p.name for p in server.queue_active.iterdir())
    return json.loads(env.read_text()), msg.read_bytes()


def ehlo_keywords(client: smtplib.SMTP) -> set[str]:
    code, _ = client.ehlo()          # as local_hostname, i.e. CLIENT_NAME
    assert code == 250
    return {name.upper() for name in client.esmtp_features}


# -- relay listener -------------------------------------------------------------


def test_relay_plain_delivery_is_byte_for_byte(server):
    mark = marker()
    message = server.build_message(mark, body=b"Line one\r\n  indented\r\n\r\ntrailing spaces   \r\n\tTab\r\n")
    with server.smtp("relay") as client:
        keywords = ehlo_keywords(client)
        assert "STARTTLS" in keywords and "AUTH" not in keywords and "PIPELINING" in keywords
        queue_id = server.send(client, "someone@elsewhere.test", [ALICE], message)
    received = assert_stored(server, ALICE, mark, message, queue_id)
    assert received.startswith(f"Received: from {server.CLIENT_NAME} (localhost [127.0.0.1])".encode())
    assert f"for <{ALICE}>".encode() in received
    assert b" with ESMTP id " in received        # no TLS, no AUTH
    # Local mail is not relayed: nothing in the queue for it.
    assert not (server.queue_active / f"{queue_id}.env").exists()


def test_relay_two_local_recipients_get_one_copy_each(server):
    mark = marker()
    message = server.build_message(mark)
    with server.smtp("relay") as client:
        client.ehlo(server.CLIENT_NAME)
        queue_id = server.send(client, "someone@elsewhere.test", [ALICE, BOB], message)
    stored_alice = assert_stored(server, ALICE, mark, message, queue_id)
    stored_bob = assert_stored(server, BOB, mark, message, queue_id)
    assert stored_alice == stored_bob
    assert b"for <" not in stored_alice          # RFC 5321 §7.2: no recipient named with two


def test_relay_unknown_local_user_is_refused_with_550(server):
    with server.smtp("relay") as client:
        client.ehlo(server.CLIENT_NAME)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("someone@elsewhere.test", ["nobody@example.test"], server.build_message(marker()))
    code, text = refused.value.recipients["nobody@example.test"]
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)


def test_relay_domainless_postmaster_is_delivered_and_traced_as_a_valid_address(server):
    # RFC 5321 §4.1.1.3: "RCPT TO:<Postmaster>" without a domain must be accepted.
    # The trace (Received: "for <...>") and the log must still name a valid
    # address, never "<postmaster@>".
    mark = marker()
    message = server.build_message(mark, to="postmaster")
    with server.smtp("relay") as client:
        client.ehlo()
        queue_id = server.send(client, "someone@elsewhere.test", ["Postmaster"], message)
    received = assert_stored(server, "postmaster@example.test", mark, message, queue_id)
    accepted = [line for line in server.log_text().splitlines() if f"{queue_id}: accepted " in line]
    assert b"<postmaster@>" not in received, received
    assert "<postmaster@>" not in accepted[0], accepted[0]


def test_relay_to_remote_from_untrusted_address_is_denied_554(server):
    with server.smtp("relay") as client:
        client.ehlo(server.CLIENT_NAME)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("someone@elsewhere.test", ["x@elsewhere.test"], server.build_message(marker()))
    code, text = refused.value.recipients["x@elsewhere.test"]
    assert code == 554 and text.startswith(b"5.7.1"), (code, text)
    # ... and a local recipient in the same transaction does not unlock it.
    with server.smtp("relay") as client:
        client.ehlo(server.CLIENT_NAME)
        assert client.mail("someone@elsewhere.test")[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        code, text = client.rcpt("x@elsewhere.test")
        assert code == 554 and text.startswith(b"5.7.1")


def test_relay_to_remote_from_trusted_source_address_is_queued(server):
    mark = marker()
    message = server.build_message(mark, to="x@elsewhere.test")
    with server.smtp("relay", source="127.0.0.2") as client:
        client.ehlo(server.CLIENT_NAME)
        queue_id = server.send(client, "someone@elsewhere.test", ["x@elsewhere.test"], message)
    envelope, stored = queued_envelope(server, queue_id)
    assert envelope["id"] == queue_id and envelope["version"] == 1
    assert [r["address"] for r in envelope["recipients"]] == ["x@elsewhere.test"]
    assert envelope["sender"] == "someone@elsewhere.test"
    assert envelope["client"]["ip"] == "127.0.0.2" and envelope["client"]["auth"] is None
    received, rest = server.split_received(stored, newline=b"\r\n")
    assert rest == message, "the spool keeps the CRLF wire form"
    assert envelope["size"] == len(stored)
    assert received.startswith(f"Received: from {server.CLIENT_NAME} (localhost [127.0.0.2])".encode())


def test_relay_mixed_local_and_remote_recipients(server):
    mark = marker()
    message = server.build_message(mark)
    with server.smtp("relay", source="127.0.0.2") as client:
        client.ehlo(server.CLIENT_NAME)
        queue_id = server.send(client, "someone@elsewhere.test", [ALICE, "y@elsewhere.test"], message)
    assert_stored(server, ALICE, mark, message, queue_id)
    envelope, _ = queued_envelope(server, queue_id)
    assert [r["address"] for r in envelope["recipients"]] == ["y@elsewhere.test"]


def test_relay_starttls_then_auth_may_relay(server):
    mark = marker()
    message = server.build_message(mark, sender=ALICE, to="friend@elsewhere.test")
    with server.smtp("relay") as client:
        client.ehlo(server.CLIENT_NAME)
        client.starttls(context=server.tls_client_context())
        keywords = ehlo_keywords(client)
        assert "AUTH" in keywords and "STARTTLS" not in keywords
        client.login(ALICE, USERS[ALICE])
        queue_id = server.send(client, ALICE, ["friend@elsewhere.test"], message)
    envelope, stored = queued_envelope(server, queue_id)
    assert [r["address"] for r in envelope["recipients"]] == ["friend@elsewhere.test"]
    assert envelope["client"]["auth"] == ALICE and envelope["client"]["tls"] is True
    received, _ = server.split_received(stored, newline=b"\r\n")
    assert b"with ESMTPSA id" in received


# -- submission (587 role) ---------------------------------------------------------


def test_submission_offers_auth_only_after_starttls(server):
    with server.smtp("submission") as client:
        keywords = ehlo_keywords(client)
        assert "STARTTLS" in keywords
        assert "AUTH" not in keywords, "RFC 4954 §4: no AUTH over plain text"
        # smtplib refuses by itself, since AUTH is not advertised ...
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.login(ALICE, USERS[ALICE])
        # ... so ask the server directly: 538, and the password never got checked.
        plain = base64.b64encode(f"\0{ALICE}\0{USERS[ALICE]}".encode()).decode()
        code, text = client.docmd("AUTH", f"PLAIN {plain}")
        assert code == 538 and text.startswith(b"5.7.11"), (code, text)
        code, text = client.docmd("AUTH", "LOGIN")
        assert code == 538, (code, text)
        # Nor may mail be sent unauthenticated (RFC 6409 §4.3).
        code, text = client.mail(ALICE)
        assert code == 530 and text.startswith(b"5.7.0"), (code, text)


@pytest.mark.parametrize("how", ["login", "PLAIN", "LOGIN", "LOGIN-no-initial-response"])
def test_submission_auth_after_starttls(server, how):
    with server.smtp("submission") as client:
        client.ehlo(server.CLIENT_NAME)
        client.starttls(context=server.tls_client_context())
        keywords = ehlo_keywords(client)
        assert "AUTH" in keywords and "STARTTLS" not in keywords
        assert set(client.esmtp_features["auth"].upper().split()) >= {"PLAIN", "LOGIN"}
        client.user, client.password = BOB, USERS[BOB]
        if how == "login":
            code, text = client.login(BOB, USERS[BOB])
        elif how == "PLAIN":
            code, text = client.auth("PLAIN", client.auth_plain)
        elif how == "LOGIN":
            code, text = client.auth("LOGIN", client.auth_login)
        else:
            code, text = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235 and text.startswith(b"2.7.0"), (code, text)
        mark = marker()
        message = server.build_message(mark, sender=BOB, to=ALICE)
        queue_id = server.send(client, BOB, [ALICE], message)
    assert_stored(server, ALICE, mark, message, queue_id)


def test_submission_refuses_someone_elses_sender_address(server):
    with server.smtp("submission") as client:
        client.ehlo(server.CLIENT_NAME)
        client.starttls(context=server.tls_client_context())
        client.ehlo(server.CLIENT_NAME)
        client.login(ALICE, USERS[ALICE])
        code, text = client.mail(BOB)
        assert code == 553 and text.startswith(b"5.7.1"), (code, text)
        code, text = client.mail("alice@elsewhere.test")
        assert code == 553, (code, text)
        code, _ = client.mail(ALICE)
        assert code == 250


def test_submission_remote_is_queued_local_is_delivered_with_tls_and_user_in_received(server):
    remote_mark, local_mark = marker(), marker()
    remote = server.build_message(remote_mark, sender=ALICE, to="friend@elsewhere.test")
    local = server.build_message(local_mark, sender=ALICE, to=BOB)
    with server.smtp("submission") as client:
        client.ehlo(server.CLIENT_NAME)
        client.starttls(context=server.tls_client_context())
        client.ehlo(server.CLIENT_NAME)
        client.login(ALICE, USERS[ALICE])
        remote_id = server.send(client, ALICE, ["friend@elsewhere.test"], remote)
        local_id = server.send(client, ALICE, [BOB], local)
    envelope, _ = queued_envelope(server, remote_id)
    assert [r["address"] for r in envelope["recipients"]] == ["friend@elsewhere.test"]
    assert envelope["client"]["listener"] == "submission"
    received = assert_stored(server, BOB, local_mark, local, local_id)
    assert re.search(rb"\(using TLSv1\.[23] with cipher \S+ \(\d+ bits\)\)", received), received
    assert f"(Authenticated sender: {ALICE})".encode() in received
    assert b"with ESMTPSA id" in received


# -- submissions (465 role, implicit TLS) ----------------------------------------------


def test_submissions_is_tls_from_the_first_byte(server):
    with server.smtp("submissions") as client:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3"), client.sock.version()
        keywords = ehlo_keywords(client)
        assert "AUTH" in keywords and "STARTTLS" not in keywords
        code, _ = client.mail(ALICE)
        assert code == 530, "AUTH required before MAIL"


def test_submissions_wrong_password_535_then_right_password_sends(server):
    mark = marker()
    message = server.build_message(mark, sender=ALICE, to=BOB)
    with server.smtp("submissions") as client:
        client.ehlo(server.CLIENT_NAME)
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(ALICE, "wrong-password-e2e")
        assert failed.value.smtp_code == 535 and failed.value.smtp_error.startswith(b"5.7.8")
        client.login(ALICE, USERS[ALICE])
        queue_id = server.send(client, ALICE, [BOB], message)
    received = assert_stored(server, BOB, mark, message, queue_id)
    assert f"(Authenticated sender: {ALICE})".encode() in received and b"(using TLSv1." in received


def test_submissions_client_capped_at_tls12_still_works(server):
    context = server.tls_client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], local_hostname=server.CLIENT_NAME,
                          timeout=server.CLIENT_TIMEOUT, context=context) as client:
        assert client.sock.version() == "TLSv1.2"
        client.ehlo(server.CLIENT_NAME)
        client.login(BOB, USERS[BOB])


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_submissions_refuses_a_client_capped_at_tls11(server):
    # RFC 8996: TLS 1.0/1.1 are retired; the server's min_version is TLSv1.2.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")    # let this client offer TLS 1.1 at all
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this OpenSSL cannot offer TLS 1.1: {e}")
    with socket.create_connection(("127.0.0.1", server.ports["submissions"]), timeout=server.CLIENT_TIMEOUT) as raw:
        with pytest.raises(ssl.SSLError) as refused:
            context.wrap_socket(raw)
    if refused.value.reason != "TLSV1_ALERT_PROTOCOL_VERSION":
        pytest.skip(f"the client refused by itself ({refused.value.reason}); the server was not asked")


# -- swaks ------------------------------------------------------------------------------

SWAKS = shutil.which("swaks")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not on PATH (apt-get install swaks)")


def swaks_has_tls() -> bool:
    if SWAKS is None:
        return False
    support = subprocess.run([SWAKS, "--support"], capture_output=True, text=True, timeout=30)
    return "TLS supported" in support.stdout + support.stderr


needs_swaks_tls = pytest.mark.skipif(
    not swaks_has_tls(),
    reason="swaks has no TLS support: install libnet-ssleay-perl (a Recommends of swaks, "
           "skipped by apt-get --no-install-recommends)")


def swaks(server, listener: str, *extra: str, to: str = ALICE, sender: str = "x@elsewhere.test") -> tuple[str, str]:
    mark = marker()
    done = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{server.ports[listener]}", "--helo", server.CLIENT_NAME, "--to", to,
         "--from", sender, "--header", f"X-Test-Marker: {mark}", "--body", f"swaks body {mark}",
         "--timeout", "15", *extra],
        capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    found = re.search(r"<[~-]  250 2\.0\.0 Ok: queued as (\S+)", output)
    assert found, output
    server.queue_ids.append(found.group(1))
    return mark, found.group(1)


def assert_swaks_stored(server, user, mark, queue_id) -> bytes:
    name, stored = server.find(user, mark)
    received, rest = server.split_received(stored)
    assert f" id {queue_id}".encode() in received
    assert f"\nswaks body {mark}\n".encode() in b"\n" + rest
    return received


@needs_swaks
def test_swaks_plain_on_relay(server):
    mark, queue_id = swaks(server, "relay")
    received = assert_swaks_stored(server, ALICE, mark, queue_id)
    assert b"with ESMTP id" in received


@needs_swaks
def test_swaks_pipelined_on_relay(server):
    mark, queue_id = swaks(server, "relay", "--pipeline")
    assert_swaks_stored(server, ALICE, mark, queue_id)


@needs_swaks
@needs_swaks_tls
def test_swaks_starttls_auth_plain_on_submission(server):
    mark, queue_id = swaks(server, "submission", "--tls", "--auth", "PLAIN", "--auth-user", ALICE,
                           "--auth-password", USERS[ALICE], sender=ALICE)
    received = assert_swaks_stored(server, ALICE, mark, queue_id)
    assert b"with ESMTPSA id" in received and b"(using TLSv1." in received


@needs_swaks
@needs_swaks_tls
def test_swaks_implicit_tls_auth_login_pipelined_on_submissions(server):
    mark, queue_id = swaks(server, "submissions", "--tlsc", "--auth", "LOGIN", "--auth-user", BOB,
                           "--auth-password", USERS[BOB], "--pipeline", sender=BOB, to=ALICE)
    received = assert_swaks_stored(server, ALICE, mark, queue_id)
    assert f"(Authenticated sender: {BOB})".encode() in received


# -- raw socket: pipelining, transparency, size -------------------------------------------------


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """`count` complete replies (multi-line ones joined), in arrival order."""
    buffer = b""
    replies: list[bytes] = []
    current: list[bytes] = []
    while len(replies) < count:
        while b"\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {replies!r} {current!r} {buffer!r}"
            buffer += chunk
        line, buffer = buffer.split(b"\r\n", 1)
        current.append(line)
        if line[3:4] != b"-":
            replies.append(b"\r\n".join(current))
            current = []
    assert buffer == b"", f"unexpected extra replies: {buffer!r}"
    return replies


def test_pipelined_commands_in_one_send_get_replies_in_order(server):
    mark = marker()
    message = server.build_message(mark)
    with socket.create_connection(("127.0.0.1", server.ports["relay"]), timeout=server.CLIENT_TIMEOUT) as sock:
        assert read_replies(sock, 1)[0].startswith(b"220 ")
        sock.sendall(b"EHLO " + server.CLIENT_NAME.encode() + b"\r\n"
                     b"MAIL FROM:<someone@elsewhere.test>\r\n"
                     b"RCPT TO:<alice@example.test>\r\n"
                     b"RCPT TO:<nobody@example.test>\r\n"
                     b"RCPT TO:<x@elsewhere.test>\r\n"
                     b"RCPT TO:<bob@example.test>\r\n"
                     b"DATA\r\n")
        replies = read_replies(sock, 7)
        codes = [reply[:3] for reply in replies]
        assert codes == [b"250", b"250", b"250", b"550", b"554", b"250", b"354"], replies
        assert b"PIPELINING" in replies[0]
        # The message, its end and two more commands, all in one send too.
        sock.sendall(message + b".\r\nNOOP\r\nRSET\r\nQUIT\r\n")
        replies = read_replies(sock, 4)
        assert [reply[:3] for reply in replies] == [b"250", b"250", b"250", b"221"], replies
        queued = server.QUEUED.match(replies[0])
        assert queued, replies[0]
        queue_id = queued.group(1).decode()
        server.queue_ids.append(queue_id)
    assert_stored(server, ALICE, mark, message, queue_id)
    assert_stored(server, BOB, mark, message, queue_id)


def test_lines_starting_with_a_dot_arrive_intact(server):
    mark = marker()
    body = (b".leading dot\r\n"
            b"..two dots\r\n"
            b".\r\n"                     # a line that is just "." (smtplib stuffs it, the server unstuffs)
            b" .space dot\r\n"
            b"end.\r\n"
            b"...\r\n")
    message = server.build_message(mark, body=body)
    with server.smtp("relay") as client:
        client.ehlo(server.CLIENT_NAME)
        queue_id = server.send(client, "someone@elsewhere.test", [ALICE], message)
    assert_stored(server, ALICE, mark, message, queue_id)
    # The same over a raw socket, stuffed by hand (RFC 5321 §4.5.2).
    mark = marker()
    message = server.build_message(mark, body=body)
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    with socket.create_connection(("127.0.0.1", server.ports["relay"]), timeout=server.CLIENT_TIMEOUT) as sock:
        read_replies(sock, 1)
        sock.sendall(b"HELO " + server.CLIENT_NAME.encode() + b"\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(stuffed + b".\r\n")
        queued = server.QUEUED.match(read_replies(sock, 1)[0])
        assert queued
        server.queue_ids.append(queued.group(1).decode())
    received = assert_stored(server, ALICE, mark, message, queued.group(1).decode())
    assert b" with SMTP id " in received


def test_one_mebibyte_message_arrives_intact(server):
    mark = marker()
    lines = []
    size = 0
    n = 0
    while size < 1024 * 1024:
        line = f"{n:08d} {uuid.uuid5(uuid.NAMESPACE_OID, str(n)).hex * 2}".encode()   # 73 octets
        if n % 97 == 0:
            line = b"." + line
        lines.append(line)
        size += len(line) + 2
        n += 1
    message = server.build_message(mark, body=b"\r\n".join(lines) + b"\r\n")
    assert len(message) > 1024 * 1024
    with server.smtp("relay") as client:
        client.ehlo(server.CLIENT_NAME)
        queue_id = server.send(client, "someone@elsewhere.test", [ALICE], message)
    assert_stored(server, ALICE, mark, message, queue_id)


def test_starttls_command_injection_is_not_executed_inside_tls(server):
    # CVE-2011-0411: a command sent in the clear right behind STARTTLS must not
    # be answered inside the TLS session.
    with socket.create_connection(("127.0.0.1", server.ports["submission"]), timeout=server.CLIENT_TIMEOUT) as raw:
        assert read_replies(raw, 1)[0].startswith(b"220 ")
        raw.sendall(b"EHLO " + server.CLIENT_NAME.encode() + b"\r\n")
        read_replies(raw, 1)
        raw.sendall(b"STARTTLS\r\nNOOP injected\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = raw.recv(1)
            assert chunk
            line += chunk
        assert line.startswith(b"220 "), line
        with server.tls_client_context().wrap_socket(raw) as tls:
            tls.sendall(b"EHLO " + server.CLIENT_NAME.encode() + b"\r\n")
            replies = read_replies(tls, 1)
            assert replies[0].startswith(b"250-" + server.HOSTNAME.encode()), replies
            assert b"AUTH PLAIN LOGIN" in replies[0]


def test_client_vanishing_mid_data_stores_nothing(server):
    mark = marker()
    message = server.build_message(mark)
    with socket.create_connection(("127.0.0.1", server.ports["relay"]), timeout=server.CLIENT_TIMEOUT) as sock:
        read_replies(sock, 1)
        sock.sendall(b"HELO " + server.CLIENT_NAME.encode() + b"\r\nMAIL FROM:<a@elsewhere.test>\r\n"
                     b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(message[: len(message) // 2])
    # The server sees the close after the data; one more full session behind it.
    with server.smtp("relay") as client:
        client.ehlo()
        assert client.noop()[0] == 250
    needle = f"X-Test-Marker: {mark}".encode()
    assert not any(needle in data for data in server.messages(ALICE).values())
    assert list((server.mailbox(ALICE) / "tmp").iterdir()) == []


# -- the log ------------------------------------------------------------------------------------


def test_log_has_one_accepted_line_per_message_and_no_password(server):
    # This module's earlier tests sent mail; send one more so this test stands alone.
    with server.smtp("submissions") as client:
        client.ehlo(server.CLIENT_NAME)
        client.login(BOB, USERS[BOB])
        server.send(client, BOB, [ALICE], server.build_message(marker(), sender=BOB))
    log = server.log_text()
    assert server.queue_ids
    for queue_id in server.queue_ids:
        lines = [line for line in log.splitlines() if f"{queue_id}: accepted " in line]
        assert len(lines) == 1, (queue_id, lines)
        assert re.search(r"client=\[127\.0\.0\.[12]\] listener=\S+ auth=\S+ from=<[^>]*> to=<", lines[0]), lines[0]
    accepted = [line for line in log.splitlines() if ": accepted " in line]
    assert len(accepted) == len(server.queue_ids), "one accepted line per 250, no more"
    secrets = ["wrong-password-e2e"]
    for user, password in USERS.items():
        secrets += [password,
                    base64.b64encode(password.encode()).decode(),
                    base64.b64encode(f"\0{user}\0{password}".encode()).decode()]
    for secret in secrets:
        assert secret not in log, f"{secret!r} appears in the server log"
    # Refused recipients, bad passwords, vanished clients: none of it is an internal error.
    assert "Traceback" not in log and "Unhandled" not in log
