"""The screen before the greeting (mailgw/spam/screen.py in mailgw/smtp/server.py):
the pregreet test with its pass cache, DNS blocklists deciding the greeting,
and who is never screened. StringTransport sessions, time on a task.Clock."""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer, task

from smtp_harness import Session
from mailgw.spam.screen import ConnectionScreen


@dataclass(frozen=True)
class Verdict:
    refused: bool
    score: int = 0
    threshold: int = 1
    lists: tuple = ()

    def reply_text(self):
        return f"Service unavailable; client [192.0.2.10] blocked using {', '.join(self.lists)}"


class FakeBlocklists:
    """DNSBLChecker.check; `answers` maps an IP to a Verdict or a Deferred."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.asked = []

    def check(self, ip):
        self.asked.append(ip)
        answer = self.answers.get(ip, Verdict(False))
        return answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)


def screened(*, wait=6.0, ttl=86400.0, dnsbl=None, clock=None, exempt=()):
    clock = clock or task.Clock()
    return ConnectionScreen(dnsbl=dnsbl, pregreet_wait=wait, pass_ttl=ttl, clock=clock, exempt=exempt), clock


def session(screen, clock, **kwargs):
    return Session(screen=screen, clock=clock, **kwargs)


def test_a_client_that_talks_before_the_greeting_is_refused():
    screen, clock = screened()
    client = session(screen, clock)
    assert client.read() == ["220-mail.example.test ESMTP mailgw"]
    # A spambot does not wait for the rest of the greeting.
    assert client.cmd("EHLO bot.example") == []
    clock.advance(6.0)
    assert client.read() == ["554 5.5.1 Protocol error: talked before the greeting"]
    assert client.closed and screen.pregreet_refused == 1
    # And it is tested again next time.
    assert screen.needs_pregreet("192.0.2.10")


def test_a_client_that_waits_is_greeted_and_then_passes_without_delay():
    screen, clock = screened()
    client = session(screen, clock)
    assert client.read() == ["220-mail.example.test ESMTP mailgw"]
    clock.advance(5.9)
    assert client.read() == []
    clock.advance(0.1)
    assert client.read() == ["220 mail.example.test ESMTP mailgw"]
    assert client.ehlo()[0] == "250-mail.example.test Hello client.test [192.0.2.10]"
    # The next connection from that address is greeted at once.
    again = session(screen, clock)
    assert again.read() == ["220 mail.example.test ESMTP mailgw"]
    # Until the pass expires.
    clock.advance(86400.0)
    assert session(screen, clock).read() == ["220-mail.example.test ESMTP mailgw"]


def test_trusted_networks_and_other_roles_are_never_screened():
    import ipaddress
    screen, clock = screened(exempt=(ipaddress.ip_network("10.0.0.0/8"),))
    assert session(screen, clock, client="10.1.2.3").read() == ["220 mail.example.test ESMTP mailgw"]
    assert session(screen, clock, role="submission").read() == ["220 mail.example.test ESMTP mailgw"]


def test_a_listed_client_gets_554_for_a_greeting_and_503_for_everything_but_quit():
    blocklists = FakeBlocklists({"192.0.2.10": Verdict(True, 3, 2, ("zen.example", "bl.example"))})
    screen, clock = screened(dnsbl=blocklists)
    client = session(screen, clock)
    assert client.read() == ["554 5.7.1 Service unavailable; client [192.0.2.10] blocked using zen.example, "
                             "bl.example"]
    assert screen.dnsbl_refused == 1 and blocklists.asked == ["192.0.2.10"]
    assert client.cmd("EHLO bot.example") == ["503 5.5.1 Bad sequence of commands: no service here, send QUIT"]
    assert client.cmd("MAIL FROM:<a@b.example>")[0].startswith("503 5.5.1")
    assert client.cmd("QUIT")[0].startswith("221")
    assert client.closed


def test_the_blocklists_are_asked_before_the_pregreet_test_and_talk_while_waiting_counts():
    pending = defer.Deferred()
    screen, clock = screened(dnsbl=FakeBlocklists({"192.0.2.10": pending}))
    client = session(screen, clock)
    assert client.read() == []               # nothing until the lists have answered
    client.send(b"EHLO early.example\r\n")
    pending.callback(Verdict(False))
    assert client.read() == ["220-mail.example.test ESMTP mailgw"]
    clock.advance(6.0)
    assert client.read() == ["554 5.5.1 Protocol error: talked before the greeting"]


def test_pregreet_off_and_lists_clean_greets_at_once():
    screen, clock = screened(wait=0.0, dnsbl=FakeBlocklists())
    client = session(screen, clock)
    assert client.read() == ["220 mail.example.test ESMTP mailgw"]
    assert client.ehlo()


def test_a_broken_blocklist_check_lets_the_client_in():
    screen, clock = screened(wait=0.0, dnsbl=FakeBlocklists({"192.0.2.10": defer.fail(RuntimeError("bug"))}))
    client = session(screen, clock)
    assert client.read() == ["220 mail.example.test ESMTP mailgw"]
    assert client.ehlo()


def test_a_client_gone_during_the_wait_leaves_nothing_running():
    screen, clock = screened()
    client = session(screen, clock)
    client.read()
    client.server.connectionLost(None)
    assert clock.getDelayedCalls() == []
