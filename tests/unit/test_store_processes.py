"""Several PROCESSES on one folder: the flock on the index keeps UIDs unique.

Each worker is a separate Python process with its own MailStore on the same
mail_dir (as POP3/IMAP in another mailgw, or a second server, would be). They
append, drop files into new/ like an MDA, sync, change flags and expunge in a
loop, all at the same time. Nobody may see a UID twice, and every message must
end up with exactly one UID.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mailgw.store import index as ix
from mailgw.store.maildir_name import parse_name

try:
    from test_store import ALICE, make_store, result
except ImportError:  # pragma: no cover
    from tests.unit.test_store import ALICE, make_store, result

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 40

WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from twisted.logger import Logger
    from twisted.python.failure import Failure
    from mailgw.durable import DurableWriter
    from mailgw.store.folder import Folder
    from mailgw.store.mailbox import MailStore
    from threadless import ImmediatePool, ThreadlessClock

    def result(d):
        box = []
        d.addBoth(box.append)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    Folder.log = Logger(observer=lambda e: None)
    mail_dir, worker, rounds, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    reactor, pool = ThreadlessClock(), ImmediatePool()
    store = MailStore(mail_dir, reactor=reactor, threadpool=pool,
                      writer=DurableWriter(reactor=reactor, threadpool=pool))
    inbox = result(store.mailbox("alice@example.org").folder("INBOX"))
    new = inbox.path / "new"
    while not go.exists():   # start together (busy wait: the parent creates it at once)
        pass
    appended, recent, dropped, expunged = [], [], 0, []
    for i in range(rounds):
        appended.append(result(inbox.append(b"Subject: w%d r%d\\r\\n\\r\\nbody\\r\\n" % (worker, i))))
        if i % 3 == 0:
            tmp = inbox.path / "tmp" / f"drop.{worker}.{i}"
            tmp.write_bytes(b"Subject: dropped\\n\\nx\\n")
            os.rename(tmp, new / f"1700000000.drop{worker}x{i}.host")   # as an MDA does
            dropped += 1
        recent.extend(result(inbox.sync()).recent)
        if i % 5 == 4:
            mine = appended[-3:]
            result(inbox.store_flags(mine, ["\\\\Seen", f"w{worker}"], "add"))
        if i % 10 == 9:
            expunged.extend(result(inbox.expunge([appended[-1]])))
    print(json.dumps({"appended": appended, "recent": recent, "dropped": dropped, "expunged": expunged}))
""")


def test_concurrent_processes_never_share_a_uid(tmp_path):
    mail_dir = tmp_path / "mail"
    store = make_store(mail_dir)
    inbox = result(store.mailbox(ALICE).folder("INBOX"))  # creates the directories
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    # The repository for mailgw, tests/unit for the thread-less test doubles.
    path = [str(ROOT), str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    workers = [
        subprocess.Popen([sys.executable, str(script), str(mail_dir), str(n), str(ROUNDS), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        for n in range(3)
    ]
    go.touch()
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err.decode()
        reports.append(json.loads(out))

    appended = [uid for r in reports for uid in r["appended"]]
    recent = [uid for r in reports for uid in r["recent"]]
    expunged = [uid for r in reports for uid in r["expunged"]]
    dropped = sum(r["dropped"] for r in reports)
    # No UID handed out twice: not by append, not as \Recent, not across the two.
    assert len(appended) == len(set(appended)) == 3 * ROUNDS
    assert len(recent) == len(set(recent)) == dropped  # each dropped file \Recent for exactly one session
    assert not set(appended) & set(recent)
    for r in reports:
        assert r["appended"] == sorted(r["appended"])  # ascending within each process

    result(inbox.sync())
    final = [m.uid for m in inbox.messages()]
    assert final == sorted((set(appended) | set(recent)) - set(expunged))
    # Files and index agree: one file per UID, U= as in the index.
    names = [p.name for p in (inbox.path / "cur").iterdir()]
    assert sorted(parse_name(n)[1] for n in names) == final
    assert list((inbox.path / "new").iterdir()) == []
    index = ix.parse_index((inbox.path / ix.INDEX_NAME).read_bytes())
    assert [e.uid for e in index.entries] == final and index.uidnext > max(final)
    # The flags each worker set are there.
    flags = {m.uid: m.flags for m in inbox.messages()}
    for n, r in enumerate(reports):
        for i in range(4, ROUNDS, 5):
            for uid in r["appended"][i - 2: i + 1]:
                if uid in flags:
                    assert {"\\Seen", f"w{n}"} <= flags[uid]
