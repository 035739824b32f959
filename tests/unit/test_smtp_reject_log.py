"""Every refused MAIL, RCPT, DATA and message is logged in one Postfix-shaped
line (for fail2ban and the operator), and every local delivery in the queue
runner's shape."""
from __future__ import annotations

import re

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from smtp_harness import Session

UNTRUSTED = "192.0.2.10"


@pytest.fixture
def lines():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events if (e.get("log_namespace") or "").startswith(("mailgw.smtp", "mailgw.routing"))]
    globalLogPublisher.removeObserver(events.append)


def rejects(lines):
    return [line for line in lines() if ": reject: " in line]


def test_unknown_user_rcpt_is_logged(lines):
    s = Session(client=UNTRUSTED)
    s.ehlo("client.test")
    s.last("MAIL FROM:<a@elsewhere.test> SIZE=100")
    assert s.last("RCPT TO:<nobody@example.test>").startswith("550 5.1.1")
    assert rejects(lines) == [
        "NOQUEUE: reject: RCPT from unknown[192.0.2.10]: 550 5.1.1 <nobody@example.test>: "
        "User unknown in local recipient table; from=<a@elsewhere.test> to=<nobody@example.test> "
        "proto=ESMTP helo=<client.test>"]


def test_relay_denied_is_logged(lines):
    s = Session(client=UNTRUSTED)
    s.cmd("HELO client.test")
    s.last("MAIL FROM:<>")
    assert s.last("RCPT TO:<victim@elsewhere.test>").startswith("554 5.7.1")
    assert rejects(lines) == [
        "NOQUEUE: reject: RCPT from unknown[192.0.2.10]: 554 5.7.1 <victim@elsewhere.test>: "
        "Relay access denied; from=<> to=<victim@elsewhere.test> proto=SMTP helo=<client.test>"]


def test_mail_refusals_are_logged(lines):
    s = Session(role="submission", client="2001:db8::7")
    s.ehlo("c.test")
    assert s.last("MAIL FROM:<a@b.test> SIZE=999999999999").startswith("552 5.3.4")
    assert s.last("MAIL FROM:<a@b.test>").startswith("530 5.7.0")
    assert rejects(lines) == [
        "NOQUEUE: reject: MAIL from unknown[2001:db8::7]: 552 5.3.4 <a@b.test>: "
        "Message size exceeds fixed maximum message size; from=<a@b.test> proto=ESMTP helo=<c.test>",
        "NOQUEUE: reject: MAIL from unknown[2001:db8::7]: 530 5.7.0 <a@b.test>: "
        "Authentication required; from=<a@b.test> proto=ESMTP helo=<c.test>"]


def test_syntax_errors_of_mail_and_rcpt_are_logged_without_control_characters(lines):
    s = Session(client=UNTRUSTED)
    s.ehlo()
    assert s.last("MAIL FROM:a@b.test").startswith("501 ")
    assert s.send(b"MAIL FROM:<a\x1b[2J@b.test\x00\x85>\r\n")[0].startswith("501 5.5.2")
    s.last("MAIL FROM:<a@b.test>")
    assert s.last("RCPT TO:<@>").startswith("501 ")
    logged = rejects(lines)
    assert len(logged) == 3
    assert all(line.startswith("NOQUEUE: reject: ") for line in logged)
    assert logged[0].startswith("NOQUEUE: reject: MAIL from unknown[192.0.2.10]: 501 ")
    assert logged[1].startswith(r"NOQUEUE: reject: MAIL from unknown[192.0.2.10]: 501 5.5.2 <a\x1b[2J@b.test\x00"), \
        logged[1]
    assert logged[1].isprintable()
    assert logged[2].startswith("NOQUEUE: reject: RCPT from unknown[192.0.2.10]: 501 ")


def test_data_refusals_are_logged_with_the_queue_id_once_there_is_one(lines):
    s = Session(client=UNTRUSTED, smtp={"max_message_size": 2000})
    s.ehlo("c.test")
    s.last("MAIL FROM:<a@elsewhere.test>")
    assert s.last("DATA").startswith("503 ")                 # no RCPT yet: no queue id
    s.last("RCPT TO:<alice@example.test>")
    s.last("RCPT TO:<bob@example.test>")
    s.last("DATA")
    assert s.send(b"bare\nLF\r\n.\r\n")[0].startswith("554 5.6.0")
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<alice@example.test>")
    s.last("DATA")
    assert s.send(b"X" * 900 + b"\r\n" + b"Y" * 900 + b"\r\n" + b"Z" * 900 + b"\r\n.\r\n")[0].startswith("552 ")
    assert rejects(lines) == [
        "NOQUEUE: reject: DATA from unknown[192.0.2.10]: 503 5.5.1 Need RCPT command; "
        "from=<a@elsewhere.test> proto=ESMTP helo=<c.test>",
        "Q000000000000001: reject: END-OF-MESSAGE from unknown[192.0.2.10]: 554 5.6.0 Message refused: "
        "bare CR or LF in message (RFC 5321 section 2.3.8); from=<a@elsewhere.test> "
        "to=<alice@example.test,bob@example.test> proto=ESMTP helo=<c.test>",
        "Q000000000000002: reject: END-OF-MESSAGE from unknown[192.0.2.10]: 552 5.3.4 Message size "
        "exceeds fixed maximum message size; from=<a@elsewhere.test> to=<alice@example.test> "
        "proto=ESMTP helo=<c.test>"]


def test_failed_store_is_logged_as_a_reject(lines):
    from mailgw.errors import StorageFull
    s = Session()
    s.ehlo()
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<alice@example.test>")
    s.last("DATA")
    s.store.fail_with = StorageFull()
    assert s.send(b"hi\r\n.\r\n")[0].startswith("452 4.3.1")
    (line,) = rejects(lines)
    assert line.startswith("Q000000000000001: reject: END-OF-MESSAGE from unknown[192.0.2.10]: 452 4.3.1 ")


def test_accepted_commands_and_other_errors_are_not_logged_as_rejects(lines):
    s = Session()
    s.ehlo()
    s.last("NOOP extra")
    s.last("FOO")
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<alice@example.test>")
    s.last("DATA")
    assert s.send(b"hi\r\n.\r\n")[0].startswith("250 ")
    assert rejects(lines) == []


def test_local_delivery_is_logged_per_mailbox(lines):
    s = Session()
    s.ehlo()
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<bob@example.test>")
    s.last("RCPT TO:<Alice+news@example.test>")
    s.last("DATA")
    assert s.send(b"hi\r\n.\r\n")[0].startswith("250 ")
    sent = [line for line in lines() if "relay=local" in line]
    assert len(sent) == 2
    assert re.fullmatch(r"Q000000000000001: to=<alice@example\.test>, orig_to=<Alice\+news@example\.test>, "
                        r"relay=local, delay=\d+\.\d\d, dsn=2\.0\.0, status=sent \(delivered to maildir\)", sent[0])
    assert re.fullmatch(r"Q000000000000001: to=<bob@example\.test>, relay=local, delay=\d+\.\d\d, "
                        r"dsn=2\.0\.0, status=sent \(delivered to maildir\)", sent[1])


def test_no_delivery_line_when_the_store_fails(lines):
    from mailgw.errors import StorageFailed
    s = Session()
    s.ehlo()
    s.last("MAIL FROM:<a@elsewhere.test>")
    s.last("RCPT TO:<bob@example.test>")
    s.last("DATA")
    s.store.fail_with = StorageFailed()
    assert s.send(b"hi\r\n.\r\n")[0].startswith("451 ")
    assert [line for line in lines() if "relay=local" in line] == []
