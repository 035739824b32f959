"""The metrics registry (mailgw/metrics.py): counting, gauges read at scrape
time, sources that a reload replaces, the JSON snapshot a worker sends, the
merge of the workers' reports in the main process, and the exposition
through prometheus_client (parsed back, and checked by promtool)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task

from mailgw import metrics
from mailgw.metrics import Registry, Values

PROMTOOL = "/usr/bin/promtool"

# Test-only definitions (the catalog is per process; these names are ours alone).
HITS = metrics.Counter("mailgw_test_hits_total", "Hits, for the tests.", ("kind",))
PLAIN = metrics.Counter("mailgw_test_plain_total", "A counter without labels, for the tests.")
LEVEL = metrics.Gauge("mailgw_test_level", "A gauge, for the tests.", ("where",))
SECONDS = metrics.Histogram("mailgw_test_wait_seconds", "A histogram, for the tests.", ("kind",),
                            buckets=(0.1, 1.0, 10.0))


def scrape(registry: Registry, **options) -> dict:
    """{sample name + sorted labels: value} of the rendered text."""
    text = metrics.render(registry, **options).decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[key] = sample.value
    return samples


def promtool_check(text: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)


# -- definitions --------------------------------------------------------------------------------


def test_a_counter_must_end_in_total_and_nothing_else_may():
    with pytest.raises(ValueError):
        metrics.Counter("mailgw_test_bad", "no _total")
    with pytest.raises(ValueError):
        metrics.Gauge("mailgw_test_bad_total", "a gauge with _total")


def test_a_name_defined_again_differently_is_refused_and_the_same_definition_is_fine():
    assert metrics.Counter("mailgw_test_hits_total", "Hits, for the tests.", ("kind",)) == HITS
    with pytest.raises(ValueError):
        metrics.Counter("mailgw_test_hits_total", "Other help.", ("kind",))


def test_histogram_buckets_must_increase():
    with pytest.raises(ValueError):
        metrics.Histogram("mailgw_test_bad_seconds", "x", buckets=(1.0, 0.5))


# -- counting and exposition ----------------------------------------------------------------------


def test_counters_gauges_and_histograms_are_rendered_with_their_labels():
    registry = Registry()
    registry.inc(HITS, "a")
    registry.inc(HITS, "a", amount=2)
    registry.inc(HITS, "b")
    registry.add(LEVEL, 3, "here")
    registry.add(LEVEL, -1, "here")
    registry.set(LEVEL, 7, "there")
    for value in (0.05, 0.1, 0.5, 20.0):
        registry.observe(SECONDS, value, "x")
    samples = scrape(registry, process_metrics=False)
    assert samples["mailgw_test_hits_total|kind=a"] == 3
    assert samples["mailgw_test_hits_total|kind=b"] == 1
    assert samples["mailgw_test_level|where=here"] == 2
    assert samples["mailgw_test_level|where=there"] == 7
    # le is "less than or equal": 0.1 is in the 0.1 bucket; buckets are cumulative.
    assert samples["mailgw_test_wait_seconds_bucket|kind=x|le=0.1"] == 2
    assert samples["mailgw_test_wait_seconds_bucket|kind=x|le=1.0"] == 3
    assert samples["mailgw_test_wait_seconds_bucket|kind=x|le=10.0"] == 3
    assert samples["mailgw_test_wait_seconds_bucket|kind=x|le=+Inf"] == 4
    assert samples["mailgw_test_wait_seconds_count|kind=x"] == 4
    assert samples["mailgw_test_wait_seconds_sum|kind=x"] == pytest.approx(20.65)


def test_a_declared_counter_without_labels_shows_zero_before_anything_counted():
    registry = Registry()
    registry.declare(PLAIN)
    assert scrape(registry, process_metrics=False) == {"mailgw_test_plain_total": 0}


def test_process_metrics_are_on_the_private_registry_only():
    from prometheus_client import REGISTRY
    before = {name for name in REGISTRY._names_to_collectors}
    samples = scrape(Registry())
    assert "process_cpu_seconds_total" in samples
    assert {name for name in REGISTRY._names_to_collectors} == before


def test_gauge_callbacks_are_read_at_each_scrape():
    registry = Registry()
    level = {"now": 1}
    registry.add_gauge(LEVEL, lambda: [(("q",), level["now"])])
    assert scrape(registry, process_metrics=False)["mailgw_test_level|where=q"] == 1
    level["now"] = 5
    assert scrape(registry, process_metrics=False)["mailgw_test_level|where=q"] == 5


def test_a_failing_gauge_or_source_costs_only_its_own_samples():
    registry = Registry()
    registry.inc(PLAIN)
    registry.add_gauge(LEVEL, lambda: 1 / 0)
    registry.add_source("broken", lambda: 1 / 0)
    assert scrape(registry, process_metrics=False)["mailgw_test_plain_total"] == 1


@pytest.mark.skipif(not shutil.which(PROMTOOL), reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_accepts_every_mailgw_metric():
    """Every metric mailgw defines, with a sample, passes `promtool check metrics` silently."""
    registry = Registry()
    for metric in [m for name, m in sorted(metrics._CATALOG.items()) if not name.startswith("mailgw_test_")]:
        labels = tuple(f"v{i}" for i, _ in enumerate(metric.labelnames))
        if metric.type == metrics.COUNTER:
            registry.inc(metric, *labels)
        elif metric.type == metrics.GAUGE:
            registry.set(metric, 1.5, *labels)
        else:
            registry.observe(metric, 0.2, *labels)
    done = promtool_check(metrics.render(registry))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


# -- sources --------------------------------------------------------------------------------------


class Thing:
    def __init__(self, hits=0):
        self.hits = hits


def test_a_source_is_read_at_scrape_time():
    registry = Registry()
    thing = Thing()
    registry.add_source("thing", lambda: [(HITS, ("src",), thing.hits)])
    thing.hits = 4
    assert scrape(registry, process_metrics=False)["mailgw_test_hits_total|kind=src"] == 4


def test_a_source_replaced_under_its_key_keeps_the_old_counts_underneath():
    """A reload builds a new component: its counter starts at 0, the metric does not go back."""
    registry = Registry()
    old, new = Thing(5), Thing(0)
    registry.add_source("thing", lambda: [(HITS, ("src",), old.hits), (LEVEL, ("g",), 9)])
    old.hits = 6
    registry.add_source("thing", lambda: [(HITS, ("src",), new.hits)])
    new.hits = 2
    samples = scrape(registry, process_metrics=False)
    assert samples["mailgw_test_hits_total|kind=src"] == 8
    assert "mailgw_test_level|where=g" not in samples          # a replaced source's gauges go


def test_a_removed_source_keeps_its_counts():
    registry = Registry()
    registry.add_source("thing", lambda: [(HITS, ("src",), 3)])
    registry.remove_source("thing")
    assert scrape(registry, process_metrics=False)["mailgw_test_hits_total|kind=src"] == 3


def test_watch_folds_in_the_component_it_no_longer_sees_once():
    registry = Registry()
    current = {"thing": Thing(3)}
    registry.watch("thing", lambda: current["thing"], lambda thing: [(HITS, ("w",), thing.hits)])
    assert scrape(registry, process_metrics=False)["mailgw_test_hits_total|kind=w"] == 3
    old = current["thing"]
    old.hits = 4                                   # counted after the last scrape, before the switch
    current["thing"] = Thing(1)
    assert scrape(registry, process_metrics=False)["mailgw_test_hits_total|kind=w"] == 5
    assert scrape(registry, process_metrics=False)["mailgw_test_hits_total|kind=w"] == 5
    current["thing"].hits = 2
    assert scrape(registry, process_metrics=False)["mailgw_test_hits_total|kind=w"] == 6


def test_watch_of_named_components_folds_each_one_separately():
    registry = Registry()
    current = {"a": Thing(1), "b": Thing(10)}
    registry.watch("things", lambda: dict(current), lambda name, thing: [(HITS, (name,), thing.hits)])
    scrape(registry, process_metrics=False)
    current["a"] = Thing(0)
    del current["b"]
    samples = scrape(registry, process_metrics=False)
    assert samples["mailgw_test_hits_total|kind=a"] == 1
    assert samples["mailgw_test_hits_total|kind=b"] == 10


# -- snapshots and the workers' merge --------------------------------------------------------------


def filled(hits: float, level: float, waits=()) -> Registry:
    registry = Registry()
    registry.inc(HITS, "smtp", amount=hits)
    registry.set(LEVEL, level, "open")
    for value in waits:
        registry.observe(SECONDS, value, "x")
    return registry


def test_a_snapshot_is_json_and_reads_back_the_same():
    registry = filled(3, 2, waits=(0.5, 50))
    registry.add_source("thing", lambda: [(PLAIN, (), 7)])
    data = json.loads(json.dumps(registry.snapshot()))
    values = Values.from_json(data)
    assert values.counters["mailgw_test_hits_total"] == {("smtp",): 3.0}
    assert values.counters["mailgw_test_plain_total"] == {(): 7.0}
    assert values.gauges["mailgw_test_level"] == {("open",): 2.0}
    assert values.histograms["mailgw_test_wait_seconds"] == {("x",): [0.0, 1.0, 0.0, 1.0, 50.5]}


@pytest.mark.parametrize("data", [
    [], {"counters": {}}, {"counters": [["x"]]}, {"counters": [[1, [], 1]]}, {"counters": [["n", [1], 1]]},
])
def test_a_malformed_snapshot_is_refused(data):
    with pytest.raises(ValueError):
        Values.from_json(data)


def test_unknown_or_mistyped_rows_of_a_snapshot_are_left_out():
    values = Values.from_json({"counters": [["mailgw_test_nothing_total", [], 1],
                                            ["mailgw_test_level", ["x"], 1],
                                            ["mailgw_test_hits_total", ["a", "b"], 1],
                                            ["mailgw_test_hits_total", ["a"], True],
                                            ["mailgw_test_hits_total", ["ok"], 2]],
                               "histograms": [["mailgw_test_wait_seconds", ["x"], [1, 2]]]})
    assert values.counters == {"mailgw_test_hits_total": {("ok",): 2.0}}
    assert values.histograms == {}


def test_main_shows_its_own_counts_plus_each_live_workers_latest_report():
    main = filled(1, 1)
    main.set_remote("w1", Values.from_json(filled(10, 2, waits=(0.05,)).snapshot()))
    main.set_remote("w2", Values.from_json(filled(100, 3, waits=(5,)).snapshot()))
    samples = scrape(main, process_metrics=False)
    assert samples["mailgw_test_hits_total|kind=smtp"] == 111
    assert samples["mailgw_test_level|where=open"] == 6
    assert samples["mailgw_test_wait_seconds_count|kind=x"] == 2


def test_a_newer_report_replaces_the_older_one_it_is_never_added_to_it():
    main = Registry()
    main.set_remote("w1", Values.from_json(filled(10, 1).snapshot()))
    main.set_remote("w1", Values.from_json(filled(12, 1).snapshot()))
    assert scrape(main, process_metrics=False)["mailgw_test_hits_total|kind=smtp"] == 12


def test_a_restarted_worker_adds_to_its_predecessors_counts_and_they_never_go_back():
    main = Registry()
    main.set_remote("w1-first", Values.from_json(filled(10, 4, waits=(0.5,)).snapshot()))
    first = scrape(main, process_metrics=False)
    main.retire_remote("w1-first")                 # it exited (kill -9): its last report stays
    retired = scrape(main, process_metrics=False)
    assert retired["mailgw_test_hits_total|kind=smtp"] == 10
    assert "mailgw_test_level|where=open" not in retired     # its open connections are gone
    main.set_remote("w1-second", Values.from_json(filled(0, 0).snapshot()))
    restarted = scrape(main, process_metrics=False)
    assert restarted["mailgw_test_hits_total|kind=smtp"] == 10
    main.set_remote("w1-second", Values.from_json(filled(3, 1, waits=(20,)).snapshot()))
    later = scrape(main, process_metrics=False)
    assert later["mailgw_test_hits_total|kind=smtp"] == 13
    assert later["mailgw_test_wait_seconds_count|kind=x"] == 2
    assert later["mailgw_test_wait_seconds_sum|kind=x"] == pytest.approx(20.5)
    for key in first:
        if key.startswith("mailgw_test_hits_total") or key.startswith("mailgw_test_wait_seconds"):
            assert later[key] >= first[key], key
    main.retire_remote("w1-second")
    main.retire_remote("w1-second")                # a second notice changes nothing
    assert scrape(main, process_metrics=False)["mailgw_test_hits_total|kind=smtp"] == 13


def test_the_workers_reports_are_not_part_of_the_main_process_own_snapshot():
    main = filled(1, 0)
    main.set_remote("w1", Values.from_json(filled(10, 0).snapshot()))
    assert Values.from_json(main.snapshot()).counters["mailgw_test_hits_total"] == {("smtp",): 1.0}


# -- preparing a scrape ---------------------------------------------------------------------------


def test_prepare_waits_for_the_preparers_but_no_longer_than_its_timeout():
    clock = task.Clock()
    registry = Registry()
    fast, slow = defer.Deferred(), defer.Deferred()
    registry.add_preparer("fast", lambda: fast)
    registry.add_preparer("slow", lambda: slow)
    done = registry.prepare(clock, 2.0)
    fast.callback(None)
    assert not done.called
    clock.advance(2.0)
    assert done.called
    slow.callback(None)                            # late: harmless


def test_prepare_fires_when_all_preparers_are_done_even_if_one_fails():
    clock = task.Clock()
    registry = Registry()
    registry.add_preparer("broken", lambda: 1 / 0)
    registry.add_preparer("none", lambda: None)
    done = registry.prepare(clock, 2.0)
    assert done.called
    assert not clock.getDelayedCalls()


def test_histogram_values_above_the_last_bucket_land_in_inf_only():
    registry = Registry()
    registry.observe(SECONDS, math.inf, "y")
    samples = scrape(registry, process_metrics=False)
    assert samples["mailgw_test_wait_seconds_bucket|kind=y|le=10.0"] == 0
    assert samples["mailgw_test_wait_seconds_bucket|kind=y|le=+Inf"] == 1


# -- the http listener (mailgw/ops_http.py): /metrics, /healthz, /readyz, 404 ---------------------

import os as _os                                            # noqa: E402
from types import SimpleNamespace as _NS                    # noqa: E402

from twisted.web.test.requesthelper import DummyRequest    # noqa: E402

from mailgw import ops_http                                 # noqa: E402

# The names issue 17 asks for: (type, label names each must have).
REQUIRED = {
    "mailgw_connections_total": (metrics.COUNTER, {"listener", "protocol"}),
    "mailgw_connections_open": (metrics.GAUGE, {"listener"}),
    "mailgw_replies_total": (metrics.COUNTER, {"protocol", "class"}),
    "mailgw_messages_accepted_total": (metrics.COUNTER, {"listener"}),
    "mailgw_messages_refused_total": (metrics.COUNTER, {"listener", "reason"}),
    "mailgw_logins_total": (metrics.COUNTER, {"result"}),
    "mailgw_deliveries_total": (metrics.COUNTER, {"outcome"}),
    "mailgw_queue_messages": (metrics.GAUGE, set()),
    "mailgw_queue_oldest_age_seconds": (metrics.GAUGE, set()),
    "mailgw_tls_handshakes_total": (metrics.COUNTER, {"protocol", "version"}),
    "mailgw_rspamd_scan_seconds": (metrics.HISTOGRAM, set()),
    "mailgw_dns_query_seconds": (metrics.HISTOGRAM, set()),
    "mailgw_worker_restarts_total": (metrics.COUNTER, set()),
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_issue_17_metric_is_defined_with_help(name):
    metric = metrics.defined(name)
    assert metric is not None, name
    kind, labels = REQUIRED[name]
    assert metric.type == kind
    assert labels <= set(metric.labelnames)
    assert metric.help.strip()


def _inline(f, *args):
    return defer.maybeDeferred(f, *args)


def _readiness(tmp_path, *, min_free_space=0, listener_problems=lambda: []):
    (tmp_path / "queue" / "incoming").mkdir(parents=True)
    (tmp_path / "mail").mkdir()
    config = _NS(data_dir=tmp_path, queue_dir=tmp_path / "queue", mail_dir=tmp_path / "mail",
                 min_free_space=min_free_space)
    return ops_http.Readiness(config=lambda: config, listener_problems=listener_problems, run_in_thread=_inline,
                              clock=task.Clock()), config


def _site(registry=None, readiness=None):
    return ops_http.OpsSite(registry=registry or Registry(), readiness=readiness, clock=task.Clock(),
                            process_metrics=False)


def _get(site, path: bytes, method: bytes = b"GET"):
    """(code, body, headers) of one request to `site` (DummyRequest, no network)."""
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = method
    request.path = path
    request.uri = path
    result = site.getResourceFor(request).render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    assert request.finished, path
    return request.responseCode or 200, b"".join(request.written), request.responseHeaders


def test_healthz():
    assert _get(_site(), b"/healthz")[:2] == (200, b"ok\n")


def test_metrics_page_renders_the_registry():
    registry = Registry()
    registry.inc(metrics.LOGINS, "lockout")
    code, body, headers = _get(_site(registry), b"/metrics")
    assert code == 200
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert found[("mailgw_logins_total", (("result", "lockout"),))] == 1


@pytest.mark.parametrize("path", [b"/", b"/metrics/", b"/nope", b"/healthz/x", b"//metrics"])
def test_other_paths_are_404_without_traceback(path):
    code, body, _ = _get(_site(), path)
    assert code == 404
    assert b"Traceback" not in body


def test_post_is_405():
    assert _get(_site(), b"/metrics", method=b"POST")[0] == 405


def test_readyz_ready(tmp_path):
    readiness, _ = _readiness(tmp_path)
    assert _get(_site(readiness=readiness), b"/readyz")[:2] == (200, b"ready\n")


def test_readyz_too_little_free_space(tmp_path):
    readiness, _ = _readiness(tmp_path, min_free_space=1 << 62)
    code, body, _ = _get(_site(readiness=readiness), b"/readyz")
    assert code == 503
    lines = body.decode().splitlines()
    assert len(lines) == 1 and "min_free_space" in lines[0]


@pytest.mark.skipif(_os.geteuid() == 0, reason="root writes in read-only directories")
def test_readyz_read_only_directory(tmp_path):
    readiness, config = _readiness(tmp_path)
    _os.chmod(config.mail_dir, 0o500)
    try:
        code, body, _ = _get(_site(readiness=readiness), b"/readyz")
    finally:
        _os.chmod(config.mail_dir, 0o700)
    assert code == 503
    assert str(config.mail_dir) in body.decode()


def test_readyz_read_only_file_system(tmp_path, monkeypatch):
    """The write test failing (EROFS, as on a read-only mount; works as root too) is one problem line."""
    readiness, config = _readiness(tmp_path)
    real_open = _os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(config.mail_dir)) and flags & (_os.O_WRONLY | _os.O_RDWR):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(_os, "open", read_only)
    code, body, _ = _get(_site(readiness=readiness), b"/readyz")
    assert code == 503
    assert body.decode().count("\n") == 1 and "Read-only file system" in body.decode()


def test_readyz_unbound_listener(tmp_path):
    readiness, _ = _readiness(tmp_path, listener_problems=lambda: ["listener relay: not listening"])
    assert _get(_site(readiness=readiness), b"/readyz")[:2] == (503, b"listener relay: not listening\n")


def test_server_listener_problems_sees_an_unbound_port():
    listener = _NS(name="relay", endpoint="tcp:25")
    parts = _NS(config=_NS(listeners=[listener], smtp_workers=0), listening={"relay": [_NS(port=None)]})
    assert len(ops_http.server_listener_problems(parts)) == 1
    parts.listening["relay"][0].port = object()
    assert ops_http.server_listener_problems(parts) == []
