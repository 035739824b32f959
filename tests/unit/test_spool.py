"""Spool: commit order (.msg before .env), queue ids, recovery after a crash."""
from __future__ import annotations

import dataclasses
import errno
import json
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from mailgw.durable import DurableWriter
from mailgw.errors import StorageFull
from mailgw.interfaces import ISpool
from mailgw.queue.envelope import Envelope, EnvelopeClient
from mailgw.queue.spool import EnvelopeError, Spool, is_queue_id, new_queue_id

try:  # the fakes live with the writer's tests (rootdir-relative import, or tests as a package)
    from test_durable import RecordingOS, result_of
except ImportError:  # pragma: no cover
    from tests.unit.test_durable import RecordingOS, result_of
from threadless import ImmediatePool, ThreadlessClock

MESSAGE = b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n"
CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def envelope_for(queue_id, message=MESSAGE, **changes):
    envelope = {
        "version": 1,
        "id": queue_id,
        "arrival": 1700000000.25,
        "sender": "alice@example.org",
        "sender_utf8": False,
        "body": "8BITMIME",
        "size": len(message),
        "envid": None,
        "ret": None,
        "client": {"ip": "192.0.2.1", "helo": "client.example", "tls": True, "auth": "alice@example.org",
                   "listener": "submission"},
        "recipients": [
            {"address": "bob@example.net", "orcpt": "rfc822;bob@example.net", "notify": ["FAILURE"],
             "state": "pending", "attempts": 0, "last_reply": None},
        ],
        "attempts": 0,
        "next_attempt": 1700000000.25,
        "history": [],
    }
    envelope.update(changes)
    return envelope


class Env:
    def __init__(self, tmp_path):
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.writer = DurableWriter(reactor=ThreadlessClock(), threadpool=ImmediatePool())
        self.writer._os = RecordingOS()
        self.writer.log = Logger(observer=lambda event: None)
        self.events = []
        self.spool = Spool(tmp_path / "queue", writer=self.writer, reactor=self.clock)
        self.spool.log = Logger(observer=self.events.append)

    def enqueue(self, message=MESSAGE, **changes):
        queue_id = self.spool.new_id()
        envelope = Envelope.from_json(envelope_for(queue_id, message, **changes))
        result = result_of(self.spool.enqueue(queue_id, envelope, message))
        assert result == queue_id
        return queue_id


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_provides_the_interface(env):
    assert verifyObject(ISpool, env.spool)


def test_enqueue_writes_msg_and_env_into_active(env):
    queue_id = env.enqueue()
    spool = env.spool
    assert (spool.active / f"{queue_id}.msg").read_bytes() == MESSAGE
    assert json.loads((spool.active / f"{queue_id}.env").read_bytes()) == envelope_for(queue_id)
    assert list(spool.incoming.iterdir()) == []
    assert spool.ids() == [queue_id]
    envelope, msg_path = spool.load(queue_id)
    assert envelope.to_json() == envelope_for(queue_id) and msg_path.read_bytes() == MESSAGE


def test_env_appears_only_after_the_msg_is_on_disk(env):
    queue_id = env.enqueue()
    spool = env.spool
    calls = [c for c in env.writer._os.calls if c[0] in ("fsynced", "move")]
    assert calls == [
        ("fsynced", spool.incoming / f"{queue_id}.msg"),
        ("move", spool.active / f"{queue_id}.msg"),
        ("fsynced", spool.incoming / f"{queue_id}.env"),
        ("move", spool.active / f"{queue_id}.env"),   # the commit point...
        ("fsynced", spool.active),                     # ...made durable: now 250
    ]


def test_utf8_envelope(env):
    queue_id = env.enqueue(sender="jösé@exämple.org", sender_utf8=True)
    raw = (env.spool.active / f"{queue_id}.env").read_bytes()
    assert "jösé@exämple.org".encode() in raw
    assert env.spool.load(queue_id)[0].sender == "jösé@exämple.org"


def typed(queue_id, **changes):
    """The Envelope of envelope_for(queue_id), then attributes changed."""
    envelope = Envelope.from_json(envelope_for("0123456789ABCDEF"))
    envelope.id = queue_id
    return dataclasses.replace(envelope, **changes)


@pytest.mark.parametrize(
    "change",
    [
        {"size": 1},
        {"body": "BINARYMIME"},
        {"recipients": []},
        {"arrival": float("nan")},
        {"client": EnvelopeClient("192.0.2.1", None, "yes", None, "smtp")},
        {"client": {"ip": "192.0.2.1"}},
        {"id": "0" * 16},
    ],
    ids=lambda c: next(iter(c)),
)
def test_invalid_envelopes_are_refused_and_nothing_is_written(env, change):
    queue_id = env.spool.new_id()
    result_of(env.spool.enqueue(queue_id, typed(queue_id, **change), MESSAGE)).trap(ValueError)
    assert list(env.spool.active.iterdir()) == [] and list(env.spool.incoming.iterdir()) == []


def test_only_an_envelope_is_enqueued(env):
    queue_id = env.spool.new_id()
    result_of(env.spool.enqueue(queue_id, envelope_for(queue_id), MESSAGE)).trap(TypeError)
    assert list(env.spool.active.iterdir()) == []


@pytest.mark.parametrize(
    "queue_id", ["", "short", "0123456789ABCDEI", "../../etc/passwd", "0123456789ABCDE.", "0123456789abcdef", None]
)
def test_invalid_ids_are_refused(env, queue_id):
    result_of(env.spool.enqueue(queue_id, typed(queue_id), MESSAGE)).trap(ValueError)
    assert list(env.spool.active.iterdir()) == []


def test_disk_full_fails_with_storage_full_and_leaves_nothing(env):
    env.writer._os.fail("fsync", lambda p: p.suffix == ".env", errno.ENOSPC)
    queue_id = env.spool.new_id()
    result_of(env.spool.enqueue(queue_id, typed(queue_id), MESSAGE)).trap(StorageFull)
    assert list(env.spool.active.iterdir()) == [] and list(env.spool.incoming.iterdir()) == []


# -- queue ids -----------------------------------------------------------------


def test_queue_id_shape():
    queue_id = new_queue_id(time.time())
    assert len(queue_id) == 16 and set(queue_id) <= CROCKFORD
    assert "/" not in queue_id and "." not in queue_id
    assert is_queue_id(queue_id)


def test_queue_id_starts_with_the_millisecond_timestamp():
    now = 1700000000.123
    digits = new_queue_id(now)[:10]  # 50 bits; the timestamp is the low 48
    value = 0
    for ch in digits:
        value = value * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(ch)
    assert value >> 2 == int(now * 1000)


def test_queue_ids_sort_by_time():
    times = [1700000000 + i * 0.37 for i in range(500)]
    ids = [new_queue_id(t) for t in reversed(times)]
    assert sorted(ids) == list(reversed(ids))


def test_queue_ids_unique_over_100000_calls():
    ids = [new_queue_id(time.time()) for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # monotonic within the process, even inside one millisecond


def test_queue_ids_unique_with_a_frozen_clock():
    ids = [new_queue_id(1700000000.0) for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


# -- recovery -------------------------------------------------------------------


def errors(env):
    return [e for e in env.events if e["log_level"].name == "error"]


def test_recover_returns_committed_entries_oldest_first(env):
    first = env.enqueue()
    env.clock.advance(1)
    second = env.enqueue()
    recovered = env.spool.recover()
    assert [e.id for e in recovered] == [first, second]
    assert recovered[0].to_json() == envelope_for(first)
    assert errors(env) == []


def test_recover_clears_incoming(env):
    (env.spool.incoming / "01ABCDEFGHJKMNPQ.msg").write_bytes(b"half")
    (env.spool.incoming / "junk").write_bytes(b"x")
    (env.spool.incoming / "subdir").mkdir()
    assert env.spool.recover() == []
    assert list(env.spool.incoming.iterdir()) == []


def test_recover_deletes_a_msg_without_env(env):
    queue_id = env.enqueue()
    (env.spool.active / f"{queue_id}.env").unlink()
    assert env.spool.recover() == []
    assert list(env.spool.active.iterdir()) == []
    assert list(env.spool.corrupt.iterdir()) == []


def corrupt_and_recover(env, mutate):
    good = env.enqueue()
    bad = env.enqueue()
    mutate(env.spool.active / f"{bad}.env", env.spool.active / f"{bad}.msg", bad)
    recovered = env.spool.recover()
    assert [e.id for e in recovered] == [good]
    [error] = errors(env)
    assert bad in str(error["names"])
    return bad


def test_recover_moves_garbage_env_to_corrupt(env):
    bad = corrupt_and_recover(env, lambda e, m, i: e.write_bytes(b"{not json"))
    assert sorted(p.name for p in env.spool.corrupt.iterdir()) == [f"{bad}.env", f"{bad}.msg"]
    assert not (env.spool.active / f"{bad}.msg").exists()


def test_recover_moves_non_utf8_env_to_corrupt(env):
    corrupt_and_recover(env, lambda e, m, i: e.write_bytes(b"\xff\xfe"))


def test_recover_moves_unknown_version_to_corrupt(env):
    def future(e, m, queue_id):
        e.write_text(json.dumps(envelope_for(queue_id, version=2)))
    bad = corrupt_and_recover(env, future)
    assert "version" in errors(env)[0]["reason"]
    assert (env.spool.corrupt / f"{bad}.env").exists()


def test_recover_moves_env_lacking_keys_to_corrupt(env):
    def strip(e, m, queue_id):
        envelope = envelope_for(queue_id)
        del envelope["recipients"]
        e.write_text(json.dumps(envelope))
    corrupt_and_recover(env, strip)


def test_recover_moves_env_without_msg_to_corrupt(env):
    bad = corrupt_and_recover(env, lambda e, m, i: m.unlink())
    assert [p.name for p in env.spool.corrupt.iterdir()] == [f"{bad}.env"]


def test_recover_moves_truncated_msg_to_corrupt(env):
    corrupt_and_recover(env, lambda e, m, i: m.write_bytes(MESSAGE[:5]))


def test_recover_moves_env_with_another_id_to_corrupt(env):
    def swap(e, m, queue_id):
        e.write_text(json.dumps(envelope_for("0" * 16)))
    corrupt_and_recover(env, swap)


def test_recover_moves_stray_files_to_corrupt_and_keeps_older_corrupt_entries(env):
    (env.spool.corrupt / "stray").write_bytes(b"older")
    (env.spool.active / "stray").write_bytes(b"newer")
    assert env.spool.recover() == []
    assert (env.spool.corrupt / "stray").read_bytes() == b"older"
    assert (env.spool.corrupt / "stray.1").read_bytes() == b"newer"
    assert len(errors(env)) == 1


def test_recover_is_idempotent(env):
    queue_id = env.enqueue()
    (env.spool.active / "stray").write_bytes(b"x")
    first = env.spool.recover()
    assert env.spool.recover() == first == [Envelope.from_json(envelope_for(queue_id))]


def test_load_unknown_and_corrupt(env):
    with pytest.raises(KeyError):
        env.spool.load("0123456789ABCDEF")
    queue_id = env.enqueue()
    (env.spool.active / f"{queue_id}.msg").unlink()
    with pytest.raises(EnvelopeError):
        env.spool.load(queue_id)
    with pytest.raises(ValueError):
        env.spool.load("../x")


def test_unknown_keys_are_ignored_and_kept(env):
    queue_id = env.enqueue(extra_field_of_a_later_release=1)
    assert env.spool.load(queue_id)[0].to_json() == envelope_for(queue_id, extra_field_of_a_later_release=1)


def test_discard_uncommits_env_first(env):
    queue_id = env.enqueue()
    env.writer._os.calls.clear()
    result_of(env.spool.discard(queue_id))
    unlinks = [path.name for op, path in env.writer._os.calls if op == "unlink"]
    assert unlinks == [f"{queue_id}.env", f"{queue_id}.msg"]
    assert env.spool.ids() == [] and list(env.spool.active.iterdir()) == []
    result_of(env.spool.discard("../etc")).trap(ValueError)


# -- envelope updates (the runner's per-recipient state) --------------------------

def test_update_replaces_the_envelope_durably(env):
    queue_id = env.enqueue()
    envelope, _ = env.spool.load(queue_id)
    envelope.recipients[0].state = "sent"
    envelope.attempts = 1
    assert result_of(env.spool.update(envelope)) == queue_id
    assert env.spool.load(queue_id)[0].recipients[0].state == "sent"
    assert list(env.spool.incoming.iterdir()) == []
    calls = env.writer._os.calls
    start = max(i for i, (op, path) in enumerate(calls) if op == "open" and path.parent == env.spool.incoming)
    # Written and fsynced aside, renamed over the old one, then the directory is synced.
    assert [op for op, _ in calls[start:]] == ["open", "write", "fsync", "fsynced", "close", "rename", "open", "fsync", "fsynced", "close"]
    assert calls[start + 5][1] == env.spool.active / (queue_id + ".env")
    assert calls[start + 7][1] == env.spool.active


def test_update_on_a_full_disk_keeps_the_old_envelope(env):
    queue_id = env.enqueue()
    envelope, _ = env.spool.load(queue_id)
    envelope.attempts = 7
    env.writer._os.fail("write", lambda p: ".env" in p.name, errno.ENOSPC)
    result_of(env.spool.update(envelope)).trap(StorageFull)
    assert env.spool.load(queue_id)[0].attempts == 0
    assert list(env.spool.incoming.iterdir()) == []


def test_update_refuses_an_invalid_envelope(env):
    queue_id = env.enqueue()
    envelope, _ = env.spool.load(queue_id)
    envelope.recipients = []
    result_of(env.spool.update(envelope)).trap(EnvelopeError)
    assert env.spool.load(queue_id)[0].recipients


def test_message_reader_reads_in_the_pool_and_fails_as_a_deferred(tmp_path):
    from threadless import ImmediatePool, ThreadlessClock
    from mailgw.queue.spool import message_reader
    message = tmp_path / "a.msg"
    message.write_bytes(b"x" * 3_000_000)                          # more than one read(2)
    pool = ImmediatePool()
    read = message_reader(ThreadlessClock(), pool)
    assert read(message).result == b"x" * 3_000_000 and pool.jobs == 1
    missing = read(tmp_path / "gone.msg")
    missing.addErrback(lambda f: f.trap(FileNotFoundError) and "failed")
    assert missing.result == "failed" and pool.jobs == 2
