"""The queue runner: decides when each spooled message is tried, applies the
outcome, and makes sure the sender is told.

Storing is the spool's job, when-to-retry is policy.py's (a pure function),
how-to-send is the transport's; this module only acts on them (design §3.4).

Per message and attempt:
    group pending recipients by destination domain -> one DeliveryRequest each
    -> transport.deliver (bounded by max_deliveries and max_per_domain)
    -> per-recipient state: sent / bounced / still pending (4xx, no answer)
    -> notices first (bounce, delay, success DSNs, made durable),
       then the envelope (spool.update) or, when nothing is pending, removal.
A crash between a notice and the envelope update repeats the notice at most
once; a crash before the envelope update repeats a delivery at most once.
Nothing is lost: what is on disk is always retried or reported.

Everything runs on the reactor thread; time comes from the injected clock.
"""
from __future__ import annotations

import copy
import dataclasses
import heapq
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailgw import metrics as metrics_module
from mailgw.config_types import Config
from mailgw.errors import MailError, log_failure
from mailgw.mailauth.stages import SUBMISSION, Origin
from mailgw.queue import dsn, policy
from mailgw.queue.dsn import NoticeRecipient
from mailgw.queue.envelope import Envelope, HistoryRecord, HistoryResult
from mailgw.queue.model import (
    BOUNCED, EXPIRED, SENT, STATUS_BOUNCED, STATUS_SENT,
    AttemptResult, DeliveryRequest, Recipient, RecipientResult,
)
from mailgw.queue.spool import new_queue_id
from mailgw.routing.resolver import LocalTarget, RemoteTarget

# How many attempt records an envelope keeps (the CLI shows them).
HISTORY_LIMIT = 20
# Finished queue ids remembered (see QueueRunner.finished).
FINISHED_REMEMBERED = 10_000
# Given to recipients when the administrator gives up (`mailgw queue bounce`).
CANCELLED = RecipientResult("", STATUS_BOUNCED, 0, "5.0.0", "delivery cancelled by the mail administrator")


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass
class _Attempt:
    """One message's attempt in progress: its requests and their results."""
    queue_id: str
    requests: list[tuple[str, DeliveryRequest]]     # (destination, request)
    outstanding: int
    outcomes: list[tuple[DeliveryRequest, AttemptResult]] = field(default_factory=list)
    after: list = field(default_factory=list)      # admin actions to apply once it is over
    failed: bool = False                           # the outcome could not be recorded


class QueueRunner(service.Service):
    log = Logger()

    def __init__(self, *, config: Config, spool, transport, store, router, clock, read_message, metrics=None):
        self.config = config
        # mailgw_deliveries_total{outcome,destination}, mailgw_dsn_sent_total{type}.
        self.metrics = metrics_module.registry_or_default(metrics)
        self.queue = config.queue
        self.spool = spool
        self.transport = transport
        self.store = store
        self.router = router
        self.clock = clock
        self.read_message = read_message      # path -> Deferred[bytes], off the reactor thread
        self.envelopes: dict[str, Envelope] = {}
        # Ids done with (delivered, bounced, deleted) whose files may still be on
        # their way out of the spool: a spool scan must not take them up again.
        self.finished: OrderedDict[str, None] = OrderedDict()
        self._heap: list[tuple[float, str]] = []
        self._timer = None
        self._attempts: dict[str, _Attempt] = {}
        # Jobs waiting for a delivery slot, one FIFO per destination; `_ready`
        # lists (round robin) the destinations that have jobs and a free slot,
        # `_full` those waiting for one of their own deliveries to end. So a
        # completion costs O(1), whatever the backlog for a busy smarthost.
        self._waiting: dict[str, deque[tuple[_Attempt, DeliveryRequest]]] = {}
        self._ready: deque[str] = deque()
        self._full: set[str] = set()
        self._active_total = 0
        self._active_destinations: Counter = Counter()
        self.counters: Counter = Counter()     # sent / deferred / bounced / expired / notices
        self.started_at: float | None = None
        spool.add_listener(self.add)

    # -- feeding ----------------------------------------------------------------
    def load(self, envelopes) -> None:
        """Envelopes found at start-up (spool.recover())."""
        for envelope in envelopes:
            self.add(envelope)

    def add(self, envelope: Envelope | dict) -> None:
        """A committed envelope: remember it and schedule it. A dict is its
        JSON form (the spool's notice of a commit, or an SMTP worker's);
        EnvelopeError if it is not a valid one."""
        if not isinstance(envelope, Envelope):
            envelope = Envelope.from_json(envelope)
        self.envelopes[envelope.id] = envelope
        if envelope.bounce_requested:
            self._schedule(envelope.id, self.clock.seconds())
        elif not envelope.hold:
            self._schedule(envelope.id, envelope.next_attempt)

    def startService(self):
        super().startService()
        self.started_at = self.clock.seconds()
        self._arm()

    def reconfigure(self, *, config: Config, transport, router) -> None:
        """A reload (mailgw/reload.py): the queue settings, the outbound
        transport and the router of the new config. Entries keep their
        arrival, attempts and next attempt time; deliveries under way finish
        on the old transport, whose idle connections are closed."""
        old_transport = self.transport
        self.config, self.queue, self.transport, self.router = config, config.queue, transport, router
        if old_transport is not transport:
            defer.maybeDeferred(old_transport.close).addErrback(
                lambda failure: self.log.failure("closing the previous outbound connections", failure))
        self._pump()

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.transport.close()        # idle outbound connections: QUIT

    # -- the clock ----------------------------------------------------------------
    def _schedule(self, queue_id: str, when: float) -> None:
        heapq.heappush(self._heap, (when, queue_id))
        self._arm()

    def _arm(self) -> None:
        if not self.running or not self._heap:
            return
        when = self._heap[0][0]
        delay = max(0.0, when - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            _, queue_id = heapq.heappop(self._heap)
            envelope = self.envelopes.get(queue_id)
            # Stale heap entries (rescheduled, held, deleted, already running) are skipped.
            if envelope is None or queue_id in self._attempts:
                continue
            if envelope.bounce_requested:
                self._start_cancel(queue_id)
            elif not envelope.hold and envelope.next_attempt <= now:
                self._start_attempt(queue_id)
        self._arm()

    # -- attempts -------------------------------------------------------------------
    def _requests(self, envelope: Envelope) -> list[tuple[str, DeliveryRequest]]:
        """(destination, request) per destination of the pending recipients."""
        by_destination: dict[str, tuple[str, list[Recipient]]] = {}
        for entry in envelope.pending():
            domain = _domain_of(entry.address)
            _, recipients = by_destination.setdefault(self.transport.destination(domain), (domain, []))
            recipients.append(Recipient(entry.address, tuple(entry.notify) if entry.notify else None, entry.orcpt))
        return [(destination, DeliveryRequest(
            queue_id=envelope.id, domain=domain, sender=envelope.sender, recipients=tuple(recipients),
            message_path=self.spool.message_path(envelope.id), size=envelope.size,
            body=envelope.body, smtputf8=envelope.sender_utf8 or any(not r.address.isascii() for r in recipients),
            envid=envelope.envid, ret=envelope.ret))
            for destination, (domain, recipients) in sorted(by_destination.items())]

    def _start_attempt(self, queue_id: str) -> None:
        requests = self._requests(self.envelopes[queue_id])
        attempt = _Attempt(queue_id, requests, len(requests))
        self._attempts[queue_id] = attempt
        if not requests:        # nothing pending (e.g. a crash after the last delivery)
            self._finish(attempt)
            return
        for destination, request in requests:
            if destination not in self._waiting:
                self._waiting[destination] = deque()
                self._ready.append(destination)
            self._waiting[destination].append((attempt, request))
        self._pump()

    def _pump(self) -> None:
        """Start waiting jobs while the concurrency limits allow."""
        while self._ready and self._active_total < self.queue.max_deliveries:
            destination = self._ready.popleft()
            if self._active_destinations[destination] >= self.queue.max_per_domain:
                self._full.add(destination)        # back in _ready when one of its jobs ends
                continue
            jobs = self._waiting[destination]
            attempt, request = jobs.popleft()
            if jobs:
                self._ready.append(destination)
            else:
                del self._waiting[destination]
            self._active_total += 1
            self._active_destinations[destination] += 1
            d = defer.maybeDeferred(self.transport.deliver, request)
            d.addErrback(self._transport_failed, request)
            d.addCallback(self._job_done, attempt, destination, request)

    def _transport_failed(self, failure, request: DeliveryRequest) -> AttemptResult:
        # The transport promises not to fail; if it does anyway, retry later.
        self.log.failure("{queue_id}: delivery to {domain} failed unexpectedly", failure,
                         queue_id=request.queue_id, domain=request.domain)
        return AttemptResult(None, None, False, tuple(
            RecipientResult(r.address, policy.classify(0), 0, "4.3.0", "local error in delivery")
            for r in request.recipients))

    def _job_done(self, result: AttemptResult, attempt: _Attempt, destination: str, request) -> None:
        self._active_total -= 1
        self._active_destinations[destination] -= 1
        if not self._active_destinations[destination]:
            del self._active_destinations[destination]
        if destination in self._full:
            self._full.discard(destination)
            if destination in self._waiting:
                self._ready.append(destination)
        attempt.outcomes.append((request, result))
        attempt.outstanding -= 1
        if attempt.outstanding == 0:
            self._finish(attempt)
        self._pump()

    def _finish(self, attempt: _Attempt) -> None:
        def failed(failure):
            attempt.failed = True
            log_failure(self.log, failure, "{queue_id}: could not record the attempt, it will be retried",
                        queue_id=attempt.queue_id)
        self._apply(attempt).addErrback(failed).addBoth(lambda _: self._attempt_over(attempt))

    def _attempt_over(self, attempt: _Attempt) -> None:
        del self._attempts[attempt.queue_id]
        envelope = self.envelopes.get(attempt.queue_id)
        if envelope is not None and not envelope.hold:
            when = envelope.next_attempt
            if attempt.failed:
                # The old envelope is still the truth on disk; do not spin on it.
                when = max(when, self.clock.seconds() + self.queue.retry_schedule[0])
            self._schedule(attempt.queue_id, when)
        for action in attempt.after:
            action()

    @defer.inlineCallbacks
    def _apply(self, attempt: _Attempt):
        """Record the outcome: notices first, then the envelope."""
        envelope = copy.deepcopy(self.envelopes[attempt.queue_id])
        now = self.clock.seconds()
        entries = {entry.address: entry for entry in envelope.recipients}
        bounced, succeeded = [], []
        latest: dict[str, RecipientResult] = {}
        history = []
        for request, result in attempt.outcomes:
            for recipient_result in result.results:
                entry = entries[recipient_result.address]
                latest[entry.address] = recipient_result
                # For the notice only (RFC 3464 §2.3.5 Remote-MTA, §2.3.7 Last-Attempt-Date).
                notice_entry = NoticeRecipient.of(entry, relay=result.relay, last_attempt=now,
                                                  dsn_relayed=result.dsn_relayed)
                entry.attempts += 1
                entry.last_reply = recipient_result.diagnostic or recipient_result.text
                status = recipient_result.status
                if status == STATUS_SENT:
                    entry.state = SENT
                    succeeded.append((notice_entry, recipient_result))
                elif status == STATUS_BOUNCED:
                    entry.state = BOUNCED
                    bounced.append((notice_entry, recipient_result))
                self._log_result(envelope, entry, recipient_result, result.relay, now, status)
                history.append(HistoryResult(entry.address, result.relay, status, recipient_result.enhanced,
                                             entry.last_reply))
        envelope.attempts += 1
        envelope.history = (envelope.history + [HistoryRecord(now, tuple(history)).to_json()])[-HISTORY_LIMIT:]

        pending = envelope.pending()
        delayed = []
        if pending:
            next_time = policy.next_attempt(self.queue, envelope.arrival, envelope.attempts, now)
            if next_time is None:
                for entry in pending:
                    entry.state = EXPIRED
                    # RFC 3463 §3.5 X.4.7: delivery time expired.
                    last = RecipientResult(entry.address, STATUS_BOUNCED, 0, "5.4.7",
                                           "delivery time expired; last error: " + (entry.last_reply or "none"))
                    bounced.append((NoticeRecipient.of(entry), last))
                    self._log_result(envelope, entry, last, None, now, "expired")
            else:
                envelope.next_attempt = next_time
                if policy.delay_notice_due(self.queue, envelope.arrival, now, envelope.delay_notice_sent or False):
                    envelope.delay_notice_sent = True
                    delayed = [(NoticeRecipient.of(entry), latest.get(entry.address)) for entry in pending]

        yield self._notify(envelope, bounced, succeeded, delayed, now)
        yield self._store(envelope)

    def _log_result(self, envelope, entry, result: RecipientResult, relay, now, status) -> None:
        # One line per recipient per attempt, in the shape Postfix admins grep.
        self.counters[status] += 1
        self.metrics.inc(metrics_module.DELIVERIES, status, self._destination_class(entry.address))
        # orig_to: the address the client gave, when an alias or SRS led here (Postfix's orig_to=).
        orig = f", orig_to=<{entry.orig_to}>" if entry.orig_to else ""
        self.log.info(
            "{queue_id}: to=<{to}>{orig}, relay={relay}, delay={delay:.1f}, dsn={dsn}, status={status} ({reply})",
            queue_id=envelope.id, to=entry.address, orig=orig, relay=relay or "none",
            delay=now - envelope.arrival, dsn=result.enhanced, status=status,
            reply=result.diagnostic or result.text)

    def _destination_class(self, address: str) -> str:
        """route, smarthost or mx (the transport's `destination_class`)."""
        classify = getattr(self.transport, "destination_class", None)
        return classify(_domain_of(address)) if classify is not None else "mx"

    def oldest_age(self) -> float:
        """Seconds since the oldest message in the queue arrived (0: empty)."""
        if not self.envelopes:
            return 0.0
        return max(0.0, self.clock.seconds() - min(envelope.arrival for envelope in self.envelopes.values()))

    def _forget(self, queue_id: str) -> None:
        self.envelopes.pop(queue_id, None)
        self.finished[queue_id] = None
        while len(self.finished) > FINISHED_REMEMBERED:
            self.finished.popitem(last=False)

    def _store(self, envelope: Envelope):
        queue_id = envelope.id
        if not envelope.pending():
            self._forget(queue_id)
            return self.spool.discard(queue_id)
        self.envelopes[queue_id] = envelope
        return self.spool.update(envelope)

    # -- notices (RFC 3461 / RFC 3464) -----------------------------------------------
    @defer.inlineCallbacks
    def _notify(self, envelope: Envelope, bounced, succeeded, delayed, now):
        if not envelope.sender:
            return                              # never a notice about a notice (RFC 3461 §6.2)
        original = None
        failures = [(entry, result) for entry, result in bounced if dsn.should_send("failure", envelope, entry)]
        successes = [(entry, result) for entry, result in succeeded if dsn.should_send("success", envelope, entry)]
        delays = [(entry, result) for entry, result in delayed if dsn.should_send("delay", envelope, entry)]
        if failures or successes or delays:
            original = yield self.read_message(self.spool.message_path(envelope.id))
        for kind, recipients in (("failure", failures), ("success", successes), ("delay", delays)):
            if not recipients:
                continue
            until = envelope.arrival + self.queue.max_lifetime if kind == "delay" else None
            message = dsn.build_dsn(kind, envelope, recipients, reporting_mta=self.config.hostname,
                                    now=now, original=original, will_retry_until=until)
            yield self._send_notice(envelope, kind, message)

    def _send_notice(self, envelope: Envelope, kind: str, message: bytes):
        """Deliver a DSN to the original sender, through the same recipient
        resolution as any mail: into the Maildir when the sender is ours,
        on to the original sender when it is one of our SRS addresses (a
        forward that failed), else through the queue with the null sender <>."""
        sender = envelope.sender
        self.counters[f"notice_{kind}"] += 1
        self.metrics.inc(metrics_module.DSN_SENT, kind)
        remote = [sender]
        work = []
        if self.router.is_local_domain(sender.rpartition("@")[2].lower()):
            try:
                targets = self.router.resolver.resolve(sender)
            except MailError as error:
                self.log.warn("{queue_id}: {kind} notice for local sender <{sender}> dropped: {error}",
                              queue_id=envelope.id, kind=kind, sender=sender, error=error.text)
                return defer.succeed(None)
            boxes = [t.mailbox if t.folder is None else (t.mailbox, t.folder)
                     for t in targets if isinstance(t, LocalTarget)]
            remote = [t.address for t in targets if isinstance(t, RemoteTarget)]
            if boxes:
                self.log.info("{queue_id}: {kind} notice delivered to <{sender}>",
                              queue_id=envelope.id, kind=kind, sender=sender)
                # RFC 5321 §4.5.5: notices come from <>
                work.append(self.store.deliver(boxes, message, return_path=""))
        if remote:
            now = self.clock.seconds()
            queue_id = new_queue_id(now)
            notice = dsn.notice_envelope(envelope, message, queue_id=queue_id, now=now, to=remote)
            self.log.info("{queue_id}: {kind} notice queued as {notice_id} for <{to}>",
                          queue_id=envelope.id, kind=kind, notice_id=queue_id, to=">, <".join(remote))
            work.append(self._sign_notice(message, queue_id).addCallback(
                lambda signed: self.spool.enqueue(queue_id, dataclasses.replace(notice, size=len(signed)), signed)))
        if len(work) == 1:
            return work[0]
        return defer.gatherResults(work, consumeErrors=True).addErrback(lambda failure: failure.value.subFailure)

    def _sign_notice(self, message: bytes, queue_id: str):
        """A notice that leaves goes through the modifiers stage as any
        submission does: DKIM-signed when the From: domain (MAILER-DAEMON@
        our hostname) has a key (mailgw.mailauth.stages)."""
        stages = self.router.stages
        if stages is None:
            return defer.succeed(message)
        origin = Origin(SUBMISSION, "127.0.0.1", None, "")
        d = stages.process(message, lf=False, origin=origin, queue_id=queue_id)
        return d.addCallback(lambda outcome: outcome.message)

    # -- administration (mailgw queue ...) --------------------------------------------
    def snapshot(self) -> list[tuple[Envelope, bool]]:
        """(a copy of the envelope, whether an attempt is in flight) for
        every message, oldest first."""
        return [(copy.deepcopy(self.envelopes[queue_id]), queue_id in self._attempts)
                for queue_id in sorted(self.envelopes)]

    def stats(self) -> dict:
        """What `mailgw queue stats` shows: the queue now and the counts since start."""
        idle = getattr(self.transport, "idle_connections", None)
        return {
            "messages": len(self.envelopes),
            "held": sum(1 for envelope in self.envelopes.values() if envelope.hold),
            "in_flight": len(self._attempts),
            "deliveries_active": self._active_total,
            "deliveries_waiting": sum(len(jobs) for jobs in self._waiting.values()),
            "idle_connections": idle() if callable(idle) else None,
            "since": self.started_at,
            "counters": dict(sorted(self.counters.items())),
        }

    def _envelope(self, queue_id: str) -> Envelope:
        if queue_id not in self.envelopes:
            raise KeyError(queue_id)
        return self.envelopes[queue_id]

    def _when_idle(self, queue_id: str, action):
        """Run `action` now, or after the attempt in flight; Deferred of its result."""
        self._envelope(queue_id)
        attempt = self._attempts.get(queue_id)
        if attempt is None:
            return defer.maybeDeferred(action)
        d = defer.Deferred()
        attempt.after.append(lambda: defer.maybeDeferred(action).chainDeferred(d))
        return d

    def flush(self, queue_ids=None) -> list[str]:
        """Retry now (held messages stay held)."""
        now = self.clock.seconds()
        chosen = list(self.envelopes) if queue_ids is None else queue_ids
        done = []
        for queue_id in chosen:
            envelope = self._envelope(queue_id)
            if envelope.hold:
                continue
            envelope.next_attempt = now
            if queue_id not in self._attempts:
                self._schedule(queue_id, now)
            done.append(queue_id)
        return done

    def _set_flag(self, queue_id: str, **changes):
        def apply():
            envelope = copy.deepcopy(self._envelope(queue_id))
            for name, value in changes.items():
                setattr(envelope, name, value)
            self.envelopes[queue_id] = envelope
            if not envelope.hold:
                self._schedule(queue_id, envelope.next_attempt)
            return self.spool.update(envelope)
        return self._when_idle(queue_id, apply)

    def hold(self, queue_id: str):
        return self._set_flag(queue_id, hold=True)

    def release(self, queue_id: str):
        return self._set_flag(queue_id, hold=False, next_attempt=self.clock.seconds())

    def delete(self, queue_id: str):
        def apply():
            self._forget(queue_id)
            self.log.info("{queue_id}: deleted by the administrator", queue_id=queue_id)
            return self.spool.discard(queue_id)
        return self._when_idle(queue_id, apply)

    def bounce(self, queue_id: str):
        """Give up now and tell the sender."""
        return self._when_idle(queue_id, lambda: self._start_cancel(queue_id))

    def _start_cancel(self, queue_id: str) -> defer.Deferred:
        """Every pending recipient fails now; fires when that is recorded."""
        pending = self.envelopes[queue_id].pending()
        attempt = _Attempt(queue_id, [], 0)
        attempt.outcomes.append((None, AttemptResult(None, None, False, tuple(
            RecipientResult(entry.address, CANCELLED.status, CANCELLED.code, CANCELLED.enhanced, CANCELLED.text)
            for entry in pending))))
        done = defer.Deferred()
        attempt.after.append(lambda: done.callback(queue_id))
        self._attempts[queue_id] = attempt
        self._finish(attempt)
        return done
