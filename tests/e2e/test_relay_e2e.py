"""End to end, issue 3: submit on 587 with AUTH, the queue relays through a
smarthost to a real SMTP sink (aiosmtpd) on 127.0.0.1, and the queue empties.
"""
from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
import time
import uuid

import pytest

from sink import WAIT, queue_list, server_env, wait_until_queue_empty

pytestmark = pytest.mark.e2e
ALICE = "alice@example.test"


def submit(server, recipients, message: bytes, rcpt_options=()):
    client = server.smtp("submission")
    client.starttls(context=server.tls_client_context())
    client.login(ALICE, "secret")
    refused = client.sendmail(ALICE, recipients, message, rcpt_options=list(rcpt_options))
    client.quit()
    return refused


def test_submission_is_relayed_through_the_smarthost_and_the_queue_empties(make_server, sink):
    server = make_server(relay_port=sink.controller.port).start()
    mark = uuid.uuid4().hex
    # With its own Date: (a submission without one gets one added, RFC 6409 §8.2).
    body = (f"Subject: relay {mark}\r\nMessage-ID: <{mark}@example.test>\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\n"
            ".a line starting with a dot\r\n..two dots\r\n.\r\nend\r\n").encode()
    assert submit(server, ["friend@remote.test", "other@elsewhere.test"], body) == {}
    sink.wait_for(1)
    (mail_from, rcpt_tos, content), = sink.messages       # one relay host: one transaction
    assert mail_from == ALICE and sorted(rcpt_tos) == ["friend@remote.test", "other@elsewhere.test"]
    _, _, relayed = content.partition(b"\r\n\tby mx.example.test (mailgw) with ESMTPSA id ")
    assert relayed.split(b"\r\n", 1)[1].endswith(body), "the body must arrive byte for byte"
    wait_until_queue_empty(server)
    log = server.log_text()
    assert "to=<friend@remote.test>" in log and "status=sent" in log
    stats = subprocess.run([sys.executable, "-m", "mailgw.cli", "queue", "stats", "--json", "--config",
                            str(server.config_path)], capture_output=True, text=True, timeout=30,
                           env=server_env(), cwd=server.root)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["counters"]["sent"] == 2      # one per recipient, one connection kept


def test_a_refused_recipient_bounces_to_the_local_sender(make_server, sink):
    server = make_server(relay_port=sink.controller.port).start()
    sink.refuse["nobody@remote.test"] = "550 5.1.1 no such user here"
    submit(server, ["friend@remote.test", "nobody@remote.test"], b"Subject: half\r\n\r\nhello\r\n")
    sink.wait_for(1)
    assert sink.messages[0][1] == ["friend@remote.test"]
    wait_until_queue_empty(server)
    reports = [email.message_from_bytes(data, policy=email.policy.default)
               for data in server.messages(ALICE).values()]
    bounces = [r for r in reports if r.get_content_type() == "multipart/report"]
    assert len(bounces) == 1
    status = [p for p in bounces[0].iter_parts() if p.get_content_type() == "message/delivery-status"][0]
    recipient = status.get_payload()[1]
    assert recipient["Action"] == "failed" and recipient["Status"] == "5.1.1"
    assert "nobody@remote.test" in recipient["Final-Recipient"]


def test_success_notice_when_asked(make_server, sink):
    server = make_server(relay_port=sink.controller.port).start()
    submit(server, ["friend@remote.test"], b"Subject: notify\r\n\r\nhello\r\n", rcpt_options=["NOTIFY=SUCCESS"])
    sink.wait_for(1)
    wait_until_queue_empty(server)
    reports = [email.message_from_bytes(data, policy=email.policy.default)
               for data in server.messages(ALICE).values()]
    (report,) = [r for r in reports if r.get_content_type() == "multipart/report"]
    status = [p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status"][0]
    assert status.get_payload()[1]["Action"] in ("relayed", "delivered")


def test_unreachable_smarthost_keeps_mail_queued_and_cli_can_hold_and_delete(make_server):
    server = make_server().start()                 # relays to 127.0.0.1:1, where nothing listens
    submit(server, ["friend@remote.test"], b"Subject: stuck\r\n\r\nhello\r\n")
    deadline = time.monotonic() + WAIT
    while True:
        listed = queue_list(server, "--json")
        import json
        entries = json.loads(listed.stdout)
        if entries and entries[0]["attempts"] >= 1:
            break
        assert time.monotonic() < deadline, listed.stdout
    queue_id = entries[0]["id"]
    assert entries[0]["recipients"][0]["state"] == "pending"
    assert "Connection refused" in (entries[0]["recipients"][0]["last_reply"] or "") or \
        entries[0]["recipients"][0]["last_reply"]
    cli = [sys.executable, "-m", "mailgw.cli", "queue"]
    for action in ("hold", "release", "flush", "delete"):
        args = [action] if action == "flush" else [action, queue_id]
        done = subprocess.run(cli + args + ["--config", str(server.config_path)], capture_output=True,
                              text=True, timeout=30, env=server_env(), cwd=server.root)
        assert done.returncode == 0, (action, done.stdout, done.stderr)
    wait_until_queue_empty(server)


def test_kill9_while_relaying_loses_nothing(make_server, sink):
    """SIGKILL at random moments while messages are accepted and relayed
    (spool write, delivery, envelope update all in flight); after restarts
    every message that got a 250 reaches the sink: duplicates are allowed
    (SMTP cannot avoid them), losses are not."""
    import random
    server = make_server(relay_port=sink.controller.port).start()
    rng = random.Random(20261122)
    accepted: list[str] = []
    for _ in range(4):
        kill_after = rng.randint(3, 12)
        client = server.smtp("relay", source="127.0.0.2")      # trusted: may relay
        for index in range(15):
            mark = uuid.uuid4().hex
            client.sendmail("app@internal.test", ["friend@remote.test"],
                            f"Subject: {mark}\r\n\r\ncrash test\r\n".encode())
            accepted.append(mark)
            if index == kill_after:
                server.kill9()
                break
        server.start()
    deadline = time.monotonic() + WAIT
    def arrived():
        return [email.message_from_bytes(content)["Subject"] for _, _, content in sink.messages]
    while not set(accepted) <= set(arrived()):
        sink.arrived.clear()
        assert sink.arrived.wait(max(0.0, deadline - time.monotonic())), \
            f"lost: {sorted(set(accepted) - set(arrived()))}"
    duplicates = len(arrived()) - len(set(arrived()))
    print(f"accepted {len(accepted)}, arrived {len(arrived())}, duplicates {duplicates}")
    assert not set(accepted) - set(arrived())
    wait_until_queue_empty(server)
