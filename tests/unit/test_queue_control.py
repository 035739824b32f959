"""The control socket protocol (`mailgw queue` talking to a running server) and the server lock.

Sessions through StringTransport with a fake runner whose Deferreds the test fires:
one JSON line in, one JSON line out, in order, never a traceback.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import Logger

from mailgw.errors import StorageFull
from mailgw.queue import control
from mailgw.queue.control import MAX_REQUEST, ControlFactory, acquire_server_lock, control_service, try_lock
from mailgw.queue.envelope import Envelope

ID1 = "0000000000000001"
ID2 = "0000000000000002"
UNKNOWN = "00000000000000ZZ"


def envelope(queue_id, **extra):
    return {"version": 1, "id": queue_id, "arrival": 1000.0, "sender": "a@example.test", "sender_utf8": False,
            "body": "7BIT", "size": 10, "envid": None, "ret": None,
            "client": {"ip": "10.0.0.1", "helo": None, "tls": False, "auth": None, "listener": "relay"},
            "recipients": [{"address": "b@remote.test", "orcpt": None, "notify": None, "state": "pending",
                            "attempts": 0, "last_reply": None}],
            "attempts": 0, "next_attempt": 1000.0, "history": [], **extra}


class FakeRunner:
    """Records calls; the admin actions return Deferreds the test fires."""

    def __init__(self, *envelopes):
        self.envelopes = {e["id"]: e for e in envelopes}
        self.calls = []
        self.deferreds = []

    def snapshot(self):
        self.calls.append(("snapshot",))
        return [(Envelope.from_json(self.envelopes[i]), False) for i in sorted(self.envelopes)]

    def flush(self, ids=None):
        self.calls.append(("flush", ids))
        chosen = sorted(self.envelopes) if ids is None else ids
        for queue_id in chosen:
            if queue_id not in self.envelopes:
                raise KeyError(queue_id)
        return [i for i in chosen if not self.envelopes[i].get("hold")]

    def _action(self, name, queue_id):
        self.calls.append((name, queue_id))
        if queue_id not in self.envelopes:
            raise KeyError(queue_id)
        d = defer.Deferred()
        self.deferreds.append(d)
        return d

    def stats(self):
        return {"messages": len(self.envelopes), "counters": {"sent": 3}}

    def hold(self, queue_id):
        return self._action("hold", queue_id)

    def release(self, queue_id):
        return self._action("release", queue_id)

    def delete(self, queue_id):
        return self._action("delete", queue_id)

    def bounce(self, queue_id):
        return self._action("bounce", queue_id)


class Client:
    def __init__(self, runner=None):
        self.runner = runner or FakeRunner(envelope(ID1), envelope(ID2, hold=True))
        self.events = []
        self.factory = ControlFactory(self.runner, log=Logger(observer=self.events.append))
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, *requests):
        data = b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in requests)
        self.protocol.dataReceived(data)

    def answers(self):
        """Every answer written since the last call, decoded."""
        data = self.transport.value()
        self.transport.clear()
        assert data == b"" or data.endswith(b"\n")
        lines = data.split(b"\n")[:-1]
        for line in lines:
            assert b"Traceback" not in line
            line.decode("ascii")   # the wire is ASCII JSON
        return [json.loads(line) for line in lines]

    def ask(self, request):
        self.send(request)
        (answer,) = self.answers()
        return answer


# -- the commands ---------------------------------------------------------------------

def test_list_answers_the_runners_snapshot():
    client = Client()
    answer = client.ask({"cmd": "list"})
    assert answer["ok"] is True
    assert [e["id"] for e in answer["result"]] == [ID1, ID2]
    assert answer["result"][0]["in_flight"] is False


def test_stats_answers_the_runners_stats():
    assert Client().ask({"cmd": "stats"}) == {"ok": True, "result": {"messages": 2, "counters": {"sent": 3}}}


def test_show_answers_one_envelope():
    client = Client()
    answer = client.ask({"cmd": "show", "id": ID2})
    assert answer == {"ok": True, "result": dict(envelope(ID2, hold=True), in_flight=False)}


def test_show_of_an_unknown_id_is_no_such_message():
    client = Client()
    assert client.ask({"cmd": "show", "id": UNKNOWN}) == {"ok": False, "error": f"no such message: {UNKNOWN}"}


@pytest.mark.parametrize("bad", ["../../etc/passwd", "short", 42, None, "0000000000000001.env", "000000000000000i"])
def test_malformed_ids_are_refused_before_the_runner_sees_them(bad):
    client = Client()
    for command in ("show", "hold", "release", "delete", "bounce"):
        answer = client.ask({"cmd": command, "id": bad})
        assert answer["ok"] is False
        assert answer["error"].startswith("bad request: not a queue id")
    answer = client.ask({"cmd": "flush", "ids": [ID1, bad]})
    assert answer["ok"] is False and "not a queue id" in answer["error"]
    assert [c for c in client.runner.calls if c[0] != "snapshot"] == []


def test_flush_all():
    client = Client()
    assert client.ask({"cmd": "flush", "ids": None}) == {"ok": True, "result": [ID1]}
    assert ("flush", None) in client.runner.calls


def test_flush_some_skips_held_ones():
    client = Client()
    assert client.ask({"cmd": "flush", "ids": [ID1, ID2, ID1]}) == {"ok": True, "result": [ID1]}
    assert ("flush", [ID1, ID2]) in client.runner.calls


def test_flush_with_an_unknown_id_changes_nothing():
    client = Client()
    assert client.ask({"cmd": "flush", "ids": [ID1, UNKNOWN]}) == {"ok": False,
                                                                   "error": f"no such message: {UNKNOWN}"}
    assert not [c for c in client.runner.calls if c[0] == "flush"]


def test_flush_ids_must_be_a_list():
    client = Client()
    answer = client.ask({"cmd": "flush", "ids": ID1})
    assert answer == {"ok": False, "error": "bad request: ids must be a list of queue ids or null"}


@pytest.mark.parametrize("command", ["hold", "release", "delete", "bounce"])
def test_actions_answer_when_the_runner_is_done(command):
    client = Client()
    client.send({"cmd": command, "id": ID1})
    assert client.runner.calls == [(command, ID1)]
    assert client.answers() == []           # the runner has not finished yet
    client.runner.deferreds[0].callback(ID1 if command != "delete" else None)
    assert client.answers() == [{"ok": True, "result": ID1}]


@pytest.mark.parametrize("command", ["hold", "release", "delete", "bounce"])
def test_actions_on_an_unknown_id_are_no_such_message(command):
    client = Client()
    assert client.ask({"cmd": command, "id": UNKNOWN}) == {"ok": False, "error": f"no such message: {UNKNOWN}"}


def test_a_message_gone_while_waiting_is_no_such_message():
    client = Client()
    client.send({"cmd": "hold", "id": ID1})
    client.runner.deferreds[0].errback(KeyError(ID1))   # delivered while the attempt was in flight
    assert client.answers() == [{"ok": False, "error": f"no such message: {ID1}"}]


def test_a_full_disk_is_reported_plainly():
    client = Client()
    client.send({"cmd": "release", "id": ID1})
    client.runner.deferreds[0].errback(StorageFull())
    assert client.answers() == [{"ok": False,
                                 "error": "the spool could not be updated: Insufficient system storage"}]


def test_an_unexpected_failure_is_logged_and_answered_without_details():
    client = Client()
    client.send({"cmd": "bounce", "id": ID1})
    client.runner.deferreds[0].errback(RuntimeError("secret internals /var/lib/x"))
    assert client.answers() == [{"ok": False, "error": "internal error (see the server log)"}]
    assert any(e.get("log_failure") is not None and e["log_failure"].check(RuntimeError) for e in client.events)


# -- malformed input ---------------------------------------------------------------------

@pytest.mark.parametrize("line, error", [
    (b"not json\n", "bad request: not UTF-8 JSON"),
    (b"{\"cmd\": \"list\"\n", "bad request: not UTF-8 JSON"),
    (b"\xff\xfe\n", "bad request: not UTF-8 JSON"),
    (b"[1, 2]\n", "bad request: not a JSON object"),
    (b"\"list\"\n", "bad request: not a JSON object"),
    (b"{}\n", "unknown command: None"),
    (b"{\"cmd\": \"rm -rf\"}\n", "unknown command: 'rm -rf'"),
    (b"{\"cmd\": [\"list\"]}\n", "unknown command: ['list']"),
])
def test_bad_requests_get_an_error_and_the_connection_stays_usable(line, error):
    client = Client()
    client.send(line)
    assert client.answers() == [{"ok": False, "error": error}]
    assert client.ask({"cmd": "list"})["ok"] is True
    assert not client.transport.disconnecting


def test_crlf_line_ends_are_accepted():
    client = Client()
    client.send(b'{"cmd": "list"}\r\n')
    assert client.answers()[0]["ok"] is True


def test_requests_are_answered_in_order_while_an_earlier_one_waits():
    client = Client()
    client.send({"cmd": "hold", "id": ID1}, {"cmd": "list"}, {"cmd": "show", "id": UNKNOWN})
    # The list is not even computed before the hold is done: it must see its effect.
    assert client.runner.calls == [("hold", ID1)]
    assert client.answers() == []
    client.runner.envelopes[ID1]["hold"] = True
    client.runner.deferreds[0].callback(ID1)
    hold, listing, show = client.answers()
    assert hold == {"ok": True, "result": ID1}
    assert listing["ok"] is True and listing["result"][0]["hold"] is True
    assert show == {"ok": False, "error": f"no such message: {UNKNOWN}"}


def test_two_pending_actions_answer_in_request_order():
    client = Client()
    client.send({"cmd": "hold", "id": ID1}, {"cmd": "release", "id": ID2})
    assert client.runner.calls == [("hold", ID1)]     # one at a time
    client.runner.deferreds[0].callback(ID1)
    assert client.answers() == [{"ok": True, "result": ID1}]
    assert client.runner.calls == [("hold", ID1), ("release", ID2)]
    client.runner.deferreds[1].callback(ID2)
    assert client.answers() == [{"ok": True, "result": ID2}]


def test_a_request_at_the_maximum_length_is_read():
    client = Client()
    request = b'{"cmd": "list", "pad": "' + b"x" * (MAX_REQUEST - 26) + b'"}'
    assert len(request) == MAX_REQUEST
    client.send(request + b"\n")
    assert client.answers()[0]["ok"] is True
    assert not client.transport.disconnecting


def test_an_over_long_request_is_refused_and_the_connection_closed():
    client = Client()
    client.send(b'{"cmd": "list", "pad": "' + b"x" * MAX_REQUEST)   # no newline yet
    assert client.answers() == [{"ok": False, "error": f"request too long (more than {MAX_REQUEST} octets)"}]
    assert client.transport.disconnecting
    client.send(b'"}\n{"cmd": "delete", "id": "' + ID1.encode() + b'"}\n')   # the rest is ignored
    assert client.answers() == []
    assert client.runner.calls == []


def test_an_over_long_request_is_refused_after_the_pending_answer():
    client = Client()
    client.send({"cmd": "hold", "id": ID1})
    client.send(b"y" * (MAX_REQUEST + 1) + b"\n")
    assert client.answers() == []
    assert not client.transport.disconnecting
    client.runner.deferreds[0].callback(ID1)
    hold, too_long = client.answers()
    assert hold == {"ok": True, "result": ID1}
    assert too_long["error"].startswith("request too long")
    assert client.transport.disconnecting


def test_a_client_that_never_reads_answers_is_paused():
    client = Client()
    client.send(*[{"cmd": "hold", "id": ID1}] * (control._MAX_WAITING + 1))
    assert client.transport.producerState == "paused"
    for _ in range(control._MAX_WAITING // 2 + 1):
        client.runner.deferreds[len(client.runner.calls) - 1].callback(ID1)
    assert client.transport.producerState == "producing"


# -- the lock -------------------------------------------------------------------------------

def test_a_second_server_on_the_same_queue_is_refused(tmp_path):
    queue_dir = tmp_path / "queue"
    first = acquire_server_lock(queue_dir, wait=0)
    try:
        assert (queue_dir / "server.lock").exists()
        with pytest.raises(SystemExit) as exc:
            acquire_server_lock(queue_dir, wait=0)   # a second open file description: flock conflicts
        assert str(exc.value).startswith(f"mailgw: another mailgw is running on {queue_dir} ")
        assert try_lock(queue_dir) is None           # the CLI sees a server
    finally:
        first.close()
    second = acquire_server_lock(queue_dir, wait=0)  # free again once the first is gone
    second.close()


def test_the_lock_conflicts_across_processes(tmp_path):
    queue_dir = tmp_path / "queue"
    lock = acquire_server_lock(queue_dir, wait=0)
    try:
        script = ("import sys\nfrom mailgw.queue.control import acquire_server_lock\n"
                  "acquire_server_lock(sys.argv[1], wait=0)\n")
        done = subprocess.run([sys.executable, "-c", script, str(queue_dir)], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[2])
        assert done.returncode == 1
        assert "another mailgw is running on" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        lock.close()


def test_the_cli_lock_is_free_when_no_server_runs(tmp_path):
    (tmp_path / "queue").mkdir()
    lock = try_lock(tmp_path / "queue")
    assert lock is not None
    try:
        with pytest.raises(SystemExit):
            acquire_server_lock(tmp_path / "queue", wait=0)   # a server starting now fails clearly
    finally:
        lock.close()


# -- the service ------------------------------------------------------------------------------

@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to ~107 octets; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mgw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()    # the file stays behind, as after a crash


def test_the_service_replaces_a_stale_socket_and_removes_it_at_stop(short_dir):
    path = short_dir / "control.sock"
    _stale_socket(path)
    reactor = MemoryReactor()
    runner = FakeRunner()
    svc = control_service(reactor, path, runner)
    svc.startService()
    assert not path.exists()                  # the stale one is gone before listening
    (address, factory, _, mode, _) = reactor.unixServers[0]
    assert address == str(path) and mode == 0o600
    assert factory.runner is runner
    _stale_socket(path)                       # what a real port would have made
    svc.stopService()
    assert not path.exists()


def test_the_service_never_removes_a_file_that_is_not_a_socket(short_dir):
    path = short_dir / "control.sock"
    path.write_text("important")
    svc = control_service(MemoryReactor(), path, FakeRunner())
    svc.startService()
    svc.stopService()
    assert path.read_text() == "important"

