"""The `http` listener of a real twistd mailgw: /metrics counts what SMTP
clients did (exact deltas), promtool accepts the text, /healthz and /readyz
answer 200."""
from __future__ import annotations

import base64
import os
import shutil
import smtplib
import subprocess
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.e2e

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
LISTENERS = (("relay", "relay"), ("submission", "submission"), ("http", "http"))
# Issue 17's names: every one shown with HELP and TYPE from the first scrape on.
REQUIRED = ("mailgw_connections_total", "mailgw_connections_open", "mailgw_replies_total",
            "mailgw_messages_accepted_total", "mailgw_messages_refused_total", "mailgw_logins_total",
            "mailgw_deliveries_total", "mailgw_queue_messages", "mailgw_queue_oldest_age_seconds",
            "mailgw_tls_handshakes_total", "mailgw_rspamd_scan_seconds", "mailgw_dns_query_seconds",
            "mailgw_worker_restarts_total")


def fetch(server, path: str) -> tuple[int, bytes, str]:
    url = f"http://127.0.0.1:{server.ports['http']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read(), answer.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("content-type", "")


def scrape(server) -> dict[tuple, float]:
    """{(name, frozenset(labels)): value} of every mailgw_ sample."""
    from prometheus_client.parser import text_string_to_metric_families
    status, body, content_type = fetch(server, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.startswith("mailgw_"):
                found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(value for (n, series), value in samples.items() if n == name and want <= series)


def test_metrics_count_smtp_traffic(make_server):
    server = make_server(listeners=LISTENERS).start()
    build = server.build_message

    assert fetch(server, "/healthz")[:2] == (200, b"ok\n")
    assert fetch(server, "/readyz")[:2] == (200, b"ready\n")
    assert fetch(server, "/nothing-here")[0] == 404

    before = scrape(server)

    # Two messages to alice on port 25, and one recipient refused.
    with server.smtp("relay") as client:
        client.ehlo()
        for n in range(2):
            server.send(client, "sender@elsewhere.test", ["alice@example.test"], build(f"metrics-{n}"))
        code, _ = client.mail("sender@elsewhere.test")
        assert code == 250
        code, reply = client.rcpt("nobody-here@example.test")
        assert code == 550, (code, reply)
        client.rset()

    # One wrong password on the submission port, after STARTTLS.
    with server.smtp("submission") as client:
        client.ehlo()
        client.starttls(context=server.tls_client_context())
        client.ehlo()
        credentials = base64.b64encode(b"\0alice@example.test\0wrong password").decode()
        code, reply = client.docmd("AUTH", f"PLAIN {credentials}")
        assert code == 535, (code, reply)

    after = scrape(server)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("mailgw_messages_accepted_total", listener="relay") == 2
    assert delta("mailgw_messages_accepted_total") == 2
    assert delta("mailgw_messages_refused_total", listener="relay") == 1
    assert delta("mailgw_messages_refused_total") == 1
    assert delta("mailgw_logins_total", result="failure") == 1
    assert delta("mailgw_logins_total", result="success") == 0
    assert delta("mailgw_connections_total", listener="relay") == 1
    assert delta("mailgw_connections_total", listener="submission") == 1
    assert delta("mailgw_tls_handshakes_total") == 1
    # Both sessions are over (the server may take a moment to see the close).
    assert total(after, "mailgw_connections_open", listener="submission") in (0, 1)
    # The two messages went to a local mailbox: nothing waits in the relay queue.
    assert ("mailgw_queue_messages", frozenset()) in after

    status, body, _ = fetch(server, "/metrics")
    missing = [name for name in REQUIRED if f"# HELP {name} ".encode() not in body]
    assert not missing, missing
    if PROMTOOL is not None:
        checked = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert checked.returncode == 0 and not checked.stdout and not checked.stderr, checked
    assert fetch(server, "/readyz")[:2] == (200, b"ready\n")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promtool_accepts_a_fresh_server(make_server):
    server = make_server(listeners=LISTENERS).start()
    status, body, _ = fetch(server, "/metrics")
    assert status == 200
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout and not checked.stderr, checked


def test_readyz_reports_too_little_free_space(make_server):
    server = make_server(listeners=LISTENERS, extra_server=f"min_free_space = {1 << 60}").start()
    status, body, _ = fetch(server, "/readyz")
    assert status == 503
    assert b"min_free_space" in body and b"Traceback" not in body
    assert fetch(server, "/healthz")[:2] == (200, b"ok\n")


def test_smtp_still_works_beside_the_http_listener(make_server):
    server = make_server(listeners=LISTENERS).start()
    with smtplib.SMTP("127.0.0.1", server.ports["relay"], local_hostname=server.CLIENT_NAME,
                      timeout=server.CLIENT_TIMEOUT) as client:
        client.ehlo()
        server.send(client, "sender@elsewhere.test", ["alice@example.test"], server.build_message("beside"))
