"""Junk that learns: what a user does with mail over IMAP teaches rspamd.

A message copied or moved into the Junk folder, or given the keyword $Junk,
is spam; one moved out of Junk (anywhere but Trash: deleting junk says
nothing about it), or given $NotJunk, is ham (the keywords of RFC 9051
§2.3.2 and the IANA IMAP keyword registry, which Thunderbird and Apple Mail
set). `JunkLearner` reads each message from the store and posts it to
rspamd's controller in the background, a bounded number at once, with a
bounded backlog (what does not fit is dropped and counted): the IMAP reply
never waits for it and a slow rspamd never grows memory without bound.
"""
from __future__ import annotations

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.spam.rspamd import RspamdUnavailable

SPAM, HAM = "spam", "ham"
JUNK_KEYWORD, NOT_JUNK_KEYWORD = "$junk", "$notjunk"      # compared case-insensitively (RFC 9051 §2.3.2)
TRASH = "Trash"


def copy_verdict(source: str, target: str, *, junk: str, trash: str = TRASH) -> str | None:
    """What a COPY or MOVE from folder `source` to `target` teaches, if anything."""
    if target == junk and source != junk:
        return SPAM
    if source == junk and target not in (junk, trash):
        return HAM
    return None


def flag_verdict(flags, mode: str) -> str | None:
    """What a STORE of `flags` in `mode` ("add", "replace", "remove") teaches."""
    if mode == "remove":
        # Taking $Junk away is not the same as saying $NotJunk.
        return None
    names = {str(flag).lower() for flag in flags}
    if JUNK_KEYWORD in names and NOT_JUNK_KEYWORD not in names:
        return SPAM
    if NOT_JUNK_KEYWORD in names and JUNK_KEYWORD not in names:
        return HAM
    return None


class JunkLearner:
    """`submit(kind, folder, uids, user)`: learn those messages, later.
    `client` is a RspamdClient (its `learn`)."""

    log = Logger()

    def __init__(self, client, *, concurrency: int = 2, backlog: int = 10000):
        self.client = client
        self.concurrency = concurrency
        self.backlog = backlog
        self._waiting: deque = deque()
        self._running = 0
        self._idle_waiters: list[defer.Deferred] = []
        # For metrics and tests.
        self.submitted = 0
        self.learned = 0
        self.known = 0          # rspamd had learned it already
        self.failed = 0
        self.dropped = 0        # over the backlog
        self.gone = 0           # expunged before it was read

    def submit(self, kind: str, folder, uids, user: str | None) -> None:
        for uid in uids:
            if self.pending >= self.backlog:
                self.dropped += 1
                continue
            self.submitted += 1
            self._waiting.append((kind, folder, uid, user))
        if self.dropped and self.pending >= self.backlog:
            self.log.warn("junk learning: backlog of {backlog} full, {dropped} learns dropped so far",
                          backlog=self.backlog, dropped=self.dropped)
        self._pump()

    @property
    def pending(self) -> int:
        return len(self._waiting) + self._running

    def idle(self) -> defer.Deferred:
        """Fires when nothing is waiting or running (tests, shutdown)."""
        if not self.pending:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _pump(self) -> None:
        while self._running < self.concurrency and self._waiting:
            kind, folder, uid, user = self._waiting.popleft()
            self._running += 1
            d = _read(folder, uid)
            d.addCallback(self._learn, kind, user)
            d.addCallbacks(self._done, self._failed, errbackArgs=(kind, folder, uid))
            d.addBoth(self._next)

    def _learn(self, message, kind: str, user):
        if message is None:
            return "gone"
        return self.client.learn(kind, message, user=user)

    def _done(self, outcome) -> None:
        if outcome == "learned":
            self.learned += 1
        elif outcome == "known":
            self.known += 1
        else:
            self.gone += 1

    def _failed(self, failure, kind, folder, uid) -> None:
        self.failed += 1
        if failure.check(RspamdUnavailable):
            self.log.warn("junk learning: {kind} UID {uid} in {folder}: {why}", kind=kind, uid=uid,
                          folder=getattr(folder, "name", folder), why=failure.value)
        else:
            self.log.failure("junk learning: {kind} UID {uid}", failure, kind=kind, uid=uid)

    def _next(self, _) -> None:
        self._running -= 1
        self._pump()
        if not self.pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)


def _read(folder, uid) -> defer.Deferred:
    """Deferred[bytes | None]: the message, or None when it is gone. A folder
    that has not seen a copy land yet (another session's view) syncs once."""
    def missing(failure):
        failure.trap(KeyError)
        return (defer.maybeDeferred(folder.sync)
                .addCallback(lambda _: defer.maybeDeferred(folder.open, uid))
                .addErrback(lambda f: f.trap(KeyError) and None))
    return defer.maybeDeferred(folder.open, uid).addErrback(missing)


def build_learner(config, client) -> JunkLearner | None:
    """The process's JunkLearner ([spam] learn, controller_url), or None."""
    spam = config.spam
    if client is None or spam is None or not (spam.learn and spam.controller_url):
        return None
    return JunkLearner(client, concurrency=spam.learn_concurrency, backlog=spam.learn_backlog)
