"""The `http` listener: Prometheus metrics and health checks for a load
balancer, systemd or a monitoring system. Plain HTTP without
authentication: keep it on loopback or a monitoring network.

    GET /metrics   the Prometheus text format (mailgw/metrics.py): the whole
                   server's counts, the SMTP workers' merged in
    GET /healthz   200 "ok": the process answers
    GET /readyz    200 "ready", or 503 and one line per problem: a configured
                   listener is not bound (or, with smtp_workers, no worker
                   runs), the spool's incoming/ or the mail directory cannot
                   be written (a real write and unlink of a small file, in
                   the thread pool, within WRITE_TIMEOUT), or the file system
                   of data_dir has less than [server] min_free_space free

Only GET and HEAD (405 otherwise), only these paths (404 otherwise); an
error is logged and answered with a plain 500, never a traceback. Idle
connections close after REQUEST_TIMEOUT.

The composition roots also register here what the registry reads at
scrape time (`watch_sessions`, `watch_checks`, `watch_queue`,
`watch_store`, `watch_workers`; `attach` does all of the main process's,
`watch_worker` an SMTP worker's).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import resource, server

from mailgw import metrics as metrics_module

log = Logger()

# Seconds an idle HTTP connection stays open.
REQUEST_TIMEOUT = 15.0
# Seconds a scrape waits for its preparations (the workers' reports, the store's sums).
PREPARE_TIMEOUT = 2.0
# Seconds the write test and the free-space check may take before /readyz says so.
WRITE_TIMEOUT = 5.0
# Seconds the mailbox sizes are reused before they are summed again (a stat per user).
STORE_REFRESH = 30.0
PROBE_NAME = ".mailgw-readyz"
_TEXT = b"text/plain; charset=utf-8"


def _inner(factory):
    return getattr(factory, "wrappedFactory", factory)     # inside TLSMemoryBIOFactory on implicit TLS


# -- /readyz -------------------------------------------------------------------------------------

def write_test(directory: Path) -> None:
    """Create, write, close and remove a small file in `directory`; OSError if any step fails."""
    path = Path(directory) / f"{PROBE_NAME}-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"ready?\n")
    finally:
        os.close(fd)
    os.unlink(path)


def free_space(directory: Path) -> int:
    """Octets available to us on the file system of `directory` (statvfs f_bavail)."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


class Readiness:
    """What /readyz checks. `config()` is the config now (a reload may change
    min_free_space); `listener_problems()` lists what the composition root
    finds wrong with its listeners; `run_in_thread(f, *args)` -> Deferred
    (the thread pool; tests run it inline); `clock` bounds the disk checks."""

    def __init__(self, *, config: Callable, listener_problems: Callable[[], list[str]], run_in_thread, clock,
                 timeout: float = WRITE_TIMEOUT):
        self.config = config
        self.listener_problems = listener_problems
        self.run_in_thread = run_in_thread
        self.clock = clock
        self.timeout = timeout
        self._running: defer.Deferred | None = None     # the disk checks under way (never two at once)

    def directories(self, config) -> list[tuple[str, Path]]:
        return [("spool", Path(config.queue_dir) / "incoming"), ("store", Path(config.mail_dir))]

    def check(self) -> defer.Deferred:
        """Deferred[list[str]]: the problems, none when ready. Never fails."""
        try:
            problems = list(self.listener_problems())
        except Exception:
            log.failure("readyz: the listener check failed")
            problems = ["listeners: cannot be checked (see the log)"]
        config = self.config()
        if self._running is not None:
            return defer.succeed(problems + [f"disk checks still running after {self.timeout:g} s"])
        work = self._running = self.run_in_thread(self._disk_problems, config)
        done = defer.Deferred()

        def finished(result):
            if self._running is work:
                self._running = None
            if not done.called:
                if isinstance(result, list):
                    done.callback(problems + result)
                else:
                    log.failure("readyz: the disk checks failed", result)
                    done.callback(problems + ["disk checks failed (see the log)"])
        work.addBoth(finished)

        def too_slow():
            if not done.called:
                done.callback(problems + [f"disk checks did not finish within {self.timeout:g} s"])
        timer = self.clock.callLater(self.timeout, too_slow)
        done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return done

    def _disk_problems(self, config) -> list[str]:
        """In a thread: the write tests and the free space."""
        problems = []
        for what, directory in self.directories(config):
            try:
                write_test(directory)
            except OSError as error:
                problems.append(f"{what}: cannot write in {directory}: {error.strerror or error}")
        try:
            available = free_space(config.data_dir)
        except OSError as error:
            problems.append(f"disk: cannot check the free space of {config.data_dir}: {error.strerror or error}")
        else:
            if available < config.min_free_space:
                problems.append(f"disk: {available} octets free under {config.data_dir}, "
                                f"below server.min_free_space = {config.min_free_space}")
        return problems


def server_listener_problems(parts) -> list[str]:
    """The main process's listeners (tap.ServerParts): each configured one
    bound (its IPv6 twin may be absent on a host without IPv6), and with
    smtp_workers at least one worker running."""
    config = parts.config
    if config is None:
        return ["starting"]
    problems = []
    for listener in config.listeners:
        listening = parts.listening.get(listener.name)
        if not listening or listening[0].port is None:
            problems.append(f"listener {listener.name} ({listener.endpoint}): not listening")
    if config.smtp_workers:
        workers = getattr(parts, "workers", None)
        if workers is None or not workers.workers:
            problems.append("SMTP workers: none running")
    return problems


# -- the site ------------------------------------------------------------------------------------

class OpsResource(resource.Resource):
    """/metrics, /healthz and /readyz; everything else is 404."""

    isLeaf = True

    def __init__(self, *, registry, readiness: Readiness | None, clock, process_metrics: bool = True):
        super().__init__()
        self.registry = metrics_module.registry_or_default(registry)
        self.readiness = readiness
        self.clock = clock
        self.process_metrics = process_metrics

    def render(self, request):
        body = self._render(request)
        if request.method == b"HEAD" and isinstance(body, bytes):
            # twisted.web drops a HEAD body, with a warning: send its length only.
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def _render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return self._text(request, "method not allowed\n")
        path = request.path
        if path == b"/healthz":
            return self._text(request, "ok\n")
        if path == b"/readyz":
            return self._later(request, self._ready)
        if path == b"/metrics":
            return self._later(request, self._metrics)
        request.setResponseCode(404)
        return self._text(request, "not found\n")

    @staticmethod
    def _text(request, text: str) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        request.setHeader(b"cache-control", b"no-store")
        return text.encode("utf-8")

    def _later(self, request, produce):
        """Answer with what `produce(request)` (a Deferred[bytes]) gives; a
        client gone meanwhile gets nothing; an error is a plain 500."""
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(body):
            if gone:
                return
            request.write(body)
            request.finish()

        def failed(failure):
            log.failure("{path}: internal error", failure, path=request.path.decode("ascii", "replace"))
            if gone:
                return
            request.setResponseCode(500)
            request.write(self._text(request, "internal error\n"))
            request.finish()
        defer.maybeDeferred(produce, request).addCallbacks(answer, failed)
        return server.NOT_DONE_YET

    def _ready(self, request) -> defer.Deferred:
        if self.readiness is None:
            return defer.succeed(self._text(request, "ready\n"))

        def judged(problems):
            if not problems:
                return self._text(request, "ready\n")
            request.setResponseCode(503)
            return self._text(request, "".join(f"{line}\n" for line in problems))
        return self.readiness.check().addCallback(judged)

    def _metrics(self, request) -> defer.Deferred:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        def rendered(_):
            body = metrics_module.render(self.registry, process_metrics=self.process_metrics)
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            return body
        return self.registry.prepare(self.clock, PREPARE_TIMEOUT).addCallback(rendered)


class OpsSite(server.Site):
    """The http role's protocol factory: no access log (a scrape every few
    seconds would fill it), no tracebacks, an idle timeout."""

    noisy = False
    displayTracebacks = False

    def __init__(self, *, registry=None, readiness: Readiness | None = None, clock, process_metrics: bool = True,
                 timeout: float = REQUEST_TIMEOUT):
        root = OpsResource(registry=registry, readiness=readiness, clock=clock, process_metrics=process_metrics)
        super().__init__(root, timeout=timeout, reactor=clock)

    def log(self, request):
        pass


# -- what the registry reads at scrape time --------------------------------------------------------

def _screen_samples(name: str, screen):
    M = metrics_module
    yield M.SCREEN_REFUSED, (name, "dnsbl"), screen.dnsbl_refused
    yield M.SCREEN_REFUSED, (name, "pregreet"), screen.pregreet_refused
    dnsbl = screen.dnsbl
    if dnsbl is not None:
        yield M.DNSBL_QUERIES, (name,), dnsbl.queries
        yield M.DNSBL_TIMEOUTS, (name,), dnsbl.timeouts
        yield M.DNSBL_CACHE_HITS, (name,), dnsbl.cache_hits
        yield M.DNSBL_LISTED, (name,), dnsbl.listed


def watch_sessions(registry, factories: Callable[[], dict]) -> None:
    """The screens (pregreet, DNS blocklists) of the SMTP listeners;
    `factories()` is {listener name: protocol factory} now."""
    def screens():
        found = {}
        for name, factory in (factories() or {}).items():
            screen = getattr(_inner(factory), "screen", None)
            if screen is not None:
                found[name] = screen
        return found
    registry.watch("screens", screens, _screen_samples)


def _stage_samples(stage):
    M = metrics_module
    yield M.UNSCANNED, (), stage.unscanned
    client = getattr(stage, "rspamd", None)
    if client is not None:
        yield M.RSPAMD_REQUESTS, ("scan",), client.scans
        yield M.RSPAMD_REQUESTS, ("learn",), client.learns
        yield M.RSPAMD_FAILURES, (), client.failures


def _learner_samples(learner):
    for result in ("submitted", "learned", "known", "failed", "dropped", "gone"):
        yield metrics_module.JUNK_LEARNS, (result,), getattr(learner, result)


def watch_checks(registry, realm: Callable[[], object]) -> None:
    """The checks stage (rspamd's counters, unscanned messages) and the Junk
    learner of the realm now (`realm()`, a MailRealm or None)."""
    def stage():
        router = getattr(realm(), "router", None)
        return getattr(router, "stages", None)
    registry.watch("checks", stage, _stage_samples)
    registry.watch("learner", lambda: getattr(realm(), "learner", None), _learner_samples)


def watch_queue(registry, runner: Callable[[], object]) -> None:
    def samples():
        current = runner()
        if current is None:
            return []
        return [(metrics_module.QUEUE_MESSAGES, (), len(current.envelopes)),
                (metrics_module.QUEUE_OLDEST, (), current.oldest_age()),
                (metrics_module.QUEUE_DELIVERIES_ACTIVE, (), current.stats()["deliveries_active"])]
    registry.declare(metrics_module.QUEUE_MESSAGES, metrics_module.QUEUE_OLDEST)
    registry.add_source("queue", samples)


def watch_store(registry, *, quota, addresses: Callable[[], list], run_in_thread, clock,
                refresh: float = STORE_REFRESH) -> None:
    """mailgw_store_bytes/_messages/_mailboxes: the users' mailbox sizes
    (Quota.totals, in a thread), summed again at most every `refresh`
    seconds, before a scrape."""
    state = {"at": None, "totals": (0, 0, 0), "running": None}

    def prepare():
        now = clock.seconds()
        if state["running"] is not None:
            return state["running"]
        if state["at"] is not None and now - state["at"] < refresh:
            return None
        users = list(addresses())

        def got(totals):
            state["totals"], state["at"] = totals, clock.seconds()

        def done(result):
            state["running"] = None
            return result
        d = state["running"] = run_in_thread(quota.totals, users)
        d.addCallback(got)
        d.addErrback(lambda failure: log.failure("summing the mailbox sizes failed", failure))
        return d.addBoth(done)

    def samples():
        octets, messages, mailboxes = state["totals"]
        return [(metrics_module.STORE_BYTES, (), octets), (metrics_module.STORE_MESSAGES, (), messages),
                (metrics_module.STORE_MAILBOXES, (), mailboxes)]
    registry.add_preparer("store", prepare)
    registry.add_source("store", samples)


def watch_workers(registry, workers: Callable[[], object], clock) -> None:
    """The SMTP workers (mailgw/workers.py): how many run, how old their
    reports are, and a fresh report from each before a scrape."""
    def samples():
        pool = workers()
        if pool is None:
            return []
        now = clock.seconds()
        found = [(metrics_module.WORKERS_RUNNING, (), len(pool.workers))]
        for number, worker in sorted(pool.workers.items()):
            if worker.reported_at is not None:
                found.append((metrics_module.WORKER_REPORTS, (str(number),), now - worker.reported_at))
        return found

    def prepare():
        pool = workers()
        return pool.request_metrics() if pool is not None else None
    registry.add_source("workers", samples)
    registry.add_preparer("workers", prepare)


def site_for_parts(parts, config=None, *, reactor=None, threadpool=None, registry=None) -> OpsSite:
    """The http role's Site for the main process (tap.ServerParts `parts`, which
    keeps it for every config); registers its components with the registry."""
    registry = metrics_module.registry_or_default(registry)
    reactor = parts.reactor if reactor is None else reactor
    threadpool = parts.io_pool if threadpool is None else threadpool

    def run_in_thread(f, *args):
        return deferToThreadPool(reactor, threadpool, f, *args)

    watch_sessions(registry, lambda: parts.factories)
    watch_checks(registry, lambda: getattr(getattr(parts, "portal", None), "realm", None))
    watch_queue(registry, lambda: parts.runner)
    watch_store(registry, quota=parts.quota, addresses=lambda: parts.userdb.addresses(),
                run_in_thread=run_in_thread, clock=reactor)
    watch_workers(registry, lambda: getattr(parts, "workers", None), reactor)
    readiness = Readiness(config=lambda: parts.config, listener_problems=lambda: server_listener_problems(parts),
                          run_in_thread=run_in_thread, clock=reactor)
    return OpsSite(registry=registry, readiness=readiness, clock=reactor)


def watch_worker(registry, factories: Callable[[], dict]) -> None:
    """An SMTP worker: its listeners' screens and its checks stage (reached
    through its factories' portal), reported to the main process."""
    def realm():
        for factory in (factories() or {}).values():
            portal = getattr(_inner(factory), "portal", None)
            if portal is not None:
                return getattr(portal, "realm", None)
        return None
    watch_sessions(registry, factories)
    watch_checks(registry, realm)
