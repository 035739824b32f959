"""Sieve at local delivery (mailgw.sieve.delivery through routing.dispatch):
an SMTP transaction for a user with an active script files, discards or
redirects the copy; a broken script keeps it (RFC 5228 §2.10.6)."""
from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import Logger

from mailgw.durable import DurableWriter
from mailgw.routing.dispatch import Router
from mailgw.routing.submit import LocalSubmission
from mailgw.sieve.delivery import AFTER, BEFORE, GLOBAL_DIRECTORY, SieveStage
from mailgw.sieve.interpreter import compile_script
from mailgw.sieve.scripts import ScriptStore
from mailgw.store.maildir import MaildirStore
from smtp_harness import FakeUserDB, Session, make_config
from threadless import ImmediatePool, ThreadlessClock


class QuietWriter(DurableWriter):
    def __init__(self):
        super().__init__(reactor=ThreadlessClock(), threadpool=ImmediatePool())
        self.log = Logger(observer=lambda event: None)


@pytest.fixture
def rig(tmp_path):
    root = tmp_path / "sieve"
    scripts = ScriptStore(root, check=compile_script)
    store = MaildirStore(tmp_path / "mail", writer=QuietWriter(), hostname="mx.example.test")
    config = make_config()
    router = Router(config, FakeUserDB())
    threaded = []                   # what went through run_in_thread (the I/O pool in the server)

    def run_in_thread(f, *args):
        threaded.append(f.__name__)
        return defer.maybeDeferred(f, *args)
    router.sieve = SieveStage(scripts, root, run_in_thread=run_in_thread)
    router.local_submission = LocalSubmission

    def deliver(subject=b"hi", to="alice@example.test", headers=b"", sender="carol@elsewhere.test"):
        s = Session(store=store, router=router, config=config)
        s.ehlo()
        assert s.last(f"MAIL FROM:<{sender}>").startswith("250 ")
        assert s.last(f"RCPT TO:<{to}>").startswith("250 ")
        assert s.last("DATA").startswith("354 ")
        reply = s.send(headers + b"Subject: " + subject + b"\r\nX-Spam: yes\r\n\r\nbody\r\n.\r\n")[0]
        assert reply.startswith("250 2.0.0"), reply
        return s

    def files(folder=""):
        base = tmp_path / "mail" / "example.test" / "alice"
        directory = base / folder / "new" if folder else base / "new"
        return sorted(directory.iterdir()) if directory.exists() else []

    def activate(text, user="alice@example.test"):
        scripts.put(user, "main", text)
        scripts.set_active(user, "main")

    return type("Rig", (), {"deliver": staticmethod(deliver), "files": staticmethod(files),
                            "activate": staticmethod(activate), "root": root, "store": store,
                            "threaded": threaded, "router": router})


def test_without_a_script_mail_goes_to_inbox(rig):
    rig.deliver()
    assert len(rig.files()) == 1


def test_fileinto_files_into_the_folder(rig):
    rig.activate('require "fileinto"; if header :contains "subject" "report" { fileinto "Reports"; }')
    rig.deliver(b"weekly report")
    rig.deliver(b"lunch")
    assert len(rig.files(".Reports")) == 1
    assert len(rig.files()) == 1


def test_discard_stores_nothing_but_still_answers_250(rig):
    rig.activate("discard;")
    rig.deliver()
    assert rig.files() == []


def test_redirect_goes_to_the_spool_with_the_original_recipient(rig):
    rig.activate('redirect "dave@remote.test";')
    s = rig.deliver()
    assert rig.files() == []
    ((_, envelope, _),) = s.spool.queued
    assert [r["address"] for r in envelope["recipients"]] == ["dave@remote.test"]


def test_redirect_copy_keeps_a_copy(rig):
    rig.activate('require "copy"; redirect :copy "dave@remote.test";')
    rig.deliver()
    assert len(rig.files()) == 1


def test_a_script_broken_on_disk_keeps_the_mail(rig):
    rig.activate("keep;")
    path = next((rig.root / "example.test" / "alice" / "scripts").iterdir())
    path.write_text('if header :nope "x" { discard; }')
    rig.deliver()
    assert len(rig.files()) == 1


def test_a_run_time_error_keeps_the_mail(rig):
    rig.activate("".join(f'redirect "u{i}@remote.test";' for i in range(10)))
    rig.deliver()
    assert len(rig.files()) == 1


def test_a_folder_name_that_cannot_exist_keeps_the_mail(rig):
    rig.activate('require "fileinto"; fileinto "../../etc";')
    rig.deliver()
    assert len(rig.files()) == 1


def test_global_before_script_runs_first(rig):
    (rig.root / GLOBAL_DIRECTORY).mkdir(parents=True)
    (rig.root / GLOBAL_DIRECTORY / BEFORE).write_text(
        'require "fileinto"; if exists "x-spam" { fileinto "Junk"; stop; }')
    rig.deliver()
    assert len(rig.files(".Junk")) == 1 and rig.files() == []


def test_global_after_script_runs_for_users_without_a_script(rig):
    (rig.root / GLOBAL_DIRECTORY).mkdir(parents=True)
    (rig.root / GLOBAL_DIRECTORY / AFTER).write_text('require "fileinto"; fileinto "Late";')
    rig.deliver()
    assert len(rig.files(".Late")) == 1


def test_a_changed_script_is_picked_up(rig):
    rig.activate('require "fileinto"; fileinto "One";')
    rig.deliver()
    rig.activate('require "fileinto"; fileinto "Two, longer name";')
    rig.deliver()
    assert len(rig.files(".One")) == 1 and len(rig.files(".Two, longer name")) == 1


def test_imap4flags_system_flags_are_stored_with_the_copy(rig):
    rig.activate('require ["imap4flags", "fileinto"]; addflag "\\\\Seen"; fileinto :flags "\\\\Flagged $Work" "Work";'
                 ' keep;')
    rig.deliver()
    (inbox,) = rig.files()
    (work,) = rig.files(".Work")
    assert inbox.name.endswith(":2,S")
    assert work.name.endswith(":2,F")     # keywords are not stored yet (docs/sieve.md)



VACATION = 'require "vacation"; vacation :days 1 :subject "Away" "I am away until Monday.";'
TO_ALICE = b"To: Alice <alice@example.test>\r\nMessage-ID: <m1@elsewhere.test>\r\n"


def replies(session):
    return [(envelope, message) for _, envelope, message in session.spool.queued
            if envelope["sender"] == ""]


def test_vacation_answers_once_per_sender_per_period(rig):
    rig.activate(VACATION)
    first = rig.deliver(headers=TO_ALICE)
    ((envelope, message),) = replies(first)
    assert [r["address"] for r in envelope["recipients"]] == ["carol@elsewhere.test"]
    assert b"\r\nAuto-Submitted: auto-replied" in message
    assert b"\r\nSubject: Away\r\n" in message and b"\r\nIn-Reply-To: <m1@elsewhere.test>\r\n" in message
    assert message.rstrip().endswith(b"I am away until Monday.")
    assert replies(rig.deliver(headers=TO_ALICE)) == []          # the same sender, within the day
    assert len(replies(rig.deliver(headers=TO_ALICE, sender="dave@elsewhere.test"))) == 1
    assert len(rig.files()) == 3                                  # vacation keeps every message


@pytest.mark.parametrize("headers, sender", [
    (TO_ALICE + b"List-Id: <list.elsewhere.test>\r\n", "carol@elsewhere.test"),
    (TO_ALICE + b"Precedence: bulk\r\n", "carol@elsewhere.test"),
    (TO_ALICE + b"Auto-Submitted: auto-generated\r\n", "carol@elsewhere.test"),
    (TO_ALICE, ""),
    (TO_ALICE, "owner-list@elsewhere.test"),
    (b"To: someone@elsewhere.test\r\n", "carol@elsewhere.test"),   # alice only in Bcc
])
def test_vacation_never_answers(rig, headers, sender):
    rig.activate(VACATION)
    assert replies(rig.deliver(headers=headers, sender=sender)) == []
    assert len(rig.files()) == 1


def test_scripts_are_found_and_run_in_the_thread_pool_and_vacation_records_written_there(rig):
    rig.activate(VACATION)
    rig.deliver(headers=TO_ALICE)
    assert rig.threaded == ["_plans_now", "_claim_and_compose"]


def test_the_message_is_parsed_once_for_all_its_local_targets(rig, monkeypatch):
    from mailgw.sieve import delivery
    rig.activate("keep;")
    rig.activate("keep;", user="bob@example.test")
    parsed = []
    real = delivery.SieveMessage.from_bytes
    monkeypatch.setattr(delivery.SieveMessage, "from_bytes", lambda data: parsed.append(1) or real(data))
    s = Session(store=rig.store, router=rig.router, config=rig.router.config)
    s.ehlo()
    assert s.last("MAIL FROM:<carol@elsewhere.test>").startswith("250 ")
    for to in ("alice@example.test", "bob@example.test"):
        assert s.last(f"RCPT TO:<{to}>").startswith("250 ")
    assert s.last("DATA").startswith("354 ")
    assert s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")[0].startswith("250 2.0.0")
    assert parsed == [1]


def test_a_failing_sieve_stage_delivers_unfiltered(rig):
    rig.activate("discard;")
    rig.router.sieve.run_in_thread = lambda f, *args: defer.fail(RuntimeError("pool gone"))
    rig.deliver()
    assert len(rig.files()) == 1


@pytest.mark.parametrize("mime, reason, head_end", [
    (False, "away\nsoon", b"Content-Transfer-Encoding: 8bit\r\n\r\naway\r\nsoon\r\n"),
    # RFC 5230 §4.3 :mime: the reason brings its own entity headers.
    (True, "Content-Type: text/plain\r\n\r\nhi", b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhi\r\n"),
])
def test_vacation_reply_text(mime, reason, head_end):
    from mailgw.sieve.interpreter import Vacation
    from mailgw.sieve.message import SieveMessage
    from mailgw.sieve.vacation import compose
    original = SieveMessage.from_bytes(b"Subject: Lunch?\r\nMessage-ID: <q@x.test>\r\n\r\nbody\r\n")
    reply = compose(Vacation("carol@x.test", reason, 86400, "h", mime=mime), "alice@example.test", original,
                    hostname="mx.example.test", now=1.7e9)
    assert reply.endswith(head_end)
    assert b"\r\nSubject: Auto: Lunch?\r\n" in reply and b"\r\nIn-Reply-To: <q@x.test>\r\n" in reply
    assert reply.count(b"Content-Type:") == 1
