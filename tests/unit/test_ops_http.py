"""The http role's site (mailgw/ops_http.py) over a StringTransport, with a
task.Clock: /healthz, /readyz (each way of not being ready), /metrics
(waiting for its preparations, bounded), 404/405, no tracebacks, the idle
timeout; the registrations of the composition roots (screens, checks,
queue, store, workers)."""
from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailgw import metrics, ops_http
from mailgw.metrics import Registry
from mailgw.ops_http import OpsSite, Readiness
from smtp_harness import make_config


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


class Client:
    """One HTTP/1.0 request to the site; the response once it is complete."""

    def __init__(self, site, request: bytes):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel = site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(request)

    def response(self) -> tuple[int, dict, bytes]:
        data = self.transport.value()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        return status, headers, body


def get(site, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    return Client(site, f"{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()).response()


@pytest.fixture
def config(tmp_path):
    config = make_config(tmp_path)
    (config.queue_dir / "incoming").mkdir(parents=True)
    config.mail_dir.mkdir(parents=True)
    return config


def readiness(config, clock=None, problems=(), run_in_thread=inline) -> Readiness:
    return Readiness(config=lambda: config, listener_problems=lambda: list(problems), run_in_thread=run_in_thread,
                     clock=clock or task.Clock())


def site_with(readiness=None, registry=None, clock=None) -> OpsSite:
    return OpsSite(registry=registry or Registry(), readiness=readiness, clock=clock or task.Clock(),
                   process_metrics=False)


# -- the endpoints ----------------------------------------------------------------------------------


def test_healthz_says_ok():
    status, headers, body = get(site_with(), "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["content-type"].startswith("text/plain")


def test_readyz_says_ready_when_all_is_well_and_writes_nothing_it_leaves_behind(config):
    status, _, body = get(site_with(readiness(config)), "/readyz")
    assert (status, body) == (200, b"ready\n")
    assert list((config.queue_dir / "incoming").iterdir()) == []
    assert list(config.mail_dir.iterdir()) == []


def test_readyz_lists_a_listener_that_is_not_bound(config):
    status, _, body = get(site_with(readiness(config, problems=["listener pop3 (tcp:110): not listening"])),
                          "/readyz")
    assert status == 503
    assert body == b"listener pop3 (tcp:110): not listening\n"


def test_readyz_reports_too_little_free_space(config):
    tight = replace(config, min_free_space=1 << 62)
    status, _, body = get(site_with(readiness(tight)), "/readyz")
    assert status == 503
    assert b"below server.min_free_space = 4611686018427387904" in body
    assert body.count(b"\n") == 1


def test_readyz_reports_a_spool_directory_that_does_not_exist(config):
    (config.queue_dir / "incoming").rmdir()
    status, _, body = get(site_with(readiness(config)), "/readyz")
    assert status == 503
    assert body.startswith(b"spool: cannot write in ") and b"incoming" in body


@pytest.fixture
def read_only_spool(config):
    """The spool's incoming/ on a read-only file system (root: a read-only
    tmpfs, since permissions do not stop root), or read-only by its mode."""
    incoming = config.queue_dir / "incoming"
    if os.geteuid() != 0:
        incoming.chmod(0o500)
        yield incoming
        incoming.chmod(0o700)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(incoming)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield incoming
    finally:
        subprocess.run(["umount", str(incoming)], check=True)


def test_readyz_reports_a_read_only_spool(config, read_only_spool):
    status, _, body = get(site_with(readiness(config)), "/readyz")
    assert status == 503
    assert body.startswith(f"spool: cannot write in {read_only_spool}: ".encode())
    assert body.count(b"\n") == 1, body                     # the store is still writable


def test_readyz_reports_a_store_that_cannot_be_written(config):
    broken = replace(config, mail_dir=config.data_dir / "not-a-directory")
    broken.mail_dir.write_text("a file where the Maildirs should be")
    status, _, body = get(site_with(readiness(broken)), "/readyz")
    assert status == 503
    assert body.startswith(b"store: cannot write in ")


def test_readyz_lists_every_problem_one_per_line(config):
    tight = replace(config, min_free_space=1 << 62)
    (config.queue_dir / "incoming").rmdir()
    status, _, body = get(site_with(readiness(tight, problems=["listener a: not listening"])), "/readyz")
    assert status == 503
    lines = body.decode().splitlines()
    assert lines[0] == "listener a: not listening"
    assert lines[1].startswith("spool: ") and lines[2].startswith("disk: ")


def test_readyz_disk_checks_are_bounded_in_time(config):
    """A hung file system (NFS) makes /readyz say so after the timeout, not hang."""
    clock = task.Clock()
    hanging = []

    def never(f, *args):
        d = defer.Deferred()
        hanging.append(d)
        return d
    site = site_with(readiness(config, clock, run_in_thread=never), clock=clock)
    client = Client(site, b"GET /readyz HTTP/1.0\r\n\r\n")
    assert client.transport.value() == b""
    clock.advance(ops_http.WRITE_TIMEOUT)
    status, _, body = client.response()
    assert status == 503
    assert body == f"disk checks did not finish within {ops_http.WRITE_TIMEOUT:g} s\n".encode()
    # While that check still hangs, no second one is started (threads would pile up).
    status, _, body = get(site, "/readyz")
    assert status == 503 and b"still running" in body
    assert len(hanging) == 1
    hanging[0].callback([])                           # it finishes at last
    Client(site, b"GET /readyz HTTP/1.0\r\n\r\n")
    assert len(hanging) == 2                          # the next check runs again


def test_readyz_hides_internals_when_a_check_breaks(config):
    def broken():
        raise RuntimeError("/secret/path exploded")
    ready = Readiness(config=lambda: config, listener_problems=broken, run_in_thread=inline, clock=task.Clock())
    status, _, body = get(site_with(ready), "/readyz")
    assert status == 503
    assert b"secret" not in body and b"Traceback" not in body


def test_metrics_are_the_prometheus_text_format():
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    registry = Registry()
    registry.inc(metrics.MESSAGES_ACCEPTED, "relay", amount=3)
    status, headers, body = get(site_with(registry=registry), "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert b'mailgw_messages_accepted_total{listener="relay"} 3.0\n' in body


def test_metrics_wait_for_the_preparations_but_not_beyond_the_timeout():
    clock = task.Clock()
    registry = Registry()
    slow = defer.Deferred()
    registry.add_preparer("slow", lambda: slow)
    client = Client(site_with(registry=registry, clock=clock), b"GET /metrics HTTP/1.0\r\n\r\n")
    assert client.transport.value() == b""
    clock.advance(ops_http.PREPARE_TIMEOUT)
    assert client.response()[0] == 200


def test_an_error_while_rendering_is_a_plain_500_without_internals(monkeypatch):
    def broken(registry, **options):
        raise RuntimeError("/secret/path exploded")
    monkeypatch.setattr(metrics, "render", broken)
    status, _, body = get(site_with(), "/metrics")
    assert (status, body) == (500, b"internal error\n")


@pytest.mark.parametrize("path", ["/", "/metrics/", "/metrics/x", "/healthz.html", "/../etc/passwd", "/READYZ"])
def test_other_paths_are_404(path):
    status, _, body = get(site_with(), path)
    assert (status, body) == (404, b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405_with_allow(method):
    status, headers, _ = get(site_with(), "/metrics", method)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_head_answers_without_a_body():
    status, headers, body = get(site_with(), "/healthz", "HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "3"


def test_a_query_string_does_not_change_the_path():
    assert get(site_with(), "/healthz?verbose=1")[:3:2] == (200, b"ok\n")


def test_an_idle_connection_is_closed_after_the_request_timeout():
    clock = task.Clock()
    site = site_with(clock=clock)
    client = Client(site, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")      # never finishes its headers
    clock.advance(ops_http.REQUEST_TIMEOUT)
    assert client.transport.disconnecting


def test_requests_are_not_written_to_the_access_log(monkeypatch):
    logged = []
    site = site_with()
    monkeypatch.setattr(site, "_logFormatter", lambda *args: logged.append(args) or "")
    get(site, "/healthz")
    assert logged == []


# -- the main process's listeners -------------------------------------------------------------------


class FakeListening:
    def __init__(self, port):
        self.port = port


class FakeWorkers:
    def __init__(self, workers):
        self.workers = workers


class FakeParts:
    def __init__(self, config, listening, workers=None):
        self.config = config
        self.listening = listening
        self.workers = workers


def test_listener_problems_need_each_listener_bound_but_not_its_ipv6_twin(config):
    names = [listener.name for listener in config.listeners]
    listening = {name: [FakeListening(object()), FakeListening(None)] for name in names}
    assert ops_http.server_listener_problems(FakeParts(config, listening)) == []
    listening[names[0]] = [FakeListening(None)]
    del listening[names[1]]
    problems = ops_http.server_listener_problems(FakeParts(config, listening))
    assert [line.split(" (")[0] for line in problems] == [f"listener {names[0]}", f"listener {names[1]}"]


def test_listener_problems_with_workers_need_one_running(config):
    config = replace(config, smtp_workers=2)
    listening = {listener.name: [FakeListening(object())] for listener in config.listeners}
    assert ops_http.server_listener_problems(FakeParts(config, listening, FakeWorkers({}))) == \
        ["SMTP workers: none running"]
    assert ops_http.server_listener_problems(FakeParts(config, listening, FakeWorkers({1: object()}))) == []


def test_listener_problems_before_the_config_is_in():
    assert ops_http.server_listener_problems(FakeParts(None, {})) == ["starting"]


# -- what the registry reads at scrape time ---------------------------------------------------------


def samples(registry) -> dict:
    values = registry.collect()
    found = {}
    for table in (values.counters, values.gauges):
        for name, series in table.items():
            for labels, value in series.items():
                found[(name, labels)] = value
    return found


class FakeScreen:
    def __init__(self, dnsbl=None):
        self.dnsbl = dnsbl
        self.dnsbl_refused = 0
        self.pregreet_refused = 0


class FakeDNSBL:
    queries = timeouts = cache_hits = listed = 0


class FakeFactory:
    def __init__(self, screen=None, portal=None):
        self.screen = screen
        self.portal = portal


class Wrapped:
    """As TLSMemoryBIOFactory: the listener's factory inside."""

    def __init__(self, factory):
        self.wrappedFactory = factory


def test_the_screens_of_the_smtp_listeners_are_read_and_survive_a_reload():
    registry = Registry()
    dnsbl = FakeDNSBL()
    relay = FakeScreen(dnsbl)
    factories = {"relay": FakeFactory(relay), "submissions": Wrapped(FakeFactory()), "imap": object()}
    ops_http.watch_sessions(registry, lambda: factories)
    relay.pregreet_refused, relay.dnsbl_refused, dnsbl.queries, dnsbl.listed = 2, 1, 5, 1
    found = samples(registry)
    assert found[("mailgw_screen_refused_total", ("relay", "pregreet"))] == 2
    assert found[("mailgw_screen_refused_total", ("relay", "dnsbl"))] == 1
    assert found[("mailgw_dnsbl_queries_total", ("relay",))] == 5
    assert found[("mailgw_dnsbl_listed_total", ("relay",))] == 1
    factories["relay"] = FakeFactory(FakeScreen())          # a reload: a new screen, counting from 0
    factories["relay"].screen.pregreet_refused = 1
    assert samples(registry)[("mailgw_screen_refused_total", ("relay", "pregreet"))] == 3


class FakeRspamd:
    scans, learns, failures = 4, 1, 2


class FakeStage:
    def __init__(self):
        self.unscanned = 2
        self.rspamd = FakeRspamd()


class FakeLearner:
    submitted, learned, known, failed, dropped, gone = 5, 3, 1, 1, 0, 0


class FakeRealm:
    def __init__(self):
        self.router = type("Router", (), {})()
        self.router.stages = FakeStage()
        self.learner = FakeLearner()


def test_the_checks_stage_and_the_learner_are_read_from_the_realm():
    registry = Registry()
    realm = FakeRealm()
    ops_http.watch_checks(registry, lambda: realm)
    found = samples(registry)
    assert found[("mailgw_messages_unscanned_total", ())] == 2
    assert found[("mailgw_rspamd_requests_total", ("scan",))] == 4
    assert found[("mailgw_rspamd_requests_total", ("learn",))] == 1
    assert found[("mailgw_rspamd_failures_total", ())] == 2
    assert found[("mailgw_junk_learns_total", ("learned",))] == 3


def test_a_worker_reads_its_checks_through_its_factories_portal():
    registry = Registry()
    portal = type("Portal", (), {})()
    portal.realm = FakeRealm()
    ops_http.watch_worker(registry, lambda: {"relay": FakeFactory(FakeScreen(), portal=portal)})
    found = samples(registry)
    assert found[("mailgw_messages_unscanned_total", ())] == 2
    assert found[("mailgw_screen_refused_total", ("relay", "dnsbl"))] == 0


class FakeRunner:
    def __init__(self):
        self.envelopes = {"A": object(), "B": object()}

    def oldest_age(self):
        return 90.0

    def stats(self):
        return {"deliveries_active": 1}


def test_the_queue_gauges():
    registry = Registry()
    ops_http.watch_queue(registry, lambda: FakeRunner())
    found = samples(registry)
    assert found[("mailgw_queue_messages", ())] == 2
    assert found[("mailgw_queue_oldest_age_seconds", ())] == 90.0
    assert found[("mailgw_queue_deliveries_active", ())] == 1


class FakeQuota:
    def __init__(self):
        self.calls = []
        self.answer = (1000, 3, 2)

    def totals(self, addresses):
        self.calls.append(list(addresses))
        return self.answer


def test_the_store_sizes_are_summed_before_a_scrape_at_most_every_refresh_seconds():
    clock = task.Clock()
    registry = Registry()
    quota = FakeQuota()
    ops_http.watch_store(registry, quota=quota, addresses=lambda: ["a@example.test", "b@example.test"],
                         run_in_thread=inline, clock=clock, refresh=30)
    registry.prepare(clock, 2.0)
    assert samples(registry)[("mailgw_store_bytes", ())] == 1000
    assert samples(registry)[("mailgw_store_messages", ())] == 3
    assert samples(registry)[("mailgw_store_mailboxes", ())] == 2
    quota.answer = (2000, 4, 2)
    clock.advance(10)
    registry.prepare(clock, 2.0)
    assert samples(registry)[("mailgw_store_bytes", ())] == 1000     # not summed again yet
    clock.advance(20)
    registry.prepare(clock, 2.0)
    assert samples(registry)[("mailgw_store_bytes", ())] == 2000
    assert quota.calls == [["a@example.test", "b@example.test"]] * 2


class FakeWorker:
    def __init__(self, reported_at):
        self.reported_at = reported_at
        self.asked = 0


class FakeWorkerPool:
    def __init__(self, workers):
        self.workers = workers

    def request_metrics(self):
        for worker in self.workers.values():
            worker.asked += 1
        return defer.succeed(None)


def test_the_workers_are_asked_before_a_scrape_and_their_report_ages_shown():
    clock = task.Clock()
    clock.advance(100)
    registry = Registry()
    pool = FakeWorkerPool({1: FakeWorker(99.5), 2: FakeWorker(None)})
    ops_http.watch_workers(registry, lambda: pool, clock)
    assert registry.prepare(clock, 2.0).called
    assert [worker.asked for worker in pool.workers.values()] == [1, 1]
    found = samples(registry)
    assert found[("mailgw_workers_running", ())] == 2
    assert found[("mailgw_worker_report_age_seconds", ("1",))] == 0.5
    assert ("mailgw_worker_report_age_seconds", ("2",)) not in found


def test_write_test_leaves_nothing_behind(tmp_path: Path):
    ops_http.write_test(tmp_path)
    assert list(tmp_path.iterdir()) == []
