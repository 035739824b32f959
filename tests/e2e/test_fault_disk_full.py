"""Fault injection, issue 6: the disk fills up under the running server.

The server's data_dir is a small tmpfs the test mounts before the first start
(tmpfs has no blocks reserved for root, so the root-run server really gets
ENOSPC). A filler file takes every free block while the server runs. Then:

- SMTP to a local user and relayed SMTP (trusted source 127.0.0.2) get
  452 4.3.1 at the end of DATA, and the session stays usable (RSET, NOOP);
  IMAP APPEND gets a tagged NO and the connection stays usable; POP3 DELE +
  QUIT either removes the message or answers -ERR and keeps it;
- nothing half-written is left: no new file in the Maildir (tmp/, new/,
  cur/) or in queue/incoming and queue/active, and no traceback in the log;
- a message queued before the disk filled, whose smarthost keeps answering
  4xx, survives the runner failing to write its envelope update;
- the filler is deleted, and without a restart: the same SMTP session gets
  250, the message is in the Maildir, relayed mail reaches the sink, APPEND
  works, and the queued message is delivered.

Needs root (or CAP_SYS_ADMIN) for mount(8); skipped otherwise, with the reason.
Nothing waits with a fixed sleep: every wait polls against a deadline.
"""
from __future__ import annotations

import errno
import imaplib
import json
import os
import poplib
import shutil
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import wait_until
from sink import WAIT, queue_list, wait_until_queue_empty

pytestmark = pytest.mark.e2e

ALICE, PASSWORD = "alice@example.test", "secret"
BOB, BOB_PASSWORD = "bob@example.test", "hunter2"
REMOTE = "far@remote.test"
SENDER = "sender@elsewhere.test"
TRUSTED = "127.0.0.2"
TMPFS_SIZE = "8m"
FILLER = "filler"
RETRY_EVERY_SECOND = "[queue]\nretry_schedule = [1]\n"


# -- the small filesystem --------------------------------------------------------

def _mount_tmpfs(directory: Path) -> None:
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount(8)/umount(8) not installed: cannot make the small filesystem")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(directory)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {TMPFS_SIZE} tmpfs at {directory} (needs root or CAP_SYS_ADMIN; "
                    f"euid {os.geteuid()}): mount exited {done.returncode}: {done.stderr.strip()}")


def _unmount(directory: Path) -> None:
    done = subprocess.run(["umount", str(directory)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        # Still busy (a straggler): detach it now, the kernel frees it when the last user goes.
        lazy = subprocess.run(["umount", "-l", str(directory)], capture_output=True, text=True, timeout=30)
        assert lazy.returncode == 0, (done.stderr, lazy.stderr)


@pytest.fixture
def tmpfs_server(make_server):
    """Like make_server, but data_dir is a fresh 8 MiB tmpfs; the server is
    started. At teardown each server is stopped, then its tmpfs unmounted
    (this fixture's teardown runs before make_server's)."""
    mounted: list[tuple[object, Path]] = []

    def make(name: str = "server", **options):
        server = make_server(name, **options)
        _mount_tmpfs(server.data_dir)            # before start(): the users file is copied in there
        mounted.append((server, server.data_dir))
        return server.start()

    yield make
    for server, directory in reversed(mounted):
        server.stop()
        _unmount(directory)


def fill(server) -> Path:
    """Take every free block of the data_dir filesystem; returns the filler."""
    path = server.data_dir / FILLER
    chunk = b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            try:
                written = os.write(fd, chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 16 or 1]
                continue
            if written < len(chunk):
                chunk = chunk[: max(1, written)]
    finally:
        os.close(fd)
    stats = os.statvfs(server.data_dir)
    assert stats.f_bavail == 0, f"{stats.f_bavail} blocks still free"
    return path


def free(filler: Path) -> None:
    filler.unlink()
    assert os.statvfs(filler.parent).f_bavail > 0


# -- what is on the disk ---------------------------------------------------------

def files_under(directories) -> set[str]:
    """The path of every file (recursively) in `directories`."""
    found = set()
    for directory in directories:
        if directory.is_dir():
            for root, _, names in os.walk(directory):
                found.update(str(Path(root, name)) for name in names)
    return found


def watched(server) -> list[Path]:
    box = server.mailbox(ALICE)
    queue = server.data_dir / "queue"
    return [box / "tmp", box / "new", box / "cur", queue / "incoming", queue / "active"]


def tracebacks(server, allowed: tuple[str, ...] = ()) -> list[str]:
    """Log records (a line and its tab-indented continuation lines) carrying a
    traceback, except those whose first line contains one of `allowed`."""
    records: list[str] = []
    for line in server.log_text().splitlines():
        if line.startswith("\t") and records:
            records[-1] += "\n" + line
        else:
            records.append(line)
    return [record for record in records
            if "Traceback" in record and not any(text in record.split("\n", 1)[0] for text in allowed)]


def assert_no_traceback(server, allowed: tuple[str, ...] = ()) -> None:
    found = tracebacks(server, allowed)
    assert not found, "\n".join(found)


def new_files(server, before: set[str]) -> set[str]:
    """Files in data_dir now that were not there before, other than the filler
    and empty lock files (flock(2) needs an inode, not a block)."""
    return {name for name in files_under([server.data_dir]) - before - {str(server.data_dir / FILLER)}
            if not (name.endswith(".lock") and os.stat(name).st_size == 0)}


# -- clients ---------------------------------------------------------------------

def transaction(client: smtplib.SMTP, sender: str, recipients: list[str], message: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT..., DATA; (code, text) of the first reply that is not a success."""
    client.ehlo_or_helo_if_needed()
    code, reply = client.mail(sender)
    if code != 250:
        return code, reply
    for rcpt in recipients:
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
    try:
        return client.data(message)
    except smtplib.SMTPDataError as error:        # no 354
        return error.smtp_code, error.smtp_error


def message(mark: str, to: str = ALICE) -> bytes:
    body = "".join(f"line {i} of a message that is some kilobytes long\r\n" for i in range(200))
    return (f"From: <{SENDER}>\r\nTo: <{to}>\r\nSubject: disk full {mark}\r\n"
            f"Message-ID: <{mark}@e2e.example.net>\r\nX-Test-Marker: {mark}\r\n\r\n{body}").encode()


def imap_login(server) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=server.CLIENT_TIMEOUT)
    client.starttls(ssl_context=server.tls_client_context())
    client.login(ALICE, PASSWORD)
    return client


def pop3_login(server, user: str = ALICE, password: str = PASSWORD) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=server.CLIENT_TIMEOUT)
    client.stls(context=server.tls_client_context())
    client.user(user)
    client.pass_(password)
    return client


def assert_full_reply(code: int, reply: bytes) -> None:
    assert code == 452 and reply.startswith(b"4.3.1"), (code, reply)


# -- the tests -------------------------------------------------------------------

def test_disk_full_gives_4xx_leaves_nothing_behind_and_service_resumes(tmpfs_server, sink):
    server = tmpfs_server(relay_port=sink.controller.port, extra=RETRY_EVERY_SECOND)
    before_mark = uuid.uuid4().hex
    client = server.smtp("relay")
    assert transaction(client, SENDER, [ALICE], message(before_mark))[0] == 250
    server.find(ALICE, before_mark)
    imap = imap_login(server)
    assert imap.select("INBOX")[0] == "OK"
    before, everything = files_under(watched(server)), files_under([server.data_dir])

    filler = fill(server)

    # SMTP to a local mailbox: 452 4.3.1, and the session goes on.
    full_mark = uuid.uuid4().hex
    assert_full_reply(*transaction(client, SENDER, [ALICE], message(full_mark)))
    assert client.rset()[0] == 250 and client.noop()[0] == 250
    # Relayed (trusted source) and mixed local + remote: 452 as well.
    relay = server.smtp("relay", source=TRUSTED)
    assert_full_reply(*transaction(relay, SENDER, [REMOTE], message(full_mark, REMOTE)))
    assert relay.noop()[0] == 250
    assert_full_reply(*transaction(relay, SENDER, [ALICE, REMOTE], message(full_mark, REMOTE)))
    assert relay.rset()[0] == 250
    # IMAP APPEND: a tagged NO, and the connection stays usable.
    typ, data = imap.append("INBOX", None, None, message(full_mark))
    assert typ == "NO" and b"SERVERBUG" not in data[0], (typ, data)     # a temporary NO, not a crash
    assert imap.noop()[0] == "OK" and imap.select("INBOX")[0] == "OK"

    # Nothing half-written, nothing lost, no traceback.
    assert files_under(watched(server)) == before
    assert new_files(server, everything) == set()
    assert [name for name, data in server.messages(ALICE).items() if full_mark.encode() in data] == []
    server.find(ALICE, before_mark)
    assert sink.messages == []
    assert_no_traceback(server)

    # Space comes back: no restart, the same sessions work again.
    free(filler)
    after_mark = uuid.uuid4().hex
    assert transaction(client, SENDER, [ALICE], message(after_mark))[0] == 250
    server.find(ALICE, after_mark)
    assert transaction(relay, SENDER, [REMOTE], message(after_mark, REMOTE))[0] == 250
    sink.wait_for(1)
    assert after_mark.encode() in sink.messages[0][2] and sink.messages[0][1] == [REMOTE]
    typ, data = imap.append("INBOX", None, None, message(after_mark + "-imap"))
    assert typ == "OK", (typ, data)
    server.find(ALICE, after_mark + "-imap")
    client.quit()
    relay.quit()
    imap.logout()
    wait_until_queue_empty(server)
    assert_no_traceback(server)
    assert server.process.poll() is None and server.starts == 1


def test_pop3_on_a_full_disk_removes_or_keeps_but_never_loses(tmpfs_server):
    server = tmpfs_server()
    marks = [uuid.uuid4().hex for _ in range(2)]
    client = server.smtp("relay")
    for mark in marks:
        assert transaction(client, SENDER, [ALICE], message(mark))[0] == 250
    client.quit()
    pop = pop3_login(server)                       # alice's INBOX has been opened before the disk fills
    assert pop.stat()[0] == 2
    pop.quit()
    before = files_under([server.data_dir]) - {str(server.data_dir / FILLER)}
    filler = fill(server)

    # bob's INBOX was never opened: opening it needs a write; +OK, or -ERR [SYS/TEMP] (RFC 3206).
    try:
        pop3_login(server, BOB, BOB_PASSWORD).quit()
    except poplib.error_proto as error:
        assert error.args[0].startswith(b"-ERR [SYS/TEMP]"), error
    # alice: DELE + QUIT either removes the message (a removal needs no space) or
    # answers -ERR and keeps it; never anything else lost.
    pop = pop3_login(server)
    assert pop.stat()[0] == 2
    pop.dele(1)
    try:
        reply = pop.quit()
        removed = True
    except poplib.error_proto as error:            # -ERR [SYS/TEMP] ... not removed
        reply, removed = error.args[0], False
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
    stored = server.messages(ALICE)
    left = [mark for mark in marks if any(mark.encode() in data for data in stored.values())]
    assert len(stored) == len(left) == (1 if removed else 2), (reply, left)
    assert left[-1] == marks[1]
    assert new_files(server, before) == set()
    assert_no_traceback(server)

    free(filler)
    pop = pop3_login(server)
    assert pop.stat()[0] == len(left)
    pop.quit()
    pop3_login(server, BOB, BOB_PASSWORD).quit()
    new_mark = uuid.uuid4().hex
    client = server.smtp("relay")
    assert transaction(client, SENDER, [ALICE], message(new_mark))[0] == 250
    client.quit()
    server.find(ALICE, new_mark)
    assert_no_traceback(server)
    assert server.process.poll() is None and server.starts == 1


def count_attempts(sink) -> list[float]:
    """Make the sink note the time of every RCPT it sees (one per delivery attempt here)."""
    seen: list[float] = []
    handle_rcpt = sink.handle_RCPT

    async def counting(*args):
        seen.append(time.monotonic())
        return await handle_rcpt(*args)

    sink.handle_RCPT = counting       # aiosmtpd looks the hooks up per connection
    return seen


def test_queued_mail_survives_failed_envelope_updates_and_goes_out_after_space_returns(tmpfs_server, sink):
    sink.refuse[REMOTE] = "451 4.3.0 try again later"
    attempts = count_attempts(sink)
    server = tmpfs_server(relay_port=sink.controller.port, extra=RETRY_EVERY_SECOND)
    mark = uuid.uuid4().hex
    client = server.smtp("relay", source=TRUSTED)
    code, reply = transaction(client, SENDER, [REMOTE], message(mark, REMOTE))
    assert code == 250, (code, reply)
    queue_id = reply.decode().rsplit(" queued as ", 1)[1]
    client.quit()
    active, incoming = server.queue_active, server.data_dir / "queue" / "incoming"
    env_path, msg_path = active / f"{queue_id}.env", active / f"{queue_id}.msg"
    original = msg_path.read_bytes()
    wait_until(lambda: attempts, "a first (refused) delivery attempt", WAIT)

    filler = fill(server)
    # The runner starts an attempt only once the previous one's envelope update
    # has ended; so once attempt k+1 is seen, update k (maybe begun before the
    # fill) is over, and once k+3 is seen, the updates of k+1 and k+2 ran on
    # the full disk. Had either succeeded, the envelope would have changed.
    k = len(attempts)
    wait_until(lambda: len(attempts) >= k + 1, "an attempt on the full disk", WAIT)
    on_disk = env_path.read_bytes()
    wait_until(lambda: len(attempts) >= k + 3, "two more attempts on the full disk", WAIT)
    assert env_path.read_bytes() == on_disk, "an envelope update succeeded on a full disk?"
    # The entry is whole: a valid envelope, the message, nothing in incoming/.
    envelope = json.loads(on_disk)
    assert envelope["id"] == queue_id and [r["state"] for r in envelope["recipients"]] == ["pending"]
    assert msg_path.read_bytes() == original and len(original) == envelope["size"]
    assert sorted(p.name for p in active.iterdir()) == sorted([env_path.name, msg_path.name])
    assert list(incoming.iterdir()) == []
    listed = queue_list(server)
    assert listed.returncode == 0 and queue_id in listed.stdout, (listed.stdout, listed.stderr)
    assert sink.messages == []
    assert "could not record the attempt, it will be retried (" in server.log_text(), "the failed update is reported, in one line"
    assert_no_traceback(server)

    # Space returns and the smarthost takes the mail: delivered without a restart.
    free(filler)
    del sink.refuse[REMOTE]
    sink.wait_for(1)
    (mail_from, rcpt_tos, content), = sink.messages
    assert mail_from == SENDER and rcpt_tos == [REMOTE] and content.endswith(original)
    wait_until_queue_empty(server)
    assert list(active.iterdir()) == [] and list(incoming.iterdir()) == []
    assert_no_traceback(server)
    assert server.process.poll() is None and server.starts == 1
