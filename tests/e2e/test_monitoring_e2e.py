"""End to end: the `http` listener of a real `twistd mailgw`, scraped with a
real HTTP client (urllib) before and after known traffic, in one process
and with `smtp_workers = 2`; the deltas must be exact (nothing lost,
nothing counted twice by the merge of the workers' reports), promtool
must accept the text, /readyz must say ready.

The traffic: 3 messages to alice over SMTP (port 25, one connection),
1 refused recipient, 1 failed AUTH on the submission port after STARTTLS,
a POP3S login and an IMAPS login. With workers, a worker is then killed
(-9): its counts stay, it is started again, and the next message counts
once. Every wait is bounded (wait_until, socket timeouts).
"""
from __future__ import annotations

import base64
import imaplib
import os
import poplib
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until

pytestmark = pytest.mark.e2e

PROMTOOL = "/usr/bin/promtool"
ALICE, PASSWORD = "alice@example.test", "secret"
LISTENERS = (("relay", "relay"), ("submission", "submission"), ("pop3s", "pop3s"), ("imaps", "imaps"),
             ("http", "http"))


def fetch(server, path: str) -> tuple[int, bytes, str]:
    url = f"http://127.0.0.1:{server.ports['http']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=15) as answer:
            return answer.status, answer.read(), answer.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("content-type", "")


class Scrape:
    def __init__(self, server):
        status, self.text, content_type = fetch(server, "/metrics")
        assert status == 200, self.text
        assert content_type.startswith("text/plain"), content_type
        self.samples: dict[tuple, float] = {}
        for family in text_string_to_metric_families(self.text.decode("utf-8")):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def total(self, name: str, **labels) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(value for (found, series), value in self.samples.items() if found == name and want <= series)

    def has(self, name: str) -> bool:
        return any(found == name for found, _ in self.samples)


def delta(before: Scrape, after: Scrape, name: str, **labels) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


def all_closed(server) -> Scrape:
    """A scrape once the server has seen every client connection end."""
    return wait_until(lambda: (lambda s: s if s.total("mailgw_connections_open") == 0 else None)(Scrape(server)),
                      "every connection closed in mailgw_connections_open", within=10)


def smtp_traffic(server) -> None:
    build = server.build_message
    with server.smtp("relay") as client:
        client.ehlo()
        for n in range(3):
            server.send(client, "sender@elsewhere.test", [ALICE], build(f"monitoring-{n}"))
        assert client.mail("sender@elsewhere.test")[0] == 250
        code, reply = client.rcpt("nobody-here@example.test")
        assert code == 550, (code, reply)
        assert client.rset()[0] == 250
    with server.smtp("submission") as client:
        client.ehlo()
        client.starttls(context=server.tls_client_context())
        client.ehlo()
        wrong = base64.b64encode(f"\0{ALICE}\0not the password".encode()).decode()
        code, reply = client.docmd("AUTH", f"PLAIN {wrong}")
        assert code == 535, (code, reply)


def mailbox_logins(server) -> None:
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], timeout=server.CLIENT_TIMEOUT,
                          context=server.tls_client_context())
    try:
        pop.user(ALICE)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
    finally:
        pop.quit()
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls_client_context(),
                             timeout=server.CLIENT_TIMEOUT)
    try:
        assert imap.login(ALICE, PASSWORD)[0] == "OK"
    finally:
        imap.logout()


def check_traffic_deltas(before: Scrape, after: Scrape) -> None:
    d = lambda name, **labels: delta(before, after, name, **labels)   # noqa: E731
    assert d("mailgw_messages_accepted_total", listener="relay") == 3
    assert d("mailgw_messages_accepted_total") == 3
    assert d("mailgw_messages_refused_total", listener="relay", stage="rcpt", reason="unknown_user") == 1
    assert d("mailgw_messages_refused_total") == 1
    assert d("mailgw_logins_total", result="failure") == 1
    assert d("mailgw_logins_total", result="success") == 2
    assert d("mailgw_logins_total", result="lockout") == 0
    for listener, protocol in (("relay", "smtp"), ("submission", "smtp"), ("pop3s", "pop3"), ("imaps", "imap")):
        assert d("mailgw_connections_total", listener=listener, protocol=protocol) == 1, listener
    assert d("mailgw_connections_total") == 4
    assert d("mailgw_commands_total", protocol="smtp", command="MAIL") == 4
    assert d("mailgw_commands_total", protocol="smtp", command="RCPT") == 4
    assert d("mailgw_commands_total", protocol="smtp", command="DATA") == 3
    assert d("mailgw_commands_total", protocol="smtp", command="STARTTLS") == 1
    assert d("mailgw_commands_total", protocol="smtp", command="AUTH") == 1
    assert d("mailgw_commands_total", protocol="pop3", command="PASS") == 1
    assert d("mailgw_commands_total", protocol="imap", command="LOGIN") == 1
    assert d("mailgw_replies_total", protocol="smtp", **{"class": "5xx"}) == 2       # the 550 and the 535
    assert d("mailgw_replies_total", protocol="smtp", **{"class": "3xx"}) == 3       # the 354s
    assert d("mailgw_replies_total", protocol="imap", **{"class": "NO"}) == 0
    assert d("mailgw_tls_handshakes_total") == 3                                     # STARTTLS, POP3S, IMAPS
    assert d("mailgw_tls_handshakes_total", listener="submission", protocol="smtp") == 1
    assert d("mailgw_tls_handshake_failures_total") == 0
    assert after.total("mailgw_connections_open") == 0
    assert after.total("mailgw_queue_messages") == 0


def promtool_accepts(text: bytes) -> None:
    if not os.path.exists(PROMTOOL):
        pytest.skip("promtool (Debian's prometheus package) is not installed at /usr/bin/promtool")
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, b"", b""), checked


# -- the process tree (smtp_workers) ---------------------------------------------------------------

def worker_pids(server) -> set[int]:
    found = set()
    for task in Path(f"/proc/{server.pid}/task").glob("*"):
        try:
            found.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            pass
    live = set()
    for pid in found:
        try:
            if b"mailgw.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                live.add(pid)
        except OSError:
            pass
    return live


def wait_for_workers(server, *, without=frozenset()) -> set[int]:
    def ready():
        pids = worker_pids(server)
        log = server.log_text()
        if len(pids) == 2 and not pids & set(without) and all(f"accepting SMTP (pid {p})" in log for p in pids):
            return pids
        return None
    return wait_until(ready, "2 SMTP workers accepting", within=20)


# -- the tests ----------------------------------------------------------------------------------------

def test_one_process_counts_known_traffic_exactly(make_server):
    server = make_server(listeners=LISTENERS).start()
    assert fetch(server, "/healthz")[:2] == (200, b"ok\n")
    assert fetch(server, "/readyz")[:2] == (200, b"ready\n")
    before = Scrape(server)
    smtp_traffic(server)
    mailbox_logins(server)
    after = all_closed(server)
    check_traffic_deltas(before, after)
    assert after.has("mailgw_store_messages") and after.has("process_cpu_seconds_total")
    # A scrape changes no mail counter by itself.
    again = Scrape(server)
    assert delta(after, again, "mailgw_connections_total") == 0
    assert delta(after, again, "mailgw_commands_total") == 0
    promtool_accepts(again.text)
    assert fetch(server, "/readyz")[:2] == (200, b"ready\n")


def test_with_two_smtp_workers_the_server_counts_once_across_workers_and_a_restart(make_server):
    server = make_server(listeners=LISTENERS, extra_server="smtp_workers = 2").start()
    workers = wait_for_workers(server)
    before = Scrape(server)
    assert before.total("mailgw_workers_running") == 2
    smtp_traffic(server)
    mailbox_logins(server)
    after = all_closed(server)
    check_traffic_deltas(before, after)
    assert delta(before, after, "mailgw_worker_restarts_total") == 0
    promtool_accepts(after.text)
    assert fetch(server, "/readyz")[:2] == (200, b"ready\n")

    # kill -9 one worker: what it reported stays; its successor starts from zero on top of it.
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for_workers(server, without={victim})
    restarted = wait_until(lambda: (lambda s: s if s.total("mailgw_worker_restarts_total") >= 1 else None)(
        Scrape(server)), "the restart counted", within=10)
    assert delta(after, restarted, "mailgw_worker_restarts_total") == 1
    for name in ("mailgw_messages_accepted_total", "mailgw_connections_total", "mailgw_commands_total",
                 "mailgw_replies_total", "mailgw_tls_handshakes_total"):
        assert delta(after, restarted, name) == 0, name            # neither lost nor doubled
    with server.smtp("relay") as client:
        client.ehlo()
        server.send(client, "sender@elsewhere.test", [ALICE], server.build_message("after-the-restart"))
    final = all_closed(server)
    assert delta(restarted, final, "mailgw_messages_accepted_total", listener="relay") == 1
    assert delta(restarted, final, "mailgw_connections_total", listener="relay") == 1
    assert final.total("mailgw_workers_running") == 2
    promtool_accepts(final.text)


def test_readyz_fails_below_min_free_space_and_healthz_still_answers(make_server):
    server = make_server(listeners=LISTENERS, extra_server=f"min_free_space = {1 << 60}").start()
    status, body, _ = fetch(server, "/readyz")
    assert status == 503
    assert body.startswith(b"disk: ") and b"min_free_space" in body and b"Traceback" not in body
    assert fetch(server, "/healthz")[:2] == (200, b"ok\n")
