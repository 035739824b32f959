"""Junk that learns (mailgw/spam/learning.py): what teaches spam or ham, the
learner's bounds, and the IMAP commands that feed it (COPY, MOVE, STORE
$Junk/$NotJunk) without waiting for it. rspamd is a fake learn client whose
Deferreds the test fires; the IMAP session runs on StringTransport."""
from __future__ import annotations

import pytest
from twisted.internet import defer

from imap_harness import SIMPLE, IMAPSession
from mailgw.spam import learning
from mailgw.spam.learning import HAM, SPAM, JunkLearner
from mailgw.spam.rspamd import RspamdUnavailable


class FakeLearnClient:
    """RspamdClient.learn; each call's Deferred waits in `calls` until the test answers."""

    def __init__(self, answer_now: str | None = None):
        self.calls: list[tuple[str, bytes, str | None, defer.Deferred]] = []
        self.answer_now = answer_now

    def learn(self, kind, message, *, user=None):
        d = defer.Deferred()
        self.calls.append((kind, message, user, d))
        if self.answer_now is not None:
            d.callback(self.answer_now)
        return d


class Folder:
    def __init__(self, name, messages):
        self.name = name
        self.messages = dict(messages)
        self.syncs = 0

    def open(self, uid):
        if uid not in self.messages:
            return defer.fail(KeyError(uid))
        return defer.succeed(self.messages[uid])

    def sync(self):
        self.syncs += 1
        return defer.succeed(None)


# -- what teaches what --------------------------------------------------------

@pytest.mark.parametrize("source, target, expected", [
    ("INBOX", "Junk", SPAM), ("Archive", "Junk", SPAM), ("Junk", "INBOX", HAM), ("Junk", "Archive", HAM),
    ("Junk", "Trash", None), ("Junk", "Junk", None), ("INBOX", "Trash", None), ("INBOX", "Archive", None),
])
def test_copy_verdicts(source, target, expected):
    assert learning.copy_verdict(source, target, junk="Junk") == expected


@pytest.mark.parametrize("flags, mode, expected", [
    (["$Junk"], "add", SPAM), (["$JUNK", "\\Seen"], "replace", SPAM), (["$NotJunk"], "add", HAM),
    (["$notjunk"], "replace", HAM), (["$Junk"], "remove", None), (["$NotJunk"], "remove", None),
    (["$Junk", "$NotJunk"], "add", None), (["\\Seen"], "add", None), ([], "replace", None),
])
def test_flag_verdicts(flags, mode, expected):
    assert learning.flag_verdict(flags, mode) == expected


# -- the learner ----------------------------------------------------------------

def test_at_most_concurrency_learns_run_and_the_rest_wait_in_order():
    client = FakeLearnClient()
    learner = JunkLearner(client, concurrency=2, backlog=100)
    folder = Folder("Junk", {uid: b"message %d" % uid for uid in range(1, 6)})
    learner.submit(SPAM, folder, [1, 2, 3, 4, 5], "alice@example.test")
    assert [c[1] for c in client.calls] == [b"message 1", b"message 2"]
    assert learner.pending == 5
    idle = learner.idle()
    for index in range(5):
        client.calls[index][3].callback("learned")
    assert [c[1] for c in client.calls] == [b"message %d" % uid for uid in range(1, 6)]
    assert {c[0] for c in client.calls} == {SPAM} and {c[2] for c in client.calls} == {"alice@example.test"}
    assert idle.called and learner.pending == 0
    assert (learner.submitted, learner.learned, learner.failed) == (5, 5, 0)


def test_the_backlog_is_bounded_and_overflow_is_counted():
    client = FakeLearnClient()
    learner = JunkLearner(client, concurrency=1, backlog=3)
    folder = Folder("Junk", {uid: b"m" for uid in range(1, 11)})
    learner.submit(SPAM, folder, range(1, 11), None)
    # Three pending at most (one running, two waiting): the other seven are dropped.
    assert (len(client.calls), learner.pending, learner.dropped, learner.submitted) == (1, 3, 7, 3)


def test_failures_gone_messages_and_known_ones_are_counted_and_the_queue_goes_on():
    client = FakeLearnClient()
    learner = JunkLearner(client, concurrency=1, backlog=10)
    folder = Folder("Junk", {1: b"one", 3: b"three", 4: b"four"})
    learner.submit(HAM, folder, [1, 2, 3, 4], None)
    client.calls[0][3].errback(RspamdUnavailable("HTTP 500"))
    # UID 2 is gone (the folder is synced once, then it is skipped).
    assert folder.syncs == 1
    client.calls[1][3].callback("known")
    client.calls[2][3].callback("learned")
    assert (learner.failed, learner.gone, learner.known, learner.learned, learner.pending) == (1, 1, 1, 1, 0)


def test_build_learner_needs_a_controller_and_learn():
    import dataclasses

    from test_spam_stage import SPAM as SPAM_CONFIG

    class Config:
        spam = dataclasses.replace(SPAM_CONFIG, controller_url="http://127.0.0.1:11334", learn=True)
    assert isinstance(learning.build_learner(Config, FakeLearnClient()), JunkLearner)
    assert learning.build_learner(Config, None) is None
    Config.spam = dataclasses.replace(Config.spam, learn=False)
    assert learning.build_learner(Config, FakeLearnClient()) is None


# -- over IMAP ----------------------------------------------------------------------

def imap_with(messages=3, folder="INBOX"):
    client = FakeLearnClient()
    learner = JunkLearner(client, concurrency=8, backlog=100)
    session = IMAPSession(learner=learner)
    box = session.store.mailbox("alice@example.test")
    for index in range(messages):
        box.get(folder).add(SIMPLE.replace(b"Hello there", b"Hello %d" % index))
    session.login()
    return session, client, box


def test_moving_mail_into_junk_learns_it_as_spam_after_the_reply():
    session, client, box = imap_with()
    session.select("INBOX")
    lines = session.run("MOVE 1:2 Junk")
    assert lines[-1].endswith("OK MOVE completed")
    # The reply went out while both learns are still in flight.
    assert len(client.calls) == 2 and not any(c[3].called for c in client.calls)
    assert {c[0] for c in client.calls} == {SPAM}
    assert b"Hello 0" in client.calls[0][1] and b"Hello 1" in client.calls[1][1]
    assert {c[2] for c in client.calls} == {"alice@example.test"}


def test_copying_into_junk_learns_spam_and_moving_out_learns_ham_but_trash_learns_nothing():
    session, client, box = imap_with(messages=2, folder="Junk")
    session.select("Junk")
    session.run("MOVE 1 INBOX")
    assert [c[0] for c in client.calls] == [HAM]
    session.run("MOVE 1 Trash")
    assert len(client.calls) == 1
    session.select("INBOX")
    session.run("COPY 1 Junk")
    assert [c[0] for c in client.calls] == [HAM, SPAM]
    session.run("COPY 1 Archive", expect="NO")          # no such folder: nothing learned
    assert len(client.calls) == 2


def test_junk_keywords_teach_and_removing_them_does_not():
    session, client, _ = imap_with()
    session.select("INBOX")
    session.run("STORE 1 +FLAGS ($Junk)")
    session.run("STORE 2 +FLAGS.SILENT ($NotJunk)")
    session.run("STORE 1 -FLAGS ($Junk)")
    session.run("STORE 3 +FLAGS (\\Seen)")
    assert [c[0] for c in client.calls] == [SPAM, HAM]
    assert b"Hello 0" in client.calls[0][1] and b"Hello 1" in client.calls[1][1]


def test_without_a_learner_junk_moves_just_work():
    session = IMAPSession()
    session.store.mailbox("alice@example.test").get("INBOX").add(SIMPLE)
    session.login()
    session.select("INBOX")
    assert session.run("MOVE 1 Junk")[-1].endswith("OK MOVE completed")
