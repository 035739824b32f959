"""Exact metric deltas from the instrumented components, through the
existing harnesses (StringTransport + task.Clock, nothing sleeps): SMTP,
POP3 and IMAP sessions (connections, commands, replies, refusals, TLS),
the password checker, the queue runner and its DSNs, rspamd and DNS
latencies, the mailbox sizes, and the SMTP workers' reports merged in the
main process (mailgw/workers.py) without double counts across a restart.

Each test counts in a fresh registry: injected where the component takes
one, else the process's `metrics.DEFAULT` replaced for the test (the
harnesses build their factories with the default)."""
from __future__ import annotations

import base64
import json

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailgw import metrics, workers
from mailgw.auth.checkers import PasswordChecker
from mailgw.config_types import ListenerConfig
from mailgw.durable import DurableWriter
from mailgw.errors import LoginsRefused
from mailgw.mailauth.dns import MailDNS, TempDNSError
from mailgw.metrics import Registry, Values
from mailgw.queue.envelope import Envelope
from mailgw.queue.model import STATUS_BOUNCED, STATUS_DEFERRED, STATUS_SENT, AttemptResult, RecipientResult
from mailgw.queue.outbound import RelayTransport
from mailgw.queue.runner import QueueRunner
from mailgw.queue.spool import Spool, new_queue_id
from mailgw.services import listener_factory
from mailgw.smtp.inbound import Router
from mailgw.spam.rspamd import RspamdClient, RspamdUnavailable, ScanEnvelope
from mailgw.store.maildir import MaildirStore
from mailgw.store.quota import Quota
from mailgw.workers import MasterLink, SMTPWorkers, WorkerMetricsReporter, decode, encode
from fake_dns import HANG, FakeResolver
from imap_harness import IMAPSession
from pop3_harness import Session as POP3Session
from smtp_harness import FakeUserDB, Session as SMTPSession, make_config
from threadless import ImmediatePool, ThreadlessClock

MESSAGE = "Subject: hi\r\n\r\nhello\r\n.\r\n"


@pytest.fixture
def registry(monkeypatch) -> Registry:
    fresh = Registry()
    monkeypatch.setattr(metrics, "DEFAULT", fresh)
    return fresh


def counts(registry: Registry, name: str) -> dict:
    """{label values: value} of one metric, everything merged (as a scrape shows it)."""
    values = registry.collect()
    for table in (values.counters, values.gauges):
        if name in table:
            return {labels: value for labels, value in table[name].items() if value or table is values.gauges}
    return {}


def histogram(registry: Registry, name: str, *labels) -> list[float]:
    return registry.collect().histograms[name][labels]


def lose(session) -> None:
    session.server.connectionLost(Failure(ConnectionDone()))


# -- SMTP --------------------------------------------------------------------------------------------


def test_an_smtp_session_counts_its_connection_commands_replies_and_outcomes(registry):
    s = SMTPSession()
    assert counts(registry, "mailgw_connections_open") == {("relay", "smtp"): 1}
    s.ehlo()
    assert s.last("MAIL FROM:<x@elsewhere.test>").startswith("250")
    assert s.last("RCPT TO:<alice@example.test>").startswith("250")
    assert s.last("RCPT TO:<nobody@example.test>").startswith("550 5.1.1")
    assert s.last("DATA").startswith("354")
    assert s.send(MESSAGE)[-1].startswith("250 2.0.0 Ok: queued as")
    assert s.last("XYZZY").startswith("500")
    assert s.last("QUIT").startswith("221")
    lose(s)
    assert counts(registry, "mailgw_connections_total") == {("relay", "smtp"): 1}
    assert counts(registry, "mailgw_connections_open") == {("relay", "smtp"): 0}
    assert counts(registry, "mailgw_commands_total") == {
        ("smtp", "EHLO"): 1, ("smtp", "MAIL"): 1, ("smtp", "RCPT"): 2, ("smtp", "DATA"): 1, ("smtp", "QUIT"): 1,
        ("smtp", "other"): 1}
    # 220 greeting, EHLO, MAIL, RCPT, queued, 221 | 354 | 550, 500
    assert counts(registry, "mailgw_replies_total") == {("smtp", "2xx"): 6, ("smtp", "3xx"): 1, ("smtp", "5xx"): 2}
    assert counts(registry, "mailgw_messages_accepted_total") == {("relay",): 1}
    assert counts(registry, "mailgw_messages_refused_total") == {("relay", "rcpt", "unknown_user"): 1}


def test_refusals_carry_their_stage_and_their_name_from_codes(registry):
    s = SMTPSession(smtp={"max_message_size": 1024})
    s.ehlo()
    s.last("MAIL FROM:<x@elsewhere.test> SIZE=5000")                  # 552 at MAIL (RFC 1870)
    s.last("MAIL FROM:<x@elsewhere.test>")
    s.last("RCPT TO:<someone@remote.test>")                           # 554 relay denied
    s.last("DATA")                                                    # 554 no valid recipients
    s.last("RCPT TO:<alice@example.test>")
    s.last("DATA")
    assert s.send("X" * 990 + "\r\n" + "X" * 990 + "\r\n.\r\n")[-1].startswith("552")     # the message itself
    assert counts(registry, "mailgw_messages_refused_total") == {
        ("relay", "mail", "message_too_big"): 1, ("relay", "rcpt", "relay_denied"): 1,
        ("relay", "data", "no_valid_recipients"): 1, ("relay", "message", "message_too_big"): 1}
    assert counts(registry, "mailgw_messages_accepted_total") == {}


def test_a_connection_over_the_limit_is_counted_apart(registry):
    first = SMTPSession(smtp={"max_connections": 1, "max_connections_per_ip": 1})
    second = SMTPSession(factory=first.factory)
    assert second.read()[-1].startswith("421")
    lose(second)
    assert counts(registry, "mailgw_connections_total") == {("relay", "smtp"): 1}
    assert counts(registry, "mailgw_connections_over_limit_total") == {("relay", "smtp"): 1}
    assert counts(registry, "mailgw_connections_open") == {("relay", "smtp"): 1}
    lose(first)
    assert counts(registry, "mailgw_connections_open") == {("relay", "smtp"): 0}


class FakeTLSConnection:
    def __init__(self, version):
        self.version = version

    def get_protocol_version_name(self):
        return self.version


def test_starttls_counts_the_handshake_with_its_version(registry):
    s = SMTPSession(role="submission")
    s.ehlo()
    assert s.last("STARTTLS").startswith("220")
    s.transport.getHandle = lambda: FakeTLSConnection("TLSv1.3")
    s.server.handshakeCompleted()
    lose(s)
    assert counts(registry, "mailgw_tls_handshakes_total") == {("submission", "smtp", "TLSv1.3"): 1}
    assert counts(registry, "mailgw_tls_handshake_failures_total") == {}


def test_a_handshake_that_never_completes_is_a_failure(registry):
    implicit = SMTPSession(role="submissions", tls=True)
    lose(implicit)
    started = SMTPSession(role="submission")
    started.ehlo()
    started.last("STARTTLS")
    lose(started)
    plain = SMTPSession(role="submission")
    lose(plain)
    assert counts(registry, "mailgw_tls_handshake_failures_total") == {
        ("submissions", "smtp"): 1, ("submission", "smtp"): 1}


def test_implicit_tls_counts_its_handshake(registry):
    s = SMTPSession(role="submissions", tls=True)
    s.transport.getHandle = lambda: FakeTLSConnection("TLSv1.2")
    s.server.handshakeCompleted()
    lose(s)
    assert counts(registry, "mailgw_tls_handshakes_total") == {("submissions", "smtp", "TLSv1.2"): 1}


def test_listener_factory_passes_an_injected_registry_to_the_sessions(tmp_path):
    registry = Registry()
    config = make_config(tmp_path)
    listener = ListenerConfig(role="relay", endpoint="tcp:0", name="mx-in")
    factory = listener_factory(config, listener, portal=None, clock=task.Clock(), tls_options=None,
                               metrics=registry)
    assert factory.metrics is registry


def test_acme_roles_are_not_built_here(tmp_path):
    config = make_config(tmp_path)
    for role in ("acme-http", "acme-tls"):
        with pytest.raises(NotImplementedError):
            listener_factory(config, ListenerConfig(role=role, endpoint="tcp:0", name=role), portal=None,
                             clock=task.Clock(), tls_options=None)


# -- POP3 and IMAP -------------------------------------------------------------------------------------


def test_a_pop3_session_counts_commands_and_ok_err_replies(registry):
    s = POP3Session(plaintext=True)
    assert s.last("USER alice@example.test") == "+OK Send PASS"
    assert s.last("PASS secret").startswith("+OK")
    assert s.last("XYZZY").startswith("-ERR")
    assert s.last("STAT").startswith("+OK")
    assert s.last("QUIT").startswith("+OK")
    lose(s)
    assert counts(registry, "mailgw_commands_total") == {
        ("pop3", "USER"): 1, ("pop3", "PASS"): 1, ("pop3", "other"): 1, ("pop3", "STAT"): 1, ("pop3", "QUIT"): 1}
    # the greeting, USER, PASS, STAT, QUIT | XYZZY
    assert counts(registry, "mailgw_replies_total") == {("pop3", "+OK"): 5, ("pop3", "-ERR"): 1}
    assert counts(registry, "mailgw_connections_total") == {("pop3", "pop3"): 1}


def test_an_imap_session_counts_commands_and_tagged_ok_no_bad(registry):
    s = IMAPSession()
    s.login()
    s.run("NOOP")
    s.run("SELECT Nowhere", expect="NO")
    s.run("UID FETCH 1:* FLAGS", expect="BAD")           # not valid before SELECT
    s.run("BOGUS", expect="BAD")
    s.run("LOGOUT")
    lose(s)
    assert counts(registry, "mailgw_commands_total") == {
        ("imap", "LOGIN"): 1, ("imap", "NOOP"): 1, ("imap", "SELECT"): 1, ("imap", "UID FETCH"): 1,
        ("imap", "other"): 1, ("imap", "LOGOUT"): 1}
    assert counts(registry, "mailgw_replies_total") == {("imap", "OK"): 3, ("imap", "NO"): 1, ("imap", "BAD"): 2}
    assert counts(registry, "mailgw_connections_total") == {("imaps", "imap"): 1}


# -- logins ----------------------------------------------------------------------------------------------


class Creds:
    def __init__(self, username, password, client="192.0.2.9"):
        self.username, self.password, self.client_ip = username, password, client


def test_the_password_checker_counts_successes_failures_and_lockouts():
    registry = Registry()
    checker = PasswordChecker(FakeUserDB(), reactor=task.Clock(), failure_delay=0.0, lockout_failures=2,
                              lockout_time=60.0, metrics=registry, cache_ttl=0)
    results = []
    for password in (b"secret", b"wrong", b"wrong", b"secret"):
        checker.requestAvatarId(Creds(b"alice@example.test", password)).addBoth(results.append)
    assert results[0] == "alice@example.test"
    assert [type(r.value) for r in results[1:]][-1] is LoginsRefused
    assert counts(registry, "mailgw_logins_total") == {("success",): 1, ("failure",): 2, ("lockout",): 1}
    assert counts(registry, "mailgw_login_lockouts_total") == {(): 1}


# -- the relay queue ---------------------------------------------------------------------------------------


class ScriptedTransport:
    """Sent, bounced or deferred per recipient; every destination is the smarthost."""

    def __init__(self, script):
        self.script = script

    def destination(self, domain):
        return "[smarthost.test]:25"

    def destination_class(self, domain):
        return "smarthost"

    def close(self):
        return defer.succeed(None)

    def deliver(self, request):
        replies = {STATUS_SENT: (250, "2.0.0", "ok"), STATUS_DEFERRED: (451, "4.3.0", "later"),
                   STATUS_BOUNCED: (550, "5.1.1", "no such user")}
        results = tuple(RecipientResult(r.address, self.script[r.address], *replies[self.script[r.address]])
                        for r in request.recipients)
        return defer.succeed(AttemptResult("[smarthost.test]:25", None, False, results))


def enqueue(spool, clock, recipients):
    now = clock.seconds()
    queue_id = new_queue_id(now)
    body = b"Subject: test\r\nMessage-ID: <m1@example.test>\r\n\r\nhello\r\n"
    envelope = Envelope.from_json({
        "version": 1, "id": queue_id, "arrival": now, "sender": "alice@example.test", "sender_utf8": False,
        "body": "7BIT", "size": len(body), "envid": None, "ret": None,
        "client": {"ip": "10.0.0.1", "helo": "c.test", "tls": False, "auth": None, "listener": "relay"},
        "recipients": [{"address": r, "orcpt": None, "notify": None, "state": "pending", "attempts": 0,
                        "last_reply": None} for r in recipients],
        "attempts": 0, "next_attempt": now, "history": []})
    spool.enqueue(queue_id, envelope, body)
    return queue_id


def test_the_runner_counts_deliveries_by_outcome_and_destination_and_the_dsns(tmp_path):
    registry = Registry()
    clock = ThreadlessClock()
    clock.advance(1_800_000_000)
    config = make_config(tmp_path, queue={"retry_schedule": [60], "max_lifetime": 100.0, "delay_notice_after": 0})
    writer = DurableWriter(reactor=clock, threadpool=ImmediatePool())
    spool = Spool(config.queue_dir, writer=writer, reactor=clock)
    store = MaildirStore(config.mail_dir, writer=writer, hostname="mail.example.test", clock=clock.seconds)
    transport = ScriptedTransport({"bob@remote.test": STATUS_SENT, "carol@remote.test": STATUS_BOUNCED,
                                   "dave@remote.test": STATUS_DEFERRED})
    runner = QueueRunner(config=config, spool=spool, transport=transport, store=store,
                         router=Router(config, FakeUserDB()), clock=clock, metrics=registry,
                         read_message=lambda path: defer.succeed(path.read_bytes()))
    runner.startService()
    enqueue(spool, clock, ["bob@remote.test", "carol@remote.test", "dave@remote.test"])
    clock.advance(0)
    assert counts(registry, "mailgw_deliveries_total") == {
        ("sent", "smarthost"): 1, ("bounced", "smarthost"): 1, ("deferred", "smarthost"): 1}
    assert counts(registry, "mailgw_dsn_sent_total") == {("failure",): 1}
    assert runner.oldest_age() == 0.0
    clock.advance(60)              # the first retry: deferred again
    clock.advance(60)              # the second: deferred, and max_lifetime is over: expired
    assert counts(registry, "mailgw_deliveries_total") == {
        ("sent", "smarthost"): 1, ("bounced", "smarthost"): 1, ("deferred", "smarthost"): 3,
        ("expired", "smarthost"): 1}
    assert counts(registry, "mailgw_dsn_sent_total") == {("failure",): 2}


def test_the_relay_transport_names_the_destination_class(tmp_path):
    plain = make_config(tmp_path)
    routed = make_config(tmp_path, queue={"smarthost": {"host": "relay.test", "port": 25},
                                          "routes": [{"domain": "partner.test", "host": "mx.partner.test"}]})
    assert RelayTransport(config=plain, reactor=task.Clock(), resolver=None).destination_class("x.test") == "mx"
    transport = RelayTransport(config=routed, reactor=task.Clock(), resolver=None)
    assert transport.destination_class("Partner.Test.") == "route"
    assert transport.destination_class("other.test") == "smarthost"


# -- latencies -----------------------------------------------------------------------------------------


class FakeAgent:
    def __init__(self):
        self.requests = []

    def request(self, method, uri, headers=None, body=None):
        d = defer.Deferred()
        self.requests.append(d)
        return d


def test_an_rspamd_scan_is_timed_on_the_injected_clock_failures_too():
    registry = Registry()
    clock = task.Clock()
    agent = FakeAgent()
    client = RspamdClient(reactor=clock, clock=clock, url="http://127.0.0.1:11333", agent=agent, metrics=registry,
                          timeout=15.0)
    envelope = ScanEnvelope(sender="a@b.test", recipients=("c@example.test",), client_ip="192.0.2.1",
                            helo="h.test", client_name=None, queue_id="Q1")
    failed = []
    client.check(b"Subject: x\r\n\r\nx\r\n", envelope).addErrback(failed.append)
    clock.advance(0.3)
    agent.requests[0].errback(ConnectionRefusedError())
    assert failed and failed[0].check(RspamdUnavailable)
    cells = histogram(registry, "mailgw_rspamd_scan_seconds")
    buckets = metrics.RSPAMD_SCAN_SECONDS.buckets
    assert cells[buckets.index(0.5)] == 1 and sum(cells[:-1]) == 1
    assert cells[-1] == pytest.approx(0.3)


def test_dns_queries_are_timed_by_record_type_and_errors_counted():
    registry = Registry()
    clock = task.Clock()
    resolver = FakeResolver({("example.test", "TXT"): ["v=spf1 -all"], ("slow.test", "MX"): HANG})
    mail_dns = MailDNS(resolver, clock=clock, timeout=2.0, metrics=registry)
    answers = []
    mail_dns.query("example.test", "TXT").addBoth(answers.append)
    mail_dns.query("slow.test", "MX").addBoth(answers.append)
    clock.advance(2.0)
    assert answers[0] == [[b"v=spf1 -all"]]
    assert answers[1].check(TempDNSError)
    assert sum(histogram(registry, "mailgw_dns_query_seconds", "TXT")[:-1]) == 1
    mx = histogram(registry, "mailgw_dns_query_seconds", "MX")
    assert sum(mx[:-1]) == 1 and mx[-1] == pytest.approx(2.0)
    assert counts(registry, "mailgw_dns_query_errors_total") == {("MX",): 1}


# -- the store ---------------------------------------------------------------------------------------------


def test_quota_totals_sum_every_existing_mailbox(tmp_path):
    config = make_config(tmp_path)
    clock = ThreadlessClock()
    writer = DurableWriter(reactor=clock, threadpool=ImmediatePool())
    store = MaildirStore(config.mail_dir, writer=writer, hostname="mail.example.test", clock=clock.seconds)
    for mailbox, message in (("alice@example.test", b"Subject: a\n\none\n"),
                             ("alice@example.test", b"Subject: b\n\ntwo two\n"),
                             ("bob@example.test", b"Subject: c\n\nthree\n")):
        store.deliver([mailbox], message, lf=True)
    quota = Quota(config.mail_dir, config.quota, clock=clock)
    octets, messages, mailboxes = quota.totals(["alice@example.test", "bob@example.test",
                                                "carol@example.test", "../escape@example.test"])
    assert (messages, mailboxes) == (3, 2)
    assert octets == sum(quota.usage(a)[0] for a in ("alice@example.test", "bob@example.test")) > 0


# -- the SMTP workers' reports -------------------------------------------------------------------------------


class ProcessTransport:
    def __init__(self, pid):
        self.pid = pid
        self.written = []

    def write(self, data):
        self.written.append(data)

    def closeStdin(self):
        pass

    def signalProcess(self, signal):
        pass

    def requests(self):
        return [decode(line) for line in b"".join(self.written).split(b"\n")[:-1]]


class SpawningReactor:
    def __init__(self):
        self.spawned = []

    def spawnProcess(self, protocol, executable, args=(), env=None, childFDs=None, **kwargs):
        transport = ProcessTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append(protocol)
        return transport


class NoSpool:
    def ids(self):
        return []


class NoRunner:
    envelopes: dict = {}
    finished: dict = {}


def report(hits: int, open_now: int, id=None) -> bytes:
    """A worker's `metrics` line: `hits` messages accepted, `open_now` connections open."""
    worker_registry = Registry()
    worker_registry.inc(metrics.MESSAGES_ACCEPTED, "relay", amount=hits)
    worker_registry.add(metrics.CONNECTIONS_OPEN, open_now, "relay", "smtp")
    body = {"snapshot": worker_registry.snapshot()}
    if id is not None:
        body["id"] = id
    return encode("metrics", body)


@pytest.fixture
def pool():
    clock = task.Clock()
    registry = Registry()
    registry.inc(metrics.MESSAGES_ACCEPTED, "relay", amount=1)          # the main process's own
    started = SMTPWorkers(reactor=SpawningReactor(), clock=clock, count=2, config_path=None, sockets=(),
                          checker=None, runner=NoRunner(), spool=NoSpool(), metrics=registry)
    started.startService()
    return started


def accepted(pool) -> float:
    return counts(pool.metrics, "mailgw_messages_accepted_total").get(("relay",), 0)


def test_the_main_process_adds_each_workers_latest_report_once(pool):
    one, two = pool.workers[1], pool.workers[2]
    one.outReceived(report(10, 2))
    two.outReceived(report(5, 1))
    assert accepted(pool) == 16
    one.outReceived(report(12, 0))               # newer: replaces, never adds to, the last one
    assert accepted(pool) == 18
    assert counts(pool.metrics, "mailgw_connections_open") == {("relay", "smtp"): 1}


def test_a_worker_that_dies_keeps_its_counts_and_its_successor_adds_to_them(pool):
    one = pool.workers[1]
    one.outReceived(report(10, 3))
    before = accepted(pool)
    one.processEnded(Failure(ProcessTerminated(exitCode=None, signal=9)))
    assert accepted(pool) == before == 11                       # not back, not doubled
    assert counts(pool.metrics, "mailgw_connections_open") == {}  # its connections died with it
    assert counts(pool.metrics, "mailgw_worker_restarts_total") == {(): 1}
    pool.clock.advance(workers.RESTART_FIRST)
    successor = pool.workers[1]
    assert successor is not one
    successor.outReceived(report(0, 0))
    assert accepted(pool) == 11
    successor.outReceived(report(4, 1))
    assert accepted(pool) == 15
    one.outReceived(report(99, 0))               # a stray line from the dead one changes nothing lasting
    pool.worker_ended(one, None)
    assert accepted(pool) >= 15


def test_a_scrape_asks_every_live_worker_and_waits_for_the_answers(pool):
    d = pool.request_metrics()
    asked = {number: worker.transport.requests() for number, worker in pool.workers.items()}
    ids = {number: requests[-1][1]["id"] for number, requests in asked.items()}
    assert all(requests[-1][0] == "metrics" for requests in asked.values())
    assert not d.called
    pool.workers[1].outReceived(report(3, 0, id=ids[1]))
    assert not d.called
    pool.workers[2].outReceived(report(4, 0, id=ids[2]))
    assert d.called
    assert accepted(pool) == 8


def test_a_worker_that_dies_before_answering_does_not_hold_the_scrape(pool):
    d = pool.request_metrics()
    pool.workers[2].outReceived(report(0, 0, id=pool.workers[2].transport.requests()[-1][1]["id"]))
    pool.workers[1].processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert d.called


def test_an_oversized_or_malformed_report_is_ignored(pool, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_SNAPSHOT_BYTES", 100)
    pool.workers[1].outReceived(report(1000, 0) + b" " * 100)
    pool.workers[1].outReceived(b'metrics {"snapshot": []}\n')
    assert accepted(pool) == 1


class PipeTransport(StringTransport):
    def writeSequence(self, data):
        self.write(b"".join(data))


def test_the_worker_reports_every_interval_at_once_when_asked_and_when_it_stops(registry):
    clock = task.Clock()
    link = MasterLink(clock=clock)
    link.makeConnection(PipeTransport())
    reporter = WorkerMetricsReporter(link, clock=clock, metrics=registry)
    reporter.startService()
    registry.inc(metrics.MESSAGES_ACCEPTED, "relay", amount=2)
    clock.advance(workers.REPORT_INTERVAL)
    clock.advance(workers.FLUSH_DELAY)
    lines = [decode(line) for line in link.transport.value().split(b"\n")[:-1]]
    assert [verb for verb, _ in lines] == ["metrics"]
    assert Values.from_json(lines[0][1]["snapshot"]).counters["mailgw_messages_accepted_total"] == {("relay",): 2}
    link.transport.clear()
    link.dataReceived(encode("metrics", {"id": 7}))           # asked: answered at once, with the id
    verb, answer = decode(link.transport.value().rstrip(b"\n"))
    assert (verb, answer["id"]) == ("metrics", 7)
    link.transport.clear()
    reporter.stopService()
    assert decode(link.transport.value().rstrip(b"\n"))[0] == "metrics"
    assert not clock.getDelayedCalls()


def test_a_report_goes_from_the_worker_through_the_pipe_into_the_main_process_scrape(pool):
    """Both ends of the real protocol: what WorkerMetricsReporter writes is what WorkerProcess reads."""
    clock = task.Clock()
    worker_registry = Registry()
    worker_registry.inc(metrics.COMMANDS, "smtp", "EHLO", amount=3)
    worker_registry.observe(metrics.DNS_QUERY_SECONDS, 0.02, "A")
    link = MasterLink(clock=clock)
    link.makeConnection(PipeTransport())
    WorkerMetricsReporter(link, clock=clock, metrics=worker_registry)
    request = pool.workers[1].transport
    d = pool.request_metrics()
    link.dataReceived(request.requests()[-1][0].encode() + b" " + json.dumps(request.requests()[-1][1]).encode()
                      + b"\n")
    pool.workers[1].outReceived(link.transport.value())
    pool.workers[2].processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert d.called
    assert counts(pool.metrics, "mailgw_commands_total") == {("smtp", "EHLO"): 3}
    assert sum(histogram(pool.metrics, "mailgw_dns_query_seconds", "A")[:-1]) == 1


def test_an_auth_answer_still_reaches_its_waiter_beside_metrics_requests():
    clock = task.Clock()
    link = MasterLink(clock=clock)
    link.makeConnection(PipeTransport())
    WorkerMetricsReporter(link, clock=clock, metrics=Registry())
    d = link.request("auth", {"username": base64.b64encode(b"a").decode(), "password": "", "client": "x"})
    link.dataReceived(encode("auth", {"id": 1, "result": "ok", "address": "a@example.test"}))
    assert d.result["address"] == "a@example.test"
