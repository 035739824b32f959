"""Issue 23: control commands (hold, release, flush, bounce, delete) issued
while the runner records an attempt of the same entry. Before the fix two
envelope updates of one entry shared the tmp name `incoming/ID.env`: the
second failed with FileExistsError (logged as critical), the attempt was
not recorded, and a later write could land before an earlier one.

The real DurableWriter runs on a pool whose jobs wait until the test runs
them; its rename(2) first runs every other queued job, which is how a second
pool thread would interleave its write between this one's fsync and rename.
"""
from __future__ import annotations

import dataclasses

import pytest
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mailgw.queue.model import STATUS_DEFERRED
from test_runner import Rig, dsn_fields


class InterleavingPool:
    joined = False

    def __init__(self):
        self.jobs = []

    def callInThread(self, f, *args, **kwargs):
        self.jobs.append(lambda: f(*args, **kwargs))

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        def job():
            try:
                result = f(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)
        self.jobs.append(job)

    def drain(self):
        while self.jobs:
            self.jobs.pop(0)()


@pytest.fixture
def errors():
    seen = []

    def observer(event):
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            seen.append(event)
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def interleaving_rig(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [3600]})
    writer = rig.spool._writer
    pool = InterleavingPool()
    writer._pool = pool
    rename = writer._os.rename

    def interleaved_rename(source, destination):
        pool.drain()          # another thread's queued write goes first
        rename(source, destination)
    writer._os.rename = interleaved_rename
    return rig, pool


def fired(d, results):
    d.addCallbacks(lambda value: results.append(("ok", value)), lambda failure: results.append(("failed", failure)))


def on_disk(rig, queue_id):
    return rig.spool.load(queue_id)[0]


def test_hold_then_release_at_once_both_land_in_order(tmp_path, errors):
    rig, pool = interleaving_rig(tmp_path)
    rig.transport.default = STATUS_DEFERRED
    queue_id = rig.enqueue()
    pool.drain()
    rig.run()
    pool.drain()
    assert on_disk(rig, queue_id).attempts == 1

    results = []
    for command in ("hold", "release", "hold", "release"):
        fired(getattr(rig.runner, command)(queue_id), results)
    pool.drain()

    assert results == [("ok", queue_id)] * 4
    assert errors == []
    assert on_disk(rig, queue_id).hold is False      # the last one asked for
    assert rig.runner.envelopes[queue_id].hold is False
    assert list(rig.spool.incoming.iterdir()) == []


def test_commands_during_an_attempt_are_all_recorded(tmp_path, errors):
    rig, pool = interleaving_rig(tmp_path)
    rig.transport.default = STATUS_DEFERRED
    queue_id = rig.enqueue()
    pool.drain()
    rig.run()
    pool.drain()
    rig.transport.hold = True                      # the next attempt waits for the test
    rig.runner.flush([queue_id])
    rig.run()
    assert len(rig.transport.held) == 1

    results = []
    fired(rig.runner.hold(queue_id), results)
    fired(rig.runner.release(queue_id), results)
    rig.runner.flush([queue_id])
    fired(rig.runner.bounce(queue_id), results)
    d, result = rig.transport.held.pop()
    d.callback(result)                            # the attempt completes: its update, then the commands
    pool.drain()
    rig.run()
    pool.drain()

    assert results == [("ok", queue_id)] * 3
    assert errors == []
    assert rig.runner.counters["deferred"] == 2   # both attempts recorded
    assert queue_id not in rig.queued_ids()      # the bounce won, last
    (report,) = rig.inbox()
    _, (per_recipient,) = dsn_fields(report)
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.0.0"      # CANCELLED, not the attempt's 4.3.0
    assert list(rig.spool.incoming.iterdir()) == []


def test_a_discard_waits_for_the_update_in_flight(tmp_path, errors):
    """A delete issued while an update is being written: the update must not
    land after the removal and bring back an envelope with no message."""
    rig, pool = interleaving_rig(tmp_path)
    rig.transport.default = STATUS_DEFERRED
    queue_id = rig.enqueue()
    pool.drain()
    rig.run()
    pool.drain()
    results = []
    fired(rig.runner.hold(queue_id), results)
    fired(rig.runner.delete(queue_id), results)
    pool.drain()
    assert [r[0] for r in results] == ["ok", "ok"]
    assert not (rig.spool.active / f"{queue_id}.env").exists()
    assert not (rig.spool.active / f"{queue_id}.msg").exists()
    assert errors == []


def test_spool_updates_of_one_entry_are_merged_and_ordered(tmp_path):
    rig, pool = interleaving_rig(tmp_path)
    queue_id = rig.enqueue()
    pool.drain()
    envelope = on_disk(rig, queue_id)
    results = []
    for attempts in (1, 2, 3):
        fired(rig.spool.update(dataclasses.replace(envelope, attempts=attempts)), results)
    fired(rig.spool.discard(queue_id), results)
    late = []
    fired(rig.spool.update(dataclasses.replace(envelope, attempts=4)), late)
    pool.drain()
    assert results == [("ok", queue_id)] * 3 + [("ok", None)]
    (outcome,) = late
    assert outcome[0] == "failed" and outcome[1].check(KeyError)
    assert rig.spool.ids() == []


def test_replacements_of_one_name_have_their_own_tmp_files(tmp_path):
    """The writer itself: overlapping replace() calls never share a tmp file."""
    rig, pool = interleaving_rig(tmp_path)
    writer = rig.spool._writer
    target = rig.spool.active
    results = []
    for data in (b"one\n", b"two\n", b"three\n"):
        fired(writer.replace(target, rig.spool.incoming, "x.env", data), results)
    pool.drain()
    assert [r[0] for r in results] == ["ok"] * 3
    assert (target / "x.env").read_bytes() in (b"one\n", b"two\n", b"three\n")
    assert list(rig.spool.incoming.iterdir()) == []
