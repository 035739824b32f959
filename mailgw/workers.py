"""SMTP worker processes: the main process and its helpers, and the pipe
protocol between them.

With `[server] smtp_workers = N` (N > 0) the main process binds every SMTP
listener as usual but does not accept on it: N worker processes
(`python -m mailgw.worker`, see worker.py) inherit the listening sockets and
accept, run the SMTP sessions and commit messages (Maildir, spool) with the
same durable writer. One reactor thread per CPU instead of one for all.

What must stay in one place stays in the main process, reached over each
worker's stdin/stdout (a private pipe, so passwords may cross it):

- password checks (`auth`): the failure delays and lockouts of SMTP, POP3
  and IMAP are one table, whichever process the client reached;
- the relay queue (`queued`): the runner learns of each committed entry;
- IMAP IDLE wake-ups (`delivered`);
- metrics (`metrics`): each worker reports a snapshot of its registry
  every REPORT_INTERVAL seconds, and at once when the main process asks
  (`metrics {"id": n}`, before a scrape of /metrics); the main process
  merges them (mailgw/metrics.py, "Worker mode").

Workers log to stderr, one `LEVEL<TAB>text` line per event; the main
process re-logs each line under the worker's name. Notices and info lines
are held up to FLUSH_DELAY and sent together. A worker that exits is
started again (after a back-off if it keeps dying); a worker whose pipe
closes (the main process died) stops. Messages are committed before their
250 whatever happens to the pipe: an entry whose `queued` line was lost is
found by a scan of the spool when its worker exits.

Messages are one line each: a verb, a space, a JSON value (no raw newline can
appear in JSON text).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import sys

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.internet.threads import deferToThreadPool
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText
from zope.interface import implementer

from mailgw import metrics as metrics_module
from mailgw.errors import LoginsRefused, TemporaryError, log_failure

log = Logger()

# A pipe line: an envelope with many long recipients can reach a few hundred KiB.
MAX_LINE = 16 * 1024 * 1024
# Seconds a worker gets to finish after its pipe closes, then SIGKILL.
STOP_GRACE = 10.0
# Restart back-off for a worker that keeps exiting (seconds: first, factor, cap).
RESTART_FIRST, RESTART_FACTOR, RESTART_MAX = 0.5, 2.0, 30.0
# A worker that ran this long before exiting restarts after RESTART_FIRST again.
RESTART_STABLE = 60.0
# A worker's notices (queued, delivered) and log lines wait this long (seconds)
# to go out together: at a few hundred messages a second the main process then
# wakes a few dozen times a second, not twice per message. Password checks
# are never held back. So the runner learns of a new entry, and IDLE of a new
# message, up to this much later.
FLUSH_DELAY = 0.05
FLUSH_BYTES = 64 * 1024
# Seconds between a worker's metrics reports (a scrape also asks for a fresh one).
REPORT_INTERVAL = 5.0

LEVELS = {level.name: level for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                                          LogLevel.critical)}


def encode(verb: str, value) -> bytes:
    return verb.encode("ascii") + b" " + json.dumps(value, separators=(",", ":")).encode("ascii") + b"\n"


def decode(line: bytes) -> tuple[str, object]:
    """(verb, value); ValueError for anything else."""
    verb, _, payload = line.partition(b" ")
    return verb.decode("ascii"), json.loads(payload)


def _b64(data) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


# -- the main process's side -------------------------------------------------------------------


class _Lines:
    """Splits one pipe of a worker into lines for `handle(line)`."""

    def __init__(self, handle, overflow):
        self.handle = handle
        self.overflow = overflow
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self.handle(line)
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            self.overflow()


class WorkerProcess(protocol.ProcessProtocol):
    """The main process's end of one worker: answers its requests and
    forwards its log lines."""

    def __init__(self, pool: "SMTPWorkers", number: int):
        self.pool = pool
        self.number = number
        self.name = f"smtp-worker-{number}"
        self.started_at = pool.clock.seconds()
        self.reported_at: float | None = None      # its last metrics report
        self._metrics_waiters: dict[int, defer.Deferred] = {}
        self.ended = defer.Deferred()
        self._out = _Lines(self._request, lambda: self._broken("request line too long"))
        self._err = _Lines(self._log_line, lambda: None)

    # ProcessProtocol
    def outReceived(self, data):
        self._out.dataReceived(data)

    def errReceived(self, data):
        self._err.dataReceived(data)

    def processEnded(self, reason):
        waiters, self._metrics_waiters = self._metrics_waiters, {}
        for waiter in waiters.values():
            waiter.callback(None)
        self.ended.callback(reason.value)
        self.pool.worker_ended(self, reason.value)

    # requests
    def _request(self, line: bytes) -> None:
        try:
            if line.startswith(b"metrics ") and len(line) > metrics_module.MAX_SNAPSHOT_BYTES:
                log.error("{worker}: metrics report of {size} bytes ignored", worker=self.name, size=len(line))
                return
            verb, value = decode(line)
            handler = {"queued": self._queued, "delivered": self._delivered, "auth": self._auth,
                       "metrics": self._metrics}[verb]
            handler(value)
        except Exception:
            log.failure("{worker}: bad request {line!r}", worker=self.name, line=line[:200])

    def _queued(self, envelope) -> None:
        self.pool.runner.add(envelope)

    def _metrics(self, report) -> None:
        """{"snapshot": ..., "id": n (when it answers our request)}: its latest
        counts since it started (mailgw/metrics.py merges them)."""
        snapshot = metrics_module.Values.from_json(report["snapshot"])
        self.pool.metrics.set_remote(self, snapshot)
        self.reported_at = self.pool.clock.seconds()
        waiter = self._metrics_waiters.pop(report.get("id"), None)
        if waiter is not None:
            waiter.callback(None)

    def request_metrics(self) -> defer.Deferred:
        """Ask for a report now; fires when it is in (or the worker is gone)."""
        if self.transport is None or self.ended.called:
            return defer.succeed(None)
        self.pool.metrics_requests += 1
        number = self.pool.metrics_requests
        waiter = self._metrics_waiters[number] = defer.Deferred()
        self._send("metrics", {"id": number})
        return waiter

    def _delivered(self, addresses) -> None:
        if self.pool.mail_store is not None:
            self.pool.mail_store.delivered(addresses)

    def _auth(self, request) -> None:
        number = request["id"]
        try:
            creds = UsernamePassword(base64.b64decode(request["username"], validate=True),
                                     base64.b64decode(request["password"], validate=True))
            creds.client_ip = str(request["client"])
        except (KeyError, ValueError, TypeError):
            log.error("{worker}: malformed auth request {id}", worker=self.name, id=number)
            self._send("auth", {"id": number, "result": "error"})
            return
        d = defer.maybeDeferred(self.pool.checker.requestAvatarId, creds)

        def answer(result):
            self._send("auth", {"id": number, "result": "ok", "address": result})

        def refused(failure):
            if failure.check(UnauthorizedLogin):
                outcome = "fail"
            elif failure.check(LoginsRefused):
                outcome = "refused"
            else:
                log_failure(log, failure, "{worker}: password check failed", worker=self.name)
                outcome = "error"
            self._send("auth", {"id": number, "result": outcome})

        d.addCallbacks(answer, refused)

    def send_reload(self) -> None:
        self._send("reload", {})

    def _send(self, verb: str, value) -> None:
        if self.transport is not None:
            self.transport.write(encode(verb, value))

    def _log_line(self, line: bytes) -> None:
        level_name, _, text = line.decode("utf-8", "replace").partition("\t")
        level = LEVELS.get(level_name)
        if level is None:       # not one of ours: a traceback printed by Python itself
            level, text = LogLevel.error, line.decode("utf-8", "replace")
        log.emit(level, "{text}", text=text, log_system=self.name)

    def _broken(self, why: str) -> None:
        log.error("{worker}: {why}; stopping it", worker=self.name, why=why)
        self.stop()

    def stop(self) -> None:
        """Close its stdin (it finishes and exits); SIGKILL after STOP_GRACE."""
        if self.ended.called or self.transport is None:
            return
        self.transport.closeStdin()
        timer = self.pool.clock.callLater(STOP_GRACE, self._kill)
        self.ended.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])

    def _kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:     # already gone
            pass


class SMTPWorkers(service.Service):
    """Starts `count` worker processes sharing `sockets` (the SMTP listening
    ports, as (listener name, fd, address family) ) and keeps them running."""

    def __init__(self, *, reactor, clock, count: int, config_path, sockets, checker, runner, spool,
                 mail_store=None, threadpool=None, python=sys.executable, metrics=None):
        self.reactor = reactor
        # mailgw_worker_restarts_total; the workers' reports are merged in here.
        self.metrics = metrics_module.registry_or_default(metrics)
        self.metrics.declare(metrics_module.WORKER_RESTARTS)
        self.metrics_requests = 0
        self.clock = clock
        self.count = count
        self.config_path = config_path
        self.sockets = tuple(sockets)
        self.checker = checker
        self.runner = runner
        self.spool = spool
        self.mail_store = mail_store
        self.threadpool = threadpool
        self.python = python
        self.workers: dict[int, WorkerProcess] = {}
        self._restart_delay: dict[int, float] = {}
        self._restart_timers: dict[int, object] = {}

    def startService(self):
        super().startService()
        for number in range(1, self.count + 1):
            self._spawn(number)

    def reload(self) -> None:
        """A reload (mailgw/reload.py) in the main process: each worker
        re-reads the config file and switches its ports to new factories; its
        open sessions finish on the old ones. A worker started later reads
        the new file anyway."""
        for worker in self.workers.values():
            worker.send_reload()

    def command(self, number: int) -> tuple[list[str], dict]:
        """(argv, childFDs) for worker `number`: its sockets from fd 3 on."""
        argv = [self.python, "-m", "mailgw.worker", "--number", str(number), "--workers", str(self.count)]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        child_fds = {0: "w", 1: "r", 2: "r"}
        for offset, (name, fd, family) in enumerate(self.sockets):
            child_fds[3 + offset] = fd
            argv += ["--socket", f"{name}={3 + offset}:{family}"]
        return argv, child_fds

    def _spawn(self, number: int) -> None:
        self._restart_timers.pop(number, None)
        argv, child_fds = self.command(number)
        worker = WorkerProcess(self, number)
        try:
            self.reactor.spawnProcess(worker, self.python, argv, env=dict(os.environ), childFDs=child_fds)
        except Exception:       # fork or pipe failed (EMFILE, EAGAIN...): try again later
            log.failure("cannot start {worker}", worker=worker.name)
            self._restart_later(number)
            return
        self.workers[number] = worker
        log.info("started {worker} (pid {pid})", worker=worker.name, pid=worker.transport.pid)

    def _restart_later(self, number: int, ran: float = 0.0) -> float:
        """Schedule worker `number` again; the delay doubles while it keeps failing."""
        delay = RESTART_FIRST if ran >= RESTART_STABLE else self._restart_delay.get(number, RESTART_FIRST)
        self._restart_delay[number] = min(delay * RESTART_FACTOR, RESTART_MAX)
        if self.running:
            self._restart_timers[number] = self.clock.callLater(delay, self._spawn, number)
        return delay

    def worker_ended(self, worker: WorkerProcess, reason) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        # Its counts stay (its last report), its gauges go; its successor starts at zero.
        self.metrics.retire_remote(worker)
        # Its last `queued` lines may not have arrived: look for entries the runner does not know.
        self._adopt_unknown_entries()
        if not self.running:
            return
        delay = self._restart_later(worker.number, ran=self.clock.seconds() - worker.started_at)
        self.metrics.inc(metrics_module.WORKER_RESTARTS)
        log.error("{worker} exited ({reason}); starting it again in {delay:.1f} s", worker=worker.name,
                  reason=str(reason), delay=delay)

    def _adopt_unknown_entries(self) -> defer.Deferred:
        # Finished entries too: their files may not be unlinked yet.
        known = set(self.runner.envelopes) | set(self.runner.finished)

        def scan():
            found = []
            for queue_id in self.spool.ids():
                if queue_id not in known:
                    try:
                        found.append(self.spool.load(queue_id)[0])
                    except (KeyError, ValueError, OSError):
                        pass        # gone meanwhile, or the runner's start-up recovery's business
            return found

        def adopt(envelopes):
            # The runner may have learned of some while the scan ran.
            for envelope in envelopes:
                if envelope.id not in self.runner.envelopes and envelope.id not in self.runner.finished:
                    log.info("{queue_id}: found in the spool after a worker exited", queue_id=envelope.id)
                    self.runner.add(envelope)

        if self.threadpool is None:
            d = defer.maybeDeferred(scan)
        else:
            d = deferToThreadPool(self.reactor, self.threadpool, scan)
        d.addCallback(adopt)
        d.addErrback(lambda failure: log_failure(log, failure, "spool scan after a worker exited failed"))
        return d

    def request_metrics(self) -> defer.Deferred:
        """A fresh report from every live worker (before a scrape)."""
        return defer.DeferredList([worker.request_metrics() for worker in list(self.workers.values())])

    def stopService(self):
        super().stopService()
        for timer in self._restart_timers.values():
            if timer.active():
                timer.cancel()
        self._restart_timers.clear()
        ended = []
        for worker in list(self.workers.values()):
            ended.append(worker.ended)
            worker.stop()
        return defer.DeferredList(ended)


# -- the worker's side ---------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class MasterLink(protocol.Protocol):
    """The worker's end of the pipe (its stdin/stdout): requests out, answers in.
    When the pipe closes (the main process is gone or stops us), `on_lost` runs.

    With a `clock`, notices (`send`) are held up to FLUSH_DELAY and written
    together; requests (`request`) go at once, with whatever is held."""

    def __init__(self, on_lost=None, clock=None, on_reload=None):
        self.on_lost = on_lost
        self.on_reload = on_reload          # the main process reloaded: re-read the config
        self.clock = clock
        self._lines = _Lines(self._answer, lambda: log.error("answer from the main process too long; dropped"))
        self._next_id = 0
        self._waiting: dict[int, defer.Deferred] = {}
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._flush_timer = None
        self.connected_to_master = False
        self._write_closed = False
        self._lost = False
        # Requests from the main process: verb -> handler(value) (WorkerMetricsReporter's "metrics").
        self.handlers: dict = {}

    def connectionMade(self):
        self.connected_to_master = True

    def readConnectionLost(self):
        # The main process closed our stdin (stop, or it died): what is held
        # goes out first, then the pipe closes (connectionLost follows).
        self.flush()
        if self._write_closed:
            self.connectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        # Nobody reads our stdout any more: the main process is gone.
        self._write_closed = True
        self.connectionLost()

    def connectionLost(self, reason=None):
        if self._lost:
            return
        self._lost = True
        self.connected_to_master = False
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        self._flush_timer = None
        self._held, self._held_bytes = [], 0
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(TemporaryError(454, "4.7.0", "Authentication service restarting, try again later"))
        if self.on_lost is not None:
            self.on_lost()

    def send(self, verb: str, value) -> None:
        if not self.connected_to_master:
            return
        line = encode(verb, value)
        if self.clock is None:
            self.transport.write(line)
            return
        self._held.append(line)
        self._held_bytes += len(line)
        if self._held_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = self.clock.callLater(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Write what `send` holds back, now."""
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        self._flush_timer = None
        if self._held and self.connected_to_master:
            self.transport.writeSequence(self._held)
        self._held, self._held_bytes = [], 0

    def send_now(self, verb: str, value) -> None:
        """Write a line at once, after whatever `send` holds."""
        if not self.connected_to_master:
            return
        self.flush()
        self.transport.write(encode(verb, value))

    def request(self, verb: str, value: dict) -> defer.Deferred:
        if not self.connected_to_master:
            return defer.fail(TemporaryError(454, "4.7.0", "Authentication service unavailable, try again later"))
        self._next_id += 1
        d = self._waiting[self._next_id] = defer.Deferred()
        self.flush()
        self.transport.write(encode(verb, dict(value, id=self._next_id)))
        return d

    def dataReceived(self, data: bytes) -> None:
        self._lines.dataReceived(data)

    def _answer(self, line: bytes) -> None:
        try:
            verb, answer = decode(line)
            handler = self.handlers.get(verb)
            if handler is not None:
                handler(answer)
                return
            if verb == "reload":
                if self.on_reload is not None:
                    self.on_reload()
                return
            d = self._waiting.pop(answer["id"])
        except (ValueError, KeyError, TypeError):
            log.error("bad answer from the main process: {line!r}", line=line[:200])
            return
        d.callback(answer)


class WorkerMetricsReporter(service.Service):
    """The worker's side of `metrics`: a snapshot of its registry every
    `interval` seconds, one when the main process asks (answered with its
    id), and one as it stops."""

    def __init__(self, link: MasterLink, *, clock, metrics=None, interval: float = REPORT_INTERVAL):
        self.link = link
        self.clock = clock
        self.metrics = metrics_module.registry_or_default(metrics)
        self.interval = interval
        self._loop = None
        link.handlers["metrics"] = self._asked

    def _report(self, **extra) -> dict:
        return dict(extra, snapshot=self.metrics.snapshot())

    def _asked(self, request) -> None:
        self.link.send_now("metrics", self._report(id=request.get("id") if isinstance(request, dict) else None))

    def send(self) -> None:
        self.link.send("metrics", self._report())

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.send)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.send()
        self.link.flush()


@implementer(ICredentialsChecker)
class RemoteChecker:
    """The worker's password checker: asks the main process's checker, so
    failure delays and lockouts count across every process and protocol."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, link: MasterLink):
        self.link = link

    def requestAvatarId(self, credentials) -> defer.Deferred:
        request = {"username": _b64(credentials.username), "password": _b64(credentials.password),
                   "client": str(getattr(credentials, "client_ip", "unknown"))}
        return self.link.request("auth", request).addCallback(self._outcome)

    @staticmethod
    def _outcome(answer: dict) -> str:
        result = answer.get("result")
        if result == "ok":
            return answer["address"]
        if result == "fail":
            raise UnauthorizedLogin("authentication failed")
        if result == "refused":
            raise LoginsRefused()
        raise TemporaryError(454, "4.7.0", "Temporary authentication failure")


def _no_time(_) -> str:
    return ""       # the main process stamps the line when it relogs it


class StderrLog:
    """The worker's log observer: `LEVEL<TAB>text` lines on stderr (a pipe
    the main process reads), LEVEL as LogLevel.name (`info`, `warn`...);
    a message's newlines (tracebacks) become " | " to keep it one line.

    With `hold=True` info and debug lines wait for `flush()` (the worker
    calls it every FLUSH_DELAY and at exit); warnings and errors, and
    everything held before them, go out at once."""

    def __init__(self, stream=None, *, hold: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        self.hold = hold
        self._held: list[str] = []

    def __call__(self, event) -> None:
        text = formatEventAsClassicLogText(event, formatTime=_no_time)
        if text is None:
            return
        level = event.get("log_level", LogLevel.info)
        self._held.append(f"{level.name}\t{text.strip().replace(chr(10), ' | ')}\n")
        if not self.hold or level >= LogLevel.warn or len(self._held) >= 1000:
            self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        lines, self._held = self._held, []
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            pass          # the main process is gone; the pipe's loss stops us


def ignore_terminal_signals() -> None:
    """A worker stops when its pipe closes, not on the terminal's Ctrl-C (the
    main process gets that and stops the workers in order), and a hangup
    does not end it (the main process logs and ignores SIGHUP)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
