"""End to end, issue 18 (in progress): a script stored with `mailgw sieve`
while the server runs files and flags a message, a vacation script answers
once per sender and never a list message (the reply reaches the smarthost
sink with the null sender), and a script broken on disk falls back to INBOX.
Real twistd, real smtplib, an aiosmtpd sink as the smarthost."""
from __future__ import annotations

import uuid

import pytest

from sink import wait_until_queue_empty

pytestmark = pytest.mark.e2e
ALICE = "alice@example.test"


def put_script(e2e, server, text: str, name: str = "main") -> None:
    path = server.root / f"{name}.sieve"
    path.write_text(text)
    for args in (["put", ALICE, name, str(path)], ["activate", ALICE, name]):
        done = e2e.run_cli(["sieve", *args, "--config", str(server.config_path)], cwd=server.root)
        assert done.returncode == 0, done.stderr


def deliver(server, mark: str, *, subject: str = "hello", sender: str = "carol@elsewhere.example",
            headers: str = "") -> None:
    client = server.smtp("relay")
    client.ehlo(server.CLIENT_NAME)
    server.send(client, sender, [ALICE],
                (f"From: <{sender}>\r\nTo: Alice <{ALICE}>\r\nSubject: {subject}\r\n{headers}"
                 f"Message-ID: <{mark}@elsewhere.example>\r\nX-Test-Marker: {mark}\r\n\r\nbody\r\n").encode())
    client.quit()


def folder_files(server, folder: str):
    base = server.mailbox(ALICE) / folder
    return [p for sub in ("new", "cur") if (base / sub).is_dir() for p in (base / sub).iterdir()]


def test_fileinto_with_flags_and_a_broken_script_falls_back_to_inbox(e2e, make_server, sink):
    server = make_server(relay_port=sink.controller.port).start()
    put_script(e2e, server, 'require ["fileinto", "imap4flags"];\n'
                            'if header :contains "subject" "report" {\n'
                            '  fileinto :flags "\\\\Flagged" "Reports";\n}\n')
    mark = uuid.uuid4().hex
    deliver(server, mark, subject="weekly report")
    (stored,) = folder_files(server, ".Reports")
    assert mark.encode() in stored.read_bytes() and stored.name.endswith(":2,F")
    assert "sieve: folder Reports" in server.log_text()

    # Broken behind the store's back (uploads are checked): the mail still arrives, in INBOX.
    script = next((server.data_dir / "sieve" / "example.test" / "alice" / "scripts").iterdir())
    script.write_text('if header :nope "subject" "x" { discard; }\n')
    mark = uuid.uuid4().hex
    deliver(server, mark, subject="weekly report")
    server.find(ALICE, mark)
    assert "is not usable, ignored" in server.log_text()


def test_vacation_answers_once_per_sender_and_never_a_list(e2e, make_server, sink):
    server = make_server(relay_port=sink.controller.port).start()
    put_script(e2e, server, 'require "vacation";\n'
                            'vacation :days 1 :subject "Out of office" "Back on Monday.";\n')
    first = uuid.uuid4().hex
    deliver(server, first)
    sink.wait_for(1)
    (mail_from, rcpt_tos, content), = sink.messages
    assert (mail_from, rcpt_tos) == ("<>", ["carol@elsewhere.example"])     # the null sender
    assert b"Auto-Submitted: auto-replied" in content and b"Subject: Out of office" in content
    assert f"In-Reply-To: <{first}@elsewhere.example>".encode() in content
    deliver(server, uuid.uuid4().hex)                                        # same sender: no reply
    server.wait_for_log("replied within the period")
    deliver(server, uuid.uuid4().hex, headers="List-Id: <news.elsewhere.example>\r\n",
            sender="news@elsewhere.example")                                 # a list: no reply
    wait_until_queue_empty(server)
    assert len(sink.messages) == 1
    assert len(server.messages(ALICE)) == 3                                  # every message is kept
    assert "replied within the period" in server.log_text()
