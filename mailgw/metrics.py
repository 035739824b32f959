"""Metrics: a small in-process registry the code increments cheaply, shown to
Prometheus by mailgw/ops_http.py (`GET /metrics` on the `http` listener).

Values are plain dicts of floats, so a whole registry is a JSON-able
`snapshot()` (an SMTP worker sends its own to the main process, which merges
them; see "Worker mode" below). prometheus_client only renders: `render()`
turns a registry into Counter/Gauge/HistogramMetricFamily objects on a
private CollectorRegistry (never prometheus_client's global REGISTRY) with
this process's `process_*` metrics beside them.

Definitions. A metric is declared once, at import time, by the module that
owns it, as a constant (name, help, label names; buckets for a histogram):

    SCANS = metrics.Counter("mailgw_thing_scans_total", "Scans started.", ("result",))

Names follow Prometheus's conventions: `mailgw_` first, base units
(`_seconds`, `_bytes`), `_total` on counters and nowhere else. Label values
must stay few (verbs from a command table, reply classes, listener names),
never an address or a queue id. A name is defined once in the process;
defining it again differently is an error.

Counting. Everything that counts takes a registry as an optional
constructor argument (`metrics=None`: the process's one `DEFAULT`), so a test
passes its own `Registry()`; label values are positional, in the order of
the definition's label names:

    self.metrics.inc(SCANS, "ok")                # counters: +1 (or amount=)
    self.metrics.observe(SCAN_SECONDS, 0.042)     # histograms
    self.metrics.add(OPEN, +1, "relay")          # gauges that go up and down
    self.metrics.set(WORKERS, 2)

Gauges read at scrape time: `add_gauge(metric, fn)` where `fn()` is a
number, or (for a labelled gauge) an iterable of (label values, number).

Sources. A component that already keeps plain integer counters (the DNSBL
checker, the screen, the rspamd client, the Junk learner...) is read at
scrape time instead of being changed:

    registry.add_source("acme", lambda: [(RENEWALS, (), manager.renewals),
                                         (EXPIRY, ("mx.example",), seconds_left)])

`fn()` yields (metric, label values, value) for counters and gauges. A
source registered again under the same key replaces the old one; the
counters the old one reported (read one last time) carry on underneath, so
a counter never goes backwards when a reload builds a new component. For a
component that a reload replaces, `watch(key, current, read)` does that by
itself: `current()` is the component now (or None), `read(component)` its
samples; when `current()` returns another object, the last one is folded
in. `remove_source(key)` forgets a source (its counts stay).

Scrapes may need work first (asking the workers, summing mailbox sizes in
a thread): `add_preparer(key, fn)`, `fn()` -> Deferred, run by `prepare()`
before each scrape, bounded by a timeout.

Worker mode ([server] smtp_workers = N). Each worker's registry counts its
own SMTP sessions. Its `snapshot()` (counters, histograms, gauges, with the
sources and gauge callbacks evaluated) goes to the main process over the
worker's pipe (mailgw/workers.py: every REPORT_INTERVAL seconds and when a
scrape asks). The main process keeps the latest snapshot of each live
worker process (`set_remote`); when a worker exits, its last snapshot's
counters and histograms move into an accumulated base (`retire_remote`)
and its gauges are dropped. A scrape shows own values + base + every live
worker's latest: a restarted worker starts again at zero on top of what its
predecessor had reported, so counters never go backwards and nothing is
counted twice. What a worker counted after its last snapshot and before a
crash (kill -9) is lost, never doubled.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
# Latencies from a few milliseconds (loopback) to the time budgets (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Bytes of a snapshot beyond which a worker's report is refused (a bug, not traffic).
MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024


class Metric(NamedTuple):
    name: str
    help: str
    type: str
    labelnames: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


_CATALOG: dict[str, Metric] = {}


def _define(metric: Metric) -> Metric:
    known = _CATALOG.get(metric.name)
    if known is not None and known != metric:
        raise ValueError(f"metric {metric.name} defined twice, differently")
    if metric.type == COUNTER and not metric.name.endswith("_total"):
        raise ValueError(f"counter {metric.name} must end in _total")
    if metric.type != COUNTER and metric.name.endswith("_total"):
        raise ValueError(f"{metric.type} {metric.name} must not end in _total")
    _CATALOG[metric.name] = metric
    return metric


def Counter(name: str, help: str, labelnames: Iterable[str] = ()) -> Metric:
    return _define(Metric(name, help, COUNTER, tuple(labelnames)))


def Gauge(name: str, help: str, labelnames: Iterable[str] = ()) -> Metric:
    return _define(Metric(name, help, GAUGE, tuple(labelnames)))


def Histogram(name: str, help: str, labelnames: Iterable[str] = (), buckets=LATENCY_BUCKETS) -> Metric:
    buckets = tuple(float(b) for b in buckets)
    if list(buckets) != sorted(set(buckets)) or not buckets or math.isinf(buckets[-1]):
        raise ValueError(f"histogram {name}: buckets must be finite and increasing")
    return _define(Metric(name, help, HISTOGRAM, tuple(labelnames), buckets))


def defined(name: str) -> Metric | None:
    return _CATALOG.get(name)


def catalog() -> list[Metric]:
    """Every metric defined so far (the modules define theirs at import)."""
    return list(_CATALOG.values())


# -- the metrics of mailgw's own components (each module increments its own) ------------------
# Connections and sessions (mailgw/session/core.py): every protocol.
CONNECTIONS = Counter("mailgw_connections_total", "Connections admitted, per listener.", ("listener", "protocol"))
CONNECTIONS_OVER_LIMIT = Counter("mailgw_connections_over_limit_total",
                                 "Connections refused by max_connections or max_connections_per_ip.",
                                 ("listener", "protocol"))
CONNECTIONS_OPEN = Gauge("mailgw_connections_open", "Connections open now.", ("listener", "protocol"))
COMMANDS = Counter("mailgw_commands_total", "Commands received, by verb (\"other\" for unknown ones).",
                   ("protocol", "command"))
REPLIES = Counter("mailgw_replies_total",
                  "Replies sent: SMTP 2xx/3xx/4xx/5xx, POP3 +OK/-ERR, IMAP tagged OK/NO/BAD (and untagged BAD).",
                  ("protocol", "class"))
TLS_HANDSHAKES = Counter("mailgw_tls_handshakes_total", "TLS handshakes completed (STARTTLS and implicit TLS).",
                         ("listener", "protocol", "version"))
TLS_FAILURES = Counter("mailgw_tls_handshake_failures_total",
                       "TLS handshakes that did not complete before the connection ended.", ("listener", "protocol"))
# SMTP (mailgw/smtp/server.py).
MESSAGES_ACCEPTED = Counter("mailgw_messages_accepted_total", "Messages accepted (250 after DATA).", ("listener",))
MESSAGES_REFUSED = Counter("mailgw_messages_refused_total",
                           "Refused MAIL, RCPT, DATA and message data, by the refusal's name in mailgw/smtp/codes.py.",
                           ("listener", "stage", "reason"))
# Logins (mailgw/auth/checkers.py, the one checker of the main process).
LOGINS = Counter("mailgw_logins_total", "Password checks: success, failure, or lockout (refused while locked out).",
                 ("result",))
LOCKOUTS = Counter("mailgw_login_lockouts_total", "Client addresses locked out after too many failed logins.")
# The relay queue (mailgw/queue/runner.py).
DELIVERIES = Counter("mailgw_deliveries_total",
                     "Delivery attempts per recipient: sent, deferred, bounced, expired; by destination class.",
                     ("outcome", "destination"))
DSN_SENT = Counter("mailgw_dsn_sent_total", "Delivery status notifications sent, by type.", ("type",))
QUEUE_MESSAGES = Gauge("mailgw_queue_messages", "Messages in the relay queue.")
QUEUE_OLDEST = Gauge("mailgw_queue_oldest_age_seconds", "Age of the oldest message in the relay queue.")
QUEUE_DELIVERIES_ACTIVE = Gauge("mailgw_queue_deliveries_active", "Outbound deliveries under way.")
# Latencies.
RSPAMD_SCAN_SECONDS = Histogram("mailgw_rspamd_scan_seconds", "Time rspamd took to scan a message (failures too).",
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0))
DNS_QUERY_SECONDS = Histogram("mailgw_dns_query_seconds", "Time DNS queries of the mail checks took, by record type.",
                              ("type",))
DNS_ERRORS = Counter("mailgw_dns_query_errors_total", "DNS queries without an answer (SERVFAIL, refused, timeout).",
                     ("type",))
# The mailbox store (mailgw/store/quota.py sums).
STORE_BYTES = Gauge("mailgw_store_bytes", "Octets stored in every user's mailbox (Maildir++ maildirsize sums).")
STORE_MESSAGES = Gauge("mailgw_store_messages", "Messages stored in every user's mailbox.")
STORE_MAILBOXES = Gauge("mailgw_store_mailboxes", "User mailboxes summed in mailgw_store_bytes.")
# SMTP workers (mailgw/workers.py).
WORKER_RESTARTS = Counter("mailgw_worker_restarts_total", "SMTP worker processes started again after they exited.")
WORKERS_RUNNING = Gauge("mailgw_workers_running", "SMTP worker processes running.")
WORKER_REPORTS = Gauge("mailgw_worker_report_age_seconds", "Age of the newest metrics report of each SMTP worker.",
                       ("worker",))
# The existing plain counters, read as sources (ops_http.watch_components).
DNSBL_QUERIES = Counter("mailgw_dnsbl_queries_total", "DNS blocklist zone queries sent.", ("listener",))
DNSBL_TIMEOUTS = Counter("mailgw_dnsbl_timeouts_total", "DNS blocklist queries that ran out of budget.",
                         ("listener",))
DNSBL_CACHE_HITS = Counter("mailgw_dnsbl_cache_hits_total", "DNS blocklist verdicts from the cache.", ("listener",))
DNSBL_LISTED = Counter("mailgw_dnsbl_listed_total", "Clients found on a DNS blocklist.", ("listener",))
SCREEN_REFUSED = Counter("mailgw_screen_refused_total",
                         "Clients refused before the greeting: dnsbl (554 instead of 220) or pregreet.",
                         ("listener", "reason"))
RSPAMD_REQUESTS = Counter("mailgw_rspamd_requests_total", "Requests to rspamd: scan and learn.", ("kind",))
RSPAMD_FAILURES = Counter("mailgw_rspamd_failures_total", "Requests to rspamd that failed (no answer, HTTP error).")
UNSCANNED = Counter("mailgw_messages_unscanned_total", "Messages accepted unscanned because rspamd was unavailable.")
JUNK_LEARNS = Counter("mailgw_junk_learns_total",
                      "Junk learning: submitted, learned, known, failed, dropped (backlog full), gone (expunged).",
                      ("result",))


def _labels(values) -> tuple[str, ...]:
    return tuple(str(value) for value in values)


class Values:
    """One view of metric values: {name: {label values: value}} for counters
    and gauges, {name: {label values: [bucket counts..., +Inf count, sum]}}
    for histograms (per-bucket counts, not cumulative: they add up)."""

    def __init__(self):
        self.counters: dict[str, dict[tuple, float]] = {}
        self.gauges: dict[str, dict[tuple, float]] = {}
        self.histograms: dict[str, dict[tuple, list[float]]] = {}

    def add_counter(self, name: str, labels: tuple, value: float) -> None:
        series = self.counters.setdefault(name, {})
        series[labels] = series.get(labels, 0.0) + value

    def add_gauge(self, name: str, labels: tuple, value: float) -> None:
        series = self.gauges.setdefault(name, {})
        series[labels] = series.get(labels, 0.0) + value

    def add_histogram(self, name: str, labels: tuple, cells: list[float]) -> None:
        series = self.histograms.setdefault(name, {})
        mine = series.get(labels)
        if mine is None:
            series[labels] = list(cells)
        elif len(mine) == len(cells):
            for i, cell in enumerate(cells):
                mine[i] += cell

    def merge(self, other: "Values", *, gauges: bool = True) -> None:
        for name, series in other.counters.items():
            for labels, value in series.items():
                self.add_counter(name, labels, value)
        for name, series in other.histograms.items():
            for labels, cells in series.items():
                self.add_histogram(name, labels, cells)
        if gauges:
            for name, series in other.gauges.items():
                for labels, value in series.items():
                    self.add_gauge(name, labels, value)

    def add_sample(self, metric: Metric, labels, value) -> None:
        labels = _labels(labels)
        if len(labels) != len(metric.labelnames):
            log.error("metric {name}: {got} label values for {want}", name=metric.name, got=len(labels),
                      want=len(metric.labelnames))
            return
        if metric.type == COUNTER:
            self.add_counter(metric.name, labels, float(value))
        elif metric.type == GAUGE:
            self.add_gauge(metric.name, labels, float(value))

    def to_json(self) -> dict:
        def rows(table):
            return [[name, list(labels), value] for name, series in sorted(table.items())
                    for labels, value in series.items()]
        return {"counters": rows(self.counters), "gauges": rows(self.gauges), "histograms": rows(self.histograms)}

    @classmethod
    def from_json(cls, data) -> "Values":
        """A snapshot from another process; ValueError if it is not one.
        Names this process does not define, or defines otherwise, are left out."""
        if not isinstance(data, dict):
            raise ValueError("snapshot: not an object")
        values = cls()
        for key, kind in (("counters", COUNTER), ("gauges", GAUGE), ("histograms", HISTOGRAM)):
            rows = data.get(key, [])
            if not isinstance(rows, list):
                raise ValueError(f"snapshot: {key} is not a list")
            for row in rows:
                if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                        and isinstance(row[1], list) and all(isinstance(v, str) for v in row[1])):
                    raise ValueError(f"snapshot: bad row in {key}")
                name, labels, value = row[0], tuple(row[1]), row[2]
                metric = _CATALOG.get(name)
                if metric is None or metric.type != kind or len(labels) != len(metric.labelnames):
                    continue
                if kind == HISTOGRAM:
                    if not (isinstance(value, list) and len(value) == len(metric.buckets) + 2
                            and all(isinstance(v, (int, float)) for v in value)):
                        continue
                    values.add_histogram(name, labels, [float(v) for v in value])
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    (values.add_counter if kind == COUNTER else values.add_gauge)(name, labels, float(value))
        return values


class _Source:
    def __init__(self, collect: Callable[[], Iterable]):
        self.collect = collect

    def samples(self):
        return self.collect()


class _Watched:
    """A source over the components `current()` returns now ({key:
    component}, or one component, or None); the counters of those it no
    longer returns (replaced or gone) carry on in `base`."""

    def __init__(self, current, read):
        self.current = current
        self.read = read
        self.last: dict = {}
        self.base = Values()

    def _now(self) -> dict:
        found = self.current()
        if found is None:
            return {}
        return dict(found) if isinstance(found, dict) else {None: found}

    def samples(self):
        now = {key: component for key, component in self._now().items() if component is not None}
        for key, component in self.last.items():
            if now.get(key) is not component:
                retired = Values()
                for metric, labels, value in self._read(key, component):
                    if metric.type == COUNTER:
                        retired.add_sample(metric, labels, value)
                self.base.merge(retired, gauges=False)
        self.last = now
        samples = [sample for key, component in now.items() for sample in self._read(key, component)]
        for name, series in self.base.counters.items():
            metric = _CATALOG[name]
            samples.extend((metric, labels, value) for labels, value in series.items())
        return samples

    def _read(self, key, component):
        return list(self.read(component) if key is None else self.read(key, component))


class Registry:
    """One per process (`DEFAULT`); tests make their own. Everything runs on
    the reactor thread."""

    def __init__(self):
        self.own = Values()
        self._declared: dict[str, Metric] = {}
        self._gauge_callbacks: list[tuple[Metric, Callable]] = []
        self._sources: dict[str, object] = {}
        self._base = Values()                 # retired sources' counters, exited workers' last reports
        self._remote: dict[object, Values] = {}
        self._preparers: dict[str, Callable[[], defer.Deferred]] = {}

    # -- counting ---------------------------------------------------------------------
    def inc(self, metric: Metric, *labels, amount: float = 1.0) -> None:
        series = self.own.counters.get(metric.name)
        if series is None:
            series = self.own.counters[metric.name] = {}
            self._declared[metric.name] = metric
        series[labels] = series.get(labels, 0.0) + amount

    def observe(self, metric: Metric, value: float, *labels) -> None:
        series = self.own.histograms.get(metric.name)
        if series is None:
            series = self.own.histograms[metric.name] = {}
            self._declared[metric.name] = metric
        cells = series.get(labels)
        if cells is None:
            cells = series[labels] = [0.0] * (len(metric.buckets) + 2)
        # le is "less than or equal": a value on a bound is in that bucket.
        cells[bisect.bisect_left(metric.buckets, value)] += 1
        cells[-1] += value

    def add(self, metric: Metric, delta: float, *labels) -> None:
        series = self.own.gauges.get(metric.name)
        if series is None:
            series = self.own.gauges[metric.name] = {}
            self._declared[metric.name] = metric
        series[labels] = series.get(labels, 0.0) + delta

    def set(self, metric: Metric, value: float, *labels) -> None:
        self.add(metric, 0.0, *labels)
        self.own.gauges[metric.name][labels] = float(value)

    def declare(self, *metrics: Metric) -> None:
        """Shown even before anything was counted (0 for a metric without labels)."""
        for metric in metrics:
            self._declared[metric.name] = metric

    # -- read at scrape time --------------------------------------------------------
    def add_gauge(self, metric: Metric, fn: Callable) -> None:
        self._declared[metric.name] = metric
        self._gauge_callbacks.append((metric, fn))

    def add_source(self, key: str, collect: Callable[[], Iterable]) -> None:
        old = self._sources.get(key)
        if old is not None:
            self._retire(old)
        self._sources[key] = _Source(collect)

    def watch(self, key: str, current: Callable[[], object], read: Callable[..., Iterable]) -> None:
        """A source over replaceable components: `current()` is one component
        (or None) read by `read(component)`, or a dict {name: component}
        read by `read(name, component)`."""
        old = self._sources.get(key)
        if old is not None:
            self._retire(old)
        self._sources[key] = _Watched(current, read)

    def remove_source(self, key: str) -> None:
        old = self._sources.pop(key, None)
        if old is not None:
            self._retire(old)

    def _retire(self, source) -> None:
        retired = Values()
        for metric, labels, value in self._read(source):
            if metric.type == COUNTER:
                retired.add_sample(metric, labels, value)
        self._base.merge(retired, gauges=False)

    def _read(self, source) -> list:
        try:
            return list(source.samples())
        except Exception:
            log.failure("a metrics source failed")
            return []

    def add_preparer(self, key: str, fn: Callable[[], defer.Deferred]) -> None:
        self._preparers[key] = fn

    def prepare(self, clock, timeout: float) -> defer.Deferred:
        """Run the preparers; fires (never fails) when all are done or after `timeout`."""
        work = []
        for fn in list(self._preparers.values()):
            d = defer.maybeDeferred(fn)
            d.addErrback(lambda failure: log.failure("preparing a metrics scrape failed", failure))
            work.append(d)
        if not work:
            return defer.succeed(None)
        done = defer.Deferred()
        timer = clock.callLater(timeout, lambda: done.called or done.callback(None))

        def finished(_):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)
        defer.DeferredList(work).addBoth(finished)
        return done

    # -- other processes -------------------------------------------------------------
    def set_remote(self, key, snapshot: Values) -> None:
        """The latest report of a live worker (key: its process)."""
        self._remote[key] = snapshot

    def retire_remote(self, key) -> None:
        """That worker exited: its counts stay, its gauges go."""
        last = self._remote.pop(key, None)
        if last is not None:
            self._base.merge(last, gauges=False)

    # -- views ------------------------------------------------------------------------
    def local(self) -> Values:
        """This process's own values, sources and gauge callbacks evaluated
        (what a worker reports). Not the other processes' reports."""
        values = Values()
        values.merge(self.own)
        for metric, fn in self._gauge_callbacks:
            try:
                result = fn()
                if isinstance(result, (int, float)):
                    values.add_sample(metric, (), result)
                else:
                    for labels, value in result:
                        values.add_sample(metric, labels, value)
            except Exception:
                log.failure("metrics gauge {name} failed", name=metric.name)
        for source in list(self._sources.values()):
            for metric, labels, value in self._read(source):
                self._declared.setdefault(metric.name, metric)
                values.add_sample(metric, labels, value)
        return values

    def collect(self) -> Values:
        """Everything the server counted: own + retired + every live worker's latest report."""
        values = self.local()
        values.merge(self._base, gauges=False)
        for remote in self._remote.values():
            values.merge(remote)
        return values

    def snapshot(self) -> dict:
        return self.local().to_json()

    def metrics(self, values: Values) -> list[Metric]:
        """The definitions to show: declared here, or seen in `values`."""
        names = set(self._declared) | set(values.counters) | set(values.gauges) | set(values.histograms)
        return [_CATALOG[name] for name in sorted(names) if name in _CATALOG]


DEFAULT = Registry()


def registry_or_default(registry: Registry | None) -> Registry:
    return DEFAULT if registry is None else registry


# -- exposition (prometheus_client) ----------------------------------------------------------------

def _by_labels(item) -> list[str]:
    return [str(value) for value in item[0]]


def _format_bound(bound: float) -> str:
    return repr(bound) if bound != int(bound) else f"{bound:.1f}"


class _Collector:
    """A prometheus_client collector over one view of a registry."""

    def __init__(self, registry: Registry, values: Values):
        self.registry = registry
        self.values = values

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        values = self.values
        for metric in self.registry.metrics(values):
            labels = list(metric.labelnames)
            if metric.type == COUNTER:
                family = CounterMetricFamily(metric.name, metric.help, labels=labels)
                series = values.counters.get(metric.name, {})
                if not series and not labels:
                    series = {(): 0.0}
                for label_values, value in sorted(series.items(), key=_by_labels):
                    family.add_metric([str(v) for v in label_values], value)
            elif metric.type == GAUGE:
                family = GaugeMetricFamily(metric.name, metric.help, labels=labels)
                series = values.gauges.get(metric.name, {})
                if not series and not labels:
                    series = {(): 0.0}
                for label_values, value in sorted(series.items(), key=_by_labels):
                    family.add_metric([str(v) for v in label_values], value)
            else:
                family = HistogramMetricFamily(metric.name, metric.help, labels=labels)
                for label_values, cells in sorted(values.histograms.get(metric.name, {}).items(), key=_by_labels):
                    cumulative, buckets = 0.0, []
                    for bound, count in zip((*metric.buckets, math.inf), cells[:-1]):
                        cumulative += count
                        buckets.append(("+Inf" if math.isinf(bound) else _format_bound(bound), cumulative))
                    family.add_metric([str(v) for v in label_values], buckets, cells[-1])
            yield family


def render(registry: Registry, *, process_metrics: bool = True) -> bytes:
    """The Prometheus text exposition of everything `registry` shows."""
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.exposition import generate_latest

    target = CollectorRegistry(auto_describe=False)
    if process_metrics:
        ProcessCollector(registry=target)          # process_cpu_seconds_total, ..._resident_memory_bytes
    target.register(_Collector(registry, registry.collect()))
    return generate_latest(target)
