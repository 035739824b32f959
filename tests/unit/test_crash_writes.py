"""Crash tests with real processes: SIGKILL a writer and recover.

A child process runs the real reactor, a real ThreadPool and the real
DurableWriter/Spool/MaildirStore, and prints "COMMITTED ..." only after the
Deferred fired (the moment the SMTP server would answer 250). The parent kills
it with SIGKILL right after reading such a line, then recovers and checks that
every committed message is complete and that recovery returns nothing
half-written. (The page cache survives SIGKILL, so this exercises the commit
protocol and recovery, not the fsyncs; those are covered by the recorded call
orders in test_durable/test_spool.)

Every message carries its own digest, so a reader can tell a complete message
from a torn one without knowing what the child meant to write.
"""
from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.logger import Logger

from mailgw.durable import DurableWriter
from mailgw.queue.spool import Spool
from threadless import ImmediatePool

REPO = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 60.0

CHILD = r"""
import hashlib, os, random, sys
from pathlib import Path
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from mailgw.durable import DurableWriter
from mailgw.queue.envelope import Envelope
from mailgw.queue.spool import Spool, new_queue_id
from mailgw.store.maildir import MaildirStore

mode, base = sys.argv[1], Path(sys.argv[2])
total, in_flight, seed = map(int, sys.argv[3:6])
rng = random.Random(seed)
pool = ThreadPool(minthreads=4, maxthreads=8, name="crash-child")
pool.start()
writer = DurableWriter(reactor=reactor, threadpool=pool)
spool = Spool(base / "queue", writer=writer, reactor=reactor)
store = MaildirStore(base / "mail", writer=writer, hostname="crash.test")

def make_message(n):
    size = rng.choice([10, 1000, 60_000, 300_000])
    body = b"".join(b"line %d of message %d\r\n" % (i, n) for i in range(size // 20 + 1))
    return b"X-Digest: " + hashlib.sha256(body).hexdigest().encode() + b"\r\n" + body

def report(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

def enqueue(n):
    message = make_message(n)
    queue_id = new_queue_id(reactor.seconds())
    envelope = {
        "version": 1, "id": queue_id, "arrival": reactor.seconds(), "sender": "a@example.org",
        "sender_utf8": False, "body": "8BITMIME", "size": len(message), "envid": None, "ret": None,
        "client": {"ip": "127.0.0.1", "helo": "t", "tls": False, "auth": None, "listener": "relay"},
        "recipients": [{"address": "b@example.net", "orcpt": None, "notify": None,
                        "state": "pending", "attempts": 0, "last_reply": None}],
        "attempts": 0, "next_attempt": reactor.seconds(), "history": [],
    }
    return spool.enqueue(queue_id, Envelope.from_json(envelope), message).addCallback(lambda q: "COMMITTED " + q)

def deliver(n):
    d = store.deliver(["alice@example.org", "bob@example.org"], make_message(n))
    return d.addCallback(lambda paths: "COMMITTED " + " ".join(map(str, paths)))

started = 0
def next_one(_=None):
    global started
    if started >= total:
        return
    started += 1
    d = (enqueue if mode == "spool" else deliver)(started)
    d.addCallback(report)
    d.addErrback(lambda f: report("FAILED " + f.getErrorMessage()))
    d.addCallback(next_one)

def start():
    for _ in range(in_flight):
        next_one()
    report("READY")

reactor.callWhenRunning(start)
reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
reactor.run()  # runs until killed: the parent always kills
"""


class Child:
    def __init__(self, tmp_path, mode, total, in_flight, seed):
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, str(script), mode, str(tmp_path / "data"), *map(str, (total, in_flight, seed))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(REPO),
            env=env,
        )
        self._buffer = b""
        self.deadline = time.monotonic() + WAIT_SECONDS

    def read_line(self) -> str:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                pytest.fail("child did not report in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.kill()
                    pytest.fail("child exited: " + self.process.stderr.read().decode(errors="replace"))
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def committed(self, count: int) -> list[str]:
        lines = []
        while len(lines) < count:
            line = self.read_line()
            if line == "READY":
                continue
            assert line.startswith("COMMITTED "), line
            lines.append(line.split(" ", 1)[1])
        return lines

    def kill(self):
        # Only the child we started, by its pid.
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WAIT_SECONDS)
        self.process.stdout.close()
        self.process.stderr.close()


def is_complete(message: bytes) -> bool:
    """Complete = the body matches the X-Digest header (CRLF or LF form)."""
    header, _, body = message.partition(b"\n")
    digest = header.rstrip(b"\r").removeprefix(b"X-Digest: ")
    crlf_body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return hashlib.sha256(crlf_body).hexdigest().encode() == digest


class ImmediateReactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def seconds(self):
        return time.time()


def recovering_spool(tmp_path):
    reactor = ImmediateReactor()
    writer = DurableWriter(reactor=reactor, threadpool=ImmediatePool())
    spool = Spool(tmp_path / "data" / "queue", writer=writer, reactor=reactor)
    spool.errors = []
    spool.log = Logger(observer=lambda e: spool.errors.append(e) if e["log_level"].name == "error" else None)
    return spool


def check_spool_after_crash(tmp_path, committed: list[str]):
    spool = recovering_spool(tmp_path)
    recovered = spool.recover()
    recovered_ids = [envelope.id for envelope in recovered]
    assert set(committed) <= set(recovered_ids), "a committed message was lost"
    for envelope in recovered:  # nothing half-written comes back
        _, msg_path = spool.load(envelope.id)
        message = msg_path.read_bytes()
        assert len(message) == envelope.size and is_complete(message), envelope.id
    assert list(spool.incoming.iterdir()) == []
    names = os.listdir(spool.active)
    assert sorted(names) == sorted(f"{i}.{s}" for i in recovered_ids for s in ("msg", "env"))
    # A SIGKILL cannot tear our commit protocol: nothing may look corrupt.
    assert spool.errors == [] and list(spool.corrupt.iterdir()) == []
    return recovered_ids


def test_sigkill_right_after_commit_keeps_the_message(tmp_path):
    child = Child(tmp_path, "spool", total=1, in_flight=1, seed=1)
    try:
        [queue_id] = child.committed(1)
    finally:
        child.kill()
    assert check_spool_after_crash(tmp_path, [queue_id]) == [queue_id]


@pytest.mark.parametrize("iteration", range(20))
def test_sigkill_at_random_points_loses_nothing_committed(tmp_path, iteration):
    rng = random.Random(iteration)
    child = Child(tmp_path, "spool", total=10_000, in_flight=8, seed=iteration)
    try:
        committed = child.committed(rng.randint(1, 25))
    finally:
        child.kill()
    check_spool_after_crash(tmp_path, committed)


@pytest.mark.parametrize("iteration", range(3))
def test_sigkill_during_maildir_deliveries_keeps_committed_files_complete(tmp_path, iteration):
    rng = random.Random(1000 + iteration)
    child = Child(tmp_path, "maildir", total=10_000, in_flight=8, seed=iteration)
    try:
        committed = child.committed(rng.randint(1, 25))
    finally:
        child.kill()
    for line in committed:
        paths = [Path(p) for p in line.split()]
        assert len(paths) == 2
        for path in paths:
            data = path.read_bytes()
            assert is_complete(data) and b"\r\n" not in data
            size = int(path.name.split(",S=")[1].split(",")[0])
            assert size == len(data)
    # Whatever is in new/ is complete: a torn file can only be in tmp/.
    for new in (tmp_path / "data" / "mail").glob("*/*/new"):
        for path in new.iterdir():
            assert is_complete(path.read_bytes()), path
