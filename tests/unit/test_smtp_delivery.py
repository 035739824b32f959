"""What the server hands to the store and the spool, and how storage errors become replies."""
from __future__ import annotations



from mailgw.errors import StorageFull
from smtp_harness import Session
from test_smtp_security import start_data


def test_message_is_stored_with_received_header_and_unstuffed():
    s = Session()
    start_data(s)
    s.send(b"Subject: dots\r\n\r\n..leading dot\r\n.\r\n")
    mailboxes, message = s.store.delivered[0]
    assert mailboxes == ["alice@example.test"]
    lines = message.split(b"\r\n")
    assert lines[0].startswith(b"Received: from client.test ([192.0.2.10])")
    assert b"by mail.example.test (mailgw) with ESMTP id Q000000000000001" in message
    assert b"for <alice@example.test>;" in message
    assert message.endswith(b"Subject: dots\r\n\r\n.leading dot\r\n")


def test_first_line_dot_stuffing_and_empty_message():
    s = Session()
    start_data(s)
    s.send(b"..first\r\n.\r\n")
    assert s.store.delivered[0][1].endswith(b"\r\n.first\r\n")
    start_data(s)
    s.send(b".\r\n")
    assert s.store.delivered[1][1].endswith(b"\r\n")


def test_body_split_across_many_packets_and_terminator_split():
    s = Session()
    start_data(s)
    for piece in (b"Subj", b"ect: x\r", b"\n\r\nline\r\n", b"\r", b"\n.", b"\r", b"\n"):
        replies = s.send(piece)
    assert replies == ["250 2.0.0 Ok: queued as Q000000000000001"]
    assert s.store.delivered[0][1].endswith(b"Subject: x\r\n\r\nline\r\n\r\n")


def test_received_header_says_tls_and_auth_rfc3848():
    s = Session(role="submissions", tls=True, starttls=False)
    s.ehlo()
    s.login()
    s.last("MAIL FROM:<alice@example.test>")
    s.last("RCPT TO:<bob@example.test>")
    s.last("RCPT TO:<friend@elsewhere.test>")
    s.last("DATA")
    s.send(b"hi\r\n.\r\n")
    message = s.store.delivered[0][1]
    assert b"with ESMTPSA id" in message and b"(Authenticated sender: alice@example.test)" in message
    assert b"(using TLS)" in message
    assert b"for <" not in message          # several recipients: none named


def test_dsn_and_envelope_parameters_are_stored_for_the_queue_rfc3461():
    s = Session(client="10.9.9.9")
    s.ehlo()
    assert s.last("MAIL FROM:<a@x.test> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME SIZE=100") == "250 2.1.0 Ok"
    assert s.last("RCPT TO:<r@elsewhere.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;r+40elsewhere.test") == "250 2.1.5 Ok"
    assert s.last("RCPT TO:<q@elsewhere.test> NOTIFY=NEVER") == "250 2.1.5 Ok"
    s.last("DATA")
    assert s.send(b"x\r\n.\r\n") == ["250 2.0.0 Ok: queued as Q000000000000001"]
    queue_id, envelope, _ = s.spool.queued[0]
    assert queue_id == envelope["id"] == "Q000000000000001"
    assert envelope["version"] == 1 and envelope["ret"] == "HDRS" and envelope["envid"] == "abc+def"
    assert envelope["body"] == "8BITMIME" and envelope["sender"] == "a@x.test"
    assert envelope["client"]["ip"] == "10.9.9.9" and envelope["client"]["helo"] == "client.test"
    first, second = envelope["recipients"]
    assert first["notify"] == ["SUCCESS", "DELAY"] and first["orcpt"] == "rfc822;r@elsewhere.test"
    assert second["notify"] == ["NEVER"] and first["state"] == "pending"


def test_unknown_and_malformed_parameters():
    s = Session()
    s.ehlo()
    assert s.last("MAIL FROM:<a@x.test> FROB=1") == "555 5.5.4 Unsupported parameter FROB"
    assert s.last("MAIL FROM:<a@x.test> SIZE=abc") == "501 5.5.4 Bad SIZE parameter"
    assert s.last("MAIL FROM:<a@x.test> SIZE=1 SIZE=2") == "501 5.5.4 Duplicate parameter SIZE"
    assert s.last("MAIL FROM:<a@x.test>") == "250 2.1.0 Ok"
    assert s.last("RCPT TO:<alice@example.test> NOTIFY=NEVER,SUCCESS") == "501 5.5.4 Bad NOTIFY parameter"
    assert s.last("RCPT TO:<alice@example.test> XFOO") == "555 5.5.4 Unsupported parameter XFOO"


def test_smtputf8_addresses_rfc6531():
    s = Session(client="10.0.0.5")
    s.ehlo()
    assert s.last("MAIL FROM:<jösé@x.test>") == "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    assert s.last("MAIL FROM:<jösé@x.test> SMTPUTF8") == "250 2.1.0 Ok"
    assert s.last("RCPT TO:<用户@例子.测试>") == "250 2.1.5 Ok"
    s.last("DATA")
    s.send("Subject: ü\r\n\r\nü\r\n.\r\n".encode())
    queue_id, envelope, message = s.spool.queued[0]
    assert envelope["sender_utf8"] is True and envelope["recipients"][0]["address"] == "用户@例子.测试"
    assert b"with UTF8SMTP id" in message


def test_postmaster_always_accepted_rfc5321_4_5_1():
    s = Session()
    s.ehlo()
    s.last("MAIL FROM:<a@x.test>")
    assert s.last("RCPT TO:<Postmaster>") == "250 2.1.5 Ok"
    assert s.last("RCPT TO:<POSTMASTER@example.org>") == "250 2.1.5 Ok"
    s.last("DATA")
    s.send(b"x\r\n.\r\n")
    assert s.store.delivered[0][0] == ["postmaster@example.test"]


def test_several_local_recipients_one_delivery_each_mailbox():
    s = Session()
    s.ehlo()
    s.last("MAIL FROM:<a@x.test>")
    for rcpt in ("alice@example.test", "bob@example.test", "ALICE@example.test", "alice+tag@example.test"):
        assert s.last(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Ok"
    s.last("DATA")
    s.send(b"x\r\n.\r\n")
    assert len(s.store.delivered) == 1
    assert s.store.delivered[0][0] == ["alice@example.test", "bob@example.test"]


def test_disk_full_gives_452_and_nothing_is_acknowledged():
    s = Session()
    s.store.fail_with = StorageFull()
    start_data(s)
    assert s.send(b"x\r\n.\r\n") == ["452 4.3.1 Insufficient system storage"]
    assert s.last("NOOP") == "250 2.0.0 Ok"


def test_unexpected_storage_error_gives_451_without_internals():
    s = Session()
    s.store.fail_with = RuntimeError("secret internal path /var/x")
    start_data(s)
    replies = s.send(b"x\r\n.\r\n")
    assert replies == ["451 4.3.0 Local error in processing, try again later"]
    assert "secret" not in "".join(replies)


def test_spool_failure_rolls_back_local_copies():
    s = Session(client="10.0.0.1")
    s.spool.fail_with = StorageFull()
    s.ehlo()
    s.last("MAIL FROM:<a@x.test>")
    s.last("RCPT TO:<alice@example.test>")
    s.last("RCPT TO:<far@elsewhere.test>")
    s.last("DATA")
    assert s.send(b"x\r\n.\r\n") == ["452 4.3.1 Insufficient system storage"]
    assert s.store.discarded == ["/fake/alice@example.test/new/1"]


def test_pipelined_commands_wait_for_a_slow_commit():
    s = Session()
    s.store.pending = []
    start_data(s)
    assert s.send(b"x\r\n.\r\nNOOP\r\nQUIT\r\n") == []        # nothing may overtake the 250
    d, paths = s.store.pending.pop()
    d.callback(paths)
    assert s.read() == ["250 2.0.0 Ok: queued as Q000000000000001", "250 2.0.0 Ok", "221 2.0.0 Bye"]
