"""`mailgw queue ...` on a real spool: offline (no server: the files, under the
server lock) and online (a fake server process holding the lock and serving
the control socket with a fake runner).

Time is a parameter (queue_main's clock), so ages and waits are exact.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailgw import cli
from mailgw.durable import DurableWriter
from mailgw.queue import admin, control
from mailgw.queue.admin import queue_main
from mailgw.queue.envelope import Envelope
from mailgw.queue.spool import Spool, new_queue_id
from threadless import ImmediatePool, ThreadlessClock

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
MESSAGE = (b"Received: from c.test (c.test [10.0.0.1])\r\n\tby mx.example.test; Thu, 1 Jan 2027 00:00:00 +0000\r\n"
           b"From: Alice <alice@example.test>\r\nSubject: quarterly report\r\nX-Evil: \x1b[31mred\r\n"
           b"\r\nTHE SECRET BODY\r\n")
WAIT = 30.0   # seconds: upper bound for every wait on the fake server


@pytest.fixture
def short_dir():
    # The control socket lives in data_dir; AF_UNIX paths are limited to ~107
    # octets, which pytest's tmp_path can exceed.
    path = Path(tempfile.mkdtemp(prefix="mgw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Rig:
    def __init__(self, root: Path, monkeypatch):
        self.data_dir = root / "data"
        self.queue_dir = self.data_dir / "queue"
        self.active = self.queue_dir / "active"
        self.config_path = root / "mailgw.toml"
        self.config_path.write_text(f'[server]\nhostname = "mx.example.test"\ndata_dir = "{self.data_dir}"\n')
        monkeypatch.setenv("MAILGW_CONFIG", str(self.config_path))
        self.clock = ThreadlessClock()
        self.spool = None

    def enqueue(self, *, age, sender="alice@example.test", recipients=None, message=MESSAGE, **fields):
        if self.spool is None:
            writer = DurableWriter(reactor=self.clock, threadpool=ImmediatePool())
            self.spool = Spool(self.queue_dir, writer=writer, reactor=self.clock)
        arrival = NOW - age
        queue_id = new_queue_id(arrival)
        envelope = {
            "version": 1, "id": queue_id, "arrival": arrival, "sender": sender, "sender_utf8": False,
            "body": "7BIT", "size": len(message), "envid": None, "ret": None,
            "client": {"ip": "10.0.0.1", "helo": "c.test", "tls": True, "auth": None, "listener": "relay"},
            "recipients": recipients or [{"address": "bob@remote.test", "orcpt": None, "notify": None,
                                          "state": "pending", "attempts": 0, "last_reply": None}],
            "attempts": 0, "next_attempt": arrival, "history": [], **fields,
        }
        results = []
        self.spool.enqueue(queue_id, Envelope.from_json(envelope), message).addBoth(results.append)
        assert results == [queue_id]
        return queue_id

    def envelope(self, queue_id):
        """The JSON on disk, checked to be what the server reads."""
        data = (self.active / f"{queue_id}.env").read_bytes()
        Envelope.decode(data, queue_id)
        return json.loads(data)

    def typical(self):
        """Two messages: one deferred with history, one held bounce notice."""
        a = self.enqueue(
            age=300, attempts=2, next_attempt=NOW + 1500,
            recipients=[
                {"address": "bob@remote.test", "orcpt": "rfc822;bob@remote.test", "notify": ["FAILURE", "DELAY"],
                 "state": "pending", "attempts": 2, "last_reply": "smtp; 451 4.3.0 try again later"},
                {"address": "carol@other.test", "orcpt": None, "notify": None, "state": "sent", "attempts": 1,
                 "last_reply": "smtp; 250 2.0.0 Ok"}],
            history=[{"time": NOW - 300, "results": [
                {"address": "bob@remote.test", "relay": "mx.remote.test[192.0.2.1]:25", "status": "deferred",
                 "dsn": "4.3.0", "reply": "smtp; 451 4.3.0 try again later"},
                {"address": "carol@other.test", "relay": "mx.other.test[192.0.2.2]:25", "status": "sent",
                 "dsn": "2.0.0", "reply": "smtp; 250 2.0.0 Ok"}]}])
        b = self.enqueue(age=3 * 3600 + 59, sender="", hold=True, attempts=1,
                         recipients=[{"address": "dave@far.test", "orcpt": None, "notify": ["NEVER"],
                                      "state": "pending", "attempts": 1,
                                      "last_reply": "smtp; 421 4.4.2 \x1b]0;pwned\x07 timeout"}])
        return b, a   # oldest first


@pytest.fixture
def rig(short_dir, monkeypatch):
    return Rig(short_dir, monkeypatch)


def run(capsys, *argv):
    code = queue_main(list(argv), clock=lambda: NOW)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# -- offline: list ----------------------------------------------------------------------

def test_list_text(rig, capsys):
    held, deferred = rig.typical()
    code, out, err = run(capsys, "list")
    assert (code, err) == (0, "")
    size = len(MESSAGE)
    assert out == (
        "QUEUE ID           AGE       SIZE  SENDER / RECIPIENTS\n"
        f"{held}    3h        {size}  <>  (held, 1 attempt)\n"
        "    dave@far.test  pending, 1 attempt, last error: smtp; 421 4.4.2 \\x1b]0;pwned\\x07 timeout\n"
        f"{deferred}    5m        {size}  <alice@example.test>  (next in 25m, 2 attempts)\n"
        "    bob@remote.test  pending, 2 attempts, last error: smtp; 451 4.3.0 try again later\n"
        "    carol@other.test  sent, 1 attempt\n"
        f"-- 2 messages, {2 * size} octets, 1 held\n")


def test_stats_offline_counts_the_spool(rig, capsys):
    rig.typical()
    assert run(capsys, "stats") == (
        0, "queue: 2 messages, 1 held\nmailgw is not running: no deliveries in progress, no counts\n", "")
    assert json.loads(run(capsys, "stats", "--json")[1]) == {"messages": 2, "held": 1}


def test_list_json(rig, capsys):
    held, deferred = rig.typical()
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    envelopes = json.loads(out)
    assert [e["id"] for e in envelopes] == [held, deferred]
    assert envelopes[0] == dict(rig.envelope(held), in_flight=False)
    assert envelopes[1] == dict(rig.envelope(deferred), in_flight=False)
    out.encode("ascii")


def test_list_of_an_empty_queue(rig, capsys):
    assert run(capsys, "list") == (0, "mail queue is empty\n", "")
    assert not rig.data_dir.exists()          # a CLI never creates the spool
    assert run(capsys, "list", "--json") == (0, "[]\n", "")


def test_list_skips_an_unreadable_entry_with_a_warning(rig, capsys):
    held, deferred = rig.typical()
    (rig.active / f"{held}.env").write_bytes(b"{not json")
    code, out, err = run(capsys, "list")
    assert code == 0
    assert deferred in out and held not in out
    assert err.startswith(f"mailgw queue: warning: {held}: unreadable entry")
    assert (rig.active / f"{held}.env").exists()   # moving it aside is recovery's job


def test_the_main_command_dispatches_to_queue(rig, capsys):
    rig.typical()
    assert cli.main(["queue", "list"]) == 0
    assert "QUEUE ID" in capsys.readouterr().out


# -- offline: show ------------------------------------------------------------------------

def test_show_prints_envelope_history_and_headers_but_never_the_body(rig, capsys):
    _, deferred = rig.typical()
    code, out, err = run(capsys, "show", deferred)
    assert (code, err) == (0, "")
    assert f"Queue ID:    {deferred}\n" in out
    assert "Arrival:     2027-01-15 07:55:00 UTC (5m ago)\n" in out
    assert "Sender:      <alice@example.test>\n" in out
    assert "Attempts:    2, next 2027-01-15 08:25:00 UTC (in 25m)\n" in out
    assert "  bob@remote.test: pending, 2 attempts\n    notify FAILURE,DELAY, orcpt rfc822;bob@remote.test\n" in out
    assert "    last reply: smtp; 451 4.3.0 try again later\n" in out
    assert ("History:\n  2027-01-15 07:55:00 UTC\n"
            "    bob@remote.test: deferred via mx.remote.test[192.0.2.1]:25, 4.3.0, smtp; 451 4.3.0 try again later\n"
            in out)
    assert (f"Headers ({deferred}.msg, first 50 header lines, no body):\n"
            "  Received: from c.test (c.test [10.0.0.1])\n"
            "          by mx.example.test; Thu, 1 Jan 2027 00:00:00 +0000\n"
            "  From: Alice <alice@example.test>\n"
            "  Subject: quarterly report\n"
            "  X-Evil: \\x1b[31mred\n") in out
    assert out.endswith("X-Evil: \\x1b[31mred\n")
    assert "SECRET" not in out
    assert "\x1b" not in out


def test_show_stops_after_fifty_header_lines(rig, capsys):
    message = b"".join(b"X-Line-%d: v\r\n" % n for n in range(60)) + b"\r\nbody\r\n"
    queue_id = rig.enqueue(age=10, message=message)
    code, out, _ = run(capsys, "show", queue_id)
    assert code == 0
    assert "  X-Line-49: v\n" in out and "X-Line-50" not in out
    assert out.endswith("  ... (more header lines not shown)\n")


def test_show_json(rig, capsys):
    held, _ = rig.typical()
    code, out, _ = run(capsys, "show", "--json", held.lower())   # a lower-case paste is fine
    assert code == 0
    shown = json.loads(out)
    assert shown["envelope"] == dict(rig.envelope(held), in_flight=False)
    assert shown["headers"][3] == "Subject: quarterly report"
    assert shown["more_headers"] is False


# -- offline: actions -----------------------------------------------------------------------

def assert_spool_clean(rig):
    assert list((rig.queue_dir / "incoming").iterdir()) == []
    for path in rig.active.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # What the server will find at its next start: every entry valid, nothing corrupt.
    recovered = Spool(rig.queue_dir, writer=None, reactor=rig.clock).recover()
    assert list((rig.queue_dir / "corrupt").iterdir()) == []
    return {e.id: e.to_json() for e in recovered}


def test_hold_and_release_rewrite_the_envelope(rig, capsys):
    _, deferred = rig.typical()
    before = rig.envelope(deferred)
    code, out, _ = run(capsys, "hold", deferred)
    assert code == 0
    assert out == f"{deferred}: held; it will not be tried until `mailgw queue release {deferred}`\n"
    held = rig.envelope(deferred)
    assert held == dict(before, hold=True)
    assert assert_spool_clean(rig)[deferred] == held

    code, out, _ = run(capsys, "release", deferred)
    assert code == 0
    assert out == f"{deferred}: released; mailgw is not running, it tries the message as soon as it starts\n"
    assert rig.envelope(deferred) == dict(before, hold=False, next_attempt=0)
    assert_spool_clean(rig)


def test_delete_removes_both_files(rig, capsys):
    held, deferred = rig.typical()
    code, out, _ = run(capsys, "delete", held)
    assert (code, out) == (0, f"{held}: deleted (the sender was not notified)\n")
    assert sorted(p.name for p in rig.active.iterdir()) == [f"{deferred}.env", f"{deferred}.msg"]
    assert run(capsys, "delete", held)[0] == 1


def test_flush_all_sets_next_attempt_to_zero_except_held(rig, capsys):
    held, deferred = rig.typical()
    code, out, _ = run(capsys, "flush")
    assert (code, out) == (0, "flushed 1 message: mailgw is not running; it tries them as soon as it starts\n")
    assert rig.envelope(deferred)["next_attempt"] == 0
    assert rig.envelope(held)["next_attempt"] == NOW - (3 * 3600 + 59)   # held stays held
    assert_spool_clean(rig)


def test_flush_some(rig, capsys):
    held, deferred = rig.typical()
    code, out, _ = run(capsys, "flush", held, deferred)
    assert code == 0
    assert out == (f"{held}: held, not flushed (release it with `mailgw queue release {held}`)\n"
                   "flushed 1 message: mailgw is not running; it tries them as soon as it starts\n")
    assert rig.envelope(deferred)["next_attempt"] == 0


def test_flush_with_an_unknown_id_changes_nothing(rig, capsys):
    _, deferred = rig.typical()
    unknown = new_queue_id(NOW)
    code, out, err = run(capsys, "flush", deferred, unknown)
    assert (code, out, err) == (1, "", f"mailgw queue: no such message: {unknown}\n")
    assert rig.envelope(deferred)["next_attempt"] == NOW + 1500


def test_bounce_is_requested_for_the_next_start(rig, capsys):
    _, deferred = rig.typical()
    code, out, _ = run(capsys, "bounce", deferred)
    assert code == 0
    assert "bounce requested" in out and "when it next starts" in out
    assert rig.envelope(deferred)["bounce_requested"] is True
    assert_spool_clean(rig)


@pytest.mark.parametrize("command", ["show", "hold", "release", "delete", "bounce", "flush"])
def test_unknown_id_is_an_error(rig, capsys, command):
    rig.typical()
    unknown = new_queue_id(NOW)
    assert run(capsys, command, unknown) == (1, "", f"mailgw queue: no such message: {unknown}\n")


@pytest.mark.parametrize("command", ["show", "hold", "delete"])
def test_malformed_id_is_an_error(rig, capsys, command):
    rig.typical()
    code, out, err = run(capsys, command, "../../etc/passwd")
    assert (code, out) == (1, "")
    assert err == "mailgw queue: not a queue id: '../../etc/passwd' (16 characters of 0-9 and A-Z)\n"


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["hold"], ["hold", "A", "B"], ["list", "extra"],
                                  ["show"], ["delete", "--force", "X"]])
def test_usage_errors(rig, capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "usage: mailgw queue" in err


def test_help(rig, capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: mailgw queue list")


def test_a_bad_config_is_one_clear_error(rig, capsys):
    rig.config_path.write_text("[server]\nno_such_key = 1\n")
    code, out, err = run(capsys, "list")
    assert code == 1 and err.startswith("mailgw queue: configuration error:")


def test_the_config_option_wins_over_the_environment(rig, capsys, short_dir, monkeypatch):
    rig.typical()
    monkeypatch.setenv("MAILGW_CONFIG", str(short_dir / "nonexistent.toml"))
    assert run(capsys, "list", "--config", str(rig.config_path))[0] == 0


def test_the_lock_is_released_after_an_offline_command(rig, capsys):
    _, deferred = rig.typical()
    run(capsys, "hold", deferred)
    control.acquire_server_lock(rig.queue_dir, wait=0).close()   # a server could start now


def test_locked_but_nobody_answering_gives_up_with_a_clear_error(rig, capsys, monkeypatch):
    rig.typical()
    monkeypatch.setattr(admin, "_LOCK_WAIT", 0.3)
    lock = control.acquire_server_lock(rig.queue_dir, wait=0)   # a server starting: no socket yet
    try:
        code, out, err = run(capsys, "list")
    finally:
        lock.close()
    assert (code, out) == (1, "")
    assert "is locked but nothing answers on" in err and err.count("\n") == 1


# -- online: a fake server process holding the lock and serving the socket -----------------------

FAKE_SERVER = r"""
import json, sys
from pathlib import Path
from twisted.internet import defer, reactor
from mailgw.queue.control import acquire_server_lock, control_service
from mailgw.queue.envelope import Envelope

queue_dir, socket_path = Path(sys.argv[1]), sys.argv[2]
lock = acquire_server_lock(queue_dir, wait=0)


class Runner:
    # In memory only: it never writes the spool, so the test can tell the
    # CLI asked the server rather than editing the files itself.
    def __init__(self):
        self.envelopes = {p.stem: json.loads(p.read_text()) for p in (queue_dir / "active").glob("*.env")}
        self.slow = set(i for i, e in self.envelopes.items() if e.get("envid") == "slow")

    def snapshot(self):
        return [(Envelope.from_json(self.envelopes[i]), i in self.slow) for i in sorted(self.envelopes)]

    def stats(self):
        return {"messages": len(self.envelopes), "held": 1, "in_flight": 0, "deliveries_active": 2,
                "deliveries_waiting": 5, "idle_connections": 3, "since": 1_800_000_000 - 7200,
                "counters": {"deferred": 4, "sent": 10}}

    def flush(self, ids=None):
        chosen = sorted(self.envelopes) if ids is None else ids
        return [i for i in chosen if not self.envelopes[i].get("hold")]

    def _later(self, queue_id, change):
        if queue_id not in self.envelopes:
            raise KeyError(queue_id)
        d = defer.Deferred()
        def apply():
            change(self.envelopes)
            d.callback(queue_id)
        reactor.callLater(1.0 if queue_id in self.slow else 0, apply)
        return d

    def hold(self, queue_id):
        return self._later(queue_id, lambda e: e[queue_id].update(hold=True))

    def release(self, queue_id):
        return self._later(queue_id, lambda e: e[queue_id].update(hold=False))

    def delete(self, queue_id):
        return self._later(queue_id, lambda e: e.pop(queue_id))

    def bounce(self, queue_id):
        return self._later(queue_id, lambda e: e.pop(queue_id))


service = control_service(reactor, socket_path, Runner())
service.startService()
reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
reactor.callWhenRunning(lambda: print("ready", flush=True))
reactor.run()
"""


@pytest.fixture
def server(rig):
    """Start the fake server on rig's spool; yields a function returning its process."""
    procs = []

    def start():
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-c", FAKE_SERVER, str(rig.queue_dir), str(control.socket_path(rig.data_dir))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        line = proc.stdout.readline() if ready else b""
        if line != b"ready\n":
            proc.kill()
            raise AssertionError(f"fake server did not start: {line!r} {proc.stderr.read()!r}")
        return proc

    yield start
    for proc in procs:          # only the processes this fixture started
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=WAIT)
        proc.stdout.close()
        proc.stderr.close()


def stop(proc):
    proc.terminate()
    assert proc.wait(timeout=WAIT) is not None


def test_online_list_show_and_actions_go_through_the_server(rig, server, capsys):
    held, deferred = rig.typical()
    on_disk = {p.name: p.read_bytes() for p in rig.active.iterdir()}
    proc = server()
    sock = control.socket_path(rig.data_dir)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with pytest.raises(SystemExit):
        control.acquire_server_lock(rig.queue_dir, wait=0)   # no second server

    code, out, _ = run(capsys, "list")
    assert code == 0
    assert f"{held}    3h" in out and f"{deferred}    5m" in out

    code, out, _ = run(capsys, "list", "--json")
    assert [(e["id"], e["in_flight"]) for e in json.loads(out)] == [(held, False), (deferred, False)]

    code, out, _ = run(capsys, "show", deferred)
    assert code == 0 and "  Subject: quarterly report\n" in out and "SECRET" not in out

    assert run(capsys, "hold", deferred) == (
        0, f"{deferred}: held; it will not be tried until `mailgw queue release {deferred}`\n", "")
    assert [e["hold"] for e in json.loads(run(capsys, "list", "--json")[1]) if e["id"] == deferred] == [True]
    assert run(capsys, "release", deferred)[1] == f"{deferred}: released; trying it now\n"
    assert run(capsys, "flush")[1] == "flushed 1 message: trying now\n"
    assert run(capsys, "flush", held)[1] == (
        f"{held}: held, not flushed (release it with `mailgw queue release {held}`)\n"
        "flushed 0 messages\n")
    code, out, _ = run(capsys, "bounce", held)
    assert code == 0 and out.startswith(f"{held}: bounced: given up")
    unknown = new_queue_id(NOW)
    assert run(capsys, "hold", unknown) == (1, "", f"mailgw queue: no such message: {unknown}\n")
    assert run(capsys, "flush", deferred, unknown) == (1, "", f"mailgw queue: no such message: {unknown}\n")
    assert run(capsys, "delete", deferred) == (0, f"{deferred}: deleted (the sender was not notified)\n", "")
    assert run(capsys, "list") == (0, "mail queue is empty\n", "")

    # The CLI never touched the files: the (fake) server owns them while it runs.
    assert {p.name: p.read_bytes() for p in rig.active.iterdir()} == on_disk

    stop(proc)
    assert not sock.exists()                              # removed at stop
    assert "QUEUE ID" in run(capsys, "list")[1]          # offline again: the files


def test_online_waiting_for_a_delivery_in_flight_says_so(rig, server, capsys, monkeypatch):
    queue_id = rig.enqueue(age=60, envid="slow")          # the fake runner answers after 1 s
    server()
    monkeypatch.setattr(admin, "_SLOW_NOTICE", 0.2)
    code, out, err = run(capsys, "hold", queue_id)
    assert code == 0 and out.startswith(f"{queue_id}: held")
    assert err == (f"mailgw queue: {queue_id} has a delivery attempt in progress; "
                   "waiting for it to finish...\n")
    assert json.loads(run(capsys, "list", "--json")[1])[0]["in_flight"] is True


def test_a_stale_socket_left_by_a_dead_server_is_not_trusted(rig, capsys):
    rig.typical()
    sock = control.socket_path(rig.data_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()                                             # nobody listens; no lock held
    code, out, _ = run(capsys, "list")
    assert code == 0 and "QUEUE ID" in out                # offline: the lock decides, not the socket


def test_online_stats_come_from_the_server(rig, server, capsys):
    rig.typical()
    server()
    code, out, err = run(capsys, "stats")
    assert (code, err) == (0, "")
    assert out == ("queue: 2 messages, 1 held\n"
                   "deliveries: 2 in progress, 5 waiting for a slot; 0 messages being tried; "
                   "3 idle connections kept for reuse\n"
                   "since mailgw started (for 2h): deferred 4, sent 10\n")
    assert json.loads(run(capsys, "stats", "--json")[1])["counters"] == {"deferred": 4, "sent": 10}
