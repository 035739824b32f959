"""End to end, issue 13: aliases and lists, SRS forwarding and the bounce
back, catch-all, and alias changes made with `mailgw aliases` while the
server runs (no restart). Real twistd, real smtplib, an aiosmtpd sink as the
smarthost."""
from __future__ import annotations

import time
import uuid

import pytest

from sink import wait_until_queue_empty

pytestmark = pytest.mark.e2e
ALICE, BOB = "alice@example.test", "bob@example.test"
# The aliases are re-read at once (check_interval = 0), so no test waits for a reload.
ROUTING = "[routing]\ncheck_interval = 0.0\n"


def aliases(e2e, server, *args):
    done = e2e.run_cli(["aliases", *args, "--config", str(server.config_path)], cwd=server.root)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_list_reaches_both_maildirs_and_the_external_member_with_an_srs_sender_and_its_bounce_comes_back(
        e2e, make_server, sink):
    from mailgw.routing.srs import SRS, load_secret

    server = make_server(relay_port=sink.controller.port, extra=ROUTING).start()
    aliases(e2e, server, "add", "team@example.test", ALICE, BOB, "friend@elsewhere.example")
    mark = uuid.uuid4().hex
    client = server.smtp("relay")                     # untrusted client: mail for our domain only
    client.ehlo(server.CLIENT_NAME)
    server.send(client, "someone@sender.example", ["team@example.test"],
                f"Subject: list\r\nX-Test-Marker: {mark}\r\nMessage-ID: <{mark}@sender.example>\r\n\r\nhello team\r\n".encode())
    client.quit()
    for user in (ALICE, BOB):
        _, stored = server.find(user, mark)
        assert f"Delivered-To: {user}".encode() in stored
    sink.wait_for(1)
    (mail_from, rcpt_tos, content), = sink.messages
    assert rcpt_tos == ["friend@elsewhere.example"]
    assert mail_from.startswith("SRS0=") and mail_from.endswith("@example.test"), mail_from
    assert mark.encode() in content and b"hello team" in content
    srs = SRS(load_secret(server.data_dir), "example.test", clock=time.time)
    assert srs.reverse(mail_from) == "someone@sender.example"
    wait_until_queue_empty(server)
    log = server.log_text()
    assert "to=<friend@elsewhere.example>, orig_to=<team@example.test>" in log
    assert "to=<alice@example.test>, orig_to=<team@example.test>, relay=local" in log

    # The external member's server bounces it: the bounce comes to the SRS
    # address and goes on to the original sender, not to anyone of ours.
    bounce_mark = uuid.uuid4().hex
    client = server.smtp("relay")
    client.ehlo(server.CLIENT_NAME)
    server.send(client, "", [mail_from],
                f"Subject: Undelivered Mail {bounce_mark}\r\nAuto-Submitted: auto-replied\r\n\r\n"
                f"friend@elsewhere.example: no such user\r\n".encode())
    client.quit()
    sink.wait_for(2)
    bounce_from, bounce_to, bounce = sink.messages[1]
    assert bounce_from in ("", "<>") and bounce_to == ["someone@sender.example"]   # aiosmtpd keeps "<>"
    assert bounce_mark.encode() in bounce
    wait_until_queue_empty(server)

    # A forged SRS address is refused at RCPT.
    client = server.smtp("relay")
    client.ehlo(server.CLIENT_NAME)
    assert client.mail("<>")[0] == 250
    forged = "SRS0=" + ("AAAA" if mail_from[5:9] != "AAAA" else "BBBB") + mail_from[9:]   # another hash
    code, text = client.rcpt(f"<{forged}>")
    assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
    client.quit()


def test_catch_all_and_alias_changes_take_effect_without_a_restart(e2e, make_server):
    server = make_server(extra=ROUTING).start()
    pid = server.pid
    client = server.smtp("relay")
    client.ehlo(server.CLIENT_NAME)
    client.mail("<x@sender.example>")
    code, _ = client.rcpt("<sales@example.test>")
    assert code == 550
    client.rset()
    client.quit()

    aliases(e2e, server, "add", "sales@example.test", BOB)
    aliases(e2e, server, "add", "@example.test", ALICE)          # catch-all
    mark = uuid.uuid4().hex
    client = server.smtp("relay")
    client.ehlo(server.CLIENT_NAME)
    server.send(client, "x@sender.example", ["sales@example.test", "whoever@example.test", "Bob@example.test"],
                f"Subject: catch\r\nX-Test-Marker: {mark}\r\n\r\nhi\r\n".encode())
    client.quit()
    server.find(BOB, mark)                    # sales@ and bob@ itself: one copy
    assert sum(mark.encode() in data for data in server.messages(BOB).values()) == 1
    server.find(ALICE, mark)                  # the catch-all

    aliases(e2e, server, "delete", "@example.test")
    client = server.smtp("relay")
    client.ehlo(server.CLIENT_NAME)
    client.mail("<x@sender.example>")
    assert client.rcpt("<whoever@example.test>")[0] == 550
    client.quit()
    assert server.pid == pid                  # the same process all along


def test_resolve_shows_what_the_running_server_does(e2e, make_server):
    server = make_server(extra=ROUTING)
    server.write_config()
    server.add_users()
    aliases(e2e, server, "add", "info@example.test", ALICE, "ext@elsewhere.example")
    done = e2e.run_cli(["resolve", "info@example.test", "--config", str(server.config_path)], cwd=server.root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [ALICE, "ext@elsewhere.example remote forwarded"]
    done = e2e.run_cli(["resolve", "abuse@example.test", "--config", str(server.config_path)], cwd=server.root)
    assert done.stdout == "postmaster@example.test\n"


def test_an_over_quota_user_gets_452_over_smtp_and_overquota_over_imap_while_others_keep_receiving(e2e, make_server):
    import imaplib

    # alice may hold 2 messages; bob has the default (no limit).
    server = make_server(extra=ROUTING + "\n[quota]\ndefault_messages = 0\n")
    server.write_config()
    server.add_users()
    done = e2e.run_cli(["quota", "set", ALICE, "--messages", "2", "--config", str(server.config_path)],
                       cwd=server.root)
    assert done.returncode == 0, done.stderr
    server.start()
    client = server.smtp("relay")
    client.ehlo(server.CLIENT_NAME)
    for n in range(2):
        server.send(client, "x@sender.example", [ALICE], f"Subject: {n}\r\n\r\nfill\r\n".encode())
    assert client.mail("<x@sender.example>")[0] == 250
    code, text = client.rcpt(f"<{ALICE}>")
    assert (code, text[:5]) == (452, b"4.2.2"), (code, text)        # RFC 3463: mailbox full, try later
    assert client.rcpt(f"<{BOB}>")[0] == 250
    assert client.data(b"Subject: for bob\r\n\r\nstill arrives\r\n")[0] == 250
    client.quit()
    assert len(server.messages(ALICE)) == 2
    assert any(b"still arrives" in data for data in server.messages(BOB).values())

    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    imap.starttls(ssl_context=server.tls_client_context())
    imap.login(ALICE, "secret")
    typ, data = imap.getquotaroot("INBOX")
    assert typ == "OK" and b'"" (MESSAGE 2 2)' in b" ".join(d for d in data[1] if isinstance(d, bytes)), data
    typ, data = imap.append("INBOX", None, None, b"Subject: appended\r\n\r\nover\r\n")
    assert typ == "NO" and b"[OVERQUOTA]" in data[0], (typ, data)
    imap.logout()
    assert len(server.messages(ALICE)) == 2

    done = e2e.run_cli(["quota", "show", ALICE, "--config", str(server.config_path)], cwd=server.root)
    assert done.returncode == 0 and "2" in done.stdout, done.stdout


def test_sendmail_t_from_a_subprocess_without_a_terminal(e2e, make_server, sink):
    import subprocess
    import sys

    server = make_server(relay_port=sink.controller.port, extra=ROUTING).start()
    aliases(e2e, server, "add", "ops@example.test", ALICE, BOB)
    mark = uuid.uuid4().hex
    message = (f"To: ops@example.test, Friend <friend@elsewhere.example>\n"
               f"Bcc: bob@example.test\nSubject: cron {mark}\nX-Test-Marker: {mark}\n\n"
               f"disk usage report\n.\nafter a lone dot\n").encode()
    done = subprocess.run([sys.executable, "-m", "mailgw.cli", "sendmail", "-t", "-i", "-f", "cron@example.test",
                           "--config", str(server.config_path)], input=message, capture_output=True,
                          env=e2e.server_env(), cwd=server.root, timeout=30)   # stdin is a pipe, not a terminal
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    _, stored = server.find(ALICE, mark)
    assert b"after a lone dot" in stored                   # -i: a "." line does not end the message
    assert b"\nDate: " in stored and b"\nMessage-ID: <" in stored   # added: the input had neither
    assert b"Bcc:" not in stored and b"mailgw sendmail" in stored
    # bob is reached twice (ops@ and Bcc): one copy.
    assert sum(mark.encode() in data for data in server.messages(BOB).values()) == 1
    sink.wait_for(1)
    (mail_from, rcpt_tos, content), = sink.messages
    assert (mail_from, rcpt_tos) == ("cron@example.test", ["friend@elsewhere.example"])
    assert b"Bcc:" not in content

    # The server stopped: sendmail cannot queue, says so and exits EX_TEMPFAIL.
    server.stop()
    done = subprocess.run([sys.executable, "-m", "mailgw.cli", "sendmail", "alice@example.test",
                           "--config", str(server.config_path)], input=b"Subject: x\n\nbody\n",
                          capture_output=True, env=e2e.server_env(), cwd=server.root, timeout=30)
    assert done.returncode == 75 and done.stderr.startswith(b"mailgw sendmail: "), done.stderr
