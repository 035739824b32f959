"""SMTP workers (mailgw/workers.py, mailgw/worker.py): the pipe protocol, the
main process's end of a worker (WorkerProcess), the pool that keeps workers
running (SMTPWorkers), the worker's end of the pipe (MasterLink,
RemoteChecker), the worker's stderr log format, and worker.py's helpers.

Nothing is spawned and nothing sleeps: the reactor and process transports are
fakes, time is a task.Clock, logs go to a Logger with a list as observer.
"""
from __future__ import annotations

import dataclasses

import base64
import io
import ipaddress
import os
import socket
from pathlib import Path

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailgw import workers
from mailgw.queue.envelope import Envelope
from mailgw.errors import LoginsRefused, TemporaryError
from mailgw.worker import parse_socket
from mailgw.workers import (MAX_LINE, RESTART_FACTOR, RESTART_FIRST, RESTART_MAX, RESTART_STABLE, STOP_GRACE,
                            MasterLink, RemoteChecker, SMTPWorkers, StderrLog, WorkerProcess, decode, encode)
from threadless import ImmediatePool, ThreadlessClock


# -- helpers and fakes ---------------------------------------------------------------------------


def b64(text) -> str:
    if isinstance(text, str):
        text = text.encode("utf-8")
    return base64.b64encode(text).decode("ascii")


def outcome(d: defer.Deferred) -> list:
    """A live box holding what `d` fired with (a value or a Failure), once it fires.
    Consumes the result, so a failure checked here is never reported as unhandled."""
    box = []
    d.addBoth(box.append)
    return box


def failed_with(box: list, error_type) -> bool:
    assert box, "the Deferred has not fired"
    return isinstance(box[0], Failure) and box[0].check(error_type) is not None


def ended_reason(code: int = 1) -> Failure:
    return Failure(ProcessTerminated(exitCode=code))


@pytest.fixture
def events(monkeypatch) -> list[dict]:
    """Every event mailgw.workers logs."""
    captured: list[dict] = []
    monkeypatch.setattr(workers, "log", Logger(namespace="mailgw.workers", observer=captured.append))
    return captured


def serious(events) -> list[dict]:
    return [event for event in events if event["log_level"] in (LogLevel.error, LogLevel.critical)]


class FakeProcessTransport:
    """What WorkerProcess uses of a process transport."""

    def __init__(self, pid: int = 4242):
        self.pid = pid
        self.written: list[bytes] = []
        self.stdin_closed = 0
        self.signals: list = []
        self.signal_error: Exception | None = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed += 1

    def signalProcess(self, signal) -> None:
        self.signals.append(signal)
        if self.signal_error is not None:
            raise self.signal_error

    def messages(self) -> list[tuple[str, object]]:
        data = b"".join(self.written)
        assert data == b"" or data.endswith(b"\n"), data
        return [decode(line) for line in data.split(b"\n")[:-1]]


class FakeRunner:
    def __init__(self, envelopes=None, finished=()):
        self.envelopes: dict[str, Envelope] = dict(envelopes or {})
        self.finished = dict.fromkeys(finished)     # as QueueRunner.finished: ids done with
        self.added: list[Envelope] = []

    def add(self, envelope) -> None:
        """As QueueRunner.add: an Envelope, or its JSON form (off a worker's pipe)."""
        self.added.append(envelope)
        self.envelopes[envelope.id if isinstance(envelope, Envelope) else envelope["id"]] = envelope


class FakeMailStore:
    def __init__(self):
        self.delivered_calls: list = []

    def delivered(self, addresses) -> None:
        self.delivered_calls.append(addresses)


class FakeChecker:
    """requestAvatarId returns a Deferred the test fires (or raises `raise_now`)."""

    def __init__(self):
        self.calls: list[tuple[object, defer.Deferred]] = []
        self.raise_now: Exception | None = None

    def requestAvatarId(self, credentials):
        if self.raise_now is not None:
            raise self.raise_now
        d = defer.Deferred()
        self.calls.append((credentials, d))
        return d


class FakePool:
    """What a WorkerProcess uses of its SMTPWorkers."""

    def __init__(self):
        self.clock = task.Clock()
        self.runner = FakeRunner()
        self.mail_store = FakeMailStore()
        self.checker = FakeChecker()
        self.ended: list = []

    def worker_ended(self, worker, reason) -> None:
        self.ended.append((worker, reason))


@pytest.fixture
def pool() -> FakePool:
    return FakePool()


@pytest.fixture
def worker(pool, events) -> WorkerProcess:
    process = WorkerProcess(pool, 1)
    process.makeConnection(FakeProcessTransport())
    return process


def auth_request(number=1, username="alice@example.test", password="s3cret", client="192.0.2.7") -> bytes:
    return encode("auth", {"id": number, "username": b64(username), "password": b64(password), "client": client})


ENVELOPE = {"id": "0001QUEUEID", "sender": "a@example.test", "recipients": ["b@remote.test", "c@remote.test"],
            "note": "multi\nline \u00e9 \u4e2d"}


# -- encode / decode -----------------------------------------------------------------------------


def test_encode_then_decode_gives_back_verb_and_value():
    value = {"id": 3, "to": ["a@example.test"], "none": None, "float": 1.5, "flag": True, "nested": {"k": [1, 2]}}
    line = encode("queued", value)
    assert line.endswith(b"\n")
    assert decode(line[:-1]) == ("queued", value)


def test_encoded_strings_with_newlines_and_unicode_stay_one_ascii_line():
    value = {"subject": "one\ntwo\r\nthree\u2028four", "name": "J\u00fcrgen \u4e2d\u6587 \U0001f600", "list": ["\n", "\r"]}
    line = encode("delivered", value)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert b"\r" not in line
    line.decode("ascii")        # no raw non-ASCII byte either
    assert decode(line[:-1]) == ("delivered", value)


@pytest.mark.parametrize("line", [b"queued", b"queued ", b"queued {", b"queued {}x", b"\xff\xfe {}"])
def test_decode_raises_value_error_for_a_line_that_is_not_verb_and_json(line):
    with pytest.raises(ValueError):
        decode(line)


# -- WorkerProcess: requests from the worker -----------------------------------------------------


def test_queued_line_split_across_chunks_reaches_the_runner_once(worker, pool):
    line = encode("queued", ENVELOPE)
    chunks = [line[:1], line[1:10], line[10:-1], line[-1:]]
    for chunk in chunks[:-1]:
        worker.outReceived(chunk)
        assert pool.runner.added == []
    worker.outReceived(chunks[-1])
    assert pool.runner.added == [ENVELOPE]
    worker.outReceived(b"")
    assert pool.runner.added == [ENVELOPE]


def test_several_requests_in_one_chunk_are_each_handled_in_order(worker, pool):
    second = dict(ENVELOPE, id="0002QUEUEID")
    worker.outReceived(encode("queued", ENVELOPE) + encode("delivered", ["x@example.test"])
                       + encode("queued", second))
    assert pool.runner.added == [ENVELOPE, second]
    assert pool.mail_store.delivered_calls == [["x@example.test"]]


def test_delivered_reaches_the_mail_store(worker, pool):
    worker.outReceived(encode("delivered", ["alice@example.test", "bob@example.test"]))
    assert pool.mail_store.delivered_calls == [["alice@example.test", "bob@example.test"]]


def test_delivered_without_a_mail_store_is_ignored_quietly(worker, pool, events):
    pool.mail_store = None
    worker.outReceived(encode("delivered", ["alice@example.test"]) + encode("queued", ENVELOPE))
    assert serious(events) == []
    assert pool.runner.added == [ENVELOPE]


def test_auth_answers_ok_with_the_address_when_the_checker_succeeds(worker, pool):
    worker.outReceived(auth_request(number=7))
    assert len(pool.checker.calls) == 1
    assert worker.transport.written == []          # nothing before the checker decides
    pool.checker.calls[0][1].callback("alice@example.test")
    assert worker.transport.messages() == [("auth", {"id": 7, "result": "ok", "address": "alice@example.test"})]


def test_auth_credentials_carry_decoded_username_password_and_client_ip(worker, pool):
    worker.outReceived(auth_request(username="j\u00fcrgen@example.test", password="p\u00e4ss word\n",
                                    client="2001:db8::7"))
    credentials, _ = pool.checker.calls[0]
    assert IUsernamePassword.providedBy(credentials)
    assert credentials.username == "j\u00fcrgen@example.test".encode("utf-8")
    assert credentials.password == "p\u00e4ss word\n".encode("utf-8")
    assert credentials.client_ip == "2001:db8::7"
    assert credentials.checkPassword("p\u00e4ss word\n".encode("utf-8"))


@pytest.mark.parametrize("error, result", [
    (UnauthorizedLogin("no"), "fail"),
    (LoginsRefused(), "refused"),
    (RuntimeError("user database unreadable"), "error"),
    (TemporaryError(451, "4.3.0", "disk trouble"), "error"),      # a TemporaryError that is not LoginsRefused
], ids=["unauthorized", "refused", "other-exception", "other-temporary-error"])
def test_auth_failure_outcomes(worker, pool, events, error, result):
    worker.outReceived(auth_request(number=12))
    pool.checker.calls[0][1].errback(error)
    assert worker.transport.messages() == [("auth", {"id": 12, "result": result})]
    if result == "error":
        assert len(serious(events)) == 1, events     # an unexpected failure is logged
        assert serious(events)[0]["worker"] == "smtp-worker-1"
    else:
        assert serious(events) == []                  # a wrong password is not an error of ours


def test_auth_checker_raising_at_once_answers_error(worker, pool, events):
    pool.checker.raise_now = RuntimeError("boom")
    worker.outReceived(auth_request(number=3))
    assert worker.transport.messages() == [("auth", {"id": 3, "result": "error"})]
    assert len(serious(events)) == 1


def test_auth_answers_carry_their_request_id_when_checks_finish_out_of_order(worker, pool):
    worker.outReceived(auth_request(number=1, username="alice") + auth_request(number=2, username="bob"))
    (_, first), (_, second) = pool.checker.calls
    second.callback("bob@example.test")
    first.errback(UnauthorizedLogin())
    assert worker.transport.messages() == [
        ("auth", {"id": 2, "result": "ok", "address": "bob@example.test"}),
        ("auth", {"id": 1, "result": "fail"}),
    ]


def test_auth_answer_without_a_transport_is_dropped(worker, pool):
    transport = worker.transport
    worker.outReceived(auth_request())
    worker.transport = None
    pool.checker.calls[0][1].callback("alice@example.test")     # must not raise
    assert transport.written == []


def test_malformed_lines_are_logged_and_later_lines_still_handled(worker, pool, events):
    bad = [b"not json at all", b"bogus {}", b"queued", b'auth {"id":1}', b"\xff\xfe"]
    worker.outReceived(b"\n".join(bad) + b"\n" + encode("queued", ENVELOPE))
    assert pool.runner.added == [ENVELOPE]
    logged = serious(events)
    assert [event.get("line") for event in logged] == [bad[0], bad[1], bad[2], None, bad[4]]
    assert all(event["worker"] == "smtp-worker-1" for event in logged)
    # the incomplete auth request is answered, so the worker's login does not hang
    assert [decode(line) for line in worker.transport.written] == [("auth", {"id": 1, "result": "error"})]
    assert worker.transport.stdin_closed == 0  # and the worker was not stopped for it


def test_overlong_request_line_stops_the_worker(worker, events, monkeypatch):
    monkeypatch.setattr(workers, "MAX_LINE", 64)
    worker.outReceived(b"x" * 64)
    assert worker.transport.stdin_closed == 0
    worker.outReceived(b"x")
    assert worker.transport.stdin_closed == 1
    assert any(event.get("why") == "request line too long" for event in serious(events))


# -- WorkerProcess: the worker's stderr ----------------------------------------------------------


@pytest.mark.parametrize("level", [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                                   LogLevel.critical], ids=lambda level: level.name)
def test_stderr_line_is_relogged_at_its_level_under_the_worker_name(worker, events, level):
    worker.errReceived(f"{level.name}\tsomething happened: 42\n".encode())
    assert len(events) == 1
    event = events[0]
    assert event["log_level"] is level
    assert event["log_system"] == "smtp-worker-1"
    assert formatEvent(event) == "something happened: 42"


def test_stderr_line_split_across_chunks_is_one_event(worker, events):
    worker.errReceived(b"wa")
    worker.errReceived(b"rn\tdisk ")
    assert events == []
    worker.errReceived(b"almost full\ninfo\tnext")
    assert [(event["log_level"], formatEvent(event)) for event in events] == [(LogLevel.warn, "disk almost full")]
    worker.errReceived(b"\n")
    assert formatEvent(events[-1]) == "next"


def test_worker_name_follows_its_number(pool, events):
    process = WorkerProcess(pool, 5)
    process.makeConnection(FakeProcessTransport())
    process.errReceived(b"info\thello\n")
    assert events[0]["log_system"] == "smtp-worker-5"


def test_stderr_text_with_braces_and_tabs_is_relogged_verbatim(worker, events):
    worker.errReceived(b"info\tvalue {x} {{y}} {0}\tafter a tab\n")
    assert formatEvent(events[0]) == "value {x} {{y}} {0}\tafter a tab"


@pytest.mark.parametrize("line", [b"Traceback (most recent call last):", b"INFO\tupper-case is not a level name",
                                  b"no tab at all"])
def test_unrecognised_stderr_line_is_relogged_whole_as_error(worker, events, line):
    worker.errReceived(line + b"\n")
    assert len(events) == 1
    assert events[0]["log_level"] is LogLevel.error
    assert events[0]["log_system"] == "smtp-worker-1"
    assert formatEvent(events[0]) == line.decode()


def test_stderr_line_with_invalid_utf8_is_relogged_with_replacement_characters(worker, events):
    worker.errReceived(b"info\tbad \xff byte\n")
    assert formatEvent(events[0]) == "bad \ufffd byte"


def test_overlong_stderr_line_is_dropped_without_stopping_the_worker(worker, events, monkeypatch):
    monkeypatch.setattr(workers, "MAX_LINE", 64)
    worker.errReceived(b"y" * 100)
    worker.errReceived(b"info\tfine\n")
    assert [formatEvent(event) for event in events] == ["fine"]
    assert worker.transport.stdin_closed == 0


# -- WorkerProcess: ending and stopping ----------------------------------------------------------


def test_process_ended_fires_ended_and_tells_the_pool(worker, pool):
    box = outcome(worker.ended)
    reason = ended_reason(3)
    worker.processEnded(reason)
    assert box == [reason.value]
    assert pool.ended == [(worker, reason.value)]


def test_stop_closes_stdin_and_kills_after_the_grace_period(worker, pool):
    worker.stop()
    assert worker.transport.stdin_closed == 1
    pool.clock.advance(STOP_GRACE - 0.01)
    assert worker.transport.signals == []
    pool.clock.advance(0.01)
    assert worker.transport.signals == ["KILL"]


def test_stop_does_not_kill_a_worker_that_ended_within_the_grace_period(worker, pool):
    worker.stop()
    pool.clock.advance(STOP_GRACE / 2)
    worker.processEnded(Failure(ProcessDone(0)))
    assert pool.clock.getDelayedCalls() == []
    pool.clock.advance(STOP_GRACE * 10)
    assert worker.transport.signals == []


def test_stop_after_the_process_ended_does_nothing(worker, pool):
    worker.processEnded(Failure(ProcessDone(0)))
    worker.stop()
    assert worker.transport.stdin_closed == 0
    assert pool.clock.getDelayedCalls() == []


def test_kill_of_a_process_that_already_exited_is_harmless(worker, pool):
    worker.transport.signal_error = ProcessExitedAlready()
    worker.stop()
    pool.clock.advance(STOP_GRACE)          # must not raise
    assert worker.transport.signals == ["KILL"]


# -- SMTPWorkers ---------------------------------------------------------------------------------


class Spawned:
    def __init__(self, proto, executable, args, env, childFDs, transport):
        self.proto, self.executable, self.args, self.env, self.childFDs = proto, executable, args, env, childFDs
        self.transport = transport

    @property
    def number(self) -> int:
        return int(self.args[self.args.index("--number") + 1])


class FakeReactor:
    """spawnProcess records the call and connects the protocol to a FakeProcessTransport."""

    def __init__(self):
        self.spawned: list[Spawned] = []
        self.next_pid = 1000
        self.spawn_error: Exception | None = None

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None, uid=None, gid=None,
                     usePTY=False, childFDs=None):
        if self.spawn_error is not None:
            raise self.spawn_error
        self.next_pid += 1
        transport = FakeProcessTransport(pid=self.next_pid)
        processProtocol.makeConnection(transport)
        self.spawned.append(Spawned(processProtocol, executable, list(args), env, childFDs, transport))
        return transport

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class FakeSpool:
    def __init__(self, entries=None, broken=None):
        self.entries: dict[str, Envelope] = dict(entries or {})
        self.broken: dict[str, Exception] = dict(broken or {})
        self.ids_error: Exception | None = None
        self.loads: list[str] = []

    def ids(self):
        if self.ids_error is not None:
            raise self.ids_error
        return list(self.entries) + list(self.broken)

    def load(self, queue_id):
        self.loads.append(queue_id)
        if queue_id in self.broken:
            raise self.broken[queue_id]
        return self.entries[queue_id], Path("/spool/env") / queue_id


def envelope(queue_id: str) -> Envelope:
    """What Spool.load returns: a typed envelope (the short ids of these tests put in place after validation)."""
    return dataclasses.replace(Envelope.from_json({
        "version": 1, "id": "0123456789ABCDEF", "arrival": 1700000000.0, "sender": "a@example.test",
        "sender_utf8": False, "body": "7BIT", "size": 100, "envid": None, "ret": None,
        "client": {"ip": "192.0.2.1", "helo": "client.test", "tls": False, "auth": None, "listener": "relay"},
        "recipients": [{"address": "b@remote.test", "orcpt": None, "notify": None, "state": "pending",
                        "attempts": 0, "last_reply": None}],
        "attempts": 0, "next_attempt": 1700000000.0, "history": []}), id=queue_id)


PYTHON = "/opt/test/bin/python3"
SOCKETS = (("smtp", 7, int(socket.AF_INET)), ("submission", 9, int(socket.AF_INET6)))


def make_workers(*, count=2, config_path="/etc/mailgw/mailgw.toml", sockets=SOCKETS, spool=None, runner=None,
                 threadpool=None, clock=None, reactor=None) -> SMTPWorkers:
    return SMTPWorkers(reactor=reactor or FakeReactor(), clock=clock or task.Clock(), count=count,
                       config_path=config_path, sockets=sockets, checker=FakeChecker(),
                       runner=runner or FakeRunner(), spool=spool or FakeSpool(), mail_store=FakeMailStore(),
                       threadpool=threadpool, python=PYTHON)


@pytest.fixture
def started(events) -> SMTPWorkers:
    pool = make_workers(count=2)
    pool.startService()
    return pool


def end(pool: SMTPWorkers, number: int, code: int = 1) -> None:
    pool.workers[number].processEnded(ended_reason(code))


def pending_delay(pool: SMTPWorkers) -> float:
    """Seconds until the one pending restart."""
    calls = pool.clock.getDelayedCalls()
    assert len(calls) == 1, calls
    return calls[0].getTime() - pool.clock.seconds()


def test_command_passes_sockets_from_fd_3_on_and_names_them():
    pool = make_workers(count=3, config_path="/etc/mailgw.toml")
    argv, child_fds = pool.command(2)
    assert argv == [PYTHON, "-m", "mailgw.worker", "--number", "2", "--workers", "3",
                    "--config", "/etc/mailgw.toml",
                    "--socket", f"smtp=3:{int(socket.AF_INET)}",
                    "--socket", f"submission=4:{int(socket.AF_INET6)}"]
    assert child_fds == {0: "w", 1: "r", 2: "r", 3: 7, 4: 9}


def test_command_without_a_config_path_has_no_config_option():
    argv, _ = make_workers(config_path=None).command(1)
    assert "--config" not in argv
    assert argv[:3] == [PYTHON, "-m", "mailgw.worker"]


def test_command_config_path_may_be_a_path():
    argv, _ = make_workers(config_path=Path("/srv/mail/mailgw.toml")).command(1)
    assert argv[argv.index("--config") + 1] == "/srv/mail/mailgw.toml"


def test_command_socket_options_parse_back_to_the_inherited_fds():
    argv, child_fds = make_workers().command(1)
    options = [parse_socket(argv[i + 1]) for i, arg in enumerate(argv) if arg == "--socket"]
    assert [(name, child_fds[fd], family) for name, fd, family in options] == list(SOCKETS)


def test_start_service_spawns_count_workers_with_their_commands(events):
    pool = make_workers(count=3)
    pool.startService()
    spawned = pool.reactor.spawned
    assert [record.number for record in spawned] == [1, 2, 3]
    for number, record in enumerate(spawned, start=1):
        argv, child_fds = pool.command(number)
        assert (record.executable, record.args, record.childFDs) == (PYTHON, argv, child_fds)
        assert record.env == dict(os.environ)
        assert pool.workers[number] is record.proto
        assert record.proto.name == f"smtp-worker-{number}"
    assert len({record.transport.pid for record in spawned}) == 3


def test_worker_that_ends_while_running_is_restarted_after_restart_first(started):
    old = started.workers[2]
    end(started, 2)
    assert 2 not in started.workers
    assert len(started.reactor.spawned) == 2
    started.clock.advance(RESTART_FIRST - 0.01)
    assert len(started.reactor.spawned) == 2
    started.clock.advance(0.01)
    assert len(started.reactor.spawned) == 3
    restarted = started.reactor.spawned[-1]
    assert restarted.number == 2
    assert started.workers[2] is restarted.proto is not old
    assert started.workers[1] is started.reactor.spawned[0].proto


def test_quick_repeated_exits_back_off_by_the_factor_up_to_the_cap(started):
    delays = []
    for _ in range(10):
        end(started, 1)
        delays.append(pending_delay(started))
        started.clock.advance(delays[-1])
        assert started.workers[1] is started.reactor.spawned[-1].proto
    expected = [min(RESTART_FIRST * RESTART_FACTOR ** n, RESTART_MAX) for n in range(10)]
    assert delays == pytest.approx(expected)
    assert delays[-1] == RESTART_MAX and delays[0] == RESTART_FIRST
    assert all(later >= earlier for earlier, later in zip(delays, delays[1:]))


def test_worker_that_ran_a_stable_while_restarts_after_restart_first_again(started):
    for _ in range(4):
        end(started, 1)
        started.clock.advance(pending_delay(started))
    end(started, 1)
    assert pending_delay(started) > RESTART_FIRST        # backing off by now
    started.clock.advance(pending_delay(started))
    started.clock.advance(RESTART_STABLE)
    end(started, 1)
    assert pending_delay(started) == pytest.approx(RESTART_FIRST)


def test_back_off_is_kept_per_worker(started):
    for _ in range(3):
        end(started, 1)
        started.clock.advance(pending_delay(started))
    end(started, 2)
    assert pending_delay(started) == pytest.approx(RESTART_FIRST)


def test_stop_service_stops_every_worker_and_fires_only_when_all_ended(events):
    pool = make_workers(count=3)
    pool.startService()
    box = outcome(pool.stopService())
    assert [record.transport.stdin_closed for record in pool.reactor.spawned] == [1, 1, 1]
    reasons = {}
    for number in (2, 3):
        reasons[number] = ended_reason(0)
        pool.workers[number].processEnded(reasons[number])
        assert box == []
    reasons[1] = ended_reason(0)
    pool.workers[1].processEnded(reasons[1])
    assert box == [[(True, reasons[number].value) for number in (1, 2, 3)]]


def test_no_restart_after_stop_service(started):
    started.stopService()
    end(started, 1)
    end(started, 2)
    started.clock.advance(RESTART_MAX * 10)
    assert len(started.reactor.spawned) == 2
    assert started.workers == {}


def test_stop_service_cancels_a_pending_restart_and_does_not_wait_for_that_worker(started):
    end(started, 1)
    box = outcome(started.stopService())
    started.clock.advance(RESTART_MAX * 10)
    assert len(started.reactor.spawned) == 2
    assert started.reactor.spawned[1].transport.signals == ["KILL"]     # worker 2 ignored its closed stdin
    assert box == []
    end(started, 2)
    assert len(box) == 1 and len(box[0]) == 1


def test_stop_service_kills_workers_that_outlive_the_grace_period(started):
    box = outcome(started.stopService())
    started.clock.advance(STOP_GRACE)
    assert [record.transport.signals for record in started.reactor.spawned] == [["KILL"], ["KILL"]]
    end(started, 1, code=-9)
    end(started, 2, code=-9)
    assert len(box) == 1


def test_stop_service_fires_even_when_a_restart_could_not_spawn(started):
    end(started, 1)
    started.reactor.spawn_error = OSError(24, "Too many open files")
    started.clock.advance(RESTART_FIRST)       # the failure is logged, not raised from the timer
    assert 1 not in started.workers
    assert started._restart_timers[1].active()  # and tried again later
    box = outcome(started.stopService())
    end(started, 2)
    assert len(box) == 1


# -- SMTPWorkers: adopting spool entries whose `queued` line was lost ----------------------------


def test_worker_end_adopts_only_spool_entries_the_runner_does_not_know(events):
    known = envelope("A")
    spool = FakeSpool({"A": known, "B": envelope("B"), "C": envelope("C")})
    pool = make_workers(spool=spool, runner=FakeRunner({"A": known}))
    pool.startService()
    end(pool, 1)
    assert spool.loads == ["B", "C"]
    assert pool.runner.added == [envelope("B"), envelope("C")]
    end(pool, 2)                           # a second scan finds nothing new
    assert pool.runner.added == [envelope("B"), envelope("C")]


def test_spool_entries_that_vanish_or_cannot_be_read_are_skipped(events):
    spool = FakeSpool({"E": envelope("E")},
                      broken={"B": KeyError("B"), "C": ValueError("corrupt"), "D": FileNotFoundError("gone")})
    pool = make_workers(spool=spool)
    pool.startService()
    end(pool, 1)
    assert sorted(spool.loads) == ["B", "C", "D", "E"]
    assert pool.runner.added == [envelope("E")]
    assert not any(event["log_format"].startswith("spool scan") for event in events)


def test_a_failing_spool_scan_is_logged_and_the_worker_still_restarts(events):
    spool = FakeSpool()
    spool.ids_error = PermissionError(13, "Permission denied")
    pool = make_workers(spool=spool)
    pool.startService()
    end(pool, 1)
    assert any(event.get("log_format", "").startswith("spool scan after a worker exited failed")
               for event in serious(events))
    pool.clock.advance(RESTART_FIRST)
    assert pool.reactor.spawned[-1].number == 1 and len(pool.reactor.spawned) == 3


def test_spool_is_scanned_even_when_the_worker_ends_after_stop_service(events):
    spool = FakeSpool({"B": envelope("B")})
    pool = make_workers(spool=spool)
    pool.startService()
    pool.stopService()
    end(pool, 1)
    assert pool.runner.added == [envelope("B")]


def test_spool_scan_runs_in_the_thread_pool_when_there_is_one(events):
    threadpool = ImmediatePool()
    pool = make_workers(spool=FakeSpool({"B": envelope("B")}), threadpool=threadpool, clock=ThreadlessClock())
    pool.startService()
    end(pool, 1)
    assert threadpool.jobs == 1
    assert pool.runner.added == [envelope("B")]


class HeldPool:
    """A thread pool whose jobs run when the test says."""

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs.append(lambda: on_result(True, f(*args, **kwargs)))


def test_entry_the_runner_learns_of_during_the_scan_is_not_added_twice(events):
    threadpool = HeldPool()
    pool = make_workers(spool=FakeSpool({"B": envelope("B"), "C": envelope("C")}), threadpool=threadpool)
    pool.startService()
    end(pool, 1)
    assert pool.runner.added == []
    pool.runner.envelopes["B"] = envelope("B")      # its `queued` line arrived meanwhile
    threadpool.jobs.pop()()
    assert pool.runner.added == [envelope("C")]


# -- the worker's side: MasterLink and RemoteChecker ---------------------------------------------


class Link:
    def __init__(self):
        self.lost = []
        self.link = MasterLink(on_lost=lambda: self.lost.append(True))
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.checker = RemoteChecker(self.link)

    def sent(self) -> list[tuple[str, object]]:
        data = self.transport.value()
        assert data == b"" or data.endswith(b"\n"), data
        return [decode(line) for line in data.split(b"\n")[:-1]]

    def answer(self, value, verb="auth") -> None:
        self.link.dataReceived(encode(verb, value))


@pytest.fixture
def remote(events) -> Link:
    return Link()


def credentials(username=b"alice@example.test", password=b"s3cret", client="192.0.2.7"):
    creds = UsernamePassword(username, password)
    if client is not None:
        creds.client_ip = client
    return creds


def test_remote_checker_is_a_credentials_checker_for_passwords(remote):
    assert verifyObject(ICredentialsChecker, remote.checker)
    assert IUsernamePassword in remote.checker.credentialInterfaces


def test_request_avatar_id_writes_one_auth_line_with_base64_credentials_and_client(remote):
    password = "p\u00e4ss\nword".encode("utf-8")
    remote.checker.requestAvatarId(credentials(b"alice@example.test", password,
                                               ipaddress.ip_address("2001:db8::1")))
    assert remote.transport.value().count(b"\n") == 1
    assert remote.sent() == [("auth", {"id": 1, "username": b64(b"alice@example.test"), "password": b64(password),
                                       "client": "2001:db8::1"})]


def test_str_credentials_are_sent_as_utf8(remote):
    remote.checker.requestAvatarId(credentials("j\u00fcrgen", "p\u00e4ss"))
    (_, request), = remote.sent()
    assert base64.b64decode(request["username"]) == "j\u00fcrgen".encode("utf-8")
    assert base64.b64decode(request["password"]) == "p\u00e4ss".encode("utf-8")


def test_credentials_without_client_ip_are_sent_as_unknown(remote):
    remote.checker.requestAvatarId(credentials(client=None))
    (_, request), = remote.sent()
    assert request["client"] == "unknown"


def test_ok_answer_fires_with_the_address(remote):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    assert box == []
    remote.answer({"id": 1, "result": "ok", "address": "alice@example.test"})
    assert box == ["alice@example.test"]


def test_fail_answer_errbacks_unauthorized_login(remote):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    remote.answer({"id": 1, "result": "fail"})
    assert failed_with(box, UnauthorizedLogin)


def test_refused_answer_errbacks_logins_refused(remote):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    remote.answer({"id": 1, "result": "refused"})
    assert failed_with(box, LoginsRefused)


@pytest.mark.parametrize("answer", [{"result": "error"}, {"result": "something new"}, {}],
                         ids=["error", "unknown-result", "no-result"])
def test_any_other_answer_errbacks_a_temporary_error(remote, answer):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    remote.answer(dict(answer, id=1))
    assert failed_with(box, TemporaryError)
    assert not failed_with(box, LoginsRefused) and not failed_with(box, UnauthorizedLogin)
    assert box[0].value.code == 454


def test_each_request_gets_its_own_id(remote):
    for _ in range(3):
        remote.checker.requestAvatarId(credentials())
    assert [request["id"] for _, request in remote.sent()] == [1, 2, 3]


def test_answers_are_matched_by_id_even_out_of_order(remote):
    first = outcome(remote.checker.requestAvatarId(credentials(b"alice")))
    second = outcome(remote.checker.requestAvatarId(credentials(b"bob")))
    third = outcome(remote.checker.requestAvatarId(credentials(b"carol")))
    remote.link.dataReceived(encode("auth", {"id": 3, "result": "ok", "address": "carol@example.test"})
                             + encode("auth", {"id": 1, "result": "fail"}))
    assert third == ["carol@example.test"]
    assert failed_with(first, UnauthorizedLogin)
    assert second == []
    remote.answer({"id": 2, "result": "ok", "address": "bob@example.test"})
    assert second == ["bob@example.test"]


def test_answer_split_across_chunks_is_handled_once_complete(remote):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    line = encode("auth", {"id": 1, "result": "ok", "address": "alice@example.test"})
    remote.link.dataReceived(line[:5])
    remote.link.dataReceived(line[5:-1])
    assert box == []
    remote.link.dataReceived(line[-1:])
    assert box == ["alice@example.test"]


def test_connection_lost_fails_pending_requests_with_temporary_error_and_calls_on_lost(remote):
    first = outcome(remote.checker.requestAvatarId(credentials()))
    second = outcome(remote.checker.requestAvatarId(credentials()))
    remote.link.connectionLost(Failure(ConnectionDone()))
    for box in (first, second):
        assert failed_with(box, TemporaryError)
        assert not failed_with(box, LoginsRefused)
        assert box[0].value.code == 454
    assert remote.lost == [True]
    assert not remote.link.connected_to_master


def test_connection_lost_without_pending_requests_still_calls_on_lost(remote):
    remote.link.connectionLost(Failure(ConnectionDone()))
    assert remote.lost == [True]


def test_request_after_the_pipe_closed_fails_at_once_and_writes_nothing(remote):
    remote.link.connectionLost(Failure(ConnectionDone()))
    remote.transport.clear()
    box = outcome(remote.checker.requestAvatarId(credentials()))
    assert failed_with(box, TemporaryError)
    assert remote.transport.value() == b""


def test_request_before_the_pipe_is_connected_fails_at_once():
    box = outcome(RemoteChecker(MasterLink()).requestAvatarId(credentials()))
    assert failed_with(box, TemporaryError)


def test_send_writes_one_line_and_nothing_after_the_pipe_closed(remote):
    remote.link.send("delivered", ["alice@example.test"])
    assert remote.transport.value() == encode("delivered", ["alice@example.test"])
    remote.link.connectionLost(Failure(ConnectionDone()))
    remote.transport.clear()
    remote.link.send("queued", ENVELOPE)
    assert remote.transport.value() == b""


def test_answer_with_an_unknown_id_is_logged_and_ignored(remote, events):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    remote.answer({"id": 99, "result": "ok", "address": "mallory@example.test"})
    assert box == []
    assert len(serious(events)) == 1 and b"99" in serious(events)[0]["line"]
    remote.answer({"id": 1, "result": "ok", "address": "alice@example.test"})
    assert box == ["alice@example.test"]


def test_second_answer_for_the_same_id_is_logged_and_ignored(remote, events):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    remote.answer({"id": 1, "result": "fail"})
    remote.answer({"id": 1, "result": "ok", "address": "alice@example.test"})    # must not raise
    assert failed_with(box, UnauthorizedLogin)
    assert len(serious(events)) == 1


@pytest.mark.parametrize("line", [b"garbage", b"auth [1, 2]", b'auth "text"', b"auth 5", b"auth {}",
                                  b'auth {"id": "1"}'])
def test_malformed_answer_is_logged_and_the_link_keeps_working(remote, events, line):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    remote.link.dataReceived(line + b"\n")
    assert box == []
    assert [event["line"] for event in serious(events)] == [line]
    assert not remote.transport.disconnecting
    remote.answer({"id": 1, "result": "ok", "address": "alice@example.test"})
    assert box == ["alice@example.test"]


def test_overlong_answer_is_dropped_without_losing_the_answers_after_it(remote, events):
    box = outcome(remote.checker.requestAvatarId(credentials()))
    remote.link.dataReceived(b"x" * (MAX_LINE + 1) + b"\n"
                             + encode("auth", {"id": 1, "result": "ok", "address": "alice@example.test"}))
    assert box == ["alice@example.test"]


# -- both ends together --------------------------------------------------------------------------


class PasswordTable:
    """A checker with fixed answers: ok for the right password, refused for a locked-out client."""

    def requestAvatarId(self, creds):
        if creds.client_ip == "203.0.113.66":
            return defer.fail(LoginsRefused())
        if creds.username == b"alice" and creds.password == "p\u00e4ss".encode("utf-8"):
            return defer.succeed("alice@example.test")
        return defer.fail(UnauthorizedLogin())


def test_remote_checker_and_worker_process_understand_each_other(pool, events):
    pool.checker = PasswordTable()
    main_end = WorkerProcess(pool, 1)
    main_end.makeConnection(FakeProcessTransport())
    worker_end = Link()

    right = outcome(worker_end.checker.requestAvatarId(credentials(b"alice", "p\u00e4ss".encode(), "192.0.2.1")))
    wrong = outcome(worker_end.checker.requestAvatarId(credentials(b"alice", b"guess", "192.0.2.1")))
    locked = outcome(worker_end.checker.requestAvatarId(credentials(b"alice", b"guess", "203.0.113.66")))
    main_end.outReceived(worker_end.transport.value())
    worker_end.link.dataReceived(b"".join(main_end.transport.written))

    assert right == ["alice@example.test"]
    assert failed_with(wrong, UnauthorizedLogin)
    assert failed_with(locked, LoginsRefused)
    assert serious(events) == []


# -- StderrLog -----------------------------------------------------------------------------------


def stderr_logger(stream) -> Logger:
    return Logger(namespace="mailgw.test", observer=StderrLog(stream))


def test_stderr_log_writes_one_level_tab_text_line_per_event():
    stream = io.StringIO()
    logger = stderr_logger(stream)
    logger.info("hello {who}", who="world")
    logger.warn("careful")
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert lines[0].startswith("info\t") and lines[0].endswith("hello world")
    assert lines[1].startswith("warn\t") and lines[1].endswith("careful")


def test_stderr_log_flattens_newlines_in_a_message():
    stream = io.StringIO()
    stderr_logger(stream).error("first\nsecond\r\nthird {x}", x="fourth\nfifth")
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.startswith("error\t")
    positions = [text.index(word) for word in ("first", "second", "third", "fourth", "fifth")]
    assert positions == sorted(positions)


def test_stderr_log_writes_a_failure_with_its_traceback_on_one_line():
    stream = io.StringIO()
    try:
        1 / 0
    except ZeroDivisionError:
        stderr_logger(stream).failure("it broke")
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert text.startswith("critical\t")
    assert "it broke" in text and "ZeroDivisionError" in text


def test_stderr_log_writes_nothing_for_an_event_without_text():
    stream = io.StringIO()
    StderrLog(stream)({})
    assert stream.getvalue() == ""


def test_stderr_log_event_without_a_level_is_info():
    stream = io.StringIO()
    StderrLog(stream)({"log_format": "no level"})
    assert stream.getvalue().startswith("info\t") and stream.getvalue().endswith("no level\n")


class BrokenStream:
    def __init__(self, error):
        self.error = error
        self.writes = 0

    def write(self, text):
        self.writes += 1
        raise self.error

    def flush(self):
        raise self.error


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), ValueError("I/O operation on closed file")])
def test_stderr_log_ignores_a_stream_that_is_gone(error):
    stream = BrokenStream(error)
    stderr_logger(stream).info("nobody listens")       # must not raise
    assert stream.writes == 1


def test_stderr_log_lines_are_relogged_by_the_main_process_at_the_same_level(worker, events):
    stream = io.StringIO()
    logger = stderr_logger(stream)
    logger.warn("queue {name} slow\nsecond line", name="relay")
    logger.debug("detail")
    worker.errReceived(stream.getvalue().encode("utf-8"))
    assert [event["log_level"] for event in events] == [LogLevel.warn, LogLevel.debug]
    assert "queue relay slow" in formatEvent(events[0]) and "second line" in formatEvent(events[0])
    assert formatEvent(events[1]).endswith("detail")
    assert {event["log_system"] for event in events} == {"smtp-worker-1"}


# -- mailgw.worker helpers -----------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [("relay=3:2", ("relay", 3, 2)), ("smtp-in=12:10", ("smtp-in", 12, 10))])
def test_parse_socket(text, parsed):
    assert parse_socket(text) == parsed


@pytest.mark.parametrize("text", ["relay=x:2", "relay=3", "relay"])
def test_parse_socket_rejects_malformed_text_with_value_error(text):
    with pytest.raises(ValueError):        # what argparse turns into a usage error
        parse_socket(text)


# -- worker.py: one worker woken per new connection ------------------------------------------------


def test_shared_listening_socket_is_registered_with_epollexclusive():
    """EPOLLEXCLUSIVE cannot be modified later (EINVAL): that is how the test
    sees the flag. Without it every worker wakes for every connection."""
    import errno
    import select
    import socket as socket_module

    from twisted.internet import epollreactor
    from twisted.internet.protocol import ServerFactory

    from mailgw.twisted_wall import accept_exclusively

    reactor = epollreactor.EPollReactor()
    listening = socket_module.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(5)
    listening.setblocking(False)
    try:
        port = reactor.adoptStreamPort(listening.fileno(), socket_module.AF_INET, ServerFactory())
        fd = port.fileno()
        reactor._poller.modify(fd, select.EPOLLIN)          # plain registration: modifiable
        assert accept_exclusively(reactor, port) is True
        with pytest.raises(OSError) as refused:
            reactor._poller.modify(fd, select.EPOLLIN)
        assert refused.value.errno == errno.EINVAL
        assert fd in reactor._reads
        port.stopListening()                                 # Twisted's unregister still works
        assert fd not in reactor._reads
    finally:
        listening.close()
        reactor._poller.close()


def test_accept_exclusively_leaves_other_reactors_alone():
    from twisted.internet.testing import MemoryReactor

    from mailgw.twisted_wall import accept_exclusively

    class Port:
        def fileno(self):
            return 7
    assert accept_exclusively(MemoryReactor(), Port()) is False


# -- held notices and log lines (one wake of the main process per FLUSH_DELAY, not per message) ----


def held_link():
    clock = task.Clock()
    link = MasterLink(clock=clock)
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport, clock


def test_notices_are_held_until_flush_delay_then_written_together():
    link, transport, clock = held_link()
    link.send("queued", ENVELOPE)
    link.send("delivered", ["alice@example.test"])
    assert transport.value() == b""
    clock.advance(workers.FLUSH_DELAY - 0.001)
    assert transport.value() == b""
    clock.advance(0.001)
    assert transport.value() == encode("queued", ENVELOPE) + encode("delivered", ["alice@example.test"])
    assert clock.getDelayedCalls() == []


def test_a_password_check_is_sent_at_once_with_the_held_notices_before_it():
    link, transport, clock = held_link()
    link.send("delivered", ["bob@example.test"])
    RemoteChecker(link).requestAvatarId(credentials())
    lines = transport.value().split(b"\n")[:-1]
    assert [decode(line)[0] for line in lines] == ["delivered", "auth"]
    assert clock.getDelayedCalls() == []          # nothing left to flush


def test_many_held_bytes_are_written_without_waiting():
    link, transport, clock = held_link()
    big = {"id": "X", "padding": "p" * workers.FLUSH_BYTES}
    link.send("queued", big)
    assert transport.value() == encode("queued", big)


def test_stdin_closing_writes_the_held_notices_before_the_pipe_closes():
    link, transport, clock = held_link()
    link.send("queued", ENVELOPE)
    link.readConnectionLost()
    assert transport.value() == encode("queued", ENVELOPE)
    assert transport.disconnecting


def test_held_log_lines_wait_for_flush_but_warnings_take_them_out_at_once():
    stream = io.StringIO()
    observer = StderrLog(stream, hold=True)
    logger = Logger(namespace="mailgw.test", observer=observer)
    logger.info("first")
    logger.info("second")
    assert stream.getvalue() == ""
    logger.warn("trouble")
    assert [line.split("\t")[0] for line in stream.getvalue().splitlines()] == ["info", "info", "warn"]
    logger.info("third")
    observer.flush()
    assert stream.getvalue().splitlines()[-1].endswith("third")


def test_a_spool_scan_does_not_take_up_an_entry_the_runner_just_finished():
    """Delivered, then discarded: the unlink runs in the I/O pool, so a scan in
    between still sees the files. The runner's `finished` ids keep it out."""
    runner = FakeRunner(finished=["DONE"])
    spool = FakeSpool({"DONE": envelope("DONE"), "NEW": envelope("NEW")})
    service = SMTPWorkers(reactor=None, clock=task.Clock(), count=0, config_path=None, sockets=(),
                          checker=None, runner=runner, spool=spool)
    service._adopt_unknown_entries()
    assert runner.added == [envelope("NEW")]
