"""The outbound SMTP client state machine, played through StringTransport + Clock.

Each test is a short session: `S:` lines are fed to the client, `C:` lines
are what it wrote. Threats are named: smuggling (dot-stuffing at every
position), STARTTLS response injection, credentials without TLS, unbounded
replies.
"""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config_types import TLS_IMPLICIT, TLS_NONE, TLS_OPPORTUNISTIC, TLS_REQUIRED
from mailgw.queue import client
from mailgw.queue.client import (FAIL_AUTH, FAIL_GREETING, FAIL_HELO, FAIL_LOST, FAIL_PROTOCOL, FAIL_TIMEOUT,
                                 FAIL_TLS, FAIL_TLS_REQUIRED, OutboundSMTP, SessionFailure, SessionResult)
from mailgw.queue.model import DeliveryRequest, Recipient
from mailgw.smtp.codes import Reply
from mailgw.smtp.data import dot_stuff

HOSTNAME = "mail.example.test"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
REPLY_TIMEOUT = 30.0
DATA_TIMEOUT = 120.0


def make_request(*recipients, sender="alice@example.org", body="7BIT", smtputf8=False, envid=None, ret=None,
                 notify=None, orcpt=None, size=None, message=MESSAGE):
    recipients = recipients or ("bob@example.net",)
    return DeliveryRequest(
        queue_id="Q1", domain="example.net", sender=sender,
        recipients=tuple(Recipient(r, notify, orcpt) for r in recipients),
        message_path=Path("/nonexistent"), size=size or len(message), body=body, smtputf8=smtputf8,
        envid=envid, ret=ret)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    tls_options = None

    def startTLS(self, contextFactory):
        self.tls_options = contextFactory


class Conversation:
    def __init__(self, request=None, message=MESSAGE, *, policy=TLS_NONE, credentials=None,
                 tls_options="TLS-OPTIONS", cache=None):
        self.clock = Clock()
        self.transport = TLSStringTransport()
        self.protocol = OutboundSMTP(
            request=request or make_request(), message=message, hostname=HOSTNAME, clock=self.clock,
            reply_timeout=REPLY_TIMEOUT, data_timeout=DATA_TIMEOUT, tls_policy=policy,
            tls_options=None if policy in (TLS_NONE, TLS_IMPLICIT) else tls_options, credentials=credentials,
            cache=cache, cache_key=("192.0.2.1", 25) if cache is not None else None)
        self.outcomes = []
        self.protocol.result.addBoth(self.outcomes.append)
        self.protocol.makeConnection(self.transport)

    def raw(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def sent(self) -> list[str]:
        return [line for line in self.raw().decode("utf-8").split("\r\n") if line]

    def server(self, *lines: str):
        self.protocol.dataReceived("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def server_closes(self, reason=ConnectionDone):
        self.protocol.connectionLost(Failure(reason()))

    def closes(self) -> bool:
        """The client closed (or aborted): deliver connectionLost like a reactor would."""
        if not self.transport.disconnecting:
            return False
        self.protocol.connectionLost(Failure(ConnectionDone()))
        return True

    @property
    def outcome(self):
        assert len(self.outcomes) == 1, self.outcomes
        value = self.outcomes[0]
        if isinstance(value, Failure):
            value.trap(SessionFailure)
            return value.value
        return value

    def to_quit(self):
        assert self.sent() == ["QUIT"]
        self.server("221 2.0.0 Bye")
        assert self.closes()

    def greet_and_ehlo(self, *extensions):
        self.server("220 mx.example.net ESMTP")
        assert self.sent() == [f"EHLO {HOSTNAME}"]
        lines = ["mx.example.net", *extensions]
        self.server(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")


def test_delivers_in_lock_step_and_reports_per_recipient():
    c = Conversation(make_request("bob@example.net", "carol@example.net"))
    c.greet_and_ehlo("8BITMIME", "ENHANCEDSTATUSCODES")
    assert c.sent() == ["MAIL FROM:<alice@example.org>"]
    c.server("250 2.1.0 Ok")
    assert c.sent() == ["RCPT TO:<bob@example.net>"]
    c.server("250 2.1.5 Ok")
    assert c.sent() == ["RCPT TO:<carol@example.net>"]
    c.server("250 2.1.5 Ok")
    assert c.sent() == ["DATA"]
    c.server("354 go ahead")
    assert c.raw() == MESSAGE + b".\r\n"
    assert c.outcomes == []
    c.server("250 2.0.0 Ok: queued as 123")
    c.to_quit()
    result = c.outcome
    assert isinstance(result, SessionResult)
    assert result.replies == (Reply(250, "2.0.0", "Ok: queued as 123"),) * 2
    assert result.tls is None and result.dsn is False and result.greeting_name == "mx.example.net"


def test_result_waits_for_close_but_not_long_for_221():
    c = Conversation()
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 Ok", "250 Ok")
    c.sent()
    c.server("354 go")
    c.raw()
    c.server("250 Ok")
    assert c.sent() == ["QUIT"]
    assert c.outcomes == []
    c.clock.advance(client.QUIT_TIMEOUT)          # no 221: we abort
    assert c.transport.disconnecting
    c.closes()
    assert c.outcome.replies == (Reply(250, "2.0.0", "Ok"),)


def test_pipelining_sends_mail_all_rcpts_and_data_in_one_write_and_mixed_replies():
    c = Conversation(make_request("bob@example.net", "nobody@example.net", "carol@example.net"))
    c.greet_and_ehlo("PIPELINING", "ENHANCEDSTATUSCODES")
    assert c.raw() == (b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
                       b"RCPT TO:<nobody@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n")
    c.server("250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 No such user", "451 4.3.0 Try later")
    assert c.sent() == []                         # the message waits for DATA's 354
    c.server("354 go")
    c.raw()
    c.server("250 2.0.0 queued")
    c.to_quit()
    assert c.outcome.replies == (Reply(250, "2.0.0", "queued"), Reply(550, "5.1.1", "No such user"),
                                 Reply(451, "4.3.0", "Try later"))


def test_no_data_when_no_recipient_is_accepted():
    c = Conversation(make_request("a@example.net", "b@example.net"))
    c.greet_and_ehlo()
    c.sent()
    c.server("250 Ok")
    c.sent()
    c.server("550 no")
    c.sent()
    c.server("450 later")
    c.to_quit()                                   # no DATA
    assert c.outcome.replies == (Reply(550, "5.0.0", "no"), Reply(450, "4.0.0", "later"))


def test_pipelined_data_refused_when_no_recipient_is_accepted():
    c = Conversation(make_request("a@example.net", "b@example.net"))
    c.greet_and_ehlo("PIPELINING")
    assert c.sent()[-1] == "DATA"
    c.server("250 Ok", "550 no", "450 later", "554 5.5.1 No valid recipients")
    c.to_quit()
    assert c.outcome.replies == (Reply(550, "5.0.0", "no"), Reply(450, "4.0.0", "later"))


def test_pipelined_data_accepted_without_a_recipient_ends_an_empty_message_and_does_not_reuse():
    c, cache = cached_conversation()
    c.sent()
    c.server("250 Ok", "550 5.1.1 no such user", "354 go ahead")   # a confused server
    assert c.raw() == b".\r\n"                    # not the message: nothing to deliver
    assert c.outcomes == []
    c.server("250 2.0.0 Ok: queued as 9")
    c.to_quit()                                   # no idle connection to such a server
    assert len(cache) == 0
    assert c.outcome.replies == (Reply(550, "5.1.1", "no such user"),)


def test_mail_refused_applies_to_every_recipient():
    c = Conversation(make_request("a@example.net", "b@example.net"))
    c.greet_and_ehlo("PIPELINING", "ENHANCEDSTATUSCODES")
    c.sent()
    c.server("553 5.7.1 Sender rejected", "503 5.5.1 Need MAIL", "503 5.5.1 Need MAIL", "503 5.5.1 Need MAIL")
    c.to_quit()
    assert c.outcome.replies == (Reply(553, "5.7.1", "Sender rejected"),) * 2


def test_pipelined_data_refused_applies_to_accepted_recipients():
    c = Conversation(make_request("a@example.net", "b@example.net"))
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 ok", "550 no a", "250 ok", "451 4.3.0 not now")
    c.to_quit()
    assert c.outcome.replies == (Reply(550, "5.0.0", "no a"), Reply(451, "4.3.0", "not now"))


def test_data_refused_applies_to_accepted_recipients():
    c = Conversation(make_request("a@example.net", "b@example.net"))
    c.greet_and_ehlo()
    c.sent()
    c.server("250 ok")
    c.sent()
    c.server("550 no a")
    c.sent()
    c.server("250 ok")
    assert c.sent() == ["DATA"]
    c.server("554 transaction failed")
    c.to_quit()
    assert c.outcome.replies == (Reply(550, "5.0.0", "no a"), Reply(554, "5.0.0", "transaction failed"))


def test_multiline_replies_and_enhanced_codes():
    c = Conversation()
    c.greet_and_ehlo("ENHANCEDSTATUSCODES", "PIPELINING")
    c.sent()
    c.server("250 2.1.0 Ok", "550-5.7.1 first line", "550-5.7.1 second line", "550 5.7.1 third line",
             "554 5.5.1 No valid recipients")
    c.to_quit()
    assert c.outcome.replies == (Reply(550, "5.7.1", "first line second line third line"),)


def test_enhanced_codes_taken_from_the_text_when_the_class_matches():
    # Not advertised, but used like Postfix does; "250 5.1.1" is not a code of class 2.
    c = Conversation(make_request("a@example.net", "b@example.net", "c@example.net"))
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 Ok", "250 5.1.1 looks enhanced but is not advertised", "451 4.7.1 greylisted", "550 nope")
    c.sent()
    c.server("354 go")
    c.raw()
    c.server("250 fine")
    c.to_quit()
    assert c.outcome.replies == (Reply(250, "2.0.0", "fine"), Reply(451, "4.7.1", "greylisted"),
                                 Reply(550, "5.0.0", "nope"))


def test_ehlo_refused_falls_back_to_helo_without_extensions():
    c = Conversation()
    c.server("220 old.example.net")
    assert c.sent() == [f"EHLO {HOSTNAME}"]
    c.server("502 Command not implemented")
    assert c.sent() == [f"HELO {HOSTNAME}"]
    c.server("250 old.example.net")
    assert c.sent() == ["MAIL FROM:<alice@example.org>"]


def test_helo_refused_too_is_a_session_failure():
    c = Conversation()
    c.server("220 x")
    c.sent()
    c.server("500 no")
    c.sent()
    c.server("421 4.3.2 go away")
    c.to_quit()
    failure = c.outcome
    assert failure.kind == FAIL_HELO and failure.reply.code == 421 and failure.answered


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 no SMTP service here"])
def test_greeting_not_220_is_a_session_failure(greeting):
    c = Conversation()
    c.server(greeting)
    c.to_quit()
    failure = c.outcome
    assert isinstance(failure, SessionFailure) and failure.kind == FAIL_GREETING
    assert failure.reply.code == int(greeting[:3]) and failure.reply.enhanced.startswith("4")


# --- smuggling: dot-stuffing --------------------------------------------------

def test_smuggling_dot_stuffing_covers_the_first_line_and_every_boundary():
    evil = b".\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSMUGGLED\r\n.\r\n"
    lines = [b".", b"..", b".x"]
    message = bytearray(evil)
    for boundary in (16384, 65536, 65536 * 2):
        filler = boundary - len(message) - 2
        message += b"a" * (filler % 900) + b"\r\n"
        while len(message) < boundary:
            chunk = min(900, boundary - len(message) - 2)
            message += b"b" * max(chunk, 0) + b"\r\n"
        assert len(message) == boundary
        message += evil + b"\r\n".join(lines) + b"\r\n"
    payload = dot_stuff(bytes(message))
    assert payload.endswith(b"\r\n.\r\n")
    body = payload[:-3]
    # every line of the payload that starts with "." has been doubled, and un-stuffing gives the message back
    out_lines = body.split(b"\r\n")[:-1]
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in out_lines)
    assert b"\r\n.\r\n" not in b"\r\n" + body
    assert b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in out_lines) == message
    assert payload.startswith(b"..\r\nMAIL FROM")


def test_smuggling_message_is_sent_in_one_write_stuffed():
    message = b".\r\nline\r\n.\r\n..\r\n"
    c = Conversation(message=message)
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 ok", "250 ok")
    c.sent()
    c.server("354 go")
    assert c.transport.io.getvalue() == b"..\r\nline\r\n..\r\n...\r\n.\r\n"


def test_smuggling_bare_lf_and_cr_are_canonicalised():
    message = b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<evil@example.com>\r.\rend"
    c = Conversation(message=message)
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 ok", "250 ok")
    c.sent()
    c.server("354 go")
    assert c.raw() == b"Subject: x\r\n\r\nbody\r\n..\r\nMAIL FROM:<evil@example.com>\r\n..\r\nend\r\n.\r\n"


def test_empty_message_and_message_without_final_crlf():
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"a\r\n.b") == b"a\r\n..b\r\n.\r\n"


# --- ESMTP parameters -------------------------------------------------------------

def test_size_parameter_and_early_refusal():
    c = Conversation(message=b"x" * 100 + b"\r\n")
    c.greet_and_ehlo("SIZE 50", "PIPELINING")
    c.to_quit()                                      # no MAIL at all
    assert c.outcome.replies[0].code == 0 and c.outcome.replies[0].enhanced == "5.3.4"
    c = Conversation(message=b"x" * 100 + b"\r\n")
    c.greet_and_ehlo("SIZE 1000")
    assert c.sent() == ["MAIL FROM:<alice@example.org> SIZE=102"]
    c = Conversation(message=b"x" * 100 + b"\r\n")
    c.greet_and_ehlo("SIZE")                         # no limit given
    assert c.sent() == ["MAIL FROM:<alice@example.org> SIZE=102"]


def test_8bitmime_used_when_offered_and_permanent_failure_when_not():
    message = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    c = Conversation(make_request(body="8BITMIME"), message=message)
    c.greet_and_ehlo("8BITMIME")
    assert c.sent() == ["MAIL FROM:<alice@example.org> BODY=8BITMIME"]
    c = Conversation(make_request(body="8BITMIME"), message=message)
    c.greet_and_ehlo("PIPELINING")
    c.to_quit()
    assert c.outcome.replies == (client.NO_8BITMIME,)
    # declared 8BITMIME but only 7-bit octets: fine without the parameter
    c = Conversation(make_request(body="8BITMIME"))
    c.greet_and_ehlo("PIPELINING")
    assert c.sent()[0] == "MAIL FROM:<alice@example.org>"


def test_smtputf8_needed_but_not_offered_is_permanent():
    request = make_request("b\u00f6b@example.net", sender="\u00e4lice@example.org", smtputf8=True)
    c = Conversation(request)
    c.greet_and_ehlo("8BITMIME")
    c.to_quit()
    assert c.outcome.replies == (client.NO_SMTPUTF8,)
    c = Conversation(request)
    c.greet_and_ehlo("SMTPUTF8", "8BITMIME")
    assert c.sent() == ["MAIL FROM:<\u00e4lice@example.org> SMTPUTF8"]


def test_dsn_parameters_only_when_advertised():
    request = make_request("bob@example.net", envid="Q1+a=b", ret="HDRS", notify=("FAILURE", "DELAY"),
                           orcpt="rfc822;bob+tag@example.net")
    c = Conversation(request)
    c.greet_and_ehlo("DSN", "PIPELINING")
    assert c.sent() == ["MAIL FROM:<alice@example.org> RET=HDRS ENVID=Q1+2Ba+3Db",
                        "RCPT TO:<bob@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob+2Btag@example.net", "DATA"]
    c.server("250 ok", "250 ok", "354 go")
    c.raw()
    c.server("250 ok")
    c.to_quit()
    assert c.outcome.dsn is True
    c = Conversation(request)
    c.greet_and_ehlo("PIPELINING")
    assert c.sent() == ["MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.net>", "DATA"]


def test_null_sender_and_address_with_line_break_never_reaches_the_wire():
    c = Conversation(make_request("ok@example.net", "evil@example.net>\r\nRSET", sender=""))
    c.greet_and_ehlo("PIPELINING")
    assert c.sent() == ["MAIL FROM:<>", "RCPT TO:<ok@example.net>", "DATA"]
    c.server("250 ok", "250 ok", "354 go")
    c.raw()
    c.server("250 ok")
    c.to_quit()
    assert c.outcome.replies == (Reply(250, "2.0.0", "ok"), client.BAD_RECIPIENT)


# --- STARTTLS ------------------------------------------------------------------------

def test_starttls_injection_plaintext_after_220_is_discarded():
    c = Conversation(policy=TLS_OPPORTUNISTIC)
    c.greet_and_ehlo("STARTTLS", "PIPELINING")
    assert c.sent() == ["STARTTLS"]
    # The 220 and an injected EHLO answer (advertising AUTH) arrive in one segment.
    c.server("220 2.0.0 Ready", "250-evil.example.net", "250 AUTH PLAIN")
    assert c.transport.tls_options == "TLS-OPTIONS"
    assert c.sent() == [f"EHLO {HOSTNAME}"]
    assert b"evil" in c.protocol.discarded
    assert c.protocol.extensions == {}
    # the real answer, inside TLS
    c.server("250-mx.example.net", "250 PIPELINING")
    assert c.sent() == ["MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.net>", "DATA"]
    c.server("250 ok", "250 ok", "354 go")
    c.raw()
    c.server("250 ok")
    c.to_quit()
    assert c.outcome.tls == "TLS"


def test_starttls_forgets_extensions_learned_in_plaintext():
    c = Conversation(policy=TLS_OPPORTUNISTIC)
    c.greet_and_ehlo("STARTTLS", "DSN", "SIZE 10")
    assert c.sent() == ["STARTTLS"]
    c.server("220 go")
    c.sent()
    c.server("250 mx.example.net")
    assert c.sent() == ["MAIL FROM:<alice@example.org>"]       # no SIZE, no DSN


def test_required_tls_not_offered_is_a_deferral_and_nothing_is_sent():
    c = Conversation(policy=TLS_REQUIRED, credentials=("u", "p"))
    c.greet_and_ehlo("AUTH PLAIN LOGIN", "PIPELINING")
    c.to_quit()
    failure = c.outcome
    assert failure.kind == FAIL_TLS_REQUIRED and failure.reply.enhanced == "4.7.4"


def test_required_tls_refused_starttls_is_a_deferral():
    c = Conversation(policy=TLS_REQUIRED)
    c.greet_and_ehlo("STARTTLS")
    c.sent()
    c.server("454 4.7.0 TLS not available")
    c.to_quit()
    assert c.outcome.kind == FAIL_TLS_REQUIRED and c.outcome.reply.code == 454


def test_opportunistic_refused_starttls_continues_in_plaintext():
    c = Conversation(policy=TLS_OPPORTUNISTIC)
    c.greet_and_ehlo("STARTTLS")
    c.sent()
    c.server("454 4.7.0 TLS not available")
    assert c.sent() == ["MAIL FROM:<alice@example.org>"]


def test_handshake_failure_is_a_tls_failure():
    c = Conversation(policy=TLS_OPPORTUNISTIC)
    c.greet_and_ehlo("STARTTLS")
    c.sent()
    c.server("220 go")
    c.sent()
    c.server_closes(ConnectionLost)
    assert c.outcome.kind == FAIL_TLS and c.outcome.tls_failed


def test_no_starttls_when_policy_is_none():
    c = Conversation()
    c.greet_and_ehlo("STARTTLS")
    assert c.sent() == ["MAIL FROM:<alice@example.org>"]


def test_implicit_tls_reports_tls():
    c = Conversation(policy=TLS_IMPLICIT)
    c.greet_and_ehlo("STARTTLS", "PIPELINING")        # STARTTLS inside TLS is ignored
    assert c.sent()[0] == "MAIL FROM:<alice@example.org>"


# --- AUTH -------------------------------------------------------------------------------

def _to_tls(c, *extensions):
    c.greet_and_ehlo("STARTTLS")
    assert c.sent() == ["STARTTLS"]
    c.server("220 go")
    assert c.sent() == [f"EHLO {HOSTNAME}"]
    lines = ["mx.example.net", *extensions]
    c.server(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")


def test_auth_plain_over_tls_with_empty_authzid():
    c = Conversation(policy=TLS_REQUIRED, credentials=("user@example.test", "s3cret"))
    _to_tls(c, "AUTH CRAM-MD5 LOGIN PLAIN")
    token = base64.b64encode(b"\0user@example.test\0s3cret").decode()
    assert c.sent() == [f"AUTH PLAIN {token}"]
    c.server("235 2.7.0 ok")
    assert c.sent() == ["MAIL FROM:<alice@example.org>"]


def test_auth_login_when_plain_is_not_offered():
    c = Conversation(policy=TLS_REQUIRED, credentials=("user", "pw"))
    _to_tls(c, "AUTH CRAM-MD5 LOGIN")
    assert c.sent() == ["AUTH LOGIN"]
    c.server("334 VXNlcm5hbWU6")
    assert c.sent() == [base64.b64encode(b"user").decode()]
    c.server("334 UGFzc3dvcmQ6")
    assert c.sent() == [base64.b64encode(b"pw").decode()]
    c.server("235 ok")
    assert c.sent() == ["MAIL FROM:<alice@example.org>"]


def test_auth_never_cram_md5():
    c = Conversation(policy=TLS_REQUIRED, credentials=("user", "pw"))
    _to_tls(c, "AUTH CRAM-MD5")
    c.to_quit()
    assert c.outcome.kind == FAIL_AUTH


def test_auth_refused_is_a_session_failure():
    c = Conversation(policy=TLS_REQUIRED, credentials=("user", "pw"))
    _to_tls(c, "ENHANCEDSTATUSCODES", "AUTH PLAIN")
    c.sent()
    c.server("535 5.7.8 bad credentials")
    c.to_quit()
    assert c.outcome.kind == FAIL_AUTH and c.outcome.reply.code == 535
    assert c.outcome.reply.enhanced == "4.7.8"        # session failures defer


@pytest.mark.parametrize("policy", [TLS_NONE, TLS_OPPORTUNISTIC])
def test_credentials_never_sent_without_verified_tls(policy):
    c = Conversation(policy=policy, credentials=("user", "pw"))
    c.greet_and_ehlo("AUTH PLAIN LOGIN")
    assert c.sent() == ["QUIT"]
    c.server("221 bye")
    c.closes()
    assert c.outcome.kind == FAIL_AUTH
    assert b"pw" not in c.transport.value()


# --- bounds and timeouts ------------------------------------------------------------------

def test_overlong_reply_line_fails_the_connection():
    c = Conversation()
    c.protocol.dataReceived(b"220 " + b"x" * client.MAX_REPLY_LINE)
    assert c.closes()
    assert c.outcome.kind == FAIL_PROTOCOL


def test_overlong_reply_line_with_crlf_fails_the_connection():
    c = Conversation()
    c.protocol.dataReceived(b"220 " + b"x" * client.MAX_REPLY_LINE + b"\r\n")
    assert c.closes()
    assert c.outcome.kind == FAIL_PROTOCOL


def test_reply_that_never_ends_fails_the_connection():
    c = Conversation()
    c.server("220 x")
    c.sent()
    c.server(*["250-more"] * (client.MAX_REPLY_LINES + 1))
    assert c.closes()
    assert c.outcome.kind == FAIL_PROTOCOL


def test_malformed_and_unexpected_replies_fail_the_connection():
    c = Conversation()
    c.server("hello there")
    assert c.closes() and c.outcome.kind == FAIL_PROTOCOL
    c = Conversation()
    c.server("220 x")
    c.server("250-x", "550 code changed inside one reply")
    assert c.closes() and c.outcome.kind == FAIL_PROTOCOL
    c = Conversation()
    c.server("199 not an SMTP reply code")
    assert c.closes() and c.outcome.kind == FAIL_PROTOCOL


def test_greeting_timeout():
    c = Conversation()
    c.clock.advance(REPLY_TIMEOUT - 1)
    assert not c.transport.disconnecting
    c.clock.advance(1)
    assert c.closes()
    assert c.outcome.kind == FAIL_TIMEOUT and c.outcome.reply.enhanced == "4.4.2"


def test_timeout_after_mail_defers_every_unresolved_recipient():
    c = Conversation(make_request("a@example.net", "b@example.net"))
    c.greet_and_ehlo()
    c.sent()
    c.server("250 ok")
    c.sent()
    c.server("550 5.1.1 no")
    c.sent()
    c.clock.advance(REPLY_TIMEOUT)
    assert c.closes()
    result = c.outcome
    assert result.replies[0] == Reply(550, "5.1.1", "no")
    assert result.replies[1].code == 0 and result.replies[1].enhanced == "4.4.2"
    assert "imeout" in result.replies[1].text


def test_data_phase_uses_data_timeout():
    c = Conversation()
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 ok", "250 ok")
    c.sent()
    c.server("354 go")
    c.raw()
    c.clock.advance(REPLY_TIMEOUT + 1)
    assert not c.transport.disconnecting
    c.clock.advance(DATA_TIMEOUT - REPLY_TIMEOUT - 1)
    assert c.closes()
    assert c.outcome.replies[0].enhanced == "4.4.2"


def test_connection_lost_before_greeting_and_after_rcpt():
    c = Conversation()
    c.server_closes()
    assert c.outcome.kind == FAIL_LOST and not c.outcome.answered
    c = Conversation()
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 ok", "250 ok")
    c.sent()
    c.server_closes(ConnectionLost)
    assert c.outcome.replies[0].enhanced == "4.4.2" and c.outcome.replies[0].code == 0


def test_no_timer_left_behind():
    c = Conversation()
    c.greet_and_ehlo("PIPELINING")
    c.sent()
    c.server("250 ok", "250 ok")
    c.sent()
    c.server("354 go")
    c.raw()
    c.server("250 ok")
    c.to_quit()
    assert c.clock.getDelayedCalls() == []


# --- connection reuse (the idle state) ------------------------------------------------------------

IDLE_TIME = 2.0
REUSE_TIME = 300.0


def cached_conversation(limit=10, reuse_time=REUSE_TIME):
    from mailgw.queue.outbound import ConnectionCache
    cache = ConnectionCache(idle_time=IDLE_TIME, reuse_time=reuse_time, limit=limit)
    c = Conversation(cache=cache)
    c.greet_and_ehlo("PIPELINING", "ENHANCEDSTATUSCODES")
    return c, cache


def one_transaction(c, queue_id="1"):
    assert c.sent() == ["MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.net>", "DATA"]
    c.server("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead")
    assert c.raw() == MESSAGE + b".\r\n"
    c.server(f"250 2.0.0 Ok: queued as {queue_id}")


def test_after_the_final_reply_the_connection_goes_idle_and_the_result_fires_at_once():
    c, cache = cached_conversation()
    one_transaction(c)
    assert c.sent() == [] and not c.transport.disconnecting      # no QUIT: kept for the next message
    assert c.outcome.replies == (Reply(250, "2.0.0", "Ok: queued as 1"),)
    assert cache.take(c.protocol.cache_key) is c.protocol


def test_a_reused_connection_sends_the_next_transaction_without_a_new_greeting_or_rset():
    c, cache = cached_conversation()
    one_transaction(c)
    protocol = cache.take(c.protocol.cache_key)
    outcomes = []
    protocol.reuse(make_request("carol@example.net"), b"Subject: two\r\n\r\nsecond\r\n").addBoth(outcomes.append)
    assert c.sent() == ["MAIL FROM:<alice@example.org>", "RCPT TO:<carol@example.net>", "DATA"]
    c.server("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead")
    assert c.raw() == b"Subject: two\r\n\r\nsecond\r\n.\r\n"
    c.server("250 2.0.0 Ok: queued as 2")
    [result] = outcomes
    assert result.replies == (Reply(250, "2.0.0", "Ok: queued as 2"),)
    assert protocol.transactions == 2 and len(cache) == 1


def test_an_idle_connection_quits_when_its_idle_time_is_over_and_leaves_the_cache():
    c, cache = cached_conversation()
    one_transaction(c)
    c.clock.advance(IDLE_TIME)
    assert len(cache) == 0
    c.to_quit()
    assert c.protocol.closed.called


def test_a_421_while_idle_closes_the_connection_and_leaves_the_cache():
    c, cache = cached_conversation()
    one_transaction(c)
    c.server("421 4.4.2 mx.example.net Error: timeout exceeded")
    assert c.closes() and len(cache) == 0 and c.protocol.closed.called


def test_a_reused_connection_lost_before_mail_is_answered_is_a_session_failure_the_caller_can_retry():
    c, cache = cached_conversation()
    one_transaction(c)
    protocol = cache.take(c.protocol.cache_key)
    outcomes = []
    protocol.reuse(make_request(), MESSAGE).addBoth(outcomes.append)
    c.sent()
    c.server_closes(ConnectionLost)
    [failure] = outcomes
    assert failure.check(SessionFailure) and failure.value.kind == FAIL_LOST
    failure.trap(SessionFailure)


def test_no_idle_after_a_transaction_without_a_final_reply():
    c, cache = cached_conversation()
    assert c.sent() == ["MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.net>", "DATA"]
    # DATA refused: the MAIL transaction may still be open at the server
    c.server("250 2.1.0 Ok", "550 5.1.1 No such user", "554 5.5.1 No valid recipients")
    c.to_quit()
    assert len(cache) == 0


def test_no_new_transaction_on_a_connection_older_than_the_reuse_time():
    c, cache = cached_conversation(reuse_time=REPLY_TIMEOUT / 2)
    c.clock.advance(REPLY_TIMEOUT / 2)            # less than a reply timeout, as old as reuse_time
    one_transaction(c)
    c.to_quit()
    assert len(cache) == 0


def test_the_cache_holds_at_most_its_limit():
    c, cache = cached_conversation(limit=0)
    one_transaction(c)
    c.to_quit()
    assert len(cache) == 0
