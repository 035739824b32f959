"""The queue runner with a real spool and Maildir store on disk, a fake transport and a Clock.

Days of retries pass in milliseconds through clock.advance; no test sleeps.
"""
from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from twisted.internet import defer

from mailgw.durable import DurableWriter
from mailgw.queue.model import STATUS_BOUNCED, STATUS_DEFERRED, STATUS_SENT, AttemptResult, RecipientResult
from mailgw.queue.envelope import Envelope
from mailgw.queue.runner import QueueRunner
from mailgw.queue.spool import Spool, new_queue_id
from mailgw.smtp.inbound import Router
from mailgw.store.maildir import MaildirStore
from smtp_harness import FakeUserDB, make_config
from threadless import ImmediatePool, ThreadlessClock

HOUR = 3600.0
REPLIES = {
    STATUS_SENT: (250, "2.0.0", "Ok: queued as REMOTE1"),
    STATUS_DEFERRED: (451, "4.3.0", "try again later"),
    STATUS_BOUNCED: (550, "5.1.1", "no such user"),
}


class FakeTransport:
    """Answers per recipient from a script; the default is `default`."""

    def __init__(self, default=STATUS_SENT):
        self.default = default
        self.script: dict[str, list[str]] = {}
        self.requests = []
        self.hold = False
        self.held = []
        self.dsn_relayed = False

    def destination(self, domain):
        return domain

    def close(self):
        self.closed = True
        return defer.succeed(None)

    def deliver(self, request):
        self.requests.append(request)
        results = []
        for recipient in request.recipients:
            statuses = self.script.get(recipient.address)
            status = statuses.pop(0) if statuses else self.default
            code, enhanced, text = REPLIES[status]
            results.append(RecipientResult(recipient.address, status, code, enhanced, text))
        result = AttemptResult(f"mx.{request.domain}[192.0.2.1]:25", "TLSv1.3", self.dsn_relayed, tuple(results))
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, result))
            return d
        return defer.succeed(result)


class Rig:
    def __init__(self, tmp_path: Path, *, queue=None, transport=None):
        self.clock = ThreadlessClock()
        self.clock.advance(1_800_000_000)
        self.config = make_config(tmp_path, queue=queue or {})
        writer = DurableWriter(reactor=self.clock, threadpool=ImmediatePool())
        self.spool = Spool(self.config.queue_dir, writer=writer, reactor=self.clock)
        self.store = MaildirStore(self.config.mail_dir, writer=writer, hostname="mail.example.test",
                                  clock=self.clock.seconds)
        self.transport = transport or FakeTransport()
        self.runner = self.make_runner()

    def make_runner(self):
        runner = QueueRunner(config=self.config, spool=self.spool, transport=self.transport, store=self.store,
                             router=Router(self.config, FakeUserDB()), clock=self.clock,
                             read_message=lambda path: defer.succeed(path.read_bytes()))
        runner.startService()
        return runner

    def enqueue(self, sender="alice@example.test", recipients=("bob@remote.test",), notify=None, ret=None,
                envid=None, body=b"Subject: test\r\nMessage-ID: <m1@example.test>\r\n\r\nhello\r\n"):
        now = self.clock.seconds()
        queue_id = new_queue_id(now)
        envelope = {
            "version": 1, "id": queue_id, "arrival": now, "sender": sender, "sender_utf8": False,
            "body": "7BIT", "size": len(body), "envid": envid, "ret": ret,
            "client": {"ip": "10.0.0.1", "helo": "c.test", "tls": False, "auth": None, "listener": "relay"},
            "recipients": [{"address": r, "orcpt": None, "notify": notify, "state": "pending", "attempts": 0,
                            "last_reply": None} for r in recipients],
            "attempts": 0, "next_attempt": now, "history": [],
        }
        self.spool.enqueue(queue_id, Envelope.from_json(envelope), body)
        return queue_id

    def queued_ids(self):
        return sorted(p.stem for p in (self.config.queue_dir / "active").glob("*.env"))

    def inbox(self, user="alice"):
        new = self.config.mail_dir / "example.test" / user / "new"
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
                for p in sorted(new.iterdir())] if new.exists() else []

    def run(self, seconds=0.0):
        self.clock.advance(seconds)


def dsn_fields(report):
    """(per-message fields, [per-recipient fields]) of a multipart/report."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = [part for part in report.iter_parts() if part.get_content_type() == "message/delivery-status"][0]
    blocks = status.get_payload()
    return blocks[0], blocks[1:]


def test_first_try_delivery_removes_the_entry(tmp_path):
    rig = Rig(tmp_path)
    queue_id = rig.enqueue()
    rig.run()
    assert [r.queue_id for r in rig.transport.requests] == [queue_id]
    request = rig.transport.requests[0]
    assert request.domain == "remote.test" and request.sender == "alice@example.test"
    assert rig.queued_ids() == []
    assert rig.inbox() == []             # no notice: nobody asked for success
    # Remembered as finished, so a spool scan (SMTP workers) never takes it up again.
    assert queue_id in rig.runner.finished and queue_id not in rig.runner.envelopes


def test_4xx_is_retried_on_schedule_then_delivered(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [300, 900]})
    rig.transport.script["bob@remote.test"] = [STATUS_DEFERRED, STATUS_DEFERRED]
    queue_id = rig.enqueue()
    rig.run()
    envelope, _ = rig.spool.load(queue_id)
    assert envelope.attempts == 1 and envelope.recipients[0].state == "pending"
    assert envelope.recipients[0].last_reply == "smtp; 451 4.3.0 try again later"
    rig.run(299)
    assert len(rig.transport.requests) == 1
    rig.run(1)
    assert len(rig.transport.requests) == 2
    rig.run(899)
    assert len(rig.transport.requests) == 2
    rig.run(1)
    assert len(rig.transport.requests) == 3 and rig.queued_ids() == []


def test_stats_count_what_happened_since_start(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [300]})
    rig.transport.script["bob@remote.test"] = [STATUS_DEFERRED]
    rig.enqueue()
    rig.run()
    stats = rig.runner.stats()
    assert stats["counters"] == {"deferred": 1}
    assert (stats["messages"], stats["held"], stats["in_flight"], stats["deliveries_active"]) == (1, 0, 0, 0)
    assert stats["since"] == rig.clock.seconds()
    rig.run(300)
    stats = rig.runner.stats()
    assert stats["counters"] == {"deferred": 1, "sent": 1} and stats["messages"] == 0


def test_5xx_bounces_at_once_with_an_rfc3464_report_to_a_local_sender(tmp_path):
    rig = Rig(tmp_path)
    rig.transport.default = STATUS_BOUNCED
    rig.enqueue(envid="ENV-42")
    rig.run()
    assert len(rig.transport.requests) == 1 and rig.queued_ids() == []
    (report,) = rig.inbox()
    assert report["From"].addresses[0].username.upper() == "MAILER-DAEMON"
    per_message, (per_recipient,) = dsn_fields(report)
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_recipient["Action"] == "failed" and per_recipient["Status"] == "5.1.1"
    assert "bob@remote.test" in per_recipient["Final-Recipient"]
    assert "550 5.1.1 no such user" in per_recipient["Diagnostic-Code"]
    assert "mx.remote.test" in per_recipient["Remote-MTA"]


def test_bounce_for_a_remote_sender_goes_out_with_the_null_sender(tmp_path):
    rig = Rig(tmp_path)
    rig.transport.script["bob@remote.test"] = [STATUS_BOUNCED]
    rig.enqueue(sender="carol@elsewhere.test")
    rig.run()
    rig.run()
    notice = rig.transport.requests[-1]
    assert notice.sender == "" and [r.address for r in notice.recipients] == ["carol@elsewhere.test"]
    assert rig.queued_ids() == []


def test_no_bounce_for_a_null_sender(tmp_path):
    rig = Rig(tmp_path)
    rig.transport.default = STATUS_BOUNCED
    rig.enqueue(sender="")
    rig.run()
    rig.run()
    assert len(rig.transport.requests) == 1 and rig.queued_ids() == [] and rig.inbox() == []


def test_expiry_bounces_after_the_lifetime(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [3600], "max_lifetime": 86400.0, "delay_notice_after": 0.0})
    rig.transport.default = STATUS_DEFERRED
    rig.enqueue()
    for _ in range(30):
        rig.run(HOUR)
    assert rig.queued_ids() == []
    attempts = len(rig.transport.requests)
    assert 20 <= attempts <= 25
    (report,) = rig.inbox()
    _, (per_recipient,) = dsn_fields(report)
    assert per_recipient["Action"] == "failed" and per_recipient["Status"] == "5.4.7"
    rig.run(10 * HOUR)
    assert len(rig.transport.requests) == attempts


def test_delay_notice_is_sent_once(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [1800], "delay_notice_after": 4 * HOUR})
    rig.transport.default = STATUS_DEFERRED
    rig.enqueue()
    for _ in range(24):
        rig.run(HOUR)
    notices = rig.inbox()
    assert len(notices) == 1
    _, (per_recipient,) = dsn_fields(notices[0])
    assert per_recipient["Action"] == "delayed"
    assert rig.queued_ids() != []


def test_success_notice_only_when_asked_and_not_relayed(tmp_path):
    rig = Rig(tmp_path)
    rig.enqueue(notify=["SUCCESS"])
    rig.run()
    (report,) = rig.inbox()
    _, (per_recipient,) = dsn_fields(report)
    assert per_recipient["Action"] in ("delivered", "relayed")
    rig.transport.dsn_relayed = True         # the next hop took NOTIFY: it reports, not us
    rig.enqueue(notify=["SUCCESS"])
    rig.run()
    assert len(rig.inbox()) == 1


def test_notify_never_suppresses_the_bounce(tmp_path):
    rig = Rig(tmp_path)
    rig.transport.default = STATUS_BOUNCED
    rig.enqueue(notify=["NEVER"])
    rig.run()
    assert rig.inbox() == [] and rig.queued_ids() == []


def test_mixed_outcomes_are_kept_per_recipient(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [300]})
    rig.transport.script = {"a@one.test": [STATUS_SENT], "b@two.test": [STATUS_DEFERRED, STATUS_SENT],
                            "c@two.test": [STATUS_BOUNCED]}
    queue_id = rig.enqueue(recipients=("a@one.test", "b@two.test", "c@two.test"))
    rig.run()
    assert sorted(r.domain for r in rig.transport.requests) == ["one.test", "two.test"]
    envelope, _ = rig.spool.load(queue_id)
    assert [r.state for r in envelope.recipients] == ["sent", "pending", "bounced"]
    assert len(rig.inbox()) == 1                       # the bounce for c
    rig.run(300)
    retry = rig.transport.requests[-1]
    assert [r.address for r in retry.recipients] == ["b@two.test"]   # never resent to a or c
    assert rig.queued_ids() == []


def test_restart_continues_where_it_stopped(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [300]})
    rig.transport.script = {"a@one.test": [STATUS_SENT], "b@two.test": [STATUS_DEFERRED]}
    rig.enqueue(recipients=("a@one.test", "b@two.test"))
    rig.run()
    rig.runner.stopService()
    # A new process: recover from disk and go on.
    restarted = rig.make_runner()
    restarted.load(rig.spool.recover())
    rig.transport.requests.clear()
    rig.run(300)
    assert [[r.address for r in q.recipients] for q in rig.transport.requests] == [["b@two.test"]]
    assert rig.queued_ids() == []


def test_concurrency_limits_in_total_and_per_domain(tmp_path):
    rig = Rig(tmp_path, queue={"max_deliveries": 3, "max_per_domain": 2})
    rig.transport.hold = True
    for _ in range(3):
        rig.enqueue(recipients=("x@busy.test",))
    rig.enqueue(recipients=("y@other.test",))
    rig.enqueue(recipients=("z@third.test",))
    rig.run()
    in_flight = [r.domain for r in rig.transport.requests]
    assert sorted(in_flight) == ["busy.test", "busy.test", "other.test"]
    d, result = rig.transport.held.pop(0)
    d.callback(result)
    assert len(rig.transport.requests) == 4
    while rig.transport.held:
        d, result = rig.transport.held.pop(0)
        d.callback(result)
    assert len(rig.transport.requests) == 5 and rig.queued_ids() == []


def test_admin_hold_release_delete_bounce(tmp_path):
    rig = Rig(tmp_path, queue={"retry_schedule": [3600]})
    rig.transport.default = STATUS_DEFERRED
    held, deleted, bounced = rig.enqueue(), rig.enqueue(), rig.enqueue()
    rig.run()
    assert len(rig.transport.requests) == 3
    rig.runner.hold(held)
    rig.runner.flush()
    rig.run()
    assert held not in [r.queue_id for r in rig.transport.requests[3:]]
    assert rig.spool.load(held)[0].hold is True
    rig.runner.release(held)
    rig.run()
    assert rig.transport.requests[-1].queue_id == held
    rig.runner.delete(deleted)
    assert deleted not in rig.queued_ids()
    rig.runner.bounce(bounced)
    assert bounced not in rig.queued_ids()
    (report,) = rig.inbox()
    _, (per_recipient,) = dsn_fields(report)
    assert per_recipient["Action"] == "failed"
    with pytest.raises(KeyError):
        rig.runner.hold("0000000000000000")


def test_recipients_for_one_relay_host_share_a_transaction(tmp_path):
    rig = Rig(tmp_path)
    rig.transport.destination = lambda domain: "[smarthost.example.test]:587"
    rig.enqueue(recipients=("a@one.test", "b@two.test", "c@three.test"))
    rig.run()
    (request,) = rig.transport.requests
    assert [r.address for r in request.recipients] == ["a@one.test", "b@two.test", "c@three.test"]
    assert rig.queued_ids() == []


# -- crashes while recording an attempt ------------------------------------------
# A crash is modelled by a spool call that never completes (the process is
# gone); a new runner is then built from what is on disk (spool.recover()).

class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["update", "discard", "enqueue-notice"])
def test_crash_while_recording_never_loses_a_message(tmp_path, step):
    rig = Rig(tmp_path, queue={"retry_schedule": [300]})
    rig.transport.script = {"a@one.test": [STATUS_SENT], "b@two.test": [STATUS_DEFERRED, STATUS_SENT]}
    if step == "discard":
        rig.transport.script["b@two.test"] = [STATUS_SENT]
    if step == "enqueue-notice":
        rig.transport.script["b@two.test"] = [STATUS_BOUNCED]
    queue_id = rig.enqueue(sender="carol@elsewhere.test", recipients=("a@one.test", "b@two.test"))
    real = {name: getattr(rig.spool, name) for name in ("update", "discard", "enqueue")}
    crashed = []

    def crash(*args):
        crashed.append(args)
        return defer.Deferred()                 # never fires: the process died here

    target = {"update": "update", "discard": "discard", "enqueue-notice": "enqueue"}[step]
    setattr(rig.spool, target, crash)
    rig.run()
    assert crashed, "the crash point was reached"
    rig.runner.stopService()
    for name, method in real.items():
        setattr(rig.spool, name, method)
    # The new process: everything that was committed is still there.
    rig.transport.requests.clear()
    rig.transport.script = {"b@two.test": [STATUS_BOUNCED]} if step == "enqueue-notice" else {}
    restarted = rig.make_runner()
    restarted.load(rig.spool.recover())
    assert queue_id in rig.queued_ids()
    rig.run(300)
    rig.run(300)
    sent_again = [r.address for q in rig.transport.requests if q.queue_id == queue_id for r in q.recipients]
    # Never a loss: b is tried again; a, accepted just before the crash, may go twice.
    assert "b@two.test" in sent_again
    if step == "enqueue-notice":
        # The bounce whose spooling was cut off is made again and goes out.
        notices = [q for q in rig.transport.requests if q.sender == ""]
        assert [[r.address for r in q.recipients] for q in notices] == [["carol@elsewhere.test"]]
    assert rig.queued_ids() == []


def test_a_bounce_that_leaves_is_dkim_signed_when_the_hostname_has_a_key(tmp_path):
    """Notices go through the same modifiers stage as submissions (mailgw/mailauth/stages.py)."""
    import dkim

    from twisted.internet import task

    from deferreds import inline
    from mailgw.mailauth.dkim_sign import DKIMSigner
    from mailgw.mailauth.keys import DKIMKeyStore
    from mailgw.mailauth.stages import AuthenticationStage

    class ReadingTransport(FakeTransport):
        def deliver(self, request):
            self.messages = getattr(self, "messages", []) + [request.message_path.read_bytes()]
            return super().deliver(request)

    rig = Rig(tmp_path, transport=ReadingTransport())
    store = DKIMKeyStore(tmp_path / "dkim")
    key = store.keygen(rig.config.hostname, selector="dsn")
    # The signer's own clock is in the past: dkimpy refuses a t= in its future, and the rig's is 2027.
    signing_clock = task.Clock()
    signing_clock.advance(1_700_000_000)
    rig.runner.router.stages = AuthenticationStage(
        checks=None, add_missing_headers=True, signer=DKIMSigner(store, clock=signing_clock), mail_dns=None,
        run_in_thread=inline, clock=rig.clock, hostname=rig.config.hostname, is_local_domain=lambda d: False)
    rig.transport.script["bob@remote.test"] = [STATUS_BOUNCED]
    rig.enqueue(sender="carol@elsewhere.test")
    rig.run()
    rig.run()
    notice = rig.transport.messages[-1]
    assert notice.startswith(b"DKIM-Signature: ") and f"d={rig.config.hostname}".encode() in notice[:400]
    assert dkim.verify(notice, dnsfunc=lambda name, timeout=5: key.dns_record.encode())
    assert not dkim.verify(notice.replace(b"bob@remote.test", b"bob@remote.tesT"),
                           dnsfunc=lambda name, timeout=5: key.dns_record.encode())
